"""Session 15's outside audit of the messages area: each test on a defect it
found, on the bytes a real receiver (aiosmtpd) got from the real ``fastsend
send`` / ``fastsend serve``, read back with Python's ``email``,
``html.parser`` and ``urllib.parse``:

- a value placed inside an HTML URL (``href="...?q={{ q }}"``) was only
  HTML-escaped: ``&`` and ``=`` in it added query parameters, ``/`` and
  ``?`` moved it out of its path segment, ``/`` in a host part sent the link
  to another host; a tracked link's target the same;
- a value in ``<script>``, an ``on*`` attribute, ``<style>`` or a ``style``
  attribute was only HTML-escaped (entities mean nothing in a script, and
  ``;`` in CSS starts a declaration of the recipient's choosing);
- raw MIME with UTF-8 header text (RFC 6532) went with BODY=8BITMIME but
  without SMTPUTF8 (RFC 6531 3.4).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._serve_helpers import Served

from _message_helpers import use_impl
from _smtp_helpers import RecordingHandler
from conftest import free_port
from fastsend import _accel
from fastsend.message import Campaign, RenderError
from test_message_audit import receiver, send, wait_for
from test_message_audit14 import _html_and_text, elements

__all__ = ["receiver"]  # (a fixture, used by name)

URL_HTML = (
    '<a href="https://shop.example/search?q={{ q }}&lang=en#r-{{ q }}">s</a>\n'
    '<a href="https://shop.example/u/{{ user }}/prefs">p</a>\n'
    '<a href="https://{{ sub }}.shop.example/">h</a>\n'
    '<a href="{{ link }}">w</a>\n'
    '<a href="mailto:{{ box }}?subject={{ q }}">m</a>\n'
    "<img src=https://cdn.example/{{ user }}.png>\n"
)
NASTY = [
    "a&admin=1",
    "x y?z=1#f",
    "../../admin/delete",
    "evil.example/x?",
    "ünï/cödé %41 +",
    "a@b:c;d,e",
    "\"'><img src=x>",
]


def _dot_segment(v: str) -> bool:
    """A value with a '.' or '..' path segment: refused in a URL's path."""
    return bool({".", ".."} & set(v.split("/")))


def _attrs(html: str, tag: str = "") -> list[dict[str, str | None]]:
    return [dict(a) for t, a in elements(html) if not tag or t == tag]


def _check_urls(html: str, v: str) -> None:
    a = _attrs(html)
    search = urlsplit(a[0]["href"] or "")
    assert search.netloc == "shop.example" and search.path == "/search", html
    assert parse_qs(search.query, keep_blank_values=True) == {"q": [v], "lang": ["en"]}, html
    assert unquote(search.fragment) == f"r-{v}", html
    prefs = urlsplit(a[1]["href"] or "")
    assert prefs.netloc == "shop.example" and prefs.path.endswith("/prefs"), html
    segs = prefs.path.split("/")
    assert segs[:2] == ["", "u"] and "." not in segs and ".." not in segs, html  # no climbing
    assert not (v.startswith("/") and prefs.path.startswith("/u//")), html  # leading '/': no '//'
    assert unquote(prefs.path) == f"/u/{v}/prefs", html
    host = urlsplit(a[2]["href"] or "")
    assert host.netloc.endswith(".shop.example") and host.path == "/", html
    assert a[3]["href"] == "https://www.example/landing?a=1&b=2", html  # a whole URL: as it is
    mail = urlsplit(a[4]["href"] or "")
    assert mail.scheme == "mailto" and unquote(mail.path) == "ann+x@example.org", html
    assert parse_qs(mail.query, keep_blank_values=True) == {"subject": [v]}, html
    img = urlsplit(a[5]["src"] or "")
    assert img.netloc == "cdn.example" and not img.path.startswith("//"), html
    assert unquote(img.path) == f"/{v}.png", html


