"""Several nodes on one Redis (session 26's audit): a dead node's notes adopted by
one live node only; Redis calls kept off serve's event loop.

Real parts: one redis-server (a proxy in front of it to stall it), ``fastsend
serve`` processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._redis_helpers import RedisHold, answers_each_held, dead_note_and_frozen_node, stop_nodes
from tests._serve_helpers import Served, http, until
from tests.conftest import free_port, wait_port
from tests.test_serve_audit17 import TPL


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[0].decode()


def _told(node_dir: Path, event: str) -> list[int]:
    """The message ids of ``event`` in a node's event log(s)."""
    out: list[int] = []
    for p in node_dir.rglob("events*.jsonl"):
        for line in p.read_bytes().splitlines():
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(ev, dict) and ev.get("event") == event:
                out.append(int(ev["id"]))
    return out


def test_a_dead_nodes_note_is_adopted_by_one_live_node_only(
    redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a is killed right after noting a new campaign complete; b and c are
    live. b reads the dead node's note and is frozen right then (before it acts
    on it); c adopts the note (the campaign active, its rows' "accepted" told);
    b goes on and leaves it to c. The rows are told once over the nodes. Before:
    adoption was a read then a delete, so b, having read the note, finished it
    too (its rows' "accepted" told again unless c's index had them by then: two
    nodes a moment apart told every row twice, each to its webhooks)."""
    url = redis_server.url()
    args = ("--allow-volatile", "--no-workers")
    a, b = dead_note_and_frozen_node(tmp_path, url, monkeypatch, "held-stop-after-read", 20)
    c = None
    try:
        c = Served(tmp_path / "c", "127.0.0.1:9", spool_url=url + "&node=c", serve_args=args)
        until("c told the dead node's rows",
              lambda: len(_told(tmp_path / "c", "accepted")) >= 20, timeout=90)  # fmt: skip
        os.kill(b.proc.pid, signal.SIGCONT)
        # b goes on with what it read: finishes the note too (before), or leaves it to c
        until("b done with the note", lambda: any(
            "being finished by another node" in x or "is complete now" in x for x in b.lines))
        st, got = c.req("GET", "/v1/campaigns")
        assert st == 200 and [x["status"] for x in got["campaigns"]] == ["active"], got
        b.stop()
        assert not [x for x in b.lines if "is complete now" in x]
        told = sorted(_told(tmp_path / "b", "accepted") + _told(tmp_path / "c", "accepted"))
        assert told == list(range(1, 21)), told
    finally:
        stop_nodes(b, c, a)


def test_clicks_and_unsubscribes_wait_for_a_stalled_redis_off_the_loop(
    redis_server: Any, tmp_path: Path
) -> None:
    """The node's Redis stops answering (a proxy holding what the node sends): a
    click, an open and a one-click unsubscribe wait for it in threads (the
    message's owner, the nodes' link count, the suppression list, the once mark)
    while the node's listener answers what needs no Redis; once Redis answers,
    they are answered as ever. Before: tracking asked Redis on the event loop, so
    one click held every listener of the node for the client's timeout (here
    60 s; 5 s by default, per call: ~20 s a click)."""
    from fastsend.message import tracking as tr

    secret = "s" * 32
    px = RedisHold(redis_server)
    node = Served(tmp_path, None, spool_url=px.url(node="a", socket_timeout="60"),
                  extra=f'[tracking]\nsecret = "{secret}"\n',
                  serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    key = secret.encode()
    click = tr.sign(key, tr.CLICK, "7", "ann@example.org", "https://example.com/a")
    opened = tr.sign(key, tr.OPEN, "8", "bob@example.org")
    unsub = tr.sign(key, tr.UNSUBSCRIBE, "9", "cy@example.org")
    got: dict[str, Any] = {}
    asks = [
        threading.Thread(target=lambda: got.update(click=http(
            "GET", f"{node.base}/t/c/{click}", timeout=120))),
        threading.Thread(target=lambda: got.update(open=http(
            "GET", f"{node.base}/t/o/{opened}.gif", timeout=120))),
        threading.Thread(target=lambda: got.update(unsub=http(
            "POST", f"{node.base}/u/{unsub}", raw=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=120))),
    ]  # fmt: skip
    try:
        px.hold()
        until("the node waiting for Redis", lambda: px.waiting)  # (its tick, every 0.2 s)
        for t in asks:
            t.start()
        for _ in range(3):  # (the loop free while they wait)
            st, doc = http("GET", node.base + "/v1/openapi.json", timeout=30)
            assert st == 200 and "paths" in doc
        assert px.held and not got  # (Redis still held: none of them answered)
    finally:
        px.release()
    try:
        for t in asks:
            t.join(120)
        assert got["click"][0] == 302 and got["open"][0] == 200, got
        assert got["unsub"][0] == 200, got
    finally:
        node.stop()
        px.close()


def test_a_submission_auth_waits_for_a_stalled_redis_off_the_loop(
    redis_server: Any, tmp_path: Path, certs: Any
) -> None:
    """The node's Redis stops answering: an AUTH on the submission port (its
    failure counts for every node, the familiar-address mark) waits for it in a
    thread while the node's HTTP listener answers; once Redis answers, a wrong
    password gets its 535, a right one logs in. Before: the AUTH throttle read and
    wrote its counts in Redis on the event loop: each AUTH held every listener
    of the node for the client's timeout (here 60 s), a failure twice."""
    import aiosmtplib

    cert, key, tls = certs
    port = free_port()
    px = RedisHold(redis_server)
    node = Served(tmp_path, None, spool_url=px.url(node="a", socket_timeout="60"),
                  extra=f'[submission]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\n'
                        f'tls_key = "{key}"\n',
                  serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    wait_port("127.0.0.1", port, timeout=60)

    def login(password: str) -> Any:
        async def go() -> Any:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                                   tls_context=tls, timeout=120)  # fmt: skip
            await smtp.connect()
            try:
                return (await smtp.login("acme", password)).code
            except aiosmtplib.SMTPAuthenticationError as e:
                return e.code
            finally:
                smtp.close()

        return asyncio.run(go())

    got: dict[str, Any] = {}
    assert login(node.keys["acme"]) == 235  # (the key cached: what is held is the throttle)
    asks = [
        threading.Thread(target=lambda: got.update(wrong=login("not the key"))),
        threading.Thread(target=lambda: got.update(right=login(node.keys["acme"]))),
    ]
    try:
        px.hold()
        until("the node waiting for Redis", lambda: px.waiting)
        for t in asks:
            t.start()
        for _ in range(3):  # (the loop free while they wait)
            st, doc = http("GET", node.base + "/v1/openapi.json", timeout=30)
            assert st == 200 and "paths" in doc
        assert px.held and not got
    finally:
        px.release()
    try:
        for t in asks:
            t.join(120)
        assert got == {"wrong": 535, "right": 235}, got
    finally:
        node.stop()
        px.close()



