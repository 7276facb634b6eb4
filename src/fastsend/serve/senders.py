"""Who a tenant's raw MIME says it is from: the domains a recipient's mail program
shows as the author or sender, read as the message will go out.

Raw MIME from the API (``"raw"``) and SMTP submission is sent almost byte for
byte, with its line ends made CRLF (:func:`fastsend.delivery.signing.crlf_lines`:
a bare CR or LF is a line end). So it is read here the same way: a ``From:``
hidden behind a bare CR (``X: a<CR>From: x@other.example``) is a field of its own
on the wire and is judged as one. The fields judged are those a reader sees as
the message's author or sender: From, Sender, Resent-From and Resent-Sender
(RFC 5322 3.6.2, 3.6.6; Outlook shows Sender as "on behalf of"). Each address's
domain must be one of the tenant's (``Tenants.allows``).
"""

from __future__ import annotations

import email.utils

from fastsend.delivery.signing import crlf_lines

IDENTITY_FIELDS = ("from", "sender", "resent-from", "resent-sender")


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of ``raw``'s header section,
    with the line ends it will be sent with."""
    head = crlf_lines(raw).partition(b"\r\n\r\n")[0]
    out: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            field, prev = out[-1]
            out[-1] = (field, prev + " " + line.decode("utf-8", "replace"))
        elif b":" in line:
            name, _, value = line.partition(b":")
            out.append((name.strip().lower().decode("latin-1"), value.decode("utf-8", "replace")))
        else:
            out.append(("", line.decode("utf-8", "replace")))
    return out


def sender_domains(raw: bytes) -> tuple[bool, list[tuple[str, str]]]:
    """(whether it has a From field, [(field name, domain), ...] of every address in
    its From, Sender, Resent-From and Resent-Sender fields). An address with no
    domain gives "" (a domain no tenant has)."""
    has_from = False
    out: list[tuple[str, str]] = []
    for name, value in header_fields(raw):
        if name not in IDENTITY_FIELDS:
            continue
        has_from = has_from or name == "from"
        for _, addr in email.utils.getaddresses([" ".join(value.split())]):
            out.append((name, addr.rpartition("@")[2].lower().rstrip(".") if addr else ""))
    return has_from, out


def header_nul(raw: bytes) -> bool:
    """Whether the header section holds a NUL (RFC 5322 allows none; programs that
    read header fields as C strings stop there, and so read another message)."""
    return b"\0" in crlf_lines(raw).partition(b"\r\n\r\n")[0]
