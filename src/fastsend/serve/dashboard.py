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
    event index; they start empty at each server start. On a shared (Redis)
    spool each node also adds what it counted to Redis once a second (with its
    status; never a call per message) and a poll answers with every node's
    counts (``live_scope: "cluster"``): a balancer sends each poll to any node,
    which delivered only part of the tenant's mail. Redis out of reach: the
    answering node's own (``live_scope: "node"``). Counts by state come
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
from collections.abc import Callable, Iterable
from typing import Any

import orjson
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
LIVE_TTL = 0.5  # s a tenant's cluster-wide live counts read from Redis are reused
LIVE_KEEP_S = (TABLE_MIN + 2) * 60  # s a minute's counts stay in Redis (its last write)
RECENT_KEEP_S = 86400  # s a tenant's recent events stay in Redis after the last one
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


def _bump(table: dict[str, list[int]], key: str, k: int, n: int = 1) -> str:
    """Count ``n`` outcomes of kind ``k`` under ``key`` (``(other)`` once the table
    holds ``MAX_KEYS``); returns the key counted under."""
    row = table.get(key)
    if row is None:
        if len(table) >= MAX_KEYS:
            key = "(other)"
            row = table.get(key)
        if row is None:
            row = table[key] = [0, 0, 0]
    row[k] += n
    return key


def _series(counts: Callable[[int], Any], now: float) -> dict[str, Any]:
    """Per-second outcomes over the last ``SERIES_S`` s; ``counts(second)`` is
    that second's three counts (or None)."""
    end = int(now)
    start = end - SERIES_S + 1
    cols: list[list[int]] = [[], [], []]
    for s in range(start, end + 1):
        row = counts(s) or (0, 0, 0)
        for k in range(3):
            cols[k].append(row[k])
    return {"start": start, "step": 1, **dict(zip(OUTCOMES, cols, strict=True))}


def _table(minutes: Iterable[dict[str, list[int]]], label: str) -> list[dict[str, Any]]:
    """The per-minute tables summed: the ``MAX_ROWS`` keys with most outcomes."""
    acc: dict[str, list[int]] = {}
    for table in minutes:
        for key, row in table.items():
            a = acc.setdefault(key, [0, 0, 0])
            for k in range(3):
                a[k] += row[k]
    rows = sorted(acc.items(), key=lambda kv: (-sum(kv[1]), kv[0]))[:MAX_ROWS]
    return [{label: key, **dict(zip(OUTCOMES, row, strict=True))} for key, row in rows]


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

    def outcome(self, t: float, k: int, domain: str, ip: str) -> tuple[str, str] | None:
        """Count one outcome; the (domain, IP) keys it was counted under, None if
        older than the ring."""
        s = int(t)
        i = s % SERIES_S
        if self.sec_at[i] != s:
            if self.sec_at[i] > s:
                return None  # older than the ring
            self.secs[i] = [0, 0, 0]
            self.sec_at[i] = s
        self.secs[i][k] += 1
        m = s // 60
        j = m % TABLE_MIN
        if self.min_at[j] != m:
            self.mins[j] = ({}, {})
            self.min_at[j] = m
        doms, ips = self.mins[j]
        return _bump(doms, domain, k), _bump(ips, ip or "(default)", k)

    def series(self, now: float) -> dict[str, Any]:
        def counts(s: int) -> list[int] | None:
            i = s % SERIES_S
            return self.secs[i] if self.sec_at[i] == s else None

        return _series(counts, now)

    def table(self, now: float, which: int, label: str) -> list[dict[str, Any]]:
        m_now = int(now) // 60
        return _table((self.mins[j][which] for j in range(TABLE_MIN)
                       if self.min_at[j] > m_now - TABLE_MIN), label)  # fmt: skip


