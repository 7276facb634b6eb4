"""IP pools: smooth weighted round-robin, warm-up caps moving share to warm IPs, resting."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from pathlib import Path

from fastsend import config as cfgmod
from fastsend.outcome import DEFERRED, Outcome, TxnResult
from fastsend.shaping.lanes import Shaper
from fastsend.shaping.pools import UNCAPPED, Pool, PoolIP, WarmupSchedule, load_pools, utc_day

NOW = 1_750_000_000.0  # a fixed unix time: the tests drive the day
DAY = 86400.0


def test_weighted_round_robin_is_smooth_and_proportional() -> None:
    p = Pool("p", [PoolIP("127.0.0.2", 5), PoolIP("127.0.0.3", 1), PoolIP("127.0.0.4", 1)])
    seq = [p.pick("google", NOW).ip for _ in range(7)]  # type: ignore[union-attr]
    assert Counter(seq) == {"127.0.0.2": 5, "127.0.0.3": 1, "127.0.0.4": 1}
    assert seq[0] == "127.0.0.2" and seq[1] == "127.0.0.2" and seq[2] != "127.0.0.2"  # interleaved
    picks = Counter(p.pick("google", NOW).ip for _ in range(7000))  # type: ignore[union-attr]
    assert picks == {"127.0.0.2": 5000, "127.0.0.3": 1000, "127.0.0.4": 1000}


def test_ineligible_ip_share_moves_to_the_others_by_weight() -> None:
    p = Pool("p", [PoolIP("a", 2), PoolIP("b", 1), PoolIP("c", 1)])
    picks = Counter(p.pick("", NOW, lambda ip: ip != "a").ip for _ in range(1000))  # type: ignore[union-attr]
    assert picks == {"b": 500, "c": 500}
    assert p.pick("", NOW, lambda ip: False) is None


def test_warmup_schedule() -> None:
    s = WarmupSchedule((50, 100, 500))
    assert [s.cap(d) for d in (1, 2, 3, 4)] == [50, 100, 500, UNCAPPED]
    ip = PoolIP("x", warmup_start_day=utc_day(NOW))
    assert ip.warmup_day(NOW) == 1 and ip.warmup_day(NOW + 2 * DAY) == 3
    assert PoolIP("y").warmup_day(NOW) == 0


def send(p: Pool, provider: str, n: int, now: float) -> Counter[str]:
    """n messages, each from the picked IP, counted against its warm-up cap."""
    c: Counter[str] = Counter()
    for _ in range(n):
        ip = p.pick(provider, now)
        assert ip is not None
        if ip.warmup_start_day is not None:
            p.warmup(ip, provider, now).sent += 1
        c[ip.ip] += 1
    return c


def test_warmup_caps_move_share_to_warm_ips_and_grow_daily() -> None:
    start = utc_day(NOW)
    p = Pool(
        "p",
        [PoolIP("warm", 1), PoolIP("new", 1, warmup_start_day=start)],
        WarmupSchedule((50, 200)),
    )
    day1 = send(p, "google", 1000, NOW)
    assert day1 == {"new": 50, "warm": 950}  # the new IP stops at its cap ...
    day1y = send(p, "yahoo", 100, NOW)
    assert day1y == {"new": 50, "warm": 50}  # ... per provider
    day2 = send(p, "google", 1000, NOW + DAY)
    assert day2 == {"new": 200, "warm": 800}  # the cap grows with the schedule
    day3 = send(p, "google", 1000, NOW + 2 * DAY)
    assert day3 == {"new": 500, "warm": 500}  # warm: equal weights, equal share


def test_lanes_of_a_warming_ip_stop_at_the_cap() -> None:
    start = (dt.date(1970, 1, 1) + dt.timedelta(days=utc_day(NOW))).isoformat()
    cfg = cfgmod.from_dict(
        {
            "pools": {
                "warmup": {"schedule": [30]},
                "main": {"ips": ["127.0.0.2", {"ip": "127.0.0.3", "warmup_start": start}]},
            }
        }
    )
    sh = Shaper(cfg, ["127.0.0.2", "127.0.0.3"], now=NOW)
    pool = sh.pool("")
    lim = sh.site_limits("s", ("gmail-smtp-in.l.google.com",), "gmail.com")
    ln = sh.lane("127.0.0.3", "s", lim, pool, NOW)
    assert ln.take(0.0, 20) == (20, 0.0)
    assert ln.take(0.0, 20) == (10, 0.0)
    assert not ln.usable(0.0) and ln.take(0.0, 1)[0] == 0
    # Reported to (and restored by) the supervisor through the ring.
    counts = sh.warm_counts()
    assert counts == {f"{utc_day(NOW)}|127.0.0.3|google": 30}
    sh2 = Shaper(cfg, ["127.0.0.2", "127.0.0.3"], now=NOW)
    sh2.restore(counts)
    ln2 = sh2.lane("127.0.0.3", "s", lim, sh2.pool(""), NOW)
    assert not ln2.usable(0.0)
    # The warm IP has no cap.
    assert sh.lane("127.0.0.2", "s", lim, pool, NOW).take(0.0, 50) == (50, 0.0)


def test_rested_ip_share_moves_to_others() -> None:
    cfg = cfgmod.from_dict({"pools": {"main": {"ips": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]}}})
    sh = Shaper(cfg, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], now=NOW)
    pool = sh.pool("main")
    lim = sh.site_limits("s", ("mx.example.org",), "example.org")
    lanes = {ip: sh.lane(ip, "s", lim, pool, NOW) for ip in cfg.source_ips}
    blocked = Outcome(
        DEFERRED, 421, "4.7.0", "Client host [127.0.0.3] blocked using Spamhaus", "rcpt"
    )
    lanes["127.0.0.3"].observe([TxnResult(1, [blocked])], 10.0)
    picks = Counter(
        pool.pick("", NOW, lambda ip: lanes[ip].can_connect(20.0)).ip  # type: ignore[union-attr]
        for _ in range(100)
    )
    assert picks == {"127.0.0.2": 50, "127.0.0.4": 50}
    assert sh.events[0]["action"] == "rest"


def test_pool_choice_by_campaign_option_and_tenant() -> None:
    cfg = cfgmod.from_dict(
        {
            "pools": {
                "default": "shared",
                "tenants": {"acme": "acme"},
                "shared": {"ips": ["127.0.0.2"]},
                "acme": {"ips": ["127.0.0.3"]},
            }
        }
    )
    ps = load_pools(cfg, time.time())
    assert ps.pool_for("", "someone") == "shared"
    assert ps.pool_for("", "acme") == "acme"
    assert ps.pool_for("shared", "acme") == "shared"
    # acme's dedicated pool is acme's (and the operator's): another tenant
    # naming it sends from its own pool
    assert ps.pool_for("acme", "other") == "shared" and not ps.may_use("acme", "other")
    assert ps.pool_for("acme", "default") == "acme" and ps.may_use("shared", "other")
    # A worker without any of a pool's IPs falls back to its own.
    sh = Shaper(cfg, ["127.0.0.2"], now=NOW)
    assert [i.ip for i in sh.pool("acme").ips] == ["127.0.0.2"]


def test_workers_sending_from_one_address_share_its_limits() -> None:
    """Workers that send from the same address (no [ips] source, or fewer
    addresses than workers) each keep their own lanes: each applies its part
    of a site's limits and of a warm-up cap, so together they keep the
    address's (each applied the whole: 2 workers, twice the rate, connections
    and warm-up cap from one IP)."""
    from fastsend.shaping.lanes import ip_sharers

    site = {"default": {"messages_per_second": 100, "burst": 10, "max_connections": 5}}
    none = cfgmod.from_dict({"workers": {"count": 2}, "shaping": site})
    assert ip_sharers(none, []) == (2, 0)
    half = Shaper(none, [], now=NOW, index=1).site_limits("s", ("mx.one.example",), "one.example")
    assert half.rates == ((50.0, 5),) and half.max_connections == 2
    # Connections are shared out by place (the remainder to the first).
    from fastsend.shaping.lanes import split_limits

    whole = Shaper(cfgmod.from_dict({"shaping": site}), ["x"], now=NOW).site_limits(
        "s", ("mx.one.example",), "one.example"
    )
    assert whole.max_connections == 5 and whole.rates == ((100.0, 10),)
    assert [split_limits(whole, 2, i).max_connections for i in range(2)] == [3, 2]
    assert [split_limits(whole, 3, i).max_connections for i in range(3)] == [2, 2, 1]
    assert split_limits(whole, 8, 7).max_connections == 1  # at least one each
    # One address, three workers: all share it; four addresses, two workers: none do.
    one = cfgmod.from_dict({"workers": {"count": 3}, "ips": {"source": ["127.0.0.2"]}})
    assert [ip_sharers(one, one.ips_for_worker(j), j) for j in range(3)] == [(3, 0), (3, 1), (3, 2)]
    four = cfgmod.from_dict(
        {"workers": {"count": 2}, "ips": {"source": [f"127.0.0.{i}" for i in range(2, 6)]}}
    )
    assert [ip_sharers(four, four.ips_for_worker(j), j) for j in range(2)] == [(1, 0), (1, 0)]
    # A warming address shared by two workers: each may send half its cap.
    start = (dt.date(1970, 1, 1) + dt.timedelta(days=utc_day(NOW))).isoformat()
    warm = cfgmod.from_dict(
        {
            "workers": {"count": 2},
            "pools": {
                "warmup": {"schedule": [30]},
                "main": {"ips": [{"ip": "127.0.0.2", "warmup_start": start}]},
            },
        }
    )
    taken = 0
    for j in range(2):
        sh = Shaper(warm, warm.ips_for_worker(j), now=NOW, index=j)
        lim = sh.site_limits("s", ("gmail-smtp-in.l.google.com",), "gmail.com")
        taken += sh.lane("127.0.0.2", "s", lim, sh.pool(""), NOW).take(0.0, 30)[0]
    assert taken == 30


def test_send_chooses_the_campaigns_pool_and_rate(tmp_path: Path) -> None:
    """`fastsend send --pool NAME --max-rate N`: the campaign's own pool (its
    mail leaves only from that pool's address, not the default pool's) and its
    dispatch rate, kept with the campaign (a `resume` keeps them). A pool the
    config does not have is refused before anything is spooled."""
    from _engine_helpers import run_fastsend, sink_log, summary, write_campaign, write_recipients
    from fastsend.sink import SinkProcess
    from fastsend.spool import open_spool

    camp = write_campaign(tmp_path)
    rfile = write_recipients(tmp_path, [f"u{i}@d{i % 5}.example" for i in range(60)])
    conf = tmp_path / "fastsend.toml"
    conf.write_text(
        '[pools]\ndefault = "main"\ntenants = { acme = "promo" }\n'
        '[pools.main]\nips = [{ ip = "127.0.0.2" }]\n'
        '[pools.promo]\nips = [{ ip = "127.0.0.3" }]\n'
    )
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        common = ["-c", str(conf), "--route", f"*={sink.host}:{sink.port}", "--spool", str(spool),
                  "--json", "--no-progress", "--no-dkim", "--max-wait", "2"]  # fmt: skip
        theirs = run_fastsend(
            "send", str(camp), "-r", str(rfile), "--pool", "promo", "--tenant", "bob", *common
        )
        assert theirs.returncode == 2 and "another tenant's" in theirs.stderr, theirs.stderr
        bad = run_fastsend("send", str(camp), "-r", str(rfile), "--pool", "promos", *common)
        assert bad.returncode == 2, bad.stderr
        assert "pool 'promos'" in bad.stderr and "main, promo" in bad.stderr, bad.stderr
        assert not spool.exists() or open_spool(str(spool)).list_campaigns() == []
        proc = run_fastsend(
            "send", str(camp), "-r", str(rfile), "--pool", "promo", "--max-rate", "500", *common
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert summary(proc)["delivered"] == 60
    peers = {e["peer"] for e in sink_log(log)}
    assert peers == {"127.0.0.3"}, peers
    info = open_spool(str(spool)).get_campaign(1)
    assert info is not None and info.options["pool"] == "promo"
    assert info.options["max_rate"] == 500.0
