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
    index.failed_at -= 10  # (flushes wait OUTAGE_RETRY s after a refusal)
    index.flush()
    assert not index.pending
    assert len(index.for_message(150)) == 1
    assert "written again" in caplog.records[-1].getMessage()
    index.close()


def test_alarms_on_a_full_rollup_store_are_said_once_then_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A complaint rate over the line while rollups.db cannot be written (here a
    read-only file system's error; a full disk is the same path): the alarm
    loop logged a traceback every evaluation (a minute in serve); now one line,
    and the alarm is told once the store takes its state."""
    from fastsend.analytics.alarms import Alarms
    from fastsend.analytics.rollup import _node_rows
    from fastsend.analytics.store import IDX, NC
    from fastsend.config.analytics import AlarmSettings

    store = SQLiteRollupStore(str(tmp_path))
    now = time.time()
    row = [0] * NC
    row[IDX["delivered"]], row[IDX["complaints"]] = 1000, 9
    counts = {(60, int(now) - int(now) % 60, ("acme", 1, "google", "127.0.0.2")): row}
    _node_rows(counts, {})
    store.add(counts, {}, {})
    store.db.execute("PRAGMA query_only=1")  # as a read-only remount (SQLITE_READONLY)
    events: list[dict] = []
    alarms = Alarms(AlarmSettings(min_delivered=100), store, events.append)
    caplog.set_level(logging.INFO, "fastsend")
    for _ in range(5):
        assert alarms.evaluate(["acme"], now) == []
    said = [x for x in caplog.records if x.name.startswith("fastsend")]
    assert len(said) == 1 and not said[0].exc_info and "read-only" in said[0].getMessage()
    assert events == []
    store.db.execute("PRAGMA query_only=0")
    got = alarms.evaluate(["acme"], now)
    assert {(e["event"], e.get("campaign")) for e in got} >= {("alarm", 1)}
    assert "written again" in caplog.records[-1].getMessage()


def test_a_redis_rollup_store_refusing_writes_is_said_once_and_its_counts_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Rollups and alarms beside a Redis spool whose server refuses writes
    (NOREPLICAS: ``min-replicas-to-write`` with its replica gone; MISCONF and
    BUSY are the same path): a flush whose mark goes with its counts (MULTI/EXEC)
    raised the spool client's RedisRefusesWrites, which the outage check did
    not know (a redis-py subclass from fastsend's module), so serve logged a
    traceback every flush (a second) and the alarm loop one a minute. Now: said
    once, the counts kept and written once Redis takes writes again."""
    from tests._redis_helpers import start_redis

    from fastsend.analytics.alarms import Alarms
    from fastsend.analytics.rollup import _node_rows
    from fastsend.analytics.store import IDX, NC
    from fastsend.analytics.store_redis import RedisRollupStore
    from fastsend.config.analytics import AlarmSettings
    from fastsend.spool import open_spool

    class Log:  # an event log whose mark moves with every flush
        path, n = "events.jsonl", 0

        def mark(self) -> str:
            self.n += 1
            return f"1:2:{self.n}"

    with start_redis() as server:
        shared = open_spool(server.url()).shared()
        assert shared is not None
        store = RedisRollupStore(shared.client, shared.prefix)
        r = Rollups(store, tenant_of=lambda cid: "acme", provider_of=policy_provider(None))
        r.mark_key, r.log = "events.jsonl", Log()
        now = time.time()
        ev = {"time": now, "event": "accepted", "campaign": 1, "tenant": "acme"}
        r.listener([{**ev, "id": 1, "rcpt": "a@example.org"}])
        r.flush()
        row = [0] * NC
        row[IDX["delivered"]], row[IDX["complaints"]] = 1000, 9
        counts = {(60, int(now) - int(now) % 60, ("acme", 1, "google", "127.0.0.2")): row}
        _node_rows(counts, {})
        store.add(counts, {}, {})
        events: list[dict] = []
        alarms = Alarms(AlarmSettings(min_delivered=100), store, events.append)
        shared.client.config_set("min-replicas-to-write", 1)  # no replica: NOREPLICAS
        caplog.set_level(logging.INFO, "fastsend")
        for i in range(2, 12):
            r.listener([{**ev, "id": i, "rcpt": f"u{i}@example.org"}])
            r.flush()
            assert alarms.evaluate(["acme"], now) == []
        assert r.failed >= 10
        mine = [x for x in caplog.records if x.name.startswith("fastsend.analytics")]
        assert not [x for x in mine if x.exc_info], [x.getMessage() for x in mine][:3]
        said = [x.getMessage() for x in mine]
        assert len(said) == 2 and all("NOREPLICAS" in s or "replicas" in s for s in said), said
        shared.client.config_set("min-replicas-to-write", 0)
        r.flush()
        assert {(e["event"], e.get("campaign")) for e in alarms.evaluate(["acme"], now)} >= {
            ("alarm", 1)
        }
        said = [x.getMessage() for x in caplog.records if x.name.startswith("fastsend.analytics")]
        assert sum("written again" in s for s in said) == 2, said
        got = run_query(store, StatsQuery("acme", int(now) - 120, int(now) + 3600, "total", [], {}))
        assert got["totals"]["counts"]["accepted"] == 11  # nothing counted meanwhile was lost
        assert store.states("logmark") == {"events.jsonl": f"1:2:{r.log.n}"}
