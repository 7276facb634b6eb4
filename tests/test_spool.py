"""The spool seam's semantics, run on both backends (SQLite and Redis):
durability, claiming, results, recovery, campaigns, shape."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import spool_rows

from fastsend.spool import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    SUPPRESSED,
    IngestBusy,
    IngestMark,
    Result,
    Spool,
    SpoolError,
    SpoolProxy,
    open_spool,
)
from fastsend.spool.sqlite import SQLiteSpool

Factory = Callable[[], Spool]


def test_add_claim_record_and_counts(make_spool: Factory) -> None:
    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"}, name="c1")
    now = time.time()
    ids = s.add_messages(cid, spool_rows(10), now)
    assert len(ids) == 10 and len(set(ids)) == 10
    claimed = s.claim_due(now, 4)
    assert len(claimed) == 4
    assert claimed[0].vars == orjson.dumps({"i": claimed[0].rcpt[1:].split("@")[0]})
    assert claimed[0].created == pytest.approx(now) and claimed[0].attempts == 0
    assert s.counts()["inflight"] == 4 and s.counts()["queued"] == 6
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
    assert s.pending() == {"queued": 0, "deferred": 1}
    m = s.message(claimed[1].id)
    assert m is not None and m["state"] == "bounced" and m["last_enhanced"] == "5.1.1"
    assert m["attempts"] == 1 and m["last_code"] == 550 and m["campaign"] == cid
    assert s.message(10**9) is None
    s.release([x.id for x in again] + [claimed[3].id])
    assert s.counts(cid)["queued"] == 7
    assert claimed[2].id not in {x.id for x in s.claim_due(now + 1, 100)}
    got = s.claim_due(now + 61, 100)
    assert [x.id for x in got] == [claimed[2].id] and got[0].attempts == 1
    s.close()


def test_outcomes_of_many_rows_mixed_and_out_of_order(make_spool: Factory) -> None:
    """A flush as the supervisor writes it: hundreds of outcomes in arrival order
    (interleaved, not id order), deliveries with different attempts and codes
    between bounces and deferrals: every row ends exactly as its Result says."""
    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    ids = s.add_messages(cid, spool_rows(600), now)
    assert len(s.claim_due(now, 1000)) == 600
    want: dict[int, Result] = {}
    for k, i in enumerate(ids):
        if k % 7 == 3:
            want[i] = Result(i, BOUNCED, 1, 0, 550, "5.1.1", f"no user {k}")
        elif k % 11 == 5:
            want[i] = Result(i, DEFERRED, 2, now + 60 + k, 451, "4.7.1", f"later {k}")
        else:  # deliveries with 1 or 3 attempts, two codes: several runs each
            want[i] = Result(i, DELIVERED, 1 + 2 * (k % 5 == 0), 0, 250 if k % 13 else 251,
                             "2.0.0", f"ok {k}")  # fmt: skip
    order = sorted(ids, key=lambda i: (i % 100, i))  # as answers come: per domain
    s.record_results([want[i] for i in order], now + 1)
    c = s.counts(cid)
    assert c["inflight"] == 0 and c["queued"] == 0
    assert c["delivered"] == sum(r.state == DELIVERED for r in want.values())
    assert c["deferred"] == sum(r.state == DEFERRED for r in want.values())
    for i, r in want.items():
        m = s.message(i)
        assert m is not None
        got = (m["attempts"], m["last_code"], m["last_enhanced"])
        assert got == (r.attempts, r.code, r.enhanced)
        if r.state == DELIVERED:
            assert m["state"] == "delivered" and m["updated"] == pytest.approx(now + 1)
        else:  # a failure's reply is kept whole; a deferral is due again at its time
            assert m["last_text"] == r.text
            assert m["state"] == ("bounced" if r.state == BOUNCED else "deferred")
        if r.state == DEFERRED:
            assert m["next_at"] == pytest.approx(r.next_at)
    assert s.next_due() == pytest.approx(min(r.next_at for r in want.values() if r.next_at))


def test_durable_across_reopen_and_recover_inflight(make_spool: Factory) -> None:
    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, spool_rows(100), now)
    s.claim_due(now, 30)
    s2 = make_spool()  # a crash: no close, a new process opens the same spool
    assert s2.counts()["inflight"] == 30
    assert s2.recover() == 30
    # Each may have been sent: one attempt of unknown outcome, due again at once.
    c = s2.counts()
    assert (c["queued"], c["deferred"], c["inflight"]) == (70, 30, 0), c
    back = sorted(s2.taken_back(), key=lambda t: t.id)
    assert len(back) == 30 and all(t.attempts == 1 and t.at <= now for t in back)
    assert "outcome unknown" in back[0].text and s2.taken_back() == []
    m = s2.message(back[0].id)
    assert m is not None and (m["attempts"], m["last_code"]) == (1, 451), m
    got = s2.claim_due(now, 1000)
    assert len(got) == 100 and sorted(g.attempts for g in got) == [0] * 70 + [1] * 30


def test_recover_scans_from_the_lowest_id_put_in_flight(tmp_path: Path) -> None:
    """recover() on SQLite reads only ids from a bound every claim and every
    parked insert lowers in its own transaction: rows claimed again long after
    they were spooled (a retry), rows parked for a short claim, and every row of
    a spool whose bound was never written (an older version's) come back."""
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    old = s.add_messages(cid, spool_rows(50), now - 10)
    s.record_results(
        [Result(c.id, DELIVERED, 1, 0, 250, "2.0.0", "") for c in s.claim_due(now, 40)], now
    )  # 10 still queued, 40 final
    s.db.execute("DELETE FROM meta WHERE key='inflight_low'")  # as an older version left it
    assert len(s.claim_due(now, 5)) == 5
    s2 = SQLiteSpool(str(tmp_path))  # a crash, then the next start
    assert s2.recover() == 5  # each an attempt of unknown outcome, due again at once
    assert (s2.counts()["queued"], s2.counts()["deferred"]) == (5, 5)

    def bound() -> int:
        return int(s2.db.execute("SELECT value FROM meta WHERE key='inflight_low'").fetchone()[0])

    assert bound() == old[-1] + 1  # nothing in flight: only newer rows can be
    new = s2.add_messages(cid, spool_rows(20, "n.example"), now)
    retry = s2.claim_due(now, 3)  # the oldest due first: ids far below the bound
    assert {c.id for c in retry} <= set(old) and bound() == min(c.id for c in retry)
    assert len(s2.claim_next(now, 1000, key=0)) == 27  # the rest, then short: room
    parked = s2.add_messages(cid, spool_rows(4, "p.example"), now)
    assert s2.counts()["inflight"] == 3 + 27 + 4
    s3 = SQLiteSpool(str(tmp_path))  # a crash again
    assert s3.recover() == 34 and s3.counts()["inflight"] == 0
    assert s3.counts()["queued"] + s3.counts()["deferred"] == 34
    assert sorted(c.id for c in s3.claim_due(now, 100)) == old[40:] + new + parked
    s3.db.execute("UPDATE messages SET state=1 WHERE id=?", (old[0],))  # below the bound
    s4 = SQLiteSpool(str(tmp_path))
    assert s4.recover() == 34  # the 34 claimed again by s3; the row below the bound is not read
    for x in (s, s2, s3, s4):
        x.close()


def test_a_spool_made_before_campaign_runs_opens_and_works(tmp_path: Path) -> None:
    """A spool of the previous layout (rows found by an index on their campaign, no
    campaign_rows) reads right in a read-only view as it is; opened for writing it
    gets its runs from its rows and loses the index, once; rows an older version
    adds later are found the same way at the next open. Counts, pages of domains,
    siblings and cancelling a campaign see exactly each campaign's rows."""
    s = SQLiteSpool(str(tmp_path))
    a, b = s.create_campaign({"from": "a@b.example"}), s.create_campaign({"from": "a@b.example"})
    now = time.time()
    for cid, dom in ((a, "a.example"), (b, "b.example"), (a, "c.example"), (b, "b.example")):
        s.add_messages(cid, spool_rows(7, dom), now)
    s.close()

    def as_before(db: Any) -> None:  # the previous layout, as the older version leaves it
        db.execute("DROP TABLE campaign_rows")
        db.execute("CREATE INDEX messages_campaign ON messages(campaign)")

    raw = sqlite3.connect(str(tmp_path / "spool.db"))
    as_before(raw)
    raw.commit()
    raw.close()
    want = {a: {"queued": 14}, b: {"queued": 14}}
    view = SQLiteSpool(str(tmp_path), readonly=True)
    assert {c: {k: v for k, v in n.items() if v} for c, n in view.counts_by_campaign().items()} == want
    assert view.counts(a)["queued"] == 14 and view.sibling(b, "U3@B.example", 0) == (11, "u3@b.example")
    view.close()
    s = SQLiteSpool(str(tmp_path))
    names = {r[0] for r in s.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "messages_campaign" not in names
    assert s.db.execute("SELECT campaign, first, last FROM campaign_rows ORDER BY first").fetchall() == [
        (a, 1, 7), (b, 8, 14), (a, 15, 21), (b, 22, 28)]  # fmt: skip
    ids = s.add_messages(a, spool_rows(3, "d.example"), now)  # b's run ends last: a new run
    s.db.execute(  # an older version appends a row of b and keeps no run
        "INSERT INTO messages(campaign, rcpt, domain, vars, state, created, next_at, updated)"
        " VALUES (?, 'late@b.example', 'b.example', x'7b7d', 0, ?, ?, ?)", (b, now, now, now)
    )
    s.close()
    s = SQLiteSpool(str(tmp_path))
    for x in (s, SQLiteSpool(str(tmp_path), readonly=True)):
        assert x.counts(a)["queued"] == 17 and x.counts(b)["queued"] == 15
        assert x.counts_by_campaign([b])[b]["queued"] == 15
        assert x.pending_domains([a]) == [("a.example", 7), ("c.example", 7), ("d.example", 3)]
        assert x.sibling(a, "u1@d.example", 0) == (ids[1], "u1@d.example")
        assert x.sibling(a, "late@b.example", 0) is None
    s.set_campaign_status(b, "cancelled")
    assert s.counts(b)["cancelled"] == 15 and s.counts(a)["queued"] == 17
    s.add_messages(a, spool_rows(2, "e.example"), now)  # after b's late row: a new run
    s.add_messages(a, spool_rows(2, "f.example"), now)  # right after a's: that run extended
    runs = "SELECT first, last FROM campaign_rows WHERE campaign=? ORDER BY first"
    assert s.db.execute(runs, (a,)).fetchall() == [(1, 7), (15, 21), (29, 31), (33, 36)]
    assert s.db.execute(runs, (b,)).fetchall() == [(8, 14), (22, 28), (32, 32)]
    s.close()


def test_paused_and_cancelled_campaigns(make_spool: Factory) -> None:
    s = make_spool()
    a = s.create_campaign({"from": "a@b.example"})
    b = s.create_campaign({"from": "a@b.example"}, name="bee", tenant="t2", options={"x": 1})
    now = time.time()
    s.add_messages(a, spool_rows(5, "a.example"), now)
    s.add_messages(b, spool_rows(5, "b.example"), now)
    s.set_campaign_status(a, "paused")
    got = s.claim_due(now, 100)
    assert {c.campaign for c in got} == {b}
    s.set_campaign_status(a, "active")
    assert {c.campaign for c in s.claim_due(now, 100)} == {a}
    with pytest.raises(ValueError):
        s.set_campaign_status(a, "bogus")
    c = s.create_campaign({"from": "a@b.example"})
    s.add_messages(c, spool_rows(4, "c.example"), now)
    inflight = s.claim_due(now, 1)[0]
    s.set_campaign_status(c, "cancelled")
    counts = s.counts(c)
    assert counts["cancelled"] == 3 and counts["inflight"] == 1
    assert inflight.campaign == c
    assert s.next_due() is None
    # Its attempt comes back deferred: final (cancelled), not deferred for ever.
    s.record_results([Result(inflight.id, DEFERRED, 1, now + 60, 451, "4.0.0", "x")], now)
    assert s.counts(c)["cancelled"] == 4 and s.counts(c)["deferred"] == 0
    assert s.next_due() is None and s.claim_due(now + 3600, 10) == []
    info = s.get_campaign(b)
    assert info is not None and (info.name, info.tenant, info.options) == ("bee", "t2", {"x": 1})
    assert info.status == "active" and info.spec == {"from": "a@b.example"}
    assert [x.status for x in s.list_campaigns()] == ["active", "active", "cancelled"]
    assert s.get_campaign(999) is None
    s.set_campaign_status(999, "paused")  # no such campaign: nothing happens
    assert s.get_campaign(999) is None


def test_queue_shape_next_due_and_suppressed(make_spool: Factory) -> None:
    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, spool_rows(3, "x.example"), now - 3600)  # an hour old
    s.add_messages(cid, spool_rows(2, "y.example"), now)
    s.add_messages(cid, spool_rows(4, "z.example"), now, state=SUPPRESSED)
    s.claim_due(now - 3600, 1)  # in flight still counts in the shape
    shape = dict(s.queue_shape(now))
    assert sum(shape["x.example"]) == 3 and shape["x.example"][4] == 3  # 40..80 min bucket
    assert shape["y.example"][0] == 2 and "z.example" not in shape
    assert s.next_due() == pytest.approx(now - 3600, abs=1e-3)
    assert s.counts(cid)["suppressed"] == 4
    assert len(s.claim_due(now, 100)) == 4  # suppressed rows are never due


def test_ordering_oldest_due_first_across_campaigns(make_spool: Factory) -> None:
    s = make_spool()
    a = s.create_campaign({"from": "a@b.example"})
    b = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(a, spool_rows(3, "a.example"), now - 10)
    s.add_messages(b, spool_rows(3, "b.example"), now - 20)
    s.add_messages(a, spool_rows(3, "a2.example"), now - 30)
    got = s.claim_due(now, 6)
    # Which ones, not their order (SQLite's RETURNING order is unspecified).
    assert sorted(c.domain for c in got) == ["a2.example"] * 3 + ["b.example"] * 3


def test_readonly_view_and_missing_spool(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        SQLiteSpool(str(tmp_path / "nope"), readonly=True)
    with pytest.raises(SpoolError, match="no spool"):
        open_spool(str(tmp_path / "nope"), must_exist=True)
    assert not (tmp_path / "nope").exists()
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    s.add_messages(cid, spool_rows(3), time.time())
    ro = SQLiteSpool(str(tmp_path), readonly=True)
    assert ro.counts()["queued"] == 3
    assert ro.get_campaign(cid) is not None


def test_owner_counts_by_campaign_and_pending_domains(make_spool: Factory) -> None:
    s = make_spool()
    a = s.create_campaign({"from": "a@b.example"}, tenant="t1")
    b = s.create_campaign({"from": "a@b.example"}, tenant="t2")
    now = time.time()
    ids = s.add_messages(a, spool_rows(3, "x.example"), now)
    s.add_messages(a, spool_rows(2, "y.example"), now)
    s.add_messages(b, spool_rows(4, "y.example"), now, state=SUPPRESSED)
    s.add_messages(b, spool_rows(1, "z.example"), now)
    assert s.owner(ids[1]) == (a, "u1@x.example")
    assert s.owner(10**9) is None
    # The nearest message of the campaign to that address, case-insensitive.
    assert s.sibling(a, "U2@X.example", ids[0]) == (ids[2], "u2@x.example")
    assert s.sibling(b, "u2@x.example", ids[0]) is None  # b has u2@y / u0@z only
    assert s.sibling(a, "nobody@x.example", ids[0]) is None
    got = s.claim_due(now, 1)  # in flight is still pending for the dashboard
    s.record_results([Result(got[0].id, DELIVERED, 1, 0, 250, "2.0.0", "ok")], now)
    per = s.counts_by_campaign()
    assert set(per) == {a, b}
    assert sum(per[a].values()) == 5 and per[a]["delivered"] == 1
    assert per[b]["suppressed"] == 4 and per[b]["queued"] == 1
    assert s.counts_by_campaign([b]) == {b: per[b]}
    assert s.counts_by_campaign([]) == {}
    c = s.create_campaign({"from": "a@b.example"})
    assert s.counts_by_campaign()[c] == dict.fromkeys(per[a], 0)
    domains = dict(s.pending_domains())
    assert sum(domains.values()) == 5 and domains["y.example"] == 2 - (got[0].domain == "y.example")
    assert s.pending_domains([b]) == [("z.example", 1)]
    assert s.pending_domains(None, limit=1) == s.pending_domains()[:1]
    assert s.pending_domains([]) == []


def test_add_messages_suppressed_rows_and_ingest_mark(make_spool: Factory) -> None:
    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    source = {"path": "/x/list.csv", "size": 10, "mtime_ns": 1, "sha256": "ab"}
    job = s.create_ingest(cid, source, 7)
    j = s.get_ingest(job)
    assert j is not None and (j.campaign, j.source, j.total, j.line, j.status) == (
        cid, source, 7, 0, "running"
    )  # fmt: skip
    mark = IngestMark(job, line=5, accepted=4, rejected=1)
    ids = s.add_messages(cid, spool_rows(4), now, suppressed={1, 3}, ingest=mark)
    assert [s.message(i)["state"] for i in ids] == ["queued", "suppressed"] * 2  # type: ignore[index]
    assert s.counts(cid)["suppressed"] == 2 and s.counts()["queued"] == 2
    assert {c.id for c in s.claim_due(now, 10)} == {ids[0], ids[2]}
    j = s.get_ingest(job)
    assert j is not None and (j.line, j.accepted, j.rejected) == (5, 4, 1)
    # A mark alone (the last rows were all bad) still moves the job.
    assert s.add_messages(cid, [], now, ingest=IngestMark(job, 7, 4, 3)) == []
    s2 = make_spool()  # durable: another process sees it
    j2 = s2.get_ingest(job)
    assert j2 is not None and (j2.line, j2.rejected) == (7, 3)
    assert [x.id for x in s2.list_ingests(unfinished=True)] == [job]
    other = s2.create_ingest(cid, source, 1)
    s2.finish_ingest(job, "done")
    assert [x.id for x in s2.list_ingests(unfinished=True)] == [other]
    assert [(x.id, x.status, x.finished) for x in s2.list_ingests()] == [
        (job, "done", True), (other, "running", False)
    ]  # fmt: skip
    s2.finish_ingest(other, "abandoned")
    assert s2.list_ingests(unfinished=True) == [] and s2.get_ingest(10**6) is None
    with pytest.raises(ValueError):
        s2.finish_ingest(other, "running")


def test_rows_keep_their_vars_byte_for_byte_and_their_order(make_spool: Factory) -> None:
    """Vars come back as the bytes spooled (UTF-8 JSON with non-ASCII text, bytes
    that are not UTF-8 at all), ids follow the rows' order across statements of
    every size, and suppressed rows anywhere in a batch are the only ones not due."""
    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    odd = [orjson.dumps({"n": "Zoë ✓ 名前"}), b"\xff\xfe not utf-8 \x00", b'{"nul":"\\u0000"}']
    ids = s.add_messages(cid, [(f"v{i}@v.example", "v.example", v) for i, v in enumerate(odd)], now)
    assert [s.message(i)["vars"] if i != ids[1] else None for i in ids] == [  # type: ignore[index]
        {"n": "Zoë ✓ 名前"}, None, {"nul": "\u0000"}]  # fmt: skip
    got = {c.id: c.vars for c in s.claim_due(now, 10)}
    assert [got[i] for i in ids] == odd
    if isinstance(s, SQLiteSpool):  # stored as blobs, as before
        assert {t for (t,) in s.db.execute("SELECT typeof(vars) FROM messages")} == {"blob"}
    gone = {0, 255, 256, 299, 300, 599}
    more = s.add_messages(cid, spool_rows(600, "w.example"), now, suppressed=gone)
    assert more == list(range(ids[-1] + 1, ids[-1] + 601))
    due = s.claim_due(now, 1000)
    assert sorted(c.id for c in due) == [m for k, m in enumerate(more) if k not in gone]
    assert all(c.rcpt == f"u{c.id - more[0]}@w.example" for c in due)
    assert s.counts(cid)["suppressed"] == len(gone)


def test_an_ingest_job_has_one_holder(make_spool: Factory) -> None:
    """The creator holds a new job; another holder is refused with the holder
    named (here another spool object of this process) until it releases or
    closes; holding twice is a no-op. Other processes: tests/test_ingest.py."""
    a, b = make_spool(), make_spool()
    cid = a.create_campaign({"from": "a@b.example"})
    job = a.create_ingest(cid, {"path": "/x.csv"}, 3)
    a.hold_ingest(job)
    with pytest.raises(IngestBusy, match=rf"ingest job {job} is being read by pid {os.getpid()} "):
        b.hold_ingest(job)
    a.release_ingest(job)
    b.hold_ingest(job)
    b.hold_ingest(job)
    with pytest.raises(IngestBusy) as e:
        a.hold_ingest(job)
    assert e.value.job_id == job and e.value.holder["pid"] == os.getpid()
    b.close()
    a.hold_ingest(job)
    a.close()


def test_proxy_forwards_every_method(make_spool: Factory) -> None:
    calls: list[str] = []

    class Counting(SpoolProxy):
        def add_messages(self, *a: Any, **kw: Any) -> list[int]:
            calls.append("add")
            return super().add_messages(*a, **kw)

    inner = make_spool()
    s = Counting(inner)
    cid = s.create_campaign({"from": "a@b.example"}, name="p", tenant="t")
    now = time.time()
    ids = s.add_messages(cid, spool_rows(3), now, suppressed=[2])
    assert calls == ["add"] and s.counts(cid)["suppressed"] == 1
    assert s.tally(cid) == inner.tally(cid)
    assert s.get_campaign(cid) == inner.get_campaign(cid) and len(s.list_campaigns()) == 1
    got = s.claim_due(now, 1)
    s.renew()
    s.requeue([(got[0].id, now)], now)
    got = s.claim_due(now, 2)
    s.release([got[0].id])
    s.record_results([Result(got[1].id, DELIVERED, 1, 0, 250, "2.0.0", "ok")], now)
    assert s.recover() == 0 and s.next_due() is not None
    assert s.message(ids[0]) == inner.message(ids[0]) and s.owner(ids[0]) == (cid, "u0@example.com")
    assert s.counts_by_campaign() == inner.counts_by_campaign()
    assert s.pending() == inner.pending() == {"queued": 1, "deferred": 0}
    assert s.pending_domains() == inner.pending_domains() and s.queue_shape(now)
    job = s.create_ingest(cid, {}, 1)
    assert s.get_ingest(job) is not None and len(s.list_ingests()) == 1
    s.finish_ingest(job, "done")
    s.set_campaign_status(cid, "paused")
    assert inner.get_campaign(cid).status == "paused"  # type: ignore[union-attr]
    assert s.add_counters({"w|a": 2}) == {"w|a": 2} and inner.counters("w|") == {"w|a": 2}
    s.drop_counters(["w|a"])
    assert s.counters("w|") == {}
    assert [c.id for c in s.campaigns("t", limit=5)] == [cid] and s.campaigns("u") == []
    assert s.meta_once("k", "1") == "1" and s.meta_once("k", "2") == inner.meta_once("k", "3") == "1"
    s.put_blob("ab" * 32, b"body", now)
    s.ref_blob("ab" * 32, ids)
    assert s.get_blobs(["ab" * 32]) == inner.get_blobs(["ab" * 32]) == {"ab" * 32: b"body"}
    assert s.sweep_blobs(now, 1.0) == 0
    s.close()


def _corrupt_spec(s: Spool, cid: int) -> None:
    """Make a campaign's stored spec undecodable (what reading it would trip on)."""
    inner = getattr(s, "inner", s)
    if isinstance(inner, SQLiteSpool):
        inner.db.execute("UPDATE campaigns SET spec=x'ff00' WHERE id=?", (cid,))
    else:
        inner.r.hset(f"{inner.k}:c:{cid}", "spec", b"\xff\x00")  # type: ignore[attr-defined]


def test_campaigns_of_one_tenant_by_page_never_read_another_tenants(make_spool: Factory) -> None:
    s = make_spool()
    mine = []
    for i in range(25):
        mine.append(s.create_campaign({"n": i}, tenant="t1"))
        theirs = s.create_campaign({"n": i}, tenant="t2")
        _corrupt_spec(s, theirs)  # t1's listing must not even decode it
    got, after = [], 0
    while page := s.campaigns("t1", after=after, limit=7):
        assert len(page) <= 7 and all(c.tenant == "t1" for c in page)
        got += [c.id for c in page]
        after = page[-1].id
    assert got == mine
    assert [c.spec["n"] for c in s.campaigns("t1", after=mine[19])] == [20, 21, 22, 23, 24]
    assert s.campaigns("t1", limit=0) == [] and s.campaigns("nobody") == []
    with pytest.raises(orjson.JSONDecodeError):
        s.campaigns("t2", limit=1)  # the corruption is real


def test_redis_spool_indexes_tenants_of_an_older_spool(redis_server: Any, tmp_path: Path) -> None:
    url = redis_server.url(node="n1", dir=str(tmp_path))
    s: Any = open_spool(url)
    a = s.create_campaign({}, tenant="t1")
    b = s.create_campaign({}, tenant="t2")
    r, k = s.r, s.k
    r.delete(f"{k}:tc:t1", f"{k}:tc:t2", f"{k}:tc-ok")  # as a spool made before the sets
    again = open_spool(url)
    assert [c.id for c in again.campaigns("t1")] == [a]
    assert [c.id for c in again.campaigns("t2")] == [b]
    assert [c.id for c in again.campaigns()] == [a, b]


def test_redis_spool_indexes_fair_shares_of_an_older_spool(redis_server: Any, tmp_path: Path) -> None:
    """A spool made before the claim's P:fair index: the next open fills it, so a
    tenant's small campaign still gets its share of the first claim (without
    it, every campaign counts as a tenant of its own: a tenant with 3 campaigns
    took 3 shares)."""
    url = redis_server.url(node="n1", dir=str(tmp_path))
    s: Any = open_spool(url)
    now = time.time()
    big = [s.create_campaign({}, tenant="t1") for _ in range(3)]
    small = s.create_campaign({}, tenant="t2")
    for cid in big:
        s.add_messages(cid, [(f"r{i}@a.example", "a.example", b"[]") for i in range(100)], now - 5)
    s.add_messages(small, [(f"s{i}@b.example", "b.example", b"[]") for i in range(100)], now - 5)
    r, k = s.r, s.k
    r.delete(f"{k}:fair", f"{k}:fair-ok")  # as a spool made before the index
    got = open_spool(url).claim_due(now, 40)
    per: dict[int, int] = {}
    for c in got:
        per[c.campaign] = per.get(c.campaign, 0) + 1
    assert per[small] == 20 and sum(per[c] for c in big) == 20
    assert r.hget(f"{k}:fair", str(small)) is not None


def test_blobs_stored_once_kept_while_needed_then_swept(make_spool: Factory) -> None:
    import hashlib

    s = make_spool()
    cid = s.create_campaign({})
    body = b"x" * 5000
    d = hashlib.sha256(body).hexdigest()
    now = time.time()
    s.put_blob(d, body, now)
    s.put_blob(d, body, now)  # a second request with the same body: one copy
    ids = s.add_messages(cid, [(f"r{i}@a.example", "a.example", b"[]") for i in range(5)], now)
    s.ref_blob(d, ids[:3])
    assert s.get_blobs([d, "0" * 64]) == {d: body}
    day = 86400.0
    # One reference still pending (put, no ref yet: rows may exist): never swept.
    assert s.sweep_blobs(now + 2 * day, day) == 0
    s.ref_blob(d, ids[3:])
    assert s.sweep_blobs(now + 4 * day, day) == 0  # its rows are queued
    s.claim_due(now, 10)
    later = now + 6 * day
    s.record_results([Result(i, DELIVERED, 1, 0, 250, "2.0.0", "ok") for i in ids[:4]], later)
    assert s.sweep_blobs(later, day) == 0  # one row still in flight
    s.record_results([Result(ids[4], BOUNCED, 1, 0, 550, "5.1.1", "no")], later)
    assert s.sweep_blobs(later + day / 2, day) == 0  # final, but not for `retention` yet
    s.put_blob(d, body, later + day / 2)  # used again meanwhile: the clock restarts
    s.ref_blob(d, [])
    assert s.sweep_blobs(later + day, day) == 0
    assert s.sweep_blobs(later + 3 * day, day) == 1
    assert s.get_blobs([d]) == {} and s.message(ids[0]) is not None
    assert s.sweep_blobs(later + 3 * day, day) == 0


# -- SQLite: rows spooled for a waiting dispatcher ("parked") ---------------------


def test_rows_spooled_after_a_short_claim_go_straight_to_it(tmp_path: Path) -> None:
    """After the dispatcher's claim came back short, the rows spooled next (up to
    its room) are in flight from their commit (other processes' views say so)
    and the next claims hand them out first, in order, without their campaign's
    other queued rows going missing; a one-shot claim_due leaves no room open."""
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    s.add_messages(cid, spool_rows(3), now)
    assert len(s.claim_due(now, 10)) == 3  # claim_due: no room left open
    assert s.add_messages(cid, spool_rows(2, "q.example"), now) and s.counts()["queued"] == 2
    assert len(s.claim_next(now, 12, key=0)) == 2  # short by 10
    ids = s.add_messages(cid, spool_rows(14, "p.example"), now, suppressed={1})
    c = s.counts()
    # 10 in flight from the commit (one of them suppressed instead), 4 queued
    assert (c["inflight"], c["queued"], c["suppressed"]) == (3 + 2 + 9, 4, 1)
    view = SQLiteSpool(str(tmp_path), readonly=True)
    assert view.counts() == c and view.message(ids[0])["state"] == "inflight"  # type: ignore[index]
    view.close()
    assert s.next_due() is not None and s.next_due() <= now  # type: ignore[operator]
    got = s.claim_next(now, 5, key=0)  # parked first, in order
    assert [g.id for g in got] == [ids[0], *ids[2:6]]
    assert (got[0].rcpt, got[0].domain, got[0].attempts) == ("u0@p.example", "p.example", 0)
    assert got[0].vars == orjson.dumps({"i": "0"}) and got[0].created == pytest.approx(now)
    got = s.claim_next(now, 100, key=0)  # the rest of the parked, then the queued ones
    assert [g.id for g in got] == [*ids[6:10], *ids[10:]]
    assert s.counts()["queued"] == 0 and s.counts()["inflight"] == 3 + 2 + 13
    s.record_results([Result(g.id, DELIVERED, 1, 0, 250, "2.0.0", "") for g in got], now)
    assert s.counts(cid)["delivered"] == 8
    s.close()


def test_tally_of_a_campaign_only_while_this_object_spooled_all_it_has(tmp_path: Path) -> None:
    """tally(): (rows, suppressed) of a campaign this object created, counted as
    they are spooled (parked, queued, suppressed alike); None for a campaign it
    did not create, once another connection wrote the spool (another process's
    cancel or pause, a CLI command) and once it was cancelled here."""
    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    other = s.create_campaign({"from": "a@b.example"})
    assert s.tally(cid) == (0, 0)
    now = time.time()
    s.add_messages(cid, spool_rows(3), now)
    assert len(s.claim_next(now, 12, key=0)) == 3  # short: the next rows are parked
    s.add_messages(cid, spool_rows(5, "p.example"), now, suppressed={0, 3})
    s.add_messages(other, spool_rows(2), now)
    c = s.counts(cid)
    assert s.tally(cid) == (8, 2) == (sum(c.values()), c["suppressed"])
    again = SQLiteSpool(str(tmp_path))  # not created by it
    assert again.tally(cid) is None
    again.set_campaign_status(other, "paused")  # another connection's commit
    again.close()
    assert s.tally(cid) is None and s.tally(other) is None
    third = s.create_campaign({"from": "a@b.example"})
    s.add_messages(third, spool_rows(2), now)
    assert s.tally(third) == (2, 0)
    s.set_campaign_status(third, "cancelled")  # its pending rows end cancelled
    assert s.tally(third) is None
    s.close()


def test_checkpoints_behind_the_writer_keep_tally_and_rows_and_end_with_close(
    tmp_path: Path,
) -> None:
    """checkpoint_behind(): WAL checkpoints on a thread and connection of their
    own while the spool is written; they are not another writer's commits (a
    campaign's tally stands), the rows are all there, checkpoint_soon() ends
    the thread by itself, close() leaves no WAL behind and a second run starts
    a new thread."""
    import threading

    import fastsend.spool.sqlite as mod

    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    s.checkpoint_behind()
    behind = s._behind
    assert behind is not None and behind.thread.is_alive()
    s.checkpoint_behind()  # already running: the same thread
    assert s._behind is behind
    now = time.time()
    for _ in range(5):
        s.add_messages(cid, spool_rows(400), now)
        behind.wake.set()  # a pass now rather than in CHECKPOINT_EVERY s
        time.sleep(0.01)
    wal = str(tmp_path / "spool.db-wal")
    look = sqlite3.connect(str(tmp_path / "spool.db"))
    frames = look.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    look.close()
    assert frames[1] == frames[2]  # every frame copied back already, or by this pass
    assert s.tally(cid) == (2000, 0)  # the checkpoints changed no data_version
    s.checkpoint_soon()
    behind.thread.join(5)
    assert not behind.thread.is_alive()
    s.checkpoint_behind()  # the next run: a thread of its own
    assert s._behind is not behind and s._behind is not None and s._behind.thread.is_alive()
    s.close()
    assert not os.path.exists(wal) and s._behind is None
    assert not any(t.name == "spool-checkpoints" for t in threading.enumerate())
    again = SQLiteSpool(str(tmp_path))
    assert again.counts(cid)["queued"] == 2000
    again.close()
    ro = SQLiteSpool(str(tmp_path), readonly=True)
    ro.checkpoint_behind()  # read-only: nothing to do
    assert ro._behind is None
    ro.close()
    assert mod.CHECKPOINT_EVERY > 0


def test_parked_rows_stale_room_paused_cancelled_closed_and_crashed(tmp_path: Path) -> None:
    import fastsend.spool.sqlite as mod

    s = SQLiteSpool(str(tmp_path))
    cid = s.create_campaign({"from": "a@b.example"})
    other = s.create_campaign({"from": "a@b.example"})
    now = time.time()
    # A room older than ROOM_TTL takes nothing.
    assert s.claim_next(now, 50) == []
    ttl, mod.ROOM_TTL = mod.ROOM_TTL, 0.0
    try:
        s.add_messages(cid, spool_rows(3), now)
    finally:
        mod.ROOM_TTL = ttl
    assert s.counts()["queued"] == 3
    # Nor does a paused campaign's list.
    s.set_campaign_status(other, "paused")
    assert len(s.claim_next(now, 50)) == 3
    s.add_messages(other, spool_rows(4), now)
    assert s.counts(other)["queued"] == 4
    # Parked, then paused: not handed out, queued again; resumed: claimed.
    s.set_campaign_status(other, "active")
    assert len(s.claim_next(now, 50)) == 4
    parked = s.add_messages(cid, spool_rows(5, "p.example"), now)
    assert s.counts(cid)["inflight"] == 3 + 5
    s.set_campaign_status(cid, "paused")
    assert s.claim_next(now, 50) == [] and s.counts(cid)["queued"] == 5
    s.set_campaign_status(cid, "active")
    assert [g.id for g in s.claim_next(now, 50)] == parked
    # Parked, then cancelled (by another process): final, never handed out.
    parked = s.add_messages(other, spool_rows(2, "c.example"), now)
    SQLiteSpool(str(tmp_path)).set_campaign_status(other, "cancelled")
    assert s.claim_next(now, 50) == [] and s.counts(other)["cancelled"] == 2
    # Parked and never claimed: close() queues them again.
    s.set_campaign_status(cid, "active")
    assert s.claim_next(now, 50) == []
    parked = s.add_messages(cid, spool_rows(2, "z.example"), now)
    s.close()
    s = SQLiteSpool(str(tmp_path))
    assert [m["state"] for m in map(s.message, parked)] == ["queued"] * 2  # type: ignore[index]
    # Parked when the process dies (no close): in flight until recover().
    assert len(s.claim_next(now, 50)) == 2
    parked = s.add_messages(cid, spool_rows(3, "k.example"), now)
    after = SQLiteSpool(str(tmp_path))  # the next start, the old object abandoned
    assert after.counts(cid)["inflight"] >= 3
    after.recover()
    assert {g.id for g in after.claim_due(now, 100)} >= set(parked)


def test_a_blob_of_an_accept_that_died_is_reclaimed(make_spool: Factory) -> None:
    """put_blob, then the process dies: before its rows (no row holds the blob),
    or after them (rows hold it, never recorded by ref_blob). Once the pending
    reference is older than the grace the sweep finds the rows holding it:
    none -> deleted a retention later; some -> kept until they are final for
    the retention. A blob put within the grace (an accept running) is left be."""
    import hashlib

    from fastsend.wire import blob_ref

    s = make_spool()
    cid = s.create_campaign({})
    now, day, hour = time.time(), 86400.0, 3600.0
    alone, held, fresh = (hashlib.sha256(b).hexdigest() for b in (b"a" * 9, b"b" * 9, b"c" * 9))
    s.put_blob(alone, b"a" * 9, now)  # died before its rows
    s.put_blob(held, b"b" * 9, now)  # died after its rows
    ids = s.add_messages(cid, [(f"r{i}@a.example", "a.example", blob_ref(held))
                               for i in range(3)], now)  # fmt: skip
    other = s.add_messages(cid, [("x@a.example", "a.example", b"{}")], now)
    assert s.sweep_blobs(now + 2 * day, day, grace=hour) == 1  # `alone`: nobody holds it
    assert s.get_blobs([alone, held]) == {held: b"b" * 9}
    s.put_blob(fresh, b"c" * 9, now + 3 * day)  # an accept running now
    assert s.sweep_blobs(now + 3 * day + 60, 1.0, grace=hour) == 0
    assert set(s.get_blobs([held, fresh])) == {held, fresh}
    s.ref_blob(fresh, [])  # that accept ends (it spooled no row)
    s.ref_blob(fresh, [])  # one end too many: the count stays at 0
    s.claim_due(now + 3 * day, 10)
    later = now + 4 * day
    s.record_results([Result(i, DELIVERED, 1, 0, 250, "2.0.0", "ok") for i in ids + other], later)
    assert s.sweep_blobs(later + day / 2, day, grace=hour) == 1  # `fresh`; `held` not for a day
    assert s.get_blobs([held, fresh]) == {held: b"b" * 9}
    assert s.sweep_blobs(later + 2 * day, day, grace=hour) == 1
    assert s.get_blobs([held]) == {} and s.message(ids[0]) is not None
    s.close()
