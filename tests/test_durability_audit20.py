"""Durability and crash-safety audit, session 20: stops and crashes at the
edges of a process's life (``fastsend serve`` started, its supervisor gone)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from conftest import ServeProcess, free_port


def _frozen(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP: state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def _config(tmp: Path, port: int, workers: int = 1) -> Path:
    cfg = tmp / "fastsend.toml"
    cfg.write_text(
        f'[spool]\ndir = "spool"\n[workers]\ncount = {workers}\n'
        f'[delivery]\ntls = "off"\n[api]\nlisten = "127.0.0.1:{port}"\n'
    )
    return cfg


def test_a_sigterm_once_the_api_port_answers_drains_and_exits_0(tmp_path: Path) -> None:
    """serve listened on its API port, then started its listeners, webhooks and
    supervisor (forking workers), and only then handled SIGTERM: a stop sent once
    the port answered (systemd, a script or a test waiting for the port) killed it
    with the default action (status -15, no drain). serve is frozen (SIGSTOP,
    FASTSEND_TEST_FAULT) right after it listens, SIGTERM sent, then it goes on:
    the stop is handled as any other, exit 0 with its workers reaped."""
    port = free_port()
    cfg = _config(tmp_path, port)
    s = ServeProcess(cfg, port, env={"FASTSEND_TEST_FAULT": "serve-stop-after-listen"},
                     ready=False)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _frozen(s.proc.pid):
            assert s.proc.poll() is None and time.monotonic() < deadline, s.lines
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        s.proc.send_signal(signal.SIGCONT)
        assert s.proc.wait(60) == 0, "".join(s.lines)
    finally:
        s.stop()
    out = "".join(s.lines)
    assert "draining" in out and "ready in" in out, out
