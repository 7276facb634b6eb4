"""Header encoding: folding, RFC 2047 encoded-words, addresses, IDNA, injection checks.

Every function here returns or checks text for one header field; the MIME
serializer (:mod:`fastsend.message.mime`) strings them together. Rules:

- Lines are folded at 78 characters where a fold is possible (before a space
  between words or encoded-words) and are never longer than 998 octets.
- Unstructured text (Subject, extra headers) is written as-is when it is
  plain printable ASCII words separated by single spaces; anything else
  (non-ASCII, control characters, runs of spaces, text that looks like an
  encoded-word, overlong words) becomes UTF-8 "B" encoded-words (RFC 2047),
  which round-trip exactly through any compliant parser.
- Display names are atoms, a quoted-string, or encoded-words as needed.
- Domains are converted to IDNA A-labels; a non-ASCII local part is kept as
  UTF-8 (RFC 6532) and the message then needs SMTPUTF8.
- CR, LF or NUL in any value bound for a header is refused
  (:class:`HeaderError`): header injection is impossible.

It deliberately does not parse full RFC 5322 address lists (groups, comments,
quoted local parts): a campaign names single mailboxes.
"""

from __future__ import annotations

import base64
import functools
import re

from fastsend._accel import pick
from fastsend.address import ATEXT_CHARS, ascii_and_non_ascii, idna_domain

__all__ = [
    "HeaderError",
    "check_header_value",
    "encode_domain",
    "encode_words",
    "fold_tokens",
    "format_mailbox",
    "mailbox_header",
    "parse_mailbox",
    "split_address",
    "unstructured_header",
]

MAX_LINE = 998
FOLD_AT = 78


class HeaderError(ValueError):
    """A value that cannot go into a header (injection attempt, bad address)."""


_FORBIDDEN = re.compile(r"[\r\n\x00]")
_SAFE_TEXT = re.compile(r"[!-~]+(?: [!-~]+)*")
_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")
# UTF-8 local parts (RFC 6531): atext plus any non-ASCII character.
_U_ATEXT = ascii_and_non_ascii(ATEXT_CHARS)
_U_DOT_ATOM = re.compile(rf"{_U_ATEXT}+(?:\.{_U_ATEXT}+)*")
_ASCII_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.?"
)
# (the tag in any case: a recipient's literal is held as "[ipv6:...]", address.literal,
# and its To line and RCPT TO had failed "invalid domain", 550 for every such recipient)
_ADDR_LITERAL = re.compile(r"\[[0-9A-Fa-f:.]+\]|\[[Ii][Pp][Vv]6:[0-9A-Fa-f:.]+\]")


def check_header_value(value: str, what: str = "header value") -> str:
    """``value`` unchanged, or HeaderError if it holds CR, LF or NUL."""
    if _FORBIDDEN.search(value) is not None:
        raise HeaderError(f"{what} contains CR, LF or NUL (header injection refused): {value!r}")
    return value


def fold_tokens(name: str, tokens: list[str]) -> str:
    """``Name: tok tok ...`` folded before a space at 78 characters, CRLF-terminated."""
    line = name + ":"
    lines: list[str] = []
    for tok in tokens:
        if len(line) + 1 + len(tok) > FOLD_AT and line != name + ":" and line != "":
            lines.append(line)
            line = ""
        line += " " + tok
    lines.append(line)
    for ln in lines:
        if len(ln.encode("utf-8")) > MAX_LINE:
            raise HeaderError(f"{name} header has a word too long to fold under 998 octets")
    return "\r\n".join(lines) + "\r\n"


