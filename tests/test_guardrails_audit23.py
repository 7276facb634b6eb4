"""Guardrails and feedback loops over several nodes (session 23's audit).

Real parts: one redis-server, two ``fastsend serve`` nodes on it, each with
one worker sending from its own source address, both delivering to one
SinkThread whose answers are counted: what reached the receiver is the
figure, not what a node believes it sent. Tests wait for conditions with
deadlines, never for fixed times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests._engine_helpers import run_fastsend, summary, write_campaign, write_recipients
from tests._serve_helpers import Served, until

from conftest import free_port
from fastsend.sink import SinkThread
from fastsend.testing.dnsserver import DNSServer

VOLATILE = ("--allow-volatile",)  # the test's redis-server keeps no AOF
TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
IPS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture
def two_nodes(redis_server: Any, tmp_path: Path) -> Iterator[tuple[list[Served], SinkThread]]:
    """Nodes a and b (one worker each, from 127.0.0.2 / .3, small windows so
    both claim a share of one list) on one Redis spool, to one sink that
    answers each command 5 ms late (a receiver across a network)."""
    url = redis_server.url()
    guard = "[guardrails]\nmin_sample = 100\nbounce_rate = 0.05\n"
    with SinkThread(latency_ms=5.0) as sink:
        made: list[Served] = []
        try:
            for n, ip in zip("ab", IPS, strict=True):
                (tmp_path / n).mkdir()
                made.append(Served(tmp_path / n, f"{sink.host}:{sink.port}",
                                   extra=f'[ips]\nsource = ["{ip}"]\n{guard}',
                                   delivery="window = 400",
                                   spool_url=url + f"&node={n}&dir={tmp_path}/{n}/spool",
                                   serve_args=VOLATILE))  # fmt: skip
            yield made, sink
        finally:
            for s in reversed(made):
                s.stop()


def test_the_guardrails_sample_is_the_clusters(
    two_nodes: tuple[list[Served], SinkThread],
) -> None:
    """A list a fifth of which bounces (550 5.1.1), sent by two nodes with
    ``min_sample = 100``: the campaign pauses on both after about one sample
    reached the receiver. Before, each node let its own min_sample out
    unanswered (the sample cap was per node): two nodes sent up to 2 x
    min_sample of a bad list before any pause, N nodes N x min_sample."""
    (a, b), sink = two_nodes
    rows = [{"email": f"{'permfail-' if i % 5 == 0 else ''}r{i}@x{i % 7}.example",
             "name": "n"} for i in range(3000)]  # fmt: skip
    st, got = a.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
    assert st == 201, got
    cid = got["id"]

    def settled() -> dict[str, Any] | None:
        st, v = b.req("GET", f"/v1/campaigns/{cid}")
        assert st == 200, v
        return v if v["status"] == "paused" and v["counts"]["inflight"] == 0 else None

    view = until("the campaign paused with nothing in flight", settled)
    assert view["reason"].startswith("guardrail: bounce rate"), view
    stats = sink.stats
    reached = stats.messages + stats.faults.get("permfail", 0)
    counts = view["counts"]
    assert reached == counts["delivered"] + counts["bounced"], (reached, counts)
    # both nodes sent (each from its own address) ...
    assert set(stats.peers) == set(IPS), stats.peers
    # ... and about one sample reached the receiver, not one per node (each
    # node's part of what the sample lacks, over the totals it last read: at
    # most min_sample and one node's part more; before: 196-233)
    assert 100 <= reached <= 160, (reached, stats.peers)
    # paused on every node: nothing more goes out from either
    for s in (a, b):
        st, v = s.req("GET", f"/v1/campaigns/{cid}")
        assert st == 200 and v["status"] == "paused", v


@pytest.mark.parametrize("how", ["max_connections", "throttle"])
def test_one_connection_per_address_is_one_at_the_receiver(
    tmp_path: Path, dns_server: DNSServer, how: str
) -> None:
    """Two workers sending from one address (one [ips] source) to a site that
    allows it one connection: by the site's max_connections, or by a rule's
    throttle (a provider's "too many connections" reply: 1 connection for an
    hour). The receiver counts connections per client (421 over one) and
    answers each command 5 ms late. Each worker's part of a limit below the
    workers sharing the address was one connection (at least one each), so
    two were open at once and the receiver refused the second (mail deferred,
    retried, refused again); now each connection holds one of the address's
    places on the node: all 300 delivered, never two sessions at once (before: 21-22 refused;
    now none, or one or two at a close racing the next connect, or while the
    throttle is on its way to the other worker)."""
    port = free_port()
    # twenty domains hosted on one MX host, windows of 20: both workers carry its mail
    zones: dict[str, Any] = {f"d{i}.test": [("MX", "10 mx.one.test.")] for i in range(20)}
    dns_server.set_zones({**zones, "mx.one.test": [("A", "127.0.0.1")]})
    camp = write_campaign(tmp_path)
    n = 300
    rcpts = write_recipients(tmp_path, [f"u{i}@d{i % 20}.test" for i in range(n)])
    cfg = tmp_path / "fastsend.toml"
    if how == "max_connections":
        shaping = "[shaping.default]\nmax_connections = 1\n"
    else:  # the first refusal (the greeting of a second connection) throttles
        shaping = ('[[shaping.rule]]\nname = "conns"\nmatch = "(?i)too many connections"\n'
                   'action = "throttle"\nmax_connections = 1\nduration = 3600\n')  # fmt: skip
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 2\n'
        "[delivery]\nallow_private_mx = true\nwindow = 20\n"
        "[retry]\nmin_backoff = 0.2\nmax_backoff = 0.5\n" + shaping
    )
    with SinkThread(listen=[("127.0.0.1", port)], max_connections=1, latency_ms=5.0,
                    keep_messages=False) as sink:  # fmt: skip
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg), "--max-wait", "60",
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
        )  # fmt: skip
        stats = sink.stats
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == n
    assert stats.messages == n and stats.peers == {"127.0.0.2": n}
    refused = stats.faults.get("max-connections", 0)
    # (a throttle's first refusal makes it; the other worker is told at once,
    # through the supervisor: under load a few more may meet the receiver first)
    assert refused <= (2 if how == "max_connections" else 8), stats.faults


def test_a_nodes_rates_are_judged_on_every_kinds_totals(make_spool: Callable[[], Any]) -> None:
    """Two nodes on one spool (two Guardrails, each its own spool handle): node
    b delivers 9,900 of a campaign while node a, which first saw it at 100
    delivered, meets 10 bounces (its address blocked at one site) and then
    an ARF complaint. Before, a flush read back only the totals of the kinds
    it had counted: node a judged 10 bounces against the 100 deliveries it
    once read (9.1% over the 5% guardrail: paused a campaign whose bounce
    rate was 0.1%), and 3 complaints against them too (3.0%, over 0.3%). Now
    every kind's total comes back with each flush."""
    from fastsend.shaping.guardrails import Guardrails, GuardrailSettings
    from fastsend.spool import BOUNCED, DELIVERED, Claimed

    spools = [make_spool(), make_spool()]
    cid = spools[0].create_campaign({"from": "a@sender.example.com"}, tenant="acme")
    c = Claimed(1, cid, "x@example.com", "example.com", b"{}", 0, 0.0)
    events: list[dict[str, Any]] = []
    s = GuardrailSettings(bounce_rate=0.05, complaint_rate=0.003, min_sample=100)
    a, b = (Guardrails(sp, s, events.append) for sp in spools)
    for _ in range(100):
        b.on_result(c, None, DELIVERED)
    b.flush()
    assert not a.sampling(cid)  # node a reads the sample: 100 delivered, judged
    for _ in range(9_900):
        b.on_result(c, None, DELIVERED)
    b.flush()
    for _ in range(10):
        a.on_result(c, None, BOUNCED)
    a.flush()
    a.record_complaint(cid, 3)
    a.flush()
    assert events == [], events
    assert spools[1].get_campaign(cid).status == "active"
    assert a.counts[cid] == [10_000, 10, 3]
    for sp in spools:
        sp.close()
