"""IP pools: weighted source IPs, per-IP EHLO names, warm-up caps, resting.

NAME
    fastsend.shaping.pools -- PoolSet, Pool, PoolIP, WarmupSchedule, Warmup.

DESCRIPTION
    Config (the ``[pools]`` table; every key optional)::

        [pools]
        default = "main"                        # pool of campaigns that name none
        tenants = { acme = "acme-ips" }         # a tenant's campaigns use this pool
        [pools.warmup]
        schedule = [50, 100, 500, 1000]         # daily cap per provider on day 1, 2, ...
        [pools.main]
        ips = [
          { ip = "127.0.0.2", weight = 2, ehlo = "out1.example.com" },
          { ip = "127.0.0.3", ehlo = "out2.example.com", warmup_start = 2025-06-01 },
        ]

    A campaign chooses a pool by its option ``pool`` (``spool.create_campaign(...,
    options={"pool": "main"})``), else by its tenant, else the default pool;
    with no ``[pools]`` at all, every worker's ``[ips] source`` addresses form
    one pool of equal weights.

    :meth:`Pool.pick` is smooth weighted round-robin (nginx's: each eligible
    IP gains its weight, the largest current value wins and pays the total)
    over the IPs that may send to the site now: not at its warm-up cap for
    the site's provider and not refused by ``eligible`` (resting, suspended,
    at its connection limit: the caller knows). The share of an IP that
    cannot send is taken by the others, in proportion to their weights.
    Weights also set each IP's part of a site's connections from its worker
    (``delivery.pool.SiteQueue``: its weight over the heaviest's, of the
    lane's ``max_connections``), so a busy site's mail is shared by weight
    too, not in equal parts; between workers the supervisor splits the mail
    by the weights each owns (:class:`PoolRoutes`).

    Warm-up: an IP with ``warmup_start`` (a date, or ``warmup_day = N`` for
    "today is day N", the day it was first read: tomorrow is N + 1, across
    restarts and reloads) may send at most ``schedule[day-1]`` messages per UTC
    day to each provider; after the schedule it is warm (no cap). The day may
    run ahead of or behind the calendar (``PoolIP.day_offset``, set from the
    engagement-aware warm-up). Mail over a cold IP's cap overflows: ``pick``
    passes over an IP at its cap, so the pool's warmed IPs take that share
    the same day. Counters
    live in the worker that owns the IP; the supervisor persists them in the
    spool (``Spool.add_counters``: shared by the nodes of a Redis spool) and
    hands them back to a restarted worker through the ring.

DELIBERATELY NOT HERE
    No sockets and no clocks read here: ``now`` (unix seconds; the UTC day is
    ``now // 86400``) is passed in, so tests drive days. No persistence but
    the first day of ``warmup_day = N`` addresses (``warmup_anchors``): the
    supervisor writes the counters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fastsend import durable
from fastsend.config import Config

DEFAULT_SCHEDULE: tuple[int, ...] = (
    50, 100, 200, 400, 800, 1500, 3000, 6000, 10_000, 20_000, 40_000, 80_000, 150_000, 300_000,
)  # fmt: skip
UNCAPPED = 1 << 62


def utc_day(now: float) -> int:
    return int(now // 86400)


class PoolIP(msgspec.Struct):
    ip: str
    weight: int = 1
    ehlo: str = ""
    warmup_start_day: int | None = None  # UTC day number of warm-up day 1
    # Days ahead (+) or behind (-) the calendar, set by the engagement-aware warm-up
    # (fastsend.analytics.warmup: rates and provider feeds) through the supervisor.
    day_offset: int = 0

    def warmup_day(self, now: float) -> int:
        """1-based day of warm-up at ``now`` (0: not warming)."""
        if self.warmup_start_day is None:
            return 0
        return max(1, utc_day(now) - self.warmup_start_day + 1 + self.day_offset)


class WarmupSchedule(msgspec.Struct):
    caps: tuple[int, ...] = DEFAULT_SCHEDULE

    def cap(self, day: int) -> int:
        """Daily cap per provider on warm-up ``day`` (1-based); UNCAPPED once warm."""
        if day <= 0 or day > len(self.caps):
            return UNCAPPED
        return self.caps[day - 1]


class Warmup:
    """Today's count of one (IP, provider) against its cap. Shared by its lanes."""

    __slots__ = ("cap", "day", "ip", "provider", "sent")

    def __init__(self, ip: str, provider: str, day: int, cap: int, sent: int = 0) -> None:
        self.ip, self.provider, self.day, self.cap, self.sent = ip, provider, day, cap, sent

    def left(self) -> int:
        return self.cap - self.sent


