"""Durability and crash-safety audit, session 21: no process fastsend starts
outlives the one that started it (a kill -9 of the parent)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fastsend.sink import SinkProcess

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH") or str(ROOT / "src")
    return env


def _all_gone(procs: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    """The processes of ``procs`` still alive (zombies count as gone) after waiting
    up to ``timeout`` for all of them to end; killed then, so none outlives the test."""

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.05)
    left = [p for p in procs if alive(p)]
    for p in left:
        p.kill()
    return left


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sink_workers_die_with_a_killed_parent_and_free_the_port() -> None:
    """``fastsend sink --workers 2``, its parent SIGKILLed: its workers had gone on
    running (adopted by init), the port still bound and taking mail, nothing to
    stop them. Now they die with it and the port refuses connections."""
    sink = SinkProcess("--workers", "2").start()
    assert sink.proc is not None
    parent = psutil.Process(sink.proc.pid)
    workers = parent.children()
    assert len(workers) == 2
    os.kill(sink.proc.pid, signal.SIGKILL)
    sink.proc.wait(30)
    assert _all_gone(workers) == [], "sink workers outlived their parent"
    assert _refused(sink.port)
    sink.stop()


def test_a_sink_started_to_die_with_its_parent_goes_with_it() -> None:
    """``fastsend demo`` starts a sink (SinkProcess); a kill -9 of the demo left
    the sink process and its port behind. ``SinkProcess(die_with_parent=True)``
    (demo's) has the sink, and its own workers, killed with the process that
    started it."""
    code = (
        "import sys, time\n"
        "from fastsend.sink import SinkProcess\n"
        "s = SinkProcess('--workers', '2', die_with_parent=True).start()\n"
        "print(s.proc.pid, s.port, flush=True)\n"
        "time.sleep(120)\n"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=_env(), text=True
    )
    try:
        assert starter.stdout is not None
        pid_text, port_text = starter.stdout.readline().split()
        sink = psutil.Process(int(pid_text))
        procs = [sink, *sink.children()]
        assert len(procs) == 3
        starter.kill()
        starter.wait(30)
        assert _all_gone(procs) == [], "the sink outlived the process that started it"
        assert _refused(int(port_text))
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()


def test_serves_report_parser_child_dies_with_a_killed_serve() -> None:
    """serve parses bounces and DMARC reports in a spawned child (ParsePool); a
    kill -9 of serve left that child (and multiprocessing's resource tracker it
    holds open) waiting forever on a queue nobody writes. It dies with serve now."""
    code = (
        "import asyncio\n"
        "from fastsend.serve.parsepool import ParsePool\n"
        "async def main():\n"
        "    pool = ParsePool()\n"
        "    await pool.read(b'Subject: x\\r\\n\\r\\nhello\\r\\n')\n"
        "    print(*pool._pool._processes, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=_env(), text=True
    )
    try:
        assert starter.stdout is not None
        pids = [int(x) for x in starter.stdout.readline().split()]
        assert pids
        procs = [psutil.Process(p) for p in pids]
        starter.kill()
        starter.wait(30)
        assert _all_gone(procs) == [], "the parse child outlived serve"
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
