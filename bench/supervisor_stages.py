"""The supervisor's CPU per message, stage by stage, in one process and without
the network: the real code paths of `fastsend send`'s supervisor, driven here.

A list of N personalised recipients (the rows bench/end_to_end.py sends) is
read and spooled as `fastsend send` does (the acceptor's ingest job, with the
analytics rollups attached to the event log as the engine attaches them): the
first chunk before the supervisor starts, the next ones as its claims come
back short (the supervisor's feeder is paced by dispatch; on SQLite the rows
read go straight to the windows' room, parked in flight). A real
``Supervisor`` (not started: no fork, no event loop) dispatches onto real
inbox rings, a stand-in worker answers --per-round of the messages it holds
per tick with Results records of "250 delivered" outcomes on the outbox ring,
encoded as the tree's worker encodes them (its collect_delivered; 16 per
connection, 64 per record; --unique-text: each reply its own queue id)
(untimed: that is the worker's cost; its window stays nearly full, as a
running worker's does), and the supervisor drains the rings, applies the
outcomes and flushes them (spool, event log, listeners), round after round
until the list is read and the spool is empty. Each stage is CPU time
(process_time) of the calls the supervisor makes, per message:

    read CSV        the ingest's reading: parse rows, check addresses, vars JSON
    insert          spool.add_messages (multi-row INSERT, durable commit; parked rows)
    accept events   the `accepted` events: JSON lines, listeners
    accept other    the rest of Acceptor.accept (suppression, event dicts, blobs)
    claim           spool.claim_next (parked rows first, then SELECT + UPDATE)
    screen          dispatch-time suppression lookup (one per tenant per claim)
    batch encode    batch records (msgpack) onto the inbox ring
    dispatch other  the rest of dispatch (grouping, rate gate, backlog)
    results decode  outbox records decoded (msgpack)
    apply           next state per message, hooks (guardrail counters), events built
    outcome writes  spool.record_results (deliveries by id runs, others by VALUES)
    event JSON      outcome events encoded as JSON lines
    listeners       event listeners (analytics rollups, the supervisor's own)
    flush other     the rest of flush_results (event file write, ...)

The goal (issue 11) is the supervisor at <= 10 us per message; the baseline
is that goal, and the ratio is printed. The whole-command figures (with
workers, a real SMTP receiver and smtp-source beside it) are
bench/end_to_end.py's. Exits non-zero if a message was not delivered.

    python bench/supervisor_stages.py              # 100,000 messages, 3 repeats
    python bench/supervisor_stages.py --quick      # 20,000
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _common import fmt_mr, machine, median_range
from end_to_end import write_inputs

GOAL_US = 10.0
STAGES = [
    "read CSV",
    "insert",
    "accept events",
    "accept other",
    "claim",
    "screen",
    "batch encode",
    "dispatch other",
    "results decode",
    "apply",
    "outcome writes",
    "event JSON",
    "listeners",
    "flush other",
]


class Clock:
    """CPU seconds per stage; ``wrap`` times a callable under a stage name
    (nested stages are subtracted from the one around them). The clock's own
    reads are not the supervisor's: ``time.process_time`` is a system call
    (~3 us on a VM without a vDSO CPU clock, ~0.25 calls per message here, an
    us per message or more charged to the stages before), so each timed call's
    cost, measured by :meth:`calibrate`, is taken off its stage (the part
    inside its own window) and off the stage around it (the rest)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)  # timed calls per stage
        self.inner_calls: dict[str, int] = defaultdict(int)  # timed calls nested in it
        self.stack: list[list[Any]] = []  # per open call: [nested seconds, stage]
        self.own = self.outer = 0.0  # a timed call's cost to its stage, to the one around

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            inner: list[Any] = [0.0, name]
            self.stack.append(inner)
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.process_time() - t0
                self.stack.pop()
                self.t[name] += dt - inner[0]
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1][0] += dt
                    self.inner_calls[self.stack[-1][1]] += 1

        return timed

    def calibrate(self, k: int = 20_000) -> None:
        """The cost of a timed call with nothing in it, to itself and to the
        stage around it (medians of 5 rounds of ``k``)."""
        own, outer = [], []
        for _ in range(5):
            c = Clock()
            noop = c.wrap("noop", lambda: None)
            bare = c.wrap("bare", lambda: [None for _ in range(k)])
            nested = c.wrap("nested", lambda f=noop: [f() for _ in range(k)])
            bare()
            nested()
            own.append(c.t["noop"] / k)
            outer.append((c.t["nested"] - c.t["bare"]) / k)
        self.own, self.outer = sorted(own)[2], sorted(outer)[2]

    def stages(self) -> dict[str, float]:
        """CPU seconds per stage, less the clock's own reads."""
        return {
            k: t - self.calls[k] * self.own - self.inner_calls[k] * self.outer
            for k, t in self.t.items()
        }


