"""Provider transports audited from outside (session 20): what an operator
meets with a wrong or revoked key, and what the providers' documented
answers mean for the mail behind them."""

from __future__ import annotations

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
