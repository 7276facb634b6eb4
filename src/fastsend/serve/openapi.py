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

from fastsend.serve.api import MAX_ID, json_response
from fastsend.serve.api_campaigns import CampaignIn, RecipientsIn, SuppressIn
from fastsend.serve.api_messages import BatchIn, MessageIn
from fastsend.serve.stats import PARAM_SCHEMAS, StatsAnswer, StatsParams

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
        403: "the From domain is not one of the tenant's domains",
        404: "not found (another tenant's id answers the same)",
        408: "the request body did not arrive within [api] body_timeout",
        409: "conflicting state (or: a request with this Idempotency-Key is still running)",
        413: "body or batch too large",
        415: "the Content-Type is not one the route takes (JSON; a list: CSV, JSON lines)",
        422: "this Idempotency-Key was used for another request",
        429: "a cap exceeded: the key's request rate ([api] rate_limit), the tenant's"
        " campaigns a day (max_campaigns_per_day), messages a day (tenant_daily_messages) or"
        " message rate (tenant_message_rate); nothing of the request was accepted; retry"
        " after Retry-After seconds (none: a request over the tenant's burst, send less)",
        503: "the spool cannot be written now (read-only, I/O error, unreachable): nothing"
        " of the request was accepted; retry after Retry-After seconds",
        507: "the spool's storage is full: nothing of the request was accepted (a batch of"
        " several campaigns' messages: the error names those accepted, with their ids); retry"
        " after Retry-After seconds",
    }
    for c in (401, 429, *codes):
        out[str(c)] = {"description": text[c], **_json(_ref("Error"))}
    return out


def _events_op() -> dict[str, Any]:
    """GET /v1/events (fastsend.serve.api_events): the bulk export."""
    answers = _answers("200", 400, 403)
    answers["200"] = {
        "description": "one page of events, streamed (NDJSON: one event per line; CSV with a"
        " header row); the next page's cursor in Fastsend-Next-Cursor and Link rel=next",
        "headers": {
            "Fastsend-Next-Cursor": {
                "description": "cursor of the next page; absent on the last page",
                "schema": {"type": "string"},
            }
        },
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    }
    answers["501"] = {
        "description": "no event index to export from (a Redis spool)",
        **_json(_ref("Error")),
    }

    def p(name: str, schema: dict[str, Any], what: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "schema": schema, "description": what}

    text = {"type": "string"}
    return _op(
        "Export events (time range, campaigns, event types), streamed, paged with a cursor",
        answers,
        parameters=[
            p("from", text, "unix seconds, ISO 8601, now or -2h/-7d (default: -24h)"),
            p("to", text, "the end, exclusive (default: now)"),
            p("campaign", text, "comma-separated campaign ids"),
            p("type", text, "comma-separated event names (delivered, bounced, ...)"),
            p("event", text, "the same as type"),
            p("format", {"type": "string", "enum": ["ndjson", "csv"]}, "default ndjson"),
            p("limit", {"type": "integer", "minimum": 1, "maximum": 100000, "default": 10000},
              "events in this page"),
            p("cursor", text, "Fastsend-Next-Cursor of the page before"),
            p("scope", {"type": "string", "enum": ["tenant", "node"]},
              "node: every tenant's events (admin tenants only)"),
        ],
        operationId="exportEvents",
    )


def _op(summary: str, answers: dict[str, Any], body: Any = None, **kw: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": answers, **kw}
    if body is not None:
        op["requestBody"] = {"required": True, **body}
    return op


_IDEM_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    "description": "Makes a retry safe: the first accepted answer (2xx) is stored with the key"
    " for the tenant ([api] idempotency_ttl_s, 24 h); a retry with the same key and the same"
    " request gets it again (header Idempotent-Replayed: true) and accepts nothing; the same"
    " key with another request is a 422, a retry while the first still runs a 409. What the"
    " request spools is recorded under the key in the same commit, so a retry after a server"
    " crash or a 5xx never accepts a recipient twice: it continues the request (only what is"
    " missing is spooled; header Idempotent-Resumed) and answers with the same ids. A 4xx"
    " answer is not stored (nothing was accepted): the key is free again.",
}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "true: the stored answer of an earlier request with this Idempotency-Key",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Idempotent-Resumed": {
        "description": "This answer continues a request with this Idempotency-Key whose earlier"
        " attempt died or failed after spooling some recipients: how many it had spooled (not"
        " spooled again; their ids are in this answer)",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
}


def _idempotent(op: dict[str, Any], ok: str) -> dict[str, Any]:
    """An operation that accepts mail: it takes an Idempotency-Key (fastsend.serve.idempotency)."""
    op["parameters"] = [*op.get("parameters", []), _IDEM_KEY]
    op["responses"][ok]["headers"] = _REPLAYED
    for c in ("409", "422", "503", "507"):
        op["responses"].setdefault(c, _answers(ok, int(c))[c])
    return op


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_COUNTS = {"type": "object", "additionalProperties": _INT}


