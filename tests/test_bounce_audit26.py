"""Bounces read from outside (bnc26's audit, session 26), written from the
documented shapes of their formats, none from the corpus.

- Exchange's refusal of a sender that may not send as the From address
  ("550 5.2.252 SendAsDenied; a@x not allowed to send as b@y",
  STOREDRV.Submission's SendAsDeniedException, "Client does not have
  permissions to send as this sender") read onhold / filtered /
  securityerror: it is our sender refused ("rejected").
- RFC 5321's 551 "User not local; please try <forward-path>" and RFC 3463's
  X.1.6 ("mailbox has moved") read userunknown: the address has moved
  (hasmoved).
- "451 4.7.1 Please try again later" (greylisting, a filter's soft reject)
  was a slow-down signal (rate_limited: the site's AIMD rate cut, its mail
  slowed, for a retry asked for): the 4xx's usual "try again later" under a
  policy status X.7.x slows nothing unless the code is 421.
- EZweb's notice states why above its list ("The user(s) account is
  disabled.") and quotes a generic "550 user unknown" beside the address:
  read from the quoted line alone it was a hard userunknown (suppressed);
  the notice's statement is the reason (suspend; over quota: mailboxfull).
"""

from __future__ import annotations

import pytest

from fastsend.bounce import classify_reply, parse_bounce

# ---------------------------------------------------------------- send-as refusals
SEND_AS = [
    (550, "5.2.252", "SendAsDenied; sender@ours.example not allowed to send as "
     "news@ours.example; STOREDRV.Submission.Exception:SendAsDeniedException."
     "MapiExceptionSendAsDenied", "RCPT"),
    (550, "5.2.252", "SendAsDenied; x@ours.example not allowed to send as y@ours.example",
     "DATA"),
    (554, "5.2.0", "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied;"
     " Failed to process message due to a permanent exception with message Cannot submit"
     " message.", "DATA"),
    (550, "5.7.60", "SMTP; Client does not have permissions to send as this sender", "DATA"),
    (550, "5.7.1", "Client does not have permission to send as this sender", "MAIL"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), SEND_AS)
def test_a_send_as_refusal_is_our_sender_rejected(
    code: int, status: str, text: str, stage: str
) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.reason, c.hard, c.ip_blocked) == ("rejected", False, False)


def _dsn(to: str, status: str, diag: str, *, text: str = "") -> bytes:
    return f"""\
From: MAILER-DAEMON@relay.example
To: news@ours.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain; charset=us-ascii

{text or "The mail system could not deliver your message."}

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.example

Final-Recipient: rfc822; {to}
Action: failed
Status: {status}
{"Diagnostic-Code: smtp; " + diag if diag else ""}

--B--
""".encode()


def test_a_send_as_refusal_in_a_dsn_suppresses_no_recipient() -> None:
    (r,) = parse_bounce(
        _dsn("bob@their.example", "5.2.252",
             "550 5.2.252 SendAsDenied; a@ours.example not allowed to send as b@ours.example")
    )  # fmt: skip
    assert (r.recipient, r.reason, r.hard) == ("bob@their.example", "rejected", False)


# ---------------------------------------------------------------- moved mailboxes
MOVED = [
    (551, "5.1.6", "User not local; please try <bob@new.example>", "RCPT"),
    (551, "", "User not local; please try <bob@new.example>", "RCPT"),
    (551, "", "5.1.6 User not local; please try <bob@new.example>", ""),
    (550, "5.1.6", "Recipient address has moved", "RCPT"),
    (550, "5.1.6", "User unknown, mailbox has moved", "RCPT"),
    (551, "", "user not local; please try <bob@new.example>", "DATA"),
]


@pytest.mark.parametrize(("code", "status", "text", "stage"), MOVED)
def test_a_moved_mailbox_is_hasmoved(code: int, status: str, text: str, stage: str) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.reason, c.hard) == ("hasmoved", True)


def test_a_moved_mailbox_in_a_dsn_is_hasmoved_hard() -> None:
    (r,) = parse_bounce(
        _dsn("bob@old.example", "5.1.6", "551 5.1.6 User not local; please try <bob@new.example>")
    )
    assert (r.recipient, r.reason, r.hard) == ("bob@old.example", "hasmoved", True)


