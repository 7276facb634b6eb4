"""Synthetic bounces in formats and provider phrasings absent from the corpus.

Each message is written here from the documented layout of the format (no
real message copied): Lotus/HCL Notes, BIGLOBE, Exchange 2003 MSEXCH codes,
qmail-remote's fixed texts, Trend Micro InterScan transcripts, Microsoft 365
NDR texts, a gateway re-wrapping a DSN, and the hard/soft rule on every path
(Action: delayed, synchronous 4xx, auto-replies).
"""

from __future__ import annotations

import pytest

from fastsend.bounce import classify_reply, parse_bounce


def _msg(headers: str, body: str) -> bytes:
    return (headers.strip("\n") + "\n\n" + body.lstrip("\n")).encode()


def _one(raw: bytes) -> tuple[str, str, bool]:
    recs = [r for r in parse_bounce(raw) if r.reason != "delivered"]
    assert len(recs) == 1, recs
    return recs[0].recipient, recs[0].reason, recs[0].hard


NOTES = _msg(
    """
From: Postmaster <postmaster@notes.example.org>
To: sender@example.com
Subject: Undeliverable message
Content-Type: text/plain
""",
    """
------- Failure Reasons  --------

User not listed in public Name & Address Book
alice@notes.example.org

------- Returned Message --------
From: sender@example.com
To: alice@notes.example.org
Subject: hello

hi
""",
)

BIGLOBE = _msg(
    """
From: postmaster@mail.biglobe.example.jp
To: sender@example.com
Subject: Returned mail: Delivery failed
Content-Type: text/plain
""",
    """
   ----- The following addresses had delivery problems -----
taro@biglobe.example.jp

   ----- Non-delivered information -----
The number of messages in recipient's mailbox exceeded the local limit.
""",
)

EXCHANGE2003 = _msg(
    """
From: System Administrator <postmaster@corp.example.net>
To: sender@example.com
Subject: Undeliverable: report
X-Mailer: Internet Mail Service (5.5.2657.72)
Content-Type: text/plain
""",
    """
Your message

  To:      group@corp.example.net
  Subject: report
  Sent:    Mon, 3 Mar 2008 10:00:00 +0100

did not reach the following recipient(s):

bob@corp.example.net on Mon, 3 Mar 2008 10:00:05 +0100
    The recipient name is not recognized
    MSEXCH:IMS:CORP:SITE:MAIL01 0 (000C05A6) Unknown Recipient
carol@corp.example.net on Mon, 3 Mar 2008 10:00:05 +0100
    Too many hops
    MSEXCH:IMS:CORP:SITE:MAIL01 0 (00120270) Too Many Hops
""",
)


def _qmail(detail: str) -> bytes:
    return _msg(
        """
From: MAILER-DAEMON@mx.example.com
To: sender@example.com
Subject: failure notice
Content-Type: text/plain
""",
        "Hi. This is the qmail-send program at mx.example.com.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        "<dave@remote.example.org>:\n" + detail + "\n\n"
        "--- Below this line is a copy of the message.\n\nSubject: x\n\nbody\n",
    )


INTERSCAN = _msg(
    """
From: "InterScan MSS" <postmaster@gw.example.co.jp>
To: sender@example.com
Subject: Mail could not be delivered
Content-Type: text/plain
""",
    """
This message is from InterScan Messaging Security Suite.

Sent <<< MAIL FROM:<sender@example.com>
Received >>> 250 2.1.0 Ok
Sent <<< RCPT TO:<erin@gw.example.co.jp>
Received >>> 550 5.1.1 <erin@gw.example.co.jp>... user unknown

Unable to deliver message to <erin@gw.example.co.jp>.
""",
)


def _dsn(status: str, diag: str, action: str = "failed", rcpt: str = "fay@example.org") -> bytes:
    return _msg(
        """
From: MAILER-DAEMON@mx.example.net
To: sender@example.com
Subject: Delivery Status Notification
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"
""",
        f"""
--B
Content-Type: text/plain

Delivery report.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; {rcpt}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; {diag}

--B--
""",
    )


def test_notes_user_not_in_address_book() -> None:
    assert _one(NOTES) == ("alice@notes.example.org", "userunknown", True)


def test_biglobe_mailbox_limit() -> None:
    assert _one(BIGLOBE) == ("taro@biglobe.example.jp", "mailboxfull", False)


