"""Session 16's outside audit of the messages area: each test on a defect it
found, driving the real ``fastsend send`` against a real receiver (aiosmtpd)
and the loopback DNS server, over both twins.

- an internationalised recipient domain was converted with Python's own
  ``"idna"`` codec, which is IDNA 2003: ``u@faß.example`` was looked up and
  sent as ``u@fass.example`` (another domain, another owner), ``ς`` became
  ``σ`` and a joiner was dropped, while From, DKIM d= and tenants' domains
  used IDNA 2008 with UTS 46 (``xn--fa-hia.example``);
- the envelope sender (a From or ``return_path`` at a Unicode domain, a
  ``verp_domain``) went raw in MAIL FROM (``news@bücher.example``, 8-bit,
  without SMTPUTF8), and a List-Unsubscribe URI with a Unicode host, mailto
  domain or path went as raw UTF-8 in a header of a message that did not ask
  for SMTPUTF8; a space in one (``?subject=Unsubscribe me``) failed every
  message at render, retried for days as a local error;
- a tenant's domains or a ``[dkim]`` domain written in Unicode in the
  config were refused ("not a domain name") where a campaign's were taken
  (an ``[intake] verp_domain`` in Unicode never matched the bounces' A-labels),
  and ``fastsend dkim keygen --domain bücher.example`` refused it too
  ("bad domain") where it should print the record at its A-label name;
- a campaign file or text_file/html_file saved with a UTF-8 byte-order mark
  (Windows editors) was "not valid TOML", or put U+FEFF in front of the body;
- the HTTP API's ``from`` at a Unicode domain went raw into a raw message's
  MAIL FROM, which then asked for SMTPUTF8 (5.6.7 at a server without it);
- a ``[routes]`` key written in Unicode never matched (recipients' domains are
  A-labels): the mail went by MX instead of the configured route;
- suppression keys kept a Unicode domain as written, so ``suppress add
  u@bücher.example`` never matched the recipient the spool holds
  (``u@xn--bcher-kva.example``): the address was mailed.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import orjson
import pytest
from tests._serve_helpers import Served

from _engine_helpers import summary
from _smtp_helpers import RecordingHandler
from fastsend import _accel
from fastsend.testing.dnsserver import DNSServer
from test_message_audit import receiver, send, verdicts, wait_for

__all__ = ["receiver"]  # (a fixture, used by name)

# name as written -> its IDNA 2008 + UTS 46 A-label form (IDNA 2003's differs)
IDNA2008 = {
    "faß.example": "xn--fa-hia.example",  # IDNA 2003: fass.example
    "FAß.Example": "xn--fa-hia.example",
    "ςa.example": "xn--a-xmb.example",  # IDNA 2003: xn--a-zmb.example (σa)
    "bücher.example": "xn--bcher-kva.example",
    "Bücher.EXAMPLE": "xn--bcher-kva.example",
    "ｂüｃｈｅｒ。example": "xn--bcher-kva.example",  # full-width forms, ideographic stop
}
# valid IDNA 2003, refused by IDNA 2008 (a symbol; a joiner where none may be)
NOT_IDNA2008 = ["i\u2764.example", "a\u200db.example"]


def _env(impl: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
    if impl == "py":
        env["FASTSEND_NO_EXTENSIONS"] = "1"
    return env


def _fastsend(impl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args],
        capture_output=True, text=True, timeout=120, env=_env(impl), check=False,
    )  # fmt: skip


def _send_mx(
    tmp: Path, rows: list[str], dns: DNSServer, port: int, impl: str
) -> subprocess.CompletedProcess[str]:
    """``fastsend send`` routed by MX through the loopback DNS server to ``port``."""
    (tmp / "c.toml").write_text(
        'from = "news@sender.example"\nsubject = "Hi"\ntext = "Hello {{ email }}\\n"\n'
    )
    (tmp / "r.csv").write_text("email\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    (tmp / "fastsend.toml").write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\nmx_port = {port}\ntimeout = 2\n'
        "[delivery]\nallow_private_mx = true\n"  # the test DNS puts MX on loopback
    )
    return _fastsend(
        impl, "send", str(tmp / "c.toml"), "-r", str(tmp / "r.csv"), "-c", str(tmp / "fastsend.toml"),
        "--spool", str(tmp / "spool"), "--json", "--no-progress", "--no-dkim", "--workers", "1",
        "--keep-duplicates",  # (each spelling of an address is a row of its own here)
        "--max-wait", "2",
    )  # fmt: skip


def _zones(*domains: str) -> dict[str, list[tuple[str, str]]]:
    zones: dict[str, list[tuple[str, str]]] = {}
    for d in domains:
        zones[d] = [("MX", f"10 mx.{d}.")]
        zones[f"mx.{d}"] = [("A", "127.0.0.1")]
    return zones


def test_unicode_recipient_domains_are_looked_up_and_sent_as_idna2008(
    impl: str, tmp_path: Path, dns_server: DNSServer, receiver: tuple[int, RecordingHandler]
) -> None:
    """``u@faß.example`` goes to xn--fa-hia.example's MX as ``u@xn--fa-hia.example``,
    not to fass.example (which here has its own MX, as the real fass.de has)."""
    port, handler = receiver
    # IDNA 2003's answers have MX records too: mail must not go there either
    dns_server.set_zones(
        _zones("xn--fa-hia.example", "xn--a-xmb.example", "fass.example", "xn--a-zmb.example")
    )
    proc = _send_mx(
        tmp_path, ["u@faß.example", "v@FAß.Example", "w@ςa.example"], dns_server, port, impl
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == 3, proc.stdout[-2000:]
    rcpts = sorted(r for m in wait_for(handler, 3) for r in m["rcpts"])
    assert rcpts == ["u@xn--fa-hia.example", "v@xn--fa-hia.example", "w@xn--a-xmb.example"]
    asked = {name for name, _t in dns_server.resolver.queries}
    assert "xn--fa-hia.example" in asked and "xn--a-xmb.example" in asked
    assert not {"fass.example", "xn--a-zmb.example"} & asked, asked


def test_a_domain_idna2008_refuses_fails_its_row_clearly_and_keeps_the_rest(
    impl: str, tmp_path: Path, dns_server: DNSServer, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    dns_server.set_zones(_zones("good.example", "xn--i-7iq.example", "ab.example"))
    proc = _send_mx(
        tmp_path, ["ok@good.example", *(f"x@{d}" for d in NOT_IDNA2008)], dns_server, port, impl
    )
    assert summary(proc)["delivered"] == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert [m["rcpts"] for m in wait_for(handler, 1)] == [["ok@good.example"]]
    assert proc.stderr.count("not a valid internationalised name") == 2, proc.stderr[-2000:]


def test_every_domain_path_converts_alike(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipients (both twins), header addresses, tenants, suppression keys, the
    EHLO name, config: one IDNA 2008 answer."""
    from fastsend import address, hostname, suppression, tenants
    from fastsend.config.base import validate_helo
    from fastsend.message.headers import HeaderError, encode_domain, split_address

    if impl == "py":
        monkeypatch.setattr(_accel, "HAVE_EXTENSIONS", False)
        norm = address.py_normalize
    else:
        norm = address.normalize
        assert norm is not address.py_normalize
    for written, alabel in IDNA2008.items():
        assert norm(f"Zoë@{written}") == (f"Zoë@{alabel}", alabel)
        assert norm(f"u@{written}.") == (f"u@{alabel}", alabel)
        assert encode_domain(written).lower() == alabel
        assert split_address(f"u@{written}")[1].lower() == alabel
        assert tenants.ascii_domain(written) == alabel
        assert suppression.normalize(f"U@{written}") == (f"u@{alabel}", f"U@{alabel}")
        assert hostname.host_name(f"mta.{written}") == f"mta.{alabel}"
        assert validate_helo(f"mta.{written}", "helo") == f"mta.{alabel}"
    for bad in NOT_IDNA2008:
        with pytest.raises(address.AddressError, match="not a valid internationalised name"):
            norm(f"u@{bad}")
        with pytest.raises(HeaderError):
            encode_domain(bad)
        with pytest.raises(suppression.SuppressionError):
            suppression.normalize(f"u@{bad}")
        assert hostname.host_name(f"mta.{bad}") == ""


