"""Interop from outside (session 22): the SMTP client against slow and old
receivers, and fastsend's submission listener driven by real MTAs as clients.

- A receiver that reads a big message slowly but steadily, and one that stops
  reading in the middle of it: RFC 5321 4.5.3.2.5's data block timeout
  (a tiny threaded server with a small receive buffer: the reading pace is
  the point, no MTA lets a test set it).
- fastsend's submission listener as the smarthost of a private Postfix (AUTH
  LOGIN through Cyrus SASL, pipelined DATA) and of an unpacked Exim (AUTH
  PLAIN, CHUNKING/BDAT), STARTTLS required by both: dot-stuffed and 8-bit
  bodies arrive as given, a message over SIZE is never sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests._mta_helpers import (
    exim_daemon,
    exim_env,
    exim_or_skip,
    exim_workdir,
    needs_root_mta,
    private_postfix,
    read_log,
)

from _smtp_helpers import client_class, link_class
from conftest import free_port
from fastsend.config import from_dict
from fastsend.outcome import Envelope
from fastsend.serve.context import open_context
from fastsend.serve.listeners import hash_password, start_listeners
from fastsend.smtp import ConnectOptions, SMTPConnection, connect
from fastsend.smtp import transport as tr
from fastsend.smtp.transport import Timeouts


@pytest.fixture(params=["py", "c"])
def twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The client and its Link over the reference ("py") or the compiled twins."""
    monkeypatch.setattr(tr, "SMTPClient", client_class(request.param))
    monkeypatch.setattr(tr, "Link", link_class(request.param))
    return str(request.param)


class SlowReader:
    """An SMTP server (one command at a time) whose sockets keep a small
    receive buffer and that reads a message's body ``chunk`` bytes every
    ``pause`` seconds; with ``stop_after`` it stops reading once it has that
    many bytes of the body (the connection stays open until the test ends)."""

    def __init__(self, chunk: int = 16384, pause: float = 0.02, stop_after: int = 0) -> None:
        self.chunk, self.pause, self.stop_after = chunk, pause, stop_after
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # (accepted ones too)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.bodies: list[int] = []  # sizes of the messages taken
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # (closed by the test)
            conn, _ = self.sock.accept()
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b"220 slow.test ESMTP\r\n")
        buf = b""
        while not self.done.is_set():
            while b"\r\n" not in buf:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
            line, buf = buf.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                body, buf = buf, b""
                while not body.endswith(b"\r\n.\r\n"):
                    if self.stop_after and len(body) >= self.stop_after:
                        self.done.wait(30)
                        return
                    data = conn.recv(self.chunk)
                    if not data:
                        return
                    body += data
                    time.sleep(self.pause)
                self.bodies.append(len(body))
                conn.sendall(b"250 2.0.0 Ok: queued as S%d\r\n" % len(self.bodies))
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"250 slow.test\r\n" if verb in (b"EHLO", b"HELO") else b"250 Ok\r\n")

    def close(self) -> None:
        self.done.set()
        self.sock.close()


@pytest.fixture
def slow_reader(request: pytest.FixtureRequest) -> Iterator[SlowReader]:
    server = SlowReader(**getattr(request, "param", {}))
    yield server
    server.close()


# A data block may wait 1.5 s for the server to take some bytes; the reply to the
# end of data 0.5 s once it has them all (the RFC's 3 and 10 minutes, scaled down).
TIMEOUTS = Timeouts(
    connect=5, greeting=5, ehlo=5, starttls=5, mail=5, rcpt=5, data=5, data_block=1.5,
    data_end=0.5, quit=1,
)  # fmt: skip


