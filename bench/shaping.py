"""Shaping decisions: cost per decision (compiled vs pure-Python), real-clock
accuracy, and proof under load that configured per-site rates hold.

1. Cost: ns per ``Gcra.acquire(now)`` and per ``Limiter.acquire(key, now)``
   (1,000 (IP, site) keys, round-robin), compiled twin vs pure-Python twin,
   best of ``--rounds``; the ratio pure/compiled is printed. The clock
   advances 1 us per call against a 100,000/s bucket, so decisions mix
   allowed and refused. Then the whole shaping decision of fastsend.shaping
   (pool choice by smooth weighted round-robin + the lane's ``take``: its
   GCRA buckets and warm-up cap), with compiled and pure buckets.
2. Accuracy on the real clock: a bucket at N/s (burst 20, started empty)
   driven by ``time.monotonic()`` and ``time.sleep(wait)`` for ``--seconds``;
   prints achieved/configured (goal: within 1%).
3. Under load (``--load``, on by default): the real engine (``fastsend
   send``: supervisor, forked workers, rings, spool) sends to two sinks on
   loopback (two sites: 127.0.0.1 and 127.0.0.10) from two source IPs with
   per-(IP, site) limits of ``--site-rates`` messages/s (burst 10); the
   sinks' logs (peer address, time) give each (IP, site)'s achieved rate,
   printed against the configured one (the first burst is excluded).

    python bench/shaping.py [--rounds 3] [--seconds 3] [--rate 1000] [--strict]
                            [--no-load] [--load-seconds 5] [--site-rates 300,120]

Exits 2 when a figure cannot be measured; with ``--strict``, 1 when the
real-clock rate is off by more than 1% or an (IP, site)'s rate by more than 2%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from _common import machine

from fastsend import _accel
from fastsend.throttle import PyGcra, PyLimiter

IPS = ["127.0.0.2", "127.0.0.3"]
SITE_HOSTS = ["127.0.0.1", "127.0.0.10"]


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


def decision_ns(cls: Any, n: int) -> float:
    """ns per shaping decision: pool pick (3 IPs, weights 2:1:1, one warming)
    plus the chosen lane's take() against a 100,000/s bucket (burst 100)."""
    from fastsend import config as cfgmod
    from fastsend.shaping.lanes import Shaper

    now_unix = 1_750_000_000.0
    cfg = cfgmod.from_dict(
        {
            "shaping": {"default": {"messages_per_second": 100_000, "aimd": False}},
            "pools": {
                "warmup": {"schedule": [1 << 40]},
                "main": {
                    "ips": [
                        {"ip": "192.0.2.1", "weight": 2},
                        "192.0.2.2",
                        {"ip": "192.0.2.3", "warmup_day": 1},
                    ]
                },
            },
        }
    )
    sh = Shaper(cfg, cfg.source_ips, now=now_unix)
    pool = sh.pool("main")
    lim = sh.site_limits("s", ("mx.example.org",), "example.org")
    lanes = {}
    for p in pool.ips:
        ln = sh.lane(p.ip, "s", lim, pool, now_unix)
        ln.buckets = [cls(100_000.0, 100)]
        ln._refresh()
        lanes[p.ip] = ln
    pick = pool.pick
    now = 1000.0
    t0 = time.perf_counter_ns()
    for _ in range(n):
        ip = pick("", now_unix)
        if ip is not None:
            lanes[ip.ip].take(now, 1)
        now += 1e-6
    return (time.perf_counter_ns() - t0) / n


def group_ns(cls: Any, n: int, group: int = 64) -> float:
    """ns per message of a lane's take() for a pipelined group of ``group``
    messages (what the engine does: one take per group, one pick per connection)."""
    from fastsend import config as cfgmod
    from fastsend.shaping.lanes import Shaper

    cfg = cfgmod.from_dict({"shaping": {"default": {"messages_per_second": 1e8, "burst": 1000}}})
    sh = Shaper(cfg, ["192.0.2.1"], now=1_750_000_000.0)
    lim = sh.site_limits("s", ("mx.example.org",), "example.org")
    ln = sh.lane("192.0.2.1", "s", lim, sh.pool(""), 1_750_000_000.0)
    ln.buckets = [cls(1e8, 1000)]
    ln._refresh()
    take = ln.take
    now = 1000.0
    t0 = time.perf_counter_ns()
    for _ in range(n):
        take(now, group)
        now += 1e-3
    return (time.perf_counter_ns() - t0) / n / group


