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

One notice a message, not one a recipient (RFC 3464 2: a DSN holds a group of
per-recipient fields for each recipient it reports on): the rows of one
submitted message share their vars (the raw message and its sender, or the
reference to its blob), so failures are kept by (campaign, vars) and a group
is told once no failure joined it for :data:`SETTLE` s (at most
:data:`GATHER_MAX` s after its first): the recipients refused in one
transaction, or at several domains within seconds, are one notice; a
recipient that fails days later (an expiry) gets one of its own, as Postfix
does.

Crash safety: a failure is written to ``SPOOL/dsn.journal`` (a line, one
``write``) when the hook sees it, and made durable (:meth:`Notices.sync`, a
``before_commit`` hook: one fdatasync) before the outcome's commit; a line names
the failures whose notice is spooled. At start the failures the journal holds
without such a line are taken again, each whose row is final-failed (its
outcome was committed) told as if just seen: a kill -9 between the
failure's commit and its notice's spooling no longer loses the notice. The
reverse window (killed between the notice's spooling and its journal line)
sent that notice twice: each notice now has an id made of its message's rows
and their attempt (:func:`notice_key`), reserved in the spool as an
Idempotency-Key of its own scope (:data:`SCOPE`) and recorded in the
transaction that spools the notice (``IdemMark``, as the API's keys): a
notice taken again whose id has a spooled part is not spooled again.
What the journal holds and this process does not (the spool was out of reach
at start, or a storm went past :data:`KEPT_MAX`) is taken again by a flush
every :data:`OWED_EVERY` s, and the journal is rewritten once nothing is owed:
before, it waited for the next start, and the journal of a node that did not
restart grew with every failure. On a shared spool each line is in Redis too
(``P:dsnj``, with its node; written before the outcome's commit, removed once
told): a node killed and never started again leaves its untold failures to
any live node (:meth:`Notices.dead_failures`, :meth:`Notices.adopt`, serve's
tick); before, they were only in its local directory, and went with it.

DSN parameters (RFC 3461, submission offers DSN): a recipient whose NOTIFY
leaves out FAILURE (``NEVER``) is never told about (its row has no flag); the
message's ENVID is the notice's Original-Envelope-Id and a recipient's ORCPT
its Original-Recipient (both as given, in the rows' vars, cut to printable
ASCII); RET=FULL returns the whole message (message/rfc822) when it is at
most :data:`FULL_MAX` octets (Postfix's bounce_size_limit), else, and without
RET or with RET=HDRS, its header section.

Success and delay notices (RFC 3461 ``NOTIFY=SUCCESS``, ``NOTIFY=DELAY``; before,
taken and nothing sent): a recipient that asked for them has ``notify`` first in
its row's vars (``wire.NOTIFY_HEAD``: such a row is never a blob reference, so the
hook, called for every delivery, tells it by its first bytes). Its delivery is
told as Action ``relayed`` (RFC 3464 2.3.3: handed to the receiving server, which
may tell nothing more itself), Status 2.x.x; a deferral once the message is
``[submission] delay_warning`` s old as ``delayed`` with Will-Retry-Until, once a
recipient (the notice's id names the row, not its attempt). Both go through the
same journal, grouping and ids as failures (a group per message and kind), with
the original's header section whatever RET says (RFC 3461 4.3: RET is about
failures). A delivery whose NOTIFY went on with its RCPT to a server offering DSN
(``wire.Res.dsn``, from ``outcome.TxnResult.dsn``: the SMTP client's own record of
what it sent, carried per message through the worker's Results and Answered) gets
no "relayed" notice: that server tells its "delivered" or "relayed" itself (RFC
3461 5.2.2, 6.2). Before, the sender got both.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import orjson

from fastsend import durable
from fastsend.faults import FAULT, countdown
from fastsend.spool import BOUNCED, EXPIRED, Claimed, IdemMark, storage_problem
from fastsend.spool.base import DEFERRED, DELIVERED, holder_tag
from fastsend.wire import NOTIFY_HEAD, blob_digest

log = logging.getLogger("fastsend.serve")

SETTLE = 1.0  # s a group waits for no more failures (its outcomes are committed by then)
GATHER_MAX = 10.0  # s after a group's first failure it is told whatever still comes
FLAG = "dsn"  # the vars key submission sets: notify the envelope sender of a failure
HEADERS_MAX = 32 * 1024  # of the original's header section, returned
FULL_MAX = 50_000  # octets of an original returned whole (RET=FULL); larger: its headers
TEXT_MAX = 900  # of a diagnostic (a line stays under 998 octets)
KEPT_MAX = 10_000  # failures kept for a flush (beyond: in the journal, taken again later)
OWED_EVERY = 30.0  # s between tries to take again what the journal holds untold
OWED_WAIT = 3600.0  # s a journalled failure whose row is not failed (yet) is waited for
RCPTS_MAX = 1000  # recipients one notice names (the rest: another notice)
JOURNAL = "dsn.journal"
SHARED = "dsnj"  # a shared spool's copy of the journal: hash P:dsnj, message id -> line + node
ADOPT_EVERY = 5.0  # s between two looks at the shared journal for dead nodes' failures
ADOPT_GRACE = 10.0  # s a failure's line must be old before another node takes it
JOURNAL_COMPACT = 1 << 20  # bytes: rewritten with only what is still untold
SCOPE = "dsn:notices"  # the notices' Idempotency-Keys (no tenant is named so: a colon)
ONCE_TTL = 7 * 86400.0  # s a notice's id is kept: a journal is taken again at the next start
_UNSAFE = re.compile(r"[^\x20-\x7e]+")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_FAILED_STATES = {"bounced": BOUNCED, "expired": EXPIRED}
FAILED, RELAYED, DELAYED = "failed", "relayed", "delayed"  # a notice's kind (its Action)
# The row states in which a journalled notice of each other kind is still true.
_KIND_STATES = {RELAYED: {"delivered"}, DELAYED: {"queued", "inflight", "deferred"}}


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


class Failure(NamedTuple):
    """One recipient's final failure, as its notice reports it."""

    rcpt: str
    status: str  # RFC 3463 (status_of)
    diagnostic: str  # the reply, "550 5.1.1 no such user" ("" : none)
    remote: str  # the MX that answered ("" : none)
    expired: bool  # retried past max_age (else refused)
    when: float  # the last attempt


def build(
    reporting: str, sender: str, failures: list[Failure], arrival: float, now: float,
    original: bytes, *, envid: str = "", orcpt: str = "", full: bool = False,
    kind: str = FAILED, retry_until: float = 0.0,
) -> bytes:  # fmt: skip
    """An RFC 3464 notice to ``sender`` that its message failed for each of
    ``failures``' recipients: one per-recipient group each. ``envid``: the
    message's ENVID, ``orcpt``: the recipients' ORCPT (``type;address``),
    decoded (RFC 3461); ``full``: ``original`` is the whole message, else its
    header section. ``kind`` RELAYED: it was handed to their receiving servers
    instead; DELAYED: it is still being tried, until ``retry_until``."""
    if kind != FAILED:
        return _build_other(reporting, sender, failures, arrival, now, original,
                            envid=envid, orcpt=orcpt, kind=kind,
                            retry_until=retry_until)  # fmt: skip
    boundary = f"=_fastsend_{base64.b32encode(os.urandom(10)).decode().lower()}"
    host = _clean(reporting, 255) or "localhost"
    date = email.utils.formatdate(now, localtime=False)
    n = len(failures)
    lines = []
    groups = []
    for f in failures:
        diagnostic = _clean(f.diagnostic)
        remote = _clean(f.remote, 255)
        said = f"{remote} said: {diagnostic}" if remote and diagnostic else diagnostic
        why = "retry time ran out" if f.expired else "refused"
        lines.append(f"<{_clean(f.rcpt, 512)}>: {why}: {said or f.status}\r\n")
        when = email.utils.formatdate(f.when, localtime=False)
        fields = [f"Final-Recipient: {_address(f.rcpt)}", "Action: failed", f"Status: {f.status}"]
        kind, _, addr = orcpt.partition(";")
        if kind and addr:  # (RFC 3464 2.3.1: first in the recipient's group)
            named = (
                f"{_clean(kind, 40)};{_clean(addr, 500)}" if addr.isascii()
                else _address(addr).replace("; ", ";")  # (RFC 6533: utf-8, \x{HEX})
            )  # fmt: skip
            fields.insert(0, f"Original-Recipient: {named}")
        if remote:
            fields.append(f"Remote-MTA: dns; {remote}")
        if diagnostic:
            fields.append(f"Diagnostic-Code: smtp; {diagnostic}")
        if f.expired:
            fields.append(f"Will-Retry-Until: {when}")  # (passed: no more retries)
        fields.append(f"Last-Attempt-Date: {when}")
        groups.append("\r\n".join(fields) + "\r\n")
    expired = [f for f in failures if f.expired]
    if len(expired) == n:
        why = "it could not be delivered before its retry time ran out"
    elif not expired:
        why = "the receiving server refused it"
    else:
        why = "the receiving servers refused it or its retry time ran out"
    whom = "one of its recipients" if n == 1 else f"{n} of its recipients"
    human = (
        f"This is the mail system at host {host}.\r\n\r\n"
        f"Your message could not be delivered to {whom}:"
        f" {why}. It will not be tried again.\r\n\r\n" + "".join(lines)
    )
    env = f"Original-Envelope-Id: {_clean(envid, 100)}\r\n" if _clean(envid, 100) else ""
    status_part = (
        f"{env}Reporting-MTA: dns; {host}\r\n"
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}\r\n\r\n"
        + "\r\n".join(groups)  # (a blank line between recipients' groups, RFC 3464 2.1)
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
        f"--{boundary}\r\nContent-Type: {'message/rfc822' if full else 'text/rfc822-headers'}\r\n"
        f"Content-Description: Undelivered Message{'' if full else ' Headers'}\r\n"
        f"{'Content-Transfer-Encoding: 8bit' + chr(13) + chr(10) if eight else ''}\r\n".encode(),
        original,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def retry_until(arrival: float, max_age: float) -> float:
    """Until when a message that came at ``arrival`` is retried: 0.0 for as long as
    it takes ([retry] max_age 0: no limit, so no date to name)."""
    return arrival + max_age if max_age > 0 else 0.0


def _orcpt_field(orcpt: str) -> str:
    kind, _, addr = orcpt.partition(";")
    if not (kind and addr):
        return ""
    named = (
        f"{_clean(kind, 40)};{_clean(addr, 500)}" if addr.isascii()
        else _address(addr).replace("; ", ";")  # (RFC 6533: utf-8, \x{HEX})
    )  # fmt: skip
    return f"Original-Recipient: {named}"


def _build_other(
    reporting: str, sender: str, reports: list[Failure], arrival: float, now: float,
    headers: bytes, *, envid: str, orcpt: str, kind: str, retry_until: float,
) -> bytes:  # fmt: skip
    """:func:`build`'s RELAYED and DELAYED notices (the original's headers only)."""
    boundary = f"=_fastsend_{base64.b32encode(os.urandom(10)).decode().lower()}"
    host = _clean(reporting, 255) or "localhost"
    until = email.utils.formatdate(retry_until, localtime=False) if retry_until else ""
    lines, groups = [], []
    for f in reports:
        diagnostic = _clean(f.diagnostic)
        remote = _clean(f.remote, 255)
        said = f"{remote} said: {diagnostic}" if remote and diagnostic else diagnostic
        lines.append(f"<{_clean(f.rcpt, 512)}>: {said or f.status}\r\n")
        fields = [f"Final-Recipient: {_address(f.rcpt)}", f"Action: {kind}",
                  f"Status: {f.status}"]  # fmt: skip
        named = _orcpt_field(orcpt)
        if named:  # (RFC 3464 2.3.1: first in the recipient's group)
            fields.insert(0, named)
        if remote:
            fields.append(f"Remote-MTA: dns; {remote}")
        if diagnostic:
            fields.append(f"Diagnostic-Code: smtp; {diagnostic}")
        fields.append(f"Last-Attempt-Date: {email.utils.formatdate(f.when, localtime=False)}")
        if kind == DELAYED and until:
            fields.append(f"Will-Retry-Until: {until}")
        groups.append("\r\n".join(fields) + "\r\n")
    n = len(reports)
    whom = "its recipient" if n == 1 else f"{n} of its recipients"
    if kind == RELAYED:
        subject = "Successful Mail Delivery Report"
        text = (f"Your message was delivered to the receiving server of {whom},\r\n"
                "as you asked to be told. That server may send no notice of its own\r\n"
                "of what it does with it.")  # fmt: skip
    else:
        subject = "Delayed Mail (still being retried)"
        text = (f"Your message could not be delivered to {whom} yet.\r\n"
                f"It is being tried again{' until ' + until if until else ''}.\r\n"
                "Nothing needs to be done on your part.")  # fmt: skip
    human = (f"This is the mail system at host {host}.\r\n\r\n{text}\r\n\r\n"
             + "".join(lines))  # fmt: skip
    env = f"Original-Envelope-Id: {_clean(envid, 100)}\r\n" if _clean(envid, 100) else ""
    status_part = (
        f"{env}Reporting-MTA: dns; {host}\r\n"
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}\r\n\r\n"
        + "\r\n".join(groups)
    )
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.formatdate(now, localtime=False)}\r\n"
        f"Message-ID: <{base64.b32encode(os.urandom(15)).decode().lower()}@{host}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"\r\n'
        "\r\n"
    )
    eight = not headers.isascii()
    return b"".join([
        head.encode("utf-8"),
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Description: Notification\r\n\r\n{human}\r\n".encode(),
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n"
        f"Content-Description: Delivery report\r\n\r\n{status_part}\r\n".encode(),
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n"
        f"Content-Description: Message Headers\r\n"
        f"{'Content-Transfer-Encoding: 8bit' + chr(13) + chr(10) if eight else ''}\r\n".encode(),
        headers,
        f"\r\n--{boundary}--\r\n".encode(),
    ])  # fmt: skip


