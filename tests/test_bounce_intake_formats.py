"""Messages to the bounce address that are not bounces (auto-replies under
the subjects and headers their systems document, replies from people), and
complaints in the feedback loops' pre-ARF shape.

RFC 3834 sends automatic responses to the Return-Path, which is our VERP
address: the intake ties them to the message they answer. Read as a bounce,
the addresses such a text names (a colleague to write to, the front desk)
became failed recipients, and the message it answers got a "bounced" event
(counted by the bounce-rate guardrail) although it was delivered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from fastsend import msgid
from fastsend.bounce import parse_bounce
from fastsend.config import from_dict
from fastsend.serve.context import open_context
from fastsend.serve.listeners import start_listeners

OOO_BODY = """Hello,

I am out of the office until Monday 14 December with limited access to email.
For urgent matters please contact my colleague Jane Roe at jane.roe@example.com
or the front desk at info@example.com.

Best regards,
John
"""


def _message(subject: str, extra: str = "", body: str = OOO_BODY) -> bytes:
    return (
        "From: John Doe <john.doe@example.com>\n"
        "To: b-1-abc@bounce.example.org\n"
        f"Subject: {subject}\n"
        "Date: Mon, 07 Dec 2026 10:00:00 +0000\n"
        "Message-ID: <r1@example.com>\n"
        f"{extra}"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n\n" + body
    ).encode()


@pytest.mark.parametrize(
    ("subject", "extra"),
    [
        # Yahoo Mail's vacation responder (Sisimai's RFC 3834 reader lists
        # "Auto Response:" beside "Automatic reply:" and "Out of Office:").
        ("Auto Response: Our December newsletter", ""),
        ("Automatic Response: Our December newsletter", ""),
        # iCloud Mail marks its vacation replies X-Apple-Action: VACATION;
        # the subject is whatever the user wrote.
        ("Away until the 14th", "X-Apple-Action: VACATION\n"),
    ],
)
def test_documented_auto_replies_are_their_senders_vacation(subject: str, extra: str) -> None:
    recs = parse_bounce(_message(subject, extra))
    assert [(r.recipient, r.reason, r.hard) for r in recs] == [
        ("john.doe@example.com", "vacation", False)
    ]


@pytest.mark.parametrize(
    "subject",
    [
        "Request received: Our December newsletter",  # a help desk's acknowledgement
        "I am on vacation",  # a responder that sets no header at all
        "Re: Our December newsletter",  # a person answering the bounce address
    ],
)
def test_a_person_or_an_unknown_responder_reports_no_failure(subject: str) -> None:
    """No mail system's address, no report's subject or type, no SMTP reply
    quoted: nothing failed, and the addresses the text names did not bounce."""
    assert parse_bounce(_message(subject)) == []


def test_a_bounce_relayed_under_a_persons_address_is_still_read() -> None:
    """The gate is the quoted reply: a gateway or a helpdesk forwarding the
    refusal in its own words keeps its recipient and verdict."""
    body = (
        "Your message could not be delivered to bob@example.net:\n\n"
        "    550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown\n"
    )
    recs = parse_bounce(_message("Re: Our December newsletter", body=body))
    assert [(r.recipient, r.reason, r.hard) for r in recs] == [
        ("bob@example.net", "userunknown", True)
    ]


def test_a_mailing_list_managers_notice_is_still_read() -> None:
    """List software (RFC 2369/2919 headers, an owner-/-admin address) refusing
    a post writes no SMTP reply either: its notice stays a report."""
    raw = (
        b"From: news-admin@lists.example.org\n"
        b"To: sender@example.org\n"
        b"Subject: You sender@example.org are not member (news ML)\n"
        b"List-Id: <news.lists.example.org>\n"
        b"Date: Mon, 07 Dec 2026 10:00:00 +0000\n\n"
        b"You are not a member of this mailing list <news@lists.example.org>.\n"
    )
    recs = parse_bounce(raw)
    assert recs and all(not r.hard for r in recs)


JMRP = """From: staff@hotmail.com
To: fbl@sender.example.org
Subject: complaint about message from 192.0.2.1
Date: Thu, 29 Apr 2010 23:34:45 +0000
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="JMRP"

--JMRP
Content-Type: text/plain; charset=us-ascii

This is an email abuse report for an email message received from IP 192.0.2.1.

--JMRP
Content-Type: message/rfc822

X-HmXmrOriginalRecipient: <kijitora@hotmail.example>
From: news@sender.example.org
To: list-alias@hotmail.example
Subject: Newsletter
Message-ID: <orig-9@sender.example.org>