def test_values_in_html_urls_are_percent_encoded_for_their_part(
    impl: str, tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """A value in a URL's query or fragment is one component (its ``&``, ``=``,
    ``#`` encoded), in its path no ``?``/``#`` nor dot segment, in its host
    part no ``/``: each reads back as the value itself with ``urllib``; a
    whole URL given as a value stays as it is; the text part is unchanged.
    Before: ``q=a&admin=1`` added the parameter ``admin``, ``sub`` sent the
    link to evil.example, ``user`` climbed out of ``/u/``."""
    port, handler = receiver
    camp = (
        'from = "News <news@sender.example>"\nsubject = "Hi"\n'
        'text = "q={{ q }} u={{ user }}"\n'
        f"html = '''{URL_HTML}'''\n"
    )
    rows = ["email,q,user,sub,link,box"]
    for i, v in enumerate(NASTY):
        q = v.replace('"', '""')
        rows.append(f'r{i}@example.net,"{q}","{q}",www{i},'
                    f'"https://www.example/landing?a=1&b=2",ann+x@example.org')  # fmt: skip
    rows.append("h@example.net,x,y,evil.example/x?,https://www.example/,a@b.example")
    proc = send(tmp_path, camp, "\n".join(rows) + "\n", port, impl, "--no-dkim")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    got = {m["rcpts"][0]: m["data"]
           for m in wait_for(handler, len(NASTY) + 1 - sum(map(_dot_segment, NASTY)))}
    for i, v in enumerate(NASTY):
        if _dot_segment(v):  # refused: it would climb out of /u/ (that recipient fails)
            assert f"r{i}@example.net" not in got
            continue
        html, text = _html_and_text(got[f"r{i}@example.net"])
        assert f"q={v} u={v}" in text
        _check_urls(html, v)
    html, _ = _html_and_text(got["h@example.net"])
    assert urlsplit(_attrs(html)[2]["href"] or "").netloc == "evil.example%2Fx%3F.shop.example"


_DATE = re.compile(rb"Date: [^\r]*\r\n")
_VALUE = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=40)


@settings(max_examples=150, deadline=None)
@given(v=st.one_of(_VALUE, st.text(st.sampled_from(list("&=?#/%+@:;, .<>\"'\\x")), max_size=30)))
def test_url_components_read_back_as_the_value(v: str) -> None:
    """Whatever the value, both twins make the same bytes and each URL part
    reads back as the value (no parameter, segment or host added)."""
    spec = {"from": "n@example.com", "subject": "s", "text": "t", "html": URL_HTML}
    r = Campaign.from_dict(spec).compile()
    variables = {"q": v, "user": v, "sub": "www", "box": "ann+x@example.org",
                 "link": "https://www.example/landing?a=1&b=2"}  # fmt: skip
    out = []
    for impl in ("py", "c") if _accel.HAVE_EXTENSIONS else ("py",):
        mp = pytest.MonkeyPatch()
        try:
            use_impl(mp, impl)
            r._assemble()
            try:
                out.append(_DATE.sub(b"", r.render("r@example.org", variables, "m-1")))
            except RenderError as e:  # a dot segment in the path: refused
                assert _dot_segment(v) and "in a URL's path" in str(e), e
                out.append(b"")
        finally:
            mp.undo()
    assert out[0] == out[-1]
    if not out[0]:
        return
    html, _ = _html_and_text(out[0])
    _check_urls(html, v)


def test_tracked_link_target_has_its_values_percent_encoded(tmp_path: Path) -> None:
    """With click tracking the signed target URL is built the same way: a
    value in its query is one component. Before: the redirect went to
    ``?q=a&admin=1``."""
    from fastsend.message import tracking

    key = tmp_path / "tracking.key"
    key.write_bytes(b"k" * 32)
    c = Campaign.from_dict({
        "from": "News <news@example.com>", "subject": "Hi", "text": "t",
        "html": '<a href="https://shop.example/p/{{ item }}?q={{ q }}">go</a>',
        "tracking": {"base_url": "https://t.example", "clicks": True, "opens": False,
                     "secret_file": str(key)},
    })  # fmt: skip
    r = c.compile()
    data = r.render("r@example.org", {"item": "shoes/x?1", "q": "a&admin=1"}, "m-1")
    html, _ = _html_and_text(data)
    href = _attrs(html)[0]["href"] or ""
    token = href.rsplit("/", 1)[1]
    kind, fields = tracking.verify(b"k" * 32, token)  # type: ignore[misc]
    target = urlsplit(fields[2])
    assert kind == "c" and parse_qs(target.query) == {"q": ["a&admin=1"]}, fields
    assert target.path == "/p/shoes/x%3F1", fields
    with pytest.raises(RenderError, match=r"a '\.' or '\.\.' segment"):
        r.render("r@example.org", {"item": "../x", "q": "a"}, "m-1")


# -- JavaScript and CSS contexts ---------------------------------------------------------

JS_CSS_HTML = (
    "<script>var who = \"{{ name }}\"; var n = '{{ name }}';</script>\n"
    '<p onclick="track(\'{{ name }}\')" style="color: {{ color }}">x</p>\n'
    "<style>.hero { background: url({{ img }}) no-repeat; color: {{ color }} }</style>\n"
    "<div style=\"background-image:url('{{ img }}')\">y</div>\n"
)
JS_NASTY = ['"; alert(1); "', "'); alert(1); ('", "</script><script>alert(1)</script>",
            "a\\u0022b", "`${alert(1)}`", "Zoë\u2028x", "-->"]  # fmt: skip


