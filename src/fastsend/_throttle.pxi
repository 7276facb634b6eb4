# Compiled twins of fastsend.throttle.Gcra and Limiter (included from _core.pyx).
#
# Same integer-nanosecond GCRA as the pure-Python reference; see the
# fastsend.throttle module docstring for the algorithm, the bounds that keep
# every sum inside int64, and why no memory ordering is involved (one owner
# thread per bucket). Every float step is the same single IEEE operation as
# in Python (no FMA: the expressions have no a*b+c shape that a compiler
# could contract), so both twins agree bit for bit.

from libc.math cimport floor
from libc.stdint cimport int64_t, INT64_MIN

cdef double _THR_MAX_NOW_S = 4.0e9
cdef double _THR_MAX_RATE = 1.0e9
cdef int64_t _THR_MAX_SPAN_NS = (<int64_t>1) << 61
cdef int64_t _THR_NEVER = INT64_MIN


cdef inline int64_t _thr_to_ns(double now) except? -1:
    cdef double x
    if not (-_THR_MAX_NOW_S < now < _THR_MAX_NOW_S):
        raise ValueError(f"now must be monotonic seconds within ±{_THR_MAX_NOW_S:g}, not {now!r}")
    x = now * 1e9
    return <int64_t>floor(x + 0.5)


cdef int64_t _thr_interval_ns(double rate, int64_t burst) except -1:
    cdef double x
    cdef int64_t interval
    if not (0.0 < rate <= _THR_MAX_RATE):
        raise ValueError(f"rate must be in (0, {_THR_MAX_RATE:g}] per second, not {rate!r}")
    x = 1e9 / rate
    interval = <int64_t>floor(x + 0.5)
    if interval < 1:
        interval = 1
    if burst > _THR_MAX_SPAN_NS // interval:
        raise ValueError(f"burst/rate = {burst}/{rate} spans too long")
    return interval


cdef int64_t _thr_check_burst(object burst) except -1:
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be a positive int, not {burst!r}")
    if burst > _THR_MAX_SPAN_NS:
        raise ValueError(f"burst {burst} is too large")
    return <int64_t>burst


cdef class Gcra:
    """One GCRA bucket: ``rate_per_s`` sustained, ``burst`` at once, starts full.

    Compiled twin of :class:`fastsend.throttle.PyGcra`.
    """

    cdef int64_t _burst
    cdef int64_t _interval
    cdef int64_t _tau
    cdef int64_t _tat
    cdef int64_t _last
    cdef double _rate

    def __init__(self, rate_per_s, burst):
        cdef int64_t b = _thr_check_burst(burst)
        cdef double rate = float(rate_per_s)
        self._interval = _thr_interval_ns(rate, b)
        self._rate = rate
        self._burst = b
        self._tau = b * self._interval
        self._tat = _THR_NEVER
        self._last = _THR_NEVER

    @property
    def rate(self):
        """Sustained events per second (as configured)."""
        return self._rate

    @property
    def burst(self):
        """Most events that conform at one instant."""
        return self._burst

    cdef inline int _check_n(self, object n) except -1:
        if not isinstance(n, int) or n < 1 or n > self._burst:
            raise ValueError(f"n must be in 1..burst={self._burst}, not {n}")
        return 0

    cdef inline int64_t _new_tat(self, int64_t t, int64_t n) noexcept:
        """Record t as seen; the TAT after n more events at t."""
        cdef int64_t tat
        if t > self._last:
            self._last = t
        tat = self._tat if self._tat > t else t
        return tat + n * self._interval

    cdef double _acquire(self, double now, int64_t n) except -1.0:
        cdef int64_t t = _thr_to_ns(now)
        cdef int64_t new_tat = self._new_tat(t, n)
        cdef int64_t wait = new_tat - self._tau - t
        if wait <= 0:
            self._tat = new_tat
            return 0.0
        return <double>wait / 1e9

    def acquire(self, double now, n=1):
        """0.0 if ``n`` events conform at ``now`` (consumed); else seconds to wait."""
        self._check_n(n)
        return self._acquire(now, n)

    def peek(self, double now, n=1):
        """What acquire would answer, without consuming anything."""
        cdef int64_t t, wait
        self._check_n(n)
        t = _thr_to_ns(now)
        wait = self._new_tat(t, n) - self._tau - t
        return 0.0 if wait <= 0 else <double>wait / 1e9

    def available(self, double now):
        """How many events would conform at ``now`` (0..burst)."""
        cdef int64_t t = _thr_to_ns(now)
        cdef int64_t debt
        if t > self._last:
            self._last = t
        debt = self._tat - t if self._tat > t else 0
        if debt >= self._tau:
            return 0
        return (self._tau - debt) // self._interval

    cdef bint _idle(self, double now) except -1:
        cdef int64_t t = _thr_to_ns(now)
        if t > self._last:
            self._last = t
        return self._tat <= t

    def idle(self, double now):
        """True when the bucket is full again (a fresh bucket would decide the same)."""
        return self._idle(now)

    def set_rate(self, rate_per_s, now=None):
        """Change the sustained rate, keeping the events already counted.

        The debt ``tat - now`` (at ``now``, or the latest instant this bucket
        saw) is scaled by new/old interval and capped at the new tolerance.
        """
        cdef double rate = float(rate_per_s)
        cdef int64_t interval = _thr_interval_ns(rate, self._burst)
        cdef int64_t t, tau, debt
        cdef double ratio, scaled
        if now is not None:
            t = _thr_to_ns(now)
            if t > self._last:
                self._last = t
        tau = self._burst * interval
        if self._tat > self._last:
            ratio = <double>interval / <double>self._interval
            scaled = <double>(self._tat - self._last) * ratio
            debt = <int64_t>floor(scaled)
            self._tat = self._last + (debt if debt < tau else tau)
        self._interval = interval
        self._tau = tau
        self._rate = rate

    def __repr__(self):
        return f"Gcra(rate_per_s={self._rate!r}, burst={self._burst})"


