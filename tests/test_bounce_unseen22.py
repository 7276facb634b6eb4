"""Bounces whose texts the corpus does not hold, written from what their
products and RFCs document: the stage a reply answered and the reason it names.

Gmail's older notices end the reply they quote with its client's state
("... (state 14)."); the states before a transaction (6 and 9 at STARTTLS,
8 and 12 at AUTH with a relay Gmail was told to use) were not read, so a
server that does not support TLS, or refuses relaying at AUTH, was "onhold"
(no evidence), and the session's stage was unknown.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from tests.conftest import REPORT_REPLY_TIMEOUT

from fastsend import msgid
from fastsend.bounce import classify_reply, parse_bounce
from fastsend.config import from_dict
from fastsend.serve.context import open_context
from fastsend.serve.listeners import start_listeners


def _mail(subject: str, body: str, sender: str = "postmaster@gw.example.net") -> bytes:
    return (
        f"From: {sender}\r\nTo: bounce@example.org\r\nSubject: {subject}\r\n"
        "Date: Tue, 3 Mar 2020 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain\r\n\r\n" + body.replace("\n", "\r\n")
    ).encode()


GMAIL_STATE = """\
This is an automatically generated Delivery Status Notification

Delivery to the following recipient failed permanently:

     hanako@example.jp

Technical details of permanent failure:
Google tried to deliver your message, but it was rejected by the recipient domain. \
We recommend contacting the other email provider for further information about the \
cause of this error. The error that the other server returned was: \
{reply}.
"""


@pytest.mark.parametrize(
    ("reply", "command", "reason"),
    [
        # A server that does not know STARTTLS (RFC 5321 500/502) or cannot
        # start it (RFC 3207's 454): the session could not be encrypted.
        ("500 5.5.1 Command unrecognized (state 6)", "STARTTLS", "failedstarttls"),
        ("502 5.5.2 Error: command not recognized (state 6)", "STARTTLS", "failedstarttls"),
        (
            "454 454 TLS missing certificate: error:0200100D:system library:fopen:"
            "Permission denied (#4.3.0) (state 9)",
            "STARTTLS",
            "failedstarttls",
        ),
        # At AUTH with the relay: a relay refusing authenticated relaying, and
        # the sending system's own credentials failing (its setup).
        ("500 Remote server does not support SMTP Authenticated Relay (state 12)", "AUTH", "norelaying"),
        ("535 SMTP AUTH failed with the remote server. (state 8)", "AUTH", "systemerror"),
    ],
)
def test_gmail_session_states_name_their_stage(reply: str, command: str, reason: str) -> None:
    raw = _mail(
        "Delivery Status Notification (Failure)",
        GMAIL_STATE.format(reply=reply),
        sender="mailer-daemon@googlemail.com",
    )
    (r,) = parse_bounce(raw)
    assert r.recipient == "hanako@example.jp"
    # Nothing about the mailbox was said: never hard.
    assert (r.reason, r.command, r.hard) == (reason, command, False)


def test_a_refused_starttls_is_a_failed_starttls_on_the_wire() -> None:
    # The same decision for a reply our own client read at STARTTLS.
    c = classify_reply(454, "4.7.0", "TLS not available due to temporary reason", command="STARTTLS")
    assert (c.reason, c.hard, c.ip_blocked) == ("failedstarttls", False, False)
    c = classify_reply(502, "5.5.2", "Error: command not recognized", command="starttls")
    assert (c.reason, c.hard) == ("failedstarttls", False)


QMAIL = """\
Hi. This is the qmail-send program at mx.example.org.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<hanako@example.net>:
{reply}

--- Below this line is a copy of the message.

Return-Path: <news@shop.example.org>
Received: (qmail 1 invoked from network); 3 Mar 2020 10:00:00 +0000
From: Shop <news@shop.example.org>
To: hanako@example.net
Subject: hello

