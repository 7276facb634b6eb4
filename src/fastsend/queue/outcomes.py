"""Outcome application: drain a worker's outbox ring, decode its records, decide
each message's next state (delivered, bounced, deferred with a retry time,
expired; handed back unattempted), then once per tick apply them to the spool
in one transaction, learn hard bounces into the suppression list, and write the
event log. Result hooks (guardrails) see every outcome.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import Any, cast

import orjson

from fastsend import wire
from fastsend._accel import pick
from fastsend.bounce import classify_reply
from fastsend.config import RetryConfig
from fastsend.events import DeliveredRows, Rows, outcome_dict, stamped
from fastsend.faults import FAULT, countdown
from fastsend.queue.state import SupervisorState, WorkerSlot, note_answered
from fastsend.retry import next_attempt, retry_hint
from fastsend.ring import Ring
from fastsend.spool import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    SITE_STATUSES,
    UNKNOWN_CODE,
    UNKNOWN_ENHANCED,
    Claimed,
    Result,
    SpoolStorageError,
    Untold,
    storage_problem,
)
from fastsend.suppression import SOURCE_DELIVERY

# A site recovering: a delivery to a domain after this many deferrals in a row
# that its receivers answered (4xx) brings that domain's deferred mail forward
# (Outcomes.note_deferral, bring_forward: Spool.bring_forward).
RECOVER_AFTER = 3
DEFERRING_MAX = 10_000  # domains followed at once (the oldest dropped)
BRING_MAX = 10_000  # rows brought forward per recovery
HANDBACK_SPREAD = 300.0  # s: handed-back mail is spaced at its site's rate up to this far
# The loop writes outcomes once this many wait, or once the first has waited this
# long: a transaction of ~1,000 outcomes costs about half as much CPU per outcome
# as one of ~200 (each B-tree page of the spool is rewritten once for more rows).
FLUSH_ROWS = 1000
FLUSH_AGE = 0.05  # s
BUILD_SAMPLE = 50  # messages built between two wire.Stats that make a new build_cost


def note_build(slot: WorkerSlot, stats: wire.Stats) -> None:
    """``slot.build_cost`` from what its worker built since its last
    ``stats`` (cumulative counters; a restarted worker counts from 0 again):
    the cost of the mail it is given now, not of the run's start."""
    new = stats.counters
    old = slot.counters if slot.counters_pid == stats.pid else {}
    n = new.get("messages_built", 0.0) - old.get("messages_built", 0.0)
    if n >= BUILD_SAMPLE:
        spent = new.get("build_cpu_seconds", 0.0) - old.get("build_cpu_seconds", 0.0)
        slot.build_cost = max(0.0, spent) / n


