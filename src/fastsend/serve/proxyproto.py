"""PROXY protocol (v1 and v2) in front of the HTTP API and SMTP listeners.

NAME
    fastsend.serve.proxyproto -- ProxySettings, ProxyGate, wrap_factory.

DESCRIPTION
    Behind a load balancer (deploy/haproxy.cfg: ``send-proxy-v2``) every
    connection comes from the balancer's address; the PROXY header it sends
    first names the real client. Config::

        [proxy]
        trusted = ["127.0.0.1", "10.0.0.0/24"]   # balancers' addresses
        timeout = 5                              # s to wait for the header

    A connection from a trusted address must begin with a PROXY header (v1
    text or v2 binary, parsed by the ``proxy-protocol`` library); the header is
    consumed and the connection's ``peername`` becomes the client's address
    (``PROXY UNKNOWN`` and v2 ``LOCAL``, the balancer's own health checks,
    keep the balancer's). A trusted connection without a valid header within
    ``timeout`` (or with more than :data:`MAX_HEADER` bytes of one) is closed:
    HAProxy always sends one, and SMTP, where the server speaks first, cannot
    guess. A connection from any other address is passed through untouched:
    a header from an untrusted peer is never believed (it is just bad input
    to HTTP or SMTP), so a client cannot claim another address.

    :class:`ProxyGate` is the asyncio protocol that reads the header; it then
    hands the socket to the real protocol (``transport.set_protocol``) with a
    transport view whose ``get_extra_info("peername")`` answers the client's
    address, so aiohttp's ``request.remote`` and the SMTP listeners see it;
    after that the gate is out of the data path.

DELIBERATELY NOT HERE
    No TLV use (SSL info, unique ids): only addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxyprotocol.detect import ProxyProtocolDetect

from fastsend.config.serve import ProxySettings as ProxySection

log = logging.getLogger("fastsend.serve.proxy")

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the v1 line's maximum length, CRLF included (the spec)
MAX_HEADER = 16 + 1024  # v2: 16 bytes + addresses and TLVs; larger is refused

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ProxySettings:
    trusted: list[Network] = field(default_factory=list)
    timeout: float = 5.0

    @classmethod
    def of(cls, section: ProxySection) -> ProxySettings:
        """From ``[proxy]`` (typed and checked when the config loaded)."""
        return cls(section.networks, section.timeout)

    def is_trusted(self, host: str) -> bool:
        if not self.trusted:
            return False
        try:
            a = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        return any(a in n for n in self.trusted)


class _ProxiedTransport:
    """The socket's transport, answering the client's address as its peername."""

    def __init__(self, transport: asyncio.Transport, peername: Any, sockname: Any) -> None:
        self._fs_transport = transport
        self._fs_peer = peername
        self._fs_sock = sockname

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._fs_peer
        if name == "proxy_sockname":  # the address the client connected to
            return self._fs_sock
        return self._fs_transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs_transport, name)


class ProxyGate(asyncio.Protocol):
    """Reads the PROXY header of a trusted peer, then hands the connection over."""

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol], settings: ProxySettings):
        self.factory = factory
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        if not self.settings.is_trusted(host):
            self._hand_over(transport, None, b"")
            return
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(
            self.settings.timeout, self._refuse, "no PROXY header in time"
        )

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.buf += data
        buf = self.buf
        end = 0
        if buf[:1] == b"P":
            if not b"PROXY "[: len(buf)].startswith(bytes(buf[:6])):
                return self._refuse("not a PROXY header")
            i = buf.find(b"\r\n", 0, V1_MAX)
            if i < 0:
                if len(buf) >= V1_MAX:
                    return self._refuse("PROXY v1 line too long")
                return None
            end = i + 2
        elif buf[:1] == b"\r":
            if not V2_SIG[: len(buf)].startswith(bytes(buf[:12])):
                return self._refuse("not a PROXY header")
            if len(buf) < 16:
                return None
            end = 16 + int.from_bytes(buf[14:16], "big")
            if end > MAX_HEADER:
                return self._refuse("PROXY v2 header too long")
            if len(buf) < end:
                return None
        else:
            return self._refuse("not a PROXY header")
        try:
            result = ProxyProtocolDetect().unpack(bytes(buf[:end]))
        except Exception as e:  # syntax, checksum, bad address: never trust it
            return self._refuse(f"bad PROXY header ({type(e).__name__})")
        transport, rest = self.transport, bytes(buf[end:])
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        proxied = None
        if result.proxied and result.peername is not None:
            proxied = (result.peername, result.sockname)
        self._hand_over(transport, proxied, rest)
        return None

    def _hand_over(self, transport: asyncio.Transport, proxied: Any, rest: bytes) -> None:
        proto = self.factory()
        view: Any = transport
        if proxied is not None:
            view = _ProxiedTransport(transport, proxied[0], proxied[1])
        transport.set_protocol(proto)
        proto.connection_made(view)
        if rest and not transport.is_closing():
            assert isinstance(proto, asyncio.Protocol)
            proto.data_received(rest)

    def _refuse(self, why: str) -> None:
        t = self.transport
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        if t is not None:
            log.warning("closing a connection from a trusted proxy %s: %s",
                        t.get_extra_info("peername"), why)  # fmt: skip
            t.abort()

    def eof_received(self) -> bool | None:
        self._refuse("EOF before the PROXY header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()


def wrap_factory(
    factory: Callable[[], asyncio.BaseProtocol], settings: ProxySettings | None
) -> Callable[[], asyncio.BaseProtocol]:
    """``factory`` behind a PROXY gate when any proxy is trusted, else itself."""
    if settings is None or not settings.trusted:
        return factory
    return lambda: ProxyGate(factory, settings)


def proxied_site(
    runner: Any, host: str, port: int, settings: ProxySettings | None, cap: Any = None,
    **kw: Any,
) -> Any:
    """An aiohttp TCPSite whose connections pass the PROXY gate (when configured), then
    ``cap`` (a :class:`fastsend.serve.httpguard.ConnectionCap`: caps and timeouts)."""
    from aiohttp import web

    class _Site(web.TCPSite):
        async def start(self) -> None:
            await web.BaseSite.start(self)
            server = self._runner.server
            assert server is not None
            self._server = await asyncio.get_running_loop().create_server(
                wrap_factory(cap.wrap(server) if cap is not None else server, settings),
                self._host,
                self._port,
                ssl=self._ssl_context,
                backlog=self._backlog,
                reuse_address=self._reuse_address,
                reuse_port=self._reuse_port,
            )

    return _Site(runner, host, port, **kw)
