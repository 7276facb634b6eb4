"""Lanes: the live shaping state of one (source IP, site) inside a worker.

NAME
    fastsend.shaping.lanes -- Lane, Shaper.

DESCRIPTION
    A :class:`Lane` applies a site's :class:`~fastsend.shaping.policy.Limits`
    from one source IP: compiled GCRA buckets for messages per second / minute
    / hour and for new connections, the connection limit, the AIMD rate, rule
    throttles and suspensions (rest), and the IP's warm-up counter for the
    site's provider. :meth:`Lane.take` answers "how many of these ``want``
    messages may go now, else how long to wait" once per pipelined group,
    not per message; a lane with nothing to enforce answers from one flag.

    :meth:`Lane.observe` reads the outcomes of a group: every deferred or
    failed reply is matched against the automation rules and the bounce
    classifier's ``ip_blocked`` / ``rate_limited`` flags; delivered and
    deferred counts feed AIMD; a deferral of one recipient's mailbox
    (:func:`recipient_only`: over quota, greylisted) is read by the rules
    only, never a sign about the site. What changes is reported as shaping events
    (dicts: event "shaping", action, source_ip, site, provider, ...), which
    the worker ships to the supervisor for the event log.

    A :class:`Shaper` is the worker's registry: the merged policy, the pools
    restricted to the worker's IPs, one lane per (IP, site), and the
    warm-up counters (restored from and reported to the supervisor).

    Workers that send from the same address (no ``[ips] source``: the host's
    one address; fewer addresses than workers) each keep their own lanes, so
    each takes its part of that address's limits (:func:`ip_sharers`,
    :func:`split_limits`): the rates, connection rate and warm-up caps
    divided among them, the connections shared out (at least one each).
    Before, every worker applied the whole limit: two workers sent a
    site's "100/s, 5 connections" at 200/s over 10 connections from one IP.

DELIBERATELY NOT HERE
    No sockets, no sleeping, no clock reads (``now`` is passed in: monotonic
    seconds for buckets, plus unix seconds for warm-up days). Lanes are owned
    by one worker's loop thread.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
import weakref
from collections.abc import Callable
from typing import Any

from fastsend import wire
from fastsend.config import Config
from fastsend.outcome import DEFERRED, DELIVERED, FAILED, Outcome, TxnResult, all_delivered
from fastsend.shaping.feedback import DECREASED, INCREASED, LIFTED, Aimd, Rule, Trigger, rules_for
from fastsend.shaping.policy import Limits, Policy, load_policy
from fastsend.shaping.pools import Pool, PoolSet, Warmup, load_pools
from fastsend.throttle import Gcra

# aimd_increase events (Lane.feed_aimd): after the first of a climb, one when the
# rate has grown by this factor since the last one told, or this many seconds on
AIMD_STEP = 1.25
AIMD_QUIET = 30.0
# A lane cut by AIMD with no mail written nor cut for this long is forgotten by
# the worker's prune (Lane.idle): its site starts afresh, as after a restart
AIMD_FORGET = 3600.0
# A connection that left its place (Lane.keeps_place) to a waiting worker leaves
# it to that one for this long (transports' SLOT_YIELD)
PLACE_YIELD = 0.25

FOREVER = 1e9
PROVIDER_LANES = "mx-provider:"
# wire.IPRest's key of another worker's throttle of an address: THROTTLE_KEY + RULE|SITE
THROTTLE_KEY = "throttle:"  # a provider's lanes, over all its MX sets (Shaper.lane_key)
UNBOUNDED = 1 << 62  # Lane.budget() of a lane with nothing to enforce


def ip_sharers(config: Config, ips: list[str], index: int | None = None) -> tuple[int, int]:
    """(how many workers send from ``ips``, the worker's own included; the
    place of worker ``index`` among them): workers own disjoint slices of
    ``[ips] source`` when there are at least as many addresses as workers,
    else one each, shared; with none, all send from the host's address.
    (1, 0) for addresses that are no worker's slice (a Shaper made in a test)."""
    mine = ips or [""]
    slices = [config.ips_for_worker(j) or [""] for j in range(max(1, config.worker_count))]
    if mine not in slices:
        return 1, 0
    if index is None or not 0 <= index < len(slices) or slices[index] != mine:
        index = slices.index(mine)
    sharing = [j for j, theirs in enumerate(slices) if set(mine) & set(theirs)]
    return len(sharing), sharing.index(index)


