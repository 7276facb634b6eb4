"""Nodes on one Redis: durability read from a real redis-server's settings, the
source-IP registry (a live node's IPs are refused, a dead node's are taken over),
and the shared installation secret."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from tests._redis_helpers import RedisServer, start_redis

from fastsend.cluster import ClusterError, ClusterNode, check_durability, read_durability


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port)


def test_durability_volatile_refused_unless_allowed(redis_server: RedisServer) -> None:
    r = _client(redis_server)  # the suite's server: --appendonly no --save ""
    d = read_durability(r)
    assert d.appendonly is False and d.level == "none" and not d.rdb
    assert "memory only" in d.survives
    with pytest.raises(ClusterError, match=r"appendonly no.*--allow-volatile"):
        check_durability(d, allow_volatile=False)
    check_durability(d, allow_volatile=True)


@pytest.mark.parametrize(
    ("fsync", "level"), [("always", "power-loss"), ("everysec", None), ("no", "redis-crash")]
)
def test_durability_aof(fsync: str, level: str | None) -> None:
    with start_redis("--appendonly", "yes", "--appendfsync", fsync) as server:
        r = _client(server)
        d = read_durability(r)
        assert d.appendonly is True and d.appendfsync == fsync
        if level is None:  # everysec: power-loss safe only where the spool can WAITAOF
            level = "power-loss" if d.waitaof else "redis-crash"
        assert d.level == level
        check_durability(d, allow_volatile=False)
        # A live change is seen by the next node that starts.
        r.config_set("appendonly", "no")
        assert read_durability(r).level == "none"


def test_source_ip_registry(redis_server: RedisServer) -> None:
    r = _client(redis_server)
    prefix = "ipreg" + str(time.monotonic_ns())
    # (leases of 1 s: renewals 0.4 s apart keep them through a loaded CI's stalls)
    a = ClusterNode(r, prefix, "node-a", lease=1.0)
    b = ClusterNode(r, prefix, "node-b", lease=1.0)
    a.claim_ips(["127.0.0.2", "127.0.0.3"])
    with pytest.raises(ClusterError, match=r"127\.0\.0\.3 \(node node-a\)"):
        b.claim_ips(["127.0.0.3", "127.0.0.4"])
    assert b.ips == []  # nothing taken on a refusal
    b.claim_ips(["127.0.0.4"])
    assert a.holders() == {"127.0.0.2": "node-a", "127.0.0.3": "node-a", "127.0.0.4": "node-b"}
    # A restart under the same node name takes its own IPs back at once.
    ClusterNode(r, prefix, "node-a", lease=1.0).claim_ips(["127.0.0.2", "127.0.0.3"])
    # Renewals keep them; a lapsed lease lets another node take them over.
    for _ in range(3):
        time.sleep(0.4)
        assert a.renew() == []
        b.renew()
    with pytest.raises(ClusterError):
        b.claim_ips(["127.0.0.2"])
    time.sleep(1.2)  # a stops renewing: it died
    b.renew()
    b.claim_ips(["127.0.0.4", "127.0.0.2"])
    assert a.renew() == ["127.0.0.2"]  # a, back, learns it lost one
    # A clean exit gives the IPs back at once: one a is configured with is a's
    # again at its next renewal (before: "held by another node" for good, and
    # free for any node to claim while a sent from it).
    b.release()
    assert a.renew() == [] and a.holders()["127.0.0.2"] == "node-a"
    c = ClusterNode(r, prefix, "node-c", lease=1.0)
    c.claim_ips(["127.0.0.4"])
    with pytest.raises(ClusterError, match=r"127\.0\.0\.2 \(node node-a\)"):
        c.claim_ips(["127.0.0.2"])
    # Redis lost the registry (restarted without its data): renewals write it again.
    r.delete("{" + prefix + "}:ips")
    assert a.renew() == [] and c.renew() == []
    assert a.holders() == {"127.0.0.2": "node-a", "127.0.0.3": "node-a", "127.0.0.4": "node-c"}


def test_shared_secret(redis_server: RedisServer) -> None:
    r = _client(redis_server)
    prefix = "sec" + str(time.monotonic_ns())
    s1 = ClusterNode(r, prefix, "n1").shared_secret()
    s2 = ClusterNode(r, prefix, "n2").shared_secret()
    assert s1 == s2 and len(s1) == 64
    assert ClusterNode(r, prefix + "x", "n1").shared_secret() != s1


def test_every_live_node_in_the_cluster_view(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node publishes its status; any node lists every live one with its IPs,
    lease and rates, and the totals; a clean exit or a silent node drops out."""
    from fastsend import cluster
    from fastsend.serve.shared_state import SharedState
    from fastsend.spool import open_spool

    url = redis_server.url()
    a = SharedState(open_spool(url + "&node=na&lease=2"))
    b = SharedState(open_spool(url + "&node=nb&lease=2"))
    a.cluster.claim_ips(["127.0.0.2", "127.0.0.3"])
    b.cluster.claim_ips(["127.0.0.4"])
    a.status_source = lambda: {"rates": {"delivered": 10.5}, "totals": {"delivered": 100}}
    b.status_source = lambda: {
        "rates": {"delivered": 4.5, "bounced": 1},
        "totals": {"delivered": 7},
    }
    t0 = time.monotonic()
    a.tick()
    b.tick()
    view = b.cluster_view()
    took = time.monotonic() - t0  # (a's lease is no older: no fixed window to stall past)
    assert view["count"] == 2 and [n["node"] for n in view["nodes"]] == ["na", "nb"]
    na, nb = view["nodes"]
    assert na["ips"] == ["127.0.0.2", "127.0.0.3"] and nb["ips"] == ["127.0.0.4"]
    assert nb["self"] and not na["self"] and na["pid"] > 0
    assert 0 <= na["lease_age_s"] <= took + 0.01 and 0 < na["lease_left_s"] <= 2.0, na
    assert view["rates"] == {"delivered": 15.0, "bounced": 1} and view["totals"]["delivered"] == 107
    b.stop()  # a clean exit: gone from the view at once
    assert [n["node"] for n in a.cluster_view()["nodes"]] == ["na"]
    monkeypatch.setattr(cluster, "STATUS_STALE", 0.2)  # a node that stops publishing
    time.sleep(0.3)
    assert a.cluster_view()["nodes"] == []


