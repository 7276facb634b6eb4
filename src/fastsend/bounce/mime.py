"""A lean MIME reader for bounces: the part tree as ``email.message.Message``
objects (compat32), built with a few linear scans instead of the standard
library's line-by-line feed parser.

A bounce is read once for its structure and only a few of its parts are
decoded (text/*, message/delivery-status, message/feedback-report, the
returned headers), so the work that matters is splitting: the feed parser
pushes every line through a generator and compiles a new regular expression
for every multipart boundary, which cost more than the whole classification.

What it keeps from the standard parser (so every caller can use the usual
``Message`` API: ``get``, ``get_all``, ``get_content_type``,
``get_payload(decode=True)``, ``raw_items``):

* header lines are what RFC 5322 section 2.2 allows (printable ASCII name,
  colon); folded lines stay in the value as received; a leading ``From ``
  line is the mbox envelope; the first line that is not a header starts the
  body (but see below);
* a multipart is split on lines that are exactly ``--boundary`` (optionally
  ``--`` and blanks after it, RFC 2046 section 5.1.1); the line break before
  a delimiter belongs to the delimiter; a missing close delimiter ends the
  last part at the end of the input; no delimiter at all leaves the body as
  text; parts of multipart/digest default to message/rfc822;
* bytes are read as ASCII with surrogate escapes, as
  ``email.message_from_bytes`` does, so ``get_payload(decode=True)`` gives
  back the original bytes.

It differs on purpose in two ways. A line ``name=value`` (no colon) right
after a field whose value ends in ``;`` is that field's next parameter, its
fold's leading blank lost (Apache James / JavaMail write
``Content-Type: multipart/alternative;`` then ``boundary="..."`` at the line
start): the standard parser starts the body there and loses the boundary,
so the whole part tree, and the reply in it, read as one text (at most
eight such lines a head). And message/* parts (an attached original, a
delivery-status or feedback report) keep their body as text and are not
parsed further; the bounce parser reads them as text, and parses an attached
message only when it needs its headers.

Every scan moves forward through the input (``str.find`` from the last
position), so the time is linear in the size of the message.
"""

from __future__ import annotations

import email.message
import re
from typing import Any

_MAX_DEPTH = 20


# What the standard parser takes as a header line: an RFC 5322 field name
# (printable ASCII but ':') and a colon; a continuation; the mbox envelope
# line. A header field from its line start: the name, the blanks after the colon,
# the value with its continuation lines (as received, up to the last one's
# line break: a slice of the text, as the lines' pieces joined would be).
_FIELD = re.compile(r"([!-9;-~]*):[ \t]*([^\n]*(?:\n[ \t][^\n]*)*)(?:\n|\Z)")


# A MIME parameter line ("boundary=...", "charset=...") on its own line
# without the blank that would make it a continuation.
_LOST_FOLD = re.compile(r"[A-Za-z][A-Za-z0-9*_.-]{0,60}=[^\n:]*(?:\n|\Z)").match
_MAX_LOST_FOLDS = 8


def _split_head(text: str, pos: int) -> tuple[list[tuple[str, str]], str | None, int]:
    """(headers, unixfrom, body start) of the entity starting at ``pos``.

    Line by line: a blank line ends the head (the body after it); a line
    that is not a header line (a field name and a colon, a continuation, a
    "From " line) is the body's first; a "From "
    line is the mbox envelope when it comes first (skipped elsewhere); a
    continuation line belongs to the field before it (none: skipped); a
    field named "" (a line starting with ":") is skipped."""
    headers: list[tuple[str, str]] = []
    unixfrom = None
    first = True
    lost = 0
    n = len(text)
    match = _FIELD.match
    while pos < n:
        c = text[pos]
        if c == "\n":
            pos += 1  # the blank line separating head and body
            break
        if c == " " or c == "\t" or text.startswith("From ", pos):
            end = text.find("\n", pos)
            if first and c == "F":
                unixfrom = text[pos : n if end < 0 else end]
            first = False
            pos = n if end < 0 else end + 1
            continue
        m = match(text, pos)
        if m is None:
            p = _LOST_FOLD(text, pos)
            if (
                p is None
                or lost >= _MAX_LOST_FOLDS
                or not headers
                or not headers[-1][1].rstrip().endswith(";")
            ):
                break  # no separator: the body starts here
            # A parameter of the field before, its fold's blank lost
            # ("Content-Type: multipart/alternative;\nboundary=..."), as
            # some Java mailers write it: still that field's. (A few per
            # head: the value is copied each time.)
            lost += 1
            name, value = headers[-1]
            headers[-1] = (name, value + "\n " + p.group(0).rstrip("\n"))
            pos = p.end()
            continue
        first = False
        name = m.group(1)
        if name:
            headers.append((name, m.group(2)))
        pos = m.end()
    return headers, unixfrom, min(pos, n)


