# Compiled twin of fastsend.ring.Ring (included from _core.pyx).
#
# Same shared layout, same protocol; see the fastsend.ring module docstring
# for the layout and the memory-ordering argument. Here the ordering comes
# from GCC atomics: head/tail are loaded with __ATOMIC_ACQUIRE and stored
# with __ATOMIC_RELEASE; the sleep handshake (store flag / seq_cst fence /
# load the other side's counter) uses __atomic_thread_fence(__ATOMIC_SEQ_CST).
# Each counter has exactly one writing process, so there are no RMW atomics.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.stdint cimport uint64_t
from libc.errno cimport errno, EINTR
from libc.string cimport memcpy
from posix.mman cimport madvise, MADV_REMOVE

import mmap as _ring_mmap
import os as _ring_os
import time as _ring_time

cdef extern from *:
    """
    #include <stdint.h>
    #include <errno.h>
    #include <poll.h>
    #include <unistd.h>

    static inline uint64_t fs_ring_load_acquire(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline uint64_t fs_ring_load_relaxed(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void fs_ring_store_release(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void fs_ring_store_relaxed(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    static inline void fs_ring_fence(void) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    /* eventfd signal: 0 or -1 with errno. EAGAIN (counter at its maximum)
       means the fd is already readable, which is all a signal promises. */
    static int fs_ring_signal(int fd) {
        uint64_t one = 1;
        ssize_t r;
        do { r = write(fd, &one, sizeof one); } while (r < 0 && errno == EINTR);
        return (r == (ssize_t)sizeof one || (r < 0 && errno == EAGAIN)) ? 0 : -1;
    }
    /* Reset a nonblocking eventfd to zero; nothing pending is not an error. */
    static int fs_ring_drain(int fd) {
        uint64_t v;
        ssize_t r;
        do { r = read(fd, &v, sizeof v); } while (r < 0 && errno == EINTR);
        return (r == (ssize_t)sizeof v || (r < 0 && errno == EAGAIN)) ? 0 : -1;
    }
    /* 1 readable, 0 timeout, -1 error (errno; EINTR left to the caller). */
    static int fs_ring_poll(int fd, int timeout_ms) {
        struct pollfd p;
        int r;
        p.fd = fd; p.events = POLLIN; p.revents = 0;
        r = poll(&p, 1, timeout_ms);
        return r > 0 ? 1 : r;
    }
    """
    uint64_t fs_ring_load_acquire(const uint64_t *p) nogil
    uint64_t fs_ring_load_relaxed(const uint64_t *p) nogil
    void fs_ring_store_release(uint64_t *p, uint64_t v) nogil
    void fs_ring_store_relaxed(uint64_t *p, uint64_t v) nogil
    void fs_ring_fence() nogil
    int fs_ring_signal(int fd) nogil
    int fs_ring_drain(int fd) nogil
    int fs_ring_poll(int fd, int timeout_ms) nogil


cdef enum:
    _RING_HEADER = 256
    _RING_RELEASE_EVERY = 4 << 20  # bytes produced between releases of free pages
    _RING_RELEASE_SLACK = 1 << 20  # free space right after head kept (written soon)
    _RING_MIN_CAPACITY = 64
_RING_MAX_CAPACITY = 1 << 40
cdef uint64_t _RING_MAGIC = 0x3130474E49525346ULL  # b"FSRING01", native LE u64


cdef inline uint64_t _ring_need(uint64_t n) noexcept nogil:
    return 8 + ((n + 7) & ~(<uint64_t>7))


cdef int _ring_wait_fd(int fd, object timeout) except -1:
    """Poll fd for readability with EINTR handling; 1 readable, 0 timeout."""
    cdef int r, ms
    cdef double deadline = 0.0, left
    if timeout is None or timeout < 0:
        ms = -1
    else:
        left = <double>timeout
        deadline = _ring_time.monotonic() + left
        ms = <int>(left * 1000.0)
        if ms < left * 1000.0:
            ms += 1
    while True:
        with nogil:
            r = fs_ring_poll(fd, ms)
        if r >= 0:
            return r
        if errno == EINTR:
            PyErr_CheckSignals()
            if ms >= 0:
                left = deadline - _ring_time.monotonic()
                if left <= 0:
                    return 0
                ms = <int>(left * 1000.0) + 1
            continue
        PyErr_SetFromErrno(OSError)
        return -1


