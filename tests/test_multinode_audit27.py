"""Several nodes on one Redis (session 27's audit): adoption of a dead node's work
fenced (a node that took it, stalled and lost it does not finish it); Redis calls
kept off serve's event loop.

Real parts: one redis-server (a proxy in front of it to slow it), ``fastsend
serve`` processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests._redis_helpers import RedisHold, answers_each_held, dead_note_and_frozen_node, stop_nodes
from tests._serve_helpers import Served, http, until
from tests.conftest import free_port, wait_port
from tests.test_multinode_audit26 import _told


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
    args = ("--allow-volatile", "--no-workers")
    a, b = dead_note_and_frozen_node(tmp_path, url, monkeypatch, "held-stop-after-take", 12)
    c = None
    try:
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
        stop_nodes(b, c, a)


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


def test_messages_posted_and_read_wait_for_a_slow_redis_off_the_loop(
    redis_server: Any, tmp_path: Path
) -> None:
    """The node's Redis answers one round trip at a time: a raw message of
    400 KB (its body a blob), a message to two recipients, and a message's view
    (its row, tags, events) wait for it in threads while the node's listener
    answers at once; they are answered as ever, the events told and indexed.
    Before: POST /v1/messages asked Redis on the event loop (the transactional
    campaign's check, the tenant's caps, the blob, the rows, the index's flush)
    and so did the message view's event index, each call holding every listener
    of the node for as long as Redis took."""
    import base64

    px = RedisHold(redis_server)
    node = Served(tmp_path, None, spool_url=px.url(node="a", socket_timeout="60"),
                  extra="[analytics]\nenabled = false\n",  # (the rollups' flush: left)
                  serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    body = b"From: a@example.com\r\nTo: r@example.org\r\nSubject: big\r\n\r\n" + (
        b"0123456789abcdef" * 64 + b"\r\n") * 390  # (~400 KB)
    raw = {"from": "a@example.com", "to": "r@example.org",
           "raw": base64.b64decode(base64.b64encode(body)).decode()}  # fmt: skip
    text = {"from": "a@example.com", "subject": "s", "text": "t", "tags": ["k"],
            "to": ["u1@example.org", "u2@example.org"]}  # fmt: skip
    st, first = node.req("POST", "/v1/messages", text)  # (the key cached, the campaign made)
    assert st == 202, first
    mid = first["messages"][0]["ids"][0]
    got: dict[str, Any] = {}
    asks = [
        threading.Thread(target=lambda: got.update(
            raw=node.req("POST", "/v1/messages", raw, timeout=120))),
        threading.Thread(target=lambda: got.update(
            text=node.req("POST", "/v1/messages", text, timeout=120))),
        threading.Thread(target=lambda: got.update(
            one=node.req("GET", f"/v1/messages/{mid}", timeout=120))),
    ]  # fmt: skip
    px.stepping()
    for t in asks:
        t.start()
    assert answers_each_held(node, px, asks) >= 6  # (the loop free while each waits)
    try:
        for t in asks:
            t.join(120)
        assert {k: v[0] for k, v in got.items()} == {"raw": 202, "text": 202, "one": 200}, got
        assert got["one"][1]["tags"] == ["k"], got["one"]
        assert [e["event"] for e in got["one"][1]["events"]] == ["accepted"], got["one"]
        rid = got["raw"][1]["messages"][0]["ids"][0]
        until("the raw message's events indexed", lambda: [
            e["event"] for e in node.req("GET", f"/v1/messages/{rid}")[1]["events"]
        ] == ["accepted"])  # fmt: skip
        assert node.req("GET", f"/v1/messages/{rid}")[1]["to"] == "r@example.org"
    finally:
        node.stop()
        px.close()


def test_a_submitted_message_waits_for_a_slow_redis_off_the_loop(
    redis_server: Any, tmp_path: Path, certs: Any
) -> None:
    """The node's Redis answers one round trip at a time: a message
    submitted on the submission port (to two recipients, and one of 400 KB: its
    body a blob) is spooled in threads (the tenant's caps, its transactional
    campaign, the blob, the rows) while the node's HTTP listener answers at once;
    each gets its 250 and its rows are queued. Before: the submission listener
    spooled on the event loop, each Redis call holding every listener of the node
    for as long as Redis took."""
    import aiosmtplib

    cert, key, tls = certs
    port = free_port()
    px = RedisHold(redis_server)
    node = Served(tmp_path, None, spool_url=px.url(node="a", socket_timeout="60"),
                  extra=f'[submission]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\n'
                        f'tls_key = "{key}"\n[analytics]\nenabled = false\n',
                  serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    wait_port("127.0.0.1", port, timeout=60)
    small = b"From: a@example.com\r\nTo: u@example.org\r\nSubject: s\r\n\r\nhello\r\n"
    big = b"From: a@example.com\r\nTo: u@example.org\r\nSubject: b\r\n\r\n" + (
        b"0123456789abcdef" * 64 + b"\r\n") * 390

    ready = threading.Barrier(3)

    def send(msg: bytes, rcpts: list[str], slow: bool) -> Any:
        async def go() -> Any:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                                   tls_context=tls, timeout=120)  # fmt: skip
            await smtp.connect()
            try:
                await smtp.login("acme", node.keys["acme"])
                if slow:  # (both logged in, then Redis slowed)
                    await asyncio.to_thread(ready.wait, 60)
                    await asyncio.to_thread(ready.wait, 60)
                errs, reply = await smtp.sendmail("a@example.com", rcpts, msg)
                return errs, reply
            finally:
                smtp.close()

        return asyncio.run(go())

    first = send(small, ["u0@example.org"], False)  # (the key cached, the campaign made)
    assert "Ok: queued" in first[1], first
    got: dict[str, Any] = {}
    asks = [
        threading.Thread(target=lambda: got.update(
            two=send(small, ["u1@example.org", "u2@example.org"], True))),
        threading.Thread(target=lambda: got.update(
            big=send(big, ["u3@example.org"], True))),
    ]  # fmt: skip
    try:
        for t in asks:
            t.start()
        ready.wait(60)
        px.stepping()
        ready.wait(60)
    except BaseException:
        px.release()
        raise
    assert answers_each_held(node, px, asks) >= 6  # (the loop free while each waits)
    try:
        for t in asks:
            t.join(120)
        assert "Ok: queued" in got["two"][1] and "2 recipient" in got["two"][1], got
        assert "Ok: queued" in got["big"][1], got
        from fastsend.spool import open_spool

        spool = open_spool(node.spool_url)
        try:
            for name, n in (("two", 2), ("big", 1)):
                mid = int(got[name][1].split("queued as ")[1].split()[0])
                rows = [spool.message(i) for i in range(mid, mid + n)]
                assert [r and r["state"] for r in rows] == ["queued"] * n, rows
        finally:
            spool.close()
    finally:
        node.stop()
        px.close()
