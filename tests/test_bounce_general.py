"""The bounce reader on messages unlike the corpus: what must hold for any sender.

Each message is written here from the documented layout of its format or the
provider's published reply text (no real message copied):

* auto-replies (RFC 3834; Outlook/Exchange "Automatic reply" in the user's
  language) are the vacation of their sender, whatever addresses their text
  names: never a bounce of a colleague named in the text;
* a plain-text delay warning (Exim's "has not yet been delivered", sendmail's
  "Warning: could not send message for past ...") is not a final failure:
  never hard, whatever its last reply said;
* replies in other languages and providers' documented replies are read
  for what they say.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsend.bounce import RuleError, classify_reply, load_rules, parse_bounce


def _msg(headers: str, body: str) -> bytes:
    return (headers.strip("\n") + "\n\n" + body.lstrip("\n")).encode()


# ---------------------------------------------------------------- auto-replies
@pytest.mark.parametrize(
    ("subject", "extra", "body"),
    [
        (
            "Out of Office: Weekly news",
            "",
            "I am out of the office until Monday. Your message will not be delivered to me"
            " before then; for urgent matters write to alice@example.com.\n",
        ),
        (
            "Re: Weekly news",
            "Auto-Submitted: auto-replied\n",
            "Thanks for your mail. I am away; please write to alice@example.com.\n",
        ),
        (
            "Automatische Antwort: Ihr Newsletter",
            "Auto-Submitted: auto-generated\nX-Auto-Response-Suppress: All\n",
            "Ich bin bis 12.01. nicht im Büro. In dringenden Fällen wenden Sie sich bitte"
            " an alice@example.com.\n",
        ),
        (
            "Réponse automatique : Votre lettre",
            "",
            "Je suis absent jusqu'au 12 janvier. Pour toute urgence : alice@example.com.\n",
        ),
        (
            "Respuesta automática: Boletín",
            "",
            "Estoy de vacaciones hasta el lunes. Para urgencias: alice@example.com.\n",
        ),
        (
            "Risposta automatica: Notizie",
            "",
            "Sono fuori ufficio fino a lunedì. Per urgenze: alice@example.com.\n",
        ),
        (
            "Automatisch antwoord: Nieuwsbrief",
            "",
            "Ik ben afwezig tot maandag. Voor dringende zaken: alice@example.com.\n",
        ),
        (
            "Автоматический ответ: Новости",
            "",
            "Я в отпуске до понедельника. По срочным вопросам: alice@example.com.\n",
        ),
        ("自動応答: ニュース", "", "月曜日まで不在です。急ぎの場合は alice@example.com まで。\n"),
        ("自动回复: 新闻", "", "我休假到周一。紧急事务请联系 alice@example.com。\n"),
        ("Abwesenheitsnotiz", "", "Ich bin im Urlaub. Vertretung: alice@example.com\n"),
        ("Auto: Weekly news", "", "Away until Monday; alice@example.com can help.\n"),
    ],
)
def test_autoreply_is_the_vacation_of_its_sender(subject: str, extra: str, body: str) -> None:
    raw = _msg(
        f"From: Bob Example <bob@example.org>\nTo: news@sender.example\nSubject: {subject}\n"
        f"{extra}MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n",
        body,
    )
    recs = parse_bounce(raw)
    assert [(r.recipient, r.reason, r.hard) for r in recs] == [
        ("bob@example.org", "vacation", False)
    ]


@pytest.mark.parametrize(
    "subject",
    ["Nondeliverable mail", "Delivery delayed: Weekly news", "Your message to gone@example.org"],
    ids=["failed", "delayed", "plain"],
)
def test_an_auto_submitted_report_from_a_gateway_is_not_a_vacation(subject: str) -> None:
    # A gateway whose address is not mailer-daemon@ marks its reports
    # Auto-Submitted too (RFC 3834 5.1 asks every automatic message to).
    raw = _msg(
        f"From: Mail Gateway <gateway@mx.example.net>\nTo: news@sender.example\n"
        f"Subject: {subject}\nAuto-Submitted: auto-generated\nContent-Type: text/plain\n",
        "Your message could not be delivered to gone@example.org:\n"
        "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown\n",
    )
    assert [(r.recipient, r.reason) for r in parse_bounce(raw)] == [
        ("gone@example.org", "userunknown")
    ]


def test_a_bounce_from_a_person_named_like_a_reply_is_still_a_bounce() -> None:
    # Mailer-daemon's own bounce (Exim marks its bounces Auto-Submitted:
    # auto-replied) is read as a bounce.
    raw = _msg(
        "From: Mail Delivery System <Mailer-Daemon@mx.example.net>\nTo: news@sender.example\n"
        "Subject: Mail delivery failed: returning message to sender\n"
        "Auto-Submitted: auto-replied\nX-Failed-Recipients: gone@example.org\n"
        "Content-Type: text/plain\n",
        "This message was created automatically by mail delivery software.\n\n"
        "A message that you sent could not be delivered to one or more of its\n"
        "recipients. This is a permanent error. The following address(es) failed:\n\n"
        "  gone@example.org\n    host mx.example.org [192.0.2.1]\n"
        "    SMTP error from remote mail server after RCPT TO:<gone@example.org>:\n"
        "    550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown\n",
    )
    assert [(r.recipient, r.reason, r.hard) for r in parse_bounce(raw)] == [
        ("gone@example.org", "userunknown", True)
    ]


# ---------------------------------------------------------------- delay warnings
EXIM_WARNING = """\
From: Mail Delivery System <Mailer-Daemon@mx.sender.example>
To: news@sender.example
Subject: Warning: message 1abcDE-000123-AB delayed 24 hours
Auto-Submitted: auto-replied
X-Failed-Recipients: fay@example.org
Content-Type: text/plain

