"""An outside audit of the messages area, each test on a defect it found: the
messages are the bytes a real SMTP server (aiosmtpd) received from the real
``fastsend send`` / ``fastsend serve``, checked by both real DKIM verifiers
(dkimpy and OpenDKIM) and by Python's ``email`` parser.

- raw MIME from the API written with LF alone went out unsigned; one with a
  stray CR or mixed line ends went out with a signature no verifier accepts;
  one without Date / Message-ID went out without them (Gmail refuses that);
  its Bcc field went to every recipient;
- signatures did not oversign, so a header added after signing (a second
  From or Subject above the signed one, a Reply-To) kept them valid;
- an attachment with a long name made a header line past 998 octets;
- a campaign's ``[dkim] domain`` written as a U-label never aligned with
  its From domain and crashed the signer;
- a one-click List-Unsubscribe URL the same for every recipient (RFC 8058
  3.1: it must identify the recipient) was sent as one-click, and a
  ``[dkim] headers`` list without the List-Unsubscribe fields left one-click
  unsigned (RFC 8058 4).
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from tests._serve_helpers import Served

from _message_helpers import drop_first_signature, opendkim_verify
from _smtp_helpers import RecordingHandler, aiosmtpd_server
from conftest import free_port, require_program
from fastsend.message import Campaign
from fastsend.message.keys import generate, load_private_key, public_txt, write_key

DOMAIN = "sender.example"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An rsa-2048 and an Ed25519 key for sender.example, and their TXT records."""
    d = tmp_path_factory.mktemp("auditkeys")
    records = {}
    for sel, alg in (("rsa1", "rsa"), ("ed1", "ed25519")):
        write_key(generate(alg, 2048), d / f"{sel}.pem")
        records[f"{sel}._domainkey.{DOMAIN}"] = public_txt(load_private_key(str(d / f"{sel}.pem")))
    return d, records


@pytest.fixture
def receiver() -> Iterator[tuple[int, RecordingHandler]]:
    port = free_port()
    with aiosmtpd_server(port) as (_ctl, handler):
        yield port, handler


def verdicts(tmp: Path, data: bytes, records: dict[str, str]) -> list[tuple[bool, bool]]:
    """(dkimpy, OpenDKIM) for each DKIM-Signature of ``data``, first to last."""
    exe = require_program("opendkim")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip("."), "").encode()

    n = len(re.findall(rb"(?m)^DKIM-Signature:", data))
    out = []
    d = dkimpy.DKIM(data)
    rest = data
    for i in range(n):
        try:
            py = bool(d.verify(idx=i, dnsfunc=dnsfunc))
        except dkimpy.DKIMException:
            py = False
        od = opendkim_verify(exe, tmp, rest, records)
        out.append((py, "succeeded" in od))
        rest = drop_first_signature(rest)
    return out


def wait_for(
    handler: RecordingHandler, n: int, timeout: float = 90.0, rcpts: bool = False
) -> list[dict[str, Any]]:
    """The messages received, once ``n`` have (``rcpts``: for ``n`` recipients)."""

    def count() -> int:
        return sum(len(m["rcpts"]) for m in handler.messages) if rcpts else len(handler.messages)

    deadline = time.monotonic() + timeout
    while count() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() >= n, f"{count()} of {n} arrived"
    return handler.messages


def header_values(data: bytes, name: bytes) -> list[bytes]:
    head = data.partition(b"\r\n\r\n")[0]
    return re.findall(rb"(?mi)^" + re.escape(name) + rb":[ \t]*([^\r\n]*)", head)


def no_bare_line_ends(data: bytes) -> bool:
    stripped = data.replace(b"\r\n", b"")
    return b"\r" not in stripped and b"\n" not in stripped


# -- raw MIME through the HTTP API -----------------------------------------------------


LF_LINES = "".join(f"line {i:02d} of a newsletter long enough to be stored once\n" for i in range(30))
RAWS = {
    # LF alone (what most programs write), no Date, no Message-ID; three
    # recipients of a body over 1 KB (stored once, shared: one transaction)
    "lf": ("From: App <app@sender.example>\nTo: Team <team@sender.example>\n"
           "Subject: written with LF\n\nline one\n.leading dot\n\n" + LF_LINES + "last line\n"),
    # mixed line ends and a stray CR, with its own Date and Message-ID
    "mixed": ("From: App <app@sender.example>\r\nTo: x@example.net\n"
              "Date: Mon, 01 Jun 2026 10:00:00 +0000\r\n"
              "Message-ID: <own-id-1@sender.example>\r\nSubject: mixed\r\n\r\n"
              "a\rb\r\nc\nd\r"),
    # CRLF throughout but no final line end and no Date / Message-ID; a folded Bcc
    "nofinal": ("From: app@sender.example\r\nBcc: hidden@example.org,\r\n"
                " also-hidden@example.org\r\nSubject: no final\r\n\r\n.\r\nend"),
}  # fmt: skip