cdef class Ring:
    """A single-producer single-consumer ring of byte records in shared memory.

    Compiled twin of :class:`fastsend.ring.PyRing`; same layout and protocol.
    """

    cdef object _mem
    cdef Py_buffer _view
    cdef bint _have_view
    cdef unsigned char *_data
    cdef uint64_t *_head
    cdef uint64_t *_tail
    cdef uint64_t *_reader_waiting
    cdef uint64_t *_writer_waiting
    cdef uint64_t _cap
    cdef uint64_t _mask
    cdef int _rfd
    cdef int _wfd
    cdef bint _owner
    cdef bint _closed
    cdef bint _release
    cdef uint64_t _page

    def __cinit__(self, *args, **kwargs):
        self._have_view = False
        self._closed = True
        self._rfd = -1
        self._wfd = -1

    def __init__(self, capacity_bytes):
        cdef object cap = _ring_capacity(capacity_bytes)
        mem = _ring_mmap.mmap(-1, _RING_HEADER + cap, flags=_ring_mmap.MAP_SHARED)
        hdr = memoryview(mem)[:_RING_HEADER].cast("Q")
        hdr[1] = cap
        hdr[0] = _RING_MAGIC
        hdr.release()
        flags = _ring_os.EFD_NONBLOCK | _ring_os.EFD_CLOEXEC
        rfd = _ring_os.eventfd(0, flags)
        wfd = _ring_os.eventfd(0, flags)
        self._setup(mem, rfd, wfd, True)

    @classmethod
    def attach(cls, memory, int reader_fd, int writer_fd):
        """A ring over another Ring's mapping and eventfds (of either twin).

        The new object owns nothing: its close() leaves the mapping and fds
        to the ring it was attached to. Close it before that ring (it holds
        a buffer export of the mapping, which mmap.close() refuses).
        """
        cdef Ring self = cls.__new__(cls)
        self._setup(memory, reader_fd, writer_fd, False)
        return self

    cdef int _setup(self, object mem, int rfd, int wfd, bint owner) except -1:
        cdef uint64_t *words
        cdef uint64_t cap
        PyObject_GetBuffer(mem, &self._view, PyBUF_WRITABLE)
        self._have_view = True
        if self._view.len < _RING_HEADER + _RING_MIN_CAPACITY:
            self._release_view()
            raise ValueError("mapping too small for a ring")
        words = <uint64_t *>self._view.buf
        cap = words[1]
        if words[0] != _RING_MAGIC or (cap & (cap - 1)) or cap < _RING_MIN_CAPACITY \
                or <uint64_t>self._view.len < _RING_HEADER + cap:
            self._release_view()
            raise ValueError("not a fastsend ring mapping")
        self._mem = mem
        self._head = words + 8
        self._tail = words + 16
        self._reader_waiting = words + 24
        self._writer_waiting = words + 25
        self._data = (<unsigned char *>self._view.buf) + _RING_HEADER
        self._cap = cap
        self._mask = cap - 1
        self._rfd = rfd
        self._wfd = wfd
        self._owner = owner
        self._closed = False
        self._page = _ring_mmap.PAGESIZE
        self._release = cap >= 2 * _RING_RELEASE_EVERY
        return 0

    cdef void _release_view(self) noexcept:
        if self._have_view:
            self._have_view = False
            PyBuffer_Release(&self._view)

    def __dealloc__(self):
        self._release_view()

    # -- properties ---------------------------------------------------------

    @property
    def capacity(self):
        """Bytes of record space (a power of two)."""
        return self._cap

    @property
    def max_record(self):
        """The largest payload that can ever fit (``capacity - 8``)."""
        return self._cap - 8

    @property
    def reader_fd(self):
        """eventfd readable when records may be waiting (consumer side)."""
        return self._rfd

    @property
    def writer_fd(self):
        """eventfd readable when space was freed after a full put (producer side)."""
        return self._wfd

    @property
    def memory(self):
        """The shared mapping (for :meth:`attach`)."""
        return self._mem

    @property
    def closed(self):
        return bool(self._closed)

    cdef inline int _check(self) except -1:
        if self._closed:
            raise ValueError("ring is closed")
        return 0

    def used(self):
        """Bytes currently held, framing included (a snapshot; either side)."""
        self._check()
        return fs_ring_load_acquire(self._head) - fs_ring_load_acquire(self._tail)

    # -- producer -----------------------------------------------------------

    cdef int _put(self, const unsigned char *src, uint64_t n) except -1:
        """1 stored, 0 no room now. The size was checked by the caller."""
        cdef uint64_t need = _ring_need(n)
        cdef uint64_t head = fs_ring_load_relaxed(self._head)  # our own counter
        cdef uint64_t tail = fs_ring_load_acquire(self._tail)
        cdef uint64_t pos, start, first
        if self._cap - (head - tail) < need:
            fs_ring_store_relaxed(self._writer_waiting, 1)
            fs_ring_fence()
            tail = fs_ring_load_acquire(self._tail)
            if self._cap - (head - tail) < need:
                return 0
        pos = head & self._mask
        (<uint64_t *>(self._data + pos))[0] = n
        start = (pos + 8) & self._mask
        first = self._cap - start
        if n <= first:
            memcpy(self._data + start, src, n)
        else:
            memcpy(self._data + start, src, first)
            memcpy(self._data, src + first, n - first)
        fs_ring_store_release(self._head, head + need)
        fs_ring_fence()
        if self._release and (head + need) // _RING_RELEASE_EVERY != head // _RING_RELEASE_EVERY:
            self._release_free(head + need, tail)
        if fs_ring_load_relaxed(self._reader_waiting):
            fs_ring_store_relaxed(self._reader_waiting, 0)
            if fs_ring_signal(self._rfd) < 0:
                PyErr_SetFromErrno(OSError)
                return -1
        return 1

    cdef void _release_free(self, uint64_t head, uint64_t tail) noexcept:
        """Give the pages of free space far ahead of the producer back to the
        kernel (MADV_REMOVE: shared anonymous memory), so a ring whose records
        have passed through all of it does not keep it all resident. Only the
        producer writes free space and the consumer never reads it, so this is
        safe without coordination; a page written again is faulted in zeroed."""
        cdef uint64_t start = head + _RING_RELEASE_SLACK, end = tail + self._cap
        cdef uint64_t a, b, spos, epos
        if end <= start + 2 * self._page:
            return
        spos = start & self._mask
        epos = end & self._mask
        if spos < epos:
            self._punch(spos, epos)
        else:
            self._punch(spos, self._cap)
            self._punch(0, epos)

    cdef void _punch(self, uint64_t a, uint64_t b) noexcept:
        cdef uint64_t page = self._page
        cdef uint64_t base = <uint64_t>self._view.buf
        cdef uint64_t lo = (base + _RING_HEADER + a + page - 1) // page * page
        cdef uint64_t hi = (base + _RING_HEADER + b) // page * page
        if hi > lo and madvise(<void *>lo, hi - lo, MADV_REMOVE) != 0:
            self._release = False  # not shmem here: stop trying

    def put(self, data):
        """Append one record. False if it does not fit now; ValueError if never."""
        cdef Py_buffer view
        cdef int r
        cdef Py_ssize_t n
        self._check()
        if PyBytes_CheckExact(data):
            n = PyBytes_GET_SIZE(data)
            if <uint64_t>n > self._cap - 8:
                raise ValueError(f"record of {n} bytes can never fit a ring of {self._cap}")
            r = self._put(<const unsigned char *>PyBytes_AS_STRING(data), <uint64_t>n)
            return r == 1
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len > self._cap - 8:
                raise ValueError(
                    f"record of {view.len} bytes can never fit a ring of {self._cap}")
            r = self._put(<const unsigned char *>view.buf, <uint64_t>view.len)
        finally:
            PyBuffer_Release(&view)
        return r == 1

    def clear_writer(self):
        """Consume a pending space-available wake-up (call before retrying puts)."""
        self._check()
        if fs_ring_drain(self._wfd) < 0:
            PyErr_SetFromErrno(OSError)

    def wait_writable(self, timeout=None, size=0):
        """Block until a ``size``-byte record fits or the consumer freed space.

        True when a put may now succeed (retry it), False on timeout.
        """
        cdef uint64_t need
        self._check()
        if size > self._cap - 8:
            raise ValueError(f"record of {size} bytes can never fit a ring of {self._cap}")
        need = _ring_need(<uint64_t>size)
        if self._cap - (fs_ring_load_relaxed(self._head) - fs_ring_load_acquire(self._tail)) >= need:
            return True
        fs_ring_store_relaxed(self._writer_waiting, 1)
        fs_ring_fence()
        if self._cap - (fs_ring_load_relaxed(self._head) - fs_ring_load_acquire(self._tail)) >= need:
            return True
        if _ring_wait_fd(self._wfd, timeout):
            fs_ring_drain(self._wfd)
            return True
        return False

    # -- consumer -----------------------------------------------------------

    def get(self):
        """Take the oldest record, or None when the ring is empty."""
        cdef uint64_t tail, head, pos, n, need, start, first
        cdef unsigned char *dst
        self._check()
        tail = fs_ring_load_relaxed(self._tail)  # our own counter
        head = fs_ring_load_acquire(self._head)
        if head == tail:
            fs_ring_store_relaxed(self._reader_waiting, 1)
            fs_ring_fence()
            head = fs_ring_load_acquire(self._head)
            if head == tail:
                return None
        pos = tail & self._mask
        n = (<uint64_t *>(self._data + pos))[0]
        need = _ring_need(n)
        if n > self._cap - 8 or need > head - tail:
            raise RuntimeError(f"ring corrupted: record length {n} at {tail}")
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
        dst = <unsigned char *>PyBytes_AS_STRING(out)
        start = (pos + 8) & self._mask
        first = self._cap - start
        if n <= first:
            memcpy(dst, self._data + start, n)
        else:
            memcpy(dst, self._data + start, first)
            memcpy(dst + first, self._data, n - first)
        fs_ring_store_release(self._tail, tail + need)
        fs_ring_fence()
        if fs_ring_load_relaxed(self._writer_waiting):
            fs_ring_store_relaxed(self._writer_waiting, 0)
            if fs_ring_signal(self._wfd) < 0:
                PyErr_SetFromErrno(OSError)
        return out

    def clear_reader(self):
        """Consume a pending wake-up; call it *before* draining with get()."""
        self._check()
        if fs_ring_drain(self._rfd) < 0:
            PyErr_SetFromErrno(OSError)

    def wait_readable(self, timeout=None):
        """Block until a record may be available (True) or timeout (False).

        Consumes the wake-up it returns on: drain with get() afterwards.
        """
        self._check()
        if fs_ring_load_acquire(self._head) != fs_ring_load_relaxed(self._tail):
            return True
        fs_ring_store_relaxed(self._reader_waiting, 1)
        fs_ring_fence()
        if fs_ring_load_acquire(self._head) != fs_ring_load_relaxed(self._tail):
            return True
        if _ring_wait_fd(self._rfd, timeout):
            fs_ring_drain(self._rfd)
            return True
        return False

    # -- lifetime -----------------------------------------------------------

    def close(self):
        """Release this process's view (and, for the creator, mapping and fds)."""
        if self._closed:
            return
        self._closed = True
        self._release_view()
        if self._owner:
            self._mem.close()
            _ring_os.close(self._rfd)
            _ring_os.close(self._wfd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"used={self.used()}"
        return f"<fastsend._core.Ring capacity={self._cap} {state}>"


def _ring_capacity(capacity_bytes):
    """The data capacity a ``Ring(capacity_bytes)`` gets: the next power of two."""
    capacity_bytes = int(capacity_bytes)
    if capacity_bytes < 1:
        raise ValueError(f"capacity must be positive, not {capacity_bytes}")
    cap = max(_RING_MIN_CAPACITY, 1 << (capacity_bytes - 1).bit_length())
    if cap > _RING_MAX_CAPACITY:
        raise ValueError(f"capacity {capacity_bytes} exceeds {_RING_MAX_CAPACITY}")
    return cap


cdef class WriteLog:
    """Compiled twin of :class:`fastsend.ring.PyWriteLog` (same layout: i64
    count, then ``capacity`` i64 slots; the n-th id noted at slot
    ``n % capacity``): the SMTP client notes each message it begins to write
    (``on_body``), per message, so a C call, not a Python one."""

    cdef object _mem
    cdef Py_buffer _view
    cdef bint _have_view
    cdef long long *_v
    cdef long long _cap
    cdef public object capacity

    def __cinit__(self, *args, **kwargs):
        self._have_view = False
        self._v = NULL

    def __init__(self, capacity=1 << 18, path=None):  # (fastsend.ring.WRITE_LOG_IDS)
        from fastsend.ring import map_write_log  # (anonymous, or the file path)

        self._mem = map_write_log(capacity, path)
        self.capacity = capacity
        self._cap = capacity
        PyObject_GetBuffer(self._mem, &self._view, PyBUF_WRITABLE)
        self._have_view = True
        self._v = <long long *>self._view.buf

    def __dealloc__(self):
        if self._have_view:
            PyBuffer_Release(&self._view)
            self._have_view = False

    cdef inline int _live(self) except -1:
        if self._v == NULL:
            raise ValueError("write log is closed")
        return 0

    @property
    def count(self):
        """Ids noted so far (written)."""
        self._live()
        return self._v[0]

    def mark(self, tag):
        """Note the id(s) of an envelope's ``tag`` (an int, or a list of them: a
        grouped envelope) as written; the slot first, then the count."""
        cdef long long n
        cdef long long *v = self._v
        if v == NULL:
            self._live()
        n = v[0]
        if type(tag) is int:
            v[1 + n % self._cap] = tag
            v[0] = n + 1
            return
        if isinstance(tag, list):
            for t in <list>tag:
                if isinstance(t, int):
                    v[1 + n % self._cap] = t
                    n += 1
            v[0] = n

    def written(self):
        """(the ids kept, the count from which they are all kept): every id noted
        at a count >= the second is in the first."""
        self._live()
        cdef long long n = self._v[0]
        cdef long long i
        cdef long long upto = n if n <= self._cap else self._cap
        ids = {self._v[1 + i] for i in range(upto)}
        return ids, (0 if n <= self._cap else n - self._cap)

    def close(self):
        if self._have_view:
            PyBuffer_Release(&self._view)
            self._have_view = False
        self._v = NULL
        if self._mem is not None:
            self._mem.close()
            self._mem = None