def test_transport_connections_are_split_among_the_live_nodes(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transport's max_connections (a relay's sessions, a provider's requests
    in flight) split among the nodes sending through it, on a real Redis:
    equal parts, the remainder to the first names; a node restarted with its
    name takes its own place again (no third share); a clean exit gives its
    part back at once, a dead node's part comes back when its lease lapses;
    more nodes than connections: 1 each (never 0: a node could send nothing)."""
    from fastsend import shared_limits as sl

    monkeypatch.setattr(sl, "JOIN_GRACE", 0.0)  # test_only_nodes_with_mail_...: the grace
    prefix = "cs" + str(time.monotonic_ns())[-6:]
    lim = sl.SharedLimits(redis_server.url(prefix=prefix))
    a = sl.ConnectionShares(lim, "a", {"relay1": 5, "ses": 1})
    assert a.refresh() and a.shares == {"relay1": 5, "ses": 1} and a.others == 0
    b = sl.ConnectionShares(lim, "b", {"relay1": 5, "ses": 1})
    b.refresh()
    assert a.refresh() and a.shares == {"relay1": 3, "ses": 1}
    assert b.shares == {"relay1": 2, "ses": 1} and b.others == 1
    assert a.nodes == b.nodes == {"relay1": 2, "ses": 2}
    b_again = sl.ConnectionShares(lim, "b", {"relay1": 5, "ses": 1})  # restarted, same name
    b_again.refresh()
    assert b_again.shares == {"relay1": 2, "ses": 1}
    assert not a.refresh() and a.shares["relay1"] == 3
    b.leave()
    assert a.refresh() and a.shares == {"relay1": 5, "ses": 1}
    # A node that dies keeps its place until its lease lapses.
    monkeypatch.setattr(sl, "SHARE_LEASE", 1.0)  # (0.3 s: a loaded CI's stall)
    c = sl.ConnectionShares(lim, "c", {"relay1": 5, "ses": 1})
    c.refresh()
    a.refresh()
    assert a.shares["relay1"] == 3
    time.sleep(1.2)
    assert a.refresh() and a.shares["relay1"] == 5
    assert [sl.node_share(2, ["a", "b", "c"], n) for n in "abc"] == [1, 1, 1]
    assert [sl.node_share(7, ["x", "y", "z"], n) for n in "xyz"] == [3, 2, 2]
    lim.close()


def test_a_node_name_is_held_by_one_live_process(redis_server: RedisServer) -> None:
    """``Spool.hold_supervisor`` on Redis holds the node name (``P:name:NODE``):
    another spool object of this process shares it; a live holder on another
    host is refused with when its hold lapses, and taken once it did; a dead
    holder on this host is taken at once; close() gives it back."""
    import os
    import socket
    import subprocess

    import orjson

    from fastsend.spool import SpoolBusy, open_spool

    url = redis_server.url(node="n7", lease="30")
    a = open_spool(url)
    a.hold_supervisor("fastsend serve")
    r = _client(redis_server)
    key = "{" + url.split("prefix=")[1].split("&")[0] + "}:name:n7"
    assert orjson.loads(r.get(key))["pid"] == os.getpid()
    b = open_spool(url)
    b.hold_supervisor("fastsend resume")  # this very process: no conflict
    b.close()
    assert r.get(key) is not None  # b's close leaves a's hold (the same process's)
    a.close()
    assert r.get(key) is None
    # A live holder elsewhere: refused, naming it and when its hold lapses.
    r.set(key, orjson.dumps({"pid": 4242, "host": "mx9.elsewhere", "start": 1.0,
                             "command": "fastsend serve"}), px=1500)  # fmt: skip
    c = open_spool(url)
    with pytest.raises(SpoolBusy) as e:
        c.hold_supervisor("fastsend send")
    assert "node name 'n7'" in str(e.value) and "mx9.elsewhere" in str(e.value)
    assert "lapses within" in str(e.value)
    deadline = time.monotonic() + 60
    while r.get(key) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.hold_supervisor("fastsend send")
    c.close()
    # A dead holder on this host (its pid gone): taken at once.
    dead = subprocess.Popen(["true"])
    dead.wait()
    r.set(key, orjson.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": 1.0}))
    d = open_spool(url)
    d.hold_supervisor("fastsend send")
    assert orjson.loads(r.get(key))["pid"] == os.getpid()
    d.close()


def test_only_nodes_with_mail_for_a_transport_share_its_connections(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three nodes configured alike with a relay of 6 connections and an SES
    account (``fastsend.queue.shaping.SupervisorShaping`` on a real Redis spool):
    only the nodes with mail routed through a transport in their windows take
    part in its split (all join at start, the idle ones leave once they had no
    mail for SHARE_LINGER s). One node sending alone gets all 6 (and counts
    itself alone for the SES rate) while two others sit idle; a node whose mail for it
    starts keeps to 1 connection until the others have seen it, then half;
    a node whose mail for it is gone leaves its place (after SHARE_LINGER), and
    the other takes the whole again. Before: every node configured with the
    transport took a part from its start, so one node sending alone got 2 of 6
    and a third of the account's rate."""
    from fastsend import shared_limits as sl
    from fastsend.config.loader import load
    from fastsend.queue import shaping as qs
    from fastsend.spool import open_spool

    for k, v in (("RELAY1_USERNAME", "u"), ("RELAY1_PASSWORD", "p"), ("SES1_ACCESS_KEY_ID", "k"),
                 ("SES1_SECRET_ACCESS_KEY", "s")):  # fmt: skip
        monkeypatch.setenv("FASTSEND_" + k, v)
    monkeypatch.setattr(qs, "SHARE_EVERY", 0.05)  # the start's wait for the others: 0.2 s
    prefix = "dm" + str(time.monotonic_ns())[-6:]
    nodes = {}
    for name in ("a", "b", "c"):
        cfg = tmp_path / f"{name}.toml"
        url = redis_server.url(prefix=prefix, node=name, dir=str(tmp_path / name))
        cfg.write_text(
            f'[spool]\nurl = "{url}"\n'
            '[transports.relay1]\nkind = "relay"\nhost = "127.0.0.1"\nport = 2525\n'
            'max_connections = 6\n'
            '[transports.ses1]\nkind = "ses"\nregion = "eu-west-1"\nmax_connections = 3\n'
            '[routes]\n"*" = "relay1"\n"ses.example" = "ses1"\n'
        )
        spool = open_spool(url)
        nodes[name] = (spool, qs.SupervisorShaping(load(str(cfg)), spool, lambda ev: None))
    cid = nodes["a"][0].create_campaign({"from": "x@y.example"}, name="c1")
    mail: dict[str, list[tuple[int, str]]] = {"a": [(cid, "x.example")], "b": [], "c": []}
    for name, (_spool, sh) in nodes.items():
        sh.demand = lambda name=name: mail[name]  # type: ignore[misc]

    def tick() -> dict[str, dict[str, int]]:
        for _spool, sh in nodes.values():
            sh.tick(force=True)
        for _spool, sh in nodes.values():  # each sees the others' places
            sh.tick(force=True)
        return {n: dict(sh.shares.shares) for n, (_s, sh) in nodes.items()}

    got = tick()  # at start every node joins what its routes name, then keeps it a while
    assert got["a"]["relay1"] == 2, got
    monkeypatch.setattr(qs, "SHARE_LINGER", 0.0, raising=False)
    got = tick()  # b and c have no mail: they leave
    assert got["a"]["relay1"] == 6, got  # sending alone: every connection
    assert nodes["a"][1].shares.nodes["ses1"] == 1
    monkeypatch.setattr(qs, "SHARE_LINGER", 5.0, raising=False)
    mail["b"] = [(cid, "x.example"), (cid, "ses.example")]  # b's windows take mail too
    got = tick()
    assert got["b"]["relay1"] == 1 and got["a"]["relay1"] == 3, got  # b waits for a to see it
    monkeypatch.setattr(sl, "JOIN_GRACE", 0.0)
    got = tick()
    assert got["a"]["relay1"] == 3 and got["b"]["relay1"] == 3, got
    assert got["b"]["ses1"] == 3 and nodes["b"][1].shares.nodes["ses1"] == 1, got
    mail["b"] = []
    got = tick()
    assert got["b"]["relay1"] == 3  # it keeps its place between two batches
    monkeypatch.setattr(qs, "SHARE_LINGER", 0.0, raising=False)
    got = tick()
    assert got["a"]["relay1"] == 6, got
    for spool, sh in nodes.values():
        sh.close()
        spool.close()


