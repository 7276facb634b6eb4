"""The live dashboard of ``fastsend serve``: its JSON endpoints and the page in a real Chromium.

One real ``fastsend serve`` (one worker) per module, routed to a SinkThread
whose permanent-failure reply carries a ``<script>`` tag; keys for four
tenants are made in the key store before it starts (``ops`` is named in
``[dashboard] admin_tenants``). The browser is the headless Chromium of
test_serve_browser.py, driven over the DevTools protocol; the test waits on
DOM content (with a deadline), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import ServeProcess, free_port
from fastsend.serve.auth import KeyStore
from fastsend.serve.dashboard import CSP
from fastsend.sink import SinkThread
from test_serve_browser import Browser, chromium, chromium_path, only_loopback

EVIL = "<script>window.pwned=1</script> no such user"
EVIL_NAME = '<img src=x onerror="window.pwned=2">spring'
TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
MSG = {"from": "news@example.com", "subject": "s", "text": "t"}


class Served:
    def __init__(self, tmp: Path, sink: SinkThread) -> None:
        self.port = free_port()
        cfg = tmp / "fastsend.toml"
        cfg.write_text(
            f'[spool]\ndir = "spool"\n[workers]\ncount = 1\n'
            f'[routes]\n"*" = "{sink.host}:{sink.port}"\n'
            f'[delivery]\ntls = "off"\nidle_timeout = 1.0\n'
            f'[api]\nlisten = "127.0.0.1:{self.port}"\n'
            f'[dashboard]\nadmin_tenants = ["ops"]\n'
        )
        store = KeyStore.for_spool(str(tmp / "spool"))
        self.keys = {t: store.create(t)[0] for t in ("acme", "beta", "ops", "web")}
        store.close()
        self.serve = ServeProcess(cfg, self.port)
        self.base = self.serve.base

    def stop(self) -> None:
        self.serve.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with SinkThread(fault_text={"permfail": (550, "5.1.1", EVIL)}) as sink:
        s = Served(tmp_path_factory.mktemp("dashboard"), sink)
        try:
            yield s
        finally:
            s.stop()


async def req(
    s: Served, method: str, path: str, body: Any = None, *, key: str | None = None,
    header: str = "Authorization",
) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, s.base + path, json=body, headers=headers) as r,
    ):
        raw = await r.read()
        data = orjson.loads(raw) if "json" in r.content_type else raw.decode()
        return r.status, data, dict(r.headers)


async def until(what: str, fn: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last: {got!r})")
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------ JSON endpoints
def test_endpoints_need_a_key_and_scope_to_the_tenant(served: Served) -> None:
    s = served
    acme, beta, ops = s.keys["acme"], s.keys["beta"], s.keys["ops"]

    async def main() -> None:
        for path in ("/v1/dashboard", "/v1/dashboard/workers"):
            st, body, _ = await req(s, "GET", path)
            assert st == 401 and body["error"]["status"] == 401, body
            for bad in ("nope", "fs_aaaaaaaa_" + "A" * 43, acme[:-1] + "x"):
                st, body, _ = await req(s, "GET", path, key=bad)
                assert st == 401, (bad, body)
        st, body, _ = await req(s, "GET", "/v1/dashboard/workers", key=acme)
        assert st == 403 and "admin_tenants" in body["error"]["message"], body

        st, body, _ = await req(s, "POST", "/v1/messages",
                                {**MSG, "to": ["scope@example.org", "scope2@example.net"]},
                                key=acme)  # fmt: skip
        assert st == 202, body

        async def delivered() -> Any:
            st, d, h = await req(s, "GET", "/v1/dashboard", key=acme)
            assert st == 200 and h["Cache-Control"] == "no-store", d
            return d if d["states"]["delivered"] == 2 and d["series"]["delivered"] else None

        d = await until("acme's 2 delivered", delivered)
        assert d["tenant"] == "acme" and d["admin"] is False and d["queue_depth"] == 0
        assert len(d["series"]["delivered"]) == 300 and sum(d["series"]["delivered"]) == 2
        assert {r["domain"] for r in d["domains"]} == {"example.org", "example.net"}
        assert sum(r["delivered"] for r in d["source_ips"]) == 2
        assert [c["name"] for c in d["campaigns"]] == ["transactional:acme"]
        assert d["campaigns"][0]["progress"] == 1.0
        rcpts = [e.get("rcpt") for e in d["events"] if e["event"] == "delivered"]
        assert sorted(rcpts) == ["scope2@example.net", "scope@example.org"]
        # The X-API-Key header works too.
        st, d2, _ = await req(s, "GET", "/v1/dashboard", key=acme, header="X-API-Key")
        assert st == 200 and d2["tenant"] == "acme"

        # Another tenant sees none of it.
        st, b, _ = await req(s, "GET", "/v1/dashboard", key=beta)
        assert st == 200 and b["tenant"] == "beta" and b["campaigns"] == []
        assert sum(b["states"].values()) == 0 and b["events"] == [] and b["domains"] == []
        assert sum(b["series"]["delivered"]) == 0 and b["source_ips"] == []

        # The admin tenant sees the workers and every tenant's source IPs.
        async def workers() -> Any:
            st, w, _ = await req(s, "GET", "/v1/dashboard/workers", key=ops)
            assert st == 200, w
            # counters come with the worker's periodic stats: wait for the first report
            # after the deliveries rather than read one snapshot
            ok = w["workers"] and w["workers"][0]["alive"]
            return w if ok and w["workers"][0]["connections_opened"] >= 1 else None

        w = await until("worker alive, its connections reported", workers)
        assert w["workers"][0]["restarts"] == 0 and w["workers"][0]["connections_opened"] >= 1
        assert w["supervisor"]["delivered"] >= 2
        assert sum(r["delivered"] for r in w["source_ips"]) >= 2
        st, o, _ = await req(s, "GET", "/v1/dashboard", key=ops)
        assert st == 200 and o["admin"] is True and o["campaigns"] == []

    asyncio.run(main())


def test_page_and_assets_are_self_contained(served: Served) -> None:
    async def main() -> None:
        texts = {}
        for path, ctype in (("/dashboard", "text/html"), ("/dashboard/app.js", "text/javascript"),
                            ("/dashboard/app.css", "text/css"),
                            ("/dashboard/common.js", "text/javascript"),
                            ("/dashboard/charts.js", "text/javascript")):  # fmt: skip
            st, text, h = await req(served, "GET", path)
            assert st == 200
            assert h["Content-Type"] == f"{ctype}; charset=utf-8"
            assert h["Content-Security-Policy"] == CSP
            assert h["X-Content-Type-Options"] == "nosniff"
            assert h["Cache-Control"].startswith("no-store")
            assert not re.search(r"https?://|//[a-z]", text.replace("'self'", "")), path
            texts[path] = text
        html = texts["/dashboard"]
        for csp_part in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                         "connect-src 'self'", "img-src 'self' data:", "form-action 'self'",
                         "frame-ancestors 'none'"):  # fmt: skip
            assert csp_part in CSP
        # No inline script, style or handler for the CSP to block.
        assert re.findall(r"<script\b[^>]*>", html) == [
            '<script src="/dashboard/common.js" defer>',
            '<script src="/dashboard/app.js" defer>',
            '<script src="/dashboard/charts.js" defer>',
        ]
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html)
        for js in (texts["/dashboard/app.js"], texts["/dashboard/charts.js"],
                   texts["/dashboard/common.js"]):  # fmt: skip
            assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write|eval\(",
                                 js)  # fmt: skip
        assert 'name="' not in html.split('<form id="login"')[1].split("</form>")[0]

    asyncio.run(main())


# ------------------------------------------------------------------ the page in Chromium
async def press(b: Browser, selector: str) -> None:
    """A real mouse click on an element (no navigation expected)."""
    sel = orjson.dumps(selector).decode()
    box = await b.js(
        f"(() => {{ const e = document.querySelector({sel}); e.scrollIntoView({{block: 'center'}});"
        " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        await b.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                     button="left", clickCount=1)  # fmt: skip


async def text_of(b: Browser, selector: str) -> str:
    sel = orjson.dumps(selector).decode()
    return str(await b.js(f"(document.querySelector({sel}) || {{}}).textContent || ''"))


async def dom_until(b: Browser, selector: str, want: str, timeout: float = 60.0) -> None:
    async def check() -> Any:
        return (await text_of(b, selector)) == want

    try:
        await until(f"{selector} == {want!r}", check, timeout)
    except TimeoutError:
        raise TimeoutError(f"{selector}: {await text_of(b, selector)!r}, not {want!r}") from None


async def log_in(b: Browser, key: str) -> None:
    await b.js("document.getElementById('key').focus()")
    await b.send("Input.insertText", text=key)
    await press(b, "#login-go")


def test_dashboard_in_chromium(served: Served) -> None:
    chromium_path()
    s = served
    key = s.keys["web"]

    async def main() -> None:
        async with chromium() as b:
            await b.send("Runtime.enable")
            await b.send("Log.enable")
            await b.goto(s.base + "/dashboard")
            assert await b.js("document.compatMode") == "CSS1Compat"
            assert await b.js("document.getElementById('app').hidden") is True

            # A wrong key: refused, nothing stored.
            await log_in(b, "fs_aaaaaaaa_" + "B" * 43)
            await dom_until(b, "#login-error", "That key was not accepted (401).")
            assert await b.js("sessionStorage.length") == 0

            await log_in(b, key)
            await dom_until(b, "#who", "tenant web")
            assert await b.js("sessionStorage.getItem('fastsend.dashboard.key')") == key
            assert await b.js("document.getElementById('key').value") == ""
            assert "tenant" in await text_of(b, "#workers-note")  # not an admin: says so

            # Mail through the API: 3 delivered, 1 bounced with a <script> in the reply.
            to = ["a1@example.org", "a2@example.org", "a3@example.net", "permfail-x@example.org"]
            st, body, _ = await req(s, "POST", "/v1/messages", {**MSG, "to": to}, key=key)
            assert st == 202, body
            st, camp, _ = await req(s, "POST", "/v1/campaigns", {
                "name": EVIL_NAME, "template": TPL, "paused": True,
                "recipients": [{"email": "c1@example.org", "name": "C"},
                               {"email": "c2@example.org", "name": "D"}],
            }, key=key)  # fmt: skip
            assert st == 201, camp
            cid = camp["id"]
            await dom_until(b, "#st-delivered", "3")
            await dom_until(b, "#st-bounced", "1")
            await dom_until(b, "#sum-delivered", "3")
            await dom_until(b, "#queue-depth", "2")  # the paused campaign's
            await dom_until(b, f"#campaign-status-{cid}", "paused")
            name = await text_of(b, f"#campaign-{cid} td:nth-child(2)")
            assert name == EVIL_NAME
            await until("the bounce in recent events",
                        lambda: _contains(b, "#events", EVIL))  # fmt: skip
            events = await text_of(b, "#events")
            assert "permfail-x@example.org" in events and "550 5.1.1" in events
            assert await b.js("document.querySelectorAll('body script').length") == 0
            assert await b.js("document.querySelectorAll('img').length") == 0
            assert await b.js("typeof window.pwned") == "undefined"
            domains = await text_of(b, "#domains")
            assert "example.org" in domains and "example.net" in domains
            assert await b.js("document.querySelectorAll('#ips tbody tr').length") >= 1

            # Pause and resume from the page.
            await press(b, f"#resume-{cid}")
            await dom_until(b, f"#campaign-status-{cid}", "active")
            st, c, _ = await req(s, "GET", f"/v1/campaigns/{cid}", key=key)
            assert c["status"] == "active"
            await dom_until(b, "#st-delivered", "5")  # its two recipients went out
            await press(b, f"#pause-{cid}")
            await dom_until(b, f"#campaign-status-{cid}", "paused")
            st, c, _ = await req(s, "GET", f"/v1/campaigns/{cid}", key=key)
            assert c["status"] == "paused"

            shot = os.environ.get("FASTSEND_DASHBOARD_SCREENSHOT")
            if shot:
                await b.send("Emulation.setDeviceMetricsOverride", width=1200, height=900,
                             deviceScaleFactor=1, mobile=False)  # fmt: skip
                await asyncio.sleep(1.5)  # one more poll, to draw at this width (picture only)
                png = await b.send("Page.captureScreenshot", format="png",
                                   captureBeyondViewport=True)  # fmt: skip
                Path(shot).write_bytes(base64.b64decode(png["data"]))

            # A reload keeps the key (this tab's sessionStorage); "Forget key" drops it.
            await b.goto(s.base + "/dashboard")
            await dom_until(b, "#who", "tenant web")
            await press(b, "#logout")
            await dom_until(b, "#login-error", "Key forgotten.")
            assert await b.js("sessionStorage.length") == 0

            # The admin tenant's view: the worker table.
            await log_in(b, s.keys["ops"])
            await dom_until(b, "#who", "tenant ops")
            await until("worker 0 alive",
                        lambda: _contains(b, "#workers tbody tr:first-child", "yes"))  # fmt: skip
            assert await b.js("document.getElementById('workers').hidden") is False
            assert "All tenants" in await text_of(b, "#workers-note")
            assert "all tenants:" in await text_of(b, "#ips-note")

            # What the browser did: only this server, the key never in a URL.
            urls = b.requests()
            only_loopback(urls)
            assert not [u for u in urls if key in u or s.keys["ops"] in u]
            assert any(u == s.base + "/v1/dashboard" for u in urls)
            page = next(r for r in b.responses() if r["url"] == s.base + "/dashboard")
            h = {k.lower(): v for k, v in page["headers"].items()}
            assert h["content-security-policy"] == CSP
            js = next(r for r in b.responses() if r["url"].endswith("/dashboard/app.js"))
            assert js["mimeType"] == "text/javascript"
            problems = [p for m, p in b.events if m == "Runtime.exceptionThrown"
                        or (m == "Log.entryAdded" and "Content Security Policy"
                            in p["entry"].get("text", ""))]  # fmt: skip
            assert problems == []

    asyncio.run(main())


async def _contains(b: Browser, selector: str, text: str) -> bool:
    return text in await text_of(b, selector)


def test_cluster_view_in_chromium(redis_server: Any, tmp_path: Path) -> None:
    """On a Redis spool the admin's page lists every live node (this one, and a
    second node publishing from here) with its IPs, and the cluster's totals."""
    chromium_path()
    from fastsend.cluster import ClusterNode
    from fastsend.serve.shared_state import RedisKeyStore
    from fastsend.spool import open_spool

    url = redis_server.url()
    port = free_port()
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[spool]\nurl = "{url}&node=alpha&dir={tmp_path / "local"}"\n'
        f'[ips]\nsource = ["127.0.0.2"]\n[routes]\n"*" = "127.0.0.1:{free_port()}"\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\n[dashboard]\nadmin_tenants = ["ops"]\n'
    )
    shared = open_spool(url).shared()
    assert shared is not None
    key = RedisKeyStore(shared.client, shared.prefix).create("ops")[0]
    other = ClusterNode(shared.client, shared.prefix, "beta", lease=30)
    other.claim_ips(["127.0.0.3"])

    async def main() -> None:
        async with chromium() as b:
            await b.goto(f"http://127.0.0.1:{port}/dashboard")
            await log_in(b, key)
            await dom_until(b, "#who", "tenant ops")

            async def both() -> bool:
                other.publish({"rates": {"delivered": 12.5}, "totals": {"delivered": 40}})
                rows = await text_of(b, "#nodes tbody")
                return "alpha (this node)" in rows and "beta" in rows

            await until("both nodes listed", both)
            assert await b.js("document.getElementById('cluster').hidden") is False
            rows = await b.js(
                "[...document.querySelectorAll('#nodes tbody tr')]"
                ".map((tr) => [...tr.cells].map((td) => td.textContent))"
            )
            by_node = {r[0]: r for r in rows}
            assert by_node["alpha (this node)"][1] == "127.0.0.2"
            assert by_node["beta"][1] == "127.0.0.3" and by_node["beta"][3] == "12.5"
            note = await text_of(b, "#cluster-note")
            assert note.startswith("2 live node(s)") and "40 delivered" in note
            only_loopback(b.requests())

    serve = ServeProcess(cfg, port, "--allow-volatile", "--no-workers")
    try:
        asyncio.run(main())
    finally:
        serve.stop()
