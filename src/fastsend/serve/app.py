"""The HTTP API application: :mod:`fastsend.serve.api` (middleware, auth,
errors, request helpers) with the routes of :mod:`~fastsend.serve.api_messages`,
:mod:`~fastsend.serve.api_campaigns` and :mod:`~fastsend.serve.openapi`.

Assembled here, above the route modules, so imports go one way: the route
modules use ``api``'s helpers; ``api`` never imports them.
"""

from __future__ import annotations

from aiohttp import web

from fastsend.serve import api_campaigns, api_events, api_messages, openapi
from fastsend.serve.api import API_KEY, Api, ApiSettings, middleware
from fastsend.serve.context import ServeContext
from fastsend.serve.health import Health


def make_app(ctx: ServeContext, settings: ApiSettings) -> web.Application:
    """The application with every /v1 route and /metrics (tracking is added by main)."""
    app = web.Application(middlewares=[middleware], client_max_size=settings.max_body_bytes + 1024)
    app[API_KEY] = Api(ctx, settings)
    api_messages.add_routes(app)
    api_campaigns.add_routes(app)
    api_events.add_routes(app)  # GET /v1/events: the bulk export
    app.router.add_get("/v1/openapi.json", openapi.handler)
    app.router.add_get("/v1/health", Health(ctx).handler)  # a balancer's check (public)

    async def close(app: web.Application) -> None:
        app[API_KEY].close()

    app.on_cleanup.append(close)
    return app
