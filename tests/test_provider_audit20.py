"""Provider transports audited from outside (session 20): what an operator
meets with a wrong or revoked key, and what the providers' documented
answers mean for the mail behind them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import summary, write_recipients
from tests._provider_servers import Recorder, ThreadedApp, mailgun_app, sendgrid_app
from tests.test_transports_http import events, send


def _shaping(tmp: Path) -> list[dict[str, object]]:
    p = tmp / "spool" / "shaping.jsonl"
    return [orjson.loads(x) for x in p.read_bytes().splitlines() if x.strip()] if p.exists() else []


def test_a_refused_api_key_pauses_the_transport_not_one_request_per_message(
    tmp_path: Path,
) -> None:
    """Mailgun answers 401 "Forbidden" (the API key is wrong or revoked): that
    is the transport, not the message. The lane stops sending at once (only
    the requests already in flight meet the 401), its mail is deferred with
    the reason, nothing bounces, and a shaping event tells the operator.
    Before, each of the 60 messages was its own request answered 401, an
    attempt each, and so again at every retry until the key was fixed."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"k{i}@example.net" for i in range(60)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\nmax_connections = 2\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "revoked-key"},
                    "--max-wait", "1", "--no-dkim", "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 0 and s["bounced"] == 0, (s, proc.stderr[-2000:])
    assert 1 <= rec.unauthorized <= 2, rec.unauthorized  # the requests in flight only
    deferred = {e["rcpt"]: e for e in events(tmp_path) if e["event"] == "deferred"}
    assert set(deferred) == set(addrs)
    assert all("HTTP 401" in e["text"] for e in deferred.values()), list(deferred.values())[:3]
    paused = [e for e in _shaping(tmp_path) if e.get("action") == "provider refused credentials"]
    assert paused and "401" in str(paused[0]["text"]), _shaping(tmp_path)
    assert "revoked-key" not in (tmp_path / "spool" / "events.jsonl").read_text()
    assert "revoked-key" not in proc.stderr + proc.stdout