cdef class Limiter:
    """GCRA buckets per key (e.g. ``(source_ip, site)``), created on demand.

    Compiled twin of :class:`fastsend.throttle.PyLimiter`.
    """

    cdef dict _buckets
    cdef double _rate
    cdef object _burst

    def __init__(self, rate_per_s, burst):
        Gcra(rate_per_s, burst)  # validate once, with the same messages
        self._rate = float(rate_per_s)
        self._burst = burst
        self._buckets = {}

    @property
    def rate(self):
        """Default rate of new buckets."""
        return self._rate

    @property
    def burst(self):
        """Default burst of new buckets."""
        return self._burst

    cdef inline Gcra _bucket(self, object key):
        cdef object b = self._buckets.get(key)
        if b is None:
            b = Gcra(self._rate, self._burst)
            self._buckets[key] = b
        return <Gcra>b

    def bucket(self, key):
        """The bucket of ``key``, created (full, default settings) if absent."""
        return self._bucket(key)

    def acquire(self, key, double now, n=1):
        """``bucket(key).acquire(now, n)``."""
        cdef Gcra b = self._bucket(key)
        b._check_n(n)
        return b._acquire(now, n)

    def peek(self, key, double now, n=1):
        """``bucket(key).peek(now, n)``, without creating a bucket."""
        b = self._buckets.get(key)
        if b is None:
            b = Gcra(self._rate, self._burst)
        return b.peek(now, n)

    def set_rate(self, key, rate_per_s, now=None):
        """``bucket(key).set_rate(rate_per_s, now)`` (the key then survives prune)."""
        self._bucket(key).set_rate(rate_per_s, now)

    def configure(self, key, rate_per_s, burst):
        """Give ``key`` its own settings: a fresh, full bucket (use at setup)."""
        b = Gcra(rate_per_s, burst)
        self._buckets[key] = b
        return b

    def remove(self, key):
        """Forget ``key`` (no error if absent)."""
        self._buckets.pop(key, None)

    def prune(self, double now):
        """Drop idle buckets with the default settings; return how many."""
        cdef Gcra g
        drop = []
        for k, b in self._buckets.items():
            g = <Gcra>b
            if g._idle(now) and g._rate == self._rate and g._burst == self._burst:
                drop.append(k)
        for k in drop:
            del self._buckets[k]
        return len(drop)

    def __len__(self):
        return len(self._buckets)

    def __contains__(self, key):
        return key in self._buckets

    def __iter__(self):
        return iter(list(self._buckets))

    def __repr__(self):
        return f"Limiter(rate_per_s={self._rate!r}, burst={self._burst}, keys={len(self)})"
