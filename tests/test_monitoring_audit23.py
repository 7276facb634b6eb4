"""Monitoring and tracking, audited from outside (session 23).

Real parts only: campaigns rendered by the message module, the tracking
endpoints served by aiohttp on loopback (tests/test_serve_tracking.py's
``_served``), an aiohttp client following the links as a mail reader would.
"""

from __future__ import annotations

import email
import email.policy
import re
from html.parser import HTMLParser
from pathlib import Path

from aiohttp import ClientSession

from fastsend.message import Campaign
from fastsend.message import tracking as tr
from fastsend.serve.tracking import ascii_url
from test_serve_tracking import SECRET, _message, _run, _served


def _render(tmp_path: Path, base: str, body: str, variables: dict[str, str] | None = None) -> str:
    """The HTML part of one message of a campaign tracking clicks at ``base``."""
    key = tmp_path / "tracking.key"
    key.write_bytes(SECRET)
    camp = Campaign.from_dict(
        {
            "from": "News <news@example.com>",
            "subject": "Hi",
            "html": f"<html><body>{body}</body></html>",
            "tracking": {"base_url": base, "clicks": True, "secret_file": str(key)},
        }
    )
    data = camp.compile().render("ann@example.org", variables or {}, "5")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    part = msg.get_body(("html",))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text


def _hrefs(text: str) -> list[str]:
    """Each <a>'s href as a browser reads it (Python's HTML parser: the first
    attribute named href, entities decoded, spaces at the ends stripped)."""
    out: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "a":
                out.append(next(v for k, v in attrs if k == "href" and v).strip())

    Links().feed(text)
    return out


async def _follow(http: ClientSession, base: str, link: str) -> tuple[int, str | None]:
    """(status, Location) of one tracked link, asked for on the test server."""
    assert link.startswith(base + "/t/c/"), link
    async with http.get(link, allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Location")


def test_a_long_link_is_tracked_or_left_working(tmp_path: Path) -> None:
    """A 3,000-octet URL (a marketing tool's UTM-laden link, or a query of non-ASCII
    words percent-encoded) made a token over MAX_TOKEN (4,096): the mail carried a
    tracked link the endpoint answered 404, a dead link for every recipient. Now links
    up to ~5,500 octets are tracked and redirect; a link too long for any request line
    stays as it is (it works, uncounted), never a dead one."""
    long_q = "utm=" + "a1b2c3d4" * 500  # 4,004 octets
    huge_q = "data=" + "z" * 9000  # no tracked link could carry it
    cjk = "&q=" + "%E5%80%A4" * 200  # 1,800 octets of percent-encoded UTF-8

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, events), ClientSession() as http:
            body = (
                f'<a href="https://shop.example/p?{long_q}">a</a>'
                f'<a href="https://shop.example/p?{huge_q}">b</a>'
                f'<a href="https://shop.example/s?x=1{cjk}{cjk}">c</a>'
            )
            a, b, c = _hrefs(_render(tmp_path, base, body))
            assert await _follow(http, base, a) == (302, f"https://shop.example/p?{long_q}")
            assert b == f"https://shop.example/p?{huge_q}"  # untracked, but a working link
            assert await _follow(http, base, c) == (302, f"https://shop.example/s?x=1{cjk}{cjk}")
            clicked = [e["url"] for e in events if e["event"] == "clicked"]
            assert clicked == [f"https://shop.example/p?{long_q}",
                               f"https://shop.example/s?x=1{cjk}{cjk}"]  # fmt: skip

    _run(main())


def test_the_link_tracked_is_the_attribute_named_href(tmp_path: Path) -> None:
    """The rewriting searched the tag for the first "href=" anywhere: a ``data-href``
    (or ``xlink:href``, or "href=" inside a title) before the real href was rewritten
    instead, so the link the reader follows went untracked and the data attribute
    changed. An unquoted href (valid HTML) and one padded with spaces (browsers strip
    them) were left untracked. Now the attribute named href is the one tracked, and
    the rest of the tag is left as written."""
    body = (
        '<a data-href="https://data.example/x" href="https://example.com/one">1</a>'
        '<a title="see href=\'https://title.example/\'" href="https://example.com/two">2</a>'
        "<a href=https://example.com/three class=c>3</a>"
        '<a href="\n  https://example.com/four?a=1&amp;b=2  ">4</a>'
        '<a HREF="https://example.com/five" href="https://dup.example/">5</a>'
        '<a/href="https://example.com/six">6</a>'
        "<a data-fs-notrack href='https://example.com/seven'>7</a>"
        '<a title="data-fs-notrack" href="https://example.com/eight">8</a>'
    )

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, _events), ClientSession() as http:
            out = _render(tmp_path, base, body)
            assert 'data-href="https://data.example/x"' in out
            assert "title=\"see href='https://title.example/'\"" in out
            assert "class=c>" in out
            got = []
            for link in _hrefs(out):
                if link.startswith(base):
                    status, location = await _follow(http, base, link)
                    assert status == 302
                    got.append(location)
                else:
                    got.append("untracked " + link)
            assert got == [
                "https://example.com/one",
                "https://example.com/two",
                "https://example.com/three",
                "https://example.com/four?a=1&b=2",
                "https://example.com/five",
                "https://example.com/six",
                "untracked https://example.com/seven",
                "https://example.com/eight",
            ]

    _run(main())


