#!/usr/bin/env python3
"""Throughput of fastsend's SMTP client against Postfix's smtp-source, on smtp-sink.

Both send the same number of ~4.3 KB messages (4 KB payload plus personalised
headers: a per-recipient To, Subject and Message-ID spliced into a fixed
body) to one Postfix ``smtp-sink`` process on 127.0.0.1, in the same run:

- ``smtp-source -d`` (persistent connections; Postfix's C load generator) at
  several session counts; its best is the baseline. smtp-source does not
  pipeline: one round trip per command, so it needs more sessions to fill
  the link, where fastsend pipelines MAIL/RCPT/DATA (RFC 2920).
- fastsend: ``fastsend.smtp.connect`` + ``SMTPConnection.send`` over N
  persistent pipelined connections on uvloop, in a child process.

Both are timed the same way, from process launch to exit (interpreter
start-up and imports included for fastsend); the send phase alone follows,
labelled. Client CPU is measured from the kernel (``os.wait4`` rusage of each
client process: user + system, start-up included). Each setting runs
``--repeat`` times (default 3), interleaved, and the median is shown with the
min-max. It prints msgs/s and client CPU
microseconds per message for both, the ratios, the machine and the settings,
and exits non-zero when a number cannot be measured (sink did not start, a
client failed, a message was not delivered).

Usage::

    python bench/smtp_throughput.py                # 100,000 messages, sweeps
    python bench/smtp_throughput.py --quick        # 20,000 messages, one setting each
    python bench/smtp_throughput.py --messages 50000 --connections 10,30 --sessions 10,20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from _common import fmt_mr, free_port, machine, median_range, port_open, program

PAYLOAD = 4096  # smtp-source -l: payload bytes, headers not included
# msgs/s from launch, CPU us/msg (process), msgs/s of the send phase, CPU us/msg (send phase)
Measured = tuple[float, float, float, float]


def run_measured(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run a client process; (exit status, wall seconds, CPU seconds, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _pid, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return proc.returncode, wall, ru.ru_utime + ru.ru_stime, out.decode(errors="replace")


def measure_source(exe: str, port: int, sessions: int, messages: int) -> Measured | None:
    """smtp-source -d with ``sessions`` parallel sessions: (msgs/s, client CPU us/msg, same)."""
    cmd = [exe, "-4", "-d", "-N", "-M", "localhost", "-f", "news@example.org"]
    cmd += ["-s", str(sessions), "-m", str(messages), "-l", str(PAYLOAD), f"127.0.0.1:{port}"]
    rc, wall, cpu, _out = run_measured(cmd)
    if rc != 0 or cpu <= 0 or wall <= 0:
        print(f"error: smtp-source -s {sessions} exited {rc} (cpu {cpu})", file=sys.stderr)
        return None
    rate, us = messages / wall, cpu / messages * 1e6
    return rate, us, rate, us


def measure_fastsend(port: int, connections: int, messages: int, batch: int) -> Measured | None:
    """fastsend in a child process: msgs/s from launch and of the send phase, CPU
    us/msg of the whole process and of the send phase alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--client", str(connections)]
    cmd += ["--port", str(port), "--messages", str(messages), "--batch", str(batch)]
    rc, wall, cpu, out = run_measured(cmd)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {}
    if rc != 0 or not res or cpu <= 0 or res["wall"] <= 0:
        problems = res.get("problems")
        print(
            f"error: fastsend ({connections} connections) exited {rc}: {problems}", file=sys.stderr
        )
        return None
    if not res["compiled"]:
        print("note: fastsend._core not in use (pure-Python twins)", file=sys.stderr)
    return (
        messages / wall,
        cpu / messages * 1e6,
        messages / res["wall"],
        res["cpu"] / messages * 1e6,
    )


