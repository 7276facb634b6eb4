"""Caps on what a tenant submits, and the tenant-level caps counted across nodes.

Real parts: the HTTP API (``make_app``) and the SMTP submission listener
(``start_listeners``, STARTTLS + AUTH with an API key) in-process on loopback
over a temporary SQLite spool, and two serving nodes on one real redis-server.
What a production multi-tenant sender has (SES's daily sending quota and
maximum send rate, a tenant's messages per second): ``[api]
tenant_daily_messages`` / ``tenant_message_rate`` / ``tenant_message_burst``
and ``[tenants.NAME]`` overrides (serve/tenantcaps.py); on a shared spool
``[api] max_campaigns_per_day``, ``rate_limit`` and these are the nodes'
together, not each node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import pytest

from conftest import free_port
from fastsend.config import from_dict
from fastsend.serve.app import make_app
from fastsend.serve.context import ServeContext, open_context
from fastsend.serve.listeners import start_listeners
from fastsend.testing.http import app_on_loopback

TPL = {"from": "a@acme.example", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


class Node:
    """One serving node: its context, API base URL, submission port, keys."""

    def __init__(self, ctx: ServeContext, base: str, session: aiohttp.ClientSession) -> None:
        self.ctx, self.base, self.session = ctx, base, session
        self.keys: dict[str, str] = {}
        self.smtp_port = 0

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            store = self.ctx.key_store()
            self.keys[tenant] = store.create(tenant)[0]
        return self.keys[tenant]

    async def req(self, method: str, path: str, body: Any = None, tenant: str = "acme",
                  key: str | None = None) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        h = {"Authorization": f"Bearer {key or self.key(tenant)}"}
        data = orjson.dumps(body) if body is not None else None
        if data is not None:
            h["Content-Type"] = "application/json"
        async with self.session.request(method, self.base + path, data=data, headers=h) as r:
            return r.status, orjson.loads(await r.read()), dict(r.headers)

    async def send(self, tenant: str, to: list[str]) -> tuple[int, Any, dict[str, str]]:
        body = {"from": f"a@{tenant}.example", "to": to, "subject": "s", "text": "t"}
        return await self.req("POST", "/v1/messages", body, tenant)


@contextlib.asynccontextmanager
async def node(tables: dict[str, Any], certs: Any = None, limits: dict[str, Any] | None = None
               ) -> AsyncIterator[Node]:  # fmt: skip
    if certs is not None:
        tables = {**tables, "submission": {"listen": f"127.0.0.1:{free_port()}",
                                           "tls_cert": certs[0], "tls_key": certs[1],
                                           **(limits or {})}}  # fmt: skip
    cfg = from_dict(tables)
    ctx = open_context(cfg)
    listeners = None
    try:
        async with app_on_loopback(make_app(ctx, cfg.api)) as base, aiohttp.ClientSession() as s:
            n = Node(ctx, base, s)
            if certs is not None:
                listeners = await start_listeners(ctx)
                n.smtp_port = int(listeners[0].sockets[0].getsockname()[1])
            yield n
    finally:
        for server in listeners or ():
            server.close()
            await server.wait_closed()
        ctx.close()


async def submit(n: Node, tls: ssl.SSLContext, tenant: str, rcpts: list[str]
                 ) -> tuple[list[tuple[int, str]], tuple[int, str] | None]:  # fmt: skip
    """One message by SMTP submission: each RCPT's reply, then DATA's (None: no
    recipient was taken)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=n.smtp_port, tls_context=tls,
                           start_tls=True, timeout=10)  # fmt: skip
    await smtp.connect()
    try:
        await smtp.login(tenant, n.key(tenant))
        await smtp.mail(f"a@{tenant}.example")
        replies = []
        for r in rcpts:
            try:
                got = await smtp.rcpt(r)
                replies.append((got.code, got.message))
            except aiosmtplib.SMTPRecipientRefused as e:
                replies.append((e.code, e.message))
        if not any(c == 250 for c, _m in replies):
            return replies, None
        body = (f"From: <a@{tenant}.example>\r\nTo: <x@example.org>\r\nSubject: s\r\n\r\nb\r\n")
        try:
            got = await smtp.data(body.encode())
            return replies, (got.code, got.message)
        except aiosmtplib.SMTPDataError as e:
            return replies, (e.code, e.message)
    finally:
        with contextlib.suppress(Exception):
            await smtp.quit()