def _send(port: int, size: int) -> Any:
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (size // 1000)

    async def go() -> Any:
        opts = ConnectOptions(host="127.0.0.1", port=port, tls="off", timeouts=TIMEOUTS)
        conn = await connect(opts)
        assert isinstance(conn, SMTPConnection), conn
        results = await conn.send([Envelope("s@sender.test", ["r@x.test"], body, tag=0)])
        await conn.quit()
        return results[0].outcomes[0]

    return asyncio.run(go())


def test_a_slow_but_steady_reader_gets_the_whole_message(
    slow_reader: SlowReader, twin: str
) -> None:
    """800 KB taken 16 KB every 20 ms (~1 s, mostly out of the kernel's send
    queue, where asyncio sees nothing): while the server keeps taking bytes the
    data block timeout holds, and the end-of-data reply's starts once it has
    them all. Before, the reply timer ran from the 354 and cut the transfer
    at data_end (0.5 s here, 10 minutes in the RFC) although it was moving."""
    out = _send(slow_reader.port, 800_000)
    assert out.delivered, out
    assert slow_reader.bodies and slow_reader.bodies[0] > 800_000


@pytest.mark.parametrize("slow_reader", [{"stop_after": 200_000}], indirect=True)
def test_a_reader_that_stops_mid_message_times_out_on_the_data_block(
    slow_reader: SlowReader, twin: str
) -> None:
    """The server stops reading after 200 KB of an 800 KB message: deferred by
    the data block timeout (nothing taken for 1.5 s), said as such, at stage
    "data" (the end of data was never answered: not sent again at once)."""
    out = _send(slow_reader.port, 800_000)
    assert out.deferred and out.stage == "data", out
    assert "took none of our data for 1.5 s" in out.text, out


# ---------------------------------------------------------------- real MTAs as clients
# fastsend's submission listener as the relay (smarthost) of a Postfix and of an
# Exim: STARTTLS required by each client, AUTH inside it (Postfix with LOGIN
# through Cyrus SASL, Exim with PLAIN), Postfix pipelining DATA, Exim CHUNKING
# (BDAT), each relaying what a local program gave it.

PASSWORD = "s3cret pass"
SUBMIT_SIZE = 20_000  # the listener's SIZE: the big message is over it

# After _mta_helpers.POSTFIX_MAIN_CF (directories, name, loopback relaying, log).
RELAY_MAIN_CF = """\
smtpd_recipient_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sub}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = inline:{{ {{[127.0.0.1]:{sub}=acme:{password}}} }}
smtp_sasl_security_options = noanonymous
smtp_sasl_mechanism_filter = login
smtp_tls_security_level = encrypt
smtp_tls_loglevel = 1
maximal_queue_lifetime = 0
bounce_queue_lifetime = 0
"""

RELAY_LISTENER_CF = """\
127.0.0.1:{inp} inet n - n - - smtpd
"""

EXIM_CLIENT_CONF = """\
primary_hostname = eximclient.test
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
daemon_smtp_ports = {inp}
local_interfaces = 127.0.0.1
tls_advertise_hosts =
host_lookup =
rfc1413_hosts =
keep_environment =
queue_only = true
acl_smtp_rcpt = accept
log_selector = +smtp_protocol_error +smtp_syntax_error
begin routers
smarthost:
  driver = manualroute
  route_list = * 127.0.0.1::{sub} byname
  self = send
  transport = submission
begin transports
submission:
  driver = smtp
  hosts_require_tls = *
  hosts_require_auth = *
  tls_verify_certificates =
begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  client_send = ^acme^{password}
begin retry
* * F,1m,1m
"""

# A quoted local part with a space (RFC 5321 4.1.2): the listener refused it (501 5.1.3),
# so the relaying MTA bounced it.
QUOTED = '"john doe"@example.org'
DOTS = (
    b"From: App <app@example.com>\r\nTo: ann@example.org\r\nSubject: dots\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\nend\r\n"
)
EIGHT = (
    "From: App <app@example.com>\r\nTo: bob@example.org\r\nSubject: eight\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nh\u00e9llo w\u00f6rld\r\n"
).encode()
BIG = (
    b"From: App <app@example.com>\r\nTo: big@example.org\r\nSubject: big\r\n\r\n"
    + (b"y" * 70 + b"\r\n") * 400
)


@contextlib.contextmanager
def postfix_relaying_to(sub_port: int) -> Iterator[tuple[int, Callable[[], str]]]:
    """A private Postfix (own config, queue and log) whose relayhost is the
    submission listener; yields (its smtpd port, its log)."""
    inp = free_port()
    with private_postfix(
        RELAY_MAIN_CF, RELAY_LISTENER_CF.format(inp=inp), [inp], hostname="relayclient.test",
        prefix="fastsend-pfrelay-", sub=sub_port, password=PASSWORD,
    ) as d:  # fmt: skip
        yield inp, lambda: read_log(d / "maillog")


@contextlib.contextmanager
def exim_relaying_to(sub_port: int) -> Iterator[tuple[int, Callable[[], Any], Callable[[], str]]]:
    """Exim (unpacked) keeping what it takes in its queue; yields (its port,
    a queue run that delivers it all to the submission listener, its main log)."""
    root = exim_or_skip()
    needs_root_mta("Exim", present=True)
    with exim_workdir("fastsend-eximclient-") as d:
        inp = free_port()
        conf = d / "exim.conf"
        conf.write_text(EXIM_CLIENT_CONF.format(d=d, inp=inp, sub=sub_port, password=PASSWORD))
        env = exim_env(root)
        exim = str(root / "usr/sbin/exim4")

        def queue_run() -> Any:
            # (delivered by this process: no re-exec of the binary's built-in path)
            return subprocess.run(
                [exim, "-C", str(conf), "-qff"], env=env, capture_output=True, timeout=60
            )

        with exim_daemon([exim, "-C", str(conf), "-bdf", "-oX", str(inp)], inp, env):
            yield inp, queue_run, lambda: read_log(d / "log" / "mainlog")


def _inject(
    port: int, sender: str, rcpts: list[str], msg: bytes, opts: tuple[str, ...] = ()
) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, rcpts, msg, mail_options=list(opts))


