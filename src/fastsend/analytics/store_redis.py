"""The rollup store beside a Redis spool: hashes per bucket and tenant.

NAME
    fastsend.analytics.store_redis -- RedisRollupStore.

DESCRIPTION
    Keys (under the spool's hash-tagged prefix ``{prefix}``, so a cluster keeps
    them on the spool's slot):

    - ``{p}:ru:<g>:<t>:<tenant>`` hash, field ``campaign|provider|ip|counter``
      -> count (HINCRBY: several nodes add into the same buckets);
    - ``{p}:rr:<g>:<t>:<tenant>`` hash, field ``campaign|provider|ip|kind|reason``;
    - ``{p}:rg:<g>:<t>:<tenant>`` hash, field gauge name -> value (last wins);
    - ``{p}:r1:<kind>:<msg>`` a marker set with NX (unique opens and clicks);
    - ``{p}:st:<scope>`` hash, key -> value: alarm and blocklist states, changed by a
      compare-and-set script (one node tells each change).

    Every key gets an expiry from its granularity's retention, so there is no
    prune pass. One pipeline per :meth:`add`; ranges are read one HGETALL per
    bucket (the query planner keeps that to about a hundred).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastsend.analytics.store import (
    ALL,
    COUNTERS,
    DIMS,
    IDX,
    NC,
    RETENTION_DAYS,
    Counts,
    Gauges,
    Reasons,
    RollupStore,
    uses_campaigns,
)

SEP = "\x1f"
def _str(b: Any) -> str:
    return b.decode() if isinstance(b, bytes | bytearray) else str(b)


_SET_STATE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then cur = '' end
if cur ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


class RedisRollupStore(RollupStore):
    def __init__(self, r: Any, prefix: str, retention: dict[int, float] | None = None) -> None:
        self.r = r
        self.k = "{" + prefix + "}"
        self.retention = dict(retention or RETENTION_DAYS)

    @classmethod
    def from_url(cls, url: str) -> RedisRollupStore:
        from fastsend.spool import open_spool

        shared = open_spool(url).shared()
        if shared is None:
            raise ValueError(f"not a shared spool: {url!r}")
        return cls(shared.client, shared.prefix)

    def states(self, scope: str) -> dict[str, str]:
        got = self.r.hgetall(f"{self.k}:st:{scope}")
        return {_str(k): _str(v) for k, v in got.items()}

    def set_state(self, scope: str, key: str, was: str, value: str) -> bool:
        return bool(self.r.eval(_SET_STATE, 1, f"{self.k}:st:{scope}", key, was, value))

    def _ttl(self, g: int) -> int:
        return int(self.retention.get(g, RETENTION_DAYS.get(g, 30)) * 86400) + g

    def add(self, counts: Counts, reasons: Reasons, gauges: Gauges,
            marks: dict[str, str] | None = None) -> None:  # fmt: skip
        if not counts and not reasons and not gauges and not marks:
            return
        # With a mark (how far into a node's event log the counts go): MULTI/EXEC, so
        # the counts and the mark land together or not at all.
        pipe = self.r.pipeline(transaction=bool(marks))
        if marks:
            pipe.hset(f"{self.k}:st:logmark", mapping=marks)  # type: ignore[arg-type]
        touched: dict[str, int] = {}
        for (g, t, (tenant, cid, prov, ip)), row in counts.items():
            key = f"{self.k}:ru:{g}:{t}:{tenant}"
            base = f"{cid}{SEP}{prov}{SEP}{ip}{SEP}"
            for i, v in enumerate(row):
                if v:
                    pipe.hincrby(key, base + COUNTERS[i], v)
            touched[key] = g
        for (g, t, (tenant, cid, prov, ip), kind, reason), n in reasons.items():
            key = f"{self.k}:rr:{g}:{t}:{tenant}"
            pipe.hincrby(key, SEP.join((str(cid), prov, ip, kind, reason)), n)
            touched[key] = g
        for (g, t, tenant, name), gv in gauges.items():
            key = f"{self.k}:rg:{g}:{t}:{tenant}"
            pipe.hset(key, name, repr(float(gv)))
            touched[key] = g
        for key, g in touched.items():
            pipe.expire(key, self._ttl(g))
        pipe.execute()

    def first_seen(self, pairs: Sequence[tuple[int, int]], t: int) -> list[bool]:
        if not pairs:
            return []
        pipe = self.r.pipeline(transaction=False)
        ttl = self._ttl(86400)
        for kind, msg in pairs:
            pipe.set(f"{self.k}:r1:{kind}:{msg}", b"1", nx=True, ex=ttl)
        return [bool(x) for x in pipe.execute()]

    def _buckets(self, kind: str, g: int, t0: int, t1: int, tenant: str) -> list[tuple[int, Any]]:
        ts = list(range(t0 - t0 % g + (g if t0 % g else 0), t1, g))
        if not ts:
            return []
        pipe = self.r.pipeline(transaction=False)
        for t in ts:
            pipe.hgetall(f"{self.k}:{kind}:{g}:{t}:{tenant}")
        return list(zip(ts, pipe.execute(), strict=True))

    @staticmethod
    def _match(filters: dict[str, Any], vals: dict[str, Any], per_campaign: bool) -> bool:
        if (vals["campaign"] != ALL) != per_campaign:
            return False
        for dim, want in filters.items():
            if dim not in DIMS:
                raise ValueError(dim)
            w = list(want) if isinstance(want, list | tuple | set | frozenset) else [want]
            if vals[dim] not in w:
                return False
        return True

    def aggregate(
        self, g: int, t0: int, t1: int, tenant: str, filters: dict[str, Any],
        dims: Sequence[str], by_time: bool,
    ) -> list[tuple[tuple[Any, ...], list[int]]]:  # fmt: skip
        for d in dims:
            if d not in DIMS:
                raise ValueError(d)
        out: dict[tuple[Any, ...], list[int]] = {}
        per = uses_campaigns(filters, dims)
        for t, h in self._buckets("ru", g, t0, t1, tenant):
            for field, v in h.items():
                f = field.decode() if isinstance(field, bytes) else field
                cid, prov, ip, counter = f.split(SEP)
                vals = {"campaign": int(cid), "provider": prov, "source_ip": ip}
                if not self._match(filters, vals, per):
                    continue
                key = ((t,) if by_time else ()) + tuple(vals[d] for d in dims)
                row = out.get(key)
                if row is None:
                    row = out[key] = [0] * NC
                i = IDX.get(counter)
                if i is not None:
                    row[i] += int(v)
        return list(out.items())

    def reasons(
        self, g: int, t0: int, t1: int, tenant: str, filters: dict[str, Any], by_time: bool
    ) -> list[tuple[tuple[Any, ...], int]]:
        out: dict[tuple[Any, ...], int] = {}
        per = uses_campaigns(filters, ())
        for t, h in self._buckets("rr", g, t0, t1, tenant):
            for field, v in h.items():
                f = field.decode() if isinstance(field, bytes) else field
                cid, prov, ip, kind, reason = f.split(SEP)
                vals = {"campaign": int(cid), "provider": prov, "source_ip": ip}
                if not self._match(filters, vals, per):
                    continue
                key = ((t,) if by_time else ()) + (kind, reason)
                out[key] = out.get(key, 0) + int(v)
        return list(out.items())

    def gauges(self, g: int, t0: int, t1: int, tenant: str) -> list[tuple[int, str, float]]:
        out = []
        for t, h in self._buckets("rg", g, t0, t1, tenant):
            for name, v in h.items():
                n = name.decode() if isinstance(name, bytes) else name
                out.append((t, n, float(v)))
        return out

    def prune(self, now: float, retention: dict[int, float]) -> int:
        self.retention.update(retention)  # keys expire by themselves
        return 0
