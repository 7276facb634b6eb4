"""The sans-I/O SMTP client: bytes in, events out, commands return bytes.

Everything that affects the client's state machine lives in this file, as in
h11: the transport only moves bytes and starts TLS when told to.

Usage (the transport does exactly this)::

    c = SMTPClient(helo_name="out1.example.com", mx="10.0.0.1:25")
    events = c.receive_data(data)      # CommandDone / TxnResult values
    wire = c.data_to_send()            # reactions (body after 354, HELO, ...)
    wire = c.send_ehlo()               # commands return the bytes to write
    wire = c.send_envelopes(envs)      # pipelined transactions
    events = c.events()                # results decided without the server

What it does: greeting, EHLO with a HELO fallback, capabilities, STARTTLS
(the caller performs the handshake and calls :meth:`tls_established`), AUTH
PLAIN and LOGIN, MAIL/RCPT/DATA with several recipients per transaction,
RSET, QUIT. With PIPELINING (RFC 2920) each transaction's MAIL, RCPTs and
DATA go out in one write, and a message's body goes out in the same write as
the next transaction's MAIL; replies are matched to commands in order, so one
refused recipient does not fail the others. Without PIPELINING, one command
at a time. Every recipient gets an :class:`~fastsend.outcome.Outcome`.

What it does not do: sockets, timers, TLS, DNS, retries or policy. Garbage
from the server raises :class:`RemoteProtocolError` (the transport turns it
into deferred outcomes via :meth:`connection_lost`); misuse by the caller
raises :class:`LocalProtocolError`.

DATA or BDAT: with PIPELINING alone, DATA must wait for its 354, so each
message costs one round trip per connection (many connections hide it on
loopback; Postfix's smtp-sink offers no CHUNKING, so DATA is what the
throughput bench measures). When the server offers CHUNKING as well (RFC 3030),
whole transactions (MAIL, RCPTs, ``BDAT <n> LAST`` + message) stream without
waiting for any reply, up to ``BDAT_WINDOW`` per connection: a batch costs one
round trip, which matters over real-world latency. ``chunking=False`` forces
DATA. A BDAT transaction may fail (every recipient refused, the chunk
refused) with the next one already on the wire, and the server then still
holds the failed transaction (RFC 3030 section 2: the client must RSET): so
a transaction streamed behind another, or after a failed one, starts with
RSET (a no-op after a successful ``BDAT LAST``). A 503 (bad sequence) is
deferred, never failed: it says nothing about the address. A recipient
refused at RCPT keeps that outcome whatever happens to the session later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from fastsend._accel import pick
from fastsend.outcome import (
    DATA_COMMAND,
    DEFERRED,
    DELIVERED,
    FAILED,
    Envelope,
    Outcome,
    TxnResult,
)
from fastsend.smtp.errors import LocalProtocolError, RemoteProtocolError
from fastsend.smtp.replies import Reply, ReplyParser, dot_stuff, queue_id

# Client states.
GREETING = "greeting"  # waiting for the server's 220
GREETED = "greeted"  # greeting (or TLS) done; EHLO is next
EHLO = "ehlo"  # EHLO or HELO sent
READY = "ready"  # may send transactions, STARTTLS, AUTH, RSET, QUIT
STARTTLS = "starttls"  # STARTTLS sent, waiting for 220
TLS = "tls"  # 220 to STARTTLS received: the caller must start TLS now
AUTH = "auth"  # an AUTH exchange is running
QUIT = "quit"  # QUIT sent
CLOSED = "closed"  # the connection is gone (or the server said 421)

# Kinds of commands waiting for a reply.
_MAIL, _RCPT, _DATA, _DOT, _RSET, _CMD, _BDAT = range(7)
_STAGE = {_MAIL: "mail", _RCPT: "rcpt", _DATA: "data", _DOT: "data", _RSET: "rset", _BDAT: "data"}

_RCPT_DATA = b">\r\nDATA\r\n"  # the end of a one-recipient group

# With CHUNKING, whole transactions stream without waiting for any reply; at
# most this many, and (beyond the first) this many message bytes, are in
# flight per connection: bounds the write buffer whatever the message sizes.
BDAT_WINDOW = 32
BDAT_WINDOW_BYTES = 1 << 20

# Addresses: no C0 controls, DEL, space or angle brackets. CR/LF/NUL in
# particular would let a recipient inject commands into the session. (HELO
# names are held to it as it is; an address may have spaces in a quoted
# local part: _bad_address.)
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")
_BAD_ADDRESS_CHAR = re.compile(r"[\x00-\x1f\x7f<>]")


def _bad_address(address: str) -> bool:
    """Whether ``address`` cannot go in a MAIL FROM or RCPT TO path: a C0
    control, DEL or angle bracket anywhere, or a space outside a quoted local
    part. ``"john doe"@example.com`` is a valid RFC 5321 Quoted-string that
    every accept path takes (fastsend.address): refused here, it bounced
    5.1.3 without an attempt and its address was suppressed as unknown."""
    if _BAD_ADDRESS_CHAR.search(address) is not None:
        return True
    if " " not in address:
        return False
    end = address.rfind('"@')  # the end of the quoted local part
    return not address.startswith('"') or end < address.rfind(" ")


class CommandDone(NamedTuple):
    """The reply to a session command (not a transaction).

    ``command`` is one of "greeting", "ehlo", "helo", "starttls", "auth",
    "rset", "noop", "quit" or "unsolicited" (a 421 sent out of turn).
    """

    command: str
    code: int
    enhanced: str
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def outcome(self, stage: str, mx: str) -> Outcome:
        """This reply as the outcome of a failed session step: deferred,
        whatever its code. A refused greeting, EHLO/HELO, STARTTLS or AUTH
        says nothing about the recipients, none named yet: it refuses this
        client (its address, its name) at this host; the site's next MX may
        take the mail, or this host later (Postfix's smtp_skip_5xx_greeting,
        KumoMTA's transient failure before MAIL FROM). A 5xx to HELO failed
        the mail for good, the backup MX never tried.
        """
        return Outcome(DEFERRED, self.code, self.enhanced, self.text.replace("\n", " "), stage, mx)


Event = CommandDone | TxnResult


class _Txn:
    """One envelope in flight: its outcomes fill in as replies arrive."""

    __slots__ = (
        "accepted", "data", "decided", "dummy", "env", "mail_fail", "outcomes", "rest", "utf8"
    )  # fmt: skip

    def __init__(self, env: Envelope, n: int) -> None:
        self.env = env
        # The message: bytes, or a callable that makes it when the transaction
        # starts (fastsend.message.mime.DeferredMessage; ClientCore._made).
        self.data: object = env.data
        self.outcomes: list[Outcome | None] = [None] * n
        self.accepted = 0
        self.mail_fail: Outcome | None = None
        self.dummy = False  # a lone "." was sent after a 354 with no recipient left
        self.utf8 = False  # MAIL FROM gets SMTPUTF8
        self.decided = False  # every recipient refused locally: nothing to send
        # Unsent commands without PIPELINING (None with it: nothing waits).
        self.rest: deque[tuple[int, int, bytes]] | None = None


class ClientCore:
    """The state machine's hot half: transactions, replies, outcomes.

    :class:`SMTPClient` is this plus the session commands (:class:`_Commands`:
    EHLO, STARTTLS, AUTH, RSET, NOOP, QUIT and their replies, which this class
    hands to ``_command_reply``). It has a compiled twin of the same name in
    ``fastsend._core`` (``_smtp.pxi``) that does the same to the same bytes:
    every reply, command and outcome of a session goes through it, so per
    message it is most of the client's CPU. Tests run both (``PySMTPClient``
    is this reference with the commands).
    """

    def __init__(self, mx: str = "", chunking: bool = True) -> None:
        self.mx = mx
        self.state = GREETING
        self.capabilities: dict[str, str] = {}
        self.tls_active = False
        self.pipelining = False
        self.chunking = chunking  # use BDAT when offered together with PIPELINING
        self.bdat = False  # ... and it was: this session sends BDAT, not DATA
        self.size_limit = 0
        # Results decided so far that are one recipient delivered (SMTPConnection
        # tells a group's from it, Lane.observe then reads none of its outcomes).
        self.delivered_one = 0
        self._parser = ReplyParser()
        self._pending: deque[tuple[int, _Txn | None, int]] = deque()
        self._pending.append((_CMD, None, 0))
        self._current: tuple[int, _Txn | None, int] | None = None
        self._cmd_names: deque[str] = deque(["greeting"])
        self._queue: deque[_Txn] = deque()
        self._group_open = False  # a transaction waits for its DATA reply
        self._active = 0  # transactions started and not finished
        self._bdat_bytes = 0  # message bytes of BDAT transactions in flight
        # A BDAT transaction may have failed (or is unresolved): the next MAIL
        # must follow an RSET (RFC 3030 section 2), or the server still holds
        # the old transaction and answers "503 sender already given".
        self._need_rset = False
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._auth: list[bytes] = []  # remaining AUTH LOGIN responses (secrets)
        # The handler of each transaction command's reply, by pending kind.
        handlers: list[Callable[[_Txn, int, Reply], None]] = [self._reply_rset] * 7
        handlers[_MAIL] = self._reply_mail
        handlers[_RCPT] = self._reply_rcpt
        handlers[_DATA] = self._reply_data
        handlers[_DOT] = self._reply_dot
        handlers[_BDAT] = self._reply_bdat
        self._handlers = handlers
        self._cram: tuple[bytes, bytes] | None = None  # CRAM-MD5 (user, password) until the challenge
        # The last sender checked (_check_sender): whether it is refused, needs
        # SMTPUTF8, and its "MAIL FROM:<...>" bytes.
        self._from: object = None
        self._from_bad = True
        self._from_utf8 = False
        self._from_line = b""
        # The last reply to a message's end and what it made (Outcome, queue id).
        self._dot_reply: Reply | None = None
        self._dot_result: tuple[Outcome, str] = (Outcome(DEFERRED), "")
        # Called with an envelope's tag as its message is queued to be written
        # (DATA's 354, BDAT LAST), before any of it goes out: a worker notes it
        # in its write log (fastsend.ring.WriteLog: a kill -9 then counts only
        # those an attempt of unknown outcome).
        self.on_body: Callable[[object], None] | None = None

    # ------------------------------------------------------------------ queries
    @property
    def expecting(self) -> str:
        """The stage of the next reply we wait for ("" when none): picks the timeout."""
        if not self._pending:
            return ""
        kind, _txn, _i = self._pending[0]
        if kind == _CMD:
            return self._cmd_names[0]
        if kind in (_DOT, _BDAT):
            return "dot"
        return _STAGE[kind]

    @property
    def busy(self) -> bool:
        """True while transactions are queued or in flight."""
        return self._active > 0 or bool(self._queue)

    def unsent(self) -> list[object]:
        """The tags of the envelopes whose message was never written: not
        started, or waiting for the replies to MAIL, RCPT or DATA (no 354
        yet). The server cannot have taken them (RFC 5321 4.1.1.4: a message
        is the server's only after its end of data), so a stop may give them
        back unattempted; one past its end of data (DATA's dot, BDAT LAST) is
        not among them, answered or not."""
        past: set[int] = set()
        seen: list[_Txn] = []
        for kind, txn, _i in self._pending:
            if txn is None:
                continue
            if kind in (_DOT, _BDAT):
                past.add(id(txn))
            elif not seen or seen[-1] is not txn:
                seen.append(txn)
        out: list[object] = [t.env.tag for t in seen if id(t) not in past]
        out.extend(t.env.tag for t in self._queue)
        return out

    def _push_cmd(self, name: str) -> None:
        """A session command (``name``, e.g. "ehlo") now waits for its reply."""
        self._pending.append((_CMD, None, 0))
        self._cmd_names.append(name)

    def _pending_kinds(self) -> list[int]:
        """The kinds of the commands waiting for a reply, oldest first (tests)."""
        return [kind for kind, _txn, _i in self._pending]

    # ------------------------------------------------------------------ output
    def data_to_send(self) -> bytes:
        """Bytes produced in reaction to replies; write them, in order."""
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out = []
        return out

    def events(self) -> list[Event]:
        """Events produced without the server (e.g. locally refused envelopes)."""
        ev = self._events
        self._events = []
        return ev

    # ------------------------------------------------------------ transactions
    def send_envelopes(self, envelopes: Iterable[Envelope]) -> bytes:
        """Queue transactions; returns the bytes to write now (may be b"")."""
        if self.state != READY:
            raise LocalProtocolError(f"cannot send mail in state {self.state!r}")
        for env in envelopes:
            txn = _Txn(env, len(env.rcpts))
            txn.decided = not self._check_envelope(txn)
            self._queue.append(txn)  # decided ones too: results keep envelope order
        if self._group_open or (not self.pipelining and self._active):
            return b""
        self._start_next()
        return self.data_to_send()

    def _check_envelope(self, txn: _Txn) -> bool:
        """Refuse locally what the server cannot take; True if anything is left to send."""
        env = txn.env
        outs = txn.outcomes
        if not env.rcpts:
            return False
        mail_from = env.mail_from
        if mail_from is not self._from:  # a batch's envelopes share one sender object
            self._check_sender(mail_from)
        bad_from = self._from_bad
        utf8 = env.smtputf8 or self._from_utf8
        for i, rcpt in enumerate(env.rcpts):
            if not isinstance(rcpt, str) or not rcpt or _bad_address(rcpt):
                text = f"invalid recipient address {rcpt!r}"
                outs[i] = Outcome(FAILED, 0, "5.1.3", text, "local", self.mx)
            elif not utf8 and not rcpt.isascii():
                utf8 = True
        txn.utf8 = utf8
        enhanced = ""
        if bad_from:
            enhanced, reason = "5.1.7", f"invalid sender address {mail_from!r}"
        elif utf8 and "SMTPUTF8" not in self.capabilities:
            enhanced = "5.6.7"
            reason = (
                "the message needs SMTPUTF8 (a non-ASCII address or UTF-8 header text)"
                " and the server does not offer it"
            )
        elif env.eightbit and "8BITMIME" not in self.capabilities:
            # RFC 6152 3: 8-bit data only to a server that offers it. (Raw
            # MIME is re-encoded to 7 bit before signing when it can be:
            # fastsend.message.rawmime; what is left must not be mangled.)
            enhanced = "5.6.3"
            reason = (
                "the message has 8-bit content that cannot be re-encoded"
                " and the server does not offer 8BITMIME"
            )
        elif self.size_limit and type(txn.data) is bytes and len(txn.data) > self.size_limit:
            # (a deferred message is checked when it is made: _made)
            enhanced = "5.3.4"
            reason = f"message size {len(txn.data)} exceeds the server's limit {self.size_limit}"
        if enhanced:
            fail = Outcome(FAILED, 0, enhanced, reason, "mail", self.mx)
            for i in range(len(outs)):
                if outs[i] is None:
                    outs[i] = fail
            return False
        return None in outs  # identity is tested first: cheap when nothing failed

    def _check_sender(self, mail_from: str) -> None:
        """Check a sender once (not once per envelope); keeps its MAIL FROM prefix."""
        self._from = mail_from
        self._from_bad = type(mail_from) is not str or _bad_address(mail_from)
        self._from_utf8 = not self._from_bad and not mail_from.isascii()
        self._from_line = b"" if self._from_bad else b"MAIL FROM:<" + mail_from.encode() + b">"

    def _mail_line(self, txn: _Txn) -> bytes:
        env = txn.env
        if env.mail_from is not self._from:
            self._check_sender(env.mail_from)
        line = self._from_line
        caps = self.capabilities
        if "SIZE" in caps:
            line += b" SIZE=%d" % len(txn.data)  # type: ignore[arg-type]
        if env.eightbit and "8BITMIME" in caps:
            line += b" BODY=8BITMIME"
        if txn.utf8:
            line += b" SMTPUTF8"
        if env.dsn_mail and "DSN" in caps:  # RFC 3461 4.1: relayed to a DSN server only
            line += env.dsn_mail
        return line + b"\r\n"

    def _rcpt_line(self, txn: _Txn, i: int) -> bytes:
        """RCPT TO for recipient ``i``, with the envelope's DSN parameters when the
        server offers DSN (RFC 3461 4.2: NOTIFY and ORCPT relayed as received)."""
        env = txn.env
        line = b"RCPT TO:<" + env.rcpts[i].encode() + b">"
        if env.dsn_rcpt and "DSN" in self.capabilities:
            line += env.dsn_rcpt
        return line + b"\r\n"

    def _start_next(self) -> None:
        """Send the next queued transaction's commands (all of them with PIPELINING)."""
        queue = self._queue
        while True:
            while queue and queue[0].decided:  # refused locally: nothing to send
                self._events.append(self._result(queue.popleft()))
            if not queue or self.state != READY:
                return
            if self.bdat:
                self._start_bdat()
                return
            txn = queue.popleft()
            if type(txn.data) is bytes or self._made(txn):
                break
            self._events.append(self._result(txn))  # no message to send
        self._active += 1
        pending = self._pending
        rcpts = txn.env.rcpts
        outcomes = txn.outcomes
        if self.pipelining:
            if len(rcpts) == 1 and not txn.env.dsn_rcpt:  # undecided: the usual case
                pending.extend(((_MAIL, txn, 0), (_RCPT, txn, 0), (_DATA, txn, 0)))
                self._out.append(
                    b"".join((self._mail_line(txn), b"RCPT TO:<", rcpts[0].encode(), _RCPT_DATA))
                )
                self._group_open = True
                return
            parts = [self._mail_line(txn)]
            pending.append((_MAIL, txn, 0))
            for i in range(len(rcpts)):
                if outcomes[i] is None:
                    parts.append(self._rcpt_line(txn, i))
                    pending.append((_RCPT, txn, i))
            parts.append(b"DATA\r\n")
            pending.append((_DATA, txn, 0))
            self._out.append(b"".join(parts))
            self._group_open = True
            return
        rest = txn.rest = deque()
        for i in range(len(rcpts)):
            if outcomes[i] is None:
                rest.append((_RCPT, i, self._rcpt_line(txn, i)))
        rest.append((_DATA, 0, b"DATA\r\n"))
        self._group_open = True
        pending.append((_MAIL, txn, 0))
        self._out.append(self._mail_line(txn))

    def _start_bdat(self) -> None:
        """CHUNKING + PIPELINING: stream whole transactions, up to BDAT_WINDOW in flight.

        MAIL, RCPTs and ``BDAT <size> LAST`` with the message need no reply
        before the next transaction (RFC 3030 section 4.2), so a batch costs
        one round trip, not one per message. No dot-stuffing: BDAT counts bytes.
        """
        queue, pending, out = self._queue, self._pending, self._out
        while (
            queue
            and self._active < BDAT_WINDOW
            and (not self._active or self._bdat_bytes < BDAT_WINDOW_BYTES)
        ):
            txn = queue.popleft()
            if txn.decided or (type(txn.data) is not bytes and not self._made(txn)):
                self._events.append(self._result(txn))
                continue
            if self._active or self._need_rset:
                # The transaction before this one failed, or its outcome is not
                # known yet: reset first. After a successful BDAT LAST the RSET
                # is a no-op; after a failed one it ends the open transaction.
                out.append(b"RSET\r\n")
                pending.append((_RSET, None, 0))
            self._need_rset = True  # until this transaction's BDAT succeeds
            self._active += 1
            rcpts, outcomes = txn.env.rcpts, txn.outcomes
            data: bytes = txn.data  # type: ignore[assignment]
            if data[-2:] != b"\r\n" and data:
                data += b"\r\n"
            out.append(self._mail_line(txn))
            pending.append((_MAIL, txn, 0))
            for i in range(len(rcpts)):
                if outcomes[i] is None:
                    out.append(self._rcpt_line(txn, i))
                    pending.append((_RCPT, txn, i))
            self._bdat_bytes += len(data)
            if self.on_body is not None:
                self.on_body(txn.env.tag)
            out.append(b"BDAT %d LAST\r\n" % len(data))
            out.append(data)
            pending.append((_BDAT, txn, 0))

    def _made(self, txn: _Txn) -> bool:
        """Make a deferred message (``data`` a callable: a DeferredMessage) now
        that its transaction starts. False when there is none to send: every
        recipient then has the Outcome it gave (a render failure), 5.3.4 if
        it exceeds the server's SIZE, or 4.3.0 if making it raised."""
        try:
            data = txn.data()  # type: ignore[operator]
        except Exception as e:  # a local bug: defer the message, loudly
            import traceback

            traceback.print_exc()
            data = Outcome(DEFERRED, 451, "4.3.0", f"local error: {e.__class__.__name__}", "local")
        if type(data) is bytes:
            txn.data = data
            if not self.size_limit or len(data) <= self.size_limit:
                return True
            data = Outcome(
                FAILED, 0, "5.3.4",
                f"message size {len(data)} exceeds the server's limit {self.size_limit}",
                "mail", self.mx,
            )  # fmt: skip
        outs = txn.outcomes
        for i in range(len(outs)):
            if outs[i] is None:
                outs[i] = data  # type: ignore[assignment]
        return False

    def _send_rest(self, txn: _Txn) -> None:
        """Without PIPELINING: send the transaction's next command, or end it."""
        rest = txn.rest
        assert rest is not None
        kind, i, line = rest.popleft()
        if kind == _DATA and (txn.mail_fail is not None or not txn.accepted):
            rest.clear()
            self._group_open = False
            if txn.mail_fail is None:
                self._out.append(b"RSET\r\n")
                self._pending.append((_RSET, None, 0))
            self._finish(txn)
            return
        self._pending.append((kind, txn, i))
        self._out.append(line)

    def _result(self, txn: _Txn, queue_id: str = "") -> TxnResult:
        outs = txn.outcomes
        for o in outs:
            if o is None:  # cannot happen: every path fills every slot
                raise LocalProtocolError("transaction finished with an undecided recipient")
        dsn = bool(txn.env.dsn_rcpt) and "DSN" in self.capabilities  # (as _rcpt_line sent)
        return TxnResult(txn.env.tag, outs, queue_id, dsn)  # type: ignore[arg-type]

    def _finish(self, txn: _Txn, queue_id: str = "") -> None:
        self._active -= 1
        outs = txn.outcomes
        if len(outs) == 1 and outs[0] is not None and not txn.env.dsn_rcpt:  # (_result's)
            self._events.append(TxnResult(txn.env.tag, outs, queue_id))  # type: ignore[arg-type]
        else:
            self._events.append(self._result(txn, queue_id))
        if not self._group_open:
            self._start_next()

    # ------------------------------------------------------------------- input
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; returns the events they complete."""
        if self.state == TLS or self.state == CLOSED:
            # Bytes after the 220 to STARTTLS but before the handshake would be
            # trusted after it (CVE-2011-0411 style injection): refuse them.
            state, self.state = self.state, CLOSED
            raise RemoteProtocolError(f"unexpected data in state {state!r}")
        pending = self._pending
        handlers = self._handlers
        try:
            # _reply, inlined for the replies of a running session (one call
            # less per reply); a 2xx to MAIL or RCPT with PIPELINING, nearly
            # every reply but the last of a transaction, needs no handler.
            for reply in self._parser.feed(data):
                if not pending or self.state == CLOSED:
                    self._reply(reply)  # out of turn: a 421, or an error
                    continue
                self._current = entry = pending.popleft()
                kind, txn, i = entry
                code = reply[0]
                if kind == _CMD:
                    self._command_reply(self._cmd_names.popleft(), reply)
                elif txn is None:  # a _RSET inside a pipeline: only a 421 matters
                    pass
                elif kind <= _RCPT and 200 <= code < 300 and txn.rest is None:
                    if kind == _RCPT:
                        if txn.mail_fail is None:
                            txn.accepted += 1
                        else:
                            self._reply_rcpt(txn, i, reply)
                else:
                    handlers[kind](txn, i, reply)
                self._current = None
                if code == 421 and self.state != CLOSED:
                    self._abort(code, reply[1], reply[2])
        except RemoteProtocolError:
            if self._current is not None and self._current[1] is not None:  # its txn
                self._pending.appendleft(self._current)
                self._current = None
            self.state = CLOSED
            raise
        ev = self._events
        self._events = []
        return ev

    def _reply(self, reply: Reply) -> None:
        """Route a reply to the handler of the command it answers (one per
        command, as the server side has one ``_cmd_*`` per command)."""
        if self.state == CLOSED:
            raise RemoteProtocolError(f"reply after the session ended: {reply[0]}")
        if not self._pending:
            if reply[0] == 421:
                self._events.append(CommandDone("unsolicited", *reply))
                self._abort(reply[0], reply[1], reply[2])
                return
            raise RemoteProtocolError(f"unsolicited reply {reply[0]} {reply[2][:80]!r}")
        self._current = entry = self._pending.popleft()
        kind, txn, i = entry
        if kind == _CMD:
            self._command_reply(self._cmd_names.popleft(), reply)
        elif txn is not None:  # a _RSET inside a pipeline has none: only a 421 matters
            self._handlers[kind](txn, i, reply)
        self._current = None
        code = reply[0]
        if code == 421 and self.state != CLOSED:
            self._abort(code, reply[1], reply[2])

    def _reply_rset(self, txn: _Txn, i: int, reply: Reply) -> None:
        """RSET (and commands without a transaction): nothing but a 421 matters."""

    def _reply_mail(self, txn: _Txn, i: int, reply: Reply) -> None:
        code = reply[0]
        if code >= 400:
            txn.mail_fail = self._outcome(reply, "mail")
        elif not 200 <= code < 300:
            raise RemoteProtocolError(f"unexpected reply {code} to MAIL")
        if txn.rest:
            if txn.mail_fail is not None:
                for j, _line_i, _line in txn.rest:
                    if j == _RCPT:
                        txn.outcomes[_line_i] = txn.mail_fail
                txn.rest.clear()
                self._group_open = False
                self._finish(txn)
            else:
                self._send_rest(txn)

    def _reply_rcpt(self, txn: _Txn, i: int, reply: Reply) -> None:
        code = reply[0]
        if txn.mail_fail is not None:
            if self.bdat and 200 <= code < 300 and txn.mail_fail.code == 503:
                # The server kept an earlier transaction open and added this
                # recipient to it: what BDAT answers is what happened to it
                # (counting it failed would send it again: a duplicate).
                txn.accepted += 1
            else:
                txn.outcomes[i] = txn.mail_fail
        elif 200 <= code < 300:
            txn.accepted += 1
        elif code >= 400:
            txn.outcomes[i] = self._outcome(reply, "rcpt")
        else:
            raise RemoteProtocolError(f"unexpected reply {code} to RCPT")
        if txn.rest:
            self._send_rest(txn)

    def _reply_data(self, txn: _Txn, i: int, reply: Reply) -> None:
        code = reply[0]
        self._group_open = False
        if code == 354:
            self._pending.append((_DOT, txn, 0))
            wire = self._out
            k = len(wire)
            tail = b""
            if self.pipelining:
                # The next transaction's commands go in the same write as this
                # body, and in the same buffer (dot_stuff appends them): no
                # second copy of the message to join them.
                self._start_next()
                if len(wire) > k:
                    tail = wire[k] if len(wire) == k + 1 else b"".join(wire[k:])
                    del wire[k:]
            if txn.accepted and txn.mail_fail is None:
                if self.on_body is not None:
                    self.on_body(txn.env.tag)
                wire.append(dot_stuff(txn.data, tail))  # type: ignore[arg-type]
            else:  # a server that says 354 with no recipient: end it empty
                txn.dummy = True
                wire.append(b".\r\n" + tail)
        elif code >= 400:
            if txn.mail_fail is None:
                # A 421 ends the session before any octet of the message went:
                # the stage _abort gives the others (a per-session cap's 421 here
                # is sent again on a new session, as at MAIL), not a dot's "data".
                out = self._outcome(reply, DATA_COMMAND if code == 421 else "data")
                outs = txn.outcomes
                for j in range(len(outs)):
                    if outs[j] is None:
                        outs[j] = out
                self._out.append(b"RSET\r\n")
                self._pending.append((_RSET, None, 0))
            self._finish(txn)
        else:
            raise RemoteProtocolError(f"unexpected reply {code} to DATA")

    def _reply_bdat(self, txn: _Txn, i: int, reply: Reply) -> None:
        code = reply[0]
        if code < 200 or 300 <= code < 400:
            raise RemoteProtocolError(f"unexpected reply {code} to BDAT")
        data: bytes = txn.data  # type: ignore[assignment]
        self._bdat_bytes -= len(data) + (2 if data and data[-2:] != b"\r\n" else 0)
        # The last BDAT answered decides whether the session is clean.
        self._need_rset = not (200 <= code < 300)
        outs = txn.outcomes
        out = self._outcome(reply, "data")
        for j in range(len(outs)):  # only the accepted recipients are undecided
            if outs[j] is None:
                outs[j] = out
        qid = ""
        if code < 300 and txn.accepted:
            qid = queue_id(out.text)
            if len(outs) == 1 and outs[0] is out:
                self.delivered_one += 1
        self._finish(txn, qid)

    def _reply_dot(self, txn: _Txn, i: int, reply: Reply) -> None:
        code = reply[0]
        outs = txn.outcomes
        if txn.dummy:
            for j in range(len(outs)):
                if outs[j] is None:  # cannot happen; keep every slot decided
                    outs[j] = self._outcome(reply, "data")
            self._finish(txn)
            return
        if code < 200 or 300 <= code < 400:
            raise RemoteProtocolError(f"unexpected reply {code} to end of data")
        if reply is self._dot_reply:  # the compiled parser hands a repeated line back as is
            out, qid = self._dot_result
        else:
            out = self._outcome(reply, "data")
            qid = ""
            if code < 300:
                qid = queue_id(out.text)
            self._dot_reply = reply
            self._dot_result = (out, qid)
        if len(outs) == 1:  # one recipient, accepted (else no body was sent): the usual case
            outs[0] = out
            if code < 300:
                self.delivered_one += 1
        else:
            for j in range(len(outs)):
                if outs[j] is None:
                    outs[j] = out
        self._finish(txn, qid)

    def _outcome(self, reply: Reply, stage: str) -> Outcome:
        code = reply[0]
        kind = DELIVERED if code < 300 else (DEFERRED if code < 500 else FAILED)
        if code == 503:  # bad sequence of commands: the session's fault, not the address's
            kind = DEFERRED
        text = reply[2]
        if "\n" in text:
            text = text.replace("\n", " ")
        return Outcome(kind, code, reply[1], text, stage, self.mx)


    def _command_reply(self, name: str, reply: Reply) -> None:
        """A session command's reply (:class:`_Commands`)."""
        raise NotImplementedError

    # --------------------------------------------------------------- teardown
    def connection_lost(self, text: str = "connection lost") -> list[Event]:
        """The connection is gone: every undecided recipient is deferred (code 0)."""
        if self.state != CLOSED or self._pending or self._queue:
            self._abort(0, "", text)
        ev = self._events
        self._events = []
        return ev

    def _abort(self, code: int, enhanced: str, text: str) -> None:
        """Defer every undecided recipient with this reason and close the session."""
        self.state = CLOSED
        self._out = []
        text = text.replace("\n", " ")
        seen: list[_Txn] = []
        stage_of: dict[int, str] = {}
        for kind, txn, _i in self._pending:
            if txn is None:
                continue
            if id(txn) not in stage_of:
                stage_of[id(txn)] = DATA_COMMAND if kind == _DATA else _STAGE[kind]
                seen.append(txn)
            elif kind == _BDAT and code == 0:
                # Its body went out pipelined behind MAIL and RCPT (CHUNKING) and no
                # reply came: the server may hold the whole message, so its fate is
                # unknown, as after a dot; never "unstarted", which would send it again
                # at once. (A 421 that ends the session refused it: unstarted.)
                stage_of[id(txn)] = "data"
        self._pending.clear()
        self._cmd_names.clear()
        seen.extend(self._queue)
        self._queue.clear()
        for txn in seen:
            # A transaction whose MAIL was refused (this 421, at once) is
            # refused there: its recipients' replies were never coming.
            out = txn.mail_fail
            if out is None or out.code != code:  # (not a 5xx: those were kept open)
                stage = stage_of.get(id(txn), "mail")
                out = Outcome(DEFERRED, code, enhanced, text, stage, self.mx)
            outs = txn.outcomes
            for j in range(len(outs)):
                if outs[j] is None:
                    outs[j] = out
            self._events.append(self._result(txn))
        self._active = 0
        self._bdat_bytes = 0
        self._need_rset = False
        self._group_open = False
        self._auth = []


# For the type checker, the commands see the core's attributes; at run time they
# are a mixin (the core is whichever twin SMTPClient or PySMTPClient names).
if TYPE_CHECKING:
    _CoreAttrs = ClientCore
else:
    _CoreAttrs = object


class _Commands(_CoreAttrs):
    """The session commands of :class:`SMTPClient` and their replies (cold: a few
    per connection), over either twin of :class:`ClientCore`."""

    def __init__(self, helo_name: str = "localhost", mx: str = "", chunking: bool = True) -> None:
        if not helo_name or _BAD_ADDRESS.search(helo_name):
            raise LocalProtocolError(f"bad HELO name {helo_name!r}")
        super().__init__(mx, chunking)  # the ClientCore
        self.helo_name = helo_name
        self.ehlo_refusal: CommandDone | None = None  # EHLO's 5xx, when HELO was tried

    def _command(self, name: str, line: bytes, allowed: tuple[str, ...]) -> bytes:
        if self.state not in allowed:
            raise LocalProtocolError(f"cannot send {name.upper()} in state {self.state!r}")
        self._push_cmd(name)
        return line

    def send_ehlo(self) -> bytes:
        line = self._command("ehlo", b"EHLO %s\r\n" % self.helo_name.encode(), (GREETED,))
        self.state = EHLO
        return line

    def send_starttls(self) -> bytes:
        if self.tls_active:
            raise LocalProtocolError("TLS is already active")
        self._check_idle("STARTTLS")
        line = self._command("starttls", b"STARTTLS\r\n", (READY,))
        self.state = STARTTLS
        return line

    def tls_established(self) -> None:
        """The caller finished the TLS handshake: forget what was said in clear."""
        if self.state != TLS:
            raise LocalProtocolError(f"no STARTTLS was accepted (state {self.state!r})")
        self.tls_active = True
        self.capabilities = {}
        self.pipelining = self.bdat = False
        self.size_limit = 0
        self.state = GREETED

    def auth_mechanism(self, mechanism: str = "", in_clear: bool = False) -> str:
        """The AUTH mechanism to use: ``mechanism``, or the best offered (inside
        TLS PLAIN, LOGIN, CRAM-MD5; in clear text CRAM-MD5 first: RFC 2195, the
        password never crosses the wire). "" when none may be used: without
        TLS, PLAIN and LOGIN would send the password in clear text, which only
        ``in_clear`` (the operator's explicit choice) allows, as Postfix's
        smtp_sasl_security_options = noplaintext refuses them by default."""
        offered = self.capabilities.get("AUTH", "").upper().split()
        mech = mechanism.upper()
        safe = self.tls_active or in_clear
        if mech:
            return mech if safe or mech not in ("PLAIN", "LOGIN") else ""
        if self.tls_active:
            order: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
        elif in_clear:
            order = ("CRAM-MD5", "PLAIN", "LOGIN")
        else:
            order = ("CRAM-MD5",)
        return next((m for m in order if m in offered), "PLAIN" if safe else "")

    def send_auth(
        self, username: str, password: str, mechanism: str = "", in_clear: bool = False
    ) -> bytes:
        """AUTH with ``mechanism``, or the best offered (:meth:`auth_mechanism`);
        LocalProtocolError rather than a password in clear text without
        ``in_clear``."""
        self._check_idle("AUTH")
        mech = self.auth_mechanism(mechanism, in_clear)
        if not mech:
            raise LocalProtocolError("no TLS: the AUTH password would be sent in clear text")
        self._auth = []
        self._cram = None
        if mech == "PLAIN":
            token = base64.b64encode(b"\0%s\0%s" % (username.encode(), password.encode()))
            line = b"AUTH PLAIN " + token + b"\r\n"
        elif mech == "LOGIN":
            line = b"AUTH LOGIN\r\n"
            self._auth = [
                base64.b64encode(username.encode()) + b"\r\n",
                base64.b64encode(password.encode()) + b"\r\n",
            ]
        elif mech == "CRAM-MD5":
            line = b"AUTH CRAM-MD5\r\n"
            self._cram = (username.encode(), password.encode())
        else:
            raise LocalProtocolError(f"unsupported AUTH mechanism {mechanism!r}")
        line = self._command("auth", line, (READY,))
        self.state = AUTH
        return line

    def send_rset(self) -> bytes:
        self._check_idle("RSET")
        return self._command("rset", b"RSET\r\n", (READY,))

    def send_noop(self) -> bytes:
        self._check_idle("NOOP")
        return self._command("noop", b"NOOP\r\n", (READY,))

    def send_quit(self) -> bytes:
        self._check_idle("QUIT")
        line = self._command("quit", b"QUIT\r\n", (READY, GREETED, EHLO, AUTH))
        self.state = QUIT
        return line

    def _check_idle(self, what: str) -> None:
        if self.busy:
            raise LocalProtocolError(f"cannot send {what} while transactions are in flight")

    def _command_reply(self, name: str, reply: Reply) -> None:
        code = reply[0]
        if name == "greeting":
            self.state = GREETED if code == 220 else CLOSED
        elif name == "ehlo":
            if 200 <= code < 300:
                self._parse_ehlo(reply[2])
                self.state = READY
            elif 500 <= code < 600:
                # No ESMTP, or EHLO refused: try HELO (RFC 5321 section 3.2; as
                # Postfix does after any refusal but a 421: a 554 or 553 ended
                # the session without it); no event until it answers. Kept: a
                # server that closes after its refusal answers HELO with none.
                self.ehlo_refusal = CommandDone("ehlo", *reply)
                self._push_cmd("helo")
                self._out.append(b"HELO %s\r\n" % self.helo_name.encode())
                return
            else:
                self.state = GREETED
        elif name == "helo":
            self.capabilities = {}
            self.pipelining = self.bdat = False
            self.state = READY if 200 <= code < 300 else GREETED
        elif name == "starttls":
            if code == 220:
                if self._parser.pending:
                    raise RemoteProtocolError("data pipelined after the 220 to STARTTLS")
                self.state = TLS
            else:
                self.state = READY
        elif name == "auth":
            if code == 334 and self._cram is not None:
                user, password = self._cram
                self._cram = None
                try:
                    challenge = base64.b64decode(reply[2].strip(), validate=True)
                except ValueError:
                    challenge = None
                self._push_cmd("auth")
                if challenge is None:
                    self._out.append(b"*\r\n")  # not base64: cancel (RFC 4954)
                else:
                    digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
                    self._out.append(base64.b64encode(user + b" " + digest) + b"\r\n")
                return
            if code == 334 and self._auth:
                self._push_cmd("auth")
                self._out.append(self._auth.pop(0))
                return
            if code == 334:  # a challenge we have no answer for: cancel (RFC 4954)
                self._push_cmd("auth")
                self._out.append(b"*\r\n")
                return
            self._auth = []
            self._cram = None
            self.state = READY
        elif name == "quit":
            self.state = CLOSED
        self._events.append(CommandDone(name, *reply))

    def _parse_ehlo(self, text: str) -> None:
        caps: dict[str, str] = {}
        for line in text.split("\n")[1:]:
            key, _, params = line.strip().partition(" ")
            if not key:
                continue
            key = key.upper()
            if key.startswith("AUTH="):  # the pre-RFC 4954 form
                key, params = "AUTH", key[5:] + " " + params
            caps[key] = params.strip()
        self.capabilities = caps
        self.pipelining = "PIPELINING" in caps
        self.bdat = self.chunking and self.pipelining and "CHUNKING" in caps
        size = caps.get("SIZE", "")
        self.size_limit = int(size) if size.isdigit() else 0


# The reference stays reachable for the tests; the picked twin is the base.
PyClientCore = ClientCore
if not TYPE_CHECKING:
    ClientCore = pick(PyClientCore)


class SMTPClient(_Commands, ClientCore):
    """One SMTP session's client side. See the module docstring for the flow."""


class PySMTPClient(_Commands, PyClientCore):
    """:class:`SMTPClient` over the pure-Python :class:`ClientCore` (tests)."""