def _tables(tmp: Path, api: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"spool": {"dir": str(tmp / "spool")},
            "api": {"listen": "127.0.0.1:0", **api}, **more}  # fmt: skip


def test_a_tenants_daily_quota_holds_for_the_api_and_submission(
    tmp_path: Path, certs: Any
) -> None:
    """[api] tenant_daily_messages = 5 (a message per recipient): the API takes 4 then
    1, a request that would pass the quota is refused whole (429, Retry-After to UTC
    midnight, nothing spooled), and SMTP submission is refused at RCPT once the
    quota is used up (451 4.7.1: the body is not sent for nothing); another tenant
    has its own quota. A message refused at DATA gives back what it counted."""

    async def main() -> None:
        async with node(_tables(tmp_path, {"tenant_daily_messages": 5}), certs) as n:
            st, got, _h = await n.send("acme", [f"a{i}@example.org" for i in range(4)])
            assert st == 202, got
            st, got, h = await n.send("acme", [f"b{i}@example.org" for i in range(2)])
            assert st == 429, got
            assert "daily message quota" in got["error"]["message"], got
            assert 0 < int(h["Retry-After"]) <= 86401, h
            # one recipient left; a two-recipient message at DATA is refused, and
            # gives its count back
            rc, data = await submit(n, certs[2], "acme", ["s1@example.org", "s2@example.org"])
            assert [c for c, _m in rc] == [250, 250], rc
            assert data is not None and data[0] == 451 and "4.7.1" in data[1], data
            st, got, _h = await n.send("acme", ["c1@example.org"])
            assert st == 202, got
            rc, data = await submit(n, certs[2], "acme", ["s3@example.org"])
            assert rc[0][0] == 451 and "quota" in rc[0][1], rc
            assert data is None
            st, got, _h = await n.send("acme", ["c2@example.org"])
            assert st == 429, got
            st, got, _h = await n.send("other", ["o1@example.org"] * 1)
            assert st == 202, got  # its own count
            assert n.ctx.spool.counts()["queued"] == 5 + 1, n.ctx.spool.counts()
            # serve's tick drops past days' counts (today's and yesterday's stay)
            n.ctx.spool.add_counters({"tq:acme:20000101": 3})
            assert n.ctx.caps.sweep() == 1
            assert list(n.ctx.spool.counters("tq:").values()) == [5, 1], n.ctx.spool.counters("tq:")

    asyncio.run(main())


def test_a_replayed_request_is_not_counted_again(tmp_path: Path) -> None:
    """A request retried under its Idempotency-Key gets its first answer back and
    counts nothing more against the daily quota (3 here): the retry of a 2-message
    request leaves room for 1, and only then is the quota used up."""

    async def main() -> None:
        async with node(_tables(tmp_path, {"tenant_daily_messages": 3})) as n:
            body = {"from": "a@acme.example", "to": ["a@example.org", "b@example.org"],
                    "subject": "s", "text": "t"}  # fmt: skip
            h = {"Authorization": f"Bearer {n.key('acme')}", "Idempotency-Key": "k-1"}
            for _ in range(3):
                async with n.session.post(f"{n.base}/v1/messages", json=body, headers=h) as r:
                    assert r.status == 202, await r.text()
            st, got, _h = await n.send("acme", ["c@example.org"])
            assert st == 202, got
            st, got, _h = await n.send("acme", ["d@example.org"])
            assert st == 429, got

    asyncio.run(main())


