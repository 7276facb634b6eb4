"""A timeline of one `fastsend send` (N personalised ~4 KB messages to Postfix's
smtp-sink on loopback, as bench/end_to_end.py runs it): when each stage starts
and ends, from launch to exit, and how busy each process keeps the cores.

Milestones come from bench/_timeline_hooks.py, which runs the command with
marks wrapped around fastsend's functions (interpreter up, imports done, config
loaded, spool and list opened, first chunk spooled, workers forked and running,
first connection, first outcomes, list fully read, last outcomes, workers
reaped, exit). CPU comes from sampling /proc/PID/task/*/schedstat (nanoseconds
on a CPU) of the supervisor, each worker and smtp-sink every --sample s; the
table shows each process's share of a core per --bucket s and the total of all
(on N cores, 100 * N % is every core busy), then the idle core-seconds: the
time the cores could have spent on the work and did not.

    python bench/send_timeline.py                     # 100,000 messages, 1 run
    python bench/send_timeline.py --messages 20000 --runs 3 --bucket 0.05
    python bench/send_timeline.py --baseline ../base --runs 5 --quiet

--baseline DIR runs the same sends, interleaved, with another checkout's
fastsend (DIR/src, built in place) and prints per run and side, then medians
with min-max: messages/s (launch to exit, sink-counted), fastsend's CPU per
message (supervisor + workers), the share of each worker's samples with an
empty ready queue while it sends (over the run, and between its first answer
and the last list chunk read: the start and the tail empty it by nature), and
the cores' idle time. On a shared machine the rate follows the other load;
the CPU per message and the ready-queue shares are what compare.

The hooks cost a few microseconds per mark; run bench/end_to_end.py for the
rates. Exits non-zero when the send failed or the sink counted fewer.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import SmtpSink, compile_bytecode, free_port, machine
from end_to_end import SOURCE_IPS, write_inputs

HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_timeline_hooks.py")


def proc_ns(pid: int) -> int | None:
    """Nanoseconds all threads of ``pid`` have run (None: gone)."""
    total = 0
    try:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(path) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total if os.path.exists(f"/proc/{pid}") else None
    except OSError:
        return None


TICK_NS = 10**9 // os.sysconf("SC_CLK_TCK")


def machine_idle_ns() -> int:
    """Idle + iowait time of all cores (/proc/stat), in ns (clock-tick resolution)."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return (int(v[4]) + int(v[5])) * TICK_NS


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """(monotonic s, {name: cumulative CPU ns}) every ``every`` s."""

    def __init__(self, root: int, sink: int, every: float) -> None:
        super().__init__(daemon=True)
        self.root, self.sink, self.every = root, sink, every
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.names: dict[int, str] = {root: "supervisor"}
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.stop = False

    def run(self) -> None:
        last: dict[str, int] = {}
        while not self.stop:
            now = time.monotonic()
            row: dict[str, int] = {}
            pids = [self.root, *children(self.root)]
            for pid in pids:
                if pid not in self.names:
                    self.names[pid] = f"worker {len(self.names) - 1}"
                name = self.names[pid]
                ns = proc_ns(pid)
                if ns is not None and ns > 0:
                    row[name] = ns
                    self.first_seen.setdefault(name, now)
                    self.last_seen[name] = now
            row["machine idle"] = machine_idle_ns()
            s = proc_ns(self.sink)
            if s is not None:
                row["smtp-sink"] = s
            # Exited workers keep their last figure (so the deltas stay right).
            for k, v in last.items():
                row.setdefault(k, v)
            last = row
            self.samples.append((now, row))
            time.sleep(self.every)


def run_once(camp: str, rcpts: str, sink: SmtpSink, tmp: str, workers: int, tag: str,
             every: float, config: str = "", tree: str = "", dkim: bool = False) -> tuple[float, float, list[tuple[float, int, str]], Sampler, int]:  # fmt: skip
    marks = os.path.join(tmp, f"marks-{tag}.txt")
    cmd = [sys.executable, HOOKS, marks, "send", camp, "-r", rcpts,
           "--route", f"*=127.0.0.1:{sink.port}", "--source-ip", ",".join(SOURCE_IPS),
           "--workers", str(workers), "--spool", os.path.join(tmp, f"spool-{tag}"),
           "--json", "--no-progress", *([] if dkim else ["--no-dkim"])]  # fmt: skip
    if config:
        cmd += ["-c", config]
    env = None
    if tree:  # another checkout's fastsend (the --baseline side)
        env = {**os.environ, "PYTHONPATH": os.path.join(os.path.abspath(tree), "src")}
    before = sink.messages()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    sampler = Sampler(proc.pid, sink.proc.pid, every)
    sampler.start()
    _out, err = proc.communicate()
    t_exit = time.monotonic()
    sampler.stop = True
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"fastsend send failed ({proc.returncode}): {err.decode()[-2000:]}")
    got = sink.messages() - before
    rows = []
    with open(marks) as f:
        for line in f:
            t, pid, name = line.rstrip("\n").split(" ", 2)
            rows.append((float(t), int(pid), name))
    rows.sort()
    return t0, t_exit, rows, sampler, got


