"""GCRA rate limiting: token buckets as one timestamp each.

NAME
    fastsend.throttle -- Gcra buckets and a keyed Limiter, compiled with a
    pure-Python twin.

SUMMARY
    b = Gcra(rate_per_s=100.0, burst=10)
    wait = b.acquire(now)          # 0.0: allowed and consumed; else seconds to wait
    b.peek(now), b.available(now), b.set_rate(50.0)   # AIMD feedback
    lim = Limiter(100.0, 10)       # buckets per key, e.g. (source_ip, site)
    wait = lim.acquire(("192.0.2.1", "google"), now)

DESCRIPTION
    The Generic Cell Rate Algorithm keeps one number per bucket, the
    theoretical arrival time (TAT) of the next event. With emission interval
    ``T = 1/rate`` and tolerance ``tau = burst * T``, a request for ``n``
    events at time ``now`` computes ``new_tat = max(tat, now) + n*T``; it
    conforms when ``new_tat - tau <= now`` (then ``tat = new_tat``), else the
    caller must wait ``new_tat - tau - now`` seconds and nothing is consumed.
    Hence at most ``burst`` events conform at one instant, and over any
    window of length W at most ``burst + rate*W`` events conform. The bucket
    starts full. ``n`` larger than ``burst`` can never conform: ValueError.

    Time is passed in (monotonic seconds: ``time.monotonic()`` or a
    simulated clock), never read here, so tests drive a fake clock and one
    clock read serves many buckets. Every method given ``now`` records the
    latest instant seen; set_rate without ``now`` uses it.

    Arithmetic is exact: instants are integer nanoseconds
    (``floor(now*1e9 + 0.5)``) and the interval is rounded to whole
    nanoseconds once per rate (relative rate error at most
    ``0.5 * rate / 1e9``: 5e-7 at 1,000/s, 5e-4 at 1e6/s). Integers make the burst bound
    hold exactly (no float drift admitting or refusing the burst-th event)
    and make the compiled and pure twins agree bit for bit. The one float
    step in set_rate (scaling the debt) is a single IEEE multiply and floor,
    the same in C and Python. Bounds keep every sum inside int64: ``now`` in
    (-4e9, 4e9) seconds, ``rate`` in (0, 1e9], ``burst/rate`` under ~73 years.

    set_rate (AIMD feedback: halve on "421 slow down", add on success)
    rescales the current debt ``tat - now`` by new/old interval, so the
    number of events already "in the bucket" is kept: lowering the rate can
    never release a burst, raising it releases nothing early either.

MEMORY ORDERING
    None needed: a bucket is owned by one worker process (buckets are per
    (source IP, site) and each IP belongs to one worker) and used from its
    event-loop thread. Shared limits across machines are the spool's Redis
    GCRA, not this module.

DELIBERATELY NOT
    No sleeping, no clock reads, no asyncio: callers decide how to wait. No
    thread safety. No shared-memory buckets. No persistence: a restarted
    worker starts with full buckets (at most one extra burst); a reload's new
    worker starts from the old one's (fastsend.shaping.lanes.spent).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Final

from fastsend._accel import pick

__all__ = ["Gcra", "Limiter", "PyGcra", "PyLimiter"]

MAX_NOW_S: Final = 4.0e9  # |now| bound: now*1e9 + 2*span stays inside int64
MAX_RATE: Final = 1.0e9  # one event per nanosecond
MAX_SPAN_NS: Final = 1 << 61  # burst * interval bound (about 73 years)
_NEVER: Final = -(1 << 63)  # "no event yet": below any valid instant


def _to_ns(now: float) -> int:
    if not -MAX_NOW_S < now < MAX_NOW_S:  # also rejects NaN
        raise ValueError(f"now must be monotonic seconds within ±{MAX_NOW_S:g}, not {now!r}")
    return math.floor(now * 1e9 + 0.5)


def _interval_ns(rate_per_s: float, burst: int) -> int:
    if not 0.0 < rate_per_s <= MAX_RATE:  # also rejects NaN
        raise ValueError(f"rate must be in (0, {MAX_RATE:g}] per second, not {rate_per_s!r}")
    interval = max(1, math.floor(1e9 / rate_per_s + 0.5))
    if burst * interval > MAX_SPAN_NS:
        raise ValueError(f"burst/rate = {burst}/{rate_per_s} spans too long")
    return interval


def _check_burst(burst: int) -> int:
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be a positive int, not {burst!r}")
    return burst


class Gcra:
    """One GCRA bucket: ``rate_per_s`` sustained, ``burst`` at once, starts full."""

    __slots__ = ("_burst", "_interval", "_last", "_rate", "_tat", "_tau")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        burst = _check_burst(burst)
        rate = float(rate_per_s)
        self._interval = _interval_ns(rate, burst)
        self._rate = rate
        self._burst = burst
        self._tau = burst * self._interval
        self._tat = _NEVER
        self._last = _NEVER  # latest instant seen, for set_rate without now

    @property
    def rate(self) -> float:
        """Sustained events per second (as configured)."""
        return self._rate

    @property
    def burst(self) -> int:
        """Most events that conform at one instant."""
        return self._burst

    def _wait_ns(self, t: int, n: int) -> tuple[int, int]:
        if not isinstance(n, int) or n < 1 or n > self._burst:
            raise ValueError(f"n must be in 1..burst={self._burst}, not {n}")
        if t > self._last:
            self._last = t
        tat = self._tat if self._tat > t else t
        new_tat = tat + n * self._interval
        return new_tat - self._tau - t, new_tat

    def acquire(self, now: float, n: int = 1) -> float:
        """0.0 if ``n`` events conform at ``now`` (consumed); else seconds to wait."""
        wait, new_tat = self._wait_ns(_to_ns(now), n)
        if wait <= 0:
            self._tat = new_tat
            return 0.0
        return wait / 1e9

    def peek(self, now: float, n: int = 1) -> float:
        """What acquire would answer, without consuming anything."""
        wait, _ = self._wait_ns(_to_ns(now), n)
        return 0.0 if wait <= 0 else wait / 1e9

    def available(self, now: float) -> int:
        """How many events would conform at ``now`` (0..burst)."""
        t = _to_ns(now)
        if t > self._last:
            self._last = t
        debt = self._tat - t if self._tat > t else 0
        if debt >= self._tau:
            return 0
        return (self._tau - debt) // self._interval

    def idle(self, now: float) -> bool:
        """True when the bucket is full again (a fresh bucket would decide the same)."""
        t = _to_ns(now)
        if t > self._last:
            self._last = t
        return self._tat <= t

    def set_rate(self, rate_per_s: float, now: float | None = None) -> None:
        """Change the sustained rate, keeping the events already counted.

        The debt ``tat - now`` (at ``now``, or the latest instant this bucket
        saw) is scaled by new/old interval and capped at the new tolerance.
        """
        rate = float(rate_per_s)
        interval = _interval_ns(rate, self._burst)
        if now is not None:
            t = _to_ns(now)
            if t > self._last:
                self._last = t
        tau = self._burst * interval
        if self._tat > self._last:
            ratio = float(interval) / float(self._interval)  # as C: (double)a / (double)b
            debt = math.floor(float(self._tat - self._last) * ratio)
            self._tat = self._last + (debt if debt < tau else tau)
        self._interval = interval
        self._tau = tau
        self._rate = rate

    def __repr__(self) -> str:
        return f"Gcra(rate_per_s={self._rate!r}, burst={self._burst})"


class Limiter:
    """GCRA buckets per key (e.g. ``(source_ip, site)``), created on demand.

    New keys get the default ``rate_per_s`` and ``burst``; :meth:`configure`
    gives a key its own. :meth:`prune` drops idle default buckets so memory
    follows the active keys without changing any decision.
    """

    __slots__ = ("_buckets", "_burst", "_rate")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        PyGcra(rate_per_s, burst)  # validate once, with the same messages
        self._rate = float(rate_per_s)
        self._burst = burst
        self._buckets: dict[Hashable, Gcra] = {}

    @property
    def rate(self) -> float:
        """Default rate of new buckets."""
        return self._rate

    @property
    def burst(self) -> int:
        """Default burst of new buckets."""
        return self._burst

    def bucket(self, key: Hashable) -> Gcra:
        """The bucket of ``key``, created (full, default settings) if absent."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = PyGcra(self._rate, self._burst)
        return b

    def acquire(self, key: Hashable, now: float, n: int = 1) -> float:
        """``bucket(key).acquire(now, n)``."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = PyGcra(self._rate, self._burst)
        return b.acquire(now, n)

    def peek(self, key: Hashable, now: float, n: int = 1) -> float:
        """``bucket(key).peek(now, n)``, without creating a bucket."""
        b = self._buckets.get(key)
        if b is None:
            b = PyGcra(self._rate, self._burst)
        return b.peek(now, n)

    def set_rate(self, key: Hashable, rate_per_s: float, now: float | None = None) -> None:
        """``bucket(key).set_rate(rate_per_s, now)`` (the key then survives prune)."""
        self.bucket(key).set_rate(rate_per_s, now)

    def configure(self, key: Hashable, rate_per_s: float, burst: int) -> Gcra:
        """Give ``key`` its own settings: a fresh, full bucket (use at setup)."""
        b = self._buckets[key] = PyGcra(rate_per_s, burst)
        return b

    def remove(self, key: Hashable) -> None:
        """Forget ``key`` (no error if absent)."""
        self._buckets.pop(key, None)

    def prune(self, now: float) -> int:
        """Drop idle buckets with the default settings; return how many."""
        drop = [
            k
            for k, b in self._buckets.items()
            if b.idle(now) and b.rate == self._rate and b.burst == self._burst
        ]
        for k in drop:
            del self._buckets[k]
        return len(drop)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._buckets))

    def __repr__(self) -> str:
        return f"Limiter(rate_per_s={self._rate!r}, burst={self._burst}, keys={len(self)})"


PyGcra: Final = Gcra
"""The pure-Python twins, whatever :class:`Gcra` / :class:`Limiter` resolve to."""
PyLimiter: Final = Limiter

if not TYPE_CHECKING:
    Gcra = pick(PyGcra)
    Limiter = pick(PyLimiter)
