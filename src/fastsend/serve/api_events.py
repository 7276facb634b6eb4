"""GET /v1/events: the bulk export of events, streamed, filtered and paged with a cursor.

NAME
    fastsend.serve.api_events -- add_routes(app): GET /v1/events.

DESCRIPTION
    ``GET /v1/events?from=-7d&to=now&campaign=3,4&type=bounced,complained
    &format=csv&limit=10000&cursor=...``

    - ``from`` / ``to``: unix seconds, ISO 8601, ``now`` or ``-90m`` / ``-2h`` /
      ``-7d`` (default: the last 24 hours; ``to`` is exclusive);
    - ``campaign``: comma-separated ids (another tenant's id selects nothing, like
      an id that does not exist); ``type`` (or ``event``): event names;
    - ``format``: ``ndjson`` (the default: one event-log record per line, as the
      webhooks carry it) or ``csv`` (RFC 4180, a header row; the columns in
      :data:`CSV_COLUMNS`, every other member in ``extra`` as JSON; a text cell a
      spreadsheet would run as a formula is prefixed with ``'``); ``Accept:
      text/csv`` chooses CSV too;
    - ``limit``: events in this page (default 10,000, at most 100,000);
    - ``cursor``: where the previous page ended (its ``Fastsend-Next-Cursor``).

    Events come in time order (ties in the order they were recorded). The page's
    end is found first (one walk of the time index), so its headers carry the
    next page: ``Fastsend-Next-Cursor`` and ``Link: <...>; rel="next"``; no
    such header means this is the last page. The body is written 1,000 events
    at a time as the client reads it: a page of any size holds one chunk in
    memory. Answered from the per-message event index (``events.db``, kept
    ``[analytics] events_days``); scoped to the key's tenant (its campaigns'
    events, and, with no ``campaign`` asked for, its events of no campaign: an open
    or a click of a message gone from the spool and the index, named by its link's
    tenant); ``scope=node`` (admin tenants only) exports every event.

    On a Redis spool (``serve.shared_state.RedisEventIndex``) the export reads
    the cluster's time index (``P:evx``): every node's events, in the order the
    nodes recorded them (a node's events of one flush are within a fraction of
    a second of each other, so nearly in time order); an event recorded more than
    ``EVX_SLACK`` (300 s) after its own time is left out of ranges ending before.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import time
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from fastsend.analytics.query import QueryError, parse_time
from fastsend.config.serve import EVENT_NAMES
from fastsend.serve.api import ApiError, admin_tenants, api_of, bad, only_params, tenant_of
from fastsend.serve.eventindex import ExportQuery

MAX_LIMIT = 100_000
PARAMS = ("from", "to", "campaign", "type", "event", "limit", "format", "cursor", "scope")
DEFAULT_LIMIT = 10_000
CHUNK = 1000
CSV_COLUMNS = ("time", "event", "id", "campaign", "rcpt", "source_ip", "mx", "code",
               "enhanced", "reason", "text")  # fmt: skip
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def encode_cursor(pos: tuple[float, int]) -> str:
    return base64.urlsafe_b64encode(f"{pos[0]!r}:{pos[1]}".encode()).decode().rstrip("=")


def decode_cursor(value: str) -> tuple[float, int]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
        t, _, r = raw.partition(":")
        pos = (float(t), int(r))
    except (ValueError, UnicodeDecodeError):
        raise bad("cursor: not a cursor this server gave", "cursor") from None
    if not math.isfinite(pos[0]) or not 0 <= pos[1] < 1 << 63:  # NaN, inf, no row id
        raise bad("cursor: not a cursor this server gave", "cursor")
    return pos


def _cell(v: Any) -> Any:
    if isinstance(v, str):
        return "'" + v if v.startswith(_FORMULA) else v
    if v is None:
        return ""
    if isinstance(v, bool | int | float):
        return v
    return orjson.dumps(v).decode()


def csv_rows(bodies: list[bytes]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    for b in bodies:
        e = orjson.loads(b)
        extra = {k: v for k, v in e.items() if k not in CSV_COLUMNS}
        row = [_cell(e.get(c)) for c in CSV_COLUMNS]
        row.append(_cell(orjson.dumps(extra).decode()) if extra else "")
        w.writerow(row)
    return buf.getvalue().encode()


def _list(q: Any, name: str) -> list[str] | None:
    v = q.get(name)
    if v is None:
        return None
    if "\x00" in v or len(v) > 4096:
        raise bad(f"{name}: not a valid value", name)
    return [x.strip() for x in v.split(",") if x.strip()]


def parse(
    request: web.Request, mine: list[int] | None, now: float, tenant: str | None = None
) -> tuple[ExportQuery, str]:
    """The query and the format from the request; a bad parameter is a 400 naming it.
    ``tenant``: the key's (a tenant-scoped export), whose events of no campaign are
    its own too when no ``campaign`` is asked for."""
    q = request.query
    only_params(request, PARAMS)
    try:
        t1 = float(parse_time(q["to"], "to", now)) if "to" in q else now + 1
        t0 = float(parse_time(q["from"], "from", now)) if "from" in q else t1 - 86400
    except QueryError as e:
        raise bad(str(e), e.field) from None
    if t1 <= t0:
        raise bad("to: must be after from", "to")
    campaigns = mine
    ids = _list(q, "campaign")
    if ids is not None:
        try:
            want = {int(x) for x in ids}
        except ValueError:
            raise bad("campaign: comma-separated campaign ids", "campaign") from None
        campaigns = sorted(want if mine is None else want & set(mine))
        tenant = None  # (some campaigns asked for: those only)
    kinds = _list(q, "type")
    field = "type"
    if kinds is None:
        kinds, field = _list(q, "event"), "event"
    unknown = [k for k in kinds or () if k not in EVENT_NAMES]
    if unknown:  # (a typo such as "bounce" matched nothing: an empty export, said nowhere)
        raise bad(f"{field}: unknown event {', '.join(map(repr, unknown))[:200]} (the events"
                  f" are: {', '.join(sorted(EVENT_NAMES))})", field)  # fmt: skip
    raw_limit = q.get("limit", str(DEFAULT_LIMIT))
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise bad(f"limit: a whole number from 1 to {MAX_LIMIT}", "limit")
    fmt = q.get("format")
    if fmt is None:
        fmt = "csv" if "text/csv" in request.headers.get("Accept", "") else "ndjson"
    if fmt not in ("ndjson", "csv"):
        raise bad("format must be ndjson or csv", "format")
    after = decode_cursor(q["cursor"]) if "cursor" in q else None
    if mine is None:
        tenant = None  # (every campaign: those of none too)
    return ExportQuery(t0, t1, campaigns, kinds, after, int(raw_limit), tenant), fmt


async def export_events(request: web.Request) -> web.StreamResponse:
    api = api_of(request)
    tenant = tenant_of(request)
    scope = request.query.get("scope", "tenant")
    if scope not in ("tenant", "node"):
        raise bad("scope must be tenant or node", "scope")
    if scope == "node" and tenant not in admin_tenants(api.ctx.config):
        raise ApiError(403, "every tenant's events: only for [dashboard] admin_tenants")
    index = api.index
    if not hasattr(index, "export_end"):
        raise ApiError(501, "GET /v1/events needs an event index")
    mine = None if scope == "node" else [c.id for c in api.ctx.spool.campaigns(tenant)]
    query, fmt = parse(request, mine, time.time(), None if scope == "node" else tenant)
    end, more = index.export_end(query)
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if fmt == "csv":
        headers["Content-Type"] = "text/csv; charset=utf-8"
        headers["Content-Disposition"] = 'attachment; filename="events.csv"'
    else:
        headers["Content-Type"] = "application/x-ndjson"
    if more and end is not None:
        nxt = encode_cursor(end)
        params = {k: v for k, v in request.query.items() if k != "cursor"}
        params["cursor"] = nxt
        headers["Fastsend-Next-Cursor"] = nxt
        headers["Link"] = f'<{request.path}?{urlencode(params)}>; rel="next"'
    resp = web.StreamResponse(status=200, headers=headers)
    await resp.prepare(request)
    if fmt == "csv":
        await resp.write(("\r\n".join([",".join((*CSV_COLUMNS, "extra"))]) + "\r\n").encode())
    after = query.after
    left = query.limit
    while left > 0:  # up to ``end`` (None: a last page, fewer than limit events: all of it)
        bodies, after = index.export_chunk(query, after, end, min(CHUNK, left))
        if not bodies:
            break
        left -= len(bodies)
        if fmt == "csv":
            await resp.write(csv_rows(bodies))
        else:
            await resp.write(b"\n".join(bodies) + b"\n")
        if after == end:
            break
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/events", export_events)
