"""Wiring: a :class:`~fastsend.analytics.rollup.Rollups` on a spool's event log.

``attach(config, spool, events)`` opens the rollup store beside the spool
(:func:`~fastsend.analytics.stores.open_store`), builds the listener with the
shaping policy's provider matching and the spool's campaign tenants, and
appends it to ``events.listeners``. The caller flushes it on its tick
(``maybe_flush``) and closes it after the event log's last flush. ``None``
when ``[analytics] enabled = false``.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from fastsend.analytics.rollup import Rollups, policy_provider
from fastsend.analytics.stores import open_store
from fastsend.config import Config
from fastsend.events import EventLog

log = logging.getLogger("fastsend.analytics")


def attach(
    config: Config,
    spool: Any,
    events: EventLog,
    tenant_of: Any = None,
    *,
    engagement: bool = True,
) -> Rollups | None:
    """``engagement=False``: no open, click or complaint event can reach this
    process (a `send`/`resume`/`demo` run: no tracking, no intake), so the
    deliveries are not remembered for them (``remember_messages`` = 0: no
    per-message work or memory)."""
    settings = config.analytics
    if not settings.enabled:
        return None
    if not engagement:  # a copy: the config's own section stays as loaded
        settings = msgspec.structs.replace(settings, remember_messages=0)

    def spool_tenant(cid: int) -> str:
        info = spool.get_campaign(cid)
        if info is None:
            raise KeyError(cid)
        return info.tenant or "default"

    store = open_store(spool, config.spool_dir)
    r = Rollups(
        store,
        tenant_of=tenant_of or spool_tenant,
        provider_of=policy_provider(config),
        settings=settings,
    )
    events.listen(r.listener, rows=r.rows)
    try:  # what a killed run counted in its log but never flushed
        r.catch_up(events)
    except Exception:
        log.exception("analytics: catching up on the event log failed")
    return r
