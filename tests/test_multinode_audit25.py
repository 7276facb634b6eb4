"""Several nodes on one Redis (session 25's audit): clocks, a stalled Redis.

Real parts: one redis-server (a proxy in front of it to stall it), RedisSpool
nodes, ``fastsend serve`` processes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests._redis_helpers import RedisHold
from tests._serve_helpers import Served, http, until
from tests.test_multinode_audit24 import _off_by
from tests.test_serve_audit17 import TPL

from fastsend.spool.base import DELIVERED, Result
from fastsend.spool.redis import RedisSpool


def test_a_messages_age_is_the_same_on_every_node_whatever_its_clock(redis_server: Any) -> None:
    """Mail spooled by a node whose clock is an hour ahead is, to a node in step,
    as old as it is (its ``[retry] max_age`` runs from when it was spooled), and
    to a node an hour behind too, by that node's clock; what the API shows as
    ``created`` likewise. Before: the row held the spooling node's clock, so the
    node in step saw the mail created an hour in the future (it would never
    expire there: ``created + max_age`` an hour later) and the node behind two
    hours ahead; mail an in-step node spooled was an hour old at once to the
    node ahead (expired an hour early under a one-hour max_age)."""
    url = redis_server.url()
    b = RedisSpool(url + "&node=b")  # in step
    ahead, behind = RedisSpool(url + "&node=ahead"), RedisSpool(url + "&node=behind")
    try:
        t_ahead = _off_by(ahead, 3600.0)
        _off_by(behind, -3600.0)
        cid = b.create_campaign({"from": "a@b.example"})
        (m1,) = ahead.add_messages(cid, [("x@d.example", "d.example", b"{}")], t_ahead)
        (m2,) = b.add_messages(cid, [("y@d.example", "d.example", b"{}")], time.time())
        got = {c.id: c.created for c in b.claim_due(time.time(), 10)}
        assert set(got) == {m1, m2}
        for mid in (m1, m2):
            assert abs(got[mid] - time.time()) < 30, (mid, got[mid] - time.time())
            assert abs(b.message(mid)["created"] - time.time()) < 30
        b.release([m1, m2])
        for node, off in ((ahead, 3600.0), (behind, -3600.0)):
            now = time.time() + off  # (that node's clock)
            got = {c.id: c.created for c in node.claim_due(now, 10)}
            assert set(got) == {m1, m2}
            for mid in (m1, m2):
                assert abs(got[mid] - now) < 30, (node.node, mid, got[mid] - now)
                assert abs(node.message(mid)["created"] - now) < 30
            node.release([m1, m2])
    finally:
        for s in (b, ahead, behind):
            s.close()


def test_retention_prunes_by_the_shared_clock(redis_server: Any) -> None:
    """Final mail's retention (``[spool] final_retention_days``) is judged by
    Redis's clock, as the rows' times are: a node an hour ahead pruning what ended
    more than 30 minutes ago by its clock keeps mail that ended just now. Before:
    its cut-off was its own clock's against times on Redis's, so it pruned mail
    an hour early (and a node behind kept it an hour too long)."""
    url = redis_server.url()
    b = RedisSpool(url + "&node=b")
    ahead = RedisSpool(url + "&node=ahead")
    try:
        t_ahead = _off_by(ahead, 3600.0)
        cid = b.create_campaign({"from": "a@b.example"})
        (mid,) = b.add_messages(cid, [("x@d.example", "d.example", b"{}")], time.time())
        assert [c.id for c in b.claim_due(time.time(), 10)] == [mid]
        b.record_results([Result(mid, DELIVERED, 1, 0.0, 250, "2.0.0", "ok")],
                         time.time())  # fmt: skip
        done = 0
        more = True
        while more:
            d, more = ahead.prune_final(t_ahead - 1800)
            done += d
        assert done == 0 and b.message(mid) is not None
    finally:
        for s in (b, ahead):
            s.close()


def test_a_stalled_redis_does_not_stall_the_nodes_listeners(redis_server: Any, tmp_path: Path) -> None:
    """A node's Redis stops answering (a fork, a long script, a partition: here a
    proxy holding what the node sends): the node's HTTP listener still answers
    what needs no Redis, while its periodic work (its lease, its status) and
    API requests looking up a key or the shared request rate wait in threads;
    once Redis answers, those requests are answered too. Before: the periodic
    tick called Redis on the event loop, and the API's key look-up and shared
    rate too, so every listener of the node waited for the client's timeout
    (here 60 s; 5 s by default, at every tick)."""
    px = RedisHold(redis_server)
    node = Served(tmp_path, None, spool_url=px.url(node="a", socket_timeout="60"),
                  api="rate_limit = 1000\n",
                  serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    got: dict[str, Any] = {}
    try:
        assert node.req("GET", "/v1/campaigns")[0] == 200  # (its key cached)
        px.hold()
        until("the node waiting for Redis", lambda: px.waiting)  # (its tick, every 0.2 s)
        asks = [
            threading.Thread(target=lambda: got.update(known=node.req("GET", "/v1/campaigns"))),
            threading.Thread(target=lambda: got.update(made_up=http(
                "GET", node.base + "/v1/campaigns", key="fs_00000000_" + "A" * 43))),
        ]  # fmt: skip
        for t in asks:
            t.start()
        st, doc = http("GET", node.base + "/v1/openapi.json", timeout=30)
        assert st == 200 and "paths" in doc
        assert px.held and px.waiting and not got  # (Redis still held: nothing of it answered)
    finally:
        px.release()
    try:
        for t in asks:
            t.join(90)
        assert got["known"][0] == 200 and got["made_up"][0] == 401, got
        assert node.req("GET", "/v1/health", tenant=None)[0] == 200
    finally:
        node.stop()
        px.close()


def test_a_campaign_noted_by_a_node_that_died_is_completed_by_another(
    redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a is killed right after noting a new campaign complete (its commit
    point: every row spooled, its events to tell) and never started again (its
    host lost, its local directory with it): node b makes the campaign active and
    tells its rows' "accepted", once. Before: the note was only in a's
    ``held.jsonl``, so the campaign stayed staging (listed nowhere, never sent) and
    the sweep abandoned it after an hour."""
    url = redis_server.url()
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    monkeypatch.setenv("FASTSEND_TEST_FAULT", "idem-kill-after-note")  # (a's start)
    a = Served(tmp_path / "a", "127.0.0.1:9", spool_url=url + "&node=a",
               serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    monkeypatch.delenv("FASTSEND_TEST_FAULT")
    b = Served(tmp_path / "b", "127.0.0.1:9", spool_url=url + "&node=b",
               serve_args=("--allow-volatile", "--no-workers"))  # fmt: skip
    try:
        rows = [{"email": f"r{i}@example.org", "name": f"R{i}"} for i in range(20)]
        with pytest.raises(aiohttp.ClientError):
            a.req("POST", "/v1/campaigns", {"name": "k", "template": TPL, "recipients": rows})
        assert a.proc.wait(20) == -9
        assert (tmp_path / "a" / "spool" / "held.jsonl").exists()  # (a's, unseen by b)

        def listed() -> list[Any]:
            st, got = b.req("GET", "/v1/campaigns")
            assert st == 200, got
            return [c for c in got["campaigns"] if c["status"] == "active"]

        until("the dead node's campaign active on b", listed)
        for mid in (1, 10, 20):
            st, m = b.req("GET", f"/v1/messages/{mid}")
            assert st == 200 and [e["event"] for e in m["events"]] == ["accepted"], m
    finally:
        b.stop()
        a.stop()


def test_a_bounce_a_dead_node_left_untold_is_told_by_another(
    redis_server: Any, tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a takes a submitted message, bounces it (the outcome committed) and
    is killed before it spooled the sender's notice, never to start again (its
    host lost, its ``dsn.journal`` with it): node b sends the notice, once.
    Before: the failure was only in a's journal; no node ever told the sender."""
    from tests.test_serve_dsn import _notices, _serve, _submit

    from fastsend.sink import SinkThread

    url = redis_server.url()
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    with SinkThread(keep_messages=True) as sink:
        monkeypatch.setenv("FASTSEND_TEST_FAULT", "outcomes-kill-after-commit:1")
        a, port = _serve(tmp_path / "a", certs, sink, spool_url=url + "&node=a")
        monkeypatch.delenv("FASTSEND_TEST_FAULT")
        b = None
        try:
            _submit(port, a.keys["acme"], certs[2], "app@example.com",
                    ["permfail-1@example.org", "permfail-2@example.org"])  # fmt: skip
            assert a.proc.wait(30) == -9
            assert (tmp_path / "a" / "spool" / "dsn.journal").read_bytes().count(b"\n") == 2
            b, _port = _serve(tmp_path / "b", certs, sink, spool_url=url + "&node=b")
            (notice,) = _notices(sink, "app@example.com", 1, timeout=90)
            text = notice.data.decode()
            assert "Final-Recipient: rfc822; permfail-1@example.org" in text
            assert "Final-Recipient: rfc822; permfail-2@example.org" in text
            until("b's notice told (its shared line gone)",
                  lambda: not _shared_journal(url))  # fmt: skip
            assert len(_notices(sink, "app@example.com", 1)) == 1
        finally:
            if b is not None:
                b.stop()
            a.stop()


def _shared_journal(url: str) -> dict[bytes, bytes]:
    s = RedisSpool(url + "&node=probe")
    try:
        sh = s.shared()
        assert sh is not None
        return dict(sh.client.hgetall(sh.key("dsnj")))
    finally:
        s.close()
