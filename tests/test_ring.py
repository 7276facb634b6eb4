"""fastsend.ring: both twins (``impl``), across real fork(), with real event loops."""

from __future__ import annotations

import asyncio
import os
import select
import struct
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsend import _accel
from fastsend.ring import HEADER_BYTES, PyRing

N_FORK_RECORDS = 100_000
_POOL = bytes(range(256)) * 64 + os.urandom(4096)  # payload source, sliced per record


def ring_class(impl: str) -> Any:
    return PyRing if impl == "py" else _accel.compiled("Ring")


@pytest.fixture
def make_ring(impl: str) -> Iterator[Callable[[int], Any]]:
    made: list[Any] = []

    def _make(capacity: int) -> Any:
        r = ring_class(impl)(capacity)
        made.append(r)
        return r

    yield _make
    for r in made:
        r.close()


def readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def payload(seq: int) -> bytes:
    size = (seq * 37) % 700
    start = (seq * 7919) % (len(_POOL) - 700)
    return _POOL[start : start + size]


def record(seq: int) -> bytes:
    body = payload(seq)
    return struct.pack("<QI", seq, zlib.crc32(body)) + body


def check_record(seq: int, rec: bytes) -> None:
    got_seq, crc = struct.unpack_from("<QI", rec)
    assert got_seq == seq, f"out of order: expected {seq}, got {got_seq}"
    assert zlib.crc32(rec[12:]) == crc, f"bad checksum on record {seq}"
    assert rec[12:] == payload(seq)


