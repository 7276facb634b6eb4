"""Webhooks: a receiver written here verifies signatures; the outbox survives restarts.

Real parts: a ServeContext on a temporary spool (its event log feeds the
dispatcher), an aiohttp receiver on loopback, the dispatcher's aiohttp client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fastsend.config import from_dict
from fastsend.serve.context import ServeContext, open_context
from fastsend.serve.webhooks import Outbox, WebhookConfig, WebhookDispatcher, sign_payload

SECRET = "whsec-test-secret-0123456789"


class Receiver:
    """A webhook endpoint as a customer would write it: verify, then store."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.status = 200
        self.events: list[dict[str, Any]] = []
        self.batches: list[int] = []
        self.bad_signatures = 0
        self.attempts = 0
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        header = request.headers.get("Fastsend-Signature", "")
        try:
            parts = dict(kv.split("=", 1) for kv in header.split(","))
            t, v1 = parts["t"], parts["v1"]
        except (KeyError, ValueError):
            self.bad_signatures += 1
            return web.Response(status=400)
        want = hmac.new(self.secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, v1) or abs(time.time() - int(t)) > 300:
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.status != 200:
            return web.Response(status=self.status)
        batch = orjson.loads(body)
        assert isinstance(batch, list)
        first, last = request.headers["Fastsend-Batch"].split("-")
        assert [batch[0]["event_id"], batch[-1]["event_id"]] == [int(first), int(last)]
        self.batches.append(len(batch))
        self.events.extend(batch)
        return web.Response(status=204)

    async def start(self, port: int | None = None) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.server = TestServer(app, host="127.0.0.1", port=port)
        await self.server.start_server()
        return str(self.server.make_url("/hook"))

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


def _ctx(tmp_path: Path, urls: list[str], **extra: Any) -> ServeContext:
    hooks = {"urls": urls, "secret": SECRET, "batch_size": 3, "retry_min": 0.02}
    hooks.update({"retry_max": 0.1, "flush_interval": 0.01, **extra})
    return open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, "webhooks": hooks}))


async def _until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def _emit(ctx: ServeContext, names: list[str], start: int = 0) -> None:
    for i, name in enumerate(names, start):
        ctx.emit({"event": name, "id": i, "rcpt": f"r{i}@example.org"})


def test_signed_batches_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        rx = Receiver(SECRET)
        url = await rx.start()
        ctx = _ctx(tmp_path, [url])
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            names = ["accepted", "delivered", "deferred", "bounced", "complained"]
            names += ["opened", "clicked", "unsubscribed"]
            _emit(ctx, names)
            await _until(lambda: len(rx.events) == len(names))
            assert [e["event"] for e in rx.events] == names
            assert [e["id"] for e in rx.events] == list(range(len(names)))
            ids = [e["event_id"] for e in rx.events]
            assert ids == sorted(set(ids))
            assert max(rx.batches) <= 3 and rx.bad_signatures == 0
            assert d.outbox is not None
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 0)
        finally:
            await d.stop()
            ctx.close()
            await rx.close()

    asyncio.run(main())


def test_wrong_secret_is_refused_by_receiver_and_retried(tmp_path: Path) -> None:
    async def main() -> None:
        rx = Receiver("another-secret-entirely-xx")
        url = await rx.start()
        ctx = _ctx(tmp_path, [url])
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            _emit(ctx, ["bounced"])
            await _until(lambda: rx.bad_signatures >= 2)  # refused, then retried
            assert rx.events == []
            assert d.outbox is not None and d.outbox.pending() == 1  # nothing lost
        finally:
            await d.stop()
            ctx.close()
            await rx.close()

    asyncio.run(main())


def test_outbox_survives_restart_and_outage(tmp_path: Path) -> None:
    async def main() -> None:
        rx = Receiver(SECRET)
        url = await rx.start()
        rx.status = 503  # the endpoint is down
        ctx = _ctx(tmp_path, [url])
        d = WebhookDispatcher(ctx)
        await d.start()
        _emit(ctx, ["accepted"] * 5)
        await _until(lambda: rx.attempts >= 3)
        _emit(ctx, ["delivered"] * 2, start=5)  # still in memory when we stop
        await d.stop()
        ctx.close()
        assert rx.events == []
        box = Outbox(str(tmp_path / "spool" / "webhooks.db"))
        assert box.pending() == 7  # durable across the stop
        box.close()

        # A new process: new context, new dispatcher; the endpoint comes back.
        rx.status = 200
        ctx2 = _ctx(tmp_path, [url])
        d2 = WebhookDispatcher(ctx2)
        await d2.start()
        try:
            await _until(lambda: len(rx.events) >= 7)
            assert [e["id"] for e in rx.events] == list(range(7))
            assert rx.bad_signatures == 0
            await _until(lambda: d2.outbox is not None and d2.outbox.pending() == 0)
        finally:
            await d2.stop()
            ctx2.close()
            await rx.close()

    asyncio.run(main())


