"""bnc28's audit of the bounce reader and classifier (session 28).

- A plain-text report listing many recipients ("<a@x>: 550 ..." lines, as
  Postfix, qmail and Exim write them) was read in time quadratic in their
  number: the notice's lead-in was looked for with one search of the whole
  text per recipient. 24,000 recipients (the intake's 1 MiB) took ~6 s of CPU,
  past the intake's 2 s cap: the parse was killed and every record lost. The
  first mention is now found in one pass over the text's addresses.
- "550 Your address 192.0.2.1 is blacklisted" read "rejected" (a listed
  sender address: no IP block): the "address" it names is an IP literal, the
  client's. It is now "blocked" (and rests the IP), as the corpus labels "IP
  address blacklisted by recipient"; a listed mailbox stays "rejected".
- A qmail report whose status is X.4.3 ("Directory server failure", qmail's
  "(#4.4.3)") in words no rule knows read "expired": every qmail report that
  ran out of time ends "I'm not going to try again; this message has been in
  the queue too long.", and that weak rule outranked the status. The status
  names why it failed: "systemerror" (cv-strict 80.1 -> 80.4).
- "DNS lookup failure: 192.0.2.1 - try again later" (the connecting IP's
  name could not be looked up: a PTR refusal, as Sisimai's RequirePTR phrases
  collect it) read "onhold" (or "rejected" at MAIL FROM): now "requireptr".
"""

from __future__ import annotations

import time

import pytest

from fastsend.bounce import classify_reply, parse_bounce

PLAIN = b"From: MAILER-DAEMON@example.net\nSubject: Undelivered Mail Returned to Sender\n\n"


def _listing(n: int) -> bytes:
    return PLAIN + b"".join(b"<u%d@example.org>: 550 5.1.1 user unknown\n" % i for i in range(n))


def _cpu(raw: bytes) -> tuple[float, int]:
    t0 = time.process_time()
    recs = parse_bounce(raw)
    return time.process_time() - t0, len(recs)


def test_a_long_recipient_list_is_read_in_linear_time() -> None:
    # CPU time, compared within the test (a loaded host slows both sides):
    # eight times the recipients cost about eight times the CPU when the
    # reading is linear; the quadratic reading cost over 20 times.
    _cpu(_listing(10))  # rules loaded, caches warm
    small, n_small = _cpu(_listing(4000))
    large, n_large = _cpu(_listing(32000))
    assert (n_small, n_large) == (4000, 32000)
    assert large <= 14 * small + 0.5, f"4,000: {small:.2f}s, 32,000: {large:.2f}s CPU"
    recs = parse_bounce(_listing(3))
    assert [(r.recipient, r.reason, r.hard) for r in recs] == [
        (f"u{i}@example.org", "userunknown", True) for i in range(3)
    ]


# ---------------------------------------------------------------- an IP literal named as "your address"
IP_LISTED = [
    (550, "", "Your address 192.0.2.1 is blacklisted", ""),
    (550, "", "Your address 192.0.2.1 is blacklisted", "RCPT"),
    (554, "5.7.1", "Your address [192.0.2.1] has been blacklisted", "MAIL"),
    (550, "", "Address 192.0.2.1 is listed on our blocklist", "RCPT"),
    (550, "", "your address [IPv6:2001:db8::25] is blacklisted", "RCPT"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), IP_LISTED)
def test_an_ip_literal_listed_as_your_address_is_blocked(
    code: int, status: str, text: str, stage: str
) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.reason, c.hard, c.ip_blocked) == ("blocked", False, True), c


ADDRESS_LISTED = [
    (550, "", "Your email address has been blacklisted", "RCPT"),
    (550, "", "Sender address kijitora@example.org is blacklisted (192.0.2.1)", "RCPT"),
    (550, "", "Your address kijitora@example.org is blacklisted", "MAIL"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), ADDRESS_LISTED)
def test_a_listed_mailbox_stays_a_sender_refusal(
    code: int, status: str, text: str, stage: str
) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.reason, c.ip_blocked) == ("rejected", False), c


# ---------------------------------------------------------------- qmail's (#4.4.3) after "queue too long"
QMAIL = (
    b"From: MAILER-DAEMON@mx.example.net\nTo: sender@example.org\n"
    b"Subject: failure notice\n\n"
    b"Hi. This is the qmail-send program at mx.example.net.\n"
    b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
    b"This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
    b"<rcpt@example.com>:\n%s I'm not going to try again; this\n"
    b"message has been in the queue too long.\n\n"
    b"--- Below this line is a copy of the message.\n\nSubject: hi\n\nbody\n"
)


@pytest.mark.parametrize(
    "said",
    [b"Directory service lookup failed. (#4.4.3)", b"Unable to reach the user directory. (#4.4.3)"],
)
def test_a_directory_failure_that_ran_out_of_time_is_a_system_error(said: bytes) -> None:
    (r,) = parse_bounce(QMAIL % said)
    assert (r.recipient, r.status, r.reason, r.hard) == (
        "rcpt@example.com",
        "4.4.3",
        "systemerror",
        False,
    ), r


def test_a_report_that_ran_out_of_time_otherwise_stays_expired() -> None:
    (r,) = parse_bounce(QMAIL % b"Resources temporarily unavailable, please retry. (#4.3.0)")
    assert (r.reason, r.hard) == ("expired", False), r


# ---------------------------------------------------------------- the client's own name lookup failed
@pytest.mark.parametrize(
    ("code", "text", "stage"),
    [
        (450, "DNS lookup failure: 192.0.2.1 - try again later", "MAIL"),
        (550, "dns lookup failure: [192.0.2.1], try again later", "RCPT"),
        (451, "DNS lookup failure: 2001:db8::25 try again later", ""),
    ],
)
def test_a_failed_lookup_of_the_client_ip_is_requireptr(code: int, text: str, stage: str) -> None:
    assert classify_reply(code, "", text, command=stage).reason == "requireptr"


def test_a_failed_lookup_of_the_recipient_domain_is_not() -> None:
    text = (
        "Host or domain name not found. Name service error for name=example.com: DNS lookup failure"
    )
    assert classify_reply(450, "", text, command="RCPT").reason != "requireptr"