def test_raw_api_mime_is_crlf_dated_identified_and_signed(
    tmp_path: Path, keys: tuple[Path, dict[str, str]], receiver: tuple[int, RecordingHandler]
) -> None:
    keydir, records = keys
    port, handler = receiver
    tenants = f"""
[tenants.acme]
domains = ["{DOMAIN}"]
[[tenants.acme.dkim]]
domain = "{DOMAIN}"
selector = "rsa1"
key = "{keydir / "rsa1.pem"}"
[[tenants.acme.dkim]]
domain = "{DOMAIN}"
selector = "ed1"
key = "{keydir / "ed1.pem"}"
[tenants.evil]
domains = ["evil.example"]
"""
    s = Served(tmp_path, f"127.0.0.1:{port}", tenants)
    try:
        rcpts = {"lf": ["a@example.net", "b@example.net", "c@example.org"],
                 "mixed": ["m@example.net"], "nofinal": ["n@example.net"]}  # fmt: skip
        for name, raw in RAWS.items():
            st, got = s.req("POST", "/v1/messages",
                            {"from": "app@sender.example", "to": rcpts[name], "raw": raw},
                            tenant="acme")  # fmt: skip
            assert st == 202, got
        msgs = wait_for(handler, 5, rcpts=True)  # "lf" shares transactions
    finally:
        s.stop()
    by_rcpt = {r: m["data"] for m in msgs for r in m["rcpts"]}
    assert sorted(by_rcpt) == sorted(r for rs in rcpts.values() for r in rs)
    lf_ids = set()
    for rcpt, data in by_rcpt.items():
        assert no_bare_line_ends(data), (rcpt, data)
        v = verdicts(tmp_path, data, records)
        assert v == [(True, True), (True, True)], (rcpt, v, data)
        assert len(header_values(data, b"Date")) == 1, data
        mids = header_values(data, b"Message-ID")
        assert len(mids) == 1, data
        if rcpt in rcpts["mixed"]:
            assert mids == [b"<own-id-1@sender.example>"]  # its own, untouched
            assert header_values(data, b"Date") == [b"Mon, 01 Jun 2026 10:00:00 +0000"]
        else:
            g = rb"-g" if rcpt in rcpts["lf"] else b""  # a shared message's id
            assert re.fullmatch(rb"<[0-9]+-[a-z2-7]{10}" + g + rb"@[a-z2-7]{8}\.sender\.example>", mids[0]), mids
        if rcpt in rcpts["lf"]:
            lf_ids.add(mids[0])
            assert rcpt.encode() not in data  # a shared message names none of them
        m = email.message_from_bytes(data, policy=email.policy.default)
        assert m["From"].addresses[0].domain == DOMAIN
        assert m["Bcc"] is None and b"hidden@" not in data  # blind copies stay blind
    # a shared body: its Message-ID is a group's (-g), the same for every
    # recipient of one transaction, and names none of them
    for m in msgs:
        if len(m["rcpts"]) > 1:
            assert len({by_rcpt[r] for r in m["rcpts"]}) == 1
    assert lf_ids
    body = by_rcpt["a@example.net"].partition(b"\r\n\r\n")[2]
    lines = LF_LINES.replace("\n", "\r\n").encode()
    assert body == b"line one\r\n.leading dot\r\n\r\n" + lines + b"last line\r\n"
    assert by_rcpt["m@example.net"].endswith(b"\r\n\r\na\r\nb\r\nc\r\nd\r\n")


# -- oversigning -----------------------------------------------------------------------