def _response_schemas() -> dict[str, Any]:
    """What the handlers answer (checked against live answers by the fuzz test)."""
    campaign = _obj(
        ["id", "name", "kind", "status", "created"],
        id=_INT, name=_STR, kind=_STR, status=_STR, created=_NUM,
    )  # fmt: skip
    view = {
        **campaign,
        "properties": {
            **campaign["properties"],
            "counts": _COUNTS,
            "total": _INT,
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            # why it has its status ("" unless something said: a guardrail's pause)
            "reason": _STR,
            # its own shaping, when it was created with one (CampaignIn pool, max_rate)
            "pool": _STR,
            "max_rate": _NUM,
            # true when created so: an address already in the campaign is sent again
            "keep_duplicates": {"type": "boolean"},
            # recipient lists still being accepted (an upload spooled in the background)
            "spooling": {
                "type": "array",
                "items": _obj(
                    ["job", "rows", "read", "accepted", "rejected", "duplicates", "text"],
                    job=_INT,
                    rows=_INT,
                    read=_INT,
                    accepted=_INT,
                    rejected=_INT,
                    duplicates=_INT,
                    text=_STR,
                ),
            },
        },
        "required": [*campaign["required"], "counts", "total", "progress"],
    }
    nullable = lambda t: {"type": [t, "null"]}  # noqa: E731
    return {
        "Accepted": _obj(
            ["accepted", "messages"],
            accepted=_INT,
            messages={
                "type": "array",
                "items": _obj(
                    ["ids", "to"],
                    ids={"type": "array", "items": _INT},
                    to={"type": "array", "items": _STR},
                ),
            },
        ),
        "Message": _obj(
            ["id", "campaign", "to", "state", "attempts", "events", "tags", "metadata"],
            id=_INT,
            campaign=_INT,
            to=_STR,
            state=_STR,
            attempts=_INT,
            created=_NUM,
            updated=_NUM,
            next_attempt=nullable("number"),
            last_reply=_obj(
                [], code=nullable("integer"), enhanced=nullable("string"), text=nullable("string")
            ),
            tags={"type": "array", "items": _STR},
            metadata={"type": "object"},
            events={"type": "array", "items": {"type": "object"}},
        ),
        "Campaign": view,
        "Campaigns": _obj(
            ["campaigns", "next_cursor"],
            campaigns={"type": "array", "items": campaign},
            next_cursor=nullable("integer"),
        ),
        "RecipientsAccepted": _obj(
            ["id", "accepted", "rejected", "duplicates", "errors"],
            id=_INT,
            accepted=_INT,
            rejected=_INT,
            # rows left out: the campaign had their address (unless keep_duplicates)
            duplicates=_INT,
            errors={"type": "array", "items": _obj(["row", "error"], row=_INT, error=_STR)},
            # a CSV / JSON-lines upload: its ingest job, its rows, and whether the rest
            # is still being spooled in the background (GET the campaign for progress)
            job=_INT,
            rows=_INT,
            status={"enum": ["spooled", "spooling"]},
        ),
        "Stats": _obj(
            ["window", "window_s", "by", "groups"],
            window=_STR,
            window_s=_INT,
            by=_STR,
            groups={
                "type": "object",
                "additionalProperties": _obj(
                    ["counts", "rates_per_s"],
                    counts=_COUNTS,
                    rates_per_s={"type": "object", "additionalProperties": _NUM},
                ),
            },
        ),
        "Suppressions": _obj(
            ["suppressions", "count"],
            count=_INT,
            suppressions={
                "type": "array",
                "items": _obj(
                    ["address", "reason"],
                    address=_STR,
                    reason=_STR,
                    source=nullable("string"),
                    created=_NUM,
                    expires=nullable("number"),
                    message=nullable("integer"),
                ),
            },
        ),
        "Added": _obj(["added"], added=_INT),
        "Removed": _obj(["removed"], removed=_STR),
    }


def _stats_parameters() -> list[dict[str, Any]]:
    """GET /v1/stats's query parameters: the fields of StatsParams, each with its schema."""
    out = []
    for f in msgspec.structs.fields(StatsParams):
        out.append({"name": f.encode_name, "in": "query", "schema": PARAM_SCHEMAS[f.encode_name]})
    return out


def _link(op: str, expr: str) -> dict[str, Any]:
    return {"operationId": op, "parameters": {"id": expr}}


_ID_SCHEMA = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
_ID = [{"name": "id", "in": "path", "required": True, "schema": _ID_SCHEMA}]


