"""TLS-RPT aggregate reports (RFC 8460): telling a recipient domain, once a
day, how this MTA's TLS sessions under its policies went.

Counting. The workers report every session to an MX under a policy
(``delivery/mtasts.py`` ``MTASTS.report``): each failure as a ``tls_report``
event (result type, MX host and address, source IP, the policy), the
successes summed per policy as a ``tls_sessions`` event about once a minute
and when the worker ends. :class:`Store` listens to the event log (send,
resume, serve: :func:`attach`) and adds them up per UTC day, policy domain
and policy in ``SPOOL/tlsrpt.db``; on a shared Redis spool in Redis
(:class:`RedisStore`: every node's sessions in one count, so a domain gets one
report a day, not one per node). Policy types: ``sts``
(MTA-STS; the policy's lines and mx patterns), ``tlsa`` (DANE; the TLSA
records, the MX host), ``no-policy-found`` (a domain whose MTA-STS policy
could not be fetched and none was cached, or a domain without any policy that
publishes a ``_smtp._tls`` record: with ``[tls] report_from`` set, the
resolver asks for that record beside the MX query, and each session to an MX
set without a policy counts once for each such domain it carries mail for,
TLS negotiated or not: ``SiteQueue._no_policy_sessions``).

Sending (``fastsend tls-report send``, or ``[tls] reports = "on"`` in serve,
a few minutes after each UTC midnight): for each finished day and policy
domain not yet reported, the domain's ``_smtp._tls`` TXT record
(``v=TLSRPTv1; rua=...``) names where: each ``https:`` URI gets the gzipped
JSON by POST (``Content-Type: application/tlsrpt+gzip``; the host's
addresses held to ``[delivery] allow_private_mx`` like an MX's, no
redirects), each ``mailto:`` a message in RFC 8460 5.3's format (multipart/
report; report-type="tlsrpt", the ``TLS-Report-Domain`` and
``TLS-Report-Submitter`` fields, the report as an ``application/tlsrpt+gzip``
attachment named ``submitter!domain!begin!end!id.json.gz``), spooled into the
operator's ``tls-reports`` campaign and delivered by fastsend itself (DKIM
signed by ``[dkim]`` when it has a key for the From domain). A domain whose
every destination failed is tried again at the next run; one reported, or with
no record, is marked done (never reported twice). One sender at a time per
spool (:meth:`Store.sending`: a file lock; Redis: a lease every node's sender
asks for), so two processes (serve and ``tls-report send``, or two nodes)
never send a day's report twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import fcntl
import gzip
import logging
import os
import secrets
import socket
import sqlite3
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import orjson

from fastsend.address import AddressError, normalize
from fastsend.config.tenants import OPERATOR
from fastsend.events import Rows
from fastsend.sqlitedb import connect, transaction

log = logging.getLogger("fastsend.tlsrpt")

DB_NAME = "tlsrpt.db"
KEEP_DAYS = 8  # days of counts kept (reports are sent for yesterday; a week to catch up)
POST_TIMEOUT = 30.0  # s for one HTTPS POST (its address lookup included)
SEND_CONCURRENCY = 16  # domains whose reports are sent at once
POST_CONCURRENCY = 16  # HTTPS POSTs in flight at once (over every domain)
MAX_DETAILS = 1000  # failure-details per policy in one report (the biggest counts)
MAX_RUA = 5  # destinations per domain (a record listing more is cut)
MEDIA_TYPE = "application/tlsrpt+gzip"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions(
  day TEXT NOT NULL, domain TEXT NOT NULL, ptype TEXT NOT NULL,
  policy TEXT NOT NULL, mx_host TEXT NOT NULL,
  ok INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(day, domain, ptype, policy, mx_host)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures(
  day TEXT NOT NULL, domain TEXT NOT NULL, ptype TEXT NOT NULL,
  policy TEXT NOT NULL, mx_host TEXT NOT NULL, result TEXT NOT NULL,
  sending_ip TEXT NOT NULL, mx TEXT NOT NULL, mx_ip TEXT NOT NULL,
  reason TEXT NOT NULL DEFAULT '', n INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(day, domain, ptype, policy, mx_host, result, sending_ip, mx, mx_ip))
  WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sent(
  day TEXT NOT NULL, domain TEXT NOT NULL, at REAL NOT NULL, how TEXT NOT NULL,
  PRIMARY KEY(day, domain)) WITHOUT ROWID;
"""


