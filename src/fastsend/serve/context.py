"""The serving context: what every part of ``fastsend serve`` shares.

One :class:`ServeContext` per serving process, built by :func:`open_context`
from the config: the spool (a :class:`~fastsend.spool.Spool`: SQLite or Redis),
the event log, the suppression list, the supervisor (None in tools and tests
that run without workers) and the HMAC secret for tracking links.

The contract used by the HTTP API, tracking, webhooks and the SMTP listeners:

- ``tenant_campaign(tenant)``: the tenant's "transactional" campaign id (each
  message carries its own content), created on first use;
- ``inject(campaign_id, rows)``: :meth:`fastsend.accept.Acceptor.accept`, the
  one accept path (shared with ``fastsend send``): rows of (rcpt,
  ascii_domain, vars_json) are spooled (durable when it returns their ids, in
  the order given), suppressed recipients are stored as suppressed instead of
  queued, an "accepted" (or "suppressed") event is emitted per message, and
  the supervisor is woken;
- ``emit(event)``: one event to the JSON-lines log and its listeners
  (the per-message index, webhooks).

It opens no sockets and knows nothing of HTTP or SMTP.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastsend import msgid
from fastsend.accept import Acceptor
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.queue.supervisor import Supervisor
from fastsend.serve.tenantcaps import TenantCaps
from fastsend.serve.uploads import Uploads
from fastsend.spool import IdemMark, Spool, open_spool, storage_problem
from fastsend.suppression import SuppressionList
from fastsend.tenants import Tenants

log = logging.getLogger("fastsend.serve")

TRANSACTIONAL_SPEC: dict[str, Any] = {"kind": "transactional", "defaults": {}}
TRANSACTIONAL_OPTION = "transactional_tenant"  # campaign option naming the tenant


# A campaign in one of these takes no more mail (its rows would never be sent).
ENDED_CAMPAIGN = frozenset({"cancelled", "abandoned"})

QUOTA_WINDOW = 86400.0  # s: [api] max_campaigns_per_day counts campaigns made this long ago
QUOTA_PAGE = 1000  # campaigns read at a time when a tenant's count is first taken


class CampaignQuotaExceeded(Exception):
    """A tenant made ``[api] max_campaigns_per_day`` campaigns; ``wait``: seconds
    until it may make another (Retry-After)."""

    def __init__(self, message: str, wait: int) -> None:
        super().__init__(message)
        self.wait = wait


async def campaign_pages(spool: Any, tenant: str, size: int) -> AsyncIterator[list[Any]]:
    """A tenant's campaigns (``Spool.campaigns``), ``size`` at a time, the loop
    free between pages."""
    after = 0
    while True:
        page = spool.campaigns(tenant, after=after, limit=size)
        yield page
        if len(page) < size:
            return
        after = page[-1].id
        await asyncio.sleep(0)


# KEYS[1]: a tenant's campaign creations (sorted set: member -> time); ARGV: now,
# window, cap, member, then (time, member) pairs that seed a key that does not
# exist yet (the spool's campaigns, as the node read them). -> {1, 0} counted, or
# {0, time of the creation whose leaving the window makes room}.
_QUOTA_LUA = """
local now, window, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 5, #ARGV - 1, 2 do redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n >= cap then
  local at = redis.call('ZRANGE', KEYS[1], n - cap, n - cap, 'WITHSCORES')
  return {0, at[2]}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.floor(window) + 60)
