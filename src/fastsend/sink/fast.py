"""The sink's fast path: a line scanner for the common SMTP session, sans-I/O.

NAME
    fastsend.sink.fast -- SinkScanner (pure-Python reference; the compiled twin of
    the same name lives in ``fastsend._core``, ``_sink.pxi``).

DESCRIPTION
    A load-test receiver spends its time on EHLO, MAIL, RCPT, DATA, the body,
    RSET, NOOP and QUIT, always well formed. :class:`SinkScanner` answers exactly
    those, with the same reply bytes as :class:`fastsend.smtp.server.ServerProtocol`
    answered by the sink, without building events, dataclasses or the body: the
    body is scanned line by line (end marker, dot-stuffing, bare CR/LF, size)
    and only counted.

    Everything else -- any command or argument it does not recognise as the
    plain form (errors included), STARTTLS, AUTH, BDAT, SMTPUTF8, a recipient
    the fault hook wants the full path for -- is *handed over*: ``state``
    becomes HANDOVER, ``rest`` holds the unconsumed bytes from that command on,
    and ``helo``, ``esmtp``, ``mail_from``, ``recipients``, ``rcpt_count`` the
    session so far. The caller then builds a ServerProtocol with that state and
    feeds it ``rest``; the connection stays on the full path from then on. So
    behaviour never differs from the full path: the fast path only skips work.

    ``feed(data)`` returns the reply bytes to write (b"" if none). ``state``:
    RUNNING, CLOSED (QUIT answered: write, then close), HANDOVER.

    Hooks: ``rcpt_hook(address)`` is called for recipients whose local part
    starts like a fault prefix (or for every recipient when ``hook_all``); it
    returns None (accept), reply bytes (refuse this recipient), or False (hand
    over). ``on_message(recipients, size)`` counts an accepted message and
    returns its reply bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

RUNNING: Final = 0
CLOSED: Final = 1
HANDOVER: Final = 2

_R_MAIL_OK: Final = b"250 2.1.0 Ok\r\n"
_R_RCPT_OK: Final = b"250 2.1.5 Ok\r\n"
_R_DATA_OK: Final = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_R_OK: Final = b"250 2.0.0 Ok\r\n"
_R_BYE: Final = b"221 2.0.0 Bye\r\n"
_R_TOO_BIG: Final = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
_R_BARE: Final = b"550 5.5.2 Error: bare <CR> or <LF> in message data\r\n"

_FAULT_FIRST: Final = frozenset(b"tdp4smTDPSM")
# Bytes allowed in a fast-path address: printable ASCII except "()<>,;\[] and space.
_ADDR_OK: Final = frozenset(range(0x21, 0x7F)) - frozenset(b'"()<>,;\\[]')
_KEY_OK: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_MAX_PATH: Final = 256
_LONG_LINE: Final = 65536  # a body line longer than this is counted in pieces

_CMD, _DATA = 0, 1


def _address_ok(a: bytes) -> bool:
    """The plain form only (anything else goes to the full path, which decides)."""
    if not a or len(a) > _MAX_PATH or a[0] == 0x40:  # '@': a source route
        return False
    at = a.rfind(b"@")
    if at <= 0 or at == len(a) - 1:
        return False
    return all(b in _ADDR_OK for b in a)


class SinkScanner:
    """One connection's fast path (see the module docstring)."""

    __slots__ = (
        "_at_start",
        "_bad",
        "_ehlo_reply",
        "_helo_reply",
        "_max_line",
        "_max_rcpt",
        "_max_size",
        "_mode",
        "_prev_crlf",
        "_size",
        "_tail",
        "esmtp",
        "helo",
        "hook_all",
        "mail_from",
        "on_message",
        "rcpt_count",
        "rcpt_hook",
        "recipients",
        "rest",
        "state",
    )

    def __init__(
        self,
        ehlo_reply: bytes,
        helo_reply: bytes,
        max_size: int,
        max_recipients: int,
        max_line: int,
        on_message: Callable[[list[str], int], bytes],
        rcpt_hook: Callable[[str], bytes | bool | None],
        hook_all: bool,
    ) -> None:
        self._ehlo_reply = ehlo_reply
        self._helo_reply = helo_reply
        self._max_size = max_size
        self._max_rcpt = max_recipients
        self._max_line = max_line
        self.on_message = on_message
        self.rcpt_hook = rcpt_hook
        self.hook_all = hook_all
        self._mode = _CMD
        self._tail = b""
        self._prev_crlf = True
        self._at_start = True
        self._bad = False
        self._size = 0
        self.state = RUNNING
        self.rest = b""
        self.helo: str | None = None
        self.esmtp = False
        self.mail_from: str | None = None
        self.recipients: list[str] = []
        self.rcpt_count = 0

    def feed(self, data: bytes) -> bytes:
        if self.state != RUNNING:
            return b""
        buf = self._tail + data if self._tail else data
        self._tail = b""
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        while pos < n:
            if self._mode == _DATA:
                pos = self._body(buf, pos, n, out)
                if self._mode == _DATA:
                    break
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if n - pos >= self._max_line:
                    self._handover(buf, pos)
                else:
                    self._tail = buf[pos:]
                break
            if nl == pos or buf[nl - 1] != 0x0D or nl + 1 - pos > self._max_line:
                self._handover(buf, pos)
                break
            reply = self._command(buf[pos : nl - 1])
            if reply is None:
                self._handover(buf, pos)
                break
            out.append(reply)
            pos = nl + 1
            if self.state == CLOSED:
                break
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _handover(self, buf: bytes, pos: int) -> None:
        self.state = HANDOVER
        self.rest = buf[pos:]

    def _reset(self) -> None:
        self.mail_from = None
        self.recipients = []
        self.rcpt_count = 0

    # ------------------------------------------------------------ commands

    def _command(self, line: bytes) -> bytes | None:
        """The reply to one command line, or None: hand it over."""
        for b in line:
            if b < 0x20 or b >= 0x7F:
                return None
        verb = line[:4].upper()
        if len(line) > 4 and line[4] != 0x20:
            return None
        arg = line[5:]
        if verb == b"MAIL":
            return self._mail(arg)
        if verb == b"RCPT":
            return self._rcpt(arg)
        if verb == b"DATA":
            if arg or self.mail_from is None or not self.recipients:
                return None
            self._mode = _DATA
            self._prev_crlf = True
            self._at_start = True
            self._bad = False
            self._size = 0
            return _R_DATA_OK
        if verb == b"EHLO" or verb == b"HELO":
            name = arg.strip()
            if not name or b" " in name:
                return None
            self.helo = name.decode("ascii")
            self.esmtp = verb == b"EHLO"
            self._reset()
            return self._ehlo_reply if self.esmtp else self._helo_reply
        if arg:
            return None
        if verb == b"RSET":
            self._reset()
            return _R_OK
        if verb == b"NOOP":
            return _R_OK
        if verb == b"QUIT":
            self.state = CLOSED
            return _R_BYE
        return None

    def _path(self, arg: bytes, word: bytes) -> tuple[bytes, bytes] | None:
        """``WORD:<address>`` then optional `` params``: (address, params) or None."""
        k = len(word)
        if arg[:k].upper() != word:
            return None
        i = k + 1 if arg[k : k + 1] == b" " else k
        if arg[i : i + 1] != b"<":
            return None
        end = arg.find(b">", i + 1)
        if end < 0:
            return None
        address = arg[i + 1 : end]
        if b"<" in address:
            return None
        params = arg[end + 1 :]
        if params and params[0] != 0x20:
            return None
        return address, params

    def _mail(self, arg: bytes) -> bytes | None:
        if self.helo is None or self.mail_from is not None:
            return None
        parsed = self._path(arg, b"FROM:")
        if parsed is None:
            return None
        address, params = parsed
        if address and not _address_ok(address):
            return None
        for item in params.split(b" "):
            if not item:
                continue
            key, eq, value = item.partition(b"=")
            if not eq or not key or key[0] == 0x2D or any(b not in _KEY_OK for b in key):
                return None
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit() or len(value) >= 19:
                    return None
                if self._max_size and int(value) > self._max_size:
                    return None
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return None
            else:
                return None
        self.mail_from = address.decode("ascii")
        self.recipients = []
        self.rcpt_count = 0
        return _R_MAIL_OK

    def _rcpt(self, arg: bytes) -> bytes | None:
        if self.mail_from is None or self.rcpt_count >= self._max_rcpt:
            return None
        parsed = self._path(arg, b"TO:")
        if parsed is None:
            return None
        address, params = parsed
        if params or not _address_ok(address):
            return None
        text = address.decode("ascii")
        reply: bytes | bool | None = None
        if self.hook_all or address[0] in _FAULT_FIRST:
            reply = self.rcpt_hook(text)
            if reply is False:
                return None
        self.rcpt_count += 1
        if reply is None:
            self.recipients.append(text)
            return _R_RCPT_OK
        return reply  # type: ignore[return-value]

    # ------------------------------------------------------------ the body

    def _body(self, buf: bytes, pos: int, n: int, out: list[bytes]) -> int:
        """Scan body lines from ``pos``; returns where it stopped."""
        while pos < n:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if n - pos > _LONG_LINE:  # count a long line in pieces, keep the last byte
                    self._piece(buf, pos, n - 1)
                    pos = n - 1
                self._tail = buf[pos:]
                return n
            start = self._at_start
            if (
                start
                and self._prev_crlf
                and nl - pos == 2
                and buf[pos] == 0x2E
                and buf[pos + 1] == 0x0D
            ):
                out.append(self._end_message())
                return nl + 1
            crlf = nl > pos and buf[nl - 1] == 0x0D
            if not crlf or buf.find(b"\r", pos, nl - 1) >= 0:
                self._bad = True
            size = nl + 1 - pos
            if start and self._prev_crlf and buf[pos] == 0x2E:
                size -= 1  # dot-stuffing
            self._size += size
            self._prev_crlf = crlf
            self._at_start = True
            pos = nl + 1
        return pos

    def _piece(self, buf: bytes, pos: int, end: int) -> None:
        """Part of a line with no LF yet (``end`` excluded)."""
        size = end - pos
        if self._at_start and self._prev_crlf and buf[pos] == 0x2E:
            size -= 1
        if buf.find(b"\r", pos, end) >= 0:
            self._bad = True
        self._size += size
        self._at_start = False

    def _end_message(self) -> bytes:
        self._mode = _CMD
        recipients = self.recipients
        size = self._size
        bad = self._bad
        self._reset()
        if self._max_size and size > self._max_size:
            return _R_TOO_BIG
        if bad:
            return _R_BARE
        return self.on_message(recipients, size)
