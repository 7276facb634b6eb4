"""The sans-I/O SMTP client with no sockets: scripted server replies, table-driven.

Each row is (what the server says, what the client must write next); the
final results are compared as (kind, code, enhanced, stage) per recipient.
Everything here runs over both twins of the client's core (``ClientCore``,
``impl``), and so do reply parsing and dot-stuffing.
"""

from __future__ import annotations

from typing import Any

import pytest

from _smtp_helpers import client_class
from fastsend import _accel
from fastsend.outcome import Envelope, Outcome, TxnResult
from fastsend.smtp import client as cl
from fastsend.smtp import replies
from fastsend.smtp.client import CommandDone, SMTPClient
from fastsend.smtp.errors import LocalProtocolError, RemoteProtocolError

FULL = ("PIPELINING", "SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8")


@pytest.fixture(autouse=True)
def client_twin(impl: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``SMTPClient`` in this module: the reference, or over the compiled core."""
    monkeypatch.setitem(globals(), "SMTPClient", client_class(impl))
    return impl


def ready(caps: tuple[str, ...] = FULL) -> SMTPClient:
    c = SMTPClient("client.example", mx="mx.example:25")
    assert c.receive_data(b"220 mx.example ESMTP\r\n")[0].ok
    assert c.send_ehlo() == b"EHLO client.example\r\n"
    lines = [b"250-mx.example greets you"] + [b"250-" + k.encode() for k in caps] + [b"250 HELP"]
    (ev,) = c.receive_data(b"\r\n".join(lines) + b"\r\n")
    assert isinstance(ev, CommandDone) and ev.command == "ehlo" and ev.ok
    assert c.state == cl.READY
    return c


def summary(results: list[Any]) -> list[tuple[str, list[tuple[str, int, str, str]]]]:
    out = []
    for r in results:
        assert isinstance(r, TxnResult)
        out.append((r.queue_id, [(o.kind, o.code, o.enhanced, o.stage) for o in r.outcomes]))
    return out


def env(*rcpts: str, data: bytes = b"hello\r\n", tag: object = None, **kw: Any) -> Envelope:
    return Envelope("sender@example.org", list(rcpts), data, tag=tag, **kw)


DELIVERED = ("delivered", 250, "2.0.0", "data")

# (name, capabilities, envelopes, [(server bytes, client bytes expected next)], results)
CASES: list[tuple[str, tuple[str, ...], list[Envelope], list[tuple[bytes, bytes]], Any]] = [
    (
        "one recipient, pipelined",
        FULL,
        [env("a@example.com")],
        [
            (b"", b"MAIL FROM:<sender@example.org> SIZE=7\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"),
            (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n", b"hello\r\n.\r\n"),
            (b"250 2.0.0 Ok: queued as 4XyZ1\r\n", b""),
        ],
        [("4XyZ1", [DELIVERED])],
    ),
    (
        "one of two recipients refused",
        FULL,
        [env("a@example.com", "b@example.com")],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org> SIZE=7\r\n"
                b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
            ),
            (
                b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <b@example.com> unknown\r\n354 go\r\n",
                b"hello\r\n.\r\n",
            ),
            (b"250 2.0.0 Ok\r\n", b""),
        ],
        [("Ok", [DELIVERED, ("failed", 550, "5.1.1", "rcpt")])],
    ),
    (
        "multi-line replies: an accepted RCPT, a refused one, the end of data",
        FULL,
        [env("a@example.com", "b@example.com")],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org> SIZE=7\r\n"
                b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
            ),
            (
                b"250 2.1.0 Ok\r\n250-2.1.5 first\r\n250 2.1.5 second\r\n"
                b"550-5.1.1 no such\r\n550 5.1.1 user\r\n354 go\r\n",
                b"hello\r\n.\r\n",
            ),
            (b"250-2.0.0 Ok\r\n250 2.0.0 queued as MLQ\r\n", b""),
        ],
        [("MLQ", [DELIVERED, ("failed", 550, "5.1.1", "rcpt")])],
    ),
    (
        "every recipient refused, DATA answered 554, RSET follows",
        FULL,
        [env("a@example.com", "b@example.com")],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org> SIZE=7\r\n"
                b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
            ),
            (
                b"250 2.1.0 Ok\r\n450 4.2.0 greylisted\r\n550 5.1.1 unknown\r\n"
                b"554 5.5.1 Error: no valid recipients\r\n",
                b"RSET\r\n",
            ),
            (b"250 2.0.0 Ok\r\n", b""),
        ],
        [("", [("deferred", 450, "4.2.0", "rcpt"), ("failed", 550, "5.1.1", "rcpt")])],
    ),
    (
        "every recipient refused, yet 354: a lone dot ends it",
        FULL,
        [env("a@example.com")],
        [
            (b"", b"MAIL FROM:<sender@example.org> SIZE=7\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"),
            (b"250 Ok\r\n550 no\r\n354 go\r\n", b".\r\n"),
            (b"554 no valid recipients\r\n", b""),
        ],
        [("", [("failed", 550, "", "rcpt")])],
    ),
    (
        "MAIL refused: every recipient fails at mail, no RSET needed",
        FULL,
        [env("a@example.com", "b@example.com")],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org> SIZE=7\r\n"
                b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
            ),
            (
                b"553 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                b"503 5.5.1 need MAIL\r\n",
                b"",
            ),
        ],
        [("", [("failed", 553, "5.7.1", "mail")] * 2)],
    ),
    (
        "DATA refused 451: accepted recipients deferred at data, then RSET",
        FULL,
        [env("a@example.com")],
        [
            (b"", b"MAIL FROM:<sender@example.org> SIZE=7\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"),
            (b"250 Ok\r\n250 Ok\r\n451 4.3.0 try later\r\n", b"RSET\r\n"),
            (b"250 Ok\r\n", b""),
        ],
        [("", [("deferred", 451, "4.3.0", "data")])],
    ),
    (
        "two messages: the first body and the second MAIL share one write",
        FULL,
        [env("a@example.com", tag=1), env("b@example.com", data=b"two\r\n", tag=2)],
        [
            (b"", b"MAIL FROM:<sender@example.org> SIZE=7\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"),
            (
                b"250 Ok\r\n250 Ok\r\n354 go\r\n",
                b"hello\r\n.\r\nMAIL FROM:<sender@example.org> SIZE=5\r\n"
                b"RCPT TO:<b@example.com>\r\nDATA\r\n",
            ),
            (b"250 2.0.0 queued as A\r\n250 Ok\r\n250 Ok\r\n354 go\r\n", b"two\r\n.\r\n"),
            (b"452 4.3.1 disk full\r\n", b""),
        ],
        [("A", [DELIVERED]), ("", [("deferred", 452, "4.3.1", "data")])],
    ),
    (
        "421 at RCPT defers everything and closes",
        FULL,
        [env("a@example.com", "b@example.com"), env("c@example.com")],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org> SIZE=7\r\n"
                b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
            ),
            (b"250 Ok\r\n421 4.7.0 too many connections\r\n", b""),
        ],
        [
            ("", [("deferred", 421, "4.7.0", "rcpt")] * 2),
            ("", [("deferred", 421, "4.7.0", "mail")]),
        ],
    ),
    (
        "no PIPELINING: one command at a time",
        ("8BITMIME",),
        [env("a@example.com", "b@example.com", eightbit=True)],
        [
            (b"", b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n"),
            (b"250 Ok\r\n", b"RCPT TO:<a@example.com>\r\n"),
            (b"550 no\r\n", b"RCPT TO:<b@example.com>\r\n"),
            (b"250 Ok\r\n", b"DATA\r\n"),
            (b"354 go\r\n", b"hello\r\n.\r\n"),
            (b"250 Ok\r\n", b""),
        ],
        [("Ok", [("failed", 550, "", "rcpt"), ("delivered", 250, "", "data")])],
    ),
    (
        "no PIPELINING, every recipient refused: RSET instead of DATA",
        (),
        [env("a@example.com"), env("b@example.com")],
        [
            (b"", b"MAIL FROM:<sender@example.org>\r\n"),
            (b"250 Ok\r\n", b"RCPT TO:<a@example.com>\r\n"),
            (b"550 no\r\n", b"RSET\r\nMAIL FROM:<sender@example.org>\r\n"),
            (b"250 Ok\r\n250 Ok\r\n", b"RCPT TO:<b@example.com>\r\n"),
            (b"250 Ok\r\n", b"DATA\r\n"),
            (b"354 go\r\n", b"hello\r\n.\r\n"),
            (b"250 Ok\r\n", b""),
        ],
        [("", [("failed", 550, "", "rcpt")]), ("Ok", [("delivered", 250, "", "data")])],
    ),
    (
        "dot-stuffing, a missing final CRLF, SMTPUTF8 and 8BITMIME parameters",
        FULL,
        [env("ü@example.com", data=b".hidden\r\nline\r\n.\r\nend", eightbit=True)],
        [
            (
                b"",
                "MAIL FROM:<sender@example.org> SIZE=21 BODY=8BITMIME SMTPUTF8\r\n"
                "RCPT TO:<ü@example.com>\r\nDATA\r\n".encode(),
            ),
            (b"250 Ok\r\n250 Ok\r\n354 go\r\n", b"..hidden\r\nline\r\n..\r\nend\r\n.\r\n"),
            (b"250 2.0.0 Ok\r\n", b""),
        ],
        [("Ok", [DELIVERED])],
    ),
    (
        "SMTPUTF8 needed but not offered: fails at mail, nothing sent",
        ("PIPELINING",),
        [env("ü@example.com"), env("a@example.com")],
        [
            (b"", b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"),
            (b"250 Ok\r\n250 Ok\r\n354 go\r\n", b"hello\r\n.\r\n"),
            (b"250 Ok\r\n", b""),
        ],
        [("", [("failed", 0, "5.6.7", "mail")]), ("Ok", [("delivered", 250, "", "data")])],
    ),
    (
        "over the server's SIZE: fails at mail; a bad address fails locally",
        FULL,
        [env("a@example.com", data=b"x" * 100001), env("bad\r\nRSET@x", "b@example.com")],
        [
            (b"", b"MAIL FROM:<sender@example.org> SIZE=7\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"),
            (b"250 Ok\r\n250 Ok\r\n354 go\r\n", b"hello\r\n.\r\n"),
            (b"250 Ok\r\n", b""),
        ],
        [
            ("", [("failed", 0, "5.3.4", "mail")]),
            ("Ok", [("failed", 0, "5.1.3", "local"), ("delivered", 250, "", "data")]),
        ],
    ),
]


BDAT = ("PIPELINING", "CHUNKING", "ENHANCEDSTATUSCODES")
CASES += [
    (
        "BDAT: two transactions stream in one write, no dot-stuffing",
        BDAT,
        [env("a@example.com", "b@example.com", tag=1), env("c@example.com", data=b".x", tag=2)],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.com>\r\n"
                b"RCPT TO:<b@example.com>\r\nBDAT 7 LAST\r\nhello\r\n"
                b"RSET\r\nMAIL FROM:<sender@example.org>\r\nRCPT TO:<c@example.com>\r\n"
                b"BDAT 4 LAST\r\n.x\r\n",
            ),
            (
                b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 unknown\r\n250 2.0.0 queued as B1\r\n"
                b"250 2.0.0 Reset\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.3.0 later\r\n",
                b"",
            ),
        ],
        [
            ("B1", [DELIVERED, ("failed", 550, "5.1.1", "rcpt")]),
            ("", [("deferred", 451, "4.3.0", "data")]),
        ],
    ),
    (
        "BDAT: every recipient refused, the chunk is answered and ignored; RSET before the"
        " next MAIL ends the failed transaction (RFC 3030), so the next one is delivered",
        BDAT,
        [env("a@example.com", tag=1), env("b@example.com", tag=2)],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.com>\r\n"
                b"BDAT 7 LAST\r\nhello\r\n"
                b"RSET\r\nMAIL FROM:<sender@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                b"BDAT 7 LAST\r\nhello\r\n",
            ),
            (
                b"250 Ok\r\n550 5.1.1 no\r\n503 5.5.1 valid RCPT must precede BDAT\r\n"
                b"250 Reset\r\n250 Ok\r\n250 Ok\r\n250 2.0.0 queued as Q2\r\n",
                b"",
            ),
        ],
        [("", [("failed", 550, "5.1.1", "rcpt")]), ("Q2", [DELIVERED])],
    ),
    (
        "BDAT: a server that kept the old transaction (503 to MAIL) and then took the"
        " message under it: the recipient is delivered, not failed and sent again",
        BDAT,
        [env("a@example.com", tag=1), env("b@example.com", tag=2)],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.com>\r\n"
                b"BDAT 7 LAST\r\nhello\r\n"
                b"RSET\r\nMAIL FROM:<sender@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                b"BDAT 7 LAST\r\nhello\r\n",
            ),
            (
                b"250 Ok\r\n550 5.1.1 no\r\n503 5.5.1 no valid recipients\r\n"
                b"500 5.5.2 what\r\n503 5.5.1 sender already given\r\n250 Ok\r\n"
                b"250 2.0.0 queued as Q3\r\n",
                b"",
            ),
        ],
        [("", [("failed", 550, "5.1.1", "rcpt")]), ("Q3", [DELIVERED])],
    ),
]


# Deferred messages (Envelope.data a callable, as the worker's DeferredMessage):
# made as the transaction starts; one that gives an Outcome (a render failure),
# exceeds the server's SIZE or raises sends nothing and is answered with it.
def made(data: Any) -> Any:
    return lambda: data


def broken() -> bytes:
    raise RuntimeError("no message")


RENDER_FAILED = Outcome("failed", 550, "5.6.0", "render: bad value", "local")
CASES += [
    (
        "deferred messages: made as each transaction starts, sent as bytes would be",
        FULL,
        [
            env("a@example.com", data=made(b"hello\r\n"), tag=1),
            env("b@example.com", data=made(b"two\r\n"), tag=2),
        ],
        [
            (b"", b"MAIL FROM:<sender@example.org> SIZE=7\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"),
            (
                b"250 Ok\r\n250 Ok\r\n354 go\r\n",
                b"hello\r\n.\r\nMAIL FROM:<sender@example.org> SIZE=5\r\n"
                b"RCPT TO:<b@example.com>\r\nDATA\r\n",
            ),
            (b"250 2.0.0 queued as A\r\n250 Ok\r\n250 Ok\r\n354 go\r\n", b"two\r\n.\r\n"),
            (b"250 2.0.0 queued as B\r\n", b""),
        ],
        [("A", [DELIVERED]), ("B", [DELIVERED])],
    ),
    (
        "deferred messages that cannot be made (an Outcome, over SIZE, a bug) send nothing",
        FULL,
        [
            env("a@example.com", "b@example.com", data=made(RENDER_FAILED), tag=1),
            env("c@example.com", data=made(b"x" * 100_001), tag=2),
            env("d@example.com", data=broken, tag=3),
            env("e@example.com", data=made(b"hello\r\n"), tag=4),
        ],
        [
            (b"", b"MAIL FROM:<sender@example.org> SIZE=7\r\nRCPT TO:<e@example.com>\r\nDATA\r\n"),
            (b"250 Ok\r\n250 Ok\r\n354 go\r\n", b"hello\r\n.\r\n"),
            (b"250 2.0.0 queued as E\r\n", b""),
        ],
        [
            ("", [("failed", 550, "5.6.0", "local")] * 2),
            ("", [("failed", 0, "5.3.4", "mail")]),
            ("", [("deferred", 451, "4.3.0", "local")]),
            ("E", [DELIVERED]),
        ],
    ),
    (
        "BDAT: a deferred message is made as its transaction streams; one that cannot be"
        " sends nothing",
        BDAT,
        [
            env("a@example.com", data=made(RENDER_FAILED), tag=1),
            env("b@example.com", data=made(b"hello\r\n"), tag=2),
        ],
        [
            (
                b"",
                b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                b"BDAT 7 LAST\r\nhello\r\n",
            ),
            (b"250 Ok\r\n250 Ok\r\n250 2.0.0 queued as Q\r\n", b""),
        ],
        [("", [("failed", 550, "5.6.0", "local")]), ("Q", [DELIVERED])],
    ),
]


def test_a_deferred_message_is_made_when_its_transaction_starts() -> None:
    """Not when it is queued: only the message about to be sent exists as bytes."""
    c = ready()
    calls: list[int] = []

    def maker(i: int) -> Any:
        return lambda: calls.append(i) or b"m%d\r\n" % i

    c.send_envelopes([env(f"r{i}@example.com", data=maker(i), tag=i) for i in range(3)])
    assert calls == [0]
    c.receive_data(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert calls == [0, 1]  # the second starts as the first body goes
    assert c.data_to_send().startswith(b"m0\r\n.\r\nMAIL FROM:")


def test_bdat_reset_after_a_failed_transaction() -> None:
    """A failed BDAT with nothing else in flight: the next transaction starts with RSET;
    after a successful one it does not."""
    c = ready(BDAT)
    c.send_envelopes([env("a@example.com")])
    c.receive_data(b"250 Ok\r\n250 Ok\r\n554 5.6.0 content rejected\r\n")
    assert c.send_envelopes([env("b@example.com")]).startswith(b"RSET\r\nMAIL FROM:")
    c.receive_data(b"250 Reset\r\n250 Ok\r\n250 Ok\r\n250 2.0.0 Ok\r\n")
    assert c.send_envelopes([env("c@example.com")]).startswith(b"MAIL FROM:")


def test_bdat_window_and_chunking_off() -> None:
    c = ready(BDAT)
    wire = c.send_envelopes([env(f"r{i}@example.com", tag=i) for i in range(cl.BDAT_WINDOW + 3)])
    assert wire.count(b"BDAT 7 LAST") == cl.BDAT_WINDOW
    c.receive_data(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n")  # one whole transaction done
    assert c.data_to_send().count(b"BDAT 7 LAST") == 1  # the window refills by one
    big = ready(BDAT)
    wire = big.send_envelopes([env("a@example.com", data=b"z" * 400_000 + b"\r\n")] * 5)
    assert wire.count(b"BDAT 400002 LAST") == 3  # the byte window: 3 x 400 kB in flight
    big.receive_data(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n")
    assert big.data_to_send().count(b"BDAT") == 1
    c2 = SMTPClient("client.example", chunking=False)
    c2.receive_data(b"220 hi\r\n")
    c2.send_ehlo()
    c2.receive_data(b"250-hi\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    assert c2.send_envelopes([env("a@example.com")]).endswith(b"DATA\r\n")


@pytest.fixture
def twins(impl: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the client over the chosen reply parser and dot-stuffer."""
    monkeypatch.setattr(cl, "ReplyParser", parser_cls(impl))
    monkeypatch.setattr(cl, "dot_stuff", stuffer(impl))
    return impl


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_transactions(case: Any, twins: str) -> None:
    _name, caps, envelopes, script, expected = case
    c = ready(caps)
    results: list[Any] = []
    wire = c.send_envelopes(envelopes)
    results += c.events()
    for server, client_next in script:
        if server:
            results += c.receive_data(server)
            wire = c.data_to_send()
        assert wire == client_next
    assert summary(results) == expected
    assert not c.busy


def play(cls: Any, case: Any, step: int) -> tuple[list[Any], list[bytes]]:
    """A case's script over ``cls``, the server's bytes in pieces of ``step``
    (0: whole): every event (compared whole, texts included) and each write."""
    _name, caps, envelopes, script, _expected = case
    monkey = pytest.MonkeyPatch()
    monkey.setitem(globals(), "SMTPClient", cls)
    try:
        c = ready(caps)
    finally:
        monkey.undo()
    results: list[Any] = []
    writes = [c.send_envelopes(envelopes)]
    results += c.events()
    for server, _client_next in script:
        if not server:
            continue
        n = step or len(server)
        wrote = []
        for k in range(0, len(server), n):
            results += c.receive_data(server[k : k + n])
            wrote.append(c.data_to_send())
        writes.append(b"".join(wrote))
    return results, writes


@pytest.mark.parametrize("step", [1, 2, 7])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_transactions_split_reads_same_as_the_reference(
    case: Any, step: int, client_twin: str
) -> None:
    """Replies cut anywhere (a line, a multi-line reply, across replies) give the
    same events and writes as whole reads through the reference client."""
    assert play(SMTPClient, case, step) == play(cl.PySMTPClient, case, 0)


def test_connection_lost_mid_batch_defers_the_rest() -> None:
    c = ready()
    c.send_envelopes([env("a@example.com", "b@example.com", tag=1), env("c@example.com", tag=2)])
    c.receive_data(b"250 Ok\r\n250 Ok\r\n")  # MAIL, first RCPT
    results = c.connection_lost("connection reset")
    assert summary(results) == [
        ("", [("deferred", 0, "", "rcpt"), ("deferred", 0, "", "rcpt")]),
        ("", [("deferred", 0, "", "mail")]),
    ]
    assert results[0].outcomes[0].text == "connection reset"
    assert c.state == cl.CLOSED and not c.busy


def test_lost_after_the_dot_is_deferred_at_data() -> None:
    c = ready()
    c.send_envelopes([env("a@example.com")])
    c.receive_data(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert c.expecting == "dot"
    (r,) = c.connection_lost()
    assert [(o.kind, o.stage) for o in r.outcomes] == [("deferred", "data")]


def test_lost_after_a_pipelined_bdat_is_deferred_at_data_not_unstarted() -> None:
    """With CHUNKING, MAIL, RCPT and BDAT LAST go out in one write: a connection lost
    before any reply may have left the whole message with the server, so the outcome
    is at "data" (unknown: an attempt, retried later), not at "mail" (never started:
    sent again at once on another connection, a duplicate). Found by aud17v."""
    c = ready(BDAT)
    wire = c.send_envelopes([env("a@example.com", "b@example.com")])
    assert b"BDAT 7 LAST" in wire
    (r,) = c.connection_lost()
    assert [(o.kind, o.code, o.stage) for o in r.outcomes] == [("deferred", 0, "data")] * 2
    plain = ready()  # DATA: the body waits for 354, so nothing can have arrived
    plain.send_envelopes([env("a@example.com")])
    (r,) = plain.connection_lost()
    assert [(o.kind, o.stage) for o in r.outcomes] == [("deferred", "mail")]


def test_helo_fallback_and_no_capabilities() -> None:
    c = SMTPClient("client.example")
    c.receive_data(b"220 old server\r\n")
    c.send_ehlo()
    assert c.receive_data(b"502 5.5.2 command not recognized\r\n") == []
    assert c.data_to_send() == b"HELO client.example\r\n"
    (ev,) = c.receive_data(b"250 old server\r\n")
    assert ev.command == "helo" and ev.ok
    assert c.state == cl.READY and c.capabilities == {} and not c.pipelining


def test_capabilities_parsed() -> None:
    c = ready(("PIPELINING", "SIZE 1000", "AUTH=LOGIN", "STARTTLS", "CHUNKING", "8bitmime"))
    assert c.capabilities == {
        "PIPELINING": "",
        "SIZE": "1000",
        "AUTH": "LOGIN",
        "STARTTLS": "",
        "CHUNKING": "",
        "8BITMIME": "",
        "HELP": "",
    }
    assert c.size_limit == 1000 and c.pipelining


def test_auth_plain() -> None:
    c = ready(("AUTH PLAIN LOGIN",))
    assert c.send_auth("user", "pw", in_clear=True) == b"AUTH PLAIN AHVzZXIAcHc=\r\n"
    (ev,) = c.receive_data(b"235 2.7.0 Authentication successful\r\n")
    assert ev.command == "auth" and ev.ok and c.state == cl.READY


def test_auth_login() -> None:
    c = ready(("AUTH LOGIN",))
    assert c.send_auth("user", "pw", in_clear=True) == b"AUTH LOGIN\r\n"
    assert c.receive_data(b"334 VXNlcm5hbWU6\r\n") == []
    assert c.data_to_send() == b"dXNlcg==\r\n"
    assert c.receive_data(b"334 UGFzc3dvcmQ6\r\n") == []
    assert c.data_to_send() == b"cHc=\r\n"
    (ev,) = c.receive_data(b"535 5.7.8 bad credentials\r\n")
    assert not ev.ok and ev.outcome("auth", "mx").kind == "deferred"


def test_auth_password_never_in_clear_without_consent() -> None:
    """Without TLS, PLAIN and LOGIN (the password on the wire) are refused
    unless the caller allows clear text; CRAM-MD5 (RFC 2195) is chosen when
    offered; inside TLS PLAIN is the first choice."""
    c = ready(("AUTH PLAIN LOGIN",))
    assert c.auth_mechanism() == "" and c.auth_mechanism("plain") == ""
    assert c.auth_mechanism("LOGIN") == "" and c.auth_mechanism("", in_clear=True) == "PLAIN"
    with pytest.raises(LocalProtocolError):
        c.send_auth("user", "pw")
    with pytest.raises(LocalProtocolError):
        c.send_auth("user", "pw", "LOGIN")
    assert c.data_to_send() == b"" and c.state == cl.READY
    assert ready(("AUTH PLAIN CRAM-MD5",)).auth_mechanism() == "CRAM-MD5"
    assert ready(("AUTH PLAIN",)).auth_mechanism("CRAM-MD5") == "CRAM-MD5"
    t = ready(("AUTH LOGIN PLAIN CRAM-MD5",))
    t.tls_active = True
    assert t.auth_mechanism() == "PLAIN" and t.auth_mechanism("login") == "LOGIN"


def test_starttls_flow_and_injection_refused() -> None:
    c = ready(("STARTTLS", "PIPELINING"))
    assert c.send_starttls() == b"STARTTLS\r\n"
    (ev,) = c.receive_data(b"220 2.0.0 ready\r\n")
    assert ev.code == 220 and c.state == cl.TLS
    c.tls_established()
    assert c.state == cl.GREETED and c.capabilities == {} and c.tls_active
    assert c.send_ehlo() == b"EHLO client.example\r\n"

    c2 = ready(("STARTTLS",))
    c2.send_starttls()
    with pytest.raises(RemoteProtocolError):
        c2.receive_data(b"220 ready\r\n250 injected\r\n")


def test_quit() -> None:
    c = ready()
    assert c.send_quit() == b"QUIT\r\n"
    (ev,) = c.receive_data(b"221 2.0.0 Bye\r\n")
    assert ev.command == "quit" and c.state == cl.CLOSED


def test_local_errors() -> None:
    c = SMTPClient("client.example")
    with pytest.raises(LocalProtocolError):
        c.send_envelopes([env("a@example.com")])
    with pytest.raises(LocalProtocolError):
        SMTPClient("bad name\r\n")
    c = ready()
    c.send_envelopes([env("a@example.com")])
    with pytest.raises(LocalProtocolError):
        c.send_quit()  # transactions in flight


@pytest.mark.parametrize(
    "garbage",
    [b"hello\r\n", b"2500 x\r\n", b"250x\r\n", b"999 x\r\n", b"250-a\r\n251 b\r\n", b"9" * 9000],
)
def test_remote_errors(garbage: bytes) -> None:
    c = ready()
    c.send_envelopes([env("a@example.com")])
    with pytest.raises(RemoteProtocolError):
        c.receive_data(garbage)
    assert c.state == cl.CLOSED
    (r,) = c.connection_lost("protocol error")
    assert r.outcomes[0].kind == "deferred"


def test_unsolicited_replies() -> None:
    c = ready()
    with pytest.raises(RemoteProtocolError):
        c.receive_data(b"250 surprise\r\n")
    c = ready()
    (ev,) = c.receive_data(b"421 4.3.2 shutting down\r\n")
    assert ev.command == "unsolicited" and c.state == cl.CLOSED


# --- reply parsing and dot-stuffing over both implementations ------------------


def parser_cls(impl: str) -> Any:
    return replies.PyReplyParser if impl == "py" else _accel.compiled("ReplyParser")


def stuffer(impl: str) -> Any:
    return replies.py_dot_stuff if impl == "py" else _accel.compiled("dot_stuff")


REPLY_ROWS = [
    (b"250 ok\r\n", [(250, "", "ok")]),
    (b"250 2.1.5 Ok\r\n", [(250, "2.1.5", "Ok")]),
    (b"550 5.1.1\r\n", [(550, "5.1.1", "")]),
    (b"250 4.1.1 class mismatch\r\n", [(250, "", "4.1.1 class mismatch")]),
    (b"250\r\n", [(250, "", "")]),
    (b"250-a\r\n250-b c\r\n250 d\r\n", [(250, "", "a\nb c\nd")]),
    (b"550-5.7.1 one\r\n550 5.7.1 two\r\n", [(550, "5.7.1", "one\ntwo")]),
    (b"250 a\n354 b\r\n", [(250, "", "a"), (354, "", "b")]),
    (b"250 caf\xc3\xa9 \xff\r\n", [(250, "", "café \ufffd")]),
]


@pytest.mark.parametrize(("data", "expected"), REPLY_ROWS)
def test_reply_parser(impl: str, data: bytes, expected: list[tuple[int, str, str]]) -> None:
    assert parser_cls(impl)().feed(data) == expected
    # the same bytes one at a time give the same replies
    p = parser_cls(impl)()
    got: list[Any] = []
    for i in range(len(data)):
        got += p.feed(data[i : i + 1])
    assert got == expected and not p.pending


def test_reply_parser_repeated_lines(impl: str) -> None:
    """A session's replies repeat: the same line gives the same reply every time,
    also around multi-line replies whose lines match an earlier one-line reply
    (the compiled parser hands a recently seen line's reply back as is)."""
    stream = [
        b"250 2.1.5 Ok\r\n",
        b"250 2.1.5 Ok\r\n250 Ok\r\n",
        b"250-2.0.0 first\r\n250 Ok\r\n",  # the last line of a multi-line reply
        b"250 Ok\r\n",
        b"250 2.1.5 Ok\r\n354 go\r\n550 5.1.1 no\r\n451 4.3.0 later\r\n250 a\r\n",
        b"250 2.1.5 Ok\r\n354 go\r\n",
    ]
    expected = [
        [(250, "2.1.5", "Ok")],
        [(250, "2.1.5", "Ok"), (250, "", "Ok")],
        [(250, "2.0.0", "first\nOk")],
        [(250, "", "Ok")],
        [
            (250, "2.1.5", "Ok"),
            (354, "", "go"),
            (550, "5.1.1", "no"),
            (451, "4.3.0", "later"),
            (250, "", "a"),
        ],
        [(250, "2.1.5", "Ok"), (354, "", "go")],
    ]
    p = parser_cls(impl)()
    assert [p.feed(chunk) for chunk in stream] == expected
    assert not p.pending


@pytest.mark.parametrize(
    "data",
    [b"25 x\r\n", b"abc\r\n", b"250_x\r\n", b"150 x\r\n", b"650 x\r\n", b"250-a\r\n550 b\r\n"],
)
def test_reply_parser_rejects(impl: str, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parser_cls(impl)().feed(data)


def test_reply_parser_limits(impl: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parser_cls(impl)().feed(b"250 " + b"x" * 10000)
    with pytest.raises(RemoteProtocolError):
        parser_cls(impl)().feed(b"250-x\r\n" * 1000)


STUFF_ROWS = [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".a\r\n.\r\n..\r\n", b"..a\r\n..\r\n...\r\n.\r\n"),
    (b"a\n.\nb\r\n", b"a\n..\nb\r\n.\r\n"),
    (b"a\r.\rb\r\n", b"a\r..\rb\r\n.\r\n"),
]


@pytest.mark.parametrize(("data", "expected"), STUFF_ROWS)
def test_dot_stuff(impl: str, data: bytes, expected: bytes) -> None:
    assert stuffer(impl)(data) == expected
    # The next pipelined commands, built into the same buffer, are not stuffed.
    tail = b".MAIL FROM:<a@example.com>\r\n"
    assert stuffer(impl)(data, tail) == expected + tail


def test_a_refusal_at_rcpt_is_final_whatever_happens_to_the_session() -> None:
    """550 at RCPT, then the connection drops before the BDAT/DATA reply: the refused
    recipient stays failed (5xx), the accepted one is deferred (with BDAT nothing
    known: "data"; DATA without its 354: nothing sent, "data-command")."""
    for caps, stage in ((BDAT, "data"), (FULL, "data-command")):
        c = ready(caps)
        c.send_envelopes([env("gone@example.com", "ok@example.com", tag=1)])
        c.receive_data(b"250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n250 2.1.5 Ok\r\n")
        (res,) = c.connection_lost("connection reset")
        assert [(o.kind, o.code, o.stage) for o in res.outcomes] == [
            ("failed", 550, "rcpt"),
            ("deferred", 0, stage),
        ], caps


def test_made_messages_are_written_as_bytes_data_would_be() -> None:
    """Messages made by the client (the compiled core writes the end of DATA
    and the next commands past a made message's end when it can: no dot to
    double, the room it kept) go out octet for octet as the same messages
    given as bytes: dots doubled, a next transaction longer than that room."""
    from fastsend.message import Campaign

    r = Campaign.from_dict(
        {
            "from": "S <s@sender.example.com>",
            "subject": "Hi {{ name }}",
            "text": "{{ name }} here\nbye",
        }
    ).compile()
    fast = r.for_batch(True)
    assert fast is not None
    deferred, date = fast
    long_rcpt = "x" * 600 + "@example.com"  # its MAIL, RCPT, DATA: past the room kept
    # (the envelopes' recipients: the messages name r0@example.com, r1@...)
    names = ["plain", ".dot", "ann", "bob", "..two", "cy"]
    rcpts = [
        "a@example.com",
        "b@example.com",
        long_rcpt,
        "d@example.com",
        "e@example.com",
        "f@ex.com",
    ]

    def envelopes(made: bool) -> list[Envelope]:
        out = []
        for i, (name, rcpt) in enumerate(zip(names, rcpts, strict=True)):
            d = deferred({"name": name}, f"r{i}@example.com", f"m{i}", date, None)
            out.append(env(rcpt, data=d if made else d(), tag=i))
        return out

    def transcript(envs: list[Envelope]) -> tuple[bytes, list[Any]]:
        c = ready(("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"))
        wire = [c.send_envelopes(envs)]
        results = list(c.receive_data(b"250 Ok\r\n250 Ok\r\n354 go\r\n"))
        wire.append(c.data_to_send())
        for i in range(1, len(envs)):
            results += c.receive_data(
                b"250 2.0.0 queued as Q%d\r\n250 Ok\r\n250 Ok\r\n354 go\r\n" % i
            )
            wire.append(c.data_to_send())
        results += c.receive_data(b"250 2.0.0 queued as Z\r\n")
        wire.append(c.data_to_send())
        return b"".join(wire), summary(results)

    got, want = transcript(envelopes(True)), transcript(envelopes(False))
    assert got == want
    assert b"\r\n..dot here\r\n" in got[0] and b"\r\n...two here\r\n" in got[0]
    assert got[1] == [(f"Q{i}", [DELIVERED]) for i in range(1, 6)] + [("Z", [DELIVERED])]


def _rcpts(i: int) -> list[str]:
    """Envelope ``i``'s recipients: 1-3, every 7th with one refused locally
    (a space), every 11th with none that may be sent (decided locally)."""
    rcpts = [f"r{i}-{j}@example.com" for j in range(1 + i % 3)]
    if i % 7 == 3:
        rcpts[-1] = "bad address@example.com"
    if i % 11 == 5:
        rcpts = [f"bad {j}@example.com" for j in range(1 + i % 2)]
    return rcpts


def _drive(c: Any, garbage_at: int) -> tuple[list[Any], list[list[int]], list[bytes]]:
    """Answer whatever ``c`` waits for, one reply per read (354 to DATA, 250 to
    anything else), until nothing is pending, or a garbage line at read
    ``garbage_at``; what it waited for after each read, wrote and decided."""
    kinds: list[list[int]] = []
    wrote: list[bytes] = []
    results: list[Any] = []
    step = 0
    while pending := c._pending_kinds():
        if step == garbage_at:
            with pytest.raises(RemoteProtocolError):
                c.receive_data(b"hello\r\n")
            kinds.append(c._pending_kinds())
            results += summary(c.connection_lost("protocol error"))
            break
        if step == -garbage_at:  # the server goes away: 421 out of turn
            results += summary(c.receive_data(b"421 4.3.2 shutting down\r\n"))
            kinds.append(c._pending_kinds())
            break
        k = pending[0]
        reply = b"354 go\r\n" if k == cl._DATA else b"250 2.0.0 Ok: queued as Q%d\r\n" % step
        results += summary(c.receive_data(reply))
        kinds.append(c._pending_kinds())
        wrote.append(c.data_to_send())
        step += 1
    return results, kinds, wrote


@pytest.mark.parametrize("caps", [FULL, (*FULL, "CHUNKING"), ("8BITMIME",)])
@pytest.mark.parametrize("garbage_at", [-1000, 0, 5, 37, 150, -6, -40])
def test_twins_wait_for_the_same_replies(caps: tuple[str, ...], garbage_at: int) -> None:
    """The compiled core keeps what it waits for in a ring of structs (grown
    when full, wrapped around) and reads an envelope only when its
    transaction comes first, the reference keeps a deque of tuples and reads
    every envelope at once: through a long pipelined session (BDAT: up to 32
    transactions of 5 commands in flight; recipients refused locally, some
    envelopes with none to send), they wait for the same commands, write the
    same bytes and decide the same outcomes, in the same order, also when
    garbage ends the session half way (the command it answered is put back
    first: its stage names the deferral) or a 421 does (envelopes not yet
    read are deferred like the others)."""
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("fastsend._core not built")
    got = []
    for impl in ("py", "c"):
        c = client_class(impl)("client.example", mx="mx.example:25")
        c.receive_data(b"220 mx.example ESMTP\r\n")
        c.send_ehlo()
        lines = [b"250-mx.example"] + [b"250-" + k.encode() for k in caps] + [b"250 HELP"]
        c.receive_data(b"\r\n".join(lines) + b"\r\n")
        envs = [env(*_rcpts(i), tag=i) for i in range(45)]
        first = c.send_envelopes(envs)
        got.append((first, _drive(c, garbage_at), c.delivered_one))
    assert got[0] == got[1]
    results = got[0][1][0]
    assert got[0][2] == sum(1 for _q, outs in results if [o[0] for o in outs] == ["delivered"])
    assert len(results) == 45
    if garbage_at == -1000:  # answered to the end: what could be sent was delivered
        local = [o for _q, outs in results for o in outs if o[3] != "data"]
        assert local and all(o[0] == "failed" and o[2] == "5.1.3" for o in local)
        assert any(o[0] == "delivered" for _q, outs in results for o in outs)


@pytest.mark.parametrize("caps", [FULL, (*FULL, "CHUNKING"), ("8BITMIME",)])
@pytest.mark.parametrize("lost_at", [-1, 700, 1500])
def test_twins_keep_a_long_queue_topped_up_in_order(caps: tuple[str, ...], lost_at: int) -> None:
    """The compiled core keeps the transactions not started in a list read
    from a head index (taken ones dropped when the list empties, or when
    half of a long one is taken): 900 envelopes, more sent while hundreds
    still wait, the queue never empty for long. The twins write the same
    bytes, decide the same outcomes in the same order and name the same
    unsent tags at every step, also when the connection is lost part way."""
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("fastsend._core not built")
    got = []
    for impl in ("py", "c"):
        c = client_class(impl)("client.example", mx="mx.example:25")
        c.receive_data(b"220 mx.example ESMTP\r\n")
        c.send_ehlo()
        lines = [b"250-mx.example"] + [b"250-" + k.encode() for k in caps] + [b"250 HELP"]
        c.receive_data(b"\r\n".join(lines) + b"\r\n")
        wrote = [c.send_envelopes([env(*_rcpts(i), tag=i) for i in range(600)])]
        results: list[Any] = summary(c.events())
        unsent = []
        step, sent = 0, 600
        while pending := c._pending_kinds():
            if step == lost_at:
                results += summary(c.connection_lost("gone"))
                break
            if step in (300, 900):  # topped up while hundreds wait
                more = [env(*_rcpts(i), tag=i) for i in range(sent, sent + 150)]
                sent += 150
                wrote.append(c.send_envelopes(more))
                results += summary(c.events())
            reply = b"354 go\r\n" if pending[0] == cl._DATA else b"250 2.0.0 Ok: Q%d\r\n" % step
            results += summary(c.receive_data(reply))
            wrote.append(c.data_to_send())
            if step % 97 == 0:
                unsent.append(sorted(c.unsent()))
            step += 1
        got.append((wrote, results, unsent, c.busy, sent))
    assert got[0] == got[1]
    assert len(got[0][1]) == got[0][4] > 600  # each envelope decided once
    assert not got[0][3]
    assert any(len(u) > 300 for u in got[0][2])  # (a long queue indeed)


@pytest.mark.parametrize("caps", [FULL, ("ENHANCEDSTATUSCODES",)], ids=["pipelining", "lockstep"])
def test_a_421_to_the_data_command_is_a_session_refusal_with_nothing_sent(
    caps: tuple[str, ...],
) -> None:
    """A 421 to DATA, before any 354 (shape26's audit): nothing of the message
    went and the session is over, so its stage is "data-command" as when the
    session drops there (was "data", the stage of a reply to the final dot:
    a per-session cap's 421 at DATA was a counted deferral, never sent again
    on a new session as the same 421 to MAIL is). Another refusal at DATA
    keeps "data"."""
    for reply, stage in (
        (b"421 4.7.0 Too many messages in this session, closing\r\n", "data-command"),
        (b"451 4.3.0 Temporary failure\r\n", "data"),
    ):
        c = ready(caps)
        c.send_envelopes([env("a@example.com", tag=1)])
        data = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        if "PIPELINING" not in caps:  # one command at a time: MAIL, RCPT, then DATA
            assert c.receive_data(b"250 2.1.0 Ok\r\n") == []
            data = b"250 2.1.5 Ok\r\n"
        assert c.receive_data(data) == []
        (res,) = c.receive_data(reply)
        assert [(o.kind, o.code, o.stage) for o in res.outcomes] == [
            ("deferred", int(reply[:3]), stage)
        ], reply


def test_on_body_names_each_message_as_its_bytes_are_queued_never_before() -> None:
    """A worker's write log (fastsend.ring.WriteLog) hears of a message when its
    body is queued to be written: DATA's 354 (PIPELINING or not), BDAT LAST with
    the transaction; never one waiting on MAIL/RCPT/DATA replies, refused at
    RCPT, or queued behind (what a worker killed -9 then gives back unattempted)."""
    seen: list[object] = []
    c = ready()
    c.on_body = seen.append
    c.send_envelopes([env("a@example.com", tag=1), env("b@example.com", tag=2),
                      env("c@example.com", tag=[3, 4])])  # fmt: skip
    assert seen == []  # MAIL, RCPT, DATA of the first: no reply yet
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert seen == [1] and c.data_to_send().startswith(b"hello\r\n.\r\nMAIL FROM:")
    c.receive_data(b"250 2.0.0 queued\r\n250 ok\r\n550 5.1.1 no such user\r\n554 no rcpt\r\n")
    assert seen == [1]  # the second refused at RCPT: no body written
    c.receive_data(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert seen == [1, [3, 4]]
    plain = ready(("ENHANCEDSTATUSCODES",))
    plain.on_body = seen.append
    plain.send_envelopes([env("d@example.com", tag=5)])
    plain.receive_data(b"250 ok\r\n")
    plain.receive_data(b"250 ok\r\n")
    assert seen[-1] == [3, 4]
    plain.receive_data(b"354 go\r\n")
    assert seen[-1] == 5
    bdat = ready(BDAT)
    bdat.on_body = seen.append
    seen.clear()
    wire = bdat.send_envelopes([env(f"r{i}@example.com", tag=i) for i in range(cl.BDAT_WINDOW + 2)])
    assert seen == list(range(cl.BDAT_WINDOW)) and wire.count(b"BDAT 7 LAST") == cl.BDAT_WINDOW
