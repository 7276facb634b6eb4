"""Shared-memory SPSC byte rings between the supervisor and its forked workers.

NAME
    fastsend.ring -- single-producer single-consumer rings of variable-length
    records in an anonymous shared mapping, with eventfd wake-ups.

SUMMARY
    ring = Ring(1 << 20)           # before os.fork(): mapping + two eventfds
    ring.put(b"batch") -> bool     # producer; False when it does not fit now
    ring.get() -> bytes | None     # consumer; None when empty
    loop.add_reader(ring.reader_fd, on_readable)   # consumer wake-ups
    ring.clear_reader(); drain with get() until None
    ring.wait_readable(timeout) / ring.wait_writable(timeout, size)

DESCRIPTION
    The mapping is ``mmap(MAP_SHARED | MAP_ANONYMOUS)``, so a ring created
    before ``fork()`` is the same memory in parent and child. Layout (native
    byte order, shared by both twins so a pure-Python producer can feed a
    compiled consumer; see :meth:`Ring.attach`)::

        offset   0  u64 magic "FSRING01", u64 capacity     (immutable)
        offset  64  u64 head  bytes ever published          (producer writes)
        offset 128  u64 tail  bytes ever consumed           (consumer writes)
        offset 192  u64 reader_waiting, u64 writer_waiting  (sleep handshake)
        offset 256  capacity bytes of records (capacity a power of two)

    head and tail are free-running 64-bit counters (2**64 bytes is centuries
    at any bandwidth); ``head - tail`` is the bytes in use and position is
    ``counter & (capacity - 1)``. They sit on separate cache lines so the two
    sides never false-share on the fast path. A record is a u64 length then
    the payload, padded to 8 bytes. The header is always contiguous (every
    position is 8-aligned and capacity is a multiple of 8); the payload may
    wrap past the end and is then copied in two parts, so no space is lost
    to padding markers and any record up to ``capacity - 8`` bytes fits in
    an empty ring (``max_record``).

    Memory: every RELEASE_EVERY bytes it publishes, the producer gives the
    pages of free space more than RELEASE_SLACK ahead of it back to the
    kernel (``madvise(MADV_REMOVE)``; free space is written only by the
    producer and never read), so a large ring that records have wrapped
    around does not stay resident in full.

    Wake-ups use two eventfds created before fork. ``reader_fd`` becomes
    readable when the producer published while the consumer was (about to
    be) asleep; ``writer_fd`` when the consumer freed space while the
    producer was waiting. Signals are sent only when the other side raised
    its waiting flag, so a busy pipeline makes no system calls at all.

MEMORY ORDERING
    Publication: the producer writes the record bytes, then stores head with
    release semantics; the consumer loads head with acquire semantics before
    reading the bytes, so it sees the whole record. Reclamation is the mirror
    image: the consumer copies the record out, then stores tail with release;
    the producer loads tail with acquire before overwriting that space.
    Each counter has one writer, so no read-modify-write is needed.

    Sleeping (no lost wake-ups) is a Dekker handshake: the consumer stores
    reader_waiting=1, issues a full (sequentially consistent) fence, then
    re-reads head; the producer stores head, issues a full fence, then reads
    reader_waiting. With both fences at least one side sees the other's
    store: either the consumer sees the new record, or the producer sees the
    flag, clears it and writes the eventfd. The consumer clears the eventfd
    *before* draining, so a signal that lands during the drain leaves the fd
    readable and costs at most one spurious wake-up, never a lost one. The
    writer side is the same protocol with writer_waiting, tail and writer_fd.
    The producer only clears reader_waiting right before it signals, so a
    clobbered flag is always followed by a signal that makes the consumer
    re-arm it.

    The compiled twin (``_ring.pxi``) uses GCC atomics: ``__atomic_load_n``
    with ``__ATOMIC_ACQUIRE``, ``__atomic_store_n`` with ``__ATOMIC_RELEASE``
    and ``__atomic_thread_fence(__ATOMIC_SEQ_CST)``; it is correct on any
    architecture. This pure-Python twin has no atomics: it reads and writes
    the counters through a native ``'Q'`` memoryview (one aligned 8-byte
    ``memcpy``, a single instruction on x86-64), relies on x86-64's TSO
    order for acquire/release (loads are not reordered with loads, stores
    not with stores, and the interpreter's opaque calls keep the compiler
    from reordering), and takes its full fence from an uncontended lock
    (a ``lock``-prefixed instruction). It is the readable reference and the
    interop partner in tests; run the compiled twin on weakly ordered CPUs.

DELIBERATELY NOT
    Not multi-producer or multi-consumer: one process puts, one gets (the
    supervisor holds one ring per direction per worker). No framing beyond
    bytes: callers encode batches (msgspec). No blocking put/get: callers
    choose between add_reader/add_writer on an event loop and the
    wait_readable/wait_writable helpers. No resizing. Not robust against a
    peer that scribbles over the mapping beyond a length sanity check.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import threading
from typing import TYPE_CHECKING, Final

from fastsend._accel import pick

__all__ = [
    "HEADER_BYTES", "MAGIC", "WRITE_LOG_IDS", "PyRing", "PyWriteLog", "Ring", "WriteLog",
    "clear_write_logs", "map_write_log", "read_write_logs", "reset_write_logs",
]

HEADER_BYTES: Final = 256
RELEASE_EVERY: Final = 4 << 20  # bytes produced between releases of free pages
RELEASE_SLACK: Final = 1 << 20  # free space right after head kept resident (written soon)
MAGIC: Final = 0x3130474E49525346  # b"FSRING01" read as a native little-endian u64
MIN_CAPACITY: Final = 64
MAX_CAPACITY: Final = 1 << 40
WRITE_LOG_IDS: Final = 1 << 18  # ids a WriteLog keeps (2 MiB): the last ones written

# Indices of u64 words in the header.
_W_MAGIC: Final = 0
_W_CAPACITY: Final = 1
_W_HEAD: Final = 8  # offset 64
_W_TAIL: Final = 16  # offset 128
_W_READER_WAITING: Final = 24  # offset 192
_W_WRITER_WAITING: Final = 25  # offset 200

_fence_lock = threading.Lock()


def _reset_fence_lock() -> None:
    # A thread of the parent may have held the lock at fork time.
    global _fence_lock
    _fence_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_fence_lock)


def _full_fence() -> None:
    """A full memory barrier: an uncontended lock is a locked RMW on x86-64."""
    with _fence_lock:
        pass


def ring_capacity(capacity_bytes: int) -> int:
    """The data capacity a ``Ring(capacity_bytes)`` gets: the next power of two."""
    if capacity_bytes < 1:
        raise ValueError(f"capacity must be positive, not {capacity_bytes}")
    cap = max(MIN_CAPACITY, 1 << (int(capacity_bytes) - 1).bit_length())
    if cap > MAX_CAPACITY:
        raise ValueError(f"capacity {capacity_bytes} exceeds {MAX_CAPACITY}")
    return cap


def _poll_ms(timeout: float | None) -> int:
    if timeout is None or timeout < 0:
        return -1
    ms = int(timeout * 1000.0)
    return ms + 1 if ms < timeout * 1000.0 else ms  # round up: never return early


def _signal(fd: int) -> None:
    os.eventfd_write(fd, 1)


def _drain_fd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _wait_fd(fd: int, timeout: float | None) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(_poll_ms(timeout)))


class Ring:
    """A single-producer single-consumer ring of byte records in shared memory.

    Create it before ``fork()``; then one process only calls the producer
    methods (put, wait_writable, clear_writer, writer_fd) and the other only
    the consumer ones (get, wait_readable, clear_reader, reader_fd).
    """

    def __init__(self, capacity_bytes: int) -> None:
        cap = ring_capacity(capacity_bytes)
        mem = mmap.mmap(-1, HEADER_BYTES + cap, flags=mmap.MAP_SHARED)
        rfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        hdr = memoryview(mem)[:HEADER_BYTES].cast("Q")
        hdr[_W_CAPACITY] = cap
        hdr[_W_MAGIC] = MAGIC
        hdr.release()
        self._setup(mem, rfd, wfd, owner=True)

    @classmethod
    def attach(cls, memory: mmap.mmap, reader_fd: int, writer_fd: int) -> Ring:
        """A ring over another Ring's mapping and eventfds (of either twin).

        The new object owns nothing: its close() leaves the mapping and fds
        to the ring it was attached to. Close it before that ring (it holds
        a buffer export of the mapping, which mmap.close() refuses).
        """
        self = cls.__new__(cls)
        self._setup(memory, reader_fd, writer_fd, owner=False)
        return self

    def _setup(self, mem: mmap.mmap, rfd: int, wfd: int, *, owner: bool) -> None:
        if len(mem) < HEADER_BYTES + MIN_CAPACITY:
            raise ValueError("mapping too small for a ring")
        hdr = memoryview(mem)[:HEADER_BYTES].cast("Q")
        cap = hdr[_W_CAPACITY]
        if hdr[_W_MAGIC] != MAGIC or cap & (cap - 1) or HEADER_BYTES + cap > len(mem):
            hdr.release()
            raise ValueError("not a fastsend ring mapping")
        self._mem = mem
        self._hdr = hdr
        self._data = memoryview(mem)[HEADER_BYTES : HEADER_BYTES + cap]
        self._words = self._data.cast("Q")
        self._cap = cap
        self._mask = cap - 1
        self._rfd = rfd
        self._wfd = wfd
        self._owner = owner
        self._closed = False
        self._release = cap >= 2 * RELEASE_EVERY and hasattr(mmap, "MADV_REMOVE")

    # -- properties ---------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Bytes of record space (a power of two)."""
        return self._cap

    @property
    def max_record(self) -> int:
        """The largest payload that can ever fit (``capacity - 8``)."""
        return self._cap - 8

    @property
    def reader_fd(self) -> int:
        """eventfd readable when records may be waiting (consumer side)."""
        return self._rfd

    @property
    def writer_fd(self) -> int:
        """eventfd readable when space was freed after a full put (producer side)."""
        return self._wfd

    @property
    def memory(self) -> mmap.mmap:
        """The shared mapping (for :meth:`attach`)."""
        return self._mem

    @property
    def closed(self) -> bool:
        return self._closed

    def used(self) -> int:
        """Bytes currently held, framing included (a snapshot; either side)."""
        self._check()
        return int(self._hdr[_W_HEAD] - self._hdr[_W_TAIL])

    # -- producer -----------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> bool:
        """Append one record. False if it does not fit now; ValueError if never."""
        self._check()
        src = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        n = len(src)
        if n > self._cap - 8:
            raise ValueError(f"record of {n} bytes can never fit a ring of {self._cap}")
        need = 8 + ((n + 7) & ~7)
        hdr = self._hdr
        head = hdr[_W_HEAD]  # our own counter
        tail = hdr[_W_TAIL]  # acquire
        if self._cap - (head - tail) < need:
            hdr[_W_WRITER_WAITING] = 1
            _full_fence()
            tail = hdr[_W_TAIL]
            if self._cap - (head - tail) < need:
                return False
        pos = head & self._mask
        self._words[pos >> 3] = n
        start = (pos + 8) & self._mask
        first = self._cap - start
        data_mv = self._data
        if n <= first:
            data_mv[start : start + n] = src
        else:
            view = memoryview(src)
            data_mv[start:] = view[:first]
            data_mv[: n - first] = view[first:]
        hdr[_W_HEAD] = head + need  # release: record bytes are stored before this
        _full_fence()
        if self._release and (head + need) // RELEASE_EVERY != head // RELEASE_EVERY:
            self._release_free(head + need, tail)
        if hdr[_W_READER_WAITING]:
            hdr[_W_READER_WAITING] = 0
            _signal(self._rfd)
        return True

    def _release_free(self, head: int, tail: int) -> None:
        """Give the pages of free space far ahead of the producer back to the
        kernel (MADV_REMOVE: shared anonymous memory), so a ring whose records
        have passed through all of it does not keep it all resident (one wrap of
        a 32 MB ring made every page resident for good). Only the producer writes
        free space and the consumer never reads it, so this needs no
        coordination; a page written again is faulted in, zeroed."""
        start, end = head + RELEASE_SLACK, tail + self._cap
        if end <= start + 2 * mmap.PAGESIZE:
            return
        spos, epos = start & self._mask, end & self._mask
        spans = [(spos, epos)] if spos < epos else [(spos, self._cap), (0, epos)]
        page = mmap.PAGESIZE
        for a, b in spans:
            lo = -(-(HEADER_BYTES + a) // page) * page
            hi = (HEADER_BYTES + b) // page * page
            if hi > lo:
                try:
                    self._mem.madvise(mmap.MADV_REMOVE, lo, hi - lo)
                except OSError:
                    self._release = False  # not shmem here: stop trying
                    return

    def clear_writer(self) -> None:
        """Consume a pending space-available wake-up (call before retrying puts)."""
        self._check()
        _drain_fd(self._wfd)

    def wait_writable(self, timeout: float | None = None, size: int = 0) -> bool:
        """Block until a ``size``-byte record fits or the consumer freed space.

        True when a put may now succeed (retry it), False on timeout.
        """
        self._check()
        if size > self._cap - 8:
            raise ValueError(f"record of {size} bytes can never fit a ring of {self._cap}")
        need = 8 + ((size + 7) & ~7)
        hdr = self._hdr
        if self._cap - (hdr[_W_HEAD] - hdr[_W_TAIL]) >= need:
            return True
        hdr[_W_WRITER_WAITING] = 1
        _full_fence()
        if self._cap - (hdr[_W_HEAD] - hdr[_W_TAIL]) >= need:
            return True
        if _wait_fd(self._wfd, timeout):
            _drain_fd(self._wfd)
            return True
        return False

    # -- consumer -----------------------------------------------------------

    def get(self) -> bytes | None:
        """Take the oldest record, or None when the ring is empty."""
        self._check()
        hdr = self._hdr
        tail = hdr[_W_TAIL]  # our own counter
        head = hdr[_W_HEAD]  # acquire
        if head == tail:
            hdr[_W_READER_WAITING] = 1
            _full_fence()
            head = hdr[_W_HEAD]
            if head == tail:
                return None
        pos = tail & self._mask
        n = self._words[pos >> 3]
        need = 8 + ((n + 7) & ~7)
        if n > self._cap - 8 or need > head - tail:
            raise RuntimeError(f"ring corrupted: record length {n} at {tail}")
        start = (pos + 8) & self._mask
        first = self._cap - start
        data_mv = self._data
        if n <= first:
            out = bytes(data_mv[start : start + n])
        else:
            out = bytes(data_mv[start:]) + bytes(data_mv[: n - first])
        hdr[_W_TAIL] = tail + need  # release: the copy is done before this
        _full_fence()
        if hdr[_W_WRITER_WAITING]:
            hdr[_W_WRITER_WAITING] = 0
            _signal(self._wfd)
        return out

    def clear_reader(self) -> None:
        """Consume a pending wake-up; call it *before* draining with get()."""
        self._check()
        _drain_fd(self._rfd)

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Block until a record may be available (True) or timeout (False).

        Consumes the wake-up it returns on: drain with get() afterwards.
        """
        self._check()
        hdr = self._hdr
        if hdr[_W_HEAD] != hdr[_W_TAIL]:
            return True
        hdr[_W_READER_WAITING] = 1
        _full_fence()
        if hdr[_W_HEAD] != hdr[_W_TAIL]:
            return True
        if _wait_fd(self._rfd, timeout):
            _drain_fd(self._rfd)
            return True
        return False

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Release this process's view (and, for the creator, mapping and fds)."""
        if self._closed:
            return
        self._closed = True
        self._words.release()
        self._data.release()
        self._hdr.release()
        if self._owner:
            self._mem.close()
            os.close(self._rfd)
            os.close(self._wfd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"used={self.used()}"
        return f"<{type(self).__module__}.Ring capacity={self._cap} {state}>"

    def _check(self) -> None:
        if self._closed:
            raise ValueError("ring is closed")


def map_write_log(capacity: int, path: str | None = None) -> mmap.mmap:
    """The shared memory of a write log of ``capacity`` ids (both twins of
    :class:`WriteLog`): anonymous, or the file ``path`` (made anew, 0600),
    mapped shared: what a worker noted outlives a kill -9 of the supervisor
    and its workers together, for the next start's recovery (read_write_logs)."""
    if capacity < 1:
        raise ValueError(f"capacity must be positive, not {capacity}")
    size = 8 * (capacity + 1)
    if path is None:
        return mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        # Its blocks taken now: a page first written on a full disk would
        # kill the worker (SIGBUS); a disk that has no room fails here.
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


class WriteLog:
    """The ids of the messages a worker has begun to write to a receiver, in
    memory shared with its supervisor (``mmap(MAP_SHARED | MAP_ANONYMOUS)``,
    made before ``fork()``): the worker notes each one (:meth:`mark`) before
    its bytes go out (a DATA's 354 answered, a BDAT LAST, a provider's
    request), so a worker killed -9 leaves, for the supervisor, what may have
    reached a receiver (an attempt of unknown outcome) apart from what no
    receiver was sent (given back with no attempt).

    Layout: i64 count of ids ever noted, then ``capacity`` i64 slots, the id
    noted as the n-th (from 0) at slot ``n % capacity``: the last
    ``capacity`` are kept. One writer (the worker); the supervisor reads it
    once the worker is dead (:meth:`written`), and reads :attr:`count` as it
    hands mail over (an id handed at count h was written, if at all, at a
    count >= h: kept when h >= count - capacity)."""

    def __init__(self, capacity: int = WRITE_LOG_IDS, path: str | None = None) -> None:
        # path: the log is that file (map_write_log).
        self.capacity = capacity
        self._mem = map_write_log(capacity, path)
        self._v = memoryview(self._mem).cast("q")

    @property
    def count(self) -> int:
        """Ids noted so far (written)."""
        return int(self._v[0])

    def mark(self, tag: object) -> None:
        """Note the id(s) of an envelope's ``tag`` (an int, or a list of them: a
        grouped envelope) as written; the slot first, then the count."""
        v, cap = self._v, self.capacity
        n = v[0]
        if type(tag) is int:
            v[1 + n % cap] = tag
            v[0] = n + 1
            return
        if isinstance(tag, list):
            for t in tag:
                if isinstance(t, int):
                    v[1 + n % cap] = t
                    n += 1
            v[0] = n

    def written(self) -> tuple[set[int], int]:
        """(the ids kept, the count from which they are all kept): every id noted
        at a count >= the second is in the first."""
        v, cap = self._v, self.capacity
        n = int(v[0])
        if n <= cap:
            return set(v[1 : 1 + n]), 0
        return set(v[1:]), n - cap  # (every slot holds one of the last cap)

    def close(self) -> None:
        self._v.release()
        self._mem.close()


# A spool's write logs (WriteLog files) of the process supervising it: one file
# per worker started (``<n>.log``), and ``run``, the boot they were made in, written
# before the first of them: the next start's recovery trusts them only then.
WRITE_LOG_RUN = "run"


def _boot() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def read_write_logs(directory: str) -> set[int] | None:
    """The ids the workers of the last process supervising a spool noted in their
    write logs in ``directory`` (files of :class:`WriteLog`, kept by a kill -9 of
    it all), or None when they may not hold every one: no ``run`` note of this
    boot (a power loss or a reboot may have lost pages; a version that kept no
    logs), or a log that went round (its oldest ids overwritten)."""
    try:
        with open(os.path.join(directory, WRITE_LOG_RUN)) as f:
            boot = f.read().strip()
        names = os.listdir(directory)
    except OSError:
        return None
    if not boot or boot != _boot():
        return None
    out: set[int] = set()
    for name in names:
        if not name.endswith(".log"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if len(data) < 16 or len(data) % 8:
            return None
        v = memoryview(data).cast("q")
        n, cap = int(v[0]), len(v) - 1
        if n < 0 or n > cap:
            return None  # it went round: the oldest are lost
        out.update(v[1 : 1 + n])
    return out


def clear_write_logs(directory: str) -> None:
    """Remove the write logs in ``directory`` (their ``run`` note first: cut
    short, what is left is not trusted)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, WRITE_LOG_RUN))
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


def reset_write_logs(directory: str) -> None:
    """Ready ``directory`` for the write logs of this process's workers, by the
    one process that claims (a supervisor, before its first worker starts):
    the last process's removed, then the ``run`` note of this boot. A process
    that claims without it leaves no note: its window all counts unknown."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    clear_write_logs(directory)
    tmp = os.path.join(directory, WRITE_LOG_RUN + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, _boot().encode())
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, WRITE_LOG_RUN))


WRITES: WriteLog | None = None
"""This worker's write log (set in the forked worker: ``run_worker``); None
elsewhere (tests, a supervisor). The SMTP client and the provider transports
note what they write in it."""


PyRing: Final = Ring
"""The pure-Python twin, whatever :class:`Ring` resolves to."""

PyWriteLog: Final = WriteLog
"""The pure-Python twin of :class:`WriteLog` (compiled in ``_ring.pxi``: the
SMTP client notes each message it writes, a C call, not a Python one)."""

if not TYPE_CHECKING:
    Ring = pick(PyRing)
    WriteLog = pick(PyWriteLog)
