"""Guardrail and warm-up counters live in the spool: they survive a restart, and on
a Redis spool every node adds to the same totals (real SQLite files, a real
redis-server)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastsend.queue.shaping import ShapingState
from fastsend.shaping.guardrails import Guardrails, GuardrailSettings
from fastsend.spool import BOUNCED, DELIVERED, Claimed


def _claimed(cid: int) -> Claimed:
    return Claimed(1, cid, "x@example.com", "example.com", b"{}", 0, 0.0)


def test_counters_add_up_and_survive_reopening(make_spool: Callable[[], Any]) -> None:
    a = make_spool()
    assert a.add_counters({"guard:1:bounced": 2, "warm:x": 5}) == {
        "guard:1:bounced": 2,
        "warm:x": 5,
    }
    a.close()
    b = make_spool()
    assert b.add_counters({"guard:1:bounced": 3}) == {"guard:1:bounced": 5}
    assert b.counters("guard:") == {"guard:1:bounced": 5}
    b.drop_counters(["guard:1:bounced"])
    assert b.counters("guard:") == {} and b.counters("warm:") == {"warm:x": 5}
    b.close()


def test_guardrail_sample_survives_a_restart(make_spool: Callable[[], Any]) -> None:
    """15 delivered and 1 bounced before a restart, then 4 bounces after it: the
    sample (20, 25% bounced) is judged over both runs and the campaign paused."""
    settings = GuardrailSettings(bounce_rate=0.1, min_sample=20)
    spool = make_spool()
    cid = spool.create_campaign({"from": "a@sender.example.com"})
    events: list[dict[str, Any]] = []
    g = Guardrails(spool, settings, events.append)
    for _ in range(15):
        g.on_result(_claimed(cid), None, DELIVERED)
    g.on_result(_claimed(cid), None, BOUNCED)
    g.flush()
    spool.close()

    spool = make_spool()  # a new supervisor
    g = Guardrails(spool, settings, events.append)
    for _ in range(3):
        g.on_result(_claimed(cid), None, BOUNCED)
    assert spool.get_campaign(cid).status == "active"  # 19 < min_sample
    g.on_result(_claimed(cid), None, BOUNCED)
    assert spool.get_campaign(cid).status == "paused"
    assert [(e["delivered"], e["bounced"]) for e in events] == [(15, 5)]
    assert spool.counters(f"guard:{cid}:") == {}  # a resumed campaign starts afresh
    spool.close()


def test_guardrail_counts_are_shared_by_redis_nodes(redis_server: Any, tmp_path: Path) -> None:
    """Two nodes on one Redis spool, each under the sample alone: together over it."""
    from fastsend.spool import open_spool

    url = redis_server.url(node="n1", dir=str(tmp_path))
    n1 = open_spool(url)
    n2 = open_spool(url.replace("node=n1", "node=n2"))
    cid = n1.create_campaign({"from": "a@sender.example.com"})
    settings = GuardrailSettings(bounce_rate=0.1, min_sample=20)
    events: list[dict[str, Any]] = []
    g1 = Guardrails(n1, settings, events.append)
    g2 = Guardrails(n2, settings, events.append)
    for g in (g1, g2):
        for _ in range(8):
            g.on_result(_claimed(cid), None, DELIVERED)
        for _ in range(2):
            g.on_result(_claimed(cid), None, BOUNCED)
    assert n1.get_campaign(cid).status == "active"  # each saw 10
    g1.flush()
    g2.flush()  # takes back 20 (4 bounced): over 10%
    assert n1.get_campaign(cid).status == "paused"
    assert [(e["delivered"], e["bounced"]) for e in events] == [(16, 4)]
    n1.close()
    n2.close()


def test_warmup_counts_survive_a_restart_and_add_up_over_nodes(
    make_spool: Callable[[], Any], tmp_path: Path
) -> None:
    today = int(time.time() // 86400)
    key = f"{today}|127.0.0.2|gmail"
    old = f"{today - 5}|127.0.0.2|gmail"
    spool = make_spool()
    spool.add_counters({"warm:" + old: 7})  # a day that no longer matters
    st = ShapingState(str(tmp_path), spool)
    st.merge({key: 40})  # a worker's cumulative count
    st.merge({key: 55})
    st.save(time.time(), force=True)
    spool.close()

    spool = make_spool()
    st = ShapingState(str(tmp_path), spool)  # the next start
    assert st.warm == {key: 55}
    assert spool.counters("warm:") == {"warm:" + key: 55}
    other = ShapingState(str(tmp_path / "other"), make_spool())  # another node, same IP key
    assert other.warm == {key: 55}  # what its worker is given at spawn
    other.merge({key: 65})  # ... which then sends 10 more
    other.save(time.time(), force=True)
    assert other.warm[key] == 65
    st.save(time.time(), force=True)  # reads the other node's sends back
    assert st.warm[key] == 65 and st.changed
    spool.close()
