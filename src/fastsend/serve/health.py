"""``GET /v1/health``: whether this node can take API calls now (a balancer's check).

NAME
    fastsend.serve.health -- Health: the handler of ``GET /v1/health``.

DESCRIPTION
    Public (no key: a balancer has none) and says nothing about the setup:
    200 ``{"status": "ok"}``, or 503 ``{"status": "unavailable", "reason": ...}``
    when the shared spool (Redis) does not take a small write (``Spool.probe``)
    within ``PROBE_WAIT`` s: out of reach from this node (a partition, a
    failover in progress), refusing writes (READONLY, MISCONF, OOM). Every
    call that spools would answer 503 there; HAProxy's check on
    ``/v1/openapi.json`` (a static document) kept sending such a node its share
    of the calls while the other nodes could take them. The probe runs in a
    thread, at most once per ``PROBE_EVERY`` s whatever the poll rate, and
    never on the event loop. A local (SQLite) spool answers ok: its disk's
    problems are each write's answer (507/503).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from fastsend.serve.api import json_response, only_params

PROBE_EVERY = 1.0  # s: a probe's answer is reused this long
PROBE_WAIT = 2.0  # s a check waits for a probe before it answers "unavailable"


class Health:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self._task: asyncio.Future[str] | None = None
        self._at = -PROBE_EVERY  # monotonic time of the last answer
        self._reason = ""  # "" : the last probe was answered

    def _probe(self) -> str:
        """In a thread: why the spool cannot take writes now ("" : it can)."""
        spool = self.ctx.spool
        if spool.shared() is None:
            return ""
        try:
            spool.probe()
        except spool.outage_errors() as e:  # (the class only: no address, no setup)
            return f"the shared spool is out of reach or refuses writes ({type(e).__name__})"
        except Exception as e:
            return f"the shared spool failed a write ({type(e).__name__})"
        return ""

    async def handler(self, request: web.Request) -> web.Response:
        only_params(request, ())
        if self._task is None and time.monotonic() - self._at >= PROBE_EVERY:
            self._task = asyncio.ensure_future(asyncio.to_thread(self._probe))
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=PROBE_WAIT)
            if not done:  # (the probe goes on: the next check reads its answer)
                return self._answer(f"the shared spool does not answer within {PROBE_WAIT:g} s")
            task, self._task = self._task, None
            self._at = time.monotonic()
            try:
                self._reason = task.result()
            except Exception as e:  # (the thread itself failed)
                self._reason = f"the probe failed ({type(e).__name__})"
        return self._answer(self._reason)

    @staticmethod
    def _answer(reason: str) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        if reason:
            return json_response({"status": "unavailable", "reason": reason}, 503,
                                 {**headers, "Retry-After": "5"})  # fmt: skip
        return json_response({"status": "ok"}, 200, headers)
