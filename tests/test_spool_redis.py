"""The Redis spool: the SQLite spool's scenarios run on both backends, leases and
claims across nodes, and several `fastsend resume` nodes sharing one queue."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from tests._engine_helpers import (
    fastsend_cmd,
    received_counts,
    sink_log,
    summary,
    write_campaign,
)
from tests._redis_helpers import RedisServer, start_redis

from fastsend.sink import SinkProcess
from fastsend.spool import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    SUPPRESSED,
    Result,
    Spool,
    open_spool,
    spool_local_dir,
)
from fastsend.spool.redis import RedisSpool, parse_url
from fastsend.spool.sqlite import SQLiteSpool

Factory = Callable[[], Spool]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with start_redis() as server:
        yield server


def rows(n: int, domain: str = "example.com") -> list[tuple[str, str, bytes]]:
    return [(f"u{i}@{domain}", domain, orjson.dumps({"i": str(i)})) for i in range(n)]


@pytest.fixture(params=["sqlite", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Opens the same spool again on each call (the same node, for Redis)."""
    if request.param == "sqlite":
        return lambda: SQLiteSpool(str(tmp_path))
    server: RedisServer = request.getfixturevalue("redis_server")
    url = server.url(node="n1", dir=str(tmp_path))
    return lambda: open_spool(url)


def test_add_claim_record_and_counts(make: Factory) -> None:
    s = make()
    cid = s.create_campaign({"from": "a@b.example"}, name="c1")
    now = time.time()
    ids = s.add_messages(cid, rows(10), now)
    assert len(ids) == 10 and len(set(ids)) == 10
    claimed = s.claim_due(now, 4)
    assert len(claimed) == 4
    assert claimed[0].vars == orjson.dumps({"i": claimed[0].rcpt[1:].split("@")[0]})
    assert claimed[0].created == pytest.approx(now) and claimed[0].attempts == 0
    assert s.counts()["inflight"] == 4 and s.counts()["queued"] == 6
    again = s.claim_due(now, 100)
    assert {c.id for c in again}.isdisjoint({c.id for c in claimed})
    assert len(again) == 6
    s.record_results(
        [
            Result(claimed[0].id, DELIVERED, 1, 0, 250, "2.0.0", "ok"),
            Result(claimed[1].id, BOUNCED, 1, 0, 550, "5.1.1", "no such user"),
            Result(claimed[2].id, DEFERRED, 1, now + 60, 451, "4.7.1", "later"),
        ],
        now,
    )
    c = s.counts(cid)
    assert c["delivered"] == 1 and c["bounced"] == 1 and c["deferred"] == 1
    assert c["inflight"] == 7
    m = s.message(claimed[1].id)
    assert m is not None and m["state"] == "bounced" and m["last_enhanced"] == "5.1.1"
    assert m["attempts"] == 1 and m["last_code"] == 550 and m["campaign"] == cid
    assert s.message(10**9) is None
    s.release([x.id for x in again] + [claimed[3].id])
    assert s.counts(cid)["queued"] == 7
    assert claimed[2].id not in {x.id for x in s.claim_due(now + 1, 100)}
    got = s.claim_due(now + 61, 100)
    assert [x.id for x in got] == [claimed[2].id] and got[0].attempts == 1
    s.close()


def test_durable_across_reopen_and_recover_inflight(make: Factory) -> None:
    s = make()
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, rows(100), now)
    s.claim_due(now, 30)
    s2 = make()  # a crash: no close, a new process opens the same spool
    assert s2.counts()["inflight"] == 30
    assert s2.recover() == 30
    assert s2.counts()["queued"] == 100
    assert len(s2.claim_due(now, 1000)) == 100


def test_paused_and_cancelled_campaigns(make: Factory) -> None:
    s = make()
    a = s.create_campaign({"from": "a@b.example"})
    b = s.create_campaign({"from": "a@b.example"}, name="bee", tenant="t2", options={"x": 1})
    now = time.time()
    s.add_messages(a, rows(5, "a.example"), now)
    s.add_messages(b, rows(5, "b.example"), now)
    s.set_campaign_status(a, "paused")
    got = s.claim_due(now, 100)
    assert {c.campaign for c in got} == {b}
    s.set_campaign_status(a, "active")
    assert {c.campaign for c in s.claim_due(now, 100)} == {a}
    with pytest.raises(ValueError):
        s.set_campaign_status(a, "bogus")
    c = s.create_campaign({"from": "a@b.example"})
    s.add_messages(c, rows(4, "c.example"), now)
    inflight = s.claim_due(now, 1)[0]
    s.set_campaign_status(c, "cancelled")
    counts = s.counts(c)
    assert counts["cancelled"] == 3 and counts["inflight"] == 1
    assert inflight.campaign == c
    assert s.next_due() is None
    # Its attempt comes back deferred: final (cancelled), not deferred for ever.
    s.record_results([Result(inflight.id, DEFERRED, 1, now + 60, 451, "4.0.0", "x")], now)
    assert s.counts(c)["cancelled"] == 4 and s.counts(c)["deferred"] == 0
    assert s.next_due() is None and s.claim_due(now + 3600, 10) == []
    info = s.get_campaign(b)
    assert info is not None and (info.name, info.tenant, info.options) == ("bee", "t2", {"x": 1})
    assert info.status == "active" and info.spec == {"from": "a@b.example"}
    assert [x.status for x in s.list_campaigns()] == ["active", "active", "cancelled"]
    assert s.get_campaign(999) is None
    s.set_campaign_status(999, "paused")  # no such campaign: nothing happens
    assert s.get_campaign(999) is None