def test_a_tenants_campaign_lists_count_against_its_daily_quota(tmp_path: Path) -> None:
    """The daily quota counts what a tenant spools in every way: a campaign's
    recipients (inline, JSON, CSV upload) too, not only submissions (else a tenant
    over its quota posted the same mail as a one-recipient campaign); a list over
    what is left is refused whole (429, nothing spooled); no message rate applies
    to a campaign's list (bulk mail)."""
    api = {"tenant_daily_messages": 5, "tenant_message_rate": 0.01, "tenant_message_burst": 1}

    async def main() -> None:
        async with node(_tables(tmp_path, api)) as n:
            rows = [{"email": f"r{i}@example.org", "name": "R"} for i in range(3)]
            st, got, _h = await n.req("POST", "/v1/campaigns",
                                      {"name": "c", "template": TPL, "recipients": rows})
            assert st == 201 and got["accepted"] == 3, got
            cid = got["id"]
            more = [{"email": f"m{i}@example.org", "name": "M"} for i in range(3)]
            st, got, h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                     {"recipients": more})  # fmt: skip
            assert st == 429 and "daily message quota" in got["error"]["message"], got
            assert int(h["Retry-After"]) > 0
            st, got, _h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                      {"recipients": more[:1]})  # fmt: skip
            assert st == 202 and got["accepted"] == 1, got
            h = {"Authorization": f"Bearer {n.key('acme')}", "Content-Type": "text/csv"}
            for csv, want in ((b"email,name\nu1@example.org,U\nu2@example.org,U\n", 429),
                              (b"email,name\nu3@example.org,U\n", 202)):
                async with n.session.post(f"{n.base}/v1/campaigns/{cid}/recipients",
                                          data=csv, headers=h) as r:  # fmt: skip
                    assert r.status == want, await r.text()
            st, got, _h = await n.send("acme", ["x@example.org"])
            assert st == 429 and "daily message quota" in got["error"]["message"], got
            for _ in range(50):  # (the upload is spooled as a job)
                if n.ctx.spool.counts(cid)["queued"] == 5:
                    break
                await asyncio.sleep(0.05)
            assert n.ctx.spool.counts(cid)["queued"] == 5

    asyncio.run(main())


def test_a_tenants_submission_rate_and_its_own_override(tmp_path: Path, certs: Any) -> None:
    """[tenants.acme] message_rate = 0.01 with message_burst = 2: two messages pass,
    the third (by SMTP or by the API: one bucket) is refused with a wait (451 4.7.1
    / 429 Retry-After); a request of more messages than the burst is refused as
    such (429 without Retry-After: waiting would not help); a tenant without the
    override has the [api] default (no cap)."""
    tenants = {"acme": {"domains": ["acme.example"], "message_rate": 0.01, "message_burst": 2},
               "other": {"domains": ["other.example"]}}  # fmt: skip

    async def main() -> None:
        async with node(_tables(tmp_path, {}, tenants=tenants), certs) as n:
            st, got, _h = await n.send("acme", [f"r{i}@example.org" for i in range(3)])
            assert st == 429 and "burst" in got["error"]["message"], got
            rc, data = await submit(n, certs[2], "acme", ["s1@example.org"])
            assert data is not None and data[0] == 250, (rc, data)
            st, got, _h = await n.send("acme", ["a@example.org"])
            assert st == 202, got
            rc, data = await submit(n, certs[2], "acme", ["s2@example.org"])
            assert data is not None and data[0] == 451 and "4.7.1" in data[1], data
            assert "message rate" in data[1], data
            st, got, h = await n.send("acme", ["b@example.org"])
            assert st == 429 and "message rate" in got["error"]["message"], got
            assert int(h["Retry-After"]) >= 1, h
            for i in range(5):
                st, got, _h = await n.send("other", [f"o{i}@example.org"])
                assert st == 202, got
            assert n.ctx.spool.counts()["queued"] == 2 + 5

    asyncio.run(main())


