"""Ready queues and connection pools of one worker, per destination site.

A :class:`SiteQueue` holds the envelopes ready for one site (the Postfix
"active queue" for that destination, bounded by the supervisor's window). Up to
``max_connections`` connections per source IP pull from it; each connection is
persistent and pipelined: it takes up to ``pipeline`` envelopes per write
group, reuses itself for up to ``max_messages_per_connection`` messages, and
closes (QUIT) after ``idle_timeout`` with nothing to do. Connections are spread
over the worker's source IPs round-robin.

A new connection tries the site's addresses in preference order, those of
equal preference (MX hosts of one preference, a host's addresses) in turn
from one connection to the next, to spread the load (RFC 5321 5.1; Postfix's
smtp_randomize_addresses): up to MX_ADDRESSES addresses, at most MX_PER_NAME of one MX name while
another name is left (so a preferred MX whose addresses are all down still
leaves its backup MX tried); an address that did not answer is tried after the
others for DOWN_FOR seconds. When every host fails, the envelopes it would
have carried are answered with that failure (deferred or failed), so nothing
waits forever on a dead site; when none even took a TCP connection or greeted
(or each greeted with a 4xx: "421 try again later", not about a count of
connections), and no other session of the site is open, the site is unreachable: all its
waiting envelopes are answered at once, and what is pushed for it in the next
DEAD_FOR seconds too, without a connection (Postfix's dead destination), so
its mail does not sit in the window a connect timeout per group.

A connection that cannot be opened while others of its site are open or
opening (a 421 "too many concurrent connections" greeting, a listen backlog
that drops the SYN) leaves the mail to them: it ends without deferring any,
and the site opens no more than the sessions it has for CAP_FOR seconds.
Only the site's last connection answers the mail with its failure.

A session that ends under a pipelined group (the server's 421 "too many
messages in this connection" after N, a dropped connection) leaves envelopes
the server never took nor refused (their MAIL or RCPT unanswered, or answered
with that 421, or a 421 at the session's error cap, Postfix's "too many
errors"): when the connection had delivered or been refused something, they go back to
the front of the ready queue for the next session, unreported, instead of
being deferred for a retry interval (Postfix, one message in flight, loses
at most one; a group of hundreds would all wait). A 421 that is not about
the session's own cap ("unusual rate", "try again later") asks to slow down:
its group is deferred and read by the shaping, as before.

Shaping (fastsend.shaping): the site's limits are resolved once per site
queue; each source IP's :class:`~fastsend.shaping.lanes.Lane` caps its
connections, the messages of each pipelined group (GCRA buckets, AIMD,
throttles, warm-up caps) and new connections, and reads every group's
outcomes (automation rules, IP blocks). Source IPs come from the campaign's
pool by smooth weighted round-robin; an IP that may not send (rested,
suspended, at its warm-up cap) gives its share to the others, and when none
may send, the waiting envelopes go back to the scheduler as deferred.

Fairness: a ready queue holds only what its site may send soon -- what its
lanes' rates allow within ``[delivery] ready_horizon`` seconds (and at most
``max_ready`` envelopes, if set). The rest goes back to the supervisor through
``handback`` (unattempted, with a suggested time), as does the mail of a site
resting or suspended for longer, so one slow site never fills the worker's
window while mail to other sites waits. A site with nothing to enforce costs
one check per pushed batch; draining, the horizon shrinks to DRAIN_HORIZON.

A site under an MTA-STS policy (:attr:`Site.sts`, delivery/mtasts.py) opens
each connection to a host its policy names with STARTTLS required and the
certificate verified for the MX name (``[tls] ca_file``): in enforce mode a
failure answers like any failed connection, deferred, never clear text; in
testing mode the failure is reported and the connection made again as the
site would without a policy. An MX host with DANE TLSA records
(:attr:`Host.tlsa`, delivery/dane.py) is connected with STARTTLS required and
its certificate checked against them instead; a failure defers. Each failure
goes to ``sts_report`` (TLS-RPT).

It does not decide retries or touch the spool: outcomes go to ``report``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from fastsend.config import Config
from fastsend.delivery import dane
from fastsend.delivery.mtasts import session_result, verify_context
from fastsend.delivery.mx import Host, Site
from fastsend.outcome import (
    DATA_COMMAND,
    DEFERRED,
    DELIVERED,
    FAILED,
    Envelope,
    Outcome,
    TxnResult,
)
from fastsend.shaping.lanes import FOREVER, PROVIDER_LANES, UNBOUNDED, Lane, Shaper
from fastsend.shaping.policy import Limits
from fastsend.shaping.pools import utc_day
from fastsend.smtp.transport import ConnectOptions, SMTPConnection, Timeouts, connect
from fastsend.wire import ELSEWHERE_IP, ELSEWHERE_WORKER, SiteMarks

if TYPE_CHECKING:
    from fastsend.transports.slots import Slots

Report = Callable[[list[TxnResult], str, str], None]  # results, source_ip, mx
# envelopes, delay (s) before the first may be tried again, spacing (s), why
# (and optionally ``elsewhere``: no address of this worker may send them before then)
Handback = Callable[..., None]
DRAIN_HORIZON = 2.0  # draining: keep what a site may send within this, hand back the rest
TRIM_WAIT = 1.0  # a connection told to wait this long re-checks its site's ready queue
# A connection whose full group was all delivered within GROUP_QUICK seconds,
# on a lane with no rate to keep, takes twice as many next time, up to
# GROUP_GROW x `pipeline`; back to `pipeline` after a group that was not all
# delivered, took over 2 x GROUP_QUICK, or once its lane has a rate (see
# SiteQueue._connection).
GROUP_QUICK = 1.0
GROUP_GROW = 4
MAX_READY_DELAY = 1.0  # delay for envelopes over max_ready at a site with no rate limit
# A new connection tries up to MX_ADDRESSES of the site's addresses, in
# preference order (Postfix's smtp_mx_address_limit), at most MX_PER_NAME of
# one MX name while another name is left; one that did not answer (TCP) is
# tried after the others for DOWN_FOR seconds.
MX_ADDRESSES = 5
MX_PER_NAME = 2
DOWN_FOR = 60.0
# Mail whose site no source address of the worker can reach (its MX hosts of
# the other address family only), handed back to another worker, else held
# this long before it comes back
FAMILY_WAIT = 300.0
# A host that refused a source IP at its greeting (554, 421: not a signal
# about the provider, Lane.provider_signal) is tried after the site's other
# hosts from that address for this long (BUSY_FOR after a 4xx: busy, or
# under maintenance, for now); only when every host it tried refuses does the
# lane (the IP for the whole site) take the refusal.
REFUSED_FOR = 3600.0
BUSY_FOR = 300.0
# A connection refused while others of the site work caps the site's
# connections at those that work (and raises it to as many as open at once:
# in a burst the first refusal may come back while the others still greet) for
# this long; then it probes one more (cap + 1, for as long again: refused, the
# cap is what works again; taken, one more after it), not the whole width at
# once, whose every connection over the site's limit was refused again, as
# PowerMTA and KumoMTA feel their way back up.
CAP_FOR = 60.0
# A lone connection refused for the count of connections from its address (all
# another's): its mail goes back, unattempted, due again this much later (or at
# once to another worker); doubled while it happens again with no session between.
CONNS_WAIT = 5.0
# A relay's connections shared by the node's workers (transports.slots): how
# often a worker with none tries for a place again, and how long one that left
# its place to a waiting worker leaves it.
SLOT_WAIT = 0.05
SLOT_YIELD = 0.25
# A site none of whose addresses took a TCP connection or greeted on it, with
# no session of its own open, is unreachable: its mail is answered with that failure for this
# long (at most [retry] min_backoff) without a new connection (Postfix's dead
# destination, KumoMTA's failed ready queue).
DEAD_FOR = 60.0
_NO_SESSION = frozenset(("connect", "greeting"))  # (with no reply: code 0)
# ... or whose session cannot be used whatever the mail: TLS that is required
# and failed (an MTA-STS or DANE policy, a relay's), AUTH refused (a relay's
# credentials: a login tried again per group could lock the account).
_NO_USE = frozenset(("starttls", "tls", "auth"))
# A greeting's 4xx about how many connections the client has open
_CONNECTIONS = re.compile(
    r"\bconnections?\b.{0,40}\b(?:limit|exceeded|maximum|many|max)\b"
    r"|\b(?:too many|maximum|max|limit|exceeded)\b.{0,40}\b(?:connections?|sessions?|concurrent)\b",
    re.IGNORECASE,
)
NO_LIMIT = 1 << 62  # messages per connection when the limit is 0
# Outcomes of a session's end that say the server neither took nor refused
# the envelope: its MAIL/RCPT/DATA unanswered (code 0: the connection dropped;
# DATA before its 354: nothing of the message sent, DATA_COMMAND) or
# answered by a 421 that ends a session at its per-session cap ("too many
# messages in this connection"), or never started ("local"). Any other 421
# ("unusual rate", "try again later") asks to slow down: deferred, as before.
_UNSTARTED_STAGES = frozenset(("mail", "rcpt", "local", DATA_COMMAND))
# A host refusing the session before any mail (its reply: a code): the
# greeting, or EHLO and then HELO (Postfix's smtpd_helo_restrictions with
# smtpd_delay_reject = no: "554 5.7.1 <name>: Helo command rejected").
_REFUSED_SESSION = frozenset(("greeting", "ehlo", "helo"))
_PER_SESSION = re.compile(
    r"\b(?:in|on|per|for) (?:this|the|a|one|each|same) (?:connection|session)\b"
    r"|\bper (?:connection|session)\b"
    # A session's error cap: Postfix's smtpd_hard_error_limit ("421 4.7.0 mx
    # Error: too many errors"), counted in refused RCPTs; Exchange's "421 4.7.0
    # Too many errors on this connection, closing transmission channel".
    r"|\btoo many errors\b",
    re.IGNORECASE,
)


class SiteQueue:
    def __init__(
        self,
        site: Site,
        ips: list[str],
        config: Config,
        report: Report,
        helo: str,
        count: Callable[..., None] | None = None,
        shaper: Shaper | None = None,
        pool: str = "",
        domain: str = "",
        handback: Handback | None = None,
        limits: Limits | None = None,
        connect_options: dict[str, Any] | None = None,
        sts_report: Callable[..., None] | None = None,
        reports_tls: Callable[[str], bool] | None = None,
    ) -> None:
        self.site = site
        self.sts_report = sts_report
        # TLS-RPT no-policy-found (RFC 8460 4.4): whether a recipient domain
        # asked for reports; each session to an MX site without a policy counts
        # once for each such domain it carries mail for (_no_policy_sessions)
        self.reports_tls = reports_tls if sts_report is not None else None
        self.transport = ""  # the relay transport's name (delivery.routes), else ""
        # A relay route (fastsend.transports.relay) brings its own limits and
        # ConnectOptions fields (AUTH, TLS mode, implicit TLS, CA).
        self.connect_options = connect_options or {}
        self.handback = handback
        self.horizon = config.delivery.ready_horizon
        self.max_ready = config.delivery.max_ready
        self.closed = asyncio.Event()
        self.ips = ips or [""]
        self.config = config
        self.report = report
        self.helo = helo
        self.count: Callable[..., None] = count or (lambda name, n=1.0: None)
        self.shaper = shaper if shaper is not None else Shaper(config, self.ips)
        self.pool = self.shaper.pool(pool)
        # A pool of unequal weights: each address's share of the site's
        # connections from this worker (its weight over the heaviest's of those
        # that may send now -- not resting, suspended or at a warm-up cap -- of
        # its lane's max_connections, at least one). Every address may open as many
        # as the lane allows and a busy site's mail went out through them in
        # equal parts: weights 3:1 sent 1,000 and 1,000 (the supervisor splits
        # mail by weight only between workers).
        weights = {p.ip: p.weight for p in self.pool.ips}
        self.weights = weights if len(set(weights.values())) > 1 else None
        # A static route (a relay, a sink) carries every domain: it gets the
        # default limits (and any [shaping.domain."ROUTE-HOST"]), never the
        # provider of whichever domain happened to come first.
        hosts = tuple(h.name for h in site.hosts)
        if site.key.startswith("route:") and hosts:
            domain = hosts[0]
        # Its lanes: its provider's, shared by every MX set of it (Shaper.lane_key)
        self.lanes_key = self.shaper.lane_key(site.lanes, hosts, domain)
        # A provider's lanes have its limits whatever the domain (lane_key: none
        # of its own): one cache entry, not one per domain while the lanes live
        shared = self.lanes_key.startswith(PROVIDER_LANES)
        self.limits = limits or self.shaper.site_limits(
            self.lanes_key, hosts, "" if shared else domain
        )
        # Equal-preference addresses, taken in turn by new connections, from a
        # random one (RFC 5321 5.1: every worker, every node must not start on
        # the same host).
        self.turn = random.randrange(1 << 16)
        self.down: dict[str, float] = {}  # address -> until when it is tried last
        # (source IP, address) -> until when that host, which refused the address
        # at its greeting, is tried after the site's others from it (REFUSED_FOR)
        self.refused: dict[tuple[str, str], float] = {}
        self.pending: collections.deque[Envelope] = collections.deque()
        self.wakeup = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        self.sending = 0  # pipelined groups written and not yet answered
        # Those groups' connections, each with its envelopes (Worker.stop_now
        # asks them which were never written).
        # (and the source IP each is sent from; Worker.tell_answered)
        self.groups: dict[int, tuple[SMTPConnection, list[Envelope], str]] = {}
        self.on_group: Callable[[SiteQueue], None] | None = None  # told when one is written
        self.nconn = 0  # connection tasks running
        self.sessions = 0  # ... of which have an open session
        self.cap = 0  # the most connections to open before cap_until (0: no cap)
        # the wait of the next hand-back for connections held elsewhere (doubled
        # each time in a row, at most BUSY_FOR: a receiver that always says so)
        self.conns_wait = CONNS_WAIT
        self.cap_until = 0.0
        # A relay's connections shared with the node's other workers (its
        # max_connections is theirs together: transports.slots, set by
        # delivery.routes): each connection task holds a place; ``workers``
        # of them; until when this one leaves a freed place to a waiting one.
        self.slots: Slots | None = None
        # lanes whose address's connections here are places on the node (Lane.place)
        self.placed: set[Lane] = set()
        self.slot_workers = 1
        self.yield_until = 0.0
        self.slot_timer: asyncio.TimerHandle | None = None
        # Unreachable until (monotonic; 0: it is not), and the answer meanwhile;
        # each source IP whose last connection found the site unusable, until when.
        self.dead_until = 0.0
        self.dead: Outcome | None = None
        self.unreached: dict[str, float] = {}
        d = config.delivery
        t = d.command_timeout
        self.timeouts = Timeouts(
            connect=d.connect_timeout,
            greeting=t,
            ehlo=t,
            starttls=t,
            mail=t,
            rcpt=t,
            data=min(t, 120.0),
            data_block=min(t, 180.0),
            data_end=max(t, 600.0) if t >= 300 else t,
            quit=min(t, Timeouts().quit),  # (the default's few round trips)
        )
        # A host with another of the site left to try waits at most
        # next_mx_after for its greeting (Postfix's smtp_connect_timeout +
        # smtp_helo_timeout): one that never greets held its mail the whole
        # command_timeout (300 s) before the backup MX was tried.
        self.first_timeouts = msgspec.structs.replace(
            self.timeouts, greeting=min(t, d.next_mx_after)
        )

    @property
    def site(self) -> Site:
        return self._site

    @site.setter
    def site(self, site: Site) -> None:
        """The site's hosts, and the addresses new connections try (also a
        refreshed DNS answer, Worker.site_queue: the queue kept trying the
        addresses it was made with while it lived, a serve's whole life)."""
        self._site = site
        self.candidates = _candidates(site.hosts)
        prefs = [h.pref for h in site.hosts]
        self.spread = len(prefs) > len(set(prefs))
        # A source address reaches only hosts of its family (False: IPv4, True:
        # IPv6): None when every host is of it, else those that are (an IPv6
        # source address has mx.MXResolver ask AAAA beside A: hosts of both)
        fams = {":" in h.address for h in site.hosts}
        self.families: dict[bool, tuple[Host, ...] | None] = {
            v6: None if fams <= {v6} else tuple(h for h in site.hosts if (":" in h.address) == v6)
            for v6 in (False, True)
        }

    @property
    def active(self) -> int:
        return self.nconn

    def push(self, envelopes: list[Envelope]) -> None:
        if self.dead_until:
            if time.monotonic() < self.dead_until and self.dead is not None:
                # Unreachable a moment ago: answered now, not held in the window
                # for another connect timeout (see _unreachable).
                out = self.dead
                self.report([TxnResult(e.tag, [out] * len(e.rcpts)) for e in envelopes], "", out.mx)
                return
            self.dead_until, self.dead = 0.0, None
        if self.handback is not None and self._no_family():
            # No MX host of any of this worker's addresses' families (IPv6-only
            # hosts, IPv4 source addresses): another worker's may reach them now
            # (the supervisor's Outcomes.hand_elsewhere), else it waits, unattempted
            # (and expires at [retry] max_age): every try here fails to connect.
            family = "IPv6" if any(":" in h.address for h in self.site.hosts) else "IPv4"
            why = f"handed back: the site's MX hosts have {family} addresses only"
            self.handback(envelopes, FAMILY_WAIT, 0.0, why, ELSEWHERE_WORKER)
            return
        self.pending.extend(envelopes)
        if self.handback is not None:
            self.trim()
        self.wakeup.set()
        self._scale()

    def trim(self) -> int:
        """Keep the envelopes this site may send within ``horizon`` seconds (and
        at most ``max_ready``); hand the newest others back, unattempted. Returns
        how many went back."""
        if self.handback is None or not self.pending:
            return 0
        now = time.monotonic()
        keep = 0
        rate = 0.0
        resume = FOREVER
        capped = True  # every lane is held by its warm-up cap (what is left today)
        # A bucket the lanes share with each other and the node's other workers
        # (a relay's rate, transports.slots.SharedGcra): counted once, at this
        # worker's part of its rate, not once per source IP at the whole rate.
        shared = self.lane(self.pool.ips[0].ip).shared if self.pool.ips else None
        for p in self.pool.ips:
            ln = self.lane(p.ip)
            n = ln.budget(now, self.horizon, shared is None)
            if n >= UNBOUNDED:
                keep = UNBOUNDED
                if shared is None:
                    break
            else:
                keep += n
                rate += ln.send_rate(now, shared is None)
            resume = min(resume, self._resume(p.ip, now))
            if capped and (ln.warm is None or n < ln.warm.left()):
                capped = False
        if shared is not None:
            part = shared.share(now)
            keep = min(keep, max(0, shared.available(now)) + int(part * self.horizon))
            rate = min(rate, part) if rate > 0.0 else part
        if self.max_ready and self.max_ready < keep:
            keep, delay, why = self.max_ready, MAX_READY_DELAY, f"over max_ready ({self.max_ready})"
        else:
            # Not before the horizon (what we keep fills it), nor before a lane resumes.
            delay = max(self.horizon, resume) if resume < FOREVER else self.horizon
            why = f"site shaped: {keep} may go within {self.horizon:g} s"
        excess = len(self.pending) - keep
        if excess <= 0:
            return 0
        pop = self.pending.pop
        back = [pop() for _ in range(excess)]
        back.reverse()  # oldest first: it gets the earliest time
        step = 1.0 / rate if 0.0 < rate < float("inf") else 0.0
        if keep == 0 and self.horizon < resume < FOREVER:
            # No address of this worker may send here before ``resume`` (rest,
            # suspension, warm-up caps): another worker's may, now.
            self.handback(back, delay, step, f"handed back: {why}", self._away(now))
        elif capped and not self.max_ready:
            # Over what this worker's warm-up caps leave today: not from here
            # before UTC midnight; another worker's addresses may send it now.
            midnight = 86400.0 - (time.time() % 86400.0) + 1.0
            self.handback(
                back, midnight, 0.0, "handed back: over today's warm-up caps", ELSEWHERE_WORKER
            )
        else:
            self.handback(back, delay, step, f"handed back: {why}")
        return excess

    def lane(self, ip: str) -> Lane:
        return self.shaper.lane(ip, self.lanes_key, self.limits, self.pool, time.time())

    def _scale(self) -> None:
        if self.slots is not None and self.slots.wanting:
            self.slots.unwant()  # marked again below if it still finds no place
        for ln in self.placed:
            if ln.places is not None and ln.places.wanting:
                ln.places.unwant()
        if self.closing or not self.pending:
            return
        d = self.config.delivery
        limit = self.limits.max_connections * len(self.pool.ips)
        if self.cap:
            now = time.monotonic()
            if now >= self.cap_until:
                # one more a CAP_FOR (the windows no connection was asked for in too):
                # the width the site takes, felt for
                more = 1 + int((now - self.cap_until) // CAP_FOR)
                if self.cap + more < limit:
                    self.cap += more
                    self.cap_until = now + CAP_FOR
                else:
                    self.cap = 0
            if self.cap:
                # (a reload's retiring worker's connections count: the cap is
                # the site's, and it still holds them)
                held = sum(self.lane(p.ip).borrowed for p in self.pool.ips) if (
                    self.shaper.borrowed) else 0  # fmt: skip
                limit = min(limit, max(0, self.cap - held))
        # One more connection per `pipeline` envelopes waiting, up to the limit.
        want = min(limit, max(1, -(-len(self.pending) // d.pipeline)))
        no_place = False
        while self.active < want:
            place = -1
            if self.slots is not None:
                got = self._place()
                if got is None:
                    no_place = True
                    break
                place = got
            lane = self._next_lane()
            own = -1 if lane is None else lane.place(time.monotonic())
            if lane is not None and own != -1:
                self.placed.add(lane)
            if lane is None or own is None:
                if place >= 0 and self.slots is not None:
                    self.slots.release(place)
                if own is None:
                    # The address's places on the node are all held by the
                    # other workers sending from it: try again shortly.
                    no_place = True
                    self._place_later(SLOT_WAIT)
                break
            lane.active += 1  # counted at once, so the next pick sees it
            self.nconn += 1
            task = asyncio.get_running_loop().create_task(self._connection(lane, place, own))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if not self.nconn:
            if no_place:
                return  # the node's other workers hold the relay's (the address's) connections
            if self._waits_for_lane():
                return  # (Lane.waiters: called again when one of its connections closes)
            if self._borrowed_only():
                # A reload's retiring worker holds the connections this site
                # allows (wire.Conns): its mail waits for them to close, as it
                # would for one of our own; not handed back, not deferred.
                asyncio.get_running_loop().call_later(TRIM_WAIT, self._scale)
                return
            self._hold()

    def marks(self, pool: str, key: str, now: float) -> SiteMarks | None:
        """What this queue (the worker's ``(pool, key)``) knows of its hosts and
        still holds at ``now`` (monotonic), for a reload's new worker
        (wire.Lanes ``marks``)."""
        down = {a: t for a, t in self.down.items() if t > now}
        refused = [(ip, a, t) for (ip, a), t in self.refused.items() if t > now]
        dead = self.dead if self.dead_until > now else None
        if not (down or refused or dead):
            return None
        return SiteMarks(
            pool, key, down, refused,
            self.dead_until if dead is not None else 0.0,
            (dead.enhanced, dead.text, dead.stage, dead.mx) if dead is not None else None,
        )  # fmt: skip

    def inherit_marks(self, m: SiteMarks) -> None:
        """A reload's retiring worker's :meth:`marks`: its hosts down or refusing
        are tried last here too, and an unreachable site stays answered
        without a connection, until the times it had."""
        now = time.monotonic()
        for a, t in m.down.items():
            if t > now and t > self.down.get(a, 0.0):
                self.down[a] = t
        for ip, a, t in m.refused:
            if t > now and t > self.refused.get((ip, a), 0.0):
                self.refused[(ip, a)] = t
        if m.dead is not None and m.dead_until > max(now, self.dead_until):
            enhanced, text, stage, mx = m.dead
            self.dead_until = m.dead_until
            self.dead = Outcome(DEFERRED, 0, enhanced, text, stage, mx)

    def inherit_cap(self, cap: int, until: float) -> None:
        """A reload's retiring worker capped this site's connections at ``cap``
        until ``until`` (monotonic): so is this queue (the lower, the later)."""
        if until > self.cap_until or not self.cap:
            self.cap_until = max(self.cap_until, until)
            self.cap = min(self.cap, cap) if self.cap else cap

    def _place(self) -> int | None:
        """A place among the relay's connections on this node (``slots``), or
        None and a new try shortly (another worker gets it first when it
        waits and this one just freed one)."""
        assert self.slots is not None
        now = time.monotonic()
        got = self.slots.acquire(not self.nconn) if now >= self.yield_until else None
        if got is None:
            self._place_later(max(SLOT_WAIT, self.yield_until - now))
        return got

    def _place_later(self, wait: float) -> None:
        """:meth:`_scale` again in ``wait`` s (a place among the relay's or the
        address's connections on the node may be free then)."""
        if self.slot_timer is None:

            def again() -> None:
                self.slot_timer = None
                self._scale()

            self.slot_timer = asyncio.get_running_loop().call_later(wait, again)

    def _waits_for_lane(self) -> bool:
        """Whether a source IP's lane may carry mail but has all the connections
        it allows open, for other sites sharing it (a provider's lanes,
        Shaper.lane_key): this site's mail waits for one of them to close
        (its retry in the lane's ``waiters``; idle ones are told to close,
        ``wakers``), it is not held back nor deferred."""
        now = time.monotonic()
        full = []
        for p in self.pool.ips:
            ln = self.lane(p.ip)
            if ln.active and ln.usable(now) and not ln.can_connect(now):
                full.append(ln)
        for ln in full:
            if self._scale not in ln.waiters:
                ln.waiters.append(self._scale)
            for wake in ln.wakers:
                wake.set()
        return bool(full)

    def _borrowed_only(self) -> bool:
        """Whether a retiring worker's connections alone keep every source IP
        of the pool from connecting to this site now."""
        if not self.shaper.borrowed:
            return False
        now = time.monotonic()
        return any(self.lane(p.ip).waits_for_borrowed(now) for p in self.pool.ips)

    def _next_lane(self) -> Lane | None:
        now = time.monotonic()
        lanes: dict[str, Lane] = {}
        weights = self.weights
        top = 0
        if weights is not None:  # the heaviest of the addresses that may send now
            top = max((weights[p.ip] for p in self.pool.ips if self.lane(p.ip).usable(now)),
                      default=0)  # fmt: skip

        def eligible(ip: str) -> bool:
            ln = lanes[ip] = self.lane(ip)
            if weights is not None and ln.active >= max(
                1, round(ln.max_connections * weights[ip] / max(1, top))
            ):
                return False  # (its weight's share of the connections)
            return ln.can_connect(now)

        p = self.pool.pick(self.limits.provider, time.time(), eligible)
        return None if p is None else lanes[p.ip]

    def _hold(self) -> None:
        """No source IP may send to this site now: give the mail back, unattempted
        until the first lane resumes (rest, suspension), else as deferred."""
        if not self.pending:
            return
        now = time.monotonic()
        if self.handback is not None:
            resume = min((self._resume(p.ip, now) for p in self.pool.ips), default=FOREVER)
            if 0.0 < resume < FOREVER:
                batch = list(self.pending)
                self.pending.clear()
                self.handback(
                    batch,
                    resume,
                    0.0,
                    "handed back: site resting, suspended or at warm-up caps",
                    self._away(now),  # another worker's addresses may send it now
                )
                return
        why = "no source IP may send to this site now"
        for ip in (p.ip for p in self.pool.ips):
            ln = self.lane(ip)
            if ln.blocked_reason and ln.blocked_until > now:
                why = f"{ip} held until +{ln.blocked_until - now:.0f} s: {ln.blocked_reason}"
                break
            if ln.warm is not None and ln.warm.left() <= 0:
                why = f"{ip} reached its warm-up cap for today ({ln.warm.cap})"
        out = Outcome(DEFERRED, 451, "4.7.0", f"held by shaping: {why}"[:400], "local")
        batch = list(self.pending)
        self.pending.clear()
        self.report([TxnResult(e.tag, [out] * len(e.rcpts)) for e in batch], "", "")

    def _no_family(self) -> bool:
        """Whether no source address of this worker (in the campaign's pool)
        can reach any of the site's hosts (an address family of its own)."""
        fams = self.families
        if fams[False] is None and fams[True] is None:
            return False  # (hosts of one family, no IPv6 source: the usual case)
        return all(p.ip and fams[":" in p.ip] == () for p in self.pool.ips)

    def _away(self, now: float) -> int:
        """Why none of this worker's addresses may send here (``now``:
        monotonic): ELSEWHERE_IP when one rests or is suspended (the site
        refuses the address: workers sending from it should not try either),
        else ELSEWHERE_WORKER (this worker's own warm-up caps)."""
        for p in self.pool.ips:
            ln = self.lane(p.ip)
            if ln.blocked_until > now:
                return ELSEWHERE_IP
        return ELSEWHERE_WORKER

    def _resume(self, ip: str, now: float) -> float:
        """Seconds until ``ip`` may send to this site again. A warm-up cap ends
        with the UTC day: its mail waits for midnight, unattempted, instead of
        being deferred (an attempt counted) again and again."""
        ln = self.lane(ip)
        r = ln.resume_at(now)
        if r >= FOREVER and ln.warm is not None and ln.warm.left() <= 0:
            r = 86400.0 - (time.time() % 86400.0) + 1.0
        return r

    def _take(self, limit: int = 1 << 30, most: int = 0) -> list[Envelope]:
        """Up to ``limit`` of the ready envelopes, oldest first, at most
        ``most`` (a connection's group) or `pipeline`."""
        n = min(most or self.config.delivery.pipeline, len(self.pending), limit)
        pop = self.pending.popleft
        return [pop() for _ in range(n)]

    async def _open(
        self, lane: Lane, failed: list[Outcome] | None = None
    ) -> SMTPConnection | Outcome:
        """A new session from ``lane``'s address: the site's hosts in turn (see
        MX_ADDRESSES), or the last failure; ``failed`` gets each failed
        attempt's outcome."""
        ip = lane.ip
        last: Outcome | None = None
        hosts = self.candidates
        mine = self.families[":" in ip] if ip else None
        if mine is not None:  # hosts of both families, or none of the source's
            if not mine:
                family = "IPv6" if ":" in ip else "IPv4"
                text = f"no {family} address for any MX host (source address {ip})"
                return Outcome(DEFERRED, 0, "4.4.1", text, "connect")
            if self.spread:
                self.turn += 1
                mine = _rotate(mine, self.turn)
            hosts = _candidates(mine)
        elif self.spread:
            self.turn += 1
            hosts = _candidates(_rotate(self.site.hosts, self.turn))
        if self.down or self.refused:
            hosts = self._order(hosts, ip)
        # Refusals at the greeting held back from the lane while another host
        # may take the mail (one host's word about this address, not the site's)
        refusals: list[Outcome] = []
        for n, host in enumerate(hosts):
            kw: dict[str, Any] = dict(
                host=host.address,
                port=host.port,
                source_ip=ip or None,
                helo_name=self.shaper.ehlo.get(ip) or self.helo,
                tls=self.limits.tls,  # validated by the policy
                # [delivery] max_messages_per_connection = 0: no limit (as Postfix's
                # smtp_connection_reuse_count_limit); it was every connection's
                # ValueError, so each message was deferred until it expired.
                max_messages=self.limits.max_messages_per_connection or NO_LIMIT,
                timeouts=self.timeouts if n == len(hosts) - 1 else self.first_timeouts,
                server_hostname=host.name,
            )
            if self.connect_options:
                kw.update(self.connect_options)
            sts = self.site.sts
            if host.tlsa:
                conn = await self._connect_dane(kw, host, ip)
            elif sts is not None and sts.matches(host.name):
                conn = await self._connect_sts(kw, host, ip)
            else:
                if sts is not None:  # testing mode (enforce left only matching hosts)
                    self._sts_failed(
                        host, ip, "validation-failure", "the MX host is not in the policy"
                    )
                conn = await connect(ConnectOptions(**kw))
            if not isinstance(conn, Outcome):
                if self.down:
                    self.down.pop(host.address, None)
                self.count("connections_opened")
                # Postfix-style "name[address]:port" for the event log.
                conn.mx = (
                    f"{host.name}[{host.address}]:{host.port}"
                    if host.name != host.address
                    else f"{host.address}:{host.port}"
                )
                return conn
            self.count("connections_failed")
            now = time.monotonic()
            if conn.stage == "connect" or (conn.stage == "greeting" and not conn.code):
                # No TCP session, or no greeting in time: others first for a while
                self.down[host.address] = now + DOWN_FOR
            if failed is not None:
                failed.append(conn)
            last = conn
            if conn.code:
                if (
                    conn.stage in _REFUSED_SESSION
                    and n < len(hosts) - 1
                    and not lane.provider_signal(conn)
                ):
                    self._refused(lane, host, conn, now)
                    refusals.append(conn)
                    continue
                lane.reply(conn, now)
        # No host took the mail: what they said is now about the site (read
        # until one rests the lane)
        for o in refusals:
            now = time.monotonic()
            if lane.blocked_until > now:
                break
            lane.reply(o, now)
        assert last is not None
        return last

    def _order(self, hosts: list[Host], ip: str) -> list[Host]:
        """``hosts`` with those that did not answer lately (``down``) or
        refused ``ip`` at their greeting (``refused``) after the others."""
        now = time.monotonic()
        for a in [a for a, until in self.down.items() if until <= now]:
            del self.down[a]
        for k in [k for k, until in self.refused.items() if until <= now]:
            del self.refused[k]
        later = [h for h in hosts if h.address in self.down or (ip, h.address) in self.refused]
        if not later:
            return hosts
        return [h for h in hosts if h not in later] + later

    def _refused(self, lane: Lane, host: Host, o: Outcome, now: float) -> None:
        """``host`` refused ``lane``'s address at its greeting, another host of
        the site is left: that host is tried after the others from it for
        REFUSED_FOR (BUSY_FOR after a 4xx; a shaping event says so, once),
        the lane is not rested."""
        key = (lane.ip, host.address)
        hold = BUSY_FOR if o.code < 500 else REFUSED_FOR
        if self.refused.get(key, 0.0) <= now:
            if len(self.refused) >= 4096:
                self.refused.clear()
            lane.emit(
                now,
                "host_refused",
                mx=f"{host.name}[{host.address}]:{host.port}",
                reason=f"{o.code} {o.enhanced} {o.text}".replace("  ", " ")[:300],
                duration=hold,
            )
        self.refused[key] = now + hold

    async def _connect_sts(
        self, kw: dict[str, Any], host: Host, ip: str
    ) -> SMTPConnection | Outcome:
        """A connection under the site's MTA-STS policy: STARTTLS required, the
        certificate valid for the MX name. Enforce: a failure is the answer
        (deferred). Testing: reported, then connected as without a policy."""
        sts = self.site.sts
        assert sts is not None
        plain = dict(kw)
        kw["tls"] = "required"
        kw["ssl_context"] = verify_context(self.config.tls.ca_file)
        kw["server_hostname"] = host.name
        conn = await connect(ConnectOptions(**kw))
        if not isinstance(conn, Outcome):
            self.count("tls_policy_sessions")
            if self.sts_report is not None:  # a success, counted for TLS-RPT
                self.sts_report(
                    sts.domain, sts.mode, "", "", mx=host.name, source_ip=ip, went=True,
                    policy=sts.lines, mx_host=sts.mx,
                )  # fmt: skip
            return conn
        if conn.stage not in ("starttls", "tls"):
            return conn  # no answer, a refused greeting: not a TLS matter
        self._sts_failed(host, ip, session_result(conn.stage, conn.code, conn.text), conn.text)
        if sts.mode == "testing":
            return await connect(ConnectOptions(**plain))
        text = f"MTA-STS policy of {sts.domain} (enforce): {conn.text}"
        code = conn.code if 400 <= conn.code < 500 else 451  # never a bounce: RFC 8461 5.1
        return Outcome(DEFERRED, code, "4.7.5", text[:500], conn.stage, conn.mx)

    async def _connect_dane(
        self, kw: dict[str, Any], host: Host, ip: str
    ) -> SMTPConnection | Outcome:
        """A connection to an MX host with usable TLSA records (RFC 7672):
        STARTTLS required, the certificate checked against them; a failure is
        the answer (deferred 4.7.5), never clear text."""
        kw["tls"] = "required"
        kw["ssl_context"] = dane.context()
        # SNI: the TLSA base domain (RFC 7672 8.1): the MX host's CNAME target
        # when its records were found there (Host.tlsa_name)
        kw["server_hostname"] = host.tlsa_name or host.name
        # DANE-TA's reference identifiers (RFC 7672 3.2.2): the TLSA base domain
        # (the MX host or its CNAME target, the domain itself when it is its
        # implicit MX), the MX host name, the next hop
        names = tuple(n for n in (host.tlsa_name, host.name, self.site.dane) if n)
        kw["peer_check"] = functools.partial(dane.check, host.tlsa, names)
        conn = await connect(ConnectOptions(**kw))
        records = tuple(f"{u} {s} {m} {d.hex()}" for u, s, m, d in host.tlsa if d)
        if not isinstance(conn, Outcome):
            self.count("tls_dane_sessions")
            if self.sts_report is not None:  # a success, counted for TLS-RPT
                self.sts_report(
                    self.site.dane, "", "", "", mx=host.name, source_ip=ip, went=True,
                    policy_type="tlsa", policy=records, mx_host=(host.name,),
                )  # fmt: skip
            return conn
        if conn.stage not in ("starttls", "tls"):
            return conn
        result = (
            "tlsa-invalid"
            if "peer check failed" in conn.text
            else session_result(conn.stage, conn.code, conn.text)
        )
        self.count("tls_policy_failures")
        if self.sts_report is not None:
            self.sts_report(
                self.site.dane, "", result, conn.text,
                mx=host.name, source_ip=ip, went=False, policy_type="tlsa",
                policy=records, mx_host=(host.name,), receiving_ip=host.address,
            )  # fmt: skip
        text = f"DANE (TLSA of {host.name}): {conn.text}"
        code = conn.code if 400 <= conn.code < 500 else 451
        return Outcome(DEFERRED, code, "4.7.5", text[:500], conn.stage, conn.mx)

    def _no_policy_sessions(
        self, conn: SMTPConnection, batch: list[Envelope], counted: set[str], ip: str
    ) -> None:
        """TLS-RPT no-policy-found: this session counts once for each recipient
        domain of ``batch`` not yet ``counted`` on it that asked for reports
        (``_smtp._tls``): a success when TLS was negotiated, else
        starttls-not-supported (not offered) or validation-failure (the
        handshake failed: the mail went in clear, as without a policy)."""
        assert self.reports_tls is not None and self.sts_report is not None
        reports_from = self.config.tls.report_from
        for e in batch:
            if not e.rcpts or e.mail_from == reports_from:
                continue  # (a TLS-RPT report's own session is not reported, RFC 8460 5.3)
            domain = e.rcpts[0].rpartition("@")[2].lower()
            if domain in counted:
                continue
            counted.add(domain)
            if not self.reports_tls(domain):
                continue
            name, _, rest = conn.mx.partition("[")
            address = rest.partition("]")[0]
            if conn.tls_active:
                result, text = "", ""
            elif "STARTTLS" in conn.capabilities:
                result, text = "validation-failure", "the TLS handshake failed: sent in clear"
            else:
                result, text = "starttls-not-supported", "the server does not offer STARTTLS"
            self.sts_report(
                domain, "", result, text, mx=name if address else "", source_ip=ip, went=True,
                policy_type="no-policy-found", receiving_ip=address,
            )  # fmt: skip

    def _sts_failed(self, host: Host, ip: str, result: str, text: str) -> None:
        sts = self.site.sts
        assert sts is not None
        self.count("tls_policy_failures")
        if self.sts_report is not None:
            self.sts_report(
                sts.domain, sts.mode, result, text,
                mx=host.name, source_ip=ip, went=sts.mode == "testing",
                policy=sts.lines, mx_host=sts.mx, receiving_ip=host.address,
            )  # fmt: skip

    async def _connection(self, lane: Lane, place: int = -1, own: int = -1) -> None:
        """One connection task: sessions from ``lane``'s address while mail
        waits. ``place``: its place among a relay's connections on the node
        (``slots``), ``own``: among the address's (``Lane.place``); -1: none."""
        ip = lane.ip
        pipeline = self.config.delivery.pipeline
        # Messages this connection takes per group: `pipeline`, or up to
        # GROUP_GROW times it while its groups are all delivered quickly and
        # its lane has no rate to keep (the lane still reads every group's
        # outcomes, at most a few seconds apart). Each group costs a wake-up
        # of this task, a write and a read more on both sides (its last end of
        # DATA goes alone) and a report of its results.
        group = pipeline
        top = pipeline * GROUP_GROW
        batch: list[Envelope] = []  # taken from pending and not yet reported
        over = False  # left because the lane's connections were cut below its open ones
        leave = False  # left to give its place to another worker (slots)
        try:
            while self.pending and not self.closing:
                wait = lane.connect_wait(time.monotonic())
                if wait > 0:
                    await self._pause(wait)
                    continue
                if not lane.usable(time.monotonic()):
                    break
                tried: list[Outcome] = []
                try:
                    conn = await self._open(lane, tried)
                except Exception as e:  # a local bug: answer like a failed connect
                    conn = _local_error(e, "connect")
                if isinstance(conn, Outcome):
                    unusable = bool(tried) and tried[-1] is conn and all(map(_unusable, tried))
                    now = time.monotonic()
                    if unusable:
                        self.unreached[ip] = now + DEAD_FOR
                    if self.nconn > 1:
                        # Others are open or opening: this one is over what the
                        # site takes. Leave the mail to them; open no more for now.
                        self.cap = max(1, self.sessions)
                        self.cap_until = now + CAP_FOR
                        self.count("connections_over_site_cap")
                        break
                    if (
                        self.handback is not None
                        and conn.stage in _REFUSED_SESSION
                        and 400 <= conn.code < 500
                        and _CONNECTIONS.search(conn.text) is not None
                    ):
                        # Refused for the connections open from this address, none of
                        # them ours: another worker's, node's or MTA's. The mail is not
                        # at fault: back unattempted, to a worker that holds one now,
                        # else in CONNS_WAIT (before, each group was deferred, a
                        # backoff each: 1,872 deferrals and 370 s for 4,000 messages
                        # from two workers at a receiver taking two connections).
                        batch = list(self.pending)
                        self.pending.clear()
                        self.count("connections_held_elsewhere")
                        why = f"handed back: connection refused: {conn.code} {conn.text}"
                        wait, self.conns_wait = self.conns_wait, min(BUSY_FOR, 2 * self.conns_wait)
                        self.handback(batch, wait, 0.0, why[:300], ELSEWHERE_WORKER)
                        break
                    if conn.stage in _REFUSED_SESSION and conn.code and not lane.usable(now):
                        # The refusal rested or suspended the address here (a
                        # block, a provider's rule): its mail goes back, not
                        # tried (_hold: handed back until the lane resumes);
                        # before, one group was deferred, an attempt counted.
                        break
                    other = False  # another source IP may still reach the site
                    if unusable:
                        if all(self.unreached.get(p.ip, 0.0) > now for p in self.pool.ips):
                            self._unreachable(conn, ip)
                            continue
                        other = True
                    failed = self._take()
                    if failed:
                        self.report(
                            [TxnResult(e.tag, [conn] * len(e.rcpts)) for e in failed],
                            ip,
                            conn.mx,
                        )
                    if other:
                        break  # the next connection picks its source IP again
                    continue
                mx = conn.mx
                if self.unreached:
                    self.unreached.pop(ip, None)
                counted: set[str] | None = (
                    set()
                    if self.reports_tls is not None and self.site.sts is None
                    and not self.site.dane and self.site.key.startswith("mx:")
                    and self.limits.tls != "off"
                    else None
                )  # fmt: skip
                progress = False  # this connection delivered something
                self.sessions += 1
                self.conns_wait = CONNS_WAIT
                if self.cap and self.sessions > self.cap:
                    self.cap = self.sessions  # (the site took that many at once)
                try:
                    while conn.usable:
                        if (
                            place >= 0
                            and self.slots is not None
                            and progress
                            and self.slots.others_waiting(self.slot_workers)
                        ):
                            # Another worker waits for one of the relay's
                            # connections: this one ends between transactions
                            # and leaves it its place.
                            leave = True
                            self.yield_until = time.monotonic() + SLOT_YIELD
                            break
                        if own < 0 and lane.places_at is not None:
                            got = lane.place(time.monotonic())
                            if got is None:
                                # A throttle made the address's connections places
                                # on the node after this one opened, and the other
                                # workers hold them all: it ends here.
                                leave = True
                                break
                            own = got
                        if own >= 0 and progress and not lane.keeps_place(own):
                            # Another worker sending from the address waits for
                            # one of its connections here (or a throttle cut
                            # them below this one's place): leave it the place.
                            leave = True
                            break
                        if lane.active > lane.max_connections:
                            # Its share of a relay's connections was cut (another
                            # node joined: wire.TransportShares): this one ends
                            # between transactions, the others carry the mail.
                            lane.active -= 1
                            over = True
                            break
                        if not self.pending:
                            if self.closing or lane.waiters:
                                break  # (other sites of its provider wait for the lane)
                            if own >= 0 and not lane.keeps_place(own):
                                break  # (not idle on a place another worker waits for)
                            self.wakeup.clear()
                            lane.wakers.add(self.wakeup)
                            try:
                                await asyncio.wait_for(
                                    self.wakeup.wait(), self.config.delivery.idle_timeout
                                )
                            except TimeoutError:
                                break
                            if not self.pending:
                                if lane.waiters:
                                    break
                                continue
                        want = min(group, len(self.pending), conn.remaining)
                        if not lane.free:
                            w = lane.warm
                            if w is not None and w.day != utc_day(time.time()):
                                # A session across UTC midnight: today's warm-up
                                # counter, not yesterday's (its mail went over
                                # the new day's cap by what yesterday had left)
                                self.lane(ip)
                            want, wait = lane.take(time.monotonic(), want)
                            if not want:
                                if wait >= TRIM_WAIT:
                                    self.trim()  # slowed down: keep only what goes soon
                                if wait >= FOREVER:
                                    break
                                await self._pause(wait)
                                if self.closing:
                                    break
                                continue
                        batch = self._take(want, group)
                        if not batch:
                            continue
                        if counted is not None:
                            self._no_policy_sessions(conn, batch, counted, ip)
                        start = time.monotonic()
                        if lane.aimd is not None:
                            lane.aimd.sent(start, len(batch))
                        self.sending += 1
                        self.groups[id(conn)] = (conn, batch, ip)
                        if self.on_group is not None:
                            self.on_group(self)
                        try:
                            results = await conn.send(batch)
                        finally:
                            self.sending -= 1
                            self.groups.pop(id(conn), None)
                        took = time.monotonic() - start
                        if conn.ended:
                            # The server ended the session under this group:
                            # what it never took nor refused goes out on the
                            # next session, if this one got anywhere.
                            # (or had answers: a session cut at its error cap
                            # after refused recipients got somewhere too)
                            if (progress or _any_answered(results)) and not _deferred_to_cap(
                                results
                            ):
                                results = self._put_back(results, batch)
                                if not results:
                                    batch = []
                                    break
                        elif not progress:
                            progress = conn.delivered_one > 0 or _any_delivered(results)
                        if conn.delivered_one != len(results):  # not all one-recipient deliveries
                            results = self._split_over_limit(results, batch)
                        if not lane.free or conn.delivered_one != len(results):
                            group = pipeline  # a rate to keep, or a reply to react to
                        elif took < GROUP_QUICK:
                            if len(batch) >= group < top:
                                group *= 2
                        elif took > 2 * GROUP_QUICK:
                            group = pipeline
                        if lane.aimd is not None or lane.rules:
                            results = lane.observe(results, time.monotonic(), conn.delivered_one)
                        batch = []
                        self.report(results, ip, mx)
                finally:
                    self.sessions -= 1
                    if not conn.ended:
                        # (at max_messages too: QUIT, as Postfix; an abort's RST
                        # reached a receiver counting connections after the next
                        # connection did: 421 "too many connections")
                        await conn.quit()
                    else:
                        conn.close()
                if not self.pending or over or leave or lane.waiters:
                    break  # (waiters: other sites' turn on the lane first, see finally)
        except Exception as e:
            # A local bug must not strand the mail this connection holds (nor
            # leave the worker unable to drain): defer it, loudly.
            import traceback

            traceback.print_exc()
            if batch:
                out = _local_error(e, "local")
                self.report([TxnResult(x.tag, [out] * len(x.rcpts)) for x in batch], ip, "")
        finally:
            if not over:
                lane.active -= 1
            if place >= 0 and self.slots is not None:
                self.slots.release(place)
            lane.release(own)
            self.nconn -= 1
            if lane.waiters:
                # Other sites of its provider wait for a connection of the lane:
                # theirs first, this site's after them (turns, not the busiest
                # site keeping the provider's connections until it has no mail).
                waiting, lane.waiters = lane.waiters, []
                if self.pending and not self.closing:
                    waiting.append(self._scale)
                loop = asyncio.get_running_loop()
                for retry in waiting:
                    loop.call_soon(retry)
            elif self.pending and not self.closing:
                self._scale()

    def _unreachable(self, conn: Outcome, ip: str) -> None:
        """No address of the site took a TCP connection (refused, timed out,
        unroutable) or greeted on it (closed, or silent for the greeting
        timeout), or its required TLS or AUTH failed (``_unusable``), from
        any of the pool's source IPs lately, and no other connection of it is
        open: every envelope
        waiting for it is answered with that failure now, and so is what is
        pushed for the next DEAD_FOR seconds (at most ``[retry] min_backoff``:
        none sooner than mail deferred now would come back). Before, each
        failed connection answered one group: a site whose MX dropped SYNs
        held the rest of its mail in the worker's window for a connect
        timeout per group (1,000 envelopes, 30 s: 8 minutes), and the
        window, filling with it, held back the mail of every other site."""
        waiting = list(self.pending)
        self.pending.clear()
        if waiting:
            self.report([TxnResult(e.tag, [conn] * len(e.rcpts)) for e in waiting], ip, conn.mx)
        hold = min(DEAD_FOR, self.config.retry.min_backoff)
        if hold > 0:
            self.dead_until = time.monotonic() + hold
            text = f"{conn.text} (site unreachable: delivery to it suspended for {hold:g} s)"
            self.dead = Outcome(DEFERRED, 0, conn.enhanced, text[:500], conn.stage, conn.mx)
        self.count("sites_unreachable")

    def _put_back(self, results: list[TxnResult], batch: list[Envelope]) -> list[TxnResult]:
        """Of a group whose session ended under it, put the envelopes the server
        neither took nor refused back at the front of the ready queue; returns
        the results of the others (to report)."""
        env_of = {id(e.tag): e for e in batch}  # results come in the order decided
        keep: list[TxnResult] = []
        back: list[Envelope] = []
        for tr in results:
            env = env_of.get(id(tr.tag))
            if env is not None and all(_unstarted(o) for o in tr.outcomes):
                back.append(env)
            else:
                keep.append(tr)
        if back:
            self.pending.extendleft(reversed(back))
            self.count("requeued_after_session_end", len(back))
        return keep

    def _split_over_limit(self, results: list[TxnResult], batch: list[Envelope]) -> list[TxnResult]:
        """Recipients a transaction's RCPTs were refused with 452 "too many
        recipients" (RFC 5321 4.5.3.1.10: the server's recipient limit) after
        others were taken go in a new transaction at the front of the ready
        queue, as Postfix sends them, not back as deferred; returns the
        results to report (those recipients left out)."""
        out: list[TxnResult] | None = None
        env_of: dict[int, Envelope] | None = None
        for n, tr in enumerate(results):
            split = self._split_one(tr, batch, env_of) if len(tr.outcomes) > 1 else None
            if split is None:
                if out is not None:
                    out.append(tr)
                continue
            if out is None:
                out = results[:n]
            env_of, kept = split
            if kept is not None:
                out.append(kept)
        if out is None:
            return results
        return out

    def _split_one(
        self, tr: TxnResult, batch: list[Envelope], env_of: dict[int, Envelope] | None
    ) -> tuple[dict[int, Envelope], TxnResult | None] | None:
        """_split_over_limit for one result: None when it has no recipient to
        send again, else (the batch's envelopes by tag, what to report: None
        for nothing, the whole transaction going again)."""
        outs = tr.outcomes
        tag = tr.tag
        if not isinstance(tag, list) or len(tag) != len(outs):
            return None
        over = [k for k, o in enumerate(outs) if _over_limit(o)]
        if not over:
            return None
        if env_of is None:
            env_of = {id(e.tag): e for e in batch}
        env = env_of.get(id(tag))
        again = [
            k
            for k, o in enumerate(outs)
            if o.stage == "data" and o.kind != DELIVERED and _TOO_MANY.search(o.text) is not None
        ]
        if again and env is not None and len(env.rcpts) == len(outs):
            # The server refused the surplus RCPTs and then the whole message
            # for them (Exim's recipients_max_reject: 552 each, then "554 Too
            # many recipients" to DATA; all bounced): those it took go again
            # alone, the surplus after them; the others' answers are final.
            self.pending.appendleft(_part(env, tag, over))
            self.pending.appendleft(_part(env, tag, again))
            self.count("recipients_over_limit", len(over))
            rest = [k for k in range(len(outs)) if k not in over and k not in again]
            if not rest:
                return env_of, None
            return env_of, TxnResult([tag[k] for k in rest], [outs[k] for k in rest], tr.queue_id, tr.dsn)
        if (
            env is None
            or len(env.rcpts) != len(outs)
            or not any(o.kind == DELIVERED for o in outs)  # (the limit is not per transaction)
        ):
            if all(outs[k].code == 452 for k in over):
                return None
            # A 552 for too many recipients is temporary (RFC 5321 4.5.3.1.10).
            outs = [
                Outcome(DEFERRED, o.code, o.enhanced, o.text, o.stage, o.mx)
                if k in over and o.code == 552
                else o
                for k, o in enumerate(outs)
            ]
            return env_of, TxnResult(tag, outs, tr.queue_id, tr.dsn)
        self.pending.appendleft(_part(env, tag, over))
        self.count("recipients_over_limit", len(over))
        keep = [k for k in range(len(outs)) if k not in over]
        return env_of, TxnResult([tag[k] for k in keep], [outs[k] for k in keep], tr.queue_id, tr.dsn)

    async def _pause(self, wait: float) -> None:
        """Sleep ``wait`` seconds (a shaping wait), or until close()."""
        if self.closing:
            return
        try:
            await asyncio.wait_for(self.closed.wait(), wait)
        except TimeoutError:
            pass

    async def close(self) -> None:
        self.closing = True
        self.closed.set()
        self.wakeup.set()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _unstarted(o: Outcome) -> bool:
    """The session ended before the server took or refused this recipient,
    and not to slow us down (see _PER_SESSION)."""
    return (
        o.kind == DEFERRED
        and o.stage in _UNSTARTED_STAGES
        and (o.code == 0 or (o.code == 421 and _PER_SESSION.search(o.text) is not None))
    )


def _unusable(o: Outcome) -> bool:
    """A failed connection that says the site cannot be used now: no TCP
    session or no greeting (no reply at all), a greeting that refuses for now
    (a 4xx: "421 try again later"; Postfix's "host refused to talk to me",
    its destination throttled), or TLS or AUTH failed. Before, a 4xx greeting
    answered one group a connection: 11 connections in a row for 500
    messages to a receiver that asked for none. A 4xx to EHLO or HELO is
    that greeting's refusal said one command later (Postfix's
    smtpd_delay_reject, an overloaded host's "421 try again later" to EHLO):
    before, it was not, and each group opened a connection again."""
    if o.stage in _REFUSED_SESSION and 400 <= o.code < 500:
        # (not a count of connections: those of another worker or node sending
        # from the address, which may close any moment)
        return _CONNECTIONS.search(o.text) is None
    return (o.stage in _NO_SESSION and not o.code) or o.stage in _NO_USE


def _part(env: Envelope, tag: list[Any], keys: list[int]) -> Envelope:
    """``env`` for its recipients at ``keys`` alone (their tags)."""
    return Envelope(
        env.mail_from,
        [env.rcpts[k] for k in keys],
        env.data,
        tag=[tag[k] for k in keys],
        smtputf8=env.smtputf8,
        eightbit=env.eightbit,
        dsn_mail=env.dsn_mail,
        dsn_rcpt=env.dsn_rcpt,
    )


_TOO_MANY = re.compile(r"too many recipients", re.IGNORECASE)


def _over_limit(o: Outcome) -> bool:
    """A RCPT refused because the transaction has too many recipients: 452,
    or the 552 of RFC 821 (RFC 5321 4.5.3.1.10: to be taken as temporary)."""
    return (
        (o.code == 452 or o.code == 552)
        and o.stage == "rcpt"
        and (o.enhanced in ("4.5.3", "5.5.3") or _TOO_MANY.search(o.text) is not None)
    )


def _any_delivered(results: list[TxnResult]) -> bool:
    return any(o.kind == DELIVERED for tr in results for o in tr.outcomes)


_ERROR_CAP = re.compile(r"\btoo many errors\b", re.IGNORECASE)


def _deferred_to_cap(results: list[TxnResult]) -> bool:
    """Whether the session was cut at its error cap (a 421 "too many errors")
    counted in temporary refusals: the receiver deferring us (Postfix's "450
    4.7.1 Error: too much mail from", greylisting) is not asked again at once
    on a new session; refusals for good (unknown users) are its cap's usual
    count."""
    cut = deferred = False
    for tr in results:
        for o in tr.outcomes:
            if o.code == 421:
                cut = cut or _ERROR_CAP.search(o.text) is not None
            elif o.kind == DEFERRED and 400 <= o.code < 500 and not _over_limit(o):
                deferred = True
    return cut and deferred


def _any_answered(results: list[TxnResult]) -> bool:
    """Whether the server decided any recipient of the group: delivered, or
    refused for good (its reply, not ours: a code)."""
    return any(
        o.kind == DELIVERED or (o.kind == FAILED and o.code != 0)
        for tr in results
        for o in tr.outcomes
    )


def _rotate(hosts: tuple[Host, ...], turn: int) -> tuple[Host, ...]:
    """``hosts`` (in preference order) with each run of equal preference
    rotated by ``turn``."""
    out: list[Host] = []
    i, n = 0, len(hosts)
    while i < n:
        j = i + 1
        while j < n and hosts[j].pref == hosts[i].pref:
            j += 1
        run = hosts[i:j]
        k = turn % len(run)
        out.extend(run[k:] + run[:k])
        i = j
    return tuple(out)


def _candidates(hosts: tuple[Host, ...]) -> list[Host]:
    """The addresses a new connection tries, in order (see MX_ADDRESSES)."""
    per = MX_PER_NAME if len({h.name for h in hosts}) > 1 else MX_ADDRESSES
    taken: dict[str, int] = {}
    out: list[Host] = []
    for h in hosts:
        k = taken.get(h.name, 0)
        if k < per:
            taken[h.name] = k + 1
            out.append(h)
            if len(out) >= MX_ADDRESSES:
                break
    return out


def _local_error(e: BaseException, stage: str) -> Outcome:
    return Outcome(DEFERRED, 451, "4.3.0", f"local error: {e.__class__.__name__}: {e}"[:400], stage)
