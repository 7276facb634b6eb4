"""Several nodes on one Redis (session 28's audit): a dead node's untold
failures adopted under a fence (a node that took them, stalled and lost them
does not finish them).

Real parts: one redis-server, ``fastsend serve`` processes (SMTP submission,
workers), a real receiving sink.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._redis_helpers import stop_nodes
from tests._serve_helpers import until
from tests.test_multinode_audit25 import _shared_journal
from tests.test_multinode_audit26 import _state


def test_a_node_that_took_a_dead_nodes_failures_and_stalled_leaves_them_to_the_node_that_took_them_over(
    redis_server: Any, tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a bounces a submitted message and is killed before its notice is
    spooled, never to start again. b takes a's untold failures (the shared
    journal's lines name b now) and is frozen right then: its status lapses, so
    c takes the lines over and tells the sender. b goes on: it must see the
    lines are no longer its own and leave them. Before: b wrote them back as its
    own (over c's, or after c had told and removed them) and took the failures
    as adopted ("told by this one"), its removal deleting whatever line held
    the id, c's included."""
    from tests.test_serve_dsn import _notices, _serve, _submit

    from fastsend.sink import SinkThread

    url = redis_server.url()
    for n in ("a", "b", "c"):
        (tmp_path / n).mkdir()
    with SinkThread(keep_messages=True) as sink:
        monkeypatch.setenv("FASTSEND_TEST_FAULT", "outcomes-kill-after-commit:1")
        a, port = _serve(tmp_path / "a", certs, sink, spool_url=url + "&node=a")
        b = c = None
        try:
            _submit(port, a.keys["acme"], certs[2], "app@example.com",
                    ["permfail-1@example.org", "permfail-2@example.org"])  # fmt: skip
            assert a.proc.wait(30) == -9
            assert len(_shared_journal(url)) == 2
            monkeypatch.setenv("FASTSEND_TEST_FAULT", "dsn-stop-after-take")
            b, _ = _serve(tmp_path / "b", certs, sink, spool_url=url + "&node=b")
            monkeypatch.delenv("FASTSEND_TEST_FAULT")
            until("b frozen having taken the dead node's failures",
                  lambda: _state(b.proc.pid) == "T", timeout=90)  # fmt: skip
            lines = _shared_journal(url)
            assert len(lines) == 2 and all(b'"node":"b"' in v for v in lines.values()), lines
            c, _ = _serve(tmp_path / "c", certs, sink, spool_url=url + "&node=c")
            (notice,) = _notices(sink, "app@example.com", 1, timeout=90)
            assert "Final-Recipient: rfc822; permfail-1@example.org" in notice.data.decode()
            until("c's notice told (its shared lines gone)", lambda: not _shared_journal(url))
            os.kill(b.proc.pid, signal.SIGCONT)
            until("b done with the failures it had taken", lambda: any(
                "being told by another node" in x or "told by this one" in x for x in b.lines))
            assert not [x for x in b.lines if "told by this one" in x], b.lines
            assert not _shared_journal(url)  # (not written back by b)
            b.stop()
            c.stop()
            assert len(_notices(sink, "app@example.com", 1)) == 1
        finally:
            stop_nodes(b, c, a)


@pytest.mark.parametrize("name", ["same", "dead"])
def test_recover_on_redis_counts_unknown_only_what_the_write_logs_name(
    redis_server: Any, tmp_path: Path, name: str
) -> None:
    """10 messages in flight when their process died, 3 named by its worker's
    write log (the local dir): those 3 count an attempt of unknown outcome,
    the other 7 go back as they were (no attempt), whether the next start has
    the dead one's node name or its own (the dead process's, of this host,
    taken back at once). Before: the Redis spool kept no write logs, so all 10
    counted unknown (each an attempt more, sent again as "unknown")."""
    from fastsend.spool.redis import RedisSpool

    url = redis_server.url(dir=str(tmp_path / "local"))
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CLAIMER, url + "&node=n1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr
    ids = orjson.loads(child.stdout)
    assert len(ids) == 10
    again = RedisSpool(url + ("&node=n1" if name == "same" else "&node=n2"))
    try:
        unknown = again.recover()
        c = again.counts()
        assert unknown == 3 and (c["queued"], c["deferred"]) == (7, 3), c
        assert {t.id for t in again.taken_back()} == set(ids[:3])
        assert c["inflight"] == 0
        assert again.recover() == 0
    finally:
        again.close()


# A process that spools 10 messages, claims them, has its (one) worker's write
# log name 3 as written, and is killed -9 (supervisor and workers at once).
_KILLED_CLAIMER = """
import os, signal, sys, time
import orjson
from fastsend.ring import WriteLog, reset_write_logs
from fastsend.spool.redis import RedisSpool
sp = RedisSpool(sys.argv[1])
sp.recover()
cid = sp.create_campaign({"from": "a@b.example"})
now = time.time()
sp.add_messages(cid, [(f"u{i}@d.example", "d.example", b"{}") for i in range(10)], now - 1)
ids = [c.id for c in sp.claim_due(now, 10)]
where = sp.write_log_dir()
reset_write_logs(where)
w = WriteLog(4, path=os.path.join(where, "1.log"))
w.mark(ids[:3])
sys.stdout.write(orjson.dumps(ids).decode())
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_whole_send_on_redis_killed_counts_unknown_only_what_its_workers_had_written(
    redis_server: Any, tmp_path: Path
) -> None:
    """``fastsend send`` on a Redis spool, 600 messages to one site (the sink
    answers each write after 30 ms), killed -9 whole once the sink took 40;
    ``resume`` on the same host delivers the rest. What counts unknown is at
    most what was on the wire, and every message the sink got twice is one of
    them; no write log is left behind. Before: every message in flight counted
    unknown."""
    from tests._engine_helpers import (
        received_counts,
        run_fastsend,
        run_killed_when,
        sink_log,
        summary,
        write_campaign,
        write_recipients,
    )

    from fastsend.sink import SinkProcess

    n, conns, group = 600, 2, 4
    addrs = [f"user{i}@d.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    conf = tmp_path / "fastsend.toml"
    conf.write_text(f"[delivery]\nmax_connections = {conns}\npipeline = {group}\n")
    local = tmp_path / "local"
    url = redis_server.url(dir=str(local))
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "30") as sink:
        host, port = sink.addresses[0]
        run_killed_when(
            ["send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", url, "-c", str(conf),
             "--route", f"*={host}:{port}", "--workers", "1", "--no-progress"],
            lambda: len(sink_log(log)) >= 40,
        )  # fmt: skip
        proc = run_fastsend("resume", "--spool", url, "-c", str(conf), "--route",
                            f"*={host}:{port}", "--json", "--no-progress", "--max-wait", "60")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    got = received_counts(log)
    assert set(got) == set(addrs) and s["deferred"] == 0, s
    unknown = [orjson.loads(x)["rcpt"] for x in (local / "events.jsonl").read_bytes().splitlines()
               if b"outcome unknown" in x]  # fmt: skip
    assert b"delivered" in (local / "events.jsonl").read_bytes()
    assert len(unknown) <= 3 * conns * group * 4, len(unknown)
    twice = {a for a, k in got.items() if k > 1}
    assert twice <= set(unknown), sorted(twice - set(unknown))[:10]
    # (read by resume's start, its own removed at its end: none left behind)
    assert not list((local / "writelogs").iterdir())
