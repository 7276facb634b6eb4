"""The active window: how much a worker may hold (claimed and not yet written
back), how the default is sized, and how mail reaches a worker while a list is
still being read (``fastsend send``'s feeder, paced by dispatch).

The integration test runs the real engine (supervisor, forked uvloop workers,
rings, a SQLite spool, a sink on loopback) and asserts structure at every
dispatch pass, never speed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastsend import config as cfgmod
from fastsend.config.engine import WINDOW_MIN, WINDOW_PIPELINES
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.queue import supervisor as supmod
from fastsend.queue.supervisor import Supervisor
from fastsend.sink import SinkThread
from fastsend.spool.sqlite import SQLiteSpool

SPEC = {
    "from": "Window Test <news@sender.example.com>",
    "subject": "Hello {{ name }}",
    "text": "Hi {{ name }}, this is the window test.",
}
RUN_LIMIT = 60.0  # seconds; only a hang reaches it


def make_config(tmp: Path, sink: SinkThread | None = None, **tables: Any) -> cfgmod.Config:
    raw: dict[str, Any] = {
        "spool": {"dir": "spool"},
        "workers": {"count": 2},
        "ips": {"source": ["127.0.0.2", "127.0.0.3"], "helo": "out.example.com"},
    }
    if sink is not None:
        raw["routes"] = {"*": f"{sink.host}:{sink.port}"}
    for name, table in tables.items():
        raw[name] = {**raw.get(name, {}), **table}
    return cfgmod.from_dict(raw, base_dir=str(tmp))


# -- the default window ----------------------------------------------------------


def test_default_window_covers_what_the_connections_keep_in_flight(tmp_path: Path) -> None:
    """[delivery] window = 0 (the default): each worker's window is
    WINDOW_PIPELINES times what its connections to one site can have in flight
    (max_connections per source IP x pipeline), never under WINDOW_MIN, so the
    connections can be full with the next claim on its way and mail rendered
    and ready; a window set in the config is taken as it is."""
    assert cfgmod.Config().delivery.window == 0
    four = make_config(
        tmp_path, ips={"source": [f"127.0.0.{i}" for i in range(2, 6)]}, workers={"count": 2}
    )
    d = four.delivery
    per_worker = d.max_connections * d.pipeline * 2  # two source IPs each
    assert [four.window_for(i) for i in range(2)] == [WINDOW_PIPELINES * per_worker] * 2
    assert four.window_for(0) > WINDOW_MIN
    # Three IPs on two workers: two and one; each window follows its own IPs.
    three = make_config(
        tmp_path,
        ips={"source": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]},
        delivery={"max_connections": 40, "pipeline": 50},
    )
    assert three.window_for(0) == WINDOW_PIPELINES * 40 * 50 * 2
    assert three.window_for(1) == WINDOW_PIPELINES * 40 * 50
    # No source IP of its own (the system's address): one IP's worth, at least the floor.
    small = make_config(tmp_path, ips={"source": []}, delivery={"pipeline": 4})
    assert small.window_for(0) == WINDOW_MIN
    fixed = make_config(tmp_path, delivery={"window": 300})
    assert [fixed.window_for(i) for i in range(2)] == [300, 300]
    sup = Supervisor(four, SQLiteSpool(str(tmp_path / "s2")), EventLog(None))
    assert [s.window for s in sup.slots] == [four.window_for(0), four.window_for(1)]
    asyncio.run(sup.reload(fixed))  # a reload's window applies to the next claims
    assert [s.window for s in sup.slots] == [300, 300]
    sup.spool.close()
    sup.suppression.close()
    with pytest.raises(cfgmod.ConfigError):
        make_config(tmp_path, delivery={"window": -1})


# -- one window short of mail reads the list on ------------------------------------


def test_one_window_with_a_quarter_free_reads_the_next_chunk(tmp_path: Path) -> None:
    """While a list is read, a claim that found nothing due with a quarter of
    its window open asks the feeder for the next chunk at once, whatever the
    other windows hold: waiting for a chunk's worth of room across all of them
    let this worker's ready queue run dry while another's window was full."""
    cfg = make_config(tmp_path, delivery={"window": 1000})
    spool = SQLiteSpool(cfg.spool_dir)
    sup = Supervisor(cfg, spool, EventLog(None))
    try:
        a, b = sup.slots
        sup.note_room(b, 0)  # the other window is full
        sup.note_room(a, 249)  # under a quarter open: its claim took mail
        assert not sup.feed_room.is_set()
        sup.note_room(a, 250)  # a quarter open and nothing came: read on
        assert sup.feed_room.is_set()
        sup.feed_room.clear()
        sup.open_room.clear()
        # Small rooms in several windows add up to a chunk's worth too.
        big = make_config(tmp_path, delivery={"window": 100_000})
        sup2 = Supervisor(big, spool, EventLog(None))
        sup2.note_room(sup2.slots[0], 1000)
        assert not sup2.feed_room.is_set()
        sup2.note_room(sup2.slots[1], 1000)
        assert sup2.feed_room.is_set()
        sup2.suppression.close()
    finally:
        sup.suppression.close()
        spool.close()


def test_a_chunk_is_parked_in_the_room_the_windows_have_now(tmp_path: Path) -> None:
    """Before the feeder reads a chunk, every window with room claims
    (``dispatch(any_room=True)``): with nothing due, each one's room as it is
    now is recorded with the spool, so the chunk's rows go in flight straight
    into it (parked), not only into the room the windows had at their last
    claims (a window claims once a quarter of it is free: the room it freed
    since was not on record, and rows beyond the recorded room were queued,
    to be found by a SELECT and marked by an UPDATE)."""
    from fastsend import wire
    from fastsend.ring import Ring
    from fastsend.spool import Claimed

    cfg = make_config(tmp_path, delivery={"window": 1000})
    spool = SQLiteSpool(cfg.spool_dir)
    sup = Supervisor(cfg, spool, EventLog(None))
    try:
        sup.feeding = sup.pace_feed = True
        cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict())
        now = time.time()
        for slot, held in zip(sup.slots, (900, 800), strict=True):
            slot.inbox, slot.outbox = Ring(wire.RING_BYTES), Ring(wire.RING_BYTES)
            slot.alive = True
            for i in range(held):  # the window's claims, answers still to come
                k = -(slot.index * 10_000 + i + 1)
                slot.inflight[k] = Claimed(k, cid, "x@y.example", "y.example", b"{}", 0, now)
            assert spool.claim_next(now, 0, slot.index) == []  # its last claim: full
        sup.dispatch()  # under a quarter free (100, 200 of 1000): no claim, no record
        rows = [(f"u{i}@d.example", "d.example", b"{}") for i in range(500)]
        spool.add_messages(cid, rows[:50], now)
        assert spool.counts(cid)["inflight"] == 0  # no room on record: queued
        sup.dispatch(any_room=True)  # what _feed does before a chunk: every room claims
        assert sum(len(s.inflight) for s in sup.slots) == 1750  # the 50 queued: claimed
        spool.add_messages(cid, rows[50:], now)
        counts = spool.counts(cid)
        # the 50 claimed, and the rooms as they were after that claim (250 in
        # all) taken by the new rows: the rest queued
        assert counts["inflight"] == 50 + 250 and counts["queued"] == 200
        sup.dispatch(any_room=True)  # the parked rows handed out, up to each room
        assert [len(s.inflight) for s in sup.slots] == [1000, 1000]
    finally:
        sup.suppression.close()
        spool.close()


# -- the window's bound while a list is read ---------------------------------------


def test_a_window_never_holds_more_than_its_size_while_a_list_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list read by the feeder in chunks while two workers deliver to a sink
    that answers slowly: after every dispatch pass, each worker's claimed and
    not yet written messages stay within its window, and the windows fill up.
    The feeder's fallback (a chunk a second later) is turned off: every chunk
    after the first must be read because a window asked for mail, or the run
    hangs. Every message is delivered exactly once."""
    n, window, chunk = 3000, 200, 150
    passes: list[tuple[int, int, int]] = []  # (slot, held, window) after each pass
    over: list[str] = []
    monkeypatch.setattr(supmod, "FEED_LAG", 3600.0)

    class Watched(Supervisor):
        def dispatch(self, any_room: bool = False) -> None:
            super().dispatch(any_room)
            for s in self.slots:
                held = len(s.inflight) + s.unwritten + self.spool.held(s.index)
                passes.append((s.index, held, s.window))
                if held > s.window:
                    over.append(f"slot {s.index}: {held} > {s.window}")

    with SinkThread(latency_ms=5) as sink:
        cfg = make_config(
            tmp_path,
            sink,
            delivery={"window": window, "batch_size": 20, "pipeline": 5, "max_connections": 2},
        )
        spool = SQLiteSpool(cfg.spool_dir)
        cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict(), name="window")
        rcpts = [f"u{i}@d{i % 7}.example" for i in range(n)]
        reads: list[int] = []

        def feeder() -> Iterator[None]:
            for at in range(0, n, chunk):
                reads.append(at)
                part = rcpts[at : at + chunk]
                rows = [(r, r.rpartition("@")[2], orjson.dumps({"name": r})) for r in part]
                spool.add_messages(cid, rows, time.time())
                yield None

        events = EventLog(cfg.event_log_path)
        sup = Watched(cfg, spool, events, until_idle=True, max_wait=5.0, feeder=feeder())

        async def main() -> None:
            task = asyncio.ensure_future(sup.run())
            done, _ = await asyncio.wait({task}, timeout=RUN_LIMIT)
            if not done:
                sup.on_signal(signal.SIGINT)
                await task
                pytest.fail(f"no end within {RUN_LIMIT} s (a hang)")
            task.result()

        try:
            with asyncio.Runner() as r:
                r.run(main())
        finally:
            events.close()
        got = sorted(r for m in sink.messages for r in m.recipients)
    assert not over, over[:5]
    assert passes and max(h for _s, h, _w in passes) <= window
    # The windows filled up (the bound was reached, not trivially kept).
    assert max(h for _s, h, _w in passes) >= window // 2
    assert len(reads) == -(-n // chunk)
    assert got == sorted(rcpts)
    assert spool.counts(cid)["delivered"] == n
    spool.close()


def test_a_reload_hands_on_what_a_reaped_worker_left(tmp_path: Path) -> None:
    """A reload's new worker starts where the worker it replaces left its lanes
    and provider queues (wire.Lanes), even when that worker, idle, answered
    wire.Retire and exited, and the supervisor's reap took it out of its
    retired list before the reload looked again: on a loaded host the new
    worker started with fresh provider queues and sent into a provider's 429
    pause (a CI failure of test_serve_reload's retry-after test)."""
    from fastsend import wire
    from fastsend.queue.state import WorkerSlot
    from fastsend.ring import Ring

    cfg = make_config(tmp_path)
    sup = Supervisor(cfg, SQLiteSpool(cfg.spool_dir), EventLog(None))
    try:
        pause = (time.monotonic() + 300, 0.0, 0, 300.0)
        lane = wire.LaneState("", "x.example", time.monotonic(), [(10.0, 5, 2.0)])

        def detach(slot: WorkerSlot) -> WorkerSlot:
            # It answered (conns), exited and was reaped: no longer in sup.retired.
            return WorkerSlot(slot.index, list(slot.ips), conns=[], lanes=[lane],
                              providers={"sg": pause})  # fmt: skip

        started: list[tuple[int, wire.Lanes | None]] = []

        def spawn(slot: WorkerSlot, olds: Any = ()) -> None:
            started.append((slot.index, sup.bequest(slot.index, olds)))

        for slot in sup.slots:
            slot.alive, slot.inbox = True, Ring(4096)
        sup.detach = detach  # type: ignore[method-assign]
        sup.spawn = spawn  # type: ignore[method-assign]
        asyncio.run(sup.reload(make_config(tmp_path)))
        assert [i for i, _ in started] == [0, 1]
        for index, left in started:
            assert left is not None, index
            assert left.providers == {"sg": pause}
            assert [(st.site, st.buckets) for st in left.lanes] == [("x.example", [(10.0, 5, 2.0)])]
    finally:
        sup.spool.close()
        sup.suppression.close()