def day_of(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d")


def day_range(day: str) -> tuple[float, float]:
    """The first and the last second of UTC ``day`` (Unix time)."""
    d = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    start = d.timestamp()
    return start, start + 86399


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """A node's TLS session counts per (day, policy domain, policy)."""

    def __init__(self, directory: str, *, readonly: bool = False) -> None:
        """``readonly``: a view that writes nothing (``tls-report show``)."""
        self.path = os.path.join(directory, DB_NAME)
        self.db = connect(self.path, synchronous="NORMAL", schema=_SCHEMA, readonly=readonly)
        self.pruned = ""

    def close(self) -> None:
        self.db.close()

    def detach(self, events: Any) -> None:
        """Stop listening to ``events`` (after its last flush) and close."""
        if self.listener in events.listeners:
            events.listeners.remove(self.listener)
        events.rows_listeners.pop(self.listener, None)
        self.close()

    # -- counting (an event log listener) --------------------------------------

    def rows(self, rows: Rows) -> None:
        """Deliveries (the event log's row batches) carry no TLS-RPT result."""

    def listener(self, batch: list[dict[str, Any]]) -> None:
        tls = [e for e in batch if e.get("event") in ("tls_report", "tls_sessions")]
        if tls:
            self.add(tls)

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        with transaction(self.db):
            for e in events:
                day = day_of(float(e.get("time") or time.time()))
                key = (
                    day,
                    str(e.get("policy_domain", ""))[:255].lower(),
                    str(e.get("policy_type", "") or "sts"),
                    orjson.dumps(list(e.get("policy") or [])).decode(),
                    orjson.dumps(list(e.get("mx_host") or [])).decode(),
                )
                if not key[1]:
                    continue
                if e.get("event") == "tls_sessions":
                    n = int(e.get("count") or 0)
                    self.db.execute(
                        "INSERT INTO sessions VALUES(?,?,?,?,?,?,0) ON CONFLICT DO UPDATE"
                        " SET ok = ok + excluded.ok", (*key, n),
                    )  # fmt: skip
                    continue
                self.db.execute(
                    "INSERT INTO sessions VALUES(?,?,?,?,?,0,1) ON CONFLICT DO UPDATE"
                    " SET failed = failed + 1", key,
                )  # fmt: skip
                self.db.execute(
                    "INSERT INTO failures VALUES(?,?,?,?,?,?,?,?,?,?,1) ON CONFLICT DO UPDATE"
                    " SET n = n + 1",
                    (*key, str(e.get("result", ""))[:64], str(e.get("source_ip", ""))[:64],
                     str(e.get("mx", ""))[:255], str(e.get("receiving_ip", ""))[:64],
                     str(e.get("text", ""))[:300]),
                )  # fmt: skip
            today = day_of(time.time())
            if self.pruned != today:  # counts older than KEEP_DAYS go
                self.pruned = today
                old = day_of(time.time() - KEEP_DAYS * 86400)
                for table in ("sessions", "failures", "sent"):
                    self.db.execute(f"DELETE FROM {table} WHERE day < ?", (old,))

    # -- reporting -------------------------------------------------------------

    def due(self, before: str) -> list[tuple[str, str]]:
        """(day, policy domain) with counts, of days before ``before``, not reported."""
        return list(
            self.db.execute(
                "SELECT DISTINCT s.day, s.domain FROM sessions s LEFT JOIN sent t"
                " ON t.day = s.day AND t.domain = s.domain"
                " WHERE s.day < ? AND t.day IS NULL ORDER BY s.day, s.domain",
                (before,),
            )
        )

    def domains(self, day: str) -> list[str]:
        """The policy domains with counts on ``day``."""
        return [d for (d,) in self.db.execute(
            "SELECT DISTINCT domain FROM sessions WHERE day = ? ORDER BY domain", (day,))]  # fmt: skip

    @contextlib.contextmanager
    def sending(self) -> Iterator[bool]:
        """Whether this process may send now (True) or another one of this spool
        is sending (False): a lock file, released by the kernel if it dies."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def renew(self) -> None:
        """Keep :meth:`sending`'s hold for another report (a file lock: held)."""

    def mark_sent(self, day: str, domain: str, how: str) -> None:
        with transaction(self.db):
            self.db.execute(
                "INSERT OR REPLACE INTO sent VALUES(?,?,?,?)", (day, domain, time.time(), how)
            )

    def was_sent(self, day: str, domain: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM sent WHERE day = ? AND domain = ?", (day, domain)).fetchone()
            is not None
        )

    def report(
        self, day: str, domain: str, *, organization: str, contact: str, report_id: str
    ) -> dict[str, Any]:
        """The RFC 8460 4.4 JSON report of ``domain``'s sessions on ``day``."""
        start, end = day_range(day)
        policies = []
        for ptype, policy, mx_host, ok, failed in self.db.execute(
            "SELECT ptype, policy, mx_host, ok, failed FROM sessions WHERE day = ? AND domain = ?"
            " ORDER BY ptype, policy, mx_host",
            (day, domain),
        ).fetchall():
            details = self.db.execute(
                "SELECT result, sending_ip, mx, mx_ip, reason, n FROM failures WHERE day = ?"
                " AND domain = ? AND ptype = ? AND policy = ? AND mx_host = ?"
                " ORDER BY n DESC LIMIT ?",
                (day, domain, ptype, policy, mx_host, MAX_DETAILS),
            ).fetchall()
            policies.append(_entry(domain, ptype, orjson.loads(policy), orjson.loads(mx_host),
                                   ok, failed, details))  # fmt: skip
        return _document(organization, contact, report_id, start, end, policies)


_SEP = "\x1f"
SEND_LEASE = 900.0  # s a sender holds a shared spool's report lease (renewed per report)


class RedisStore(Store):
    """The counts of every node of a shared (Redis) spool, in its namespace:
    per UTC day the set of policy domains (``tlsrpt:d:DAY``), and per domain a
    hash of session counts (``tlsrpt:s:DAY:DOMAIN``, fields ``ok``/``failed``
    + the policy) and one of failure details (``tlsrpt:f:DAY:DOMAIN``), each
    expiring after ``KEEP_DAYS``; what was sent in ``tlsrpt:sent:DAY``. One
    sender at a time: the ``tlsrpt:lock`` lease (:meth:`sending`)."""

    def __init__(self, shared: Any) -> None:  # (no local file: Store.__init__ not called)
        self.r = shared.client
        self.key = shared.key
        self.path = ""
        self.pruned = ""
        self._token = ""  # this process's hold on the report lease (sending)

    def close(self) -> None:
        pass  # the spool's client: the spool closes it

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        keep = int(KEEP_DAYS * 86400)
        pipe = self.r.pipeline(transaction=False)
        touched: set[tuple[str, str]] = set()
        for e in events:
            day = day_of(float(e.get("time") or time.time()))
            domain = str(e.get("policy_domain", ""))[:255].lower()
            if not domain:
                continue
            policy = orjson.dumps([
                str(e.get("policy_type", "") or "sts"), list(e.get("policy") or []),
                list(e.get("mx_host") or []),
            ]).decode()  # fmt: skip
            skey = self.key("tlsrpt", "s", day, domain)
            if e.get("event") == "tls_sessions":
                pipe.hincrby(skey, f"ok{_SEP}{policy}", int(e.get("count") or 0))
            else:
                pipe.hincrby(skey, f"failed{_SEP}{policy}", 1)
                detail = orjson.dumps([
                    policy, str(e.get("result", ""))[:64], str(e.get("source_ip", ""))[:64],
                    str(e.get("mx", ""))[:255], str(e.get("receiving_ip", ""))[:64],
                    str(e.get("text", ""))[:300],
                ]).decode()  # fmt: skip
                pipe.hincrby(self.key("tlsrpt", "f", day, domain), detail, 1)
                touched.add((day, domain))
            if (day, "") not in touched:
                touched.add((day, ""))
                pipe.sadd(self.key("tlsrpt", "d", day), domain)
                pipe.expire(self.key("tlsrpt", "d", day), keep)
                pipe.sadd(self.key("tlsrpt", "days"), day)
            else:
                pipe.sadd(self.key("tlsrpt", "d", day), domain)
            pipe.expire(skey, keep)
        for day, domain in touched:
            if domain:
                pipe.expire(self.key("tlsrpt", "f", day, domain), keep)
        if touched:
            today = day_of(time.time())
            if self.pruned != today:  # days older than KEEP_DAYS leave the index
                self.pruned = today
                old = day_of(time.time() - KEEP_DAYS * 86400)
                days = [_str(d) for d in self.r.smembers(self.key("tlsrpt", "days"))]
                gone = [d for d in days if d < old]
                if gone:
                    pipe.srem(self.key("tlsrpt", "days"), *gone)
            pipe.execute()

    def carry(self, directory: str) -> int:
        """Add the counts of a node's local ``tlsrpt.db`` in ``directory`` (a
        node of before the counts went to Redis kept them there, and the first
        report after the upgrade left them out) to the shared ones, once: the
        days kept and not reported from that node, in one MULTI/EXEC with a
        mark naming the file (a second node or start finds it: nothing added
        twice), then the file is renamed ``tlsrpt.db.carried``. How many
        (day, domain) it carried."""
        from redis.exceptions import WatchError  # (a shared spool: redis-py is in use)

        path = os.path.join(directory, DB_NAME)
        if not os.path.exists(path):
            return 0
        st = os.stat(path)
        mark = self.key("tlsrpt", "carried", f"{socket.gethostname()}:{os.path.realpath(path)}:"
                        f"{st.st_dev}:{st.st_ino}")  # fmt: skip
        old = day_of(time.time() - KEEP_DAYS * 86400)
        db = connect(path, synchronous="NORMAL", schema=_SCHEMA)
        try:
            sent = set(db.execute("SELECT day, domain FROM sent"))
            sessions = [r for r in db.execute(
                "SELECT day, domain, ptype, policy, mx_host, ok, failed FROM sessions"
                " WHERE day >= ?", (old,)) if (r[0], r[1]) not in sent]  # fmt: skip
            failures = [r for r in db.execute(
                "SELECT day, domain, ptype, policy, mx_host, result, sending_ip, mx, mx_ip,"
                " reason, n FROM failures WHERE day >= ?", (old,))
                if (r[0], r[1]) not in sent]  # fmt: skip
        finally:
            db.close()
        keep = int(KEEP_DAYS * 86400)
        done: set[tuple[str, str]] = set()
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(mark)
            if pipe.exists(mark):
                pipe.reset()
                self._carried(path)
                return 0
            pipe.multi()
            pipe.set(mark, b"1", ex=keep + 86400)
            for day, domain, ptype, policy, hosts, ok, failed in sessions:
                key = orjson.dumps([ptype, orjson.loads(policy), orjson.loads(hosts)]).decode()
                skey = self.key("tlsrpt", "s", day, domain)
                for kind, n in (("ok", ok), ("failed", failed)):
                    if n:
                        pipe.hincrby(skey, f"{kind}{_SEP}{key}", int(n))
                pipe.expire(skey, keep)
                done.add((day, domain))
            for day, domain, ptype, policy, hosts, *detail, n in failures:
                key = orjson.dumps([ptype, orjson.loads(policy), orjson.loads(hosts)]).decode()
                fkey = self.key("tlsrpt", "f", day, domain)
                pipe.hincrby(fkey, orjson.dumps([key, *detail]).decode(), int(n))
                pipe.expire(fkey, keep)
            for day, domain in done:
                pipe.sadd(self.key("tlsrpt", "d", day), domain)
                pipe.expire(self.key("tlsrpt", "d", day), keep)
                pipe.sadd(self.key("tlsrpt", "days"), day)
            try:
                pipe.execute()
            except WatchError:
                return 0  # (another process of this node carried it meanwhile)
        self._carried(path)
        return len(done)

    @staticmethod
    def _carried(path: str) -> None:
        with contextlib.suppress(OSError):  # (the mark in Redis stops a second carry)
            os.replace(path, path + ".carried")

    def _days(self) -> list[str]:
        return sorted(_str(d) for d in self.r.smembers(self.key("tlsrpt", "days")))

    def domains(self, day: str) -> list[str]:
        return sorted(_str(d) for d in self.r.smembers(self.key("tlsrpt", "d", day)))

    def due(self, before: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for day in self._days():
            if day >= before:
                continue
            sent = {_str(d) for d in self.r.hkeys(self.key("tlsrpt", "sent", day))}
            out.extend((day, d) for d in self.domains(day) if d not in sent)
        return out

    def mark_sent(self, day: str, domain: str, how: str) -> None:
        key = self.key("tlsrpt", "sent", day)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, domain, f"{time.time():.0f} {how}")
        pipe.expire(key, int(KEEP_DAYS * 86400))
        pipe.execute()

    def was_sent(self, day: str, domain: str) -> bool:
        return bool(self.r.hexists(self.key("tlsrpt", "sent", day), domain))

    @contextlib.contextmanager
    def sending(self) -> Iterator[bool]:
        """Whether this process may send now: the spool's report lease (every
        node asks; a sender that dies frees it when it lapses)."""
        key = self.key("tlsrpt", "lock")
        token = secrets.token_hex(8)
        if not self.r.set(key, token, nx=True, px=int(SEND_LEASE * 1000)):
            yield False
            return
        self._token = token
        try:
            yield True
        finally:
            self._token = ""
            if _str(self.r.get(key) or b"") == token:
                self.r.delete(key)

    def renew(self) -> None:
        key = self.key("tlsrpt", "lock")
        if self._token and _str(self.r.get(key) or b"") == self._token:
            self.r.pexpire(key, int(SEND_LEASE * 1000))

    def report(
        self, day: str, domain: str, *, organization: str, contact: str, report_id: str
    ) -> dict[str, Any]:
        start, end = day_range(day)
        counts: dict[str, list[int]] = {}
        for field, n in self.r.hgetall(self.key("tlsrpt", "s", day, domain)).items():
            kind, _, policy = _str(field).partition(_SEP)
            c = counts.setdefault(policy, [0, 0])
            c[0 if kind == "ok" else 1] += int(n)
        details: dict[str, list[tuple[str, str, str, str, str, int]]] = {}
        for field, n in self.r.hgetall(self.key("tlsrpt", "f", day, domain)).items():
            policy, result, sip, mx, mip, reason = orjson.loads(field)
            details.setdefault(policy, []).append((result, sip, mx, mip, reason, int(n)))
        policies = []
        for policy in sorted(counts):
            ptype, strings, hosts = orjson.loads(policy)
            rows = sorted(details.get(policy, []), key=lambda x: -x[5])[:MAX_DETAILS]
            ok, failed = counts[policy]
            policies.append(_entry(domain, ptype, strings, hosts, ok, failed, rows))
        return _document(organization, contact, report_id, start, end, policies)


def _str(b: Any) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)



