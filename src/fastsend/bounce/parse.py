"""Parse asynchronous bounces and complaints into one record per recipient.

``parse_bounce(raw)`` reads one message as received at the bounce address and
returns a :class:`BounceRecord` per recipient it reports:

* RFC 3464 delivery status notifications (``multipart/report;
  report-type=delivery-status``, also ``message/global-delivery-status`` and
  DSN fields pasted into plain text);
* RFC 5965 ARF feedback reports (``feedback-report``) and unsubscribe
  replies (Apple's ``X-Apple-Unsubscribe``): reason "feedback";
* Amazon SES JSON notifications (bounce, complaint, delivery);
* the free-text formats of qmail, Exim, Sendmail, Exchange, Domino, Gmail,
  Yahoo and others, through the general reader in vendors.py;
* RFC 3834 auto-replies (reason "vacation") when nothing else is found.

The original message is found through the VERP return path the bounce was
addressed to (``b-<id>@<bounce domain>`` by default; pass ``verp_decoder`` to
use another scheme) and through the returned headers (``X-Fastsend-Id``,
else ``Message-ID``).

It never raises on malformed input: junk gives an empty list. It does no
I/O, and decides nothing about suppression (see fastsend.suppression).
"""

from __future__ import annotations

import bisect
import email
import email.message
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from typing import Any

from fastsend.bounce import mime, vendors
from fastsend.bounce.record import BounceRecord
from fastsend.bounce.reply import RuleSet, default_rules, ses_verdict

VerpDecoder = Callable[[str], "str | None"]

_VERP_RE = re.compile(r"^b-([^@]+)@", re.IGNORECASE)
_FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*:\s*(.*)$")
_DSN_MARK = re.compile(r"^(?:final|original)-recipient\s*:", re.IGNORECASE | re.MULTILINE)
_TAG_RE = re.compile(r"<[^<>]*>")
_LIST_HOST = re.compile(r"@googlegroups\.com$", re.IGNORECASE)
_RCPT_FIELDS = ("final-recipient", "original-recipient")
_QUOTE_RE = re.compile(r"^[ \t]?> ?", re.MULTILINE)
# Messages of an mbox: a "From " line after a blank line, or right after the
# last line of the message before it when it is an mbox envelope line proper
# (RFC 4155: "From " sender, then the date as asctime() writes it).
_MBOX_SPLIT = re.compile(
    rb"\n\n(?=From [^\n]{1,200}\n[A-Za-z-]+:)"
    rb"|\n(?=From \S{1,200} +(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep"
    rb"|Oct|Nov|Dec) +\d{1,2} \d\d:\d\d:\d\d \d{4}\n[A-Za-z-]+:)"
)


def default_verp_decoder(address: str) -> str | None:
    """``b-<id>@domain`` -> ``<id>``; None for any other address."""
    m = _VERP_RE.match(address.strip().strip("<>"))
    return m.group(1) if m else None


# ---------------------------------------------------------------- MIME helpers
def _charset(part: email.message.Message) -> str | None:
    """part.get_content_charset(), without parsing a Content-Type that names
    no charset parameter (most parts of a bounce)."""
    v = part.get("content-type")
    if v is None or "charset" not in str(v).lower():
        return None
    return part.get_content_charset()


def _text_of(part: email.message.Message, ctype: str = "") -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        charset = _charset(part) or "utf-8"
        try:
            text = payload.decode(charset, "replace")
        except (LookupError, ValueError):
            # An unknown charset, or a name no codec lookup takes ("utf-8\0":
            # ValueError): the text as UTF-8 rather than the report lost.
            text = payload.decode("utf-8", "replace")
    else:
        raw = part.get_payload()
        if isinstance(raw, list):
            text = "\n".join(_flatten(p) for p in raw if isinstance(p, email.message.Message))
        else:
            text = str(raw or "")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if (ctype or part.get_content_type()).endswith("/html"):
        text = _TAG_RE.sub(" ", re.sub(r"(?i)<br\s*/?>|</p>|</div>", "\n", text))
    return text


def _flatten(msg: email.message.Message, depth: int = 0) -> str:
    """A parsed message back as text, headers unfolded as received.

    Not ``as_string()``: the standard library's header refolding is quadratic
    in the length of a header, and a DSN field can be megabytes long."""
    head = "".join(f"{k}: {v}\n" for k, v in msg.raw_items())
    payload = msg.get_payload()
    if not isinstance(payload, list):
        return head + "\n" + str(payload or "")
    if depth > 20:
        return head
    subs = [_flatten(p, depth + 1) for p in payload if isinstance(p, email.message.Message)]
    boundary = msg.get_boundary() if msg.is_multipart() else None
    if boundary and msg.get_content_maintype() == "multipart":
        body = "".join(f"--{boundary}\n{sub}\n" for sub in subs) + f"--{boundary}--\n"
    else:
        body = "\n".join(subs)
    return head + "\n" + body


def _header(msg: email.message.Message, name: str) -> str:
    v = msg.get(name)
    if v is None:
        return ""
    if isinstance(v, str) and v.isascii() and "=?" not in v:
        return v  # no encoded word: decode_header/make_header give it back as it is
    try:
        if isinstance(v, str):
            return str(make_header(decode_header(v)))
        # A raw 8-bit header (RFC 6532 allows UTF-8): the parser keeps its
        # bytes as "unknown-8bit"; read them as UTF-8.
        return str(
            make_header(
                [
                    (b, "utf-8" if cs in (None, "unknown-8bit") and isinstance(b, bytes) else cs)
                    for b, cs in decode_header(v)
                ]
            )
        )
    except (ValueError, LookupError, UnicodeError, HeaderParseError):
        # A broken encoded word (a subject cut inside its base64, "=?UTF-8?B?0JLQsNGI0?="):
        # the field as written; the report is still read.
        return str(v)


class _Parts:
    """The parts of a bounce sorted by role."""

    def __init__(self) -> None:
        self.texts: list[str] = []  # human-readable parts (not inside the returned message)
        self.dsn: list[str] = []  # message/delivery-status bodies
        self.arf: list[str] = []  # message/feedback-report bodies
        self.returned: list[str] = []  # headers (and maybe body) of the returned message


def _collect(msg: email.message.Message) -> _Parts:
    parts = _Parts()

    def visit(p: email.message.Message, depth: int) -> None:
        if depth > 20:
            return
        ct = p.get_content_type()
        if ct in ("message/delivery-status", "message/global-delivery-status"):
            parts.dsn.append(_text_of(p, ct))
        elif ct == "message/feedback-report":
            parts.arf.append(_text_of(p, ct))
        elif ct in (
            "message/rfc822",
            "message/global",
            "text/rfc822-headers",
            "message/rfc822-headers",
            "message/global-headers",
        ):
            parts.returned.append(_text_of(p, ct))
        elif p.is_multipart():
            for sub in p.get_payload():
                if isinstance(sub, email.message.Message):
                    visit(sub, depth + 1)
        elif ct.startswith("text/") or ct == "application/json":
            parts.texts.append(_text_of(p, ct))

    visit(msg, 0)
    return parts


