"""Rate limits shared by every fastsend node: GCRA in one Lua script on Redis.

SUMMARY
    lim = SharedLimits("redis://127.0.0.1:6379/0?prefix=fs1")   # or a redis.Redis
    wait = lim.acquire("campaign:42", rate_per_s=100.0, burst=20, now=t, n=5)
    b = lim.bucket("tenant:acme", 500.0, 50); wait = b.acquire(now, n)

DESCRIPTION
    The same algorithm and answers as :class:`fastsend.throttle.Gcra`: one
    number per bucket, its theoretical arrival time (TAT); ``new_tat =
    max(tat, now) + n*T`` with ``T = 1/rate``; ``n`` events conform when
    ``new_tat - burst*T <= now`` (then ``tat = new_tat``, answer 0.0), else
    the answer is the seconds to wait and nothing is consumed. A bucket
    starts full. The read-decide-write is one Lua script, so any number of
    processes on any number of machines sharing a key together admit at most
    ``burst`` at once and ``burst + rate*W`` in any window of W seconds.

    Keys are ``{prefix}:gcra:NAME`` (the hash tag of the Redis spool, so a
    spool and its limits can share one Redis, in one cluster slot). Rate and
    burst travel with each call (every node configures the same limits); a
    key whose bucket has refilled expires, so idle names cost no memory.

    Time: ``now`` in seconds, passed in (tests drive a simulated clock). Every
    node must use the same time base: wall-clock ``time.time()`` (NTP), never
    ``time.monotonic()`` (its epoch differs per machine). ``now=None`` uses
    the Redis server's clock, one clock for all nodes. Arithmetic is exact in
    integer microseconds (Lua numbers are doubles: exact below 2**53), where
    Gcra uses nanoseconds: the interval is ``round(1e6/rate)`` microseconds,
    so rates up to 1,000,000/s; decisions equal Gcra's whenever 1e6/rate is
    a whole number, and differ by at most that rounding otherwise.

    :meth:`SharedLimits.take` grants *up to* ``n`` events (as many as
    conform now, at least one or none) in the same call, and
    :class:`LeasedBucket` builds on it: a node leases tokens in batches
    (``lease_batch``, up to 100) and spends them locally, so Redis sees about
    one call per batch however many messages pass. Leased tokens are already
    debited from the shared bucket, so every node together still admits at
    most ``burst + rate*W`` in W seconds (plus, at most, the batches leased
    and not yet spent, which a node drops after ``LEASE_TTL`` seconds).

DELIBERATELY NOT
    No sleeping, no set_rate/AIMD (per-lane feedback stays in the worker's Gcra).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from typing import Any

import redis

from fastsend.redisurl import parse_redis_url as parse_url

MAX_NOW_S = 4.0e9  # |now| * 1e6 stays below 2**53: exact in Lua's doubles
MAX_RATE = 1.0e6  # one event per microsecond

# Both scripts: KEYS[1] bucket; ARGV: now_us ('' = Redis TIME), interval_us, burst, n.
# The prelude sets t (now, us), interval, burst, n, tau (burst tolerance) and tat
# (the bucket's theoretical arrival time, never in the past).
_PRELUDE = """
local t
if ARGV[1] == '' then
  local tt = redis.call('TIME')
  t = tonumber(tt[1]) * 1000000 + tonumber(tt[2])
else
  t = tonumber(ARGV[1])
end
local interval, burst, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tau = burst * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if tat == nil or tat < t then tat = t end
"""

# -> 0 when all n conform (and are taken), else the wait in us (nothing taken)
_GCRA = (
    _PRELUDE
    + """
local new_tat = tat + n * interval
local wait = new_tat - tau - t
if wait <= 0 then
  local ttl_ms = math.floor((new_tat - t) / 1000) + 60000
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
  return 0
end
return wait
"""
)

# -> {granted, wait_us}: as many of n as conform now (then wait_us = 0)
_GCRA_TAKE = (
    _PRELUDE
    + """
