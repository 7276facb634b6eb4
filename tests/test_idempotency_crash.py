"""``Idempotency-Key`` across crashes, failures and slow or dead holders, against
a real ``fastsend serve`` on both spool backends (SQLite; a real redis-server).
The crash windows are hit with the serve's test-only fault hook
(``FASTSEND_TEST_FAULT``, inert unless set: fastsend.serve.idempotency):

- kill -9 after a request's rows are committed and before its answer is
  stored, on every route that accepts mail (one message, a batch over two
  campaigns, a campaign with recipients, a JSON list, a CSV and a JSON-lines
  upload): the retry after the restart accepts nothing again and answers what
  the first attempt would have (the same ids, the same campaign, the same job),
  saying ``Idempotent-Resumed``;
- a 500 (and a kill -9) after the first of several parts of one request (a
  batch over two campaigns; a JSON list of two spool transactions): the retry
  spools only the missing part;
- kill -9 between a part's commit and its "accepted" events: the retry emits
  them (once, marked resumed); after they were told: not again;
- a holder on another host that keeps renewing its lease keeps its key longer
  than the lease (409s); once it stops, a retry takes the key over within
  about a lease, not 600 s; a slow request of a real serve renews its own lease;
- an upload job whose serve was killed is taken over by another node that is
  running (Redis), not only at the next start: every row exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from tests._serve_helpers import Served
from tests.test_idempotency import (
    MSG,
    NOWHERE,
    TPL,
    VOLATILE,
    call,
    csv_list,
    spool_url,
    total,
    two_nodes,
)

from fastsend.spool import open_spool

__all__ = ["spool_url"]  # the fixture, shared with test_idempotency

FAULT = "FASTSEND_TEST_FAULT"


def dies(s: Served, path: str, body: Any = None, *, key: str, raw: bytes | None = None,
         ctype: str = "application/json") -> None:  # fmt: skip
    """POST that the serve does not answer: it is killed -9 by the fault hook."""

    async def go() -> None:
        h = {"Authorization": f"Bearer {s.keys['acme']}", "Content-Type": ctype,
             "Idempotency-Key": key}  # fmt: skip
        data = raw if raw is not None else orjson.dumps(body)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as c:
            with pytest.raises(aiohttp.ClientError):
                async with c.post(s.base + path, data=data, headers=h) as r:
                    await r.read()

    asyncio.run(go())
    assert s.proc.wait(20) == -9, s.lines[-20:]


def campaigns(s: Served) -> int:
    async def go() -> int:
        h = {"Authorization": f"Bearer {s.keys['acme']}"}
        async with (
            aiohttp.ClientSession() as c,
            c.get(s.base + "/v1/campaigns?limit=1000", headers=h) as r,
        ):
            return len(orjson.loads(await r.read())["campaigns"])

    return asyncio.run(go())


def ndjson(prefix: str, n: int) -> bytes:
    return b"".join(orjson.dumps({"email": f"{prefix}{i}@n.example", "name": "N"}) + b"\n"
                    for i in range(n))  # fmt: skip


def two_campaign_batch(tag: str) -> dict[str, Any]:
    """A batch that spools in two transactions: a template message (its own
    campaign) and two self-contained ones (the tenant's transactional campaign)."""
    return {"messages": [
        {"template": TPL, "to": [f"{tag}-t{i}@one.example" for i in range(3)],
         "variables": {"name": "T"}},
        {"from": "a@example.com", "to": f"{tag}-m1@two.example", "subject": "s", "text": "t"},
        {"from": "a@example.com", "to": f"{tag}-m2@two.example", "subject": "s", "text": "t"},
    ]}  # fmt: skip


def served_with_a_campaign(tmp_path: Path, spool_url: str) -> tuple[Served, str]:
    """A serve, and the recipients route of a (paused) template campaign of acme."""
    s = Served(tmp_path, NOWHERE, spool_url=spool_url, serve_args=VOLATILE)
    st, c, _ = call(s, "/v1/campaigns", {"template": TPL, "paused": True}, key=None)
    assert st == 201, c
    return s, f"/v1/campaigns/{c['id']}/recipients"


def test_kill_after_the_rows_before_the_answer_is_not_accepted_twice(
    spool_url: str, tmp_path: Path
) -> None:
    s, rcpts = served_with_a_campaign(tmp_path, spool_url)
    try:
        one = {"from": "a@example.com", "to": ["x@one.example", "y@one.example"],
               "subject": "s", "text": "t"}  # fmt: skip
        camp = {"template": TPL, "paused": True,
                "recipients": [{"email": f"c{i}@three.example", "name": "C"} for i in range(4)]}
        json_list = {"recipients": [{"email": f"j{i}@four.example", "name": "J"}
                                    for i in range(30)]}  # fmt: skip
        forms: list[tuple[str, Any, bytes | None, str, int]] = [
            ("/v1/messages", one, None, "application/json", 2),
            ("/v1/messages", two_campaign_batch("b"), None, "application/json", 5),
            ("/v1/campaigns", camp, None, "application/json", 4),
            (rcpts, json_list, None, "application/json", 30),
            (rcpts, None, csv_list("v", 1500), "text/csv", 1500),
            (rcpts, None, ndjson("n", 70), "application/x-ndjson", 70),
        ]
        assert s.stop() == 0
        s.env = {FAULT: "idem-kill-before-answer"}
        n_camps = None
        for i, (route, body, raw, ctype, n) in enumerate(forms):
            s.start()
            if n_camps is None:
                n_camps = campaigns(s)
            before = total(s)
            dies(s, route, body, key=f"crash-{i}", raw=raw, ctype=ctype)
            assert total(s) == before + n, route  # the rows were committed, unanswered
        spooled = total(s)
        s.env = {}
        s.start()
        n_camps_after_crash = campaigns(s)
        for i, (route, body, raw, ctype, n) in enumerate(forms):
            st, got, h = call(s, route, body, key=f"crash-{i}", raw=raw, ctype=ctype)
            assert 200 <= st < 300 and got["accepted"] == n, (route, st, got)
            assert "Idempotent-Replayed" not in h and h.get("Idempotent-Resumed") == str(n), h
            if route == "/v1/messages":  # the ids of the rows the killed attempt spooled
                ids = [i for m in got["messages"] for i in m["ids"]]
                assert len(set(ids)) == n
                sp = open_spool(s.spool_url or str(s.tmp / "spool"), readonly=True)
                try:
                    assert all(sp.message(i) is not None for i in ids)
                finally:
                    sp.close()
            st2, again, h = call(s, route, body, key=f"crash-{i}", raw=raw, ctype=ctype)
            assert (st2, again, h.get("Idempotent-Replayed")) == (st, got, "true")
        assert total(s) == spooled  # nothing accepted twice
        # The campaigns the killed attempts created (the new one, the template's,
        # the transactional one) are reused, none created again.
        assert n_camps is not None and n_camps_after_crash == n_camps + 3
        assert campaigns(s) == n_camps_after_crash
        assert "continued a request an earlier attempt left unanswered" in "".join(s.lines)
    finally:
        s.stop()


def test_a_failure_or_kill_after_some_parts_is_continued_by_the_retry(
    spool_url: str, tmp_path: Path
) -> None:
    s, rcpts = served_with_a_campaign(tmp_path, spool_url)
    try:
        assert s.stop() == 0
        # A 500 after the first of two parts: the retry spools the second only.
        s.env = {FAULT: "idem-fail-after-part:0"}
        s.start()
        batch = two_campaign_batch("f")
        st, e, _ = call(s, "/v1/messages", batch, key="fail-batch")
        assert st == 500, e
        first = total(s)
        assert first == 3  # the first campaign's rows (the template's), nothing else
        st, got, h = call(s, "/v1/messages", batch, key="fail-batch")
        assert st == 202 and got["accepted"] == 5, got
        assert h.get("Idempotent-Resumed") == str(first), h
        assert total(s) == 5
        st, again, h = call(s, "/v1/messages", batch, key="fail-batch")
        assert (again, h.get("Idempotent-Replayed")) == (got, "true")
        # A JSON list of two spool transactions (20,000 rows each at most).
        big = {"recipients": [{"email": f"r{i}@five.example", "name": "R"}
                              for i in range(20_500)]}  # fmt: skip
        st, e, _ = call(s, rcpts, big, key="fail-list")
        assert st == 500 and total(s) == 5 + 20_000, e
        st, got, h = call(s, rcpts, big, key="fail-list")
        assert st == 202 and got["accepted"] == 20_500, got
        assert h.get("Idempotent-Resumed") == "20000"
        assert total(s) == 5 + 20_500
        assert s.stop() == 0
        # kill -9 after the first part: the retry after the restart continues.
        s.env = {FAULT: "idem-kill-after-part:0"}
        s.start()
        other = {"recipients": [{"email": f"k{i}@six.example", "name": "K"}
                                for i in range(20_300)]}  # fmt: skip
        dies(s, rcpts, other, key="kill-list")
        assert total(s) == 5 + 20_500 + 20_000
        s.env = {}
        s.start()
        st, got, h = call(s, rcpts, other, key="kill-list")
        assert st == 202 and got["accepted"] == 20_300 and h.get("Idempotent-Resumed") == "20000"
        assert total(s) == 5 + 20_500 + 20_300  # every recipient once
    finally:
        s.stop()


def message_events(s: Served, mid: int) -> list[dict[str, Any]]:
    """GET /v1/messages/{mid}'s events (the event index)."""

    async def go() -> list[dict[str, Any]]:
        h = {"Authorization": f"Bearer {s.keys['acme']}"}
        async with (
            aiohttp.ClientSession() as c,
            c.get(f"{s.base}/v1/messages/{mid}", headers=h) as r,
        ):
            assert r.status == 200, await r.text()
            return list(orjson.loads(await r.read())["events"])

    return asyncio.run(go())


def test_events_of_a_part_a_killed_attempt_committed_are_told_once(
    spool_url: str, tmp_path: Path
) -> None:
    """Killed between a part's commit and its events: the retry emits them
    ("resumed"); killed after they were told: the retry emits nothing again."""
    s = Served(tmp_path, NOWHERE, spool_url=spool_url, serve_args=VOLATILE)
    try:
        assert s.stop() == 0
        untold, told = two_campaign_batch("u"), two_campaign_batch("t")
        for fault, key, body in (("idem-kill-after-commit:0", "untold", untold),
                                 ("idem-kill-after-part:0", "told", told)):  # fmt: skip
            s.env = {FAULT: fault}
            s.start()
            dies(s, "/v1/messages", body, key=key)
        s.env = {}
        s.start()
        accepted: dict[int, list[dict[str, Any]]] = {}
        for line in (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines():
            e = orjson.loads(line)
            if e.get("event") == "accepted":
                accepted.setdefault(e["id"], []).append(e)
        assert len(accepted) == 3  # "told"'s part 0 only: "untold" died before its events
        for key, body in (("untold", untold), ("told", told)):
            st, got, h = call(s, "/v1/messages", body, key=key)
            assert st == 202 and got["accepted"] == 5 and h.get("Idempotent-Resumed") == "3", got
            ids = [i for m in got["messages"] for i in m["ids"]]
            assert s.proc.poll() is None
            log: dict[int, list[dict[str, Any]]] = {}
            for line in (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines():
                e = orjson.loads(line)
                if e.get("event") == "accepted" and e["id"] in ids:
                    log.setdefault(e["id"], []).append(e)
            assert sorted(log) == sorted(ids)  # every row told ...
            assert all(len(v) == 1 for v in log.values()), log  # ... once
            resumed = {i for i, v in log.items() if v[0].get("resumed")}
            assert resumed == (set(ids[:3]) if key == "untold" else set()), (key, resumed)
            rcpts = {i: log[i][0]["rcpt"] for i in ids}
            assert sorted(rcpts.values()) == sorted(
                t for m in body["messages"] for t in ([m["to"]] if isinstance(m["to"], str)
                                                      else m["to"]))  # fmt: skip
            for i in ids:  # the index the API reads has them too
                evs = [e for e in message_events(s, i) if e["event"] == "accepted"]
                assert len(evs) == 1 and evs[0]["rcpt"] == rcpts[i], (i, evs)
        assert "before telling" in "".join(s.lines)
    finally:
        s.stop()


def test_a_failure_after_a_new_campaign_or_list_job_reuses_it(
    spool_url: str, tmp_path: Path
) -> None:
    """A 500 once the request created its campaign (before any row) or its
    upload's list job (after its rows): the key is kept, and the retry goes on
    with that campaign / answers from that job; nothing is created twice."""
    s, rcpts = served_with_a_campaign(tmp_path, spool_url)
    try:
        assert s.stop() == 0
        s.env = {FAULT: "idem-fail-after-campaign"}
        s.start()
        before = campaigns(s)
        camp = {"template": TPL, "paused": True,
                "recipients": [{"email": f"c{i}@three.example", "name": "C"} for i in range(4)]}
        st, e, _ = call(s, "/v1/campaigns", camp, key="fail-camp")
        # (created "staging": the tenant sees it once its rows are in)
        assert st == 500 and campaigns(s) == before and total(s) == 0, e
        st, got, h = call(s, "/v1/campaigns", camp, key="fail-camp")
        assert st == 201 and got["accepted"] == 4 and h.get("Idempotent-Resumed") == "0", got
        assert campaigns(s) == before + 1 and total(s) == 4  # the same campaign
        assert s.stop() == 0
        s.env = {FAULT: "idem-fail-after-job"}
        s.start()
        body = csv_list("j", 800)
        st, e, _ = call(s, rcpts, key="fail-job", raw=body, ctype="text/csv")
        assert st == 500 and total(s) == 4 + 800, e  # spooled, then the failure
        st, got, h = call(s, rcpts, key="fail-job", raw=body, ctype="text/csv")
        assert st == 202 and (got["accepted"], got["status"]) == (800, "spooled"), got
        assert h.get("Idempotent-Resumed") == "800"
        assert total(s) == 4 + 800  # the job's rows, once
        uploads = s.tmp / "spool" / "uploads"
        assert not uploads.exists() or os.listdir(uploads) == []  # the retry's copy removed
    finally:
        s.stop()


def _fp(body: dict[str, Any]) -> str:
    """The fingerprint the server computes for POST /v1/messages with ``body``."""
    digest = hashlib.sha256(orjson.dumps(body)).hexdigest()
    return hashlib.sha256(f"POST\0/v1/messages\0application/json\0{digest}".encode()).hexdigest()


def test_a_holder_elsewhere_is_judged_by_its_lease(spool_url: str, tmp_path: Path) -> None:
    """A request held by a serve on another host: while it renews its lease the
    key stays its own (409, however long); once it stops, a retry takes it
    over within about a lease (was: a fixed 600 s)."""
    s = Served(tmp_path, NOWHERE, spool_url=spool_url, serve_args=VOLATILE)
    where = s.spool_url or str(s.tmp / "spool")
    sp = open_spool(where)
    try:
        holder = orjson.dumps({"pid": 4242, "host": "mx9.elsewhere.example", "start": 1.0,
                               "since": time.time(), "req": "far"})  # fmt: skip
        lease = 1.5
        assert sp.idem_begin("acme", "far", _fp(MSG), time.time(), 3600, holder,
                             lease=lease) is None  # fmt: skip
        stop = threading.Event()
        renewed: list[bool] = []

        def renew() -> None:  # the far holder, working
            mine = open_spool(where)
            try:
                while not stop.wait(0.3):
                    renewed.append(mine.idem_renew("acme", "far", holder, lease))
            finally:
                mine.close()

        t = threading.Thread(target=renew, daemon=True)
        t.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * lease:  # alive, longer than its lease
            st, e, h = call(s, "/v1/messages", MSG, key="far")
            assert st == 409 and h.get("Retry-After") == "1", e
            time.sleep(0.25)
        stop.set()
        t.join()
        assert renewed and all(renewed)
        dead = time.monotonic()
        while True:  # dead: taken over once its lease has lapsed
            st, got, h = call(s, "/v1/messages", MSG, key="far")
            if st != 409:
                break
            assert time.monotonic() - dead < lease + 5, "not taken over"
            time.sleep(0.2)
        assert st == 202 and got["accepted"] == 1 and time.monotonic() - dead >= lease * 0.5
        st, again, h = call(s, "/v1/messages", MSG, key="far")
        assert (again, h.get("Idempotent-Replayed")) == (got, "true")
        assert total(s) == 1
    finally:
        sp.close()
        s.stop()


def test_a_slow_request_renews_its_own_lease(spool_url: str, tmp_path: Path) -> None:
    s = Served(tmp_path, NOWHERE, spool_url=spool_url, serve_args=VOLATILE,
               api="idempotency_lease_s = 3")  # fmt: skip
    s.stop()
    s.env = {FAULT: "idem-slow-before-answer:9"}  # 9 s between the rows and the stored answer
    s.start()
    sp = open_spool(s.spool_url or str(s.tmp / "spool"))
    try:
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(r=call(s, "/v1/messages", MSG,
                                                              key="slow")))  # fmt: skip
        t.start()
        # Its row is spooled (it holds the key: its hold came first), then 4.5 s
        # more: well past the 3 s lease, renewed, so not lapsed. (A fixed 2.5 s
        # from the start: a loaded serve could reach the key after the probe. A 1 s
        # lease: a loaded serve's renewal came late and it lapsed, a train's failure.)
        deadline = time.monotonic() + 60
        while not sum(sp.counts().values()):
            assert time.monotonic() < deadline and t.is_alive(), out
            time.sleep(0.02)
        time.sleep(4.5)
        rec = sp.idem_begin("acme", "slow", _fp(MSG), time.time(), 3600, b"probe", lease=1)
        assert rec is not None and rec.running and rec.lease_left > 0, rec
        st, e, _ = call(s, "/v1/messages", MSG, key="slow")
        assert st == 409, e
        t.join(30)
        st, first, _ = out["r"]
        assert st == 202
        st, again, h = call(s, "/v1/messages", MSG, key="slow")
        assert (again, h.get("Idempotent-Replayed")) == (first, "true")
        assert total(s) == 1
    finally:
        sp.close()
        s.stop()


BIG = 30_000  # over SYNC_ROWS (20,000): answered before it is spooled; 15 transactions


def test_a_running_node_takes_over_a_dead_nodes_upload(redis_server: Any, tmp_path: Path) -> None:
    url = redis_server.url()
    a, b = two_nodes(tmp_path, url, "&lease=2")
    try:
        # a freezes itself after its 4th spool transaction of the list (of 15): it is
        # killed mid-list however fast it spools, and the list need not be long
        a.stop()
        a.env = {FAULT: "ingest-stop-after-commit:4"}
        a.start()
        st, c, _ = call(a, "/v1/campaigns", {"template": TPL, "paused": True}, key=None)
        assert st == 201, c
        st, up, _ = call(a, f"/v1/campaigns/{c['id']}/recipients", key="big",
                         raw=csv_list("u", BIG), ctype="text/csv")  # fmt: skip
        assert st == 202 and up["status"] == "spooling" and up["accepted"] < BIG, up
        a.proc.kill()  # node a dies while spooling; b is running and continues it
        assert a.proc.wait(10) == -9
        sp = open_spool(url)
        try:
            deadline = time.monotonic() + 240
            while True:
                job = sp.get_ingest(up["job"])
                assert job is not None
                if job.finished:
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert (job.status, job.accepted) == ("done", BIG)
            assert sum(sp.counts(c["id"]).values()) == BIG  # every row exactly once
        finally:
            sp.close()
        assert "continuing the uploaded list" in "".join(b.lines)
        # A retry of the (answered) upload, to b: its answer again, nothing spooled.
        st, got, h = call(b, f"/v1/campaigns/{c['id']}/recipients", key="big",
                          raw=csv_list("u", BIG), ctype="text/csv")  # fmt: skip
        assert (st, got, h.get("Idempotent-Replayed")) == (202, up, "true")
        assert total(b) == BIG
    finally:
        b.stop()
        a.stop()
