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
    run_fastsend,
    summary,
    write_campaign,
    write_recipients,
)
from tests._mounts import mounted
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


def _resume_all(spool: str, sink: SinkProcess) -> subprocess.CompletedProcess[str]:
    host, port = sink.addresses[0]
    return run_fastsend(
        "resume", "--spool", spool, "--route", f"*={host}:{port}", "--workers", "1",
        "--json", "--no-progress", "--max-wait", "5", timeout=300,
    )  # fmt: skip


def test_a_full_disk_is_ridden_out_and_nothing_accepted_is_lost(tmp_path: Path) -> None:
    """``send`` of 20,000 rows with its spool on a 2 MB tmpfs: the disk fills
    (spool, write-ahead log, event log) while the list is read and delivered.
    The run says the spool's storage is full and waits, keeping what it holds
    (as for a shared spool out of reach); once the tmpfs is made larger it goes
    on and ends with every recipient delivered (the sink's log) and the list
    read to its end, exit 0. Before: exit 1 with a traceback ending in
    ``sqlite3.OperationalError: database or disk is full`` (and ``serve``'s
    supervisor died the same way while its API went on accepting mail that
    nothing delivered)."""
    n = 20000
    disk = tmp_path / "disk"
    addrs = [f"user{i}@d{i % 7}.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    err = tmp_path / "send.err"
    spool = str(disk / "spool")
    with mounted(disk, "-t", "tmpfs", "-o", "size=2m", "tmpfs"):
        with SinkProcess("--log", str(log)) as sink, open(err, "w") as ferr:
            host, port = sink.addresses[0]
            proc = subprocess.Popen(
                fastsend_cmd(
                    "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", spool,
                    "--route", f"*={host}:{port}", "--workers", "2", "--json",
                    "--no-progress", "--max-wait", "5",
                ),
                stdout=subprocess.PIPE, stderr=ferr, text=True, env=_env(),
            )  # fmt: skip
            try:
                _wait(lambda: "storage is full" in err.read_text() or proc.poll() is not None)
                assert proc.poll() is None, err.read_text()[-3000:]
                subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
                out, _ = proc.communicate(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stderr = err.read_text()
        assert proc.returncode == 0, stderr[-3000:]
        s = summary(subprocess.CompletedProcess([], 0, out, stderr))
        assert s["ingest"]["left"] == 0 and s["delivered"] == n, s
        got = received_counts(log)
        assert set(got) == set(addrs), f"{len(set(addrs) - set(got))} recipient(s) lost"


def test_a_read_only_spool_is_refused_plainly_and_still_viewable(tmp_path: Path) -> None:
    """A spool directory on a read-only file system (a mount made read-only
    after a disk error, a snapshot): ``send`` and ``resume`` refuse with one
    line naming the read-only spool (exit 2), not a traceback, and ``fastsend
    queue`` still shows it. Before: tracebacks (``unable to open database
    file``) from all three."""
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"u{i}@example.net" for i in range(10)])
    spool = tmp_path / "spool"
    ro = tmp_path / "ro"
    with SinkProcess() as sink:
        host, port = sink.addresses[0]
        first = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
            "--route", f"*={host}:{port}", "--json", "--no-progress",
        )  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        with mounted(ro, "--bind", str(spool), read_only=True):
            sent = run_fastsend(
                "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(ro),
                "--route", f"*={host}:{port}", "--json", "--no-progress",
            )  # fmt: skip
            resumed = _resume_all(str(ro), sink)
            view = run_fastsend("queue", "--spool", str(ro))
    for res in (sent, resumed):
        assert res.returncode == 2, res.stderr[-3000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        assert "read-only" in res.stderr, res.stderr
    assert view.returncode == 0, view.stderr[-3000:]
    assert "delivered 10" in view.stdout, view.stdout


def test_a_redis_back_without_its_data_is_said_plainly(tmp_path: Path) -> None:
    """``send`` on a Redis spool stops itself once its list's 3rd batch is
    committed; Redis is killed and comes back empty (its AOF gone: a container
    restarted without its volume). The send must not carry on as if the spool
    merely "answers again": it says the spool came back without its data and
    that its list's job is gone with it, and exits non-zero. Before: "the
    spool answers again ... 0 claim(s)", then "0 recipient(s) were spooled,
    12000 row(s) not yet; `fastsend resume` continues the list", and that
    resume found nothing to do and exited 0."""
    n = 12000
    rdir = tmp_path / "redis"
    rdir.mkdir()
    redis = Redis(rdir)
    redis.start()
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"user{i}@d{i % 5}.example.net" for i in range(n)])
    url = f"redis://127.0.0.1:{redis.port}/0?prefix=rw&node=n1&dir={tmp_path / 'spool'}"
    err = tmp_path / "send.err"
    try:
        with SinkProcess() as sink:
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
                    for f in rdir.rglob("*"):
                        if f.is_file():
                            f.unlink()
                    os.kill(proc.pid, signal.SIGCONT)
                    _wait(lambda: "out of reach" in err.read_text() or proc.poll() is not None)
                    redis.start()
                    proc.communicate(timeout=300)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
        stderr = err.read_text()
        assert proc.returncode != 0, stderr[-3000:]
        assert "came back without its data" in stderr, stderr[-3000:]
        assert "ingest job 1 (it lost its data" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    finally:
        redis.stop()