def test_a_suppressed_unicode_domain_address_is_not_mailed(
    impl: str, tmp_path: Path, dns_server: DNSServer, receiver: tuple[int, RecordingHandler]
) -> None:
    """``suppress add u@bücher.example`` stops mail to ``u@bücher.example`` (and to its
    A-label spelling); an entry a former version stored under the Unicode key
    still does."""
    port, handler = receiver
    dns_server.set_zones(_zones("xn--bcher-kva.example", "good.example"))
    spool = tmp_path / "spool"
    spool.mkdir()
    add = _fastsend(impl, "suppress", "add", "Ann@Bücher.example", "--spool", str(spool))
    assert add.returncode == 0, add.stderr
    # as an older fastsend stored it: the domain as written
    db = sqlite3.connect(spool / "suppression.db")
    with db:
        db.execute(
            "INSERT INTO suppression (tenant, key, address, reason, source, created) "
            "VALUES ('default', 'bo@bücher.example', 'bo@bücher.example', 'manual', 'manual', 1)"
        )
    db.close()
    rows = ["ann@bücher.example", "ann@xn--bcher-kva.example", "bo@BÜCHER.example",
            "bo@xn--bcher-kva.example", "cy@bücher.example", "ok@good.example"]  # fmt: skip
    proc = _send_mx(tmp_path, rows, dns_server, port, impl)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["suppressed"]) == (2, 4), s
    got = sorted(r for m in wait_for(handler, 2) for r in m["rcpts"])
    assert got == ["cy@xn--bcher-kva.example", "ok@good.example"]
    events = [orjson.loads(x) for x in (spool / "events.jsonl").read_bytes().splitlines()]
    assert sorted(e["rcpt"] for e in events if e["event"] == "suppressed") == [
        "ann@xn--bcher-kva.example", "ann@xn--bcher-kva.example",
        "bo@xn--bcher-kva.example", "bo@xn--bcher-kva.example",
    ]  # fmt: skip
    # the CLI finds and removes the entry by either spelling
    gone = _fastsend(impl, "suppress", "remove", "bo@xn--bcher-kva.example", "--spool", str(spool))
    assert gone.returncode == 0, gone.stderr
    from fastsend.suppression import SuppressionList

    with SuppressionList(str(spool / "suppression.db")) as sup:
        assert sup.contains("ann@bücher.example") and sup.contains("ANN@xn--bcher-kva.example")
        assert not sup.contains("bo@bücher.example")
        assert not sup.contains("bo@xn--bcher-kva.example")


