"""Campaigns, stats and the suppression list in the HTTP API.

- ``POST /v1/campaigns``: ``{"name", "template": {campaign fields}, "recipients":
  [{"email": ..., variables...}], "paused": false}``; the template is validated
  like a campaign file, every recipient row is checked (address, variables the
  template needs); with ``"strict": true`` one bad row rejects the request;
  ``"pool"`` and ``"max_rate"`` are the campaign's own shaping (as ``fastsend
  send --pool --max-rate``: a pool of the config this tenant may use, a rate
  that only caps).
- ``POST /v1/campaigns/{id}/recipients``: more recipients, as JSON
  (``{"recipients": [...]}``), CSV with a header row (``text/csv``) or JSON
  lines (``application/x-ndjson``), parsed by :mod:`fastsend.recipients`;
  ``?strict=1`` as above. Answers after the rows are durable. A CSV or JSON
  lines body is a durable ingest job (:mod:`fastsend.serve.uploads`): a long
  list is answered 202 with its ``job`` and the rows spooled so far
  (``"status": "spooling"``) and spooled on in the background; a serve killed
  meanwhile continues it at its next start.
- ``GET /v1/campaigns`` and ``GET /v1/campaigns/{id}`` (counts per state and
  progress), ``POST /v1/campaigns/{id}/pause|resume|cancel`` (a campaign the
  guardrails paused is resumed by the operator only: an admin key, or the CLI).
- ``GET /v1/stats``: the rollups by dimensions, filters, time range and
  granularity (:mod:`fastsend.serve.stats`); ``by=domain&window=1h`` keeps
  the older answer (events per domain and their rates, from the event index).
- ``GET/POST /v1/suppressions``, ``DELETE /v1/suppressions/{address}``: the
  tenant's suppression list; ``?scope=global`` (an admin key): the operator's
  global list, which suppresses for every tenant.

All of it is scoped to the key's tenant (another tenant's campaign is a 404, as a
missing one).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from typing import Annotated, Any

import msgspec
import orjson
from aiohttp import web

from fastsend import recipients
from fastsend.accept import KEEP_DUPLICATES, AcceptError, name_problem
from fastsend.address import AddressError, normalize
from fastsend.message import Campaign, CampaignError
from fastsend.message.campaign import PathKeyError
from fastsend.serve.api import (
    API_KEY,
    ApiError,
    admin_tenants,
    api_of,
    bad,
    check_envelope,
    check_from_domain,
    check_json_type,
    check_link_host,
    decode_body,
    header_break,
    int_param,
    json_response,
    max_message_size,
    off_loop,
    only_params,
    read_body,
    require_tenant,
    server_dkim,
    spool_call,
    tenant_of,
    tenant_template,
)
from fastsend.serve.builds import Built, build_inline, build_stored, inline_key
from fastsend.serve.idempotency import (
    HELD,
    TOKEN_OPTION,
    Held,
    HeldJournal,
    accept_rows,
    fault,
    idempotent,
    json_digest,
    run_of,
)
from fastsend.serve.uploads import UPLOAD, Saved, UploadTooLarge, scan
from fastsend.shaping.pools import load_pools
from fastsend.spool import ABANDONED, STAGING
from fastsend.spool.base import holder_gone, holder_tag
from fastsend.spool.fair import PRIORITY, WEIGHT, check_rank
from fastsend.suppression import (
    COMPLAINT,
    GLOBAL_TENANT,
    MANUAL,
    UNSUBSCRIBE,
    SuppressionError,
)
from fastsend.suppression import normalize as suppression_key

log = logging.getLogger("fastsend.serve")

CHUNK = 20_000
MAX_REPORTED = 100
WINDOWS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800}


class CampaignIn(msgspec.Struct, forbid_unknown_fields=True):
    template: dict[str, Any]
    name: str = ""
    recipients: list[dict[str, Any]] = []
    paused: bool = False
    strict: bool = False
    pool: Annotated[str | None, msgspec.Meta(description=(
        "the [pools] pool the campaign's mail leaves from (default: the tenant's pool,"
        " else the default pool); a pool given to other tenants is refused"
    ))] = None  # fmt: skip
    max_rate: Annotated[float | None, msgspec.Meta(description=(
        "caps the campaign's dispatch at this many messages a second (never above"
        " the server's own campaign rate)"
    ))] = None  # fmt: skip
    priority: Annotated[int | None, msgspec.Meta(description=(
        "-100..100: the spool's claims take this tenant's campaigns of a higher priority"
        " first (default 0; the tenant's transactional mail, POST /v1/messages, is 1);"
        " other tenants keep their share whatever the priority"
    ))] = None  # fmt: skip
    weight: Annotated[int | None, msgspec.Meta(description=(
        "1..1000: the campaign's share of the claims among the tenant's campaigns of"
        " the same priority (default 1)"
    ))] = None  # fmt: skip
    keep_duplicates: Annotated[bool, msgspec.Meta(description=(
        "true: a recipient whose address the campaign has already (this request or an"
        " earlier one, any list or chunk) is sent again; default: each address once"
        " (the domain's case and surrounding spaces make no other address)"
    ))] = False  # fmt: skip


class RecipientsIn(msgspec.Struct, forbid_unknown_fields=True):
    recipients: list[dict[str, Any]]


class _ListSize(msgspec.Struct):
    recipients: list[msgspec.Raw] = []  # counted without being decoded


def _count_first(body: bytes, cap: int) -> None:
    """413 for a large body with more recipients than ``cap``, before they are decoded
    (a million rows decoded and checked would hold the loop for seconds)."""
    if len(body) <= 1 << 16:
        return
    try:
        n = len(msgspec.json.decode(body, type=_ListSize).recipients)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return  # (the decode names the problem)
    if n > cap:
        raise ApiError(
            413, f"recipients: {n} recipients; [api] max_campaign_recipients is {cap}", "recipients"
        )


class SuppressIn(msgspec.Struct, forbid_unknown_fields=True):
    addresses: list[str]
    reason: str = MANUAL
    expires_in: float | None = None


async def _own_campaign(request: web.Request) -> Any:
    api = api_of(request)
    cid = int_param(request.match_info["id"], "id")
    missing = ApiError(404, f"no campaign {cid}")
    info = await spool_call(api.ctx, api.ctx.spool.get_campaign, cid)
    if info is None or info.status in HIDDEN:
        raise missing
    require_tenant(request, info.tenant, missing)
    return info


def _options(api: Any, body: CampaignIn, tenant: str) -> dict[str, Any]:
    """The campaign's own shaping options (``pool``, ``max_rate``: what the
    supervisor's shaping reads, as ``fastsend send --pool --max-rate`` sets
    them), or a 400 naming the field. A pool the config lacks would silently
    fall back to the default pool, and another tenant's dedicated pool is its
    reputation (``PoolSet.may_use``): both refused alike, naming only the pools
    this tenant may use (never another tenant's)."""
    options: dict[str, Any] = {}
    if body.pool is not None:
        pools = load_pools(api.ctx.config, time.time())
        if body.pool not in pools.pools or not pools.may_use(body.pool, tenant):
            usable = sorted(n for n in pools.pools if pools.may_use(n, tenant))
            raise bad(
                f"pool: no pool {body.pool[:64]!r} this tenant may send from"
                f" (its pools: {', '.join(usable) or 'none'})",
                "pool",
            )
        options["pool"] = body.pool
    if body.max_rate is not None:
        if not (body.max_rate > 0 and math.isfinite(body.max_rate)):
            raise bad("max_rate: a rate is messages a second, > 0", "max_rate")
        options["max_rate"] = body.max_rate
    wrong = check_rank(body.priority, body.weight)
    if wrong:
        raise bad(wrong, wrong.partition(":")[0])
    for opt in (PRIORITY, WEIGHT):
        if getattr(body, opt) is not None:
            options[opt] = getattr(body, opt)
    if body.keep_duplicates:
        options[KEEP_DUPLICATES] = True
    return options


async def _campaign_view(api: Any, info: Any) -> dict[str, Any]:
    counts = await spool_call(api.ctx, api.ctx.spool.counts, info.id)
    total = sum(counts.values())
    done = sum(counts[s] for s in ("delivered", "bounced", "suppressed", "expired", "cancelled"))
    view: dict[str, Any] = {
        "id": info.id,
        "name": info.name,
        "kind": info.spec.get("kind", "template"),
        "status": info.status,
        "reason": info.reason,  # why it has that status ("" unless said: a guardrail)
        "created": info.created,
        "counts": counts,
        "total": total,
        "progress": round(done / total, 4) if total else 0.0,
    }
    for opt in ("pool", "max_rate", PRIORITY, WEIGHT, KEEP_DUPLICATES):  # its own, if set
        if opt in (info.options or {}):
            view[opt] = info.options[opt]
    spooling = await spool_call(api.ctx, api.ctx.uploads.progress, info.id)
    if spooling:  # lists still being accepted ("spooling: X of Y rows")
        view["spooling"] = spooling
    return view


def _recipients_of(api: Any, cid: int) -> int:
    """The campaign's rows, and those of its uploaded lists still being spooled
    (in the background, by any node): what ``max_campaign_recipients`` counts.
    Without the latter, a second list added while the first was spooling passed
    the cap (cap 30,000: two lists of 25,000 spooled 50,000)."""
    uploads = api.ctx.uploads
    pending = sum(
        uploads.left(j) for j in api.ctx.spool.list_ingests(unfinished=True) if j.campaign == cid
    )
    return sum(api.ctx.spool.counts(cid).values()) + pending


async def _spool_rows(
    request: web.Request,
    cid: int,
    rows: list[Any],
    strict: bool,
    camp: Campaign,
    ok_status: int = 202,
    dedup: bool = True,
) -> web.Response:
    """rows: recipient rows or BadRow; spool the good ones (or none when strict).

    ``ok_status``: 201 for a new campaign, which exists even when no row was good.
    ``dedup``: a row whose address the campaign has (an earlier row too) is left
    out, counted in the answer's ``duplicates`` (the campaign's keep_duplicates).
    """
    api = api_of(request)
    badrows = [r for r in rows if isinstance(r, recipients.BadRow)]
    if badrows and strict:
        first = badrows[0]
        raise bad(
            f"recipients: {len(badrows)} bad row(s); first: {first}; nothing was spooled",
            f"recipients[{first.line - 1}]",
        )
    good = [(r[1], r[2], r[3]) for r in rows if not isinstance(r, recipients.BadRow)]
    cap = api.settings.recipient_cap
    have = _recipients_of(api, cid) if ok_status == 202 else 0
    run = run_of(request)
    earlier = run.spooled(cid) if run is not None else 0  # (counted by that attempt)
    if dedup:
        # The rows to spool: a row naming an address the campaign has (rows an
        # earlier attempt of this very request spooled too) or an earlier row's is
        # no recipient more, nor a message against the quota (a list sent again
        # with 1 new row of 5,000 was counted 5,000: 429 near the quota).
        # An address a list of the campaign still spooling names is that list's:
        # counted once (were twice: 413/429 below the caps); spooled here first,
        # ``settle`` counts it and the list's job gives it back.
        count = api.ctx.acceptor.fresh(
            cid, good, look=bool(have or earlier),
            drop=functools.partial(api.ctx.uploads.not_pending, cid),
        )  # fmt: skip
    else:
        have -= earlier
        count = len(good) - earlier
    if have + count > cap:
        raise ApiError(
            413, f"recipients: the campaign would have {have + count} recipients;"
            f" [api] max_campaign_recipients is {cap}", "recipients",
        )  # fmt: skip
    # The tenant's daily quota ([api] tenant_daily_messages). 429, nothing spooled.
    taken = api.ctx.caps.take(tenant_of(request), count, rate=False)
    # what is counted and not spooled is given back (left out as another request
    # spooled the address meanwhile; or the spool failed): ``accepted`` less the
    # rows of an earlier attempt, answered from its record
    skipped = run.skipped if run is not None else 0
    accepted = 0
    # Rows added to a campaign without an Idempotency-Key are one transaction,
    # however many: a failure (a full disk) or a crash half-way would leave part of
    # the list queued and the client, told nothing, would send it all again. Under a
    # key each CHUNK is a part a retry continues from; and so for a new campaign,
    # still staging (never claimed nor shown until every row is in, abandoned if
    # the request fails or dies): its 300,000 rows in one transaction held serve's
    # one loop, the supervisor's dispatch with it, 0.7-2.6 s.
    chunk = CHUNK if run is not None or HELD in request else max(1, len(good))
    try:
        for i in range(0, len(good), chunk):
            accepted += len(await accept_rows(request, cid, good[i : i + chunk], dedup=dedup))
            await asyncio.sleep(0)  # let other requests in between chunks
    finally:
        spooled = accepted - ((run.skipped - skipped) if run is not None else 0)
        api.ctx.caps.settle(taken, spooled)  # (what was spooled stays counted)
    if api.metrics is not None:
        api.metrics.accepted(accepted)
    out: dict[str, Any] = {
        "id": cid,
        "accepted": accepted,
        "rejected": len(badrows),
        "duplicates": len(good) - accepted,
        "errors": [{"row": b.line, "error": b.error} for b in badrows[:MAX_REPORTED]],
    }
    if badrows and not accepted and ok_status == 202:  # a 400 with the error object
        field = f"recipients[{badrows[0].line - 1}]"
        out["error"] = {"status": 400, "message": f"{field}: {badrows[0].error}", "field": field}
        return json_response(out, status=400)
    return json_response(out, status=ok_status)


def _decoded_rows(body: bytes, built: Built) -> list[Any]:
    return _json_rows(decode_body(body, RecipientsIn).recipients, built)


def _json_rows(items: list[dict[str, Any]], built: Built) -> list[Any]:
    """The rows of a JSON recipients list (BadRow for a refused one; a row whose
    message would be over [delivery] max_message_size is one: ``built.sizer``)."""
    rows: list[Any] = []
    needed = built.camp.variables - {"email", "message_id"}
    in_headers, sizer = built.names, built.sizer
    for n, item in enumerate(items, start=1):
        got = recipients.json_row(item)  # as a JSON-lines list's row: "Email", "to", "vars"
        if isinstance(got, str):
            rows.append(recipients.BadRow(n, got))
            continue
        email, obj = got
        # a null is no value (text_vars): one the template needs is missing
        missing = needed - {k for k, v in obj.items() if v is not None}
        if missing:
            rows.append(recipients.BadRow(n, f"missing variables: {', '.join(sorted(missing))}"))
            continue
        broken = header_break(obj, in_headers) if in_headers else None
        if broken is not None:
            rows.append(recipients.BadRow(
                n, f"variable {broken[:64]!r}: CR, LF and NUL are not allowed in a header value",
            ))  # fmt: skip
            continue
        if not isinstance(email, str):
            rows.append(recipients.BadRow(n, "missing or non-text email"))
            continue
        try:
            addr, domain = normalize(email)
        except AddressError as e:
            rows.append(recipients.BadRow(n, str(e)))
            continue
        vars_ = orjson.dumps(recipients.text_vars(obj))
        if sizer is not None and (why := sizer(vars_)) is not None:
            rows.append(recipients.BadRow(n, why))
            continue
        rows.append((n, addr, domain, vars_))
    return rows


def _check_name(name: str) -> None:
    """A campaign's name is the tenant's text the operator reads
    (:func:`fastsend.accept.name_problem`)."""
    if why := name_problem(name):
        raise bad(f"name: {why}", "name")


async def create_campaign(request: web.Request) -> web.Response:
    api = api_of(request)
    raw = await read_body(request)
    _count_first(raw, api.settings.recipient_cap)
    body = await off_loop(len(raw), decode_body, raw, CampaignIn)
    _check_name(body.name)
    limit, tenant = max_message_size(request), tenant_of(request)
    template = tenant_template(request, body.template)
    try:  # off the loop, kept (build_inline: no server file named, before anything is read)
        built = await api.builds.get(
            inline_key(tenant, template, limit), tenant, build_inline, template, limit
        )
    except PathKeyError as e:
        raise bad(f"template.{e}", f"template.{e.key}") from None
    except AcceptError as e:
        field = f"template.{e.key}" if e.key else "template"
        raise bad(f"{field}: {e}" if e.key else f"template: {e}", field) from None
    except CampaignError as e:
        raise bad(f"template: {e}", "template") from None
    camp, spec = built.camp, built.own_spec()
    cap = api.settings.recipient_cap
    if len(body.recipients) > cap:  # before a campaign exists
        raise ApiError(
            413, f"recipients: {len(body.recipients)} recipients; [api] max_campaign_recipients"
            f" is {cap}", "recipients",
        )  # fmt: skip
    rows = await off_loop(len(raw), _json_rows, body.recipients, built)
    if body.strict and any(isinstance(r, recipients.BadRow) for r in rows):
        first = next(r for r in rows if isinstance(r, recipients.BadRow))
        raise bad(f"recipients[{first.line - 1}]: {first.error}", f"recipients[{first.line - 1}]")
    check_from_domain(request, camp.from_domain, "template.from")
    check_envelope(request, spec, "template")
    check_link_host(request, spec, "template")
    server_dkim(request, spec, camp.from_domain)
    shaping = _options(api, body, tenant)
    run = run_of(request)
    spool = api.ctx.spool
    # Retried under an Idempotency-Key: the campaign an earlier attempt created.
    cid = run.campaign(spool, tenant) if run is not None else None
    if cid is None:
        await api.ctx.quota.seed(spool, tenant, time.time())
        api.ctx.quota.take(tenant, api.settings.max_campaigns_per_day, time.time(), "campaign")
        # Created "staging": never claimed nor shown to the tenant until every row
        # is in, so a request that fails (a full disk: 507) or dies half-way leaves
        # nothing half-made (abandoned here, or by sweep_staging after a crash).
        options: dict[str, Any] = {"api": True, STAGING: holder_tag(), **shaping,
                                   **(run.tags() if run is not None else {})}  # fmt: skip
        cid = api.ctx.acceptor.create_campaign(
            spec, name=body.name, tenant=tenant, options=options, status=STAGING
        )
        fault("after-campaign")
    WORKING.add(cid)  # (this node's sweep leaves it staging while the request runs)
    committed = False  # noted, then neither completed nor abandoned: finish_noted's
    try:
        info = spool.get_campaign(cid)
        # Its rows' events wait until it is the tenant's: a create that fails (and
        # is never retried) tells nobody of mail it will never send.
        held = Held() if info is not None and info.status == STAGING else None
        if held is not None:
            request[HELD] = held
        resp = await _spool_rows(
            request, cid, rows, body.strict, camp, ok_status=201,
            dedup=not (info is not None and (info.options or {}).get(KEEP_DUPLICATES)),
        )  # fmt: skip
        info = spool.get_campaign(cid)
        if info is not None and info.status == ABANDONED and held is not None:
            # Given up on while this request ran (another node's sweep: a retry
            # continuing it over an hour after it began): never half sent.
            _abandon(api, cid)  # (rows spooled since: cancelled too)
            raise ApiError(409, f"campaign {cid} was abandoned while this request ran"
                           " (its creation began over an hour ago); send it again")  # fmt: skip
        if info is not None and info.status == STAGING:  # complete: now the tenant's
            status = "paused" if body.paused else "active"
            if held is not None:
                # Noted (fsynced) first, the campaign's commit point: a kill from here
                # on, the next start makes it `status` and tells what the index lacks.
                journal = request.app[HELD_JOURNAL]
                noted = journal.note(held, cid, status)
                try:
                    fault("after-note")
                    # Told while still staging (nothing claimed before its "accepted"),
                    # a part at a time with the loop free between parts (300,000 rows'
                    # events and their index held it 3 s).
                    await held.tell(api.ctx, api.index)
                    spool.set_campaign_status(cid, status)
                except BaseException as e:
                    if run is None and _abandon(api, cid):
                        raise  # (abandoned: the note is void, its replay skips it)
                    # Neither complete nor abandoned (the spool refused both, or a key's
                    # retry is to continue it): the note stands, so it is complete, as
                    # the next start would make it; before, the answer was an error
                    # (507/503) and the next start sent it anyway, twice with the
                    # client's retry. serve's tick finishes it (finish_noted).
                    journal.finish_later(noted)
                    committed = True
                    log.error("campaign %s: its rows are in but it could not be made %s"
                              " (%s); done once the spool takes it", cid, status, e)  # fmt: skip
                    if not isinstance(e, Exception):
                        raise
                    return resp
                journal.told(noted)
            else:
                spool.set_campaign_status(cid, status)
            if not body.paused and api.ctx.supervisor is not None:
                api.ctx.supervisor.wake.set()
    except BaseException:
        if run is None and not committed:  # (under a key the retry continues it)
            _abandon(api, cid)
        raise
    finally:
        if not committed:  # (else WORKING until finish_noted has made it `status`)
            WORKING.discard(cid)
    return resp


WORKING: set[int] = set()  # staging campaigns a request of this process is completing


def _abandon(api: Any, cid: int) -> bool:
    """A staging campaign whose request failed: abandoned (its rows end cancelled,
    never sent, the campaign never shown). On a storage that refuses even this, it
    stays staging, as unseen and unsent, and :func:`sweep_staging` abandons it
    (unless it was noted: see create_campaign). Whether it is abandoned now."""
    try:
        api.ctx.spool.set_campaign_status(cid, ABANDONED)
    except Exception as e:
        log.warning("campaign %s left staging after a failed request (%s): abandoned"
                    " later", cid, e)  # fmt: skip
        return False
    return True


def finish_noted(app: web.Application) -> int:
    """serve's tick: the campaigns whose creation was noted and that their request
    could neither complete nor abandon made their status now (their events told);
    how many. Raises the spool's outage errors (tried again at the next tick)."""
    journal = app.get(HELD_JOURNAL)
    if journal is None or not journal.unfinished:
        return 0
    api = app[API_KEY]
    done = journal.complete(api.ctx, api.index)
    for cid in done:
        WORKING.discard(cid)
        log.warning("campaign %s is complete now (its creation's request had failed to"
                    " make it so)", cid)  # fmt: skip
    if done and api.ctx.supervisor is not None:
        api.ctx.supervisor.wake.set()
    return len(done)


async def adopt_dead_notes(app: web.Application) -> int:
    """serve's tick on a shared spool: the campaigns noted complete by a node that
    died before making them so (``HeldJournal.dead_notes``, read in a thread) made
    their status now, their events told; how many. Raises the spool's outage
    errors (tried again at the next tick)."""
    journal = app.get(HELD_JOURNAL)
    shared = getattr(app[API_KEY].ctx, "shared", None)
    if journal is None or journal.shared is None or shared is None:
        return 0

    def live() -> set[str]:
        return {str(m["node"]) for m in shared.cluster.members()}

    notes = await asyncio.to_thread(journal.dead_notes, live)
    if not notes:
        return 0
    api = app[API_KEY]
    done = journal.adopt(api.ctx, api.index, notes, WORKING)
    for cid in done:
        log.warning("campaign %s is complete now (its creation was noted by a node that"
                    " died before making it so)", cid)  # fmt: skip
    if done and api.ctx.supervisor is not None:
        api.ctx.supervisor.wake.set()
    return len(done)


STAGING_MAX_AGE = 3600.0  # s: a staging campaign older than this is abandoned
CLOCK_SLACK = 600.0  # s: nodes' clocks (a campaign's "created") may differ this much


def sweep_staging(spool: Any, key_ttl: float, now: float | None = None, after: int = 0
                  ) -> tuple[int, int]:  # fmt: skip
    """Abandon staging campaigns whose request will not complete them: made without
    an Idempotency-Key by a process that is gone (this host) or over an hour ago
    (another node's); made under a key, over an hour ago (a retry within the hour
    continues it; a later one, the key still kept, creates the campaign anew: see
    ``IdemRun.campaign``). Reads the campaigns after id ``after``. Returns how many
    it abandoned and the ``after`` of the next sweep: the campaigns up to the first
    that is still staging or young enough to be (every staging campaign is
    abandoned within STAGING_MAX_AGE) are not read again (it read every campaign
    of every tenant each time: a second of the loop per ~70,000)."""
    now = time.time() if now is None else now
    n = 0
    settled = True  # every campaign read so far is final here
    for info in spool.campaigns(None, after=after):
        age = now - info.created
        if info.status == STAGING and info.id in WORKING:
            settled = False  # a request of this process is completing it
        elif info.status == STAGING:
            tag = info.options.get(STAGING)
            if TOKEN_OPTION in info.options:  # (a retry within the hour continues it;
                dead = age > min(key_ttl, STAGING_MAX_AGE)  # a later one makes it anew)
            else:
                dead = age > STAGING_MAX_AGE or (isinstance(tag, dict) and holder_gone(tag))
            if dead and HeldJournal.noted_shared(spool, info.id):
                settled = False  # (complete: its note is finished by a live node)
            elif dead:
                spool.set_campaign_status(info.id, ABANDONED)
                n += 1
            else:
                settled = False
        elif age <= STAGING_MAX_AGE + CLOCK_SLACK:
            settled = False  # (another node's, still being written, may come before it)
        if settled:
            after = info.id
    return n, after


HIDDEN = frozenset({STAGING, ABANDONED})  # not (or never) the tenant's campaigns
GUARDRAIL = "guardrail:"  # the reason of a guardrails' pause (shaping.guardrails)


async def add_recipients(request: web.Request) -> web.Response:
    info = await _own_campaign(request)
    if info.spec.get("kind") == "transactional":
        raise bad("id: a transactional campaign takes messages, not recipient lists", "id")
    if info.status == "cancelled":
        raise ApiError(409, f"campaign {info.id} is cancelled")
    limit = max_message_size(request)
    try:  # (off the loop, kept: a costly template is built once a process)
        built = await api_of(request).builds.get(
            ("stored", info.id, limit), info.tenant, build_stored, info.spec, limit
        )
    except CampaignError as e:  # (a spec this version no longer takes)
        raise ApiError(409, f"campaign {info.id} cannot be used: {e}") from None
    camp = built.camp
    strict = request.query.get("strict", "") in ("1", "true", "yes")
    ctype = request.content_type
    if ctype in LIST_TYPES:
        dedup = not (info.options or {}).get(KEEP_DUPLICATES)
        return await _upload(request, info.id, camp, strict, LIST_TYPES[ctype], dedup)
    check_json_type(request, "a list: text/csv or application/x-ndjson")
    body = await read_body(request)
    _count_first(body, api_of(request).settings.recipient_cap)
    rows = await off_loop(len(body), _decoded_rows, body, built)
    dedup = not (info.options or {}).get(KEEP_DUPLICATES)
    return await _spool_rows(request, info.id, rows, strict, camp, dedup=dedup)


LIST_TYPES = {
    "text/csv": ".csv",
    "application/x-ndjson": ".jsonl",
    "application/jsonl": ".jsonl",
    "application/x-jsonl": ".jsonl",
}


async def save_list(request: web.Request, suffix: str) -> Saved:
    """The request's CSV / JSON-lines body, saved durably (once per request:
    an Idempotency-Key needs its digest before the handler runs)."""
    saved = request.get(UPLOAD)
    if saved is None:
        api = api_of(request)
        limit = api.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"request body of {request.content_length} bytes exceeds {limit}")
        seconds = api.settings.body_timeout
        try:
            async with asyncio.timeout(seconds):  # a list that stops arriving holds nothing
                saved = await api.ctx.uploads.save(
                    request.content.iter_chunked(1 << 16), suffix, limit
                )
        except UploadTooLarge as e:
            raise ApiError(413, str(e)) from None
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {seconds:g} s") from None
        request[UPLOAD] = saved
    return saved


