"""The live web dashboard of ``fastsend serve``: a page and the JSON it polls.

NAME
    fastsend.serve.dashboard -- setup_dashboard(app, ctx): /dashboard and /v1/dashboard.

DESCRIPTION
    ``GET /dashboard``             one self-contained page (``static/dashboard.html``)
    ``GET /dashboard/app.js``      its script, ``/dashboard/app.css`` its styles,
                                   ``/dashboard/common.js`` what its scripts
                                   share (the key's storage, the one fetch
                                   that sends it, DOM building by textContent);
                                   no inline script or style, nothing from
                                   elsewhere: a strict Content-Security-Policy
                                   (``default-src 'none'``; scripts, styles and
                                   fetches from this origin only) on them all.
    ``GET /v1/dashboard``          the key's tenant, live: messages per second
                                   (delivered / deferred / bounced, one value
                                   per second over ``SERIES_S``), counts by
                                   state and queue depth of the tenant's
                                   messages, its campaigns with progress, per
                                   destination domain and per source IP tables
                                   (last ``TABLE_MIN`` minutes), recent events.
    ``GET /v1/dashboard/workers``  what spans tenants: worker processes (alive,
                                   restarts, connections, in flight),
                                   supervisor totals, all tenants' source IPs
                                   and spool counts; on a shared (Redis)
                                   spool ``cluster``: every live node (its
                                   IPs, lease age, rates, workers) and the
                                   cluster's totals, whichever node answers
                                   (each publishes its status about once a
                                   second: ``ClusterNode.publish``). Only for
                                   tenants named in
                                   ``[dashboard] admin_tenants`` (API keys
                                   carry no admin flag); 403 for the others.

    The page asks for an API key, keeps it in ``sessionStorage`` only and
    sends it as ``Authorization: Bearer`` on ``fetch`` calls, polling about
    once a second. Polling rather than Server-Sent Events: ``EventSource``
    cannot set request headers, so the key would have to travel in the URL
    (logs, history) or a cookie (CSRF, a second auth path); two small GETs
    a second per open page cost nothing here. Pause and resume call the
    existing ``POST /v1/campaigns/{id}/pause|resume``.

    Rates, tables and recent events come from an :class:`~fastsend.events.EventLog`
    listener that bumps in-memory counters (a few dict operations per event,
    as :mod:`fastsend.serve.metrics` does), so a poll costs no scan of the
    event index; they start empty at each server start. Counts by state come
    from the spool with one grouped query per tenant, made in a thread (never
    on the event loop: :meth:`Spool.reader`), cached for at least
    ``SPOOL_TTL`` seconds (longer when the query is slow on a big spool).

DELIBERATELY NOT HERE
    No writes besides what the existing API does, no key handling of its own
    (the /v1 middleware of :mod:`fastsend.serve.api` authenticates), no
    history beyond the process's memory (Prometheus and the event log are
    the records).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from fastsend.serve.api import ApiError, api_of, json_response, tenant_of
from fastsend.serve.pages import load
from fastsend.spool import DEFERRED, INFLIGHT, QUEUED, STATE_NAMES

__all__ = ["setup_dashboard"]

log = logging.getLogger("fastsend.serve.dashboard")

SERIES_S = 300  # seconds of per-second rates
TABLE_MIN = 15  # minutes summed by the domain and source-IP tables
MAX_KEYS = 500  # distinct domains (or IPs) per minute and tenant; the rest is "(other)"
MAX_ROWS = 50  # rows per table in an answer
RECENT = 40  # recent events kept per tenant
MAX_TEXT = 300  # characters of a reply text in a recent event
SPOOL_TTL = 1.0
RATE_S = 10  # seconds a node's published rates average over
ALL = "*"  # the all-tenant aggregate (not a valid tenant name: fastsend.serve.auth)
OUTCOMES = ("delivered", "deferred", "bounced")
_KIND = {name: i for i, name in enumerate(OUTCOMES)}
_PENDING = (QUEUED, INFLIGHT, DEFERRED)
_RECENT_FIELDS = ("time", "event", "id", "campaign", "rcpt", "code", "enhanced", "text",
                  "source_ip", "mx", "method")  # fmt: skip

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store, max-age=0",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_FILES = {
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/app.js": ("app.js", "text/javascript"),
    "/dashboard/common.js": ("common.js", "text/javascript"),
    "/dashboard/app.css": ("app.css", "text/css"),
}


def _bump(table: dict[str, list[int]], key: str, k: int) -> None:
    row = table.get(key)
    if row is None:
        if len(table) >= MAX_KEYS:
            key = "(other)"
            row = table.get(key)
        if row is None:
            row = table[key] = [0, 0, 0]
    row[k] += 1


class _Live:
    """One tenant's (or all tenants') recent outcomes, in fixed-size rings."""

    __slots__ = ("min_at", "mins", "recent", "sec_at", "secs")

    def __init__(self) -> None:
        self.secs = [[0, 0, 0] for _ in range(SERIES_S)]
        self.sec_at = [-1] * SERIES_S
        self.mins: list[tuple[dict[str, list[int]], dict[str, list[int]]]] = [
            ({}, {}) for _ in range(TABLE_MIN)
        ]
        self.min_at = [-1] * TABLE_MIN
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)

    def outcome(self, t: float, k: int, domain: str, ip: str) -> None:
        s = int(t)
        i = s % SERIES_S
        if self.sec_at[i] != s:
            if self.sec_at[i] > s:
                return  # older than the ring
            self.secs[i] = [0, 0, 0]
            self.sec_at[i] = s
        self.secs[i][k] += 1
        m = s // 60
        j = m % TABLE_MIN
        if self.min_at[j] != m:
            self.mins[j] = ({}, {})
            self.min_at[j] = m
        doms, ips = self.mins[j]
        _bump(doms, domain, k)
        _bump(ips, ip or "(default)", k)

    def series(self, now: float) -> dict[str, Any]:
        end = int(now)
        start = end - SERIES_S + 1
        cols: list[list[int]] = [[], [], []]
        for s in range(start, end + 1):
            i = s % SERIES_S
            row = self.secs[i] if self.sec_at[i] == s else (0, 0, 0)
            for k in range(3):
                cols[k].append(row[k])
        return {"start": start, "step": 1, **dict(zip(OUTCOMES, cols, strict=True))}

    def table(self, now: float, which: int, label: str) -> list[dict[str, Any]]:
        m_now = int(now) // 60
        acc: dict[str, list[int]] = {}
        for j in range(TABLE_MIN):
            if self.min_at[j] > m_now - TABLE_MIN:
                for key, row in self.mins[j][which].items():
                    a = acc.setdefault(key, [0, 0, 0])
                    for k in range(3):
                        a[k] += row[k]
        rows = sorted(acc.items(), key=lambda kv: (-sum(kv[1]), kv[0]))[:MAX_ROWS]
        return [{label: key, **dict(zip(OUTCOMES, row, strict=True))} for key, row in rows]


class Dashboard:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.live: dict[str, _Live] = {}
        self._spool_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._spool_reads: dict[str, asyncio.Task[dict[str, Any]]] = {}  # one per key at once
        self._stale = 0  # campaign events seen: a read that saw one begin is not cached
        self._ttl = SPOOL_TTL
        self.totals = [0, 0, 0]  # outcomes of this node since it started
        if getattr(ctx, "shared", None) is not None:
            ctx.shared.status_source = self.node_status
        self.files = {path: (load(name), ctype) for path, (name, ctype) in _FILES.items()}

    # -- the event listener (every event this process emits) -------------------

    def _live(self, tenant: str) -> _Live:
        lv = self.live.get(tenant)
        if lv is None:
            lv = self.live[tenant] = _Live()
        return lv

    def listener(self, events: list[dict[str, Any]]) -> None:
        try:
            self._listen(events)
        except Exception:  # never let the dashboard break the event log
            log.exception("dashboard: event not counted")

    def _listen(self, events: list[dict[str, Any]]) -> None:
        every = self._live(ALL)
        for e in events:
            tenant = e.get("tenant")
            if not isinstance(tenant, str):
                cid = e.get("campaign")
                if not isinstance(cid, int):
                    continue
                try:
                    tenant = self.ctx.campaign_tenant(cid)
                except KeyError:
                    continue
            mine = self._live(tenant)
            name = e.get("event")
            if isinstance(name, str) and name.startswith("campaign_"):
                self._spool_cache.pop(tenant, None)  # paused, resumed, ...: show it at once
                self._spool_cache.pop(ALL, None)
                self._stale += 1
            k = _KIND.get(name)  # type: ignore[arg-type]
            if k is not None:
                t = e.get("time")
                t = t if isinstance(t, float | int) else time.time()
                rcpt = e.get("rcpt")
                domain = rcpt.rpartition("@")[2].lower() if isinstance(rcpt, str) else ""
                ip = str(e.get("source_ip") or "")
                mine.outcome(t, k, domain, ip)
                every.outcome(t, k, domain, ip)
                self.totals[k] += 1
            rec = {f: e[f] for f in _RECENT_FIELDS if e.get(f) is not None}
            if isinstance(rec.get("text"), str):
                rec["text"] = rec["text"][:MAX_TEXT]
            mine.recent.append(rec)

    # -- spool queries (cached) -------------------------------------------------

    async def _spool_view(self, tenant: str | None) -> dict[str, Any]:
        """Counts by state, queue depth and campaigns of a tenant (None: all), as
        made last if younger than the TTL, else made again in a thread: they read
        every pending row (pending per domain), on the loop a poll held serve
        0.86 s on a Redis spool at 200,000 pending (0.12 s on SQLite). Polls at
        once share one read."""
        key = ALL if tenant is None else tenant
        hit = self._spool_cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        task = self._spool_reads.get(key)
        if task is None or task.done():
            task = self._spool_reads[key] = asyncio.create_task(self._refresh_view(key, tenant))
        try:
            return await asyncio.shield(task)
        except Exception as e:  # Redis out of reach, a disk error: the last view, if any
            if hit is not None:
                return hit[1]
            raise ApiError(503, "the spool cannot be read now; try again shortly") from e

    async def _refresh_view(self, key: str, tenant: str | None) -> dict[str, Any]:
        stale = self._stale
        start = time.monotonic()
        view = await asyncio.to_thread(self._read_view, tenant)
        took = time.monotonic() - start
        self._ttl = max(SPOOL_TTL, 5 * took)  # a slow spool is asked less often
        if stale == self._stale:  # (not if a campaign changed during the read)
            self._spool_cache[key] = (time.monotonic(), view)
        return view

    def _read_view(self, tenant: str | None) -> dict[str, Any]:
        """:meth:`_spool_view`'s read (a thread's), through :meth:`Spool.reader`."""
        with self.ctx.spool.reader() as spool:
            return self._make_view(spool, tenant)

    def _make_view(self, spool: Any, tenant: str | None) -> dict[str, Any]:
        camps = spool.campaigns(tenant)
        if tenant is not None:  # (being created, or abandoned by its request: not the tenant's)
            camps = [c for c in camps if c.status not in ("staging", "abandoned")]
        ids = None if tenant is None else [c.id for c in camps]
        per = spool.counts_by_campaign(ids) if camps else {}
        domains = [
            {"domain": d, "pending": n} for d, n in spool.pending_domains(ids, MAX_ROWS)
        ] if camps else []  # fmt: skip
        states = dict.fromkeys(STATE_NAMES.values(), 0)
        campaigns = []
        for c in sorted(camps, key=lambda c: -c.id):
            counts = per.get(c.id) or dict.fromkeys(STATE_NAMES.values(), 0)
            for s, n in counts.items():
                states[s] = states.get(s, 0) + n
            total = sum(counts.values())
            done = sum(counts[s] for s in ("delivered", "bounced", "suppressed", "expired",
                                           "cancelled"))  # fmt: skip
            campaigns.append({
                "id": c.id, "name": c.name, "status": c.status, "reason": c.reason,
                "kind": c.spec.get("kind", "template"), "counts": counts, "total": total,
                "progress": round(done / total, 4) if total else 0.0,
            })  # fmt: skip
        view = {
            "states": states,
            "queue_depth": sum(states[STATE_NAMES[s]] for s in _PENDING),
            "campaigns": campaigns[:MAX_ROWS],
            "pending_by_domain": domains,
        }
        return view

    def node_status(self) -> dict[str, Any]:
        """What this node publishes for the cluster view: outcomes per second over
        the last ``RATE_S`` whole seconds, totals since start, its workers."""
        lv = self.live.get(ALL) or _Live()
        end = int(time.time()) - 1
        acc = [0, 0, 0]
        for sec in range(end - RATE_S + 1, end + 1):
            i = sec % SERIES_S
            if lv.sec_at[i] == sec:
                for k in range(3):
                    acc[k] += lv.secs[i][k]
        sup = self.ctx.supervisor
        slots = sup.slots if sup is not None else []
        return {
            "rates": {o: round(acc[k] / RATE_S, 2) for k, o in enumerate(OUTCOMES)},
            "totals": {
                **dict(zip(OUTCOMES, self.totals, strict=True)),
                "inflight": sum(len(x.inflight) for x in slots),
            },
            "workers": {"count": len(slots), "alive": sum(1 for x in slots if x.alive)},
        }

    def admins(self) -> frozenset[str]:
        return frozenset(self.ctx.config.dashboard.admin_tenants)

    # -- handlers ---------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        body, ctype = self.files[request.path]
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers=_HEADERS)

    async def snapshot(self, request: web.Request) -> web.Response:
        tenant = tenant_of(request)
        now = time.time()
        lv = self.live.get(tenant) or _Live()
        view = await self._spool_view(tenant)
        out = {
            "tenant": tenant,
            "admin": tenant in self.admins(),
            "time": now,
            **view,
            "series": lv.series(now),
            "window_min": TABLE_MIN,
            "domains": lv.table(now, 0, "domain"),
            "source_ips": lv.table(now, 1, "source_ip"),
            "events": list(reversed(lv.recent)),
        }
        return json_response(out, headers={"Cache-Control": "no-store"})

    async def workers(self, request: web.Request) -> web.Response:
        if tenant_of(request) not in self.admins():
            raise ApiError(403, "worker status spans tenants: only for [dashboard] admin_tenants")
        sup = api_of(request).ctx.supervisor
        shared = getattr(api_of(request).ctx, "shared", None)
        now = time.time()
        rows = []
        for s in sup.slots if sup is not None else []:
            # (a reload's retiring worker's counted in: totals do not drop)
            c = sup.worker_counters(s.index, ("connections_open", "ready_queue")) if sup else {}
            rows.append({
                "index": s.index, "pid": s.pid, "alive": s.alive, "restarts": s.restarts,
                "ips": list(s.ips), "inflight": len(s.inflight),
                "connections_open": int(c.get("connections_open", 0)),
                "connections_opened": int(c.get("connections_opened", 0)),
                "connections_failed": int(c.get("connections_failed", 0)),
                "ready_queue": int(c.get("ready_queue", 0)),
            })  # fmt: skip
        view = await self._spool_view(None)
        cluster = None
        if shared is not None:  # (a Redis read: in a thread; none while Redis is out)
            with contextlib.suppress(Exception):
                cluster = await asyncio.to_thread(shared.cluster_view)
        lv = self.live.get(ALL) or _Live()
        return json_response(
            {
                "time": now,
                "workers": rows,
                "supervisor": sup.stats.as_dict() if sup is not None else None,
                "states": view["states"],
                "queue_depth": view["queue_depth"],
                "source_ips": lv.table(now, 1, "source_ip"),
                "cluster": cluster,
            },
            headers={"Cache-Control": "no-store"},
        )


def setup_dashboard(app: web.Application, ctx: Any) -> None:
    """Add /dashboard (page, script, styles) and /v1/dashboard[/workers] to ``app``."""
    d = Dashboard(ctx)
    ctx.events.listeners.append(d.listener)
    for path in _FILES:
        app.router.add_get(path, d.static)
    app.router.add_get("/v1/dashboard", d.snapshot)
    app.router.add_get("/v1/dashboard/workers", d.workers)