This message was created automatically by mail delivery software.
A message that you sent has not yet been delivered to one or more of its
recipients after more than 24 hours on the queue on mx.sender.example.

The message identifier is:     1abcDE-000123-AB

The address to which the message has not yet been delivered is:

  fay@example.org
    host mx.example.org [192.0.2.1]
    Delay reason: SMTP error from remote mail server after RCPT TO:<fay@example.org>:
    450 4.1.1 <fay@example.org>: Recipient address rejected: User unknown in local recipient table

No action is required on your part. Delivery attempts will continue for
some time, and this warning may be repeated at intervals if the message
remains undelivered. Eventually the mail delivery software will give up,
and when that happens, the message will be returned to you.
"""

SENDMAIL_WARNING = """\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.sender.example>
To: news@sender.example
Subject: Warning: could not send message for past 4 hours
Content-Type: text/plain

    **********************************************
    **      THIS IS A WARNING MESSAGE ONLY      **
    **  YOU DO NOT NEED TO RESEND YOUR MESSAGE  **
    **********************************************

The original message was received at Fri, 5 Jan 2024 10:00:00 GMT
from localhost [127.0.0.1]

   ----- Transcript of session follows -----
<fay@example.org>... Deferred: 450 4.1.1 <fay@example.org>... User unknown
Warning: message still undelivered after 4 hours
Will keep trying until message is 5 days old
"""


@pytest.mark.parametrize("raw", [EXIM_WARNING, SENDMAIL_WARNING], ids=["exim", "sendmail"])
def test_plain_text_delay_warning_is_never_hard(raw: str) -> None:
    (r,) = parse_bounce(raw.encode())
    assert r.recipient == "fay@example.org"
    assert (r.action, r.hard) == ("delayed", False), r


# ---------------------------------------------------------------- documented replies
@pytest.mark.parametrize(
    ("code", "status", "text", "command", "reason"),
    [
        # web.de's bilingual replies (sitepackage.de's table of German providers' replies).
        (550, "", "Benutzer nicht bekannt/User unknown", "RCPT", "userunknown"),
        (
            550,
            "",
            "Benutzer hat das Speichervolumen ueberschritten. / User has exhausted allowed"
            " storage space.",
            "",
            "mailboxfull",
        ),
        (
            550,
            "",
            "Benutzer hat zuviele Mails auf dem Server. / User has too many messages on the server.",
            "",
            "mailboxfull",
        ),
        # QQ Mail's bounce keywords (QQ Mail help, 'transceivers' article on bounces).
        (550, "", "该用户不存在", "", "userunknown"),
        (550, "", "该用户未开通QQ邮箱", "", "userunknown"),
        (552, "", "收件人空间不足", "", "mailboxfull"),
        # Yandex's non-delivery table (yandex.com/support/mail/bounces).
        (550, "5.7.1", "Policy rejection on the target address", "RCPT", "suspend"),
        (552, "", "Mailbox size limit exceeded", "RCPT", "mailboxfull"),
        # Gmail SMTP errors and codes (support.google.com/a/answer/3726730).
        (
            550,
            "5.7.1",
            "The IP you're using to send mail is not authorized to send email directly to our"
            " servers. Please use the SMTP relay at your service provider instead.",
            "RCPT",
            "blocked",
        ),
        (
            421,
            "4.7.0",
            "TLS required for RCPT domain, closing connection.",
            "RCPT",
            "failedstarttls",
        ),
        # X.2.3 (RFC 3463 "Message length exceeds administrative limit") is
        # exceedlimit, as the corpus labels every 5.2.3 size refusal; the
        # same words under 5.3.4 are mesgtoobig.
        (
            552,
            "5.2.3",
            "Your message exceeded Google's message size limits.",
            "DATA",
            "exceedlimit",
        ),
        (
            552,
            "5.3.4",
            "Your message exceeded Google's message size limits.",
            "DATA",
            "mesgtoobig",
        ),
        (
            550,
            "5.7.1",
            "Our system has detected that this message is likely unsolicited mail.",
            "DATA",
            "spamdetected",
        ),
        # Yahoo's SMTP error codes (senders.yahooinc.com/smtp-error-codes): TSS09 = the IP is
        # refused.
        (
            553,
            "5.7.2",
            "[TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT"
            " succeed.",
            "RCPT",
            "blocked",
        ),
        # Microsoft Learn, "Fix error code 451 4.7.500-699 (ASxxx) in Exchange Online": the
        # sending IP is throttled for its reputation.
        (
            451,
            "4.7.500",
            "Server busy. Please try again later from [192.0.2.1]. (S77714)",
            "RCPT",
            "badreputation",
        ),
        (
            451,
            "4.7.650",
            "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
            "RCPT",
            "badreputation",
        ),
        # Gmail's sender-authentication replies: our SPF/DKIM, never the recipient's address
        # (IANA's X.7.27 is the *sender's* null MX, RFC 7505).
        (
            550,
            "5.7.27",
            "This mail has been blocked because the sender is unauthenticated. Gmail requires all"
            " senders to authenticate with either SPF or DKIM.",
            "DATA",
            "authfailure",
        ),
        (
            421,
            "4.7.30",
            "Your email has been rate limited because DKIM authentication didn't pass for this"
            " message.",
            "DATA",
            "authfailure",
        ),
        (
            421,
            "4.7.32",
            "Your email has been rate limited because the From: header (RFC5322) in this message"
            " isn't aligned with either the authenticated SPF or DKIM organizational domain.",
            "DATA",
            "authfailure",
        ),
        (550, "5.7.27", "Sender address has null MX", "MAIL", "rejected"),
    ],
)
def test_documented_and_localised_replies(
    code: int, status: str, text: str, command: str, reason: str
) -> None:
    c = classify_reply(code, status, text, command=command)
    assert c.reason == reason, c


@pytest.mark.parametrize(
    ("code", "status", "text", "command"),
    [
        (550, "5.7.27", "Sender address has null MX", "MAIL"),
        (550, "5.7.27", "sender domain publishes a null MX", "RCPT"),
        (
            550,
            "5.7.27",
            "The sender is unauthenticated. Gmail requires all senders to authenticate"
            " with either SPF or DKIM.",
            "DATA",
        ),
        # RFC 3463 X.1.7 "Bad sender's mailbox address syntax" and X.1.8 "Bad
        # sender's system address": whatever words follow ("invalid address",
        # "unknown user"), it is our sender that was refused, at any stage.
        (550, "5.1.7", "Invalid address", "RCPT"),
        (550, "5.1.7", "Invalid address", "DATA"),
        (550, "5.1.8", "Bad sender address: unknown user", "RCPT"),
        (553, "5.1.8", "<news@sender.example>... Domain of sender address does not exist", ""),
        (450, "4.1.8", "<news@sender.example>: unknown user", "RCPT"),
    ],
)
def test_a_refusal_of_our_sender_never_marks_the_recipient_hard(
    code: int, status: str, text: str, command: str
) -> None:
    # RFC 7505: X.7.27 is the *sender's* null MX; the recipient may be fine.
    c = classify_reply(code, status, text, command=command)
    assert (c.hard, c.soft) == (False, True), c


# ---------------------------------------------------------------- redacted complaints
REDACTED_ARF = """\
From: feedbackloop@fbl.example.net
To: fbl@sender.example
Subject: Abuse Report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="R"