def test_a_user_unknown_without_a_move_stays_userunknown() -> None:
    for code, status, text in [
        (550, "5.1.1", "User not local"),
        (550, "", "User unknown"),
        (550, "5.1.1", "<bob@x.example>: Recipient address rejected: User unknown"),
    ]:
        c = classify_reply(code, status, text, command="RCPT")
        assert (c.reason, c.hard) == ("userunknown", True), text


# ---------------------------------------------------------------- greylisting
# A temporary refusal under a policy status (X.7.x) whose only words are the
# 4xx's usual "try again later" is a retry asked for (greylisting, RFC 6647;
# a soft reject), not a slower pace: no feedback loop.
POLICY_DEFERRALS = [
    (451, "4.7.1", "Try again later", "RCPT"),
    (451, "4.7.1", "try again later", "MAIL"),
    (451, "4.7.1", "Please try again later", "DATA"),
    (450, "4.7.1", "<bob@their.example>: Recipient address rejected: Please try again later",
     "RCPT"),
    (451, "4.7.0", "Temporary policy rejection, try again later", "RCPT"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), POLICY_DEFERRALS)
def test_a_policy_deferral_asking_to_try_later_slows_nothing(
    code: int, status: str, text: str, stage: str
) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.hard, c.rate_limited, c.ip_blocked) == (False, False, False), c


# Words that name the pace still do, under any status; a 421 (the server
# closing the channel) asking to come back later still sheds load.
STILL_SLOW = [
    (451, "4.7.1", "Rate limit exceeded, try again later", "RCPT"),
    (450, "4.7.1", "Too many messages from your IP, try again later", "MAIL"),
    (421, "4.7.1", "Try again later", "MAIL"),
    (451, "", "Ratelimit exceeded for mailbox. Try again later", "RCPT"),
    (451, "4.3.0", "Temporary local problem, try again later", "RCPT"),
]
# (A bare "451 Try again later", no status, names no pace either: greylisting
# answers so; tests/test_bounce_audit27.py.)


@pytest.mark.parametrize(("code", "status", "text", "stage"), STILL_SLOW)
def test_a_deferral_about_the_pace_still_slows_down(
    code: int, status: str, text: str, stage: str
) -> None:
    assert classify_reply(code, status, text, command=stage).rate_limited


# ---------------------------------------------------------------- a notice's own statement
# EZweb (au/KDDI) states why above its list of recipients ("The user(s)
# account is disabled.") and quotes a generic "550 user unknown" beside each
# address: the notice's statement is the reason (a disabled account is no
# unknown user: never suppressed as one).
EZWEB_DSN = """\
From: Mail Administrator <Postmaster@ezweb.ne.jp>
To: news@ours.example
Subject: Mail System Error - Returned Mail
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="Z"

--Z
Content-Type: text/plain; charset=us-ascii

{statement}


<{to}>: 550 user unknown (in reply to RCPT TO command)

--Z
Content-Type: message/delivery-status

Reporting-MTA: dns; lsean.ezweb.ne.jp

Final-Recipient: rfc822; {to}
Action: failed
Status: 5.0.0

--Z--
"""
EZWEB_TEXT = """\
From: Mail Administrator <Postmaster@ezweb.ne.jp>
To: news@ours.example
Subject: Mail System Error - Returned Mail
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

{statement}


<{to}>: 550 user unknown (in reply to RCPT TO command)
"""
STATEMENTS = [
    ("The user(s) account is disabled.", "suspend"),
    ("The user(s) account is temporarily limited.", "suspend"),
    ("The user(s) account is temporarily over quota.", "mailboxfull"),
]


@pytest.mark.parametrize("shape", [EZWEB_DSN, EZWEB_TEXT], ids=["dsn", "text"])
@pytest.mark.parametrize(("statement", "reason"), STATEMENTS)
def test_a_notices_statement_above_its_list_is_the_reason(
    shape: str, statement: str, reason: str
) -> None:
    (r,) = parse_bounce(shape.format(statement=statement, to="bob@ezweb.ne.jp").encode())
    assert (r.recipient, r.reason, r.hard) == ("bob@ezweb.ne.jp", reason, False)


