"""An aiohttp application served on loopback for a test or a benchmark.

    async with app_on_loopback(app) as base:   # "http://127.0.0.1:PORT"
        ...                                    # requests against base

The port is a free one the kernel picks; the application is cleaned up (its
``on_cleanup`` hooks run) when the block ends, whatever ends it.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

__all__ = ["app_on_loopback"]


@contextlib.asynccontextmanager
async def app_on_loopback(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None, **site: Any
) -> AsyncIterator[str]:
    """``app`` listening on 127.0.0.1 (``site``: more TCPSite options); yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context, **site).start()
        port = runner.addresses[0][1]
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
