"""Questions over rollups: time ranges, granularities, groups, series and rates.

NAME
    fastsend.analytics.query -- StatsQuery, run_query, rates, plan.

DESCRIPTION
    A query names a tenant, a half-open range [from, to) (rounded out to whole
    minutes), a granularity (minute, hour, day, or total: one figure for the
    range), dimensions to group by (campaign, provider, source_ip) and filters
    on the same dimensions. :func:`run_query` answers with totals, groups and,
    unless the granularity is total, series (one point per bucket).

    With granularity total, sums are read from the coarsest buckets that tile
    the range (:func:`plan`: days in the middle, hours at the edges, minutes
    at the very edges), so thirty days cost about thirty day rows per key, not
    43,200 minute rows. With a series the range is rounded out to whole
    buckets of its granularity, read once: totals and groups are its sums.

    Rates (:func:`rates`), all fractions from 0 to 1 (None when the
    denominator is zero):

    - delivery_rate  = delivered / (delivered + bounced + expired)
    - bounce_rate    = bounced / (delivered + bounced + expired)
    - hard_bounce_rate = bounced_hard / (delivered + bounced + expired)
    - complaint_rate = complaints / delivered   (Gmail/Yahoo bulk-sender line:
                       0.003, aim under 0.001: :data:`LINES`)
    - unique_open_rate = opens_unique / delivered (human-likely opens; a message
                       whose reader clicked counts as opened: its click proves it)
    - machine_open_rate = opens_machine_unique / delivered
    - click_rate (CTR) = clicks_unique / delivered (human-likely clicks)
    - click_to_open_rate = clicks_unique / opens_unique
    - unsubscribe_rate = unsubscribes / delivered

DELIBERATELY NOT HERE
    No HTTP: the API, the dashboard and ``fastsend top`` call this.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from fastsend.analytics.store import COUNTERS, DIMS, GRANULARITIES, IDX, RollupStore, merge_rows

MAX_POINTS = 2000
MAX_RANGE_S = 800 * 86400
MAX_GROUPS = 200
# Published lines: Gmail and Yahoo bulk-sender requirements (Feb 2024): keep the spam
# (complaint) rate reported in Postmaster Tools under 0.1% and never reach 0.3%.
LINES = {"complaint_rate": {"target": 0.001, "max": 0.003}}


class QueryError(ValueError):
    """A bad parameter: ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class StatsQuery:
    tenant: str
    t0: int
    t1: int
    granularity: str = "total"  # minute | hour | day | total
    dims: list[str] = field(default_factory=list)
    filters: dict[str, list[Any]] = field(default_factory=dict)
    limit: int = 50
    reasons: bool = True
    gauges: bool = False


