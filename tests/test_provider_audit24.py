"""Providers and relays, session 24's audit: a relay that refuses us (not the
recipient) defers and fails over instead of bouncing."""

from __future__ import annotations

import hashlib
import hmac
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from tests import test_transports_relay
from tests._engine_helpers import summary, write_recipients
from tests._provider_servers import (
    MAILGUN_SIGNING,
    Recorder,
    ThreadedApp,
    mailgun_app,
    mailgun_serve_config,
    submit_hello,
)
from tests._serve_helpers import Served, http
from tests.test_transports_http import dkim_campaign, events, send
from tests.test_transports_relay import ENV, PASSWORD, USER, Relay, RelayHandler, relay_config

from fastsend.outcome import FAILED, Outcome
from fastsend.transports.relay import refused_us

certs = test_transports_relay.certs  # its trustme CA and relay certificate (a fixture)


class RefusingRelay(RelayHandler):
    """A relay that takes our login but will not relay for it: ``at`` "rcpt"
    answers every RCPT ``reply``, "mail" answers MAIL FROM."""

    def __init__(self, reply: str, at: str = "rcpt") -> None:
        super().__init__()
        self.reply, self.at = reply, at

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.at == "mail":
            return self.reply
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return self.reply.replace("ADDR", address)


def _shaping(tmp: Path) -> list[dict[str, Any]]:
    p = tmp / "spool" / "shaping.jsonl"
    return [orjson.loads(x) for x in p.read_bytes().splitlines() if x.strip()] if p.exists() else []


def test_a_relay_refusing_to_relay_fails_over_and_bounces_no_one(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path]
) -> None:
    """Route ``["relay1", "relay2"]``: relay1 takes the login and answers every
    RCPT "554 5.7.1 <a>: Relay access denied" (Postfix refusing a client it does
    not relay for). That is relay1's configuration, not the recipient: every
    message goes on to relay2, no bounce, no address suppressed, and a shaping
    event says relay1 refused us. Before, every message bounced ("norelaying")
    at relay1, lost, and relay2 was never tried."""
    ctx, ca = certs
    camp, _ = dkim_campaign(tmp_path)
    addrs = [f"u{i}@example.{('net', 'org')[i % 2]}" for i in range(6)]
    rcpts = write_recipients(tmp_path, addrs)
    bad = RefusingRelay("554 5.7.1 <ADDR>: Relay access denied")
    good = RelayHandler()
    with Relay(bad, ctx, implicit=False) as r1, Relay(good, ctx, implicit=False) as r2:
        cfg = relay_config(r1.port, ca).replace('"*" = "relay1"', '"*" = ["relay1", "relay2"]')
        cfg += (
            f'[transports.relay2]\nkind = "relay"\nhost = "127.0.0.1"\nport = {r2.port}\n'
            f'ca_file = "{ca}"\n'
        )
        env = {**ENV, "FASTSEND_RELAY2_USERNAME": USER, "FASTSEND_RELAY2_PASSWORD": PASSWORD}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"], s["suppressed"]) == (6, 0, 0), s
    assert Counter(r for rs, _ in good.messages for r in rs) == Counter(addrs)
    evs = events(tmp_path)
    assert not [e for e in evs if e["event"] == "bounced"]
    fo = [e for e in evs if e["event"] == "failover"]
    assert sorted(e["rcpt"] for e in fo) == sorted(addrs)
    assert all(e["from"] == "relay1" and e["to"] == "relay2" and e["code"] == 554 for e in fo)
    told = [e for e in _shaping(tmp_path) if e.get("action") == "relay refused us"]
    assert told and told[0]["transport"] == "relay1" and "Relay access denied" in told[0]["text"]


def test_a_relay_wanting_auth_defers_instead_of_bouncing(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path]
) -> None:
    """One relay, answering MAIL FROM "530 5.7.0 Authentication required" (a
    relay that wants another login, or whose AUTH we did not do): every message
    deferred, with the relay's reply, nothing bounced or suppressed. Before,
    each was a permanent failure at "mail": the whole list bounced."""
    ctx, ca = certs
    camp, _ = dkim_campaign(tmp_path)
    addrs = ["a@example.net", "b@example.org"]
    rcpts = write_recipients(tmp_path, addrs)
    bad = RefusingRelay("530 5.7.0 Authentication required", at="mail")
    with Relay(bad, ctx, implicit=False) as r1:
        cfg = "[retry]\nmin_backoff = 60\nmax_backoff = 60\n" + relay_config(
            r1.port, ca, retry=False
        )
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "1", "--no-dkim")
    s = summary(proc)
    assert (s["delivered"], s["bounced"], s["suppressed"]) == (0, 0, 0), s
    evs = events(tmp_path)
    assert not [e for e in evs if e["event"] == "bounced"]
    dfr = [e for e in evs if e["event"] == "deferred"]
    assert sorted(e["rcpt"] for e in dfr) == sorted(addrs)
    assert all(e["code"] == 530 and "relay relay1 refused us" in e["text"] for e in dfr), dfr


