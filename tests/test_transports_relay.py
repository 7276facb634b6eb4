"""Authenticated SMTP relays as routes, against aiosmtpd with trustme certificates:
AUTH (PLAIN, LOGIN, CRAM-MD5) over STARTTLS and on implicit TLS, 1,500
messages end to end DKIM-valid, the relay's rate-limit replies slowing the
lane without loss, permanent rejections bounced; failover from direct MX to a
relay recorded as events; credentials only from the environment or a 0600 file."""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword
from tests._engine_helpers import received_counts, summary, write_recipients
from tests._provider_servers import Bucket
from tests.conftest import free_port
from tests.test_transports_http import (
    REJECTS,
    RETRY,
    dkim_campaign,
    events,
    recipients,
    send,
    verify_all,
)

from fastsend.config import ConfigError, from_dict
from fastsend.sink import SinkProcess
from fastsend.testing.dnsserver import DNSServer

USER, PASSWORD = "relay-user", "relay-pass-123"


class RelayHandler:
    def __init__(self, rate: float = 0.0, throttle_first: int = 0) -> None:
        self.bucket = Bucket(rate, throttle_first)
        self.lock = threading.Lock()
        self.messages: list[tuple[list[str], bytes]] = []
        self.mechanisms: Counter[str] = Counter()
        self.throttled = 0
        self.tls_at_auth: list[bool] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in relay recipient table"
        if not self.bucket.take(1):
            self.throttled += 1
            return "451 4.7.1 Rate limit exceeded, slow down"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), bytes(envelope.original_content)))
        return f"250 2.0.0 Ok: queued as {uuid.uuid4().hex[:10]}"

    async def auth_CRAM__MD5(self, server: Any, args: list[str]) -> AuthResult:
        challenge = f"<{uuid.uuid4().hex}@relay.test>".encode()
        resp = await server.challenge_auth(challenge)
        if resp is MISSING:
            return AuthResult(success=False, handled=True)
        user, _, digest = resp.decode().partition(" ")
        want = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
        ok = user == USER and hmac.compare_digest(digest, want)
        if ok:
            self.mechanisms["CRAM-MD5"] += 1
            self.tls_at_auth.append(server.transport.get_extra_info("ssl_object") is not None)
        return AuthResult(success=ok, handled=False)


def authenticator(handler: RelayHandler) -> Any:
    def check(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (
            auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode()
        )
        if ok:
            handler.mechanisms[mechanism] += 1
            handler.tls_at_auth.append(server.transport.get_extra_info("ssl_object") is not None)
        return AuthResult(success=ok, handled=False)

    return check


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    d = tmp_path_factory.mktemp("ca")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return ctx, d / "ca.pem"


class Relay:
    def __init__(
        self,
        handler: RelayHandler,
        ctx: ssl.SSLContext,
        *,
        implicit: bool,
        exclude: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        kw: dict[str, Any] = dict(
            hostname="127.0.0.1", port=self.port, authenticator=authenticator(handler),
            auth_required=True, auth_exclude_mechanism=exclude or [], decode_data=False,
        )  # fmt: skip
        if implicit:
            # TLS from the first byte (aiosmtpd's auth_require_tls looks for STARTTLS only;
            # the handler records that AUTH ran inside TLS).
            kw.update(ssl_context=ctx, auth_require_tls=False)
        else:
            kw.update(tls_context=ctx, require_starttls=True, auth_require_tls=True)
        self.controller = Controller(handler, **kw)

    def __enter__(self) -> Relay:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def relay_config(port: int, ca: Path, *, tls: str = "", extra: str = "", retry: bool = True) -> str:
    t = f'tls = "{tls}"\n' if tls else ""
    return (RETRY if retry else "") + (
        f'[transports.relay1]\nkind = "relay"\nhost = "127.0.0.1"\nport = {port}\n{t}'
        f'ca_file = "{ca}"\nmax_connections = 8\n{extra}[routes]\n"*" = "relay1"\n'
    )


ENV = {"FASTSEND_RELAY1_USERNAME": USER, "FASTSEND_RELAY1_PASSWORD": PASSWORD}


@pytest.mark.slow
def test_relay_starttls_auth_1500_messages(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path]
) -> None:
    ctx, ca = certs
    camp, records = dkim_campaign(tmp_path)
    rcpts, good = recipients(tmp_path)
    handler = RelayHandler(rate=3000, throttle_first=30)
    with Relay(handler, ctx, implicit=False) as relay:
        proc = send(tmp_path, camp, rcpts, relay_config(relay.port, ca), ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"]) == (len(good), len(REJECTS)), (s, proc.stderr[-2000:])
    got = Counter(r for rs, _ in handler.messages for r in rs)
    assert got == Counter(good)  # no loss, no duplicate
    assert handler.throttled > 0  # the relay's limit was reached, and ridden out
    assert handler.mechanisms["PLAIN"] > 0 and all(handler.tls_at_auth)  # AUTH inside TLS
    verify_all([data for _, data in handler.messages], records)
    evs = events(tmp_path)
    deferred = [e for e in evs if e["event"] == "deferred"]
    assert deferred and all(e["code"] == 451 for e in deferred)
    for r in REJECTS:
        e = next(e for e in evs if e["rcpt"] == r and e["event"] == "bounced")
        assert e["enhanced"] == "5.1.1" and "relay1" in e["mx"]
    assert all(PASSWORD not in orjson.dumps(e).decode() for e in evs)


def test_relay_implicit_tls_and_cram_md5(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path]
) -> None:
    ctx, ca = certs
    camp, records = dkim_campaign(tmp_path)
    rcpts, good = recipients(tmp_path, 60)
    handler = RelayHandler()
    with Relay(handler, ctx, implicit=True, exclude=["PLAIN", "LOGIN"]) as relay:
        cfg = relay_config(relay.port, ca, tls="implicit")
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"]) == (len(good), len(REJECTS)), (s, events(tmp_path)[-3:])
    assert handler.mechanisms["CRAM-MD5"] > 0 and not handler.mechanisms["PLAIN"]
    assert all(handler.tls_at_auth)
    verify_all([data for _, data in handler.messages], records)


def test_relay_login_when_forced(tmp_path: Path, certs: tuple[ssl.SSLContext, Path]) -> None:
    ctx, ca = certs
    camp, _ = dkim_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net", "b@example.net"])
    handler = RelayHandler()
    with Relay(handler, ctx, implicit=False) as relay:
        cfg = relay_config(relay.port, ca, extra='auth_mechanism = "login"\n')
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "5")
    assert summary(proc)["delivered"] == 2, proc.stderr[-2000:]
    assert set(handler.mechanisms) == {"LOGIN"}