def _split_multipart(body: str, boundary: str) -> list[str] | None:
    """The parts between ``--boundary`` lines; None when there is none."""
    delim = "--" + boundary
    starts: list[tuple[int, int, bool]] = []  # (line start, next line start, closing)
    n = len(body)
    if body.startswith(delim):
        pos = 0
    else:
        pos = body.find("\n" + delim)
        if pos >= 0:
            pos += 1
    while pos >= 0:
        end = body.find("\n", pos)
        eol = n if end < 0 else end
        rest = body[pos + len(delim) : eol].rstrip(" \t")
        if rest in ("", "--"):
            starts.append((pos, n if end < 0 else end + 1, rest == "--"))
            if rest == "--":
                break
        if end < 0:
            break
        pos = body.find("\n" + delim, end)
        if pos >= 0:
            pos += 1
    if not starts:
        return None
    parts = []
    for k, (_, begin, closing) in enumerate(starts):
        if closing:
            break
        if k + 1 < len(starts):
            stop = starts[k + 1][0] - 1  # the line break before a delimiter is the delimiter's
            parts.append(body[begin : max(begin, stop)])
        else:
            parts.append(body[begin:])
    return parts


class _Part(email.message.Message):
    """A compat32 ``Message`` whose ``get`` (and so ``get_content_type``,
    ``get_param``, ``get_boundary``) looks a field up in a dict of the head's
    first fields by lower-cased name, built on the first call, instead of
    lower-casing and comparing every field name on every call (a bounce
    part is asked for a dozen fields; each scan was ~30% of the reader's
    time). A header whose value is not plain ASCII (surrogate-escaped 8-bit
    bytes) goes through the standard ``get``, which wraps it in a Header. A
    change to the head (a new header list, a field added, removed or
    replaced) drops the index."""

    _fs_index: dict[str, str] | None = None
    _fs_of: list[tuple[str, str]] | None = None
    _fs_len = -1
    # header name (lower case) -> its parameters as the standard library parses
    # them (_get_params_preserve), or the content type: kept with the index, so
    # a part's Content-Type is parsed once, not at each get_content_type,
    # get_boundary and get_content_charset (~12% of the reader's time).
    _fs_parsed: dict[str, Any] | None = None

    def _fs(self) -> dict[str, str]:
        heads: list[tuple[str, str]] = self._headers  # type: ignore[attr-defined]
        index = self._fs_index
        if index is None or self._fs_of is not heads or self._fs_len != len(heads):
            index = {}
            for k, v in heads:
                index.setdefault(k.lower(), v)
            self._fs_index, self._fs_of, self._fs_len = index, heads, len(heads)
            self._fs_parsed = {}
        return index

    def get(self, name, failobj=None):  # type: ignore[no-untyped-def,override]
        value = self._fs().get(name.lower())
        if value is None:
            return failobj
        if value.isascii():
            return value
        return super().get(name, failobj)

    def get_content_type(self) -> str:
        self._fs()
        parsed = self._fs_parsed
        assert parsed is not None
        got = parsed.get(" type")
        if got is None:
            got = parsed[" type"] = super().get_content_type()
        return str(got)

    def get_param(self, param, failobj=None, header="content-type", unquote=True):  # type: ignore[no-untyped-def,override]
        index = self._fs()
        key = header.lower()
        if key not in index:
            return failobj
        parsed = self._fs_parsed
        assert parsed is not None
        params = parsed.get(key)
        if params is None:
            params = parsed[key] = self._get_params_preserve(failobj, header)  # type: ignore[attr-defined]
            if params is failobj:
                del parsed[key]
                return failobj
        want = param.lower()
        for k, v in params:
            if k.lower() == want:
                return email.message._unquotevalue(v) if unquote else v  # type: ignore[attr-defined]
        return failobj

    def replace_header(self, _name, _value):  # type: ignore[no-untyped-def]
        self._fs_index = None
        super().replace_header(_name, _value)


def _build(text: str, pos: int, depth: int, default_type: str) -> email.message.Message:
    headers, unixfrom, start = _split_head(text, pos)
    msg = _Part()
    for name, value in headers:
        msg.set_raw(name, value)
    if unixfrom is not None:
        msg.set_unixfrom(unixfrom)
    if default_type != "text/plain":
        msg.set_default_type(default_type)
    body = text[start:]
    ctype = msg.get_content_type()
    if ctype.startswith("multipart/") and depth < _MAX_DEPTH:
        boundary = msg.get_boundary()
        pieces = _split_multipart(body, boundary) if boundary else None
        if pieces is not None:
            sub_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            msg.set_payload([_build(p, 0, depth + 1, sub_default) for p in pieces])
            return msg
    msg.set_payload(body)
    return msg


def message_from_string(text: str) -> email.message.Message:
    """``text`` (one message) as a tree of compat32 ``Message`` objects."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _build(text, 0, 0, "text/plain")


def message_from_bytes(data: bytes) -> email.message.Message:
    """As ``email.message_from_bytes(data, policy=compat32)`` reads it."""
    return message_from_string(bytes(data).decode("ascii", "surrogateescape"))
