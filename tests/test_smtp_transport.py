"""The SMTP client over real sockets, on asyncio and uvloop.

Real servers on loopback: aiosmtpd (refuses some recipients; STARTTLS with
trustme certificates), Postfix's smtp-sink, Exim (PIPELINING and CHUNKING,
refusals at RCPT), and a small scripted server that drops connections or stops
answering (disconnects and timeouts). Every test runs over both twins of the
client's core (``ClientCore``: the reference and the compiled one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme

from _smtp_helpers import FaultServer, aiosmtpd_server, client_class, link_class
from conftest import EximServer, free_port, require_program, wait_port
from fastsend.outcome import Envelope, Outcome
from fastsend.smtp import ConnectOptions, SMTPConnection, Timeouts, connect
from fastsend.smtp import transport as tr

Run = Callable[[Any], Any]
SHORT = Timeouts(connect=2, greeting=2, ehlo=0.5, mail=0.5, rcpt=0.5, data=0.5, data_end=0.5)


def envs(n: int, rcpts: tuple[str, ...] = ("a@example.com",)) -> list[Envelope]:
    return [
        Envelope(
            "bounce@example.org",
            list(rcpts),
            b"Subject: %d\r\n\r\n.dot line\r\nbody\r\n" % i,
            tag=i,
        )
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def client_twin(impl: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The connections made here run the reference client and link, or the
    compiled core and link."""
    monkeypatch.setattr(tr, "SMTPClient", client_class(impl))
    monkeypatch.setattr(tr, "Link", link_class(impl))
    return impl


async def must_connect(opts: ConnectOptions) -> SMTPConnection:
    conn = await connect(opts)
    assert isinstance(conn, SMTPConnection), conn
    return conn


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_aiosmtpd_one_refused_recipient_and_source_ip(run: Run) -> None:
    port = free_port()
    with aiosmtpd_server(port) as (_ctl, handler):

        async def go() -> Any:
            opts = ConnectOptions(host="127.0.0.1", port=port, source_ip="127.0.0.2", tls="off")
            conn = await must_connect(opts)
            results = await conn.send(
                envs(3, ("a@example.com", "reject-me@example.com", "later@example.com"))
            )
            await conn.quit()
            return results, conn

        results, conn = run(go())
    assert [r.tag for r in results] == [0, 1, 2]
    for r in results:
        kinds = [(o.kind, o.code, o.stage) for o in r.outcomes]
        assert kinds == [
            ("delivered", 250, "data"),
            ("failed", 550, "rcpt"),
            ("deferred", 451, "rcpt"),
        ]
        assert r.outcomes[1].enhanced == "5.1.1" and r.outcomes[0].mx == f"127.0.0.1:{port}"
    assert results[0].queue_id == "AIO1"
    assert len(handler.messages) == 3
    msg = handler.messages[0]
    assert msg["peer"][0] == "127.0.0.2"  # the address the server saw
    assert msg["rcpts"] == ["a@example.com"]
    assert msg["data"] == b"Subject: 0\r\n\r\n.dot line\r\nbody\r\n"  # dot-stuffing undone
    assert not conn.usable


def test_aiosmtpd_starttls_required(run: Run, ca: trustme.CA) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    port = free_port()
    with aiosmtpd_server(port, tls_context=server_ctx) as (_ctl, handler):

        async def go() -> Any:
            opts = ConnectOptions(
                host="127.0.0.1", port=port, tls="required", ssl_context=client_ctx
            )
            conn = await must_connect(opts)
            assert conn.tls_active and "STARTTLS" not in conn.capabilities
            results = await conn.send(envs(2))
            await conn.quit()
            # opportunistic with the default (unverified) context also upgrades
            conn2 = await must_connect(ConnectOptions(host="127.0.0.1", port=port))
            tls2 = conn2.tls_active
            await conn2.quit()
            return results, tls2

        results, tls2 = run(go())
    assert all(o.delivered for r in results for o in r.outcomes)
    assert handler.messages[0]["tls"] and tls2


def test_starttls_required_but_not_offered_and_untrusted(run: Run, ca: trustme.CA) -> None:
    port = free_port()
    with aiosmtpd_server(port):

        async def go() -> Any:
            return await connect(ConnectOptions(host="127.0.0.1", port=port, tls="required"))

        out = run(go())
    assert isinstance(out, Outcome) and out.deferred and out.stage == "starttls"

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    port = free_port()
    with aiosmtpd_server(port, tls_context=server_ctx) as (_ctl, _handler):

        async def go2() -> Any:
            # required + system trust store: the trustme CA is unknown -> deferred
            bad = await connect(ConnectOptions(host="127.0.0.1", port=port, tls="required"))
            return bad

        bad = run(go2())
    assert isinstance(bad, Outcome) and bad.deferred and bad.stage == "starttls"
    assert "TLS handshake failed" in bad.text


