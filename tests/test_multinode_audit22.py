"""Multi-node serve as a tenant and the operator see it (session 22's audit).

Real parts: one redis-server, two ``fastsend serve`` nodes on it (node ``a``
delivers with one worker to a SinkThread, node ``b`` takes API calls only,
``--no-workers``), as a balancer would put them: whichever node answers a
poll must answer for the cluster. Tests wait for conditions with deadlines,
never for fixed times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests._serve_helpers import Served

from fastsend.sink import SinkThread

VOLATILE = ("--allow-volatile",)  # the test's redis-server keeps no AOF
TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


def until(what: str, ok: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = ok()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


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
        return v if sum(v["series"]["delivered"]) == n else None

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
