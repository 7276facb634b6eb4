"""A worker process: one uvloop event loop, its own source IPs, its own pools.

Forked by the supervisor (``fastsend.queue.supervisor``) with two rings: batches
come in on ``inbox``, outcomes go out on ``outbox``. For each batch it looks up
the destination site (static route or MX, cached by TTL), renders each
recipient's message from the campaign template (compiled once per campaign per
worker), and puts the envelopes on that site's ready queue, whose pipelined
connections deliver them from this worker's source IPs only.

Outcomes are collected and flushed to the outbox as one record every few
milliseconds (or every ``FLUSH_AT`` outcomes), not one record per message.

It never opens the spool and never decides retries. It exits when the
supervisor sends Drain (after finishing its work), on SIGTERM (at once), or when
its parent disappears (kill -9 of the supervisor).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import os
import signal
import sys
import time
from typing import Any

import msgspec
import orjson

from fastsend import msgid, ring, wire
from fastsend._accel import pick
from fastsend.bounce.reply import classify_reply
from fastsend.config import Config
from fastsend.delivery import ehlo, mx, routes
from fastsend.delivery.mx import MXResolver, Site
from fastsend.delivery.pool import DRAIN_HORIZON, SiteQueue
from fastsend.delivery.routes import Router
from fastsend.delivery.signing import ConfigDKIM, identity_domains
from fastsend.faults import countdown
from fastsend.message import Campaign, CampaignError, MessageTooBig, RenderError
from fastsend.message.errors import KeyUnavailable
from fastsend.message.headers import HeaderError
from fastsend.message.rawmime import utf8_header
from fastsend.outcome import DELIVERED, FAILED, Envelope, Outcome, TxnResult, dsn_params
from fastsend.procs import _prctl, _py_set_pdeathsig, die_with_parent, set_pdeathsig
from fastsend.ring import Ring, WriteLog
from fastsend.shaping.lanes import Shaper
from fastsend.smtp import transport
from fastsend.transports.slots import Slots

FLUSH_AT = 512
SITES_MIN = 1024  # site queues held before idle ones are forgotten (then 2x the live ones)
TRANSACTIONAL = "transactional"  # campaign kind whose messages carry their own content
_DSN_MAIL = ("RET", "ENVID")  # the DSN parameters relayed with MAIL and with each RCPT
_DSN_RCPT = ("NOTIFY", "ORCPT")
FLUSH_DELAY = 0.002
# CPU seconds of building (rendering, signing) one inbox read may take before the
# loop runs again (the rest of the inbox read in the next iteration): a window
# of rsa-sha256 mail is signed as its batches are built (~0.26 ms a message at
# 2048 bits, ~2 ms at 4096), and a read of a whole window (6,144 messages with
# two source IPs, 4x that with eight) held the loop for seconds: no reply read,
# no message sent, no Stats for the supervisor, which kills a worker silent
# for WORKER_SILENCE (30 s).
READ_SLICE = 0.05
# Messages built after which the worker's first wire.Stats goes at once (the
# supervisor sizes its claims by the cost of building: Dispatch.claim_at).
COST_TOLD = 100
GC_YOUNG = 50_000  # gen0 threshold of a worker process (see run_worker)
# The loop's nap (smtp.transport.Napper) after an iteration that read a
# reply, while NAP_LINKS connections have a group in flight: one wake-up reads
# the replies of many connections (a 100k send to smtp-sink: ~0.77 -> ~0.16
# context switches per message, workers' CPU -15% on a quiet host). Off
# (0.0) by default since 2026-12-05: the nap sleeps the loop even when it has
# work, and on a 2-core host where the CPU is the throughput the lead's runs
# saw the rate drop with it (rsa-2048 DKIM sends 10-14% slower in 2 of 2
# adjacent pairs; whole 100k sends slower in 3 of 3 pairs and in 8 of 12
# simultaneous pairs): it saves CPU but costs rate until it naps only after
# short iterations. 0.0003 turns it on.
NAP_S = 0.0
NAP_LINKS = 8
CLASSIFY_CACHE = 4096  # (code, enhanced, stage, text) -> (reason, hard) kept per worker
_KIND = {DELIVERED: wire.K_DELIVERED, FAILED: wire.K_FAILED}
WITHDRAWN = "withdrawn after its claim: its address suppressed, or its campaign paused or cancelled"
RETIRED = "handed back by a worker a reload replaced: the new worker sends it"
STOPPED = "stopped now before its message was written: never sent"
STOPPED_EXIT = 128 + wire.STOP_NOW  # stop_now's status: as if the signal had ended it
# s a stop now waits for the replies to what is past its end of data (the
# supervisor's stop waits 2 s for its workers, then SIGKILL): each one still
# unanswered then counts an attempt of unknown outcome, sent again
STOP_GRACE = 1.0
# While a pipelined group is on the wire, every ANSWERED_EVERY seconds its
# deliveries read so far are told to the supervisor (wire.Answered): a group
# takes up to a few seconds at a slow receiver, and a worker killed meanwhile
# had each message the receiver took sent again (kill -9 of a worker of a
# 12,000-message send to a sink answering each command after 2 ms: 833 of its
# 1,280 duplicates taken by the sink up to 1.5 s before the kill).
ANSWERED_EVERY = 0.1


def _smarthost(mx: str) -> tuple[str, str]:
    """(host, port) of an outcome's mx: "HOST[ADDRESS]:PORT", or "ADDRESS:PORT"
    ("[ADDRESS]:PORT" for IPv6) for a host that is an address."""
    host, sep, _ = mx.partition("[")
    if not sep or not host:
        host = mx.rpartition(":")[0].strip("[]")
    return host.lower(), mx.rpartition(":")[2]


class Worker:
    def __init__(
        self, index: int, config: Config, ips: list[str], inbox: Ring, outbox: Ring
    ) -> None:
        self.index = index
        self.config = config
        self.ips = ips
        self.inbox = inbox
        self.outbox = outbox
        # The EHLO name per source IP (fastsend.delivery.ehlo, chosen before the fork).
        names = ehlo.names_for(config)
        self.helo = names.default
        self.campaign_specs: dict[int, dict[str, Any]] = {}
        # (pool, site key) -> (cap, until): a reload's retiring worker's site caps
        # for queues not made yet (inherit_caps)
        self.caps_inherited: dict[tuple[str, str], tuple[int, float]] = {}
        self.renderers: dict[int, Any] = {}
        self.shared: dict[int, bool] = {}  # campaign -> may share one multi-rcpt message
        # campaign -> what its deferred batches are built with, when that is one
        # compiled call (see direct()); None when it is not
        self.directs: dict[int, tuple[Any, ...] | None] = {}
        self.unowned: dict[int, str | None] = {}  # campaign -> why it may not go (not_owned)
        self.sites: dict[tuple[str, str], SiteQueue] = {}
        self.sites_limit = SITES_MIN
        self.shaper = Shaper(config, ips, index=index)
        self.shaper.places = Slots  # (a lane's connections below the workers sharing its address)
        for ip in ips:
            if ip:
                self.shaper.ehlo[ip] = names.name(ip)
        self.campaign_pools: dict[int, str] = {}
        self.warm_sent: dict[str, int] = {}
        self.out: list[wire.Res | wire.Sent] = []
        self.out_n = 0  # messages in out (a wire.Sent holds several)
        self.flush_handle: asyncio.TimerHandle | None = None
        # tell_answered: its timer (armed while groups are on the wire) and, per
        # connection, the group's result list last looked at and how many of it
        # were looked at
        self.answered_timer: asyncio.TimerHandle | None = None
        self.answered_seen: dict[int, tuple[list[TxnResult], int]] = {}
        self.answered_told = False
        self.group_queues: set[SiteQueue] = set()  # those with groups on the wire, maybe
        self.pending_out: list[bytes] = []
        self.draining = False
        self.stop_task: asyncio.Task[None] | None = None  # stop_now's wait for the replies
        self.retiring = False  # wire.Retire: a reload's new worker sends in our place
        self.conns_told: list[tuple[str, str, int]] | None = None  # last wire.Conns sent
        self.lanes_told: dict[tuple[str, str], tuple[float, float]] = {}  # report_lanes
        self.lanes_busy: list[tuple[str, str]] = []  # (ip, site) with a connection at Retire
        self.providers_told: dict[str, tuple[float, float, int, float]] = {}  # report_lanes
        self.caps_told: set[tuple[str, str, int, float]] = set()  # report_lanes
        self.marks_told: dict[tuple[str, str], Any] = {}  # report_lanes
        # (pool, site key) -> the marks of a site whose queue is not made yet
        self.marks_inherited: dict[tuple[str, str], wire.SiteMarks] = {}
        self.busy = 0  # batches being resolved/rendered
        self.built = 0  # messages built by the inbox read under way (on_inbox)
        self.cost_told = False  # a wire.Stats went once COST_TOLD messages were built
        # Envelopes placed during one read of the inbox, per site queue, pushed
        # together at its end (place_batch, push_placed).
        self.placed: dict[SiteQueue, list[Envelope]] = {}
        # Batches waiting for their site (a DNS lookup, a route's queue), by
        # id(): what wire.Withdraw takes out of them before they are placed.
        self.resolving: dict[int, wire.Batch] = {}
        self.done = asyncio.Event()
        self.parent = os.getppid()
        self.resolver = MXResolver(config)
        self.dkim = ConfigDKIM(config)  # the config's [dkim], for self-contained messages
        self.router = Router(self)  # routes of transports, failover (fastsend.transports)
        # The hosts of static routes (HOST:PORT, a smarthost), as an outcome's mx
        # begins and ends: a relay's refusal of us from one is no recipient's.
        self.smarthosts = frozenset(
            (r.host.lower(), str(r.port)) for r in config.routes.values() if r.host
        )
        # Cumulative counters, shipped to the supervisor by stats_loop().
        self.counters: dict[str, float] = {}
        self.classified: dict[tuple[int, str, str, str], tuple[str, bool]] = {}

    # -- inbox ---------------------------------------------------------------

    def on_inbox(self) -> None:
        self.inbox.clear_reader()
        self.busy += 1  # until what was placed is on its site queues
        more = False
        start = time.process_time()
        self.built = 0
        try:
            more = self._read_inbox(start)
        finally:
            self.push_placed()
            if self.built:
                # What building costs a message (signing it, mostly): the
                # supervisor sizes its claims for this worker by it
                # (Dispatch.claim_at), so the workers' windows end together.
                c = self.counters
                c["build_cpu_seconds"] = c.get("build_cpu_seconds", 0.0) + (
                    time.process_time() - start
                )
                c["messages_built"] = c.get("messages_built", 0.0) + self.built
                if not self.cost_told and c["messages_built"] >= COST_TOLD:
                    # at once, not at the next stats_loop second: a signed
                    # send's first claims are sized by it
                    self.cost_told = True
                    self.send_stats()
            if more:  # the rest of the inbox in the loop's next iteration (still busy)
                asyncio.get_running_loop().call_soon(self._read_more)
            else:
                self.busy -= 1
            self.check_done()

    def _read_more(self) -> None:
        self.busy -= 1  # (on_inbox raises it again)
        self.on_inbox()

    def forget(self, campaigns: list[int]) -> None:
        """wire.Forget: what was kept per campaign, for campaigns the supervisor
        has had nothing of in this window for a while (a long-running serve made
        thousands: each one's spec and compiled template were kept for good)."""
        for c in campaigns:
            for d in (self.campaign_specs, self.renderers, self.shared, self.directs,
                      self.unowned, self.campaign_pools, self.router.campaigns):  # fmt: skip
                d.pop(c, None)

    def _read_inbox(self, start: float | None = None) -> bool:
        """Read and place what the inbox holds; True when it stopped after
        READ_SLICE s of building (CPU time: a preempted process is not cut
        short) with records left (then read on in the loop's next iteration,
        after its I/O and timers). ``start``: the process's CPU time when the
        read began (on_inbox's).

        The CPU clock is a system call (~4 us on a VM: ~0.4 us per message
        when read after each batch of ~10), the wall clock is not: a thread's
        CPU time never runs ahead of the wall clock, so the CPU clock is read
        only once READ_SLICE s of wall time have passed."""
        get = self.inbox.get
        decode = wire.to_worker_decoder.decode
        placed = self.placed
        clock = time.process_time
        wall = time.monotonic
        until = (clock() if start is None else start) + READ_SLICE
        wall_until = wall() + READ_SLICE
        while (rec := get()) is not None:
            msg = decode(rec)
            if isinstance(msg, wire.Batch):
                # Routes of transports choose per batch (fastsend.delivery.routes).
                site = None if self.router.has_routes else self.resolver.cached(msg.domain)
                self.busy += 1
                if site is None:  # a DNS lookup first: its own task
                    asyncio.get_running_loop().create_task(self.handle_batch(msg))
                else:  # the common case: placed now, no task per batch
                    self.place_batch(msg, site, placed)
                    self.built += len(msg.items)
                    if wall() >= wall_until and clock() >= until:
                        return True
                continue
            if placed:  # what came before a control record is on its queue first
                self.push_placed()
            if isinstance(msg, wire.CampaignSpec):
                self.campaign_specs[msg.id] = msg.spec
                self.renderers.pop(msg.id, None)
                self.directs.pop(msg.id, None)
                self.unowned.pop(msg.id, None)
            elif isinstance(msg, wire.CampaignInfo):
                self.router.on_campaign(msg)
                self.unowned.pop(msg.id, None)
            elif isinstance(msg, wire.Forget):
                self.forget(msg.campaigns)
            elif isinstance(msg, wire.CampaignShaping):
                self.campaign_pools[msg.campaign] = msg.pool
            elif isinstance(msg, wire.WarmupCounts):
                self.shaper.restore(msg.counts)
            elif isinstance(msg, wire.IPRest):
                self.shaper.rest_ip(msg.ip, msg.providers, msg.until, msg.reason, msg.key,
                                    msg.recheck)  # fmt: skip
            elif isinstance(msg, wire.IPLift):
                self.shaper.lift_ip(msg.ip, msg.key)
            elif isinstance(msg, wire.WarmupAdjust):
                self.shaper.adjust_warmup(msg.offsets)
            elif isinstance(msg, wire.Withdraw):
                self.withdraw(msg.ids)
            elif isinstance(msg, wire.TransportShares):
                self.router.set_conns(msg.conns, msg.nodes)
            elif isinstance(msg, wire.Drain):
                self.draining = True
                for q in self.sites.values():  # what cannot go soon goes back now
                    q.horizon = DRAIN_HORIZON
                    q.trim()
                self.check_done()
            elif isinstance(msg, wire.Retire):
                self.retire()
            elif isinstance(msg, wire.Lanes):
                self.shaper.inherit(msg.lanes)
                if msg.providers:
                    self.router.inherit(msg.providers)
                if msg.sites:
                    self.inherit_caps(msg.sites)
                if msg.marks:
                    self.inherit_marks(msg.marks)
            elif isinstance(msg, wire.Conns):
                self.shaper.lend(msg.held)
                for (_pool, key), q in list(self.sites.items()):  # freed: its mail may go now
                    if isinstance(q, SiteQueue):
                        if q.pending:
                            q._scale()
                    elif hasattr(q, "borrowed"):  # a provider's (transports.http)
                        q.borrowed = self.shaper.borrowed.get(("", key), 0)
                        if q.pending and q.ready:
                            q.pump()
        return False

    def renderer(self, campaign_id: int) -> Any:
        r = self.renderers.get(campaign_id)
        if r is None:
            spec = self.campaign_specs[campaign_id]
            camp = Campaign.from_dict(spec)
            r = self.renderers[campaign_id] = camp.compile(
                self.config.msgid_tag, self.config.delivery.max_message_size
            )
            # Only truly identical bytes share a transaction: no placeholder, no
            # signed link, no VERP (see Campaign.identical).
            self.shared[campaign_id] = camp.identical and r.tracker is None and not r.verp_domain
        return r

    async def handle_batch(self, batch: wire.Batch) -> None:
        site: Site | Outcome | Exception
        self.resolving[id(batch)] = batch
        try:
            try:
                chain = self.router.chain(batch)
                if chain:  # a route of transports: relay, provider, failover
                    await self.route_batch(batch, chain)
                    return
                site = await self.resolver.site_for(batch.domain)
            except Exception as e:  # answered in place_batch, like any local error
                site = e
        finally:
            self.resolving.pop(id(batch), None)
        if not batch.items:  # every message was withdrawn while it waited
            self.busy -= 1
            self.check_done()
            return
        self.place_batch(batch, site)

    async def route_batch(self, batch: wire.Batch, chain: tuple[str, ...]) -> None:
        try:
            await self.router.dispatch(batch, chain, self.resolving)
        except Exception as e:  # a bug must not lose the batch: defer it, loudly
            self.defer_local(e, [(it.id, 1) for it in batch.items])
        finally:
            self.busy -= 1
            self.check_done()

    def place_batch(
        self,
        batch: wire.Batch,
        site: Site | Outcome | Exception,
        placed: dict[SiteQueue, list[Envelope]] | None = None,
    ) -> None:
        """Render a batch and put it on its site's ready queue (or answer it with
        the site's failure). ``busy`` was raised for it; this lowers it.

        With ``placed`` (:attr:`placed`, from :meth:`on_inbox`), the envelopes
        wait there and go onto their queue with the other batches for the same
        queue read in the same wake-up (:meth:`push_placed`): one push, one
        trim and one connection check per site queue, not per batch (the
        supervisor sends a batch per recipient domain, so a claim arrives as
        many small batches for the same MX or route)."""
        try:
            if isinstance(site, Exception):
                raise site
            if isinstance(site, Outcome):
                self.add_results(
                    [TxnResult(it.id, [site]) for it in batch.items], "", site.mx or ""
                )
                return
            if (site.sts is not None or site.dane) and self.campaign_specs.get(
                batch.campaign, {}
            ).get(REPORT_MAIL):
                site = _without_policy(site)
            envelopes = self.build(batch, deferred=True)
            if envelopes:
                q = self.site_queue(site, batch)
                if placed is None:
                    q.push(envelopes)
                elif (waiting := placed.get(q)) is None:
                    placed[q] = envelopes
                else:
                    waiting += envelopes
        except Exception as e:  # a bug must not lose the batch: defer it, loudly
            self.defer_local(e, [(it.id, 1) for it in batch.items])
        finally:
            self.busy -= 1
            self.check_done()

    def direct(self, campaign_id: int) -> tuple[Any, ...] | None:
        """What :meth:`build_each` calls for a deferred batch of the campaign
        when that is the one compiled call (``Assembly.envelopes``: one message
        per recipient on the direct path, one sender), found once per campaign
        rather than per batch: ``(envelopes, fallback, sender, sender_utf8,
        needs_smtputf8, date)``, ``date()`` the batch's Date line. None when
        the campaign's batches take the other paths."""
        try:
            return self.directs[campaign_id]
        except KeyError:
            pass
        d: tuple[Any, ...] | None = None
        if self.campaign_specs[campaign_id].get("kind") != TRANSACTIONAL:
            r = self.renderer(campaign_id)
            if not self.shared[campaign_id] and r.for_batch(True):
                d = _direct_args(r)
        self.directs[campaign_id] = d
        return d

    def not_owned(self, campaign_id: int) -> str | None:
        """Why a template campaign may not go out now: it cannot be built (its
        own headers cannot be written), or it is a tenant's whose From domain
        is no longer the tenant's (the operator gave it to another tenant after
        the campaign was accepted; a reload respawns workers with the new
        [tenants]). None: it may. Self-contained messages are judged one by one
        (:meth:`build_transactional`); mail with no tenant (``send`` without
        ``--tenant``) is the operator's own."""
        try:
            return self.unowned[campaign_id]
        except KeyError:
            pass
        spec = self.campaign_specs[campaign_id]
        tenants = self.dkim.tenants
        why = None
        info = self.router.campaigns.get(campaign_id)  # (id, names, tenant): CampaignInfo
        tenant = info[2] if info is not None else ""
        if tenant and tenants.configured and spec.get("kind") != TRANSACTIONAL:
            domain = str(spec.get("from", "")).rpartition("@")[2].strip("> ")
            if domain and not tenants.allows(tenant, domain):
                why = f"From domain {domain} is not the tenant's"
        if why is None and spec.get("kind") != TRANSACTIONAL:
            # A campaign whose own headers can never be written (a header name
            # over the line limit, spooled before accept checked it) fails its
            # mail now; it was deferred as a local error every attempt until
            # it expired. A key that cannot be loaded stays a local error (the
            # operator can put it back).
            try:
                self.renderer(campaign_id)
            except KeyUnavailable:
                raise  # the operator's to put back: deferred (build), never failed
            except (CampaignError, HeaderError) as e:
                why = f"the campaign cannot be built: {e}"
        self.unowned[campaign_id] = why
        return why

    def build(self, batch: wire.Batch, deferred: bool = False) -> list[Envelope]:
        """The batch's envelopes (a failed render answered at once). With
        ``deferred`` (the SMTP client's site queues), a personalised message
        on the direct path is a DeferredMessage (see :meth:`build_each`)."""
        secret = self.config.secret
        try:
            why = self.not_owned(batch.campaign)
        except KeyUnavailable as e:
            self.add_results([TxnResult(it.id, [_key_unavailable(e)]) for it in batch.items], "", "")
            return []
        if why is not None:
            self.add_results(
                [TxnResult(it.id, [Outcome(FAILED, 550, "5.6.0", f"message: {why}", "local")])
                 for it in batch.items], "", "",
            )  # fmt: skip
            return []
        if deferred and (d := self.direct(batch.campaign)) is not None:
            # The usual case: build_each's compiled call, nothing looked up per batch.
            return _build_direct(d, batch, secret)
        if self.campaign_specs[batch.campaign].get("kind") == TRANSACTIONAL:
            return self.build_transactional(batch)
        r = self.renderer(batch.campaign)
        if not self.shared[batch.campaign]:
            return self.build_each(batch, r, deferred)
        # Truly identical messages: one transaction carries up to per_txn RCPTs.
        envelopes: list[Envelope] = []
        failures: list[TxnResult] = []
        group: Envelope | None = None
        per_txn = self.config.delivery.recipients_per_transaction
        for it in batch.items:
            try:
                if group is not None and len(group.rcpts) < per_txn:
                    # The same bytes, headers naming no one: one more RCPT.
                    group.rcpts.append(it.rcpt)
                    assert isinstance(group.tag, list)
                    group.tag.append(it.id)
                    if not group.smtputf8 and r.needs_smtputf8(it.rcpt):
                        group.smtputf8 = True
                    continue
                mid = msgid.token(it.id, secret)
                # The group's Message-ID: its first message's, marked shared.
                data = r.render_shared(msgid.group_token(it.id, secret))
                env = Envelope(
                    r.envelope_from(mid),
                    [it.rcpt],
                    data,
                    tag=[it.id],
                    smtputf8=r.needs_smtputf8(it.rcpt),
                )
            except RenderError as e:
                failures.append(TxnResult(it.id, [_render_failure(e)]))
                continue
            envelopes.append(env)
            group = env
        if failures:
            self.add_results(failures, "", "")
        return envelopes

    def build_each(self, batch: wire.Batch, r: Any, deferred: bool = False) -> list[Envelope]:
        """One message per recipient (the usual, personalised case): the loop
        of :meth:`build` with nothing looked up per message. Without tracked
        links or DKIM the compiled assembly is called directly (one call per
        message, Renderer.for_batch; deferred, with one Ed25519 signature too:
        the message is signed as it is made); with no VERP the sender is the same for
        every message, and an ASCII recipient needs SMTPUTF8 only when the
        sender does (Renderer.needs_smtputf8).

        With ``deferred``, that direct path makes no message here: each
        envelope's data is a DeferredMessage, which the SMTP client calls as
        the message's transaction starts (a worker holds thousands of
        envelopes in its ready queues and connections; made just before it
        is written, a message is still in cache when it is dot-stuffed and
        copied to the socket). One that cannot be made is answered by the
        client with what :func:`_render_failure` says (550 5.6.0 render: ...).
        That deferred loop is one compiled call (``Assembly.envelopes``; with
        VERP it makes each message's sender too, ``envelope_from``)."""
        secret = self.config.secret
        token = msgid.token
        render = r.render
        fast = r.for_batch(deferred)
        personal, date = fast if fast is not None else (None, b"")
        envelope_from = r.envelope_from
        sender = None if r.verp_domain else r.return_path
        sender_utf8 = r.sender_utf8
        needs_smtputf8 = r.needs_smtputf8
        by_values = r.address_variables  # a Reply-To/To from variables: per message
        loads = orjson.loads
        guard = r.guard
        blobs = batch.blobs  # vars stored once for many rows (wire.blob_ref)
        if deferred and personal is not None:
            # The usual case: one compiled loop (with VERP each message's sender
            # made there too, envelope_from), nothing in it can fail one
            # message alone.
            return _build_direct(_direct_args(r), batch, secret)
        envelopes: list[Envelope] = []
        append = envelopes.append
        failures: list[TxnResult] = []
        for it in batch.items:
            rcpt = it.rcpt
            try:
                mid = token(it.id, secret)
                vs = it.vars
                if blobs and (d := wire.blob_digest(vs)):
                    vs = blobs[d]
                values = loads(vs) if vs else {}
                if personal is None or len(vs) > guard:  # (over guard: render measures it)
                    data = render(rcpt, values, mid)
                else:
                    try:
                        data = personal(values, rcpt, mid, date, False)
                    except Exception:  # render() says why, as a RenderError
                        data = render(rcpt, values, mid)
                append(
                    Envelope(
                        sender or envelope_from(mid),
                        [rcpt],
                        data,
                        it.id,
                        sender_utf8
                        or ((not rcpt.isascii() or by_values) and needs_smtputf8(rcpt, values)),
                    )
                )
            except RenderError as e:
                failures.append(TxnResult(it.id, [_render_failure(e)]))
        if failures:
            self.add_results(failures, "", "")
        return envelopes

    def build_transactional(self, batch: wire.Batch) -> list[Envelope]:
        """Messages that carry their own content (the HTTP API, SMTP submission).

        Each item's vars is a message spec: either ``{"raw": base64 MIME,
        "mail_from": ...}`` (relayed as is, after DKIM signing if configured),
        or campaign-style fields (from, subject, text, html, headers, ...) whose
        text is taken literally (no ``{{ }}`` templating), rendered here.
        """
        envelopes: list[Envelope] = []
        failures: list[TxnResult] = []
        secret = self.config.secret
        cspec = self.campaign_specs[batch.campaign]
        defaults = cspec.get("defaults", {})
        tenant = cspec.get("tenant")  # set by fastsend.serve.context; None in older spools
        tenants = self.dkim.tenants
        # A body stored once for many rows (wire.blob_ref) is decoded, checked and
        # signed (raw) or compiled (fields) once per batch, not once per recipient.
        # A raw body is the same bytes for each of its recipients: they share SMTP
        # transactions (up to recipients_per_transaction RCPTs, as identical
        # campaign mail does), each recipient keeping its own outcome.
        raws: dict[str, tuple[bytes, str, bool, bytes, bytes]] = {}
        groups: dict[tuple[str, bool], Envelope] = {}
        per_txn = self.config.delivery.recipients_per_transaction
        compiled: dict[str, Any] = {}

        def share(
            blob: str, data: bytes, mail_from: str, eightbit: bool, dm: bytes, dr: bytes,
            it: wire.Item,
        ) -> None:
            smtputf8 = not it.rcpt.isascii() or not mail_from.isascii()
            smtputf8 = smtputf8 or (eightbit and utf8_header(data))  # RFC 6532 header text
            group = groups.get((blob, smtputf8))
            if group is not None and len(group.rcpts) < per_txn:
                group.rcpts.append(it.rcpt)
                assert isinstance(group.tag, list)
                group.tag.append(it.id)
                return
            groups[(blob, smtputf8)] = env = Envelope(
                mail_from, [it.rcpt], data, tag=[it.id], smtputf8=smtputf8, eightbit=eightbit,
                dsn_mail=dm, dsn_rcpt=dr,
            )  # fmt: skip
            envelopes.append(env)

        for it in batch.items:
            mid = msgid.token(it.id, secret)
            eightbit = False
            dm = dr = b""
            try:
                blob = wire.blob_digest(it.vars) if batch.blobs else None
                if blob in raws:
                    share(blob, *raws[blob], it)  # type: ignore[arg-type]
                    continue
                r = compiled.get(blob) if blob else None
                msg = {} if r is not None else orjson.loads(batch.blobs[blob] if blob else it.vars)
                if "raw" in msg:
                    raw = base64.b64decode(msg["raw"])
                    mail_from = msg.get("mail_from", "")
                    # DSN parameters it was submitted with (serve's listener), checked
                    dm = dsn_params(msg.get("dsn_mail"), _DSN_MAIL)
                    dr = dsn_params(msg.get("dsn_rcpt"), _DSN_RCPT)
                    if tenants.configured:  # accepted before a config change took a domain away
                        # Read as sent (a bare CR ends a line), Sender and Resent-* too.
                        seen = identity_domains(raw)[1]
                        for name, d in [*seen, ("envelope from", mail_from.rpartition("@")[2])]:
                            if d and not tenants.allows(tenant or "", d):
                                raise ValueError(f"{name.capitalize()} domain {d} is not the"
                                                 " tenant's")  # fmt: skip
                    # Shared by a blob's recipients: a Message-ID naming none of them.
                    data, eightbit = self.dkim.prepare_raw(
                        raw, tenant, mid + msgid.GROUP_SUFFIX if blob else mid
                    )
                    limit = self.config.delivery.max_message_size
                    if limit and len(data) > limit:  # (re-encoded, signed: as sent)
                        raise MessageTooBig(
                            f"the message is {len(data):,} octets, over the {limit:,}-octet"
                            " limit"
                        )
                    if blob:
                        raws[blob] = (data, mail_from, eightbit, dm, dr)
                        share(blob, data, mail_from, eightbit, dm, dr, it)
                        continue
                    smtputf8 = not it.rcpt.isascii() or not mail_from.isascii()
                    smtputf8 = smtputf8 or (eightbit and utf8_header(data))  # (RFC 6532)
                else:
                    if r is None:
                        spec = {**defaults, **{k: _literal(v) for k, v in msg.items()}}
                        from_domain = str(spec.get("from", "")).rpartition("@")[2].strip("> ")
                        if tenants.configured and not tenants.allows(tenant or "", from_domain):
                            raise ValueError(f"From domain {from_domain} is not the tenant's")
                        if "dkim" not in spec and self.dkim.entries:
                            spec["dkim"] = self.dkim.for_domain(from_domain, tenant)
                        r = Campaign.from_dict(spec).compile(
                            self.config.msgid_tag, self.config.delivery.max_message_size
                        )
                        if blob:
                            compiled[blob] = r
                    data = r.render(it.rcpt, {}, mid)
                    mail_from = r.envelope_from(mid)
                    smtputf8 = r.needs_smtputf8(it.rcpt)
            except KeyUnavailable as e:
                failures.append(TxnResult(it.id, [_key_unavailable(e)]))
                continue
            except MessageTooBig as e:
                failures.append(
                    TxnResult(it.id, [Outcome(FAILED, 552, "5.3.4", f"message: {e}", "local")])
                )
                continue
            except (RenderError, CampaignError, ValueError, KeyError, TypeError) as e:
                failures.append(
                    TxnResult(it.id, [Outcome(FAILED, 550, "5.6.0", f"message: {e}", "local")])
                )
                continue
            env = Envelope(
                mail_from, [it.rcpt], data, tag=it.id, smtputf8=smtputf8, eightbit=eightbit,
                dsn_mail=dm, dsn_rcpt=dr,
            )  # fmt: skip
            envelopes.append(env)
        if failures:
            self.add_results(failures, "", "")
        return envelopes

    def site_queue(self, site: Site, batch: wire.Batch, **relay: Any) -> SiteQueue:
        pool = self.campaign_pools.get(batch.campaign, "")
        # (a domain with a [shaping.domain] entry: a queue of its own)
        key = self.shaper.domain_entry(site.key, batch.domain)
        q = self.sites.get((pool, key))
        if q is None:
            if len(self.sites) >= self.sites_limit:
                self.prune()
            q = self.sites[(pool, key)] = SiteQueue(
                site,
                self.ips,
                self.config,
                self.report,
                self.helo,
                self.count,
                shaper=self.shaper,
                pool=pool,
                domain=batch.domain,
                handback=self.handback,
                sts_report=self.resolver.sts.report if self.resolver.sts is not None else None,
                reports_tls=self.resolver.reports_tls if self.resolver.count_no_policy else None,
                **relay,
            )
            q.on_group = self.watch_groups
            if self.draining:
                q.horizon = DRAIN_HORIZON
            if self.caps_inherited:
                got = self.caps_inherited.pop((pool, key), None)
                if got is not None:
                    q.inherit_cap(*got)
            if self.marks_inherited:
                marked = self.marks_inherited.pop((pool, key), None)
                if marked is not None:
                    q.inherit_marks(marked)
        elif q.site is not site:
            q.site = site  # refreshed DNS answer
        return q

    def push_placed(self) -> None:
        """Put the envelopes :meth:`place_batch` left in :attr:`placed` on their
        site queues."""
        placed = self.placed
        while placed:
            q, envelopes = placed.popitem()
            try:
                q.push(envelopes)
            except Exception as e:  # as in place_batch: defer, loudly
                self.defer_local(e, [(x.tag, len(x.rcpts)) for x in envelopes])

    def defer_local(self, e: Exception, tags: list[tuple[Any, int]]) -> None:
        """A local bug must not lose mail: print it, and answer each (tag,
        number of recipients) deferred (451 4.3.0 local error)."""
        import traceback

        traceback.print_exc()
        out = Outcome("deferred", 451, "4.3.0", f"local error: {e.__class__.__name__}", "local")
        self.add_results([TxnResult(tag, [out] * n) for tag, n in tags], "", "")

    def prune(self) -> None:
        """Forget idle site queues and the lanes no one needs any more: memory must
        not grow with the number of destinations a long run has seen. Amortised:
        the next prune waits until the count has doubled."""
        self.push_placed()  # a queue with envelopes still to push is not idle
        for key, q in list(self.sites.items()):
            if not (q.pending or q.nconn or q.sending):
                del self.sites[key]
        # (an HTTP transport's ProviderQueue has no lanes: getattr)
        keep = {getattr(q, "lanes_key", "") for q in self.sites.values()}
        self.shaper.prune(time.monotonic(), keep - {""})
        self.sites_limit = max(SITES_MIN, 2 * len(self.sites))

    # -- outbox --------------------------------------------------------------

    def report(self, results: list[TxnResult], source_ip: str, mx: str) -> None:
        if mx[:6] == "relay:" or (self.smarthosts and _smarthost(mx) in self.smarthosts):
            if not self.router.failover and results:
                # The group's leading deliveries (all of it, as a rule) go out
                # as add_results would send them, in one compiled pass: only
                # what follows is looked at for refusals (not a 2nd pass).
                i = collect_delivered(results, 0, self.out, source_ip, mx)
                if i:
                    self.out_n += i
                    results = results[i:]
            if results:
                results = self.router.relay_refusals(results, mx)  # (us refused, not a recipient)
        if self.router.failover:
            results = self.router.on_results(results, source_ip, mx)
        self.add_results(results, source_ip, mx)
        self.check_done()

    def withdraw(self, ids: list[int]) -> None:
        """wire.Withdraw: hand back, unsent, the envelopes of ``ids`` still
        waiting on a ready queue or for their site (their address was
        suppressed, or their campaign paused or cancelled, since the claim).
        An envelope shared by several recipients goes back whole; one already
        taken by a connection is sent."""
        gone = set(ids)
        back: list[Envelope] = []
        taken: list[int] = []
        for batch in self.resolving.values():  # still waiting for DNS or a route's queue
            items = batch.items
            if any(it.id in gone for it in items):
                taken += [it.id for it in items if it.id in gone]
                batch.items = [it for it in items if it.id not in gone]
        if taken:
            self.handback_ids(taken, 0.0, 0.0, WITHDRAWN)
        for q in self.sites.values():
            pending = q.pending
            if not pending:
                continue
            keep: list[Envelope] = []
            for e in pending:
                t = e.tag
                hit = any(i in gone for i in t) if isinstance(t, list) else t in gone
                (back if hit else keep).append(e)
            if len(keep) < len(pending):
                pending.clear()
                pending.extend(keep)
        if back:
            self.handback(back, 0.0, 0.0, WITHDRAWN)

    def retire(self) -> None:
        """wire.Retire (a reload started a worker in this one's place): every
        message no connection has taken yet goes back now, unattempted and due
        at once, for that worker to send; what is on a connection finishes
        here, and the connections held are reported (:meth:`report_conns`) so
        that the two stay within each (source IP, site) limit together."""
        self.draining = True
        self.retiring = True
        self.handback_untaken(RETIRED)
        # Its warm-up counts now, not with the next second's stats: the new worker
        # starts from the totals (spawn_records), this one's last sends included.
        counts = self.shaper.warm_counts() if self.shaper.warming else {}
        if counts and counts != self.warm_sent:
            self.warm_sent = counts
            self.pending_out.append(wire.encoder.encode(wire.WarmupCounts(counts)))
        # What each lane has spent and learned, for the new worker (before the
        # wire.Conns that lets it start): no second burst, no AIMD cut undone.
        now = time.monotonic()
        states = self.shaper.lane_states(now)
        self.lanes_told = {(st.ip, st.site): _slowed(st) for st in states}
        providers = self.providers_told = self.router.states(now)
        caps = self.site_caps(now)
        self.caps_told = set(caps)
        marks = self.site_marks(now)
        self.marks_told = {(m.pool, m.key): _marked(m) for m in marks}
        if states or providers or caps or marks:
            self.pending_out.append(
                wire.encoder.encode(wire.Lanes(states, providers, caps, marks))
            )
        # Only lanes with a transaction on the wire can hear more (report_lanes).
        self.lanes_busy = [key for key, ln in self.shaper.lanes.items() if ln.active]
        self.report_conns()
        self.check_done()

    def handback_untaken(self, why: str, ids: list[int] | None = None) -> None:
        """Give back now, unattempted and due at once, every message no
        connection has taken (``ids``, the caller's own first: a stop's unread
        batches; then batches waiting for DNS or a route's queue, then the
        ready queues), with the reason ``why`` (RETIRED: a reload's new worker
        sends them; STOPPED: a stop now). What is on a connection stays."""
        ids = list(ids or ())
        for batch in self.resolving.values():  # still waiting for DNS or a route's queue
            ids += [it.id for it in batch.items]
            batch.items = []
        back: list[Envelope] = []
        for q in self.sites.values():
            q.horizon = 0.0
            if q.pending:
                back += q.pending
                q.pending.clear()
        self.handback_ids(ids, 0.0, 0.0, why)
        if back:
            self.handback(back, 0.0, 0.0, why)

    def site_caps(self, now: float) -> list[tuple[str, str, int, float]]:
        """The sites whose connections are capped now (SiteQueue.cap: one more
        was refused while these worked), for a reload's new worker."""
        return [(pool, key, q.cap, q.cap_until) for (pool, key), q in self.sites.items()
                if isinstance(q, SiteQueue) and q.cap and q.cap_until > now]  # fmt: skip

    def site_marks(self, now: float) -> list[wire.SiteMarks]:
        """Its sites' hosts down or refusing, and sites unreachable, now
        (SiteQueue.marks), for a reload's new worker."""
        out = []
        for (pool, key), q in self.sites.items():
            if isinstance(q, SiteQueue) and (m := q.marks(pool, key, now)) is not None:
                out.append(m)
        return out

    def inherit_marks(self, marks: list[wire.SiteMarks]) -> None:
        """wire.Lanes ``marks``: what the worker this one replaces knew of its
        sites' hosts, applied to each site's queue (now, or when it is made).
        Before, a reload's new worker connected at once to a host that did not
        answer or refused us, and to a site found unreachable (one connect
        timeout per group again)."""
        for m in marks:
            q = self.sites.get((m.pool, m.key))
            if isinstance(q, SiteQueue):
                q.inherit_marks(m)
            else:
                if len(self.marks_inherited) >= 10_000:
                    self.marks_inherited.clear()
                self.marks_inherited[(m.pool, m.key)] = m

    def inherit_caps(self, caps: list[tuple[str, str, int, float]]) -> None:
        """wire.Lanes ``sites``: the caps the worker this one replaces learned,
        each applied to its site's queue (now, or when it is made). Before, a
        reload's new worker opened the site's whole max_connections again, and
        the receiver refused all it had refused before."""
        now = time.monotonic()
        for pool, key, cap, until in caps:
            if until <= now:
                continue
            q = self.sites.get((pool, key))
            if isinstance(q, SiteQueue):
                q.inherit_cap(cap, until)
            else:
                if len(self.caps_inherited) >= 10_000:
                    self.caps_inherited.clear()
                self.caps_inherited[(pool, key)] = (cap, until)

    def report_lanes(self) -> None:
        """While retiring: the lanes the replies to its last transactions slowed
        down since it answered wire.Retire (an AIMD cut, a throttle), for the
        new worker (with the stats every second, and at its exit)."""
        now = time.monotonic()
        told = self.lanes_told
        changed = []
        for key in self.lanes_busy:
            ln = self.shaper.lanes.get(key)
            st = ln.state(now) if ln is not None else None
            if st is not None and told.get(key) != (was := _slowed(st)):
                told[key] = was
                changed.append(st)
        providers = {k: v for k, v in self.router.states(now).items()
                     if self.providers_told.get(k) != v}  # fmt: skip
        self.providers_told.update(providers)
        # A site's cap learned since (a refusal read after wire.Retire: its loop
        # read the Retire first): before, only the caps at Retire went, and the
        # new worker opened the site's whole max_connections again once this
        # one's connections closed, each one over the site's refused again.
        caps = [c for c in self.site_caps(now) if c not in self.caps_told]
        self.caps_told.update(caps)
        marks = []  # (and a site's hosts its last replies marked down or refusing)
        for m in self.site_marks(now):
            if self.marks_told.get((m.pool, m.key)) != (was := _marked(m)):
                self.marks_told[(m.pool, m.key)] = was
                marks.append(m)
        if changed or providers or caps or marks:
            self.pending_out.append(
                wire.encoder.encode(wire.Lanes(changed, providers, caps, marks))
            )
            self.flush()

    def report_conns(self) -> None:
        """wire.Conns: the connections this retiring worker holds per lane (sent
        when they change, with the stats every second)."""
        held = sorted(
            (ip, site, ln.active) for (ip, site), ln in self.shaper.lanes.items() if ln.active
        )
        # A provider's requests in flight, as ("", its site key): its cap is the
        # transport's, not a lane's (transports.http.ProviderQueue.borrowed).
        held += sorted(("", key, q.active) for (pool, key), q in self.sites.items()
                       if not pool and key.startswith("provider:") and q.active)  # fmt: skip
        if held != self.conns_told:
            self.conns_told = held
            # In order: the outcomes and the shaping events before it (a rest its
            # last reply made reaches the new worker before the lane it frees).
            self.flush()
            self.pending_out.append(wire.encoder.encode(wire.Conns(held)))
            self.flush()

    def unsent_ids(self) -> list[int]:
        """The ids of every message this worker holds whose message no server
        was sent (its end of data never written): batches unread in the inbox
        or waiting for their site, envelopes on ready queues, and those of
        groups on connections still waiting for MAIL, RCPT or DATA replies
        (``SMTPConnection.unsent``). What is past its end of data, or with a
        provider's API (a request may have reached it), is not among them."""
        ids: list[int] = []
        decode = wire.to_worker_decoder.decode
        while (rec := self.inbox.get()) is not None:
            try:
                msg = decode(rec)
            except Exception:
                continue
            if isinstance(msg, wire.Batch):
                ids += [it.id for it in msg.items]
        for batch in self.resolving.values():
            ids += [it.id for it in batch.items]
        tags: list[Any] = []
        for q in self.sites.values():
            tags += [e.tag for e in q.pending]
            for conn, _batch, _ip in getattr(q, "groups", {}).values():
                tags += conn.unsent()
        for t in tags:
            if isinstance(t, list):
                ids.extend(t)
            elif isinstance(t, int):
                ids.append(t)
        return ids

    def stop_now(self) -> None:
        """``wire.STOP_NOW`` (the supervisor's stop now: Ctrl-C, a second SIGTERM; a
        reload's drain_limit): what no connection has taken goes back now, never
        sent (batches unread or waiting for their site, ready queues), and no
        transaction starts; the transactions on the wire get up to
        :data:`STOP_GRACE` for their replies, their outcomes told as any
        (:meth:`_stop_when_answered`), then :meth:`_exit_now`. Before, it exited
        at once: every message past its end of data whose reply was a
        millisecond away counted unknown and was sent again (a Ctrl-C of
        ``send`` to a 5 ms sink: 1,440 messages delivered twice). The
        supervisor repeats the signal while it waits: once is enough."""
        if self.stop_task is not None:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.inbox.reader_fd)  # nothing new (unsent_ids reads the rest)
        ids: list[int] = []
        decode = wire.to_worker_decoder.decode
        while (rec := self.inbox.get()) is not None:
            with contextlib.suppress(Exception):
                msg = decode(rec)
                if isinstance(msg, wire.Batch):
                    ids += [it.id for it in msg.items]
        self.handback_untaken(STOPPED, ids)
        self.stop_task = loop.create_task(self._stop_when_answered())

    async def _stop_when_answered(self) -> None:
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(q.sending for q in self.sites.values()):
            await asyncio.sleep(0.005)
        self._exit_now()

    def _exit_now(self) -> None:
        """Give back what was never sent (``unsent_ids``: released without an
        attempt), tell the outcomes decided, then exit at once, status
        STOPPED_EXIT. What it had past its end of data stays in the supervisor's
        window, each one attempt of unknown outcome; before, the whole window was
        (a stop counted, and delayed by the backoff, mail that had never left the
        ready queue)."""
        ids = self.unsent_ids()
        if self.out:  # outcomes decided and not yet told, first
            self.pending_out.append(wire.encoder.encode(wire.Results(self.out)))
            self.out = []
        if ids:
            self.pending_out.append(
                wire.encoder.encode(wire.Handback(ids, time.time(), 0.0, STOPPED, 0))
            )
        for rec in self.pending_out:
            if not self.outbox.put(rec):
                break  # ring full: the rest counts as unknown (sent again)
        os._exit(STOPPED_EXIT)

    def handback(
        self,
        envelopes: list[Envelope],
        delay: float,
        step: float,
        why: str,
        elsewhere: int = 0,
    ) -> None:
        """Give envelopes back to the supervisor unattempted (wire.Handback): their
        site will not take them soon, and the window is better spent elsewhere
        (``elsewhere``: none of this worker's addresses may send them before
        ``delay``; another worker's may: wire.ELSEWHERE_WORKER / _IP)."""
        ids: list[int] = []
        for e in envelopes:
            if isinstance(e.tag, list):
                ids.extend(e.tag)
            elif isinstance(e.tag, int):
                ids.append(e.tag)
        self.handback_ids(ids, delay, step, why, elsewhere)

    def handback_ids(
        self, ids: list[int], delay: float, step: float, why: str, elsewhere: int = 0
    ) -> None:
        if not ids:
            return
        if self.router.failover:
            self.router.forget(ids)
        self.count("handed_back", len(ids))
        if self.out:  # keep the outbox in the order things happened
            self.pending_out.append(wire.encoder.encode(wire.Results(self.out)))
            self.out = []
            self.out_n = 0
        rec = wire.Handback(ids, time.time() + delay, step, why[:400], elsewhere)
        self.pending_out.append(wire.encoder.encode(rec))
        self.flush()
        self.check_done()

    def add_results(self, results: list[TxnResult], source_ip: str, mx: str) -> None:
        out = self.out
        Res = wire.Res
        kinds = _KIND
        classify = self.classify
        n = added = len(results)
        # One message delivered to its one recipient, the usual case: in one
        # compiled loop (collect_delivered, into wire.Sent groups), up to the
        # first result that is not.
        i = collect_delivered(results, 0, out, source_ip, mx)
        while i < n:
            tr = results[i]
            tag = tr.tag
            outcomes = tr.outcomes
            tags = tag if isinstance(tag, list) else [tag]
            added += len(tags) - 1
            for k, mid in enumerate(tags):
                o = outcomes[k] if k < len(outcomes) else outcomes[-1]
                text = o.text
                if o.kind == DELIVERED:
                    if tr.queue_id and not text:
                        text = tr.queue_id
                    out.append(Res(mid, wire.K_DELIVERED, o.code, o.enhanced, text,
                                   mx or o.mx, source_ip, "", "", False, tr.queue_id,
                                   tr.dsn))  # fmt: skip
                    continue
                reason, hard = classify(o)
                # Only a reply to RCPT names a recipient: a refusal of the whole
                # message (DATA, end of data, MAIL, an API request) in a
                # transaction of several recipients is no proof against any one
                # of them, so it suppresses none (it still bounces them all).
                hard = hard and o.kind == FAILED and (len(tags) == 1 or o.stage == "rcpt")
                out.append(
                    Res(
                        mid,
                        kinds.get(o.kind, wire.K_DEFERRED),
                        o.code,
                        o.enhanced,
                        text,
                        mx or o.mx,
                        source_ip,
                        o.stage,
                        reason,
                        hard,
                        tr.queue_id,
                    )
                )
            i = collect_delivered(results, i + 1, out, source_ip, mx)
        self.out_n += added
        if self.out_n >= FLUSH_AT:
            self.flush()
        elif self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def watch_groups(self, q: SiteQueue | None = None) -> None:
        """Site queue ``q`` wrote a pipelined group: :meth:`tell_answered` looks
        at it while it has groups on the wire."""
        if q is not None:
            self.group_queues.add(q)
        if self.answered_timer is None:
            loop = asyncio.get_running_loop()
            self.answered_timer = loop.call_later(ANSWERED_EVERY, self.tell_answered)

    def tell_answered(self) -> None:
        """The deliveries the groups on the wire have had answered since the
        last look (the receiver's 250 read; their outcomes are told with the
        group's), in a wire.Answered: kept by the supervisor in case this
        worker dies before the group ends, so that they are not sent again."""
        self.answered_timer = None
        seen = self.answered_seen
        now: dict[int, tuple[list[TxnResult], int]] = {}
        items: list[wire.Res | wire.Sent] = []
        for q in list(self.group_queues):
            groups = q.groups
            if not groups:
                self.group_queues.discard(q)
                continue
            for key, (conn, _batch, ip) in groups.items():
                got = conn.answered()
                last = seen.get(key)
                n = len(got)
                if last is None or last[0] is not got:
                    # A group first seen: told from the next look on, if it is
                    # still on the wire (most end sooner: nothing to tell).
                    now[key] = (got, 0)
                    continue
                i = last[1]
                while i < n:
                    # single deliveries in wire.Sent groups (compiled), then one
                    # that is not: a message of several recipients all delivered,
                    # or one whose DSN parameters were relayed (its Res says so)
                    i = collect_delivered(got, i, items, ip, "")
                    if i >= n:
                        break
                    tr = got[i]
                    i += 1
                    tag, outcomes = tr.tag, tr.outcomes
                    if not outcomes or any(o.kind != DELIVERED for o in outcomes):
                        continue
                    for k, mid in enumerate(tag if isinstance(tag, list) else [tag]):
                        o = outcomes[k] if k < len(outcomes) else outcomes[-1]
                        items.append(wire.Res(mid, wire.K_DELIVERED, o.code, o.enhanced,
                                              o.text or tr.queue_id, o.mx, ip, "", "", False,
                                              tr.queue_id, tr.dsn))  # fmt: skip
                now[key] = (got, n)
        self.answered_seen = now
        if items:
            self.count("answered_early", float(sum(len(x.ids) if type(x) is wire.Sent else 1
                                                   for x in items)))  # fmt: skip
            self.pending_out.append(wire.encoder.encode(wire.Answered(items)))
            if self.flush_handle is None:  # (with the next flush of outcomes, if one is due)
                loop = asyncio.get_running_loop()
                self.flush_handle = loop.call_later(FLUSH_DELAY, self.flush)
            self.answered_told = True
        elif now and self.answered_told:
            # (tests: frozen while a group waits on a reply, what it had
            # answered before all told)
            countdown({"worker-stop-in-stalled-group": signal.SIGSTOP})
        if self.group_queues:
            self.watch_groups()

    def classify(self, o: Outcome) -> tuple[str, bool]:
        """(reason, hard) of a failed or deferred outcome: the rules DSNs get
        (fastsend.bounce.classify_reply), by the stage the reply answered.
        Cached: a refusal's text repeats across recipients and attempts."""
        key = (o.code, o.enhanced, o.stage, o.text)
        got = self.classified.get(key)
        if got is None:
            if not o.code and o.stage == "connect":
                # No reply at all (refused, unreachable, timed out): the
                # network, not a block (a block is the server's reply).
                got = ("networkerror", False)
            elif o.text.startswith("local error"):
                # Our own failure (a bug, deferred loudly), as 4.3.0 reads at
                # any other stage: at "connect" the rules read it as a
                # server's block ("blocked": an IP block, which rests IPs).
                got = ("systemerror", False)
            else:
                got = self._classify(o)
            if len(self.classified) >= CLASSIFY_CACHE:
                self.classified.clear()
            self.classified[key] = got
        return got

    @staticmethod
    def _classify(o: Outcome) -> tuple[str, bool]:
        try:
            c = classify_reply(o.code, o.enhanced, o.text, command=o.stage)
        except ValueError:  # not an SMTP code: a local failure
            return ("", False)
        return (c.reason, c.hard)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if self.out:
            self.pending_out.append(wire.encoder.encode(wire.Results(self.out)))
            self.out = []
            self.out_n = 0
        if self.shaper.events:
            self.pending_out.append(
                wire.encoder.encode(wire.ShapingEvents(self.shaper.take_events()))
            )
        if self.router.events:
            self.pending_out.append(wire.encoder.encode(wire.Events(self.router.take_events())))
        sts = self.resolver.sts
        if sts is not None and sts.has_events():  # TLS-RPT results (delivery/mtasts.py)
            self.pending_out.append(wire.encoder.encode(wire.Events(sts.take_events())))
        while self.pending_out:
            if not self.outbox.put(self.pending_out[0]):
                # Ring full: the supervisor is behind; retry when it frees space.
                loop = asyncio.get_running_loop()
                loop.add_reader(self.outbox.writer_fd, self._on_writable)
                return
            self.pending_out.pop(0)

    def _on_writable(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.outbox.writer_fd)
        self.outbox.clear_writer()
        self.flush()

    def check_done(self) -> None:
        if not self.draining or self.busy:
            return
        if any(q.pending or q.sending for q in self.sites.values()):
            return
        self.done.set()

    # -- main ----------------------------------------------------------------

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        transport.NAPPER.start(loop, NAP_S, NAP_LINKS)
        loop.add_reader(self.inbox.reader_fd, self.on_inbox)
        loop.add_signal_handler(wire.STOP_NOW, self.stop_now)
        self.outbox.put(wire.encoder.encode(wire.Hello(os.getpid(), self.ips)))
        self.on_inbox()
        watcher = loop.create_task(self.watch_parent())
        stats = loop.create_task(self.stats_loop())
        await self.done.wait()
        for q in self.sites.values():
            await q.close()
        await self.router.close()
        if self.resolver.sts is not None:
            self.resolver.sts.end()  # its TLS-RPT session counts go with the last events
        self.flush()
        while self.pending_out:  # let the supervisor take the last outcomes
            await asyncio.sleep(0.01)
            self.flush()
        watcher.cancel()
        stats.cancel()
        self.send_stats()

    def count(self, name: str, n: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + n

    def send_stats(self) -> None:
        c = dict(self.counters)
        c["connections_open"] = float(sum(q.active for q in self.sites.values()))
        c["ready_queue"] = float(sum(len(q.pending) for q in self.sites.values()))
        c["site_queues"] = float(len(self.sites))
        c["lanes"] = float(len(self.shaper.lanes))
        c["dns_cache_entries"] = float(self.resolver.cache_entries)
        self.outbox.put(wire.encoder.encode(wire.Stats(os.getpid(), c)))
        if self.retiring:
            self.report_lanes()
            self.report_conns()
        if self.shaper.warming:
            counts = self.shaper.warm_counts()
            if counts != self.warm_sent:
                self.warm_sent = counts
                self.outbox.put(wire.encoder.encode(wire.WarmupCounts(counts)))
        if self.shaper.events or (self.resolver.sts is not None and self.resolver.sts.has_events()):
            self.flush()

    async def stats_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.send_stats()

    async def watch_parent(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != self.parent:
                os._exit(3)  # the supervisor died: it will requeue on restart


def _slowed(st: wire.LaneState) -> tuple[float, float]:
    """What of a lane's state a later wire.Lanes tells again (Worker.report_lanes)."""
    return st.aimd_rate, st.throttle_until


def collect_delivered(
    results: list[TxnResult], i: int, out: list[wire.Res | wire.Sent], source_ip: str, mx: str
) -> int:
    """From ``results[i]`` on, add to ``out`` each result that is one message
    delivered to its one recipient (an int tag, a delivered first outcome, no
    DSN parameters relayed: nearly every result), up to the first that is not;
    return that one's index
    (``len(results)``: none). The deliveries go into ``wire.Sent`` groups by
    (code, enhanced, MX, source IP): the group of theirs among the Sent at
    the end of ``out`` (after its last Res), else a new one appended
    (:func:`_sent_group`); ``out`` expanded (``wire.expand``) holds the
    ``wire.Res`` each would have had. The rest of :meth:`Worker.add_results`
    answers the result this stops at. Compiled twin in ``_worker.pxi``."""
    n = len(results)
    g: wire.Sent | None = None
    while i < n:
        tr = results[i]
        tag = tr.tag
        outcomes = tr.outcomes
        if type(tag) is not int or not outcomes or outcomes[0].kind != DELIVERED or tr.dsn:
            return i
        o = outcomes[0]
        qid = tr.queue_id
        text = o.text or qid
        m = mx or o.mx
        if g is None or g.code != o.code or g.enhanced != o.enhanced or g.mx != m:
            g = _sent_group(out, o.code, o.enhanced, m, source_ip)
        ids = g.ids
        if not ids:
            g.text, g.queue_id = text, qid
        elif g.texts:
            g.texts.append(text)
            g.queue_ids.append(qid)
        elif text != g.text or qid != g.queue_id:  # from here on, one text per message
            g.texts = [g.text] * len(ids) + [text]
            g.queue_ids = [g.queue_id] * len(ids) + [qid]
            g.text = g.queue_id = ""
        ids.append(tag)
        i += 1
    return n


SENT_LOOKBACK = 8
"""How many Sent groups at the end of a worker's outbox list a delivery may join."""


def _sent_group(
    out: list[wire.Res | wire.Sent], code: int, enhanced: str, mx: str, source_ip: str
) -> wire.Sent:
    """The ``wire.Sent`` group of (code, enhanced, mx, source_ip) among the last
    SENT_LOOKBACK items of ``out`` that are Sent groups (none past a Res), else
    a new one appended."""
    Sent = wire.Sent
    k = len(out)
    stop = max(0, k - SENT_LOOKBACK)
    while k > stop:
        k -= 1
        g = out[k]
        if type(g) is not Sent:
            break
        if g.code == code and g.source_ip == source_ip and g.mx == mx and g.enhanced == enhanced:
            return g
    g = Sent([], code, enhanced, mx, source_ip)
    out.append(g)
    return g


py_collect_delivered = collect_delivered  # the reference (tests compare the twin with it)
collect_delivered = pick(collect_delivered)


def _direct_args(r: Any) -> tuple[Any, ...]:
    """The arguments of a personalised campaign's deferred build (renderer
    ``r``, direct path): ``(envelopes, fallback, sender, sender_utf8,
    needs_smtputf8, date, now)``; the sender is the return path, or with VERP
    ``envelope_from``, which makes each message's; ``now``: each message made
    as the batch is built (an rsa-sha256 signature, ``Renderer.made_ahead``)."""
    fallback = functools.partial(_render_or_failure, r.render)
    sender = None if r.verp_domain else r.return_path
    return (r.assembly.envelopes, fallback, sender or r.envelope_from, r.sender_utf8,
            r.needs_smtputf8, r.date_line, r.made_ahead)  # fmt: skip


def _build_direct(d: tuple[Any, ...], batch: wire.Batch, secret: bytes) -> list[Envelope]:
    """A deferred batch built by the one compiled call ``d`` (see _direct_args)."""
    make, fallback, sender, sender_utf8, needs, date, now = d
    made: list[Envelope] = make(
        batch.items, batch.blobs, secret, date(), fallback, sender, sender_utf8, needs, now
    )
    return made


def _render_failure(e: RenderError) -> Outcome:
    """A message that cannot be rendered: failed, 550 5.6.0, why (one over
    [delivery] max_message_size: 552 5.3.4, RFC 3463's message too big)."""
    if isinstance(e, MessageTooBig):
        return Outcome(FAILED, 552, "5.3.4", f"render: {e}", "local")
    return Outcome(FAILED, 550, "5.6.0", f"render: {e}", "local")


def _render_or_failure(render: Any, rcpt: str, values: Any, mid: str) -> bytes | Outcome:
    """A DeferredMessage's fallback: the message by ``render`` (the renderer's
    own path), or the Outcome saying why there is none. ``values``: the
    recipient's variables, or their JSON."""
    try:
        if type(values) is bytes:
            values = orjson.loads(values) if values else {}
        return render(rcpt, values, mid)  # type: ignore[no-any-return]
    except RenderError as e:
        return _render_failure(e)


def _literal(v: Any) -> Any:
    """Escape template syntax in user-supplied text so it is sent as written."""
    if isinstance(v, str):
        return v.replace("{{", '{{ "{{" }}')
    if isinstance(v, dict):
        return {k: _literal(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_literal(x) for x in v]
    return v


def close_listeners() -> int:
    """Close every listening socket inherited at fork (the API, submission and
    tracking listeners of ``fastsend serve``): a worker never accepts, and a
    copy held by a worker keeps the port bound after its parent died. Returns
    how many were closed."""
    import socket

    n = 0
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    for fd in fds:
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket (or already closed: the listdir fd itself)
        try:
            listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        finally:
            s.detach()
        if listening:
            os.close(fd)
            n += 1
    return n


_KEYS_TOLD: set[str] = set()  # the key problems this worker has said on stderr


def _key_unavailable(e: Exception) -> Outcome:
    """A DKIM key the config names that cannot be used: deferred, 451 4.3.5
    (RFC 3463: system incorrectly configured), until the operator puts it
    back (it had failed the mail 550 5.6.0: a key moved away during a
    rotation bounced every message of its domain). What is wrong, with the
    key's path, goes to the operator's log (once per problem), not into the
    outcome a tenant reads in its events."""
    why = str(e)
    if why not in _KEYS_TOLD and len(_KEYS_TOLD) < 1000:
        _KEYS_TOLD.add(why)
        print(f"fastsend: error: DKIM: {why}: its mail is deferred", file=sys.stderr, flush=True)
    return Outcome(
        "deferred", 451, "4.3.5",
        "local configuration: a DKIM key this message is signed with cannot be used", "local",
    )  # fmt: skip


def prepare(config: Config) -> None:
    """In the supervisor, before it forks workers on ``config``: what every worker
    would otherwise do after the fork and can share instead (copy-on-write):
    import dnspython when a name may be looked up, load the config's DKIM keys,
    find libc's prctl (the pure twin's), load the idna codec.
    Campaign keys are loaded when a campaign is accepted (accept.check_campaign)."""
    import uvloop  # noqa: F401  (each worker's loop)

    # The loop's getaddrinfo encodes every host name with the idna codec: its
    # module (and stringprep) would be imported at each worker's first connect.
    "localhost".encode("idna")
    mx.prepare(config)
    routes.prepare(config)
    ehlo.prepare(config)  # the EHLO names, looked up once; warnings on stderr
    ConfigDKIM(config).preload()
    if set_pdeathsig is _py_set_pdeathsig:
        _prctl()  # ctypes, for the pure twin only


def run_worker(
    index: int,
    config: Config,
    ips: list[str],
    inbox: Ring,
    outbox: Ring,
    parent: int = 0,
    writes: WriteLog | None = None,
) -> int:
    """Entry point in the forked child (``parent``: the supervisor's pid, read
    before the fork; ``writes``: where it notes each message it begins to
    write, fastsend.ring.WriteLog). Creates its own uvloop loop."""
    ring.WRITES = writes
    die_with_parent(parent or os.getppid())
    close_listeners()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
    # ... and SIGTERM: a service manager stopping the whole process group (systemd's
    # default KillMode=control-group, kill -TERM -PGID) sends it to the workers as
    # well, and each died at once mid-transaction: no drain, every message on a
    # connection sent again. The supervisor drains them (wire.Drain) or stops
    # them now (wire.STOP_NOW); a dead supervisor takes them along (pdeathsig).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # ... and SIGHUP: serve's reload (the supervisor's to handle: it replaces the
    # workers once they have finished), a terminal's hangup to its whole process
    # group (a foreground `fastsend send`); a worker died of it mid-transaction.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    asyncio.events._set_running_loop(None)  # forked from inside the supervisor's loop
    # Everything inherited from the supervisor lives as long as this process:
    # out of the collector's sight, a collection never scans it (tens of
    # thousands of objects, ~3 ms a pass) nor writes to its copy-on-write pages.
    gc.freeze()
    # Young collections every GC_YOUNG (not 700) container allocations: a
    # worker allocates several per message (recipient lists, decoded vars,
    # envelopes in flight), and at the default each pass re-scanned the
    # thousands of envelopes waiting on the ready queues: ~2 us per message
    # of collector time. Cycles are rare here (failed tasks, tracebacks) and
    # are still collected.
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(Worker(index, config, ips, inbox, outbox).main())
    return 0


# A campaign spec key: its mail is TLS-RPT reports (analytics/tlsrpt.py), which RFC
# 8460 5.3 has delivered "despite any TLS-related failures": the MX hosts of the
# domain's site, without its MTA-STS or DANE requirements (opportunistic TLS).
REPORT_MAIL = "tls_report_mail"


def _marked(m: wire.SiteMarks) -> tuple[Any, ...]:
    """What of a site's marks a later wire.Lanes tells again (report_lanes)."""
    return (sorted(m.down.items()), sorted(m.refused), m.dead_until)


def _without_policy(site: Site) -> Site:
    hosts = tuple(msgspec.structs.replace(h, tlsa=()) if h.tlsa else h for h in site.hosts)
    return Site(site.lanes, hosts)
