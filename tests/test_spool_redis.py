"""The Redis spool: the SQLite spool's scenarios run on both backends, leases and
claims across nodes, and several `fastsend resume` nodes sharing one queue."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    sink_log,
    spool_rows,
    summary,
    write_campaign,
)
from tests._redis_helpers import RedisServer, start_redis

from fastsend.cluster import ClusterError
from fastsend.sink import SinkProcess
from fastsend.spool import (
    DELIVERED,
    Result,
    open_spool,
    spool_local_dir,
)
from fastsend.spool import parse_redis_url as parse_url
from fastsend.spool.redis import RedisSpool
from fastsend.spool.sqlite import SQLiteSpool

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
    # (leases of 1 s: 0.3 s was a loaded CI's stall between two calls)
    a = RedisSpool(url + "&node=a&lease=1")
    b = RedisSpool(url + "&node=b&lease=1")
    cid = a.create_campaign({"from": "a@b.example"})
    now = time.time()
    a.add_messages(cid, spool_rows(50), now)
    held = {c.id for c in a.claim_due(now, 20)}
    # b starting up does not take a live node's window...
    assert b.recover() == 0
    assert len(b.claim_due(now, 100)) == 30
    # ...and waits for it: next_due is a's lease deadline while a holds messages.
    nd = b.next_due()
    assert nd is not None and nd <= time.time() + 1 + 0.05
    # a renews while alive: nothing moves.
    for _ in range(4):
        time.sleep(0.35)
        a.renew()
    assert b.claim_due(time.time(), 100) == [] and b.counts()["inflight"] == 50
    # a dies (no more renewals): its window is claimable by b after the lease
    # (b, alive, claims meanwhile: a Redis no node reached would be an outage).
    deadline = time.monotonic() + 60
    while not (again := b.claim_due(time.time(), 100)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
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


def test_leases_that_lapse_while_redis_refuses_writes_are_not_a_death() -> None:
    """Redis answers but refuses writes for longer than the nodes' lease (a
    failover that made it a replica: READONLY; too few replicas: NOREPLICAS):
    every call of both nodes is an outage error (``outage_errors``: the
    supervisor rides it out), not a plain ResponseError that ended the
    supervisor's run. Once writes are taken again, the first node to claim
    does not take the other's window back as a dead node's: no node could
    renew, so each gets a lease from then (the other renews in it: nothing
    moves, nothing is sent twice). A node that stays silent after that is
    taken back when that lease lapses, and a node dead meanwhile is graced
    once, not again. Before: the first claim took the other node's whole
    window back (each message sent again)."""
    import redis as redis_py

    from fastsend.spool.redis import RedisRefusesWrites

    with start_redis() as server:
        url = server.url()
        # A lease of 2 s: b renews in time after a stall of the test up to
        # ~2 s (a loaded CI's; 0.6 s failed on a 0.6 s stall).
        a = RedisSpool(url + "&node=a&lease=2")
        b = RedisSpool(url + "&node=b&lease=2")
        r = redis_py.Redis(port=server.port)
        cid = a.create_campaign({"from": "a@b.example"})
        now = time.time()
        a.add_messages(cid, spool_rows(20), now)
        held_a = {c.id for c in a.claim_due(now, 10)}
        held_b = {c.id for c in b.claim_due(now, 10)}
        assert len(held_a) == len(held_b) == 10
        for refuse, undo in (
            (("REPLICAOF", "127.0.0.1", "1"), ("REPLICAOF", "NO", "ONE")),
            (("CONFIG", "SET", "min-replicas-to-write", "1"),
             ("CONFIG", "SET", "min-replicas-to-write", "0")),
        ):  # fmt: skip
            r.execute_command(*refuse)
            try:
                t_end = time.monotonic() + 2.4  # > the lease
                while time.monotonic() < t_end:
                    for spool in (a, b):
                        with pytest.raises(spool.outage_errors()) as e:
                            spool.claim_due(time.time(), 5)
                        assert isinstance(e.value, (redis_py.exceptions.ReadOnlyError,
                                                    RedisRefusesWrites)), e.value  # fmt: skip
                    time.sleep(0.1)
            finally:
                r.execute_command(*undo)
            # a first: b's window stays b's, and b renews it in time.
            assert a.claim_due(time.time(), 0) == []
            assert a.stats().get("taken_over", 0) == 0
            b.renew()
            assert b.counts(cid)["inflight"] == 20 and a.stats().get("taken_over", 0) == 0
            a.renew()
        # b dies now: a, alive, takes its window back once b's lease lapses.
        deadline = time.monotonic() + 60
        while not (again := a.claim_due(time.time(), 100)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert {c.id for c in again} == held_b and a.stats()["taken_over"] == 10
        # a dies too; c, started later and idle, is graced once for a, then takes it.
        c = RedisSpool(url + "&node=c&lease=2")
        time.sleep(2.4)  # nobody reaches Redis: a's lease lapses in that silence
        assert c.claim_due(time.time(), 100) == []  # a graced one lease...
        time.sleep(2.1)  # ...and silent through it: taken back, not graced again
        assert len(c.claim_due(time.time(), 100)) == 20
        for s in (a, b, c):
            s.close()


def test_a_node_killed_on_this_host_is_taken_back_at_the_next_start(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """``fastsend send`` on Redis killed (kill -9) with its window in flight,
    then nothing reaches Redis for longer than the lease (the lull the outage
    grace reads as an outage), then a start on this host (``resume``:
    ``Spool.recover``): the dead process ran here (its holder is kept in
    ``P:holders``, its pid gone), so its window is taken back at once, not
    graced one lease more; a live holder's is not touched. The receiver never
    greeted: its worker's write log (the local dir) names none, so none counts
    an attempt of unknown outcome (redis28: before, each did)."""
    import socket

    url = redis_server.url(lease="1", dir=str(tmp_path / "local"))  # (not ./spool)
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(1024)
    camp = write_campaign(tmp_path)
    rows = "".join(f"u{i}@d{i % 3}.example,N{i}\n" for i in range(60))
    (tmp_path / "r.csv").write_text("email,name\n" + rows)
    proc = subprocess.Popen(
        fastsend_cmd("send", str(camp), "-r", str(tmp_path / "r.csv"), "--spool", url,
                     "--route", f"*=127.0.0.1:{mute.getsockname()[1]}", "--no-dkim",
                     "--no-progress", "--workers", "1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    spool = open_spool(url)
    try:
        deadline = time.monotonic() + 60
        while spool.counts()["inflight"] < 60:  # the whole list on the mute connections
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
        time.sleep(1.5)  # > the lease, and nobody reaches Redis meanwhile
        live = RedisSpool(url + "&node=live")
        live.hold_supervisor("fastsend serve")  # a live holder here: never taken
        assert spool.recover() == 0
        c = spool.counts()
        assert c["inflight"] == 0 and c["queued"] == 60, c
        assert spool.taken_back() == []
        live.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        mute.close()
        spool.close()


def test_a_spool_redis_cannot_take_is_a_clear_error_without_its_password() -> None:
    """``fastsend resume`` on a Redis it cannot use: out of reach, or a
    replica that refuses writes (READONLY: the URL names a replica, or a
    failover is under way). Each is one line naming the problem, exit 75 (try
    again later; 2 for a bad URL), the URL's password as ****.
    Before: the password was printed in full (stderr, the journal), and a
    replica gave a traceback."""
    from conftest import free_port

    closed = free_port()
    for url, code in ((f"redis://:s3cretPW@127.0.0.1:{closed}/0?prefix=p", 75),
                      (f"redis://u:s3cretPW@127.0.0.1:{closed}/0?prefix=p&lease=x", 2)):  # fmt: skip
        r = subprocess.run(fastsend_cmd("resume", "--spool", url, "--no-progress"),
                           capture_output=True, text=True, env=_env(), timeout=60)  # fmt: skip
        assert r.returncode == code, r.stderr
        assert "s3cretPW" not in r.stderr and ":****@127.0.0.1" in r.stderr, r.stderr
    with start_redis() as server:
        import redis as redis_py

        url = server.url()
        RedisSpool(url).close()  # (resume wants a spool that exists)
        redis_py.Redis(port=server.port).execute_command("REPLICAOF", "127.0.0.1", "1")
        r = subprocess.run(fastsend_cmd("resume", "--spool", url, "--no-progress"),
                           capture_output=True, text=True, env=_env(), timeout=60)  # fmt: skip
    assert r.returncode == 75, r.stderr  # (a failover under way: try again later)
    assert "takes no writes now (ReadOnlyError" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_outcomes_and_their_webhook_events_in_one_step(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """record_outcomes writes the outcomes and appends their events to the shared
    webhook outbox in one script call; a local spool keeps no outbox (None)."""
    from fastsend.serve.shared_state import RedisOutbox

    s = RedisSpool(redis_server.url() + "&node=a")
    shared = s.shared()
    box = RedisOutbox(shared.client, shared.prefix, "a")
    box.set_urls(["http://hooks.example/"])
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, spool_rows(3), now)
    got = s.claim_due(now, 10)
    res = [Result(c.id, DELIVERED, 1, 0, 250, "2.0.0", "ok") for c in got]
    first = s.record_outcomes(res, now, [b'{"n":1}', b'{"n":2}'])
    assert first is not None
    assert box.fetch("http://hooks.example/", 10) == [(first, b'{"n":1}'), (first + 1, b'{"n":2}')]
    assert s.counts(cid)["delivered"] == 3 and s.counts(cid)["inflight"] == 0
    assert s.record_outcomes([], now, [b'{"n":3}']) == first + 2  # events alone
    assert s.record_outcomes([], now) is None
    s.close()
    local = SQLiteSpool(str(tmp_path / "sq"))
    assert local.record_outcomes([], now, [b"{}"]) is None
    local.close()


def test_claim_ahead_answers_at_the_next_call_within_the_window(
    redis_server: RedisServer,
) -> None:
    """claim_next sends the claim and hands out its answer at the key's next call:
    what a key holds (handed out, answered, on the way) stays within its limit;
    next_due sees an answer not handed out yet; an answer read too late goes
    back to queued, and so does what close() finds not handed out."""
    from fastsend.spool.redis import AHEAD_TTL

    url = redis_server.url()
    s = RedisSpool(url + "&node=a")
    other = RedisSpool(url + "&node=b")
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, spool_rows(1000), now)
    fl = f"{s.k}:fl:a"
    assert s.claim_next(now, 300, 0) == []  # sent; its answer is read next time
    assert s.claim_next(now, 200, 1) == []  # another window, its own claim
    assert s.next_due() is not None and s.next_due() <= time.time()  # answered, not handed out
    w0 = s.claim_next(now, 300, 0)
    assert len(w0) == 300 and int(s.r.scard(fl)) == 500  # window 0 full: nothing sent
    assert len(s.claim_next(now, 200, 1)) == 200
    # 100 of window 0 answered: its next call claims 100 more, handed out after.
    assert s.claim_next(now, 100, 0) == [] and int(s.r.scard(fl)) <= 600
    got = s.claim_next(now, 110, 0)  # a rest of 10 is not worth a claim: none sent
    assert len(got) == 100 and not {c.id for c in got} & {c.id for c in w0} and not s._ahead
    # Another node's claims never overlap.
    assert len(other.claim_due(now, 1000)) == 400
    assert s.claim_next(now, 50, 0) == []  # sent: nothing due
    assert s.claim_next(now, 50, 0) == []  # answered "nothing due": nothing sent
    nd = s.next_due()  # b's lease deadline: nothing due here, nothing claimed ahead
    assert nd is not None and nd > time.time() + 10 and not s._ahead
    # An answer read later than AHEAD_TTL is put back (a campaign paused meanwhile
    # stops within it): the claim sent instead finds the campaign paused.
    s.release([c.id for c in got])
    assert s.claim_next(now, 100, 0) == []
    deadline = time.monotonic() + 60
    while s.counts(cid)["queued"]:  # Redis ran it (the answer is not read yet)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s.set_campaign_status(cid, "paused")
    time.sleep(AHEAD_TTL + 0.1)
    assert s.claim_next(now, 100, 0) == [] and s.counts(cid)["queued"] == 100
    s.set_campaign_status(cid, "active")
    assert s.claim_next(now, 100, 0) == []  # that claim found nothing: none sent
    assert not s._ahead and s.claim_next(now, 100, 0) == []  # sent
    # close() puts back what was claimed ahead and never handed out.
    s.close()
    assert s.counts(cid)["queued"] == 100 and s.counts(cid)["inflight"] == 900
    other.close()


def test_claims_are_atomic_across_nodes(redis_server: RedisServer) -> None:
    url = redis_server.url()
    seed = RedisSpool(url)
    cid = seed.create_campaign({"from": "a@b.example"})
    now = time.time()
    for j in range(5):
        seed.add_messages(cid, spool_rows(1000, f"d{j}.example"), now)
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
    assert isinstance(spool, RedisSpool)
    fl = f"{spool.k}:fl:"
    with SinkProcess("--log", str(log), "--latency-ms", "2") as sink:
        # A alone until it is well under way, then frozen (SIGSTOP: the supervisor and
        # its worker, looked for then) while it holds a window, which is read (a call A
        # sent just before may still land); B is started and killing A waits until B
        # claims too. Before, both started at once and A was frozen once 1,000 were
        # delivered: a node here sends 5,000 a second, so on a loaded machine A could
        # start after B had claimed them all (A never held a window: "no progress"
        # after 60 s), and A's worker, looked for before it was forked, was never
        # frozen (it went on sending while A was read).
        a = _start_node(tmp_path, url, "A", "127.0.0.2", sink.addresses[0])
        sup = psutil.Process(a.pid)
        deadline = time.monotonic() + 60
        held = 0
        while not held:
            assert time.monotonic() < deadline and a.poll() is None, "A made no progress"
            if spool.counts()["delivered"] >= 500 and spool.r.scard(fl + "A"):
                procs = [sup, *sup.children()]
                for p in procs:
                    p.suspend()
                time.sleep(0.05)
                held = int(spool.r.scard(fl + "A"))  # A's window at its death
                if not held:
                    for p in procs:
                        p.resume()
            time.sleep(0.002)
        b = _start_node(tmp_path, url, "B", "127.0.0.3", sink.addresses[0])
        while not spool.r.scard(fl + "B") and not spool.stats().get("taken_over"):
            assert time.monotonic() < deadline and b.poll() is None, "B made no progress"
            time.sleep(0.01)
        workers = procs[1:]
        assert workers, "A's worker was not found"
        os.kill(a.pid, signal.SIGKILL)
        assert spool.counts()["delivered"] < NODES_N, "finished before the kill"
        assert 0 < held <= NODE_WINDOW
        # (its worker first: a worker alive would hold A's output pipes open)
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        states = [(w.pid, w.status()) for w in alive]
        for w in alive:  # ours: the killed node's orphaned worker
            w.kill()
        assert not alive, f"a worker outlived its supervisor: {states}"
        a.communicate(timeout=30)
        sb = _finish(b)
    got = received_counts(log)
    assert set(got) == set(addrs), "a recipient was lost"
    dups = sum(c - 1 for c in got.values())
    # Each duplicate is a message put back from a node's window after its lease
    # lapsed, as Redis counts them (fastsend_redelivered_total): the dead node's
    # window, and on a loaded machine also any window of a node whose supervisor
    # was starved past its lease and grace (3 s here). The window read at A's
    # death missed those, and a call of A's landing after the read.
    taken = spool.stats().get("taken_over", 0)
    assert dups <= taken, f"{dups} duplicates exceed the messages put back ({taken})"
    print(f"dead node's window {held}, put back {taken}, duplicates {dups}")
    assert sb["delivered"] == NODES_N and sb["deferred"] == 0
    c = spool.counts()
    assert c["delivered"] == NODES_N and c["inflight"] == 0 and c["queued"] == 0
    spool.close()


def test_two_nodes_given_one_local_directory_the_second_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two nodes (two names) on one Redis spool started with the same local
    directory (``dir=``, or ``[spool] dir``; two serve units copied on one host,
    an NFS share): both appended to one ``events.jsonl``, and the rollups'
    and the webhook outbox's marks into it (``host:path``) were one key each
    wrote over the other's, so a restart counted and sent the other node's
    events again, or skipped its own. The second is refused now, as a second
    supervisor of a SQLite spool is (exit 75, naming the holder); a node with
    its own directory starts."""
    import socket

    local = tmp_path / "local"
    base = redis_server.url(lease="5")
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(1024)
    camp = write_campaign(tmp_path)
    (tmp_path / "r.csv").write_text("email,name\n" + "".join(f"u{i}@d.example,N\n" for i in range(5)))
    route = ["--route", f"*=127.0.0.1:{mute.getsockname()[1]}", "--no-progress"]
    proc = subprocess.Popen(
        fastsend_cmd("send", str(camp), "-r", str(tmp_path / "r.csv"), "--no-dkim", "--spool",
                     f"{base}&node=a&dir={local}", "--workers", "1", *route),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    spool = open_spool(base)
    try:
        deadline = time.monotonic() + 60
        while spool.counts()["inflight"] < 5:  # a is running, its mail on the mute connections
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        again = subprocess.run(
            fastsend_cmd("resume", "--spool", f"{base}&node=b&dir={local}", "--max-wait", "0",
                         *route),
            capture_output=True, text=True, env=_env(), timeout=60,
        )  # fmt: skip
        assert again.returncode == 75, again.stderr[-2000:]
        assert f"pid {proc.pid} (fastsend send" in again.stderr, again.stderr
        assert "its own" in again.stderr, again.stderr
        own = subprocess.run(
            fastsend_cmd("resume", "--spool", f"{base}&node=c&dir={tmp_path / 'c'}",
                         "--max-wait", "0", *route),
            capture_output=True, text=True, env=_env(), timeout=60,
        )  # fmt: skip
        assert own.returncode != 75, own.stderr[-2000:]
    finally:
        proc.kill()
        proc.wait(30)
        mute.close()
        spool.close()


def test_outcomes_recorded_and_never_told_are_kept_until_told(
    redis_server: RedisServer,
) -> None:
    """A Redis spool notes the ids of the outcomes it records in the same script
    call (``P:untold:NODE``) until ``told``: a process killed before its event
    log has their events leaves them to the next start under its node name
    (``untold``), or, when its window is taken back by another node, to that
    node (``untold_of_dead``); each carries its webhook event's outbox id, so
    the webhooks do not append it again. A later attempt's row is not told as
    the recorded one."""
    from fastsend.spool import BOUNCED, DEFERRED

    url = redis_server.url(lease="0.3")
    a = RedisSpool(url + "&node=a")
    cid = a.create_campaign({"from": "a@b.example"})
    now = time.time()
    a.add_messages(cid, spool_rows(8), now)
    got = a.claim_due(now, 5)
    states = [DELIVERED, DELIVERED, DEFERRED, BOUNCED, DELIVERED]
    res = [Result(c.id, st, 1, now + 60 if st == DEFERRED else 0, 250 if st == DELIVERED
                  else 451 if st == DEFERRED else 550, "", "r") for c, st in zip(got, states, strict=True)]  # fmt: skip
    first = a.record_outcomes(res, now, [b'{"n":1}', b'{"n":2}'], [got[0].id, got[3].id])
    assert first is not None
    # killed here: no told(); the next start under the name tells them
    again = RedisSpool(url + "&node=a")
    rows = {u.id: u for u in again.untold()}
    assert set(rows) == {c.id for c in got}
    assert [rows[c.id].state for c in got] == states
    assert rows[got[0].id].event_id == first and rows[got[3].id].event_id == first + 1
    assert rows[got[1].id].event_id == 0 and rows[got[3].id].code == 550
    assert rows[got[2].id].next_at == pytest.approx(now + 60)
    again.told([u.id for u in rows.values()])
    assert again.untold() == []
    # told after the log write (the normal path): nothing left
    rest = a.claim_due(now, 2)
    a.record_outcomes([Result(c.id, DELIVERED, 1, 0, 250, "", "ok") for c in rest], now)
    a.told()
    assert again.untold() == []
    # node b records and dies (its lease lapses) with one message still in flight:
    # the node whose claim takes its window back gets its untold outcomes too
    b = RedisSpool(url + "&node=b")
    mine = b.claim_due(now + 120, 2)  # the deferred one (due at now + 60) and the last
    assert len(mine) == 2
    b.record_outcomes([Result(mine[0].id, DELIVERED, 2, 0, 250, "", "ok")], now)
    assert a.untold_of_dead() == []
    dead: list[Any] = []
    deadline = time.monotonic() + 60
    while not dead:  # (a lull longer than half a lease graces a node one lease more)
        assert time.monotonic() < deadline
        time.sleep(0.1)
        a.claim_due(now + 120, 10)  # reaps b once its lease lapsed
        dead = a.untold_of_dead()
    (u,) = dead
    assert (u.id, u.state, u.attempts) == (mine[0].id, DELIVERED, 2)
    a.told([u.id])
    assert a.untold_of_dead() == [] and again.untold() == []
    for s in (a, again, b):
        s.close()


@pytest.mark.parametrize("node", ["a", "b"])
def test_outcomes_a_killed_node_recorded_get_their_events_at_the_next_start(
    redis_server: RedisServer, tmp_path: Path, node: str
) -> None:
    """kill -9 of ``send`` on a Redis spool right after a flush of outcomes is
    committed, before their events are written (FASTSEND_TEST_FAULT): a
    ``resume`` under the same node name, or under another one (which takes the
    dead node's window back), writes them (``"resumed": true``), so every
    delivered or bounced message has its one event in the log. Before: on
    Redis those outcomes had none, ever (a local spool already told them)."""
    n = 600
    addrs = [
        (f"permfail-{i}@d{i % 3}.example.net" if i % 50 == 7 else f"u{i}@d{i % 3}.example.net")
        for i in range(n)
    ]
    camp = write_campaign(tmp_path)
    (tmp_path / "r.csv").write_text("email,name\n" + "".join(f"{a},N\n" for a in addrs))
    local = tmp_path / "local"
    base = redis_server.url()
    with SinkProcess() as sink:
        host, port = sink.addresses[0]
        common = ["--route", f"*={host}:{port}", "--workers", "1", "--json", "--no-progress",
                  "--max-wait", "0"]  # fmt: skip
        env = dict(_env(), FASTSEND_TEST_FAULT="outcomes-kill-after-commit:1")
        proc = subprocess.run(
            fastsend_cmd("send", str(camp), "-r", str(tmp_path / "r.csv"), "--no-dkim",
                         "--spool", f"{base}&node=a&dir={local}", *common),
            capture_output=True, text=True, env=env, timeout=120, start_new_session=True,
        )  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        spool = open_spool(base)
        c = spool.counts()
        recorded = c["delivered"] + c["bounced"]
        assert recorded, c
        time.sleep(0.5)  # the killed send's worker gone (its ring closed)
        res = subprocess.run(
            fastsend_cmd("resume", "--spool", f"{base}&node={node}&dir={local}", *common),
            capture_output=True, text=True, env=_env(), timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    events = [orjson.loads(x) for x in (local / "events.jsonl").read_bytes().splitlines()]
    final: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] in ("delivered", "bounced"):
            final.setdefault(e["id"], []).append(e)
    assert len(final) == n and all(len(es) == 1 for es in final.values()), (
        len(final), [es for es in final.values() if len(es) > 1][:2])  # fmt: skip
    retold = [es[0] for es in final.values() if es[0].get("resumed")]
    assert len(retold) == recorded, (len(retold), recorded)
    for e in retold:
        assert e["rcpt"] == addrs[e["id"] - 1] and e["attempt"] == 1, e
        if e["event"] == "bounced":
            assert e["code"] == 550 and e["enhanced"] == "5.1.1" and e["hard"], e
    assert spool.counts()["delivered"] + spool.counts()["bounced"] == n
    spool.close()
    said = "the last run, which stopped" if node == "a" else "a node that stopped"
    assert f"recorded by {said} before writing them" in res.stderr, res.stderr[-2000:]


def test_send_and_resume_hold_their_source_ips_as_serve_does(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """``send`` and ``resume`` on a Redis spool held no source IP in the
    cluster's registry (only ``serve`` did): one started with an IP a live
    serve node sends from sent from it too (each node keeping that address's
    per-site rates and warm-up cap: twice the limit). Now they claim theirs
    (exit 75 naming the node holding one), renew them while they run and give
    them back at the end; a ``resume`` after a kill -9 of ``send`` on this host
    (each under its own default node name) is not kept waiting for the dead
    one's lease."""
    import socket

    from fastsend.cluster import ClusterNode

    base = redis_server.url()
    spool = open_spool(base)
    shared = spool.shared()
    assert shared is not None
    live = ClusterNode(shared.client, shared.prefix, "serve-x", lease=30)
    live.claim_ips(["127.0.0.2"])
    camp = write_campaign(tmp_path)
    (tmp_path / "r.csv").write_text("email,name\n" + "".join(f"u{i}@d.example,N\n" for i in range(5)))
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(1024)
    route = ["--route", f"*=127.0.0.1:{mute.getsockname()[1]}", "--no-progress", "--no-dkim",
             "--workers", "1"]  # fmt: skip
    send = fastsend_cmd("send", str(camp), "-r", str(tmp_path / "r.csv"), "--spool",
                        f"{base}&dir={tmp_path / 'a'}", *route)  # fmt: skip
    try:
        r = subprocess.run([*send, "--source-ip", "127.0.0.2"], capture_output=True, text=True,
                           env=_env(), timeout=60)  # fmt: skip
        assert r.returncode == 75, r.stderr[-2000:]
        assert "127.0.0.2 (node serve-x)" in r.stderr, r.stderr
        assert spool.counts() == spool.counts() and not any(spool.counts().values())
        proc = subprocess.Popen([*send, "--source-ip", "127.0.0.3"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
        deadline = time.monotonic() + 60
        while spool.counts()["inflight"] < 5:  # sending from .3, held on the mute connections
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        holders = live.holders()
        assert holders["127.0.0.2"] == "serve-x" and holders["127.0.0.3"] != "serve-x"
        with pytest.raises(ClusterError, match=r"127\.0\.0\.3"):
            ClusterNode(shared.client, shared.prefix, "serve-y", lease=30).claim_ips(["127.0.0.3"])
        proc.kill()
        proc.wait(30)
        # resume under a new default name: the dead send's IP is not waited for
        with SinkProcess() as sink:
            host, port = sink.addresses[0]
            res = subprocess.run(
                fastsend_cmd("resume", "--spool", f"{base}&dir={tmp_path / 'a'}", "--source-ip",
                             "127.0.0.3", "--route", f"*={host}:{port}", "--no-progress",
                             "--json"),
                capture_output=True, text=True, env=_env(), timeout=60,
            )  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        assert summary(res)["delivered"] == 5
        assert "127.0.0.3" not in live.holders()  # given back at its end
    finally:
        mute.close()
        spool.close()


class _Forwarder:
    """A TCP forwarder on loopback standing for the one address a failover moves
    (a virtual IP, HAProxy, a DNS name): new connections go to ``target``;
    those already made stay where they went."""

    def __init__(self, target: int) -> None:
        import socket

        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: Any, b: Any) -> None:
        import socket

        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                with __import__("contextlib").suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)


def test_a_failover_behind_the_spools_address_ends_the_outage(tmp_path: Path) -> None:
    """Redis fails over behind the one address the nodes use (Sentinel moving a
    virtual IP, HAProxy checking for the primary): the old primary, demoted,
    answers READONLY on the connections the node already had, and the node
    rode out an outage that never ended (each probe on the same connection,
    to the demoted server). Now a READONLY answer closes its connection: the
    next call reaches the new primary through the address, and the spool
    works on, its data there."""
    import redis

    quick = ("--repl-diskless-sync-delay", "0")  # (a replica's first sync at once, not in 5 s)
    with start_redis(*quick) as a, start_redis(*quick) as b:
        fwd = _Forwarder(a.port)
        url = f"redis://127.0.0.1:{fwd.port}/0?prefix=fo&node=n1&dir={tmp_path}"
        s = RedisSpool(url)
        cid = s.create_campaign({"from": "a@b.example"})
        s.add_messages(cid, spool_rows(5), time.time())
        ra, rb = redis.Redis(port=a.port), redis.Redis(port=b.port)
        rb.replicaof("127.0.0.1", a.port)  # b follows a, then takes over
        deadline = time.monotonic() + 60
        while rb.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while rb.dbsize() < ra.dbsize():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rb.replicaof("NO", "ONE")
        fwd.target = b.port
        ra.replicaof("127.0.0.1", b.port)
        errors = []
        for _ in range(5):
            try:
                s.probe()
                break
            except s.outage_errors() as e:
                errors.append(type(e).__name__)
        else:
            raise AssertionError(f"the outage did not end: {errors}")
        assert errors in ([], ["ReadOnlyError"]), errors
        assert len(s.claim_due(time.time(), 10)) == 5  # the queue, on the new primary
        assert rb.info("replication")["role"] == "master"
        s.close()
        fwd.sock.close()