@pytest.mark.parametrize("shape", [EZWEB_DSN, EZWEB_TEXT], ids=["dsn", "text"])
def test_a_notice_saying_nothing_of_the_account_leaves_the_reply(shape: str) -> None:
    statement = "This is the mail system at host mx.example.\n\nI'm sorry to have to inform you."
    (r,) = parse_bounce(shape.format(statement=statement, to="bob@ezweb.ne.jp").encode())
    assert (r.reason, r.hard) == ("userunknown", True)


def test_the_recipients_own_diagnostic_code_is_not_overruled() -> None:
    """A DSN whose Diagnostic-Code says why keeps it: the notice's prose
    above is the reporting MTA's summary, not the remote server's word."""
    raw = _dsn("bob@their.example", "5.1.1", "550 5.1.1 <bob@their.example>: User unknown",
               text="Your mailbox is full? The account is disabled? We cannot tell.")  # fmt: skip
    (r,) = parse_bounce(raw)
    assert (r.reason, r.hard) == ("userunknown", True)


# ---------------------------------------------------------------- the client's IP named
# A refusal whose words name our sending IP as what is refused, from a site no
# rule knows by name: blocked (it rests the IP for the site), not onhold.
CLIENT_IP = [
    (554, "", "IP=192.0.2.254 - A problem occurred. (Ask your postmaster for help.)", "RCPT"),
    (550, "", "Unfortunately, messages from 198.51.100.7 weren't sent.", "RCPT"),
    (554, "", "Mail from [198.51.100.7] is not accepted here", "DATA"),
    (550, "", "Invalid sending IP", "RCPT"),
    (550, "5.0.0", "Rejected: IP: 198.51.100.7 (contact postmaster)", "DATA"),
]


@pytest.mark.parametrize(("code", "status", "text", "stage"), CLIENT_IP)
def test_a_refusal_naming_our_ip_is_blocked(code: int, status: str, text: str, stage: str) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.reason, c.hard, c.ip_blocked) == ("blocked", False, True)


def test_an_ip_in_a_reply_about_something_else_stays_that() -> None:
    c = classify_reply(550, "5.1.1", "User unknown (IP=192.0.2.1)", command="RCPT")
    assert (c.reason, c.hard) == ("userunknown", True)
    c = classify_reply(550, "", "Sender address rejected: IP=192.0.2.1", command="MAIL")
    assert c.reason == "rejected"


def test_a_host_that_will_not_relay_for_a_user_not_local() -> None:
    """RFC 5321's "550 User not local; will not relay" (no forward-path
    given): the server is no relay for that domain, not a moved mailbox."""
    c = classify_reply(550, "", "User not local; will not relay", command="RCPT")
    assert (c.reason, c.hard) == ("norelaying", False)


def test_a_statement_speaks_only_for_the_list_right_below_it() -> None:
    """Two lists, each under its own heading: the first heading ("over
    quota") is not the second list's reason."""
    raw = """\
From: Mail Administrator <postmaster@mx.example>
To: news@ours.example
Subject: Returned mail
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

The following recipients are over quota:

<a@their.example>

The following recipients were refused:

<b@their.example>: 550 user unknown (in reply to RCPT TO command)
"""
    got = {r.recipient: (r.reason, r.hard) for r in parse_bounce(raw.encode())}
    assert got["b@their.example"] == ("userunknown", True)


@pytest.mark.parametrize(
    "text",
    [
        "The email account that you tried to reach is inactive.",
        "The mailbox you are trying to reach is disabled",
        "The account you tried to contact has been deactivated",
        "Recipient address rejected: User bob@their.example temporary locked.",
        "Mailbox <bob@their.example> is temporarily disabled",
    ],
)
def test_an_account_named_by_a_relative_clause_is_suspended(text: str) -> None:
    """A disabled or inactive account said with the clause that names it
    (from a site no rule knows by name): suspend, never suppressed."""
    c = classify_reply(550, "5.2.1", text, command="RCPT")
    assert (c.reason, c.hard) == ("suspend", False)
    c = classify_reply(550, "", text, command="RCPT")
    assert (c.reason, c.hard) == ("suspend", False)
