"""Bounce formats the corpus does not hold, written from their documented shapes.

Each message here is built from the format's specification or the shape its
MTA documents (no real message copied): the DSN parts a gateway encodes in
base64 or quoted-printable, RFC 6533's message/global-delivery-status with
UTF-8 and "\\x{...}"-escaped addresses, Exchange's plain NDR in the sender's
language, Lotus Domino, qmail, Exim and Courier texts. Each must be found (the
right recipient) and classified (reason and hard/soft) as its English RFC 3464
twin would be. Replies in other languages ("Benutzer unbekannt", "Postfach
voll", "用户不存在", ...) are read for what they say, under the same gates as
their English words (a reply to RCPT TO naming an unknown user is a hard
userunknown; with nothing saying when, a filter's verdict).
"""

from __future__ import annotations

import base64
import json
import quopri

import pytest

from fastsend.bounce import classify_reply, parse_bounce

_DAEMON = "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\nTo: news@sender.test\n"


def _report(dsn_type: str, dsn: str, *, cte: str = "", human: str = "Delivery failed.\n") -> bytes:
    if cte == "base64":
        body = base64.encodebytes(dsn.encode()).decode()
    elif cte == "quoted-printable":
        body = quopri.encodestring(dsn.encode()).decode()
    else:
        body = dsn
    report = "global-delivery-status" if "global" in dsn_type else "delivery-status"
    encoding = f"Content-Transfer-Encoding: {cte}\n" if cte else ""
    return (
        _DAEMON + "Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={report}; boundary="b1"\n\n'
        "--b1\nContent-Type: text/plain; charset=utf-8\n\n" + human + "\n"
        f"--b1\nContent-Type: {dsn_type}\n{encoding}\n{body}\n--b1--\n"
    ).encode()


def _dsn(recipient: str, status: str, diagnostic: str, addr_type: str = "rfc822") -> str:
    return (
        "Reporting-MTA: dns; mx.example.net\n\n"
        f"Final-Recipient: {addr_type}; {recipient}\nAction: failed\nStatus: {status}\n"
        f"Diagnostic-Code: smtp; {diagnostic}\n"
    )


def _one(raw: bytes) -> tuple[str, str, bool]:
    records = parse_bounce(raw)
    assert len(records) == 1, records
    r = records[0]
    return r.recipient, r.reason, r.hard


# ---------------------------------------------------------------- encodings
@pytest.mark.parametrize("cte", ["base64", "quoted-printable"])
def test_an_encoded_delivery_status_part_is_read(cte: str) -> None:
    unknown = _dsn("bob@example.org", "5.1.1", "550 5.1.1 <bob@example.org>: User unknown")
    assert _one(_report("message/delivery-status", unknown, cte=cte)) == (
        "bob@example.org",
        "userunknown",
        True,
    )
    full = _dsn(
        "bob@example.org",
        "5.2.2",
        "552 5.2.2 <bob@example.org>: Mailbox full, the user's quota of 1024000 bytes is"
        " exceeded by this message, which is long enough to be folded by the encoder",
    )
    assert _one(_report("message/delivery-status", full, cte=cte)) == (
        "bob@example.org",
        "mailboxfull",
        False,
    )


# ---------------------------------------------------------------- RFC 6533
@pytest.mark.parametrize(
    ("written", "recipient"),
    [
        ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή@παράδειγμα.δοκιμή"),
        ("用户@例子.广告", "用户@例子.广告"),
        # utf-8-addr-xtext / unitext: characters written as \x{HEXPOINT}.
        ("j\\x{F6}rg@example.org", "jörg@example.org"),
        ("j\\x{00f6}rg@example.org", "jörg@example.org"),
        ("\\x{7528}\\x{6237}@example.org", "用户@example.org"),
        ("bob\\x{2B}news@example.org", "bob+news@example.org"),
    ],
)
@pytest.mark.parametrize("cte", ["", "base64"])
def test_a_global_delivery_status_names_its_utf8_recipient(
    written: str, recipient: str, cte: str
) -> None:
    dsn = _dsn(written, "5.1.1", "550 5.1.1 No such user", addr_type="utf-8")
    assert _one(_report("message/global-delivery-status", dsn, cte=cte)) == (
        recipient,
        "userunknown",
        True,
    )


