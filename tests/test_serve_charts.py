"""Issue 14 in a real ``fastsend serve``: GET /v1/stats over the rollups, and the dashboard's
charts, campaign page and IP page in a real headless Chromium.

One server per module (one worker, source IPs 127.0.0.2 and .3 in a pool, .2 warming up),
routed to a SinkThread; mail goes in through the API, opens and clicks through the
tracking routes (a person's browser, Apple's MPP proxy, a link scanner's HEAD). Each page
is screenshotted (into $FASTSEND_ARTIFACTS when set), the console must stay clean, and a
live update (more mail while the page is open) must show without a reload.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from conftest import ServeProcess, free_port
from fastsend.message import tracking as tr
from fastsend.serve.auth import KeyStore
from fastsend.sink import SinkThread
from fastsend.testing.dnsserver import DNSServer
from test_serve_browser import Browser, chromium, chromium_path, only_loopback
from test_serve_dashboard import dom_until, log_in, req, text_of, until

SECRET = "charts-test-secret-0123456789abcdef"
TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
MSG = {"from": "news@example.com", "subject": "s", "text": "t"}
HUMAN = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120 Safari/537.36"


class Served:
    def __init__(self, tmp: Path, sink: SinkThread, dns: DNSServer) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.intake = free_port()
        cfg = tmp / "fastsend.toml"
        cfg.write_text(
            f'[spool]\ndir = "spool"\n[workers]\ncount = 1\n'
            f'[routes]\n"*" = "{sink.host}:{sink.port}"\n'
            f'[delivery]\ntls = "off"\nidle_timeout = 1.0\n'
            f'[api]\nlisten = "127.0.0.1:{self.port}"\nrate_limit = 1000\n'
            f'[tracking]\nsecret = "{SECRET}"\n'
            f'[dashboard]\nadmin_tenants = ["ops"]\n'
            f'[pools]\ndefault = "main"\n[pools.warmup]\nschedule = [50, 100, 500, 1000]\n'
            f'[pools.main]\nips = [{{ ip = "127.0.0.2", warmup_day = 3 }}, "127.0.0.3"]\n'
            f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 3\n'
            f'[reputation]\nblocklists = [{{ zone = "bl.test", providers = ["google"] }}]\n'
            f'[intake]\nlisten = "127.0.0.1:{self.intake}"\nverp_domain = "bounces.example.com"\n'
        )
        store = KeyStore.for_spool(str(tmp / "spool"))
        self.keys = {t: store.create(t)[0] for t in ("acme", "beta", "ops")}
        store.close()
        self.serve = ServeProcess(cfg, self.port)
        self.base = self.serve.base

    def stop(self) -> None:
        self.serve.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    zones = {"2.0.0.127.bl.test": [("A", "127.0.0.2"), ("TXT", "listed for testing")]}
    with SinkThread(fault_text={"permfail": (550, "5.1.1", "no such user")}) as sink, \
            DNSServer(zones) as dns:  # fmt: skip
        s = Served(tmp_path_factory.mktemp("charts"), sink, dns)
        try:
            yield s
        finally:
            s.stop()


async def hit(s: Served, method: str, token_path: str, ua: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, s.base + token_path, headers={"User-Agent": ua}, allow_redirects=False
        ) as r,
    ):
        assert r.status in (200, 302), r.status


async def stats(s: Served, key: str, query: str) -> dict[str, Any]:
    st, body, _ = await req(s, "GET", "/v1/stats?" + query, key=key)
    assert st == 200, body
    return body


async def send_and_engage(s: Served, key: str, n: int, prefix: str) -> list[int]:
    """n messages (one bounces), each opened by a person, by Apple MPP and HEAD-checked."""
    to = [f"{prefix}{i}@gmail.com" for i in range(n - 1)] + [f"permfail-{prefix}@yahoo.com"]
    st, body, _ = await req(s, "POST", "/v1/messages", {**MSG, "to": to}, key=key)
    assert st == 202, body
    ids = body["messages"][0]["ids"]
    return ids


async def engage(s: Served, ids: list[int], rcpts: list[str], tenant: str) -> None:
    sec = SECRET.encode()
    for mid, rcpt in zip(ids, rcpts, strict=True):
        o = tr.sign(sec, tr.OPEN, str(mid), rcpt, tenant=tenant)
        await hit(s, "GET", f"/t/o/{o}.gif", HUMAN)
        await hit(s, "GET", f"/t/o/{o}.gif", "Mozilla/5.0")  # Apple MPP's proxy
        c = tr.sign(sec, tr.CLICK, str(mid), rcpt, "https://example.com/offer", tenant=tenant)
        await hit(s, "HEAD", f"/t/c/{c}", "Mozilla/5.0")  # a link checker
    c = tr.sign(sec, tr.CLICK, str(ids[0]), rcpts[0], "https://example.com/offer", tenant=tenant)
    await hit(s, "GET", f"/t/c/{c}", HUMAN)


def test_stats_api_over_rollups(served: Served) -> None:
    s = served
    key = s.keys["beta"]

    async def main() -> None:
        to = [f"b{i}@gmail.com" for i in range(4)] + ["permfail-b@yahoo.com"]
        st, body, _ = await req(s, "POST", "/v1/messages", {**MSG, "to": to}, key=key)
        assert st == 202
        ids = body["messages"][0]["ids"]

        async def delivered() -> Any:
            got = await stats(s, key, "dims=&granularity=total")
            c = got["totals"]["counts"]
            return c["delivered"] == 4 and c["bounced"] == 1 and got

        got = await until("beta's mail delivered", delivered, 30)
        assert got["totals"]["counts"]["accepted"] == 5
        assert got["totals"]["rates"]["delivery_rate"] == 0.8
        assert got["lines"]["complaint_rate"] == {"target": 0.001, "max": 0.003}
        await engage(s, ids[:2], to[:2], "beta")

        async def engaged() -> Any:
            got = await stats(s, key, "dims=provider&granularity=minute&from=-10m")
            c = got["totals"]["counts"]
            return (
                c["opens"] + c["opens_machine"] == 4
                and c["clicks"] + c["clicks_machine"] == 3
                and got
            )

        got = await until("opens and clicks counted", engaged, 15)
        c = got["totals"]["counts"]
        # Apple MPP's two prefetches and the two HEAD checks are machine; the person's opens
        # and click are too when they came within seconds of the delivery (this test is
        # fast), so only the machine side is certain.
        assert c["opens_machine_unique"] == 2 and c["opens_machine"] >= 2
        assert c["clicks_machine"] >= 2 and c["clicks_machine_unique"] == 2
        assert set(got["groups"]) == {"google", "yahoo"}
        assert got["groups"]["yahoo"]["counts"]["bounced"] == 1
        assert sum(got["series"]["delivered"]) == 4 and got["step"] == 60
        assert got["reasons"]["bounced"] == {"userunknown": 1}
        # Filters and dimensions.
        ip = await stats(s, key, "dims=source_ip&provider=google&granularity=total")
        assert {g["key"]["source_ip"] for g in ip["groups"].values()} <= {"127.0.0.2",
                                                                         "127.0.0.3", ""}  # fmt: skip
        assert sum(g["counts"].get("delivered", 0) for g in ip["groups"].values()) == 4
        # Another tenant sees none of it; node-wide figures are for admins only.
        other = await stats(s, s.keys["acme"], "dims=&granularity=total&from=-1h")
        assert other["totals"]["counts"]["delivered"] == 0 or other["tenant"] == "acme"
        st, err, _ = await req(s, "GET", "/v1/stats?scope=node", key=key)
        assert st == 403
        node = await stats(s, s.keys["ops"], "scope=node&dims=source_ip&granularity=total")
        assert sum(g["counts"].get("delivered", 0) for g in node["groups"].values()) >= 4
        for q, field in (("granularity=week", "granularity"), ("from=soon", "from"),
                         ("dims=rcpt", "dims"), ("campaign=x", "campaign"),
                         ("from=-30d&granularity=minute", "granularity"), ("limit=0", "limit"),
                         ("window=2d", "window"), ("by=rcpt", "by"),
                         # a misspelt filter answered the tenant's totals as if it applied
                         ("campaign_id=1", "campaign_id"),
                         ("by=domain&window=1h&campaign=1", "campaign")):  # fmt: skip
            st, err, _ = await req(s, "GET", "/v1/stats?" + q, key=key)
            assert st == 400 and err["error"]["field"] == field, (q, err)
        st, doc, _ = await req(s, "GET", "/v1/openapi.json")
        params = {p["name"] for p in doc["paths"]["/v1/stats"]["get"]["parameters"]}
        assert {"from", "to", "granularity", "dims", "campaign", "provider", "source_ip"} <= params
        assert "StatsAnswer" in doc["components"]["schemas"]
        # The IP answer: warm-up of .2 (day 3: cap 500), only for tenants of its pool.
        st, info, _ = await req(s, "GET", "/v1/dashboard/ip/127.0.0.2", key=key)
        assert st == 200, info
        assert info["warmup"] == {"warming": True, "day": 3, "days": 4, "cap": 500}
        assert info["pool"] == "main"
        st, _, _ = await req(s, "GET", "/v1/dashboard/ip/10.9.9.9", key=key)
        assert st == 404
        # The blocklist check at start: .2 is listed on bl.test (the loopback DNS server).
        bl = {b["zone"]: b for b in info["blocklists"]}
        assert bl["bl.test"]["listed"] is True and bl["bl.test"]["codes"] == ["127.0.0.2"]
        st, info3, _ = await req(s, "GET", "/v1/dashboard/ip/127.0.0.3", key=key)
        assert [b["listed"] for b in info3["blocklists"]] == [False]
        log = (s.tmp / "spool" / "events.jsonl").read_text()
        assert '"event":"ip_listed"' in log and '"providers":["google"]' in log

    asyncio.run(main())


async def screenshot(b: Browser, name: str, tmp: Path) -> Path:
    await b.send("Emulation.setDeviceMetricsOverride", width=1280, height=1000,
                 deviceScaleFactor=1, mobile=False)  # fmt: skip
    await asyncio.sleep(0.5)
    png = await b.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    out = Path(os.environ.get("FASTSEND_ARTIFACTS") or tmp) / f"dashboard-{name}.png"
    data = base64.b64decode(png["data"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    out.write_bytes(data)
    return out


def problems(b: Browser) -> list[Any]:
    return [p for m, p in b.events if m == "Runtime.exceptionThrown"
            or (m == "Runtime.consoleAPICalled" and p.get("type") == "error")
            or (m == "Log.entryAdded" and p["entry"].get("level") == "error")]  # fmt: skip


def test_charts_campaign_and_ip_pages_in_chromium(served: Served) -> None:
    chromium_path()
    s = served
    key = s.keys["acme"]

    async def main() -> None:
        to = [f"a{i}@gmail.com" for i in range(5)] + ["permfail-a@yahoo.com"]
        st, body, _ = await req(s, "POST", "/v1/messages", {**MSG, "to": to}, key=key)
        assert st == 202
        st, camp, _ = await req(s, "POST", "/v1/campaigns", {
            "name": "spring", "template": TPL,
            "recipients": [{"email": f"c{i}@yahoo.com", "name": "C"} for i in range(4)],
        }, key=key)  # fmt: skip
        assert st == 201, camp
        cid = camp["id"]

        async def done() -> Any:
            c = (await stats(s, key, "dims=&granularity=total"))["totals"]["counts"]
            return c["delivered"] == 9 and c["bounced"] == 1

        await until("acme's mail delivered", done, 30)
        await engage(s, body["messages"][0]["ids"][:3], to[:3], "acme")
        async with chromium() as b:
            await b.send("Runtime.enable")
            await b.send("Log.enable")
            await b.goto(s.base + "/dashboard")
            await log_in(b, key)
            await dom_until(b, "#who", "tenant acme")
            await dom_until(b, "#t-delivered", "9", timeout=60)
            await dom_until(b, "#t-bounced", "1")
            assert await text_of(b, "#t-delivery_rate") == "90.00%"
            assert int(await b.js("document.getElementById('ch-throughput').dataset.points")) > 0
            # The rates table fills from its own request: wait for it, not one read.
            await until("the provider rows", lambda: _has(b, "#tbl-provider", "google"))
            assert "yahoo" in await text_of(b, "#tbl-provider")
            await until("the campaign's row",
                        lambda: _has(b, "#tbl-campaign", f"#{cid} spring"))  # fmt: skip
            main_png = await screenshot(b, "main", s.tmp)

            # Live: more mail while the page is open shows without a reload.
            before = int(await b.js("document.body.dataset.chartUpdates"))
            st, _, _ = await req(s, "POST", "/v1/messages",
                                 {**MSG, "to": ["late1@gmail.com", "late2@gmail.com"]},
                                 key=key)  # fmt: skip
            assert st == 202
            await dom_until(b, "#t-delivered", "11", timeout=30)
            await until("another chart refresh", lambda: _updates_over(b, before))

            # The campaign page (reached by its link in the rates table).
            await b.goto(f"{s.base}/dashboard/campaign/{cid}")
            await dom_until(b, "#c-name", f"spring (#{cid})")
            await dom_until(b, "#c-status", "active")
            await dom_until(b, "#t-delivered", "4", timeout=60)
            camp_png = await screenshot(b, "campaign", s.tmp)

            # The IP page: warm-up progress, rests, blocklists.
            await b.goto(f"{s.base}/dashboard/ip/127.0.0.2")
            await until("the warm-up line",
                        lambda: _has(b, "#ip-warmup", "day 3 of 4"))  # fmt: skip
            await dom_until(b, "#ip-pool", "main")
            assert "cap 500" in await text_of(b, "#ip-warmup")
            assert "LISTED" in await text_of(b, "#ip-blocklists")

            # DMARC aggregate reports, mailed to the intake, on an admin's dashboard.
            from test_dmarc import mail, report, zipped

            raw = mail(zipped("google.com!example.com.xml", report()), "g.zip", "application/zip")
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=s.intake, start_tls=False)
            await smtp.connect()
            errors, _reply = await smtp.sendmail("", ["dmarc@bounces.example.com"], raw)
            await smtp.quit()
            assert errors == {}
            await b.goto(s.base + "/dashboard")
            await b.js("sessionStorage.clear()")
            await b.goto(s.base + "/dashboard")
            await log_in(b, s.keys["ops"])
            await dom_until(b, "#who", "tenant ops")
            await until("the unaligned source", lambda: _has(b, "#tbl-dmarc", "203.0.113.9"))
            assert "7 messages failed DMARC alignment" in await text_of(b, "#dmarc-note")
            # The admin's queue-age chart reads the node-wide gauges (sampled at start).
            await until("the queue age drawn", lambda: _points(b, "ch-age"))
            dmarc_png = await screenshot(b, "dmarc-admin", s.tmp)
            ip_png = await screenshot(b, "ip", s.tmp)

            only_loopback(b.requests())
            assert problems(b) == []
            for p in (main_png, camp_png, ip_png, dmarc_png):
                assert p.stat().st_size > 10_000
            print("screenshots:", main_png, camp_png, ip_png, dmarc_png)

    asyncio.run(main())


async def _has(b: Browser, selector: str, text: str) -> bool:
    return text in await text_of(b, selector)


async def _updates_over(b: Browser, n: int) -> bool:
    return int(await b.js("document.body.dataset.chartUpdates || '0'")) > n


async def _points(b: Browser, canvas: str) -> bool:
    return int(await b.js(f"document.getElementById('{canvas}').dataset.points || '0'")) > 0