def fork_producer(ring: Any, count: int, first: int = 0) -> int:
    """Fork a child that puts records first..first+count-1 then exits."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            for seq in range(first, first + count):
                rec = record(seq)
                while not ring.put(rec):
                    if not ring.wait_writable(10.0, len(rec)):
                        os._exit(3)  # consumer stuck: let the parent's assertion say so
            code = 0
        finally:
            os._exit(code)
    return pid


def reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def consume_blocking(ring: Any, count: int, first: int = 0) -> None:
    seq = first
    while seq < first + count:
        rec = ring.get()
        if rec is None:
            assert ring.wait_readable(10.0), f"no wake-up after record {seq - 1}"
            continue
        check_record(seq, rec)
        seq += 1
    assert ring.get() is None


# -- single-process behaviour ------------------------------------------------


def test_capacity_rounds_up_to_power_of_two(make_ring: Callable[[int], Any]) -> None:
    assert make_ring(1).capacity == 64
    assert make_ring(1000).capacity == 1024
    r = make_ring(4096)
    assert r.capacity == 4096
    assert r.max_record == 4096 - 8
    assert len(r.memory) == HEADER_BYTES + 4096
    with pytest.raises(ValueError):
        make_ring(0)


def test_put_get_roundtrip_and_types(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(256)
    assert r.get() is None
    for data in (b"", b"a", b"x" * 13, bytearray(b"ba"), memoryview(b"mv-bytes")):
        assert r.put(data) is True
        assert r.get() == bytes(data)
    assert r.get() is None
    assert r.used() == 0


def test_record_larger_than_capacity_raises(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(128)
    assert r.put(b"\0" * r.max_record)  # the largest record fits an empty ring
    assert r.used() == r.capacity
    assert r.get() == b"\0" * r.max_record
    with pytest.raises(ValueError):
        r.put(b"\0" * (r.max_record + 1))
    with pytest.raises(ValueError):
        r.put(bytearray(1000))
    with pytest.raises(ValueError):
        r.wait_writable(0, r.max_record + 1)


def test_full_and_empty_edges(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(64)  # 64 bytes: 4 records of 8-byte payload (8 + 8 each)
    for i in range(4):
        assert r.put(bytes([i]) * 8)
    assert r.used() == 64
    assert r.put(b"") is False  # even an empty record needs 8 bytes of framing
    assert r.wait_writable(0) is False
    assert r.get() == b"\0" * 8
    assert r.put(b"\4" * 9) is False  # 9 bytes pad to 16 + 8 > 16 free
    assert r.put(b"\4" * 8) is True  # wraps to the start
    assert [r.get() for _ in range(5)] == [bytes([i]) * 8 for i in (1, 2, 3, 4)] + [None]
    assert r.used() == 0


def test_payload_wraps_past_the_end(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(64)
    assert r.put(b"a" * 40)  # occupies 48 bytes: next header at 48
    assert r.get() == b"a" * 40
    wrapped = bytes(range(48))  # header at 48, payload 56..64 then 0..40
    assert r.put(wrapped)
    assert r.get() == wrapped


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cap_exp=st.integers(min_value=6, max_value=10),
    ops=st.lists(
        st.one_of(st.integers(min_value=0, max_value=1100), st.just(-1)),
        min_size=1,
        max_size=200,
    ),
)
def test_matches_a_fifo_model(impl: str, cap_exp: int, ops: list[int]) -> None:
    """Random puts (sizes) and gets (-1) agree with a deque and byte accounting."""
    with ring_class(impl)(1 << cap_exp) as r:
        model: deque[bytes] = deque()
        used = 0
        for k, op in enumerate(ops):
            if op < 0:
                got = r.get()
                if model:
                    want = model.popleft()
                    used -= 8 + ((len(want) + 7) & ~7)
                    assert got == want
                else:
                    assert got is None
                continue
            data = bytes([k % 251]) * op
            need = 8 + ((op + 7) & ~7)
            if op > r.max_record:
                with pytest.raises(ValueError):
                    r.put(data)
            elif r.capacity - used >= need:
                assert r.put(data) is True
                model.append(data)
                used += need
            else:
                assert r.put(data) is False
            assert r.used() == used
        while model:
            assert r.get() == model.popleft()
        assert r.get() is None


def test_closed_ring_refuses(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(64)
    r.close()
    assert r.closed
    r.close()  # idempotent
    with pytest.raises(ValueError):
        r.put(b"x")
    with pytest.raises(ValueError):
        r.get()
    assert "closed" in repr(r)


def test_attach_rejects_foreign_mapping(impl: str) -> None:
    import mmap

    m = mmap.mmap(-1, 4096)
    with pytest.raises(ValueError):
        ring_class(impl).attach(m, -1, -1)
    m.close()


# -- wake-ups --------------------------------------------------------------


def test_reader_signalled_only_when_consumer_waits(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(256)
    assert r.put(b"1")  # consumer never said it was waiting: no system call
    assert not readable(r.reader_fd)
    assert r.get() == b"1"
    assert r.get() is None  # ran dry: raises reader_waiting
    assert r.put(b"2")
    assert readable(r.reader_fd)
    r.clear_reader()
    assert not readable(r.reader_fd)
    assert r.put(b"3")  # flag was consumed by the signal: no second signal
    assert not readable(r.reader_fd)
    assert r.wait_readable(0) is True
    assert [r.get(), r.get(), r.get()] == [b"2", b"3", None]
    assert r.wait_readable(0) is False
    assert r.wait_readable(0.01) is False


def test_writer_signalled_after_full_put(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(64)
    while r.put(b"z" * 24):
        pass
    assert not readable(r.writer_fd)  # the failed put raised writer_waiting
    assert r.get() == b"z" * 24
    assert readable(r.writer_fd)
    r.clear_writer()
    assert not readable(r.writer_fd)
    assert r.wait_writable(0, 24) is True
    assert r.put(b"z" * 24)


def test_wait_readable_wakes_on_put_from_other_process(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(1024)
    assert r.get() is None
    pid = fork_producer(r, 1)
    assert r.wait_readable(10.0)
    check_record(0, r.get())
    reap(pid)


# -- across fork -----------------------------------------------------------


def test_fork_100k_records_in_order(make_ring: Callable[[int], Any]) -> None:
    r = make_ring(16 * 1024)  # small: many wraps and many full/empty sleeps
    pid = fork_producer(r, N_FORK_RECORDS)
    try:
        consume_blocking(r, N_FORK_RECORDS)
    finally:
        reap(pid)


@pytest.mark.parametrize("producer", ["py", "c"])
def test_interop_across_twins(impl: str, producer: str) -> None:
    """One shared layout: either twin's producer feeds either twin's consumer."""
    if producer == "c" and not _accel.HAVE_EXTENSIONS:
        pytest.skip("fastsend._core not built")
    owner = ring_class(producer)(4096)
    consumer = ring_class(impl).attach(owner.memory, owner.reader_fd, owner.writer_fd)
    try:
        pid = fork_producer(owner, 20_000)
        try:
            consume_blocking(consumer, 20_000)
        finally:
            reap(pid)
    finally:
        consumer.close()
        owner.close()


def test_event_loop_consumer_with_add_reader(
    make_ring: Callable[[int], Any], run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    count = 20_000
    r = make_ring(8 * 1024)
    assert r.get() is None  # arm the wake-up before the producer starts
    pid = fork_producer(r, count)

    async def consume() -> int:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        seq = 0
        wakeups = 0

        def on_readable() -> None:
            nonlocal seq, wakeups
            wakeups += 1
            r.clear_reader()  # before draining: a signal during the drain is kept
            try:
                while (rec := r.get()) is not None:
                    check_record(seq, rec)
                    seq += 1
            except AssertionError as e:
                if not done.done():
                    done.set_exception(e)
            if seq == count and not done.done():
                done.set_result(wakeups)

        loop.add_reader(r.reader_fd, on_readable)
        try:
            return await asyncio.wait_for(done, 60.0)
        finally:
            loop.remove_reader(r.reader_fd)

    try:
        wakeups = run(consume())
    finally:
        reap(pid)
    assert 1 <= wakeups <= count
    assert r.get() is None


def test_free_pages_go_back_to_the_kernel(make_ring: Callable[[int], Any]) -> None:
    """200 MB through a 32 MB ring, consumed as it goes: the producer gives back the
    free pages far ahead of it, so the ring does not stay fully resident, and
    every record still arrives intact (across wraps and released pages)."""
    import psutil

    r = make_ring(32 << 20)
    me = psutil.Process()
    base = me.memory_full_info().uss
    records = [os.urandom(100_000) for _ in range(7)]
    for i in range(2000):
        assert r.put(records[i % 7])
        assert r.get() == records[i % 7]
    grown = me.memory_full_info().uss - base
    assert grown < 12 << 20, f"ring kept {grown >> 20} MB resident"


@pytest.mark.parametrize("twin", ["py", "c"])
def test_write_log_keeps_the_last_ids_and_says_from_where(twin: str) -> None:
    """fastsend.ring.WriteLog (either twin): ids noted (ints, lists of them) are
    read back by another process (shared memory made before fork); past its
    capacity the oldest go, and ``written`` says from which count all are
    kept; closed, it refuses."""
    from fastsend.ring import PyWriteLog

    log = (PyWriteLog if twin == "py" else _accel.compiled("WriteLog"))(8)
    assert log.capacity == 8 and log.count == 0 and log.written() == (set(), 0)
    log.mark(1)
    log.mark([2, 3])
    log.mark(["not an id"])  # (a tag of no ids notes nothing)
    pid = os.fork()
    if pid == 0:
        log.mark(4)
        os._exit(0)
    os.waitpid(pid, 0)
    assert log.count == 4 and log.written() == ({1, 2, 3, 4}, 0)
    for i in range(5, 12):
        log.mark(i)
    assert log.written() == (set(range(4, 12)), 3)
    log.close()
    with pytest.raises(ValueError):
        log.mark(12)


def test_write_log_is_the_compiled_twin_when_built() -> None:
    """The worker's write log (noted per message by the SMTP client) is the
    compiled twin whenever the core is built and not switched off."""
    from fastsend import ring

    want = ring.PyWriteLog if _accel.NO_EXTENSIONS else _accel.compiled("WriteLog")
    assert ring.WriteLog is want


@pytest.mark.parametrize("twin", ["py", "c"])
def test_a_file_backed_write_log_outlives_its_process(twin: str, tmp_path: Any) -> None:
    """Either twin on a file (crash27's write logs in the spool): a child that
    notes ids and dies with no close leaves them for read_write_logs; the file
    is 0600 and its blocks are taken when it is made (not sparse)."""
    from fastsend.ring import PyWriteLog, read_write_logs, reset_write_logs

    kind = PyWriteLog if twin == "py" else _accel.compiled("WriteLog")
    where = str(tmp_path / "writes")
    reset_write_logs(where)
    log = kind(16, path=f"{where}/1.log")
    st = os.stat(f"{where}/1.log")
    assert st.st_mode & 0o777 == 0o600 and st.st_size == 8 * 17
    assert st.st_blocks * 512 >= st.st_size
    log.mark(7)
    pid = os.fork()
    if pid == 0:
        log.mark([8, 9])
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    assert log.count == 3
    assert read_write_logs(where) == {7, 8, 9}
    log.close()
    with pytest.raises(ValueError):
        kind(0, path=f"{where}/2.log")
