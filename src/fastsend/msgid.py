"""Message ids on the wire: a spool row id plus a short MAC.

Every message fastsend sends carries its id in the Message-ID header and in
the VERP return path (``b-<id>@bounces.example.com``), so that asynchronous
bounces, complaints and tracking hits can be traced back. A bare row id would
let anyone who can send us a bounce name any message (and get its recipient
suppressed); so the id on the wire is ``<row id>-<mac>``, where the MAC is the
first 50 bits of HMAC-SHA256 under a key derived from the installation secret,
written in lower-case base32 (it survives receivers that lower-case local
parts). :func:`parse` gives the row id back only when the MAC verifies.

The installation secret is ``[tracking] secret`` from the config, else the
32 random bytes in ``<spool>/secret.key`` (created once, mode 0600). It never
appears in logs, events or campaign specs.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from typing import Any

from fastsend import durable
from fastsend._accel import pick
from fastsend.config import Config

_MAC_CHARS = 10  # 50 bits


# Lower-case RFC 4648 base32, ten bits (two characters) per entry: the MAC's 50
# bits are five lookups (what base64.b32encode(...).lower()[:10] gives, ~10x
# cheaper: a worker makes one token per message).
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def _key(secret: bytes) -> bytes:
    return hmac.digest(secret, b"fastsend message id v1", "sha256")


@functools.lru_cache(maxsize=16)
def _pads(secret: bytes) -> tuple[Any, Any]:
    """SHA-256 states after the inner and outer padded keys of HMAC (RFC 2104)
    under the id key: a token then costs two state copies and two small hashes,
    not OpenSSL's per-call HMAC set-up (several times dearer)."""
    key = _key(secret).ljust(64, b"\0")  # 32 bytes < SHA-256's 64-byte block
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


def token(row_id: int, secret: bytes) -> str:
    """``"<row id>-<mac>"``; just the row id when there is no secret."""
    if not secret:
        return str(row_id)
    head = str(row_id)
    inner, outer = _pads(secret)
    h = inner.copy()
    h.update(head.encode())
    o = outer.copy()
    o.update(h.digest())  # = HMAC-SHA256(_key(secret), head)
    n = int.from_bytes(o.digest()[:7], "big") >> 6  # its first 50 bits
    p = _B32_PAIRS
    return f"{head}-{p[n >> 40]}{p[(n >> 30) & 1023]}{p[(n >> 20) & 1023]}{p[(n >> 10) & 1023]}{p[n & 1023]}"


# The readable twin, by name (tests run both; the compiled one, in _msgid.pxi,
# hashes with libcrypto directly: a worker makes one token per message).
PURE = {"token": token}
token = pick(token)


def parse(text: str | None, secret: bytes) -> int | None:
    """The row id in a token made by :func:`token`, or None if it does not verify."""
    if not text:
        return None
    head, sep, mac = text.strip().lower().partition("-")
    if not head.isdigit() or len(head) > 18:
        return None
    if not secret:
        return int(head) if not sep else None
    if not sep or len(mac) != _MAC_CHARS:
        return None
    if not hmac.compare_digest(token(int(head), secret), f"{head}-{mac}"):
        return None
    return int(head)


GROUP_SUFFIX = "-g"


def group_token(row_id: int, secret: bytes) -> str:
    """The id of a message shared by several recipients (one transaction, several
    RCPTs): its first row's token and ``-g``. A report about such a message is
    attributed only through the recipient it names (:func:`parse_group`), never
    to that first row by default."""
    return token(row_id, secret) + GROUP_SUFFIX


def parse_group(text: str | None, secret: bytes) -> int | None:
    """The first row id in a token made by :func:`group_token`, or None."""
    if not text:
        return None
    t = text.strip().lower()
    if not t.endswith(GROUP_SUFFIX):
        return None
    return parse(t[: -len(GROUP_SUFFIX)], secret)


# The spool's meta key of its Message-ID label (Spool.meta_once).
TAG_KEY = "msgid_tag"


def new_tag() -> str:
    """A Message-ID label for a new spool: 8 lower-case base32 characters (40
    random bits; a DNS label, as the id's right side is a name under the From
    domain). A token is a row id and its MAC, so two spools under one secret
    (``[tracking] secret``, shared by a fleet of nodes each with its own
    spool, or a fresh spool per campaign) made the same ``<1-MAC@domain>``
    for their first messages: RFC 5322 3.6.4 wants it unique, and a receiver
    that drops a message whose id it holds already (Gmail does) dropped the
    second campaign's mail to the same recipient. The label set apart each
    spool's ids; every node of a shared spool has the same one."""
    n = int.from_bytes(secrets.token_bytes(5), "big")
    return "".join(_B32[(n >> s) & 31] for s in range(35, -1, -5))


def message_id_domain(tag: str, domain: str) -> str:
    """The right side of a Message-ID: the From domain under this spool's label."""
    return f"{tag}.{domain}" if tag and domain else domain


def load_secret(config: Config) -> bytes:
    """``[tracking] secret`` from the config, else ``<spool>/secret.key`` (made once, 0600)."""
    if config.tracking.secret:
        return config.tracking.secret.encode()
    path = os.path.join(config.spool_dir, "secret.key")
    try:
        with open(path, "rb") as f:
            data = f.read().strip()
        if data:
            return data
    except FileNotFoundError:
        pass
    durable.makedirs(config.spool_dir)
    key = secrets.token_hex(32).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # the first writer wins if two start at once
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    # Its name durable before anything is signed with it: a power loss had lost the
    # file, and every link, VERP address and unsubscribe URL signed with it failed.
    durable.fsync_dir(config.spool_dir)
    with open(path, "rb") as f:
        return f.read().strip()
