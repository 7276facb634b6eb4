"""Provider transports end to end: ``fastsend send`` -> SES (moto in server mode,
real SigV4), SendGrid and Mailgun (local servers speaking their documented
APIs). Each run: 1,500 messages (16 connections, 2 workers: about 100
requests on each connection), the provider's rate limit hit (429 with
Retry-After / TooManyRequestsException) and ridden out without loss or
duplicates, permanent rejections bounced with the provider's reason
classified, provider message ids kept as queue_id, and raw MIME arriving
DKIM-valid (SES, Mailgun; SendGrid gets the same parts, see sendgrid.py)."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import dkim
import orjson
import pytest
from tests._engine_helpers import fastsend_cmd, summary, write_recipients
from tests._provider_servers import (
    Recorder,
    ThreadedApp,
    mailgun_app,
    sendgrid_app,
    ses_proxy_app,
)

from fastsend import msgid

N = 1500  # (5,000 before: the same assertions at 3x the run time; bench/transports.py
# sends 5,000 for the rates)
REJECTS = ["reject-1@example.net", "reject-2@example.org", "reject-3@example.com"]


def dkim_campaign(tmp: Path) -> tuple[Path, dict[bytes, bytes]]:
    key = tmp / "rsa1.pem"
    r = subprocess.run(
        fastsend_cmd("dkim", "keygen", "--domain", "sender.example.com", "--selector", "s1",
                     "--algorithm", "rsa", "--out", str(key), "--json"),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rec = orjson.loads(r.stdout)
    txt = (rec.get("value") or rec["txt"]).encode()
    camp = tmp / "campaign.toml"
    camp.write_text(
        'name = "provider-test"\n'
        'from = "News <news@sender.example.com>"\n'
        'subject = "Hello {{ name }}"\n'
        'text = "Hi {{ name }}, this is for {{ email }}.\\n"\n'
        'html = "<p>Hi <b>{{ name }}</b></p>"\n'
        'verp_domain = "bounces.sender.example.com"\n'
        f'[[dkim]]\ndomain = "sender.example.com"\nselector = "s1"\nkey = "{key}"\n'
    )
    return camp, {b"s1._domainkey.sender.example.com.": txt}


def recipients(tmp: Path, n: int = N) -> tuple[Path, list[str]]:
    good = [f"user{i}@example.{('net', 'org', 'com')[i % 3]}" for i in range(n - len(REJECTS))]
    allr = good[: len(good) // 2] + REJECTS + good[len(good) // 2 :]
    return write_recipients(tmp, allr), good


def send(
    tmp: Path, camp: Path, rcpts: Path, config: str, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    cfg = tmp / "fastsend.toml"
    cfg.write_text(config)
    full = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
    full.update(env)
    return subprocess.run(
        fastsend_cmd("send", str(camp), "-r", str(rcpts), "-c", str(cfg), "--spool",
                     str(tmp / "spool"), "--json", "--no-progress", "--workers", "2", *extra),
        capture_output=True, text=True, timeout=280, env=full,
    )  # fmt: skip


RETRY = "[retry]\nmin_backoff = 1\nmax_backoff = 2\n"


def events(tmp: Path) -> list[dict[str, Any]]:
    p = tmp / "spool" / "events.jsonl"
    return [orjson.loads(x) for x in p.read_bytes().splitlines() if x.strip()]


def check_outcomes(
    tmp: Path, proc: subprocess.CompletedProcess[str], rec: Recorder, good: list[str], provider: str
) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert s["delivered"] == len(good), (s, proc.stderr[-2000:])
    assert s["bounced"] == len(REJECTS)
    # No loss, no duplicate: every good recipient accepted by the provider exactly once.
    assert rec.recipients == Counter(good)
    assert rec.rejected >= len(REJECTS)
    assert rec.throttled > 0, "the provider's rate limit was never reached"
    evs = events(tmp)
    final = {e["rcpt"]: e for e in evs if e["event"] in ("delivered", "bounced")}
    for r in REJECTS:
        e = final[r]
        assert e["event"] == "bounced" and e["code"] == 550, e
        assert e["enhanced"].startswith("5."), e
        assert provider in e["text"] and "rejected (HTTP 400" in e["text"], e
    delivered = [e for e in evs if e["event"] == "delivered"]
    assert len(delivered) == len(good)
    assert all(e.get("queue_id") for e in delivered)
    assert len({e["queue_id"] for e in delivered}) == len(delivered)  # one request per message
    shaping = [
        orjson.loads(x)
        for x in (tmp / "spool" / "shaping.jsonl").read_bytes().splitlines()
        if x.strip()
    ] if (tmp / "spool" / "shaping.jsonl").exists() else []  # fmt: skip
    assert any(e.get("action") == "provider throttled" for e in shaping), "lane not slowed"
    for e in evs:
        text = json.dumps(e)
        assert "sg-secret-key" not in text and "mg-secret-key" not in text
    return delivered


_RECORDS: dict[bytes, bytes] = {}


def _verify_chunk(raws: list[bytes]) -> list[int]:
    """The indexes of the messages in ``raws`` that dkimpy does not verify."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return _RECORDS.get(name, b"")

    return [
        i
        for i, raw in enumerate(raws)
        if not dkim.verify(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), dnsfunc=dnsfunc)
    ]


