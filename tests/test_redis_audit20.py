"""Session 20's audit of the Redis spool from an operator's side: what a command
says and exits with when its Redis cannot serve it (a replica, an old server, a
mistyped prefix, a server out of reach), and the client's socket limits.

Real parts: redis-server on loopback, the ``fastsend`` binary; an "old Redis" is
a loopback server speaking RESP that reports version 6.0 (no older redis-server
is installed), as such a server answers the spool's first commands.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from tests._engine_helpers import _env, fastsend_cmd
from tests._redis_helpers import RedisServer, start_redis

from fastsend.spool import DEFERRED, Result, SpoolError, open_spool
from fastsend.spool.redis import RedisSpool

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi", "text": "Hi\n"}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with start_redis() as s:
        yield s


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fastsend_cmd(*args), capture_output=True, text=True, env=_env(),
                          timeout=60)  # fmt: skip


def test_a_replica_is_a_temporary_failure_and_serves_the_views(tmp_path: Path) -> None:
    """A Redis that turned replica (a failover under way, or the URL names one):
    a command that writes exits 75 (EX_TEMPFAIL: a job runner tries again), not
    2 as for a wrong URL; the views (``queue``, ``campaign list``) open without
    a write and answer from the replica. Before: exit 2, and the views failed
    with READONLY at the open (it wrote the layout and epoch keys)."""
    with start_redis() as srv:
        url = srv.url(dir=str(tmp_path / "d"))
        s = RedisSpool(url)
        cid = s.create_campaign({"from": "a@b.example"}, name="spring")
        s.close()
        redis_py.Redis(port=srv.port).execute_command("REPLICAOF", "127.0.0.1", "1")
        for cmd in (("resume", "--spool", url, "--no-progress"),
                    ("campaign", "pause", str(cid), "--spool", url)):  # fmt: skip
            r = _run(*cmd)
            assert r.returncode == 75, (cmd, r.stderr)
            assert "takes no writes now" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = _run("campaign", "list", "--spool", url, "--json")
        assert r.returncode == 0, r.stderr
        assert '"spring"' in r.stdout, r.stdout


def test_a_mistyped_prefix_is_no_spool_not_an_empty_one(server: RedisServer, tmp_path: Path) -> None:
    """``tls-report show``, ``resume``, ``queue`` given a Redis URL under which no
    spool exists (a mistyped prefix or database, a Redis back without its data)
    say so and exit 2, as for a SQLite directory with no spool, and leave no key
    behind. Before: each made an empty spool there, ``tls-report show`` printed
    ``[]`` and exit 0, ``resume`` reported nothing to do."""
    url = server.url(dir=str(tmp_path / "d"))
    prefix = url.partition("prefix=")[2].partition("&")[0]
    for cmd in (("tls-report", "show", "--spool", url), ("resume", "--spool", url, "--no-progress"),
                ("queue", "--spool", url)):  # fmt: skip
        r = _run(*cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert f"no spool under prefix {prefix!r}" in r.stderr, r.stderr
    assert redis_py.Redis(port=server.port).keys(f"{{{prefix}}}*") == []
    with pytest.raises(SpoolError, match="no spool under prefix"):
        open_spool(url, must_exist=True)
    open_spool(url).close()  # (made by a writer, it exists from then on)
    open_spool(url, must_exist=True).close()
    r = _run("tls-report", "show", "--spool", url)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_tls_report_with_redis_out_of_reach_exits_75(tmp_path: Path) -> None:
    """``tls-report`` on a Redis spool out of reach: one line, exit 75 (try again
    later) as every other command; it was 2, the status of a bad argument."""
    from conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0?prefix=x&dir={tmp_path}"
    for action in ("show", "send"):
        r = _run("tls-report", action, "--spool", url)
        assert r.returncode == 75, r.stderr
        assert "cannot reach Redis" in r.stderr and "Traceback" not in r.stderr, r.stderr


class _OldRedis:
    """A loopback server answering RESP as a Redis 6.0 would the commands a
    client sends first: PING, INFO (redis_version:6.0.16), the rest an error."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.commands: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while line := f.readline():
                n = int(line[1:])
                args = []
                for _ in range(n):
                    size = int(f.readline()[1:])
                    args.append(f.read(size + 2)[:-2].decode())
                cmd = args[0].upper()
                self.commands.append(cmd)
                if cmd == "PING":
                    conn.sendall(b"+PONG\r\n")
                elif cmd == "INFO":
                    body = b"# Server\r\nredis_version:6.0.16\r\nredis_mode:standalone\r\n"
                    conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                else:
                    conn.sendall(b"-ERR unknown command '%s'\r\n" % cmd.encode())
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_redis_older_than_6_2_is_refused_at_start(tmp_path: Path) -> None:
    """The spool needs Redis >= 6.2 (SMISMEMBER, a campaign's duplicate
    addresses): an older server is refused at the open, naming its version and
    the minimum, exit 2, before anything is written. Before: the node started,
    and the first upload to a campaign failed with "unknown command"."""
    old = _OldRedis()
    try:
        url = f"redis://127.0.0.1:{old.port}/0?prefix=x&dir={tmp_path}"
        with pytest.raises(SpoolError, match=r"version 6\.0\.16: the spool needs Redis >= 6\.2"):
            RedisSpool(url)
        r = _run("resume", "--spool", url, "--no-progress")
        assert r.returncode == 2, r.stderr
        assert "needs Redis >= 6.2" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not {"SET", "EVALSHA", "EVAL", "SCRIPT"} & set(old.commands), old.commands
    finally:
        old.close()


