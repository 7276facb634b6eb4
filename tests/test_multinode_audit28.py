"""Several nodes on one Redis (session 28's audit): a dead node's untold
failures adopted under a fence (a node that took them, stalled and lost them
does not finish them).

Real parts: one redis-server, ``fastsend serve`` processes (SMTP submission,
workers), a real receiving sink.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
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
            if b is not None:
                if b.proc.poll() is None and _state(b.proc.pid) == "T":
                    os.kill(b.proc.pid, signal.SIGCONT)
                b.stop()
            if c is not None:
                c.stop()
            a.stop()
