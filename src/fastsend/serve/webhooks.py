"""Webhooks: events posted in signed batches from a durable outbox, retried with backoff.

NAME
    fastsend.serve.webhooks -- WebhookDispatcher(ctx), Outbox, sign_payload.

CONFIG
    [webhooks]
    urls = ["https://hooks.example.com/fastsend"]   # each gets every event, in order
    secret = "whsec-..."            # or secret_file = "/etc/fastsend/webhook.key"
    batch_size = 100                # events per POST (a JSON array)
    events = ["bounced", "complained"]   # optional filter; default: every event
    [webhooks.url_events]           # a URL's own event types (unset: events)
    "https://ops.example.com/alerts" = ["ip_listed", "alarm", "alarm_cleared"]
    timeout = 10                    # seconds per POST
    retry_min = 1                   # first retry delay, doubling (with jitter) ...
    retry_max = 300                 # ... up to this many seconds between attempts
    retention_days = 7              # the retry window: older unsent events are dropped

DESCRIPTION
    The dispatcher adds a listener to ``ctx.events`` (the event log). Events
    it receives are kept in memory for at most ``flush_interval`` (0.2 s) and
    then appended, in one transaction per batch, to the outbox: SQLite
    ``<spool dir>/webhooks.db`` (WAL, synchronous=FULL). One sender task per
    URL reads the outbox past that URL's cursor, POSTs up to ``batch_size``
    events, and advances the cursor only on a 2xx answer; rows every URL has
    acknowledged are deleted. Each write also keeps how far into the event log
    its events go (``EventLog.mark``, table ``marks``): a run killed with kill -9
    (or a power loss) dies with up to ``flush_interval`` of events in memory that
    its event log has, and the next start appends those from the log
    (``_catch_up``, before any URL new to the outbox takes its place: they were
    the old URLs'), once each and in order; a clean stop drops the mark. A
    failed outbox write (a full disk) keeps the events buffered, in order, said
    once per outage. On a shared (Redis) spool the outbox is the
    spool's, shared by every node, and the outcomes' events do not wait in
    memory: the supervisor appends them in the same Lua call that records the
    outcomes (``Spool.record_outcomes``), so a node killed with kill -9 loses
    no event of an outcome it recorded; the other events (the API's, tracking's,
    the intake's) are buffered as above, and a node's mark is kept in the shared
    outbox (``P:wh:marks``, per host and event log), so its next start appends
    what its kill -9 left in memory. Anything else (connection refused, timeout,
    3xx/4xx/5xx) is retried after ``retry_min * 2**n`` seconds (capped at
    ``retry_max``, +-20 % jitter; longer when the answer's ``Retry-After`` asks,
    up to ``retry_max``; a 413, the receiver's body limit, halves the URL's batch
    at once instead, doubled again after ``GROW_AFTER`` batches taken up to
    ``batch_size``, and an event it refuses alone is passed, logged and counted)
    for ``retention_days``: an endpoint that is
    down for a day loses nothing, and a restart resumes from the cursors. Past
    that window serve's retention pass (:mod:`fastsend.serve.retention`) drops
    the events a URL never took, says how many per URL and counts them
    (``fastsend_webhook_events_expired_total``): an endpoint gone for good no
    longer grows the outbox for ever (0 days: keep them for ever). Delivery is
    at least once, in order per URL: a batch whose 2xx was lost is sent again,
    so receivers deduplicate by ``event_id``. On a shared outbox one node at a
    time sends to a URL (a lease, renewed while it POSTs and while it waits
    before a retry: the URL's backoff and Retry-After hold whichever node sends).
    An outbox out of reach (Redis restarting, a full disk) is said once per URL
    and tried again every ``OUTBOX_RETRY`` s.

    Each event in the array is the event-log record (``event``, ``time``,
    ``id`` = message id, ``rcpt``, ...) plus ``event_id``, the outbox sequence
    number (increasing, unique per installation).

SIGNATURE (the scheme Stripe uses)
    Header ``Fastsend-Signature: t=<unix seconds>,v1=<hex>`` where hex is
    HMAC-SHA256(secret, "<t>.<raw body>"). A receiver recomputes it over the
    raw body, compares in constant time, and refuses a t older than a few
    minutes (replay)::

        t, v1 = (kv.split("=", 1)[1] for kv in header.split(","))
        good = hmac.compare_digest(
            hmac.new(secret, f"{t}.".encode() + body, "sha256").hexdigest(), v1)
        fresh = abs(time.time() - int(t)) < 300

    ``Fastsend-Batch: <first event_id>-<last event_id>`` names the batch.

TENANTS' URLS
    ``[tenants.NAME] webhook_urls`` (the operator's config: no tenant can make the
    server post anywhere) share the outbox and the sending above, each with its
    cursor; its sender POSTs only the events of its tenant (``tenant_of``: the
    campaign's owner, else the tenant an event names; the node's own events, as
    ``ip_listed``, never) and moves the cursor past the others without a POST;
    signed with that tenant's ``webhook_secret``, of the event types its
    ``webhook_events`` names (unset: ``[webhooks] events``; the outbox keeps what any
    URL gets, each URL's sender skips the rest). ``fastsend_webhook_pending`` counts
    what a URL will be sent (``WebhookDispatcher.pending``: a filtered URL's rows
    read once each, counts kept per run of rows).

    A tenant's URL may not reach inside the operator's network (fastsend.netguard):
    an address host that is not public is refused when the config loads, and each
    connection to a tenant's URL is opened on an address checked first
    (:meth:`WebhookDispatcher._tenant_socket`, the socket factory of the tenants'
    session): a name whose DNS answer is, or turns into, loopback/private/link-local
    (rebinding) fails as a refused connection, said in the log and retried.
    ``[webhooks] allow_private`` names networks allowed all the same. The operator's
    ``[webhooks] urls`` are its trusted config: a session of their own, unchecked.
    Both sessions look receivers' names up in threads of their own (:class:`_Lookups`,
    one lookup at a time per name), never in the event loop's default executor, which
    a name whose DNS never answers would fill.

DELIBERATELY NOT HERE
    No endpoints a tenant sets through the API, no dead-letter store (an expired event is in the
    event log and GET /v1/events), no redirects followed, no secrets in logs (a URL is logged as
    its scheme, host and port and a digest of it: paths hold secrets too).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import random
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver

from fastsend import netguard
from fastsend.config.serve import WebhookSettings
from fastsend.events import legacy_mark_key, mark_key, read_back
from fastsend.sqlitedb import connect, transaction

__all__ = ["Outbox", "WebhookConfig", "WebhookDispatcher", "safe_url", "sign_payload"]

log = logging.getLogger("fastsend.webhooks")


# How an outbox counts the rows a URL would be sent (Outbox.expire): per URL, a
# function of a run of rows, or None (every row).
SentCount = Callable[[str], Callable[[list[tuple[int, bytes]]], int] | None]


def _redis_error() -> type[Exception]:
    """redis-py's RedisError, once something loaded redis-py (a Redis outbox);
    else no Redis call was made: sqlite3.Error stands in. Importing redis-py
    here costs every serve start ~0.1 s."""
    mod = sys.modules.get("redis.exceptions")
    return mod.RedisError if mod is not None else sqlite3.Error
GROW_AFTER = 8  # batches a URL takes at a 413's smaller size before it is doubled
OUTBOX_RETRY = 1.0  # s between a sender's tries of an outbox out of reach
SIGNATURE_HEADER = "Fastsend-Signature"
CATCH_UP_MAX = 100_000  # events a start appends from the event log, at most
BATCH_HEADER = "Fastsend-Batch"
BACKLOG_RUN = 1000  # outbox rows /metrics reads at a time for a URL's backlog


class RefusedAddress(OSError):
    """A tenant's webhook connection to an address it may not reach (fastsend.netguard)."""


