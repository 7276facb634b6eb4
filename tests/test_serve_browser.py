"""The pages people's browsers hit, in a real headless Chromium (Debian's package).

A real ``fastsend serve`` (no workers) serves the tracking and unsubscribe
routes; a second loopback server plays the sender's landing site. Chromium is
driven over the DevTools protocol with aiohttp's websocket client: no new
dependency (selenium and chromedriver would add a driver process and a
package for the same few commands), and the protocol's Network events let
the test see every request the browser makes, so "never navigates elsewhere"
and "loads nothing external" are checked, not assumed.

Chromium is started with everything that phones home turned off, and its
resolver maps every host name to nothing: only 127.0.0.1 is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from conftest import ServeProcess, create_api_key, free_port, require_program
from fastsend.message import tracking as tr
from fastsend.testing.http import app_on_loopback

SECRET = "browser-test-secret-0123456789abcdef"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--metrics-recording-only",
    "--no-pings",
    "--dns-prefetch-disable",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=800,600",
]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return require_program(name)
    return require_program("chromium")


# ------------------------------------------------------------------ servers
class Served:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        cfg = tmp / "fastsend.toml"
        cfg.write_text(
            f'[spool]\ndir = "spool"\n[api]\nlisten = "127.0.0.1:{self.port}"\n'
            f'[tracking]\nsecret = "{SECRET}"\n'
        )
        self.key = create_api_key(cfg, "acme")
        self.serve = ServeProcess(cfg, self.port, "--no-workers")
        self.base = self.serve.base

    def stop(self) -> None:
        self.serve.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("browser"))
    try:
        yield s
    finally:
        s.stop()


async def api(s: Served, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, s.base + path, json=body, headers={"Authorization": f"Bearer {s.key}"}
        ) as r,
    ):
        assert r.status < 300, await r.text()
        return await r.json()


async def new_message(s: Served, rcpt: str) -> int:
    body = {"from": "news@example.com", "to": rcpt, "subject": "s", "text": "t"}
    out = await api(s, "POST", "/v1/messages", body)
    return int(out["messages"][0]["ids"][0])


async def events_of(s: Served, mid: int, name: str, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        m = await api(s, "GET", f"/v1/messages/{mid}")
        evs = [e for e in m["events"] if e["event"] == name]
        if evs or time.monotonic() > deadline:
            return evs
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def landing_site() -> AsyncIterator[tuple[str, list[str]]]:
    """The sender's own site on loopback: records every path it is asked for."""
    hits: list[str] = []

    async def page(request: web.Request) -> web.Response:
        if request.path != "/favicon.ico":
            hits.append(request.path_qs)
        body = request.query.get("body", "<p>landed</p>")
        return web.Response(
            text=f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Landing"
            f"</title></head><body>{body}</body></html>",
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    async with app_on_loopback(app) as base:
        yield base, hits


# ------------------------------------------------------------------ the browser
class Browser:
    """Just enough of the DevTools protocol: one page, navigate, evaluate, click."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.loaded = asyncio.Event()
        self.session: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = orjson.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(RuntimeError(str(data["error"])))
                    else:
                        fut.set_result(data.get("result", {}))
            else:
                self.events.append((data["method"], data.get("params", {})))
                if data["method"] == "Page.loadEventFired":
                    self.loaded.set()

    async def send(self, method: str, **params: Any) -> Any:
        i = next(self.ids)
        msg: dict[str, Any] = {"id": i, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        fut = self.pending[i] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(orjson.dumps(msg).decode())  # text frames only
        return await asyncio.wait_for(fut, 15)

    async def open_page(self) -> None:
        target = await self.send("Target.createTarget", url="about:blank")
        att = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session = att["sessionId"]
        await self.send("Page.enable")
        await self.send("Network.enable")

    async def goto(self, url: str) -> None:
        """Navigate and wait for the new document to have loaded. Not only for a
        loadEventFired after navigating: a late one of the page being left (the
        about:blank a target opens with) set it early once, and a train's test
        then looked for the dashboard's elements in an empty page. The page left
        is marked; the wait ends in a loaded document without the mark."""
        await self.js("window.__fastsendLeft = true")
        self.loaded.clear()
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(self.loaded.wait(), 15)

        async def arrived() -> bool:
            try:
                return bool(await self.js(
                    "!window.__fastsendLeft && document.readyState === 'complete'"))  # fmt: skip
            except RuntimeError:  # between documents: no context to evaluate in
                return False

        deadline = time.monotonic() + 15
        while not await arrived():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: not loaded in 15 s")
            await asyncio.sleep(0.05)

    async def js(self, expr: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expr, returnByValue=True,
                            awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in r:
            raise RuntimeError(str(r["exceptionDetails"]))
        return r["result"].get("value")

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (pressed + released)."""
        box = await self.js(
            f"(() => {{ const r = document.querySelector({orjson.dumps(selector).decode()})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        self.loaded.clear()
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                            button="left", clickCount=1)  # fmt: skip
        await asyncio.wait_for(self.loaded.wait(), 15)

    def requests(self) -> list[str]:
        return [p["request"]["url"] for m, p in self.events if m == "Network.requestWillBeSent"]

    def responses(self) -> list[dict[str, Any]]:
        return [p["response"] for m, p in self.events if m == "Network.responseReceived"]


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    exe = chromium_path()
    profile = tempfile.mkdtemp(prefix="fastsend-chromium-")
    proc = subprocess.Popen(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws,
        ):
            b = Browser(ws)
            try:
                await b.open_page()
                yield b
            finally:
                b.reader.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def only_loopback(urls: list[str]) -> None:
    for u in urls:
        assert u.startswith(("http://127.0.0.1:", "about:", "data:")), u


def check_page_headers(b: Browser, url: str) -> dict[str, str]:
    resp = next(r for r in b.responses() if r["url"] == url)
    h = {k.lower(): v for k, v in resp["headers"].items()}
    assert "default-src 'none'" in h["content-security-policy"], h
    assert h["content-type"].startswith("text/html"), h
    return h


# ------------------------------------------------------------------ tests
def test_unsubscribe_page_and_confirm(served: Served) -> None:
    async def main() -> None:
        mid = await new_message(served, "ann@example.org")
        url = f"{served.base}/u/{tr.sign(SECRET.encode(), tr.UNSUBSCRIBE, str(mid), 'ann@example.org', tenant='acme')}"
        async with chromium() as b:
            await b.goto(url)
            assert await b.js("document.compatMode") == "CSS1Compat"  # a real HTML5 doctype
            assert await b.js("document.title") == "Unsubscribe"
            assert "ann@example.org" in await b.js("document.body.innerText")
            check_page_headers(b, url)
            sup = await api(served, "GET", "/v1/suppressions")
            assert "ann@example.org" not in [e["address"] for e in sup["suppressions"]]
            await b.click("button[type=submit]")
            assert await b.js("document.title") == "Unsubscribed"
            assert "no more mail" in await b.js("document.body.innerText")
            assert await b.js("location.href") == url  # posted to itself
            posts = [p for m, p in b.events if m == "Network.requestWillBeSent"
                     and p["request"]["method"] == "POST"]  # fmt: skip
            assert [p["request"]["url"] for p in posts] == [url]
            only_loopback(b.requests())
        sup = await api(served, "GET", "/v1/suppressions")
        entry = next(e for e in sup["suppressions"] if e["address"] == "ann@example.org")
        assert entry["reason"] == "unsubscribe" and entry["source"] == "unsubscribe"
        evs = await events_of(served, mid, "unsubscribed")
        assert len(evs) == 1 and evs[0]["method"] == "page" and evs[0]["tenant"] == "acme"

    asyncio.run(main())


def test_one_click_post_from_the_browser(served: Served) -> None:
    """RFC 8058: a POST of List-Unsubscribe=One-Click, as a mailbox provider sends it."""

    async def main() -> None:
        mid = await new_message(served, "bob@example.org")
        tok = tr.sign(SECRET.encode(), tr.UNSUBSCRIBE, str(mid), "bob@example.org", tenant="acme")
        url = f"{served.base}/u/{tok}"
        form = (
            f'<form method="post" action="{url}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        )
        async with landing_site() as (site, _hits), chromium() as b:
            await b.goto(f"{site}/mail?body={urllib.parse.quote(form, safe='')}")
            await b.click("button")
            assert await b.js("location.href") == url
            assert (await b.js("document.body.innerText")).strip() == "unsubscribed"
            post = next(p["request"] for m, p in b.events if m == "Network.requestWillBeSent"
                        and p["request"]["method"] == "POST")  # fmt: skip
            assert post["url"] == url and post["postData"] == "List-Unsubscribe=One-Click"
            only_loopback(b.requests())
        evs = await events_of(served, mid, "unsubscribed")
        assert [e["method"] for e in evs] == ["one-click"]

    asyncio.run(main())


def test_click_redirects_and_forged_link_does_not(served: Served) -> None:
    async def main() -> None:
        mid = await new_message(served, "cy@example.org")
        async with landing_site() as (site, hits), chromium() as b:
            target = f"{site}/landing?campaign=spring&x=%20y"
            tok = tr.sign(SECRET.encode(), tr.CLICK, str(mid), "cy@example.org", target, tenant="acme")
            await b.goto(f"{served.base}/t/c/{tok}")
            assert await b.js("location.href") == target
            assert await b.js("document.title") == "Landing"
            assert hits == ["/landing?campaign=spring&x=%20y"]
            only_loopback(b.requests())
            assert len(await events_of(served, mid, "clicked")) == 1

            # Tampered: the same MAC over another URL, another key, a truncated token.
            evil = f"{site}/evil"
            forged_body = tr.sign(SECRET.encode(), tr.CLICK, str(mid), "cy@example.org",
                                  evil).split(".")[0]  # fmt: skip
            other_key = tr.sign(b"attacker-key-0123456789", tr.CLICK, str(mid), "cy@example.org",
                                evil)  # fmt: skip
            for bad in (f"{forged_body}.{tok.split('.')[1]}", other_key, tok[:-3]):
                b.events.clear()
                url = f"{served.base}/t/c/{bad}"
                await b.goto(url)
                assert await b.js("location.href") == url  # stayed: no redirect
                assert await b.js("document.title") == "Link not valid"
                resp = next(r for r in b.responses() if r["url"] == url)
                assert resp["status"] == 404
                check_page_headers(b, url)
                only_loopback(b.requests())
                assert not [u for u in b.requests() if u.startswith(evil)]
            assert hits == ["/landing?campaign=spring&x=%20y"]  # the evil URL was never hit
            assert len(await events_of(served, mid, "clicked")) == 1

    asyncio.run(main())


def test_open_pixel_loads_as_an_image(served: Served) -> None:
    async def main() -> None:
        mid = await new_message(served, "di@example.org")
        pixel = (
            f"{served.base}/t/o/{tr.sign(SECRET.encode(), tr.OPEN, str(mid), 'di@example.org', tenant='acme')}.gif"
        )
        async with landing_site() as (site, _hits), chromium() as b:
            # An HTML mail as a webmail shows it: the pixel is an <img> of another origin.
            img = f'<img id="p" src="{pixel}" alt="">'
            await b.goto(f"{site}/mail?body={urllib.parse.quote(img, safe='')}")
            ok = await b.js(
                "new Promise(r => { const p = document.getElementById('p');"
                " if (p.complete) r([p.naturalWidth, p.naturalHeight]);"
                " else { p.onload = () => r([p.naturalWidth, p.naturalHeight]);"
                " p.onerror = () => r('error'); } })"
            )
            assert ok == [1, 1]
            resp = next(r for r in b.responses() if r["url"] == pixel)
            assert resp["status"] == 200 and resp["mimeType"] == "image/gif"
            only_loopback(b.requests())
        evs = await events_of(served, mid, "opened")
        assert len(evs) == 1 and "HeadlessChrome" in evs[0]["user_agent"]

    asyncio.run(main())