def test_postfix_sink_batch_source_ip_max_messages(run: Run, postfix_sink: Any) -> None:
    async def go() -> Any:
        opts = ConnectOptions(
            host=postfix_sink.host, port=postfix_sink.port, source_ip="127.0.0.3", max_messages=150
        )
        conn = await must_connect(opts)
        assert conn.sockname()[0] == "127.0.0.3"
        assert "PIPELINING" in conn.capabilities
        first = await conn.send(envs(100, ("a@example.com", "b@example.com")))
        ones = [conn.delivered_one]
        second = await conn.send(envs(100))  # only 50 fit under max_messages
        ones.append(conn.delivered_one)
        usable = conn.usable
        await conn.quit()
        return first, second, usable, ones

    first, second, usable, ones = run(go())
    # Results that are one recipient delivered (Lane.observe need not read a
    # group of them): none of two recipients each, the 50 sent of the second.
    assert ones == [0, 50]
    assert len(first) == 100 and all(o.delivered for r in first for o in r.outcomes)
    assert [r.tag for r in second] == list(range(100))
    assert all(r.outcomes[0].delivered for r in second[:50])
    assert all(r.outcomes[0].deferred and r.outcomes[0].stage == "local" for r in second[50:])
    assert not usable


def test_server_closes_mid_batch(run: Run) -> None:
    async def go() -> Any:
        server = await FaultServer(close_after=3).start()
        try:
            conn = await must_connect(
                ConnectOptions(host="127.0.0.1", port=server.port, timeouts=SHORT)
            )
            results = await conn.send(envs(6, ("a@example.com", "b@example.com")))
            return results, conn.usable, len(server.messages)
        finally:
            await server.stop()

    results, usable, received = run(go())
    assert received == 3 and not usable
    assert [r.tag for r in results] == list(range(6))
    assert all(o.delivered for r in results[:3] for o in r.outcomes)
    for r in results[3:]:
        assert [(o.kind, o.code) for o in r.outcomes] == [("deferred", 0)] * 2
    assert results[3].outcomes[0].stage == "mail"


@pytest.mark.parametrize(("stall", "stage"), [("EHLO", "ehlo"), ("MAIL", "mail"), (".", "data")])
def test_timeouts(run: Run, stall: str, stage: str) -> None:
    async def go() -> Any:
        server = await FaultServer(stall_at=stall).start()
        try:
            conn = await connect(ConnectOptions(host="127.0.0.1", port=server.port, timeouts=SHORT))
            if isinstance(conn, Outcome):
                return conn
            (r,) = await conn.send(envs(1))
            assert not conn.usable
            return r.outcomes[0]
        finally:
            await server.stop()

    out = run(go())
    assert out.deferred and out.stage == stage and "timeout" in out.text


def test_a_reused_connections_reply_clock_starts_at_the_write() -> None:
    """The reply timer of a connection reused after a pause counted from its last
    read, not from the new command: idle 2 s in the pool, then a MAIL answered
    in 1.5 s timed out against a 3 s limit (deferred "timeout: no reply to mail").
    The clock starts at the write now (1.5 s of slack for a loaded machine)."""
    t = Timeouts(connect=10, greeting=10, ehlo=10, mail=3, rcpt=3, data=3, data_end=3)

    async def go() -> Any:
        server = await FaultServer(slow_mail=1.5).start()
        try:
            conn = await must_connect(ConnectOptions(host="127.0.0.1", port=server.port, timeouts=t))
            (first,) = await conn.send(envs(1))
            await asyncio.sleep(2.0)  # idle in the pool, the last reply's timer still armed
            (second,) = await conn.send(envs(1))
            return first.outcomes[0], second.outcomes[0], conn.usable
        finally:
            await server.stop()

    first, second, usable = asyncio.run(go())
    assert first.delivered
    assert second.delivered, second
    assert usable


