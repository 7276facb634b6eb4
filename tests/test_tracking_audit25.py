"""Tracking, webhooks and metrics audited from outside (session 25, track25).

Real parts only: campaigns rendered by the message module, the tracking endpoints
served by aiohttp on loopback (tests/test_serve_tracking.py's ``_served``), an
aiohttp client following the links as a mail reader would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from fastsend.message import tracking as tr
from fastsend.serve.tracking import LINK_EVENTS, PIXEL_GIF, ascii_url
from test_monitoring_audit23 import _follow, _hrefs, _render
from test_serve_tracking import SECRET, _message, _run, _served


def test_a_link_with_an_invisible_character_is_redirected_as_a_browser_asks_for_it(
    tmp_path: Path,
) -> None:
    """A link whose URL holds a character Python does not call printable (a no-break
    space from an author's ``&nbsp;``, an emoji sequence's zero-width joiner, a soft
    hyphen, a bidi mark, a tab) was tracked by the renderer, but the click endpoint
    answered 404 (``url.isprintable()``): a dead link in every recipient's mail, where
    the untracked link works (a browser percent-encodes them, and drops tabs and line
    breaks). Now each is redirected to the URL a browser asks for."""
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    cases = [
        ("https://shop.example/s?q=red&nbsp;shoes", "https://shop.example/s?q=red%C2%A0shoes"),
        (f"https://shop.example/e/{family}",
         "https://shop.example/e/%F0%9F%91%A8%E2%80%8D%F0%9F%91%A9%E2%80%8D%F0%9F%91%A7"),
        ("https://shop.example/co\u00adop", "https://shop.example/co%C2%ADop"),
        ("https://shop.example/a\u200eb#x\u200fy", "https://shop.example/a%E2%80%8Eb#x%E2%80%8Fy"),
        ("https://shop.example/a\tb?c=\td", "https://shop.example/ab?c=d"),
        ("https://shop.example/a\x01b?c=\x7f", "https://shop.example/a%01b?c=%7F"),
    ]  # fmt: skip
    body = "".join(f'<a href="{url}">{i}</a>' for i, (url, _want) in enumerate(cases))

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, events), ClientSession() as http:
            links = _hrefs(_render(tmp_path, base, body))
            assert len(links) == len(cases)
            for link, (url, want) in zip(links, cases, strict=True):
                assert await _follow(http, base, link) == (302, want), url
            assert sum(e["event"] == "clicked" for e in events) == len(cases)

    _run(main())
    for _url, want in cases:  # what is sent is sent again as it is
        assert ascii_url(want) == want


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _spellings(token: str) -> list[str]:
    """Other spellings of ``token`` that decode to the same octets: the last character
    of a base64 part whose octets are not a multiple of three carries bits no octet
    uses (4 of them after one octet, 2 after two): any value of those is the same
    token to a lenient decoder."""
    out = []
    parts = token.split(".")
    for i, part in enumerate(parts):
        spare = {2: 4, 3: 2}.get(len(part) % 4, 0)
        if not spare:
            continue
        last = _B64.index(part[-1])
        for low in range(1, 1 << spare):
            again = list(parts)
            again[i] = part[:-1] + _B64[(last & ~((1 << spare) - 1)) | low]
            out.append(".".join(again))
    return out


def test_a_link_spelled_another_way_is_not_a_link_of_its_own(tmp_path: Path) -> None:
    """One link records at most [tracking] link_events_per_hour opens or clicks, counted
    by its token's text; but the token's base64 has spare bits in its last character
    (an octet count not a multiple of three), so the same token spelled up to 16 ways
    opened alike, each spelling with a count of its own: one pixel replayed recorded
    up to 16 x 20 opens an hour. Now a token is opened only as it was signed (its one
    canonical spelling); every other spelling is a forged link (404)."""

    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            mid = _message(ctx)
            del events[:]
            while True:  # (a nonce, then a ciphertext with spare bits: most tokens)
                o = tr.sign(SECRET, tr.OPEN, str(mid), "ann@example.org", tenant="acme")
                others = _spellings(o)
                if len(others) >= 3:
                    break
            for tok in others:
                async with http.get(f"{base}/t/o/{tok}.gif") as resp:
                    assert resp.status == 404, tok
            for _ in range(LINK_EVENTS + 5):
                for tok in [o, *others]:
                    async with http.get(f"{base}/t/o/{tok}.gif") as resp:
                        assert resp.status == (200 if tok == o else 404)
                        if tok == o:
                            assert await resp.read() == PIXEL_GIF
            ctx.events.flush()
            assert [e["event"] for e in events] == ["opened"] * LINK_EVENTS
            assert tr.open_token(SECRET, o) is not None
            assert all(tr.open_token(SECRET, t) is None for t in others)

    _run(main())


def test_the_links_counted_take_little_memory_however_long_their_urls(tmp_path: Path) -> None:
    """The per-link count (link_events_per_hour) kept each link by its whole token, up
    to 100,000 of them: a tenant mailing itself 100 messages of 1,000 links of ~5,500
    octets (about the longest it may track) and asking for each once made serve hold
    ~750 MB (measured here: ~9.5 KB a link). Now a link is kept by a digest of its token."""
    import tracemalloc

    warm, n = 300, 1500  # (the first fill the HTTP stack's caches of 128 URLs)
    url = "https://shop.example/p?utm=" + "x" * 5400

    async def main() -> int:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            mid = _message(ctx)
            # (the rollups hold each click a few seconds, for its burst window: not here)
            ctx.events.listeners.remove(ctx.rollups.listener)
            toks = [tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", f"{url}{i}",
                            tenant="acme") for i in range(warm + n)]  # fmt: skip
            assert 7000 < len(toks[0]) <= tr.MAX_TOKEN

            async def click(tok: str) -> None:
                async with http.get(f"{base}/t/c/{tok}", allow_redirects=False) as resp:
                    assert resp.status == 302

            for tok in toks[:warm]:
                await click(tok)
            ctx.events.flush()
            del events[:]
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for tok in toks[warm:]:
                    await click(tok)
                ctx.events.flush()
                del events[:]
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            return grown

    grown = _run(main())
    # The HTTP stack's three caches of 128 URLs (client and server, ~3 MB here) turn
    # over while traced: under 3.5 KB a link in all (before: ~9.5 KB a link).
    assert grown < n * 3500, f"{grown / n:.0f} octets a link"


def test_a_redirect_names_the_host_a_browser_goes_to_for_every_client(tmp_path: Path) -> None:
    """A browser reads a backslash in an http(s) URL's authority or path as a slash, and
    any number of slashes or backslashes after "https:" as the two (WHATWG URL); RFC
    3986 parsers (link scanners, HTTP libraries, security gateways following the
    redirect) read "\\" as part of the userinfo and "https:///x" as no host. The click
    endpoint sent such a link's Location as written: https://evil.example\\@good.example/
    took a reader to evil.example while a scanner checked good.example (a phishing
    link cloaked by the operator's own redirect). Now the Location is what the browser
    asks for, which every parser reads alike."""
    from urllib.parse import urlsplit

    cases = [
        ("https://evil.example\\@good.example/x", "https://evil.example/@good.example/x",
         "evil.example"),
        ("https://evil.example\\.good.example", "https://evil.example/.good.example",
         "evil.example"),
        ("https:///evil.example/a", "https://evil.example/a", "evil.example"),
        ("https://\\\\evil.example/a\\b?q=\\#f\\", "https://evil.example/a/b?q=\\#f\\",
         "evil.example"),
        ("HTTP://good.example\\a\\b", "http://good.example/a/b", "good.example"),
    ]  # fmt: skip
    for url, want, host in cases:
        assert ascii_url(url) == want, url
        assert urlsplit(want).hostname == host
    body = "".join(f'<a href="{url}">{i}</a>' for i, (url, _w, _h) in enumerate(cases))

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, _events), ClientSession() as http:
            links = _hrefs(_render(tmp_path, base, body))
            for link, (url, want, _host) in zip(links, cases, strict=True):
                assert await _follow(http, base, link) == (302, want), url

    _run(main())


def test_a_one_click_unsubscribe_is_taken_however_its_body_is_labelled(tmp_path: Path) -> None:
    """RFC 8058's one-click POST ("List-Unsubscribe=One-Click") labelled
    multipart/form-data without a boundary, or with one its body does not hold, or
    with a charset no codec has, answered 500 (aiohttp's form reader raised): the
    unsubscribe was lost, the client told the server failed. A body that is not text
    (invalid UTF-8) was a 500 too. Now such a body is read as the urlencoded form it
    is (as one labelled text/plain already was); what holds no unsubscribe is a 400."""
    one_click = b"List-Unsubscribe=One-Click"
    multipart = (b'--b\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
                 b"One-Click\r\n--b--\r\n")  # fmt: skip
    cases = [
        ("multipart/form-data", one_click, 200),
        ("multipart/form-data; boundary=x", one_click, 200),
        ("multipart/form-data; boundary=b", multipart, 200),
        ("application/x-www-form-urlencoded; charset=no-such-codec", one_click, 200),
        ("application/x-www-form-urlencoded", one_click, 200),
        ("application/x-www-form-urlencoded", b"\xff\xfe=\xff", 400),
        ("multipart/form-data; boundary=b", b"--b\r\n\xff\r\n--b--\r\n", 400),
        ("application/x-www-form-urlencoded", b"confirm=yes", 200),
    ]

    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, _events), ClientSession() as http:
            for i, (ctype, body, want) in enumerate(cases):
                rcpt = f"r{i}@example.org"
                mid = _message(ctx, "acme")
                tok = tr.sign(SECRET, tr.UNSUBSCRIBE, str(mid), rcpt, tenant="acme")
                async with http.post(f"{base}/u/{tok}", data=body,
                                     headers={"Content-Type": ctype}) as resp:  # fmt: skip
                    assert resp.status == want, (ctype, body, await resp.text())
                taken = ctx.suppression.contains(rcpt, tenant="acme")
                assert taken == (want == 200), (ctype, body)

    _run(main())


@pytest.mark.parametrize("host", ["[", "t.acme.example]", "[::1", "[zz]:443", "[fe80::1%"])
def test_a_host_header_no_url_can_hold_is_a_404_not_a_500(tmp_path: Path, host: str) -> None:
    """With [tenants], a link's host decides whose it may be (one tenant's link on
    another's host is a 404); a Host header that no URL can hold ("[", an unclosed or
    bad IPv6 literal) raised in urlsplit: a 500 from the public listener for anyone
    with a link. Now such a host is no tenant's: the link answers as on a shared host."""
    tenants = {"acme": {"domains": ["acme.example"],
                        "tracking_base_url": "https://t.acme.example"}}  # fmt: skip

    async def main() -> None:
        async with _served(tmp_path, tenants=tenants) as (ctx, base, _events):
            mid = _message(ctx, "acme")
            c = tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", "https://example.com/a",
                        tenant="acme")  # fmt: skip
            port = int(base.rpartition(":")[2])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /t/c/{c} HTTP/1.1\r\nHost: {host}\r\n"
                         "Connection: close\r\n\r\n".encode())  # fmt: skip
            await writer.drain()
            status = (await reader.readline()).split()[1]
            writer.close()
            assert status == b"302"

    _run(main())