LOOKUP_THREADS = 64  # the receivers' names looked up at once, at most (one each)


class _Lookups(AbstractResolver):
    """The receivers' names looked up (getaddrinfo) in threads of the webhooks' own, one
    lookup at a time per name: a POST tried while its name's lookup still runs waits
    for that one. aiohttp's own resolver uses the event loop's default executor, the
    threads of everything else serve does off the loop (an API body decoded, SMTP
    AUTH's password hash, /metrics' and the dashboard's spool reads): a name whose
    DNS never answers held one of them for the resolver's whole timeout (10-30 s),
    again at each retry, and 6 such names filled it (6 threads on 2 cores)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="webhook-dns")
        self._running: dict[tuple[str, int, int], asyncio.Future[Any]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        key = (host, port, int(family))
        fut = self._running.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(
                self._pool, _getaddrinfo, host, port, family
            )
            self._running[key] = fut
            fut.add_done_callback(lambda f: self._done(key, f))
        infos = await asyncio.shield(fut)  # (a POST timing out leaves it running)
        out = []
        for fam, _type, proto, _name, address in infos:
            addr = str(address[0])
            if fam == socket.AF_INET6 and len(address) > 3 and address[3]:
                addr = f"{addr}%{address[3]}"  # a link-local address's scope
            out.append({"hostname": host, "host": addr, "port": int(address[1]),
                        "family": fam, "proto": proto,
                        "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})  # fmt: skip
        if not out:
            raise OSError(f"no address for {host}")
        return out

    def _done(self, key: tuple[str, int, int], fut: asyncio.Future[Any]) -> None:
        if self._running.get(key) is fut:
            del self._running[key]
        if not fut.cancelled():
            fut.exception()  # (retrieved: every POST waiting for it may have gone)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _getaddrinfo(host: str, port: int, family: int) -> list[Any]:
    return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)


def sign_payload(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Fastsend-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


@dataclass
class WebhookConfig:
    urls: list[str] = field(default_factory=list)
    secret: bytes = b""
    batch_size: int = 100
    events: frozenset[str] | None = None
    timeout: float = 10.0
    retry_min: float = 1.0
    retry_max: float = 300.0
    flush_interval: float = 0.2
    # [tenants.NAME] webhook_urls: such a URL -> its tenant (it gets that tenant's
    # events only) and -> the tenant's own secret.
    owners: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)
    # The event types a URL gets, where they are not ``events`` (what the outbox
    # keeps: then every URL's, together): [webhooks] events for the operator's
    # URLs, a tenant's ``webhook_events`` for its own.
    url_events: dict[str, frozenset[str] | None] = field(default_factory=dict)
    # [webhooks] allow_private: the non-public networks tenants' URLs may reach.
    allow: netguard.Networks = ()

    def filtered(self, url: str) -> bool:
        """``url`` gets less than the whole outbox: a tenant's, or event types of its own."""
        return url in self.owners or url in self.url_events

    @classmethod
    def of(cls, t: WebhookSettings, tenants: dict[str, Any] | None = None) -> WebhookConfig:
        """From ``[webhooks]`` and the tenants' ``webhook_urls`` (typed and checked,
        secret files read, a URL one receiver's, when the config loaded)."""
        owners: dict[str, str] = {}
        secrets: dict[str, bytes] = {}
        ops = frozenset(t.events) if t.events is not None else None
        own = getattr(t, "url_events", {})
        url_events: dict[str, frozenset[str] | None] = {
            u: frozenset(own[u]) if u in own else ops for u in t.url_list
        }
        for name, table in (tenants or {}).items():
            mine = getattr(table, "webhook_events", None)
            for u in table.webhook_urls:
                owners[u] = name
                secrets[u] = table.webhook_secret.encode()
                url_events[u] = frozenset(mine) if mine is not None else ops
        union: frozenset[str] | None = frozenset()
        for ev in url_events.values():
            union = None if ev is None or union is None else union | ev
        return cls(
            urls=t.url_list + [u for u in owners if u not in t.url_list],
            owners=owners,
            secrets=secrets,
            url_events={u: e for u, e in url_events.items() if e != union},
            secret=t.secret.encode(),
            batch_size=t.batch_size,
            events=union if url_events else ops,
            timeout=t.timeout,
            retry_min=t.retry_min,
            retry_max=t.retry_max,
            flush_interval=t.flush_interval,
            allow=netguard.networks(getattr(t, "allow_private", [])),
        )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: cursors stay valid
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    url TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (          -- how far into each event log the events go
    log TEXT PRIMARY KEY,
    mark TEXT NOT NULL
);
"""


class Outbox:
    """``webhooks.db``: events not yet acknowledged by every URL, and a cursor per URL."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = connect(path, synchronous="FULL", schema=_SCHEMA)

    def set_urls(self, urls: list[str]) -> None:
        """Register ``urls`` (a new one starts at the current end), forget others."""
        with transaction(self.db):
            end = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
            start = int(end[0]) if end else 0
            for u in urls:
                self.db.execute(
                    "INSERT OR IGNORE INTO cursors(url, last_id) VALUES (?, ?)", (u, start)
                )
            marks = ",".join("?" * len(urls))
            self.db.execute(f"DELETE FROM cursors WHERE url NOT IN ({marks})", urls)
        self.prune()

    def append(self, bodies: list[bytes], marks: dict[str, str] | None = None) -> None:
        """Durably add event bodies (JSON objects), in order, in one transaction, with
        how far into the event log named by each key of ``marks`` they go."""
        if bodies or marks:
            with transaction(self.db):
                self.db.executemany("INSERT INTO events(body) VALUES (?)", [(b,) for b in bodies])
                for k, v in (marks or {}).items():
                    if v:
                        self.db.execute("INSERT OR REPLACE INTO marks(log, mark) VALUES (?, ?)",
                                        (k, v))  # fmt: skip
                    else:  # a clean stop: nothing of that log is missing
                        self.db.execute("DELETE FROM marks WHERE log=?", (k,))

    def marks(self) -> dict[str, str]:
        """{event log: mark}: how far into each event log the outbox holds its events."""
        return {str(k): str(v) for k, v in self.db.execute("SELECT log, mark FROM marks")}

    def fetch(self, url: str, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (id, body) rows past ``url``'s cursor, oldest first."""
        rows = self.db.execute(
            "SELECT id, body FROM events WHERE id > (SELECT last_id FROM cursors WHERE url=?)"
            " ORDER BY id LIMIT ?",
            (url, limit),
        ).fetchall()
        return [(int(i), bytes(b)) for i, b in rows]

    def ack(self, url: str, last_id: int) -> None:
        """``url`` answered 2xx for everything up to ``last_id``."""
        self.db.execute(
            "UPDATE cursors SET last_id=? WHERE url=? AND last_id<?", (last_id, url, last_id)
        )
        self.prune()

    def prune(self) -> None:
        """Delete rows every URL has acknowledged."""
        self.db.execute(
            "DELETE FROM events WHERE id <= (SELECT COALESCE(MIN(last_id), 0) FROM cursors)"
            " AND EXISTS (SELECT 1 FROM cursors)"
        )

    def expire(self, before: float, sent: SentCount | None = None) -> dict[str, int]:
        """Drop events older than ``before`` that some URL never acknowledged (``[webhooks]
        retention_days``: past the retry window): {url: events it will never get}.
        ``sent(url)``: how to count the rows that URL would have been sent (a tenant's
        URL, its own event types: :func:`rows_for`), None: every row."""
        cut = expired_until(self.fetch_all, before)
        if cut is None:
            return {}
        with transaction(self.db):
            lost = {}
            for u, last in self.db.execute("SELECT url, last_id FROM cursors").fetchall():
                count = sent(str(u)) if sent is not None else None
                if count is None:
                    lost[str(u)] = int(self.db.execute(
                        "SELECT COUNT(*) FROM events WHERE id > ? AND id <= ?", (last, cut)
                    ).fetchone()[0])  # fmt: skip
                else:
                    lost[str(u)] = count_until(self.fetch_all, int(last), cut, count)
            self.db.execute("DELETE FROM events WHERE id <= ?", (cut,))
        return {u: n for u, n in lost.items() if n}

    def fetch_all(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (id, body) rows with an id past ``after``, oldest first."""
        rows = self.db.execute(
            "SELECT id, body FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        return [(int(i), bytes(b)) for i, b in rows]

    def pending(self, url: str | None = None) -> int:
        if url is None:
            return int(self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        return int(
            self.db.execute(
                "SELECT COUNT(*) FROM events WHERE id > (SELECT last_id FROM cursors WHERE url=?)",
                (url,),
            ).fetchone()[0]
        )

    def close(self) -> None:
        self.db.close()


class WebhookDispatcher:
    """Moves events from the event log to the outbox and from the outbox to the URLs."""

    def __init__(self, ctx: Any, config: WebhookConfig | None = None) -> None:
        self.ctx = ctx
        self.config = (
            config if config is not None
            else WebhookConfig.of(ctx.config.webhooks, getattr(ctx.config, "tenants", None))
        )  # fmt: skip
        self.outbox: Outbox | None = None
        self.stats = {"posted": 0, "failed": 0, "events": 0, "too_large": 0}
        self._pending: list[bytes] = []
        # How far into the event log the events buffered (and written) go: kept with
        # them in the outbox, so the next start sends what a killed run had only in
        # memory (``_catch_up``). An outbox without marks (the shared one) has none.
        self._mark: str | None = None
        self._mark_key = ""
        self._mark_written: str | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._flush_wake = asyncio.Event()
        self._send_wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []  # the flusher
        self._senders: dict[str, asyncio.Task[None]] = {}  # one per URL
        self._session: aiohttp.ClientSession | None = None
        # Tenants' URLs go through a session of their own whose every socket is
        # checked on the address it connects to (:meth:`_tenant_socket`).
        self._tenant_session: aiohttp.ClientSession | None = None
        self._lookups: _Lookups | None = None  # both sessions' name lookups
        self._stopping = False
        self._backlogs: dict[str, _Backlog] = {}  # pending(): what a URL's rows held

    @property
    def enabled(self) -> bool:
        return bool(self.config.urls)

    async def start(self) -> None:
        """Open the outbox, listen to the event log, start one sender per URL."""
        if not self.enabled:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        opener = getattr(self.ctx, "webhook_outbox", None)
        self.outbox = (
            opener() if opener else Outbox(os.path.join(self.ctx.config.spool_dir, "webhooks.db"))
        )
        # What a killed run had logged but not written to the outbox, then the URLs
        # (a URL new to the outbox starts after those events: they were not its).
        self._catch_up()
        self.outbox.set_urls(self.config.urls)
        self._lookups = _Lookups()
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "fastsend-webhooks/1"},
            connector=aiohttp.TCPConnector(resolver=self._lookups),
        )
        self._tenant_session = self._new_tenant_session()
        self.ctx.events.listeners.append(self._on_events)
        sup = getattr(self.ctx, "supervisor", None)
        if getattr(self.outbox, "written_with_outcomes", False) and sup is not None:
            # The shared outbox is the spool's: the supervisor appends the events
            # of its outcomes in the same atomic step as the outcomes.
            sup.outbox_filter = self._wanted
        self._tasks.append(asyncio.create_task(self._flusher()))
        for url in self.config.urls:
            self._start_sender(url)

    def _new_tenant_session(self) -> aiohttp.ClientSession:
        assert self._lookups is not None
        return aiohttp.ClientSession(
            headers={"User-Agent": "fastsend-webhooks/1"},
            connector=aiohttp.TCPConnector(
                socket_factory=self._tenant_socket, resolver=self._lookups
            ),
        )

    def _tenant_socket(self, addr_info: Any) -> socket.socket:
        """The socket of a connection to a tenant's URL, once its address (the one it
        will connect to: no later DNS answer can change it) is public or in ``[webhooks]
        allow_private``; else :class:`RefusedAddress`, the POST failing as a refused
        connection does (retried, said in the log)."""
        family, type_, proto, _, sockaddr = addr_info
        if netguard.refused(str(sockaddr[0]), self.config.allow):
            raise RefusedAddress(
                errno.EACCES, f"{sockaddr[0]} is " + netguard.describe("[webhooks] allow_private")
            )
        return socket.socket(family=family, type=type_, proto=proto)

    def _start_sender(self, url: str) -> None:
        self._send_wake[url] = asyncio.Event()
        self._senders[url] = asyncio.create_task(self._sender(url), name="webhook sender")

    async def reconfigure(self, config: WebhookConfig) -> None:
        """SIGHUP: the new ``[webhooks]`` (URLs, secret, events, timeout, batch size,
        retry delays) from now on, without a restart and without missing an event
        (the listener stays): a URL no longer listed stops and its cursor goes, a new
        one starts at the outbox's end, as at a start. Before, a reload kept the old
        URLs and secret until the next start, and said nothing (a rotated secret:
        every batch refused by the receiver meanwhile)."""
        if self.outbox is None or not config.urls:
            await self.stop()
            self.config = config
            await self.start()
            return
        gone = [u for u in self.config.urls if u not in config.urls]
        narrowed = any(n not in config.allow for n in self.config.allow)
        self.config = config
        if narrowed and self._tenant_session is not None:
            # Its kept-alive connections were checked against the old allow_private
            # (a receiver posted to every few seconds keeps one for ever): a new
            # session, whose connections are checked anew.
            old, self._tenant_session = self._tenant_session, self._new_tenant_session()
            await old.close()
        for url in gone:
            task = self._senders.pop(url, None)
            self._send_wake.pop(url, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.outbox.set_urls(config.urls)
        for url in config.urls:
            if url not in self._senders:
                self._start_sender(url)

    async def stop(self) -> None:
        """Stop listening, write what is buffered to the outbox, stop senders."""
        if self.outbox is None:
            return
        self._stopping = True
        with contextlib.suppress(ValueError):
            self.ctx.events.listeners.remove(self._on_events)
        sup = getattr(self.ctx, "supervisor", None)
        if sup is not None and getattr(sup, "outbox_filter", None) == self._wanted:
            sup.outbox_filter = None
        tasks = [*self._tasks, *self._senders.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        self._senders.clear()
        self._send_wake.clear()
        try:
            self._flush(final=True)
        except (sqlite3.Error, OSError, _redis_error()) as e:
            log.error("webhook outbox write failed at stop: %s; %d event(s) not written%s", e,
                      len(self._pending), " (the next start sends them from the event log)"
                      if self._mark_key else "")  # fmt: skip
        for session in (self._session, self._tenant_session):
            if session is not None:
                await session.close()
        self._session = self._tenant_session = None
        if self._lookups is not None:
            await self._lookups.close()
            self._lookups = None
        self.outbox.close()
        self.outbox = None

    # -- event log -> outbox ----------------------------------------------------
    def _wanted(self, e: dict[str, Any]) -> bool:
        wanted = self.config.events
        return wanted is None or e.get("event") in wanted

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        """EventLog listener: buffer (cheap); the flusher writes within flush_interval.
        An event with an ``event_id`` is in the outbox already (written with its
        outcome by the supervisor on a shared spool)."""
        wanted = self.config.events
        dumps = orjson.dumps
        bodies = [
            dumps(e)
            for e in events
            if (wanted is None or e.get("event") in wanted) and "event_id" not in e
        ]
        if len(bodies) < len(events):
            # Written by this node's supervisor with its outcomes (a shared outbox):
            # counted as those the flusher writes (fastsend_webhook_events_total left
            # them out, most of a Redis node's events).
            self.stats["events"] += sum(1 for e in events if "event_id" in e)
        mark = self.ctx.events.mark() if self._mark_key else None
        if not bodies and mark is None:
            return
        with self._lock:
            self._pending.extend(bodies)
            if mark is not None:  # listeners are told in the log's order: the latest
                self._mark = mark  # (a smaller offset after a copytruncate, EventLog.flush)
        if threading.get_ident() == self._loop_thread:
            self._flush_wake.set()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._flush_wake.set)

    def _flush(self, final: bool = False) -> None:
        """Write the buffered events to the outbox (with the event log's mark); a
        failed write keeps them buffered, in order, for the next one. ``final``: a
        clean stop, after which nothing of the log is missing (the mark goes)."""
        with self._lock:
            bodies, self._pending = self._pending, []
            mark = self._mark
        if self.outbox is None:
            return
        marks: dict[str, str] | None = None
        if self._mark_key and (final or (mark is not None and mark != self._mark_written)):
            marks = {self._mark_key: "" if final else str(mark)}
        if not bodies and not marks:
            return
        try:
            if marks:
                self.outbox.append(bodies, marks)
            else:
                self.outbox.append(bodies)
        except BaseException:
            with self._lock:
                self._pending[:0] = bodies
            raise
        if marks:
            self._mark_written = mark
        if bodies:
            self.stats["events"] += len(bodies)
            for ev in self._send_wake.values():
                ev.set()

    def _catch_up(self) -> int:
        """Append to the outbox the events the event log holds past the outbox's mark
        for it: a run killed (kill -9, a power loss) before its buffer reached the
        outbox logged them but never sent them. Events appended. Events older than
        ``[webhooks] retention_days`` (past the retry window) are not."""
        events = self.ctx.events
        marks_of = getattr(self.outbox, "marks", None)
        path = getattr(events, "path", None)
        if marks_of is None or not path or self.outbox is None:
            return 0
        mine = events.catch_up_mark("webhooks")
        if mine is None:
            return 0
        key = mark_key(path)
        marks = marks_of()
        kept = marks.get(key, "")
        legacy = legacy_mark_key(path)
        old = marks.get(legacy, "") if legacy != key else ""
        if not kept and old:
            # Kept by a version before the node's id (events.legacy_mark_key): a kill
            # -9 just before the upgrade left its last events under that key; before,
            # the first start after it found no mark and never sent them.
            kept = old
        bodies: list[bytes] = []
        days = getattr(self.ctx.config.webhooks, "retention_days", 0) or 0
        oldest = time.time() - days * 86400 if days else 0.0
        if kept:
            try:
                for batch in read_back(path, kept, mine):
                    if len(bodies) >= CATCH_UP_MAX:
                        log.warning("webhooks: more than %d events of %s past the outbox's mark"
                                    " (another process's run on this spool?): the rest are not"
                                    " sent", CATCH_UP_MAX, path)  # fmt: skip
                        break
                    for ev in batch:
                        t = ev.get("time")
                        if oldest and isinstance(t, int | float) and t < oldest:
                            continue
                        if self._wanted(ev) and "event_id" not in ev:
                            bodies.append(orjson.dumps(ev))
            except OSError as e:
                log.error("webhooks: the event log cannot be read back (%s)", e)
                bodies = []
        # (the old key forgotten with it: a clean stop deletes the new one, and the
        # start after must not read the old mark again)
        self.outbox.append(bodies, {key: mine, legacy: ""} if old else {key: mine})
        self._mark_key, self._mark, self._mark_written = key, mine, mine
        if bodies:
            self.stats["events"] += len(bodies)
            log.warning("webhooks: %d event(s) of %s the last run logged but never put in the"
                        " outbox (it stopped without writing them) are sent now", len(bodies),
                        path)  # fmt: skip
        return len(bodies)

    async def _flusher(self) -> None:
        outage = False
        while True:
            await self._flush_wake.wait()
            await asyncio.sleep(self.config.flush_interval)  # gather a batch
            self._flush_wake.clear()
            try:
                self._flush()
            except (sqlite3.Error, OSError, _redis_error()) as e:
                # The events stay buffered, in order; said once per outage, not per try.
                if not outage:
                    log.error("webhook outbox write failed: %s; the events are kept and"
                              " written once it can be", e)  # fmt: skip
                outage = True
                self._flush_wake.set()
            else:
                if outage:
                    log.warning("webhook outbox written again (the events kept meanwhile"
                                " included)")  # fmt: skip
                outage = False

    # -- outbox -> URLs ---------------------------------------------------------
    async def _sender(self, url: str) -> None:
        wake = self._send_wake[url]
        failures = 0
        hold = getattr(self.outbox, "hold", None)  # shared outbox: one node sends per URL
        smaller = 0  # the batch size a 413 (body too large) left for this URL (0: none)
        taken = 0  # batches taken at that size since (GROW_AFTER: it is doubled)
        outage = False
        while True:
            try:
                assert self.outbox is not None
                c = self.config  # (a reload may change it)
                if hold is not None and not hold(url):
                    await asyncio.sleep(1.0)  # another node sends to it; take over if it dies
                    continue
                rows = self.outbox.fetch(url, min(c.batch_size, smaller or c.batch_size))
                if outage:
                    log.warning("webhook %s: the outbox answers again", safe_url(url))
                    outage = False
                if rows and self._filtered(url):  # a tenant's URL, a URL's own event types
                    mine = self._for_url(url, rows)
                    if not mine:  # none of them for it: past them, the loop
                        self.outbox.ack(url, rows[-1][0])  # given up between batches
                        await asyncio.sleep(0)
                        continue
                    last = rows[-1][0]
                    rows = mine
                else:
                    last = rows[-1][0] if rows else 0
                if not rows:
                    wake.clear()
                    if hold is None:
                        await wake.wait()
                    else:  # other nodes append too: look again soon (and renew the hold)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), 0.5)
                    continue
                ok, asked, status = await self._held(url, hold, self._post(url, rows))
                if ok:
                    self.outbox.ack(url, last)
                    failures = 0
                    if smaller:
                        # Grown back after GROW_AFTER batches taken: a receiver whose
                        # limit was raised (or a burst of large events that passed)
                        # got small batches for good, a 413 once halving it forever.
                        taken += 1
                        if taken >= GROW_AFTER:
                            taken = 0
                            smaller = 0 if smaller * 2 >= c.batch_size else smaller * 2
                    continue
                if status == 413 and len(rows) > 1:
                    # The receiver's body limit: half the batch, at once (the same batch
                    # was refused again and again until retention_days, every event after
                    # it held back for the URL).
                    smaller = max(1, len(rows) // 2)
                    taken = 0
                    continue
                if status == 413:
                    # One event alone over the receiver's body limit never fits: it was
                    # refused with backoff until retention_days, every later event held
                    # behind it. Passed (the event log and GET /v1/events keep it).
                    log.error("webhook %s: event %d is too large for the receiver by itself"
                              " (413 for its %d octets): passed, not sent", safe_url(url),
                              rows[0][0], len(rows[0][1]))  # fmt: skip
                    self.stats["too_large"] += 1
                    self.outbox.ack(url, last)
                    continue
                failures += 1
                delay = min(c.retry_max, c.retry_min * 2 ** min(failures - 1, 30))
                delay *= random.uniform(0.8, 1.2)
                # A receiver's Retry-After (429, 503) is kept, up to retry_max: before, a
                # receiver asking for a minute was tried again at once, and again 2, 4,
                # 8 ... s later, each refused.
                await self._held(url, hold, asyncio.sleep(max(delay, min(asked, c.retry_max))))
            except (sqlite3.Error, OSError, _redis_error()) as e:
                # The outbox out of reach (Redis restarting, a locked or full disk):
                # said once, tried again. Before, the error ended this URL's sender
                # for good: no event reached the URL again until serve restarted.
                if not outage:
                    log.error("webhook %s: the outbox cannot be read (%s: %s); trying again"
                              " every %.0f s", safe_url(url), e.__class__.__name__, e,
                              OUTBOX_RETRY)  # fmt: skip
                outage = True
                await asyncio.sleep(OUTBOX_RETRY)

    def _filtered(self, url: str) -> bool:
        """``url`` gets less than the whole outbox: a tenant's, or event types of its own."""
        return self.config.filtered(url)

    def _for_url(
        self, url: str, rows: list[tuple[int, bytes]], owners: dict[int, str | None] | None = None
    ) -> list[tuple[int, bytes]]:
        """The ``rows`` sent to ``url`` (:func:`rows_for`, campaigns' owners from the
        spool through the context)."""
        owner_of = getattr(self.ctx, "campaign_tenant", None)
        return rows_for(self.config, url, rows, owner_of, {} if owners is None else owners)

    async def pending(self) -> dict[str, int]:
        """{URL: events past its cursor that it will be sent} (/metrics'
        ``fastsend_webhook_pending``). A URL that gets less than the whole outbox (a
        tenant's, event types of its own) has its rows read: once each, their counts
        kept per run of ``BACKLOG_RUN`` rows (``_Backlog``), the loop given up between
        runs. Before, such a URL's figure was every row past its cursor: a tenant's
        receiver down showed the other tenants' traffic as its backlog."""
        out: dict[str, int] = {}
        outbox = self.outbox
        for url in list(self.config.urls):
            if outbox is None:
                break
            try:
                if not self._filtered(url):
                    out[url] = outbox.pending(url)
                else:
                    out[url] = await self._backlog(outbox, url)
            except Exception:  # (a scrape never fails for the outbox's sake)
                self._backlogs.pop(url, None)
                continue
        for url in [u for u in self._backlogs if u not in self.config.urls]:
            del self._backlogs[url]
        return out

    async def _backlog(self, outbox: Any, url: str) -> int:
        """The rows past ``url``'s cursor that it will be sent, read past what was read
        before. Rows leave the outbox at its start only (acknowledged, expired), are
        appended at its end; a row that arrives below the end read (two nodes' appends
        racing on a shared outbox) shows as more rows past the cursor than were read,
        and they are read again from the cursor."""
        key = (self.config.owners.get(url), self.config.url_events.get(url, self.config.events))
        st = self._backlogs.get(url)
        if st is None or st.key != key:  # (a reload changed what it gets)
            st = self._backlogs[url] = _Backlog(key)
        total = outbox.pending(url)
        first = outbox.fetch(url, 1)
        if not first:
            st.runs.clear()
            return 0
        start = first[0][0] - 1  # the cursor, or the row before the first left
        while st.runs and st.runs[0][1] <= start:
            st.runs.pop(0)
        owners: dict[int, str | None] = {}
        if st.runs and st.runs[0][0] <= start:  # the cursor inside the first run: read again
            end = st.runs[0][1]
            rows = [r for r in outbox.fetch_all(start, BACKLOG_RUN) if r[0] <= end]
            st.runs[0] = (start + 1, end, len(rows), len(self._for_url(url, rows, owners)))
        after = st.runs[-1][1] if st.runs else start
        for again in (False, True):
            if again:
                if sum(r[2] for r in st.runs) >= total:
                    break
                st.runs.clear()  # (rows arrived below the end read)
                after = start
            while True:
                rows = outbox.fetch_all(after, BACKLOG_RUN)
                if not rows:
                    break
                st.runs.append((rows[0][0], rows[-1][0], len(rows),
                                len(self._for_url(url, rows, owners))))  # fmt: skip
                after = rows[-1][0]
                await asyncio.sleep(0)
                if len(rows) < BACKLOG_RUN:
                    break
        return sum(r[3] for r in st.runs)

    async def _held(self, url: str, hold: Callable[[str], bool] | None, work: Any) -> Any:
        """Await ``work`` (a POST, the wait before the next one) while keeping this
        node's hold on ``url`` (a shared outbox: renewed every third of its lease).
        Before, the hold was renewed only between POSTs: during a wait longer than
        its lease (10 s: a receiver down, backing off to retry_max, or asking for a
        minute by Retry-After) another node took the URL and POSTed at once with a
        backoff of its own, so a receiver down for an hour was tried every few
        seconds by the nodes in turn; a POST slower than the lease was sent by two
        nodes at once."""
        if hold is None:
            return await work
        task = asyncio.ensure_future(work)
        every = getattr(self.outbox, "renew_every", lambda: 3.0)()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every)
                if done:
                    return task.result()
                if not hold(url):  # (taken over: this node's lease lapsed meanwhile)
                    log.warning("webhook %s: another node took it over", safe_url(url))
        finally:
            if not task.done():
                task.cancel()

    async def _post(
        self, url: str, rows: list[tuple[int, bytes]]
    ) -> tuple[bool, float, int]:
        """POST ``rows`` to ``url``: (accepted, the seconds a refusal's Retry-After
        asks to wait, 0.0 without one, the HTTP status, 0 without an answer)."""
        body = b"[" + b",".join(_with_id(i, b) for i, b in rows) + b"]"
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_payload(self.config.secrets.get(url, self.config.secret),
                                           body, ts),
            BATCH_HEADER: f"{rows[0][0]}-{rows[-1][0]}",
        }
        session = self._tenant_session if url in self.config.owners else self._session
        assert session is not None
        try:
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            ) as resp:
                ok = 200 <= resp.status < 300
                status: Any = resp.status
                asked = 0.0 if ok else retry_after(resp.headers.get("Retry-After", ""))
        except aiohttp.ClientConnectorError as e:
            ok, asked = False, 0.0
            status = str(e.os_error) if isinstance(e.os_error, RefusedAddress) else type(e).__name__
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            ok, status, asked = False, type(e).__name__, 0.0
        if ok:
            self.stats["posted"] += 1
        else:
            self.stats["failed"] += 1
            log.warning(
                "webhook %s: batch %s not accepted (%s)", safe_url(url), headers[BATCH_HEADER], status
            )
        return ok, asked, status if isinstance(status, int) else 0


