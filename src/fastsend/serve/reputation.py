"""Reputation in ``fastsend serve``: DNS blocklist checks of the node's source IPs and rate alarms.

NAME
    fastsend.serve.reputation -- start_reputation(ctx, charts) -> tasks.

DESCRIPTION
    With ``[reputation] blocklists`` configured, a task checks every source IP
    of the node (``[ips] source`` or the pools' addresses) every
    ``check_every`` seconds (:mod:`fastsend.analytics.dnsbl`); a new listing
    is an ``ip_listed`` event and rests the IP in its worker for the list's
    providers (:meth:`Supervisor.rest_ip`). The dashboard's IP page shows the
    last results. A second task evaluates the complaint-rate and bounce-rate
    alarms (:mod:`fastsend.analytics.alarms`) every ``ALARM_EVERY`` seconds. With
    ``[reputation.feeds]``, a third imports Postmaster Tools and SNDS on their
    schedules (:mod:`fastsend.analytics.feeds`). With warming IPs in ``[pools]``,
    a fourth moves their warm-up day by rates and feeds once a UTC day
    (:mod:`fastsend.analytics.warmup`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastsend.analytics.alarms import Alarms
from fastsend.analytics.dnsbl import Reputation, ReputationSettings, make_resolver, node_ips
from fastsend.analytics.feeds import Feeds, FeedSettings
from fastsend.analytics.warmup import EngagementWarmup
from fastsend.periodic import every

log = logging.getLogger("fastsend.serve.reputation")

ALARM_EVERY = 60.0
WARMUP_EVERY = 600.0  # judged once per UTC day per IP; this is how soon after midnight


def start_reputation(ctx: Any, charts: Any) -> list[asyncio.Task[None]]:
    tasks: list[asyncio.Task[None]] = []
    settings = ReputationSettings.from_config(ctx.config)
    if settings.blocklists:
        sup = ctx.supervisor
        ru = getattr(ctx, "rollups", None)  # its store keeps what is listed over restarts
        rep = Reputation(settings, make_resolver(ctx.config), ctx.emit,
                         sup.rest_ip if sup is not None else None,
                         ru.store if ru is not None else None,
                         sup.lift_ip if sup is not None else None)  # fmt: skip
        charts.reputation = rep
        ctx.reputation = rep
        tasks.append(asyncio.create_task(rep.loop(lambda: node_ips(ctx.config)),
                                         name="blocklists"))  # fmt: skip
    rollups = getattr(ctx, "rollups", None)
    feeds = FeedSettings.from_config(ctx.config)
    if feeds.postmaster_domains or feeds.snds_url:
        sup = ctx.supervisor

        def gauge(tenant: str, name: str, value: float) -> None:
            if rollups is not None:
                rollups.gauge(tenant, name, value)

        f = Feeds(feeds, gauge, ctx.emit, sup.rest_ip if sup is not None else None,
                  sup.lift_ip if sup is not None else None)
        ctx.feeds = f
        tasks.append(asyncio.create_task(f.loop(), name="reputation-feeds"))
    policy = ctx.config.reputation.warmup
    pools = ctx.config.pools
    warming = pools is not None and any(
        ip.warmup_start is not None or ip.warmup_day is not None
        for p in pools.pools.values()
        for ip in p.ips
    )
    if rollups is not None and policy.enabled and warming and ctx.supervisor is not None:
        feeds_now = getattr(ctx, "feeds", None)
        ew = EngagementWarmup(policy, rollups.store, ctx.config.spool_dir, ctx.emit,
                              feeds_now.verdict if feeds_now is not None else None)  # fmt: skip
        ctx.supervisor.set_warmup_offsets(ew.offsets())  # what earlier days decided

        def warmup() -> None:
            rollups.flush()
            if ew.evaluate(node_ips(ctx.config)):
                ctx.supervisor.set_warmup_offsets(ew.offsets())

        tasks.append(asyncio.create_task(every(WARMUP_EVERY, warmup, "warm-up evaluation", log),
                                         name="warmup"))  # fmt: skip
    if rollups is not None:
        alarms = Alarms(ctx.config.reputation.alarms, rollups.store, ctx.emit)

        def alarm() -> None:
            alarms.evaluate(sorted({c.tenant or "default" for c in ctx.spool.list_campaigns()}))

        tasks.append(asyncio.create_task(every(ALARM_EVERY, alarm, "alarm evaluation", log,
                                               wait_first=True), name="alarms"))  # fmt: skip
    return tasks
