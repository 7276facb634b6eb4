"""The supervisor's CPU per second while a send waits: `fastsend send` of a
list to a receiver that accepts connections and never answers (every window
fills, behind the guardrails' sample, and stays full), its supervisor's CPU
read from /proc over a span once the windows are full. What it spends then is
spent by the clock, not by the mail (a slow receiver, a DKIM-signed send whose
workers are busy signing): it should be near nothing.

    python bench/supervisor_idle.py                  # 20,000 rows, 12 s, 2 runs
    python bench/supervisor_idle.py --seconds 20 --repeat 3
    python bench/supervisor_idle.py --deferred --messages 200 --warm 8
        # the other wait: a receiver that defers every recipient (`fastsend
        # sink --defer-rate 1`), so the windows are empty, with room, and
        # nothing is due until the retries (a serve at rest, a send's tail)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from _common import free_port, machine, median_range, proc_cpu_s, wait_port
from end_to_end import write_inputs


def silent_receiver() -> tuple[socket.socket, int]:
    """A listener that accepts every connection and never says a word."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return ls, ls.getsockname()[1]


def run(tmp: str, camp: str, rcpts: str, port: int, warm: float, seconds: float, tag: str) -> float:
    """ms of the supervisor's CPU per second over ``seconds``, after ``warm``."""
    spool = os.path.join(tmp, f"spool-{tag}")
    cmd = [sys.executable, "-m", "fastsend", "send", camp, "-r", rcpts,
           "--route", f"*=127.0.0.1:{port}", "--source-ip", "127.0.0.2,127.0.0.3",
           "--workers", "2", "--spool", spool, "--json", "--no-progress", "--no-dkim"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(warm)  # start-up, the list spooled, the windows full
        if proc.poll() is not None:
            raise SystemExit(f"fastsend send exited early ({proc.returncode})")
        c0, t0 = proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = proc_cpu_s(proc.pid), time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    return 1000 * (c1 - c0) / (t1 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=12.0, help="the span measured")
    ap.add_argument("--warm", type=float, default=6.0, help="s before it (start-up)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--deferred", action="store_true", help="a receiver deferring every recipient")
    args = ap.parse_args()
    if args.deferred:
        port = free_port()
        sink = subprocess.Popen(
            [sys.executable, "-m", "fastsend", "sink", "--listen", f"127.0.0.1:{port}",
             "--defer-rate", "1", "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(port)
        ls: socket.socket | None = None
    else:
        ls, port = silent_receiver()
    with tempfile.TemporaryDirectory(prefix="fastsend-idle-") as tmp:
        camp, rcpts = write_inputs(tmp, args.messages, 4096)
        got = [
            run(tmp, camp, rcpts, port, args.warm, args.seconds, str(i)) for i in range(args.repeat)
        ]
    if ls is not None:
        ls.close()
    else:
        sink.kill()
        sink.wait()
    med, lo, hi = median_range(got)
    print(f"machine: {machine()}")
    what = "defers every recipient" if args.deferred else "never answers"
    print(f"settings: {args.messages} rows, 2 workers, a receiver that {what};"
          f" {args.seconds:g} s measured after {args.warm:g} s, {args.repeat} runs")  # fmt: skip
    print(f"supervisor CPU while the send waits: {med:.1f} ({lo:.1f}-{hi:.1f}) ms a second")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
