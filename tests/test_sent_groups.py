"""Deliveries on the wire as columns (``wire.Sent``): the worker groups the
messages it delivered by (code, enhanced, MX, source IP), and the supervisor
applies a group as it applied the ``wire.Res`` of each of its messages.

Each twin (compiled, pure) is compared with its reference, and the whole path
(outbox ring, decode, apply, flush to a real SQLite spool and event log) with
the same outcomes sent one ``wire.Res`` per message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from fastsend import _accel, wire
from fastsend.config import Config
from fastsend.delivery import worker as worker_mod
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.outcome import DEFERRED, DELIVERED, FAILED, Outcome, TxnResult
from fastsend.queue import outcomes
from fastsend.queue.supervisor import Supervisor
from fastsend.ring import Ring
from fastsend.spool import Claimed, Result
from fastsend.spool.sqlite import SQLiteSpool

SPEC = {"from": "Sent <news@sender.example.com>", "subject": "Hi {{ name }}", "text": "Hi"}


def _ok(text: str = "Ok", mx: str = "", code: int = 250, enh: str = "2.0.0") -> Outcome:
    return Outcome(DELIVERED, code, enh, text, "data", mx)


def _calls() -> list[tuple[list[TxnResult], str, str]]:
    """Worker.add_results calls (results, source IP, MX) of every shape: groups
    that share a text, texts that differ from some message on, MX from the
    outcome or the connection, codes that differ, results that are not one
    delivery (a failure, a shared message, a tag that is not an int)."""
    return [
        ([TxnResult(1, [_ok()], "Ok"), TxnResult(2, [_ok()], "Ok"), TxnResult(3, [_ok()], "Ok")],
         "127.0.0.2", "sink:25"),
        ([TxnResult(4, [_ok()], "Ok"), TxnResult(5, [_ok("queued as Q5")], "Q5"),
          TxnResult(6, [_ok("")], "Q6"), TxnResult(7, [_ok("")], "")],
         "127.0.0.3", "sink:25"),
        ([TxnResult(8, [_ok()], "Ok")], "127.0.0.2", "sink:25"),  # joins the first group
        ([TxnResult(9, [_ok()], "Ok")], "127.0.0.3", "sink:25"),  # joins the per-text group
        ([TxnResult(10, [_ok(mx="mx1:25")], "Ok"), TxnResult(11, [_ok(mx="mx2:25")], "Ok"),
          TxnResult(12, [_ok(code=251, enh="2.1.5")], "Ok"),
          TxnResult(13, [Outcome(DEFERRED, 451, "4.3.0", "later", "rcpt", "mx1:25")]),
          TxnResult(14, [_ok(mx="mx1:25")], "Ok"),
          TxnResult([15, 16], [_ok(), Outcome(FAILED, 550, "5.1.1", "no user", "rcpt")], "Q"),
          TxnResult("x", [_ok()], "Ok"), TxnResult(17, [_ok(mx="mx1:25")], "Ok")],
         "127.0.0.2", ""),
    ]  # fmt: skip


def _reference_res(calls: list[tuple[list[TxnResult], str, str]]) -> list[wire.Res]:
    """The wire.Res of each delivered message, as a worker sent them before Sent."""
    out = []
    for results, ip, mx in calls:
        for tr in results:
            o = tr.outcomes[0]
            if type(tr.tag) is int and o.kind == DELIVERED:
                out.append(wire.Res(tr.tag, wire.K_DELIVERED, o.code, o.enhanced,
                                    o.text or tr.queue_id, mx or o.mx, ip, "", "", False,
                                    tr.queue_id))  # fmt: skip
    return out


def test_sent_records_round_trip() -> None:
    """A Results record of Res and Sent items (shared text, one text per
    message) decodes to what was encoded; expand gives each message's Res."""
    items: list[Any] = [
        wire.Sent([1, 2, 3], 250, "2.0.0", "mx:25", "127.0.0.2", "Ok", "Ok"),
        wire.Res(4, wire.K_FAILED, 550, "5.1.1", "no user", "mx", "ip", "rcpt", "bad", True, ""),
        wire.Sent([5, 6], 250, "", "mx:25", "127.0.0.3", texts=["a é", "b"], queue_ids=["A", ""]),
        wire.Sent([], 250, "2.0.0", "", ""),
    ]
    rec = wire.encoder.encode(wire.Results(items))
    got = wire.from_worker_decoder.decode(rec)
    assert isinstance(got, wire.Results) and got.items == items
    assert [type(x) for x in got.items] == [wire.Sent, wire.Res, wire.Sent, wire.Sent]
    assert wire.expand(got.items) == [
        wire.Res(1, 0, 250, "2.0.0", "Ok", "mx:25", "127.0.0.2", queue_id="Ok"),
        wire.Res(2, 0, 250, "2.0.0", "Ok", "mx:25", "127.0.0.2", queue_id="Ok"),
        wire.Res(3, 0, 250, "2.0.0", "Ok", "mx:25", "127.0.0.2", queue_id="Ok"),
        items[1],
        wire.Res(5, 0, 250, "", "a é", "mx:25", "127.0.0.3", queue_id="A"),
        wire.Res(6, 0, 250, "", "b", "mx:25", "127.0.0.3", queue_id=""),
    ]


