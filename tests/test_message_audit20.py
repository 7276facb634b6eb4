"""Session 20's outside audit of messages and addresses: each test on a defect
it found, failing before its fix.

- ``u@1.2.3.4`` (a dotted quad where a domain name goes) was accepted by every
  accept path, looked up as a name and bounced 5.1.2 later (with ``--route``
  it was even delivered); ``u@example.123`` alike. A top-level domain is never
  numeric (RFC 1123 2.1, RFC 3696 2): refused at accept, the error naming the
  address literal form ``u@[1.2.3.4]``, which is accepted and delivered to that
  address (RFC 5321 4.1.3);
- an IPv6 literal without its ``IPv6:`` tag (``u@[::1]``) and an IPv4 address
  with it were accepted; one literal written two ways (``[IPv6:2001:DB8:0::1]``,
  ``[ipv6:2001:db8::1]``) was two recipients; a recipient at an IPv6 literal
  failed to render ("invalid domain", 550): it goes to that address;
- the suppression list refused address literals and quoted local parts: a
  recipient ``u@[192.0.2.1]`` or ``"john doe"@example.com`` who unsubscribed
  or hard-bounced was not suppressed (``add_entries`` skips what it cannot
  key; the one-click POST answered 400), and the mail went on;
- an HTML-only campaign went out as a lone text/html part (SpamAssassin's
  MIME_HTML_ONLY, nothing for a text-only reader): it gets a text/plain
  alternative said from its HTML (``message/htmltext.py``);
- a campaign could not carry an inline image (``<img src="cid:logo">``): an
  attachment's ``cid`` makes it one, in a multipart/related with the HTML.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _smtp_helpers import RecordingHandler
from conftest import free_port
from fastsend import _accel, suppression
from fastsend.address import AddressError, py_normalize
from fastsend.message.keys import generate, write_key
from test_message_audit import dkim_tables, keys, receiver, send, verdicts, wait_for
from test_serve_api import MSG, Client, arun

__all__ = ["keys", "receiver"]  # (fixtures, used by name)

CAMPAIGN = 'from = "news@sender.example"\nsubject = "Hi {{ name }}"\ntext = "Hello {{ name }}\\n"\n'


def _twins() -> list[Any]:
    out: list[Any] = [py_normalize]
    if _accel.HAVE_EXTENSIONS:
        out.append(_accel.compiled("normalize"))
    return out


# ---------------------------------------------------------------- numeric domains, literals


@pytest.mark.parametrize(
    "addr", ["u@1.2.3.4", "U@1.2.3.4.", "u@192.0.2.1", "u@10.0.0.1", "u@example.123", "u@x.1abc"]
)
def test_a_numeric_top_level_domain_is_refused(addr: str) -> None:
    for normalize in _twins():
        with pytest.raises(AddressError) as err:
            normalize(addr)
        assert repr(addr) in str(err.value), err.value
        if addr.count(".") >= 3 and addr.rstrip(".").split("@")[1].replace(".", "").isdigit():
            ip = addr.split("@")[1].rstrip(".")
            assert f"[{ip}]" in str(err.value), err.value  # says how to write it


@pytest.mark.parametrize(
    "addr,want",
    [
        ("u@[192.0.2.1]", "u@[192.0.2.1]"),
        ("u@[IPv6:2001:DB8::1]", "u@[ipv6:2001:db8::1]"),
        ("u@[IPv6:2001:db8:0:0::1]", "u@[ipv6:2001:db8::1]"),
        ("u@[ipv6:2001:0db8::0001]", "u@[ipv6:2001:db8::1]"),
    ],
)
def test_an_address_literal_is_accepted_in_one_form(addr: str, want: str) -> None:
    for normalize in _twins():
        assert normalize(addr) == (want, want.split("@")[1])


@pytest.mark.parametrize("addr", ["u@[::1]", "u@[2001:db8::1]", "u@[IPv6:192.0.2.1]", "u@[1.2.3]",
                                  "u@[01.2.3.4]", "u@[example.org]", "u@[]"])  # fmt: skip
def test_a_malformed_address_literal_is_refused(addr: str) -> None:
    """RFC 5321 4.1.3: an IPv6 address only after the ``IPv6:`` tag."""
    for normalize in _twins():
        with pytest.raises(AddressError, match="address literal"):
            normalize(addr)


def test_a_recipient_at_an_ipv6_literal_is_delivered_there(tmp_path: Path) -> None:
    """``u@[IPv6:::1]`` (held as ``u@[ipv6:::1]``) failed at render, 550 "invalid
    domain '[ipv6:::1]'" (the header check knew the tag in capitals only): it is
    sent to that address, as an MX's (non-public: allow_private_mx)."""
    from _smtp_helpers import aiosmtpd_server

    port = free_port()  # (a port of this worker's slice; bound on ::1 here)
    with aiosmtpd_server(port, host="::1") as (_ctl, handler):
        (tmp_path / "c.toml").write_text(CAMPAIGN + 'to = "{{ name }} <{{ email }}>"\n')
        (tmp_path / "r.csv").write_text("email,name\nu@[IPv6:0:0::1],U\n")
        (tmp_path / "f.toml").write_text(
            f"[dns]\nmx_port = {port}\ntimeout = 1\n[delivery]\nallow_private_mx = true\n"
        )
        p = _run(tmp_path, "send", "c.toml", "-r", "r.csv", "-c", "f.toml", "--spool", "sp", "--json",
                 "--no-progress", "--workers", "1", "--max-wait", "3", "--no-dkim")  # fmt: skip
        assert json.loads(p.stdout)["delivered"] == 1, (p.stdout, p.stderr, _log(tmp_path))
        (m,) = handler.messages
        assert m["rcpts"] == ["u@[ipv6:::1]"]
        assert b"\r\nTo: U <u@[ipv6:::1]>\r\n" in m["data"]