def under_load(rates: list[float], seconds: float) -> list[tuple[str, float, float, int]]:
    """(site and source IP, configured, achieved, messages) per (IP, site), through
    the real engine."""
    import subprocess
    import tempfile

    import orjson

    from fastsend.sink import SinkProcess

    tmp = tempfile.mkdtemp(prefix="fastsend-bench-shaping-")
    per_site = [int(r * len(IPS) * seconds) for r in rates]
    with open(os.path.join(tmp, "campaign.toml"), "w") as f:
        f.write(
            'from = "Bench <b@bench.example.com>"\nsubject = "Hi {{ n }}"\ntext = "Hello {{ n }}.\\n"\n'
        )
    with open(os.path.join(tmp, "r.csv"), "w") as f:
        f.write("email,n\n")
        for s_i, count in enumerate(per_site):
            for i in range(count):
                f.write(f"u{i}@site{s_i}.example,{i}\n")
    sinks = [
        SinkProcess("--log", os.path.join(tmp, f"sink{i}.jsonl"), listen=f"{h}:0")
        for i, h in enumerate(SITE_HOSTS)
    ]
    conf = os.path.join(tmp, "fastsend.toml")
    try:
        for sp in sinks:
            sp.start()
        lines = ["[routes]"]
        lines += [f'"site{i}.example" = "{sp.host}:{sp.port}"' for i, sp in enumerate(sinks)]
        lines += ["[delivery]", "window = 400", "batch_size = 100"]
        lines += ["[shaping.default]", "aimd = false"]
        for h, r in zip(SITE_HOSTS, rates, strict=True):
            lines += [f'[shaping.domain."{h}"]', f"messages_per_second = {r}", "burst = 10"]
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        proc = subprocess.run(
            [sys.executable, "-m", "fastsend", "send", os.path.join(tmp, "campaign.toml"),
             "-r", os.path.join(tmp, "r.csv"), "-c", conf, "--spool", os.path.join(tmp, "spool"),
             "--source-ip", ",".join(IPS), "--workers", "2", "--no-dkim", "--json",
             "--no-progress", "--max-wait", "5"],
            capture_output=True, text=True, timeout=seconds * 4 + 60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"fastsend send failed: {proc.stderr[-2000:]}")
    finally:
        for sp in sinks:
            sp.stop()
    out = []
    for i, (h, r) in enumerate(zip(SITE_HOSTS, rates, strict=True)):
        by_ip: dict[str, list[float]] = {}
        with open(os.path.join(tmp, f"sink{i}.jsonl"), "rb") as f:
            for line in f:
                rec = orjson.loads(line)
                by_ip.setdefault(rec["peer"], []).extend([rec["time"]] * len(rec["recipients"]))
        for ip, times in sorted(by_ip.items()):
            times.sort()
            if len(times) <= 10 * 2 or times[-1] - times[0] < 0.5:
                continue  # too few from this IP to measure a rate
            # The bucket starts full: the first burst (10) is not part of the rate.
            achieved = (len(times) - 10) / (times[-1] - times[0])
            out.append((f"route:{h} from {ip}", r, achieved, len(times)))
        if not any(x[0].startswith(f"route:{h} ") for x in out):
            raise RuntimeError(f"site {h}: too few messages to measure")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    ap.add_argument("--no-load", action="store_true", help="skip the under-load part")
    ap.add_argument("--load-seconds", type=float, default=5.0)
    ap.add_argument("--site-rates", default="300,120", help="per-(IP, site) msg/s of the 2 sites")
    args = ap.parse_args()
    if not _accel.HAVE_EXTENSIONS:
        print("fastsend._core is not built: cannot measure the compiled buckets", file=sys.stderr)
        return 2
    CGcra, CLimiter = _accel.compiled("Gcra"), _accel.compiled("Limiter")
    print(f"machine: {machine()}")
    print(f"settings: best of {args.rounds} rounds; 1,000,000 (c) / 300,000 (py) decisions each")

    best = {"gc": 1e18, "gp": 1e18, "lc": 1e18, "lp": 1e18, "loop": 1e18, "dc": 1e18, "dp": 1e18}
    for _ in range(args.rounds):
        best["dc"] = min(best["dc"], decision_ns(CGcra, 300_000))
        best["dp"] = min(best["dp"], decision_ns(PyGcra, 100_000))
        best["tc"] = min(best.get("tc", 1e18), group_ns(CGcra, 100_000))
        best["tp"] = min(best.get("tp", 1e18), group_ns(PyGcra, 50_000))
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
    print(
        f"  shaping decision compiled {best['dc']:7.1f} ns   pure-Python {best['dp']:7.1f} ns"
        "   (pool pick + lane take, one message: worst case)"
    )
    print(
        f"  per message, take per group of 64: compiled {best['tc']:5.1f} ns"
        f"   pure-Python {best['tp']:5.1f} ns   (the engine's path: a pick per connection)"
    )
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
    bad = args.strict and abs(ratio - 1.0) > 0.01
    if not args.no_load:
        rates = [float(x) for x in args.site_rates.split(",")]
        if len(rates) != len(SITE_HOSTS):
            print(f"--site-rates needs {len(SITE_HOSTS)} values", file=sys.stderr)
            return 2
        print(
            f"\nunder load: fastsend send, 2 workers, source IPs {', '.join(IPS)}, "
            f"~{args.load_seconds:g} s per site, per-(IP, site) burst 10"
        )
        try:
            sites = under_load(rates, args.load_seconds)
        except (RuntimeError, OSError) as e:
            print(f"UNMEASURABLE: {e}", file=sys.stderr)
            return 2
        for what, conf, got, n in sites:
            r = got / conf
            print(
                f"  {what:<34} configured {conf:6.1f}/s  achieved {got:7.1f}/s  "
                f"achieved/configured {r:.4f}  ({n} messages)"
            )
            bad = bad or (args.strict and abs(r - 1.0) > 0.02)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
