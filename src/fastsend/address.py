"""Recipient address checks: is this something we can put in RCPT TO?

Accepts ``local@domain`` where the domain is a DNS name (a Unicode domain is
converted to its A-label form by IDNA 2008 with UTS 46 mapping, as every other
domain path does: :func:`idna_domain`; its top-level domain not numeric, so
``u@1.2.3.4`` is refused) or an address literal (``u@[192.0.2.1]``,
``u@[IPv6:2001:db8::1]``: delivered to that address, as an MX's), and the
local part is a dot-atom or quoted string of printable characters (non-ASCII
allowed: it needs SMTPUTF8 at delivery time). Rejects control characters,
spaces outside quotes, angle brackets, empty parts, and the RFC 5321 length
limits (64 local, 255 domain, 254 total path). It does not check that the
domain exists; delivery does.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string

from fastsend._accel import pick


def ascii_and_non_ascii(ascii_chars: str) -> str:
    """A regex character class of ``ascii_chars`` (listed one by one) and every
    non-ASCII character: written as the class of what it excludes, which ``re``
    compiles in ~0.1 ms, where a range up to ``\\U0010ffff`` takes 2-25 ms at
    every start of every process."""
    bad = [c for c in range(128) if chr(c) not in ascii_chars]
    runs: list[str] = []
    i = 0
    while i < len(bad):
        j = i
        while j + 1 < len(bad) and bad[j + 1] == bad[j] + 1:
            j += 1
        runs.append(f"\\x{bad[i]:02x}" + (f"-\\x{bad[j]:02x}" if j > i else ""))
        i = j + 1
    return "[^" + "".join(runs) + "]"


ATEXT_CHARS = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_ATEXT_U = ascii_and_non_ascii(ATEXT_CHARS)  # RFC 6531: atext and any non-ASCII
_ATEXT = re.compile(rf"^{_ATEXT_U}+(\.{_ATEXT_U}+)*$")
_QTEXT = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')  # and SP
_QUOTED = re.compile(rf'^"({ascii_and_non_ascii(_QTEXT)}|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# C1 controls and characters that reorder or hide text (bidi embeddings, overrides
# and isolates, marks, line/paragraph separators, BOM, zero-width space): an
# address holding U+202E reads backwards in every mail client and list view (the
# attachment-name trick), and none of them is ever a real mailbox's. Joiners
# (U+200C/U+200D) stay: some scripts need them.
_INVISIBLE = re.compile("[\x80-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
# The common case in one match: an ASCII dot-atom local part and a plain domain
# (no space, no control character, one @). What it accepts the full checks
# below accept too, with the same result; anything else takes the full path.
_PLAIN = re.compile(
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*)@([A-Za-z0-9.\-]+)"
)


class AddressError(ValueError):
    """The address is not deliverable as written (the message says why)."""


def normalize(address: str) -> tuple[str, str]:
    """Return (address, ascii_domain) with the domain lowercased and IDNA-encoded."""
    m = _PLAIN.fullmatch(address)
    if m is not None:
        local, domain = m.groups()
        ascii_domain = _domain(domain)
        if ascii_domain is not None and len(local) <= 64:
            full = address if ascii_domain == domain else f"{local}@{ascii_domain}"
            if len(full) <= 254:
                return full, ascii_domain
    a = address.strip()
    if not a:
        raise AddressError("empty address")
    if _CONTROL.search(a):
        raise AddressError(f"control character in address {a!r}")
    hidden = _INVISIBLE.search(a)
    if hidden:
        raise AddressError(f"invisible or direction-changing character U+{ord(hidden.group()):04X}"
                           f" in address {a!r}")  # fmt: skip
    local, at, domain = a.rpartition("@")
    if not at:
        raise AddressError(f"missing @ in address {a!r}")
    if not local:
        raise AddressError(f"empty local part in {a!r}")
    if len(local.encode()) > 64:
        raise AddressError(f"local part longer than 64 octets in {a!r}")
    if not (_ATEXT.match(local) or _QUOTED.match(local)):
        raise AddressError(f"invalid local part in {a!r}")
    # Lists repeat a few domains many times: check each one once.
    ascii_domain = _domain(domain)
    if ascii_domain is None:
        raise AddressError(_domain_error(domain, a))
    full = f"{local}@{ascii_domain}"
    if len(full.encode()) > 254:
        raise AddressError(f"address longer than 254 octets: {a!r}")
    return full, ascii_domain


@functools.lru_cache(maxsize=65536)
def _domain(domain: str) -> str | None:
    """The domain in lowercase A-label form, or None when it is not valid."""
    try:
        return _check_domain(domain)
    except AddressError:
        return None


def _domain_error(domain: str, a: str) -> str:
    try:
        _check_domain(domain)
    except AddressError as e:
        return str(e).replace("{ADDR}", repr(a))
    return f"invalid domain in {a!r}"


@functools.lru_cache(maxsize=4096)
def idna_domain(domain: str) -> str:
    """A domain name in lower-case A-labels, by IDNA 2008 (RFC 5891) with UTS 46
    mapping, non-transitional: ``faß.de`` is ``xn--fa-hia.de`` (Python's own
    ``"idna"`` codec is IDNA 2003 and makes it ``fass.de``, another domain with
    another owner; ``ς`` is not ``σ``; a joiner is not dropped). The one
    conversion of every domain path: recipients (RCPT TO, MX lookup, suppression
    keys), header addresses, DKIM d=, tenants' domains. ASCII passes through
    lower-cased. UnicodeError when the name is not a valid IDN (IDNA 2008
    refuses what IDNA 2003 let through: symbols such as emoji, a misplaced
    joiner, a label mixing directions)."""
    if domain.isascii():
        return domain.lower()
    import idna  # only for non-ASCII names (its tables take ~10 ms to load)

    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except UnicodeError:  # idna.IDNAError is one
        raise
    except Exception as exc:  # its codec's other refusals (ValueError ...)
        raise UnicodeError(str(exc)) from None


def _check_domain(domain: str) -> str:
    d = domain.strip().rstrip(".")
    d = d.lower() if d.isascii() else d  # UTS 46 maps case itself (not as str.lower)
    if not d:
        raise AddressError("empty domain in {ADDR}")
    if d.startswith("[") and d.endswith("]"):
        return _literal(d[1:-1])
    try:
        ascii_domain = idna_domain(d)
    except UnicodeError:
        raise AddressError("domain of {ADDR} is not a valid internationalised name") from None
    if len(ascii_domain) > 255:
        raise AddressError("domain longer than 255 octets in {ADDR}")
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise AddressError("invalid domain in {ADDR}")
    if not labels[-1][0].isalpha():
        # RFC 3696 2 / RFC 1123 2.1: a top-level domain is never numeric, so a
        # dotted quad is an IP address, not a name: u@1.2.3.4 was accepted,
        # looked up as a name and bounced 5.1.2 (a hard bounce that suppressed
        # it); RFC 5321 4.1.3 writes an address as a literal in brackets.
        try:
            ip = ipaddress.IPv4Address(ascii_domain)
        except ValueError:
            raise AddressError(
                "top-level domain of {ADDR} starts with a digit (not a name)"
            ) from None
        raise AddressError(
            f"domain of {{ADDR}} is an IP address, not a name (an address literal is written in brackets: [{ip}])"
        )
    return ascii_domain


def quoted_local(local: str) -> bool:
    """Is ``local`` a quoted-string local part as :func:`normalize` takes one
    (``"john doe"``; RFC 5321 4.1.2, printable characters, ``\\`` pairs)?"""
    return len(local.encode()) <= 64 and _QUOTED.match(local) is not None


def literal(domain: str) -> str:
    """An address literal's domain (``[192.0.2.1]``, ``[IPv6:2001:DB8:0::1]``)
    in the one form recipients are spooled in; AddressError when it is none.
    The suppression list keys such a recipient by it (it refused literals: an
    unsubscribe or hard bounce of ``u@[192.0.2.1]`` was dropped, the mail went on)."""
    d = domain.strip().lower()
    if not (d.startswith("[") and d.endswith("]")):
        raise AddressError(f"{domain!r} is not an address literal")
    try:
        return _literal(d[1:-1])
    except AddressError as e:
        raise AddressError(str(e).replace("{ADDR}", repr(domain))) from None


def _literal(lit: str) -> str:
    """An address literal's domain in one form, ``[192.0.2.1]`` or
    ``[ipv6:2001:db8::1]`` (RFC 5321 4.1.3: an IPv6 address only after the
    ``IPv6:`` tag, an IPv4 one without; the address compressed, so that one
    literal written two ways is one recipient and one suppression key)."""
    try:
        if lit.startswith("ipv6:"):
            return f"[ipv6:{ipaddress.IPv6Address(lit[5:])}]"
        return f"[{ipaddress.IPv4Address(lit)}]"
    except ValueError:
        pass
    hint = " (an IPv6 literal is written [IPv6:2001:db8::1])" if ":" in lit else ""
    raise AddressError("invalid address literal in {ADDR}" + hint)


py_normalize = normalize  # the reference (tests compare the compiled twin with it)
normalize = pick(normalize)  # fastsend._core.normalize (_address.pxi): the plain case in C