def encode_words(text: str, first_budget: int = 75) -> list[str]:
    """``text`` as UTF-8 B encoded-words (each <= 75 chars), split on character boundaries."""
    raw = text.encode("utf-8")
    words: list[str] = []
    budget = max(first_budget, 24)
    i, n = 0, len(raw)
    while i < n:
        # 12 octets of '=?utf-8?b?' + '?=' overhead; base64 turns 3 octets into 4.
        take = max(((min(budget, 75) - 12) // 4) * 3, 3)
        j = min(i + take, n)
        while j < n and j > i and (raw[j] & 0xC0) == 0x80:  # do not split a character
            j -= 1
        if j == i:  # a single character longer than the budget: take it whole
            j = i + 1
            while j < n and (raw[j] & 0xC0) == 0x80:
                j += 1
        words.append("=?utf-8?b?" + base64.b64encode(raw[i:j]).decode("ascii") + "?=")
        i = j
        budget = 75
    return words or ["=?utf-8?b??="]


def _needs_encoding(text: str) -> bool:
    if _SAFE_TEXT.fullmatch(text) is None or "=?" in text:
        return True
    return any(len(w) > 900 for w in text.split(" "))


def unstructured_header(name: str, value: str) -> str:
    """A full folded header line for unstructured text (Subject, X-*, ...)."""
    check_header_value(value, name)
    if value == "":
        return name + ":\r\n"
    if _needs_encoding(value):
        return fold_tokens(name, encode_words(value, FOLD_AT - len(name) - 2))
    return fold_tokens(name, value.split(" "))


@functools.lru_cache(maxsize=4096)
def encode_domain(domain: str) -> str:
    """The domain as IDNA A-labels (ASCII domains pass through); HeaderError if invalid."""
    if domain.isascii():
        if _ASCII_DOMAIN.fullmatch(domain) is None and _ADDR_LITERAL.fullmatch(domain) is None:
            raise HeaderError(f"invalid domain {domain!r}")
        return domain
    try:
        return idna_domain(domain)  # IDNA 2008 + UTS 46, as recipients' domains
    except UnicodeError as exc:
        raise HeaderError(f"invalid internationalised domain {domain!r}: {exc}") from None


def split_address(addr: str) -> tuple[str, str]:
    """``(local, ascii_domain)`` of a bare address; HeaderError if it is not one."""
    check_header_value(addr, "address")
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain:
        raise HeaderError(f"not an email address: {addr!r}")
    if _U_DOT_ATOM.fullmatch(local) is None:
        raise HeaderError(f"unsupported local part in {addr!r} (quoted local parts are refused)")
    if len(local.encode("utf-8")) > 64:
        raise HeaderError(f"local part longer than 64 octets in {addr!r}")
    return local, encode_domain(domain)


def _format_phrase(display: str, budget: int) -> list[str]:
    # A word that looks like an encoded-word ("=?...?=") would be decoded by the
    # reader (RFC 2047): such a phrase is encoded, never sent as atoms.
    if _ATOM_PHRASE.fullmatch(display) is not None and "=?" not in display:
        return display.split(" ")
    if _SAFE_TEXT.fullmatch(display) is not None and "=?" not in display and len(display) < 900:
        return ['"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"']
    return encode_words(display, budget)


def format_mailbox(display: str, addr: str) -> list[str]:
    """Tokens of ``display <local@a-label-domain>`` (folding points between tokens)."""
    check_header_value(display, "display name")
    local, domain = split_address(addr)
    angle = f"<{local}@{domain}>"
    if not display:
        return [angle]
    return [*_format_phrase(display, 75), angle]


def mailbox_header(name: str, display: str, addr: str) -> str:
    """A full folded address header line (From, To, Reply-To)."""
    return fold_tokens(name, format_mailbox(display, addr))


_MAILBOX = re.compile(r"\s*(?P<display>.*?)\s*<(?P<addr>[^<>]*)>\s*")


def parse_mailbox(text: str) -> tuple[str, str]:
    """``"Name <a@b>"``, ``'"Name" <a@b>'`` or ``a@b`` -> ``(display, addr)``.

    The address is checked (HeaderError when invalid) and returned with its
    domain in A-labels, as it goes in a header or an envelope (a From written
    ``news@bücher.example`` made the API's raw messages' MAIL FROM 8-bit).
    """
    check_header_value(text, "mailbox")
    m = _MAILBOX.fullmatch(text)
    if m is None:
        addr = text.strip()
        display = ""
        if "<" in addr or ">" in addr or " " in addr:
            raise HeaderError(f"not a mailbox: {text!r} (expected 'Name <addr>' or 'addr')")
    else:
        display, addr = m.group("display"), m.group("addr").strip()
        if len(display) >= 2 and display[0] == '"' and display[-1] == '"':
            display = re.sub(r"\\(.)", r"\1", display[1:-1])
    local, domain = split_address(addr)
    return display, f"{local}@{domain}"


# The readable twin, by name (tests run both; the compiled one is picked).
PURE = {"split_address": split_address}
split_address = pick(split_address)