--R
Content-Type: text/plain

This is an email abuse report for an email message received from IP 192.0.2.9.

--R
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
Source-IP: 192.0.2.9
Original-Mail-From: news@sender.example

--R
Content-Type: message/rfc822

From: News <news@sender.example>
To: undisclosed-recipients:;
Subject: Weekly news
Message-ID: <12345.abcdef@sender.example>

Hello
--R--
"""


def test_redacted_complaint_is_still_a_complaint_about_its_message() -> None:
    # RFC 6590: a loop may remove the recipient; the report still names the
    # message (its Message-ID), which the intake maps back to the recipient.
    (r,) = parse_bounce(REDACTED_ARF.encode())
    assert (r.recipient, r.reason, r.feedback_type, r.hard) == ("", "feedback", "abuse", False)
    assert r.original_message_id == "<12345.abcdef@sender.example>"


# ---------------------------------------------------------------- no rule matches
@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        # RFC 5321 4.2.3: "451 Requested action aborted: local error in processing".
        (451, "", "Could not read the configuration of this domain"),
        (451, "4.0.0", "Could not read the configuration of this domain"),
        # RFC 3463 X.3.X: mail system status (the destination system itself).
        (451, "4.3.0", "Something odd happened"),
        (554, "5.3.9", "Something odd happened"),
    ],
)
def test_reply_code_and_status_subject_decide_when_no_phrase_does(
    code: int, status: str, text: str
) -> None:
    c = classify_reply(code, status, text, command="")
    assert (c.reason, c.hard) == ("systemerror", False), c


@pytest.mark.parametrize(
    ("code", "status", "text", "reason"),
    [
        # RFC 3463 X.1.2 "Bad destination system address" as a temporary
        # refusal: Postfix's reject_unknown_recipient_domain when DNS fails
        # for now (unknown_address_reject_code 450), and a bare 4.1.2.
        (
            450,
            "4.1.2",
            "<bob@example.org>: Recipient address rejected: Domain not found",
            "hostunknown",
        ),
        (450, "4.1.2", "Domain not found", "hostunknown"),
        (451, "4.1.2", "Something odd happened", "hostunknown"),
        # X.1.1 "Bad destination mailbox address", temporary (a directory
        # lookup that failed for now, a bare 4.1.1).
        (450, "4.1.1", "Something odd happened", "userunknown"),
    ],
)
def test_a_temporary_bad_destination_status_names_its_reason(
    code: int, status: str, text: str, reason: str
) -> None:
    # A 4xx is retried: never hard on the wire, and never "onhold" (no
    # evidence) when the status itself says what was wrong.
    c = classify_reply(code, status, text, command="RCPT")
    assert (c.reason, c.hard) == (reason, False), c
    # A DSN giving up on that last reply (Action: failed) reports the same reason.
    raw = (
        "From: MAILER-DAEMON@mx.example.net\nTo: news@sender.test\n"
        "Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nDelivery failed.\n\n"
        "--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n\n"
        f"Final-Recipient: rfc822; bob@example.org\nAction: delayed\nStatus: {status}\n"
        f"Diagnostic-Code: smtp; {code} {status} {text}\n--b--\n"
    ).encode()
    (r,) = parse_bounce(raw)
    assert (r.recipient, r.reason, r.hard) == ("bob@example.org", reason, False)


@pytest.mark.parametrize(
    ("code", "status", "text", "command", "reason"),
    [
        # Comcast postmaster, mail delivery error codes: ES = dynamic IP space, BL = blocklists.
        (
            554,
            "",
            "resimta-po-01v.sys.comcast.net comcast 192.0.2.1 found on one or more DNSBLs,"
            " see http://postmaster.comcast.net/smtp-error-codes.php#BL000010",
            "RCPT",
            "blocked",
        ),
        (550, "", "ES000001 mail from dynamic IP space refused", "RCPT", "blocked"),
        # iCloud Mail (support.apple.com HT204137).
        (
            421,
            "4.7.1",
            "Messages to someone@icloud.com deferred due to excessive volume. Try again later",
            "RCPT",
            "speeding",
        ),
        (
            550,
            "5.7.1",
            "Your email was rejected due to having a domain present in the Spamhaus DBL",
            "DATA",
            "spamdetected",
        ),
        # 1&1 / IONOS / GMX / web.de SMTP error messages.
        (421, "", "Reject due to policy violations", "RCPT", "blocked"),
        (
            550,
            "",
            "<someone@gmx.de>: Reject due to SPF policy. The originating IP of the message is"
            " not permitted by the domain owner",
            "MAIL",
            "authfailure",
        ),
    ],
)
def test_more_providers_documented_replies(
    code: int, status: str, text: str, command: str, reason: str
) -> None:
    c = classify_reply(code, status, text, command=command)
    assert c.reason == reason, c


@pytest.mark.parametrize(
    ("text", "reason", "hard"),
    [
        # RFC 3463's descriptions, printed as the reply text by sendmail and Exchange.
        ("Bad destination mailbox address", "userunknown", True),
        ("Bad destination mailbox address syntax", "userunknown", True),
        ("Bad destination system address", "hostunknown", True),
        ("Destination mailbox has moved, No forwarding address", "hasmoved", True),
        ("Bad sender's system address", "rejected", False),
        ("Message length exceeds administrative limit", "exceedlimit", False),
        ("Mail system full", "systemfull", False),
        # Yandex's table of non-delivery replies.
        ("No correct recipients", "userunknown", True),
        ("Mailbox size exceeded", "mailboxfull", False),
    ],
)
def test_rfc3463_descriptions_without_a_code(text: str, reason: str, hard: bool) -> None:
    c = classify_reply(550, "", text, command="RCPT")
    assert (c.reason, c.hard) == (reason, hard), c


# ---------------------------------------------------------------- feedback signals
@pytest.mark.parametrize(
    ("code", "status", "text"),
    [
        (
            450,
            "4.2.0",
            "<u@example.org>: Recipient address rejected: Greylisted, see"
            " http://postgrey.schweikert.ch/help/example.org.html",
        ),
        (451, "4.7.1", "Greylisted, please try again later"),
        (450, "4.7.1", "<u@example.org>: Recipient address rejected: Greylisted for 300 seconds"),
    ],
)
def test_greylisting_is_neither_an_ip_block_nor_a_rate_limit(
    code: int, status: str, text: str
) -> None:
    # RFC 6647: the retry must come from the same IP; resting the IP at the
    # site (ip_blocked) or failing over to another one only restarts the wait.
    c = classify_reply(code, status, text, command="RCPT")
    assert (c.ip_blocked, c.rate_limited, c.hard) == (False, False, False), c


def test_a_rules_own_signal_drives_the_feedback_loop(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text(
        '[[rule]]\nid = "site-quota"\nreason = "rejected"\nsignal = "ipblock"\n'
        'match = ["site quota for your network"]\n'
    )
    rules = load_rules([f])
    c = classify_reply(550, "5.7.1", "Site quota for your network reached", rules=rules)
    assert (c.reason, c.ip_blocked) == ("rejected", True), c
    f.write_text('[[rule]]\nreason = "rejected"\nsignal = "loud"\nmatch = ["x"]\n')
    with pytest.raises(RuleError, match="none"):
        load_rules([f])


@pytest.mark.parametrize(
    "text",
    [
        "Verification failed for <news@sender.example>\nUnrouteable address\nSender verify failed",
        "Verification failed for <news@sender.example>\nCalled:   192.0.2.1\n"
        "Sent:     RCPT TO:<news@sender.example>\nResponse: 550 No Such User Here\n"
        "Sender verify failed",
        "Unrouteable sender address",
        # Postfix reject_unverified_sender, quoting the sender's own server (here Gmail's
        # documented 'does not exist' reply, which alone would be the recipient's).
        "<news@gmail.com>: Sender address rejected: undeliverable address: host"
        " gmail-smtp-in.l.google.com[192.0.2.26] said: 550-5.1.1 The email account that you"
        " tried to reach does not exist.",
    ],
)
def test_a_failed_verification_of_our_sender_is_not_the_recipients_fault(text: str) -> None:
    # Exim's verify = sender refusal: it names our envelope sender.
    c = classify_reply(550, "", text, command="RCPT")
    assert (c.reason, c.hard) == ("rejected", False), c


@pytest.mark.parametrize(
    "text",
    [
        "Our domain does not accept mail from senders without SPF",
        "example.org does not accept mail from you",
        "Mailbox not accepting mail from your domain",
        "does not receive email from your domain (policy)",
    ],
)
def test_a_domain_refusing_mail_from_us_is_not_a_hard_notaccept(text: str) -> None:
    # notaccept (hard) is a domain that takes no mail at all (RFC 7505 null MX,
    # RFC 7504 556); "... from you" refuses the sender.
    c = classify_reply(550, "", text, command="RCPT")
    assert not c.hard, c
    assert classify_reply(556, "5.1.10", "Recipient address has null MX", command="RCPT").hard


# ---------------------------------------------------------------- transcripts and final reports
_SENDMAIL_GENERIC = """\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.sender.example>
To: <news@sender.example>
Subject: Returned mail: see transcript for details
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="x9"

