"""``Idempotency-Key`` on every route that accepts mail, against a real
``fastsend serve`` on both spool backends (SQLite; a real redis-server, where
two nodes share the keys):

- a retried request (same key, same body) gets the first answer again with
  ``Idempotent-Replayed: true`` and nothing is spooled again: one message, a
  batch, a campaign with recipients, a JSON list, a CSV upload, a JSON-lines
  upload;
- the same key with another body (or another route) is a 422 and spools nothing;
- keys are per tenant: another tenant's request with the same key is its own;
- an answer that accepted nothing (400) is not stored: the key is free again;
- a key reserved by a live process (a request still running) answers 409; one
  whose holder is dead (kill -9 mid-request) is taken over and runs;
- the stored answers survive a restart of serve; on Redis a retry sent to
  another node is answered from the first node's record;
- expiry: records go after their ttl (SQLite sweep, Redis key expiry).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from tests._serve_helpers import Served

from fastsend.spool import open_spool
from fastsend.spool.base import holder_tag

VOLATILE = ("--allow-volatile",)
NOWHERE = "127.0.0.1:9"  # nothing listens: accepted mail stays queued
TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


def call(s: Served, path: str, body: Any = None, *, key: str | None, tenant: str = "acme",
         raw: bytes | None = None, ctype: str = "application/json",
         base: str | None = None) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
    """POST with an Idempotency-Key: (status, JSON body, headers)."""

    async def go() -> tuple[int, Any, dict[str, str]]:
        h = {"Authorization": f"Bearer {s.keys[tenant]}", "Content-Type": ctype}
        if key is not None:
            h["Idempotency-Key"] = key
        data = raw if raw is not None else orjson.dumps(body)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as c,
            c.post((base or s.base) + path, data=data, headers=h) as r,
        ):
            return r.status, orjson.loads(await r.read()), dict(r.headers)

    return asyncio.run(go())


@pytest.fixture(params=["sqlite", "redis"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """"" for SQLite (tmp/spool), else a Redis spool URL."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("redis_server").url(dir=str(tmp_path / "spool")))


def total(s: Served) -> int:
    """Messages in the spool, read by another process's view (read-only for SQLite)."""
    sp = (
        open_spool(s.spool_url)
        if s.spool_url
        else open_spool(str(s.tmp / "spool"), readonly=True)
    )
    try:
        return sum(sp.counts().values())
    finally:
        sp.close()


def csv_list(prefix: str, n: int) -> bytes:
    return b"email,name\n" + b"".join(f"{prefix}{i}@d{i % 7}.example,N{i}\n".encode()
                                      for i in range(n))  # fmt: skip