def test_which_relay_refusals_are_about_us() -> None:
    def o(code: int, enhanced: str, text: str, stage: str = "rcpt") -> Outcome:
        return Outcome(FAILED, code, enhanced, text, stage, "relay:r[127.0.0.1]:25")

    ours = [
        o(554, "5.7.1", "<a@b.example>: Relay access denied"),
        o(550, "5.7.54", "SMTP; Unable to relay recipient in non-accepted domain"),
        o(550, "5.7.64", "TenantAttribution; Relay Access Denied"),
        o(550, "5.7.1", "Relaying denied. Proper authentication required."),
        o(550, "", "relay not permitted"),
        o(
            530,
            "5.7.57",
            "Client was not authenticated to send anonymous mail during MAIL FROM",
            "mail",
        ),
        o(553, "5.7.1", "<x@y.example>: Sender address rejected: not owned by user alice", "mail"),
        o(550, "5.7.60", "SMTP; Client does not have permissions to send as this sender", "mail"),
        o(
            554,
            "",
            "Message rejected: Email address is not verified. The following identities"
            " failed the check in region EU-WEST-1: x@y.example",
            "data",
        ),
    ]
    theirs = [
        o(
            550,
            "5.1.1",
            "<a@b.example>: Recipient address rejected: User unknown in relay recipient table",
        ),
        o(552, "5.2.2", "Mailbox full"),
        o(550, "5.7.1", "Message rejected as spam", "data"),
    ]
    assert [refused_us(x) for x in ours] == [True] * len(ours)
    assert [refused_us(x) for x in theirs] == [False] * len(theirs)


