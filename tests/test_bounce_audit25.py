"""Bounces read from outside (bnc25's audit, session 25), written from the
documented shapes of their formats, none from the corpus.

- A relay's summary quoting the remote reply with its address first (Amazon
  SES: "5.1.0 - Unknown address error 550-'a@b.example... No such user'")
  named a second, bogus recipient "550-'a@b.example" (its own record, hard:
  the intake found no such recipient) and left the real one "expired".
- A refusal of our sender whose words do not say "sender" read as the
  recipient's: "550 5.1.8 Domain not found" (RFC 3463 X.1.8: the sender's
  system address; Postfix's reject_unknown_sender_domain answers at RCPT by
  default) and "Your domain does not exist" were hostunknown, hard: the
  recipient suppressed for our own DNS; "Sender domain is invalid" and
  "Unable to verify sender domain" securityerror.
"""

from __future__ import annotations

import pytest

from fastsend.bounce import classify_reply, parse_bounce

# ---------------------------------------------------------------- quoted replies
SES_TEXT = """\
From: MAILER-DAEMON@email-bounces.amazonses.com
To: news@sender.example
Subject: Delivery Status Notification (Failure)
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8

The following message to <{to}> was undeliverable.
The reason for the problem:
5.1.0 - Unknown address error {reply} (delivery attempts: 0)
"""

NOTICE = """\
From: MAILER-DAEMON@mx.sender.example
To: news@sender.example
Subject: Undeliverable mail

Your message could not be delivered.

{body}
"""


def _records(raw: str) -> list[tuple[str, str, bool]]:
    return [(r.recipient, r.reason, r.hard) for r in parse_bounce(raw.encode())]


def test_an_address_opening_a_quoted_reply_is_the_recipient_not_a_second_one() -> None:
    raw = SES_TEXT.format(to="vic@rcpt.example", reply="550-'vic@rcpt.example... No such user'")
    assert _records(raw) == [("vic@rcpt.example", "userunknown", True)]


def test_a_quoted_reply_naming_its_address_answers_rcpt() -> None:
    for body in (
        "Recipient: vic@rcpt.example\nReason: 550 'vic@rcpt.example... No such user'",
        "<vic@rcpt.example>:\n550-'vic@rcpt.example... No such user'\n550 Check the address",
    ):
        (r,) = parse_bounce(NOTICE.format(body=body).encode())
        assert (r.recipient, r.command, r.reason, r.hard) == (
            "vic@rcpt.example",
            "RCPT",
            "userunknown",
            True,
        ), body


def test_an_apostrophe_inside_a_local_part_stays() -> None:
    raw = NOTICE.format(body="<o'brien@rcpt.example>: 550 5.1.1 User unknown")
    assert _records(raw) == [("o'brien@rcpt.example", "userunknown", True)]


# ---------------------------------------------------------------- our sender refused
SENDER_REFUSALS = [
    (550, "5.1.8", "Domain not found"),
    (553, "5.1.8", "Host unknown"),
    (550, "5.1.7", "No such domain"),
    (450, "4.1.8", "Domain not found"),
    (550, "", "Your domain does not exist"),
    (550, "", "The domain of your email address does not exist"),
    (550, "", "Your e-mail domain could not be resolved"),
    (554, "5.7.1", "Sender domain is invalid"),
    (550, "5.7.1", "Unable to verify sender domain"),
    (550, "", "Return-path address is not valid"),
]


@pytest.mark.parametrize(("code", "status", "text"), SENDER_REFUSALS)
@pytest.mark.parametrize("stage", ["RCPT", "DATA", ""])
def test_a_refusal_of_our_sender_is_rejected_never_the_recipients(
    code: int, status: str, text: str, stage: str
) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.reason, c.hard) == ("rejected", False), c.rule


@pytest.mark.parametrize(
    ("code", "status", "text", "want"),
    [
        (550, "5.1.2", "Domain not found", "hostunknown"),
        (550, "", "Host unknown", "hostunknown"),
        (550, "", "Unrouteable address", "hostunknown"),
        (550, "5.1.1", "No such user", "userunknown"),
    ],
)
def test_the_recipients_own_domain_or_mailbox_stays_hard(
    code: int, status: str, text: str, want: str
) -> None:
    c = classify_reply(code, status, text, command="RCPT")
    assert (c.reason, c.hard) == (want, True), c.rule


POSTFIX_DSN = """\
From: MAILER-DAEMON@mx.sender.example (Mail Delivery System)
To: news@sender.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

<vic@rcpt.example>: host mx.rcpt.example[192.0.2.9] said: {reply} (in reply to
    RCPT TO command)

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.example

Final-Recipient: rfc822; vic@rcpt.example
Action: failed
Status: {status}
Diagnostic-Code: smtp; {reply}

--b--
"""


@pytest.mark.parametrize(
    ("reply", "status"),
    [("550 5.1.8 Domain not found", "5.1.8"), ("550 Your domain does not exist", "5.0.0")],
)
def test_a_dsn_of_a_sender_refusal_suppresses_no_recipient(reply: str, status: str) -> None:
    (r,) = parse_bounce(POSTFIX_DSN.format(reply=reply, status=status).encode())
    assert (r.recipient, r.reason, r.hard) == ("vic@rcpt.example", "rejected", False)
