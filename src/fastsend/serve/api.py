"""The HTTP API of ``fastsend serve``: the aiohttp application, its settings and rules.

Routes live by concern in ``api_messages`` (POST/GET messages),
``api_campaigns`` (campaigns, stats, suppression); this module builds the
application and owns what every route shares:

- ``[api]`` settings (:class:`ApiSettings`): listen, max_batch,
  max_body_bytes, rate_limit, rate_burst;
- authentication: ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``) on
  every ``/v1`` route except the OpenAPI document; 401 without a valid key,
  another tenant's resource answers like a missing one (:func:`require_tenant`);
- a GCRA rate limit per key (429 with Retry-After);
- errors: every failure is JSON ``{"error": {"status", "message", "field"}}``;
  bad input is 400 naming the field, an oversized body 413, and an
  unexpected exception 500 with no detail beyond a log line (never a body,
  never a key).

It never writes SQL itself: the spool, the index and the key store do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec
import orjson
from aiohttp import web

from fastsend.config import Config
from fastsend.config.serve import ApiSettings
from fastsend.config.tenants import norm_domain
from fastsend.serve.auth import KeyStore
from fastsend.serve.builds import Builds
from fastsend.serve.context import CampaignQuotaExceeded, ServeContext
from fastsend.serve.eventindex import EventIndex
from fastsend.serve.httpguard import BodyBudget
from fastsend.serve.tenantcaps import SharedKeyRate, TenantCapExceeded
from fastsend.spool import SpoolStorageError, storage_problem
from fastsend.tenants import TenantDomainError, domain_of
from fastsend.throttle import Gcra

log = logging.getLogger("fastsend.serve.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_tenants(config: Config) -> frozenset[str]:
    """Tenants whose keys see operational, all-tenant data ([dashboard] admin_tenants)."""
    return frozenset(config.dashboard.admin_tenants)


def admin_only(handler: Handler) -> Handler:
    """``handler`` for admin keys only: 401 without a valid key, 404 for a tenant's key
    (the public listener does not even show that the route exists)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        api = api_of(request)
        key = _key_from(request)
        who = api.keys.verify(key) if key else None
        if who is None:
            return error_response(ApiError(401, "missing or invalid API key"))
        if who[1] not in admin_tenants(api.ctx.config):
            return error_response(ApiError(404, "not found"))
        return await handler(request)

    return guarded