def test_tenant_caps_are_counted_across_the_nodes_of_a_shared_spool(
    redis_server: Any, tmp_path: Path
) -> None:
    """Two nodes on one Redis spool: [api] tenant_daily_messages = 4, max_campaigns_per_day
    = 2 and rate_limit (burst 6 per key) hold for the tenant (the key) across both,
    not per node. Before, each node counted alone: 2 nodes took 2 x 2 campaigns a
    day and 2 x 6 requests of one key at once."""
    prefix = "tc" + os.urandom(4).hex()
    api = {"tenant_daily_messages": 4, "max_campaigns_per_day": 2,
           "rate_limit": 0.01, "rate_burst": 6}  # fmt: skip

    def tables(name: str) -> dict[str, Any]:
        return {"spool": {"dir": str(tmp_path / name),
                          "url": redis_server.url(prefix=prefix, node=name)},
                "api": {"listen": "127.0.0.1:0", **api}}  # fmt: skip

    async def main() -> None:
        async with node(tables("A")) as a, node(tables("B")) as b:
            for t in ("acme", "beta", "gamma"):  # one key per tenant, usable on both
                b.keys[t] = a.key(t)
            st, got, _h = await a.send("acme", ["a1@example.org", "a2@example.org",
                                                "a3@example.org"])  # fmt: skip
            assert st == 202, got
            st, got, _h = await b.send("acme", ["b1@example.org"])
            assert st == 202, got
            st, got, _h = await b.send("acme", ["b2@example.org"])
            assert st == 429 and "daily message quota" in got["error"]["message"], got
            st, got, _h = await a.send("acme", ["a4@example.org"])
            assert st == 429, got

            for n in (a, b):
                st, got, _h = await n.req("POST", "/v1/campaigns",
                                          {"name": "c", "template": TPL}, "beta")  # fmt: skip
                assert st == 201, got
            st, got, h = await a.req("POST", "/v1/campaigns", {"name": "c", "template": TPL},
                                     "beta")  # fmt: skip
            assert st == 429 and "max_campaigns_per_day" in got["error"]["message"], got
            assert int(h["Retry-After"]) > 0

            for n in (a, b, a, b, a, b):
                st, got, _h = await n.req("GET", "/v1/campaigns", tenant="gamma")
                assert st == 200, got
            st, got, _h = await a.req("GET", "/v1/campaigns", tenant="gamma")
            assert st == 429 and "rate limit" in got["error"]["message"], got

    asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("[api]\ntenant_daily_messages = 10000\ntenant_message_rate = 5.0\n", True),
        ("[api]\ntenant_daily_messages = -1\n", False),
        ("[api]\ntenant_message_rate = -0.5\n", False),
        ('[tenants.acme]\ndomains = ["acme.example"]\ndaily_messages = 100\n'
         "message_rate = 2.5\nmessage_burst = 10\n", True),
        ('[tenants.acme]\ndomains = ["acme.example"]\nmessage_burst = -3\n', False),
    ],
)
def test_check_config_validates_the_tenant_caps(tmp_path: Path, text: str, ok: bool) -> None:
    from tests._engine_helpers import run_fastsend

    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n' + text)
    r = run_fastsend("check-config", "-c", str(cfg))
    assert (r.returncode == 0) == ok, (r.returncode, r.stdout, r.stderr)
    if not ok:
        assert "tenant_" in r.stderr + r.stdout or "message_" in r.stderr + r.stdout, r.stderr


