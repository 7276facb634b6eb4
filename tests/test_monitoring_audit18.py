"""Observability audit, session 18: what a scrape or a dashboard poll costs serve's
event loop, marks of cloned hosts, and stray files written by tests."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest


@pytest.fixture(params=["sqlite", "redis"])
def spool_table(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The [spool] table of a SQLite spool, then of a Redis one (real redis-server)."""
    table = {"dir": str(tmp_path / "spool")}
    if request.param == "redis":
        table["url"] = request.getfixturevalue("redis_server").url(node="n1", dir=table["dir"])
    return table


def _blocking_spy(
    monkeypatch: pytest.MonkeyPatch, cls: type, name: str, free: list[bool]
) -> None:
    """Replace ``cls.name`` by a spy that waits until serve's loop has run a callback
    it scheduled: on the loop's own thread the callback never runs (the loop is
    held by the spy), and ``free`` gets False after 3 s."""
    real = getattr(cls, name)

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        ran = threading.Event()
        LOOP.call_soon_threadsafe(ran.set)
        free.append(ran.wait(3.0))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, spy)


LOOP: asyncio.AbstractEventLoop


def test_scrapes_and_dashboard_polls_read_the_spool_off_the_event_loop(
    spool_table: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics on a Redis spool counted every pending message's age on serve's event
    loop (1.15 s a scrape at 200,000 pending, measured here: the loop also carries
    the supervisor's dispatch, the listeners and every request), and the dashboard's
    counts per state and pending per domain were made there on both spools (Redis
    0.86 s, SQLite 0.12 s at 200,000 pending, every few seconds while a page is
    open). Both are read in a thread now: while the spool is being read, the loop
    runs other callbacks, and the figures are right."""
    global LOOP
    from aiohttp.test_utils import make_mocked_request

    from fastsend.config import from_dict
    from fastsend.serve.api import TENANT
    from fastsend.serve.context import open_context
    from fastsend.serve.dashboard import Dashboard
    from fastsend.serve.metrics import Metrics

    ctx = open_context(from_dict({"spool": spool_table}))
    spool = ctx.spool
    cid = spool.create_campaign({"from": "a@example.com", "subject": "s", "text": "t"},
                                tenant="t1", status="paused")  # fmt: skip
    now = time.time()
    spool.add_messages(cid, [(f"u{i}@d{i % 3}.example", f"d{i % 3}.example", b"{}")
                             for i in range(30)], now - 7200)  # fmt: skip
    spool.add_messages(cid, [(f"v{i}@d0.example", "d0.example", b"{}") for i in range(5)], now)
    backend = type(spool)
    free: list[bool] = []
    for name in ("queue_shape", "pending_domains"):
        _blocking_spy(monkeypatch, backend, name, free)
    m = Metrics(ctx)
    d = Dashboard(ctx)

    async def main() -> tuple[str, dict[str, Any]]:
        global LOOP
        LOOP = asyncio.get_running_loop()
        resp = await m.handler(make_mocked_request("GET", "/metrics"))
        req = make_mocked_request("GET", "/v1/dashboard")
        req[TENANT] = "t1"
        snap = await d.snapshot(req)
        return bytes(resp.body).decode(), orjson.loads(snap.body)  # type: ignore[arg-type]

    try:
        text, view = asyncio.run(main())
    finally:
        ctx.close()
    assert free and all(free), f"the spool was read on the event loop: {free}"
    assert len(free) == 2  # one read each, none on the loop
    assert "fastsend_queue_depth 35" in text
    assert 'fastsend_queue_age{le_minutes="5"} 5' in text
    assert 'fastsend_messages{state="queued"} 35' in text
    assert view["queue_depth"] == 35 and view["states"]["queued"] == 35
    assert view["pending_by_domain"][0] == {"domain": "d0.example", "pending": 15}
    assert [c["id"] for c in view["campaigns"]] == [cid]


# ------------------------------------------- marks of cloned hosts on a shared store
def test_cloned_hosts_with_one_name_and_path_keep_their_own_rollup_marks(
    tmp_path: Path, redis_server: Any
) -> None:
    """Each listener catching up after a kill -9 (rollups, event index, webhooks) keeps
    its mark in the shared store under a key that was this host's name and the log's
    path: two cloned machines (one image: one host name, one path) overwrote each
    other's, and a restart read the other's mark: node A's 200 uncounted deliveries
    were never counted (a mark naming another file reads nothing; on a block-level
    clone, where the inode is the same too, it counts the wrong span). The key is a
    random id kept beside the log now, made at its first use. Here the clone is the
    same path used by two installs in turn (this test's one host name)."""
    from tests.test_analytics_catchup import _count, _delivered, _Spool

    from fastsend.analytics.attach import attach
    from fastsend.config import from_dict
    from fastsend.events import EventLog
    from fastsend.spool import open_spool

    url = redis_server.url(node="n1", dir=str(tmp_path))
    shared = open_spool(url).shared()
    local = tmp_path / "local"  # both machines' local dir: one path
    now = time.time()

    def start() -> tuple[Any, Any]:
        local.mkdir(exist_ok=True)
        cfg = from_dict({"spool": {"dir": str(local)}})
        log = EventLog(str(local / "events.jsonl"))
        r = attach(cfg, _Spool(local, shared), log)
        assert r is not None
        return log, r

    log, r = start()  # machine A
    log.emit_many(_delivered(300, 0, now))
    r.flush()
    log.emit_many(_delivered(200, 300, now))  # in its log only: then kill -9
    log.flush()
    local.rename(tmp_path / "disk-a")

    log, r = start()  # machine B, cloned from A's image before its first start
    log.emit_many(_delivered(100, 1000, now))
    r.flush()  # its mark written: it is the last writer
    log.emit_many(_delivered(50, 1100, now))  # kill -9
    log.flush()
    local.rename(tmp_path / "disk-b")

    (tmp_path / "disk-a").rename(local)  # machine A starts again
    log, r = start()
    assert _count(r.store, now) == 300 + 200 + 100  # A's own 200 caught up
    log.close()
    r.close()
    local.rename(tmp_path / "disk-a")
    (tmp_path / "disk-b").rename(local)  # and machine B
    log, r = start()
    assert _count(r.store, now) == 300 + 200 + 100 + 50
    log.close()
    r.close()


def test_a_node_id_is_kept_and_a_copy_on_another_machine_makes_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastsend import events

    machine = tmp_path / "machine-id"
    machine.write_text("aaaa1111\n")
    monkeypatch.setattr(events, "MACHINE_ID_FILES", (str(machine),))
    d = tmp_path / "local"
    d.mkdir()
    first = events.node_id(str(d))
    assert first and events.node_id(str(d)) == first  # kept
    assert (d / events.NODE_ID_FILE).stat().st_mode & 0o777 == 0o600
    assert events.mark_key(str(d / "events.jsonl")) == f"node-{first}:{d / 'events.jsonl'}"
    machine.write_text("bbbb2222\n")  # the directory copied to another machine
    other = events.node_id(str(d))
    assert other and other != first and events.node_id(str(d)) == other
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # (root writes anyway)
            import socket

            assert events.node_id(str(ro)) == ""
            assert events.mark_key(str(ro / "e.jsonl")) == f"{socket.gethostname()}:{ro}/e.jsonl"
    finally:
        ro.chmod(0o700)


# ------------------------------------------- /metrics while the spool cannot be read
def test_metrics_answer_while_redis_is_out_of_reach(tmp_path: Path) -> None:
    """/metrics read the spool's figures (and the redelivered count) from Redis at each
    scrape: with Redis out of reach the scrape failed (an exception, a 500), so
    Prometheus saw the node itself down (``up`` 0) just when it is the one to tell
    of the outage; the dashboard's poll failed the same way. Both answer now with
    the figures read last, /metrics with ``fastsend_spool_up 0``."""
    from aiohttp.test_utils import make_mocked_request
    from tests._redis_helpers import start_redis

    from fastsend.config import from_dict
    from fastsend.serve.api import TENANT
    from fastsend.serve.context import open_context
    from fastsend.serve.dashboard import Dashboard
    from fastsend.serve.metrics import Metrics

    with start_redis() as server:
        url = server.url(node="n1", dir=str(tmp_path / "spool"))
        ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool"), "url": url}}))
        spool = ctx.spool
        cid = spool.create_campaign({"from": "a@example.com", "subject": "s", "text": "t"},
                                    status="paused")  # fmt: skip
        spool.add_messages(cid, [(f"u{i}@d.example", "d.example", b"{}") for i in range(7)],
                           time.time())  # fmt: skip
        m = Metrics(ctx)
        d = Dashboard(ctx)

        async def scrape() -> tuple[int, str, dict[str, Any]]:
            resp = await m.handler(make_mocked_request("GET", "/metrics"))
            req = make_mocked_request("GET", "/v1/dashboard")
            req[TENANT] = "default"
            snap = await d.snapshot(req)
            text = bytes(resp.body).decode()  # type: ignore[arg-type]
            return resp.status, text, orjson.loads(snap.body)  # type: ignore[arg-type]

        try:
            st, text, view = asyncio.run(scrape())
            assert st == 200 and "fastsend_queue_depth 7" in text and view["queue_depth"] == 7
            assert "fastsend_spool_up 1" in text and "fastsend_redelivered_total 0" in text
            server.proc.kill()
            server.proc.wait(10)
            m._spool_cache = (0.0, m._spool_cache[1])  # (the figures are old: read again)
            d._spool_cache = {k: (0.0, v) for k, (_t, v) in d._spool_cache.items()}
            st, text, view = asyncio.run(scrape())
            assert st == 200, text
            assert "fastsend_up 1" in text and "fastsend_spool_up 0" in text
            assert "fastsend_queue_depth 7" in text and view["queue_depth"] == 7  # the last read
        finally:
            ctx.close(release=False)


def test_the_event_index_catches_up_from_its_mark_of_before_the_node_id(tmp_path: Path) -> None:
    """A stop's drain writes its events after serve's event index closed, and the next
    start indexes them from the index's mark (tests/test_events_index.py). An index
    upgraded from the host:path key to the node-id key found no mark at its first
    start, and the drain of the stop before the upgrade stayed out of it (GET
    /v1/messages/{id} without the deliveries). The local index reads its mark under
    the old key then (a local store: no clone shares it)."""
    import socket

    from fastsend.events import EventLog, mark_key
    from fastsend.serve.eventindex import EventIndex

    spool = tmp_path / "spool"
    spool.mkdir()
    path = str(spool / "events.jsonl")
    log = EventLog(path)
    log.emit_many([{"time": time.time(), "event": "accepted", "id": i, "campaign": 1,
                    "rcpt": f"u{i}@d.example"} for i in range(3)])  # fmt: skip
    log.flush()
    mark = log.mark()
    log.emit_many([{"time": time.time(), "event": "delivered", "id": i, "campaign": 1,
                    "rcpt": f"u{i}@d.example"} for i in range(3)])  # the drain  # fmt: skip
    log.close()
    ix = EventIndex(str(spool))  # as the last version left it: its mark under host:path
    ix.db.execute("INSERT INTO marks VALUES (?, ?)",
                  (f"{socket.gethostname()}:{os.path.realpath(path)}", mark))  # fmt: skip
    ix.db.commit()
    log = EventLog(path)
    assert ix.attach(log) == 3
    assert [e["event"] for e in ix.for_message(1)] == ["delivered"]
    assert ix._kept_mark() == log.mark() and ix.mark_key == mark_key(path)
    log.close()
    ix.close()


def test_every_event_is_described_in_the_event_log_document() -> None:
    """The event log had no description of its fields nor a word on what may change
    (a consumer of events.jsonl, a webhook or an export had the source to go by)."""
    from fastsend.config.serve import EVENT_NAMES

    doc = (Path(__file__).resolve().parent.parent / "docs" / "EVENTS.md").read_text()
    assert "## Compatibility" in doc
    missing = sorted(n for n in EVENT_NAMES if f"`{n}`" not in doc)
    assert not missing, f"docs/EVENTS.md does not describe {missing}"