def measure_fastsend_parallel(
    port: int, procs: int, connections: int, messages: int, batch: int, per_conn: int = 0
) -> Measured | None:
    """``procs`` client processes at once (as ``fastsend send`` runs one worker
    process per core), each with ``connections`` connections (a new one every
    ``per_conn`` messages) and its share of ``messages``: the same (msgs/s,
    CPU us/msg) figures as :func:`measure_fastsend`, for all of them together
    (CPU summed, rates over the slowest)."""
    share = [messages // procs + (1 if i < messages % procs else 0) for i in range(procs)]
    t0 = time.perf_counter()
    running = []
    for n in share:
        cmd = [sys.executable, os.path.abspath(__file__), "--client", str(connections)]
        cmd += ["--port", str(port), "--messages", str(n), "--batch", str(batch)]
        cmd += ["--per-conn", str(per_conn)]
        running.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    cpu = send_cpu = send_wall = 0.0
    failed = False
    for p in running:
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        _pid, status, ru = os.wait4(p.pid, 0)
        cpu += ru.ru_utime + ru.ru_stime
        try:
            res = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {}
        if os.waitstatus_to_exitcode(status) != 0 or not res or res["wall"] <= 0:
            sys.stderr.write(err.decode(errors="replace")[-2000:])
            failed = True
            continue
        send_cpu += res["cpu"]
        send_wall = max(send_wall, res["wall"])
    wall = time.perf_counter() - t0
    if failed or cpu <= 0:
        print(
            f"error: fastsend clients ({procs} x {connections} connections) failed", file=sys.stderr
        )
        return None
    return messages / wall, cpu / messages * 1e6, messages / send_wall, send_cpu / messages * 1e6


# --- the fastsend client (runs in a child process) ----------------------------


def body_template() -> tuple[bytes, bytes, bytes, bytes]:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n"
    body = (line * (PAYLOAD // len(line) + 1))[: PAYLOAD - 2] + b"\r\n"
    head1 = b"From: News <news@example.org>\r\nTo: <user"
    head2 = b"@example.com>\r\nSubject: Hello user"
    head3 = b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\nMessage-ID: <"
    return head1, head2, head3, b".bench@example.org>\r\n\r\n" + body


async def fastsend_client(
    port: int, messages: int, connections: int, batch: int, per_conn: int = 0
) -> dict[str, Any]:
    from fastsend.outcome import Envelope
    from fastsend.smtp import ConnectOptions, SMTPConnection, connect

    head1, head2, head3, tail = body_template()
    next_index = 0
    delivered = 0
    problems: list[str] = []

    async def worker() -> None:
        # A new connection every `per_conn` messages, as a worker's connections
        # end at [delivery] max_messages_per_connection.
        nonlocal next_index, delivered
        while next_index < messages:
            conn = await connect(
                ConnectOptions(
                    host="127.0.0.1", port=port, tls="off", max_messages=per_conn or messages
                )
            )
            if not isinstance(conn, SMTPConnection):
                problems.append(f"connect: {conn}")
                return
            while next_index < messages and conn.remaining:
                start = next_index
                end = min(start + batch, messages, start + conn.remaining)
                next_index = end
                envs = []
                for i in range(start, end):
                    n = b"%d" % i
                    data = b"".join((head1, n, head2, n, head3, n, tail))
                    envs.append(Envelope("news@example.org", [f"user{i}@example.com"], data))
                for r in await conn.send(envs):
                    for o in r.outcomes:
                        if o.kind == "delivered":
                            delivered += 1
                        elif len(problems) < 5:
                            problems.append(str(o))
            await conn.quit()

    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return {
        "wall": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
        "delivered": delivered,
        "problems": problems,
        "size": len(b"".join((head1, b"50000", head2, b"50000", head3, b"50000", tail))),
    }


def client_main(args: argparse.Namespace) -> int:
    import uvloop

    result = uvloop.run(
        fastsend_client(args.port, args.messages, args.client, args.batch, args.per_conn)
    )
    from fastsend import _accel

    result["compiled"] = _accel.HAVE_EXTENSIONS and not _accel.NO_EXTENSIONS
    print(json.dumps(result))
    return 0 if result["delivered"] == args.messages else 1


# --- the driver ----------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=0, help="messages per run (default 100000)")
    ap.add_argument("--connections", default="", help="fastsend connection counts, e.g. 10,20,50")
    ap.add_argument("--sessions", default="", help="smtp-source session counts, e.g. 5,10,20,50")
    ap.add_argument("--batch", type=int, default=100, help="envelopes per send() call")
    ap.add_argument("--quick", action="store_true", help="20,000 messages, one setting each")
    ap.add_argument(
        "--repeat", type=int, default=3, help="interleaved runs per setting (median, min-max)"
    )
    ap.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--per-conn", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client_main(args)

    messages = args.messages or (20_000 if args.quick else 100_000)
    conns = [int(x) for x in (args.connections or ("20" if args.quick else "10,20,50")).split(",")]
    sessions = [
        int(x) for x in (args.sessions or ("10" if args.quick else "5,10,20,50")).split(",")
    ]
    sink_exe, source_exe = program("smtp-sink"), program("smtp-source")
    port = free_port()
    sink_cmd = [sink_exe, "-4"]
    if os.geteuid() == 0:
        sink_cmd += ["-u", "nobody"]
    sink_cmd += [f"127.0.0.1:{port}", "1024"]
    sink = subprocess.Popen(sink_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failed = False
    rows: list[tuple[str, int, float, float]] = []  # (who, setting, median msgs/s, us/msg)
    try:
        if not port_open(port):
            print("error: smtp-sink did not start", file=sys.stderr)
            return 2
        print(f"machine: {machine()}")
        print(
            f"settings: {messages} messages of ~{PAYLOAD + 180} B (payload {PAYLOAD} B) each side,"
            f" {args.repeat} interleaved run(s) per setting, median (min-max); batch {args.batch};"
            f" smtp-sink on 127.0.0.1:{port}; msgs/s and CPU (user+sys, wait4) of the whole"
            " client process from launch to exit; smtp-source does not pipeline, fastsend does"
        )
        runs: dict[tuple[str, int], list[Measured]] = {}
        for _rep in range(max(1, args.repeat)):  # interleaved, so noise hits both alike
            for s in sessions:
                got = measure_source(source_exe, port, s, messages)
                if got is None:
                    failed = True
                else:
                    runs.setdefault(("smtp-source", s), []).append(got)
            for c in conns:
                got = measure_fastsend(port, c, messages, args.batch)
                if got is None:
                    failed = True
                else:
                    runs.setdefault(("fastsend", c), []).append(got)
        for (who, setting), values in runs.items():
            rates = [v[0] for v in values]
            cpus = [v[1] for v in values]
            rows.append((who, setting, median_range(rates)[0], median_range(cpus)[0]))
            label = f"-d -s {setting}" if who == "smtp-source" else f"{setting} connections"
            extra = ""
            if who == "fastsend":
                extra = (
                    f"  (send phase alone: {fmt_mr([v[2] for v in values])} msg/s,"
                    f" {fmt_mr([v[3] for v in values], '.1f')} us CPU/msg)"
                )
            print(
                f"  {who:<11} {label:<15} {fmt_mr(rates):>22} msg/s"
                f"  {fmt_mr(cpus, '.1f'):>20} us CPU/msg{extra}"
            )
    finally:
        sink.terminate()
        sink.wait(5)
    src = [r for r in rows if r[0] == "smtp-source"]
    fs = [r for r in rows if r[0] == "fastsend"]
    if failed or not src or not fs:
        print("error: could not measure both clients", file=sys.stderr)
        return 1
    best_src = max(src, key=lambda r: r[2])
    best_fs = max(fs, key=lambda r: r[2])
    rate_ratio = best_fs[2] / best_src[2]
    cpu_ratio = best_fs[3] / best_src[3]
    print(
        f"baseline: smtp-source -s {best_src[1]}: {best_src[2]:.0f} msg/s, {best_src[3]:.1f} us CPU/msg"
    )
    print(
        f"fastsend: {best_fs[1]} connections: {best_fs[2]:.0f} msg/s, {best_fs[3]:.1f} us CPU/msg"
    )
    print(f"ratio msgs/s (fastsend / smtp-source, from launch): {rate_ratio:.2f}x  (goal >= 1.0)")
    print(f"ratio CPU/msg (fastsend / smtp-source): {cpu_ratio:.2f}x  (goal <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