class Outcomes(SupervisorState):
    @staticmethod
    def _on_rows(rows: Rows) -> None:
        """The accepted and delivered events of a Rows batch hold no complaint."""

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        # Nearly every batch (accepted, delivered) has no complaint nor a
        # bounce: looked for at C speed (dict.get mapped over the batch), each
        # event visited in Python only when one is there.
        kinds = set(map(dict.get, events, repeat("event")))
        if "complained" not in kinds and "bounced" not in kinds:
            return
        guardrails = self.shaping.guardrails
        for ev in events:
            kind = ev.get("event")
            if not isinstance(ev.get("campaign"), int):
                continue
            if kind == "complained":
                guardrails.record_complaint(ev["campaign"])
            elif kind == "bounced" and ev.get("source") == "async":
                # a DSN or a provider's bounce about mail the receiver took
                # (counted delivered then); the supervisor's own are counted
                # as they are decided (Guardrails.on_result)
                guardrails.record_bounce(ev["campaign"], str(ev.get("reason") or "unknown"))

    def on_outbox(self, slot: WorkerSlot, ring: Ring) -> None:
        ring.clear_reader()
        self.drain_outbox(slot, ring)

    def drain_outbox(self, slot: WorkerSlot, ring: Ring) -> None:
        """Every record the worker wrote: the items of consecutive Results
        records applied together (one ``apply``: one events batch, one pass of
        the guardrails' counts, not one per record: a worker flushes every few
        ms, a record holds ~10-30 outcomes), in order with the other records."""
        decode = wire.from_worker_decoder.decode
        results, answered = wire.Results, wire.Answered
        got = seen = False
        items: list[wire.Res | wire.Sent] = []
        while (rec := ring.get()) is not None:
            seen = True
            msg = decode(rec)
            if type(msg) is results:
                if items:
                    items += msg.items
                else:
                    items = msg.items
                continue
            if type(msg) is answered:  # (kept, not applied: no need to apply items first)
                note_answered(slot, msg.items)
                continue
            if items:
                self.apply(slot, items)
                items = []
                got = True
            if isinstance(msg, wire.Handback):
                self.handback(slot, msg)
                self.outcomes_gen += 1  # (held mail may go: Dispatch.regate_later)
                got = True
            elif isinstance(msg, wire.Stats):
                note_build(slot, msg)
                slot.counters = msg.counters
                slot.counters_pid = msg.pid  # a restarted worker counts from 0 again
            elif isinstance(msg, wire.Conns):
                self.on_conns(slot, msg)
            elif isinstance(msg, wire.Lanes):
                if slot.retiring:
                    self.on_lanes(slot, msg)
            elif isinstance(msg, wire.Events):
                self.event_buf.extend(msg.events)  # transport failover, TLS-RPT
                for e in msg.events:
                    if e.get("event") == "tls_report":
                        self.stats.count_tls(e)
            else:
                # A reload's retiring worker is not its slot's worker: a rest it
                # meets is told to the slot's new one too (share_rests skips the
                # origin), which sends from the same addresses.
                self.shaping.on_record(msg, -1 if slot.retiring else slot.index)
        if items:
            self.apply(slot, items)
            got = True
        if self.shaping.rests_to_share:
            # A rest or a rule's throttle of an address other workers send from
            # too: told now, not at the next dispatch (none may come before the
            # run ends, or for a while in a quiet serve)
            self.share_rests()
        if seen:
            slot.last_seen = time.monotonic()
        if got:
            self.wake.set()

    def apply(self, slot: WorkerSlot, items: list[wire.Res | wire.Sent]) -> None:
        """Decide each outcome's next state: a Result for the spool, an event, the
        result hooks. Deliveries (nearly every outcome, most in ``wire.Sent``
        groups) take a short path: their events are kept as columns
        (``DeliveredRows``: the claim and the answer, no dict), in order with
        the other events; the guardrails count them per campaign once per
        call (a drained run of records), before any other outcome of it
        reaches them, so each check sees the same counts as when they were
        counted one by one."""
        self.outcomes_gen += 1  # (held mail may go: Dispatch.regate_later)
        now = time.time()
        policy = self.config.retry
        stats = self.stats
        pop = slot.inflight.pop
        hooks = self.result_hooks
        log_events = self.events.path is not None or bool(self.events.listeners)
        rows = DeliveredRows(now)
        delivered: dict[int, int] = {}  # campaign -> deliveries not yet counted
        counts = [0, 0]  # outcomes applied, of which delivered
        make = (Result, DELIVERED, wire.K_DELIVERED, wire.Sent, wire.Res)
        end = len(items)
        i = 0
        try:
            while True:
                i, c = apply_delivered(
                    items, i, pop, hooks, self.hook_failed, make, self.results,
                    rows.claims if log_events else None, rows.results, delivered, counts,
                )  # fmt: skip
                if c is None:
                    if i >= end:
                        break
                    apply_sent(
                        cast(wire.Sent, items[i]), pop, hooks, self.hook_failed, make, self.results,
                        rows.claims if log_events else None, rows.results, delivered, counts,
                    )  # fmt: skip
                    i += 1
                    continue
                r = items[i]  # another outcome: the deliveries before it counted, then it
                i += 1
                if delivered:
                    self._count_delivered(delivered)
                    delivered = {}
                if rows.claims:  # the deliveries before it, then its event
                    self.event_buf.append(rows)
                    rows = DeliveredRows(now)
                assert type(r) is wire.Res
                self._apply_other(c, r, c.attempts + 1, now, policy, log_events)
        finally:
            if rows.claims:
                self.event_buf.append(rows)
            if delivered:
                self._count_delivered(delivered)
            n, ok = counts
            stats.attempts += n
            stats.delivered += ok
            slot.unwritten += n

    def _count_delivered(self, delivered: dict[int, int]) -> None:
        final = self.stats.final
        for cid, k in delivered.items():
            final(cid)[0] += k
        guardrails = self.shaping.guardrails
        try:
            for cid, k in delivered.items():
                guardrails.count_delivered(cid, k)
        except Exception:
            self.hook_failed(guardrails.count_delivered)

    def unknown_outcomes(self, slot: WorkerSlot, ids: list[int], text: str) -> None:
        """A worker died with ``ids`` in its window. Those it had begun to write
        to a receiver (its write log, ``WorkerSlot.writes``: a DATA's 354
        answered, a BDAT LAST, a provider's request) may have been taken: each
        is an attempt of unknown outcome (counted, a deferred event saying so,
        the backoff of later retries counting it) due again at once; the rest
        (rate-held in the supervisor, in its backlog, or handed over and never
        written since: ``handed``) stay in the window for ``retire`` to
        release unattempted. One handed over so long ago that the log may
        have lost its write counts unknown, as every one did before."""
        unsent = {c.id for items in slot.held.values() for c in items}
        decode = wire.to_worker_decoder.decode
        for rec in slot.backlog:
            with contextlib.suppress(Exception):
                msg = decode(rec)
                if isinstance(msg, wire.Batch):
                    unsent.update(item.id for item in msg.items)
        if slot.writes is not None:
            written, low = slot.writes.written()
            for count, got in slot.handed:
                if count >= low:  # every write since is in the log
                    unsent.update(i for i in got if i not in written)
        now = time.time()
        policy = self.config.retry
        log_events = self.events.path is not None or bool(self.events.listeners)
        n = 0
        for i in ids:
            if i in unsent or (c := slot.inflight.pop(i, None)) is None:
                continue
            r = wire.Res(i, wire.K_DEFERRED, 451, "4.3.0", text, "", "", "worker", "")
            self._apply_other(c, r, c.attempts + 1, now, policy, log_events, retry_at=now)
            n += 1
        self.stats.attempts += n
        slot.unwritten += n

    def tell_untold(self, dead: bool = False) -> None:
        """At start: outcomes the last process recorded and died before telling
        (:meth:`Spool.untold`: killed between the commit and the event log's
        write) get their events now, from their rows, marked ``"resumed":
        true`` (a delivery's reply text, MX and source address are not kept in
        its row). They were counted by the run that recorded them, not here.
        ``dead``: those of other nodes of a shared spool whose window was taken
        back (:meth:`Spool.untold_of_dead`), while running."""
        rows = self.spool.untold_of_dead() if dead else self.spool.untold()
        if not rows:
            return
        if self.events.path is not None or self.events.listeners:
            evs = [e for e in map(untold_event, rows) if e is not None]
            self.events.emit_rows(evs)  # the file, then listeners (webhooks, index)
            self.events.flush()
        self.spool.told([u.id for u in rows])  # (not a window taken back already: its own)
        print(
            f"fastsend: emitted the events of {len(rows)} outcome(s) recorded by"
            f" {'a node that' if dead else 'the last run, which'} stopped before writing them",
            file=sys.stderr,
            flush=True,
        )

    def tell_taken_back(self) -> None:
        """Messages taken back from a dead process's window (a node killed whole:
        :meth:`Spool.taken_back`), each already recorded as an attempt of unknown
        outcome (deferred, due again at once): counted in this run's attempts,
        its deferred event told (event log, webhooks, index). Its result hooks
        are not called: no receiver answered. Then what such a node had recorded
        and not told (:meth:`tell_untold`)."""
        self.tell_untold(dead=True)
        got = self.spool.taken_back()
        if not got:
            return
        self.stats.attempts += len(got)
        self.stats.deferred += len(got)
        log_events = self.events.path is not None or bool(self.events.listeners)
        now = time.time()
        for t in got:
            c = Claimed(t.id, t.campaign, t.rcpt, "", b"", t.attempts - 1, 0.0)
            r = wire.Res(t.id, wire.K_DEFERRED, UNKNOWN_CODE, UNKNOWN_ENHANCED, t.text, "", "",
                         "node", "")  # fmt: skip
            self.unknown.append((c, r))  # a provider's event may have named it (settle_unknown)
            if log_events:
                ev = outcome_dict(now, "deferred", c, r, failed=True)
                ev["next_attempt"] = t.at if 0 < t.at < now else now  # due: at once
                self.event_buf.append(ev)
        # Now, not at the next flush of outcomes (with none coming, never): a
        # provider's event kept for one of them settles it (settle_unknown;
        # take_back made it due only after TAKEN_GRACE), and their events go out.
        self.flush_results()

    def _apply_other(
        self,
        c: Claimed,
        r: wire.Res,
        attempts: int,
        now: float,
        policy: RetryConfig,
        log_events: bool,
        retry_at: float | None = None,
        expire: bool = False,
    ) -> None:
        """A bounce, a deferral or an expiry (the attempt is counted by apply;
        ``expire``: an expiry whatever the retry policy says, see held_expired)."""
        stats = self.stats
        if r.kind == wire.K_FAILED:
            state, name, at = BOUNCED, "bounced", 0.0
            stats.bounced += 1
            stats.final(c.campaign)[1] += 1
            if r.hard:  # the address can never receive: suppress it for the tenant now
                self.to_suppress.append(
                    (self.tenant_of(c.campaign), c.rcpt, r.reason, SOURCE_DELIVERY, c.id)
                )
        else:
            # An unknown outcome (retry_at) is due again at once and never expires
            # the message: no receiver answered; the next attempt's answer decides.
            nxt = retry_at if retry_at is not None else next_attempt(
                policy, attempts, now, c.created, retry_hint(r.text)  # (a wait the reply names)
            )
            if nxt is None or expire:
                state, name, at = EXPIRED, "expired", 0.0
                stats.expired += 1
                stats.final(c.campaign)[2] += 1
            else:
                state, name, at = DEFERRED, "deferred", nxt
                stats.deferred += 1
                if retry_at is None and r.mx and site_deferral(r.code, r.enhanced) and (
                    r.stage not in ("worker", "node", "queue")
                ):
                    self.note_deferral(c.domain)  # a receiver's 4xx of the site
                if r.stage in UNKNOWN_STAGES and (not r.code or r.stage != "data"):
                    self.unknown.append((c, r))  # a provider may say (settle_unknown)
        self.results.append(Result(c.id, state, attempts, at, r.code, r.enhanced, r.text))
        guardrails = self.shaping.guardrails
        for hook in (guardrails.on_result, *self.result_hooks):
            try:
                hook(c, r, state)
            except Exception:  # a hook's bug must not strand the rest of the record
                self.hook_failed(hook)
        if log_events:
            ev = outcome_dict(now, name, c, r, failed=True)
            if state == EXPIRED:
                ev["reason"] = "expired"
                ev["last_reason"] = r.reason
            elif state == DEFERRED:
                ev["next_attempt"] = at
            else:
                ev["suppressed"] = r.hard
            self.event_buf.append(ev)

    def note_deferral(self, domain: str) -> None:
        """A receiver of ``domain`` deferred a message: one more in a row. From
        :data:`RECOVER_AFTER` on, the deliveries are watched (a result hook,
        only then) for the one that says the site takes mail again."""
        runs = self.site_deferrals
        runs[domain] = runs.pop(domain, 0) + 1  # (the most recent last)
        if len(runs) > DEFERRING_MAX:
            del runs[next(iter(runs))]
        if runs[domain] >= RECOVER_AFTER and self.site_recovery not in self.result_hooks:
            self.result_hooks.append(self.site_recovery)

    def site_recovery(self, c: Claimed, r: wire.Res, state: int) -> None:
        """A result hook while a site defers: a delivery to a domain that was
        deferring ends its run; after :data:`RECOVER_AFTER` or more, its
        deferred mail is brought forward at the next flush (:meth:`bring_forward`)."""
        if state != DELIVERED:
            return
        runs = self.site_deferrals
        n = runs.pop(c.domain, 0)
        if n >= RECOVER_AFTER:
            self.recovered.add(c.domain)
        if not any(k >= RECOVER_AFTER for k in runs.values()):
            with contextlib.suppress(ValueError):
                self.result_hooks.remove(self.site_recovery)

    def bring_forward(self) -> None:
        """Each site that took mail again after a run of deferrals (its
        receivers' 4xx): its domain's deferred mail, deferred at least
        ``[retry] min_backoff`` ago (a greylisting receiver's wait is over),
        due from now on at the site's message rate (``[shaping]``, one
        source address's), up to :data:`BRING_MAX`, instead of each message's
        own backoff (up to ``max_backoff``: an hour more after a short outage).
        Said in the shaping log (``site_recovered``)."""
        from fastsend.shaping.policy import load_policy

        domains, self.recovered = self.recovered, set()
        policy = load_policy(self.config)
        now = time.time()
        for d in sorted(domains):
            rate = policy.resolve((), d).message_rate
            step = 0.0 if rate == float("inf") or rate <= 0 else 1.0 / rate
            n = self.spool.bring_forward(
                d, now, step, BRING_MAX, deferred_before=now - self.config.retry.min_backoff
            )
            if n:
                self.shaping.log_event({
                    "time": now, "event": "shaping", "action": "site_recovered", "site": d,
                    "brought_forward": n, "rate": None if not step else round(1.0 / step, 3),
                })  # fmt: skip

    def handback(self, slot: WorkerSlot, msg: wire.Handback) -> None:
        """Mail a worker gave back unattempted: queued again (attempts unchanged),
        the k-th at ``at + min(k * step, HANDBACK_SPREAD)``. Its outcome for this
        claim; no attempt, no event, no result hook."""
        inflight = slot.inflight
        out = self.requeues
        at, step = msg.at, msg.step
        if msg.elsewhere and len(self.slots) > 1:
            self.hand_elsewhere(slot, msg)
            return
        k = 0
        for i in msg.ids:
            c = inflight.pop(i, None)
            if c is None:
                continue  # already released (duplicate answer after a restart)
            due = at + min(k * step, HANDBACK_SPREAD)
            if not self.held_expired(slot, c, due, msg.text):
                out.append((i, due))
            k += 1
        self.stats.handed_back += k

    def held_expired(self, slot: WorkerSlot, c: Claimed, due: float, why: str) -> bool:
        """Mail given back unattempted (warm-up caps, rests, a suspension, a
        rate) whose next try would come after its ``[retry] max_age``: expired
        now (final, "expired", its last reply or 4.4.7 saying why), as a
        deferral past it is. Before, only a deferral could expire a message:
        held back day after day (a cold IP's warm-up cap, a long rest) it was
        sent however late, a week-old message among today's. False (it is
        queued again) otherwise."""
        policy = self.config.retry
        if due <= c.created + policy.max_age:
            return False
        text = f"not sent within [retry] max_age ({policy.max_age:g} s): {why}"[:400]
        r = wire.Res(c.id, wire.K_DEFERRED, 0, "4.4.7", text, "", "", "queue", "expired")
        log_events = self.events.path is not None or bool(self.events.listeners)
        self._apply_other(c, r, c.attempts, time.time(), policy, log_events, expire=True)
        slot.unwritten += 1  # (its outcome holds its place until written, as apply's do)
        return True

    def hand_elsewhere(self, slot: WorkerSlot, msg: wire.Handback) -> None:
        """Mail none of ``slot``'s addresses may send before ``msg.at`` (resting,
        suspended or at warm-up caps for its site): that worker (a rest: every
        worker sending from its addresses) gets no more of its (pool, domain) until then (``avoid``, read by
        ``Dispatch.route_pools``), and it is queued again now when another
        worker owning an address of its pool may take it, else at ``msg.at``
        as before (it went back to the same worker, or waited for the rest's
        end or UTC midnight while another worker's addresses idled)."""
        now = time.time()
        avoid = self.pool_avoid
        away = [slot.index]
        if msg.elsewhere == wire.ELSEWHERE_IP:  # and every worker sending from its addresses
            mine = set(slot.ips or [""])
            away = [s.index for s in self.slots if mine & set(s.ips or [""])]
        if len(avoid) > 10_000:
            for key in [k for k, v in avoid.items() if max(v.values()) <= now]:
                del avoid[key]
        out = self.requeues
        k = 0
        for i in msg.ids:
            c = slot.inflight.pop(i, None)
            if c is None:
                continue  # already released (duplicate answer after a restart)
            key = (self.pool_name(c.campaign), c.domain)
            held = avoid.setdefault(key, {})
            for w in away:
                held[w] = max(held.get(w, 0.0), msg.at)
            due = now if self.may_send_elsewhere(key, now) else msg.at
            if not self.held_expired(slot, c, due, msg.text):
                out.append((i, due))
            k += 1
        self.stats.handed_back += k

    def flush_due(self) -> None:
        """The loop's flush: what flush_results writes, once FLUSH_ROWS outcomes
        wait or the first has waited FLUSH_AGE s; at once when nothing else is in
        flight (the run's end, a quiet queue), on a drain or stop, and with a
        hand-back or a suppression to write. The outcomes are decided already
        (windows, stats, guardrails); only their writes wait, and a crash meanwhile
        means a retry, as for any outcome not yet committed."""
        n = len(self.results)
        if (
            n
            and n < FLUSH_ROWS
            and not (self.requeues or self.to_suppress or self.draining or self.stopping)
        ):
            now = time.monotonic()
            if not self.results_since:
                self.results_since = now
            if now - self.results_since < FLUSH_AGE and any(
                s.inflight for s in (*self.slots, *self.retired)
            ):
                return
        self.flush_results()

    def settle_unknown(self) -> None:
        """The messages just recorded deferred with an unknown outcome (a
        request or final dot unanswered) that a provider's event named while
        they were in flight (``serve`` took it before the request timed out:
        Spool.settle kept it): delivered now, a "delivered" event each
        (``settled``: true; ``Spool.settle_taken``). Before, deferred, and the
        retry sent the message a second time."""
        unknown, self.unknown = self.unknown, []
        try:
            got = self.spool.settle_taken([c.id for c, _r in unknown])
        except Exception:  # (the deferral stands: retried, as before)
            self.hook_failed(self.spool.settle_taken)
            return
        if not got:
            return
        now = time.time()
        counted: dict[int, int] = {}
        for c, r in unknown:
            text = got.get(c.id)
            if text is None:
                continue
            counted[c.campaign] = counted.get(c.campaign, 0) + 1
            self.stats.delivered += 1
            self.stats.deferred -= 1
            ev = outcome_dict(now, "delivered", c, r)
            ev.update(code=250, enhanced="2.0.0", text=text, settled=True)
            self.event_buf.append(ev)
        self._count_delivered(counted)

    def flush_results(self) -> None:
        self.results_since = 0.0
        if self.to_suppress:
            # Before the spool records the bounce: a crash in between re-sends
            # to the address at worst, never leaves it unsuppressed.
            try:
                self.suppression.add_entries(self.to_suppress)
            except Exception:  # locked or unwritable: keep them, try again next tick
                self.hook_failed(self.suppression.add_entries)
                del self.to_suppress[:-100_000]
            else:
                # Their other mail in the workers' windows goes back unsent.
                written, self.to_suppress = self.to_suppress, []
                self.withdraw_addresses(written)
        keep = self.outbox_filter
        if keep is not None:  # the filter sees dicts
            self.event_buf = list(_dicts(self.event_buf))
        marked = stamped([e for e in self.event_buf if keep(e)]) if keep is not None else []
        if self.results or marked:
            # On a shared spool the events the webhooks want go into the outbox in
            # the same atomic step as the outcomes (an event_id marks them: the
            # dispatcher does not append them again); elsewhere the event log's
            # listeners take them after the outcome.
            for hook in self.before_commit:  # (a journal's lines, durable first)
                try:
                    hook()
                except Exception:
                    self.hook_failed(hook)
            dumps = orjson.dumps
            first = self.spool.record_outcomes(
                self.results, time.time(), [dumps(e) for e in marked],
                [i if isinstance(i := e.get("id"), int) else 0 for e in marked],
            )  # fmt: skip
            if FAULT:  # tests: outcomes-kill-after-commit:N, before their events
                countdown({"outcomes-kill-after-commit": signal.SIGKILL})
            if first is not None:
                for i, e in enumerate(marked):
                    e["event_id"] = first + i
            self.results = []
        if self.unknown:  # (recorded deferred: in this flush or by Spool.recover)
            self.settle_unknown()
        if self.recovered:  # (their deferrals recorded above)
            self.bring_forward()
        for slot in (*self.slots, *self.retired):
            slot.unwritten = 0
        if self.requeues:
            self.spool.requeue(self.requeues, time.time())
            self.requeues = []
        # The event log is written before the listeners (webhooks, the event
        # index, rollups) are told, which may take a while: a kill between the
        # spool's commit and the log's write loses no event of a local spool
        # (told at the next start: untold), and on a shared one the window is
        # this encode and write alone. The listeners catch up from the log.
        out = True  # every event of the outcomes recorded is written
        pending = None
        if self.event_buf:
            buf, self.event_buf = self.event_buf, []
            try:
                pending = self.events.append_rows(buf)
            except Exception:
                out = False
                self.hook_failed(self.events.append_rows)
        log_error: OSError | None = None
        try:
            self.events.flush()
        except OSError as err:  # the rest stays buffered for the next flush
            log_error = err
        told_error: Exception | None = None
        if out and log_error is None:
            try:
                self.spool.told()  # (noted untold until now)
            except Exception as e:  # an outage (Redis): they stay noted, told again at worst
                told_error = e
        if pending is not None:  # the listeners are told whatever the spool said
            self.events.tell(pending)
        if told_error is not None:
            raise told_error
        if log_error is not None:  # the event log's disk is the spool's: an outage too
            problem = storage_problem(log_error)
            if problem is None:
                raise log_error
            raise SpoolStorageError(
                f"the event log's storage {problem} ({log_error})"
            ) from log_error

    def hook_failed(self, hook: Any) -> None:
        """Report a result hook or event listener that raised (once per hook)."""
        name = getattr(hook, "__qualname__", repr(hook))
        if name not in self.failed_hooks:
            self.failed_hooks.add(name)
            import traceback

            print(f"fastsend: {name} raised (outcomes are still applied):", file=sys.stderr)
            traceback.print_exc()


