"""Deliverability audit, session 22: MX sets, shared rates and warm-up counts
seen from outside, as a PowerMTA/KumoMTA operator would check them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import (
    run_fastsend,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)

from _smtp_helpers import aiosmtpd_server
from conftest import free_port
from fastsend.testing.dnsserver import DNSServer


def test_domains_with_one_mx_set_in_swapped_preferences_each_go_to_their_preferred_host(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """a.test prefers mxa (mxb its backup), b.test prefers mxb (mxa its backup),
    both hosts up: each domain's mail goes to its own preferred host (RFC 5321
    5.1: the lowest preference first). Before, both domains shared one site
    queue keyed by the sorted MX names, and the first domain's order won: every
    b.test message went to its backup, mxa."""
    port = free_port()
    dns_server.set_zones(
        {
            "a.test": [("MX", "10 mxa.hosting.test."), ("MX", "20 mxb.hosting.test.")],
            "b.test": [("MX", "10 mxb.hosting.test."), ("MX", "20 mxa.hosting.test.")],
            "mxa.hosting.test": [("A", "127.0.0.21")],
            "mxb.hosting.test": [("A", "127.0.0.22")],
        }
    )
    camp = write_campaign(tmp_path)
    # a.test first: its batch makes the site queue
    rcpts = write_recipients(
        tmp_path, [f"u{i}@a.test" for i in range(4)] + [f"v{i}@b.test" for i in range(4)]
    )
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 1\n'
        "[delivery]\nallow_private_mx = true\n"
    )
    with (
        aiosmtpd_server(port, host="127.0.0.21") as (_c1, at_a),
        aiosmtpd_server(port, host="127.0.0.22") as (_c2, at_b),
    ):
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == 8
    to_a = sorted(r for m in at_a.messages for r in m["rcpts"])
    to_b = sorted(r for m in at_b.messages for r in m["rcpts"])
    assert to_a == [f"u{i}@a.test" for i in range(4)], (to_a, to_b)
    assert to_b == [f"v{i}@b.test" for i in range(4)], (to_a, to_b)
    events = [
        orjson.loads(x) for x in (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()
    ]
    mx = {e["rcpt"]: e.get("mx", "") for e in events if e["event"] == "delivered"}
    assert all(v.startswith("mxb.hosting.test") for k, v in mx.items() if k.endswith("@b.test"))


def test_a_shared_rate_counts_the_workers_drawing_on_it(tmp_path: Path) -> None:
    """transports.slots.SharedGcra.share: two workers taking from a relay's
    10/s bucket each get about half: each may plan on 5/s; once the other
    stops drawing (its record ages out, as a worker that exited), the one
    left has the whole rate again."""
    from fastsend.transports.slots import SharedGcra

    path = str(tmp_path / "transport-rates" / "relay1")
    w0, w1 = SharedGcra(path, 10.0, 10), SharedGcra(path, 10.0, 10)
    assert w0.share(1000.0) == 10.0  # alone
    t = 1000.0
    while t < 1003.0:
        for b in (w0, w1):
            if b.acquire(t) > 0.0:
                b.peek(t)
        t += 0.05
    assert w0.share(t) == w1.share(t) == 5.0
    assert w0.share(t + 30.0) == 10.0
    w0.close()
    w1.close()


def test_a_worker_plans_its_ready_queue_on_its_part_of_a_shared_rate(tmp_path: Path) -> None:
    """A relay's ``rate`` (10/s) is one bucket for the node's workers; this
    worker sends from two addresses and another worker draws on the bucket
    too. Its ready queue keeps what it may send within the horizon (10 s):
    its part, 5/s, plus the bucket's tokens, about 60 envelopes; the rest
    goes back to the supervisor. Before, every (worker, address) lane planned
    on the whole rate: 2 lanes x (10 + 100) kept 220, four times its part,
    the mail waiting in the worker's window while the others' grew."""
    import time

    from fastsend.config import loader
    from fastsend.delivery import pool
    from fastsend.delivery.mx import Host, Site
    from fastsend.outcome import Envelope
    from fastsend.transports.slots import SharedGcra

    cfg = loader.from_dict({"delivery": {"ready_horizon": 10}}, base_dir=str(tmp_path), files=False)
    path = str(tmp_path / "transport-rates" / "relay1")
    mine, other = SharedGcra(path, 10.0, 10), SharedGcra(path, 10.0, 10)
    back: list[Envelope] = []
    site = Site("route:relay.test:2525", (Host("relay.test", "127.0.0.1", 2525),))
    q = pool.SiteQueue(
        site, ["127.0.0.2", "127.0.0.3"], cfg, lambda *_a: None, "localhost",
        handback=lambda envs, *_a: back.extend(envs),
    )  # fmt: skip
    q.shaper.share_rate(q.lanes_key, mine)
    assert other.acquire(time.monotonic()) == 0.0  # the other worker draws on it
    q.pending.extend(Envelope("s@example.org", [f"r{i}@x.example"], b"x", tag=i) for i in range(1000))
    q.trim()
    kept = len(q.pending)
    assert 50 <= kept <= 60 and kept + len(back) == 1000, kept
    mine.close()
    other.close()


def test_warmup_counts_of_an_address_two_workers_share_add_up(tmp_path: Path) -> None:
    """One warming address (day 1: 6 messages a provider), two workers sending
    from it (each may send its half, 3). The day's count the spool keeps is
    what both sent: a restart the same day with one worker, which may send
    the whole cap, sends no more than what is left. Before, each worker
    reported its count under the address's one key and the supervisor kept
    the highest (3 for 3 + 3 sent): the one worker sent 3 more, 9 on a day
    capped at 6."""
    import datetime as dt

    from fastsend.sink import SinkProcess

    today = dt.datetime.now(dt.UTC).date().isoformat()
    camp = write_campaign(tmp_path)
    pools = (
        '[pools]\ndefault = "main"\n[pools.warmup]\nschedule = [6]\n'
        f'[pools.main]\nips = [{{ ip = "127.0.0.2", warmup_start = "{today}" }}]\n'
    )
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    delivered: list[int] = []
    with SinkProcess("--log", str(log)) as sink:
        for run, workers in enumerate((2, 1)):
            cfg = tmp_path / f"fastsend{run}.toml"
            cfg.write_text(f"[workers]\ncount = {workers}\n" + pools)
            rcpts = write_recipients(
                tmp_path, [f"r{run}u{i}@d{i % 5}.example" for i in range(10)], f"r{run}.csv"
            )
            proc = run_fastsend(
                "send", str(camp), "-r", str(rcpts), "-c", str(cfg), "--spool", str(spool),
                "--route", f"*={sink.host}:{sink.port}", "--json", "--no-progress",
                "--no-dkim", "--max-wait", "1",
            )  # fmt: skip
            assert proc.returncode in (0, 75), proc.stderr[-3000:]
            delivered.append(summary(proc)["delivered"])
    assert sum(delivered) == 6, delivered  # (the day's cap, whatever the first run left)
    assert len(sink_log(log)) == 6


def test_ipv6_source_addresses_reach_dual_stack_and_ipv6_only_mx_hosts(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """A pool sending over IPv6 (``::1``) to a domain whose MX host has both A
    and AAAA records (Gmail's, Outlook's: most) and to one with AAAA only;
    then a pool of both families over two workers, with IPv4-only, IPv6-only
    and dual-stack MX hosts. Every message is delivered, each connection
    from a source address of the host's family. Before, the MX host's A
    record was enough and AAAA was never asked: from ``::1`` every
    connection failed "Address family for hostname not supported" and the
    dual-stack domain's mail expired."""
    port = free_port()
    dns_server.set_zones(
        {
            "dual.test": [("MX", "10 mx.dual.test.")],
            "mx.dual.test": [("A", "127.0.0.1"), ("AAAA", "::1")],
            "six.test": [("MX", "10 mx.six.test.")],
            "mx.six.test": [("AAAA", "::1")],
            "four.test": [("MX", "10 mx.four.test.")],
            "mx.four.test": [("A", "127.0.0.1")],
        }
    )
    camp = write_campaign(tmp_path)
    runs = [(["::1"], 1, ("dual", "six")), (["127.0.0.2", "::1"], 2, ("dual", "six", "four"))]
    for n, (sources, workers, domains) in enumerate(runs):
        addrs = [f"r{n}u{i}@{d}.test" for i in range(3) for d in domains]
        rcpts = write_recipients(tmp_path, addrs, f"r{n}.csv")
        cfg = tmp_path / f"fastsend{n}.toml"
        cfg.write_text(
            f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
            f"[ips]\nsource = {orjson.dumps(sources).decode()}\nhelo = \"mta.sender.example.com\"\n"
            f"[workers]\ncount = {workers}\n[delivery]\nallow_private_mx = true\n"
            "[retry]\nmax_age = 60\nmin_backoff = 1\n"  # (a ceiling: a loaded host's
            # workers start slowly, and mail handed back to the other worker went on
            # past 3 s: expired)
        )
        with (
            aiosmtpd_server(port, host="127.0.0.1") as (_c4, at4),
            aiosmtpd_server(port, host="::1") as (_c6, at6),
        ):
            proc = run_fastsend(
                "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
                "--spool", str(tmp_path / f"spool{n}"), "--json", "--no-dkim", "--no-progress",
                "--max-wait", "5",
            )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = summary(proc)
        assert s["delivered"] == len(addrs), (s, proc.stderr[-2000:])
        got = sorted(r for h in (at4, at6) for m in h.messages for r in m["rcpts"])
        assert got == sorted(addrs)
        assert not any(a.endswith("@six.test") for m in at4.messages for a in m["rcpts"])
        assert {m["peer"][0] for m in at6.messages} <= {"::1"}
        assert {m["peer"][0] for m in at4.messages} <= {"127.0.0.2"}


