"""The OpenAPI 3.1 document of the HTTP API, served at /v1/openapi.json (no key needed).

Request schemas come from the msgspec structs the handlers decode with, so the
document cannot drift from validation; paths and answers are listed here.
A test checks that every route of the application appears in it.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from aiohttp import web

from fastsend.serve.api import json_response
from fastsend.serve.api_campaigns import CampaignIn, RecipientsIn, SuppressIn
from fastsend.serve.api_messages import BatchIn, MessageIn

_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: str, *codes: int, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": "success", **_json(schema or {"type": "object"})}}
    text = {
        400: "bad input (the error names the field)",
        401: "missing or invalid API key",
        403: "another tenant's resource",
        404: "not found",
        409: "conflicting state",
        413: "body or batch too large",
        429: "rate limit of the key exceeded",
    }
    for c in (401, 429, *codes):
        out[str(c)] = {"description": text[c], **_json(_ref("Error"))}
    return out


def _op(summary: str, answers: dict[str, Any], body: Any = None, **kw: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": answers, **kw}
    if body is not None:
        op["requestBody"] = {"required": True, **body}
    return op


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]


def document() -> dict[str, Any]:
    (_, components) = msgspec.json.schema_components(
        [MessageIn, BatchIn, CampaignIn, RecipientsIn, SuppressIn], ref_template=_REF
    )
    components["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "status": {"type": "integer"},
                    "message": {"type": "string"},
                    "field": {"type": "string", "description": "e.g. messages[3].to[1]"},
                },
                "required": ["status", "message"],
            }
        },
    }
    csv_body = {
        "content": {
            "application/json": {"schema": _ref("RecipientsIn")},
            "text/csv": {"schema": {"type": "string", "description": "header row with email"}},
            "application/x-ndjson": {"schema": {"type": "string", "description": "JSON lines"}},
        }
    }
    paths: dict[str, Any] = {
        "/v1/messages": {
            "post": _op(
                "Inject one message or a batch; 202 once durable in the spool",
                _answers("202", 400, 403, 413),
                _json({"oneOf": [_ref("MessageIn"), _ref("BatchIn")]}),
            )
        },
        "/v1/messages/{id}": {
            "get": _op(
                "A message's state and every event", _answers("200", 400, 403, 404), parameters=_ID
            )
        },
        "/v1/campaigns": {
            "post": _op(
                "Create a campaign from a template and recipients",
                _answers("201", 400, 413),
                _json(_ref("CampaignIn")),
            ),
            "get": _op("The tenant's campaigns", _answers("200")),
        },
        "/v1/campaigns/{id}": {
            "get": _op(
                "Progress and counts per state", _answers("200", 400, 403, 404), parameters=_ID
            )
        },
        "/v1/campaigns/{id}/recipients": {
            "post": _op(
                "Add recipients (JSON, CSV or JSON lines); ?strict=1 rejects all on a bad row",
                _answers("202", 400, 403, 404, 409, 413),
                csv_body,
                parameters=_ID,
            )
        },
        "/v1/stats": {
            "get": _op(
                "Event counts and rates per campaign, domain or source IP over a window",
                _answers("200", 400),
                parameters=[
                    {
                        "name": "window",
                        "in": "query",
                        "schema": {"enum": ["1m", "5m", "15m", "1h", "6h", "24h", "7d"]},
                    },
                    {
                        "name": "by",
                        "in": "query",
                        "schema": {"enum": ["campaign", "domain", "source_ip"]},
                    },
                ],
            )
        },
        "/v1/suppressions": {
            "get": _op("The tenant's suppression list", _answers("200", 400)),
            "post": _op("Suppress addresses", _answers("201", 400, 413), _json(_ref("SuppressIn"))),
        },
        "/v1/suppressions/{address}": {
            "delete": _op(
                "Remove an address from the suppression list",
                _answers("200", 400, 404),
                parameters=[
                    {
                        "name": "address",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
            )
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4)",
                "security": [],
                "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
            }
        },
    }
    for action in ("pause", "resume", "cancel"):
        paths[f"/v1/campaigns/{{id}}/{action}"] = {
            "post": _op(
                f"{action.capitalize()} a campaign",
                _answers("200", 400, 403, 404, 409),
                parameters=_ID,
            )
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fastsend API", "version": "1"},
        "servers": [{"url": "/"}],
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
    }


async def handler(request: web.Request) -> web.Response:
    return json_response(_cached())


@functools.cache
def _cached() -> dict[str, Any]:
    return document()
