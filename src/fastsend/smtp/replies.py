"""SMTP reply parsing and body encoding: the pure-Python twins of ``_smtp.pxi``.

:class:`ReplyParser` turns the bytes a server sends into complete replies,
handling multi-line replies (``250-...`` continuation lines, RFC 5321 section
4.2.1) and RFC 2034/3463 enhanced status codes. A reply is a plain tuple
``(code, enhanced, text)``: the three-digit code, the enhanced code
("2.1.5", or "" when the server sent none) and the text of every line with
its enhanced code removed, lines joined by ``"\\n"``.

:func:`dot_stuff` turns a message into the bytes of a DATA body: every line
starting with "." gets a second one (RFC 5321 section 4.5.2), a missing final
CRLF is added, and the ``.`` terminator is appended (then, optionally, the
bytes that follow it on the wire).

Both have compiled twins of the same names in ``fastsend._core``;
``fastsend._accel.pick`` chooses. This module does no I/O and keeps no state
beyond the parser's partial line; it does not interpret what a reply means
(that is ``client.py``'s job).
"""

from __future__ import annotations

import re

from fastsend._accel import pick
from fastsend.smtp.errors import RemoteProtocolError

Reply = tuple[int, str, str]

# RFC 5321 section 4.5.3.1.5 allows 512 octets per reply line; real servers
# (and their banners) are sloppier, so be lenient but bounded: an endless line
# or an endless multi-line reply from a hostile peer must not eat memory.
MAX_LINE = 4096
MAX_LINES = 512

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|\Z)", re.ASCII)


class ReplyParser:
    """Incremental parser: ``feed(bytes) -> list[Reply]`` (complete replies only).

    Raises :class:`RemoteProtocolError` on anything that is not a reply: a
    line without a three-digit code in 200-599, a bad separator, a
    continuation line with a different code, an over-long line or reply.
    After an error the parser is unusable (the connection must be dropped).
    """

    __slots__ = ("_buf", "_code", "_enhanced", "_lines")

    def __init__(self) -> None:
        self._buf = b""
        self._code = 0
        self._enhanced = ""
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """True while a partial line or an unfinished multi-line reply is buffered."""
        return bool(self._buf) or self._code != 0

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._buf + data if self._buf else data
        out: list[Reply] = []
        start = 0
        find = buf.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            end = nl - 1 if nl > start and buf[nl - 1] == 13 else nl
            if end - start > MAX_LINE:
                raise RemoteProtocolError(f"reply line longer than {MAX_LINE} octets")
            self._line(buf[start:end], out)
            start = nl + 1
        rest = buf[start:]
        if len(rest) > MAX_LINE:
            raise RemoteProtocolError(f"reply line longer than {MAX_LINE} octets")
        self._buf = rest
        return out

    def _line(self, line: bytes, out: list[Reply]) -> None:
        n = len(line)
        if n < 3 or not (50 <= line[0] <= 53 and 48 <= line[1] <= 57 and 48 <= line[2] <= 57):
            raise RemoteProtocolError(f"not an SMTP reply line: {line[:80]!r}")
        code = (line[0] - 48) * 100 + (line[1] - 48) * 10 + (line[2] - 48)
        if n == 3:
            sep = 32
        else:
            sep = line[3]
            if sep != 32 and sep != 45:  # " " or "-"
                raise RemoteProtocolError(f"bad separator in reply line: {line[:80]!r}")
        if self._code and code != self._code:
            raise RemoteProtocolError(f"multi-line reply changed code from {self._code} to {code}")
        text = line[4:].decode("utf-8", "replace")
        m = _ENHANCED.match(text)
        if m is not None and int(m.group(1)) == code // 100:
            if not self._enhanced:
                self._enhanced = text[: m.end()].rstrip(" ")
            text = text[m.end() :]
        if sep == 45:
            if len(self._lines) >= MAX_LINES:
                raise RemoteProtocolError(f"multi-line reply longer than {MAX_LINES} lines")
            self._code = code
            self._lines.append(text)
            return
        if self._lines:
            self._lines.append(text)
            text = "\n".join(self._lines)
            self._lines = []
        out.append((code, self._enhanced, text))
        self._code = 0
        self._enhanced = ""


def dot_stuff(data: bytes, tail: bytes = b"") -> bytes:
    """The DATA body for ``data``: dot-stuffed, CRLF-terminated, ending ``.\\r\\n``,
    followed by ``tail`` (the next commands of a pipelined session, built into
    the same buffer instead of being joined to a copy of the message).

    A "." after a bare CR is stuffed too, so no "<CR>.<CR>"-style end-of-data
    sequence can be smuggled through a server that treats bare CR or LF as a
    line end.
    """
    body = data.replace(b"\n.", b"\n..")
    if body[:1] == b".":
        body = b"." + body
    if b"\r." in body:
        body = re.sub(rb"\r(?!\n)\.", b"\r..", body)
    if body[-2:] != b"\r\n":
        body += b"\r\n" if body else b""
    return body + b".\r\n" + tail


def queue_id(text: str) -> str:
    """The receiving server's own id of a message it took, from the text of its
    2xx reply to the end of data (the delivery record's and event's
    ``queue_id``: what its operator greps its logs for), in the formats MTAs
    document: Postfix (and most) ``Ok: queued as 4F1ABC123``, Exim ``OK
    id=1tAbCd-000XyZ-AB`` (after a BDAT's ``1234 byte chunk, total 1234``
    line too), Gmail ``OK 1700000000 a640c23a62f3a-a9e5...si.123 - gsmtp``,
    Sendmail ``x8GJ3kVl012345 Message accepted for delivery``. Any other: the
    whole text (which may hold it), as before."""
    k = text.find("queued as ")
    if k >= 0:
        return _token(text, k + 10)
    k = text.find("id=")
    if k >= 0 and (k == 0 or text[k - 1] in " \n(["):
        return _token(text, k + 3)
    k = text.find(" - gsmtp")
    if k > 0:
        words = text[:k].split()
        return words[-1] if words else text
    k = text.find(" Message accepted for delivery")
    if k > 0:
        return _token(text, 0)
    return text


def _token(text: str, start: int) -> str:
    """The word of ``text`` from ``start`` to the next space or line end, less a
    closing ``)``, ``]``, ``,``, ``;`` or ``.`` (an id is never empty: else ``text``)."""
    end = start
    n = len(text)
    while end < n and text[end] not in " \n\t":
        end += 1
    while end > start and text[end - 1] in ")],;.":
        end -= 1
    return text[start:end] if end > start else text


# The readable references stay reachable for the tests (``impl`` fixture).
PyReplyParser = ReplyParser
py_dot_stuff = dot_stuff
py_queue_id = queue_id
ReplyParser = pick(PyReplyParser)  # type: ignore[misc]
dot_stuff = pick(py_dot_stuff)
queue_id = pick(py_queue_id)