def test_exchange2003_msexch_codes_and_recipient_list() -> None:
    recs = parse_bounce(EXCHANGE2003)
    # The "To:" summary above "did not reach the following recipient(s)" is
    # the original message's header, not a failed recipient.
    assert [(r.recipient, r.reason, r.hard) for r in recs] == [
        ("bob@corp.example.net", "userunknown", True),
        ("carol@corp.example.net", "networkerror", False),
    ]


@pytest.mark.parametrize(
    ("detail", "reason", "command"),
    [
        (
            "192.0.2.7 does not like recipient.\n"
            "Remote host said: 550 no such user here\nGiving up on 192.0.2.7.",
            "userunknown",
            "RCPT",
        ),
        (
            "Connected to 192.0.2.7 but sender was rejected.\n"
            "Remote host said: 553 we do not take mail from you",
            "rejected",
            "MAIL",
        ),
        (
            "Connected to 192.0.2.7 but my name was rejected.\nRemote host said: 550 go away",
            "blocked",
            "EHLO",
        ),
        (
            "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
            "I'm not going to try again; this message has been in the queue too long.",
            "networkerror",
            None,
        ),
        ("Sorry, I couldn't find any host named remote.example.org. (#5.1.2)", "hostunknown", None),
        ("Mailaddress is administratively disabled. (#5.2.1)", "suspend", None),
        ("Unable to contact LDAP server. (#4.4.3)", "systemerror", None),
    ],
)
def test_qmail_fixed_texts(detail: str, reason: str, command: str | None) -> None:
    (r,) = parse_bounce(_qmail(detail))
    assert (r.recipient, r.reason, r.command) == ("dave@remote.example.org", reason, command), r


# IMail's own refusal, no reply code: "Unknown user: <address>" is its fixed
# text at RCPT (Sisimai's lhost IMailServer).
IMAIL = (
    b'From: "Postmaster" <postmaster@example.org>\nTo: news@sender.example\n'
    b"Subject: Undeliverable Mail\nX-Mailer: <SMTP32 v8.22>\n\n"
    b"Unknown user: nobody@example.org\n\n\nOriginal message follows.\n\n"
    b"From: news@sender.example\nTo: nobody@example.org\nSubject: hi\n\nhello\n"
)


@pytest.mark.parametrize(
    ("raw", "recipient"),
    [(INTERSCAN, "erin@gw.example.co.jp"), (IMAIL, "nobody@example.org")],
    ids=["interscan-transcript", "imail-unknown-user"],
)
def test_unknown_user_texts_name_the_rcpt_command(raw: bytes, recipient: str) -> None:
    (r,) = parse_bounce(raw)
    assert (r.recipient, r.command, r.reason, r.hard) == (recipient, "RCPT", "userunknown", True)


@pytest.mark.parametrize(
    ("status", "diag", "reason"),
    [
        (
            "5.7.509",
            "550 5.7.509 Access denied, sending domain EXAMPLE.COM does not pass DMARC verification",
            "authfailure",
        ),
        (
            "5.2.122",
            "554 5.2.122 The recipient has exceeded their limit for the number of messages they can receive per hour",
            "speeding",
        ),
        ("5.7.504", "550 5.7.504 Recipient address rejected: Access denied", "suspend"),
        ("5.7.505", "550 5.7.505 Access denied, banned recipient", "suspend"),
        ("5.1.8", "550 5.1.8 Access denied, bad outbound sender", "rejected"),
        (
            "5.7.133",
            "550 5.7.133 RESOLVER.RST.SenderNotAuthenticatedForGroup; sender not authenticated for group",
            "rejected",
        ),
        ("5.7.606", "550 5.7.606 Access denied, banned sending IP [192.0.2.1]", "blocked"),
        ("5.4.317", "550 5.4.317 STARTTLS is required to send mail", "failedstarttls"),
        ("5.2.1", "550 5.2.1 Content Filter agent quarantined this message", "spamdetected"),
        (
            "5.6.11",
            "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal; message contains bare linefeeds",
            "contenterror",
        ),
    ],
)
def test_microsoft_ndr_texts(status: str, diag: str, reason: str) -> None:
    assert _one(_dsn(status, diag))[1:] == (reason, False)


