"""Connection caps and timeouts of ``fastsend serve``'s HTTP listeners (API, public, admin).

NAME
    fastsend.serve.httpguard -- ConnectionCap, body_deadline.

DESCRIPTION
    aiohttp keeps a connection for as long as its peer likes: one that sends a
    request's headers a byte at a time (slowloris), or never sends one, holds a
    socket and a file descriptor for an hour, and nothing bounds how many such
    sockets a peer opens. ``fastsend serve`` puts three limits on each HTTP
    listener, from ``[api]``:

    - ``header_timeout``: a connection must have sent a whole request's headers
      this long after it opened, or after the answer to its last request (an
      idle keep-alive connection is closed after it too): aiohttp's
      ``keepalive_timeout``, which closes a connection still waiting for its
      request's headers at that time;
    - ``body_timeout``: a request's body must have arrived this long after the
      handler began reading it, else 408 (:func:`body_deadline`; the handlers
      that read bodies apply it);
    - ``max_connections`` and ``max_connections_per_ip`` (:class:`ConnectionCap`):
      beyond them a new connection gets ``503`` with a JSON error and is closed
      before anything of it is read. Behind a trusted PROXY-protocol balancer the
      client's address counts (the gate runs first).

    A request aiohttp cannot parse (a header over 8 KB, a bad Content-Length)
    is answered with a JSON error, as every other one (:class:`_JsonErrors`).

DELIBERATELY NOT HERE
    No rate limiting of requests (``serve.api``: per key), no TLS (a proxy's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

__all__ = ["BodyBudget", "ConnectionCap", "body_deadline", "parse_reason"]

log = logging.getLogger("fastsend.serve")

LINGER = 2.0  # s (aiohttp's default: 10)

_BODY = orjson.dumps(
    {"error": {"status": 503, "message": "too many connections; try again later"}}
)
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(_BODY)
) + _BODY


class ConnectionCap:
    """One HTTP listener's limits (``[api]``): connections open at once, from one
    address, and the time a connection has to send a request's headers."""

    def __init__(self, settings: Any) -> None:
        self.open = 0
        self.per_ip: dict[str, int] = {}
        self.refused = 0
        self.configure(settings)

    def configure(self, settings: Any) -> None:
        """From ``[api]`` (at start and on SIGHUP: new connections get the new limits)."""
        self.max_connections: int = settings.max_connections
        self.max_per_ip: int = settings.max_connections_per_ip
        self.header_timeout: float = settings.header_timeout

    def wrap(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        """The protocol factory of ``server`` (an AppRunner's) behind this cap."""

        def handler() -> asyncio.BaseProtocol:
            # lingering_time: after an answer to a request whose body was not all read
            # (408, 413), its rest is read and dropped this long, then it is closed.
            kw = {**server._kwargs, "keepalive_timeout": self.header_timeout,
                  "lingering_time": LINGER}  # fmt: skip
            return _JsonErrors(server, loop=server._loop, **kw)

        return lambda: _Capped(self, handler)

    def admit(self, ip: str) -> bool:
        if self.open >= self.max_connections or self.per_ip.get(ip, 0) >= self.max_per_ip:
            self.refused += 1
            return False
        self.open += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        self.open -= 1
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)