def _field_blocks(text: str) -> list[dict[str, list[str]]]:
    """RFC 822-style field blocks separated by blank lines (for DSN/ARF bodies)."""
    # Values are gathered as lists of pieces and joined once (appending to a
    # string per continuation line would be quadratic on a long folded field).
    blocks: list[dict[str, list[list[str]]]] = []
    cur: dict[str, list[list[str]]] = {}
    last = ""
    for line in text.split("\n"):
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur, last = {}, ""
            continue
        if line[:1] in (" ", "\t") and last:
            cur[last][-1].append(line.strip())
            continue
        m = _FIELD_RE.match(line)
        if m:
            last = m.group(1).lower()
            if last in _RCPT_FIELDS and last in cur:
                # Per-recipient groups that are not separated by a blank line.
                blocks.append(cur)
                cur = {}
            cur.setdefault(last, []).append([m.group(2).strip()])
        elif last:
            cur[last][-1].append(line.strip())
    if cur:
        blocks.append(cur)
    return [{k: [" ".join(p) for p in v] for k, v in b.items()} for b in blocks]


def _typed_value(v: str) -> tuple[str, str]:
    """'rfc822; a@b' -> ('rfc822', 'a@b'); 'smtp; 550 ...' -> ('smtp', '550 ...')."""
    if ";" in v:
        t, _, rest = v.partition(";")
        if re.fullmatch(r"\s*[A-Za-z0-9-]+\s*", t):
            return t.strip().lower(), rest.strip()
    return "", v.strip()


# RFC 6533 section 3: a "utf-8" address in a message/global-delivery-status
# writes each character it cannot (or does not) send raw as "\x{HEXPOINT}"
# (utf-8-addr-xtext, utf-8-addr-unitext): "j\x{F6}rg@example.org".
_EMBEDDED_UNICODE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _unicode_char(m: re.Match[str]) -> str:
    point = int(m.group(1), 16)
    # Not a character (a surrogate or beyond U+10FFFF): left as written.
    return chr(point) if point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF else m.group(0)


def _address(v: str) -> str:
    kind, v = _typed_value(v)
    v = v.strip()
    if kind == "utf-8":
        v = _EMBEDDED_UNICODE.sub(_unicode_char, v) if "\\x{" in v else v
        whole = v.strip("<> ")
        if "@" in whole and not any(c.isspace() for c in whole):
            # One address, as written (ADDR_RE's domain is ASCII: a Unicode
            # domain, or an escape left as written, would be cut).
            return whole
    m = vendors.ADDR_RE.search(v)
    return m.group(1) if m else v.strip("<> ")


# ---------------------------------------------------------------- record sources
@dataclass(slots=True)
class _Raw:
    recipient: str
    diagnostic: str = ""
    status: str = ""
    reply_code: int = 0
    action: str = ""
    remote_mta: str = ""
    original_recipient: str = ""
    command: str = ""
    feedback_type: str = ""
    diag_type: str = ""
    reason: str = ""
    ses: tuple[str, str] = ("", "")  # an SES notification's (bounceType, bounceSubType)
    # The notice's own words above its list of recipients (when the
    # recipient's explanation was read from the text: _notice_reason).
    notice: str = ""


# Exchange's encapsulated non-SMTP addresses (IMCEAEX- an X.500 directory
# name, IMCEAX400-, IMCEANOTES-, ...): written as an address, sent to by no one.
_NOT_SMTP = re.compile(r"imcea[a-z0-9]*-", re.IGNORECASE)


def _from_dsn(text: str, human: str) -> list[_Raw]:
    out: list[_Raw] = []
    for block in _field_blocks(text):
        final = block.get("final-recipient") or block.get("original-recipient")
        if not final:
            continue
        diag_type, diag = _typed_value(" ".join(block.get("diagnostic-code", [""])))
        sm = vendors.ENHANCED_RE.search(" ".join(block.get("status", [""])))
        status = sm.group(0) if sm else ""
        action = (block.get("action", [""])[0].split() or [""])[0].lower()
        recipient = _address(final[0])
        original = _address(block["original-recipient"][0]) if "original-recipient" in block else ""
        if "@" in original and ("@" not in recipient or _NOT_SMTP.match(recipient)):
            # The final address is none we sent to (an X.400 "x400; /C=JP/...",
            # Exchange's encapsulated directory name "IMCEAEX-_O=...@domain"):
            # the original RCPT TO address is the recipient.
            recipient = original
        r = _Raw(
            recipient=recipient,
            diagnostic=diag[: vendors.DIAG_CAP],
            status=status,
            action=action,
            remote_mta=_typed_value(block.get("remote-mta", [""])[0])[1],
            original_recipient=original,
            diag_type=diag_type,
        )
        out.append(r)
    _enrich(out, human)
    return out


def _enrich(records: list[_Raw], human: str) -> None:
    """Fill codes, commands and missing diagnostics from the text around each recipient."""
    section = vendors.cut_original(human) if human else ""
    # Every mention of every address, in one pass (linear in the text, not
    # recipients x text): [(position, address)] in text order.
    mentions = [(start, addr.lower()) for start, _, addr in vendors.address_spans(section)]
    first: dict[str, int] = {}
    for i, a in mentions:
        first.setdefault(a, i)
    rcpts = {r.recipient.lower() for r in records}
    # The recipients of one DSN often share their text (one diagnostic for
    # all, or the same explanation found near each): each text is read once.
    found: dict[str, tuple[int, str]] = {}
    commands: dict[str, str] = {}
    starts = [first[a] for a in rcpts if a in first]
    lead = _lead(section, min(starts)) if starts else ""
    for r in records:
        if section:
            r.diagnostic = _whole_reply(r.diagnostic, section)
        near = ""
        if section:
            own = r.recipient.lower()
            i = first.get(own, -1)
            if i < 0 and r.original_recipient:
                own = r.original_recipient.lower()
                i = first.get(own, -1)
            if i >= 0:
                stop = i + 1200
                k = bisect.bisect_right(mentions, (i, "\uffff"))
                while k < len(mentions) and mentions[k][0] < stop:
                    if mentions[k][1] != own and mentions[k][1] in rcpts:
                        stop = mentions[k][0]
                        break
                    k += 1
                near = section[i:stop]
        if not r.diagnostic.strip() and near:
            # The DSN says nothing: take the human-readable explanation.
            r.diagnostic = near.split("\n\n\n")[0].strip()
            r.notice = lead
            if (
                len(records) == 1
                and not vendors.find_reply_code(r.diagnostic)
                and vendors.find_reply_code(section)
            ):
                # Only the address itself: the reply is elsewhere (a Sendmail
                # transcript naming the local alias or the pipe it expanded to).
                r.diagnostic = section.strip()[: vendors.DIAG_CAP]
        elif len(records) == 1 and not r.diagnostic.strip() and section:
            r.diagnostic = section.strip()[: vendors.DIAG_CAP]
        elif near and _generic_status(r.status, r.diagnostic):
            # The DSN's own diagnostic is the reporting MTA's summary ("554
            # 5.0.0 Service unavailable"); the session transcript quoted
            # beside the recipient holds the remote server's own refusal.
            quoted = _TRANSCRIPT_REPLY.search(near)
            if quoted is not None:
                r.diagnostic = quoted.group(1).strip() + "\n" + r.diagnostic
        text = r.diagnostic
        got = found.get(text)
        if got is None:
            got = found[text] = (vendors.find_reply_code(text), vendors.find_status(text))
        r.reply_code = r.reply_code or got[0]
        detailed = got[1]
        if detailed and (
            not r.status
            or (r.status.endswith(".0.0") and detailed[0] == r.status[0])
            or (r.status[2:] == "0.0" and detailed[0] == r.status[0])
        ):
            r.status = detailed
        command = ""
        for t in (text, near):
            got_command = commands.get(t)
            if got_command is None:
                got_command = commands[t] = vendors.find_command(t)
            command = got_command
            if command:
                break
        r.command = command