def split_limits(lim: Limits, k: int, place: int) -> Limits:
    """A site's limits for one of ``k`` workers sending from the same address
    (``place``: its place among them): rates and connection rate divided,
    bursts too (at least 1), connections shared out (the remainder to the
    first places; at least one each: a limit below ``k`` is held to by places
    on the node, :meth:`Lane.place`)."""
    if k <= 1:
        return lim
    import msgspec

    conns = lim.max_connections // k + (1 if place < lim.max_connections % k else 0)
    return msgspec.structs.replace(
        lim,
        max_connections=max(1, conns),
        address_connections=lim.max_connections,
        rates=tuple((r / k, max(1, b // k)) for r, b in lim.rates),
        connection_rate=lim.connection_rate / k,
    )


def debt(b: Gcra, now: float) -> float:
    """Seconds until bucket ``b`` is full again at ``now`` (0.0: full): the
    events in it are that many intervals (GCRA's ``tat - now``; a request for
    the whole burst waits exactly that)."""
    return b.peek(now, b.burst)


def spent(rate: float, burst: int, was: float, owed: float, at: float) -> Gcra:
    """A bucket of ``rate`` and ``burst`` that holds at ``at`` the events a
    bucket of rate ``was`` held with a debt of ``owed`` seconds then (a
    reload's retiring worker's: :meth:`Lane.inherit`): the same events, at
    most a burst, draining at the new rate from then on. Exact to the
    nanosecond at the same rate (an acquire of whole events dated back by
    the fraction), scaled by ``Gcra.set_rate`` at another."""
    b = Gcra(was, burst)
    owed = min(owed, burst / was)
    n = math.ceil(owed * was - 1e-9)
    if n > 0:
        n = min(n, burst)
        b.acquire(at - max(0.0, n / was - owed), n)
    if rate != was:
        b.set_rate(rate, at)
    return b


def _closest(rate: float, burst: int, old: list[tuple[float, int, float]]) -> tuple[float, float]:
    """(rate, debt) of the old bucket whose window (burst / rate) is nearest
    this one's: the same limit (per second, minute, hour) across a reload
    that changed the numbers."""
    window = burst / rate
    r, _b, d = min(old, key=lambda o: abs(math.log((o[1] / o[0]) / window)))
    return r, d


# A temporary refusal of one recipient (its mailbox over quota, disabled,
# greylisted, receiving too fast: Mail.ru's, Gmail's 4.2.1), not of this
# address nor the site (recipient_only): by its enhanced code (RFC 3463 X.1.x
# addressing but the sender's X.1.7/X.1.8, X.2.x mailbox status) or words
# naming the mailbox, unless words name the client, its address or the sender.
_MAILBOX_WORDS = re.compile(
    r"\b(?:mail ?box(?:es)?|users?|recipients?|accounts?|addressee|quota|over ?quota|inbox"
    r"|storage|gr[ae]y-?list(?:ed|ing)?|gr[ae]y list(?:ed|ing)?)\b",
    re.IGNORECASE,
)
_CLIENT_WORDS = re.compile(
    r"\b(?:ips?|client|your (?:host|server|network|domain|address|mail ?server)|hostname"
    r"|connections?|reputation|unusual|unsolicited|spam|block(?:ed|list)|blacklist(?:ed)?"
    r"|rbl|dnsbl|sender|senders|from your)\b",
    re.IGNORECASE,
)
# Postfix's prefix of every smtpd recipient restriction's reply, a rate limit's too
_POSTFIX_PREFIX = re.compile(r"^.*?\bRecipient address rejected:\s*", re.IGNORECASE | re.DOTALL)
_ADDRESS = re.compile(r"<[^>]*>|\S+@\S+")  # (an address's words are no reply's)
_RECIPIENT_STAGES = frozenset(("rcpt", "data"))


@functools.lru_cache(maxsize=2048)
def _mailbox_reply(code: int, enhanced: str, text: str) -> bool | None:
    """True: the reply is about the recipient's mailbox; False: about the
    client (its address, host, sender); None: it does not say."""
    if code == 421:  # (the service closing the channel: never one recipient's)
        return False
    words = _ADDRESS.sub(" ", _POSTFIX_PREFIX.sub("", text, count=1))
    if _CLIENT_WORDS.search(words):
        return False
    cls = enhanced.split(".")
    if len(cls) == 3 and (cls[1] == "2" or (cls[1] == "1" and cls[2] not in ("7", "8"))):
        return True
    return True if _MAILBOX_WORDS.search(words) else None


def recipient_only(o: Outcome, accepted_after: bool = False) -> bool:
    """Whether deferral ``o`` speaks for its recipient alone (one mailbox over
    quota, greylisted or taking mail too fast), not for the source address or
    the site: a 4xx (not 421) to RCPT or to the end of the data whose code or
    words name the mailbox (:func:`_mailbox_reply`); or whose words name
    neither ("451 4.3.0 Temporary failure"; the bounce classifier finding
    neither a rate limit, "try again later", nor a block in them) while a
    later recipient of the same pipelined group was taken
    (``accepted_after``: the receiver took mail from this address in the
    same moments; Postfix feeds no RCPT deferral back to a destination's
    concurrency). One after the group's last taken still speaks for the
    site (a limit met: "the first N, then 451").
    Such a deferral retries that message; it neither cuts the lane's AIMD
    rate nor slows or rests the lane (a rule that names it still applies):
    before, one mailbox in four over quota halved a site's rate again and
    again, 200/s down to under 10/s."""
    if o.kind != DEFERRED or not 400 <= o.code < 500 or o.stage not in _RECIPIENT_STAGES:
        return False
    said = _mailbox_reply(o.code, o.enhanced, o.text)
    if said is None:
        rate_limited, ip_blocked, _reason = _classify(o.code, o.enhanced, o.text, o.stage)
        return accepted_after and not (rate_limited or ip_blocked)
    return said


@functools.lru_cache(maxsize=2048)
def _classify(code: int, enhanced: str, text: str, stage: str) -> tuple[bool, bool, str]:
    """(rate_limited, ip_blocked, reason) from the bounce classifier (rare path;
    cached: a refusal's text repeats)."""
    from fastsend.bounce.reply import classify_reply

    try:
        c = classify_reply(code, enhanced, text, command=stage)
    except ValueError:
        return False, False, ""
    return c.rate_limited, c.ip_blocked, c.reason


class Lane:
    """Shaping state of one (source IP, site)."""

    __slots__ = (
        "active",
        "aimd",
        "aimd_bucket",
        "aimd_climb",
        "aimd_quiet",
        "aimd_said",
        "aimd_said_at",
        "all_buckets",
        "blocked_reason",
        "blocked_recheck",
        "blocked_until",
        "borrowed",
        "buckets",
        "by_reason",
        "conn_bucket",
        "events",
        "free",
        "ip",
        "last_event",
        "limits",
        "max_connections",
        "own_reason",
        "own_until",
        "part",
        "places",
        "places_at",
        "provider",
        "rest_duration",
        "rules",
        "shared",
        "site",
        "throttle_bucket",
        "throttle_conns",
        "throttle_until",
        "throttle_whole",
        "triggers",
        "waiters",
        "wakers",
        "warm",
        "yield_until",
    )

    def __init__(
        self,
        ip: str,
        site: str,
        limits: Limits,
        rules: tuple[Rule, ...],
        aimd: dict[str, float],
        rest_duration: float,
        events: list[dict[str, Any]],
    ) -> None:
        self.ip, self.site, self.limits = ip, site, limits
        self.provider = limits.provider
        self.rules = rules
        self.by_reason = any(r.reasons for r in rules)
        self.events = events
        self.rest_duration = rest_duration
        self.buckets = [Gcra(r, b) for r, b in limits.rates]
        # A bucket shared with the node's other workers (a relay's rate:
        # transports.slots.SharedGcra, Shaper.share_rate), or None.
        self.shared: Any = None
        self.conn_bucket = (
            Gcra(limits.connection_rate, max(1, round(limits.connection_rate * 60)))
            if limits.connection_rate > 0
            else None
        )
        self.aimd = Aimd(limits.message_rate, aimd) if limits.aimd else None
        self.aimd_bucket: Gcra | None = None
        # What the aimd events last said (the rate, when: monotonic), whether the
        # climb since the last cut was reported, and the increases not reported
        # since [count, delivered, deferred]: see feed_aimd
        self.aimd_said = math.inf
        self.aimd_said_at = -math.inf
        self.aimd_climb = True
        self.aimd_quiet = [0, 0, 0]
        self.throttle_bucket: Gcra | None = None
        self.throttle_conns = 0
        self.throttle_whole = 0  # the throttle's connections over the address's workers
        self.throttle_until = 0.0
        # Workers sharing the address whose connections here are fewer than
        # they (1 for 2 workers): each connection holds one of that many places
        # on the node (Shaper.places makes them; transports.slots.Slots), else
        # each worker opened one and a rule of 1 connection was 2 at the
        # receiver. places_at: (path, worker's place) for Shaper.places.
        self.places: Any = None
        self.places_at: tuple[Callable[..., Any], str] | None = None
        self.yield_until = 0.0  # a place freed for a waiting worker is left to it until
        self.blocked_until = 0.0
        self.blocked_reason = ""
        # While blocked by a rest its source may lift early (a blocklist's, looked
        # at again every this many seconds; 0: none): mail is handed back for no
        # longer, so a delisting sends it within one look, not at the rest's end.
        self.blocked_recheck = 0.0
        self.own_until = 0.0  # the end of this lane's own rests (replies), not ordered ones
        self.own_reason = ""
        self.max_connections = limits.max_connections
        # (workers sending from this address, this one's place among them): a
        # rule's throttle is the address's, each worker takes its part (Shaper.lane)
        self.part = (1, 0)
        self.active = 0
        # Connections a retiring worker of this slot still holds on this lane (a
        # reload's overlap: wire.Conns): counted against max_connections.
        self.borrowed = 0
        self.warm: Warmup | None = None
        self.triggers: dict[str, Trigger] = {}
        self.last_event = -math.inf
        # A provider's shared lane (Shaper.lane_key): the sites waiting for one of
        # its connections to close (their retry callbacks, delivery.pool), and
        # the wake-up events of the sites whose idle connections hold it.
        self.waiters: list[Callable[[], None]] = []
        self.wakers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._refresh()

    def _refresh(self) -> None:
        # The shared bucket first: take() acquires it before the lane's own.
        bs = [] if self.shared is None else [self.shared]
        bs += self.buckets
        if self.aimd_bucket is not None:
            bs.append(self.aimd_bucket)
        if self.throttle_bucket is not None:
            bs.append(self.throttle_bucket)
        self.all_buckets = bs
        self.free = (
            not bs
            and self.aimd_bucket is None
            and self.throttle_bucket is None
            and self.warm is None
            and self.blocked_until == 0.0
        )

    # -- admission -----------------------------------------------------------

    def usable(self, now: float) -> bool:
        """May this lane carry mail now (not resting/suspended, not over its cap)?"""
        if self.blocked_until:
            if now < self.blocked_until:
                return False
            self._unblock(now)
        return not (self.warm is not None and self.warm.left() <= 0)

    def can_connect(self, now: float) -> bool:
        if not self.usable(now):
            return False
        limit = self.max_connections
        if self.throttle_conns and now < self.throttle_until:
            limit = min(limit, self.throttle_conns)
        return self.active + self.borrowed < limit

    def address_limit(self, now: float) -> int:
        """The connections the address may have to this site over every worker
        sending from it, when below those workers (else 0: each worker's part
        of it is a whole connection or more, no places needed)."""
        k = self.part[0]
        if k <= 1:
            return 0
        whole = self.limits.address_connections or k
        if self.throttle_whole and now < self.throttle_until:
            whole = min(whole, self.throttle_whole)
        return whole if whole < k else 0

    def place(self, now: float) -> int | None:
        """Before a new connection: -1 when none of the node's places is needed
        (:meth:`address_limit`), else a place this worker holds until
        :meth:`release` (None: every one is held by the other workers, or one
        was just left to a waiting worker: try again shortly)."""
        whole = self.address_limit(now)
        if not whole or self.places_at is None:
            return -1
        if self.places is None:
            make, path = self.places_at
            try:
                self.places = make(path, self.part[1], whole)
            except OSError:  # (no spool directory to share them in: the parts)
                self.places_at = None
                return -1
        self.places.total = whole  # (a throttle may lower it; held places above end)
        if now < self.yield_until:
            return None
        got: int | None = self.places.acquire(not self.active)
        return got

    def keeps_place(self, place: int) -> bool:
        """Whether a connection holding ``place`` may go on: not when the
        address's limit fell below it (a throttle) or another worker waits for
        one (then it ends between transactions and leaves its place)."""
        p = self.places
        if place < 0 or p is None:
            return True
        if place >= p.total or p.others_waiting(self.part[0]):
            self.yield_until = time.monotonic() + PLACE_YIELD
            return False
        return True

    def release(self, place: int) -> None:
        p = self.places
        if place >= 0 and p is not None:
            p.release(place)
            if not p.held and not p.wanting:
                # (its file closed until the next connection: a worker with
                # thousands of such sites keeps no descriptor for idle ones)
                p.close()
                self.places = None

    def waits_for_borrowed(self, now: float) -> bool:
        """Whether only a retiring worker's connections (``borrowed``) keep this
        lane from opening one now: its mail waits for them, it is not held."""
        if not self.borrowed or not self.usable(now):
            return False
        self.borrowed, b = 0, self.borrowed
        try:
            return self.can_connect(now)
        finally:
            self.borrowed = b

    def connect_wait(self, now: float) -> float:
        """Seconds before a new connection may open (0.0: now, consumed)."""
        b = self.conn_bucket
        return 0.0 if b is None else b.acquire(now)

    def take(self, now: float, want: int) -> tuple[int, float]:
        """How many of ``want`` messages may go now; else (0, seconds to wait).

        A wait of FOREVER means: not from this IP (resting, suspended, warm-up
        cap reached) -- give the mail to another IP or back to the queue.
        """
        if self.free:
            return want, 0.0
        if not self.usable(now):
            return 0, FOREVER
        n = want
        if self.warm is not None:
            n = min(n, self.warm.left())
        if self.throttle_bucket is not None and now >= self.throttle_until:
            self._end_throttle(now)
        bs = self.all_buckets
        for b in bs:
            a = b.available(now)
            if a < n:
                n = a
        if n <= 0:
            wait = 0.001
            for b in bs:
                w = b.peek(now)
                if w > wait:
                    wait = w
            return 0, wait
        for b in bs:
            if b.acquire(now, n) > 0.0:
                # Only a shared bucket (first: nothing else is spent yet) can
                # refuse after available(): another worker took it meanwhile.
                return 0, max(0.001, b.peek(now, n))
        if self.warm is not None:
            self.warm.sent += n
        return n, 0.0

    def budget(self, now: float, horizon: float, shared: bool = True) -> int:
        """How many messages this lane may send within ``horizon`` seconds from
        ``now`` (an estimate for the worker's ready queue, consuming nothing):
        UNBOUNDED with nothing to enforce, 0 while resting or suspended beyond
        the horizon or at its warm-up cap, else the tightest bucket's tokens
        now plus what its rate adds over the horizon -- a bucket the node's
        workers share (:attr:`shared`), this worker's part of its rate
        (``SharedGcra.share``: each worker planned on the whole rate); not
        counted at all without ``shared`` (the caller counts it once for all
        the lanes that spend it)."""
        if self.free:
            return UNBOUNDED
        if self.blocked_until and now < self.blocked_until:
            if self.blocked_until - now >= horizon:
                return 0
            horizon -= self.blocked_until - now
        n = UNBOUNDED
        if self.warm is not None:
            n = max(0, self.warm.left())
        for b in self.all_buckets:
            if b is self.shared and not shared:
                continue
            rate = b.share(now) if b is self.shared else b.rate
            n = min(n, max(0, b.available(now)) + int(rate * horizon))
        return n

    def send_rate(self, now: float = 0.0, shared: bool = True) -> float:
        """Messages per second this lane's tightest bucket allows (inf: none);
        a shared bucket's (``shared``), this worker's part of it at ``now``."""
        rate = math.inf
        for b in self.all_buckets:
            if b is self.shared:
                if shared:
                    rate = min(rate, b.share(now))
            elif b.rate < rate:
                rate = b.rate
        return rate

    def resume_at(self, now: float) -> float:
        """Seconds from ``now`` until this lane may carry mail again (0.0: now;
        FOREVER at its warm-up cap, which ends with the UTC day)."""
        if self.blocked_until and now < self.blocked_until:
            left = self.blocked_until - now
            return min(left, self.blocked_recheck) if self.blocked_recheck else left
        if self.warm is not None and self.warm.left() <= 0:
            return FOREVER
        return 0.0

    def idle(self, now: float) -> bool:
        """Nothing here that a fresh lane would not have: no connection, rest,
        throttle, AIMD cut or rule history, every bucket full. (A warm-up
        counter lives in its pool; Shaper.lane() links it to a new lane.)
        A throttle that has ended, rule matches older than their rule's
        period and an AIMD cut with no mail for AIMD_FORGET are nothing
        (before, a lane that ever met a rule's reply or a cut was kept for the
        worker's life: one per such site, a serve's whole life)."""
        if self.active:
            return False
        a = self.aimd
        if self.aimd_bucket is not None and a is not None and now - a.last_active() < AIMD_FORGET:
            return False
        if self.throttle_bucket is not None and now < self.throttle_until:
            return False
        for t in self.triggers.values():
            if t.times and now - t.times[-1] <= t.rule.period:
                return False
        if self.blocked_until and now < self.blocked_until:
            return False
        bs = self.buckets if self.conn_bucket is None else [*self.buckets, self.conn_bucket]
        return all(b.available(now) >= b.burst for b in bs)

    # -- feedback --------------------------------------------------------------

    def observe(
        self, results: list[TxnResult], now: float, delivered_one: int = -1
    ) -> list[TxnResult]:
        """Read a group's outcomes; may rewrite outcomes (action "bounce").
        ``delivered_one``: how many of them are one recipient delivered, when
        the caller knows (the SMTP client counts them): when that is all of
        them, no outcome is read."""
        n = len(results)
        delivered = n if delivered_one == n else all_delivered(results)
        if delivered >= 0:  # the usual group: every message delivered, no reply to read
            if self.aimd is not None:
                self.feed_aimd(now, delivered, 0, False)
            return results
        delivered = deferred = 0
        slow = False
        rewritten = False
        # The last recipient of the group taken ((message, recipient); (-1, -1):
        # none): a deferral before it was answered while the receiver took mail
        # from this address, the same moments (recipient_only)
        last = (-1, -1)
        for t in range(len(results) - 1, -1, -1):
            outs = results[t].outcomes
            i = next((j for j in range(len(outs) - 1, -1, -1) if outs[j].kind == DELIVERED), -1)
            if i >= 0:
                last = (t, i)
                break
        for t, tr in enumerate(results):
            outs = tr.outcomes
            for i, o in enumerate(outs):
                if o.kind == DELIVERED:
                    delivered += 1
                    continue
                own = o.kind == DEFERRED and recipient_only(o, (t, i) < last)
                if o.kind == DEFERRED and not own:
                    deferred += 1
                if o.code:
                    r = self.reply(o, now, own)
                    slow = slow or r == "slow"
                    rewritten = rewritten or r == "bounce"
        if self.aimd is not None:
            self.feed_aimd(now, delivered, deferred, slow)
        if rewritten:
            results = [self._rewrite(tr) for tr in results]
        return results

    def _rewrite(self, tr: TxnResult) -> TxnResult:
        outs = []
        for o in tr.outcomes:
            if o.kind == DEFERRED and o.code and self._bounce_rule(o):
                o = Outcome(
                    FAILED, 554, "5.7.0", f"{o.code} {o.enhanced} {o.text}".strip(), o.stage, o.mx
                )
            outs.append(o)
        return TxnResult(tr.tag, outs, tr.queue_id)

    def _bounce_rule(self, o: Outcome) -> bool:
        line = f"{o.code} {o.enhanced} {o.text}"
        reason = _classify(o.code, o.enhanced, o.text, o.stage)[2] if self.by_reason else ""
        return any(r.action == "bounce" and r.matches(o.code, line, reason) for r in self.rules)

    def reply(self, o: Outcome, now: float, own: bool = False) -> str:
        """Apply rules and block detection to one non-delivered reply; ``own``:
        a deferral of its recipient alone (:func:`recipient_only`), read by
        the rules only.

        Returns "bounce" (rewrite to failed), "slow" (a slow-down signal) or "".
        """
        line = f"{o.code} {o.enhanced} {o.text}"
        answer = ""
        rate_limited, ip_blocked, reason = _classify(o.code, o.enhanced, o.text, o.stage)
        for rule in self.rules:
            if not rule.matches(o.code, line, reason):
                continue
            if rule.action == "bounce":
                answer = "bounce"
                continue
            t = self.triggers.get(rule.name)
            if t is None:
                t = self.triggers[rule.name] = Trigger(rule)
            if t.hit(now):
                self.fire(rule, now, line)
            return "slow" if rule.action == "throttle" else answer
        if own:
            return answer
        if ip_blocked:
            self.block(now, self.rest_duration, "rest", f"ip blocked: {line}")
        return "slow" if rate_limited else answer

    def provider_signal(self, o: Outcome) -> bool:
        """Whether a refusal before any transaction (the greeting) speaks for
        every host of the site: one of the lane's rules names it (a provider's
        documented throttle or block, Yahoo's [TS04] at the greeting) or it asks
        to slow down. Any other says what one host does with this address: the
        site's next MX host is tried first (delivery.pool)."""
        line = f"{o.code} {o.enhanced} {o.text}"
        rate_limited, _ip_blocked, reason = _classify(o.code, o.enhanced, o.text, o.stage)
        return rate_limited or any(r.matches(o.code, line, reason) for r in self.rules)

    def fire(self, rule: Rule, now: float, line: str) -> None:
        if rule.action in ("suspend", "rest"):
            self.block(now, rule.duration, rule.action, f"rule {rule.name}: {line}")
            return
        self.throttle(rule, now, rule.duration, f"rule {rule.name}: {line}")

    def throttle(
        self, rule: Rule, now: float, duration: float, reason: str, ordered: bool = False
    ) -> None:
        """Throttle this lane by ``rule`` for ``duration`` s: the address's
        limits, this worker's part of them when workers share the address (as
        split_limits; each sent at the whole throttled rate: Gmail's "unusual
        rate" throttle of 10/min was 20/min from an address two workers share,
        the default with no [ips] source). ``ordered``: another worker's
        throttle of the address, told by the supervisor (wire.IPRest under
        THROTTLE_KEY): the others sent on at full speed until each met the
        rule's replies itself."""
        k, place = self.part
        self.throttle_until = now + duration
        if rule.rate > 0:
            self.throttle_bucket = Gcra(rule.rate / k, 1)
            self.throttle_bucket.acquire(now)  # start empty: no burst on entry
        if rule.max_connections:
            mc = rule.max_connections
            self.throttle_conns = max(1, mc // k + (1 if place < mc % k else 0))
            self.throttle_whole = mc
        self._refresh()
        self.emit(
            now,
            "throttle",
            reason=reason,
            rule=rule.name,
            rate=rule.rate or None,
            max_connections=rule.max_connections or None,
            duration=duration,
            ordered=ordered or None,
        )

    def block(
        self,
        now: float,
        duration: float,
        action: str,
        reason: str,
        ordered: bool = False,
        recheck: float = 0.0,
    ) -> None:
        """Rest or suspend this lane for ``duration`` s; ``ordered``: the
        supervisor ordered it (a blocklist listing, another worker's rest of
        the address), not this lane's own reply: the event says so and it is
        not told to the other workers again. ``recheck``: see ``blocked_recheck``."""
        until = now + duration
        if not ordered and until > self.own_until:
            self.own_until, self.own_reason = until, reason
        if until <= self.blocked_until:
            return
        self.blocked_until = until
        self.blocked_reason = reason
        self.blocked_recheck = recheck
        self._refresh()
        self.emit(now, action, reason=reason, duration=duration, ordered=ordered or None)

    def lift(
        self, now: float, until: float, reason: str, why: str, recheck: float = 0.0
    ) -> None:
        """An ordered rest ended early (``why``: its blocklist delisted the address):
        blocked now only until ``until`` (monotonic; the other rests still ordered,
        ``reason`` and ``recheck`` the longest's) or this lane's own rest, whichever
        ends later."""
        if until < self.own_until:
            until, reason, recheck = self.own_until, self.own_reason, 0.0
        if not self.blocked_until or until >= self.blocked_until:
            return
        if until <= now:
            self._unblock(now, why)
            return
        self.blocked_until, self.blocked_reason, self.blocked_recheck = until, reason, recheck
        self._refresh()
        self.emit(now, "rest", reason=reason, duration=until - now, ordered=True, lifted=why)

    def _unblock(self, now: float, why: str = "") -> None:
        self.blocked_until = 0.0
        self.blocked_reason = ""
        self.blocked_recheck = 0.0
        self._refresh()
        self.emit(now, "resume", reason=why or None)

    def _end_throttle(self, now: float) -> None:
        self.throttle_bucket = None
        self.throttle_conns = self.throttle_whole = 0
        self._refresh()
        self.emit(now, "throttle_end")

    def feed_aimd(self, now: float, delivered: int, deferred: int, slow: bool) -> None:
        a = self.aimd
        assert a is not None
        before = a.rate
        what = a.observe(now, delivered, deferred, slow)
        if what == 0:
            return
        if a.rate >= a.ceiling:  # back at the configured rate (or unlimited)
            self.aimd_bucket = None
        else:
            burst = max(1, int(a.rate * 0.1))
            b = self.aimd_bucket
            if b is None or not (burst // 2 <= b.burst <= burst * 2):
                fresh = Gcra(a.rate, burst)
                fresh.acquire(now, burst)  # start empty: a cut never releases a burst
                self.aimd_bucket = fresh
            else:
                b.set_rate(a.rate, now)
        self._refresh()
        q = self.aimd_quiet
        if what == DECREASED:
            q[:] = [1, delivered, deferred]
            prev = before
        else:
            # Increases come with nearly every report (one a second a lane: 112
            # events in 50 s for two addresses); the first of a climb is told at
            # once, then one when the rate is AIMD_STEP times what was last told
            # (or AIMD_QUIET s on), the reports between summed into it. Cuts and
            # restores are always told.
            q[0] += 1
            q[1] += delivered
            q[2] += deferred
            if what == INCREASED and self.aimd_climb and now - self.aimd_said_at < AIMD_QUIET and (
                a.rate < self.aimd_said * AIMD_STEP or now - self.aimd_said_at < 1.0
            ):
                return
            prev = self.aimd_said if self.aimd_climb else before
        name = {DECREASED: "aimd_decrease", LIFTED: "aimd_restore"}.get(what, "aimd_increase")
        # previous_rate: the rate the last aimd event told (absent: unlimited), so
        # a log reader sees each change as a step ("262 -> 131"), not only its
        # result; delivered, deferred: the report's counts, summed over the
        # ``reports`` an increase event stands for
        self.emit(now, name, rate=None if math.isinf(a.rate) else round(a.rate, 3),
                  previous_rate=None if math.isinf(prev) else round(prev, 3),
                  delivered=q[1], deferred=q[2], reports=q[0] if q[0] > 1 else None)  # fmt: skip
        self.aimd_said, self.aimd_said_at = a.rate, now
        self.aimd_climb = what == INCREASED
        self.aimd_quiet = [0, 0, 0]

    def emit(self, now: float, action: str, **fields: Any) -> None:
        self.last_event = now
        ev: dict[str, Any] = {
            "time": time.time(),
            "event": "shaping",
            "action": action,
            "source_ip": self.ip,
            "site": self.site,
            "provider": self.provider,
        }
        ev.update({k: v for k, v in fields.items() if v is not None})
        self.events.append(ev)

    def rate(self) -> float:
        """The current AIMD rate (inf: not limited by AIMD)."""
        return math.inf if self.aimd is None else self.aimd.rate

    # -- a reload's hand-over ------------------------------------------------------

    def state(self, now: float) -> wire.LaneState | None:
        """What this lane has spent and learned, for the worker a reload starts
        in this one's place (:meth:`inherit`); None when a fresh lane would
        decide the same (full buckets, no cut, no throttle, no rule history)."""
        st = wire.LaneState(self.ip, self.site, now,
                            [(b.rate, b.burst, debt(b, now)) for b in self.buckets])  # fmt: skip
        busy = any(d > 0 for _r, _b, d in st.buckets)
        if self.conn_bucket is not None:
            st.conn = debt(self.conn_bucket, now)
            busy = busy or st.conn > 0
        a = self.aimd
        if a is not None and a.rate < a.ceiling:
            st.aimd_rate, st.aimd_peak, st.aimd_last_cut = a.rate, a.peak, a.last_cut
            if self.aimd_bucket is not None:
                st.aimd_debt = debt(self.aimd_bucket, now)
            busy = True
        if self.throttle_until > now:
            st.throttle_until, st.throttle_conns = self.throttle_until, self.throttle_conns
            st.throttle_whole = self.throttle_whole
            if self.throttle_bucket is not None:
                st.throttle_rate = self.throttle_bucket.rate
                st.throttle_debt = debt(self.throttle_bucket, now)
            busy = True
        if self.triggers:
            st.triggers = {k: list(t.times) for k, t in self.triggers.items() if t.times}
            busy = busy or bool(st.triggers)
        return st if busy else None

    def inherit(self, st: wire.LaneState, now: float, fresh: bool = True) -> None:
        """Start where a reload's retiring worker left this lane (:meth:`state`
        at ``st.at``): its buckets as spent (each matched to the bucket of the
        same window, scaled to a changed rate: no second burst), its AIMD cut
        (under the new ceiling; the increase goes on from there), a throttle
        still running, the rules' recent matches. Before, a reload gave every
        site a fresh burst and its configured rate back, a site slowed down
        for its 421s included. Not ``fresh`` (this lane has been sending: the
        retiring worker's replies that came after it started): only a lower
        AIMD rate and a later throttle are taken."""
        if not fresh:
            self._slow_as(st, now)
            return
        at = st.at
        if st.buckets:
            old = st.buckets
            self.buckets = [spent(r, b, *_closest(r, b, old), at) for r, b in self.limits.rates]
        if self.conn_bucket is not None and st.conn > 0:
            cb = self.conn_bucket
            self.conn_bucket = spent(cb.rate, cb.burst, cb.rate, st.conn, at)
        a = self.aimd
        if a is not None and st.aimd_rate < a.ceiling:
            a.rate, a.peak, a.last_cut = st.aimd_rate, st.aimd_peak, st.aimd_last_cut
            self.aimd_said, self.aimd_climb = a.rate, False  # its climb told afresh
            burst = max(1, int(a.rate * 0.1))
            self.aimd_bucket = spent(a.rate, burst, a.rate, st.aimd_debt, at)
        if st.throttle_until > now:
            self.throttle_until, self.throttle_conns = st.throttle_until, st.throttle_conns
            self.throttle_whole = st.throttle_whole
            if st.throttle_rate > 0:
                r = st.throttle_rate
                self.throttle_bucket = spent(r, 1, r, st.throttle_debt, at)
        for rule in self.rules:
            times = st.triggers.get(rule.name)
            if times:
                t = self.triggers[rule.name] = Trigger(rule)
                t.times.extend(times)
        self._refresh()

    def _slow_as(self, st: wire.LaneState, now: float) -> None:
        """:meth:`inherit` into a lane in use: as slow as the retiring worker's."""
        a = self.aimd
        if a is not None and st.aimd_rate < a.rate:
            a.rate, a.last_cut = st.aimd_rate, max(a.last_cut, st.aimd_last_cut)
            a.peak = a.peak or st.aimd_peak
            self.aimd_said, self.aimd_climb = a.rate, False
            b = self.aimd_bucket
            if b is None:
                b = self.aimd_bucket = Gcra(a.rate, max(1, int(a.rate * 0.1)))
                b.acquire(now, b.burst)  # as feed_aimd: a cut starts empty
            else:
                b.set_rate(a.rate, now)
        if st.throttle_until > max(now, self.throttle_until):
            self.throttle_until, self.throttle_conns = st.throttle_until, st.throttle_conns
            self.throttle_whole = st.throttle_whole
            if st.throttle_rate > 0 and self.throttle_bucket is None:
                self.throttle_bucket = Gcra(st.throttle_rate, 1)
                self.throttle_bucket.acquire(now)
        self._refresh()


class Shaper:
    """A worker's shaping registry: policy, pools, lanes, warm-up counters."""

    def __init__(
        self, config: Config, ips: list[str], now: float | None = None, index: int | None = None
    ) -> None:
        self.config = config
        self.policy: Policy = load_policy(config)
        poolset: PoolSet = load_pools(config, time.time() if now is None else now)
        self.poolset = poolset
        self.worker_ips = ips or [""]
        # workers sending from these addresses, and this one's place among them
        self.sharers, self.place = ip_sharers(config, ips, index)
        self.pools: dict[str, Pool] = {}
        for name, p in poolset.pools.items():
            p.split = self.sharers  # warm-up caps: this worker's part
            sub = p.restricted(self.worker_ips)
            self.pools[name] = sub if sub.ips else Pool(name, [], p.schedule)
        from fastsend.shaping.pools import PoolIP

        self.fallback = Pool("worker", [PoolIP(ip) for ip in self.worker_ips])
        self.ehlo = poolset.ehlo_names()
        self.lanes: dict[tuple[str, str], Lane] = {}
        self.limits: dict[tuple[str, str], Limits] = {}
        self.events: list[dict[str, Any]] = []
        # "day|ip|provider" -> {"|PLACE/SHARERS" or "": sent}, from the supervisor
        self.restored: dict[str, dict[str, int]] = {}
        # ip -> [(providers, until unix, reason, key, recheck)]: rests ordered by the
        # supervisor (a DNS blocklist listing: wire.IPRest); applied to the IP's lanes
        # as they are used.
        self.ip_rests: dict[str, list[tuple[frozenset[str], float, str, str, float]]] = {}
        self.warming = any(
            ip.warmup_start_day is not None for p in poolset.pools.values() for ip in p.ips
        )
        # (ip, site key) -> connections the retiring workers of this slot still
        # hold there (a reload: wire.Conns); none the rest of the time.
        self.borrowed: dict[tuple[str, str], int] = {}
        # (ip, site key) -> the lane a reload's retiring worker left (wire.Lanes),
        # applied when this worker makes that lane.
        self.inherited: dict[tuple[str, str], wire.LaneState] = {}
        # site key -> a rate bucket its lanes share with the node's other
        # workers (a relay's rate: share_rate).
        self.shared: dict[str, Any] = {}
        # What makes a lane's places on the node, (path, place, total) ->
        # transports.slots.Slots (set by the worker: shaping does not import
        # transports), or None: no places (a Shaper made in a test).
        self.places: Callable[[str, int, int], Any] | None = None

    def inherit(self, states: list[wire.LaneState]) -> None:
        """wire.Lanes: the lanes of the worker this one replaces (a reload), each
        started where it was (Lane.inherit) when it is made here; a later
        word of a lane made already slows it as the old one was slowed."""
        now = time.monotonic()
        for st in states:
            ln = self.lanes.get((st.ip, st.site))
            if ln is not None:  # (a later word: what replies the old one got since)
                ln.inherit(st, now, fresh=False)
            else:
                self.inherited[(st.ip, st.site)] = st

    def lane_states(self, now: float) -> list[wire.LaneState]:
        """Every lane's state a fresh one would not have (Lane.state), and what
        this worker inherited and has not used yet: for a reload's next worker."""
        out = [st for ln in self.lanes.values() if (st := ln.state(now)) is not None]
        out += [st for key, st in self.inherited.items() if key not in self.lanes]
        return out

    def lend(self, held: list[tuple[str, str, int]]) -> None:
        """wire.Conns: the connections the workers this one replaces still hold,
        per (source IP, site): each lane opens only what its limit leaves."""
        self.borrowed = {(ip, site): n for ip, site, n in held if n > 0}
        for key, ln in self.lanes.items():
            ln.borrowed = self.borrowed.get(key, 0)

    def pool(self, name: str) -> Pool:
        p = self.pools.get(name or self.poolset.default)
        if p is None or not p.ips:
            return self.fallback
        return p

    def lane_key(self, site_key: str, hosts: tuple[str, ...], domain: str) -> str:
        """The key of a site's lanes: its provider's (``mx-provider:NAME``) when its
        MX hosts match a provider's ``mx_suffixes`` and no ``[shaping.domain]``
        entry gives the domain limits of its own, else the MX set's
        (``site_key``). Each Microsoft 365 domain has an MX host of its own and
        Google's come in several MX sets: keyed by MX set, a provider's
        connection cap, rates, AIMD cuts and throttles held per domain (four
        hosted domains: four connections from one IP to an Outlook capped at
        one, three of them refused 421)."""
        if not site_key.startswith("mx:"):
            return site_key  # (a static route, an address literal: its own)
        entry = self.domain_entry(site_key, domain)
        if entry != site_key:
            return entry
        name = self.policy.provider_by_mx(hosts)
        if not name:
            return site_key
        return PROVIDER_LANES + name

    def domain_entry(self, site_key: str, domain: str) -> str:
        """``site_key`` of an MX site, made the domain's own
        (``...|domain:ENTRY``) when a ``[shaping.domain]`` entry applies to
        ``domain``: its queue and lanes (as KumoMTA's ``mx_rollup = false``).
        Keyed by the MX set alone, every domain of the set had one queue and
        lanes made with the limits of whichever domain came first: a domain's
        own entry was ignored when another's mail came first, and imposed on
        the others when its own did."""
        if self.policy.domains and site_key.startswith("mx:"):
            entry = self.policy.domain_entry(domain)
            if entry:
                return f"{site_key}|domain:{entry}"
        return site_key

    def site_limits(self, site_key: str, hosts: tuple[str, ...], domain: str) -> Limits:
        key = (site_key, domain)
        lim = self.limits.get(key)
        if lim is None:
            lim = self.policy.resolve(hosts, domain)
            lim = self.limits[key] = split_limits(lim, self.sharers, self.place)
        return lim

    def share_rate(self, site_key: str, bucket: Any) -> None:
        """Every lane of ``site_key`` (a relay's) also spends ``bucket``, one
        the node's workers share (transports.slots.SharedGcra)."""
        self.shared[site_key] = bucket
        for (_ip, key), ln in self.lanes.items():
            if key == site_key and ln.shared is not bucket:
                ln.shared = bucket
                ln._refresh()

    def lane(self, ip: str, site_key: str, limits: Limits, pool: Pool, now_unix: float) -> Lane:
        ln = self.lanes.get((ip, site_key))
        if ln is None:
            ln = self.lanes[(ip, site_key)] = Lane(
                ip,
                site_key,
                limits,
                rules_for(self.policy.rules, limits.provider),
                self.policy.aimd,
                self.policy.rest["duration"],
                self.events,
            )
            ln.part = (self.sharers, self.place)
            if self.sharers > 1 and self.places is not None:
                name = hashlib.sha256(f"{ip}|{site_key}".encode()).hexdigest()[:32]
                ln.places_at = (self.places, os.path.join(self.config.spool_dir, "lane-places", name))
            if self.shared and (shared := self.shared.get(site_key)) is not None:
                ln.shared = shared
                ln._refresh()
            if self.borrowed:
                ln.borrowed = self.borrowed.get((ip, site_key), 0)
            if self.inherited:
                st = self.inherited.pop((ip, site_key), None)
                if st is not None:
                    ln.inherit(st, time.monotonic())
        if self.ip_rests:
            self._apply_rests(ln, ip, now_unix)
        if self.warming:
            for p in pool.ips:
                if p.ip == ip and p.warmup_start_day is not None:
                    w = pool.warmup(p, limits.provider, now_unix)
                    if self.restored:
                        self._restore(w)
                    if ln.warm is not w:
                        ln.warm = w
                        ln._refresh()
        return ln

    def prune(self, now: float, keep: set[str]) -> None:
        """Forget lanes and limits of sites not in ``keep`` that carry no state."""
        for key, ln in list(self.lanes.items()):
            if key[1] not in keep and ln.idle(now):
                del self.lanes[key]
        held = keep | {site for _ip, site in self.lanes}
        self.limits = {k: v for k, v in self.limits.items() if k[0] in held}

    def adjust_warmup(self, offsets: dict[str, int]) -> None:
        """Warm-up day offsets per IP (the engagement-aware warm-up's decision)."""
        now = time.time()
        for pool in (*self.pools.values(), *self.poolset.pools.values()):
            pool.set_offsets(offsets, now)

    def rest_ip(
        self,
        ip: str,
        providers: list[str],
        until: float,
        reason: str,
        key: str = "",
        recheck: float = 0.0,
    ) -> None:
        """Rest ``ip`` for ``providers`` ("*": all; ``site:KEY``: that site,
        another worker's rest of an address they share) until ``until`` (unix
        seconds); a rest under ``key`` replaces that key's earlier one (its
        renewal), :meth:`lift_ip` ends it (wire.IPRest)."""
        now = time.time()
        keep = [r for r in self.ip_rests.get(ip, []) if r[1] > now and not (key and r[3] == key)]
        keep.append((frozenset(providers), until, reason, key, recheck))
        self.ip_rests[ip] = keep
        for (lip, _site), ln in self.lanes.items():
            if lip == ip:
                self._apply_rests(ln, ip, now)

    def lift_ip(self, ip: str, key: str) -> None:
        """End ``ip``'s rest under ``key`` (wire.IPLift: delisted): its lanes carry
        mail again at once, unless another rest still holds them (another
        blocklist's, another worker's of the address, the lane's own)."""
        rests = self.ip_rests.get(ip, [])
        gone = [r for r in rests if r[3] == key]
        if not gone:
            return
        now = time.time()
        left = [r for r in rests if r[3] != key and r[1] > now]
        if left:
            self.ip_rests[ip] = left
        else:
            self.ip_rests.pop(ip, None)
        mono = time.monotonic()
        why = f"lifted: {gone[-1][2]} no more"
        for (lip, _site), ln in self.lanes.items():
            if lip != ip:
                continue
            until, reason, recheck = 0.0, "", 0.0
            for provs, end, rsn, k, rc in left:
                if self._applies(ln, provs) and end > until and not k.startswith(THROTTLE_KEY):
                    until, reason, recheck = end, rsn, rc
            ln.lift(mono, mono + (until - now) if until else 0.0, reason, why, recheck)

    @staticmethod
    def _applies(ln: Lane, provs: frozenset[str]) -> bool:
        return "*" in provs or ln.provider in provs or "site:" + ln.site in provs

    def _apply_rests(self, ln: Lane, ip: str, now_unix: float) -> None:
        for provs, until, reason, key, recheck in self.ip_rests.get(ip, ()):
            if until > now_unix and self._applies(ln, provs):
                mono = time.monotonic()
                if key.startswith(THROTTLE_KEY):  # another worker's throttle of the address
                    name = key[len(THROTTLE_KEY) :].partition("|")[0]
                    rule = next((r for r in ln.rules if r.name == name), None)
                    if rule is not None and mono + (until - now_unix) > ln.throttle_until + 1.0:
                        ln.throttle(rule, mono, until - now_unix, reason, ordered=True)
                    continue
                if mono + (until - now_unix) > ln.blocked_until + 1.0:  # not told again
                    ln.block(mono, until - now_unix, "rest", reason, ordered=True,
                             recheck=recheck)  # fmt: skip

    def restore(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            day, ip, rest = k.split("|", 2) if k.count("|") >= 2 else (k, "", "")
            provider, sep, part = rest.partition("|")
            self.restored.setdefault(f"{day}|{ip}|{provider}", {})[sep + part] = v

    def _part(self) -> str:
        """The warm-up counter key's suffix of this worker's part of an address
        it shares with others (``|PLACE/SHARERS``), "" when it has it alone."""
        return f"|{self.place}/{self.sharers}" if self.sharers > 1 else ""

    def _restore(self, w: Warmup) -> None:
        """Take the spool's count for ``w`` (``DAY|IP|PROVIDER``), restored at
        start or sent by the supervisor: this worker's own part's when the
        address was shared the same way, else what all of them sent, divided
        among today's sharers (a restart with another number of workers)."""
        parts = self.restored.pop(f"{w.day}|{w.ip}|{w.provider}", None)
        if not parts:
            return
        own = parts.get(self._part())
        if own is None:
            own = -(-sum(parts.values()) // self.sharers)
        w.sent = max(w.sent, own)

    def warm_counts(self) -> dict[str, int]:
        """Today's warm-up counts (``DAY|IP|PROVIDER`` -> sent), each key with
        this worker's part (:meth:`_part`) when workers share the address:
        each counts against its own part of the cap, and the supervisor keeps
        the highest count a key was given (a reload's two workers of one slot
        report the same part). One key for all of them had the supervisor keep
        the busiest worker's count as the address's: 3 + 3 sent stored as 3,
        and a restart with one worker sent 3 more over the day's cap."""
        out: dict[str, int] = {}
        part = self._part()
        for p in self.pools.values():
            for w in p.counters.values():
                if w.sent:
                    out[f"{w.day}|{w.ip}|{w.provider}{part}"] = w.sent
        return out

    def take_events(self) -> list[dict[str, Any]]:
        ev, self.events[:] = list(self.events), []
        return ev
