"""Retention of the stores that only grew: the per-message event index, DMARC
reports, the webhook outbox (SQLite and the shared Redis one), and the event log
under a log rotation.

Real parts: ``fastsend serve`` in a subprocess over a spool seeded with old and
recent rows, a closed loopback port as a webhook endpoint that is down, a real
redis-server for the shared outbox.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
from tests._serve_helpers import Served, http
from tests.conftest import free_port
from tests.test_dmarc import BEGIN, report

from fastsend.analytics.dmarc import DmarcStore, parse_report
from fastsend.analytics.store import IDX, NC, SQLiteRollupStore
from fastsend.events import EventLog
from fastsend.serve.eventindex import EventIndex
from fastsend.serve.webhooks import Outbox

DAY = 86400
SECRET = "whsec-test-secret-0123456789"


def _report_on(day_start: int, rid: str) -> Any:
    xml = report(rid=rid).replace(f"<begin>{BEGIN}</begin>".encode(),
                                  f"<begin>{day_start}</begin>".encode())  # fmt: skip
    xml = xml.replace(f"<end>{BEGIN + 86399}</end>".encode(),
                      f"<end>{day_start + 86399}</end>".encode())  # fmt: skip
    return parse_report(xml)


def _until(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        time.sleep(0.05)


def test_serve_prunes_old_index_dmarc_and_expired_webhook_events_only(tmp_path: Path) -> None:
    """events.db, dmarc.db and webhooks.db only grew (an index row per event for ever, a
    DMARC row per report for ever, a webhook endpoint gone for good kept every event
    since). serve's retention pass drops what is past its window, and keeps an
    undelivered webhook event still inside its retry window."""
    now = time.time()
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    index = EventIndex(str(spool))
    index.listener([
        {"event": "delivered", "id": 1, "time": now - 40 * DAY, "campaign": 1, "rcpt": "a@x.test"},
        {"event": "delivered", "id": 2, "time": now - 3600, "campaign": 1, "rcpt": "b@x.test"},
    ])  # fmt: skip
    index.add_meta([(1, ["old"], {}), (2, ["new"], {})])
    index.close()
    dmarc = DmarcStore(str(spool))
    today = int(now) // DAY * DAY
    assert dmarc.add(_report_on(today - 500 * DAY, "old"))
    assert dmarc.add(_report_on(today - 2 * DAY, "new"))
    dmarc.close()
    rollups = SQLiteRollupStore(str(spool))
    row = [0] * NC
    row[IDX["delivered"]] = 5
    old_minute = int(now - 10 * DAY) // 60 * 60
    rollups.add({(g, t // g * g, ("acme", 1, "google", "")): row
                 for g in (60, 3600, 86400) for t in (old_minute, int(now))}, {}, {})  # fmt: skip
    rollups.close()
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: the endpoint is down
    outbox = Outbox(str(spool / "webhooks.db"))
    outbox.set_urls([down])
    outbox.append([orjson.dumps({"event": "bounced", "id": 7, "time": now - 10 * DAY}),
                   orjson.dumps({"event": "bounced", "id": 8, "time": now - 2 * DAY})])  # fmt: skip
    outbox.close()

    served = Served(tmp_path, None,
                    extra=f'[webhooks]\nurls = ["{down}"]\nsecret = "{SECRET}"\nretry_max = 1\n'
                          '[dashboard]\nadmin_tenants = ["acme"]\n')  # fmt: skip
    try:
        served.wait_line("older than 7 days were never accepted")

        def dmarc_days() -> list[int]:
            s = DmarcStore(str(spool))
            try:
                return sorted(r[0] for r in s.db.execute("SELECT DISTINCT day FROM rows"))
            finally:
                s.close()

        _until(lambda: dmarc_days() == [today - 2 * DAY], "old DMARC rows dropped")

        def minutes() -> list[int]:
            s = SQLiteRollupStore(str(spool))
            try:
                return [r[0] for r in s.db.execute("SELECT t FROM counts WHERE g = 60")]
            finally:
                s.close()

        _until(lambda: old_minute not in minutes() and minutes(), "old minute rollups dropped")
        index = EventIndex(str(spool))
        try:
            assert index.for_message(1) == [] and index.meta(1) == ([], {})
            assert [e["id"] for e in index.for_message(2)] == [2]
            assert index.meta(2) == (["new"], {})
        finally:
            index.close()
        outbox = Outbox(str(spool / "webhooks.db"))
        try:  # the 2-day-old event is still inside its retry window: kept, still pending
            assert [orjson.loads(b)["id"] for _, b in outbox.fetch(down, 10)] == [8]
        finally:
            outbox.close()
        line = next(x for x in served.lines if "never accepted" in x)
        assert "1 event(s)" in line and "/hook" not in line  # the URL's path is not logged
        status, body = http("GET", served.base + "/metrics", key=served.keys["acme"])
        assert status == 200 and "fastsend_webhook_events_expired_total 1" in body
    finally:
        served.stop()


def test_outbox_expiry_keeps_the_retry_window_and_counts_per_url(tmp_path: Path) -> None:
    """Only events past ``before`` go; each URL is told how many it will never get (one
    that took them all: none); an event without a time goes with its neighbours."""
    now = time.time()
    ob = Outbox(str(tmp_path / "webhooks.db"))
    ob.set_urls(["http://a.test/", "http://b.test/"])
    ob.append([orjson.dumps({"event": "x", "time": now - 9 * DAY}),
               orjson.dumps({"event": "no-time"}),
               orjson.dumps({"event": "x", "time": now - 8 * DAY}),
               orjson.dumps({"event": "x", "time": now - DAY})])  # fmt: skip
    ob.ack("http://a.test/", 2)
    assert ob.expire(now - 7 * DAY) == {"http://a.test/": 1, "http://b.test/": 3}
    assert [i for i, _ in ob.fetch("http://b.test/", 10)] == [4]
    assert ob.expire(now - 7 * DAY) == {}
    ob.ack("http://a.test/", 4)
    ob.ack("http://b.test/", 4)
    assert ob.pending() == 0
    ob.close()


def test_shared_outbox_expiry_and_a_url_no_node_sends_to(redis_server: Any, tmp_path: Path) -> None:
    """On Redis a URL taken out of the config keeps its cursor (other nodes may still
    send to it), so ack's pruning stopped at it and the shared outbox grew for ever:
    the expiry drops what is past the window whatever the cursors."""
    from fastsend.config import from_dict
    from fastsend.serve.context import open_context

    now = time.time()
    url = redis_server.url(node="n1", dir=str(tmp_path))
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool"), "url": url}}))
    try:
        ob = ctx.webhook_outbox()
        ob.set_urls(["http://gone.test/", "http://live.test/"])
        ob.append([orjson.dumps({"event": "x", "time": now - 9 * DAY}),
                   orjson.dumps({"event": "x", "time": now - 3 * DAY})])  # fmt: skip
        ob.set_urls(["http://live.test/"])  # gone.test removed from this node's config
        ob.ack("http://live.test/", 2)
        assert ob.pending() == 2  # gone.test's cursor holds both
        assert ob.expire(now - 7 * DAY) == {"http://gone.test/": 1}
        assert ob.pending() == 1
        assert [i for i, _ in ob.fetch("http://gone.test/", 10)] == [2]
    finally:
        ctx.close()


def test_the_event_log_is_reopened_after_a_rotation(tmp_path: Path) -> None:
    """logrotate renames events.jsonl: the log wrote on into the renamed file for ever."""
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path))
    log.emit({"event": "a"})
    log.flush()
    os.rename(path, tmp_path / "events.jsonl.1")
    log.emit({"event": "b"})
    log.reopen()
    log.emit({"event": "c"})
    log.close()
    assert [orjson.loads(x)["event"] for x in (tmp_path / "events.jsonl.1").read_bytes().splitlines()] == ["a", "b"]
    assert [orjson.loads(x)["event"] for x in path.read_bytes().splitlines()] == ["c"]


def test_serve_reopens_the_event_log_on_sighup(tmp_path: Path) -> None:
    served = Served(tmp_path, None)
    try:
        log = tmp_path / "spool" / "events.jsonl"
        os.rename(log, tmp_path / "old.jsonl")
        served.proc.send_signal(signal.SIGHUP)
        served.wait_line("configuration reloaded")
        _until(log.exists, "a new events.jsonl")
    finally:
        served.stop()
