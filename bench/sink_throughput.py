"""Bench: `fastsend sink` against Postfix's smtp-sink, same client, same run.

The client is Postfix's C load generator smtp-source (persistent sessions,
~4 KB messages), so the client costs the same for both servers. Printed per
server: messages/s and server CPU microseconds per message (from psutil), then
the ratios fastsend/smtp-sink. Exits non-zero when a figure cannot be measured.

    python bench/sink_throughput.py [--messages 50000] [--sessions 10] [--size 4096]

It does not test faults or TLS; it measures the plain accept path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil
from _common import free_port, program, wait_port


def measure(server: list[str], port: int, args: argparse.Namespace) -> tuple[float, float]:
    """(messages/s, server CPU us/message) for smtp-source against one server."""
    proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        ps = psutil.Process(proc.pid)
        cpu0 = ps.cpu_times()
        t0 = time.perf_counter()
        subprocess.run(
            [
                program("smtp-source"),
                "-d",
                "-s",
                str(args.sessions),
                "-l",
                str(args.size),
                "-m",
                str(args.messages),
                "-f",
                "bench@example.test",
                "-t",
                "rcpt@example.test",
                f"127.0.0.1:{port}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        elapsed = time.perf_counter() - t0
        cpu1 = ps.cpu_times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return args.messages / elapsed, cpu / args.messages * 1e6
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()

    port = free_port()
    base = measure(
        [program("smtp-sink"), "-4", "-u", "nobody", "-c", f"127.0.0.1:{port}", "256"], port, args
    )
    port = free_port()
    ours = measure(
        [sys.executable, "-m", "fastsend", "sink", "--listen", f"127.0.0.1:{port}", "--quiet"],
        port,
        args,
    )
    if min(base + ours) <= 0:
        print("could not measure", file=sys.stderr)
        return 1
    print(f"client: smtp-source -d -s {args.sessions} -l {args.size} -m {args.messages}")
    print(f"smtp-sink (baseline): {base[0]:10,.0f} msg/s  {base[1]:7.1f} us CPU/msg")
    print(f"fastsend sink:        {ours[0]:10,.0f} msg/s  {ours[1]:7.1f} us CPU/msg")
    print(
        f"ratio rate {ours[0] / base[0]:.2f}x, CPU/msg {ours[1] / base[1]:.2f}x (fastsend / smtp-sink)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
