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

import asyncio
import contextlib
import ipaddress
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from fastsend.serve.api import ApiError, json_response, tenant_of
from fastsend.serve.dashboard import _HEADERS
from fastsend.serve.pages import load
from fastsend.spool import AGE_BUCKETS_MIN

log = logging.getLogger("fastsend.serve.charts")

GAUGE_EVERY = 15.0
# A shared spool: each node's IP state (publish_ips) looked at every IP_STATE_CHECK
# s, written when changed and at least every IP_STATE_EVERY s; older than
# IP_STATE_STALE s it is a dead node's (ignored); at most IP_STATE_RESTS rests an IP
IP_STATE_CHECK = 1.0
IP_STATE_EVERY = 30.0
IP_STATE_STALE = 120.0
IP_STATE_RESTS = 100
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
        self.sampling: asyncio.Future[None] | None = None  # the queue gauges being read
        self.reputation: Any = None  # fastsend.analytics.dnsbl state, when configured
        self.ips_sent: dict[str, bytes] = {}  # (publish_ips) what was published last
        self.ips_refreshed = 0.0
        # (publish_ips) source IP -> (its pool's name, its warm-up), read every
        # IP_STATE_EVERY s
        self.ips_pools: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
        self.ips_published = 0.0

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
        now = time.time()
        held: dict[str, Any] | None = None  # another node's, as it published it
        shared = getattr(self.ctx, "shared", None)
        if ip not in source_ips and shared is not None:
            with contextlib.suppress(Exception):  # (Redis out of reach: this node's view)
                raw = await asyncio.to_thread(shared.ip_state_get, ip)
                got = orjson.loads(raw) if raw else None
                if isinstance(got, dict) and now - float(got.get("at", 0)) <= IP_STATE_STALE:
                    held = got
        if pool is None and ip not in source_ips and held is None:
            raise ApiError(404, "ip: not a source IP of this node (nor of a live node)")
        if not allowed:
            raise ApiError(403, "ip: not in your pool (admin tenants see every IP)")
        warm: dict[str, Any] = {"warming": False, "day": 0, "days": 0, "cap": None}
        if pool is not None and pip is not None:
            day = pip.warmup_day(now)
            days = len(pool.schedule.caps)
            warm = {"warming": 0 < day <= days, "day": day, "days": days,
                    "cap": pool.schedule.cap(day) if 0 < day <= days else None}  # fmt: skip
        elif held is not None:
            warm = held.get("warmup") or warm
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
        if held is not None:  # rests and blocklist checks: the node holding the IP's
            rests = [r for r in held.get("rests") or [] if float(r.get("until", 0)) > now]
            blocklists = held.get("blocklists") or []
        else:
            rests, blocklists = self._rests(ip, now), self._blocklists(ip)
        name = pool.name if pool is not None else held.get("pool") if held is not None else None
        return json_response(
            {"ip": ip, "pool": name, "warmup": warm,
             "providers": providers, "rests": rests, "blocklists": blocklists, "time": now,
             "node": held.get("node") if held is not None else None},
            headers={"Cache-Control": "no-store"},
        )  # fmt: skip

    def _rests(self, ip: str, now: float) -> list[dict[str, Any]]:
        return [
            {"site": site, **r} for site, r in sorted(self.rests.get(ip, {}).items())
            if r["until"] > now
        ]  # fmt: skip

    def _blocklists(self, ip: str) -> list[dict[str, Any]]:
        return self.reputation.status(ip) if self.reputation is not None else []

    def publish_ips(self, now: float) -> None:
        """A shared spool: what only this node knows of its source IPs (the sites
        resting each, its blocklist checks, its pool and warm-up day), published
        for the IP page of every node (``SharedState.ip_state_put``): a balancer
        sends the page's poll to any node, and before, a node answered 404 for
        another node's IP. Written when it changed, else every ``IP_STATE_EVERY``
        s (its ``at`` tells a live holder's from a dead one's)."""
        shared = getattr(self.ctx, "shared", None)
        if shared is None:
            return
        node = getattr(shared, "node", "")
        out: dict[str, bytes] = {}
        own = [ip for ip in getattr(self.ctx.config, "source_ips", []) or [] if ip]
        every = now - self.ips_refreshed >= IP_STATE_EVERY
        if every or self.ips_pools.keys() != set(own):  # (pools read again: a reload)
            from fastsend.shaping.pools import load_pools

            pools = load_pools(self.ctx.config, now)
            self.ips_pools = dict.fromkeys(own, (None, None))
            for pool in pools.pools.values():
                for p in pool.ips:
                    if p.ip in self.ips_pools:
                        day, days = p.warmup_day(now), len(pool.schedule.caps)
                        self.ips_pools[p.ip] = (pool.name, {
                            "warming": 0 < day <= days, "day": day, "days": days,
                            "cap": pool.schedule.cap(day) if 0 < day <= days else None})  # fmt: skip
        for ip in own:
            name, warm = self.ips_pools[ip]
            body = {"node": node, "pool": name, "warmup": warm,
                    "rests": self._rests(ip, now)[:IP_STATE_RESTS],
                    "blocklists": self._blocklists(ip)}  # fmt: skip
            key = orjson.dumps(body)
            if every or self.ips_sent.get(ip) != key:
                self.ips_sent[ip] = key
                out[ip] = orjson.dumps({**body, "at": now})
        if every:
            self.ips_refreshed = now
        if out:
            shared.ip_state_put(out)

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
        # In a thread: a year of reports is many rows (Redis: a hash a day read and
        # summed here), which held serve's loop, and every tenant's calls with it.
        got = await asyncio.to_thread(store.summary, t0, t1)
        return json_response({"from": t0, "to": t1, **got},
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
        now = time.time()
        if now - self.ips_published >= IP_STATE_CHECK:
            self.ips_published = now
            self.publish_ips(now)
        rollups = getattr(self.ctx, "rollups", None)
        if rollups is None:
            return
        rollups.maybe_flush()
        if now - self.last_gauges >= GAUGE_EVERY and (
            self.sampling is None or self.sampling.done()
        ):
            self.last_gauges = now
            self.sampling = asyncio.ensure_future(self.sample_gauges(rollups, now))

    async def sample_gauges(self, rollups: Any, now: float) -> None:
        """The queue gauges read in a thread (:meth:`read_gauges`, through
        ``Spool.reader``), given to the rollups on the loop. On the loop, the
        read held serve (its supervisor's dispatch, every request) 1.3 s every
        ``GAUGE_EVERY`` s at 100,000 pending on Redis, on every node: it reads
        every pending row. The spool out of reach: said by serve's tick."""
        try:
            gauges = await asyncio.to_thread(self._read_in_thread, now)
        except self.ctx.spool.outage_errors() as e:
            log.debug("queue gauges not sampled: %s", e)
            return
        except Exception:
            log.exception("queue gauges not sampled")
            return
        for tenant, name, value in gauges:
            rollups.gauge(tenant, name, value, now)

    def _read_in_thread(self, now: float) -> list[tuple[str, str, float]]:
        with self.ctx.spool.reader() as spool:
            return self.read_gauges(spool, now)

    def read_gauges(self, spool: Any, now: float) -> list[tuple[str, str, float]]:
        """(tenant, gauge, value) of the queue now: per tenant its pending and
        deferred messages, node-wide (``*``) the same and the oldest pending
        message's age bucket."""
        out: list[tuple[str, str, float]] = []
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
            out += [(tenant, "queue_depth", depth), (tenant, "queue_deferred", deferred)]
            node[0] += depth
            node[1] += deferred
        out += [(NODE, "queue_depth", node[0]), (NODE, "queue_deferred", node[1])]
        oldest = 0
        for _dom, buckets in spool.queue_shape(now):
            for i, n in enumerate(buckets):
                if n and i + 1 > oldest:
                    oldest = i + 1
        bounds = (0, *AGE_BUCKETS_MIN, AGE_BUCKETS_MIN[-1] * 2)
        out.append((NODE, "queue_oldest_min", bounds[oldest] if oldest else 0))
        return out


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
