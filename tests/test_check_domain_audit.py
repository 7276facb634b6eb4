"""check-domain audit (session 13): DNS failures are not missing records, RFC 7208
domain-spec syntax, strict CIDR lengths, DMARC records a receiver would still see,
external ruf authorisation. On the loopback DNS server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import RCODE

from fastsend.authcheck import check_domain, make_lookup
from fastsend.authcheck.spf import check_host, parse_record
from fastsend.message.keys import generate, load_private_key, public_txt, write_key
from fastsend.testing.dnsserver import DNSServer

D = "example.test"


@pytest.fixture(scope="module")
def dns() -> Iterator[tuple[DNSServer, set[str]]]:
    """The loopback server; names put in the returned set answer SERVFAIL."""
    servfail: set[str] = set()
    with DNSServer({}) as server:
        real = server.resolver.resolve

        def resolve(request: Any, handler: Any) -> Any:
            if str(request.q.qname).rstrip(".").lower() in servfail:
                reply = request.reply()
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            return real(request, handler)

        server.resolver.resolve = resolve  # the server asks its resolver per query
        yield server, servfail


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("k") / "ed.pem"
    write_key(generate("ed25519"), p)
    return str(p)


def zones(key: str) -> dict[str, list[tuple[str, str]]]:
    return {
        D: [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 -all")],
        "mx1.example.test": [("A", "127.0.0.1")],
        "out1.example.test": [("A", "127.0.0.2")],
        "s1._domainkey.example.test": [("TXT", public_txt(load_private_key(key)))],
        "_dmarc.example.test": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.test")],
        "2.0.0.127.in-addr.arpa": [("PTR", "out1.example.test.")],
    }


def run(dns: tuple[DNSServer, set[str]], z: dict[str, Any], key: str, fail: set[str],
        **kw: Any) -> dict[str, Any]:  # fmt: skip
    server, servfail = dns
    server.set_zones(z)
    servfail.clear()
    servfail.update(fail)
    try:
        checks = check_domain(D, ["127.0.0.2"], [("s1", key)], [server.nameserver], **kw)
    finally:
        servfail.clear()
    return {c.name: c for c in checks}


@pytest.mark.parametrize(
    ("failing", "check", "record_hint"),
    [
        ("example.test", "SPF", "IN TXT"),
        ("_dmarc.example.test", "DMARC", "IN TXT"),
        ("s1._domainkey.example.test", "DKIM s1", "IN TXT"),
        ("2.0.0.127.in-addr.arpa", "PTR 127.0.0.2", "IN PTR"),
    ],
)
def test_dns_failure_is_not_a_missing_record(
    dns: tuple[DNSServer, set[str]], key: str, failing: str, check: str, record_hint: str
) -> None:
    """A SERVFAIL at the record's name says the lookup failed, and never tells the
    operator to publish a record they already have (a second SPF or DMARC record
    breaks both: permerror, DMARC not applied)."""
    got = run(dns, zones(key), key, {failing})
    c = got[check]
    assert c.status == "fail", c
    assert "DNS" in c.detail and "no SPF record" not in c.detail, c
    assert not c.detail.startswith("no "), c
    assert record_hint not in c.fix, c
    assert got["DNS"].status == "warn"


def test_dns_failure_at_mx(dns: tuple[DNSServer, set[str]], key: str) -> None:
    got = run(dns, zones(key), key, {"example.test"})
    c = got["MX"]
    assert c.status == "fail" and "DNS" in c.detail and "IN MX" not in c.fix, c


def test_dns_failure_at_mx_host(dns: tuple[DNSServer, set[str]], key: str) -> None:
    got = run(dns, zones(key), key, {"mx1.example.test"})
    c = got["MX"]
    assert c.status == "fail" and "DNS" in c.detail and "IN A" not in c.fix, c


def test_dns_failure_at_dmarc_falls_back_nowhere(dns: tuple[DNSServer, set[str]], key: str) -> None:
    """A subdomain whose own _dmarc name fails: not judged by the organizational record."""
    server, servfail = dns
    server.set_zones(zones(key))
    servfail.update({"_dmarc.news.example.test"})
    try:
        checks = {
            c.name: c for c in check_domain("news.example.test", nameservers=[server.nameserver])
        }
    finally:
        servfail.clear()
    c = checks["DMARC"]
    assert c.status == "fail" and "DNS" in c.detail and c.fix == "", c


# --- SPF domain-spec syntax (RFC 7208 7.1 / 4.8: domain-end needs a toplabel) ---


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 a:192.0.2.5 -all",  # an address where ip4: was meant
        "v=spf1 mx:192.0.2.5 -all",
        "v=spf1 include:spfhost -all",  # one label
        "v=spf1 a:museum. -all",
        "v=spf1 exists:foo.example.1 -all",  # numeric toplabel
        "v=spf1 redirect=192.0.2.5",
        "v=spf1 ip4:192.0.2.5/ -all",  # CIDR without digits
        "v=spf1 ip4:192.0.2.0/024 -all",  # leading zero in a CIDR length
        "v=spf1 a:example.test/024 -all",
        "v=spf1 ip6:2001:db8::/ -all",
    ],
)
def test_spf_bad_domain_spec_or_cidr_is_permerror(
    dns: tuple[DNSServer, set[str]], record: str
) -> None:
    server, _ = dns
    server.set_zones({"bad.test": [("TXT", record)], "192.0.2.5": [("A", "192.0.2.5")]})
    look = make_lookup([server.nameserver])
    with pytest.raises(ValueError):
        parse_record(record)
    assert check_host("192.0.2.5", "bad.test", look.query).result == "permerror"


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 a:mail.example.test -all",
        "v=spf1 a:mail.example.test. -all",
        "v=spf1 a:e.b-c -all",
        "v=spf1 a:foo.x1 -all",
        "v=spf1 exists:%{i}._spf.%{d} -all",
        "v=spf1 exists:%{ir}.%{d2} -all",
        "v=spf1 include:%{d} -all",
        "v=spf1 a/24 mx//64 -all",
        "v=spf1 ip4:0.0.0.0/0 -all",
        "v=spf1 redirect=_spf.example.test",
    ],
)
def test_spf_good_domain_specs_parse(record: str) -> None:
    parse_record(record)


def test_spf_check_reports_address_in_a_mechanism(
    dns: tuple[DNSServer, set[str]], key: str
) -> None:
    """The common mistake 'a:<address>': permerror at receivers, so a FAIL naming it."""
    z = zones(key)
    z[D] = [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 a:127.0.0.2 -all")]
    got = run(dns, z, key, set())
    c = got["SPF"]
    assert c.status == "fail" and "permerror" in c.detail and "a:127.0.0.2" in c.detail, c
    assert c.fix == 'example.test. IN TXT "v=spf1 ip4:127.0.0.2 -all"', c


# --- DMARC -------------------------------------------------------------------


def test_dmarc_record_missing_semicolon_is_a_syntax_error_not_absent(
    dns: tuple[DNSServer, set[str]], key: str
) -> None:
    """'v=DMARC1 p=reject' is a broken record at _dmarc (receivers that match on the
    v=DMARC1 prefix see it): report it and replace it, never 'add a record'."""
    z = zones(key)
    z["_dmarc.example.test"] = [("TXT", "v=DMARC1 p=reject")]
    got = run(dns, z, key, set())
    c = got["DMARC"]
    assert c.status == "fail" and "no DMARC record" not in c.detail, c
    assert "syntax" in c.detail, c


def test_dmarc_external_ruf_needs_authorisation(dns: tuple[DNSServer, set[str]], key: str) -> None:
    z = zones(key)
    z["_dmarc.example.test"] = [
        ("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.test; ruf=mailto:f@forensic.test")
    ]
    got = run(dns, z, key, set())
    c = got["DMARC"]
    assert c.status == "warn" and "ruf mailto:f@forensic.test" in c.detail, c
    assert 'example.test._report._dmarc.forensic.test. IN TXT "v=DMARC1"' in c.fix
    z["example.test._report._dmarc.forensic.test"] = [("TXT", "v=DMARC1")]
    got = run(dns, z, key, set())
    assert got["DMARC"].status == "pass", got["DMARC"]


def test_cli_dns_failure_exits_one(
    dns: tuple[DNSServer, set[str]], key: str, tmp_path: Path
) -> None:
    import json
    import os
    import subprocess
    import sys

    server, servfail = dns
    server.set_zones(zones(key))
    servfail.update({"example.test"})
    try:
        r = subprocess.run(
            [sys.executable, "-m", "fastsend", "check-domain", D, "--ip", "127.0.0.2",
             "--selector", "s1", "--key", key, "--nameserver", server.nameserver, "--json"],
            capture_output=True, text=True, timeout=60, env={**os.environ},
        )  # fmt: skip
    finally:
        servfail.clear()
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert not any('IN TXT "v=spf1' in rec for rec in doc["records"]), doc["records"]


def test_cli_config_checks_the_pools_ips_keys_and_nameservers(
    dns: tuple[DNSServer, set[str]], key: str, tmp_path: Path
) -> None:
    """``check-domain -c fastsend.toml``: the source IPs and every pool's addresses, the
    config's DKIM keys for the domain and its [dns] nameservers, as the MTA will send."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    server, _ = dns
    z = zones(key)
    z["3.0.0.127.in-addr.arpa"] = [("PTR", "out2.example.test.")]
    z["out2.example.test"] = [("A", "127.0.0.3")]
    server.set_zones(z)
    shutil.copy(key, tmp_path / "ed.pem")
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        '[ips]\nsource = ["127.0.0.2", "127.0.0.3"]\nhelo = "out1.example.test"\n'
        '[pools.main]\nips = [{ ip = "127.0.0.3", ehlo = "out2.example.test" }]\n'
        f'[dns]\nnameservers = ["{server.nameserver}"]\n'
        '[[dkim]]\ndomain = "example.test"\nselector = "s1"\nkey = "ed.pem"\n'
        '[[dkim]]\ndomain = "other.test"\nselector = "s9"\nkey = "ed.pem"\n'
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fastsend", "check-domain", *args],
                              capture_output=True, text=True, timeout=60, env={**os.environ})  # fmt: skip

    r = cli(D, "-c", str(cfg), "--json")
    doc = json.loads(r.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    # 127.0.0.3 (the pool's address) is not in the SPF record: found and failed
    assert checks["SPF"]["status"] == "fail", checks["SPF"]
    assert "127.0.0.3: fail" in checks["SPF"]["detail"]
    assert "127.0.0.2: pass" in checks["SPF"]["detail"]
    assert checks["DKIM s1"]["status"] == "pass" and "DKIM s9" not in checks
    assert {"PTR 127.0.0.2", "PTR 127.0.0.3"} <= set(checks)
    assert r.returncode == 1
    z[D] = [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 ip4:127.0.0.3 -all")]
    server.set_zones(z)
    r = cli(D, "-c", str(cfg))
    assert r.returncode == 0, r.stdout
    # flags override the config
    r = cli(D, "-c", str(cfg), "--ip", "127.0.0.2", "--json")
    assert "PTR 127.0.0.3" not in {c["name"] for c in json.loads(r.stdout)["checks"]}
    bad = tmp_path / "bad.toml"
    bad.write_text("[ips]\nsource = 5\n")
    r = cli(D, "-c", str(bad))
    assert r.returncode == 2 and "bad.toml" in r.stderr, r.stderr


def test_fix_records_are_valid_zone_file_lines(
    dns: tuple[DNSServer, set[str]], key: str, tmp_path: Path
) -> None:
    """A 2048-bit RSA key's TXT value is ~400 characters: the printed record splits it
    into character-strings of at most 255 (one longer string is a zone-file error:
    BIND's 'ran out of space', dnspython's 'string too long'), which DNS joins back."""
    from dns import zone as dnszone

    rsa_key = tmp_path / "rsa.pem"
    write_key(generate("rsa", 2048), rsa_key)
    want = public_txt(load_private_key(str(rsa_key)))
    assert len(want) > 255
    z = zones(key)
    del z["s1._domainkey.example.test"]
    z[D] = [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 a:mx1.example.test ?all")]
    got = run(dns, z, str(rsa_key), set())
    lines = [ln for c in got.values() for ln in c.fix.splitlines() if " IN TXT " in ln]
    assert len(lines) >= 2, got
    zone = dnszone.from_text("$TTL 300\n" + "\n".join(lines), origin="example.test.",
                             relativize=False, check_origin=False)  # fmt: skip
    rd = zone.find_rdataset("s1._domainkey.example.test.", "TXT")
    assert [b"".join(r.strings).decode() for r in rd] == [want]
    # and what check-domain reads back from the published split record is a match
    z["s1._domainkey.example.test"] = [("TXT", want)]
    assert run(dns, z, str(rsa_key), set())["DKIM s1"].status == "pass"


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("%{d2R}", "example.email"),  # ABNF literals are case-insensitive: "R" is "r"
        ("%{DR}", "com.example.email"),
        ("%{l1R-}", "strong"),
    ],
)
def test_spf_macro_upper_case_r_transformer(spec: str, want: str) -> None:
    from fastsend.authcheck.spf import expand_macros

    got = expand_macros(spec, "192.0.2.3", "email.example.com",
                        sender="strong-bad@email.example.com")  # fmt: skip
    assert got == want


def test_spf_every_ipv6_address_is_a_failure(dns: tuple[DNSServer, set[str]], key: str) -> None:
    z = zones(key)
    z[D] = [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 ip6:::/0 -all")]
    c = run(dns, z, key, set())["SPF"]
    assert c.status == "fail" and "ip6:::/0 authorises every IPv6 address" in c.detail, c
    z[D] = [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 ip6:2001:db8::/32 -all")]
    c = run(dns, z, key, set())["SPF"]
    assert c.status == "pass", c


@pytest.mark.parametrize(
    "argv",
    [
        ["example..test"],
        ["https://example.test"],
        ["user@example.test"],
        ["example"],
        ["example.test", "--return-path-domain", "bounce..example.test"],
        ["example.test", "--dkim-domain", "mail example.test"],
    ],
)
def test_cli_bad_domain_exits_two_without_asking_dns(argv: list[str]) -> None:
    """A mistyped domain is a usage error naming it (exit 2), not a page of DNS failures."""
    import os
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "fastsend", "check-domain", *argv, "--nameserver", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )  # fmt: skip
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "not a domain name" in r.stderr and r.stdout == "", r.stderr


def test_spf_ptr_mechanism_dns_error_does_not_match(dns: tuple[DNSServer, set[str]]) -> None:
    """RFC 7208 5.5: a DNS error on the PTR lookup makes ptr not match (no temperror)."""
    server, servfail = dns
    server.set_zones({"ptr.test": [("TXT", "v=spf1 ptr ip4:192.0.2.5 -all")]})
    servfail.add("5.2.0.192.in-addr.arpa")
    try:
        look = make_lookup([server.nameserver])
        res = check_host("192.0.2.5", "ptr.test", look.query)
    finally:
        servfail.clear()
    assert (res.result, res.mechanism) == ("pass", "ip4:192.0.2.5"), res


def test_cli_config_checks_each_ips_ehlo_name(
    dns: tuple[DNSServer, set[str]], key: str, tmp_path: Path
) -> None:
    """The name fastsend says in EHLO from each IP (the pool's ehlo, else [ips] helo,
    else the IP's forward-confirmed PTR name): a fully qualified name that resolves to
    the IP, the PTR name."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    server, _ = dns
    z = zones(key)
    z[D] = [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 ip4:127.0.0.3 -all")]
    z["3.0.0.127.in-addr.arpa"] = [("PTR", "out2.example.test.")]
    z["out2.example.test"] = [("A", "127.0.0.3")]
    server.set_zones(z)
    shutil.copy(key, tmp_path / "ed.pem")

    def check(ips_section: str, *extra: str) -> dict[str, Any]:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[ips]\nsource = ["127.0.0.2", "127.0.0.3"]\n{ips_section}'
            f'[dns]\nnameservers = ["{server.nameserver}"]\n'
            '[[dkim]]\ndomain = "example.test"\nselector = "s1"\nkey = "ed.pem"\n'
        )
        r = subprocess.run(
            [sys.executable, "-m", "fastsend", "check-domain", D, "-c", str(cfg), "--json", *extra],
            capture_output=True, text=True, timeout=60, env={**os.environ},
        )  # fmt: skip
        doc = json.loads(r.stdout)
        return {"rc": r.returncode, **{c["name"]: c for c in doc["checks"]}}

    # no helo anywhere: each IP says its forward-confirmed PTR name (before: localhost)
    got = check("")
    assert got["rc"] == 0, got
    assert "EHLO out1.example.test resolves to 127.0.0.2" in got["PTR 127.0.0.2"]["detail"]
    assert "EHLO out2.example.test resolves to 127.0.0.3" in got["PTR 127.0.0.3"]["detail"]
    assert not any("localhost" in c["detail"] for k, c in got.items() if k != "rc")
    got = check('helo = "out1.example.test"\n'
                '[pools.main]\nips = [{ ip = "127.0.0.3", ehlo = "out2.example.test" }]\n')  # fmt: skip
    assert got["rc"] == 0, got
    assert "EHLO out1.example.test" in got["PTR 127.0.0.2"]["detail"]
    assert "EHLO out2.example.test" in got["PTR 127.0.0.3"]["detail"]
    # the global helo names another host for 127.0.0.3: it does not resolve to the IP
    got = check('helo = "out1.example.test"\n')
    c = got["PTR 127.0.0.3"]
    assert c["status"] == "fail" and "does not resolve to 127.0.0.3" in c["detail"], c
    # --helo says it for every IP
    got = check('helo = "out1.example.test"\n', "--helo", "mx1.example.test")
    assert got["PTR 127.0.0.2"]["status"] == "fail"


def test_cli_nameservers_keep_their_own_ports_and_bad_ones_exit_two(
    dns: tuple[DNSServer, set[str]], key: str
) -> None:
    import os
    import subprocess
    import sys

    server, _ = dns
    server.set_zones(zones(key))

    def cli(*ns: str) -> subprocess.CompletedProcess[str]:
        args = [a for n in ns for a in ("--nameserver", n)]
        return subprocess.run(
            [sys.executable, "-m", "fastsend", "check-domain", D, "--ip", "127.0.0.2",
             "--selector", "s1", "--key", key, *args],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )  # fmt: skip

    # the second server's port was used for both: every lookup went to 127.0.0.1:9
    r = cli(server.nameserver, "127.0.0.3:9")
    assert r.returncode == 0, r.stdout
    for bad in ("localhost", "127.0.0.1:port", "127.0.0.1:70000", "[::1"):
        r = cli(bad)
        assert r.returncode == 2 and "--nameserver" in r.stderr, (bad, r.stderr)
        assert "Traceback" not in r.stderr


def test_record_split_into_separate_txt_records_is_named(
    dns: tuple[DNSServer, set[str]], key: str, tmp_path: Path
) -> None:
    """A DNS panel's long value entered as two TXT records instead of one record of two
    strings: the second half is ignored by receivers; say so."""
    rsa_key = tmp_path / "rsa.pem"
    write_key(generate("rsa", 2048), rsa_key)
    value = public_txt(load_private_key(str(rsa_key)))
    z = zones(key)
    z[D] = [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2"),
            ("TXT", "include:_spf.esp.test -all")]  # fmt: skip
    z["s1._domainkey.example.test"] = [("TXT", value[:250]), ("TXT", value[250:])]
    got = run(dns, z, str(rsa_key), set())
    spf = got["SPF"]
    assert "'include:_spf.esp.test -all'" in spf.detail and "one TXT record" in spf.detail, spf
    assert spf.fix == 'example.test. IN TXT "v=spf1 ip4:127.0.0.2 include:_spf.esp.test -all"'
    dk = got["DKIM s1"]
    assert dk.status == "fail" and "one TXT record" in dk.detail, dk


def test_an_internationalised_domain_is_checked_in_a_labels(dns_server: DNSServer) -> None:
    """`check-domain bücher.example`: DNS holds the name in A-labels. Before, the
    U-label domain made its own DMARC rua look external (a false warning with an
    authorisation record to publish) and the records printed carried U-labels,
    which are not zone-file names."""
    a = "xn--bcher-kva.example"
    dns_server.set_zones({
        a: [("MX", f"10 mx.{a}."), ("TXT", "v=spf1 ip4:127.0.0.2 -all")],
        f"mx.{a}": [("A", "127.0.0.2")],
        f"_dmarc.{a}": [("TXT", f"v=DMARC1; p=reject; rua=mailto:d@{a}")],
    })  # fmt: skip
    from fastsend.authcheck import report

    for given in ("bücher.example", "BÜCHER.example.", a):
        checks = check_domain(given, ["127.0.0.2"], nameservers=[dns_server.nameserver])
        doc = report(given, checks)
        assert doc["domain"] == a, doc
        got = {c["name"]: c for c in doc["checks"]}
        assert got["DMARC"]["status"] == "pass", got["DMARC"]
        assert got["SPF"]["status"] == "pass"
        assert doc["records"] and all(r.isascii() for r in doc["records"]), doc["records"]
        assert f"2.0.0.127.in-addr.arpa. IN PTR out.{a}." in doc["records"]