def test_auth_failures_are_counted_across_the_nodes_of_a_shared_spool(
    redis_server: Any, tmp_path: Path, certs: Any
) -> None:
    """[submission] auth_failures_per_user = 3 on two nodes of one Redis spool: two
    wrong passwords for a user on node A and one on node B, and the user's right
    password is refused on A too (454 4.7.0) until the window passes. Before, each
    node counted alone: a password guessed through a balancer got 3 x N tries."""
    prefix = "af" + os.urandom(4).hex()

    def tables(name: str) -> dict[str, Any]:
        return {"spool": {"dir": str(tmp_path / name),
                          "url": redis_server.url(prefix=prefix, node=name)},
                "api": {"listen": "127.0.0.1:0"}}  # fmt: skip

    async def login(n: Node, password: str) -> int:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=n.smtp_port, tls_context=certs[2],
                               start_tls=True, timeout=10)  # fmt: skip
        await smtp.connect()
        await smtp.ehlo()  # (STARTTLS reset the session: AUTH follows a new EHLO)
        try:
            return (await smtp.auth_plain("acme", password)).code
        except aiosmtplib.SMTPAuthenticationError as e:
            return e.code
        finally:
            with contextlib.suppress(Exception):
                await smtp.quit()

    async def main() -> None:
        limits = {"auth_failures_per_user": 3, "auth_failures_per_ip": 100,
                  "auth_backoff_max": 0.05}  # fmt: skip
        async with node(tables("A"), certs, limits) as a, node(tables("B"), certs, limits) as b:
            good = a.key("acme")
            assert await login(a, good) == 235
            assert [await login(a, "fs_wrong"), await login(a, "fs_wrong2")] == [535, 535]
            assert await login(b, "fs_wrong3") == 535
            assert await login(a, good) == 454
            assert await login(b, good) == 454
            assert await login(a, "x") == 454

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_addresses_a_campaign_already_has_do_not_count_against_the_daily_quota(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """A list sent again with a few new rows spools only the new ones (the campaign
    keeps one message per address): the daily quota counts those, not the rows it
    left out. Quota 5, a campaign of 3: adding [the 3 again + 1 new] is 202 (1
    accepted, 4 used, was 429: the 3 were counted again), the same again is 202 with
    nothing accepted nor counted, a CSV upload of the 4 known + 1 new takes the
    last unit; then one new address is over the quota (429), on both spools."""
    tables = _tables(tmp_path, {"tenant_daily_messages": 5})
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        tables["spool"]["url"] = server.url(node="n1", dir=str(tmp_path / "spool"))

    async def main() -> None:
        async with node(tables) as n:
            rows = [{"email": f"r{i}@example.org", "name": "R"} for i in range(3)]
            st, got, _h = await n.req("POST", "/v1/campaigns",
                                      {"name": "c", "template": TPL, "recipients": rows})
            assert st == 201 and got["accepted"] == 3, got
            cid = got["id"]
            # the same addresses (one in another domain case) and one new
            again = [*rows[:2], {"email": "r2@EXAMPLE.org", "name": "R"},
                     {"email": "n1@example.org", "name": "N"}]  # fmt: skip
            for want in (1, 0):
                st, got, _h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                          {"recipients": again})  # fmt: skip
                assert st == 202, got
                assert (got["accepted"], got["duplicates"]) == (want, 4 - want), got
                assert list(n.ctx.spool.counters("tq:").values()) == [4], got
            h = {"Authorization": f"Bearer {n.key('acme')}", "Content-Type": "text/csv"}
            csv = b"email,name\n" + b"".join(
                f"{a},X\n".encode() for a in
                ("r0@example.org", "r1@example.org", "r2@example.org", "n1@example.org",
                 "n2@example.org")
            )  # fmt: skip
            async with n.session.post(f"{n.base}/v1/campaigns/{cid}/recipients",
                                      data=csv, headers=h) as r:  # fmt: skip
                got = orjson.loads(await r.read())
                assert r.status == 202, got
            assert got["accepted"] == 1 and got["duplicates"] == 4, got
            assert list(n.ctx.spool.counters("tq:").values()) == [5]
            st, got, _h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                      {"recipients": [*rows, {"email": "n3@example.org", "name": "N"}]})
            assert st == 429 and "daily message quota" in got["error"]["message"], got
            assert n.ctx.spool.counts(cid)["queued"] == 5
            assert list(n.ctx.spool.counters("tq:").values()) == [5]

    asyncio.run(main())


def _hold_uploads(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any]]:
    """Uploads of more than 4 rows spool 2 before the answer and the rest in the
    background, which waits (as if its reader were slow, or another node's) until
    the test starts it: ``start(*held.pop())``."""
    from fastsend.serve import uploads

    monkeypatch.setattr(uploads, "SYNC_ROWS", 4)
    monkeypatch.setattr(uploads, "CHUNK", 2)
    start, held = uploads.Uploads._start, []

    def hold(self: Any, job: Any, feed: Any) -> None:  # spooling, not yet started
        held.append((self, job, feed))
        self.tasks[job.id] = asyncio.get_running_loop().create_future()

    monkeypatch.setattr(uploads.Uploads, "_start", hold)
    return start, held


