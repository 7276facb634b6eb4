"""VERP bounce addresses: the return path encodes the message id.

``encode("01HXYZ", "bounces.example.com")`` -> ``"b-01HXYZ@bounces.example.com"``;
``decode`` gives the id back from a bounce's recipient address, so an
asynchronous bounce (a DSN arriving hours later) can be traced to its message.

Characters outside ``[A-Za-z0-9_-]`` in an id are written ``=HH`` (upper-case
hex of each UTF-8 octet), so any id gives a valid dot-atom local part. Ids made
of lower-case letters, digits, ``_`` and ``-`` also survive receivers that
lower-case local parts. It does not sign or encrypt the id (no BATV).
"""

from __future__ import annotations

import re

__all__ = ["VerpError", "decode", "encode", "encode_id"]

_PLAIN = re.compile(r"[A-Za-z0-9_\-]")
_ALL_PLAIN = re.compile(r"[A-Za-z0-9_\-]+")
_HEX = re.compile(r"=([0-9A-Fa-f]{2})")


class VerpError(ValueError):
    """An id that cannot be encoded, or an address that is not a VERP address."""


def encode_id(message_id: str) -> str:
    """``message_id`` with every octet outside ``[A-Za-z0-9_-]`` written as ``=HH``."""
    if not message_id:
        raise VerpError("empty message id")
    if _ALL_PLAIN.fullmatch(message_id):  # (fastsend's tokens: one match, not one a character)
        return message_id
    out: list[str] = []
    for ch in message_id:
        if _PLAIN.match(ch):
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_id(text: str) -> str:
    """Inverse of :func:`encode_id`."""
    try:
        return _HEX.sub(lambda m: chr(int(m.group(1), 16)), text).encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise VerpError(f"bad encoded id {text!r}") from None


def encode(message_id: str, domain: str, prefix: str = "b") -> str:
    """The bounce address ``<prefix>-<encoded id>@<domain>`` (local part <= 64 octets)."""
    local = f"{prefix}-{encode_id(message_id)}"
    if len(local) > 64:
        raise VerpError(f"VERP local part longer than 64 octets for id {message_id!r}")
    if not domain or "@" in domain:
        raise VerpError(f"bad VERP domain {domain!r}")
    return f"{local}@{domain}"


def decode(address: str, prefix: str = "b") -> str:
    """The message id in a VERP address (VerpError if it is not one of ours)."""
    addr = address.strip().strip("<>")
    local, sep, _domain = addr.rpartition("@")
    head = prefix + "-"
    if not sep or not local.lower().startswith(head.lower()) or len(local) == len(head):
        raise VerpError(f"not a VERP address with prefix {prefix!r}: {address!r}")
    return decode_id(local[len(head) :])