def send(
    tmp: Path, campaign: str, rows: str, port: int, impl: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``fastsend send`` routed to ``port``, over the compiled or the pure twins."""
    (tmp / "c.toml").write_text(campaign)
    (tmp / "r.csv").write_text(rows)
    env = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
    if impl == "py":
        env["FASTSEND_NO_EXTENSIONS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "fastsend", "send", str(tmp / "c.toml"), "-r", str(tmp / "r.csv"),
         "--route", f"*=127.0.0.1:{port}", "--spool", str(tmp / "spool"), "--json",
         "--no-progress", "--workers", "1", "--max-wait", "5", *extra],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip


def dkim_tables(keydir: Path, *sels: tuple[str, str]) -> str:
    return "".join(
        f'[[dkim]]\ndomain = "{DOMAIN}"\nselector = "{sel}"\nkey = "{keydir / (sel + ".pem")}"\n'
        f'canonicalization = "{canon}"\n'
        for sel, canon in sels
    )


ADDED = [
    b"From: CEO <ceo@sender.example>",  # a second From, above the signed one
    b"Subject: Urgent: wire the money",  # a second Subject
    b"Reply-To: <thief@attacker.example>",  # the campaign has none
    b"Sender: <thief@attacker.example>",
    b"Cc: <thief@attacker.example>",
    b"List-Unsubscribe: <https://attacker.example/u>",
    b"Message-ID: <replayed@attacker.example>",
]


def test_headers_added_after_signing_break_every_signature(
    impl: str, tmp_path: Path, keys: tuple[Path, dict[str, str]],
    receiver: tuple[int, RecordingHandler],
) -> None:  # fmt: skip
    keydir, records = keys
    port, handler = receiver
    camp = (
        'from = "News <news@sender.example>"\nsubject = "Hello {{ name }}"\n'
        'text = "Hi {{ name }}"\nhtml = "<p>Hi {{ name }}</p>"\n'
        '[list_unsubscribe]\nurl = "https://sender.example/u/{{ message_id }}"\n'
        + dkim_tables(keydir, ("rsa1", "relaxed/relaxed"), ("ed1", "simple/simple"))
    )
    proc = send(tmp_path, camp, "email,name\nr1@example.net,Ann\nr2@example.org,Bo\n", port, impl)
    assert proc.returncode == 0, proc.stderr[-2000:]
    msgs = wait_for(handler, 2)
    for m in msgs:
        data = m["data"]
        assert verdicts(tmp_path, data, records) == [(True, True), (True, True)]
        head, sep, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        first = next(i for i, ln in enumerate(lines) if ln.startswith(b"From:"))
        for added in ADDED:
            forged = b"\r\n".join([*lines[:first], added, *lines[first:]]) + sep + body
            got = verdicts(tmp_path, forged, records)
            assert got == [(False, False), (False, False)], (added, got)
        # the h= tag stays within 78 columns
        assert max(len(ln) for ln in lines) <= 78, [ln for ln in lines if len(ln) > 78]


def test_raw_message_with_repeated_headers_still_verifies(
    tmp_path: Path, keys: tuple[Path, dict[str, str]]
) -> None:
    """Oversigning a name a message has twice signs both instances, then the
    empty one (RFC 6376 5.4.2): still valid, and a third breaks it."""
    from fastsend.config import from_dict
    from fastsend.delivery.signing import ConfigDKIM

    keydir, records = keys
    cfg = from_dict(
        {"dkim": {"domain": DOMAIN, "selector": "rsa1", "key": str(keydir / "rsa1.pem")}},
        base_dir=str(tmp_path),
    )
    raw = (
        b"Received: from a\r\nFrom: a@sender.example\r\nTo: x@example.net\r\n"
        b"To: y@example.net\r\nSubject: s\r\nMessage-ID: <1@sender.example>\r\n"
        b"Date: Mon, 01 Jun 2026 10:00:00 +0000\r\n\r\nbody\r\n"
    )
    data = ConfigDKIM(cfg).sign_raw(raw, None, "9-abcdefghij")
    assert data.endswith(raw)  # nothing added: it has its Date and Message-ID
    assert verdicts(tmp_path, data, records) == [(True, True)]
    forged = data.replace(b"To: x@", b"To: z@example.net\r\nTo: x@", 1)
    assert verdicts(tmp_path, forged, records) == [(False, False)]


# -- attachments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename",
    ["a" * 1200 + ".txt", "ü" * 300 + ".txt", "日本語の資料" * 30 + ".pdf",
     "x" * 70 + ".pdf", 'Über "data" 100%.csv'],
    ids=["ascii-1204", "latin-304", "cjk-184", "ascii-74", "quotes-percent"],
)  # fmt: skip
def test_long_attachment_names_keep_lines_short_and_round_trip(
    impl: str, tmp_path: Path, keys: tuple[Path, dict[str, str]],
    receiver: tuple[int, RecordingHandler], filename: str,
) -> None:  # fmt: skip
    keydir, records = keys
    port, handler = receiver
    (tmp_path / "f.bin").write_bytes(b"\x00\x01payload")
    camp = (
        'from = "News <news@sender.example>"\nsubject = "file"\ntext = "see attached"\n'
        f"attachments = [{{ path = \"f.bin\", filename = {_toml(filename)} }}]\n"
        + dkim_tables(keydir, ("rsa1", "relaxed/relaxed"))
    )
    proc = send(tmp_path, camp, "email\nr@example.net\n", port, impl)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = wait_for(handler, 1)[0]["data"]
    assert max(len(ln) for ln in data.split(b"\r\n")) <= 78
    assert verdicts(tmp_path, data, records) == [(True, True)]
    for policy in (email.policy.default, email.policy.compat32):
        m = email.message_from_bytes(data, policy=policy)
        parts = [p for p in m.walk() if p.get_filename() is not None]
        assert [p.get_filename() for p in parts] == [filename]
        assert parts[0].get_payload(decode=True) == b"\x00\x01payload"


def _toml(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- [dkim] with an internationalised domain -------------------------------------------


def test_campaign_dkim_domain_as_u_label_aligns_and_signs(
    tmp_path: Path, keys: tuple[Path, dict[str, str]]
) -> None:
    keydir, _ = keys
    c = Campaign.from_dict(
        {"from": "N <news@Bücher.example>", "subject": "s", "text": "t",
         "dkim": {"domain": "BÜCHER.example.", "selector": "rsa1",
                  "key": str(keydir / "rsa1.pem")}}
    )
    assert [x["domain"] for x in c.dkim_for()] == ["xn--bcher-kva.example"]
    data = c.compile().render("r@example.net", {}, "1-abcdefghij")
    records = {"rsa1._domainkey.xn--bcher-kva.example": _records(keydir)}
    assert verdicts(tmp_path, data, records) == [(True, True)]
    with pytest.raises(Exception, match=r"\[dkim\] domain"):
        Campaign.from_dict(
            {"from": "n@b.example", "subject": "s", "text": "t",
             "dkim": {"domain": "not a domain", "selector": "s", "key": str(keydir / "rsa1.pem")}}
        )  # fmt: skip


def _records(keydir: Path) -> str:
    return public_txt(load_private_key(str(keydir / "rsa1.pem")))


def test_attachment_content_type_length_is_capped() -> None:
    with pytest.raises(Exception, match="content_type"):
        Campaign.from_dict(
            {"from": "n@b.example", "subject": "s", "text": "t",
             "attachments": [{"filename": "f", "content_type": "a/" + "b" * 990,
                              "data_b64": base64.b64encode(b"x").decode()}]}
        )  # fmt: skip


# -- RFC 8058 one-click ----------------------------------------------------------------


def unsub_campaign(keydir: Path, unsub: dict[str, Any], **dkim: Any) -> dict[str, Any]:
    return {
        "from": "News <news@sender.example>", "subject": "s", "text": "t",
        "list_unsubscribe": unsub,
        "dkim": {"domain": DOMAIN, "selector": "rsa1", "key": str(keydir / "rsa1.pem"), **dkim},
    }  # fmt: skip


def test_one_click_url_must_identify_the_recipient(
    tmp_path: Path, keys: tuple[Path, dict[str, str]]
) -> None:
    """A one-click POST carries nothing but ``List-Unsubscribe=One-Click``
    (RFC 8058 3.1): a URL the same for everyone cannot say who unsubscribed."""
    keydir, _ = keys
    static = "https://sender.example/unsubscribe"
    with pytest.raises(Exception, match="one-click"):
        Campaign.from_dict(unsub_campaign(keydir, {"url": static, "one_click": True}))
    # by default a static URL is a plain link (a page), not a one-click URL
    c = Campaign.from_dict(unsub_campaign(keydir, {"url": static}))
    m = email.message_from_bytes(c.compile().render("r@example.net", {}, "1-abcdefghij"))
    assert m["List-Unsubscribe"] == f"<{static}>" and m["List-Unsubscribe-Post"] is None
    assert Campaign.from_dict(c.to_dict()).to_dict() == c.to_dict()  # what the spool keeps
    # with a placeholder: one-click by default
    c = Campaign.from_dict(unsub_campaign(keydir, {"url": static + "?id={{ message_id }}"}))
    m = email.message_from_bytes(c.compile().render("r@example.net", {}, "1-abcdefghij"))
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert Campaign.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_one_click_with_only_a_mailto_is_refused_where_it_is_written(tmp_path: Path) -> None:
    """RFC 8058 one-click is a POST to an https URI: ``one_click = true`` beside a
    mailto: alone was silently sent without List-Unsubscribe-Post (found by an
    audit). A campaign file or a tenant's template saying so is refused, naming
    the fix; one spooled before in that form (then the default) still loads."""
    from fastsend.message.campaign import CampaignError, check_inline

    base = {"from": "News <news@sender.example>", "subject": "s", "text": "t"}
    mailto = {"mailto": "unsub@sender.example", "one_click": True}
    toml = tmp_path / "c.toml"
    toml.write_text(
        'from = "news@sender.example"\nsubject = "s"\ntext = "t"\n[list_unsubscribe]\n'
        'mailto = "unsub@sender.example"\none_click = true\n'
    )
    with pytest.raises(CampaignError, match="one_click = true needs an https:// url"):
        Campaign.load(toml)
    with pytest.raises(CampaignError, match="needs an https:// url"):
        check_inline({**base, "list_unsubscribe": mailto})
    # fine: with a URL, with the tracking unsubscribe, or without one_click
    check_inline({**base, "list_unsubscribe": {**mailto, "url": "https://s.example/u/{{ x }}"}})
    check_inline({**base, "list_unsubscribe": mailto,
                  "tracking": {"unsubscribe": True, "base_url": "https://t.example"}})  # fmt: skip
    c = Campaign.from_dict({**base, "list_unsubscribe": {"mailto": "unsub@sender.example"}})
    assert c.to_dict()["list_unsubscribe"]["one_click"] is False  # what it does, written
    m = email.message_from_bytes(c.compile().render("r@example.net", {}, "1-abcdefghij"))
    assert m["List-Unsubscribe"] == "<mailto:unsub@sender.example>"
    assert m["List-Unsubscribe-Post"] is None
    old = Campaign.from_dict({**base, "list_unsubscribe": mailto})  # a spooled one: loads
    m = email.message_from_bytes(old.compile().render("r@example.net", {}, "1-abcdefghij"))
    assert m["List-Unsubscribe-Post"] is None


def test_one_click_headers_are_signed_whatever_the_header_list(
    impl: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    keys: tuple[Path, dict[str, str]],
) -> None:  # fmt: skip
    """RFC 8058 4: one-click needs a DKIM signature covering List-Unsubscribe
    and List-Unsubscribe-Post, even when ``[dkim] headers`` does not name them."""
    from _message_helpers import use_impl

    use_impl(monkeypatch, impl)
    keydir, records = keys
    spec = unsub_campaign(
        keydir, {"url": "https://sender.example/u/{{ message_id }}"}, headers=["from", "subject"]
    )
    data = Campaign.from_dict(spec).compile().render("r@example.net", {}, "1-abcdefghij")
    assert verdicts(tmp_path, data, records) == [(True, True)]
    h = re.search(rb"h=([^;]*);", data)
    assert h is not None
    signed = h.group(1).replace(b"\r\n", b"").replace(b" ", b"").split(b":")
    assert b"list-unsubscribe" in signed and b"list-unsubscribe-post" in signed
    forged = data.replace(b"/u/1-abcdefghij", b"/u/2-abcdefghij")
    assert verdicts(tmp_path, forged, records) == [(False, False)]


# -- variables that are not text -------------------------------------------------------


NULL_CAMPAIGN = {
    "from": "News <news@sender.example>",
    "subject": "Hi {{ name | default(\"friend\") }}, {{ age }}",
    "text": "name={{ name | default(\"friend\") }} age={{ age }} vip={{ vip }}",
}


def subjects(msgs: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for m in msgs:
        msg = email.message_from_bytes(m["data"], policy=email.policy.default)
        for r in m["rcpts"]:
            out[r] = str(msg["Subject"])
    return out


def test_null_variable_is_no_value_in_a_jsonl_list(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """A JSON null (a database export's empty field) is no value: the default
    applies; before, the text "null" went into the message ("Hi null")."""
    port, handler = receiver
    (tmp_path / "c.toml").write_text(
        "".join(f"{k} = {_toml(v)}\n" for k, v in NULL_CAMPAIGN.items())
    )
    (tmp_path / "r.jsonl").write_text(
        '{"email": "a@example.net", "name": null, "age": 30, "vip": true}\n'
        '{"email": "b@example.net", "name": "Bo", "age": 4.5, "vip": false}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fastsend", "send", str(tmp_path / "c.toml"), "-r",
         str(tmp_path / "r.jsonl"), "--route", f"*=127.0.0.1:{port}", "--spool",
         str(tmp_path / "spool"), "--json", "--no-progress", "--workers", "1",
         "--max-wait", "5", "--no-dkim"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = subjects(wait_for(handler, 2))
    assert got == {"a@example.net": "Hi friend, 30", "b@example.net": "Hi Bo, 4.5"}


def test_api_variables_numbers_are_text_and_null_is_no_value(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """The HTTP API: a template message's variables and an uploaded list's
    fields. A number was refused only when the message was made (bounced,
    "variable values must be strings"), a null became "null"; a required
    variable given as null is now a 400 naming it, nothing spooled."""
    port, handler = receiver
    tenants = f'[tenants.acme]\ndomains = ["{DOMAIN}"]\n[tenants.evil]\ndomains = ["evil.example"]\n'
    s = Served(tmp_path, f"127.0.0.1:{port}", tenants)
    try:
        st, got = s.req("POST", "/v1/messages", {
            "to": "m1@example.net", "template": NULL_CAMPAIGN,
            "variables": {"name": None, "age": 30, "vip": True}}, tenant="acme")  # fmt: skip
        assert st == 202, got
        st, got = s.req("POST", "/v1/messages", {
            "to": "m2@example.net", "template": NULL_CAMPAIGN,
            "variables": {"name": "Al", "age": None, "vip": "x"}}, tenant="acme")  # fmt: skip
        assert st == 400 and "age" in str(got), got
        st, got = s.req("POST", "/v1/campaigns", {
            "name": "nulls", "template": NULL_CAMPAIGN,
            "recipients": [{"email": "u1@example.net", "name": None, "age": 7, "vip": 1},
                           {"email": "u2@example.net", "name": "Cy", "age": 8, "vip": None}],
        }, tenant="acme")  # fmt: skip
        assert st in (200, 201, 202), got
        msgs = wait_for(handler, 2)  # u2 lacks vip (null): a refused row, never sent
    finally:
        s.stop()
    assert subjects(msgs) == {"m1@example.net": "Hi friend, 30", "u1@example.net": "Hi friend, 7"}


# -- SMTPUTF8 --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["reply_to", "to"])
def test_a_utf8_reply_to_or_to_asks_for_smtputf8(
    tmp_path: Path, key: str
) -> None:
    """A Reply-To (or a fixed To) with a non-ASCII local part puts UTF-8 in a
    header (RFC 6532): the transaction must ask for SMTPUTF8, and a server
    without it gets no 8-bit header (5.6.7). Before, only From and the return
    path were looked at: the message went without SMTPUTF8."""
    camp = (
        'from = "News <news@sender.example>"\nsubject = "s"\ntext = "t"\n'
        f'{key} = "Réponse <réponse@sender.example>"\n'
    )
    from aiosmtpd.controller import Controller

    class Handler(RecordingHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.messages.append(
                {"data": envelope.original_content, "rcpts": list(envelope.rcpt_tos),
                 "mail_options": list(envelope.mail_options)}
            )  # fmt: skip
            return "250 2.0.0 Ok"

    for utf8 in (True, False):
        port = free_port()
        handler = Handler()
        ctl = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=utf8)
        ctl.start()
        try:
            d = tmp_path / str(utf8)
            d.mkdir()
            proc = send(d, camp, "email\nr@example.net\n", port, "c", "--no-dkim")
            assert proc.returncode == 0, proc.stderr[-2000:]
            events = [ln for ln in (d / "spool" / "events.jsonl").read_text().splitlines()
                      if '"bounced"' in ln or '"delivered"' in ln]  # fmt: skip
            if utf8:
                (m,) = wait_for(handler, 1)
                assert "SMTPUTF8" in m["mail_options"], m["mail_options"]
                assert "réponse@sender.example".encode() in m["data"]
            else:
                assert handler.messages == []
                assert len(events) == 1 and "5.6.7" in events[0], events
        finally:
            ctl.stop()


@pytest.mark.parametrize(
    "name", ["Authentication-Results", "ARC-Seal", "arc-message-signature", "Received-SPF"]
)
def test_a_campaign_cannot_write_a_receivers_verdict(name: str) -> None:
    """Authentication-Results, ARC-* and Received-SPF are written by receivers:
    a campaign's own ("dkim=pass") would claim checks never made."""
    with pytest.raises(Exception, match="set by receivers"):
        Campaign.from_dict(
            {"from": "n@b.example", "subject": "s", "text": "t",
             "headers": {name: "mx.example; dkim=pass header.d=bank.example"}}
        )  # fmt: skip