def test_send_refuses_a_dotted_quad_recipient_and_sends_the_rest(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """``fastsend send`` with ``--route``: ``u@1.2.3.4`` had been delivered (to
    the route) and, by MX, bounced 5.1.2; it is a bad row naming the literal."""
    port, handler = receiver
    (tmp_path / "c.toml").write_text(CAMPAIGN)
    (tmp_path / "r.csv").write_text("email,name\nu@1.2.3.4,U\nok@x.example,O\nv@[127.0.0.1],V\n")
    p = subprocess.run(
        [sys.executable, "-m", "fastsend", "send", str(tmp_path / "c.toml"), "-r",
         str(tmp_path / "r.csv"), "--route", f"*=127.0.0.1:{port}", "--spool",
         str(tmp_path / "spool"), "--json", "--no-progress", "--workers", "1", "--max-wait", "3",
         "--no-dkim"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = json.loads(p.stdout)
    assert out["delivered"] == 2 and out["rejected_rows"] == 1, (p.stdout, p.stderr)
    assert "line 2" in p.stderr and "[1.2.3.4]" in p.stderr, p.stderr
    assert sorted(r for m in handler.messages for r in m["rcpts"]) == [
        "ok@x.example",
        "v@[127.0.0.1]",
    ]


def test_api_refuses_a_dotted_quad_recipient(tmp_path: Path) -> None:
    async def go(c: Client) -> None:
        status, body = await c.req("POST", "/v1/messages", {**MSG, "to": "u@1.2.3.4"})
        assert status == 400, (status, body)
        assert "[1.2.3.4]" in json.dumps(body), body
        status, body = await c.req("POST", "/v1/messages", {**MSG, "to": "u@[192.0.2.1]"})
        assert status == 202, (status, body)

    arun(tmp_path, go)


# ---------------------------------------------------------------- suppression of literals


def test_a_recipient_at_an_address_literal_can_be_suppressed(tmp_path: Path) -> None:
    """An unsubscribe or a hard bounce of ``u@[192.0.2.1]`` was dropped: the
    suppression list refused the address (``add_entries`` skips it silently)."""
    s = suppression.SuppressionList(str(tmp_path / "s.db"))
    try:
        got = s.add_entries([("default", "u@[192.0.2.1]", suppression.UNSUBSCRIBE, "unsubscribe", None),
                             ("default", "V@[IPv6:2001:DB8:0::1]", "hard-bounce", "bounce-delivery", 7)])  # fmt: skip
        assert [e.address for e in got] == ["u@[192.0.2.1]", "V@[ipv6:2001:db8::1]"]
        # looked up as the spool holds them (address.normalize's form)
        assert s.contains_many(["u@[192.0.2.1]", "v@[ipv6:2001:db8::1]", "w@[192.0.2.1]"]) == {
            "u@[192.0.2.1]",
            "v@[ipv6:2001:db8::1]",
        }
        assert s.contains("V@[ipv6:2001:db8:0:0:0:0:0:1]")
        with pytest.raises(suppression.SuppressionError):
            s.add("u@[::1]")
    finally:
        s.close()


def test_a_recipient_with_a_quoted_local_part_can_be_suppressed(tmp_path: Path) -> None:
    """``"john doe"@example.com`` is a recipient the list and the API accept; its
    one-click unsubscribe answered 400 ("cannot unsubscribe this address") and its
    hard bounce was dropped: the suppression list refused the address."""
    s = suppression.SuppressionList(str(tmp_path / "s.db"))
    try:
        rcpts = ['"john doe"@example.com', '"a@b"@example.com', '"x\\"y"@example.com']
        for r in rcpts:
            assert py_normalize(r)[0] == r  # (as the spool holds it)
        s.add(rcpts[0], suppression.UNSUBSCRIBE, source="unsubscribe")
        got = s.add_entries(
            [("default", r, "hard-bounce", "bounce-delivery", 1) for r in rcpts[1:]]
        )
        assert [e.address for e in got] == rcpts[1:]
        assert s.contains_many([*rcpts, '"jane doe"@example.com']) == set(rcpts)
        assert s.contains('"John Doe"@Example.COM')
        for bad in ['"unclosed@example.com', "a b@example.com", '"a"b@example.com']:
            with pytest.raises(suppression.SuppressionError):
                s.add(bad)
    finally:
        s.close()


# ---------------------------------------------------------------- text part from HTML

HTML = """<!DOCTYPE html><html><head><title>Offer</title><style>p { color: red }</style></head>
<body><div style="display:none;max-height:0">Preheader for {{ name }}</div>
<!--[if mso]><table><tr><td>Outlook only</td></tr></table><![endif]-->
<h1>Welcome,   {{ name | default("friend") }}!</h1>
<p>Hello {{ row["First Name"] }}, see <a href='https://x.example/a?b=1&amp;c=2&id={{ id }}'>our
offer</a>.</p><script>var a = "{{ name }}";</script>
<p>Line one<br>Line two &amp; more&nbsp;text &lt;ok&gt;</p>
<ul><li>One</li><li>Two <a href="https://y.example/">https://y.example/</a></li>
<li>Three<ol><li>a</li><li>b</li></ol></li></ul>
<table><tr><td>Cell 1</td><td>Cell 2</td></tr>
<tr><td><a href="https://z.example/"><img src="logo.png" alt="Logo"></a></td></tr></table>
<p><a href="#top">Top</a> <a href="mailto:help@x.example">help@x.example</a>
<a href="{{ unsubscribe_url }}">Unsubscribe</a></p><pre>  kept
   as is</pre><p>{{ "{{" }} literal</p></body></html>"""

TEXT = """Welcome, {{ name | default("friend") }}!

Hello {{ row["First Name"] }}, see our offer (https://x.example/a?b=1&c=2&id={{ id }}).

Line one
Line two & more text <ok>

- One
- Two https://y.example/
- Three
  1. a
  2. b

Cell 1 Cell 2
[Logo] (https://z.example/)

Top help@x.example Unsubscribe ({{ unsubscribe_url }})

  kept
   as is

{{ "{{" }} literal
"""


def test_html_to_text_says_what_the_html_says_and_keeps_the_placeholders() -> None:
    from fastsend.message.htmltext import html_to_text

    assert html_to_text(HTML) == TEXT
    assert html_to_text("<img src='x.png'>") == ""


def test_text_that_reads_as_template_syntax_once_decoded_stays_text() -> None:
    """``&#123;&#123; x &#125;&#125;`` in HTML is the text "{{ x }}": in the text part
    too, not a placeholder (nor a bad one, nor another language's tag)."""
    import email

    from fastsend.accept import check_campaign
    from fastsend.message.campaign import Campaign

    html = "<p>&#123;&#123; x &#125;&#125; &#123;% if %&#125; *&#124;F&#124;* &#123;{{ y }}</p>"
    c = Campaign.from_dict({"from": "n@sender.example", "subject": "s", "html": html})
    check_campaign(c)
    msg = email.message_from_bytes(c.compile().render("a@example.org", {"y": "Y"}, "1-a"))
    text = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    assert text.get_payload(decode=True).decode().splitlines() == ["{{ x }} {% if %} *|F|* {Y"]


def test_an_html_only_campaign_gets_a_text_alternative() -> None:
    """An HTML-only campaign went out as one text/html part (SpamAssassin's
    MIME_HTML_ONLY; nothing for a text-only reader). It gets a text/plain
    alternative said from the HTML, its values not HTML-escaped."""
    import email
    import email.policy

    from fastsend.message.campaign import Campaign

    c = Campaign.from_dict({"from": "News <news@sender.example>", "subject": "Hi",
                            "html": "<p>Hello {{ name }}, see <a href='https://x.example/'>this</a></p>"})  # fmt: skip
    data = c.compile().render("a@example.org", {"name": "Zoë <&>"}, "1-abc")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/alternative"
    parts = {p.get_content_type(): p.get_content() for p in msg.iter_parts()}  # type: ignore[attr-defined]
    assert parts["text/plain"].splitlines() == ["Hello Zoë <&>, see this (https://x.example/)"]
    assert "Zoë &lt;&amp;&gt;" in parts["text/html"]
    # the spooled spec sends the same text; text_from_html = false keeps it out, spooled too
    assert Campaign.from_dict(c.to_dict()).to_dict()["text"] == c.to_dict()["text"]
    off = Campaign.from_dict({"from": "n@sender.example", "subject": "x", "html": "<p>x</p>",
                              "text_from_html": False})  # fmt: skip
    assert "text" not in Campaign.from_dict(off.to_dict()).to_dict()
    data = off.compile().render("a@example.org", {}, "1-abc")
    assert email.message_from_bytes(data).get_content_type() == "text/html"


def test_a_foreign_tag_in_html_is_reported_in_the_html() -> None:
    """(not in the text part derived from it, which the author never wrote)"""
    from fastsend.accept import AcceptError, check_campaign
    from fastsend.message.campaign import Campaign

    c = Campaign.from_dict({"from": "n@sender.example", "subject": "x",
                            "html": "<p>{% if vip %}Hi{% endif %}</p>"})  # fmt: skip
    with pytest.raises(AcceptError, match=r"^html: "):
        check_campaign(c)


# ---------------------------------------------------------------- inline images


@pytest.mark.parametrize("impl", ["c", "py"])
def test_an_inline_image_goes_with_the_html_in_a_related_part(
    impl: str, tmp_path: Path, keys: tuple[Path, dict[str, str]],
    receiver: tuple[int, RecordingHandler],
) -> None:  # fmt: skip
    """``attachments = [{ path = "logo.png", cid = "logo@sender.example" }]``: the
    image is where the HTML's ``cid:`` names it, alternative(text,
    related(html, image)) inside mixed with the other attachment, signed
    (dkimpy and OpenDKIM verify both signatures), the text said from the HTML."""
    import email
    import email.policy

    keydir, records = keys
    port, handler = receiver
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
    (tmp_path / "logo.png").write_bytes(png)
    (tmp_path / "terms.pdf").write_bytes(b"%PDF-1.4 terms")
    camp = (
        'from = "News <news@sender.example>"\nsubject = "Hi {{ name }}"\n'
        'html = "<p>Hi {{ name }}</p><img src=\\"cid:logo@sender.example\\" alt=\\"Our logo\\">"\n'
        'attachments = [{ path = "logo.png", cid = "logo@sender.example" }, "terms.pdf"]\n'
        + dkim_tables(keydir, ("rsa1", "relaxed/relaxed"), ("ed1", "simple/simple"))
    )
    proc = send(tmp_path, camp, "email,name\nr@example.net,Zoë\n", port, impl)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = wait_for(handler, 1)[0]["data"]
    assert verdicts(tmp_path, data, records) == [(True, True), (True, True)]
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects and not any(p.defects for p in msg.walk())
    shape = [
        (p.get_content_type(), p.get("Content-ID"), p.get_content_disposition()) for p in msg.walk()
    ]
    assert shape == [
        ("multipart/mixed", None, None),
        ("multipart/alternative", None, None),
        ("text/plain", None, None),
        ("multipart/related", None, None),
        ("text/html", None, None),
        ("image/png", "<logo@sender.example>", "inline"),
        ("application/pdf", None, "attachment"),
    ], shape
    parts = list(msg.walk())
    assert parts[2].get_content().splitlines() == ["Hi Zoë", "", "[Our logo]"]  # type: ignore[attr-defined]
    assert parts[5].get_content() == png  # type: ignore[attr-defined]
    assert parts[3].get_param("type") == "text/html"


@pytest.mark.parametrize(
    "atts,why",
    [
        ('[{ path = "logo.png", cid = "a b" }]', "bad attachment cid"),
        ('[{ path = "logo.png", cid = "<x>" }]', "bad attachment cid"),
        ('[{ path = "logo.png", cid = "x%41" }]', "bad attachment cid"),
        ('[{ path = "logo.png", cid = "x" }, { path = "logo.png", cid = "x" }]', "one cid"),
    ],
)
def test_a_bad_inline_image_is_refused_with_the_campaign(
    tmp_path: Path, atts: str, why: str
) -> None:
    from fastsend.message.campaign import Campaign, CampaignError

    (tmp_path / "logo.png").write_bytes(b"png")
    (tmp_path / "c.toml").write_text(
        f'from = "n@sender.example"\nsubject = "s"\nhtml = "<img src=cid:x>"\nattachments = {atts}\n'
    )
    with pytest.raises(CampaignError, match=why):
        Campaign.load(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text(
        'from = "n@sender.example"\nsubject = "s"\ntext = "t"\n'
        'attachments = [{ path = "logo.png", cid = "x" }]\n'
    )
    with pytest.raises(CampaignError, match="needs an html part"):
        Campaign.load(tmp_path / "c.toml")


# ---------------------------------------------------------------- DKIM keys that cannot be read


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastsend", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=tmp)  # fmt: skip


def _log(tmp: Path) -> list[dict[str, Any]]:
    p = tmp / "sp" / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def test_a_campaign_whose_key_file_went_away_is_deferred_not_bounced(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """A campaign accepted with its key, whose key file is then gone (moved in a
    rotation) when its mail is built: every message had failed 550 5.6.0 ("the
    campaign cannot be built"). It is deferred 4.3.5 and sent once the key is back."""
    port, handler = receiver
    write_key(generate("ed25519", 0), tmp_path / "k.pem")
    (tmp_path / "c.toml").write_text(
        CAMPAIGN + '[dkim]\ndomain = "sender.example"\nselector = "s1"\nkey = "k.pem"\n'
    )
    (tmp_path / "r.csv").write_text("email,name\na@x.example,A\n")
    # Retries after 1.5 s (1.2-1.8), then 3 s (2.4-3.6), at most 6 s (7.2). The send
    # ends at its first deferral (--max-wait 0: under load a wait of 0.5 s had seen
    # the retry due and tried twice, so the second resume's deferral came 6 s on and
    # the last resume, waiting 5 s, ended with nothing due); the last resume waits
    # longer than any retry.
    common = (
        "--spool",
        "sp",
        "--json",
        "--no-progress",
        "--workers",
        "1",
        "--retry",
        "1.5,6,3600",
    )
    p = _run(tmp_path, "send", "c.toml", "-r", "r.csv", "--route", f"*=127.0.0.1:{free_port()}",
             "--max-wait", "0", *common)  # fmt: skip
    assert json.loads(p.stdout)["deferred"] == 1, (p.stdout, p.stderr)
    (tmp_path / "k.pem").rename(tmp_path / "k.pem.moved")
    p = _run(tmp_path, "resume", "--route", f"*=127.0.0.1:{port}", "--max-wait", "2", *common)
    evs = [e for e in _log(tmp_path) if e["event"] in ("bounced", "deferred")][1:]
    assert evs and {(e["event"], e["enhanced"]) for e in evs} == {("deferred", "4.3.5")}, evs
    assert "k.pem" not in evs[0]["text"], evs[0]  # (a tenant reads its events: no server path)
    assert "DKIM: [dkim] key file not found:" in p.stderr and "k.pem" in p.stderr, p.stderr
    assert not handler.messages
    (tmp_path / "k.pem.moved").rename(tmp_path / "k.pem")
    p = _run(tmp_path, "resume", "--route", f"*=127.0.0.1:{port}", "--max-wait", "10", *common)
    assert json.loads(p.stdout)["delivered"] == 1, (p.stdout, p.stderr)
    assert b"DKIM-Signature:" in wait_for(handler, 1)[0]["data"]


def test_an_api_message_whose_config_key_is_missing_is_deferred_and_check_config_says_so(
    tmp_path: Path,
) -> None:
    """``[[dkim]] key = "missing.pem"``: check-config said "ok", serve started
    silently, and every POST /v1/messages from that domain bounced 550 5.6.0.
    check-config exits 2 naming the key, serve warns, the mail is deferred."""
    import time

    import orjson

    from _serve_helpers import Served
    from fastsend.sink import SinkThread

    dkim = '[[dkim]]\ndomain = "sender.example"\nselector = "s1"\nkey = "missing.pem"\n'
    (tmp_path / "f.toml").write_text(dkim)
    p = _run(tmp_path, "check-config", "f.toml")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "[dkim] sender.example selector s1" in p.stderr and "missing.pem" in p.stderr, p.stderr
    (tmp_path / "garbage.pem").write_text("not a key\n")
    (tmp_path / "f.toml").write_text(dkim.replace("missing.pem", "garbage.pem"))
    p = _run(tmp_path, "check-config", "f.toml")
    assert p.returncode == 2 and "garbage.pem: not a PEM private key" in p.stderr, p.stderr
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}", extra=dkim)
        try:
            assert any("missing.pem" in ln and "warning" in ln for ln in s.lines), s.lines
            st, body = s.req("POST", "/v1/messages", {"from": "a@sender.example", "subject": "s",
                                                      "text": "t", "to": "u@example.com"})  # fmt: skip
            assert st == 202, body
            logf = tmp_path / "spool" / "events.jsonl"
            deadline = time.monotonic() + 60
            while True:
                evs = (
                    [orjson.loads(x) for x in logf.read_bytes().splitlines()]
                    if logf.exists()
                    else []
                )
                outs = [e for e in evs if e["event"] not in ("accepted",)]
                if outs:
                    break
                assert time.monotonic() < deadline, evs
                time.sleep(0.1)
            assert [(e["event"], e["code"], e["enhanced"]) for e in outs] == [
                ("deferred", 451, "4.3.5")
            ], outs
            assert "missing.pem" not in outs[0]["text"], outs  # no server path for a tenant
            assert not sink.messages
        finally:
            s.stop()