async def _list_digest(request: web.Request) -> str:
    """SHA-256 of the body of POST .../recipients (a CSV / JSON-lines list is
    saved first, hashed as it streams to disk)."""
    suffix = LIST_TYPES.get(request.content_type)
    if suffix is not None:
        return (await save_list(request, suffix)).sha256
    return await json_digest(request)


async def _known(api: Any, cid: int, fps: Any, look: bool) -> int:
    """How many of an upload's fingerprints ``fps`` (an array, or None: none
    collected) campaign ``cid`` has, or a list of it still spooling names
    (``look``: the campaign's rows are looked up too), a part at a time, the loop
    free between parts."""
    if not fps:
        return 0
    n = 0
    for i in range(0, len(fps), CHUNK):
        part = fps[i : i + CHUNK].tolist()
        rest = api.ctx.uploads.not_pending(cid, part)
        n += len(part) - len(rest) + (api.ctx.acceptor.known(cid, rest) if look else 0)
        await asyncio.sleep(0)
    return n


async def _upload(
    request: web.Request, cid: int, camp: Campaign, strict: bool, suffix: str, dedup: bool = True
) -> web.Response:
    """A CSV / JSON-lines list: saved durably, checked, then accepted as an
    ingest job (fastsend.serve.uploads); answered when it is spooled, or, for a
    long list, once it is a durable job, with the rows spooled so far."""
    api = api_of(request)
    uploads = api.ctx.uploads
    saved = await save_list(request, suffix)
    saved.taken = True  # removed below on every error, else the job's
    path = saved.path
    try:
        had = sum(api.ctx.spool.counts(cid).values())  # (its rows looked up if any)
        found = await asyncio.get_running_loop().run_in_executor(
            None, scan, path, camp, MAX_REPORTED, dedup, dedup, max_message_size(request)
        )
        # rows naming an address the campaign has are not spooled: neither a
        # recipient more nor a message against the quota (were: a list sent again
        # with 1 new row was counted whole); nor one a list still spooling names
        # (that list counted it: two lists sharing addresses counted them twice)
        fresh = found.good - await _known(api, cid, found.fps, had > 0)
        if found.bad and strict:
            first = found.bad[0]
            raise bad(
                f"recipients: {found.rejected} bad row(s); first: {first}; nothing was spooled",
                f"recipients[{first.line - 1}]",
            )
        run = run_of(request)
        # Retried under an Idempotency-Key: the job an earlier attempt started.
        job = run.ingest_job(api.ctx.spool) if run is not None else None
        cap = api.settings.recipient_cap
        have = _recipients_of(api, cid)  # (now: other requests spooled)
        if job is None and have + fresh > cap:
            raise ApiError(
                413, f"recipients: the campaign would have {have + fresh} recipients;"
                f" [api] max_campaign_recipients is {cap}", "recipients",
            )  # fmt: skip
    except (recipients.RecipientsError, CampaignError) as e:
        uploads.discard(path)
        why = str(e).replace(f"{path}: ", "").replace(path, "the list")  # no server paths
        raise bad(f"recipients: {why}", "recipients") from None
    except UnicodeDecodeError:
        uploads.discard(path)
        raise bad("recipients: not UTF-8 text", "recipients") from None
    except BaseException:
        uploads.discard(path)
        raise
    out: dict[str, Any] = {
        "id": cid,
        "accepted": 0,
        "rejected": found.rejected,
        "duplicates": 0,
        "errors": [{"row": b.line, "error": b.error} for b in found.bad],
    }
    if job is not None:  # this copy is not needed: the job reads the first one
        uploads.discard(path)
        if run is not None:
            run.skipped = job.accepted
        uploads.take_over(job)  # continued here if its reader died
        out.update(job=job.id, rows=job.total, accepted=job.accepted, duplicates=job.duplicates)
        out["status"] = "spooled" if job.finished else "spooling"
        return json_response(out, status=202)
    if not found.good:  # nothing to spool: no job
        uploads.discard(path)
        if found.bad:  # a 400 with the error object
            field = f"recipients[{found.bad[0].line - 1}]"
            out["error"] = {"status": 400, "message": f"{field}: {found.bad[0].error}",
                            "field": field}  # fmt: skip
            return json_response(out, status=400)
        return json_response(out, status=202)
    if api.metrics is not None:
        uploads.on_spooled = api.metrics.accepted
    # The tenant's daily quota: the whole list counted now (429, nothing spooled).
    try:
        taken = api.ctx.caps.take(tenant_of(request), fresh, rate=False)
    except BaseException:
        uploads.discard(path)
        raise
    # The job carries what was counted: whoever ends it (this process, or another
    # after a failure, another node after a takeover) makes the count what it
    # spooled (TenantCaps.settle_job: what another request spooled first is given
    # back, what it spooled first of another list's is counted)
    tags = {**(run.tags() if run is not None else {}), **api.ctx.caps.job_tags(taken)}
    try:
        job = uploads.start(cid, path, tags=tags)
    except BaseException:
        api.ctx.caps.refund(taken)
        raise
    table = recipients.FpSet()
    if found.fps is not None:
        table.reserve(len(found.fps))
        table.add_fps(found.fps.tolist())
    mark = uploads.accept(job, fps=(table, fresh), raw_fps=found.fps)
    fault("after-job")
    out["job"] = job.id
    out["rows"] = job.total
    out["accepted"] = mark.accepted
    out["duplicates"] = mark.duplicates  # (so far, for a list spooled on in the background)
    out["status"] = "spooling" if job.id in uploads.tasks else "spooled"
    return json_response(out, status=202)