def test_an_escape_that_is_no_character_is_kept_as_written() -> None:
    dsn = _dsn("a\\x{D800}b@example.org", "5.1.1", "550 5.1.1 No such user", addr_type="utf-8")
    recipient, _, _ = _one(_report("message/global-delivery-status", dsn))
    assert "\\x{D800}" in recipient


# ---------------------------------------------------------------- plain-text formats
def _plain(frm: str, subject: str, body: str, *, cte: str = "", extra: str = "") -> bytes:
    head = (
        f"From: {frm}\nTo: news@sender.test\nSubject: {subject}\nMIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=utf-8\n{extra}"
    )
    if cte == "base64":
        return (head + "Content-Transfer-Encoding: base64\n\n").encode() + base64.encodebytes(
            body.encode()
        )
    if cte == "quoted-printable":
        return (head + "Content-Transfer-Encoding: quoted-printable\n\n").encode() + (
            quopri.encodestring(body.encode())
        )
    return (head + "Content-Transfer-Encoding: 8bit\n\n" + body).encode()


# Exchange 2010+ plain NDR ("Delivery has failed to these recipients or
# groups" / "Diagnostic information for administrators"), in the sender's
# language: German and French, the admin section's reply left in English.
_EXCHANGE = {
    "en": (
        "Undeliverable: News",
        "Delivery has failed to these recipients or groups:\n\nbob@example.org\n"
        "The e-mail address you entered couldn't be found.\n\n"
        "Diagnostic information for administrators:\n\nGenerating server: EX01.example.org\n\n"
        "bob@example.org\n{reply}\n\nOriginal message headers:\n\n"
        "Message-ID: <n1@sender.test>\nFrom: news@sender.test\nTo: bob@example.org\n",
    ),
    "de": (
        "Unzustellbar: News",
        "Die Zustellung an folgende Empfänger oder Gruppen ist fehlgeschlagen:\n\n"
        "bob@example.org\nDie eingegebene E-Mail-Adresse wurde nicht gefunden.\n\n"
        "Diagnoseinformationen für Administratoren:\n\nGenerierender Server: EX01.example.org\n\n"
        "bob@example.org\n{reply}\n\nUrsprüngliche Nachrichtenkopfzeilen:\n\n"
        "Message-ID: <n1@sender.test>\nFrom: news@sender.test\nTo: bob@example.org\n",
    ),
    "fr": (
        "Non remis : News",
        "La remise à ces destinataires ou groupes a échoué :\n\nbob@example.org\n"
        "L'adresse de messagerie que vous avez entrée est introuvable.\n\n"
        "Informations de diagnostic pour les administrateurs :\n\n"
        "Serveur de génération : EX01.example.org\n\n"
        "bob@example.org\n{reply}\n\nEn-têtes de message d'origine :\n\n"
        "Message-ID: <n1@sender.test>\nFrom: news@sender.test\nTo: bob@example.org\n",
    ),
}


@pytest.mark.parametrize("lang", sorted(_EXCHANGE))
@pytest.mark.parametrize("cte", ["", "base64", "quoted-printable"])
@pytest.mark.parametrize(
    ("reply", "reason", "hard"),
    [
        ("#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##", "userunknown", True),
        (
            "Remote Server returned '554 5.2.2 mailbox full;"
            " STOREDRV.Deliver.Exception:QuotaExceededException'",
            "mailboxfull",
            False,
        ),
    ],
)
def test_exchange_plain_ndr_in_the_senders_language(
    lang: str, cte: str, reply: str, reason: str, hard: bool
) -> None:
    subject, body = _EXCHANGE[lang]
    raw = _plain("postmaster@example.org", subject, body.format(reply=reply), cte=cte)
    assert _one(raw) == ("bob@example.org", reason, hard)


def test_exchange_2003_ndr() -> None:
    body = (
        "Your message\n\n  To:      bob@example.org\n  Subject: News\n\n"
        "did not reach the following recipient(s):\n\n"
        "bob@example.org on Thu, 1 Jan 2026 10:00:05 +0100\n"
        "    The e-mail account does not exist at the organization this message was sent to.\n"
        "    <mail.example.org #5.1.1>\n"
    )
    assert _one(_plain("postmaster@example.org", "Undeliverable: News", body)) == (
        "bob@example.org",
        "userunknown",
        True,
    )


