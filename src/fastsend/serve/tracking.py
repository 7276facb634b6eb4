"""Open/click tracking and unsubscribe endpoints of ``fastsend serve``.

NAME
    fastsend.serve.tracking -- setup_tracking(app, ctx): the /t/ and /u/ routes.

DESCRIPTION
    ``GET /t/o/<token>.gif``  records "opened", answers a 1x1 transparent GIF.
    ``GET /t/c/<token>``      records "clicked", answers 302 to the URL signed
                              inside the token.
    ``GET /u/<token>``        a small page with a confirm button (no change:
                              link scanners and prefetchers issue GETs).
    ``POST /u/<token>``       unsubscribes: RFC 8058 one-click (body
                              ``List-Unsubscribe=One-Click``, read as a form
                              whatever its Content-Type) or the page's
                              form; the address is added to the tenant's
                              suppression list (reason "unsubscribe") and
                              "unsubscribed" is recorded.

    Tokens are opened with :func:`fastsend.message.tracking.open_token`
    (AES-256-GCM under a key derived from ``ctx.secret``): expired tokens and
    tokens whose tenant is not the message's owner answer 404 like forged
    ones. Links of the older HMAC format (mail sent before the upgrade) are
    opened by :func:`fastsend.message.tracking.open_legacy`: genuine ones work
    until ``link_ttl_days`` after the upgrade (spool meta ``tracking_v2_since``,
    recorded at the first start), bound to the tenant owning their message.
    Anything forged,
    truncated or of the wrong kind answers 404 and is never redirected, so the
    click endpoint cannot serve as an open redirect. Opens and clicks touch no
    database on the request path beyond one cached, indexed read that names
    the message's campaign and tenant; the event goes to ``ctx.emit`` (the
    buffered event log and its listeners, e.g. the webhook outbox).
    HEAD requests are answered without an event; the rollups count them as
    machine opens and clicks (fastsend.analytics.machine).

    ``setup_tracking`` also hands ``ctx.secret`` to the message renderers of
    this process (and the workers it forks later), so links signed by workers
    verify here.

DELIBERATELY NOT HERE
    No bot or mail-privacy-proxy filtering here: every GET is an event, marked
    ``machine`` with the machine rule its User-Agent alone matches ("" if none),
    and the rollups judge machine opens and clicks from the events
    (fastsend.analytics.machine, with the time since delivery), no IP addresses in
    events, no per-link statistics (they are computed from the event stream).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import html
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from aiohttp import web

from fastsend.config.tenants import norm_domain
from fastsend.message import tracking as tr
from fastsend.serve.eventindex import already_told, first_telling
from fastsend.serve.httpguard import body_deadline
from fastsend.suppression import DEFAULT_TENANT, UNSUBSCRIBE, SuppressionError

__all__ = ["setup_tracking"]

log = logging.getLogger("fastsend.serve")

# The smallest transparent GIF (43 octets).
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
    b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_NO_STORE = {"Cache-Control": "no-store, max-age=0", "Pragma": "no-cache"}
# Pages load nothing (no scripts, styles, images, frames) and post only to themselves.
_CSP = "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_TOKEN = r"{token:[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+}"
MAX_UA = 512
_CACHE_SIZE = 4096
# One link (a token: message, recipient, kind, URL) records at most LINK_EVENTS
# ([tracking] link_events_per_hour) opens or clicks in LINK_WINDOW seconds, across the
# nodes of a shared spool; more are answered (pixel, redirect) but not recorded.
# Without it one client replaying one pixel wrote ~3,600 events a second (event log,
# index, webhooks, rollups): a recipient could fill the server's disk with one link.
LINK_EVENTS = 20
LINK_WINDOW = 3600.0
_LINKS_KEPT = 100_000  # links remembered (the least recently used go first)
ONE_CLICK = "One-Click"
# RFC 8058 3.2 asks for a form (multipart/form-data or x-www-form-urlencoded) body of
# "List-Unsubscribe=One-Click"; a client that POSTs that body with no content type, or
# text/plain (a hand-made one-click client), read as 400 lost the unsubscribe: the body
# is read as a urlencoded form whatever its type says.
MAX_FORM_BODY = 16_384  # what of an unsubscribe POST's body is read (the form is ~20 octets)
_KINDS = {"opened": "open", "clicked": "click"}  # events judged by the machine rules


_T = TypeVar("_T")

SPOOL_RETRY = 10.0  # s a spool out of reach is left alone before it is asked again
LEGACY_SINCE = "tracking_v2_since"  # spool meta: when this installation first encrypted tokens


class _Tracking:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.secret: bytes = ctx.secret
        self._owner: OrderedDict[int, tuple[int | None, str]] = OrderedDict()
        # Links of the HMAC format in mail sent before the upgrade expire
        # link_ttl_days after it: the upgrade's time is recorded once.
        self.legacy_since = float(ctx.spool.meta_once(LEGACY_SINCE, repr(time.time())))
        self._hosts: tuple[Any, dict[str, str | None]] = (None, {})  # host -> its tenant
        self._links: OrderedDict[bytes, tuple[float, int]] = OrderedDict()  # digest -> (start, n)
        self.held = 0  # opens and clicks answered but not recorded (LINK_EVENTS)
        self.shared = getattr(ctx, "shared", None)  # the nodes' count (a shared spool)
        self._shared_down = 0.0  # when counting in Redis last failed (monotonic)
        self._spool_down = float("-inf")  # when reading the spool last failed (monotonic)
        self._rules: Any = None  # the machine rules when there are no rollups (analytics off)

    # Read from the config in force at each request: a SIGHUP replaces ctx.config.
    @property
    def cap(self) -> int:
        return int(self.ctx.config.tracking.link_events_per_hour)

    @property
    def body_timeout(self) -> float:  # the unsubscribe form's
        return float(self.ctx.config.api.body_timeout)

    async def _off(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)``: in a thread on a shared spool (what it asks Redis: the
        message's owner, the suppression list, the once marks), here on a local one.
        On the loop each call held every listener of the node while Redis was slow
        or paused (up to the client's timeout, ~20 s a click over its calls)."""
        if self.shared is None:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def _record(self, request: web.Request) -> bool:
        """Whether this open or click is recorded: ``cap`` ([tracking]
        link_events_per_hour) per link per LINK_WINDOW, counted here and, on a shared
        spool, across the nodes (a node that counts them alone on a Redis outage;
        the count asked in a thread)."""
        if not self.cap:
            return True
        token = request.match_info["token"]
        # Kept by a digest: a token is up to MAX_TOKEN (7,900) octets, and _LINKS_KEPT of
        # them held ~750 MB (a tenant mailing itself links of the longest URL tracked).
        key = hashlib.blake2b(token.encode(), digest_size=16).digest()
        now = time.monotonic()
        links = self._links
        start, n = links.pop(key, (now, 0))
        if now - start >= LINK_WINDOW:
            start, n = now, 0
        links[key] = (start, n + 1)
        if len(links) > _LINKS_KEPT:
            links.popitem(last=False)
        ok = n < self.cap
        if ok and self.shared is not None and now - self._shared_down > 10.0:
            try:
                ok = await asyncio.to_thread(self.shared.link_event, token, LINK_WINDOW,
                                             self.cap)  # fmt: skip
            except Exception as e:  # Redis away a moment: this node's own count holds
                self._shared_down = time.monotonic()
                log.warning("tracking: the nodes' link counts are out of reach (%s);"
                            " counting on this node alone for 10 s", e)  # fmt: skip
        if not ok:
            self.held += 1
            self.ctx.tracking_unrecorded = self.held
        return ok

    # -- helpers --------------------------------------------------------------
    def _check(self, request: web.Request, kind: str) -> tuple[str, ...]:
        return self._open(request, kind)[0]

    def _host_owner(self, request: web.Request) -> str | None:
        """The tenant whose host the request came to (its ``tracking_base_url``'s, or a
        name under its domains), or None (a shared host, or no [tenants])."""
        tenants = getattr(self.ctx, "tenants", None)
        if tenants is None or not tenants.configured:
            return None
        try:
            host = norm_domain(urlsplit("//" + (request.host or "")).hostname or "")
        except ValueError:  # ("[", a bad IPv6 literal: no URL holds it; was a 500)
            return None
        if not host:
            return None
        if self._hosts[0] is not tenants:
            self._hosts = (tenants, {})
        cache = self._hosts[1]
        if host not in cache:
            owner = next(
                (name for name, t in tenants.by_name.items()
                 if host == norm_domain(urlsplit(t.tracking_base_url).hostname or "")),
                None,
            ) or tenants.owner_of(host)  # else the most specific listed domain's  # fmt: skip
            if len(cache) > _CACHE_SIZE:
                cache.clear()
            cache[host] = owner
        return cache[host]

    def _open(self, request: web.Request, kind: str) -> tuple[tuple[str, ...], str]:
        """(fields, tenant) of a genuine, unexpired token of ``kind`` bound to the
        tenant that owns its message (when the message is still in the spool), asked
        for on a host that is not another tenant's."""
        fields, tenant = self._token(request.match_info["token"], kind)
        owner = self._host_owner(request)
        if owner is not None and tenant != DEFAULT_TENANT and owner != tenant:
            # One tenant's link on another's host: a redirect where the one says, on
            # the other's name (the link's host is not inside the token: it can be
            # rewritten). The operator's own campaigns (tenant default) may use any.
            raise _not_found()
        return fields, tenant

    def _token(self, token: str, kind: str) -> tuple[tuple[str, ...], str]:
        got = tr.open_token(self.secret, token)
        legacy = got is None
        if legacy:
            got = tr.open_legacy(self.secret, token, self.legacy_since)
        if got is None or got[0] != kind:
            raise _not_found()
        fields, tenant = got[1], got[2] or DEFAULT_TENANT
        campaign, owner = self.owner(fields[0])
        if legacy:
            return fields, owner  # no tenant inside: the message's owner, if known
        if campaign is not None and owner != tenant:
            raise _not_found()  # a token bound to another tenant than the message's
        return fields, tenant

    def owner(self, mid: str) -> tuple[int | None, str]:
        """(campaign id, tenant) of a message id; (None, default) if unknown."""
        mid = mid.partition("-")[0]  # "<row id>-<mac>" (fastsend.msgid); the token is signed
        if not mid.isdigit():
            return None, DEFAULT_TENANT
        n = int(mid)
        hit = self._owner.get(n)
        if hit is not None:
            self._owner.move_to_end(n)
            return hit
        campaign: int | None = None
        tenant = DEFAULT_TENANT
        now = time.monotonic()
        if now - self._spool_down < SPOOL_RETRY:
            return None, DEFAULT_TENANT  # (not kept: known again once the spool answers)
        try:
            row = self.ctx.spool.owner(n)
            if row is not None:
                campaign = row[0]
                try:
                    tenant = self.ctx.campaign_tenant(campaign)
                except (KeyError, AttributeError):
                    info = self.ctx.spool.get_campaign(campaign)
                    tenant = info.tenant if info is not None else DEFAULT_TENANT
            else:
                campaign, tenant = self._indexed(n)
        except Exception as e:
            # The spool out of reach (a shared spool's Redis down or paused): every
            # click was a 500, the reader's link broken, though its URL is in the
            # token. The link answers; the event names the token's tenant; the spool
            # is asked again after SPOOL_RETRY s (each try held the loop for the
            # client's timeout).
            self._spool_down = now
            log.warning("tracking: the spool is out of reach (%s: %s); links answer and"
                        " events name their token's tenant, trying again in %.0f s",
                        e.__class__.__name__, e, SPOOL_RETRY)  # fmt: skip
            return None, DEFAULT_TENANT
        self._owner[n] = (campaign, tenant)
        if len(self._owner) > _CACHE_SIZE:
            self._owner.popitem(last=False)
        return campaign, tenant

    def _indexed(self, mid: int) -> tuple[int | None, str]:
        """(campaign, tenant) of a message gone from the spool (``[spool]
        final_retention_days`` after it was final; its links live ``link_ttl_days``)
        as its events in the per-message index name them ([analytics] events_days);
        (None, default) when none does. Before, such a message's campaign was lost:
        an old-format link's event (no tenant inside) was tenant default's, and a
        tenant's own (transactional mail, pruned soonest) was left out of its
        campaign's events, ``GET /v1/events`` and the campaign's stats."""
        index = getattr(getattr(self.ctx, "acceptor", None), "index", None)
        if index is None:
            return None, DEFAULT_TENANT
        for ev in index.for_message(mid):
            campaign, tenant = ev.get("campaign"), ev.get("tenant")
            if isinstance(campaign, int) and campaign > 0 and isinstance(tenant, str) and tenant:
                return campaign, tenant
        return None, DEFAULT_TENANT

    def _event(
        self, name: str, mid: str, rcpt: str, request: web.Request, token_tenant: str = ""
    ) -> dict[str, Any]:
        campaign, tenant = self.owner(mid)
        if campaign is None and token_tenant:
            tenant = token_tenant  # the message is gone: the token's (authenticated) tenant
        ua = request.headers.get("User-Agent", "")[:MAX_UA]
        ev = {
            "time": time.time(),
            "event": name,
            "id": int(mid.partition("-")[0]) if mid.partition("-")[0].isdigit() else mid,
            "campaign": campaign,
            "tenant": tenant,
            "rcpt": rcpt,
            "user_agent": ua,
        }
        kind = _KINDS.get(name)
        if kind is not None:
            ev["machine"] = self._machine(kind, ua, request.method)
        return ev

    def _machine(self, kind: str, ua: str, method: str) -> str:
        """The machine rule (fastsend.analytics.machine) the request alone matches:
        its User-Agent or method ("apple-mpp", "scanner-agent", "head-request", ...),
        "" when nothing in it says software. The rules of the rollups (the operator's
        ``[analytics] machine_rules`` first), else the shipped ones. A webhook
        receiver gets the mark with the event; /v1/stats also judges by the time
        since delivery and by bursts of clicks, which a request alone cannot show."""
        rollups = getattr(self.ctx, "rollups", None)
        rules = getattr(rollups, "rules", None)
        if rules is None:
            rules = self._rules
            if rules is None:
                from fastsend.analytics.machine import load_machine_rules

                path = self.ctx.config.analytics.machine_rules
                rules = self._rules = load_machine_rules(path or None)
        verdict: str = rules.classify(kind, ua, method.upper())
        return verdict

    def _head(self, ev: dict[str, Any]) -> None:
        """Issue 14: a HEAD is a link checker's, never a person's: not an event (no log
        line, no webhook), but counted in the rollups as a machine open or click."""
        rollups = getattr(self.ctx, "rollups", None)
        if rollups is not None:
            ev["http_method"] = "HEAD"
            rollups.listener([ev])

    # -- handlers -------------------------------------------------------------
    async def open(self, request: web.Request) -> web.Response:
        (mid, rcpt), tenant = await self._off(self._open, request, tr.OPEN)
        if not await self._record(request):
            pass  # answered as always, not recorded again
        elif request.method == "GET":
            self.ctx.emit_optional(self._event("opened", mid, rcpt, request, tenant))
        else:
            self._head(self._event("opened", mid, rcpt, request, tenant))
        return web.Response(
            body=PIXEL_GIF,
            content_type="image/gif",
            headers={**_NO_STORE, "X-Content-Type-Options": "nosniff"},
        )

    async def click(self, request: web.Request) -> web.Response:
        (mid, rcpt, url), tenant = await self._off(self._open, request, tr.CLICK)
        if not url.lower().startswith(("http://", "https://")):
            raise _not_found()
        location = ascii_url(url)
        if location is None:
            raise _not_found()  # a host no browser could ask for
        if await self._record(request):
            ev = self._event("clicked", mid, rcpt, request, tenant)
            ev["url"] = url
            if request.method == "GET":
                self.ctx.emit_optional(ev)
            else:
                self._head(ev)
        return web.Response(
            status=302,
            headers={"Location": location, "Referrer-Policy": "no-referrer", **_NO_STORE},
        )

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        _mid, rcpt = await self._off(self._check, request, tr.UNSUBSCRIBE)
        return _page(
            "Unsubscribe",
            f"<p>Stop sending mail to <b>{html.escape(rcpt)}</b>?</p>"
            '<form method="post"><input type="hidden" name="confirm" value="yes">'
            '<button type="submit">Unsubscribe</button></form>',
        )

    async def unsubscribe(self, request: web.Request) -> web.Response:
        (mid, rcpt), token_tenant = await self._off(self._open, request, tr.UNSUBSCRIBE)
        raw = await body_deadline(request.read(), self.body_timeout)
        form = read_form(request.headers.get("Content-Type", ""), raw)
        one_click = form.get("List-Unsubscribe") == ONE_CLICK
        if not one_click and form.get("confirm") != "yes":
            raise _bad_request("expected List-Unsubscribe=One-Click or confirm=yes")
        campaign, tenant = await self._off(self.owner, mid)
        if campaign is None:
            tenant = token_tenant  # the message is gone: the token's (authenticated) tenant
        try:
            head = mid.partition("-")[0]
            await self._off(functools.partial(
                self.ctx.suppression.add, rcpt, UNSUBSCRIBE, tenant=tenant, source=UNSUBSCRIBE,
                message=int(head) if head.isdigit() else None,
            ))  # fmt: skip
        except SuppressionError:
            raise _bad_request("cannot unsubscribe this address") from None
        except Exception as e:  # the suppression list out of reach (Redis down): was a 500
            log.warning("unsubscribe: the suppression list is out of reach (%s: %s): 503",
                        e.__class__.__name__, e)  # fmt: skip
            raise web.HTTPServiceUnavailable(
                text=_html("Try again", "<p>We could not unsubscribe you just now."
                           " Please try again in a minute.</p>"),
                content_type="text/html", headers={**_PAGE_HEADERS, "Retry-After": "60"},
            ) from None
        ev = self._event("unsubscribed", mid, rcpt, request, token_tenant)
        ev["method"] = "one-click" if one_click else "page"
        if not already_told(self.ctx, ev["id"], "unsubscribed") and await self._off(
            first_telling, self.ctx, ev["id"], "unsubscribed"
        ):
            self.ctx.emit(ev)  # once per message: a client may POST one-click again
        if one_click:
            return web.Response(text="unsubscribed\n", headers=_NO_STORE)
        return _page("Unsubscribed", f"<p>{html.escape(rcpt)} will get no more mail from us.</p>")