def apply_delivered(
    items: list[wire.Res | wire.Sent],
    i: int,
    pop: Callable[[int, None], Claimed | None],
    hooks: list[Callable[[Claimed, wire.Res, int], None]],
    failed: Callable[[Any], None],
    make: tuple[type[Result], int, int, type[wire.Sent], type[wire.Res]],
    results: list[Result],
    claims: list[Claimed] | None,
    answers: list[Any],
    delivered: dict[int, int],
    counts: list[int],
) -> tuple[int, Claimed | None]:
    """The deliveries of ``items`` (each a ``wire.Res``) from index ``i``
    (``Outcomes.apply``'s short path; compiled twin in ``_outcomes.pxi``):
    each claim taken out of its window (``pop``; one already gone is skipped),
    its Result (``make``: the Result type, the delivered state, the delivered
    kind, then the Sent and Res types) appended, its campaign counted in
    ``delivered``, the hooks called (``failed`` told of one that raises), the
    claim and its answer appended to ``claims``/``answers`` (its event; None:
    no events), ``counts`` (applied, delivered) bumped. Stops at the first
    outcome that is not a delivery: (its index, its claim, taken out and
    counted as applied); at a ``wire.Sent`` group: (its index, None) (see
    :func:`apply_sent`); at the end: (len(items), None)."""
    result, state, k_delivered = make[:3]
    end = len(items)
    while i < end:
        r = items[i]
        if not isinstance(r, wire.Res):  # a wire.Sent group (make[3])
            return i, None
        c = pop(r.id, None)
        if c is None:  # already released (duplicate answer after a restart)
            i += 1
            continue
        counts[0] += 1
        if r.kind != k_delivered:
            return i, c
        counts[1] += 1
        row = result(c.id, state, c.attempts + 1, 0.0, r.code, r.enhanced, r.text)
        _delivered(c, row, r, r, state, hooks, failed, results, claims, answers, delivered)
        i += 1
    return i, None


