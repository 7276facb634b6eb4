"""``fastsend sink``: run the fault-injecting SMTP sink from the command line.

Prints ``listening on HOST:PORT`` for each address and then ``ready`` on
stdout (flushed, so scripts and :class:`fastsend.sink.SinkProcess` can wait
for it), a live count once a second on stderr (when stderr is a TTY, or with
``--progress``), and a summary on stdout at exit: Ctrl-C, SIGTERM, or
``--count N`` messages. ``--quiet`` prints nothing but errors. ``--json``
prints the summary as one JSON object instead of text.

This module only turns options into a :class:`SinkConfig` and runs the loop;
the server lives in :mod:`fastsend.sink.server`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from fastsend.faults import FAULT, countdown
from fastsend.procs import die_with_parent
from fastsend.sink.server import Sink, SinkConfig, SinkStats, parse_fault_text


def parse_listen(value: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` (``[v6]:port`` for IPv6) -> addresses."""
    out: list[tuple[str, int]] = []
    for item in value.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"bad listen address {item!r}: expected HOST:PORT")
        out.append((host, int(port)))
    return out


def _float_in(lo: float, hi: float, outside: str) -> Callable[[str], float]:
    """An argparse type: a float from ``lo`` to ``hi`` (NaN refused); ``outside``
    is the message for one beyond them, ``{}`` standing for the value."""

    def parse(value: str) -> float:
        try:
            v = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(outside.format(value))
        return v

    return parse


_rate = _float_in(0.0, 1.0, "a probability within 0..1, not {}")
_non_negative = _float_in(0.0, math.inf, "must not be negative: {}")


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a non-negative integer: {value!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "--listen",
        action="append",
        type=parse_listen,
        metavar="HOST:PORT",
        help="address to listen on (repeatable or comma-separated; default 127.0.0.1:2525)",
    )
    a("--hostname", default="fastsend-sink.localhost", help="name in the greeting and EHLO reply")
    a("--tls-cert", metavar="PEM", help="certificate chain for STARTTLS")
    a("--tls-key", metavar="PEM", help="private key for STARTTLS")
    a(
        "--max-size",
        type=_count,
        default=50 * 1024 * 1024,
        metavar="BYTES",
        help="SIZE limit (default 52428800; 0: none)",
    )
    a(
        "--max-recipients",
        type=_count,
        default=1000,
        metavar="N",
        help="recipients per transaction (default 1000)",
    )
    a(
        "--max-connections",
        type=_count,
        default=0,
        metavar="N",
        help="refuse connections above N with 421 (default: unlimited)",
    )
    a(
        "--defer-rate",
        type=_rate,
        default=0.0,
        metavar="P",
        help="answer 451 to this fraction of recipients at random",
    )
    a(
        "--reject-rate",
        type=_rate,
        default=0.0,
        metavar="P",
        help="answer 550 to this fraction of recipients at random",
    )
    a(
        "--latency-ms",
        type=_non_negative,
        default=0.0,
        metavar="MS",
        help="delay every write of replies by MS milliseconds",
    )
    a(
        "--slow-ms",
        type=_non_negative,
        default=2000.0,
        metavar="MS",
        help="delay of the replies for slow-* recipients (default 2000)",
    )
    a(
        "--fault-text",
        action="append",
        default=[],
        metavar='KIND="CODE X.Y.Z TEXT"',
        help='replace a fault\'s reply, e.g. tempfail="421 4.7.0 [TS04] deferred" (a 421 also '
        "closes); kinds: tempfail defer permfail policy mailboxfull 421 random-defer"
        " random-reject max-connections",
    )
    a("--seed", type=int, default=None, help="seed of the random faults")
    a("--log", metavar="FILE", help="append one JSON line per accepted message")
    a("--save", metavar="DIR", help="write each accepted message to DIR, byte for byte")
    a("--count", type=_count, default=0, metavar="N", help="exit after N accepted messages")
    a(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="offer AUTH PLAIN/LOGIN and accept these credentials (repeatable)",
    )
    a(
        "--workers",
        type=_count,
        default=1,
        metavar="N",
        help="N processes on the same addresses (SO_REUSEPORT), for many-core load tests;"
        " counters are summed, deferN counts are per process (default 1)",
    )
    a("--progress", action="store_true", help="print the live count even if stderr is no TTY")
    a("--quiet", "-q", action="store_true", help="print nothing but errors")
    a("--json", action="store_true", help="print the exit summary as one JSON object")