def test_an_open_or_click_of_mail_gone_from_the_spool_is_its_tenants(tmp_path: Path) -> None:
    """A message leaves the spool [spool] final_retention_days (30) after it is final;
    its links work [tracking] link_ttl_days (90). An open or click of such a message
    was recorded as tenant "default"'s (the token's tenant, authenticated, was used for
    an unsubscribe only): the tenant's webhook URLs, its stats and exports never saw
    its late readers; an operator URL filtered by tenant got them as the operator's.
    Now the event names the token's tenant, as an unsubscribe's does."""

    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            gone = "999999"  # (no such message in the spool: pruned)
            o = tr.sign(SECRET, tr.OPEN, gone, "ann@example.org", tenant="acme")
            c = tr.sign(SECRET, tr.CLICK, gone, "ann@example.org", "https://example.com/a",
                        tenant="acme")  # fmt: skip
            async with http.get(f"{base}/t/o/{o}.gif") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/t/c/{c}", allow_redirects=False) as resp:
                assert resp.status == 302
            ctx.events.flush()
            got = [(e["event"], e["tenant"], e["campaign"]) for e in events]
            assert got == [("opened", "acme", None), ("clicked", "acme", None)]

    _run(main())


def test_links_answer_while_the_shared_spool_is_out_of_reach(tmp_path: Path) -> None:
    """On a Redis spool, a click looks its message's campaign and tenant up in the
    spool: with Redis out of reach (paused here, as a failover or a stalled host) every
    click answered 500 after the client's timeout, the reader's link broken though its
    URL is in the token, and an unsubscribe was a 500. Now the click redirects and its
    event names the token's tenant (the spool is asked again after SPOOL_RETRY s), and
    an unsubscribe that cannot be stored is a 503 with Retry-After (a one-click sender
    tries again), never a 500."""
    import os
    import signal

    from tests._redis_helpers import start_redis

    async def main(srv: Any) -> None:
        spool = {"dir": str(tmp_path / "spool"), "url": srv.url(socket_timeout="0.5")}
        async with _served(tmp_path, spool=spool) as (ctx, base, events), ClientSession() as http:
            mids = [_message(ctx, "acme") for _ in range(3)]
            del events[:]
            clicks = [tr.sign(SECRET, tr.CLICK, str(m), "ann@example.org",
                              f"https://example.com/{m}", tenant="acme") for m in mids]  # fmt: skip
            unsub = tr.sign(SECRET, tr.UNSUBSCRIBE, str(mids[2]), "ann@example.org",
                            tenant="acme")  # fmt: skip
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                for c, m in zip(clicks, mids, strict=True):
                    async with http.get(f"{base}/t/c/{c}", allow_redirects=False) as resp:
                        assert resp.status == 302
                        assert resp.headers["Location"] == f"https://example.com/{m}"
                async with http.post(f"{base}/u/{unsub}", data=b"List-Unsubscribe=One-Click",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"}
                                     ) as resp:  # fmt: skip
                    assert resp.status == 503 and resp.headers["Retry-After"] == "60"
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
            ctx.events.flush()
            got = [(e["event"], e["id"], e["tenant"]) for e in events]
            assert got == [("clicked", m, "acme") for m in mids]

    with start_redis() as srv:
        _run(main(srv))
