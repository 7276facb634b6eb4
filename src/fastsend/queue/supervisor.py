"""The supervisor: forks the workers, feeds them from the spool, applies outcomes.

One process, one uvloop loop. Before forking worker i it creates two rings
(``inbox`` supervisor -> worker, ``outbox`` worker -> supervisor); each worker
owns a slice of the source-IP pool. See docs/SCHEDULER.md for the algorithm:

- dispatch: while a worker has room in its window, claim due messages from the
  spool, group them by (campaign, domain) into batches, send the campaign spec
  first if that worker has not seen it, put the batches on its inbox ring;
- outcomes: drain outbox rings when their eventfd fires, decide each message's
  next state (delivered, bounced, deferred with a retry time, expired), apply
  them to the spool in one transaction per tick, write the event log;
- watch: a worker that dies has its outbox drained, its window released back
  to queued, and is forked again with fresh rings;
- stop: the first SIGTERM drains (no new claims, windows finish); a second
  SIGTERM or a SIGINT stops now, releasing the windows back to queued.

It never speaks SMTP and never renders a message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastsend import msgid, wire
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.queue.shaping import SupervisorShaping
from fastsend.retry import next_attempt
from fastsend.ring import Ring
from fastsend.spool import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    SUPPRESSED,
    Claimed,
    Result,
    Spool,
    spool_local_dir,
)
from fastsend.suppression import SOURCE_DELIVERY, SuppressionList

# Per ring, per direction, per worker. Anonymous shared memory: only the pages a
# busy ring touches are resident. Large enough for one maximum-size message (the
# API and listeners accept up to 16 MB) plus its batch framing.
RING_BYTES = wire.RING_BYTES
TICK = 0.02
WORKER_SILENCE = 30.0  # s without a record (Stats come every second): hung, kill -9 it
CRASH_LOOP = 3, 60.0  # this many abnormal exits within this many seconds: a crash loop
STATUS_TTL = 0.5  # s a campaign's status is trusted before rate-held mail is checked again
HANDBACK_SPREAD = 300.0  # s: handed-back mail is spaced at its site's rate up to this far


@dataclass
class WorkerSlot:
    index: int
    ips: list[str]
    pid: int = 0
    inbox: Ring | None = None
    outbox: Ring | None = None
    inflight: dict[int, Claimed] = field(default_factory=dict)
    campaigns: set[int] = field(default_factory=set)
    backlog: list[bytes] = field(default_factory=list)  # records waiting for ring space
    restarts: int = 0
    alive: bool = False
    counters: dict[str, float] = field(default_factory=dict)  # last wire.Stats
    retiring: bool = False  # draining for a reload: respawn on exit, feed nothing
    held: dict[tuple[int, str], list[Claimed]] = field(default_factory=dict)  # rate-held
    last_seen: float = 0.0  # monotonic time of the worker's last record
    crashes: list[float] = field(default_factory=list)  # monotonic times of abnormal exits
    drain_sent: bool = False  # Drain is on its way (SIGTERM): the worker hands back slow mail


@dataclass
class RunStats:
    started: float = field(default_factory=time.monotonic)
    delivered: int = 0
    deferred: int = 0  # deferral events (attempts), not messages
    bounced: int = 0
    expired: int = 0
    suppressed: int = 0
    attempts: int = 0
    worker_restarts: int = 0
    duplicates_possible: int = 0  # messages released from a dead worker's window
    handed_back: int = 0  # messages a worker gave back unattempted (slow site, drain)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "started"}


class Supervisor:
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
    ) -> None:
        # feeder: a generator that spools more mail (one chunk per step) while
        # delivery runs, so sending starts before a long list is fully imported.
        self.feeder = feeder
        self.feeding = feeder is not None
        self.feed_error: BaseException | None = None
        if not config.secret:
            config.secret = msgid.load_secret(config)  # workers inherit it at fork
        self.config = config
        self.spool = spool
        self.events = events
        self.until_idle = until_idle
        self.max_wait = max_wait
        self.on_tick = on_tick
        self.stats = RunStats()
        self.slots = [WorkerSlot(i, config.ips_for_worker(i)) for i in range(config.worker_count)]
        self.results: list[Result] = []
        self.requeues: list[tuple[int, float]] = []  # handed back: (id, next_at)
        self.event_buf: list[dict[str, Any]] = []
        self.draining = False
        self.stopping = False
        self.spec_cache: dict[int, dict[str, Any]] = {}
        self.status_cache: dict[int, tuple[bool, float]] = {}  # campaign -> (active, read at)
        self.tenant_cache: dict[int, str] = {}
        # The suppression list is checked again at dispatch (an address suppressed
        # while its mail waited is not mailed) and learns hard delivery-time bounces.
        self.suppression = suppression or SuppressionList(
            os.path.join(spool_local_dir(config.spool_dir), "suppression.db")
        )
        self.own_suppression = suppression is None
        self.to_suppress: list[tuple[str, str, str, str, int | None]] = []
        self.wake = asyncio.Event()
        self.result_hooks: list[Callable[[Claimed, wire.Res, int], None]] = []
        self.failed_hooks: set[str] = set()
        # Shaping that spans workers: dispatch rates, guardrails, pools, warm-up state.
        self.shaping = SupervisorShaping(config, spool, lambda ev: self.event_buf.append(ev))
        self.result_hooks.append(self.shaping.guardrails.on_result)
        # Complaints arrive as events (ARF intake, webhooks of providers): they
        # count toward the campaign's complaint-rate guardrail.
        events.listeners.append(self._on_events)

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            if ev.get("event") == "complained" and isinstance(ev.get("campaign"), int):
                self.shaping.guardrails.record_complaint(ev["campaign"])

    def rest_ip(self, ip: str, providers: list[str], until: float, reason: str) -> None:
        """Rest a source IP for providers ("*": all) until ``until`` (unix seconds) in the
        worker that owns it (and any worker started later): a DNS blocklist listing."""
        self.shaping.rest_ip(ip, providers, until, reason)
        rec = wire.encoder.encode(wire.IPRest(ip, list(providers), until, reason))
        for slot in self.slots:
            if slot.alive and slot.inbox is not None and (ip in slot.ips or not slot.ips):
                slot.backlog.append(rec)
                self.push_backlog(slot)

    def set_warmup_offsets(self, offsets: dict[str, int]) -> None:
        """Warm-up day offsets per IP for every worker (and any started later)."""
        self.shaping.warmup_offsets = dict(offsets)
        rec = wire.encoder.encode(wire.WarmupAdjust(dict(offsets)))
        for slot in self.slots:
            if slot.alive and slot.inbox is not None:
                slot.backlog.append(rec)
                self.push_backlog(slot)

    # -- workers -------------------------------------------------------------

    def spawn(self, slot: WorkerSlot) -> None:
        from fastsend.delivery.worker import run_worker

        slot.inbox, slot.outbox = Ring(RING_BYTES), Ring(RING_BYTES)
        # An empty get() arms the consumer's waiting flag, so the worker's first
        # put signals our eventfd (the ring signals only a consumer that waits).
        slot.outbox.get()
        slot.campaigns.clear()
        slot.backlog.clear()
        slot.drain_sent = False
        slot.backlog.extend(self.shaping.spawn_records())
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                code = run_worker(slot.index, self.config, slot.ips, slot.inbox, slot.outbox)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        slot.pid = pid
        slot.alive = True
        slot.last_seen = time.monotonic()
        loop = asyncio.get_running_loop()
        outbox = slot.outbox
        loop.add_reader(outbox.reader_fd, self.on_outbox, slot, outbox)

    def reap(self) -> None:
        for slot in self.slots:
            if not slot.alive:
                continue
            try:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = slot.pid, 0
            if pid == 0:
                if time.monotonic() - slot.last_seen > WORKER_SILENCE:
                    # Hung (its loop blocked, or stopped): its window would stay in
                    # flight forever. Kill it; the next reap restarts it.
                    print(
                        f"fastsend: worker {slot.index} (pid {slot.pid}) silent for"
                        f" {WORKER_SILENCE:g} s; killing it",
                        file=sys.stderr,
                    )
                    slot.last_seen = time.monotonic()
                    try:
                        os.kill(slot.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                continue
            slot.alive = False
            code = os.waitstatus_to_exitcode(status)
            why = ""
            if not slot.retiring and not self.stopping and not (self.draining and code == 0):
                now = time.monotonic()
                slot.crashes = [t for t in slot.crashes if now - t < CRASH_LOOP[1]] + [now]
                if len(slot.crashes) >= CRASH_LOOP[0]:
                    # Its window may hold a message that kills it: counting the
                    # attempt (backoff, then expiry) ends the loop, and with it
                    # the duplicates each release would send again.
                    why = (
                        f"local error: worker {slot.index} exited {len(slot.crashes)} times"
                        f" in {CRASH_LOOP[1]:g} s (last status {code})"
                    )
            self.retire(slot, why)
            if slot.retiring:  # replaced by reload(): a fresh worker on the new config
                slot.retiring = False
                if not (self.draining or self.stopping):
                    self.spawn(slot)
                continue
            if not (self.draining and code == 0) and not self.stopping:
                print(
                    f"fastsend: worker {slot.index} (pid {slot.pid}) exited with status {code};"
                    " restarting it",
                    file=sys.stderr,
                )
                slot.restarts += 1
                self.stats.worker_restarts += 1
                self.spawn(slot)

    def retire(self, slot: WorkerSlot, defer: str = "") -> None:
        """A worker is gone: take its last outcomes, requeue the rest of its window
        (or, given a reason ``defer``, answer it as a deferred attempt)."""
        loop = asyncio.get_running_loop()
        if slot.outbox is not None:
            loop.remove_reader(slot.outbox.reader_fd)
            self.drain_outbox(slot, slot.outbox)
        if slot.inflight:
            ids = list(slot.inflight)
            self.stats.duplicates_possible += len(ids)
            if defer:
                self.apply(
                    slot, [wire.Res(i, wire.K_DEFERRED, 451, "4.3.0", defer, "", "") for i in ids]
                )
            self.flush_results()
            self.spool.release(ids)
            slot.inflight.clear()
        slot.held.clear()
        if slot.inbox is not None:
            # A backlog may be waiting for inbox space: the fd is about to close
            # and its number to be reused by the next rings, so unregister it.
            loop.remove_reader(slot.inbox.writer_fd)
        for ring in (slot.inbox, slot.outbox):
            if ring is not None:
                ring.close()
        slot.inbox = slot.outbox = None

    async def reload(self, config: Config) -> None:
        """Swap in a new config (routes, shaping, ...) and replace the workers one at
        a time: each is sent Drain, finishes its window and exits, and is forked
        again on the new config; the others keep delivering meanwhile. The
        worker count and the spool do not change here (they need a restart)."""
        config.workers = self.config.workers
        if not config.secret:  # as in __init__: Message-ID/VERP tokens must still verify
            config.secret = msgid.load_secret(config)
        self.config = config
        self.shaping.reconfigure(config)  # dispatch rates, guardrails, pools
        for slot in self.slots:  # a slot respawned by reap() meanwhile gets them too
            slot.ips = config.ips_for_worker(slot.index)
        for slot in self.slots:
            if self.draining or self.stopping:
                return
            if not slot.alive or slot.inbox is None:
                continue
            slot.retiring = True
            slot.drain_sent = True
            slot.backlog.append(wire.encoder.encode(wire.Drain()))
            self.push_backlog(slot)
            while slot.retiring and not (self.draining or self.stopping):
                await asyncio.sleep(0.02)

    # -- dispatch ------------------------------------------------------------

    def dispatch(self) -> None:
        if self.draining or self.stopping:
            self.release_held()
            if not self.stopping:
                self.drain_workers()
            return
        now = time.time()
        size = self.config.delivery.batch_size
        window = self.config.delivery.window
        nothing_due = False
        for slot in self.slots:
            if not slot.alive or slot.inbox is None or slot.backlog or slot.retiring:
                continue
            groups: dict[tuple[int, str], list[Claimed]] = {}
            room = window - len(slot.inflight)
            if not nothing_due and room >= min(size, window // 4 or 1):
                claimed = self.spool.claim_due(now, room)
                nothing_due = not claimed
                if claimed and self.config.delivery.check_suppression:
                    claimed = self.screen(claimed, now)
                for c in claimed:
                    slot.inflight[c.id] = c
                    groups.setdefault((c.campaign, c.domain), []).append(c)
            groups = self.gate(slot, groups)
            if not groups:
                continue
            records: list[bytes] = []
            for (campaign, domain), items in groups.items():
                if campaign not in slot.campaigns:
                    head, why = self.spec_records(campaign)
                    if not head:  # it can never be rendered: final, not stuck in flight
                        self.fail(slot, items, 554, "5.3.0", why)
                        continue
                    records.extend(head)
                    slot.campaigns.add(campaign)
                for i in range(0, len(items), size):
                    records.extend(self.batch_records(slot, campaign, domain, items[i : i + size]))
            slot.backlog.extend(records)
            self.push_backlog(slot)

    def screen(self, claimed: list[Claimed], now: float) -> list[Claimed]:
        """Dispatch-time suppression: the claimed messages whose address is not
        suppressed for their campaign's tenant. The others end as ``suppressed``
        (an event each), never delivered. One lookup per tenant per claim."""
        by_tenant: dict[str, list[Claimed]] = {}
        tenant_of = self.tenant_of
        for c in claimed:
            by_tenant.setdefault(tenant_of(c.campaign), []).append(c)
        gone: list[tuple[Claimed, str, str]] = []
        for tenant, items in by_tenant.items():
            try:
                hits = self.suppression.reasons_many([c.rcpt for c in items], tenant=tenant)
            except Exception:  # an unreadable list must not stop delivery: say so
                self.hook_failed(self.suppression.reasons_many)
                return claimed
            if hits:
                gone += [(c, tenant, hits[c.rcpt]) for c in items if c.rcpt in hits]
        if not gone:
            return claimed
        drop = {c.id for c, _t, _r in gone}
        log_events = self.events.path is not None or bool(self.events.listeners)
        for c, tenant, reason in gone:
            text = f"suppressed for tenant {tenant}: {reason}"
            self.results.append(Result(c.id, SUPPRESSED, c.attempts, 0.0, 0, "", text))
            self.stats.suppressed += 1
            if log_events:
                self.event_buf.append(
                    {
                        "time": now,
                        "event": "suppressed",
                        "id": c.id,
                        "campaign": c.campaign,
                        "tenant": tenant,
                        "rcpt": c.rcpt,
                        "reason": reason,
                        "stage": "dispatch",
                    }
                )
        return [c for c in claimed if c.id not in drop]

    def tenant_of(self, campaign: int) -> str:
        t = self.tenant_cache.get(campaign)
        if t is None:
            info = self.spool.get_campaign(campaign)
            t = info.tenant if info is not None else "default"
            if len(self.tenant_cache) > 100_000:
                self.tenant_cache.clear()
            self.tenant_cache[campaign] = t
        return t

    def spec_records(self, campaign: int) -> tuple[list[bytes], str]:
        """The records that introduce a campaign to a worker, or why there are none."""
        try:
            spec = self.campaign_spec(campaign)
        except KeyError:
            return [], f"campaign {campaign} is missing from the spool"
        rec = wire.encoder.encode(wire.CampaignSpec(campaign, spec))
        if len(rec) > RING_BYTES - 64:
            return [], f"campaign {campaign} is too large for a worker's ring ({len(rec)} bytes)"
        info = self.spool.get_campaign(campaign)
        named = wire.encoder.encode(
            wire.CampaignInfo(campaign, info.name if info else "", info.tenant if info else "")
        )
        return [rec, named, *self.shaping.campaign_records(campaign)], ""

    def batch_records(
        self, slot: WorkerSlot, campaign: int, domain: str, items: list[Claimed]
    ) -> list[bytes]:
        """Batch records of ``items``, split so that each fits the ring comfortably
        (a record the ring can never hold would raise in put()); a single message
        too large for the ring is bounced."""
        rec = wire.encoder.encode(
            wire.Batch(
                campaign, domain, [wire.Item(c.id, c.rcpt, c.vars, c.attempts) for c in items]
            )
        )
        n = len(rec)
        if n <= RING_BYTES // 4 or (len(items) == 1 and n <= RING_BYTES - 64):
            return [rec]
        if len(items) > 1:
            half = len(items) // 2
            return self.batch_records(slot, campaign, domain, items[:half]) + self.batch_records(
                slot, campaign, domain, items[half:]
            )
        self.fail(slot, items, 552, "5.3.4", f"message too large for a worker's ring ({n} bytes)")
        return []

    def fail(
        self, slot: WorkerSlot, items: list[Claimed], code: int, enhanced: str, text: str
    ) -> None:
        """Bounce claimed messages that can never be handed to a worker."""
        print(f"fastsend: {len(items)} message(s) bounced: {text}", file=sys.stderr)
        self.apply(
            slot, [wire.Res(c.id, wire.K_FAILED, code, enhanced, text, "", "") for c in items]
        )

    def gate(
        self, slot: WorkerSlot, groups: dict[tuple[int, str], list[Claimed]]
    ) -> dict[tuple[int, str], list[Claimed]]:
        """Per-campaign / per-tenant / global dispatch rates (fastsend.queue.shaping):
        what may not go yet waits in ``slot.held`` (in flight, inside the window)."""
        if slot.held:
            # Rate-held mail of a campaign paused or cancelled meanwhile (on any
            # node: the status is the spool's) goes back to the queue, undispatched.
            stopped = [key for key in slot.held if not self.campaign_active(key[0])]
            if stopped:
                ids = [c.id for key in stopped for c in slot.held.pop(key)]
                for i in ids:
                    slot.inflight.pop(i, None)
                self.spool.release(ids)
            for key, items in groups.items():
                slot.held.setdefault(key, []).extend(items)
            groups, slot.held = slot.held, {}
        admit = self.shaping.gate.admit
        mono = time.monotonic()
        out: dict[tuple[int, str], list[Claimed]] = {}
        for key, items in groups.items():
            n = admit(key[0], len(items), mono)
            if n:
                out[key] = items if n == len(items) else items[:n]
            if n < len(items):
                slot.held[key] = items[n:]
        return out

    def campaign_active(self, campaign: int) -> bool:
        """The campaign's status, read from the spool at most every STATUS_TTL s."""
        now = time.monotonic()
        ent = self.status_cache.get(campaign)
        if ent is None or now - ent[1] > STATUS_TTL:
            info = self.spool.get_campaign(campaign)
            ent = self.status_cache[campaign] = (info is not None and info.status == "active", now)
        return ent[0]

    def drain_workers(self) -> None:
        """SIGTERM: tell each worker at once, so it hands back the mail of sites
        that cannot finish soon instead of the drain waiting for them."""
        for slot in self.slots:
            if slot.alive and slot.inbox is not None and not slot.drain_sent:
                slot.drain_sent = True
                slot.backlog.append(wire.encoder.encode(wire.Drain()))
                self.push_backlog(slot)

    def release_held(self) -> None:
        """Stopping: rate-held messages go back to queued."""
        for slot in self.slots:
            if slot.held:
                ids = [c.id for items in slot.held.values() for c in items]
                for i in ids:
                    slot.inflight.pop(i, None)
                slot.held.clear()
                self.spool.release(ids)

    def campaign_spec(self, campaign_id: int) -> dict[str, Any]:
        spec = self.spec_cache.get(campaign_id)
        if spec is None:
            info = self.spool.get_campaign(campaign_id)
            if info is None:
                raise KeyError(f"campaign {campaign_id} not in spool")
            spec = self.spec_cache[campaign_id] = info.spec
        return spec

    def push_backlog(self, slot: WorkerSlot) -> None:
        ring = slot.inbox
        if ring is None:
            return
        while slot.backlog:
            if not ring.put(slot.backlog[0]):
                loop = asyncio.get_running_loop()
                loop.add_reader(ring.writer_fd, self.on_inbox_space, slot, ring)
                return
            slot.backlog.pop(0)

    def on_inbox_space(self, slot: WorkerSlot, ring: Ring) -> None:
        asyncio.get_running_loop().remove_reader(ring.writer_fd)
        ring.clear_writer()
        if slot.inbox is ring:
            self.push_backlog(slot)

    # -- outcomes ------------------------------------------------------------

    def on_outbox(self, slot: WorkerSlot, ring: Ring) -> None:
        ring.clear_reader()
        self.drain_outbox(slot, ring)

    def drain_outbox(self, slot: WorkerSlot, ring: Ring) -> None:
        decode = wire.from_worker_decoder.decode
        got = False
        while (rec := ring.get()) is not None:
            slot.last_seen = time.monotonic()
            msg = decode(rec)
            if isinstance(msg, wire.Results):
                self.apply(slot, msg.items)
                got = True
            elif isinstance(msg, wire.Handback):
                self.handback(slot, msg)
                got = True
            elif isinstance(msg, wire.Stats):
                slot.counters = msg.counters
            elif isinstance(msg, wire.Events):
                self.event_buf.extend(msg.events)  # transport failover
            else:
                self.shaping.on_record(msg)
        if got:
            self.wake.set()

    def apply(self, slot: WorkerSlot, items: list[wire.Res]) -> None:
        now = time.time()
        policy = self.config.retry
        stats = self.stats
        results = self.results
        events = self.event_buf
        inflight = slot.inflight
        log_events = self.events.path is not None or bool(self.events.listeners)
        for r in items:
            c = inflight.pop(r.id, None)
            if c is None:
                continue  # already released (duplicate answer after a restart)
            attempts = c.attempts + 1
            stats.attempts += 1
            if r.kind == wire.K_DELIVERED:
                state, name, at = DELIVERED, "delivered", 0.0
                stats.delivered += 1
            elif r.kind == wire.K_FAILED:
                state, name, at = BOUNCED, "bounced", 0.0
                stats.bounced += 1
                if r.hard:  # the address can never receive: suppress it for the tenant now
                    self.to_suppress.append(
                        (self.tenant_of(c.campaign), c.rcpt, r.reason, SOURCE_DELIVERY, c.id)
                    )
            else:
                nxt = next_attempt(policy, attempts, now, c.created)
                if nxt is None:
                    state, name, at = EXPIRED, "expired", 0.0
                    stats.expired += 1
                else:
                    state, name, at = DEFERRED, "deferred", nxt
                    stats.deferred += 1
            results.append(Result(c.id, state, attempts, at, r.code, r.enhanced, r.text))
            for hook in self.result_hooks:
                try:
                    hook(c, r, state)
                except Exception:  # a hook's bug must not strand the rest of the record
                    self.hook_failed(hook)
            if log_events:
                ev = {
                    "time": now,
                    "event": name,
                    "id": c.id,
                    "campaign": c.campaign,
                    "rcpt": c.rcpt,
                    "source_ip": r.source_ip,
                    "mx": r.mx,
                    "code": r.code,
                    "enhanced": r.enhanced,
                    "text": r.text,
                    "attempt": attempts,
                }
                if state != DELIVERED:
                    ev["stage"] = r.stage
                    ev["reason"] = r.reason
                    ev["hard"] = r.hard
                if r.queue_id:
                    ev["queue_id"] = r.queue_id
                if state == EXPIRED:
                    ev["reason"] = "expired"
                    ev["last_reason"] = r.reason
                elif state == DEFERRED:
                    ev["next_attempt"] = at
                elif state == BOUNCED:
                    ev["suppressed"] = r.hard
                events.append(ev)

    def handback(self, slot: WorkerSlot, msg: wire.Handback) -> None:
        """Mail a worker gave back unattempted: queued again (attempts unchanged),
        the k-th at ``at + min(k * step, HANDBACK_SPREAD)``. Its outcome for this
        claim; no attempt, no event, no result hook."""
        inflight = slot.inflight
        out = self.requeues
        at, step = msg.at, msg.step
        k = 0
        for i in msg.ids:
            if inflight.pop(i, None) is None:
                continue  # already released (duplicate answer after a restart)
            out.append((i, at + min(k * step, HANDBACK_SPREAD)))
            k += 1
        self.stats.handed_back += k

    def flush_results(self) -> None:
        if self.to_suppress:
            # Before the spool records the bounce: a crash in between re-sends
            # to the address at worst, never leaves it unsuppressed.
            try:
                self.suppression.add_entries(self.to_suppress)
                self.to_suppress = []
            except Exception:  # locked or unwritable: keep them, try again next tick
                self.hook_failed(self.suppression.add_entries)
                del self.to_suppress[:-100_000]
        if self.results:
            self.spool.record_results(self.results, time.time())
            self.results = []
        if self.requeues:
            self.spool.requeue(self.requeues, time.time())
            self.requeues = []
        if self.event_buf:
            buf, self.event_buf = self.event_buf, []
            try:
                self.events.emit_many(buf)  # the file, then listeners (webhooks, index)
            except Exception:
                self.hook_failed(self.events.emit_many)
        self.events.flush()

    def hook_failed(self, hook: Any) -> None:
        """Report a result hook or event listener that raised (once per hook)."""
        name = getattr(hook, "__qualname__", repr(hook))
        if name not in self.failed_hooks:
            self.failed_hooks.add(name)
            import traceback

            print(f"fastsend: {name} raised (outcomes are still applied):", file=sys.stderr)
            traceback.print_exc()

    # -- main loop -----------------------------------------------------------

    @property
    def inflight(self) -> int:
        return sum(len(s.inflight) for s in self.slots)

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
        short per chunk); a drain does not stop it (what is read is spooled and
        stays queued for `resume`), a stop-now does."""
        assert self.feeder is not None
        try:
            for _ in self.feeder:
                self.wake.set()
                await asyncio.sleep(0)
                if self.stopping:
                    break
        except Exception as e:  # reported by the caller; what was spooled stays
            self.feed_error = e
        finally:
            self.feeding = False
            self.wake.set()

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGTERM and not self.draining:
            self.draining = True
        else:
            self.stopping = True
        self.wake.set()

    async def run(self) -> RunStats:
        loop = asyncio.get_running_loop()
        self.spool.recover()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        for slot in self.slots:
            self.spawn(slot)
        feed_task = loop.create_task(self._feed()) if self.feeder is not None else None
        last_reap = 0.0
        try:
            while True:
                self.dispatch()
                try:
                    await asyncio.wait_for(self.wake.wait(), TICK)
                except TimeoutError:
                    pass
                self.wake.clear()
                for slot in self.slots:  # cheap safety net: a get() on an empty ring
                    if slot.outbox is not None:
                        self.drain_outbox(slot, slot.outbox)
                self.flush_results()
                now = time.monotonic()
                if now - last_reap > 0.1:
                    self.reap()
                    self.shaping.tick()
                    recs = self.shaping.broadcast_records()
                    for slot in self.slots if recs else ():
                        if slot.alive and slot.inbox is not None:
                            slot.backlog.extend(recs)
                            self.push_backlog(slot)
                    self.spool.renew()  # a shared spool's lease on our claims (no-op: SQLite)
                    last_reap = now
                if self.on_tick:
                    self.on_tick(self)
                if self.stopping:
                    break
                if self.idle_done():
                    break
        finally:
            if feed_task is not None and not feed_task.done():
                feed_task.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.shutdown()
            self.shaping.close()
            if self.own_suppression:
                self.suppression.close()
        return self.stats

    async def shutdown(self) -> None:
        """Stop the workers: Drain and wait (normal end), or terminate (stop now)."""
        for slot in self.slots:
            if slot.alive and slot.inbox is not None and not self.stopping and not slot.drain_sent:
                slot.drain_sent = True
                slot.backlog.append(wire.encoder.encode(wire.Drain()))
                self.push_backlog(slot)
        deadline = time.monotonic() + (2.0 if self.stopping else 60.0)
        while any(s.alive for s in self.slots) and time.monotonic() < deadline:
            if self.stopping:
                for s in self.slots:
                    if s.alive:
                        try:
                            os.kill(s.pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
            await asyncio.sleep(0.02)
            self.draining = True
            self.spool.renew()
            self.reap_final()
        for s in self.slots:
            if s.alive:
                try:
                    os.kill(s.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(s.pid, 0)
                s.alive = False
                self.retire(s)
        self.flush_results()

    def reap_final(self) -> None:
        for slot in self.slots:
            if not slot.alive:
                continue
            try:
                pid, _status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                pid = slot.pid
            if pid:
                slot.alive = False
                self.retire(slot)
            elif slot.outbox is not None:
                self.drain_outbox(slot, slot.outbox)
        self.flush_results()
