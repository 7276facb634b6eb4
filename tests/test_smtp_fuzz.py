"""Fuzz the sans-I/O client: whatever a server sends, only RemoteProtocolError.

Random bytes and random well-formed-looking replies are fed, in random chunks,
to clients in every interesting state; the only exception allowed out of
``receive_data`` is :class:`RemoteProtocolError`, and afterwards
``connection_lost`` must decide every recipient of every envelope.
The reply parsers (pure and compiled) must agree on every input, and so must
the two twins of the client's core (``ClientCore``): the same events, the same
bytes to write and the same error for the same server bytes, however split.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _smtp_helpers import client_class
from fastsend import _accel
from fastsend.outcome import Envelope, TxnResult
from fastsend.smtp import replies
from fastsend.smtp.errors import RemoteProtocolError

SETTINGS = settings(
    max_examples=int(os.environ.get("FASTSEND_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CODES = [211, 220, 221, 235, 250, 251, 334, 354, 421, 450, 451, 452, 500, 502, 503, 535, 550, 554]

reply_line = st.builds(
    lambda code, sep, enh, text, end: b"%d%s%s%s%s" % (code, sep, enh, text, end),
    st.sampled_from(CODES) | st.integers(0, 999),
    st.sampled_from([b" ", b"-", b"", b"x"]),
    st.sampled_from([b"", b"2.0.0 ", b"5.1.1 ", b"4.7.0 ", b"2.1.5"]),
    st.binary(max_size=20)
    | st.sampled_from([b"PIPELINING", b"SIZE 10", b"STARTTLS", b"AUTH LOGIN"]),
    st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
)
valid_reply = st.builds(
    lambda code, text: b"%d %s\r\n" % (code, text),
    st.sampled_from(CODES),
    st.sampled_from([b"ok", b"2.0.0 queued as X", b"4.7.0 later", b""]),
)
server_bytes = st.lists(
    valid_reply | valid_reply | reply_line | st.binary(max_size=40), max_size=25
).map(b"".join)


def envelopes() -> list[Envelope]:
    return [
        Envelope("s@example.org", ["a@example.com", "b@example.com"], b"one\r\n", tag=1),
        Envelope("s@example.org", ["c@example.com"], b".two", tag=2, eightbit=True),
    ]


def client_twins() -> list[Any]:
    """The reference client, and the compiled one when built."""
    return [client_class("py")] + ([client_class("c")] if _accel.HAVE_EXTENSIONS else [])


def client_in(state: str, cls: Any) -> tuple[Any, list[Envelope]]:
    c = cls("client.example", mx="mx:25")
    envs: list[Envelope] = []
    if state == "greeting":
        return c, envs
    c.receive_data(b"220 hi\r\n")
    c.send_ehlo()
    if state == "ehlo":
        return c, envs
    caps = b"250-PIPELINING\r\n" if state != "plain" else b""
    if state == "bdat":
        caps += b"250-CHUNKING\r\n"
    # (8BITMIME: envelope 2 is 8-bit; without it the client refuses it at
    # once, 5.6.3, RFC 6152 3, and sends only envelope 1)
    caps += b"250-8BITMIME\r\n"
    c.receive_data(b"250-mx\r\n" + caps + b"250-STARTTLS\r\n250 AUTH LOGIN PLAIN\r\n")
    if state == "starttls":
        c.send_starttls()
    elif state == "auth":
        c.send_auth("user", "pw", "LOGIN", in_clear=True)
    elif state in ("pipelined", "plain", "bdat"):
        envs = envelopes()
        c.send_envelopes(envs)
    return c, envs


STATES = ["greeting", "ehlo", "ready", "starttls", "auth", "pipelined", "plain", "bdat"]


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


@SETTINGS
@given(st.sampled_from(STATES), server_bytes, st.lists(st.integers(0, 10_000), max_size=6))
def test_garbage_only_raises_remote_protocol_error(
    state: str, data: bytes, cuts: list[int]
) -> None:
    seen = []
    for cls in client_twins():
        c, envs = client_in(state, cls)
        results: list[Any] = []
        wire: list[bytes] = []
        error = ""
        try:
            for piece in chunks(data, cuts):
                results += c.receive_data(piece)
                wire.append(c.data_to_send())
        except RemoteProtocolError as e:
            error = str(e)
        results += c.connection_lost("gone")
        txns = [r for r in results if isinstance(r, TxnResult)]
        # every envelope got exactly one result, each recipient exactly one outcome
        assert [t.tag for t in txns] == [e.tag for e in envs]
        for t, e in zip(txns, envs, strict=True):
            assert len(t.outcomes) == len(e.rcpts)
            assert all(o.kind in ("delivered", "deferred", "failed") for o in t.outcomes)
        assert not c.busy
        seen.append((results, wire, error, c.state, c.expecting))
    # the twins: the same events, writes, error, state
    assert all(x == seen[0] for x in seen), seen


def _parse(cls: Any, data: bytes) -> Any:
    try:
        return cls().feed(data)
    except RemoteProtocolError:
        return "error"


@SETTINGS
@given(server_bytes)
def test_parsers_agree(data: bytes) -> None:
    if not _accel.HAVE_EXTENSIONS:
        return
    assert _parse(replies.PyReplyParser, data) == _parse(_accel.compiled("ReplyParser"), data)


@SETTINGS
@given(
    st.binary(max_size=200) | st.lists(st.sampled_from([b".", b"\r", b"\n", b"a"])).map(b"".join)
)
def test_dot_stuff_twins_agree_and_never_end_data_early(data: bytes) -> None:
    body = replies.py_dot_stuff(data)
    if _accel.HAVE_EXTENSIONS:
        assert _accel.compiled("dot_stuff")(data) == body
        assert _accel.compiled("dot_stuff")(data, data) == body + data
    assert body.endswith(b"\r\n.\r\n") or body == b".\r\n"
    inner = body[:-3]
    # no line inside the body is a lone dot, whatever a server takes as a line end
    assert b"." not in re.split(rb"\r\n|\r|\n", inner)
