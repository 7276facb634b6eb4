"""Non-delivery notices for mail taken by SMTP submission (RFC 3464 DSNs).

A server that answered 250 to a message has taken on its delivery; when it
then cannot deliver it (a 5xx, or retries past ``[retry] max_age``), RFC 5321
6.1 has it tell the reverse-path with an "undeliverable mail" notification,
as Postfix's bounce daemon and PowerMTA do. The HTTP API's callers learn it
from their events and webhooks; an SMTP client (an application's relay, a
mail client) only from such a message. Before, a message submitted over SMTP
that bounced or expired was dropped without a word to its sender.

:class:`Notices` is a :attr:`Supervisor.result_hooks` hook: it keeps the final
failures (bounced, expired) of the tenants' transactional campaigns, and
:meth:`Notices.flush` (serve's tick, after the outcome's spool commit)
sends a notice for those whose message came by submission (its vars' ``dsn``
flag: the API's raw messages have none) to their envelope sender, through the
same accept path (``ServeContext.inject`` into the tenant's transactional
campaign: durable, events, the tenant's
suppression) with a null reverse-path (``MAIL FROM:<>``: a notice about a
notice is never sent, RFC 5321 4.5.5). Reply texts come from remote servers:
every field is cut to printable ASCII on one line, never a header.

DELIBERATELY NOT HERE: delay notices (``NOTIFY=DELAY``); a kill -9 in the
moment between a failure's commit and its notice's spooling loses that notice
(the failure itself is in the spool and the event log).
"""

from __future__ import annotations

import base64
import email.utils
import logging
import os
import re
import socket
import time
from typing import Any

import orjson

from fastsend.spool import BOUNCED, EXPIRED
from fastsend.wire import blob_digest

log = logging.getLogger("fastsend.serve")

SETTLE = 0.2  # s a failure waits before its notice (its outcome is committed by then)
FLAG = "dsn"  # the vars key submission sets: notify the envelope sender of a failure
HEADERS_MAX = 32 * 1024  # of the original's header section, returned
TEXT_MAX = 900  # of a diagnostic (a line stays under 998 octets)
KEPT_MAX = 10_000  # failures waiting for a flush (a storm beyond this is not noticed)
_UNSAFE = re.compile(r"[^\x20-\x7e]+")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _clean(text: str, limit: int = TEXT_MAX) -> str:
    """One line of printable ASCII (a remote server's text: no header or part
    can be started with it)."""
    return _UNSAFE.sub(" ", text).strip()[:limit]


def _address(addr: str) -> str:
    """An address as a DSN field names it: ``rfc822; a@b``, or for one not in
    ASCII RFC 6533's ``utf-8`` type with ``\\x{HEX}`` escapes."""
    if addr.isascii():
        return "rfc822; " + _clean(addr, 512)
    return "utf-8; " + "".join(
        c if c.isascii() and c.isprintable() and c != "\\" else f"\\x{{{ord(c):X}}}" for c in addr
    )[:512]


def header_section(raw: bytes) -> bytes:
    """The original message's header section (up to HEADERS_MAX), CRLF lines."""
    end = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n")
    if end < 0 or (0 <= lf < end):
        end = lf
    head = raw if end < 0 else raw[:end]
    head = head[:HEADERS_MAX]
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    return b"\r\n".join(line.rstrip(b"\r") for line in lines) + b"\r\n"


