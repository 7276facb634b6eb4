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


# ---------------------------------------------------------------- dead sites
@pytest.mark.parametrize("kind", ["refused", "closed", "auth"])
def test_an_unreachable_site_answers_its_mail_at_once_not_a_group_per_connect(
    run: Any, tmp_path: Any, kind: str
) -> None:
    """A site none of whose addresses takes a TCP connection (refused here; an
    MX that drops SYNs times out after [delivery] connect_timeout, 30 s) with
    no session open is unreachable: every envelope waiting for it is deferred
    with that failure at once, and mail pushed for it in the next minute is
    answered without a new connection. Before, each failed connection
    deferred one group (`pipeline`) and the next was tried: 1,000 envelopes
    for a site whose MX dropped SYNs waited 16 connect timeouts (8 minutes)
    in the worker's window, which filled with them and held back the mail of
    every other site (`fastsend send`, half of 8,000 recipients at such a
    site, connect_timeout 2 s: the other half's last delivery at 86 s, the
    run's end at 126 s; now 2.4 and 3.3 s). "closed": a host that takes the
    connection and closes it without a greeting is no session either;
    "auth": a relay refusing its AUTH (a wrong password) is tried once, not
    once per group (ten failed logins in a row here: providers lock accounts
    for less)."""
    from _smtp_helpers import aiosmtpd_server
    from conftest import free_port
    from fastsend.config import loader
    from fastsend.delivery import pool
    from fastsend.delivery.mx import Host, Site
    from fastsend.outcome import TxnResult

    cfg = loader.from_dict(
        {"delivery": {"pipeline": 4, "max_connections": 1}}, base_dir=str(tmp_path), files=False
    )
    port = free_port()  # refused, unless "closed" listens on it
    sessions: list[int] = []
    reports: list[list[TxnResult]] = []
    body = b"Subject: x\r\n\r\nhi\r\n"

    def envs(a: int, b: int) -> list[Envelope]:
        return [Envelope("s@example.org", [f"r{i}@x.example"], body, tag=i) for i in range(a, b)]

    async def go() -> tuple[int, int]:
        done = asyncio.Event()
        server: Any = None
        if kind == "auth":
            from aiosmtpd.smtp import AuthResult

            def refuse(*_args: Any) -> AuthResult:
                sessions.append(1)
                return AuthResult(success=False, handled=False)

            server = aiosmtpd_server(port, authenticator=refuse, auth_require_tls=False)
            server.__enter__()
        elif kind == "closed":

            async def close_at_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                sessions.append(1)
                w.close()

            server = await asyncio.start_server(close_at_once, "127.0.0.1", port)
        site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))

        def report(results: list[TxnResult], ip: str, mx: str) -> None:
            reports.append(results)
            if sum(len(r) for r in reports) >= 40:
                done.set()

        relay = {"auth": ("user", "wrong"), "auth_in_clear": True} if kind == "auth" else None
        q = pool.SiteQueue(site, ["127.0.0.1"], cfg, report, "localhost", connect_options=relay)
        q.push(envs(0, 40))
        await asyncio.wait_for(done.wait(), 20)
        first = len(reports)
        q.push(envs(40, 45))  # within the minute: answered at once, no connection
        opened = q.nconn
        await q.close()
        if kind == "auth":
            server.__exit__(None, None, None)
        elif server is not None:
            server.close()
        return first, opened

    first, opened = run(go())
    assert first == 1, [len(r) for r in reports]  # one answer for all 40, not 10 groups of 4
    outs = [o for r in reports[0] for o in r.outcomes]
    stage = {"refused": "connect", "closed": "greeting", "auth": "auth"}[kind]
    assert len(outs) == 40 and all(o.kind == DEFERRED and o.stage == stage for o in outs), outs[0]
    assert len(sessions) == (0 if kind == "refused" else 1)  # one session (login) tried, not 10
    assert len(reports) == 2 and opened == 0
    later = [o for r in reports[1] for o in r.outcomes]
    assert sorted(r.tag for r in reports[1]) == list(range(40, 45))
    assert all(o.kind == DEFERRED and "site unreachable" in o.text for o in later), later