def _mailgun_post(signing_key: str, event: dict[str, Any], token: str) -> bytes:
    ts = str(int(time.time()))
    sig = hmac.new(signing_key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return orjson.dumps({"signature": {"timestamp": ts, "token": token, "signature": sig},
                         "event-data": event})  # fmt: skip


def _until(what: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := what():
            return got
        time.sleep(0.1)
    raise TimeoutError


def test_an_unanswered_provider_request_is_settled_by_the_providers_event(
    tmp_path: Path,
) -> None:
    """`fastsend serve` through Mailgun, whose answers come later than
    ``answer_timeout``: each request is sent, unanswered (an unknown outcome,
    deferred and due again after min_backoff). Mailgun's signed event for a
    message, posted to /webhooks/mailgun, shows it has it: the message is
    delivered (a "delivered" event, ``settled``) and never sent again, whether
    the event came while the request was still waiting for its answer (kept
    until its outcome is recorded) or once it was deferred. Before, the event
    was recorded and the message stayed deferred: the retry sent it a second
    time. Mailgun's "rejected" (its refusal of the request) settles nothing; an
    event about a message already final changes nothing."""
    signing = MAILGUN_SIGNING
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com", delay=8.0)) as mg:
        extra = mailgun_serve_config(tmp_path, mg.url, answer_timeout=3, backoff=8)
        srv = Served(tmp_path, "mg", extra=extra)
        try:
            to = ["late@example.net", "other@example.net", "early@example.net"]
            ids = dict(zip(to, submit_hello(srv, to), strict=True))

            def post(event: str, rcpt: str, token: str) -> None:
                ev = {"event": event, "recipient": rcpt,
                      "user-variables": {"fastsend": tokens[rcpt]},
                      "message": {"headers": {"message-id": "x@mg.sender.example.com"}}}  # fmt: skip
                raw = _mailgun_post(signing, ev, token * 50)
                st, _ = http("POST", srv.base + "/webhooks/mailgun", raw=raw)
                assert st == 200

            def row(rcpt: str) -> dict[str, Any]:
                return srv.req("GET", f"/v1/messages/{ids[rcpt]}", tenant="acme")[1]

            _until(lambda: len(rec.accepted) == 3)  # the three requests wait for answers
            tokens = {rcpts[0]: tok for rcpts, _data, tok in rec.accepted}
            post("accepted", "early@example.net", "e")  # (its request still unanswered)
            _until(lambda: row("late@example.net")["state"] == "deferred")
            _until(lambda: row("other@example.net")["state"] == "deferred")
            post("accepted", "late@example.net", "t")
            post("rejected", "other@example.net", "u")
            for rcpt in ("early@example.net", "late@example.net"):
                m = _until(lambda r=rcpt: (m := row(r))["state"] != "inflight" and m)
                assert m["state"] == "delivered", m
                done = [e for e in m["events"] if e["event"] == "delivered"]
                assert len(done) == 1 and done[0]["settled"] and "mailgun" in done[0]["text"]
            # The retry comes for the other one only (its "rejected" proves nothing).
            _until(lambda: rec.requests >= 4, 30)
            time.sleep(2)
            assert Counter(r for rcpts, _d, _t in rec.accepted for r in rcpts) == Counter(
                {"late@example.net": 1, "other@example.net": 2, "early@example.net": 1}
            )
            post("delivered", "late@example.net", "v")  # later: nothing changes
            late = row("late@example.net")
            assert [e["event"] for e in late["events"]].count("delivered") == 1
        finally:
            srv.stop()


def test_settle_makes_only_deferred_unclaimed_messages_delivered(make_spool: Any) -> None:
    """Spool.settle on SQLite and Redis: of the ids it is given, those deferred
    and not claimed are delivered (250 2.0.0, the text, out of the due set,
    counted); queued and final ones are left as they are, and one in flight is
    settled by settle_taken once its (unknown) outcome is recorded; asked
    again, nothing more."""
    from tests._engine_helpers import spool_rows

    from fastsend.spool.base import BOUNCED, DEFERRED, Result

    s = make_spool()
    cid = s.create_campaign({"from": "a@b.example"}, name="c1")
    now = time.time()
    ids = s.add_messages(cid, spool_rows(5), now)
    got = [c.id for c in s.claim_due(now, 3)]
    s.record_results(
        [
            Result(got[0], DEFERRED, 1, now + 60, 0, "", "no answer (unknown)"),
            Result(got[1], BOUNCED, 1, 0, 550, "5.1.1", "no such user"),
        ],
        now,
    )
    queued = [i for i in ids if i not in got]
    assert s.settle([got[0], got[1], got[2], *queued, 10**9], "mailgun reported it") == [got[0]]
    m = s.message(got[0])
    assert m is not None and m["state"] == "delivered" and m["last_code"] == 250
    assert "mailgun reported it" in m["last_text"]
    assert [s.message(i)["state"] for i in (got[1], got[2])] == ["bounced", "inflight"]
    c = s.counts(cid)
    assert (c["delivered"], c["deferred"], c["inflight"], c["queued"]) == (1, 0, 1, 2)
    assert s.settle([got[0]], "again") == []
    assert got[0] not in {x.id for x in s.claim_due(now + 61, 100)}
    # The one in flight when the event came: its unknown outcome, once recorded,
    # is settled from what the event said (settle_taken), once.
    assert s.settle_taken([got[0], got[1]]) == {}
    s.record_results([Result(got[2], DEFERRED, 1, now + 60, 0, "", "no answer")], now)
    assert s.settle_taken([got[2]]) == {got[2]: "mailgun reported it"}
    assert s.message(got[2])["state"] == "delivered"
    assert s.settle_taken([got[2]]) == {}
    assert s.counts(cid)["delivered"] == 2
    s.close()


def test_ses_send_and_delay_events_settle_a_message_left_unanswered(tmp_path: Path) -> None:
    """SES event publishing's "Send" (SES took the request) and "DeliveryDelay"
    name no recipient's outcome: each is now a "provider" event per recipient,
    and a message whose SendRawEmail went unanswered (deferred) is settled
    delivered by it. Before, both were dropped without a trace (no record
    parsed) and the message was sent again at its retry."""
    import json

    from tests.test_provider_events import TOPIC, last_events, make_ctx

    from fastsend import msgid
    from fastsend.serve.provider_events import ProviderEvents, ProviderEventSettings
    from fastsend.spool.base import DEFERRED, Result

    ctx, ids = make_ctx(tmp_path, {"sns_topics": [TOPIC]})
    try:
        now = time.time()
        got = [c.id for c in ctx.spool.claim_due(now, 5)]
        unanswered = "no answer within 30 s after the request was sent"
        ctx.spool.record_results(
            [Result(i, DEFERRED, 1, now + 300, 0, "", unanswered) for i in got], now
        )
        pe = ProviderEvents(ctx, ProviderEventSettings.of(ctx.config))

        def mail(i: int) -> dict[str, Any]:
            tok = msgid.token(ids[i], ctx.secret)
            return {"messageId": "0102-x", "destination": [f"u{i}@example.net"],
                    "tags": {"fastsend": [tok]},
                    "commonHeaders": {"messageId": f"<{tok}@x.example>"}}  # fmt: skip

        assert pe._ses_message(json.dumps({"eventType": "Send", "mail": mail(1), "send": {}})) == 1
        delay = {"eventType": "DeliveryDelay", "mail": mail(2),
                 "deliveryDelay": {"delayType": "MailboxFull",
                                   "delayedRecipients": [{"emailAddress": "u2@example.net"}]}}  # fmt: skip
        assert pe._ses_message(json.dumps(delay)) == 1
        states = {i: ctx.spool.message(i)["state"] for i in ids}
        assert [states[i] for i in ids] == [
            "deferred", "delivered", "delivered", "deferred", "deferred"
        ]  # fmt: skip
        evs = [e for e in last_events(ctx, 4) if e["event"] == "delivered"]
        assert sorted(e["id"] for e in evs) == [ids[1], ids[2]]
        assert all(e["settled"] and e["tenant"] == "acme" for e in evs), evs
    finally:
        ctx.close()


def test_a_provider_refusing_our_account_defers_whatever_the_4xx() -> None:
    """Mailgun answering 402 (Payment Required: its "Request failed" for a
    limited or unpaid account), 420 or a 400 saying our domain is over its
    sending limit: our account, not the message or the recipient -- deferred,
    nothing bounced. Before, any 4xx but a handful bounced every message sent
    while it lasted (lost). A 400 about the recipient, a 413 and a 422 still
    bounce."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import DEFERRED, Envelope
    from fastsend.transports.mailgun import MailgunTransport

    answers = [
        (402, "Request failed"),
        (420, "Domain mg.example.com has exceeded its hourly sending limit"),
        (400, "Domain mg.example.com is not allowed to send: daily sending limit reached"),
        (423, "Locked"),
        (400, "'to' parameter is not a valid address. please check documentation"),
        (413, "Request Entity Too Large"),
        (422, "Unprocessable Entity"),
    ]
    it = iter(answers)

    async def send(request: web.Request) -> web.Response:
        await request.read()
        status, text = next(it)
        return web.json_response({"message": text}, status=status)

    app = web.Application()
    app.router.add_post("/v3/{domain}/messages.mime", send)

    async def main(url: str) -> list[Any]:
        spec = TransportSpec(name="mg", kind="mailgun", endpoint=url, domain="mg.example.com",
                             secrets={"api_key": "mg-key-value"})  # fmt: skip
        t = MailgunTransport(spec, b"")
        out = []
        async with aiohttp.ClientSession() as session:
            for n in range(len(answers)):
                env = Envelope(
                    "a@mg.example.com", [f"r{n}@example.net"], b"Subject: x\r\n\r\nx\r\n", n + 1
                )
                ans = await t.send(session, [env])
                assert isinstance(ans, list), ans
                out.append(ans[0].outcomes[0])
        return out

    with ThreadedApp(app) as srv:
        outs = asyncio.run(main(srv.url))
    kinds = [o.kind for o in outs]
    assert kinds == [DEFERRED] * 4 + [FAILED] * 3, [(o.kind, o.text) for o in outs]
    assert "sending limit" in outs[1].text and "HTTP 402" in outs[0].text


class _Refuses:
    """An SMTP server (aiosmtpd handler) refusing every RCPT as Postfix does a
    client it does not relay for."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return f"554 5.7.1 <{address}>: Relay access denied"


def test_a_smarthost_refusing_to_relay_defers_but_an_mx_refusing_bounces(
    tmp_path: Path, dns_server: Any
) -> None:
    """A static route (``--route '*=HOST:PORT'``, a smarthost) answering "554
    5.7.1 Relay access denied" refuses us: deferred, nothing bounced. The same
    answer from a domain's own MX (found by DNS) is that domain refusing the
    recipient: bounced, as before."""
    from aiosmtpd.controller import Controller
    from tests.conftest import free_port

    camp, _ = dkim_campaign(tmp_path)
    port = free_port()
    ctl = Controller(_Refuses(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        rcpts = write_recipients(tmp_path, ["a@example.net", "b@example.org"])
        cfg = "[retry]\nmin_backoff = 60\nmax_backoff = 60\n"
        proc = send(tmp_path, camp, rcpts, cfg, {}, "--route", f"*=127.0.0.1:{port}",
                    "--max-wait", "1", "--no-dkim")  # fmt: skip
        s = summary(proc)
        assert (s["delivered"], s["bounced"]) == (0, 0), (s, proc.stderr[-2000:])
        dfr = [e for e in events(tmp_path) if e["event"] == "deferred"]
        assert len(dfr) == 2 and all("refused us" in e["text"] for e in dfr), dfr
        mx = tmp_path / "mx"
        mx.mkdir()
        dns_server.set_zones(
            {"dest.test": [("MX", "10 mx.dest.test.")], "mx.dest.test": [("A", "127.0.0.1")]}
        )
        rcpts = write_recipients(mx, ["c@dest.test"])
        cfg += f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        cfg += "[delivery]\nallow_private_mx = true\n"
        proc = send(mx, camp, rcpts, cfg, {}, "--max-wait", "1", "--no-dkim")
        assert summary(proc)["bounced"] == 1, proc.stderr[-2000:]
    finally:
        ctl.stop()
