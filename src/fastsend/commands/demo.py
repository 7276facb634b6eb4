"""``fastsend demo``: the whole engine on one machine with no outside services.

Starts ``fastsend sink`` on loopback, writes a personalised campaign and a
100,000-recipient list to a temporary directory, sends it from several source
IPs on 127.0.0.0/8 (127.0.0.2, 127.0.0.3, ... one or more per worker) through
the real supervisor, workers, rings and spool, and prints the report: our
summary, the sink's count of what it received and from which IPs, and which
side bounded the rate: the CPU each side used over the run (the sink is one
process on one core; the sender is the supervisor plus its workers), against
what each could use.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import orjson

from fastsend.commands.common import print_summary
from fastsend.config import Config, Route

CAMPAIGN = """\
from = "fastsend demo <news@demo.example.com>"
subject = "Hello {{ first_name }}, your {{ plan }} plan report"
text = \"\"\"Hi {{ first_name }},

This is your personal report for account {{ account }} on the {{ plan }} plan.
FILLER

-- the fastsend demo
\"\"\"
"""


# Octets of a demo message beyond --size at most (its headers and MIME framing:
# --size is approximate; its body grows ~4% in quoted-printable, 5% allowed):
# the largest --size still fits [delivery] max_message_size.
SIZE_MARGIN = 4096


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
    # (0 or -5 recipients ran a demo of nothing and exited 1; --workers -1 and
    # --size -1 were taken as the defaults)
    for flag, value, low in (("--recipients", args.recipients, 1), ("--workers", args.workers, 0),
                             ("--size", args.size, 0)):  # fmt: skip
        if value < low:
            print(f"fastsend demo: {flag} must be at least {low}", file=sys.stderr)
            return 2
    # A message the engine would refuse (send said so, then the demo printed a
    # summary of nothing, exit 1), or a body past memory (--size 999999999999: a
    # MemoryError traceback).
    most = (Config().delivery.max_message_size - SIZE_MARGIN) * 19 // 20
    if args.size > most:
        print(
            f"fastsend demo: --size must be at most {most:,} (a message under [delivery]"
            " max_message_size, 25 MiB)",
            file=sys.stderr,
        )
        return 2
    tmp = tempfile.mkdtemp(prefix="fastsend-demo-")
    camp_path = os.path.join(tmp, "campaign.toml")
    # The bulk of the body is the template's, as in a real campaign; each row
    # carries what personalises it (a few fields of tens of bytes).
    filler_len = max(0, args.size - 700)
    filler = ("lorem ipsum dolor sit amet " * (filler_len // 27 + 1))[:filler_len]
    with open(camp_path, "w") as f:
        f.write(CAMPAIGN.replace("FILLER", filler))
    rcpt_path = os.path.join(tmp, "recipients.csv")
    with open(rcpt_path, "w") as f:
        f.write("email,first_name,plan,account\n")
        for i in range(args.recipients):
            f.write(
                f"user{i}@demo{i % 50}.example.net,Name{i},{('free', 'pro', 'team')[i % 3]},"
                f"A{i:08d}\n"
            )
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
    import psutil

    # counting only: the sink's fast path; a kill -9 of the demo takes it along
    with SinkProcess("--json", die_with_parent=True) as sink:
        host, port = sink.addresses[0]
        assert sink.proc is not None
        sink_ps = psutil.Process(sink.proc.pid)
        sink_cpu0 = sink_ps.cpu_times()
        machine0 = psutil.cpu_times()
        cfg.routes["*"] = Route(host, port)
        from fastsend.commands import send

        # send's own parser, so every send option has its default here too.
        parser = argparse.ArgumentParser(prog="fastsend send")
        send.add_arguments(parser)
        ns = parser.parse_args(
            [
                camp_path, "--recipients", rcpt_path, "--no-dkim", "--name", "demo",
                "--spool", cfg.spool_dir, "--route", f"*={host}:{port}",
                "--source-ip", ",".join(cfg.source_ips), "--max-wait", "30",
                "--json", "--retry", "1,5,60",
                *(["--workers", str(args.workers)] if args.workers else []),
                *(["--helo", cfg.helo] if cfg.helo else []),
            ]
        )  # fmt: skip
        import contextlib
        import io

        buf = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(buf):
            rc = send.run(ns)
        elapsed = time.monotonic() - t0
        sink_cpu1 = sink_ps.cpu_times()
        machine1 = psutil.cpu_times()
    if not buf.getvalue():  # send stopped before its run (said why): no report of nothing
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return rc or 1
    sink_cpu = (sink_cpu1.user - sink_cpu0.user) + (sink_cpu1.system - sink_cpu0.system)
    summary = orjson.loads(buf.getvalue().strip().splitlines()[-1])
    try:
        sink_summary = orjson.loads(sink.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sink_summary = {}
    received = int(sink_summary.get("recipients", 0))
    peers: dict[str, int] = sink_summary.get("peers", {})
    summary["sink_received"] = received
    summary["sink_peers"] = peers
    summary["total_elapsed_s"] = round(elapsed, 2)
    summary["sink_cpu_s"] = round(sink_cpu, 3)
    summary["bound_by"] = bound_by(
        elapsed,
        sink_cpu,
        float(summary.get("supervisor_cpu_s", 0.0)),
        float(summary.get("workers_cpu_s", 0.0)),
        cfg.worker_count,
        _busy(machine1) - _busy(machine0),
    )
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print_summary(summary, False)
        print(
            f"sink received {received} recipients from "
            + ", ".join(f"{ip} ({n})" for ip, n in sorted(peers.items()))
        )
        print(f"rate bounded by: {summary['bound_by']}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if rc >= 128:  # stopped by a signal: its status (it was 1), as every command's
        if not args.keep:  # (send named a resume command for the spool just removed)
            print(f"fastsend demo: stopped; {tmp} removed (--keep keeps it)", file=sys.stderr)
        return rc
    engine_ok = rc == 0 and received >= summary.get("delivered", 0) > 0
    return 0 if engine_ok else 1


def _busy(t: Any) -> float:
    """CPU seconds the whole machine spent not idle."""
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def bound_by(
    elapsed: float,
    sink_cpu: float,
    sup_cpu: float,
    workers_cpu: float,
    workers: int,
    machine_cpu: float,
) -> str:
    """Which side bounded the rate, from the CPU each used over the run: the sink
    is one process (at most one core), the sender a supervisor and ``workers``
    workers; when all cores were busy (with anything), the machine."""
    if elapsed <= 0:
        return "unknown (no time elapsed)"
    cores = os.cpu_count() or 1
    machine_busy = machine_cpu / elapsed
    sink_busy = sink_cpu / elapsed
    send_busy = (sup_cpu + workers_cpu) / elapsed
    worker_busy = workers_cpu / elapsed / max(1, workers)
    sup_busy = sup_cpu / elapsed
    figures = (
        f"sink {sink_busy:.0%} of one core, sender {send_busy:.0%} of a core"
        f" (supervisor {sup_busy:.0%}, workers {worker_busy:.0%} each),"
        f" machine {machine_busy:.0%} of {cores} cores"
    )
    if machine_busy >= 0.85 * cores:
        who = "the machine (all its cores were busy" + (
            ", partly with other processes)" if sink_busy + send_busy < 0.7 * cores else ")"
        )
    elif sink_busy >= 0.85:
        who = "the sink (its one core is saturated)"
    elif max(worker_busy, sup_busy) >= 0.85:
        who = (
            "the sender (" + ("its supervisor" if sup_busy >= worker_busy else "its workers") + ")"
        )
    else:
        who = "neither side's CPU (latency: connections, round trips, or the retry schedule)"
    return f"{who}; {figures}"
