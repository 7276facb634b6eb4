"""Campaigns, stats and suppression routes of the HTTP API (filled in below)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    return None
