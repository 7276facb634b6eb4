"""SMTP listeners: submission (aiosmtplib, STARTTLS with trustme certs, AUTH) and intake.

Real parts: the listeners on loopback, a ServeContext on a temporary spool,
aiosmtplib as the client, the labelled bounce corpus fed through the intake.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import pytest
from tests._serve_helpers import Served, dsn

from conftest import bounce_corpus, free_port, wait_port
from fastsend import msgid
from fastsend.bounce import parse_bounce
from fastsend.config import from_dict
from fastsend.message import tracking
from fastsend.serve.auth import KeyStore
from fastsend.serve.context import ServeContext, open_context
from fastsend.serve.listeners import (
    IntakeConfig,
    SubmissionConfig,
    hash_password,
    start_listeners,
    verify_password,
)
from fastsend.sink import SinkThread
from fastsend.suppression import SuppressionError, normalize

MESSAGE = (
    b"From: App <app@example.com>\r\nTo: ann@example.org\r\nSubject: hi\r\n"
    b"Message-ID: <abc@example.com>\r\n\r\nHello\r\n.leading dot\r\n"
)


def _ctx(tmp_path: Path, **tables: Any) -> ServeContext:
    return open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, **tables}))


def _port(servers: list[asyncio.AbstractServer], i: int = 0) -> int:
    return int(servers[i].sockets[0].getsockname()[1])  # type: ignore[attr-defined]


async def _close(servers: list[asyncio.AbstractServer]) -> None:
    for s in servers:
        s.close()
        await s.wait_closed()


# ---------------------------------------------------------------- submission
def test_submission_starttls_auth_and_durable_accept(
    tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]
) -> None:
    cert, key, client_tls = certs
    users = {"acme": hash_password("s3cret pass", iterations=1000)}
    # (the failed AUTHs' back-off, 0.25 s doubling to 4 s, cost this test 7.75 s of its
    # 16: test_hostile_tenant proves the back-off)
    sub = {"listen": "127.0.0.1:0", "tls_cert": cert, "tls_key": key, "users": users,
           "auth_backoff_max": 0.05}  # fmt: skip
    ctx = _ctx(tmp_path, submission=sub)
    api_key, _ = KeyStore.for_spool(ctx.config.spool_dir).create("globex")
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)

    async def main() -> None:
        servers = await start_listeners(ctx)
        port = _port(servers)
        try:
            # Plaintext: no AUTH offered, MAIL refused.
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=False, tls_context=client_tls
            )
            await smtp.connect()
            await smtp.ehlo()
            assert smtp.supports_extension("starttls")
            assert not smtp.supports_extension("auth")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail("app@example.com")
            assert refused.value.code == 530
            await smtp.starttls(tls_context=client_tls)
            await smtp.ehlo()
            assert smtp.supports_extension("auth")
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await smtp.login("acme", "wrong")
            await smtp.login("acme", "s3cret pass")
            errors, reply = await smtp.sendmail(
                "app@example.com", ["ann@example.org", "bob@Example.NET"], MESSAGE
            )
            assert errors == {} and "queued as" in reply
            await smtp.quit()

            # An API key is a password for its own tenant only.
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=True, tls_context=client_tls
            )
            await smtp.connect()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await smtp.login("acme", api_key)
            await smtp.login("globex", api_key)
            await smtp.sendmail("", ["carol@example.org"], MESSAGE)
            await smtp.quit()

            # Three failures close the session.
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=True, tls_context=client_tls
            )
            await smtp.connect()
            await smtp.ehlo()  # (STARTTLS reset the session: AUTH follows a new EHLO)
            for _ in range(2):
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await smtp.auth_plain("acme", "nope")
            with pytest.raises(aiosmtplib.SMTPException) as third:
                await smtp.auth_plain("acme", "nope")
                await smtp.noop()
            assert "421" in str(third.value) or isinstance(
                third.value, aiosmtplib.SMTPServerDisconnected
            )
            smtp.close()
        finally:
            await _close(servers)

    asyncio.run(main())
    accepted = [e for e in events if e["event"] == "accepted"]
    assert [(e["rcpt"], e["tenant"]) for e in accepted] == [
        ("ann@example.org", "acme"),
        ("bob@Example.NET", "acme"),
        ("carol@example.org", "globex"),
    ]
    # Durable before the 250: the rows are in the spool with the message as sent.
    for e in accepted:
        m = ctx.spool.message(e["id"])
        assert m is not None and m["state"] == "queued"
        raw = base64.b64decode(m["vars"]["raw"])  # (our Received field on top)
        assert raw.startswith(b"Received: from ") and raw.endswith(b"\r\n" + MESSAGE), raw
    assert ctx.spool.message(accepted[1]["id"])["domain"] == "example.net"  # type: ignore[index]
    assert ctx.spool.message(accepted[2]["id"])["vars"]["mail_from"] == ""  # type: ignore[index]
    assert accepted[0]["campaign"] == ctx.tenant_campaign("acme")
    assert ctx.spool.get_campaign(ctx.tenant_campaign("acme")).spec["kind"] == "transactional"  # type: ignore[union-attr]
    ctx.close()


def test_submission_config_and_passwords(tmp_path: Path) -> None:
    h = hash_password("pw", iterations=1000)
    assert verify_password("pw", h) and not verify_password("pW", h)
    assert not verify_password("pw", "garbage") and not verify_password("pw", "md5$1$a$b")
    with pytest.raises(ValueError, match="tls_cert"):
        from_dict({"submission": {"listen": "127.0.0.1:0"}})
    with pytest.raises(ValueError, match="listen"):
        from_dict({"intake": {"listen": "nope", "verp_domain": "b.example"}})
    with pytest.raises(ValueError, match="verp_domain"):
        from_dict({"intake": {"listen": "127.0.0.1:0"}})
    with pytest.raises(ValueError, match="unknown"):
        from_dict({"intake": {"listen": "127.0.0.1:0", "fbl": "x"}})
    empty = from_dict({})
    assert SubmissionConfig.of(empty.submission) is None and IntakeConfig.of(empty.intake) is None
    ctx = _ctx(tmp_path)
    assert asyncio.run(start_listeners(ctx)) == []
    ctx.close()


# ---------------------------------------------------------------- intake
def _corpus_cases() -> list[tuple[bytes, dict[str, Any], str]]:
    """Single-recipient reports whose parse agrees with their label: (raw, label, rcpt)."""
    corpus = bounce_corpus()
    if corpus is None:
        pytest.skip("bounce corpus not beside this checkout")
    labels = json.loads((corpus / "labels.json").read_text())
    picked: list[tuple[bytes, dict[str, Any], str]] = []
    quota = {"feedback": 8, "hard": 16, "soft": 10}
    seen: set[str] = set()
    for name, labs in sorted(labels.items()):
        if len(labs) != 1:
            continue
        lab = labs[0]
        kind = (
            "feedback" if lab["reason"] == "feedback" else "hard" if lab["hard_bounce"] else "soft"
        )
        if quota[kind] == 0 or lab["reason"] in ("delivered", "vacation"):
            continue
        raw = (corpus / "eml" / name).read_bytes()
        recs = parse_bounce(raw)
        if len(recs) != 1 or recs[0].reason != lab["reason"] or recs[0].hard != lab["hard_bounce"]:
            continue
        try:
            key = normalize(recs[0].recipient)[0]
        except SuppressionError:
            continue
        if key in seen:  # corpus files share test addresses; keep checks independent
            continue
        seen.add(key)
        quota[kind] -= 1
        picked.append((raw, lab, recs[0].recipient))
    assert len(picked) >= 15
    return picked


def test_intake_corpus_to_events_and_suppressions(tmp_path: Path) -> None:
    cases = _corpus_cases()
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com"}
    intake["fbl_address"] = "fbl@example.com"
    ctx = _ctx(tmp_path, intake=intake)
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    cid = ctx.tenant_campaign("acme")
    ids = ctx.inject(cid, [(r, r.rpartition("@")[2].lower(), b"{}") for _raw, _lab, r in cases])
    del events[:]

    async def main() -> None:
        servers = await start_listeners(ctx)
        try:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=_port(servers), start_tls=False)
            await smtp.connect()
            await smtp.mail("")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt("someone@example.org")
            assert refused.value.code == 550  # no relaying
            await smtp.rset()
            for (raw, lab, _rcpt), mid in zip(cases, ids, strict=True):
                to = (
                    "fbl@example.com"
                    if lab["reason"] == "feedback"
                    else f"b-{msgid.token(mid, ctx.secret)}@bounces.example.com"
                )
                errors, reply = await smtp.sendmail("", [to], raw)
                assert errors == {} and reply.startswith("2.0.0 Ok: 1 event"), reply
            await smtp.quit()
        finally:
            await _close(servers)

    asyncio.run(main())
    assert len(events) == len(cases)  # one event per report, in order
    for (_raw, lab, rcpt), mid, ev in zip(cases, ids, events, strict=True):
        if lab["reason"] == "feedback":
            # ARF reports carry no VERP address: found by the returned Message-ID if
            # ours, else recorded for the reported recipient in the default tenant,
            # suppressing nothing (an unverified report is anyone's forgery).
            assert ev["rcpt"] == rcpt and ev["feedback_type"] == lab["feedback_type"]
            ftype = lab["feedback_type"]
            want = {"auth-failure": "feedback", "not-spam": "feedback"}
            want |= {"opt-out": "unsubscribed", "unsubscribe": "unsubscribed"}
            assert ev["event"] == want.get(ftype, "complained")
            suppressed = ctx.suppression.contains(rcpt, tenant=ev["tenant"])
            assert suppressed == (ev["event"] != "feedback" and ev["id"] is not None)
            assert ev["suppressed"] == suppressed
            continue
        assert ev["event"] == "bounced" and ev["id"] == mid
        assert ev["rcpt"] == rcpt and ev["tenant"] == "acme" and ev["campaign"] == cid
        assert (ev["reason"], ev["hard"]) == (lab["reason"], lab["hard_bounce"])
        assert ev["suppressed"] == lab["hard_bounce"]
        assert ctx.suppression.contains(rcpt, tenant="acme") == lab["hard_bounce"]
        assert not ctx.suppression.contains(rcpt, tenant="other")
    ctx.close()


def test_intake_finds_original_by_message_id(tmp_path: Path) -> None:
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com"}
    ctx = _ctx(tmp_path, intake=intake)
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    cid = ctx.tenant_campaign("shop")
    (mid,) = ctx.inject(cid, [("gone@example.org", "example.org", b"{}")])
    del events[:]

    async def main() -> None:
        servers = await start_listeners(ctx)
        try:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=_port(servers), start_tls=False)
            await smtp.connect()
            token = msgid.token(mid, ctx.secret)  # what the worker puts in Message-ID
            for rcpt, m in (("gone@example.org", token), ("stranger@example.org", token)):
                raw = dsn(rcpt, m).encode()
                await smtp.sendmail("", ["bounces@bounces.example.com"], raw)
            await smtp.quit()
        finally:
            await _close(servers)

    asyncio.run(main())
    assert [(e["id"], e["rcpt"], e["tenant"], e["reason"]) for e in events] == [
        (mid, "gone@example.org", "shop", "userunknown"),
        # A Message-ID naming our id but another recipient is not taken as ours.
        (None, "stranger@example.org", "default", "userunknown"),
    ]
    assert ctx.suppression.contains("gone@example.org", tenant="shop")
    assert orjson.loads(orjson.dumps(events))  # events are JSON-serialisable
    ctx.close()


# ---------------------------------------------------------------- through `fastsend serve`
class _HookReceiver(http.server.BaseHTTPRequestHandler):
    secret = b""
    events: list[dict[str, Any]] = []
    bad = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        sig = dict(kv.split("=", 1) for kv in self.headers["Fastsend-Signature"].split(","))
        want = hmac.new(self.secret, f"{sig['t']}.".encode() + body, hashlib.sha256).hexdigest()
        if hmac.compare_digest(want, sig["v1"]):
            type(self).events.extend(orjson.loads(body))
            self.send_response(200)
        else:
            type(self).bad += 1
            self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_through_fastsend_serve(tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]) -> None:
    """Submission -> spool -> worker -> sink, webhooks signed, a tracked click: one process."""
    cert, key, client_tls = certs
    secret = "whsec-serve-test-0123456789"
    _HookReceiver.secret, _HookReceiver.events = secret.encode(), []
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HookReceiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    sub_port = free_port()
    extra = f"""