def _delivered(
    c: Claimed,
    row: Result,
    hres: wire.Res | None,
    answer: Any,
    state: int,
    hooks: list[Callable[[Claimed, wire.Res, int], None]],
    failed: Callable[[Any], None],
    results: list[Result],
    claims: list[Claimed] | None,
    answers: list[Any],
    delivered: dict[int, int],
) -> None:
    """One delivery applied (the pure twins' shared step): its Result ``row``
    appended, its campaign counted, the hooks given ``hres`` (``failed`` told
    of one that raises), the claim and its event's ``answer`` kept."""
    results.append(row)
    cid = c.campaign
    delivered[cid] = delivered.get(cid, 0) + 1
    for hook in hooks:
        try:
            hook(c, hres, state)  # type: ignore[arg-type]  # hres is set when there are hooks
        except Exception:  # a hook's bug must not strand the rest
            failed(hook)
    if claims is not None:
        claims.append(c)
        answers.append(answer)


def apply_sent(
    g: wire.Sent,
    pop: Callable[[int, None], Claimed | None],
    hooks: list[Callable[[Claimed, wire.Res, int], None]],
    failed: Callable[[Any], None],
    make: tuple[type[Result], int, int, type[wire.Sent], type[wire.Res]],
    results: list[Result],
    claims: list[Claimed] | None,
    answers: list[Any],
    delivered: dict[int, int],
    counts: list[int],
) -> None:
    """A ``wire.Sent`` group's deliveries, as :func:`apply_delivered` applies
    each delivered ``wire.Res`` (compiled twin in ``_outcomes.pxi``). Each
    message's answer (its event's; ``answers``) is the group itself when its
    messages share their text, else the Res ``wire.expand`` makes of it; the
    hooks get that Res."""
    result, state, k_delivered, _sent, res = make
    code, enhanced, mx, ip = g.code, g.enhanced, g.mx, g.source_ip
    texts, qids = g.texts, g.queue_ids
    text, qid = g.text, g.queue_id
    r: Any = g
    for k, mid in enumerate(g.ids):
        c = pop(mid, None)
        if c is None:  # already released (duplicate answer after a restart)
            continue
        counts[0] += 1
        counts[1] += 1
        if texts:
            text, qid = texts[k], qids[k]
            r = res(mid, k_delivered, code, enhanced, text, mx, ip, "", "", False, qid)
        h = None
        if hooks:
            h = (
                r
                if texts
                else res(mid, k_delivered, code, enhanced, text, mx, ip, "", "", False, qid)
            )
        row = result(c.id, state, c.attempts + 1, 0.0, code, enhanced, text)
        _delivered(c, row, h, r, state, hooks, failed, results, claims, answers, delivered)