def status_of(code: int, enhanced: str, expired: bool) -> str:
    """The Status field: the reply's enhanced code when it has one (a 4.x.x
    of an expiry kept), else one from the reply code; an expiry without a
    reply: 4.4.7 (RFC 3463, delivery time expired)."""
    if _STATUS.fullmatch(enhanced or ""):
        return enhanced
    if expired:
        return "4.4.7"
    if 200 <= code < 300:  # (a delivery's, for a relayed notice)
        return "2.0.0"
    return "5.0.0" if 500 <= code < 600 else "4.0.0" if 400 <= code < 500 else "5.0.0"


def failure_of(rcpt: str, code: int, enhanced: str, text: str, mx: str, expired: bool,
               when: float) -> Failure:  # fmt: skip
    """A recipient's :class:`Failure` from the reply its last attempt got."""
    text = _clean(text)
    diagnostic = ""
    if code:
        diagnostic = _clean(f"{code} {enhanced} {text}" if enhanced else f"{code} {text}")
    elif text:
        diagnostic = text
    remote = mx.rpartition("]")[0].partition("[")[0] or mx.partition(":")[0]
    return Failure(rcpt, status_of(code, enhanced, expired), diagnostic, remote, expired, when)


def notice_key(campaign: int, ids: list[int], attempts: list[int], kind: str = FAILED) -> str:
    """The id of the notice telling the failures of rows ``ids`` (one message's)
    at their ``attempts``: the same whenever the same failures are told again (a
    journal taken again after a kill), another for a row failing anew (retried
    by the operator). A DELAYED notice's names the rows alone: one a recipient,
    whatever number of deferrals come after its delay_warning."""
    if kind == DELAYED:
        attempts = [0] * len(ids)
    rows = ",".join(f"{i}.{n}" for i, n in sorted(zip(ids, attempts, strict=True)))
    tag = "" if kind == FAILED else f"{kind}:"
    return hashlib.sha256(f"{tag}{campaign}:{rows}".encode()).hexdigest()[:40]


