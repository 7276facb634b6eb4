"""fastsend's SQLite files: one way to open them, one way to write a transaction.

NAME
    fastsend.sqlitedb -- connect(path, ...), transaction(db, ...).

DESCRIPTION
    Every SQLite file fastsend keeps (the spool, rollups, the event index, the
    webhook outbox, API keys, DMARC reports) is opened by :func:`connect` the
    same way: autocommit mode (``isolation_level=None``: transactions are
    explicit), a wait of up to ``TIMEOUT`` seconds for a lock another process
    holds, and, when writable, its directory made, WAL mode (readers never
    block the writer), the file's own ``synchronous`` level (its durability:
    FULL for what must survive a power cut, NORMAL for what a crash may only
    repeat) and its schema script. Read-only opens (``mode=ro``) change nothing
    on disk and work where nothing can be written: a WAL file needs its -shm
    index, which a read-only mount, a directory the user cannot write (or a
    0444 file there) does not let SQLite make, so such a file with no log left
    to replay is read as immutable; a file not made yet, when a schema is
    given, reads as an empty store (``suppress list``, ``apikey list``,
    ``tls-report show`` on a read-only spool: they failed "unable to open
    database file"). A writable open that the storage refuses says so:
    :class:`ReadOnlyDatabase` names the file and why (read-only file system,
    not writable by this user).

    :func:`transaction` is one explicit transaction: ``BEGIN IMMEDIATE`` (the
    write lock taken at once, so two writers never deadlock upgrading) or a
    deferred ``BEGIN``, then ``COMMIT`` when the block ends, or ``ROLLBACK``
    and the exception again when it raises (anything, KeyboardInterrupt and
    task cancellation included); optionally at a ``synchronous`` level of its
    own (the spool's accepting transaction is FULL on a NORMAL connection).

DELIBERATELY NOT HERE
    No schemas, no queries, no migrations: each store owns its own.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
from collections.abc import Iterator

from fastsend import durable

__all__ = [
    "TIMEOUT",
    "ReadOnlyDatabase",
    "connect",
    "corrupt_database",
    "transaction",
    "unwritable",
]

TIMEOUT = 30.0  # seconds waiting for another process's lock
_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


def connect(
    path: str,
    *,
    readonly: bool = False,
    synchronous: str = "",
    schema: str = "",
    threads: bool = False,
) -> sqlite3.Connection:
    """The database at ``path``; writable ones in WAL mode with ``schema`` applied.
    ``threads``: the connection may be used from other threads (the caller
    serialises its use, e.g. with a lock)."""
    if readonly:
        return _connect_readonly(path, schema, threads)
    try:
        durable.makedirs(os.path.dirname(os.path.abspath(path)))  # (a new spool: its name durable)
        db = sqlite3.connect(
            path, isolation_level=None, timeout=TIMEOUT, check_same_thread=not threads
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            if synchronous:
                db.execute(f"PRAGMA synchronous={_level(synchronous)}")
            if schema:
                db.executescript(schema)
        except BaseException:
            db.close()
            raise
    except (sqlite3.Error, OSError) as e:
        code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
        why = unwritable(path) if isinstance(e, OSError) or code in _UNWRITABLE else None
        if why is None:
            raise
        raise ReadOnlyDatabase(f"{path} {why}") from e
    return db


# SQLite's primary result codes of a file it could not open or write:
# SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN (a damaged or locked file is
# said as such, whatever the storage).
_UNWRITABLE = (8, 10, 14)


class ReadOnlyDatabase(sqlite3.OperationalError):
    """A database to write whose storage takes no writes (a read-only file
    system, a directory or file this user may not write): the message names
    the file and why. SQLite's own words were "unable to open database file"
    or "attempt to write a readonly database", naming nothing."""

    sqlite_errorcode = 8  # SQLITE_READONLY (what spool.base.storage_problem reads)
    sqlite_errorname = "SQLITE_READONLY"


def unwritable(path: str) -> str | None:
    """Why the SQLite file ``path`` (with its -wal and -shm beside it) cannot
    be written: "is on a read-only file system", "is not writable by this
    user"; None when nothing says so."""
    where = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)  # (a directory to make: its nearest parent)
    try:
        if os.statvfs(where).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except OSError:
        return None
    if not os.access(where, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.W_OK)
    ):
        return "is not writable by this user"
    return None


def _uri(path: str) -> str:
    # (as a URI: a directory named "a?b" or "50%" was read as a query or an escape)
    return pathlib.Path(os.path.abspath(path)).as_uri()


def _connect_readonly(path: str, schema: str, threads: bool) -> sqlite3.Connection:
    """``path`` opened read-only (see the module docstring)."""
    if schema and not os.path.exists(path):
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=not threads)
        db.executescript(schema)  # (nothing made yet: an empty store)
        return db
    db = sqlite3.connect(
        f"{_uri(path)}?mode=ro", uri=True, isolation_level=None, timeout=TIMEOUT,
        check_same_thread=not threads,
    )  # fmt: skip
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # (WAL: its index now)
        return db
    except sqlite3.OperationalError as e:
        db.close()
        if not os.path.exists(path):
            raise
        if _wal_frames(path):  # (immutable would read the file without its log: stale)
            why = unwritable(path)
            if why is None:
                raise
            raise ReadOnlyDatabase(
                f"{path} {why} and its write-ahead log holds changes not yet in it,"
                " which cannot be read there: copy the directory somewhere writable"
                " and look at the copy"
            ) from e
    # A WAL file whose -shm cannot be made here and with no log to replay: what
    # the file holds is all there is (no process can be writing where no one can
    # write), so it is read as immutable (no locks, no -shm).
    return sqlite3.connect(
        f"{_uri(path)}?immutable=1", uri=True, isolation_level=None,
        check_same_thread=not threads,
    )  # fmt: skip


def _wal_frames(path: str) -> bool:
    """The database at ``path`` has a write-ahead log with frames in it."""
    try:
        return os.path.getsize(path + "-wal") > 0
    except OSError:
        return False


# SQLite's primary result codes of a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB.
_CORRUPT = (11, 26)


def corrupt_database(e: BaseException | None) -> str | None:
    """What to tell an operator when ``e`` (or an error it was raised from or while
    handling) is SQLite finding a database file damaged; None otherwise. A
    traceback had been all they got (``fastsend queue``, serve's supervisor)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _CORRUPT:
            return (
                f"a database of the spool is damaged ({e}): stop every fastsend process"
                " using it, keep a copy of the spool directory, then restore a backup"
                " or recover the file (sqlite3 FILE.db .recover | sqlite3 NEW.db)"
            )
        e = e.__cause__ or e.__context__
    return None


def _level(synchronous: str) -> str:
    if synchronous not in _LEVELS:
        raise ValueError(f"synchronous: not a level: {synchronous!r}")
    return synchronous


@contextlib.contextmanager
def transaction(
    db: sqlite3.Connection, *, immediate: bool = True, synchronous: str = ""
) -> Iterator[None]:
    """``with transaction(db):`` the block's writes commit together or not at all.

    ``synchronous``: this transaction's own level (FULL: the commit survives a
    power loss), the connection's own level again after it."""
    before = None
    if synchronous:
        before = int(db.execute("PRAGMA synchronous").fetchone()[0])
        db.execute(f"PRAGMA synchronous={_level(synchronous)}")
    try:
        db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield
        except BaseException:
            if db.in_transaction:  # (SQLite ends it itself on a full disk: SQLITE_FULL)
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except BaseException:  # a full disk: the transaction may still be open
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        if before is not None:
            db.execute(f"PRAGMA synchronous={before}")
