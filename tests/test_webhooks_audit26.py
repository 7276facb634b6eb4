"""Session 26's outside audit of webhooks (sub26): each test on a defect it found,
failing before its fix.

- After a 413 (the receiver's body limit) halved a URL's batch, it never grew
  back: a receiver whose limit was raised, or a burst of large events that had
  passed, left the URL at one or two events a POST for good. The batch is
  doubled again after GROW_AFTER batches taken, up to batch_size.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from fastsend.serve import webhooks
from test_monitoring_audit17 import _evs


def test_the_batch_grows_back_after_a_413(tmp_path: Path) -> None:
    from aiohttp import web

    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.webhooks import WebhookDispatcher
    from fastsend.testing.http import app_on_loopback

    got: list[int] = []
    sizes: list[int] = []
    limit = [2]  # the receiver's, in events

    async def hook(request: web.Request) -> web.Response:
        batch = orjson.loads(await request.read())
        if len(batch) > limit[0]:
            return web.Response(status=413)
        sizes.append(len(batch))
        got.extend(e["id"] for e in batch)
        return web.Response(status=204)

    async def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(got) < n:
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.02)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        async with app_on_loopback(app) as base:
            ctx = open_context(from_dict({
                "spool": {"dir": str(tmp_path / "spool")},
                "webhooks": {"urls": [f"{base}/hook"], "secret": "0123456789abcdefghij",
                             "batch_size": 8, "retry_min": 30, "flush_interval": 0.01}}))  # fmt: skip
            d = WebhookDispatcher(ctx)
            await d.start()
            try:
                ctx.events.emit_many(_evs("delivered", range(8)))
                await wait_for(8)
                assert max(sizes) <= 2, sizes
                limit[0] = 100  # the receiver's limit raised
                sizes.clear()
                n = 8 + 4 * webhooks.GROW_AFTER * 8
                ctx.events.emit_many(_evs("delivered", range(8, n)))
                await wait_for(n)
            finally:
                await d.stop()
                ctx.close()

    asyncio.run(main())
    assert got == sorted(got) and len(set(got)) == len(got)
    assert max(sizes) == 8, sizes  # (before: 2 for good)