def test_connect_refused_and_idle_close(run: Run) -> None:
    async def go() -> Any:
        refused = await connect(ConnectOptions(host="127.0.0.1", port=free_port(), timeouts=SHORT))
        server = await FaultServer().start()
        try:
            conn = await must_connect(ConnectOptions(host="127.0.0.1", port=server.port))
            await conn.send(envs(1))
            not_yet = await conn.close_if_idle(60)
            closed = await conn.close_if_idle(0)
            after = await conn.send(envs(1))
            return refused, not_yet, closed, after
        finally:
            await server.stop()

    refused, not_yet, closed, after = run(go())
    assert isinstance(refused, Outcome) and refused.deferred and refused.stage == "connect"
    assert not not_yet and closed
    assert after[0].outcomes[0].deferred


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_aiosmtpd_auth(run: Run, mechanism: str) -> None:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    def check(server: Any, session: Any, envelope: Any, mech: str, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword) and data.login == b"user" and data.password == b"s3cret"
        )
        return AuthResult(success=ok and mech == mechanism, handled=False)

    port = free_port()
    with aiosmtpd_server(port, authenticator=check, auth_require_tls=False):

        async def go() -> Any:
            good = ConnectOptions(
                host="127.0.0.1",
                port=port,
                auth=("user", "s3cret"),
                auth_mechanism=mechanism,
                timeouts=SHORT,
                auth_in_clear=True,  # this aiosmtpd has no TLS
            )
            conn = await must_connect(good)
            (r,) = await conn.send(envs(1))
            await conn.quit()
            bad = await connect(
                ConnectOptions(
                    host="127.0.0.1",
                    port=port,
                    auth=("user", "wrong"),
                    auth_mechanism=mechanism,
                    timeouts=SHORT,
                    auth_in_clear=True,
                )
            )
            return r, bad

        r, bad = run(go())
    assert r.outcomes[0].delivered
    assert isinstance(bad, Outcome) and bad.deferred and bad.stage == "auth" and bad.code == 535
    assert "wrong" not in repr(ConnectOptions(host="x", auth=("user", "wrong")))


def test_bad_options() -> None:
    for kw in ({"port": 0}, {"tls": "maybe"}, {"max_messages": 0}, {"host": ""}):
        with pytest.raises(ValueError):
            ConnectOptions(**{"host": "127.0.0.1", **kw})


