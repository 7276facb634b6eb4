"""One accept path (fastsend.accept): the same recipients for the same tenant give
the same spool rows and the same accepted/suppressed events whichever way they
arrive: ``fastsend send`` (a subprocess delivering to a real sink), the HTTP API
(POST /v1/campaigns on a real aiohttp server) and SMTP submission (aiosmtplib
over STARTTLS + AUTH to the real listener)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import pytest
import trustme
from tests._engine_helpers import send_via, summary, write_campaign, write_recipients

from fastsend.accept import AcceptError, check_campaign
from fastsend.commands.common import open_suppression
from fastsend.config import from_dict
from fastsend.message import Campaign
from fastsend.serve.app import make_app
from fastsend.serve.context import open_context
from fastsend.serve.listeners import hash_password, start_listeners
from fastsend.sink import SinkProcess
from fastsend.spool import open_spool
from fastsend.suppression import SuppressionList
from fastsend.testing.http import app_on_loopback
from fastsend.wire import MAX_RECORD

TENANT = "acme"
# ann: accepted; bob: suppressed for acme (stored in another case); cat:
# suppressed for another tenant only, so accepted here; dan: accepted.
RCPTS = ["ann@x.example", "bob@x.example", "cat@x.example", "dan@y.example"]
SUPPRESSED_FOR = {"Bob@X.example": TENANT, "cat@x.example": "globex"}
EXPECTED = {
    "ann@x.example": "accepted",
    "bob@x.example": "suppressed",
    "cat@x.example": "accepted",
    "dan@y.example": "accepted",
}
TPL = {"from": "News <news@sender.example.com>", "subject": "Hi {{ name }}", "text": "{{ name }}"}
CAMPAIGN = (
    'from = "News <news@sender.example.com>"\nsubject = "Hi {{ name }}"\ntext = "{{ name }}"\n'
)
RAW = b"From: News <news@sender.example.com>\r\nSubject: Hi\r\n\r\nHello\r\n"


def _prepare(spool: Path, url: str) -> None:
    """The suppression list serve and send use with this spool (on Redis the
    shared one)."""
    spool.mkdir(parents=True, exist_ok=True)
    supp = open_suppression(url, str(spool))
    if supp is None:  # (a Redis list is falsy when empty: test for None)
        supp = SuppressionList(str(spool / "suppression.db"))
    for addr, tenant in SUPPRESSED_FOR.items():
        supp.add(addr, tenant=tenant)
    supp.close()


def _spool_table(spool: Path, url: str) -> dict[str, str]:
    """The [spool] table of a serve config for this spool."""
    if url.startswith("redis"):
        return {"url": url, "dir": str(spool)}
    return {"dir": url}


def _accept_events(spool: Path) -> list[dict[str, Any]]:
    lines = [orjson.loads(x) for x in (spool / "events.jsonl").read_bytes().splitlines()]
    return [e for e in lines if e["event"] in ("accepted", "suppressed")]


def via_send(tmp: Path, url: str) -> None:
    camp = write_campaign(tmp, CAMPAIGN)
    rcpts = write_recipients(tmp, RCPTS)
    with SinkProcess("--log", str(tmp / "sink.jsonl")) as sink:
        proc = send_via(camp, rcpts, (sink.host, sink.port), url, "--tenant", TENANT, "--no-dkim")
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary(proc)
    assert s["suppressed"] == 1 and s["delivered"] == 3


def via_api(tmp: Path, url: str) -> None:
    spool = tmp / "spool"

    async def main() -> None:
        cfg = from_dict({"spool": _spool_table(spool, url), "api": {"listen": "127.0.0.1:0"}})
        ctx = open_context(cfg)
        key = ctx.key_store().create(TENANT)[0]
        app = make_app(ctx, cfg.api)
        body = {"template": TPL, "recipients": [{"email": a, "name": "N"} for a in RCPTS]}
        try:
            async with (
                app_on_loopback(app) as base,
                aiohttp.ClientSession() as session,
                session.post(
                    f"{base}/v1/campaigns",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as r,
            ):
                out = await r.json()
                assert r.status == 201, out
            assert out["accepted"] == 4 and out["rejected"] == 0
        finally:
            ctx.close()

    asyncio.run(main())


def via_submission(tmp: Path, url: str) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    users = {TENANT: hash_password("pw pw pw", iterations=1000)}
    sub = {"listen": "127.0.0.1:0", "users": users,
           "tls_cert": str(tmp / "cert.pem"), "tls_key": str(tmp / "key.pem")}  # fmt: skip
    spool = tmp / "spool"
    ctx = open_context(from_dict({"spool": _spool_table(spool, url), "submission": sub}))

    async def main() -> None:
        servers = await start_listeners(ctx)
        port = int(servers[0].sockets[0].getsockname()[1])
        try:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=client_tls)
            await smtp.connect()
            await smtp.login(TENANT, "pw pw pw")
            errors, _reply = await smtp.sendmail("news@sender.example.com", RCPTS, RAW)
            assert errors == {}
            await smtp.quit()
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()

    asyncio.run(main())
    ctx.close()


@pytest.fixture(params=["sqlite", "redis"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The spool every entry point writes to: a directory, or a Redis URL whose
    local directory (events, suppression, keys) is the same tmp/spool."""
    if request.param == "sqlite":
        return str(tmp_path / "spool")
    return str(request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path / "spool")))


@pytest.mark.parametrize("entry", [via_send, via_api, via_submission], ids=lambda f: f.__name__)
def test_same_input_same_result_every_entry_point(
    tmp_path: Path, spool_url: str, entry: Any
) -> None:
    spool = tmp_path / "spool"
    _prepare(spool, spool_url)
    entry(tmp_path, spool_url)
    evs = _accept_events(spool)
    assert {e["rcpt"]: e["event"] for e in evs} == EXPECTED
    assert len(evs) == len(RCPTS)
    assert {e["tenant"] for e in evs} == {TENANT}
    s = open_spool(spool_url, readonly=True)
    try:
        (cid,) = {e["campaign"] for e in evs}
        info = s.get_campaign(cid)
        assert info is not None and info.tenant == TENANT
        for e in evs:
            m = s.message(e["id"])
            assert m is not None and m["rcpt"] == e["rcpt"] and m["campaign"] == cid
            assert (m["state"] == "suppressed") == (e["event"] == "suppressed")
        assert s.counts(cid)["suppressed"] == 1
        assert sum(s.counts(cid).values()) == len(RCPTS)
    finally:
        s.close()


def test_campaign_checks() -> None:
    camp = Campaign.from_dict(TPL)
    assert check_campaign(camp) == camp.to_dict()
    with pytest.raises(AcceptError, match="no DKIM key"):
        check_campaign(camp, require_dkim=True)
    big = Campaign.from_dict({**TPL, "text": "x" * (MAX_RECORD + 10)})
    with pytest.raises(AcceptError, match="bytes with its files inlined"):
        check_campaign(big)