def read_form(content_type: str, raw: bytes) -> dict[str, str]:
    """The fields of an unsubscribe POST's body (the first of each name): a multipart
    form's parts, else (and when a multipart body holds no part) the body read as a
    urlencoded form whatever its label says: RFC 8058's "List-Unsubscribe=One-Click"
    labelled multipart/form-data without a boundary, or with a charset no codec has,
    was a 500 from aiohttp's form reader (the unsubscribe lost). Text that is not
    UTF-8 is no field (the caller's 400)."""
    raw = raw[:MAX_FORM_BODY]
    if content_type.partition(";")[0].strip().lower() == "multipart/form-data":
        from email import policy
        from email.parser import BytesParser

        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n"
        msg = BytesParser(policy=policy.HTTP).parsebytes(head.encode("latin-1", "replace") + raw)
        fields: dict[str, str] = {}
        parts = msg.get_payload() if msg.is_multipart() else []
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, str):
                continue
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(data, bytes):
                fields.setdefault(name, _text(data))
        if fields:
            return fields
    pairs = parse_qsl(raw.decode("latin-1").strip(), encoding="latin-1")
    out: dict[str, str] = {}
    for k, v in pairs:
        out.setdefault(_text(k.encode("latin-1")), _text(v.encode("latin-1")))
    return out


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return ""


