"""Retention: serve's hourly pass over the stores that would otherwise only grow.

NAME
    fastsend.serve.retention -- prune_once(ctx, now), start_retention(ctx) -> task.

DESCRIPTION
    Once at start and then every ``RETENTION_EVERY`` seconds, in a thread (never
    on the event loop; each store is written in short transactions, so the API,
    the intake and the webhook senders wait at most one of them):

    - the per-message event index (``events.db``, GET /v1/messages/ID, /v1/events):
      events older than ``[analytics] events_days`` (30), and the tags and metadata
      of messages older than every event left. On a Redis spool the index's keys
      expire by themselves after ``events_days``.
    - DMARC aggregate reports (``dmarc.db``): days before ``[analytics] dmarc_days``
      (400: a year against the last); a report is remembered (counted once) while
      its day or its arrival is inside the window.
    - the webhook outbox (``webhooks.db``, or the shared one): events older than
      ``[webhooks] retention_days`` (7) that a URL never acknowledged are past their
      retry window and dropped, with a warning per URL naming how many it will never
      get (and ``fastsend_webhook_events_expired_total``). Nothing younger is ever
      dropped, whatever the endpoint answers; acknowledged events leave at once.

    - the rollups (``rollups.db``): buckets past ``[analytics] minute_days`` (8),
      ``hour_days`` (120), ``day_days`` (800); serve's rollups leave this to the
      pass (``Rollups.prune_elsewhere``), a ``send`` run prunes at its end. On a
      Redis spool their keys expire.

    The JSON-lines
    event log is the operator's (logrotate with ``copytruncate``, or SIGHUP after
    moving it: serve reopens it). ``0`` days keeps a store for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from fastsend.periodic import every

log = logging.getLogger("fastsend.serve.retention")

RETENTION_EVERY = 3600.0
DAY = 86400.0


def prune_once(ctx: Any, now: float | None = None) -> dict[str, int]:
    """One pass over the stores (blocking: run it in a thread). What was removed:
    ``events``, ``dmarc`` rows, ``webhooks`` events dropped unsent."""
    now = time.time() if now is None else now
    cfg = ctx.config
    a = cfg.analytics
    done: dict[str, int] = {}
    if a.events_days > 0 and getattr(ctx, "shared", None) is None:
        path = os.path.join(cfg.spool_dir, "events.db")
        if os.path.exists(path):
            from fastsend.serve.eventindex import EventIndex

            index = EventIndex(cfg.spool_dir)  # a connection of this thread's own
            try:
                done["events"] = index.prune(now - a.events_days * DAY)
            finally:
                index.close()
    rollups = getattr(ctx, "rollups", None)
    if rollups is not None and getattr(ctx, "shared", None) is None:  # Redis keys expire
        from fastsend.analytics.store import SQLiteRollupStore

        store = SQLiteRollupStore(cfg.spool_dir)  # a connection of this thread's own
        try:
            done["rollups"] = store.prune(now, a.retention)
        finally:
            store.close()
    dmarc = getattr(ctx, "dmarc", None)
    if a.dmarc_days > 0 and dmarc is not None:
        done["dmarc"] = dmarc.prune(now - a.dmarc_days * DAY)
    w = cfg.webhooks
    if w.retention_days > 0:
        shared = getattr(ctx, "shared", None) is not None
        if shared or os.path.exists(os.path.join(cfg.spool_dir, "webhooks.db")):
            from fastsend.serve.webhooks import safe_url

            outbox = ctx.webhook_outbox()
            try:
                with contextlib.ExitStack() as stack:
                    lost = outbox.expire(now - w.retention_days * DAY, _sent_count(ctx, stack))
            finally:
                outbox.close()
            for url, n in sorted(lost.items()):
                log.warning(
                    "webhook %s: %d event(s) older than %g days were never accepted;"
                    " dropped from the outbox ([webhooks] retention_days)",
                    safe_url(url), n, w.retention_days,
                )  # fmt: skip
            done["webhooks"] = sum(lost.values())
            ctx.webhook_expired = getattr(ctx, "webhook_expired", 0) + done["webhooks"]
    return done


def _sent_count(
    ctx: Any, stack: contextlib.ExitStack
) -> Callable[[str], Callable[[list[tuple[int, bytes]]], int] | None]:
    """For the outbox's expiry: how many of a run of rows each URL would have been
    sent (a tenant's URL its tenant's events of its types; others every row). Before,
    a tenant's URL down past retention_days was said to lose every event of the
    window, the other tenants' too (and counted so in
    ``fastsend_webhook_events_expired_total``). Campaigns' owners are read through a
    reader of this thread's own (opened on the first, closed with ``stack``)."""
    from fastsend.serve.webhooks import WebhookConfig, rows_for
    from fastsend.suppression import DEFAULT_TENANT

    config = WebhookConfig.of(ctx.config.webhooks, getattr(ctx.config, "tenants", None))
    known: dict[int, str | None] = {}
    views: list[Any] = []

    def owner_of(campaign: int) -> str:
        if not views:
            views.append(stack.enter_context(ctx.spool.reader()))
        info = views[0].get_campaign(campaign)
        if info is None:
            raise KeyError(campaign)
        return str(info.tenant or DEFAULT_TENANT)

    def sent(url: str) -> Callable[[list[tuple[int, bytes]]], int] | None:
        if not config.filtered(url):
            return None
        return lambda rows: len(rows_for(config, url, rows, owner_of, known))

    return sent


def start_retention(ctx: Any) -> asyncio.Task[None]:
    """The pass at start, then every ``RETENTION_EVERY`` seconds, off the loop."""

    if getattr(ctx, "rollups", None) is not None:
        ctx.rollups.prune_elsewhere = True  # here, off the loop, instead of on the tick

    async def step() -> None:
        done = await asyncio.to_thread(prune_once, ctx)
        if any(done.values()):
            log.info("retention: %s", ", ".join(f"{k} {v}" for k, v in sorted(done.items())))

    return asyncio.create_task(every(RETENTION_EVERY, step, "retention pass", log),
                               name="retention")  # fmt: skip
