"""``fastsend demo``: the whole engine on one machine with no outside services.

Starts ``fastsend sink`` on loopback, writes a personalised campaign and a
100,000-recipient list to a temporary directory, sends it from several source
IPs on 127.0.0.0/8 (127.0.0.2, 127.0.0.3, ... one or more per worker) through
the real supervisor, workers, rings and spool, and prints the report: our
summary, and the sink's count of what it received and from which IPs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import orjson

from fastsend.commands.common import print_summary
from fastsend.config import Config, Route

CAMPAIGN = """\
from = "fastsend demo <news@demo.example.com>"
subject = "Hello {{ first_name }}, your {{ plan }} plan report"
text = \"\"\"Hi {{ first_name }},

This is your personal report for account {{ account }} on the {{ plan }} plan.
{{ filler }}

-- the fastsend demo
\"\"\"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipients", type=int, default=100_000, help="how many (default 100000)")
    p.add_argument("--ips", type=int, default=4, help="source IPs 127.0.0.2.. (default 4)")
    p.add_argument("--workers", type=int, default=0, help="workers (default: one per core)")
    p.add_argument("--size", type=int, default=4096, help="approximate message size in bytes")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from fastsend.sink import SinkProcess

    if not 1 <= args.ips <= 250:
        print("fastsend demo: --ips must be 1..250", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="fastsend-demo-")
    camp_path = os.path.join(tmp, "campaign.toml")
    with open(camp_path, "w") as f:
        f.write(CAMPAIGN)
    rcpt_path = os.path.join(tmp, "recipients.csv")
    filler_len = max(0, args.size - 700)
    filler = ("lorem ipsum dolor sit amet " * (filler_len // 27 + 1))[:filler_len]
    with open(rcpt_path, "w") as f:
        f.write("email,first_name,plan,account,filler\n")
        for i in range(args.recipients):
            f.write(
                f"user{i}@demo{i % 50}.example.net,Name{i},{('free', 'pro', 'team')[i % 3]},"
                f"A{i:08d},{filler}\n"
            )
    log_path = os.path.join(tmp, "sink.jsonl")
    cfg = Config()
    cfg.spool_dir = os.path.join(tmp, "spool")
    cfg.workers = args.workers
    cfg.source_ips = [f"127.0.0.{2 + i}" for i in range(args.ips)]
    cfg.helo = "demo.example.com"
    print(
        f"fastsend demo: {args.recipients} recipients, {len(cfg.source_ips)} source IPs,"
        f" {cfg.worker_count} workers, work dir {tmp}",
        file=sys.stderr,
    )
    with SinkProcess("--log", log_path) as sink:
        host, port = sink.addresses[0]
        cfg.routes["*"] = Route(host, port)
        from fastsend.commands.send import run as send_run

        ns = argparse.Namespace(
            campaign=camp_path,
            recipients=rcpt_path,
            strict=False,
            no_dkim=True,
            name="demo",
            config=None,
            spool=cfg.spool_dir,
            route=[f"*={host}:{port}"],
            source_ip=",".join(cfg.source_ips),
            workers=args.workers or None,
            max_wait=30.0,
            helo=cfg.helo,
            nameserver=[],
            json=True,
            no_progress=False,
            retry="1,5,60",
        )
        import contextlib
        import io

        buf = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(buf):
            rc = send_run(ns)
        elapsed = time.monotonic() - t0
    summary = orjson.loads(buf.getvalue().strip().splitlines()[-1]) if buf.getvalue() else {}
    peers: dict[str, int] = {}
    received = 0
    with open(log_path, "rb") as f:
        for line in f:
            rec = orjson.loads(line)
            received += len(rec.get("recipients", []))
            peers[rec.get("peer", "?")] = peers.get(rec.get("peer", "?"), 0) + 1
    summary["sink_received"] = received
    summary["sink_peers"] = peers
    summary["total_elapsed_s"] = round(elapsed, 2)
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print_summary(summary, False)
        print(
            f"sink received {received} recipients from "
            + ", ".join(f"{ip} ({n})" for ip, n in sorted(peers.items()))
        )
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    engine_ok = rc == 0 and received >= summary.get("delivered", 0) > 0
    return 0 if engine_ok else 1
