"""Run the delivery engine on a spool until the work is done: the piece that
``send``, ``resume`` and ``demo`` share (``serve`` runs the same supervisor
without an end).

It wires a :class:`~fastsend.queue.supervisor.Supervisor` to a spool, an
event log and a progress display, runs it on uvloop, and returns a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.queue.state import RunStats
from fastsend.queue.supervisor import Supervisor
from fastsend.spool import Spool


class Progress:
    """A one-line live progress display on a terminal (rate, counts, ETA)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, every: float = 0.5) -> None:
        self.total = total
        self.stream = stream
        self.every = every
        self.enabled = stream.isatty()
        self.last = 0.0
        self.t0 = time.monotonic()
        self.total_fn: Callable[[], int] | None = None  # while the list is still being spooled

    def __call__(self, sup: Supervisor) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        s = sup.stats
        if self.total_fn is not None:
            self.total = self.total_fn()
        done = s.delivered + s.bounced + s.expired
        el = max(1e-6, now - self.t0)
        rate = done / el
        left = max(0, self.total - done)
        eta = f"{left / rate:5.0f}s" if rate > 0 else "    ?"
        width = 24
        frac = min(1.0, done / self.total) if self.total else 1.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        self._write(
            f"\r[{bar}] {frac * 100:5.1f}%  {rate:8.0f} msg/s  delivered {s.delivered}"
            f"  deferred {s.deferred}  bounced {s.bounced}  expired {s.expired}  ETA {eta} "
        )

    def done(self) -> None:
        if self.enabled:
            self._write("\n")

    def _write(self, text: str) -> None:
        """Show ``text``; a terminal that went away (hung up: EIO) ends the display,
        not the run: the supervisor called this from its loop, and the OSError
        ended a hangup's drain with mail on the wire (attempts of unknown
        outcome, sent again by resume)."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.enabled = False


SUPERVISOR_GC_YOUNG = 50_000

# engine.run's ``rollups`` when the caller attached none: the run attaches its own.
OWN_ROLLUPS: Any = object()


def attach_rollups(config: Config, spool: Spool, events: EventLog) -> Any:
    """The rollups (``fastsend top``, ``/v1/stats``) on ``events``, for a caller that
    emits events before :func:`run` (``send`` accepts the list's first chunk first):
    attached after those events, they would miss them, and the next start would
    count them as a killed run's (said as one). ``None`` when analytics is off."""
    from fastsend.analytics.attach import attach  # issue 14: rollups beside the spool

    # No tracking or intake runs in this process: nothing to attribute engagement to.
    return attach(config, spool, events, engagement=False)


def run(
    config: Config,
    spool: Spool,
    *,
    max_wait: float = 300.0,
    total: int = 0,
    progress: bool = True,
    campaign: int | None = None,
    feeder: Iterator[object] | None = None,
    total_fn: Callable[[], int] | None = None,
    events: EventLog | None = None,
    suppression: Any = None,
    cluster: Any = None,
    rollups: Any = OWN_ROLLUPS,
) -> dict[str, Any]:
    """Deliver until done. ``feeder`` spools more mail while delivery runs (see
    Supervisor); ``total_fn`` gives the progress line the count spooled so far.
    ``events``: the caller's event log (it stays open), else the config's.
    ``suppression``: the list dispatch screens against and hard bounces go to
    (a shared spool's: every node's, in Redis); None: ``<spool>/suppression.db``.
    ``cluster``: this node's hold on its source IPs on a shared spool
    (``fastsend.cluster.ClusterNode``, claimed by the caller): renewed while
    it runs (an IP another live node took meanwhile is rested), given back at
    the end. ``rollups``: what the caller attached to ``events`` with
    :func:`attach_rollups` before its first event (closed here); by default the
    run attaches its own."""
    own_events = events is None
    if events is None:
        events = EventLog(config.event_log_path)
    if rollups is OWN_ROLLUPS:
        rollups = attach_rollups(config, spool, events)
    from fastsend.analytics import tlsrpt

    tls_counts = tlsrpt.attach(config, events, spool)  # the TLS sessions, for RFC 8460 reports
    bar = Progress(total) if progress else None
    if bar is not None and total_fn is not None:
        bar.total_fn = total_fn
    sup = Supervisor(
        config,
        spool,
        events,
        until_idle=True,
        max_wait=max_wait,
        on_tick=_ticks(bar, cluster),
        feeder=feeder,
        suppression=suppression,
        checkpoints_behind=True,  # the WAL copied back off the loop (SQLite spools)
    )
    cpu0 = os.times()  # this process, and its reaped children (the workers)
    t0 = time.monotonic()
    # Young collections every SUPERVISOR_GC_YOUNG container allocations, not
    # 700: the supervisor allocates several per row (claims, outcomes, events)
    # and at the default ran ~300 collections per 100k messages, the older ones
    # re-scanning every row in flight (~1-2 us per message). Cycles are still
    # collected; the threshold is restored after the run (tests run many in one
    # process). The command's modules were frozen at entry (cli.main).
    threshold = gc.get_threshold()
    gc.set_threshold(SUPERVISOR_GC_YOUNG, *threshold[1:])
    try:
        # The supervisor runs the standard asyncio loop: it forks workers from
        # inside its loop, and a child forked from a running uvloop loop cannot
        # run a working uvloop loop of its own (seen here: its callbacks stall).
        # Each worker creates its own uvloop loop after the fork.
        with asyncio.Runner() as runner:
            stats = runner.run(sup.run())
    finally:
        spool.checkpoint_soon()  # its last pass beside the closing below
        gc.set_threshold(*threshold)
        if own_events:
            events.close()
        else:
            events.flush()
        if rollups is not None:
            rollups.close()
        if tls_counts is not None:
            tls_counts.detach(events)
        if bar:
            bar.done()
        if cluster is not None:  # its IPs back at once (a kill leaves them to the lease)
            with contextlib.suppress(Exception):
                cluster.release()
    elapsed = time.monotonic() - t0
    cpu1 = os.times()
    counts = final_counts(spool, stats, campaign)
    done = stats.delivered + stats.bounced + stats.expired
    return {
        "campaign": campaign,
        **counts,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(done / elapsed, 1) if elapsed > 0 else 0.0,
        "attempts": stats.attempts,
        "deferrals": stats.deferred,
        "worker_restarts": stats.worker_restarts,
        "requeued_from_dead_workers": stats.duplicates_possible,
        # TLS-RPT: sessions and policy fetches that failed a domain's MTA-STS or DANE policy
        "tls_policy_failures": sum(stats.tls_failures.values()),
        "feed_error": str(sup.feed_error) if sup.feed_error else None,
        # Stopped by SIGTERM/SIGINT (its number; 0: ran until done or --max-wait).
        "signal": sup.stop_signal,
        "supervisor_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3),
        "workers_cpu_s": round(
            (cpu1.children_user - cpu0.children_user)
            + (cpu1.children_system - cpu0.children_system),
            3,
        ),
        "worker_cpu_s": [round(s.cpu_s, 3) for s in sup.slots],  # per worker slot
    }


def _ticks(bar: Progress | None, cluster: Any) -> Callable[[Supervisor], None] | None:
    """The supervisor's ``on_tick``: the progress line, and a shared spool's
    hold on this node's source IPs renewed every lease/4 (an outage of Redis
    waits, as the supervisor's other spool steps do)."""
    if cluster is None:
        return bar
    renewed = [time.monotonic()]

    def tick(sup: Supervisor) -> None:
        if bar is not None:
            bar(sup)
        now = time.monotonic()
        if now - renewed[0] >= cluster.lease / 4 and not sup.outage_since:
            renewed[0] = now
            sup.guard(cluster.renew_and_rest, sup.rest_ip)

    return tick


def final_counts(spool: Spool, stats: RunStats, campaign: int | None) -> dict[str, int]:
    """The messages of ``campaign`` (None: the spool's) per summary state at the
    end of a run ("deferred": still pending). A campaign this process created,
    whose rows were all spooled here and whose spool nothing else wrote since
    (``Spool.tally``), has had no outcome but the ones this run applied: its
    counts follow from those, exactly, without reading its rows (~20 ms per
    100,000). Any other is counted in the spool."""
    finals = stats.finals
    tally = spool.tally(campaign) if campaign is not None and finals is not None else None
    if tally is not None and campaign is not None and finals is not None:
        rows, suppressed = tally
        delivered, bounced, expired, dropped = finals.get(campaign, (0, 0, 0, 0))
        pending = rows - suppressed - delivered - bounced - expired - dropped
        if pending >= 0:
            return {
                "delivered": delivered,
                "deferred": pending,
                "bounced": bounced,
                "suppressed": suppressed + dropped,
                "expired": expired,
            }
    counts = spool.counts(campaign)
    return {
        "delivered": counts["delivered"],
        "deferred": counts["queued"] + counts["deferred"] + counts["inflight"],
        "bounced": counts["bounced"],
        "suppressed": counts["suppressed"],
        "expired": counts["expired"],
    }
