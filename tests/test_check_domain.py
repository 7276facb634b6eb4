"""`fastsend check-domain` against the real loopback DNS server: good and broken zones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastsend.authcheck.spf import check_host
from fastsend.cli import main
from fastsend.message.keys import generate, load_private_key, public_txt, write_key
from fastsend.testing.dnsserver import DNSServer


@pytest.fixture
def key(tmp_path: Path) -> Path:
    p = tmp_path / "s1.pem"
    write_key(generate("ed25519"), p)
    return p


def good_zone(key: Path) -> dict[str, list[tuple[str, str]]]:
    return {
        "example.test": [
            ("MX", "10 mx1.example.test."),
            ("TXT", "v=spf1 include:_spf.example.test ip4:127.0.0.9 -all"),
        ],
        "_spf.example.test": [("TXT", "v=spf1 a:out1.example.test ~all")],
        "mx1.example.test": [("A", "127.0.0.1")],
        "out1.example.test": [("A", "127.0.0.2")],
        "s1._domainkey.example.test": [("TXT", public_txt(load_private_key(str(key))))],
        "_dmarc.example.test": [("TXT", "v=DMARC1; p=quarantine; rua=mailto:d@example.test")],
        "2.0.0.127.in-addr.arpa": [("PTR", "out1.example.test.")],
    }


def run_check(dns: DNSServer, key: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    rc = main(["check-domain", "example.test", "--ip", "127.0.0.2", "--selector", "s1",
               "--key", str(key), "--nameserver", dns.nameserver, "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    return rc, {c["name"]: c for c in out["checks"]}


def test_good_zone_passes(
    dns_server: DNSServer, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dns_server.set_zones(good_zone(key))
    rc, checks = run_check(dns_server, key, capsys)
    assert rc == 0, checks
    for name in ("MX", "SPF", "DKIM s1", "DMARC", "alignment", "PTR 127.0.0.2"):
        assert checks[name]["status"] == "pass", checks[name]


def test_broken_zone_fails_with_fixes(
    dns_server: DNSServer, key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zones = good_zone(key)
    zones["example.test"] = [("TXT", "v=spf1 ip4:10.0.0.0/8 -all")]  # no MX, IP not authorised
    other = tmp_path / "other.pem"
    write_key(generate("ed25519"), other)
    zones["s1._domainkey.example.test"] = [("TXT", public_txt(load_private_key(str(other))))]
    del zones["_dmarc.example.test"]
    zones["2.0.0.127.in-addr.arpa"] = [("PTR", "nowhere.example.test.")]
    dns_server.set_zones(zones)
    rc, checks = run_check(dns_server, key, capsys)
    assert rc == 1
    for name in ("MX", "SPF", "DKIM s1", "DMARC", "PTR 127.0.0.2"):
        assert checks[name]["status"] == "fail", checks[name]
    assert checks["DKIM s1"]["fix"].startswith("s1._domainkey.example.test. IN TXT")
    assert "v=DMARC1" in checks["DMARC"]["fix"]
    # the human table names the records to add
    main(
        ["check-domain", "example.test", "--ip", "127.0.0.2", "--nameserver", dns_server.nameserver]
    )
    text = capsys.readouterr().out
    assert "FAIL" in text and "records to add" in text


def test_dmarc_none_warns_and_bad_args(
    dns_server: DNSServer, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zones = good_zone(key)
    zones["_dmarc.example.test"] = [("TXT", "v=DMARC1; p=none")]
    dns_server.set_zones(zones)
    rc, checks = run_check(dns_server, key, capsys)
    assert rc == 0 and checks["DMARC"]["status"] == "warn"
    assert main(["check-domain", "example.test", "--ip", "not-an-ip"]) == 2
    assert main(["check-domain", "example.test", "--selector", "s1"]) == 2


def test_spf_evaluator_rules() -> None:
    zone = {
        ("a.test", "TXT"): ["v=spf1 redirect=b.test"],
        ("b.test", "TXT"): ["v=spf1 ip6:2001:db8::/32 mx/24 -all"],
        ("b.test", "MX"): ["10 mx.b.test."],
        ("mx.b.test", "A"): ["192.0.2.1"],
        ("loop.test", "TXT"): ["v=spf1 include:loop.test -all"],
        ("two.test", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
    }

    def look(name: str, rtype: str) -> list[str]:
        return zone.get((name, rtype), [])

    assert check_host("192.0.2.77", "a.test", look).result == "pass"
    assert check_host("2001:db8::1", "a.test", look).result == "pass"
    assert check_host("198.51.100.1", "a.test", look).result == "fail"
    assert check_host("192.0.2.1", "loop.test", look).result == "permerror"
    assert check_host("192.0.2.1", "two.test", look).result == "permerror"
    assert check_host("192.0.2.1", "none.test", look).result == "none"


def test_org_domain_fallback_without_psl(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastsend.authcheck.common as ac

    monkeypatch.setattr(ac, "_PSL", None)
    assert ac.org_domain("a.b.example.com") == "example.com"
    assert ac.org_domain("mail.example.co.uk") == "example.co.uk"
    assert ac.org_domain("x.example.com.au") == "example.com.au"
    assert ac.org_domain("example.test") == "example.test"