hi
"""


@pytest.mark.parametrize(
    "reply",
    [
        "Unable to chdir to maildir. (#4.2.1)\n"
        "I'm not going to try again; this message has been in the queue too long.",
        "Unable to open mailfile: permission denied. (#4.2.1)",
        "Unable to switch to /home/hanako: file does not exist. (#4.3.0)",
    ],
)
def test_qmail_local_failures_are_the_hosts_own(reply: str) -> None:
    # qmail-local's "Unable to <verb> ... (#4.2.1)": the delivering host's
    # file system or set-up failed. Its #4.2.1 read as RFC 3463's X.2.1
    # made it "blocked" (a refusal of our IP) for a host that never refused.
    (r,) = parse_bounce(_mail("failure notice", QMAIL.format(reply=reply), "MAILER-DAEMON@mx.example.org"))
    assert (r.recipient, r.reason, r.hard) == ("hanako@example.net", "systemerror", False)


def test_documented_replies_the_rules_missed() -> None:
    # Relaying refused with the domain between ("Relaying mail to X is not
    # permitted"): norelaying (was onhold).
    c = classify_reply(550, "", "Relaying mail to example.com is not permitted", command="RCPT")
    assert (c.reason, c.hard) == ("norelaying", False)
    # RFC 5321's bare "554 Transaction failed": the server gave no reason;
    # at MAIL FROM it was read as a refusal of our sender ("rejected").
    for stage in ("MAIL", "RCPT", "DATA"):
        c = classify_reply(554, "", "554 Transaction failed", command=stage)
        assert (c.reason, c.hard, c.ip_blocked) == ("systemerror", False, False), stage
    # Its words still decide when there are any.
    c = classify_reply(554, "", "554 Transaction failed: Duplicate header 'DKIM-Signature'.", command="DATA")
    assert c.reason == "notcompliantrfc"


@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        # Gmail's sender-requirement codes (its SMTP errors page and the
        # sender guidelines FAQ) in the wordings receivers are seen to send.
        (421, "4.7.27", "This mail has been rate limited because SPF does not pass."),
        (550, "5.7.27", "Your email has been blocked because SPF authentication didn't pass for this message."),
        (550, "5.7.27", "This mail has been blocked because SPF does not pass."),
        (421, "4.7.32", "This mail has been rate limited because the sender is not aligned."),
        (550, "5.7.32", "This mail has been blocked because the sender is not aligned."),
        (550, "5.7.1", "Message rejected because DMARC did not pass"),
    ],
)
def test_gmail_authentication_codes_are_authentication_failures(code: int, status: str, text: str) -> None:
    # Gmail's 5.7.27 is SPF not passing, where IANA's X.7.27 is a sender
    # address with a null MX (RFC 7505): it was "rejected" (our sender
    # refused), 4.7.27 and 5.7.32 "securityerror".
    c = classify_reply(code, status, text, command="DATA")
    assert (c.reason, c.hard, c.ip_blocked) == ("authfailure", False, False)
    # A deferral among them still asks to slow down.
    assert c.rate_limited == (code == 421)


def test_rfc_meanings_of_gmails_codes_are_kept() -> None:
    # The registry's meanings stay when the words are theirs.
    assert classify_reply(550, "5.7.27", "Sender address has null MX", command="MAIL").reason == "rejected"
    assert classify_reply(550, "5.7.30", "REQUIRETLS support required", command="DATA").reason == "failedstarttls"


def test_exchange_online_external_forwarding_is_a_policy() -> None:
    # The recipient's organisation forbids its mailbox forwarding outside:
    # a policy of theirs (was securityerror by the bare 5.7.x).
    c = classify_reply(
        550,
        "5.7.520",
        "Access denied, Your organization does not allow external forwarding. Please contact "
        "your administrator for further assistance. AS(7555)",
        command="DATA",
    )
    assert (c.reason, c.hard, c.ip_blocked) == ("policyviolation", False, False)


M365_NDR = """\
Your message to hanako@example.net couldn't be delivered.

hanako wasn't found at example.net.

Action Required                                        Recipient
Unknown To address

More Info for Email Admins
Status code: 550 5.1.10

Original Message Details
Created Date: 3/3/2020 9:59:58 AM
{sender_label} news@example.org
{rcpt_label} hanako@example.net
Subject: hello

Error Details
Reported error: 550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup
DSN generated by: AM0PR00MB0000.eurprd00.prod.outlook.com

Diagnostic information for administrators:

Generating server: AM0PR00MB0000.eurprd00.prod.outlook.com

