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
    on disk and need the file to exist.

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
import sqlite3
from collections.abc import Iterator

from fastsend import durable

__all__ = ["TIMEOUT", "connect", "corrupt_database", "transaction"]

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
        return sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=TIMEOUT
        )
    durable.makedirs(os.path.dirname(os.path.abspath(path)))  # (a new spool: its name durable)
    db = sqlite3.connect(
        path, isolation_level=None, timeout=TIMEOUT, check_same_thread=not threads
    )
    db.execute("PRAGMA journal_mode=WAL")
    if synchronous:
        db.execute(f"PRAGMA synchronous={_level(synchronous)}")
    if schema:
        db.executescript(schema)
    return db


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