@pytest.mark.parametrize(
    ("because", "reason", "hard"),
    [
        ("User bob (bob@example.org) not listed in Domino Directory", "userunknown", True),
        ("Mailbox full or quota exceeded", "mailboxfull", False),
        # The router's other fixed texts: a mail rule or a restriction on the
        # person document refused the mail; a name matching several entries.
        ("Cannot route mail to user (bob@example.org)", "filtered", False),
        ("Several matches found in Domino Directory for bob", "systemerror", False),
    ],
)
def test_lotus_domino_delivery_failure(because: str, reason: str, hard: bool) -> None:
    body = (
        "Your message\n\n  Subject: News\n\nwas not delivered to:\n\n  bob@example.org\n\n"
        f"because:\n\n  {because}\n"
    )
    raw = _plain("Postmaster@example.org", f"DELIVERY FAILURE: {because}", body)
    assert _one(raw) == ("bob@example.org", reason, hard)


# A Domino server installed in another language writes its router's texts in
# that language (the Notes/Domino language packs): "not listed in Domino
# Directory" in German, French, Spanish and Japanese, the French one often in
# ISO-8859-1. Each is the same dead address as the English text.
_DOMINO_LOCAL = {
    "de": (
        "Ihre Nachricht",
        "wurde nicht zugestellt an:",
        "weil:",
        "Benutzer bob (bob@example.org) ist nicht im Domino-Verzeichnis aufgeführt",
    ),
    "de-nab": (
        "Ihre Nachricht",
        "wurde nicht zugestellt an:",
        "weil:",
        "Benutzer bob (bob@example.org) nicht im öffentlichen Namens- und Adressbuch",
    ),
    "fr": (
        "Votre message",
        "n'a pas été remis à :",
        "pour la raison suivante :",
        "Utilisateur bob (bob@example.org) non répertorié dans l'annuaire Domino",
    ),
    "es": (
        "Su mensaje",
        "no se ha entregado a:",
        "porque:",
        "El usuario bob (bob@example.org) no se encuentra en el Directorio de Domino",
    ),
    "ja": (
        "メッセージ",
        "次の宛先に配信されませんでした:",
        "理由:",
        "ユーザー bob (bob@example.org) は Domino ディレクトリには見つかりません",
    ),
}


@pytest.mark.parametrize(
    ("lang", "charset"),
    [(lang, "utf-8") for lang in sorted(_DOMINO_LOCAL)]
    + [(lang, "iso-8859-1") for lang in ("de", "de-nab", "es", "fr")],
)
def test_lotus_domino_in_the_servers_language(lang: str, charset: str) -> None:
    msg, not_to, because_word, because = _DOMINO_LOCAL[lang]
    body = f"{msg}\n\n  Subject: News\n\n{not_to}\n\n  bob@example.org\n\n{because_word}\n\n  {because}\n"
    payload = body.encode(charset)
    raw = (
        "From: Postmaster@example.org\nTo: news@sender.test\nSubject: DELIVERY FAILURE\n"
        f"MIME-Version: 1.0\nContent-Type: text/plain; charset={charset}\n"
        "Content-Transfer-Encoding: 8bit\n\n"
    ).encode() + payload
    assert _one(raw) == ("bob@example.org", "userunknown", True)
    assert classify_reply(0, "", because, command="").reason == "userunknown"


_QMAIL = (
    "Hi. This is the qmail-send program at mx.example.net.\n"
    "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
    "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
    "<bob@example.org>:\n{text}\n\n--- Below this line is a copy of the message.\n\n"
    "Return-Path: <news@sender.test>\n"
)