def test_retries_are_answered_once_on_every_accepting_route(spool_url: str,
                                                            tmp_path: Path) -> None:  # fmt: skip
    s = Served(tmp_path, NOWHERE, spool_url=spool_url, serve_args=VOLATILE)
    try:
        one = {"from": "a@example.com", "to": ["x@one.example", "y@one.example"],
               "subject": "s", "text": "t"}  # fmt: skip
        st, first, h = call(s, "/v1/messages", one, key="k-one")
        assert st == 202 and first["accepted"] == 2, first
        assert "Idempotent-Replayed" not in h
        st, again, h = call(s, "/v1/messages", one, key="k-one")
        assert (st, again, h.get("Idempotent-Replayed")) == (202, first, "true")
        assert total(s) == 2

        batch = {"messages": [{**one, "to": f"b{i}@two.example"} for i in range(5)]}
        st, b1, _ = call(s, "/v1/messages", batch, key="k-batch")
        assert st == 202 and b1["accepted"] == 5
        st, b2, h = call(s, "/v1/messages", batch, key="k-batch")
        assert (st, b2, h.get("Idempotent-Replayed")) == (202, b1, "true")
        assert total(s) == 7

        camp = {"template": TPL, "paused": True,
                "recipients": [{"email": f"c{i}@three.example", "name": "C"} for i in range(4)]}
        st, c1, _ = call(s, "/v1/campaigns", camp, key="k-camp")
        assert st == 201 and c1["accepted"] == 4
        st, c2, h = call(s, "/v1/campaigns", camp, key="k-camp")
        assert (st, c2, h.get("Idempotent-Replayed")) == (201, c1, "true")  # one campaign
        assert total(s) == 11
        cid = c1["id"]
        path = f"/v1/campaigns/{cid}/recipients"

        more = {"recipients": [{"email": f"j{i}@four.example", "name": "J"} for i in range(3)]}
        st, j1, _ = call(s, path, more, key="k-json")
        st2, j2, h = call(s, path, more, key="k-json")
        assert (st, st2, j2, h.get("Idempotent-Replayed")) == (202, 202, j1, "true")
        assert total(s) == 14

        body = csv_list("v", 1000)
        st, u1, _ = call(s, path, key="k-csv", raw=body, ctype="text/csv")
        assert st == 202 and u1["accepted"] == 1000, u1
        st, u2, h = call(s, path, key="k-csv", raw=body, ctype="text/csv")
        assert (st, u2, h.get("Idempotent-Replayed")) == (202, u1, "true")
        assert total(s) == 1014

        lines = b"".join(orjson.dumps({"email": f"n{i}@five.example", "name": "N"}) + b"\n"
                         for i in range(50))  # fmt: skip
        st, n1, _ = call(s, path, key="k-ndjson", raw=lines, ctype="application/x-ndjson")
        st2, n2, h = call(s, path, key="k-ndjson", raw=lines, ctype="application/x-ndjson")
        assert (st, st2, n2, h.get("Idempotent-Replayed")) == (202, 202, n1, "true")
        assert total(s) == 1064
        uploads = tmp_path / "spool" / "uploads"
        assert not uploads.exists() or os.listdir(uploads) == []  # replays keep no file

        # The answers outlive the process.
        assert s.stop() == 0
        s.start()
        for route, b, k, want in (("/v1/messages", one, "k-one", first),
                                  ("/v1/campaigns", camp, "k-camp", c1)):  # fmt: skip
            st, got, h = call(s, route, b, key=k)
            assert (got, h.get("Idempotent-Replayed")) == (want, "true")
        st, got, h = call(s, path, key="k-csv", raw=body, ctype="text/csv")
        assert (got, h.get("Idempotent-Replayed")) == (u1, "true")
        assert total(s) == 1064
    finally:
        s.stop()


def test_same_key_other_request_other_tenant_and_refusals(spool_url: str,
                                                          tmp_path: Path) -> None:  # fmt: skip
    s = Served(tmp_path, NOWHERE, spool_url=spool_url, serve_args=VOLATILE)
    try:
        m = {"from": "a@example.com", "to": "x@one.example", "subject": "s", "text": "t"}
        st, a, _ = call(s, "/v1/messages", m, key="shared-key")
        assert st == 202
        # Another body, or the same body on another route: 422, nothing spooled.
        st, e, _ = call(s, "/v1/messages", {**m, "subject": "other"}, key="shared-key")
        assert st == 422 and e["error"]["field"] == "Idempotency-Key", e
        assert "another request" in e["error"]["message"]
        st, e, _ = call(s, "/v1/campaigns", {"template": TPL}, key="shared-key")
        assert st == 422, e
        assert total(s) == 1
        # Another tenant's key of the same text is its own: accepted, not a replay.
        st, b, h = call(s, "/v1/messages", m, key="shared-key", tenant="evil")
        assert st == 202 and "Idempotent-Replayed" not in h and b["messages"][0]["ids"] != \
            a["messages"][0]["ids"]  # fmt: skip
        assert total(s) == 2
        # A refused request accepted nothing and is not stored: the key is free.
        st, e, _ = call(s, "/v1/messages", {**m, "to": "not an address"}, key="fix-me")
        assert st == 400, e
        st, _ok, h = call(s, "/v1/messages", m, key="fix-me")
        assert st == 202 and "Idempotent-Replayed" not in h
        assert total(s) == 3
        # Malformed keys.
        for bad in ("", "x" * 256, "has space", "é"):
            st, e, _ = call(s, "/v1/messages", m, key=bad)
            assert st == 400 and e["error"]["field"] == "Idempotency-Key", (bad, e)
        assert total(s) == 3
    finally:
        s.stop()