def test_a_redirect_encodes_what_a_browser_would(tmp_path: Path) -> None:
    """An ASCII URL with quotes or angle brackets in its query (an author's unescaped
    search link) was sent in Location as written, though every other URL is sent as
    a browser asks for it (WHATWG percent-encode sets): now the same for these."""
    assert ascii_url('https://example.com/q?x="y"<z>') == "https://example.com/q?x=%22y%22%3Cz%3E"
    assert ascii_url("https://example.com/a{b}?c=d'e#f`g") == (
        "https://example.com/a%7Bb%7D?c=d%27e#f%60g"
    )
    plain = "https://example.com/a/b?c=d&e=%20f#g"
    assert ascii_url(plain) == plain

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, _events), ClientSession() as http:
            body = '<a href="https://example.com/q?x=&quot;y&quot;&lt;z&gt;">q</a>'
            (link,) = _hrefs(_render(tmp_path, base, body))
            want = "https://example.com/q?x=%22y%22%3Cz%3E"
            assert await _follow(http, base, link) == (302, want)

    _run(main())


APPLE_MPP = "Mozilla/5.0"
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
BROWSER = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"


def test_opens_and_clicks_say_whether_the_request_was_softwares(tmp_path: Path) -> None:
    """An opened/clicked event (the event log, /v1/events, every webhook) carried the
    User-Agent only: a webhook receiver could not tell Apple Mail Privacy Protection's
    prefetch or a link scanner from a reader without rules of its own, and counted
    them as opens and clicks. Each now says which machine rule the request alone
    matches (the rules /v1/stats uses, the operator's first), "" for a person's
    client and for Gmail's image proxy (it fetches when the reader opens)."""

    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            mid = _message(ctx)
            del events[:]
            o = tr.sign(SECRET, tr.OPEN, str(mid), "ann@example.org", tenant="acme")
            for ua in (APPLE_MPP, GMAIL_PROXY, BROWSER, "", "Barracuda Sentinel (EE)"):
                async with http.get(f"{base}/t/o/{o}.gif", headers={"User-Agent": ua}) as r:
                    assert r.status == 200
            url = "https://example.com/a"
            c = tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", url, tenant="acme")
            for ua in ("python-requests/2.31.0", BROWSER):
                async with http.get(f"{base}/t/c/{c}", headers={"User-Agent": ua},
                                    allow_redirects=False) as r:  # fmt: skip
                    assert r.status == 302
            got = [(e["event"], e["machine"]) for e in events]
            assert got == [
                ("opened", "apple-mpp"),
                ("opened", ""),
                ("opened", ""),
                ("opened", "no-user-agent"),
                ("opened", "scanner-agent"),
                ("clicked", "scanner-agent"),
                ("clicked", ""),
            ]

    _run(main())


def test_a_one_click_post_with_no_form_type_unsubscribes(tmp_path: Path) -> None:
    """RFC 8058's one-click POST carries the body "List-Unsubscribe=One-Click"; one
    sent with no Content-Type or text/plain (a hand-made client, a proxy that drops
    the header) was answered 400 and the address stayed on the list. The body is
    now read as a form whatever its type; anything else is still refused."""

    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            cases = [({"Content-Type": ""}, b"List-Unsubscribe=One-Click", 200),
                     ({"Content-Type": "text/plain"}, b"List-Unsubscribe=One-Click\r\n", 200),
                     ({"Content-Type": "text/plain"}, b"", 400),
                     ({"Content-Type": "text/plain"}, b"List-Unsubscribe=Yes", 400)]  # fmt: skip
            for i, (headers, body, want) in enumerate(cases):
                mid = _message(ctx)
                rcpt = f"u{i}@example.org"
                u = tr.sign(SECRET, tr.UNSUBSCRIBE, str(mid), rcpt, tenant="acme")
                async with http.post(f"{base}/u/{u}", data=body, headers=headers) as r:
                    assert r.status == want, (headers, body)
                assert ctx.suppression.contains(rcpt, tenant="acme") is (want == 200)
            assert [e["rcpt"] for e in events if e["event"] == "unsubscribed"] == [
                "u0@example.org", "u1@example.org"]  # fmt: skip

    _run(main())