def _render(spec: dict[str, Any], variables: dict[str, str]) -> bytes:
    return Campaign.from_dict(spec).compile().render("r@example.org", variables, "m-1")


def _js_strings(script: str) -> list[str]:
    """The string literals of a script made of ``var x = "..."`` statements,
    read as JSON (a \\uXXXX escape is valid in both)."""
    return [json.loads('"' + s + '"') for s in re.findall(r"[\"']((?:[^\"'\\]|\\.)*)[\"']", script)]


@pytest.mark.parametrize("name", JS_NASTY)
def test_values_in_scripts_are_javascript_string_escaped(
    impl: str, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """In ``<script>`` and an ``on*`` attribute a value is written with
    JavaScript escapes: it cannot end its string or the script, and reads
    back as itself. Before: HTML-escaped only (``&quot;`` in a script is no
    quote to the reader, ``'`` ended the string in the onclick)."""
    use_impl(monkeypatch, impl)
    spec = {"from": "n@example.com", "subject": "s", "text": "t", "html": JS_CSS_HTML}
    html, _ = _html_and_text(_render(spec, {"name": name, "color": "red", "img": "a.png"}))
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    assert (
        "</script" not in html.split("<script>", 1)[1].split("</script>", 1)[1].split("<style>")[0]
    )
    assert _js_strings(script) == [name, name], script
    onclick = _attrs(html, "p")[0]["onclick"] or ""
    assert onclick.startswith("track('") and onclick.endswith("')"), onclick
    assert _js_strings(onclick) == [name], onclick


@pytest.mark.parametrize(
    ("color", "img", "ok"),
    [
        ("#ff0000", "https://cdn.example/a.png", True),
        ("rgb 1 2", "/img/hero image.png", True),
        ("red; background:url(https://evil.example/)", "a.png", False),
        ("red}body{display:none", "a.png", False),
        ("red", "a.png) ; background:red; x:url(b", True),
        ("red", "javascript:alert(1)", False),
        ("red", "x' onmouseover='y", True),
    ],
)
def test_values_in_css_are_refused_or_encoded(
    impl: str, monkeypatch: pytest.MonkeyPatch, color: str, img: str, ok: bool
) -> None:
    """A CSS value takes only what a colour, size or font needs (a value that
    could end the declaration, a rule or open a function fails that
    recipient with a clear error); a URL in ``url()`` is checked like a
    link and percent-encoded so it cannot leave the ``url()``. Before:
    ``red; background:url(...)`` added a declaration."""
    use_impl(monkeypatch, impl)
    spec = {"from": "n@example.com", "subject": "s", "text": "t", "html": JS_CSS_HTML}
    vs = {"name": "n", "color": color, "img": img}
    if not ok:
        with pytest.raises(RenderError, match=r"CSS|only http, https"):
            _render(spec, vs)
        return
    html, _ = _html_and_text(_render(spec, vs))
    style = html.split("<style>", 1)[1].split("</style>", 1)[0]
    m = re.fullmatch(
        r"\.hero \{ background: url\(([^()'\" ]*)\) no-repeat; color: ([^;{}]*) \}", style
    )
    assert m is not None, style
    assert unquote(m.group(1)) == img and m.group(2) == color, style
    div = _attrs(html, "div")[0]["style"] or ""
    m2 = re.fullmatch(r"background-image:url\('([^()'\" ]*)'\)", div)
    assert m2 is not None and unquote(m2.group(1)) == img, div
    assert _attrs(html, "p")[0]["style"] == f"color: {color}"


def test_js_css_twins_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled writer's fast path declines what it would write
    differently: both twins make the same bytes or refuse alike."""
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    spec = {"from": "n@example.com", "subject": "s", "text": "t", "html": JS_CSS_HTML}
    r = Campaign.from_dict(spec).compile()
    for name in [*JS_NASTY, "plain", "a.b_c", "x y"]:
        for color, img in [("red", "a.png"), ("#fff", "https://c.example/x?y=1&z=2"),
                           ("1px;", "a.png"), ("red", "data:x")]:  # fmt: skip
            out = []
            for impl in ("py", "c"):
                use_impl(monkeypatch, impl)
                r._assemble()
                try:
                    out.append(r.render("r@example.org", {"name": name, "color": color,
                                                          "img": img}, "m-1"))  # fmt: skip
                except RenderError as e:
                    out.append(str(e).encode())
            assert out[0] == out[1], (name, color, img)


# -- SMTPUTF8 for raw MIME with UTF-8 header text ----------------------------------------


def test_raw_utf8_header_asks_for_smtputf8_or_fails_5_6_7(tmp_path: Path) -> None:
    """Raw MIME whose header has UTF-8 text (RFC 6532) goes with SMTPUTF8 to a
    server offering it, and is not sent to one that does not (5.6.7, RFC
    6531 3.2); a 7-bit header with an 8-bit body needs no SMTPUTF8.
    Before: BODY=8BITMIME only, to both."""
    from aiosmtpd.controller import Controller

    class Handler(RecordingHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.messages.append({"data": envelope.original_content,
                                  "rcpts": list(envelope.rcpt_tos),
                                  "mail_options": list(envelope.mail_options)})  # fmt: skip
            return "250 2.0.0 Ok"

    utf8 = "From: Zoë <app@sender.example>\r\nSubject: Grüße\r\n\r\nhello\r\n"
    plain = "From: app@sender.example\r\nSubject: s\r\n\r\nGrüße\r\n"
    for offer in (True, False):
        port = free_port()
        handler = Handler()
        ctl = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=offer)
        ctl.start()
        d = tmp_path / str(offer)
        d.mkdir()
        s = Served(d, f"127.0.0.1:{port}")
        try:
            for rcpt, raw in (("u@example.net", utf8), ("p@example.net", plain)):
                st_, got = s.req("POST", "/v1/messages",
                                 {"from": "app@sender.example", "to": [rcpt], "raw": raw},
                                 tenant="acme")  # fmt: skip
                assert st_ == 202, got
            if offer:
                ms = {m["rcpts"][0]: m for m in wait_for(handler, 2)}
                assert "SMTPUTF8" in ms["u@example.net"]["mail_options"]
                assert "Grüße".encode() in ms["u@example.net"]["data"]
                assert "SMTPUTF8" not in ms["p@example.net"]["mail_options"]
            else:
                events = d / "spool" / "events.jsonl"
                deadline = time.monotonic() + 30
                while '"5.6.7"' not in (events.read_text() if events.exists() else ""):
                    assert time.monotonic() < deadline, events.read_text()[-2000:]
                    time.sleep(0.1)
                (m,) = wait_for(handler, 1)
                assert m["rcpts"] == ["p@example.net"]
                bad = [ln for ln in events.read_text().splitlines() if '"5.6.7"' in ln]
                assert len(bad) == 1 and "u@example.net" in bad[0], bad
        finally:
            s.stop()
            ctl.stop()


# -- Outlook conditional comments ---------------------------------------------------------

MSO_HTML = (
    "<!--[if mso]>\n"
    '<v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://shop.example/?q={{ q }}"'
    ' style="height:40px"><center>{{ name }}</center></v:roundrect>\n'
    "<v:image src={{ name }} />\n"
    "<![endif]-->\n"
    '<!--[if !mso]><!--><a href="https://shop.example/?q={{ q }}">{{ name }}</a><!--<![endif]-->\n'
)


@pytest.mark.parametrize("name", ["x onerror=alert(1)", '"><img src=x>', "Ann"])
def test_values_in_outlook_conditional_comments_are_escaped_as_markup(
    impl: str, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """``<!--[if mso]> ... <![endif]-->`` is a comment to a browser and markup
    to Outlook (VML buttons, images): a value there is escaped as in markup
    (unquoted attribute, URL component, link scheme). Before: escaped as
    comment text (``x onerror=...`` added an attribute in Outlook, ``?q=``
    took extra parameters, a ``javascript:`` href passed)."""
    use_impl(monkeypatch, impl)
    spec = {"from": "n@example.com", "subject": "s", "text": "t", "html": MSO_HTML}
    q = "a&admin=1"
    html, _ = _html_and_text(_render(spec, {"name": name, "q": q}))
    mso = html.split("<!--[if mso]>", 1)[1].split("<![endif]-->", 1)[0]
    tags = elements(mso)
    assert [t for t, _ in tags] == ["v:roundrect", "center", "v:image"], mso
    rr, img = dict(tags[0][1]), dict(tags[2][1])
    assert parse_qs(urlsplit(rr["href"] or "").query) == {"q": [q]}, mso
    assert img == {"src": name}, mso
    link = _attrs(html.split("<!--[if !mso]><!-->", 1)[1], "a")[0]["href"] or ""
    assert parse_qs(urlsplit(link).query) == {"q": [q]}, html
    bad = {**spec, "html": '<!--[if mso]><v:roundrect href="{{ u }}"/><![endif]-->'}
    with pytest.raises(RenderError, match="only http, https"):
        _render(bad, {"u": "javascript:alert(1)"})
