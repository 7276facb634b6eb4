"""Provider reputation feeds against local HTTP servers speaking the documented formats:
Google Postmaster Tools API v2 (domainStats:query, complianceStatus) and Microsoft SNDS
(automated data access CSV)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from fastsend.analytics.feeds import Feeds, FeedSettings, grade, parse_snds
from fastsend.config import ConfigError, from_dict
from fastsend.testing.http import app_on_loopback

TOKEN = "ya29.test-access-token"
SNDS_KEY = "0123abcd-snds-key"
SNDS_CSV = (
    "127.0.0.2,12/3/2026 12:00 AM,12/3/2026 11:59 PM,1200,1180,1500,GREEN,< 0.1%,,,0,"
    "out1.example.com,news@example.com,\r\n"
    "127.0.0.3,12/3/2026 12:00 AM,12/3/2026 11:59 PM,900,880,950,RED,1.4%,"
    "12/3/2026 3:00 AM,12/3/2026 4:00 AM,3,out2.example.com,news@example.com,\r\n"
    "127.0.0.4,12/3/2026 12:00 AM,12/3/2026 11:59 PM,90,88,95,YELLOW,0.3%,,,0,x,y,\r\n"
)


@contextlib.asynccontextmanager
async def provider_apis(spam_rate: float, needs_work: bool) -> AsyncIterator[tuple[str, list]]:
    seen: list[Any] = []

    async def stats(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": 401, "status": "UNAUTHENTICATED"}},
                                     status=401)  # fmt: skip
        body = await request.json()
        seen.append(("stats", request.match_info["domain"], body))
        names = {d["name"]: d["baseMetric"]["standardMetric"] for d in body["metricDefinitions"]}
        assert names["spam_rate"] == "SPAM_RATE" and body["aggregationGranularity"] == "DAILY"
        dom = request.match_info["domain"]
        return web.json_response({"domainStats": [
            {"name": f"domains/{dom}/domainStats/a1", "metric": "spam_rate",
             "value": {"doubleValue": spam_rate}, "date": {"year": 2026, "month": 12, "day": 3}},
            {"name": f"domains/{dom}/domainStats/a2", "metric": "auth_success_rate",
             "value": {"doubleValue": 0.998}, "date": {"year": 2026, "month": 12, "day": 3}},
        ]})  # fmt: skip

    async def compliance(request: web.Request) -> web.Response:
        dom = request.match_info["domain"]
        seen.append(("compliance", dom))
        rows = [{"requirement": "SPF", "status": {"status": "COMPLIANT"}},
                {"requirement": "DMARC_POLICY", "status": {"status": "COMPLIANT"}},
                {"requirement": "USER_REPORTED_SPAM_RATE",
                 "status": {"status": "NEEDS_WORK" if needs_work else "COMPLIANT"}}]  # fmt: skip
        return web.json_response({"name": f"domains/{dom}/complianceStatus",
                                  "complianceData": {"domainId": dom, "rowData": rows}})  # fmt: skip

    async def snds(request: web.Request) -> web.Response:
        if request.query.get("key") != SNDS_KEY:
            return web.Response(status=403, text="bad key")
        seen.append(("snds",))
        return web.Response(text=SNDS_CSV, content_type="text/csv")

    app = web.Application()
    app.router.add_post("/v2/domains/{domain}/domainStats:query", stats)
    app.router.add_get("/v2/domains/{domain}/complianceStatus", compliance)
    app.router.add_get("/snds/data.aspx", snds)
    async with app_on_loopback(app) as base:
        yield base, seen


def settings(tmp: Path, base: str, token: str = TOKEN, key: str = SNDS_KEY) -> FeedSettings:
    (tmp / "pm.token").write_text(token + "\n")
    (tmp / "snds.key").write_text(key + "\n")
    cfg = from_dict({"reputation": {"feeds": {
        "postmaster": {"url": base, "token_file": str(tmp / "pm.token"),
                       "domains": ["Example.com"], "every": 3600},
        "snds": {"url": f"{base}/snds/data.aspx", "key_file": str(tmp / "snds.key")},
    }}})  # fmt: skip
    return FeedSettings.from_config(cfg)


def test_feeds_import_grade_gauge_and_rest(tmp_path: Path) -> None:
    gauges: dict[str, float] = {}
    events: list[dict[str, Any]] = []
    rests: list[tuple[Any, ...]] = []

    async def main() -> None:
        async with provider_apis(0.0042, needs_work=True) as (base, seen), \
                aiohttp.ClientSession() as http:  # fmt: skip
            f = Feeds(settings(tmp_path, base), lambda t, n, v: gauges.__setitem__(n, v),
                      events.append, lambda *a: rests.append(a))  # fmt: skip
            await f.postmaster_once(http)
            await f.snds_once(http)
            assert [s[0] for s in seen] == ["stats", "compliance", "snds"]
            assert seen[0][1] == "example.com"
        rep = f.domains["example.com"]
        assert rep.spam_rate == 0.0042 and rep.grade == "bad"
        assert rep.compliance["USER_REPORTED_SPAM_RATE"] == "NEEDS_WORK"
        assert gauges["postmaster_spam_rate:example.com"] == 0.0042
        assert gauges["snds_filter:127.0.0.3"] == 2 and gauges["snds_trap_hits:127.0.0.3"] == 3
        assert gauges["snds_complaint_rate:127.0.0.3"] == pytest.approx(0.014)
        assert [(r[0], r[1]) for r in rests] == [("127.0.0.3", ["outlook"])]
        assert f.verdict("127.0.0.2", "outlook") == "good"
        assert f.verdict("127.0.0.3", "outlook") == "bad"
        assert f.verdict("127.0.0.4", "outlook") == "hold"
        assert f.verdict("127.0.0.2", "google") == "bad"
        assert f.verdict("127.0.0.2", "yahoo") == ""
        kinds = [(e["event"], e["feed"]) for e in events]
        assert kinds.count(("reputation_feed", "snds")) == 3
        assert ("reputation_feed", "postmaster") in kinds
        assert not any(TOKEN in orjson.dumps(e).decode() or SNDS_KEY in orjson.dumps(e).decode()
                       for e in events)  # fmt: skip

    asyncio.run(main())


def test_feed_failures_are_events_not_crashes(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []

    async def main() -> None:
        async with provider_apis(0.0005, needs_work=False) as (base, _seen), \
                aiohttp.ClientSession() as http:  # fmt: skip
            f = Feeds(settings(tmp_path, base, token="wrong", key="wrong"),
                      lambda *a: None, events.append)  # fmt: skip
            await f.postmaster_once(http)
            await f.snds_once(http)
            assert not f.domains and not f.ips
            good = Feeds(settings(tmp_path, base), lambda *a: None, events.append)
            await good.postmaster_once(http)
            assert good.domains["example.com"].grade == "good"

    asyncio.run(main())
    failed = [e for e in events if e["event"] == "reputation_feed_failed"]
    assert {e["feed"] for e in failed} == {"postmaster", "snds"}
    assert any("HTTP 401" in e["error"] for e in failed)
    assert any("HTTP 403" in e["error"] for e in failed)


def test_grades_and_csv_edges() -> None:
    assert grade(0.0005, {}) == "good" and grade(0.0015, {}) == "low"
    assert grade(0.003, {}) == "bad" and grade(None, {}) == "unknown"
    assert grade(0.0, {"SPF": "NEEDS_WORK"}) == "bad"
    rows = parse_snds("IP Address,Activity Start\r\n" + SNDS_CSV + "garbage\r\n")
    assert [r.ip for r in rows] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert rows[0].complaint_rate == pytest.approx(0.001) and rows[0].recipients == 1500
    for raw, msg in (({"postmaster": {"url": "ftp://x", "token_file": "t", "domains": ["a"]}},
                      "url"),
                     ({"postmaster": {"token_file": "t", "domains": []}}, "domains"),
                     ({"snds": {"key_file": "k", "every": 5}}, "every"),
                     ({"other": {}}, r'\[reputation.feeds\] unknown key "other"')):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            FeedSettings.from_config(from_dict({"reputation": {"feeds": raw}}))