async def get_campaign(request: web.Request) -> web.Response:
    return json_response(await _campaign_view(api_of(request), await _own_campaign(request)))


LIST_LIMIT = 100  # campaigns per page of GET /v1/campaigns (at most MAX_LIST)
MAX_LIST = 1000


async def list_campaigns(request: web.Request) -> web.Response:
    """A page of the tenant's campaigns by id: ``?limit=N&cursor=C`` (C: the
    ``next_cursor`` of the page before). Only the tenant's own rows are read."""
    api = api_of(request)
    limit = int_param(request.query.get("limit", str(LIST_LIMIT)), "limit", MAX_LIST)
    cursor = request.query.get("cursor")
    after = int_param(cursor, "cursor") if cursor else 0
    page = await spool_call(api.ctx, functools.partial(
        api.ctx.spool.campaigns, tenant_of(request), after=after, limit=limit + 1))  # fmt: skip
    more = len(page) > limit
    page = page[:limit]
    out = [
        {"id": c.id, "name": c.name, "status": c.status, "created": c.created,
         "kind": c.spec.get("kind", "template")}
        for c in page
        if c.status not in HIDDEN
    ]  # fmt: skip
    return json_response({"campaigns": out, "next_cursor": page[-1].id if more and page else None})


async def set_status(request: web.Request) -> web.Response:
    api = api_of(request)
    info = await _own_campaign(request)
    action = request.match_info["action"]
    status = {"pause": "paused", "resume": "active", "cancel": "cancelled"}[action]
    if info.status == "cancelled" and status != "cancelled":
        raise ApiError(409, f"campaign {info.id} is cancelled; it cannot be resumed")
    if (
        status == "active"
        and info.status == "paused"
        and str(info.reason or "").startswith(GUARDRAIL)
        and tenant_of(request) not in admin_tenants(api.ctx.config)
    ):
        # The guardrails protect the operator's addresses (their reputation, every
        # tenant's mail): a tenant resuming its own campaign got a fresh sample
        # each time, min_sample more bounces a resume, for ever.
        raise ApiError(
            409, f"campaign {info.id} was paused by the guardrails ({info.reason}); the"
            " operator resumes it (fastsend campaign resume, or an admin key)",
        )  # fmt: skip
    await spool_call(api.ctx, api.ctx.spool.set_campaign_status, info.id, status)
    api.ctx.emit(
        {"event": f"campaign_{status}", "campaign": info.id, "tenant": info.tenant,
         "source": "api"}
    )  # fmt: skip
    if status == "active" and api.ctx.supervisor is not None:
        api.ctx.supervisor.wake.set()
    info.status = status
    return json_response(await _campaign_view(api, info))


