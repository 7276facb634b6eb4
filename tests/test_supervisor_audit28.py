"""sup28's audit of the supervisor's per-pass cost (issue 11): the work a
loop turn does must follow the mail handled, not the turns taken.

- ``note_handed`` (a hand-over remembered for a worker's kill -9) walked the
  oldest hand-over's answered ids again at every pass of every window (each
  loop turn, 50 a second, many more during a slow signed send), and noted an
  empty hand-over for a pass that handed nothing."""

from __future__ import annotations

from fastsend.queue.dispatch import note_handed
from fastsend.queue.state import WorkerSlot
from fastsend.ring import WriteLog
from fastsend.spool.base import Claimed


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
