"""Bench: `fastsend sink` against Postfix's smtp-sink, same client, same run.

The client is Postfix's C load generator smtp-source (persistent sessions, no
pipelining, ~4 KB messages), so the client costs the same for both servers.
Each server runs as its own process; its CPU (user + system, from psutil) over
the client's run is divided by the messages it counted itself (smtp-sink -c;
fastsend sink's summary), and must equal what was sent. Runs are interleaved
(--repeat, default 3): medians with min-max, then the ratios
fastsend/smtp-sink. `--workers N` also runs `fastsend sink --workers N`
(SO_REUSEPORT) against smtp-sink. Prints the machine and settings; exits
non-zero when a figure cannot be measured.

    python bench/sink_throughput.py [--messages 50000] [--sessions 10] [--size 4096]

It does not test faults or TLS; it measures the plain accept path (the fast
path of `fastsend sink`: no --log/--save).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import orjson
import psutil
from _common import SmtpSink, fmt_mr, free_port, machine, median_range, program, wait_port


def run_client(port: int, args: argparse.Namespace) -> float:
    t0 = time.perf_counter()
    cmd = [program("smtp-source"), "-4", "-d", "-s", str(args.sessions), "-l", str(args.size)]
    cmd += ["-m", str(args.messages), "-f", "bench@example.test", "-t", "rcpt@example.test"]
    subprocess.run(
        [*cmd, f"127.0.0.1:{port}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def tree_cpu(ps: psutil.Process) -> float:
    total = 0.0
    for p in [ps, *ps.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure_smtp_sink(args: argparse.Namespace) -> tuple[float, float] | None:
    sink = SmtpSink(free_port(), 256)
    try:
        ps = psutil.Process(sink.proc.pid)
        cpu0 = tree_cpu(ps)
        elapsed = run_client(sink.port, args)
        cpu = tree_cpu(ps) - cpu0
        got = sink.messages()
    finally:
        sink.close()
    if got != args.messages:
        print(f"smtp-sink counted {got} of {args.messages}", file=sys.stderr)
        return None
    return args.messages / elapsed, cpu / args.messages * 1e6


def measure_fastsend(args: argparse.Namespace, workers: int) -> tuple[float, float] | None:
    port = free_port()
    cmd = [sys.executable, "-m", "fastsend", "sink", "--listen", f"127.0.0.1:{port}", "--json"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(0.3 if workers > 1 else 0.0)  # every worker listening
        ps = psutil.Process(proc.pid)
        cpu0 = tree_cpu(ps)
        elapsed = run_client(port, args)
        cpu = tree_cpu(ps) - cpu0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    try:
        got = orjson.loads(out.decode().strip().splitlines()[-1])["messages"]
    except (ValueError, IndexError, KeyError):
        got = -1
    if got != args.messages:
        print(f"fastsend sink counted {got} of {args.messages}", file=sys.stderr)
        return None
    return args.messages / elapsed, cpu / args.messages * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=4096, help="smtp-source -l (payload bytes)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs (medians shown)")
    ap.add_argument("--workers", type=int, default=0, help="also run fastsend sink --workers N")
    args = ap.parse_args()

    print(f"machine: {machine()} (shared: wall-clock figures are noisy; CPU/msg less so)")
    print(
        f"settings: client smtp-source -d -s {args.sessions} -l {args.size} -m {args.messages}"
        f" (no pipelining), {args.repeat} interleaved runs, median (min-max); server CPU ="
        " user+sys of the server's processes over the client's run"
    )
    sides: dict[str, list[tuple[float, float]]] = {"smtp-sink": [], "fastsend sink": []}
    if args.workers > 1:
        sides[f"fastsend sink --workers {args.workers}"] = []
    failed = False
    for _ in range(args.repeat):
        for name, values in sides.items():
            if name == "smtp-sink":
                got = measure_smtp_sink(args)
            else:
                got = measure_fastsend(args, args.workers if "workers" in name else 1)
            if got is None:
                failed = True
            else:
                values.append(got)
    if failed or not all(sides.values()):
        print("error: could not measure both servers", file=sys.stderr)
        return 1
    for name, values in sides.items():
        print(
            f"{name:<26}: {fmt_mr([v[0] for v in values]):>22} msg/s"
            f"  {fmt_mr([v[1] for v in values], '.1f'):>20} us CPU/msg"
        )
    base_rate = median_range([v[0] for v in sides["smtp-sink"]])[0]
    base_cpu = median_range([v[1] for v in sides["smtp-sink"]])[0]
    for name, values in sides.items():
        if name == "smtp-sink":
            continue
        rate = median_range([v[0] for v in values])[0]
        cpu = median_range([v[1] for v in values])[0]
        print(
            f"ratio {name} / smtp-sink: msgs/s {rate / base_rate:.2f}x (goal >= 1.0),"
            f" CPU/msg {cpu / base_cpu:.2f}x (goal <= 1.0)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
