"""bnc27's audit of the bounce classifier (session 27).

- A 4xx whose only words are the usual "(please) try again later", with no
  status saying what failed (none, or the undefined X.0.0), was a slow-down
  signal (rate_limited): OpenBSD spamd's greylisting answers "451 Temporary
  failure, please try again later" to every new (IP, sender, recipient)
  triplet, so the first mail to a greylisting site cut its rate. Such a reply
  names no pace: it slows nothing by itself (a 421 still does, and words or a
  status naming the pace or the system). Whether it was the recipient's or
  the site's is then told by the pipeline (shaping.lanes.recipient_only) and
  a site deferring most mail is still cut by its deferred share.
"""

from __future__ import annotations

import pytest

from fastsend.bounce import classify_reply, parse_bounce

# ---------------------------------------------------------------- greylisting without a status
GREYLIST_LIKE = [
    (451, "", "Temporary failure, please try again later.", "RCPT"),
    (451, "", "Temporary failure, please try again later", ""),
    (450, "", "Please try again later", "RCPT"),
    (451, "4.0.0", "Temporary failure, please try again later", "RCPT"),
    (451, "", "Try again later", "DATA"),
    (451, "", "Try again later", "RCPT"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), GREYLIST_LIKE)
def test_a_wordless_try_later_slows_nothing(code: int, status: str, text: str, stage: str) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.hard, c.rate_limited, c.ip_blocked) == (False, False, False), c


THROTTLES = [
    (421, "", "Temporary failure, please try again later", "CONN"),
    (421, "", "Try again later", "RCPT"),
    (451, "", "Too many messages, slow down and try again later", "RCPT"),
    (450, "", "Rate limit exceeded, try again later", "MAIL"),
    (451, "4.3.2", "System not accepting network messages, try again later", "RCPT"),
    (452, "", "Too many connections from your host, try again later", "RCPT"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), THROTTLES)
def test_throttling_wording_still_slows(code: int, status: str, text: str, stage: str) -> None:
    assert classify_reply(code, status, text, command=stage).rate_limited


def test_spamd_greylisting_one_recipient_does_not_cut_the_site() -> None:
    """A group of four, the first recipient greylisted by spamd ("451
    Temporary failure, please try again later", a new triplet), the other
    three taken: before, the reply was a slow-down and cut the site's AIMD
    rate; now it is that recipient's deferral, and a site answering it to
    every message is still cut (its deferred share)."""
    from tests.test_guard_audit24 import OK, a_lane

    from fastsend.outcome import DEFERRED, Outcome, TxnResult

    grey = Outcome(DEFERRED, 451, "", "Temporary failure, please try again later.", "rcpt")
    ln = a_lane()
    t = 10.0
    for _ in range(10):
        ln.aimd.sent(t, 4)  # type: ignore[union-attr]
        ln.observe([TxnResult(0, [grey]), TxnResult(1, [OK]), TxnResult(2, [OK]),
                    TxnResult(3, [OK])], t)  # fmt: skip
        t += 2.0
    assert ln.rate() == 200, ln.events
    assert not [e for e in ln.events if e["action"] == "aimd_decrease"], ln.events
    for _ in range(10):
        ln.aimd.sent(t, 4)  # type: ignore[union-attr]
        ln.observe([TxnResult(i, [grey]) for i in range(4)], t)
        t += 2.0
    assert ln.rate() < 200 and [e for e in ln.events if e["action"] == "aimd_decrease"]


# ---------------------------------------------------------------- a list, then another's reply
def _notice(body: str) -> bytes:
    return (
        "From: MAILER-DAEMON@relay.example\nTo: news@ours.example\n"
        "Subject: Undelivered Mail Returned to Sender\n\n" + body
    ).encode()


LISTED_ALONE = [
    "The following addresses had permanent fatal errors:\n<a@x.example>\n\n"
    "<b@y.example>: 550 5.1.1 User unknown\n",
    "Delivery to the following recipients failed permanently:\n\n    <a@x.example>\n\n"
    "<b@y.example>: host mx.y.example[192.0.2.1] said: 550 5.1.1 <b@y.example>: User unknown"
    " (in reply to RCPT TO command)\n",
    "Your message could not be delivered to the following recipients:\na@x.example\n"
    "b@y.example: 550 5.1.1 User unknown\n",
    "Hi. This is the qmail-send program at relay.example.\nI'm afraid I wasn't able to deliver"
    " your message to the following addresses.\nThis is a permanent error; I've given up.\n\n"
    "<a@x.example>:\n\n<b@y.example>:\n550 5.1.1 User unknown\n",
]


