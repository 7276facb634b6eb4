"""Multi-node serve as a tenant and the operator see it (session 22's audit).

Real parts: one redis-server, two ``fastsend serve`` nodes on it (node ``a``
delivers with one worker to a SinkThread, node ``b`` takes API calls only,
``--no-workers``), as a balancer would put them: whichever node answers a
poll must answer for the cluster. Tests wait for conditions with deadlines,
never for fixed times.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests._serve_helpers import Served, until

from fastsend.sink import SinkThread

VOLATILE = ("--allow-volatile",)  # the test's redis-server keeps no AOF
TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


@pytest.fixture
def nodes(redis_server: Any, tmp_path: Path) -> Iterator[tuple[Served, Served, SinkThread]]:
    """Node a (one worker, to the sink) and node b (no workers) on one Redis spool."""
    url = redis_server.url()
    extra = '[dashboard]\nadmin_tenants = ["acme"]\n'
    with SinkThread() as sink:
        made: list[Served] = []
        try:
            for n, args in (("a", VOLATILE), ("b", ("--no-workers", *VOLATILE))):
                (tmp_path / n).mkdir()
                made.append(Served(tmp_path / n, f"{sink.host}:{sink.port}", extra=extra,
                                   spool_url=url + f"&node={n}&dir={tmp_path}/{n}/spool",
                                   serve_args=args))  # fmt: skip
            yield made[0], made[1], sink
        finally:
            for s in reversed(made):
                s.stop()


def _delivered(s: Served, cid: int, n: int) -> bool:
    st, got = s.req("GET", f"/v1/campaigns/{cid}", tenant="acme")
    return st == 200 and got["counts"]["delivered"] == n


def test_dashboard_answers_for_the_cluster_on_any_node(
    nodes: tuple[Served, Served, SinkThread],
) -> None:
    """A tenant's rates, domain and source-IP tables and recent events on the
    dashboard are the cluster's, whichever node answers the poll: before, node
    b (no workers) showed none of the deliveries node a made (0 of 30, no
    delivered event), and node a none of the accepted events b emitted."""
    a, b, _sink = nodes
    n = 30
    rcpts = [{"email": f"r{i}@d{i % 3}.example", "name": f"n{i}"} for i in range(n)]
    st, got = b.req("POST", "/v1/campaigns", {"name": "c22", "template": TPL,
                                               "recipients": rcpts}, tenant="acme")  # fmt: skip
    assert st == 201, got
    cid = got["id"]
    until("the campaign delivered", lambda: _delivered(a, cid, n))

    def dash(s: Served, tenant: str = "acme") -> dict[str, Any]:
        st, v = s.req("GET", "/v1/dashboard", tenant=tenant)
        assert st == 200, v
        return v

    def counted(s: Served) -> dict[str, Any] | None:
        v = dash(s)
        kinds = {e["event"] for e in v["events"]}  # (b's accepted, a's delivered)
        return v if sum(v["series"]["delivered"]) == n and len(kinds) > 1 else None

    for s in (b, a):
        view = until(f"node {s.cfg.parent.name}'s dashboard counting {n} deliveries",
                     lambda s=s: counted(s))  # fmt: skip
        assert view["live_scope"] == "cluster"
        assert {r["domain"]: r["delivered"] for r in view["domains"]} == {
            f"d{j}.example": n // 3 for j in range(3)
        }
        assert sum(r["delivered"] for r in view["source_ips"]) == n
        kinds = {e["event"] for e in view["events"]}
        assert {"delivered", "accepted"} <= kinds, kinds
        times = [e["time"] for e in view["events"]]
        assert times == sorted(times, reverse=True)  # newest first, both nodes' merged
    # /v1/stats (rollups, the event index's per-domain counts): the same on both
    def stats(s: Served, q: str) -> dict[str, Any]:
        st, v = s.req("GET", f"/v1/stats?{q}", tenant="acme")
        assert st == 200, v
        return v

    def totals(s: Served) -> dict[str, Any] | None:
        c = stats(s, "from=-1h&granularity=total")["totals"]["counts"]
        return c if (c.get("accepted"), c.get("delivered")) == (n, n) else None

    for s in (a, b):  # (b counted the accepted events, a the deliveries)
        until("the rollups of both nodes in Redis", lambda s=s: totals(s))
        groups = until("the event index's counts by domain", lambda s=s: (
            g := stats(s, "by=domain&window=1h")["groups"]) and sum(
                x["counts"].get("delivered", 0) for x in g.values()) == n and g)  # fmt: skip
        assert {d: x["counts"]["delivered"] for d, x in groups.items()} == {
            f"d{j}.example": n // 3 for j in range(3)
        }
    # another tenant sees none of it, on either node
    for s in (a, b):
        other = dash(s, "evil")
        assert sum(other["series"]["delivered"]) == 0 and other["domains"] == []
        assert other["events"] == []
    # the operator's table of source IPs: the cluster's too
    st, w = b.req("GET", "/v1/dashboard/workers", tenant="acme")
    assert st == 200, w
    assert sum(r["delivered"] for r in w["source_ips"]) == n


def test_live_counts_round_trip_and_stay_bounded() -> None:
    """What a node publishes (_Unsent.fields) reads back as the same series and
    tables (an IPv6 source address, with its colons, kept whole); two nodes'
    fields add up; what no answer shows any more is forgotten while Redis is
    out of reach, so the unsent counts stay bounded."""
    from fastsend.serve.dashboard import SERIES_S, TABLE_MIN, _decode_live, _Unsent

    now = 1_800_000_000.0
    nodes = [_Unsent(), _Unsent()]
    for i, u in enumerate(nodes):
        for j in range(10):
            u.outcome(now - j, j % 3, (f"d{i}.example", "2001:db8::1" if i else "127.0.0.2"))
    hashes: dict[int, dict[bytes, bytes]] = {}
    for u in nodes:
        for m, fields in u.fields().items():
            h = hashes.setdefault(m, {})
            for f, n in fields.items():
                h[f.encode()] = str(int(h.get(f.encode(), b"0")) + n).encode()
    view = _decode_live(list(hashes.values()), [], now)
    assert [sum(view["series"][o]) for o in ("delivered", "deferred", "bounced")] == [8, 6, 6]
    assert {r["source_ip"]: sum(r[o] for o in ("delivered", "deferred", "bounced"))
            for r in view["source_ips"]} == {"2001:db8::1": 10, "127.0.0.2": 10}  # fmt: skip
    assert {r["domain"] for r in view["domains"]} == {"d0.example", "d1.example"}
    u = nodes[0]
    u.recent.extend({"event": "delivered"} for _ in range(500))
    u.prune(now + TABLE_MIN * 60 + SERIES_S)
    assert u.secs == {} and u.mins == {} and len(u.recent) == 40
    # an hour of outcomes never published (Redis out of reach all along): bounded
    for j in range(3600):
        u.outcome(now + j, 0, (f"x{j}.example", "127.0.0.2"))
    assert len(u.secs) <= SERIES_S + 60 and len(u.mins) <= TABLE_MIN + 1


@pytest.fixture(params=["sqlite", "redis"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "spool")
    server = request.getfixturevalue("redis_server")
    return str(server.url(node="n1", dir=str(tmp_path / "spool")))


@pytest.mark.parametrize("end", ["abandoned", "finished"])
def test_resume_settles_an_uploaded_lists_quota(spool_url: str, tmp_path: Path, end: str) -> None:
    """An API upload's job that serve left unfinished (killed, its node gone) and
    ``fastsend resume`` ended: the tenant's daily quota counts what it spooled.
    Before, ``--abandon-rest`` left the 2,000 rows it closed without spooling
    counted for the day (3,000 where 1,000 were spooled), and a list resume
    finished kept what its request over-counted."""
    from tests._engine_helpers import run_fastsend, summary

    from fastsend.accept import Acceptor, check_campaign
    from fastsend.events import EventLog
    from fastsend.message import Campaign
    from fastsend.serve.tenantcaps import QUOTA_KEY, QUOTA_N
    from fastsend.sink import SinkProcess
    from fastsend.spool import open_spool

    n, counted, key = 3000, 3005, "tq:acme:20261207"
    path = tmp_path / "list.csv"
    path.write_text("email,name\n" + "".join(f"u{i}@d{i % 5}.example,N{i}\n" for i in range(n)))
    spool = open_spool(spool_url)
    events = EventLog(str(tmp_path / "spool" / "events.jsonl"))
    acceptor = Acceptor(spool, events, None)
    cid = acceptor.create_campaign(check_campaign(Campaign.from_dict(
        {"from": "a@example.com", "subject": "Hi", "text": "Hi {{ name }}"})),
        name="up", tenant="acme")  # fmt: skip
    job = acceptor.start_ingest(cid, str(path), origin="api",
                                tags={QUOTA_KEY: key, QUOTA_N: str(counted)})  # fmt: skip
    spool.add_counters({key: counted})  # what the request counted for the list
    next(acceptor.ingest(job, chunk=1000))  # one chunk spooled, then serve "died"
    events.close()
    spool.close()
    if end == "abandoned":
        path.unlink()
    with SinkProcess() as sink:
        host, port = sink.addresses[0]
        res = run_fastsend(
            "resume", "--spool", spool_url, "--route", f"*={host}:{port}", "--workers", "1",
            "--json", "--no-progress", "--max-wait", "5",
            *(["--abandon-rest"] if end == "abandoned" else []), timeout=300,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    spooled = 1000 if end == "abandoned" else n
    assert summary(res)["delivered"] == spooled
    spool = open_spool(spool_url)
    try:
        assert int(spool.add_counters({key: 0})[key]) == spooled
    finally:
        spool.close()


def test_another_nodes_spooling_list_is_counted_once(redis_server: Any, tmp_path: Path) -> None:
    """A list node a spools in the background (25,000 rows, past SYNC_ROWS) names
    addresses a request on node b sends too: b counts them as that list's
    (Uploads.not_pending), as a's own requests do, and the campaign's cap counts
    the list's rows no more than its request counted (Uploads.left). Before, b
    counted them again (its tenant's daily quota over by as many until the list
    ended: a false 429 near it). Deterministic: the background spooling is a
    task of a's loop that never runs before the check."""
    import asyncio
    from array import array

    from fastsend import recipients
    from fastsend.accept import Acceptor, check_campaign
    from fastsend.events import EventLog
    from fastsend.message import Campaign
    from fastsend.serve.tenantcaps import QUOTA_KEY, QUOTA_N
    from fastsend.serve.uploads import SYNC_ROWS, Uploads
    from fastsend.spool import open_spool

    n = SYNC_ROWS + 5000
    addrs = [f"u{i}@d{i % 5}.example" for i in range(n)]
    url = redis_server.url()
    made: list[Any] = []

    def node(name: str) -> Uploads:
        spool = open_spool(url + f"&node={name}&dir={tmp_path / name}")
        events = EventLog(str(tmp_path / name / "events.jsonl"))
        made.append((spool, events))
        return Uploads(Acceptor(spool, events, None), str(tmp_path / name))

    async def main() -> None:
        a, b = node("a"), node("b")
        cid = a.acceptor.create_campaign(check_campaign(Campaign.from_dict(
            {"from": "x@example.com", "subject": "Hi", "text": "Hi"})), name="up",
            tenant="acme")  # fmt: skip
        path = tmp_path / "a" / "list.csv"
        path.write_text("email\n" + "".join(f"{x}\n" for x in addrs))
        fps = array("Q", [recipients.fingerprint(x) for x in addrs])
        table = recipients.FpSet()
        table.add_fps(fps.tolist())
        counted = n - 3000  # (as if the campaign had 3,000 of them: not counted)
        job = a.start(cid, str(path), tags={QUOTA_KEY: "tq:acme:20261207", QUOTA_N: str(counted)})
        mark = a.accept(job, fps=(table, counted), raw_fps=fps)  # first chunk; the rest a task
        assert job.id in a.tasks and mark.accepted < n
        late = [recipients.fingerprint(x) for x in addrs[-100:]]  # not spooled yet
        assert a.not_pending(cid, late) == []  # (the node spooling it knew)
        assert b.not_pending(cid, late) == []  # before: all 100, counted again
        other = [recipients.fingerprint(f"new{i}@d.example") for i in range(10)]
        assert b.not_pending(cid, other) == other
        got = b.spool.get_ingest(job.id)
        assert got is not None and b.left(got) == counted - got.accepted  # before: n - ...
        a.tasks[job.id].cancel()

    try:
        asyncio.run(main())
    finally:
        for spool, events in made:
            events.close()
            spool.close()


