"""Webhooks audited from outside (session 25, track25).

Real parts: a ServeContext on a temporary spool, the webhook dispatcher POSTing
through aiohttp's real connector to a receiver on loopback
(tests/test_serve_webhooks.py's ``Receiver``); getaddrinfo's answers are replaced
only for the names a test plays a DNS server that never answers for.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from fastsend.config import from_dict
from test_serve_webhooks import Receiver
from test_tenant_ssrf22 import _until

SECRET = "operator-hook-secret-000000"


def test_a_receiver_whose_dns_never_answers_leaves_serve_its_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver's name whose DNS never answers (a tenant's authoritative server
    dropping queries: the resolver waits its whole timeout, 10-30 s, per lookup) held
    a thread of the event loop's default executor (aiohttp looks names up there) for as
    long as it hung, again at each retry: 8 such names filled the pool (6 threads on 2
    cores), and with it every other thing serve does in a thread (an API body decoded
    off the loop, SMTP AUTH's password hash, /metrics' and the dashboard's spool reads)
    waited. Now the webhooks look names up in threads of their own, one lookup at a
    time per name; the other receivers get their events meanwhile."""
    from fastsend.serve.context import open_context
    from fastsend.serve.webhooks import WebhookDispatcher

    real = socket.getaddrinfo
    never = threading.Event()
    asked: list[str] = []

    def hung(host: Any, *a: Any, **k: Any) -> Any:
        if isinstance(host, str) and host.endswith(".hung.example"):
            asked.append(host)
            never.wait(60)  # a DNS server that does not answer
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", hung)

    async def main() -> None:
        rx = Receiver(SECRET)
        good = (await rx.start()).replace("127.0.0.1", "localhost")  # (a name, looked up)
        hung_urls = [f"http://hooks-{i}.hung.example/hook" for i in range(8)]
        ctx = open_context(from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "webhooks": {"urls": [*hung_urls, good], "secret": SECRET, "timeout": 0.2,
                         "retry_min": 0.02, "retry_max": 0.05, "flush_interval": 0.01},
        }))  # fmt: skip
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            for i in range(3):
                ctx.emit({"event": "bounced", "id": i + 1, "rcpt": f"r{i}@example.org"})
                await asyncio.sleep(0)
            # Each hung URL tried again and again (its POSTs time out at 0.2 s).
            await _until(lambda: d.stats["failed"] >= 30)
            # The loop's default executor still runs work at once.
            got = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10)
            assert got == "free"
            await _until(lambda: len(rx.events) == 3)
            # One lookup at a time per name (not a thread per POST tried).
            assert sorted(set(asked)) == sorted(u.split("/")[2] for u in hung_urls)
            assert len(asked) <= len(hung_urls) * 2, len(asked)
        finally:
            never.set()
            await d.stop()
            ctx.close()
            await rx.close()

    asyncio.run(main())


def test_an_event_over_the_receivers_body_limit_does_not_hold_the_ones_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 413 halves the URL's batch, down to one event; one event alone over the
    receiver's body limit (a bounce's long diagnostic, a click on a long URL) was then
    refused again and again, with backoff, until retention_days (7 days): every later
    event for the URL waited behind it. Now an event a receiver refuses as too large by
    itself is passed (it is in the event log and GET /v1/events), said in the log and
    counted (fastsend_webhook_events_too_large_total); the rest go on."""
    import logging
    import time

    import orjson
    from aiohttp import web

    from fastsend.serve.context import open_context
    from fastsend.serve.metrics import Metrics
    from fastsend.serve.webhooks import WebhookDispatcher
    from fastsend.testing.http import app_on_loopback

    got: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if len(body) > 3000:  # the receiver's body limit
            return web.Response(status=413)
        got.extend(e["id"] for e in orjson.loads(body))
        return web.Response(status=204)

    async def main() -> str:
        app = web.Application()
        app.router.add_post("/hook", hook)
        async with app_on_loopback(app) as base:
            ctx = open_context(from_dict({
                "spool": {"dir": str(tmp_path / "spool")},
                "webhooks": {"urls": [f"{base}/hook"], "secret": SECRET, "batch_size": 4,
                             "retry_min": 30, "flush_interval": 0.01}}))  # fmt: skip
            d = WebhookDispatcher(ctx)
            m = Metrics(ctx)
            m.webhooks = d
            await d.start()
            try:
                t = time.time()
                for i in range(6):
                    text = "550 5.1.1 " + ("x" * 5000 if i == 2 else "no such user")
                    ctx.events.emit({"time": t, "event": "bounced", "id": i, "campaign": 1,
                                     "rcpt": f"r{i}@example.org", "text": text})  # fmt: skip
                assert d.outbox is not None
                outbox = d.outbox
                # (the receiver has the last batch before its 204 reaches the
                # dispatcher and moves the URL's cursor: wait for both)
                await _until(lambda: len(got) == 5 and outbox.pending(f"{base}/hook") == 0)
                return m.render()
            finally:
                await d.stop()
                ctx.close()

    with caplog.at_level(logging.WARNING, logger="fastsend.webhooks"):
        text = asyncio.run(main())
    assert got == [0, 1, 3, 4, 5]
    assert "fastsend_webhook_events_too_large_total 1" in text
    said = [r.getMessage() for r in caplog.records if "too large" in r.getMessage()]
    assert len(said) == 1 and "event 3" in said[0], said