async def stats(request: web.Request) -> web.Response:
    if request.query.get("by") != "domain":  # issue 14: the rollups (fastsend.serve.stats)
        from fastsend.serve.stats import rollup_stats

        return await rollup_stats(request, WINDOWS)
    api = api_of(request)
    only_params(request, ("by", "window"))
    w = request.query.get("window", "1h")
    if w not in WINDOWS:
        raise bad(f"window must be one of {', '.join(WINDOWS)}", "window")
    by = request.query.get("by", "campaign")
    if by not in ("campaign", "domain", "source_ip"):
        raise bad("by must be campaign, domain or source_ip", "by")
    tenant = tenant_of(request)
    mine = [c.id for c in api.ctx.spool.campaigns(tenant)]
    seconds = WINDOWS[w]
    groups: dict[str, dict[str, Any]] = {}
    for g, event, n in api.index.stats(time.time() - seconds, mine, by):
        grp = groups.setdefault(g, {"counts": {}, "rates_per_s": {}})
        grp["counts"][event] = n
        grp["rates_per_s"][event] = round(n / seconds, 4)
    return json_response({"window": w, "window_s": seconds, "by": by, "groups": groups})


def suppression_scope(request: web.Request) -> str:
    """Whose list a suppression request is about: the key's tenant's, or with
    ``?scope=global`` the global list (every tenant's mail is checked against
    it), an admin key's only ([dashboard] admin_tenants)."""
    scope = request.query.get("scope", "tenant")
    if scope == "tenant":
        return tenant_of(request)
    if scope != "global":
        raise bad("scope: 'tenant' or 'global'", "scope")
    if tenant_of(request) not in admin_tenants(api_of(request).ctx.config):
        raise ApiError(403, "scope: the global list is the operator's (an admin key)", "scope")
    return GLOBAL_TENANT


