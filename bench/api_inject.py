"""Bench: recipients accepted per second through POST /v1/messages (durable when answered).

Starts a real ``fastsend serve`` process on a fresh spool, creates an API key,
then runs the client in another process: ``--connections`` concurrent aiohttp
connections, each POSTing ``{"messages": [...]}`` bodies of ``--batch``
messages (one recipient each, ~300 bytes of text) back to back for
``--seconds``. Bodies are built before the clock starts, so the client costs
little. Prints the rate, the machine and settings, and the ratio against the
goal (20,000 recipients/s in batches of 500), and checks that the spool holds
every accepted recipient. Exits non-zero when nothing could be measured (a
failed request, a server that did not start, a spool that lost rows).

    python bench/api_inject.py [--seconds 5] [--connections 4] [--batch 500]
                               [--deliver]   # also run workers delivering to a sink

By default the server runs with ``--no-workers`` (an ingest node: the number
is the API and the spool commit, not delivery competing for the same two
cores); ``--deliver`` runs the supervisor and one worker delivering everything
to ``fastsend sink`` at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import orjson
import psutil
from _common import free_port, machine, wait_port

GOAL = 20_000.0


def client(args: argparse.Namespace) -> int:
    """The client process: prints one JSON line {accepted, seconds, requests, errors}."""
    import aiohttp

    url = f"http://127.0.0.1:{args.port}/v1/messages"
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    text = "Hello, this is a transactional message from the API bench. " * 5
    bodies = []
    for b in range(64):
        msgs = [
            {"from": "Bench <bench@example.com>", "to": f"user{b}-{i}@example.org",
             "subject": f"Order {b}-{i}", "text": text, "tags": ["bench"]}
            for i in range(args.batch)
        ]  # fmt: skip
        bodies.append(orjson.dumps({"messages": msgs}))

    async def main() -> dict[str, float]:
        accepted = requests = errors = 0
        stop = time.perf_counter() + args.seconds
        conn = aiohttp.TCPConnector(limit=args.connections)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def one(n: int) -> None:
                nonlocal accepted, requests, errors
                i = n
                while time.perf_counter() < stop:
                    async with s.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                        body = await r.read()
                        requests += 1
                        if r.status != 202:
                            errors += 1
                            print(f"bench client: HTTP {r.status}: {body[:200]!r}", file=sys.stderr)
                            return
                        accepted += orjson.loads(body)["accepted"]
                    i += args.connections

            t0 = time.perf_counter()
            await asyncio.gather(*(one(n) for n in range(args.connections)))
            el = time.perf_counter() - t0
        return {"accepted": accepted, "seconds": el, "requests": requests, "errors": errors}

    print(orjson.dumps(asyncio.run(main())).decode(), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--deliver", action="store_true", help="run workers delivering to a sink")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client(args)

    tmp = tempfile.mkdtemp(prefix="fastsend-api-bench-")
    port = free_port()
    sink_port = free_port()
    cfg = os.path.join(tmp, "fastsend.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[spool]\ndir = "spool"\n[workers]\ncount = 1\n[routes]\n"*" = "127.0.0.1:{sink_port}"\n'
            f'[delivery]\ntls = "off"\n[api]\nlisten = "127.0.0.1:{port}"\n'
            f"max_batch = {max(args.batch, 500)}\nmax_body_bytes = {64 << 20}\n"
            "rate_limit = 100000.0\n"
        )
    fs = [sys.executable, "-m", "fastsend"]
    key = subprocess.run(
        [*fs, "apikey", "create", "--tenant", "bench", "-c", cfg],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    if args.deliver:
        procs.append(
            subprocess.Popen(
                [*fs, "sink", "--listen", f"127.0.0.1:{sink_port}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_port(sink_port)
    serve = [*fs, "serve", "-c", cfg] + ([] if args.deliver else ["--no-workers"])
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(server)
    try:
        t_start = time.perf_counter()
        wait_port(port, 15)
        startup = time.perf_counter() - t_start
        ps = psutil.Process(server.pid)
        cpu0 = ps.cpu_times()
        out = subprocess.run(
            [sys.executable, __file__, "--client", "--port", str(port), "--key", key,
             "--seconds", str(args.seconds), "--connections", str(args.connections),
             "--batch", str(args.batch)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        cpu1 = ps.cpu_times()
        if out.returncode != 0 or not out.stdout.strip():
            print(out.stderr, file=sys.stderr)
            print("api_inject: the client failed; nothing measured", file=sys.stderr)
            return 1
        r = orjson.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    from fastsend.spool import open_spool

    spool = open_spool(os.path.join(tmp, "spool"), readonly=True)
    stored = sum(spool.counts().values())
    spool.close()
    rate = r["accepted"] / r["seconds"] if r["seconds"] > 0 else 0.0
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(f"machine: {machine()}")
    print(
        f"settings: {args.connections} connections, batches of {args.batch} messages"
        f" (1 recipient each), {args.seconds:g} s, server "
        f"{'with 1 worker delivering to fastsend sink' if args.deliver else '--no-workers'}"
    )
    print(f"server ready in {startup:.2f} s (port open)")
    print(
        f"accepted {r['accepted']} recipients in {r['requests']} requests over"
        f" {r['seconds']:.2f} s: {rate:,.0f} recipients/s"
    )
    if r["accepted"]:
        print(f"server CPU: {cpu / r['accepted'] * 1e6:.1f} us per recipient")
    print(f"spool holds {stored} messages (accepted {r['accepted']})")
    print(f"ratio against the goal of {GOAL:,.0f}/s: {rate / GOAL:.2f}")
    if r["errors"] or not r["accepted"] or stored < r["accepted"]:
        print("api_inject: errors or lost rows; the figure is not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
