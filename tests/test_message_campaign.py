"""Campaign files and rendering: the API the engine uses (fastsend.message)."""

from __future__ import annotations

import email
import email.policy
import json
from pathlib import Path

import pytest

from fastsend.message import Campaign, CampaignError, RenderError, verp
from fastsend.message.template import Template, TemplateError

MINIMAL = {
    "from": "Example News <news@example.com>",
    "subject": 'Hello {{ first_name | default("there") }}',
    "text": "Hi {{ first_name }},\nyour code is {{ code }}.\n",
}


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def content(part: object) -> str:
    """A part's decoded text with LF line ends (the parser keeps the wire's CRLF)."""
    return str(part.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]


def test_minimal_campaign_renders() -> None:
    camp = Campaign.from_dict(MINIMAL)
    assert camp.variables == {"first_name", "code"}
    r = camp.compile()
    data = r.render("ann@example.org", {"first_name": "Ann", "code": "42"}, "m1")
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    msg = parse(data)
    assert msg["Subject"] == "Hello Ann"
    assert msg["From"] == "Example News <news@example.com>"
    assert msg["To"] == "ann@example.org"
    assert msg["Message-ID"] == "<m1@example.com>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"]
    assert content(msg) == "Hi Ann,\nyour code is 42.\n"
    assert r.from_domain == "example.com"
    assert r.envelope_from("m1") == "news@example.com"


def test_default_used_for_missing_or_empty() -> None:
    r = Campaign.from_dict(MINIMAL).compile()
    for vs in ({"first_name": "", "code": "1"},):
        assert parse(r.render("a@b.example", vs, "x"))["Subject"] == "Hello there"


def test_missing_variable_is_render_error_and_check_columns() -> None:
    camp = Campaign.from_dict(MINIMAL)
    with pytest.raises(CampaignError, match="code"):
        camp.check_columns(["email", "first_name"])
    camp.check_columns(["email", "first_name", "code"])
    with pytest.raises(RenderError, match="code"):
        camp.compile().render("a@b.example", {"first_name": "x"}, "m")


@pytest.mark.parametrize("bad", ["x\r\nBcc: evil@example.net", "a\nb", "nul\x00"])
def test_header_injection_refused_for_that_recipient(bad: str) -> None:
    r = Campaign.from_dict(MINIMAL).compile()
    with pytest.raises(RenderError, match="injection"):
        r.render("a@b.example", {"first_name": bad, "code": "1"}, "m")
    # the next recipient is fine; body-only values may hold newlines
    ok = r.render("c@b.example", {"first_name": "C", "code": "1\n2"}, "m2")
    assert content(parse(ok)) == "Hi C,\nyour code is 1\n2.\n"


@pytest.mark.parametrize("rcpt", ["no-at-sign", "a b@example.com", "<a@b.c>", "a@b.c\r\n"])
def test_bad_recipient_is_render_error(rcpt: str) -> None:
    r = Campaign.from_dict(MINIMAL).compile()
    with pytest.raises(RenderError):
        r.render(rcpt, {"first_name": "x", "code": "1"}, "m")