def _ceil(t: int, g: int) -> int:
    return -(-t // g) * g


def plan(t0: int, t1: int) -> list[tuple[int, int, int]]:
    """(granularity, start, end) pieces tiling [t0, t1) (minute-aligned) with the
    coarsest buckets that fit."""
    out: list[tuple[int, int, int]] = []

    def hours(a: int, b: int) -> None:
        ha, hb = _ceil(a, 3600), b - b % 3600
        if ha < hb:
            if a < ha:
                out.append((60, a, ha))
            out.append((3600, ha, hb))
            if hb < b:
                out.append((60, hb, b))
        elif a < b:
            out.append((60, a, b))

    da, db = _ceil(t0, 86400), t1 - t1 % 86400
    if da < db:
        hours(t0, da)
        out.append((86400, da, db))
        hours(db, t1)
    else:
        hours(t0, t1)
    return out


def rates(c: dict[str, int] | list[int]) -> dict[str, float | None]:
    if isinstance(c, list):
        c = dict(zip(COUNTERS, c, strict=True))

    def frac(a: int, b: int) -> float | None:
        return round(a / b, 6) if b else None

    final = c["delivered"] + c["bounced"] + c["expired"]
    d = c["delivered"]
    return {
        "delivery_rate": frac(d, final),
        "bounce_rate": frac(c["bounced"], final),
        "hard_bounce_rate": frac(c["bounced_hard"], final),
        "complaint_rate": frac(c["complaints"], d),
        "unique_open_rate": frac(c["opens_unique"], d),
        "machine_open_rate": frac(c["opens_machine_unique"], d),
        "click_rate": frac(c["clicks_unique"], d),
        "click_to_open_rate": frac(c["clicks_unique"], c["opens_unique"]),
        "unsubscribe_rate": frac(c["unsubscribes"], d),
    }


def counts_dict(row: list[int], *, sparse: bool = False) -> dict[str, int]:
    if sparse:
        return {k: v for k, v in zip(COUNTERS, row, strict=True) if v}
    return dict(zip(COUNTERS, row, strict=True))


_REL = re.compile(r"^-(\d{1,6})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str, name: str, now: float) -> int:
    """Unix seconds, ISO 8601 (``2026-12-04T10:00:00Z``), ``now`` or ``-90m``/``-2h``/``-7d``."""
    v = value.strip()
    if v == "now":
        return int(now)
    m = _REL.match(v)
    if m:
        return int(now) - int(m.group(1)) * _UNIT[m.group(2)]
    if v.isascii() and v.isdigit() and len(v) <= 12:
        return int(v)
    try:
        d = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(name, f"expected unix seconds, ISO 8601, 'now' or '-2h'; got {value[:40]!r}"
                         ) from None  # fmt: skip
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return int(d.timestamp())


def make_query(tenant: str, params: dict[str, str], now: float) -> StatsQuery:
    """A StatsQuery from HTTP-style parameters; QueryError names a bad one."""
    t1 = parse_time(params["to"], "to", now) if "to" in params else int(now) + 1
    t0 = parse_time(params["from"], "from", now) if "from" in params else t1 - 86400
    t0 -= t0 % 60
    t1 = _ceil(t1, 60)
    if t1 <= t0:
        raise QueryError("to", "must be after from")
    if t1 - t0 > MAX_RANGE_S:
        raise QueryError("from", f"the range is longer than {MAX_RANGE_S // 86400} days")
    gran = params.get("granularity", "auto")
    if gran == "auto":
        span = t1 - t0
        gran = "minute" if span <= 6 * 3600 else "hour" if span <= 14 * 86400 else "day"
    if gran not in (*GRANULARITIES, "total"):
        raise QueryError("granularity", "must be minute, hour, day, total or auto")
    if gran != "total":
        g = GRANULARITIES[gran]
        points = (t1 - (t0 - t0 % g)) // g
        if points > MAX_POINTS:
            raise QueryError("granularity", f"{points} {gran}s in the range (at most {MAX_POINTS}):"
                             " ask for a coarser granularity or a shorter range")  # fmt: skip
    dims_text = params.get("dims", params.get("by", "campaign"))  # dims= : no grouping
    dims = [d for d in dims_text.split(",") if d] if dims_text else []
    for d in dims:
        if d not in DIMS:
            raise QueryError("dims", f"unknown dimension {d[:40]!r} (known: {', '.join(DIMS)})")
    if len(set(dims)) != len(dims):
        raise QueryError("dims", "a dimension is named twice")
    filters: dict[str, list[Any]] = {}
    for d in DIMS:
        if d in params:
            vals = [v for v in params[d].split(",") if v]
            if d == "campaign":
                if not all(v.isascii() and v.isdigit() and len(v) <= 19 for v in vals):
                    raise QueryError("campaign", "campaign ids are positive integers")
                filters[d] = [int(v) for v in vals]
            else:
                if any(len(v) > 255 for v in vals):
                    raise QueryError(d, "value too long")
                filters[d] = vals
    limit = params.get("limit", "50")
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_GROUPS):
        raise QueryError("limit", f"must be an integer from 1 to {MAX_GROUPS}")
    return StatsQuery(tenant, t0, t1, gran, dims, filters, int(limit))


def _group_key(dims: list[str], values: tuple[Any, ...]) -> str:
    return "|".join(str(v) for v in values) if dims else "all"


def run_query(store: RollupStore, q: StatsQuery) -> dict[str, Any]:
    """The answer (JSON-ready): totals, groups (top ``limit`` by volume), series, reasons."""
    series_rows: list[tuple[tuple[Any, ...], list[int]]] = []
    by_group: dict[tuple[Any, ...], list[int]] = {}
    if q.granularity != "total":
        # The range is whole buckets of the granularity: one read gives the series,
        # and the groups and totals are its sums.
        g = GRANULARITIES[q.granularity]
        q.t0 -= q.t0 % g
        q.t1 = _ceil(q.t1, g)
        pieces = [(g, q.t0, q.t1)]
        series_rows = store.aggregate(g, q.t0, q.t1, q.tenant, q.filters, q.dims, True)
        merge_rows(by_group, ((k[1:], row) for k, row in series_rows))
    else:
        pieces = plan(q.t0, q.t1)
        for g, a, b in pieces:
            merge_rows(by_group, store.aggregate(g, a, b, q.tenant, q.filters, q.dims, False))
    total = [0] * len(COUNTERS)
    for row in by_group.values():
        for i, v in enumerate(row):
            total[i] += v
    vol = IDX["accepted"], IDX["delivered"], IDX["deferred"], IDX["bounced"]
    ranked = sorted(by_group.items(), key=lambda kv: (-sum(kv[1][i] for i in vol), str(kv[0])))
    ranked = ranked[: q.limit]
    out: dict[str, Any] = {
        "tenant": q.tenant,
        "from": q.t0,
        "to": q.t1,
        "granularity": q.granularity,
        "dims": q.dims,
        "filters": q.filters,
        "totals": {"counts": counts_dict(total), "rates": rates(total)},
        "lines": LINES,
        "groups": {},
    }
    groups: dict[str, Any] = out["groups"]
    for values, row in ranked:
        groups[_group_key(q.dims, values)] = {
            "key": dict(zip(q.dims, values, strict=True)),
            "counts": counts_dict(row, sparse=True),
            "rates": rates(row),
        }
    if q.granularity != "total":
        g = GRANULARITIES[q.granularity]
        start = q.t0 - q.t0 % g
        ts = list(range(start, q.t1, g))
        pos = {t: i for i, t in enumerate(ts)}
        out["step"] = g
        out["series"] = {"t": ts, **{c: [0] * len(ts) for c in COUNTERS}}
        for values, row in series_rows:
            ix = pos.get(values[0])
            if ix is None:
                continue
            for c, v in zip(COUNTERS, row, strict=True):
                if v:
                    out["series"][c][ix] += v
            grp = groups.get(_group_key(q.dims, values[1:])) if q.dims else None
            if grp is not None:
                s = grp.setdefault("series", {c: [0] * len(ts) for c in COUNTERS})
                for c, v in zip(COUNTERS, row, strict=True):
                    if v:
                        s[c][ix] += v
        if q.reasons:
            rs: dict[str, dict[str, list[int]]] = {"bounced": {}, "deferred": {}}
            for (t, kind, reason), n in store.reasons(g, start, q.t1, q.tenant, q.filters, True):
                ix = pos.get(t)
                if ix is not None and kind in rs:
                    rs[kind].setdefault(reason, [0] * len(ts))[ix] += n
            out["reasons_series"] = rs
        if q.gauges:
            gs: dict[str, list[float | None]] = {}
            for t, name, gval in store.gauges(g, start, q.t1, q.tenant):
                ix = pos.get(t)
                if ix is not None:
                    gs.setdefault(name, [None] * len(ts))[ix] = gval
            out["gauges"] = gs
    if q.reasons:
        rsum: dict[str, dict[str, int]] = {"bounced": {}, "deferred": {}}
        for g, a, b in pieces:
            for (kind, reason), n in store.reasons(g, a, b, q.tenant, q.filters, False):
                if kind in rsum:
                    rsum[kind][reason] = rsum[kind].get(reason, 0) + n
        out["reasons"] = {
            k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in rsum.items()
        }
    return out
