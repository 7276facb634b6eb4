"""Many nodes on one Redis against the SQLite single node, in the same run.

The same campaign (N personalised messages to 7 domains) is spooled once per
setting, then delivered to Postfix's smtp-sink on loopback by:

- ``sqlite``: one `fastsend resume` on the SQLite spool (the baseline);
- ``redis xK``: K `fastsend resume` nodes (K = 1, 2, 3) sharing one Redis
  spool, each with its own source IP (127.0.0.2, .3, .4) and node name.

Each node has ``--workers W`` (default 1). Measured per setting: delivery
messages/s (launch of the first node to exit of the last; spooling is not
timed), fastsend CPU per message (user+system of every node's process tree,
from the kernel), and on Redis: Redis commands per message (``INFO
commandstats``: calls of every command, those run inside Lua scripts
included, and ``total_commands_processed``: the commands clients sent, a
script call being one) and Redis CPU per message (``INFO cpu``). The ratio
line compares one Redis node with the SQLite node, by rate and by CPU per
message with Redis's own CPU counted.

Exits non-zero when a setting could not be measured or delivered fewer than
all messages (checked in the spool). The machine is shared: read the ratios
and CPU per message, measured in one run, rather than absolute rates.

    python bench/multinode.py                 # 50,000 messages, 1 repeat
    python bench/multinode.py --quick         # 10,000
    python bench/multinode.py --serve         # plus the 60,000-recipient run of
                                              # tests/test_multinode.py (3 serve
                                              # nodes behind HAProxy, kill -9)
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from typing import Any

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    fmt_mr,
    free_port,
    machine,
    median_range,
    program,
    start_smtp_sink,
    wait_port,
)

CAMPAIGN = {
    "from": "News <news@sender.example.com>",
    "subject": "Hello {{ name }}",
    "text": "Hi {{ name }}, this is the message for {{ email }}.\n" + "x" * 800 + "\n",
}
IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def spool(url: str, n: int) -> None:
    from fastsend.message import Campaign
    from fastsend.spool import open_spool

    s = open_spool(url)
    spec = Campaign.from_dict(CAMPAIGN).to_dict()
    cid = s.create_campaign(spec, name="bench")
    rows = []
    for i in range(n):
        a = f"user{i}@d{i % 7}.example.net"
        rows.append((a, a.split("@")[1], orjson.dumps({"email": a, "name": f"N{i}"})))
    for j in range(0, n, 5000):
        s.add_messages(cid, rows[j : j + 5000], time.time())
    s.close()


def delivered(url: str) -> int:
    from fastsend.spool import open_spool

    s = open_spool(url)
    try:
        return int(s.counts()["delivered"])
    finally:
        s.close()


def redis_info(r: Any) -> dict[str, float]:
    cs = r.info("commandstats")
    st = r.info("stats")
    cpu = r.info("cpu")
    return {
        "calls": float(sum(v["calls"] for v in cs.values())),
        "processed": float(st["total_commands_processed"]),
        "cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


def run_nodes(urls: list[str], sink_port: int, workers: int, tmp: str) -> tuple[float, float]:
    """Deliver with one `fastsend resume` per URL; (seconds, CPU seconds of the trees)."""
    cfg = os.path.join(tmp, "node.toml")
    with open(cfg, "w") as f:
        f.write('[delivery]\ntls = "off"\n')
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    procs = []
    for i, url in enumerate(urls):
        p = subprocess.Popen(
            [sys.executable, "-m", "fastsend", "resume", "-c", cfg, "--spool", url,
             "--route", f"*=127.0.0.1:{sink_port}", "--source-ip", IPS[i],
             "--workers", str(workers), "--max-wait", "5", "--json", "--no-progress"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(p)
    errs = []
    for p in procs:
        _out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            errs.append(err[-2000:])
    dt = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if errs:
        raise SystemExit("a node failed:\n" + "\n".join(errs))
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return dt, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--quick", action="store_true", help="10,000 messages")
    ap.add_argument("--workers", type=int, default=1, help="workers per node")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument("--nodes", default="1,2,3", help="Redis node counts to run")
    ap.add_argument("--serve", action="store_true",
                    help="also run tests/test_multinode.py at 60,000 recipients")  # fmt: skip
    a = ap.parse_args()
    n = 10_000 if a.quick else a.messages
    import redis

    print(f"machine: {machine()} (shared with other work: compare ratios and CPU/msg)")
    print(f"settings: {n} messages of ~1 KB to 7 domains, smtp-sink on loopback,"
          f" {a.workers} worker(s) per node, TLS off")  # fmt: skip
    sink_port = free_port()
    sink = start_smtp_sink(sink_port)
    rport = free_port()
    rdir = tempfile.mkdtemp(prefix="bench-redis-")
    rproc = subprocess.Popen(
        [program("redis-server"), "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec", "--dir", rdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(rport)
    r = redis.Redis(host="127.0.0.1", port=rport)
    settings = ["sqlite x1"] + [f"redis x{int(k)}" for k in a.nodes.split(",")]
    # setting -> per repeat: (seconds, fastsend CPU s, Redis deltas or None)
    runs: dict[str, list[tuple[float, float, dict[str, float] | None]]] = {x: [] for x in settings}
    ok = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(a.repeat):  # interleaved: load on a shared machine hits all alike
                for name in settings:
                    k = int(name.split("x")[1])
                    if name.startswith("sqlite"):
                        url = os.path.join(tmp, f"sqlite{rep}")
                        urls = [url]
                    else:
                        url = f"redis://127.0.0.1:{rport}/0?prefix=b{secrets.token_hex(3)}"
                        urls = [f"{url}&node=n{i}&dir={tmp}/{name[-2:]}{rep}-{i}" for i in range(k)]
                    spool(url, n)
                    if name.startswith("redis"):
                        r.config_resetstat()
                    before = redis_info(r)
                    dt, cpu = run_nodes(urls, sink_port, a.workers, tmp)
                    after = redis_info(r)
                    got = delivered(url)
                    ok &= got == n
                    info = (
                        {x: after[x] - before[x] for x in after} if k and "redis" in name else None
                    )
                    runs[name].append((dt, cpu, info))
                    print(f"  round {rep + 1} {name}: delivered {got}/{n} in {dt:.2f} s")
    finally:
        sink.terminate()
        rproc.terminate()
        sink.wait(10)
        rproc.wait(10)
    print(f"\nmedian (min-max) of {a.repeat} interleaved round(s):")
    print(f"{'setting':<10} {'msg/s':>20} {'CPU us/msg':>18} {'redis cmds/msg':>15}"
          f" {'redis CPU us/msg':>17} {'total CPU us/msg':>17}")  # fmt: skip
    med: dict[str, tuple[float, float, float]] = {}
    for name in settings:
        rs = runs[name]
        rates = [n / dt for dt, _c, _i in rs]
        cpus = [c / n * 1e6 for _d, c, _i in rs]
        rcpu = [(i["cpu"] / n * 1e6 if i else 0.0) for _d, _c, i in rs]
        cmds = [(i["calls"] / n if i else 0.0) for _d, _c, i in rs]
        tot = [c + x for c, x in zip(cpus, rcpu, strict=True)]
        med[name] = (median_range(rates)[0], median_range(tot)[0], median_range(rcpu)[0])
        print(f"{name:<10} {fmt_mr(rates):>20} {fmt_mr(cpus, '.1f'):>18}"
              f" {median_range(cmds)[0]:>15.2f} {fmt_mr(rcpu, '.1f'):>17} {fmt_mr(tot, '.1f'):>17}")  # fmt: skip
    if "redis x1" in med:
        (r1, t1, rc1), (r0, t0, _) = med["redis x1"], med["sqlite x1"]
        print(
            f"\nratio redis x1 / sqlite x1 (medians): rate {r1 / r0:.2f}x, CPU per message"
            f" {t1 / t0:.2f}x with Redis's CPU counted (goal: rate >= 0.8x); one Redis core"
            f" at {rc1:.1f} us/msg serves about {1e6 / rc1:,.0f} msg/s, i.e. about"
            f" {1e6 / rc1 / max(r1, 1):.1f} nodes like these per Redis shard"
        )
    if a.serve:
        env = {**os.environ, "MULTINODE_N": "60000"}
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
             "tests/test_multinode.py", "-k", "three"], env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )  # fmt: skip
        print(
            f"serve x3 behind HAProxy, 60,000 recipients, kill -9 of one node:"
            f" {'passed' if res.returncode == 0 else 'FAILED'} in {time.monotonic() - t0:.0f} s"
        )
        ok &= res.returncode == 0
    if not ok:
        print("FAILED: a setting delivered fewer than all messages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
