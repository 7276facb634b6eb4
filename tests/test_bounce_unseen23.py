"""Bounces and complaints whose texts the corpus does not hold, written from
what their products and RFCs document (session 23).

- Postfix's smtp(8) reports a failed TLS handshake as "Cannot start TLS:
  handshake failure" (DSN status 4.7.5): RFC 3463's X.7.5 alone said
  "securityerror", but the words say STARTTLS failed.
- Yahoo's "[TSS04] ... temporarily deferred due to unexpected volume or user
  complaints" is about what the sender sent: "rejected" at MAIL FROM, where
  Yahoo gives it; when a relay's report did not say the stage (or said RCPT)
  it read "blocked" (a refused client: that stays for the greeting only).
- Postfix smtpd's "451 4.3.0 <address>: Temporary lookup failure" is one of
  the receiver's own tables failing (smtpd_check.c, reject_dict_retry), not
  the DNS: it read "networkerror".
- A feedback loop that redacts the complaining recipient (RFC 6590) leaves a
  stand-in ("redacted@...", "xxxxxxx@...") in the returned message's To or in
  Original-Rcpt-To: it was recorded as the complainer, and the intake, which
  checks a Message-ID's recipient against the report's, then dropped the
  complaint about our message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastsend import msgid
from fastsend.bounce import classify_reply, parse_bounce
from fastsend.config import from_dict
from fastsend.serve.context import open_context
from fastsend.serve.listeners import apply_records


def _postfix_dsn(action: str, status: str, diag_type: str, diag: str, text: str) -> bytes:
    """A Postfix bounce(8) report in its documented shape (RFC 3464)."""
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        "To: sender@example.org\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThis is the mail system at host mx.example.net.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n\r\n"
        f"<john.doe@example.com>: {text}\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; john.doe@example.com\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: {diag_type}; {diag}\r\n\r\n--B--\r\n"
    ).encode()


@pytest.mark.parametrize("action", ["failed", "delayed"])
def test_postfix_tls_handshake_failure_is_failedstarttls(action: str) -> None:
    """Postfix writes the handshake failure as its own diagnostic (X-Postfix),
    no remote reply: the next hop accepted STARTTLS and the handshake failed."""
    raw = _postfix_dsn(
        action,
        "4.7.5",
        "X-Postfix",
        "Cannot start TLS: handshake failure",
        "Cannot start TLS: handshake failure",
    )
    (r,) = parse_bounce(raw)
    assert (r.recipient, r.reason, r.hard) == ("john.doe@example.com", "failedstarttls", False)
    # The same words as a client reports them (no reply code), and a handshake
    # failure named by a relay's own summary.
    for code, status, text in [
        (0, "4.7.5", "Cannot start TLS: handshake failure"),
        (454, "4.7.5", "host mx.example.com[192.0.2.1]: Cannot start TLS: handshake failure"),
        (0, "", "TLS handshake failed: certificate verify failed"),
    ]:
        assert classify_reply(code, status, text, command="").reason == "failedstarttls", text


TSS04 = (
    "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected "
    "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
)


@pytest.mark.parametrize("command", ["MAIL", "", "RCPT"])
def test_yahoo_tss04_is_a_sender_deferral_at_every_stage(command: str) -> None:
    """Yahoo documents [TSS04] as a deferral for volume or complaints (its
    permanent refusal of the IP is [TSS09]): the sender's, a slow-down, never
    a rested IP, whether the report says the stage or not."""
    c = classify_reply(421, "4.7.0", TSS04, command=command)
    assert (c.reason, c.hard, c.rate_limited, c.ip_blocked) == ("rejected", False, True, False)
    # As the greeting no sender was named yet: the client's.
    c = classify_reply(421, "4.7.0", TSS04, command="CONN")
    assert (c.reason, c.rate_limited, c.ip_blocked) == ("blocked", True, False)


def test_yahoo_tss04_in_a_report_without_its_stage() -> None:
    """A relay's report quoting the reply with no "in reply to ..." line."""
    raw = _postfix_dsn(
        "failed", "4.7.0", "smtp", TSS04, "host mta6.am0.yahoodns.net said: " + TSS04
    )
    (r,) = parse_bounce(raw)
    assert (r.reason, r.hard) == ("rejected", False)


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("RCPT", "451 4.3.0 <john.doe@example.com>: Temporary lookup failure"),
        ("MAIL", "451 4.3.0 <sender@example.org>: Temporary lookup failure"),
        ("RCPT", "451 4.3.0 Temporary lookup failure"),
    ],
)
def test_postfix_temporary_lookup_failure_is_the_receivers_system(command: str, text: str) -> None:
    """The receiver's access map, LDAP or SQL table could not be read: its
    system's fault (RFC 3463 X.3.0, "other mail system status"), temporary."""
    code, status, words = text.split(" ", 2)
    c = classify_reply(int(code), status, words, command=command)
    assert (c.reason, c.hard, c.ip_blocked) == ("systemerror", False, False)
    # The DNS's own temporary failures stay the network's.
    c = classify_reply(
        450, "4.4.3", "Host or domain name not found. Name service error: Host not found, try again"
    )
    assert c.reason == "networkerror"