def rows_for(
    config: WebhookConfig,
    url: str,
    rows: list[tuple[int, bytes]],
    owner_of: Callable[[int], str] | None,
    known: dict[int, str | None],
) -> list[tuple[int, bytes]]:
    """The outbox ``rows`` that ``url`` is sent: of the event types it gets, and on a
    tenant's URL of that tenant only (:func:`tenant_of`). ``known``: campaign ->
    tenant, filled as read (a campaign gone from the spool is looked up once, not
    once per event)."""
    owner = config.owners.get(url)
    types = config.url_events.get(url, config.events)
    if owner is None and types is None:
        return rows
    out = []
    for r in rows:
        try:
            ev = orjson.loads(r[1])
        except orjson.JSONDecodeError:
            continue
        if not isinstance(ev, dict):
            continue
        if types is not None and ev.get("event") not in types:
            continue
        if owner is not None and tenant_of(ev, owner_of, known) != owner:
            continue
        out.append(r)
    return out


def tenant_of(
    ev: dict[str, Any], owner_of: Callable[[int], str] | None, known: dict[int, str | None]
) -> str | None:
    """The tenant an outbox event is about: its campaign's owner (``owner_of``, KeyError
    for a campaign not in the spool), else the tenant it names (an open of a message no
    longer in the spool); None for the node's own events (blocklists, feeds, ...): only
    the operator's URLs get those."""
    campaign = ev.get("campaign")
    if isinstance(campaign, int) and owner_of is not None:
        if campaign not in known:
            try:
                known[campaign] = str(owner_of(campaign))
            except KeyError:
                known[campaign] = None  # (the campaign is gone: the tenant the event names)
        got = known[campaign]
        if got is not None:
            return got
    tenant = ev.get("tenant")
    return tenant if isinstance(tenant, str) else None


