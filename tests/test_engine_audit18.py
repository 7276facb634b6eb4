"""Session 18's outside audit of the engine, the SMTP client and crash safety:
each test is a defect found from outside (the symptom in its docstring),
against real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from fastsend.outcome import DEFERRED, Envelope, Outcome


# ---------------------------------------------------------------- HTTP providers
async def _take_then(kind: str, got: list[int]) -> tuple[asyncio.Server, int]:
    """An HTTP server that reads each request whole (the provider has the
    message), then answers ``kind``: "reset" (an RST where the answer was
    awaited, as a load balancer dropping the connection does) or "cut" (a 200
    whose body ends early)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":", 1)[1])
        await r.readexactly(n)
        got.append(n)
        if kind == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            return
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 200\r\n\r\n{\"id\": \"<1@mg>\", ")  # fmt: skip
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("kind", ["reset", "cut"])
def test_a_provider_connection_broken_after_the_request_is_an_unknown_outcome(kind: str) -> None:
    """A provider (or the load balancer in front of it) that read the whole
    request and then reset the connection, or answered 200 with a body cut
    short, may have the message. Before, both were "connection failed" at
    stage "connect" (aiohttp's ClientOSError and ClientPayloadError are
    ClientErrors): a route's next transport got the message at once, a
    certain duplicate. Now they are the unknown outcome of a request sent
    whole (stage "data", no code: deferred, never failed over); only a
    connection that could not be made is "connect"."""
    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.delivery.routes import should_fail_over, unknown_outcome
    from fastsend.transports.mailgun import MailgunTransport

    env = Envelope("a@sender.example.com", ["x@example.net"], b"Subject: s\r\n\r\nbody\r\n", 7)
    got: list[int] = []

    async def main() -> Any:
        server, port = await _take_then(kind, got)
        spec = TransportSpec(name="mg", kind="mailgun", endpoint=f"http://127.0.0.1:{port}",
                             region="us", domain="mg.sender.example.com", timeout=2.0,
                             answer_timeout=2.0, secrets={"api_key": "mg-key"})  # fmt: skip
        try:
            async with aiohttp.ClientSession() as session:
                return await MailgunTransport(spec, b"").send(session, [env])
        finally:
            server.close()

    out: Outcome = asyncio.run(main())[0].outcomes[0]
    assert got, "the request never reached the server"
    assert out.kind == DEFERRED and unknown_outcome(out), out
    assert not should_fail_over(out)
    assert "may have taken it" in out.text, out
