"""A transport's connections shared by the worker processes of one node.

``max_connections`` of a relay or provider is the total across every worker.
Split in equal parts it is a whole number each only when there are at least
as many connections as workers: with fewer (a relay that takes 2 sessions,
16 workers) each worker needs one it may use *when* the others do not.
:class:`Slots` is that: ``total`` places, each a byte of one file in
``SPOOL/transport-slots/`` locked with ``fcntl.lockf`` (POSIX record locks
belong to the process: the kernel drops them when it exits, so a worker
killed while sending leaks none, and a reload's retiring worker keeps its
places until its last request ends). A place is taken without waiting
(non-blocking); a worker that found none and holds none marks itself waiting
(its own byte past ``WANT``) and tries again shortly, and a worker that frees a place while
another waits lets it go first (:meth:`Slots.others_waiting`): without that,
the worker that freed a place took it again in the same callback and the
others never got one. :func:`sweep` unlinks the files no process holds a
place in nor waits on (``SPOOL/lane-places/`` has one per (source IP, site));
a worker's first lock on a file checks that its name still names it.

A transport's ``rate`` is the node's too: :class:`SharedGcra` is one GCRA
bucket whose state (its theoretical arrival time, CLOCK_MONOTONIC
nanoseconds: one clock for every process of the machine) is 8 bytes of a file
in ``SPOOL/transport-rates/`` each worker maps, read and written under a
record lock. Before, each worker (and each of its source IPs, for a relay)
had ``rate / workers`` of its own: a campaign one worker held alone went at
half the rate with two workers, and each lane's burst of at least one let a
small rate (0.5/s over 2 workers x 2 addresses) send four at once. After the
TAT the file keeps a record per process drawing on the bucket lately: a
worker plans its ready queue on its part of the rate (:meth:`SharedGcra.share`),
not on the whole of it while the others draw too.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct

from fastsend.throttle import _interval_ns

WANT = 1 << 20  # offset of the workers' "waiting" bytes (index i at WANT + i)


class Slots:
    """``total`` places shared by the processes that open ``path``."""

    def __init__(self, path: str, index: int, total: int) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.index = index
        self.total = total
        self.held: set[int] = set()
        self.wanting = False

    def _try(self, i: int) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, i)
        except OSError:  # EAGAIN / EACCES: another process holds it
            return False
        return True

    def _first(self, i: int) -> bool:
        """Lock byte ``i`` as this process's first lock on the file: on the
        file ``path`` names now. :func:`sweep` unlinks a file no process has a
        lock on; one opened before that and locked after would be a second
        set of places (two connections where one is allowed): then the lock
        is dropped and the file ``path`` names (made again) is locked."""
        while True:
            if not self._try(i):
                return False
            try:
                st, mine = os.stat(self.path), os.fstat(self.fd)
                same = (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                same = False
            if same:
                return True
            self._unlock(i)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(self.fd)
            self.fd = fd

    def _lock(self, i: int) -> bool:
        if self.held or self.wanting:  # (a lock held: the file cannot have been swept)
            return self._try(i)
        return self._first(i)

    def _unlock(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, i)

    def acquire(self, want: bool = True) -> int | None:
        """A free place (this process holds it until :meth:`release`), or None
        when every one is held; then, with ``want`` (this worker holds none:
        it cannot send at all), it counts as waiting. A worker that has some
        and would like more does not: the others would give up theirs in
        turn, a new session each time, for no gain in the total."""
        for i in range(self.total):
            if i not in self.held and self._lock(i):
                self.held.add(i)
                self.unwant()
                return i
        if want and not self.wanting:
            self.wanting = self._lock(WANT + self.index)
        return None

    def unwant(self) -> None:
        """No longer waiting (nothing left to send, paused): a waiting mark
        left behind would have the others give way to no one."""
        if self.wanting:
            self.wanting = False
            self._unlock(WANT + self.index)

    def release(self, i: int) -> None:
        if i in self.held:
            self.held.discard(i)
            self._unlock(i)

    def others_waiting(self, workers: int) -> bool:
        """Whether another of ``workers`` is waiting for a place."""
        for j in range(workers):
            if j == self.index:
                continue
            if not self._try(WANT + j):
                return True
            self._unlock(WANT + j)
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # (drops every lock this process holds on it)
            self.fd = -1
            self.held.clear()


def sweep(directory: str, most: int = 10_000) -> int:
    """Unlink the places files in ``directory`` that no process holds a place
    in or waits on (each locked whole, without waiting, then unlinked under
    that lock; a process that opened one before locks the file made again:
    :meth:`Slots._first`), at most ``most`` looked at; how many went. A
    file per (source IP, site) that ever needed places (``SPOOL/lane-places/``):
    never removed, they grew with every site a node ever sent to."""
    gone = 0
    try:
        it = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with it:
        for n, entry in enumerate(it):
            if n >= most:
                break
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)  # (0: to the end, and past)
                os.unlink(entry.path)
                gone += 1
            except OSError:  # held, waited on, or gone already
                pass
            finally:
                os.close(fd)  # (drops the lock)
    return gone


_TAT = struct.Struct("=qq")  # theoretical arrival time (ns), boot mark
_STALE_NS = 86_400 * 10**9  # a TAT this far ahead is not this boot's: forgotten
# After the TAT, one record per process drawing on the bucket lately (its token,
# when it last took or waited, ns): how many share the rate (SharedGcra.share).
_USER = struct.Struct("=qq")
_USERS = 64
_SIZE = _TAT.size + _USERS * _USER.size
_ACTIVE_NS = 2 * 10**9  # a process that drew on it within this (or 8 events' time) shares it


def _boot_mark() -> int:
    """This boot's mark (Linux: the kernel's boot_id; else 0): a TAT written
    under another boot is on another CLOCK_MONOTONIC and is forgotten."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return int(f.read(64).strip().replace(b"-", b"")[:15], 16)
    except (OSError, ValueError):
        return 0


