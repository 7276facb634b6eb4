"""The supervisor: forks the workers, feeds them from the spool, applies outcomes.

One process, one uvloop loop. It is split by noun, as Postfix splits qmgr (see
docs/SCHEDULER.md for the algorithm):

- :mod:`fastsend.queue.lifecycle` — fork/watch/restart/stop the workers and
  their rings (a worker that dies has its window released and is forked again);
- :mod:`fastsend.queue.dispatch` — claim due mail, screen, rate-gate, batch it
  onto a worker's inbox ring;
- :mod:`fastsend.queue.outcomes` — drain outbox rings, decide each message's
  next state, apply them to the spool in one transaction per tick, write the
  event log;
- this module — set-up and the loop: dispatch, wait for a ring or the tick,
  apply outcomes, reap; the first SIGTERM drains (no new claims, windows
  finish; at most `[delivery] drain_limit` s (30), `drain_outage` s (10)
  with the spool out of reach), a second SIGTERM or a SIGINT stops now,
  releasing the windows back to queued.

It never speaks SMTP and never renders a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from fastsend import msgid, wire
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.queue.dispatch import FORGET_EVERY, STATUS_TTL, Dispatch, _raise
from fastsend.queue.lifecycle import CRASH_LOOP, WORKER_SILENCE, WorkerLifecycle
from fastsend.queue.outcomes import HANDBACK_SPREAD, Outcomes
from fastsend.queue.shaping import SupervisorShaping
from fastsend.queue.state import RING_BYTES, RunStats, Wake, WorkerSlot
from fastsend.shaping.pools import PoolRoutes
from fastsend.spool import Claimed, Result, Spool, spool_local_dir
from fastsend.suppression import SuppressionList

__all__ = [
    "CRASH_LOOP",
    "HANDBACK_SPREAD",
    "IDLE_TICK",
    "RING_BYTES",
    "STATUS_TTL",
    "TICK",
    "WORKER_SILENCE",
    "RunStats",
    "Supervisor",
    "WorkerSlot",
]

TICK = 0.02
IDLE_TICK = 0.1  # s: the loop's wait while no pass could hand anything out (``tick``)
CLOCK_SKEW = 2.0  # s between this node's clock and a shared spool's that is said at start
OUTAGE_PAUSE = 2.0  # s: the longest pause between tries while the spool is out of reach
FEED_LAG = 1.0  # s: the feeder reads its next chunk at least this often
_END = object()


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """A future whose result no one may read (a probe left to its thread)."""
    if not fut.cancelled():
        fut.exception()


class Supervisor(WorkerLifecycle, Dispatch, Outcomes):
    def __init__(
        self,
        config: Config,
        spool: Spool,
        events: EventLog,
        *,
        until_idle: bool = True,
        max_wait: float = 300.0,
        on_tick: Callable[[Supervisor], None] | None = None,
        feeder: Iterator[object] | None = None,
        suppression: SuppressionList | None = None,
        checkpoints_behind: bool = False,
    ) -> None:
        # checkpoints_behind: once the workers are forked, the spool's log
        # housekeeping runs in a thread of its own (Spool.checkpoint_behind;
        # the caller ends it: Spool.checkpoint_soon, close). Started after the
        # fork: the workers are not forked from a process with that thread.
        self.checkpoints_behind = checkpoints_behind
        # feeder: a generator that spools more mail (one chunk per step) while
        # delivery runs, so sending starts before a long list is fully imported.
        self.feeder = feeder
        self.feeding = feeder is not None
        # A local spool's list is read as this node's windows have room; a shared
        # one's at full speed (every node delivers from it).
        self.pace_feed = self.feeding and spool.shared() is None
        self.feed_error: BaseException | None = None
        if not config.secret:
            config.secret = msgid.load_secret(config)  # workers inherit it at fork
        if not config.msgid_tag:  # (so is the spool's Message-ID label)
            config.msgid_tag = spool.meta_once(msgid.TAG_KEY, msgid.new_tag())
        self.config = config
        self.spool = spool
        spool.set_tenant_weights(config.tenant_weights)  # (and at each reload)
        self.events = events
        self.until_idle = until_idle
        self.max_wait = max_wait
        self.on_tick = on_tick
        self.stats = RunStats(finals={} if until_idle else None)
        self.slots = [
            WorkerSlot(i, config.ips_for_worker(i), window=config.window_for(i))
            for i in range(config.worker_count)
        ]
        self.retired: list[WorkerSlot] = []
        self.write_logs = spool.write_log_dir()
        self.site_deferrals: dict[str, int] = {}
        self.recovered: set[str] = set()
        self.write_logs_made = 0
        self.results: list[Result] = []
        self.unknown: list[tuple[Claimed, wire.Res]] = []
        self.results_since = 0.0
        self.requeues: list[tuple[int, float]] = []  # handed back: (id, next_at)
        self.hold_next: dict[int, float] = {}  # campaign -> next due of its requeued held mail
        self.event_buf: list[Any] = []  # event dicts and DeliveredRows batches
        self.outbox_filter: Callable[[dict[str, Any]], bool] | None = None
        self.draining = False
        self.drain_started = 0.0  # monotonic time of the SIGTERM that started a drain
        self.stopping = False
        self.stop_signal = 0  # the first SIGTERM/SIGINT received (0: none)
        self.spec_cache: dict[int, dict[str, Any]] = {}
        self.status_cache: dict[int, tuple[bool, float]] = {}  # campaign -> (active, read at)
        self.tenant_cache: dict[int, str] = {}
        self.campaign_pool: dict[int, str] = {}
        self.pool_routes_for: tuple[object, PoolRoutes] | None = None
        self.pool_avoid: dict[tuple[str, str], dict[int, float]] = {}
        self.blob_cache: OrderedDict[str, bytes] = OrderedDict()
        self.blob_swept = time.monotonic()
        self.prune_next = 0.0
        # The suppression list is checked again at dispatch (an address suppressed
        # while its mail waited is not mailed) and learns hard delivery-time bounces.
        # "is None", not "or": a list defines __len__, and an empty one (a shared
        # list before its first entry) is falsy but still the list to use.
        self.suppression = (
            suppression
            if suppression is not None
            else SuppressionList(os.path.join(spool_local_dir(config.spool_dir), "suppression.db"))
        )
        self.own_suppression = suppression is None
        self.withdraw_checked = 0.0
        self.stopped_checked = 0.0  # monotonic time windows were checked for stopped campaigns
        self.window_campaigns: set[int] = set()  # every campaign with mail in a window, or more
        self.outcomes_gen = 0
        self.forget_next = time.monotonic() + FORGET_EVERY
        self.idle_before: set[int] = set()
        try:
            self.suppression_seen = self.suppression.version()
        except Exception:  # checked again at the first tick (withdraw_suppressed)
            self.suppression_seen = None
        self.to_suppress: list[tuple[str, str, str, str, int | None]] = []
        # A shared spool out of reach (Supervisor.guard): since when (monotonic; 0:
        # it answers), the last error, the pause before the next try.
        self.outage_types = spool.outage_errors()
        self.outage_since = 0.0
        self.outage_error: BaseException | None = None
        self.outage_pause = 0.0
        self.wake = Wake()
        self.due_read: tuple[int | None, float | None] | None = None  # due_wait's last read
        self.feed_room = asyncio.Event()  # set by dispatch: the windows have room
        self.open_room: dict[int, int] = {}  # slot -> room its last claim left open
        self.result_hooks: list[Callable[[Claimed, wire.Res, int], None]] = []
        # Called before each commit of outcomes: what a result hook wrote must be
        # durable before the outcomes that made it are (serve's DSN journal).
        self.before_commit: list[Callable[[], None]] = []
        self.failed_hooks: set[str] = set()
        # Shaping that spans workers: dispatch rates, guardrails, pools, warm-up state.
        self.shaping = SupervisorShaping(config, spool, lambda ev: self.event_buf.append(ev))
        # Which transports this node has mail for (their connection split).
        self.shaping.demand = self.window_keys
        # The guardrails see every outcome too (apply() calls them first, and counts
        # deliveries per campaign per record); result_hooks are the others' (metrics).
        # Complaints arrive as events (ARF intake, webhooks of providers): they
        # count toward the campaign's complaint-rate guardrail.
        events.listen(self._on_events, rows=self._on_rows)

    # -- main loop -----------------------------------------------------------

    @property
    def inflight(self) -> int:
        return sum(len(s.inflight) for s in (*self.slots, *self.retired))

    def tick(self) -> float:
        """How long the loop waits for a wake-up (outcomes, the list's next
        chunk, a signal, mail accepted) before its next pass: TICK, or
        IDLE_TICK while no pass could do anything sooner: every window too full
        to claim, no outcome or event waiting to be written, no rate set, not
        draining, stopping or riding out an outage. Before, TICK always: a
        send whose windows were full (slow receivers, DKIM signing) made 50
        passes a second that found nothing to do, ~25 ms of CPU a second.
        What runs by the clock (the reap's 0.1 s chores, REGATE_EVERY) keeps
        its pace. A window with room waits as long when nothing is due (the
        pass just before found none): until the spool's next due time, at most
        IDLE_TICK; mail accepted in this process wakes the loop at once
        (``Acceptor.wake``). Before, TICK: a serve at rest, or a send whose
        mail was all deferred, made 50 passes a second that claimed nothing
        (~27 ms of CPU a second, bench/supervisor_idle.py --deferred). A
        shared spool keeps TICK: other nodes accept mail unseen here."""
        if (
            self.results
            or self.requeues
            or self.event_buf
            or self.to_suppress
            or self.draining
            or self.stopping
            or self.outage_since
            or self.shaping.gate.enabled
        ):
            return TICK
        for slot in self.slots:
            if self.can_take(slot) and slot.room >= self.claim_at(slot):
                return self.due_wait()
        return IDLE_TICK

    def due_wait(self) -> float:
        """The wait of a loop whose windows have room (``tick``): until the
        local spool's next due time, between TICK and IDLE_TICK; TICK when
        mail is due (a pass could not claim it: it is tried again at the old
        pace) or the spool is shared."""
        spool = self.spool
        if spool.shared() is not None:
            return TICK
        # Read again only when the spool made mail due since, or the time read
        # has come (a query each pass cost ~1.9 us/msg in a signed send's
        # tail, where outcomes wake the loop often and nothing is due).
        gen, now = spool.due_version(), time.time()
        got = self.due_read
        if gen is None or got is None or got[0] != gen or (got[1] is not None and got[1] <= now):
            got = self.due_read = (gen, spool.next_due())
        nxt = got[1]
        if nxt is None:
            return IDLE_TICK
        return min(IDLE_TICK, max(TICK, nxt - now))

    def idle_done(self) -> bool:
        if self.inflight or self.results or self.requeues or self.feeding:
            return False
        if self.draining:
            return True
        if not self.until_idle:
            return False
        nxt = self.spool.next_due()
        return nxt is None or nxt - time.time() > self.max_wait

    async def _feed(self) -> None:
        """Drive the feeder one chunk per loop turn (spooling is synchronous and
        short per chunk), paced by dispatch: the next chunk is read once a claim
        came back short (nothing more due: the chunk's rows go straight to the
        windows' room, see ``SQLiteSpool.add_messages``), or FEED_LAG s after
        the last one (windows full: the list is still read on). The list file is
        the incoming queue: its ingest job records where reading stands. A
        shared spool's list is read at full speed (every node delivers from
        it), and so is any list during a drain (what is read is spooled and
        stays queued for `resume`); a stop-now stops reading."""
        assert self.feeder is not None
        feeder = self.feeder
        try:
            while True:
                if self.pace_feed and not (self.draining or self.stopping):
                    # Every window with room claims now (what is due, else its
                    # room is recorded): the chunk's rows go straight to the
                    # room the windows have now, not to what it was at their
                    # last claims (a window claims once a quarter of it is free,
                    # so the room it freed since was not on record, and rows
                    # beyond the recorded room were queued: an index entry, a
                    # SELECT and an UPDATE more each).
                    self.dispatch(any_room=True)
                self.feed_room.clear()  # before the chunk: a claim after it counts
                self.open_room.clear()
                got = next(feeder, _END)
                if got is _END:
                    break
                if isinstance(got, BaseException):
                    # The feeder met the spool out of reach (Acceptor.feed): it
                    # reads on once the outage is over.
                    self.guard(_raise, got)
                    while self.outage_since and not self.stopping:
                        await asyncio.sleep(0.05)
                    if self.stopping:
                        break
                    continue
                self.wake.set()
                await asyncio.sleep(0)
                if self.pace_feed and not (self.draining or self.stopping):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.feed_room.wait(), FEED_LAG)
                if self.stopping:
                    break
        except Exception as e:  # reported by the caller; what was spooled stays
            self.feed_error = e
        finally:
            self.feeding = self.pace_feed = False
            self.wake.set()

    # -- a shared spool out of reach ---------------------------------------------

    def guard(self, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``; an error of the spool's backend being out of reach
        (``Spool.outage_errors``: Redis restarting, the network) starts or
        continues an outage instead of ending the run: what the supervisor
        holds (windows, outcomes, hand-backs) stays, the workers go on with
        their windows, and the loop tries again with a growing pause. While
        an outage lasts, steps are skipped (None): only ``outage_wait`` tries
        the spool, so a Redis that stops answering (paused: each call waits
        for the client's timeout) does not hold the loop and its signals."""
        if self.outage_since:
            return None
        try:
            return step(*args)
        except self.outage_types as e:
            if not self.outage_since:
                self.outage_since = time.monotonic()
                print(
                    f"fastsend: the spool is out of reach ({e.__class__.__name__}: {e});"
                    " keeping what is in flight and trying again",
                    file=sys.stderr,
                    flush=True,
                )
            self.outage_error = e
            return None

    async def outage_wait(self) -> None:
        """In an outage: pause (0.1 s doubling to OUTAGE_PAUSE), and once the
        spool answers again, write what waited and give back the claims the
        outage cut off (``Spool.release_strays``)."""
        self.outage_pause = min(OUTAGE_PAUSE, max(0.1, self.outage_pause * 2))
        end = time.monotonic() + self.outage_pause
        while not self.stopping and time.monotonic() < end:  # outcomes still drain
            await asyncio.sleep(0.05)
        if self.stopping:  # stop now: no probe (a paused Redis holds it for its timeout)
            return
        try:
            if self.spool.shared() is not None:
                # In a thread: a Redis that does not answer (paused, a partition)
                # held each probe on serve's loop for the client's timeout (5 s by
                # default, again after each pause): every listener of the node
                # with it, for most of the outage.
                probing = asyncio.ensure_future(asyncio.to_thread(self._probe))
                probing.add_done_callback(_retrieved)
                while not probing.done():
                    if self.stopping:  # stop now: the probe is left to its thread
                        return
                    await asyncio.wait((probing,), timeout=0.05)
                whole = probing.result()
            else:
                whole = self._probe()
            if not whole:
                # Said loudly: "answers again" alone would tell an operator all is well.
                print(
                    "fastsend: error: the spool came back without its data (Redis restarted"
                    " without persistence or its AOF, or another server at its address):"
                    " every message it held, queued or in flight"
                    f" ({self.inflight} in this node's windows), its campaigns and the lists"
                    " being read are gone from it; only mail accepted from now on is kept",
                    file=sys.stderr,
                    flush=True,
                )
            self.flush_results()
            known: set[int] = set()
            for slot in (*self.slots, *self.retired):
                known.update(slot.inflight)
            known.update(r.id for r in self.results)
            known.update(i for i, _at in self.requeues)
            strays = self.spool.release_strays(known)
        except self.outage_types as e:
            self.outage_error = e
            return
        took = time.monotonic() - self.outage_since
        print(
            f"fastsend: the spool answers again after {took:.1f} s; {strays} claim(s) the"
            " outage cut off went back to the queue",
            file=sys.stderr,
            flush=True,
        )
        self.outage_since = 0.0
        self.outage_pause = 0.0
        self.outage_error = None

    def _probe(self) -> bool:
        """The spool takes a write again (a full disk: not only a read must
        work); whether it came back with its data (``Spool.intact``)."""
        self.spool.probe()
        return self.spool.intact()

    def window_keys(self) -> set[tuple[int, str]]:
        """(campaign, domain) of the mail in the workers' windows."""
        return {
            (c.campaign, c.domain)
            for s in (*self.slots, *self.retired)
            for c in s.inflight.values()
        }

    def on_signal(self, signum: int) -> None:
        self.stop_signal = self.stop_signal or signum
        if signum in (signal.SIGTERM, signal.SIGHUP) and not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()
        else:
            self.stopping = True
        self.wake.set()
        self.feed_room.set()

    async def run(self) -> RunStats:
        loop = asyncio.get_running_loop()
        # Outcomes a killed run recorded without their events, then its window
        # (recover notes what it takes back as untold until its events are out).
        self.tell_untold()
        self.spool.recover()
        if os.environ.get("FASTSEND_TEST_FAULT") == "kill-after-recover":  # tests only
            os.kill(os.getpid(), signal.SIGKILL)
        self.tell_taken_back()  # a dead process's window: attempts of unknown outcome
        skew = self.spool.clock_offset()
        if abs(skew) >= CLOCK_SKEW:
            print(
                f"fastsend: this node's clock is {abs(skew):.1f} s"
                f" {'behind' if skew > 0 else 'ahead of'} the shared spool's (Redis TIME):"
                " due, retry and spooling times (expiry) go by the spool's clock, but"
                " the times in its events and logs are off by as much;"
                " keep the nodes' clocks in step (NTP)",
                file=sys.stderr,
                flush=True,
            )
        # SIGHUP too for send/resume (until_idle; serve reloads on it): a terminal
        # closed under a foreground `fastsend send` (an ssh session dropped) had
        # killed it at once, its workers with it mid-transaction (every message on
        # a connection sent again at resume); now a drain as for SIGTERM, exit 129.
        # Not when started ignoring it (nohup: the run is to outlive its terminal).
        hup = (
            (signal.SIGHUP,)
            if self.until_idle and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
            else ()
        )
        for sig in (signal.SIGTERM, signal.SIGINT, *hup):
            loop.add_signal_handler(sig, self.on_signal, sig)
        for slot in self.slots:
            self.spawn(slot)
        if self.checkpoints_behind:
            self.spool.checkpoint_behind()
        feed_task = loop.create_task(self._feed()) if self.feeder is not None else None
        last_reap = last_told = 0.0
        guard = self.guard
        try:
            while True:
                if self.outage_since:
                    await self.outage_wait()
                guard(self.dispatch)
                await self.wake.wait(self.tick())
                self.wake.clear()
                for slot in (*self.slots, *self.retired):  # safety net: get() on an empty ring
                    if slot.outbox is not None:
                        self.drain_outbox(slot, slot.outbox)
                guard(self.flush_due)
                now = time.monotonic()
                if now - last_reap > 0.1:
                    self.reap()
                    guard(self.shaping.tick)
                    recs = self.shaping.broadcast_records()
                    for slot in self.slots if recs else ():
                        if slot.alive and slot.inbox is not None:
                            slot.backlog.extend(recs)
                            self.push_backlog(slot)
                    # a shared spool's lease on our claims (no-op: SQLite)
                    guard(self.spool.renew)
                    if now - last_told >= 1.0 and not self.outage_since:
                        guard(self.tell_taken_back)  # dead nodes' windows others reaped
                        last_told = now
                    if not self.outage_since:
                        self.withdraw_suppressed(now)
                    guard(self.withdraw_stopped, now)
                    guard(self.sweep_blobs, now)
                    guard(self.prune_final, now)
                    if now >= self.forget_next:
                        self.forget_next = now + FORGET_EVERY
                        guard(self.forget_idle)
                    last_reap = now
                if self.on_tick:
                    self.on_tick(self)
                if self.stopping:
                    break
                if (
                    self.draining
                    and self.outage_since
                    and time.monotonic() - self.outage_since >= self.config.delivery.drain_outage
                ):
                    # Nothing can be recorded: stop rather than drain for ever
                    # (systemctl stop would kill us). What this node holds stays
                    # in flight under its lease: queued again when the lease
                    # lapses (another node) or at this node's next start.
                    print(
                        f"fastsend: draining with the spool out of reach for"
                        f" {time.monotonic() - self.outage_since:.0f} s: stopping now;"
                        f" {self.inflight} message(s) in flight stay claimed and are queued"
                        " again once the spool answers (lease lapsed, or the next start)",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.stopping = True
                    break
                drain_limit = self.config.delivery.drain_limit
                if self.drain_started and time.monotonic() - self.drain_started >= drain_limit:
                    # A receiver that accepts and never answers holds a window
                    # for the command timeout (300 s): longer than a stop may
                    # take (systemd's TimeoutStopSec=90 ends in SIGKILL).
                    print(
                        f"fastsend: still draining after {drain_limit:g} s: stopping now;"
                        f" {self.inflight} message(s) on connections that did not finish"
                        " go back to the queue",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.stopping = True
                    break
                if not self.outage_since and guard(self.idle_done) is True:
                    break
        finally:
            if feed_task is not None and not feed_task.done():
                feed_task.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, *hup):
                loop.remove_signal_handler(sig)
            await self.shutdown()
            self.guard(self.shaping.close)
            if self.own_suppression:
                self.suppression.close()
        return self.stats

    def close_parts(self) -> None:
        """Closes what building this Supervisor opened (its suppression list,
        the slots' rings) when it is driven by hand instead of by run() (the
        tests' and bench/supervisor_stages.py's stepping); the spool is the
        caller's."""
        self.suppression.close()
        for slot in self.slots:
            for ring in (slot.inbox, slot.outbox):
                if ring is not None:
                    ring.close()
