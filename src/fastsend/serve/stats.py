"""GET /v1/stats over the rollups: dimensions, filters, time range, granularity.

NAME
    fastsend.serve.stats -- rollup_stats (the handler), the answer's msgspec structs.

DESCRIPTION
    ``GET /v1/stats?from=-24h&to=now&granularity=hour&dims=campaign,provider
    &campaign=3,4&provider=google&source_ip=127.0.0.2&limit=50``

    - ``from`` / ``to``: unix seconds, ISO 8601, ``now`` or ``-90m`` / ``-2h``
      / ``-7d`` (default: the last 24 hours); rounded out to whole minutes;
    - ``granularity``: minute, hour, day, total or auto (the default: minutes
      up to 6 hours, hours up to 14 days, then days); at most 2,000 points;
    - ``dims`` (or ``by``): any of campaign, provider, source_ip, comma
      separated (default campaign; ``dims=`` for none); groups are keyed by
      their values joined with ``|``;
    - filters ``campaign``, ``provider``, ``source_ip``: comma-separated values;
    - ``window`` (1m ... 7d): the older form of ``from`` (``from`` wins);
    - ``gauges=1``: sampled queue depth per bucket; ``scope=node`` (admin
      tenants only, ``[dashboard] admin_tenants``): the node-wide queue gauges.

    The answer is scoped to the key's tenant: rollups are keyed by tenant and
    no parameter reaches another's. ``by=domain`` keeps the older answer from
    the event index (rollups have no per-domain dimension: it would be
    unbounded). The answer's shape is the :class:`StatsAnswer` struct, which
    :mod:`fastsend.serve.openapi` turns into the document.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from aiohttp import web

from fastsend.analytics.query import QueryError, make_query, run_query
from fastsend.analytics.store import COUNTERS, DIMS
from fastsend.serve.api import ApiError, api_of, bad, json_response, only_params, tenant_of

NODE = "*"  # the tenant name of node-wide gauges (not a valid tenant name)


# -- the answer, as structs (the OpenAPI document is built from them) --------------

# What each counter counts (the OpenAPI document's descriptions). Opens and clicks are
# split by the machine rules (fastsend.analytics.machine): ``opens`` + ``opens_machine``
# are the log's ``opened`` events, plus the HEAD requests (a link checker's: counted as
# machine, never an event); a message's first of each kind is its ``_unique``.
COUNTER_TEXT = {
    "accepted": "recipients spooled (accepted events)",
    "delivered": "messages the receiving server (or provider) took (delivered events)",
    "deferred": "delivery attempts that failed for now, one per attempt (deferred events)",
    "bounced": "messages that failed for good: a refusal, a later DSN or a provider's"
               " report (bounced events)",
    "bounced_hard": "bounced, classed hard (the address is bad: suppressed)",
    "bounced_soft": "bounced, classed soft (the address may work later)",
    "expired": "messages that ran out of retries ([retry] max_age; expired events)",
    "suppressed": "recipients not sent to: on the suppression list (suppressed events)",
    "complaints": "spam complaints (complained events)",
    "unsubscribes": "unsubscribes (unsubscribed events)",
    "opens": "human-likely pixel loads: opened events no machine rule matched",
    "opens_unique": "messages with a human-likely open (or a human-likely click)",
    "opens_machine": "pixel loads by software (Apple Mail Privacy Protection, scanners,"
                     " HEAD requests: these are not events); with opens, every load",
    "opens_machine_unique": "messages with a machine open",
    "clicks": "human-likely clicks: clicked events no machine rule matched",
    "clicks_unique": "messages with a human-likely click",
    "clicks_machine": "clicks by software (link scanners, every link at once, HEAD"
                      " requests: these are not events); with clicks, every click",
    "clicks_machine_unique": "messages with a machine click",
}  # fmt: skip

Counts = msgspec.defstruct(
    "StatsCounts",
    [(c, Annotated[int, msgspec.Meta(description=COUNTER_TEXT[c])], 0) for c in COUNTERS],
    kw_only=True,
    forbid_unknown_fields=True,
)


class StatsRates(msgspec.Struct, kw_only=True):
    delivery_rate: float | None = None
    bounce_rate: float | None = None
    hard_bounce_rate: float | None = None
    complaint_rate: float | None = None
    unique_open_rate: float | None = None
    machine_open_rate: float | None = None
    click_rate: float | None = None
    click_to_open_rate: float | None = None
    unsubscribe_rate: float | None = None


class StatsTotals(msgspec.Struct):
    counts: Counts  # type: ignore[valid-type]
    rates: StatsRates


class StatsGroup(msgspec.Struct, kw_only=True):
    key: dict[str, str | int]
    counts: Counts  # type: ignore[valid-type]  # counters that are zero are left out
    rates: StatsRates
    series: dict[str, list[int]] | None = None


class StatsAnswer(msgspec.Struct, kw_only=True):
    """What GET /v1/stats answers (rates are fractions 0..1, None over nothing)."""

    tenant: str
    from_: int = msgspec.field(name="from")
    to: int
    granularity: str
    dims: list[str]
    filters: dict[str, list[str | int]]
    totals: StatsTotals
    lines: dict[str, dict[str, float]]
    groups: dict[str, StatsGroup]
    step: int | None = None
    series: dict[str, list[int]] | None = None  # "t" (bucket starts) and one list per counter
    reasons: dict[str, dict[str, int]] | None = None
    reasons_series: dict[str, dict[str, list[int]]] | None = None
    gauges: dict[str, list[float | None]] | None = None
    window: str | None = None
    window_s: int | None = None
    by: str | None = None


class StatsParams(msgspec.Struct, kw_only=True):
    """The query parameters of GET /v1/stats (documented from this struct)."""

    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    granularity: str = "auto"
    dims: str | None = None
    by: str | None = None
    campaign: str | None = None
    provider: str | None = None
    source_ip: str | None = None
    window: str | None = None
    limit: int = 50
    gauges: str | None = None
    scope: str | None = None


PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "from": {"type": "string", "description": "unix seconds, ISO 8601, now, or -90m/-2h/-7d"},
    "to": {"type": "string", "description": "as from (default now)"},
    "granularity": {"enum": ["auto", "minute", "hour", "day", "total"]},
    "dims": {"type": "string", "description": f"comma-separated: {', '.join(DIMS)}"},
    "by": {"enum": [*DIMS, "domain"], "description": "one dimension (domain: the event index)"},
    "campaign": {"type": "string", "description": "filter: comma-separated campaign ids"},
    "provider": {"type": "string", "description": "filter: comma-separated providers"},
    "source_ip": {"type": "string", "description": "filter: comma-separated source IPs"},
    "window": {"enum": ["1m", "5m", "15m", "1h", "6h", "24h", "7d"]},
    "limit": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
    "gauges": {"enum": ["0", "1"]},
    "scope": {"enum": ["tenant", "node"], "description": "node: admin tenants only"},
}


def _admins(ctx: Any) -> frozenset[str]:
    return frozenset(ctx.config.dashboard.admin_tenants)


async def rollup_stats(request: web.Request, windows: dict[str, int]) -> web.Response:
    api = api_of(request)
    rollups = getattr(api.ctx, "rollups", None)
    if rollups is None:
        raise ApiError(404, "analytics are disabled ([analytics] enabled = false)")
    q = request.query
    only_params(request, (f.encode_name for f in msgspec.structs.fields(StatsParams)))
    params: dict[str, str] = {}
    for name in ("from", "to", "granularity", "dims", "by", "limit", *DIMS):
        if name in q:
            v = q[name]
            if "\x00" in v or len(v) > 4096:
                raise bad(f"{name}: not a valid value", name)
            params[name] = v
    now = time.time()
    w = q.get("window")
    if w is not None:
        if w not in windows:
            raise bad(f"window must be one of {', '.join(windows)}", "window")
        params.setdefault("from", str(int(now) - windows[w]))
    if "by" in params and params["by"] not in DIMS:
        raise bad(f"by must be one of {', '.join(DIMS)} or domain", "by")
    if "by" in params and "dims" in params:
        raise bad("by and dims: give one of them", "by")
    tenant = tenant_of(request)
    scope = q.get("scope", "tenant")
    if scope not in ("tenant", "node"):
        raise bad("scope must be tenant or node", "scope")
    gauges = q.get("gauges", "0")
    if gauges not in ("0", "1"):
        raise bad("gauges must be 0 or 1", "gauges")
    if scope == "node" and tenant not in _admins(api.ctx):
        raise ApiError(403, "node-wide figures: only for [dashboard] admin_tenants")
    try:
        query = make_query(NODE if scope == "node" else tenant, params, now)
    except QueryError as e:
        raise bad(str(e), e.field) from None
    query.gauges = gauges == "1"
    rollups.flush()  # the last second's counts too
    out = run_query(rollups.store, query)
    if w is not None:
        out["window"], out["window_s"] = w, windows[w]
    if "by" in params:
        out["by"] = params["by"]
    return json_response(out, headers={"Cache-Control": "no-store"})
