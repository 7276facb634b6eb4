"""Session 21's audit of the Redis spool: TLS settings that can never work
(exit 2, not the 75 of a Redis down for now), the due index's sweep in bounded
steps, the claim's round trips over many small campaigns, and the duplicate
sets of campaigns whose rows another node pruned.

Real parts: redis-server on loopback (with its TLS port and a throwaway CA from
trustme for the ``rediss://`` cases), the ``fastsend`` binary.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
import trustme
from tests._engine_helpers import _env, fastsend_cmd
from tests._redis_helpers import RedisServer, start_redis
from tests.conftest import free_port, wait_port

from fastsend.spool import DEFERRED, Result, SpoolError
from fastsend.spool.redis import SWEEP_STEP, RedisSpool, RedisUnreachable

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi", "text": "Hi\n"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fastsend_cmd(*args), capture_output=True, text=True, env=_env(),
                          timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server with a TLS port whose certificate names only
    ``redis.example.net`` (127.0.0.1 is a host it does not name), from a CA in
    ``ca.pem``; ``other.pem`` is a CA that signed nothing here."""
    d = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("redis.example.net")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other.pem"))
    tport = free_port()
    with start_redis("--tls-port", str(tport), "--tls-cert-file", str(d / "cert.pem"),
                     "--tls-key-file", str(d / "key.pem"), "--tls-ca-cert-file", str(d / "ca.pem"),
                     "--tls-auth-clients", "no") as srv:  # fmt: skip
        wait_port("127.0.0.1", tport)
        yield srv, tport, d


def test_tls_settings_that_cannot_work_exit_2_naming_the_fault(
    tls_redis: tuple[RedisServer, int, Path], tmp_path: Path
) -> None:
    """A ``rediss://`` URL whose certificate check can never pass (a CA that
    did not sign the server's certificate, a host the certificate does not
    name, a CA file that is not there) exited 75 "cannot reach Redis": a job
    runner (systemd Restart=, cron with retries) tried again for ever a
    setting only the operator can mend. Now 2 with what is wrong; a server
    that is down stays 75, and the right settings (the CA, certificate checks
    on: the host check is turned off only by the URL) open the spool."""
    _srv, tport, d = tls_redis
    base = f"rediss://127.0.0.1:{tport}/0?dir={tmp_path}&node=n1&prefix=tls21"
    cases = {
        "another CA": (f"{base}&ssl_ca_certs={d / 'other.pem'}", "certificate is refused"),
        "host not named": (f"{base}&ssl_ca_certs={d / 'ca.pem'}", "certificate is refused"),
        "no CA file": (f"{base}&ssl_ca_certs={d / 'gone.pem'}", "ssl_ca_certs"),
    }
    for what, (url, says) in cases.items():
        with pytest.raises(SpoolError) as e:
            RedisSpool(url)
        assert e.value.exit_status == 2, (what, e.value)
        assert says in str(e.value), (what, e.value)
    got = _run("queue", "--spool", cases["another CA"][0])
    assert got.returncode == 2, got.stderr
    assert "certificate is refused" in got.stderr and "Traceback" not in got.stderr
    # the CA that signed it, the host check off by the URL: a working spool
    ok = RedisSpool(f"{base}&ssl_ca_certs={d / 'ca.pem'}&ssl_check_hostname=false")
    assert ok.create_campaign(SPEC) > 0
    ok.close()
    # a TLS port with nothing listening: down for now, 75 as before
    with pytest.raises(RedisUnreachable) as down:
        RedisSpool(f"rediss://127.0.0.1:{free_port()}/0?ssl_ca_certs={d / 'ca.pem'}&dir={tmp_path}")
    assert down.value.exit_status == 75