def _line(mid: int, f: Failure, at: float, attempt: int, kind: str) -> dict[str, Any]:
    """A journal line: a failure (or a notice of another kind, ``k``) to tell."""
    line = {"id": mid, "f": list(f), "at": at, "n": attempt}
    if kind != FAILED:
        line["k"] = kind
    return line


class _Group:
    """The failures of one message (its rows share their vars) waiting for a notice."""

    __slots__ = ("attempts", "claimed", "failures", "first", "ids", "kind", "last")

    def __init__(self, claimed: Any, now: float, kind: str = FAILED) -> None:
        self.kind = kind  # FAILED, RELAYED or DELAYED: what the notice tells
        self.claimed = claimed  # (one of them: campaign, vars and arrival are the message's)
        self.failures: list[Failure] = []
        self.ids: list[int] = []
        self.attempts: list[int] = []  # each row's attempt that failed (the notice's id)
        self.first = self.last = now


class Notices:
    """The failures waiting for a notice; see the module's docstring."""

    def __init__(self, ctx: Any, reporting: str = "", journal: str | None = None) -> None:
        self.ctx = ctx
        self.reporting = reporting or socket.getfqdn()
        self.pending: dict[tuple[int, bytes, str], _Group] = {}
        self.kept = 0  # failures in pending
        self.kinds: dict[int, bool] = {}  # campaign -> whether it is transactional
        self.sent = 0
        self.dropped = 0
        if journal is None:
            journal = os.path.join(ctx.config.spool_dir, JOURNAL)
        self.journal_path = journal
        self._fd = -1
        self._size = 0
        self._unsynced = False  # lines written since the last sync()
        # The journal holds failures not kept here: taken again by a flush (every
        # OWED_EVERY s), and until then never rewritten (it would lose them).
        self._owed = False
        self._owed_tried = 0.0
        self._full = False  # the last notice found the event log's disk full (said once)
        # A shared spool: each journal line in Redis too (P:dsnj, with this node's
        # name), written by sync() before the outcome's commit, removed once told:
        # a node dead for good leaves its untold failures to the others
        # (dead_failures / adopt, serve's tick). Before, they were only in its
        # local directory: a node never started again took them with it.
        shared = getattr(ctx.spool, "shared", None)
        self.shared: Any = shared() if shared is not None else None
        self._to_share: dict[int, bytes] = {}
        self._share_failed = False
        self.adopted = 0.0  # monotonic time of the last dead_failures look
        if journal:
            self._reopen()

    # -- the journal ------------------------------------------------------------

    def _reopen(self) -> None:
        """Take again what the journal holds untold (a killed run's), then keep
        appending to it."""
        path = self.journal_path
        try:
            self._fd = durable.open_append(path)  # (a new journal's name made durable)
            self._size = os.fstat(self._fd).st_size
        except OSError as e:
            log.error("non-delivery notices: %s cannot be written (%s): a kill between a"
                      " failure and its notice loses the notice", path, e)  # fmt: skip
            self._fd = -1
        self._owed = True
        self._take_owed(start=True)

    def _untold(self) -> dict[int, dict[str, Any]]:
        """The journal's failures that no line names told, by message id."""
        path = self.journal_path
        untold: dict[int, dict[str, Any]] = {}
        try:
            with open(path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # (cut short by the kill: its failure was not committed)
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(rec, dict):
                        continue
                    done = rec.get("done")
                    if isinstance(done, list):
                        for i in done:
                            untold.pop(i, None)
                    elif isinstance(rec.get("id"), int):
                        untold[rec["id"]] = rec
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("non-delivery notices: %s cannot be read (%s)", path, e)
        return untold

    def _take_owed(self, start: bool) -> None:
        """Keep again the failures the journal holds untold and this process does
        not (``start``: a killed run's; later: those the spool was out of reach
        for at start, or beyond :data:`KEPT_MAX`), then rewrite the journal with
        only what waits once nothing more is owed. Before, what the start could
        not take (the spool out of reach) waited for the next start, and the
        journal was never rewritten meanwhile: a node that did not restart never
        told those notices, and its journal grew with every failure."""
        self._owed_tried = time.monotonic()
        untold = self._untold()
        have = {i for g in self.pending.values() for i in g.ids}
        taken = 0
        owed = False
        now = time.time()
        for rec in untold.values():
            if rec["id"] in have:
                continue
            if self.kept >= KEPT_MAX:
                owed = True  # (the next pass, once these are told)
                break
            try:
                got = self._retake(rec)
            except self.ctx.spool.outage_errors() as e:  # kept in the journal: the next pass
                log.error("non-delivery notices: the spool is out of reach (%s): %d failure(s)"
                          " left untold wait (tried again every %.0f s)", e, len(untold),
                          OWED_EVERY)  # fmt: skip
                owed = True
                break
            except Exception:  # one bad line must not stop the others (nor serve)
                log.exception("non-delivery notice for message %s not taken again", rec["id"])
                continue
            if got > 0:
                taken += 1
            elif got < 0 and not start and float(rec.get("at", 0) or 0) > now - OWED_WAIT:
                owed = True  # (this run's: its outcome's commit may still come)
        self._owed = owed
        if not owed:
            self._compact()  # (the taken ones only: what was told is forgotten)
        if taken:
            log.warning("non-delivery notices: %d failure(s) %s without spooling their"
                        " notice are told now", taken,
                        "the last run recorded" if start else "the journal held")  # fmt: skip

    @property
    def owed(self) -> bool:
        """The journal holds failures not kept here (a flush takes them again)."""
        return self._owed

    def _retake(self, rec: dict[str, Any]) -> int:
        """A journal's untold failure, kept again when its row says it failed: 1;
        0 when its row is gone; -1 when its row is not failed (the outcome was
        never committed: it is tried again, told then; or not yet)."""
        m = self.ctx.spool.message(rec["id"])
        if m is None:
            return 0
        kind = rec.get("k", FAILED)
        if kind != FAILED:  # (no longer true: delivered since a delay, or not committed)
            if kind not in _KIND_STATES or m.get("state", "") not in _KIND_STATES[kind]:
                return 0
        elif _FAILED_STATES.get(m.get("state", "")) is None:
            return -1
        vars_ = orjson.dumps(m["vars"])
        claimed = Claimed(m["id"], m["campaign"], m["rcpt"], m.get("domain", ""), vars_,
                          int(m.get("attempts", 0)), float(m.get("created", 0.0)))  # fmt: skip
        f = Failure(*rec["f"])
        n = rec.get("n")  # (a journal of before the notices' ids: the row's count)
        attempt = n if isinstance(n, int) else int(m.get("attempts", 0))
        self._keep(claimed, f, float(rec.get("at", f.when)), attempt, write=False, kind=kind)
        return 1

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, data)
            self._size += len(data)
            self._unsynced = True
        except OSError as e:  # (a full disk): the notice is still sent, not crash-safe
            log.error("non-delivery notices: %s cannot be written (%s)", self.journal_path, e)

    def sync(self) -> None:
        """A :attr:`Supervisor.before_commit` hook: the failures written since the
        last call made durable before the outcomes that made them are committed.
        Before, a line was only written: a power loss (or a kernel crash) after
        the outcome's commit reached the disk could leave a bounced row whose
        journal line never did, and its notice was never sent. One fsync per
        commit of outcomes that had a failure to note, none otherwise."""
        if self._to_share:
            self._push_shared()
        if not self._unsynced or self._fd < 0:
            return
        self._unsynced = False
        try:
            os.fdatasync(self._fd)
        except OSError as e:  # the notices are still sent, not power-loss safe
            log.error("non-delivery notices: %s cannot be synced (%s)", self.journal_path, e)

    def _compact(self) -> None:
        """The journal rewritten with only the failures still waiting (empty when
        none is): it holds what a kill would leave untold, not the history."""
        if self._fd < 0:
            return
        keep = b"".join(
            orjson.dumps(_line(i, f, g.first, n, g.kind)) + b"\n"
            for g in self.pending.values()
            for i, f, n in zip(g.ids, g.failures, g.attempts, strict=True)
        )
        try:
            # Durably (fsynced, renamed, the directory fsynced): a power loss after
            # the rename had left an empty journal, the waiting failures' lines lost.
            durable.replace(keep, self.journal_path)
        except OSError as e:
            log.error("non-delivery notices: %s cannot be rewritten (%s)", self.journal_path, e)
        try:  # (renamed, even if its directory's sync failed: append to the new one)
            if os.stat(self.journal_path).st_ino != os.fstat(self._fd).st_ino:
                fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
                os.close(self._fd)
                self._fd = fd
                self._size = len(keep)
                self._unsynced = False
        except OSError as e:
            log.error("non-delivery notices: %s cannot be reopened (%s)", self.journal_path, e)

    # -- failures in --------------------------------------------------------------

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
        """A result hook (the supervisor's loop, before the outcome's commit): a
        final failure of a transactional campaign's message is journalled and
        kept for a flush; so are a delivery and a late deferral of a recipient
        that asked to be told of them (NOTIFY=SUCCESS, DELAY)."""
        if state != BOUNCED and state != EXPIRED:
            if claimed.vars.startswith(NOTIFY_HEAD) and state in (DELIVERED, DEFERRED):
                self._asked(claimed, res, state)
            return
        if b'"' + FLAG.encode() + b'"' not in claimed.vars and blob_digest(claimed.vars) is None:
            return  # (not submitted over SMTP: it has no flag, and no body blob)
        if not self._transactional(claimed.campaign):
            return
        now = time.time()
        f = failure_of(claimed.rcpt, int(getattr(res, "code", 0) or 0),
                       str(getattr(res, "enhanced", "") or ""), str(getattr(res, "text", "") or ""),
                       str(getattr(res, "mx", "") or ""), state == EXPIRED, now)  # fmt: skip
        attempt = int(claimed.attempts) + 1
        if self.kept >= KEPT_MAX and self._fd >= 0:
            # A storm: journalled only, taken again once those kept are told.
            self.dropped += 1
            self._owed = True
            line = {"id": claimed.id, "f": list(f), "at": now, "n": attempt}
            self._write(orjson.dumps(line) + b"\n")
            self._share(line)
            return
        if self.kept >= KEPT_MAX:  # (no journal: not noticed)
            self.dropped += 1
            return
        self._keep(claimed, f, now, attempt, write=True)

    def _asked(self, claimed: Any, res: Any, state: int) -> None:
        """A delivery (NOTIFY=SUCCESS) or deferral (NOTIFY=DELAY, once the message is
        ``delay_warning`` s old) of a recipient that asked to be told of it."""
        vars_ = claimed.vars
        start = len(NOTIFY_HEAD)
        words = vars_[start : vars_.find(b'"', start)].split(b",")
        now = time.time()
        if state == DELIVERED:
            if b"SUCCESS" not in words or getattr(res, "dsn", False):
                return  # (not asked; or asked of the receiver, which tells it: no "relayed")
            kind = RELAYED
        else:
            wait = float(getattr(getattr(self.ctx.config, "submission", None),
                                 "delay_warning", 0.0) or 0.0)  # fmt: skip
            if b"DELAY" not in words or not wait or now - float(claimed.created) < wait:
                return
            kind = DELAYED
        if not self._transactional(claimed.campaign) or self.kept >= KEPT_MAX:
            if self.kept >= KEPT_MAX:
                self.dropped += 1  # (not a failure: no journal line owed for it)
            return
        f = failure_of(claimed.rcpt, int(getattr(res, "code", 0) or 0),
                       str(getattr(res, "enhanced", "") or ""), str(getattr(res, "text", "") or ""),
                       str(getattr(res, "mx", "") or ""), False, now)  # fmt: skip
        if kind == DELAYED and not f.status.startswith("4."):
            f = f._replace(status="4.0.0")  # (a connection that failed: no reply)
        self._keep(claimed, f, now, int(claimed.attempts) + 1, write=True, kind=kind)

    def _keep(self, claimed: Any, f: Failure, now: float, attempt: int, write: bool,
              kind: str = FAILED) -> None:  # fmt: skip
        key = (claimed.campaign, claimed.vars, kind)
        g = self.pending.get(key)
        if g is None:
            g = self.pending[key] = _Group(claimed, now, kind)
        elif claimed.id in g.ids:
            return  # (told again: an outcome recorded twice is one failure, one notice)
        g.failures.append(f)
        g.ids.append(claimed.id)
        g.attempts.append(attempt)
        g.last = max(g.last, now)
        self.kept += 1
        if write:
            line = _line(claimed.id, f, now, attempt, kind)
            self._write(orjson.dumps(line) + b"\n")
            self._share(line)

    def _share(self, line: dict[str, Any]) -> None:
        if self.shared is not None:
            self._to_share[int(line["id"])] = orjson.dumps({**line, "node": self.shared.node})

    def _push_shared(self) -> None:
        """The lines noted since the last push into the shared journal (P:dsnj);
        a failure keeps them for the next (the local journal holds them)."""
        batch, sh = self._to_share, self.shared
        try:
            sh.client.hset(sh.key(SHARED), mapping={str(i): v for i, v in batch.items()})
        except Exception as e:
            if not self._share_failed:
                log.warning("non-delivery notices: the shared journal cannot be written (%s):"
                            " kept in this node's own until it can", e)  # fmt: skip
            self._share_failed = True
            return
        self._share_failed = False
        self._to_share = {}

    def _unshare(self, ids: list[int]) -> None:
        """Told: out of the shared journal (left there: taken again by a live node
        once this one is dead, its notice id found spooled: a no-op)."""
        if self.shared is None:
            return
        for i in ids:
            self._to_share.pop(i, None)
        try:  # (only lines still naming this node: one another node took since is its own)
            self.shared.drop_mine(self.shared.key(SHARED), map(str, ids))
        except Exception as e:
            log.warning("non-delivery notices: %d told failure(s) left in the shared"
                        " journal (%s)", len(ids), e)  # fmt: skip

    def dead_failures(self, live: Callable[[], Collection[str]]) -> list[dict[str, Any]]:
        """The shared journal's failures noted by nodes not ``live()`` (dead for
        ``STATUS_STALE`` s: killed, never started again), ``ADOPT_GRACE`` s old;
        none when looked at less than ``ADOPT_EVERY`` s ago. Redis only: a thread
        may call it (serve's tick); :meth:`adopt` takes them on the loop."""
        sh = self.shared
        mono = time.monotonic()
        if sh is None or mono - self.adopted < ADOPT_EVERY:
            return []
        self.adopted = mono
        lines = sh.client.hgetall(sh.key(SHARED))
        if not lines:
            return []
        alive = set(live())
        out: list[dict[str, Any]] = []
        now = time.time()
        for field, raw in lines.items():
            try:
                rec = orjson.loads(raw)
                node, at = str(rec["node"]), float(rec["at"])
                int(rec["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if at < now - ONCE_TTL / 2:  # (a line left by a failed removal: its notice
                sh.client.hdel(sh.key(SHARED), str(rec["id"]))  # id may be forgotten)
            elif (
                node != sh.node
                and node not in alive
                and at <= now - ADOPT_GRACE
                # Taken only if still as read (the line names this node from now
                # on): two live nodes reading it both took it, each its notice's
                # sender, each rewriting the line as its own.
                and sh.take(sh.key(SHARED), field, raw, orjson.dumps({**rec, "node": sh.node}))
            ):
                out.append({**rec, "node": sh.node})  # (as taken: adopt checks it still is)
        if out and FAULT == "dsn-stop-after-take":  # tests: this node stalls, others go on
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(0.5)  # (the stop reaches this thread a moment later)
        return out

    def adopt(self, recs: list[dict[str, Any]]) -> int:
        """Take :meth:`dead_failures`'s failures as this node's (kept for a flush,
        the shared lines now naming this node: no other takes them while it
        lives); how many. Raises the spool's outage errors.

        Each only while its line is still as taken (fenced, ``SharedStore.mine``):
        a node that took a line, then stalled (a pause, a swap storm, a SIGSTOP)
        while its status lapsed had another node take the line and tell it; it
        then went on, wrote the line back as its own over the other's (or after
        the other had told it and removed it) and told it too (its notice id
        found spooled: none sent, but the line rewritten and the failure counted
        as adopted twice)."""
        have = {i for g in self.pending.values() for i in g.ids}
        gone: list[int] = []
        taken = 0
        sh = self.shared
        for rec in recs:
            i = int(rec["id"])
            if i in have:
                continue
            if sh is not None and not sh.mine(sh.key(SHARED), str(i), orjson.dumps(rec)):
                log.warning("non-delivery notices: the failure of message %d a dead node left"
                            " untold is being told by another node", i)  # fmt: skip
                continue
            got = self._retake(rec)
            if got > 0:
                taken += 1  # (its line names this node already: dead_failures took it)
            else:  # its row gone, or not failed (its outcome never committed: tried again)
                gone.append(i)
        if self._to_share:
            self._push_shared()
        if gone:
            self._unshare(gone)
        if taken:
            log.warning("non-delivery notices: %d failure(s) a dead node left untold are"
                        " told by this one", taken)  # fmt: skip
        return taken

    # -- notices out --------------------------------------------------------------

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
        """Spool a notice for each message whose last failure was kept at least
        ``settle`` s ago (or its first :data:`GATHER_MAX` s ago; the supervisor
        commits outcomes within 50 ms) and which asked for one; returns how many
        were spooled."""
        if self._owed and time.monotonic() - self._owed_tried >= OWED_EVERY:
            self._take_owed(start=False)
        now = time.time()
        ready = [k for k, g in self.pending.items()
                 if g.last <= now - settle or g.first <= now - GATHER_MAX]  # fmt: skip
        if not ready:
            return 0
        n = 0
        told: list[int] = []
        outage = self.ctx.spool.outage_errors()
        try:
            for key in ready:
                g = self.pending[key]
                try:
                    n += self._notice(g)
                    if FAULT:  # tests: dsn-kill-after-notice:N, before its journal line
                        countdown({"dsn-kill-after-notice": signal.SIGKILL})
                except outage:  # kept for the next flush (serve's tick says it once)
                    raise
                except OSError as e:
                    if storage_problem(e) is None:
                        log.exception("non-delivery notice for message %s not sent",
                                      g.claimed.id)  # fmt: skip
                    else:  # the event log's disk is full (nothing spooled): kept
                        if not self._full:
                            log.error("non-delivery notices: the event log cannot be written"
                                      " (%s): %d notice(s) wait", e, len(self.pending))  # fmt: skip
                        self._full = True
                        break
                except Exception:  # a notice must never stop the others (nor the loop)
                    log.exception("non-delivery notice for message %s not sent", g.claimed.id)
                else:
                    self._full = False
                del self.pending[key]
                self.kept -= len(g.ids)
                told += g.ids
        finally:
            self.sent += n
            if told:
                self._unshare(told)
                if not self._owed and (not self.pending or self._size > JOURNAL_COMPACT):
                    self._compact()  # (nothing waits: the journal is emptied)
                else:
                    self._write(orjson.dumps({"done": told}) + b"\n")
        return n

    def _notice(self, g: _Group) -> int:
        claimed = g.claimed
        v = self._vars(claimed)
        if v is None or (g.kind == FAILED and not v.get(FLAG)):
            return 0
        sender = v.get("mail_from")
        raw = v.get("raw")
        if not isinstance(sender, str) or not sender or "@" not in sender:
            return 0  # a null reverse-path (a notice itself): never answered
        if not isinstance(raw, str):
            return 0
        from fastsend.address import AddressError, normalize

        try:
            addr, domain = normalize(sender)
        except AddressError:
            return 0
        mark = self._reserve(notice_key(claimed.campaign, g.ids, g.attempts, g.kind))
        if mark is None:
            return 0  # spooled before (a kill came before its journal line)
        whole = base64.b64decode(raw)
        # (RFC 3461 4.3: RET=FULL asks the whole message back in a failure's notice)
        full = g.kind == FAILED and v.get("ret") == "full" and len(whole) <= FULL_MAX
        original = whole if full else header_section(whole)
        envid = str(v.get("envid") or "")
        orcpt = str(v.get("orcpt") or "")
        tenant = self.ctx.campaign_tenant(claimed.campaign)
        failures = sorted(g.failures, key=lambda f: f.when)
        rows = []
        for i in range(0, len(failures), RCPTS_MAX):
            part = failures[i : i + RCPTS_MAX]
            data = build(self.reporting, sender, part, claimed.created, part[-1].when, original,
                         envid=envid, orcpt=orcpt, full=full, kind=g.kind,
                         retry_until=retry_until(claimed.created, self._max_age()))  # fmt: skip
            row = orjson.dumps({"raw": base64.b64encode(data).decode("ascii"), "mail_from": ""})
            rows.append((addr, domain, row))
        self.ctx.inject(self.ctx.tenant_campaign(tenant, fresh=True), rows, idem=mark)
        self.ctx.spool.idem_finish(SCOPE, mark.key, mark.holder, 250, b"")
        return len(rows)

    def _max_age(self) -> float:
        retry = getattr(self.ctx.config, "retry", None)
        return float(getattr(retry, "max_age", 0.0) or 0.0)

    def _reserve(self, key: str) -> IdemMark | None:
        """The notice id ``key`` reserved for this process (its rows are spooled
        with the returned mark, recorded with them in one transaction), or None
        when a notice of that id was spooled already. A reservation of a process
        that died before spooling is taken over (the mark's part check lets one
        spool only, whoever else tries)."""
        spool = self.ctx.spool
        now = time.time()
        holder = orjson.dumps(holder_tag())
        rec = spool.idem_begin(SCOPE, key, "", now, ONCE_TTL, holder)
        if rec is not None and rec.holder != holder:
            if rec.parts or not rec.running:
                return None
            rec = spool.idem_begin(SCOPE, key, "", now, ONCE_TTL, holder, stale=rec.holder)
            if rec is not None and (rec.holder != holder or rec.parts):
                return None
        return IdemMark(SCOPE, key, holder, 0)
