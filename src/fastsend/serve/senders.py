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

from fastsend.delivery.signing import IDENTITY_FIELDS, crlf_lines, header_fields
from fastsend.delivery.signing import identity_domains as sender_domains

__all__ = ["IDENTITY_FIELDS", "header_fields", "header_nul", "sender_domains"]


def header_nul(raw: bytes) -> bool:
    """Whether the header section holds a NUL (RFC 5322 allows none; programs that
    read header fields as C strings stop there, and so read another message)."""
    return b"\0" in crlf_lines(raw).partition(b"\r\n\r\n")[0]