def config_from_args(args: argparse.Namespace) -> SinkConfig:
    """A SinkConfig from parsed options; ValueError with a clear message if bad."""
    listen = [addr for group in (args.listen or [parse_listen("127.0.0.1:2525")]) for addr in group]
    fault_text = dict(parse_fault_text(spec) for spec in args.fault_text)
    users: dict[str, str] = {}
    for cred in args.auth:
        user, sep, password = cred.partition(":")
        if not sep or not user:
            raise ValueError("--auth wants USER:PASSWORD")
        users[user] = password
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"no such file: {path}")
    # Files it writes: said before it listens, as a usage error (was "cannot
    # listen: [Errno 2] ...", exit 1, a log path with no directory read as a port).
    if args.log is not None:
        where = os.path.dirname(os.path.abspath(args.log))
        if os.path.isdir(args.log):
            raise ValueError(f"--log {args.log}: is a directory (give a file)")
        if not os.path.isdir(where):
            raise ValueError(f"--log {args.log}: no directory {where}")
    if args.save is not None and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise ValueError(f"--save {args.save}: not a directory")
    return SinkConfig(
        listen=listen,
        hostname=args.hostname,
        max_size=args.max_size,
        max_recipients=max(1, args.max_recipients),
        max_connections=args.max_connections,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_users=users or None,
        defer_rate=args.defer_rate,
        reject_rate=args.reject_rate,
        latency_ms=args.latency_ms,
        slow_ms=args.slow_ms,
        fault_text=fault_text,
        log_path=args.log,
        save_dir=args.save,
        count=args.count,
        seed=args.seed,
    )


def format_summary(stats: dict[str, Any]) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in stats["faults"].items()) or "none"
    return (
        f"summary: connections {stats['connections']}, messages {stats['messages']}, "
        f"recipients {stats['recipients']}, bytes {stats['bytes']}, "
        f"seconds {stats['seconds']:.3f}, rate {stats['rate']:.1f} msg/s, faults: {faults}"
    )


def _progress_line(st: SinkStats, last: int, interval: float) -> str:
    rate = (st.messages - last) / interval
    faults = sum(st.faults.values())
    return (
        f"sink: {st.messages:,} msgs  {rate:,.0f}/s  {st.recipients:,} rcpts  "
        f"{st.active} conns  {faults:,} faults"
    )


async def _main(config: SinkConfig, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    sink = Sink(config)
    loop = asyncio.get_running_loop()
    # Before it listens: a SIGTERM sent once the port answers (a script waiting
    # for the port, not for "ready") had killed it without its summary.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sink.stop)
    try:
        await sink.start()
    except OSError as e:
        print(f"fastsend sink: cannot listen: {e}", file=err)
        return 2  # (as serve: a config error, before anything was done)
    finally:
        if FAULT:  # tests: sink-stop-after-listen (frozen with its port open)
            countdown({"sink-stop-after-listen": signal.SIGSTOP})
    if not args.quiet:
        for host, port in sink.addresses:
            shown = f"[{host}]" if ":" in host else host
            print(f"listening on {shown}:{port}", file=out)
        print("ready", file=out, flush=True)
    progress = not args.quiet and (args.progress or err.isatty())
    tty = err.isatty()

    async def ticker() -> None:
        last = 0
        while True:
            await asyncio.sleep(1.0)
            sink.flush()
            if progress:
                line = _progress_line(sink.stats, last, 1.0)
                print(
                    ("\r" + line + "  ") if tty else line,
                    end="" if tty else "\n",
                    file=err,
                    flush=True,
                )
            last = sink.stats.messages

    tick = asyncio.ensure_future(ticker())
    try:
        await sink.wait_done()
    finally:
        tick.cancel()
        await sink.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if progress and tty:
        print(file=err)
    if not args.quiet:
        summary = sink.stats.as_dict()
        if args.json:
            out.write(orjson.dumps(summary).decode() + "\n")
        else:
            print(format_summary(summary), file=out)
        out.flush()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"fastsend sink: {e}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return _run_workers(config, args, sys.stdout, sys.stderr)
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_main(config, args, sys.stdout, sys.stderr))
    except (ValueError, OSError) as e:  # e.g. an unreadable certificate
        print(f"fastsend sink: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- --workers N


def _bind_reuseport(listen: list[tuple[str, int]]) -> list[socket.socket]:
    """Bound, not listening, SO_REUSEPORT sockets: they fix the ports (port 0
    becomes a real one) for the workers' own listening sockets on the same
    addresses; not listening, they take no connections themselves."""
    socks: list[socket.socket] = []
    try:
        for host, port in listen:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_main(config: SinkConfig, wfd: int) -> int:
    """One worker process: a Sink on its own uvloop loop, reporting its counters
    as JSON lines on ``wfd`` (a first line once it listens, then every 0.1 s,
    then a final one)."""
    import uvloop

    def report(sink: Sink, final: bool) -> None:
        line = orjson.dumps({**sink.stats.as_dict(), "final": final}) + b"\n"
        os.write(wfd, line)

    async def main() -> int:
        sink = Sink(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sink.stop)
        # Held since the fork (the parent's handler, inherited, would have swallowed
        # them): a stop sent meanwhile comes now, to the loop's handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        await sink.start()
        report(sink, False)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.1)
                sink.flush()
                report(sink, False)

        tick = asyncio.ensure_future(ticker())
        try:
            await sink.wait_done()
        finally:
            tick.cancel()
            await sink.aclose()
        report(sink, True)
        return 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _sum_stats(stats: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: 0 for k in ("connections", "active", "messages", "recipients", "bytes")
    }
    faults: dict[str, int] = {}
    peers: dict[str, int] = {}
    for st in stats:
        for k in out:
            out[k] += st.get(k, 0)
        for k, v in st.get("faults", {}).items():
            faults[k] = faults.get(k, 0) + v
        for k, v in st.get("peers", {}).items():
            peers[k] = peers.get(k, 0) + v
    out["seconds"] = round(seconds, 3)
    out["rate"] = round(out["messages"] / max(seconds, 1e-9), 1)
    out["faults"] = dict(sorted(faults.items()))
    out["peers"] = dict(sorted(peers.items()))
    return out