def _reserve(s: Served, tenant: str, key: str, holder: dict[str, Any]) -> None:
    """Reserve a key from this process (as another serve's request would) with
    the fingerprint the server computes for the message below."""
    import hashlib

    body = orjson.dumps(MSG)
    fp = hashlib.sha256(
        f"POST\0/v1/messages\0application/json\0{hashlib.sha256(body).hexdigest()}".encode()
    ).hexdigest()
    sp = open_spool(s.spool_url or str(s.tmp / "spool"))
    try:
        assert sp.idem_begin(tenant, key, fp, time.time(), 3600, orjson.dumps(holder)) is None
    finally:
        sp.close()


MSG = {"from": "a@example.com", "to": "r@one.example", "subject": "s", "text": "t"}


def test_running_key_is_409_and_a_dead_holders_is_taken_over(spool_url: str,
                                                             tmp_path: Path) -> None:  # fmt: skip
    s = Served(tmp_path, NOWHERE, spool_url=spool_url, serve_args=VOLATILE)
    try:
        # A live holder (this test process): the request is still running.
        _reserve(s, "acme", "busy", {**holder_tag(), "req": "t1"})
        st, e, h = call(s, "/v1/messages", MSG, key="busy")
        assert st == 409 and h.get("Retry-After") == "1", e
        assert "still being processed" in e["error"]["message"]
        # A holder killed mid-request (a pid that is gone): taken over and run.
        dead = {**holder_tag(), "pid": 2**22 + 17, "start": 1.0, "req": "t2"}
        _reserve(s, "acme", "orphan", dead)
        st, a, h = call(s, "/v1/messages", MSG, key="orphan")
        assert st == 202 and a["accepted"] == 1 and "Idempotent-Replayed" not in h, a
        st, b, h = call(s, "/v1/messages", MSG, key="orphan")
        assert (st, b, h.get("Idempotent-Replayed")) == (202, a, "true")
        assert total(s) == 1
    finally:
        s.stop()


def two_nodes(tmp_path: Path, url: str, params: str = "") -> tuple[Served, Served]:
    """Serve nodes a and b (no workers) on one Redis spool, each with its own
    directory; ``params``: more of the spool URL (``&lease=2``)."""
    nodes: list[Served] = []
    try:
        for n in ("a", "b"):
            (tmp_path / n).mkdir()
            nodes.append(Served(tmp_path / n, NOWHERE,
                                spool_url=url + f"&node={n}{params}&dir={tmp_path}/{n}/spool",
                                serve_args=("--no-workers", *VOLATILE)))  # fmt: skip
    except BaseException:
        for s in nodes:
            s.stop()
        raise
    nodes[1].keys = nodes[0].keys  # one key store (shared on Redis)
    return nodes[0], nodes[1]


def test_redis_retry_on_another_node_is_a_replay(redis_server: Any, tmp_path: Path) -> None:
    a, b = two_nodes(tmp_path, redis_server.url())
    try:
        st, first, _ = call(a, "/v1/messages", MSG, key="two-nodes")
        assert st == 202
        st, again, h = call(b, "/v1/messages", MSG, key="two-nodes")
        assert (st, again, h.get("Idempotent-Replayed")) == (202, first, "true")
        st, _e, _ = call(b, "/v1/messages", {**MSG, "text": "x"}, key="two-nodes")
        assert st == 422
        assert total(a) == 1
    finally:
        b.stop()
        a.stop()