class SharedGcra:
    """A GCRA bucket of ``rate`` events a second and ``burst`` at once shared
    by every process that opens ``path``: the methods of
    :class:`fastsend.throttle.Gcra` (same integer-nanosecond arithmetic) on a
    theoretical arrival time kept in the file. Each process has its own rate
    (a provider's throttle halves one worker's): an event costs its interval
    of the one timeline, so together they never pass the highest rate any of
    them has, plus one burst. ``now`` is ``time.monotonic()`` (system-wide)."""

    __slots__ = ("_burst", "_interval", "_mark", "_rate", "_slot", "_tau", "_token", "fd", "map")

    def __init__(self, path: str, rate: float, burst: int) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(self.fd).st_size < _SIZE:
                os.ftruncate(self.fd, _SIZE)  # (zeros: a full bucket, no users; kept: no change)
            self.map = mmap.mmap(self.fd, _SIZE)
        except OSError:
            os.close(self.fd)
            raise
        self._mark = _boot_mark()
        self._token = int.from_bytes(os.urandom(8), "little") >> 1 or 1
        self._slot = -1
        self._burst = max(1, int(burst))
        self._rate = 0.0
        self._interval = self._tau = 0
        self.set_rate(rate)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def set_rate(
        self, rate_per_s: float, now: float | None = None, *, burst: int | None = None
    ) -> None:
        """This process's rate (and burst): the events already counted stay
        counted, whoever counted them."""
        if burst is not None:
            self._burst = max(1, int(burst))
        self._interval = _interval_ns(float(rate_per_s), self._burst)  # (Gcra's checks)
        self._rate = float(rate_per_s)
        self._tau = self._burst * self._interval

    def _locked(self, now: float, n: int, take: bool, user: bool = False) -> tuple[int, int]:
        """(wait ns for ``n`` events at ``now``, 0 or less when they conform;
        the debt ns), consuming them when ``take`` and they conform; ``user``:
        this process draws on the bucket now (it takes or waits to)."""
        t = math.floor(now * 1e9 + 0.5)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, _TAT.size, 0)
        try:
            tat, mark = _TAT.unpack_from(self.map, 0)
            if mark != self._mark or tat - t > _STALE_NS:
                tat = 0
            base = tat if tat > t else t
            new = base + n * self._interval
            wait = new - self._tau - t
            if take and wait <= 0:
                _TAT.pack_into(self.map, 0, new, self._mark)
            if user:
                self._note(t)
            return wait, base - t
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, _TAT.size, 0)

    def _active(self, t: int, last: int) -> bool:
        return 0 <= t - last <= max(_ACTIVE_NS, 8 * self._interval)

    def _note(self, t: int) -> None:
        """Mark this process a user of the bucket at ``t`` (under the lock): its
        own record, else the first free or stale one (a worker that exited)."""
        m, off = self.map, _TAT.size
        if self._slot >= 0 and _USER.unpack_from(m, off + self._slot * _USER.size)[0] == self._token:
            _USER.pack_into(m, off + self._slot * _USER.size, self._token, t)
            return
        free = -1
        for i in range(_USERS):
            token, last = _USER.unpack_from(m, off + i * _USER.size)
            if token == self._token:
                free = i
                break
            if free < 0 and (token == 0 or not self._active(t, last)):
                free = i
        if free >= 0:  # (none: more users than records, who then count as one)
            self._slot = free
            _USER.pack_into(m, off + free * _USER.size, self._token, t)

    def share(self, now: float) -> float:
        """This process's part of the rate while the others drawing on the
        bucket lately keep drawing (itself counted): what a worker may plan
        its ready queue on. Each worker planning on the whole rate kept in
        its queue what all of them together could send in the time."""
        t = math.floor(now * 1e9 + 0.5)
        m, off = self.map, _TAT.size
        users = 1
        fcntl.lockf(self.fd, fcntl.LOCK_EX, _TAT.size, 0)
        try:
            for i in range(_USERS):
                token, last = _USER.unpack_from(m, off + i * _USER.size)
                if token and token != self._token and self._active(t, last):
                    users += 1
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, _TAT.size, 0)
        return self._rate / users

    def _check(self, n: int) -> None:
        if not isinstance(n, int) or n < 1 or n > self._burst:
            raise ValueError(f"n must be in 1..burst={self._burst}, not {n}")

    def acquire(self, now: float, n: int = 1) -> float:
        """0.0 if ``n`` events conform at ``now`` (consumed, for every process);
        else seconds to wait."""
        self._check(n)
        wait, _debt = self._locked(now, n, True, True)
        return 0.0 if wait <= 0 else wait / 1e9

    def peek(self, now: float, n: int = 1) -> float:
        """Seconds until ``n`` events conform (0.0: now), consuming nothing: a
        worker that asks this is waiting to draw on the bucket (a user)."""
        self._check(n)
        wait, _debt = self._locked(now, n, False, True)
        return 0.0 if wait <= 0 else wait / 1e9

    def available(self, now: float) -> int:
        """How many events would conform at ``now`` (0..burst)."""
        _wait, debt = self._locked(now, 1, False)
        return 0 if debt >= self._tau else (self._tau - debt) // self._interval

    def idle(self, now: float) -> bool:
        _wait, debt = self._locked(now, 1, False)
        return debt <= 0

    def close(self) -> None:
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"SharedGcra(rate_per_s={self._rate!r}, burst={self._burst})"