# The first line of a multi-line reply: "552-5.7.0 This message was blocked".
_FIRST_OF_MANY = re.compile(r"([45]\d\d)-[^\n]*")
_REPLY_LINES_CAP = 40


def _whole_reply(diagnostic: str, section: str) -> str:
    """The whole multi-line reply when ``diagnostic`` is only its first line.

    Sendmail writes the first line of a multi-line reply into Diagnostic-Code
    ("552-5.7.0 This message was blocked because its content presents a
    potential") and the whole reply only in the session transcript it quotes
    ("<<< 552-5.7.0 ...", one line each, "<<< 552 5.7.0 ..." last): the words
    that say why are in the later lines. The transcript's lines that follow
    the same first line, with the same reply code, up to the last line (code
    and a space), are the reply; anything else leaves the diagnostic as it is.
    One find and at most _REPLY_LINES_CAP lines read: linear in the text."""
    first = diagnostic.strip()
    m = _FIRST_OF_MANY.fullmatch(first)
    if m is None:
        return diagnostic
    code = m.group(1)
    at = section.find(first)
    # (The line is often quoted twice: in the summary, "(reason: 552-5.7.0
    # ...)", and in the transcript; a few tries, each a forward find.)
    for _ in range(4):
        if at < 0:
            break
        whole = _reply_from(section, at, first, code)
        if whole:
            return whole
        at = section.find(first, at + len(first))
    return diagnostic


def _reply_from(section: str, at: int, first: str, code: str) -> str:
    """The reply whose first line ``first`` is at ``at`` (see _whole_reply),
    or "" when the lines after it are not its continuation."""
    lines = [first]
    pos = section.find("\n", at)
    while pos >= 0 and len(lines) < _REPLY_LINES_CAP:
        end = section.find("\n", pos + 1)
        line = section[pos + 1 : end if end >= 0 else len(section)].strip()
        # The transcript's own prefix ("<<< ", "<-- "), then the reply line.
        for prefix in ("<<<", "<--"):
            if line.startswith(prefix):
                line = line[len(prefix) :].lstrip()
                break
        if not (line.startswith(code) and line[3:4] in ("-", " ")):
            return ""  # not a continuation
        lines.append(line)
        if line[3] == " ":
            return "\n".join(lines)[: vendors.DIAG_CAP]
        pos = end
    return ""


# A refusal in a quoted session transcript: "<<< 552 5.2.2 ..." (sendmail,
# Courier) or "<-- 550 ..." (MDaemon's session log), the server's line.
_TRANSCRIPT_REPLY = re.compile(r"(?:^|\n)[^\n]{0,40}?(?:<<<|<--) ?([45]\d\d[ -][^\n]{0,500})")


def _generic_status(status: str, diagnostic: str) -> bool:
    """No status more specific than its class (X.0.0), in the DSN or its text."""
    if status and not status.endswith(".0.0"):
        return False
    detailed = vendors.find_status(diagnostic[:2048])
    return not detailed or detailed.endswith(".0.0")


# A feedback loop's stand-in for the address it removed (RFC 6590 lets a
# loop redact the complaining recipient; loops write "redacted@example.net",
# "xxxxxxx@example.com", "*****@...", "[REDACTED]@..."): a local part (or a
# domain's first label) that is such a word or only mask characters names no
# one. Recorded as the complainer, it was no address we sent to: the intake,
# which checks a Message-ID's recipient against the report's, then dropped the
# complaint (and a returned To naming no one can never be suppressed).
_REDACTED_PART = re.compile(
    r"\W*(?:redacted|removed|hidden|masked|anonymi[sz]ed|anonymous|withheld|undisclosed"
    r"(?:[-_.]recipients?)?|hashed|(?:[x*#?][-._]?){3,})\W*",
    re.IGNORECASE,
)


# A mailbox of the reporting system rather than of a subscriber: RFC 2142's
# role mailboxes for mail operations and a feedback loop's own addresses.
_REPORTER = re.compile(
    r"(?:abuse|postmaster|hostmaster|mailer-daemon|no-?reply|do-?not-?reply"
    r"|(?:fbl|arf|feedback|complaints?|spam-?reports?)(?:[-_.+][^@]*)?)@",
    re.IGNORECASE,
)


def _redacted(address: str, placeholders: frozenset[str] = frozenset()) -> bool:
    """Whether ``address`` is a feedback loop's stand-in for a removed one."""
    local, _, domain = address.rpartition("@")
    if not local or local.lower() in placeholders:
        return True
    return bool(
        _REDACTED_PART.fullmatch(local) or _REDACTED_PART.fullmatch(domain.split(".", 1)[0])
    )


