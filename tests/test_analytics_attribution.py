"""Opens, clicks, complaints and later bounces keep the source IP and provider of the
delivery they are about, whichever process records them.

The rollups took those from the deliveries they remembered in memory: after a restart
(a deploy), on another node of a shared spool than the one that sent the message, or
past ``remember_messages`` deliveries, every such event was counted under source IP ""
and the provider of the recipient's domain (a Google Workspace domain became "other").
The per-IP complaint rate, the IP page and the engagement-aware warm-up (which reads
each IP's complaints) missed them. They are now looked up in serve's event index.

Real parts: serve's context and API application (its event index: SQLite, or the
shared Redis one on a real redis-server) on one spool, stopped and opened again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fastsend.analytics.query import StatsQuery, run_query
from fastsend.config import from_dict
from fastsend.serve.api import API_KEY
from fastsend.serve.app import make_app
from fastsend.serve.context import open_context

HUMAN = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15"


def _serve(tmp: Path, url: str) -> tuple[Any, Any]:
    spool: dict[str, str] = {"dir": str(tmp / "spool")}
    if url:
        spool["url"] = url
    cfg = from_dict({"spool": spool, "api": {"listen": "127.0.0.1:0"}})
    ctx = open_context(cfg)
    return ctx, make_app(ctx, cfg.api)


def _stop(ctx: Any, app: Any) -> None:
    app[API_KEY].close()
    ctx.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_engagement_after_a_restart_keeps_its_deliverys_ip_and_provider(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = ""
    if backend == "redis":
        url = str(request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path)))
    now = time.time()
    ctx, app = _serve(tmp_path, url)
    for i in range(1, 6):  # a Google Workspace domain: Google by its MX only
        ctx.emit({"time": now - 300, "event": "delivered", "id": i, "campaign": 1,
                  "rcpt": f"u{i}@corp.example", "mx": "aspmx.l.google.com",
                  "source_ip": "127.0.0.2", "code": 250})  # fmt: skip
    _stop(ctx, app)

    ctx, app = _serve(tmp_path, url)  # serve restarted
    try:
        eng = {"time": now, "campaign": 1}
        ctx.emit({**eng, "event": "opened", "id": 1, "rcpt": "u1@corp.example",
                  "user_agent": HUMAN})  # fmt: skip
        ctx.emit({**eng, "event": "complained", "id": 2, "rcpt": "u2@corp.example"})
        ctx.emit({**eng, "event": "unsubscribed", "id": 3, "rcpt": "u3@corp.example"})
        ctx.emit({**eng, "event": "bounced", "id": 4, "rcpt": "u4@corp.example",
                  "reason": "mailbox-full", "hard": False})  # a DSN after the 250  # fmt: skip
        ctx.rollups.flush(final=True)
        q = StatsQuery("default", int(now) - 3600, int(now) + 120, "total",
                       ["source_ip", "provider"], {})  # fmt: skip
        groups = {(g["key"]["source_ip"], g["key"]["provider"]): g["counts"]
                  for g in run_query(ctx.rollups.store, q)["groups"].values()}  # fmt: skip
        assert list(groups) == [("127.0.0.2", "google")], groups
        got = groups[("127.0.0.2", "google")]
        assert got["delivered"] == 5
        assert (got["opens"], got["opens_unique"], got["complaints"]) == (1, 1, 1)
        assert (got["unsubscribes"], got["bounced"]) == (1, 1)
    finally:
        _stop(ctx, app)