def _run_workers(config: SinkConfig, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``--workers N``: N forked worker processes, each with its own listening
    socket on the same addresses (SO_REUSEPORT: the kernel spreads connections),
    this process summing their counters for the progress line, ``--count`` and
    the summary."""
    import select
    import time

    try:
        holders = _bind_reuseport(config.listen)
    except OSError as e:
        print(f"fastsend sink: cannot listen: {e}", file=err)
        return 2  # (as serve: a config error, before anything was done)
    addresses = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in holders]
    count, config.count = config.count, 0
    config.listen = addresses
    config.reuse_port = True
    out.flush()
    err.flush()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    # Before the forks: a SIGTERM once the port answered (the workers listen
    # before "ready") had killed this process without a summary, its workers left
    # running. Held while forking: a worker inherits the mask, not a handler of
    # use to it, and takes them once its loop handles them (_worker_main).
    old = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    pids: dict[int, int] = {}  # read fd -> pid
    parent = os.getpid()
    try:
        for _ in range(args.workers):
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    # A kill -9 of this process had left its workers running, the
                    # port still bound and answering: they die with it.
                    die_with_parent(parent)
                    os.close(rfd)
                    for fd in pids:
                        os.close(fd)
                    for s in holders:
                        s.close()
                    code = _worker_main(config, wfd)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(wfd)
            pids[rfd] = pid
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if FAULT:  # tests: sink-stop-after-fork (frozen, its workers listening)
        countdown({"sink-stop-after-fork": signal.SIGSTOP})
    latest: dict[int, dict[str, Any]] = {}
    pending = {fd: b"" for fd in pids}
    started = time.monotonic()
    ready = False
    signalled = False
    progress = not args.quiet and (args.progress or err.isatty())
    tty = err.isatty()
    last_msgs, last_tick = 0, time.monotonic()
    try:
        while pending:
            try:
                readable, _, _ = select.select(list(pending), [], [], 0.1)
            except InterruptedError:
                readable = []
            for fd in readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del pending[fd]
                    os.close(fd)
                    continue
                pending[fd] += chunk
                *lines, pending[fd] = pending[fd].split(b"\n")
                for line in lines:
                    latest[fd] = orjson.loads(line)
            if not ready and len(latest) == len(pids):
                ready = True
                started = time.monotonic()
                if not args.quiet:
                    for host, port in addresses:
                        shown = f"[{host}]" if ":" in host else host
                        print(f"listening on {shown}:{port}", file=out)
                    print("ready", file=out, flush=True)
            total = _sum_stats(list(latest.values()), time.monotonic() - started)
            if count and total["messages"] >= count:
                stop = True
            if stop and not signalled:
                signalled = True
                for pid in pids.values():
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            now = time.monotonic()
            if progress and ready and now - last_tick >= 1.0:
                rate = (total["messages"] - last_msgs) / (now - last_tick)
                faults = sum(total["faults"].values())
                progress_line = (
                    f"sink: {total['messages']:,} msgs  {rate:,.0f}/s  {total['recipients']:,}"
                    f" rcpts  {total['active']} conns  {faults:,} faults  ({len(pids)} workers)"
                )
                print(
                    ("\r" + progress_line + "  ") if tty else progress_line,
                    end="" if tty else "\n",
                    file=err,
                )
                err.flush()
                last_msgs, last_tick = total["messages"], now
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for s in holders:
            s.close()
    codes = []
    for pid in pids.values():
        _pid, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    if progress and tty:
        print(file=err)
    if not ready:
        print("fastsend sink: a worker could not start", file=err)
        return 1
    if not args.quiet:
        summary = _sum_stats(list(latest.values()), time.monotonic() - started)
        summary["workers"] = len(pids)
        if args.json:
            out.write(orjson.dumps(summary).decode() + "\n")
        else:
            print(format_summary(summary), file=out)
        out.flush()
    return 0 if all(c == 0 for c in codes) else 1
