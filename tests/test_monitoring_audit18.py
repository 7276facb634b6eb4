"""Observability audit, session 18: what a scrape or a dashboard poll costs serve's
event loop, marks of cloned hosts, and stray files written by tests."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

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
        import orjson

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