ARF = """\
From: feedbackloop@fbl.example.net\r
To: fbl@bounces.example.com\r
Subject: FW: sale\r
Date: Mon, 07 Dec 2026 10:00:00 +0000\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=feedback-report; boundary="R"\r
\r
--R\r
Content-Type: text/plain\r
\r
This is an email abuse report for an email message received from IP 192.0.2.1.\r
\r
--R\r
Content-Type: message/feedback-report\r
\r
Feedback-Type: abuse\r
User-Agent: ExampleFBL/1.0\r
Version: 1\r
{fields}Source-IP: 192.0.2.1\r
\r
--R\r
Content-Type: text/rfc822-headers\r
\r
From: shop@example.org\r
To: {to}\r
Subject: sale\r
Message-ID: {mid}\r
\r
--R--\r
"""


@pytest.mark.parametrize(
    ("fields", "to"),
    [
        ("", "redacted@example.com"),
        ("", "xxxxxxx@example.com"),
        ("", "<*****@example.com>"),
        ("", '"Redacted" <[REDACTED]@example.com>'),
        ("", "john.doe@xxxxxxx.com"),
        ("Original-Rcpt-To: xxxxxxxx@example.com\r\n", "XXXXXXXX@example.com"),
        ("Redacted-Address: zz9999\r\n", "zz9999@example.com"),
    ],
)
def test_a_redacted_complaint_names_no_recipient(fields: str, to: str) -> None:
    raw = ARF.format(fields=fields, to=to, mid="<1-aaaaaaaaaa@example.org>").encode()
    (r,) = parse_bounce(raw)
    assert (r.reason, r.recipient) == ("feedback", "")


def test_an_unredacted_complaint_keeps_its_recipient() -> None:
    for fields, to, want in [
        ("", "john.doe@example.com", "john.doe@example.com"),
        ("Original-Rcpt-To: jane@example.com\r\n", "xxxxxxx@example.com", "jane@example.com"),
        ("", "x.y@example.com", "x.y@example.com"),
    ]:
        raw = ARF.format(fields=fields, to=to, mid="<1-aaaaaaaaaa@example.org>").encode()
        (r,) = parse_bounce(raw)
        assert r.recipient == want, to


def test_a_redacted_complaint_reaches_the_campaign_through_its_message_id(tmp_path: Path) -> None:
    """The loop kept our Message-ID (no VERP return path in what it returned):
    the complaint is about that message and its recipient, who is suppressed.
    With the stand-in recorded as the complainer the intake found the
    recipients disagree and recorded an unverified complaint of no campaign:
    the guardrail never counted it and the recipient kept getting mail."""
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com"}
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, "intake": intake}))
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    try:
        cid = ctx.tenant_campaign("shop")
        (mid,) = ctx.inject(cid, [("john.doe@example.com", "example.com", b"{}")])
        message_id = f"<{msgid.token(mid, ctx.secret)}@abcdefgh.example.org>"
        raw = ARF.format(fields="", to="xxxxxxx@example.com", mid=message_id).encode()
        (ev,) = apply_records(ctx, parse_bounce(raw), ["fbl@bounces.example.com"])
        assert (ev["event"], ev["id"], ev["campaign"], ev["rcpt"]) == (
            "complained",
            mid,
            cid,
            "john.doe@example.com",
        )
        assert "verified" not in ev
        assert ctx.suppression.contains("john.doe@example.com", tenant="shop")
    finally:
        ctx.close()
