"""bnc27's audit of tracking (session 27).

- An open or a click of a message in neither the spool ([spool]
  final_retention_days after it was final: a tenant's transactional mail
  soonest) nor the per-message event index ([analytics] events_days) is
  recorded with its link's tenant (authenticated: inside the encrypted token)
  and no campaign. GET /v1/events (the tenant's campaigns' events) never
  exported it: the tenant could not find its own click. A tenant's export with
  no ``campaign`` asked for now holds its events of no campaign; another
  tenant's export and a campaign filter do not.

Real parts: ``fastsend serve`` (SQLite spool, and a real redis-server's
shared spool), links signed with its tracking secret, the HTTP API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from tests._serve_helpers import Served, until

from fastsend.message import tracking as tr

SECRET = "bnc27-tracking-secret-0123456789abcdef"


@pytest.fixture(params=["sqlite", "redis"])
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    url = ""
    if request.param == "redis":
        url = str(request.getfixturevalue("redis_server").url(node="n1",
                                                              dir=str(tmp_path / "spool")))  # fmt: skip
    s = Served(tmp_path, None, spool_url=url, extra=f'[tracking]\nsecret = "{SECRET}"\n',
               serve_args=("--allow-volatile",) if url else ())  # fmt: skip
    try:
        yield s
    finally:
        s.stop()


def _get(s: Served, path: str, tenant: str | None = None) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        h = {"Authorization": f"Bearer {s.keys[tenant]}"} if tenant else {}
        async with aiohttp.ClientSession() as c, c.get(s.base + path, headers=h,
                                                        allow_redirects=False) as r:  # fmt: skip
            return r.status, await r.read()

    return asyncio.run(go())


def _clicks(s: Served, tenant: str, query: str = "") -> list[dict[str, Any]]:
    st, body = _get(s, f"/v1/events?from=-1h&type=clicked{query}", tenant)
    assert st == 200, body
    return [orjson.loads(x) for x in body.splitlines() if x]


def test_a_click_of_a_message_gone_everywhere_is_in_its_tenants_export(served: Served) -> None:
    gone = "987654"  # (no such message in the spool nor in the index)
    acme = tr.sign(SECRET.encode(), tr.CLICK, gone, "ann@example.org", "https://example.com/a",
                   tenant="acme")  # fmt: skip
    evil = tr.sign(SECRET.encode(), tr.CLICK, "987655", "bob@example.org",
                   "https://example.com/b", tenant="evil")  # fmt: skip
    for token in (acme, evil):
        st, _ = _get(served, f"/t/c/{token}")
        assert st == 302
    got = until("acme's click exported", lambda: _clicks(served, "acme"), timeout=60)
    assert [(e["id"], e["tenant"], e["campaign"]) for e in got] == [(987654, "acme", None)]
    theirs = until("evil's click exported", lambda: _clicks(served, "evil"), timeout=60)
    assert [(e["id"], e["tenant"]) for e in theirs] == [(987655, "evil")]
    # A campaign asked for: that campaign's events only.
    assert _clicks(served, "acme", "&campaign=1,2,3") == []
