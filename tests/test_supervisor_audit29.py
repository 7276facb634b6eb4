"""sup29's audit of the supervisor's passes (issue 11): a loop whose windows
have room but find nothing due waited only TICK (20 ms) between passes, so a
serve at rest, or a send whose mail was all deferred, made 50 passes a second
that claimed nothing (~27 ms of CPU a second, bench/supervisor_idle.py
--deferred). It now waits until the spool's next due time, at most
IDLE_TICK, and is woken at once by mail accepted in its process."""

from __future__ import annotations

import time
from pathlib import Path

from tests._supervisor_helpers import handed as _handed

from _engine_helpers import spool_rows
from fastsend.accept import Acceptor
from fastsend.queue.supervisor import IDLE_TICK, TICK
from fastsend.spool.base import DEFERRED, Result
from test_supervisor_audit28 import _sampled_supervisor


def test_a_window_with_room_and_nothing_due_waits_for_the_next_due_time(
    tmp_path: Path,
) -> None:
    with _sampled_supervisor(tmp_path, sample=0) as sup:
        spool = sup.spool
        slot = sup.slots[0]
        sup.dispatch(any_room=True)
        ids = _handed(sup)
        assert len(ids) == 40 and slot.room > 0  # all of it claimed, room left
        later = time.time() + 3600
        spool.record_outcomes(_deferred(ids, later), time.time())
        for i in ids:
            slot.inflight.pop(i, None)
        sup.dispatch()  # finds nothing due
        assert not _handed(sup)
        assert sup.tick() == IDLE_TICK  # before: TICK, with room and nothing due
        # Mail due soon: the loop is there for it, no later.
        soon = time.time() + IDLE_TICK / 2
        spool.record_outcomes(_deferred(ids[:1], soon), time.time())
        assert TICK <= sup.tick() <= IDLE_TICK / 2
        spool.record_outcomes(_deferred(ids[:1], later), time.time())
        # Mail due now that a pass could not claim yet: the old pace.
        spool.record_outcomes(_deferred(ids[1:2], time.time() - 1), time.time())
        assert sup.tick() == TICK
        sup.dispatch()  # claimed: nothing due again
        assert _handed(sup) == ids[1:2]
        assert sup.tick() == IDLE_TICK
        # The time read is not kept past a change: rows spooled are due at once.
        spool.add_messages(1, spool_rows(1, "c.example"), time.time())
        assert sup.tick() == TICK


def test_mail_accepted_in_the_process_wakes_the_waiting_loop(tmp_path: Path) -> None:
    with _sampled_supervisor(tmp_path) as sup:
        sup.dispatch(any_room=True)
        _handed(sup)
        sup.wake.clear()
        acceptor = Acceptor(sup.spool, sup.events, None, wake=sup.wake.set)
        acceptor.accept(1, spool_rows(1, "c.example"))
        assert sup.wake.is_set()


def _deferred(ids: list[int], at: float) -> list[Result]:
    """Each of ``ids`` deferred until ``at``."""
    return [Result(i, DEFERRED, 1, at, 451, "4.3.0", "later") for i in ids]