# ---------------------------------------------------------------- settings
def test_max_messages_per_connection_0_means_no_limit(run: Any, tmp_path: Any) -> None:
    """``[delivery] max_messages_per_connection = 0`` (accepted by the config,
    as Postfix's smtp_connection_reuse_count_limit = 0: no limit) made every
    connection a local ValueError ("ConnectOptions.max_messages must be >= 1"):
    each message was deferred, classified "blocked", until it expired. Now a
    connection carries any number of messages."""
    from _smtp_helpers import aiosmtpd_server
    from conftest import free_port
    from fastsend.config import loader
    from fastsend.delivery import pool
    from fastsend.delivery.mx import Host, Site
    from fastsend.outcome import TxnResult

    cfg = loader.from_dict(
        {"delivery": {"max_messages_per_connection": 0, "max_connections": 1}},
        base_dir=str(tmp_path),
        files=False,
    )
    port = free_port()
    outs: list[Outcome] = []

    async def go() -> None:
        done = asyncio.Event()

        def report(results: list[TxnResult], ip: str, mx: str) -> None:
            outs.extend(o for r in results for o in r.outcomes)
            if len(outs) >= 30:
                done.set()

        site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
        q = pool.SiteQueue(site, ["127.0.0.1"], cfg, report, "localhost")
        q.push([Envelope("s@example.org", [f"r{i}@x.example"], b"Subject: x\r\n\r\nhi\r\n", tag=i)
                for i in range(30)])  # fmt: skip
        await asyncio.wait_for(done.wait(), 20)
        await q.close()

    with aiosmtpd_server(port) as (_ctl, handler):
        run(go())
    assert [o.kind for o in outs] == ["delivered"] * 30, outs[:2]
    assert len({m["peer"] for m in handler.messages}) == 1  # one connection


def test_a_site_refusing_one_source_ip_is_not_unreachable_from_the_others(
    run: Any, tmp_path: Any
) -> None:
    """A receiver that closes every connection from 127.0.0.2 at once (a
    source IP it blocks at the TCP level) and serves 127.0.0.3: the site is
    unusable from one address only, so it is not marked unreachable (its mail
    answered without a connection for a minute); the other address carries
    the mail."""
    from _smtp_helpers import aiosmtpd_server
    from conftest import free_port
    from fastsend.config import loader
    from fastsend.delivery import pool
    from fastsend.delivery.mx import Host, Site
    from fastsend.outcome import TxnResult

    cfg = loader.from_dict(
        {"delivery": {"pipeline": 4, "max_connections": 1}}, base_dir=str(tmp_path), files=False
    )
    smtp_port, port = free_port(), free_port()
    outs: list[Outcome] = []

    async def go() -> None:
        async def front(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if w.get_extra_info("peername")[0] == "127.0.0.2":
                w.close()
                return
            ur, uw = await asyncio.open_connection("127.0.0.1", smtp_port)

            async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
                while data := await a.read(65536):
                    b.write(data)
                b.close()

            await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)

        server = await asyncio.start_server(front, "127.0.0.1", port)
        got = asyncio.Event()

        def report(results: list[TxnResult], ip: str, mx: str) -> None:
            outs.extend(o for r in results for o in r.outcomes)
            got.set()

        site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
        q = pool.SiteQueue(site, ["127.0.0.2", "127.0.0.3"], cfg, report, "localhost")
        for k in range(6):  # one group at a time: one connection, from either address
            got.clear()
            before = len(outs)
            q.push([Envelope("s@example.org", [f"r{k}-{i}@x.example"], b"Subject: x\r\n\r\nhi\r\n",
                             tag=k * 4 + i) for i in range(4)])  # fmt: skip
            while len(outs) < before + 4:
                await asyncio.wait_for(got.wait(), 10)
                got.clear()
        await q.close()
        server.close()

    with aiosmtpd_server(smtp_port) as (_ctl, handler):
        run(go())
    assert len(outs) == 24
    assert not [o for o in outs if "unreachable" in o.text], outs
    assert sum(o.kind == "delivered" for o in outs) >= 12, outs  # .3 took its turns and more
    assert {m["peer"][0] for m in handler.messages} == {"127.0.0.1"}  # (through the front)