@pytest.mark.parametrize("impl", ["py", "c"])
def test_collect_delivered_groups_every_delivery(impl: str) -> None:
    """collect_delivered (either twin) puts each delivery into the Sent group of
    its (code, enhanced, MX, source IP) among those at the end of the list,
    joining an earlier call's, never one before a Res; expanded, the groups
    are each message's Res as the worker made them one by one; the twins make
    the same groups."""
    fn = worker_mod.py_collect_delivered if impl == "py" else _accel.compiled("collect_delivered")
    calls = _calls()
    out: list[Any] = []
    ref: list[Any] = []
    for results, ip, mx in calls:
        i = fn(results, 0, out, ip, mx)
        j = worker_mod.py_collect_delivered(results, 0, ref, ip, mx)
        assert i == j
        while i < len(results):  # what add_results does with the one it stops at
            out.append(wire.Res(-1, wire.K_FAILED, 0, "", "", "", ""))
            ref.append(wire.Res(-1, wire.K_FAILED, 0, "", "", "", ""))
            i = fn(results, i + 1, out, ip, mx)
            j = worker_mod.py_collect_delivered(results, j + 1, ref, ip, mx)
            assert i == j
    assert out == ref
    assert all(type(x) is wire.Res for x in out if type(x) is not wire.Sent)
    sent = [x for x in out if type(x) is wire.Sent]
    assert [g.ids for g in sent][:2] == [[1, 2, 3, 8], [4, 5, 6, 7, 9]]
    assert sent[0].text == "Ok" and sent[0].texts == [] and sent[0].queue_id == "Ok"
    assert sent[1].text == "" and sent[1].texts == ["Ok", "queued as Q5", "Q6", "", "Ok"]
    assert sent[1].queue_ids == ["Ok", "Q5", "Q6", "", "Ok"]
    got = sorted((r for r in wire.expand(out) if r.id != -1), key=lambda r: r.id)
    assert got == sorted(_reference_res(calls), key=lambda r: r.id)
    # Order kept within a run of deliveries' groups, and across a Res.
    ids = [r.id for r in wire.expand(out)]
    assert ids.index(-1) < ids.index(14) and ids.index(10) < ids.index(-1)


def _inflight() -> dict[int, Claimed]:
    return {i: Claimed(i, i % 3, f"u{i}@x.example", "x.example", b"{}", i % 2, 1.0)
            for i in range(0, 40) if i % 11 != 5}  # fmt: skip