def test_a_paused_redis_is_an_outage_after_the_socket_timeout(tmp_path: Path) -> None:
    """A Redis that stops answering (SIGSTOP here; a host gone with its
    connections, a partition dropping packets) is an outage error after the
    client's socket timeout (5 s unless the URL sets ``socket_timeout``), which
    the node rides out; redis-py before 6 waits for ever by default, and the
    node stayed stuck in one read for good. The URL's own value wins."""
    with start_redis() as srv:
        s = RedisSpool(srv.url(dir=str(tmp_path / "a")))
        kw = s.r.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == 5.0 and kw["socket_keepalive"] is True
        t = RedisSpool(srv.url(dir=str(tmp_path / "b"), socket_timeout="1"))
        assert float(t.r.connection_pool.connection_kwargs["socket_timeout"]) == 1.0
        cid = t.create_campaign({"from": "a@b.example"})
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            got: list[BaseException] = []

            def look() -> None:
                try:
                    t.counts(cid)
                except BaseException as e:  # (what the thread met)
                    got.append(e)

            th = threading.Thread(target=look, daemon=True)
            th.start()
            th.join(60)  # (1 s timeout; generous for a loaded machine)
            assert not th.is_alive(), "a read of a paused Redis never ended"
            assert got and isinstance(got[0], t.outage_errors()), got
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        s.close()
        t.close()


