"""Providers and relays, session 21's audit: a transport's rate shared by the
node's workers (transports.slots.SharedGcra)."""

from __future__ import annotations

import bisect
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests._engine_helpers import summary, write_recipients
from tests._provider_servers import Recorder, ThreadedApp, mailgun_app
from tests.test_transports_http import events, send

# Two workers, one address each; the campaign's pool has worker 0's only: all
# its mail goes through that one worker (delivery by the pool's owners).
ONE_WORKER_POOL = (
    '[ips]\nsource = ["127.0.0.2", "127.0.0.3"]\n'
    '[pools]\ndefault = "one"\n[pools.one]\nips = ["127.0.0.2"]\n'
)


def _most_within(times: list[float], window: float) -> int:
    """The most events of ``times`` within any ``window`` seconds."""
    ts = sorted(times)
    return max((bisect.bisect_left(ts, t + window) - i for i, t in enumerate(ts)), default=0)


def test_shared_gcra_is_one_bucket_for_every_process(tmp_path: Path) -> None:
    """transports.slots.SharedGcra: what one process takes, another finds
    taken (one bucket, not one each); its own lower rate costs the one
    timeline more; a TAT left by another boot is forgotten."""
    from fastsend.transports.slots import SharedGcra

    path = str(tmp_path / "transport-rates" / "relay1")
    now = 1000.0
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # another worker takes the whole burst at ``now``
        try:
            b = SharedGcra(path, 10.0, 10)
            got = sum(1 for _ in range(12) if b.acquire(now) == 0.0)
            os.write(from_child, bytes([got]))
        finally:
            os._exit(0)
    got = os.read(to_parent, 1)[0]
    os.waitpid(pid, 0)
    assert got == 10
    me = SharedGcra(path, 10.0, 10)
    assert me.available(now) == 0 and me.acquire(now) == pytest.approx(0.1)
    assert me.available(now + 0.5) == 5 and me.acquire(now + 0.5, 5) == 0.0
    assert me.available(now + 0.5) == 0
    me.set_rate(5.0, burst=1)  # this worker's lower rate: each event costs it 0.2 s
    assert me.acquire(now + 1.0) == pytest.approx(0.5) and me.acquire(now + 1.5) == 0.0
    assert me.acquire(now + 1.6) == pytest.approx(0.1)
    # A TAT from another boot (another CLOCK_MONOTONIC) is not this one's debt.
    import struct

    with open(path, "r+b") as f:
        f.write(struct.pack("=qq", int(5e18), 12345))
    assert me.available(now + 2) == 1
    me.close()


def test_a_providers_rate_is_the_nodes_a_worker_alone_may_use_all_of_it(tmp_path: Path) -> None:
    """A transport's ``rate`` is its messages a second across all workers
    (examples/fastsend.toml). Each worker had its own ``rate / workers``: a
    campaign whose pool only worker 0 sends from went at half the rate with
    two workers (Mailgun at 20/s: at most 30 in any 2 s, 10 at once and 10/s).
    Now the workers share one bucket: the busiest 2 s see more than the half
    rate could give, and never more than the rate allows (a second's burst
    and 2 s of it), as the provider counts."""
    rate = 20
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"m{i}@example.{('net', 'org', 'com')[i % 3]}" for i in range(100)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = (
            ONE_WORKER_POOL + f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            f'rate = {rate}\ndomain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", "5", "--no-dkim")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == len(addrs) and rec.recipients == Counter(addrs), (s, proc.stderr[-2000:])
    most = _most_within(rec.times, 2.0)
    half = rate // 2 + 2 * rate // 2  # what rate / 2 workers allowed in 2 s
    assert half < most <= rate + 2 * rate, most


def test_a_relays_small_rate_holds_across_workers_and_addresses(tmp_path: Path) -> None:
    """A relay's ``rate`` of 1/s with two workers of two addresses each: every
    (worker, address) lane had a rate of 1/4 and a burst of one: four
    messages went at once (four sessions, one per lane). One bucket for the
    node: one at a time, a second apart (at most 2 within any 0.5 s: a burst
    of one, and one more for the delays of a loaded machine)."""
    import ssl

    import trustme
    from tests.test_transports_relay import ENV, Relay, RelayHandler, relay_config

    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"s{i}@example.{('net', 'org', 'com')[i % 3]}" for i in range(6)]
    rcpts = write_recipients(tmp_path, addrs)
    times: list[float] = []

    class Timed(RelayHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            import time

            times.extend([time.monotonic()] * len(envelope.rcpt_tos))
            return await super().handle_DATA(server, session, envelope)

    handler = Timed()
    with Relay(handler, ctx, implicit=False) as relay:
        ips = '[ips]\nsource = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]\n'
        cfg = "[delivery]\nbatch_size = 1\npipeline = 1\n" + ips + relay_config(
            relay.port, ca_path, retry=False, extra="rate = 1\n"
        )
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "5", "--no-dkim")
    s = summary(proc)
    got = Counter(r for rs, _ in handler.messages for r in rs)
    assert s["delivered"] == len(addrs) and got == Counter(addrs), (s, proc.stderr[-2000:])
    assert _most_within(times, 0.5) <= 2, sorted(t - min(times) for t in times)


