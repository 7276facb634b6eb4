"""Work repeated at a fixed interval for as long as a server runs.

NAME
    fastsend.periodic -- every(seconds, step, what, log, wait_first=False).

DESCRIPTION
    ``await every(60, alarms.evaluate_all, "alarm evaluation", log)`` runs
    ``step`` (a function, or one returning an awaitable), then sleeps
    ``seconds``, for ever; with ``wait_first`` it sleeps before the first run.
    A step that raises is logged on ``log`` ("<what> failed", with the
    traceback) and the next one runs on time: one bad pass never stops the
    loop. Cancelling the task stops it (``CancelledError`` is not caught).

DELIBERATELY NOT HERE
    No catch-up after a slow step (the interval is the sleep between steps)
    and no jitter: the loops here are single per process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["every"]


async def every(
    seconds: float,
    step: Callable[[], Any],
    what: str,
    log: logging.Logger,
    *,
    wait_first: bool = False,
) -> None:
    """Run ``step`` every ``seconds`` until cancelled; its failures are logged."""
    if wait_first:
        await asyncio.sleep(seconds)
    while True:
        try:
            r = step()
            if inspect.isawaitable(r):
                await r
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(seconds)