@pytest.mark.parametrize("verp", [False, True])
def test_envelope_sender_and_list_unsubscribe_of_a_unicode_domain_are_ascii(
    impl: str, tmp_path: Path, receiver: tuple[int, RecordingHandler], verp: bool
) -> None:
    port, handler = receiver
    camp = (
        'from = "News <news@Bücher.example>"\nsubject = "Hi"\ntext = "Hello"\n'
        + ('verp_domain = "bounces.bücher.example"\n' if verp else "")
        + '[list_unsubscribe]\nmailto = "abmelden@bücher.example?subject=ü-{{ email }}"\n'
        'url = "https://Bücher.example/abmelden/ö/{{ message_id }}?von=straße"\n'
    )
    proc = send(tmp_path, camp, "email\nr@example.net\n", port, impl, "--no-dkim")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (m,) = wait_for(handler, 1)
    mail_from = m["mail_from"]
    assert mail_from.isascii(), mail_from
    if verp:
        assert mail_from.startswith("b-") and mail_from.endswith("@bounces.xn--bcher-kva.example")
    else:
        assert mail_from == "news@xn--bcher-kva.example"
    head = m["data"].partition(b"\r\n\r\n")[0]
    assert head.isascii(), head
    msg = email.message_from_bytes(m["data"], policy=email.policy.default)
    uris = re.findall(r"<([^>]*)>", str(msg["List-Unsubscribe"]))
    assert uris[0] == "mailto:abmelden@xn--bcher-kva.example?subject=%C3%BC-r@example.net"
    url = urlsplit(uris[1])
    assert (url.scheme, url.hostname, url.query) == (
        "https",
        "xn--bcher-kva.example",
        "von=stra%C3%9Fe",
    )
    assert unquote(url.path).startswith("/abmelden/ö/")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_unicode_unsubscribe_host_holding_a_placeholder_is_refused_before_sending(
    tmp_path: Path,
) -> None:
    from fastsend.message import Campaign, CampaignError

    with pytest.raises(CampaignError, match=r"list_unsubscribe\.url: .*A-labels"):
        Campaign.from_dict({
            "from": "n@sender.example", "subject": "s", "text": "t",
            "list_unsubscribe": {"url": "https://{{ region }}.bücher.example/u/{{ message_id }}"},
        })  # fmt: skip


