"""kill -9 anywhere loses nothing: a worker (restarted, its window requeued) and
the supervisor (workers exit, `fastsend resume` finishes the spool). Duplicates
are bounded by the in-flight window."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
from tests._engine_helpers import (
    fastsend_cmd,
    received_counts,
    run_fastsend,
    summary,
    write_campaign,
    write_recipients,
)

from fastsend.config import Config
from fastsend.sink import SinkProcess

N = 12000
# Claimed-but-unanswered messages per worker: the default window of the runs
# below (two workers, one source IP each).
WINDOW = Config(source_ips=["127.0.0.2", "127.0.0.3"], workers=2).window_for(0)


def delivered(spool: Path, state: int = 3) -> int:
    try:
        db = sqlite3.connect(f"file:{spool / 'spool.db'}?mode=ro", uri=True, timeout=5)
        n = db.execute("SELECT COUNT(*) FROM messages WHERE state=?", (state,)).fetchone()[0]
        db.close()
        return int(n)
    except sqlite3.Error:
        return 0


def wait_for(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def start_send(
    tmp: Path, host: str, port: int, *extra: str
) -> tuple[subprocess.Popen[str], Path, list[str]]:
    addrs = [f"user{i}@d{i % 5}.example.net" for i in range(N)]
    camp = write_campaign(tmp)
    rcpts = write_recipients(tmp, addrs)
    spool = tmp / "spool"
    proc = subprocess.Popen(
        fastsend_cmd(
            "send",
            str(camp),
            "-r",
            str(rcpts),
            "--route",
            f"*={host}:{port}",
            "--source-ip",
            "127.0.0.2,127.0.0.3",
            "--workers",
            "2",
            "--spool",
            str(spool),
            "--json",
            "--no-dkim",
            "--no-progress",
            *extra,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, spool, addrs


def test_kill_9_of_a_worker_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "2") as sink:
        host, port = sink.addresses[0]
        proc, spool, addrs = start_send(tmp_path, host, port)
        sup = psutil.Process(proc.pid)
        wait_for(lambda: delivered(spool) >= 1000)
        workers = sup.children()
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    s = summary(subprocess.CompletedProcess([], 0, out, err))
    assert s["delivered"] == N, s
    assert s["worker_restarts"] >= 1
    got = received_counts(log)
    assert set(got) == set(addrs), "a recipient was lost"
    dups = sum(c - 1 for c in got.values())
    assert dups <= WINDOW, f"{dups} duplicates exceed one worker's window"
    assert dups <= s["requeued_from_dead_workers"]


def test_kill_9_of_the_supervisor_then_resume_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "2") as sink:
        host, port = sink.addresses[0]
        proc, spool, addrs = start_send(tmp_path, host, port)
        sup = psutil.Process(proc.pid)
        # Killed while mail is in flight (a fast sink can leave the window empty
        # for a moment between claims): those are what resume must take back.
        wait_for(lambda: delivered(spool) >= 1000 and delivered(spool, 1) > 0)
        workers = sup.children()
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        # Orphaned workers notice their parent is gone and exit on their own.
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "workers outlived their supervisor"
        before = delivered(spool)
        assert before < N, "the run finished before the kill; slow the sink down"
        res = run_fastsend(
            "resume",
            "--spool",
            str(spool),
            "--route",
            f"*={host}:{port}",
            "--source-ip",
            "127.0.0.2,127.0.0.3",
            "--workers",
            "2",
            "--json",
            "--no-progress",
        )
    assert res.returncode == 0, res.stderr[-3000:]
    s = summary(res)
    assert s["delivered"] == N and s["deferred"] == 0
    assert s["recovered_inflight"] > 0
    got = received_counts(log)
    assert set(got) == set(addrs), "a recipient was lost"
    dups = sum(c - 1 for c in got.values())
    assert dups <= 2 * WINDOW, f"{dups} duplicates exceed the workers' windows"


def test_sigterm_drains_and_leaves_a_consistent_spool(tmp_path: Path) -> None:
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "2") as sink:
        host, port = sink.addresses[0]
        # A small window: what is claimed when SIGTERM lands is far below N even
        # when this poll is late on a loaded machine (with the default window of
        # 4,000 per worker the whole list could be claimed by then).
        cfg = tmp_path / "small-window.toml"
        cfg.write_text("[delivery]\nwindow = 300\n")
        proc, spool, addrs = start_send(tmp_path, host, port, "-c", str(cfg))
        wait_for(lambda: delivered(spool) >= 1000)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        # 128 + SIGTERM: the run did not finish; it says what is left and how to resume.
        assert proc.returncode == 143, err[-2000:]
        assert "continue with: fastsend resume" in err, err[-2000:]
        s = summary(subprocess.CompletedProcess([], 0, out, err))
        db = sqlite3.connect(spool / "spool.db")
        inflight = db.execute("SELECT COUNT(*) FROM messages WHERE state=1").fetchone()[0]
        assert inflight == 0, "a drained stop leaves nothing in flight"
        assert s["delivered"] < N
        # What was not sent is still queued, and resume sends it.
        res = run_fastsend(
            "resume",
            "--spool",
            str(spool),
            "--route",
            f"*={host}:{port}",
            "--workers",
            "1",
            "--json",
            "--no-progress",
        )
    assert summary(res)["delivered"] == N
    got = received_counts(log)
    assert set(got) == set(addrs) and max(got.values()) == 1


def test_outcomes_committed_by_a_killed_run_get_their_events_at_the_next_start(
    tmp_path: Path,
) -> None:
    """kill -9 of ``send`` right after a flush of outcomes is committed to the
    spool, before their events are written (FASTSEND_TEST_FAULT): ``resume``
    writes them (``"resumed": true``), so every delivered or bounced message
    has its one event in the log (the operator's numbers, the webhooks and the
    stats come from it). Before: those outcomes had none, ever (a kill -9
    mid-delivery lost up to a flush of them: 1,871 of 40,000 in one run)."""
    n = 1500
    addrs = [
        (f"permfail-{i}@d{i % 3}.example.net" if i % 50 == 7 else f"u{i}@d{i % 3}.example.net")
        for i in range(n)
    ]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = tmp_path / "spool"
    with SinkProcess() as sink:
        host, port = sink.addresses[0]
        common = ["--spool", str(spool), "--route", f"*={host}:{port}", "--workers", "1",
                  "--json", "--no-progress", "--max-wait", "0"]  # fmt: skip
        env = dict(os.environ, FASTSEND_TEST_FAULT="outcomes-kill-after-commit:1")
        env.pop("FASTSEND_NO_EXTENSIONS", None)
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(rcpts), "--no-dkim", *common),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its worker, if it is still there
        db = sqlite3.connect(spool / "spool.db")
        recorded = dict(db.execute("SELECT id, state FROM messages WHERE state IN (3, 4)"))
        db.close()
        assert recorded, "the fault fired before any outcome was recorded"
        # And killed again, right after the next start took its window back
        # (recover's commit) and before its deferred events (unknown outcome).
        env["FASTSEND_TEST_FAULT"] = "kill-after-recover"
        again = subprocess.run(fastsend_cmd("resume", *common), capture_output=True,
                               text=True, env=env, timeout=120)  # fmt: skip
        assert again.returncode == -signal.SIGKILL, again.stderr[-2000:]
        res = run_fastsend("resume", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary(res)["delivered"] + len(recorded) >= n - n // 50
    events = [orjson.loads(x) for x in (spool / "events.jsonl").read_bytes().splitlines()]
    final: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] in ("delivered", "bounced"):
            final.setdefault(e["id"], []).append(e)
    assert len(final) == n and all(len(es) == 1 for es in final.values())
    retold = {i for i, es in final.items() if es[0].get("resumed")}
    assert retold == set(recorded), (len(retold), len(recorded))
    for i, state in recorded.items():
        (e,) = final[i]
        assert e["event"] == ("delivered" if state == 3 else "bounced"), e
        assert e["rcpt"] == addrs[i - 1] and e["attempt"] == 1, e
        if state == 4:
            assert e["code"] == 550 and e["enhanced"] == "5.1.1" and e["hard"], e
    assert "outcome(s) recorded by the last run" in again.stderr, again.stderr[-2000:]
    # Every attempt has its one event, the window taken back included.
    told: dict[int, int] = {}
    for e in events:
        if e["event"] in ("delivered", "bounced", "deferred", "expired"):
            told[e["id"]] = told.get(e["id"], 0) + 1
    db = sqlite3.connect(spool / "spool.db")
    attempts = dict(db.execute("SELECT id, attempts FROM messages"))
    db.close()
    assert any(a > 1 for a in attempts.values())  # a window was taken back
    assert told == attempts, {i: (told.get(i), a) for i, a in attempts.items() if told.get(i) != a}
