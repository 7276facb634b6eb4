"""Tracking links and unsubscribe: signed tokens, HTML rewriting, the HTTP endpoints.

Real parts only: campaigns rendered by the message module, a ServeContext on
a temporary spool, the aiohttp app served on loopback and an aiohttp client.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import re
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from fastsend.config import from_dict
from fastsend.message import Campaign, CampaignError
from fastsend.message import tracking as tr
from fastsend.serve.context import ServeContext, open_context
from fastsend.serve.tracking import PIXEL_GIF, setup_tracking

SECRET = b"k" * 32
BASE = "https://t.example.net"


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------- tokens
def test_token_roundtrip_and_kinds() -> None:
    tok = tr.sign(SECRET, tr.CLICK, "42", "ann@example.org", "https://example.com/a?b=1&c=2")
    # nonce (12 octets) "." AES-GCM ciphertext and tag: the recipient is not readable
    assert re.fullmatch(r"[A-Za-z0-9_\-]{16}\.[A-Za-z0-9_\-]+", tok)
    assert b"ann@" not in base64.urlsafe_b64decode(tok.split(".")[1] + "==")
    assert tr.verify(SECRET, tok) == (
        "c",
        ("42", "ann@example.org", "https://example.com/a?b=1&c=2"),
    )
    assert tr.verify(b"other-secret-other", tok) is None
    o = tr.sign(SECRET, tr.OPEN, "42", "ann@example.org")
    assert tr.verify(SECRET, o) == ("o", ("42", "ann@example.org"))
    with pytest.raises(ValueError):
        tr.sign(SECRET, tr.CLICK, "1", "a@b.c", "https://x\n")
    with pytest.raises(ValueError):
        tr.sign(SECRET, tr.OPEN, "1")


def test_token_tampering_rejected() -> None:
    tok = tr.sign(SECRET, tr.CLICK, "42", "ann@example.org", "https://example.com/")
    body, mac = tok.split(".")  # (nonce, ciphertext + tag)
    payload = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
    evil = bytes([payload[0] ^ 1]) + payload[1:]  # a flipped ciphertext bit
    evil_ct = base64.urlsafe_b64encode(evil).rstrip(b"=").decode()
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for bad in (
        f"{body}.{evil_ct}",
        f"{body}.{flipped}",
        body,
        f"{body}.",
        f".{mac}",
        "not a token",
        f"{body}.{mac}x",
        "x" * 5000,
        f"{body}.{mac}.{mac}",
    ):
        assert tr.verify(SECRET, bad) is None, bad
    assert tr.verify(b"", tok) is None


# ---------------------------------------------------------------- rendering
HTML = """<html><body>
<p>Hi {{ name }}</p>
<a href="https://example.com/a?x=1&amp;y=2">A</a>
<a class="b" href='https://example.com/p/{{ uid }}'>personal</a>
<a href="mailto:help@example.com">mail</a>
<a href="#top">top</a>
<a data-fs-notrack href="https://example.com/raw">raw</a>
<a href="{{ unsubscribe_url }}">unsubscribe</a>
</body></html>
"""


def _campaign(tmp_path: Path, **tracking: Any) -> Campaign:
    key = tmp_path / "tracking.key"
    key.write_bytes(SECRET)
    t = {"base_url": BASE, "opens": True, "clicks": True, "unsubscribe": True}
    t["secret_file"] = str(key)
    t.update(tracking)
    t = {k: v for k, v in t.items() if v is not None}
    return Campaign.from_dict(
        {
            "from": "News <news@example.com>",
            "subject": "Hi",
            "text": "Hello {{ name }}: {{ unsubscribe_url }}",
            "html": HTML,
            "list_unsubscribe": {"mailto": "unsub@example.com"},
            "tracking": t,
        }
    )


def _parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def _tokens(text: str, kind: str) -> list[tuple[str, ...]]:
    path = {"o": "/t/o/", "c": "/t/c/", "u": "/u/"}[kind]
    out = []
    for tok in re.findall(re.escape(BASE + path) + r"([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)", text):
        got = tr.verify(SECRET, tok)
        assert got is not None and got[0] == kind
        out.append(got[1])
    return out


def test_render_rewrites_links_and_adds_pixel(tmp_path: Path) -> None:
    camp = _campaign(tmp_path)
    assert camp.variables == {"name", "uid"}  # unsubscribe_url is built in
    assert "secret" not in orjson.dumps(camp.to_dict()).decode().replace("secret_file", "")
    r = camp.compile()
    msg = _parse(r.render("ann@example.org", {"name": "Ann", "uid": "u7"}, "42"))
    body = msg.get_body(("html",))
    assert body is not None
    html = body.get_content()
    clicks = _tokens(html, "c")
    assert clicks == [
        ("42", "ann@example.org", "https://example.com/a?x=1&y=2"),
        ("42", "ann@example.org", "https://example.com/p/u7"),
    ]
    assert 'href="mailto:help@example.com"' in html
    assert 'href="#top"' in html
    assert 'href="https://example.com/raw"' in html
    assert _tokens(html, "o") == [("42", "ann@example.org")]
    assert html.index("/t/o/") < html.index("</body>")
    assert _tokens(html, "u") == [("42", "ann@example.org")]
    text = msg.get_body(("plain",))
    assert text is not None
    assert _tokens(text.get_content(), "u") == [("42", "ann@example.org")]
    lu = str(msg["List-Unsubscribe"])
    assert lu.startswith("<mailto:unsub@example.com>, <" + BASE + "/u/")
    assert _tokens(lu, "u") == [("42", "ann@example.org")]
    assert str(msg["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    # Another recipient gets other tokens from the same compiled renderer.
    html2 = _parse(r.render("bob@example.org", {"name": "Bob", "uid": "u8"}, "43"))
    b2 = html2.get_body(("html",))
    assert b2 is not None
    assert _tokens(b2.get_content(), "c")[1] == (
        "43",
        "bob@example.org",
        "https://example.com/p/u8",
    )


def test_tracking_validation_errors(tmp_path: Path) -> None:
    # Without signed unsubscribe links, unsubscribe_url is an ordinary column.
    assert "unsubscribe_url" in _campaign(tmp_path, unsubscribe=False).variables
    with pytest.raises(CampaignError, match="unknown"):
        _campaign(tmp_path, secret="x")
    with pytest.raises(CampaignError, match="https"):
        _campaign(tmp_path, base_url="http://t.example.net")
    with pytest.raises(CampaignError, match="secret"):
        _campaign(tmp_path, secret_file=str(tmp_path / "missing.key")).compile()
    # Without base_url the table is only stored: nothing is rewritten.
    plain = Campaign.from_dict(
        {
            "from": "a@example.com",
            "subject": "s",
            "html": '<a href="https://x.example/">x</a>',
            "tracking": {"opens": True, "clicks": True},
        }
    )
    data = plain.compile().render("b@example.org", {}, "1")
    assert b"https://x.example/" in data and b"/t/" not in data


def test_process_secret_used_without_secret_file(tmp_path: Path) -> None:
    tr.set_process_secret(SECRET)
    camp = _campaign(tmp_path, secret_file=None)
    assert "secret_file" not in camp.tracking
    r = camp.compile()
    data = r.render("ann@example.org", {"name": "A", "uid": "1"}, "9").decode()
    assert _tokens(str(_parse(data.encode())["List-Unsubscribe"]), "u") == [
        ("9", "ann@example.org")
    ]


# ---------------------------------------------------------------- endpoints
@asynccontextmanager
async def _served(
    tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[ServeContext, str, list[dict[str, Any]]]]:
    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")}, **config})
    ctx = open_context(cfg)
    ctx.secret = SECRET
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    app = web.Application()
    setup_tracking(app, ctx)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield ctx, str(server.make_url("")).rstrip("/"), events
    finally:
        await server.close()
        ctx.close()


def _message(ctx: ServeContext, tenant: str = "acme") -> int:
    cid = ctx.tenant_campaign(tenant)
    (mid,) = ctx.inject(cid, [("ann@example.org", "example.org", b'{"raw":"","mail_from":""}')])
    return mid


def test_open_and_click_endpoints(tmp_path: Path) -> None:
    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            mid = _message(ctx)
            del events[:]
            o = tr.sign(SECRET, tr.OPEN, str(mid), "ann@example.org", tenant="acme")
            async with http.get(f"{base}/t/o/{o}.gif", headers={"User-Agent": "UA/1"}) as resp:
                assert resp.status == 200
                assert resp.content_type == "image/gif"
                assert await resp.read() == PIXEL_GIF
                assert "no-store" in resp.headers["Cache-Control"]
            target = "https://example.com/landing?a=1&b=%20x"
            c = tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", target, tenant="acme")
            async with http.get(f"{base}/t/c/{c}", allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == target
            async with http.head(f"{base}/t/c/{c}", allow_redirects=False) as resp:
                assert resp.status == 302  # answered, not recorded
            assert [e["event"] for e in events] == ["opened", "clicked"]
            opened, clicked = events
            assert opened["id"] == mid and opened["rcpt"] == "ann@example.org"
            assert opened["tenant"] == "acme" and opened["user_agent"] == "UA/1"
            assert opened["campaign"] == ctx.tenant_campaign("acme")
            assert clicked["url"] == target and abs(clicked["time"] - time.time()) < 60

    _run(main())


def test_one_link_replayed_records_a_bounded_number_of_events(tmp_path: Path) -> None:
    """A recipient (or whoever holds a forwarded mail) replaying one pixel or one link
    is answered every time, but records at most LINK_EVENTS opens or clicks an hour:
    before, each request wrote an event (log, index, webhooks), ~3,600 a second from
    one client. Other links keep their own count."""
    from fastsend.serve.tracking import LINK_EVENTS

    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            mid = _message(ctx)
            del events[:]
            o = tr.sign(SECRET, tr.OPEN, str(mid), "ann@example.org", tenant="acme")
            c = tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", "https://example.com/a",
                        tenant="acme")  # fmt: skip
            c2 = tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", "https://example.com/b",
                         tenant="acme")  # fmt: skip
            for _ in range(LINK_EVENTS + 30):
                async with http.get(f"{base}/t/o/{o}.gif") as resp:
                    assert resp.status == 200 and await resp.read() == PIXEL_GIF
                async with http.get(f"{base}/t/c/{c}", allow_redirects=False) as resp:
                    assert resp.status == 302
            async with http.get(f"{base}/t/c/{c2}", allow_redirects=False) as resp:
                assert resp.status == 302
            ctx.events.flush()
            kinds = [(e["event"], e.get("url")) for e in events]
            assert kinds.count(("opened", None)) == LINK_EVENTS
            assert kinds.count(("clicked", "https://example.com/a")) == LINK_EVENTS
            assert kinds.count(("clicked", "https://example.com/b")) == 1

    _run(main())


def test_forged_links_never_redirect(tmp_path: Path) -> None:
    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, events), ClientSession() as http:
            good = tr.sign(SECRET, tr.CLICK, "1", "ann@example.org", "https://example.com/")
            body, mac = good.split(".")
            evil = tr.sign(b"attacker-secret-123", tr.CLICK, "1", "a@b.example", "https://evil/")
            evil_body = evil.split(".")[0]
            opener = tr.sign(SECRET, tr.OPEN, "1", "ann@example.org")
            unsub = tr.sign(SECRET, tr.UNSUBSCRIBE, "1", "ann@example.org")
            for path in (
                f"/t/c/{evil}",  # signed with another key
                f"/t/c/{evil_body}.{mac}",  # another URL under a genuine MAC
                f"/t/c/{body}",  # unsigned
                f"/t/c/{opener}",  # a genuine token of another kind
                f"/t/c/{unsub}",
                "/t/c/https://evil.example/",
                "/t/c/?url=https://evil.example/",
                f"/t/o/{good}.gif",
                f"/t/o/{body}.AAAAAAAAAAAAAAAAAAAAAA.gif",
            ):
                async with http.get(base + path, allow_redirects=False) as resp:
                    assert resp.status in (400, 404), path
                    assert "Location" not in resp.headers, path
            async with http.post(f"{base}/u/{opener}", data={"confirm": "yes"}) as resp:
                assert resp.status == 404
            assert events == []

    _run(main())


def test_unsubscribe_one_click_and_page(tmp_path: Path) -> None:
    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            mid = _message(ctx, "acme")
            del events[:]
            tok = tr.sign(SECRET, tr.UNSUBSCRIBE, str(mid), "ann@example.org", tenant="acme")
            async with http.get(f"{base}/u/{tok}") as resp:
                assert resp.status == 200
                page = await resp.text()
                assert '<form method="post">' in page and "ann@example.org" in page
            assert not ctx.suppression.contains("ann@example.org", tenant="acme")
            async with http.post(f"{base}/u/{tok}", data={"nothing": "here"}) as resp:
                assert resp.status == 400
            # RFC 8058: what a mailbox provider sends.
            async with http.post(
                f"{base}/u/{tok}",
                data=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as resp:
                assert resp.status == 200
            entry = ctx.suppression.get("ann@example.org", tenant="acme")
            assert entry is not None and entry.reason == "unsubscribe"
            assert not ctx.suppression.contains("ann@example.org", tenant="other")
            # The page's form, for another recipient of an unknown message (default tenant).
            tok2 = tr.sign(SECRET, tr.UNSUBSCRIBE, "999999", "bob@example.org")
            async with http.post(f"{base}/u/{tok2}", data={"confirm": "yes"}) as resp:
                assert resp.status == 200
                assert "no more mail" in await resp.text()
            assert ctx.suppression.contains("bob@example.org", tenant="default")
            assert [(e["event"], e["method"], e["tenant"]) for e in events] == [
                ("unsubscribed", "one-click", "acme"),
                ("unsubscribed", "page", "default"),
            ]

    _run(main())


def test_rendered_links_work_end_to_end(tmp_path: Path) -> None:
    """A link rendered by the message module, followed through the endpoint."""

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, events), ClientSession() as http:
            tr.set_process_secret(SECRET)
            camp = _campaign(tmp_path, base_url=base.replace("http://", "https://"))
            data = camp.compile().render("ann@example.org", {"name": "A", "uid": "7"}, "5")
            html = _parse(data).get_body(("html",))
            assert html is not None
            link = re.search(r'href="https://[^"/]+(/t/c/[^"]+)"', html.get_content())
            assert link is not None
            async with http.get(base + link.group(1), allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == "https://example.com/a?x=1&y=2"
            assert events[-1]["event"] == "clicked" and events[-1]["id"] == 5

    _run(main())
