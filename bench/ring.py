"""Records per second through a ring across fork(): compiled vs pure-Python vs mp.Queue.

A forked child produces, the parent consumes and checks every record's
sequence number (in order) and length. For each record size (200 B: a small
batch; 20 KB: a large one) it measures, best of ``--rounds``:

- ``c``:   fastsend._core.Ring (compiled twin), blocking via wait_readable /
           wait_writable (eventfd wake-ups only when a side runs dry/full);
- ``py``:  fastsend.ring.PyRing (pure-Python twin), same protocol;
- ``mpq``: the baseline, ``multiprocessing.Queue`` (fork context), one record
           per put, the way the supervisor would use it without rings.

It also prints how many consumer sleeps (wake-ups) each ring took, i.e. how
many eventfd system calls the flagged protocol saved, and the raw cost of one
eventfd write.

    python bench/ring.py [--rounds 3] [--scale 1.0] [--capacity 1048576]

Exits 2 when a figure cannot be measured (a child failed, a record arrived
out of order, or a rate is zero).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import sys
import time
from typing import Any

import Cython
from _common import machine

from fastsend import _accel
from fastsend.ring import PyRing

SEQ = struct.Struct("<Q")


class Unmeasurable(Exception):
    pass


def make_records(size: int, distinct: int = 64) -> list[bytes]:
    base = os.urandom(size)
    return [base[:-8] + SEQ.pack(i) for i in range(distinct)] if size >= 8 else [base] * distinct


def run_ring(cls: Any, size: int, count: int, capacity: int) -> tuple[float, int]:
    """(records/s, consumer sleeps) for one producer->consumer run across fork."""
    ring = cls(capacity)
    records = make_records(size)
    nrec = len(records)
    ring.get()  # arm the reader flag before the producer starts
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            put, wait = ring.put, ring.wait_writable
            for i in range(count):
                rec = SEQ.pack(i) + records[i % nrec][8:]
                while not put(rec):
                    if not wait(30.0, size):
                        os._exit(3)
            code = 0
        finally:
            os._exit(code)
    got = sleeps = 0
    get, wait_r = ring.get, ring.wait_readable
    try:
        while got < count:
            rec = get()
            if rec is None:
                sleeps += 1
                if not wait_r(30.0):
                    raise Unmeasurable(f"{cls.__name__}: producer stalled at {got}")
                continue
            if len(rec) != size or SEQ.unpack_from(rec)[0] != got:
                raise Unmeasurable(f"{cls.__name__}: record {got} corrupted or out of order")
            got += 1
        elapsed = time.perf_counter() - t0
    finally:
        _, status = os.waitpid(pid, 0)
        ring.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise Unmeasurable(f"{cls.__name__}: producer exited with {status}")
    return count / elapsed, sleeps


def _mpq_child(q: Any, size: int, count: int) -> None:
    records = make_records(size)
    nrec = len(records)
    for i in range(count):
        q.put(SEQ.pack(i) + records[i % nrec][8:])


def run_mpq(size: int, count: int) -> float:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    t0 = time.perf_counter()
    p = ctx.Process(target=_mpq_child, args=(q, size, count))
    p.start()
    for i in range(count):
        rec = q.get(timeout=30.0)
        if len(rec) != size or SEQ.unpack_from(rec)[0] != i:
            raise Unmeasurable(f"mp.Queue: record {i} corrupted or out of order")
    elapsed = time.perf_counter() - t0
    p.join(30.0)
    if p.exitcode != 0:
        raise Unmeasurable(f"mp.Queue: producer exited with {p.exitcode}")
    return count / elapsed


def eventfd_write_ns(n: int = 200_000) -> float:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            os.eventfd_write(fd, 1)
        return (time.perf_counter_ns() - t0) / n
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply record counts")
    ap.add_argument("--capacity", type=int, default=1 << 20, help="ring bytes")
    args = ap.parse_args()

    if not _accel.HAVE_EXTENSIONS:
        print("fastsend._core is not built: cannot measure the compiled ring", file=sys.stderr)
        return 2
    CRing = _accel.compiled("Ring")
    print(f"machine: {machine()}, Cython {Cython.__version__}")
    print(
        f"settings: ring capacity {args.capacity} B, best of {args.rounds} rounds, "
        f"fork context, consumer = parent, producer = child"
    )
    # Record counts per (size, impl): about a second each on a 2-core machine.
    counts = {
        200: {"c": 1_000_000, "py": 300_000, "mpq": 100_000},
        20_000: {"c": 60_000, "py": 40_000, "mpq": 20_000},
    }
    failed = False
    for size, per in counts.items():
        best: dict[str, float] = {"c": 0.0, "py": 0.0, "mpq": 0.0}
        sleeps: dict[str, int] = {"c": 0, "py": 0}
        for _ in range(args.rounds):  # interleaved: a noisy neighbour hurts all alike
            for impl, cls in (("c", CRing), ("py", PyRing)):
                n = max(1000, int(per[impl] * args.scale))
                try:
                    rate, s = run_ring(cls, size, n, args.capacity)
                except Unmeasurable as e:
                    print(f"UNMEASURABLE: {e}", file=sys.stderr)
                    failed = True
                    continue
                if rate > best[impl]:
                    best[impl], sleeps[impl] = rate, s
            try:
                best["mpq"] = max(
                    best["mpq"], run_mpq(size, max(1000, int(per["mpq"] * args.scale)))
                )
            except Unmeasurable as e:
                print(f"UNMEASURABLE: {e}", file=sys.stderr)
                failed = True
        if min(best.values()) <= 0.0:
            failed = True
            continue
        mb = size / 1e6
        print(f"\n{size} B records:")
        for impl, label in (
            ("c", "fastsend Ring (compiled)"),
            ("py", "fastsend Ring (pure-Python)"),
            ("mpq", "multiprocessing.Queue (baseline)"),
        ):
            extra = ""
            if impl in sleeps:
                n = max(1000, int(per[impl] * args.scale))
                extra = f"  consumer sleeps {sleeps[impl]} ({sleeps[impl] / n:.4f}/record)"
            print(f"  {label:34s} {best[impl]:>12,.0f} rec/s {best[impl] * mb:>9,.1f} MB/s{extra}")
        print(
            f"  ratios: compiled/mpq {best['c'] / best['mpq']:.1f}x, "
            f"pure/mpq {best['py'] / best['mpq']:.1f}x, compiled/pure {best['c'] / best['py']:.1f}x"
        )
    print(f"\none eventfd write (the signal a sleeping side gets): {eventfd_write_ns():.0f} ns")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