class TimedEvents:
    """The acceptor's event log: its emit_many and flush timed as "accept events"."""

    def __init__(self, events: Any, clock: Clock) -> None:
        self.emit_many = clock.wrap("accept events", events.emit_many)
        if hasattr(events, "emit_rows"):  # a tree with Rows batches (accepted events)
            self.emit_rows = clock.wrap("accept events", events.emit_rows)
        self.flush = clock.wrap("accept events", events.flush)
        self._events = events

    def __getattr__(self, name: str) -> Any:  # the rest (failing, ...) as the log has it
        return getattr(self._events, name)


class TimedDecoder:
    def __init__(self, dec: Any, clock: Clock) -> None:
        self.decode = clock.wrap("results decode", dec.decode)


TEXT = "2.0.0 Ok: queued as 4XyZ1b2c3d"
CONN = 16  # messages answered together on one connection (one Worker.add_results call)


def answers(ids: list[int], ips: list[str], unique: bool) -> list[Any]:
    """A Results record's items for ``ids``, all delivered, as the tree's worker
    makes them (its collect_delivered, untimed): ``CONN`` messages per
    connection, the connections' source IPs in turn; ``unique``: each reply
    names its own queue id (a real MTA's), else every reply is the same."""
    from fastsend.delivery.worker import collect_delivered
    from fastsend.outcome import DELIVERED, Outcome, TxnResult

    out: list[Any] = []
    for k in range(0, len(ids), CONN):
        ip = ips[(k // CONN) % len(ips)]
        txns = []
        for mid in ids[k : k + CONN]:
            qid = f"4XyZ{mid:07d}" if unique else "4XyZ1b2c3d"
            text = f"2.0.0 Ok: queued as {qid}" if unique else TEXT
            txns.append(TxnResult(mid, [Outcome(DELIVERED, 250, "2.0.0", text)], qid))
        collect_delivered(txns, 0, out, ip, "127.0.0.1")
    return out


def one_run(n: int, tmp: str, tag: str, per_round: int, unique: bool) -> dict[str, float]:
    from fastsend import wire
    from fastsend.accept import Acceptor
    from fastsend.analytics.attach import attach
    from fastsend.config import Config
    from fastsend.events import EventLog
    from fastsend.message import Campaign
    from fastsend.queue import supervisor as supmod
    from fastsend.ring import Ring
    from fastsend.spool import open_spool

    camp_path, rcpts = write_inputs(tmp, n, 4096)
    cfg = Config()
    cfg.spool_dir = os.path.join(tmp, f"spool-{tag}")
    cfg.workers = 2
    cfg.source_ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    spool = open_spool(cfg.spool_dir)
    events = EventLog(cfg.event_log_path)
    try:  # as the engine attaches them for `fastsend send`
        rollups = attach(cfg, spool, events, engagement=False)
    except TypeError:  # a tree from before `engagement`
        rollups = attach(cfg, spool, events)
    clock = Clock()

    # -- accept (read, insert, accepted events) and deliver, as `fastsend send`
    # runs them: the list's first chunk before the supervisor starts, the next
    # ones read as the dispatcher's claims come back short (Supervisor._feed,
    # paced by dispatch); a real Supervisor (not started: no fork, no event
    # loop) on real inbox rings, stand-in workers (untimed) on the other side.
    acceptor = Acceptor(spool, TimedEvents(events, clock), None)
    spec = Campaign.load(camp_path).to_dict()
    cid = acceptor.create_campaign(spec, name="stages")
    job = acceptor.start_ingest(cid, rcpts)
    spool.add_messages = clock.wrap("insert", spool.add_messages)  # type: ignore[method-assign]
    acceptor.accept = clock.wrap("accept other", acceptor.accept)  # type: ignore[method-assign]
    feed = acceptor.ingest(job)
    step = clock.wrap("read CSV", lambda: next(feed, None))  # what accept() does not
    step()
    sup = supmod.Supervisor(cfg, spool, events, max_wait=1.0)
    paced = hasattr(sup, "feed_room")  # older trees read the whole list first
    if paced:
        sup.feeding = sup.pace_feed = True
    else:
        while step() is not None:
            pass
    for slot in sup.slots:
        slot.inbox, slot.outbox = Ring(wire.RING_BYTES), Ring(wire.RING_BYTES)
        slot.alive = True
    sp = sup.spool
    sp.claim_next = clock.wrap("claim", sp.claim_next)  # type: ignore[method-assign]
    sp.record_results = clock.wrap("outcome writes", sp.record_results)  # type: ignore[method-assign]
    for name in ("record_outcomes", "told"):  # a tree's outcome writes and their events told
        if hasattr(sp, name):
            setattr(sp, name, clock.wrap("outcome writes", getattr(sp, name)))
    sup.screen = clock.wrap("screen", sup.screen)  # type: ignore[method-assign]
    sup.batch_records = clock.wrap("batch encode", sup.batch_records)  # type: ignore[method-assign]
    sup.push_backlog = clock.wrap("batch encode", sup.push_backlog)  # type: ignore[method-assign]
    sup.apply = clock.wrap("apply", sup.apply)  # type: ignore[method-assign]
    events.emit_many = clock.wrap("event JSON", events.emit_many)  # type: ignore[method-assign]
    if hasattr(events, "emit_rows"):
        events.emit_rows = clock.wrap("event JSON", events.emit_rows)  # type: ignore[method-assign]
    if hasattr(events, "append_rows"):  # the flush's first half (then the log, then tell)
        events.append_rows = clock.wrap("event JSON", events.append_rows)  # type: ignore[method-assign]
    on_rows = getattr(events, "rows_listeners", {})  # listeners' own handlers of Rows batches
    timed = [clock.wrap("listeners", fn) for fn in events.listeners]
    for fn, wrapped in zip(events.listeners, timed, strict=True):
        if fn in on_rows:
            on_rows[wrapped] = clock.wrap("listeners", on_rows.pop(fn))
    events.listeners[:] = timed
    dispatch = clock.wrap("dispatch other", sup.dispatch)
    any_room = "any_room" in inspect.signature(sup.dispatch).parameters  # older trees: no
    drain = clock.wrap("results decode", sup.drain_outbox)
    # The loop's flush (writes once enough outcomes wait; older trees: every round).
    flush = clock.wrap("flush other", getattr(sup, "flush_due", sup.flush_results))
    saved_decoder = wire.from_worker_decoder
    wire.from_worker_decoder = TimedDecoder(saved_decoder, clock)  # type: ignore[assignment]
    enc = wire.encoder.encode
    dec = wire.to_worker_decoder.decode
    waiting: dict[int, list[Any]] = {slot.index: [] for slot in sup.slots}
    try:
        idle = 0
        while idle < 2:
            dispatch()
            if paced and sup.feeding and sup.feed_room.is_set():  # Supervisor._feed's step
                if any_room:  # every window with room claims first (its room on record)
                    dispatch(any_room=True)
                sup.feed_room.clear()
                sup.open_room.clear()
                if step() is None:
                    sup.feeding = sup.pace_feed = False
                continue
            moved = 0
            for slot in sup.slots:  # the stand-in worker (untimed)
                assert slot.inbox is not None and slot.outbox is not None
                queue = waiting[slot.index]
                while (rec := slot.inbox.get()) is not None:
                    msg = dec(rec)
                    if isinstance(msg, wire.Batch):
                        queue.extend(msg.items)
                # Answers as a worker does: a flush of what finished since the last
                # one (``per_round`` messages across its sites), so the window stays
                # nearly full and claims are as large as a running supervisor's.
                done, waiting[slot.index] = queue[:per_round], queue[per_round:]
                ips = slot.ips or [""]
                for k in range(0, len(done), 64):
                    res = answers([it.id for it in done[k : k + 64]], ips, unique)
                    slot.outbox.put(enc(wire.Results(res)))
                moved += len(done)
            for slot in sup.slots:
                assert slot.outbox is not None
                drain(slot, slot.outbox)
            flush()
            idle = 0 if moved or sup.inflight or sup.feeding else idle + 1
    finally:
        wire.from_worker_decoder = saved_decoder
    if rollups is not None:
        rollups.close()
    events.close()
    counts = spool.counts()
    sup.close_parts()
    spool.close()
    if counts["delivered"] != n:
        raise SystemExit(f"delivered {counts['delivered']} of {n}")
    clock.calibrate()
    got = clock.stages()
    return {k: got.get(k, 0.0) / n * 1e6 for k in STAGES}


@contextlib.contextmanager
def collector_as_send() -> Iterator[None]:
    """The cycle collector as `fastsend send` runs its supervisor: what was
    imported frozen out of its sight (cli.main), young collections every
    engine.SUPERVISOR_GC_YOUNG allocations during the run (engine.run; a tree
    without it: the default). Before, the bench ran the default 700, ~7% of
    its samples in the collector, which the command does not pay."""
    from fastsend import engine

    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    young = getattr(engine, "SUPERVISOR_GC_YOUNG", threshold[0])
    gc.set_threshold(young, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20,000 messages")
    ap.add_argument(
        "--per-round",
        type=int,
        default=250,
        help="outcomes each stand-in worker reports per supervisor tick (its window stays full)",
    )
    ap.add_argument(
        "--unique-text",
        action="store_true",
        help="each reply names its own queue id (a real MTA's); default: all the same (smtp-sink's)",
    )
    args = ap.parse_args()
    n = 20_000 if args.quick else args.messages
    runs = []
    with tempfile.TemporaryDirectory(prefix="fastsend-stages-") as tmp:
        for rep in range(args.repeat):
            with collector_as_send():
                runs.append(one_run(n, tmp, f"r{rep}", args.per_round, args.unique_text))
    print(f"machine: {machine()} (shared: CPU time per message is what counts)")
    print(
        f"settings: {n} personalised recipients over 100 domains, 2 rings (workers stood in),"
        f" every answer 250 ({'a queue id each' if args.unique_text else 'all the same'}),"
        f" {CONN} per connection, 64 per record, {args.per_round} answers per worker per tick; {args.repeat} runs, medians (min-max), CPU us per message"
    )
    total = [sum(r.values()) for r in runs]
    for k in STAGES:
        print(f"  {k:<16} {fmt_mr([r[k] for r in runs], '.2f'):>22}")
    print(f"  {'total':<16} {fmt_mr(total, '.2f'):>22}")
    med = median_range(total)[0]
    print(f"ratio supervisor CPU/msg / goal ({GOAL_US:g} us): {med / GOAL_US:.2f}x  (goal <= 1.0x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