def test_a_refused_api_key_sends_the_mail_on_through_the_routes_next_transport(
    tmp_path: Path,
) -> None:
    """Route ``["mg", "sg"]`` with Mailgun's key revoked: its mail goes on to
    SendGrid at once, and Mailgun is asked no more than its requests in flight."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"f{i}@example.net" for i in range(40)]
    rcpts = write_recipients(tmp_path, addrs)
    mg_rec, sg_rec = Recorder(), Recorder()
    with (
        ThreadedApp(mailgun_app("mg-key", mg_rec, "mg.sender.example.com")) as mg,
        ThreadedApp(sendgrid_app("sg-key", sg_rec)) as sg,
    ):
        cfg = (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{mg.url}"\nmax_connections = 2\n'
            f'domain = "mg.sender.example.com"\n[transports.sg]\nkind = "sendgrid"\n'
            f'endpoint = "{sg.url}"\n[routes]\n"*" = ["mg", "sg"]\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg,
                    {"FASTSEND_MG_API_KEY": "revoked", "FASTSEND_SG_API_KEY": "sg-key"},
                    "--no-dkim", "--max-wait", "5", "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == len(addrs), (s, proc.stderr[-2000:])
    assert dict(sg_rec.recipients) == {a: 1 for a in addrs}
    assert 1 <= mg_rec.unauthorized <= 2, mg_rec.unauthorized


class _EchoingRelay:
    """A scripted relay that repeats a command it does not take in its reply
    (Sendmail built without SASL: ``500 5.5.1 Command unrecognized: "..."``),
    and, with ``auth``, offers AUTH PLAIN LOGIN and refuses the credentials
    repeating what it was sent. Records every line it reads."""

    def __init__(self, auth: bool) -> None:
        self.auth = auth
        self.lines: list[bytes] = []
        self.port = 0
        self._server: Any = None

    async def __aenter__(self) -> _EchoingRelay:
        import asyncio

        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, r: Any, w: Any) -> None:
        import asyncio
        import contextlib

        login = 0  # AUTH LOGIN's prompts answered so far
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            w.write(b"220 relay ESMTP\r\n")
            while line := await r.readline():
                self.lines.append(line)
                said = line.strip()
                verb = said.split(b" ")[0].upper()
                if login == 1:
                    login = 2
                    w.write(b"334 UGFzc3dvcmQ6\r\n")
                elif verb == b"EHLO":
                    w.write(b"250-relay\r\n250 AUTH PLAIN LOGIN\r\n" if self.auth else b"250 relay\r\n")
                elif verb == b"AUTH" and self.auth and said.upper() == b"AUTH LOGIN":
                    login = 1
                    w.write(b"334 VXNlcm5hbWU6\r\n")
                elif verb == b"AUTH" and not self.auth:
                    w.write(b'500 5.5.1 Command unrecognized: "' + said + b'"\r\n')
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    break
                elif self.auth and verb not in (b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP"):
                    w.write(b"535 5.7.8 Authentication failed: " + said + b"\r\n")
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        w.close()


@pytest.mark.parametrize("auth,mechanism", [(False, ""), (True, "PLAIN"), (True, "LOGIN")])
def test_a_relays_reply_never_carries_our_credentials_into_the_outcome(
    auth: bool, mechanism: str
) -> None:
    """A relay that repeats what it was sent in its refusal (Sendmail without
    SASL answers AUTH with ``500 5.5.1 Command unrecognized: "AUTH PLAIN
    <base64 of the user and password>"``) put the password, base64, into the
    deferral's text: the event log, webhooks, /v1/events. Now a relay that
    offers no AUTH is not sent the credentials at all (deferred, saying so),
    and an AUTH refusal's text has what we sent blanked out."""
    import asyncio
    import base64

    from fastsend.outcome import Outcome
    from fastsend.smtp.transport import ConnectOptions, SMTPConnection, connect

    secret = "relay-pass-123"
    forms = [secret, base64.b64encode(secret.encode()).decode(),
             base64.b64encode(b"\0relay-user\0" + secret.encode()).decode()]  # fmt: skip

    async def go() -> tuple[Any, list[bytes]]:
        async with _EchoingRelay(auth) as relay:
            got = await connect(ConnectOptions(
                host="127.0.0.1", port=relay.port, tls="off", auth=("relay-user", secret),
                auth_mechanism=mechanism, auth_in_clear=True,
            ))  # fmt: skip
            if isinstance(got, SMTPConnection):
                await got.quit()
            return got, list(relay.lines)

    out, lines = asyncio.run(go())
    assert isinstance(out, Outcome) and out.deferred and out.stage == "auth", out
    assert not any(f in out.text for f in forms), out.text
    if not auth:
        assert "AUTH" in out.text and "offer" in out.text, out.text
        assert not any(x.upper().startswith(b"AUTH") for x in lines), lines


EXIM_RELAY = """\
primary_hostname = relay.test
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
chunking_advertise_hosts = {chunking}
pipelining_advertise_hosts = *
tls_advertise_hosts = *
tls_certificate = {dir}/cert.pem
tls_privatekey = {dir}/key.pem
auth_advertise_hosts = *
host_lookup =
rfc1413_hosts =
queue_only = true
keep_environment =
log_selector = +received_recipients +smtp_protocol_error +smtp_syntax_error
acl_smtp_rcpt = acl_rcpt
begin acl
acl_rcpt:
  deny local_parts = ^permfail-.*
       message = 5.1.1 User unknown
  accept authenticated = *
  deny message = 5.7.1 Relay access denied
begin routers
blackhole:
  driver = redirect
  data = :blackhole:
begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${{if and {{{{eq{{$auth2}}{{relay-user}}}}{{eq{{$auth3}}{{relay-pass-123}}}}}}}}
  server_advertise_condition = ${{if def:tls_in_cipher}}
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${{if and {{{{eq{{$auth1}}{{relay-user}}}}{{eq{{$auth2}}{{relay-pass-123}}}}}}}}
  server_advertise_condition = ${{if def:tls_in_cipher}}
"""


@pytest.mark.parametrize("chunking", [True, False])
def test_exim_as_the_relay_starttls_auth_pipelining_and_chunking(
    tmp_path: Path, chunking: bool
) -> None:
    """Exim as the relay: STARTTLS (verified against the operator's CA file),
    AUTH offered only inside TLS, PIPELINING with and without CHUNKING, relaying
    only for an authenticated client, a refused recipient at RCPT. Every other
    message arrives once, none is refused as unauthenticated, and Exim logs
    no protocol or synchronisation error."""
    import contextlib
    import os
    import shutil
    import subprocess
    import tempfile

    import trustme
    from tests.conftest import IN_CI, exim_root, free_port, wait_port
    from tests.test_transports_relay import ENV, relay_config

    root = exim_root()
    if root is None:
        if IN_CI:
            pytest.fail("Exim is required in CI (scripts/test runs scripts/fetch-exim)")
        pytest.skip("Exim not unpacked (run scripts/fetch-exim)")
    d = Path(tempfile.mkdtemp(prefix="fastsend-exim-relay-"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for sub in ("spool", "log"):
        (d / sub).mkdir()
    for p in (d, d / "spool", d / "log"):
        p.chmod(0o777)
    for p in (d / "cert.pem", d / "key.pem"):
        p.chmod(0o644)
    port = free_port()
    conf = d / "exim.conf"
    conf.write_text(EXIM_RELAY.format(dir=d, port=port, chunking="*" if chunking else ""))
    env = dict(os.environ)
    libs = [str(root / "usr/lib/x86_64-linux-gnu"), str(root / "lib/x86_64-linux-gnu")]
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    proc = subprocess.Popen(
        [str(root / "usr/sbin/exim4"), "-C", str(conf), "-bdf", "-oX", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    good = [f"x{i}@example.{('net', 'org')[i % 2]}" for i in range(120)]
    addrs = [*good[:60], "permfail-1@example.net", *good[60:]]
    rcpts = write_recipients(tmp_path, addrs)
    try:
        wait_port("127.0.0.1", port)
        cfg = relay_config(port, tmp_path / "ca.pem", retry=False)
        run = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "1", "--no-dkim",
                   "--workers", "1")  # fmt: skip
        log = (d / "log" / "mainlog").read_text(errors="replace")
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(d, ignore_errors=True)
    s = summary(run)
    assert (s["delivered"], s["bounced"]) == (len(good), 1), (s, run.stderr[-2000:], log[-3000:])
    got = Counter(
        r for line in log.splitlines() if " <= " in line and " for " in line
        for r in line.rpartition(" for ")[2].split()
    )  # fmt: skip
    assert got == Counter(good), log[-3000:]
    received = [ln for ln in log.splitlines() if " <= " in ln]
    assert all(" P=esmtpsa " in ln and " A=" in ln for ln in received), received[:3]
    assert ("K" in {f for ln in received for f in ln.split()}) == chunking, received[:3]
    assert "protocol error" not in log and "synchronization error" not in log, log[-3000:]
    bounced = next(e for e in events(tmp_path) if e["event"] == "bounced")
    assert bounced["rcpt"] == "permfail-1@example.net" and bounced["code"] == 550


@pytest.mark.parametrize(
    "url,allowed",
    [
        ("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa7f.pem", True),
        ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-0a1b2c.pem", True),
        ("https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-0a1b2c.pem", True),
        # An S3 bucket named "sns", virtual-hosted on a dash-region endpoint: anyone's.
        ("https://sns.s3-ap-southeast-2.amazonaws.com/SimpleNotificationService-x.pem", False),
        ("https://sns.s3.amazonaws.com/SimpleNotificationService-x.pem", False),
        ("https://sns.s3-accelerate.amazonaws.com/SimpleNotificationService-x.pem", False),
        ("https://sns.us-east-1.amazonaws.com/uploads/mine.pem", False),
        ("http://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa7f.pem", False),
    ],
)
def test_sns_signing_certificates_come_only_from_snss_own_hosts(url: str, allowed: bool) -> None:
    """The default allow-list of SigningCertURL hosts (``sns\\.[a-z0-9-]+\\.
    amazonaws\\.com``) let in S3 endpoints: a bucket named "sns" on
    ``sns.s3-ap-southeast-2.amazonaws.com`` serves its owner's certificate
    over a valid TLS chain, and a post signed with its key was taken as SNS's
    (forged bounces and complaints suppressing addresses). Only SNS's regional
    hosts are allowed by default, and only its certificate file names."""
    import asyncio
    from types import SimpleNamespace

    from fastsend.serve import provider_events as pev

    asked: list[str] = []

    class Session:  # records what would be fetched; the test has no network
        def get(self, u: str, **kw: Any) -> Any:
            asked.append(u)
            raise OSError("no network here")

    ctx = SimpleNamespace(config=SimpleNamespace(api=SimpleNamespace(body_timeout=10.0)))
    pe = pev.ProviderEvents(ctx, pev.ProviderEventSettings(sns_topics=("arn:aws:sns:x:1:t",)))
    pe.session = Session()
    with pytest.raises(pev._Unauthorized):
        asyncio.run(pe._cert_key(url))
    assert bool(asked) is allowed, asked


def _counting_mailgun(state: dict[str, int]) -> Any:
    """Mailgun's messages.mime that counts the requests it holds at once."""
    import asyncio

    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        try:
            await request.read()
            await asyncio.sleep(0.005)
            state["n"] += 1
            return web.json_response({"id": f"<{state['n']}@mg>", "message": "Queued. Thank you."})
        finally:
            state["now"] -= 1

    app = web.Application(client_max_size=30 * 1024 * 1024)
    app.router.add_post("/v3/{domain}/messages.mime", handle)
    return app


@pytest.mark.parametrize("conns,workers", [(1, 2), (3, 2)])
def test_max_connections_holds_across_workers(tmp_path: Path, conns: int, workers: int) -> None:
    """``max_connections`` is the transport's requests in flight across all
    workers (examples/fastsend.toml). Each worker took ``ceil(total /
    workers)``: 1 over 2 workers was 2 requests at once, 3 over 2 was 4. Now
    the parts add up to the total, and with fewer requests than workers they
    share places (transports.slots): both workers send, never more at once."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"m{i}@example.{('net', 'org', 'com')[i % 3]}" for i in range(400)]
    rcpts = write_recipients(tmp_path, addrs)
    state = {"now": 0, "max": 0, "n": 0}
    with ThreadedApp(_counting_mailgun(state)) as app:
        cfg = (
            "[delivery]\nbatch_size = 20\n"  # claims shared by both workers
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            f'max_connections = {conns}\ndomain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "k"},
                    "--max-wait", "5", "--no-dkim", "--workers", str(workers))  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == len(addrs) and state["n"] == len(addrs), (s, proc.stderr[-2000:])
    assert 1 <= state["max"] <= conns, state


@pytest.mark.parametrize("conns", [1, 3])
def test_a_relays_max_connections_holds_across_workers_and_source_ips(
    tmp_path: Path, conns: int
) -> None:
    """A relay's ``max_connections`` is its sessions across all workers
    (examples/fastsend.toml). Each (worker, source IP) lane took at least one:
    two workers with two addresses each held 4 sessions with a relay set to 1
    (and to 3). Now each session holds one of the node's places
    (transports.slots) and the mail still all goes, once."""
    import ssl

    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP
    from tests.test_transports_relay import ENV, Relay, RelayHandler, authenticator, relay_config

    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"s{i}@example.{('net', 'org', 'com')[i % 3]}" for i in range(300)]
    rcpts = write_recipients(tmp_path, addrs)
    state = {"max": 0}
    open_: set[int] = set()  # sessions (STARTTLS calls connection_made again)

    class Counting(SMTP):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            open_.add(id(self))
            state["max"] = max(state["max"], len(open_))
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            open_.discard(id(self))
            super().connection_lost(exc)

    class CountingController(Controller):  # type: ignore[misc]
        def factory(self) -> SMTP:
            return Counting(self.handler, **self.SMTP_kwargs)

    handler = RelayHandler()
    relay = Relay(handler, ctx, implicit=False)
    relay.controller = CountingController(
        handler, hostname="127.0.0.1", port=relay.port, authenticator=authenticator(handler),
        auth_required=True, decode_data=False, tls_context=ctx, require_starttls=True,
        auth_require_tls=True,
    )  # fmt: skip
    with relay:
        ips = '[ips]\nsource = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]\n'
        cfg = "[delivery]\nbatch_size = 20\n" + ips + relay_config(
            relay.port, ca_path, retry=False
        ).replace("max_connections = 8", f"max_connections = {conns}")
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "5", "--no-dkim",
                    "--workers", "2")  # fmt: skip
    s = summary(proc)
    got = Counter(r for rs, _ in handler.messages for r in rs)
    assert s["delivered"] == len(addrs) and got == Counter(addrs), (s, proc.stderr[-2000:])
    assert 1 <= state["max"] <= conns, state


def test_slots_hold_across_processes_and_a_killed_holder_frees_its_place(tmp_path: Path) -> None:
    """transports.slots: a place held by one worker process is refused to
    another; the holder sees that one waiting; a holder killed (-9) frees its
    place without any cleanup of its own (the kernel drops its locks)."""
    import os
    import signal

    from fastsend.transports.slots import Slots

    path = str(tmp_path / "transport-slots" / "relay1")
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # worker 0: takes the only place, then answers "is another waiting?"
        try:
            mine = Slots(path, 0, 1)
            os.write(from_child, b"1" if mine.acquire() == 0 else b"0")
            while os.read(to_child, 1) == b"?":
                os.write(from_child, b"y" if mine.others_waiting(2) else b"n")
        finally:
            os._exit(0)
    try:
        assert os.read(to_parent, 1) == b"1"
        me = Slots(path, 1, 1)  # worker 1
        assert os.write(from_parent, b"?") and os.read(to_parent, 1) == b"n"
        assert me.acquire() is None and me.wanting
        assert os.write(from_parent, b"?") and os.read(to_parent, 1) == b"y"
        me.unwant()
        assert os.write(from_parent, b"?") and os.read(to_parent, 1) == b"n"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert me.acquire() == 0  # freed by the kernel at the holder's death