def _calls(r: Any, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_claim_reads_only_the_campaigns_with_mail_due(tmp_path: Path) -> None:
    """The claim takes the campaigns with mail due from an index (P:dueidx), not
    by counting every active campaign's due set: 300 active campaigns whose
    mail is due in an hour and 2 with mail due cost a few reads, not 300 counts
    (2,000 such campaigns cost ~35 us per message claimed, and an idle claim
    ~0.5 s a second of Redis). What comes due later (a retry, a resumed
    campaign) is claimed then."""
    with start_redis() as srv:
        r = redis_py.Redis(port=srv.port)
        s = RedisSpool(srv.url(node="n1", dir=str(tmp_path)))
        now = time.time()
        later = [s.create_campaign(SPEC, tenant=f"t{i}") for i in range(300)]
        for cid in later:
            s.add_messages(cid, [(f"u@d{cid}.example", f"d{cid}.example", b"{}")], now + 3600)
        due = [s.create_campaign(SPEC, tenant=f"d{i}") for i in range(2)]
        ids = [s.add_messages(cid, [(f"{j}@x.example", "x.example", b"{}") for j in range(3)],
                              now - 1) for cid in due]  # fmt: skip
        before = sum(_calls(r, c) for c in ("zcount", "zrangebyscore", "zrange"))
        got = s.claim_due(now, 100)
        spent = sum(_calls(r, c) for c in ("zcount", "zrangebyscore", "zrange")) - before
        assert sorted(c.id for c in got) == sorted(ids[0] + ids[1])
        assert spent <= 8, spent  # (the index, each due campaign's set and its next head)
        before = sum(_calls(r, c) for c in ("zcount", "zrangebyscore", "zrange"))
        assert s.claim_due(now, 100) == []
        assert sum(_calls(r, c) for c in ("zcount", "zrangebyscore", "zrange")) - before <= 3
        # a retry comes due, a paused campaign's mail waits until it is resumed
        s.record_results([Result(got[0].id, DEFERRED, 1, now + 5, 451, "4.7.1", "later")], now)
        s.set_campaign_status(due[1], "paused")
        s.add_messages(due[1], [("late@x.example", "x.example", b"{}")], now - 1)
        assert s.claim_due(now + 4, 100) == []
        assert [c.id for c in s.claim_due(now + 6, 100)] == [got[0].id]
        s.set_campaign_status(due[1], "active")
        assert [c.campaign for c in s.claim_due(now + 6, 100)] == [due[1]]
        assert s.next_due() == pytest.approx(now + 3600, abs=1)
        s.close()


def test_mail_the_index_misses_is_claimed_after_a_sweep(tmp_path: Path) -> None:
    """A spool made before the index (a fastsend of session 19), or mail a node
    of that fastsend spools during a rolling upgrade (its scripts do not keep
    the index): the open of a spool never swept makes the index whole, and
    every node's renew() sweeps every 30 s (lib.lua sweep_index), so such mail
    waits at most that long; it was never claimed."""
    with start_redis() as srv:
        r = redis_py.Redis(port=srv.port)
        url = srv.url(node="n1", dir=str(tmp_path))
        k = "{" + url.partition("prefix=")[2].partition("&")[0] + "}"
        s = RedisSpool(url)
        now = time.time()
        a, b = s.create_campaign(SPEC, tenant="a"), s.create_campaign(SPEC, tenant="b")
        ids_a = s.add_messages(a, [("x@a.example", "a.example", b"{}")], now - 1)
        s.close()
        r.delete(f"{k}:dueidx", f"{k}:dueidx:swept")  # (as a spool of before the index)
        s = RedisSpool(url)
        assert [c.id for c in s.claim_due(now, 10)] == ids_a
        ids_b = s.add_messages(b, [("y@b.example", "b.example", b"{}")], now - 1)
        r.zrem(f"{k}:dueidx", str(b))  # (as an older node's spooling leaves it)
        assert s.claim_due(now, 10) == []
        r.delete(f"{k}:dueidx:swept")  # (30 s on)
        s._swept = 0.0
        s.renew()
        assert [c.id for c in s.claim_due(now, 10)] == ids_b
        s.close()


def test_a_nodes_local_tls_rpt_counts_are_carried_into_redis_once(
    server: RedisServer, tmp_path: Path
) -> None:
    """A node of before the TLS-RPT counts went to Redis kept them in its own
    ``tlsrpt.db``; after the upgrade the report came from Redis alone and left
    them out (40 sessions and 2 failures of the day reported as 0). The first
    open of the store carries the days not reported from that node into Redis,
    once (a second node or start adds nothing twice); a day that node already
    reported stays reported (not carried)."""
    from fastsend.analytics.tlsrpt import DB_NAME, RedisStore, Store, day_of, open_store
    from fastsend.config import Config

    d = tmp_path / "node"
    d.mkdir()
    t = time.time() - 86400
    day = day_of(t)
    sts = {"policy_type": "sts", "policy_domain": "a.test", "mx_host": ["mx.a.test"],
           "policy": ["version: STSv1", "mode: enforce", "mx: mx.a.test", "max_age: 86400"]}
    fail = {"event": "tls_report", "time": t, "result": "certificate-expired",
            "source_ip": "192.0.2.1", "mx": "mx.a.test", "receiving_ip": "198.51.100.7",
            "text": "certificate has expired", **sts}  # fmt: skip
    local = Store(str(d))
    local.listener([{"event": "tls_sessions", "time": t, "count": 40, **sts}, fail, fail,
                    {"event": "tls_sessions", "time": t, "count": 9,
                     **{**sts, "policy_domain": "done.test"}}])  # fmt: skip
    local.mark_sent(day, "done.test", "https://r.done.test")
    want = local.report(day, "a.test", organization="O", contact="c", report_id="r")
    local.close()
    cfg = Config()
    cfg.spool_dir = str(d)
    url = server.url(node="n1", dir=str(d))
    sp = open_spool(url)
    store = open_store(cfg, sp)
    assert isinstance(store, RedisStore)
    store.listener([{"event": "tls_sessions", "time": t, "count": 2, **sts}])  # (after it)
    assert store.domains(day) == ["a.test"]
    got = store.report(day, "a.test", organization="O", contact="c", report_id="r")
    want["policies"][0]["summary"]["total-successful-session-count"] += 2
    assert got == want
    assert not (d / DB_NAME).exists() and (d / (DB_NAME + ".carried")).exists()
    (d / (DB_NAME + ".carried")).rename(d / DB_NAME)  # (as if the rename was lost)
    open_store(cfg, sp)
    assert store.report(day, "a.test", organization="O", contact="c", report_id="r") == got
    sp.close()


def test_a_campaigns_duplicate_set_lives_as_long_as_its_rows(server: RedisServer,
                                                             tmp_path: Path) -> None:
    """A campaign's set of its addresses (P:fp:CID: the duplicates of later
    chunks) lived a fixed 30 days from its last chunk: a campaign taking a
    chunk after a month spooled its old addresses again, while SQLite (which
    reads its rows) refused them as long as the rows are kept. It now lives
    as long as the campaign's rows: no expiry, deleted when retention prunes
    the campaign's last row."""
    from fastsend.spool import DELIVERED

    url = server.url(node="n1", dir=str(tmp_path))
    k = "{" + url.partition("prefix=")[2].partition("&")[0] + "}"
    r = redis_py.Redis(port=server.port)
    s = RedisSpool(url)
    now = time.time()
    a, b = s.create_campaign(SPEC), s.create_campaign(SPEC)
    fps = [11, 12, 13]
    for cid in (a, b):
        s.add_messages(cid, [(f"{i}@x.example", "x.example", b"{}") for i in range(3)],
                       now - 10, fps=fps)  # fmt: skip
    assert r.ttl(f"{k}:fp:{a}") == -1  # (no expiry while the campaign has rows)
    got = s.claim_due(now, 10)
    done = [c for c in got if c.campaign == a] + [c for c in got if c.campaign == b][:2]
    s.record_results([Result(c.id, DELIVERED, 1, 0.0, 250, "2.0.0", "ok") for c in done],
                     now - 5)  # fmt: skip
    while s.prune_final(now, 2000)[1]:
        pass
    assert not r.exists(f"{k}:fp:{a}")  # every row of a pruned: its set with them
    assert s.recorded_fps(b, fps) == [True, True, True]  # b keeps a row in flight
    assert s.recorded_fps(a, fps) == [False, False, False]
    s.close()


def test_an_acl_user_without_dangerous_commands_spools_and_serves(tmp_path: Path) -> None:
    """A Redis ACL user kept from @dangerous (INFO, CONFIG: a usual hardening)
    on the spool's keys only (``~{prefix}:*``): the spool takes, claims and
    records mail, and serve's durability check says it cannot read the
    persistence instead of failing. Before: every add_messages failed after
    its write (INFO persistence refused: nothing accepted, each row left
    spooled behind an error), and serve did not start (a traceback)."""
    from fastsend.cluster import check_durability, read_durability

    with start_redis("--appendonly", "yes") as srv:
        admin = redis_py.Redis(port=srv.port)
        admin.execute_command("ACL", "SETUSER", "fs", "on", ">pw", "~{fs}:*", "+@all", "-@dangerous")
        url = f"redis://fs:pw@127.0.0.1:{srv.port}/0?prefix=fs&node=n1&dir={tmp_path}"
        s = RedisSpool(url)
        cid = s.create_campaign(SPEC)
        ids = s.add_messages(cid, [("x@y.example", "y.example", b"{}")], time.time() - 1, fps=[7])
        assert [c.id for c in s.claim_due(time.time(), 10)] == ids
        assert s.durability.startswith("unknown")
        d = read_durability(s.r)
        assert d.level == "unknown" and "appendonly yes" in d.survives
        check_durability(d, allow_volatile=False)  # (not refused: it may well be on)
        s.close()


def test_a_spool_on_a_unix_socket(tmp_path: Path) -> None:
    """``unix:///path/redis.sock?prefix=...`` (documented beside redis:// and
    rediss://): the URL lost its "//" when our parameters were taken out
    (``unix:/path``, which redis-py refuses), so no unix-socket spool opened."""
    from tests.conftest import require_program

    sock = tmp_path / "r.sock"
    proc = subprocess.Popen(
        [require_program("redis-server"), "--port", "0", "--unixsocket", str(sock), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"unix://{sock}?prefix=u&node=n1&dir={tmp_path / 'd'}"
        s = open_spool(url)
        cid = s.create_campaign(SPEC)
        ids = s.add_messages(cid, [("x@y.example", "y.example", b"{}")], time.time() - 1)
        assert [c.id for c in s.claim_due(time.time(), 10)] == ids
        s.close()
        r = _run("campaign", "list", "--spool", url, "--json")
        assert r.returncode == 0 and '"id":1' in r.stdout, r.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_send_and_resume_say_when_redis_keeps_the_spool_in_memory_only(
    server: RedisServer, tmp_path: Path
) -> None:
    """``serve`` refuses a Redis with appendonly no (without --allow-volatile);
    ``send`` and ``resume`` spooled into one without a word, and a Redis
    restart lost the list. They now say so at start (and go on: a test bed)."""
    url = server.url(node="n1", dir=str(tmp_path / "a"))
    RedisSpool(url).close()
    r = _run("resume", "--spool", url, "--no-progress", "--max-wait", "0")
    assert r.returncode == 0, r.stderr
    assert "a Redis restart loses the spool; set appendonly yes" in r.stderr, r.stderr
    with start_redis("--appendonly", "yes") as durable:
        url = durable.url(node="n1", dir=str(tmp_path / "b"))
        RedisSpool(url).close()
        r = _run("resume", "--spool", url, "--no-progress", "--max-wait", "0")
        assert r.returncode == 0, r.stderr
        assert "restart loses the spool" not in r.stderr, r.stderr


def test_a_claim_over_many_campaigns_moves_their_counts_in_one_hash(tmp_path: Path) -> None:
    """A claim over 200 campaigns made 400 HINCRBYs (each campaign's queued and
    in-flight counter): its moves now go into one hash (P:nd, a HMGET and a
    HSET per 500 fields), and each campaign's counts are still exact."""
    with start_redis() as srv:
        r = redis_py.Redis(port=srv.port)
        s = RedisSpool(srv.url(node="n1", dir=str(tmp_path)))
        now = time.time()
        camps = [s.create_campaign(SPEC, tenant=f"t{i}") for i in range(200)]
        for cid in camps:
            s.add_messages(cid, [(f"a@d{cid}.example", f"d{cid}.example", b"{}"),
                                 (f"b@d{cid}.example", f"d{cid}.example", b"{}")], now - 1)  # fmt: skip
        before = _calls(r, "hincrby")
        got = s.claim_due(now, 200)
        assert len(got) == 200 and len({c.campaign for c in got}) == 200
        assert _calls(r, "hincrby") - before <= 4  # (the totals, P:n, per state)
        per = s.counts_by_campaign(camps)
        assert all(c["queued"] == 1 and c["inflight"] == 1 for c in per.values()), per
        s.record_results([Result(c.id, DEFERRED, 1, now + 60, 451, "4.7.1", "later")
                          for c in got[:50]], now)  # fmt: skip
        c0 = s.counts(got[0].campaign)
        assert (c0["queued"], c0["inflight"], c0["deferred"]) == (1, 0, 1), c0
        assert s.counts()["inflight"] == 150 and s.counts()["deferred"] == 50
        s.close()