def test_a_space_in_a_list_unsubscribe_uri_is_encoded_not_a_failure_of_every_message(
    impl: str, tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    camp = (
        'from = "n@sender.example"\nsubject = "s"\ntext = "t"\n[list_unsubscribe]\n'
        'mailto = "stop@sender.example?subject=Unsubscribe me&body=<{{ email }}>"\n'
    )
    proc = send(tmp_path, camp, "email\nr@example.net\n", port, impl, "--no-dkim")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary(proc)["delivered"] == 1, (proc.stdout[-1500:], proc.stderr[-1500:])
    (m,) = wait_for(handler, 1)
    msg = email.message_from_bytes(m["data"], policy=email.policy.default)
    assert str(msg["List-Unsubscribe"]) == (
        "<mailto:stop@sender.example?subject=Unsubscribe%20me&body=%3Cr@example.net%3E>"
    )


def test_config_dkim_and_tenant_domains_may_be_written_in_unicode(tmp_path: Path) -> None:
    """``[[dkim]] domain = "Bücher.example."`` in the config signs mail From
    bücher.example with d=xn--bcher-kva.example (dkimpy and OpenDKIM pass), as the
    worker signs a tenant's raw message; a tenant's ``domains`` and keys in Unicode
    are its A-label ones."""
    from fastsend.config import from_dict
    from fastsend.delivery.signing import ConfigDKIM
    from fastsend.message.keys import generate, load_private_key, public_txt, write_key
    from fastsend.tenants import Tenants

    key = str(tmp_path / "ed.pem")
    write_key(generate("ed25519"), tmp_path / "ed.pem")
    records = {"ed._domainkey.xn--bcher-kva.example": public_txt(load_private_key(key))}
    cfg = from_dict({"dkim": {"domain": "Bücher.example.", "selector": "ed", "key": key}})
    raw = "From: News <news@bücher.example>\r\nTo: r@example.net\r\nSubject: Hi\r\n\r\nHello\r\n"
    data = ConfigDKIM(cfg).sign_raw(raw.encode(), None, "m1")
    assert b"d=xn--bcher-kva.example;" in data.replace(b"\r\n ", b"")
    assert verdicts(tmp_path, data, records) == [(True, True)]

    cfg = from_dict({"tenants": {"t": {
        "domains": ["Bücher.example"],
        "dkim": {"domain": "news.bücher.example", "selector": "s", "key": key},
    }}})  # fmt: skip
    tenants = Tenants.from_config(cfg)
    assert tenants.by_name["t"].domains == ("xn--bcher-kva.example",)
    # the intake takes the bounces to the A-label VERP return paths campaigns now use
    intake = from_dict({"intake": {"listen": "127.0.0.1:0", "verp_domain": "Bounces.Bücher.example.",
                                   "fbl_address": "FBL@bücher.example"}}).intake  # fmt: skip
    assert (intake.verp_domain, intake.fbl_address) == (
        "bounces.xn--bcher-kva.example", "fbl@xn--bcher-kva.example"
    )  # fmt: skip
    assert tenants.allows("t", "news.bücher.example") and tenants.allows(
        "t", "xn--bcher-kva.example"
    )
    assert [k["domain"] for k in tenants.dkim_for("t", "news.xn--bcher-kva.example")] == [
        "news.xn--bcher-kva.example"
    ]


def test_keygen_for_a_unicode_domain_prints_the_a_label_record_that_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastsend.cli import main
    from fastsend.message import Campaign

    out = tmp_path / "k.pem"
    argv = ["dkim", "keygen", "--domain", "Bücher.example", "--selector", "s1",
            "--algorithm", "ed25519", "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["name"] == "s1._domainkey.xn--bcher-kva.example"
    spec = {"from": "a@bücher.example", "subject": "s", "text": "t",
            "dkim": {"domain": "bücher.example", "selector": "s1", "key": str(out)}}  # fmt: skip
    data = Campaign.from_dict(spec).compile().render("b@example.org", {}, "m")
    assert verdicts(tmp_path, data, {rec["name"]: rec["value"]}) == [(True, True)]
    for bad in ["faß..example", "[127.0.0.1]", "i\u2764.example"]:
        assert main([*argv[:3], bad, *argv[4:-3], "--out", str(tmp_path / "x.pem")]) == 2
        assert "bad domain" in capsys.readouterr().err


def test_a_byte_order_mark_is_not_campaign_text(tmp_path: Path) -> None:
    from fastsend.message import Campaign

    bom = b"\xef\xbb\xbf"
    (tmp_path / "c.toml").write_bytes(
        bom
        + b'from = "n@sender.example"\nsubject = "s"\ntext_file = "t.txt"\nhtml_file = "h.html"\n'
    )
    (tmp_path / "t.txt").write_bytes(bom + "Grüße {{ email }}\n".encode())
    (tmp_path / "h.html").write_bytes(bom + b"<!DOCTYPE html><p>{{ email }}</p>\n")
    c = Campaign.load(tmp_path / "c.toml")
    assert c.to_dict()["text"] == "Grüße {{ email }}\n"
    assert c.to_dict()["html"].startswith("<!DOCTYPE html>")
    msg = email.message_from_bytes(
        c.compile().render("r@example.net", {}, "m"), policy=email.policy.default
    )
    assert msg.get_body(("plain",)).get_content() == "Grüße r@example.net\r\n"
    assert msg.get_body(("html",)).get_content().startswith("<!DOCTYPE html><p>r@example.net</p>")


def test_api_from_at_a_unicode_domain_is_an_ascii_envelope_sender(
    tmp_path: Path, receiver: tuple[int, RecordingHandler]
) -> None:
    """POST /v1/messages with ``from`` at bücher.example (the tenant's domain): the
    raw and the built message both go with MAIL FROM at xn--bcher-kva.example, to
    a server without SMTPUTF8 (aiosmtpd's default)."""
    port, handler = receiver
    s = Served(
        tmp_path, f"127.0.0.1:{port}", '[tenants.acme]\ndomains = ["xn--bcher-kva.example"]\n'
    )
    try:
        raw = "From: App <app@xn--bcher-kva.example>\r\nTo: a@example.net\r\nSubject: raw\r\n\r\nHi\r\n"
        for body in (
            {"from": "app@bücher.example", "to": ["a@example.net"], "raw": raw},
            {"from": "App <app@bücher.example>", "to": ["b@example.net"], "subject": "built",
             "text": "Hi"},
        ):  # fmt: skip
            st, got = s.req("POST", "/v1/messages", body, tenant="acme")
            assert st == 202, got
        msgs = wait_for(handler, 2)
    finally:
        s.stop()
    assert sorted((m["rcpts"][0], m["mail_from"]) for m in msgs) == [
        ("a@example.net", "app@xn--bcher-kva.example"),
        ("b@example.net", "app@xn--bcher-kva.example"),
    ]


def test_a_route_keyed_by_a_unicode_domain_applies(
    impl: str, tmp_path: Path, dns_server: DNSServer, receiver: tuple[int, RecordingHandler]
) -> None:
    port, handler = receiver
    dns_server.set_zones({})  # no MX anywhere: only the route delivers
    (tmp_path / "c.toml").write_text('from = "n@sender.example"\nsubject = "s"\ntext = "t"\n')
    (tmp_path / "r.csv").write_text("email\nu@news.bücher.example\n", encoding="utf-8")
    (tmp_path / "fastsend.toml").write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\ntimeout = 2\n'
        f'[routes]\n"Bücher.example" = "127.0.0.1:{port}"\n'
    )
    proc = _fastsend(
        impl, "send", str(tmp_path / "c.toml"), "-r", str(tmp_path / "r.csv"),
        "-c", str(tmp_path / "fastsend.toml"), "--spool", str(tmp_path / "spool"), "--json",
        "--no-progress", "--no-dkim", "--workers", "1", "--max-wait", "2",
    )  # fmt: skip
    assert summary(proc)["delivered"] == 1, (proc.stdout[-1500:], proc.stderr[-1500:])
    assert [m["rcpts"] for m in wait_for(handler, 1)] == [["u@news.xn--bcher-kva.example"]]
