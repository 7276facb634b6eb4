"""Engagement-aware warm-up: the decision table, offsets judged once a day from the
node's rollups and the provider feeds, offsets reaching a worker's pools (today's caps
change at once), and mail over a cold IP's cap overflowing to the pool's warmed IPs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastsend import wire
from fastsend.analytics.rollup import _node_rows
from fastsend.analytics.store import IDX, NC, SQLiteRollupStore
from fastsend.analytics.warmup import (
    ADVANCE,
    BACK,
    HOLD,
    NORMAL,
    EngagementWarmup,
    WarmupPolicy,
    decide,
)
from fastsend.config import from_dict
from fastsend.shaping.pools import DEFAULT_SCHEDULE, UNCAPPED, Pool, PoolIP, utc_day


def test_decision_table() -> None:
    p = WarmupPolicy()
    assert decide(1000, 0.0001, 0.002, "", p)[0] == ADVANCE
    assert decide(1000, 0.0001, 0.002, "good", p)[0] == ADVANCE
    assert decide(1000, 0.0007, 0.002, "", p)[0] == NORMAL  # between the lines
    assert decide(1000, 0.0015, 0.002, "", p)[0] == HOLD
    assert decide(1000, 0.0001, 0.03, "", p)[0] == HOLD
    assert decide(1000, 0.0031, 0.0, "", p)[0] == BACK  # Gmail/Yahoo's 0.3% line
    assert decide(1000, 0.0, 0.06, "", p)[0] == BACK
    assert decide(1000, 0.0, 0.0, "hold", p)[0] == HOLD  # SNDS yellow
    assert decide(1000, 0.0, 0.0, "bad", p)[0] == BACK  # SNDS red / Postmaster bad
    assert decide(50, 0.0, 0.0, "", p)[0] == NORMAL  # too little mail to judge


def test_offsets_from_rollups_and_feeds(tmp_path: Path) -> None:
    store = SQLiteRollupStore(str(tmp_path))
    now = time.time()
    y0 = (int(now) // 86400 - 1) * 86400

    def day(ip: str, delivered: int, complaints: int, bounced: int) -> None:
        row = [0] * NC
        row[IDX["delivered"]], row[IDX["complaints"]], row[IDX["bounced"]] = (
            delivered, complaints, bounced)
        counts: dict[Any, list[int]] = {(86400, y0, ("acme", 1, "google", ip)): row}
        _node_rows(counts, {})
        store.add(counts, {}, {})

    day("127.0.0.2", 1000, 0, 2)  # clean: ahead
    day("127.0.0.3", 1000, 4, 0)  # 0.4% complaints: back
    day("127.0.0.4", 1000, 0, 0)  # clean, but SNDS says yellow: hold
    events: list[dict[str, Any]] = []
    verdicts = {("127.0.0.4", "outlook"): "hold"}
    ew = EngagementWarmup(WarmupPolicy(), store, str(tmp_path), events.append,
                          lambda ip, prov: verdicts.get((ip, prov), ""))  # fmt: skip
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert ew.evaluate(ips, now)
    assert ew.offsets() == {"127.0.0.2": 1, "127.0.0.3": -2, "127.0.0.4": -1, "127.0.0.5": 0}
    assert {e["source_ip"]: e["change"] for e in events} == {"127.0.0.2": 1, "127.0.0.3": -2,
                                                              "127.0.0.4": -1}
    assert not ew.evaluate(ips, now)  # once per UTC day
    again = EngagementWarmup(WarmupPolicy(), store, str(tmp_path), events.append)
    assert again.offsets() == ew.offsets()  # kept across restarts
    assert again.evaluate(ips, now + 86400) is False  # a day without mail: no change
    disabled = EngagementWarmup(WarmupPolicy(enabled=False), store, str(tmp_path), events.append)
    assert disabled.evaluate(ips, now + 2 * 86400) is False


def test_offsets_reach_a_workers_pools_and_todays_caps() -> None:
    from fastsend.shaping.lanes import Shaper

    now = time.time()
    cfg = from_dict({"pools": {"main": {"ips": [{"ip": "127.0.0.2", "warmup_day": 3},
                                                  "127.0.0.3"]}}})  # fmt: skip
    sh = Shaper(cfg, ["127.0.0.2", "127.0.0.3"], now)
    pool = sh.pool("main")
    cold = next(p for p in pool.ips if p.ip == "127.0.0.2")
    w = pool.warmup(cold, "google", now)
    assert w.cap == DEFAULT_SCHEDULE[2]  # day 3
    rec = wire.encoder.encode(wire.WarmupAdjust({"127.0.0.2": 2}))
    msg = wire.to_worker_decoder.decode(rec)
    assert isinstance(msg, wire.WarmupAdjust)
    sh.adjust_warmup(msg.offsets)
    assert cold.warmup_day(now) == 5 and w.cap == DEFAULT_SCHEDULE[4]  # today's cap, at once
    sh.adjust_warmup({"127.0.0.2": -5})
    assert cold.warmup_day(now) == 1 and w.cap == DEFAULT_SCHEDULE[0]


def test_over_the_cap_overflows_to_warmed_ips() -> None:
    now = time.time()
    pool = Pool("main", [PoolIP("127.0.0.2", warmup_start_day=utc_day(now)),
                         PoolIP("127.0.0.3")])  # fmt: skip
    cap = pool.schedule.cap(1)
    picks: dict[str, int] = {}
    for _ in range(cap * 4):
        p = pool.pick("google", now)
        assert p is not None  # never "wait for tomorrow" while a warmed IP can send
        picks[p.ip] = picks.get(p.ip, 0) + 1
        if p.warmup_start_day is not None:
            pool.warmup(p, "google", now).sent += 1
    assert picks["127.0.0.2"] == cap and picks["127.0.0.3"] == cap * 3


def test_warmup_day_goes_on_across_restarts_and_reloads(tmp_path: Path) -> None:
    """``warmup_day = 1`` read on day D: a restart (or a SIGHUP: the pools are
    loaded again) on day D + 2 is day 3 of the schedule, not day 1 again -- it
    was: an IP said to be on day 1 stayed at day 1's cap through every restart
    and reload. Changing N anchors anew; a ``warmup_start`` date is as ever."""
    from fastsend.shaping.pools import load_pools

    spool = tmp_path / "spool"
    spool.mkdir()
    tables = {"spool": {"dir": str(spool)},
              "pools": {"warmup": {"schedule": [2, 4, 8, 16]},
                        "main": {"ips": [{"ip": "127.0.0.2", "warmup_day": 1},
                                         {"ip": "127.0.0.3", "warmup_day": 2}]}}}  # fmt: skip
    d0 = (int(time.time()) // 86400) * 86400 + 3600.0

    def caps(now: float) -> dict[str, int]:
        pool = load_pools(from_dict(tables), now).pools["main"]
        return {p.ip: pool.cap(p, now) for p in pool.ips}

    assert caps(d0) == {"127.0.0.2": 2, "127.0.0.3": 4}
    assert caps(d0 + 80_000) == {"127.0.0.2": 2, "127.0.0.3": 4}  # the same UTC day
    assert caps(d0 + 2 * 86400) == {"127.0.0.2": 8, "127.0.0.3": 16}  # two days on
    assert caps(d0 + 9 * 86400)["127.0.0.2"] == UNCAPPED  # past the schedule: warm
    # the operator says "today is day 2" for .2: from today
    tables["pools"]["main"]["ips"][0]["warmup_day"] = 2  # type: ignore[index]
    assert caps(d0 + 9 * 86400)["127.0.0.2"] == 4
    assert caps(d0 + 10 * 86400)["127.0.0.2"] == 8