def test_one_endpoint_down_does_not_block_another(tmp_path: Path) -> None:
    async def main() -> None:
        up, down = Receiver(SECRET), Receiver(SECRET)
        u1, u2 = await up.start(), await down.start()
        down.status = 500
        ctx = _ctx(tmp_path, [u1, u2], events=["bounced", "complained"])
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            _emit(ctx, ["bounced", "delivered", "complained", "opened"])
            await _until(lambda: len(up.events) == 2)
            assert [e["event"] for e in up.events] == ["bounced", "complained"]
            assert down.events == []
            assert d.outbox is not None and d.outbox.pending(u2) == 2
            assert d.outbox.pending() == 2  # kept until the second URL has them
            down.status = 200
            await _until(lambda: len(down.events) == 2)
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 0)
        finally:
            await d.stop()
            ctx.close()
            await up.close()
            await down.close()

    asyncio.run(main())


def test_config_and_signature_helpers(tmp_path: Path) -> None:
    assert sign_payload(b"k" * 16, b"[]", 1700000000) == (
        "t=1700000000,v1=" + hmac.new(b"k" * 16, b"1700000000.[]", hashlib.sha256).hexdigest()
    )
    assert not WebhookConfig.of(from_dict({}).webhooks).urls
    with pytest.raises(ValueError, match="secret"):
        from_dict({"webhooks": {"urls": ["http://127.0.0.1:1/"]}})
    with pytest.raises(ValueError, match="unknown"):
        from_dict({"webhooks": {"url": "x"}})
    with pytest.raises(ValueError, match="urls"):
        from_dict({"webhooks": {"urls": ["ftp://x"], "secret": SECRET}})
    key = tmp_path / "wh.key"
    key.write_text(SECRET + "\n")
    c = WebhookConfig.of(
        from_dict({"webhooks": {"urls": "https://h.example/", "secret_file": str(key)}}).webhooks
    )
    assert c.urls == ["https://h.example/"] and c.secret == SECRET.encode()
    # No URLs: start/stop are no-ops and nothing listens to the event log.
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "s")}}))
    before = list(ctx.events.listeners)  # the rollups' (fastsend.analytics), nothing else
    d = WebhookDispatcher(ctx)
    asyncio.run(d.start())
    assert ctx.events.listeners == before
    asyncio.run(d.stop())
    ctx.close()


def test_a_url_with_its_secret_in_the_path_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Many receivers' URLs carry their secret in the path (Slack's
    /services/T.../B.../<secret>, Zapier's, Discord's): a refused batch is logged with
    the URL's host and a digest of it, never its path, query or credentials."""
    import logging

    async def main() -> None:
        rx = Receiver(SECRET)
        rx.status = 500
        url = await rx.start()
        secret_url = url + "?token=QUERYSECRET"
        secret_url = secret_url.replace("http://", "http://user:PASSWORDSECRET@")
        app = web.Application()
        app.router.add_post("/services/T0/B0/PATHSECRET", rx.handle)
        path_rx = TestServer(app, host="127.0.0.1")
        await path_rx.start_server()
        path_url = str(path_rx.make_url("/services/T0/B0/PATHSECRET"))
        ctx = _ctx(tmp_path, [secret_url, path_url])
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            _emit(ctx, ["bounced"])
            await _until(lambda: rx.attempts >= 4)
        finally:
            await d.stop()
            ctx.close()
            await rx.close()
            await path_rx.close()

    with caplog.at_level(logging.WARNING, logger="fastsend.webhooks"):
        asyncio.run(main())
    text = caplog.text
    assert "not accepted" in text and "127.0.0.1" in text, text
    for secret in ("PATHSECRET", "QUERYSECRET", "PASSWORDSECRET", "user"):
        assert secret not in text, text