def test_a_domains_own_shaping_holds_when_another_domain_shares_its_mx_host(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """fast.test and slow.test are hosted on one MX host; the operator gives
    slow.test its own limits (``[shaping.domain."slow.test"]``: one message a
    connection). fast.test's mail comes first. Each slow.test message goes
    in a session of its own, fast.test's share sessions. Before, both domains
    had one site queue keyed by the MX set, made with the first domain's
    limits: slow.test's entry was ignored (or, slow.test first, imposed on
    fast.test)."""
    port = free_port()
    dns_server.set_zones(
        {
            "fast.test": [("MX", "10 mx.hosting.test.")],
            "slow.test": [("MX", "10 mx.hosting.test.")],
            "mx.hosting.test": [("A", "127.0.0.1")],
        }
    )
    camp = write_campaign(tmp_path)
    addrs = [f"f{i}@fast.test" for i in range(6)] + [f"s{i}@slow.test" for i in range(6)]
    rcpts = write_recipients(tmp_path, addrs)
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 1\n'
        "[delivery]\nallow_private_mx = true\nmax_connections = 1\n"
        '[shaping.domain."slow.test"]\nmax_messages_per_connection = 1\n'
    )
    with aiosmtpd_server(port) as (_c, handler):
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == len(addrs)
    sessions: dict[Any, list[str]] = {}
    for m in handler.messages:
        sessions.setdefault(m["peer"], []).extend(m["rcpts"])
    slow = [rs for rs in sessions.values() if any(r.endswith("@slow.test") for r in rs)]
    assert all(len(rs) == 1 for rs in slow), sessions
    assert len(slow) == 6


