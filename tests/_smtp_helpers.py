"""Test servers for the SMTP client's socket tests.

- :class:`FaultServer`: a tiny scripted SMTP server on the test's own event loop
  that can drop the connection after N messages or stop answering a command
  (for disconnect and timeout tests). It is deliberately minimal, not a sink.
- :func:`aiosmtpd_server`: aiosmtpd (a real third-party server, in its own
  thread) with a handler that refuses recipients whose local part starts with
  "reject" and records the peer address and every message.
- :func:`client_class`: ``SMTPClient`` over either twin of its core, for the
  ``impl`` fixture ("py": the reference, "c": the compiled ``ClientCore``);
  :func:`link_class`: the transport's ``Link`` protocol, either twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

from fastsend import _accel
from fastsend.smtp import client as cl


def client_class(impl: str) -> Any:
    """``SMTPClient`` over the reference core ("py") or the compiled one ("c")."""
    if impl == "py":
        return cl.PySMTPClient
    return type("SMTPClient", (cl._Commands, _accel.compiled("ClientCore")), {})


def link_class(impl: str) -> Any:
    """The transport's ``Link`` (asyncio protocol): the reference ("py") or the
    compiled twin ("c")."""
    from fastsend.smtp import transport as tr

    return tr.PyLink if impl == "py" else _accel.compiled("Link")


@dataclass
class FaultServer:
    close_after: int = -1  # drop the connection at the MAIL after this many messages
    stall_at: str = ""  # stop answering this command ("EHLO", "MAIL", ".", ...)
    slow_mail: float = 0.0  # seconds before answering a MAIL after the first message
    messages: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _sessions: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> FaultServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._sessions:
            task.cancel()

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._serve(r, w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            w.close()
            self._sessions.discard(task)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 fault ESMTP\r\n")
        while True:
            line = await r.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
            if verb == self.stall_at:
                await asyncio.sleep(3600)
            if verb == "EHLO":
                w.write(b"250-fault\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == "MAIL":
                if len(self.messages) == self.close_after:
                    return  # close (FIN) with the rest of the batch unanswered
                if self.slow_mail and self.messages:
                    await asyncio.sleep(self.slow_mail)
                w.write(b"250 2.1.0 Ok\r\n")
            elif verb in ("RCPT", "RSET", "NOOP"):
                w.write(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                w.write(b"354 go\r\n")
                body = b""
                while True:
                    chunk = await r.readline()
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    body += chunk
                if self.stall_at == ".":
                    await asyncio.sleep(3600)
                self.messages.append(body)
                w.write(b"250 2.0.0 Ok: queued as Q%d\r\n" % len(self.messages))
            elif verb == "QUIT":
                w.write(b"221 2.0.0 Bye\r\n")
                await w.drain()
                return
            else:
                w.write(b"502 5.5.2 unknown\r\n")
            await w.drain()


class RecordingHandler:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.split("@")[0].startswith("reject"):
            return "550 5.1.1 no such user"
        if address.split("@")[0].startswith("later"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            {
                "peer": session.peer,
                "mail_from": envelope.mail_from,
                "rcpts": list(envelope.rcpt_tos),
                "data": envelope.original_content,
                "tls": session.ssl is not None,
                "helo": session.host_name,
            }
        )
        return f"250 2.0.0 Ok: queued as AIO{len(self.messages)}"


@contextlib.contextmanager
def aiosmtpd_running(
    handler: Any, port: int, host: str = "127.0.0.1", **kwargs: Any
) -> Iterator[Controller]:
    """An aiosmtpd server with ``handler`` on (``host``, ``port``) for the block's
    length (``kwargs``: the Controller's, e.g. ``tls_context``, ``enable_SMTPUTF8``)."""
    ctl = Controller(handler, hostname=host, port=port, **kwargs)
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.stop()


@contextlib.contextmanager
def aiosmtpd_server(
    port: int, tls_context: ssl.SSLContext | None = None, host: str = "127.0.0.1", **kwargs: Any
) -> Iterator[tuple[Controller, RecordingHandler]]:
    handler = RecordingHandler()
    if tls_context is not None:
        kwargs["tls_context"] = tls_context
    with aiosmtpd_running(handler, port, host, **kwargs) as ctl:
        yield ctl, handler
