"""Interop from outside (session 25): the delivery side against scripted and
real receivers.

- QUIT unanswered: the 221 is waited for a short while (Timeouts.quit, 2 s;
  it was 10 s), and the site's next session, at max_messages_per_connection,
  opens after it.
- A session that ends while the DATA command waits for its 354 (dropped, timed
  out): nothing of the message was sent (RFC 5321 4.1.1.4: the server has a
  message only after its end of data), so it is no unknown outcome (stage
  "data", "may have been delivered"): its stage is "data-command", it goes on
  the next session as the MAIL/RCPT unanswered do, and a relay chain may fail
  it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests._serve_helpers import until
from tests.test_delivery_pool import send_groups

from _smtp_helpers import client_class, link_class
from fastsend.delivery.routes import should_fail_over, unknown_outcome
from fastsend.outcome import DATA_COMMAND, DEFERRED, Envelope, Outcome, TxnResult
from fastsend.smtp import transport as tr

Run = Callable[[Any], Any]


@pytest.fixture
def client_twin(impl: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(tr, "SMTPClient", client_class(impl))
    monkeypatch.setattr(tr, "Link", link_class(impl))
    return impl


@contextlib.contextmanager
def drop_at_data(
    drop: set[int],
    pipelining: bool = True,
    after_body: bool = False,
    quit_unanswered: list[int] | None = None,
) -> Iterator[tuple[int, list[bytes]]]:
    """A server that takes MAIL and RCPT and, for the messages whose number
    (counted over every session, from 0) is in ``drop``, closes the connection
    on their DATA command, no 354 (``after_body``: once it has read the body,
    no reply to its dot). With ``quit_unanswered`` it never answers QUIT and
    waits for the client's close (each appends 1 to it then). Yields (port,
    recipients of the messages it took)."""
    taken: list[bytes] = []
    count = [0]
    lock = threading.Lock()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"220 scripted ESMTP\r\n")
            rcpt = b""
            while line := self.rfile.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.wfile.write(
                        b"250-scripted\r\n250 PIPELINING\r\n" if pipelining else b"250 scripted\r\n"
                    )
                elif verb == b"RCPT":
                    rcpt = line[8:].strip()
                    self.wfile.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    with lock:
                        k = count[0]
                        count[0] += 1
                    if k in drop and not after_body:
                        return  # the close, before any 354
                    self.wfile.write(b"354 go\r\n")
                    while self.rfile.readline() not in (b".\r\n", b""):
                        pass
                    if k in drop:
                        return  # the close, the body read, no reply to its dot
                    with lock:
                        taken.append(rcpt)
                    self.wfile.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    if quit_unanswered is not None:
                        while self.rfile.readline():  # no 221: until the client closes
                            pass
                        quit_unanswered.append(1)
                        return
                    self.wfile.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    self.wfile.write(b"250 2.0.0 Ok\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], taken
    finally:
        server.shutdown()
        server.server_close()


def _one(run: Run, port: int) -> Outcome:
    async def go() -> Any:
        conn = await tr.connect(tr.ConnectOptions("127.0.0.1", port, tls="off"))
        assert not isinstance(conn, Outcome), conn
        env = Envelope("s@example.org", ["a@x.example"], b"Subject: x\r\n\r\nhi\r\n", tag=1)
        return await conn.send([env])

    results = run(go())
    assert isinstance(results, list) and len(results) == 1, results
    out: Outcome = results[0].outcomes[0]
    return out


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_a_drop_awaiting_354_is_no_unknown_outcome(
    run: Run, client_twin: str, pipelining: bool
) -> None:
    """The client's outcome for a transaction whose DATA got no 354: deferred,
    code 0, stage "data-command" (was "data", as after the final dot: an
    outcome the relay chain would not fail over and that waits as if the
    receiver might have the message)."""
    with drop_at_data({0}, pipelining) as (port, taken):
        o = _one(run, port)
    assert (o.kind, o.code, o.stage) == (DEFERRED, 0, DATA_COMMAND), o
    assert not unknown_outcome(o) and should_fail_over(o)
    assert taken == []


def test_the_drop_after_the_body_stays_unknown(run: Run, client_twin: str) -> None:
    """The control: the body sent, the reply to its dot never read: the
    receiver may have it (stage "data", not failed over)."""
    with drop_at_data({0}, after_body=True) as (port, _taken):
        o = _one(run, port)
    assert (o.kind, o.code, o.stage) == (DEFERRED, 0, "data"), o
    assert unknown_outcome(o) and not should_fail_over(o)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_a_session_dropped_at_data_sends_the_message_on_the_next(
    run: Run, tmp_path: Any, client_twin: str, pipelining: bool
) -> None:
    """Eight messages, the receiver closing the session on the third DATA:
    that message and the rest go on a new session at once, each delivered once
    (the third was deferred as a possible delivery, an attempt, and waited for
    its retry)."""
    n = 8
    with drop_at_data({2}, pipelining) as (port, taken):
        groups = send_groups(run, port, n, str(tmp_path), 4)
    got: dict[Any, list[Outcome]] = {}
    for g in groups:
        for r in g:
            assert isinstance(r, TxnResult)
            got.setdefault(r.tag, []).extend(r.outcomes)
    assert {t: [o.kind for o in os_] for t, os_ in got.items()} == {
        t: ["delivered"] for t in range(n)
    }, got
    assert sorted(taken) == sorted(b"<r%d@x.example>" % i for i in range(n))


def test_quit_unanswered_is_waited_for_briefly_then_closed(run: Run, client_twin: str) -> None:
    """A receiver that never answers QUIT: the connection is closed once the
    quit timeout is over (the receiver sees the close), and that timeout is a
    few round trips by default (it was 10 s), the sessions' too."""
    assert tr.DEFAULT_TIMEOUTS.quit <= 2.0
    seen: list[int] = []
    with drop_at_data(set(), quit_unanswered=seen) as (port, taken):

        async def go() -> None:
            opts = tr.ConnectOptions("127.0.0.1", port, tls="off", timeouts=tr.Timeouts(quit=0.2))
            conn = await tr.connect(opts)
            assert not isinstance(conn, Outcome), conn
            env = Envelope("s@example.org", ["a@x.example"], b"Subject: x\r\n\r\nhi\r\n", tag=1)
            res = await conn.send([env])
            assert res[0].outcomes[0].delivered
            # (a ceiling: only a QUIT waited for without end reaches it)
            await asyncio.wait_for(conn.quit(), 30)

        run(go())
        until("the close", lambda: seen == [1])
    assert taken == [b"<a@x.example>"]


def test_a_site_whose_quit_goes_unanswered_gets_its_next_sessions(
    run: Run, tmp_path: Any
) -> None:
    """One message a connection (max_messages_per_connection = 1), a receiver
    that never answers QUIT: each session is closed after the short wait and
    the next opens; all six delivered, each once (with the old 10 s a session,
    50 s; a ceiling of 40 s here, only a wait without bound reaches it)."""
    seen: list[int] = []
    n = 6
    with drop_at_data(set(), quit_unanswered=seen) as (port, taken):

        async def bounded(coro: Any) -> Any:
            return await asyncio.wait_for(coro, 40)

        groups = send_groups(
            lambda c: run(bounded(c)), port, n, str(tmp_path), 1,
            delivery={"max_messages_per_connection": 1},
        )  # fmt: skip
        until("every close", lambda: len(seen) == n)
    assert sorted(r.tag for g in groups for r in g) == list(range(n))
    assert all(o.delivered for g in groups for r in g for o in r.outcomes)
    assert sorted(taken) == sorted(b"<r%d@x.example>" % i for i in range(n))