def document() -> dict[str, Any]:
    (_, components) = msgspec.json.schema_components(
        [MessageIn, BatchIn, CampaignIn, RecipientsIn, SuppressIn, StatsAnswer],
        ref_template=_REF,
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
        "required": ["error"],
    }
    components.update(_response_schemas())
    csv_body = {
        "content": {
            "application/json": {"schema": _ref("RecipientsIn")},
            "text/csv": {"schema": {"type": "string", "description": "header row with email"}},
            "application/x-ndjson": {"schema": {"type": "string", "description": "JSON lines"}},
        }
    }
    paths: dict[str, Any] = {
        "/v1/messages": {
            "post": _idempotent(_op(
                "Inject one message or a batch; 202 once durable in the spool",
                _answers("202", 400, 403, 408, 413, 415, schema=_ref("Accepted")),
                _json({"oneOf": [_ref("MessageIn"), _ref("BatchIn")]}),
                operationId="postMessages",
            ), "202")
        },
        "/v1/messages/{id}": {
            "get": _op(
                "A message's state and every event",
                _answers("200", 400, 403, 404, schema=_ref("Message")),
                parameters=_ID,
                operationId="getMessage",
            )
        },
        "/v1/campaigns": {
            "post": _idempotent(_op(
                "Create a campaign from a template and recipients",
                _answers("201", 400, 403, 408, 413, 415, schema=_ref("RecipientsAccepted")),
                _json(_ref("CampaignIn")),
                operationId="postCampaign",
            ), "201"),
            "get": _op(
                "A page of the tenant's campaigns, by id",
                _answers("200", 400, schema=_ref("Campaigns")),
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {**_ID_SCHEMA, "maximum": 1000, "default": 100},
                        "description": "at most this many campaigns",
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": _ID_SCHEMA,
                        "description": "the next_cursor of the page before",
                    },
                ],
            ),
        },
        "/v1/campaigns/{id}": {
            "get": _op(
                "Progress and counts per state",
                _answers("200", 400, 403, 404, schema=_ref("Campaign")),
                parameters=_ID,
                operationId="getCampaign",
            )
        },
        "/v1/campaigns/{id}/recipients": {
            "post": _idempotent(_op(
                "Add recipients (JSON, CSV or JSON lines); ?strict=1 rejects all on a bad row",
                _answers("202", 400, 403, 404, 408, 409, 413, 415, schema=_ref("RecipientsAccepted")),
                csv_body,
                parameters=_ID,
                operationId="postRecipients",
            ), "202")
        },
        "/v1/stats": {
            "get": _op(
                "Rollups (counts and rates) by dimensions, filters, time range and granularity",
                _answers(
                    "200", 400, 403, 404, schema={"anyOf": [_ref("StatsAnswer"), _ref("Stats")]}
                ),
                parameters=_stats_parameters(),
                operationId="getStats",
            )
        },
        "/v1/events": {"get": _events_op()},
        "/v1/suppressions": {
            "get": _op(
                "The tenant's suppression list",
                _answers("200", 400, schema=_ref("Suppressions")),
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {**_ID_SCHEMA, "default": 1000},
                        "description": "at most this many entries",
                    }
                ],
            ),
            "post": _op(
                "Suppress addresses",
                _answers("201", 400, 408, 413, 415, schema=_ref("Added")),
                _json(_ref("SuppressIn")),
            ),
        },
        "/v1/suppressions/{address}": {
            "delete": _op(
                "Remove an address from the suppression list",
                _answers("200", 400, 404, schema=_ref("Removed")),
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
        "/v1/health": {
            "get": {
                "summary": "Whether this node takes API calls now (a balancer's check):"
                " 503 when its shared spool does not take a write",
                "security": [],
                "responses": {
                    "200": {"description": '{"status": "ok"}'},
                    "503": {"description": '{"status": "unavailable", "reason": "..."}'},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4): admin keys only"
                " ([dashboard] admin_tenants), or [api] admin_listen without a key",
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {}}},
                    "401": {"description": "missing or invalid API key", **_json(_ref("Error"))},
                    "404": {"description": "not an admin key", **_json(_ref("Error"))},
                },
            }
        },
    }
    for action in ("pause", "resume", "cancel"):
        paths[f"/v1/campaigns/{{id}}/{action}"] = {
            "post": _op(
                f"{action.capitalize()} a campaign",
                _answers("200", 400, 403, 404, 409, schema=_ref("Campaign")),
                parameters=_ID,
                operationId=f"{action}Campaign",
            )
        }
    # Links: the ids an answer carries lead to the operations that take them
    # (clients and the stateful fuzzing follow them).
    msg = paths["/v1/messages"]["post"]["responses"]["202"]
    msg["links"] = {"GetMessage": _link("getMessage", "$response.body#/messages/0/ids/0")}
    camp = paths["/v1/campaigns"]["post"]["responses"]["201"]
    camp["links"] = {
        name: _link(op, "$response.body#/id")
        for name, op in (
            ("GetCampaign", "getCampaign"), ("AddRecipients", "postRecipients"),
            ("Pause", "pauseCampaign"), ("Resume", "resumeCampaign"), ("Cancel", "cancelCampaign"),
        )
    }  # fmt: skip
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
