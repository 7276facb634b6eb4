"""Server-side SMTP protocol, sans-I/O: bytes in, events out, replies chosen by the caller.

NAME
    fastsend.smtp.server -- the receiving half of SMTP (RFC 5321) with no I/O.

SUMMARY
    proto = ServerProtocol(ServerConfig(hostname="mx.example"))
    proto.start()                          # queues the 220 greeting
    proto.receive_data(chunk)              # whatever the socket gave us
    while (ev := proto.next_event()) is not NEED_DATA:
        if isinstance(ev, RcptTo) and bad(ev.address):
            proto.reply(550, "5.1.1", "User unknown")
        elif ev.needs_reply:
            proto.accept()                 # the standard positive reply
    transport.write(proto.data_to_send())
    if proto.closed: transport.close()

DESCRIPTION
    Every state transition of the server side lives in this file. The caller
    feeds received bytes, pulls events, answers each event that
    ``needs_reply`` (``accept()`` or ``reply(code, enhanced, text)``) before
    pulling the next one, and writes ``data_to_send()``. Replies therefore come
    out in command order, which is what PIPELINING (RFC 2920) needs; the caller
    may write once per received chunk.

    The protocol answers by itself everything that needs no policy: syntax and
    sequence errors, NOOP, RSET, VRFY, HELP, QUIT, limits (command line length,
    SIZE, recipients per transaction), BDAT chunks before LAST, the AUTH
    PLAIN/LOGIN challenge dance. It hands to the caller the decisions:
    Hello, StartTLS, AuthRequest (the pluggable credential check), MailFrom,
    RcptTo, DataStart (DATA only) and Message (the complete, dot-unstuffed
    body). DataStart for BDAT is informational (no reply), since chunk bytes
    follow the command regardless.

    DATA ends only at <CRLF>.<CRLF>. A bare LF (or CR) never ends data, so
    "<LF>.<LF>" smuggling cannot split one message into two; by default a body
    containing a bare LF or CR is refused with 550 5.5.2, as Postfix's
    smtpd_forbid_bare_newline does. BDAT bodies are length-delimited and
    taken as they are.

    A refused DATA (no recipient taken, ...) followed by input the client sent
    before its reply (RFC 2920 3.1: DATA ends a group) closes the session with
    554 5.5.0 "SMTP synchronization error", as Exim does: that input is a
    message body, which would otherwise run as commands (its "RCPT TO:" line
    joining the open transaction). A caller that feeds a line at a time says
    what it holds of the same read in ``input_after``.

    After an accepted STARTTLS, bytes already buffered (sent in plaintext
    after the command) are discarded, and ``tls_started()`` resets the session
    (RFC 3207 section 4.2): the client must EHLO again.

DIAGNOSTICS
    Peer input never raises: junk yields 5xx replies, and after
    ``max_errors`` of them a 421 and a closed session. Misuse by the local
    caller (replying with nothing pending, pulling events with a reply owed)
    raises LocalProtocolError: that is a bug in the caller.

DELIBERATELY NOT HERE
    Sockets, TLS, timers, queues, logging, address policy. BINARYMIME and
    implicit TLS are not offered; DSN (RFC 3461) only with ``ServerConfig.dsn``:
    RET, ENVID, NOTIFY and ORCPT are checked for syntax here (501) and handed
    on (``Message.mail_params``, ``Message.rcpt_params``), what to do with
    them is the caller's.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final

from fastsend.smtp.errors import LocalProtocolError

__all__ = [
    "NEED_DATA",
    "AuthRequest",
    "DataStart",
    "Event",
    "Hello",
    "LocalProtocolError",
    "MailFrom",
    "Message",
    "RcptTo",
    "ServerConfig",
    "ServerProtocol",
    "StartTLS",
    "xtext_decode",
]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by :meth:`ServerProtocol.next_event` when more bytes are needed."""


@dataclass(slots=True)
class ServerConfig:
    """What the server offers and enforces. Defaults suit a test sink."""

    hostname: str = "localhost"
    banner: str = "ESMTP fastsend"
    max_line_length: int = 2048  # command lines incl. CRLF (RFC 5321 minimum is 512)
    max_message_size: int = 50 * 1024 * 1024  # SIZE; 0 disables the limit
    max_recipients: int = 1000  # per transaction (RFC 5321 minimum is 100)
    max_errors: int = 20  # protocol errors before 421 and close
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    chunking: bool = True
    enhanced_status_codes: bool = True
    starttls: bool = False  # offer STARTTLS (the transport must be able to do it)
    auth_mechanisms: tuple[str, ...] = ()  # e.g. ("PLAIN", "LOGIN"); empty: no AUTH
    auth_requires_tls: bool = True  # offer AUTH only once TLS is active
    auth_required: bool = False  # MAIL needs a successful AUTH first
    reject_bare_newlines: bool = True  # refuse DATA bodies with bare LF/CR
    dsn: bool = False  # offer DSN (RFC 3461): take RET, ENVID (MAIL), NOTIFY, ORCPT (RCPT)
    # 0: a message is kept whole. N: only its first N bytes are kept (the rest is read
    # and dropped, SIZE still holds): a listener that reads no further (the intake
    # parses a report's start) holds no more of it in memory.
    keep_bytes: int = 0


# ---------------------------------------------------------------- events


@dataclass(slots=True)
class Hello:
    """HELO or EHLO. Accepting sends the greeting (with keywords for EHLO)."""

    name: str
    extended: bool
    needs_reply: bool = field(default=True, init=False, repr=False)


