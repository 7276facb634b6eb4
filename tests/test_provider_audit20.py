"""Provider transports audited from outside (session 20): what an operator
meets with a wrong or revoked key, and what the providers' documented
answers mean for the mail behind them."""

from __future__ import annotations

from pathlib import Path

import orjson
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