local k = math.floor((t + tau - tat) / interval)
if k > n then k = n end
if k < 1 then return {0, tat + interval - tau - t} end
local new_tat = tat + k * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - t) / 1000) + 60000)
return {k, 0}
"""
)

LEASE_TTL = 1.0  # s: leased tokens not spent by then are dropped
MAX_LEASE_BATCH = 100


def _interval_us(rate_per_s: float, burst: int) -> int:
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be a positive int, not {burst!r}")
    if not 0.0 < rate_per_s <= MAX_RATE:  # also rejects NaN
        raise ValueError(f"rate must be in (0, {MAX_RATE:g}] per second, not {rate_per_s!r}")
    interval = max(1, math.floor(1e6 / rate_per_s + 0.5))
    if burst * interval > 1 << 52:
        raise ValueError(f"burst/rate = {burst}/{rate_per_s} spans too long")
    return interval


class SharedLimits:
    """GCRA buckets by name in one Redis, shared by every process that uses it."""

    def __init__(self, url_or_client: str | Any, *, prefix: str | None = None) -> None:
        if isinstance(url_or_client, str):
            redis_url, ours = parse_url(url_or_client)
            self.r: Any = redis.Redis.from_url(redis_url)
            prefix = prefix or ours.get("prefix")
        else:
            self.r = url_or_client
        self.k = "{" + (prefix or "fastsend") + "}:gcra:"
        self._script = self.r.register_script(_GCRA)
        self._take = self.r.register_script(_GCRA_TAKE)
        self.calls = 0  # take() calls made by leased buckets (Redis round trips)

    def acquire(
        self, name: str, rate_per_s: float, burst: int, now: float | None = None, n: int = 1
    ) -> float:
        """0.0 if ``n`` events of ``name`` conform at ``now`` (consumed); else
        seconds to wait. ``now=None``: the Redis server's clock."""
        interval = _interval_us(float(rate_per_s), burst)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= burst:
            raise ValueError(f"n must be in 1..burst={burst}, not {n!r}")
        if now is None:
            t = ""
        else:
            if not -MAX_NOW_S < now < MAX_NOW_S:  # also rejects NaN
                raise ValueError(f"now must be seconds within ±{MAX_NOW_S:g}, not {now!r}")
            t = str(math.floor(now * 1e6 + 0.5))
        wait = int(self._script(keys=[self.k + name], args=[t, interval, burst, n]))
        return 0.0 if wait <= 0 else wait / 1e6

    def take(
        self, name: str, rate_per_s: float, burst: int, n: int, now: float | None = None
    ) -> tuple[int, float]:
        """Consume as many of ``n`` events as conform at ``now`` (up to ``burst``):
        (granted, 0.0), or (0, seconds until one conforms). One round trip."""
        interval = _interval_us(float(rate_per_s), burst)
        n = max(1, min(int(n), burst))
        t = "" if now is None else str(math.floor(now * 1e6 + 0.5))
        got, wait = self._take(keys=[self.k + name], args=[t, interval, burst, n])
        return int(got), max(0, int(wait)) / 1e6

    def leased(self, name: str, rate_per_s: float, burst: int) -> LeasedBucket:
        _interval_us(float(rate_per_s), burst)
        return LeasedBucket(self, name, float(rate_per_s), burst)

    def bucket(self, name: str, rate_per_s: float, burst: int) -> SharedGcra:
        _interval_us(float(rate_per_s), burst)  # validate now, not at the first acquire
        return SharedGcra(self, name, float(rate_per_s), burst)

    def reset(self, name: str) -> None:
        """Forget a bucket (it is full again)."""
        self.r.delete(self.k + name)

    def close(self) -> None:
        self.r.close()


class SharedGcra:
    """One named shared bucket, used like :class:`fastsend.throttle.Gcra`."""

    __slots__ = ("burst", "limits", "name", "rate")

    def __init__(self, limits: SharedLimits, name: str, rate_per_s: float, burst: int) -> None:
        self.limits, self.name, self.rate, self.burst = limits, name, rate_per_s, burst

    def acquire(self, now: float | None = None, n: int = 1) -> float:
        return self.limits.acquire(self.name, self.rate, self.burst, now, n)

    def __repr__(self) -> str:
        return f"SharedGcra({self.name!r}, rate_per_s={self.rate!r}, burst={self.burst})"


