"""Free-text bounces whose layout the corpus does not hold, written from the
formats their products document: which words belong to which recipient.

A free-text bounce gives each recipient the text between its mention and the
next recipient's. Two layouts broke that:

* words *before* the address on its line ("Unable to deliver message to
  <a@x>", Trend Micro InterScan's line per refused recipient; "550 5.2.2
  Mailbox full: <a@x>") went to the recipient named before it: with two
  recipients the first was filed under the second's reply (a full mailbox
  suppressed as an unknown user), the second got nothing;
* a list of recipients after one shared explanation (MailMarshal/Trustwave
  SEG: "Could not be delivered because of <reply> ... The following
  recipients were affected:") gave the last of the list the report's trailer
  ("Additional Information ...") as its reply: filed "expired".
"""

from __future__ import annotations

from fastsend.bounce import classify_reply, parse_bounce


def _mail(subject: str, body: str, sender: str = "postmaster@gw.example.net") -> bytes:
    return (
        f"From: {sender}\r\nTo: bounce@example.org\r\nSubject: {subject}\r\n"
        "Date: Tue, 3 Mar 2020 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain\r\n\r\n" + body.replace("\n", "\r\n")
    ).encode()


def _by_rcpt(raw: bytes) -> dict[str, object]:
    return {r.recipient: r for r in parse_bounce(raw)}


def test_reply_before_each_address_stays_with_its_address() -> None:
    # Each line names its reply first, then the address: the first
    # recipient's mailbox is full (soft), the second is unknown (hard). The
    # first was read with the second's "User unknown" and suppressed.
    raw = _mail(
        "Undelivered Mail Returned to Sender",
        "Your message could not be delivered to the following recipients:\n\n"
        "550 5.2.2 Mailbox full: <full@example.net>\n"
        "550 5.1.1 User unknown: <gone@example.net>\n",
    )
    got = _by_rcpt(raw)
    assert set(got) == {"full@example.net", "gone@example.net"}
    full, gone = got["full@example.net"], got["gone@example.net"]
    assert (full.reason, full.hard, full.status) == ("mailboxfull", False, "5.2.2")  # type: ignore[attr-defined]
    assert (gone.reason, gone.hard, gone.status) == ("userunknown", True, "5.1.1")  # type: ignore[attr-defined]


INTERSCAN = """\
This notification is from the InterScan Messaging Security Suite at
gw.example.net.

Unable to deliver message to <alice@example.net>.

Unable to deliver message to <bob@example.net> (and other recipients in the same domain).
"""


def test_interscan_unable_to_deliver_is_an_unknown_recipient() -> None:
    # InterScan MSS / IMSVA: one "Unable to deliver message to <ADDR>" line
    # per refused recipient, no reply quoted: was "expired" (a report that
    # gave up on a queue lifetime), soft, the address kept.
    got = _by_rcpt(_mail("Mail could not be delivered", INTERSCAN))
    assert set(got) == {"alice@example.net", "bob@example.net"}
    for r in got.values():
        assert (r.reason, r.hard) == ("userunknown", True)  # type: ignore[attr-defined]
        assert "Unable to deliver message to <" + r.recipient in r.diagnostic  # type: ignore[attr-defined]


def test_interscan_quoted_reply_decides() -> None:
    # With the next hop's reply quoted ("Sent <<< RCPT TO:" / "Received >>>"),
    # that reply says why: a refused relay is not an unknown user.
    body = (
        "This notification is from the InterScan Messaging Security Suite.\n\n"
        "Sent <<< RCPT TO:<carol@example.com>\n"
        "Received >>> 550 5.1.1 <carol@example.com>... User unknown\n\n"
        "Unable to deliver message to <carol@example.com>.\n\n"
        "Sent <<< RCPT TO:<dave@example.net>\n"
        "Received >>> 554 5.7.1 <dave@example.net>: Relay access denied\n\n"
        "Unable to deliver message to <dave@example.net>.\n"
    )
    got = _by_rcpt(_mail("Mail could not be delivered", body))
    carol, dave = got["carol@example.com"], got["dave@example.net"]
    assert (carol.reason, carol.hard, carol.command) == ("userunknown", True, "RCPT")  # type: ignore[attr-defined]
    assert (dave.reason, dave.hard, dave.command) == ("norelaying", False, "RCPT")  # type: ignore[attr-defined]
    c = classify_reply(
        0,
        "",
        "Received >>> 554 5.7.1 Message rejected as spam\n"
        "Unable to deliver message to <x@example.com>.",
        command="",
    )
    assert c.rule != "interscan-unable-to-deliver"