[submission]
listen = "127.0.0.1:{sub_port}"
tls_cert = "{cert}"
tls_key = "{key}"
[webhooks]
urls = ["http://127.0.0.1:{hooks.server_address[1]}/hook"]
secret = "{secret}"
retry_min = 0.05
flush_interval = 0.05
"""
    with SinkThread() as sink:
        served = Served(tmp_path, f"{sink.host}:{sink.port}", extra=extra)
        api_key = served.keys["acme"]
        try:
            wait_port("127.0.0.1", sub_port, timeout=60)

            async def submit() -> None:
                smtp = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=sub_port, start_tls=True, tls_context=client_tls
                )
                await smtp.connect()
                await smtp.login("acme", api_key)
                await smtp.sendmail("app@example.com", ["ann@example.org"], MESSAGE)
                await smtp.quit()

            asyncio.run(submit())
            deadline = time.monotonic() + 30
            while {"accepted", "delivered"} - {e["event"] for e in _HookReceiver.events}:
                assert time.monotonic() < deadline, _HookReceiver.events
                time.sleep(0.05)
            assert _HookReceiver.bad == 0
            mid = _HookReceiver.events[0]["id"]
            assert any(b"Hello" in m.data for m in sink.sink.messages)

            # A tracked click, signed with the key the server made in its spool.
            secret_key = (tmp_path / "spool" / "secret.key").read_bytes().strip()
            tok = tracking.sign(
                secret_key, tracking.CLICK, str(mid), "ann@example.org", "https://example.com/",
                tenant="acme",
            )  # fmt: skip

            async def click() -> tuple[int, str]:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"{served.base}/t/c/{tok}", allow_redirects=False) as r,
                ):
                    return r.status, r.headers.get("Location", "")

            assert asyncio.run(click()) == (302, "https://example.com/")
            while "clicked" not in {e["event"] for e in _HookReceiver.events}:
                assert time.monotonic() < deadline, _HookReceiver.events
                time.sleep(0.05)
        finally:
            served.stop()
            hooks.shutdown()


def test_forged_verp_ids_name_no_message(tmp_path: Path) -> None:
    """A bounce to b-<row id>@ without the MAC (or with a wrong one) is not traced to a
    message, so nobody can get a recipient suppressed by naming its row id."""
    from fastsend.bounce import BounceRecord
    from fastsend.serve.listeners import find_original

    ctx = _ctx(tmp_path, intake={"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com"})
    cid = ctx.tenant_campaign("acme")
    (mid,) = ctx.inject(cid, [("victim@example.net", "example.net", b"{}")])
    rec = BounceRecord("victim@example.net", "5.1.1", 550, "user unknown", "userunknown", True)
    good = msgid.token(mid, ctx.secret)
    assert find_original(ctx, rec, [good]) is not None
    for forged in (str(mid), f"{mid}-aaaaaaaaaa", good[:-1] + ("a" if good[-1] != "a" else "b")):
        assert find_original(ctx, rec, [forged]) is None
    assert msgid.parse(good, ctx.secret) == mid and msgid.parse(good, b"other") is None
