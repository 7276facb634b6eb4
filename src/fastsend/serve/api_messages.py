"""POST /v1/messages and GET /v1/messages/{id}.

A request is one message object or ``{"messages": [...]}``; each message has
``from``, ``to`` (one address or a list), ``subject``, ``text`` and/or
``html`` (or ``raw``: a whole MIME message), optional ``reply_to``,
``headers``, ``tags``, ``metadata``, or instead of content a ``template``
(an inline campaign-format object, or the id of one of the tenant's
campaigns) with ``variables``. Every recipient becomes one spooled message
with its own id.

Everything is validated before anything is spooled: one bad message rejects
the request with a 400 naming the field (``messages[3].to[1]``), so a
client can fix and resend the whole batch without duplicates. The 202 answer
comes after the spool commit (durable).

Self-contained messages go to the tenant's transactional campaign (their
content is the message's vars, taken literally by the worker); template
messages go to a campaign holding the template (one per distinct template
per tenant), their variables being the vars.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec
import orjson
from aiohttp import web

from fastsend.accept import AcceptError, check_header_section
from fastsend.address import AddressError, normalize
from fastsend.message import Campaign, CampaignError
from fastsend.message.campaign import PathKeyError
from fastsend.message.headers import HeaderError, mailbox_header, parse_mailbox
from fastsend.message.rawmime import RawMimeError
from fastsend.message.rawmime import check as check_raw
from fastsend.recipients import MAX_VARIABLES, text_vars
from fastsend.serve.api import (
    MAX_ID,
    STORAGE_RETRY_AFTER,
    YIELD_EVERY,
    ApiError,
    api_of,
    bad,
    check_envelope,
    check_from_domain,
    check_link_host,
    check_resent_headers,
    decode_body,
    header_break,
    int_param,
    json_response,
    max_message_size,
    off_loop,
    read_body,
    require_tenant,
    server_dkim,
    spool_call,
    tenant_of,
    tenant_template,
    unavailable,
)
from fastsend.serve.builds import Built, build_inline, build_stored, inline_key
from fastsend.serve.context import ENDED_CAMPAIGN, campaign_pages
from fastsend.serve.idempotency import accept_rows, idempotent, run_of
from fastsend.serve.senders import header_nul, sender_domains
from fastsend.spool import ABANDONED, STAGING
from fastsend.tenants import domain_of

log = logging.getLogger("fastsend.serve")

MAX_TAGS = 20
MAX_TAG_LEN = 128
MAX_METADATA_BYTES = 4096
TEMPLATE_OPTION = "template_sha256"


class MessageIn(msgspec.Struct, forbid_unknown_fields=True):
    to: list[str] | str
    from_: str | None = msgspec.field(name="from", default=None)
    reply_to: str | None = None
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    raw: str | None = None
    headers: dict[str, str] = {}
    tags: list[str] = []
    metadata: dict[str, Any] = {}
    template: int | dict[str, Any] | None = None
    variables: dict[str, Any] = {}


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    messages: list[MessageIn]


class _BatchSize(msgspec.Struct):
    messages: list[msgspec.Raw]  # counted without being decoded


SIZE_FIRST = 1 << 16  # bodies larger than this have their messages counted first


def _literal(v: Any) -> Any:
    """As the worker does: user text is sent as written, never templated."""
    if isinstance(v, str):
        return v.replace("{{", '{{ "{{" }}')
    if isinstance(v, dict):
        return {k: _literal(x) for k, x in v.items()}
    return v


def _no_crlf(value: str, field: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise bad(f"{field}: CR, LF and NUL are not allowed in a header value", field)


def _campaign_error(e: CampaignError, where: str) -> ApiError:
    text = str(e)
    head = text.split(":", 1)[0].strip()
    field = f"{where}.{head}" if head.isidentifier() else where
    return bad(f"{field}: {text}", field)


class Prepared:
    __slots__ = ("campaign", "ids", "meta", "rows", "to")

    def __init__(self) -> None:
        self.campaign = 0
        self.rows: list[tuple[str, str, bytes]] = []
        self.to: list[str] = []
        self.ids: list[int] = []
        self.meta: tuple[list[str], dict[str, Any]] | None = None


# Request keys: the campaigns this request found still taking mail.
LIVE: web.RequestKey[set[int]] = web.RequestKey("fastsend_live_campaigns", set)
LIVE_TRANSACTIONAL: web.RequestKey[bool] = web.RequestKey("fastsend_live_transactional", bool)
TEMPLATES_KEPT = 100_000  # (tenant, template) -> campaign entries kept (least recent go)
INDEX_PAGE = 1000  # campaigns read at a time when a tenant's templates are first looked up


class MessagesHandler:
    def __init__(self) -> None:
        # (tenant, sha256 of the template) -> campaign id, the most recently used last
        self.template_campaigns: OrderedDict[tuple[str, str], int] = OrderedDict()
        # Tenants whose template campaigns in the spool were read into it (once per
        # tenant and process; a template first used after that gets its campaign
        # made, not searched for: a search per new template read every campaign of
        # the tenant, and a batch of 1,000 new ones held the loop for seconds).
        self.indexed: set[str] = set()
        self.index_locks: dict[str, asyncio.Lock] = {}
        self.made = 0  # template campaigns made by this process

    async def index_templates(self, spool: Any, tenant: str, quota: Any = None) -> None:
        """Read the tenant's template campaigns (once per process), a page at a time
        with the loop free between pages; ``quota`` (api.CampaignQuota) takes the
        creation times of its campaigns from the same pass."""
        if tenant in self.indexed:
            return
        lock = self.index_locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            if tenant in self.indexed:
                return
            created: list[float] = []
            async for page in campaign_pages(spool, tenant, INDEX_PAGE):
                created += [info.created for info in page]
                for info in page:
                    digest = info.options.get(TEMPLATE_OPTION)
                    if isinstance(digest, str):  # the first campaign made for it
                        self.template_campaigns.setdefault((tenant, digest), info.id)
            while len(self.template_campaigns) > TEMPLATES_KEPT:
                self.template_campaigns.popitem(last=False)
            if quota is not None:
                quota.adopt(tenant, created, time.time())
            self.indexed.add(tenant)
        self.index_locks.pop(tenant, None)

    async def template_campaign(
        self, request: web.Request, tpl: int | dict[str, Any], where: str
    ) -> tuple[int, Built]:
        """The campaign of a message's template (an id, or an inline one: its campaign
        found or made), built off the loop (serve.builds)."""
        api = api_of(request)
        tenant = tenant_of(request)
        limit = max_message_size(request)
        if isinstance(tpl, int):
            missing = bad(f"{where}: no template campaign {tpl}", where)
            info = (await spool_call(api.ctx, api.ctx.spool.get_campaign, tpl)
                    if 1 <= tpl <= MAX_ID else None)  # fmt: skip
            if info is None or info.spec.get("kind") == "transactional" or (
                info.status in (STAGING, ABANDONED)
            ):
                raise missing
            require_tenant(request, info.tenant, missing)
            if info.status == "cancelled":  # (its rows would never be sent)
                raise ApiError(409, f"{where}: campaign {tpl} is cancelled", where)
            try:
                stored = await api.builds.get(
                    ("stored", tpl, limit), tenant, build_stored, info.spec, limit
                )
            except CampaignError as e:  # (a spec this version no longer takes)
                raise ApiError(409, f"{where}: campaign {tpl} cannot be used: {e}", where) from None
            return tpl, stored
        template = tenant_template(request, tpl)
        try:  # (build_inline: no server file is named, checked before anything is read)
            built = await api.builds.get(
                inline_key(tenant, template, limit), tenant, build_inline, template, limit
            )
        except PathKeyError as e:
            raise bad(f"{where}.{e}", f"{where}.{e.key}") from None
        except CampaignError as e:
            raise _campaign_error(e, where) from None
        except AcceptError as e:
            field = f"{where}.{e.key}" if e.key else where
            raise bad(f"{field}: {e}" if e.key else f"{where}: {e}", field) from None
        camp, spec = built.camp, built.own_spec()
        check_from_domain(request, camp.from_domain, f"{where}.from")
        check_envelope(request, spec, where)
        check_link_host(request, spec, where)
        server_dkim(request, spec, camp.from_domain)
        digest = hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()
        known = self.template_campaigns
        cid = known.get((tenant, digest))
        live = request.setdefault(LIVE, set())  # checked in this request
        if cid is not None and cid not in live:
            info = await spool_call(api.ctx, api.ctx.spool.get_campaign, cid)
            if info is None or info.status in ENDED_CAMPAIGN:  # cancelled since: a new one
                del known[(tenant, digest)]
                cid = None
        if cid is None:
            # (post() read the tenant's campaigns first: index_templates, quota.seed)
            api.ctx.quota.take(tenant, api.settings.max_campaigns_per_day, time.time(), where)
            cid = api.ctx.acceptor.create_campaign(
                spec, name=f"api-template:{digest[:12]}", tenant=tenant,
                options={TEMPLATE_OPTION: digest},
            )  # fmt: skip
            known[(tenant, digest)] = cid
            self.made += 1
            if len(known) > TEMPLATES_KEPT:
                known.popitem(last=False)
        else:
            known.move_to_end((tenant, digest))
        live.add(cid)
        return cid, built

    async def prepare(
        self, request: web.Request, m: MessageIn, where: str, budget: int
    ) -> Prepared:
        p = Prepared()
        to = [m.to] if isinstance(m.to, str) else m.to
        if not to:
            raise bad(f"{where}.to: at least one recipient is needed", f"{where}.to")
        if len(to) > budget:
            raise ApiError(
                413, f"{where}.to: more recipients than [api] max_batch allows", f"{where}.to"
            )
        seen: set[str] = set()
        for j, a in enumerate(to):
            try:
                addr, domain = normalize(a)
            except AddressError as e:
                raise bad(f"{where}.to[{j}]: {e}", f"{where}.to[{j}]") from None
            if addr in seen:  # one message, one copy a mailbox (as Postfix's duplicate filter)
                continue
            seen.add(addr)
            p.to.append(addr)
            p.rows.append((addr, domain, b""))
        if len(m.tags) > MAX_TAGS or any(len(t) > MAX_TAG_LEN for t in m.tags):
            raise bad(
                f"{where}.tags: at most {MAX_TAGS} tags of {MAX_TAG_LEN} characters",
                f"{where}.tags",
            )
        if m.tags or m.metadata:
            if len(orjson.dumps(m.metadata)) > MAX_METADATA_BYTES:
                raise bad(
                    f"{where}.metadata: larger than {MAX_METADATA_BYTES} bytes", f"{where}.metadata"
                )
            p.meta = (m.tags, m.metadata)
        if m.template is not None:
            for k in ("subject", "text", "html", "raw", "from_", "reply_to"):
                if getattr(m, k) is not None:
                    name = k.rstrip("_")
                    raise bad(f"{where}.{name}: not allowed with template", f"{where}.{name}")
            if m.headers:
                raise bad(f"{where}.headers: not allowed with template", f"{where}.headers")
            if len(m.variables) > MAX_VARIABLES:  # (as a list's recipient)
                raise bad(f"{where}.variables: {len(m.variables):,} variables; a message has"
                          f" at most {MAX_VARIABLES:,}", f"{where}.variables")  # fmt: skip
            cid, built = await self.template_campaign(request, m.template, f"{where}.template")
            camp = built.camp
            m.variables = text_vars(m.variables)  # 30 -> "30"; a null is no value
            try:
                camp.check_columns(set(m.variables) | {"email"})
            except CampaignError as e:
                raise bad(f"{where}.variables: {e}", f"{where}.variables") from None
            broken = header_break(m.variables, built.names)
            if broken is not None:
                field = f"{where}.variables.{broken}"
                raise bad(f"{field}: CR, LF and NUL are not allowed in a header value", field)
            p.campaign = cid
            vars_ = orjson.dumps(m.variables)
            why = None if built.sizer is None else built.sizer(vars_)
            if why is not None:
                raise ApiError(422, f"{where}.variables: {why}", f"{where}.variables")
        else:  # (checked once a request: cancelled since, it is made anew)
            fresh = LIVE_TRANSACTIONAL not in request
            request[LIVE_TRANSACTIONAL] = True
            ctx = api_of(request).ctx
            p.campaign = await spool_call(ctx, ctx.tenant_campaign, tenant_of(request), fresh)
            vars_ = await self.content(request, m, where)
        p.rows = [(a, d, vars_) for a, d, _ in p.rows]
        return p

    async def content(self, request: web.Request, m: MessageIn, where: str) -> bytes:
        if m.from_ is None:
            raise bad(f"{where}.from: required", f"{where}.from")
        _no_crlf(m.from_, f"{where}.from")
        try:
            _, from_addr = parse_mailbox(m.from_)
        except HeaderError as e:
            raise bad(f"{where}.from: {e}", f"{where}.from") from None
        check_from_domain(request, domain_of(from_addr), f"{where}.from")
        if m.raw is not None:
            for k in ("subject", "text", "html", "reply_to"):
                if getattr(m, k) is not None:
                    raise bad(f"{where}.{k}: not allowed with raw", f"{where}.{k}")
            if m.headers:
                raise bad(f"{where}.headers: not allowed with raw", f"{where}.headers")
            raw = m.raw.encode("utf-8", "surrogateescape")
            limit = max_message_size(request)
            if limit and len(raw) > limit:
                raise ApiError(
                    422, f"{where}.raw: the message is {len(raw):,} octets, over the"
                    f" {limit:,}-octet limit ([delivery] max_message_size)", f"{where}.raw",
                )  # fmt: skip
            if b"\n\n" not in raw and b"\r\n\r\n" not in raw:
                raise bad(f"{where}.raw: no blank line between header and body", f"{where}.raw")
            try:  # within the header caps, relayable unbroken (long lines), names shown
                await off_loop(len(raw), check_raw, raw)  # (a large one: 8-bit re-encoded)
            except RawMimeError as e:
                raise bad(f"{where}.raw: {e}", f"{where}.raw") from None
            # Read as it is sent (a bare CR is a line end), with Sender and Resent-*.
            if header_nul(raw):
                raise bad(f"{where}.raw: NUL in the header section", f"{where}.raw")
            has_from, senders = sender_domains(raw)
            if not has_from:
                raise bad(f"{where}.raw: no From header field (RFC 5322 3.6)", f"{where}.raw")
            for _, d in senders:  # the From (and Sender) the recipient sees; DKIM, DMARC
                check_from_domain(request, d, f"{where}.raw")
            return orjson.dumps({"raw": base64.b64encode(raw).decode(), "mail_from": from_addr})
        if m.subject is None:
            raise bad(f"{where}.subject: required", f"{where}.subject")
        if m.text is None and m.html is None:
            raise bad(f"{where}.text: text or html (or raw) is required", f"{where}.text")
        _no_crlf(m.subject, f"{where}.subject")
        spec: dict[str, Any] = {"from": m.from_, "subject": m.subject}
        if m.reply_to is not None:
            _no_crlf(m.reply_to, f"{where}.reply_to")
            spec["reply_to"] = m.reply_to
        if m.text is not None:
            spec["text"] = m.text
        if m.html is not None:
            spec["html"] = m.html
        if m.headers:
            for name, value in m.headers.items():
                _no_crlf(value, f"{where}.headers.{name}")
            check_resent_headers(request, m.headers, where)
            spec["headers"] = m.headers
        try:  # (a large text or HTML, its text part said from it: seconds, in a thread)
            weight = len(spec.get("text", "")) + len(spec.get("html", ""))
            await off_loop(weight, Campaign.from_dict, _literal(spec))
        except CampaignError as e:
            if "header" in str(e):
                raise bad(f"{where}.headers: {e}", f"{where}.headers") from None
            raise _campaign_error(e, where) from None
        try:
            check_header_section(spec)
        except AcceptError as e:
            raise bad(f"{where}.{e}", f"{where}.headers") from None
        for key, name in (("from", "From"), ("reply_to", "Reply-To")):
            if key in spec:  # written as the worker will (a word over 998 octets: 5.6.0 there)
                try:
                    mailbox_header(name, *parse_mailbox(spec[key]))
                except HeaderError as e:
                    raise bad(f"{where}.{key}: {e}", f"{where}.{key}") from None
        limit = max_message_size(request)
        weight = sum(len(spec.get(k, "").encode("utf-8", "surrogatepass")) for k in ("text", "html"))
        if limit and weight > limit:  # (what its parts hold at the least; the worker measures)
            field = f"{where}.{'html' if 'html' in spec else 'text'}"
            raise ApiError(
                422, f"{field}: the message would be at least {weight:,} octets, over the"
                f" {limit:,}-octet limit ([delivery] max_message_size)", field,
            )  # fmt: skip
        return orjson.dumps(spec)

    async def post(self, request: web.Request) -> web.Response:
        api = api_of(request)
        body = await read_body(request)
        if b'"messages"' in body:
            if len(body) > SIZE_FIRST:  # a million tiny messages: 413 before decoding them
                limit = api.settings.max_batch
                try:
                    n = len(msgspec.json.decode(body, type=_BatchSize).messages)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    n = 0  # (the decode below names the problem)
                if n > limit:
                    raise ApiError(413, f"messages: {n} messages, [api] max_batch is {limit}")
            try:
                batch = await off_loop(len(body), decode_body, body, BatchIn)
                messages, prefix = batch.messages, "messages"
            except ApiError as e:
                if e.field is not None or "messages" not in e.message:
                    raise
                messages, prefix = [await off_loop(len(body), decode_body, body, MessageIn)], ""
        else:
            messages, prefix = [await off_loop(len(body), decode_body, body, MessageIn)], ""
        if not messages:
            raise bad("messages: at least one message is needed", "messages")
        limit = api.settings.max_batch
        if len(messages) > limit:
            raise ApiError(413, f"messages: {len(messages)} messages, [api] max_batch is {limit}")
        inline = any(isinstance(m.template, dict) for m in messages)
        if inline:
            await self.index_templates(api.ctx.spool, tenant_of(request), api.ctx.quota)
            await api.ctx.quota.seed(api.ctx.spool, tenant_of(request), time.time())  # (no read)
        budget = limit
        made = self.made
        prepared: list[Prepared] = []
        spooled, cap = 0, api.settings.spooled_bytes_cap
        ran = time.monotonic()
        for i, m in enumerate(messages):
            where = f"{prefix}[{i}]" if prefix else "$"
            p = await self.prepare(request, m, where if prefix else "message", budget)
            budget -= len(p.rows)
            spooled += sum(len(r[2]) for r in p.rows)
            if spooled > cap:  # bytes x recipients: one body to many costs many bodies
                w = where if prefix else "message"
                raise ApiError(
                    413, f"{w}: message size x recipients exceeds [api] max_spooled_bytes ({cap})",
                    f"{w}.to",
                )  # fmt: skip
            prepared.append(p)
            if (inline and self.made != made) or time.monotonic() - ran > YIELD_EVERY:
                # A new template's campaign was written, or a big batch's checks ran a
                # while: other requests (and the supervisor) get the loop in between.
                made = self.made
                await asyncio.sleep(0)
                ran = time.monotonic()
        # Spool: one transaction per campaign (usually one for the whole request).
        by_campaign: dict[int, list[Prepared]] = {}
        for p in prepared:
            by_campaign.setdefault(p.campaign, []).append(p)
        # The tenant's daily quota and submission rate (429, nothing spooled); what an
        # earlier attempt under this Idempotency-Key spooled was counted then.
        total = sum(len(p.rows) for p in prepared)
        run = run_of(request)
        if run is not None:
            total -= sum(run.spooled(cid) for cid in by_campaign)
        taken = await spool_call(api.ctx, api.ctx.caps.take, tenant_of(request), total)
        metrics = api.metrics
        done = 0  # rows of this request spooled (or found spooled by an earlier attempt)
        for n, (cid, group) in enumerate(by_campaign.items()):
            rows = [r for p in group for r in p.rows]
            try:
                ids = await accept_rows(request, cid, rows)  # (under an Idempotency-Key)
            except Exception as e:
                api.ctx.caps.refund(taken, total - done)  # (what was spooled stays counted)
                if n == 0 or run is not None:
                    raise  # nothing of it spooled; or a retry under the key continues it
                return _partly_accepted(request, e, prepared, prefix)
            done += len(rows)
            k = 0
            for p in group:
                p.ids = ids[k : k + len(p.rows)]
                k += len(p.rows)
            if metrics is not None:
                metrics.accepted(len(rows))
            if len(by_campaign) > 1:  # one transaction each: others' requests between
                await asyncio.sleep(0)
        meta = [(mid, p.meta[0], p.meta[1]) for p in prepared if p.meta for mid in p.ids]
        if meta:
            api.index.add_meta(meta)
        if api.ctx.shared is None:  # (a shared one's: the tick's, in a thread)
            api.index.maybe_flush()
        out = [{"ids": p.ids, "to": p.to} for p in prepared]
        return json_response(
            {"accepted": sum(len(p.ids) for p in prepared), "messages": out}, status=202
        )

    async def get(self, request: web.Request) -> web.Response:
        api = api_of(request)
        mid = int_param(request.match_info["id"], "id")
        missing = ApiError(404, f"no message {mid}")
        row = await spool_call(api.ctx, api.ctx.spool.message, mid)
        if row is None:
            raise missing
        owner = await spool_call(api.ctx, api.ctx.campaign_tenant, row["campaign"])
        require_tenant(request, owner, missing)
        if row["state"] in ("queued", "cancelled", "suppressed"):  # (a staging campaign's)
            info = await spool_call(api.ctx, api.ctx.spool.get_campaign, row["campaign"])
            if info is None or info.status in (STAGING, ABANDONED):
                raise missing  # a campaign still being made, or given up: never shown
        tags, metadata = await spool_call(api.ctx, api.index.meta, mid)
        events = await spool_call(api.ctx, api.index.for_message, mid)
        return json_response(
            {
                "id": mid,
                "campaign": row["campaign"],
                "to": row["rcpt"],
                "state": row["state"],
                "attempts": row["attempts"],
                "created": row["created"],
                "updated": row["updated"],
                "next_attempt": row["next_at"] if row["state"] in ("queued", "deferred") else None,
                "last_reply": {
                    "code": row["last_code"],
                    "enhanced": row["last_enhanced"],
                    "text": row["last_text"],
                },
                "tags": tags,
                "metadata": metadata,
                "events": events,
            }
        )


def _partly_accepted(
    request: web.Request, e: Exception, prepared: list[Prepared], prefix: str
) -> web.Response:
    """A batch of several campaigns' messages (several spool transactions) whose later
    part failed without an Idempotency-Key: the earlier parts are spooled and stay so
    (nothing accepted is taken back). The error says which messages were accepted,
    with their ids, so that the client sends only the others again."""
    spool = api_of(request).ctx.spool
    down = unavailable(e, spool.outage_errors())
    if down is None:
        log.error("fastsend serve: a batch failed after some of it was spooled", exc_info=e)
        down = ApiError(500, "internal error (logged on the server)")
    done = [i for i, p in enumerate(prepared) if p.ids]
    names = ", ".join(f"{prefix}[{i}]" for i in done[:20]) + (" ..." if len(done) > 20 else "")
    body = {
        "error": {"status": down.status, "message": f"{down.message}; {names} had been accepted"
                  " (ids in messages): send only the other messages again"},
        "accepted": sum(len(p.ids) for p in prepared),
        "messages": [{"ids": p.ids, "to": p.to} for p in prepared],
    }  # fmt: skip
    headers = {"Retry-After": str(STORAGE_RETRY_AFTER)} if down.status != 500 else None
    return json_response(body, status=down.status, headers=headers)


def add_routes(app: web.Application) -> None:
    h = MessagesHandler()
    app.router.add_post("/v1/messages", idempotent(h.post))
    app.router.add_get("/v1/messages/{id}", h.get)