def test_records_expire_after_their_ttl(make_spool: Any) -> None:
    sp = make_spool()
    try:
        now = time.time()
        me = orjson.dumps({**holder_tag(), "req": "x"})
        assert sp.idem_begin("t", "k", "fp1", now, 60, me) is None
        sp.idem_finish("t", "k", me, 202, b'{"ok":1}')
        got = sp.idem_begin("t", "k", "fp1", now + 1, 60, b"other")
        assert got is not None and (got.status, got.body, got.fingerprint) == (202, b'{"ok":1}',
                                                                              "fp1")  # fmt: skip
        assert sp.idem_begin("u", "k", "fp1", now + 1, 60, me) is None  # another scope
        # A finished record is never taken over as "stale"; a running one only by
        # the holder named (the taker gets it back under its own name).
        got = sp.idem_begin("t", "k", "fp2", now + 2, 60, b"o", stale=me)
        assert got is not None and got.holder == me and got.status == 202
        got = sp.idem_begin("u", "k", "fp2", now + 2, 60, b"o", stale=b"nobody")
        assert got is not None and got.holder == me
        got = sp.idem_begin("u", "k", "fp2", now + 2, 60, b"o", stale=me)
        assert got is not None and (got.holder, got.fingerprint, got.running) == (b"o", "fp1", True)
        sp.idem_drop("u", "k", b"o")
        assert sp.idem_begin("u", "k", "fp3", now + 3, 60, me) is None
        sp.idem_finish("u", "k", me, 201, b"{}")
        shared = sp.shared()
        if shared is None:  # SQLite: the periodic sweep deletes expired rows
            assert sp.sweep_idem(now + 30) == 0
            assert sp.sweep_idem(now + 120) == 2
        else:  # Redis: the keys expire by themselves, after the ttl
            ttls = [shared.client.pttl(k) for k in shared.client.scan_iter(
                shared.key("idem", "*"))]  # fmt: skip
            assert len(ttls) == 2 and all(50_000 < t <= 60_000 for t in ttls), ttls
        # Expired (swept or not): the key is free again.
        assert sp.idem_begin("t", "k", "fp9", now + 120, 60, me) is None
    finally:
        sp.close()


def test_parts_commit_with_their_rows_and_only_for_the_holder(make_spool: Any) -> None:
    """The spool side of a resumable request: each add_messages under an IdemMark
    records its ids in the key's record in the same transaction; a takeover
    keeps them; the old holder's next part is refused and adds no row; a failed
    request's key is released with its parts; the lease is renewed by its holder."""
    from fastsend.spool import IDEM_RELEASED, IdemLost, IdemMark

    sp = make_spool()
    try:
        now = time.time()
        cid = sp.create_campaign({"kind": "transactional"}, tenant="t")
        a, b = b'{"req":"a"}', b'{"req":"b"}'
        assert sp.idem_begin("t", "k", "fp", now, 600, a, lease=5) is None
        rows = [(f"r{i}@x.example", "x.example", b"{}") for i in range(300)]
        ids0 = sp.add_messages(cid, rows[:200], now, idem=IdemMark("t", "k", a, 0))
        ids1 = sp.add_messages(cid, rows[200:], now, idem=IdemMark("t", "k", a, 1))
        with pytest.raises(IdemLost):  # not the next part: refused, nothing added
            sp.add_messages(cid, rows[:1], now, idem=IdemMark("t", "k", a, 1))
        with pytest.raises(IdemLost):  # not the holder
            sp.add_messages(cid, rows[:1], now, idem=IdemMark("t", "k", b, 2))
        assert sum(sp.counts().values()) == 300
        assert sp.idem_renew("t", "k", a, 5) and not sp.idem_renew("t", "k", b, 5)
        rec = sp.idem_begin("t", "k", "fp", now + 1, 600, b, lease=5)
        assert rec is not None and rec.holder == a and 4 < rec.lease_left <= 5
        assert rec.parts == [(cid, ids0), (cid, ids1)]
        # Taken over (a judged dead): b holds it with a's parts; a's next part is refused.
        rec = sp.idem_begin("t", "k", "fp", now + 2, 600, b, lease=5, stale=a)
        assert rec is not None and rec.holder == b and rec.parts == [(cid, ids0), (cid, ids1)]
        with pytest.raises(IdemLost):
            sp.add_messages(cid, rows[:1], now, idem=IdemMark("t", "k", a, 2))
        assert not sp.idem_renew("t", "k", a, 5)
        assert sum(sp.counts().values()) == 300
        ids2 = sp.add_messages(cid, rows[:1], now, idem=IdemMark("t", "k", b, 2))
        # b fails (a 5xx): the key is released with its parts, for the next retry.
        sp.idem_drop("t", "k", b)
        rec = sp.idem_begin("t", "k", "fp", now + 3, 600, a, lease=5)
        assert rec is not None and rec.holder == IDEM_RELEASED and rec.running
        assert rec.parts[-1] == (cid, ids2)
        rec = sp.idem_begin("t", "k", "fp", now + 3, 600, a, lease=5, stale=IDEM_RELEASED)
        assert rec is not None and rec.holder == a and len(rec.parts) == 3
        sp.idem_finish("t", "k", a, 202, b"{}")
        assert not sp.idem_renew("t", "k", a, 5)  # answered: nothing to renew
        # A request that spooled nothing and failed: forgotten, the key is free.
        assert sp.idem_begin("t", "k2", "fp", now, 600, a, lease=5) is None
        sp.idem_drop("t", "k2", a)
        assert sp.idem_begin("t", "k2", "fp", now, 600, b, lease=5) is None
    finally:
        sp.close()


