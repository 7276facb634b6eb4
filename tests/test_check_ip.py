"""``fastsend check-ip``'s identity checks, with the real binary and the
loopback DNS server: forward-confirmed reverse DNS (PTR), the name the MTA says
in EHLO from each IP, and that name's SPF record (RFC 7208 2.3, the HELO
identity). A DNS failure is a failure saying so, never a missing record with a
record to publish. (The blocklist part: tests/test_reputation.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastsend.authcheck.common import make_lookup
from fastsend.authcheck.spf_check import check_helo_spf
from fastsend.testing.dnsserver import DNSServer

V6 = "2001:db8::25"
V6_REV = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
ZONES = {
    # .2: all in order
    "2.0.0.127.in-addr.arpa": [("PTR", "out1.example.test.")],
    "out1.example.test": [("A", "127.0.0.2"), ("TXT", "v=spf1 a -all")],
    # .3: PTR name resolves elsewhere; .6: no PTR
    "3.0.0.127.in-addr.arpa": [("PTR", "out3.example.test.")],
    "out3.example.test": [("A", "127.0.0.9")],
    # .4: the reverse zone is broken (SERVFAIL)
    "4.0.0.127.in-addr.arpa": [("SERVFAIL", "")],
    # .5: forward-confirmed, but its name has no SPF record
    "5.0.0.127.in-addr.arpa": [("PTR", "out5.example.test.")],
    "out5.example.test": [("A", "127.0.0.5")],
    # .7: a pool ehlo whose SPF does not list it; .8 one whose TXT lookup fails
    "mta.example.test": [("A", "127.0.0.7"), ("TXT", "v=spf1 ip4:127.0.0.70 -all")],
    "broken.example.test": [("SERVFAIL", "")],
    # IPv6: forward-confirmed through AAAA
    V6_REV: [("PTR", "v6.example.test.")],
    "v6.example.test": [("AAAA", V6), ("TXT", f"v=spf1 ip6:{V6} -all")],
}


def check_ip(dns: DNSServer, tmp_path: Path, *args: str, toml: str = "") -> tuple[int, Any, str]:
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 2\n{toml}')
    r = subprocess.run([sys.executable, "-m", "fastsend", "check-ip", "-c", str(cfg), *args],
                       capture_output=True, text=True, timeout=60, env={**os.environ})  # fmt: skip
    doc = json.loads(r.stdout) if "--json" in args else r.stdout
    return r.returncode, doc, r.stderr


def by(doc: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["ip"], d["check"]): d for d in doc}


def test_check_ip_checks_reverse_dns_the_ehlo_name_and_its_spf(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """Before: check-ip knew blocklists only (and without one it refused to run)."""
    dns_server.set_zones(ZONES)
    toml = ('[ips]\nsource = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6",'
            ' "127.0.0.7", "127.0.0.8"]\n'
            '[pools.main]\nips = [{ ip = "127.0.0.7", ehlo = "MTA.example.test." },'
            ' { ip = "127.0.0.8", ehlo = "broken.example.test" }]\n')  # fmt: skip
    rc, doc, _ = check_ip(dns_server, tmp_path, "--json", toml=toml)
    assert rc == 1
    got = by(doc)
    ok = got[("127.0.0.2", "PTR")]
    assert ok["status"] == "pass" and ok["ehlo"] == "out1.example.test", ok
    assert got[("127.0.0.2", "SPF helo")]["status"] == "pass"
    c = got[("127.0.0.3", "PTR")]
    assert c["status"] == "fail" and "not forward-confirmed" in c["detail"], c
    assert "out3.example.test. IN A 127.0.0.3" in c["fix"]
    c = got[("127.0.0.6", "PTR")]
    assert c["status"] == "fail" and "no PTR record for 127.0.0.6" in c["detail"], c
    assert "6.0.0.127.in-addr.arpa. IN PTR" in c["fix"]
    # a DNS failure: a failure that says so, nothing to publish
    c = got[("127.0.0.4", "PTR")]
    assert c["status"] == "fail" and "DNS lookup of 4.0.0.127.in-addr.arpa PTR failed" in c["detail"]
    assert "no PTR record" not in c["detail"] and "IN PTR" not in c["fix"], c
    c = got[("127.0.0.8", "SPF helo")]
    assert c["ehlo"] == "broken.example.test" and c["status"] == "fail", c
    assert "failed" in c["detail"] and c["fix"] == "", c
    # the HELO identity has no SPF record: publish one
    c = got[("127.0.0.5", "SPF helo")]
    assert c["status"] == "warn" and "no SPF record at the EHLO name out5.example.test" in c["detail"]
    assert c["fix"] == 'out5.example.test. IN TXT "v=spf1 ip4:127.0.0.5 -all"'
    # the pool's name, said without its trailing dot; its SPF does not list the IP
    c = got[("127.0.0.7", "SPF helo")]
    assert c["ehlo"] == "mta.example.test" and c["status"] == "fail", c
    assert c["fix"] == 'mta.example.test. IN TXT "v=spf1 ip4:127.0.0.7 ip4:127.0.0.70 -all"'
    assert got[("127.0.0.7", "PTR")]["fix"].startswith("7.0.0.127.in-addr.arpa. IN PTR mta.example.test.")
    # the text report lists the records to publish
    rc, text, err = check_ip(dns_server, tmp_path, toml=toml)
    assert rc == 1 and "records to add or change:" in text
    assert 'out5.example.test. IN TXT "v=spf1 ip4:127.0.0.5 -all"' in text
    assert "no blocklists" in err


def test_check_ip_passes_a_sound_ip_and_checks_ipv6(dns_server: DNSServer, tmp_path: Path) -> None:
    dns_server.set_zones(ZONES)
    rc, doc, _ = check_ip(dns_server, tmp_path, "127.0.0.2", V6, "--json")
    assert rc == 0, doc
    assert all(d["status"] == "pass" for d in doc), doc
    assert by(doc)[(V6, "PTR")]["ehlo"] == "v6.example.test"
    # --helo: the name said from every IP; a short name fails, with no SPF to check
    rc, doc, _ = check_ip(dns_server, tmp_path, "127.0.0.2", "--helo", "localhost", "--json")
    assert rc == 1
    c = by(doc)[("127.0.0.2", "PTR")]
    assert c["status"] == "fail" and "not a fully qualified domain name" in c["detail"]
    assert by(doc)[("127.0.0.2", "SPF helo")]["status"] == "warn"


def test_helo_spf_follows_rfc7208(dns_server: DNSServer) -> None:
    dns_server.set_zones({
        "a.example.test": [("A", "127.0.0.2"), ("TXT", "v=spf1 a ~all")],
        "b.example.test": [("TXT", "v=spf1 -all"), ("TXT", "v=spf1 a -all")],
        "c.example.test": [("TXT", "v=spf1 a:127.0.0.2 -all")],
    })  # fmt: skip
    look = make_lookup([dns_server.nameserver])
    assert check_helo_spf("127.0.0.2", "a.example.test.", look).status == "pass"
    c = check_helo_spf("127.0.0.3", "a.example.test", look)
    assert c.status == "warn" and "softfail" in c.detail, c
    c = check_helo_spf("127.0.0.2", "b.example.test", look)
    assert c.status == "fail" and "2 SPF records" in c.detail and "ip4:127.0.0.2" in c.fix
    c = check_helo_spf("127.0.0.2", "c.example.test", look)
    assert c.status == "fail" and "permerror" in c.detail
    assert c.fix == 'c.example.test. IN TXT "v=spf1 ip4:127.0.0.2 -all"'
    assert check_helo_spf("127.0.0.2", "[127.0.0.2]", look).status == "warn"


def test_one_is_ip_for_the_checks() -> None:
    """authcheck/mx.py and authcheck/spf.py each had their own copy."""
    from fastsend import hostname
    from fastsend.authcheck import mx, spf

    assert mx.is_ip is hostname.is_ip and spf.is_ip is hostname.is_ip
    assert hostname.is_ip("192.0.2.1.") and hostname.is_ip("2001:db8::1")
    assert not hostname.is_ip("mx.example.com") and not hostname.is_ip("")


def test_nameservers_that_never_answer_are_waited_for_once() -> None:
    """check-ip over a pool of IPs (and check-domain) with a nameserver that
    never answers: before, every lookup waited out its own timeout (one query, or
    more, per IP: minutes over a pool); now the first timeout fails the rest at
    once, each a failure that says the lookup failed, with nothing to publish."""
    import socket

    from fastsend.authcheck.ptr import check_ptr

    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    quiet.bind(("127.0.0.1", 0))
    quiet.setblocking(False)
    try:
        look = make_lookup([f"127.0.0.1:{quiet.getsockname()[1]}"], 0.5, 0.5)
        checks = [check_ptr(f"127.0.0.{i}", "example.test", look) for i in range(2, 12)]
        asked = 0
        while True:
            try:
                quiet.recv(4096)
            except BlockingIOError:
                break
            asked += 1
    finally:
        quiet.close()
    assert all(c.status == "fail" and "failed" in c.detail and not c.fix for c in checks)
    assert 1 <= asked <= 3, asked  # one lookup (and its retries), not one per IP
