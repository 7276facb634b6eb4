"""Bounces read from outside (bnc25's audit, session 25), written from the
documented shapes of their formats, none from the corpus.

- A relay's summary quoting the remote reply with its address first (Amazon
  SES: "5.1.0 - Unknown address error 550-'a@b.example... No such user'")
  named a second, bogus recipient "550-'a@b.example" (its own record, hard:
  the intake found no such recipient) and left the real one "expired".
"""

from __future__ import annotations

from fastsend.bounce import parse_bounce

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
