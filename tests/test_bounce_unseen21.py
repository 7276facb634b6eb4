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
