"""The per-message event index: ``<spool>/events.db`` for GET /v1/messages/{id} and /v1/stats.

An :class:`~fastsend.events.EventLog` listener: every event the serving
process emits (accepted and suppressed from injection, delivered / deferred /
bounced / expired from the supervisor, opened / clicked / ... from tracking)
is buffered here and written to SQLite in one transaction every
``FLUSH_EVERY`` seconds (or at once when a reader asks), with the columns
the stats queries group by. ``synchronous=NORMAL``: the JSON-lines log and
the spool are the durable records; this index is a query aid that can be
rebuilt from the log.

Tags and metadata given at injection live in the ``meta`` table (one row per
message that has any).

It never decides anything about delivery and is never read by the scheduler.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from fastsend.events import legacy_mark_key, mark_key, read_back
from fastsend.spool import storage_problem
from fastsend.sqlitedb import connect, transaction

log = logging.getLogger("fastsend.serve.eventindex")

FLUSH_EVERY = 0.2
# Events a start indexes from the log past the index's mark, at most (a kill -9 leaves
# a fraction of a second, a stop's drain its windows; ~3 s of a start at this size).
CATCH_UP_MAX = 100_000
MAX_PENDING = 100_000  # rows kept in memory while the storage refuses writes
OUTAGE_RETRY = 2.0  # s between two tries while it does
# Events a report names a message with (a DSN, a feedback report, a provider's
# event): recorded once per message (see :func:`already_told`).
ONCE_PER_MESSAGE = frozenset({"bounced", "complained", "unsubscribed"})


def already_told(ctx: Any, mid: Any, event: str) -> bool:
    """Whether message ``mid`` already has ``event`` (one of ``ONCE_PER_MESSAGE``) in
    serve's per-message index (the API's, handed to the acceptor; a context without
    it answers False). A report received again (a provider resending it, or anyone
    replaying a genuine one) must not be counted again: each event is counted by the
    rollups, the rate alarms and the campaign guardrails, which pause campaigns."""
    if event not in ONCE_PER_MESSAGE or not isinstance(mid, int):
        return False
    index = getattr(getattr(ctx, "acceptor", None), "index", None)
    return index is not None and mid in index.logged([mid], (event,))


ONCE_MARK_TTL = 3600  # s a telling is marked: the index has the event long before
ONCE_LOCAL_MAX = 100_000  # tellings this process remembers (a local spool)


def first_telling(ctx: Any, mid: Any, event: str) -> bool:
    """Claim the telling of ``event`` (one of ``ONCE_PER_MESSAGE``) for message
    ``mid``, just before it is emitted: False when it was claimed already.
    :func:`already_told` reads the index, which has an event only once the event
    log handed it on (and, on Redis, once the emitting node's index flushed): two
    copies of one report a moment apart (SendGrid resending a batch, a reporter
    retrying at another node after a slow answer, a one-click unsubscribe POSTed
    twice through a balancer) were both counted by the rollups, the rate alarms
    and the guardrails. On a shared spool one SET NX in Redis for every node
    (``SharedState.once``); else this process's memory (one per spool)."""
    if event not in ONCE_PER_MESSAGE or not isinstance(mid, int):
        return True
    shared = getattr(ctx, "shared", None)
    if shared is not None:
        return bool(shared.once(f"{mid}:{event}", ONCE_MARK_TTL))
    recent = getattr(ctx, "told_recently", None)
    if recent is None:
        return True
    now = time.monotonic()
    while recent and (len(recent) >= ONCE_LOCAL_MAX
                      or next(iter(recent.values())) < now - ONCE_MARK_TTL):  # fmt: skip
        recent.popitem(last=False)
    if (mid, event) in recent:
        return False
    recent[(mid, event)] = now
    return True

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    msg INTEGER NOT NULL,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    campaign INTEGER NOT NULL DEFAULT 0,
    domain TEXT NOT NULL DEFAULT '',
    source_ip TEXT NOT NULL DEFAULT '',
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_msg ON events(msg);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE TABLE IF NOT EXISTS meta (
    msg INTEGER PRIMARY KEY,
    tags BLOB NOT NULL,
    metadata BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (          -- how far into each event log the rows go
    log TEXT PRIMARY KEY,
    mark TEXT NOT NULL
);
"""


@dataclass
class ExportQuery:
    """What GET /v1/events asks: events with ``t0 <= time < t1``, of ``campaigns``
    (None: any; the tenant's own), of event names ``kinds`` (None: any), past the
    position ``after`` (a cursor), at most ``limit`` of them. ``tenant``: also the
    events of no campaign that name this tenant (an open or a click of a message
    gone from the spool and from this index: its link's authenticated tenant is
    all that is known of it; left out, the tenant never saw it)."""

    t0: float
    t1: float
    campaigns: list[int] | None = None
    kinds: list[str] | None = None
    after: tuple[float, int] | None = None
    limit: int = 10000
    tenant: str | None = None

    def selects_nothing(self) -> bool:
        return (self.campaigns == [] and self.tenant is None) or self.kinds == []


class CatchesUp:
    """An index fed by an event log that keeps, with each write, how far into the log
    its rows go (``EventLog.mark``), and indexes the rest at the next start: what a
    killed run held in memory, and the events of a stop's drain (told after the API
    closed the index). Both indexes (SQLite here, Redis in ``shared_state``) are one:
    they buffer rows (``_add``), read their kept mark (``_kept_mark``) and write the
    mark in ``_mark`` with their rows in ``flush``."""

    pending: list[Any]
    log: Any = None
    mark_key = ""
    _mark: str | None = None
    _mark_written: str | None = None

    def _add(self, events: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _kept_mark(self) -> str | None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def listener(self, events: list[dict[str, Any]]) -> None:
        """The EventLog listener: buffer rows (cheap; no I/O here)."""
        self._add(events)
        if self.log is not None:
            self._mark = self.log.mark()

    def attach(self, events: Any, keep_days: float = 0.0) -> int:
        """Listen to event log ``events``, first indexing what it holds past this
        index's mark for it (events older than ``keep_days``, the index's retention,
        excepted). Rows added."""
        events.listeners.append(self.listener)
        path = getattr(events, "path", None)
        mine = events.catch_up_mark("event index") if path else None
        if not path or mine is None:
            return 0
        self.log, self.mark_key = events, mark_key(path)
        kept = self._kept_mark()
        n = 0
        cut = False
        if kept:
            oldest = time.time() - keep_days * 86400 if keep_days else 0.0
            try:
                for batch in read_back(path, kept, mine):
                    if n >= CATCH_UP_MAX:
                        cut = True
                        break
                    if oldest:
                        batch = [e for e in batch if not _older(e, oldest)]
                    self._add(batch)
                    n += len(batch)
                    self.flush()  # a batch at a time: memory stays small
            except OSError as e:
                log.warning("event index: the event log cannot be read back (%s)", e)
        self._mark = mine
        self.flush()
        if n:
            log.warning("event index: indexed %d event(s) of %s the last run logged but never"
                        " wrote here (it was killed, or they came after it closed)", n,
                        path)  # fmt: skip
        if cut:
            log.warning("event index: the rest of %s past them is not indexed (more than %d"
                        " events: another process's run on this spool, `fastsend send`?)",
                        path, CATCH_UP_MAX)  # fmt: skip
        return n


class EventIndex(CatchesUp):
    def __init__(self, spool_dir: str) -> None:
        self.path = os.path.join(spool_dir, "events.db")
        self.db = connect(self.path, synchronous="NORMAL", schema=_SCHEMA)
        self.pending: list[tuple[Any, ...]] = []
        self.pending_meta: list[tuple[int, bytes, bytes]] = []
        self.last_flush = time.monotonic()
        self.outage = False  # the last flush found the storage refusing writes
        self.failed_at = 0.0  # monotonic time of that flush

    def _kept_mark(self) -> str | None:
        get = self.db.execute
        kept = get("SELECT mark FROM marks WHERE log=?", (self.mark_key,)).fetchone()
        if kept is None and self.log is not None:
            # Kept by a version before the node's id (events.legacy_mark_key): its last
            # stop's drain, written after the index closed, is indexed from it. (This
            # store is the node's own: no cloned host shares the old key here.)
            legacy = legacy_mark_key(self.log.path)
            kept = get("SELECT mark FROM marks WHERE log=?", (legacy,)).fetchone()
        return None if kept is None else str(kept[0])

    # -- writing -------------------------------------------------------------

    def _add(self, events: list[dict[str, Any]]) -> None:
        dumps = orjson.dumps
        add = self.pending.append
        for e in events:
            mid = e.get("id")
            if not isinstance(mid, int):
                continue  # campaign-level events (paused, ...) are not per message
            rcpt = e.get("rcpt") or ""
            add(
                (
                    mid,
                    e.get("time") or time.time(),
                    str(e.get("event", "")),
                    int(e.get("campaign") or 0),
                    rcpt.rpartition("@")[2].lower() if isinstance(rcpt, str) else "",
                    str(e.get("source_ip") or ""),
                    dumps(e),
                )
            )

    def add_meta(self, rows: Iterable[tuple[int, list[str], dict[str, Any]]]) -> None:
        dumps = orjson.dumps
        self.pending_meta.extend((mid, dumps(tags), dumps(md)) for mid, tags, md in rows)

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        now = self.last_flush = time.monotonic()
        mark = self._mark if self._mark != self._mark_written else None
        if not self.pending and not self.pending_meta and mark is None:
            return
        if self.outage and now - self.failed_at < OUTAGE_RETRY:
            return  # the storage refused the last try: not every 0.2 s (rows wait)
        rows, self.pending = self.pending, []
        meta, self.pending_meta = self.pending_meta, []
        db = self.db
        try:
            with transaction(db, immediate=False):
                if rows:
                    db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?)", rows)
                if meta:
                    db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?,?)", meta)
                if mark is not None:
                    db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", (self.mark_key, mark))
        except sqlite3.Error as e:
            problem = storage_problem(e)
            if problem is None:
                raise
            # A full disk (a read-only file system, an I/O error): the rows wait
            # for the next flush (the once-per-message checks and the export read
            # this index), up to MAX_PENDING; said once, not a traceback a flush.
            self.pending[:0] = rows[-MAX_PENDING:]
            self.pending_meta[:0] = meta[-MAX_PENDING:]
            if not self.outage:
                log.warning("event index: %s %s (%s); its rows are kept (up to %d) and"
                            " written once it can be", self.path, problem, e,
                            MAX_PENDING)  # fmt: skip
            self.outage = True
            self.failed_at = time.monotonic()
            return
        if mark is not None:
            self._mark_written = mark
        if self.outage:
            log.warning("event index: %s is written again", self.path)
            self.outage = False

    # -- reading -------------------------------------------------------------

    def for_message(self, mid: int) -> list[dict[str, Any]]:
        self.flush()
        rows = self.db.execute(
            "SELECT data FROM events WHERE msg=? ORDER BY time, rowid", (mid,)
        ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    def logged(self, ids: Collection[int], events: tuple[str, ...]) -> set[int]:
        """Which of ``ids`` have one of ``events`` indexed (what is buffered included)."""
        self.flush()
        if not ids:
            return set()
        sql = (
            "SELECT DISTINCT msg FROM events WHERE msg BETWEEN ? AND ?"
            f" AND event IN ({','.join('?' * len(events))})"
        )
        want = set(ids)
        rows = self.db.execute(sql, (min(want), max(want), *events))
        out = {r[0] for r in rows if r[0] in want}
        if self.pending:  # the storage refused them (a full disk): still told
            out.update(r[0] for r in self.pending if r[0] in want and r[2] in events)
        return out

    def deliveries(self, ids: Collection[int]) -> dict[int, tuple[float, dict[str, Any]]]:
        """{id: (time, event)} of the last "delivered" event of each of ``ids`` that has
        one: where an open, a click or a complaint arriving after the rollups forgot
        the delivery (a restart, another node, ``remember_messages``) was sent from."""
        self.flush()
        out: dict[int, tuple[float, dict[str, Any]]] = {}
        want = sorted({int(i) for i in ids})
        for k in range(0, len(want), 500):
            part = want[k : k + 500]
            rows = self.db.execute(
                "SELECT msg, time, data FROM events WHERE event='delivered' AND msg IN"
                f" ({','.join('?' * len(part))}) ORDER BY time, rowid",
                part,
            ).fetchall()
            for mid, t, data in rows:
                out[int(mid)] = (float(t), orjson.loads(data))
        return out

    def meta(self, mid: int) -> tuple[list[str], dict[str, Any]]:
        self.flush()
        r = self.db.execute("SELECT tags, metadata FROM meta WHERE msg=?", (mid,)).fetchone()
        if r is None:
            return [], {}
        return orjson.loads(r[0]), orjson.loads(r[1])

    def stats(
        self, since: float, campaigns: list[int] | None, by: str
    ) -> list[tuple[str, str, int]]:
        """(group, event, count) over events since ``since``; ``by`` is
        campaign, domain or source_ip; ``campaigns`` limits to a tenant's."""
        if by not in ("campaign", "domain", "source_ip"):
            raise ValueError(by)
        self.flush()
        sql = f"SELECT {by}, event, COUNT(*) FROM events WHERE time >= ?"
        args: list[Any] = [since]
        if campaigns is not None:
            if not campaigns:
                return []
            sql += f" AND campaign IN ({','.join('?' * len(campaigns))})"
            args.extend(campaigns)
        sql += f" GROUP BY {by}, event"
        return [(str(g), str(e), int(n)) for g, e, n in self.db.execute(sql, args)]

    # -- bulk export (GET /v1/events) -------------------------------------------

    def _where(self, q: ExportQuery, after: tuple[float, int] | None) -> tuple[str, list[Any]]:
        sql = "time >= ? AND time < ?"
        args: list[Any] = [q.t0 if after is None else max(q.t0, after[0]), q.t1]
        if after is not None:
            sql += " AND NOT (time = ? AND rowid <= ?)"
            args += [after[0], after[1]]
        if q.campaigns is not None:
            sql += f" AND (campaign IN ({','.join('?' * len(q.campaigns))})"
            args += q.campaigns
            if q.tenant is not None:
                # (JSON read only for the rows of no campaign: rare, and the time
                # index has already narrowed the rows.)
                sql += " OR (campaign = 0 AND json_extract(CAST(data AS TEXT), '$.tenant') = ?)"
                args.append(q.tenant)
            sql += ")"
        if q.kinds is not None:
            sql += f" AND event IN ({','.join('?' * len(q.kinds))})"
            args += q.kinds
        return sql, args

    def export_end(self, q: ExportQuery) -> tuple[tuple[float, int] | None, bool]:
        """(the last row of the page starting after ``q.after``, whether more follow):
        one walk of the time index over ``q.limit`` rows, before anything is streamed.
        (None, False): the page is everything left (fewer than ``q.limit`` rows)."""
        self.flush()
        if q.selects_nothing():
            return None, False
        w, args = self._where(q, q.after)
        rows = self.db.execute(
            f"SELECT time, rowid FROM events WHERE {w} ORDER BY time, rowid LIMIT 2 OFFSET ?",
            (*args, q.limit - 1),
        ).fetchall()
        if not rows:
            return None, False
        return (float(rows[0][0]), int(rows[0][1])), len(rows) > 1

    def export_chunk(
        self, q: ExportQuery, after: tuple[float, int] | None, until: tuple[float, int] | None,
        n: int = 1000,
    ) -> tuple[list[bytes], tuple[float, int] | None]:  # fmt: skip
        """Up to ``n`` event bodies past ``after`` (in time, then recording order), not
        past ``until``; and the position of the last one (None: nothing left)."""
        if q.selects_nothing():
            return [], None
        w, args = self._where(q, after)
        if until is not None:
            w += " AND (time < ? OR (time = ? AND rowid <= ?))"
            args += [until[0], until[0], until[1]]
        rows = self.db.execute(
            f"SELECT time, rowid, data FROM events WHERE {w} ORDER BY time, rowid LIMIT ?",
            (*args, n),
        ).fetchall()
        if not rows:
            return [], None
        return [bytes(r[2]) for r in rows], (float(rows[-1][0]), int(rows[-1][1]))

    def prune(self, before: float, chunk: int = 5000) -> int:
        """Delete events older than ``before`` (``[analytics] events_days``), ``chunk``
        rows per transaction (the API's writes wait at most one chunk), and the tags
        and metadata of messages older than every event left. Rows deleted."""
        n = 0
        while True:
            cur = self.db.execute(
                "DELETE FROM events WHERE rowid IN"
                " (SELECT rowid FROM events WHERE time < ? LIMIT ?)",
                (before, chunk),
            )
            n += int(cur.rowcount)
            if cur.rowcount < chunk:
                break
        # Message ids grow: a message older than the oldest one with an event left.
        self.db.execute(
            "DELETE FROM meta WHERE msg < COALESCE((SELECT MIN(msg) FROM events),"
            " (SELECT MAX(msg) + 1 FROM meta))"
        )
        return n

    def close(self) -> None:
        self.flush()
        self.db.close()
        # Events after this (a stop's drain) are indexed by the next start (its mark).
        self.log = None


def _older(e: dict[str, Any], oldest: float) -> bool:
    t = e.get("time")
    return isinstance(t, int | float) and t < oldest