def test_a_pools_weights_share_a_busy_sites_mail_within_a_worker(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """A pool of two addresses weighted 3:1, both of one worker, sending 400
    messages to one busy site (each message answered after 10 ms; three
    connections an address): the heavier address sends about three times
    as many (each address's part of the site's connections: its weight over the
    heaviest's). Before, each address opened as many connections as its lane
    allowed and they took the site's mail in turn: 200 and 200."""
    import asyncio

    from _smtp_helpers import RecordingHandler

    class Slow(RecordingHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            await asyncio.sleep(0.01)
            return await super().handle_DATA(server, session, envelope)

    port = free_port()
    dns_server.set_zones(
        {"busy.test": [("MX", "10 mx.busy.test.")], "mx.busy.test": [("A", "127.0.0.1")]}
    )
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"u{i}@busy.test" for i in range(400)])
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[workers]\ncount = 1\n[ips]\nhelo = "mta.sender.example.com"\n'
        "[delivery]\nallow_private_mx = true\nmax_connections = 3\n"
        '[pools]\ndefault = "main"\n[pools.main]\n'
        'ips = [{ ip = "127.0.0.2", weight = 3 }, { ip = "127.0.0.3", weight = 1 }]\n'
    )
    handler = Slow()
    from aiosmtpd.controller import Controller

    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
            "--max-wait", "3",
        )  # fmt: skip
    finally:
        ctl.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == 400
    by_ip: dict[str, int] = {}
    for m in handler.messages:
        by_ip[m["peer"][0]] = by_ip.get(m["peer"][0], 0) + len(m["rcpts"])
    # (three connections to one: about 3:1 once all are open; 5:1 seen, the
    # lighter address's one connection opening last)
    assert 2.0 <= by_ip["127.0.0.2"] / by_ip["127.0.0.3"] <= 8.0, by_ip


def test_a_lighter_address_takes_every_connection_while_the_heavier_rests(
    tmp_path: Path,
) -> None:
    """Weights 3:1 and three connections an address: the lighter address may
    open one connection to a site while the heavier sends, all three while
    the heavier rests there (its weight is the heaviest left)."""
    import time

    from fastsend.config import loader
    from fastsend.delivery import pool
    from fastsend.delivery.mx import Host, Site

    cfg = loader.from_dict(
        {
            "delivery": {"max_connections": 3},
            "pools": {
                "default": "main",
                "main": {"ips": [{"ip": "127.0.0.2", "weight": 3}, {"ip": "127.0.0.3"}]},
            },
        },
        base_dir=str(tmp_path),
        files=False,
    )
    site = Site("mx:mx.busy.test", (Host("mx.busy.test", "192.0.2.1", 25),))

    def opened(rest_heavy: bool) -> dict[str, int]:
        q = pool.SiteQueue(site, ["127.0.0.2", "127.0.0.3"], cfg, lambda *_a: None, "localhost")
        if rest_heavy:
            q.lane("127.0.0.2").block(time.monotonic(), 3600.0, "rest", "test")
        while (ln := q._next_lane()) is not None:
            ln.active += 1  # (as _scale counts a connection it starts)
        return {ip: q.lane(ip).active for ip in ("127.0.0.2", "127.0.0.3")}

    assert opened(False) == {"127.0.0.2": 3, "127.0.0.3": 1}
    assert opened(True) == {"127.0.0.2": 0, "127.0.0.3": 3}