@dataclass
class _Backlog:
    """What :meth:`WebhookDispatcher.pending` read of a URL's rows: runs of rows, in id
    order, as (first id, last id, rows, rows the URL gets), and what the URL got then."""

    key: tuple[str | None, frozenset[str] | None]
    runs: list[tuple[int, int, int, int]] = field(default_factory=list)


def retry_after(value: str, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header value asks for (RFC 9110 10.2.3: a number of
    seconds or an HTTP date); 0.0 when absent or not understood."""
    v = value.strip()
    if not v:
        return 0.0
    if v.isascii() and v.isdigit():
        return float(min(int(v), 86400 * 7))
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(v).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0
    return max(0.0, when - (time.time() if now is None else now))


def expired_until(
    fetch: Callable[[int, int], list[tuple[int, bytes]]], before: float, chunk: int = 1000
) -> int | None:
    """The last outbox id of the run of events older than ``before`` at the start of
    the outbox (``fetch(after_id, limit)`` reads it in id order), or None. Events are
    appended in about time order; the first one at or after ``before`` ends the run
    (a body without a ``time`` goes with the events around it)."""
    after, cut = -1, None
    while True:
        rows = fetch(after, chunk)
        for i, body in rows:
            try:
                t = orjson.loads(body).get("time")
            except (orjson.JSONDecodeError, AttributeError):
                t = None
            if isinstance(t, int | float):
                if t >= before:
                    return cut
                cut = i
        if len(rows) < chunk:
            return cut
        after = rows[-1][0]


def count_until(
    fetch: Callable[[int, int], list[tuple[int, bytes]]],
    after: int,
    cut: int,
    count: Callable[[list[tuple[int, bytes]]], int],
    chunk: int = 1000,
) -> int:
    """``count`` summed over the rows with an id in (``after``, ``cut``], read in id
    order by ``fetch(after_id, limit)`` ``chunk`` at a time."""
    n = 0
    while after < cut:
        rows = [r for r in fetch(after, chunk) if r[0] <= cut]
        if not rows:
            break
        n += count(rows)
        after = rows[-1][0]
    return n


def _with_id(event_id: int, body: bytes) -> bytes:
    """``body`` (a JSON object) with ``"event_id"`` as its first member."""
    rest = body[1:].lstrip()
    return b'{"event_id":%d' % event_id + (b"}" if rest == b"}" else b"," + rest)


def safe_url(url: str) -> str:
    """The URL as logs name it: scheme, host and port, and a digest of the whole URL
    to tell one from another. Not its credentials, query or path: many receivers'
    URLs carry their secret in the path (hooks.slack.com/services/T.../B.../<secret>,
    Zapier's and Discord's too)."""
    from urllib.parse import urlsplit

    p = urlsplit(url)
    try:
        port = f":{p.port}" if p.port else ""
    except ValueError:
        port = ""
    tag = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{p.scheme}://{p.hostname}{port}/... (#{tag})"
