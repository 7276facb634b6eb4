"""asyncio glue for one server-side SMTP session (the sink and the listeners).

:class:`ServerConnection` feeds the sans-I/O :class:`~fastsend.smtp.server.ServerProtocol`
from an ``asyncio.Protocol``, writes its replies, and performs STARTTLS: after the
220 it stops reading plaintext, upgrades with ``loop.start_tls`` and replays the
bytes that arrived decrypted before ``start_tls`` returned. Subclasses decide how
to answer the protocol's events (``_process``) and may delay writes (``_flush``).

It holds no policy (faults, authentication, spooling) and no SMTP state: that is
``smtp/server.py``'s, and the subclass's.
"""

from __future__ import annotations

import asyncio
import ssl

from fastsend.smtp.server import ServerConfig, ServerProtocol


class ServerConnection(asyncio.Protocol):
    def __init__(self, config: ServerConfig, ssl_context: ssl.SSLContext | None) -> None:
        self.proto = ServerProtocol(config)
        self.ssl_context = ssl_context
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self._waiting = False  # events wait behind a pending reply (delay, AUTH, TLS)
        self._tls_early: list[bytes] | None = None  # set while the TLS handshake runs
        self._tls_task: asyncio.Future[None] | None = None
        self._write_paused = False
        # Seconds a TLS handshake (STARTTLS, implicit TLS) may take: asyncio's own
        # default is 60, whatever a listener's timeouts say.
        self.handshake_timeout = 60.0

    def data_received(self, data: bytes) -> None:
        if self._tls_early is not None:  # decrypted bytes before start_tls() returned
            self._tls_early.append(data)
            return
        self.proto.receive_data(data)
        if not self._waiting:
            self._process()

    # Back-pressure: a peer that does not read its replies stops being read
    # (pipelined commands cannot pile replies up in our write buffer).
    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and self._tls_early is None:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self.proto.receive_data(b"")
        return None

    def _process(self) -> None:
        """Answer the protocol's pending events (the subclass's policy)."""
        raise NotImplementedError

    def _begin_tls(self) -> None:
        """Answer a StartTLS event: 220, then no more plaintext, then the upgrade."""
        self.proto.accept()
        self._flush()
        self._waiting = True
        self._tls_early = []
        if self.transport is not None:
            # Nothing more in plaintext: start_tls resumes reading under TLS.
            self.transport.pause_reading()
        self._tls_task = asyncio.ensure_future(self._start_tls())

    def _tls_started(self) -> None:
        """Hook: the session was reset by TLS (forget what it established)."""

    async def _start_tls(self) -> None:
        transport, ctx = self.transport, self.ssl_context
        if transport is None or ctx is None:
            return
        try:
            new = await self.loop.start_tls(
                transport, self, ctx, server_side=True, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, ssl.SSLError, ConnectionError):
            transport.abort()
            return
        if new is None:
            transport.abort()
            return
        self.transport = new  # type: ignore[assignment]
        self.proto.tls_started()
        self._tls_started()
        early, self._tls_early = self._tls_early or [], None
        self._waiting = False
        for data in early:
            self.proto.receive_data(data)
        self._process()

    def _flush(self) -> None:
        data = self.proto.data_to_send()
        transport = self.transport
        if transport is None:
            return
        if data:
            transport.write(data)
        if self.proto.closed:
            transport.close()
