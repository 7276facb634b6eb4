"""The embedded spool: one SQLite database in WAL mode.

Layout: ``DIR/spool.db`` holds two tables. ``campaigns`` stores each campaign
once (its self-contained spec as JSON); ``messages`` has one row per recipient
with its variables (orjson), state, attempts, times and last reply. A partial
index over pending rows (``state IN (queued, deferred)``) keyed by next attempt
time makes "what is due" a short index range scan however many final rows the
table holds. A campaign's rows are found by its runs of consecutive ids
(``campaign_rows``, one row per run, written in the transaction that spools
them), not by an index entry per row. ``blobs`` holds bodies shared by many rows once, by SHA-256
(``Spool.put_blob``), ``blob_rows`` the id runs that hold each.

Durability: WAL mode. Adding messages (what makes mail "accepted") commits with
``synchronous=FULL``: on disk when it returns, power loss included. Claims and
outcomes commit with ``synchronous=NORMAL``: safe against the crash of any
process (kill -9), and after a power loss the worst case is a retried message,
never a lost one. Callers batch many rows per transaction; statements carry
many rows each (multi-row INSERT, ``UPDATE ... FROM (VALUES ...)``). Claiming
is a SELECT and an UPDATE by runs of ids, in one transaction. Deliveries are
written by runs of ids too (nothing bound per row), without their reply text:
the delivered event carries it; a bounce or deferral keeps its reply whole.

Rows spooled for a waiting dispatcher skip the queue: when the dispatcher's
claim (``claim_next``) came back short, rows added within ROOM_TTL (up to that
room, of an active campaign) are inserted already in flight and handed out by
the next claims from memory ("parked"): no due-index entry, no SELECT, no
UPDATE. In the database they are in flight from the accepting commit, so
views count them in flight and a crash turns them back to queued (recover).

Single writer: a SQLiteSpool object belongs to one process (the supervisor, or
an API listener in the same process). Other processes may open read-only views
(``fastsend queue``) at any time; WAL lets them read while it writes.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from itertools import chain, repeat, starmap
from typing import Any

import msgspec
import orjson

from fastsend import sqlitedb
from fastsend._accel import pick
from fastsend.retry import retry_hint
from fastsend.ring import clear_write_logs, read_write_logs
from fastsend.spool.base import (
    _LOCKS,
    AGE_BUCKETS_MIN,
    CAMPAIGN_STATUSES,
    CANCELLED,
    DEFERRED,
    DELIVERED,
    ENDED,
    FINAL_STATES,
    IDEM_RELEASED,
    INFLIGHT,
    INGEST_STATUSES,
    ORPHAN_GRACE,
    QUEUED,
    SITE_STATUSES,
    STAGING,
    STATE_NAMES,
    SUPERVISOR_LOCK,
    SUPPRESSED,
    TAKEN_TTL,
    TEMPORARY_STORAGE,
    UNKNOWN_CODE,
    UNKNOWN_ENHANCED,
    CampaignInfo,
    Claimed,
    IdemLost,
    IdemMark,
    IdemRecord,
    IngestBusy,
    IngestJob,
    IngestMark,
    Result,
    Spool,
    SpoolBusy,
    SpoolError,
    SpoolLocked,
    SpoolStorageError,
    TakenBack,
    Untold,
    holder_tag,
    id_runs,
    idem_part,
    idem_part_ids,
    lock_file,
    storage_problem,
    unknown_text,
    unlock_file,
)
from fastsend.spool.fair import fair_shares, rank
from fastsend.sqlitedb import connect
from fastsend.sqlitedb import transaction as _transaction
from fastsend.wire import blob_ref

__all__ = ["SQLiteSpool", "SpoolError"]


@contextlib.contextmanager
def transaction(
    db: sqlite3.Connection, *, immediate: bool = True, synchronous: str = ""
) -> Iterator[None]:
    """:func:`fastsend.sqlitedb.transaction`; the storage refusing a write (a
    full disk, a read-only file system, an I/O error) is a
    :class:`SpoolStorageError` (the transaction rolled back): an outage of the
    spool that the supervisor rides out (``outage_errors``)."""
    try:
        with _transaction(db, immediate=immediate, synchronous=synchronous):
            yield
    except sqlite3.Error as e:
        problem = storage_problem(e)
        if problem is None:
            raise
        raise SpoolStorageError(f"the spool's storage {problem} ({e})") from e


def _has_schema(db: sqlite3.Connection) -> bool:
    """Whether the database holds a spool (its messages table)."""
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
    ).fetchone()
    return row is not None


def _wal_pending(path: str) -> bool:
    """The database at ``path`` has a write-ahead log with frames in it."""
    try:
        return os.path.getsize(path + "-wal") > 0
    except OSError:
        return False

SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    tenant TEXT NOT NULL DEFAULT 'default',
    created REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',
    spec BLOB NOT NULL,
    options BLOB NOT NULL DEFAULT '{}',
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    campaign INTEGER NOT NULL,
    rcpt TEXT NOT NULL,
    domain TEXT NOT NULL,
    vars BLOB NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    next_at REAL NOT NULL,
    updated REAL NOT NULL,
    last_code INTEGER NOT NULL DEFAULT 0,
    last_enhanced TEXT NOT NULL DEFAULT '',
    last_text TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_pending ON messages(campaign, next_at) WHERE state IN (0, 2);
CREATE INDEX IF NOT EXISTS messages_deferred ON messages(domain, next_at) WHERE state = 2;
CREATE TABLE IF NOT EXISTS campaign_rows (
    campaign INTEGER NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    PRIMARY KEY (campaign, first)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS campaigns_tenant ON campaigns(tenant, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    touched REAL NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,
    looked REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS blob_rows (
    digest TEXT NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blob_rows_digest ON blob_rows(digest);
CREATE TABLE IF NOT EXISTS ingests (
    id INTEGER PRIMARY KEY,
    campaign INTEGER NOT NULL,
    source BLOB NOT NULL,
    total INTEGER NOT NULL,
    line INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'running',
    created REAL NOT NULL,
    untold_first INTEGER NOT NULL DEFAULT 0,
    untold_last INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fp TEXT NOT NULL,
    holder BLOB NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL DEFAULT x'',
    created REAL NOT NULL,
    expires REAL NOT NULL,
    lease REAL NOT NULL DEFAULT 0,
    parts BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency(expires);
CREATE TABLE IF NOT EXISTS pruned (
    campaign INTEGER NOT NULL,
    state INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (campaign, state)
) WITHOUT ROWID;
"""

SCHEMA_VERSION = "1"


class SpoolTooNew(SpoolError):
    """The spool was made by a newer fastsend (``meta.schema`` above
    ``SCHEMA_VERSION``): a usage error (exit 2), never opened. Before, an older
    fastsend (a downgrade, a second host with an older package) opened it
    without a word and wrote rows in its own layout into the newer one's
    tables (a view read it as if it knew its meaning)."""


def _refuse_newer(db: sqlite3.Connection, path: str) -> None:
    """Raise :class:`SpoolTooNew` (the database closed) when ``db``'s spool schema
    is not one this fastsend knows: a number above ``SCHEMA_VERSION``, or no
    number. A database without the meta table yet (being made) passes."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.OperationalError:  # no meta table: a spool not made yet
        return
    if row is None:
        return
    try:
        newer = int(row[0]) > int(SCHEMA_VERSION)
    except (TypeError, ValueError):
        newer = True
    if newer:
        db.close()
        raise SpoolTooNew(
            f"the spool in {path} was made by a newer fastsend (spool schema {row[0]!s};"
            f" this fastsend reads {SCHEMA_VERSION}): run the fastsend that made it (or a"
            " newer one); this one would write its own layout into it"
        )
# meta: every row in flight has an id >= this (recover() scans from it)
INFLIGHT_LOW = "inflight_low"
# meta: the ids ("first-last,..." runs) of outcomes recorded whose events may not
# be written yet (record_outcomes adds them in its transaction; told() clears)
UNTOLD = "untold"
ROWS_PER_STATEMENT = 256  # rows per multi-row statement (4-7 parameters each)
ROOM_TTL = 1.0  # s a short claim's room takes rows spooled after it (see _take_parked)
# The WAL is copied back into the database (checkpoint, in the commit that
# passes this many pages) every ~40 MB, not SQLite's ~4 MB: a row's page is
# written at its INSERT, its claim and its outcome within a few thousand
# messages, so a short interval copied most pages twice or more (about 0.3 us
# per message in the supervisor, bench/supervisor_stages.py).
WAL_CHECKPOINT_PAGES = 10_000
# While a run delivers (``checkpoint_behind``): a checkpoint this often in a
# thread of its own, on a connection of its own (SQLite's PASSIVE: it never
# waits for nor holds up the supervisor's writes), so the commit that passes
# WAL_CHECKPOINT_PAGES does not stall the supervisor's loop copying ~40 MB and
# syncing the file, and the run's end finds a short WAL instead of the run's
# last ~40 MB to copy, sync and delete before the command can exit.
CHECKPOINT_EVERY = 1.0


# A campaign's rows: its id runs (campaign_rows, written with the rows), each a
# rowid range of messages; ``m`` is the messages row, ``?`` the campaign(s).
_OF_RUNS = (
    "campaign_rows r JOIN messages m ON m.id BETWEEN r.first AND r.last"
    " AND m.campaign = r.campaign WHERE r.campaign"
)
_OF_INDEX = "messages m WHERE m.campaign"  # a read-only view of a spool made before runs
# The campaigns with pending rows, read off the pending index (campaign,
# next_at) one seek each (a skip-scan written out), however many rows each
# holds; a claim takes the active ones with a row due by ?1 (and their tenant)
# and shares its room between them (spool/fair.py).
_PENDING_CAMPAIGNS = (
    "WITH RECURSIVE c(id) AS ("
    " SELECT (SELECT campaign FROM messages WHERE state IN (0, 2) ORDER BY campaign LIMIT 1)"
    " UNION ALL SELECT (SELECT campaign FROM messages WHERE state IN (0, 2) AND campaign > c.id"
    " ORDER BY campaign LIMIT 1) FROM c WHERE c.id IS NOT NULL)"
    " SELECT {cols} FROM c LEFT JOIN campaigns k ON k.id = c.id WHERE c.id IS NOT NULL"
    " AND (k.status = 'active' OR k.id IS NULL)"  # (rows of a campaign gone: claimed, bounced)
)
_DUE_CAMPAIGNS = _PENDING_CAMPAIGNS.format(cols="c.id, k.tenant") + (
    " AND EXISTS (SELECT 1 FROM messages WHERE campaign = c.id AND state IN (0, 2)"
    " AND next_at <= ?1)"
)
_NEXT_DUE = _PENDING_CAMPAIGNS.format(
    cols="MIN((SELECT MIN(next_at) FROM messages WHERE campaign = c.id AND state IN (0, 2)))"
)
# With several: each one's due rows too, counted off the index (at most ?2).
_DUE_COUNTS = _PENDING_CAMPAIGNS.format(
    cols="c.id, k.tenant, (SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE campaign = c.id"
    " AND state IN (0, 2) AND next_at <= ?1 LIMIT ?2))"
)
DUE_REUSE = 0.1  # s a claim's counts of due rows serve the next claims (_due_counts)


class _Dues(msgspec.Struct):
    """A claim's count of each campaign's due rows (SQLiteSpool._due_counts)."""

    gen: int  # SQLiteSpool._due_gen when counted
    at: float  # the claim's now
    mono: float  # monotonic time when counted
    cap: int  # counted up to
    counts: dict[int, int]  # campaign -> due rows (less what claims took since)
    big: set[int]  # those that may have more than counted


# One campaign's due rows, counted up to ?3.
_DUE_OF = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE campaign = ?1 AND state IN (0, 2)"
    " AND next_at <= ?2 LIMIT ?3)"
)
# A campaign's due rows, oldest due first (at most its share), its campaign
# still active; several campaigns' in one statement (UNION ALL of these).
_CLAIM_OF = (
    "SELECT * FROM (SELECT id, campaign, rcpt, domain, vars, attempts, created FROM messages"
    " WHERE campaign = ? AND state IN (0, 2) AND next_at <= ?"
    " AND NOT EXISTS (SELECT 1 FROM campaigns WHERE id = ? AND status != 'active')"
    " ORDER BY next_at LIMIT ?)"
)


@functools.cache
def _claimed_sql(n: int) -> str:
    """The UPDATE marking ``n`` rows (ids) in flight."""
    return f"UPDATE messages SET state=1 WHERE id IN ({','.join('?' * n)})"


CLAIM_TERMS = 64  # campaigns per claiming statement (by powers of 2: a few texts, cached)


@functools.cache
def _claim_of(n: int) -> str:
    """The SELECT of ``n`` campaigns' shares (each: campaign, now, campaign, share)."""
    return " UNION ALL ".join([_CLAIM_OF] * n)