async def list_suppressions(request: web.Request) -> web.Response:
    api = api_of(request)
    limit = int_param(request.query.get("limit", "1000"), "limit")
    out = []
    for i, e in enumerate(api.ctx.suppression.list(tenant=suppression_scope(request))):
        if i >= limit:
            break
        d = e.to_dict()
        d.pop("tenant", None)
        out.append(d)
    return json_response({"suppressions": out, "count": len(out)})


async def add_suppressions(request: web.Request) -> web.Response:
    api = api_of(request)
    raw = await read_body(request)
    body = await off_loop(len(raw), decode_body, raw, SuppressIn)  # (16 MiB: ~0.5 s)
    if not body.addresses:
        raise bad("addresses: at least one address", "addresses")
    if len(body.addresses) > api.settings.max_batch:
        raise ApiError(413, f"addresses: more than [api] max_batch ({api.settings.max_batch})")
    for i, a in enumerate(body.addresses):
        try:
            suppression_key(a)
        except SuppressionError as e:
            raise bad(f"addresses[{i}]: {e}", f"addresses[{i}]") from None
    tenant = suppression_scope(request)
    # A complaint or unsubscribe is the recipient's decision: the tenant cannot
    # overwrite it with a weaker reason or an expiry (which would shorten it).
    supp = api.ctx.suppression
    keep = [a for a in body.addresses if _recipients_decision(supp.get(a, tenant=tenant))]
    todo = [a for a in body.addresses if a not in keep]
    try:
        entries = supp.add_many(
            todo, body.reason, tenant=tenant, source="api", expires_in=body.expires_in,
        ) if todo else []  # fmt: skip
    except SuppressionError as e:
        field = "expires_in" if "expires" in str(e) else "reason"
        raise bad(f"{field}: {e}", field) from None
    out: dict[str, Any] = {"added": len(entries)}
    if keep:
        out["kept"] = keep[:MAX_REPORTED]  # complaint/unsubscribe entries stay as they are
    return json_response(out, status=201)