def test_campaign_routes_ask_a_slow_redis_off_the_loop(
    redis_server: Any, tmp_path: Path
) -> None:
    """The node's Redis answers one round trip at a time: reading a
    campaign and the list wait for it in threads
    while the node's listener answers at once; they are answered as ever. Before:
    their spool calls ran on the event loop (after the shared request rate, read in
    a thread), so each held every listener of the node for as long as Redis took,
    per call (a campaign's view: three calls, 12 s)."""
    px = RedisHold(redis_server)
    node = Served(tmp_path, None, spool_url=px.url(node="a", socket_timeout="60"),
                  extra="[analytics]\nenabled = false\n",  # (its flush: on the loop, left)
                  serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    got: dict[str, Any] = {}
    rows = [{"email": f"r{i}@example.org", "name": f"R{i}"} for i in range(3)]
    st, made = node.req("POST", "/v1/campaigns", {"name": "k", "template": TPL,
                                                  "recipients": rows})  # fmt: skip
    assert st in (200, 201, 202), made
    cid = made["id"]
    asks = [
        threading.Thread(target=lambda: got.update(
            list=node.req("GET", "/v1/campaigns", timeout=120))),
        threading.Thread(target=lambda: got.update(
            one=node.req("GET", f"/v1/campaigns/{cid}", timeout=120))),
    ]  # fmt: skip
    assert node.req("GET", f"/v1/campaigns/{cid}")[0] == 200  # (the key cached)
    px.stepping()
    for t in asks:
        t.start()
    assert answers_each_held(node, px, asks) >= 3  # (the loop free while each waits)
    try:
        for t in asks:
            t.join(120)
        assert {k: v[0] for k, v in got.items()} == {"list": 200, "one": 200}, got
        assert got["one"][1]["counts"]["queued"] == 3, got
    finally:
        node.stop()
        px.close()