def test_redis_out_of_reach_answers_with_the_nodes_own_counts() -> None:
    """Redis not answering: a poll answers from this node's own rings (said:
    ``live_scope`` node), its counts wait to be published, and publishing
    them failing does not stop the node's status (SharedState.tick)."""
    import asyncio
    from types import SimpleNamespace

    from fastsend.serve.dashboard import Dashboard
    from fastsend.serve.shared_state import SharedState

    class Down(ConnectionError):
        pass

    def down(*_a: Any) -> Any:
        raise Down("Redis out of reach")

    shared = SimpleNamespace(status_source=None, live_source=None, live_read=down, live_add=down)
    ctx = SimpleNamespace(shared=shared, campaign_tenant=lambda cid: "acme")
    d = Dashboard(ctx)
    t = time.time()
    d.listener([{"event": "delivered", "campaign": 1, "rcpt": "a@d.example", "time": t,
                 "source_ip": "127.0.0.2"}])  # fmt: skip
    assert asyncio.run(d._cluster_live("acme", t)) is None  # (the poll's fallback)
    with pytest.raises(Down):  # (kept for the next tick)
        d.publish_live()
    assert "acme" in d._unsent
    # the node's status is published all the same
    published: list[Any] = []
    st = SharedState.__new__(SharedState)
    st.lease, st._renewed, st._published, st._started = 30.0, time.monotonic(), 0.0, t
    st.status_source, st.live_source, st._live_failed = (lambda: {}), d.publish_live, False
    st.cluster = SimpleNamespace(publish=published.append)
    st.tick()
    assert published and st._live_failed


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_queue_gauges_are_read_off_the_event_loop(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """serve's tick samples the queue gauges (/v1/stats gauges, the charts) every
    GAUGE_EVERY s: the read (every campaign's counts, every pending row's age) is
    made in a thread through Spool.reader, the gauges given on the loop. Before,
    it ran on the loop: 1.3 s of serve's loop (dispatch, every request) every 15 s
    at 100,000 pending on Redis, on every node."""
    import asyncio
    import contextlib
    import threading
    from collections.abc import Iterator as It
    from types import SimpleNamespace

    from fastsend.message import Campaign
    from fastsend.serve.charts import Charts
    from fastsend.spool import open_spool

    url = (str(tmp_path / "spool") if backend == "sqlite"
           else request.getfixturevalue("redis_server").url(node="g", dir=str(tmp_path)))  # fmt: skip
    spool = open_spool(url)
    spec = Campaign.from_dict({"from": "a@example.com", "subject": "s", "text": "t"}).to_dict()
    for tenant, n in (("acme", 30), ("evil", 5)):
        cid = spool.create_campaign(spec, name="c", tenant=tenant)
        spool.add_messages(cid, [(f"u{i}@d.example", "d.example", b"{}") for i in range(n)],
                           time.time())  # fmt: skip
    threads: set[int] = set()

    class Recorded:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            if name in ("list_campaigns", "counts", "queue_shape"):
                threads.add(threading.get_ident())
            return getattr(self.inner, name)

    class Outer(Recorded):
        @contextlib.contextmanager
        def reader(self) -> It[Any]:
            with self.inner.reader() as view:
                yield Recorded(view)

    gauges: dict[tuple[str, str], float] = {}
    rollups = SimpleNamespace(maybe_flush=lambda: None,
                              gauge=lambda t, g, v, _now: gauges.__setitem__((t, g), v))  # fmt: skip
    charts = Charts(SimpleNamespace(spool=Outer(spool), rollups=rollups))

    async def main() -> None:
        charts.tick()
        sampling = getattr(charts, "sampling", None)  # (before: done in tick, on the loop)
        if sampling is not None:
            await sampling

    try:
        asyncio.run(main())
    finally:
        spool.close()
    assert gauges[("acme", "queue_depth")] == 30 and gauges[("evil", "queue_depth")] == 5
    assert gauges[("*", "queue_depth")] == 35
    assert threads and threading.get_ident() not in threads


def test_ip_page_answers_for_another_nodes_ip(redis_server: Any, tmp_path: Path) -> None:
    """The IP page's poll (GET /v1/dashboard/ip/IP) lands on any node behind a
    balancer: a node answers for another live node's source IP from what that
    node published (its pool, warm-up, rests, blocklist checks), saying which
    node holds it. Before: 404 "not one of this node's source IPs" from every
    node but the IP's own."""
    url = redis_server.url()
    extra = '[dashboard]\nadmin_tenants = ["acme"]\n'
    made: list[Served] = []
    try:
        for n, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            (tmp_path / n).mkdir()
            made.append(Served(tmp_path / n, "127.0.0.1:9", extra=f'[ips]\nsource = ["{ip}"]\n'
                               + extra, spool_url=url + f"&node={n}&dir={tmp_path}/{n}/spool",
                               serve_args=("--no-workers", *VOLATILE)))  # fmt: skip
        a, b = made

        def page(s: Served, ip: str) -> tuple[int, Any]:
            return s.req("GET", f"/v1/dashboard/ip/{ip}", tenant="acme")

        st, own = page(a, "127.0.0.2")
        assert st == 200 and own["pool"] == "default", own
        got = until("node b answering for node a's IP",
                    lambda: (r := page(b, "127.0.0.2"))[0] == 200 and r[1])  # fmt: skip
        assert (got["pool"], got["warmup"], got["node"]) == ("default", own["warmup"], "a")
        assert got["rests"] == own["rests"] and got["blocklists"] == own["blocklists"]
        back = until("node a answering for node b's IP",
                     lambda: (r := page(a, "127.0.0.3"))[0] == 200 and r[1])  # fmt: skip
        assert back["node"] == "b", back
        for s in (a, b):  # an address no node holds
            assert page(s, "127.0.0.9")[0] == 404
        assert b.req("GET", "/v1/dashboard/ip/127.0.0.2", tenant="evil")[0] == 403
    finally:
        for s in reversed(made):
            s.stop()
