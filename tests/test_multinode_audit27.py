"""Several nodes on one Redis (session 27's audit): adoption of a dead node's work
fenced (a node that took it, stalled and lost it does not finish it); Redis calls
kept off serve's event loop.

Real parts: one redis-server (a proxy in front of it to slow it), ``fastsend
serve`` processes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests._redis_helpers import RedisHold
from tests._serve_helpers import Served, http, until
from tests.test_multinode_audit26 import _state, _told
from tests.test_serve_audit17 import TPL


def test_a_node_that_took_a_dead_nodes_note_and_stalled_leaves_it_to_the_node_that_took_it_over(
    redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a is killed right after noting a new campaign complete. b takes the
    dead node's note (it names b now) and is frozen right then, before finishing
    it: b's status lapses, so c, later, takes the note over as a dead node's and
    finishes it (the campaign active, its rows' "accepted" told). b goes on: it
    must see the note is no longer its own and leave it. Before: b finished what
    it had taken without looking again (its "complete now", the rows' events again
    unless c's index had them, c's note deleted under it)."""
    url = redis_server.url()
    for n in ("a", "b", "c"):
        (tmp_path / n).mkdir()
    args = ("--allow-volatile", "--no-workers")
    monkeypatch.setenv("FASTSEND_TEST_FAULT", "idem-kill-after-note")  # (a's start)
    a = Served(tmp_path / "a", "127.0.0.1:9", spool_url=url + "&node=a", serve_args=args)
    monkeypatch.setenv("FASTSEND_TEST_FAULT", "held-stop-after-take")  # (b's)
    b = Served(tmp_path / "b", "127.0.0.1:9", spool_url=url + "&node=b", serve_args=args)
    monkeypatch.delenv("FASTSEND_TEST_FAULT")
    c = None
    try:
        rows = [{"email": f"r{i}@example.org", "name": f"R{i}"} for i in range(12)]
        with pytest.raises(aiohttp.ClientError):
            a.req("POST", "/v1/campaigns", {"name": "k", "template": TPL, "recipients": rows})
        assert a.proc.wait(20) == -9
        until("b frozen having taken the dead node's note",
              lambda: _state(b.proc.pid) == "T", timeout=90)  # fmt: skip
        c = Served(tmp_path / "c", "127.0.0.1:9", spool_url=url + "&node=c", serve_args=args)
        # (c takes it once b's status is stale and the note NOTE_GRACE old)
        until("c told the dead node's rows",
              lambda: len(_told(tmp_path / "c", "accepted")) >= 12, timeout=90)  # fmt: skip
        assert any("is complete now" in x for x in c.lines), c.lines
        os.kill(b.proc.pid, signal.SIGCONT)
        until("b done with the note", lambda: any(
            "being finished by another node" in x or "is complete now" in x for x in b.lines))
        st, got = c.req("GET", "/v1/campaigns")
        assert st == 200 and [x["status"] for x in got["campaigns"]] == ["active"], got
        b.stop()
        assert not [x for x in b.lines if "is complete now" in x], b.lines
        told = sorted(_told(tmp_path / "b", "accepted") + _told(tmp_path / "c", "accepted"))
        assert told == list(range(1, 13)), told
    finally:
        if b.proc.poll() is None and _state(b.proc.pid) == "T":
            os.kill(b.proc.pid, signal.SIGCONT)
        b.stop()
        if c is not None:
            c.stop()
        a.stop()


def test_the_supervisors_probes_of_a_stalled_redis_do_not_hold_the_nodes_listeners(
    redis_server: Any, tmp_path: Path
) -> None:
    """A node with workers; its Redis stops answering (a proxy holding what the
    node sends). The supervisor's outage begins (its step waited for the client's
    timeout once) and it probes the spool again and again: each probe waits in a
    thread, so the node's HTTP listener answers what needs no Redis within a
    second or two all along. Before: each probe ran on serve's event loop and held
    every listener for the client's timeout (here 6 s; 5 s by default), again
    after each pause (0.1 s doubling to 2 s): the node mostly frozen for the whole
    outage. Once Redis answers, the outage ends as ever."""
    px = RedisHold(redis_server)
    node = Served(tmp_path, "127.0.0.1:9", spool_url=px.url(node="a", socket_timeout="6"),
                  extra="[analytics]\nenabled = false\n",
                  serve_args=("--allow-volatile",))  # fmt: skip
    try:
        px.hold()
        until("the supervisor's outage", lambda: any(
            "the spool is out of reach" in x for x in node.lines), timeout=60)
        end = time.monotonic() + 16  # (two probes' timeouts and more)
        while time.monotonic() < end:
            st, doc = http("GET", node.base + "/v1/openapi.json", timeout=3)
            assert st == 200 and "paths" in doc
            time.sleep(0.2)
        assert px.held and not any("answers again" in x for x in node.lines)
    finally:
        px.release()
    try:
        until("the outage over", lambda: any("answers again" in x for x in node.lines),
              timeout=60)  # fmt: skip
        assert node.req("GET", "/v1/health", tenant=None)[0] == 200
    finally:
        node.stop()
        px.close()
