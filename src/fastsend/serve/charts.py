"""Dashboard pages over the rollups: charts, a campaign page and a source-IP page.

NAME
    fastsend.serve.charts -- setup_charts(app, ctx), Charts.

DESCRIPTION
    ``GET /dashboard/charts.js``          the chart script (canvas, no library)
    ``GET /dashboard/campaign/{id}``      the campaign page (``static/campaign.html``)
    ``GET /dashboard/ip/{ip}``            the source-IP page (``static/ip.html``)
    ``GET /v1/dmarc?from=-30d``           DMARC aggregate reports (admin tenants):
                                          per reporter and source IP, aligned or not
    ``GET /v1/dashboard/ip/{ip}``         what the IP page shows besides charts:
                                          pool, warm-up day and cap, sent today per
                                          provider (node-wide rollups), sites resting
                                          the IP, DNS blocklist status.

    Pages carry the dashboard's strict CSP and headers; every figure over time
    comes from ``GET /v1/stats`` (tenant-scoped). The IP answer is for tenants
    whose pool holds the IP and for ``[dashboard] admin_tenants``.

    The server's tick calls :meth:`Charts.tick`: the rollups' flush (about once
    a second) and, every ``GAUGE_EVERY`` seconds, the queue gauges (per tenant:
    pending and deferred messages; node-wide under tenant "*": the same and
    the oldest pending message's age bucket, in minutes). A listener on the
    supervisor's shaping events keeps which sites rest or suspend each IP.

DELIBERATELY NOT HERE
    No counting (fastsend.analytics.rollup) and no writes to the spool.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from aiohttp import web

from fastsend.serve.api import ApiError, json_response, tenant_of
from fastsend.serve.dashboard import _HEADERS
from fastsend.serve.pages import load
from fastsend.spool import AGE_BUCKETS_MIN

log = logging.getLogger("fastsend.serve.charts")

GAUGE_EVERY = 15.0
NODE = "*"
MAX_RESTS = 500
_PAGES = {"campaign": "campaign.html", "ip": "ip.html"}


class Charts:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.files = {name: load(f) for name, f in _PAGES.items()}
        self.script = load("charts.js")
        self.rests: dict[str, dict[str, dict[str, Any]]] = {}  # ip -> site -> rest
        self.last_gauges = 0.0
        self.reputation: Any = None  # fastsend.analytics.dnsbl state, when configured

    # -- pages -------------------------------------------------------------------

    async def script_js(self, request: web.Request) -> web.Response:
        return web.Response(body=self.script, content_type="text/javascript", charset="utf-8",
                            headers=_HEADERS)  # fmt: skip

    async def page(self, request: web.Request) -> web.Response:
        which = "campaign" if request.path.startswith("/dashboard/campaign/") else "ip"
        return web.Response(body=self.files[which], content_type="text/html", charset="utf-8",
                            headers=_HEADERS)  # fmt: skip

    # -- the IP answer -----------------------------------------------------------

    def _admins(self) -> frozenset[str]:
        return frozenset(self.ctx.config.dashboard.admin_tenants)

    def _pool_of(self, ip: str, tenant: str) -> tuple[Any, Any, bool]:
        """(pool, PoolIP, allowed) for an IP, or (None, None, admin) if in no pool."""
        from fastsend.shaping.pools import load_pools

        pools = load_pools(self.ctx.config, time.time())  # no [pools]: one of [ips] source
        admin = tenant in self._admins()
        mine = pools.pool_for(tenant=tenant)
        for name, pool in pools.pools.items():
            for p in pool.ips:
                if p.ip == ip:
                    return pool, p, admin or name == mine
        return None, None, admin

    async def ip_info(self, request: web.Request) -> web.Response:
        raw = request.match_info["ip"]
        try:
            ip = str(ipaddress.ip_address(raw))
        except ValueError:
            raise ApiError(400, "ip: not an IP address", "ip") from None
        tenant = tenant_of(request)
        pool, pip, allowed = self._pool_of(ip, tenant)
        source_ips = set(getattr(self.ctx.config, "source_ips", []) or [])
        if pool is None and ip not in source_ips:
            raise ApiError(404, "ip: not one of this node's source IPs")
        if not allowed:
            raise ApiError(403, "ip: not in your pool (admin tenants see every IP)")
        now = time.time()
        warm: dict[str, Any] = {"warming": False, "day": 0, "days": 0, "cap": None}
        if pool is not None and pip is not None:
            day = pip.warmup_day(now)
            days = len(pool.schedule.caps)
            warm = {"warming": 0 < day <= days, "day": day, "days": days,
                    "cap": pool.schedule.cap(day) if 0 < day <= days else None}  # fmt: skip
        providers = []
        rollups = getattr(self.ctx, "rollups", None)
        if rollups is not None:
            rollups.flush()
            today = int(now) - int(now) % 86400
            rows = rollups.store.aggregate(86400, today, today + 86400, NODE,
                                           {"source_ip": [ip]}, ["provider"], False)  # fmt: skip
            from fastsend.analytics.store import IDX

            for (prov,), row in sorted(rows):
                sent = row[IDX["delivered"]] + row[IDX["bounced"]] + row[IDX["deferred"]]
                providers.append({"provider": prov, "sent_today": sent})
        rests = [
            {"site": site, **r} for site, r in sorted(self.rests.get(ip, {}).items())
            if r["until"] > now
        ]  # fmt: skip
        blocklists = self.reputation.status(ip) if self.reputation is not None else []
        return json_response(
            {"ip": ip, "pool": pool.name if pool is not None else None, "warmup": warm,
             "providers": providers, "rests": rests, "blocklists": blocklists, "time": now},
            headers={"Cache-Control": "no-store"},
        )  # fmt: skip

    async def dmarc(self, request: web.Request) -> web.Response:
        """DMARC aggregate reports: where mail claiming the node's domains came from.
        Reports are per sending domain, across tenants: admin tenants only."""
        if tenant_of(request) not in self._admins():
            raise ApiError(403, "DMARC reports span tenants: only for [dashboard] admin_tenants")
        store = getattr(self.ctx, "dmarc", None)
        if store is None:
            raise ApiError(404, "analytics are disabled")
        from fastsend.analytics.query import QueryError, parse_time

        now = time.time()
        try:
            t0 = parse_time(request.query.get("from", "-30d"), "from", now)
            t1 = parse_time(request.query.get("to", "now"), "to", now) + 1
        except QueryError as e:
            raise ApiError(400, str(e), e.field) from None
        return json_response({"from": t0, "to": t1, **store.summary(t0, t1)},
                             headers={"Cache-Control": "no-store"})  # fmt: skip

    # -- listeners and the tick ----------------------------------------------------

    def shaping_listener(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            if e.get("event") != "shaping":
                continue
            ip = str(e.get("source_ip") or "")
            site = str(e.get("site") or e.get("provider") or "")
            action = e.get("action")
            if action in ("rest", "suspend"):
                sites = self.rests.setdefault(ip, {})
                if len(sites) < MAX_RESTS:
                    t = float(e.get("time") or time.time())
                    sites[site] = {"action": action, "until": t + float(e.get("duration") or 0),
                                   "reason": str(e.get("reason") or "")[:300],
                                   "provider": e.get("provider")}  # fmt: skip
            elif action == "resume":
                self.rests.get(ip, {}).pop(site, None)

    def tick(self) -> None:
        rollups = getattr(self.ctx, "rollups", None)
        if rollups is None:
            return
        rollups.maybe_flush()
        now = time.time()
        if now - self.last_gauges >= GAUGE_EVERY:
            self.last_gauges = now
            try:
                self.sample_gauges(rollups, now)
            except self.ctx.spool.outage_errors():
                raise  # serve's tick says once that the spool is out of reach
            except Exception:
                log.exception("queue gauges not sampled")

    def sample_gauges(self, rollups: Any, now: float) -> None:
        spool = self.ctx.spool
        per: dict[str, list[int]] = {}
        for c in spool.list_campaigns():
            if c.status in ("cancelled", "abandoned"):
                continue
            n = spool.counts(c.id)
            acc = per.setdefault(c.tenant or "default", [0, 0])
            acc[0] += n.get("queued", 0) + n.get("inflight", 0) + n.get("deferred", 0)
            acc[1] += n.get("deferred", 0)
        node = [0, 0]
        for tenant, (depth, deferred) in per.items():
            rollups.gauge(tenant, "queue_depth", depth, now)
            rollups.gauge(tenant, "queue_deferred", deferred, now)
            node[0] += depth
            node[1] += deferred
        rollups.gauge(NODE, "queue_depth", node[0], now)
        rollups.gauge(NODE, "queue_deferred", node[1], now)
        oldest = 0
        for _dom, buckets in spool.queue_shape(now):
            for i, n in enumerate(buckets):
                if n and i + 1 > oldest:
                    oldest = i + 1
        if oldest:
            bounds = (0, *AGE_BUCKETS_MIN, AGE_BUCKETS_MIN[-1] * 2)
            rollups.gauge(NODE, "queue_oldest_min", bounds[oldest], now)
        else:
            rollups.gauge(NODE, "queue_oldest_min", 0, now)


def setup_charts(app: web.Application, ctx: Any) -> Charts:
    """Add the chart script, the campaign and IP pages and /v1/dashboard/ip/{ip}."""
    c = Charts(ctx)
    app.router.add_get("/dashboard/charts.js", c.script_js)
    app.router.add_get("/dashboard/campaign/{id:[0-9]{1,19}}", c.page)
    app.router.add_get("/dashboard/ip/{ip:[0-9a-fA-F:.]{2,45}}", c.page)
    app.router.add_get("/v1/dashboard/ip/{ip}", c.ip_info)
    app.router.add_get("/v1/dmarc", c.dmarc)
    sup = getattr(ctx, "supervisor", None)
    if sup is not None:
        sup.shaping.listeners.append(c.shaping_listener)
    return c
