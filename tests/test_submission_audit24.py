"""Session 24's outside audit of the SMTP submission listener: each test on a defect
it found, failing before its fix.

- AUTH before STARTTLS, where AUTH needs TLS, was answered 503 5.5.1 "AUTH not
  available": RFC 4954 4/6 says 538 5.7.11 (encryption required), which tells a
  client to STARTTLS; MAIL before it says so too (RFC 3207 4: 530 5.7.0 "Must
  issue a STARTTLS command first").
- RSET and QUIT with an argument were taken (RFC 5321 4.1.1.5/4.1.1.10: no
  argument; Postfix answers 501): 501 5.5.4, the session goes on.
- The SIZE offered was [delivery] max_message_size itself, though our Received
  field and room for signing are added to what is accepted: a 7-bit message
  just under SIZE was refused 552 after its whole content was sent. SIZE now
  leaves that room (SIGN_ROOM + TRACE_ROOM): such a message is taken.
- Our Received field named no reverse DNS name: ``from HELO ([IP])``. Now
  ``from HELO (NAME [IP])`` as Postfix writes it, NAME the client's PTR name
  when its address records come back to the client's address (FCrDNS), else
  ``unknown``; looked up from the connection's start, with a timeout.
- DSN (RFC 3461) was not offered and each of its parameters refused 555: an
  application sending NOTIFY=NEVER regardless (or a relay's ORCPT) could send
  nothing, and a failure notice could not name the ENVID. Offered with
  ``[submission] dsn``: the syntax checked (501), NOTIFY without FAILURE sends
  no notice about that recipient, ENVID and ORCPT are named in the notice,
  RET=FULL returns the message whole (up to 50,000 octets). A parameter given
  twice is 501.
"""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

from _serve_helpers import Served
from _smtp_helpers import RecordingHandler
from conftest import free_port, wait_port
from fastsend.bounce import parse_bounce
from fastsend.config.serve import ListenerLimits
from fastsend.serve import listeners
from fastsend.serve.dsn import Failure, build
from fastsend.serve.listeners import SIGN_ROOM, STRESS_IDLE, TRACE_ROOM
from fastsend.serve.rdns import ReverseNames
from fastsend.sink import SinkThread
from fastsend.smtp.server import RcptTo, ServerConfig, xtext_decode
from fastsend.testing.dnsserver import DNSServer
from test_message_audit import DOMAIN, receiver, wait_for
from test_serve_dsn import MESSAGE as DSN_MESSAGE
from test_serve_dsn import _notices as dsn_notices
from test_serve_dsn import _serve as dsn_serve
from test_smtp_server import Session, ehlo

__all__ = ["receiver"]  # (a fixture, used by name)

HOST = "submit.fastsend.test"