def test_queue_shape_next_due_and_suppressed(make: Factory) -> None:
    s = make()
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, rows(3, "x.example"), now - 3600)  # an hour old
    s.add_messages(cid, rows(2, "y.example"), now)
    s.add_messages(cid, rows(4, "z.example"), now, state=SUPPRESSED)
    s.claim_due(now - 3600, 1)  # in flight still counts in the shape
    shape = dict(s.queue_shape(now))
    assert sum(shape["x.example"]) == 3 and shape["x.example"][4] == 3  # 40..80 min bucket
    assert shape["y.example"][0] == 2 and "z.example" not in shape
    assert s.next_due() == pytest.approx(now - 3600, abs=1e-3)
    assert s.counts(cid)["suppressed"] == 4
    assert len(s.claim_due(now, 100)) == 4  # suppressed rows are never due


def test_ordering_oldest_due_first_across_campaigns(make: Factory) -> None:
    s = make()
    a = s.create_campaign({"from": "a@b.example"})
    b = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(a, rows(3, "a.example"), now - 10)
    s.add_messages(b, rows(3, "b.example"), now - 20)
    s.add_messages(a, rows(3, "a2.example"), now - 30)
    got = s.claim_due(now, 6)
    # Which ones, not their order (SQLite's RETURNING order is unspecified).
    assert sorted(c.domain for c in got) == ["a2.example"] * 3 + ["b.example"] * 3


# -- Redis only: nodes, leases, atomic claims ----------------------------------


def test_url_parameters(tmp_path: Path) -> None:
    url, ours = parse_url("redis://127.0.0.1:1/2?prefix=p&dir=/x&lease=5&socket_timeout=3")
    assert url == "redis://127.0.0.1:1/2?socket_timeout=3"
    assert ours == {"prefix": "p", "dir": "/x", "lease": "5"}
    assert spool_local_dir("redis://h/0?dir=/var/fs") == "/var/fs"
    assert spool_local_dir("redis://h/0") == "./spool"
    assert spool_local_dir("sqlite:/a/b") == "/a/b" and spool_local_dir("/c") == "/c"
    assert isinstance(open_spool(str(tmp_path)), SQLiteSpool)


def test_a_dead_nodes_window_comes_back_after_its_lease(redis_server: RedisServer) -> None:
    url = redis_server.url()
    a = RedisSpool(url + "&node=a&lease=0.3")
    b = RedisSpool(url + "&node=b&lease=0.3")
    cid = a.create_campaign({"from": "a@b.example"})
    now = time.time()
    a.add_messages(cid, rows(50), now)
    held = {c.id for c in a.claim_due(now, 20)}
    # b starting up does not take a live node's window...
    assert b.recover() == 0
    assert len(b.claim_due(now, 100)) == 30
    # ...and waits for it: next_due is a's lease deadline while a holds messages.
    nd = b.next_due()
    assert nd is not None and nd <= time.time() + 0.3 + 0.05
    # a renews while alive: nothing moves.
    for _ in range(4):
        time.sleep(0.1)
        a.renew()
    assert b.claim_due(time.time(), 100) == [] and b.counts()["inflight"] == 50
    # a dies (no more renewals): its window is claimable by b after the lease.
    time.sleep(0.45)
    again = b.claim_due(time.time(), 100)
    assert {c.id for c in again} == held
    # a's late answer still makes a message final (no resend after it).
    x = next(iter(held))
    a.record_results([Result(x, DELIVERED, 1, 0, 250, "2.0.0", "ok")], now)
    assert b.counts(cid)["delivered"] == 1 and b.counts(cid)["inflight"] == 49
    a.release(held - {x})  # a no longer holds them: nothing happens
    assert b.counts(cid)["queued"] == 0
    b.release(held - {x})
    assert b.counts(cid)["queued"] == 19
    b.close()
    a.close()