hanako@example.net
Remote server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup'
"""


@pytest.mark.parametrize(
    ("sender_label", "rcpt_label"),
    [
        ("Sender Address:", "Recipient Address:"),
        ("Absenderadresse:", "Empfängeradresse:"),
        ("Adresse de l'expéditeur :", "Adresse du destinataire :"),
    ],
)
def test_m365_ndr_sender_address_is_no_recipient(sender_label: str, rcpt_label: str) -> None:
    # Microsoft 365's NDR lists the returned message's details, the sender's
    # address among them: it was a second failed recipient ("expired"), a
    # bounce recorded for our own sender.
    body = M365_NDR.format(sender_label=sender_label, rcpt_label=rcpt_label)
    got = parse_bounce(
        _mail("Undeliverable: hello", body, "Microsoft Outlook <MAILER-DAEMON@eur03.outbound.protection.outlook.com>")
    )
    assert [(r.recipient, r.reason, r.hard, r.status) for r in got] == [
        ("hanako@example.net", "userunknown", True, "5.1.10")
    ]


REPORT = """\
Your message could not be delivered.

{label} news@example.org
Recipient: hanako@example.net

Reason: 550 5.1.1 <hanako@example.net>: User unknown
"""


@pytest.mark.parametrize(
    "label",
    ["Originator:", "Reply-To:", "From address:", "Sender (MAIL FROM):", "Von:", "De :", "差出人:"],
)
def test_the_reports_sender_field_names_no_recipient(label: str) -> None:
    # A report naming the returned message's author under a label of its own
    # (X.400's "Originator:", a gateway's "Sender (MAIL FROM):", "From:" as
    # the report's language writes it): the author was a second failed
    # recipient, "expired".
    got = parse_bounce(_mail("Delivery failure", REPORT.format(label=label)))
    assert [(r.recipient, r.reason) for r in got] == [("hanako@example.net", "userunknown")]


RETURNED = """\
Your message could not be delivered.

Sent by: news@example.org
Recipient: hanako@example.net

Reason: 550 5.1.1 <hanako@example.net>: User unknown

------ Original message ------
Return-Path: <bounce-1@example.org>
Received: from mx.example.org by gw.example.net
From: Shop <{author}>
To: hanako@example.net
Subject: hello
Message-ID: <m1@example.org>