--x9

   ----- The following addresses had permanent fatal errors -----
<vic@rcpt.example>
    (reason: 554 5.0.0 Service unavailable)

   ----- Transcript of session follows -----
... while talking to mx.rcpt.example.:
>>> DATA
<<< {reply}
554 5.0.0 Service unavailable

--x9
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.example

Final-Recipient: RFC822; vic@rcpt.example
Action: failed
Status: 5.0.0
Remote-MTA: DNS; mx.rcpt.example
Diagnostic-Code: SMTP; 554 5.0.0 Service unavailable

--x9--
"""


@pytest.mark.parametrize(
    ("reply", "reason", "status"),
    [
        ("552 5.2.2 <vic@rcpt.example>... Mailbox full", "mailboxfull", "5.2.2"),
        ("550 5.7.1 Message rejected: virus found (Eicar-Signature)", "virusdetected", "5.7.1"),
        ("552 5.3.4 Message size exceeds fixed limit", "mesgtoobig", "5.3.4"),
    ],
)
def test_a_generic_dsn_diagnostic_defers_to_the_quoted_transcript(
    reply: str, reason: str, status: str
) -> None:
    # sendmail's DSN summarises the session as "554 5.0.0 Service
    # unavailable"; the remote server's own refusal is the "<<<" line of the
    # transcript beside the recipient (sendmail deliver.c / Courier layout).
    (r,) = parse_bounce(_SENDMAIL_GENERIC.format(reply=reply).encode())
    assert (r.recipient, r.reason, r.status, r.command) == (
        "vic@rcpt.example",
        reason,
        status,
        "DATA",
    ), r


_MDAEMON_LIKE = """\
From: Mail Delivery System <MDaemon@mx.rcpt.example>
To: news@sender.example
Subject: Permanent Delivery Failure

