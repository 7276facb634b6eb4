"""Dispatch: while a worker has room in its window, claim due messages from the
spool, screen them against the tenant's suppression list, hold back what the
campaign / tenant / global dispatch rates do not admit yet, group the rest by
(campaign, domain) into batches, send the campaign spec first if that worker has
not seen it, and put the batches on its inbox ring. What can never be handed to
a worker (spec or message too large for a ring) is bounced here.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from fastsend import wire
from fastsend._accel import pick
from fastsend.queue.state import RING_BYTES, SupervisorState, WorkerSlot
from fastsend.ring import WriteLog
from fastsend.shaping.pools import PoolRoutes
from fastsend.spool import SUPPRESSED, Claimed, Result

STATUS_TTL = 0.5  # s a campaign's status is trusted before rate-held mail is checked again
WITHDRAW_EVERY = 1.0  # s between checks of the windows against a list with no version()
WITHDRAW_GAP = 0.25  # s at least between two checks of the windows (a list written often)
FEED_ROOM = 2000  # open room that asks the feeder for its next chunk (accept.CHUNK rows)
HOLD_HORIZON = 10.0  # s of a rate's worth kept rate-held in a window (the rest requeued)
POOL_WAIT = 1.0  # s before mail of a pool whose workers had no room is claimed again
BLOB_CACHE_BYTES = 64 << 20  # bodies stored once, kept for the batches that follow
# Spool.prune_final: messages looked at per call, seconds of calls per tick, and
# the pause between two such ticks while a sweep has more to do
PRUNE_CHUNK = 2000
PRUNE_BUDGET = 0.02
PRUNE_AGAIN = 0.5
# s of a worker's building (WorkerSlot.build_cost) that opens its window to a claim,
# when less than a quarter of the window (Dispatch.claim_at)
CLAIM_SECONDS = 0.1
FORGET_EVERY = 60.0  # s between two looks for campaigns out of every window (forget_idle)
REGATE_EVERY = 0.1  # s at most between two gatings of a window's held mail (regate_later)


def _raise(e: BaseException) -> None:
    raise e

class Dispatch(SupervisorState):
    first_slot = 0  # the slot a pass starts with turns, so no worker is always first

    def dispatch(self, any_room: bool = False) -> None:
        """Claim for each window with room (a quarter of it free; ``any_room``:
        any), screen, gate, batch and put the batches on the workers' rings."""
        if self.draining or self.stopping:
            self.release_held()
            if not self.stopping:
                self.drain_workers()
            return
        if self.shaping.guardrails.fresh:
            self.withdraw_paused()
        if self.shaping.rests_to_share:
            self.share_rests()
        now = time.time()
        size = self.config.delivery.batch_size
        nothing_due = False
        n_slots = len(self.slots)
        order = self.slots[self.first_slot % n_slots :] + self.slots[: self.first_slot % n_slots]
        self.first_slot += 1
        given: dict[int, list[Claimed]] = {}  # slot index -> a share of another's claim
        # slot index -> claims of a pool it owns, met after its turn in this pass
        late: dict[int, list[Claimed]] = {}
        routed = bool(self.pool_routes.shares) or bool(self.pool_avoid)
        for pos, slot in enumerate(order):
            if not self.can_take(slot):
                continue
            room = slot.room
            claimed = given.pop(slot.index, [])
            mine = not claimed
            # Claim once a quarter of the window is free, not per answered batch:
            # a claim of ~window/4 messages groups into batches of several
            # messages per site (100 sites: ~10 a batch, not ~2), and the claim's
            # transaction and each batch record are paid for many messages.
            # While a list is being read, every window with room claims: a claim
            # that comes back short (nothing more due) leaves its room open for
            # the rows the feeder spools next (they go straight to it).
            asked = bool(claimed)  # a share of another's claim counts as asking
            least = 1 if any_room else self.claim_at(slot)
            if not claimed and (not nothing_due or self.pace_feed) and room >= least:
                asked = True
                claimed = self.spool.claim_next(now, room, slot.index)
                nothing_due = not claimed
                if claimed and self.config.delivery.check_suppression:
                    n = len(claimed)
                    claimed = self.screen(claimed, now)
                    slot.unwritten += n - len(claimed)
            pooled = False  # claims of a routed pool: already spread by weight
            if routed and claimed:
                claimed, pooled = self.route_pools(
                    slot, claimed, mine, order, pos, given, late, now
                )
            if 2 * size <= len(claimed) < room and not pooled:
                # Less was due than this window takes (a short list, the start
                # of a long one while it is spooled, the tail): shared with the
                # workers after this one, so no core idles while one works.
                claimed = self.share(claimed, order[pos + 1 :], size, given)
            if not claimed and slot.held and self.regate_later(slot):
                if asked and self.pace_feed:  # (as hand: the room it still has open)
                    self.note_room(slot, slot.room)
                continue
            self.hand(slot, claimed, asked)
        if late or given:
            by_index = {s.index: s for s in self.slots}
            for idx, items in (*late.items(), *given.items()):
                s = by_index.get(idx)
                if s is not None and self.can_take(s):
                    self.hand(s, items, False)
                else:  # cannot happen (room was checked): back to the queue, unattempted
                    self.requeues.extend((c.id, now) for c in items)

    @property
    def pool_routes(self) -> PoolRoutes:
        """Which workers own which pools (rebuilt when a reload made new pools)."""
        ps = self.shaping.poolset
        got = self.pool_routes_for
        if got is None or got[0] is not ps:
            pools = self.config.pools
            routes = PoolRoutes(
                ps, {s.index: s.ips for s in self.slots}, bool(pools and pools.pools)
            )
            got = self.pool_routes_for = (ps, routes)
            self.campaign_pool.clear()
        return got[1]

    def hand(self, slot: WorkerSlot, claimed: list[Claimed], asked: bool) -> None:
        """Put ``claimed`` in ``slot``'s window: rate gate, campaign spec once,
        batch records onto its ring (or its backlog)."""
        size = self.config.delivery.batch_size
        groups: dict[tuple[int, str], list[Claimed]] = {}
        group_claims(claimed, slot.inflight, groups)
        self.window_campaigns.update([key[0] for key in groups])  # (per group, not per claim)
        if slot.writes is not None:
            note_handed(slot, slot.writes, claimed)
        if asked and self.pace_feed:  # the room this window still has open
            self.note_room(slot, slot.room)
        mine, held = groups, slot.held
        try:
            groups = self.gate(slot, groups)
            if not groups:
                return
            records: list[bytes] = []
            told: set[int] = set()  # campaigns these records introduce to the worker
            for (campaign, domain), items in groups.items():
                if campaign not in slot.campaigns and campaign not in told:
                    head, why = self.spec_records(campaign)
                    if not head:  # it can never be rendered: final, not stuck in flight
                        self.fail(slot, items, 554, "5.3.0", why)
                        continue
                    records.extend(head)
                    told.add(campaign)
                for i in range(0, len(items), size):
                    records.extend(self.batch_records(slot, campaign, domain, items[i : i + size]))
        except BaseException:
            # The spool failed under us (a shared one out of reach): nothing of
            # these reached the worker, so they leave the window and go back
            # to the queue (written with the next flush), never stranded in it.
            self.unclaim(slot, [mine, held, groups])
            raise
        slot.campaigns |= told
        slot.backlog.extend(records)
        self.push_backlog(slot)

    def route_pools(
        self,
        slot: WorkerSlot,
        claimed: list[Claimed],
        mine: bool,
        order: list[WorkerSlot],
        pos: int,
        given: dict[int, list[Claimed]],
        late: dict[int, list[Claimed]],
        now: float,
    ) -> tuple[list[Claimed], bool]:
        """A worker sends only from its own source IPs: the claims of a pool's
        campaigns go to the workers owning the pool's IPs, by the weights they
        own (``shaping.pools.PoolRoutes``), each up to its room, and never to a
        worker none of whose addresses may send that (pool, domain) now
        (``pool_avoid``: it handed such mail back, resting, suspended or at its
        warm-up caps); what none can take goes back to the queue unattempted,
        due in POOL_WAIT s (or when the first of them may send again). Returns
        what ``slot`` keeps, and whether any claim was moved or weighed. A share
        from another's claim (not ``mine``) was routed already: only what
        ``slot`` may not send is moved."""
        routes = self.pool_routes
        pools = self.campaign_pool
        avoid = self.pool_avoid
        room: dict[int, int] | None = None
        later = {s.index for s in order[pos + 1 :]}
        keep: list[Claimed] = []
        back = 0
        for c in claimed:
            name = pools.get(c.campaign)
            if name is None:
                name = self.pool_name(c.campaign)
            shares = routes.shares.get(name)
            held = self.avoided((name, c.domain), now) if avoid else None
            free = held is None or slot.index not in held  # this worker may send it
            if free and (shares is None or (not mine and routes.owns(name, slot.index))):
                keep.append(c)
                continue
            if room is None:
                room = {
                    s.index: s.room
                    - self.spool.held(s.index)
                    - len(given.get(s.index, ()))
                    - len(late.get(s.index, ()))
                    for s in self.slots
                    if s is not slot and self.can_take(s)
                }
                room[slot.index] = max(slot.room, len(claimed))  # its claim fits it
            owners = shares or self.all_owners()
            idx = routes.pick(name, room, owners, held)
            if idx is None:
                due = now + POOL_WAIT
                if held and all(i in held for i, _w in owners):
                    due = min(held.values())  # none may send it before then
                self.requeues.append((c.id, due))
                back += 1
                continue
            room[idx] -= 1
            if idx == slot.index:
                keep.append(c)
            else:
                (given if idx in later else late).setdefault(idx, []).append(c)
        self.stats.handed_back += back
        return keep, room is not None

    def pool_name(self, campaign: int) -> str:
        """The pool a campaign's mail goes from (cached)."""
        pools = self.campaign_pool
        name = pools.get(campaign)
        if name is None:
            if len(pools) > 100_000:
                pools.clear()
            name = pools[campaign] = self.shaping.pool_of(campaign)
        return name

    def all_owners(self) -> tuple[tuple[int, int], ...]:
        """Every worker, of equal weight (a pool that is not routed)."""
        return tuple((s.index, 1) for s in self.slots)

    def avoided(self, key: tuple[str, str], now: float) -> dict[int, float] | None:
        """The workers that may not send ``key``'s (pool, domain) mail now, with
        until when (None: every worker may)."""
        held = self.pool_avoid.get(key)
        if held is None:
            return None
        for i in [i for i, until in held.items() if until <= now]:
            del held[i]
        if not held:
            del self.pool_avoid[key]
            return None
        return held

    def may_send_elsewhere(self, key: tuple[str, str], now: float) -> bool:
        """Whether a live worker owning an address of the pool may send
        ``key``'s (pool, domain) mail now."""
        held = self.avoided(key, now) or {}
        alive = {s.index for s in self.slots if s.alive}
        owners = self.pool_routes.shares.get(key[0]) or self.all_owners()
        return any(i in alive and i not in held for i, _w in owners)

    def unclaim(self, slot: WorkerSlot, parts: list[dict[tuple[int, str], list[Claimed]]]) -> None:
        """The claims of ``parts`` (a dispatch that failed before they were
        written to the worker) that are in ``slot``'s window and not held for
        a rate: out of the window, handed back to the queue unattempted."""
        still = {c.id for items in slot.held.values() for c in items}
        now = time.time()
        inflight = slot.inflight
        for part in parts:
            for items in part.values():
                for c in items:
                    if c.id not in still and inflight.pop(c.id, None) is not None:
                        self.requeues.append((c.id, now))

    def regate_later(self, slot: WorkerSlot) -> bool:
        """Whether a pass that hands ``slot`` nothing new may leave its held mail
        as it is: no rate holds any (no rate is set), no outcome was applied
        since it was last gated (the guardrails' sample then has the same
        messages out, the same counts) and that was less than REGATE_EVERY s
        ago (a sample message out past sample_wait, a campaign paused, a node
        joining a shared spool: seen within it). Before, every loop turn gated
        the held rest again (its groups rebuilt, the sample's ids walked): a
        signed send or one waiting on slow receivers, its windows full behind
        a sample, spent ~50 ms of CPU a second doing it."""
        return (
            not self.shaping.gate.enabled
            and slot.gated_gen == self.outcomes_gen
            and time.monotonic() - slot.gated_at < REGATE_EVERY
        )

    def note_room(self, slot: WorkerSlot, short: int) -> None:
        """A claim of ``slot`` left ``short`` of its room unfilled: once the
        windows' open room would take a list chunk, or this window has a claim's
        worth open (a quarter: it found nothing to take), the feeder reads its
        next one (see Supervisor._feed). Waiting for a chunk's room across the
        windows kept a worker with a quarter of its window free and nothing due
        until another's window freed up too (its ready queue ran dry)."""
        self.open_room[slot.index] = short
        if short >= self.claim_at(slot) or sum(self.open_room.values()) >= FEED_ROOM:
            self.feed_room.set()

    def claim_at(self, slot: WorkerSlot) -> int:
        """The room at which ``slot``'s window claims: a quarter of it, or
        CLAIM_SECONDS of building when its worker's messages cost more (signed
        rsa-sha256: ~300 us each, a quarter of a 6,144 window ~0.5 s), at least
        a batch. What a worker holds unbuilt when the list runs out differs
        from the others' by about one claim: claims of a quarter made the
        workers of a signed send end ~0.3-0.5 s apart, one core idle
        meanwhile (~58/42 split of 20,000 messages)."""
        least = slot.window // 4 or 1
        cost = slot.build_cost
        if cost > 0.0:
            least = min(least, max(self.config.delivery.batch_size, int(CLAIM_SECONDS / cost)))
        return least

    @staticmethod
    def can_take(slot: WorkerSlot) -> bool:
        return slot.alive and slot.inbox is not None and not slot.backlog and not slot.retiring

    def share(
        self,
        claimed: list[Claimed],
        others: list[WorkerSlot],
        batch: int,
        given: dict[int, list[Claimed]],
    ) -> list[Claimed]:
        """Split ``claimed`` evenly between its claimer and the ``others`` that can
        take mail now (each up to its room), in shares of at least a ``batch``
        (fewer messages stay together: identical ones share transactions, and a
        batch record is paid for many): their shares go into ``given``; returns
        the claimer's (the rest: it had room for all of it)."""
        # A taker's room counts what a shared spool has claimed for it ahead
        # (spool.held): its window in flight stays within ``s.window``.
        takers = [
            (s, s.room - self.spool.held(s.index))
            for s in others
            if self.can_take(s) and s.index not in given
        ]
        takers = [(s, room) for s, room in takers if room >= batch]
        k = min(len(takers) + 1, len(claimed) // batch)
        if k < 2:
            return claimed
        takers = takers[: k - 1]
        each = -(-len(claimed) // k)
        start = each
        for s, room in takers:
            part = claimed[start : start + min(room, each)]
            if not part:
                break
            given[s.index] = part
            start += len(part)
        return claimed[:each] + claimed[start:]

    def suppressed_claims(self, claimed: list[Claimed]) -> list[tuple[Claimed, str, str]] | None:
        """(claim, tenant, reason) of the claims whose address is suppressed for
        their campaign's tenant (None: the list could not be read, said so).
        One lookup per tenant."""
        tenants = {cid: self.tenant_of(cid) for cid in {c.campaign for c in claimed}}
        by_tenant: dict[str, list[Claimed]] = {}
        if len(set(tenants.values())) == 1:  # the usual claim: one tenant's mail
            by_tenant[next(iter(tenants.values()))] = claimed
        else:
            for c in claimed:
                by_tenant.setdefault(tenants[c.campaign], []).append(c)
        gone: list[tuple[Claimed, str, str]] = []
        for tenant, items in by_tenant.items():
            try:
                hits = self.suppression.reasons_many([c.rcpt for c in items], tenant=tenant)
            except Exception:  # an unreadable list must not stop delivery: say so
                self.hook_failed(self.suppression.reasons_many)
                return None
            if hits:
                gone += [(c, tenant, hits[c.rcpt]) for c in items if c.rcpt in hits]
        return gone

    def withdraw_suppressed(self, mono: float) -> None:
        """Mail in the workers' windows whose address was suppressed since its
        claim (the CLI, the API, the intake, another node): each worker is asked
        to hand back what it has not sent yet (wire.Withdraw), and the next
        claim ends it ``suppressed``. Checked when the list's version() changed
        (SQLite: another connection wrote it; Redis: any node's write, its
        ``supver`` counter), read at most every WITHDRAW_GAP s, or every
        WITHDRAW_EVERY s for a list that cannot tell. Rate-held mail is screened
        as it is admitted."""
        if not self.config.delivery.check_suppression or not any(s.inflight for s in self.slots):
            return
        since = mono - self.withdraw_checked
        if since < WITHDRAW_GAP:  # the version is read at most this often (Redis: a GET)
            return
        try:
            version = self.suppression.version()
        except self.outage_types as e:  # a shared spool out of reach: an outage, not a bug
            self.guard(_raise, e)
            return
        except Exception:  # an unreadable list must not stop delivery: say so
            self.hook_failed(self.suppression.version)
            return
        if version is None:
            if since < WITHDRAW_EVERY:
                return
        elif version == self.suppression_seen:
            self.withdraw_checked = mono
            return
        self.suppression_seen = version
        self.withdraw_checked = mono
        for slot in self.slots:
            asked = slot.withdrawn
            if asked:
                asked.intersection_update(slot.inflight.keys())
            if not slot.inflight or not slot.alive or slot.inbox is None:
                continue
            held = {c.id for items in slot.held.values() for c in items}
            claims = [c for i, c in slot.inflight.items() if i not in held and i not in asked]
            hits = self.suppressed_claims(claims) if claims else None
            if hits:
                ids = [c.id for c, _t, _r in hits]
                asked.update(ids)
                slot.backlog.append(wire.encoder.encode(wire.Withdraw(ids)))
                self.push_backlog(slot)

    def withdraw_stopped(self, mono: float) -> None:
        """Mail in the workers' windows of a campaign paused or cancelled since
        its claim (on any node: the status is the spool's, read at most every
        STATUS_TTL s): each worker hands back what it has not sent yet
        (wire.Withdraw); the spool keeps a paused campaign's queued and ends a
        cancelled one's. Before, a worker sent its ready queues (up to
        ``ready_horizon`` of each site's rate) after the pause. Every
        STATUS_TTL s, the status of each campaign handed to a window
        (``window_campaigns``); only when one of them is stopped, one pass over
        the windows (before, a pass over every claim of every window each time:
        ~25,000 claims a second with two workers' windows full)."""
        if mono - self.stopped_checked < STATUS_TTL:
            return
        self.stopped_checked = mono
        for slot in self.slots:
            asked = slot.withdrawn
            if asked:  # those answered (handed back, sent) since: forgotten
                asked.intersection_update(slot.inflight.keys())
        # (a list: campaign_active may read the spool, the set must not change meanwhile)
        if all([self.campaign_active(cid) for cid in self.window_campaigns]):
            return
        held_by: set[int] = set()
        for slot in self.slots:
            asked = slot.withdrawn
            if not slot.inflight or not slot.alive or slot.inbox is None:
                held_by.update(c.campaign for c in slot.inflight.values())
                continue
            campaigns = {c.campaign for c in slot.inflight.values()}
            held_by |= campaigns
            stopped = {cid for cid in campaigns if not self.campaign_active(cid)}
            if not stopped:
                continue
            held = {c.id for items in slot.held.values() for c in items}  # gate() releases
            ids = [
                i
                for i, c in slot.inflight.items()
                if c.campaign in stopped and i not in asked and i not in held
            ]
            if ids:
                asked.update(ids)
                slot.backlog.append(wire.encoder.encode(wire.Withdraw(ids)))
                self.push_backlog(slot)
        self.window_campaigns = held_by  # (those no longer in a window: not read again)

    def withdraw_paused(self) -> None:
        """Campaigns this process's guardrails paused just now: their unsent
        mail in the windows is asked back at once (not at the next status read,
        STATUS_TTL s later: a fast receiver takes thousands meanwhile)."""
        g = self.shaping.guardrails
        fresh, g.fresh = g.fresh, []
        mono = time.monotonic()
        for cid in fresh:
            self.status_cache[cid] = (False, mono)
        self.stopped_checked = 0.0
        self.withdraw_stopped(mono)

    def share_rests(self) -> None:
        """A worker rested (or suspended) a source address for a site on its
        block reply: every other worker sending from that address rests it
        there too (wire.IPRest for the site), at once. Before, the others sent
        their share on to the site that had just refused the address, until
        each met a block reply of its own."""
        told, self.shaping.rests_to_share = self.shaping.rests_to_share, []
        for origin, rec in told:
            data = wire.encoder.encode(rec)
            for slot in self.slots:
                if slot.index == origin or not slot.alive or slot.inbox is None:
                    continue
                if rec.ip in (slot.ips or [""]):
                    slot.backlog.append(data)
                    self.push_backlog(slot)

    def withdraw_addresses(self, gone: list[tuple[str, str, str, str, int | None]]) -> None:
        """Hard bounces just written to the list (``to_suppress`` entries:
        tenant, address, ...): the workers are asked to hand back their other
        unsent mail to those addresses (another campaign's, a duplicate row),
        as :meth:`withdraw_suppressed` does for what other writers add (this
        process's own writes do not change the list's version)."""
        if not self.config.delivery.check_suppression:
            return
        keys = {(t, a.lower()) for t, a, *_rest in gone}
        rcpts = {a for _t, a in keys}
        tenant_of = self.tenant_of
        for slot in self.slots:
            if not slot.inflight or not slot.alive or slot.inbox is None:
                continue
            asked = slot.withdrawn
            ids = [
                i
                for i, c in slot.inflight.items()
                if (r := c.rcpt.lower()) in rcpts
                and i not in asked
                and (tenant_of(c.campaign), r) in keys
            ]
            if ids:
                asked.update(ids)
                slot.backlog.append(wire.encoder.encode(wire.Withdraw(ids)))
                self.push_backlog(slot)

    def screen(self, claimed: list[Claimed], now: float) -> list[Claimed]:
        """Dispatch-time suppression: the claimed messages whose address is not
        suppressed for their campaign's tenant. The others end as ``suppressed``
        (an event each), never delivered. One lookup per tenant per claim."""
        gone = self.suppressed_claims(claimed)
        if not gone:
            return claimed
        drop = {c.id for c, _t, _r in gone}
        log_events = self.events.path is not None or bool(self.events.listeners)
        for c, tenant, reason in gone:
            text = f"suppressed for tenant {tenant}: {reason}"
            self.results.append(Result(c.id, SUPPRESSED, c.attempts, 0.0, 0, "", text))
            self.stats.suppressed += 1
            self.stats.final(c.campaign)[3] += 1
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
        blobs: dict[str, bytes] = {}
        digests = blob_digests(items)
        if digests:
            blobs = self.blobs(digests)
            gone = digests - blobs.keys()
            lost = [c for c in items if gone and wire.blob_digest(c.vars) in gone]
            if lost:  # cannot happen (a blob outlives its rows): say so, never send junk
                self.fail(slot, lost, 554, "5.3.0", "message body missing from the spool")
                items = [c for c in items if wire.blob_digest(c.vars) not in gone]
                if not items:
                    return []
        rec = batch_record(campaign, domain, items, blobs)
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

    def blobs(self, digests: set[str]) -> dict[str, bytes]:
        """Bodies stored once (``Spool.put_blob``) from an LRU cache: a body sent
        to many recipients is read from the spool once, not once per row or batch."""
        cache = self.blob_cache
        out = {d: cache[d] for d in digests if d in cache}
        for d in out:
            cache.move_to_end(d)
        missing = digests - out.keys()
        if missing:
            got = self.spool.get_blobs(missing)
            out.update(got)
            cache.update(got)
            size = sum(len(v) for v in cache.values())
            while size > BLOB_CACHE_BYTES and len(cache) > len(got):
                size -= len(cache.popitem(last=False)[1])
        return out

    def sweep_blobs(self, mono: float) -> None:
        """Every [spool] blob_sweep_interval_s: delete bodies no message needs any more."""
        sp = self.config.spool
        if mono - self.blob_swept < sp.blob_sweep_interval_s:
            return
        self.blob_swept = mono
        try:
            self.spool.sweep_blobs(
                time.time(), sp.blob_retention_days * 86400.0, grace=sp.blob_orphan_grace_s
            )
        except Exception:  # housekeeping must never stop delivery: say so
            self.hook_failed(self.spool.sweep_blobs)

    def prune_final(self, mono: float) -> None:
        """[spool] final_retention_days: delete final messages past it (Spool.prune_final),
        at the first tick and then every blob_sweep_interval_s; a sweep with more
        to do goes on PRUNE_BUDGET s at a time every PRUNE_AGAIN s (the loop is
        never held long, a backlog of months goes in a few minutes)."""
        sp = self.config.spool
        if sp.final_retention_days <= 0 or mono < self.prune_next:
            return
        before = time.time() - sp.final_retention_days * 86400.0
        more = True
        try:
            while more and time.monotonic() - mono < PRUNE_BUDGET:
                _n, more = self.spool.prune_final(before, PRUNE_CHUNK)
        except self.outage_types:
            self.prune_next = mono + sp.blob_sweep_interval_s
            raise  # an outage of the spool (guard)
        except Exception:  # housekeeping must never stop delivery: say so
            more = False
            self.hook_failed(self.spool.prune_final)
        self.prune_next = time.monotonic() + (PRUNE_AGAIN if more else sp.blob_sweep_interval_s)

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
        what may not go yet waits in ``slot.held`` (in flight, inside the window);
        held mail is screened against the suppression list again as it goes (it
        may have waited long enough for its address to be suppressed meanwhile)."""
        was_held = bool(slot.held)
        slot.gated_gen, slot.gated_at = self.outcomes_gen, time.monotonic()
        fresh: dict[tuple[int, str], int] | None = None  # key -> its held messages first
        if not slot.held:
            slot.held_sampled = False
        else:
            # Rate-held mail of a campaign paused or cancelled meanwhile (on any
            # node: the status is the spool's) goes back to the queue, undispatched.
            stopped = [key for key in slot.held if not self.campaign_active(key[0])]
            if stopped:
                ids = [c.id for key in stopped for c in slot.held.pop(key)]
                for i in ids:
                    slot.inflight.pop(i, None)
                self.spool.release(ids)
            if not slot.held_sampled:  # (what sample_cap held itself: none of its sample)
                fresh = {key: len(items) for key, items in slot.held.items()}
            for key, items in groups.items():
                slot.held.setdefault(key, []).extend(items)
            groups, slot.held = slot.held, {}
        guardrails = self.shaping.guardrails
        if guardrails.settings.enabled and any(map(guardrails.sampling, {k[0] for k in groups})):
            groups = self.sample_cap(slot, groups, fresh)
        admit = self.shaping.gate.admit
        mono = time.monotonic()
        out: dict[tuple[int, str], list[Claimed]] = {}
        for key, items in groups.items():
            n = admit(key[0], len(items), mono, key[1])
            if n:
                out[key] = items if n == len(items) else items[:n]
            if n < len(items):  # before what sample_cap held of it (claimed later)
                slot.held_sampled = True  # (it may hold messages of a sample)
                prev = slot.held.get(key)
                slot.held[key] = items[n:] + prev if prev else items[n:]
        if slot.held and self.shaping.gate.enabled:  # (no rate: nothing to trim)
            self.trim_held(slot)
        if was_held and out and self.config.delivery.check_suppression:
            out = self.rescreen(slot, out)
        return out

    def sample_cap(
        self,
        slot: WorkerSlot,
        groups: dict[tuple[int, str], list[Claimed]],
        held: dict[tuple[int, str], int] | None = None,
    ) -> dict[tuple[int, str], list[Claimed]]:
        """A campaign not judged yet by its guardrails (fewer than ``min_sample``
        final outcomes) has at most ``min_sample`` messages out unanswered, over
        every worker (with other nodes on a shared spool, this node's part of
        what the sample lacks: ``Guardrails.allowance``); the rest of ``groups`` waits in ``slot.held`` (inside the
        window, released as outcomes come back). A fast receiver answers a whole
        window before the supervisor counts the first outcomes: a list that
        bounced was sent whole (4,000 of a window) before its pause. Deferrals and
        hand-backs leave the count too, and so does a message out longer than
        ``sample_wait`` s (a receiver that accepts and never answers held the
        whole campaign, every other domain's mail too, for its command
        timeouts: minutes), so a campaign nobody answers finally is never
        stalled; once judged, it goes at full speed. The domain of such a
        message is slow (``Guardrails.slow``, while one is still unanswered):
        its further mail goes out of the count, as without guardrails. Else a
        list whose first 10,000 rows are at a dead receiver let 500 more of
        them out each sample_wait, 20 rounds of 30 s, before any other
        domain's mail. The messages let out
        are remembered per campaign (``Guardrails.out``: id -> its window,
        when and its domain), and looked up in their windows only when the cap is near: the
        cost is the campaign's own, never a scan of the windows. ``held``: per
        group, how many of its first messages were held before and hold no
        message of a sample (none a rate held since, ``WorkerSlot.held_sampled``):
        while the sample is full they wait again unlooked at (before, each
        dispatch looked each one up: ~1 ms a call over a window's ~4,750 held)."""
        g = self.shaping.guardrails
        mono = time.monotonic()
        stale = mono - g.settings.sample_wait
        track = g.out
        out: dict[tuple[int, str], list[Claimed]] = {}
        looked: set[int] = set()  # campaigns whose answered messages left the count
        # Per campaign, once a call (not per domain group): None once judged, else
        # its cap (min_sample, or this node's part of it), its messages out and
        # [its sample messages out from this worker, this worker's part].
        seen: dict[int, tuple[int, dict[int, Any], list[int]] | None] = {}
        for key, items in groups.items():
            cid = key[0]
            if cid in seen:
                got = seen[cid]
            elif not g.sampling(cid):
                if track:
                    g.forget(cid)  # judged: free from here on
                got = seen[cid] = None
            else:
                cap = g.allowance(cid)
                ids = track.get(cid)
                if ids is None:
                    if len(track) >= 10_000:  # campaigns that ended before their sample
                        g.forget_answered()
                    ids = track[cid] = {}
                own = [
                    sum(1 for v in ids.values() if v[0] is slot) if ids else 0,
                    self.sample_part(cid, cap),
                ]
                got = seen[cid] = (cap, ids, own)
            if got is None:
                out[key] = items
                continue
            cap, ids, own = got
            if (
                len(ids) + len(items) > cap or own[0] + len(items) > own[1]
            ) and cid not in looked:  # once a call
                looked.add(cid)
                late = g.late.get(cid) or {}
                for i, (s, t, dom) in list(ids.items()):
                    if i not in s.inflight:
                        del ids[i]
                    elif t < stale:
                        del ids[i]
                        late[i] = (s, dom)
                for i in [i for i, (s, _d) in late.items() if i not in s.inflight]:
                    del late[i]
                if late:
                    g.late[cid] = late
                    g.slow[cid] = {dom for _s, dom in late.values()}
                else:
                    g.late.pop(cid, None)
                    g.slow.pop(cid, None)
                own[0] = sum(1 for v in ids.values() if v[0] is slot)
            slow = g.slow.get(cid)
            if slow and key[1] in slow:  # a receiver that never answered: not sampled
                out[key] = items
                continue
            h = held.get(key, 0) if held else 0
            if h and (len(ids) >= cap or own[0] >= own[1]):  # full: only sample messages go
                new = items[h:]
                go = [c for c in new if c.id in ids] if ids and new else []
                if go:
                    out[key] = go
                    wait = items[:h] + [c for c in new if c.id not in ids]
                else:
                    wait = items
                slot.held.setdefault(key, []).extend(wait)
                continue
            n = 0
            dom = key[1]
            for c in items:
                if c.id in ids:  # let out before and rate-held since: counted once
                    n += 1
                elif len(ids) < cap and own[0] < own[1]:
                    ids[c.id] = (slot, mono, dom)
                    n += 1
                    own[0] += 1
                else:
                    break
            if n == len(items):
                out[key] = items
                continue
            # The sample is full: of the rest, only messages of the sample go (let
            # out before, handed back since: a reload's retiring worker gives its
            # window back, and it is claimed again in another order). Before, the
            # first message not in the sample held every one after it: a reload
            # during the sample sent nothing of the campaign for sample_wait (30 s).
            rest = items[n:]
            go = [c for c in rest if c.id in ids] if ids else []
            if go:
                wait = [c for c in rest if c.id not in ids]
                out[key] = items[:n] + go
            else:
                wait = rest
                if n:
                    out[key] = items[:n]
            if wait:
                slot.held.setdefault(key, []).extend(wait)
        return out

    def sample_part(self, campaign: int, cap: int) -> int:
        """A worker's part of ``campaign``'s sample (``cap`` out at once): an
        even share over the live workers that may send its pool's mail, so the
        sample goes out from each at once. Before, the first worker dispatched to
        took the whole sample and the others sent nothing of the campaign until
        its answers came back (a second or more at a slow receiver; the first
        refusals read from one worker's lanes only)."""
        owners = self.pool_routes.shares.get(self.pool_name(campaign)) or self.all_owners()
        alive = {s.index for s in self.slots if s.alive}
        live = sum(1 for i, _w in owners if i in alive)
        return -(-cap // live) if live > 1 else cap

    def trim_held(self, slot: WorkerSlot) -> None:
        """Keep rate-held mail to what its rates let go within HOLD_HORIZON s; the
        rest goes back to the queue unattempted, due at the campaign's rate from
        then on (``hold_next``), or expired when that is after its ``[retry]
        max_age`` (``held_expired``). Held mail fills the window: a campaign or tenant
        under a low rate would otherwise hold every window, and mail of other
        campaigns and tenants accepted after it would wait until its last
        message was claimed (20,000 at 5/s: an hour)."""
        gate = self.shaping.gate
        now = time.time()
        nxt = self.hold_next
        if len(nxt) > 10_000:
            for cid in [c for c, t in nxt.items() if t < now]:
                del nxt[cid]
        by_campaign: dict[int, list[tuple[int, str]]] = {}
        for key in slot.held:
            by_campaign.setdefault(key[0], []).append(key)
        inflight = slot.inflight
        out = self.requeues
        for cid, keys in by_campaign.items():
            rate = min(gate.rate_of(cid, k[1]) for k in keys)
            if rate <= 0:
                continue
            budget = max(1, math.ceil(rate * HOLD_HORIZON))  # kept, over all its domains
            if sum(len(slot.held[k]) for k in keys) <= budget:
                continue
            at = max(nxt.get(cid, 0.0), now + HOLD_HORIZON)
            step = 1.0 / rate
            n = 0
            for k in keys:
                items = slot.held[k]
                mine = min(len(items), max(1, budget // len(keys)))
                slot.held[k] = items[:mine]
                for c in items[mine:]:
                    if inflight.pop(c.id, None) is not None:
                        # (due after its max_age at this rate: it expires now)
                        if not self.held_expired(slot, c, at, f"held by a {rate:g}/s rate"):
                            out.append((c.id, at))
                            at += step
                        n += 1
            nxt[cid] = at
            self.stats.handed_back += n

    def rescreen(
        self, slot: WorkerSlot, groups: dict[tuple[int, str], list[Claimed]]
    ) -> dict[tuple[int, str], list[Claimed]]:
        """``groups`` less the messages whose address was suppressed since they
        were claimed (they end ``suppressed`` as at the claim's screen, and leave
        the window as answered-but-unwritten outcomes)."""
        flat = [c for items in groups.values() for c in items]
        kept = self.screen(flat, time.time())
        if len(kept) == len(flat):
            return groups
        keep = {c.id for c in kept}
        for c in flat:
            if c.id not in keep:
                slot.inflight.pop(c.id, None)
                slot.unwritten += 1
        out: dict[tuple[int, str], list[Claimed]] = {}
        for key, items in groups.items():
            left = [c for c in items if c.id in keep]
            if left:
                out[key] = left
        return out

    def campaign_active(self, campaign: int) -> bool:
        """The campaign's status, read from the spool at most every STATUS_TTL s."""
        now = time.monotonic()
        ent = self.status_cache.get(campaign)
        if ent is None or now - ent[1] > STATUS_TTL:
            info = self.spool.get_campaign(campaign)
            ent = self.status_cache[campaign] = (info is not None and info.status == "active", now)
        return ent[0]

    def release_held(self) -> None:
        """Stopping: rate-held messages go back to queued."""
        for slot in self.slots:
            if slot.held:
                ids = [c.id for items in slot.held.values() for c in items]
                for i in ids:
                    slot.inflight.pop(i, None)
                slot.held.clear()
                self.spool.release(ids)

    def forget_idle(self) -> None:
        """What the supervisor and each worker keep per campaign (its spec, status,
        tenant, pool, rate buckets, guardrail sample; a worker's compiled template)
        dropped for campaigns with nothing in any window at two looks in a row
        (``FORGET_EVERY`` s apart); read again from the spool if mail of one comes
        back (a retry, more recipients). Before, it was kept for good: serve's
        supervisor grew ~70 KB a campaign of 100 messages (a campaign under the
        guardrails' ``min_sample`` kept every id it let out), each worker ~16 KB
        plus its template, without bound."""
        slots = [*self.slots, *self.retired]
        busy = {c.campaign for s in slots for c in s.inflight.values()}
        self.window_campaigns &= busy
        shaping = self.shaping
        g, gate = shaping.guardrails, shaping.gate
        known: set[int] = set(self.spec_cache)
        for d in (self.status_cache, self.tenant_cache, self.campaign_pool, g.counts,
                  g.out, g.late, g.reasons, gate.campaigns):  # fmt: skip
            known.update(d)
        for s in slots:
            known |= s.campaigns
        idle = known - busy
        gone = idle & self.idle_before
        gone -= g.pending.keys()  # counts not yet in the spool: next time
        self.idle_before = idle - gone
        if not gone:
            return
        now = time.time()
        for c in gone:
            for d in (self.spec_cache, self.status_cache, self.tenant_cache, self.campaign_pool,
                      g.counts, g.reasons, gate.campaigns, gate.own):  # fmt: skip
                d.pop(c, None)
            g.forget(c)
            if self.hold_next.get(c, now) < now:
                del self.hold_next[c]
        if any(k[0] in gone for k in gate.routed):
            gate.routed = {k: b for k, b in gate.routed.items() if k[0] not in gone}
        for s in slots:
            told = s.campaigns & gone
            if told:
                s.campaigns -= told
                if s.alive and s.inbox is not None and not s.retiring:
                    s.backlog.append(wire.encoder.encode(wire.Forget(sorted(told))))
                    self.push_backlog(s)

    def campaign_spec(self, campaign_id: int) -> dict[str, Any]:
        spec = self.spec_cache.get(campaign_id)
        if spec is None:
            info = self.spool.get_campaign(campaign_id)
            if info is None:
                raise KeyError(f"campaign {campaign_id} not in spool")
            spec = self.spec_cache[campaign_id] = info.spec
        return spec


def group_claims(
    claimed: list[Claimed],
    inflight: dict[int, Claimed],
    groups: dict[tuple[int, str], list[Claimed]],
) -> None:
    """Each claim in flight for its window, and grouped by (campaign, domain)
    (compiled twin in ``_dispatch.pxi``)."""
    for c in claimed:
        inflight[c.id] = c
        groups.setdefault((c.campaign, c.domain), []).append(c)


HANDED_KEPT = 10_000  # hand-overs a slot remembers (older ones: see note_handed)


def note_handed(slot: WorkerSlot, writes: WriteLog, claimed: list[Claimed]) -> None:
    """Remember that ``claimed`` went to ``slot``'s worker when its write log
    had the ids it has now: if the worker dies, one of them not in its log
    since was never written (no attempt). Forgotten: hand-overs the log no
    longer covers (more than its capacity of ids written since), the oldest
    past HANDED_KEPT, and the oldest once none of its ids is in the window;
    an id of a forgotten hand-over still in flight counts unknown, as all
    did before. The oldest hand-over's ids that left the window are dropped
    from its front as they are passed (only ids in flight are ever looked up
    at a worker's death, and one claimed again is in a later hand-over too):
    each id is looked at about once, where every call (a pass per window per
    loop turn) had walked the oldest hand-over's answered ids again: 1.25 us
    a message with 30 answers a pass (a signed send), 0.14 with 300. A pass
    that hands nothing notes nothing."""
    handed = slot.handed
    count = writes.count
    if claimed:
        handed.append((count, [c.id for c in claimed]))
    low = count - writes.capacity
    inflight = slot.inflight
    while handed:
        first, ids = handed[0]
        if first >= low and len(handed) <= HANDED_KEPT:
            k = 0
            for i in ids:
                if i in inflight:
                    break
                k += 1
            if k < len(ids):
                if k:
                    del ids[:k]
                return
        handed.popleft()


def blob_digests(items: list[Claimed]) -> set[str]:
    """The blobs the rows of ``items`` refer to (compiled twin in ``_dispatch.pxi``)."""
    return {d for c in items if (d := wire.blob_digest(c.vars)) is not None}


def batch_record(
    campaign: int, domain: str, items: list[Claimed], blobs: dict[str, bytes]
) -> bytes:
    """The ring record of a Batch of ``items`` (compiled twin in
    ``_dispatch.pxi``: the same bytes, written without a wire.Item per message)."""
    return wire.encoder.encode(
        wire.Batch(
            campaign, domain, [wire.Item(c.id, c.rcpt, c.vars, c.attempts) for c in items], blobs
        )
    )


# the references (tests compare the twins with them)
py_group_claims, py_blob_digests, py_batch_record = group_claims, blob_digests, batch_record
group_claims = pick(group_claims)
blob_digests = pick(blob_digests)
batch_record = pick(batch_record)
