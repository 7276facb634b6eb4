"""The serving context: what every part of ``fastsend serve`` shares.

One :class:`ServeContext` per serving process, built by :func:`open_context`
from the config: the spool (the one writer of ``spool.db`` in this process),
the event log, the suppression list, the supervisor (None in tools and tests
that run without workers) and the HMAC secret for tracking links.

The contract used by the HTTP API, tracking, webhooks and the SMTP listeners:

- ``tenant_campaign(tenant)``: the tenant's "transactional" campaign id (each
  message carries its own content), created on first use;
- ``inject(campaign_id, rows)``: rows of (rcpt, ascii_domain, vars_json) are
  spooled (durable when it returns their ids, in the order given), suppressed
  recipients are stored as suppressed instead of queued, an "accepted" (or
  "suppressed") event is emitted per message, and the supervisor is woken;
- ``emit(event)``: one event to the JSON-lines log and its listeners
  (the per-message index, webhooks).

It opens no sockets and knows nothing of HTTP or SMTP.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastsend import msgid
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.queue.supervisor import Supervisor
from fastsend.spool import QUEUED, SUPPRESSED
from fastsend.spool.sqlite import SQLiteSpool
from fastsend.suppression import DEFAULT_TENANT, SuppressionList

TRANSACTIONAL_SPEC: dict[str, Any] = {"kind": "transactional", "defaults": {}}
TRANSACTIONAL_OPTION = "transactional_tenant"  # campaign option naming the tenant


@dataclass
class ServeContext:
    config: Config
    spool: SQLiteSpool
    events: EventLog
    suppression: SuppressionList
    supervisor: Supervisor | None
    secret: bytes  # HMAC key for tracking links
    rollups: Any = None  # fastsend.analytics.rollup.Rollups (issue 14), None when disabled
    reputation: Any = None  # fastsend.analytics.dnsbl.Reputation, with [reputation] blocklists
    # fastsend.serve.shared_state.SharedState on a shared (Redis) spool: keys,
    # suppression, webhook outbox, event index and the node registry in Redis.
    shared: Any = None
    dmarc: Any = None  # fastsend.analytics.dmarc.DmarcStore: aggregate reports from the intake
    feeds: Any = None  # fastsend.analytics.feeds.Feeds, with [reputation.feeds]
    _tenant_campaigns: dict[str, int] = field(default_factory=dict, repr=False)
    _campaign_tenants: dict[int, str] = field(default_factory=dict, repr=False)

    # -- campaigns -----------------------------------------------------------

    def tenant_campaign(self, tenant: str) -> int:
        """The id of the tenant's transactional campaign (created on demand)."""
        cid = self._tenant_campaigns.get(tenant)
        if cid is not None:
            return cid
        for info in self.spool.list_campaigns():
            if info.options.get(TRANSACTIONAL_OPTION) == tenant and info.status != "cancelled":
                cid = info.id
                break
        else:
            cid = self.spool.create_campaign(
                {**TRANSACTIONAL_SPEC, "tenant": tenant},  # the worker signs by (tenant, domain)
                name=f"transactional:{tenant}",
                tenant=tenant,
                options={TRANSACTIONAL_OPTION: tenant},
            )
        self._tenant_campaigns[tenant] = cid
        self._campaign_tenants[cid] = tenant
        return cid

    def campaign_tenant(self, campaign_id: int) -> str:
        """The tenant owning a campaign (KeyError if there is no such campaign)."""
        t = self._campaign_tenants.get(campaign_id)
        if t is None:
            info = self.spool.get_campaign(campaign_id)
            if info is None:
                raise KeyError(campaign_id)
            t = self._campaign_tenants[campaign_id] = info.tenant or DEFAULT_TENANT
        return t

    # -- messages ------------------------------------------------------------

    def inject(self, campaign_id: int, rows: list[tuple[str, str, bytes]]) -> list[int]:
        """Spool rows durably; returns their ids in the order of ``rows``."""
        if not rows:
            return []
        now = time.time()
        tenant = self.campaign_tenant(campaign_id)
        hits = self.suppression.contains_many([r[0] for r in rows], tenant=tenant)
        if hits:
            keep = [i for i, r in enumerate(rows) if r[0] not in hits]
            gone = [i for i, r in enumerate(rows) if r[0] in hits]
            ids = [0] * len(rows)
            with_ids = self.spool.add_messages(campaign_id, [rows[i] for i in keep], now)
            for i, mid in zip(keep, with_ids, strict=True):
                ids[i] = mid
            gone_ids = self.spool.add_messages(
                campaign_id, [rows[i] for i in gone], now, state=SUPPRESSED
            )
            for i, mid in zip(gone, gone_ids, strict=True):
                ids[i] = mid
            suppressed = set(gone_ids)
        else:
            ids = self.spool.add_messages(campaign_id, rows, now, state=QUEUED)
            suppressed = set()
        evs = [
            {
                "time": now,
                "event": "suppressed" if mid in suppressed else "accepted",
                "id": mid,
                "campaign": campaign_id,
                "tenant": tenant,
                "rcpt": r[0],
            }
            for mid, r in zip(ids, rows, strict=True)
        ]
        self.events.emit_many(evs)
        self.events.flush()
        if self.supervisor is not None and len(suppressed) < len(ids):
            self.supervisor.wake.set()
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
        if self.shared is not None:
            return self.shared.index()
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

    def close(self) -> None:
        self.events.close()
        if self.rollups is not None:
            self.rollups.close()
        if self.dmarc is not None:
            self.dmarc.close()
        self.suppression.close()
        if self.shared is not None:
            self.shared.stop()  # a clean exit gives this node's source IPs back
        self.spool.close()


def open_context(config: Config, supervisor: Supervisor | None = None) -> ServeContext:
    """Open the spool (the directory, or ``[spool] url``: the shared Redis spool),
    event log and suppression list named by the config."""
    shared = None
    if config.spool_url:
        from fastsend.serve.shared_state import SharedState
        from fastsend.spool import open_spool

        spool: Any = open_spool(config.spool_url)
        shared = SharedState(spool)
        tracking = config.raw.get("tracking", {})
        if not config.secret and not (isinstance(tracking, dict) and tracking.get("secret")):
            config.secret = shared.cluster.shared_secret()  # one secret for every node
        suppression: Any = shared.suppression()
    else:
        spool = SQLiteSpool(config.spool_dir)
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
    if ctx.rollups is not None:
        from fastsend.analytics.dmarc import DmarcStore

        ctx.dmarc = DmarcStore(config.spool_dir)
    return ctx