@pytest.mark.parametrize("body", LISTED_ALONE)
def test_a_recipient_listed_alone_is_not_given_anothers_reply(body: str) -> None:
    """A notice lists <a@x> under its heading with no words of its own, and
    below it "<b@y>: 550 5.1.1 User unknown". Before, a was read with the
    whole report as its explanation: b's reply, a hard userunknown
    (suppressed for b's mailbox). Now a failed for a reason the report does
    not give (soft), b is the unknown user."""
    got = {r.recipient: r for r in parse_bounce(_notice(body))}
    assert set(got) == {"a@x.example", "b@y.example"}, got
    assert (got["b@y.example"].reason, got["b@y.example"].hard) == ("userunknown", True)
    a = got["a@x.example"]
    assert not a.hard and a.reason != "userunknown" and a.status != "5.1.1", a


def test_a_reply_below_a_list_is_every_listed_recipients() -> None:
    """The reply given once below the list, on no recipient's line, is still
    the explanation they all share."""
    body = (
        "The following recipients failed:\n  a@x.example\n  b@x.example\n\n"
        "Reason: 550 5.1.1 User unknown\n"
    )
    got = {r.recipient: (r.reason, r.hard) for r in parse_bounce(_notice(body))}
    assert got == {"a@x.example": ("userunknown", True), "b@x.example": ("userunknown", True)}


# ---------------------------------------------------------------- a list of addresses
ADDRESS_LISTED = [
    (550, "", "blacklisted address", "RCPT"),
    (554, "5.7.1", "Blacklisted address", "RCPT"),
    (550, "", "Sorry, you are sending to/from an address that has been blacklisted", "RCPT"),
    (550, "5.7.1", "<news@ours.example>: this address is blocklisted here", "MAIL"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), ADDRESS_LISTED)
def test_a_listed_address_is_rejected_and_rests_no_ip(
    code: int, status: str, text: str, stage: str
) -> None:
    """An address on a block list, no IP named: was "blocked" with ip_blocked
    (the IP rested for the site, every other sender's mail there held). The
    sender or the address is refused: rejected, no IP signal."""
    c = classify_reply(code, status, text, command=stage)
    assert (c.reason, c.hard, c.ip_blocked) == ("rejected", False, False), c


IP_LISTED = [
    (550, "", "Your IP address is blacklisted", "RCPT"),
    (550, "5.7.1", "Client host [192.0.2.1] blocked using zen.spamhaus.org", "RCPT"),
    (554, "", "Service unavailable; client [192.0.2.9] blacklisted address of your server",
     "CONN"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), IP_LISTED)
def test_a_listed_ip_is_still_blocked(code: int, status: str, text: str, stage: str) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert c.reason == "blocked" and c.ip_blocked, c


# ---------------------------------------------------------------- failed authentication checks
AUTH_CHECKS = [
    (550, "5.7.1", "This message does not have authentication information or fails to pass"
     " authentication checks (SPF or DKIM)", "DATA"),
    (550, "5.7.1", "<a@their.example>: Recipient address rejected: multiple authentication"
     " checks failed", "RCPT"),
    (550, "", "Message failed authentication checks", "DATA"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), AUTH_CHECKS)
def test_failed_authentication_checks_are_authfailure(
    code: int, status: str, text: str, stage: str
) -> None:
    """The message's authentication (SPF, DKIM, DMARC) failed, in any
    receiver's words: authfailure (was the status's securityerror, or
    onhold), a fix in our DNS or signing, not a refusal of the recipient."""
    assert classify_reply(code, status, text, command=stage).reason == "authfailure"


def test_a_refused_smtp_login_is_not_authfailure() -> None:
    c = classify_reply(535, "5.7.8", "Username and Password not accepted; authentication check"
                       " failed", command="AUTH")  # fmt: skip
    assert c.reason != "authfailure", c