@pytest.mark.parametrize(
    ("text", "reason", "hard"),
    [
        (
            "192.0.2.5 does not like recipient.\nRemote host said: 550 5.1.1 <bob@example.org>:"
            " Recipient address rejected: User unknown\nGiving up on 192.0.2.5.",
            "userunknown",
            True,
        ),
        ("Sorry, no mailbox here by that name. (#5.1.1)", "userunknown", True),
        ("Sorry, I couldn't find any host named example.org. (#5.1.2)", "hostunknown", True),
        ("user is over quota (#5.2.2)", "mailboxfull", False),
    ],
)
def test_qmail_failure_notice(text: str, reason: str, hard: bool) -> None:
    raw = _plain("MAILER-DAEMON@mx.example.net", "failure notice", _QMAIL.format(text=text))
    assert _one(raw) == ("bob@example.org", reason, hard)


@pytest.mark.parametrize(
    ("text", "reason", "hard"),
    [
        (
            "host mx.example.org [192.0.2.5]\n    SMTP error from remote mail server after"
            " RCPT TO:<bob@example.org>:\n    550 5.1.1 <bob@example.org>: User unknown",
            "userunknown",
            True,
        ),
        ("Unrouteable address", "hostunknown", True),
        ("retry timeout exceeded", "expired", False),
        # retry.c appends ": retry timeout exceeded" to the last error: Exim's
        # own text for a reason names it (Sisimai's lhost Exim reads it first).
        (
            "mailbox is full (MTA-imposed quota exceeded while writing to file"
            " /var/mail/bob): retry timeout exceeded",
            "mailboxfull",
            False,
        ),
    ],
)
def test_exim_returning_message(text: str, reason: str, hard: bool) -> None:
    body = (
        "This message was created automatically by mail delivery software.\n\n"
        "A message that you sent could not be delivered to one or more of its\n"
        "recipients. This is a permanent error. The following address(es) failed:\n\n"
        f"  bob@example.org\n    {text}\n\n"
        "------ This is a copy of the message, including all the headers. ------\n\n"
        "Return-path: <news@sender.test>\n"
    )
    raw = _plain(
        "Mail Delivery System <Mailer-Daemon@mx.example.net>",
        "Mail delivery failed: returning message to sender",
        body,
        extra="X-Failed-Recipients: bob@example.org\n",
    )
    assert _one(raw) == ("bob@example.org", reason, hard)


def test_courier_text_notice() -> None:
    body = (
        "This is a delivery status notification from mx.example.net,\n"
        "running the Courier mail server, version 1.1.\n\n"
        "                           UNDELIVERABLE MAIL\n\n"
        "Your message to the following recipients cannot be delivered:\n\n"
        "<bob@example.org>:\n    mx.example.org [192.0.2.5]:\n"
        ">>> RCPT TO:<bob@example.org>\n<<< 550 5.1.1 <bob@example.org>... User unknown\n"
    )
    raw = _plain("Courier mail server at mx.example.net <@>", "NOTICE: mail delivery status.", body)
    assert _one(raw) == ("bob@example.org", "userunknown", True)


# ---------------------------------------------------------------- other languages
_UNKNOWN = [
    "Benutzer unbekannt",
    "Empfänger unbekannt",
    "Die E-Mail-Adresse existiert nicht",
    "Utilisateur inconnu",
    "Destinataire inconnu",
    "L'adresse de messagerie est introuvable",
    "Usuario desconocido",
    "El usuario no existe",
    "Utente sconosciuto",
    "Usuário desconhecido",
    "Gebruiker onbekend",
    "Nieznany użytkownik",
    "Пользователь не найден",
    "Нет такого пользователя",
    "用户不存在",
    "收件人地址不存在",
    "宛先のメールアドレスは存在しません",
    "존재하지 않는 사용자입니다",
]
_FULL = [
    "Postfach voll",
    "Das Postfach des Empfängers ist voll",
    "Boîte aux lettres pleine",
    "Quota dépassé",
    "Buzón lleno",
    "Casella piena",
    "Caixa postal cheia",
    "Mailbox is vol",
    "Skrzynka odbiorcy jest pełna",
    "Почтовый ящик переполнен",
    "用户邮箱已满",
    "メールボックスの容量を超えています",
    "메일함 용량 초과",
]


@pytest.mark.parametrize("text", _UNKNOWN)
def test_user_unknown_in_other_languages(text: str) -> None:
    at_rcpt = classify_reply(550, "", f"550 {text}", command="RCPT")
    assert (at_rcpt.reason, at_rcpt.hard) == ("userunknown", True)
    # The same gate as the English words: after DATA, a filter's verdict.
    after_data = classify_reply(550, "", f"550 {text}", command="DATA")
    assert (after_data.reason, after_data.hard) == ("filtered", False)