def verify_all(raws: list[bytes], records: dict[bytes, bytes]) -> None:
    """Every message verifies with dkimpy (in two forked processes: ~1 ms a
    message, seconds for thousands)."""
    import multiprocessing

    _RECORDS.clear()
    _RECORDS.update(records)
    chunks = [raws[i : i + 250] for i in range(0, len(raws), 250)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        bad = [(n, i) for n, got in enumerate(pool.map(_verify_chunk, chunks)) for i in got]
    assert not bad, (
        f"{len(bad)} of {len(raws)} do not verify, e.g. message {bad[0][0] * 250 + bad[0][1]}"
    )


@pytest.mark.slow
def test_sendgrid_1500_messages(tmp_path: Path) -> None:
    camp, _records = dkim_campaign(tmp_path)
    rcpts, good = recipients(tmp_path)
    rec = Recorder(rate=3000, throttle_first=8)
    with ThreadedApp(sendgrid_app("sg-secret-key", rec)) as app:
        cfg = (
            RETRY
            + f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{app.url}"\nmax_connections = 16\n[routes]\n"*" = "sg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_SG_API_KEY": "sg-secret-key"})
    check_outcomes(tmp_path, proc, rec, good, "sendgrid")
    # The same parts fastsend rendered: subject, text and HTML, one personalization per
    # recipient, each with the message's signed id token.
    secret = (tmp_path / "spool" / "secret.key").read_bytes().strip()
    body = rec.accepted[0]
    assert body["from"] == {"email": "news@sender.example.com", "name": "News"}
    p = body["personalizations"][0]
    rcpt = p["to"][0]["email"]
    assert msgid.parse(p["custom_args"]["fastsend"], secret) is not None
    n = rcpt.split("@")[0].removeprefix("user")
    assert body["subject"].startswith("Hello N")
    types = [c["type"] for c in body["content"]]
    assert types == ["text/plain", "text/html"]
    assert f"this is for {rcpt}" in body["content"][0]["value"]
    assert "DKIM-Signature" not in body.get("headers", {})
    assert n


@pytest.mark.slow
def test_mailgun_1500_messages_dkim_valid(tmp_path: Path) -> None:
    camp, records = dkim_campaign(tmp_path)
    rcpts, good = recipients(tmp_path)
    rec = Recorder(rate=3000, throttle_first=8)
    with ThreadedApp(mailgun_app("mg-secret-key", rec, "mg.sender.example.com")) as app:
        cfg = RETRY + (
            f'[transports.mg]\nkind = "mailgun"\nregion = "eu"\nendpoint = "{app.url}"\n'
            'domain = "mg.sender.example.com"\nmax_connections = 16\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-secret-key"})
    check_outcomes(tmp_path, proc, rec, good, "mailgun")
    verify_all([data for _r, data, _v in rec.accepted], records)
    secret = (tmp_path / "spool" / "secret.key").read_bytes().strip()
    for rs, data, v in rec.accepted[:50]:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert str(msg["To"]).endswith(rs[0]) or rs[0] in str(msg["To"])
        assert msgid.parse(v.split()[0], secret) is not None


@pytest.fixture(scope="module")
def moto_server() -> Any:
    """moto in server mode with IAM authentication on: every request after the
    setup must carry a valid SigV4 signature of the key it issued. One server
    for the module's tests (each reads only what was sent since it began)."""
    import logging

    import boto3
    from moto import settings
    from moto.backends import get_backend
    from moto.moto_server import werkzeug_app
    from moto.server import ThreadedMotoServer

    # A log line per request (werkzeug's, to stderr) and a listing of moto's
    # package directory per request under the dispatcher's lock were most of
    # moto's time: quiet the one, list the directory once (same answer).
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    modules = list(werkzeug_app.backends.list_of_moto_modules())
    listing = werkzeug_app.backends.list_of_moto_modules
    werkzeug_app.backends.list_of_moto_modules = lambda: modules  # type: ignore[assignment]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import urllib.request

    # moto's state is per process: start from nothing.
    urllib.request.urlopen(
        urllib.request.Request(url + "/moto-api/reset", method="POST"), timeout=10
    )
    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")  # fmt: skip
    iam.create_user(UserName="fastsend")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "ses:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="fastsend", PolicyName="ses", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="fastsend")["AccessKey"]
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # authenticate everything from now on
    try:
        ses = boto3.client("sesv2", endpoint_url=url, region_name="eu-west-1",
                           aws_access_key_id=key["AccessKeyId"],
                           aws_secret_access_key=key["SecretAccessKey"])  # fmt: skip
        ses.create_email_identity(EmailIdentity="sender.example.com")

        def sent() -> list[Any]:
            b = get_backend("ses")
            return [m for acct in b for region in b[acct] for m in b[acct][region].sent_messages]

        yield url, key["AccessKeyId"], key["SecretAccessKey"], sent
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
        server.stop()
        werkzeug_app.backends.list_of_moto_modules = listing  # type: ignore[assignment]
        werkzeug_log.setLevel(level)


@pytest.fixture()
def moto_ses(moto_server: Any) -> Any:
    """The module's moto server; ``sent()`` is what SES sent since the test began."""
    url, akid, secret_key, sent_all = moto_server
    first = len(sent_all())

    def sent() -> list[Any]:
        return sent_all()[first:]

    return url, akid, secret_key, sent


@pytest.mark.slow
def test_ses_1500_messages_through_moto(tmp_path: Path, moto_ses: Any) -> None:
    url, akid, secret_key, sent = moto_ses
    camp, records = dkim_campaign(tmp_path)
    rcpts, good = recipients(tmp_path)
    rec = Recorder(rate=3000, throttle_first=8)
    with ThreadedApp(ses_proxy_app(url, rec)) as proxy:
        cfg = RETRY + (
            f'[transports.ses-eu]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n'
            'max_connections = 16\n[routes]\n"*" = "ses-eu"\n'
        )
        env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        proc = send(tmp_path, camp, rcpts, cfg, env)
    delivered = check_outcomes(tmp_path, proc, rec, good, "ses:eu-west-1")
    msgs = sent()
    assert len(msgs) == len(good)
    assert {m.id for m in msgs} == {e["queue_id"] for e in delivered}
    verify_all([m.raw_data.encode() for m in msgs], records)
    assert secret_key not in (tmp_path / "spool" / "events.jsonl").read_text()


def test_ses_bad_signature_is_refused_by_moto_and_deferred(tmp_path: Path, moto_ses: Any) -> None:
    """The signature is really checked: a wrong secret is SignatureDoesNotMatch
    (403) from moto, which fastsend defers (our credentials, not the address)."""
    url, akid, _secret, sent = moto_ses
    camp, _ = dkim_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net", "b@example.net"])
    cfg = f'[transports.s]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{url}"\n[routes]\n"*" = "s"\n'
    proc = send(
        tmp_path,
        camp,
        rcpts,
        cfg,
        {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": "wrong"},
        "--max-wait",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary(proc)
    assert s["delivered"] == 0 and s["bounced"] == 0
    evs = [e for e in events(tmp_path) if e["event"] == "deferred"]
    assert len(evs) == 2 and all("HTTP 403" in e["text"] for e in evs), evs
    assert not sent()


def test_ses_unverified_sender_is_deferred_never_bounced(tmp_path: Path, moto_ses: Any) -> None:
    """moto's own MessageRejected (From not a verified identity: "Did not have
    authority to send from email"; SES: "Email address is not verified") is
    our account's configuration, not the recipient: deferred, and nothing
    suppressed (this test asserted a bounce before: every recipient of a
    campaign from an unverified identity bounced and was suppressed for good)."""
    url, akid, secret_key, sent = moto_ses
    camp = tmp_path / "c.toml"
    camp.write_text('from = "x@unverified.example"\nsubject = "s"\ntext = "t"\n')
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    cfg = f'[transports.s]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{url}"\n[routes]\n"*" = "s"\n'
    proc = send(
        tmp_path,
        camp,
        rcpts,
        cfg,
        {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key},
        "--max-wait",
        "1",
        "--no-dkim",
    )
    s = summary(proc)
    assert s["bounced"] == 0 and s["deferred"] == 1, (s, proc.stderr[-2000:])
    ev = next(e for e in events(tmp_path) if e["event"] == "deferred")
    assert "MessageRejected" in ev["text"] and "not have authority" in ev["text"]
    assert not sent()
    assert _suppressed(tmp_path) == ""


def test_ses_sandbox_unverified_recipient_is_deferred(tmp_path: Path, moto_ses: Any) -> None:
    """A sandbox account may mail only verified identities: SES refuses the
    others with MessageRejected "Email address is not verified. The following
    identities failed the check in region ...". That is our account (out of
    the sandbox, the address is fine): deferred, never suppressed; the
    verified recipient is delivered."""
    url, akid, secret_key, sent = moto_ses
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    rcpts = write_recipients(tmp_path, ["unverified-1@example.net", "a@example.net"])
    rec = Recorder()
    with ThreadedApp(ses_proxy_app(url, rec)) as proxy:
        cfg = f'[transports.s]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n[routes]\n"*" = "s"\n'
        env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "1", "--no-dkim")
    s = summary(proc)
    assert rec.rejected >= 1
    assert s["bounced"] == 0 and s["deferred"] == 1 and s["delivered"] == 1, (
        s,
        proc.stderr[-2000:],
    )
    ev = next(e for e in events(tmp_path) if e["event"] == "deferred")
    assert ev["rcpt"] == "unverified-1@example.net" and "not verified" in ev["text"], ev
    assert len(sent()) == 1
    assert _suppressed(tmp_path) == ""


SAME = 'from = "News <news@sender.example.com>"\nsubject = "Same for all"\ntext = "Hello.\\n"\n'
GROUP = [f"u{i}@example.net" for i in range(6)]


def _suppressed(tmp: Path) -> str:
    r = subprocess.run(
        fastsend_cmd("suppress", "list", "--spool", str(tmp / "spool")),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_mailgun_refusing_one_recipient_of_a_group_bounces_only_that_one(tmp_path: Path) -> None:
    """Identical mail goes to Mailgun as one request whose ``to`` lists several
    recipients. Mailgun refuses such a request whole (400 "to parameter is not
    a valid address") for one address: each recipient is then sent on its own,
    so only the refused one bounces and the others are delivered once each.
    Before: every recipient of the request bounced."""
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    rcpts = write_recipients(tmp_path, [*GROUP[:3], "reject-1@example.net", *GROUP[3:]])
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", "5", "--no-dkim")  # fmt: skip
    s = summary(proc)
    assert rec.rejected >= 1
    assert s["delivered"] == 6 and s["bounced"] == 1, (s, proc.stderr[-2000:])
    assert rec.rejected >= 2, "never grouped"  # the group, then the address alone
    assert dict(rec.recipients) == {r: 1 for r in GROUP}
    bounced = [e for e in events(tmp_path) if e["event"] == "bounced"]
    assert [e["rcpt"] for e in bounced] == ["reject-1@example.net"]


def test_a_slow_answer_after_the_provider_took_the_message_is_no_duplicate(
    tmp_path: Path,
) -> None:
    """A provider that has the message but answers late (here 2.5 s, with the
    transport's ``timeout`` 1 s): the answer is waited for (``answer_timeout``,
    10 minutes by default, as SMTP waits for the reply to the final dot), so
    each message is sent once. Before, ``timeout`` bounded the whole request:
    the answer was given up on, the message deferred and sent again -- twice
    or more to every recipient (HTTP APIs take no idempotency key)."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = ["a@example.net", "b@example.org", "c@example.com"]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com", delay=2.5)) as app:
        # A retry a second after a deferral, expiry after 4 s (not to wait for ever).
        cfg = "[retry]\nmin_backoff = 1\nmax_backoff = 1\nmax_age = 4\n" + (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\ntimeout = 1\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--no-dkim")  # fmt: skip
    s = summary(proc)
    assert dict(rec.recipients) == {a: 1 for a in addrs}, (rec.recipients, s)
    assert s["delivered"] == 3 and s["deferrals"] == 0, (s, proc.stderr[-2000:])


def test_sendgrid_refusing_recipients_of_a_batch_resends_the_rest_in_one_request(
    tmp_path: Path,
) -> None:
    """Identical mail goes to SendGrid as one request with a personalization per
    recipient. SendGrid refuses it whole, naming each personalization it does not
    take (``personalizations.N.to.0.email``): those recipients bounce and the
    others go again in one request. Before: one request per recipient, one after
    the other (41 requests here; up to 1,000 in a row, outside the lane's rate)."""
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    group = [f"u{i}@example.net" for i in range(38)]
    refused = ["reject-1@example.net", "reject-2@example.net"]
    rcpts = write_recipients(
        tmp_path, [*group[:10], refused[0], *group[10:30], refused[1], *group[30:]]
    )
    rec = Recorder()
    with ThreadedApp(sendgrid_app("sg-key", rec)) as app:
        cfg = f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{app.url}"\n[routes]\n"*" = "sg"\n'
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_SG_API_KEY": "sg-key"},
                    "--max-wait", "5", "--no-dkim", "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 38 and s["bounced"] == 2, (s, proc.stderr[-2000:])
    assert dict(rec.recipients) == {r: 1 for r in group}
    assert rec.requests <= 8, f"{rec.requests} requests for 40 recipients"  # 41 before
    bounced = {e["rcpt"]: e for e in events(tmp_path) if e["event"] == "bounced"}
    assert sorted(bounced) == refused
    assert all("Does not contain a valid address" in e["text"] for e in bounced.values())
    delivered = [e for e in events(tmp_path) if e["event"] == "delivered"]
    assert all(e["queue_id"] for e in delivered)


def test_a_request_left_unanswered_is_deferred_saying_it_may_have_been_taken() -> None:
    """The other side of waiting for the answer: a request written whole whose
    answer never comes within ``answer_timeout`` is deferred (at least once, as
    after SMTP's final dot), and the text says the provider may have the
    message; one that could not even connect says so (nothing was sent)."""
    import asyncio

    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import DEFERRED, Envelope
    from fastsend.transports.mailgun import MailgunTransport

    rec = Recorder()
    env = Envelope("a@sender.example.com", ["x@example.net"], b"Subject: s\r\n\r\nbody\r\n", 7)

    async def main(endpoint: str) -> Any:
        spec = TransportSpec(name="mg", kind="mailgun", endpoint=endpoint, region="us",
                             domain="mg.sender.example.com", timeout=1.0, answer_timeout=0.5,
                             secrets={"api_key": "mg-key"})  # fmt: skip
        async with aiohttp.ClientSession() as session:
            return await MailgunTransport(spec, b"").send(session, [env])

    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com", delay=1.5)) as app:
        ans = asyncio.run(main(app.url))
    out = ans[0].outcomes[0]
    assert out.kind == DEFERRED and "may have taken it" in out.text, out
    assert dict(rec.recipients) == {"x@example.net": 1}  # it did
    from tests.conftest import free_port

    out = asyncio.run(main(f"http://127.0.0.1:{free_port()}"))[0].outcomes[0]
    assert out.kind == DEFERRED and out.stage == "connect" and "may have" not in out.text, out


def test_requests_throttled_together_slow_the_lane_once(tmp_path: Path) -> None:
    """Eight requests in flight at once are all answered 429 (no Retry-After):
    that is one signal, the lane slows down once (in-flight bound halved, a
    0.5 s pause) and goes on. Before, each answer slowed it again: the pause
    doubled eight times (0.5 s ... 60 s) and the bound fell to one request,
    so one burst of throttles stopped the lane for a minute and handed its
    mail back deferred."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"t{i}@example.net" for i in range(60)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder(throttle_first=8)
    rec.retry_after = ""
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = RETRY + (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\nmax_connections = 8\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", "10", "--no-dkim", "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert rec.throttled == 8
    assert dict(rec.recipients) == {a: 1 for a in addrs}
    assert s["delivered"] == 60 and s["deferrals"] == 0, (s, proc.stderr[-2000:])
    shaping = [
        orjson.loads(x) for x in (tmp_path / "spool" / "shaping.jsonl").read_bytes().splitlines()
    ]
    slowed = [e for e in shaping if e.get("action") == "provider throttled"]
    # One slow-down per burst (two if the first requests went out in two rounds),
    # never the pause doubling for each answer of a burst (8 events, up to 60 s).
    assert 1 <= len(slowed) <= 2 and slowed[0]["pause"] == 0.5, slowed
    assert max(e["pause"] for e in slowed) <= 1.0 and slowed[-1]["limit"] >= 2, slowed


def test_a_provider_unavailable_with_retry_after_pauses_the_lane(tmp_path: Path) -> None:
    """A provider in maintenance answers 503 with Retry-After (here for 2 s from
    its first request): the lane pauses that long, as for a 429, and its mail
    goes on afterwards, once each, with no attempt spent. Before, a 503 was a
    deferral of each request's mail: the whole lane was sent at the provider
    (every message answered 503, each an attempt) and retried on the retry
    schedule, whatever the Retry-After said."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"m{i}@example.net" for i in range(60)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    rec.unavailable = 2
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = RETRY + (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\nmax_connections = 4\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", "10", "--no-dkim", "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert dict(rec.recipients) == {a: 1 for a in addrs}, (rec.recipients, s)
    assert s["delivered"] == 60 and s["deferrals"] == 0, (s, proc.stderr[-2000:])
    # Only the requests in flight when it first answered 503 (the lane's 4) met it.
    assert 1 <= rec.unavailable_answers <= 4, rec.unavailable_answers
    shaping = [
        orjson.loads(x) for x in (tmp_path / "spool" / "shaping.jsonl").read_bytes().splitlines()
    ]
    paused = [e for e in shaping if e.get("action") == "provider unavailable"]
    assert len(paused) == 1 and paused[0]["pause"] == 2.0, paused


def test_mailgun_refusing_one_of_a_large_group_costs_few_requests(tmp_path: Path) -> None:
    """Mailgun refuses a request of 64 identical recipients whole for one bad
    address, naming none: the recipients go again in halves, each half refused
    whole split again, so about 2·log2(64) requests find the one refused
    recipient, not 64 requests one after the other (up to 1,000 for Mailgun,
    outside the lane's rate). The others are delivered once each."""
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    group = [f"g{i}@example.net" for i in range(63)]
    rcpts = write_recipients(tmp_path, [*group[:40], "reject-9@example.net", *group[40:]])
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            'domain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", "5", "--no-dkim", "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 63 and s["bounced"] == 1, (s, proc.stderr[-2000:])
    assert dict(rec.recipients) == {r: 1 for r in group}
    # ~2*log2(64) (a little more if the group went in two envelopes); 52 before.
    assert rec.requests <= 20, f"{rec.requests} requests to find one refused recipient of 64"
    bounced = [e["rcpt"] for e in events(tmp_path) if e["event"] == "bounced"]
    assert bounced == ["reject-9@example.net"]


def test_ses_refusing_one_recipient_of_a_group_bounces_only_that_one(
    tmp_path: Path, moto_ses: Any
) -> None:
    """Identical mail goes to SES as one SendEmail with several ToAddresses.
    SES refuses it whole for one bad address (BadRequestException "Illegal
    address"): each recipient is then sent on its own, so only the refused one
    bounces and the others are delivered once each (moto keeps each message).
    Before: every recipient of the request bounced."""
    url, akid, secret_key, sent = moto_ses
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    rcpts = write_recipients(tmp_path, [*GROUP[:3], "reject-1@example.net", *GROUP[3:]])
    rec = Recorder()
    with ThreadedApp(ses_proxy_app(url, rec)) as proxy:
        cfg = f'[transports.s]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n[routes]\n"*" = "s"\n'
        env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim")
    s = summary(proc)
    assert rec.rejected >= 1
    assert s["delivered"] == 6 and s["bounced"] == 1, (s, proc.stderr[-2000:])
    assert dict(rec.recipients) == {r: 1 for r in GROUP}
    kept = [
        d.get("ToAddresses", []) if isinstance(d, dict) else d
        for d in (m.destinations for m in sent())
    ]
    assert sorted(r for d in kept for r in d) == sorted(GROUP), kept
    bounced = [e for e in events(tmp_path) if e["event"] == "bounced"]
    assert [e["rcpt"] for e in bounced] == ["reject-1@example.net"]
    assert "Illegal address" in bounced[0]["text"], bounced


def test_ses_invalid_parameter_naming_no_address_bounces_only_that_recipient(
    tmp_path: Path, moto_ses: Any
) -> None:
    """SES refuses a SendEmail whole with InvalidParameterValue for one bad
    recipient, in words that name neither the address nor "address" (here
    "Missing final '@domain'", as SES says of a recipient with no domain). The group is sent again one recipient per request: only the
    refused one bounces, the six others are delivered once each. Before: all
    seven bounced."""
    url, akid, secret_key, _sent = moto_ses
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    rcpts = write_recipients(tmp_path, [*GROUP[:3], "badlocal-1@example.net", *GROUP[3:]])
    rec = Recorder()
    with ThreadedApp(ses_proxy_app(url, rec)) as proxy:
        cfg = f'[transports.s]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n[routes]\n"*" = "s"\n'
        env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim")
    s = summary(proc)
    assert rec.rejected >= 2, "never grouped"  # the group, then the address alone
    assert s["delivered"] == 6 and s["bounced"] == 1, (s, proc.stderr[-2000:])
    assert dict(rec.recipients) == {r: 1 for r in GROUP}
    bounced = [e for e in events(tmp_path) if e["event"] == "bounced"]
    assert [e["rcpt"] for e in bounced] == ["badlocal-1@example.net"]
    assert "InvalidParameterValue" in bounced[0]["text"], bounced


def test_sigv4_matches_botocore() -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from fastsend.transports.sigv4 import Signer

    body = b'{"Content": {"Raw": {"Data": "eA=="}}}'
    url = "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails"
    for token in ("", "session-token-1"):
        ours = Signer("AKIDEXAMPLE", "secret/KEY+1", "eu-west-1", "ses", token).sign(
            "POST", url, {"Content-Type": "application/json"}, body, now=1_700_000_000.0
        )
        req = AWSRequest("POST", url, data=body, headers={"Content-Type": "application/json",
                                                          "X-Amz-Date": ours["X-Amz-Date"]})  # fmt: skip
        creds = Credentials("AKIDEXAMPLE", "secret/KEY+1", token or None)
        signer = SigV4Auth(creds, "ses", "eu-west-1")
        req.context["timestamp"] = ours["X-Amz-Date"]
        req.headers["host"] = "email.eu-west-1.amazonaws.com"
        if token:
            req.headers["X-Amz-Security-Token"] = token
        canonical = signer.canonical_request(req)
        sts = signer.string_to_sign(req, canonical)
        sig = signer.signature(sts, req)
        assert ours["Authorization"].endswith(f"Signature={sig}")
        assert (
            "SignedHeaders=" + signer.signed_headers(signer.headers_to_sign(req))
            in ours["Authorization"]
        )


def test_ses_max_send_rate_shapes_the_lane_and_campaign_routes(tmp_path: Path) -> None:
    """With no rate configured, the account's MaxSendRate (GetAccount) becomes
    the lane's rate (a shaping event says so); the route is chosen by campaign
    name over the "*" route."""
    from aiohttp import web

    seen: list[str] = []

    async def account(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", "")[:40])
        return web.json_response(
            {"SendQuota": {"Max24HourSend": 50000, "MaxSendRate": 40, "SentLast24Hours": 0}}
        )

    async def send_email(request: web.Request) -> web.Response:
        assert request.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDQ/")
        doc = await request.json()
        assert doc["ConfigurationSetName"] == "fastsend-events"
        assert doc["EmailTags"][0]["Name"] == "fastsend"
        return web.json_response(
            {"MessageId": f"0102-{len(seen)}-{doc['Destination']['ToAddresses'][0]}"}
        )

    app = web.Application()
    app.router.add_get("/v2/email/account", account)
    app.router.add_post("/v2/email/outbound-emails", send_email)
    camp, _ = dkim_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"q{i}@example.net" for i in range(30)])
    with ThreadedApp(app) as srv:
        cfg = (
            f'[transports.ses-q]\nkind = "ses"\nregion = "us-east-1"\nendpoint = "{srv.url}"\n'
            'configuration_set = "fastsend-events"\n'
            '[routes]\n"*" = "127.0.0.1:9"\n"campaign:provider-test" = "ses-q"\n'
        )
        proc = send(
            tmp_path, camp, rcpts, cfg, {"AWS_ACCESS_KEY_ID": "AKIDQ", "AWS_SECRET_ACCESS_KEY": "s"}
        )
    assert summary(proc)["delivered"] == 30, proc.stderr[-2000:]
    assert seen and all(s.startswith("AWS4-HMAC-SHA256") for s in seen)
    shaping = [
        orjson.loads(x) for x in (tmp_path / "spool" / "shaping.jsonl").read_bytes().splitlines()
    ]
    rates = [e["rate"] for e in shaping if e.get("action") == "rate from provider quota"]
    assert rates and all(r == 40.0 for r in rates)  # 40/s: one bucket the 2 workers share
    assert all(
        e["queue_id"].startswith("0102-") for e in events(tmp_path) if e["event"] == "delivered"
    )


def test_ses_account_rate_holds_for_every_node_together(
    tmp_path: Path, moto_ses: Any, redis_server: Any
) -> None:
    """SES's MaxSendRate is the account's, one quota whichever node sends: two
    nodes on one Redis spool, each with its own list, read it from the account
    (``GET /v2/email/account``: 8/s, no ``rate`` configured) and together stay
    within it as SES counts: in any 5 s SES accepts at most the burst, 5 s of
    rate and 2 s of slack. Before: each node took the whole quota (two nodes
    sent twice it: SES answers "Maximum sending rate exceeded")."""
    import bisect

    from tests.test_multinode_outage import _send_nodes

    url, akid, secret_key, _sent = moto_ses
    rate, per_node, window = 8, 60, 5.0  # 15 s at the rate; two nodes each at it: 7.5 s
    rec = Recorder()
    with ThreadedApp(ses_proxy_app(url, rec, max_send_rate=rate)) as proxy:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            RETRY
            + f'[transports.ses-eu]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n'
            '[routes]\n"*" = "ses-eu"\n'
            "[delivery]\nwindow = 16\n"  # both nodes take mail from the one queue
        )
        env = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
        env |= {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        ran = _send_nodes(tmp_path, redis_server, cfg, per_node, env, "ses")
    for p, _out, err in ran:
        assert p.returncode == 0, err[-3000:]
    want = {f"{n}{i}@d{i % 5}.example" for n in "ab" for i in range(per_node)}
    assert dict(rec.recipients) == {r: 1 for r in want}
    times = sorted(rec.times)
    most = max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))
    allowed = rate + rate * window + 2 * rate
    assert most <= allowed, f"{most} accepted within {window:g} s; MaxSendRate allows {allowed}"


def test_sendgrid_gets_the_from_fastsend_judged_and_header_text_without_line_breaks(
    tmp_path: Path,
) -> None:
    """Raw MIME a tenant sends through `fastsend serve` to a SendGrid route (which
    takes the message's parts, not its bytes):

    - a From whose display name is an encoded word spelling another address
      ("=?utf-8?q?=3Cceo=40bank.example=3E?= <news@tenant.example>") goes with
      the address fastsend judged the tenant's (before: the header was decoded
      whole, then parsed, and SendGrid sent From ceo@bank.example);
    - an encoded word holding CR LF (Subject, any other header) reaches SendGrid
      without the line break (before: "hi\\r\\nBcc: victim@..." as the subject);
    - UTF-8 header text (RFC 6532) is sent (before: a local error each attempt,
      retried until the message expired);
    - a mail client's "Content-Disposition: inline" body is the content (before:
      taken for an attachment, the request had no content: bounced)."""
    import asyncio
    import sys

    import aiohttp
    from tests.conftest import free_port, wait_port

    rec = Recorder()
    port = free_port()
    spoof = (
        "From: =?utf-8?q?=3Cceo=40bank.example=3E?= <news@tenant.example>\r\n"
        "Subject: =?utf-8?q?hi=0D=0ABcc=3A_victim=40evil.example?=\r\n"
        "X-Campaign: =?utf-8?b?YQ0KQmNjOiB2QGV2aWwuZXhhbXBsZQ==?=\r\n\r\nbody one\r\n"
    )
    utf8 = "From: Jörg <news@tenant.example>\r\nSubject: Grüße\r\n\r\nbody two\r\n"
    inline = (
        "From: news@tenant.example\r\nSubject: three\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\nContent-Disposition: inline\r\n\r\n"
        "body three\r\n--b\r\nContent-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="a.pdf"\r\n\r\nxx\r\n--b--\r\n'
    )
    with ThreadedApp(sendgrid_app("sg-key", rec)) as sg:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[spool]\ndir = "spool"\n[workers]\ncount = 1\n[api]\nlisten = "127.0.0.1:{port}"\n'
            '[tenants.acme]\ndomains = ["tenant.example"]\n'
            f'[transports.sg]\nkind = "sendgrid"\nendpoint = "{sg.url}"\n[routes]\n"*" = "sg"\n'
        )
        env = {**os.environ, "FASTSEND_SG_API_KEY": "sg-key"}
        env.pop("FASTSEND_NO_EXTENSIONS", None)
        api_key = subprocess.run(
            [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", "acme", "-c", str(cfg)],
            check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
        ).stdout.strip()  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "fastsend", "serve", "-c", str(cfg)],
                                stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)  # fmt: skip
        try:
            wait_port("127.0.0.1", port, timeout=60)
            base = f"http://127.0.0.1:{port}"

            async def main() -> list[dict[str, Any]]:
                auth = {"Authorization": f"Bearer {api_key}"}
                ids = []
                async with aiohttp.ClientSession() as s:
                    for n, raw in enumerate((spoof, utf8, inline)):
                        msg = {"from": "news@tenant.example", "to": f"r{n}@example.net", "raw": raw}
                        async with s.post(base + "/v1/messages", json=msg, headers=auth) as r:
                            assert r.status == 202, await r.text()
                            ids.append((await r.json())["messages"][0]["ids"][0])
                    got: list[dict[str, Any]] = []
                    for _ in range(300):
                        got = []
                        for mid in ids:
                            async with s.get(f"{base}/v1/messages/{mid}", headers=auth) as r:
                                got.append(await r.json())
                        if all(m["state"] in ("delivered", "bounced", "failed") for m in got):
                            break
                        await asyncio.sleep(0.05)
                    return got

            got = asyncio.run(main())
        finally:
            proc.terminate()
            proc.wait(30)
    assert [m["state"] for m in got] == ["delivered"] * 3, got
    by_rcpt = {b["personalizations"][0]["to"][0]["email"]: b for b in rec.accepted}
    one, two, three = (by_rcpt[f"r{n}@example.net"] for n in range(3))
    assert one["from"]["email"] == "news@tenant.example", one["from"]
    for text in (one["subject"], *one.get("headers", {}).values()):
        assert "\r" not in text and "\n" not in text, text
    assert two["subject"] == "Grüße" and two["from"] == {
        "email": "news@tenant.example",
        "name": "Jörg",
    }
    assert three["content"] == [{"type": "text/plain", "value": "body three"}], three
    assert [a["filename"] for a in three["attachments"]] == ["a.pdf"]


def test_a_wrong_endpoint_defers_and_is_never_followed() -> None:
    """An endpoint that is not the provider's API (http:// where the API
    redirects to https, an old path, a gateway answering 405 to the method)
    is our configuration, not the recipients': each message is deferred, the
    redirect named and never followed (a POST followed as a GET, the API key
    sent on). Before, aiohttp followed the 301 as a GET, the 405 it met was
    taken for a rejection of the message, and every message sent through
    the transport bounced."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import DEFERRED, Envelope
    from fastsend.transports.mailgun import MailgunTransport
    from fastsend.transports.sendgrid import SendGridTransport

    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        raise web.HTTPMovedPermanently("/elsewhere" + request.path)

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=405, text="Method Not Allowed")

    app = web.Application()
    app.router.add_post("/v3/{domain}/messages.mime", moved)
    app.router.add_post("/v3/mail/send", elsewhere)  # a gateway refusing the method
    app.router.add_route("*", "/elsewhere/{tail:.*}", elsewhere)
    env = Envelope("a@sender.example.com", ["x@example.net"],
                   b"From: a@sender.example.com\r\nSubject: s\r\n\r\nbody\r\n", 7)  # fmt: skip

    async def main(url: str) -> list[Any]:
        mg = TransportSpec(name="mg", kind="mailgun", endpoint=url, region="us",
                           domain="mg.sender.example.com", secrets={"api_key": "mg-key"})  # fmt: skip
        sg = TransportSpec(name="sg", kind="sendgrid", endpoint=url, secrets={"api_key": "sg-key"})
        async with aiohttp.ClientSession() as session:
            a = await MailgunTransport(mg, b"").send(session, [env])
            b = await SendGridTransport(sg, b"").send(session, [env])
        return [a[0].outcomes[0], b[0].outcomes[0]]  # type: ignore[index]

    with ThreadedApp(app) as server:
        outs = asyncio.run(main(server.url))
    assert all(o.kind == DEFERRED for o in outs), outs
    assert "redirect to /elsewhere/v3/mg.sender.example.com/messages.mime" in outs[0].text, outs
    assert "HTTP 405" in outs[1].text, outs
    assert seen == ["POST /v3/mg.sender.example.com/messages.mime", "POST /v3/mail/send"], seen


def test_a_lane_paused_past_the_horizon_hands_its_mail_back(tmp_path: Path) -> None:
    """A provider in maintenance for a while (503, Retry-After: 100): the lane
    pauses, and the mail it holds goes back to the supervisor unattempted until
    the pause ends, rather than waiting in the worker: the provider is asked
    once, not again during the pause, and a run with nothing else to do ends
    (--max-wait) with the mail still queued. Before, the mail waited in the
    worker's lane (up to 10 minutes), and the run (or a SIGTERM drain) waited
    for it."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"p{i}@example.net" for i in range(20)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    rec.unavailable = 100
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            RETRY + f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            'max_connections = 1\ndomain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        full = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
        full["FASTSEND_MG_API_KEY"] = "mg-key"
        proc = subprocess.run(
            fastsend_cmd("send", str(camp), "-r", str(rcpts), "-c", str(cfg), "--spool",
                         str(tmp_path / "spool"), "--json", "--no-progress", "--workers", "1",
                         "--max-wait", "5", "--no-dkim"),
            capture_output=True, text=True, timeout=60, env=full,
        )  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 0 and s["bounced"] == 0, (s, proc.stderr[-2000:])
    assert rec.unavailable_answers == 1, rec.unavailable_answers  # asked once, then paused
    assert not rec.recipients
    q = subprocess.run(
        fastsend_cmd("queue", "--spool", str(tmp_path / "spool"), "--json"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr
    states = orjson.loads(q.stdout)["states"]
    assert states["queued"] + states["deferred"] == 20 and states["deferred"] <= 1, states


def test_a_request_left_unanswered_does_not_fail_over_to_the_next_transport(
    tmp_path: Path,
) -> None:
    """Route ``["mg", "sg"]``: Mailgun takes each message but answers after the
    transport's ``answer_timeout``. Its outcome is unknown (Mailgun has the
    message and sends it), so it is an attempt deferred, as SMTP's unanswered
    final dot: never handed to SendGrid at once. Before, it failed over like a
    refusal and every recipient got the message twice, once through each
    provider, within the same second."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = ["a@example.net", "b@example.org"]
    rcpts = write_recipients(tmp_path, addrs)
    mg_rec, sg_rec = Recorder(), Recorder()
    with (
        ThreadedApp(mailgun_app("mg-key", mg_rec, "mg.sender.example.com", delay=2.0)) as mg,
        ThreadedApp(sendgrid_app("sg-key", sg_rec)) as sg,
    ):
        # No retry within max_age: the one attempt's outcome stays unknown.
        cfg = "[retry]\nmin_backoff = 30\nmax_backoff = 30\nmax_age = 2\n" + (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{mg.url}"\nanswer_timeout = 0.5\n'
            f'domain = "mg.sender.example.com"\n[transports.sg]\nkind = "sendgrid"\n'
            f'endpoint = "{sg.url}"\n[routes]\n"*" = ["mg", "sg"]\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg,
                    {"FASTSEND_MG_API_KEY": "mg-key", "FASTSEND_SG_API_KEY": "sg-key"},
                    "--no-dkim")  # fmt: skip
    s = summary(proc)
    assert dict(mg_rec.recipients) == {a: 1 for a in addrs}, (mg_rec.recipients, s)
    assert not sg_rec.recipients, f"sent again through SendGrid: {dict(sg_rec.recipients)}"
    evs = events(tmp_path)
    assert not [e for e in evs if e["event"] == "failover"]
    # Deferred, and expired at once here (its retry would come past max_age).
    ends = [e for e in evs if e["event"] in ("deferred", "expired")]
    assert {e["rcpt"] for e in ends} == set(addrs), (s, proc.stderr[-2000:])
    assert all("may have taken it" in e["text"] and e["stage"] == "data" for e in ends), ends


def test_sendgrid_sends_mail_with_no_body_text_attachments_only_or_empty() -> None:
    """SendGrid's v3 API refuses a request without content, or with an empty
    content value ("The content value must be a string at least one character
    in length", 400), while SMTP takes such a message: raw MIME of only an
    attachment (a scanner's PDF), or an empty text body. Both are sent (a
    one-space text part stands for the body that is not there), the
    attachment with them. Before, each such message bounced, every recipient."""
    import asyncio

    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import DELIVERED, Envelope
    from fastsend.transports.sendgrid import SendGridTransport

    pdf = base64_lines(b"%PDF-1.4 scanned page\n" * 20)
    only_attachment = (
        "From: scan@sender.example.com\r\nTo: a@example.net\r\nSubject: scan\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="scan.pdf"\r\n\r\n'
        f"{pdf}--b1--\r\n"
    ).encode()
    empty_text = (
        b"From: scan@sender.example.com\r\nTo: b@example.net\r\nSubject: ping\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    rec = Recorder()

    async def main(endpoint: str) -> Any:
        spec = TransportSpec(name="sg", kind="sendgrid", endpoint=endpoint,
                             secrets={"api_key": "sg-key"})  # fmt: skip
        t = SendGridTransport(spec, b"")
        async with aiohttp.ClientSession() as session:
            return [
                await t.send(session, [Envelope("scan@sender.example.com", [r], data, n)])
                for n, (r, data) in enumerate(
                    [("a@example.net", only_attachment), ("b@example.net", empty_text)]
                )
            ]

    with ThreadedApp(sendgrid_app("sg-key", rec)) as app:
        answers = asyncio.run(main(app.url))
    outs = [a[0].outcomes[0] for a in answers]
    assert all(o.kind == DELIVERED for o in outs), outs
    assert dict(rec.recipients) == {"a@example.net": 1, "b@example.net": 1}
    first = rec.accepted[0]
    assert [a["filename"] for a in first["attachments"]] == ["scan.pdf"]
    assert base64.b64decode(first["attachments"][0]["content"]).startswith(b"%PDF-1.4")


def base64_lines(data: bytes) -> str:
    import base64 as b64

    enc = b64.b64encode(data).decode()
    return "".join(enc[i : i + 76] + "\r\n" for i in range(0, len(enc), 76))


def test_mailgun_gets_each_recipient_of_a_group_in_its_own_to_field() -> None:
    """Identical mail to several recipients is one Mailgun request: each
    recipient its own ``to`` field (Mailgun takes the parameter several times),
    so a quoted local part holding a comma or a space reaches Mailgun whole.
    Before, one field joined them with commas and a reader splitting it on its
    commas (this stand-in did) saw '"a' and 'b"@example.net'."""
    import asyncio

    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import DELIVERED, Envelope
    from fastsend.transports.mailgun import MailgunTransport

    rcpts = ['"a,b"@example.net', '"john doe"@example.org', "c@example.com"]
    env = Envelope("news@sender.example.com", rcpts, b"Subject: s\r\n\r\nbody\r\n", [1, 2, 3])
    rec = Recorder()

    async def main(endpoint: str) -> Any:
        spec = TransportSpec(name="mg", kind="mailgun", endpoint=endpoint, region="us",
                             domain="mg.sender.example.com", secrets={"api_key": "mg-key"})  # fmt: skip
        async with aiohttp.ClientSession() as session:
            return await MailgunTransport(spec, b"").send(session, [env])

    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        ans = asyncio.run(main(app.url))
    assert [o.kind for o in ans[0].outcomes] == [DELIVERED] * 3, ans
    assert rec.to_fields == [3]
    assert dict(rec.recipients) == {r: 1 for r in rcpts}


def test_mailgun_refusing_our_sandbox_domain_defers_and_bounces_no_one() -> None:
    """Mailgun's 400 "Domain D is not allowed to send: Sandbox subdomains are
    for test purposes only ... add the address to authorized recipients" is
    about our account, not the recipient: deferred, alone or in a group (not
    split in halves), never a bounce. Before, each recipient bounced."""
    import asyncio

    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import DEFERRED, Envelope
    from fastsend.transports.mailgun import MailgunTransport

    alone = Envelope(
        "n@sender.example.com", ["sandbox-1@example.net"], b"Subject: s\r\n\r\nb\r\n", 1
    )
    group = Envelope("n@sender.example.com", ["a@example.net", "sandbox-2@example.net"],
                     b"Subject: s\r\n\r\nb\r\n", [2, 3])  # fmt: skip
    rec = Recorder()

    async def main(endpoint: str) -> Any:
        spec = TransportSpec(name="mg", kind="mailgun", endpoint=endpoint, region="us",
                             domain="mg.sender.example.com", secrets={"api_key": "mg-key"})  # fmt: skip
        t = MailgunTransport(spec, b"")
        async with aiohttp.ClientSession() as session:
            return [await t.send(session, [alone]), await t.send(session, [group])]

    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        answers = asyncio.run(main(app.url))
    outs = [o for a in answers for o in a[0].outcomes]
    assert [o.kind for o in outs] == [DEFERRED] * 3, outs
    assert all("authorized recipients" in o.text for o in outs)
    assert rec.requests == 2 and not rec.recipients  # the group not split


def test_a_provider_paused_for_long_hands_its_mail_to_the_routes_next_transport(
    tmp_path: Path,
) -> None:
    """Route ``["mg", "sg"]``: Mailgun is in maintenance (503, Retry-After 600
    s) from its first request on. Its lane pauses for ten minutes; the mail it
    holds and the mail dispatched to it meanwhile goes on to SendGrid, never
    attempted at Mailgun ("failover" events say why). Before, only the
    requests in flight when the 503 came failed over: the rest was handed back
    to wait out the pause (and then one request each ten minutes failed over),
    so a backup transport barely served while the first one was down."""
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"p{i}@example.net" for i in range(40)]
    rcpts = write_recipients(tmp_path, addrs)
    mg_rec, sg_rec = Recorder(), Recorder()
    mg_rec.unavailable = 600
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
                    {"FASTSEND_MG_API_KEY": "mg-key", "FASTSEND_SG_API_KEY": "sg-key"},
                    "--no-dkim", "--max-wait", "5")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == len(addrs), (s, proc.stderr[-2000:])
    assert dict(sg_rec.recipients) == {a: 1 for a in addrs}
    assert not mg_rec.recipients and mg_rec.unavailable_answers <= 4, mg_rec.unavailable_answers
    fo = [e for e in events(tmp_path) if e["event"] == "failover"]
    assert {e["rcpt"] for e in fo} == set(addrs)
    assert all(e["from"] == "mg" and e["to"] == "sg" for e in fo)


def test_groups_larger_than_a_provider_request_are_cut_to_its_limit(
    tmp_path: Path, moto_ses: Any
) -> None:
    """Identical mail grouped by ``recipients_per_transaction`` = 120 (an SMTP
    setting) goes to SES (moto, which refuses over 50 destinations as SES does:
    MessageRejected "Too many recipients.") in requests of at most 50. Before,
    each group of over 50 was refused whole and all its recipients bounced.
    (Mailgun's limit is 500 a request: its o:, h:, v: options may not pass 16
    kB, and v:fastsend holds each recipient's id token.)"""
    url, akid, secret_key, sent = moto_ses
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    addrs = [f"g{i}@example.net" for i in range(120)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    with ThreadedApp(ses_proxy_app(url, rec)) as proxy:
        cfg = "[delivery]\nrecipients_per_transaction = 120\n" + (
            f'[transports.ses-eu]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n'
            '[routes]\n"*" = "ses-eu"\n'
        )
        env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim",
                    "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 120 and s["bounced"] == 0, (s, proc.stderr[-2000:])
    assert dict(rec.recipients) == {a: 1 for a in addrs}
    assert len(sent()) >= 3 and rec.rejected == 0


def test_mailgun_requests_keep_their_options_under_16_kb() -> None:
    """A group of 700 recipients is cut into Mailgun requests of at most 500,
    whose v:fastsend (a token per recipient) stays under Mailgun's 16 kB of
    o:, h: and v: options."""
    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import Envelope
    from fastsend.transports.mailgun import MailgunTransport

    spec = TransportSpec(name="mg", kind="mailgun", region="us", domain="mg.example.com",
                         secrets={"api_key": "k"})  # fmt: skip
    t = MailgunTransport(spec, b"s" * 32)
    ids = [10**17 + i for i in range(700)]
    env = Envelope("a@example.com", [f"r{i}@example.net" for i in ids], b"x\r\n", ids)
    parts = t.fit([env])
    assert [len(p.rcpts) for p in parts] == [500, 200]
    assert [p.tag for p in parts] == [ids[:500], ids[500:]]
    for p in parts:
        body, ctype = t.form(p)
        from tests._provider_servers import multipart_form

        form = multipart_form(ctype, body)
        assert form is not None
        assert sum(len(v) for v in form["v:fastsend"]) < 16 * 1024


def test_a_provider_refusing_the_message_for_its_size_says_so() -> None:
    """HTTP 413 (Content Too Large) or SES's "Message length is more than N
    bytes" is the message's size: 5.3.4, reason mesgtoobig (it read as
    "onhold", 5.0.0); a recipient's refusal is not taken for one."""
    from fastsend.transports.http import map_status

    for status, text in [(413, "Payload Too Large"),
                         (400, "MessageRejected: Message length is more than 41943040 bytes long")]:  # fmt: skip
        o = map_status("p", status, text)
        assert (o.kind, o.enhanced) == ("failed", "5.3.4") and "mesgtoobig" in o.text, o
    assert map_status("p", 400, "Illegal address").enhanced != "5.3.4"


def test_a_tenants_headers_never_steer_the_provider(tmp_path: Path) -> None:
    """A campaign's [headers] (a tenant's content) naming the providers'
    control headers -- X-SES-CONFIGURATION-SET (SES: where bounces and
    complaints go), X-SMTPAPI (SendGrid's relay: more recipients, tracking
    off), X-Mailgun-Sending-Ip / X-Mailgun-Variables (another tenant's IP, the
    ids webhooks echo) -- reaches neither Mailgun's MIME nor SendGrid's headers;
    other headers do. Before, each went to the provider as written."""
    camp = tmp_path / "c.toml"
    camp.write_text(
        'from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n'
        "[headers]\n"
        '"X-SES-CONFIGURATION-SET" = "no-events"\n'
        '"X-SMTPAPI" = "{\\"to\\": [\\"victim@example.com\\"]}"\n'
        '"X-Mailgun-Sending-Ip" = "192.0.2.77"\n'
        '"x-mailgun-variables" = "{\\"fastsend\\": \\"1-forged\\"}"\n'
        '"X-Campaign-Ref" = "spring"\n'
    )
    rcpts = write_recipients(tmp_path, ["a@example.net", "b@example.org"])
    mg_rec, sg_rec = Recorder(), Recorder()
    with (
        ThreadedApp(mailgun_app("mg-key", mg_rec, "mg.sender.example.com")) as mg,
        ThreadedApp(sendgrid_app("sg-key", sg_rec)) as sg,
    ):
        cfg = (
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{mg.url}"\n'
            f'domain = "mg.sender.example.com"\n[transports.sg]\nkind = "sendgrid"\n'
            f'endpoint = "{sg.url}"\n[routes]\n"example.net" = "mg"\n"example.org" = "sg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg,
                    {"FASTSEND_MG_API_KEY": "mg-key", "FASTSEND_SG_API_KEY": "sg-key"},
                    "--no-dkim", "--max-wait", "5")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 2, (s, proc.stderr[-2000:])
    ((_r, mime, _v),) = mg_rec.accepted
    head = mime.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-campaign-ref: spring" in head
    assert b"x-ses-" not in head and b"x-smtpapi" not in head and b"x-mailgun-" not in head, head
    (doc,) = sg_rec.accepted
    names = {k.lower() for k in doc.get("headers", {})}
    assert "x-campaign-ref" in names
    assert not {n for n in names if n.startswith(("x-ses-", "x-smtpapi", "x-mailgun-"))}, names


def test_grouped_mail_keeps_to_the_accounts_send_rate(tmp_path: Path, moto_ses: Any) -> None:
    """SES counts recipients against MaxSendRate. Identical mail grouped 50 to
    a message, at an account rate of 20 a second: each request carries at most
    the lane's second's worth (20), so every recipient is sent, none refused
    for the rate twice. Before, the lane charged a 50-recipient request as 20
    and sent it (the burst, 20): SES (here its stand-in, refusing any request over the
    second's recipients) throttled every one, until each group was given up
    deferred."""
    url, akid, secret_key, _sent = moto_ses
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    addrs = [f"r{i}@example.net" for i in range(60)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder(rate=20)
    with ThreadedApp(ses_proxy_app(url, rec, max_send_rate=20)) as proxy:
        cfg = (
            f'[transports.ses-eu]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n'
            '[routes]\n"*" = "ses-eu"\n'
        )
        env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim",
                    "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 60, (s, rec.throttled, proc.stderr[-2000:])
    assert dict(rec.recipients) == {a: 1 for a in addrs}
    assert rec.throttled <= 2, rec.throttled


def test_sendgrid_keeps_the_recipients_display_name() -> None:
    """SendGrid writes To from the personalization: the rendered To's display
    name ("Ann Lée <ann@example.net>", an encoded word) goes there with the
    address, so the recipient sees the To fastsend rendered. Before, only the
    bare address."""
    import asyncio

    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.outcome import Envelope
    from fastsend.transports.sendgrid import SendGridTransport

    data = (b"From: news@sender.example.com\r\nTo: =?utf-8?q?Ann_L=C3=A9e?= <Ann@Example.net>\r\n"
            b"Subject: s\r\n\r\nbody\r\n")  # fmt: skip
    rec = Recorder()

    async def main(endpoint: str) -> Any:
        spec = TransportSpec(name="sg", kind="sendgrid", endpoint=endpoint,
                             secrets={"api_key": "sg-key"})  # fmt: skip
        async with aiohttp.ClientSession() as session:
            env = Envelope("news@sender.example.com", ["ann@example.net"], data, 1)
            return await SendGridTransport(spec, b"").send(session, [env])

    with ThreadedApp(sendgrid_app("sg-key", rec)) as app:
        asyncio.run(main(app.url))
    (doc,) = rec.accepted
    assert doc["personalizations"][0]["to"] == [{"email": "ann@example.net", "name": "Ann Lée"}]


def test_an_unanswered_quota_read_does_not_hold_the_ses_lane() -> None:
    """SES's GetAccount (the account's MaxSendRate, read before the lane's
    first send) left unanswered is given up after the transport's
    ``timeout``: a read, nothing lost (the lane then goes without the quota).
    Before, it was waited for as long as a sent message's answer
    (answer_timeout, 10 minutes) and the lane sent nothing meanwhile."""
    import asyncio
    import socket

    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.transports.ses import SESTransport

    silent = socket.socket()  # takes the connection (backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    port = silent.getsockname()[1]

    async def main() -> BaseException | None:
        spec = TransportSpec(name="ses-q", kind="ses", region="us-east-1",
                             endpoint=f"http://127.0.0.1:{port}", timeout=0.5,
                             answer_timeout=600.0,
                             secrets={"access_key_id": "AKIDQ", "secret_access_key": "s"})  # fmt: skip
        async with aiohttp.ClientSession() as session:
            try:
                await asyncio.wait_for(SESTransport(spec, b"").setup(session), 20)
            except BaseException as e:  # what ended the read is the point
                return e
        return None

    try:
        ended = asyncio.run(main())
    finally:
        silent.close()
    # aiohttp's own timeout (the transport's), not the 20 s guard around it.
    assert isinstance(ended, aiohttp.ClientError), repr(ended)


def test_max_recipients_above_the_providers_limit_is_cut_to_it(
    tmp_path: Path, moto_ses: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_recipients = 120`` on an SES transport (SES takes 50 destinations
    a request): requests still carry at most 50, and the config says it cut
    the setting. Before, each group of identical mail over 50 was one request
    SES refused whole ("Too many recipients"), and every recipient bounced."""
    from fastsend.config import from_dict

    url, akid, secret_key, _sent = moto_ses
    camp = tmp_path / "c.toml"
    camp.write_text(SAME)
    addrs = [f"g{i}@example.net" for i in range(120)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    with ThreadedApp(ses_proxy_app(url, rec)) as proxy:
        cfg = "[delivery]\nrecipients_per_transaction = 120\n" + (
            f'[transports.ses-eu]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{proxy.url}"\n'
            'max_recipients = 120\n[routes]\n"*" = "ses-eu"\n'
        )
        env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret_key}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim",
                    "--workers", "1")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 120 and s["bounced"] == 0, (s, proc.stderr[-2000:])
    assert dict(rec.recipients) == {a: 1 for a in addrs}
    monkeypatch.setenv("FASTSEND_S_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("FASTSEND_S_SECRET_ACCESS_KEY", "b")
    c = from_dict({"transports": {"s": {"kind": "ses", "region": "eu-west-1",
                                        "max_recipients": 120}}})  # fmt: skip
    assert c.transports["s"].recipients_limit() == 50
    assert any("max_recipients" in w and "50" in w for w in c.warnings), c.warnings
