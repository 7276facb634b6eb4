"""PROXY protocol: listeners see the client's address behind a real HAProxy
(v2 to the HTTP API, v1 to SMTP submission), a header is believed only from a
trusted address, and a trusted peer that sends no valid header is cut off."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from aiohttp import web
from proxyprotocol.result import ProxyResultIPv4
from proxyprotocol.v2 import ProxyProtocolV2
from tests._haproxy_helpers import start_haproxy

from conftest import free_port
from fastsend.config import from_dict
from fastsend.serve.context import open_context
from fastsend.serve.listeners import hash_password, start_listeners
from fastsend.serve.proxyproto import ProxyGate, ProxySettings, proxied_site

MESSAGE = b"From: App <app@example.com>\r\nTo: ann@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


class _Echo(asyncio.Protocol):
    """Says the peer it sees, then echoes what it reads."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        transport.write(f"{transport.get_extra_info('peername')[0]}\n".encode())

    def data_received(self, data: bytes) -> None:
        self.t.write(data)


async def _talk(port: int, send: bytes, src: str = "127.0.0.1") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    w.write(send)
    await w.drain()
    out = b""
    try:
        while len(out) < 200:
            chunk = await asyncio.wait_for(r.read(200), 1.0)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        pass
    w.close()
    return out


def test_gate_trusts_only_configured_peers() -> None:
    settings = ProxySettings.of(from_dict({"proxy": {"trusted": ["127.0.0.1/32"], "timeout": 0.5}}).proxy)
    v2 = ProxyProtocolV2().pack(
        ProxyResultIPv4(
            (__import__("ipaddress").IPv4Address("203.0.113.9"), 40000),
            (__import__("ipaddress").IPv4Address("127.0.0.1"), 25),
        )
    )

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(
            lambda: ProxyGate(_Echo, settings), "127.0.0.1", 0
        )
        port = srv.sockets[0].getsockname()[1]
        # v1 and v2 from a trusted peer: the header is consumed, the client's address seen.
        v1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 25\r\nhello"
        assert await _talk(port, v1) == b"198.51.100.7\nhello"
        assert await _talk(port, v2 + b"x") == b"203.0.113.9\nx"
        # The header split over several reads still parses.
        assert await _talk(port, b"PROXY TCP4 198.51.100.8 ") == b""  # incomplete: cut
        assert await _talk(port, b"PROXY UNKNOWN\r\nping") == b"127.0.0.1\nping"
        # Trusted peer without a header, with garbage, or an endless v1 line: closed.
        assert await _talk(port, b"EHLO x\r\n") == b""
        assert await _talk(port, b"PROXY " + b"9" * 200) == b""
        assert await _talk(port, b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n") == b""
        assert await _talk(port, b"") == b""  # silent: closed after the timeout
        # An untrusted peer's header is not believed: its bytes reach the protocol.
        got = await _talk(port, v1, src="127.0.0.9")
        assert got == b"127.0.0.9\n" + v1
        srv.close()
        await srv.wait_closed()

    asyncio.run(main())
    with pytest.raises(ValueError, match="not an address"):
        from_dict({"proxy": {"trusted": ["nope"]}})
    with pytest.raises(ValueError, match="unknown"):
        from_dict({"proxy": {"trused": []}})


def test_haproxy_front_api_and_submission_see_client_ip(
    tmp_path: Path, certs: tuple[str, str, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, client_tls = certs
    api_port, smtp_port, lb_api, lb_smtp = free_port(), free_port(), free_port(), free_port()
    users = {"acme": hash_password("pw", iterations=1000)}
    raw = {
        "spool": {"dir": str(tmp_path / "spool")},
        "proxy": {"trusted": ["127.0.0.1"], "timeout": 2},
        "submission": {
            "listen": f"127.0.0.1:{smtp_port}",
            "tls_cert": cert,
            "tls_key": key,
            "users": users,
        },
    }
    ctx = open_context(from_dict(raw))
    lb = f"""
frontend api
    mode tcp
    bind 127.0.0.1:{lb_api}
    default_backend api
backend api
    mode tcp
    server n1 127.0.0.1:{api_port} send-proxy-v2
frontend smtp
    mode tcp
    bind 127.0.0.1:{lb_smtp}
    default_backend smtp
backend smtp
    mode tcp
    server n1 127.0.0.1:{smtp_port} send-proxy
"""

    async def remote(request: web.Request) -> web.Response:
        return web.Response(text=str(request.remote))

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/remote", remote)
        runner = web.AppRunner(app)
        await runner.setup()
        await proxied_site(runner, "127.0.0.1", api_port, ProxySettings.of(from_dict(raw).proxy)).start()
        servers = await start_listeners(ctx)
        try:
            with start_haproxy(lb, [lb_api, lb_smtp]):
                conn = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0), force_close=True)
                async with aiohttp.ClientSession(connector=conn) as http:
                    for _ in range(3):
                        async with http.get(f"http://127.0.0.1:{lb_api}/remote") as r:
                            assert await r.text() == "127.0.0.9"
                # SMTP through HAProxy: STARTTLS, a failed AUTH logged with the
                # client's address, then a message accepted.
                smtp = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=lb_smtp,
                    start_tls=False,
                    tls_context=client_tls,
                    source_address=("127.0.0.9", 0),
                )
                await smtp.connect()
                await smtp.starttls(tls_context=client_tls)
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await smtp.login("acme", "wrong")
                await smtp.login("acme", "pw")
                errors, _ = await smtp.sendmail("app@example.com", ["ann@example.org"], MESSAGE)
                assert errors == {}
                await smtp.quit()
            # Directly from an untrusted address: plain SMTP, its own address.
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=smtp_port, start_tls=False,
                source_address=("127.0.0.10", 0),
            )  # fmt: skip
            await smtp.connect()
            await smtp.ehlo()
            await smtp.quit()
            # Directly from the trusted address, no header: cut off (SMTP waits for
            # the header before its greeting, so there is none).
            assert await _talk(smtp_port, b"") == b""
        finally:
            for s in servers:
                s.close()
            await runner.cleanup()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    ctx.close()
    fails = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    # (aiosmtplib tries each AUTH mechanism the server offers)
    assert fails and set(fails) == {"submission: authentication failed from 127.0.0.9"}
    assert any("PROXY header" in r.getMessage() for r in caplog.records)
