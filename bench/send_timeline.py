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

The hooks cost a few microseconds per mark; run bench/end_to_end.py for the
rates. Exits non-zero when the send failed or the sink counted fewer.
"""

from __future__ import annotations

import argparse
import glob
import os
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
             every: float, config: str = "") -> tuple[float, float, list[tuple[float, int, str]], Sampler, int]:  # fmt: skip
    marks = os.path.join(tmp, f"marks-{tag}.txt")
    cmd = [sys.executable, HOOKS, marks, "send", camp, "-r", rcpts,
           "--route", f"*=127.0.0.1:{sink.port}", "--source-ip", ",".join(SOURCE_IPS),
           "--workers", str(workers), "--spool", os.path.join(tmp, f"spool-{tag}"),
           "--json", "--no-progress", "--no-dkim"]  # fmt: skip
    if config:
        cmd += ["-c", config]
    before = sink.messages()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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


def report(t0: float, t_exit: float, rows: list[tuple[float, int, str]], sampler: Sampler,
           bucket: float, cores: int, n: int) -> dict[str, float]:  # fmt: skip
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
    return {"wall": wall, "busy": busy, "idle": idle}


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
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    print(f"machine: {machine()} (shared: other load shows as CPU nobody here used)")
    print(compile_bytecode("fastsend"))
    print(f"settings: {args.messages} messages of ~{args.size} B, {workers} workers,"
          f" Postfix smtp-sink on 127.0.0.1, sampling every {args.sample * 1e3:.0f} ms")  # fmt: skip
    ok = True
    with tempfile.TemporaryDirectory(prefix="fastsend-timeline-") as tmp:
        camp, rcpts = write_inputs(tmp, args.messages, args.size)
        sink = SmtpSink(free_port())
        try:
            for r in range(args.runs):
                t0, t_exit, rows, sampler, got = run_once(
                    camp, rcpts, sink, tmp, workers, str(r), args.sample, args.config
                )
                print(f"\n== run {r + 1}: sink counted {got} of {args.messages}")
                ok = ok and got == args.messages
                report(t0, t_exit, rows, sampler, args.bucket, cores, args.messages)
        finally:
            sink.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
