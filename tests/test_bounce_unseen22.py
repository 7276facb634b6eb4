"""Bounces whose texts the corpus does not hold, written from what their
products and RFCs document: the stage a reply answered and the reason it names.

Gmail's older notices end the reply they quote with its client's state
("... (state 14)."); the states before a transaction (6 and 9 at STARTTLS,
8 and 12 at AUTH with a relay Gmail was told to use) were not read, so a
server that does not support TLS, or refuses relaying at AUTH, was "onhold"
(no evidence), and the session's stage was unknown.
"""

from __future__ import annotations

import pytest

from fastsend.bounce import classify_reply, parse_bounce


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
