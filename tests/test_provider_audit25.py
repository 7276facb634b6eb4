"""Providers and relays, session 25's audit (prov25).

- A transport's ``endpoint`` (or a relay's ``host``) carrying
  ``user:password@`` was taken: the plain-http refusal quoted the password,
  and the request could never be made right (aiohttp refuses a URL's
  credentials beside the transport's own auth). It is refused at load, and no
  refusal quotes it.
- A request throttled (429, 503) past the lane's patience (``MAX_THROTTLES``
  throttles of one message, or a Retry-After past the ready horizon) was
  answered deferred: an attempt, its backoff doubling and its retry budget
  spent, though nothing was sent. It is handed back unattempted (to the
  route's next transport first), due when the pause ends.
- ``Spool.settle`` (a provider's event shows it has a message left
  unanswered) committed the delivery, and its "delivered" event was written
  after: a kill in between left a delivery no event ever told. The settled
  ids are noted untold in the same transaction (script call on Redis), as
  recorded outcomes are, and the next start tells them.
- Proven: a provider's event for a message whose request is in flight, then
  the worker (or, on a Redis spool, the whole node) that sent it killed: the
  message is delivered (settled) when its unknown outcome is recorded (by the
  supervisor, or the node taking the dead node's window back), never sent
  again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from tests._engine_helpers import run_fastsend, summary, write_recipients
from tests._provider_servers import (
    MAILGUN_SIGNING,
    Recorder,
    ThreadedApp,
    mailgun_app,
    mailgun_serve_config,
    submit_hello,
)
from tests.test_transports_http import events, send

from fastsend.config import ConfigError, from_dict

PW = "Sup3rS3cretPw"


def _cfg(transports: dict[str, object]) -> object:
    return from_dict({"routes": {"*": "t"}, "transports": transports})


@pytest.mark.parametrize(
    "kind,endpoint",
    [
        ("mailgun", f"http://api:{PW}@10.1.2.3:8080"),
        ("mailgun", f"https://api:{PW}@api.mailgun.example"),
        ("sendgrid", f"https://apikey:{PW}@api.sendgrid.example:443/"),
        ("ses", f"https://{PW}@email.eu-west-1.amazonaws.com"),
        ("ses", f"https://:{PW}@127.0.0.1:8443"),
        ("sendgrid", f"https://api.sendgrid.example?key={PW}"),
        ("sendgrid", f"https://api.sendgrid.example#{PW}"),
        ("mailgun", f"https://api.mailgun.example:99999{PW}"),
    ],
)
def test_an_endpoint_with_credentials_or_more_than_a_host_is_refused_unquoted(
    monkeypatch: pytest.MonkeyPatch, kind: str, endpoint: str
) -> None:
    monkeypatch.setenv("MAILGUN_API_KEY", "key-0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("MAILGUN_DOMAIN", "mg.example.com")
    monkeypatch.setenv("SENDGRID_API_KEY", "SG.aaaaaaaaaa.bbbbbbbbbb")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secretexample")
    t: dict[str, object] = {"kind": kind, "endpoint": endpoint}
    if kind == "ses":
        t["region"] = "eu-west-1"
    with pytest.raises(ConfigError) as exc:
        _cfg({"t": t})
    assert PW not in str(exc.value)
    assert "endpoint" in str(exc.value)
    # and the same endpoint without them is taken
    if "@" in endpoint:
        t["endpoint"] = endpoint.replace(endpoint.partition("//")[2].partition("@")[0] + "@", "")
        if t["endpoint"].startswith("http://"):  # type: ignore[union-attr]
            t["auth_in_clear"] = True
        _cfg({"t": t})


def test_a_relay_host_with_credentials_is_refused_unquoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTSEND_T_USERNAME", "u")
    monkeypatch.setenv("FASTSEND_T_PASSWORD", "p")
    for host in (f"u:{PW}@relay.example.net", f"smtp://relay.example.net/{PW}"):
        with pytest.raises(ConfigError, match="host must be a host name") as exc:
            _cfg({"t": {"kind": "relay", "host": host}})
        assert PW not in str(exc.value)
    _cfg({"t": {"kind": "relay", "host": "relay.example.net"}})
    # The binary refuses it before anything is sent, and says nothing of the password.
    f = tmp_path / "fastsend.toml"
    f.write_text(
        '[routes]\n"*" = "mg"\n[transports.mg]\nkind = "mailgun"\ndomain = "mg.example.com"\n'
        f'endpoint = "http://api:{PW}@10.1.2.3:8080"\n'
    )
    res = run_fastsend("check-config", "-c", str(f))
    assert res.returncode != 0, res
    assert "user or password" in res.stderr and PW not in res.stdout + res.stderr, res


def _attempts(tmp: Path) -> dict[str, int]:
    with sqlite3.connect(tmp / "spool" / "spool.db") as db:
        return dict(db.execute("SELECT rcpt, attempts FROM messages"))


def _throttled_run(tmp: Path, retry_after: str, n: int, max_wait: str) -> tuple[Any, Recorder]:
    camp = tmp / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s"\ntext = "t"\n')
    rcpts = write_recipients(tmp, [f"t{i}@example.net" for i in range(n)])
    rec = Recorder(throttle_first=1 << 30)  # every request: 429
    rec.retry_after = retry_after
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = (
            "[retry]\nmin_backoff = 1\nmax_backoff = 2\n"
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\nmax_connections = 1\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", max_wait, "--no-dkim", "--workers", "1")  # fmt: skip
    return proc, rec


def test_a_retry_after_past_the_horizon_spends_no_attempt(tmp_path: Path) -> None:
    """Every request answered 429 with Retry-After: 600 (past the 10 s ready
    horizon): nothing is sent, so nothing is an attempt: no message deferred,
    every message's attempts 0. Before, the throttled request's own message was
    answered deferred (attempt 1, 421 4.7.0) and only the rest handed back."""
    proc, rec = _throttled_run(tmp_path, "600", 3, "3")
    assert rec.throttled >= 1 and not rec.accepted
    s = summary(proc)
    assert s["delivered"] == 0 and s["deferrals"] == 0, (s, proc.stderr[-2000:])
    assert not [e for e in events(tmp_path) if e["event"] in ("deferred", "bounced")]
    assert set(_attempts(tmp_path).values()) == {0}, _attempts(tmp_path)


def test_a_message_throttled_again_and_again_spends_no_attempt(tmp_path: Path) -> None:
    """Every request answered 429 with Retry-After: 1: after MAX_THROTTLES (8)
    throttles of the message the lane gives it up, and it goes back to the
    queue unattempted, due when the pause ends, and is tried again. Before,
    it was answered deferred: attempt 1, then its backoff (here 1 s) and again."""
    from fastsend.transports.http import MAX_THROTTLES

    proc, rec = _throttled_run(tmp_path, "1", 1, "16")
    assert rec.throttled > MAX_THROTTLES, rec.throttled  # given up at least once
    s = summary(proc)
    assert s["deferrals"] == 0, (s, proc.stderr[-2000:])
    assert not [e for e in events(tmp_path) if e["event"] in ("deferred", "bounced")]
    assert _attempts(tmp_path) == {"t0@example.net": 0}


def test_a_settled_delivery_is_told_after_a_kill_before_its_event(make_spool: Any) -> None:
    """SQLite and Redis: a message settled delivered (``settle``: deferred when
    the event came; ``settle_taken``: in flight when it came, recorded deferred
    after) and the process killed before its "delivered" event is out: the next
    start finds it untold, delivered, and tells it once. Before, ``untold`` was
    empty: the spool said delivered and the event log, webhooks and index never
    did. Told (the event written), nothing is left."""
    from tests._engine_helpers import spool_rows

    from fastsend.spool.base import DEFERRED, DELIVERED, Result

    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"}, name="c1")
    now = time.time()
    s.add_messages(cid, spool_rows(4), now)
    got = [c.id for c in s.claim_due(now, 4)]
    unknown = [Result(i, DEFERRED, 1, now + 60, 0, "", "no answer (unknown)") for i in got[:2]]
    s.record_results(unknown, now)
    assert s.settle([got[0]], "mailgun reported it (accepted)") == [got[0]]
    assert s.settle([got[2]], "mailgun reported it (accepted)") == []  # in flight: kept
    s.record_results([Result(got[2], DEFERRED, 1, now + 60, 0, "", "no answer")], now)
    assert s.settle_taken([got[2]]) == {got[2]: "mailgun reported it (accepted)"}
    # killed here, before the two "delivered" events were written
    again = make_spool()
    rows = {u.id: u for u in again.untold()}
    assert set(rows) == {got[0], got[2]}, rows
    assert all(u.state == DELIVERED and u.code == 250 for u in rows.values()), rows
    assert "mailgun reported it" in rows[got[0]].text
    again.told(list(rows))
    assert again.untold() == []
    again.close()
    # The normal path: settled, the event written, told: nothing left for a start.
    assert s.settle([got[1]], "sendgrid reported it (processed)") == [got[1]]
    s.told()
    later = make_spool()
    assert later.untold() == []
    later.close()
    s.close()


def test_the_providers_event_settles_mail_of_a_worker_killed_while_waiting(
    tmp_path: Path,
) -> None:
    """`fastsend serve` through Mailgun, whose answer comes late: the request is
    sent and waits. Mailgun's signed "accepted" event for the message arrives
    (kept: the message is in flight), then the worker that sent it is killed
    (-9). The supervisor records the dead worker's message as an attempt of
    unknown outcome, due at once -- and the event settles it there: delivered
    (a "delivered" event, ``settled``), and Mailgun never gets it a second time
    from the new worker."""
    import signal

    import psutil
    from tests._serve_helpers import Served, http, until
    from tests.test_provider_audit24 import _mailgun_post

    signing = MAILGUN_SIGNING
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com", delay=600.0)) as mg:
        extra = mailgun_serve_config(tmp_path, mg.url, answer_timeout=900, backoff=1)
        srv = Served(tmp_path, "mg", extra=extra)
        try:
            (mid,) = submit_hello(srv, ["w@example.net"])
            until("the request at Mailgun", lambda: len(rec.accepted) == 1)
            (_rcpts, _data, token), = rec.accepted
            ev = {"event": "accepted", "recipient": "w@example.net",
                  "user-variables": {"fastsend": token},
                  "message": {"headers": {"message-id": "x@mg.sender.example.com"}}}  # fmt: skip
            st, _ = http("POST", srv.base + "/webhooks/mailgun",
                         raw=_mailgun_post(signing, ev, "k" * 50))  # fmt: skip
            assert st == 200
            row = srv.req("GET", f"/v1/messages/{mid}", tenant="acme")[1]
            assert row["state"] == "inflight", row  # its request still waits for the answer
            # The worker holding the request: the child of serve connected to Mailgun.
            sender = [
                p for p in psutil.Process(srv.proc.pid).children()
                if any(c.raddr and c.raddr[1] == mg.port for c in p.net_connections("tcp"))
            ]
            assert len(sender) == 1, sender
            sender[0].send_signal(signal.SIGKILL)

            def final() -> Any:
                m = srv.req("GET", f"/v1/messages/{mid}", tenant="acme")[1]
                return m if m["state"] not in ("inflight", "queued") else None

            m = until("the message's outcome", final)
            assert m["state"] == "delivered", m
            done = [e for e in m["events"] if e["event"] == "delivered"]
            assert len(done) == 1 and done[0].get("settled"), m["events"]
            assert "mailgun" in done[0]["text"], done
            assert rec.requests == 1, rec.requests  # never sent again
        finally:
            srv.stop()


def test_the_providers_event_settles_mail_of_a_node_killed_while_waiting(
    tmp_path: Path, redis_server: Any
) -> None:
    """Two `serve` nodes on one Redis spool, through Mailgun answering late.
    The node whose worker sent the message's request is killed whole (-9)
    after Mailgun's "accepted" event for it reached the other node (kept: in
    flight). The surviving node takes the dead node's window back once its
    lease lapses (an attempt of unknown outcome) and the event settles it:
    delivered (``settled``), never sent a second time."""
    import signal

    import psutil
    from tests._serve_helpers import Served, http, until
    from tests.test_provider_audit24 import _mailgun_post

    signing = MAILGUN_SIGNING
    rec = Recorder()
    url = redis_server.url(lease="2")
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com", delay=600.0)) as mg:
        extra = mailgun_serve_config(tmp_path, mg.url, answer_timeout=900, backoff=1)
        nodes: list[Served] = []
        try:
            for n in ("a", "b"):
                (tmp_path / n).mkdir()
                nodes.append(Served(tmp_path / n, "mg", extra=extra,
                                    spool_url=url + f"&node={n}&dir={tmp_path}/{n}/spool",
                                    serve_args=("--allow-volatile",)))  # fmt: skip
            (mid,) = submit_hello(nodes[0], ["n@example.net"])
            until("the request at Mailgun", lambda: len(rec.accepted) == 1)
            (_rcpts, _data, token), = rec.accepted

            def sends(s: Served) -> bool:
                return any(
                    c.raddr and c.raddr[1] == mg.port
                    for p in psutil.Process(s.proc.pid).children()
                    for c in p.net_connections("tcp")
                )

            (dying,) = [s for s in nodes if sends(s)]
            (alive,) = [s for s in nodes if s is not dying]
            ev = {"event": "accepted", "recipient": "n@example.net",
                  "user-variables": {"fastsend": token},
                  "message": {"headers": {"message-id": "x@mg.sender.example.com"}}}  # fmt: skip
            st, _ = http("POST", alive.base + "/webhooks/mailgun",
                         raw=_mailgun_post(signing, ev, "n" * 50))  # fmt: skip
            assert st == 200
            row = alive.req("GET", f"/v1/messages/{mid}", tenant="acme")[1]
            assert row["state"] == "inflight", row
            kids = psutil.Process(dying.proc.pid).children()
            dying.proc.send_signal(signal.SIGKILL)
            dying.proc.wait(30)
            for k in kids:  # (they die with it: PR_SET_PDEATHSIG; -9 to be sure)
                with contextlib.suppress(psutil.NoSuchProcess):
                    k.send_signal(signal.SIGKILL)

            def final() -> Any:
                m = alive.req("GET", f"/v1/messages/{mid}", tenant="acme")[1]
                done = m["state"] not in ("inflight", "queued", "deferred") or rec.requests > 1
                return m if done else None  # (deferred: taken back, settled next)

            m = until("the message's outcome", final, timeout=120)
            assert m["state"] == "delivered", m
            done = [e for e in m["events"] if e["event"] == "delivered"]
            assert len(done) == 1 and done[0].get("settled"), m["events"]
            assert rec.requests == 1, rec.requests  # never sent again
        finally:
            for s in reversed(nodes):
                s.stop()


@pytest.mark.parametrize(
    "status,text",
    [
        (400, "from parameter is not a valid address. please check documentation"),  # Mailgun
        (400, "'from' parameter is missing"),  # Mailgun
        (400, "The from email does not contain a valid address. (field from.email)"),  # SendGrid
        (403, "The from address does not match a verified Sender Identity."),  # SendGrid
        (422, "Sender address rejected: Domain not found"),
    ],
)
def test_a_provider_refusing_our_sender_defers_and_bounces_no_recipient(
    status: int, text: str
) -> None:
    """A provider's 4xx about the message's From or sender is about our
    configuration (the campaign's From, an unverified identity), never the
    recipient: deferred, with the provider's words. Before, a 400 or 422 of
    these bounced every message of the campaign (lost) as "filtered" or
    "onhold"."""
    from fastsend.outcome import DEFERRED, FAILED
    from fastsend.transports.http import map_status

    out = map_status("mg", status, text)
    assert out.kind == DEFERRED and out.code == 451, out
    assert text[:30] in out.text
    # What is about the recipient or the message still bounces.
    for refusal in ("to parameter is not a valid address: reject-1@example.net",
                    "Illegal address", "Message length is more than 10485760 bytes"):  # fmt: skip
        assert map_status("mg", 400, refusal).kind == FAILED, refusal