The attached message had PERMANENT fatal delivery errors!

After one or more unsuccessful delivery attempts the attached message has
been removed from the mail queue on this server.

YOU DO NOT NEED TO RESEND YOUR MESSAGE TO THE OTHER RECIPIENTS.

--- Session Transcript ---
 10:00:00: Attempting SMTP connection to [192.0.2.25 : 25]
 10:00:00: --> MAIL From:<news@sender.example>
 10:00:00: <-- 250 2.1.0 Ok
 10:00:00: --> RCPT To:<kim@rcpt.example>
 10:00:00: <-- 550 5.1.1 <kim@rcpt.example>: Recipient address rejected: User unknown
--- End Transcript ---
"""


def test_a_report_calling_its_failure_permanent_is_final() -> None:
    # "You do not need to resend" also ends final reports (about the other
    # recipients): the report says the failure is permanent, so it is no
    # delay warning, and the "-->" transcript says the refusal answered RCPT.
    (r,) = parse_bounce(_MDAEMON_LIKE.encode())
    assert (r.recipient, r.reason, r.hard, r.action, r.command) == (
        "kim@rcpt.example",
        "userunknown",
        True,
        "failed",
        "RCPT",
    ), r


@pytest.mark.parametrize(
    ("text", "command"),
    [
        (" 10:00:00: --> RCPT To:<a@b.example>\n 10:00:01: <-- 550 5.1.1 unknown", "RCPT"),
        (" --> DATA\n <-- 354 go ahead\n --> .\n <-- 554 5.7.1 spam", "DATA"),
        (
            "SMTP error from remote server for RCPT TO command, host: mx.b.example"
            " (192.0.2.1) reason: 550 5.1.1 unknown",
            "RCPT",
        ),
        ("The following recipients were rejected at RCPT TO: 550 no such user", "RCPT"),
        ("remote host replied to MAIL FROM: 553 sender rejected", "MAIL"),
    ],
)
def test_transcript_shapes_name_the_refused_command(text: str, command: str) -> None:
    from fastsend.bounce import vendors

    assert vendors.find_command(text) == command


# ---------------------------------------------------------------- session 16
_SUN_MESSAGING_SERVER = """\
From: Internet Mail Delivery <postmaster@x.test>
To: bounce@sender.test
Subject: Delivery Notification: Delivery has failed
Content-Type: text/plain; charset=us-ascii

