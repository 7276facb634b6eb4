"""Provider event webhooks of ``fastsend serve``: posts signed the providers' way
(keys and certificates generated here) become events and suppressions; forged,
unsigned, tampered, stale and replayed posts are 401 and change nothing.

SES arrives through SNS: the signing certificate is served over HTTPS on
loopback (trustme CA) from a host on the configured allow-list; the
subscription is confirmed by fetching its SubscribeURL."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from fastsend import msgid
from fastsend.config import from_dict
from fastsend.serve.context import open_context
from fastsend.serve.provider_events import setup_provider_events

TOPIC = "arn:aws:sns:eu-west-1:123456789012:fastsend-ses"


def make_ctx(tmp: Path, section: dict[str, Any]) -> Any:
    cfg = from_dict({"spool": {"dir": str(tmp / "spool")}, "provider_events": section})
    ctx = open_context(cfg)
    cid = ctx.tenant_campaign("acme")
    ids = ctx.inject(cid, [(f"u{i}@example.net", "example.net", b'{"raw": ""}') for i in range(5)])
    return ctx, ids


def state(ctx: Any) -> tuple[int, list[str]]:
    ctx.events.flush()
    n = len(Path(ctx.config.event_log_path).read_bytes().splitlines())
    return n, sorted(e.address for e in ctx.suppression.list(tenant="acme"))


def last_events(ctx: Any, n: int) -> list[dict[str, Any]]:
    ctx.events.flush()
    return [orjson.loads(x) for x in Path(ctx.config.event_log_path).read_bytes().splitlines()[-n:]]


async def serve(
    app: web.Application, ssl_ctx: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"{'https' if ssl_ctx else 'http'}://127.0.0.1:{port}"


# ---------------------------------------------------------------- SendGrid


def test_sendgrid_event_webhook_ecdsa(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()  # fmt: skip
    ctx, ids = make_ctx(tmp_path, {"sendgrid_public_key": pub})
    tok = [msgid.token(i, ctx.secret) for i in ids]
    events = [
        {"email": "u0@example.net", "event": "bounce", "type": "bounce", "status": "5.1.1",
         "reason": "550 5.1.1 The email account that you tried to reach does not exist",
         "sg_message_id": "sg0.filter", "fastsend": tok[0], "timestamp": int(time.time())},
        {"email": "u1@example.net", "event": "spamreport", "fastsend": tok[1], "sg_message_id": "sg1"},
        {"email": "u2@example.net", "event": "delivered", "fastsend": tok[2], "sg_message_id": "sg2"},
        {"email": "u3@example.net", "event": "bounce", "type": "blocked", "status": "5.7.1",
         "reason": "550 5.7.1 blocked by policy", "fastsend": tok[3]},
        {"email": "u4@example.net", "event": "group_unsubscribe", "fastsend": tok[4]},
    ]  # fmt: skip
    body = json.dumps(events).encode()

    def signed(b: bytes, k: Any = key, ts: str | None = None) -> dict[str, str]:
        ts = ts or str(int(time.time()))
        sig = k.sign(ts.encode() + b, ec.ECDSA(hashes.SHA256()))
        return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": ts, "Content-Type": "application/json"}  # fmt: skip

    async def main() -> None:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        u = url + "/webhooks/sendgrid"
        try:
            async with aiohttp.ClientSession() as s:
                before = state(ctx)
                other = ec.generate_private_key(ec.SECP256R1())
                for headers, b in [
                    ({}, body),  # unsigned
                    (signed(body, other), body),  # forged: another key
                    (signed(body), body.replace(b"spamreport", b"delivered")),  # tampered
                    (signed(body, ts=str(int(time.time()) - 25 * 3600)), body),  # stale
                    ({**signed(body), "X-Twilio-Email-Event-Webhook-Signature": "!!"}, body),
                ]:
                    async with s.post(u, data=b, headers=headers) as r:
                        assert r.status == 401
                assert state(ctx) == before  # nothing changed
                h = signed(body)
                async with s.post(u, data=body, headers=h) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["events"] == 5
                async with s.post(u, data=body, headers=h) as r:
                    assert r.status == 401  # the same signed post again: a replay
        finally:
            await runner.cleanup()

    asyncio.run(main())
    evs = {e["rcpt"]: e for e in last_events(ctx, 5)}
    assert evs["u0@example.net"]["event"] == "bounced" and evs["u0@example.net"]["hard"]
    assert evs["u0@example.net"]["id"] == ids[0] and evs["u0@example.net"]["tenant"] == "acme"
    assert evs["u1@example.net"]["event"] == "complained"
    assert evs["u2@example.net"]["event"] == "provider"
    assert evs["u3@example.net"]["event"] == "bounced" and not evs["u3@example.net"]["hard"]
    assert evs["u4@example.net"]["event"] == "unsubscribed"
    assert evs["u4@example.net"]["method"] == "provider" and evs["u4@example.net"]["suppressed"]
    assert state(ctx)[1] == ["u0@example.net", "u1@example.net", "u4@example.net"]
    ctx.close()


def test_sendgrid_dropped_for_its_own_lists_suppresses_for_that_reason(tmp_path: Path) -> None:
    """SendGrid drops (never sends) mail to an address on its own lists and says
    why: "Bounced Address" (it bounced hard before), "Invalid", "Unsubscribed
    Address", "Spam Reporting Address". Each is a bounce of the message that
    suppresses the address for its reason (hard bounce, unsubscribe,
    complaint), so fastsend stops sending to it by any route. Before: a soft
    bounce, nothing suppressed (an unsubscribed recipient went on getting the
    tenant's mail through every other route). A drop about the message itself
    ("Spam Content") suppresses nothing."""
    key = ec.generate_private_key(ec.SECP256R1())
    pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()  # fmt: skip
    ctx, ids = make_ctx(tmp_path, {"sendgrid_public_key": pub})
    tok = [msgid.token(i, ctx.secret) for i in ids]
    reasons = ["Bounced Address", "Invalid", "Unsubscribed Address", "Spam Reporting Address",
               "Spam Content (if spam checker app enabled)"]  # fmt: skip
    events = [{"email": f"u{i}@example.net", "event": "dropped", "reason": r, "fastsend": tok[i],
               "sg_message_id": f"sg{i}", "timestamp": int(time.time())}
              for i, r in enumerate(reasons)]  # fmt: skip
    body = json.dumps(events).encode()

    async def main() -> None:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        ts = str(int(time.time()))
        sig = base64.b64encode(key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
        headers = {"X-Twilio-Email-Event-Webhook-Signature": sig,
                   "X-Twilio-Email-Event-Webhook-Timestamp": ts}  # fmt: skip
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.post(url + "/webhooks/sendgrid", data=body, headers=headers) as r,
            ):
                assert r.status == 200, await r.text()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    evs = {e["rcpt"]: e for e in last_events(ctx, 5)}
    assert all(e["event"] == "bounced" for e in evs.values()), evs
    assert [evs[f"u{i}@example.net"]["hard"] for i in range(5)] == [True, True, False, False, False]
    entries = {e.address: e.reason for e in ctx.suppression.list(tenant="acme")}
    assert entries == {"u0@example.net": "userunknown", "u1@example.net": "userunknown",
                       "u2@example.net": "unsubscribe", "u3@example.net": "complaint"}, entries  # fmt: skip
    ctx.close()


# ---------------------------------------------------------------- Mailgun


def test_mailgun_webhook_hmac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signing_key = "key-mailgun-signing-0123456789"
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {signing_key}\n")
    kf.chmod(0o600)
    ctx, ids = make_ctx(tmp_path, {"mailgun_signing_key_file": str(kf)})
    tok = [msgid.token(i, ctx.secret) for i in ids]

    def post_body(
        event: dict[str, Any],
        key: str = signing_key,
        ts: int | None = None,
        token: str | None = None,
    ) -> bytes:
        ts = ts or int(time.time())
        token = token or hashlib.sha256(str(time.monotonic_ns()).encode()).hexdigest()[:50]
        sig = hmac.new(key.encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()
        return json.dumps({"signature": {"timestamp": str(ts), "token": token, "signature": sig},
                           "event-data": event}).encode()  # fmt: skip

    failed = {"event": "failed", "severity": "permanent", "recipient": "u1@example.net",
              "delivery-status": {"code": 550, "message": "5.1.1 The email account does not exist"},
              "user-variables": {"fastsend": f"{tok[0]} {tok[1]}"},
              "message": {"headers": {"message-id": "20260101.1@mg.example.com"}}}  # fmt: skip
    temp = {**failed, "severity": "temporary", "recipient": "u2@example.net",
            "user-variables": {"fastsend": tok[2]}}  # fmt: skip
    complained = {
        "event": "complained",
        "recipient": "u3@example.net",
        "user-variables": {"fastsend": tok[3]},
    }

    async def main() -> None:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        u = url + "/webhooks/mailgun"
        try:
            async with aiohttp.ClientSession() as s:
                before = state(ctx)
                for b in [
                    json.dumps({"event-data": failed}).encode(),  # unsigned
                    post_body(failed, key="wrong-key"),  # forged
                    post_body(
                        failed, ts=int(time.time()) - 9 * 3600
                    ),  # past Mailgun's 8 h of retries
                    b"not json",
                ]:
                    async with s.post(u, data=b) as r:
                        assert r.status == 401
                assert state(ctx) == before  # nothing changed
                once = post_body(failed, token="t" * 50)
                async with s.post(u, data=once) as r:
                    assert r.status == 200, await r.text()
                async with s.post(u, data=once) as r:
                    assert r.status == 401  # the token again: a replay
                for ev in (temp, complained):
                    async with s.post(u, data=post_body(ev)) as r:
                        assert r.status == 200
        finally:
            await runner.cleanup()

    asyncio.run(main())
    evs = last_events(ctx, 3)
    assert evs[0]["event"] == "bounced" and evs[0]["hard"] and evs[0]["id"] == ids[1]
    assert evs[1]["event"] == "provider" and evs[1]["severity"] == "temporary"
    assert evs[2]["event"] == "complained" and evs[2]["id"] == ids[3]
    assert state(ctx)[1] == ["u1@example.net", "u3@example.net"]
    ctx.close()


def test_mailgun_temporary_failure_is_no_bounce_and_hides_no_later_one(tmp_path: Path) -> None:
    """Mailgun posts ``failed`` with severity ``temporary`` each time a receiver
    defers a message it goes on retrying: that is no bounce (the message may
    still be delivered). Before, it was recorded as the message's one "bounced"
    event, so the ``failed``/``permanent`` Mailgun posts when it gives up was
    taken for a repeat of it: not recorded, and the address never suppressed.
    Now the temporary failure is a "provider" event (recorded, nothing
    counted as a bounce) and the permanent one bounces and suppresses."""
    signing_key = "key-mailgun-signing-0123456789"
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {signing_key}\n")
    kf.chmod(0o600)
    ctx, ids = make_ctx(tmp_path, {"mailgun_signing_key_file": str(kf)})
    index = ctx.event_index()  # as serve's API sets it up: reports recorded once per message
    ctx.events.listeners.append(index.listener)
    ctx.acceptor.index = index
    tok = msgid.token(ids[2], ctx.secret)
    temp = {"event": "failed", "severity": "temporary", "recipient": "u2@example.net",
            "reason": "generic", "delivery-status": {"code": 451, "message": "4.7.1 Greylisted, try again later"},
            "user-variables": {"fastsend": tok}}  # fmt: skip
    perm = {**temp, "severity": "permanent", "reason": "bounce",
            "delivery-status": {"code": 550, "message": "5.1.1 The email account does not exist"}}  # fmt: skip

    def post_body(event: dict[str, Any]) -> bytes:
        ts, token = (
            str(int(time.time())),
            hashlib.sha256(str(time.monotonic_ns()).encode()).hexdigest(),
        )
        sig = hmac.new(signing_key.encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()
        return json.dumps({"signature": {"timestamp": ts, "token": token, "signature": sig},
                           "event-data": event}).encode()  # fmt: skip

    async def main() -> None:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                for ev in (temp, temp, perm):
                    async with s.post(url + "/webhooks/mailgun", data=post_body(ev)) as r:
                        assert r.status == 200, await r.text()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    evs = last_events(ctx, 3)
    assert [e["event"] for e in evs] == ["provider", "provider", "bounced"], evs
    assert evs[0]["provider_event"] == "failed" and evs[0]["severity"] == "temporary"
    assert evs[2]["hard"] and evs[2]["id"] == ids[2] and not evs[2].get("repeated"), evs[2]
    assert state(ctx)[1] == ["u2@example.net"]
    ctx.close()


# ---------------------------------------------------------------- SES via SNS


def sns_cert() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert.public_bytes(serialization.Encoding.PEM)


def sns_sign(doc: dict[str, Any], key: rsa.RSAPrivateKey, version: str = "2") -> dict[str, Any]:
    """Sign like SNS: the documented fields of the type, 'Name\\nvalue\\n' each."""
    if doc["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    text = "".join(f"{n}\n{doc[n]}\n" for n in names if n in doc)
    algo = hashes.SHA1() if version == "1" else hashes.SHA256()
    sig = key.sign(text.encode(), padding.PKCS1v15(), algo)
    return {**doc, "SignatureVersion": version, "Signature": base64.b64encode(sig).decode()}


def test_ses_events_through_sns(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    https = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(https)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    signing_key, pem = sns_cert()
    confirmed: list[str] = []

    async def cert(request: web.Request) -> web.Response:
        return web.Response(body=pem, content_type="application/x-pem-file")

    async def confirm(request: web.Request) -> web.Response:
        confirmed.append(request.query.get("Token", ""))
        return web.Response(text="<ConfirmSubscriptionResponse/>")

    async def main() -> None:
        sns = web.Application()
        sns.router.add_get("/SimpleNotificationService-abc.pem", cert)
        sns.router.add_get("/confirm", confirm)
        sns_runner, sns_url = await serve(sns, https)
        section = {
            "sns_topics": [TOPIC],
            "sns_cert_hosts": [r"127\.0\.0\.1"],
            "sns_ca_file": str(ca_file),
        }
        ctx, ids = make_ctx(tmp_path, section)
        tok = msgid.token(ids[0], ctx.secret)
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        u = url + "/webhooks/ses"
        base = {"SigningCertURL": sns_url + "/SimpleNotificationService-abc.pem", "TopicArn": TOPIC,
                "Timestamp": sns_time(time.time())}  # fmt: skip
        sub = sns_sign({**base, "Type": "SubscriptionConfirmation", "MessageId": "m-1", "Token": "tok-123",
                        "Message": "You have chosen to subscribe", "SubscribeURL": sns_url + "/confirm?Token=tok-123"},
                       signing_key)  # fmt: skip
        bounce = {"notificationType": "Bounce", "bounce": {"bounceType": "Permanent", "bounceSubType": "General",
                  "bouncedRecipients": [{"emailAddress": "u0@example.net", "action": "failed", "status": "5.1.1",
                                         "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
                  "mail": {"messageId": "0102-ses", "commonHeaders": {"messageId": f"<{tok}@sender.example.com>"}}}  # fmt: skip
        note = sns_sign({**base, "Type": "Notification", "MessageId": "m-2", "Subject": "Amazon SES Email Event Notification",
                         "Message": json.dumps(bounce)}, signing_key, version="1")  # fmt: skip
        other_key, _ = sns_cert()
        try:
            async with aiohttp.ClientSession() as s:
                before = state(ctx)
                forged = sns_sign({**note, "MessageId": "m-3"}, other_key)
                tampered = {**note, "Message": note["Message"].replace("u0@", "u1@")}
                elsewhere = sns_sign(
                    {**note, "MessageId": "m-4", "SigningCertURL": "https://localhost/x.pem"},
                    signing_key,
                )
                plain_http = sns_sign(
                    {
                        **note,
                        "MessageId": "m-5",
                        "SigningCertURL": sns_url.replace("https", "http") + "/x.pem",
                    },
                    signing_key,
                )
                unsigned = {k: v for k, v in note.items() if k != "Signature"}
                for doc in (forged, tampered, elsewhere, plain_http, unsigned):
                    async with s.post(u, data=json.dumps(doc)) as r:
                        assert r.status == 401, doc.get("MessageId")
                async with s.post(u, data=b"not json") as r:
                    assert r.status == 401
                assert state(ctx) == before and not confirmed
                wrong_topic = sns_sign(
                    {**note, "MessageId": "m-6", "TopicArn": TOPIC + "-other"}, signing_key
                )
                async with s.post(u, data=json.dumps(wrong_topic)) as r:
                    assert r.status == 403
                async with s.post(u, data=json.dumps(sub)) as r:
                    assert r.status == 200, await r.text()
                assert confirmed == ["tok-123"]
                async with s.post(u, data=json.dumps(note)) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["events"] == 1
        finally:
            await runner.cleanup()
            await sns_runner.cleanup()
        evs = last_events(ctx, 2)
        assert evs[0]["event"] == "provider_subscription" and evs[0]["confirmed"]
        assert evs[1]["event"] == "bounced" and evs[1]["id"] == ids[0] and evs[1]["suppressed"]
        assert state(ctx)[1] == ["u0@example.net"]
        ctx.close()

    asyncio.run(main())


def test_ses_events_about_mail_sent_to_several_recipients_find_each_message(
    tmp_path: Path,
) -> None:
    """Identical mail goes to SES as one SendEmail to several recipients: its
    tag carries the first message's token, its Message-ID the group's. SES's
    bounce or complaint names the recipient it is about: that recipient's
    message of the same campaign is found (as a DSN about such a message is),
    its event recorded and the address suppressed. Before: only the first
    recipient matched the token; for the others the event named no message
    and nothing was suppressed."""
    from fastsend.serve.provider_events import ProviderEvents, ProviderEventSettings

    ctx, ids = make_ctx(tmp_path, {"sns_topics": [TOPIC]})
    pe = ProviderEvents(ctx, ProviderEventSettings.of(ctx.config))
    group = msgid.group_token(ids[0], ctx.secret)
    mail = {"messageId": "0102-group", "tags": {"fastsend": [msgid.token(ids[0], ctx.secret)]},
            "commonHeaders": {"messageId": f"<{group}@sender.example.com>"},
            "destination": [f"u{i}@example.net" for i in range(5)]}  # fmt: skip
    bounce = {"eventType": "Bounce", "mail": mail, "bounce": {
        "bounceType": "Permanent", "bounceSubType": "General",
        "bouncedRecipients": [{"emailAddress": "u3@example.net", "action": "failed", "status": "5.1.1",
                               "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]}}  # fmt: skip
    complaint = {"eventType": "Complaint", "mail": mail, "complaint": {
        "complainedRecipients": [{"emailAddress": "u2@example.net"}], "complaintFeedbackType": "abuse"}}  # fmt: skip
    assert pe._ses_message(json.dumps(bounce)) == 1
    assert pe._ses_message(json.dumps(complaint)) == 1
    evs = last_events(ctx, 2)
    assert (evs[0]["event"], evs[0]["id"], evs[0]["rcpt"]) == ("bounced", ids[3], "u3@example.net")
    assert (evs[1]["event"], evs[1]["id"], evs[1]["rcpt"]) == (
        "complained",
        ids[2],
        "u2@example.net",
    )
    assert state(ctx)[1] == ["u2@example.net", "u3@example.net"]
    # A recipient the campaign never had is no one's: nothing suppressed.
    stranger = json.dumps(bounce).replace("u3@example.net", "nobody@example.org")
    assert pe._ses_message(stranger) == 1
    assert last_events(ctx, 1)[0]["id"] is None
    assert state(ctx)[1] == ["u2@example.net", "u3@example.net"]
    ctx.close()


def test_serve_round_trip_through_sendgrid(tmp_path: Path) -> None:
    """`fastsend serve`: an API message routed to SendGrid (local server) carries its
    signed id; SendGrid's signed bounce for it, posted to /webhooks/sendgrid, becomes
    the message's "bounced" event and a suppression for its tenant."""
    import os
    import subprocess
    import sys

    from tests._provider_servers import Recorder, ThreadedApp, sendgrid_app
    from tests.conftest import free_port, wait_port

    key = ec.generate_private_key(ec.SECP256R1())
    pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()  # fmt: skip
    rec = Recorder()
    port = free_port()
    with ThreadedApp(sendgrid_app("sg-key", rec)) as sg:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[spool]\ndir = "spool"\n[workers]\ncount = 1\n[api]\nlisten = "127.0.0.1:{port}"\n'
            f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{sg.url}"\n[routes]\n"*" = "sg"\n'
            f'[provider_events]\nsendgrid_public_key = "{pub}"\n'
        )
        env = {**os.environ, "FASTSEND_SG_API_KEY": "sg-key"}
        api_key = subprocess.run(
            [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", "acme", "-c", str(cfg)],
            check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
        ).stdout.strip()  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "fastsend", "serve", "-c", str(cfg)],
                                stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)  # fmt: skip
        try:
            wait_port("127.0.0.1", port, timeout=60)
            base = f"http://127.0.0.1:{port}"

            async def main() -> None:
                auth = {"Authorization": f"Bearer {api_key}"}
                async with aiohttp.ClientSession() as s:
                    msg = {
                        "from": "a@sender.example.com",
                        "subject": "Hi",
                        "text": "Hello",
                        "to": "gone@example.net",
                    }
                    async with s.post(base + "/v1/messages", json=msg, headers=auth) as r:
                        assert r.status == 202, await r.text()
                        mid = (await r.json())["messages"][0]["ids"][0]
                    for _ in range(200):
                        if rec.accepted:
                            break
                        await asyncio.sleep(0.05)
                    token = rec.accepted[0]["personalizations"][0]["custom_args"]["fastsend"]
                    events = [{"email": "gone@example.net", "event": "bounce", "type": "bounce", "status": "5.1.1",
                               "reason": "550 5.1.1 mailbox does not exist", "fastsend": token, "sg_message_id": "x.1"}]  # fmt: skip
                    body = json.dumps(events).encode()
                    async with s.post(base + "/webhooks/sendgrid", data=body) as r:
                        assert r.status == 401  # unsigned
                    ts = str(int(time.time()))
                    sig = base64.b64encode(
                        key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
                    ).decode()
                    headers = {
                        "X-Twilio-Email-Event-Webhook-Signature": sig,
                        "X-Twilio-Email-Event-Webhook-Timestamp": ts,
                    }
                    async with s.post(base + "/webhooks/sendgrid", data=body, headers=headers) as r:
                        assert r.status == 200, await r.text()
                    for _ in range(100):
                        async with s.get(f"{base}/v1/messages/{mid}", headers=auth) as r:
                            m = await r.json()
                        if any(e["event"] == "bounced" for e in m["events"]):
                            break
                        await asyncio.sleep(0.05)
                    kinds = [e["event"] for e in m["events"]]
                    assert "delivered" in kinds and "bounced" in kinds, m
                    # SendGrid retries a batch it thinks failed, signed anew: the same
                    # event is not a second bounce (rollups, alarms, guardrails count it).
                    sig = base64.b64encode(
                        key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
                    ).decode()  # (ECDSA: another signature of the same bytes)
                    headers["X-Twilio-Email-Event-Webhook-Signature"] = sig
                    async with s.post(base + "/webhooks/sendgrid", data=body, headers=headers) as r:
                        assert r.status == 200, await r.text()
                    async with s.get(f"{base}/v1/messages/{mid}", headers=auth) as r:
                        m = await r.json()
                    assert [e["event"] for e in m["events"]].count("bounced") == 1, m
                    delivered = next(e for e in m["events"] if e["event"] == "delivered")
                    assert delivered["mx"] == "sendgrid:sg" and "accepted as" in delivered["text"]

            asyncio.run(main())
        finally:
            proc.terminate()
            proc.wait(30)
    from fastsend.suppression import SuppressionList

    with SuppressionList(tmp_path / "spool" / "suppression.db") as sl:
        assert sl.contains("gone@example.net", tenant="acme")