def test_claims_are_atomic_across_nodes(redis_server: RedisServer) -> None:
    url = redis_server.url()
    seed = RedisSpool(url)
    cid = seed.create_campaign({"from": "a@b.example"})
    now = time.time()
    for j in range(5):
        seed.add_messages(cid, rows(1000, f"d{j}.example"), now)
    got: list[list[int]] = [[] for _ in range(4)]

    def node(i: int) -> None:
        s = RedisSpool(url + f"&node=n{i}")
        while batch := s.claim_due(now, 37):
            got[i].extend(c.id for c in batch)
        s.close()

    threads = [threading.Thread(target=node, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [x for g in got for x in g]
    assert len(every) == len(set(every)) == 5000
    assert all(g for g in got)
    assert seed.counts() == {**seed.counts(), "inflight": 5000, "queued": 0}


# -- several nodes: `fastsend resume` processes sharing one Redis spool ----------

NODES_N = 6000
NODE_WINDOW = 300  # delivery.window of each node (one worker each)


def _spool_campaign(tmp: Path, url: str) -> list[str]:
    """Spool a campaign once, as `fastsend send` would (through the seam)."""
    from fastsend.message import Campaign

    addrs = [f"user{i}@d{i % 7}.example.net" for i in range(NODES_N)]
    s = open_spool(url)
    cid = s.create_campaign(Campaign.load(str(write_campaign(tmp))).to_dict(), name="multi")
    s.add_messages(
        cid,
        [
            (a, a.split("@")[1], orjson.dumps({"email": a, "name": f"N{i}"}))
            for i, a in enumerate(addrs)
        ],
        time.time(),
    )
    s.close()
    return addrs


def _start_node(
    tmp: Path, url: str, name: str, ip: str, sink: tuple[str, int]
) -> subprocess.Popen[str]:
    cfg = tmp / "node.toml"
    cfg.write_text(f"[delivery]\nwindow = {NODE_WINDOW}\nbatch_size = 50\n")
    return subprocess.Popen(
        fastsend_cmd(
            "resume",
            "-c",
            str(cfg),
            "--spool",
            f"{url}&node={name}&dir={tmp / name}",
            "--route",
            f"*={sink[0]}:{sink[1]}",
            "--source-ip",
            ip,
            "--workers",
            "1",
            "--max-wait",
            "30",
            "--json",
            "--no-progress",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    return summary(subprocess.CompletedProcess([], 0, out, err))


def test_two_nodes_share_one_queue_exactly_once(redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url()
    addrs = _spool_campaign(tmp_path, url)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "2") as sink:
        a = _start_node(tmp_path, url, "A", "127.0.0.2", sink.addresses[0])
        b = _start_node(tmp_path, url, "B", "127.0.0.3", sink.addresses[0])
        sa, sb = _finish(a), _finish(b)
    got = received_counts(log)
    assert set(got) == set(addrs) and max(got.values()) == 1, "lost or duplicated"
    peers = Counter(rec["peer"] for rec in sink_log(log) for _ in rec["recipients"])
    assert set(peers) == {"127.0.0.2", "127.0.0.3"}, peers
    assert min(peers.values()) >= NODE_WINDOW, f"one node barely took part: {peers}"
    assert sa["delivered"] == sb["delivered"] == NODES_N  # both read the shared counts
    s = open_spool(url)
    assert s.counts()["delivered"] == NODES_N and s.next_due() is None
    s.close()


def test_kill_9_of_a_node_its_window_is_recovered_by_the_other(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url = redis_server.url(lease="1.5")
    addrs = _spool_campaign(tmp_path, url)
    log = tmp_path / "sink.jsonl"
    spool = open_spool(url)
    with SinkProcess("--log", str(log), "--latency-ms", "2") as sink:
        a = _start_node(tmp_path, url, "A", "127.0.0.2", sink.addresses[0])
        b = _start_node(tmp_path, url, "B", "127.0.0.3", sink.addresses[0])
        deadline = time.monotonic() + 60
        while spool.counts()["delivered"] < 1500:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        workers = psutil.Process(a.pid).children()
        os.kill(a.pid, signal.SIGKILL)
        assert spool.counts()["delivered"] < NODES_N, "finished before the kill"
        assert isinstance(spool, RedisSpool)
        held = int(spool.r.scard(f"{spool.k}:fl:A"))  # A's window at its death
        assert 0 < held <= NODE_WINDOW
        a.communicate(timeout=30)
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        for w in alive:  # ours: the killed node's orphaned worker
            w.kill()
        assert not alive, "a worker outlived its supervisor"
        sb = _finish(b)
    got = received_counts(log)
    assert set(got) == set(addrs), "a recipient was lost"
    dups = sum(c - 1 for c in got.values())
    assert dups <= held, f"{dups} duplicates exceed the dead node's window ({held})"
    print(f"dead node's window {held}, duplicates {dups}")
    assert sb["delivered"] == NODES_N and sb["deferred"] == 0
    c = spool.counts()
    assert c["delivered"] == NODES_N and c["inflight"] == 0 and c["queued"] == 0
    spool.close()