This report relates to a message you sent with the following header fields:

  Message-id: <20261206.news.4711@sender.test>
  Date: Sun, 06 Dec 2026 08:00:00 +0000
  From: news@sender.test
  To: bob@x.test
  Subject: News

Your message cannot be delivered to the following recipients:

  Recipient address: bob@x.test
  Reason: Remote SMTP server has rejected address
  Diagnostic code: smtp;550 5.2.2 <bob@x.test>: Mailbox full
  Remote system: dns;mx.x.test (TCP|192.0.2.1|1234|192.0.2.9|25) (mx.x.test ESMTP)
"""


def test_a_quoted_message_id_is_not_a_recipient() -> None:
    """A report listing the returned message's fields (Sun/Oracle Messaging
    Server's "header fields" block, Exchange's and others' quoted headers)
    names its Message-ID, shaped like an address: no record for it."""
    recs = parse_bounce(_SUN_MESSAGING_SERVER.encode())
    assert [(r.recipient, r.reason, r.hard) for r in recs] == [("bob@x.test", "mailboxfull", False)]


_POSTFIX_PLAIN = """\
From: MAILER-DAEMON@mx.sender.test (Mail Delivery System)
To: bounce@sender.test
Subject: Undelivered Mail Returned to Sender

This is the mail system at host mx.sender.test.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

                   The mail system