MAILMARSHAL = """\
Your message:
   From:    bounce@example.org
   Subject: Spring offers

Could not be delivered because of

550 5.1.1 User unknown

The following recipients were affected:
    jiro@example.com
    saburo@example.com

Additional Information
======================
Original Sender:    <bounce@example.org>
Sender-MTA:         <192.0.2.10>
Remote-MTA:         <192.0.2.20>
Reporting-MTA:      <gw.example.com>
MessageName:        <B000000000000.000000000001.0001.mml>
Last-Attempt-Date:  <10:00:00 Tue, 3 Mar 2020>
"""


def test_mailmarshal_every_listed_recipient_shares_the_reply() -> None:
    got = _by_rcpt(_mail('Undeliverable Mail: "Spring offers"', MAILMARSHAL))
    assert set(got) == {"jiro@example.com", "saburo@example.com"}
    for r in got.values():
        assert (r.reason, r.hard, r.status, r.reply_code) == ("userunknown", True, "5.1.1", 550)  # type: ignore[attr-defined]


def test_list_member_with_its_own_reply_keeps_it() -> None:
    # A list where the last address carries a reply of its own is not a
    # shared list: that reply decides for it.
    body = (
        "Delivery failed for the following recipients:\n\n"
        "<a@example.com>\n"
        "<b@example.com>: 552 5.2.2 Mailbox full\n"
    )
    got = _by_rcpt(_mail("Delivery failure", body))
    b = got["b@example.com"]
    assert (b.reason, b.status) == ("mailboxfull", "5.2.2")  # type: ignore[attr-defined]


def test_gateway_refusals_of_the_sender_are_rejected() -> None:
    # Sender-checking gateways' fixed texts: our sender refused, never the
    # recipient (these read "onhold" / a bare status before).
    for code, enh, text in [
        (550, "", "'bounce@example.org' is not a registered gateway user"),
        (550, "5.4.1", "All recipient addresses rejected : Access denied"),
        (550, "", "Rule imposed mailbox access for bounce@example.org refused"),
        (550, "", "denied [BOUNCEDENY]"),
    ]:
        c = classify_reply(code, enh, text, command="RCPT")
        assert (c.reason, c.hard, c.ip_blocked) == ("rejected", False, False), text


OFFICE365 = """\
Delivery has failed to these recipients or groups:

kijitora@example.com<mailto:kijitora@example.com>
The email address you entered couldn't be found. Please check the recipient's email \
address and try to resend the message.

neko@example.net<mailto:neko@example.net>
The recipient's mailbox is full and can't accept messages now. Please try resending \
this message later, or contact the recipient directly.

Diagnostic information for administrators:

Generating server: AB1PR00MB0001.eurprd00.prod.outlook.com

kijitora@example.com
Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found \
by SMTP address lookup'

neko@example.net
Remote Server returned '554 5.2.2 mailbox full; \
STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded'

Original message headers:

Received: from mail.example.org (192.0.2.1) by AB1PR00MB0001.eurprd00.prod.outlook.com
From: bounce@example.org
To: kijitora@example.com
Subject: Spring offers
"""


def test_each_recipients_later_section_is_its_own() -> None:
    # Office 365 / Exchange name each recipient twice: the user's summary,
    # then "Diagnostic information for administrators" with the server's
    # reply. Only the first mention was read: kijitora's 5.1.10 (an unknown
    # user, hard) was never seen and it was filed "expired" (soft, kept).
    got = _by_rcpt(_mail("Undeliverable: Spring offers", OFFICE365))
    assert set(got) == {"kijitora@example.com", "neko@example.net"}
    k, n = got["kijitora@example.com"], got["neko@example.net"]
    assert (k.reason, k.hard, k.status, k.reply_code) == (
        "userunknown",
        True,
        "5.1.10",
        550,
    )  # type: ignore[attr-defined]
    assert (n.reason, n.hard, n.status, n.reply_code) == (
        "mailboxfull",
        False,
        "5.2.2",
        554,
    )  # type: ignore[attr-defined]


MIMECAST = """\
An email that you attempted to send to the following address could not be delivered:

-- sabineko@example.org

The problem appears to be :

-- Recipient email address is possibly incorrect

Additional information follows :

-- 5.4.1 Recipient address rejected: Access denied. AS(201806281) \
[AM0PR00MB0000.eurprd00.prod.outlook.com]

This condition occurred after 1 attempt(s) to deliver over a period of 0 hour(s).
"""


def test_mimecast_notification_of_an_unknown_address() -> None:
    # Mimecast's "[Postmaster] Email Delivery Failure": its problem line, and
    # Exchange Online's Directory-Based Edge Blocking reply (5.4.1 "Recipient
    # address rejected: Access denied": no such recipient in the directory).
    got = _by_rcpt(_mail("[Postmaster] Email Delivery Failure", MIMECAST))
    r = got["sabineko@example.org"]
    assert (r.reason, r.hard, r.status) == ("userunknown", True, "5.4.1")  # type: ignore[attr-defined]
    c = classify_reply(550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)")
    assert (c.reason, c.hard) == ("userunknown", True)
    # Not its "All recipient addresses rejected : Access denied" (the sending
    # tenant refused), nor a relay refusal.
    c = classify_reply(550, "5.4.1", "All recipient addresses rejected : Access denied")
    assert c.reason == "rejected" and not c.hard
    c = classify_reply(550, "5.4.1", "Relay access denied")
    assert c.reason == "norelaying" and not c.hard


