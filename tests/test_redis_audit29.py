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
from tests._engine_helpers import spool_rows
from tests._redis_helpers import RedisHold, start_redis
from tests._serve_helpers import until

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