@contextlib.contextmanager
def smtp_sink(*options: str) -> Iterator[int]:
    """Postfix's smtp-sink with fault options (see smtp-sink(1)); yields its port."""
    exe = require_program("smtp-sink")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    cmd = [exe, "-4", *user, *options, f"127.0.0.1:{port}", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def test_postfix_sink_without_pipelining(run: Run) -> None:
    with smtp_sink("-p") as port:

        async def go() -> Any:
            conn = await must_connect(ConnectOptions(host="127.0.0.1", port=port, timeouts=SHORT))
            assert "PIPELINING" not in conn.capabilities
            results = await conn.send(envs(20, ("a@example.com", "b@example.com")))
            await conn.quit()
            return results

        results = run(go())
    assert [r.tag for r in results] == list(range(20))
    assert all(o.delivered for r in results for o in r.outcomes)


def test_postfix_sink_421_at_rcpt_defers_everything(run: Run) -> None:
    with smtp_sink("-Q", "RCPT") as port:

        async def go() -> Any:
            conn = await must_connect(ConnectOptions(host="127.0.0.1", port=port, timeouts=SHORT))
            results = await conn.send(envs(3, ("a@example.com", "b@example.com")))
            return results, conn.usable

        results, usable = run(go())
    assert not usable
    outs = [o for r in results for o in r.outcomes]
    assert len(outs) == 6 and all(o.deferred for o in outs)
    assert outs[0].code == 421 and outs[0].stage == "rcpt"


@pytest.fixture(scope="module")
def fastsend_sink() -> Iterator[int]:
    """fastsend's own sink (it offers CHUNKING, so the client streams BDAT)."""
    port = free_port()
    cmd = [sys.executable, "-m", "fastsend", "sink", "--listen", f"127.0.0.1:{port}", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, timeout=30)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_bdat_stream_against_fastsend_sink(run: Run, fastsend_sink: int) -> None:
    async def go() -> Any:
        conn = await must_connect(
            ConnectOptions(host="127.0.0.1", port=fastsend_sink, timeouts=SHORT)
        )
        assert {"CHUNKING", "PIPELINING"} <= set(conn.capabilities)
        batch = envs(80, ("a@example.com", "permfail-x@example.com", "tempfail-y@example.com"))
        results = await conn.send(batch)
        await conn.quit()
        return results

    results = run(go())
    assert [r.tag for r in results] == list(range(80))
    for r in results:
        assert [(o.kind, o.stage) for o in r.outcomes] == [
            ("delivered", "data"),
            ("failed", "rcpt"),
            ("deferred", "rcpt"),
        ]


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_exim_pipelining_with_refusals(
    run: Run, exim_server: EximServer, chunking: bool, client_twin: str
) -> None:
    """Exim (it enforces command synchronisation): pipelined transactions with
    BDAT or DATA, recipients refused 550, 451 and 550 5.7.1 at RCPT, a
    transaction with every recipient refused between accepted ones. Each
    outcome as Exim answered; Exim took exactly the accepted recipients and
    logged no protocol or synchronisation error."""
    rcpt_sets = [
        ("a@example.com", "permfail-1@example.com", "tempfail-1@example.com"),
        ("permfail-2@example.com", "policy-2@example.com"),  # nothing accepted
        ("b@example.com",),
        ("c@example.com", "d@example.com"),
    ]
    batch = [
        Envelope("bounce@example.org", list(rs), b"Subject: %d\r\n\r\nbody\r\n" % i, tag=i)
        for i, rs in enumerate(rcpt_sets * 3)
    ]

    async def go() -> Any:
        opts = ConnectOptions(
            host=exim_server.host, port=exim_server.port, tls="off", chunking=chunking
        )
        conn = await must_connect(opts)
        assert {"PIPELINING", "CHUNKING"} <= set(conn.capabilities)
        results = await conn.send(batch)
        await conn.quit()
        return results

    results = run(go())
    assert [r.tag for r in results] == list(range(len(batch)))
    want = {"a": "delivered", "b": "delivered", "c": "delivered", "d": "delivered"}
    want |= {"permfail": "failed", "policy": "failed", "tempfail": "deferred"}
    for r, e in zip(results, batch, strict=True):
        for o, rcpt in zip(r.outcomes, e.rcpts, strict=True):
            kind = want[rcpt.split("@")[0].split("-")[0]]
            assert o.kind == kind, (rcpt, o)
            assert o.stage == ("data" if kind == "delivered" else "rcpt"), (rcpt, o)
    got = sorted(r for _sender, rs in exim_server.received() for r in rs)
    assert got == sorted(["a@example.com", "b@example.com", "c@example.com", "d@example.com"] * 3)
    assert exim_server.protocol_errors() == [], exim_server.protocol_errors()[:5]
    # Each taken message's queue_id is Exim's own id (its log's), not its reply's text
    # ("OK id=1tAbCd-000XyZ-AB", after "1234 byte chunk, total 1234" with BDAT).
    logged = [ln.split()[2] for ln in exim_server.mainlog().splitlines() if " <= " in ln]
    taken = [r.queue_id for r in results if any(o.kind == "delivered" for o in r.outcomes)]
    assert len(taken) == 9 and sorted(taken) == sorted(logged), (taken, logged)


def napper_class(impl: str) -> Any:
    """The transport's ``Napper``: the reference ("py") or the compiled twin ("c")."""
    from fastsend import _accel

    return tr.PyNapper if impl == "py" else _accel.compiled("Napper")


def test_napper_naps_once_per_iteration_and_only_while_enough_links_send(impl: str) -> None:
    nap = napper_class(impl)()
    loop = asyncio.new_event_loop()
    try:
        nap.poke()  # off: nothing scheduled
        loop.run_until_complete(asyncio.sleep(0))
        assert nap.naps == 0 and not nap.active
        nap.start(loop, 0.0001, 2)
        assert nap.active and nap.us == 100
        nap.sending = 1
        nap.poke()  # one link sending: no nap
        loop.run_until_complete(asyncio.sleep(0))
        assert nap.naps == 0
        nap.sending = 2
        for _ in range(5):  # five reads in one iteration: one nap after it
            nap.poke()
        loop.run_until_complete(asyncio.sleep(0))
        assert nap.naps == 1
        nap.poke()
        nap.sending = 0  # the links finished before the nap came: none taken
        loop.run_until_complete(asyncio.sleep(0))
        assert nap.naps == 1
        nap.sending = 2
        nap.poke()
        loop.run_until_complete(asyncio.sleep(0))
        assert nap.naps == 2
        nap.stop()
        nap.poke()
        loop.run_until_complete(asyncio.sleep(0))
        assert nap.naps == 2 and not nap.active
    finally:
        loop.close()


def test_napping_connections_deliver_everything(
    run: Run, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight connections sending at once to smtp-sink with the process's napper
    on (as a worker runs it): every message delivered, in order, naps taken,
    and no link left counted as sending."""
    nap = napper_class(impl)()
    monkeypatch.setattr(tr, "NAPPER", nap)
    with smtp_sink() as port:

        async def go() -> Any:
            nap.start(asyncio.get_running_loop(), 0.0002, 4)
            opts = ConnectOptions(host="127.0.0.1", port=port, timeouts=SHORT)
            conns = [await must_connect(opts) for _ in range(8)]
            assert all(c._link.napper is nap for c in conns)
            out = await asyncio.gather(*(c.send(envs(40)) for c in conns))
            out += await asyncio.gather(*(c.send(envs(40)) for c in conns))
            for c in conns:
                await c.quit()
            nap.stop()
            return out

        out = run(go())
    assert len(out) == 16
    for results in out:
        assert [r.tag for r in results] == list(range(40))
        assert all(o.delivered for r in results for o in r.outcomes)
    assert nap.naps > 0 and nap.sending == 0


class AuthProbe:
    """A scripted relay that offers AUTH PLAIN LOGIN and records every line
    it reads, to see whether a password crossed the wire. ``starttls``:
    "" (not offered: stripped by a middlebox), "454" (offered, refused) or
    "garbage" (offered, 220, then non-TLS bytes: the handshake fails and the
    client's opportunistic fallback reconnects in clear)."""

    def __init__(self, starttls: str = "") -> None:
        self.starttls = starttls
        self.lines: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> AuthProbe:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            w.write(b"220 probe ESMTP\r\n")
            while line := await r.readline():
                self.lines.append(line)
                verb = line[:8].split(b" ")[0].strip().upper()
                if verb == b"EHLO":
                    tls = b"250-STARTTLS\r\n" if self.starttls else b""
                    w.write(b"250-probe\r\n" + tls + b"250 AUTH PLAIN LOGIN\r\n")
                elif verb == b"STARTTLS" and self.starttls == "454":
                    w.write(b"454 4.7.0 TLS not available\r\n")
                elif verb == b"STARTTLS":
                    w.write(b"220 2.0.0 go ahead\r\n")
                    await w.drain()
                    w.write(b"this is no TLS server hello\r\n" * 4)
                    await w.drain()
                    break
                elif verb == b"AUTH":
                    w.write(b"235 2.7.0 ok\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    break
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        w.close()


@pytest.mark.parametrize("starttls", ["", "454", "garbage"], ids=["stripped", "454", "broken"])
@pytest.mark.parametrize("mechanism", ["", "PLAIN", "LOGIN"])
def test_auth_is_never_sent_in_clear_unless_allowed(
    run: Run, starttls: str, mechanism: str
) -> None:
    """Opportunistic TLS that did not happen (STARTTLS stripped from EHLO,
    refused 454, or a handshake that failed and fell back to clear text):
    the password is not sent (Postfix's smtp_sasl_security_options =
    noplaintext). The session ends deferred at "auth" with the reason; with
    ``auth_in_clear`` (the operator's explicit choice) it authenticates."""

    async def go() -> Any:
        async with AuthProbe(starttls) as probe:
            opts = dict(host="127.0.0.1", port=probe.port, auth=("user", "s3cret"),
                        auth_mechanism=mechanism, timeouts=SHORT)  # fmt: skip
            refused = await connect(ConnectOptions(**opts))  # type: ignore[arg-type]
            seen = list(probe.lines)
            probe.lines.clear()
            allowed = await connect(ConnectOptions(**opts, auth_in_clear=True))  # type: ignore[arg-type]
            if isinstance(allowed, SMTPConnection):
                await allowed.quit()
            return refused, seen, allowed, list(probe.lines)

    refused, seen, allowed, seen_allowed = run(go())
    assert isinstance(refused, Outcome) and refused.deferred and refused.stage == "auth", refused
    assert "clear" in refused.text and "TLS" in refused.text, refused.text
    assert not any(line.upper().startswith(b"AUTH") for line in seen), seen
    assert not any(b"s3cret" in line or b"czNjcmV0" in line for line in seen), seen
    assert isinstance(allowed, SMTPConnection), allowed
    assert any(line.upper().startswith(b"AUTH") for line in seen_allowed), seen_allowed
