"""The sink's asyncio server: accepts mail fast, injects faults, counts, logs, saves.

NAME
    fastsend.sink.server -- Sink, SinkConfig, SinkStats, ReceivedMessage.

DESCRIPTION
    One :class:`Sink` listens on one or more addresses with an
    ``asyncio.Protocol`` per connection (no streams: this is the receiving end
    of load tests and must stay cheap per message). Each connection drives a
    sans-I/O :class:`fastsend.smtp.server.ServerProtocol` and writes its
    replies once per received chunk, so pipelined groups get one write.

    Faults are chosen by the recipient's local part (case-insensitive), so one
    run mixes them:

    ====================== ==================================================
    ``tempfail-*``         451 4.3.0 at RCPT
    ``deferN-*``           451 to the first N (a digit) attempts at that
                           address, counted across connections; then accepted
    ``permfail-*``         550 5.1.1 at RCPT (user unknown)
    ``policy-*``           550 5.7.1 at RCPT (refused by policy)
    ``mailboxfull-*``      552 5.2.2 at RCPT (mailbox full)
    ``421-*``              421 at RCPT and the connection is closed
    ``disconnect-in-data*`` RCPT accepted; the connection drops after 354
                           (or at the first BDAT chunk), so no final reply
    ``slow-*``             the RCPT reply and the end-of-data reply come
                           after ``slow_ms``
    ====================== ==================================================

    plus random faults per recipient (``defer_rate``, ``reject_rate``), a
    fixed ``latency_ms`` before every write of replies (replies to one
    pipelined group share it, as network latency would), and
    ``max_connections`` (above it: 421 at connect). Any fault's reply can be
    replaced (``fault_text``); a replacement with code 421 also closes the
    connection, e.g. ``{"tempfail": "421 4.7.0 [TS04] Messages deferred"}``.

    Counters (:class:`SinkStats`) are plain ints updated on the loop thread.

DELIBERATELY NOT HERE
    No relaying, no queue, no DNS, no authentication policy beyond an optional
    fixed user table. deferN counts live in one process: with ``--workers``
    each worker counts on its own.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Final

import orjson

from fastsend._accel import pick
from fastsend.sink import fast
from fastsend.smtp.server import _CLOSED as _CLOSED
from fastsend.smtp.server import (
    AuthRequest,
    DataStart,
    Hello,
    MailFrom,
    Message,
    RcptTo,
    ServerConfig,
    ServerProtocol,
    StartTLS,
    _NeedData,
)
from fastsend.smtp.server_conn import ServerConnection

__all__ = [
    "FAULT_KINDS",
    "ReceivedMessage",
    "Sink",
    "SinkConfig",
    "SinkStats",
    "parse_fault_text",
]

# kind -> (code, enhanced, text): the default replies of the injected faults.
DEFAULT_FAULT_REPLIES: Final[dict[str, tuple[int, str, str]]] = {
    "tempfail": (451, "4.3.0", "Temporary failure (fault injected: tempfail)"),
    "defer": (451, "4.3.0", "Try again later (fault injected: defer)"),
    "permfail": (550, "5.1.1", "User unknown (fault injected: permfail)"),
    "policy": (550, "5.7.1", "Message refused by policy (fault injected: policy)"),
    "mailboxfull": (552, "5.2.2", "Mailbox full (fault injected: mailboxfull)"),
    "421": (421, "4.3.2", "Service not available, closing channel (fault injected)"),
    "random-defer": (451, "4.3.0", "Try again later (random fault)"),
    "random-reject": (550, "5.7.1", "Rejected (random fault)"),
    "max-connections": (421, "4.7.0", "Too many connections, try later"),
}
FAULT_KINDS: Final = (*DEFAULT_FAULT_REPLIES, "disconnect", "slow")

SinkScanner = pick(fast.SinkScanner)
# Prefixes whose fault needs the full path (a close, a dropped body, a delayed reply).
_FULL_PATH_FAULTS: Final = ("421-", "disconnect-in-data", "slow-")
# Local-part prefix -> fault kind, in the order they are tried.
_PREFIX_FAULTS: Final = (
    ("tempfail-", "tempfail"),
    ("permfail-", "permfail"),
    ("policy-", "policy"),
    ("mailboxfull-", "mailboxfull"),
    ("421-", "421"),
    ("disconnect-in-data", "disconnect"),
    ("slow-", "slow"),
)
_DEFER: Final = re.compile(r"defer(\d)-")
_FAULT_FIRST: Final = frozenset("tdp4sm")  # first letters of fault prefixes: a fast skip
_MESSAGE_ID: Final = re.compile(rb"(?im)^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)")
_REPLY: Final = re.compile(r"([2-5]\d\d)(?:\s+([2-5]\.\d{1,3}\.\d{1,3}))?(?:\s+(.*))?$", re.S)


def parse_fault_text(spec: str) -> tuple[str, tuple[int, str, str]]:
    """Parse ``KIND=CODE [X.Y.Z] text`` (the ``--fault-text`` option); ValueError if bad."""
    kind, eq, reply = spec.partition("=")
    kind = kind.strip()
    if not eq or kind not in DEFAULT_FAULT_REPLIES:
        raise ValueError(
            f"bad fault text {spec!r}: expected KIND=CODE [X.Y.Z] TEXT with KIND one of "
            + ", ".join(DEFAULT_FAULT_REPLIES)
        )
    m = _REPLY.match(reply.strip().strip("\"'"))
    if m is None or m.group(1)[0] not in "45":
        raise ValueError(
            f"bad fault reply {reply!r}: expected a 4xx or 5xx code, e.g. 451 4.7.0 text"
        )
    code, enhanced, text = int(m.group(1)), m.group(2) or "", (m.group(3) or "").strip()
    if enhanced and enhanced[0] != str(code)[0]:
        raise ValueError(f"bad fault reply {reply!r}: enhanced code class differs from the code")
    if "\r" in text or "\n" in text:
        raise ValueError("fault reply text must be one line")
    return kind, (code, enhanced, text or "Fault injected")


@dataclass(slots=True)
class SinkConfig:
    """Everything a Sink does; the CLI fills it from its options."""

    listen: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 0)])
    hostname: str = "fastsend-sink.localhost"
    max_size: int = 50 * 1024 * 1024  # SIZE, bytes
    max_recipients: int = 1000
    max_connections: int = 0  # 0: unlimited
    tls_cert: str | None = None
    tls_key: str | None = None
    ssl_context: ssl.SSLContext | None = None  # overrides tls_cert/tls_key
    auth_users: dict[str, str] | None = None  # user -> password; offers AUTH PLAIN LOGIN
    defer_rate: float = 0.0
    reject_rate: float = 0.0
    latency_ms: float = 0.0
    slow_ms: float = 2000.0
    fault_text: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    log_path: str | None = None
    save_dir: str | None = None
    count: int = 0  # stop after this many accepted messages (0: never)
    keep_messages: bool = False  # keep ReceivedMessage objects in Sink.messages
    reuse_port: bool = False
    seed: int | None = None
    fast_path: bool = True  # the lean scanner for plain sessions (fastsend.sink.fast)

    def __post_init__(self) -> None:
        for name in ("defer_rate", "reject_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within 0..1, not {v}")
        for name in ("latency_ms", "slow_ms", "max_size", "max_connections", "count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_recipients < 1:
            raise ValueError("max_recipients must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        for kind in self.fault_text:
            if kind not in DEFAULT_FAULT_REPLIES:
                raise ValueError(f"unknown fault kind {kind!r}")


@dataclass(slots=True)
class ReceivedMessage:
    """One accepted message (kept when ``keep_messages``)."""

    time: float
    peer: str
    helo: str
    mail_from: str
    recipients: list[str]
    data: bytes
    message_id: str
    queue_id: str
    tls: bool
    auth_user: str | None


@dataclass(slots=True)
class SinkStats:
    """Counters since start. ``faults`` maps a fault kind to how often it fired."""

    started: float = field(default_factory=time.monotonic)
    connections: int = 0
    active: int = 0
    messages: int = 0
    recipients: int = 0
    bytes: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    peers: dict[str, int] = field(default_factory=dict)  # accepted messages per client IP

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "connections": self.connections,
            "active": self.active,
            "messages": self.messages,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "seconds": round(elapsed, 3),
            "rate": round(self.messages / elapsed, 1),
            "faults": dict(sorted(self.faults.items())),
            "peers": dict(sorted(self.peers.items())),
        }


def message_id_of(data: bytes) -> str:
    """The Message-ID header's value ("" if none), unfolded, from the header section."""
    end = data.find(b"\r\n\r\n")
    m = _MESSAGE_ID.search(data if end < 0 else data[: end + 2])
    if m is None:
        return ""
    return m.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace")


