"""Raw MIME written by someone else (the HTTP API's ``raw``, SMTP submission),
made fit to relay: :func:`prepare` (CRLF line ends already made).

- **Caps** (:func:`check_head`): a header section over :data:`MAX_HEADER_OCTETS`
  octets or :data:`MAX_HEADER_FIELDS` fields, a header line over 998
  octets (RFC 5322 2.1.1) or with a NUL, is refused with :class:`RawMimeError` saying which.
  Receivers cut or refuse such headers (Postfix keeps 102,400 octets of
  header and drops the rest), and fastsend parses the header of every
  message it signs.
- **8-bit content and long lines.** A body part written ``8bit``/``binary``
  (octets over 127, or NUL), or with a line over 998 octets, is re-encoded
  *before* it is DKIM-signed, as RFC 6376 5.3 asks of signers: text/* as
  quoted-printable, anything else base64, its Content-Transfer-Encoding
  changed to say so (and a multipart's or message/rfc822's ``8bit`` to
  ``7bit``). The message then travels as 7-bit to every server, with or
  without 8BITMIME (RFC 6152), and no relay on the way converts it under
  the signature. Only what needs it changes; a 7-bit message is untouched.
- What cannot be re-encoded: a message that carries its own DKIM-Signature
  (re-encoding would break it), 8-bit header text (RFC 6532), 8-bit content
  under multipart/signed or multipart/encrypted (RFC 1847: S/MIME, PGP/MIME
  signatures cover the bytes), or a MIME structure whose boundaries do not
  close. Its 8-bit content is sent as
  it is with ``BODY=8BITMIME`` (:func:`prepare` says ``eightbit``); a server
  without 8BITMIME gets none of it (the recipients fail 5.6.3, RFC 6152 3).
  Its lines over 998 octets cannot be sent unbroken at all: refused
  (:class:`RawMimeError`, at intake: a 400 from the API, a 554 from SMTP
  submission).
- **UTF-8 header text** (RFC 6532, :func:`utf8_header`) makes the message an
  internationalized one: it goes with ``SMTPUTF8`` (and BODY=8BITMIME) to a
  server offering SMTPUTF8, and to one that does not it is not sent (the
  recipients fail 5.6.7, RFC 6531 3.2), as for a non-ASCII address. It is
  not rewritten into encoded-words: the bytes are the author's.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

__all__ = [
    "MAX_HEADER_FIELDS",
    "MAX_HEADER_OCTETS",
    "RawMimeError",
    "check_head",
    "check_header_text",
    "prepare",
    "utf8_header",
]

#: The header section's size and field count a raw message may have.
MAX_HEADER_OCTETS = 100_000
MAX_HEADER_FIELDS = 1_000
MAX_LINE = 998  # octets, without the CRLF (RFC 5322 2.1.1)

_EIGHT_BIT = re.compile(rb"[\x80-\xff\x00]")
_CTE_LINE = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:")


class RawMimeError(ValueError):
    """A raw message fastsend will not relay (the text says why; ``enhanced``:
    the RFC 3463 code to refuse it with, 5.3.4 for the caps, 5.6.0 else)."""

    def __init__(self, text: str, enhanced: str = "5.6.0") -> None:
        super().__init__(text)
        self.enhanced = enhanced


def long_line(data: bytes) -> int:
    """Where the first line of ``data`` over MAX_LINE octets begins (line ends: CR,
    LF), or -1. A window of MAX_LINE + 1 octets is looked into from its end for its
    last line end, the next one begins after it: linear, some n / 900 steps (a
    regex ``[^\r\n]{999}`` tried every offset: 11 s of serve's loop on 20 MB of
    base64, a tenant's raw message)."""
    n, p, w = len(data), 0, MAX_LINE + 1
    while p + w <= n:
        e = max(data.rfind(b"\n", p, p + w), data.rfind(b"\r", p, p + w))
        if e < 0:
            return p
        p = e + 1
    return -1


def _line_no(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def check_head(head: bytes) -> None:
    """RawMimeError for a header section (CRLF line ends, without the blank
    line) over the caps, or with a line over 998 octets."""
    if len(head) > MAX_HEADER_OCTETS:
        raise RawMimeError(
            f"the header section is {len(head):,} octets: at most {MAX_HEADER_OCTETS:,}",
            "5.3.4",
        )
    fields = len(re.findall(rb"(?m)^[^ \t\r\n]", head))
    if fields > MAX_HEADER_FIELDS:
        raise RawMimeError(
            f"the header section has {fields:,} fields: at most {MAX_HEADER_FIELDS:,}",
            "5.3.4",
        )
    nul = head.find(b"\x00")
    if nul >= 0:  # (RFC 5322 2.2: no NUL in a header field; receivers refuse it)
        raise RawMimeError(f"header line {_line_no(head, nul)} has a NUL octet")
    at = long_line(head)
    if at >= 0:
        line = _line_no(head, at)
        raise RawMimeError(
            f"header line {line} is over {MAX_LINE} octets (RFC 5322 2.1.1): fold it"
        )


def prepare(data: bytes) -> tuple[bytes, bool]:
    """``(data ready to sign and relay, eightbit)`` for raw MIME ``data`` with
    CRLF line ends (see the module text); ``eightbit``: it still has 8-bit
    octets and needs ``BODY=8BITMIME``. RawMimeError when it cannot be sent
    unbroken."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, body = data, b""
    check_head(head + b"\r\n")
    head8 = not head.isascii()  # UTF-8 header text (RFC 6532): 8-bit whatever the body
    if body.isascii() and b"\x00" not in body and long_line(body) < 0:
        return data, head8
    if not head8 and re.search(rb"(?im)^dkim-signature[ \t]*:", head) is None:
        try:
            new_head, new_body = _entity(head + b"\r\n", body, "text/plain")
        except _Unconvertible:
            pass
        else:
            if not new_body.endswith(b"\r\n"):
                new_body += b"\r\n"
            return _mime_labels(head, new_head, body) + b"\r\n" + new_body, False
    at = long_line(body)
    if at >= 0:
        line = _line_no(data, len(head) + 4 + at)
        why = "it carries its own DKIM-Signature" if not head8 else "its header has 8-bit text"
        raise RawMimeError(
            f"line {line} is over {MAX_LINE} octets (RFC 5322 2.1.1) and fastsend cannot"
            f" re-encode the message ({why}, or its MIME structure does not parse):"
            " encode that part quoted-printable or base64"
        )
    return data, True


# The twelve Unicode Bidi_Control characters: U+202E, RIGHT-TO-LEFT OVERRIDE,
# shows "invoice\u202efdp.exe" as "invoiceexe.pdf" (a program dressed as a
# document, the trick of much malware mail); the others reorder or embed alike.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_KEPT_FORMAT = frozenset("\u200c\u200d")  # ZWNJ, ZWJ: Persian, Indic scripts, emoji need them
# Letters and marks that show as nothing (not Cf, so not caught as format characters):
# the Hangul fillers, the Braille blank, the combining grapheme joiner, Khmer's
# inherent vowels, Mongolian's vowel separator. Alone in a name they only hide.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5\u180e")
# (Read in b"\n" + data: a pattern opening with a line end is searched for fast, one
# opening with ^ is tried at every offset, 0.4-0.8 s on 20 MB of base64.)
_NAME_FIELD = re.compile(rb"(?i)\n(content-(?:type|disposition))[ \t]*:(.*(?:\r?\n[ \t].*)*)")


def name_disguise(name: str) -> str | None:
    """Why a file name would show other than it is, or None: a bidirectional
    control character, another invisible format character (Cf: zero-width
    space, soft hyphen, BOM, tags; ZWNJ and ZWJ kept), a control character
    (C0, DEL, C1), a line or paragraph separator, a lone surrogate. A name in
    a right-to-left script shows right without any of them (the Unicode bidi
    algorithm orders it), so none has a use in a name a recipient reads.
    Besides: a letter that shows as nothing (a Hangul filler, the Braille
    blank); a run of three or more spaces of any kind, which pushes the rest of
    the name out of the column a mail client shows ("invoice.pdf      .exe" reads
    "invoice.pdf..." there: the program's extension hidden, as in much malware
    mail; two, a typo, stay); a space at the end (after the extension: macOS opens
    "notes.txt " by its contents, MITRE ATT&CK T1036.006; Windows drops it)."""
    if name[-1:].isspace():
        return "it ends with a space: after its extension a space hides what opens it"
    run = 0
    for c in name:
        if c in _BLANK_LETTERS:
            return f"U+{ord(c):04X} shows as nothing (a blank letter): it hides what follows it"
        if c == " " or (c.isspace() and unicodedata.category(c) == "Zs"):
            run += 1
            if run == 3:
                return (
                    "a run of spaces pushes the rest of the name out of view, hiding"
                    " its real extension ('invoice.pdf      .exe' shows as 'invoice.pdf');"
                    " single spaces between words are fine"
                )
            continue
        run = 0
        if c.isprintable() or c in _KEPT_FORMAT:
            continue
        if c in _BIDI_CONTROLS:
            return (
                f"U+{ord(c):04X} is a bidirectional control character: it makes the name show"
                " in another order than it is (a program named as a document)"
            )
        cat = unicodedata.category(c)
        if cat in ("Zs", "Co", "Cn"):  # (spaces, private use, unassigned: shown as they are)
            continue
        kind = {"Cf": "an invisible format character", "Cs": "a lone surrogate",
                "Zl": "a line separator", "Zp": "a paragraph separator"}.get(cat, "a control character")  # fmt: skip
        return f"U+{ord(c):04X} is {kind}"
    return None


# A part a mail client opens as a message or as more parts (its names are shown too):
# its Content-Type (folded or not) says so, or its name ends ".eml"; then its encoding.
_CONTAINER = re.compile(rb"(?i)\ncontent-type[ \t]*:\s*(?:message|multipart)/")
_ENCODED = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:\s*(base64|quoted-printable)\b")
MAX_NESTING = 8  # encoded messages inside encoded messages (a forward of a forward ...)
MAX_CONTAINERS = 1000  # message/multipart parts a message holds, all levels, read for this


def _encoded_containers(data: bytes, marks: list[int], budget: list[int]) -> list[bytes]:
    """The decoded bodies of the parts of ``data`` (CRLF line ends) that hold
    a message or parts under a base64 or quoted-printable encoding, which a scan
    of the lines cannot read: a forwarded message attached base64 hides its own
    attachments' names. ``marks``: where such a part's header says so (sorted
    offsets). A part's body ends at its enclosing boundary (the line before its
    header section), else at the end of ``data``. ``budget``: how many more such
    parts may be looked at (RawMimeError past it)."""
    out: list[bytes] = []
    done = 0  # (each header section looked at once; a decoded body's inside is its own)
    for pos in marks:
        if pos < done:
            continue
        head_end = data.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        done = head_end
        budget[0] -= 1
        if budget[0] < 0:
            raise RawMimeError(
                f"more than {MAX_CONTAINERS:,} message or multipart parts in one message"
            )
        blank = data.rfind(b"\r\n\r\n", 0, pos)
        line = data.rfind(b"\r\n--", max(blank, 0), pos)
        if line > blank:  # the boundary line this part's header follows
            eol = data.find(b"\r\n", line + 2)
            delimiter = data[line : eol if eol > 0 else len(data)].rstrip(b" \t")
            start = line + len(delimiter)
        else:
            delimiter, start = b"", (blank + 4 if blank >= 0 else 0)
        enc = _ENCODED.search(data, start, head_end)
        if enc is None:  # (7bit, 8bit, binary: its lines are read as they are)
            continue
        body_start = head_end + 4
        end = data.find(delimiter, body_start) if delimiter else -1
        done = end if end >= 0 else len(data)
        body = data[body_start:done]
        try:
            if enc.group(1).lower() == b"base64":
                decoded = binascii.a2b_base64(re.sub(rb"[^A-Za-z0-9+/=]", b"", body))
            else:
                decoded = binascii.a2b_qp(body)
        except binascii.Error:  # (what a client cannot decode it cannot show either)
            continue
        out.append(crlf_lines(decoded))
    return out


def attachment_names(data: bytes, depth: int = 0, budget: list[int] | None = None) -> list[str]:
    """The file names the MIME parts of raw ``data`` (CRLF line ends) give
    (Content-Disposition filename, Content-Type name; RFC 2231 parameters and
    continuations, RFC 2047 encoded words as mail clients write them, UTF-8 as
    RFC 6532), as a mail client decodes them. Fields found by a scan of every
    line (a part's header anywhere), each parsed only when it names a file; and
    in the parts a client decodes into a message or more parts (a message/rfc822
    or message/global, a multipart, a part named ``*.eml``) sent base64 or
    quoted-printable, at most :data:`MAX_NESTING` deep and :data:`MAX_CONTAINERS`
    in all (more: RawMimeError)."""
    from email.header import decode_header, make_header  # here: only named parts need it
    from email.message import Message

    names: list[str] = []
    text = b"\n" + data  # (offsets in text are those of the line starts in data)
    marks = [m.start() for m in _CONTAINER.finditer(text)]
    for m in _NAME_FIELD.finditer(text):
        if b"name" not in m.group(2).lower():
            continue
        msg = Message()
        value = re.sub(rb"\r?\n", b"", m.group(2))  # unfolded (RFC 5322 2.2.3)
        msg[m.group(1).decode("ascii")] = value.decode("utf-8", "surrogateescape")
        disposition = m.group(1).lower().endswith(b"disposition")  # (get_filename strips spaces)
        got = msg.get_param("filename" if disposition else "name", header=m.group(1).decode())
        if isinstance(got, tuple):  # (an RFC 2231 value get_param leaves undecoded)
            from email.utils import collapse_rfc2231_value

            got = collapse_rfc2231_value(got)
        if not isinstance(got, str) or not got:
            continue
        if "=?" in got:
            try:
                got = str(make_header(decode_header(got)))
            except (ValueError, LookupError, UnicodeError):
                pass
        names.append(got)
        if got.rstrip().lower().endswith(".eml"):  # (opened as a message)
            marks.append(m.start())
    if marks:
        if budget is None:
            budget = [MAX_CONTAINERS]
        for inner in _encoded_containers(data, sorted(marks), budget):
            if depth >= MAX_NESTING:
                raise RawMimeError(
                    f"encoded messages or parts nested more than {MAX_NESTING} deep"
                    " (a forwarded message in a forwarded message ...)"
                )
            names += attachment_names(inner, depth + 1, budget)
    return names


def check_names(data: bytes) -> None:
    """RawMimeError when a part of raw ``data`` names its file with characters
    that make the name show other than it is (:func:`name_disguise`): refused
    as a template's attachment is (``campaign.filename_problem``)."""
    for name in attachment_names(data):
        why = name_disguise(name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        if why is not None:
            raise RawMimeError(f"attachment name {name[:100]!r}: {why}")


def check_header_text(data: bytes) -> None:
    """RawMimeError when the header section of ``data`` (CRLF line ends) has 8-bit
    text that is not UTF-8: RFC 6532 allows UTF-8 alone there, and such a message
    would go out as SMTPUTF8 (:func:`utf8_header`) claiming it (a Latin-1 Subject,
    a mail client's raw 8-bit name). Said with the line and how to write it."""
    head = data.partition(b"\r\n\r\n")[0]
    if head.isascii():
        return
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RawMimeError(
            f"header line {_line_no(head, e.start)} has 8-bit text that is not UTF-8"
            " (RFC 6532): write it as UTF-8 or as RFC 2047 encoded-words"
        ) from None


def utf8_header(data: bytes) -> bool:
    """True when the header section of ``data`` (CRLF line ends) has 8-bit
    text: UTF-8 header fields (RFC 6532), which only go to a server offering
    SMTPUTF8, with the SMTPUTF8 parameter (RFC 6531 3.2, 3.4)."""
    return not data.partition(b"\r\n\r\n")[0].isascii()


def check(data: bytes) -> None:
    """RawMimeError when raw MIME ``data`` (any line ends) cannot be relayed
    unbroken (what :func:`prepare` refuses), whose 8-bit header text is not UTF-8
    (:func:`check_header_text`), or whose attachment names are disguised
    (:func:`check_names`): for the intake."""
    data = crlf_lines(data)
    check_header_text(data)
    prepare(data)
    check_names(data)


_LINE_END = re.compile(rb"\r\n|\r|\n")


def crlf_lines(data: bytes) -> bytes:
    """``data`` with every line end CRLF: a bare LF or a bare CR is a line end
    (RFC 5322 2.3: CR and LF occur only together); unchanged when it already
    is, which is one count of each."""
    n = data.count(b"\r\n")
    if data.count(b"\n") == n and data.count(b"\r") == n:
        return data
    return _LINE_END.sub(b"\r\n", data)


def _mime_labels(old: bytes, head: bytes, body: bytes) -> bytes:
    """A message re-encoded at its top (``head``: its new header lines) that
    had no MIME-Version or Content-Type: both added (without them a reader
    ignores the Content-Transfer-Encoding, RFC 2045 4), the charset UTF-8
    when the 8-bit text is UTF-8, else unknown-8bit (RFC 1428)."""
    if head == old + b"\r\n":
        return head
    names = {
        ln.split(b":", 1)[0].strip().lower()
        for ln in head.split(b"\r\n")
        if ln[:1] not in (b" ", b"\t")
    }
    add = b""
    if b"mime-version" not in names:
        add += b"MIME-Version: 1.0\r\n"
    if b"content-type" not in names:
        try:
            body.decode("utf-8")
            charset = b"utf-8"
        except UnicodeDecodeError:
            charset = b"unknown-8bit"
        add += b'Content-Type: text/plain; charset="' + charset + b'"\r\n'
    return head + add


class _Unconvertible(Exception):
    pass


def _needs(body: bytes) -> bool:
    return not body.isascii() or b"\x00" in body or long_line(body) >= 0


def _set_cte(head: bytes, cte: str) -> bytes:
    """``head`` (its lines, each with CRLF) with its Content-Transfer-Encoding
    field(s) replaced by one saying ``cte``."""
    lines = head.split(b"\r\n")[:-1]
    out: list[bytes] = []
    skip = False
    for ln in lines:
        if ln[:1] in (b" ", b"\t") and skip:
            continue
        skip = _CTE_LINE.match(ln) is not None
        if not skip:
            out.append(ln)
    out.append(b"Content-Transfer-Encoding: " + cte.encode("ascii"))
    return b"".join(ln + b"\r\n" for ln in out)


def _entity(head: bytes, body: bytes, default: str) -> tuple[bytes, bytes]:
    """One MIME entity's header (lines with CRLF) and body, its content
    re-encoded to 7 bit where it needs it; _Unconvertible when it cannot."""
    if not _needs(body):
        return head, body
    if not head.isascii():
        raise _Unconvertible
    from email.parser import BytesHeaderParser  # here: only 8-bit or long-lined mail needs it
    from email.policy import compat32

    msg = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n")
    ctype = msg.get_content_type() if msg.get("content-type") is not None else default
    cte = str(msg.get("content-transfer-encoding", "7bit")).strip().lower()
    main = ctype.partition("/")[0]
    if main == "multipart":
        boundary = msg.get_boundary()
        if not boundary or cte not in ("7bit", "8bit", "binary"):
            raise _Unconvertible
        if ctype in ("multipart/signed", "multipart/encrypted"):
            raise _Unconvertible  # re-encoding a signed part breaks its signature (RFC 1847)
        sub = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        new = _multipart(body, boundary.encode("latin-1"), sub)
        return (_set_cte(head, "7bit") if cte != "7bit" else head), new
    if ctype == "message/rfc822":
        if cte not in ("7bit", "8bit", "binary"):
            raise _Unconvertible
        ihead, sep, ibody = body.partition(b"\r\n\r\n")
        if not sep:
            raise _Unconvertible
        check_head(ihead + b"\r\n")
        nh, nb = _entity(ihead + b"\r\n", ibody, "text/plain")
        return (_set_cte(head, "7bit") if cte != "7bit" else head), nh + b"\r\n" + nb
    if cte == "base64":
        if not body.isascii():
            raise _Unconvertible
        try:
            raw = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body), validate=False)
        except (binascii.Error, ValueError):
            raise _Unconvertible from None
        return head, _b64(raw)
    if cte == "quoted-printable":  # (not as it says: 8-bit octets or long lines)
        raw = binascii.a2b_qp(body)
        if main == "text":
            return head, _qp(raw)
        return _set_cte(head, "base64"), _b64(raw)
    if main == "text":
        return _set_cte(head, "quoted-printable"), _qp(body)
    return _set_cte(head, "base64"), _b64(body)


def _qp(text: bytes) -> bytes:
    """Quoted-printable of ``text`` (CRLF line ends: hard breaks), its soft
    breaks CRLF too (binascii takes the line end of the first line it sees,
    so one is put at the end and taken off again)."""
    return binascii.b2a_qp(text + b"\r\n", istext=True)[:-2]


def _b64(raw: bytes) -> bytes:
    """Base64 in lines of 76 (no line end after the last: in a multipart the
    CRLF before the next delimiter is the delimiter's, RFC 2046 5.1.1)."""
    enc = base64.b64encode(raw)
    return b"\r\n".join(enc[i : i + 76] for i in range(0, len(enc), 76))


def _multipart(body: bytes, boundary: bytes, default: str) -> bytes:
    """A multipart body with each part re-encoded (_entity); its delimiter
    lines kept as they are; a preamble or epilogue (text readers ignore, RFC
    2046 5.1.1) that needs re-encoding is dropped."""
    delim = b"--" + boundary
    lines = body.split(b"\r\n")
    cuts: list[int] = []  # indexes of the delimiter lines
    close = -1
    for i, ln in enumerate(lines):
        if ln.startswith(delim):
            rest = ln[len(delim) :]
            if rest.startswith(b"--") and not rest[2:].strip(b" \t"):
                close = i
                break
            if not rest.strip(b" \t"):
                cuts.append(i)
    if not cuts or close < 0:
        raise _Unconvertible  # no parts, or never closed: not what it says
    out: list[bytes] = []
    pre = b"\r\n".join(lines[: cuts[0]])
    if not _needs(pre):
        out.extend(lines[: cuts[0]])
    bounds = [*cuts, close]
    for k, start in enumerate(bounds[:-1]):
        out.append(lines[start])
        part = b"\r\n".join(lines[start + 1 : bounds[k + 1]])
        if part.startswith(b"\r\n") or not part:
            phead, pbody = b"", part[2:]
        else:
            h, sep, pbody = part.partition(b"\r\n\r\n")
            if not sep:
                h, pbody = part, b""
            phead = h + b"\r\n"
            check_head(phead)
        nh, nb = _entity(phead, pbody, default)
        out.append(nh + b"\r\n" + nb if (nh or nb) else b"")
    out.append(lines[close])
    epi = lines[close + 1 :]
    if not _needs(b"\r\n".join(epi)):
        out.extend(epi)
    return b"\r\n".join(out)
