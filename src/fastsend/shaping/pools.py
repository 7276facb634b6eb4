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

    Warm-up: an IP with ``warmup_start`` (a date, or ``warmup_day = N`` for
    "today is day N") may send at most ``schedule[day-1]`` messages per UTC
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
    ``now // 86400``) is passed in, so tests drive days. No persistence: the
    supervisor writes the state file.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from fastsend.settings import Config, ConfigError, validate_ip

DEFAULT_SCHEDULE: tuple[int, ...] = (
    50, 100, 200, 400, 800, 1500, 3000, 6000, 10_000, 20_000, 40_000, 80_000, 150_000, 300_000,
)  # fmt: skip
UNCAPPED = 1 << 62


def utc_day(now: float) -> int:
    return int(now // 86400)


@dataclass
class PoolIP:
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


@dataclass
class WarmupSchedule:
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
    _current: dict[str, int] = field(default_factory=dict, repr=False)
    counters: dict[tuple[str, str], Warmup] = field(default_factory=dict, repr=False)

    def restricted(self, ips: list[str]) -> Pool:
        """This pool limited to ``ips`` (a worker's own addresses); shares counters."""
        mine = [p for p in self.ips if p.ip in ips]
        sub = Pool(self.name, mine, self.schedule)
        sub.counters = self.counters
        return sub

    def warmup(self, ip: PoolIP, provider: str, now: float) -> Warmup:
        """The (IP, provider) counter for today (a new day starts from zero)."""
        key = (ip.ip, provider)
        day = utc_day(now)
        w = self.counters.get(key)
        if w is None or w.day != day:
            w = self.counters[key] = Warmup(
                ip.ip, provider, day, self.schedule.cap(ip.warmup_day(now))
            )
        return w

    def set_offsets(self, offsets: dict[str, int], now: float) -> None:
        """Warm-up day offsets per IP; today's caps follow at once."""
        day = utc_day(now)
        by_ip = {p.ip: p for p in self.ips}
        for p in self.ips:
            p.day_offset = int(offsets.get(p.ip, 0))
        for (ip, _prov), w in self.counters.items():
            pip = by_ip.get(ip)
            if pip is not None and w.day == day:
                w.cap = self.schedule.cap(pip.warmup_day(now))

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


@dataclass
class PoolSet:
    pools: dict[str, Pool]
    default: str
    tenants: dict[str, str] = field(default_factory=dict)

    def pool_for(self, name: str = "", tenant: str = "") -> str:
        if name and name in self.pools:
            return name
        t = self.tenants.get(tenant)
        if t:
            return t
        return self.default

    def all_ips(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.pools.values():
            for ip in p.ips:
                seen.setdefault(ip.ip)
        return list(seen)

    def ehlo_names(self) -> dict[str, str]:
        return {ip.ip: ip.ehlo for p in self.pools.values() for ip in p.ips if ip.ehlo}


def _day_of(v: Any, where: str) -> int:
    if isinstance(v, dt.datetime):
        v = v.date()
    if isinstance(v, dt.date):
        return (v - dt.date(1970, 1, 1)).days
    if isinstance(v, str):
        try:
            return (dt.date.fromisoformat(v) - dt.date(1970, 1, 1)).days
        except ValueError:
            pass
    raise ConfigError(f"{where}: warmup_start must be a date (YYYY-MM-DD)")


def load_pools(config: Config, now: float) -> PoolSet:
    """Parse ``[pools]``; with none, one pool "default" of ``[ips] source``."""
    raw = config.raw.get("pools", {})
    if not isinstance(raw, dict):
        raise ConfigError("[pools] must be a table")
    schedule = WarmupSchedule()
    wu = raw.get("warmup", {})
    if not isinstance(wu, dict) or set(wu) - {"schedule"}:
        raise ConfigError("[pools.warmup] takes one key: schedule = [caps per day]")
    if "schedule" in wu:
        caps = wu["schedule"]
        if not isinstance(caps, list) or not all(isinstance(c, int) and c > 0 for c in caps):
            raise ConfigError("[pools.warmup] schedule must be a list of positive integers")
        schedule = WarmupSchedule(tuple(caps))
    tenants = raw.get("tenants", {})
    if not isinstance(tenants, dict) or not all(isinstance(v, str) for v in tenants.values()):
        raise ConfigError("[pools] tenants must map tenant names to pool names")
    pools: dict[str, Pool] = {}
    for name, table in raw.items():
        if name in ("warmup", "tenants", "default"):
            continue
        where = f"[pools.{name}]"
        if not isinstance(table, dict) or set(table) - {"ips"}:
            raise ConfigError(f"{where} must be a table with ips = [...]")
        ips: list[PoolIP] = []
        for i, entry in enumerate(table.get("ips", [])):
            w = f"{where} ips[{i}]"
            if isinstance(entry, str):
                entry = {"ip": entry}
            if not isinstance(entry, dict):
                raise ConfigError(f"{w}: must be an address or a table")
            extra = set(entry) - {"ip", "weight", "ehlo", "warmup_start", "warmup_day"}
            if extra:
                raise ConfigError(f"{w}: unknown key {sorted(extra)[0]!r}")
            weight = entry.get("weight", 1)
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
                raise ConfigError(f"{w}: weight must be a positive integer")
            start: int | None = None
            if "warmup_start" in entry:
                start = _day_of(entry["warmup_start"], w)
            elif "warmup_day" in entry:
                d = entry["warmup_day"]
                if not isinstance(d, int) or d < 1:
                    raise ConfigError(f"{w}: warmup_day must be a positive integer")
                start = utc_day(now) - d + 1
            ips.append(
                PoolIP(
                    validate_ip(str(entry.get("ip", "")), w),
                    weight,
                    str(entry.get("ehlo", "")),
                    start,
                )
            )
        if not ips:
            raise ConfigError(f"{where}: ips is empty")
        pools[name] = Pool(name, ips, schedule)
    default = raw.get("default", "")
    if not pools:
        pools["default"] = Pool("default", [PoolIP(ip) for ip in config.source_ips], schedule)
        default = "default"
    if not default:
        default = next(iter(pools))
    if default not in pools:
        raise ConfigError(f"[pools] default {default!r} is not a pool")
    for t, p in tenants.items():
        if p not in pools:
            raise ConfigError(f"[pools] tenants: {t!r} names unknown pool {p!r}")
    return PoolSet(pools, default, dict(tenants))