def _calls(r: Any, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_the_due_index_sweep_goes_in_bounded_steps_and_completes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The 30 s sweep that makes the index of campaigns with mail due whole
    (P:dueidx: mail a node of an older fastsend spooled, an index lost) was one
    script over every active campaign: 100,000 of them held Redis, every node's
    claims and accepts, about a second. It now goes in steps of about
    SWEEP_STEP campaigns from a cursor in Redis (SSCAN), one step per renew()
    while a sweep is under way, and completes: 3,000 active campaigns missing
    from the index are back in it after a few steps, none of them looked at by
    one step more than a bounded number of times, and the mail the index had
    lost is claimed."""
    url = redis_server.url(node="n1", dir=str(tmp_path))
    k = "{" + url.partition("prefix=")[2].partition("&")[0] + "}"
    r = redis_py.Redis(port=redis_server.port)
    s = RedisSpool(url)
    now = time.time()
    a = s.create_campaign(SPEC, tenant="a")
    ids = s.add_messages(a, [("x@a.example", "a.example", b"{}")], now - 1)
    pipe = r.pipeline(transaction=False)  # (3,000 active campaigns with mail due in an hour)
    for cid in range(100_000, 103_000):
        pipe.sadd(f"{k}:active", cid)
        pipe.zadd(f"{k}:due:{cid}", {"1": now + 3600})
    pipe.execute()
    r.delete(f"{k}:dueidx", f"{k}:dueidx:swept")  # (the index lost, 30 s on)
    s._swept = 0.0
    steps, seen = 0, []
    while steps == 0 or s._sweeping:  # (a step while the cursor is not back at 0)
        before = _calls(r, "zrange")
        s.renew()
        steps += 1
        assert _calls(r, "zrange") - before <= 2 * SWEEP_STEP  # (SSCAN's COUNT is a hint)
        seen.append(r.zcard(f"{k}:dueidx"))
        assert steps <= 20, seen
    assert seen[-1] == 3001 and seen[0] < 3001, seen  # (one script did all before)
    assert not r.exists(f"{k}:dueidx:cursor") and r.pttl(f"{k}:dueidx:swept") > 0
    s.renew()  # the sweep is over: nothing until SWEEP_MS on
    assert [c.id for c in s.claim_due(now, 10)] == ids
    s.close()


def _all_calls(r: Any) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in r.info("commandstats").items()}


def test_a_claim_over_many_small_campaigns_costs_two_calls_each(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A provider's spool: thousands of campaigns of a message or two
    (transactional mail). A claim took ~4 Redis calls inside its script per
    campaign given mail (read its due mail, remove it, read its next head,
    re-score or drop it in the index): 300 campaigns of one message due, 120 of
    them with a second one due in an hour, cost 1,230 calls. The head past the
    due mail now comes with the read (WITHSCORES, past `now`), and the index's
    new scores go in one ZADD and one ZREM: ~2 calls a campaign. The index
    stays right: a campaign with later mail at its later head, the others out
    of it, and the later mail is claimed when it comes due."""
    url = redis_server.url(node="n1", dir=str(tmp_path))
    k = "{" + url.partition("prefix=")[2].partition("&")[0] + "}"
    r = redis_py.Redis(port=redis_server.port)
    s = RedisSpool(url)
    now = time.time()
    cids = [s.create_campaign(SPEC, tenant=f"t{i % 100}") for i in range(300)]
    later: dict[int, list[int]] = {}
    for i, cid in enumerate(cids):
        s.add_messages(cid, [(f"u{i}@d.example", "d.example", b"{}")], now - 1)
        if i % 5 < 2:
            later[cid] = s.add_messages(cid, [(f"v{i}@d.example", "d.example", b"{}")], now + 3600)
    assert s.claim_due(now - 60, 1000) == []  # (a process's first claim: once-only work)
    before = _all_calls(r)
    got = s.claim_due(now, 1000)
    after = _all_calls(r)
    spent = sum(n - before.get(c, 0) for c, n in after.items() if c != "cmdstat_info")
    assert sorted(c.campaign for c in got) == sorted(cids)
    assert spent <= 2.2 * len(cids), spent
    idx = {int(m): sc for m, sc in r.zrange(f"{k}:dueidx", 0, -1, withscores=True)}
    assert set(idx) == set(later)
    assert all(abs(sc - (now + 3600)) < 1 for sc in idx.values())
    assert s.claim_due(now + 1, 1000) == []
    assert sorted(c.id for c in s.claim_due(now + 3601, 1000)) == sorted(
        i for ids in later.values() for i in ids
    )
    assert r.zcard(f"{k}:dueidx") == 0
    s.close()


def test_a_url_of_another_scheme_is_refused_not_made_a_directory(tmp_path: Path) -> None:
    """``--spool redis+sentinel://...`` (or ``valkey://``, ``sentinel://``) was
    taken for a directory path: ``fastsend send`` made a SQLite spool under
    ``./redis+sentinel:/HOST:26379/...`` and sent from it, exit 0: each node
    on a queue of its own while the operator believed them on one. Now exit 2
    naming the schemes a spool has and how Sentinel is used (an address that
    follows the primary), the password not shown, nothing made; ``REDIS://``
    is a Redis URL as redis-py reads it."""
    from tests._engine_helpers import write_campaign, write_recipients

    from fastsend.redisurl import is_redis_url

    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    work = tmp_path / "work"
    work.mkdir()
    for url in ("redis+sentinel://:s3cret@127.0.0.1:26379/mymaster?prefix=fs",
                "valkey://127.0.0.1:6379/0"):  # fmt: skip
        got = subprocess.run(
            fastsend_cmd("send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", url,
                         "--route", "example.net=127.0.0.1:9", "--max-wait", "1"),
            capture_output=True, text=True, env=_env(), timeout=60, cwd=work,
        )  # fmt: skip
        assert got.returncode == 2, got.stderr
        assert "has no spool of scheme" in got.stderr and "s3cret" not in got.stderr
        assert list(work.iterdir()) == []
    got = _run("queue", "--spool", "sentinel://127.0.0.1:26379/m")
    assert got.returncode == 2 and "has no spool of scheme 'sentinel'" in got.stderr
    assert is_redis_url("REDIS://127.0.0.1:6379/0") and not is_redis_url("./redis-spool")


def test_a_redis_cluster_node_is_refused_clearly(tmp_path: Path) -> None:
    """Redis Cluster is not supported (the spool runs on one primary; a client
    that does not follow MOVED meets the spool's keys on another node): a URL
    naming a cluster node is refused at the open, exit 2, saying so and what
    to use instead. Before, it depended on where the prefix's slot sat: on
    that node it ran until a reshard or failover moved it, on another node
    the command ended in a MovedError traceback."""
    with start_redis("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf") as srv:
        r = redis_py.Redis(port=srv.port)
        r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # (one node, every slot)
        with pytest.raises(SpoolError) as e:
            RedisSpool(srv.url(node="n1", dir=str(tmp_path)))
        assert e.value.exit_status == 2 and "Redis Cluster" in str(e.value)
        got = _run("campaign", "list", "--spool", srv.url(node="n1", dir=str(tmp_path)))
        assert got.returncode == 2 and "Redis Cluster" in got.stderr, got.stderr


def test_a_redis_that_evicts_keys_at_maxmemory_is_refused_unless_allowed(
    tmp_path: Path,
) -> None:
    """A Redis with a maxmemory and an eviction policy (allkeys-lru: a Redis shared
    with a cache, a managed Redis's default volatile-lru) deletes keys to stay
    under it: 1,000 accepted messages and another client's 20 values of 200 KB
    made 0 of 1,000 claimable, no bounce, no event, serve started without a
    word. The durability read names the policy, serve refuses it (exit 2, what
    to set) unless --allow-volatile, send/resume warn; noeviction (writes
    refused at maxmemory: 507, nothing lost) passes."""
    from fastsend.cluster import ClusterError, check_durability, read_durability

    with start_redis("--appendonly", "yes", "--maxmemory", "64mb",
                     "--maxmemory-policy", "allkeys-lru") as srv:  # fmt: skip
        r = redis_py.Redis(port=srv.port)
        d = read_durability(r)
        assert d.evicts == "allkeys-lru" and d.level in ("power-loss", "redis-crash")
        with pytest.raises(ClusterError, match=r"maxmemory-policy allkeys-lru.*noeviction"):
            check_durability(d, allow_volatile=False)
        check_durability(d, allow_volatile=True)
        r.config_set("maxmemory-policy", "volatile-lru")  # (evicts the leases: duplicates)
        assert read_durability(r).evicts == "volatile-lru"
        r.config_set("maxmemory-policy", "noeviction")
        assert read_durability(r).evicts == ""
        r.config_set("maxmemory-policy", "allkeys-lfu")
        r.config_set("maxmemory", 0)  # (no limit: nothing is ever evicted)
        assert read_durability(r).evicts == ""
        r.config_set("maxmemory", 64 << 20)
        camp = tmp_path / "c.toml"
        camp.write_text('from = "News <news@sender.example.com>"\nsubject = "Hi"\ntext = "Hi"\n')
        rcpts = tmp_path / "r.csv"
        rcpts.write_text("email\na@example.net\n")
        got = _run("send", str(camp), "-r", str(rcpts), "--no-dkim", "--max-wait", "1",
                   "--spool", srv.url(node="n1", dir=str(tmp_path / "d")),
                   "--route", "example.net=127.0.0.1:9")  # fmt: skip
        assert "maxmemory-policy allkeys-lfu" in got.stderr, got.stderr


def test_duplicate_sets_whose_rows_an_older_node_pruned_are_deleted(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A campaign's duplicate set (P:fp:CID) goes with its last row: prune.lua
    counts the rows it deletes (P:pruned) and deletes the set at the count of
    the campaign's rows. A node of an older fastsend (a rolling upgrade) prunes
    without counting and deletes no set: a campaign whose rows it pruned, all
    or some, kept its set for ever (no expiry since session 20), a leak of 8
    bytes an address. The end of each retention sweep now looks at the
    campaigns whose last row is behind the shared prune cursor (P:fplast):
    no pending mail and no row left in a kept bucket, the set goes; a campaign
    with mail still deferred keeps it."""
    from fastsend.spool import DELIVERED

    url = redis_server.url(node="n1", dir=str(tmp_path))
    k = "{" + url.partition("prefix=")[2].partition("&")[0] + "}"
    r = redis_py.Redis(port=redis_server.port)
    s = RedisSpool(url)
    now = time.time()
    fps = [21, 22, 23]
    a, b, c = (s.create_campaign(SPEC) for _ in range(3))
    ids = {cid: s.add_messages(cid, [(f"{i}@x.example", "x.example", b"{}") for i in range(3)],
                               now - 10, fps=fps) for cid in (a, b, c)}  # fmt: skip
    filler = s.create_campaign(SPEC)  # (later ids: the cursor passes a, b and c's bucket)
    s.add_messages(filler, [(f"f{i}@y.example", "y.example", b"{}") for i in range(300)], now - 10)
    got = s.claim_due(now, 1000)
    mine = {g.id for g in got if g.campaign in (a, b, c)}
    assert mine == set(ids[a] + ids[b] + ids[c])
    done = ids[a] + ids[b][:2] + ids[c]
    s.record_results([Result(i, DELIVERED, 1, 0.0, 250, "2.0.0", "ok") for i in done], now - 5)
    s.record_results([Result(ids[b][2], DEFERRED, 1, now + 600, 451, "4.7.1", "later")], now - 5)
    # an older node's retention: c's rows and two of a's deleted, nothing counted
    for i in ids[c] + ids[a][:2]:
        r.hdel(f"{k}:m:{i // 128}", str(i), f"{i}s")
    while s.prune_final(now, 2000)[1]:
        pass
    assert not r.exists(f"{k}:fp:{a}") and not r.exists(f"{k}:fp:{c}")
    assert s.recorded_fps(b, fps) == [True, True, True]  # (b has mail deferred)
    assert s.recorded_fps(a, fps) == [False, False, False]
    assert {int(x) for x in r.zrange(f"{k}:fplast", 0, -1)} == {b}
    s.close()