# AWS's SignatureDoesNotMatch text (SigV4: the canonical request and the string
# to sign it expected, echoing our headers: the session token among them).
def _aws_signature_text(host: str, token: str) -> str:
    return (
        "The request signature we calculated does not match the signature you provided. Check"
        " your AWS Secret Access Key and signing method. Consult the service documentation for"
        " details.\n\nThe Canonical String for this request should have been\n'POST\n"
        f"/v2/email/outbound-emails\n\ncontent-type:application/json\nhost:{host}\n"
        f"x-amz-date:20261206T232800Z\nx-amz-security-token:{token}\n\n"
        "content-type;host;x-amz-date;x-amz-security-token\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'\n\n"
        "The String-to-Sign should have been\n'AWS4-HMAC-SHA256\n20261206T232800Z\n"
        "20261206/eu-west-1/ses/aws4_request\n"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'\n"
    )


def test_a_providers_echo_of_our_credentials_never_reaches_events_or_logs(
    tmp_path: Path,
) -> None:
    """What a provider's error quotes of our request stays out of every event,
    the shaping log and stderr: SES's SignatureDoesNotMatch (the canonical
    request it expected, with X-Amz-Security-Token's session token), and an
    intermediary's 403 page quoting our ``Authorization: Basic`` header
    (Mailgun: base64 of ``api:KEY``, 160 characters into the page). Before,
    the session token was kept out only because the outcome's text is cut at
    400 characters (it came ~450 in) and the Basic credentials were kept
    whole; now both are redacted by their form, and the key verbatim."""
    import base64

    from aiohttp import web

    token = "IQoJb3JpZ2luX2VjEjSessionTokenForTest0123456789abcdefghijABCDEFGHIJ" * 3
    mg_key = "key-0123456789abcdef0123456789abcdef"

    async def ses(request: web.Request) -> web.Response:
        assert request.headers.get("X-Amz-Security-Token") == token
        return web.json_response(
            {"message": _aws_signature_text(request.host, token)}, status=403,
            headers={"x-amzn-ErrorType": "SignatureDoesNotMatch:http://internal.amazon.com/coral/"},
        )  # fmt: skip

    async def mailgun(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        page = (
            "<html><body><h1>403 Forbidden</h1><p>Request blocked by policy.</p>"
            f"<pre>POST {request.path}\nAuthorization: {auth}\n</pre></body></html>"
        )
        return web.Response(status=403, text=page, content_type="text/html")

    app = web.Application()
    app.router.add_post("/v2/email/outbound-emails", ses)
    app.router.add_post("/v3/{domain}/messages.mime", mailgun)
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    rcpts = write_recipients(tmp_path, ["a@ses.example", "b@mg.example"])
    with ThreadedApp(app) as srv:
        cfg = (
            "[retry]\nmax_age = 1\n"
            f'[transports.s]\nkind = "ses"\nregion = "eu-west-1"\nendpoint = "{srv.url}"\n'
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{srv.url}"\n'
            'domain = "mg.sender.example.com"\n'
            '[routes]\n"ses.example" = "s"\n"mg.example" = "mg"\n'
        )
        env = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "sEcReTkEy0123456789",
               "AWS_SESSION_TOKEN": token, "FASTSEND_MG_API_KEY": mg_key}  # fmt: skip
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "3", "--no-dkim")
    evs = events(tmp_path)
    deferred = [e for e in evs if e["event"] in ("deferred", "expired", "bounced")]
    assert {e["rcpt"] for e in deferred} == {"a@ses.example", "b@mg.example"}, (evs, proc.stderr)
    basic = base64.b64encode(f"api:{mg_key}".encode()).decode()
    seen = [(tmp_path / "spool" / "events.jsonl").read_text(), proc.stdout, proc.stderr]
    shaping = tmp_path / "spool" / "shaping.jsonl"
    if shaping.exists():
        seen.append(shaping.read_text())
    for text in seen:
        for secret in (token[:16], token[-16:], basic[:16], basic[-16:], mg_key, "sEcReTkEy"):
            assert secret not in text, (secret, text[-3000:])
        assert "x-amz-date:" not in text  # none of the canonical request it quoted
    ses_text = next(e["text"] for e in deferred if e["rcpt"] == "a@ses.example")
    assert "SignatureDoesNotMatch" in ses_text and "does not match the signature" in ses_text
    mg_text = next(e["text"] for e in deferred if e["rcpt"] == "b@mg.example")
    assert "403" in mg_text and "Authorization: Basic [redacted]" in mg_text, mg_text


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_mailgun_event_about_a_group_of_500_costs_one_lookup_not_500(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Mailgun's event about one recipient of a group (identical mail, one
    request of up to 500 recipients) carries the whole group's v:fastsend:
    500 message tokens. Each was looked up in the spool one after the other
    until the recipient's (500 lookups for the last one; 500 more, sibling
    searches, for a recipient none of them names). Now one lookup for them
    all (Spool.owners), and one sibling search per campaign; the message
    found is the same, on SQLite and on Redis."""
    from fastsend import msgid
    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.provider_events import ProviderEvents, ProviderEventSettings

    spool: dict[str, Any] = {"dir": str(tmp_path / "spool")}
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        spool["url"] = server.url()
    ctx = open_context(from_dict({"spool": spool}))
    try:
        cid = ctx.tenant_campaign("acme")
        rows = [(f"g{i}@example.net", "example.net", b'{"raw": ""}') for i in range(500)]
        ids = ctx.inject(cid, rows)
        tokens = [msgid.token(i, ctx.secret) for i in ids]
        calls: Counter[str] = Counter()
        inner = ctx.spool

        class Counting:
            def __getattr__(self, name: str) -> Any:
                calls[name] += 1
                return getattr(inner, name)

        ctx.spool = Counting()
        pe = ProviderEvents(ctx, ProviderEventSettings())
        assert pe.find(tokens, "G499@example.net") == (ids[499], cid, "g499@example.net", "acme")
        assert calls["owner"] + calls["owners"] <= 1 and calls["sibling"] == 0, calls
        calls.clear()
        assert pe.find(tokens, "nobody@example.net") is None
        assert calls["owner"] + calls["owners"] <= 1 and calls["sibling"] <= 1, calls
        calls.clear()
        assert pe.find(tokens[7:8], "g7@example.net") == (ids[7], cid, "g7@example.net", "acme")
    finally:
        ctx.spool = inner
        ctx.close()


@pytest.mark.parametrize("kind", ["ses", "sendgrid", "mailgun"])
def test_a_2xx_without_a_message_id_is_not_taken_for_a_delivery(tmp_path: Path, kind: str) -> None:
    """An endpoint that answers any POST 200 (a wrong ``endpoint``: a web
    server, a proxy's page, a health check) is not the provider's API: every
    answer of SES, SendGrid and Mailgun to a send carries the message's id.
    Before, each message was "delivered" (and its recipients' mail lost);
    now deferred, unknown whether taken (never failed over), the text naming
    the endpoint to check, and no delivered event."""
    from aiohttp import web

    posts: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        await request.read()
        posts.append(request.path)
        return web.Response(status=200, text="<html><body>OK</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    rcpts = write_recipients(tmp_path, ["a@example.net", "b@example.org"])
    extra = {"ses": 'region = "eu-west-1"\nrate = 10\n', "sendgrid": "",
             "mailgun": 'domain = "mg.sender.example.com"\n'}[kind]  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "s3cr3t-key-value",
           "FASTSEND_P_API_KEY": "p-key-value"}  # fmt: skip
    with ThreadedApp(app) as srv:
        cfg = f'[transports.p]\nkind = "{kind}"\nendpoint = "{srv.url}"\n{extra}[routes]\n"*" = "p"\n'
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "2", "--no-dkim")
    assert posts, proc.stderr[-2000:]
    evs = events(tmp_path)
    assert not [e for e in evs if e["event"] == "delivered"], evs
    deferred = [e for e in evs if e["event"] == "deferred"]
    assert {e["rcpt"] for e in deferred} == {"a@example.net", "b@example.org"}, evs
    assert all("without a message id" in e["text"] and "endpoint" in e["text"] for e in deferred)


@pytest.mark.parametrize("trouble", ["down", "refuses our AUTH"])
def test_a_relay_in_trouble_fails_over_to_the_routes_second_relay(
    tmp_path: Path, trouble: str
) -> None:
    """Route ``["relay1", "relay2"]``: relay1 not listening, or refusing our
    credentials (535): every message goes through relay2, once, with a
    "failover" event from relay1 to relay2 each; relay1 takes none."""
    import ssl

    import trustme
    from tests.conftest import free_port
    from tests.test_transports_relay import ENV, PASSWORD, USER, Relay, RelayHandler

    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"r{i}@example.{('net', 'org')[i % 2]}" for i in range(40)]
    rcpts = write_recipients(tmp_path, addrs)
    env = {**ENV, "FASTSEND_RELAY2_USERNAME": USER, "FASTSEND_RELAY2_PASSWORD": PASSWORD}
    first, second = RelayHandler(), RelayHandler()
    with Relay(second, ctx, implicit=False) as r2, Relay(first, ctx, implicit=False) as r1:
        port1 = free_port() if trouble == "down" else r1.port
        if trouble != "down":
            env["FASTSEND_RELAY1_PASSWORD"] = "not-the-password"
        cfg = "[retry]\nmin_backoff = 1\nmax_backoff = 2\n"
        for name, port in (("relay1", port1), ("relay2", r2.port)):
            cfg += (f'[transports.{name}]\nkind = "relay"\nhost = "127.0.0.1"\nport = {port}\n'
                    f'ca_file = "{ca_path}"\nmax_connections = 4\n')  # fmt: skip
        cfg += '[routes]\n"*" = ["relay1", "relay2"]\n'
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim")
    s = summary(proc)
    got = Counter(r for rs, _ in second.messages for r in rs)
    assert s["delivered"] == len(addrs) and got == Counter(addrs), (s, proc.stderr[-2000:])
    assert not first.messages
    fo = [e for e in events(tmp_path) if e["event"] == "failover"]
    assert {e["rcpt"] for e in fo} == set(addrs)
    assert all(e["from"] == "relay1" and e["to"] == "relay2" for e in fo), fo[:3]