class Sink:
    """A fault-injecting SMTP server on the running loop.

    ``await sink.start()`` binds (ports then in :attr:`addresses`),
    ``await sink.wait_done()`` returns once ``count`` messages were accepted or
    :meth:`stop` was called, ``await sink.aclose()`` stops and closes files.
    """

    def __init__(self, config: SinkConfig | None = None) -> None:
        self.config = config if config is not None else SinkConfig()
        c = self.config
        self.stats = SinkStats()
        self.messages: list[ReceivedMessage] = []
        self.addresses: list[tuple[str, int]] = []
        self.on_message: Callable[[ReceivedMessage], None] | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[_SinkConnection] = set()
        self._done: asyncio.Event | None = None
        self._stopping = False  # stop() was called (before start() too: a signal then)
        self._defer_counts: dict[str, int] = {}
        self._rng = random.Random(c.seed)
        self._replies = {**DEFAULT_FAULT_REPLIES, **c.fault_text}
        self._ssl: ssl.SSLContext | None = c.ssl_context
        if self._ssl is None and c.tls_cert and c.tls_key:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(c.tls_cert, c.tls_key)
        self.server_config = ServerConfig(
            hostname=c.hostname,
            max_message_size=c.max_size,
            max_recipients=c.max_recipients,
            starttls=self._ssl is not None,
            auth_mechanisms=("PLAIN", "LOGIN") if c.auth_users else (),
            auth_requires_tls=False,
        )
        self._log: IO[bytes] | None = None
        self._qid_prefix = f"{int(time.time()) & 0xFFFFFF:06X}{os.getpid() & 0xFFFF:04X}"
        self._qid_bytes = self._qid_prefix.encode()
        self._seq = 0
        self._random_faults = c.defer_rate > 0 or c.reject_rate > 0
        # The fast path (fastsend.sink.fast): plain sessions are answered by a
        # line scanner; it hands anything else to the full ServerProtocol. It
        # only counts, so it is off when messages are logged, saved or kept, when
        # replies are delayed, and when a fault answered per recipient closes.
        proto = ServerProtocol(self.server_config)
        self._fault_bytes = {k: proto._format(*r) for k, r in self._replies.items()}
        self._ehlo_reply = proto._hello_reply(Hello("x", True), None)
        self._helo_reply = proto._hello_reply(Hello("x", False), None)
        self._fast = (
            c.fast_path
            and not (c.log_path or c.save_dir or c.keep_messages or c.latency_ms)
            and all(
                self._replies[k][0] != 421
                for k in ("tempfail", "defer", "permfail", "random-defer", "random-reject")
            )
        )

    @property
    def port(self) -> int:
        """The port of the first listening address."""
        return self.addresses[0][1]

    async def start(self) -> None:
        """Open the log and save directory, then bind every listen address."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        c = self.config
        if c.save_dir:
            os.makedirs(c.save_dir, exist_ok=True)
        if c.log_path:
            # Sharing the port (--workers) means sharing the log: one write per
            # line, so O_APPEND keeps each line whole.
            self._log = open(c.log_path, "ab", buffering=0 if c.reuse_port else -1)  # noqa: SIM115
        self.stats.started = time.monotonic()
        try:
            for host, port in c.listen:
                server = await loop.create_server(
                    lambda: _SinkConnection(self),
                    host,
                    port,
                    reuse_address=True,
                    reuse_port=c.reuse_port or None,
                    backlog=1024,
                )
                self._servers.append(server)
                for sock in server.sockets:
                    name = sock.getsockname()
                    self.addresses.append((str(name[0]), int(name[1])))
        except BaseException:
            await self.aclose()
            raise
        if self._stopping:  # (a signal came while it started: stopped at once)
            self.stop()

    def stop(self) -> None:
        """Stop accepting and close every connection (callable from the loop only;
        before :meth:`start` too: it then stops as soon as it has started)."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._done is not None:
            self._done.set()

    async def wait_done(self) -> None:
        """Wait until :meth:`stop` or the ``count`` limit."""
        assert self._done is not None, "start() first"
        await self._done.wait()

    async def aclose(self) -> None:
        self.stop()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self.flush()
        if self._log is not None:
            self._log.close()
            self._log = None

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()

    # ------------------------------------------------------------ per-connection hooks

    def rcpt_fault(self, address: str) -> str | None:
        """The fault kind for a recipient (None: accept). Counts deferN attempts."""
        local = address.rpartition("@")[0] or address
        if local[:1].lower() in _FAULT_FIRST:
            low = local.lower()
            for prefix, kind in _PREFIX_FAULTS:
                if low.startswith(prefix):
                    return kind
            m = _DEFER.match(low)
            if m is not None:
                key = address.lower()
                seen = self._defer_counts.get(key, 0)
                if seen < int(m.group(1)):
                    self._defer_counts[key] = seen + 1
                    return "defer"
        if self._random_faults:
            r = self._rng.random()
            if r < self.config.defer_rate:
                return "random-defer"
            if r < self.config.defer_rate + self.config.reject_rate:
                return "random-reject"
        return None

    def scanner(self, peer: str) -> Any:
        """A fast-path scanner for a new connection from ``peer``, or None (the full path)."""
        if not self._fast or self.on_message is not None:
            return None
        return SinkScanner(
            self._ehlo_reply,
            self._helo_reply,
            self.config.max_size,
            self.config.max_recipients,
            self.server_config.max_line_length,
            functools.partial(self._fast_message, peer),
            self._fast_rcpt,
            self._random_faults,
        )

    def _fast_rcpt(self, address: str) -> bytes | bool | None:
        """The fast path's recipient hook: None (accept), a fault's reply, or False
        (a fault the full path must answer: hand the session over)."""
        low = (address.rpartition("@")[0] or address).lower()
        if low.startswith(_FULL_PATH_FAULTS):
            return False
        kind = self.rcpt_fault(address)
        if kind is None:
            return None
        self.stats.fault(kind)
        return self._fault_bytes[kind]

    def _fast_message(self, peer: str, recipients: list[str], size: int) -> bytes:
        """The fast path's accepted message: count it; the 250 reply with its queue id."""
        st = self.stats
        st.messages += 1
        st.peers[peer] = st.peers.get(peer, 0) + 1
        st.recipients += len(recipients)
        st.bytes += size
        self._seq += 1
        c = self.config
        if c.count and st.messages >= c.count and self._done is not None:
            self._done.set()
        return b"250 2.0.0 Ok: queued as %s%08X\r\n" % (self._qid_bytes, self._seq)

    def fault_reply(self, kind: str) -> tuple[int, str, str]:
        return self._replies[kind]

    def accepted(self, conn: _SinkConnection, ev: Message) -> str:
        """Count, log, save and keep one accepted message; returns its queue id."""
        st = self.stats
        st.messages += 1
        st.peers[conn.peer] = st.peers.get(conn.peer, 0) + 1
        st.recipients += len(ev.recipients)
        st.bytes += len(ev.data)
        self._seq += 1
        qid = f"{self._qid_prefix}{self._seq:08X}"
        c = self.config
        if c.save_dir:
            with open(os.path.join(c.save_dir, f"{qid}.eml"), "wb") as f:
                f.write(ev.data)
        if self._log is not None or c.keep_messages or self.on_message is not None:
            now = time.time()
            mid = message_id_of(ev.data)
            if self._log is not None:
                self._log.write(
                    orjson.dumps(
                        {
                            "time": now,
                            "peer": conn.peer,
                            "mail_from": ev.mail_from,
                            "recipients": ev.recipients,
                            "size": len(ev.data),
                            "message_id": mid,
                            "queue_id": qid,
                            "tls": conn.proto.tls_active,
                        }
                    )
                    + b"\n"
                )
            if c.keep_messages or self.on_message is not None:
                rec = ReceivedMessage(
                    now,
                    conn.peer,
                    conn.proto.helo or "",
                    ev.mail_from,
                    list(ev.recipients),
                    ev.data,
                    mid,
                    qid,
                    conn.proto.tls_active,
                    conn.proto.authenticated,
                )
                if c.keep_messages:
                    self.messages.append(rec)
                if self.on_message is not None:
                    self.on_message(rec)
        if c.count and st.messages >= c.count and self._done is not None:
            self._done.set()
        return qid

    def check_auth(self, user: str, password: str) -> bool:
        users = self.config.auth_users or {}
        return user in users and users[user] == password


