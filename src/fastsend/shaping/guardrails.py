"""Campaign guardrails: pause a campaign whose bounce or complaint rate is too high.

NAME
    fastsend.shaping.guardrails -- GuardrailSettings, Guardrails.

DESCRIPTION
    Config::

        [guardrails]
        bounce_rate = 0.05       # bounced / (delivered + bounced)
        complaint_rate = 0.003   # complaints / delivered (Gmail/Yahoo's 0.3% line)
        min_sample = 500         # judge only after this many final outcomes
        enabled = true

    :meth:`Guardrails.on_result` is a :attr:`Supervisor.result_hooks` hook:
    it counts each campaign's delivered and bounced messages and, once the
    sample is large enough, pauses a campaign over a threshold with
    ``spool.set_campaign_status(cid, "paused")`` and an event
    ``{"event": "campaign_paused", "campaign": cid, "reason": "..."}``.
    Complaints arrive from outside the delivery path (ARF reports, feedback
    loops): :meth:`record_complaint`; so do bounces of mail a receiver or a
    provider took (DSNs, provider events): :meth:`record_bounce`. A paused campaign's counters start
    again from zero, so ``fastsend campaign resume ID`` gives it a fresh
    sample before it is judged again.

    Until a campaign has been judged (``min_sample`` final outcomes counted,
    :meth:`sampling`), the supervisor keeps at most ``min_sample`` of its
    messages out unanswered in the workers (``Dispatch.sample_cap``): a fast
    receiver answers a whole window (4,000 messages) before the first outcomes
    are counted, and a list that bounces would be sent whole before its pause.
    A pause is told to the dispatcher at once (:attr:`fresh`), which asks the
    workers for that campaign's unsent mail back without waiting for its
    status to be read again. With other nodes sending from a shared spool each
    node has only its part of the sample out (:meth:`allowance`), and a pause
    another node decided is taken as this node's own as soon as a flush or a
    check meets it (:meth:`stopped_elsewhere`).

DELIBERATELY NOT HERE
    No reading of ARF or DSN messages (fastsend.bounce parses them) and no
    suppression (fastsend.suppression).

    Counters live in the spool (``Spool.add_counters``, names
    ``guard:<campaign>:delivered|bounced|complaints``): a restart keeps the
    sample, and on a shared (Redis) spool every node adds to, and judges, the
    same totals. Each result counts at once in memory (a threshold is judged on
    it immediately); the deltas go to the spool in one step per tick
    (:meth:`Guardrails.flush`), which brings back the other nodes' counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from fastsend.config.shaping import GuardrailSettings
from fastsend.spool import BOUNCED, DELIVERED, Spool

SENDERS_EVERY = 1.0  # s between two reads of how many nodes send (Guardrails.senders_now)
SYNC_EVERY = 0.1  # s between two reads of a campaign's totals before a pause (Guardrails._sync)


class Guardrails:
    """Per-campaign counters and the pause decision (in the supervisor)."""

    def __init__(
        self,
        spool: Spool,
        settings: GuardrailSettings,
        emit: Callable[[dict[str, Any]], None],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.emit = emit
        self.clock = clock or time.time
        # campaign -> [delivered, bounced, complaints]: the totals last read from
        # the spool plus what this process counted since
        self.counts: dict[int, list[int]] = {}
        self.pending: dict[int, list[int]] = {}  # not yet added to the spool
        # campaign -> bounce reason (the classifier's) -> count, since start: the
        # pause event says what the bounces were (unknown users, blocks, ...)
        self.reasons: dict[int, dict[str, int]] = {}
        self.paused: set[int] = set()
        # campaigns paused since the dispatcher last looked (Dispatch.withdraw_paused)
        self.fresh: list[int] = []
        # campaign not judged yet -> its messages let out to the workers (id ->
        # (the window holding it: answered once it has left it, when it was let
        # out: monotonic s, its domain)), Dispatch.sample_cap
        self.out: dict[int, dict[int, tuple[Any, float, str]]] = {}
        # ... of those, the ones out longer than sample_wait and still unanswered
        # (id -> (window, domain)), and their domains: a receiver that never
        # answers, whose further mail of the campaign takes no room in the sample
        self.late: dict[int, dict[int, tuple[Any, str]]] = {}
        self.slow: dict[int, set[str]] = {}
        # nodes sending from the spool (Spool.senders), read at most every
        # SENDERS_EVERY s (monotonic): each lets out its part of a sample
        self.senders = 1
        self.senders_at = -math.inf
        self.synced: dict[int, float] = {}  # campaign -> its last _sync (monotonic)
        self.kinds: dict[int, bool] = {}  # campaign -> whether it is a transactional stream

    def _get(self, campaign: int) -> list[int]:
        g = self.counts.get(campaign)
        if g is None:  # first sight since start: the sample so far, from the spool
            try:
                got = self.spool.counters(f"guard:{campaign}:")
            except Exception:
                got = {}
            g = self.counts[campaign] = [got.get(_name(campaign, i), 0) for i in range(3)]
        return g

    def _count(self, campaign: int, i: int, n: int = 1) -> None:
        self._get(campaign)[i] += n
        p = self.pending.get(campaign)
        if p is None:
            p = self.pending[campaign] = [0, 0, 0]
        p[i] += n

    def on_result(self, claimed: Any, res: Any, state: int) -> None:
        if state == DELIVERED:
            self._count(claimed.campaign, 0)
        elif state == BOUNCED:
            self._count(claimed.campaign, 1)
            reason = getattr(res, "reason", "") or "unknown"
            r = self.reasons.setdefault(claimed.campaign, {})
            if reason in r or len(r) < 64:
                r[reason] = r.get(reason, 0) + 1
            self.check(claimed.campaign)

    def transactional(self, campaign: int) -> bool:
        """Whether ``campaign`` is a tenant's transactional stream (``POST
        /v1/messages``, submission): never sampled nor paused by the guardrails,
        only told (:meth:`check`). Production MTAs judge it apart from the bulk
        lists: paused like one, every password reset and receipt the tenant
        sent after it was accepted and never delivered."""
        known = self.kinds.get(campaign)
        if known is None:
            try:
                info = self.spool.get_campaign(campaign)
                known = info is not None and info.spec.get("kind") == "transactional"
            except Exception:
                return False  # (asked again next time)
            if len(self.kinds) > 100_000:
                self.kinds.clear()
            self.kinds[campaign] = known
        return known

    def sampling(self, campaign: int) -> bool:
        """Whether ``campaign`` has yet to be judged: fewer than ``min_sample``
        final outcomes counted (since start or its last pause)."""
        s = self.settings
        if not s.enabled:
            return False
        if self.transactional(campaign):
            return False
        g = self.counts.get(campaign)
        if g is None:
            g = self._get(campaign)
        return g[0] + g[1] < s.min_sample

    def allowance(self, campaign: int) -> int:
        """How many of ``campaign``'s messages this node may have out unanswered
        while it is sampled (``Dispatch.sample_cap``). Alone, ``min_sample``.
        With other nodes sending from a shared spool, its part of what the
        sample still lacks by the totals last read from the spool (each node
        judging only its own, N nodes let N x min_sample of a bad list out
        before any pause), less what it counted since it last added its counts
        there: the sample is the cluster's, no round trip a message."""
        s = self.settings.min_sample
        n = self.senders_now()
        if n <= 1:
            return s
        g = self._get(campaign)
        p = self.pending.get(campaign)
        mine = p[0] + p[1] if p else 0  # counted here, not yet in the spool's totals
        lacks = max(0, s - (g[0] + g[1] - mine))
        return max(0, max(1, -(-lacks // n)) - mine)

    def senders_now(self) -> int:
        """Spool.senders, read again every SENDERS_EVERY s (the last known
        through an outage)."""
        mono = time.monotonic()
        if mono - self.senders_at >= SENDERS_EVERY:
            self.senders_at = mono
            try:
                self.senders = max(1, self.spool.senders())
            except Exception:
                pass
        return self.senders

    def forget_answered(self) -> None:
        """Drop from :attr:`out` and :attr:`late` what was answered, and campaigns
        with nothing left."""
        for cid in list(self.out):
            ids = self.out[cid]
            for i in [i for i, (w, _t, _d) in ids.items() if i not in w.inflight]:
                del ids[i]
            if not ids:
                del self.out[cid]
        for cid in list(self.late):
            late = self.late[cid]
            for i in [i for i, (w, _d) in late.items() if i not in w.inflight]:
                del late[i]
            if not late:
                del self.late[cid]
                self.slow.pop(cid, None)

    def forget(self, campaign: int) -> None:
        """``campaign`` was judged: what its sample tracked is needed no more."""
        self.out.pop(campaign, None)
        self.late.pop(campaign, None)
        self.slow.pop(campaign, None)
        self.synced.pop(campaign, None)

    def count_delivered(self, campaign: int, n: int) -> None:
        """``n`` deliveries of ``campaign`` (what on_result counts for each one),
        judged: the sample may reach ``min_sample`` with them (bounces counted
        first in the same record were judged on a smaller sample)."""
        self._count(campaign, 0, n)
        self.check(campaign)

    def record_bounce(self, campaign: int, reason: str) -> None:
        """A bounce reported after the receiver took the message (a DSN, a
        provider's bounce event): that message counted delivered when it was
        sent, and counts bounced from now on. Before, only replies during the
        SMTP session counted: a campaign sent through a provider (whose bounces
        all come later) or to receivers that take mail and bounce it after was
        never paused, whatever its bounce rate."""
        g = self._get(campaign)
        if g[0] > 0:  # (not when it was delivered before a pause's fresh sample)
            self._count(campaign, 0, -1)
        self._count(campaign, 1)
        r = self.reasons.setdefault(campaign, {})
        if reason in r or len(r) < 64:
            r[reason] = r.get(reason, 0) + 1
        self.check(campaign)

    def record_complaint(self, campaign: int, n: int = 1) -> None:
        self._count(campaign, 2, n)
        self.check(campaign)

    def flush(self) -> None:
        """Add this process's counts to the spool's in one step, take the totals
        back (other nodes' counts included) and judge them."""
        if self.out:
            self.senders_now()  # (not at a dispatch: the loop's tick pays it)
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        # every kind of each campaign counted here, zeros too: its totals all
        # come back (else a node counting only bounces judged them against the
        # deliveries it read minutes before)
        deltas = {_name(c, i): v for c, p in pending.items() for i, v in enumerate(p)}
        totals = self.spool.add_counters(deltas)
        for c in pending:
            if self._take_totals(c, totals):
                self.check(c, synced=True)

    def _take_totals(self, campaign: int, totals: dict[str, int]) -> bool:
        """``campaign``'s counts from the spool's ``totals``; False when they
        were reset meanwhile by a pause elsewhere (:meth:`stopped_elsewhere`)."""
        g = self._get(campaign)
        seen = g[0] + g[1]
        for i in range(3):
            t = totals.get(_name(campaign, i))
            if t is not None:
                g[i] = t
        if g[0] + g[1] < seen and self.stopped_elsewhere(campaign):
            # (what this node just added is no part of the fresh sample)
            self.spool.drop_counters([_name(campaign, i) for i in range(3)])
            return False
        return True

    def _sync(self, campaign: int) -> bool:
        """Before a pause: this node's counts of ``campaign`` added to the
        spool's and every kind's totals read back (on a shared spool the
        deliveries of the other nodes since this one last read them: a node
        meeting bounces judged them against a count of deliveries minutes
        old). False when the campaign was stopped elsewhere meanwhile."""
        p = self.pending.pop(campaign, None) or [0, 0, 0]
        try:
            totals = self.spool.add_counters({_name(campaign, i): p[i] for i in range(3)})
        except Exception:
            self.pending[campaign] = p  # (judged on what this node knows; added later)
            return True
        return self._take_totals(campaign, totals)

    def stopped_elsewhere(self, campaign: int) -> bool:
        """Whether another node (or the operator) paused ``campaign``: then this
        node's sample starts afresh too, and its unsent mail is asked back at
        once (:attr:`fresh`), as where the pause was decided. Before, a node
        learnt it from the campaign's status, read every STATUS_TTL s, and
        meanwhile took the counters the pause had reset for a fresh sample and
        let that much more of the bad list out (~100 more at min_sample 100)."""
        try:
            info = self.spool.get_campaign(campaign)
        except Exception:
            return False
        if info is None or info.status != "paused":
            return False
        self.counts[campaign] = [0, 0, 0]
        self.pending.pop(campaign, None)
        self.forget(campaign)
        self.fresh.append(campaign)
        return True

    def check(self, campaign: int, synced: bool = False) -> bool:
        """Pause ``campaign`` if it is over a threshold; True when it was paused.
        Over one, the totals are read again first (:meth:`_sync`), unless
        ``synced``: they were just read."""
        s = self.settings
        g = self.counts.get(campaign)
        if not s.enabled or g is None:
            return False
        delivered, bounced, complaints = g
        sample = delivered + bounced
        if sample < s.min_sample:
            return False
        why = ""
        rate = bounced / sample
        if rate > s.bounce_rate:
            why = (
                f"bounce rate {rate:.1%} ({bounced} of {sample}) is over the"
                f" {s.bounce_rate:.1%} guardrail"
            )
            seen = self.reasons.get(campaign)
            if seen:
                why += f" (mostly {max(seen, key=seen.__getitem__)})"
        elif delivered and complaints / delivered > s.complaint_rate:
            why = (
                f"complaint rate {complaints / delivered:.2%} ({complaints} of {delivered})"
                f" is over the {s.complaint_rate:.2%} guardrail"
            )
        if not why:
            return False
        if not synced:
            mono = time.monotonic()
            if mono - self.synced.get(campaign, -math.inf) >= SYNC_EVERY:
                # (at most every SYNC_EVERY s: not a round trip a bounce while a
                # campaign hovers at its threshold)
                self.synced[campaign] = mono
                return self._sync(campaign) and self.check(campaign, synced=True)
        if self.transactional(campaign):
            # Told, not paused; a fresh sample from here (told again only if the
            # next one is over the line too).
            self._judged(campaign, "guardrail_exceeded", why, (delivered, bounced, complaints))
            return False
        info = self.spool.get_campaign(campaign)
        if info is None or info.status != "active":
            if info is not None and info.status == "paused":
                self.stopped_elsewhere(campaign)  # (judged there first)
            return False
        # the reason on the campaign itself: it outlives the process (the event does not)
        self.spool.set_campaign_status(campaign, "paused", f"guardrail: {why}")
        self.paused.add(campaign)
        self.fresh.append(campaign)
        # (a fresh sample after `campaign resume`)
        self._judged(campaign, "campaign_paused", why, (delivered, bounced, complaints))
        return True

    def _judged(self, campaign: int, event: str, why: str, sample: tuple[int, int, int]) -> None:
        """A judgement over a line: a fresh sample from here (the counts, pending
        and the spool's counters dropped) and the ``event`` saying why."""
        delivered, bounced, complaints = sample
        self.counts[campaign] = [0, 0, 0]
        self.pending.pop(campaign, None)
        self.spool.drop_counters([_name(campaign, i) for i in range(3)])
        self.emit(
            {
                "time": self.clock(),
                "event": event,
                "campaign": campaign,
                "reason": why,
                "delivered": delivered,
                "bounced": bounced,
                "complaints": complaints,
                "bounce_reasons": dict(
                    sorted(self.reasons.pop(campaign, {}).items(), key=lambda kv: -kv[1])[:8]
                ),
            }
        )


_KINDS = ("delivered", "bounced", "complaints")


def _name(campaign: int, i: int) -> str:
    return f"guard:{campaign}:{_KINDS[i]}"