def test_mailgun_event_on_a_redis_spool(tmp_path: Path, redis_server: Any) -> None:
    """On a shared (Redis) spool the message a signed event names is found too: the
    lookup read the SQLite spool's table directly (AttributeError, a 500, and the
    provider's retries for ever)."""
    signing_key = "key-mailgun-signing-0123456789"
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {signing_key}\n")
    kf.chmod(0o600)
    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool"), "url": redis_server.url()},
                     "provider_events": {"mailgun_signing_key_file": str(kf)}})  # fmt: skip
    ctx = open_context(cfg)
    cid = ctx.tenant_campaign("acme")
    ids = ctx.inject(cid, [("u0@example.net", "example.net", b'{"raw": ""}')])
    ts, token = str(int(time.time())), "r" * 50
    sig = hmac.new(signing_key.encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()
    body = json.dumps({"signature": {"timestamp": ts, "token": token, "signature": sig},
                       "event-data": {"event": "complained", "recipient": "u0@example.net",
                                      "user-variables": {"fastsend": msgid.token(ids[0], ctx.secret)}}})  # fmt: skip

    async def main() -> None:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.post(url + "/webhooks/mailgun", data=body) as r,
            ):
                assert r.status == 200, await r.text()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
        assert ctx.suppression.contains("u0@example.net", tenant="acme")
    finally:
        ctx.close()