class ApiError(Exception):
    """An error answer: HTTP status, message, the offending field if any, and headers
    to send with it (Retry-After)."""

    def __init__(
        self, status: int, message: str, field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers


STORAGE_RETRY_AFTER = 30  # s a client waits before trying again when the spool cannot write


def unavailable(e: BaseException, outage: tuple[type[BaseException], ...] = ()
                ) -> ApiError | None:  # fmt: skip
    """The answer to a request the spool could not take: 507 (Insufficient Storage,
    RFC 4918 11.5) when its disk is full or over quota, 503 when it is read-only, has
    an I/O error or cannot be reached (``outage``: the spool's outage errors, e.g. a
    Redis connection); None for any other error. Both are answered with Retry-After:
    every write of the request rolled back (one transaction per part; a new campaign
    stays unseen, fastsend.serve.api_campaigns), so the client sends it again."""
    problem = storage_problem(e)
    x: BaseException | None = e
    for _ in range(8):  # Redis at maxmemory refuses writes (redis.exceptions: not imported)
        if problem is not None or x is None:
            break
        if type(x).__name__ == "OutOfMemoryError":
            problem = "is full (Redis maxmemory)"
        x = x.__cause__ or x.__context__
    if problem is None and not isinstance(e, SpoolStorageError) and not (
        outage and isinstance(e, outage)
    ):
        return None
    full = problem is not None and problem.startswith(("is full", "is over its disk quota"))
    what = f"the server's spool {problem}" if problem else "the server's spool cannot be reached"
    return ApiError(507 if full else 503, f"{what}: the request was not accepted; try again"
                    f" in {STORAGE_RETRY_AFTER} s")  # fmt: skip


def bad(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, message, field)


def only_params(request: web.Request, known: Iterable[str]) -> None:
    """A 400 naming a query parameter the endpoint does not take: a filter
    misspelt (``campaign_id=7`` for ``campaign=7``) was ignored and the answer
    covered everything, with nothing to say the filter did not apply."""
    allowed = set(known)
    unknown = sorted({k for k in request.query if k not in allowed})
    if unknown:
        raise bad(f"{unknown[0][:100]!r}: not a parameter here (known: {', '.join(sorted(allowed))})",
                  unknown[0][:100])  # fmt: skip


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    err: dict[str, Any] = {"status": e.status, "message": e.message}
    if e.field is not None:
        err["field"] = e.field
    return json_response({"error": err}, e.status, headers)


_AT = re.compile(r" - at `\$\.?(.*)`$")
_NAMED = re.compile(r"^Object (?:contains unknown|missing required) field `([^`]*)`")


MAX_DEPTH = 32  # nesting of free-form values (metadata, variables, templates)
_INT64 = (-(1 << 63), (1 << 64) - 1)


def _name(field: str) -> str:
    return field if field.isidentifier() else orjson.dumps(field).decode()


_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {}


def _struct_fields(typ: type) -> tuple[tuple[str, str], ...]:
    """(attribute, JSON name) of a Struct type; msgspec.structs.fields resolves the
    type annotations on every call (~70% of a request's CPU), so cache it."""
    got = _FIELDS.get(typ)
    if got is None:
        got = _FIELDS[typ] = tuple((f.name, f.encode_name) for f in msgspec.structs.fields(typ))
    return got


def check_values(obj: Any, path: str = "", depth: int = 0, field: str = "") -> None:
    """400 naming the field for what JSON allows but nothing downstream can store.

    Free-form values (``Any``) decode to Python ints of any size and nest as
    deep as the decoder lets them; the JSON encoder of the spool and event
    log (orjson) takes 64-bit integers and 254 levels only.
    """
    if isinstance(obj, bool | str | float) or obj is None:
        return
    if isinstance(obj, int):
        if not _INT64[0] <= obj <= _INT64[1]:
            raise bad(f"{path or '$'}: integer out of the 64-bit range", path or None)
        return
    if depth < 4:
        field = path  # what a nesting error names (not the 32 levels below)
    if depth >= MAX_DEPTH:
        raise bad(f"{field or '$'}: nested deeper than {MAX_DEPTH} levels", field or None)
    if isinstance(obj, msgspec.Struct):
        for name, encode_name in _struct_fields(type(obj)):
            value = getattr(obj, name)
            if isinstance(value, str) or value is None:
                continue  # the common case, checked without building a path
            check_values(value, f"{path}.{encode_name}".lstrip("."), depth + 1, field)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_values(v, f"{path}.{_name(str(k))}".lstrip("."), depth + 1, field)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_values(v, f"{path}[{i}]", depth + 1, field)


# A JSON body larger than this is decoded and checked in a thread: a 16 MiB batch of
# small values takes a second or more of Python work, which must not hold the event
# loop (every other tenant's requests, the tracking links, the listeners, and the
# supervisor's dispatch: serve runs them all on one loop).
OFF_LOOP_BYTES = 1 << 18
YIELD_EVERY = 0.02  # s of a request's work on the loop before it lets others run


async def off_loop(size: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, in a thread when the body it works on is large."""
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def spool_call(ctx: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` (a spool call), in a thread on a shared spool: on the loop a
    slow or paused Redis held every listener of the node for the client's timeout
    (5 s by default, per call). A local spool's are answered here (SQLite, fast)."""
    if getattr(ctx, "shared", None) is not None:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def decode_body(body: bytes, typ: type[Any]) -> Any:
    """JSON -> ``typ`` (a msgspec Struct), or a 400 naming the field."""
    if not body.strip():
        raise bad("empty request body: expected a JSON object")
    try:
        out = msgspec.json.decode(body, type=typ)
    except RecursionError:
        raise bad("malformed JSON: nested too deeply") from None
    except msgspec.ValidationError as e:
        text = str(e)
        m = _AT.search(text)
        path = m.group(1).split("[...]", 1)[0] if m else ""  # [...]: a dict's value
        msg = text[: m.start()] if m else text
        named = _NAMED.search(msg)  # unknown or missing field: name it
        if named is not None:
            path = f"{path}.{named.group(1)}" if path else named.group(1)
        field = path or None
        raise bad(f"{field}: {msg}" if field else msg, field) from None
    except msgspec.DecodeError as e:
        raise bad(f"malformed JSON: {e}") from None
    check_values(out)
    _no_duplicate_keys(body)
    return out


class _Duplicate(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1 and len({k for k, _ in pairs}) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)


def _no_duplicate_keys(body: bytes) -> None:
    """400 for an object that names a key twice (RFC 8259 4: the names SHOULD be
    unique; I-JSON, RFC 7493 2.3: MUST). msgspec keeps the last; a proxy, a signer
    or the client's own log may read the first, so such a body means two things.
    Read again by the standard library's parser, which shows each object's pairs
    (~1 us per small object; numbers are not converted)."""
    try:
        json.loads(body, object_pairs_hook=_pairs, parse_int=_skip, parse_float=_skip)
    except _Duplicate as e:
        key = str(e.args[0])
        raise bad(f"malformed JSON: the key {_name(key)} appears twice in one object", key) from None
    except RecursionError:
        raise bad("malformed JSON: nested too deeply") from None


def _skip(_text: str) -> None:
    return None


class Api:
    """State shared by the routes (one per application)."""

    def __init__(self, ctx: ServeContext, settings: ApiSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.keys = (
            ctx.key_store()
            if hasattr(ctx, "key_store")
            else KeyStore.for_spool(ctx.config.spool_dir)
        )
        self.index = (
            ctx.event_index() if hasattr(ctx, "event_index") else EventIndex(ctx.config.spool_dir)
        )
        attach = getattr(self.index, "attach", None)  # the SQLite index catches up on the log
        if attach is not None:
            attach(ctx.events, getattr(getattr(ctx.config, "analytics", None), "events_days", 0))
        else:
            ctx.events.listeners.append(self.index.listener)
        rollups = getattr(ctx, "rollups", None)
        if rollups is not None and hasattr(self.index, "deliveries"):
            # opens, clicks and complaints of mail this process did not send keep its IP
            rollups.delivery_of = self.index.deliveries
        # An upload's reader that died between a batch's commit and its events:
        # the next one asks this index which events are missing (Acceptor.retell).
        if getattr(ctx, "acceptor", None) is not None:
            ctx.acceptor.index = self.index
        self.limits: dict[str, Gcra | SharedKeyRate] = {}
        self.builds = Builds()  # tenants' templates, built off the loop and kept
        self.bodies = BodyBudget(settings.max_held_bytes, settings.max_body_bytes)
        self.metrics: Any = None  # fastsend.serve.metrics.Metrics, when serving

    def reconfigure(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.bodies.resize(settings.max_held_bytes, settings.max_body_bytes)
        self.limits.clear()
        self.keys.forget_cache()

    def limiter(self, kid: str) -> Gcra | SharedKeyRate:
        """The key's request rate (``[api] rate_limit``): on a shared spool one
        bucket for every node (before, each node allowed the rate: N nodes N times)."""
        g = self.limits.get(kid)
        if g is None:
            s = self.settings
            burst = s.rate_burst or max(1, int(s.rate_limit))
            shared = self.ctx.spool.shared_limits()
            if shared is not None:
                g = self.limits[kid] = SharedKeyRate(shared, kid, s.rate_limit, burst)
            else:
                g = self.limits[kid] = Gcra(s.rate_limit, burst)
        return g

    def close(self) -> None:
        self.index.close()
        self.keys.close()


API_KEY: web.AppKey[Api] = web.AppKey("fastsend_api", Api)
TENANT: web.RequestKey[str] = web.RequestKey("fastsend_tenant", str)
KEY_ID: web.RequestKey[str] = web.RequestKey("fastsend_key_id", str)
# (tenant, octets) of the request's body counted by Api.bodies (read_body)
HELD: web.RequestKey[tuple[str, int]] = web.RequestKey("fastsend_held_body", tuple)


def api_of(request: web.Request) -> Api:
    return request.app[API_KEY]


def max_message_size(request: web.Request) -> int:
    """[delivery] max_message_size (0: no limit): what a message accepted may weigh."""
    return api_of(request).ctx.config.delivery.max_message_size


def tenant_of(request: web.Request) -> str:
    return request[TENANT]


def require_tenant(request: web.Request, owner: str | None, missing: ApiError) -> None:
    """``missing`` (the very answer a nonexistent id gets) unless the key's tenant owns it.

    Another tenant's id answers exactly like an id that does not exist, so ids
    reveal nothing about other tenants (not even that they exist).
    """
    if owner != tenant_of(request):
        raise missing


def check_from_domain(request: web.Request, domain: str, field: str) -> None:
    """403 naming the domain unless the key's tenant may send From ``domain`` ([tenants])."""
    tenants = api_of(request).ctx.tenants
    if tenants is None:
        return
    try:
        tenants.check_from(tenant_of(request), domain)
    except TenantDomainError as e:
        raise ApiError(403, f"{field}: {e}", field) from None


def check_envelope(request: web.Request, spec: dict[str, Any], where: str) -> None:
    """403 naming the key unless the campaign's envelope sender is the tenant's: a
    ``return_path`` or ``verp_domain`` at one of its sending domains, or the intake's
    ``[intake] verp_domain`` (bounces come back to the server). The envelope sender is
    the domain SPF checks and bounces go to: another tenant's is not for the taking."""
    api = api_of(request)
    tenants = api.ctx.tenants
    if tenants is None:
        return
    check_resent_headers(request, spec.get("headers"), where)
    tenant = tenant_of(request)
    intake = norm_domain(api.ctx.config.intake.verp_domain or "")
    for key in ("return_path", "verp_domain"):
        value = spec.get(key)
        if not value:
            continue
        domain = domain_of(value) if key == "return_path" else domain_of("@" + value)
        if intake and domain == intake:
            continue
        try:
            tenants.check_from(tenant, domain)
        except TenantDomainError as e:
            raise ApiError(403, f"{where}.{key}: {e}", f"{where}.{key}") from None


def header_break(variables: dict[str, Any], names: frozenset[str]) -> str | None:
    """The first of ``names`` whose value in ``variables`` has CR, LF or NUL (it would
    go into a header field: the message could only be refused when rendered)."""
    for name in names:
        v = variables.get(name)
        if isinstance(v, str) and ("\r" in v or "\n" in v or "\0" in v):
            return name
    return None


RESENT_FIELDS = ("resent-from", "resent-sender")


def check_resent_headers(request: web.Request, headers: Any, where: str) -> None:
    """A ``Resent-From`` or ``Resent-Sender`` header (RFC 5322 3.6.6; mail programs show
    it as who sent the message on) is held to the From's rule: every address at one of
    the tenant's domains (403 naming the header), and no placeholder (400: a recipient
    row would choose the domain)."""
    if not isinstance(headers, dict) or api_of(request).ctx.tenants is None:
        return
    import email.utils

    for name, value in headers.items():
        if not isinstance(name, str) or name.lower() not in RESENT_FIELDS:
            continue
        field = f"{where}.headers.{name}"
        if not isinstance(value, str) or "{{" in value:
            raise bad(f"{field}: must be literal addresses (it names the sender)", field)
        for _, addr in email.utils.getaddresses([value]) or [("", "")]:
            check_from_domain(request, domain_of(addr) if "@" in addr else "", field)


def check_link_host(request: web.Request, spec: dict[str, Any], where: str) -> None:
    """403 when the campaign's tracking links would be on another tenant's host: its
    ``tracking_base_url``'s or a name under its domains (and not under the key's
    tenant's own). Such a link redirects where this tenant says on the other's name."""
    tenants = api_of(request).ctx.tenants
    t = spec.get("tracking")
    if tenants is None or not tenants.configured or not isinstance(t, dict):
        return
    base = t.get("base_url")
    if not base or not (t.get("opens") or t.get("clicks") or t.get("unsubscribe")):
        return
    tenant = tenant_of(request)
    if base == tenants.tracking_base_url(tenant):
        return  # the operator's choice for this tenant
    host = norm_domain(urlsplit(base).hostname or "")
    owner = tenants.owner_of(host)  # the most specific listed domain decides
    if owner == tenant:
        return
    for name, other in tenants.by_name.items():
        if name == tenant:
            continue
        theirs = norm_domain(urlsplit(other.tracking_base_url).hostname or "")
        if host == theirs or owner == name:
            raise ApiError(
                403, f"{where}.tracking.base_url: host {host!r} is not one this tenant may"
                " put links on", f"{where}.tracking.base_url",
            )  # fmt: skip


def tenant_template(request: web.Request, template: Any) -> Any:
    """A tenant's campaign template with its ``tracking_base_url`` as the links' base
    when tracking is on and the template names none (before it is validated: an
    unsubscribe link needs its https base)."""
    tenants = api_of(request).ctx.tenants
    if not isinstance(template, dict) or tenants is None:
        return template
    t = template.get("tracking")
    base = tenants.tracking_base_url(tenant_of(request))
    if base and isinstance(t, dict) and not t.get("base_url") and (
        t.get("opens") or t.get("clicks") or t.get("unsubscribe")
    ):
        template = {**template, "tracking": {**t, "base_url": base}}
    return template


def server_dkim(request: web.Request, spec: dict[str, Any], from_domain: str) -> None:
    """Put the server's DKIM choice for (tenant, From domain) into a tenant's campaign spec
    (tenants never name key files: fastsend.message.campaign.check_inline), and bind its
    tracking links to the tenant (with the tenant's tracking base URL if it gave none)."""
    tenants = api_of(request).ctx.tenants
    tenant = tenant_of(request)
    if tenants is not None:
        spec["dkim"] = tenants.dkim_for(tenant, from_domain)
    t = spec.get("tracking")
    if isinstance(t, dict) and (t.get("opens") or t.get("clicks") or t.get("unsubscribe")):
        t["tenant"] = tenant  # tracking tokens are bound to the tenant
        if not t.get("base_url") and tenants is not None and tenants.tracking_base_url(tenant):
            t["base_url"] = tenants.tracking_base_url(tenant)


def _key_from(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("X-API-Key")


PUBLIC = frozenset({"/v1/openapi.json", "/v1/health"})


async def _verify(api: Any, key: str) -> tuple[str, str] | None:
    """``api.keys.verify(key)``; a key a shared store (Redis) must look up, in a
    thread: on the loop, a slow Redis held every request and listener of the node
    (and any key unknown to the cache, a made-up one too, is looked up)."""
    cached = getattr(api.keys, "cached", None)
    if cached is None or cached(key):
        return cast("tuple[str, str] | None", api.keys.verify(key))
    return cast("tuple[str, str] | None", await asyncio.to_thread(api.keys.verify, key))


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        path = request.path
        if path.startswith("/v1/") and path not in PUBLIC:
            api = api_of(request)
            key = _key_from(request)
            who = await _verify(api, key) if key else None
            if who is None:
                # request.remote: the client's address (a trusted balancer's PROXY header)
                log.warning("API: 401 %s %s from %s", request.method, path, request.remote)
                raise ApiError(401, "missing or invalid API key")
            kid, tenant = who
            limiter = api.limiter(kid)
            if isinstance(limiter, SharedKeyRate):  # (Redis: a thread's call, as _verify)
                wait = await asyncio.to_thread(limiter.acquire, time.monotonic())
            else:
                wait = limiter.acquire(time.monotonic())
            if wait > 0:
                e = ApiError(429, f"rate limit of {api.settings.rate_limit:g} requests/s exceeded")
                return error_response(e, {"Retry-After": str(max(1, round(wait + 0.5)))})
            request[TENANT] = tenant
            request[KEY_ID] = kid
        try:
            return await handler(request)
        finally:
            held = request.get(HELD)
            if held is not None:  # (answered: its body and what was decoded of it go)
                api_of(request).bodies.give(*held)
    except CampaignQuotaExceeded as e:
        return error_response(ApiError(429, str(e)), {"Retry-After": str(e.wait)})
    except TenantCapExceeded as e:  # (a request over the burst: waiting does not help)
        return error_response(ApiError(429, str(e)), {"Retry-After": str(e.wait)} if e.wait else {})
    except ApiError as e:
        resp = error_response(e, e.headers)
        if e.status == 408:
            resp.force_close()  # the rest of the body is not waited for
        return resp
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(ApiError(413, f"request body too large: {e.text}"))
    except web.HTTPException as e:
        # /v1 answers JSON; the pages (tracking, unsubscribe) keep their own HTML answers.
        if e.status >= 400 and request.path.startswith("/v1/"):
            # Keep what the status needs (Allow on 405, RFC 9110 15.5.6).
            keep = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
            return error_response(ApiError(e.status, e.reason), keep or None)
        raise
    except Exception as e:
        if isinstance(e, ConnectionError) and _client_left(request):
            # The client went away mid-request (its body cut off): nothing wrong
            # here, and the answer reaches nobody. (It was logged as an internal
            # error with a traceback, one per dropped request: a log any client
            # could flood.) A body streamed to a file is removed by its reader.
            log.debug("API: %s %s: the client left mid-request", request.method, request.path)
            return error_response(ApiError(400, "the client closed the connection"))
        spool = getattr(getattr(request.app.get(API_KEY), "ctx", None), "spool", None)
        down = unavailable(e, spool.outage_errors() if spool is not None else ())
        if down is not None:
            log.warning("fastsend serve: %s %s answered %d: %s", request.method, request.path,
                        down.status, e)  # fmt: skip
            return error_response(down, {"Retry-After": str(STORAGE_RETRY_AFTER)})
        log.exception("fastsend serve: internal error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal error (logged on the server)"))


def _client_left(request: web.Request) -> bool:
    """Whether the request's connection is gone (the client closed it): a
    ConnectionError then is the client's leaving, not a spool's or a peer's."""
    transport = request.transport
    return transport is None or transport.is_closing()


# What a JSON body may be labelled: JSON, nothing (aiohttp reads a missing
# Content-Type as application/octet-stream) and curl -d's form type; any other
# declared type (text/plain, XML, multipart, CSV) is a 415.
JSON_TYPES = frozenset(
    {"application/json", "application/octet-stream", "application/x-www-form-urlencoded"}
)


def check_json_type(request: web.Request, others: str = "") -> None:
    """415 unless the request's Content-Type may hold a JSON body (``others``: what
    else the route takes, named in the error)."""
    ctype = request.content_type
    if ctype not in JSON_TYPES and not ctype.endswith("+json"):
        also = f" or {others}" if others else ""
        raise ApiError(
            415, f"Content-Type {ctype[:100]!r} is not accepted here: send application/json{also}"
        )


async def read_body(request: web.Request) -> bytes:
    api = api_of(request)
    limit = api.settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body of {request.content_length} bytes exceeds {limit}")
    check_json_type(request)
    if HELD not in request:  # (read twice under an Idempotency-Key: counted once)
        n = request.content_length if request.content_length is not None else limit
        who = tenant_of(request)
        over = api.bodies.take(who, n)
        if over is not None:
            whose = "this tenant's requests hold" if over == "tenant" else "requests hold"
            raise ApiError(
                429 if over == "tenant" else 503,
                f"{whose} too much content at once ([api] max_held_bytes); try again shortly",
                headers={"Retry-After": "1"},
            )
        request[HELD] = (who, n)
    seconds = api.settings.body_timeout
    try:
        async with asyncio.timeout(seconds):  # a body that stops arriving holds nothing
            body = await request.read()  # aiohttp enforces client_max_size too
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {seconds:g} s") from None
    if len(body) > limit:
        raise ApiError(413, f"request body exceeds {limit} bytes")
    return body


MAX_ID = (1 << 63) - 1  # SQLite's INTEGER: a larger id cannot exist


def int_param(value: str, name: str, maximum: int = MAX_ID) -> int:
    """A positive integer path or query parameter, or a 400 naming it."""
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        # int() would also take "+1", " 1", "1_000" and non-ASCII digits.
        raise bad(f"{name} must be an integer from 1 to {maximum}, got {value[:40]!r}", name)
    n = int(value)
    if not 1 <= n <= maximum:
        raise bad(f"{name} must be an integer from 1 to {maximum}, got {value[:40]!r}", name)
    return n
