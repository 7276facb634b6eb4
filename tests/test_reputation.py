"""Reputation: DNS blocklist checks against the loopback test DNS server (the library,
``fastsend check-ip``, and rests of the listed IP's lanes), and the rate alarms."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fastsend import wire
from fastsend.analytics.alarms import Alarms, AlarmSettings
from fastsend.analytics.dnsbl import (
    Blocklist,
    Reputation,
    ReputationSettings,
    check,
    make_resolver,
    query_name,
)
from fastsend.analytics.rollup import _node_rows
from fastsend.analytics.store import IDX, NC, SQLiteRollupStore
from fastsend.config import ConfigError, from_dict
from fastsend.testing.dnsserver import DNSServer

ZONES = {
    "2.0.0.127.bl.test": [
        ("A", "127.0.0.2"),
        ("A", "127.0.0.4"),
        ("TXT", "listed: see https://bl.test/q?ip=127.0.0.2"),
    ],
    "5.0.0.127.bl.test": [("A", "127.255.255.254")],  # "you query through a public resolver"
    "6.0.0.127.bl.test": [("A", "10.0.0.1")],  # not a listing code
    "2.0.0.127.other.test": [("A", "127.0.0.3")],
    # 2001:db8::1, nibbles reversed (RFC 5782 2.4)
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test": [("A", "127.0.0.2")],
}


def config(dns: DNSServer, **reputation: Any) -> Any:
    return from_dict({"dns": {"nameservers": [dns.nameserver], "timeout": 3},
                      "ips": {"source": ["127.0.0.2", "127.0.0.3"]},
                      "reputation": {"blocklists": ["bl.test"], **reputation}})  # fmt: skip


def test_query_names() -> None:
    assert query_name("192.0.2.99", "zen.example") == "99.2.0.192.zen.example"
    assert query_name("2001:db8::1", "bl.test").startswith("1.0.0.0.0.0.0.0")
    assert query_name("2001:db8::1", "bl.test").endswith(".8.b.d.0.1.0.0.2.bl.test")


def test_lookups_against_the_loopback_dns(dns_server: DNSServer) -> None:
    dns_server.set_zones(ZONES)
    cfg = config(dns_server)

    async def main() -> None:
        r = make_resolver(cfg)
        listed = await check(r, "127.0.0.2", "bl.test")
        assert listed.listed and listed.codes == ["127.0.0.2", "127.0.0.4"]
        assert "listed: see" in listed.text
        clean = await check(r, "127.0.0.3", "bl.test")
        assert not clean.listed and not clean.error
        refused = await check(r, "127.0.0.5", "bl.test")
        assert not refused.listed and "not a listing answer" in refused.error
        odd = await check(r, "127.0.0.6", "bl.test")
        assert not odd.listed and odd.error
        v6 = await check(r, "2001:db8::1", "bl.test")
        assert v6.listed

    asyncio.run(main())


def test_reputation_events_and_rests(dns_server: DNSServer) -> None:
    dns_server.set_zones(ZONES)
    cfg = config(dns_server, rest_hours=2)
    settings = ReputationSettings.from_config(cfg)
    settings.blocklists.append(Blocklist("other.test", ("outlook",)))
    events: list[dict[str, Any]] = []
    rests: list[tuple[Any, ...]] = []
    lifts: list[tuple[str, str]] = []
    rep = Reputation(settings, make_resolver(cfg), events.append,
                     lambda *a: rests.append(a), lift=lambda *a: lifts.append(a))  # fmt: skip

    async def main() -> None:
        await rep.check_ips(["127.0.0.2", "127.0.0.3"])
        assert [(e["event"], e["zone"]) for e in events] == [
            ("ip_listed", "bl.test"),
            ("ip_listed", "other.test"),
        ]
        assert events[0]["providers"] == ["*"] and events[1]["providers"] == ["outlook"]
        assert [(ip, p, k) for ip, p, _u, _r, k, _c in rests] == [
            ("127.0.0.2", ["*"], "dnsbl:bl.test"),
            ("127.0.0.2", ["outlook"], "dnsbl:other.test"),
        ]
        assert 7100 < rests[0][2] - time.time() <= 7200
        await rep.check_ips(["127.0.0.2"])  # still listed: no second event, the rest renewed
        assert len(events) == 2 and len(rests) == 4
        dns_server.set_zones({})
        await rep.check_ips(["127.0.0.2"])
        assert [e["event"] for e in events[2:]] == ["ip_delisted", "ip_delisted"]
        assert lifts == [("127.0.0.2", "dnsbl:bl.test"), ("127.0.0.2", "dnsbl:other.test")]
        st = {s["zone"]: s for s in rep.status("127.0.0.2")}
        assert st["bl.test"]["listed"] is False and st["bl.test"]["checked"] > 0

    asyncio.run(main())


def test_a_listed_ip_rests_its_lanes() -> None:
    """The supervisor's IPRest record, decoded as the worker decodes it, rests the IP's
    lanes for the named providers only."""
    from fastsend.shaping.lanes import Shaper

    cfg = from_dict({"ips": {"source": ["127.0.0.2", "127.0.0.3"]}})
    sh = Shaper(cfg, ["127.0.0.2", "127.0.0.3"])
    now = time.time()
    lim_g = sh.site_limits("gmail", ("gmail-smtp-in.l.google.com",), "gmail.com")
    lim_y = sh.site_limits("yahoo", ("mta5.am0.yahoodns.net",), "yahoo.com")
    pool = sh.pool("")
    g2 = sh.lane("127.0.0.2", "gmail", lim_g, pool, now)
    y2 = sh.lane("127.0.0.2", "yahoo", lim_y, pool, now)
    g3 = sh.lane("127.0.0.3", "gmail", lim_g, pool, now)
    rec = wire.encoder.encode(wire.IPRest("127.0.0.2", ["google"], now + 600, "listed on bl.test"))
    msg = wire.to_worker_decoder.decode(rec)
    assert isinstance(msg, wire.IPRest)
    sh.rest_ip(msg.ip, msg.providers, msg.until, msg.reason)
    mono = time.monotonic()
    assert not g2.usable(mono) and y2.usable(mono) and g3.usable(mono)
    assert "bl.test" in g2.blocked_reason
    # A lane made after the rest is rested too.
    lim_g2 = sh.site_limits("gmail2", ("alt1.gmail-smtp-in.l.google.com",), "googlemail.com")
    assert not sh.lane("127.0.0.2", "gmail2", lim_g2, pool, now).usable(mono)


def test_check_ip_command(dns_server: DNSServer, tmp_path: Path) -> None:
    # 127.0.0.3's reverse DNS and EHLO name are in order (check-ip checks them too)
    dns_server.set_zones({**ZONES, "3.0.0.127.in-addr.arpa": [("PTR", "out3.example.test.")],
                          "out3.example.test": [("A", "127.0.0.3"), ("TXT", "v=spf1 a -all")]})
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(f'[dns]\nnameservers = ["{dns_server.nameserver}"]\ntimeout = 3\n'
                   '[ips]\nsource = ["127.0.0.2", "127.0.0.3"]\n'
                   '[reputation]\nblocklists = [{ zone = "bl.test", providers = ["*"] }]\n')  # fmt: skip
    env = {**os.environ}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fastsend", "check-ip", "-c", str(cfg),
                               *args], capture_output=True, text=True, env=env, timeout=60)  # fmt: skip

    r = run()
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert any("127.0.0.2" in ln and "LISTED" in ln and "127.0.0.4" in ln for ln in lines)
    assert any("127.0.0.3" in ln and " ok" in ln for ln in lines)
    r = run("127.0.0.3")
    assert r.returncode == 0 and "ok" in r.stdout
    r = run("127.0.0.2", "--zone", "other.test", "--json")
    assert r.returncode == 1 and '"zone":"other.test"' in r.stdout
    r = run("not-an-ip")
    assert r.returncode == 2 and "not an IP address" in r.stderr


def test_reputation_config_errors() -> None:
    for raw, msg in (({"blocklists": "x"}, r"\[reputation\] blocklists: expected an array"),
                     ({"blocklists": [{"zone": ""}]}, "zone must be"),
                     ({"blocklists": [{"zone": "a.b", "providers": []}]}, "providers"),
                     ({"check_every": -1}, "check_every"), ({"colour": 1}, "unknown key")):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            ReputationSettings.from_config(from_dict({"reputation": raw}))


def test_rate_alarms_with_the_providers_lines(tmp_path: Path) -> None:
    store = SQLiteRollupStore(str(tmp_path))
    events: list[dict[str, Any]] = []
    alarms = Alarms(AlarmSettings(min_delivered=100), store, events.append)
    now = time.time()
    t = int(now) - int(now) % 60

    def put(cid: int, delivered: int, complaints: int, bounced: int) -> None:
        row = [0] * NC
        row[IDX["delivered"]] = delivered
        row[IDX["complaints"]] = complaints
        row[IDX["bounced"]] = bounced
        counts = {(60, t, ("acme", cid, "google", "127.0.0.2")): row}
        _node_rows(counts, {})  # the all-campaigns rows, as Rollups writes them
        store.add(counts, {}, {})

    put(1, 1000, 4, 0)  # 0.4%: over Gmail's 0.3% line
    put(2, 1000, 2, 30)  # 0.2% complaints: warning; 2.9% bounces: warning
    put(3, 50, 10, 10)  # too small a sample to judge
    put(4, 30, 0, 870)  # a list that mostly bounces: 96.7% over 900 ended, 30 delivered
    alarms.evaluate(["acme"], now)
    got = {(e.get("campaign"), e.get("provider"), e["kind"]): e for e in events}
    assert got[(1, None, "complaint_rate")]["level"] == "critical"
    assert got[(1, None, "complaint_rate")]["line"] == 0.003
    assert got[(2, None, "complaint_rate")]["level"] == "warning"
    assert got[(2, None, "bounce_rate")]["level"] == "warning"
    assert not [e for e in events if e.get("campaign") == 3]
    assert got[(4, None, "bounce_rate")]["level"] == "critical"  # was never judged
    assert (4, None, "complaint_rate") not in got  # 30 delivered: too few to judge
    assert got[(None, "google", "complaint_rate")]["level"] == "critical"  # 16 / 2,080
    n = len(events)
    alarms.evaluate(["acme"], now)
    assert len(events) == n  # raised once per level
    put(1, 10000, 0, 0)  # diluted under the lines: cleared
    alarms.evaluate(["acme"], now)
    assert any(e["event"] == "alarm_cleared" and e.get("campaign") == 1 for e in events[n:])


def _critical(store: Any, cid: int, delivered: int = 1000, complaints: int = 4) -> None:
    now = time.time()
    t = int(now) - int(now) % 60
    row = [0] * NC
    row[IDX["delivered"]], row[IDX["complaints"]] = delivered, complaints
    counts = {(60, t, ("acme", cid, "google", "127.0.0.2")): row}
    _node_rows(counts, {})
    store.add(counts, {}, {})


def test_a_raised_alarm_survives_a_restart(tmp_path: Path) -> None:
    """Alarm state lived in memory: after a restart every alarm still over its line was
    raised (and webhooked) again, and one that cleared was never told cleared."""
    settings = AlarmSettings(min_delivered=100)
    store = SQLiteRollupStore(str(tmp_path))
    _critical(store, 1)
    events: list[dict[str, Any]] = []
    Alarms(settings, store, events.append).evaluate(["acme"])
    raised = [(e["event"], e.get("campaign"), e.get("provider")) for e in events]
    assert ("alarm", 1, None) in raised and ("alarm", None, "google") in raised
    store.close()
    store = SQLiteRollupStore(str(tmp_path))  # serve restarted: a new process
    after: list[dict[str, Any]] = []
    alarms = Alarms(settings, store, after.append)
    alarms.evaluate(["acme"])
    assert after == []  # still critical: already told
    _critical(store, 1, delivered=20000, complaints=0)  # diluted under the lines
    alarms.evaluate(["acme"])
    assert {(e["event"], e.get("campaign"), e.get("provider")) for e in after} == {
        ("alarm_cleared", 1, None), ("alarm_cleared", None, "google"),
        ("alarm_cleared", None, None)}  # the source IP's (node-wide)
    assert [e["source_ip"] for e in after if "source_ip" in e] == ["127.0.0.2"]
    store.close()


def test_two_nodes_on_a_shared_spool_tell_an_alarm_once(redis_server: Any) -> None:
    """Two serve nodes read the same Redis rollups: each raised every alarm, so every
    webhook receiver got each alarm (and each clearing) once per node."""
    from fastsend.analytics.stores import open_store

    url = redis_server.url(node="n1")
    a, b = open_store(url), open_store(url)
    _critical(a, 7)
    events: list[dict[str, Any]] = []
    node1 = Alarms(AlarmSettings(min_delivered=100), a, events.append)
    node2 = Alarms(AlarmSettings(min_delivered=100), b, events.append)
    node1.evaluate(["acme"])
    node2.evaluate(["acme"])
    kinds = [(e["event"], e.get("campaign"), e.get("provider"), e["kind"]) for e in events]
    assert len(kinds) == len(set(kinds)) and ("alarm", 7, None, "complaint_rate") in kinds
    n = len(events)
    _critical(b, 7, delivered=20000, complaints=0)
    node2.evaluate(["acme"])
    node1.evaluate(["acme"])
    cleared = [e for e in events[n:] if e.get("campaign") == 7]
    assert [e["event"] for e in cleared] == ["alarm_cleared"]


def test_a_listing_is_told_once_over_restarts_and_a_delisting_while_down(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """After a restart a still-listed IP was announced listed again, and an IP delisted
    while the server was down was never announced delisted."""
    dns_server.set_zones(ZONES)
    cfg = config(dns_server)
    settings = ReputationSettings.from_config(cfg)
    store = SQLiteRollupStore(str(tmp_path))
    events: list[dict[str, Any]] = []

    def run() -> None:  # one server's life: a fresh Reputation on the same store
        rep = Reputation(settings, make_resolver(cfg), events.append, None, store)
        asyncio.run(rep.check_ips(["127.0.0.2"]))

    run()
    assert [e["event"] for e in events] == ["ip_listed"]
    run()
    assert [e["event"] for e in events] == ["ip_listed"]
    dns_server.set_zones({})  # delisted while down
    run()
    assert [e["event"] for e in events] == ["ip_listed", "ip_delisted"]
    store.close()


def test_an_alarm_whose_mail_stopped_clears_and_a_new_incident_is_told(tmp_path: Path) -> None:
    """A group judged only over enough mail was never judged again once its mail
    stopped (the campaign ended, the night came): its alarm stayed raised for good, so
    the next incident of the same provider or campaign (level == the stale one) was
    never told. A raised alarm whose group has no mail in the window now clears, and
    the next crossing is an alarm again."""
    settings = AlarmSettings(min_delivered=100)
    store = SQLiteRollupStore(str(tmp_path))
    events: list[dict[str, Any]] = []
    alarms = Alarms(settings, store, events.append)
    now = time.time()
    t = int(now) - int(now) % 60

    def put(at: int, delivered: int, complaints: int) -> None:
        row = [0] * NC
        row[IDX["delivered"]], row[IDX["complaints"]] = delivered, complaints
        counts = {(60, at, ("acme", 1, "google", "127.0.0.2")): row}
        _node_rows(counts, {})
        store.add(counts, {}, {})

    put(t, 1000, 4)  # Monday: 0.4%
    alarms.evaluate(["acme"], now)
    told = {(e["event"], e.get("campaign"), e.get("provider") or e.get("source_ip"))
            for e in events}  # fmt: skip
    assert told == {("alarm", 1, None), ("alarm", None, "google"), ("alarm", None, "127.0.0.2")}
    events.clear()
    later = now + 6 * 3600  # the mail stopped: nothing in the window
    alarms.evaluate(["acme"], later)
    told = {(e["event"], e.get("campaign"), e.get("provider") or e.get("source_ip"))
            for e in events}  # fmt: skip
    assert told == {("alarm_cleared", 1, None), ("alarm_cleared", None, "google"),
                    ("alarm_cleared", None, "127.0.0.2")}  # fmt: skip
    assert all(e["rate"] is None for e in events)
    events.clear()
    alarms.evaluate(["acme"], later)
    assert events == []  # told once
    tl = int(later) - int(later) % 60
    put(tl, 1000, 5)  # the next incident
    alarms.evaluate(["acme"], later)
    told = {(e["event"], e.get("campaign"), e.get("provider") or e.get("source_ip"),
             e.get("level")) for e in events}  # fmt: skip
    assert told == {("alarm", 1, None, "critical"), ("alarm", None, "google", "critical"),
                    ("alarm", None, "127.0.0.2", "critical")}  # fmt: skip
    store.close()


def test_a_source_ip_over_the_line_across_tenants_is_an_alarm(tmp_path: Path) -> None:
    """Alarms were per tenant's campaign and provider only: a provider judges a source IP
    on all the mail it sends, and three tenants each under the sample (150 delivered,
    2 complaints each: 1.3%) made no alarm although the IP's rate was 1.3% over 450
    mails. The node's source IPs are judged too ("tenant": "*"); mail of no IP of ours
    (a relay or provider route) is not."""
    store = SQLiteRollupStore(str(tmp_path))
    events: list[dict[str, Any]] = []
    alarms = Alarms(AlarmSettings(min_delivered=200), store, events.append)
    now = time.time()
    t = int(now) - int(now) % 60
    counts = {}
    for cid, tenant in ((1, "acme"), (2, "beta"), (3, "gamma")):
        # per tenant: each campaign and provider under the sample
        for c, prov, ip, n in ((cid, "google", "127.0.0.2", 150), (cid + 10, "other", "", 100)):
            row = [0] * NC
            row[IDX["delivered"]], row[IDX["complaints"]] = n, 2
            counts[(60, t, (tenant, c, prov, ip))] = row
    _node_rows(counts, {})
    store.add(counts, {}, {})
    alarms.evaluate(["acme", "beta", "gamma"], now)
    ips = [e for e in events if "source_ip" in e]  # (the node's providers are judged too)
    assert [(e["event"], e["tenant"], e.get("source_ip"), e["kind"], e["level"])
            for e in ips] == [("alarm", "*", "127.0.0.2", "complaint_rate", "critical")]
    assert ips[0]["delivered"] == 450
    store.close()