# RFC 5965's report fields met outside a message/feedback-report part: a
# loop that labels its machine-readable part text/plain, or pastes the fields
# into its one text part (under report-type=feedback-report, or none at all).
# A "Feedback-Type:" line is the report's when the outer type declares a
# feedback report or another field of RFC 5965 3.1/3.2 is in its block.
_ARF_TYPE_LINE = re.compile(r"^Feedback-Type[ \t]*:[ \t]*[A-Za-z]", re.IGNORECASE | re.MULTILINE)
_ARF_FIELD_LINE = re.compile(
    r"^(?:User-Agent|Version|Original-(?:Rcpt-To|Mail-From|Envelope-Id)|Arrival-Date"
    r"|Received-Date|Source-IP|Reported-(?:Domain|URI)|Reporting-MTA|Removal-Recipient"
    r"|Incidents|Authentication-Results|Redacted-Address)[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_FEEDBACK_REPORT_TYPE = re.compile(r"report-type\s*=\s*\"?feedback-report\b", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_FEEDBACK_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _arf_in_text(msg: email.message.Message, parts: _Parts) -> tuple[str, str] | None:
    """A feedback report without a message/feedback-report part: (its fields'
    text, the text after them: the reported message's header when pasted
    after them), or None when the message is no such report."""
    declared = _FEEDBACK_REPORT_TYPE.search(_header(msg, "Content-Type")) is not None
    if parts.dsn and not declared:
        return None
    for t in parts.texts:
        m = _ARF_TYPE_LINE.search(t)
        if m is None:
            continue
        blank = _BLANK_LINE.search(t, m.end())
        end = blank.start() + 1 if blank else len(t)
        start = t.rfind("\n\n", 0, m.start()) + 1
        if declared or _ARF_FIELD_LINE.search(t, start, end):
            return t[:end], t[end:].lstrip()
    return ("", "") if declared else None


# The opening sentence of a feedback loop's note (RFC 5965's example, AOL's,
# Abusix's and OpenDMARC's wording): "This is an email abuse report for an
# email message received from IP ...", "This is an autogenerated email abuse
# complaint ...", "This is an authentication failure report for ...". A note
# opening so, with the reported message attached and no report fields at all
# (AOL's older "Client TOS Notification", loops that send only the message),
# is a complaint about that message.
_ABUSE_PREFACE = re.compile(
    r"\A\s*(?:hello,?\s+|hi,?\s+|dear [^\n]{1,60}\n\s*)?this is an? (?:[\w/-]+ ){0,3}?"
    r"(?:(?:e-?mail )?abuse (?:report|complaint)|(?:authentication|dkim|spf|dmarc)"
    r"[ -](?:\w+[ -])?failure report)\b",
    re.IGNORECASE,
)
_AUTH_FAILURE_PREFACE = re.compile(r"failure report", re.IGNORECASE)


def _abuse_preface(parts: _Parts) -> str | None:
    """The report fields a note opening as a feedback loop's implies
    (``Feedback-Type``), when the reported message is attached; else None."""
    if not parts.returned or parts.dsn or not parts.texts:
        return None
    m = _ABUSE_PREFACE.match(parts.texts[0][:2000])
    if m is None:
        return None
    kind = "auth-failure" if _AUTH_FAILURE_PREFACE.search(m.group(0)) else "abuse"
    return f"Feedback-Type: {kind}\n"


def _from_arf(text: str, parts: _Parts, msg: email.message.Message, inline: str = "") -> list[_Raw]:
    fields: dict[str, list[str]] = {}
    for block in _field_blocks(text):
        for k, v in block.items():
            fields.setdefault(k, []).extend(v)
    # The type's token (RFC 5965 3.1): "abuse; spam" or "abuse (user report)" is abuse.
    token = _FEEDBACK_TOKEN.match(fields.get("feedback-type", [""])[0].strip())
    ftype = token.group(0).lower() if token else "abuse"
    # A report's own Redacted-Address field names the stand-in it used.
    placeholders = frozenset(
        v.strip().strip("<>").split("@", 1)[0].lower()
        for v in fields.get("redacted-address", [])
        if v.strip().strip("<>").split("@", 1)[0]
    )

    def named(found: list[str]) -> list[str]:
        return [a for a in found if a and not _redacted(a, placeholders)]

    rcpts = named([_address(v) for v in fields.get("original-rcpt-to", [])])
    rcpts += named([_address(v) for v in fields.get("removal-recipient", [])])
    if not rcpts:
        # The reported message, attached; or pasted after the report's fields.
        pasted = [inline] if inline and _FIELD_LINE.match(inline) else []
        for ret in parts.returned or pasted:
            m = mime.message_from_string(ret)
            to = _header(m, "To")
            if to:
                rcpts += named(vendors.ADDR_RE.findall(to))[:1]
                break
    if not rcpts:
        # Some reporters put the complaining address only in the report text;
        # that text also names the reporter ("Questions: fbl-support@..."),
        # which is no subscriber: not the report's own header addresses, nor
        # a role or feedback-loop mailbox (RFC 2142's abuse/postmaster...).
        own = _exclusions(msg)
        for k, vs in fields.items():
            if k not in ("original-rcpt-to", "removal-recipient"):
                # Our own sender (Original-Mail-From), the reporter's fields.
                own.update(a.lower() for v in vs for a in vendors.ADDR_RE.findall(v))
        for t in parts.texts:
            found = named(vendors.ADDR_RE.findall(vendors.cut_original(t)))
            rcpts += [a for a in found if a.lower() not in own and not _REPORTER.match(a)][:1]
            if rcpts:
                break
    if not rcpts:
        # A redacted report (RFC 6590; Yahoo's and others' loops remove the
        # recipient): still a complaint, about the message its returned
        # Message-ID or VERP address names (the intake finds the recipient
        # from those; see serve.listeners.find_original).
        return [_Raw(recipient="", feedback_type=ftype, reason="feedback")]
    seen: set[str] = set()
    out = []
    for a in rcpts:
        if a.lower() not in seen:
            seen.add(a.lower())
            out.append(_Raw(recipient=a, feedback_type=ftype, reason="feedback"))
    return out


# Complaint loops older than ARF (RFC 5965), still met: a note with the
# reported message attached (multipart/mixed), "complaint about message from
# <IP>" -- Hotmail's JMRP (From staff@hotmail.com; the attached message names
# the complaining user in X-HmXmrOriginalRecipient) and Amazon SES forwarding
# complaints (complaints@email-abuse.amazonses.com) in the same shape.
_LEGACY_COMPLAINT = re.compile(r"\s*complaint about message from ", re.IGNORECASE)


def _legacy_complaint(parts: _Parts, msg: email.message.Message) -> list[_Raw]:
    """The complaint of a pre-ARF feedback loop message (see _LEGACY_COMPLAINT)."""
    for ret in parts.returned:
        head = mime.message_from_string(ret.lstrip("\n").split("\n\n", 1)[0] + "\n\n")
        named = [
            a
            for a in vendors.ADDR_RE.findall(_header(head, "X-HmXmrOriginalRecipient"))
            if not _redacted(a)
        ]
        if named:
            return [_Raw(recipient=named[0], feedback_type="abuse", reason="feedback")]
    return _from_arf("", parts, msg)


def _exclusions(msg: email.message.Message) -> set[str]:
    ex: set[str] = set()
    for name in ("From", "To", "Reply-To", "Return-Path", "Sender"):
        for a in vendors.ADDR_RE.findall(_header(msg, name)):
            ex.add(a.lower())
    return ex


def _from_text(msg: email.message.Message, parts: _Parts) -> list[_Raw]:
    body = "\n".join(parts.texts)
    ses = vendors.parse_ses_json(body)
    if ses is not None:
        return [
            _Raw(
                recipient=s.recipient,
                diagnostic=_typed_value(s.diagnostic)[1],
                status=vendors.find_status(s.status),
                reply_code=vendors.find_reply_code(_typed_value(s.diagnostic)[1]),
                action=s.action,
                remote_mta=_typed_value(s.remote_mta)[1],
                feedback_type=s.feedback_type,
                reason="feedback" if s.kind == "complaint" else "",
                ses=(s.bounce_type, s.bounce_sub_type),
            )
            for s in ses
        ]
    if _DSN_MARK.search(body):
        recs = _from_dsn(body, body)
        if recs:
            return recs
    hinted = []
    for v in msg.get_all("X-Failed-Recipients") or []:
        hinted += vendors.ADDR_RE.findall(str(v))
    if (
        not hinted
        and not _is_bounce_like(msg)
        and not _SYSTEM_SENDER.search(_header(msg, "From"))
        and not _from_list_manager(msg)
    ):
        said = vendors.cut_original(body)[:20000]
        if not (vendors.find_status(said) or vendors.find_reply_code(said)):
            # From a person (no mail system's address, no report's subject or
            # type) and quoting no SMTP reply: an auto-responder this reader
            # does not know ("Request received", a ticket system, a vacation
            # notice under the user's own subject), or a person's reply. The
            # addresses its text names (colleagues to write to) did not bounce.
            return []
    exclude = _exclusions(msg)
    found = vendors.find_in_text(body, exclude, hinted or None)
    if len(found) > 1 and not hinted:
        # Several named: the returned message's author among them (a report's
        # "Sent by news@x", a field list no label here knows) is no recipient.
        authors = _returned_senders(parts)
        if authors & {f.recipient.lower() for f in found}:
            found = vendors.find_in_text(body, exclude | authors, None)
    if not found:
        # Nothing named in the text: the recipients of the returned message
        # (when the text names them, their explanation is found there).
        rcpts = _returned_recipients(parts)
        if rcpts:
            found = vendors.find_in_text(body, set(), rcpts)
    if not found and _is_bounce_like(msg):
        # A bounce sent to the failed address itself, or about postmaster@:
        # take any address but the bounce's own sender.
        own = {a.lower() for a in vendors.ADDR_RE.findall(_header(msg, "From"))}
        found = vendors.find_in_text(body, own, None, allow_system=True)
    action = "delayed" if _is_delay_warning(msg, body) else "failed"
    lead = ""
    if found:
        said = vendors.cut_original(body)
        # The first mention of any recipient, in one pass over the text's
        # addresses (a find per recipient rescanned the text for each: a
        # report listing 20,000 took minutes, past the intake's CPU cap).
        names = {f.recipient.lower() for f in found}
        first = next((s for s, _, a in vendors.address_spans(said) if a.lower() in names), -1)
        lead = _lead(said, first) if first >= 0 else ""
    return [
        _Raw(
            recipient=f.recipient,
            diagnostic=f.diagnostic,
            status=f.status,
            reply_code=f.reply_code,
            command=f.command,
            action=action,
            notice=lead,
        )
        for f in found
    ]


# How much of a notice's text above its first recipient is read as its own
# statement (the last paragraphs before the list: a mail system's greeting and
# summary come first).
_LEAD_CAP = 600
# What a notice's statement may say of every recipient it lists, and what it
# then overrules: a mailbox that exists but is disabled, limited or full,
# where the quoted reply beside each address is a generic refusal (EZweb's
# "The user(s) account is disabled." above "550 user unknown").
_NOTICE_REASONS = frozenset({"suspend", "mailboxfull"})
_NOTICE_OVERRULES = frozenset({"userunknown", "filtered", "onhold", "undefined"})


def _lead(text: str, end: int) -> str:
    """The notice's statement right above the line of its first listed
    recipient: the last paragraph before it (at most _LEAD_CAP characters,
    whole lines); "" when it quotes a reply or a status or names an address
    (a transcript, another list: not a statement about this one)."""
    end = text.rfind("\n", 0, end) + 1  # (words before the address on its line are its own)
    start = max(0, end - _LEAD_CAP)
    if start:
        nl = text.find("\n", start, end)
        start = nl + 1 if nl >= 0 else end
    paragraphs = [p for p in _BLANK_LINE.split(text[start:end]) if p.strip()]
    lead = paragraphs[-1].strip() if paragraphs else ""
    if "@" in lead or vendors.find_reply_code(lead) or vendors.find_status(lead):
        return ""
    return lead


def _notice_reason(rs: RuleSet, notice: str, own: str, action: str) -> str:
    """The reason a notice's own statement names for every recipient it
    lists ("" when none applies): one of _NOTICE_REASONS, said in words a
    rule knows (no status, no code: the prose alone), over a recipient's
    reason of _NOTICE_OVERRULES."""
    if not notice or own not in _NOTICE_OVERRULES:
        return ""
    c = rs.classify(0, "", notice, command="", action=action)
    if c.reason in _NOTICE_REASONS and c.rule not in ("status", "fallback"):
        return c.reason
    return ""


# A plain-text warning that a message is still being retried (the RFC 3464
# Action "delayed" of a report without a delivery-status part): Exim's delay
# warning ("has not yet been delivered to one or more of its recipients ...
# Delivery attempts will continue", Exim spec, customizing bounce and warning
# messages), sendmail's ("THIS IS A WARNING MESSAGE ONLY / YOU DO NOT NEED TO
# RESEND YOUR MESSAGE", "Warning: could not send message for past N hours"),
# Postfix's delay_template ("THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND
# YOUR MESSAGE", bounce(5)) and OpenSMTPD's ("this is only a temporary failure
# report ... You DO NOT NEED to re-send the message").
_DELAY_TEXT = re.compile(
    r"you do not need to re-?send (?:your|the) message|this is a warning (?:message )?only"
    r"|has not yet been delivered to one or more of its\s+recipients"
    r"|this is only a temporary failure report|could not send message for past"
    r"|delivery attempts will continue",
    re.IGNORECASE,
)
# Gmail's "There was a temporary problem delivering your message to X. Gmail
# will retry for 47 more hours. You'll be notified if the delivery fails
# permanently." (and its older "Message will be retried for 2 more day(s)");
# Exchange's "Delivery will continue to be attempted" and Exchange Online's
# "The server will keep trying to deliver this message for the next 1 days ...
# You'll be notified if the message can't be delivered by that time." Searched
# only when one of _DELAY_WORDS is in the text (a scan of the whole text per
# report for each alternative cost ~1% of the reader's time).
_DELAY_TEXT_MORE = re.compile(
    r"will (?:retry|be retried) for \d+ more (?:hours?|days?|day\(s\))"
    r"|you'll be notified if the (?:delivery fails permanently|message can't be delivered)"
    r"|delivery will continue to be attempted|will keep trying to deliver (?:this|the|your) message",
    re.IGNORECASE,
)
_DELAY_WORDS = ("retr", "notified", "attempted", "keep trying")
_DELAY_SUBJECT = re.compile(
    r"\s*(?:warning: message \S+ delayed|delayed mail \(still being retried\)"
    r"|warning: could not send message for past)",
    re.IGNORECASE,
)
# Subjects of delay notices whose text may quote the temporary reply: Gmail's
# and Zoho's "(Mail) Delivery Status Notification (Delay)", Exchange's
# "Delivery delayed: <subject>". A permanent reply in the text still makes
# the report final.
_DELAY_SUBJECT_UNLESS_5XX = re.compile(
    r"\s*(?:(?:mail )?delivery status notification \(delay\)|delivery delayed:)", re.IGNORECASE
)


# A report that calls its failure permanent is final, whatever else it says
# ("YOU DO NOT NEED TO RESEND YOUR MESSAGE" also closes final reports that
# list the recipients who did get it): sendmail's "had permanent fatal
# errors", Exim's and qmail's "This is a permanent error", "I've given up",
# "PERMANENT fatal delivery errors", "removed from the (mail) queue".
_PERMANENT_TEXT = re.compile(
    r"permanent(?:ly)? (?:fatal|error|failure|delivery (?:error|failure))"
    r"|(?:have|i've|has) given up|removed from the (?:mail )?queue",
    re.IGNORECASE,
)


# A permanent SMTP reply quoted in a report ("550 5.1.1 ...", "554 ...").
_PERMANENT_REPLY = re.compile(r"(?<![\d.])5[0-5]\d[ -](?=\S)")


def _is_delay_warning(msg: email.message.Message, body: str) -> bool:
    """The report says delivery is still being retried (not a final failure)."""
    subject = _header(msg, "Subject")
    if _DELAY_SUBJECT.match(subject):
        return True
    # The report's own text comes before the returned message.
    own = vendors.cut_original(body)[:20000]
    if _PERMANENT_TEXT.search(own) is not None:
        return False
    if _DELAY_SUBJECT_UNLESS_5XX.match(subject):
        return not vendors.find_status(own).startswith("5") and not _PERMANENT_REPLY.search(own)
    if _DELAY_TEXT.search(own) is not None:
        return True
    low = own.lower()
    return any(w in low for w in _DELAY_WORDS) and _DELAY_TEXT_MORE.search(own) is not None


_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|returned mail|delivery (?:status|fail|failure|notification|problem)"
    r"|failure notice|mail delivery|non[- ]?deliver|could not be delivered|not delivered|delayed"
    r"|nicht zustellbar|unzustellbar|non remis|no entregado|non recapitabile|error",
    re.IGNORECASE,
)
_FORWARD_SUBJECT = re.compile(r"^\s*(?:fwd?|tr|wg|rv|i|enc|doorst)\s*:", re.IGNORECASE)
_FORWARD_TEXT = re.compile(
    r"(?:begin|start of) forwarded message|-{3,} ?(?:forwarded|original) message ?-{3,}",
    re.IGNORECASE,
)
# Every match names a forwarded or original message: lower-cased ASCII text
# without either is skipped, else searched case-sensitively (same matches).
_FORWARD_TEXT_LOWER = vendors.case_sensitive(_FORWARD_TEXT)


