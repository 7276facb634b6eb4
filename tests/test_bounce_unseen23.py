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
  complaint about our message; so did the report's own contact address
  ("Questions: fbl-support@...") when the returned To was undisclosed.
- A refusal of MAIL FROM read by its stage alone ("rejected") before any weak
  phrase: RFC 4954's "530 5.7.0 Authentication required" was a refusal of our
  sender.
- Exchange's DNS loop and directory faults, OpenSMTPD's and Courier's own relay
  failure texts, IMail's local refusals: read by their status (X.4.4, X.1.0:
  hard) or by no rule at all ("expired").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def intake_with_one_message(tmp_path: Path) -> Iterator[tuple[Any, int, int, str]]:
    """serve's context with an intake and one message of tenant "shop"'s campaign
    to john.doe@example.com: (context, campaign, message id, its Message-ID)."""
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com"}
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, "intake": intake}))
    try:
        cid = ctx.tenant_campaign("shop")
        (mid,) = ctx.inject(cid, [("john.doe@example.com", "example.com", b"{}")])
        yield ctx, cid, mid, f"<{msgid.token(mid, ctx.secret)}@abcdefgh.example.org>"
    finally:
        ctx.close()


def test_a_redacted_complaint_reaches_the_campaign_through_its_message_id(tmp_path: Path) -> None:
    """The loop kept our Message-ID (no VERP return path in what it returned):
    the complaint is about that message and its recipient, who is suppressed.
    With the stand-in recorded as the complainer the intake found the
    recipients disagree and recorded an unverified complaint of no campaign:
    the guardrail never counted it and the recipient kept getting mail."""
    with intake_with_one_message(tmp_path) as (ctx, cid, mid, message_id):
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


# ---------------------------------------------------------------- batch 2
@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        # RFC 4954 section 6: the reply to MAIL (or any command but AUTH,
        # EHLO, HELO, NOOP, RSET, QUIT) when policy requires authentication.
        (530, "5.7.0", "Authentication required"),
        (550, "5.7.1", "Unauthenticated senders not allowed"),
        (535, "5.7.8", "Authentication credentials invalid"),
        (550, "5.7.0", "SMTP authentication is required"),
    ],
)
def test_authentication_required_at_mail_is_a_security_error(
    code: int, status: str, text: str
) -> None:
    """A relay that wants SMTP AUTH refuses MAIL FROM: the words say why.
    The stage-only reading (a policy refusal of MAIL is about the sender,
    "rejected") came before every weak phrase and hid them."""
    c = classify_reply(code, status, text, command="MAIL")
    assert (c.reason, c.hard, c.ip_blocked) == ("securityerror", False, False)


def test_a_policy_refusal_of_mail_from_without_words_is_still_rejected() -> None:
    for text in ["Sender rejected", "Access denied", "Denied"]:
        assert classify_reply(550, "5.7.1", text, command="MAIL").reason == "rejected", text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "554 5.4.4 SMTPSEND.DNS.MxLoopback; DNS records for this domain are configured in a loop",
            "networkerror",
        ),
        (
            "554 5.4.4 SMTPSEND.DNS.InvalidData; DNS returned an invalid response for this domain",
            "networkerror",
        ),
        ("550 5.1.4 RESOLVER.ADR.Ambiguous; ambiguous address", "systemerror"),
        (
            "550 5.2.0 RESOLVER.ADR.BadPrimary; the recipient has a bad primary address",
            "systemerror",
        ),
        ("550 5.1.0 RESOLVER.ADR.InvalidInSmtp; invalid in smtp", "systemerror"),
        ("550 5.1.0 RESOLVER.FWD.NotFound; forwarding address not found", "systemerror"),
        # Unchanged: the recipient that is not in the directory.
        ("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found", "userunknown"),
    ],
)
def test_exchange_dns_and_directory_codes(text: str, reason: str) -> None:
    """Exchange's DNS loop and its directory's misconfigurations read by their
    RFC 3463 status alone: X.4.4 hostunknown and X.1.0 userunknown are hard
    (the address suppressed) for a domain and a mailbox that exist."""
    code, status, _ = text.split(" ", 2)
    for command in ("RCPT", ""):
        c = classify_reply(int(code), status, text, command=command)
        assert c.reason == reason, (text, command)
        assert c.hard is (reason == "userunknown")


