"""Interop from outside (session 25): the delivery side against scripted and
real receivers.

- QUIT unanswered: the 221 is waited for a short while (Timeouts.quit, 2 s;
  it was 10 s), and the site's next session, at max_messages_per_connection,
  opens after it.
- DSN parameters taken by submission (RET, ENVID; NOTIFY, ORCPT) go on to a
  next hop that offers DSN (RFC 3461 4), as received; to one that does not,
  none is sent (aiosmtpd answers an unknown parameter 555: a real check);
  Postfix takes them (BDAT and DATA) and passes them on to its next hop.
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
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from tests._serve_helpers import Served, until
from tests.test_delivery_pool import send_groups

from _smtp_helpers import aiosmtpd_server, client_class, link_class
from conftest import free_port, wait_port
from fastsend.delivery.routes import should_fail_over, unknown_outcome
from fastsend.outcome import DATA_COMMAND, DEFERRED, Envelope, Outcome, TxnResult, dsn_params
from fastsend.smtp import transport as tr

Run = Callable[[Any], Any]
MESSAGE = (
    b"From: App <app@example.com>\r\nTo: x@example.org\r\nSubject: order 42\r\n"
    b"Message-ID: <order42@example.com>\r\n\r\nHello\r\n"
)


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


@contextlib.contextmanager
def recording_mx(dsn: bool) -> Iterator[tuple[int, list[bytes]]]:
    """A pipelining receiver (offering DSN with ``dsn``) that takes every
    message and records every command line it reads; yields (port, lines)."""
    lines: list[bytes] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"220 scripted ESMTP\r\n")
            while line := self.rfile.readline():
                lines.append(line.rstrip(b"\r\n"))
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.wfile.write(b"250-scripted\r\n250-PIPELINING\r\n"
                                     + (b"250-DSN\r\n" if dsn else b"") + b"250 8BITMIME\r\n")
                elif verb == b"DATA":
                    self.wfile.write(b"354 go\r\n")
                    while self.rfile.readline() not in (b".\r\n", b""):
                        pass
                    self.wfile.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    self.wfile.write(b"250 2.0.0 Ok\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], lines
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("dsn", [True, False], ids=["dsn", "no-dsn"])
def test_the_client_relays_dsn_parameters_only_to_a_server_offering_dsn(
    run: Run, client_twin: str, dsn: bool
) -> None:
    """Two envelopes (one recipient, and two sharing the parameters): MAIL
    carries RET/ENVID and each RCPT NOTIFY/ORCPT when DSN is offered; none of
    them otherwise (RFC 3461 4.1)."""
    mail = dsn_params("RET=HDRS ENVID=order+2B42", ("RET", "ENVID"))
    rcpt = dsn_params("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ann+2Bx@x.example", ("NOTIFY", "ORCPT"))
    assert mail == b" RET=HDRS ENVID=order+2B42"
    body = b"Subject: x\r\n\r\nhi\r\n"
    envs = [
        Envelope("s@example.org", ["ann@x.example"], body, tag=1, dsn_mail=mail, dsn_rcpt=rcpt),
        Envelope("s@example.org", ["b@x.example", "c@x.example"], body, tag=[2, 3],
                 dsn_rcpt=b" NOTIFY=NEVER"),
        Envelope("s@example.org", ["d@x.example"], body, tag=4),
    ]  # fmt: skip
    with recording_mx(dsn) as (mx_port, lines):

        async def go() -> Any:
            opts = tr.ConnectOptions("127.0.0.1", mx_port, tls="off")
            conn = await tr.connect(opts)
            assert not isinstance(conn, Outcome), conn
            res = await conn.send(envs)
            await conn.quit()
            return res

        results = run(go())
    assert all(o.delivered for r in results for o in r.outcomes), results
    # Each result says whether its RCPTs carried the parameters (sub26: the receiver
    # then tells NOTIFY=SUCCESS itself, serve.dsn sends no "relayed" notice).
    assert [r.dsn for r in results] == [dsn, dsn, False], results
    got = [x for x in lines if x[:4] in (b"MAIL", b"RCPT")]
    if dsn:
        assert got == [
            b"MAIL FROM:<s@example.org> RET=HDRS ENVID=order+2B42",
            b"RCPT TO:<ann@x.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ann+2Bx@x.example",
            b"MAIL FROM:<s@example.org>",
            b"RCPT TO:<b@x.example> NOTIFY=NEVER",
            b"RCPT TO:<c@x.example> NOTIFY=NEVER",
            b"MAIL FROM:<s@example.org>",
            b"RCPT TO:<d@x.example>",
        ], got
    else:
        assert got == [
            b"MAIL FROM:<s@example.org>", b"RCPT TO:<ann@x.example>",
            b"MAIL FROM:<s@example.org>", b"RCPT TO:<b@x.example>", b"RCPT TO:<c@x.example>",
            b"MAIL FROM:<s@example.org>", b"RCPT TO:<d@x.example>",
        ], got  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "NOTIFY=SUCCESS\r\nRSET",  # a line of its own
        "NOTIFY=SUCCESS\nQUIT",
        "ORCPT=rfc822;a=b@x",  # "=" is never plain xtext
        "ORCPT=rfc822;a+zz@x",
        "ORCPT=rfc822;\u00e4@x",
        "SIZE=1",  # not a DSN parameter
        "notify=SUCCESS",
    ],
)
def test_stored_dsn_parameters_reach_the_wire_only_well_formed(text: str) -> None:
    got = dsn_params(text, ("NOTIFY", "ORCPT"))
    assert b"\r" not in got and b"\n" not in got
    assert got in (b"", b" NOTIFY=SUCCESS"), got


@contextlib.contextmanager
def submitted(
    tmp_path: Path, certs: Any, mx_port: int, *sends: tuple[str, list[str], list[str], list[str]]
) -> Iterator[None]:
    """`fastsend serve` relaying to 127.0.0.1:mx_port, with a submission
    listener (STARTTLS, AUTH) taking each (sender, recipients, MAIL options,
    RCPT options) of sends; the server runs until the block ends."""
    cert, key, tls = certs
    port = free_port()
    extra = f'[submission]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    served = Served(tmp_path, f"127.0.0.1:{mx_port}", extra=extra)
    try:
        wait_port("127.0.0.1", port, timeout=60)

        async def go() -> None:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls)
            await smtp.connect()
            await smtp.login("acme", served.keys["acme"])
            for sender, rcpts, mail_options, rcpt_options in sends:
                await smtp.sendmail(
                    sender, rcpts, MESSAGE, mail_options=mail_options, rcpt_options=rcpt_options
                )
            await smtp.quit()

        asyncio.run(go())
        yield
    finally:
        served.stop()


def test_submitted_dsn_parameters_go_on_to_a_next_hop_offering_dsn(
    tmp_path: Path, certs: Any
) -> None:
    """`fastsend serve`: a message submitted with RET/ENVID and, for its
    recipient, NOTIFY/ORCPT reaches a receiver offering DSN with them as
    received (they were dropped: that hop answered NOTIFY=NEVER mail with
    bounces and never told SUCCESS)."""
    ann = ("app@example.com", ["ann@example.org"], ["RET=HDRS", "ENVID=order+2B42"],
           ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Ann+2Bx@example.org"])  # fmt: skip
    bob = ("app@example.com", ["bob@example.org"], [], [])
    with recording_mx(True) as (mx_port, lines), submitted(tmp_path, certs, mx_port, ann, bob):
        until("both relayed", lambda: sum(x.startswith(b"RCPT") for x in lines) >= 2)
    got = [x for x in lines if x[:4] in (b"MAIL", b"RCPT")]
    ann = got.index(b"RCPT TO:<ann@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Ann+2Bx@example.org")
    assert got[ann - 1].startswith(b"MAIL FROM:<app@example.com>"), got
    assert got[ann - 1].endswith(b" RET=HDRS ENVID=order+2B42"), got
    bob = got.index(b"RCPT TO:<bob@example.org>")  # (none given: none relayed)
    assert b"RET=" not in got[bob - 1] and b"ENVID=" not in got[bob - 1], got


def test_submitted_dsn_parameters_are_not_sent_to_a_hop_without_dsn(
    tmp_path: Path, certs: Any
) -> None:
    """aiosmtpd offers no DSN and refuses an unknown parameter 555: the
    message submitted with DSN parameters is delivered there without them."""
    ann = ("app@example.com", ["ann@example.org"], ["RET=FULL", "ENVID=x1"],
           ["NOTIFY=FAILURE", "ORCPT=rfc822;ann@example.org"])  # fmt: skip
    mx_port = free_port()
    with aiosmtpd_server(mx_port) as (_ctl, handler), submitted(tmp_path, certs, mx_port, ann):
        until("the delivery", lambda: handler.messages)
    (m,) = handler.messages
    assert m["rcpts"] == ["ann@example.org"] and m["mail_from"] == "app@example.com", m


# Postfix relaying everything to a next hop of the test's (smtp_* as a relay).
RELAY_CF = """\
relayhost = [127.0.0.1]:{mx}
default_transport = smtp
relay_transport = smtp
smtp_tls_security_level = none
smtp_dns_support_level = disabled
"""


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_postfix_takes_the_dsn_parameters_and_relays_them_on(
    run: Run, client_twin: str, chunking: bool
) -> None:
    """Real parts: fastsend's client to Postfix smtpd (DSN offered, BDAT or
    DATA), Postfix's smtp client on to a receiver offering DSN: the parameters
    fastsend sent are Postfix's to keep and pass on, as a DSN-capable relay
    does (RFC 3461 4): RET, ENVID, NOTIFY, ORCPT arrive at the last hop."""
    from tests._mta_helpers import private_postfix

    port = free_port()
    opts = "" if chunking else " -o smtpd_discard_ehlo_keywords=chunking"
    with recording_mx(True) as (mx, lines), private_postfix(
        RELAY_CF, f"127.0.0.1:{port} inet n - n - - smtpd{opts}\n", [port], mx=mx
    ):
        envs = [
            Envelope(
                "s@sender.test", ["ann@x.test"], MESSAGE, tag=1,
                dsn_mail=b" RET=HDRS ENVID=order+2B42",
                dsn_rcpt=b" NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Ann+2Bx@x.test",
            ),
        ]  # fmt: skip

        async def go() -> Any:
            conn = await tr.connect(tr.ConnectOptions("127.0.0.1", port, tls="off"))
            assert not isinstance(conn, Outcome), conn
            assert "DSN" in conn._client.capabilities
            assert ("CHUNKING" in conn._client.capabilities) == chunking
            res = await conn.send(envs)
            await conn.quit()
            return res

        (r,) = run(go())
        assert r.outcomes[0].delivered, r
        until("Postfix's relay", lambda: any(x.startswith(b"RCPT") for x in lines))
    mail = next(x for x in lines if x.startswith(b"MAIL"))
    rcpt = next(x for x in lines if x.startswith(b"RCPT"))
    words = dict(w.split(b"=", 1) for w in mail.split()[2:] if b"=" in w)
    assert (words.get(b"RET"), words.get(b"ENVID")) == (b"HDRS", b"order+2B42"), mail
    words = dict(w.split(b"=", 1) for w in rcpt.split()[2:] if b"=" in w)
    assert set(words[b"NOTIFY"].split(b",")) == {b"SUCCESS", b"DELAY"}, rcpt
    assert words[b"ORCPT"].lower() == b"rfc822;ann+2bx@x.test", rcpt