def _forward_text(text: str) -> bool:
    """_FORWARD_TEXT found in ``text``."""
    if not text.isascii():
        return _FORWARD_TEXT.search(text) is not None
    low = text.lower()
    if "forwarded message" not in low and "original message" not in low:
        return False
    return _FORWARD_TEXT_LOWER.search(low) is not None


def _is_bounce_like(msg: email.message.Message) -> bool:
    """From a mail system, a delivery report, or a bounce-like subject."""
    if msg.get_content_type() == "multipart/report":
        return True
    sender = vendors.ADDR_RE.findall(_header(msg, "From"))
    if sender and vendors.is_system_address(sender[0]):
        return True
    if re.search(r"mailer-daemon|mail delivery", _header(msg, "From"), re.IGNORECASE):
        return True
    return bool(_BOUNCE_SUBJECT.search(_header(msg, "Subject")))


# A mail system's own name in the From header, beyond is_system_address's
# local parts: "MMSC NDR Administrator <sysadmin@...>", "post_master@",
# "Mail Delivery Subsystem <...>" under any address.
_SYSTEM_SENDER = re.compile(
    r"mailer[- ]?daemon|post_?master|mail delivery|delivery (?:subsystem|system|status)"
    r"|\bndr\b|administrator|sysadmin|\bdaemon\b",
    re.IGNORECASE,
)
# Mailing-list managers' notices (a post refused: "You are not a member of
# this list", fml's loop alerts): the list's own headers (RFC 2369 List-*,
# RFC 2919 List-Id, ezmlm's Mailing-List, fml's X-MLServer / X-ML-Name) or
# its administrative address (owner-LIST, LIST-owner/-admin/-request, RFC 2142).
_LIST_HEADERS = ("List-Id", "List-Help", "List-Subscribe", "List-Owner", "Mailing-List",
                 "X-MLServer", "X-ML-Name")  # fmt: skip