def test_redis_lease_lapses_on_its_own(redis_server: Any, tmp_path: Path) -> None:
    """On Redis the holder's lease is a key with an expiry (Redis's clock): a
    holder that stops renewing is seen as lapsed, one that renews never is.
    (A lease of 3 s renewed every 0.5 s: a stall of the test up to 2.5 s, a
    loaded CI's, still renews in time; a lease of 1 s failed on a 0.5 s stall.)"""
    sp = open_spool(redis_server.url(node="n1", dir=str(tmp_path)))
    try:
        now = time.time()
        assert sp.idem_begin("t", "k", "fp", now, 600, b"h", lease=3) is None
        for _ in range(8):  # 4 s in all: past the first lease
            time.sleep(0.5)
            assert sp.idem_renew("t", "k", b"h", 3)
        rec = sp.idem_begin("t", "k", "fp", now, 600, b"x", lease=3)
        assert rec is not None and rec.lease_left > 0.3
        time.sleep(3.2)
        rec = sp.idem_begin("t", "k", "fp", now, 600, b"x", lease=3)
        assert rec is not None and rec.lease_left == 0 and rec.holder == b"h"
    finally:
        sp.close()


def test_a_spool_from_before_leases_and_parts_gets_them(tmp_path: Path) -> None:
    """An existing SQLite spool whose idempotency table has no lease or parts
    columns (made by the previous release) is upgraded when opened; its
    records stay valid."""
    import sqlite3

    from fastsend.spool.sqlite import SQLiteSpool

    (tmp_path / "s").mkdir()
    db = sqlite3.connect(tmp_path / "s" / "spool.db")
    db.executescript(
        "CREATE TABLE idempotency (tenant TEXT NOT NULL, key TEXT NOT NULL, fp TEXT NOT NULL,"
        " holder BLOB NOT NULL, status INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL DEFAULT"
        " x'', created REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (tenant, key))"
        " WITHOUT ROWID;"
    )
    now = time.time()
    db.execute("INSERT INTO idempotency VALUES ('t', 'k', 'fp', x'7b7d', 202, x'7b7d', ?, ?)",
               (now, now + 600))  # fmt: skip
    db.commit()
    db.close()
    sp = SQLiteSpool(str(tmp_path / "s"))
    try:
        rec = sp.idem_begin("t", "k", "fp", now, 600, b"me")
        assert rec is not None and (rec.status, rec.body, rec.parts) == (202, b"{}", [])
        assert sp.idem_begin("t", "k2", "fp", now, 600, b"me") is None
    finally:
        sp.close()
