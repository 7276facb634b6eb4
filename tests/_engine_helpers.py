"""Helpers for the engine's integration tests: campaigns, recipient files,
running ``fastsend send``/``resume`` as real subprocesses, reading sink logs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

CAMPAIGN = """\
from = "Engine Test <news@sender.example.com>"
subject = "Hello {{ name }}"
text = "Hi {{ name }}, message for {{ email }}.\\n"
"""


def spool_rows(n: int, domain: str = "example.com") -> list[tuple[str, str, bytes]]:
    """(rcpt, domain, vars) rows for Spool.add_messages."""
    return [(f"u{i}@{domain}", domain, orjson.dumps({"i": str(i)})) for i in range(n)]


def write_campaign(tmp: Path, text: str = CAMPAIGN) -> Path:
    p = tmp / "campaign.toml"
    p.write_text(text)
    return p


def write_recipients(tmp: Path, addresses: list[str], name: str = "r.csv") -> Path:
    p = tmp / name
    with open(p, "w") as f:
        f.write("email,name\n")
        for i, a in enumerate(addresses):
            f.write(f"{a},N{i}\n")
    return p


def fastsend_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastsend", *args]


def run_fastsend(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fastsend_cmd(*args), capture_output=True, text=True, timeout=timeout, env=_env()
    )


def run_killed(fault: str, *args: str, timeout: float = 120) -> str:
    """Run ``fastsend *args`` with the crash point ``fault`` armed
    (``FASTSEND_TEST_FAULT``, fastsend.faults): it must end killed -9 there.
    Its workers, if any is left, are killed too (its own session). Returns its
    stderr."""
    env = dict(_env(), FASTSEND_TEST_FAULT=fault)
    proc = subprocess.Popen(
        fastsend_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        _out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its workers, if any is left
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    return err


def run_killed_when(args: list[str], ready: Callable[[], bool], timeout: float = 240) -> str:
    """Run ``fastsend *args`` (its own session) and kill -9 all of it (the
    supervisor and its workers at once, a power loss's or the OOM killer's
    whole-process kill) once ``ready()`` says so, asked each 0.05 s; it must
    not end before. Returns its stderr."""
    proc = subprocess.Popen(
        fastsend_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(), start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"fastsend {args[0]} ended first: {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"fastsend {args[0]}: not ready in time"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    _out, err = proc.communicate(timeout=60)
    return err


def run_killing_a_worker(
    args: list[str],
    pick: Callable[[list[Any]], Any],
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``fastsend *args`` (its own session) and kill -9 the first of its
    workers (``psutil.Process`` children) that ``pick`` names, asked each
    0.05 s until it names one; a worker stopped after that (a fault point's
    SIGSTOP) is let go on (SIGCONT). Returns the finished run and the pid
    killed (0: none was picked)."""
    import psutil

    proc = subprocess.Popen(
        fastsend_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or _env(), start_new_session=True,
    )  # fmt: skip
    killed = 0
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"fastsend {args[0]} did not end"
            with contextlib.suppress(psutil.NoSuchProcess):
                workers = psutil.Process(proc.pid).children()
                if not killed:
                    w = pick(workers)
                    if w is not None:
                        killed = w.pid
                        os.kill(killed, signal.SIGKILL)
                else:
                    for w in workers:
                        if w.status() == psutil.STATUS_STOPPED:
                            os.kill(w.pid, signal.SIGCONT)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, out, err), killed


def send_via(
    campaign: Path, rcpts: Path, sink: tuple[str, int], spool: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``fastsend send`` routed to a test sink, JSON summary, no progress line."""
    host, port = sink
    return run_fastsend(
        "send", str(campaign), "-r", str(rcpts), "--route", f"*={host}:{port}",
        "--spool", str(spool), "--json", "--no-progress", *extra,
    )  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTSEND_NO_EXTENSIONS", None)
    return env


def send_killing_a_worker(
    sink_args: list[str], log: Path, camp: Path, rcpts: Path, spool: Path, conf: Path,
    addrs: list[str], pick: Callable[[list[Any]], Any], env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], Counter[str]]:  # fmt: skip
    """``fastsend send`` of ``addrs`` through one worker to a ``fastsend sink``
    (run with ``sink_args``, logging to ``log``), that worker killed -9 once
    ``pick`` names it (:func:`run_killing_a_worker`): asserts the run ended well,
    every recipient delivered after one worker restart and each received (the
    sink's log read once the sink has stopped: all of it written); returns the
    run's --json summary and how many times the sink got each recipient."""
    from fastsend.sink import SinkProcess

    with SinkProcess("--log", str(log), *sink_args) as sink:
        host, port = sink.addresses[0]
        proc, killed = run_killing_a_worker(
            ["send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
             "-c", str(conf), "--route", f"*={host}:{port}", "--workers", "1", "--json",
             "--no-progress"],
            pick, env,
        )  # fmt: skip
    assert killed, "no worker was picked to be killed"
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert s["delivered"] == len(addrs) and s["worker_restarts"] == 1, s
    got = received_counts(log)
    assert set(got) == set(addrs)
    return s, got


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines, f"no JSON summary; rc={proc.returncode} stderr={proc.stderr[-2000:]}"
    out: dict[str, Any] = orjson.loads(lines[-1])
    return out


def sink_log(path: Path) -> list[dict[str, Any]]:
    """The sink's records so far. A test polling while the sink runs can read a
    line the sink is still writing: a last line with no newline that doesn't parse
    is that (a train read 93 bytes of one), not a record."""
    if not path.exists():
        return []
    complete, _, tail = path.read_bytes().rpartition(b"\n")
    out = [orjson.loads(line) for line in complete.splitlines() if line.strip()]
    if tail.strip():
        try:
            out.append(orjson.loads(tail))
        except orjson.JSONDecodeError:
            pass
    return out


def received_counts(path: Path) -> Counter[str]:
    c: Counter[str] = Counter()
    for rec in sink_log(path):
        for r in rec["recipients"]:
            c[r] += 1
    return c
