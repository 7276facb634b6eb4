"""The name fastsend says in EHLO (fastsend.delivery.ehlo), driven through the
real ``fastsend send`` / ``serve`` against a real receiver (aiosmtpd) and the
loopback DNS server: never ``localhost``; per source IP its forward-confirmed
PTR name when nothing is configured; a warning at startup for a name that is
not fully qualified, does not resolve to its IP, or could not be checked; a
DNS that fails never stops sending."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tests._engine_helpers import run_fastsend, summary, write_campaign, write_recipients
from tests._smtp_helpers import aiosmtpd_server
from tests.conftest import ServeProcess, free_port

from fastsend import config as cfgmod
from fastsend.config import ConfigError
from fastsend.delivery import ehlo
from fastsend.hostname import address_literal, is_fqdn
from fastsend.testing.dnsserver import DNSServer

ZONES = {
    # 127.0.0.2: forward-confirmed
    "2.0.0.127.in-addr.arpa": [("PTR", "out1.example.test.")],
    "out1.example.test": [("A", "127.0.0.2")],
    # 127.0.0.3: its PTR name points elsewhere (not forward-confirmed)
    "3.0.0.127.in-addr.arpa": [("PTR", "out3.example.test.")],
    "out3.example.test": [("A", "127.0.0.9")],
    # 127.0.0.4: no PTR at all
    "mta.example.test": [("A", "127.0.0.5")],
}


def host_fallback(ip: str) -> str:
    """What a source IP with no name says when this host's name is all there is."""
    h = socket.gethostname().rstrip(".").lower()
    return h if is_fqdn(h) else address_literal(ip)


