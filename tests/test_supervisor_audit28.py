"""sup28's audit of the supervisor's per-pass cost (issue 11): the work a
loop turn does must follow the mail handled, not the turns taken.

- ``note_handed`` (a hand-over remembered for a worker's kill -9) walked the
  oldest hand-over's answered ids again at every pass of every window (each
  loop turn, 50 a second, many more during a slow signed send), and noted an
  empty hand-over for a pass that handed nothing.
- A pass that hands a window nothing new gated its held mail again (the
  guardrails' sample full: its groups rebuilt, the sample's ids walked) at
  every loop turn: ~50 ms of CPU a second while a send waited on slow
  receivers (``Dispatch.regate_later``).
- The loop woke every TICK (20 ms) though every window was too full to
  claim and nothing waited to be written: 50 empty passes a second
  (``Supervisor.tick``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests._supervisor_helpers import close_supervisor, handed

from _engine_helpers import CAMPAIGN, spool_rows, write_campaign
from fastsend import config as cfgmod
from fastsend import wire
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.queue import dispatch
from fastsend.queue.dispatch import note_handed
from fastsend.queue.state import WorkerSlot
from fastsend.queue.supervisor import IDLE_TICK, TICK, Supervisor
from fastsend.ring import Ring, WriteLog
from fastsend.spool.base import Claimed
from fastsend.spool.sqlite import SQLiteSpool


class CountingWindow(dict):  # type: ignore[type-arg]
    """A window (id -> claim) counting the ids looked up in it."""

    looked = 0

    def __contains__(self, key: object) -> bool:
        self.looked += 1
        return super().__contains__(key)


def _claims(ids: range) -> list[Claimed]:
    return [Claimed(i, 1, f"u{i}@d.example", "d.example", b"{}", 0, 0.0) for i in ids]


def test_each_answered_id_of_a_hand_over_is_looked_at_about_once() -> None:
    slot = WorkerSlot(index=0, ips=["127.0.0.2"])
    window = slot.inflight = CountingWindow()
    writes = WriteLog(capacity=100_000)
    first = _claims(range(1, 1001))
    for c in first:
        window[c.id] = c
    note_handed(slot, writes, first)
    # The hand-over's first 999 are answered; its last is still out.
    for i in range(1, 1000):
        del window[i]
    window.looked = 0
    passes = 200
    for _ in range(passes):
        note_handed(slot, writes, [])  # passes that hand nothing
    # Before: each pass looked up the 999 answered ids again (~200,000).
    assert window.looked <= 999 + 2 * passes
    # Still remembered, with the id in flight (a kill -9 of the worker now:
    # it counts unknown only if the write log has it).
    assert [ids for _count, ids in slot.handed] == [[1000]]
    # Nothing was noted for the empty passes.
    assert len(slot.handed) == 1


def test_a_hand_over_whose_ids_all_left_is_forgotten_and_later_ones_kept() -> None:
    slot = WorkerSlot(index=0, ips=["127.0.0.2"])
    writes = WriteLog(capacity=100_000)
    a, b = _claims(range(1, 11)), _claims(range(11, 21))
    for c in a + b:
        slot.inflight[c.id] = c
    note_handed(slot, writes, a)
    note_handed(slot, writes, b)
    for i in (1, 2, 3):
        del slot.inflight[i]
    note_handed(slot, writes, [])
    assert [ids for _c, ids in slot.handed] == [list(range(4, 11)), list(range(11, 21))]
    # An id claimed again is in its later hand-over, and still looked up in
    # the first (conservative, as before): the first is kept from it on.
    del slot.inflight[4]
    again = _claims(range(4, 5))
    slot.inflight[4] = again[0]
    for i in range(5, 11):
        del slot.inflight[i]
    note_handed(slot, writes, again)
    assert [ids for _c, ids in slot.handed] == [list(range(4, 11)), list(range(11, 21)), [4]]
    # Once all of the first hand-over's ids left, it is forgotten.
    del slot.inflight[4]
    note_handed(slot, writes, [])
    assert [ids for _c, ids in slot.handed] == [list(range(11, 21)), [4]]


@contextlib.contextmanager
def _sampled_supervisor(
    tmp_path: Path, options: dict[str, Any] | None = None, sample: int = 10
) -> Iterator[Supervisor]:
    """A supervisor (one worker stood in by its rings) whose guardrails'
    sample is ``sample`` (0: the default), its spool holding one campaign of
    40 messages over two domains (``options``: the campaign's)."""
    raw: dict[str, Any] = {
        "spool": {"dir": "spool"},
        "workers": {"count": 1},
        "ips": {"source": ["127.0.0.2"], "helo": "out.example.com"},
    }
    if sample:
        raw["guardrails"] = {"min_sample": sample}
    cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
    spool = SQLiteSpool(cfg.spool_dir)
    spec = Campaign.load(str(write_campaign(tmp_path, CAMPAIGN))).to_dict()
    cid = spool.create_campaign(spec, name="c", options=options)
    spool.add_messages(cid, spool_rows(20, "a.example") + spool_rows(20, "b.example"), time.time())
    sup = Supervisor(cfg, spool, EventLog(None), max_wait=1.0)
    for s in sup.slots:
        s.inbox, s.outbox = Ring(wire.RING_BYTES), Ring(wire.RING_BYTES)
        s.alive = True
    try:
        yield sup
    finally:
        close_supervisor(sup, spool)


def test_a_pass_with_nothing_new_leaves_the_held_rest_until_an_outcome_or_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guardrails' sample full, the rest of the claim held in the window:
    passes that hand the window nothing new and follow no outcome do not gate
    the held rest again (before: every loop turn did, ~50 ms of CPU a second
    while a send waited on slow receivers); an outcome lets the held mail go
    at the next pass, and so does REGATE_EVERY s."""
    monkeypatch.setattr(dispatch, "REGATE_EVERY", 3600.0)
    with _sampled_supervisor(tmp_path) as sup:
        gated = []
        gate = sup.gate
        sup.gate = lambda slot, groups: (gated.append(len(groups)), gate(slot, groups))[1]  # type: ignore[method-assign]
        sup.dispatch(any_room=True)
        slot = sup.slots[0]
        out = handed(sup)
        assert len(out) == 10 and sum(map(len, slot.held.values())) == 30
        gated.clear()
        for _ in range(20):
            sup.dispatch()
        assert gated == []  # before: 20 gatings of the held 30
        assert handed(sup) == []
        # A sample message answered: the next pass lets one held message out.
        sup.apply(slot, [wire.Res(out[0], wire.K_DELIVERED, 250, "2.0.0", "ok", "", "")])
        sup.dispatch()
        assert len(gated) == 1
        assert len(handed(sup)) == 1 and sum(map(len, slot.held.values())) == 29
        sup.dispatch()
        assert len(gated) == 1
        # REGATE_EVERY s after the last gating, a pass gates the held mail again
        # (a sample message out past sample_wait, a campaign paused meanwhile).
        monkeypatch.setattr(dispatch, "REGATE_EVERY", 0.0)
        sup.dispatch()
        assert len(gated) == 2


def test_the_loop_waits_longer_only_while_no_pass_could_hand_anything_out(
    tmp_path: Path,
) -> None:
    """Every window too full to claim, nothing to write, no rate: the loop
    waits for a wake-up up to IDLE_TICK (before: TICK, 50 empty passes a
    second); anything a pass could do sooner keeps it at TICK."""
    with _sampled_supervisor(tmp_path) as sup:
        slot = sup.slots[0]
        assert sup.tick() == TICK  # its window has room: mail may be claimed
        sup.dispatch(any_room=True)
        handed(sup)
        slot.window = 40  # all of it claimed: 10 out, 30 held
        assert sup.tick() == IDLE_TICK
        sup.apply(
            slot,
            [wire.Res(next(iter(slot.inflight)), wire.K_DELIVERED, 250, "2.0.0", "ok", "", "")],
        )
        assert sup.results and sup.tick() == TICK  # an outcome to write
        sup.flush_results()
        assert sup.tick() == IDLE_TICK
        sup.draining = True
        assert sup.tick() == TICK
        sup.draining = False
        slot.alive = False  # (a dead worker is reaped by the clock)
        assert sup.tick() == IDLE_TICK
    with _sampled_supervisor(tmp_path / "rated", {"max_rate": 4}) as sup:
        sup.dispatch(any_room=True)
        sup.slots[0].window = 40
        assert sup.tick() == TICK  # a rate lets held mail go as time passes


