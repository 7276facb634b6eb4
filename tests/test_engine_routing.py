"""Routing through real DNS (a dnslib server on loopback): MX preference, the
implicit MX (A record), null MX and NXDOMAIN; static routes; multi-recipient
transactions for identical messages; the transactional message kind."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import (
    received_counts,
    run_fastsend,
    send_via,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)

from fastsend.config import Config, Route, loader
from fastsend.delivery.mx import MXResolver, Site
from fastsend.events import EventLog
from fastsend.outcome import Outcome
from fastsend.queue.supervisor import Supervisor
from fastsend.sink import SinkProcess
from fastsend.spool.sqlite import SQLiteSpool
from fastsend.testing.dnsserver import DNSServer


def test_mx_routing_null_mx_nxdomain_and_implicit_mx(tmp_path: Path, dns_server: DNSServer) -> None:
    dns_server.set_zones(
        {
            "good.test": [("MX", "10 mx1.good.test."), ("MX", "20 mx2.good.test.")],
            "mx1.good.test": [("A", "127.0.0.1")],
            "mx2.good.test": [("A", "127.0.0.1")],
            "implicit.test": [("A", "127.0.0.1")],
            "nullmx.test": [("MX", "0 .")],
        }
    )
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(
        tmp_path,
        ["a@good.test", "b@good.test", "c@implicit.test", "d@nullmx.test", "e@missing.test"],
    )
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        _host, port = sink.addresses[0]
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
            '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 1\n'
            "[delivery]\nallow_private_mx = true\n"  # the test DNS puts MX on loopback
        )
        proc = run_fastsend(
            "send",
            str(camp),
            "-r",
            str(rcpts),
            "-c",
            str(cfg),
            "--spool",
            str(tmp_path / "spool"),
            "--json",
            "--no-dkim",
            "--no-progress",
            "--max-wait",
            "1",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"]) == (3, 2)
    assert set(received_counts(log)) == {"a@good.test", "b@good.test", "c@implicit.test"}
    events = {
        e["rcpt"]: e
        for e in map(orjson.loads, (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines())
        if e["event"] != "accepted"
    }
    assert events["a@good.test"]["mx"].startswith("mx1.good.test")  # preference 10 first
    assert (events["d@nullmx.test"]["code"], events["d@nullmx.test"]["enhanced"]) == (
        556,
        "5.1.10",
    )  # RFC 7505's code (interop24's audit: it was 550)
    assert "null MX" in events["d@nullmx.test"]["text"]
    assert events["e@missing.test"]["enhanced"] == "5.1.2"
    assert ("good.test", "MX") in dns_server.resolver.queries


def test_identical_messages_share_transactions_and_connections(tmp_path: Path) -> None:
    camp = write_campaign(
        tmp_path, 'from = "a@sender.example.com"\nsubject = "Same for all"\ntext = "Hello.\\n"\n'
    )
    addrs = [f"u{i}@same.example.net" for i in range(120)]
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        proc = send_via(
            camp, rcpts, (host, port), tmp_path / "spool", "--workers", "1", "--no-dkim"
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary(proc)["delivered"] == 120
    msgs = sink_log(log)
    assert sum(len(m["recipients"]) for m in msgs) == 120
    assert len(msgs) <= 120 // 50 + 1  # up to 50 recipients per transaction
    assert max(len(m["recipients"]) for m in msgs) > 1


def test_transactional_kind_raw_and_literal_messages(tmp_path: Path) -> None:
    import asyncio

    spool = SQLiteSpool(str(tmp_path / "spool"))
    cid = spool.create_campaign({"kind": "transactional"}, name="api")
    raw = b"From: a@sender.example.com\r\nTo: x@t.example.net\r\nSubject: raw\r\n\r\nraw body\r\n"
    rows = [
        (
            "x@t.example.net",
            "t.example.net",
            orjson.dumps(
                {"raw": base64.b64encode(raw).decode(), "mail_from": "a@sender.example.com"}
            ),
        ),
        (
            "y@t.example.net",
            "t.example.net",
            orjson.dumps(
                {"from": "a@sender.example.com", "subject": "Hi {{ x }}", "text": "{{ not a var }}"}
            ),
        ),
        ("z@t.example.net", "t.example.net", orjson.dumps({"from": "broken"})),
    ]
    spool.add_messages(cid, rows, time.time())
    with SinkProcess("--save", str(tmp_path / "saved")) as sink:
        host, port = sink.addresses[0]
        cfg = Config()
        cfg.spool_dir = str(tmp_path / "spool")
        cfg.workers = 1
        cfg.routes["*"] = Route(host, port)
        sup = Supervisor(cfg, spool, EventLog(None), max_wait=1)
        asyncio.run(sup.run())
    counts = spool.counts(cid)
    assert counts["delivered"] == 2 and counts["bounced"] == 1
    saved = sorted((tmp_path / "saved").iterdir())
    bodies = [p.read_bytes() for p in saved]
    assert any(b.endswith(raw) for b in bodies)  # as sent, after the Date and Message-ID added
    literal = next(b for b in bodies if b"Subject:" in b and b"raw body" not in b)
    assert b"Hi {{ x }}" in literal and b"{{ not a var }}" in literal


def _resolver(dns_server: DNSServer) -> MXResolver:
    cfg = loader.from_dict(
        {
            "dns": {"nameservers": [dns_server.nameserver], "mx_port": 2525, "timeout": 3},
            "delivery": {"allow_private_mx": True},
        },
        base_dir=".",
        files=False,
    )
    return MXResolver(cfg)


def test_mx_lookups_of_one_domain_at_once_ask_the_dns_once(dns_server: DNSServer) -> None:
    """Batches for a domain not yet cached arrive together (a campaign's first
    seconds): one MX query and one address query per host, not one per batch."""
    dns_server.set_zones(
        {
            "many.test": [("MX", "10 mx.provider.test.")],
            "other.test": [("MX", "10 mx.provider.test.")],
            "mx.provider.test": [("A", "127.0.0.1")],
        }
    )
    r = _resolver(dns_server)

    async def go() -> list[Any]:
        names = ["many.test", "other.test"] * 20
        return await asyncio.gather(*(r.site_for(d) for d in names))

    sites = asyncio.run(go())
    assert all(isinstance(s, Site) and s.hosts[0].address == "127.0.0.1" for s in sites)
    asked = dns_server.resolver.queries
    assert asked.count(("many.test", "MX")) == 1
    assert asked.count(("other.test", "MX")) == 1
    assert asked.count(("mx.provider.test", "A")) == 1


def test_mx_cname_servfail_and_preference(dns_server: DNSServer) -> None:
    """A CNAME'd MX host is followed (as a recursive resolver answers it);
    SERVFAIL is soft (deferred 4.4.3), NXDOMAIN hard (failed 5.1.2); hosts come
    in preference order, whatever order the DNS lists them in."""
    dns_server.set_zones(
        {
            "cname.test": [("MX", "10 alias.cname.test.")],
            "alias.cname.test": [("CNAME", "real.cname.test.")],
            "real.cname.test": [("A", "127.0.0.7")],
            "broken.test": [("SERVFAIL", "")],
            "order.test": [
                ("MX", "30 c.order.test."),
                ("MX", "10 a.order.test."),
                ("MX", "20 b.order.test."),
            ],
            "a.order.test": [("A", "127.0.0.11")],
            "b.order.test": [("A", "127.0.0.12")],
            "c.order.test": [("A", "127.0.0.13")],
        }
    )
    r = _resolver(dns_server)

    async def go() -> list[Any]:
        return [
            await r.site_for(d) for d in ("cname.test", "broken.test", "gone.test", "order.test")
        ]

    cname, broken, gone, order = asyncio.run(go())
    assert isinstance(cname, Site) and [h.address for h in cname.hosts] == ["127.0.0.7"]
    assert cname.hosts[0].name == "alias.cname.test"  # the MX name: TLS verifies it
    assert isinstance(broken, Outcome) and (broken.kind, broken.enhanced) == ("deferred", "4.4.3")
    assert isinstance(gone, Outcome) and (gone.kind, gone.enhanced) == ("failed", "5.1.2")
    assert isinstance(order, Site)
    assert [h.address for h in order.hosts] == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


def test_mx_fallback_through_the_binary(tmp_path: Path, dns_server: DNSServer) -> None:
    """The preferred MX's three addresses refuse connections; the next MX
    (preference 20, a CNAME to its host) takes the mail; a domain whose only
    MX host does not exist is deferred (4.4.3), not bounced; a null MX next
    to another MX still bounces at once (5.1.10, no attempt)."""
    from _smtp_helpers import aiosmtpd_server
    from conftest import free_port

    port = free_port()
    dns_server.set_zones(
        {
            "backup.test": [("MX", "10 mx1.backup.test."), ("MX", "20 mx2.backup.test.")],
            "mx1.backup.test": [("A", "127.0.0.9"), ("A", "127.0.0.10"), ("A", "127.0.0.11")],
            "mx2.backup.test": [("CNAME", "host2.backup.test.")],
            "host2.backup.test": [("A", "127.0.0.1")],
            "nohost.test": [("MX", "10 gone.nohost.test.")],
            "nullmix.test": [("MX", "0 ."), ("MX", "10 mx2.backup.test.")],
        }
    )
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(
        tmp_path, ["a@backup.test", "b@backup.test", "c@nohost.test", "d@nullmix.test"]
    )
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 1\n'
        "[delivery]\nallow_private_mx = true\n"
    )
    with aiosmtpd_server(port) as (_ctl, handler):
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
            "--max-wait", "1",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["deferred"], s["bounced"]) == (2, 1, 1), s
    assert sorted(r for m in handler.messages for r in m["rcpts"]) == [
        "a@backup.test",
        "b@backup.test",
    ]
    events = {
        e["rcpt"]: e
        for e in map(orjson.loads, (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines())
        if e["event"] in ("delivered", "deferred", "bounced")
    }
    assert events["a@backup.test"]["mx"].startswith("mx2.backup.test[127.0.0.1]")
    assert events["c@nohost.test"]["enhanced"] == "4.4.3"
    assert (events["d@nullmix.test"]["event"], events["d@nullmix.test"]["enhanced"]) == (
        "bounced",
        "5.1.10",
    )


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_relay_without_tls_never_sends_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay with ``tls = "opportunistic"`` whose STARTTLS is missing (a
    stripped EHLO; here aiosmtpd offering AUTH PLAIN LOGIN, no TLS, AUTH
    required): the mail is deferred at "auth" with the reason and kept, the
    password never sent; the same spool resumed with ``auth_in_clear = true``
    (the operator's explicit choice) delivers it, authenticated. ``tls = "off"``
    with PLAIN and without auth_in_clear is a config error naming the fix."""
    from aiosmtpd.smtp import AuthResult, LoginPassword

    from _smtp_helpers import aiosmtpd_server
    from conftest import free_port

    tried: list[tuple[str, bytes]] = []

    def check(server: Any, session: Any, envelope: Any, mech: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        tried.append((mech, data.login))
        return AuthResult(success=data.login == b"u" and data.password == b"p", handled=False)

    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.com", "b@example.com"])
    spool = tmp_path / "spool"
    port = free_port()

    def relay(extra: str, tls: str = "opportunistic") -> str:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            "[retry]\nmin_backoff = 1.0\nmax_backoff = 1.0\njitter = 0.0\n"
            f'[transports.relay1]\nkind = "relay"\nhost = "127.0.0.1"\nport = {port}\n'
            f'tls = "{tls}"\n{extra}[routes]\n"*" = "relay1"\n'
        )
        return str(cfg)

    monkeypatch.setenv("FASTSEND_RELAY1_USERNAME", "u")
    monkeypatch.setenv("FASTSEND_RELAY1_PASSWORD", "p")
    with aiosmtpd_server(
        port, authenticator=check, auth_required=True, auth_require_tls=False
    ) as (_ctl, handler):
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", relay(""), "--spool", str(spool),
            "--json", "--no-dkim", "--no-progress", "--max-wait", "0",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = summary(proc)
        assert (s["delivered"], s["deferred"]) == (0, 2), s
        assert tried == [] and handler.messages == []
        deferred = [
            e
            for e in map(orjson.loads, (spool / "events.jsonl").read_bytes().splitlines())
            if e["event"] == "deferred"
        ]
        # Each message deferred at "auth" (a loaded host may see the 1 s retry due
        # before the send ends and try it again: a second deferral, the same reason).
        assert len({e["id"] for e in deferred}) == 2, deferred
        assert {e["stage"] for e in deferred} == {"auth"}, deferred
        assert "clear text" in deferred[0]["text"] and "STARTTLS" in deferred[0]["text"]
        bad = run_fastsend(
            "resume", "-c", relay('auth_mechanism = "PLAIN"\n', "off"), "--spool", str(spool),
            "--json", "--no-progress", "--max-wait", "0",
        )  # fmt: skip
        assert bad.returncode != 0 and "auth_in_clear" in bad.stderr, bad.stderr[-2000:]
        assert tried == []
        ok = run_fastsend(
            "resume", "-c", relay("auth_in_clear = true\n"), "--spool", str(spool),
            "--json", "--no-progress", "--max-wait", "5",  # (the retry is due in 1 s)
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr[-3000:]
    assert summary(ok)["delivered"] == 2, summary(ok)
    assert sorted(r for m in handler.messages for r in m["rcpts"]) == [
        "a@example.com",
        "b@example.com",
    ]
    assert tried and all(t == ("PLAIN", b"u") for t in tried), tried
