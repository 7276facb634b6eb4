"""Durability and crash-safety audit, session 20: stops and crashes at the
edges of a process's life (``fastsend serve`` started, its supervisor gone)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

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


def test_a_spool_locked_by_another_process_is_try_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool whose database another process holds locked past the lock wait
    (another command's long transaction, a sqlite3 shell left in BEGIN) made
    every command exit 2, "a usage or config error", with "cannot be opened:
    database is locked"; it is "not now, try again later": 75 (README), said so."""
    import sqlite3

    from fastsend import sqlitedb
    from fastsend.spool import SpoolError
    from fastsend.spool.sqlite import SQLiteSpool

    SQLiteSpool(str(tmp_path / "spool")).close()
    monkeypatch.setattr(sqlitedb, "TIMEOUT", 0.2)  # (30 s in earnest)
    other = sqlite3.connect(tmp_path / "spool" / "spool.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE meta SET value=value")
        with pytest.raises(SpoolError) as e:
            SQLiteSpool(str(tmp_path / "spool"))
        assert e.value.exit_status == 75, e.value
        assert "locked by another process" in str(e.value) and "try again" in str(e.value)
        other.execute("ROLLBACK")
        SQLiteSpool(str(tmp_path / "spool")).close()  # (free again: it opens)
    finally:
        other.close()


