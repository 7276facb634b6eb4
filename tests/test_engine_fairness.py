"""Fairness between sites: one slow (shaped) site must not hold a worker's window.

A worker keeps in a site's ready queue only what the site may send within
``[delivery] ready_horizon`` seconds and hands the rest back to the supervisor
(wire.Handback), which queues it again without counting an attempt; a draining
worker hands back what its sites cannot finish soon. Through the real engine
(supervisor, forked worker, rings, two sinks on loopback): mail to an unshaped
domain is all delivered while a throttled domain's mail is still mostly
pending, handed-back mail keeps attempts == 0, nothing is lost, and a SIGTERM
drain does not wait for the throttled site. Assertions are on outcomes and
event order; the one time bound (the drain) is against a counterfactual of
a minute or more (the throttle allows one message every 10 s).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastsend import config as cfgmod
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.queue.supervisor import Supervisor
from fastsend.sink import SinkThread
from fastsend.spool import DEFERRED, Result, Spool
from fastsend.spool.sqlite import SQLiteSpool

SPEC = {"from": "Fair <news@sender.example.com>", "subject": "Hi", "text": "Hi {{ email }}\n"}
SLOW_HOST = "127.0.0.7"  # sink of the throttled domain; its own address, so its own limits


def make_config(tmp: Path, slow: SinkThread, fast: SinkThread, **delivery: Any) -> cfgmod.Config:
    raw: dict[str, Any] = {
        "spool": {"dir": "spool"},
        "workers": {"count": 1},
        "ips": {"source": ["127.0.0.2"], "helo": "out.example.com"},
        "routes": {
            "slow.example": f"{slow.host}:{slow.port}",
            "fast.example": f"{fast.host}:{fast.port}",
        },
        "retry": {"min_backoff": 0.05, "max_backoff": 0.2, "max_age": 600, "jitter": 0.1},
        # Six a minute, no burst: one message every 10 s from the (IP, site).
        "shaping": {"domain": {SLOW_HOST: {"messages_per_minute": 6, "burst": 1, "aimd": False}}},
        "delivery": {"window": 8, "batch_size": 4, "pipeline": 4, **delivery},
    }
    return cfgmod.from_dict(raw, base_dir=str(tmp))


def spool_mail(cfg: cfgmod.Config, n_slow: int, n_fast: int) -> tuple[SQLiteSpool, int]:
    spool = SQLiteSpool(cfg.spool_dir)
    cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict(), name="two domains")
    now = time.time()
    # The slow domain's mail is due first, so it is claimed first and fills the window.
    spool.add_messages(
        cid, [(f"s{i}@slow.example", "slow.example", b"{}") for i in range(n_slow)], now - 5
    )
    spool.add_messages(
        cid, [(f"f{i}@fast.example", "fast.example", b"{}") for i in range(n_fast)], now
    )
    return spool, cid


def run(
    cfg: cfgmod.Config,
    spool: SQLiteSpool,
    on_tick: Callable[[Supervisor], None],
    max_wait: float = 300.0,
) -> Supervisor:
    events = EventLog(cfg.event_log_path)
    sup = Supervisor(cfg, spool, events, until_idle=True, max_wait=max_wait, on_tick=on_tick)
    try:
        with asyncio.Runner() as r:
            r.run(asyncio.wait_for(sup.run(), 35))
    finally:
        events.close()
    return sup


def logged(cfg: cfgmod.Config) -> list[dict[str, Any]]:
    p = Path(cfg.event_log_path)
    return [orjson.loads(x) for x in p.read_bytes().splitlines()] if p.exists() else []


def check_slow_mail(spool: SQLiteSpool, cid: int, n_slow: int, received: int) -> int:
    """Nothing lost: each slow message is delivered once (one attempt) or pending
    with no attempt counted (handed back, never tried). Returns how many pending."""
    pending = 0
    delivered = 0
    for i in range(1, spool.counts(cid)["queued"] + spool.counts(cid)["delivered"] + 100):
        m = spool.message(i)
        if m is None or not m["rcpt"].endswith("@slow.example"):
            continue
        if m["state"] == "queued":
            assert m["attempts"] == 0, m
            pending += 1
        else:
            assert m["state"] == "delivered" and m["attempts"] == 1, m  # delivered on its first try
            delivered += 1
    assert pending + delivered == n_slow
    assert delivered == received  # no duplicates, no silent loss
    assert spool.counts(cid)["inflight"] == 0 and spool.counts(cid)["deferred"] == 0
    return pending


def test_slow_site_does_not_starve_the_others_and_drain_is_prompt(tmp_path: Path) -> None:
    n_slow, n_fast = 12, 40
    with (
        SinkThread(listen=[(SLOW_HOST, 0)]) as slow,
        SinkThread() as fast,
    ):
        cfg = make_config(tmp_path, slow, fast, ready_horizon=1.0)
        spool, cid = spool_mail(cfg, n_slow, n_fast)
        seen: dict[str, Any] = {}

        def on_tick(sup: Supervisor) -> None:
            if "term" not in seen and sup.stats.delivered >= n_fast:
                fast_done = sum(1 for e in logged(cfg) if e["rcpt"].endswith("@fast.example"))
                if fast_done >= n_fast:
                    seen["term"] = time.monotonic()
                    seen["slow_received"] = len(slow.messages)
                    sup.on_signal(signal.SIGTERM)

        sup = run(cfg, spool, on_tick)
        ended = time.monotonic()
        assert "term" in seen, sup.stats.as_dict()
        evs = logged(cfg)
        fast_ev = [i for i, e in enumerate(evs) if e["rcpt"].endswith("@fast.example")]
        slow_ev = [i for i, e in enumerate(evs) if e["rcpt"].endswith("@slow.example")]
        # Every fast message delivered at its first attempt ...
        assert len(fast_ev) == n_fast and all(evs[i]["event"] == "delivered" for i in fast_ev)
        assert all(evs[i]["attempt"] == 1 for i in fast_ev)
        # ... while the slow domain had sent only what its throttle allowed (one
        # at once, then one per 10 s): its mail was still mostly pending.
        before = [i for i in slow_ev if i < fast_ev[-1]]
        assert len(before) <= 3, [evs[i] for i in slow_ev]
        assert all(evs[i]["event"] == "delivered" for i in slow_ev)  # never a deferral
        assert sup.stats.handed_back >= n_slow - 3
        assert sup.stats.deferred == 0
        # The drain did not wait for the throttled site (its mail stays queued).
        assert ended - seen["term"] < 8.0
        assert len(fast.messages) == n_fast
        pending = check_slow_mail(spool, cid, n_slow, len(slow.messages))
        assert pending >= n_slow - 4


def test_sigterm_drain_hands_back_a_throttled_window(tmp_path: Path) -> None:
    """A long horizon keeps the throttled site's mail in the worker (1 + 6 for
    60 s); SIGTERM makes the worker hand it back rather than drain for a minute."""
    n_slow = 8
    with (
        SinkThread(listen=[(SLOW_HOST, 0)]) as slow,
        SinkThread() as fast,
    ):
        cfg = make_config(tmp_path, slow, fast, ready_horizon=60.0)
        spool, cid = spool_mail(cfg, n_slow, 0)
        seen: dict[str, Any] = {}

        def on_tick(sup: Supervisor) -> None:
            if "term" not in seen and sup.stats.delivered >= 1 and len(sup.slots[0].inflight) >= 4:
                seen["term"] = time.monotonic()
                seen["held"] = len(sup.slots[0].inflight)
                sup.on_signal(signal.SIGTERM)

        sup = run(cfg, spool, on_tick)
        ended = time.monotonic()
        assert "term" in seen, sup.stats.as_dict()
        assert ended - seen["term"] < 8.0  # vs >= 40 s to send what the worker held
        assert sup.stats.handed_back >= seen["held"] - 1
        assert sup.stats.deferred == 0 and sup.stats.duplicates_possible == 0
        pending = check_slow_mail(spool, cid, n_slow, len(slow.messages))
        assert pending >= n_slow - 2


# -- the spool side: requeue, in both backends ------------------------------------


def test_requeue_keeps_attempts_and_last_reply(make_spool: Callable[[], Spool]) -> None:
    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"}, name="c")
    now = time.time()
    ids = s.add_messages(cid, [(f"u{i}@x.example", "x.example", b"{}") for i in range(3)], now)
    c = s.claim_due(now, 3)
    assert len(c) == 3
    # One attempt for ids[2] (deferred), then it is claimed again.
    s.record_results([Result(ids[2], DEFERRED, 1, now - 1, 451, "4.7.0", "slow down")], now)
    c += s.claim_due(now, 3)
    s.requeue([(ids[0], now + 100), (ids[2], now + 200)], now)
    m0, m2 = s.message(ids[0]), s.message(ids[2])
    assert m0 is not None and m2 is not None
    assert (m0["state"], m0["attempts"], m0["next_at"]) == ("queued", 0, pytest.approx(now + 100))
    assert (m2["state"], m2["attempts"], m2["next_at"]) == ("deferred", 1, pytest.approx(now + 200))
    assert m2["last_code"] == 451 and m2["last_text"] == "slow down"
    counts = s.counts(cid)
    assert counts["inflight"] == 1 and counts["queued"] == 1 and counts["deferred"] == 1
    assert s.claim_due(now + 50, 10) == []  # not due before its time
    assert [x.id for x in s.claim_due(now + 150, 10)] == [ids[0]]
    # A message no longer in flight is left alone (a late duplicate hand-back).
    s.requeue([(ids[2], now + 999)], now)
    m2 = s.message(ids[2])
    assert m2 is not None and (m2["state"], m2["next_at"]) == ("deferred", pytest.approx(now + 200))
    # Handed back after its campaign was cancelled: final.
    s.set_campaign_status(cid, "cancelled")
    s.requeue([(ids[1], now + 5)], now)
    m1 = s.message(ids[1])
    assert m1 is not None and m1["state"] == "cancelled"
    s.close()


def test_mail_over_the_warm_up_cap_waits_for_the_next_day_unattempted(tmp_path: Path) -> None:
    """A worker whose only IP reached today's warm-up cap for a site hands the
    rest back until the UTC day ends: queued with no attempt counted, not
    deferred again and again."""
    # The cap resets at 00:00 UTC. The run ends once the next mail is more than
    # max_wait away, so a test started just before midnight would see the cap
    # reset under it (and, with a long max_wait, wait for it): start in a new day.
    left = 86400.0 - time.time() % 86400.0
    if left < 45.0:
        time.sleep(left + 1.0)
    with SinkThread() as sink:
        raw: dict[str, Any] = {
            "spool": {"dir": "spool"},
            "workers": {"count": 1},
            "routes": {"*": f"{sink.host}:{sink.port}"},
            "pools": {
                "default": "main",
                "warmup": {"schedule": [5, 50]},
                "main": {"ips": [{"ip": "127.0.0.2", "warmup_day": 1}]},
            },
            "delivery": {"window": 8, "batch_size": 4, "pipeline": 4, "ready_horizon": 1},
        }
        cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
        spool = SQLiteSpool(cfg.spool_dir)
        cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict(), name="warm-up")
        spool.add_messages(
            cid, [(f"w{i}@fast.example", "fast.example", b"{}") for i in range(12)], time.time()
        )
        sup = run(cfg, spool, lambda s: None, max_wait=5.0)
    counts = spool.counts(cid)
    assert counts["delivered"] == 5 and counts["queued"] == 7, counts
    assert len(sink.messages) == 5
    assert not [e for e in logged(cfg) if e["event"] == "deferred"]
    rows = spool.db.execute("SELECT attempts, next_at FROM messages WHERE state=0").fetchall()
    assert all(a == 0 for a, _ in rows)
    assert all(n > time.time() + 1 for _, n in rows)  # not before the cap resets
    assert sup.stats.handed_back >= 7