@pytest.mark.parametrize("text", _FULL)
def test_mailbox_full_in_other_languages(text: str) -> None:
    for code, command in ((552, "RCPT"), (452, "RCPT"), (552, "DATA")):
        c = classify_reply(code, "", f"{code} {text}", command=command)
        assert (c.reason, c.hard, c.ip_blocked) == ("mailboxfull", False, False)


def test_a_localised_bounce_without_a_code_is_read() -> None:
    """A German bounce quoting a German reply with no code (a gateway's own
    words): the recipient is found and the words classify it."""
    body = (
        "Ihre Nachricht konnte nicht zugestellt werden.\n\n"
        "Empfänger: <bob@example.org>\nGrund: Das Postfach des Empfängers ist voll.\n"
    )
    raw = _plain("MAILER-DAEMON@mx.example.net", "Unzustellbar: News", body, cte="quoted-printable")
    assert _one(raw) == ("bob@example.org", "mailboxfull", False)


@pytest.mark.parametrize(
    "text",
    [
        "550 bob@example.org is not accepting any mail",
        "550 5.7.1 This user is not accepting any mail",
        "550 Recipient is currently not accepting e-mail",
        "550 This user does not accept mail",
    ],
)
def test_a_recipient_refusing_all_mail_is_no_dead_address(text: str) -> None:
    """One recipient refusing everything (Sisimai's filtered) was "notaccept",
    hard, as if the domain took no mail (RFC 7504 521/556): the address
    exists and was suppressed as dead."""
    c = classify_reply(int(text[:3]), "", text, command="RCPT")
    assert (c.reason, c.hard) == ("filtered", False)
    for host_text, code in (
        ("521 5.3.2 Host does not accept mail", 521),
        ("556 5.1.10 Domain does not accept mail", 556),
    ):
        c = classify_reply(code, "", host_text, command="RCPT")
        assert (c.reason, c.hard) == ("notaccept", True)
    c = classify_reply(550, "5.7.1", "550 5.7.1 Recipient is not accepting mail with attachments")
    assert c.reason == "policyviolation"


# ---------------------------------------------------------------- Amazon SES notifications
def _ses_mail(bounce_type: str, sub_type: str, recipient: dict[str, str]) -> bytes:
    """An SES bounce notification as SNS mails it to an e-mail subscription (the
    JSON of "Amazon SES notification contents", wrapped in the SNS envelope)."""
    doc = {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": sub_type,
            "bouncedRecipients": [{"emailAddress": "bob@example.org", **recipient}],
            "timestamp": "2026-01-01T00:00:00.000Z",
            "feedbackId": "0100-feedback",
            "reportingMTA": "dns; amazonses.com",
        },
        "mail": {"messageId": "0100-m1", "commonHeaders": {"messageId": "<n1@sender.test>"}},
    }
    sns = {"Type": "Notification", "MessageId": "m-1", "Message": json.dumps(doc)}
    return (
        "From: AWS Notifications <no-reply@sns.amazonaws.com>\nTo: bounces@sender.test\n"
        "Subject: AWS Notification Message\nContent-Type: text/plain; charset=UTF-8\n\n"
        + json.dumps(sns)
        + "\n\n--\nIf you wish to stop receiving notifications from this topic, visit the link.\n"
    ).encode()