<bob@x.test>: {}
"""


@pytest.mark.parametrize(
    "text",
    [
        "lost connection with mx.x.test[192.0.2.9] while sending RCPT TO",
        "lost connection with mx.x.test[192.0.2.9] while receiving the initial\n    server greeting",
    ],
)
def test_postfix_lost_connection_is_the_network(text: str) -> None:
    """Postfix smtp(8)'s "lost connection with HOST while ..." (a plain-text
    bounce, no DSN status to go on): no reply came, the network."""
    (rec,) = parse_bounce(_POSTFIX_PLAIN.format(text).encode())
    assert (rec.recipient, rec.reason, rec.hard, rec.ip_blocked) == (
        "bob@x.test",
        "networkerror",
        False,
        False,
    )


_EXIM_SENDER_LISTED = """\
From: Mail Delivery System <Mailer-Daemon@mx.sender.test>
To: bounce@sender.test
Subject: Mail delivery failed: returning message to sender

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  bob@x.test
    host mx.x.test [192.0.2.9]
    SMTP error from remote mail server after MAIL FROM:<bounce@sender.test> SIZE=1234:
    550 5.7.1 {}
"""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Sender address is on the recipient's block list", "filtered"),
        ("Your sender domain sender.test is blacklisted", "rejected"),
    ],
)
def test_a_listed_sender_in_a_dsn_does_not_rest_the_ip(text: str, reason: str) -> None:
    """The DSN names the remote host's IP; the refusal lists our sender (for
    one recipient, or the site's list of sender domains), not our IP."""
    (rec,) = parse_bounce(_EXIM_SENDER_LISTED.format(text).encode())
    assert (rec.reason, rec.hard, rec.ip_blocked) == (reason, False, False)


_SENDMAIL_PIPE = """\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.x.test>
To: bounce@sender.test
Subject: Returned mail: see transcript for details

The original message was received at Sun, 6 Dec 2026 08:00:00 GMT
from mx.sender.test [192.0.2.1]

   ----- The following addresses had permanent fatal errors -----
"|/usr/local/bin/procmail"
    (reason: Service unavailable)
    (expanded from: <bob@x.test>)

   ----- Transcript of session follows -----
sh: /usr/local/bin/procmail: not found
554 5.3.0 unknown mailer error 127
"""