# Runs of consecutive ids of one campaign, for the rows after ?1 (ids are
# handed out in order, so a run never holds another campaign's row).
_RUNS_OF_ROWS = (
    "INSERT INTO campaign_rows(campaign, first, last)"
    " SELECT campaign, MIN(id), MAX(id) FROM (SELECT id, campaign,"
    " id - ROW_NUMBER() OVER (PARTITION BY campaign ORDER BY id) AS run"
    " FROM messages WHERE id > ?1) GROUP BY campaign, run"
)


def _runs_cover(db: sqlite3.Connection) -> int | None:
    """The last id the campaign runs cover, if they cover every row (else None:
    rows spooled by a version that kept no runs)."""
    try:  # one statement: one snapshot of both
        done, top = db.execute(
            "SELECT (SELECT MAX(last) FROM campaign_rows), (SELECT MAX(id) FROM messages)"
        ).fetchone()
    except sqlite3.OperationalError:  # a read-only view of a spool made before runs
        return None
    done, top = done or 0, top or 0
    return done if done >= top else None


# The workers' write logs of the process supervising the spool (a directory in
# it: fastsend.ring.read_write_logs), read by recover() after a kill -9.
WRITE_LOGS = "writes"

def _campaign_runs(db: sqlite3.Connection) -> None:
    """A campaign's rows are found by its id runs, not an index on
    messages(campaign) (one entry written per row spooled). A spool made
    before the runs (or rows an older version spooled since) gets them from
    its rows, and loses that index, in one transaction."""
    old = "SELECT 1 FROM sqlite_master WHERE type='index' AND name='messages_campaign'"
    if _runs_cover(db) is not None and db.execute(old).fetchone() is None:
        return  # nothing to do: no write
    with transaction(db):
        if _runs_cover(db) is None:
            done = db.execute("SELECT MAX(last) FROM campaign_rows").fetchone()[0] or 0
            db.execute(_RUNS_OF_ROWS, (done,))
        db.execute("DROP INDEX IF EXISTS messages_campaign")


def _pending_index(db: sqlite3.Connection) -> None:
    """The pending rows are indexed by (campaign, next_at) (the claim shares its
    room between campaigns: spool/fair.py); a spool made before indexed them by
    next_at alone (``messages_due``): dropped once its replacement is built."""
    old = "SELECT 1 FROM sqlite_master WHERE type='index' AND name='messages_due'"
    if db.execute(old).fetchone() is not None:
        with transaction(db):
            db.execute("DROP INDEX IF EXISTS messages_due")


def _idem_columns(db: sqlite3.Connection) -> None:
    """A spool made before idempotency records had a lease and parts, or before
    ingest jobs kept their untold batch and their duplicates: add them."""
    for table, cols in (
        (
            "idempotency",
            (("lease", "REAL NOT NULL DEFAULT 0"), ("parts", "BLOB NOT NULL DEFAULT x''")),
        ),
        ("ingests", (("untold_first", _ZERO), ("untold_last", _ZERO), ("duplicates", _ZERO))),
        ("campaigns", (("reason", "TEXT NOT NULL DEFAULT ''"),)),
    ):
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for col, decl in cols:
            if col not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")


_ZERO = "INTEGER NOT NULL DEFAULT 0"


def _sizes(n: int) -> Iterator[int]:
    """``n`` rows as statement sizes from a fixed set: ROWS_PER_STATEMENT while
    that many are left, then the powers of two of the rest. Preparing a
    multi-row statement costs several times its execution (~1 ms for 200
    rows), so each size is prepared once and reused from the connection's
    statement cache, whatever the batches' sizes."""
    while n >= ROWS_PER_STATEMENT:
        yield ROWS_PER_STATEMENT
        n -= ROWS_PER_STATEMENT
    bit = ROWS_PER_STATEMENT >> 1
    while n:
        if n & bit:
            yield bit
            n -= bit
        bit >>= 1


@functools.lru_cache(maxsize=32)
def _insert_sql(n: int, mixed: bool) -> str:
    """``n`` rows: ?1 campaign, ?2 now and ?3 the rows' state, bound once; then
    per row its rcpt, domain and vars (as text: ``insert_params``), and when
    ``mixed`` its own state. No id: each row takes the largest id + 1, as
    add_messages counted them (checked)."""
    if mixed:
        rows = ",".join(
            f"(?1,?{j},?{j + 1},CAST(?{j + 2} AS BLOB),?{j + 3},?2,?2,?2)"
            for j in range(4, 4 + 4 * n, 4)
        )
    else:
        rows = ",".join(
            f"(?1,?{j},?{j + 1},CAST(?{j + 2} AS BLOB),?3,?2,?2,?2)"
            for j in range(4, 4 + 3 * n, 3)
        )
    return (
        "INSERT INTO messages(campaign, rcpt, domain, vars, state, created, next_at, updated)"
        " VALUES " + rows
    )


def _text_var(v: Any) -> Any:
    """A row's vars to bind: as text, which Python's sqlite3 binds at a third
    of the cost of bytes (those go through its adapter look-up, ~0.3 us
    each); the statement stores them back as the same bytes (CAST AS BLOB).
    Vars that are not UTF-8 bytes (never written by fastsend: JSON) are bound
    as given: CAST leaves a blob as it is."""
    if type(v) is bytes:
        try:
            return v.decode()
        except UnicodeDecodeError:
            pass
    return v


def insert_params(
    params: list[Any],
    rows: list[tuple[str, str, bytes]],
    at: int,
    end: int,
    states: list[int] | None,
) -> None:
    """Append to ``params`` what ``_insert_sql`` binds per row for
    ``rows[at:end]``: its rcpt, domain and vars (as text: ``_text_var``), and
    its state from ``states`` when given (a mixed chunk). Compiled twin in
    ``_outcomes.pxi``: no column tuples, slices or a tuple per row."""
    part = rows[at:end]
    rcpts, domains, vars_ = zip(*part, strict=True) if part else ((), (), ())
    cols = [rcpts, domains, map(_text_var, vars_)]
    if states is not None:
        cols.append(states[at:end])
    params.extend(chain.from_iterable(zip(*cols, strict=True)))


py_insert_params = insert_params  # the reference (tests compare the twin with it)
insert_params = pick(insert_params)


class RowWriter:
    """Rows spooled into ``messages`` through the spool's connection ``db``
    (``path``: its database file), inside the caller's transaction. Compiled
    twin in ``_spooldb.pxi``: the same multi-row INSERTs, each size prepared
    once on the connection's own SQLite handle, each row's values bound where they lie
    (Python's sqlite3 binds each parameter at ~0.2 us, most of a multi-row
    INSERT's cost); it raises ImportError where it cannot use the
    interpreter's SQLite, and the spool uses this reference instead."""

    def __init__(
        self, db: sqlite3.Connection, path: str, sql: Callable[[int, bool], str]
    ) -> None:
        self.db = db
        self.sql = sql

    def close(self) -> None:
        """Nothing held (the compiled twin finalizes its statement)."""

    def insert(
        self,
        first: int,
        campaign: int,
        now: float,
        rows: list[tuple[str, str, bytes]],
        at: int,
        end: int,
        state: int,
        states: list[int] | None,
    ) -> int:
        """Insert ``rows[at:end]`` (rcpt, domain, vars) of ``campaign`` at
        ``now``, each in ``state`` or, when ``states`` is given, in its own
        ``states[k]``; the k-th row must get id ``first + k``. Returns the last
        id inserted when every row got its id, else the last id of the first
        statement whose ids differ (nothing after it is inserted).

        Multi-row INSERTs (up to ROWS_PER_STATEMENT rows each, sizes from
        ``_sizes``): one statement per chunk instead of one step per row; a
        chunk whose rows share one state binds it once."""
        db = self.db
        last = first + at - 1
        for n in _sizes(end - at):
            mixed = states is not None and any(s != state for s in states[at : at + n])
            params: list[Any] = [campaign, now, state]
            insert_params(params, rows, at, at + n, states if mixed else None)
            got = db.execute(self.sql(n, mixed), params).lastrowid
            last = -1 if got is None else got
            at += n
            if last != first + at - 1:  # ids are handed out as counted, or nothing is
                return last
        return last