def test_to_dict_round_trip_and_json(tmp_path: Path) -> None:
    (tmp_path / "body.html").write_text("<p>Hi {{ first_name }}</p>", encoding="utf-8")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4 fake\x00\xff")
    (tmp_path / "c.toml").write_text(
        """
from = "News <news@example.com>"
reply_to = "Help <help@example.com>"
subject = "Hi {{ first_name }}"
text = "Hello {{ first_name }}"
html_file = "body.html"
attachments = ["doc.pdf"]
feedback_id = "c1:cust:news:fastsend"
verp_domain = "bounces.example.com"
[headers]
X-Campaign = "spring-{{ first_name }}"
[list_unsubscribe]
mailto = "unsub+{{ message_id }}@example.com"
url = "https://example.com/u?e={{ email }}&id={{ message_id }}"
[tracking]
opens = true
""",
        encoding="utf-8",
    )
    camp = Campaign.load(tmp_path / "c.toml")
    d = json.loads(json.dumps(camp.to_dict()))
    (tmp_path / "body.html").unlink()
    (tmp_path / "doc.pdf").unlink()
    again = Campaign.from_dict(d)
    assert again.to_dict() == camp.to_dict()
    assert again.tracking == {"opens": True}
    r = again.compile()
    data = r.render("ann+x@example.org", {"first_name": "Ann"}, "01H")
    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("html",))
    assert body is not None and content(body) == "<p>Hi Ann</p>\n"
    atts = list(msg.iter_attachments())
    assert atts[0].get_filename() == "doc.pdf"
    assert atts[0].get_content() == b"%PDF-1.4 fake\x00\xff"
    assert msg["List-Unsubscribe"] == (
        "<mailto:unsub+01H@example.com>, <https://example.com/u?e=ann%2Bx@example.org&id=01H>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Feedback-ID"] == "c1:cust:news:fastsend"
    assert msg["X-Campaign"] == "spring-Ann"
    assert msg["Reply-To"] == "Help <help@example.com>"
    assert r.envelope_from("01H") == "b-01H@bounces.example.com"
    assert verp.decode(r.envelope_from("01H")) == "01H"


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"subject": "s", "text": "t"}, "from"),
        ({"from": "a@example.com", "text": "t"}, "subject"),
        ({"from": "a@example.com", "subject": "s"}, "neither"),
        ({**MINIMAL, "colour": 1}, "unknown"),
        ({**MINIMAL, "subject": "Hi {{ x | upper }}"}, "placeholder"),
        ({**MINIMAL, "from": "not an address"}, "from"),
        ({**MINIMAL, "headers": {"Subject": "x"}}, "set by fastsend"),
        ({**MINIMAL, "headers": {"Bad Name": "x"}}, "bad header name"),
        ({**MINIMAL, "list_unsubscribe": {"url": "http://x.example"}}, "https"),
        ({**MINIMAL, "text_file": "nope.txt"}, "not both"),
        ({**MINIMAL, "dkim": {"domain": "example.com", "selector": "s", "key": "/nope"}}, "key"),
        ({**MINIMAL, "from": "{{ who }} <a@example.com>"}, "placeholders"),
    ],
)
def test_bad_campaigns(d: dict[str, object], match: str) -> None:
    with pytest.raises(CampaignError, match=match):
        Campaign.from_dict(d)


def test_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("from = ", encoding="utf-8")
    with pytest.raises(CampaignError, match="TOML"):
        Campaign.load(p)
    with pytest.raises(CampaignError, match="cannot read"):
        Campaign.load(tmp_path / "missing.toml")


def test_template_syntax() -> None:
    t = Template('a {{x}} b {{ y | default("d\\"q") }} {{ "{{" }} c')
    assert t.render({"x": "1"}) == 'a 1 b d"q {{ c'
    assert t.required() == {"x"}
    with pytest.raises(TemplateError, match="line 2"):
        Template("ok\n{{ unclosed")


def test_idna_and_smtputf8() -> None:
    r = Campaign.from_dict(MINIMAL).compile()
    vs = {"first_name": "x", "code": "1"}
    msg = parse(r.render("user@bücher.example", vs, "m"))
    assert msg["To"] == "user@xn--bcher-kva.example"
    assert not r.needs_smtputf8("user@bücher.example")
    assert r.envelope_rcpt("user@bücher.example") == "user@xn--bcher-kva.example"
    assert r.needs_smtputf8("jösé@example.com")
    data = r.render("jösé@example.com", vs, "m")
    assert "jösé@example.com".encode() in data


def test_non_ascii_display_names_and_long_subject() -> None:
    d = {**MINIMAL, "from": "Zoë Ñandú <z@example.com>", "subject": "word " * 60 + "{{ code }}"}
    r = Campaign.from_dict(d).compile()
    data = r.render("a@example.org", {"first_name": "x", "code": "é"}, "m")
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "Zoë Ñandú"  # type: ignore[attr-defined]
    assert msg["Subject"] == "word " * 60 + "é"
    assert all(len(line) <= 78 for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"))


def test_verp_round_trip() -> None:
    for mid in ["01HXYZ", "a.b/c=d", "ünï", "x" * 40]:
        addr = verp.encode(mid, "bounces.example.com")
        assert verp.decode(addr) == mid
    with pytest.raises(verp.VerpError):
        verp.encode("y" * 80, "b.example")
    with pytest.raises(verp.VerpError):
        verp.decode("someone@example.com")


def test_verp_ids_of_plain_characters_are_written_as_they_are() -> None:
    """A plain id (fastsend's tokens) is taken whole; any other character is
    =HH, one character at a time, as before."""
    for mid in ["123-AbZ_09", "a", "-_-", "x" * 40]:
        assert verp.encode_id(mid) == mid
    assert verp.encode_id("a.b") == "a=2Eb"
    assert verp.encode_id("x\n") == "x=0A"  # (no line end slips through a match)
    assert verp.encode_id("é-1") == "=C3=A9-1"


def test_dkim_for() -> None:
    camp = Campaign.from_dict(MINIMAL)
    assert camp.dkim_for() == []
