"""The Redis spool's promises under several threads and nodes (session 29's audit).

Real parts: redis-server primaries and a replica (``replicaof`` through a
loopback proxy that can hold the replica's acknowledgements).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from tests._engine_helpers import (
    received_counts,
    run_fastsend,
    run_killed_when,
    sink_log,
    spool_rows,
    summary,
    write_campaign,
    write_recipients,
)
from tests._redis_helpers import RedisHold, start_redis
from tests._serve_helpers import Served, until

from fastsend.sink import SinkProcess
from fastsend.spool import open_spool
from fastsend.spool.redis import RedisSpoolError


def _replica_behind(primary: Any, replica: Any) -> RedisHold:
    """``replica`` follows ``primary`` through a proxy (its acknowledgements can be held)."""
    hold = RedisHold(primary)
    rb = redis.Redis(port=replica.port)
    rb.replicaof("127.0.0.1", hold.port)
    until("the replica in sync", lambda: rb.info("replication").get("master_link_status") == "up",
          timeout=60)  # fmt: skip
    return hold


def _acked(primary: Any) -> bool:
    info = redis.Redis(port=primary.port).info("replication")
    return int(info["slave0"]["offset"]) >= int(info["master_repl_offset"])


def test_replicas_wait_covers_this_threads_rows_whichever_connection_it_is_given(
    tmp_path: Path,
) -> None:
    """``replicas=1``: add_messages returns only once a replica has the rows.
    Another thread (serve spools, stows and claims at once) takes the
    connection this one used the moment it is back in the pool, so the WAIT
    goes out on another, idle since before the rows. Before: that
    WAIT counted the replica as having everything that connection wrote
    (nothing new) and answered at once: the rows "accepted" while the replica,
    its acknowledgements held, had none of them (a failover then loses them)."""
    with start_redis() as a, start_redis() as b:
        hold = _replica_behind(a, b)
        try:
            s = open_spool(a.url(replicas="1", socket_timeout="1.5", dir=str(tmp_path)))
            cid = s.create_campaign({"from": "a@b.example"})
            assert s.add_messages(cid, spool_rows(1), time.time())
            pool = s.r.connection_pool
            idle = [pool.get_connection() for _ in range(20)]  # the pool holds idle ones
            for c in idle:
                c.send_command("PING")
                c.read_response()
                pool.release(c)
            until("the replica has all", lambda: _acked(a), timeout=30)
            taken: list[Any] = []
            release = pool.release

            def another_thread_takes_it(conn: Any) -> None:
                release(conn)
                if threading.current_thread() is threading.main_thread():
                    taken.append(pool.get_connection())  # (its request in flight)

            hold.hold()  # the replica's acknowledgements no longer reach the primary
            pool.release = another_thread_takes_it  # type: ignore[method-assign]
            try:
                with pytest.raises(RedisSpoolError, match="replicas acknowledged"):
                    s.add_messages(cid, spool_rows(2, "c.example"), time.time())
            finally:
                pool.release = release  # type: ignore[method-assign]
                for c in taken:
                    pool.release(c)
                hold.release()
            s.close()
        finally:
            hold.close()


def _send(tmp: Path, url: str, route: str, n: int) -> list[str]:
    """``fastsend send`` args for ``n`` recipients routed to ``route`` on the Redis spool ``url``."""

    addrs = [f"user{i}@d.example.net" for i in range(n)]
    return ["send", str(write_campaign(tmp)), "-r", str(write_recipients(tmp, addrs)),
            "--no-dkim", "--spool", url, "--route", route, "--retry", "1,5,3600",
            "--workers", "1", "--no-progress"]  # fmt: skip


def serve_node(tmp: Path, route: str, url: str) -> Served:
    """A serve node in ``tmp``/node, routed to ``route``, on the Redis spool ``url``."""
    (tmp / "node").mkdir()
    return Served(tmp / "node", route, spool_url=url, serve_args=("--allow-volatile",))


def test_a_serve_node_leaves_a_live_sends_campaign_to_the_send(
    redis_server: Any, tmp_path: Path
) -> None:
    """A serve node routed to sink B runs on a Redis spool; a ``fastsend send
    --spool redis://... --route A`` runs on it (A defers 30% of the attempts at
    random: the send's mail comes due again and again while it runs): the send
    delivers all of its campaign to A and B gets none of it. Before: the serve
    node claimed the send's mail as any other and delivered it by its own
    route, to B."""
    n = 40
    url = redis_server.url()
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with SinkProcess("--log", str(log_a), "--defer-rate", "0.3", "--seed", "7") as a, \
            SinkProcess("--log", str(log_b)) as b:  # fmt: skip
        (ha, pa), (hb, pb) = a.addresses[0], b.addresses[0]
        srv = serve_node(tmp_path, f"{hb}:{pb}", url)
        try:
            args = _send(tmp_path, url + f"&dir={tmp_path / 'sendlocal'}", f"*={ha}:{pa}", n)
            args[args.index("--retry") + 1] = "1,2,3600"
            proc = run_fastsend(*args, "--json", "--max-wait", "30", timeout=240)
        finally:
            srv.stop()
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = summary(proc)
        assert s["deferred"] == 0 and s["bounced"] == 0, s
    assert len(received_counts(log_a)) == n
    assert not sink_log(log_b)


def test_serve_on_redis_sets_aside_a_killed_sends_campaign_and_resume_sends_it_by_its_route(
    redis_server: Any, tmp_path: Path
) -> None:
    """A send on a Redis spool routed to sink A is killed -9 once A took a few
    of its 60 messages; a serve node routed to sink B starts on the spool: it
    says the campaign is set aside (naming the URL without its password) and B
    gets none of it; ``fastsend resume --spool URL`` (the send's recorded
    options) delivers the rest to A. Before: the serve node delivered the rest
    to B (set aside was SQLite's only)."""
    n = 60
    url = redis_server.url()
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with SinkProcess("--log", str(log_a), "--latency-ms", "100") as a, \
            SinkProcess("--log", str(log_b)) as b:  # fmt: skip
        (ha, pa), (hb, pb) = a.addresses[0], b.addresses[0]
        run_killed_when(_send(tmp_path, url + f"&dir={tmp_path / 'sendlocal'}", f"*={ha}:{pa}", n),
                        lambda: len(sink_log(log_a)) >= 3)  # fmt: skip
        assert len(received_counts(log_a)) < n
        srv = serve_node(tmp_path, f"{hb}:{pb}", url)
        try:
            srv.wait_line("set aside")
        finally:
            srv.stop()
        said = "".join(srv.lines)
        assert f"--route '*={ha}:{pa}'" in said and f"fastsend resume --spool '{url}'" in said, said
        assert not sink_log(log_b)
        proc = run_fastsend("resume", "--spool", url + f"&dir={tmp_path / 'resumelocal'}",
                            "--json", "--no-progress", "--max-wait", "60")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "set aside by serve, is active again" in proc.stderr
        s = summary(proc)
        assert s["deferred"] == 0 and s["bounced"] == 0, s
    assert set(received_counts(log_a)) == {f"user{i}@d.example.net" for i in range(n)}
    assert not sink_log(log_b)


def test_a_dead_sends_write_logs_go_once_its_window_is_taken_back(
    redis_server: Any, tmp_path: Path
) -> None:
    """A send on Redis (its local dir L1, a lease of 2 s) is killed -9 while
    delivering: its workers' write logs stay in L1/writelogs. Another node of
    this host (local dir L2) takes its window back once the lease lapses; at
    its next renewal the dead send's logs are gone. Before: they stayed until
    a process started with L1 again (for good on a host that never does)."""
    url = redis_server.url(lease="2")
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "100") as sink:
        host, port = sink.addresses[0]
        run_killed_when(_send(tmp_path, url + f"&dir={tmp_path / 'L1'}", f"*={host}:{port}", 300),
                        lambda: len(sink_log(log)) >= 3)  # fmt: skip
    logs = tmp_path / "L1" / "writelogs"
    assert [p for p in logs.iterdir() if p.is_dir()], "the send kept no write logs"
    s = open_spool(url + f"&node=other&dir={tmp_path / 'L2'}")
    try:
        s.hold_supervisor("test")

        def taken_back() -> bool:  # (this node's claims take it back once the lease lapses)
            s.claim_due(time.time(), 1000)
            return not any(s.r.scard(k) for k in s.r.scan_iter(f"{s.k}:fl:*")
                           if not k.endswith(b":other"))  # fmt: skip

        until("the dead send's window taken back", taken_back, timeout=30)
        s.renew()
        assert not [p for p in logs.iterdir() if p.is_dir()]
    finally:
        s.close()