class _Unsent:
    """What this node counted for one tenant (or ``ALL``) since it last published
    to a shared spool's Redis (:meth:`Dashboard.publish_live`): outcomes per
    second and per minute by domain and source IP (keyed as the node's own
    rings keyed them: at most ``MAX_KEYS`` a minute), recent events."""

    __slots__ = ("mins", "recent", "secs")

    def __init__(self) -> None:
        self.secs: dict[int, list[int]] = {}
        self.mins: dict[int, tuple[dict[str, list[int]], dict[str, list[int]]]] = {}
        self.recent: list[dict[str, Any]] = []

    def outcome(self, t: float, k: int, keys: tuple[str, str]) -> None:
        s = int(t)
        row = self.secs.get(s)
        if row is None:
            row = self.secs[s] = [0, 0, 0]
        row[k] += 1
        m = self.mins.get(s // 60)
        if m is None:  # a new minute: what no answer shows any more goes (an outage)
            self.prune(t)
            m = self.mins[s // 60] = ({}, {})
        for table, key in zip(m, keys, strict=True):
            r = table.get(key)
            if r is None:
                r = table[key] = [0, 0, 0]
            r[k] += 1

    def prune(self, now: float) -> None:
        """Forget what no answer shows any more (a long Redis outage: bounded)."""
        s_old, m_old = int(now) - SERIES_S, int(now) // 60 - TABLE_MIN
        for s in [s for s in self.secs if s <= s_old]:
            del self.secs[s]
        for m in [m for m in self.mins if m <= m_old]:
            del self.mins[m]
        del self.recent[:-RECENT]

    def absorb(self, older: _Unsent) -> None:
        """Add what ``older`` counted (taken before this was started) to this."""
        for s, row in older.secs.items():
            mine = self.secs.get(s)
            if mine is None:
                self.secs[s] = row
            else:
                for k in range(3):
                    mine[k] += row[k]
        for m, tables in older.mins.items():
            cur = self.mins.get(m)
            if cur is None:
                self.mins[m] = tables
                continue
            for table, theirs in zip(cur, tables, strict=True):
                for key, row in theirs.items():
                    r = table.get(key)
                    if r is None:
                        table[key] = row
                    else:
                        for k in range(3):
                            r[k] += row[k]
        self.recent[:0] = older.recent
        del self.recent[:-RECENT]

    def fields(self) -> dict[int, dict[str, int]]:
        """Minute -> the Redis hash fields to add to (:func:`_decode_live`)."""
        out: dict[int, dict[str, int]] = {}
        for s, row in self.secs.items():
            f = out.setdefault(s // 60, {})
            for k in range(3):
                if row[k]:
                    f[f"{k}:s:{s}"] = row[k]
        for m, (doms, ips) in self.mins.items():
            f = out.setdefault(m, {})
            for which, table in (("d", doms), ("i", ips)):
                for key, row in table.items():
                    for k in range(3):
                        if row[k]:
                            f[f"{k}:{which}:{key}"] = row[k]
        return out


def _decode_live(
    hashes: list[dict[bytes, bytes]], recent: list[bytes], now: float
) -> dict[str, Any]:
    """The cluster's live view of one tenant from its minute hashes in Redis (the
    fields :meth:`_Unsent.fields` names, every node's added up) and its recent
    events (every node's, newest first)."""
    secs: dict[int, list[int]] = {}
    doms: dict[str, list[int]] = {}
    ips: dict[str, list[int]] = {}
    for h in hashes:
        for raw, v in h.items():
            name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            k_s, which, key = name.split(":", 2)
            k, n = int(k_s), int(v)
            if which == "s":
                secs.setdefault(int(key), [0, 0, 0])[k] += n
            else:
                _bump(doms if which == "d" else ips, key, k, n)
    events = []
    for raw in recent:
        with contextlib.suppress(ValueError):
            e = orjson.loads(raw)
            if isinstance(e, dict):
                events.append(e)
    events.sort(key=lambda e: -e["time"] if isinstance(e.get("time"), float | int) else 0.0)
    return {
        "series": _series(secs.get, now),
        "domains": _table([doms], "domain"),
        "source_ips": _table([ips], "source_ip"),
        "events": events[:RECENT],
    }


class Dashboard:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.live: dict[str, _Live] = {}
        self._spool_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._spool_reads: dict[str, asyncio.Task[dict[str, Any]]] = {}  # one per key at once
        self._stale = 0  # campaign events seen: a read that saw one begin is not cached
        self._ttl = SPOOL_TTL
        self.totals = [0, 0, 0]  # outcomes of this node since it started
        self.shared = getattr(ctx, "shared", None)
        # A shared spool: what this node counted, published once a second (with its
        # status) for every node's answer; what the nodes published, read per poll
        self._unsent: dict[str, _Unsent] = {}
        self._live_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._live_reads: dict[str, asyncio.Task[dict[str, Any]]] = {}
        if self.shared is not None:
            self.shared.status_source = self.node_status
            self.shared.live_source = self.publish_live
            self.shared.live_take = self.take_live
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
                keys = mine.outcome(t, k, domain, ip)
                keys_all = every.outcome(t, k, domain, ip)
                self.totals[k] += 1
                if self.shared is not None:
                    if keys is not None:
                        self._unsent_of(tenant).outcome(t, k, keys)
                    if keys_all is not None:
                        self._unsent_of(ALL).outcome(t, k, keys_all)
            rec = {f: e[f] for f in _RECENT_FIELDS if e.get(f) is not None}
            if isinstance(rec.get("text"), str):
                rec["text"] = rec["text"][:MAX_TEXT]
            mine.recent.append(rec)
            if self.shared is not None:
                self._unsent_of(tenant).recent.append(rec)

    def _unsent_of(self, tenant: str) -> _Unsent:
        u = self._unsent.get(tenant)
        if u is None:
            u = self._unsent[tenant] = _Unsent()
        elif len(u.recent) > 2 * RECENT:
            del u.recent[:-RECENT]
        return u

    # -- the cluster's live view (a shared spool) ---------------------------------

    def publish_live(self) -> None:
        """What this node counted since it last did, added to Redis for every node's
        answer (``SharedState.tick``, about once a second with the node's status:
        one MULTI/EXEC, never a call per message). Redis out of reach: kept for the
        next tick (the outage error goes to the tick), bounded by what an answer
        shows (:meth:`_Unsent.prune`)."""
        if not self._unsent or self.shared is None:
            return
        now = time.time()
        minutes: dict[str, dict[int, dict[str, int]]] = {}
        recent: dict[str, list[bytes]] = {}
        for tenant, u in self._unsent.items():
            u.prune(now)
            minutes[tenant] = u.fields()
            recent[tenant] = [orjson.dumps(r) for r in u.recent]
        self.shared.live_add(minutes, recent, LIVE_KEEP_S, RECENT_KEEP_S, RECENT)
        self._unsent.clear()

    def take_live(self) -> tuple[tuple[Any, ...], Callable[[], None]] | None:
        """What :meth:`publish_live` writes, taken (``SharedState.tick_async``
        writes it in a thread): live_add's arguments and a callable that puts what
        was taken back (Redis out of reach: added to what was counted meanwhile)."""
        if not self._unsent or self.shared is None:
            return None
        now = time.time()
        taken, self._unsent = self._unsent, {}
        minutes: dict[str, dict[int, dict[str, int]]] = {}
        recent: dict[str, list[bytes]] = {}
        for tenant, u in taken.items():
            u.prune(now)
            minutes[tenant] = u.fields()
            recent[tenant] = [orjson.dumps(r) for r in u.recent]

        def put_back() -> None:
            for tenant, u in taken.items():
                cur = self._unsent.get(tenant)
                if cur is None:
                    self._unsent[tenant] = u
                else:
                    cur.absorb(u)

        return (minutes, recent, LIVE_KEEP_S, RECENT_KEEP_S, RECENT), put_back

    async def _cluster_live(self, tenant: str, now: float) -> dict[str, Any] | None:
        """A tenant's series, tables and recent events as every node counted them
        (None: not on a shared spool, or Redis out of reach: this node's own).
        Read in a thread, shared by polls at once, kept ``LIVE_TTL`` s."""
        if self.shared is None:
            return None
        hit = self._live_cache.get(tenant)
        if hit is not None and time.monotonic() - hit[0] < LIVE_TTL:
            return hit[1]
        task = self._live_reads.get(tenant)
        if task is None or task.done():
            task = self._live_reads[tenant] = asyncio.create_task(
                self._read_live(tenant, now), name="dashboard live read"
            )
        try:
            return await asyncio.shield(task)
        except Exception as e:  # Redis out of reach: this node's own view, said so
            log.debug("dashboard: the cluster's live counts cannot be read: %s", e)
            return None

    async def _read_live(self, tenant: str, now: float) -> dict[str, Any]:
        m_now = int(now) // 60
        minutes = list(range(m_now - TABLE_MIN + 1, m_now + 1))
        assert self.shared is not None
        hashes, recent = await asyncio.to_thread(self.shared.live_read, tenant, minutes, RECENT)
        view = _decode_live(hashes, recent, now)
        self._live_cache[tenant] = (time.monotonic(), view)
        return view

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
        view = await self._spool_view(tenant)
        live = await self._cluster_live(tenant, now)
        scope = "node" if live is None else "cluster"
        if live is None:
            lv = self.live.get(tenant) or _Live()
            live = {
                "series": lv.series(now),
                "domains": lv.table(now, 0, "domain"),
                "source_ips": lv.table(now, 1, "source_ip"),
                "events": list(reversed(lv.recent)),
            }
        out = {
            "tenant": tenant,
            "admin": tenant in self.admins(),
            "time": now,
            **view,
            "series": live["series"],
            "window_min": TABLE_MIN,
            "domains": live["domains"],
            "source_ips": live["source_ips"],
            "events": live["events"],
            "live_scope": scope,
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
        live = await self._cluster_live(ALL, now)
        if live is None:
            live = {"source_ips": (self.live.get(ALL) or _Live()).table(now, 1, "source_ip")}
        return json_response(
            {
                "time": now,
                "workers": rows,
                "supervisor": sup.stats.as_dict() if sup is not None else None,
                "states": view["states"],
                "queue_depth": view["queue_depth"],
                "source_ips": live["source_ips"],
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
