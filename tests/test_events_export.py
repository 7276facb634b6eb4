"""GET /v1/events: the bulk export an operator pulls (all events of a time range,
campaign, type), streamed, paged with a cursor, NDJSON and CSV, authenticated and
scoped to the key's tenant.

Real parts: ``fastsend serve`` delivering to fastsend's own sink on loopback (one
recipient refused 550 with a formula in its text), the HTTP API over aiohttp, the
export read back with the csv module and compared with the event log; the same
on a Redis spool (a real redis-server), where the export was a 501 (aud15r).
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from tests._serve_helpers import Served, http

from fastsend.sink import SinkThread

MSG = {"from": "news@example.com", "subject": "s", "text": "t"}


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def served(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Served]:  # fmt: skip
    evil = "=HYPERLINK(\"http://x.test\")"
    tmp = tmp_path_factory.mktemp("export")
    url = ""
    if request.param == "redis":
        url = str(request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp / "spool")))
    with SinkThread(fault_text={"permfail": (550, "5.1.1", evil)}) as sink:
        s = Served(tmp, f"{sink.host}:{sink.port}", spool_url=url,
                   extra='[dashboard]\nadmin_tenants = ["acme"]\n',
                   serve_args=("--allow-volatile",) if url else ())  # fmt: skip
        try:
            yield s
        finally:
            s.stop()


def _log(s: Served) -> list[dict[str, Any]]:
    path = s.tmp / "spool" / "events.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def _send(s: Served, tenant: str, to: list[str]) -> tuple[int, list[int]]:
    st, body = s.req("POST", "/v1/messages", {**MSG, "to": to}, tenant=tenant)
    assert st == 202, body
    ids = list(body["messages"][0]["ids"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for e in _log(s):
            if e.get("id") == ids[0] and e["event"] == "accepted":
                return int(e["campaign"]), ids
        time.sleep(0.05)
    raise AssertionError("no accepted event")


def _until_final(s: Served, ids: list[int]) -> None:
    deadline = time.monotonic() + 60
    want = set(ids)
    while time.monotonic() < deadline:
        final = {e["id"] for e in _log(s) if e["event"] in ("delivered", "bounced")}
        if want <= final:
            return
        time.sleep(0.1)
    raise AssertionError("messages not final in time")


def _get(s: Served, query: str, tenant: str = "evil") -> tuple[int, Any, dict[str, str]]:
    import asyncio

    import aiohttp

    async def go() -> tuple[int, Any, dict[str, str]]:
        h = {"Authorization": f"Bearer {s.keys[tenant]}"} if tenant else {}
        async with aiohttp.ClientSession() as c, c.get(s.base + "/v1/events?" + query,
                                                        headers=h) as r:  # fmt: skip
            return r.status, await r.read(), dict(r.headers)

    return asyncio.run(go())


def _ndjson(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in body.splitlines() if x]


def test_export_pages_filters_and_tenants(served: Served) -> None:
    """There was no bulk export: an operator could read one message's events
    (GET /v1/messages/ID) or counts, never the events of a range."""
    t0 = time.time() - 1
    cid, ids = _send(served, "evil", [f"u{i}@x.test" for i in range(24)] + ["permfail-1@x.test"])
    other, other_ids = _send(served, "acme", ["a1@x.test", "a2@x.test"])
    _until_final(served, ids + other_ids)
    log = [e for e in _log(served) if e.get("campaign") == cid and e["time"] >= t0]
    want = sorted((e["time"], e["event"], e["id"]) for e in log)
    assert len(want) >= 50  # accepted + delivered/bounced for each of 25
    # The index (which the export reads) flushes every 0.2 s: until it has them all
    # (a fixed 0.5 s was too short for a loaded CI).
    deadline = time.monotonic() + 60
    while len(_ndjson(_get(served, f"from={int(t0)}&campaign={cid}&limit=1000")[1])) < len(want):
        assert time.monotonic() < deadline, "the index did not get the log's events"
        time.sleep(0.1)

    # Paged with a cursor: every event once, in time order, no page over the limit.
    got: list[dict[str, Any]] = []
    query = f"from={int(t0)}&limit=7"
    pages = 0
    while True:
        st, body, headers = _get(served, query)
        assert st == 200 and headers["Content-Type"].startswith("application/x-ndjson")
        page = _ndjson(body)
        assert 0 < len(page) <= 7, (query, body, headers)
        got += page
        pages += 1
        nxt = headers.get("Fastsend-Next-Cursor")
        if nxt is None:
            assert "Link" not in headers
            break
        assert f"cursor={nxt}" in headers["Link"] and 'rel="next"' in headers["Link"]
        query = f"from={int(t0)}&limit=7&cursor={nxt}"
    assert pages == -(-len(want) // 7)
    assert sorted((e["time"], e["event"], e["id"]) for e in got) == want  # each once
    if not served.spool_url:
        assert [e["time"] for e in got] == sorted(e["time"] for e in got)  # in time order
    else:  # in the order recorded: within a flush (0.2 s) of time order
        assert all(b["time"] > a["time"] - 1 for a, b in itertools.pairwise(got))
    assert all(e["campaign"] == cid for e in got)  # another tenant's events never show

    # Filters: type, campaign; another tenant's campaign selects nothing.
    st, body, _ = _get(served, f"from={int(t0)}&type=bounced")
    assert [(e["event"], e["rcpt"]) for e in _ndjson(body)] == [("bounced", "permfail-1@x.test")]
    st, body, _ = _get(served, f"from={int(t0)}&campaign={other}")
    assert st == 200 and body == b""
    st, body, _ = _get(served, f"from={int(t0)}&campaign={other}", tenant="acme")
    assert {e["id"] for e in _ndjson(body)} == set(other_ids)
    # An admin's node-wide export has both tenants'.
    st, body, _ = _get(served, f"from={int(t0)}&scope=node&type=accepted", tenant="acme")
    assert {e["id"] for e in _ndjson(body)} >= set(ids) | set(other_ids)
    st, body, _ = _get(served, "scope=node")
    assert st == 403

    # CSV: a header row, one row per event, the receiver's text not a formula.
    st, body, headers = _get(served, f"from={int(t0)}&format=csv&type=bounced,delivered")
    assert st == 200 and headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == 25 and rows[0].keys() >= {"time", "event", "id", "rcpt", "text"}
    bounced = next(r for r in rows if r["event"] == "bounced")
    assert bounced["text"].startswith("'=HYPERLINK") and bounced["code"] == "550"
    assert bounced["reason"] and orjson.loads(bounced["extra"])["attempt"] == 1


def test_export_refuses_bad_input_and_no_key(served: Served) -> None:
    for query, field in (("limit=0", "limit"), ("limit=100001", "limit"), ("limit=x", "limit"),
                         ("format=xml", "format"), ("from=yesterday", "from"),
                         ("from=-1h&to=-2h", "to"), ("cursor=%%%", "cursor"),
                         ("cursor=bm90OmFjdXJzb3I", "cursor"), ("campaign=x", "campaign"),
                         ("cursor=aW5mOjE", "cursor"),  # inf:1
                         # a typo of an event's name: an empty export said nothing before
                         ("type=bounce", "type"), ("event=delivered,complaint", "event"),
                         # a misspelt filter: ignored before, the whole tenant's export
                         ("campaign_id=7", "campaign_id"), ("limit=5&types=bounced", "types"),
                         ("cursor=NTo5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OQ", "cursor")):  # fmt: skip
        st, body, _ = _get(served, query)
        err = orjson.loads(body)["error"]
        assert st == 400 and err.get("field") == field, (query, err)
    # Cursors this server never gave: nothing past them, or all of the range (a 500
    # before: a row id over SQLite's integers, a position outside Redis stream ids).
    for raw in (b"1e300:5", b"-5:3"):
        cur = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        st, body, _ = _get(served, f"from=-1h&cursor={cur}")
        assert st == 200 and (body == b"" or raw == b"-5:3"), (raw, st, body)
    st, _, _ = _get(served, "", tenant="")
    assert st == 401
    st, body = http("GET", served.base + "/v1/events?limit=1", key="fs_bogus_key")
    assert st == 401


def test_redis_export_sees_every_nodes_events_once(redis_server: Any) -> None:
    """Two nodes' event indexes on one Redis (each flushing its own events, in
    turns): an export from either node pages through both nodes' events, each
    exactly once, a tenant's campaigns only; a range ``to`` in the past leaves out
    what came after it; the time index is trimmed with the events' expiry."""
    import redis

    from fastsend.serve.eventindex import ExportQuery
    from fastsend.serve.shared_state import RedisEventIndex

    prefix = str(redis_server.url(node="n1")).split("prefix=")[1].split("&")[0]
    r = redis.Redis(host="127.0.0.1", port=redis_server.port)
    a, b = RedisEventIndex(r, prefix, ttl=3600), RedisEventIndex(r, prefix, ttl=3600)
    t0 = time.time() - 100
    sent = []
    for k in range(600):  # node a: ids 1..; node b: ids 10001..; three campaigns
        node, mid = (a, 1 + k) if k % 3 else (b, 10_001 + k)
        e = {"time": t0 + k * 0.1, "event": ("accepted", "delivered")[k % 2], "id": mid,
             "campaign": 1 + k % 3, "rcpt": f"u{k}@x.test"}  # fmt: skip
        node.listener([e])
        sent.append(e)
        if k % 50 == 49:
            node.flush()
    a.flush()
    b.flush()

    def export(q: ExportQuery, index: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            end, more = index.export_end(q)
            after = q.after
            while True:
                bodies, after = index.export_chunk(q, after, end, 13)
                out += [orjson.loads(x) for x in bodies]
                if not bodies or after == end:
                    break
            if not more:
                return out
            q = ExportQuery(q.t0, q.t1, q.campaigns, q.kinds, end, q.limit)

    got = export(ExportQuery(t0 - 1, time.time() + 1, None, None, None, 37), b)
    assert sorted(e["id"] for e in got) == sorted(e["id"] for e in sent)  # each once
    mine = export(ExportQuery(t0 - 1, time.time() + 1, [2, 3], ["delivered"], None, 50), a)
    want = [e for e in sent if e["campaign"] in (2, 3) and e["event"] == "delivered"]
    assert sorted(e["id"] for e in mine) == sorted(e["id"] for e in want)
    early = export(ExportQuery(t0 - 1, t0 + 10, None, None, None, 1000), a)
    assert sorted(e["id"] for e in early) == sorted(e["id"] for e in sent if e["time"] < t0 + 10)
    assert 0 < r.xlen(f"{{{prefix}}}:evx") <= 600