# What is percent-encoded (as UTF-8) in each part of a redirect's URL: every
# non-ASCII character and those the WHATWG URL parser encodes in that part
# (https://url.spec.whatwg.org/#percent-encoded-bytes), "%" never (an escape the
# link already has stays as it is, and a stray "%" is left as browsers leave it).
_KEEP = "".join(chr(c) for c in range(0x21, 0x7F))
_SAFE_PATH = _KEEP.translate({ord(c): None for c in '"<>`{}'})
_SAFE_QUERY = _KEEP.translate({ord(c): None for c in "\"<>'"})
_SAFE_FRAGMENT = _KEEP.translate({ord(c): None for c in '"<>`'})
_UNSAFE_ASCII = frozenset(" \"<>`{}'")  # a printable ASCII URL without these is sent as it is
# What a browser does first to a URL (WHATWG URL parsing): C0 controls and spaces at
# its ends stripped, every tab and line break removed.
_ENDS = "".join(chr(c) for c in range(0x21))
_TAB_NEWLINE = {9: None, 10: None, 13: None}


def ascii_url(url: str) -> str | None:
    """``url`` (http or https) as a browser sends it, in a form every parser reads alike:
    tabs and line breaks dropped, the slashes after the scheme two, a backslash in the
    authority or the path a slash (WHATWG URL: an RFC 3986 parser read
    ``https://evil.example\\@good.example/`` as good.example's, a browser goes to
    evil.example), the host in IDNA A-labels, non-ASCII characters, spaces and controls
    in the path, query and fragment percent-encoded as UTF-8 (a Location header is
    printable ASCII: RFC 9110 5.5, RFC 3986 3; raw UTF-8 there is read as Latin-1 by
    some clients). None when the host is not a valid name. (A no-break space, a
    zero-width joiner of an emoji sequence, a soft hyphen: a link holding one was
    tracked, then its click answered 404.)"""
    url = url.strip(_ENDS).translate(_TAB_NEWLINE)
    scheme, _colon, rest = url.partition(":")
    after = rest.lstrip("/\\")
    if (
        len(rest) - len(after) == 2 and rest.startswith("//") and "\\" not in url
        and url.isascii() and url.isprintable() and not _UNSAFE_ASCII.intersection(url)
    ):  # fmt: skip
        return url
    scheme, sep, rest = scheme.lower(), "://", after
    cut = min((i for i in (rest.find(c) for c in "/\\?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = authority.rpartition("@")
    host, port = hostport, ""
    if not host.startswith("["):  # (an IPv6 literal is ASCII)
        host, colon, port = hostport.partition(":")
        port = colon + port
    if not host:
        return None
    if not host.isascii():
        from fastsend.message.headers import HeaderError, encode_domain

        try:
            host = encode_domain(host.rstrip(".")).lower() + ("." if host.endswith(".") else "")
        except HeaderError:
            return None
    tail, hash_, fragment = tail.partition("#")
    path, q, query = tail.partition("?")
    path = path.replace("\\", "/")
    out = (
        scheme + sep + quote(userinfo, _SAFE_PATH) + at + host + port
        + quote(path, _SAFE_PATH) + q + quote(query, _SAFE_QUERY)
        + hash_ + quote(fragment, _SAFE_FRAGMENT)
    )  # fmt: skip
    # What is left unencoded (the scheme, the host, the port) must be printable ASCII
    # too: a control or a space there is no host a browser asks for.
    return out if out.isascii() and out.isprintable() and " " not in out else None


def _html(title: str, body: str) -> str:
    """A small, valid HTML5 document: no scripts, styles or external resources."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"{body}</body></html>"
    )


def _page(title: str, body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=_html(title, body), status=status, content_type="text/html", headers=_PAGE_HEADERS
    )


def _not_found() -> web.HTTPNotFound:
    """A forged, tampered or truncated link: a page that says so and links nowhere."""
    return web.HTTPNotFound(
        text=_html("Link not valid", "<p>This link is not valid or has expired.</p>"),
        content_type="text/html",
        headers=_PAGE_HEADERS,
    )


def _bad_request(why: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=_html("Cannot unsubscribe", f"<p>{html.escape(why)}.</p>"),
        content_type="text/html",
        headers=_PAGE_HEADERS,
    )


def setup_tracking(app: web.Application, ctx: Any) -> None:
    """Add the /t/ (tracking) and /u/ (unsubscribe) routes to ``app``."""
    tr.set_process_secret(ctx.secret)
    configure(ctx.config)
    t = _Tracking(ctx)
    app.router.add_get("/t/o/" + _TOKEN + ".gif", t.open)  # GET and HEAD
    app.router.add_get("/t/c/" + _TOKEN, t.click)
    app.router.add_get("/u/" + _TOKEN, t.unsubscribe_page)
    app.router.add_post("/u/" + _TOKEN, t.unsubscribe)


def configure(config: Any) -> None:
    """What the config sets for links signed by this process and the workers it
    forks from now on (``[tracking] link_ttl_days``): at start and on SIGHUP, before
    the workers are started again. The per-request settings (link_events_per_hour)
    are read from ``ctx.config`` at each request."""
    days = config.tracking.link_ttl_days
    tr.set_link_ttl(days * 86400.0 if days is not None else tr.LINK_TTL)