def test_a_rules_throttle_is_the_addresses_when_workers_share_it() -> None:
    """Two workers sending from one address (one [ips] source, two workers):
    Gmail's "unusual rate" twice throttles the address to 10 messages a
    minute (shaping.toml's gmail-unusual-rate). Each worker's lane that
    meets it takes its part: 5 + 5 a minute from the address. Before, each
    took the whole 10: 20 a minute from an address Gmail had asked to slow
    down."""
    import time

    from fastsend.config import loader
    from fastsend.outcome import DEFERRED, Outcome
    from fastsend.shaping.lanes import Shaper

    cfg = loader.from_dict({"workers": {"count": 2}, "ips": {"source": ["127.0.0.2"]}})
    hosts = ("gmail-smtp-in.l.google.com",)
    text = (
        "[127.0.0.2      15] Our system has detected an unusual rate of\n"
        "unsolicited mail originating from your IP address. - gsmtp"
    )
    rates = []
    for index in range(2):
        sh = Shaper(cfg, cfg.ips_for_worker(index), index=index)
        key = sh.lane_key("mx:gmail-smtp-in.l.google.com", hosts, "gmail.com")
        lim = sh.site_limits(key, hosts, "")
        ln = sh.lane("127.0.0.2", key, lim, sh.pool(""), time.time())
        now = time.monotonic()
        for _ in range(2):
            ln.reply(Outcome(DEFERRED, 421, "4.7.28", text, "rcpt"), now)
        assert ln.throttle_bucket is not None
        rates.append(ln.throttle_bucket.rate * 60)
    assert sum(rates) == pytest.approx(10.0), rates


def test_a_rules_throttle_reaches_every_worker_sending_from_the_address(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """Two workers sending from one address; the site answers one RCPT with a
    reply an operator's rule throttles on (one match: 6,000 a minute for 10
    minutes). The worker that met it throttles the address, and the other
    worker is told at once (an ``ordered`` throttle event for the address
    and site): before, it sent on at full speed until it met the reply
    itself; every message is still delivered."""
    from _smtp_helpers import RecordingHandler

    class Once(RecordingHandler):
        said = False

        async def handle_RCPT(
            self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
        ) -> str:
            if not Once.said:
                Once.said = True
                return "451 4.7.1 please slow down now"
            return await super().handle_RCPT(server, session, envelope, address, options)

    port = free_port()
    # twenty domains hosted on one MX host: batches for both workers
    zones: dict[str, Any] = {f"d{i}.test": [("MX", "10 mx.busy.test.")] for i in range(20)}
    dns_server.set_zones({**zones, "mx.busy.test": [("A", "127.0.0.1")]})
    camp = write_campaign(tmp_path)
    # (and one the site defers to the end: the run returns when its next attempt
    # is over 3 s away, seconds after the telling; windows of 20: both workers
    # carry the site's mail. Not by max_age: under load the throttled message's
    # retry came after the 4 s that ended later0's, and it expired too)
    addrs = [f"u{i}@d{i % 20}.test" for i in range(200)] + ["later0@d1.test"]
    rcpts = write_recipients(tmp_path, addrs)
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[workers]\ncount = 2\n[ips]\nsource = ["127.0.0.2"]\nhelo = "mta.sender.example.com"\n'
        "[delivery]\nallow_private_mx = true\nwindow = 20\n[retry]\nmin_backoff = 1\nmax_age = 300\n"
        '[[shaping.rule]]\nname = "slow-now"\nmatch = "please slow down now"\n'
        'action = "throttle"\nmessages_per_minute = 6000\nduration = 600.0\n'
    )
    from aiosmtpd.controller import Controller

    handler = Once()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
            "--max-wait", "3",
        )  # fmt: skip
    finally:
        ctl.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == 200
    shaping = [
        orjson.loads(x) for x in (tmp_path / "spool" / "shaping.jsonl").read_bytes().splitlines()
    ]
    throttles = [e for e in shaping if e["action"] == "throttle"]
    assert [bool(e.get("ordered")) for e in throttles] == [False, True], throttles
    assert {(e["source_ip"], e["site"], e["rule"]) for e in throttles} == {
        ("127.0.0.2", "mx:mx.busy.test", "slow-now")
    }