def test_a_local_error_at_connect_is_a_system_error_not_an_ip_block() -> None:
    """A local failure while a connection was made (451 4.3.0 "local error:
    ...", stage "connect": a bug, deferred loudly) was classified "blocked",
    an IP block (the reason rules and the dashboard read as the receiver
    refusing the source IP). It is "systemerror", as 4.3.0 at any other stage."""
    from types import SimpleNamespace

    from fastsend.delivery.worker import Worker

    o = Outcome(DEFERRED, 451, "4.3.0", "local error: ValueError: x", "connect")
    me = SimpleNamespace(classified={}, _classify=Worker._classify)
    assert Worker.classify(me, o) == ("systemerror", False)  # type: ignore[arg-type]
    refused = Outcome(DEFERRED, 0, "", "connect failed: refused", "connect")
    assert Worker.classify(me, refused) == ("networkerror", False)  # type: ignore[arg-type]


def test_a_provider_no_request_can_reach_answers_its_lane_at_once() -> None:
    """A provider's endpoint that refuses connections (or drops them: each
    request then waits its connect timeout): once the requests in flight have
    all failed to connect, the lane answers everything it holds with that
    failure (a route's next transport takes it) and, for a minute, what is
    pushed to it, without a request. Before, every request (one message each
    for SES and Mailgun) waited out its own connect attempt: 40 messages, 4
    requests at a time, were 40 attempts; a thousand behind an endpoint that
    drops SYNs sat in the worker's window for 250 connect timeouts."""
    import aiohttp

    from conftest import free_port
    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import TxnResult
    from fastsend.transports.http import ProviderQueue
    from fastsend.transports.mailgun import MailgunTransport

    spec = TransportSpec(name="mg", kind="mailgun", endpoint=f"http://127.0.0.1:{free_port()}",
                         region="us", domain="mg.sender.example.com", timeout=2.0,
                         max_connections=4, secrets={"api_key": "mg-key"})  # fmt: skip
    transport = MailgunTransport(spec, b"")
    requests: list[int] = []
    send = transport.send

    async def counted(session: Any, envs: list[Envelope]) -> Any:
        requests.append(len(envs))
        return await send(session, envs)

    transport.send = counted  # type: ignore[method-assign]
    outs: list[Outcome] = []
    body = b"Subject: x\r\n\r\nhi\r\n"

    async def main() -> int:
        done = asyncio.Event()

        def report(results: list[TxnResult], ip: str, mx: str) -> None:
            outs.extend(o for r in results for o in r.outcomes)
            if len(outs) >= 40:
                done.set()

        async with aiohttp.ClientSession() as session:
            q = ProviderQueue(transport, lambda: session, report, None, workers=1, horizon=10.0)
            q.push([Envelope("a@sender.example.com", [f"r{i}@x.example"], body, tag=i)
                    for i in range(40)])  # fmt: skip
            await asyncio.wait_for(done.wait(), 20)
            sent = len(requests)
            q.push([Envelope("a@sender.example.com", ["late@x.example"], body, tag=40)])
            await q.close()
            return sent

    sent = asyncio.run(main())
    assert sent <= 4, sent  # the requests in flight, not one per message
    assert len(outs) == 41 and all(o.kind == DEFERRED and o.stage == "connect" for o in outs)
    assert "unreachable" in outs[-1].text and len(requests) == sent