class _Checkpoints:
    """WAL checkpoints behind the spool's writer (see CHECKPOINT_EVERY): a
    daemon thread with its own connection (sqlite3 lets go of the GIL while it
    copies and syncs), until :meth:`last` (one more pass at once, then it
    ends by itself) or :meth:`stop` (waits for it)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.wake = threading.Event()
        self.ending = False
        self.thread = threading.Thread(target=self._run, name="spool-checkpoints", daemon=True)

    @classmethod
    def start(cls, path: str) -> _Checkpoints | None:
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:  # best effort: SQLite's own checkpoints remain
            return None
        self = cls(db)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                self.wake.wait(CHECKPOINT_EVERY)
                self.wake.clear()
                with contextlib.suppress(sqlite3.Error):  # busy, full disk: the writer's concern
                    self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                if self.ending:
                    return
        finally:
            self.db.close()

    def last(self) -> None:
        self.ending = True
        self.wake.set()

    def stop(self) -> None:
        self.last()
        self.thread.join()


PyRowWriter = RowWriter  # the reference (tests compare the twin with it)
RowWriter = pick(PyRowWriter)  # type: ignore[misc]


@functools.lru_cache(maxsize=16)
def _outcome_sql(n: int) -> str:
    return (
        "WITH v(id, state, attempts, next_at, code, enhanced, text) AS (VALUES "
        + ",".join(["(?,?,?,?,?,?,?)"] * n)
        + ") UPDATE messages SET state=v.state, attempts=v.attempts, next_at=v.next_at,"
        " updated=?, last_code=v.code, last_enhanced=v.enhanced, last_text=v.text"
        " FROM v WHERE messages.id=v.id"
    )


_DELIVERED_SQL = (
    f"UPDATE messages SET state={DELIVERED}, attempts=?, next_at=0, updated=?, last_code=?,"
    " last_enhanced=?, last_text='' WHERE id BETWEEN ? AND ?"
)

_by_id = operator.attrgetter("id")


def delivered_runs(
    results: Iterable[Result], now: float, delivered: int
) -> tuple[list[tuple[int, float, int, str, int, int]], list[Result]]:
    """``record_results``' deliveries as the parameters of ``_DELIVERED_SQL``
    (attempts, ``now``, code, enhanced, first id, last id): one per run of
    consecutive ids sharing (attempts, code, enhanced), the groups in the order
    they first appear, each group's ids sorted; and the other outcomes, in
    their order (compiled twin in ``_outcomes.pxi``: no key tuple per outcome)."""
    done: dict[tuple[int, int, str], list[int]] = {}
    rest: list[Result] = []
    key: tuple[int, int, str] | None = None
    ids: list[int] = []
    for r in results:
        if r.state == delivered:
            k = (r.attempts, r.code, r.enhanced)
            if k != key:  # consecutive outcomes mostly share it
                key, ids = k, done.setdefault(k, [])
            ids.append(r.id)
        else:
            rest.append(r)
    runs: list[tuple[int, float, int, str, int, int]] = []
    for (attempts, code, enhanced), ids in done.items():
        ids.sort()
        runs += [(attempts, now, code, enhanced, a, b) for a, b in id_runs(ids)]
    return runs, rest


py_delivered_runs = delivered_runs  # the reference (tests compare the twin with it)
delivered_runs = pick(delivered_runs)
class SQLiteSpool(Spool):
    def __init__(self, directory: str, *, readonly: bool = False) -> None:
        self.directory = directory
        self._holds: set[str] = set()  # ingest lock files this object holds
        self._parked: list[Claimed] = []  # spooled in flight for a waiting claim
        self._untold = False  # meta UNTOLD may name outcomes whose events are not out
        self._parked_cids: set[int] = set()  # their campaigns (or more): never fewer
        self._room: dict[int, tuple[int, float]] = {}  # claim key -> (room, monotonic time)
        self._ranks: dict[int, tuple[str, int, int]] = {}  # campaign -> (tenant, priority, weight)
        self._turn = 0  # claims shared between campaigns so far (spool/fair.py)
        self._shared = False  # the last claim was shared between campaigns
        self._last_due = 1  # campaigns with mail due at the last shared claim
        self._dues: _Dues | None = None  # the last shared claim's counts (_due_counts)
        # (change count, now, monotonic time) of a claim that found nothing due
        self._quiet: tuple[int, float, float] | None = None
        self._due_gen = 0  # changes that may make mail due (_due_counts)
        self._taken_back: list[TakenBack] = []  # recover(): for their deferred events
        # Campaigns created here: [rows spooled, of which suppressed, the
        # database's data_version at creation] (see tally()).
        self._tallies: dict[int, list[int]] = {}
        self._prune_from = 0  # prune_final: the last id a sweep looked at
        self._behind: _Checkpoints | None = None  # checkpoint_behind's thread
        self.path = os.path.join(directory, "spool.db")
        if readonly and not os.path.exists(self.path):
            raise SpoolError(f"no spool at {directory!r} (missing {self.path})")
        try:
            self._open(readonly)
        except (sqlite3.Error, OSError) as e:
            problem = storage_problem(e)
            with contextlib.suppress(OSError):
                if os.statvfs(directory).f_flag & os.ST_RDONLY:
                    problem = "is on a read-only file system"
            if readonly and problem is not None and not _wal_pending(self.path):
                # A read-only view of a spool on a read-only file system (a
                # snapshot, a mount for inspection): nothing can write it, so
                # it is read as immutable (no -shm to create).
                self._open_immutable()
                return
            code = getattr(e, "sqlite_errorcode", 0) or 0
            if problem is None and code & 0xFF in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
                # Another process holds its write lock past the lock wait: not
                # now, try again (75); it was exit 2, "a usage or config error".
                raise SpoolLocked(
                    f"the spool at {directory!r} is locked by another process"
                    f" (waited {sqlitedb.TIMEOUT:.0f} s: {e}); try again later"
                ) from e
            if problem in TEMPORARY_STORAGE:
                # A full disk is not a usage error: try again once there is room
                # (75; it was 2, and serve under Restart=on-failure is restarted
                # either way, but a script or a job runner reads the status).
                raise SpoolStorageError(
                    f"the spool at {directory!r} {problem} ({e}); try again once there is room"
                ) from e
            raise SpoolError(
                f"the spool at {directory!r} {problem or 'cannot be opened'} ({e})"
                if problem
                else f"the spool at {directory!r} cannot be opened: {e}"
            ) from e
        if readonly and not _has_schema(self.db):
            # A spool whose creation a full disk cut short (serve, send) holds an
            # empty spool.db: a view of it ended in a traceback ("no such table").
            self.db.close()
            raise SpoolError(
                f"no spool at {directory!r} ({self.path} holds none: its creation did"
                " not finish; a command that writes the spool makes it)"
            )

    def _open(self, readonly: bool) -> None:
        # NORMAL in WAL mode: a commit survives a crash of any process (kill -9)
        # but not a power loss. That is enough for claims and outcomes (a lost
        # outcome means a retry, never a loss); add_messages, which makes mail
        # "accepted", switches to FULL for its own transaction.
        self.db = connect(self.path, readonly=readonly, synchronous="NORMAL")
        self._writable = not readonly
        _refuse_newer(self.db, self.path)  # before our schema touches a newer one's
        if not readonly:
            self.db.executescript(SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
            )
        self.db.execute(f"PRAGMA busy_timeout={int(sqlitedb.TIMEOUT * 1000)}")
        self.db.execute("PRAGMA cache_size=-16384")
        if not readonly:
            self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        if not readonly:
            _idem_columns(self.db)
            _campaign_runs(self.db)
            _pending_index(self.db)
        self._of = _OF_RUNS if not readonly or _runs_cover(self.db) is not None else _OF_INDEX
        self._rows: RowWriter | PyRowWriter = PyRowWriter(self.db, self.path, _insert_sql)
        if not readonly and RowWriter is not PyRowWriter:
            try:
                self._rows = RowWriter(self.db, self.path, _insert_sql)
            except ImportError:  # not this interpreter's SQLite: the reference
                pass


    def outage_errors(self) -> tuple[type[BaseException], ...]:
        # A full disk (or a read-only remount): kept and retried, not a crash.
        return (SpoolStorageError,)

    def probe(self) -> None:
        with transaction(self.db):
            self.db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('probe', ?)", (repr(time.time()),)
            )

    def _open_immutable(self) -> None:
        self.db = sqlite3.connect(
            f"file:{self.path}?immutable=1", uri=True, isolation_level=None
        )
        self._writable = False
        _refuse_newer(self.db, self.path)
        self._of = _OF_RUNS if _runs_cover(self.db) is not None else _OF_INDEX
        self._rows = PyRowWriter(self.db, self.path, _insert_sql)

    # -- campaigns -----------------------------------------------------------

    def create_campaign(
        self,
        spec: dict[str, Any],
        *,
        name: str = "",
        tenant: str = "default",
        options: dict[str, Any] | None = None,
        status: str = "active",
    ) -> int:
        if status not in ("active", "paused", STAGING):
            raise ValueError(f"bad status {status!r} for a new campaign")
        cur = self.db.execute(
            "INSERT INTO campaigns(name, tenant, created, spec, options, status)"
            " VALUES (?,?,?,?,?,?)",
            (name, tenant, time.time(), orjson.dumps(spec), orjson.dumps(options or {}), status),
        )
        assert cur.lastrowid is not None
        cid = int(cur.lastrowid)
        self._tallies[cid] = [0, 0, self._data_version()]
        return cid

    def _data_version(self) -> int:
        """Changes whenever another connection commits to the database."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def tally(self, campaign_id: int) -> tuple[int, int] | None:
        t = self._tallies.get(campaign_id)
        if t is None or t[2] != self._data_version():
            return None
        return t[0], t[1]

    def _campaign(self, row: tuple[Any, ...]) -> CampaignInfo:
        return CampaignInfo(
            id=row[0],
            name=row[1],
            tenant=row[2],
            created=row[3],
            status=row[4],
            spec=orjson.loads(row[5]),
            options=orjson.loads(row[6]),
            reason=row[7],
        )

    @functools.cached_property
    def _camp_cols(self) -> str:
        """The columns CampaignInfo is read from (a read-only view of a spool
        made before campaigns had a reason reads '' for it)."""
        have = {r[1] for r in self.db.execute("PRAGMA table_info(campaigns)")}
        reason = "reason" if "reason" in have else "''"
        return f"id, name, tenant, created, status, spec, options, {reason}"

    def get_campaign(self, campaign_id: int) -> CampaignInfo | None:
        row = self.db.execute(
            f"SELECT {self._camp_cols} FROM campaigns WHERE id=?", (campaign_id,)
        ).fetchone()
        return self._campaign(row) if row else None

    def list_campaigns(self) -> list[CampaignInfo]:
        rows = self.db.execute(f"SELECT {self._camp_cols} FROM campaigns ORDER BY id").fetchall()
        return [self._campaign(r) for r in rows]

    def campaigns(
        self, tenant: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[CampaignInfo]:
        # (tenant, id) index: a tenant's page reads only its own rows.
        where, args = ("WHERE tenant=? AND id>?", [tenant, after]) if tenant is not None else (
            "WHERE id>?", [after])  # fmt: skip
        args.append(-1 if limit is None else max(0, int(limit)))
        rows = self.db.execute(
            f"SELECT {self._camp_cols} FROM campaigns {where} ORDER BY id LIMIT ?", args
        ).fetchall()
        return [self._campaign(r) for r in rows]

    def set_campaign_status(self, campaign_id: int, status: str, reason: str = "") -> None:
        if status not in CAMPAIGN_STATUSES:
            raise ValueError(f"bad campaign status {status!r}")
        self._due_gen += 1  # (a campaign resumed: its mail is due)
        db = self.db
        # FULL: answered done (an API or CLI cancel, pause, a new campaign made
        # active), so on disk first; at NORMAL a power loss could undo a cancel
        # and send what the operator had stopped. (Rare: one fsync each.)
        with transaction(db, synchronous="FULL"):
            db.execute(
                "UPDATE campaigns SET status=?, reason=? WHERE id=?",
                (status, str(reason), campaign_id),
            )
            if status in ENDED:
                self._tallies.pop(campaign_id, None)  # pending rows end cancelled
                # Pending mail becomes final; what is in flight finishes its attempt.
                # (updated: a cancelled row is kept final_retention_days from now)
                now = time.time()
                db.executemany(
                    "UPDATE messages SET state=?, next_at=0, updated=? WHERE id BETWEEN ? AND ?"
                    " AND campaign=? AND state IN (0, 2)",
                    [(CANCELLED, now, a, b, campaign_id) for a, b in db.execute(
                        "SELECT first, last FROM campaign_rows WHERE campaign=?", (campaign_id,)
                    ).fetchall()],
                )  # fmt: skip

    # -- messages ------------------------------------------------------------

    def add_messages(
        self,
        campaign_id: int,
        rows: Iterable[tuple[str, str, bytes]],
        now: float,
        *,
        state: int = QUEUED,
        suppressed: Collection[int] = (),
        ingest: IngestMark | None = None,
        idem: IdemMark | None = None,
        fps: Sequence[int] | None = None,  # (one process writes this spool: none recorded)
    ) -> list[int]:
        rows = list(rows)
        if not rows and ingest is None:
            return []
        self._due_gen += 1  # (mail due: the claims count again)
        suppressed = frozenset(suppressed)
        db = self.db
        room = self._open_room() if state == QUEUED and rows else 0
        # accepted means on disk, power loss included
        with transaction(db, synchronous="FULL"):
            first = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM messages").fetchone()[0]
            if idem is not None:  # the rows and their record under the key: one commit
                self._idem_part(idem, campaign_id, first, len(rows))
            park = 0  # the first ``park`` rows go in flight (see _take_parked)
            if room:
                active = "SELECT 1 FROM campaigns WHERE id=? AND status='active'"
                if db.execute(active, (campaign_id,)).fetchone():
                    park = min(room, len(rows))
            # Each row's state is its own: in flight (parked), suppressed (the
            # tenant's list holds it: final, never sent) or ``state``
            # (RowWriter: the rows of a part sharing one bind it once).
            states = [INFLIGHT] * park + [state] * (len(rows) - park)
            for i in suppressed:
                if i < len(rows):
                    states[i] = SUPPRESSED
            for at, end, st in ((0, park, INFLIGHT), (park, len(rows), state)):
                own = bool(suppressed) and not suppressed.isdisjoint(range(at, end))
                last = self._rows.insert(
                    first, campaign_id, now, rows, at, end, st, states if own else None
                )
                if last != first + end - 1:  # ids are handed out as counted, or nothing is
                    raise SpoolError(f"spool: rows got ids up to {last}, not {first + end - 1}")
            if park or state == INFLIGHT:
                self._lower_bound(first)
            if rows:  # the campaign's run of ids: the one it ends extended, or a new one
                end = first + len(rows) - 1
                if not db.execute(
                    "UPDATE campaign_rows SET last=? WHERE campaign=? AND last=?",
                    (end, campaign_id, first - 1),
                ).rowcount:
                    db.execute(
                        "INSERT INTO campaign_rows(campaign, first, last) VALUES (?, ?, ?)",
                        (campaign_id, first, end),
                    )
            if ingest is not None:  # its rows' events are untold until told_ingest
                db.execute(
                    "UPDATE ingests SET line=?, accepted=?, rejected=?, untold_first=?,"
                    " untold_last=?, duplicates=? WHERE id=?",
                    (ingest.line, ingest.accepted, ingest.rejected,
                     first if rows else 0, first + len(rows) - 1 if rows else 0,
                     ingest.duplicates, ingest.job),
                )  # fmt: skip
        t = self._tallies.get(campaign_id)
        if t is not None:
            if state == QUEUED:
                t[0] += len(rows)
                t[1] += states.count(SUPPRESSED)
            else:  # rows spooled in another state: count the rows themselves
                del self._tallies[campaign_id]
        if park:
            self._parked_cids.add(campaign_id)
            rcpts, domains, vars_ = zip(*rows[:park], strict=True)
            parked = map(Claimed, range(first, first + park), repeat(campaign_id),
                         rcpts, domains, vars_, repeat(0), repeat(now))  # fmt: skip
            if not suppressed or suppressed.isdisjoint(range(park)):
                self._parked += parked
            else:
                self._parked += [c for k, c in enumerate(parked) if k not in suppressed]
            for key, (n, since) in self._room.items():  # the room is taken
                took = min(n, park)
                self._room[key] = (n - took, since)
                park -= took
        return list(range(first, first + len(rows)))

    def claim_due(self, now: float, limit: int) -> list[Claimed]:
        if limit <= 0:
            return []
        parked = self._parked_by_campaign() if self._parked else {}
        return self._claim_rows(now, limit, parked)

    def claim_next(self, now: float, limit: int, key: int = 0) -> list[Claimed]:
        out = self.claim_due(now, limit)
        # The dispatcher's claim: one that comes back short leaves its room open
        # for ROOM_TTL, and rows spooled meanwhile go straight to it (parked).
        self._room[key] = (max(0, limit - len(out)), time.monotonic())
        return out

    def _claim_rows(
        self, now: float, limit: int, parked: dict[int, list[Claimed]]
    ) -> list[Claimed]:
        # The room is shared between the active campaigns with mail due
        # (spool/fair.py: tenants alike, then priority, then weight), each
        # campaign's oldest due first, its parked rows before its rows in the
        # queue. The shares are read first (one writer: this object); then the
        # due rows are SELECTed (their campaign still active) and marked in
        # flight by runs of consecutive ids (a list spooled together is one
        # run), in one transaction: cheaper than UPDATE ... RETURNING, which
        # buffers and re-reads every row it returns. Parked rows enough: no
        # transaction.
        db = self.db
        dues: _Dues | None = None
        if self._shared:  # the last claim was shared: counted at once
            dues = self._due_counts(now, limit)
            cids = set(dues.counts)
        elif (q := self._quiet) is not None and self._fresh(q[0], q[1], q[2], now):
            cids = set()  # (nothing was due a moment ago, and nothing changed)
        else:
            cids = {cid for cid, _tenant in db.execute(_DUE_CAMPAIGNS, (now,))}
            # nothing due: the next claims within DUE_REUSE s take it as said
            self._quiet = None if cids else (self._due_gen, now, time.monotonic())
        cids.update(parked)
        self._shared = len(cids) > 1
        if len(cids) == 1:  # (the common case: one campaign, nothing to share)
            shares = dict.fromkeys(cids, limit)
        elif cids:
            if dues is None:
                dues = self._due_counts(now, limit)
            self._last_due = len(dues.counts)
            shares = self._shares(dues, now, limit, parked)
            self._turn += 1
        else:
            return []
        out: list[Claimed] = []
        want: list[tuple[int, int]] = []  # (campaign, rows from the queue)
        if parked:
            left: list[Claimed] = []
            for cid, items in parked.items():
                k = min(len(items), shares.get(cid, 0))
                if k:
                    out += items[:k]
                    left += items[k:]
                else:
                    left += items
            self._parked = left
            if not left:
                self._parked_cids.clear()
        for cid, n in shares.items():
            n -= len(parked[cid]) if cid in parked else 0
            if n > 0:
                want.append((cid, n))
        if want:
            rows: list[Any] = []
            with transaction(db):
                at = 0
                while at < len(want):
                    k = min(CLAIM_TERMS, 1 << (len(want) - at).bit_length() - 1)
                    args: list[Any] = []
                    for cid, n in want[at : at + k]:
                        args += (cid, now, cid, n)
                    rows += db.execute(_claim_of(k), args).fetchall()
                    at += k
                if rows:
                    runs = id_runs(sorted([r[0] for r in rows]))
                    if len(runs) * 4 <= len(rows):
                        db.executemany(
                            "UPDATE messages SET state=1 WHERE id BETWEEN ? AND ?", runs
                        )
                    else:  # (mostly lone rows: many campaigns' few each) by ids
                        ids = sorted([r[0] for r in rows])
                        for j in range(0, len(ids), ROWS_PER_STATEMENT):
                            part = ids[j : j + ROWS_PER_STATEMENT]
                            db.execute(_claimed_sql(len(part)), part)
                    self._lower_bound(runs[0][0])
            out += starmap(Claimed, rows)
            if dues is not None:
                self._took(dues, want, Counter([r[1] for r in rows]), now)
        return out

    def _took(
        self, dues: _Dues, want: list[tuple[int, int]], took: Counter[int], now: float
    ) -> None:
        """What a claim took of each campaign is no longer due: off its count.
        One that may have had more and whose count ran out is counted again (a
        count of 0 must mean none: one that has none takes no part in a share,
        not even in whose turn the odd message is)."""
        counts, big = dues.counts, dues.big
        again = []
        for cid, n in want:
            k = took.get(cid, 0)
            if k < n:  # all it had (or paused, cancelled, gone)
                counts.pop(cid, None)
                big.discard(cid)
            elif cid in counts:
                left = counts[cid] - k
                if left > 0:
                    counts[cid] = left
                elif cid in big:
                    again.append(cid)
                else:
                    del counts[cid]
        for cid in again:
            left = self.db.execute(_DUE_OF, (cid, now, dues.cap)).fetchone()[0]
            if left:
                counts[cid] = left
            else:
                del counts[cid]
            if left < dues.cap:
                big.discard(cid)

    def _fresh(self, gen: int, at: float, mono: float, now: float) -> bool:
        """Counts made at ``at`` (monotonic ``mono``, change count ``gen``) still
        stand for a claim at ``now``: nothing changed here since, and less than
        DUE_REUSE s passed, by the claims' clock and by this process's."""
        return (
            gen == self._due_gen
            and 0 <= now - at < DUE_REUSE
            and time.monotonic() - mono < DUE_REUSE
        )

    def _due_counts(self, now: float, limit: int) -> _Dues:
        """Each campaign's due rows, counted up to ``cap`` (about twice a fair
        share at the last shared claim, not up to ``limit``: that read up to
        ``limit`` index entries of every campaign each claim, 20,000 for 100
        campaigns of 200): those counted up to ``cap`` may have more (``big``;
        _shares). Kept for the next claims, less what they take, for up to
        DUE_REUSE s while nothing that makes mail due happened here (rows
        spooled, outcomes other than deliveries, rows handed back, a status
        set): the scan costs a seek or two per campaign with pending mail, and
        2,000 campaigns at every claim of 500 was ~6 us per message claimed.
        Mail that comes due by the clock meanwhile waits at most DUE_REUSE s."""
        d = self._dues
        if d is not None and self._fresh(d.gen, d.at, d.mono, now):
            return d
        cap = min(limit, max(4, 2 * limit // self._last_due))
        counts = {cid: n for cid, _t, n in self.db.execute(_DUE_COUNTS, (now, cap)) if n}
        big = {cid for cid, n in counts.items() if n >= cap}
        d = self._dues = _Dues(self._due_gen, now, time.monotonic(), cap, counts, big)
        return d

    def _shares(
        self, dues: _Dues, now: float, limit: int, parked: dict[int, list[Claimed]]
    ) -> dict[int, int]:
        """fair_shares of the campaigns with due rows (``dues``) and parked rows.
        A campaign that may have more than counted (``dues.big``) takes part as
        having ``limit``; if its share comes out below its count (below what it
        has), no step of the water-filling met its true count (nor its
        tenant's), so the shares are those of the true counts. Those given
        their count or more are counted up to ``limit`` and the shares made
        again (seldom: a tenant or campaign given far more than the others);
        one with ``limit`` or more stays as having ``limit``, as it has."""
        counts, big = dues.counts, dues.big
        done: set[int] = set()  # counted up to limit here (``limit`` or more: still big)
        ranks = self._ranks
        new = [cid for cid in (*counts, *parked) if cid not in ranks]
        if new:
            self._read_ranks(new)
        while True:
            have = counts
            if parked:  # (their parked rows count as due)
                have = dict(counts)
                for cid, items in parked.items():
                    have[cid] = have.get(cid, 0) + len(items)
            cands = [
                (cid, *ranks[cid], limit if cid in big else min(n, limit))
                for cid, n in have.items()
            ]
            shares = fair_shares(cands, limit, self._turn, self.tenant_weights)
            redo = [
                cid for cid, n in shares.items() if cid in big and n >= have[cid] and cid not in done
            ]  # fmt: skip
            if not redo:
                return shares
            for cid in redo:
                counts[cid] = n = self.db.execute(_DUE_OF, (cid, now, limit)).fetchone()[0]
                done.add(cid)
                if n < limit:  # (else it has at least limit: as assumed)
                    big.discard(cid)

    def _read_ranks(self, cids: list[int]) -> None:
        """The (tenant, priority, weight) of campaigns met for the first time,
        one query per 500 (read one by one, a claim meeting 2,000 new campaigns
        spent ~17 us on each), a spec (a whole message) parsed only if it may
        say its "kind"."""
        ranks = self._ranks
        for j in range(0, len(cids), 500):
            part = cids[j : j + 500]
            for cid, tenant, spec, options in self.db.execute(
                "SELECT id, tenant, spec, options FROM campaigns WHERE id IN"
                f" ({','.join('?' * len(part))})", part,
            ):  # fmt: skip
                raw = spec.encode() if isinstance(spec, str) else bytes(spec)
                kind = orjson.loads(raw) if b'"kind"' in raw else {}
                ranks[cid] = (str(tenant), *rank(kind, orjson.loads(options)))
            for cid in part:  # (a campaign whose row is gone)
                if cid not in ranks:
                    ranks[cid] = ("", *rank({}, {}))

    # -- rows parked for a waiting claim ----------------------------------------
    # A claim that came back short (nothing more was due) has room; rows spooled
    # within ROOM_TTL after it, of an active campaign, are inserted already in
    # flight and kept here (up to that room), and the next claims hand them out
    # (each campaign's before its rows in the queue, within its share): no index
    # entry written and removed, no SELECT of rows just written, no UPDATE to
    # mark them. They are in flight in the database from their commit, so a
    # crash turns them back to queued at the next start (recover) like any
    # claimed row; close() puts those never handed out back.

    def _open_room(self) -> int:
        mono = time.monotonic()
        return sum(n for n, at in self._room.values() if n > 0 and mono - at < ROOM_TTL)

    def _parked_by_campaign(self) -> dict[int, list[Claimed]]:
        """The parked rows by campaign, in the order they were parked; those of
        a campaign paused or cancelled since (here or by another process): back
        to the queue (cancelled: final), never handed out."""
        parked = self._parked
        stopped = {
            r[0]
            for r in self.db.execute(
                "SELECT id FROM campaigns WHERE status != 'active' AND id IN"
                f" ({','.join(map(str, self._parked_cids))})"
            )
        }
        if stopped:
            self._unpark([c.id for c in parked if c.campaign in stopped])
            parked = self._parked = [c for c in parked if c.campaign not in stopped]
            if not parked:
                self._parked_cids.clear()
                return {}
        if len(self._parked_cids) == 1:  # (one campaign's: no row looked at)
            return {parked[0].campaign: parked}
        out: dict[int, list[Claimed]] = {}
        for c in parked:
            items = out.get(c.campaign)
            if items is None:
                items = out[c.campaign] = []
            items.append(c)
        return out

    def _unpark(self, ids: list[int]) -> None:
        if not ids:
            return
        self._due_gen += 1
        db = self.db
        with transaction(db):
            db.executemany(
                "UPDATE messages SET state=CASE WHEN campaign IN"
                " (SELECT id FROM campaigns WHERE status='cancelled') THEN ? ELSE ? END"
                " WHERE id BETWEEN ? AND ? AND state=?",
                [(CANCELLED, QUEUED, a, b, INFLIGHT) for a, b in id_runs(sorted(ids))],
            )

    def record_results(self, results: Iterable[Result], now: float) -> None:
        self._record(results, now, False)

    def record_outcomes(
        self, results: Iterable[Result], now: float, events: Sequence[bytes] = (),
        event_ids: Sequence[int] = (),
    ) -> int | None:  # fmt: skip
        # The ids recorded are noted as untold in the same transaction: a
        # process killed before their events are out leaves them to the next
        # start (untold), instead of outcomes no event ever tells.
        self._record(results, now, True)
        return None

    def _record(self, results: Iterable[Result], now: float, untold: bool) -> None:
        # In id order: outcomes arrive interleaved across domains and workers, and
        # rows visited in key order touch each B-tree page once (about a third
        # less CPU per outcome than in arrival order).
        # Deliveries (nearly every outcome) are written by runs of consecutive ids
        # sharing (attempts, code, enhanced): one short UPDATE per run with nothing
        # bound per row, a third of the CPU of a row each in UPDATE ... FROM
        # (VALUES ...). Their reply text is not kept in the row: the delivered
        # event (event log, event index) carries it, with the remote queue id.
        # Grouped first, then each group sorted (ids, not objects by a key):
        # ``delivered_runs``.
        runs, rest = delivered_runs(results, now, DELIVERED)
        rest.sort(key=_by_id)
        if rest:  # (deferrals: due again; a delivery or two never makes mail due)
            self._due_gen += 1
        db = self.db
        with transaction(db):
            db.executemany(_DELIVERED_SQL, runs)
            # The others: one UPDATE ... FROM (VALUES ...) per chunk (sizes from _sizes).
            at = 0
            for n in _sizes(len(rest)):
                params: list[Any] = []
                add = params.extend
                for r in rest[at : at + n]:
                    add((r.id, r.state, r.attempts, r.next_at, r.code, r.enhanced, r.text))
                params.append(now)
                db.execute(_outcome_sql(n), params)
                at += n
            # An attempt that was in flight when its campaign was cancelled and
            # came back deferred is final too (it would never be claimed again).
            db.executemany(
                "UPDATE messages SET state=?, next_at=0 WHERE id=? AND campaign IN"
                " (SELECT id FROM campaigns WHERE status='cancelled')",
                [(CANCELLED, r.id) for r in rest if r.state == DEFERRED],
            )
            if untold and (runs or rest):
                spans = [(r[4], r[5]) for r in runs]
                spans += [(r.id, r.id) for r in rest]
                text = ",".join([f"{a}-{b}" for a, b in spans])
                db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key)"
                    " DO UPDATE SET value = value || ',' || excluded.value",
                    (UNTOLD, text),
                )
                self._untold = True

    def told(self, ids: Collection[int] | None = None) -> None:
        if not self._untold:
            return
        db = self.db
        with transaction(db):
            if ids is None:
                db.execute("DELETE FROM meta WHERE key=?", (UNTOLD,))
                self._untold = False
                return
            left = sorted(self._untold_ids() - set(ids))
            text = ",".join([f"{a}-{b}" for a, b in id_runs(left)])
            db.execute("UPDATE meta SET value=? WHERE key=?", (text, UNTOLD))

    def _untold_ids(self) -> set[int]:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (UNTOLD,)).fetchone()
        out: set[int] = set()
        for part in str(row[0] if row else "").split(","):
            first, _, last = part.partition("-")
            with contextlib.suppress(ValueError):
                out.update(range(int(first), int(last or first) + 1))
        return out

    def untold(self) -> list[Untold]:
        mine = {t.id for t in self._taken_back}  # this process tells them (taken_back)
        ids = sorted(self._untold_ids() - mine)
        if not ids:
            return []
        self._untold = True  # told() forgets them once they are out
        out: list[Untold] = []
        for lo, hi in id_runs(ids):
            out += starmap(Untold, self.db.execute(
                "SELECT id, campaign, rcpt, state, attempts, next_at, last_code, last_enhanced,"
                " last_text, updated FROM messages WHERE id BETWEEN ? AND ? ORDER BY id",
                (lo, hi),
            ))  # fmt: skip
        return out


    def release(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        self._due_gen += 1
        db = self.db
        with transaction(db):
            db.executemany(
                "UPDATE messages SET state=? WHERE id=? AND state=?",
                [(QUEUED, i, INFLIGHT) for i in ids],
            )

    def requeue(self, items: Iterable[tuple[int, float]], now: float) -> None:
        rows = list(items)
        if not rows:
            return
        self._due_gen += 1
        db = self.db
        with transaction(db):
            db.executemany(
                "UPDATE messages SET state=CASE WHEN attempts > 0 THEN ? ELSE ? END,"
                " next_at=?, updated=? WHERE id=? AND state=?",
                [(DEFERRED, QUEUED, at, now, i, INFLIGHT) for i, at in rows],
            )
            db.executemany(
                "UPDATE messages SET state=?, next_at=0 WHERE id=? AND state IN (?, ?)"
                " AND campaign IN (SELECT id FROM campaigns WHERE status='cancelled')",
                [(CANCELLED, i, QUEUED, DEFERRED) for i, _at in rows],
            )

    def recover(self) -> int:
        # Only rows from the bound on can be in flight (see _lower_bound): an
        # id range, not a scan of the spool's whole history. A spool whose
        # bound was never written (made by an older version) is scanned whole.
        # What is in flight now was claimed by a process that died holding it (one
        # supervisor per spool: hold_supervisor): each may have been sent. One
        # attempt of unknown outcome each, due again at once (its due time, passed
        # when it was claimed, is kept; it never expires because of it);
        # taken_back() tells them. A cancelled campaign's: final.
        # A whole-process kill: what its workers' write logs (kept in files, see
        # write_log_dir) do not name was never begun (a queue's mail no
        # connection took): back as it was, no attempt (when the logs may
        # not hold every write, every one counts, as before).
        self._parked, self._room = [], {}
        self._due_gen += 1
        db = self.db
        now = time.time()
        text = unknown_text()
        logs = self.write_log_dir()
        written = read_write_logs(logs) if logs is not None else None
        with transaction(db):
            row = db.execute("SELECT value FROM meta WHERE key=?", (INFLIGHT_LOW,)).fetchone()
            low = int(row[0]) if row else 0
            if written is not None:
                unsent = [i for (i,) in db.execute(
                    "SELECT id FROM messages WHERE id >= ? AND state=?", (low, INFLIGHT)
                ) if i not in written]  # fmt: skip
                db.executemany(
                    "UPDATE messages SET state=CASE WHEN campaign IN (SELECT id FROM campaigns"
                    " WHERE status='cancelled') THEN ? WHEN attempts > 0 THEN ? ELSE ? END,"
                    " next_at=CASE WHEN campaign IN (SELECT id FROM campaigns"
                    " WHERE status='cancelled') THEN 0 ELSE next_at END, updated=? WHERE id=?",
                    [(CANCELLED, DEFERRED, QUEUED, now, i) for i in unsent],
                )
            rows = db.execute(
                "UPDATE messages SET state=CASE WHEN campaign IN (SELECT id FROM campaigns"
                " WHERE status='cancelled') THEN ? ELSE ? END, attempts=attempts+1,"
                " next_at=CASE WHEN campaign IN (SELECT id FROM campaigns"
                " WHERE status='cancelled') THEN 0 ELSE next_at END, updated=?, last_code=?,"
                " last_enhanced=?, last_text=? WHERE id >= ? AND state=?"
                " RETURNING id, campaign, rcpt, attempts, next_at, state",
                (CANCELLED, DEFERRED, now, UNKNOWN_CODE, UNKNOWN_ENHANCED, text, low, INFLIGHT),
            ).fetchall()
            db.execute(  # nothing is in flight now: the next rows to be are newer
                "INSERT OR REPLACE INTO meta(key, value)"
                " SELECT ?, COALESCE(MAX(id), 0) + 1 FROM messages",
                (INFLIGHT_LOW,),
            )
            if rows:  # their deferred events are told after this: untold until then
                db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key)"
                    " DO UPDATE SET value = value || ',' || excluded.value",
                    (UNTOLD, ",".join([f"{r[0]}-{r[0]}" for r in rows if r[5] == DEFERRED])),
                )
                self._untold = True
        self._taken_back.extend(
            TakenBack(int(i), int(c), r, int(a), float(at), text)
            for i, c, r, a, at, st in sorted(rows)
            if st == DEFERRED
        )
        if logs is not None:  # read: the next supervisor makes its own (or none)
            with contextlib.suppress(OSError):
                clear_write_logs(logs)
        return len(rows)

    def write_log_dir(self) -> str | None:
        return os.path.join(self.directory, WRITE_LOGS) if self._writable else None

    def bring_forward(
        self, domain: str, now: float, step: float, limit: int, deferred_before: float
    ) -> int:
        # A wait its deferral's reply asked for (retry_hint) is still kept.
        db = self.db
        with transaction(db):
            ids = [i for i, at, text in db.execute(
                "SELECT id, updated, last_text FROM messages WHERE domain=? AND state=?"
                " AND next_at>? AND updated<=? AND (last_code=421 OR substr(last_enhanced, 1, 4)"
                f" IN ({','.join('?' * len(SITE_STATUSES))})) ORDER BY next_at LIMIT ?",
                (domain, DEFERRED, now, deferred_before, *SITE_STATUSES, max(0, limit)),
            ) if at + retry_hint(text) <= now]  # fmt: skip
            db.executemany(
                "UPDATE messages SET next_at=? WHERE id=? AND state=?",
                [(now + k * step, i, DEFERRED) for k, i in enumerate(ids)],
            )
        if ids:
            self._due_gen += 1
        return len(ids)

    def taken_back(self) -> list[TakenBack]:
        out, self._taken_back = self._taken_back, []
        return out

    def _lower_bound(self, low: int) -> None:
        """In the transaction putting rows from id ``low`` on in flight: the bound
        recover() scans from is at most ``low``."""
        self.db.execute(
            "UPDATE meta SET value=? WHERE key=? AND CAST(value AS INTEGER) > ?",
            (low, INFLIGHT_LOW, low),
        )

    def counts(self, campaign_id: int | None = None) -> dict[str, int]:
        if campaign_id is None:
            rows = self.db.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")
        else:
            rows = self.db.execute(
                f"SELECT m.state, COUNT(*) FROM {self._of}=? GROUP BY m.state", (campaign_id,)
            )
        out = dict.fromkeys(STATE_NAMES.values(), 0)
        for state, n in chain(rows, self._pruned(campaign_id)):
            name = STATE_NAMES.get(state, str(state))
            out[name] = out.get(name, 0) + int(n)
        return out

    def _pruned(self, campaign_id: int | None) -> list[tuple[int, int]]:
        """(state, n) of the messages prune_final deleted (of one campaign, or all)."""
        try:
            if campaign_id is None:
                return self.db.execute(
                    "SELECT state, SUM(n) FROM pruned GROUP BY state"
                ).fetchall()
            return self.db.execute(
                "SELECT state, n FROM pruned WHERE campaign=?", (campaign_id,)
            ).fetchall()
        except sqlite3.OperationalError:  # a read-only view of a spool made before
            return []

    def prune_final(self, before: float, limit: int = 2000) -> tuple[int, bool]:
        # Oldest first, by id (ids grow with time): from where the last call
        # stopped (in memory: a new process starts again from the first row,
        # past what was deleted already: only the rows kept are read again) to
        # the first row spooled at ``before`` or later (the rows after it are
        # too young). Each call is one transaction over a range of ids.
        db = self.db
        start = self._prune_from
        final = ",".join(str(s) for s in sorted(FINAL_STATES))
        with transaction(db):
            end = db.execute(
                "SELECT MAX(id) FROM (SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?)",
                (start, max(1, int(limit))),
            ).fetchone()[0]
            if end is None:  # no row after start: a sweep is over
                self._prune_from = 0
                return 0, False
            young = db.execute(
                "SELECT MIN(id) FROM messages WHERE id > ? AND id <= ? AND created >= ?",
                (start, end, before),
            ).fetchone()[0]
            over = young is not None
            if over:
                end = young - 1
            # The row with the largest id stays: ids are the largest + 1.
            top = db.execute("SELECT MAX(id) FROM messages").fetchone()[0]
            end = min(end, top - 1)
            n = 0
            if end > start:
                where = (
                    f"id > ?1 AND id <= ?2 AND state IN ({final}) AND updated < ?3"
                )
                args = (start, end, before)
                db.execute(
                    "INSERT INTO pruned(campaign, state, n) SELECT campaign, state, COUNT(*)"
                    f" FROM messages WHERE {where} GROUP BY campaign, state"
                    " ON CONFLICT(campaign, state) DO UPDATE SET n = n + excluded.n",
                    args,
                )
                n = int(db.execute(f"DELETE FROM messages WHERE {where}", args).rowcount)
            if over or end >= top - 1:
                self._prune_from = 0  # the next sweep starts again from the oldest
                return n, False
            self._prune_from = end
            return n, True

    def pending(self) -> dict[str, int]:
        # The due index holds exactly these rows: read it, not the history.
        out = {"queued": 0, "deferred": 0}
        for state, n in self.db.execute(
            "SELECT state, COUNT(*) FROM messages WHERE state IN (0, 2) GROUP BY state"
        ):
            out[STATE_NAMES[state]] = int(n)
        return out

    def due_version(self) -> int | None:
        return self._due_gen

    def next_due(self) -> float | None:
        if self._parked:  # due now: the next claim hands them out
            return self._parked[0].created
        row = self.db.execute(_NEXT_DUE).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def queue_shape(self, now: float) -> list[tuple[str, list[int]]]:
        # Counted by SQLite (a row per domain and age bucket): a row per pending
        # message through Python took ~0.45 s for 500,000 (serve's /metrics).
        edges = [m * 60.0 for m in AGE_BUCKETS_MIN]
        bucket = ("CASE " + " ".join(f"WHEN ? - created < ? THEN {i}" for i in range(len(edges)))
                  + f" ELSE {len(edges)} END")  # fmt: skip
        params = [x for e in edges for x in (now, e)]
        shape: dict[str, list[int]] = {}
        for domain, i, n in self.db.execute(
            f"SELECT domain, {bucket} AS b, COUNT(*) FROM messages WHERE state IN (?, ?, ?)"
            " GROUP BY domain, b",
            (*params, QUEUED, INFLIGHT, DEFERRED),
        ):
            buckets = shape.get(domain)
            if buckets is None:
                buckets = shape[domain] = [0] * (len(edges) + 1)
            buckets[int(i)] += int(n)
        return sorted(shape.items(), key=lambda kv: -sum(kv[1]))

    def message(self, message_id: int) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT id, campaign, rcpt, domain, vars, state, attempts, created, next_at, updated,"
            " last_code, last_enhanced, last_text FROM messages WHERE id=?",
            (message_id,),
        ).fetchone()
        if row is None:
            return None
        keys = [
            "id",
            "campaign",
            "rcpt",
            "domain",
            "vars",
            "state",
            "attempts",
            "created",
            "next_at",
            "updated",
            "last_code",
            "last_enhanced",
            "last_text",
        ]
        out = dict(zip(keys, row, strict=True))
        out["vars"] = orjson.loads(out["vars"])
        out["state"] = STATE_NAMES.get(out["state"], out["state"])
        return out

    # -- bodies stored once (see Spool.put_blob) --------------------------------

    def put_blob(self, digest: str, data: bytes, now: float) -> None:
        db = self.db
        db.execute("PRAGMA synchronous=FULL")  # the rows that follow are "accepted"
        try:
            db.execute(
                "INSERT INTO blobs(digest, data, touched, pending) VALUES (?, ?, ?, 1)"
                " ON CONFLICT(digest) DO UPDATE SET touched=excluded.touched,"
                " pending=pending + 1",
                (digest, data, now),
            )
        finally:
            db.execute("PRAGMA synchronous=NORMAL")

    blobs_aside = True

    def put_blob_aside(self, digest: str, data: bytes, now: float) -> None:
        """:meth:`put_blob` on a connection of its own (the spool's belongs to the
        thread that opened it), one call at a time; SQLite's lock orders it with
        the spool's own writes (busy_timeout)."""
        with self._aside_db() as db, transaction(db):
            db.execute(
                "INSERT INTO blobs(digest, data, touched, pending) VALUES (?, ?, ?, 1)"
                " ON CONFLICT(digest) DO UPDATE SET touched=excluded.touched,"
                " pending=pending + 1",
                (digest, data, now),
            )

    def ref_blob_aside(self, digest: str, ids: Iterable[int]) -> None:
        with self._aside_db() as db, transaction(db):
            db.executemany(
                "INSERT INTO blob_rows(digest, first, last) VALUES (?, ?, ?)",
                [(digest, a, b) for a, b in id_runs(sorted(ids))],
            )
            db.execute("UPDATE blobs SET pending=MAX(pending - 1, 0) WHERE digest=?", (digest,))

    @contextlib.contextmanager
    def _aside_db(self) -> Iterator[sqlite3.Connection]:
        """The connection of the ``*_aside`` calls (made at the first), held."""
        lock = self.__dict__.setdefault("_aside_lock", threading.Lock())
        with lock:
            db = self.__dict__.get("_aside")
            if db is None:
                db = connect(self.path, synchronous="FULL", threads=True)
                db.execute(f"PRAGMA busy_timeout={int(sqlitedb.TIMEOUT * 1000)}")
                self._aside = db
            yield db

    def ref_blob(self, digest: str, ids: Iterable[int]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO blob_rows(digest, first, last) VALUES (?, ?, ?)",
                [(digest, a, b) for a, b in id_runs(sorted(ids))],
            )
            # (never below 0: a reference the sweep ended as a dead accept's)
            db.execute("UPDATE blobs SET pending=MAX(pending - 1, 0) WHERE digest=?", (digest,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def get_blobs(self, digests: Collection[str]) -> dict[str, bytes]:
        want = list(digests)
        out: dict[str, bytes] = {}
        for j in range(0, len(want), 500):
            chunk = want[j : j + 500]
            out.update(
                self.db.execute(
                    f"SELECT digest, data FROM blobs WHERE digest IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            )
        return out

    def sweep_blobs(
        self, now: float, retention: float, limit: int = 100, grace: float = ORPHAN_GRACE
    ) -> int:
        self._reclaim_pending(now - grace, limit)
        cutoff = now - retention
        db = self.db
        gone = 0
        for (digest,) in db.execute(
            "SELECT digest FROM blobs WHERE pending <= 0 AND touched < ? AND looked < ?"
            " ORDER BY looked LIMIT ?",
            (cutoff, cutoff, limit),
        ).fetchall():
            db.execute("BEGIN IMMEDIATE")  # checked and deleted in one transaction
            try:
                row = db.execute(
                    "SELECT 1 FROM blobs WHERE digest=? AND pending <= 0 AND touched < ?",
                    (digest, cutoff),
                ).fetchone()
                runs = db.execute(
                    "SELECT first, last FROM blob_rows WHERE digest=?", (digest,)
                ).fetchall()
                busy = row is None or any(
                    db.execute(
                        "SELECT 1 FROM messages WHERE id BETWEEN ? AND ?"
                        " AND (state IN (?, ?, ?) OR updated >= ?) LIMIT 1",
                        (a, b, QUEUED, INFLIGHT, DEFERRED, cutoff),
                    ).fetchone()
                    for a, b in runs
                )
                if not busy:
                    db.execute("DELETE FROM blob_rows WHERE digest=?", (digest,))
                    db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
                    gone += 1
                else:  # still needed: looked at again a retention later
                    db.execute("UPDATE blobs SET looked=? WHERE digest=?", (now, digest))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return gone

    def _reclaim_pending(self, before: float, limit: int) -> None:
        """Blobs whose pending reference outlived ``before`` (their accept died):
        record the rows that hold them (a scan of every row: only after a crash)
        and end the pending references, so the normal sweep can judge them."""
        db = self.db
        for digest, touched in db.execute(
            "SELECT digest, touched FROM blobs WHERE pending > 0 AND touched < ? LIMIT ?",
            (before, limit),
        ).fetchall():
            ids = [i for (i,) in db.execute(
                "SELECT id FROM messages WHERE vars = ? ORDER BY id", (blob_ref(digest),)
            )]  # fmt: skip
            with transaction(db):
                if db.execute(
                    "SELECT 1 FROM blobs WHERE digest=? AND touched=?", (digest, touched)
                ).fetchone() is None:
                    continue  # put again meanwhile: an accept is running
                runs = db.execute(
                    "SELECT first, last FROM blob_rows WHERE digest=?", (digest,)
                ).fetchall()
                new = [i for i in ids if not any(a <= i <= b for a, b in runs)]
                db.executemany(
                    "INSERT INTO blob_rows(digest, first, last) VALUES (?, ?, ?)",
                    [(digest, a, b) for a, b in id_runs(new)],
                )
                db.execute("UPDATE blobs SET pending=0 WHERE digest=?", (digest,))

    def meta_once(self, key: str, value: str) -> str:
        self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
        return str(self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def add_counters(self, deltas: Mapping[str, int]) -> dict[str, int]:
        if not deltas:
            return {}
        db = self.db
        with transaction(db):
            db.executemany(
                "INSERT INTO counters(name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                [(k, int(v)) for k, v in deltas.items()],
            )
            out = {
                k: int(db.execute("SELECT value FROM counters WHERE name=?", (k,)).fetchone()[0])
                for k in deltas
            }
        return out

    def counters(self, prefix: str) -> dict[str, int]:
        try:
            rows = self.db.execute(
                "SELECT name, value FROM counters WHERE substr(name, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
        except sqlite3.OperationalError:  # a read-only spool made before counters
            return {}
        return {str(k): int(v) for k, v in rows}

    def drop_counters(self, names: Iterable[str]) -> None:
        self.db.executemany("DELETE FROM counters WHERE name=?", [(k,) for k in names])

    def owner(self, message_id: int) -> tuple[int, str] | None:
        row = self.db.execute(
            "SELECT campaign, rcpt FROM messages WHERE id=?", (message_id,)
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def owners(self, message_ids: Collection[int]) -> dict[int, tuple[int, str]]:
        ids = sorted({int(i) for i in message_ids})
        out: dict[int, tuple[int, str]] = {}
        for j in range(0, len(ids), 500):
            chunk = ids[j : j + 500]
            marks = ",".join("?" * len(chunk))
            for i, c, r in self.db.execute(
                f"SELECT id, campaign, rcpt FROM messages WHERE id IN ({marks})", chunk
            ):
                out[int(i)] = (int(c), str(r))
        return out

    def settle(self, message_ids: Collection[int], text: str) -> list[int]:
        ids = sorted({int(i) for i in message_ids})
        db = self.db
        due: list[int] = []
        flying: list[int] = []
        for j in range(0, len(ids), 500):  # read first: nearly every event's is final
            chunk = ids[j : j + 500]
            marks = ",".join("?" * len(chunk))
            for i, st in db.execute(
                f"SELECT id, state FROM messages WHERE id IN ({marks}) AND state IN (?, ?)",
                (*chunk, DEFERRED, INFLIGHT),
            ):
                (due if st == DEFERRED else flying).append(int(i))
        if not due and not flying:
            return []
        now = time.time()
        out: list[int] = []
        with transaction(db):
            for i in due:
                row = db.execute(
                    "UPDATE messages SET state=?, next_at=0, updated=?, last_code=250,"
                    " last_enhanced='2.0.0', last_text=? WHERE id=? AND state=? RETURNING id",
                    (DELIVERED, now, text[:400], i, DEFERRED),
                ).fetchone()
                if row is not None:
                    out.append(i)
            self._note_untold(out)
            if flying:  # its outcome is still to come: kept for settle_taken
                db.execute(
                    "DELETE FROM meta WHERE key >= 'taken:' AND key < 'taken;'"
                    " AND CAST(substr(value, 1, instr(value, '|') - 1) AS REAL) < ?",
                    (now - TAKEN_TTL,),
                )
                db.executemany(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    [(f"taken:{i}", f"{now}|{text[:400]}") for i in flying],
                )
        return out

    def settle_taken(self, message_ids: Collection[int]) -> dict[int, str]:
        db = self.db
        keys = [f"taken:{int(i)}" for i in message_ids]
        found: dict[int, str] = {}
        for j in range(0, len(keys), 500):
            chunk = keys[j : j + 500]
            marks = ",".join("?" * len(chunk))
            for k, v in db.execute(f"SELECT key, value FROM meta WHERE key IN ({marks})", chunk):
                found[int(k[6:])] = str(v).partition("|")[2]
        if not found:
            return {}
        now = time.time()
        out: dict[int, str] = {}
        with transaction(db):
            for i, text in sorted(found.items()):
                db.execute("DELETE FROM meta WHERE key=?", (f"taken:{i}",))
                row = db.execute(
                    "UPDATE messages SET state=?, next_at=0, updated=?, last_code=250,"
                    " last_enhanced='2.0.0', last_text=? WHERE id=? AND state=? RETURNING id",
                    (DELIVERED, now, text, i, DEFERRED),
                ).fetchone()
                if row is not None:
                    out[i] = text
            self._note_untold(list(out))
        return out

    def _note_untold(self, ids: list[int]) -> None:
        """``ids`` (just settled delivered, in the open transaction) noted
        untold, as :meth:`_record` notes outcomes: their "delivered" events are
        written after this commit, and a kill in between leaves them to the
        next start (:meth:`untold`) instead of a delivery no event tells."""
        if not ids:
            return
        text = ",".join([f"{a}-{b}" for a, b in id_runs(sorted(ids))])
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key)"
            " DO UPDATE SET value = value || ',' || excluded.value",
            (UNTOLD, text),
        )
        self._untold = True

    def sibling(self, campaign_id: int, rcpt: str, near_id: int) -> tuple[int, str] | None:
        row = self.db.execute(
            f"SELECT m.id, m.rcpt FROM {self._of}=? AND m.rcpt=? COLLATE NOCASE"
            " ORDER BY abs(m.id - ?) LIMIT 1",
            (campaign_id, rcpt, near_id),
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def counts_by_campaign(
        self, campaign_ids: Collection[int] | None = None
    ) -> dict[int, dict[str, int]]:
        ids = None if campaign_ids is None else [int(c) for c in campaign_ids]
        out: dict[int, dict[str, int]] = {}
        if ids is None:
            rows = self.db.execute(
                "SELECT campaign, state, COUNT(*) FROM messages GROUP BY campaign, state"
            ).fetchall()
            for cid in self.db.execute("SELECT id FROM campaigns"):
                out[int(cid[0])] = dict.fromkeys(STATE_NAMES.values(), 0)
        else:
            out = {c: dict.fromkeys(STATE_NAMES.values(), 0) for c in ids}
            rows = []
            for j in range(0, len(ids), 500):
                chunk = ids[j : j + 500]
                rows += self.db.execute(
                    f"SELECT m.campaign, m.state, COUNT(*) FROM {self._of} IN"
                    f" ({','.join('?' * len(chunk))}) GROUP BY m.campaign, m.state",
                    chunk,
                ).fetchall()
        for cid, state, n in rows:
            per = out.setdefault(int(cid), dict.fromkeys(STATE_NAMES.values(), 0))
            per[STATE_NAMES.get(state, str(state))] = int(n)
        pruned: list[tuple[int, int, int]] = []
        try:  # the messages prune_final deleted, counted as they were
            if ids is None:
                pruned = self.db.execute("SELECT campaign, state, n FROM pruned").fetchall()
            for j in range(0, len(ids or ()), 500):
                chunk = ids[j : j + 500]  # type: ignore[index]
                pruned += self.db.execute(
                    "SELECT campaign, state, n FROM pruned WHERE campaign IN"
                    f" ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        except sqlite3.OperationalError:  # a read-only view of a spool made before
            pruned = []
        for cid, state, n in pruned:
            per = out.setdefault(int(cid), dict.fromkeys(STATE_NAMES.values(), 0))
            name = STATE_NAMES.get(state, str(state))
            per[name] = per.get(name, 0) + int(n)
        return out

    def pending_domains(
        self, campaign_ids: Collection[int] | None = None, limit: int = 100
    ) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        pend = (QUEUED, INFLIGHT, DEFERRED)
        if campaign_ids is None:
            chunks: list[list[int] | None] = [None]
        else:
            ids = [int(c) for c in campaign_ids]
            chunks = [ids[j : j + 500] for j in range(0, len(ids), 500)]
        for chunk in chunks:
            if chunk is None:
                sql, args = "messages m WHERE m.state IN (?,?,?)", list(pend)
            elif not chunk:
                continue
            else:
                sql = f"{self._of} IN ({','.join('?' * len(chunk))}) AND m.state IN (?,?,?)"
                args = [*chunk, *pend]
            for d, n in self.db.execute(
                f"SELECT m.domain, COUNT(*) FROM {sql} GROUP BY m.domain", args
            ):
                counts[d] = counts.get(d, 0) + int(n)
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(0, limit)]

    # -- list ingest jobs ----------------------------------------------------

    _INGEST_COLS = (
        "id, campaign, source, total, line, accepted, rejected, status, created,"
        " untold_first, untold_last, duplicates"
    )
    _INGEST_COLS_OLD = (  # (before their duplicates; before their untold batch too)
        "id, campaign, source, total, line, accepted, rejected, status, created,"
        " untold_first, untold_last, 0",
        "id, campaign, source, total, line, accepted, rejected, status, created, 0, 0, 0",
    )

    @staticmethod
    def _ingest(row: tuple[Any, ...]) -> IngestJob:
        return IngestJob(
            id=int(row[0]),
            campaign=int(row[1]),
            source=orjson.loads(row[2]),
            total=int(row[3]),
            line=int(row[4]),
            accepted=int(row[5]),
            rejected=int(row[6]),
            status=str(row[7]),
            created=float(row[8]),
            untold=(int(row[9]), int(row[10])),
            duplicates=int(row[11]),
        )

    def create_ingest(self, campaign_id: int, source: dict[str, Any], total: int) -> int:
        db = self.db
        db.execute("PRAGMA synchronous=FULL")
        try:
            # Held before the commit makes the job visible to another process.
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT INTO ingests(campaign, source, total, created) VALUES (?,?,?,?)",
                    (campaign_id, orjson.dumps(source), int(total), time.time()),
                )
                assert cur.lastrowid is not None
                job_id = int(cur.lastrowid)
                self.hold_ingest(job_id)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.execute("PRAGMA synchronous=NORMAL")
        return job_id

    def _ingests(self, where: str, args: tuple[Any, ...] = ()) -> list[IngestJob]:
        for cols in (self._INGEST_COLS, *self._INGEST_COLS_OLD):
            try:
                rows = self.db.execute(f"SELECT {cols} FROM ingests{where}", args).fetchall()
            except sqlite3.OperationalError:
                # A read-only view of a spool older than ingests, or than their
                # untold batch (their events were told, as that version did).
                continue
            return [self._ingest(r) for r in rows]
        return []

    def spooled_rcpts(self, campaign_id: int) -> Iterator[list[str]]:
        # A campaign's rows are its id runs (campaign_rows): read a range at a time.
        runs = self.db.execute(
            "SELECT first, last FROM campaign_rows WHERE campaign=? ORDER BY first",
            (int(campaign_id),),
        ).fetchall()
        step = 20_000
        for first, last in runs:
            for lo in range(int(first), int(last) + 1, step):
                got = self.db.execute(
                    "SELECT rcpt FROM messages WHERE id BETWEEN ? AND ?",
                    (lo, min(int(last), lo + step - 1)),
                ).fetchall()
                if got:
                    yield [r[0] for r in got]

    def get_ingest(self, job_id: int) -> IngestJob | None:
        jobs = self._ingests(" WHERE id=?", (job_id,))
        return jobs[0] if jobs else None

    def list_ingests(self, *, unfinished: bool = False) -> list[IngestJob]:
        return self._ingests((" WHERE status='running'" if unfinished else "") + " ORDER BY id")

    def finish_ingest(self, job_id: int, status: str) -> None:
        if status not in INGEST_STATUSES[1:]:
            raise ValueError(f"bad ingest status {status!r}")
        self.db.execute("UPDATE ingests SET status=? WHERE id=?", (status, job_id))

    def told_ingest(self, job_id: int) -> None:
        self.db.execute(
            "UPDATE ingests SET untold_first=0, untold_last=0 WHERE id=?", (int(job_id),)
        )

    # -- idempotency keys (see Spool.idem_begin) -------------------------------

    _IDEM_COLS = "fp, holder, created, status, body, expires, lease, parts"

    def _idem_row(self, scope: str, key: str) -> tuple[Any, ...] | None:
        return self.db.execute(  # type: ignore[no-any-return]
            f"SELECT {self._IDEM_COLS} FROM idempotency WHERE tenant=? AND key=?", (scope, key)
        ).fetchone()

    @staticmethod
    def _idem_record(row: tuple[Any, ...], now: float) -> IdemRecord:
        parts = [idem_part_ids(p) for p in orjson.loads(row[7] or b"[]")]
        return IdemRecord(str(row[0]), bytes(row[1]), float(row[2]), int(row[3]), bytes(row[4]),
                          parts, float(row[6]) - now)  # fmt: skip

    def idem_begin(
        self, scope: str, key: str, fingerprint: str, now: float, ttl: float, holder: bytes,
        *, lease: float = 30.0, stale: bytes | None = None,
    ) -> IdemRecord | None:  # fmt: skip
        db = self.db
        with transaction(db):
            row = self._idem_row(scope, key)
            if row is not None and row[5] > now:
                if stale is not None and row[3] == 0 and bytes(row[1]) == stale:
                    db.execute(  # taken over: same request, its parts kept
                        "UPDATE idempotency SET holder=?, lease=? WHERE tenant=? AND key=?",
                        (holder, now + lease, scope, key),
                    )
                    row = (*row[:1], holder, *row[2:6], now + lease, row[7])
                return self._idem_record(row, now)
            db.execute(
                "INSERT OR REPLACE INTO idempotency(tenant, key, fp, holder, status, body,"
                " created, expires, lease, parts) VALUES (?, ?, ?, ?, 0, x'', ?, ?, ?, x'')",
                (scope, key, fingerprint, holder, now, now + ttl, now + lease),
            )
        return None

    def idem_renew(self, scope: str, key: str, holder: bytes, lease: float) -> bool:
        cur = self.db.execute(
            "UPDATE idempotency SET lease=? WHERE tenant=? AND key=? AND holder=? AND status=0",
            (time.time() + lease, scope, key, holder),
        )
        return cur.rowcount > 0

    def _idem_part(self, mark: IdemMark, campaign_id: int, first: int, n: int) -> None:
        """In add_messages' transaction: the rows first..first+n-1 are part
        ``mark.part`` of the key's record (IdemLost unless the caller holds it)."""
        row = self.db.execute(
            "SELECT holder, status, parts FROM idempotency WHERE tenant=? AND key=?",
            (mark.scope, mark.key),
        ).fetchone()
        parts = orjson.loads(row[2] or b"[]") if row is not None else []
        if row is None or bytes(row[0]) != mark.holder or row[1] != 0 or len(parts) != mark.part:
            raise IdemLost(mark.scope, mark.key)
        parts.append(idem_part(campaign_id, range(first, first + n)))
        self.db.execute(
            "UPDATE idempotency SET parts=? WHERE tenant=? AND key=?",
            (orjson.dumps(parts), mark.scope, mark.key),
        )

    def idem_finish(self, scope: str, key: str, holder: bytes, status: int, body: bytes) -> None:
        db = self.db
        db.execute("PRAGMA synchronous=FULL")  # the answer says "accepted": durable first
        try:
            db.execute(
                "UPDATE idempotency SET status=?, body=? WHERE tenant=? AND key=? AND holder=?",
                (int(status), body, scope, key, holder),
            )
        finally:
            db.execute("PRAGMA synchronous=NORMAL")

    def idem_drop(self, scope: str, key: str, holder: bytes, *, keep: bool = False) -> None:
        db = self.db
        with transaction(db):
            if not keep:
                db.execute(
                    "DELETE FROM idempotency WHERE tenant=? AND key=? AND holder=? AND status=0"
                    " AND parts=x''",
                    (scope, key, holder),
                )
            db.execute(  # it wrote something: the next retry continues after it
                "UPDATE idempotency SET holder=?, lease=0 WHERE tenant=? AND key=? AND holder=?"
                " AND status=0",
                (IDEM_RELEASED, scope, key, holder),
            )

    def sweep_idem(self, now: float, limit: int = 1000) -> int:
        cur = self.db.execute(
            "DELETE FROM idempotency WHERE (tenant, key) IN (SELECT tenant, key"
            " FROM idempotency WHERE expires <= ? LIMIT ?)",
            (now, int(limit)),
        )
        return int(cur.rowcount)

    def _ingest_lock_path(self, job_id: int) -> str:
        return os.path.join(os.path.realpath(self.directory), f"ingest-{int(job_id)}.lock")

    def hold_ingest(self, job_id: int) -> None:
        """A POSIX record lock on ``ingest-N.lock`` in the spool directory: the
        kernel drops it when the holder dies (kill -9 included), and a forked
        worker does not inherit it. The file names the holder for the error."""
        holder = self._lock(self._ingest_lock_path(job_id), holder_tag())
        if holder is not None:
            raise IngestBusy(job_id, holder)

    def hold_supervisor(self, command: str) -> None:
        """``supervisor.lock`` in the spool directory, locked like an ingest job
        (dropped by the kernel when the holder dies): one supervisor per spool."""
        path = os.path.join(os.path.realpath(self.directory), SUPERVISOR_LOCK)
        holder = self._lock(path, {**holder_tag(), "command": command}, mine_ok=True)
        if holder is not None:
            raise SpoolBusy(self.directory, holder)

    def _lock(
        self, path: str, tag: dict[str, Any], mine_ok: bool = False
    ) -> dict[str, Any] | None:
        """Lock ``path`` for this object, writing ``tag`` in it; None when held
        (already by this object, or by this process when ``mine_ok``), else the
        tag of the process holding it."""
        if path in self._holds:
            return None
        held = _LOCKS.get(path)
        if held is not None:  # another spool object of this process (POSIX locks are per process)
            return None if mine_ok else held[1]
        holder = lock_file(path, tag)
        if holder is None:
            self._holds.add(path)
        return holder

    def release_ingest(self, job_id: int) -> None:
        self._release_lock(self._ingest_lock_path(job_id))

    def _release_lock(self, path: str) -> None:
        if path not in self._holds:
            return
        self._holds.discard(path)
        unlock_file(path)

    def checkpoint_behind(self) -> None:
        if not self._writable:
            return
        if self._behind is not None:
            if not self._behind.ending:
                return  # already running
            self._behind.stop()  # a run before this one's last pass
        self._behind = _Checkpoints.start(self.path)

    def checkpoint_soon(self) -> None:
        if self._behind is not None:
            self._behind.last()

    @contextlib.contextmanager
    def reader(self) -> Iterator[Spool]:
        # A read-only connection of the view's own: a sqlite3 connection is one
        # thread's, and WAL lets the view read without holding the writer up.
        view = SQLiteSpool(self.directory, readonly=True)
        try:
            yield view
        finally:
            view.close()

    def close(self) -> None:
        if self._behind is not None:  # its connection closed first: ours is the last
            self._behind.stop()
            self._behind = None
        if self._parked:  # spooled for a claim that never came: queued again
            self._unpark([c.id for c in self._parked])
            self._parked = []
        for path in list(self._holds):
            self._release_lock(path)
        self._rows.close()  # its statement before the connection
        aside = self.__dict__.pop("_aside", None)
        if aside is not None:
            with self.__dict__["_aside_lock"]:
                aside.close()
        self.db.close()
