"""``check_domain`` against the loopback DNS server: one good zone and, per check,
table-driven broken variants (MX, SPF, DKIM, DMARC, alignment, PTR/FCrDNS)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastsend.authcheck import check_domain, org_domain, parse_dmarc
from fastsend.message.keys import generate, load_private_key, public_p, public_txt, write_key
from fastsend.testing.dnsserver import DNSServer

Zones = dict[str, list[tuple[str, str]]]
D = "example.test"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name, alg, bits in (("ed", "ed25519", 0), ("rsa", "rsa", 2048), ("rsa1024", "rsa", 1024)):
        p = d / f"{name}.pem"
        write_key(generate(alg, bits) if bits else generate(alg), p)
        out[name] = str(p)
    return out


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer({}) as server:
        yield server


def txt(path: str) -> str:
    return public_txt(load_private_key(path))


def good(keys: dict[str, str]) -> Zones:
    return {
        D: [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 include:_spf.example.test -all")],
        "_spf.example.test": [("TXT", "v=spf1 ip6:2001:db8::/64 a:out1.example.test ~all")],
        "mx1.example.test": [("A", "127.0.0.1")],
        "out1.example.test": [("A", "127.0.0.2"), ("AAAA", "2001:db8::2")],
        "s1._domainkey.example.test": [("TXT", txt(keys["ed"]))],
        "_dmarc.example.test": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.test")],
        "2.0.0.127.in-addr.arpa": [("PTR", "out1.example.test.")],
        "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": [
            ("PTR", "out1.example.test.")
        ],
    }


def run(dns: DNSServer, zones: Zones, keyfiles: dict[str, str], **kw: Any) -> dict[str, Any]:
    dns.set_zones(zones)
    args: dict[str, Any] = {"ips": ["127.0.0.2"], "keys": [("s1", keyfiles["ed"])]}
    args.update(kw)
    domain = args.pop("domain", D)
    checks = check_domain(domain, nameservers=[dns.nameserver], **args)
    return {c.name: c for c in checks}


def test_good_zone_all_pass(dns: DNSServer, keys: dict[str, str]) -> None:
    got = run(dns, good(keys), keys, ips=["127.0.0.2", "2001:db8::2"])
    assert {n: c.status for n, c in got.items()} == {
        "MX": "pass", "SPF": "pass", "DKIM s1": "pass", "DMARC": "pass", "alignment": "pass",
        "PTR 127.0.0.2": "pass", "PTR 2001:db8::2": "pass"}  # fmt: skip
    assert "127.0.0.2: pass via include:_spf.example.test > a:out1.example.test" in got["SPF"].notes
    assert "2001:db8::2: pass via include:_spf.example.test > ip6:2001:db8::/64" in got["SPF"].notes
    assert all(c.fix == "" for c in got.values())


Mutate = Callable[[Zones, dict[str, str]], None]


def put(name: str, *recs: tuple[str, str]) -> Mutate:
    def f(z: Zones, k: dict[str, str]) -> None:
        if recs:
            z[name] = list(recs)
        else:
            z.pop(name, None)

    return f


def mx(*recs: str) -> Mutate:
    def f(z: Zones, k: dict[str, str]) -> None:
        z[D] = [r for r in z[D] if r[0] != "MX"] + [("MX", r) for r in recs]

    return f


def spf(*recs: str) -> Mutate:
    def f(z: Zones, k: dict[str, str]) -> None:
        z[D] = [r for r in z[D] if r[0] != "TXT"] + [("TXT", r) for r in recs]

    return f


def dkim(fmt: str) -> Mutate:
    """A key record built from ``fmt`` with {p} (the ed25519 key), {prsa}, {p1024}."""

    def f(z: Zones, k: dict[str, str]) -> None:
        ps = {n: public_p(load_private_key(p)) for n, p in k.items()}
        z["s1._domainkey.example.test"] = [
            ("TXT", fmt.format(p=ps["ed"], prsa=ps["rsa"], p1024=ps["rsa1024"], p512=P512))
        ]

    return f


def _p512() -> str:
    pub = rsa.RSAPublicNumbers(65537, (1 << 511) + 0x2468ACF1).public_key()
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


P512 = _p512()

# (id, mutations, check_domain kwargs (key names resolved), check, status, fragment in notes/fix)
# fmt: off
CASES: list[tuple[str, list[Mutate], dict[str, Any], str, str, str]] = [
    # MX
    ("mx-none-a", [mx(), put(D, ("A", "127.0.0.5"), ("TXT", "v=spf1 a:out1.example.test -all"))], {}, "MX", "warn", "implicit MX"),
    ("mx-none", [mx()], {}, "MX", "fail", "example.test. IN MX 10 mx.example.test."),
    ("mx-null", [mx("0 .")], {}, "MX", "fail", "null MX"),
    ("mx-null-mixed", [mx("0 .", "10 mx1.example.test.")], {}, "MX", "fail", "mixed"),
    ("mx-ip-literal", [mx("10 127.0.0.1.")], {}, "MX", "fail", "IP address literal"),
    ("mx-cname", [mx("10 alias.example.test."), put("alias.example.test", ("CNAME", "mx1.example.test."))], {}, "MX", "warn", "example.test. IN MX 10 mx1.example.test."),
    ("mx-no-address", [mx("10 gone.example.test.")], {}, "MX", "fail", "no A/AAAA"),
    # SPF
    ("spf-none", [spf()], {}, "SPF", "fail", 'example.test. IN TXT "v=spf1 ip4:127.0.0.2 -all"'),
    ("spf-ip-not-authorised", [spf("v=spf1 ip4:192.0.2.0/24 -all")], {}, "SPF", "fail", 'IN TXT "v=spf1 ip4:127.0.0.2 ip4:192.0.2.0/24 -all"'),
    ("spf-two", [spf("v=spf1 a:out1.example.test -all", "v=spf1 mx ~all")], {}, "SPF", "fail", '"v=spf1 ip4:127.0.0.2 a:out1.example.test mx -all"'),
    ("spf-syntax", [spf("v=spf1 ip4:127.0.0.2 include -all")], {}, "SPF", "fail", "syntax error"),
    ("spf-plus-all", [spf("v=spf1 +all")], {}, "SPF", "fail", "every IP"),
    ("spf-no-all", [spf("v=spf1 ip4:127.0.0.2")], {}, "SPF", "warn", '"v=spf1 ip4:127.0.0.2 -all"'),
    ("spf-covers-test-net", [spf("v=spf1 ip4:127.0.0.2 ip4:192.0.2.0/24 -all")], {}, "SPF", "pass", "unauthorised IPs get fail (-all)"),
    ("spf-no-all-one-fix", [spf("v=spf1 ip4:192.0.2.0/24 ?all")], {}, "SPF", "fail", '"v=spf1 ip4:127.0.0.2 ip4:192.0.2.0/24 -all"'),
    ("spf-ptr", [spf("v=spf1 ptr -all")], {}, "SPF", "warn", "ptr is discouraged"),
    ("spf-too-many-lookups", [spf("v=spf1 ip4:127.0.0.2 " + " ".join(f"a:out1.example.test/{n}" for n in range(20, 31)) + " -all")], {}, "SPF", "fail", "more than 10 DNS lookups"),
    ("spf-void", [spf("v=spf1 ip4:127.0.0.2 a:nx1.example.test a:nx2.example.test a:nx3.example.test -all")], {}, "SPF", "fail", "void"),
    ("spf-include-loop", [spf("v=spf1 ip4:127.0.0.2 include:example.test -all")], {}, "SPF", "fail", "loop"),
    ("spf-macro-exists", [spf("v=spf1 exists:%{i}._ip.%{d} -all"), put("127.0.0.2._ip.example.test", ("A", "127.0.0.2"))], {}, "SPF", "pass", "via exists:%{i}._ip.%{d}"),
    ("spf-redirect", [spf("v=spf1 redirect=_spf.example.test")], {}, "SPF", "pass", "redirect=_spf.example.test > a:out1.example.test"),
    ("spf-exp-ignored", [spf("v=spf1 ip4:127.0.0.2 -all exp=why.%{d}")], {}, "SPF", "pass", "ip4:127.0.0.2"),
    # DKIM
    ("dkim-rsa-2048", [], {"keys": [("s1", "rsa")]}, "DKIM s1", "fail", "k=ed25519 but"),
    ("dkim-rsa-good", [dkim("v=DKIM1; k=rsa; p={prsa}")], {"keys": [("s1", "rsa")]}, "DKIM s1", "pass", "matches"),
    ("dkim-rsa-no-k", [dkim("v=DKIM1; p={prsa}")], {"keys": [("s1", "rsa")]}, "DKIM s1", "pass", "matches"),
    ("dkim-rsa-1024", [dkim("v=DKIM1; k=rsa; p={p1024}")], {"keys": [("s1", "rsa1024")]}, "DKIM s1", "warn", "1024 bits"),
    ("dkim-rsa-512", [dkim("v=DKIM1; k=rsa; p={p512}")], {"keys": [("s1", "rsa")]}, "DKIM s1", "fail", "< 1024"),
    ("dkim-missing", [put("s1._domainkey.example.test")], {}, "DKIM s1", "fail", 's1._domainkey.example.test. IN TXT "v=DKIM1; k=ed25519; p='),
    ("dkim-revoked", [dkim("v=DKIM1; k=ed25519; p=")], {}, "DKIM s1", "fail", "revoked"),
    ("dkim-k-mismatch", [dkim("v=DKIM1; k=rsa; p={p}")], {}, "DKIM s1", "fail", "k=rsa but"),
    ("dkim-testing", [dkim("v=DKIM1; k=ed25519; t=y; p={p}")], {}, "DKIM s1", "warn", "t=y"),
    ("dkim-hash-sha1", [dkim("v=DKIM1; k=ed25519; h=sha1; p={p}")], {}, "DKIM s1", "fail", "h=sha1"),
    ("dkim-hash-ok", [dkim("v=DKIM1; k=ed25519; h=sha1:sha256; p={p}")], {}, "DKIM s1", "pass", "matches"),
    ("dkim-version", [dkim("v=DKIM2; k=ed25519; p={p}")], {}, "DKIM s1", "fail", "must be DKIM1"),
    ("dkim-v-not-first", [dkim("k=ed25519; v=DKIM1; p={p}")], {}, "DKIM s1", "fail", "first tag"),
    ("dkim-service", [dkim("v=DKIM1; k=ed25519; s=tlsrpt; p={p}")], {}, "DKIM s1", "fail", "does not allow email"),
    ("dkim-other-key", [dkim("v=DKIM1; k=rsa; p={prsa}")], {"keys": [("s1", "rsa1024")]}, "DKIM s1", "fail", "does not match"),
    ("dkim-two-records", [put("s1._domainkey.example.test", ("TXT", "v=DKIM1; k=ed25519; p=AAAA"), ("TXT", "v=DKIM1; k=ed25519; p=BBBB"))], {}, "DKIM s1", "fail", "2 key records"),
    ("dkim-bad-base64", [dkim("v=DKIM1; k=ed25519; p=!!!")], {}, "DKIM s1", "fail", "base64"),
    # DMARC
    ("dmarc-none", [put("_dmarc.example.test")], {}, "DMARC", "fail", '_dmarc.example.test. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.test"'),
    ("dmarc-p-none", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=none; rua=mailto:d@example.test"))], {}, "DMARC", "warn", '"v=DMARC1; p=quarantine; rua=mailto:d@example.test"'),
    ("dmarc-two", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none"))], {}, "DMARC", "fail", "2 DMARC records"),
    ("dmarc-bad-p", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=block; rua=mailto:d@example.test"))], {}, "DMARC", "fail", "p=block"),
    ("dmarc-no-p", [put("_dmarc.example.test", ("TXT", "v=DMARC1; rua=mailto:d@example.test"))], {}, "DMARC", "fail", "no p= tag"),
    ("dmarc-bad-adkim", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; adkim=x; rua=mailto:d@example.test"))], {}, "DMARC", "fail", "adkim=x"),
    ("dmarc-bad-pct", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; pct=150; rua=mailto:d@example.test"))], {}, "DMARC", "fail", "pct=150"),
    ("dmarc-bad-rua", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; rua=d@example.test"))], {}, "DMARC", "fail", "bad URI"),
    ("dmarc-pct", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; pct=25; rua=mailto:d@example.test"))], {}, "DMARC", "warn", "pct=25"),
    ("dmarc-no-rua", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject"))], {}, "DMARC", "warn", '"v=DMARC1; p=reject; rua=mailto:dmarc-reports@example.test"'),
    ("dmarc-rua-external", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; rua=mailto:x@reports.test"))], {}, "DMARC", "warn", 'example.test._report._dmarc.reports.test. IN TXT "v=DMARC1"'),
    ("dmarc-rua-external-ok", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; rua=mailto:x@reports.test")), put("example.test._report._dmarc.reports.test", ("TXT", "v=DMARC1"))], {}, "DMARC", "pass", "p=reject"),
    ("dmarc-unknown-tag", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.test; adkm=s"))], {}, "DMARC", "warn", "adkm"),
    # subdomain: discovery at the organizational domain and sp=
    ("dmarc-org-discovery", [], {"domain": "news.example.test"}, "DMARC", "pass", "record at _dmarc.example.test"),
    ("dmarc-sp-none", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; sp=none; rua=mailto:d@example.test"))], {"domain": "news.example.test"}, "DMARC", "warn", "sp=quarantine"),
    ("dmarc-sp-reject", [put("_dmarc.example.test", ("TXT", "v=DMARC1; p=none; sp=reject; rua=mailto:d@example.test"))], {"domain": "news.example.test"}, "DMARC", "pass", "policy for news.example.test is reject"),
    ("dmarc-own-record", [put("_dmarc.news.example.test", ("TXT", "v=DMARC1; p=quarantine; rua=mailto:d@example.test"))], {"domain": "news.example.test"}, "DMARC", "pass", "record at _dmarc.news.example.test"),
    # PSL: example.co.uk's record, never co.uk's
    ("psl-co-uk", [put("_dmarc.example.co.uk", ("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.co.uk"))], {"domain": "mail.example.co.uk"}, "DMARC", "pass", "record at _dmarc.example.co.uk"),
    ("psl-not-suffix", [put("_dmarc.co.uk", ("TXT", "v=DMARC1; p=reject"))], {"domain": "mail.example.co.uk"}, "DMARC", "fail", "_dmarc.mail.example.co.uk or _dmarc.example.co.uk"),
    # alignment
    ("align-relaxed-dkim", [put("s1._domainkey.mail.example.test", ("TXT", "<ed>"))], {"dkim_domain": "mail.example.test"}, "alignment", "pass", "d=mail.example.test aligned (relaxed)"),
    ("align-strict-dkim", [put("s1._domainkey.mail.example.test", ("TXT", "<ed>")), put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; adkim=s; rua=mailto:d@example.test"))], {"dkim_domain": "mail.example.test"}, "alignment", "warn", "NOT aligned with example.test (strict)"),
    ("align-strict-both", [put("s1._domainkey.mail.example.test", ("TXT", "<ed>")), put("_dmarc.example.test", ("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s; rua=mailto:d@example.test")), put("bounce.example.test", ("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 -all"))], {"dkim_domain": "mail.example.test", "return_path_domain": "bounce.example.test"}, "alignment", "fail", "return path bounce.example.test NOT aligned"),
    ("align-relaxed-rp", [put("bounce.example.test", ("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 -all"))], {"return_path_domain": "bounce.example.test", "keys": []}, "alignment", "warn", "only SPF aligns"),
    ("align-other-org", [put("s1._domainkey.esp.test", ("TXT", "<ed>"))], {"dkim_domain": "esp.test", "ips": ["127.0.0.9"]}, "alignment", "fail", "d=esp.test NOT aligned"),
    ("align-rp-spf", [put("bounce.example.test", ("MX", "10 mx1.example.test."))], {"return_path_domain": "bounce.example.test"}, "SPF", "fail", "no SPF record at bounce.example.test"),
    ("align-rp-mx", [put("bounce.example.test", ("MX", "0 ."), ("TXT", "v=spf1 ip4:127.0.0.2 -all"))], {"return_path_domain": "bounce.example.test"}, "MX bounce.example.test", "fail", "null MX"),
    # PTR / FCrDNS
    ("ptr-none", [put("2.0.0.127.in-addr.arpa")], {}, "PTR 127.0.0.2", "fail", "2.0.0.127.in-addr.arpa. IN PTR out.example.test."),
    ("ptr-no-forward", [put("2.0.0.127.in-addr.arpa", ("PTR", "ghost.example.test."))], {}, "PTR 127.0.0.2", "fail", "ghost.example.test. IN A 127.0.0.2"),
    ("ptr-wrong-forward", [put("2.0.0.127.in-addr.arpa", ("PTR", "mx1.example.test."))], {}, "PTR 127.0.0.2", "fail", "resolves to 127.0.0.1, not 127.0.0.2"),
    ("ptr-two", [put("2.0.0.127.in-addr.arpa", ("PTR", "out1.example.test."), ("PTR", "mx1.example.test."))], {}, "PTR 127.0.0.2", "warn", "2 PTR records"),
    ("ptr-generic", [put("2.0.0.127.in-addr.arpa", ("PTR", "127-0-0-2.dyn.isp.test.")), put("127-0-0-2.dyn.isp.test", ("A", "127.0.0.2"))], {}, "PTR 127.0.0.2", "warn", "generic"),
    ("ptr-ipv6-none", [], {"ips": ["2001:db8::3"]}, "PTR 2001:db8::3", "fail", "ip6.arpa. IN PTR out.example.test."),
]
# fmt: on


@pytest.mark.parametrize(
    ("mutations", "kwargs", "check", "status", "fragment"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_zone_case(
    dns: DNSServer,
    keys: dict[str, str],
    mutations: list[Mutate],
    kwargs: dict[str, Any],
    check: str,
    status: str,
    fragment: str,
) -> None:
    zones = good(keys)
    for m in mutations:
        m(zones, keys)
    for recs in zones.values():
        recs[:] = [(t, txt(keys["ed"]) if v == "<ed>" else v) for t, v in recs]
    kw = dict(kwargs)
    if "keys" in kw:
        kw["keys"] = [(sel, keys[name]) for sel, name in kw["keys"]]
    got = run(dns, zones, keys, **kw)
    c = got[check]
    assert c.status == status, c
    assert fragment in c.detail + "\n" + c.fix, c
    if status != "pass":
        assert c.fix or check in ("alignment",) or "syntax" in c.detail or "lookups" in c.detail \
            or "void" in c.detail or "loop" in c.detail or "mixed" in c.detail \
            or "1024 bits" in c.detail or "ptr" in c.detail or "records" in c.detail \
            or "pct" in c.detail or "adkm" in c.detail or "generic" in c.detail, c  # fmt: skip


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("a.b.example.com", "example.com"),
        ("mail.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("x.y.example.com.au", "example.com.au"),
        ("news.example.test", "example.test"),
        ("Example.COM.", "example.com"),
    ],
)
def test_org_domain_uses_psl(domain: str, org: str) -> None:
    assert org_domain(domain) == org


def test_parse_dmarc_tags() -> None:
    tags, errors, warns = parse_dmarc("v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=r; "
                                      "pct=100; fo=0:d; ri=86400; rua=mailto:a@x.test!10m,"
                                      "mailto:b@y.test; ruf=mailto:f@x.test;")  # fmt: skip
    assert errors == [] and warns == [] and tags["sp"] == "quarantine"
    assert parse_dmarc("p=reject; v=DMARC1")[1]  # v= not first
    assert parse_dmarc("v=DMARC1; p=reject; p=none")[1]  # duplicate tag
    assert parse_dmarc("v=DMARC1; p=reject; fo=2")[1]


# --- the CLI, as a user runs it ------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "fastsend", "check-domain", *args],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip


def test_cli_subprocess_json_table_and_exit_codes(
    dns: DNSServer, keys: dict[str, str], tmp_path: Path
) -> None:
    dns.set_zones(good(keys))
    base = ["--ip", "127.0.0.2", "--selector", "s1", "--key", keys["ed"],
            "--nameserver", dns.nameserver]  # fmt: skip
    r = cli(D, *base, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["domain"] == D and doc["status"] == "pass"
    assert doc["organizational_domain"] == D and doc["org_source"] == "psl"
    assert doc["summary"] == {"pass": 6, "warn": 0, "fail": 0} and doc["records"] == []
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail", "notes", "fix"}
    # broken: SPF does not authorise the IP, no DMARC: exit 1, table with the records
    zones = good(keys)
    spf("v=spf1 ip4:192.0.2.0/24 -all")(zones, keys)
    del zones["_dmarc.example.test"]
    dns.set_zones(zones)
    r = cli(D, *base)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("FAIL  SPF ") for line in lines)
    assert any(line.startswith("PASS  DKIM s1 ") for line in lines)
    assert "records to add or change:" in r.stdout
    assert '  example.test. IN TXT "v=spf1 ip4:127.0.0.2 ip4:192.0.2.0/24 -all"' in lines
    assert '  _dmarc.example.test. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.test"' in lines  # fmt: skip
    assert all(len(line) <= 100 for line in lines if not line.startswith("  "))
    r = cli(D, *base, "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["status"] == "fail" and doc["summary"]["fail"] == 2
    assert 'example.test. IN TXT "v=spf1 ip4:127.0.0.2 ip4:192.0.2.0/24 -all"' in doc["records"]
    # bad arguments: exit 2
    assert cli(D, "--ip", "nope").returncode == 2
    assert cli(D, "--selector", "s1").returncode == 2
    missing = tmp_path / "missing.pem"
    assert cli(D, "--selector", "s1", "--key", str(missing), "--nameserver", dns.nameserver).returncode == 2  # fmt: skip