def send(tmp_path: Path, port: int, toml: str, *extra: str, n: int = 6) -> tuple[int, str]:
    tmp_path.mkdir(exist_ok=True)
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(toml)
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"u{i}@d{i % 9}.example.net" for i in range(n)])
    proc = run_fastsend(
        "send", str(camp), "-r", str(rcpts), "-c", str(cfg), "--route", f"*=127.0.0.1:{port}",
        "--spool", str(tmp_path / "spool"), "--json", "--no-progress", "--no-dkim", *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == n
    return proc.returncode, proc.stderr


def said(handler: object) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in handler.messages:  # type: ignore[attr-defined]
        out.setdefault(m["peer"][0], set()).add(m["helo"])
    return out


def test_no_name_configured_each_ip_says_its_forward_confirmed_ptr_name(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """Before: every IP said EHLO localhost. Now 127.0.0.2 says its PTR name;
    127.0.0.3 (PTR not confirmed) and 127.0.0.4 (no PTR) fall back to this host's
    fully qualified name or their address literal, each with a warning."""
    dns_server.set_zones(ZONES)
    got: dict[str, set[str]] = {}
    err = ""
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):  # one send each: each IP surely used
        port = free_port()
        with aiosmtpd_server(port) as (_, handler):
            _, e = send(tmp_path / ip, port,
                        f'[dns]\nnameservers = ["{dns_server.nameserver}"]\ntimeout = 2\n'
                        f'[ips]\nsource = ["{ip}"]\n')  # fmt: skip
        got.update(said(handler))
        err += e
    assert got["127.0.0.2"] == {"out1.example.test"}, got
    assert got["127.0.0.3"] == {host_fallback("127.0.0.3")}, got
    assert got["127.0.0.4"] == {host_fallback("127.0.0.4")}, got
    assert not any("localhost" in n for names in got.values() for n in names)
    warned = [ln for ln in err.splitlines() if "warning: EHLO" in ln]
    assert not [ln for ln in warned if "127.0.0.2" in ln], warned
    assert any("127.0.0.3" in ln and "out3.example.test does not resolve back" in ln
               for ln in warned), err  # fmt: skip
    assert any("127.0.0.4" in ln and "no PTR record" in ln for ln in warned), err


def test_a_configured_name_is_said_in_a_labels_without_its_trailing_dot_and_checked(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """[ips] helo wins over the PTR name; written with a trailing dot or in
    Unicode it goes on the wire as RFC 5321 wants it; one that does not resolve to
    the IP is sent (the operator's choice) with a warning naming the fix."""
    dns_server.set_zones(ZONES)
    port = free_port()
    with aiosmtpd_server(port) as (_, handler):
        _, err = send(tmp_path, port,
                      f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n'
                      '[ips]\nsource = ["127.0.0.2"]\nhelo = "MTA.Example.Test."\n')  # fmt: skip
    assert said(handler) == {"127.0.0.2": {"mta.example.test"}}
    assert "EHLO from 127.0.0.2: mta.example.test does not resolve to 127.0.0.2 (127.0.0.5)" in err
    port = free_port()
    with aiosmtpd_server(port) as (_, handler):
        send(tmp_path / "idn", port, '[ips]\nsource = ["127.0.0.2"]\nhelo = "bücher.example.test"\n')
    assert said(handler) == {"127.0.0.2": {"xn--bcher-kva.example.test"}}


def test_a_name_that_is_not_fully_qualified_is_warned_at_startup(tmp_path: Path) -> None:
    port = free_port()
    with aiosmtpd_server(port) as (_, handler):
        _, err = send(tmp_path, port, '[ips]\nsource = ["127.0.0.2"]\nhelo = "localhost"\n')
    assert said(handler) == {"127.0.0.2": {"localhost"}}  # the operator's choice, warned
    assert "EHLO from 127.0.0.2: 'localhost' is not a fully qualified domain name" in err


@pytest.mark.parametrize("broken", ["servfail", "silent"])
def test_a_dns_that_fails_never_stops_sending(
    dns_server: DNSServer, tmp_path: Path, broken: str
) -> None:
    """A SERVFAIL on the reverse name, or a nameserver that never answers: the
    send starts and delivers, the IP says the next name down, the warning says
    the lookup failed (not that the record is missing)."""
    dns_server.set_zones({"2.0.0.127.in-addr.arpa": [("SERVFAIL", "")]})
    ns = dns_server.nameserver
    if broken == "silent":
        quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read
        quiet.bind(("127.0.0.1", 0))
        ns = f"127.0.0.1:{quiet.getsockname()[1]}"
    port = free_port()
    try:
        with aiosmtpd_server(port) as (_, handler):
            _, err = send(tmp_path, port, f'[dns]\nnameservers = ["{ns}"]\ntimeout = 1\n'
                                          '[ips]\nsource = ["127.0.0.2"]\n')  # fmt: skip
    finally:
        if broken == "silent":
            quiet.close()
    assert said(handler) == {"127.0.0.2": {host_fallback("127.0.0.2")}}
    line = next(ln for ln in err.splitlines() if "warning: EHLO from 127.0.0.2" in ln)
    assert "could not look up 127.0.0.2's PTR name: DNS" in line, line
    assert "no PTR record" not in line


def test_with_no_source_ip_and_no_name_the_connection_address_is_said(tmp_path: Path) -> None:
    port = free_port()
    with aiosmtpd_server(port) as (_, handler):
        _, err = send(tmp_path, port, "")
    h = socket.gethostname().rstrip(".").lower()
    want = h if is_fqdn(h) else "[127.0.0.1]"
    assert said(handler) == {"127.0.0.1": {want}}
    if want.startswith("["):
        assert "warning: EHLO: no [ips] helo and this host's name" in err


def test_serve_warns_at_startup(dns_server: DNSServer, tmp_path: Path) -> None:
    dns_server.set_zones(ZONES)
    api = free_port()
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n'
        '[ips]\nsource = ["127.0.0.3"]\n'
        f'[api]\nlisten = "127.0.0.1:{api}"\n'
    )
    serve = ServeProcess(cfg, api)
    try:
        serve.wait_line("EHLO from 127.0.0.3")
    finally:
        serve.stop()
    assert any("out3.example.test does not resolve back" in ln for ln in serve.lines)


def test_ehlo_names_are_validated_when_the_config_is_loaded() -> None:
    """A pool address's ehlo was not checked at all (a CR LF in it was taken and
    every connection from the IP then failed); an IPv6 literal needs its tag."""
    bad = [
        {"pools": {"main": {"ips": [{"ip": "127.0.0.2", "ehlo": "a.example\r\nRSET"}]}}},
        {"pools": {"main": {"ips": [{"ip": "127.0.0.2", "ehlo": "bad name"}]}}},
        {"ips": {"helo": "[::1]"}},
        {"ips": {"helo": "[127.0.0]"}},
    ]
    for raw in bad:
        with pytest.raises(ConfigError, match=r"ehlo|helo"):
            cfgmod.from_dict(raw)
    c = cfgmod.from_dict({"ips": {"helo": "[IPv6:::1]"},
                          "pools": {"main": {"ips": [{"ip": "127.0.0.2", "ehlo": "bücher.test"}]}}})  # fmt: skip
    assert c.helo == "[IPv6:::1]"
    assert c.pools is not None and c.pools.pools["main"].ips[0].ehlo == "xn--bcher-kva.test"


def test_choose_without_dns_many_pool_ips() -> None:
    """Many pool addresses (IPv4 and IPv6): each its own name or literal, a pool
    name wins over [ips] helo, nothing is looked up without DNS in use."""
    pool = [{"ip": f"127.0.1.{i}"} for i in range(1, 41)]
    pool.append({"ip": "2001:db8::7", "ehlo": "v6.example.test."})
    c = cfgmod.from_dict({"routes": {"*": "127.0.0.1:25"}, "pools": {"main": {"ips": pool}}})
    names = ehlo.choose(c, hostname="vm")
    assert names.by_ip["127.0.1.7"] == "[127.0.1.7]"
    assert names.by_ip["2001:db8::7"] == "v6.example.test"
    assert len(names.warnings) == 40
    names = ehlo.choose(c, hostname="mta1.example.net")
    assert names.by_ip["127.0.1.7"] == "mta1.example.net" and not names.warnings
    assert address_literal("2001:db8::7") == "[IPv6:2001:db8::7]"
    assert address_literal("::ffff:127.0.0.2") == "[127.0.0.2]"


def test_a_ptr_name_that_is_not_fully_qualified_is_not_said(dns_server: DNSServer) -> None:
    """A forward-confirmed PTR name like `localhost` (a reverse zone copied from
    /etc/hosts) is no EHLO name: the IP falls to the next step, with a warning."""
    dns_server.set_zones({
        "2.0.0.127.in-addr.arpa": [("PTR", "localhost.")], "localhost": [("A", "127.0.0.2")],
        "3.0.0.127.in-addr.arpa": [("PTR", "Out3.Example.Test.")],
        "out3.example.test": [("A", "127.0.0.3")],
    })  # fmt: skip
    c = cfgmod.from_dict({"dns": {"nameservers": [dns_server.nameserver]},
                          "ips": {"source": ["127.0.0.2", "127.0.0.3"]}})  # fmt: skip
    names = ehlo.choose(c, hostname="vm")
    assert names.by_ip == {"127.0.0.2": "[127.0.0.2]", "127.0.0.3": "out3.example.test"}
    assert any("'localhost' is not fully qualified" in w for w in names.warnings), names.warnings