py_apply_delivered = apply_delivered  # the references (tests compare the twins with them)
py_apply_sent = apply_sent
apply_delivered = pick(apply_delivered)
apply_sent = pick(apply_sent)


# Stages of a deferral whose outcome is unknown (the message may have been taken):
# no answer after the request or the final dot ("data", no code), a worker that
# died holding it ("worker", Outcomes.unknown_outcomes), a node's window taken
# back ("node", tell_taken_back).
UNKNOWN_STAGES = ("data", "worker", "node")


def site_deferral(code: int, enhanced: str) -> bool:
    """A deferral that says the site, not the recipient, is not taking mail:
    421, or a 4.3 (mail system), 4.4 (network, routing) or 4.7 (policy, rates)
    status (RFC 3463); a mailbox's (4.2: full) or an address's (4.1) is not
    one (a domain delivering to its other recipients does not bring those
    forward). As ``Spool.bring_forward`` picks the rows (``SITE_STATUSES``)."""
    return code == 421 or (400 <= code < 500 and enhanced[:4] in SITE_STATUSES)


def _dicts(buf: list[Any]) -> Iterator[dict[str, Any]]:
    """Events as dicts (the Rows batches among them expanded)."""
    for e in buf:
        if isinstance(e, Rows):
            yield from e.dicts()
        else:
            yield e


