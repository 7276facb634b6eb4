"""The asyncio transport of the SMTP client: the only module that touches sockets.

:func:`connect` opens a TCP connection from a chosen source IP, reads the
greeting, says EHLO (HELO as fallback), upgrades with STARTTLS when asked and
authenticates, and returns an :class:`SMTPConnection` (or an
:class:`~fastsend.outcome.Outcome` saying why it could not). The connection
then delivers batches with :meth:`SMTPConnection.send`, pipelined, and is
reused until ``max_messages``; :meth:`SMTPConnection.quit` ends it cleanly.

It uses ``asyncio.Protocol`` callbacks (not streams) so each server read costs
one callback, one parse and at most one write; it runs on uvloop and on the
standard loop. Per-command timeouts follow RFC 5321 section 4.5.3.2; one
timer per connection is re-armed lazily instead of one per command.

What it does not do: SMTP state (that is :mod:`fastsend.smtp.client`), DNS/MX
choice, pooling across connections, retries or shaping. It never raises for
network or peer trouble: every failure becomes a deferred or failed Outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import socket
import ssl
import sys
import termios
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

import msgspec

from fastsend import ring
from fastsend._accel import pick
from fastsend.hostname import address_literal
from fastsend.outcome import DEFERRED, Envelope, Outcome, TxnResult
from fastsend.smtp.client import CLOSED, READY, CommandDone, Event, SMTPClient
from fastsend.smtp.errors import RemoteProtocolError

# Linux: bind() reserves no port until connect(), so many source IPs can share
# the ephemeral range (the kernel picks a port per 4-tuple, not per address).
IP_BIND_ADDRESS_NO_PORT = getattr(
    socket, "IP_BIND_ADDRESS_NO_PORT", 24 if sys.platform.startswith("linux") else 0
)

TLSMode = Literal["opportunistic", "required", "off"]


class Timeouts(msgspec.Struct, frozen=True):
    """Seconds to wait for each reply (RFC 5321 section 4.5.3.2 defaults)."""

    connect: float = 30.0  # TCP connect (not in the RFC; Postfix uses 30 s)
    greeting: float = 300.0  # 4.5.3.2.1 initial 220 message: 5 minutes
    ehlo: float = 300.0  # EHLO/HELO, AUTH, RSET, NOOP: as MAIL
    starttls: float = 300.0  # the 220 to STARTTLS and the TLS handshake
    mail: float = 300.0  # 4.5.3.2.2 MAIL: 5 minutes
    rcpt: float = 300.0  # 4.5.3.2.3 RCPT: 5 minutes
    data: float = 120.0  # 4.5.3.2.4 DATA initiation: 2 minutes
    # 4.5.3.2.5 data block, 3 minutes: while bytes we wrote are not all taken
    # (our buffer or the kernel's: :func:`unsent`), each check needs the server
    # to have taken some within it; the wait for the reply starts once it has
    # all (a slow but steady reader was cut at data_end from the 354, one that
    # stopped reading mid-body was waited for the whole data_end).
    data_block: float = 180.0
    data_end: float = 600.0  # 4.5.3.2.6 DATA termination: 10 minutes
    # The 221 to QUIT (we close anyway): a few round trips, never the 5 minutes of a
    # command. Postfix's smtp_quit_timeout is 300 s and Exim does not wait for the
    # 221 at all; waiting lets a receiver counting connections close this one before
    # the next opens, and 10 s here held the next session of the site (a new
    # connection at max_messages_per_connection) and a refused EHLO's deferral 10 s
    # for each receiver that never answered QUIT.
    quit: float = 2.0

    def for_stage(self, stage: str) -> float:
        if stage == "rcpt":
            return self.rcpt
        if stage == "dot":
            return self.data_end
        if stage == "data":
            return self.data
        if stage == "mail":
            return self.mail
        if stage == "greeting":
            return self.greeting
        if stage == "starttls":
            return self.starttls
        if stage == "quit":
            return self.quit
        return self.ehlo


DEFAULT_TIMEOUTS = Timeouts()


class ConnectOptions(msgspec.Struct, frozen=True):
    """Where and how to connect. ``auth`` is (user, password); it is never logged."""

    host: str
    port: int = 25
    source_ip: str | None = None
    helo_name: str = "localhost"
    tls: TLSMode = "opportunistic"
    ssl_context: ssl.SSLContext | None = None
    auth: tuple[str, str] | None = None  # not in the repr
    max_messages: int = 100
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    server_hostname: str | None = None  # for SNI/verification; defaults to host
    auth_mechanism: str = ""  # PLAIN, LOGIN or CRAM-MD5; default: the best offered
    chunking: bool = True  # BDAT when the server offers CHUNKING + PIPELINING
    implicit_tls: bool = False  # TLS from the first byte (submissions, port 465, RFC 8314)
    # AUTH PLAIN/LOGIN without TLS (the password in clear text): only when the
    # operator says so; otherwise a session without TLS authenticates with
    # CRAM-MD5 or not at all (deferred at "auth", nothing sent).
    auth_in_clear: bool = False
    # After the STARTTLS handshake: called with the server's certificates (DER,
    # its own first, as it sent them); a non-empty answer says why the session
    # must not go on (DANE's TLSA check, fastsend.delivery.dane).
    peer_check: Callable[[list[bytes]], str] | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("ConnectOptions.host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"ConnectOptions.port {self.port} is not in 1..65535")
        if self.tls not in ("opportunistic", "required", "off"):
            raise ValueError(
                f"ConnectOptions.tls must be opportunistic|required|off, not {self.tls!r}"
            )
        if self.max_messages < 1:
            raise ValueError(f"ConnectOptions.max_messages must be >= 1, not {self.max_messages}")
        if self.auth_mechanism.upper() not in ("", "PLAIN", "LOGIN", "CRAM-MD5"):
            raise ValueError(f"unsupported AUTH mechanism {self.auth_mechanism!r}")

    def __repr__(self) -> str:
        shown = (f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__ if f != "auth")
        return f"ConnectOptions({', '.join(shown)})"


@functools.cache
def _default_context(mode: TLSMode) -> ssl.SSLContext:
    """Opportunistic TLS encrypts without verifying (as MTAs do, RFC 7435);
    "required" verifies against the system's trust store. One context per mode
    for the process, shared by its connections: loading the trust store takes
    ~20 ms, which every STARTTLS would otherwise pay; the opportunistic one
    does not load it (it verifies nothing), with the same protocol defaults."""
    if mode == "required":
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # Whatever TLS the server speaks, as Postfix's opportunistic "medium"
    # ciphers do (RFC 7435: the alternative is clear text, and an unverified
    # session has nothing a stricter handshake would protect): Python's own
    # list (TLS 1.2+, ECDHE/DHE only, no SHA-1 MAC, security level 2) failed
    # with MX hosts offering RSA key exchange, CBC-SHA suites or TLS 1.0, and
    # every message to them went in clear after the retry.
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers(OPPORTUNISTIC_CIPHERS)
    return ctx


# The opportunistic context's ciphers: OpenSSL's default list (strongest
# first: TLS 1.3 and ECDHE-AEAD are still what a current server gets), with
# the security level lowered so that SHA-1 and TLS 1.0/1.1 handshakes work;
# never unauthenticated or null ciphers, nor PSK/SRP (no shared secret here).
OPPORTUNISTIC_CIPHERS = "DEFAULT:!aNULL:!eNULL:!PSK:!SRP:@SECLEVEL=0"


class Napper:
    """Interrupt coalescing for a process's SMTP connections (off until
    :meth:`start`; the workers start it, ``NAP_S`` and ``NAP_LINKS`` in
    ``delivery/worker.py``): after a loop iteration in which a connection read
    a reply, while at least ``min_links`` connections have a group in flight
    (``sending``, counted by :meth:`SMTPConnection._send`), the loop sleeps
    ``us`` microseconds before it polls again. Without it a worker sending
    to a fast receiver slept and was woken once per reply (~0.8 wake-ups per
    message: the scheduler's work in the worker and in the receiver that woke
    it); after a nap the next poll finds the replies that came meanwhile, of
    many connections, already there. Every round trip waits at most a nap
    longer; with fewer connections sending (one to a local server, a test)
    it never naps. The reference of the compiled twin in ``_smtp.pxi``."""

    def __init__(self) -> None:
        self.sending = 0  # links with a group in flight
        self.min_links = 0
        self.us = 0
        self.naps = 0  # naps taken (tests, benches)
        self._soon: Callable[..., object] | None = None
        self._due = False

    def start(self, loop: asyncio.AbstractEventLoop, seconds: float, min_links: int) -> None:
        """Nap ``seconds`` on ``loop`` while ``min_links`` links send (0 s: off)."""
        self._due = False
        self.min_links = min_links
        if seconds <= 0 or loop is None:
            self._soon, self.us = None, 0
        else:
            self._soon, self.us = loop.call_soon, int(seconds * 1e6)

    def stop(self) -> None:
        self._soon = None
        self._due = False

    @property
    def active(self) -> bool:
        return self._soon is not None

    def poke(self) -> None:
        """A connection read something: nap after this iteration, if due."""
        if self._soon is not None and not self._due and self.sending >= self.min_links:
            self._due = True
            self._soon(self.nap)

    def nap(self) -> None:
        self._due = False
        if self._soon is None or self.sending < self.min_links:
            return
        self.naps += 1
        time.sleep(self.us / 1e6)


class Link(asyncio.Protocol):
    """Moves bytes between the socket and the sans-I/O client; resolves waiters.

    The reference of the compiled twin of the same name in ``fastsend._core``
    (``_smtp.pxi``), which is picked below: every server read of every
    connection runs ``data_received``, so per message it is the client's glue.
    The tests run every transport test over both (with the client twins)."""

    def __init__(
        self,
        client: SMTPClient,
        loop: asyncio.AbstractEventLoop,
        t: Timeouts,
        napper: Napper | None = None,
    ) -> None:
        self.client = client
        self.loop = loop
        self.timeouts = t
        self.transport: asyncio.Transport | None = None
        self.results: list[TxnResult] = []
        self.want = 0
        self.batch_waiter: asyncio.Future[None] | None = None
        self.cmd_waiter: asyncio.Future[CommandDone] | None = None
        # A reply that arrived before anyone waited for it: uvloop may deliver
        # the greeting inside create_connection, before command() can wait.
        self.early: CommandDone | None = None
        self.last = loop.time()  # last progress (a read, or a write from idle)
        # Every reply answered (a read left nothing waited for): the next write
        # starts the reply clock, even with the timer of the last one still armed
        # (a reused connection's reply timer counted from its last read, its idle
        # time in the pool included: a premature timeout).
        self.idle = False
        self.timer: asyncio.TimerHandle | None = None
        self.tick = min(t.mail, t.rcpt, t.data, t.data_end)
        # Bytes written and not yet taken by the server at the last check, and
        # when that count last changed (the data block timeout's clock).
        self.unsent = 0
        self.moved = 0.0
        self.lost_reason = ""
        self.napper = napper  # the process's Napper, told of every read

    # asyncio callbacks --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.napper is not None:
            self.napper.poke()
        client = self.client
        try:
            events = client.receive_data(data)
        except RemoteProtocolError as exc:
            self.fail(f"protocol error from server: {exc}")
            return
        out = client.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        self.last = self.loop.time()
        if events:
            self.dispatch(events)
            if not client.expecting:  # (a session's last reply ends in an event)
                self.idle = True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost_reason:
            self.lost_reason = f"connection lost: {exc}" if exc else "connection closed by server"
        self.finish(self.client.connection_lost(self.lost_reason))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    # plumbing -----------------------------------------------------------------
    def dispatch(self, events: list[Event]) -> None:
        for ev in events:
            if type(ev) is TxnResult:
                self.results.append(ev)
            elif ev.command != "unsolicited":  # type: ignore[union-attr]
                w = self.cmd_waiter
                if w is not None and not w.done():
                    self.cmd_waiter = None
                    w.set_result(ev)  # type: ignore[arg-type]
                else:
                    self.early = ev  # type: ignore[assignment]
        w2 = self.batch_waiter
        if w2 is not None and len(self.results) >= self.want and not w2.done():
            self.batch_waiter = None
            w2.set_result(None)

    def finish(self, events: list[Event]) -> None:
        """After the connection died: deliver outcomes, release every waiter."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.dispatch(events)
        w = self.cmd_waiter
        if w is not None and not w.done():
            self.cmd_waiter = None
            w.set_result(CommandDone("lost", 0, "", self.lost_reason))
        w2 = self.batch_waiter
        if w2 is not None and not w2.done():  # cannot happen: abort decides all
            self.batch_waiter = None
            w2.set_result(None)

    def fail(self, reason: str) -> None:
        """Give up on the connection: defer what is pending, abort the socket."""
        if not self.lost_reason:
            self.lost_reason = reason
        self.finish(self.client.connection_lost(self.lost_reason))
        if self.transport is not None:
            self.transport.abort()

    def write(self, wire: bytes) -> None:
        """Write commands; starts the reply clock when we were idle."""
        now = self.loop.time()
        if self.timer is None or self.idle:
            self.last = now
            self.idle = False
        deadline = self.last + self.timeouts.for_stage(self.client.expecting or "ehlo")
        if self.timer is None or self.timer.when() > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.arm(min(deadline - now, self.tick))
        if wire:
            self.transport.write(wire)  # type: ignore[union-attr]

    def arm(self, delay: float) -> None:
        self.timer = self.loop.call_later(delay, self.check_timeout)

    def check_timeout(self) -> None:
        self.timer = None
        stage = self.client.expecting
        if not stage or self.client.state == CLOSED:
            return  # idle: nothing is waited for
        now = self.loop.time()
        left = unsent(self.transport)
        if left:
            # The server is still taking what we wrote (a big message on a slow
            # path, a tarpit reading slowly): RFC 5321 4.5.3.2.5's data block
            # timeout, from the last time it took some; no reply is due yet.
            if left != self.unsent:
                self.unsent, self.moved = left, now
            block = self.timeouts.data_block
            if now - self.moved >= block:
                self.fail(f"timeout: the server took none of our data for {block:g} s")
            else:
                self.arm(min(block - (now - self.moved), self.tick / 4))
            return
        if self.unsent:  # all taken since the last check: the reply is due from now
            self.unsent = 0
            self.last = max(self.last, now)
        limit = self.timeouts.for_stage(stage)
        waited = now - self.last
        if waited >= limit:
            self.fail(f"timeout: no reply to {stage} after {limit:g} s")
        else:
            # Replies move the stage without touching the timer (no per-message
            # timer work); checking at least every `tick` bounds how late a
            # shorter stage's timeout (DATA's 2 min after RCPT's 5) is seen.
            self.arm(min(limit - waited, self.tick))


def unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes written to ``transport`` that the peer has not taken yet: those
    in asyncio's buffer and, on Linux, those in the socket's send queue
    (unacknowledged: TIOCOUTQ), where the kernel keeps up to megabytes of a
    message while the server reads it. Called once per timer check, not per
    write."""
    if transport is None:
        return 0
    try:
        n = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    except Exception:  # a closing transport
        return 0
    sock = transport.get_extra_info("socket")
    if sock is not None and _TIOCOUTQ:
        with contextlib.suppress(OSError, ValueError):
            n += int.from_bytes(fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"), sys.byteorder)
    return int(n)


# ioctl(TIOCOUTQ == SIOCOUTQ): a TCP socket's unacknowledged bytes (Linux).
_TIOCOUTQ = getattr(termios, "TIOCOUTQ", 0) if sys.platform.startswith("linux") else 0


# The reference stays reachable for the tests; the picked twin is the one used.
PyLink = Link
PyNapper = Napper
if not TYPE_CHECKING:
    Link = pick(PyLink)
    Napper = pick(PyNapper)

# The process's napper: every connection tells it of its reads; off until a
# worker starts it.
NAPPER = Napper()


class SMTPConnection:
    """One open SMTP session, ready for transactions. Create with :func:`connect`."""

    def __init__(self, opts: ConnectOptions, client: SMTPClient, link: Link) -> None:
        self.options = opts
        self.mx = client.mx
        self._client = client
        self._link = link
        self._lock = asyncio.Lock()
        self.messages_sent = 0
        # Of the last send()'s results, how many are one recipient delivered
        # (all of them: Lane.observe need not read the group's outcomes).
        self.delivered_one = 0

    @property
    def capabilities(self) -> dict[str, str]:
        return self._client.capabilities

    @property
    def tls_active(self) -> bool:
        return self._client.tls_active

    @property
    def usable(self) -> bool:
        """False once closed, broken, or at ``max_messages``."""
        return (
            self._client.state == READY
            and not self._link.lost_reason
            and self.messages_sent < self.options.max_messages
        )

    @property
    def ended(self) -> bool:
        """The session is over: closed by the server (a 421), lost, timed out
        or aborted (not merely at ``max_messages``)."""
        return self._client.state == CLOSED or bool(self._link.lost_reason)

    @property
    def remaining(self) -> int:
        """Messages this connection may still carry (0 when not usable)."""
        return self.options.max_messages - self.messages_sent if self.usable else 0

    @property
    def idle_for(self) -> float:
        """Seconds since the last activity (0 while a batch is in flight)."""
        if self._client.busy:
            return 0.0
        return self._link.loop.time() - self._link.last

    def sockname(self) -> tuple[str, int] | None:
        t = self._link.transport
        return t.get_extra_info("sockname") if t is not None else None

    async def command(self, wire: bytes) -> CommandDone:
        """Write a session command (from the client's ``send_*``) and await its reply."""
        link = self._link
        if link.lost_reason:
            return CommandDone("lost", 0, "", link.lost_reason)
        if not wire and link.early is not None:  # the greeting came first
            early, link.early = link.early, None
            return early
        fut: asyncio.Future[CommandDone] = link.loop.create_future()
        link.cmd_waiter = fut
        link.write(wire)
        return await fut

    async def send(self, envelopes: Iterable[Envelope]) -> list[TxnResult]:
        """Deliver a batch, pipelined; one TxnResult per envelope (its ``tag``
        names it), in the order they were decided: envelope order, except that
        one refused locally (SIZE, SMTPUTF8, a bad address) may come before
        those still in flight ahead of it.

        Never raises: a broken connection defers every remaining recipient.
        Envelopes beyond ``max_messages`` are deferred with stage "local".
        """
        envs = list(envelopes)
        if not envs:
            return []
        async with self._lock:
            room = self.remaining
            head, tail = envs[:room], envs[room:]
            results: list[TxnResult] = []
            before = self._client.delivered_one
            if head:
                results = await self._send(head)
            self.delivered_one = self._client.delivered_one - before
            if tail:
                if self._link.lost_reason or self._client.state != READY:
                    why = self._link.lost_reason or f"connection not usable ({self._client.state})"
                else:
                    why = f"connection reached max_messages ({self.options.max_messages})"
                for env in tail:
                    out = Outcome(DEFERRED, 0, "", why, "local", self.mx)
                    results.append(TxnResult(env.tag, [out] * len(env.rcpts)))
            return results

    async def _send(self, envs: list[Envelope]) -> list[TxnResult]:
        link, client = self._link, self._client
        self.messages_sent += len(envs)
        link.results = []
        link.want = len(envs)
        fut: asyncio.Future[None] = link.loop.create_future()
        link.batch_waiter = fut
        wire = client.send_envelopes(envs)
        link.write(wire)
        ev = client.events()
        if ev:
            link.dispatch(ev)
        if not fut.done():
            nap = link.napper
            if nap is None:
                await fut
            else:
                nap.sending += 1
                try:
                    await fut
                finally:
                    nap.sending -= 1
        results, link.results = link.results, []
        return results

    def answered(self) -> list[TxnResult]:
        """The outcomes of the group in flight decided so far (its receiver's
        replies read), in order; the list grows until the group ends, and
        each group gets a new one."""
        return self._link.results

    def unsent(self) -> list[object]:
        """The tags of the envelopes of the group in flight whose message was
        never written (``ClientCore.unsent``): a stop now gives them back."""
        return self._client.unsent()  # type: ignore[no-any-return]

    async def quit(self) -> None:
        """Send QUIT, wait (briefly) for 221, close. Never raises."""
        async with self._lock:
            client = self._client
            if client.state == READY and not self._link.lost_reason and not client.busy:
                with contextlib.suppress(Exception):
                    await self.command(client.send_quit())
            self.close()

    def close(self) -> None:
        """Abort the connection now (no QUIT)."""
        link = self._link
        if not link.lost_reason:
            link.lost_reason = "connection closed by client"
        if link.transport is not None:
            link.transport.abort()
        link.finish(self._client.connection_lost(link.lost_reason))

    async def close_if_idle(self, max_idle: float) -> bool:
        """QUIT if nothing happened for ``max_idle`` seconds; True if it closed."""
        if self.usable and not self._client.busy and self.idle_for >= max_idle:
            await self.quit()
            return True
        return False


async def _open_socket(loop: asyncio.AbstractEventLoop, opts: ConnectOptions) -> socket.socket:
    infos = await loop.getaddrinfo(opts.host, opts.port, type=socket.SOCK_STREAM)
    family, _type, proto, _name, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        if opts.source_ip:
            if IP_BIND_ADDRESS_NO_PORT:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((opts.source_ip, 0))
        await _sock_connect(loop, sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _sock_connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple) -> None:
    """``loop.sock_connect`` of a resolved address, without its look-up: uvloop's
    looks the address up again (getaddrinfo in its thread pool: a thread
    wake-up per connection, even for a numeric address). A non-blocking
    connect, then a wait for the socket to be writable, as asyncio does."""
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        fut: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Connect call failed {addr}: {os.strerror(err)}")


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def connect(opts: ConnectOptions) -> SMTPConnection | Outcome:
    """Open an SMTP session; an Outcome (deferred or failed) explains a failure."""
    result = await _connect(opts, opts.tls)
    if isinstance(result, _TLSFailed):
        # Opportunistic: the server offered STARTTLS but the handshake failed;
        # like Postfix, try once more in plain text rather than not deliver.
        result = await _connect(opts, "off", "the TLS handshake failed")
    assert not isinstance(result, _TLSFailed)
    return result


class _TLSFailed(Exception):
    pass


async def _connect(
    opts: ConnectOptions, tls: TLSMode, no_tls: str = "TLS is off"
) -> SMTPConnection | Outcome | _TLSFailed:
    """One attempt; ``no_tls`` says why a session ends up without TLS."""
    loop = asyncio.get_running_loop()
    mx = f"{opts.host}:{opts.port}"
    t = opts.timeouts
    try:
        async with asyncio.timeout(t.connect):
            sock = await _open_socket(loop, opts)
    except TimeoutError:
        return Outcome(DEFERRED, 0, "", f"connect timeout after {t.connect:g} s", "connect", mx)
    except OSError as exc:
        return Outcome(DEFERRED, 0, "", f"connect failed: {exc}", "connect", mx)
    try:
        # "" (no name known): the connection's own address, as a literal (RFC 5321 4.1.4)
        helo = opts.helo_name or address_literal(sock.getsockname()[0])
        client = SMTPClient(helo, mx, chunking=opts.chunking)
        if ring.WRITES is not None:  # a worker: notes each message it begins to write
            client.on_body = ring.WRITES.mark
    except BaseException:
        sock.close()  # a bad EHLO name is our error: do not leak the socket
        raise
    link = Link(client, loop, t, NAPPER)
    if opts.implicit_tls:
        ctx = opts.ssl_context or _default_context("required" if tls == "required" else tls)
        try:
            await loop.create_connection(
                lambda: link,
                sock=sock,
                ssl=ctx,
                server_hostname=opts.server_hostname or opts.host,
                ssl_handshake_timeout=t.starttls,
            )
        except Exception as exc:  # ssl.SSLError, OSError, TimeoutError
            sock.close()
            return Outcome(DEFERRED, 0, "", f"TLS handshake failed: {exc}", "tls", mx)
        client.tls_active = True
        tls = "off"  # no STARTTLS inside TLS
    else:
        try:
            await loop.create_connection(lambda: link, sock=sock)
        except OSError as exc:
            sock.close()
            return Outcome(DEFERRED, 0, "", f"connect failed: {exc}", "connect", mx)
    conn = SMTPConnection(opts, client, link)
    reply = await conn.command(b"")  # the greeting
    if not reply.ok:
        conn.close()
        return reply.outcome("greeting", mx)
    reply = await conn.command(client.send_ehlo())
    if not reply.ok:
        await conn.quit()
        if reply.code == 0 and client.ehlo_refusal is not None:
            reply = client.ehlo_refusal  # (closed after refusing EHLO: its words)
        return reply.outcome(reply.command if reply.command != "lost" else "ehlo", mx)
    if tls != "off":
        if "STARTTLS" not in client.capabilities:
            no_tls = "the server does not offer STARTTLS"
            if tls == "required":
                await conn.quit()
                text = "TLS required but the server does not offer STARTTLS"
                return Outcome(DEFERRED, 0, "", text, "starttls", mx)
        else:
            reply = await conn.command(client.send_starttls())
            if reply.code == 0 and tls == "opportunistic":
                # The STARTTLS exchange broke the session (garbage or data
                # after the 220, a drop, no answer): a broken TLS setup, as a
                # failed handshake is. Once more in clear, not deferred forever.
                conn.close()
                return _TLSFailed()
            if reply.code != 220:
                if tls == "required" or reply.code == 0 or client.state != READY:
                    await conn.quit()
                    return reply.outcome("starttls", mx)
                no_tls = f"STARTTLS was refused ({reply.code})"
            else:
                failed = await _start_tls(loop, conn, link, client, opts)
                if failed:
                    conn.close()
                    if tls == "opportunistic":
                        return _TLSFailed()
                    return Outcome(DEFERRED, 0, "", failed, "starttls", mx)
                reply = await conn.command(client.send_ehlo())
                if reply.code == 0 and tls == "opportunistic":
                    # The session broke right after the handshake (dropped,
                    # garbage inside TLS): a broken TLS setup, as a failed
                    # handshake is; once more in clear (it was deferred at
                    # every attempt until the mail expired).
                    conn.close()
                    return _TLSFailed()
                if not reply.ok:
                    await conn.quit()
                    return reply.outcome("ehlo", mx)
    if opts.auth is not None:
        if "AUTH" not in client.capabilities:
            # Not offered (this session, after STARTTLS if any): the credentials
            # are not sent. Sent anyway, a server without AUTH (Sendmail built
            # without SASL) repeated "AUTH PLAIN <base64 user and password>"
            # in its 500, and that reply went into the deferral's text.
            await conn.quit()
            text = "the relay offers no AUTH in this session: credentials not sent"
            return Outcome(DEFERRED, 0, "", text, "auth", mx)
        mech = client.auth_mechanism(opts.auth_mechanism, opts.auth_in_clear)
        if not mech:
            await conn.quit()
            offered = client.capabilities.get("AUTH", "").upper() or "none"
            text = (
                f"no TLS ({no_tls}): not sending the AUTH password in clear text"
                f" (AUTH offered: {offered}; CRAM-MD5 would do, or allow it: auth_in_clear)"
            )
            return Outcome(DEFERRED, 0, "", text, "auth", mx)
        reply = await conn.command(client.send_auth(*opts.auth, mech, opts.auth_in_clear))
        if not reply.ok:
            await conn.quit()
            return _without_credentials(reply.outcome("auth", mx), opts.auth)
    return conn


def _without_credentials(out: Outcome, auth: tuple[str, str]) -> Outcome:
    """``out`` (a refused AUTH) with every form of the password that AUTH
    sends (as is, base64 alone for LOGIN, base64 with the user for PLAIN)
    blanked out of its text: a server may repeat what it was sent in its
    refusal, and the text goes to the event log and webhooks."""
    import base64

    user, password = auth
    if not password:
        return out
    text = out.text
    for form in (
        base64.b64encode(b"\0%s\0%s" % (user.encode(), password.encode())).decode(),
        base64.b64encode(password.encode()).decode(),
        password,
    ):
        text = text.replace(form, "[credentials]")
    if text == out.text:
        return out
    return msgspec.structs.replace(out, text=text)


async def _start_tls(
    loop: asyncio.AbstractEventLoop,
    conn: SMTPConnection,
    link: Link,
    client: SMTPClient,
    opts: ConnectOptions,
) -> str:
    """Upgrade the link to TLS; returns "" on success or why it failed."""
    ctx = opts.ssl_context or _default_context(opts.tls)
    try:
        new = await loop.start_tls(
            link.transport,  # type: ignore[arg-type]
            link,
            ctx,
            server_hostname=opts.server_hostname or opts.host,
            ssl_handshake_timeout=opts.timeouts.starttls,
        )
    except Exception as exc:  # ssl.SSLError, OSError, TimeoutError, loop-specific errors
        return f"TLS handshake failed: {exc or type(exc).__name__}"
    if new is None:
        return "TLS handshake failed: transport closed"
    link.transport = new  # type: ignore[assignment]
    if opts.peer_check is not None:
        why = opts.peer_check(peer_chain(new.get_extra_info("ssl_object")))
        if why:
            return f"TLS peer check failed: {why}"
    client.tls_established()
    return ""


def peer_chain(obj: object) -> list[bytes]:
    """The certificates the server sent (DER, its own first), not verified:
    the public ``get_unverified_chain`` from Python 3.13, the ``_ssl`` object's
    before; at worst the server's own certificate alone."""
    get = getattr(obj, "get_unverified_chain", None) or getattr(
        getattr(obj, "_sslobj", None), "get_unverified_chain", None
    )
    if get is not None:
        try:
            return [
                c if isinstance(c, bytes) else c.public_bytes(2)  # _ssl.ENCODING_DER
                for c in (get() or [])
            ]
        except Exception:  # an interpreter without it: the leaf below
            pass
    der = obj.getpeercert(binary_form=True) if isinstance(obj, ssl.SSLObject) else None
    return [der] if der else []
