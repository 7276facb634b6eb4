"""What the supervisor's three parts share: the worker slots, the run's counters,
and the state every part reads (:class:`SupervisorState`).

The supervisor is split by noun, as Postfix splits its queue manager:
:mod:`~fastsend.queue.lifecycle` (fork, watch, restart and stop the workers; the
rings), :mod:`~fastsend.queue.dispatch` (claim, screen, rate-gate, batch onto the
rings) and :mod:`~fastsend.queue.outcomes` (decode what workers answer, decide
retries, write the spool and the event log). :class:`~fastsend.queue.supervisor.
Supervisor` composes them and runs the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from fastsend import wire
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.queue.shaping import SupervisorShaping
from fastsend.ring import Ring, WriteLog
from fastsend.shaping.pools import PoolRoutes
from fastsend.spool import Claimed, Result, Spool
from fastsend.suppression import SuppressionList

# Per ring, per direction, per worker. Anonymous shared memory: only the pages a
# busy ring touches are resident. Large enough for one maximum-size message (the
# API and listeners accept up to 16 MB) plus its batch framing.
RING_BYTES = wire.RING_BYTES


class WorkerSlot(msgspec.Struct):
    index: int
    ips: list[str]
    pid: int = 0
    inbox: Ring | None = None
    outbox: Ring | None = None
    inflight: dict[int, Claimed] = msgspec.field(default_factory=dict)
    campaigns: set[int] = msgspec.field(default_factory=set)
    backlog: list[bytes] = msgspec.field(default_factory=list)  # records waiting for ring space
    restarts: int = 0
    alive: bool = False
    counters: dict[str, float] = msgspec.field(default_factory=dict)  # last wire.Stats
    counters_pid: int = 0  # the worker process that sent them
    # What this slot's earlier workers counted (a restart's, a reload's
    # retired one's, at their exit): its counters' totals go on from there.
    counters_done: dict[str, float] = msgspec.field(default_factory=dict)
    # Replaced by a reload (in ``retired``): finishing what is on its connections,
    # fed nothing, not restarted; its slot runs a new worker meanwhile.
    retiring: bool = False
    # What a retiring worker last said it holds (wire.Conns; None: not yet).
    conns: list[tuple[str, str, int]] | None = None
    # What it was last told the retiring workers hold on its addresses (wire.Conns).
    told_conns: list[tuple[str, str, int]] = msgspec.field(default_factory=list)
    # Its lanes as it retired (wire.Lanes), for the worker started in its place.
    lanes: list[wire.LaneState] = msgspec.field(default_factory=list)
    providers: dict[str, tuple[float, float, int, float]] = msgspec.field(default_factory=dict)
    sites: list[tuple[str, str, int, float]] = msgspec.field(default_factory=list)  # its caps
    marks: list[wire.SiteMarks] = msgspec.field(default_factory=list)  # (its sites' hosts)
    stop_at: float = 0.0  # monotonic: a retiring worker still running then is stopped
    held: dict[tuple[int, str], list[Claimed]] = msgspec.field(default_factory=dict)  # rate-held
    # A rate held some of ``held`` since it was last empty: it may hold messages a
    # guardrails sample let out (else none: Dispatch.sample_cap skips them).
    held_sampled: bool = False
    # The supervisor's outcome count (``outcomes_gen``) and the time (monotonic)
    # when its held mail was last gated (``Dispatch.regate_later``).
    gated_gen: int = -1
    gated_at: float = 0.0
    # Deliveries of its pipelined groups still in flight (wire.Answered's items):
    # applied if the worker dies before their group's Results (not sent again).
    # Two generations (outcomes.note_answered): those told since the older one
    # began are kept, older ones dropped.
    answered: list[wire.Res | wire.Sent] = msgspec.field(default_factory=list)
    answered_before: list[wire.Res | wire.Sent] = msgspec.field(default_factory=list)
    answered_n: int = 0  # messages in ``answered``
    last_seen: float = 0.0  # monotonic time of the worker's last record
    crashes: list[float] = msgspec.field(default_factory=list)  # monotonic times of abnormal exits
    drain_sent: bool = False  # Drain is on its way (SIGTERM): the worker hands back slow mail
    # Claimed by this slot and answered (or suppressed at dispatch), outcome not yet
    # written to the spool: counted against the window, so what a crash can send
    # twice stays bounded by the window.
    unwritten: int = 0
    cpu_s: float = 0.0  # user + system CPU of this slot's workers that have exited
    window: int = 4000  # its active window (Config.window_for): claimed + unwritten at most
    # CPU seconds building one message costs its worker (signing it, mostly), from
    # the last wire.Stats that counted enough built (note_build); 0.0: not known yet.
    build_cost: float = 0.0
    # Ids in flight the worker was asked to hand back (wire.Withdraw): suppressed since.
    withdrawn: set[int] = msgspec.field(default_factory=set)
    # What its worker has begun to write to a receiver (shared memory, made with
    # its rings), and each hand-over (``hand``) as (the log's count then, ids):
    # a worker killed -9 counts unknown only what it wrote (unknown_outcomes).
    writes: WriteLog | None = None
    handed: deque[tuple[int, list[int]]] = msgspec.field(default_factory=deque)

    @property
    def room(self) -> int:
        """What its window can still take: the window less what it has claimed
        and what was answered but not yet written."""
        return self.window - len(self.inflight) - self.unwritten


def note_answered(slot: WorkerSlot, items: list[wire.Res | wire.Sent]) -> None:
    """Keep a worker's wire.Answered deliveries (``retire`` applies those still
    in its window if it dies before their group's Results). Once more than a
    window's worth were told since, the older generation is dropped (their
    groups ended long since, but for one stalled that long: its mail then
    counts unknown, as before)."""
    slot.answered += items
    sent = wire.Sent
    slot.answered_n += sum(len(x.ids) if type(x) is sent else 1 for x in items)
    if slot.answered_n > max(slot.window, 1024):
        slot.answered_before, slot.answered, slot.answered_n = slot.answered, [], 0


def answered_in_window(slot: WorkerSlot) -> list[wire.Res | wire.Sent]:
    """The deliveries kept by note_answered of mail still in ``slot``'s window,
    one per message; both generations emptied."""
    inflight = slot.inflight
    known = {r.id: r for r in wire.expand(slot.answered_before + slot.answered)
             if r.id in inflight}  # fmt: skip
    slot.answered, slot.answered_before, slot.answered_n = [], [], 0
    return list(known.values())


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Wake:
    """The loop's wake-up: ``set``/``clear``/``is_set`` as an asyncio.Event's,
    and :meth:`wait` with a timeout, which costs one future and one timer (the
    loop waits once per pass: ``asyncio.wait_for(event.wait(), t)`` made a
    task, a second future and their callbacks each time)."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        if not self._set:
            self._set = True
            if self._waiter is not None:
                _settle(self._waiter)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float) -> None:
        """Until set, or ``timeout`` seconds."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


TLS_KEYS = 500  # distinct (policy type, domain, result) counted before "other"


class RunStats(msgspec.Struct):
    started: float = msgspec.field(default_factory=time.monotonic)
    delivered: int = 0
    deferred: int = 0  # deferral events (attempts), not messages
    bounced: int = 0
    expired: int = 0
    suppressed: int = 0
    attempts: int = 0
    worker_restarts: int = 0
    duplicates_possible: int = 0  # messages released from a dead worker's window
    handed_back: int = 0  # messages a worker gave back unattempted (slow site, drain)
    # campaign -> [delivered, bounced, expired, suppressed]: the final outcomes this
    # run gave its messages (each message's once: it leaves the window with it).
    # Kept by a run that ends (engine.run), not by a long-lived serve.
    finals: dict[int, list[int]] | None = msgspec.field(default_factory=dict)
    # TLS-RPT (RFC 8460; delivery/mtasts.py, dane.py): the workers' tls_report
    # events counted by "policy type<TAB>policy domain<TAB>result type"; past
    # TLS_KEYS distinct keys a new domain is counted as "other" (bounded labels).
    tls_failures: dict[str, int] = msgspec.field(default_factory=dict)

    def final(self, campaign: int) -> list[int]:
        finals = self.finals
        if finals is None:
            return [0, 0, 0, 0]
        f = finals.get(campaign)
        if f is None:
            f = finals[campaign] = [0, 0, 0, 0]
        return f

    def as_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in self.__struct_fields__
            if k not in ("started", "finals", "tls_failures")
        }

    def count_tls(self, event: dict[str, Any]) -> None:
        """One ``tls_report`` event (a failed session or policy fetch)."""
        t = self.tls_failures
        ptype, result = str(event.get("policy_type", "")), str(event.get("result", ""))
        key = f"{ptype}\t{event.get('policy_domain', '')}\t{result}"
        if key not in t and len(t) >= TLS_KEYS:
            key = f"{ptype}\tother\t{result}"
        t[key] = t.get(key, 0) + 1


class SupervisorState:
    """The attributes :class:`~fastsend.queue.supervisor.Supervisor` sets up, and the
    methods one part calls in another, declared once for the type checker."""

    # set up in Supervisor.__init__
    config: Config
    spool: Spool
    events: EventLog
    shaping: SupervisorShaping
    suppression: SuppressionList
    own_suppression: bool
    slots: list[WorkerSlot]
    outcomes_gen: int  # Outcomes.apply calls so far (Dispatch.regate_later)
    # Workers a reload replaced, finishing their transactions while their slots'
    # new workers send (WorkerLifecycle.reload); their outcomes apply as any.
    retired: list[WorkerSlot]
    stats: RunStats
    # where each worker's write log is a file (Spool.write_log_dir: a kill -9 of
    # it all leaves them for recover), None: anonymous memory; and logs made
    # domain -> its receivers' deferrals in a row; domains that took mail after a
    # run of them, their deferred mail to bring forward (Outcomes.site_recovery)
    site_deferrals: dict[str, int]
    recovered: set[str]
    write_logs: str | None
    write_logs_made: int
    wake: Wake  # the loop's wake-up (set by outcomes, the feeder, serve's injections)
    feed_room: asyncio.Event  # claims came back short: the feeder may read on
    open_room: dict[int, int]  # slot -> room its last claim left open (while feeding)
    draining: bool  # SIGTERM: no new claims, windows finish
    stopping: bool  # stop now: windows go back to queued
    outage_since: float  # monotonic start of a shared spool's outage (0: it answers)
    outage_types: tuple[type[BaseException], ...]  # Spool.outage_errors()
    feeder: Iterator[object] | None
    feeding: bool
    pace_feed: bool  # the feeder reads as the windows have room (a local spool)
    feed_error: BaseException | None
    until_idle: bool
    max_wait: float
    on_tick: Callable[[Any], None] | None
    # dispatch
    spec_cache: dict[int, dict[str, Any]]
    status_cache: dict[int, tuple[bool, float]]  # campaign -> (active, read at)
    tenant_cache: dict[int, str]
    campaign_pool: dict[int, str]  # campaign -> its pool's name (Dispatch.route_pools)
    pool_routes_for: tuple[object, PoolRoutes] | None  # (the poolset, its routes)
    # (pool, domain) -> {worker index: until (unix)}: none of that worker's
    # addresses may send that mail before then (wire.Handback.elsewhere)
    pool_avoid: dict[tuple[str, str], dict[int, float]]
    blob_cache: OrderedDict[str, bytes]  # bodies stored once (Spool.put_blob), LRU
    blob_swept: float  # monotonic time of the last Spool.sweep_blobs
    prune_next: float  # monotonic time of the next Spool.prune_final (0: at the first tick)
    suppression_seen: int | None  # the list's version() at the last check of the windows
    withdraw_checked: float  # monotonic time of that check
    stopped_checked: float  # monotonic time windows were checked for stopped campaigns
    # The campaigns of every claim handed to a window since the last look (a
    # superset of those in the windows: Dispatch.withdraw_stopped reads their
    # status, not each window's claims, and looks in the windows only for one
    # paused or cancelled; what it and forget_idle find in them replaces it).
    window_campaigns: set[int]
    forget_next: float  # monotonic time of the next Dispatch.forget_idle
    idle_before: set[int]  # campaigns known and out of every window at the last one
    # outcomes, written to the spool and the event log once per tick
    results: list[Result]
    unknown: list[tuple[Claimed, wire.Res]]  # of those, deferred unknown (settle_unknown)
    results_since: float  # monotonic time the oldest unwritten outcome was seen (0: none)
    requeues: list[tuple[int, float]]  # handed back: (id, next_at)
    hold_next: dict[int, float]  # campaign -> when its next rate-held message requeued is due
    event_buf: list[Any]  # event dicts and DeliveredRows batches, in order
    # the events the webhook outbox wants, written with the outcomes (None: none)
    outbox_filter: Callable[[dict[str, Any]], bool] | None
    to_suppress: list[tuple[str, str, str, str, int | None]]
    result_hooks: list[Callable[[Claimed, wire.Res, int], None]]
    before_commit: list[Callable[[], None]]
    failed_hooks: set[str]

    if TYPE_CHECKING:
        # lifecycle
        def push_backlog(self, slot: WorkerSlot) -> None: ...
        def drain_workers(self) -> None: ...
        def on_conns(self, slot: WorkerSlot, msg: wire.Conns) -> None: ...
        def on_lanes(self, slot: WorkerSlot, msg: wire.Lanes) -> None: ...

        # supervisor
        def guard(self, step: Callable[..., Any], *args: Any) -> Any: ...

        # dispatch
        def share_rests(self) -> None: ...
        def tenant_of(self, campaign: int) -> str: ...
        def pool_name(self, campaign: int) -> str: ...
        def may_send_elsewhere(self, key: tuple[str, str], now: float) -> bool: ...
        def withdraw_addresses(self, gone: list[tuple[str, str, str, str, int | None]]) -> None: ...

        # outcomes
        def on_outbox(self, slot: WorkerSlot, ring: Ring) -> None: ...
        def drain_outbox(self, slot: WorkerSlot, ring: Ring) -> None: ...
        def apply(self, slot: WorkerSlot, items: list[wire.Res | wire.Sent]) -> None: ...
        def unknown_outcomes(self, slot: WorkerSlot, ids: list[int], text: str) -> None: ...
        def held_expired(self, slot: WorkerSlot, c: Claimed, due: float, why: str) -> bool: ...
        def tell_taken_back(self) -> None: ...
        def settle_unknown(self) -> None: ...
        def flush_results(self) -> None: ...
        def flush_due(self) -> None: ...
        def hook_failed(self, hook: Any) -> None: ...
