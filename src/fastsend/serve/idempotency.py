"""``Idempotency-Key``: a request that accepts mail, retried, is not accepted twice.

Every route that accepts mail (``POST /v1/messages``, one message or a batch;
``POST /v1/campaigns``; ``POST /v1/campaigns/{id}/recipients``, JSON, CSV or
JSON lines) takes an optional ``Idempotency-Key`` header (1-255 visible ASCII
characters). With it:

- the first request reserves the key in the spool (:meth:`Spool.idem_begin`:
  SQLite or Redis, so every node of a shared spool sees it), scoped to the
  key's tenant: one tenant's key never matches another tenant's;
- when it accepts (a 2xx answer), its status and body are stored with the key,
  durably, before the answer is sent; any other answer (a 4xx: nothing was
  accepted, or a 5xx) frees the key, so a corrected request may use it again;
- a retry with the same key and the same request (method, path and query,
  content type, body: a SHA-256 fingerprint) gets the stored answer again
  with ``Idempotent-Replayed: true``, and nothing is accepted again;
- the same key with another request: 422; while the first is still running:
  409 with ``Retry-After`` (the request is running on this or another node);
- a reservation whose request never answered because its process died (on this
  host: its pid is gone; elsewhere: after :data:`RUNNING_LEASE`) is taken over
  by the next retry, which runs the request again. Keys are kept
  ``[api] idempotency_ttl_s`` (24 h) from their first request, then swept.

Limit: a serve killed after the spool committed a request's rows and before
its answer was stored (the answer was never sent) runs the retry again.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from fastsend.serve.api import ApiError, Handler, api_of, bad, error_response, read_body, tenant_of
from fastsend.serve.uploads import UPLOAD, Uploads
from fastsend.spool.base import holder_gone, holder_tag

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY = 255
KEY_RE = re.compile(f"[!-~]{{1,{MAX_KEY}}}")
RUNNING_LEASE = 600.0  # s: a running request whose holder cannot be checked is abandoned after
SWEEP_EVERY = 300.0  # s between sweeps of expired keys

Digest = Callable[[web.Request], Awaitable[str]]


async def json_digest(request: web.Request) -> str:
    """SHA-256 of the request's body (read once: the handler reads it again from aiohttp)."""
    return hashlib.sha256(await read_body(request)).hexdigest()


def _abandoned(holder: bytes, created: float, now: float) -> bool:
    try:
        tag = orjson.loads(holder)
    except orjson.JSONDecodeError:
        return True
    return now - created > RUNNING_LEASE or (isinstance(tag, dict) and holder_gone(tag))


def idempotent(handler: Handler, digest: Digest = json_digest) -> Handler:
    """``handler`` (a route that accepts mail) honouring ``Idempotency-Key``
    (see the module docstring). ``digest``: the SHA-256 of the request's body."""

    async def run(request: web.Request) -> web.StreamResponse:
        key = request.headers.get(HEADER)
        if key is None:
            return await handler(request)
        if not KEY_RE.fullmatch(key):
            raise bad(f"{HEADER}: 1 to {MAX_KEY} visible ASCII characters", HEADER)
        try:
            return await _run(request, key)
        finally:
            saved = request.get(UPLOAD)
            if saved is not None and not saved.taken:  # never handed to a job
                Uploads.discard(saved.path)

    async def _run(request: web.Request, key: str) -> web.StreamResponse:
        api = api_of(request)
        spool = api.ctx.spool
        tenant = tenant_of(request)
        body = await digest(request)
        fp = hashlib.sha256(
            f"{request.method}\0{request.raw_path}\0{request.content_type}\0{body}".encode()
        ).hexdigest()
        holder = orjson.dumps({**holder_tag(), "req": secrets.token_hex(6)})
        now = time.time()
        ttl = api.settings.idempotency_ttl_s
        rec = spool.idem_begin(tenant, key, fp, now, ttl, holder)
        if rec is not None and rec.running and _abandoned(rec.holder, rec.created, now):
            rec = spool.idem_begin(tenant, key, fp, now, ttl, holder, stale=rec.holder)
        if rec is not None:
            if rec.fingerprint != fp:
                raise ApiError(
                    422, f"{HEADER}: this key was used for another request (method, path or"
                    " body differ); use a new key for a new request", HEADER,
                )  # fmt: skip
            if rec.running:
                return error_response(
                    ApiError(409, f"{HEADER}: a request with this key is still being processed;"
                             " retry later", HEADER),
                    {"Retry-After": "1"},
                )  # fmt: skip
            return web.Response(
                body=rec.body, status=rec.status, content_type="application/json",
                headers={REPLAYED: "true", HEADER: key},
            )  # fmt: skip
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = error_response(e)
        except BaseException:
            spool.idem_drop(tenant, key, holder)
            raise
        if 200 <= resp.status < 300 and isinstance(resp, web.Response) and resp.body is not None:
            spool.idem_finish(tenant, key, holder, resp.status, bytes(resp.body))  # type: ignore[arg-type]
            resp.headers[HEADER] = key
        else:  # nothing was accepted: the key is free again
            spool.idem_drop(tenant, key, holder)
        return resp

    return run

