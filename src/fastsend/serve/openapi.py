"""The OpenAPI 3.1 document of the HTTP API, served at /v1/openapi.json."""

from __future__ import annotations

from aiohttp import web

from fastsend.serve.api import json_response


async def handler(request: web.Request) -> web.Response:
    return json_response({"openapi": "3.1.0", "paths": {}})
