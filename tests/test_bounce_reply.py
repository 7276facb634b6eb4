"""Synchronous reply classification: a table of (code, status, text) -> reason, hard."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsend.bounce import RuleError, RuleSet, classify_reply, load_rules

# (code, enhanced, text, command, reason, hard)
TABLE = [
    (
        550,
        "5.1.1",
        "<a@example.com>: Recipient address rejected: User unknown in local recipient table",
        "RCPT",
        "userunknown",
        True,
    ),
    (
        550,
        "5.1.1",
        "The email account that you tried to reach does not exist.",
        "RCPT",
        "userunknown",
        True,
    ),
    (550, "", "No such user here", "RCPT", "userunknown", True),
    (550, "", "User unknown", "DATA", "filtered", False),
    (
        552,
        "5.2.2",
        "The email account that you tried to reach is over quota.",
        "RCPT",
        "mailboxfull",
        False,
    ),
    (452, "4.2.2", "Mailbox full", "RCPT", "mailboxfull", False),
    (550, "5.1.2", "Host or domain name not found", "RCPT", "hostunknown", True),
    (550, "5.1.10", "Recipient address has null MX", "RCPT", "notaccept", True),
    (556, "", "Domain does not accept mail", "RCPT", "notaccept", True),
    (550, "5.1.6", "Recipient mailbox has moved", "RCPT", "hasmoved", True),
    (552, "5.3.4", "Message size exceeds fixed maximum message size", "DATA", "mesgtoobig", False),
    # Documented replies (see the rules' ref): sendmail's ratecontrol, a virus
    # scanner, a URI blocklist, T-Online's (BL), Cox's AUP# codes.
    (421, "4.3.2", "Connection rate limit exceeded.", "CONN", "toomanyconn", False),
    (554, "5.6.4", "Virus e-mail blocked", "DATA", "virusdetected", False),
    (554, "", "Message rejected: a link in it is listed on SURBL", "DATA", "spamdetected", False),
    (
        554,
        "",
        "IP=192.0.2.7 - A problem occurred. (Ask your postmaster for help or to contact"
        " tosa@rx.t-online.de to clarify.) (BL)",
        "CONN",
        "blocked",
        False,
    ),
    (550, "5.1.0", "<s@example.com> sender rejected. AUP#CXBL", "MAIL", "blocked", False),
    (554, "", "Connection refused. AUP#CXDNS", "CONN", "requireptr", False),
    (550, "", "Message rejected. AUP#CXSNDR", "DATA", "authfailure", False),
    (421, "", "Too many sessions. AUP#CXCNCT", "CONN", "toomanyconn", False),
    (554, "", "Message rejected. AUP#URLBL1001", "DATA", "spamdetected", False),
    (552, "5.2.3", "Message length exceeds administrative limit", "DATA", "exceedlimit", False),
    (
        554,
        "5.7.1",
        "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        "RCPT",
        "blocked",
        False,
    ),
    (
        550,
        "5.7.1",
        "Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam this message has been blocked.",
        "DATA",
        "spamdetected",
        False,
    ),
    (
        550,
        "5.7.26",
        "Unauthenticated email from example.com is not accepted due to domain's DMARC policy.",
        "DATA",
        "authfailure",
        False,
    ),
    (
        550,
        "5.7.25",
        "The IP address sending this message does not have a PTR record setup",
        "DATA",
        "requireptr",
        False,
    ),
    (
        421,
        "4.7.0",
        "[192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from your IP address.",
        "DATA",
        "speeding",
        False,
    ),
    # Yahoo's [TSS04] answers MAIL FROM: about what the sender sent (volume,
    # complaints), also at RCPT or when the stage is not known; a slow-down
    # either way (test_bounce_unseen.py, test_bounce_unseen23.py).
    (
        421,
        "4.7.0",
        "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
        "MAIL",
        "rejected",
        False,
    ),
    (
        421,
        "4.7.0",
        "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
        "RCPT",
        "rejected",
        False,
    ),
    (
        421,
        "",
        "Too many concurrent SMTP connections from this IP address; please try again later.",
        "CONN",
        "toomanyconn",
        False,
    ),
    (554, "5.7.1", "Relay access denied", "RCPT", "norelaying", False),
    (
        550,
        "5.7.1",
        "Service unavailable, Client host rejected: cannot find your hostname",
        "CONN",
        "requireptr",
        False,
    ),
    (
        550,
        "5.2.1",
        "The email account that you tried to reach is disabled.",
        "RCPT",
        "suspend",
        False,
    ),
    (554, "5.6.0", "Message contains invalid MIME headers", "DATA", "contenterror", False),
    (
        554,
        "",
        "Message rejected: virus detected (Eicar-Test-Signature)",
        "DATA",
        "virusdetected",
        False,
    ),
    (550, "5.7.1", "Message rejected for policy reasons.", "DATA", "spamdetected", False),
    (
        553,
        "5.1.8",
        "Domain of sender address nobody@nowhere.invalid does not exist",
        "MAIL",
        "rejected",
        False,
    ),
    (530, "5.7.0", "Must issue a STARTTLS command first", "MAIL", "failedstarttls", False),
    (
        550,
        "5.7.1",
        "This message is not RFC 5322 compliant. There are multiple From headers.",
        "DATA",
        "notcompliantrfc",
        False,
    ),
    (451, "4.4.1", "No answer from host", "RCPT", "expired", False),
    (250, "2.0.0", "OK queued as ABC", "DATA", "delivered", False),
    (500, "5.5.2", "Syntax error, command unrecognized", "RCPT", "syntaxerror", False),
    (
        554,
        "5.7.515",
        "Access denied, sending domain example.com does not meet the required authentication level.",
        "DATA",
        "authfailure",
        False,
    ),
    (
        550,
        "5.7.1",
        "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).",
        "RCPT",
        "blocked",
        False,
    ),
]


@pytest.mark.parametrize(("code", "enhanced", "text", "command", "reason", "hard"), TABLE)
def test_table(code: int, enhanced: str, text: str, command: str, reason: str, hard: bool) -> None:
    c = classify_reply(code, enhanced, text, command=command)
    assert (c.reason, c.hard) == (reason, hard), c
    assert c.soft == (not hard and reason not in ("delivered", "feedback", "vacation"))


def test_policy_5xx_is_not_hard() -> None:
    for text in ("blocked using bl.example", "spam detected", "DMARC policy failure"):
        assert not classify_reply(550, "5.7.1", text).hard


def test_signals() -> None:
    slow = classify_reply(421, "4.7.0", "Our system has detected an unusual rate of mail")
    assert slow.rate_limited and not slow.ip_blocked
    listed = classify_reply(554, "5.7.1", "Client host [192.0.2.1] blocked using zen.spamhaus.org")
    assert listed.ip_blocked and not listed.rate_limited
    yahoo = classify_reply(421, "4.7.0", "[TS04] Messages from 192.0.2.1 temporarily deferred")
    assert yahoo.rate_limited
    plain = classify_reply(550, "5.1.1", "User unknown")
    assert not plain.rate_limited and not plain.ip_blocked


def test_multiline_reply_is_joined() -> None:
    text = (
        "550-5.2.1 The user you are trying to contact is receiving mail at a rate that\n"
        "550-5.2.1 prevents additional messages from being delivered."
    )
    assert classify_reply(550, "5.2.1", text).reason == "speeding"


def test_unknown_text_and_code_fallbacks() -> None:
    assert classify_reply(550, "5.7.0", "nope").reason == "securityerror"
    assert classify_reply(554, "5.6.9", "nope").reason == "contenterror"
    assert classify_reply(550, "", "something odd happened").reason == "onhold"
    assert classify_reply(0, "", "").reason == "undefined"


def test_bad_code() -> None:
    with pytest.raises(ValueError, match="reply code"):
        classify_reply(999, "", "x")


def test_user_rules_take_precedence(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(
        '[[rule]]\nid = "acme"\nreason = "blocked"\nmatch = ["acme-block-\\\\d+"]\n'
        '[status]\n"5.1.1" = "filtered"\n'
    )
    rules = load_rules([f])
    assert (
        classify_reply(550, "5.1.1", "User unknown acme-block-42", rules=rules).reason == "blocked"
    )
    assert classify_reply(550, "5.1.1", "strange", rules=rules).reason == "filtered"
    # the shipped rules are untouched
    assert classify_reply(550, "5.1.1", "strange").reason == "userunknown"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]]\nreason = 'x'\nmatch = ['(']\n", "bad regular expression"),
        ("[[rule]]\nreason = 'x'\nbogus = 1\nmatch = ['a']\n", "unknown key"),
        ("[[rule]]\nmatch = ['a']\n", "'reason'"),
        ("[[rule]]\nreason = 'x'\n", "needs 'match'"),
        ("[[rule]]\nreason = 'x'\nmatch = ['a']\ntier = 'medium'\n", "'tier'"),
        ("this is = = not toml", "not valid TOML"),
        ("[status]\n'5.1' = 'x'\n", "[status]"),
    ],
)
def test_bad_rule_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(RuleError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        RuleSet.load(f)
    assert "bad.toml" in str(e.value)


def test_missing_rule_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="cannot read"):
        load_rules([tmp_path / "nope.toml"])


# ---------------------------------------------------------------- evidence order
@pytest.mark.parametrize(
    ("code", "status", "text", "command", "reason"),
    [
        # A provider's own code says more than the RFC 3463 status around it.
        (
            550,
            "5.2.1",
            "The user you are trying to contact is receiving mail at a rate that prevents "
            "additional messages from being delivered.",
            "RCPT",
            "speeding",
        ),
        (550, "5.2.1", "The email account that you tried to reach is inactive.", "RCPT", "suspend"),
        (550, "5.2.0", "Mail rejete. Mail rejected. ofr_506 [506]", "DATA", "spamdetected"),
        (
            550,
            "5.1.1",
            "Adresse d au moins un destinataire invalide. OFR_416 [416]",
            "RCPT",
            "userunknown",
        ),
        (
            421,
            "",
            "Trop de connexions. Too many connections, slow down. OFR004_104 [104]",
            "CONN",
            "toomanyconn",
        ),
        (
            550,
            "5.1.1",
            "<a@example.com> - 203.0.113.2 has sent to too many recipients this hour. IB607",
            "RCPT",
            "speeding",
        ),
        (550, "5.1.1", "RCP-P2 Refused due to recipient preferences", "RCPT", "filtered"),
        (421, "4.7.0", "[TS01] Messages from 192.0.2.1 temporarily deferred", "MAIL", "speeding"),
        # The stage of the refusal: the same policy status at MAIL FROM is about the sender.
        (550, "5.7.1", "Access denied", "MAIL", "rejected"),
        (550, "5.7.1", "Access denied", "RCPT", "securityerror"),
        # A refused greeting is about the client.
        (554, "", "Sorry, no service", "CONN", "blocked"),
        # Outlook's documented "550 Requested action not taken: mailbox
        # unavailable" is the SMTP reply; the same words with no reply code and
        # no stage (a web-mail notice) are not evidence of a RCPT refusal.
        (550, "5.5.0", "550 Requested action not taken: mailbox unavailable", "", "userunknown"),
        (
            0,
            "",
            "Invalid Address, ERROR_CODE :550, ERROR_CODE :Requested action not taken: "
            "mailbox unavailable",
            "",
            "filtered",
        ),
        # RFC 5321's own 554 text names no reason: the server failed, not a
        # policy about the sender (though it answered MAIL FROM).
        (554, "5.0.0", "554 Transaction failed", "MAIL", "systemerror"),
        # The more specific verdict wins: a virus found is not spam.
        (550, "5.0.0", "550 Virus Detected; Content Rejected", "DATA", "virusdetected"),
        # A locked account is suspended, whatever status wraps it.
        (
            550,
            "5.7.1",
            "Recipient address rejected: User a@example.com temporary locked.",
            "RCPT",
            "suspend",
        ),
        # Exim: no router accepted the address (the domain does not route).
        (550, "", "Unrouteable address", "", "hostunknown"),
        # Yahoo's documented replies, given after DATA: the text decides.
        (
            554,
            "",
            "554 delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0]",
            "DATA",
            "userunknown",
        ),
        (
            554,
            "",
            "554 delivery error: dd Sorry, your message to x@yahoo.com cannot be delivered. "
            "This account is over quota.",
            "",
            "mailboxfull",
        ),
    ],
)
def test_evidence_order(code: int, status: str, text: str, command: str, reason: str) -> None:
    assert classify_reply(code, status, text, command=command).reason == reason


@pytest.mark.parametrize(
    ("command", "reason", "hard"),
    [("RCPT", "userunknown", True), ("DATA", "filtered", False), ("", "filtered", False)],
)
def test_user_unknown_is_separated_by_the_refused_command(
    command: str, reason: str, hard: bool
) -> None:
    c = classify_reply(550, "", "User unknown", command=command)
    assert (c.reason, c.hard) == (reason, hard)


def test_status_decides_when_no_provider_code_or_phrase() -> None:
    assert classify_reply(550, "5.1.1", "nope").reason == "userunknown"
    assert classify_reply(552, "5.2.2", "nope").reason == "mailboxfull"
    assert classify_reply(550, "5.1.2", "nope").reason == "hostunknown"
    assert classify_reply(552, "5.3.4", "nope", command="DATA").reason == "mesgtoobig"


def test_documented_rules_carry_a_reference() -> None:
    from fastsend.bounce import default_rules

    provider = [r for r in default_rules().rules if r.tier == "provider"]
    assert provider
    assert all(r.ref for r in provider), [r.id for r in provider if not r.ref]


def test_reference_key_in_user_rule_files(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(
        "[[rule]]\nid = 'acme'\nreason = 'blocked'\ntier = 'provider'\n"
        "ref = 'ACME postmaster page'\nmatch = ['acme-code-9']\n"
    )
    rules = load_rules([f])
    assert rules.rules[0].ref == "ACME postmaster page"
    assert classify_reply(550, "5.1.1", "x acme-code-9", rules=rules).reason == "blocked"
