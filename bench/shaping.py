"""Token-bucket decisions: cost per decision (compiled vs pure-Python) and real-clock accuracy.

1. Cost: ns per ``Gcra.acquire(now)`` and per ``Limiter.acquire(key, now)``
   (1,000 (IP, site) keys, round-robin), compiled twin vs pure-Python twin,
   best of ``--rounds``; the ratio pure/compiled is printed. The clock
   advances 1 us per call against a 100,000/s bucket, so decisions mix
   allowed and refused.
2. Accuracy on the real clock: a bucket at N/s (burst 20, started empty)
   driven by ``time.monotonic()`` and ``time.sleep(wait)`` for ``--seconds``;
   prints achieved/configured (goal: within 1%).

    python bench/shaping.py [--rounds 3] [--seconds 3] [--rate 1000] [--strict]

Exits 2 when a figure cannot be measured; with ``--strict``, 1 when the
real-clock rate is off by more than 1%.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

from fastsend import _accel
from fastsend.throttle import PyGcra, PyLimiter


def gcra_ns(cls: Any, n: int) -> float:
    b = cls(100_000.0, 100)
    acquire = b.acquire
    now = 1000.0
    t0 = time.perf_counter_ns()
    for _ in range(n):
        acquire(now)
        now += 1e-6
    return (time.perf_counter_ns() - t0) / n


def limiter_ns(cls: Any, n: int) -> float:
    lim = cls(100_000.0, 100)
    keys = [(f"192.0.2.{i % 250}", f"site{i}") for i in range(1000)]
    acquire = lim.acquire
    now = 1000.0
    t0 = time.perf_counter_ns()
    for i in range(n):
        acquire(keys[i % 1000], now)
        now += 1e-6
    return (time.perf_counter_ns() - t0) / n


def loop_ns(n: int) -> float:
    """The cost of the timing loop itself (clock increment), for reference."""
    now = 1000.0
    t0 = time.perf_counter_ns()
    for _ in range(n):
        now += 1e-6
    return (time.perf_counter_ns() - t0) / n


def real_clock(cls: Any, rate: float, seconds: float) -> float:
    """Achieved events/s of a bucket at ``rate`` driven by the real clock."""
    burst = 20
    b = cls(rate, burst)
    start = time.monotonic()
    if b.acquire(start, burst) != 0.0:  # start empty: measure the sustained rate
        raise RuntimeError("a fresh bucket refused its burst")
    admitted = 0
    end = start + seconds
    now = start
    while now < end:
        wait = b.acquire(now)
        if wait == 0.0:
            admitted += 1
        else:
            time.sleep(wait)
        now = time.monotonic()
    return admitted / (now - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    if not _accel.HAVE_EXTENSIONS:
        print("fastsend._core is not built: cannot measure the compiled buckets", file=sys.stderr)
        return 2
    CGcra, CLimiter = _accel.compiled("Gcra"), _accel.compiled("Limiter")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"Python {platform.python_version()}"
    )
    print(f"settings: best of {args.rounds} rounds; 1,000,000 (c) / 300,000 (py) decisions each")

    best = {"gc": 1e18, "gp": 1e18, "lc": 1e18, "lp": 1e18, "loop": 1e18}
    for _ in range(args.rounds):
        best["gc"] = min(best["gc"], gcra_ns(CGcra, 1_000_000))
        best["gp"] = min(best["gp"], gcra_ns(PyGcra, 300_000))
        best["lc"] = min(best["lc"], limiter_ns(CLimiter, 1_000_000))
        best["lp"] = min(best["lp"], limiter_ns(PyLimiter, 300_000))
        best["loop"] = min(best["loop"], loop_ns(1_000_000))
    if not all(0.0 < v < 1e18 for v in best.values()):
        print("UNMEASURABLE: a decision cost came out non-positive", file=sys.stderr)
        return 2
    print("\nper decision (including the calling loop):")
    print(f"  Gcra.acquire     compiled {best['gc']:7.1f} ns   pure-Python {best['gp']:7.1f} ns")
    print(f"  Limiter.acquire  compiled {best['lc']:7.1f} ns   pure-Python {best['lp']:7.1f} ns")
    print(f"  (empty timing loop: {best['loop']:.1f} ns)")
    print(
        f"  ratio pure/compiled: Gcra {best['gp'] / best['gc']:.1f}x, "
        f"Limiter {best['lp'] / best['lc']:.1f}x"
    )

    achieved = real_clock(CGcra, args.rate, args.seconds)
    ratio = achieved / args.rate
    print(
        f"\nreal clock: configured {args.rate:g}/s over {args.seconds:g} s, achieved "
        f"{achieved:.1f}/s; achieved/configured {ratio:.4f} (goal 0.99..1.01)"
    )
    if achieved <= 0.0:
        return 2
    if args.strict and abs(ratio - 1.0) > 0.01:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
