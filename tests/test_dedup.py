"""Duplicate recipients: a list (or a campaign's chunks through the API) naming one
address twice sends it once, on both spools, across a kill -9 and ``resume``;
``--keep-duplicates`` / ``"keep_duplicates": true`` send each row. An address
is compared as spooled: the domain's case and surrounding spaces make no other
address; the local part's case does (RFC 5321 2.4)."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import pytest
from tests._engine_helpers import (
    received_counts,
    run_fastsend,
    summary,
    write_campaign,
)

from fastsend import recipients
from fastsend._accel import compiled
from fastsend.accept import Acceptor, check_campaign, rows_left
from fastsend.config import from_dict
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.serve.app import make_app
from fastsend.serve.context import open_context
from fastsend.serve.listeners import hash_password, start_listeners
from fastsend.sink import SinkProcess
from fastsend.spool import open_spool
from fastsend.testing.http import app_on_loopback
from test_serve_api import Client, serving

TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


@pytest.fixture(params=["sqlite", "redis"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "spool")
    server = request.getfixturevalue("redis_server")
    return str(server.url(node="n1", dir=str(tmp_path / "spool")))


def test_fingerprint_and_table_twins_agree() -> None:
    rng = random.Random(7)
    words = ["a@b.com", "A@b.com", "josé@xn--bcher-kva.de", "用户@例子.广告", "\udcff@x", ""]
    words += [f"u{rng.randrange(10**9)}@d{rng.randrange(50)}.example" for _ in range(3000)]
    fp = compiled("fingerprint")
    assert [fp(w) for w in words] == [recipients.py_fingerprint(w) for w in words]
    assert all(recipients.py_fingerprint(w) for w in words)  # never 0 (an empty slot)
    rows = [(rng.choice(words), "d", b"{}") for _ in range(20000)]  # many repeats
    got = []
    for table_type in (compiled("FpSet"), recipients.PyFpSet):
        t = table_type()
        t.add_all(words[:100])
        fps: list[int] = []
        dups = [t.add_rows(rows[i : i + 700], fps) for i in range(0, len(rows), 700)]
        probe = [recipients.py_fingerprint(w) for w in (*words[:5], "not@seen.example")]
        got.append((dups, fps, len(t), t.has_fps([*probe, 0])))
    assert got[0] == got[1]
    assert got[0][3][-2:] == [False, False]  # (looking records nothing)
    assert got[0][2] == len(set(words[:100]) | {r[0] for r in rows})


def _list(path: Path, lines: list[str]) -> Path:
    path.write_text("email,name\n" + "".join(f"{a},{n}\n" for a, n in lines))
    return path


def _send(camp: Path, lst: Path, sink: Any, spool: str, *extra: str) -> Any:
    host, port = sink
    return run_fastsend(
        "send", str(camp), "-r", str(lst), "--route", f"*={host}:{port}", "--spool", spool,
        "--json", "--no-progress", "--no-dkim", *extra,
    )  # fmt: skip


# the same address, differently written; "Ann@x" is another mailbox than "ann@x"
SAME = ["ann@dup.example", "ann@DUP.example", " ann@dup.example ", "ann@Dup.Example"]


def test_send_spools_an_address_once(spool_url: str, tmp_path: Path) -> None:
    rows = [(a, f"N{i}") for i, a in enumerate(SAME)] + [("Ann@dup.example", "big A")]
    rows += [(f"u{i}@d{i % 3}.example", f"U{i}") for i in range(40)]
    rows += [("u7@D1.EXAMPLE", "again"), ('"u7"@d1.example', "quoted")]
    lst = _list(tmp_path / "list.csv", rows)
    camp = write_campaign(tmp_path)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        res = _send(camp, lst, sink.addresses[0], spool_url)
        assert res.returncode == 0, res.stderr[-2000:]
        s = summary(res)
        assert s["delivered"] == 42 and s["duplicates"] == 5, s
        assert "5 row(s) named an address an earlier row has" in res.stderr
    got = received_counts(log)  # (the sink's log is whole once it stopped)
    assert got["ann@dup.example"] == 1 and got["Ann@dup.example"] == 1
    assert max(got.values()) == 1 and len(got) == 42
    # opting out: each row is sent
    log2 = tmp_path / "sink2.jsonl"
    with SinkProcess("--log", str(log2)) as sink:
        res = _send(camp, lst, sink.addresses[0], spool_url, "--keep-duplicates")
        assert res.returncode == 0, res.stderr[-2000:]
        s = summary(res)
        assert s["delivered"] == 47 and s["duplicates"] == 0, s
    assert received_counts(log2)["ann@dup.example"] == 4


def test_resume_after_a_crash_mid_list_sends_no_duplicate(spool_url: str, tmp_path: Path) -> None:
    """A kill -9 after the 2nd batch of 1,000: the rows after it repeat addresses of
    the first batches (and of each other); ``resume`` rebuilds what the campaign has
    from the spool, sends each address once and loses no row."""
    n = 3000
    rows = [(f"user{i}@d{i % 5}.example", f"N{i}") for i in range(n)]
    rows[2500] = ("USER3@d3.example", "case of the local part: another")
    rows += [(f"user{i}@D{i % 5}.EXAMPLE", "again") for i in range(0, n, 97)]
    rows += [(" user2999@d4.example", "again after the crash point")]
    lst = _list(tmp_path / "list.csv", rows)
    spool = open_spool(spool_url)
    events = EventLog(str(tmp_path / "spool" / "events.jsonl"))
    acceptor = Acceptor(spool, events, None)
    spec = check_campaign(Campaign.from_dict({**TPL, "text": "Dear {{ name }}"}))
    cid = acceptor.create_campaign(spec, name="c")
    # rows 1-1000 hold no duplicate; its 2nd batch's 1000 rows are the next unique ones
    job = acceptor.start_ingest(cid, str(lst))
    feed = acceptor.ingest(job, chunk=1000)
    next(feed), next(feed)
    events.close()  # the reader dies here: the generator is dropped
    mid = spool.get_ingest(job.id)
    spool.close()
    assert mid is not None and (mid.accepted, mid.duplicates) == (2000, 0)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        res = run_fastsend(
            "resume", "--spool", spool_url, "--route", f"*={host}:{port}", "--workers", "1",
            "--json", "--no-progress", "--max-wait", "5", timeout=300,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = received_counts(log)
    want = {a.strip().lower() if a.startswith(" ") else a for a, _ in rows[:n]}
    assert set(got) == want and max(got.values()) == 1, "a duplicate or a lost row"
    dup_rows = len(rows) - n
    assert summary(res)["duplicates"] == dup_rows
    spool = open_spool(spool_url)
    try:
        done = spool.get_ingest(job.id)
        assert done is not None and done.status == "done"
        assert (done.accepted, done.duplicates, rows_left(done)) == (n, dup_rows, 0)
    finally:
        spool.close()


@asynccontextmanager
async def _serving(tmp: Path, url: str) -> AsyncIterator[Client]:
    """The API on a spool directory, or a node of the Redis spool ``url``."""
    if not url.startswith("redis"):
        async with serving(url) as c:
            yield c
        return
    cfg = from_dict({"spool": {"dir": str(tmp), "url": url}, "api": {"listen": "127.0.0.1:0"}})
    ctx = open_context(cfg)
    try:
        async with app_on_loopback(make_app(ctx, cfg.api)) as base, aiohttp.ClientSession() as s:
            c = Client(s, base, ctx)
            c.keys["acme"] = ctx.key_store().create("acme")[0]
            yield c
    finally:
        ctx.close()


def _api(tmp: Path, url: str, fn: Any) -> None:
    async def main() -> None:
        async with _serving(tmp / "node", url) as c:
            await fn(c)

    asyncio.run(main())


def test_api_campaign_chunks_hold_each_address_once(spool_url: str, tmp_path: Path) -> None:
    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", {"template": TPL, "recipients": [
            {"email": "a@x.example", "name": "A"}, {"email": " a@X.EXAMPLE", "name": "A2"},
            {"email": "b@x.example", "name": "B"},
        ]})  # fmt: skip
        assert st == 201 and (body["accepted"], body["duplicates"]) == (2, 1), body
        cid = body["id"]
        # a later chunk, by JSON, by CSV upload and by JSON lines: only what is new
        st, up = await c.req("POST", f"/v1/campaigns/{cid}/recipients", {"recipients": [
            {"email": "b@X.EXAMPLE", "name": "B"}, {"email": "c@x.example", "name": "C"},
        ]})  # fmt: skip
        assert st == 202 and (up["accepted"], up["duplicates"]) == (1, 1), up
        st, up = await c.req(
            "POST", f"/v1/campaigns/{cid}/recipients",
            raw=b"email,name\n c@x.example ,C\nd@x.example,D\nd@x.example,D\nB@x.example,b\n",
            headers={"Content-Type": "text/csv"},
        )  # fmt: skip
        assert st == 202 and (up["accepted"], up["duplicates"]) == (2, 2), up
        st, v = await c.req("GET", f"/v1/campaigns/{cid}")
        assert v["total"] == 5  # a b c d B
        rcpts = sorted(
            str(m["rcpt"]) for i in range(1, 20)
            if (m := c.ctx.spool.message(i)) is not None and m["campaign"] == cid
        )  # fmt: skip
        assert rcpts == ["B@x.example", "a@x.example", "b@x.example", "c@x.example",
                         "d@x.example"]  # fmt: skip
        # keep_duplicates: each row
        st, body = await c.req("POST", "/v1/campaigns", {
            "template": TPL, "keep_duplicates": True,
            "recipients": [{"email": "a@x.example", "name": "A"}] * 2,
        })  # fmt: skip
        assert st == 201 and (body["accepted"], body["duplicates"]) == (2, 0), body
        st, up = await c.req("POST", f"/v1/campaigns/{body['id']}/recipients", {
            "recipients": [{"email": "a@x.example", "name": "A"}]})  # fmt: skip
        assert st == 202 and up["accepted"] == 1
        st, v = await c.req("GET", f"/v1/campaigns/{body['id']}")
        assert v["keep_duplicates"] is True and v["total"] == 3

    _api(tmp_path, spool_url, t)


def test_api_dedup_survives_a_restart(tmp_path: Path) -> None:
    """A serve that did not spool a campaign's first chunks (restarted since)
    rebuilds what the campaign has from the spool."""
    url = str(tmp_path / "spool")
    made: dict[str, int] = {}

    async def first(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", {"template": TPL, "recipients": [
            {"email": f"r{i}@x.example", "name": "R"} for i in range(50)]})  # fmt: skip
        assert st == 201 and body["accepted"] == 50
        made["cid"] = body["id"]

    async def second(c: Client) -> None:
        st, up = await c.req("POST", f"/v1/campaigns/{made['cid']}/recipients", {
            "recipients": [{"email": f"r{i}@X.EXAMPLE", "name": "R"} for i in range(45, 55)]
        })  # fmt: skip
        assert st == 202 and (up["accepted"], up["duplicates"]) == (5, 5), up

    _api(tmp_path, url, first)
    _api(tmp_path, url, second)


def test_an_idempotent_retry_of_a_part_with_duplicates_is_replayed(tmp_path: Path) -> None:
    """A part that left rows out holds fewer ids than rows: its retry is the same
    answer, not a 409 ("spooled its part with N rows, this one has M")."""

    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", {"template": TPL, "recipients": [
            {"email": "a@x.example", "name": "A"}]})  # fmt: skip
        cid = body["id"]
        chunk = {"recipients": [{"email": "a@x.example", "name": "A"},
                                {"email": "b@x.example", "name": "B"}]}  # fmt: skip
        h = {"Idempotency-Key": "k1", "Content-Type": "application/json"}
        for _ in range(2):
            st, up = await c.req("POST", f"/v1/campaigns/{cid}/recipients",
                                 raw=orjson.dumps(chunk), headers=h)  # fmt: skip
            assert st == 202 and (up["accepted"], up["duplicates"]) == (1, 1), up
        assert sum(c.ctx.spool.counts(cid).values()) == 2

    _api(tmp_path, str(tmp_path / "spool"), t)


def test_two_nodes_of_a_redis_spool_share_what_a_campaign_has(
    redis_server: Any, tmp_path: Path
) -> None:
    """Chunks of one campaign posted to two nodes: the second node leaves out
    the addresses the first spooled (the campaign's fingerprints are in Redis)."""
    url = redis_server.url()

    async def main() -> None:
        async with (
            _serving(tmp_path / "n1", url + "&node=n1") as one,
            _serving(tmp_path / "n2", url + "&node=n2") as two,
        ):
            two.keys["acme"] = one.keys["acme"]
            st, body = await one.req("POST", "/v1/campaigns", {"template": TPL, "recipients": [
                {"email": f"r{i}@x.example", "name": "R"} for i in range(30)]})  # fmt: skip
            assert st == 201 and body["accepted"] == 30, body
            cid = body["id"]
            # r0-r29 are in; each node has spooled what the other left out
            for c, wanted, new in ((two, range(25, 40), 10), (one, range(35, 45), 5),
                                   (two, range(0, 50, 2), 2)):  # fmt: skip
                st, up = await c.req("POST", f"/v1/campaigns/{cid}/recipients", {
                    "recipients": [{"email": f"r{i}@X.example", "name": "R"} for i in wanted]
                })  # fmt: skip
                assert st == 202, up
                assert (up["accepted"], up["duplicates"]) == (new, len(wanted) - new), up
            assert sum(one.ctx.spool.counts(cid).values()) == 47

    asyncio.run(main())


def test_one_message_to_a_mailbox_twice_is_one_copy(tmp_path: Path) -> None:
    """POST /v1/messages naming one recipient twice (the domain in another case,
    spaces around it) spools it once, as an MTA's duplicate filter does."""

    async def t(c: Client) -> None:
        msg = {"from": "News <news@example.com>", "subject": "Hi", "text": "Hello",
               "to": ["a@example.org", "a@EXAMPLE.org", " a@example.org ", "A@example.org"]}
        st, body = await c.req("POST", "/v1/messages", msg)  # fmt: skip
        assert st == 202 and body["accepted"] == 2, body
        assert body["messages"][0]["to"] == ["a@example.org", "A@example.org"]

    _api(tmp_path, str(tmp_path / "spool"), t)


def test_submission_naming_a_recipient_twice_sends_one_copy(
    tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]
) -> None:
    cert, key, client_tls = certs
    users = {"acme": hash_password("s3cret pass", iterations=1000)}
    sub = {"listen": "127.0.0.1:0", "tls_cert": cert, "tls_key": key, "users": users}
    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, "submission": sub}))
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)
    message = b"From: App <app@example.com>\r\nTo: ann@example.org\r\nSubject: hi\r\n\r\nHello\r\n"

    async def main() -> None:
        servers = await start_listeners(ctx)
        try:
            port = int(servers[0].sockets[0].getsockname()[1])
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                                   tls_context=client_tls)  # fmt: skip
            await smtp.connect()
            await smtp.login("acme", "s3cret pass")
            errors, reply = await smtp.sendmail(
                "app@example.com", ["ann@example.org", "ann@EXAMPLE.ORG", "bob@example.org"],
                message,
            )  # fmt: skip
            assert errors == {} and "(2 recipient(s))" in reply, reply
            await smtp.quit()
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()

    asyncio.run(main())
    got = [e["rcpt"] for e in events if e["event"] == "accepted"]
    ctx.close()
    assert got == ["ann@example.org", "bob@example.org"]


def test_an_uploads_duplicates_do_not_count_against_the_campaigns_cap(tmp_path: Path) -> None:
    """A list of 4 rows, 3 addresses, into a campaign capped at 3 recipients: spooled
    (it was refused 413, "the campaign would have 4 recipients")."""

    async def main() -> None:
        async with serving(str(tmp_path / "spool"), max_campaign_recipients=3) as c:
            st, body = await c.req("POST", "/v1/campaigns", {"template": TPL})
            assert st == 201, body
            st, up = await c.req(
                "POST", f"/v1/campaigns/{body['id']}/recipients",
                raw=b"email,name\na@x.example,A\na@X.EXAMPLE,A\nb@x.example,B\nc@x.example,C\n",
                headers={"Content-Type": "text/csv"},
            )  # fmt: skip
            assert st == 202 and (up["accepted"], up["duplicates"]) == (3, 1), up

    asyncio.run(main())