def with_rsa_key(tmp: str, camp: str) -> str:
    """``camp`` signing rsa-sha256 with a new 2048-bit key (as bench/end_to_end.py
    --dkim does): the campaign file to send."""
    key = os.path.join(tmp, "dkim.pem")
    subprocess.run(
        [sys.executable, "-m", "fastsend", "dkim", "keygen", "--domain", "sender.example.com",
         "--selector", "b1", "--bits", "2048", "--out", key, "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    signed = os.path.join(tmp, "campaign-dkim.toml")
    with open(camp) as src, open(signed, "w") as f:
        f.write(src.read())
        f.write(f'[dkim]\ndomain = "sender.example.com"\nselector = "b1"\nkey = "{key}"\n')
    return signed


READY = re.compile(r"ready queues while sending: (\d+) samples, empty in (\d+)"
                   r".*last batch: (\d+) samples, empty in (\d+)")  # fmt: skip


def ready_shares(rows: list[tuple[float, int, str]]) -> tuple[float, float]:
    """(share of the workers' samples with an empty ready queue while sending,
    the same from each one's first results to its last batch), in %."""
    tot = [0, 0, 0, 0]
    for _t, _pid, name in rows:
        m = READY.search(name)
        if m:
            tot = [a + int(b) for a, b in zip(tot, m.groups(), strict=True)]
    return tot[1] / max(1, tot[0]) * 100, tot[3] / max(1, tot[2]) * 100


def report(t0: float, t_exit: float, rows: list[tuple[float, int, str]], sampler: Sampler,
           bucket: float, cores: int, n: int, quiet: bool = False) -> dict[str, float]:  # fmt: skip
    if quiet:
        return totals(t0, t_exit, sampler, cores)
    root = sampler.root
    print(f"{'ms from launch':>14}  milestone")
    print(f"{0.0:14.1f}  launch (Popen)")
    pids = {root: "supervisor"}
    for t, pid, name in rows:
        who = pids.setdefault(pid, f"w{len(pids) - 1}") if pid != root else ""
        print(f"{(t - t0) * 1e3:14.1f}  {name}{f' [{who}]' if who else ''}")
    print(f"{(t_exit - t0) * 1e3:14.1f}  process exit (reaped by the bench)")
    # CPU per bucket.
    procs = ["supervisor", *sorted(k for k in sampler.names.values() if k != "supervisor"),
             "smtp-sink"]  # fmt: skip
    names = [*procs, "machine idle"]
    samples = sampler.samples
    print(f"\nCPU, % of one core per {bucket * 1e3:.0f} ms (all {cores} cores busy = {cores * 100}%);"
          " idle: no process on a core (/proc/stat, 10 ms ticks); others: other load")  # fmt: skip
    print(f"{'ms':>7} " + " ".join(f"{x:>10}" for x in procs)
          + f" {'total':>7} {'idle':>7} {'others':>7}")  # fmt: skip
    sums = dict.fromkeys(names, 0.0)
    i = 0
    b0 = samples[0][0] if samples else t0
    prev = {k: samples[0][1].get(k, 0) for k in names} if samples else {}
    while samples and b0 < samples[-1][0]:
        b1 = b0 + bucket
        while i < len(samples) - 1 and samples[i][0] < b1:
            i += 1
        cur = samples[i][1]
        span = samples[i][0] - b0 if samples[i][0] > b0 else bucket
        use = {k: (cur.get(k, prev.get(k, 0)) - prev.get(k, 0)) / 1e9 for k in names}
        for k in names:
            sums[k] += use[k]
        total = sum(use[k] for k in procs)
        idle = use["machine idle"]
        print(f"{(b0 - t0) * 1e3:7.0f} " + " ".join(f"{use[k] / span * 100:9.0f}%" for k in procs)
              + f" {total / span * 100:6.0f}% {idle / span * 100:6.0f}%"
              f" {max(0.0, cores * span - total - idle) / span * 100:6.0f}%")  # fmt: skip
        prev = {k: cur.get(k, prev.get(k, 0)) for k in names}
        b0 = samples[i][0]
    wall = t_exit - t0
    busy = sum(sums[k] for k in procs)
    idle = sums["machine idle"]
    print(
        f"\nwall {wall:.3f} s; CPU: " + ", ".join(f"{k} {sums[k]:.3f} s" for k in procs)
        + f"; {busy:.3f} of {cores * wall:.3f} core-seconds used by fastsend + smtp-sink"
        f" ({busy / (cores * wall) * 100:.0f}%), cores idle {idle:.3f} core-s,"
        f" other load {max(0.0, cores * wall - busy - idle):.3f} core-s"
    )  # fmt: skip
    return totals(t0, t_exit, sampler, cores)


def totals(t0: float, t_exit: float, sampler: Sampler, cores: int) -> dict[str, float]:
    """wall s; CPU s of fastsend (supervisor + workers, each from its start) and
    of fastsend + smtp-sink; idle core-s of the machine, over the run."""
    if not sampler.samples:
        return {"wall": t_exit - t0, "fastsend": 0.0, "busy": 0.0, "idle": 0.0}
    first, last = sampler.samples[0][1], sampler.samples[-1][1]
    fast = sum(v for k, v in last.items() if k == "supervisor" or k.startswith("worker")) / 1e9
    sink = (last.get("smtp-sink", 0) - first.get("smtp-sink", 0)) / 1e9
    idle = (last.get("machine idle", 0) - first.get("machine idle", 0)) / 1e9
    return {"wall": t_exit - t0, "fastsend": fast, "busy": fast + sink, "idle": idle}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--bucket", type=float, default=0.1, help="s per row of the CPU table")
    ap.add_argument("--config", "-c", default="", help="a fastsend config file for the send")
    ap.add_argument("--sample", type=float, default=0.005, help="s between /proc samples")
    ap.add_argument("--baseline", default="", metavar="DIR",
                    help="A/B: interleave each run with the same send from DIR/src")
    ap.add_argument("--quiet", action="store_true", help="no timeline, the figures only")
    ap.add_argument("--dkim", action="store_true",
                    help="sign rsa-sha256 (2048-bit): when each worker ends its share")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    print(f"machine: {machine()} (shared: other load shows as CPU nobody here used)")
    print(compile_bytecode("fastsend"))
    print(f"settings: {args.messages} messages of ~{args.size} B, {workers} workers,"
          f" Postfix smtp-sink on 127.0.0.1, sampling every {args.sample * 1e3:.0f} ms")  # fmt: skip
    sides = [("this", "")]
    if args.baseline:
        if not os.path.isdir(os.path.join(args.baseline, "src", "fastsend")):
            raise SystemExit(f"--baseline {args.baseline}: no src/fastsend there")
        sides.append(("baseline", args.baseline))
        import compileall  # as compile_bytecode did for this checkout

        if not compileall.compile_dir(os.path.join(args.baseline, "src", "fastsend"), quiet=1):
            raise SystemExit(f"could not compile {args.baseline}/src/fastsend to bytecode")
        print(f"A/B: this checkout ({os.path.dirname(os.path.dirname(HOOKS))}) and"
              f" {os.path.abspath(args.baseline)}, interleaved (ABBA...)")  # fmt: skip
    n = args.messages
    figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
    ok = True
    with tempfile.TemporaryDirectory(prefix="fastsend-timeline-") as tmp:
        camp, rcpts = write_inputs(tmp, n, args.size)
        if args.dkim:
            camp = with_rsa_key(tmp, camp)
        sink = SmtpSink(free_port())
        try:
            for r in range(args.runs):
                for name, tree in sides if r % 2 == 0 else sides[::-1]:
                    t0, t_exit, rows, sampler, got = run_once(
                        camp, rcpts, sink, tmp, workers, f"{name}-{r}", args.sample,
                        args.config, tree, args.dkim,
                    )  # fmt: skip
                    ok = ok and got == n
                    if not args.quiet:
                        print(f"\n== run {r + 1} ({name}): sink counted {got} of {n}")
                    t = report(t0, t_exit, rows, sampler, args.bucket, cores, n, args.quiet)
                    dry, dry_mid = ready_shares(rows)
                    f = {"msgs/s": got / t["wall"], "fastsend us/msg": t["fastsend"] / n * 1e6,
                         "ready empty %": dry, "ready empty mid %": dry_mid,
                         "idle core-s": t["idle"]}  # fmt: skip
                    figures[name].append(f)
                    print(f"run {r + 1} {name:>8}: sink counted {got} of {n}; "
                          + ", ".join(f"{k} {v:.1f}" for k, v in f.items()))  # fmt: skip
        finally:
            sink.close()
    print(f"\nmedians [min-max] of {args.runs} run(s) each")
    for name, runs in figures.items():
        print(f"{name:>8}: " + ", ".join(
            f"{k} {statistics.median(r[k] for r in runs):.1f}"
            f" [{min(r[k] for r in runs):.1f}-{max(r[k] for r in runs):.1f}]"
            for k in runs[0]))  # fmt: skip
    if args.baseline and all(figures.values()):
        med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for name, runs in figures.items()}  # fmt: skip
        a, b = med["this"], med["baseline"]
        print(f"ratio this/baseline: msgs/s {a['msgs/s'] / b['msgs/s']:.2f}x,"
              f" fastsend CPU per message {a['fastsend us/msg'] / b['fastsend us/msg']:.2f}x")
    if not ok:
        print("a send was not counted in full by the sink", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