def test_messagelabs_542_rejected_is_an_unknown_address() -> None:
    # Symantec Email Security.cloud's own "542 <ADDR> Rejected" (an address
    # its registration does not hold): was "onhold" (no rule knew code 542).
    for text in ("542 kijitora@example.com Rejected", "542 <kijitora@example.com> Rejected"):
        c = classify_reply(542, "", text, command="RCPT")
        assert (c.reason, c.hard) == ("userunknown", True), text
    # Other words under 542 keep their own meaning.
    assert classify_reply(542, "", "542 Rejected: spam detected").reason == "spamdetected"


def test_help_desk_address_after_the_report_sentence_is_no_recipient() -> None:
    # Postfix's notice, localised by a provider: "could not be delivered to
    # one or more destinations" then a help desk's address in a sentence, then
    # the failed recipient's line. The help desk was recorded as a second
    # failed recipient (a bounce for an address never sent to).
    body = (
        "This is the Postfix program at host smtp.example.net.\n\n"
        "I'm sorry to have to inform you that the message returned\n"
        "below could not be delivered to one or more destinations.\n\n"
        "For further assistance, please contact <support@isp.example.net>\n\n"
        "If you do so, please include this problem report.\n\n"
        "<taro@example.org>: host mx.example.org[192.0.2.22] said: 550 5.1.1\n"
        "    <taro@example.org>: Recipient address rejected: User unknown (in reply\n"
        "    to RCPT TO command)\n"
    )
    got = parse_bounce(_mail("Undelivered Mail Returned to Sender", body))
    assert [r.recipient for r in got] == ["taro@example.org"]
    assert (got[0].reason, got[0].hard, got[0].command) == ("userunknown", True, "RCPT")


SENDMAIL = """\
The original message was received at Tue, 3 Mar 2020 10:00:00 +0000
from localhost [127.0.0.1]

   ----- The following addresses had permanent fatal errors -----
<a@example.com>
    (reason: 552 5.2.2 Mailbox Full)
<b@example.net>
    (reason: 550 Recipient rejected)

   ----- Transcript of session follows -----
... while talking to mx.example.com.:
>>> RCPT To:<a@example.com>
<<< 552 5.2.2 <a@example.com>... Mailbox Full
... while talking to mx.example.net.:
>>> DATA
<<< 550 <b@example.net>... User unknown
554 5.0.0 Service unavailable
"""


def test_sendmail_transcript_belongs_to_the_recipient_it_names() -> None:
    # sendmail lists the recipients, then one transcript per server: b's
    # reply (">>> DATA" / "<<< 550 <b>... User unknown": a filter after the
    # message, not an unknown mailbox) was never read for b, whose text
    # stopped at its list line ("onhold", its stage taken as RCPT).
    got = _by_rcpt(_mail("Returned mail: see transcript for details", SENDMAIL))
    a, b = got["a@example.com"], got["b@example.net"]
    assert (a.reason, a.command) == ("mailboxfull", "RCPT")  # type: ignore[attr-defined]
    assert (b.reason, b.hard, b.command) == ("filtered", False, "DATA")  # type: ignore[attr-defined]


GMAIL_STATE = """\
This is an automatically generated Delivery Status Notification

Delivery to the following recipient failed permanently:

     hanako@example.jp

Technical details of permanent failure:
Google tried to deliver your message, but it was rejected by the recipient domain. \
We recommend contacting the other email provider for further information about the \
cause of this error. The error that the other server returned was: \
550 550 Unknown user hanako@example.jp (state {state}).
"""


def test_gmail_state_names_the_refused_stage() -> None:
    # Gmail's older notices end the quoted reply with its client's state:
    # 14 at RCPT (an unknown user: hard), 18 after DATA (a filter's verdict on
    # the message: soft). State 18 was read as refused at RCPT and the
    # address suppressed.
    def one(state: int) -> object:
        raw = _mail(
            "Delivery Status Notification (Failure)",
            GMAIL_STATE.format(state=state),
            sender="mailer-daemon@googlemail.com",
        )
        (r,) = parse_bounce(raw)
        return r

    r14, r18 = one(14), one(18)
    assert (r14.reason, r14.hard, r14.command) == ("userunknown", True, "RCPT")  # type: ignore[attr-defined]
    assert (r18.reason, r18.hard, r18.command) == ("filtered", False, "DATA")  # type: ignore[attr-defined]