def test_the_campaign_cap_counts_lists_still_being_spooled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[api] max_campaign_recipients = 12: an uploaded list of 10 is a job whose
    first rows are spooled before the answer and the rest after (here: not yet, as
    if its reader were slow or another node's); a second list of 10, or 3 more rows as
    JSON, would take the campaign over the cap and are 413 (were 202: only spooled
    rows were counted, and two lists of 25,000 under a cap of 30,000 gave 50,000);
    2 more rows fit."""
    _hold_uploads(monkeypatch)

    async def main() -> None:
        async with node(_tables(tmp_path, {"max_campaign_recipients": 12})) as n:
            st, got, _h = await n.req("POST", "/v1/campaigns", {"name": "c", "template": TPL})
            assert st == 201, got
            cid = got["id"]
            h = {"Authorization": f"Bearer {n.key('acme')}", "Content-Type": "text/csv"}
            for i, want in enumerate((202, 413)):
                csv = "email,name\n" + "".join(f"l{i}r{j}@example.org,X\n" for j in range(10))
                async with n.session.post(f"{n.base}/v1/campaigns/{cid}/recipients",
                                          data=csv.encode(), headers=h) as r:  # fmt: skip
                    got = orjson.loads(await r.read())
                    assert r.status == want, got
            assert "max_campaign_recipients" in got["error"]["message"], got
            rows = [{"email": f"j{i}@example.org", "name": "J"} for i in range(3)]
            st, got, _h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                      {"recipients": rows})  # fmt: skip
            assert st == 413 and "would have 13" in got["error"]["message"], got
            st, got, _h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                      {"recipients": rows[:2]})  # fmt: skip
            assert st == 202 and got["accepted"] == 2, got

    asyncio.run(main())


def test_a_list_spooled_in_the_background_gives_back_what_it_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daily quota counts an uploaded list's rows when the request comes; rows the
    list's job then leaves out, as another request spooled their address first, are
    given back when the job ends (were kept counted: 13 of a quota of 20 used for the
    10 messages spooled). A list of 10 spooled in the background (its first 2 rows
    before the answer), 3 of its later addresses added as JSON meanwhile."""
    start, held = _hold_uploads(monkeypatch)

    async def main() -> None:
        async with node(_tables(tmp_path, {"tenant_daily_messages": 20})) as n:
            st, got, _h = await n.req("POST", "/v1/campaigns", {"name": "c", "template": TPL})
            assert st == 201, got
            cid = got["id"]
            h = {"Authorization": f"Bearer {n.key('acme')}", "Content-Type": "text/csv"}
            csv = "email,name\n" + "".join(f"a{j}@example.org,X\n" for j in range(10))
            async with n.session.post(f"{n.base}/v1/campaigns/{cid}/recipients",
                                      data=csv.encode(), headers=h) as r:  # fmt: skip
                got = orjson.loads(await r.read())
                assert r.status == 202 and got["status"] == "spooling", got
            rows = [{"email": f"a{j}@example.org", "name": "J"} for j in (5, 6, 7)]
            st, got, _h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                      {"recipients": rows})  # fmt: skip
            assert st == 202 and got["accepted"] == 3, got
            assert list(n.ctx.spool.counters("tq:").values()) == [13]
            start(*held.pop())
            for _ in range(200):
                if not n.ctx.uploads.tasks:
                    break
                await asyncio.sleep(0.02)
            assert n.ctx.spool.counts(cid)["queued"] == 10
            assert list(n.ctx.spool.counters("tq:").values()) == [10]

    asyncio.run(main())


async def _post_csv(n: Node, cid: int, addrs: list[str]) -> tuple[int, Any]:
    h = {"Authorization": f"Bearer {n.key('acme')}", "Content-Type": "text/csv"}
    csv = "email,name\n" + "".join(f"{a},X\n" for a in addrs)
    async with n.session.post(f"{n.base}/v1/campaigns/{cid}/recipients",
                              data=csv.encode(), headers=h) as r:  # fmt: skip
        return r.status, orjson.loads(await r.read())


