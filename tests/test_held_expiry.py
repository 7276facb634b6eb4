"""Mail held back unattempted (a warm-up cap, a rest, a suspension) still expires
at its ``[retry] max_age``: a message is never sent however late (a week-old
newsletter among today's) just because no attempt was ever made."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastsend import config as cfgmod
from fastsend.message import Campaign
from fastsend.sink import SinkThread
from fastsend.spool.sqlite import SQLiteSpool
from test_engine_fairness import SPEC, logged, run


def test_mail_held_by_a_warm_up_cap_past_its_max_age_expires(tmp_path: Path) -> None:
    """One cold IP, a cap of 5 a day: the other 7 would wait for the next UTC day,
    past their max_age of 60 s; they expire now, unattempted, saying why. Before,
    they were queued for the next day (and the next, however long)."""
    left = 86400.0 - time.time() % 86400.0
    if left < 70.0:  # (the next day is within max_age: they would just wait)
        time.sleep(left + 1.0)
    with SinkThread() as sink:
        raw: dict[str, Any] = {
            "spool": {"dir": "spool"},
            "workers": {"count": 1},
            "routes": {"*": f"{sink.host}:{sink.port}"},
            "retry": {"max_age": 60},
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
    assert counts["delivered"] == 5 and counts["expired"] == 7, counts
    assert len(sink.messages) == 5
    expired = [e for e in logged(cfg) if e["event"] == "expired"]
    assert len(expired) == 7 and all(e["reason"] == "expired" for e in expired)
    assert all("max_age" in e["text"] and e["enhanced"] == "4.4.7" for e in expired), expired[0]
    rows = spool.db.execute("SELECT attempts FROM messages WHERE state != 3").fetchall()
    assert all(a == 0 for (a,) in rows)  # never attempted, never counted one
    assert sup.stats.expired == 7


def test_mail_a_campaign_rate_would_send_after_its_max_age_expires(tmp_path: Path) -> None:
    """A campaign capped at 10/s with 200 recipients and a max_age of 5 s: the
    supervisor sends its burst (10), keeps 10 s of its rate (100) in the window and queues the rest
    again at the rate's pace, 10-20 s from now, after their max_age: they expire
    then, unattempted. Before, rate-held mail never expired, however slow the
    rate (a million at 1/s: the last sent 11 days late)."""
    import signal

    from fastsend.queue.supervisor import Supervisor

    with SinkThread() as sink:
        raw: dict[str, Any] = {
            "spool": {"dir": "spool"},
            "workers": {"count": 1},
            "routes": {"*": f"{sink.host}:{sink.port}"},
            "retry": {"max_age": 5},
        }
        cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
        spool = SQLiteSpool(cfg.spool_dir)
        cid = spool.create_campaign(
            Campaign.from_dict(SPEC).to_dict(), name="slow", options={"max_rate": 10}
        )
        spool.add_messages(
            cid, [(f"r{i}@fast.example", "fast.example", b"{}") for i in range(200)], time.time()
        )

        def stop_once_expired(sup: Supervisor) -> None:
            if sup.stats.expired:
                sup.on_signal(signal.SIGINT)  # (the rest would take 10 s at 10/s)

        sup = run(cfg, spool, stop_once_expired, max_wait=5.0)
    counts = spool.counts(cid)
    # 10 went at once (the rate's burst), 100 (10 s of it) stayed held, 90 expired
    assert counts["expired"] == 90 and sup.stats.expired == 90, counts
    # the burst is delivered, or (a worker slow to start on a loaded machine, then the
    # stop) back in the queue, deferred: nothing else is lost
    assert counts["expired"] + counts["delivered"] + counts["queued"] + counts["deferred"] == 200, (
        counts
    )
    expired = [e for e in logged(cfg) if e["event"] == "expired"]
    assert len(expired) == 90 and all("10/s rate" in e["text"] for e in expired), expired[0]
    rows = spool.db.execute("SELECT attempts FROM messages WHERE state = 6").fetchall()
    assert len(rows) == 90 and all(a == 0 for (a,) in rows)