class _SinkConnection(ServerConnection):
    """One SMTP connection: feeds the protocol, answers its events, writes replies."""

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink.server_config, sink._ssl)
        self.sink = sink
        self.peer = ""
        self._drop_on_data = False  # disconnect-in-data armed for this transaction
        self._slow = False  # slow-* recipient in this transaction
        self._timers: list[asyncio.TimerHandle] = []
        self._latency = sink.config.latency_ms / 1000.0
        self.fast: Any = None  # the fast-path scanner while the session is plain

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sink = self.sink
        st = sink.stats
        st.connections += 1
        st.active += 1
        sink._conns.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        limit = sink.config.max_connections
        if limit and st.active > limit:
            st.fault("max-connections")
            self.proto.refuse(*sink.fault_reply("max-connections"))
        else:
            self.proto.start()
            self.fast = sink.scanner(self.peer)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.stats.active -= 1
        self.sink._conns.discard(self)
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        scanner = self.fast
        if scanner is not None:
            out = scanner.feed(data)
            if scanner.state:
                self._leave_fast(scanner, out)
            elif out:
                self.transport.write(out)  # type: ignore[union-attr]
            return
        if self._drop_on_data:
            self.abort()
            return
        super().data_received(data)

    def _leave_fast(self, scanner: Any, out: bytes) -> None:
        """QUIT on the fast path, or a command it hands over: the full
        ServerProtocol takes the session as it stands and the unread bytes."""
        self.fast = None
        transport = self.transport
        if transport is None:
            return
        if out:
            transport.write(out)
        if scanner.state == fast.CLOSED:
            self.proto.mode = _CLOSED
            transport.close()
            return
        proto = self.proto
        proto.helo = scanner.helo
        proto.esmtp = scanner.esmtp
        proto.mail_from = scanner.mail_from
        proto.recipients = scanner.recipients
        proto._rcpt_count = scanner.rcpt_count
        if scanner.rest:
            proto.receive_data(scanner.rest)
        if not self._waiting:
            self._process()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ event handling

    def _process(self) -> None:
        proto = self.proto
        sink = self.sink
        while True:
            ev = proto.next_event()
            if isinstance(ev, _NeedData):
                break
            t = type(ev)
            if t is RcptTo:
                if self._on_rcpt(ev):  # type: ignore[arg-type]
                    return
            elif t is MailFrom:
                self._drop_on_data = False
                self._slow = False
                proto.accept()
            elif t is Message:
                qid = sink.accepted(self, ev)  # type: ignore[arg-type]
                if self._slow:
                    self._flush()
                    proto.accept(f"Ok: queued as {qid}")
                    self._delay(sink.config.slow_ms / 1000.0)
                    return
                proto.accept(f"Ok: queued as {qid}")
            elif t is DataStart:
                if self._drop_on_data:
                    sink.stats.fault("disconnect")
                    if ev.bdat:  # type: ignore[union-attr]
                        self._flush()
                        self.abort()
                        return
                    proto.accept()
                    self._flush()
                    return  # the next bytes (the body) trigger the abort
                if ev.needs_reply:
                    proto.accept()
            elif t is Hello:
                proto.accept()
            elif t is StartTLS:
                self._begin_tls()
                return
            elif t is AuthRequest:
                assert isinstance(ev, AuthRequest)
                if sink.check_auth(ev.username, ev.password):
                    proto.accept()
                else:
                    proto.reply(535, "5.7.8", "Authentication credentials invalid")
        self._flush()

    def _on_rcpt(self, ev: RcptTo) -> bool:
        """Answer one RCPT; True when processing must pause (a delayed reply)."""
        sink = self.sink
        kind = sink.rcpt_fault(ev.address)
        if kind is None:
            self.proto.accept()
            return False
        sink.stats.fault(kind)
        if kind == "disconnect":
            self._drop_on_data = True
            self.proto.accept()
            return False
        if kind == "slow":
            self._slow = True
            self._flush()
            self.proto.accept()
            self._delay(sink.config.slow_ms / 1000.0)
            return True
        self.proto.reply(*sink.fault_reply(kind))
        return False

    def _delay(self, seconds: float) -> None:
        """Hold the reply just queued for ``seconds``; events wait behind it."""
        self._waiting = True
        self._timers.append(self.loop.call_later(seconds, self._resume))

    def _resume(self) -> None:
        self._waiting = False
        if self.transport is None:
            return
        self._flush()
        if not self.proto.closed:
            self._process()

    def _flush(self) -> None:
        data = self.proto.data_to_send()
        closing = self.proto.closed
        transport = self.transport
        if transport is None:
            return
        if self._latency and (data or closing):
            self._timers.append(self.loop.call_later(self._latency, self._write, data, closing))
            return
        if data:
            transport.write(data)
        if closing:
            transport.close()

    def _write(self, data: bytes, closing: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if closing:
            transport.close()
