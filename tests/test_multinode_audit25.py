"""Several nodes on one Redis (session 25's audit): clocks, a stalled Redis.

Real parts: one redis-server (a proxy in front of it to stall it), RedisSpool
nodes, ``fastsend serve`` processes.
"""

from __future__ import annotations

import time
from typing import Any

from tests.test_multinode_audit24 import _off_by

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