hi
"""


def test_the_returned_messages_author_is_no_recipient() -> None:
    # Whatever the report calls it, the returned message's From: is who sent
    # it, not where it failed to go.
    got = parse_bounce(_mail("Delivery failure", RETURNED.format(author="news@example.org")))
    assert [(r.recipient, r.reason) for r in got] == [("hanako@example.net", "userunknown")]
    # Unless it was sent to itself as well.
    got = parse_bounce(_mail("Delivery failure", RETURNED.format(author="hanako@example.net")))
    assert ("hanako@example.net", "userunknown") in [(r.recipient, r.reason) for r in got]


def _dsn(action: str, status: str, diag: str, to: str, subject: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {to}\r\nSubject: {subject}\r\n"
        "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThis is the mail system at host mx.example.net.\r\n\r\n"
        "<john.doe@example.com>: " + diag + "\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; john.doe@example.com\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n\r\n--B--\r\n"
    ).encode()


GMAIL_DELAY = """\
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r
To: {to}\r
Subject: Delivery Status Notification (Delay)\r
Date: Mon, 07 Dec 2026 10:00:00 +0000\r
MIME-Version: 1.0\r
Content-Type: text/plain; charset=UTF-8\r
\r
** Delivery incomplete **\r
\r
There was a temporary problem delivering your message to john.doe@example.com. \
Gmail will retry for 47 more hours. You'll be notified if the delivery fails permanently.\r
\r
The response from the remote server was:\r
452 4.2.2 The email account that you tried to reach is over quota.\r
"""


def test_a_delay_warning_is_no_bounce_at_the_intake(tmp_path: Path) -> None:
    """A report that delivery is still being retried (RFC 3464 Action
    "delayed", Gmail's "Delivery incomplete ... Gmail will retry") gave the
    message a "bounced" event: counted by the bounce-rate guardrail for mail
    that may yet be delivered, and serve's per-message index then dropped the
    final report as a repeat (its hard bounce never suppressed the address).
    Only the final failure is a bounce."""
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com"}
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, "intake": intake}))
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    # serve's per-message index, as the API hands it to the acceptor: a
    # message's "bounced" is recorded once.
    index = ctx.event_index()
    index.attach(ctx.events, ctx.config.analytics.events_days)
    ctx.acceptor.index = index
    cid = ctx.tenant_campaign("shop")
    (mid,) = ctx.inject(cid, [("john.doe@example.com", "example.com", b"{}")])
    del events[:]
    to = f"b-{msgid.token(mid, ctx.secret)}@bounces.example.com"
    warnings = [
        _dsn("delayed", "4.2.2", "452 4.2.2 Mailbox full, try again later", to, "Delayed Mail (still being retried)"),
        GMAIL_DELAY.format(to=to).encode(),
    ]
    final = _dsn("failed", "5.1.1", "550 5.1.1 User unknown", to, "Undelivered Mail Returned to Sender")

    async def send(notes: list[bytes]) -> None:
        servers = await start_listeners(ctx)
        try:
            port = int(servers[0].sockets[0].getsockname()[1])
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                   timeout=REPORT_REPLY_TIMEOUT)
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
        asyncio.run(send(warnings))
        assert [e for e in events if e.get("event") == "bounced"] == []
        assert not ctx.suppression.contains("john.doe@example.com", tenant="shop")
        asyncio.run(send([final]))
        bounced = [e for e in events if e.get("event") == "bounced"]
        assert [(e["reason"], e["hard"]) for e in bounced] == [("userunknown", True)]
        assert ctx.suppression.contains("john.doe@example.com", tenant="shop")
    finally:
        ctx.close()


EXCHANGE_DELAY = """\
Delivery is delayed to these recipients or groups:

hanako@example.net (hanako@example.net)

Subject: hello

This message hasn't been delivered yet. Delivery will continue to be attempted.

The server will keep trying to deliver this message for the next 1 days, 19 hours and 57 minutes. \
You'll be notified if the message can't be delivered by that time.

Diagnostic information for administrators:

Generating server: EX1.example.net

hanako@example.net
Remote Server at mx.example.net (192.0.2.1) returned '400 4.4.7 Message delayed'
"""


@pytest.mark.parametrize("subject", ["Delivery delayed: hello", "hello"])
def test_exchange_text_delay_notice_is_delayed(subject: str) -> None:
    # Exchange's delay notice as plain text: was a final failure ("failed").
    (r,) = parse_bounce(_mail(subject, EXCHANGE_DELAY, "postmaster@example.net"))
    assert (r.recipient, r.action, r.hard) == ("hanako@example.net", "delayed", False)


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("550 Sorry, you are sending to/from an address that has been blacklisted", "RCPT"),
        ("550 Your email address has been blacklisted", "DATA"),
        ("550 5.7.1 Sender address rejected: blacklisted by Spamhaus DBL", "RCPT"),
    ],
)
def test_a_listed_address_does_not_rest_the_ip(text: str, command: str) -> None:
    # A block list of addresses (Sisimai's Rejected texts, MessageLabs'
    # "Your email address has been blacklisted", Spamhaus's domain list):
    # our sender is refused whatever the IP. Its "blacklist" word set
    # ip_blocked, which rests the IP for the site an hour, holding every
    # other sender's (tenant's) mail there.
    c = classify_reply(int(text[:3]), "", text, command=command)
    assert (c.reason, c.hard, c.ip_blocked) == ("rejected", False, False)


@pytest.mark.parametrize(
    "text",
    ["550 5.7.1 The domain example.org is blacklisted", "554 5.7.1 The email news@example.org is blacklisted"],
)
def test_a_listed_domain_is_blocked_without_resting_the_ip(text: str) -> None:
    # Sisimai files these under "blocked"; what is listed is our domain or
    # address, not the IP (the IP was rested an hour for the site).
    c = classify_reply(int(text[:3]), "", text, command="RCPT")
    assert (c.reason, c.hard, c.ip_blocked) == ("blocked", False, False)


def test_a_listed_client_still_rests_the_ip() -> None:
    c = classify_reply(550, "5.7.1", "Sender rejected: your IP 192.0.2.1 is on our blacklist", command="MAIL")
    assert (c.reason, c.ip_blocked) == ("rejected", True)
    c = classify_reply(554, "", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org")
    assert (c.reason, c.ip_blocked) == ("blocked", True)
    c = classify_reply(550, "", "The IP 192.0.2.1 is blacklisted", command="RCPT")
    assert (c.reason, c.ip_blocked) == ("blocked", True)