@dataclass(slots=True)
class StartTLS:
    """STARTTLS. Accepting sends 220; then start TLS and call ``tls_started()``."""

    needs_reply: bool = field(default=True, init=False, repr=False)


@dataclass(slots=True)
class AuthRequest:
    """Credentials from AUTH PLAIN or LOGIN: accept (235) or reply 535 5.7.8."""

    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)  # never in reprs or logs
    needs_reply: bool = field(default=True, init=False, repr=False)


@dataclass(slots=True)
class MailFrom:
    """MAIL FROM. ``address`` is "" for the null reverse-path."""

    address: str
    params: dict[str, str | None]
    size: int | None
    smtputf8: bool
    needs_reply: bool = field(default=True, init=False, repr=False)


@dataclass(slots=True)
class RcptTo:
    """RCPT TO. The protocol has already checked syntax and limits."""

    address: str
    params: dict[str, str | None]
    needs_reply: bool = field(default=True, init=False, repr=False)


@dataclass(slots=True)
class DataStart:
    """DATA (needs a reply: accept sends 354) or the first BDAT chunk (informational)."""

    bdat: bool
    needs_reply: bool = True


@dataclass(slots=True)
class Message:
    """A complete message: accept (250, optionally with a queue id) or refuse it."""

    mail_from: str
    recipients: list[str]
    data: bytes
    smtputf8: bool
    bdat: bool
    # DSN (RFC 3461): MAIL's RET and ENVID, each recipient's NOTIFY and ORCPT (as
    # sent, upper-cased keys; ENVID and ORCPT still xtext: xtext_decode)
    mail_params: dict[str, str | None] = field(default_factory=dict)
    rcpt_params: list[dict[str, str | None]] = field(default_factory=list)
    needs_reply: bool = field(default=True, init=False, repr=False)


Event = Hello | StartTLS | AuthRequest | MailFrom | RcptTo | DataStart | Message

# ---------------------------------------------------------------- constants

# modes of the input parser
_CMD, _DISCARD_LINE, _DATA, _BDAT, _AUTH, _TLS_WAIT, _CLOSED = range(7)

# Reject all C0 controls except TAB, and DEL, in command lines: CR/LF/NUL in
# particular enable command and header injection further down the line.
_BAD_CMD_CHARS: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PATH: Final = re.compile(r"(?i)(FROM|TO):[ ]?<([^<>]*)>(?: +(.*))?$")
_PARAM_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*$")
_ADDR_BAD: Final = re.compile(r"[\s\"()<>,;\\\[\]]")  # (a quoted local part: _QUOTED_LOCAL)
# A quoted local part (RFC 5321 4.1.2 Quoted-string: qtextSMTP and quoted pairs;
# RFC 6531 adds UTF-8), taken as Postfix takes it: "john doe"@example.com.
_QUOTED_LOCAL: Final = re.compile(r'"(?:[ !#-\[\]-~\x80-\U0010ffff]|\\[ -~])*"@')
_MAX_PATH: Final = 256  # RFC 5321 4.5.3.1.3
# RFC 3461 4: xtext is printable ASCII but "+" and "=", and "+" two upper-case hex digits.
_XTEXT: Final = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
# ... and in an SMTPUTF8 transaction UTF-8 too (RFC 6533 3: utf-8-addr-unitext)
_UTF8_XTEXT: Final = re.compile(r"(?:[!-*,-<>-~\x80-\U0010ffff]|\+[0-9A-F]{2})*")
_ADDR_TYPE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # an atom (RFC 3461 4.2)
_NOTIFY: Final = frozenset({"SUCCESS", "FAILURE", "DELAY"})

_R_MAIL_OK: Final = b"250 2.1.0 Ok\r\n"
_R_RCPT_OK: Final = b"250 2.1.5 Ok\r\n"
_R_DATA_OK: Final = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_R_MSG_OK: Final = b"250 2.0.0 Ok: queued\r\n"
_R_TLS_OK: Final = b"220 2.0.0 Ready to start TLS\r\n"
_R_AUTH_OK: Final = b"235 2.7.0 Authentication successful\r\n"
_R_HELO_OK_FMT: Final = "250 {host}\r\n"

_DEFAULT_ACCEPT: Final[dict[type, bytes]] = {
    MailFrom: _R_MAIL_OK,
    RcptTo: _R_RCPT_OK,
    DataStart: _R_DATA_OK,
    Message: _R_MSG_OK,
    StartTLS: _R_TLS_OK,
    AuthRequest: _R_AUTH_OK,
}
_ACCEPT_CODE: Final[dict[type, int]] = {
    Hello: 250,
    MailFrom: 250,
    RcptTo: 250,
    DataStart: 354,
    Message: 250,
    StartTLS: 220,
    AuthRequest: 235,
}


def _strip_enhanced(reply: bytes) -> bytes:
    return re.sub(rb"(?m)^(\d{3}[ -])\d\.\d{1,3}\.\d{1,3} ", rb"\1", reply)