class _Capped(asyncio.Protocol):
    """The listener's protocol behind the cap: made only for an admitted connection."""

    __slots__ = ("cap", "factory", "inner", "ip")

    def __init__(self, cap: ConnectionCap, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.cap = cap
        self.factory = factory
        self.inner: Any = None
        self.ip = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self.cap.admit(ip):
            assert isinstance(transport, asyncio.Transport)
            transport.write(BUSY)
            transport.close()
            return
        self.ip = ip
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()  # type: ignore[no-any-return]
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            self.cap.release(self.ip)
            inner.connection_lost(exc)


def parse_reason(message: str) -> str:
    """What aiohttp's parser says of a request it cannot parse, without the bytes it
    quotes (the request's lines: an ``Authorization`` header's API key, a cookie)."""
    said: list[str] = []
    for line in message.splitlines():
        line = line.strip()
        cut = min((i for i in (line.find("b'"), line.find('b"')) if i >= 0), default=-1)
        if cut >= 0:
            said.append(line[:cut])
            break
        if line and line != "^":
            said.append(line)
    return " ".join(p.strip().rstrip(":").strip() for p in said if p.strip().rstrip(":")) or (
        "malformed request"
    )


class _JsonErrors(RequestHandler):
    """aiohttp's connection handler, answering a request it cannot parse with a JSON
    error (as every route does) instead of a text/plain page. aiohttp's own answer
    and its log (a traceback) quote the bytes it could not parse: a malformed
    request's API key went into serve's log and back in the answer (to whoever
    shares a balancer's connection); here one line names the reason and the peer."""

    __slots__ = ()

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:  # fmt: skip
        if isinstance(exc, HttpProcessingError) and status < 500:  # the peer's bytes
            message = parse_reason(message or "")
            # (TLS or other protocols at an HTTP port, as aiohttp: not worth a warning)
            quiet = isinstance(exc, BadHttpMethod) and self._request_count == 1
            (log.debug if quiet else log.warning)(
                "API: %d %s from %s", status, message, request.remote
            )
            if request.writer.output_size > 0:  # (as aiohttp: nothing more to answer)
                raise ConnectionError("an answer was sent already")
        else:
            super().handle_error(request, status, exc, message)  # logs; raises if answered
        text = HTTPStatus(status).phrase if status >= 500 or not message else message
        resp = web.Response(
            status=status, content_type="application/json",
            body=orjson.dumps({"error": {"status": status, "message": text[:500]}}),
        )  # fmt: skip
        resp.force_close()
        return resp


async def body_deadline(read: Any, seconds: float) -> Any:
    """``await read`` (a request body's read) within ``seconds``, else a 408 (JSON)."""
    try:
        async with asyncio.timeout(seconds):
            return await read
    except TimeoutError:
        raise _Late(seconds) from None


class _Late(web.HTTPRequestTimeout):
    def __init__(self, seconds: float) -> None:
        body = orjson.dumps({"error": {"status": 408, "message":
                             f"the request body did not arrive within {seconds:g} s"}})  # fmt: skip
        super().__init__(body=body, content_type="application/json", headers={"Connection": "close"})


class BodyBudget:
    """Request bodies held in memory at once (``[api] max_held_bytes``): the API
    reads a JSON body whole and decodes it, so 256 connections from one address
    sending 16 MiB each held 4 GiB and more (their decoded objects several times
    that), one tenant's requests enough to exhaust the node. A body is counted
    from before it is read (its Content-Length, else ``max_body``) until its
    request is answered; a body of at most ``SMALL`` octets is not counted (the
    API's usual requests: never refused here, and the connection caps bound them).
    A tenant holds at most half of ``total``, at least one ``max_body``."""

    SMALL = 64 << 10

    def __init__(self, total: int, max_body: int) -> None:
        self.held = 0
        self.by_tenant: dict[str, int] = {}
        self.resize(total, max_body)

    def resize(self, total: int, max_body: int) -> None:
        self.total, self.max_body = total, max_body
        self.share = min(total, max(max_body, total // 2))

    def take(self, tenant: str, n: int) -> str | None:
        """Count ``n`` octets of ``tenant``'s; else why not: "node" or "tenant"."""
        if n <= self.SMALL:
            return None
        mine = self.by_tenant.get(tenant, 0)
        if mine + n > self.share:
            return "tenant"
        if self.held + n > self.total:
            return "node"
        self.held += n
        self.by_tenant[tenant] = mine + n
        return None

    def give(self, tenant: str, n: int) -> None:
        if n <= self.SMALL:
            return
        self.held -= n
        left = self.by_tenant.get(tenant, 0) - n
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)
