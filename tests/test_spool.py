"""The SQLite spool: durability, claiming, results, recovery, shape."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from fastsend.spool import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Result,
)
from fastsend.spool.sqlite import SpoolError, SQLiteSpool


def rows(n: int, domain: str = "example.com") -> list[tuple[str, str, bytes]]:
    return [(f"u{i}@{domain}", domain, orjson.dumps({"i": str(i)})) for i in range(n)]


def test_add_claim_record_and_counts(tmp_path: Path) -> None:
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"}, name="c1")
    now = time.time()
    ids = s.add_messages(cid, rows(10), now)
    assert len(ids) == 10 and len(set(ids)) == 10
    claimed = s.claim_due(now, 4)
    assert len(claimed) == 4
    assert s.counts()["inflight"] == 4 and s.counts()["queued"] == 6
    # Claimed rows are not claimed twice.
    again = s.claim_due(now, 100)
    assert {c.id for c in again}.isdisjoint({c.id for c in claimed})
    assert len(again) == 6
    s.record_results(
        [
            Result(claimed[0].id, DELIVERED, 1, 0, 250, "2.0.0", "ok"),
            Result(claimed[1].id, BOUNCED, 1, 0, 550, "5.1.1", "no such user"),
            Result(claimed[2].id, DEFERRED, 1, now + 60, 451, "4.7.1", "later"),
        ],
        now,
    )
    c = s.counts(cid)
    assert c["delivered"] == 1 and c["bounced"] == 1 and c["deferred"] == 1
    assert c["inflight"] == 7
    m = s.message(claimed[1].id)
    assert m is not None and m["state"] == "bounced" and m["last_enhanced"] == "5.1.1"
    # A deferred message is not due before its time, and is due after it.
    s.release([x.id for x in again] + [claimed[3].id])
    assert claimed[2].id not in {x.id for x in s.claim_due(now + 1, 100)}
    assert [x.id for x in s.claim_due(now + 61, 100)] == [claimed[2].id]


def test_durable_across_reopen_and_recover_inflight(tmp_path: Path) -> None:
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, rows(100), now)
    s.claim_due(now, 30)
    # Simulate a crash: no close, a new process opens the same spool.
    s2 = SQLiteSpool(str(tmp_path))
    assert s2.counts()["inflight"] == 30
    assert s2.recover() == 30
    assert s2.counts()["queued"] == 100
    assert len(s2.claim_due(now, 1000)) == 100


def test_paused_campaign_is_not_claimed(tmp_path: Path) -> None:
    s = SQLiteSpool(str(tmp_path))
    a = s.create_campaign({"from": "a@b.example"})
    b = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(a, rows(5, "a.example"), now)
    s.add_messages(b, rows(5, "b.example"), now)
    s.set_campaign_status(a, "paused")
    got = s.claim_due(now, 100)
    assert {c.campaign for c in got} == {b}
    s.set_campaign_status(a, "active")
    assert {c.campaign for c in s.claim_due(now, 100)} == {a}
    with pytest.raises(ValueError):
        s.set_campaign_status(a, "bogus")
    # Cancelling makes the pending rows final (cancelled), leaving others alone.
    c = s.create_campaign({"from": "a@b.example"})
    s.add_messages(c, rows(4, "c.example"), now)
    inflight = s.claim_due(now, 1)[0]
    s.set_campaign_status(c, "cancelled")
    counts = s.counts(c)
    assert counts["cancelled"] == 3 and counts["inflight"] == 1
    assert inflight.campaign == c
    assert s.next_due() is None


def test_queue_shape_and_next_due(tmp_path: Path) -> None:
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, rows(3, "x.example"), now - 3600)  # an hour old
    s.add_messages(cid, rows(2, "y.example"), now)
    shape = dict(s.queue_shape(now))
    assert sum(shape["x.example"]) == 3 and shape["x.example"][4] == 3  # 40..80 min bucket
    assert shape["y.example"][0] == 2
    assert s.next_due() == pytest.approx(now - 3600)


def test_readonly_view_and_missing_spool(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        SQLiteSpool(str(tmp_path / "nope"), readonly=True)
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    s.add_messages(cid, rows(3), time.time())
    ro = SQLiteSpool(str(tmp_path), readonly=True)
    assert ro.counts()["queued"] == 3
    assert ro.get_campaign(cid) is not None