def untold_event(u: Untold) -> dict[str, Any] | None:
    """The event of an outcome recorded and never told (:meth:`Outcomes.tell_untold`),
    from its row: what the row keeps, ``"resumed": true``; None for a row in
    no outcome's state (cancelled since, or in flight again)."""
    name = {DELIVERED: "delivered", DEFERRED: "deferred", BOUNCED: "bounced",
            EXPIRED: "expired"}.get(u.state)  # fmt: skip
    if name is None:
        return None
    ev: dict[str, Any] = {
        "time": u.at, "event": name, "id": u.id, "campaign": u.campaign, "rcpt": u.rcpt,
        "source_ip": "", "mx": "", "code": u.code, "enhanced": u.enhanced, "text": u.text,
        "attempt": u.attempts,
    }  # fmt: skip
    if name != "delivered":
        c = classify_reply(u.code, u.enhanced, u.text, command="")
        ev.update(stage="", reason=c.reason, hard=bool(c.hard and name == "bounced"))
        if name == "deferred":
            ev["next_attempt"] = u.next_at
        elif name == "expired":
            ev["reason"], ev["last_reason"] = "expired", c.reason
        else:
            ev["suppressed"] = ev["hard"]
    ev["resumed"] = True
    if u.event_id:  # in the webhook outbox already (a shared spool's, with the outcome)
        ev["event_id"] = u.event_id
    return ev