_KILLED_RUN = """
import asyncio, os, signal, sys
from fastsend.config import from_dict
from fastsend.serve.context import open_context
from fastsend.serve.webhooks import WebhookDispatcher

spool, url, secret, redis_url = sys.argv[1:5]


async def main():
    table = {"dir": spool, **({"url": redis_url} if redis_url else {})}
    ctx = open_context(from_dict({"spool": table, "webhooks": {
        "urls": [url], "secret": secret, "retry_min": 0.02, "retry_max": 0.1,
        "flush_interval": 0.01}}))
    d = WebhookDispatcher(ctx)
    await d.start()
    for i in range(3):
        ctx.emit({"event": "accepted", "id": i, "rcpt": f"r{i}@example.org"})
    while d.outbox.pending() < 3:  # these three reached the outbox
        await asyncio.sleep(0.01)
    for i in range(3, 8):  # these reach the event log (serve's tick writes it), not the outbox
        ctx.emit({"event": "delivered", "id": i, "rcpt": f"r{i}@example.org"})
    ctx.events.flush()
    os.kill(os.getpid(), signal.SIGKILL)


asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_events_a_killed_run_held_in_memory_are_sent_after_the_restart(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """serve killed with kill -9: the events its dispatcher still held in memory (up to
    flush_interval of them: 448 deliveries of 3,000 in a run against the sink; on a
    Redis spool the events of the API, tracking and the intake, complaints among them)
    were in the event log but never reached the outbox, so no webhook told them. The
    outbox now keeps how far into the node's event log its events go; the next start
    sends the rest from the log, once each, in order; a clean stop leaves nothing to
    resend."""
    import sys

    redis_url = ""
    if backend == "redis":
        redis_url = str(request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path)))

    def ctx_of(url: str) -> ServeContext:
        hooks = {"urls": [url], "secret": SECRET, "retry_min": 0.02, "retry_max": 0.1,
                 "flush_interval": 0.01}  # fmt: skip
        table: dict[str, str] = {"dir": str(tmp_path / "spool")}
        if redis_url:
            table["url"] = redis_url
        return open_context(from_dict({"spool": table, "webhooks": hooks}))

    async def main() -> None:
        rx = Receiver(SECRET)
        url = await rx.start()
        rx.status = 503  # the endpoint is down while the first run lives
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _KILLED_RUN, str(tmp_path / "spool"), url, SECRET, redis_url)
        assert await child.wait() == -9
        logged = (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()
        assert len(logged) == 8
        # The endpoint comes back on the same URL, as a new server: a POST the dead
        # run sent just before its kill was answered 503 by the old one. (Turning the
        # status to 200 let the old server take that POST, when this loop read it
        # after the child's exit: its three events arrived twice, under load.)
        assert rx.server is not None
        port = rx.server.port
        await rx.close()
        rx = Receiver(SECRET)
        assert await rx.start(port) == url
        ctx = ctx_of(url)
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            await _until(lambda: len(rx.events) >= 8)
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 0)
            assert [(e["event"], e["id"]) for e in rx.events] == [
                *(("accepted", i) for i in range(3)), *(("delivered", i) for i in range(3, 8))]
        finally:
            await d.stop()
            ctx.close()
        # A clean stop and a start: nothing is sent twice, new events go on.
        ctx = ctx_of(url)
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            _emit(ctx, ["bounced"], start=8)
            await _until(lambda: len(rx.events) >= 9)
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 0)
            assert [e["id"] for e in rx.events] == list(range(9))
        finally:
            await d.stop()
            ctx.close()
            await rx.close()

    asyncio.run(main())


def test_a_full_outbox_keeps_the_events_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The outbox refusing writes (SQLITE_FULL, as a full disk gives it: made with
    PRAGMA max_page_count) dropped the events of the failed write although it logged
    "keep the events in memory and retry", and logged it every 0.2 s. Now they stay
    buffered in order, and the outage is said once when it starts and once when it ends."""
    import logging

    caplog.set_level(logging.INFO, "fastsend.webhooks")

    async def main() -> None:
        rx = Receiver(SECRET)
        url = await rx.start()
        ctx = _ctx(tmp_path, [url])
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            _emit(ctx, ["accepted"])
            await _until(lambda: len(rx.events) == 1)
            assert d.outbox is not None
            db = d.outbox.db
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full
            for i in range(1, 31):
                ctx.emit({"event": "delivered", "id": i, "rcpt": f"r{i}@example.org",
                          "text": "x" * 2000})  # fmt: skip
            await _until(lambda: "failed" in caplog.text)
            failed = len(rx.events)
            await asyncio.sleep(0.3)  # more flushes try while it is full
            db.execute("PRAGMA max_page_count=1073741823")  # space again
            await _until(lambda: len(rx.events) == 31)
            assert failed < 31
            assert [e["id"] for e in rx.events] == list(range(31))
            said = [r.getMessage() for r in caplog.records if r.name == "fastsend.webhooks"]
            assert len(said) == 2, said
            assert "kept" in said[0] and "written again" in said[1], said
        finally:
            await d.stop()
            ctx.close()
            await rx.close()

    asyncio.run(main())
