"""MIME serialization of a compiled campaign: one recipient in, message bytes out.

:class:`Renderer` is built once per process by ``Campaign.compile()``. At
compile time every header without placeholders is encoded and folded once,
the body templates are split, attachments are base64-encoded and boundaries
chosen. Per recipient, :meth:`Renderer.render` only splices values, encodes
the templated headers, encodes each text part for its transfer encoding
(:func:`qp_encode_text`, compiled in ``_mime.pxi``), adds Date and Message-ID,
and signs (DKIM) if configured.

Output: CRLF line ends, every line under 998 octets, MIME-Version 1.0,
multipart/alternative for text + HTML, multipart/mixed around attachments.
Boundaries start with ``=_`` which can never occur in quoted-printable or
base64 output, so no body scan is needed.

With a ``[tracking]`` table (see :mod:`fastsend.message.tracking`) the HTML
template is rewritten once here (links -> placeholders, open pixel added) and
per recipient only the signed tracking URLs are spliced in; the
List-Unsubscribe URL then points at fastsend's signed unsubscribe endpoint.

It deliberately does not do inline images (multipart/related) or S/MIME.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from fastsend import msgid, wire
from fastsend._accel import pick
from fastsend.message import tracking, verp
from fastsend.message.errors import MessageTooBig, RenderError
from fastsend.message.headers import (
    HeaderError,
    check_header_value,
    encode_domain,
    fold_tokens,
    mailbox_header,
    parse_mailbox,
    split_address,
    unstructured_header,
)
from fastsend.message.rawmime import MAX_HEADER_OCTETS
from fastsend.message.template import (
    ESC_CSSURL,
    ESC_JS,
    ESC_UNQUOTED,
    ESC_URL,
    ESC_URLPART,
    ESC_URLPATH,
    Template,
    UnsafeValue,
    html_escapes,
    html_value,
    splice,
)
from fastsend.message.template import PURE as _TEMPLATE_PURE
from fastsend.outcome import Envelope

if TYPE_CHECKING:
    from fastsend.message.dkim import MessageSigner, Signer

__all__ = [
    "Renderer",
    "base64_body",
    "qp_encode_text",
    "qp_template",
    "text_header",
    "uri_header",
]

CRLF = b"\r\n"
_QP_SAFE_LINE = re.compile(rb"[!-<>-~ \t]{0,75}")
_QP_TOKENS = [bytes([b]) if (33 <= b <= 126 and b != 61) else b"=%02X" % b for b in range(256)]
_NEWLINES = re.compile(r"\r\n?")
_NEWLINES_B = re.compile(rb"\r\n|\r|\n")
_ID_SAFE = re.compile(r"[A-Za-z0-9_\-]{1,200}")
_URL_SAFE = re.compile(r"[A-Za-z0-9_.\-~@]*")
_splice_py = _TEMPLATE_PURE["splice"]

# The most octets one character of a recipient's value becomes in a header
# (RFC 2047 encoded: 12 and the encoded-word's frame, folded); in a body part
# it depends on where the value stands (_growth), in a tracked link's token 16
# (percent-encoded, then base64) and the part's soft line breaks.
GROWTH = 16
ASCII_GROWTH = 4  # an ASCII character's most in a header (quoted-printable "=XX", framed)
TRACKED_GROWTH = 18
SYSTEM_VALUE = 8192  # octets a value fastsend makes can take (email, signed links)
SLACK = 16384  # To, Date, Message-ID, MIME-Version, folding
SIGNATURE = 4096  # a DKIM-Signature line (a 4096-bit key's signature folded)
# What a header section holds beyond the campaign's header fields, measured per
# row (Renderer.header_too_big): To (a 254-octet address), Date, Message-ID,
# MIME-Version; DKIM-Signature lines are SIGNATURE each.
SYSTEM_LINES = 1024
# Stand-ins for the values fastsend fills in a header (Renderer.header_too_big):
# the longest an address, a Message-ID token or a signed link ordinarily is.
_SYSTEM_STANDIN = {"email": "r" * 64 + "@" + "d" * 63 + "." + "d" * 63 + "." + "d" * 52 + ".example",
                   "message_id": "m" * 64, "unsubscribe_url": "https://t.example/u/" + "u" * 200}  # fmt: skip


def _growth(mode: int, encoding: str) -> int:
    """The most octets one character of a value becomes in a body part where
    it stands with escape ``mode`` (``template.html_escapes``'s; 0: a text part
    or a raw value), the part encoded: HTML-escaped (``&quot;``: 6), a 4-octet
    UTF-8 character quoted-printable, \\u-escaped (``\\ud83d\\ude00``) or
    percent-encoded: 12; in an unquoted attribute each ``%`` or ``\\`` of those
    is escaped again (``&#x25;F0``: 32 a character, ``&#x5C;ud83d``: 22). Then
    the soft line breaks of quoted-printable (3 octets in 76), or base64's 4/3
    and a CRLF every 76. (A flat 16 had let an unquoted ``href=...?q={{ v }}``
    row of emoji make a message 1.7x the limit unmeasured.)"""
    if mode & ESC_UNQUOTED and mode & (ESC_URLPART | ESC_URLPATH | ESC_CSSURL):
        pre = 32
    elif mode & ESC_UNQUOTED and mode & ESC_JS:
        pre = 22
    else:
        pre = 12
    if encoding == "base64":
        return (pre * 11 + 7) // 8
    return (pre * 19 + 17) // 18


# The octets quoted-printable writes as they are (the rest: =HH, 3 octets).
_QP_LITERAL = bytes(b for b in range(33, 127) if b != 61) + b" \t\r\n"


@functools.lru_cache(maxsize=16384)
def _char_octets(ch: str, mode: int, encoding: str) -> int:
    """The fewest octets one character of a value becomes (see :func:`least_octets`),
    times 3 in a base64 part (its octets before base64: exact in thirds)."""
    e = ch
    if mode:
        try:  # (between two letters every escape leaves as they are: no edge of a value)
            e = html_value("a" + ch + "a", mode & ~ESC_URL)[1:-1]
        except UnsafeValue:
            pass  # (the render refuses the value: counted as written)
        if ch == "%" and mode & ESC_CSSURL:
            e = ch  # (a %HH kept as it is)
    b = e.encode("utf-8", "surrogatepass")
    if encoding == "base64":
        return 3 * len(b)
    return len(b) + 2 * len(b.translate(None, _QP_LITERAL))


def least_octets(value: str, mode: int, encoding: str) -> int:
    """The fewest octets ``value`` becomes in a body part where it stands with
    escape ``mode`` (as :func:`_growth`), the part ``encoding``: each
    character escaped as the renderer escapes it (``template.html_value``:
    every escape is a character's, or an octet's, but for a URL path's
    leading ``/`` and a CSS URL's kept ``%HH``, counted at their least) and
    counted as its transfer encoding writes it, soft line breaks and CRLFs
    left out; one call per distinct character, so a value that escapes to
    many times its size is never made escaped."""
    if not mode:
        b = value.encode("utf-8", "surrogatepass")
        if encoding == "base64":
            return len(b) * 4 // 3
        return len(b) + 2 * len(b.translate(None, _QP_LITERAL))
    total = 0
    for ch, k in Counter(value).items():
        total += k * _char_octets(ch, mode, encoding)
    return total * 4 // 9 if encoding == "base64" else total


def _system_name(name: str) -> bool:
    """A variable fastsend fills, not the recipient's row (bounded in size)."""
    return name in ("email", "message_id", "unsubscribe_url") or name.startswith("_fs.")


def qp_encode_text(text: str) -> bytes:
    """Quoted-printable (RFC 2045) UTF-8 encoding of ``text``, CRLF line ends.

    Any of CRLF, CR, LF in ``text`` is a hard line break. Printable ASCII except
    ``=`` stays literal; space and tab stay literal except before a line end;
    everything else is ``=HH``. Soft breaks (``=`` CRLF) keep lines <= 76 (a break when a token would pass column 75).
    """
    lines = _NEWLINES.sub("\n", text).encode("utf-8").split(b"\n")
    out: list[bytes] = []
    for line in lines:
        if _QP_SAFE_LINE.fullmatch(line) is not None and not line.endswith((b" ", b"\t")):
            out.append(line)
            continue
        toks = [_QP_TOKENS[b] if b not in (9, 32) else bytes([b]) for b in line]
        if toks and toks[-1] in (b" ", b"\t"):
            toks[-1] = b"=%02X" % toks[-1][0]
        buf: list[bytes] = []
        col = 0
        for t in toks:
            if col + len(t) > 75:
                buf.append(b"=\r\n")
                col = 0
            buf.append(t)
            col += len(t)
        out.append(b"".join(buf))
    return b"\r\n".join(out)


def qp_template(
    literals: tuple[str, ...],
    names: tuple[str, ...],
    defaults: tuple[str | None, ...],
    variables: Mapping[str, str],
    escapes: tuple[int, ...] | None = None,
) -> bytes:
    """Quoted-printable of a template spliced with ``variables`` (b"" when empty).

    Same arguments and errors as :func:`fastsend.message.template.splice`
    (and UnsafeValue); ``escapes``: each value HTML-escaped by
    :func:`~fastsend.message.template.html_value` with its mode (an HTML
    part's). The compiled twin encodes the pieces without building the
    spliced str.
    """
    text = _splice_py(literals, names, defaults, variables, escapes)
    return _qp_encode_text_py(text) if text else b""


def text_header(name: str, value: str) -> bytes:
    """An unstructured header line (Subject, X-*, ...): folded, encoded-words as needed."""
    return unstructured_header(name, value).encode("utf-8")


UriTemplate = tuple[tuple[str, ...], tuple[str, ...], tuple[str | None, ...]]


def uri_header(name: str, uris: tuple[UriTemplate, ...], variables: Mapping[str, str]) -> bytes:
    """A ``<URI>, <URI>`` header line (List-Unsubscribe), folded, CRLF-terminated.

    Each URI is a template given as ``(literals, names, defaults)`` (see
    :func:`fastsend.message.template.splice`); its values are percent-encoded
    into it. HeaderError when a URI holds CR, LF, NUL, a space, ``<`` or ``>``.
    """
    toks = []
    for literals, names, defaults in uris:
        parts = [literals[0]]
        for i, var in enumerate(names):
            parts.append(_url_quote(_value(variables, var, defaults[i])))
            parts.append(literals[i + 1])
        uri = "".join(parts)
        check_header_value(uri, name)
        if " " in uri or "<" in uri or ">" in uri:
            raise HeaderError(f"{name}: bad URI {uri!r}")
        toks.append(f"<{uri}>,")
    toks[-1] = toks[-1][:-1]
    return fold_tokens(name, toks).encode("utf-8")


# What a URI never holds raw (RFC 3986 2, RFC 6068 2): non-ASCII, space, control
# characters, the "<" ">" that delimit it in the header. NUL is the placeholder mark.
_URI_UNSAFE = re.compile(r"[^\x00!-;=?-~]+")


def _pct_non_ascii(text: str) -> str:
    return _URI_UNSAFE.sub(lambda m: quote(m.group(0), safe=""), text)


def ascii_uri_literals(literals: tuple[str, ...]) -> tuple[str, ...]:
    """A URI template's literal text (``literals``, placeholders between them)
    in ASCII, as a header must carry it in a message that does not ask for
    SMTPUTF8 (List-Unsubscribe): an internationalised host (``https://`` URL) or
    mailto domain in A-labels, like every other domain of the message, and any
    other non-ASCII character, a space (``?subject=Unsubscribe me``), a control
    character, ``<`` or ``>`` percent-encoded in UTF-8 (RFC 3987 3.1, RFC 6068
    2): such a URI failed every message at render ("bad URI", retried as a
    local error). Values are percent-encoded where they are spliced. HeaderError when a
    non-ASCII host or domain also holds a placeholder (it cannot be converted
    label by label before the value is known: write it in A-labels)."""
    if not any(_URI_UNSAFE.search(x) for x in literals):
        return literals
    if any("\0" in x for x in literals):
        raise HeaderError("a URI holds a NUL")
    joined = "\0".join(literals)  # NUL: where a value goes
    scheme, colon, rest = joined.partition(":")
    if not colon:
        return tuple(_pct_non_ascii(joined).split("\0"))

    def host(h: str) -> str:
        if h.isascii():
            if _URI_UNSAFE.search(h):
                raise HeaderError(f"{h.replace(chr(0), '{{ }}')!r} is not a host name")
            return h
        if "\0" in h:
            raise HeaderError(
                f"{h.replace(chr(0), '{{ }}')!r}: a non-ASCII domain in a URI cannot hold a"
                " placeholder; write it in A-labels (xn--...)"
            )
        return encode_domain(h)

    if scheme.lower() == "mailto":
        addr, q, query = rest.partition("?")
        local, at, domain = addr.rpartition("@")
        if at:
            addr = _pct_non_ascii(local) + "@" + host(domain)
        out = f"{scheme}:{_pct_non_ascii(addr)}{q}{_pct_non_ascii(query)}"
    elif rest.startswith("//"):
        m = re.match(r"//([^/?#]*)", rest)
        assert m is not None
        userinfo, at, hostport = m.group(1).rpartition("@")
        name, colon2, port = hostport, "", ""
        if not hostport.startswith("[") and ":" in hostport:
            name, colon2, port = hostport.rpartition(":")
        authority = _pct_non_ascii(userinfo) + at + host(name) + colon2 + port
        out = f"{scheme}://{authority}{_pct_non_ascii(rest[m.end():])}"
    else:
        out = _pct_non_ascii(joined)
    return tuple(out.split("\0"))


def _value(variables: Mapping[str, str], name: str, default: str | None) -> str:
    """The value of one placeholder, as splice() chooses it (KeyError if missing)."""
    v = variables.get(name)
    if v is None or (v == "" and default is not None):
        if default is None:
            raise KeyError(name)
        v = default
    return v


def _url_quote(value: str) -> str:
    if _URL_SAFE.fullmatch(value) is not None:  # what quote() would return unchanged
        return value
    return quote(value, safe="@")


_qp_encode_text_py = qp_encode_text

#: A header of a message layout: its bytes (static), ``(name, literals, names,
#: defaults)`` (unstructured text from a template: :func:`text_header`),
#: ``(name, uris)`` (a URI list: :func:`uri_header`), or a callable
#: ``variables -> bytes`` (mailboxes).
Entry = (
    bytes
    | tuple[str, tuple[str, ...], tuple[str, ...], tuple[str | None, ...]]
    | tuple[str, tuple[UriTemplate, ...]]
    | Callable[[Mapping[str, str]], bytes]
)
#: A piece of a message body: bytes (static), ``(literals, names, defaults)``
#: (quoted-printable text from a template: :func:`qp_template`), the same with
#: each placeholder's HTML escaping (``escapes``: an HTML part's,
#: template.html_escapes), or a callable.
Segment = (
    bytes
    | UriTemplate
    | tuple[tuple[str, ...], tuple[str, ...], tuple[str | None, ...], tuple[int, ...]]
    | Callable[[Mapping[str, str]], bytes]
)


def _entry(e: Entry, variables: Mapping[str, str]) -> bytes:
    if isinstance(e, bytes):
        return e
    if isinstance(e, tuple):
        if len(e) == 2:
            return _uri_header_py(e[0], e[1], variables)
        name, literals, names, defaults = e
        return _text_header_py(name, _splice_py(literals, names, defaults, variables))
    return e(variables)


class Assembly:
    """The fixed layout of a campaign's messages, filled per recipient.

    Made once by :class:`Renderer`: ``head`` (From, Reply-To, a custom To,
    Subject) and ``tail`` (List-Unsubscribe, Feedback-ID, custom headers) are
    :data:`Entry` values, ``content`` the content header lines, ``body`` the
    body's :data:`Segment` values (``end_crlf``: a single part whose text does
    not end a line gets a CRLF). The lines made per recipient (To, Date,
    Message-ID) are passed in. ``signer`` (a
    :class:`~fastsend.message.dkim.MessageSigner`, or None) signs the messages
    :meth:`signed` makes, and those of :meth:`deferred`. The compiled twin
    (``_mime.pxi``) writes the same bytes without a Python call per piece,
    and a message, signed or not, when it can, with no Python object but the
    message (``_fast_make``: the values read where they lie in the
    recipient's JSON or a dict's strs, a signed one's header lines hashed
    where they lie; anything else made as here).
    """

    def __init__(
        self,
        head: tuple[Entry, ...],
        tail: tuple[Entry, ...],
        content: tuple[bytes, ...],
        body: tuple[Segment, ...],
        end_crlf: bool,
        to_custom: bool = False,
        from_domain: str = "",
        signer: MessageSigner | None = None,
        guard: int = sys.maxsize,
    ) -> None:
        self.head, self.tail, self.content = head, tail, content
        self.segments, self.end_crlf = body, end_crlf
        self.to_custom, self.from_domain = to_custom, from_domain
        self.signer = signer
        # A recipient's variables (their JSON) longer than this might make a
        # message over the size limit: a DeferredMessage leaves such a one to
        # its fallback (Renderer.render, which measures it) (Renderer.guard).
        self.guard = guard

    def personal(
        self, variables: Mapping[str, str], rcpt: str, message_id: str, date: bytes, sign: bool
    ) -> bytes | tuple[list[bytes], bytes]:
        """One recipient's message, nothing added per recipient but the
        variables ``email`` and ``message_id``, To (unless ``to_custom``) and
        Message-ID (``message_id`` at ``from_domain``, VERP-encoded unless
        :func:`message_id_safe`). The message, or with ``sign`` its (header
        lines, body) to sign."""
        vs = {**variables, "email": rcpt, "message_id": message_id}
        local, domain = split_address(rcpt)
        to = b"" if self.to_custom else f"To: {local}@{domain}\r\n".encode()
        safe = _message_id_safe_py(message_id)
        mid = message_id if safe else verp.encode_id(message_id)
        mid_line = f"Message-ID: <{mid}@{self.from_domain}>\r\n".encode()
        if sign:
            return self.headers(vs, to, date, mid_line), self.body(vs)
        return self.message(vs, to, date, mid_line)

    def signed(
        self, variables: Mapping[str, str], rcpt: str, message_id: str, date: bytes
    ) -> bytes:
        """The message :meth:`personal` makes, signed by :attr:`signer` (its
        ``DKIM-Signature`` line first). The compiled twin writes it in one
        buffer, the body hashed where it lies and the signature written into
        room kept for it before the header lines."""
        if self.signer is None:
            raise TypeError("this Assembly has no signer")
        got = self.personal(variables, rcpt, message_id, date, True)
        assert not isinstance(got, bytes)
        return self.signer.message(*got)

    def deferred(self, *args: Any) -> DeferredMessage:
        """``deferred(variables, rcpt, message_id, date, fallback)``: the message
        ``personal(variables, rcpt, message_id, date, False)`` makes (or with a
        :attr:`signer`, :meth:`signed`), to be made later, when it is about to
        be sent (a :class:`DeferredMessage`)."""
        return DeferredMessage(self, *args)

    def envelopes(
        self,
        items: Sequence[wire.Item],
        blobs: Mapping[str, bytes],
        secret: bytes,
        date: bytes,
        fallback: Callable[[str, Mapping[str, str], str], object],
        sender: str | Callable[[str], str],
        sender_utf8: bool,
        needs_smtputf8: Callable[[str], bool],
        now: bool = False,
    ) -> list[Envelope]:
        """``Worker.build_each``'s deferred loop: per ``wire.Item``, an
        :class:`~fastsend.outcome.Envelope` from ``sender`` (a str: every
        message's; else ``sender(token)``, each message's own, VERP) to its
        ``rcpt``, tagged with its ``id``, whose data is
        ``deferred(vars, rcpt, msgid.token(id, secret), date, fallback)`` (the
        vars of ``blobs`` when the item's refer to one, ``wire.blob_digest``);
        SMTPUTF8 when ``sender_utf8``, or for a non-ASCII recipient when
        ``needs_smtputf8(rcpt)``. With ``now``, each message is made here too
        (:meth:`DeferredMessage.make_now`: an rsa-sha256 signature made as
        the batch is built, not in the client's reply path). The compiled
        twin makes them without a Python call per message (but the
        Envelope's)."""
        token = msgid.token
        out: list[Envelope] = []
        one = type(sender) is str
        for it in items:
            rcpt = it.rcpt
            mid = token(it.id, secret)
            vs = it.vars
            if blobs and (d := wire.blob_digest(vs)):
                vs = blobs[d]
            data = DeferredMessage(self, vs, rcpt, mid, date, fallback)  # type: ignore[arg-type]
            if now:
                data.make_now()
            mail_from = sender if one else sender(mid)  # type: ignore[operator]
            utf8 = sender_utf8 or (not rcpt.isascii() and needs_smtputf8(rcpt))
            out.append(Envelope(mail_from, [rcpt], data, it.id, utf8))  # type: ignore[arg-type]
        return out

    def headers(
        self, variables: Mapping[str, str], to: bytes, date: bytes, message_id: bytes
    ) -> list[bytes]:
        """The header lines, in order (``to`` may be b"": a custom To is in the head)."""
        lines = [_entry(e, variables) for e in self.head]
        if to:
            lines.append(to)
        lines += [date, message_id, b"MIME-Version: 1.0\r\n"]
        lines += [_entry(e, variables) for e in self.tail]
        lines += self.content
        return lines

    def body(self, variables: Mapping[str, str]) -> bytes:
        chunks = []
        for seg in self.segments:
            if isinstance(seg, bytes):
                chunks.append(seg)
            elif isinstance(seg, tuple):
                chunks.append(
                    _qp_template_py(*seg[:3], variables, seg[3] if len(seg) == 4 else None)
                )
            else:
                chunks.append(seg(variables))
        body = b"".join(chunks)
        if self.end_crlf and body and not body.endswith(CRLF):
            body += CRLF
        return body

    def message(
        self, variables: Mapping[str, str], to: bytes, date: bytes, message_id: bytes
    ) -> bytes:
        """The whole message: headers, the empty line, the body."""
        lines = self.headers(variables, to, date, message_id)
        lines.append(CRLF)
        lines.append(self.body(variables))
        return b"".join(lines)


class DeferredMessage:
    """A recipient's message made when it is called: the SMTP client calls it
    as the message's transaction starts (``Envelope.data`` may be one), so its
    bytes are written just before they are sent, still in cache, not
    thousands of messages earlier. ``Assembly.personal``'s message (signed,
    ``Assembly.signed``, when the assembly has a signer: the signature made
    as the message is sent), or when that raises, what
    ``fallback(rcpt, variables, message_id)`` returns (the
    message made the slow way, or an Outcome saying why there is none).
    ``variables`` may be their JSON (bytes), decoded when it is made: a
    waiting message holds one bytes object, not a dict of strings.
    The compiled twin (``_mime.pxi``) is what the compiled Assembly makes."""

    __slots__ = ("assembly", "date", "fallback", "message_id", "premade", "rcpt", "variables")

    def __init__(
        self,
        assembly: Assembly,
        variables: Mapping[str, str],
        rcpt: str,
        message_id: str,
        date: bytes,
        fallback: Callable[[str, Mapping[str, str], str], object],
    ) -> None:
        self.assembly, self.variables, self.rcpt = assembly, variables, rcpt
        self.message_id, self.date, self.fallback = message_id, date, fallback
        self.premade: bytes | None = None

    @property
    def made(self) -> bool:
        """True when the message was made ahead (:meth:`make_now`) and not yet
        handed over."""
        return self.premade is not None

    def make_now(self) -> None:
        """Make the message now, to be handed over at the first call (an
        rsa-sha256 signature made as the batch is built, back to back; the
        compiled twin keeps the SMTP client's room past its end). One that
        cannot be made now (an Outcome, an error) is made, and its failure
        told, when it is sent, as any DeferredMessage."""
        try:
            made = self()
        except Exception:
            return
        if type(made) is bytes:
            self.premade = made

    def __call__(self) -> object:
        made = self.premade
        if made is not None:
            self.premade = None  # (handed over: the client owns it)
            return made
        vs = self.variables
        a = self.assembly
        if (len(vs) if type(vs) is bytes else _values_size(vs)) > a.guard:
            # Maybe over the size limit: made (or refused, MessageTooBig) by
            # the fallback, Renderer.render, which measures it first.
            return self.fallback(self.rcpt, self.variables, self.message_id)
        try:
            if type(vs) is bytes:  # the recipient's JSON, decoded now (in cache)
                vs = orjson.loads(vs) if vs else {}
            if a.signer is not None:
                return a.signed(vs, self.rcpt, self.message_id, self.date)
            return a.personal(vs, self.rcpt, self.message_id, self.date, False)
        except Exception:
            return self.fallback(self.rcpt, self.variables, self.message_id)


def _values_size(variables: Mapping[str, str]) -> int:
    """The characters of a recipient's values (what :attr:`Renderer.guard`
    bounds); a value that is no string counts as no bound (rendering says why)."""
    try:
        return sum(map(len, variables.values()))
    except TypeError:
        return sys.maxsize


def message_id_safe(message_id: str) -> bool:
    """True when ``message_id`` goes into Message-ID as it is (1-200 of A-Z a-z 0-9 _ -)."""
    return _ID_SAFE.fullmatch(message_id) is not None


_text_header_py = text_header
_qp_template_py = qp_template
_uri_header_py = uri_header
_message_id_safe_py = message_id_safe

# The readable twins, by name (tests run both; the compiled ones are picked).
PURE = {
    "qp_encode_text": qp_encode_text,
    "qp_template": qp_template,
    "text_header": text_header,
    "uri_header": uri_header,
    "Assembly": Assembly,
    "message_id_safe": message_id_safe,
}
qp_encode_text = pick(qp_encode_text)
qp_template = pick(qp_template)
text_header = pick(text_header)
uri_header = pick(uri_header)
PyAssembly = Assembly
if not TYPE_CHECKING:
    Assembly = pick(PyAssembly)
message_id_safe = pick(message_id_safe)


def base64_body(data: bytes) -> bytes:
    """Base64 in 76-character lines, CRLF-terminated."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


_FNAME_PLAIN = re.compile(r'[ !#-\[\]-~]*')  # printable ASCII but " and \\


def disposition(filename: str, kind: str = "attachment") -> str:
    """The ``Content-Disposition`` line of an attachment named ``filename``
    (CRLF-terminated, no line past 78 characters): ``filename="..."`` when it
    is short printable ASCII, else RFC 2231: UTF-8 percent-encoded, in
    continuations (``filename*0*=utf-8''...; filename*1*=...``) when long (a
    long name on one line would pass the 998-octet line limit). A name holding
    ``=?`` is encoded too: mail clients decode an encoded word in a quoted
    filename (RFC 2047 says not to), so ``=?utf-8?q?invoice?=.pdf`` showed as
    ``invoice.pdf``, as the Subject's lookalikes are encoded. ``kind``:
    ``inline`` for an inline image (shown where the HTML names its cid)."""
    line = f'Content-Disposition: {kind}; filename="{filename}"'
    plain = "=?" not in filename and _FNAME_PLAIN.fullmatch(filename) is not None
    if len(line) <= 78 and plain:
        return line + "\r\n"
    enc = quote(filename, safe="")
    if len(enc) <= 40:
        return f"Content-Disposition: {kind};\r\n filename*=utf-8''{enc}\r\n"
    parts: list[str] = []
    i = 0
    while i < len(enc):  # pieces of <= 45 characters, never splitting a %XX
        j = min(i + 45, len(enc))
        k = enc.rfind("%", j - 2, j)
        if k >= 0 and k + 3 > j:
            j = k
        parts.append(enc[i:j])
        i = j
    lines = [f" filename*{i}*={'utf-8' + chr(39) * 2 if i == 0 else ''}{p}" for i, p in enumerate(parts)]
    return f"Content-Disposition: {kind};\r\n" + ";\r\n".join(lines) + "\r\n"


# Content types whose body is never base64 or quoted-printable (RFC 2045 6.4,
# RFC 2046 5.2.1-5.2.3).
_UNENCODED = re.compile(r"(?i)(?:multipart/|message/(?:rfc822|partial|external-body)\b)")


def _seven_bit(data: bytes, boundary: bytes) -> bytes | None:
    """``data`` with CRLF line ends (and a last one) when it is 7-bit text fit to
    send as it is (no NUL, lines of at most 998 octets, no line starting with
    the enclosing ``boundary``), else None."""
    if not data.isascii() or b"\0" in data:
        return None
    text = _NEWLINES_B.sub(b"\r\n", data)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    if any(len(ln) > 998 or ln.startswith(b"--" + boundary) for ln in text.split(b"\r\n")):
        return None
    return text


def _normalize_text(text: str) -> str:
    text = _NEWLINES.sub("\n", text)
    return text if text.endswith("\n") else text + "\n"


class _Header:
    """One top-level header: static bytes, or a template encoded per recipient."""

    __slots__ = ("kind", "lname", "name", "static", "templates", "uris")

    def __init__(self, name: str, kind: str, templates: Sequence[Template]) -> None:
        self.name = name
        self.lname = name.lower()
        self.kind = kind  # "text" | "mailbox" | "uris"
        self.templates = tuple(templates)
        self.uris = tuple(
            (ascii_uri_literals(t.literals), t._names, t._defaults) for t in self.templates
        ) if kind == "uris" else ()  # fmt: skip
        self.static: bytes | None = None
        if all(t.is_static for t in self.templates):
            self.static = self.encode({})

    def entry(self) -> Entry:
        """This header as an :class:`Assembly` entry."""
        if self.static is not None:
            return self.static
        if self.kind == "text":
            t = self.templates[0]
            return (self.name, t.literals, t._names, t._defaults)
        if self.kind == "uris":
            return (self.name, self.uris)
        return self.encode

    def encode(self, variables: Mapping[str, str]) -> bytes:
        if self.static is not None:
            return self.static
        if self.kind == "text":
            t = self.templates[0]
            return text_header(self.name, splice(t.literals, t._names, t._defaults, variables))
        if self.kind == "mailbox":
            display, addr = parse_mailbox(self.templates[0].render(variables))
            line = mailbox_header(self.name, display, addr)
        else:  # "uris": List-Unsubscribe; values percent-encoded into the URL
            return uri_header(self.name, self.uris, variables)
        return line.encode("utf-8")


class _TextPart:
    """A text/plain or text/html part. An HTML part's values are escaped for
    where each placeholder stands (``escapes``: template.html_escapes; None
    when none needs it), a text part's never."""

    __slots__ = (
        "defaults", "encoding", "escapes", "headers", "literals", "names", "subtype", "template",
    )  # fmt: skip

    def __init__(self, subtype: str, source: str, encoding: str) -> None:
        self.subtype = subtype
        self.template = t = Template(_normalize_text(source))
        self.literals, self.names, self.defaults = t.literals, t._names, t._defaults
        esc = html_escapes(t) if subtype == "html" else ()
        self.escapes: tuple[int, ...] | None = esc if any(esc) else None
        self.encoding = encoding
        self.headers = (
            f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {encoding}\r\n"
        ).encode("ascii")

    def segment(self) -> Segment:
        """This part's text as an :class:`Assembly` segment."""
        if self.encoding == "base64":
            return self.body
        if self.escapes is not None:
            return (self.literals, self.names, self.defaults, self.escapes)
        return (self.literals, self.names, self.defaults)

    def body(self, variables: Mapping[str, str]) -> bytes:
        if self.encoding == "base64":
            text = self.template.render(variables, self.escapes)
            return base64_body(text.encode("utf-8"))
        return qp_template(self.literals, self.names, self.defaults, variables, self.escapes)


def _new_boundary(tag: str) -> str:
    return f"=_fs{tag}_{os.urandom(9).hex()}"


class Renderer:
    """A compiled campaign: ``render(rcpt, variables, message_id) -> bytes``."""

    def __init__(
        self,
        spec: Mapping[str, Any],
        signers: Sequence[Signer] = (),
        msgid_tag: str = "",
        max_size: int = 0,
    ) -> None:
        self.signers = tuple(signers)
        self.max_size = max_size  # octets of a whole message (0: no limit): MessageTooBig
        self.from_display, self.from_addr = parse_mailbox(spec["from"])
        _local, self.from_domain = split_address(self.from_addr)
        # Message-ID: <token@TAG.from-domain>, unique across spools (msgid.new_tag)
        self.mid_domain = msgid.message_id_domain(msgid_tag, self.from_domain)
        # The envelope sender's domain in A-labels, as RCPT TO's and the headers'
        # (MAIL FROM:<news@bücher.example> went out raw, with no SMTPUTF8).
        verp_domain = spec.get("verp_domain")
        self.verp_domain: str | None = (
            encode_domain(verp_domain.strip().rstrip(".")).lower() if verp_domain else None
        )
        self.verp_prefix: str = spec.get("verp_prefix", "b")
        rp_local, rp_domain = split_address(spec.get("return_path") or self.from_addr)
        self.return_path: str = f"{rp_local}@{rp_domain}"
        self.tracker = tracking.Tracker.from_spec(spec.get("tracking"))
        headers = [
            _Header("From", "mailbox", [Template(spec["from"])]),
        ]
        if spec.get("reply_to"):
            headers.append(_Header("Reply-To", "mailbox", [Template(spec["reply_to"])]))
        # The usual To (just the recipient) is written directly in render().
        self._to_custom = bool(spec.get("to")) and spec["to"].strip() != "{{ email }}"
        if self._to_custom:
            headers.append(_Header("To", "mailbox", [Template(spec["to"])]))
        headers.append(_Header("Subject", "text", [Template(spec["subject"])]))
        self._head = headers
        tail: list[_Header] = []
        unsub = spec.get("list_unsubscribe") or {}
        if self.tracker is not None and self.tracker.unsubscribe:
            unsub = {**unsub, "url": self.tracker.unsubscribe_header_template().source}
            unsub["one_click"] = True
        uris = [Template(unsub[k]) for k in ("mailto", "url") if unsub.get(k)]
        uris = [
            Template("mailto:" + t.source)
            if i == 0 and "mailto" in unsub and not t.source.lower().startswith("mailto:")
            else t
            for i, t in enumerate(uris)
        ]
        if uris:
            tail.append(_Header("List-Unsubscribe", "uris", uris))
            if unsub.get("url") and unsub.get("one_click", True):
                tail.append(
                    _Header(
                        "List-Unsubscribe-Post", "text", [Template("List-Unsubscribe=One-Click")]
                    )
                )
        if spec.get("feedback_id"):
            tail.append(_Header("Feedback-ID", "text", [Template(spec["feedback_id"])]))
        for name, value in (spec.get("headers") or {}).items():
            tail.append(_Header(name, "text", [Template(value)]))
        self._tail = tail
        encoding = spec.get("transfer_encoding", "quoted-printable")
        parts = []
        if spec.get("text") is not None:
            source = spec["text"]
            if self.tracker is not None:
                source = self.tracker.compile_text(source)
            parts.append(_TextPart("plain", source, encoding))
        if spec.get("html") is not None:
            source = spec["html"]
            if self.tracker is not None:
                source = self.tracker.compile_html(source)
            parts.append(_TextPart("html", source, encoding))
        self._parts = parts
        self._alt = _new_boundary("a") if len(parts) > 1 else ""
        attachments = spec.get("attachments") or []
        # An attachment with a cid is an inline image: with the HTML part in a
        # multipart/related (RFC 2387), where its <img src="cid:NAME"> finds it
        # (RFC 2392); alternative(text, related(html, images)), as mail
        # clients write it. (A campaign has html when it has one: Campaign.)
        inline = [a for a in attachments if a.get("cid")] if spec.get("html") is not None else []
        attachments = [a for a in attachments if not any(a is b for b in inline)]
        self._related = _new_boundary("r") if inline else ""
        self._mixed = _new_boundary("m") if attachments else ""
        self._attachments = b"".join(self._attachment_part(a) for a in attachments)
        rel = self._related.encode("ascii")
        self._inline_close = (
            b"".join(self._attachment_part(a, rel) for a in inline) + CRLF + b"--" + rel + b"--" + CRLF
        )
        self._related_head = (
            b'Content-Type: multipart/related; boundary="' + rel + b'"; type="text/html"' + CRLF
        )
        # A non-ASCII local part in an address the message always carries (From,
        # the return path, a Reply-To or To without placeholders) is UTF-8 in
        # its header: every message needs SMTPUTF8 (RFC 6531/6532).
        addrs = [self.from_addr, self.return_path]
        for key in ("reply_to", "to"):
            if spec.get(key) and Template(spec[key]).is_static:
                addrs.append(parse_mailbox(spec[key])[1])
        self._sender_utf8 = not all(a.rpartition("@")[0].isascii() for a in addrs)
        # A Reply-To or To built from variables (other than the recipient's
        # own address): a recipient's value may make its local part non-ASCII,
        # and then that message needs SMTPUTF8 (needs_smtputf8 with the values).
        self._addr_templates = tuple(
            t
            for key in ("reply_to", "to")
            if spec.get(key) and (t := Template(spec[key])).names - {"email"}
        )
        self._date_sec = -1
        self._date_line = b""
        # Static pieces of the body and the content headers, made once.
        alt = self._alt.encode("ascii")
        self._alt_pre = [b"--" + alt + CRLF + self._member_head(p) + CRLF for p in parts]
        self._alt_close = b"--" + alt + b"--" + CRLF
        mixed = self._mixed.encode("ascii")
        if len(parts) > 1:
            inner_head = b'Content-Type: multipart/alternative; boundary="' + alt + b'"' + CRLF
        else:
            inner_head = self._member_head(parts[0])
        self._mixed_open = b"--" + mixed + CRLF + inner_head + CRLF
        self._mixed_close = self._attachments + CRLF + b"--" + mixed + b"--" + CRLF
        content = (
            b'Content-Type: multipart/mixed; boundary="' + mixed + b'"' + CRLF
            if self._mixed
            else inner_head
        )
        self._content = [ln + CRLF for ln in content.split(CRLF)[:-1]]
        self._layout = (
            tuple(h.entry() for h in self._head),
            tuple(h.entry() for h in self._tail),
            tuple(self._content),
            self._segments(),
            len(parts) == 1 and not self._mixed and not self._related,
            self._to_custom,
            self.mid_domain,
        )
        # The header layout is fixed, so each signer's plan is made once.
        names = [h.lname for h in self._head]
        if not self._to_custom:
            names.append("to")
        names += ["date", "message-id", "mime-version"]
        names += [h.lname for h in self._tail]
        names += [ln[: ln.index(b":")].decode("ascii").lower() for ln in self._content]
        self._plans = [(s, s.plan(names)) for s in self.signers]
        self._size_plan()
        self._assemble()

    def _size_plan(self) -> None:
        """What :meth:`too_big` and :attr:`guard` need, found once: the octets
        every message holds whatever its values (static header and body bytes,
        the body templates' literal text), where the body uses each of the
        recipient's variables (its escape and the part's encoding, how often),
        and the guard: the most characters a recipient's values (or their JSON)
        may have for its message to stay under ``max_size`` for sure, however
        they are escaped (:func:`_growth` octets a character where each stands;
        :data:`GROWTH` in a header) -- longer ones are measured (:meth:`render`).
        A template that names a variable 2,000 times with a 100 KB value made a
        208 MB message (a worker's peak 431 MB), refused only by the receiver."""
        head, tail, content, segments = self._layout[:4]
        fixed = sum(len(e) for e in (*head, *tail, *content, *segments) if isinstance(e, bytes))
        # (template, each placeholder's growth) of every template a value goes into
        grown: list[tuple[Template, list[int]]] = [
            (t, [GROWTH] * len(t._names)) for h in (*self._head, *self._tail) for t in h.templates
        ]
        if self.tracker is not None:
            links = (*self.tracker.links, *self.tracker.text_links)
            grown += [(t, [TRACKED_GROWTH] * len(t._names)) for t in links]
        uses: dict[str, dict[tuple[int, str], int]] = {}
        defaults: dict[str, int] = {}  # the fewest octets of the defaults a missing value leaves
        for p in self._parts:
            t = p.template
            modes = p.escapes or (0,) * len(t._names)
            grown.append((t, [_growth(m, p.encoding) for m in modes]))
            for n, d, m in zip(t._names, t._defaults, modes, strict=True):
                if not _system_name(n):
                    where = uses.setdefault(n, {})
                    where[m, p.encoding] = where.get((m, p.encoding), 0) + 1
                    if d:
                        defaults[n] = defaults.get(n, 0) + least_octets(d, m, p.encoding)
        self._body_uses, self._body_defaults = uses, defaults
        literal = sum(len(x.encode("utf-8")) for p in self._parts for x in p.template.literals)
        self._static_min = fixed + literal
        self._header_plan()
        if not self.max_size:
            self.guard, self._size_guard = self._header_guard, sys.maxsize
            return
        upper = (
            fixed
            + 4 * sum(len(x.encode("utf-8")) for t, _g in grown for x in t.literals)
            + SLACK
            + SIGNATURE * len(self.signers)
        )
        growth = 0  # octets a character of the values may become, summed over their uses
        for t, gs in grown:
            for n, d, g in zip(t._names, t._defaults, gs, strict=True):
                if _system_name(n):
                    upper += SYSTEM_VALUE
                    continue
                growth += g
                if d:
                    upper += g * len(d)
        room = self.max_size - upper
        self._size_guard = room // max(growth, 1) if room >= 0 else -1
        self.guard = min(self._size_guard, self._header_guard)

    def _header_plan(self) -> None:
        """What :meth:`header_too_big` needs, found once: the header fields
        every message has whatever its values, the templated ones, and the
        header guard (the most characters a recipient's values may have for
        the header section to stay under MAX_HEADER_OCTETS for sure: GROWTH
        octets a character of each header use). A 1 MB value in ``X-A: {{ v }}``
        made a 1.4 MB header section, bounded only by max_message_size:
        Postfix keeps the first 102,400 octets of a header (header_size_limit)
        and Gmail refuses it (552 5.3.4), so the rows past the guard are
        measured (the renderers hand them to :meth:`render`)."""
        head, tail, content = self._layout[:3]
        fixed = sum(len(e) for e in (*head, *tail, *content) if isinstance(e, bytes))
        self._header_fixed = fixed + SYSTEM_LINES + SIGNATURE * len(self.signers)
        self._header_templated = tuple(
            h for h in (*self._head, *self._tail) if h.static is None
        )  # fmt: skip
        upper, growth = self._header_fixed + SLACK, 0
        uses: dict[str, int] = {}  # each row variable's uses in headers
        for h in self._header_templated:
            for t in h.templates:
                upper += len(h.name) + 2 + 4 * sum(len(x.encode("utf-8")) for x in t.literals)
                for n, d in zip(t._names, t._defaults, strict=True):
                    if _system_name(n):
                        upper += SYSTEM_VALUE
                        continue
                    growth += GROWTH
                    uses[n] = uses.get(n, 0) + 1
                    if d:
                        upper += GROWTH * len(d)
        self._header_upper, self._header_uses = upper, uses
        room = MAX_HEADER_OCTETS - upper
        self._header_guard = sys.maxsize if not growth else room // growth if room >= 0 else -1

    @property
    def guards(self) -> tuple[int, int]:
        """(the size guard, the header guard): values past one are measured
        for what it guards (:meth:`too_big`, :meth:`header_too_big`)."""
        return self._size_guard, self._header_guard

    def header_too_big(self, variables: Mapping[str, str]) -> str | None:
        """Why the header section these values make would be over
        MAX_HEADER_OCTETS (raw MIME's cap, which SMTP submission and the API's
        ``raw`` refuse), naming the variable that weighs most in it, or None:
        each templated header encoded with them (the values fastsend fills by
        stand-ins as long as they ordinarily are; one that cannot be encoded
        counted at GROWTH octets a character: :meth:`header_problem` or the
        render says why). Asked only of values past the guard, and encoded only
        when a bound from the values' lengths (ASCII_GROWTH octets an ASCII
        character, GROWTH another, each use) does not already say it fits: a
        template of thousands of header placeholders had every row of a list
        encoded as it was accepted, milliseconds a row on serve's loop."""
        bound = self._header_upper
        for n, k in self._header_uses.items():
            v = variables.get(n)
            if type(v) is str:
                bound += k * len(v) * (ASCII_GROWTH if v.isascii() else GROWTH)
            elif v is not None:  # (no string: encoding says why)
                bound = sys.maxsize
                break
        if bound <= MAX_HEADER_OCTETS:
            return None
        total = self._header_fixed
        weights: dict[str, int] = {}
        vs = dict(variables)
        for h in self._header_templated:
            names = {n for t in h.templates for n in t.names}
            for n in names:
                if _system_name(n):
                    vs[n] = _SYSTEM_STANDIN.get(n, "x" * 64)
            for n in (n for n in names if not _system_name(n)):
                v = variables.get(n)
                if type(v) is str:
                    weights[n] = weights.get(n, 0) + len(v.encode("utf-8", "surrogatepass"))
            try:
                total += len(h.encode(vs))
            except (HeaderError, RenderError, UnsafeValue, KeyError, TypeError, ValueError):
                given = sum(len(v) for n in names if type(v := variables.get(n)) is str)
                total += len(h.name) + 2 + GROWTH * given
        if total <= MAX_HEADER_OCTETS:
            return None
        why = (
            f"the header section would be {total:,} octets, over the {MAX_HEADER_OCTETS:,}-octet"
            " limit (receivers cut or refuse a larger header section)"
        )
        if weights:
            worst = max(weights, key=weights.__getitem__)
            why += f" ({{{{ {worst} }}}}: {weights[worst]:,} octets in headers)"
        return why

    def too_big(self, variables: Mapping[str, str], defaults: bool = True) -> str | None:
        """Why the message these variables make would be over ``max_size``,
        told from what it holds at the least (each body use of a value puts in
        at least the octets :func:`least_octets` counts: escaped for where it
        stands and encoded for its part; a missing or empty one its default;
        soft line breaks and headers only add), or None. The same estimate
        refuses such a row when it is accepted (:func:`fastsend.accept.row_sizer`),
        and a message :meth:`render` builds is at most a few percent over it;
        ``defaults=False``: what any row's message holds (the campaign's own)."""
        if not self.max_size:
            return None
        total = self._static_min
        worst, worst_size, worst_uses, worst_raw = "", 0, 1, 0
        for name, where in self._body_uses.items():
            v = variables.get(name)
            if type(v) is str and v:
                raw = len(v) if v.isascii() else len(v.encode("utf-8", "surrogatepass"))
                n = sum(where.values())
                # The value's octets first (cheap): escaping is counted only when
                # the message could still fit without it.
                size = (
                    n * raw
                    if total + n * raw > self.max_size
                    else sum(k * least_octets(v, m, enc) for (m, enc), k in where.items())
                )
            elif defaults and (v is None or v == ""):
                size, n = self._body_defaults.get(name, 0), 1  # (the defaults' octets, summed)
                raw = size
            else:
                continue
            total += size
            if size > worst_size:
                worst, worst_size, worst_uses, worst_raw = name, size, n, raw
        if total <= self.max_size:
            return None
        why = f"the message would be at least {total:,} octets, over the {self.max_size:,}-octet limit"
        if worst:
            n = worst_uses
            why += f" ({{{{ {worst} }}}}: {worst_raw:,} octets" + (f" x {n:,} uses" if n > 1 else "")
            if worst_size > worst_raw * n:
                why += f", {worst_size:,} escaped and encoded"
            why += ")"
        return why

    @property
    def row_headers(self) -> tuple[str, ...]:
        """The variables a recipient's values can make a header impossible to
        write with (:meth:`header_problem` asks): those of a Reply-To, To or
        List-Unsubscribe built from them (a subject or another text header
        always can be written: RFC 2047); () when there are none."""
        names = {
            n
            for h in (*self._head, *self._tail)
            if h.static is None and h.kind != "text"
            for t in h.templates
            for n in t.names
        }
        return tuple(sorted(names - {"email"}))

    def header_problem(self, variables: Mapping[str, str]) -> str | None:
        """Why the Reply-To, To or List-Unsubscribe header these values make
        cannot be written (not a mailbox, an address's part too long, a word
        over 998 octets that no folding can break: RFC 5322 2.1.1), naming
        the variables it takes, or None. Asked of each row as it is accepted
        (:func:`fastsend.accept.row_sizer`): such a row had been spooled and
        failed at render (5.6.0). A value missing is not its concern."""
        for h in (*self._head, *self._tail):
            if h.static is not None or h.kind == "text":
                continue
            names = sorted({n for t in h.templates for n in t.names} - {"email"})
            if not names:
                continue
            if "email" not in variables:  # (a row's values: its address stands apart)
                variables = {**variables, "email": "recipient@example.com"}
            try:
                h.encode(variables)
            except (KeyError, TypeError):  # (a value missing or no string: not this check's)
                continue
            except (HeaderError, RenderError, UnsafeValue, ValueError) as e:
                why = str(e)
                if len(why) > 300:  # (it quotes the value: 1 MB of it is not a reason)
                    why = why[:300] + "..."
                if h.name not in why:
                    why = f"{h.name}: {why}"
                return f"{why} ({', '.join('{{ ' + n + ' }}' for n in names)})"
        return None

    def _assemble(self) -> None:
        """The :class:`Assembly` of the layout, with the ``MessageSigner`` of
        the one signer (several signers: signed in :meth:`render`, one by one)."""
        ms = self._plans[0][0].message_signer(self._plans[0][1]) if len(self._plans) == 1 else None
        self._signer = ms
        self._assembly = Assembly(*self._layout, ms, self.guard)
        # Signed messages are made when sent (for_batch(deferred=True)) when
        # their signature is cheap next to the rest of the send: Ed25519
        # (~15 us; measured, bench/end_to_end.py, 2 workers: workers -4 to -6
        # us/msg, the receiver +2). An rsa-sha256 signature (~260 us at 2048
        # bits) is made when the batch is built, back to back (made_ahead):
        # made in the SMTP client's reply path, it spaced each connection's
        # next write a quarter of a millisecond after its reply, the workers
        # gained nothing measurable and a receiver on the same cores woke
        # once per message (smtp-sink +7 us/msg). Made ahead, such a message
        # is still a DeferredMessage of the one compiled loop
        # (Assembly.envelopes with ``now``), not a render() per message.
        self._defer_signed = ms is not None and self._plans[0][0].algorithm == "ed25519-sha256"
        self.made_ahead = ms is not None and not self._defer_signed

    # -- compile-time helpers -------------------------------------------------
    def _attachment_part(self, a: Mapping[str, Any], related: bytes = b"") -> bytes:
        """An attachment's part, or with ``related`` (its boundary) an inline
        image's: ``Content-ID: <cid>``, disposition inline."""
        data = base64.b64decode(a["data_b64"])
        if related:
            head = (
                f"--{related.decode('ascii')}\r\n"
                f"Content-Type: {a['content_type']}\r\n"
                f"Content-ID: <{a['cid']}>\r\n"
                f"{disposition(a['filename'], 'inline')}"
                "Content-Transfer-Encoding: base64\r\n\r\n"
            ).encode("ascii")
        else:
            ctype = a["content_type"]
            if _UNENCODED.match(ctype):
                # A message/rfc822 (a .eml file) or multipart body may not be base64
                # (RFC 2045 6.4, RFC 2046 5.2.1): sent 7bit as written when it is
                # 7-bit text, else as the octets it is (application/octet-stream).
                text = _seven_bit(data, self._mixed.encode("ascii"))
                if text is not None:
                    return (
                        f"--{self._mixed}\r\nContent-Type: {ctype}\r\n"
                        f"{disposition(a['filename'])}Content-Transfer-Encoding: 7bit\r\n\r\n"
                    ).encode("ascii") + text
                ctype = "application/octet-stream"
            head = (
                f"--{self._mixed}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"{disposition(a['filename'])}"
                "Content-Transfer-Encoding: base64\r\n\r\n"
            ).encode("ascii")
        return head + base64_body(data)

    def _member_head(self, part: _TextPart) -> bytes:
        """The content header of a body part's place: the HTML part's
        multipart/related when it has inline images."""
        if self._related and part.subtype == "html":
            return self._related_head
        return part.headers

    def _member(self, part: _TextPart, seg: Segment) -> list[Segment]:
        """The chunks of a body part's place (after its content header)."""
        if self._related and part.subtype == "html":
            rel = self._related.encode("ascii")
            return [b"--" + rel + CRLF + part.headers + CRLF, seg, CRLF, self._inline_close]
        return [seg]

    # -- per recipient --------------------------------------------------------
    def _date(self) -> bytes:
        """The Date header line of a message made now (formatted once a second)."""
        now = int(time.time())
        if now != self._date_sec:
            stamp = datetime.fromtimestamp(now, UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
            self._date_line = b"Date: " + stamp.encode("ascii") + CRLF
            self._date_sec = now
        return self._date_line

    date_line = _date  # (what for_batch's date is: a worker's batches take it directly)

    def _segments(self) -> tuple[Segment, ...]:
        """The body of the whole message as :class:`Assembly` segments (its
        content headers are ``self._content``)."""
        parts = self._parts
        members = [self._member(p, p.segment()) for p in parts]
        if len(parts) == 1:
            if not self._mixed:
                return tuple(members[0])
            chunks = [self._mixed_open, *members[0], CRLF, self._mixed_close]
        else:
            chunks = [self._mixed_open] if self._mixed else []
            for member, pre in zip(members, self._alt_pre, strict=True):
                chunks += [pre, *member, CRLF]
            chunks.append(self._alt_close)
            if self._mixed:
                chunks += [CRLF, self._mixed_close]
        return tuple(chunks)

    def render_shared(self, message_id: str) -> bytes:
        """One message for several recipients of a campaign whose bytes are the
        same for all (``Campaign.identical``): its headers name none of them --
        the campaign's own ``to``, else ``To: undisclosed-recipients:;`` -- and
        its Message-ID is ``message_id`` (the group's)."""
        if self.tracker is not None:
            raise RenderError("a tracked campaign cannot share a message between recipients")
        return self.render("", {}, message_id, shared=True)

    def render(
        self, rcpt: str, variables: Mapping[str, str], message_id: str, *, shared: bool = False
    ) -> bytes:
        """The complete message for one recipient (RenderError if it cannot be
        built; MessageTooBig, one, when it would be over ``max_size``: told
        before it is made when its values alone say so, else once made --
        only values longer than :attr:`guard` can make one too big)."""
        size = _values_size(variables)
        if size > self.guard:
            why = self.header_too_big(variables) if size > self._header_guard else None
            if why is None and size > self._size_guard:
                why = self.too_big(variables)
            if why is not None:
                raise MessageTooBig(f"{rcpt!r}: {why}")
            data = self._render(rcpt, variables, message_id, shared)
            if self.max_size and len(data) > self.max_size:
                raise MessageTooBig(
                    f"{rcpt!r}: the message is {len(data):,} octets, over the"
                    f" {self.max_size:,}-octet limit"
                )
            return data
        return self._render(rcpt, variables, message_id, shared)

    def _render(
        self, rcpt: str, variables: Mapping[str, str], message_id: str, shared: bool
    ) -> bytes:
        now = int(time.time())
        date = self._date_line if now == self._date_sec else self._date()
        sign = bool(self._plans)
        try:
            if not shared and self.tracker is None:  # the usual case: one call
                if self._signer is not None:  # signed in the same call
                    return self._assembly.signed(variables, rcpt, message_id, date)  # type: ignore[no-any-return]
                got = self._assembly.personal(variables, rcpt, message_id, date, sign)
            else:
                vs = {**variables, "email": rcpt, "message_id": message_id}
                if shared:
                    to = b"" if self._to_custom else b"To: undisclosed-recipients:;\r\n"
                else:
                    local, domain = split_address(rcpt)
                    vs.update(self.tracker.variables(rcpt, vs, message_id))  # type: ignore[union-attr]
                    to = b"" if self._to_custom else f"To: {local}@{domain}\r\n".encode()
                mid = message_id if message_id_safe(message_id) else verp.encode_id(message_id)
                mid_line = f"Message-ID: <{mid}@{self.mid_domain}>\r\n".encode()
                if sign:
                    got = (self._assembly.headers(vs, to, date, mid_line), self._assembly.body(vs))
                else:
                    got = self._assembly.message(vs, to, date, mid_line)
        except KeyError as exc:
            raise RenderError(f"{rcpt!r}: missing variable {exc.args[0]!r}") from None
        except TypeError:
            raise RenderError(f"{rcpt!r}: variable values must be strings") from None
        except (HeaderError, verp.VerpError, UnsafeValue) as exc:
            raise RenderError(f"{rcpt!r}: {exc}") from None
        if isinstance(got, bytes):  # not signed
            return got
        lines, body = got
        if self._signer is not None:  # one signature: the usual case
            return self._signer.message(lines, body)  # type: ignore[no-any-return]
        sigs = [s.sign_lines(plan, lines, body) for s, plan in self._plans]
        sigs += lines
        sigs.append(CRLF)
        sigs.append(body)
        return b"".join(sigs)

    def for_batch(self, deferred: bool = False) -> tuple[Callable[..., Any], bytes] | None:
        """The usual case of :meth:`render` (no tracked links, no DKIM; with
        ``deferred``, one Ed25519 DKIM signature too) as one
        direct call, for the messages of one batch: ``(personal, date)``, and
        ``personal(variables, rcpt, message_id, date, False)`` is what
        ``render(rcpt, variables, message_id)`` returns, with the Date line
        taken now, once per batch (a batch is built within a millisecond or
        so). None when that case does not apply. ``personal`` raises what the
        compiled assembly raises (KeyError, TypeError, HeaderError, VerpError);
        :meth:`render` of the same message then says why, as a RenderError.
        With ``deferred``, ``Assembly.deferred`` in its place: the same
        arguments, ``False`` replaced by a fallback, make a
        :class:`DeferredMessage` (the message made when it is called; signed
        then, when the campaign has one DKIM signer: ``Assembly.signed``; an
        rsa-sha256 one is to be made as the batch is built, :attr:`made_ahead`,
        ``Assembly.envelopes``' ``now``)."""
        if (
            self.tracker is not None
            or self._addr_templates
            or (self._plans and not (deferred and self._signer is not None))
        ):
            return None
        a = self._assembly
        return (a.deferred if deferred else a.personal), self._date()  # type: ignore[return-value]

    @property
    def assembly(self) -> Assembly:
        """The campaign's layout, filled per recipient (what :meth:`for_batch` calls)."""
        return self._assembly

    def envelope_from(self, message_id: str) -> str:
        """The MAIL FROM address: a VERP bounce address, or the return path/From."""
        if self.verp_domain:
            return verp.encode(message_id, self.verp_domain, self.verp_prefix)
        return self.return_path

    @staticmethod
    def envelope_rcpt(rcpt: str) -> str:
        """``rcpt`` with its domain in IDNA A-labels (what RCPT TO should carry)."""
        local, domain = split_address(rcpt)
        return f"{local}@{domain}"

    @property
    def sender_utf8(self) -> bool:
        """True when every message needs SMTPUTF8, whoever gets it: a non-ASCII
        local part in From, the return path, or a Reply-To or To without
        placeholders."""
        return self._sender_utf8

    @property
    def address_variables(self) -> bool:
        """True when a Reply-To or To is built from variables (other than
        ``email``): :meth:`needs_smtputf8` then needs each message's values."""
        return bool(self._addr_templates)

    def needs_smtputf8(self, rcpt: str, variables: Mapping[str, str] | None = None) -> bool:
        """True when the recipient's local part is non-ASCII, or
        :attr:`sender_utf8`, or (given the message's ``variables``) a Reply-To
        or To built from them has a non-ASCII local part (RFC 6531/6532)."""
        if self._sender_utf8 or not rcpt.rpartition("@")[0].isascii():
            return True
        if not variables or not self._addr_templates:
            return False
        for t in self._addr_templates:
            if all(type(v) is not str or v.isascii() for v in t.values_or_none(variables)):
                continue  # (an ASCII value cannot make a non-ASCII local part)
            try:
                addr = parse_mailbox(t.render({**variables, "email": rcpt}))[1]
            except (HeaderError, KeyError, TypeError):
                continue  # no message to send: render() says why
            if not addr.rpartition("@")[0].isascii():
                return True
        return False
