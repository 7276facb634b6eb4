"""The SPF evaluator (RFC 7208) against the real loopback DNS server, table-driven."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fastsend.authcheck import make_lookup
from fastsend.authcheck.spf import (
    DnsTempError,
    SpfResult,
    check_host,
    expand_macros,
    parse_record,
)
from fastsend.testing.dnsserver import DNSServer

LIMIT_HOSTS = {f"h{i}.lim.test": [("A", "198.51.100.1")] for i in range(1, 12)}

ZONE: dict[str, list[tuple[str, str]]] = {
    "ip4.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "ip6.test": [("TXT", "v=spf1 ip6:2001:db8::/32 ~all")],
    "a.test": [("TXT", "v=spf1 a/24//64 -all"), ("A", "192.0.2.10"), ("AAAA", "2001:db8::10")],
    "mx.test": [("TXT", "v=spf1 mx:mxh.test -all"), ("MX", "10 mx1.mx.test.")],
    "mxh.test": [("MX", "10 mx1.mx.test."), ("MX", "20 mx2.mx.test.")],
    "mx1.mx.test": [("A", "192.0.2.21")],
    "mx2.mx.test": [("A", "192.0.2.22")],
    "inc.test": [("TXT", "v=spf1 include:_spf.inc.test -all")],
    "_spf.inc.test": [("TXT", "v=spf1 include:_deep.inc.test ?all")],
    "_deep.inc.test": [("TXT", "v=spf1 a:out.inc.test -all")],
    "out.inc.test": [("A", "192.0.2.30")],
    "loop.test": [("TXT", "v=spf1 include:loop2.test -all")],
    "loop2.test": [("TXT", "v=spf1 redirect=loop.test")],
    "incnone.test": [("TXT", "v=spf1 include:nothing.test -all")],
    "redir.test": [("TXT", "v=spf1 redirect=ip4.test")],
    "redirall.test": [("TXT", "v=spf1 ?all redirect=ip4.test")],
    "redirnone.test": [("TXT", "v=spf1 redirect=nothing.test")],
    "two.test": [("TXT", "v=spf1 -all"), ("TXT", "v=spf1 +all")],
    "notspf.test": [("TXT", "v=spf10 -all"), ("TXT", "google-site-verification=x")],
    "exists.test": [("TXT", "v=spf1 exists:%{ir}.%{v}._spf.%{d} -all")],
    "5.2.0.192.in-addr._spf.exists.test": [("A", "127.0.0.2")],
    "local.test": [("TXT", "v=spf1 exists:%{l1+}.u.%{o} -all")],
    "alice.u.local.test": [("A", "127.0.0.2")],
    "ptr.test": [("TXT", "v=spf1 ptr -all")],
    "5.2.0.192.in-addr.arpa": [("PTR", "mail.ptr.test.")],
    "mail.ptr.test": [("A", "192.0.2.5")],
    "6.2.0.192.in-addr.arpa": [("PTR", "mail6.ptr.test.")],  # does not resolve back
    "mail6.ptr.test": [("A", "192.0.2.99")],
    "limit10.test": [
        ("TXT", "v=spf1 " + " ".join(f"a:h{i}.lim.test" for i in range(1, 11)) + " -all")
    ],
    "limit11.test": [
        ("TXT", "v=spf1 " + " ".join(f"a:h{i}.lim.test" for i in range(1, 12)) + " -all")
    ],
    "void2.test": [("TXT", "v=spf1 a:nx1.test a:nx2.test -all")],
    "void3.test": [("TXT", "v=spf1 a:nx1.test a:nx2.test exists:nx3.test -all")],
    "manymx.test": [("TXT", "v=spf1 mx -all")]
    + [("MX", f"{i} m{i}.manymx.test.") for i in range(11)],
    "exp.test": [("TXT", "v=spf1 -all exp=explain.%{d}")],
    "unknownmod.test": [("TXT", "v=spf1 foo=bar ip4:192.0.2.5 -all")],
    "badmech.test": [("TXT", "v=spf1 ip4:192.0.2.5 frobnicate -all")],
    "badip.test": [("TXT", "v=spf1 ip4:300.1.1.1 -all")],
    "badcidr.test": [("TXT", "v=spf1 a/33 -all")],
    "tworedir.test": [("TXT", "v=spf1 redirect=a.test redirect=ip4.test")],
    "badmacro.test": [("TXT", "v=spf1 exists:%{x}.test -all")],
    "zeromacro.test": [("TXT", "v=spf1 exists:%{d0}.test -all")],
    "cmacro.test": [("TXT", "v=spf1 exists:%{c}.test -all")],
    "plusall.test": [("TXT", "v=spf1 +all")],
    "noall.test": [("TXT", "v=spf1 ip4:198.51.100.7")],
    "upper.test": [("TXT", "V=SPF1 IP4:192.0.2.5 -ALL")],
    **LIMIT_HOSTS,
}


@pytest.fixture(scope="module")
def spf_dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as server:
        yield server


# (ip, domain, result, matched mechanism path or note fragment)
CASES = [
    ("192.0.2.5", "ip4.test", "pass", "ip4:192.0.2.0/24"),
    ("198.51.100.1", "ip4.test", "fail", "-all"),
    ("::ffff:192.0.2.5", "ip4.test", "pass", "ip4:192.0.2.0/24"),  # v4-mapped
    ("2001:db8::1", "ip6.test", "pass", "ip6:2001:db8::/32"),
    ("2001:db9::1", "ip6.test", "softfail", "~all"),
    ("192.0.2.5", "ip6.test", "softfail", "~all"),
    ("192.0.2.99", "a.test", "pass", "a/24//64"),
    ("2001:db8::ffff", "a.test", "pass", "a/24//64"),
    ("2001:db8:1::1", "a.test", "fail", "-all"),
    ("192.0.2.22", "mx.test", "pass", "mx:mxh.test"),
    (
        "192.0.2.30",
        "inc.test",
        "pass",
        "include:_spf.inc.test > include:_deep.inc.test > a:out.inc.test",
    ),
    ("192.0.2.31", "inc.test", "fail", "-all"),
    ("192.0.2.1", "loop.test", "permerror", "loop"),
    ("192.0.2.1", "incnone.test", "permerror", "no SPF record"),
    ("192.0.2.5", "redir.test", "pass", "redirect=ip4.test > ip4:192.0.2.0/24"),
    ("198.51.100.1", "redir.test", "fail", "redirect=ip4.test > -all"),
    ("192.0.2.5", "redirall.test", "neutral", "?all"),  # redirect ignored with all
    ("192.0.2.5", "redirnone.test", "permerror", "no SPF record"),
    ("192.0.2.5", "two.test", "permerror", "2 SPF records"),
    ("192.0.2.5", "notspf.test", "none", "no SPF record"),
    ("192.0.2.5", "nothing.test", "none", "no SPF record"),
    ("192.0.2.5", "exists.test", "pass", "exists:%{ir}.%{v}._spf.%{d}"),
    ("192.0.2.6", "exists.test", "fail", "-all"),
    ("192.0.2.5", "ptr.test", "pass", "ptr"),
    ("192.0.2.6", "ptr.test", "fail", "-all"),  # PTR name does not resolve back
    ("192.0.2.1", "limit10.test", "fail", "-all"),
    ("192.0.2.1", "limit11.test", "permerror", "more than 10 DNS lookups"),
    ("192.0.2.1", "void2.test", "fail", "-all"),
    ("192.0.2.1", "void3.test", "permerror", "void"),
    ("192.0.2.1", "manymx.test", "permerror", "more than 10 MX"),
    ("192.0.2.1", "exp.test", "fail", "-all"),
    ("192.0.2.5", "unknownmod.test", "pass", "ip4:192.0.2.5"),
    ("192.0.2.5", "badmech.test", "permerror", "unknown mechanism"),
    ("192.0.2.5", "badip.test", "permerror", "bad network"),
    ("192.0.2.5", "badcidr.test", "permerror", "CIDR"),
    ("192.0.2.5", "tworedir.test", "permerror", "redirect= given twice"),
    ("192.0.2.5", "badmacro.test", "permerror", "not allowed"),
    ("192.0.2.5", "zeromacro.test", "permerror", "transformer 0"),
    ("192.0.2.5", "cmacro.test", "permerror", "not allowed"),
    ("203.0.113.9", "plusall.test", "pass", "+all"),
    ("192.0.2.5", "noall.test", "neutral", "no mechanism matched"),
    ("192.0.2.5", "upper.test", "pass", "IP4:192.0.2.5"),
]


@pytest.mark.parametrize(("ip", "domain", "result", "how"), CASES)
def test_check_host(spf_dns: DNSServer, ip: str, domain: str, result: str, how: str) -> None:
    look = make_lookup([spf_dns.nameserver])
    res = check_host(ip, domain, look.query)
    assert res.result == result, res
    if result in ("pass", "fail", "softfail") or how in ("?all",):
        assert res.matched == how, res
    else:
        assert how in res.note, res
    assert res.lookups <= 11  # the 11th is counted, never sent


def test_local_part_macro_and_ptr_warning(spf_dns: DNSServer) -> None:
    look = make_lookup([spf_dns.nameserver])
    res = check_host("192.0.2.1", "local.test", look.query, sender="bob+alice@local.test")
    assert res.result == "pass", res
    assert check_host("192.0.2.1", "local.test", look.query).result == "fail"  # postmaster
    res = check_host("192.0.2.5", "ptr.test", look.query)
    assert any("ptr is discouraged" in w for w in res.warnings)
    assert res.lookups == 1 and res.void_lookups == 0


# RFC 7208 section 7.4 examples: sender strong-bad@email.example.com, IP 192.0.2.3
MACROS = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%{h}.x", "mx.example.org.x"),
    ("%{S}", "strong-bad%40email.example.com"),
]


@pytest.mark.parametrize(("spec", "want"), MACROS)
def test_macro_expansion_rfc_examples(spec: str, want: str) -> None:
    got = expand_macros(spec, "192.0.2.3", "email.example.com",
                        sender="strong-bad@email.example.com", helo="mx.example.org")  # fmt: skip
    assert got == want


def test_macro_ipv6_escapes_and_truncation() -> None:
    got = expand_macros("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01", "email.example.com")
    assert got == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )
    assert expand_macros("a%%b%_c%-d", "192.0.2.3", "x.test", exp=True) == "a%b c%20d"
    long = expand_macros("%{i}." + "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + ".%{d}",
                         "192.0.2.3", "d" * 60 + ".test")  # fmt: skip
    assert len(long) <= 253 and long.endswith(".test")
    for bad in ("%{x}", "%{d0}", "%{c}", "%", "%a", "%{d"):
        with pytest.raises(ValueError):
            expand_macros(bad, "192.0.2.3", "x.test")


def test_parse_record_syntax() -> None:
    assert [t.name for t in parse_record("v=spf1 a mx:x.test/24 ip6:::1 -all exp=e.test")] == [
        "a", "mx", "ip6", "all", "exp"]  # fmt: skip
    for bad in ("v=spf1 a:", "v=spf1 include", "v=spf1 ip4:192.0.2.1/40", "v=spf1 all:x",
                "v=spf1 exp=a exp=b", "v=spf2 -all", "v=spf1 ip6:192.0.2.1"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_record(bad)


def test_temperror_from_dns_failure() -> None:
    def look(name: str, rtype: str) -> list[str]:
        if name == "broken.test":
            raise DnsTempError("SERVFAIL")
        return {("t.test", "TXT"): ["v=spf1 a:broken.test -all"]}.get((name, rtype), [])

    res = check_host("192.0.2.1", "t.test", look)
    assert isinstance(res, SpfResult) and res.result == "temperror", res
