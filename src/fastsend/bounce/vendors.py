"""Recipients and diagnostics from bounces that are not RFC 3464 DSNs.

Many MTAs and providers still send plain-text bounces (qmail, Exim, old
Sendmail, Exchange 2003, Domino, Gmail, Yahoo, DragonFly, 1&1, ...) or JSON
notifications (Amazon SES through SNS). Rather than one parser per vendor
keyed to exact layouts, this module reads them the way a person does:

* cut the text where the returned message begins (the usual markers, or the
  first run of header lines);
* take the addresses named in what is left, in order, minus the bounce's own
  sender/recipient and mailer-daemon/postmaster addresses and addresses seen
  as the envelope sender (``MAIL FROM:<...>``);
* give each recipient the text between its first mention and the next
  recipient's (the whole error section when there is one recipient), and
  pull the reply code, enhanced status and SMTP command out of that text.

It deliberately knows nothing about reasons: classification is reply.py's.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from dataclasses import dataclass
from typing import Any


def case_sensitive(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """``pattern`` (case-insensitive, no upper-case letter of its own) for
    lower-cased ASCII text: the same matches at the same places, and the
    engine can skip ahead to the possible first characters, which it cannot
    do for a case-insensitive pattern starting with a letter."""
    if re.search("[A-Z]", re.sub(r"\\.", "", pattern.pattern)):
        raise ValueError(f"an upper-case letter in {pattern.pattern!r}")
    return re.compile(pattern.pattern, pattern.flags & ~re.IGNORECASE)


# Every repetition is bounded (a local part is at most 64 octets and a domain
# at most 255, RFC 5321 4.5.3.1), so a search costs at most a constant per
# start position: a long run of atext characters without "@" stays linear.
# An address never begins with a quote, nor with a reply code and the quote
# opening a relay's quoted reply (Amazon SES: "550-'a@b.example... No such
# user'"): the address is what follows the quote.
ADDR_RE = re.compile(
    r"(?<![\w.+=/-])(?!'|[245]\d\d-')([\w.!#$%&'*+/=?^`{|}~-]{1,64}@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.){1,126}[a-z]{2,63})(?![\w-])",
    re.IGNORECASE,
)
# (Each starts with its first digit, the look-behind after it: a pattern led by
# a look-behind is tried at every position of the text, one led by a character
# class only where the engine's scan finds one of them: same matches, 3x faster.)
ENHANCED_RE = re.compile(r"([245])(?<![\d.][245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
REPLY_RE = re.compile(r"([245](?<![\d.:/#-][245])[0-5]\d)(?:[ _-]|$)(?![\d]{2})", re.MULTILINE)
_SYSTEM_LOCAL = re.compile(
    r"^(?:mailer-daemon|postmaster|mail-daemon|maildaemon|no-?reply|bounces?|double-bounce|root)$",
    re.IGNORECASE,
)
# Where the copy of the original message (or its headers) begins.
_CUT_RE = re.compile(
    r"^[ \t]*(?:"
    r"-+ ?this is a copy of (?:the|your) message"
    r"|-+ ?below this line is a copy of the message"
    r"|-+ ?(?:original|returned|unsent|undelivered) message(?: headers?)? (?:follows|is following)?"
    r"|(?:original|returned|unsent) message(?: headers?)? follows"
    r"|-+ ?original message ?-+"
    r"|-+ ?the header of the original message is following"
    r"|-+ ?(?:the )?original message (?:header|text)"
    r"|message headers follow"
    r"|original message headers:"
    r"|-+ ?start of returned message"
    r"|-+ ?returned mail follows"
    r"|-+ ?unsent message below"
    r"|content-type: message/rfc822"
    r"|content-type: text/rfc822-headers"
    r"|\*\*\* ?original message"
    r"|---+ ?forwarded message"
    r")",
    re.IGNORECASE | re.MULTILINE,
)
# _CUT_RE for a text with "\n" put before it (the line start found from the
# newline before it: the engine jumps from newline to newline), as written
# and for lower-cased ASCII text (case-sensitive: faster, same matches).
_CUT_NL = re.compile("\n" + _CUT_RE.pattern[1:], re.IGNORECASE)
_CUT_NL_LOWER = case_sensitive(_CUT_NL)
# A report's own summary of the returned message, after the reply (Apache
# James: "Message details:" then "Subject:", "MAIL FROM:", "RCPT TO:" ...).
_SUMMARY_RE = re.compile(
    r"^[ \t]*(?:original )?message details:?[ \t]*$", re.IGNORECASE | re.MULTILINE
)
_HEADER_LINE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,40}: \S")
# A returned header block: a line starting with a common header field, then two header-like lines
# (a field with a value, or a continuation), each line tried once per start.
_HEADER_RUN = re.compile(
    r"^(?:Received|Return-Path|Message-I[Dd]|DKIM-Signature|MIME-Version|X-[A-Za-z-]+|From|Date|Subject|To): "
    r"[^\n]*\n(?:[A-Za-z][A-Za-z0-9-]{1,40}: \S|[ \t])[^\n]*\n(?:[A-Za-z][A-Za-z0-9-]{1,40}: \S|[ \t])",
    re.MULTILINE,
)
_HEADER_RUN_NL = re.compile("\n" + _HEADER_RUN.pattern[1:])
_SENDER_CONTEXT = re.compile(
    r"(?:mail from:?\s*<?|envelope-from\s*<?|return-path:?\s*<?|sender:?\s*<?|from:\s*<?|\bfrom\s+<"
    # Exim's "(generated from ADDR)" and Sendmail's "(expanded from: <ADDR>)"
    # name the alias the failed address came from, not a recipient.
    r"|generated from\s+<?|expanded from:?\s*<?"
    # A Message-ID quoted in the report ("Message-id: <x@host>", a list of
    # the returned message's fields) is an id shaped like an address.
    r"|message-?id:?\s*<?|in-reply-to:\s*<?"
    # Microsoft 365's NDR lists the returned message's "Original Message
    # Details": "Sender Address: ..." (and its translations) beside the
    # recipient's; the sender is no failed recipient.
    r"|sender address:?\s*<?|absenderadresse:?\s*<?|exp(?:é|e)diteur\s*:?\s*<?"
    r"|remitente:?\s*<?|remetente:?\s*<?|mittente:?\s*<?|afzender(?:adres)?:?\s*<?"
    # Other labels a report gives the returned message's author ("Originator:"
    # in X.400-style reports, "Sender (MAIL FROM):", "Reply-To:") and "From:"
    # as the languages of the reports write it (Von, De, Van, Od, 差出人, 送信者,
    # 发件人, 寄件者).
    r"|originator:?\s*<?|reply-to:?\s*<?|(?:from|return) address:?\s*<?|author:?\s*<?"
    r"|submitted by:?\s*<?|sender \(mail from\):?\s*<?"
    r"|\b(?:von|de|van|od)\s?:\s*<?|(?:差出人|送信者|发件人|發件人|寄件者)(?:アドレス)?\s*[:：]?\s*<?)\s*$",
    re.IGNORECASE,
)
# What _SENDER_CONTEXT's alternatives can end with (a label's last word or its
# colon): a mention whose preceding text ends otherwise is no sender's, and the
# regular expression (some thirty alternatives tried at each position) is not
# run for it. A filter only: the expression decides.
_CONTEXT_TAILS = (
    "from", "path", "sender", "id", "address", "adresse", "diteur", "ente", "zender", "adres",
    "originator", "to", "author", "by", "差出人", "送信者", "发件人", "發件人", "寄件者", "アドレス",
    ":", "：", ")",
)  # fmt: skip


def _sender_context(before: str) -> bool:
    """The text before an address labels it as the sender (or an id, an alias)."""
    tail = before.rstrip(" \t\r\n<")
    if not tail.lower().endswith(_CONTEXT_TAILS):
        return False
    return _SENDER_CONTEXT.search(before) is not None


# The alias a failed delivery was expanded from (part of _SENDER_CONTEXT).
_ALIAS_CONTEXT = re.compile(r"(?:generated from\s+<?|expanded from:?\s*<?)\s*$", re.IGNORECASE)
# Phrases that say which command a reply answered wherever they appear
# (qmail-remote's fixed texts and their clones).
_COMMAND_PHRASES = (
    (re.compile(r"does not like recipient", re.I), "RCPT"),
    (re.compile(r"but sender was rejected", re.I), "MAIL"),
    (re.compile(r"failed on data command|failed after i sent the message", re.I), "DATA"),
    (re.compile(r"but my name was rejected", re.I), "EHLO"),
    (re.compile(r"but greeting failed", re.I), "CONN"),
    # Postfix smtp(8): the server's greeting was a refusal.
    (re.compile(r"refused to talk to me", re.I), "CONN"),
    # Gmail's older notices end the quoted reply with its client's state when
    # refused ("550 550 5.1.1 <a>... User Unknown (state 14)."): 13 after
    # EHLO, 14 at RCPT, 15/17/18 at DATA, 6 and 9 at STARTTLS ("500 Remote
    # server does not support TLS (state 6)", "454 TLS missing certificate
    # ... (state 9)"), 8 and 12 at AUTH with a relay Gmail was told to use
    # ("535 SMTP AUTH failed with the remote server. (state 8)") (the states'
    # stages as Sisimai's Lhost::Google collects them from Gmail's help forum
    # answers).
    (re.compile(r"\(state 14\)", re.I), "RCPT"),
    (re.compile(r"\(state 1[578]\)", re.I), "DATA"),
    (re.compile(r"\(state 13\)", re.I), "EHLO"),
    (re.compile(r"\(state [69]\)", re.I), "STARTTLS"),
    (re.compile(r"\(state (?:8|12)\)", re.I), "AUTH"),
    # "SMTP Server <mx> rejected recipient <a> (Error following RCPT command)."
    (re.compile(r"error following rcpt", re.I), "RCPT"),
    (re.compile(r"error following mail", re.I), "MAIL"),
    (re.compile(r"error following data", re.I), "DATA"),
    # Yahoo's notices end the quoted reply with the phase it answered:
    # "Remote host said: 550 ... [RCPT_TO]", "[MAIL_FROM]", "[BODY]".
    (re.compile(r"\[rcpt_to\]", re.I), "RCPT"),
    (re.compile(r"\[mail_from\]", re.I), "MAIL"),
    (re.compile(r"\[(?:body|data)\]", re.I), "DATA"),
)
# A quoted session transcript: the client's command after ">>>"/"<<<"
# (sendmail, Courier, iMail) or "-->" (MDaemon's session log).
_SENT_RE = re.compile(r"(?:<<<|>>>|-->) ?(rcpt to|mail from|data|ehlo|helo)\b", re.IGNORECASE)
# Where a free-text bounce starts listing the failed recipients: addresses
# named after such a line are preferred over those in a summary before it
# (Exchange 2003's "Your message To: ... did not reach the following
# recipient(s):", Sendmail's "----- The following addresses had ...").
_RCPT_LIST_RE = re.compile(
    r"did not reach the following recipient"
    r"|following (?:addresses|recipients?) (?:had|failed|could not|were|was)"
    r"|delivery to the following (?:recipients?|addresses) (?:failed|was delayed|has been delayed)"
    r"|could not be delivered to (?:the following|one or more)"
    r"|unable to deliver (?:your |the )?message to the following"
    r"|failed to deliver to the following",
    re.IGNORECASE,
)
_COMMANDS = (
    (re.compile(r"\b(?:rcpt(?: to)?\b|recipient address|>>> rcpt)|in reply to rcpt", re.I), "RCPT"),
    (re.compile(r"\b(?:mail from|>>> mail)\b|in reply to mail", re.I), "MAIL"),
    (
        re.compile(
            r"end of data|final data|after data|>>> data|in reply to (?:end of )?data|"
            r"after end of|\bdata command|command:?\s+data\b",
            re.I,
        ),
        "DATA",
    ),
    (re.compile(r"\b(?:ehlo|helo)\b(?! command rejected)|my name was rejected", re.I), "EHLO"),
    (re.compile(r"initial connection|after connect|on connect|greeting", re.I), "CONN"),
    (re.compile(r"\bstarttls\b", re.I), "STARTTLS"),
)
_COMMAND_CONTEXT = re.compile(
    r"(?:in reply to|after|while talking to|did not like our|>>>|error from remote (?:mail )?server|"
    r"but|(?:rejected|refused) (?:at|in|by)|replied to|"
    r"smtp command:?|smtp:(?=[a-z]))"
    r".{0,60}",
    re.IGNORECASE | re.DOTALL,
)


# The most of a bounce's text kept as one recipient's diagnostic: enough for
# any SMTP reply and its explanation, and it bounds the work per recipient.
DIAG_CAP = 8192


@dataclass(slots=True)
class TextFinding:
    """One recipient found in a free-text bounce."""

    recipient: str
    diagnostic: str
    reply_code: int = 0
    status: str = ""
    command: str = ""


@functools.lru_cache(maxsize=16)
def cut_original(text: str) -> str:
    """The part of a bounce text before the copy of the original message.

    Memoised (a bounce asks for the same text's cut several times)."""
    # As _CUT_RE.search(text) and _HEADER_RUN.search(text), through their
    # "\n"-led forms (see _CUT_NL): m.start() is the line start in text.
    ascii_ = text.isascii()
    m = (_CUT_NL_LOWER if ascii_ else _CUT_NL).search("\n" + (text.lower() if ascii_ else text))
    if m:
        text = text[: m.start()]
    # Three header lines in a row at column 0: the returned headers begin (a
    # lone "To: ..." summary line is not enough). One forward scan.
    m = _HEADER_RUN_NL.search("\n" + text)
    if m:
        return text[: max(0, m.start() - 1)]
    return text


@functools.lru_cache(maxsize=16)
def address_spans(text: str) -> tuple[tuple[int, int, str], ...]:
    """(start, end, address) of every ADDR_RE match in ``text``, in order.

    Memoised: a bounce's error section is searched for addresses by several
    steps (its recipients, their mentions, the candidates)."""
    # A match has an "@" and no blank, and ADDR_RE's look-arounds see the
    # same at a blank as at either end of the text: so only the blank-free
    # stretch around each "@" is searched (its bounds passed as pos/endpos,
    # so the look-behind still sees the blank before it). Same matches as
    # ADDR_RE.finditer(text), without running the pattern over every word.
    out = []
    find, rfind = text.find, text.rfind
    n = len(text)
    pos = 0
    while (at := find("@", pos)) >= 0:
        start = max(
            pos, rfind(" ", pos, at) + 1, rfind("\n", pos, at) + 1, rfind("\t", pos, at) + 1
        )
        end = n
        for blank in (" ", "\n", "\t"):
            i = find(blank, at, end)
            if i >= 0:
                end = i
        out += [(m.start(1), m.end(1), m.group(1)) for m in ADDR_RE.finditer(text, start, end)]
        pos = end
    return tuple(out)


def _starts_line(text: str, pos: int) -> bool:
    """Only blanks, and an opening '<' or quote, between the line start and ``pos``."""
    start = text.rfind("\n", 0, pos) + 1
    if pos - start > 12:
        return False
    return text[start:pos].strip(' \t<"') == ""


def find_reply_code(text: str) -> int:
    """The first SMTP reply code (4xx/5xx) in ``text``, or 0."""
    for m in REPLY_RE.finditer(text):
        code = int(m.group(1))
        if code >= 400:
            return code
    return 0


# A relay's summary wrapping the remote server's reply in quotes, as Amazon
# SES writes it: "5.1.0 - Unknown address error 550-'5.7.1 <x>... Access
# denied' (delivery attempts: 0)". The summary's status is the relay's
# guess from the reply code; the quoted reply's own status says why.
_WRAPPED_REPLY = re.compile(
    r"\s*[45]\.\d{1,3}\.\d{1,3} - [^\n']{1,80}? [45]\d\d[ -]'([45]\.\d{1,3}\.\d{1,3})\b"
)


def find_status(text: str) -> str:
    """The first enhanced status code (4.x.x/5.x.x) in ``text``, or "" (the
    quoted reply's, when a relay's summary wraps it: _WRAPPED_REPLY)."""
    wrapped = _WRAPPED_REPLY.match(text)
    if wrapped is not None:
        return wrapped.group(1)
    for m in ENHANCED_RE.finditer(text):
        if m.group(1) in "45":
            return m.group(0)
    return ""


# find_command's patterns in both forms: (as written, for lower-cased ASCII).
_COMMAND_SETS = tuple(
    (
        tuple((case_sensitive(p) if lower else p, name) for p, name in _COMMAND_PHRASES),
        case_sensitive(_SENT_RE) if lower else _SENT_RE,
        case_sensitive(_COMMAND_CONTEXT) if lower else _COMMAND_CONTEXT,
        tuple((case_sensitive(p) if lower else p, name) for p, name in _COMMANDS),
    )
    for lower in (False, True)
)


# Two or more blanks, or one tab or line break (as r"\s{2,}|[\t\n\r]" finds
# them, led by one blank: the engine skips to the blanks, 2x faster).
_BLANKS_RE = re.compile(r"\s(?:(?<=[\t\n\r])\s*|\s+)")


def find_command(text: str) -> str:
    """The SMTP command a reply answered, when the text says so, or ""."""
    # Bounces wrap their explanation anywhere, also inside the phrase that
    # names the command (Postfix: "(in reply\n    to RCPT TO command)").
    text = _BLANKS_RE.sub(" ", text)
    if text.isascii():
        # The same matches as the case-insensitive patterns give on the text.
        phrases, sent_re, context, commands = _COMMAND_SETS[1]
        text = text.lower()
    else:
        phrases, sent_re, context, commands = _COMMAND_SETS[0]
    for pattern, name in phrases:
        if pattern.search(text):
            return name
    sent = sent_re.findall(text)
    if sent:
        # A transcript ("Sent <<< RCPT TO:<...>" / "Received >>> 550 ..."):
        # the reply answered the last command sent.
        verb = sent[-1].upper()
        return {"HELO": "EHLO", "RCPT TO": "RCPT", "MAIL FROM": "MAIL"}.get(verb, verb)
    for ctx in context.finditer(text):
        for pattern, name in commands:
            if pattern.search(ctx.group(0)):
                return name
    return ""


def is_system_address(addr: str) -> bool:
    """mailer-daemon@, postmaster@ and the like."""
    return bool(_SYSTEM_LOCAL.match(addr.split("@", 1)[0]))


def _is_excluded(addr: str, exclude: set[str]) -> bool:
    a = addr.lower()
    return a in exclude or bool(_SYSTEM_LOCAL.match(a.split("@", 1)[0]))


# An address the report or the remote reply gives to write to ("please
# contact support@x", "e-mail us at help@x", "mailto:abuse@x"): a help desk,
# not a failed recipient (unless it is the only address named, or is also
# named otherwise).
_CONTACT_CONTEXT = re.compile(
    r"(?:\bcontact(?:ing)?(?: us)?(?: at| via| on)?|\bwrite (?:to|us at)|\be-?mail us at"
    r"|\breach us at|\b(?:please|you (?:may|can|should)) send (?:an? )?(?:e-?mail|mail|message"
    r"|note|request) to|mailto:)\s*<?$",
    re.IGNORECASE,
)
_CONTACT_TAILS = ("contact", "contacting", "us", "at", "via", "on", "to", "mailto:")


def _contact_context(before: str) -> bool:
    tail = before.rstrip(" \t\r\n<").lower()
    return tail.endswith(_CONTACT_TAILS) and _CONTACT_CONTEXT.search(before) is not None


def candidate_addresses(
    section: str, exclude: set[str], *, allow_system: bool = False
) -> list[tuple[str, int, int]]:
    """(address, start, end) of each first mention of a plausible recipient."""
    seen: dict[str, tuple[str, int, int]] = {}
    senders: set[str] = set()
    aliases: dict[str, tuple[str, int, int]] = {}
    # Addresses named only as ones to write to, and those named otherwise too.
    contacts: set[str] = set()
    named: set[str] = set()
    for start, end, found in address_spans(section):
        addr = found.strip(".")
        key = addr.lower()
        before = section[max(0, start - 24) : start]
        if _contact_context(section[max(0, start - 48) : start]):
            contacts.add(key)
        else:
            named.add(key)
        if _sender_context(before):
            senders.add(key)
            if _ALIAS_CONTEXT.search(before):
                aliases.setdefault(key, (addr, start, end))
            continue
        excluded = key in exclude if allow_system else _is_excluded(addr, exclude)
        if key not in seen and not excluded:
            seen[key] = (addr, start, end)
    out = [v for k, v in seen.items() if k not in senders]
    help_desks = contacts - named
    if help_desks and len(help_desks) < len(out):
        out = [v for v in out if v[0].lower() not in help_desks]
    if not out and aliases:
        # The failed "address" was no address at all (a pipe or a file the
        # alias expanded to: sendmail's '"|/usr/bin/procmail" (expanded
        # from: <bob@x.test>)'): the alias is the recipient we sent to.
        out = [v for k, v in aliases.items() if not _is_excluded(v[0], exclude)]
    return out


_LEAD_MAX = 200


def _lead_start(text: str, pos: int) -> int:
    """Where a recipient's own words begin: the start of the line naming it
    at ``pos`` when words precede it there ("Unable to deliver message to
    <a@x>", "Delivery to a@x failed:"), else ``pos`` itself (an address
    opening its line, maybe after "<" or a quote, says nothing before it).
    Only the _LEAD_MAX characters before ``pos`` are looked at (a lead-in is
    a short phrase; and the work per recipient stays bounded)."""
    start = text.rfind("\n", max(0, pos - _LEAD_MAX), pos) + 1
    if (start == 0 and pos > _LEAD_MAX) or text[start:pos].strip(' \t<"') == "":
        return pos
    return start


# The lines of a quoted session that lead up to the reply naming a recipient:
# the command sent (">>> DATA", "Sent <<< RCPT TO:") and where ("... while
# talking to mx.example.net.:").
_SESSION_LEAD = re.compile(r"[ \t]*(?:>>>|sent <<<|\.\.\. while talking to|while talking to)", re.I)


def _block_start(text: str, pos: int) -> int:
    """Where the words about the mention at ``pos`` begin: its line's lead-in
    (_lead_start), and the quoted session lines just above it (at most four,
    each at most _LEAD_MAX characters back)."""
    start = _lead_start(text, pos)
    line = text.rfind("\n", max(0, start - _LEAD_MAX), start) + 1 if start == pos else start
    for _ in range(4):
        if line == 0:
            break
        prev = text.rfind("\n", max(0, line - 1 - _LEAD_MAX), line - 1) + 1
        if not _SESSION_LEAD.match(text, prev, line):
            break
        start = line = prev
    return start


def _later_mentions(
    section: str,
    mentions: list[tuple[int, str]],
    next_other: list[int],
    own: list[int],
    after: int,
) -> str:
    """The text after each later mention of a recipient, past ``after`` (up
    to the next other recipient's line), joined: a report that names each
    recipient again in a part of its own (Office 365's "Diagnostic information
    for administrators: ADDR / Remote Server returned '550 5.1.10 ...'", a
    summary then a transcript) says there what the server replied. At most
    DIAG_CAP characters in all."""
    out: list[str] = []
    size = 0
    for i in own:
        pos = mentions[i][0]
        if pos < after:
            continue
        j = next_other[i]
        stop = _block_start(section, mentions[j][0]) if j < len(mentions) else len(section)
        begin = max(after, _block_start(section, pos))
        piece = section[begin : min(max(begin, stop), begin + DIAG_CAP - size)]
        out.append(piece)
        size += len(piece)
        after = max(stop, begin)
        if size >= DIAG_CAP:
            break
    return "\n" + "\n".join(out) if out else ""


def find_in_text(
    text: str, exclude: set[str], hinted: list[str] | None = None, *, allow_system: bool = False
) -> list[TextFinding]:
    """Recipients and their diagnostics from a free-text bounce body.

    ``hinted`` names the recipients (e.g. from X-Failed-Recipients); else
    they are the plausible addresses of the text. ``allow_system`` keeps
    postmaster@ and the like (for bounces about such an address)."""
    section = cut_original(text)
    if hinted:
        # Each named recipient once (a header may repeat one many times).
        once: dict[str, str] = {}
        for a in hinted:
            once.setdefault(a.lower(), a)
        hinted = list(once.values())
        first: dict[str, int] = {}
        for start, _, addr in address_spans(section):
            first.setdefault(addr.lower(), start)
        found = []
        for addr in hinted:
            i = first.get(addr.lower(), -1)
            found.append((addr, i, i + len(addr) if i >= 0 else -1))
    else:
        found = []
        marker = _RCPT_LIST_RE.search(section)
        if marker:
            # Recipients listed after "did not reach the following recipient(s)".
            found = [
                (a, s + marker.end(), e + marker.end())
                for a, s, e in candidate_addresses(
                    section[marker.end() :], exclude, allow_system=allow_system
                )
            ]
        if not found:
            found = candidate_addresses(section, exclude, allow_system=allow_system)
        # MTAs list failed recipients at the start of a line (Postfix and
        # qmail "<rcpt>: ...", Exim's indented address, Sendmail "<rcpt>...
        # "); an address inside a sentence (a help desk, a postmaster: "For
        # further assistance, please contact <support@...>", also after the
        # report's "could not be delivered to one or more destinations") is
        # not one when such lines exist.
        listed = [f for f in found if _starts_line(section, f[1])]
        if listed and len(listed) < len(found):
            found = listed
    out: list[TextFinding] = []
    # Recipients listed with no words of their own (out's index, start, end),
    # read against the explanation they share once every other recipient's
    # own reply is known (see _shared).
    listed_only: list[tuple[int, int, int]] = []
    # Where each other recipient's own reply was read (a line "<b@y>: 550
    # ..." below a list): not the listed ones' explanation.
    owned: list[tuple[int, int]] = []
    # Every mention of a recipient in text order, found in one pass.
    names = {a.lower() for a, _, _ in found}
    mentions = [
        (start, low) for start, _, addr in address_spans(section) if (low := addr.lower()) in names
    ]
    # For each mention: the index of the next mention of another recipient
    # (len(mentions) if none), and each recipient's mentions, in one pass each.
    next_other = [len(mentions)] * len(mentions)
    for i in range(len(mentions) - 2, -1, -1):
        same = mentions[i + 1][1] == mentions[i][1]
        next_other[i] = next_other[i + 1] if same else i + 1
    mentioned: dict[str, list[int]] = {}
    for i, (_, low) in enumerate(mentions):
        mentioned.setdefault(low, []).append(i)
    prev_shared = -1  # where the last recipient sharing the explanation ended
    for addr, start, end in found:
        if start < 0 or len(found) == 1:
            if start < 0:
                diag = section
            else:
                lead = _lead_start(section, start)
                diag = section[lead:] if lead < start else section[end:]
            if len(diag.strip()) < 20 or (not find_reply_code(diag) and find_reply_code(section)):
                diag = section
                summary = _SUMMARY_RE.search(diag)
                if summary and find_reply_code(diag[: summary.start()]):
                    # The report's summary of the returned message ("Message
                    # details: Subject ... MAIL FROM: ... RCPT TO: ...", Apache
                    # James) names its envelope, not the command refused.
                    diag = diag[: summary.start()]
        else:
            # Up to the next mention of any other recipient (or the start of
            # its line, when words before it on that line are its own).
            stop = len(section)
            own = addr.lower()
            k = bisect.bisect_left(mentions, (end, ""))
            while k < len(mentions):
                if mentions[k][1] != own:
                    stop = max(end, _lead_start(section, mentions[k][0]))
                    break
                k += 1
            # Bounded: only the first DIAG_CAP characters are ever read.
            lead = _lead_start(section, start)
            diag = section[end : min(stop, end + 2 * DIAG_CAP)]
            in_list = lead == start and len(diag.strip()) < 10
            if not in_list and lead == start and 0 <= prev_shared <= start:
                # The last of a list of recipients sharing one explanation
                # given before the list (MailMarshal's "Could not be delivered
                # because of ... The following recipients were affected:"):
                # what follows it is the report's trailer, not its reply.
                in_list = not find_reply_code(diag) and not find_status(diag)
            prev_shared = end if in_list else -1
            if lead < start:
                # Words before it on its line are about it.
                diag = section[lead : min(stop, lead + 2 * DIAG_CAP)]
            if not in_list:
                diag += _later_mentions(section, mentions, next_other, mentioned.get(own, []), stop)
            if in_list:
                listed_only.append((len(out), start, end))
                out.append(TextFinding(addr, ""))
                continue
            if _owns_reply(section, lead, start, end, stop):
                owned.append((min(lead, start), stop))
        diag = diag.strip()[:DIAG_CAP]
        out.append(
            TextFinding(
                recipient=addr,
                diagnostic=diag,
                reply_code=find_reply_code(diag),
                status=find_status(diag),
                command=find_command(diag)
                or (find_command(section[max(0, start - 40) : end]) if start >= 0 else ""),
            )
        )
    if listed_only:
        shared = _shared(section, owned)
        for i, start, end in listed_only:
            out[i] = TextFinding(
                out[i].recipient,
                shared.diagnostic,
                shared.reply_code,
                shared.status,
                shared.command or find_command(section[max(0, start - 40) : end]),
            )
    return out


def _owns_reply(section: str, lead: int, start: int, end: int, stop: int) -> bool:
    """Whether the reply after the recipient at ``start``..``end`` (up to
    ``stop``) is its own: it starts on the address's line ("<b@y>: 550 ...",
    "Delivery to b@y failed: 550 ...") or the address introduces it
    ("<b@y>:" then the reply, qmail and Postfix); not a reply given once
    below a list whose last line the address is ("Reason: 550 ...")."""
    eol = section.find("\n", end)
    rest = section[end : len(section) if eol < 0 else eol]
    if not (lead < start or rest.strip(' \t>"')):
        return False
    own = section[min(lead, start) : min(stop, end + 2 * DIAG_CAP)]
    return bool(find_reply_code(own) or find_status(own))


def _shared(section: str, owned: list[tuple[int, int]]) -> TextFinding:
    """The explanation the recipients listed with no words of their own
    share: the report's text (its first DIAG_CAP characters) without the
    replies other recipients were given on lines of their own ("<b@y>: 550
    5.1.1 User unknown" below a heading listing "<a@x>" alone: b's refusal,
    not a's; read as a's it made a a hard bounce, suppressed)."""
    kept: list[str] = []
    size, at = 0, 0
    for begin, stop in sorted(owned):
        if begin > at:
            kept.append(section[at:begin])
            size += begin - at
        at = max(at, stop)
        if size >= DIAG_CAP:
            break
    if size < DIAG_CAP and at < len(section):
        kept.append(section[at:])
    text = "".join(kept)[:DIAG_CAP].strip()
    return TextFinding("", text, find_reply_code(text), find_status(text), find_command(text))


# ---------------------------------------------------------------- Amazon SES
@dataclass(slots=True)
class SESRecord:
    recipient: str
    action: str
    status: str
    diagnostic: str
    feedback_type: str
    kind: str  # "bounce", "complaint", "delivery"
    message_id: str
    remote_mta: str
    # SES's own verdict on a bounce: bounceType (Permanent, Transient,
    # Undetermined) and bounceSubType (General, NoEmail, Suppressed,
    # MailboxFull, ...); see reply.ses_verdict.
    bounce_type: str = ""
    bounce_sub_type: str = ""


def _load_json(text: str) -> Any:
    # The JSON document may be followed (or preceded) by text, such as the
    # unsubscribe footer SNS appends to e-mail notifications.
    i = text.find("{")
    if i < 0:
        return None
    text = text[i:]
    decoder = json.JSONDecoder()
    for candidate in (text, text.replace("\n", "")):
        try:
            return decoder.raw_decode(candidate)[0]
        except ValueError:
            continue
    return None


def parse_ses_json(text: str) -> list[SESRecord] | None:
    """Records from an Amazon SES notification (raw or wrapped in SNS), or None."""
    if "notificationType" not in text and "eventType" not in text:
        return None
    doc = _load_json(text)
    if isinstance(doc, dict) and isinstance(doc.get("Message"), str):
        doc = _load_json(doc["Message"])
    if not isinstance(doc, dict):
        return None
    kind = str(doc.get("notificationType") or doc.get("eventType") or "").lower()
    mail: dict[str, Any] = doc["mail"] if isinstance(doc.get("mail"), dict) else {}
    msgid = ""
    for h in mail.get("headers") or []:
        if isinstance(h, dict) and str(h.get("name", "")).lower() in ("x-fastsend-id",):
            msgid = str(h.get("value", ""))
    if not msgid:
        common = mail.get("commonHeaders") or {}
        msgid = str(common.get("messageId") or "") if isinstance(common, dict) else ""
    out: list[SESRecord] = []
    if kind == "bounce" and isinstance(doc.get("bounce"), dict):
        b = doc["bounce"]
        mta = str(b.get("reportingMTA") or b.get("remoteMtaIp") or "")
        for r in b.get("bouncedRecipients") or []:
            if isinstance(r, dict) and r.get("emailAddress"):
                out.append(
                    SESRecord(
                        str(r["emailAddress"]),
                        str(r.get("action") or "failed"),
                        str(r.get("status") or ""),
                        str(r.get("diagnosticCode") or b.get("bounceSubType") or ""),
                        "",
                        "bounce",
                        msgid,
                        mta,
                        str(b.get("bounceType") or ""),
                        str(b.get("bounceSubType") or ""),
                    )
                )
    elif kind == "complaint" and isinstance(doc.get("complaint"), dict):
        c = doc["complaint"]
        for r in c.get("complainedRecipients") or []:
            if isinstance(r, dict) and r.get("emailAddress"):
                out.append(
                    SESRecord(
                        str(r["emailAddress"]),
                        "",
                        "",
                        "",
                        str(c.get("complaintFeedbackType") or "abuse"),
                        "complaint",
                        msgid,
                        "",
                    )
                )
    elif kind == "delivery" and isinstance(doc.get("delivery"), dict):
        d = doc["delivery"]
        for r in d.get("recipients") or []:
            out.append(
                SESRecord(
                    str(r),
                    "delivered",
                    "2.0.0",
                    str(d.get("smtpResponse") or ""),
                    "",
                    "delivery",
                    msgid,
                    str(d.get("reportingMTA") or ""),
                )
            )
    return out