return {1, 0}
"""
ALONE_FOR = 10.0  # s a node counts on its own after the shared count failed


class CampaignQuota:
    """Campaigns a tenant makes through the API (``POST /v1/campaigns``, each new
    inline template of ``POST /v1/messages``, a transactional campaign made anew
    after the tenant cancelled the last): at most ``[api] max_campaigns_per_day``
    in any 24 hours, else 429 with Retry-After. Every campaign stays in the spool
    (its spec, up to ``max_body_bytes``, and an entry in every listing), so without a
    cap one tenant's loop of new templates grew the spool and the server's template
    index without bound. Counted per process, from the tenant's campaigns in the
    spool when it is first asked about (then this process's own); on a shared
    spool the count is the nodes' (a sorted set per tenant, ``{P}:cq:TENANT``,
    checked and added to in one Lua call, seeded once from the spool): before,
    each node allowed the cap, N nodes N times it. With Redis out of reach a node
    counts alone for a while."""

    def __init__(self, spool_of: Any = None) -> None:
        self.made: dict[str, list[float]] = {}  # tenant -> creation times in the window
        self.locks: dict[str, asyncio.Lock] = {}
        self.spool_of = spool_of  # () -> the spool (shared: the nodes' count)
        self.seeded: set[str] = set()  # tenants whose times went to the shared count
        self._alone = -ALONE_FOR  # monotonic: the last shared count that failed
        self._script: tuple[Any, Any] | None = None  # (client, registered script)

    async def seed(self, spool: Any, tenant: str, now: float) -> None:
        """Read the tenant's campaigns of the last 24 hours (once a process), a page
        at a time with the loop free between pages."""
        if tenant in self.made:
            return
        lock = self.locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            if tenant in self.made:
                return
            times: list[float] = []
            async for page in campaign_pages(spool, tenant, QUOTA_PAGE):
                times += [c.created for c in page if c.created > now - QUOTA_WINDOW]
            times.sort()
            self.made[tenant] = times
        self.locks.pop(tenant, None)

    def adopt(self, tenant: str, created: list[float], now: float) -> None:
        """The tenant's campaigns' creation times, read by another pass over its
        campaigns (``MessagesHandler.index_templates``): no second read."""
        if tenant not in self.made:
            self.made[tenant] = sorted(t for t in created if t > now - QUOTA_WINDOW)

    def take(self, tenant: str, cap: int, now: float, what: str) -> None:
        """Count one more campaign for ``tenant`` (after :meth:`seed`), or raise
        :class:`CampaignQuotaExceeded` (the API answers 429)."""
        if not cap:
            return
        times = self.made.setdefault(tenant, [])
        cut = 0
        while cut < len(times) and times[cut] <= now - QUOTA_WINDOW:
            cut += 1
        del times[:cut]
        if self._shared_take(tenant, cap, now, what, times):
            times.append(now)
            return
        if len(times) >= cap:
            wait = max(1, int(times[len(times) - cap] + QUOTA_WINDOW - now) + 1)
            raise CampaignQuotaExceeded(
                f"{what}: {len(times)} campaigns made in the last 24 hours; [api]"
                f" max_campaigns_per_day is {cap} (try again in {wait} s)", wait,
            )  # fmt: skip
        times.append(now)

    def _shared_take(
        self, tenant: str, cap: int, now: float, what: str, times: list[float]
    ) -> bool:
        """On a shared spool: count one more campaign in the nodes' count (True),
        or raise :class:`CampaignQuotaExceeded`; False: no shared count (a local
        spool, or Redis out of reach: the caller counts on this node)."""
        spool = self.spool_of() if self.spool_of is not None else None
        store = spool.shared() if spool is not None else None
        if store is None or time.monotonic() - self._alone <= ALONE_FOR:
            return False
        try:
            if self._script is None or self._script[0] is not store.client:
                self._script = (store.client, store.client.register_script(_QUOTA_LUA))
            seeds: list[object] = []
            if tenant not in self.seeded:  # what this node read from the spool
                for t in times:
                    seeds += [repr(t), f"s:{t!r}"]
            member = f"{store.node}:{time.time_ns()}:{os.getpid()}"
            ok, at = self._script[1](
                keys=[store.key("cq", tenant)],
                args=[repr(now), repr(QUOTA_WINDOW), cap, member, *seeds],
            )
            self.seeded.add(tenant)
        except Exception as e:
            self._alone = time.monotonic()
            logging.getLogger("fastsend.serve").warning(
                "campaign quota: the nodes' count is out of reach (%s); counting on this"
                " node alone for %g s", e, ALONE_FOR,
            )  # fmt: skip
            return False
        if int(ok):
            return True
        wait = max(1, int(float(at) + QUOTA_WINDOW - now) + 1)
        raise CampaignQuotaExceeded(
            f"{what}: {cap} campaigns made in the last 24 hours across the nodes; [api]"
            f" max_campaigns_per_day is {cap} (try again in {wait} s)", wait,
        )  # fmt: skip


class ServeContext:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        events: EventLog,
        suppression: Any,
        supervisor: Supervisor | None,
        secret: bytes,
        rollups: Any = None,
        reputation: Any = None,
        shared: Any = None,
        dmarc: Any = None,
        feeds: Any = None,
    ) -> None:
        self.config = config
        self.events = events
        self.supervisor = supervisor
        self.secret = secret  # HMAC key for tracking links
        # fastsend.analytics.rollup.Rollups (issue 14), None when disabled
        self.rollups = rollups
        self.tlsrpt: Any = None  # fastsend.analytics.tlsrpt.Store: TLS-RPT session counts
        # fastsend.analytics.dnsbl.Reputation, with [reputation] blocklists
        self.reputation = reputation
        # fastsend.serve.shared_state.SharedState on a shared (Redis) spool: keys,
        # suppression, webhook outbox, event index and the node registry in Redis.
        self.shared = shared
        # (message id, event) -> monotonic time told: eventindex.first_telling (local spool)
        self.told_recently: OrderedDict[tuple[int, str], float] = OrderedDict()
        # fastsend.analytics.dmarc.DmarcStore: aggregate reports from the intake
        self.dmarc = dmarc
        # fastsend.analytics.feeds.Feeds, with [reputation.feeds]
        self.feeds = feeds
        # Opens and clicks answered but not recorded, one link over [tracking]
        # link_events_per_hour (serve.tracking sets it; /metrics reads it).
        self.tracking_unrecorded = 0
        self.acceptor = Acceptor(
            spool, events, suppression, wake=self._wake,
            max_size=config.delivery.max_message_size,
        )  # fmt: skip
        # Recipient lists uploaded through the API, as durable ingest jobs.
        self.uploads = Uploads(self.acceptor, config.spool_dir)
        self._tenant_campaigns: dict[str, int] = {}
        self._tenant_lock = threading.Lock()
        self.quota = CampaignQuota(lambda: self.spool)  # [api] max_campaigns_per_day
        # [api] tenant_daily_messages / tenant_message_rate (and [tenants.NAME]'s)
        self.caps = TenantCaps(self)
        # an uploaded list's job ended here: its quota count becomes what it spooled
        self.uploads.on_done = self.caps.settle_job
        self._tenants: tuple[Config, Tenants] | None = None

    @property
    def tenants(self) -> Tenants:
        """Who may send as what, from the current config (rebuilt after a reload)."""
        if self._tenants is None or self._tenants[0] is not self.config:
            self._tenants = (self.config, Tenants.from_config(self.config))
        return self._tenants[1]

    # The acceptor holds the spool and suppression list: swapping either here
    # (metrics wrap the spool, SIGHUP reopens the list) swaps it there too.
    @property
    def spool(self) -> Spool:
        return self.acceptor.spool

    @spool.setter
    def spool(self, spool: Spool) -> None:
        self.acceptor.spool = spool

    @property
    def suppression(self) -> Any:
        return self.acceptor.suppression

    @suppression.setter
    def suppression(self, suppression: Any) -> None:
        self.acceptor.suppression = suppression

    def _wake(self) -> None:
        if self.supervisor is not None:
            self.supervisor.wake.set()

    # -- campaigns -----------------------------------------------------------

    def tenant_campaign(self, tenant: str, fresh: bool = False) -> int:
        """The id of the tenant's transactional campaign (created on demand).
        ``fresh``: the one kept is checked first: cancelled since (by the tenant,
        the operator or another node), a new one is made (mail accepted into a
        cancelled campaign was never sent nor ended: a black hole behind a 202)."""
        with self._tenant_lock:  # (a shared spool's API calls it in threads: one made)
            return self._tenant_campaign(tenant, fresh)

    def _tenant_campaign(self, tenant: str, fresh: bool) -> int:
        cid = self._tenant_campaigns.get(tenant)
        search = cid is None  # (once a process: the kept one ended, no other is read)
        if cid is not None and fresh:
            info = self.spool.get_campaign(cid)
            if info is None or info.status in ENDED_CAMPAIGN:
                del self._tenant_campaigns[tenant]
                cid = None
        if cid is not None:
            return cid
        found = self.spool.campaigns(tenant) if search else []
        if search:
            self.quota.adopt(tenant, [info.created for info in found], time.time())
        for info in found:
            if info.options.get(TRANSACTIONAL_OPTION) == tenant and (
                info.status not in ENDED_CAMPAIGN
            ):
                cid = info.id
                break
        else:
            # Made anew after a cancel: counted as any campaign the tenant makes (a
            # cancel-and-send loop made one a request, and read them all each time).
            self.quota.take(tenant, self.config.api.max_campaigns_per_day, time.time(),
                            "transactional campaign")  # fmt: skip
            cid = self.acceptor.create_campaign(
                {**TRANSACTIONAL_SPEC, "tenant": tenant},  # the worker signs by (tenant, domain)
                name=f"transactional:{tenant}",
                tenant=tenant,
                options={TRANSACTIONAL_OPTION: tenant},
            )
        self._tenant_campaigns[tenant] = cid
        return cid

    def campaign_tenant(self, campaign_id: int) -> str:
        """The tenant owning a campaign (KeyError if there is no such campaign)."""
        return self.acceptor.tenant(campaign_id)

    # -- messages ------------------------------------------------------------

    def inject(
        self, campaign_id: int, rows: list[tuple[str, str, bytes]], idem: IdemMark | None = None,
        dedup: bool = False, stowed: Any = None,
    ) -> list[int]:
        """Spool rows durably (:meth:`fastsend.accept.Acceptor.accept`; ``idem``:
        recorded under an idempotency key with them; ``stowed``: their bodies
        stored already, ``Acceptor.stow``); returns their ids in the order of
        ``rows`` (``dedup``: of the rows whose address the campaign did not have)."""
        return self.acceptor.accept(campaign_id, rows, idem=idem, dedup=dedup, stowed=stowed)

    async def inject_off(
        self, campaign_id: int, rows: list[tuple[str, str, bytes]], *, dedup: bool = False,
        stowed: Any = None, held: list[Any] | None = None,
    ) -> list[int]:  # fmt: skip
        """:meth:`inject` (``held``: the events kept there, as ``Acceptor.accept``'s),
        on a shared spool in a thread: on the loop a slow Redis held every listener
        of the node for each of the spool's calls. The events are emitted (the event
        log's listeners are the loop's) and the supervisor woken on the loop."""
        acceptor = self.acceptor
        if self.shared is None:
            if held is not None:
                return acceptor.accept(campaign_id, rows, held=held, dedup=dedup, stowed=stowed)
            return self.inject(campaign_id, rows, dedup=dedup, stowed=stowed)
        if acceptor.events.failing:  # (said here, as accept would: nothing is spooled)
            acceptor.events.flush()
        told: list[tuple[int, list[int], list[str], set[int], float]] = []
        ids: list[int] = await asyncio.to_thread(
            functools.partial(acceptor.accept, campaign_id, rows, dedup=dedup, stowed=stowed,
                              held=held if held is not None else told, wake=False)
        )  # fmt: skip
        for cid, got, rcpts, gone, now in told:
            try:
                acceptor.emit_accepted(cid, got, rcpts, gone, now)
            except OSError as e:  # spooled: their events wait in the log's buffer
                if storage_problem(e) is None:
                    raise
                log.error("the event log cannot be written (%s): the events of %d row(s)"
                          " just spooled wait in memory; no more mail is taken until it"
                          " can be", e, len(got))  # fmt: skip
            if len(gone) < len(got):
                self._wake()
        return ids

    # -- per-node files, or shared in Redis ----------------------------------

    def key_store(self) -> Any:
        """The API key store (``apikeys.db``, or the shared one on Redis)."""
        if self.shared is not None:
            return self.shared.keys()
        from fastsend.serve.auth import KeyStore

        return KeyStore.for_spool(self.config.spool_dir)

    def event_index(self) -> Any:
        """The per-message event index the API reads (``events.db``, or Redis)."""
        if self.shared is not None:  # its keys expire after [analytics] events_days
            return self.shared.index(int(self.config.analytics.events_days * 86400))
        from fastsend.serve.eventindex import EventIndex

        return EventIndex(self.config.spool_dir)

    def webhook_outbox(self) -> Any:
        """The webhook outbox (``webhooks.db``, or the shared one on Redis)."""
        if self.shared is not None:
            return self.shared.outbox()
        from fastsend.serve.webhooks import Outbox

        return Outbox(os.path.join(self.config.spool_dir, "webhooks.db"))

    def open_suppression(self) -> Any:
        """The suppression list (``suppression.db``, or per tenant in Redis)."""
        if self.shared is not None:
            return self.shared.suppression()
        return SuppressionList(os.path.join(self.config.spool_dir, "suppression.db"))

    def emit(self, event: dict[str, Any]) -> None:
        """One event to the log and its listeners (index, webhooks)."""
        event.setdefault("time", time.time())
        self.events.emit(event)

    def emit_optional(self, event: dict[str, Any]) -> bool:
        """An open or click: :meth:`emit`, unless the event log cannot be written and
        ``[tracking] held_events`` / ``held_bytes`` of them already wait for it (then
        dropped and counted: ``EventLog.emit_optional``)."""
        event.setdefault("time", time.time())
        t = self.config.tracking
        return self.events.emit_optional(event, t.held_events, t.held_bytes)

    def close(self, release: bool = True) -> None:
        """release=False: the spool is known to be out of reach: it is not
        called again (a paused Redis holds each call for the client's timeout,
        with retries); this node's claims and hold on its source IPs lapse
        with their leases."""
        self.events.close()
        if self.rollups is not None:
            self.rollups.close()
        if self.tlsrpt is not None:
            self.tlsrpt.detach(self.events)
        if self.dmarc is not None:
            self.dmarc.close()
        self.suppression.close()
        if not release:
            self.spool.abandon()
            return
        if self.shared is not None:
            self.shared.stop()  # a clean exit gives this node's source IPs back
        self.spool.close()


def open_context(config: Config, supervisor: Supervisor | None = None) -> ServeContext:
    """Open the spool (the directory, or ``[spool] url``: the shared Redis spool),
    event log and suppression list named by the config."""
    shared = None
    if config.spool_url:
        from fastsend.serve.shared_state import SharedState

        spool: Spool = open_spool(config.spool_url)
        shared = SharedState(spool)
        if not config.secret and not config.tracking.secret:
            config.secret = shared.cluster.shared_secret()  # one secret for every node
        suppression: Any = shared.suppression()
    else:
        spool = open_spool(config.spool_dir)
        suppression = SuppressionList(os.path.join(config.spool_dir, "suppression.db"))
    events = EventLog(config.event_log_path)
    ctx = ServeContext(
        config=config,
        spool=spool,
        events=events,
        suppression=suppression,
        supervisor=supervisor,
        secret=config.secret or msgid.load_secret(config),
        shared=shared,
    )
    from fastsend.analytics.attach import attach  # issue 14: rollups of every event

    ctx.rollups = attach(config, spool, events, ctx.campaign_tenant)
    from fastsend.analytics import tlsrpt

    ctx.tlsrpt = tlsrpt.attach(config, events, spool)  # the day's TLS sessions, for RFC 8460 reports
    if ctx.rollups is not None:
        from fastsend.analytics.dmarc import open_store

        ctx.dmarc = open_store(config.spool_dir, spool)  # on Redis: every node's reports
    return ctx