def test_relay_wrong_password_and_untrusted_certificate_defer(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path]
) -> None:
    ctx, ca = certs
    camp, _ = dkim_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    handler = RelayHandler()
    with Relay(handler, ctx, implicit=False) as relay:
        bad = {**ENV, "FASTSEND_RELAY1_PASSWORD": "wrong"}
        cfg = relay_config(relay.port, ca, retry=False)
        proc = send(tmp_path, camp, rcpts, cfg, bad, "--max-wait", "1")
        s = summary(proc)
        assert (s["delivered"], s["bounced"]) == (0, 0)
        ev = next(e for e in events(tmp_path) if e["event"] == "deferred")
        assert ev["code"] == 535 and "wrong" not in orjson.dumps(ev).decode()
        # No ca_file: the trustme certificate does not verify -> deferred, no AUTH sent.
        t2 = tmp_path / "t2"
        t2.mkdir()
        cfg = relay_config(relay.port, ca, retry=False).replace(f'ca_file = "{ca}"\n', "")
        proc = send(t2, camp, rcpts, cfg, ENV, "--max-wait", "1")
        assert summary(proc)["delivered"] == 0
        ev = next(e for e in events(t2) if e["event"] == "deferred")
        assert "certificate" in ev["text"].lower() or "tls" in ev["text"].lower(), ev
    assert not handler.mechanisms


def test_failover_from_direct_mx_to_relay(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path], dns_server: DNSServer
) -> None:
    """Direct MX first; what the site defers goes to the relay (an event says so);
    what it refuses for the address itself is bounced, not failed over."""
    ctx, ca = certs
    dns_server.set_zones(
        {"dest.test": [("MX", "10 mx.dest.test.")], "mx.dest.test": [("A", "127.0.0.1")]}
    )
    camp, _ = dkim_campaign(tmp_path)
    addrs = [f"ok{i}@dest.test" for i in range(20)] + [f"tempfail-{i}@dest.test" for i in range(10)]
    addrs += ["permfail-1@dest.test"]
    rcpts = write_recipients(tmp_path, addrs)
    handler = RelayHandler()
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink, Relay(handler, ctx, implicit=False) as relay:
        _h, mx_port = sink.addresses[0]
        cfg = relay_config(relay.port, ca).replace(
            '"*" = "relay1"', '"dest.test" = ["smtp", "relay1"]'
        )
        cfg += f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {mx_port}\n'
        cfg += "[delivery]\nallow_private_mx = true\n"  # the test MX is on loopback
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"]) == (30, 1), s
    assert set(received_counts(log)) == {f"ok{i}@dest.test" for i in range(20)}
    assert Counter(r for rs, _ in handler.messages for r in rs) == Counter(
        f"tempfail-{i}@dest.test" for i in range(10)
    )
    evs = events(tmp_path)
    fo = [e for e in evs if e["event"] == "failover"]
    assert {e["rcpt"] for e in fo} == {f"tempfail-{i}@dest.test" for i in range(10)}
    assert all(e["from"] == "smtp" and e["to"] == "relay1" and e["code"] == 451 for e in fo)
    final = {e["rcpt"]: e for e in evs if e["event"] in ("delivered", "bounced")}
    assert "relay1" in final["tempfail-0@dest.test"]["mx"]
    assert final["permfail-1@dest.test"]["event"] == "bounced"