_LIST_ADMIN = re.compile(r"^(?:owner-.+|.+-(?:owner|admin|request))$", re.IGNORECASE)


def _from_list_manager(msg: email.message.Message) -> bool:
    """A notice from mailing-list software (its headers or its admin address)."""
    if any(msg.get(h) for h in _LIST_HEADERS):
        return True
    sender = vendors.ADDR_RE.findall(_header(msg, "From"))
    return bool(sender) and _LIST_ADMIN.match(sender[0].split("@", 1)[0]) is not None


_FIELD_LINE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,76}:[ \t]")


def _returned_head(src: str) -> str:
    """The header block of a returned message: from its first field line
    (past the separator a report puts before it, "------ Original message
    ------", at most a few lines) to the first blank line."""
    lines = src.lstrip("\n").split("\n")
    for i, line in enumerate(lines[:5]):
        if _FIELD_LINE.match(line):
            head = []
            for ln in lines[i:]:
                if not ln.strip():
                    break
                head.append(ln)
            return "\n".join(head)
    return ""


def _returned_recipients(parts: _Parts) -> list[str]:
    """To/Cc addresses of the returned message (attached or quoted after the text)."""
    sources = list(parts.returned)
    sources += [t[len(vendors.cut_original(t)) :] for t in parts.texts]
    for src in sources:
        m = mime.message_from_string(_returned_head(src) + "\n\n")
        rcpts = []
        for name in ("To", "Cc"):
            rcpts += vendors.ADDR_RE.findall(_header(m, name))
        if rcpts:
            return list(dict.fromkeys(rcpts))
    return []