def lease_batch(rate_per_s: float, burst: int) -> int:
    """Tokens a node leases per call: a quarter of the burst, 1..100."""
    return max(1, min(MAX_LEASE_BATCH, burst // 4, int(rate_per_s) or 1))


class LeasedBucket:
    """A shared bucket spent locally: :meth:`available` / :meth:`acquire` as
    :class:`fastsend.throttle.Gcra`'s, backed by tokens leased from Redis in
    batches (Redis's clock: one time base for every node). ``now`` is this
    process's monotonic clock, used only to age leased tokens and to space
    retries after a refusal."""

    __slots__ = ("batch", "burst", "leased_at", "limits", "name", "rate", "retry_at", "tokens")

    def __init__(self, limits: SharedLimits, name: str, rate_per_s: float, burst: int) -> None:
        self.limits, self.name, self.rate, self.burst = limits, name, rate_per_s, burst
        self.batch = lease_batch(rate_per_s, burst)
        self.tokens = 0
        self.leased_at = 0.0
        self.retry_at = 0.0

    def available(self, now: float) -> int:
        if self.tokens and now - self.leased_at > LEASE_TTL:
            self.tokens = 0  # stale: spending them now would exceed the burst bound
        if self.tokens * 2 < self.batch and now >= self.retry_at:
            want = self.batch - self.tokens
            got, wait = self.limits.take(self.name, self.rate, self.burst, want)
            self.limits.calls += 1
            if got:
                self.tokens += got
                self.leased_at = now
            # Short of a batch (the bucket is at its rate): ask again once the rest
            # has accrued, so a node at the limit still makes one call per batch.
            if got < want:
                self.retry_at = now + min(wait + (want - got) / self.rate, LEASE_TTL)
        return self.tokens

    def acquire(self, now: float, n: int = 1) -> float:
        """Spend ``n`` leased tokens (after :meth:`available` said they are there)."""
        if n > self.tokens:
            return 1.0 / self.rate
        self.tokens -= n
        return 0.0

    def __repr__(self) -> str:
        return f"LeasedBucket({self.name!r}, rate_per_s={self.rate!r}, burst={self.burst})"


# KEYS: one sorted set per transport (member: node, score: its lease deadline in
# ms of Redis time); ARGV: node, lease (ms), and per key 1 to join (or stay) or
# 0 to leave. Drops the members whose lease lapsed, then -> the live members of
# each key.
_SHARES = """
local tt = redis.call('TIME')
local now = tonumber(tt[1]) * 1000 + math.floor(tonumber(tt[2]) / 1000)
local lease = tonumber(ARGV[2])
local out = {}
for i, k in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if string.sub(ARGV[3], i, i) == '1' then
    redis.call('ZADD', k, now + lease, ARGV[1])
    redis.call('PEXPIRE', k, 2 * lease)
  else
    redis.call('ZREM', k, ARGV[1])
  end
  out[i] = redis.call('ZRANGE', k, 0, -1)
end
return out
"""

SHARE_LEASE = 30.0  # s a node's place in a transport's split lasts unrenewed
SHARE_EVERY = 0.5  # s between renewals (fastsend.queue.shaping: a new share is known this soon)
JOIN_GRACE = 4 * SHARE_EVERY  # s a node joining others keeps to 1 connection (they see it)


def node_share(total: int, members: list[str], node: str) -> int:
    """``node``'s part of ``total`` connections split among ``members``: an
    equal part, the remainder to the first names in order; never below 1 (a
    node with no connection could send nothing: more nodes than connections
    go over the total by that much)."""
    live = sorted(set(members) | {node})
    n = len(live)
    rank = live.index(node)
    return max(1, total // n + (1 if rank < total % n else 0))


class ConnectionShares:
    """Each transport's ``max_connections`` (a relay's sessions, a provider's
    requests in flight) split among the live nodes that send through it, so
    every node together holds at most the total, as the relay or provider
    counts them; and the count of live nodes per transport, by which a
    worker divides a provider account's rate read from the provider (SES's
    MaxSendRate: one quota for the account, whichever node sends).

    A node that has mail for a transport (``active`` in :meth:`refresh`: the
    supervisor's windows, fastsend.queue.shaping) renews its place in
    ``{prefix}:conns:NAME`` (a sorted set: node -> lease deadline, Redis time)
    every :data:`SHARE_EVERY` s and takes its part (:func:`node_share`) of the
    live members; one that has none leaves it, so a node merely configured
    with the transport (idle, or sending elsewhere) takes no part of it. A
    node that died drops out once its lease (:data:`SHARE_LEASE` s) lapses and
    the others take its part, and a node restarted with the same name takes
    its own place again. In a Redis outage the last shares stay
    (:meth:`refresh` raises; the caller keeps them). A node that joins while
    others send keeps to 1 connection for :data:`JOIN_GRACE` s, until they
    have seen it and taken less; a transport it has not joined is 1 (its mail
    just came: it joins at the next refresh). So the total can be exceeded by
    1 per joining node (per worker lane) for about one renewal, as it is by
    design when there are more nodes than connections (never 0: a node could
    send nothing)."""

    def __init__(self, limits: SharedLimits, node: str, totals: dict[str, int]) -> None:
        self.r = limits.r
        base = limits.k[: -len("gcra:")]
        self.names = sorted(totals)
        self.keys = [base + "conns:" + n for n in self.names]
        self.node = node
        self.totals = dict(totals)
        self.shares: dict[str, int] = {}
        self.nodes: dict[str, int] = {}  # live nodes per transport, this one included
        self.others = 0  # the most other live nodes seen on one transport
        self.joined: dict[str, float] = {}  # transport -> when this node joined it (monotonic)
        self._script = self.r.register_script(_SHARES)

    def refresh(self, active: Collection[str] | None = None, join: bool = True) -> bool:
        """Renew this node's place in the transports it has mail for (``active``;
        None: every one), leave the others, read the live members: True when a
        share (or a transport's count of live nodes) changed."""
        lease_ms = int(SHARE_LEASE * 1000)
        want = [join and (active is None or n in active) for n in self.names]
        flags = "".join("1" if w else "0" for w in want)
        got = self._script(keys=self.keys, args=[self.node, lease_ms, flags])
        mono = time.monotonic()
        shares = {}
        nodes = {}
        others = 0
        for name, members, w in zip(self.names, got, want, strict=True):
            live = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
            rest = len(live - {self.node})
            others = max(others, rest)
            if not w:
                self.joined.pop(name, None)
                share = 1
            else:
                # Joined while others send: 1 until they have seen this node.
                since = self.joined.setdefault(name, mono if rest else -math.inf)
                share = node_share(self.totals[name], list(live), self.node)
                if mono - since < JOIN_GRACE:
                    share = 1
            shares[name] = share
            nodes[name] = len(live | {self.node})
        self.others = others
        changed = shares != self.shares or nodes != self.nodes
        self.shares, self.nodes = shares, nodes
        return changed

    def leave(self) -> None:
        """A clean exit: this node's part goes to the others at their next renewal."""
        self.refresh(join=False)