TEXT = """Hi {{ name }},
See https://example.com/a?x=1&y=2. Or (https://example.com/wiki/Foo_(bar)), or
<https://example.com/angle>, "https://example.com/q?u={{ v }}"!
Personal: https://example.com/p/{{ v }}/end
Unsubscribe: {{ unsubscribe_url }}
Mail: mailto:x@example.com ftp://example.com/x
"""


def test_text_links_tracks_the_text_parts_links(tmp_path: Path) -> None:
    """Clicks were counted in the HTML part only: a reader of the text part (a
    text-only client, a watch, a screen reader's choice) clicked links no one
    counted. ``[tracking] text_links = true`` tracks the text part's http(s) URLs
    as a client linkifies them (the sentence's punctuation and enclosing brackets
    stay outside, a URL's own balanced parentheses inside; values percent-encoded
    as in a link), each redirecting to its own target; the unsubscribe URL and
    other schemes are left alone. Without it the text part is as written."""
    key = tmp_path / "tracking.key"
    key.write_bytes(SECRET)

    def text_of(base: str, **extra: bool) -> str:
        camp = Campaign.from_dict({
            "from": "a@example.com", "subject": "s", "text": TEXT, "html": "<p>x</p>",
            "tracking": {"base_url": base, "clicks": True, "unsubscribe": True,
                         "secret_file": str(key), **extra},
        })  # fmt: skip
        data = camp.compile().render("ann@example.org", {"v": "ü x", "name": "A"}, "5")
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        part = msg.get_body(("plain",))
        assert part is not None
        text = part.get_content()
        assert isinstance(text, str)
        return text

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, events), ClientSession() as http:
            https = base.replace("http://", "https://")  # (unsubscribe links need https)
            plain = text_of(https)
            assert "See https://example.com/a?x=1&y=2. Or" in plain
            text = text_of(https, text_links=True)
            links = re.findall(re.escape(https) + r"/t/c/[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+", text)
            got = [await _follow(http, base, base + u[len(https) :]) for u in links]
            assert got == [
                (302, "https://example.com/a?x=1&y=2"),
                (302, "https://example.com/wiki/Foo_(bar)"),
                (302, "https://example.com/angle"),
                (302, "https://example.com/q?u=%C3%BC%20x"),
                (302, "https://example.com/p/%C3%BC%20x/end"),
            ]
            assert re.search(r"/t/c/\S+\. Or \(https://", text)  # the period stays out
            assert re.search(
                r"Or \(https://[^\s()]+\), or\r?\n<https://\S+>, \"https://\S+\"!", text
            )
            assert re.search(re.escape("Unsubscribe: " + https) + "/u/", text)
            assert "mailto:x@example.com ftp://example.com/x" in text
            assert [e["event"] for e in events] == ["clicked"] * 5

    _run(main())


def test_outlooks_vml_buttons_are_tracked_and_links_showing_an_address_are_not(
    tmp_path: Path,
) -> None:
    """Two links a tracked campaign got wrong: (1) a "bulletproof button" (the VML
    <v:roundrect href> in an <!--[if mso]> comment that Outlook for Windows draws
    instead of the <a> beside it) kept its href, so no click from Outlook for Windows
    was ever counted; (2) a link whose text shows an address (``<a href=X>X</a>``)
    was rewritten to the tracking host: Thunderbird's scam detection compares the
    text's host with the href's and flagged the message as a scam. VML hrefs are now
    tracked; a link showing a URL or www.host stays as written."""
    body = (
        '<!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml"'
        ' href="https://example.com/cta" arcsize="10%"><w:anchorlock/><center>Buy</center>'
        "</v:roundrect><![endif]-->"
        '<a href="https://example.com/cta" style="mso-hide:all">Buy</a>'
        '<a href="https://example.com/shown">https://example.com/shown</a>'
        '<a href="https://example.com/www"> <b>www.example.com</b> </a>'
        '<a href="https://example.com/words">Our shop: example.com</a>'
    )

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, _events), ClientSession() as http:
            out = _render(tmp_path, base, body)
            vml = re.search(r'<v:roundrect [^>]*href="([^"]+)"', out)
            assert vml is not None
            assert await _follow(http, base, vml.group(1)) == (302, "https://example.com/cta")
            links = _hrefs(out)
            assert links[1:3] == ["https://example.com/shown", "https://example.com/www"]
            assert await _follow(http, base, links[0]) == (302, "https://example.com/cta")
            assert await _follow(http, base, links[3]) == (302, "https://example.com/words")

    _run(main())
