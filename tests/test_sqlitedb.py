"""fastsend.sqlitedb: how every SQLite file of fastsend is opened and written."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fastsend.sqlitedb import connect, transaction

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT);"


def test_connect_makes_dir_wal_level_and_schema(tmp_path: Path) -> None:
    path = str(tmp_path / "a" / "b" / "x.db")
    db = connect(path, synchronous="FULL", schema=SCHEMA)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.isolation_level is None  # autocommit: transactions are explicit
    db.execute("INSERT INTO t VALUES (1, 'a')")
    ro = connect(path, readonly=True)
    assert ro.execute("SELECT v FROM t").fetchall() == [("a",)]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("INSERT INTO t VALUES (2, 'b')")
    with pytest.raises(sqlite3.OperationalError):
        connect(str(tmp_path / "missing.db"), readonly=True).execute("SELECT 1 FROM t")
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(ValueError, match="not a level"):
        connect(str(tmp_path / "y.db"), synchronous="NORMAL; DROP TABLE t")


@pytest.mark.parametrize("immediate", [True, False])
def test_transaction_commits_or_rolls_back(tmp_path: Path, immediate: bool) -> None:
    db = connect(str(tmp_path / "x.db"), schema=SCHEMA)
    with transaction(db, immediate=immediate):
        db.execute("INSERT INTO t VALUES (1, 'kept')")
    for exc in (ValueError("bad row"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), transaction(db, immediate=immediate):
            db.execute("INSERT INTO t VALUES (2, 'lost')")
            raise exc
        assert not db.in_transaction
    assert db.execute("SELECT k, v FROM t").fetchall() == [(1, "kept")]
    # a second connection sees the commit (it is on disk, not only in this one)
    assert connect(str(tmp_path / "x.db")).execute("SELECT COUNT(*) FROM t").fetchone() == (1,)


def test_immediate_takes_the_write_lock_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "x.db")
    a = connect(path, schema=SCHEMA)
    b = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    with transaction(a), pytest.raises(sqlite3.OperationalError, match="locked"):
        b.execute("BEGIN IMMEDIATE")
    b.execute("BEGIN IMMEDIATE")
    b.execute("COMMIT")


def test_transaction_at_its_own_synchronous_level(tmp_path: Path) -> None:
    db = connect(str(tmp_path / "x.db"), synchronous="NORMAL", schema=SCHEMA)
    seen = []
    with transaction(db, synchronous="FULL"):
        db.execute("INSERT INTO t VALUES (1, 'a')")
        seen.append(db.execute("PRAGMA synchronous").fetchone()[0])
    assert seen == [2] and db.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError), transaction(db, synchronous="FULL"):
        raise ValueError("bad row")
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # back after a rollback too
    assert db.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)
