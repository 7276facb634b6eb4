"""Webhook delivery from a durable outbox (stub; the full implementation follows)."""

from __future__ import annotations

from typing import Any


class WebhookDispatcher:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
