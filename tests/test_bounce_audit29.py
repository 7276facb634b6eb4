"""bnc29's audit of the bounce classifier: what decides a reason."""

from __future__ import annotations

import pytest

from fastsend.bounce import parse_bounce

POSTFIX_TEXT = """From: MAILER-DAEMON@mx.example.net
Subject: Undelivered Mail Returned to Sender

This is the mail system at host mx.example.net.

<{rcpt}>: host mx.example.org[192.0.2.1] said: {diag} (in reply to RCPT TO command)
"""

REPLIES = [
    "550 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
    "550 5.7.1 <{rcpt}>: Recipient address rejected: Access denied",
    "452 4.2.2 <{rcpt}>: Mailbox full",
    "550 5.1.1 <{rcpt}>... User unknown",
]
# Mailbox names that are words some reply means something by.
LOCALS = ["over.quota", "relay", "relay.denied", "spam", "virus", "blocked", "mailbox.full"]


@pytest.mark.parametrize("reply", REPLIES)
@pytest.mark.parametrize("local", LOCALS)
def test_the_mailbox_name_never_decides_the_reason(reply: str, local: str) -> None:
    """The same reply about bob@ and about relay@ (or over.quota@) is the
    same reason: the words of the recipient's own address are no evidence
    (a mailbox named "relay" made a user unknown a relay refusal, and
    "over.quota" one held with no reason at all, so it was never suppressed)."""

    def read(rcpt: str) -> tuple[str, bool]:
        (r,) = parse_bounce(POSTFIX_TEXT.format(rcpt=rcpt, diag=reply.format(rcpt=rcpt)).encode())
        assert r.recipient == rcpt
        assert rcpt in r.diagnostic  # the record keeps the reply as received
        return r.reason, r.hard

    assert read(f"{local}@example.org") == read("bob@example.org")


def test_a_site_known_by_the_recipients_domain_is_still_known() -> None:
    """The recipient's domain stays in what the rules read (NTT docomo's
    "550 Unknown user ADDR" after DATA is its reception filter)."""
    raw = POSTFIX_TEXT.format(
        rcpt="bob@docomo.ne.jp", diag="550 Unknown user bob@docomo.ne.jp"
    ).replace("RCPT TO command", "end of DATA command")
    (r,) = parse_bounce(raw.encode())
    assert (r.reason, r.hard) == ("rejected", False)