async def _settled(n: Node) -> None:
    """Until every upload job of the node's process has ended."""
    for _ in range(500):
        if not n.ctx.uploads.tasks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"upload jobs still running: {sorted(n.ctx.uploads.tasks)}")


def test_two_lists_spooling_at_once_count_their_shared_addresses_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daily quota of 12 and [api] max_campaign_recipients = 12: a list of 10 is
    spooling in the background (2 rows spooled before its answer), and a second list
    of 10 naming 8 of its addresses and 2 new ones comes: 12 recipients in all, so it
    is 202 (was 429 and 413: the 8 shared addresses counted once per list, 20 of 12).
    Both jobs then spool, either first for the shared ones: the campaign has 12 rows
    and the quota counts 12, as many as were spooled. A third list of one new address
    is then over both (413: the cap is checked first)."""
    start, held = _hold_uploads(monkeypatch)

    async def main() -> None:
        tables = _tables(tmp_path, {"tenant_daily_messages": 12, "max_campaign_recipients": 12})
        async with node(tables) as n:
            st, got, _h = await n.req("POST", "/v1/campaigns", {"name": "c", "template": TPL})
            assert st == 201, got
            cid = got["id"]
            first = [f"a{j}@example.org" for j in range(10)]
            st, got = await _post_csv(n, cid, first)
            assert st == 202 and got["status"] == "spooling", got
            st, got = await _post_csv(n, cid, [*first[2:], "b0@example.org", "b1@example.org"])
            assert st == 202 and got["status"] == "spooling", got
            assert sum(n.ctx.spool.counters("tq:").values()) <= 12
            while held:
                start(*held.pop())
            await _settled(n)
            assert n.ctx.spool.counts(cid)["queued"] == 12
            assert list(n.ctx.spool.counters("tq:").values()) == [12]
            st, got = await _post_csv(n, cid, ["c0@example.org"])
            assert st == 413 and "would have 13" in got["error"]["message"], got

    asyncio.run(main())


def test_a_list_whose_spooling_failed_and_was_taken_over_gives_back_what_it_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daily quota counted a list of 10 when it came; its background spooling
    then failed (a spool error after one more chunk) and was taken over later (as a
    serve's tick does for a job whose reader failed or died: another process, another
    node), meanwhile 3 of its addresses were added as JSON. When the job ends, what it
    left out is given back by whoever ended it: 10 counted for 10 spooled (was 13:
    only the process that took the list could give back, and it had forgotten)."""
    from fastsend.serve import uploads as up

    start, held = _hold_uploads(monkeypatch)

    async def main() -> None:
        async with node(_tables(tmp_path, {"tenant_daily_messages": 20})) as n:
            st, got, _h = await n.req("POST", "/v1/campaigns", {"name": "c", "template": TPL})
            assert st == 201, got
            cid = got["id"]
            st, got = await _post_csv(n, cid, [f"a{j}@example.org" for j in range(10)])
            assert st == 202 and got["status"] == "spooling", got
            self, job, feed = held.pop()

            def failing() -> Any:
                yield next(feed)
                raise OSError("disk I/O error")

            start(self, job, failing())
            await _settled(n)
            assert n.ctx.uploads.failed, "the job's spooling did not fail"
            assert n.ctx.spool.counts(cid)["queued"] == 4
            rows = [{"email": f"a{j}@example.org", "name": "J"} for j in (5, 6, 7)]
            st, got, _h = await n.req("POST", f"/v1/campaigns/{cid}/recipients",
                                      {"recipients": rows})  # fmt: skip
            assert st == 202 and got["accepted"] == 3, got
            monkeypatch.setattr(up, "RETRY_FAILED", 0.0)
            assert [j.id for j in n.ctx.uploads.adopt()] == [job.id]
            start(*held.pop())
            await _settled(n)
            assert n.ctx.spool.counts(cid)["queued"] == 10
            assert list(n.ctx.spool.counters("tq:").values()) == [10]

    asyncio.run(main())
