#!/usr/bin/env python3
"""BDAT (CHUNKING) against DATA: fastsend's client, same server, same run.

Postfix's smtp-sink offers no CHUNKING, so this bench uses fastsend's own sink
(``fastsend sink``, its own process on 127.0.0.1), which offers CHUNKING and
PIPELINING and can delay its replies (``--latency-ms``) to stand in for a
real network. The client sends the same ~4 KB messages over the same number
of persistent connections, once with ``chunking=False`` (DATA: one round trip
per message per connection) and once with BDAT (whole transactions streamed).

It prints msgs/s and client CPU microseconds per message (process time of the
send phase) for both and the ratios; it exits non-zero when a number cannot
be measured or a message was not delivered. Baseline: the DATA path.

Usage::

    python bench/smtp_bdat.py                    # 20,000 messages, 0 and 5 ms latency
    python bench/smtp_bdat.py --messages 50000 --connections 20 --latency-ms 0,2,10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import uvloop
from _common import free_port, port_open

from fastsend.outcome import Envelope
from fastsend.smtp import ConnectOptions, SMTPConnection, connect

BODY = b"Subject: bench\r\nMIME-Version: 1.0\r\n\r\n" + (b"x" * 76 + b"\r\n") * 52


async def send_all(
    port: int, chunking: bool, messages: int, connections: int
) -> tuple[float, float, int]:
    """(msgs/s, CPU us/msg, delivered) for one client configuration."""
    per_conn = messages // connections

    async def worker(k: int) -> int:
        conn = await connect(
            ConnectOptions(
                host="127.0.0.1", port=port, tls="off", chunking=chunking, max_messages=per_conn
            )
        )
        if not isinstance(conn, SMTPConnection):
            print(f"error: connect: {conn}", file=sys.stderr)
            return 0
        ok = 0
        for start in range(0, per_conn, 100):
            n = min(100, per_conn - start)
            batch = [
                Envelope("news@example.org", [f"u{k}.{start + i}@example.com"], BODY)
                for i in range(n)
            ]
            for r in await conn.send(batch):
                ok += sum(o.delivered for o in r.outcomes)
        await conn.quit()
        return ok

    t0, c0 = time.perf_counter(), time.process_time()
    delivered = sum(await asyncio.gather(*(worker(k) for k in range(connections))))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    total = per_conn * connections
    return total / wall, cpu / total * 1e6, delivered - total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--latency-ms", default="0,5", help="sink reply delays to try, e.g. 0,5")
    args = ap.parse_args()
    cpu_model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu_model = ln.split(":", 1)[1].strip()
                break
    print(f"machine: {os.cpu_count()} cores, {cpu_model}")
    print(
        f"settings: {args.messages} messages of {len(BODY)} B, {args.connections} connections,"
        " fastsend sink on 127.0.0.1 (its own process); CPU = client process time, send phase"
    )
    status = 0
    for latency in args.latency_ms.split(","):
        port = free_port()
        cmd = [sys.executable, "-m", "fastsend", "sink", "--listen", f"127.0.0.1:{port}"]
        cmd += ["--quiet", "--latency-ms", latency]
        sink = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not port_open(port, 30.0):
                print("error: fastsend sink did not start", file=sys.stderr)
                return 2
            got = {}
            for chunking in (False, True):
                rate, cpu_us, missing = uvloop.run(
                    send_all(port, chunking, args.messages, args.connections)
                )
                if missing or rate <= 0 or cpu_us <= 0:
                    print(f"error: {-missing} messages not delivered", file=sys.stderr)
                    status = 1
                    continue
                got[chunking] = (rate, cpu_us)
                name = "BDAT" if chunking else "DATA"
                print(
                    f"  latency {latency:>3} ms  {name}  {rate:9.0f} msg/s  {cpu_us:6.1f} us CPU/msg"
                )
            if len(got) == 2:
                print(
                    f"  latency {latency:>3} ms  ratio BDAT/DATA: msgs/s {got[True][0] / got[False][0]:.2f}x,"
                    f" CPU/msg {got[True][1] / got[False][1]:.2f}x"
                )
        finally:
            sink.terminate()
            sink.wait(10)
    return status


if __name__ == "__main__":
    sys.exit(main())
