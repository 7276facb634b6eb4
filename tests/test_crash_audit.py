"""Crash safety audited from outside (issue 10: nothing accepted is ever lost):
the real ``fastsend`` binary, a real redis-server, fastsend's own sink and its
log, broken at points a test reaches reliably.

- Redis restarted (AOF, ``appendfsync always``) while ``fastsend send`` reads
  its list on the Redis spool: the list is read on once Redis answers again,
  as delivery is (docs/DEPLOY.md "Redis restarts or is out of reach"). Before:
  the outage ended the list's reading for good (exit 1, most of the list left
  for ``fastsend resume``) while delivery rode it out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    summary,
    write_campaign,
    write_recipients,
)
from tests.test_multinode_outage import Redis

from fastsend.sink import SinkProcess
from fastsend.spool import open_spool


def _wait(cond, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def test_a_redis_restart_while_send_reads_its_list_does_not_stop_the_list(
    tmp_path: Path,
) -> None:
    """``send`` of 12,000 rows on a Redis spool stops itself (SIGSTOP, a test
    fault) once its list's 3rd batch is committed; Redis is killed, the send
    goes on against the refused connections until it says the spool is out of
    reach, then Redis comes back (its AOF holds all that was acknowledged).
    The send reads the rest of its list and delivers every recipient: exit 0,
    the job done, every address in the sink's log."""
    n = 12000
    rdir = tmp_path / "redis"
    rdir.mkdir()
    redis = Redis(rdir)
    redis.start()
    addrs = [f"user{i}@d{i % 5}.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    url = f"redis://127.0.0.1:{redis.port}/0?prefix=ro&node=n1&dir={tmp_path / 'spool'}"
    log = tmp_path / "sink.jsonl"
    err = tmp_path / "send.err"
    try:
        with SinkProcess("--log", str(log)) as sink:
            host, port = sink.addresses[0]
            env = dict(_env(), FASTSEND_TEST_FAULT="ingest-stop-after-commit:3")
            with open(err, "w") as ferr:
                proc = subprocess.Popen(
                    fastsend_cmd(
                        "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", url,
                        "--route", f"*={host}:{port}", "--workers", "2", "--json",
                        "--no-progress", "--max-wait", "5",
                    ),
                    stdout=subprocess.PIPE, stderr=ferr, text=True, env=env,
                )  # fmt: skip
                try:
                    _wait(lambda: _stopped(proc.pid) or proc.poll() is not None)
                    assert proc.poll() is None, err.read_text()[-3000:]
                    redis.kill()
                    os.kill(proc.pid, signal.SIGCONT)
                    _wait(lambda: "out of reach" in err.read_text() or proc.poll() is not None)
                    redis.start()
                    out, _ = proc.communicate(timeout=300)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
        stderr = err.read_text()
        assert proc.returncode == 0, stderr[-3000:]
        assert "reading" not in stderr or "stopped" not in stderr, stderr[-3000:]
        s = summary(subprocess.CompletedProcess([], 0, out, stderr))
        assert s["ingest"]["left"] == 0, s
        got = received_counts(log)
        assert set(got) == set(addrs), f"{len(set(addrs) - set(got))} recipient(s) not delivered"
        spool = open_spool(url)
        try:
            jobs = spool.list_ingests()
            assert [(j.status, j.accepted) for j in jobs] == [("done", n)]
        finally:
            spool.close()
    finally:
        redis.stop()