def test_a_noted_campaign_neither_completed_nor_abandoned_is_completed_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/campaigns (no Idempotency-Key): every row in, the campaign's note
    written (held.jsonl: the creation's commit point), then the spool refused to
    make it active and refused to abandon it too (Redis at maxmemory). The answer
    was an error (507), the campaign stayed staging, and the next start's replay
    of the note made it active: mail sent that the client was told was refused
    (and sent twice with its retry). Now a note that stands is a creation
    complete: the answer is 201 and serve's tick makes the campaign active once
    the spool takes writes again, without a restart; sent once."""
    import threading

    import redis as redis_lib
    from tests._serve_helpers import Served
    from tests.test_multinode_outage import Redis

    from fastsend.sink import SinkThread

    server = Redis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    admin = redis_lib.Redis(port=server.port, socket_timeout=10)
    url = f"redis://127.0.0.1:{server.port}/0?prefix=noted&node=n1"
    tpl = {"from": "a@evil.example", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
    rows = [{"email": f"r{i}@example.org", "name": f"R{i}"} for i in range(5)]
    try:
        with SinkThread(keep_messages=True) as sink:
            monkeypatch.setenv("FASTSEND_TEST_FAULT", "idem-stop-after-note")
            s = Served(tmp_path, f"127.0.0.1:{sink.port}", spool_url=url,
                       serve_args=("--allow-volatile",))  # fmt: skip
            monkeypatch.delenv("FASTSEND_TEST_FAULT")
            try:
                got: list[tuple[int, object]] = []
                t = threading.Thread(target=lambda: got.append(s.req(
                    "POST", "/v1/campaigns", {"name": "n", "template": tpl, "recipients": rows})))
                t.start()
                deadline = time.monotonic() + 60
                while not _frozen(s.proc.pid):  # noted, before it leaves staging
                    assert s.proc.poll() is None and time.monotonic() < deadline, s.lines
                    time.sleep(0.02)
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", 1)  # every write refused (OOM)
                s.proc.send_signal(signal.SIGCONT)
                t.join(60)
                assert got, "no answer"
                st, body = got[0]
                assert st == 201, (st, body)
                admin.config_set("maxmemory", 0)
                deadline = time.monotonic() + 60
                while len(sink.messages) < 5:
                    assert time.monotonic() < deadline, (len(sink.messages), "".join(s.lines))
                    time.sleep(0.05)
                st, listed = s.req("GET", "/v1/campaigns")
                assert [c["status"] for c in listed["campaigns"]] == ["active"], listed
                assert s.stop() == 0
                s.start()  # the note was told: nothing made anew at the start
                st, listed = s.req("GET", "/v1/campaigns")
                assert [c["status"] for c in listed["campaigns"]] == ["active"], listed
            finally:
                s.stop()
        assert sorted(r for m in sink.messages for r in m.recipients) == sorted(
            r["email"] for r in rows)
    finally:
        admin.close()
        server.stop()


def test_a_campaigns_status_change_is_committed_for_a_power_loss(tmp_path: Path) -> None:
    """A cancel (API, CLI), a pause, a new campaign made active are answered done:
    their commit ran at synchronous=NORMAL (WAL: on disk at the next checkpoint
    or FULL commit), so a power loss right after a 200 to a cancel could undo it
    and the campaign was sent on. Each status change now commits at FULL (the
    statements SQLite ran, traced: the level is FULL when its COMMIT runs)."""
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(tmp_path / "spool"))
    try:
        cid = spool.create_campaign({"from": "a@example.com", "subject": "s", "text": "t"})
        ran: list[str] = []
        levels: list[int] = []
        db = spool.db

        def trace(sql: str) -> None:
            ran.append(sql)

        db.set_trace_callback(trace)
        for status in ("paused", "active", "cancelled"):
            ran.clear()
            spool.set_campaign_status(cid, status)
            update = next(i for i, q in enumerate(ran) if q.startswith("UPDATE campaigns"))
            commit = next(i for i, q in enumerate(ran) if q == "COMMIT" and i > update)
            sets = [q for q in ran[:commit] if q.upper().startswith("PRAGMA SYNCHRONOUS=")]
            levels.append(2 if sets and sets[-1].upper().endswith(("FULL", "=2")) else 1)
        assert levels == [2, 2, 2], ran
        db.set_trace_callback(None)
        assert int(db.execute("PRAGMA synchronous").fetchone()[0]) == 1  # NORMAL again
    finally:
        spool.close()


def _damaged_spool(spool_dir: Path) -> None:
    """A spool whose database opens (its first pages whole) but whose messages'
    pages are garbage: SQLite reports SQLITE_CORRUPT once they are read."""
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(spool_dir))
    cid = spool.create_campaign({"from": "a@example.com", "subject": "s", "text": "t"})
    rows = [(f"u{i}@example.org", "example.org", b'{"pad": "' + b"x" * 200 + b'"}')
            for i in range(3000)]  # fmt: skip
    spool.add_messages(cid, rows, 1.0)
    spool.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = int(spool.db.execute("PRAGMA page_size").fetchone()[0])
    leaves = [n for (n,) in spool.db.execute(
        "SELECT pageno FROM dbstat WHERE name='messages' AND pagetype='leaf'")]  # fmt: skip
    spool.close()
    with open(spool_dir / "spool.db", "r+b") as f:
        for n in leaves[len(leaves) // 4 : len(leaves) // 2]:  # (rows in the middle)
            f.seek((n - 1) * size)
            f.write(b"\xa5" * size)


def test_a_supervisor_that_fails_stops_serve_with_the_cause(tmp_path: Path) -> None:
    """serve's supervisor died at its start (recovering a spool whose database is
    damaged: SQLITE_CORRUPT) and serve went on: "ready", the API taking mail that
    nothing would deliver, a traceback from the dashboard's sampler every 15 s and
    "supervisor failed" only at a stop. Now the supervisor's end stops serve at
    once, the cause said in one line with what to do, exit status 1."""
    port = free_port()
    cfg = _config(tmp_path, port)
    _damaged_spool(tmp_path / "spool")
    s = ServeProcess(cfg, port, ready=False)
    try:
        rc = s.proc.wait(60)
    finally:
        s.stop()
    out = "".join(s.lines)
    assert rc == 1, out
    assert "the supervisor stopped (a database of the spool is damaged" in out, out
    assert ".recover" in out and "Traceback" not in out, out


def test_a_damaged_spool_is_said_in_one_line_by_the_views(tmp_path: Path) -> None:
    """``fastsend queue`` on a spool whose database is damaged printed a Python
    traceback (sqlite3.DatabaseError), exit 1; now one line saying what to do."""
    import subprocess
    import sys

    _damaged_spool(tmp_path / "spool")
    r = subprocess.run([sys.executable, "-m", "fastsend", "queue", "--spool",
                        str(tmp_path / "spool")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr and "damaged" in r.stderr and ".recover" in r.stderr, r