def test_apply_sent_twins_agree() -> None:
    """fastsend._core.apply_sent takes the same claims, makes the same Results,
    counts, events and hook calls as the reference, for groups sharing a text
    and with one each, and skips messages whose claim is gone."""
    groups = [
        wire.Sent(list(range(0, 20)), 250, "2.0.0", "mx", "127.0.0.2", "Ok", "Ok"),
        wire.Sent(list(range(20, 40)), 250, "2.0.0", "mx", "127.0.0.3",
                  texts=[f"ok {i}" for i in range(20)], queue_ids=[f"Q{i}" for i in range(20)]),
    ]  # fmt: skip

    def run(fn: Any, events: bool, raising: bool) -> Any:
        inflight = _inflight()
        seen: list[Any] = []
        failed: list[Any] = []

        def hook(c: Any, r: Any, state: int) -> None:
            seen.append((c.id, r, state))
            if raising and c.id % 7 == 0:
                raise RuntimeError("hook bug")

        results: list[Any] = []
        claims: list[Any] | None = [] if events else None
        answers: list[Any] = []
        delivered: dict[int, int] = {}
        counts = [0, 0]
        make = (Result, 4, wire.K_DELIVERED, wire.Sent, wire.Res)
        for g in groups:
            fn(g, inflight.pop, [hook], failed.append, make, results, claims, answers,
               delivered, counts)  # fmt: skip
        assert all(f is hook for f in failed)
        return results, claims, answers, delivered, counts, seen, len(failed), sorted(inflight)

    for events in (True, False):
        for raising in (True, False):
            want = run(outcomes.py_apply_sent, events, raising)
            assert run(_accel.compiled("apply_sent"), events, raising) == want
            results, _claims, answers, _delivered, counts, seen, _nf, left = want
            assert counts == [36, 36] and left == [] and len(results) == 36
            assert all(type(r) is wire.Res and r.kind == wire.K_DELIVERED for _c, r, _s in seen)
            if events:
                assert answers[0] is groups[0] and answers[-1].text == "ok 19"


@pytest.mark.parametrize("impl", ["py", "c"])
def test_sent_groups_apply_as_their_messages_res(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """Through the outbox ring, decode, apply and flush (a real SQLite spool and
    event log): a worker's records with Sent groups leave the spool rows, the
    event lines (but their time), the run's counts and the windows as the same
    outcomes sent one wire.Res per message."""
    if impl == "py":
        monkeypatch.setattr(outcomes, "apply_delivered", outcomes.py_apply_delivered)
        monkeypatch.setattr(outcomes, "apply_sent", outcomes.py_apply_sent)
    calls = _calls()
    grouped: list[Any] = []
    for results, ip, mx in calls:
        i = worker_mod.collect_delivered(results, 0, grouped, ip, mx)
        while i < len(results):  # the others, as add_results answers them
            tr = results[i]
            for k, mid in enumerate(tr.tag if isinstance(tr.tag, list) else [tr.tag]):
                o = tr.outcomes[k]
                if type(mid) is int:
                    kind = wire.K_DELIVERED if o.kind == DELIVERED else (
                        wire.K_FAILED if o.kind == FAILED else wire.K_DEFERRED)  # fmt: skip
                    grouped.append(wire.Res(mid, kind, o.code, o.enhanced, o.text, mx or o.mx,
                                            ip, o.stage, "", False, tr.queue_id))  # fmt: skip
            i = worker_mod.collect_delivered(results, i + 1, grouped, ip, mx)
    assert any(type(x) is wire.Sent for x in grouped)

    def run(name: str, records: list[list[Any]]) -> tuple[Any, ...]:
        cfg = Config(spool_dir=str(tmp_path / name), workers=1)
        spool = SQLiteSpool(cfg.spool_dir)
        cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict())
        rows = [(f"u{i}@d{i % 3}.example", f"d{i % 3}.example", b"{}") for i in range(20)]
        ids = spool.add_messages(cid, rows, 1.0)
        assert ids == list(range(1, 21))
        events = EventLog(cfg.event_log_path)
        sup = Supervisor(cfg, spool, events)
        try:
            slot = sup.slots[0]
            slot.outbox = Ring(1 << 20)
            claimed = spool.claim_next(2.0, 100)
            for c in claimed:
                slot.inflight[c.id] = c
            for items in records:
                assert slot.outbox.put(wire.encoder.encode(wire.Results(items)))
            sup.drain_outbox(slot, slot.outbox)
            sup.flush_results()
            events.flush()
            state = spool.db.execute(
                "SELECT id, state, attempts, last_code, last_enhanced FROM messages ORDER BY id"
            ).fetchall()
            with open(cfg.event_log_path, "rb") as f:
                lines = [orjson.loads(x) for x in f.read().splitlines()]
            for e in lines:
                e.pop("time")
            st = sup.stats
            return (state, lines, (st.attempts, st.delivered, st.deferred, st.bounced),
                    sorted(slot.inflight))  # fmt: skip
        finally:
            sup.suppression.close()
            events.close()
            spool.close()

    a = run("grouped", [grouped[:3], grouped[3:]])
    b = run("flat", [wire.expand(grouped[:3]), wire.expand(grouped[3:])])
    assert a == b
    assert a[2][1] >= 12 and any(e["event"] == "delivered" for e in a[1])