RECIPIENT_REASONS = frozenset({COMPLAINT, UNSUBSCRIBE})


def _recipients_decision(entry: Any) -> bool:
    return entry is not None and entry.reason in RECIPIENT_REASONS


async def remove_suppression(request: web.Request) -> web.Response:
    api = api_of(request)
    addr = request.match_info["address"]
    tenant = suppression_scope(request)
    try:
        entry = api.ctx.suppression.get(addr, tenant=tenant)
        if tenant != GLOBAL_TENANT and _recipients_decision(entry):  # (the operator's: may)
            assert entry is not None
            raise ApiError(
                403,
                f"address: suppressed by the recipient ({entry.reason}); only the operator"
                " can remove it",
                "address",
            )
        gone = api.ctx.suppression.remove(addr, tenant=tenant)
    except SuppressionError as e:
        raise bad(f"address: {e}", "address") from None
    if not gone:
        raise ApiError(404, "address is not on the suppression list")
    return json_response({"removed": addr})


HELD_JOURNAL: web.AppKey[HeldJournal] = web.AppKey("fastsend_held_journal", HeldJournal)


def add_routes(app: web.Application) -> None:
    api = app[API_KEY]
    journal = app[HELD_JOURNAL] = HeldJournal(api.ctx.config.spool_dir, api.ctx.spool.shared())
    journal.replay(api.ctx, api.index)  # a killed serve's campaigns' untold events
    r = app.router
    r.add_post("/v1/campaigns", idempotent(create_campaign))
    r.add_get("/v1/campaigns", list_campaigns)
    r.add_get("/v1/campaigns/{id}", get_campaign)
    r.add_post("/v1/campaigns/{id}/recipients", idempotent(add_recipients, _list_digest))
    r.add_post("/v1/campaigns/{id}/{action:pause|resume|cancel}", set_status)
    r.add_get("/v1/stats", stats)
    r.add_get("/v1/suppressions", list_suppressions)
    r.add_post("/v1/suppressions", add_suppressions)
    r.add_delete("/v1/suppressions/{address}", remove_suppression)
