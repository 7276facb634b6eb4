"""Routes of transports in a worker: which queue takes a batch, and failover.

A route (fastsend.config.transports) names transports in order. The worker
asks :meth:`Router.chain` for a batch's chain (campaign, tenant, pool, then
domain routes); an empty chain is today's path (MX, or a HOST:PORT route).
Otherwise :meth:`Router.dispatch` finds the first transport that has a queue
for the batch -- ``smtp``: the domain's MX site; a relay: a SiteQueue to the
relay with its AUTH/TLS settings and limits; ses/sendgrid/mailgun: the
worker's :class:`~fastsend.transports.http.ProviderQueue` of that transport
-- and pushes the rendered envelopes there.

The messages of such a route lose the providers' control headers
(fastsend.transports.control: X-SES-*, X-SMTPAPI, X-Mailgun-*) before they
are queued: a tenant's content must not steer a provider or relay.

Failover: while an envelope has transports left in its chain, its outcome is
looked at before it is reported. When the site defers it (any 4xx or
connection trouble, also "held by shaping") or refuses it as an IP block
(classify_reply: ip_blocked), the envelope goes to the next transport instead
and a "failover" event per message records the switch (from, to, why); so
does the mail a provider's lane holds while the provider paused it past the
ready horizon (:meth:`Router.move_on`: unattempted there). An
unknown outcome (the message sent whole, no answer: :func:`unknown_outcome`)
is reported deferred, never failed over (it would be sent twice).
Anything else (delivered, a recipient's permanent failure) is reported; a
group answered per recipient moves on only its deferred or blocked ones. DNS
failures of the first transport move on only when temporary.

One aiohttp session per worker serves every HTTP transport (keep-alive; the
in-flight bound is per transport, in its queue).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

import msgspec

from fastsend.config.transports import TransportSpec
from fastsend.delivery.mx import Host, Site
from fastsend.outcome import DEFERRED, FAILED, Envelope, Outcome, TxnResult, all_delivered

if TYPE_CHECKING:
    from fastsend import wire
    from fastsend.config import Config
    from fastsend.transports.http import HTTPTransport
    from fastsend.transports.slots import SharedGcra, Slots


def prepare(config: Config) -> None:
    """In the supervisor before the fork (``delivery.worker.prepare``): the
    transports' modules when a route names transports. A run without such a
    route never imports them (the worker's router is then idle)."""
    if any(r.transports for r in config.routes.values()):
        import fastsend.transports.http
        import fastsend.transports.relay  # noqa: F401


def make_transport(spec: TransportSpec, secret: bytes) -> HTTPTransport:
    if spec.kind == "ses":
        from fastsend.transports.ses import SESTransport

        return SESTransport(spec, secret)
    if spec.kind == "sendgrid":
        from fastsend.transports.sendgrid import SendGridTransport

        return SendGridTransport(spec, secret)
    if spec.kind == "mailgun":
        from fastsend.transports.mailgun import MailgunTransport

        return MailgunTransport(spec, secret)
    raise ValueError(f"{spec.kind} is not an HTTP transport")


def unknown_outcome(o: Outcome) -> bool:
    """No answer came once the message was (or may have been) sent whole: a
    connection lost or timed out in the DATA phase of SMTP (the reply to the
    final dot awaited), an HTTP request sent and left unanswered (stage
    "data", no code). The receiver may have the message and deliver it."""
    return o.kind == DEFERRED and o.code == 0 and o.stage == "data"


def should_fail_over(o: Outcome) -> bool:
    """An outcome that moves the envelope to the next transport of its chain
    at once: a deferral or an IP block. Not an unknown outcome: the first
    transport may have the message, and the next one would send it again
    within the second (a certain duplicate); it is an attempt deferred, as
    after SMTP's unanswered final dot, retried later from the chain's start."""
    if o.kind == DEFERRED:
        return not unknown_outcome(o)
    if o.kind == FAILED and o.code:
        from fastsend.bounce.reply import classify_reply

        return classify_reply(o.code, o.enhanced, o.text, command=o.stage).ip_blocked
    return False


class Router:
    def __init__(self, worker: Any) -> None:  # the delivery.worker.Worker
        self.w = worker
        self.config = worker.config
        self.has_routes = any(r.transports for r in self.config.routes.values())
        self.campaigns: dict[
            int, tuple[int, tuple[str, ...], str]
        ] = {}  # id -> (id, names, tenant)
        # first message id of an envelope -> (envelope, transports left, campaign, from label)
        self.failover: dict[int, tuple[Envelope, tuple[str, ...], int, str]] = {}
        self.events: list[dict[str, Any]] = []
        self._session: Any = None
        # Transport name -> this node's share of its max_connections (several
        # nodes on a shared spool: wire.TransportShares); absent: all of it.
        self.conns: dict[str, int] = {}
        self.nodes: dict[str, int] = {}  # transport -> live nodes sending through it
        # provider site key -> a reload's retiring worker's queue (wire.Lanes
        # providers), taken over when this worker makes that queue.
        self.inherited: dict[str, tuple[float, float, int, float]] = {}
        # Transport name -> its places shared with the node's other workers
        # (transports.slots): one per transport in this process (its record
        # locks are the process's: two open files of it would share them).
        self.slots: dict[str, Slots | None] = {}
        # Transport name -> the bucket of its rate the node's workers share.
        self.rates: dict[str, SharedGcra | None] = {}
        self.relay_told: dict[str, float] = {}  # relay -> when it last "refused us" (monotonic)

    def slots_of(self, name: str) -> Slots | None:
        """The places of transport ``name`` shared with the node's other
        workers (None when its file cannot be made: each worker's part
        alone bounds it then, as before, and a warning says so)."""
        if name in self.slots:
            return self.slots[name]
        from fastsend.transports.slots import Slots

        path = os.path.join(
            self.config.spool_dir, "transport-slots", re.sub(r"[^\w.-]", "_", name)
        )
        got: Slots | None = None
        try:
            got = Slots(path, getattr(self.w, "index", 0), 0)
        except OSError as e:
            print(f"fastsend: warning: {path}: {e.strerror}: transport {name}'s"
                  " max_connections is not shared among the workers", file=sys.stderr)  # fmt: skip
        self.slots[name] = got
        return got

    def rate_of(self, name: str, rate: float, burst: int) -> SharedGcra | None:
        """The bucket of transport ``name``'s ``rate`` (messages/s on this
        node) the node's workers share (transports.slots.SharedGcra), set to
        ``rate`` and ``burst`` for this worker; None when its file cannot be
        made (each worker then keeps its part of the rate, as before, and a
        warning says so)."""
        if name in self.rates:
            got = self.rates[name]
            if got is not None and (got.rate != rate or got.burst != burst):
                got.set_rate(rate, burst=burst)
            return got
        from fastsend.transports.slots import SharedGcra

        path = os.path.join(
            self.config.spool_dir, "transport-rates", re.sub(r"[^\w.-]", "_", name)
        )
        made: SharedGcra | None = None
        try:
            made = SharedGcra(path, rate, burst)
        except OSError as e:
            print(f"fastsend: warning: {path}: {e.strerror}: transport {name}'s"
                  " rate is split among the workers", file=sys.stderr)  # fmt: skip
        self.rates[name] = made
        return made

    def inherit(self, providers: dict[str, tuple[float, float, int, float]]) -> None:
        """wire.Lanes' providers: each queue made already takes it over now, the
        others when they are made."""
        for key, st in providers.items():
            q = self.w.sites.get(("", key))
            if q is not None and hasattr(q, "take_over"):
                q.take_over(st)
            else:
                self.inherited[key] = st

    def states(self, now: float) -> dict[str, tuple[float, float, int, float]]:
        """Each provider queue's state a reload's new worker takes over (and
        what this one inherited and has not used)."""
        out = dict(self.inherited)
        for (pool, key), q in self.w.sites.items():
            if not pool and key.startswith("provider:") and hasattr(q, "state"):
                st = q.state(now)
                if st is not None:
                    out[key] = st
        return out

    def set_conns(self, conns: dict[str, int], nodes: dict[str, int]) -> None:
        """A new share of each transport's connections for this node (and the
        count of nodes sharing it): the queues already open take it at once
        (connections over it finish their transaction and are not replaced)."""
        from fastsend.transports.http import ProviderQueue

        self.conns, self.nodes = dict(conns), dict(nodes)
        w = self.w
        for (_pool, key), q in list(w.sites.items()):
            if isinstance(q, ProviderQueue):
                name = key.removeprefix("provider:")
                if name in self.conns:
                    q.set_conns(self.conns[name])
                q.set_nodes(self.nodes.get(name, 1))
                continue
            name = getattr(q, "transport", "")
            spec = self.config.transports.get(name) if name else None
            if spec is None or name not in self.conns:
                continue
            q.limits = self._relay_limits(spec, self.conns[name])
            if q.slots is not None:
                q.slots.total = max(1, self.conns[name])
            for (_ip, site_key), lane in w.shaper.lanes.items():
                if site_key == q.site.key:
                    lane.max_connections = q.limits.max_connections

    def _relay_limits(self, spec: TransportSpec, total: int | None) -> Any:
        from fastsend.transports import relay

        shared = spec.rate > 0 and self._relay_rate(spec) is not None
        return relay.limits(
            spec, self.config.worker_count, len(self.w.ips) or 1,
            self.config.delivery.max_messages_per_connection, total, shared,
        )  # fmt: skip

    def _relay_rate(self, spec: TransportSpec) -> SharedGcra | None:
        """The relay's rate as one bucket of the node's workers (burst: a
        second's worth, at least 1)."""
        return self.rate_of(spec.name, spec.rate, max(1, math.ceil(spec.rate)))

    def on_campaign(self, rec: wire.CampaignInfo) -> None:
        spec = self.w.campaign_specs.get(rec.id) or {}
        names = (rec.name, str(spec.get("name", "")))
        self.campaigns[rec.id] = (rec.id, names, rec.tenant)

    def chain(self, batch: wire.Batch) -> tuple[str, ...]:
        if not self.has_routes:
            return ()
        pool = self.w.campaign_pools.get(batch.campaign, "")
        route = self.config.route_lookup(batch.domain, self.campaigns.get(batch.campaign), pool)
        return route.transports if route is not None else ()

    def session(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0, ttl_dns_cache=300),
                raise_for_status=False,
            )
        return self._session

    # -- queues ---------------------------------------------------------------

    async def queue_for(self, name: str, batch: wire.Batch) -> Any:
        """The queue of transport ``name`` for the batch, or an Outcome (no site)."""
        from fastsend.transports import relay
        from fastsend.transports.http import DEAD_FOR, ProviderQueue

        w = self.w
        if name == "smtp":
            site = await w.resolver.site_for(batch.domain)
            return site if isinstance(site, Outcome) else w.site_queue(site, batch)
        spec: TransportSpec = self.config.transports[name]
        if spec.kind == "relay":
            site = await w.resolver.route_site(f"relay:{name}", spec.host, spec.port)
            if isinstance(site, Outcome):
                return site
            # Events name the relay ("relay:NAME[address]:port"); TLS verifies spec.host.
            site = Site(
                site.key, tuple(Host(f"relay:{name}", h.address, h.port) for h in site.hosts)
            )
            q = w.site_queue(
                site,
                batch,
                limits=self._relay_limits(spec, self.conns.get(name)),
                connect_options=relay.connect_options(spec),
            )
            q.transport = name  # set_conns finds it by this
            if spec.rate > 0 and q.lanes_key not in w.shaper.shared:
                bucket = self._relay_rate(spec)
                if bucket is not None:
                    w.shaper.share_rate(q.lanes_key, bucket)
            if q.slots is None:
                # The relay's max_connections is the node's workers' together
                # (each lane's share is at least 1: 16 workers had 16 sessions
                # with a relay that takes 4): each connection holds a place.
                q.slots = self.slots_of(name)
                q.slot_workers = self.config.worker_count
            if q.slots is not None:
                q.slots.total = max(1, self.conns.get(name) or spec.max_connections)
            return q
        key = ("", f"provider:{name}")
        q = w.sites.get(key)
        if q is None:
            q = w.sites[key] = ProviderQueue(
                make_transport(spec, self.config.secret),
                self.session,
                w.report,
                w.handback,
                workers=self.config.worker_count,
                conns=self.conns.get(name),
                nodes=self.nodes.get(name, 1),
                horizon=self.config.delivery.ready_horizon,
                count=w.count,
                events=w.shaper.events,
                move_on=self.move_on,
                on_cut=self.on_cut,
                dead_for=min(DEAD_FOR, self.config.retry.min_backoff),
                index=getattr(w, "index", 0),
                slots=self.slots_of(name),
                shared_rate=functools.partial(self.rate_of, name),
            )
            # A reload's retiring worker's requests still in flight there (wire.Conns).
            q.borrowed = w.shaper.borrowed.get(key, 0)
            if (st := self.inherited.pop(key[1], None)) is not None:
                q.take_over(st)  # and where it left the queue (wire.Lanes)
        return q

    async def dispatch(
        self, batch: wire.Batch, chain: tuple[str, ...], waiting: dict[int, Any] | None = None
    ) -> None:
        """Build the batch's envelopes and push them to the first transport that
        has a queue for them (a temporary DNS failure moves on). ``waiting``
        (the worker's ``resolving``) holds the batch while a queue is looked
        up: a withdrawal takes its messages out meanwhile."""
        from fastsend.transports.http import ProviderQueue, _key

        w = self.w
        for i, name in enumerate(chain):
            if waiting is not None:
                waiting[id(batch)] = batch
            try:
                q = await self.queue_for(name, batch)
            finally:
                if waiting is not None:
                    waiting.pop(id(batch), None)
            if not batch.items:  # all withdrawn while it waited
                return
            if isinstance(q, Outcome):
                if q.kind == DEFERRED and i + 1 < len(chain):
                    continue
                w.add_results([TxnResult(it.id, [q]) for it in batch.items], "", q.mx or "")
                return
            envelopes = w.build(batch)
            if not envelopes:
                return
            envelopes = [_without_control(e) for e in envelopes]
            if isinstance(q, ProviderQueue):
                envelopes = q.transport.fit(envelopes)  # at most a request's recipients
            rest = chain[i + 1 :]
            if rest:
                for e in envelopes:
                    self.failover[_key(e)] = (e, rest, batch.campaign, name)
            _push(q, envelopes, batch.campaign)
            return

    # -- failover -------------------------------------------------------------

    def relay_refusals(self, results: list[TxnResult], mx: str) -> list[TxnResult]:
        """Results of a relay's connection (``mx`` "relay:NAME[address]:port",
        or a static route's smarthost, "HOST[address]:port")
        with its refusals of us (transports.relay.refused_us: "554 5.7.1 Relay
        access denied", "530 Authentication required", a sender our login may
        not use) deferred: before, every message through a relay that would not
        relay for us bounced ("norelaying"), lost and counted against the
        campaign's bounce rate, and a route's next transport was never tried.
        Each relay's first such refusal in a minute is a "shaping" event
        ("relay refused us") saying what to fix."""
        if all_delivered(results) >= 0:  # a group's usual answer: no refusal in it
            return results  # (one compiled pass, not a call per outcome: ~0.8 us/msg)
        from fastsend.transports.relay import as_configuration, refused_us

        name = mx[6:].partition("[")[0] if mx[:6] == "relay:" else mx
        out = results
        for i, tr in enumerate(results):
            outs = tr.outcomes
            if not any(refused_us(o) for o in outs):
                continue
            if out is results:
                out = list(results)
            mapped = {id(o): as_configuration(o, name) for o in outs if refused_us(o)}
            out[i] = TxnResult(tr.tag, [mapped.get(id(o), o) for o in outs], tr.queue_id, tr.dsn)
            now = time.monotonic()
            if now >= self.relay_told.get(name, -math.inf) + 60.0:
                self.relay_told[name] = now
                o = next(o for o in outs if id(o) in mapped)
                self.w.shaper.events.append({
                    "time": time.time(), "event": "shaping", "action": "relay refused us",
                    "site": f"relay:{name}", "transport": name, "mx": mx, "code": o.code,
                    "enhanced": o.enhanced, "text": o.text[:200],
                })  # fmt: skip
        return out

    def on_results(self, results: list[TxnResult], source_ip: str, mx: str) -> list[TxnResult]:
        """Results to report now; the others' envelopes move to their next transport."""
        keep: list[TxnResult] = []
        for tr in results:
            t = tr.tag
            k = (t[0] if t else -1) if isinstance(t, list) else t
            ent = self.failover.pop(k, None) if isinstance(k, int) else None
            if ent is None or not tr.outcomes:
                keep.append(tr)
                continue
            env, rest, campaign, came_from = ent
            outs = tr.outcomes
            if isinstance(t, list) and isinstance(env.tag, list) and len(t) == len(outs) > 1:
                # A group (one transaction, several recipients) answered per
                # recipient: only those deferred or blocked move on; the ones
                # the site took or refused for good are reported. (The first
                # outcome decided for all: recipients the MX had taken got the
                # message again through the next transport.)
                move = [k for k, o in enumerate(outs) if should_fail_over(o)]
            else:
                move = list(range(len(outs))) if should_fail_over(outs[0]) else []
            if not move:
                keep.append(tr)
                continue
            if len(move) < len(outs) and isinstance(t, list) and isinstance(env.tag, list):
                stay = [k for k in range(len(outs)) if k not in set(move)]
                keep.append(TxnResult([t[k] for k in stay], [outs[k] for k in stay], tr.queue_id, tr.dsn))
                rcpt_of = dict(zip(env.tag, env.rcpts, strict=False))
                env = msgspec.structs.replace(
                    env, rcpts=[rcpt_of[t[k]] for k in move], tag=[t[k] for k in move]
                )
                t = env.tag
            o = outs[move[0]]
            now = time.time()
            ids = t if isinstance(t, list) else [t] * len(env.rcpts)
            for mid, rcpt in zip(ids, env.rcpts, strict=False):
                self.events.append({
                    "time": now, "event": "failover", "id": mid, "campaign": campaign,
                    "rcpt": rcpt, "from": came_from, "to": rest[0], "mx": mx or o.mx,
                    "source_ip": source_ip, "code": o.code, "enhanced": o.enhanced,
                    "text": o.text[:300],
                })  # fmt: skip
            self.w.count("failovers", len(env.rcpts))
            self.w.busy += 1
            asyncio.get_running_loop().create_task(self._reroute(env, rest, campaign))
        return keep

    def on_cut(self, whole: Envelope, pieces: list[Envelope]) -> None:
        """A provider's lane cut ``whole`` into ``pieces`` (a request's share of
        its rate): each piece keeps the route's next transports."""
        from fastsend.transports.http import _key

        ent = self.failover.pop(_key(whole), None)
        if ent is not None:
            for p in pieces:
                self.failover[_key(p)] = (p, *ent[1:])

    def move_on(self, envelopes: list[Envelope], why: str) -> list[Envelope]:
        """Envelopes a provider's lane holds while it is paused past the ready
        horizon (a 503 in maintenance, a Retry-After, SES's daily quota): those
        whose route names a next transport go there now, unattempted here (a
        "failover" event each, code 0: nothing was sent); the others are
        returned, to be handed back until the pause ends."""
        from fastsend.transports.http import _key

        keep: list[Envelope] = []
        now = time.time()
        for env in envelopes:
            ent = self.failover.pop(_key(env), None)
            if ent is None:
                keep.append(env)
                continue
            _env, rest, campaign, came_from = ent
            ids = env.tag if isinstance(env.tag, list) else [env.tag] * len(env.rcpts)
            for mid, rcpt in zip(ids, env.rcpts, strict=False):
                self.events.append({
                    "time": now, "event": "failover", "id": mid, "campaign": campaign,
                    "rcpt": rcpt, "from": came_from, "to": rest[0], "mx": "", "source_ip": "",
                    "code": 0, "enhanced": "", "text": why[:300],
                })  # fmt: skip
            self.w.count("failovers", len(env.rcpts))
            self.w.busy += 1
            asyncio.get_running_loop().create_task(self._reroute(env, rest, campaign))
        return keep

    async def _reroute(self, env: Envelope, rest: tuple[str, ...], campaign: int) -> None:
        from fastsend import wire
        from fastsend.transports.http import ProviderQueue, _key

        w = self.w
        try:
            domain = env.rcpts[0].rpartition("@")[2].lower()
            batch = wire.Batch(campaign, domain, [])
            for i, name in enumerate(rest):
                q = await self.queue_for(name, batch)
                if isinstance(q, Outcome):
                    if q.kind == DEFERRED and i + 1 < len(rest):
                        continue
                    w.add_results([TxnResult(env.tag, [q] * len(env.rcpts))], "", q.mx or "")
                    return
                envs = q.transport.fit([env]) if isinstance(q, ProviderQueue) else [env]
                if rest[i + 1 :]:
                    for e in envs:
                        self.failover[_key(e)] = (e, rest[i + 1 :], campaign, name)
                _push(q, envs, campaign)
                return
        except Exception as e:  # a bug must not lose the envelope: defer it, loudly
            import traceback

            traceback.print_exc()
            out = Outcome(DEFERRED, 451, "4.3.0", f"local error: {e.__class__.__name__}", "local")
            w.add_results([TxnResult(env.tag, [out] * len(env.rcpts))], "", "")
        finally:
            w.busy -= 1
            w.check_done()

    def forget(self, ids: list[int]) -> None:
        for i in ids:
            self.failover.pop(i, None)

    def take_events(self) -> list[dict[str, Any]]:
        ev, self.events = self.events, []
        return ev

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _without_control(env: Envelope) -> Envelope:
    """``env`` without the providers' control headers in its message
    (fastsend.transports.control: X-SES-*, X-SMTPAPI, X-Mailgun-*): a tenant's
    content must not steer a provider or relay."""
    from fastsend.transports import control

    data = env.data
    if isinstance(data, bytes) and (clean := control.strip(data)) is not data:
        env.data = clean
    return env


def _push(q: Any, envelopes: list[Envelope], campaign: int) -> None:
    from fastsend.transports.http import ProviderQueue  # imported by queue_for already

    if isinstance(q, ProviderQueue):
        q.push(envelopes, campaign)  # batches non-personalised mail per campaign
    else:
        q.push(envelopes)
