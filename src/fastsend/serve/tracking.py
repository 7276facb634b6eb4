"""Open/click tracking and unsubscribe endpoints for `fastsend serve` (stub).

Routes are added to the serve application by `setup_tracking`; the full
implementation follows.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


def setup_tracking(app: web.Application, ctx: Any) -> None:
    """Add the /t/ (tracking) and /u/ (unsubscribe) routes to app."""
    app["fastsend_tracking_ctx"] = ctx