def test_gateway_rewrapping_a_dsn_is_read_through() -> None:
    inner = _dsn(
        "5.1.1", "550 5.1.1 <gus@inner.example.org>... User unknown", rcpt="gus@inner.example.org"
    )
    outer = _msg(
        """
From: Mail Gateway <postmaster@gw.example.net>
To: sender@example.com
Subject: Returned mail: see transcript
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="OUT"
""",
        "--OUT\nContent-Type: text/plain\n\n"
        "The original message was received at Thu, 1 Jan 2015 00:00:00 +0000\n\n"
        "----- The following addresses had permanent delivery errors -----\n\n"
        "--OUT\nContent-Type: message/rfc822\n\n" + inner.decode() + "\n--OUT--\n",
    )
    assert _one(outer) == ("gus@inner.example.org", "userunknown", True)


# ---------------------------------------------------------------- hard/soft on every path
def test_delayed_dsn_is_never_hard() -> None:
    r = _one(
        _dsn(
            "4.1.1",
            "450 4.1.1 <fay@example.org>: Recipient address rejected: User unknown",
            "delayed",
        )
    )
    assert r[2] is False
    r = _one(_dsn("4.4.7", "", "delayed"))
    assert r[1:] == ("expired", False)


def test_failed_dsn_with_a_final_4xx_user_unknown_is_hard() -> None:
    # The reporting MTA gave up (Action: failed) on an unknown user: Sisimai's hard bounce.
    raw = _dsn(
        "4.1.1",
        "450 4.1.1 <fay@example.org>: Recipient address rejected: User unknown in virtual alias table",
    )
    assert _one(raw)[1:] == ("userunknown", True)


@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        (450, "4.1.1", "<a@example.org>: Recipient address rejected: User unknown"),
        (451, "4.1.2", "Domain not found"),
        (421, "4.3.2", "System not accepting network messages"),
        (450, "", "mailbox unavailable: no such user"),
    ],
)
def test_synchronous_4xx_is_never_hard(code: int, status: str, text: str) -> None:
    c = classify_reply(code, status, text)
    assert (c.hard, c.soft) == (False, True), c


def test_notaccept_is_hard_only_when_permanent() -> None:
    assert classify_reply(556, "5.1.10", "Recipient address has null MX").hard
    assert not classify_reply(453, "4.3.2", "System not accepting network messages").hard


def test_autoreply_is_not_a_bounce() -> None:
    raw = _msg(
        """
From: Hana <hana@example.org>
To: sender@example.com
Subject: Out of Office: report
Auto-Submitted: auto-replied
Content-Type: text/plain
""",
        "I am out of the office until Monday.\n",
    )
    (r,) = parse_bounce(raw)
    assert (r.recipient, r.reason, r.hard) == ("hana@example.org", "vacation", False)


# Apache James's notification to the sender (its mailets' AbstractNotify
# layout): the error, then "Message details:" summarising the returned
# message's envelope and headers; its multipart/alternative part's boundary
# parameter written on the next line without the fold's blank.
JAMES = b"""From: postmaster@gw.example.org
To: sender@example.com
Subject: Re:News
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="----=_Part_0_11.22"

------=_Part_0_11.22
Content-Type: multipart/alternative;
boundary="----=_Part_1_33.44"

------=_Part_1_33.44
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Error: Invalid user address

Error message below:
550 - Requested action not taken: mailbox full

Message details:
  Subject: News
  Sent date: Thu Jan 01 10:00:00 GMT 2026
  MAIL FROM: sender@example.com
  RCPT TO: frank@gw.example.org
  From: sender@example.com
  Size (in bytes): 1024
  Number of lines: 20

------=_Part_1_33.44--

------=_Part_0_11.22--
"""


def test_james_notification_reads_its_error_not_the_envelope_summary() -> None:
    (r,) = parse_bounce(JAMES)
    assert (r.recipient, r.reason, r.hard, r.reply_code) == (
        "frank@gw.example.org",
        "mailboxfull",
        False,
        550,
    ), r
    # The reply is the error section: no MIME boundary lines, no "MAIL FROM"
    # of the summary (a refusal at MAIL FROM would be about our sender).
    assert r.diagnostic.startswith("Error: Invalid user address"), r.diagnostic
    assert "boundary" not in r.diagnostic and "MAIL FROM" not in r.diagnostic
    # An unknown user there, with nothing saying which command was refused:
    # a filter's verdict (filtered), not "onhold" for want of evidence.
    unknown = JAMES.replace(b"mailbox full", b"no such user here")
    (r,) = parse_bounce(unknown)
    assert (r.recipient, r.reason, r.hard) == ("frank@gw.example.org", "filtered", False), r