def _entry(
    domain: str, ptype: str, strings: list[str], hosts: list[str], ok: int, failed: int,
    details: Iterable[tuple[str, str, str, str, str, int]],
) -> dict[str, Any]:
    """One policy's entry of a report (RFC 8460 4.4): its policy, summary and
    failure details ((result, sending IP, MX, MX IP, reason, sessions), the
    biggest first)."""
    pol: dict[str, Any] = {"policy-type": ptype}
    if strings:
        pol["policy-string"] = strings
    pol["policy-domain"] = domain
    if hosts:
        pol["mx-host"] = hosts
    out = []
    for result, sip, mx, mip, reason, n in details:
        d: dict[str, Any] = {"result-type": result}
        if sip:
            d["sending-mta-ip"] = sip
        if mx:
            d["receiving-mx-hostname"] = mx
        if mip:
            d["receiving-ip"] = mip
        d["failed-session-count"] = n
        if reason:
            d["failure-reason-code"] = reason
        out.append(d)
    entry: dict[str, Any] = {
        "policy": pol,
        "summary": {"total-successful-session-count": ok, "total-failure-session-count": failed},
    }
    if out:
        entry["failure-details"] = out
    return entry


def _document(
    organization: str, contact: str, report_id: str, start: float, end: float,
    policies: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def open_store(config: Any, spool: Any = None, *, readonly: bool = False) -> Store:
    """The spool's counts: in Redis for a shared spool (every node's), else the
    node's ``tlsrpt.db``. A node's own ``tlsrpt.db`` beside a shared spool (its
    counts of before they went to Redis, session 19) is carried into it once
    (not by a ``readonly`` view, which writes nothing)."""
    shared = spool.shared() if spool is not None else None
    if shared is None:
        return Store(config.spool_dir, readonly=readonly)
    store = RedisStore(shared)
    local = getattr(config, "spool_dir", "")
    try:
        if local and not readonly:
            store.carry(local)
    except Exception as e:  # (Redis out of reach, a damaged file: the next start tries again)
        log.warning("the TLS-RPT counts of %s are not carried into Redis yet: %s",
                    os.path.join(local, DB_NAME), e)  # fmt: skip
    return store


def attach(config: Any, events: Any, spool: Any = None) -> Store | None:
    """The spool's store listening to ``events`` (send, resume, serve), when
    any TLS policy is looked at; None when neither MTA-STS nor DANE is on."""
    t = config.tls
    if t.mta_sts != "on" and "on" not in t.domains.values() and t.dane != "on":
        return None
    try:
        store = open_store(config, spool)
    except (OSError, sqlite3.Error):
        return None  # counting is best effort: delivery never waits on it
    events.listen(store.listener, rows=store.rows)
    return store


# -- the domain's record ---------------------------------------------------------


def parse_txt(texts: list[str]) -> list[str]:
    """The ``rua`` URIs of a domain's ``_smtp._tls`` TXT strings (RFC 8460
    3): exactly one record starting ``v=TLSRPTv1``, its ``rua`` a comma
    separated list of ``mailto:`` and ``https:`` URIs (others ignored)."""
    recs = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if len(recs) != 1:
        return []
    fields: dict[str, str] = {}
    for part in recs[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields.setdefault(k.strip().lower(), v.strip())
    if fields.get("v") != "TLSRPTv1":
        return []
    out = []
    for uri in fields.get("rua", "").split(","):
        uri = uri.strip()
        low = uri.lower()
        https = low.startswith("https://") and bool(urllib.parse.urlsplit(uri).hostname)
        if https or (low.startswith("mailto:") and _plain(mailto_address(uri))):
            out.append(uri)
    return out[:MAX_RUA]


def _plain(address: str) -> bool:
    """Whether a ``mailto:`` address is one deliverable address: the domain's
    record is anyone's to write, and the address goes into the report's To
    header and envelope (a %0D%0A in it was a header of the attacker's)."""
    try:
        normalize(address)
    except AddressError:
        return False
    return True


def mailto_address(uri: str) -> str:
    """The address of a ``mailto:`` URI (its query, if any, dropped)."""
    return urllib.parse.unquote(uri[7:].partition("?")[0]).strip()


# -- the message (RFC 8460 5.3) ---------------------------------------------------


def filename(submitter: str, domain: str, start: float, end: float, unique: str) -> str:
    """RFC 8460 5.3: ``submitter!policy-domain!begin!end!unique-id.json.gz``."""
    return f"{submitter}!{domain}!{int(start)}!{int(end)}!{unique}.json.gz"


def message(
    report: dict[str, Any],
    gz: bytes,
    *,
    domain: str,
    submitter: str,
    sender: str,
    to: list[str],
    unique: str,
    now: float,
) -> bytes:
    """The report message: multipart/report; report-type="tlsrpt", a short
    text part and the gzipped JSON (base64, ``application/tlsrpt+gzip``)."""
    import email.utils  # (not on a plain send's path: only a report needs it)

    start = datetime.datetime.strptime(
        report["date-range"]["start-datetime"], "%Y-%m-%dT%H:%M:%SZ"
    ).replace(tzinfo=datetime.UTC).timestamp()
    end = start + 86399
    rid = report["report-id"]
    boundary = "tlsrpt-" + secrets.token_hex(12)
    name = filename(submitter, domain, start, end, unique)
    b64 = base64.encodebytes(gz).replace(b"\n", b"\r\n")
    ok = sum(p["summary"]["total-successful-session-count"] for p in report["policies"])
    bad = sum(p["summary"]["total-failure-session-count"] for p in report["policies"])
    text = (
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain},\r\n"
        f"{report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}:"
        f" {ok} successful and {bad} failed session(s).\r\n"
    )
    head = (
        f"From: {sender}\r\n"
        f"To: {', '.join(to)}\r\n"
        f"Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{rid}>\r\n"
        f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
        f"Message-ID: <{unique}.{int(now)}@{submitter}>\r\n"
        f"TLS-Report-Domain: {domain}\r\n"
        f"TLS-Report-Submitter: {submitter}\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type="tlsrpt";\r\n boundary="{boundary}"\r\n'
        "\r\n"
    )
    body = (
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"{text}\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: {MEDIA_TYPE}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment;\r\n filename="{name}"\r\n\r\n'
    )
    return head.encode("ascii") + body.encode("ascii") + b64 + f"\r\n--{boundary}--\r\n".encode()


# -- HTTPS POST --------------------------------------------------------------------

AddrLookup = Callable[[str], Awaitable[list[str] | str]]


async def post(uri: str, gz: bytes, addresses: AddrLookup, ctx: ssl.SSLContext, port: int = 0) -> str:
    """POST the gzipped report to ``uri``; "" when a 2xx answered, else why not.
    ``addresses``: the host's addresses, held to the MX rule (a domain's record
    must not make this MTA post into its own network). ``port``: instead of the
    URI's (tests)."""
    u = urllib.parse.urlsplit(uri)
    host = u.hostname or ""
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        async with asyncio.timeout(POST_TIMEOUT):
            addrs = await addresses(host)
            if isinstance(addrs, str):
                return addrs
            last = "no address"
            for addr in addrs[:3]:
                try:
                    reader, writer = await asyncio.open_connection(
                        addr, port or u.port or 443, ssl=ctx, server_hostname=host, limit=16384
                    )
                except (OSError, ssl.SSLError) as e:
                    last = f"{addr}: {e}"
                    continue
                try:
                    writer.write(
                        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fastsend\r\n"
                        f"Content-Type: {MEDIA_TYPE}\r\nContent-Length: {len(gz)}\r\n"
                        "Connection: close\r\n\r\n".encode("ascii") + gz
                    )
                    status = (await reader.readline()).decode("latin-1").split(" ", 2)
                finally:
                    writer.close()
                if len(status) >= 2 and status[0].startswith("HTTP/1.") and status[1][:1] == "2":
                    return ""
                return f"HTTP {' '.join(status[1:]).strip()[:100] or 'no answer'}"
            return last
    except TimeoutError:
        return f"no answer in {POST_TIMEOUT:g} s"
    except (OSError, ssl.SSLError, ValueError) as e:
        return f"{e.__class__.__name__}: {e}"[:200]


REPORTS_CAMPAIGN = "tls-reports"


def reports_campaign(acceptor: Any, spool: Any) -> int:
    """The operator's campaign for TLS-RPT report mail (made on first use; a
    new one when the kept one was cancelled)."""
    for info in spool.campaigns(OPERATOR):
        if info.name == REPORTS_CAMPAIGN and info.status not in ("cancelled", "abandoned"):
            return int(info.id)
    # its mail goes despite the rua domain's own TLS policy failing (RFC 8460 5.3)
    # the operator's own mail: its From domain need be no tenant's ([tenants]);
    # signed by [dkim]
    spec = {"kind": "transactional", "defaults": {}, "tenant": OPERATOR, "tls_report_mail": True}
    return int(acceptor.create_campaign(spec, name=REPORTS_CAMPAIGN, options={"tls_reports": True}))


# -- one run ---------------------------------------------------------------------


class SendingElsewhere(Exception):
    """Another process of the spool (a node of a shared one) holds the report
    lease: it sends them (:meth:`Store.sending`)."""


class Sender:
    """Sends the due reports of a :class:`Store`: the TXT and address lookups of
    a :class:`~fastsend.delivery.mx.MXResolver`, mail handed to ``spool_mail``
    (rows for the operator's tls-reports campaign)."""

    def __init__(
        self,
        config: Any,
        store: Store,
        resolver: Any,
        spool_mail: Callable[[list[tuple[str, str, bytes]]], None],
    ) -> None:
        t = config.tls
        self.store = store
        self.resolver = resolver
        self.spool_mail = spool_mail
        self.sender = t.report_from
        self.submitter = self.sender.rpartition("@")[2].lower()
        self.organization = t.report_organization or self.submitter
        self.contact = t.report_contact or self.sender
        self.ca_file = t.ca_file
        self.post_port = t.report_post_port

    async def rua(self, domain: str) -> list[str] | str:
        """The domain's destinations; a str: the lookup failed (try again later)."""
        try:
            texts, _ttl = await self.resolver._txt(f"_smtp._tls.{domain}")
        except Exception as e:
            return f"TXT lookup failed: {e.__class__.__name__}"
        return parse_txt(texts or [])

    async def run(self, before: str, only_day: str = "") -> list[dict[str, Any]]:
        """Send every due report of days before ``before`` (or of ``only_day``,
        even if sent before); one summary dict per (day, domain)."""
        from fastsend.delivery.mtasts import verify_context

        ctx = verify_context(self.ca_file)
        with self.store.sending() as mine:
            if not mine:
                raise SendingElsewhere("another process (or node) is sending this spool's reports")
            return await self._run(before, only_day, ctx)

    async def _run(self, before: str, only_day: str, ctx: ssl.SSLContext) -> list[dict[str, Any]]:
        if only_day:
            due = [(only_day, d) for d in self.store.domains(only_day)]
        else:
            due = self.store.due(before)
        now = time.time()
        # Domains (and each domain's HTTPS destinations) go concurrently, at most
        # SEND_CONCURRENCY domains and POST_CONCURRENCY POSTs at once: a record
        # whose rua hangs costs its own domain POST_TIMEOUT, not every later one.
        domains = asyncio.Semaphore(SEND_CONCURRENCY)
        posts = asyncio.Semaphore(POST_CONCURRENCY)
        out: list[dict[str, Any]] = []
        jobs = []
        for day, domain in due:
            info: dict[str, Any] = {"day": day, "domain": domain, "posted": [], "mailed": [],
                                    "failed": []}  # fmt: skip
            out.append(info)
            jobs.append(self._one(info, only_day, now, ctx, domains, posts))
        await asyncio.gather(*jobs)
        # (a domain sent by another process since due() was read: not ours to list)
        return [info for info in out if not info.get("skipped")]

    async def _one(
        self,
        info: dict[str, Any],
        only_day: str,
        now: float,
        ctx: ssl.SSLContext,
        domains: asyncio.Semaphore,
        posts: asyncio.Semaphore,
    ) -> None:
        """Send one (day, domain)'s report; what happened goes in ``info``."""
        day, domain = info["day"], info["domain"]
        async with domains:
            if not only_day and self.store.was_sent(day, domain):
                info["skipped"] = True  # (sent by another process since due() was read)
                return
            self.store.renew()
            rua = await self.rua(domain)
            if isinstance(rua, str):
                info["failed"].append(rua)
                return
            if not rua:
                info["failed"].append("no TLSRPTv1 record")
                self.store.mark_sent(day, domain, "no record")
                return
            unique = secrets.token_hex(8)
            rid = f"{day}T00:00:00Z_{domain}_{unique}@{self.submitter}"
            report = self.store.report(
                day, domain, organization=self.organization, contact=self.contact, report_id=rid
            )
            info["report"] = report
            gz = gzip.compress(orjson.dumps(report), mtime=0)
            mails = [mailto_address(u) for u in rua if u.lower().startswith("mailto:")]
            if mails:  # spooled first: a hanging POST never holds the mail back
                data = message(
                    report, gz, domain=domain, submitter=self.submitter, sender=self.sender,
                    to=mails, unique=unique, now=now,
                )  # fmt: skip
                rows = []
                for addr in mails:
                    local, _, dom = addr.rpartition("@")
                    row = orjson.dumps(
                        {"raw": base64.b64encode(data).decode("ascii"), "mail_from": self.sender}
                    )
                    rows.append((f"{local}@{dom.lower()}", dom.lower(), row))
                try:
                    self.spool_mail(rows)
                    info["mailed"] = mails
                except Exception as e:
                    info["failed"].append(f"mail not spooled: {e}")

            async def one_post(uri: str) -> str:
                async with posts:
                    return await post(uri, gz, self.resolver._policy_addresses, ctx, self.post_port)

            https = [u for u in rua if u.lower().startswith("https://")]
            for uri, why in zip(https, await asyncio.gather(*map(one_post, https)), strict=True):
                (info["failed"] if why else info["posted"]).append(f"{uri} {why}".strip())
            if info["posted"] or info["mailed"]:
                self.store.mark_sent(day, domain, " ".join(info["posted"] + info["mailed"])[:500])
