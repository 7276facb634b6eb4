"""Analytics on storage that refuses writes (issue 14 leftovers, aud15r).

A full disk under ``rollups.db`` (SQLite's SQLITE_FULL, made here with
``PRAGMA max_page_count``: the same error a full file system gives) is an outage
of the rollup store: said once when it starts and once when it ends, the counts
kept meanwhile and written once it can be, never a traceback per flush."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from fastsend.analytics.query import StatsQuery, run_query
from fastsend.analytics.rollup import Rollups, policy_provider
from fastsend.analytics.store import SQLiteRollupStore


def _rollups(store: SQLiteRollupStore) -> Rollups:
    return Rollups(store, tenant_of=lambda cid: "acme", provider_of=policy_provider(None))


def test_a_full_rollup_store_is_said_once_and_its_counts_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteRollupStore(str(tmp_path))
    r = _rollups(store)
    now = time.time()
    ev = {"time": now, "event": "accepted", "campaign": 1, "tenant": "acme"}
    r.listener([{**ev, "id": 1, "rcpt": "a@example.org"}])
    r.flush()
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full
    caplog.set_level(logging.INFO, "fastsend")
    for i in range(2, 40):  # 38 flushes (a second apart in a server) while it is full
        r.listener([{**ev, "id": i, "rcpt": f"u{i}@example{i}.org", "time": now + i * 60}])
        r.flush()
    assert r.failed >= 5
    mine = [x for x in caplog.records if x.name.startswith("fastsend.analytics")]
    assert not [x for x in mine if x.exc_info], [x.getMessage() for x in mine][:3]
    said = [x.getMessage() for x in mine]
    assert len(said) == 1 and "full" in said[0], said
    store.db.execute("PRAGMA max_page_count=1073741823")  # space again
    r.flush()
    said = [x.getMessage() for x in caplog.records if x.name.startswith("fastsend.analytics")]
    assert len(said) == 2 and "written again" in said[1], said
    got = run_query(store, StatsQuery("acme", int(now) - 120, int(now) + 3600, "total", [], {}))
    assert got["totals"]["counts"]["accepted"] == 39  # nothing counted while full was lost
    r.close()


def test_a_full_event_index_keeps_its_rows_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """events.db full: serve's flush every 0.2 s said nothing useful (a traceback
    whenever events came) and dropped the rows, so a bounce reported again while
    the disk was full counted twice (``already_told`` reads this index)."""
    from fastsend.serve.eventindex import EventIndex

    index = EventIndex(str(tmp_path))
    index.listener([{"time": time.time(), "event": "accepted", "id": 1, "campaign": 1,
                     "rcpt": "a@example.org"}])  # fmt: skip
    index.flush()
    pages = index.db.execute("PRAGMA page_count").fetchone()[0]
    index.db.execute(f"PRAGMA max_page_count={pages}")
    caplog.set_level(logging.INFO, "fastsend")
    for i in range(2, 200):
        index.listener([{"time": time.time(), "event": "bounced", "id": i, "campaign": 1,
                         "rcpt": f"u{i}@example.org", "text": "x" * 300}])  # fmt: skip
        index.flush()
    assert index.logged(list(range(2, 200)), ("bounced",)) == set(range(2, 200))
    said = [x for x in caplog.records if x.name.startswith("fastsend")]
    assert len(said) == 1 and not said[0].exc_info and "full" in said[0].getMessage()
    index.db.execute("PRAGMA max_page_count=1073741823")
    index.flush()
    assert not index.pending
    assert len(index.for_message(150)) == 1
    assert "written again" in caplog.records[-1].getMessage()
    index.close()