def test_auth_before_starttls_is_538_and_mail_before_it_names_starttls() -> None:
    cfg = ServerConfig(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN", "LOGIN"),
                       auth_required=True)  # fmt: skip
    s = Session(cfg)
    assert b"AUTH" not in s.feed(b"EHLO x\r\n")
    out = s.feed(b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\nAUTH LOGIN\r\n").decode()
    assert out.splitlines() == [
        "538 5.7.11 Encryption required for requested authentication mechanism: STARTTLS first"
    ] * 2, out
    assert s.feed(b"MAIL FROM:<a@b.c>\r\n") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    # Without AUTH configured at all: not implemented, as before.
    s = Session(ServerConfig(hostname="mx.test"))
    assert s.codes(b"EHLO x\r\nAUTH PLAIN\r\n") == ["250", "502"]


def test_rset_and_quit_with_an_argument_are_501() -> None:
    s = Session()
    s.feed(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert s.feed(b"RSET now\r\n") == b"501 5.5.4 Syntax: RSET\r\n"
    assert s.proto.mail_from == "a@b.c"  # (nothing reset)
    assert s.feed(b"QUIT please\r\n") == b"501 5.5.4 Syntax: QUIT\r\n"
    assert not s.proto.closed
    assert s.codes(b"RSET \r\nRSET\r\nNOOP some text\r\n") == ["250", "250", "250"]
    assert s.proto.mail_from is None
    assert s.codes(b"QUIT\r\n") == ["221"] and s.proto.closed


def _served(tmp: Path, port: int, certs: Any, limit: int = 0, extra: str = "",
            submission: str = "") -> tuple[Served, int]:  # fmt: skip
    cert, key, _tls = certs
    sub = free_port()
    conf = f"""
{extra}
[submission]
{submission}
listen = "127.0.0.1:{sub}"
tls_cert = "{cert}"
tls_key = "{key}"
hostname = "{HOST}"
[tenants.acme]
domains = ["{DOMAIN}"]
"""
    delivery = f"max_message_size = {limit}" if limit else ""
    s = Served(tmp, f"127.0.0.1:{port}", conf, delivery=delivery)
    wait_port("127.0.0.1", sub, timeout=60)
    return s, sub


def _client(port: int, source: str, helo: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=60,
                        source_address=(source, 0))  # fmt: skip


def _send(c: smtplib.SMTP, rcpt: str, data: bytes) -> tuple[int, bytes]:
    code, text = c.mail(f"app@{DOMAIN}", [f"SIZE={len(data)}"])
    assert code == 250, (code, text)
    code, text = c.rcpt(rcpt)
    assert code == 250, (code, text)
    return c.data(data)


def _message(marker: str, size: int) -> bytes:
    """A 7-bit message of exactly ``size`` octets, CRLF line ends."""
    head = f"From: app@{DOMAIN}\r\nTo: x@example.org\r\nSubject: {marker}\r\n\r\n".encode()
    line = b"y" * 76 + b"\r\n"
    data = head + line * ((size - len(head)) // len(line) + 1)
    data = data[: size - 2] + b"\r\n"
    assert len(data) == size
    return data


def test_size_offered_leaves_room_for_our_trace_and_signing(
    tmp_path: Path, receiver: tuple[int, RecordingHandler], certs: Any
) -> None:
    port, handler = receiver
    tls = certs[2]
    limit = 300_000
    s, sub = _served(tmp_path, port, certs, limit)
    # The longest Received field: a 247-octet HELO, a 250-octet "for" path.
    helo = ".".join(["h" * 60] * 4) + ".test"
    rcpt = "r" * 60 + "@" + ".".join(["d" * 60] * 3) + ".example.org"
    try:
        with _client(sub, "127.0.0.1", helo) as c:
            c.starttls(context=tls)
            c.ehlo()
            size = int(c.esmtp_features["size"])
            # As relayed the message grows by our Received field (TRACE_ROOM at most)
            # and its Date, Message-ID and signatures (SIGN_ROOM).
            assert size == limit - SIGN_ROOM - TRACE_ROOM, size
            c.login("acme", s.keys["acme"])
            code, text = _send(c, rcpt, _message("at-size", size))
            assert code == 250, (code, text)  # (before: 552 after all of it was sent)
            code, text = c.mail(f"app@{DOMAIN}", [f"SIZE={size + 1}"])
            assert code == 552, (code, text)  # (declared: refused before any content)
        (msg,) = wait_for(handler, 1)
    finally:
        s.stop()
    assert msg["rcpts"] == [rcpt]
    assert len(msg["data"]) <= limit


def test_received_names_the_clients_confirmed_reverse_name(
    tmp_path: Path, receiver: tuple[int, RecordingHandler], certs: Any
) -> None:
    port, handler = receiver
    tls = certs[2]
    zones = {
        "2.0.0.127.in-addr.arpa": [("PTR", "App-Host.client.test.")],
        "app-host.client.test": [("A", "127.0.0.2")],
        # A PTR record claiming a name whose address records are elsewhere: not believed.
        "3.0.0.127.in-addr.arpa": [("PTR", "mx.bank.example.")],
        "mx.bank.example": [("A", "192.0.2.10")],
        # A PTR record holding no host name (anyone's text, into a header field).
        "4.0.0.127.in-addr.arpa": [("PTR", "bad\\(name.example.")],
        "bad\\(name.example": [("A", "127.0.0.4")],
    }
    with DNSServer(zones) as dns:
        extra = f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 2.0\n'
        s, sub = _served(tmp_path, port, certs, extra=extra)
        try:
            for source, marker in (("127.0.0.2", "named"), ("127.0.0.3", "liar"),
                                   ("127.0.0.4", "odd"), ("127.0.0.5", "none")):  # fmt: skip
                with _client(sub, source, "client.example") as c:
                    c.starttls(context=tls)
                    c.login("acme", s.keys["acme"])
                    code, text = _send(c, f"{marker}@example.org", _message(marker, 2000))
                    assert code == 250, (code, text)
            msgs = wait_for(handler, 4)
        finally:
            s.stop()
    got = {m["rcpts"][0].partition("@")[0]: m["data"] for m in msgs}
    assert b"\r\nReceived: from client.example (app-host.client.test [127.0.0.2])" in got[
        "named"
    ], got["named"][:300]
    for marker, ip in (("liar", b"127.0.0.3"), ("odd", b"127.0.0.4"), ("none", b"127.0.0.5")):
        assert b"\r\nReceived: from client.example (unknown [" + ip + b"])" in got[marker], got[
            marker
        ][:300]
    assert b"mx.bank.example" not in got["liar"] and b"name.example" not in got["odd"]


def test_a_silent_resolver_gives_no_name_and_is_not_asked_again_at_once() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        names = ReverseNames([f"127.0.0.1:{silent.getsockname()[1]}"], 0.5)

        async def go() -> tuple[str | None, bool]:
            names.start("127.0.0.2")
            got = await names.name("127.0.0.2", time.monotonic() + 5)
            return got, names.start("127.0.0.2") is None  # (kept: no new lookup)

        got, kept = asyncio.run(go())
    finally:
        silent.close()
    assert got is None and kept


def test_dsn_parameters_are_offered_and_their_syntax_checked() -> None:
    s = Session(ServerConfig(hostname="mx.test", dsn=True))
    assert re.search(rb"\r\n250[ -]DSN\r\n", s.feed(b"EHLO x\r\n"))
    table = [
        (b"MAIL FROM:<a@b.c> RET=FOO", "501"),
        (b"MAIL FROM:<a@b.c> ENVID=has=equals", "501"),
        (b"MAIL FROM:<a@b.c> ENVID=low+2bhex", "501"),
        (b"MAIL FROM:<a@b.c> ENVID=" + b"x" * 101, "501"),
        (b"MAIL FROM:<a@b.c> RET=HDRS RET=FULL", "501"),  # (a parameter given twice)
        (b"MAIL FROM:<a@b.c> RET=full ENVID=order+2B42", "250"),
        (b"RCPT TO:<u@b.c> NOTIFY=NEVER,SUCCESS", "501"),
        (b"RCPT TO:<u@b.c> NOTIFY=SUCCESS,SUCCESS", "501"),
        (b"RCPT TO:<u@b.c> NOTIFY=", "501"),
        (b"RCPT TO:<u@b.c> ORCPT=rfc822", "501"),
        (b"RCPT TO:<u@b.c> ORCPT=rfc822;a=b", "501"),
        (b"RCPT TO:<u@b.c> FOO=1", "555"),
        (b"RCPT TO:<u@b.c> NOTIFY=success,Delay ORCPT=rfc822;U+2Bx@b.c", "250"),
        (b"RCPT TO:<v@b.c> NOTIFY=NEVER", "250"),
        (b"RCPT TO:<w@b.c>", "250"),
        (b"DATA", "354"),
    ]
    for line, code in table:
        assert s.codes(line + b"\r\n") == [code], line
    s.feed(b"From: a@b.c\r\n\r\nhi\r\n.\r\n")
    (m,) = s.messages
    assert m.mail_params == {"RET": "FULL", "ENVID": "order+2B42"}
    assert m.rcpt_params == [{"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;U+2Bx@b.c"},
                             {"NOTIFY": "NEVER"}, {}]  # fmt: skip
    assert xtext_decode("rfc822;U+2Bx@b.c") == "rfc822;U+x@b.c"
    assert xtext_decode("a+0Db+7F") == "a+0Db+7F"  # (no control characters decoded)
    # RFC 6533: a UTF-8 ORCPT in an SMTPUTF8 transaction only; named with \x{HEX}.
    orcpt = "ORCPT=utf-8;j\u00f6rg@b.c".encode()
    assert s.codes(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@b.c> " + orcpt + b"\r\nRSET\r\n") == [
        "250", "501", "250"
    ]  # fmt: skip
    assert s.codes(b"MAIL FROM:<a@b.c> SMTPUTF8\r\nRCPT TO:<u@b.c> " + orcpt + b"\r\n") == [
        "250", "250"
    ]  # fmt: skip
    f = Failure("u@b.c", "5.1.1", "550 5.1.1 no", "mx.b.c", False, 0.0)
    notice = build("mx.test", "a@b.c", [f], 0.0, 0.0, b"Subject: x\r\n", envid="e\r\nX: y",
                   orcpt="utf-8;j\u00f6rg@b.c")  # fmt: skip
    assert b"Original-Recipient: utf-8;j\\x{F6}rg@b.c\r\n" in notice, notice
    assert b"Original-Envelope-Id: e X: y\r\n" in notice  # (one line: no field of its own)
    # Not offered: as before, 555 (RFC 3461 says a client sends none then).
    s = Session(ServerConfig(hostname="mx.test"))
    assert b"DSN" not in s.feed(b"EHLO x\r\n")
    assert s.codes(b"MAIL FROM:<a@b.c> RET=FULL\r\n") == ["555"]


def test_dsn_notify_never_orcpt_envid_and_ret_full_reach_the_notice(
    tmp_path: Path, certs: Any
) -> None:
    """Before, submission refused every DSN parameter (555): an application that
    sends NOTIFY=NEVER (or a relay's ORCPT) could not send at all."""
    tls = certs[2]
    with SinkThread(keep_messages=True) as sink:
        served, port = dsn_serve(tmp_path, certs, sink)
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
                c.starttls(context=tls)
                c.login("acme", served.keys["acme"])
                assert "dsn" in c.esmtp_features
                code, _ = c.mail("app@example.com", ["RET=FULL", "ENVID=order+2B42"])
                assert code == 250
                for rcpt, opts in (
                    ("permfail-1@example.org", ["NOTIFY=FAILURE", "ORCPT=rfc822;Sales+2B1@example.org"]),
                    ("permfail-2@example.org", ["NOTIFY=NEVER"]),
                    ("permfail-3@example.org", []),
                    ("ann@example.org", ["NOTIFY=SUCCESS"]),
                ):  # fmt: skip
                    code, text = c.rcpt(rcpt, opts)
                    assert code == 250, (rcpt, code, text)
                code, text = c.data(DSN_MESSAGE)
                assert code == 250, (code, text)
            notices = dsn_notices(sink, "app@example.com", 3)
            time.sleep(1.5)  # (no fourth notice comes: permfail-2 asked for none)
            assert len([m for m in sink.sink.messages if "app@example.com" in m.recipients]) == 3
        finally:
            served.stop()
    # (ann's NOTIFY=SUCCESS: told as relayed, test_submission_audit25)
    relayed = [n for n in notices if b"Action: relayed" in n.data]
    assert len(relayed) == 1 and b"ann@example.org" in relayed[0].data, relayed
    notices = [n for n in notices if n not in relayed]
    by = {("permfail-1" in n.data.decode()): n.data.decode() for n in notices}
    one, three = by[True], by[False]
    assert "Original-Recipient: rfc822;Sales+1@example.org" in one, one
    assert "Final-Recipient: rfc822; permfail-1@example.org" in one
    assert "permfail-3" not in one and "permfail-2" not in one
    assert "Final-Recipient: rfc822; permfail-3@example.org" in three and "Original-Recipient" not in three
    for text in (one, three):
        assert "Original-Envelope-Id: order+42" in text, text
        assert "Content-Type: message/rfc822" in text and "Hello" in text, text  # RET=FULL
        (b,) = parse_bounce(text.encode())
        assert b.recipient in ("permfail-1@example.org", "permfail-3@example.org")


SMUGGLED = (
    b"MAIL FROM:<a@b.c>\r\nRCPT TO:<bad@b.c>\r\nDATA\r\n"
    b"MAIL FROM:<a@b.c>\r\nRCPT TO:<victim@b.c>\r\nDATA\r\nFrom: a@b.c\r\n\r\nspam\r\n.\r\n"
)


def test_input_pipelined_after_a_refused_data_is_a_synchronization_error() -> None:
    s = Session()
    ehlo(s)
    # DATA refused (no valid recipient): the "message" after it was run as commands,
    # a second transaction to a recipient the client never meant as one.
    out = s.feed(SMUGGLED)
    assert out.endswith(b"554 5.5.0 SMTP synchronization error: input sent after DATA before"
                        b" its reply\r\n"), out  # fmt: skip
    assert [ln[:3] for ln in out.split(b"\r\n") if ln] == [b"250", b"550", b"554", b"554"]
    assert s.proto.closed and not s.messages
    assert not [e for e in s.events if isinstance(e, RcptTo) and e.address == "victim@b.c"]
    # A refused DATA with nothing after it: the session goes on.
    s = Session()
    ehlo(s)
    assert s.codes(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<bad@b.c>\r\nDATA\r\n") == ["250", "550", "554"]
    assert not s.proto.closed
    assert s.codes(b"RSET\r\n") == ["250"]


def test_submission_closes_a_session_that_pipelines_a_body_after_a_refused_data(
    tmp_path: Path, receiver: tuple[int, RecordingHandler], certs: Any
) -> None:
    port, handler = receiver
    tls = certs[2]
    s, sub = _served(tmp_path, port, certs)
    try:
        with _client(sub, "127.0.0.1", "client.example") as c:
            c.starttls(context=tls)
            c.login("acme", s.keys["acme"])
            # RCPT refused by policy (an address literal at a private address), then
            # DATA and the body in one write, not waiting for DATA's reply.
            c.send(
                f"MAIL FROM:<app@{DOMAIN}>\r\nRCPT TO:<u@[10.0.0.1]>\r\nDATA\r\n"
                f"MAIL FROM:<app@{DOMAIN}>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                f"From: app@{DOMAIN}\r\nSubject: smuggled\r\n\r\nspam\r\n.\r\n"
            )
            replies = [c.getreply() for _ in range(4)]
        assert [r[0] for r in replies] == [250, 550, 554, 554], replies
        assert b"synchronization" in replies[3][1], replies
        time.sleep(1.0)  # (nothing was queued: nothing arrives)
    finally:
        s.stop()
    assert handler.messages == []


def test_a_tls_handshake_never_made_is_held_to_the_listeners_timeout(
    tmp_path: Path, certs: Any
) -> None:
    """[submission] timeout = 1: a peer that asks for STARTTLS (or connects to the
    implicit TLS port) and then sends nothing is closed at that timeout; before,
    asyncio's own 60 s held (the watchdog waits while a handshake runs)."""
    tls_port = free_port()
    extra = f'timeout = 1\nlisten_tls = "127.0.0.1:{tls_port}"\n'
    s, sub = _served(tmp_path, free_port(), certs, submission=extra)
    try:
        wait_port("127.0.0.1", tls_port, timeout=60)
        for port, starttls in ((sub, True), (tls_port, False)):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                if starttls:
                    f = sock.makefile("rb")
                    assert f.readline().startswith(b"220")
                    sock.sendall(b"EHLO c.test\r\n")
                    while not f.readline().startswith(b"250 "):
                        pass
                    sock.sendall(b"STARTTLS\r\n")
                    assert f.readline().startswith(b"220 2.0.0")
                else:
                    sock.sendall(b"\x16\x03\x01")  # (a ClientHello begun, never ended)
                # Closed by the server (30 s: well before the 60 of before).
                try:
                    got = sock.recv(100)
                except TimeoutError:
                    got = b"<still open>"
                assert got == b"", (port, got)
    finally:
        s.stop()


def test_idle_sessions_are_closed_sooner_when_the_connection_slots_run_out(
    tmp_path: Path, certs: Any
) -> None:
    """With 80% of max_connections open, a session idle between commands for 10 s
    is closed (Postfix's stress-adaptive timeouts); before, idle peers held every
    slot for the whole command timeout (300 s) and real clients got 421 at connect."""
    s, sub = _served(tmp_path, free_port(), certs, submission="max_connections = 5\n")

    def connect() -> tuple[socket.socket, Any]:
        sock = socket.create_connection(("127.0.0.1", sub), timeout=60)
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        return sock, f

    try:
        first = connect()
        time.sleep(STRESS_IDLE + 3)  # one session of five: no stress, it stays
        first[0].sendall(b"NOOP\r\n")
        assert first[1].readline().startswith(b"250 ")
        more = [connect() for _ in range(3)]  # four of five open: stress
        for sock, f in [first, *more]:
            line = f.readline()  # (60 s: well before the 300 s of before)
            assert line.startswith(b"421 4.4.2"), line
            assert f.readline() == b""
            sock.close()
    finally:
        s.stop()
    assert any("sessions idle between commands are closed" in ln for ln in s.lines)


def test_a_spray_of_junk_auth_names_does_not_lift_a_lock_out() -> None:
    """The failure counters are bounded (FAILS_KEPT); past it they were all cleared,
    so failures for junk names from many addresses lifted every lock-out, the one
    of the tenant name being guessed too. Now the stalest go, and a lock-out being
    tried stays."""
    lim = ListenerLimits(auth_failures_per_ip=3, auth_failures_per_user=3)
    t = listeners.AuthThrottle(lim)
    now = 1000.0
    for i in range(3):
        t.failed(f"192.0.2.{i}", "acme", now)
    assert t.blocked("198.51.100.1", "acme", now)  # (the name: from anywhere)
    n = listeners.FAILS_KEPT // 3 + 2000  # (3 counters a failure)
    for i in range(n):  # junk names from many addresses; the guesser keeps trying
        t.failed(f"10.{i // 250 % 250}.{i % 250}.{i // 62500}", f"junk{i}", now + i / 10000)
        if i % 500 == 0:
            assert t.blocked(f"203.0.113.{i % 250}", "acme", now + i / 10000), i
    assert len(t.fails) <= listeners.FAILS_KEPT + 3
    assert t.blocked("198.51.100.2", "acme", now + 6)


def test_a_bdat_whose_size_cannot_be_read_ends_the_session() -> None:
    """Its chunk follows whatever the answer: read as commands, the chunk's lines
    joined the open transaction (a second recipient, a message sent to it)."""
    s = Session()
    ehlo(s)
    chunk = b"RCPT TO:<victim@b.c>\r\nBDAT 23 LAST\r\nFrom: a@b.c\r\n\r\nspam\r\n"
    out = s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nBDAT %d LASTX\r\n" % len(chunk) + chunk)
    assert out.endswith(b"501 5.5.4 Syntax: BDAT size [LAST]; closing connection\r\n"), out
    assert s.proto.closed and not s.messages
    assert [e.address for e in s.events if isinstance(e, RcptTo)] == ["x@b.c"]
    for bad in (b"BDAT 1" + b"0" * 18, b"BDAT -1", b"BDAT", b"BDAT 5 LAST MORE"):
        s = Session()
        ehlo(s)
        assert s.codes(bad + b"\r\nNOOP\r\n") == ["501"] and s.proto.closed, bad