def test_a_node_name_held_in_another_pid_namespace_of_this_host_name_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two nodes by one host name that count pids apart (containers sharing
    the host's name: ``--network host``, Kubernetes' ``hostNetwork``; cloned
    machines) given the same node name: the second is refused (exit 75,
    naming the holder), not taken over because the holder's pid means
    another process here; once the holder is gone its hold lapses and the
    name is free. The holder is a real process in its own PID namespace
    (``unshare``), the second the real ``fastsend resume``. Before: the pid
    looked dead from here (pid 1 is another process), and two live processes
    ran under one name, each taking the other's in-flight window back (sent
    twice)."""
    import os
    import subprocess
    import sys

    import orjson

    from fastsend.spool.base import holder_gone

    url = redis_server.url(node="n1", lease="1", dir=str(tmp_path))  # (not ./spool)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = (
        "import sys, time, orjson\n"
        "from fastsend.spool import open_spool\n"
        "from fastsend.spool.base import holder_tag\n"
        "s = open_spool(sys.argv[1])\n"
        "s.hold_supervisor('fastsend serve')\n"
        "print(orjson.dumps(holder_tag()).decode(), flush=True)\n"
        "for _ in range(1200):  # renewed as a node's supervisor does, until killed\n"
        "    s.renew()\n"
        "    time.sleep(0.05)\n"
    )
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", code, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line, holder.stderr.read() if holder.stderr else ""
        tag = orjson.loads(line)
        assert tag["pid"] == 1  # pid 1 over there; here, another process
        assert not holder_gone(tag)
        r = subprocess.run(
            [sys.executable, "-m", "fastsend", "resume", "--spool", url, "--no-progress",
             "--max-wait", "0"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 75, (r.returncode, r.stderr[-2000:])
        assert "node name 'n1' is in use" in r.stderr and "pid 1 on" in r.stderr, r.stderr
        assert "another machine or container" in r.stderr and "lapses within" in r.stderr
    finally:
        holder.kill()  # unshare, and with it (--kill-child) the holder
        holder.wait()
    # The holder gone without a word: its hold lapses (lease 1 s), then the name is free.
    r = _client(redis_server)
    key = "{" + url.split("prefix=")[1].split("&")[0] + "}:name:n1"
    deadline = time.monotonic() + 60
    while r.get(key) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    done = subprocess.run(
        [sys.executable, "-m", "fastsend", "resume", "--spool", url, "--no-progress",
         "--max-wait", "0"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_source_ip_another_node_took_is_rested_until_it_is_ours_again(
    redis_server: RedisServer,
) -> None:
    """A serve node stalled past its lease (a long GC pause, SIGSTOP, a VM
    migration) while another node started with one of its IPs: at its next
    renewal it found the IP held by a live node and only logged it, then went
    on sending from it beside the other (two nodes on one address: each keeps
    its own per-site rates and warm-up cap for it). Now it rests the IP for
    every provider (``Supervisor.rest_ip``, the blocklist path), renewed while
    the other holds it, and stops once the IP is its own again."""
    from fastsend.serve.shared_state import SharedState
    from fastsend.spool import open_spool

    spool = open_spool(redis_server.url(node="a", lease="1"))  # (0.4 s: a loaded CI's stall)
    st = SharedState(spool)

    class Cfg:
        source_ips = ["127.0.0.2", "127.0.0.3"]

    st.cluster.claim_ips(Cfg.source_ips)
    rests: list[tuple[str, list[str], float, str]] = []
    st.rest_ip = lambda ip, provs, until, why: rests.append((ip, provs, until, why))
    st._renewed = 0.0
    st.tick()
    assert rests == []
    time.sleep(1.2)  # a stalls past its lease; b starts with one of its IPs
    b = ClusterNode(st.r, st.prefix, "b", lease=5)
    b.claim_ips(["127.0.0.3"])
    st._renewed = 0.0
    before = time.time()
    st.tick()
    ((ip, provs, until, why),) = rests
    assert (ip, provs) == ("127.0.0.3", ["*"]) and "another live node" in why
    assert before < until <= time.time() + 1.0  # a lease from the tick (no window to stall past)
    st._renewed = 0.0
    st.tick()  # still b's: rested again
    assert [r[0] for r in rests] == ["127.0.0.3"] * 2
    b.release()
    st._renewed = 0.0
    st.tick()  # ours again: no rest (the last one lapses within half a lease)
    assert len(rests) == 2 and st.cluster.holders()["127.0.0.3"] == "a"
    # A reload's IPs: one another live node holds is refused, nothing changed;
    # one dropped is given back once the reload took effect.
    b.claim_ips(["127.0.0.4"])
    Cfg.source_ips = ["127.0.0.2", "127.0.0.4"]
    with pytest.raises(ClusterError, match=r"127\.0\.0\.4 \(node b\)"):
        st.reload(Cfg)
    assert st.cluster.holders() == {"127.0.0.2": "a", "127.0.0.3": "a", "127.0.0.4": "b"}
    Cfg.source_ips = ["127.0.0.2", "127.0.0.5"]
    st.reload(Cfg)
    assert st.cluster.holders() == {
        "127.0.0.2": "a", "127.0.0.3": "a", "127.0.0.4": "b", "127.0.0.5": "a"
    }  # fmt: skip
    st.reloaded(Cfg)
    assert st.cluster.holders() == {"127.0.0.2": "a", "127.0.0.4": "b", "127.0.0.5": "a"}
    ClusterNode(st.r, st.prefix, "c", lease=5).claim_ips(["127.0.0.3"])
    st._renewed = 0.0
    st.tick()
    assert len(rests) == 2  # .3 is not a's any more: nothing to rest
    spool.close()