def _relay_through(
    tmp_path: Path, certs: Any, mta: Callable[[int], Any], deliver: Callable[[Any], str]
) -> tuple[list[dict[str, Any]], dict[int, bytes], str]:
    """The submission listener on a temporary spool, an MTA relaying to it,
    three messages given to the MTA (and BIG from the null sender, over the
    listener's SIZE), ``deliver(handle)`` to have them sent and to return the
    MTA's log once it has dealt with all four; returns the accepted events,
    each message as spooled and that log."""
    cert, key, _ = certs
    sub_port = free_port()
    users = {"acme": hash_password(PASSWORD, iterations=1000)}
    sub = {"listen": f"127.0.0.1:{sub_port}", "tls_cert": cert, "tls_key": key,
           "users": users, "max_size": SUBMIT_SIZE}  # fmt: skip
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, "submission": sub}))
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    log: list[str] = []
    with mta(sub_port) as handle:
        port = handle[0]

        async def main() -> None:
            servers = await start_listeners(ctx)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, _inject, port, "app@example.com",
                                           ["ann@example.org", QUOTED], DOTS)  # fmt: skip
                await loop.run_in_executor(
                    None, _inject, port, "app@example.com", ["bob@example.org"], EIGHT,
                    ("BODY=8BITMIME",),
                )  # fmt: skip
                await loop.run_in_executor(None, _inject, port, "", ["big@example.org"], BIG)
                log.append(await loop.run_in_executor(None, deliver, handle))
                deadline = time.monotonic() + 10  # (the MTA is done: the events are in)
                while len([e for e in events if e["event"] == "accepted"]) < 3:
                    assert time.monotonic() < deadline, events
                    await asyncio.sleep(0.05)
            finally:
                for s in servers:
                    s.close()
                    await s.wait_closed()

        asyncio.run(main())
        accepted = [e for e in events if e["event"] == "accepted"]
        raws = {
            e["id"]: base64.b64decode(ctx.spool.message(e["id"])["vars"]["raw"])  # type: ignore[index]
            for e in accepted
        }
        ctx.close()
        return accepted, raws, log[0]


def _check_relayed(accepted: list[dict[str, Any]], raws: dict[int, bytes]) -> None:
    by_rcpt = {e["rcpt"]: raws[e["id"]] for e in accepted}
    assert sorted(by_rcpt) == [QUOTED, "ann@example.org", "bob@example.org"]
    assert {e["tenant"] for e in accepted} == {"acme"}
    body = DOTS.partition(b"\r\n\r\n")[2]
    for rcpt in ("ann@example.org", QUOTED):  # dot-stuffed by the MTA, unstuffed here
        assert by_rcpt[rcpt].endswith(b"\r\n\r\n" + body), by_rcpt[rcpt]
    assert by_rcpt["bob@example.org"].endswith(b"\r\n\r\n" + EIGHT.partition(b"\r\n\r\n")[2])


def test_postfix_relays_through_the_submission_listener(tmp_path: Path, certs: Any) -> None:
    """Postfix with fastsend as its relayhost: STARTTLS required (encrypt),
    AUTH LOGIN through Cyrus SASL, pipelined DATA, two recipients in one
    transaction (one a quoted local part with a space, which the listener
    refused 501 5.1.3), dot-stuffed lines and an 8-bit body arrive as given; a
    message over the listener's SIZE is bounced by Postfix without being
    sent (RFC 1870)."""

    def deliver(handle: Any) -> str:  # (Postfix delivers by itself)
        deadline = time.monotonic() + 60
        while len(re.findall(r"status=(?:sent|bounced)", handle[1]())) < 4:
            assert time.monotonic() < deadline, handle[1]()
            time.sleep(0.05)
        return str(handle[1]())

    accepted, raws, log = _relay_through(tmp_path, certs, postfix_relaying_to, deliver)
    _check_relayed(accepted, raws)
    assert len(re.findall(r"relay=127\.0\.0\.1\S+, .*status=sent \(250 ", log)) == 3, log
    assert re.search(
        r"to=<big@example.org>.*status=bounced \(message size \d+ exceeds size limit 20000", log
    ), log
    assert "TLS connection established to 127.0.0.1" in log
    assert "SASL authentication failed" not in log and "warning" not in log, log


def test_exim_relays_through_the_submission_listener_with_chunking(
    tmp_path: Path, certs: Any
) -> None:
    """Exim with fastsend as its smarthost: STARTTLS and AUTH PLAIN required,
    the messages sent with BDAT (CHUNKING): they arrive as given; the one
    over the listener's SIZE is refused at MAIL and never sent."""

    def deliver(handle: Any) -> str:
        handle[1]()  # a queue run: every message tried once
        return str(handle[2]())

    accepted, raws, log = _relay_through(tmp_path, certs, exim_relaying_to, deliver)
    _check_relayed(accepted, raws)
    sent = [ln for ln in log.splitlines() if " => " in ln or " -> " in ln]
    assert len(sent) == 3 and all(" A=plain K " in ln for ln in sent), log  # K: CHUNKING
    assert "big@example.org" not in "".join(sent)
    assert re.search(r"big@example.org.*552.*5\.3\.4", log), log