# A returned message's author and recipient fields, with their folded lines.
_AUTHOR_FIELDS = re.compile(
    r"^(from|sender|return-path|to|cc)[ \t]*:(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)


def _returned_senders(parts: _Parts) -> set[str]:
    """The returned message's author (From, Sender, Return-Path), lower-cased,
    unless also among its recipients: a report naming it in its own words
    ("Sent by news@x", a field list a reader does not know) names no failed
    recipient (the message went from that address, not to it)."""
    sources = list(parts.returned)
    sources += [t[len(vendors.cut_original(t)) :] for t in parts.texts]
    for src in sources:
        authors: set[str] = set()
        rcpts: set[str] = set()
        for m in _AUTHOR_FIELDS.finditer(_returned_head(src)):
            found = {a.lower() for a in vendors.ADDR_RE.findall(m.group(2))}
            (rcpts if m.group(1).lower() in ("to", "cc") else authors).update(found)
        if authors:
            return authors - rcpts
    return set()


def _unquote(text: str) -> str | None:
    """The longest run of '>'-quoted lines of ``text``, unquoted (forwarded bounces)."""
    lines = text.split("\n")
    best: tuple[int, int] = (0, 0)
    start = -1
    for i, line in enumerate([*lines, ""]):
        quoted = line.lstrip(" \t").startswith(">")
        if quoted and start < 0:
            start = i
        elif not quoted and start >= 0:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = -1
    if best[1] - best[0] < 5:
        return None
    return "\n".join(_QUOTE_RE.sub("", ln, count=1) for ln in lines[best[0] : best[1]])


def _inner_bounces(msg: email.message.Message, parts: _Parts) -> list[bytes]:
    """Bounces carried inside ``msg``: forwarded as an attachment or quoted."""
    out: list[bytes] = []
    for ret in parts.returned:
        inner = mime.message_from_string(ret)
        if _is_bounce_like(inner):
            out.append(ret.encode("utf-8", "replace"))
    for t in parts.texts:
        q = _unquote(t)
        if q is None:
            continue
        lines = q.lstrip("\n").split("\n")
        if len(lines) > 2 and _FIELD_RE.match(lines[0]) and _FIELD_RE.match(lines[1]):
            inner = mime.message_from_string(q.lstrip("\n"))
            if _is_bounce_like(inner):
                out.append(q.lstrip("\n").encode("utf-8", "replace"))
                continue
        # Quoted text without its headers: read it as the body of a bounce.
        out.append(b"From: MAILER-DAEMON\nSubject: Undelivered\n\n" + q.encode("utf-8", "replace"))
    return out


def _is_forward(msg: email.message.Message, parts: _Parts) -> bool:
    if _FORWARD_SUBJECT.match(_header(msg, "Subject")):
        return True
    return any(_forward_text(t) for t in parts.texts)


# The subject an auto-reply starts with: RFC 3834 section 3.1.5 suggests
# "Auto:"; Outlook/Exchange's Automatic Replies (the Out of Office Assistant)
# prefix the original subject with "Automatic reply:" in the user's language
# (de, fr, es, it, pt, nl, pl, sv, ru, ja, zh); older clients "Out of Office:"
# ("AutoReply:"); IONOS/GMX/web.de name the German feature "Abwesenheitsnotiz".
_AUTO_SUBJECT = re.compile(
    r"\s*(?:auto(?:matic)?[ -]?(?:reply|response)|out of (?:the )?office|auto:|automatische antwort"
    r"|abwesenheitsnotiz|r[ée]ponse automatique|respuesta autom[áa]tica|risposta automatica"
    r"|resposta autom[áa]tica|automatisch antwoord|automatyczna odpowied[źz]"
    r"|automatiskt svar|автоматический ответ|自動応答|自動返信|自动回复|自動回覆)",
    re.IGNORECASE,
)


def _is_autoreply(msg: email.message.Message, human: str = "") -> bool:
    """An auto-reply (vacation, out of office) from a person, not a mail system.

    RFC 3834: an automatic response carries Auto-Submitted with a value other
    than "no"; mail systems mark their bounces so too (Exim: auto-replied), so
    that header counts only on a message that is not bounce-like and whose
    own text (``human``, before any returned message) quotes no SMTP reply."""
    sender = vendors.ADDR_RE.findall(_header(msg, "From"))
    if not sender or vendors.is_system_address(sender[0]):
        return False
    if msg.get_content_type() == "multipart/report":
        return False
    if _AUTO_SUBJECT.match(_header(msg, "Subject")):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond"):
        return True
    if _header(msg, "X-Apple-Action").strip().lower() == "vacation":
        # iCloud Mail's vacation replies (its subject is the user's own).
        return True
    if _header(msg, "Precedence").lower() == "auto_reply":
        return True
    auto = _header(msg, "Auto-Submitted").strip().lower()
    if not auto or auto.startswith("no") or _is_bounce_like(msg):
        return False
    own = vendors.cut_original(human)[:20000] if human else ""
    return not (vendors.find_status(own) or vendors.find_reply_code(own))


# ---------------------------------------------------------------- ids
def _original_ids(
    msg: email.message.Message, parts: _Parts, decoder: VerpDecoder
) -> tuple[str | None, str | None]:
    verp = None
    # msg.get_all of each name in turn, from one pass over the headers.
    values: dict[str, list[Any]] = {n: [] for n in _VERP_HEADERS}
    fetch = msg.policy.header_fetch_parse
    for k, v in msg.raw_items():
        found = values.get(k.lower())
        if found is not None:
            found.append(fetch(k, v))
    for name in _VERP_HEADERS:
        for v in values[name]:
            for a in vendors.ADDR_RE.findall(str(v)):
                verp = decoder(a)
                if verp:
                    break
            if verp:
                break
        if verp:
            break
    orig = None
    sources = list(parts.returned)
    if not sources:
        # Plain-text bounces quote the returned headers after the error section.
        sources = [t[len(vendors.cut_original(t)) :] for t in parts.texts]
    for src in sources:
        fid = _line_field(_FASTSEND_ID, src)
        if fid is not None:
            return fid, verp
        if orig is None:
            orig = _line_field(_MESSAGE_ID, src)
    if orig is None:
        for d in parts.dsn:
            orig = _dsn_message_id(d)
            if orig is not None:
                break
    return orig, verp


_BLOCK_END = re.compile(r"\n[ \t]*\n")


def _dsn_message_id(dsn: str) -> str | None:
    """The first (X-)Original-Message-ID field of a delivery-status body's
    blocks (the per-message block, where reporting MTAs write it). The body
    was read once for its recipients; only the blocks up to the first
    mention of the name are read again (a DSN of 20,000 recipients was read
    twice whole, ~12% of its time), unless the mention was no field."""
    i = dsn.lower().find("original-message-id")
    if i < 0:
        return None
    m = _BLOCK_END.search(dsn, i)
    for text in (dsn[: m.start()], dsn) if m else (dsn,):
        for block in _field_blocks(text):
            for k in ("x-original-message-id", "original-message-id"):
                if k in block:
                    return block[k][0]
    return None


_VERP_HEADERS = ("x-original-to", "delivered-to", "envelope-to", "x-envelope-to", "to")
# A header field at a line start: (as written, "\n"-led for lower-cased ASCII
# text with "\n" put before it; see vendors.cut_original). The value is cut
# from the text itself, so its case is kept.
_FASTSEND_ID = (
    re.compile(r"(?im)^X-Fastsend-Id:\s*(\S+)"),
    re.compile(r"\nx-fastsend-id:\s*(\S+)"),
)
_MESSAGE_ID = (
    re.compile(r"(?im)^Message-I[Dd]:\s*(<[^>\s]+>|\S+)"),
    re.compile(r"\nmessage-id:\s*(<[^>\s]+>|\S+)"),
)


def _line_field(patterns: tuple[re.Pattern[str], re.Pattern[str]], text: str) -> str | None:
    """The value of the first match of patterns[0] in ``text``, or None."""
    if text.isascii():
        m = patterns[1].search("\n" + text.lower())
        return text[m.start(1) - 1 : m.end(1) - 1] if m else None
    m = patterns[0].search(text)
    return m.group(1) if m else None


# ---------------------------------------------------------------- entry point
def parse_bounce(
    raw: bytes,
    *,
    rules: RuleSet | None = None,
    verp_decoder: VerpDecoder | None = None,
) -> list[BounceRecord]:
    """One record per recipient reported by ``raw`` (a bounce, DSN or ARF report).

    Returns [] for a message that reports nothing. Records for recipients
    that were delivered (DSN Action: delivered/relayed) have reason
    "delivered"; complaint reports have reason "feedback" and a
    ``feedback_type``; auto-replies have reason "vacation".
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise TypeError(f"parse_bounce expects bytes, got {type(raw).__name__}")
    data = bytes(raw).replace(b"\r\n", b"\n")
    if data.startswith(b"From "):
        # An mbox: one or more messages, each after a "From " line.
        chunks = _MBOX_SPLIT.split(data)
        if len(chunks) > 1:
            out: list[BounceRecord] = []
            for chunk in chunks:
                out += _parse_one(chunk, rules, verp_decoder, 0)
            return out
    return _parse_one(data, rules, verp_decoder, 0)


def _parse_one(
    raw: bytes, rules: RuleSet | None, verp_decoder: VerpDecoder | None, depth: int
) -> list[BounceRecord]:
    rs = rules or default_rules()
    # mime.py stops splitting 20 multiparts deep (deeper nesting stays text),
    # so a hostile message nested thousands deep neither recurses nor raises.
    msg = mime.message_from_bytes(raw)
    parts = _collect(msg)
    if not (parts.texts or parts.dsn or parts.arf):
        # A multipart whose boundaries never appear (or junk MIME): read the raw body.
        data = bytes(raw).replace(b"\r\n", b"\n")
        head_end = data.find(b"\n\n")
        if head_end >= 0:
            parts.texts.append(data[head_end + 2 :].decode("utf-8", "replace"))
    human = "\n".join(parts.texts)

    raws: list[_Raw] = []
    if parts.arf:
        raws = _from_arf(parts.arf[0], parts, msg)
    elif (pasted := _arf_in_text(msg, parts)) is not None:
        raws = _from_arf(pasted[0], parts, msg, pasted[1])
    if not raws and parts.returned and _LEGACY_COMPLAINT.match(_header(msg, "Subject")):
        raws = _legacy_complaint(parts, msg)
    if not raws and (implied := _abuse_preface(parts)) is not None:
        raws = _from_arf(implied, parts, msg)
    if not raws and parts.dsn:
        for d in parts.dsn:
            raws += _from_dsn(d, human)
    if not raws and (msg.get("X-Apple-Unsubscribe") or _is_unsubscribe(msg)):
        sender = vendors.ADDR_RE.findall(_header(msg, "From"))
        raws = (
            [_Raw(recipient=sender[0], feedback_type="opt-out", reason="feedback")]
            if sender
            else []
        )
    if not raws and _is_autoreply(msg, human):
        # Before reading the text for failed addresses: an out-of-office names
        # colleagues to write to, and none of them bounced.
        sender = vendors.ADDR_RE.findall(_header(msg, "From"))
        if sender:
            raws = [_Raw(recipient=sender[0], reason="vacation", diagnostic=human[:500])]
    if not raws and depth < 2 and _is_forward(msg, parts):
        # A forwarded bounce (attached or quoted): read the bounce itself.
        for inner in _inner_bounces(msg, parts):
            inner_records = _parse_one(inner, rules, verp_decoder, depth + 1)
            if inner_records:
                return inner_records
    if not raws:
        raws = _from_text(msg, parts)
        if raws and depth < 2 and not any(r.status or r.reply_code for r in raws):
            # The text names no code at all, but the attached message is
            # itself a bounce that does (a gateway re-wrapping a DSN).
            for ret in parts.returned:
                wrapped = mime.message_from_string(ret)
                if not _is_bounce_like(wrapped):
                    continue
                inner_records = _parse_one(
                    ret.encode("utf-8", "replace"), rules, verp_decoder, depth + 1
                )
                if any(r.status or r.reply_code for r in inner_records):
                    return inner_records
    if not raws and depth < 2:
        for inner in _inner_bounces(msg, parts):
            inner_records = _parse_one(inner, rules, verp_decoder, depth + 1)
            if inner_records:
                return inner_records

    orig, verp = _original_ids(msg, parts, verp_decoder or default_verp_decoder)
    out = []
    echoes: dict[tuple[str, str], bool] = {}
    for r in raws:
        if r.reason:
            reason, hard, rate, ipb = r.reason, False, False, False
        else:
            generic = not r.status or r.status[1:] == ".0.0"
            if not r.command and generic:
                key = (r.diagnostic[:4096], r.recipient)
                echo = echoes.get(key)
                if echo is None:
                    echo = echoes[key] = _echoes_recipient(*key, _is_kddi(r))
                if echo:
                    # A reply that is known to answer RCPT TO (see _echoes_recipient).
                    r.command = "RCPT"
            c = rs.classify(
                r.reply_code,
                r.status,
                _without_recipient(r.diagnostic, r.recipient),
                command=r.command,
                action=r.action,
            )
            reason, hard, rate, ipb = c.reason, c.hard, c.rate_limited, c.ip_blocked
            stated = _notice_reason(rs, r.notice, reason, r.action) if r.notice else ""
            if stated:
                # The notice says why above its list ("The user(s) account is
                # disabled."), the reply beside the address a generic refusal.
                reason, hard, rate, ipb = stated, False, False, False
            if r.action in ("delivered", "relayed", "expanded") and reason in (
                "onhold",
                "undefined",
            ):
                # Handed on with no failure named (SES's Delivery notification, its
                # smtpResponse "250 ok" holding no status): delivered, as documented.
                reason = "delivered"
            if r.ses[0]:
                reason, hard = ses_verdict(*r.ses, c, hard)
            if r.diag_type.startswith("x-unix") and reason != "mailboxfull":
                # A local delivery program failed: the mailer, not the address.
                reason, hard = "mailererror", False
            elif _LIST_HOST.search(r.recipient) and not (r.reply_code or r.status):
                # Google Groups (and the like) refusing a post: the group may not
                # exist or the sender may not post; the text is localised.
                reason, hard = "rejected", False
        out.append(
            BounceRecord(
                recipient=r.recipient,
                status=r.status or None,
                reply_code=r.reply_code or None,
                diagnostic=r.diagnostic[:2000],
                reason=reason,
                hard=hard,
                feedback_type=r.feedback_type or None,
                original_message_id=orig,
                verp_id=verp,
                action=r.action or None,
                remote_mta=r.remote_mta or None,
                original_recipient=r.original_recipient or None,
                command=r.command or None,
                rate_limited=rate,
                ip_blocked=ipb,
            )
        )
    return out


# IMail's own refusal of a local recipient ("Unknown user: <address>",
# written with no reply code: its fixed text at RCPT, as Sisimai's lhost
# IMailServer reads it).
_IMAIL_UNKNOWN = re.compile(r"(?:^|\n)\s*unknown user:\s*[<']?$")
# A reply whose code (and status) the address follows ("550 <a@b>: ...";
# it may open a quoted reply: "550-'a@b.example... No such user'").
_ECHO_BEFORE = re.compile(r"\b[45]\d\d[ -](?:[45]\.\d{1,3}\.\d{1,3} )?\s*[<']?$")
# KDDI (au / EZweb) names the refused address in its RCPT reply ("550
# <a@ezweb.ne.jp>: User unknown") and leaves it out ("550 : User unknown")
# when its recipient's filter refused the sender (Sisimai's rhost KDDI:
# ">: User unknown" is userunknown, "550 : User unknown" filtered).
_KDDI_HOSTS = re.compile(r"(?:^|[.@])(?:ezweb\.ne\.jp|au\.com)\.?$")


def _is_kddi(r: _Raw) -> bool:
    host = r.remote_mta.split()[0].rstrip(".") if r.remote_mta.strip() else ""
    return bool(_KDDI_HOSTS.search(host.lower()) or _KDDI_HOSTS.search(r.recipient.lower()))


def _echoes_recipient(diagnostic: str, recipient: str, kddi: bool = False) -> bool:
    """The reply is known to answer RCPT TO by how it names the recipient:
    IMail's "Unknown user: <address>", or KDDI's reply naming the address
    right after its code. Any other reply that merely names the recipient
    after its code ("550 <a@b>... User not exist" in a report that names no
    command) says nothing of the stage: a content filter after DATA names
    the recipient it refuses for as well, and a "user unknown" without RCPT
    evidence is filtered, as Sisimai reads it (the labels' meaning)."""
    if not recipient or "@" not in recipient:
        return False
    low, rcpt = diagnostic.lower(), recipient.lower()
    i = low.find(rcpt)
    for _ in range(20):
        if i < 0:
            return False
        after = low[i + len(rcpt) : i + len(rcpt) + 1]
        if not (after.isalnum() or after in ("-", "_")):
            before = low[max(0, i - 40) : i]
            if _IMAIL_UNKNOWN.search(before) or (kddi and _ECHO_BEFORE.search(before)):
                return True
        i = low.find(rcpt, i + 1)
    return False


# What stands for the local part of the recipient's own address in the text
# the rules read.
_RECIPIENT_LOCAL = "recipient"


def _without_recipient(diagnostic: str, recipient: str) -> str:
    """The reply with the local part of the recipient's own address replaced
    by one fixed word (its domain kept: a site's replies are known by it,
    NTT docomo's "550 Unknown user a@docomo.ne.jp"): the reason is the
    reply's words, never the mailbox name's ("550 <spam.unknown@x>: mailbox
    full" is mailboxfull), and the recipients of a report sharing one reply
    ("550 5.1.1 <a@x>: user unknown" for each) are classified once (each
    address made every reply new to the classifier's memo: ~40 us a
    recipient)."""
    at = recipient.rfind("@")
    if at < 1 or at == len(recipient) - 1:
        return diagnostic
    token = _RECIPIENT_LOCAL + recipient[at:]
    if recipient in diagnostic:
        return diagnostic.replace(recipient, token)
    low = diagnostic.lower()
    rcpt = recipient.lower()
    if rcpt not in low or len(low) != len(diagnostic):
        return diagnostic
    out: list[str] = []
    pos = 0
    while (i := low.find(rcpt, pos)) >= 0:
        out += (diagnostic[pos:i], token)
        pos = i + len(rcpt)
    out.append(diagnostic[pos:])
    return "".join(out)


def _is_unsubscribe(msg: email.message.Message) -> bool:
    """A reply to a List-Unsubscribe mailto: (RFC 2369), subject "unsubscribe"."""
    return _header(msg, "Subject").strip().lower() == "unsubscribe" and not msg.is_multipart()