def test_credentials_never_from_the_config_file_and_only_from_private_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = {"kind": "relay", "host": "h.example"}
    with pytest.raises(ConfigError, match="secrets never go in the config file"):
        from_dict({"transports": {"r": {**relay, "password": "x"}}, "routes": {"*": "r"}})
    f = tmp_path / "relay.secret"
    f.write_text("username = u\npassword = p4ss\n")
    os.chmod(f, 0o644)
    t = {"transports": {"r": {**relay, "credentials_file": str(f)}}, "routes": {"*": "r"}}
    with pytest.raises(ConfigError, match="readable by others"):
        from_dict(t)
    os.chmod(f, 0o600)
    spec = from_dict(t).transports["r"]
    assert spec.secrets == {"username": "u", "password": "p4ss"}
    assert "p4ss" not in repr(spec)
    assert spec.tls == "starttls" and spec.port == 587
    monkeypatch.delenv("SENDGRID_API_KEY", raising=False)
    monkeypatch.delenv("FASTSEND_SENDGRID_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="no api_key"):
        from_dict({"routes": {"*": "sendgrid"}})
    r465 = {
        "transports": {"r": {**relay, "port": 465, "credentials_file": str(f)}},
        "routes": {"*": "r"},
    }
    assert from_dict(r465).transports["r"].tls == "implicit"
    monkeypatch.setenv("MAILGUN_API_KEY", "k")
    monkeypatch.setenv("MAILGUN_DOMAIN", "mg.example.com")
    c = from_dict({
        "routes": {"*": "127.0.0.1:2525", "campaign:7": "mailgun:eu", "tenant:acme": "r",
                   "pool:p": ["smtp", "r"]},
        "transports": {"r": {**relay, "credentials_file": str(f)}},
    })  # fmt: skip
    assert c.transports["mailgun:eu"].secrets == {"api_key": "k"}
    assert c.route_lookup("x.org", (7, ("n",), "t")).transports == ("mailgun:eu",)
    assert c.route_lookup("x.org", (8, ("n",), "acme")).transports == ("r",)
    assert c.route_lookup("x.org", (8, ("n",), "t"), pool="p").transports == ("smtp", "r")
    assert c.route_lookup("x.org").host == "127.0.0.1"
    with pytest.raises(ConfigError, match="is no transport"):
        from_dict({"routes": {"*": ["smtp", "nope"]}})
    with pytest.raises(ConfigError, match="not an AWS region"):
        from_dict({"routes": {"*": "ses:mars"}})


def test_relay_limits_are_shared_among_workers_and_source_ips() -> None:
    from fastsend.config.transports import TransportSpec
    from fastsend.transports import relay

    spec = TransportSpec(name="r", kind="relay", host="h", port=465, tls="implicit",
                         max_connections=8, rate=100.0, secrets={"username": "u", "password": "p"})  # fmt: skip
    lim = relay.limits(spec, workers=2, ips=2, per_connection=500)
    assert (lim.max_connections, lim.rates, lim.tls) == (2, ((25.0, 25),), "required")
    assert lim.max_messages_per_connection == 500
    opts = relay.connect_options(spec)
    assert opts["implicit_tls"] and opts["tls"] == "required" and opts["auth"] == ("u", "p")
    assert opts["ssl_context"].verify_mode.name == "CERT_REQUIRED"
    plain = TransportSpec(name="r", kind="relay", host="h", tls="off")
    assert (
        "auth" not in relay.connect_options(plain)
        and relay.connect_options(plain)["ssl_context"] is None
    )


def test_cram_md5_answers_the_rfc_2195_example() -> None:
    import base64

    from fastsend.smtp.client import SMTPClient

    c = SMTPClient("client.example")
    c.receive_data(b"220 postoffice.reston.mci.net ESMTP\r\n")
    c.send_ehlo()
    c.receive_data(b"250-postoffice\r\n250 AUTH CRAM-MD5 PLAIN LOGIN\r\n")
    assert c.send_auth("tim", "tanstaaftanstaaf") == b"AUTH CRAM-MD5\r\n"  # in clear text: no PLAIN
    challenge = base64.b64encode(b"<1896.697170952@postoffice.reston.mci.net>")
    c.receive_data(b"334 " + challenge + b"\r\n")
    assert c.data_to_send() == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n"
    ev = c.receive_data(b"235 2.7.0 Authentication successful\r\n")
    assert ev[-1].code == 235 and c.state == "ready"


class DropAfterDot:
    """An MX that takes each message whole (DATA, the body, the final dot) and
    then closes the connection without a reply: the receiver has the message,
    the client never hears so (Postfix: "lost connection ... while sending end
    of data -- message may be sent more than once")."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received: Counter[str] = Counter()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn: Any) -> None:
        f = conn.makefile("rb")
        rcpts: list[str] = []
        try:
            conn.sendall(b"220 mx.dest.test ESMTP\r\n")
            while line := f.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250 mx.dest.test\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                    conn.sendall(b"250 ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    while (body := f.readline()) and body != b".\r\n":
                        pass
                    self.received.update(rcpts)
                    return  # the whole message taken; no reply
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        finally:
            conn.close()

    def __enter__(self) -> DropAfterDot:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_a_message_unanswered_after_its_final_dot_is_not_failed_over(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path], dns_server: DNSServer
) -> None:
    """Route ``["smtp", "relay1"]``: the MX reads each whole message and drops
    the connection before replying to the final dot. The outcome is unknown
    (the MX may deliver it): an attempt deferred, not failed over to the relay
    at once (the messages still waiting on that connection, never sent, do
    fail over). Before, the message went through the relay as well, within
    the second: its recipient got it twice."""
    ctx, ca = certs
    dns_server.set_zones(
        {"dest.test": [("MX", "10 mx.dest.test.")], "mx.dest.test": [("A", "127.0.0.1")]}
    )
    camp, _ = dkim_campaign(tmp_path)
    addrs = [f"u{i}@dest.test" for i in range(3)]
    rcpts = write_recipients(tmp_path, addrs)
    handler = RelayHandler()
    with DropAfterDot() as mx, Relay(handler, ctx, implicit=False) as relay:
        cfg = relay_config(relay.port, ca, retry=False).replace(
            '"*" = "relay1"', '"dest.test" = ["smtp", "relay1"]'
        )
        cfg = "[retry]\nmin_backoff = 30\nmax_backoff = 30\nmax_age = 2\n" + cfg
        cfg += f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {mx.port}\n'
        cfg += "[delivery]\nallow_private_mx = true\n"
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--no-dkim")
    assert proc.returncode == 0, proc.stderr[-3000:]
    taken = set(mx.received)  # the messages the MX read whole (the others: never sent)
    relayed = Counter(r for rs, _ in handler.messages for r in rs)
    assert taken, "the MX never read a message"
    assert not taken & set(relayed), f"sent again through the relay: {sorted(taken & set(relayed))}"
    assert all(n == 1 for n in relayed.values()) and taken | set(relayed) == set(addrs)
    evs = events(tmp_path)
    assert not [e for e in evs if e["event"] == "failover" and e["rcpt"] in taken]
    ends = [e for e in evs if e["event"] in ("deferred", "expired") and e["rcpt"] in taken]
    assert {e["rcpt"] for e in ends} == taken
    assert all(e["stage"] == "data" and e["code"] == 0 for e in ends), ends


def test_a_group_partly_refused_fails_over_only_its_refused_recipients(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path], dns_server: DNSServer
) -> None:
    """Identical mail to three recipients of one domain is one transaction:
    the MX defers the first at RCPT (451) and takes the two others. Route
    ``["smtp", "relay1"]``: only the deferred recipient goes on to the relay.
    Before, the group's first outcome decided for all of it: the whole
    envelope failed over and the two recipients the MX had taken got the
    message again through the relay."""
    ctx, ca = certs
    dns_server.set_zones(
        {"dest.test": [("MX", "10 mx.dest.test.")], "mx.dest.test": [("A", "127.0.0.1")]}
    )
    camp = tmp_path / "same.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "Same"\ntext = "Hello.\\n"\n')
    addrs = ["tempfail-1@dest.test", "ok1@dest.test", "ok2@dest.test"]
    rcpts = write_recipients(tmp_path, addrs)
    handler = RelayHandler()
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink, Relay(handler, ctx, implicit=False) as relay:
        _h, mx_port = sink.addresses[0]
        cfg = relay_config(relay.port, ca).replace(
            '"*" = "relay1"', '"dest.test" = ["smtp", "relay1"]'
        )
        cfg += f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {mx_port}\n'
        cfg += "[delivery]\nallow_private_mx = true\n"
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "1", "--no-dkim")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == 3
    relayed = Counter(r for rs, _ in handler.messages for r in rs)
    assert dict(received_counts(log)) == {"ok1@dest.test": 1, "ok2@dest.test": 1}
    assert dict(relayed) == {"tempfail-1@dest.test": 1}, relayed
    fo = [e for e in events(tmp_path) if e["event"] == "failover"]
    assert [e["rcpt"] for e in fo] == ["tempfail-1@dest.test"]