hello
--JMRP--
"""


def test_a_pre_arf_complaint_is_a_complaint_of_its_user() -> None:
    """Hotmail's JMRP note (multipart/mixed, "complaint about message from
    <IP>", the reported message attached): the complaining user is the one
    X-HmXmrOriginalRecipient names (it was no record at all: a lost complaint,
    the address never suppressed)."""
    recs = parse_bounce(JMRP.encode())
    assert [(r.recipient, r.reason, r.feedback_type, r.hard) for r in recs] == [
        ("kijitora@hotmail.example", "feedback", "abuse", False)
    ]
    assert recs[0].original_message_id == "<orig-9@sender.example.org>"


def test_a_pre_arf_complaint_without_the_header_names_the_returned_recipient() -> None:
    """Amazon SES forwarding complaints in the same shape: the recipient is the
    attached message's To."""
    raw = JMRP.replace("X-HmXmrOriginalRecipient: <kijitora@hotmail.example>\n", "")
    raw = raw.replace("staff@hotmail.com", "complaints@email-abuse.amazonses.com")
    recs = parse_bounce(raw.encode())
    assert [(r.recipient, r.reason, r.feedback_type) for r in recs] == [
        ("list-alias@hotmail.example", "feedback", "abuse")
    ]


def test_an_auto_reply_to_the_verp_address_is_no_bounce_at_the_intake(tmp_path: Path) -> None:
    """Through the intake: responders answer the Return-Path (RFC 3834), our
    VERP address, which names the message. Their notes are no bounce of it
    (an unknown responder gave the delivered message a "bounced" event, which
    the bounce-rate guardrail counts), nor is a DMARC aggregate report."""
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com"}
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, "intake": intake}))
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    cid = ctx.tenant_campaign("shop")
    (mid,) = ctx.inject(cid, [("john.doe@example.com", "example.com", b"{}")])
    del events[:]
    to = f"b-{msgid.token(mid, ctx.secret)}@bounces.example.com"
    notes = [
        _message("Auto Response: Our December newsletter"),
        _message("Request received: Our December newsletter"),
        _message("Away until the 14th", "X-Apple-Action: VACATION\n"),
        DMARC_AGGREGATE.encode(),
    ]

    async def main() -> None:
        servers = await start_listeners(ctx)
        try:
            port = int(servers[0].sockets[0].getsockname()[1])
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            await smtp.connect()
            for raw in notes:
                errors, _reply = await smtp.sendmail("", [to], raw)
                assert errors == {}
            await smtp.quit()
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()

    try:
        asyncio.run(main())
        assert [e for e in events if e.get("event") == "bounced"] == []
        assert not ctx.suppression.contains("john.doe@example.com", tenant="shop")
    finally:
        ctx.close()


DMARC_AGGREGATE = """From: noreply-dmarc-support@google.com
To: dmarc@sender.example.org
Subject: Report domain: sender.example.org Submitter: google.com Report-ID: 1234567890
Date: Thu, 29 Apr 2021 23:34:45 +0000
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="D"

--D
Content-Type: text/plain; charset=us-ascii

This is an aggregate report from google.com.

Contact dmarc-noreply@google.com with any questions.

--D
Content-Type: application/zip; name="google.com!sender.example.org!1!2.zip"
Content-Transfer-Encoding: base64

UEsDBBQAAAAIAA==
--D--
"""


def test_a_dmarc_aggregate_report_is_no_bounce() -> None:
    """RFC 7489 aggregate reports (the XML zipped, a note naming the reporter's
    contact) were read as a failure of that contact address."""
    assert parse_bounce(DMARC_AGGREGATE.encode()) == []


def test_a_mail_systems_notice_under_an_unknown_subject_is_still_read() -> None:
    """A gateway's notice naming itself in From ("MMSC NDR Administrator",
    sysadmin@) under a subject no rule knows, quoting no SMTP reply: a report."""
    raw = (
        b"From: MMSC NDR Administrator <sysadmin@m01.mms.example>\n"
        b"To: news@sender.example.org\n"
        b"Subject: Message not sent\n\n"
        b"Message could not be delivered to mobile.\n"
        b"Error: No valid recipients for this MM\n\n"
        b"Original Message:\n"
        b"To: 5551234567@mms.example\n"
    )
    assert [r.recipient for r in parse_bounce(raw)] == ["5551234567@mms.example"]


def test_a_notice_naming_the_command_it_followed_is_read_at_that_stage() -> None:
    """A notice saying "rejected recipient <a> (Error following RCPT command)
    ... [550 User unknown]": the refusal answered RCPT TO,
    so it is the address that is unknown (with no stage, "user unknown" reads as
    a content filter's verdict: filtered, soft)."""
    raw = (
        b"From: mailer@mta.example.com\n"
        b"To: news@sender.example.org\n"
        b"Subject: There was an error sending your mail\n\n"
        b"We had trouble delivering your message. Full details follow:\n\n"
        b"1 error(s):\n\n"
        b"SMTP Server <mta2.example.jp> rejected recipient <kijitora@example.jp> "
        b"(Error following RCPT command). It responded as follows: [550 User unknown]\n"
    )
    recs = parse_bounce(raw)
    assert [(r.recipient, r.command, r.reason, r.hard) for r in recs] == [
        ("kijitora@example.jp", "RCPT", "userunknown", True)
    ]