def test_a_failed_pipe_is_reported_for_the_alias_we_sent_to() -> None:
    """sendmail names the pipe an alias expanded to, and the alias "(expanded
    from: <bob@x.test>)": with no address failing, the alias is the
    recipient (it read as no record at all)."""
    (rec,) = parse_bounce(_SENDMAIL_PIPE.encode())
    assert (rec.recipient, rec.reason, rec.hard) == ("bob@x.test", "mailererror", False)


_SENDMAIL_MULTILINE = """\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.sender.example>
To: <news@sender.example>
Subject: Returned mail: see transcript for details
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="x9"

--x9

   ----- The following addresses had permanent fatal errors -----
<vic@rcpt.example>
    (reason: {first})

   ----- Transcript of session follows -----
... while talking to mx.rcpt.example.:
>>> DATA
{transcript}
554 5.0.0 Service unavailable

--x9
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.example

Final-Recipient: RFC822; vic@rcpt.example
Action: failed
Status: {status}
Remote-MTA: DNS; mx.rcpt.example
Diagnostic-Code: SMTP; {first}

--x9--
"""


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            [
                "550-5.7.1 [192.0.2.1] Our system has detected that this message is",
                "550-5.7.1 likely suspicious due to the very low reputation of the sending IP",
                "550-5.7.1 address. To best protect our users from spam, the message has been",
                "550 5.7.1 blocked. Please visit https://support.google.com/mail/answer/188131",
            ],
            "badreputation",
        ),
        (
            [
                "550-5.7.1 This message is not RFC 5322 compliant. There are multiple",
                "550 5.7.1 Subject headers. To reduce the amount of spam sent to Gmail,",
            ],
            "notcompliantrfc",
        ),
    ],
)
def test_a_multiline_reply_cut_to_its_first_line_is_read_whole(
    lines: list[str], reason: str
) -> None:
    # sendmail writes only the first line of a multi-line reply into
    # Diagnostic-Code ("550-5.7.1 ... that this message is"); the words that
    # say why are in the later lines, quoted whole ("<<< ") in the transcript.
    raw = _SENDMAIL_MULTILINE.format(
        first=lines[0],
        transcript="\n".join("<<< " + line for line in lines),
        status=lines[0][4:9],
    )
    (r,) = parse_bounce(raw.encode())
    assert r.reason == reason, r
    assert r.diagnostic.splitlines() == lines, r.diagnostic
    # A one-line reply, or a first line whose continuation is not quoted, is
    # left as it is.
    (r,) = parse_bounce(
        _SENDMAIL_MULTILINE.format(
            first=lines[0], transcript="<<< 554 5.0.0 Service unavailable", status="5.7.1"
        ).encode()
    )
    assert r.diagnostic == lines[0], r.diagnostic


_SES_WRAPPED = """\
From: MAILER-DAEMON@email-bounces.amazonses.com
To: news@sender.example
Subject: Delivery Status Notification (Failure)
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="s1"

--s1
Content-Type: text/plain

An error occurred while trying to deliver the mail to the following recipients:
vic@rcpt.example

--s1
Content-Type: message/delivery-status

Reporting-MTA: dns; a192-1.smtp-out.amazonses.com

Final-Recipient: rfc822; vic@rcpt.example
Action: failed
Status: 5.0.0 (permanent failure)
Diagnostic-Code: smtp; 5.1.0 - Unknown address error 550-'{inner}' (delivery attempts: 0)

--s1--
"""


@pytest.mark.parametrize(
    ("inner", "status", "hard"),
    [
        ("5.7.1 <0000-bounce@email-bounces.amazonses.example>... Access denied", "5.7.1", False),
        ("5.1.1 <vic@rcpt.example>... User unknown", "5.1.1", True),
    ],
)
def test_a_relays_summary_defers_to_the_reply_it_quotes(
    inner: str, status: str, hard: bool
) -> None:
    # Amazon SES's older DSN wraps the remote reply in its own summary
    # ("5.1.0 - Unknown address error 550-'...'"): the summary's 5.1.0 is
    # its guess from the 550; the quoted reply's status says why. A refusal
    # of our bounce address (5.7.1 Access denied) marks no recipient hard.
    (r,) = parse_bounce(_SES_WRAPPED.format(inner=inner).encode())
    assert (r.recipient, r.status, r.hard) == ("vic@rcpt.example", status, hard), r