class ServerProtocol:
    """One SMTP session, server side. See the module docstring for the cycle."""

    __slots__ = (
        "_auth_mech",
        "_auth_user",
        "_bdat_chunks",
        "_bdat_failed",
        "_bdat_last",
        "_bdat_left",
        "_bdat_size",
        "_buf",
        "_data_overflow",
        "_data_seen",
        "_drop_reply",
        "_errors",
        "_head",
        "_kept",
        "_out",
        "_pending",
        "_rcpt_count",
        "_rcpt_params",
        "_scan",
        "_used_bdat",
        "authenticated",
        "config",
        "esmtp",
        "helo",
        "input_after",
        "mail_from",
        "mail_params",
        "mode",
        "recipients",
        "smtputf8",
        "tls_active",
    )

    def __init__(self, config: ServerConfig | None = None, *, tls_active: bool = False) -> None:
        self.config = config if config is not None else ServerConfig()
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._pending: Event | None = None
        self._scan = 0
        self._errors = 0
        self.mode = _CMD
        self.tls_active = tls_active
        self.helo: str | None = None
        self.esmtp = False
        self.authenticated: str | None = None
        self._auth_mech = ""
        self._auth_user: str | None = None
        self.mail_from: str | None = None
        self.recipients: list[str] = []
        self.mail_params: dict[str, str | None] = {}
        self._rcpt_params: list[dict[str, str | None]] = []
        self.smtputf8 = False
        self._rcpt_count = 0
        self._data_seen = 0
        self._data_overflow = False
        self._drop_reply = b""
        self._head = bytearray()  # DATA: the kept start of a message cut at keep_bytes
        self._kept = 0  # BDAT: bytes of the transaction's chunks kept
        self._bdat_chunks: list[bytes] = []
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_failed = ""
        self._bdat_size = 0
        self._used_bdat = False
        # Bytes of the same read the caller still holds after what it fed (a caller
        # that feeds a line at a time): input already sent, as _buf is.
        self.input_after = 0

    # ------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        """True once the session is over (QUIT, 421): flush, then close the transport."""
        return self.mode == _CLOSED

    @property
    def pending(self) -> Event | None:
        """The event that still needs a reply, if any."""
        return self._pending

    def start(self) -> None:
        """Queue the 220 greeting."""
        self._out.append(f"220 {self.config.hostname} {self.config.banner}\r\n".encode())

    def refuse(self, code: int = 421, enhanced: str = "4.7.0", text: str = "Try later") -> None:
        """Greet with a refusal instead (e.g. too many connections) and close."""
        self._out.append(self._format(code, enhanced, text))
        self.mode = _CLOSED

    def drop_content(self, code: int, enhanced: str, text: str) -> None:
        """The message content now arriving (DATA, or a transaction's BDAT chunks) is
        not kept: what is stored of it is freed, the rest is read and discarded, and
        its end is answered with this reply (a listener out of room for it: 452 4.3.1,
        RFC 5321 4.2.2; the client sends it again later)."""
        line = self._format(code, enhanced, text)
        if self.mode == _DATA:
            self._data_overflow = True
            self._drop_reply = line
            self._head = bytearray()
            buf = self._buf
            n = len(buf)
            if n > 4:  # (the last 4 bytes may begin the end marker)
                self._data_seen += n - 4
                del buf[: n - 4]
                self._scan = 0
        elif self.mail_from is not None and (self.mode == _BDAT or self._bdat_chunks):
            if not self._bdat_failed:
                self._bdat_failed = line.decode("utf-8", "replace").rstrip("\r\n")
            self._bdat_chunks = []

    def held_bytes(self) -> int:
        """Bytes of received data stored now (the buffer, a transaction's BDAT chunks)."""
        return len(self._buf) + len(self._head) + sum(len(c) for c in self._bdat_chunks)

    def receive_data(self, data: bytes) -> None:
        """Add received bytes. b"" (EOF) closes the session."""
        if self.mode == _CLOSED or self.mode == _TLS_WAIT:
            return
        if not data:
            self.mode = _CLOSED
            return
        self._buf += data

    def data_to_send(self) -> bytes:
        """All reply bytes queued so far (b"" if none)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if not self.config.enhanced_status_codes:
            data = _strip_enhanced(data)
        return data

    def tls_started(self) -> None:
        """The TLS handshake succeeded: reset the session (RFC 3207 4.2)."""
        if self.mode != _TLS_WAIT:
            raise LocalProtocolError("tls_started() without an accepted STARTTLS")
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.authenticated = None
        self._reset_txn()
        self._buf.clear()
        self._scan = 0
        self.mode = _CMD

    def accept(self, text: str | None = None) -> None:
        """Answer the pending event with its standard positive reply."""
        ev = self._pending
        if ev is None or not ev.needs_reply:
            raise LocalProtocolError("accept() with no event awaiting a reply")
        if type(ev) is Hello:
            self._out.append(self._hello_reply(ev, text))
            self._apply(ev, True)
            return
        if text is None:
            self._out.append(_DEFAULT_ACCEPT[type(ev)])
        else:
            code = _ACCEPT_CODE[type(ev)]
            enh = {250: "2.0.0", 220: "2.0.0", 235: "2.7.0", 354: ""}[code]
            if type(ev) is MailFrom:
                enh = "2.1.0"
            elif type(ev) is RcptTo:
                enh = "2.1.5"
            self._out.append(self._format(code, enh, text))
        self._apply(ev, True)

    def reply(self, code: int, enhanced: str = "", text: str = "") -> None:
        """Answer the pending event with any reply; 2xx/3xx count as accepted, 421 closes."""
        ev = self._pending
        if ev is None or not ev.needs_reply:
            raise LocalProtocolError("reply() with no event awaiting a reply")
        if not 200 <= code <= 599:
            raise LocalProtocolError(f"reply code {code} out of range")
        if code < 400 and code != _ACCEPT_CODE[type(ev)]:
            raise LocalProtocolError(f"{code} is not a positive reply to {type(ev).__name__}")
        if type(ev) is Hello and code < 400:
            self._out.append(self._hello_reply(ev, text or None))
        else:
            self._out.append(self._format(code, enhanced, text))
        self._apply(ev, code < 400)
        if code == 421:
            self.mode = _CLOSED

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Answer events that need a reply first."""
        if self._pending is not None:
            raise LocalProtocolError(f"reply to {self._pending!r} before the next event")
        while True:
            mode = self.mode
            if mode in (_CMD, _AUTH):
                buf = self._buf
                idx = buf.find(b"\r\n", self._scan)
                if idx < 0:
                    if len(buf) >= self.config.max_line_length:
                        self._auth_mech, self._auth_user = "", None  # cancels AUTH
                        self.mode = _DISCARD_LINE
                        self._error(500, "5.5.2", "Line too long")
                        continue
                    self._scan = max(0, len(buf) - 1)
                    return NEED_DATA
                self._scan = 0
                if idx + 2 > self.config.max_line_length:
                    del buf[: idx + 2]
                    self._auth_mech, self._auth_user = "", None
                    self.mode = _CMD
                    self._error(500, "5.5.2", "Line too long")
                    continue
                line = bytes(buf[:idx])
                del buf[: idx + 2]
                ev: Event | _NeedData | None = (
                    self._command(line) if mode == _CMD else self._auth_line(line)
                )
            elif mode == _DATA:
                ev = self._data()
            elif mode == _BDAT:
                ev = self._bdat()
            elif mode == _DISCARD_LINE:
                buf = self._buf
                idx = buf.find(b"\r\n")
                if idx < 0:
                    keep = 1 if buf.endswith(b"\r") else 0
                    del buf[: len(buf) - keep]
                    return NEED_DATA
                del buf[: idx + 2]
                self.mode = _CMD
                continue
            else:  # _TLS_WAIT, _CLOSED
                return NEED_DATA
            if ev is not None:
                if isinstance(ev, _NeedData):
                    return NEED_DATA
                if ev.needs_reply:
                    self._pending = ev
                return ev

    # ------------------------------------------------------------ replies

    def _format(self, code: int, enhanced: str, text: str) -> bytes:
        lines = _clean_text(text).split("\n") if text else [""]
        enh = f"{enhanced} " if enhanced else ""
        parts = [f"{code}-{enh}{ln}\r\n" for ln in lines[:-1]]
        parts.append(f"{code} {enh}{lines[-1]}\r\n")
        return "".join(parts).replace(" \r\n", "\r\n").encode("utf-8", "replace")

    def _hello_reply(self, ev: Hello, text: str | None) -> bytes:
        c = self.config
        first = _clean_text(text) if text else c.hostname
        if not ev.extended:
            return f"250 {first}\r\n".encode()
        kw: list[str] = [first]
        if c.pipelining:
            kw.append("PIPELINING")
        kw.append(f"SIZE {c.max_message_size}" if c.max_message_size else "SIZE")
        if c.eightbitmime:
            kw.append("8BITMIME")
        if c.smtputf8:
            kw.append("SMTPUTF8")
        if c.enhanced_status_codes:
            kw.append("ENHANCEDSTATUSCODES")
        if c.chunking:
            kw.append("CHUNKING")
        if c.dsn:
            kw.append("DSN")
        if c.starttls and not self.tls_active:
            kw.append("STARTTLS")
        if self._auth_offered():
            kw.append("AUTH " + " ".join(c.auth_mechanisms))
        return "".join(
            f"250{'-' if i < len(kw) - 1 else ' '}{k}\r\n" for i, k in enumerate(kw)
        ).encode()

    def _auth_offered(self) -> bool:
        c = self.config
        return bool(c.auth_mechanisms) and (self.tls_active or not c.auth_requires_tls)

    def _error(self, code: int, enhanced: str, text: str) -> None:
        self._out.append(self._format(code, enhanced, text))
        self._errors += 1
        if self._errors >= self.config.max_errors:
            self._out.append(self._format(421, "4.7.0", "Too many errors, closing connection"))
            self.mode = _CLOSED
            self._buf.clear()

    def _apply(self, ev: Event, ok: bool) -> None:
        """The state change a reply makes to the pending event."""
        self._pending = None
        t = type(ev)
        if t is RcptTo:
            if ok:
                self.recipients.append(ev.address)  # type: ignore[union-attr]
                self._rcpt_params.append(ev.params)  # type: ignore[union-attr]
        elif t is MailFrom:
            if ok:
                self.mail_from = ev.address  # type: ignore[union-attr]
                self.smtputf8 = ev.smtputf8  # type: ignore[union-attr]
                self.mail_params = {k: v for k, v in ev.params.items()  # type: ignore[union-attr]
                                    if k in ("RET", "ENVID")}  # fmt: skip
                self.recipients = []
                self._rcpt_params = []
                self._rcpt_count = 0
        elif t is Message:
            self._reset_txn()
        elif t is DataStart:
            if not ok and not ev.bdat:  # type: ignore[union-attr]
                self._sync_after_data()
            if ok:
                self.mode = _DATA
                # Keep the CRLF that ended "DATA" in front of the body, so the
                # end marker of an empty body is found as <CRLF>.<CRLF> too.
                self._buf[0:0] = b"\r\n"
                self._scan = 0
                self._data_seen = 0
                self._data_overflow = False
                self._drop_reply = b""
                self._head = bytearray()
        elif t is Hello:
            if ok:
                self.helo = ev.name  # type: ignore[union-attr]
                self.esmtp = ev.extended  # type: ignore[union-attr]
                self._reset_txn()
        elif t is StartTLS:
            if ok:
                self.mode = _TLS_WAIT
                self._buf.clear()  # plaintext sent after STARTTLS: injection, drop it
        elif t is AuthRequest and ok:
            self.authenticated = ev.username  # type: ignore[union-attr]

    def _reset_txn(self) -> None:
        self.mail_from = None
        self.recipients = []
        self.mail_params = {}
        self._rcpt_params = []
        self.smtputf8 = False
        self._rcpt_count = 0
        self._used_bdat = False
        self._bdat_chunks = []
        self._bdat_failed = ""
        self._bdat_size = 0
        self._kept = 0

    # ------------------------------------------------------------ commands

    def _command(self, line: bytes) -> Event | None:
        if _BAD_CMD_CHARS.search(line) is not None:
            self._error(500, "5.5.2", "Syntax error: control character in command")
            return None
        verb = line[:4].upper()
        if len(line) > 4 and line[4:5] != b" ":
            if line.upper() == b"STARTTLS":
                return self._cmd_starttls(b"")
            self._error(500, "5.5.2", "Command unrecognized")
            return None
        arg = line[5:]
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._error(500, "5.5.2", "Command unrecognized")
            return None
        return handler(self, arg)

    def _text_arg(self, arg: bytes) -> str | None:
        try:
            return arg.decode("utf-8")
        except UnicodeDecodeError:
            self._error(500, "5.5.2", "Syntax error: invalid UTF-8")
            return None

    def _cmd_helo(self, arg: bytes, extended: bool) -> Event | None:
        name = self._text_arg(arg.strip())
        if name is None:
            return None
        if not name or " " in name:
            self._error(501, "5.5.4", f"Syntax: {'EHLO' if extended else 'HELO'} hostname")
            return None
        return Hello(name, extended)

    def _cmd_ehlo(self, arg: bytes) -> Event | None:
        return self._cmd_helo(arg, True)

    def _cmd_helo_plain(self, arg: bytes) -> Event | None:
        return self._cmd_helo(arg, False)

    def _cmd_mail(self, arg: bytes) -> Event | None:
        c = self.config
        if self.helo is None:
            self._error(503, "5.5.1", "Error: send HELO/EHLO first")
            return None
        if c.auth_required and self.authenticated is None:
            if c.auth_mechanisms and not self._auth_offered():  # RFC 3207 4
                self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            else:
                self._error(530, "5.7.0", "Authentication required")
            return None
        if self.mail_from is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command")
            return None
        parsed = self._path(arg, "FROM")
        if parsed is None:
            return None
        address, params = parsed
        size: int | None = None
        smtputf8 = False
        for key, value in params.items():
            if key == "SIZE" and value is not None and value.isascii() and value.isdigit():
                # ASCII digits only (str.isdigit takes '²', which int() refuses, and
                # Arabic-Indic digits); any number of them: 20 digits are over every
                # maximum, a 552 (RFC 1870 6.1), not a syntax error.
                size = int(value) if len(value) < 19 else 1 << 63
            elif key == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                if value.upper() == "8BITMIME" and not c.eightbitmime:
                    self._bad_param(key)
                    return None
            elif key == "SMTPUTF8" and value is None and c.smtputf8:
                smtputf8 = True
            elif key == "AUTH" and value is not None:
                pass  # RFC 4954 5: accepted and not relied on
            elif key in ("RET", "ENVID") and c.dsn:
                if key == "RET" and value is not None and value.upper() in ("FULL", "HDRS"):
                    params[key] = value.upper()
                elif key == "ENVID" and value and len(value) <= 100 and _XTEXT.fullmatch(value):
                    pass  # (RFC 3461 4.4: at most 100 characters)
                else:
                    self._error(501, "5.5.4", f"Bad {key} parameter syntax")
                    return None
            else:
                self._bad_param(key)
                return None
        if not self._check_address(address, smtputf8, null_ok=True):
            return None
        if size is not None and c.max_message_size and size > c.max_message_size:
            self._error(552, "5.3.4", "Message size exceeds fixed maximum message size")
            return None
        return MailFrom(address, params, size, smtputf8)

    def _bad_param(self, key: str) -> None:
        self._error(555, "5.5.4", f"Unsupported parameter {key}")

    def _cmd_rcpt(self, arg: bytes) -> Event | None:
        if self.mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return None
        parsed = self._path(arg, "TO")
        if parsed is None:
            return None
        address, params = parsed
        for key, value in params.items():
            if key not in ("NOTIFY", "ORCPT") or not self.config.dsn:
                self._bad_param(key)
                return None
            if key == "NOTIFY":
                words = (value or "").upper().split(",")
                if words != ["NEVER"] and not (words and set(words) <= _NOTIFY
                                               and len(set(words)) == len(words)):  # fmt: skip
                    self._error(501, "5.5.4", "Bad NOTIFY parameter syntax")
                    return None
                params[key] = ",".join(words)
            else:  # ORCPT=addr-type;xtext (RFC 3461 4.2), at most 500 characters
                kind, semi, addr = (value or "").partition(";")
                if not (semi and addr and len(value or "") <= 500
                        and _ADDR_TYPE.fullmatch(kind)
                        and (_UTF8_XTEXT if self.smtputf8 else _XTEXT).fullmatch(addr)):  # fmt: skip
                    self._error(501, "5.5.4", "Bad ORCPT parameter syntax")
                    return None
        if not self._check_address(address, self.smtputf8, null_ok=False):
            return None
        if self._rcpt_count >= self.config.max_recipients:
            self._out.append(b"452 4.5.3 Error: too many recipients\r\n")
            return None
        self._rcpt_count += 1
        return RcptTo(address, params)

    def _path(self, arg: bytes, word: str) -> tuple[str, dict[str, str | None]] | None:
        text = self._text_arg(arg)
        if text is None:
            return None
        m = _PATH.match(text)
        if m is None or m.group(1).upper() != word:
            self._error(
                501, "5.5.4", f"Syntax: {'MAIL FROM' if word == 'FROM' else 'RCPT TO'}:<address>"
            )
            return None
        address = m.group(2)
        if address.startswith("@") and ":" in address:  # source route: ignore it (RFC 5321 C)
            address = address.split(":", 1)[1]
        params: dict[str, str | None] = {}
        for item in (m.group(3) or "").split():
            key, eq, value = item.partition("=")
            if not _PARAM_KEY.match(key) or key.upper() in params:  # (each once)
                self._error(501, "5.5.4", "Syntax error in parameters")
                return None
            params[key.upper()] = value if eq else None
        return address, params

    def _check_address(self, address: str, utf8: bool, null_ok: bool) -> bool:
        if not address:
            if null_ok:
                return True
            self._error(501, "5.1.3", "Bad recipient address syntax")
            return False
        plain = address
        if address[0] == '"':  # a quoted local part: the domain is held to the rules below
            m = _QUOTED_LOCAL.match(address)
            plain = "q" + address[m.end() - 1 :] if m is not None and m.end() > 3 else "\0"
        if plain.endswith("]"):
            # An address literal (RFC 5321 4.1.3: [192.0.2.1], [IPv6:2001:db8::1]) is a
            # domain as any other here, as Postfix takes it; whether mail may go to
            # that address is the caller's policy (and delivery's: no private ones).
            local, at, lit = plain.rpartition("@[")
            if not at or not _address_literal(lit[:-1]):
                self._error(501, "5.1.3", "Bad address literal")
                return False
            plain = local + "@literal"
        bad = len(address) > _MAX_PATH or _ADDR_BAD.search(plain) is not None
        if not bad:
            local, at, domain = plain.rpartition("@")
            if at:
                bad = not local or not domain or "@" in domain
            else:
                bad = address.lower() != "postmaster"
        if bad:
            self._error(501, "5.1.3", "Bad address syntax")
            return False
        if not utf8 and not address.isascii():
            self._error(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
            return False
        return True

    def _cmd_data(self, arg: bytes) -> Event | None:
        if arg.strip():
            self._error(501, "5.5.4", "Syntax: DATA")
        elif self.mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
        elif self._used_bdat:
            self._error(503, "5.5.1", "Error: DATA after BDAT")
        elif not self.recipients:
            self._error(554, "5.5.1", "Error: no valid recipients")
        else:
            return DataStart(bdat=False)
        self._sync_after_data()
        return None

    def _sync_after_data(self) -> None:
        """A refused DATA with input after it that came before its reply (RFC 2920
        3.1: DATA ends a group; the client waits for 354): that input is the
        message, which would be run as commands (a body's "RCPT TO:" line, its
        "." and QUIT ...). Refused as Exim refuses a synchronization error: 554,
        the session closed, nothing of it read."""
        if (self._buf or self.input_after) and self.mode != _CLOSED:
            self._out.append(self._format(
                554, "5.5.0", "SMTP synchronization error: input sent after DATA before its reply"
            ))  # fmt: skip
            self.mode = _CLOSED
            self._buf.clear()

    def _cmd_bdat(self, arg: bytes) -> Event | None:
        parts = arg.split()
        if (
            not self.config.chunking
            or not 1 <= len(parts) <= 2
            or not parts[0].isdigit()
            or len(parts[0]) > 18
            or (len(parts) == 2 and parts[1].upper() != b"LAST")
        ):
            # The chunk's octets follow whatever we answer, and where they end
            # cannot be told: read as commands, a "RCPT TO:" line of a message
            # joined the open transaction. The session ends here (RFC 3030 has
            # no way on; Postfix disconnects too).
            self._error(501, "5.5.4", "Syntax: BDAT size [LAST]; closing connection")
            self.mode = _CLOSED
            self._buf.clear()
            return None
        size = int(parts[0])
        self._bdat_left = size
        self._bdat_last = len(parts) == 2
        self.mode = _BDAT
        first = not self._used_bdat
        if self.mail_from is None:
            self._bdat_failed = "503 5.5.1 Error: need MAIL command"
        elif not self.recipients:
            self._bdat_failed = "554 5.5.1 Error: no valid recipients"
        limit = self.config.max_message_size
        if not self._bdat_failed and limit and self._bdat_size + size > limit:
            self._bdat_failed = "552 5.3.4 Message size exceeds fixed maximum message size"
            self._bdat_chunks = []
        self._bdat_size += size
        if self.mail_from is not None:
            self._used_bdat = True
        if first and not self._bdat_failed:
            return DataStart(bdat=True, needs_reply=False)
        return None

    def _cmd_rset(self, arg: bytes) -> Event | None:
        if arg.strip():  # RFC 5321 4.1.1.5: "RSET" CRLF, no argument (Postfix: 501)
            self._error(501, "5.5.4", "Syntax: RSET")
            return None
        self._reset_txn()
        self._out.append(b"250 2.0.0 Ok\r\n")
        return None

    def _cmd_noop(self, arg: bytes) -> Event | None:
        self._out.append(b"250 2.0.0 Ok\r\n")
        return None

    def _cmd_quit(self, arg: bytes) -> Event | None:
        if arg.strip():  # RFC 5321 4.1.1.10: "QUIT" CRLF, no argument (Postfix: 501)
            self._error(501, "5.5.4", "Syntax: QUIT")
            return None
        self._out.append(b"221 2.0.0 Bye\r\n")
        self.mode = _CLOSED
        self._buf.clear()
        return None

    def _cmd_vrfy(self, arg: bytes) -> Event | None:
        if not arg.strip():  # RFC 5321 4.1.1.6: VRFY names a string (Postfix: 501)
            self._error(501, "5.5.4", "Syntax: VRFY address")
            return None
        self._out.append(b"252 2.5.0 Cannot VRFY user, but will accept message\r\n")
        return None

    def _cmd_expn(self, arg: bytes) -> Event | None:
        self._out.append(b"502 5.5.1 EXPN not implemented\r\n")
        return None

    def _cmd_help(self, arg: bytes) -> Event | None:
        self._out.append(b"214 2.0.0 See RFC 5321\r\n")
        return None

    def _cmd_starttls(self, arg: bytes) -> Event | None:
        if not self.config.starttls or self.tls_active:
            self._error(502 if not self.config.starttls else 503, "5.5.1", "STARTTLS not available")
            return None
        if arg.strip():
            self._error(501, "5.5.4", "Syntax: STARTTLS")
            return None
        if self.mail_from is not None:
            self._error(503, "5.5.1", "Error: STARTTLS inside a transaction")
            return None
        return StartTLS()

    def _cmd_star(self, arg: bytes) -> Event | None:  # "STAR" + "TTLS" without a space
        self._error(500, "5.5.2", "Command unrecognized")
        return None

    # ------------------------------------------------------------ AUTH

    def _cmd_auth(self, arg: bytes) -> Event | None:
        c = self.config
        if not c.auth_mechanisms:
            self._error(502, "5.5.1", "AUTH not available")
            return None
        if not self._auth_offered():
            # RFC 4954 4, 6: a mechanism usable only over an encrypted connection;
            # the client is told to STARTTLS first (before: 503, "not available").
            self._error(538, "5.7.11", "Encryption required for requested authentication"
                        " mechanism: STARTTLS first")  # fmt: skip
            return None
        if self.helo is None:
            # RFC 4954 4: AUTH follows EHLO; after STARTTLS too (RFC 3207 4.2: the
            # session starts over, the client's EHLO forgotten), as Postfix answers.
            self._error(503, "5.5.1", "Error: send HELO/EHLO first")
            return None
        if self.authenticated is not None or self.mail_from is not None:
            self._error(503, "5.5.1", "Error: AUTH not allowed now")
            return None
        parts = arg.split()
        if not 1 <= len(parts) <= 2:
            self._error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return None
        mech = parts[0].decode("ascii", "replace").upper()
        if mech not in self.config.auth_mechanisms or mech not in ("PLAIN", "LOGIN"):
            self._error(504, "5.5.4", "Unrecognized authentication type")
            return None
        self._auth_mech = mech
        self._auth_user = None
        if len(parts) == 2:
            return self._auth_line(parts[1])
        self.mode = _AUTH
        self._out.append(b"334 \r\n" if mech == "PLAIN" else b"334 VXNlcm5hbWU6\r\n")
        return None

    def _auth_line(self, line: bytes) -> Event | None:
        """One base64 line of the AUTH exchange (initial response or a continuation)."""
        mech = self._auth_mech
        self.mode = _CMD
        if line == b"*":
            self._auth_mech, self._auth_user = "", None
            self._error(501, "5.7.0", "Authentication cancelled")
            return None
        try:
            raw = b"" if line == b"=" else base64.b64decode(line, validate=True)
            text = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            self._auth_mech, self._auth_user = "", None
            self._error(501, "5.5.2", "Invalid base64 data")
            return None
        if mech == "PLAIN":
            fields = text.split("\0")
            self._auth_mech = ""
            if len(fields) != 3 or not fields[1]:
                self._error(501, "5.5.2", "Invalid PLAIN credentials")
                return None
            return AuthRequest("PLAIN", fields[0], fields[1], fields[2])
        if self._auth_user is None:  # LOGIN: the user name, then ask for the password
            self._auth_user = text
            self.mode = _AUTH
            self._out.append(b"334 UGFzc3dvcmQ6\r\n")
            return None
        user, self._auth_user, self._auth_mech = self._auth_user, None, ""
        return AuthRequest("LOGIN", "", user, text)

    # ------------------------------------------------------------ message bodies

    def _data(self) -> Event | _NeedData | None:
        buf = self._buf
        idx = buf.find(b"\r\n.\r\n", self._scan)
        limit = self.config.max_message_size
        keep = self.config.keep_bytes
        if idx < 0:
            n = len(buf)
            if keep and n > 4 and not self._data_overflow and len(self._head) + n > keep + 6:
                # Past what is kept: the start stays (with DATA's CRLF), the rest goes;
                # the last 4 bytes may begin the end marker.
                room = keep + 2 - len(self._head)
                if room > 0:
                    self._head += buf[:room] if room < n - 4 else buf[: n - 4]
                self._data_seen += n - 4
                del buf[: n - 4]
                self._scan = 0
                n = 4
            if n > 4 and (
                self._data_overflow or (limit and self._data_seen + n > limit + limit // 8 + 1024)
            ):
                # Far over SIZE (or dropped): keep scanning for the end but stop storing.
                self._data_overflow = True
                self._data_seen += n - 4
                del buf[: n - 4]
                self._scan = 0
            else:
                self._scan = max(0, n - 4)
            return NEED_DATA
        cut = bool(self._head) or bool(keep and idx > keep)
        if cut:  # cut at keep_bytes: the start only
            body = bytes(self._head or buf[: keep + 2])
            self._head = bytearray()
        else:
            body = bytes(buf[: idx + 2])  # starts with the CRLF kept from "DATA"
        del buf[: idx + 5]
        self._scan = 0
        self.mode = _CMD
        if b"\r\n." in body:
            body = body.replace(b"\r\n.", b"\r\n")  # dot-unstuffing (RFC 5321 4.5.2)
        body = body[2:]
        if self._drop_reply:
            self._reset_txn()
            self._out.append(self._drop_reply)
            self._drop_reply = b""
            return None
        too_big = self._data_seen + idx - 2 > limit if cut else len(body) > limit
        if self._data_overflow or (limit and too_big):
            self._reset_txn()
            self._out.append(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
            return None
        if self.config.reject_bare_newlines:
            n_crlf = body.count(b"\r\n")
            if body.count(b"\n") != n_crlf or body.count(b"\r") != n_crlf:
                self._reset_txn()
                self._out.append(b"550 5.5.2 Error: bare <CR> or <LF> in message data\r\n")
                return None
        assert self.mail_from is not None
        return Message(self.mail_from, self.recipients, body, self.smtputf8, False,
                       self.mail_params, self._rcpt_params)  # fmt: skip

    def _bdat(self) -> Event | _NeedData | None:
        buf = self._buf
        take = min(self._bdat_left, len(buf))
        if take:
            keep = self.config.keep_bytes
            if self._bdat_failed:
                pass
            elif not keep:
                self._bdat_chunks.append(bytes(buf[:take]))
            elif self._kept < keep:  # (cut at keep_bytes: the start only)
                part = bytes(buf[: min(take, keep - self._kept)])
                self._bdat_chunks.append(part)
                self._kept += len(part)
            del buf[:take]
            self._bdat_left -= take
        if self._bdat_left:
            return NEED_DATA
        self.mode = _CMD
        if self._bdat_failed:
            self._out.append(self._bdat_failed.encode() + b"\r\n")
            if self._bdat_last:
                self._reset_txn()
            return None
        if not self._bdat_last:
            self._out.append(f"250 2.0.0 {self._bdat_size} octets received\r\n".encode())
            return None
        assert self.mail_from is not None
        body = b"".join(self._bdat_chunks)
        self._bdat_chunks = []
        return Message(self.mail_from, self.recipients, body, self.smtputf8, True,
                       self.mail_params, self._rcpt_params)  # fmt: skip


def _address_literal(text: str) -> bool:
    """Whether ``text`` (between the brackets) is an IPv4 address or ``IPv6:`` and an
    IPv6 address (RFC 5321 4.1.3; no other tag is registered)."""
    if "%" in text:  # (a zone index: no address another host can reach)
        return False
    try:
        if text[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(text[5:])
        else:
            ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def xtext_decode(text: str) -> str:
    """An xtext value (RFC 3461 4: ``+XX`` a hex-coded octet) decoded; the
    protocol took only well-formed ones. Octets that are no printable ASCII are
    kept as their ``+XX``: the value goes into header fields."""

    def one(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if " " <= ch <= "~" else m.group(0)

    return re.sub(r"\+([0-9A-F]{2})", one, text)


def _clean_text(text: str) -> str:
    """Reply text without CR or other controls (a newline splits lines)."""
    if text.isprintable():  # the common case: nothing to clean
        return text
    text = text.replace("\r\n", "\n").replace("\r", " ")
    return "".join(ch if ch >= " " or ch == "\n" else " " for ch in text)


_HANDLERS: Final = {
    b"EHLO": ServerProtocol._cmd_ehlo,
    b"HELO": ServerProtocol._cmd_helo_plain,
    b"MAIL": ServerProtocol._cmd_mail,
    b"RCPT": ServerProtocol._cmd_rcpt,
    b"DATA": ServerProtocol._cmd_data,
    b"BDAT": ServerProtocol._cmd_bdat,
    b"RSET": ServerProtocol._cmd_rset,
    b"NOOP": ServerProtocol._cmd_noop,
    b"QUIT": ServerProtocol._cmd_quit,
    b"VRFY": ServerProtocol._cmd_vrfy,
    b"EXPN": ServerProtocol._cmd_expn,
    b"HELP": ServerProtocol._cmd_help,
    b"AUTH": ServerProtocol._cmd_auth,
    b"STAR": ServerProtocol._cmd_star,
}
