"""SMTP submission and bounce/complaint intake listeners (stub; full version follows)."""

from __future__ import annotations

import asyncio
from typing import Any


async def start_listeners(ctx: Any) -> list[asyncio.AbstractServer]:
    """Start the configured SMTP listeners; returns their servers (none yet)."""
    return []