def test_a_provider_post_replayed_to_another_node_is_refused(
    tmp_path: Path, redis_server: Any
) -> None:
    """Two nodes on one Redis spool behind a balancer: a signed Mailgun post taken by
    node A and replayed to node B within max_age is refused (401) and changes
    nothing. Before, each node remembered the tokens it saw: B took the replay
    (every captured post counted once per node: complaints, bounces twice)."""
    signing_key = "key-mailgun-signing-0123456789"
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {signing_key}\n")
    kf.chmod(0o600)
    url = redis_server.url()
    prefix = url.rpartition("prefix=")[2]
    ctxs = [
        open_context(from_dict({"spool": {"dir": str(tmp_path / n), "url": redis_server.url(
            prefix=prefix, node=n)}, "provider_events": {"mailgun_signing_key_file": str(kf)}}))
        for n in ("A", "B")
    ]  # fmt: skip
    cid = ctxs[0].tenant_campaign("acme")
    ids = ctxs[0].inject(cid, [("u0@example.net", "example.net", b'{"raw": ""}')])
    ts, token = str(int(time.time())), "q" * 50
    sig = hmac.new(signing_key.encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()
    body = json.dumps({"signature": {"timestamp": ts, "token": token, "signature": sig},
                       "event-data": {"event": "complained", "recipient": "u0@example.net",
                                      "user-variables": {"fastsend": msgid.token(ids[0],
                                                                                 ctxs[0].secret)}}})  # fmt: skip
    statuses: list[int] = []

    async def main() -> None:
        runners = []
        try:
            for ctx in ctxs:
                app = web.Application()
                setup_provider_events(app, ctx)
                runner, base = await serve(app)
                runners.append((runner, base))
            async with aiohttp.ClientSession() as s:
                for _runner, base in runners:
                    async with s.post(base + "/webhooks/mailgun", data=body) as r:
                        statuses.append(r.status)
        finally:
            for runner, _base in runners:
                await runner.cleanup()

    try:
        asyncio.run(main())
        assert statuses == [200, 401], statuses
    finally:
        for ctx in ctxs:
            ctx.close()


def test_sns_urls_are_not_followed_through_redirects(tmp_path: Path) -> None:
    """The SigningCertURL and SubscribeURL of an SNS post are fetched only from the
    allowed hosts: a redirect from one (an open redirect on an allowed host, say) to a
    host off the list is not followed (the certificate is not taken: 401; the
    subscription is not confirmed), so the server never fetches where a post says."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    https = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(https)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    signing_key, pem = sns_cert()
    hits: list[str] = []

    async def main() -> None:
        port: list[int] = []

        async def moved(request: web.Request) -> web.Response:
            # The allowed host (127.0.0.1) sends the client on to one not allowed.
            raise web.HTTPFound(f"https://localhost:{port[0]}/elsewhere{request.path_qs}")

        async def elsewhere(request: web.Request) -> web.Response:
            hits.append(request.path_qs)
            return web.Response(body=pem, content_type="application/x-pem-file")

        async def cert(request: web.Request) -> web.Response:
            return web.Response(body=pem, content_type="application/x-pem-file")

        sns = web.Application()
        sns.router.add_get("/SimpleNotificationService-ok.pem", cert)
        sns.router.add_get("/elsewhere/{rest:.*}", elsewhere)
        sns.router.add_get("/{rest:.*}", moved)
        sns_runner, sns_url = await serve(sns, https)
        port.append(int(sns_url.rpartition(":")[2]))
        ctx, ids = make_ctx(tmp_path, {"sns_topics": [TOPIC], "sns_cert_hosts": [r"127\.0\.0\.1"],
                                       "sns_ca_file": str(ca_file)})  # fmt: skip
        tok = msgid.token(ids[0], ctx.secret)
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        base = {"SigningCertURL": sns_url + "/SimpleNotificationService-r.pem", "TopicArn": TOPIC,
                "Timestamp": sns_time(time.time())}  # fmt: skip
        bounce = {"notificationType": "Bounce", "bounce": {"bounceType": "Permanent",
                  "bouncedRecipients": [{"emailAddress": "u0@example.net", "status": "5.1.1"}]},
                  "mail": {"commonHeaders": {"messageId": f"<{tok}@sender.example.com>"}}}  # fmt: skip
        note = sns_sign({**base, "Type": "Notification", "MessageId": "r-1",
                         "Message": json.dumps(bounce)}, signing_key)  # fmt: skip
        try:
            async with aiohttp.ClientSession() as s:
                before = state(ctx)
                async with s.post(url + "/webhooks/ses", data=json.dumps(note)) as r:
                    assert r.status == 401, await r.text()
                assert state(ctx) == before
                sub = sns_sign({**base, "SigningCertURL": sns_url + "/SimpleNotificationService-ok.pem",
                                "Type": "SubscriptionConfirmation", "MessageId": "r-2", "Token": "t-9",
                                "Message": "subscribe", "SubscribeURL": sns_url + "/confirm?Token=t-9"},
                               signing_key)  # fmt: skip
                async with s.post(url + "/webhooks/ses", data=json.dumps(sub)) as r:
                    assert r.status == 502 and not (await r.json())["confirmed"]  # not confirmed
                assert hits == []  # the host off the list was never asked
        finally:
            await runner.cleanup()
            await sns_runner.cleanup()
        evs = last_events(ctx, 1)
        assert evs[0]["event"] == "provider_subscription" and not evs[0]["confirmed"], evs
        ctx.close()

    asyncio.run(main())


# ------------------------------------------------- provider retries (session 16)


def test_sendgrid_retries_are_taken_for_a_day_and_their_events_handled_once(
    tmp_path: Path,
) -> None:
    """SendGrid retries a post not answered 2xx for up to 24 hours after the
    event. A retry carrying its first signature (timestamp 2 hours old) is
    taken (before: 401 as older than max_age, 600 s: every retry refused, the
    bounce lost for good); one 25 hours old is not. A retry SendGrid signed
    anew (fresh timestamp, the same events) handles none of them again, by
    their sg_event_id (before: the delivery and open were recorded twice)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()  # fmt: skip
    ctx, ids = make_ctx(tmp_path, {"sendgrid_public_key": pub})
    tok = [msgid.token(i, ctx.secret) for i in ids]
    now = int(time.time())
    events = [
        {"email": "u0@example.net", "event": "bounce", "type": "bounce", "status": "5.1.1",
         "reason": "550 5.1.1 no such user", "fastsend": tok[0], "sg_event_id": "ZXZ0LTA"},
        {"email": "u1@example.net", "event": "delivered", "fastsend": tok[1], "sg_event_id": "ZXZ0LTE"},
        {"email": "u1@example.net", "event": "open", "fastsend": tok[1], "sg_event_id": "ZXZ0LTI"},
    ]  # fmt: skip
    body = json.dumps(events).encode()

    def signed(ts: int) -> dict[str, str]:
        sig = key.sign(str(ts).encode() + body, ec.ECDSA(hashes.SHA256()))
        return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": str(ts)}  # fmt: skip

    async def main() -> list[tuple[int, Any]]:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        got = []
        try:
            async with aiohttp.ClientSession() as s:
                for ts in (now - 25 * 3600, now - 2 * 3600, now):
                    async with s.post(url + "/webhooks/sendgrid", data=body,
                                      headers=signed(ts)) as r:  # fmt: skip
                        got.append((r.status, await r.json() if r.status == 200 else None))
        finally:
            await runner.cleanup()
        return got

    before = state(ctx)[0]
    got = asyncio.run(main())
    assert got[0][0] == 401  # past SendGrid's day of retries
    assert got[1] == (200, {"events": 3, "repeated": 0}), got
    assert got[2] == (200, {"events": 0, "repeated": 3}), got
    n, suppressed = state(ctx)
    assert n - before == 3 and suppressed == ["u0@example.net"]
    evs = last_events(ctx, 3)
    assert [e["provider_event"] for e in evs] == ["bounce", "delivered", "open"]
    ctx.close()


def mailgun_post(signing_key: str, event: dict[str, Any], ts: float, token: str) -> bytes:
    sig = hmac.new(signing_key.encode(), f"{int(ts)}{token}".encode(), hashlib.sha256).hexdigest()
    return json.dumps({"signature": {"timestamp": str(int(ts)), "token": token, "signature": sig},
                       "event-data": event}).encode()  # fmt: skip


def sns_time(t: float) -> str:
    return (
        datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    )


def test_a_post_whose_handling_failed_is_handled_when_the_provider_retries_it(
    tmp_path: Path,
) -> None:
    """A signed post that serve could not handle (the spool's Redis refusing
    commands) is answered 500; Mailgun and SNS post it again later, as it was
    (the same token, the same MessageId). That retry is handled: the event
    recorded, the address suppressed. Before, the token / MessageId had been
    marked used before the post was handled: Mailgun's retry was refused as a
    replay (401) and SNS's acknowledged as a duplicate without being handled,
    so the bounce and the complaint were lost for good."""
    import redis
    from tests._redis_helpers import start_redis

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    https = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(https)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sns_key, pem = sns_cert()
    signing_key = "key-mailgun-signing-0123456789"
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {signing_key}\n")
    kf.chmod(0o600)

    async def cert(request: web.Request) -> web.Response:
        return web.Response(body=pem, content_type="application/x-pem-file")

    with start_redis() as server:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        admin.execute_command("ACL", "SETUSER", "admin", "on", ">pw", "+@all", "~*", "&*")
        admin = redis.Redis(host="127.0.0.1", port=server.port, username="admin", password="pw")
        cfg = from_dict({"spool": {"dir": str(tmp_path / "spool"), "url": server.url()},
                         "provider_events": {"mailgun_signing_key_file": str(kf),
                                             "sns_topics": [TOPIC], "sns_cert_hosts": [r"127\.0\.0\.1"],
                                             "sns_ca_file": str(ca_file)}})  # fmt: skip
        ctx = open_context(cfg)
        cid = ctx.tenant_campaign("acme")
        ids = ctx.inject(cid, [(f"u{i}@example.net", "example.net", b'{"raw": ""}')
                               for i in range(2)])  # fmt: skip
        complained = {"event": "complained", "recipient": "u0@example.net",
                      "user-variables": {"fastsend": msgid.token(ids[0], ctx.secret)}}  # fmt: skip
        mg = mailgun_post(signing_key, complained, time.time(), "k" * 50)
        bounce = {"notificationType": "Bounce", "bounce": {"bounceType": "Permanent",
                  "bouncedRecipients": [{"emailAddress": "u1@example.net", "action": "failed",
                                         "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
                  "mail": {"commonHeaders": {"messageId": f"<{msgid.token(ids[1], ctx.secret)}@x.example>"}}}  # fmt: skip

        async def main() -> None:
            sns = web.Application()
            sns.router.add_get("/SimpleNotificationService-abc.pem", cert)
            sns_runner, sns_url = await serve(sns, https)
            note = sns_sign({"SigningCertURL": sns_url + "/SimpleNotificationService-abc.pem",
                             "TopicArn": TOPIC, "Timestamp": sns_time(time.time()), "Type": "Notification",
                             "MessageId": "m-retried", "Message": json.dumps(bounce)}, sns_key)  # fmt: skip
            app = web.Application()
            setup_provider_events(app, ctx)
            runner, url = await serve(app)
            try:
                async with aiohttp.ClientSession() as s:
                    admin.execute_command("ACL", "SETUSER", "default", "-@all")  # the spool refused
                    try:
                        async with s.post(url + "/webhooks/mailgun", data=mg) as r:
                            assert r.status == 500, await r.text()
                        async with s.post(url + "/webhooks/ses", data=json.dumps(note)) as r:
                            assert r.status == 500, await r.text()
                    finally:
                        admin.execute_command("ACL", "SETUSER", "default", "+@all")
                    async with s.post(url + "/webhooks/mailgun", data=mg) as r:  # the retries
                        assert r.status == 200, await r.text()
                    async with s.post(url + "/webhooks/ses", data=json.dumps(note)) as r:
                        assert r.status == 200 and (await r.json()).get("events") == 1
                    # Handled now: a replay of either is still refused / not handled again.
                    async with s.post(url + "/webhooks/mailgun", data=mg) as r:
                        assert r.status == 401
                    async with s.post(url + "/webhooks/ses", data=json.dumps(note)) as r:
                        assert (await r.json()).get("duplicate") is True
            finally:
                await runner.cleanup()
                await sns_runner.cleanup()

        try:
            asyncio.run(main())
            assert ctx.suppression.contains("u0@example.net", tenant="acme")
            assert ctx.suppression.contains("u1@example.net", tenant="acme")
            evs = [e for e in last_events(ctx, 10) if e.get("event") in ("complained", "bounced")]
            assert [(e["event"], e["id"]) for e in evs] == [
                ("complained", ids[0]),
                ("bounced", ids[1]),
            ]
        finally:
            ctx.close()


def test_provider_retries_keep_their_first_timestamp_and_old_notifications_are_refused(
    tmp_path: Path,
) -> None:
    """Mailgun resends a post it could not deliver (serve down, a 5xx) for 8
    hours with its first signature block, timestamp included: a post signed 2
    hours ago is taken (before: refused as older than max_age, 600 s, so every
    retry failed and the event was lost), one signed 9 hours ago is not, and a
    taken one replayed is refused. SNS retries for at most an hour: a genuine
    notification published 2 days ago (a replayed capture) is refused and
    changes nothing (before: its Timestamp was never looked at, and once its
    MessageId was forgotten, 10 minutes later, it was handled again); one
    published 30 minutes ago is taken."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    https = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(https)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sns_key, pem = sns_cert()
    signing_key = "key-mailgun-signing-0123456789"
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {signing_key}\n")
    kf.chmod(0o600)
    ctx, ids = make_ctx(tmp_path, {"mailgun_signing_key_file": str(kf), "sns_topics": [TOPIC],
                                   "sns_cert_hosts": [r"127\.0\.0\.1"], "sns_ca_file": str(ca_file)})  # fmt: skip

    def complaint(i: int) -> dict[str, Any]:
        return {"event": "complained", "recipient": f"u{i}@example.net",
                "user-variables": {"fastsend": msgid.token(ids[i], ctx.secret)}}  # fmt: skip

    def bounce(i: int) -> str:
        return json.dumps({"notificationType": "Bounce", "bounce": {"bounceType": "Permanent",
            "bouncedRecipients": [{"emailAddress": f"u{i}@example.net", "action": "failed", "status": "5.1.1",
                                   "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
            "mail": {"commonHeaders": {"messageId": f"<{msgid.token(ids[i], ctx.secret)}@x.example>"}}})  # fmt: skip

    async def cert(request: web.Request) -> web.Response:
        return web.Response(body=pem, content_type="application/x-pem-file")

    now = time.time()

    async def main() -> None:
        sns = web.Application()
        sns.router.add_get("/SimpleNotificationService-abc.pem", cert)
        sns_runner, sns_url = await serve(sns, https)
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)

        def note(i: int, published: float) -> str:
            return json.dumps(sns_sign({"SigningCertURL": sns_url + "/SimpleNotificationService-abc.pem",
                                        "TopicArn": TOPIC, "Timestamp": sns_time(published),
                                        "Type": "Notification", "MessageId": f"m-{i}",
                                        "Message": bounce(i)}, sns_key))  # fmt: skip

        try:
            async with aiohttp.ClientSession() as s:
                before = state(ctx)
                late = mailgun_post(signing_key, complaint(1), now - 9 * 3600, "a" * 50)
                async with s.post(url + "/webhooks/mailgun", data=late) as r:
                    assert r.status == 401  # past Mailgun's retries: a replay
                async with s.post(url + "/webhooks/ses", data=note(2, now - 2 * 86400)) as r:
                    assert r.status == 401, await r.text()  # past SNS's retries
                async with s.post(url + "/webhooks/ses", data=note(2, now + 3600)) as r:
                    assert r.status == 401, await r.text()  # from the future
                assert state(ctx) == before
                retried = mailgun_post(signing_key, complaint(0), now - 2 * 3600, "b" * 50)
                async with s.post(url + "/webhooks/mailgun", data=retried) as r:
                    assert r.status == 200, await r.text()
                async with s.post(url + "/webhooks/mailgun", data=retried) as r:
                    assert r.status == 401  # handled once: a replay now
                async with s.post(url + "/webhooks/ses", data=note(3, now - 1800)) as r:
                    assert r.status == 200 and (await r.json())["events"] == 1
        finally:
            await runner.cleanup()
            await sns_runner.cleanup()

    asyncio.run(main())
    assert state(ctx)[1] == ["u0@example.net", "u3@example.net"]
    ctx.close()


def test_ses_permanent_bounces_say_hard_without_a_diagnostic_and_not_spam_is_no_complaint(
    tmp_path: Path,
) -> None:
    """SES's Permanent bounces of subtype NoEmail, Suppressed or General often carry
    no diagnostic text (nothing for the classifier to read): SES's own verdict is a
    hard bounce ("remove the recipient's address from your mailing list"), so the
    address is suppressed (before: "onhold", soft, nothing suppressed, the address
    mailed again by every campaign). A Permanent/General bounce whose text says it
    was a block stays soft, as do Transient and Undetermined ones. A complaint
    notification of feedback type "not-spam" (a correction, RFC 5965) or
    "auth-failure" is no complaint, as at the intake: a "feedback" event, nothing
    suppressed (before: a complaint, the address suppressed)."""
    from fastsend.serve.provider_events import ProviderEvents, ProviderEventSettings

    ctx, _ids = make_ctx(tmp_path, {"sns_topics": [TOPIC]})
    pe = ProviderEvents(ctx, ProviderEventSettings.of(ctx.config))
    cid = ctx.tenant_campaign("acme")
    blocked = {"action": "failed", "status": "5.7.1",
               "diagnosticCode": "smtp; 550 5.7.1 Service unavailable, client host blocked using Spamhaus"}  # fmt: skip
    bounces = {
        "noemail@example.net": ("Permanent", "NoEmail", {"action": "failed", "status": "5.0.0"}),
        "general@example.net": ("Permanent", "General", {}),
        "suppressed@example.net": ("Permanent", "Suppressed", {"action": "failed"}),
        "blocked@example.net": ("Permanent", "General", blocked),
        "transient@example.net": ("Transient", "General", {"action": "failed"}),
        "undetermined@example.net": ("Undetermined", "Undetermined", {}),
    }
    for addr, (btype, sub, extra) in bounces.items():
        mid = ctx.inject(cid, [(addr, "example.net", b'{"raw": ""}')])[0]
        doc = {"notificationType": "Bounce",
               "bounce": {"bounceType": btype, "bounceSubType": sub,
                          "bouncedRecipients": [{"emailAddress": addr, **extra}]},
               "mail": {"commonHeaders": {"messageId": f"<{msgid.token(mid, ctx.secret)}@x.example>"}}}  # fmt: skip
        assert pe._ses_message(json.dumps(doc)) == 1
    for ftype in ("not-spam", "auth-failure", "abuse"):
        addr = f"{ftype}@example.net"
        mid = ctx.inject(cid, [(addr, "example.net", b'{"raw": ""}')])[0]
        doc = {"notificationType": "Complaint",
               "complaint": {"complaintFeedbackType": ftype, "complainedRecipients": [{"emailAddress": addr}]},
               "mail": {"commonHeaders": {"messageId": f"<{msgid.token(mid, ctx.secret)}@x.example>"}}}  # fmt: skip
        assert pe._ses_message(json.dumps(doc)) == 1
    evs = {e["rcpt"]: e for e in last_events(ctx, 40) if e["event"] != "accepted"}
    assert [a for a, e in evs.items() if e["event"] == "bounced" and e["hard"]] == [
        "noemail@example.net", "general@example.net", "suppressed@example.net"
    ]  # fmt: skip
    assert evs["not-spam@example.net"]["event"] == "feedback"
    assert evs["auth-failure@example.net"]["event"] == "feedback"
    assert evs["abuse@example.net"]["event"] == "complained"
    assert state(ctx)[1] == ["abuse@example.net", "general@example.net",
                             "noemail@example.net", "suppressed@example.net"]  # fmt: skip
    ctx.close()


def test_mailgun_mail_not_sent_for_its_own_lists_suppresses_for_that_reason(
    tmp_path: Path,
) -> None:
    """Mailgun does not send to an address on its own suppression lists and posts
    ``failed`` (permanent, delivery-status 605) with reason suppress-bounce,
    suppress-unsubscribe or suppress-complaint. fastsend suppresses the address
    for that reason (a hard bounce, an unsubscribe, a complaint), as for
    SendGrid's "dropped"; before, each was a soft bounce that suppressed
    nothing, so a recipient who had complained kept getting mail through every
    other route."""
    signing_key = "key-mailgun-signing-0123456789"
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {signing_key}\n")
    kf.chmod(0o600)
    ctx, ids = make_ctx(tmp_path, {"mailgun_signing_key_file": str(kf)})
    texts = {"suppress-bounce": "Not delivering to previously bounced address",
             "suppress-unsubscribe": "Not delivering to unsubscribed address",
             "suppress-complaint": "Not delivering to a user who marked your messages as spam"}  # fmt: skip
    posts = []
    for n, (reason, text) in enumerate(texts.items()):
        ev = {"event": "failed", "severity": "permanent", "reason": reason,
              "recipient": f"u{n}@example.net",
              "delivery-status": {"code": 605, "message": "", "description": text, "attempt-no": 1},
              "user-variables": {"fastsend": msgid.token(ids[n], ctx.secret)}}  # fmt: skip
        posts.append(mailgun_post(signing_key, ev, time.time(), f"{n}" * 50))

    async def main() -> None:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                for body in posts:
                    async with s.post(url + "/webhooks/mailgun", data=body) as r:
                        assert r.status == 200, await r.text()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    evs = last_events(ctx, 3)
    assert [(e["event"], e["id"]) for e in evs] == [("bounced", i) for i in ids[:3]]
    assert evs[0]["hard"] and not evs[1]["hard"] and not evs[2]["hard"]
    got = {e.address: e.reason for e in ctx.suppression.list(tenant="acme")}
    assert set(got) == {"u0@example.net", "u1@example.net", "u2@example.net"}, got
    assert got["u1@example.net"] != got["u0@example.net"] != got["u2@example.net"], got
    ctx.close()


def test_ses_reject_event_bounces_the_message_it_did_not_send(tmp_path: Path) -> None:
    """SES event publishing's "Reject": SES took the request (fastsend recorded the
    message delivered) but found a virus and never sent it. Each recipient's
    message now bounces for its content (nothing suppressed: the address is
    fine); before, the event was ignored and the mail stood delivered."""
    from fastsend.serve.provider_events import ProviderEvents, ProviderEventSettings

    ctx, ids = make_ctx(tmp_path, {"sns_topics": [TOPIC]})
    pe = ProviderEvents(ctx, ProviderEventSettings.of(ctx.config))
    doc = {"eventType": "Reject", "reject": {"reason": "Bad content"},
           "mail": {"messageId": "0102-x", "destination": ["u4@example.net"],
                    "tags": {"fastsend": [msgid.token(ids[4], ctx.secret)]},
                    "commonHeaders": {"messageId": f"<{msgid.token(ids[4], ctx.secret)}@x.example>"}}}  # fmt: skip
    assert pe._ses_message(json.dumps(doc)) == 1
    ev = last_events(ctx, 1)[0]
    assert (ev["event"], ev["id"], ev["hard"]) == ("bounced", ids[4], False), ev
    assert "Bad content" in ev["text"] and not ev["suppressed"]
    assert state(ctx)[1] == []
    ctx.close()