def test_a_group_stands_for_its_messages_answers_in_events_and_rollups() -> None:
    """A Sent group whose messages share their text is each message's answer in
    a DeliveredRows batch: its JSON lines (both twins) and the rollups' counts
    (both twins) are those of the messages' own Res."""
    from fastsend import events as ev_mod
    from fastsend.analytics import rollup

    g1 = wire.Sent(list(range(0, 10)), 250, "2.0.0", "mx1:25", "127.0.0.2", "Ok", "Ok")
    g2 = wire.Sent(list(range(10, 16)), 250, "2.0.0", "", "127.0.0.3", "queued", "")
    claims = [Claimed(i, 1 + i % 2, f"u{i}@d{i % 3}.example", f"d{i % 3}.example", b"{}", 0, 1.0)
              for i in range(16)]  # fmt: skip
    answers = [g1] * 10 + [g2] * 6
    res = wire.expand([g1, g2])
    want = ev_mod.py_delivered_lines(5.0, claims, res)
    assert b'"queue_id":"Ok"' in want and want.count(b"\n") == 16
    for lines in (ev_mod.py_delivered_lines, _accel.compiled("delivered_lines")):
        assert lines(5.0, claims, answers) == want
    # Groups and Res interleaved, the same group again after another answer.
    mixed = [g1, g1, res[2], g1, g2, g2, res[11], g1, g2, res[0], res[0]] + [g2] * 5
    own = [r if type(r) is wire.Res else wire.Res(c.id, 0, r.code, r.enhanced, r.text, r.mx,
                                                   r.source_ip, queue_id=r.queue_id)
           for c, r in zip(claims, mixed, strict=True)]  # fmt: skip
    want = ev_mod.py_delivered_lines(5.0, claims, own)
    assert _accel.compiled("delivered_lines")(5.0, claims, mixed) == want
    for count in (rollup.py_count_delivered, _accel.compiled("count_delivered")):
        acc_a: dict[Any, list[int]] = {}
        acc_b: dict[Any, list[int]] = {}
        rem_a: list[Any] = []
        rem_b: list[Any] = []
        count(65.0, claims, answers, acc_a, rem_a, 4, 1)
        rollup.py_count_delivered(65.0, claims, res, acc_b, rem_b, 4, 1)
        assert acc_a == acc_b and rem_a == rem_b and sum(r[1] for r in acc_a.values()) == 16


def test_a_drain_applies_consecutive_results_together_in_order(tmp_path: Path) -> None:
    """drain_outbox applies the items of consecutive Results records in one
    apply (one DeliveredRows), and another record between them keeps its place:
    the events come out in the order the worker wrote them."""
    cfg = Config(spool_dir=str(tmp_path / "s"), workers=1)
    spool = SQLiteSpool(cfg.spool_dir)
    cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict())
    spool.add_messages(cid, [(f"u{i}@d.example", "d.example", b"{}") for i in range(6)], 1.0)
    events = EventLog(cfg.event_log_path)
    sup = Supervisor(cfg, spool, events)
    try:
        slot = sup.slots[0]
        slot.outbox = Ring(1 << 20)
        for c in spool.claim_next(2.0, 100):
            slot.inflight[c.id] = c
        sent = [wire.Sent([i], 250, "2.0.0", "mx", "127.0.0.2", "Ok", "") for i in range(1, 7)]
        failover = {"event": "failover", "id": 3}
        for rec in (wire.Results(sent[:1]), wire.Results(sent[1:2]), wire.Events([failover]),
                    wire.Results(sent[2:4]), wire.Results(sent[4:])):  # fmt: skip
            assert slot.outbox.put(wire.encoder.encode(rec))
        sup.drain_outbox(slot, slot.outbox)
        buf = sup.event_buf
        assert [x["event"] if isinstance(x, dict) else len(x) for x in buf] == [2, "failover", 4]
        assert sup.stats.delivered == 6 and not slot.inflight
        sup.flush_results()
        events.flush()
        with open(cfg.event_log_path, "rb") as f:
            lines = [orjson.loads(x) for x in f.read().splitlines()]
        assert [(e["event"], e["id"]) for e in lines] == [
            ("delivered", 1), ("delivered", 2), ("failover", 3), ("delivered", 3),
            ("delivered", 4), ("delivered", 5), ("delivered", 6)]  # fmt: skip
    finally:
        sup.suppression.close()
        events.close()
        spool.close()