def build(
    reporting: str,
    sender: str,
    rcpt: str,
    status: str,
    diagnostic: str,
    remote: str,
    arrival: float,
    now: float,
    original: bytes,
    expired: bool,
) -> bytes:
    """An RFC 3464 notice to ``sender`` that the message for ``rcpt`` failed."""
    boundary = f"=_fastsend_{base64.b32encode(os.urandom(10)).decode().lower()}"
    host = _clean(reporting, 255) or "localhost"
    diagnostic = _clean(diagnostic)
    date = email.utils.formatdate(now, localtime=False)
    if expired:
        why = "it could not be delivered before its retry time ran out"
    else:
        why = "the receiving server refused it"
    said = f"{_clean(remote, 255)} said: {diagnostic}" if remote and diagnostic else diagnostic
    human = (
        f"This is the mail system at host {host}.\r\n\r\n"
        f"Your message could not be delivered to one of its recipients:"
        f" {why}. It will not be tried again.\r\n\r\n"
        f"<{_clean(rcpt, 512)}>: {said or status}\r\n"
    )
    per_rcpt = [
        f"Final-Recipient: {_address(rcpt)}",
        "Action: failed",
        f"Status: {status}",
    ]
    if remote:
        per_rcpt.append(f"Remote-MTA: dns; {_clean(remote, 255)}")
    if diagnostic:
        per_rcpt.append(f"Diagnostic-Code: smtp; {diagnostic}")
    if expired:
        per_rcpt.append(f"Will-Retry-Until: {date}")  # (passed: no more retries)
    per_rcpt.append(f"Last-Attempt-Date: {date}")
    status_part = (
        f"Reporting-MTA: dns; {host}\r\n"
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}\r\n\r\n"
        + "\r\n".join(per_rcpt)
        + "\r\n"
    )
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"
        f"To: <{sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{base64.b32encode(os.urandom(15)).decode().lower()}@{host}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"\r\n'
        "\r\n"
    )
    eight = not original.isascii()
    parts = [
        head.encode("utf-8"),
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Description: Notification\r\n\r\n{human}\r\n".encode(),
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n"
        f"Content-Description: Delivery report\r\n\r\n{status_part}\r\n".encode(),
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n"
        f"Content-Description: Undelivered Message Headers\r\n"
        f"{'Content-Transfer-Encoding: 8bit' + chr(13) + chr(10) if eight else ''}\r\n".encode(),
        original,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def status_of(code: int, enhanced: str, expired: bool) -> str:
    """The Status field: the reply's enhanced code when it has one (a 4.x.x
    of an expiry kept), else one from the reply code; an expiry without a
    reply: 4.4.7 (RFC 3463, delivery time expired)."""
    if _STATUS.fullmatch(enhanced or ""):
        return enhanced
    if expired:
        return "4.4.7"
    return "5.0.0" if 500 <= code < 600 else "4.0.0" if 400 <= code < 500 else "5.0.0"


class Notices:
    """The failures waiting for a notice; see the module's docstring."""

    def __init__(self, ctx: Any, reporting: str = "") -> None:
        self.ctx = ctx
        self.reporting = reporting or socket.getfqdn()
        self.pending: list[tuple[Any, Any, int, float]] = []
        self.kinds: dict[int, bool] = {}  # campaign -> whether it is transactional
        self.sent = 0
        self.dropped = 0

    def _transactional(self, campaign: int) -> bool:
        known = self.kinds.get(campaign)
        if known is None:
            info = self.ctx.spool.get_campaign(campaign)
            known = info is not None and info.spec.get("kind") == "transactional"
            if len(self.kinds) > 100_000:
                self.kinds.clear()
            self.kinds[campaign] = known
        return known

    def on_result(self, claimed: Any, res: Any, state: int) -> None:
        """A result hook (the supervisor's loop): a final failure of a
        transactional campaign's message is kept for the next flush."""
        if state != BOUNCED and state != EXPIRED:
            return
        if b'"' + FLAG.encode() + b'"' not in claimed.vars and blob_digest(claimed.vars) is None:
            return  # (not submitted over SMTP: it has no flag, and no body blob)
        if not self._transactional(claimed.campaign):
            return
        if len(self.pending) >= KEPT_MAX:
            self.dropped += 1
            return
        self.pending.append((claimed, res, state, time.time()))

    def _vars(self, claimed: Any) -> dict[str, Any] | None:
        raw = claimed.vars
        digest = blob_digest(raw)
        if digest is not None:
            raw = self.ctx.spool.get_blobs([digest]).get(digest)
            if raw is None:
                return None
        out = orjson.loads(raw)
        return out if isinstance(out, dict) else None

    def flush(self, settle: float = SETTLE) -> int:
        """Spool a notice for each failure kept at least ``settle`` s (the
        supervisor commits outcomes within 50 ms) whose message asked for one;
        returns how many were spooled."""
        cut = time.time() - settle
        pending = [p for p in self.pending if p[3] <= cut]
        if not pending:
            return 0
        self.pending = [p for p in self.pending if p[3] > cut]
        n = 0
        outage = self.ctx.spool.outage_errors()
        for k, (claimed, res, state, when) in enumerate(pending):
            try:
                n += self._notice(claimed, res, state, when)
            except outage:  # kept for the next flush (serve's tick says it once)
                self.pending[:0] = pending[k:]
                self.sent += n
                raise
            except Exception:  # a notice must never stop the others (nor the loop)
                log.exception("non-delivery notice for message %s not sent", claimed.id)
        self.sent += n
        return n

    def _notice(self, claimed: Any, res: Any, state: int, when: float) -> int:
        v = self._vars(claimed)
        if v is None or not v.get(FLAG):
            return 0
        sender = v.get("mail_from")
        raw = v.get("raw")
        if not isinstance(sender, str) or not sender or "@" not in sender:
            return 0  # a null reverse-path (a notice itself): never answered
        if not isinstance(raw, str):
            return 0
        expired = state == EXPIRED
        code = int(getattr(res, "code", 0) or 0)
        text = _clean(str(getattr(res, "text", "") or ""))
        enhanced = str(getattr(res, "enhanced", "") or "")
        diagnostic = ""
        if code:
            diagnostic = _clean(f"{code} {enhanced} {text}" if enhanced else f"{code} {text}")
        elif text:
            diagnostic = text
        remote = str(getattr(res, "mx", "") or "")
        remote = remote.rpartition("]")[0].partition("[")[0] or remote.partition(":")[0]
        data = build(
            self.reporting, sender, claimed.rcpt, status_of(code, enhanced, expired),
            diagnostic, remote, claimed.created, when,
            header_section(base64.b64decode(raw)), expired,
        )  # fmt: skip
        from fastsend.address import AddressError, normalize

        try:
            addr, domain = normalize(sender)
        except AddressError:
            return 0
        row = orjson.dumps({"raw": base64.b64encode(data).decode("ascii"), "mail_from": ""})
        tenant = self.ctx.campaign_tenant(claimed.campaign)
        self.ctx.inject(self.ctx.tenant_campaign(tenant, fresh=True), [(addr, domain, row)])
        return 1