@dataclass
class Pool:
    name: str
    ips: list[PoolIP]
    schedule: WarmupSchedule = field(default_factory=WarmupSchedule)
    # workers sending from these addresses: each keeps its own count against
    # its part of a warm-up cap (shaping.lanes.ip_sharers)
    split: int = 1
    _current: dict[str, int] = field(default_factory=dict, repr=False)
    counters: dict[tuple[str, str], Warmup] = field(default_factory=dict, repr=False)

    def restricted(self, ips: list[str]) -> Pool:
        """This pool limited to ``ips`` (a worker's own addresses); shares counters."""
        mine = [p for p in self.ips if p.ip in ips]
        sub = Pool(self.name, mine, self.schedule, self.split)
        sub.counters = self.counters
        return sub

    def warmup(self, ip: PoolIP, provider: str, now: float) -> Warmup:
        """The (IP, provider) counter for today (a new day starts from zero)."""
        key = (ip.ip, provider)
        day = utc_day(now)
        w = self.counters.get(key)
        if w is None or w.day != day:
            w = self.counters[key] = Warmup(ip.ip, provider, day, self.cap(ip, now))
        return w

    def cap(self, ip: PoolIP, now: float) -> int:
        """Today's cap of ``ip`` per provider for this worker (its part when
        ``split`` workers send from it)."""
        cap = self.schedule.cap(ip.warmup_day(now))
        if self.split > 1 and cap < UNCAPPED:
            cap = max(1, cap // self.split)
        return cap

    def set_offsets(self, offsets: dict[str, int], now: float) -> None:
        """Warm-up day offsets per IP; today's caps follow at once."""
        day = utc_day(now)
        by_ip = {p.ip: p for p in self.ips}
        for p in self.ips:
            p.day_offset = int(offsets.get(p.ip, 0))
        for (ip, _prov), w in self.counters.items():
            pip = by_ip.get(ip)
            if pip is not None and w.day == day:
                w.cap = self.cap(pip, now)

    def pick(self, provider: str, now: float, eligible: Any = None) -> PoolIP | None:
        """Smooth weighted round-robin over the IPs that may send now."""
        total = 0
        best: PoolIP | None = None
        best_v = 0
        cur = self._current
        day = -1
        for p in self.ips:
            if eligible is not None and not eligible(p.ip):
                continue
            if p.warmup_start_day is not None:
                if day < 0:
                    day = utc_day(now)
                w = self.counters.get((p.ip, provider))
                if w is None or w.day != day:
                    w = self.warmup(p, provider, now)
                if w.sent >= w.cap:
                    continue
            v = cur.get(p.ip, 0) + p.weight
            cur[p.ip] = v
            total += p.weight
            if best is None or v > best_v:
                best, best_v = p, v
        if best is not None:
            cur[best.ip] = best_v - total
        return best


class PoolSet(msgspec.Struct):
    pools: dict[str, Pool]
    default: str
    tenants: dict[str, str] = msgspec.field(default_factory=dict)

    def pool_for(self, name: str = "", tenant: str = "") -> str:
        """The pool a campaign of ``tenant`` naming pool ``name`` (or none) sends
        from: ``name`` when it may (:meth:`may_use`), else the tenant's pool,
        else the default."""
        if name and name in self.pools and self.may_use(name, tenant):
            return name
        t = self.tenants.get(tenant)
        if t:
            return t
        return self.default

    def may_use(self, name: str, tenant: str) -> bool:
        """Whether a campaign of ``tenant`` may name pool ``name``: a pool that
        ``[pools] tenants`` gives to some tenants is theirs (and the operator's:
        the default tenant's); any other pool anyone's. A tenant never sends
        from another tenant's dedicated addresses (their reputation)."""
        owners = [t for t, p in self.tenants.items() if p == name]
        return not owners or tenant in owners or tenant in ("", "default")

    def all_ips(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.pools.values():
            for ip in p.ips:
                seen.setdefault(ip.ip)
        return list(seen)

    def ehlo_names(self) -> dict[str, str]:
        return {ip.ip: ip.ehlo for p in self.pools.values() for ip in p.ips if ip.ehlo}


ANCHORS = "warmup-anchors.json"  # in the spool directory: warmup_day's first days


def warmup_anchors(config: Config, now: float) -> dict[str, tuple[int, int]]:
    """``{ip: (N, UTC day of its warm-up day 1)}`` for the ``warmup_day = N``
    addresses of ``[pools]``: day 1 is N - 1 days before the day N was first
    read for that address, kept in ``SPOOL/warmup-anchors.json``, so a restart
    or a SIGHUP on a later day goes on from there (it was N again: an IP said
    to be on day 1 stayed at day 1's cap through every reload). A changed N
    anchors anew (the operator's "today is day N"). Without a spool directory
    (yet): today's reading, not kept."""
    want: dict[str, int] = {}
    for table in (config.pools.pools if config.pools is not None else {}).values():
        for e in table.ips:
            if e.warmup_start is None and e.warmup_day is not None:
                want[e.ip] = int(e.warmup_day)
    if not want:
        return {}
    path = os.path.join(config.spool_dir, ANCHORS) if config.spool_dir else ""
    kept: dict[str, Any] = {}
    if path:
        with contextlib.suppress(OSError, ValueError):
            with open(path, "rb") as f:
                got = json.loads(f.read())
            kept = got if isinstance(got, dict) else {}
    today = utc_day(now)
    out: dict[str, tuple[int, int]] = {}
    for ip, n in want.items():
        old = kept.get(ip)
        if (isinstance(old, list) and len(old) == 2 and old[0] == n
                and all(isinstance(x, int) for x in old)):  # fmt: skip
            out[ip] = (n, int(old[1]))
        else:
            out[ip] = (n, today - n + 1)
    changed = any(kept.get(ip) != list(v) for ip, v in out.items())
    if changed and path and os.path.isdir(config.spool_dir):
        doc = {**kept, **{ip: list(v) for ip, v in out.items()}}
        tmp = f"{path}.{os.getpid()}.tmp"
        try:  # (every process of the node reads it; a write is whole or not at all)
            with open(tmp, "w") as f:
                f.write(json.dumps(doc, sort_keys=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            durable.fsync_dir(config.spool_dir)  # (the new name: see durable)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return out


def load_pools(config: Config, now: float) -> PoolSet:
    """The pools of ``[pools]`` (typed and checked when the config loaded);
    with none, one pool "default" of ``[ips] source``."""
    sec = config.pools
    schedule = WarmupSchedule(tuple(sec.warmup.schedule)) if sec and sec.warmup.schedule else (
        WarmupSchedule())  # fmt: skip
    pools: dict[str, Pool] = {}
    anchors = warmup_anchors(config, now)
    for name, table in (sec.pools if sec is not None else {}).items():
        ips: list[PoolIP] = []
        for e in table.ips:
            start: int | None = None
            if e.warmup_start is not None:
                start = (e.warmup_start - dt.date(1970, 1, 1)).days
            elif e.warmup_day is not None:
                start = anchors.get(e.ip, (0, 0))[1]
            ips.append(PoolIP(e.ip, e.weight, e.ehlo, start))
        pools[name] = Pool(name, ips, schedule)
    default = sec.default if sec is not None else ""
    if not pools:
        pools["default"] = Pool("default", [PoolIP(ip) for ip in config.source_ips], schedule)
        default = "default"
    return PoolSet(pools, default or next(iter(pools)), dict(sec.tenants) if sec else {})


class PoolRoutes:
    """The supervisor's side of pools: which workers may send a pool's mail.

    Each worker owns a slice of the source IPs (``Config.ips_for_worker``) and
    sends only from its own, so a pool's mail must go to the workers owning
    its IPs -- a campaign of a tenant's dedicated pool handed to a worker that
    owns none of them went out from another pool's addresses -- and in
    proportion to the weights they own there (a pool of 3:1 weights split over
    two workers went out half and half). ``shares`` holds only the pools that
    need it: not the implicit pool of ``[ips] source`` (no ``[pools]``), nor a
    pool every worker owns an equal weight of (claims already go to every
    worker evenly). :meth:`pick` is the smooth weighted round-robin of
    :meth:`Pool.pick` over the workers with room."""

    __slots__ = ("_current", "shares")

    def __init__(self, poolset: PoolSet, worker_ips: dict[int, list[str]], explicit: bool) -> None:
        self.shares: dict[str, tuple[tuple[int, int], ...]] = {}
        self._current: dict[str, dict[int, int]] = {}
        if not explicit:
            return
        for name, pool in poolset.pools.items():
            if not pool.ips:
                continue
            owned = {
                i: sum(p.weight for p in pool.ips if p.ip in set(ips))
                for i, ips in worker_ips.items()
            }
            if len(set(owned.values())) == 1 and next(iter(owned.values())) > 0:
                continue  # every worker an equal share
            self.shares[name] = tuple((i, w) for i, w in sorted(owned.items()) if w > 0)

    def owns(self, pool: str, worker: int) -> bool:
        """Whether ``worker`` has an address of ``pool`` (True for pools not routed)."""
        shares = self.shares.get(pool)
        return shares is None or any(i == worker for i, _w in shares)

    def pick(
        self,
        pool: str,
        room: dict[int, int],
        owners: tuple[tuple[int, int], ...] | None = None,
        skip: Any = None,
    ) -> int | None:
        """The worker the next message of ``pool`` goes to: weighted round-robin
        over its owners (``owners``: these (worker, weight) instead) with
        ``room`` left and not in ``skip`` (None: none)."""
        cur = self._current.setdefault(pool, {})
        total = 0
        best = -1
        best_v = 0
        for i, w in self.shares[pool] if owners is None else owners:
            if room.get(i, 0) <= 0 or (skip and i in skip):
                continue
            v = cur.get(i, 0) + w
            cur[i] = v
            total += w
            if best < 0 or v > best_v:
                best, best_v = i, v
        if best < 0:
            return None
        cur[best] = best_v - total
        return best