@pytest.mark.parametrize(
    ("bounce_type", "sub_type", "recipient", "reason", "hard"),
    [
        # SES's verdict where its notification carries no diagnostic: the address is gone.
        ("Permanent", "NoEmail", {"action": "failed", "status": "5.0.0"}, "userunknown", True),
        ("Permanent", "Suppressed", {"action": "failed"}, "userunknown", True),
        ("Permanent", "OnAccountSuppressionList", {}, "userunknown", True),
        ("Permanent", "General", {}, "userunknown", True),
        # ... but a text that says what happened decides.
        (
            "Permanent",
            "General",
            {
                "action": "failed",
                "status": "5.7.1",
                "diagnosticCode": "smtp; 550 5.7.1 Client host blocked using Spamhaus",
            },
            "blocked",
            False,
        ),
        ("Transient", "MailboxFull", {"action": "failed", "status": "4.0.0"}, "mailboxfull", False),
        (
            "Transient",
            "MessageTooLarge",
            {"action": "failed", "status": "4.0.0"},
            "mesgtoobig",
            False,
        ),
        (
            "Transient",
            "ContentRejected",
            {"action": "failed", "status": "4.0.0"},
            "contenterror",
            False,
        ),
        ("Undetermined", "Undetermined", {"status": "4.0.0"}, "onhold", False),
    ],
)
def test_a_mailed_ses_notification_reads_as_the_webhook_does(
    bounce_type: str, sub_type: str, recipient: dict[str, str], reason: str, hard: bool
) -> None:
    """The bounce intake reading an SES notification mailed by SNS decides as
    serve's SES webhook does (both through ``ses_verdict``): before, a
    Permanent NoEmail/Suppressed notification without a diagnostic was
    "onhold", soft, and the dead address was mailed again by every campaign."""
    assert _one(_ses_mail(bounce_type, sub_type, recipient)) == ("bob@example.org", reason, hard)


def test_localised_words_keep_their_rules_indexed() -> None:
    """Each localised pattern has a required word the prefilter can index by
    (a CJK word is often two letters; a Cyrillic letter re folds with another
    is no literal): a pattern without one puts its whole rule -- the large
    userunknown and mailboxfull rules -- on every reply (classification was
    ~30% slower)."""
    from fastsend.bounce import default_rules
    from fastsend.bounce.reply import TIERS

    tiers = default_rules()._build_tiers()
    unindexed = {tiers[t][0][i][0].id for t in TIERS for i in tiers[t][2]}
    assert not unindexed & {"userunknown", "userunknown-rcpt", "mailboxfull", "filtered"}


@pytest.mark.parametrize(
    "text",
    [
        "550 5.1.1 user unknown",
        "550 пользователь не найден",
        "550 用户不存在 user unknown",
        "552 メールボックスの容量を超えています quota",
        "550 \u1c82 \u1c80 нет такого пользователя",
    ],
)
def test_the_word_scan_finds_what_a_search_finds(text: str) -> None:
    """The one-scan word finder (an ASCII-only trie for ASCII text, the whole
    set otherwise) reports exactly the required words a substring search does."""
    from fastsend.bounce import default_rules
    from fastsend.bounce.reply import _WordScan, normalize_text

    scan = default_rules()._build_tiers()["<scan>"]
    fresh = _WordScan(frozenset(scan.words))
    fresh._compile()
    t = normalize_text(text)
    assert fresh.present(t) == {w for w in scan.words if w in t}


def test_a_final_report_without_any_reply_is_expired_not_onhold() -> None:
    """The prior where no rule speaks: a final failure report that names no
    reply code and no status at all means the reporting MTA gave up without
    the remote server refusing anything (its connections failed until the
    queue lifetime ran out). Measured on the corpus with each family's rules
    held out: "expired" is the most frequent label of such reports, "onhold"
    never (cv-strict reason 76.0 -> 78.1). With a reply code, or for our own
    synchronous replies, the fallback is unchanged."""
    from fastsend.bounce import default_rules

    rules = default_rules()
    words = "The delivery of this message ended without success: nyaan nyaan."
    assert rules.classify(0, "", words, action="failed").reason == "expired"
    assert rules.classify(0, "", words, action="failed").hard is False
    assert rules.classify(550, "", "550 " + words, action="failed").reason == "onhold"
    assert rules.classify(0, "5.0.0", words, action="failed").reason == "onhold"
    assert classify_reply(550, "", "550 " + words).reason == "onhold"
    body = (
        "This is the mail system at host mx.example.net.\n\n"
        "Your message could not be delivered to one or more recipients.\n\n"
        "<bob@example.org>: nyaan nyaan\n"
    )
    raw = _plain("MAILER-DAEMON@mx.example.net", "Undelivered Mail Returned to Sender", body)
    assert _one(raw) == ("bob@example.org", "expired", False)