OPENSMTPD = """\
From: Mailer Daemon <MAILER-DAEMON@mx.example.org>\r
To: sender@example.org\r
Subject: Delivery status notification: error\r
Date: Mon, 07 Dec 2026 10:00:00 +0000\r
MIME-Version: 1.0\r
Content-Type: text/plain\r
\r
    Hi!\r
\r
    This is the MAILER-DAEMON, please DO NOT REPLY to this e-mail.\r
\r
    An error has occurred while attempting to deliver a message for\r
    the following list of recipients:\r
\r
hanako@example.jp: {text}\r
\r
    Below is a copy of the original message:\r
\r
From: sender@example.org\r
To: hanako@example.jp\r
Subject: hello\r
\r
hi\r
"""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Temporary failure in MX lookup", "networkerror"),
        ("No valid route to remote MX", "networkerror"),
        ("All routes to destination blocked", "networkerror"),
        ("Address family mismatch on destination MXs", "networkerror"),
        ("Loop detected", "networkerror"),
        ("Destination seem to reject all mails", "notaccept"),
        ("No MX found for domain", "notaccept"),
        ("Could not retrieve credentials", "securityerror"),
    ],
)
def test_opensmtpd_relay_failure_texts(text: str, reason: str) -> None:
    """OpenSMTPD gives its own words after the recipient, no reply code: a
    final report naming no code and no status fell back to "expired"."""
    (r,) = parse_bounce(OPENSMTPD.format(text=text).encode())
    assert (r.recipient, r.reason) == ("hanako@example.jp", reason)


def test_courier_and_imail_fixed_texts() -> None:
    for text, reason in [
        ("DNS lookup failed.", "networkerror"),
        ("This domain's DNS violates RFC 1035.", "systemerror"),
        ("Invalid final delivery userid: hanako@example.jp", "userunknown"),
    ]:
        assert classify_reply(0, "", text, command="").reason == reason, text


ARF_TEXT = """\
From: feedbackloop@fbl.example.net\r
To: fbl@bounces.example.com\r
Subject: Abuse report\r
Date: Mon, 07 Dec 2026 10:00:00 +0000\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=feedback-report; boundary="R"\r
\r
--R\r
Content-Type: text/plain\r
\r
This is an email abuse report for an email message received from IP 192.0.2.1.\r
{line}\r
\r
--R\r
Content-Type: message/feedback-report\r
\r
Feedback-Type: abuse\r
User-Agent: ExampleFBL/1.0\r
Version: 1\r
\r
--R\r
Content-Type: message/rfc822\r
\r
From: shop@example.org\r
To: <Undisclosed Recipients>\r
Subject: sale\r
Message-ID: <1-aaaaaaaaaa@example.org>\r
\r
hi\r
--R--\r
"""


@pytest.mark.parametrize(
    ("line", "recipient"),
    [
        # The reporter's own contact addresses: no subscriber complained.
        ("Questions about this report: fbl-support@fbl.example.net", ""),
        ("Send questions to abuse@fbl.example.net or postmaster@fbl.example.net", ""),
        ("Do not reply to feedbackloop@fbl.example.net", ""),
        ("Please write to noreply@fbl.example.net", ""),
        # The complainer named only in the text (the returned To is undisclosed).
        ("The message was reported as spam by jane.doe@example.com", "jane.doe@example.com"),
    ],
)
def test_an_arf_report_text_names_its_reporter_not_a_complainer(line: str, recipient: str) -> None:
    """A mail sent to undisclosed recipients returns no To address: the
    report's text was searched and its first address taken, often the loop's
    own contact address, recorded as the complainer (the intake then found it
    disagree with the Message-ID's recipient and dropped the complaint)."""
    (r,) = parse_bounce(ARF_TEXT.format(line=line).encode())
    assert (r.reason, r.feedback_type, r.recipient) == ("feedback", "abuse", recipient)
