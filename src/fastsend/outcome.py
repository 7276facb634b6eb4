"""Delivery outcomes and envelopes: the values that cross every boundary.

The SMTP client returns an :class:`Outcome` for every recipient instead of
raising; the engine stores it, the bounce classifier reads it, metrics count
it. msgspec structs: cheap to build, and encodable as they cross the rings.

This module holds data only: no I/O, no policy.
"""

from __future__ import annotations

import re

import msgspec

from fastsend._accel import pick

DELIVERED = "delivered"  # the server took responsibility (2xx after DATA / BDAT LAST)
DEFERRED = "deferred"  # try again later: 4xx, timeout, disconnect, TLS failure, DNS temp error
FAILED = "failed"  # permanent: 5xx, null MX, policy refusal before sending
# The stage of a deferral whose session ended (dropped, timed out, a 421) while the
# DATA command waited for its 354: no octet of the message was sent (RFC 5321
# 4.1.1.4: the server has a message only after its end of data), so it is a plain
# deferral, never an outcome left unknown as after the final dot (stage "data").
DATA_COMMAND = "data-command"


class Outcome(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """The result of one delivery attempt for one recipient.

    ``stage`` says where it was decided: "connect", "greeting", "ehlo",
    "starttls", "auth", "mail", "rcpt", "data", "data-command" (:data:`DATA_COMMAND`),
    "dns", "local", ...
    ``code`` is the SMTP reply code (0 when no reply was received, e.g. on a
    timeout or refused connection); ``enhanced`` the RFC 3463 status ("5.1.1")
    or "" when the server sent none; ``text`` the reply text (lines joined with
    a space) or a description of the local failure.
    """

    kind: str
    code: int = 0
    enhanced: str = ""
    text: str = ""
    stage: str = ""
    mx: str = ""  # the host that answered (or was tried)

    @property
    def delivered(self) -> bool:
        return self.kind == DELIVERED

    @property
    def deferred(self) -> bool:
        return self.kind == DEFERRED

    @property
    def failed(self) -> bool:
        return self.kind == FAILED


class Envelope(msgspec.Struct, gc=False):
    """One SMTP transaction: a sender, one or more recipients, one message.

    ``data`` is the message as it should arrive, CRLF line ends, *not*
    dot-stuffed and without the terminating ``.`` (the client does both); or
    a callable that makes those bytes when the transaction starts (a worker's
    ``fastsend.message.mime.DeferredMessage``; what it returns instead of
    bytes, an Outcome, answers the recipients with nothing sent).
    ``tag`` is opaque to the client and comes back with the result.
    ``smtputf8`` asks for SMTPUTF8 (non-ASCII addresses); ``eightbit`` for
    BODY=8BITMIME. ``dsn_mail`` and ``dsn_rcpt``: the DSN parameters (RFC 3461)
    the message was submitted with, relayed to a server that offers DSN (4.1:
    else left out): " RET=... ENVID=..." for MAIL, " NOTIFY=... ORCPT=..." for
    each RCPT (the envelope's recipients share them), each with its leading
    space, as :func:`dsn_params` checks them.
    """

    mail_from: str
    rcpts: list[str]
    data: bytes
    tag: object = None
    smtputf8: bool = False
    eightbit: bool = False
    dsn_mail: bytes = b""
    dsn_rcpt: bytes = b""


# One DSN parameter as relayed: its keyword and an xtext value (RFC 3461 4: printable
# ASCII but "+" as "+XX" and "="; RET's and NOTIFY's words are such values too).
_DSN_PARAM = re.compile(r"(?:RET|ENVID|NOTIFY|ORCPT)=[!-*,-<>-~]*(?:\+[0-9A-F]{2}[!-*,-<>-~]*)*")


def dsn_params(text: object, keys: tuple[str, ...]) -> bytes:
    """``text`` (space-separated ``KEY=value`` words kept with a message) as the
    bytes to append to its MAIL or RCPT command: only the words of ``keys``
    whose value is well-formed xtext, each once, each after a space; b"" for
    anything else (nothing of a stored value reaches the wire unchecked)."""
    if not isinstance(text, str) or not text or not text.isascii():
        return b""
    out: list[str] = []
    seen: set[str] = set()
    for word in text.split(" "):
        key = word.partition("=")[0]
        if key in keys and key not in seen and _DSN_PARAM.fullmatch(word):
            seen.add(key)
            out.append(" " + word)
    return "".join(out).encode("ascii")


class TxnResult(msgspec.Struct, gc=False):
    """The result of one :class:`Envelope`: one Outcome per recipient, in order."""

    tag: object
    outcomes: list[Outcome]
    queue_id: str = ""  # the server's queue id text, when it gave one
    # The recipients' DSN parameters (NOTIFY, ORCPT) went with their RCPT to a server
    # that offers DSN: it tells the sender what it does itself (RFC 3461 5.2.2,
    # 6.2); ours is no "relayed" notice then (fastsend.serve.dsn).
    dsn: bool = False


def all_delivered(results: list[TxnResult]) -> int:
    """How many outcomes ``results`` hold when every one is a delivery, else -1
    (a pipelined group's usual answer, read by ``Lane.observe`` before it looks
    at any reply; compiled twin in ``_worker.pxi``)."""
    count = 0
    for tr in results:
        for o in tr.outcomes:
            if o.kind != DELIVERED:
                return -1
            count += 1
    return count


py_all_delivered = all_delivered  # the reference (tests compare the twin with it)
all_delivered = pick(all_delivered)
