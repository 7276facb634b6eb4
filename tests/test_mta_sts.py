"""MTA-STS (RFC 8461) and TLS-RPT counting for delivery by MX, end to end on
loopback: the real DNS server serves the MX and ``_mta-sts`` TXT records, a
real HTTPS server with a trustme certificate serves the policies, and real
SMTP receivers (fastsend's sink) offer STARTTLS with a certificate for the MX
name, with a certificate for another name, or no STARTTLS at all."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from tests._engine_helpers import run_fastsend, summary, write_campaign, write_recipients
from tests.conftest import free_port

from fastsend.config import ConfigError, loader
from fastsend.delivery import dane
from fastsend.delivery.mtasts import (
    MTASTS,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
    result_type,
    session_result,
)
from fastsend.delivery.mx import MXResolver, Site
from fastsend.outcome import Outcome
from fastsend.sink import SinkProcess
from fastsend.smtp.transport import ConnectOptions, connect
from fastsend.testing.dnsserver import DNSServer

# ---------------------------------------------------------------- parsing


def test_txt_record_needs_exactly_one_v_stsv1_with_an_id() -> None:
    assert parse_txt(["v=STSv1; id=20240101T000000;"]) == "20240101T000000"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: no policy (3.1)
    assert parse_txt(["v=STSv1;"]) is None  # no id
    assert parse_txt(["v=STSv1; id=has-dash"]) is None  # id is 1*32 ALPHA / DIGIT
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_txt([]) is None


def test_policy_parsing_and_checks() -> None:
    p = parse_policy(
        "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\nmx: *.Example.ORG.\r\n"
        "max_age: 86400\r\nextension: ignored\r\n",
        "example.net", "id1", 1000.0,
    )  # fmt: skip
    assert (p.mode, p.mx, p.max_age, p.expires) == (
        "enforce", ("mx1.example.net", "*.example.org"), 86400, 87400.0,
    )  # fmt: skip
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", "d", "i", 0).mx == ()
    for bad in (
        "mode: enforce\nmx: a.b\nmax_age: 1\n",  # no version
        "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        "version: STSv1\nmode: testing\nmx: a.b\nmax_age: 31557601\n",  # over a year
        "version: STSv1\nmode: testing\nmx: a.b\nmax_age: -1\n",
        "version: STSv1\nmode: testing\nmx: bad host\nmax_age: 1\n",
        "<html>not a policy</html>",
    ):
        with pytest.raises(PolicyError) as e:
            parse_policy(bad, "d", "i", 0)
        assert e.value.result == "sts-policy-invalid"


def test_mx_patterns_wildcard_is_one_label() -> None:
    pats = ("mail.example.com", "*.example.net")
    assert mx_matches("MAIL.example.com.", pats)
    assert mx_matches("mx1.example.net", pats)
    assert not mx_matches("example.net", pats)
    assert not mx_matches("a.b.example.net", pats)
    assert not mx_matches("mail.example.com.evil.test", pats)
    assert not mx_matches("xmail.example.com", pats)


def test_result_types() -> None:
    assert result_type("TLS required but the server does not offer STARTTLS") == (
        "starttls-not-supported"
    )
    assert (
        result_type(
            "TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed:"
            " Hostname mismatch, certificate is not valid for 'mx.x.test'. (_ssl.c:1006)"
        )
        == "certificate-host-mismatch"
    )
    assert (
        result_type(
            "TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed:"
            " unable to get local issuer certificate (_ssl.c:1006)"
        )
        == "certificate-not-trusted"
    )
    # STARTTLS offered, then refused by a reply: not supported (it was a
    # validation-failure, as if a certificate had been looked at)
    assert session_result("starttls", 454, "4.7.0 TLS not available due to temporary reason") == (
        "starttls-not-supported"
    )
    assert session_result("starttls", 0, "TLS handshake failed: certificate has expired") == (
        "certificate-expired"
    )


def test_config_tls_section(tmp_path: Path) -> None:
    cfg = loader.from_dict({"tls": {"domains": {"Bücher.example": "off"}}}, base_dir=str(tmp_path))
    assert cfg.tls.mta_sts == "on"  # on by default
    assert not cfg.mta_sts_for("xn--bcher-kva.example")
    assert not cfg.mta_sts_for("mx.xn--bcher-kva.example")  # subdomains too
    assert cfg.mta_sts_for("other.example")
    off = loader.from_dict({"tls": {"mta_sts": "off", "domains": {"a.test": "on"}}})
    assert off.mta_sts_for("a.test") and not off.mta_sts_for("b.test")
    with pytest.raises(ConfigError, match="mta_sts"):
        loader.from_dict({"tls": {"mta_sts": "yes"}})
    with pytest.raises(ConfigError, match="ca_file"):
        loader.from_dict({"tls": {"ca_file": "missing.pem"}}, base_dir=str(tmp_path))


# ---------------------------------------------------------------- servers


class PolicyServer:
    """HTTPS on 127.0.0.1 answering /.well-known/mta-sts.txt per Host header
    from ``policies`` (a str body; an int: that HTTP status); counts requests."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        self.policies: dict[str, str | int | bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0]
                outer.requests.append(f"{host}{self.path}")
                body = outer.policies.get(host, 404)
                if isinstance(body, bytes):  # a raw answer, as a hostile host writes it
                    self.wfile.write(body)
                    return
                if self.path != "/.well-known/mta-sts.txt" or isinstance(body, int):
                    self.send_response(body if isinstance(body, int) else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class World:
    def __init__(self, tmp: Path, dns: DNSServer) -> None:
        self.tmp = tmp
        self.dns = dns
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        # the policy hosts of every test domain: one certificate, names listed
        names = [f"mta-sts.{d}" for d in DOMAINS]
        self.https = PolicyServer(self.ca.issue_cert(*names))

    def pem(self, name: str, *hosts: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(*hosts)
        c, k = self.tmp / f"{name}.crt", self.tmp / f"{name}.key"
        c.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(k))
        return str(c), str(k)

    def config(self, mx_port: int, extra: str = "") -> Path:
        cfg = self.tmp / "fastsend.toml"
        cfg.write_text(
            f'[spool]\ndir = "{self.tmp / "spool"}"\n'  # (not ./spool: the policy cache is there)
            f'[dns]\nnameservers = ["127.0.0.1:{self.dns.port}"]\nmx_port = {mx_port}\ntimeout = 3\n'
            '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 1\n'
            "[delivery]\nallow_private_mx = true\n"  # the test DNS puts everything on loopback
            "[retry]\nmin_backoff = 600\n"
            f'[tls]\nca_file = "{self.ca_file}"\npolicy_port = {self.https.port}\n'
            "policy_timeout = 5\n" + extra
        )
        return cfg


DOMAINS = [
    "enforce-ok.test", "enforce-badcert.test", "testing-badcert.test", "enforce-notls.test",
    "none-notls.test", "mismatch.test", "wildcard.test", "cached.test", "dane-over-sts.test",
]  # fmt: skip


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    return (
        f"version: STSv1\r\nmode: {mode}\r\n"
        + "".join(f"mx: {m}\r\n" for m in mx)
        + (f"max_age: {max_age}\r\n")
    )


@pytest.fixture
def world(tmp_path: Path, dns_server: DNSServer) -> Iterator[World]:
    w = World(tmp_path, dns_server)
    try:
        yield w
    finally:
        w.https.close()


def _events(spool: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in (spool / "events.jsonl").read_bytes().splitlines()]


def _received(log: Path) -> dict[str, bool]:
    """recipient -> whether it came over TLS"""
    out = {}
    if log.exists():
        for line in log.read_bytes().splitlines():
            m = orjson.loads(line)
            for r in m["recipients"]:
                out[r] = m["tls"]
    return out


# ---------------------------------------------------------------- end to end


def test_enforce_testing_none_against_real_receivers(world: World) -> None:
    """One send to eight domains: enforce delivers over verified TLS to a listed
    MX and defers (4.7.5, nothing sent in clear) for a wrong-name certificate,
    a receiver without STARTTLS or an MX the policy does not list; testing
    delivers anyway and reports; none and no policy deliver as before. Every
    failure is a tls_report event naming its policy domain and result type."""
    port = free_port("127.0.0.1")
    good = world.pem("good", "mx.ok.test", "*.wild.test")
    bad = world.pem("bad", "wrong-name.test")
    zones: dict[str, Any] = {
        "mx.ok.test": [("A", "127.0.0.1")],
        "mx1.wild.test": [("A", "127.0.0.1")],
        "mx.bad.test": [("A", "127.0.0.3")],
        "mx.plain.test": [("A", "127.0.0.4")],
        "nopolicy.test": [("MX", "10 mx.plain.test.")],
    }
    mx_of = {
        "enforce-ok.test": "mx.ok.test", "enforce-badcert.test": "mx.bad.test",
        "testing-badcert.test": "mx.bad.test", "enforce-notls.test": "mx.plain.test",
        "none-notls.test": "mx.plain.test", "mismatch.test": "mx.plain.test",
        "wildcard.test": "mx1.wild.test",
    }  # fmt: skip
    pols = {
        "enforce-ok.test": policy("enforce", "mx.ok.test"),
        "enforce-badcert.test": policy("enforce", "mx.bad.test"),
        "testing-badcert.test": policy("testing", "mx.bad.test"),
        "enforce-notls.test": policy("enforce", "mx.plain.test"),
        "none-notls.test": policy("none"),
        "mismatch.test": policy("enforce", "mx.ok.test"),
        "wildcard.test": policy("enforce", "*.wild.test"),
    }
    for d, mx in mx_of.items():
        zones[d] = [("MX", f"10 {mx}.")]
        zones[f"_mta-sts.{d}"] = [("TXT", "v=STSv1; id=1;")]
        zones[f"mta-sts.{d}"] = [("A", "127.0.0.1")]
        world.https.policies[f"mta-sts.{d}"] = pols[d]
    world.dns.set_zones(zones)
    rcpts = [f"u@{d}" for d in mx_of] + ["u@nopolicy.test"]
    camp = write_campaign(world.tmp)
    lst = write_recipients(world.tmp, rcpts)
    spool = world.tmp / "spool"
    logs = {ip: world.tmp / f"sink{ip}.jsonl" for ip in ("1", "3", "4")}
    with (
        SinkProcess("--log", str(logs["1"]), "--tls-cert", good[0], "--tls-key", good[1],
                    listen=f"127.0.0.1:{port}"),
        SinkProcess("--log", str(logs["3"]), "--tls-cert", bad[0], "--tls-key", bad[1],
                    listen=f"127.0.0.3:{port}"),
        SinkProcess("--log", str(logs["4"]), listen=f"127.0.0.4:{port}"),
    ):  # fmt: skip
        proc = run_fastsend(
            "send", str(camp), "-r", str(lst), "-c", str(world.config(port)),
            "--spool", str(spool), "--json", "--no-dkim", "--no-progress", "--max-wait", "1",
        )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    s = summary(proc)
    ok = _received(logs["1"])
    badcert = _received(logs["3"])
    plain = _received(logs["4"])
    assert ok == {"u@enforce-ok.test": True, "u@wildcard.test": True}
    assert badcert == {"u@testing-badcert.test": True}  # testing: delivered anyway (unverified)
    assert plain == {"u@none-notls.test": False, "u@nopolicy.test": False}
    assert (s["delivered"], s["deferred"]) == (5, 3), s
    assert s["tls_policy_failures"] >= 4, s  # TLS-RPT counted in the run's summary too
    ev = _events(spool)
    deferred = {e["rcpt"]: e for e in ev if e["event"] == "deferred"}
    assert set(deferred) == {"u@enforce-badcert.test", "u@enforce-notls.test", "u@mismatch.test"}
    for e in deferred.values():
        assert "MTA-STS policy of" in e["text"] and e["enhanced"] == "4.7.5", e
    reports = {(e["policy_domain"], e["result"], e["delivered_anyway"])
               for e in ev if e["event"] == "tls_report"}  # fmt: skip
    assert ("enforce-badcert.test", "certificate-host-mismatch", False) in reports
    assert ("testing-badcert.test", "certificate-host-mismatch", True) in reports
    assert ("enforce-notls.test", "starttls-not-supported", False) in reports
    assert ("mismatch.test", "validation-failure", False) in reports
    assert not {r for r in reports if r[0] in ("enforce-ok.test", "none-notls.test")}
    # one fetch per policy domain; no TXT -> no fetch
    fetched = sorted(world.https.requests)
    assert fetched == sorted(f"mta-sts.{d}/.well-known/mta-sts.txt" for d in mx_of)
    assert (spool / "mta-sts" / "enforce-ok.test.json").exists()  # kept for the next run


def test_cached_policy_survives_fetch_failure_and_missing_txt(world: World) -> None:
    """The policy in force stays after its host fails (HTTP 500, new id) and
    after its TXT record disappears, until max_age; another worker (a new
    MTASTS on the same directory) reads it from the spool without fetching."""
    world.dns.set_zones({
        "_mta-sts.cached.test": [("TXT", "v=STSv1; id=1")],
        "mta-sts.cached.test": [("A", "127.0.0.1")],
        "cached.test": [("MX", "10 mx.cached.test.")],
        "mx.cached.test": [("A", "127.0.0.1")],
    })  # fmt: skip
    world.https.policies["mta-sts.cached.test"] = policy("enforce", "mx.cached.test")
    cfg = loader.load(str(world.config(25)))

    async def go() -> None:
        r = MXResolver(cfg)
        assert r.sts is not None
        p, _ttl = await r.sts.policy("cached.test")
        assert p is not None and (p.id, p.mode) == ("1", "enforce")
        site = await r.site_for("cached.test")
        assert isinstance(site, Site) and site.sts == p and site.key.endswith("|sts:cached.test")
        # new id, the policy host fails: the cached policy holds
        world.https.policies["mta-sts.cached.test"] = 500
        world.dns.set_zones({
            "_mta-sts.cached.test": [("TXT", "v=STSv1; id=2")],
            "mta-sts.cached.test": [("A", "127.0.0.1")],
        })  # fmt: skip
        r.sts.txt.clear()  # (the TXT answer's TTL passed)
        p2, ttl2 = await r.sts.policy("cached.test")
        assert p2 == p and ttl2 <= 300
        fails = [e for e in r.sts.take_events() if e["event"] == "tls_report"]
        assert [e["result"] for e in fails] == ["sts-policy-fetch-error"]
        n = len(world.https.requests)
        await r.sts.policy("cached.test")  # not fetched again before FETCH_RETRY
        assert len(world.https.requests) == n
        # TXT gone (an attacker stripping it): still in force
        world.dns.set_zones({"mta-sts.cached.test": [("A", "127.0.0.1")]})
        r.sts.txt.clear()
        p3, _ = await r.sts.policy("cached.test")
        assert p3 == p
        # another worker / a restart: from the spool's directory, no fetch
        other = MTASTS(cfg, r._txt, r._policy_addresses)
        p4, _ = await other.policy("cached.test")
        assert p4 == p and len(world.https.requests) == n

    asyncio.run(go())


def test_no_policy_costs_one_cached_txt_query(world: World) -> None:
    world.dns.set_zones({"plain.test": [("MX", "10 mx.plain.test.", 5)],
                         "mx.plain.test": [("A", "127.0.0.1")]})  # fmt: skip
    cfg = loader.load(str(world.config(25)))

    async def go() -> None:
        r = MXResolver(cfg)
        for _ in range(3):
            site = await r.site_for("plain.test")
            assert isinstance(site, Site) and site.sts is None
        r._cache.clear()  # the MX answer ends: asked again
        t0 = time.monotonic()
        await r.site_for("plain.test")
        assert time.monotonic() - t0 < 2.5

    asyncio.run(go())
    txt = [q for q in world.dns.resolver.queries if q[0] == "_mta-sts.plain.test"]
    assert len(txt) == 1, txt  # its absence is cached, longer than the MX answer
    assert not world.https.requests
    off = loader.load(str(world.config(25, 'mta_sts = "off"\n')))
    assert MXResolver(off).sts is None


def test_enforce_with_no_matching_mx_is_deferred_not_sent(world: World) -> None:
    world.dns.set_zones({
        "mismatch.test": [("MX", "10 mx.other.test.")],
        "mx.other.test": [("A", "127.0.0.1")],
        "_mta-sts.mismatch.test": [("TXT", "v=STSv1; id=7")],
        "mta-sts.mismatch.test": [("A", "127.0.0.1")],
    })  # fmt: skip
    world.https.policies["mta-sts.mismatch.test"] = policy("enforce", "mx.good.test")
    cfg = loader.load(str(world.config(25)))
    out = asyncio.run(MXResolver(cfg).site_for("mismatch.test"))
    assert isinstance(out, Outcome) and out.deferred and out.enhanced == "4.7.5"
    assert "mx.other.test" in out.text and "mx.good.test" in out.text


def test_check_config_shows_the_tls_policy_setting(tmp_path: Path, capsys: Any) -> None:
    from fastsend.cli import main

    f = tmp_path / "fastsend.toml"
    f.write_text('[tls]\ndomains = { "legacy.test" = "off" }\n[routes]\n"relay.test" = "127.0.0.1:25"\n')
    assert main(["check-config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "[tls] MTA-STS on" in out and "off for legacy.test" in out, out
    assert "static routes, no policy: relay.test" in out, out
    assert "[tls] DANE off" in out
    f.write_text('[tls]\nmta_sts = "off"\ndane = "on"\n[dns]\nnameservers = ["127.0.0.1:53"]\n')
    assert main(["check-config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "[tls] MTA-STS off" in out and "DANE on" in out and "127.0.0.1:53" in out, out
    assert "without a policy" not in out
    # report_from set: sessions of domains without a policy that ask for reports count
    f.write_text('[tls]\nreport_from = "tls@sender.test"\n')
    assert main(["check-config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "sessions to domains without a policy counted too" in out, out
    f.write_text('[tls]\nmta_sts = "off"\nreport_from = "tls@sender.test"\n')
    assert main(["check-config", str(f)]) == 0
    assert "no session is counted" in capsys.readouterr().out


# ---------------------------------------------------------------- DANE (RFC 7672)


def _der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _spki_sha256(der: bytes) -> str:
    return hashlib.sha256(dane._selected(der, 1)).hexdigest()


def test_dane_check_ee_and_ta() -> None:
    ca, other = trustme.CA(), trustme.CA()
    leaf = _der(ca.issue_cert("mx.dane.test").cert_chain_pems[0].bytes())
    root, stranger = _der(ca.cert_pem.bytes()), _der(other.cert_pem.bytes())
    ee = (3, 1, 1, bytes.fromhex(_spki_sha256(leaf)))
    ta = (2, 0, 1, hashlib.sha256(root).digest())
    assert dane.check((ee,), "any.name", [leaf]) == ""  # DANE-EE: no name check (3.1.1)
    assert dane.check((ta,), "mx.dane.test", [leaf, root]) == ""
    assert "not valid for" in dane.check((ta,), "other.test", [leaf, root])
    fake_ta = (2, 0, 1, hashlib.sha256(stranger).digest())
    assert dane.check((fake_ta,), "mx.dane.test", [leaf, stranger])  # not its issuer
    assert dane.check(((3, 1, 1, b"x" * 32),), "mx", [leaf]) == (
        "the certificate matches no TLSA record"
    )
    assert dane.check((ee,), "mx", []) == "the server sent no certificate"
    # PKIX usages (0, 1) and unknown selectors / matching types are unusable (3.1.3)
    assert dane.usable([(0, 0, 1, b""), (1, 1, 1, b""), (3, 2, 1, b""), (3, 1, 3, b""), ee]) == (
        ee,
    )


def test_peer_check_after_starttls_both_loops(tmp_path: Path, run: Any) -> None:
    """The transport hands the server's chain (its own certificate first, then
    what it sent) to ``peer_check``; a refusal ends the session deferred at
    STARTTLS, nothing sent."""
    ca = trustme.CA()
    cert = ca.issue_cert("mx.dane.test")
    crt, key = tmp_path / "c.pem", tmp_path / "k.pem"
    crt.write_bytes(cert.cert_chain_pems[0].bytes() + ca.cert_pem.bytes())
    cert.private_key_pem.write_to_path(str(key))
    seen: list[list[bytes]] = []

    def ok(chain: list[bytes]) -> str:
        seen.append(chain)
        return ""

    with SinkProcess("--tls-cert", str(crt), "--tls-key", str(key)) as sink:

        async def go(check: Any) -> Any:
            opts = ConnectOptions(
                sink.host, sink.port, tls="required", ssl_context=dane.context(),
                server_hostname="mx.dane.test", peer_check=check,
            )  # fmt: skip
            conn = await connect(opts)
            if not isinstance(conn, Outcome):
                await conn.quit()
            return conn

        assert not isinstance(run(go(ok)), Outcome)
        assert seen[0] == [_der(cert.cert_chain_pems[0].bytes()), _der(ca.cert_pem.bytes())]
        out = run(go(lambda chain: "no"))
    assert isinstance(out, Outcome) and out.deferred and out.stage == "starttls"
    assert "peer check failed: no" in out.text


def test_dane_end_to_end_ee_ta_bad_insecure_and_over_mta_sts(world: World) -> None:
    """[tls] dane = "on": authenticated TLSA records decide the certificate;
    a mismatch defers (4.7.5, tlsa-invalid reported, nothing sent); records
    under an unauthenticated MX answer are ignored; DANE wins over an MTA-STS
    policy whose mx list would have deferred the mail."""
    port = free_port("127.0.0.1")
    cert = world.ca.issue_cert("mx1.dane.test", "mx2.dane.test", "mx3.dane.test", "mx4.dane.test")
    crt, key = world.tmp / "dane.crt", world.tmp / "dane.key"
    crt.write_bytes(cert.cert_chain_pems[0].bytes() + world.ca.cert_pem.bytes())
    cert.private_key_pem.write_to_path(str(key))
    leaf = _der(cert.cert_chain_pems[0].bytes())
    ee = f"3 1 1 {_spki_sha256(leaf)}"
    ta = f"2 0 1 {hashlib.sha256(_der(world.ca.cert_pem.bytes())).hexdigest()}"
    bad = "3 1 1 " + "00" * 32
    sec = ("SECURE", "")
    zones: dict[str, Any] = {
        "dane-ee.test": [("MX", "10 mx1.dane.test."), sec],
        "dane-ta.test": [("MX", "10 mx2.dane.test."), sec],
        "dane-bad.test": [("MX", "10 mx3.dane.test."), sec],
        "insecure.test": [("MX", "10 mx3.dane.test.")],  # no AD: its TLSA is not looked at
        "dane-over-sts.test": [("MX", "10 mx4.dane.test."), sec],
        "_mta-sts.dane-over-sts.test": [("TXT", "v=STSv1; id=1")],
        "mta-sts.dane-over-sts.test": [("A", "127.0.0.1")],
        f"_{port}._tcp.mx1.dane.test": [("TLSA", ee), sec],
        f"_{port}._tcp.mx2.dane.test": [("TLSA", ta), sec],
        f"_{port}._tcp.mx3.dane.test": [("TLSA", bad), sec],
        f"_{port}._tcp.mx4.dane.test": [("TLSA", ee), sec],
    }
    for i in range(1, 5):
        zones[f"mx{i}.dane.test"] = [("A", "127.0.0.5"), sec]  # (a signed zone: its A too)
    world.dns.set_zones(zones)
    world.https.policies["mta-sts.dane-over-sts.test"] = policy("enforce", "elsewhere.test")
    domains = ["dane-ee.test", "dane-ta.test", "dane-bad.test", "insecure.test",
               "dane-over-sts.test"]  # fmt: skip
    camp = write_campaign(world.tmp)
    lst = write_recipients(world.tmp, [f"u@{d}" for d in domains])
    spool = world.tmp / "spool"
    log = world.tmp / "sink.jsonl"
    cfg = world.config(port, 'dane = "on"\n')
    with SinkProcess(
        "--log", str(log), "--tls-cert", str(crt), "--tls-key", str(key),
        listen=f"127.0.0.5:{port}",
    ):  # fmt: skip
        proc = run_fastsend(
            "send", str(camp), "-r", str(lst), "-c", str(cfg),
            "--spool", str(spool), "--json", "--no-dkim", "--no-progress", "--max-wait", "1",
        )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "dane" not in proc.stderr  # a loopback resolver: no warning
    got = _received(log)
    assert got == {"u@dane-ee.test": True, "u@dane-ta.test": True, "u@insecure.test": True,
                   "u@dane-over-sts.test": True}, got  # fmt: skip
    ev = _events(spool)
    deferred = [e for e in ev if e["event"] == "deferred"]
    assert [e["rcpt"] for e in deferred] == ["u@dane-bad.test"]
    assert deferred[0]["enhanced"] == "4.7.5" and "DANE (TLSA of mx3.dane.test)" in deferred[0]["text"]
    reports = [(e["policy_type"], e["policy_domain"], e["result"]) for e in ev
               if e["event"] == "tls_report"]  # fmt: skip
    assert reports and set(reports) == {("tlsa", "dane-bad.test", "tlsa-invalid")}, reports


def test_dane_on_warns_about_a_resolver_not_on_loopback() -> None:
    cfg = loader.from_dict({"tls": {"dane": "on"}, "dns": {"nameservers": ["192.0.2.53"]}})
    assert any("dane" in w for w in cfg.warnings)
    assert not loader.from_dict({"tls": {"dane": "on"}, "dns": {"nameservers": ["127.0.0.1:53"]}}).warnings
    assert any("dane" in w for w in loader.from_dict({"tls": {"dane": "on"}}).warnings)


def test_policy_host_with_a_wrong_certificate_is_no_policy(world: World) -> None:
    """The policy is believed only over HTTPS valid for mta-sts.DOMAIN: a host
    whose certificate names others gives no policy (sts-webpki-invalid)."""
    world.dns.set_zones({
        "_mta-sts.uncovered.test": [("TXT", "v=STSv1; id=1")],
        "mta-sts.uncovered.test": [("A", "127.0.0.1")],
    })  # fmt: skip
    world.https.policies["mta-sts.uncovered.test"] = policy("enforce", "mx.x.test")
    cfg = loader.load(str(world.config(25)))

    async def go() -> None:
        r = MXResolver(cfg)
        assert r.sts is not None
        assert await r.sts.policy("uncovered.test") == (None, 300.0)
        assert [e["result"] for e in r.sts.take_events()] == ["sts-webpki-invalid"]

    asyncio.run(go())
    assert not world.https.requests  # refused at the handshake, nothing asked


def test_tls_failures_by_policy_domain_in_metrics(tmp_path: Path) -> None:
    """/metrics: fastsend_tls_policy_failures_total by policy type, policy domain
    and result type, from the workers' tls_report events; label values bounded."""
    from types import SimpleNamespace

    from fastsend.queue import state
    from fastsend.serve.metrics import Metrics
    from fastsend.spool.sqlite import SQLiteSpool

    st = state.RunStats()
    sts = {"event": "tls_report", "policy_type": "sts", "policy_domain": "a.test",
           "result": "starttls-not-supported"}  # fmt: skip
    st.count_tls(sts)
    st.count_tls(sts)
    st.count_tls({"event": "tls_report", "policy_type": "tlsa", "policy_domain": "b.test",
                  "result": "tlsa-invalid"})  # fmt: skip
    assert "tls_failures" not in st.as_dict()  # not a supervisor_events_total kind
    m = Metrics(SimpleNamespace(spool=SQLiteSpool(str(tmp_path))), SimpleNamespace(slots=[], stats=st))
    text = m.render()
    assert "# TYPE fastsend_tls_policy_failures_total counter" in text
    assert ('fastsend_tls_policy_failures_total{policy_type="sts",policy_domain="a.test",'
            'result="starttls-not-supported"} 2') in text  # fmt: skip
    assert ('fastsend_tls_policy_failures_total{policy_type="tlsa",policy_domain="b.test",'
            'result="tlsa-invalid"} 1') in text  # fmt: skip
    for i in range(state.TLS_KEYS + 10):
        st.count_tls({**sts, "policy_domain": f"d{i}.test"})
    assert len(st.tls_failures) <= state.TLS_KEYS + 1
    assert st.tls_failures["sts\tother\tstarttls-not-supported"] >= 10


def test_hostile_policy_hosts_give_no_policy_and_no_local_error(world: World) -> None:
    """What a policy host may answer instead of a policy: a redirect (never
    followed, 3.3), HTML, headers without end, a body over 64 KiB, a broken
    chunked body. Each is no policy (the domain's mail goes as without one),
    reported, and never an exception out of the lookup (it was a local error
    deferring the domain's mail, with a traceback, for the oversized headers)."""
    good = policy("enforce", "mx.h.test")
    answers: dict[str, bytes] = {
        "redirect": b"HTTP/1.1 301 Moved\r\nLocation: https://evil.test/p\r\nContent-Length: 0\r\n\r\n",
        "html": b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<html",
        "headers": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70000 + b"\r\n\r\n",
        "big": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + good.encode() + b"x" * 70000,
        "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked"
                   b"\r\n\r\nzz\r\n",
        "length": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: -5\r\n\r\n",
    }  # fmt: skip
    zones: dict[str, Any] = {}
    names = list(answers)
    cert = world.ca.issue_cert(*(f"mta-sts.{n}.test" for n in names))
    world.https.close()
    world.https = PolicyServer(cert)
    for n, raw in answers.items():
        zones[f"_mta-sts.{n}.test"] = [("TXT", "v=STSv1; id=1")]
        zones[f"mta-sts.{n}.test"] = [("A", "127.0.0.1")]
        zones[f"{n}.test"] = [("MX", "10 mx.h.test.")]
        world.https.policies[f"mta-sts.{n}.test"] = raw
    zones["mx.h.test"] = [("A", "127.0.0.1")]
    world.dns.set_zones(zones)
    cfg = loader.load(str(world.config(25)))

    async def go() -> dict[str, Any]:
        r = MXResolver(cfg)
        assert r.sts is not None
        out = {}
        for n in names:
            site = await r.site_for(f"{n}.test")
            assert isinstance(site, Site) and site.sts is None, (n, site)
        for e in r.sts.take_events():
            out[e["policy_domain"].split(".")[0]] = e["result"]
        return out

    got = asyncio.run(go())
    assert set(got) == set(names), got
    assert got["html"] == "sts-policy-invalid" and got["big"] == "sts-policy-invalid", got
    assert got["redirect"] == "sts-policy-fetch-error", got


def test_dane_ta_name_checks_and_anchor_key_not_sent() -> None:
    """RFC 7672 3.1.2 / 3.2.2: a DANE-TA(2) match always checks the server
    certificate's name -- also when the server's own certificate is the anchor
    (it passed for any name) -- against the TLSA base domain or the next-hop
    domain (a certificate for the recipient domain only was refused); and a
    full public key record (2 1 0) needs no anchor certificate in the chain (it
    was "matches no TLSA record")."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ca = trustme.CA()
    leaf = _der(ca.issue_cert("mx.host.test").cert_chain_pems[0].bytes())
    root = _der(ca.cert_pem.bytes())
    leaf_is_ta = (2, 0, 1, hashlib.sha256(leaf).digest())
    assert dane.check((leaf_is_ta,), ("mx.host.test", "dom.test"), [leaf]) == ""
    assert "not valid for" in dane.check((leaf_is_ta,), ("other.test", "dom.test"), [leaf])
    # a certificate naming the next-hop domain (the recipient domain), not the MX host
    for_domain = _der(ca.issue_cert("dom.test").cert_chain_pems[0].bytes())
    ta = (2, 0, 1, hashlib.sha256(root).digest())
    assert dane.check((ta,), ("mx.host.test", "dom.test"), [for_domain, root]) == ""
    assert "not valid for" in dane.check((ta,), ("mx.host.test", "else.test"), [for_domain, root])
    # 2 1 0: the anchor's whole public key; the server sends only its own certificate
    from cryptography import x509

    spki = x509.load_der_x509_certificate(root).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    assert dane.check(((2, 1, 0, spki),), ("mx.host.test", ""), [leaf]) == ""
    other = x509.load_der_x509_certificate(_der(trustme.CA().cert_pem.bytes())).public_key()
    stranger = other.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert dane.check(((2, 1, 0, stranger),), ("mx.host.test", ""), [leaf]) != ""
    assert "not valid for" in dane.check(((2, 1, 0, spki),), ("wrong.test", ""), [leaf])


def test_dane_for_a_domain_without_mx_uses_its_own_tlsa(world: World) -> None:
    """RFC 7672 2.2.2: a domain with no MX (an authenticated NODATA) is its own
    MX host, and its TLSA records are at _25._tcp.DOMAIN: the site gets them
    (it was delivered with no DANE check at all, in clear when the host had no
    STARTTLS)."""
    world.dns.set_zones({
        "implicit.test": [("A", "127.0.0.5"), ("SECURE", "")],
        "_25._tcp.implicit.test": [("TLSA", "3 1 1 " + "ab" * 32), ("SECURE", "")],
        "insecure-implicit.test": [("A", "127.0.0.5")],
        "_25._tcp.insecure-implicit.test": [("TLSA", "3 1 1 " + "ab" * 32)],
    })  # fmt: skip
    cfg = _own_spool(world, 'dane = "on"\nmta_sts = "off"\n')

    async def go() -> tuple[Any, Any]:
        r = MXResolver(cfg)
        return await r.site_for("implicit.test"), await r.site_for("insecure-implicit.test")

    site, plain = asyncio.run(go())
    assert isinstance(site, Site) and site.dane == "implicit.test", site
    assert site.hosts[0].tlsa == ((3, 1, 1, b"\xab" * 32),) and "|dane:implicit.test" in site.key
    assert isinstance(plain, Site) and not plain.dane and not plain.hosts[0].tlsa


def _own_spool(world: World, extra: str = "") -> Any:
    """The config, its spool (and so its mta-sts directory) in the test's tmp (as every
    World.config's now)."""
    return loader.load(str(world.config(25, extra)))


def _sts_zone(world: World, domain: str, pid: str = "1") -> None:
    world.dns.set_zones({
        f"_mta-sts.{domain}": [("TXT", f"v=STSv1; id={pid}")],
        f"mta-sts.{domain}": [("A", "127.0.0.1")],
        domain: [("MX", f"10 mx.{domain}.")],
        f"mx.{domain}": [("A", "127.0.0.1")],
    })  # fmt: skip


def test_first_fetch_is_one_per_node_not_one_per_worker(world: World) -> None:
    """Workers of one node (an MTASTS each, on the same spool directory) that
    need a new domain's policy at the same moment fetch it once: the others
    wait for the fetching one's lock without blocking their loop, then read
    what it wrote (each fetched it before). A failed fetch is shared too: no
    other worker asks again before FETCH_RETRY."""
    _sts_zone(world, "cached.test")
    world.https.policies["mta-sts.cached.test"] = policy("enforce", "mx.cached.test")
    cfg = _own_spool(world)

    async def go(n: int) -> list[Any]:
        rs = [MXResolver(cfg) for _ in range(n)]
        ticks = 0

        async def ticker() -> None:  # the loop keeps running while they wait
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.ensure_future(ticker())
        got = await asyncio.gather(*(r.sts.policy("cached.test") for r in rs if r.sts))
        t.cancel()
        assert ticks > 0
        return [p for p, _ttl in got]

    got = asyncio.run(go(4))
    assert all(p is not None and p.mode == "enforce" for p in got), got
    assert len(world.https.requests) == 1, world.https.requests
    # a failing host, a new id: one request for the node, later workers don't ask
    world.https.policies["mta-sts.cached.test"] = 500
    _sts_zone(world, "cached.test", pid="2")
    got = asyncio.run(go(3))
    assert all(p is not None and p.id == "1" for p in got), got  # the cached one holds
    assert len(world.https.requests) == 2, world.https.requests
    asyncio.run(go(1))  # a worker started later (or a restart) within FETCH_RETRY
    assert len(world.https.requests) == 2, world.https.requests


def test_policy_is_refreshed_before_it_expires_and_a_failed_refresh_keeps_it(
    world: World,
) -> None:
    """RFC 8461 3.3: a cached policy is fetched again before its max_age ends
    (it was used until it expired, then fetched with the mail waiting, and
    lost when the host was down at that moment), in the background: the
    domain's mail goes on under the cached policy meanwhile; a failed refresh
    keeps the policy in force."""
    import msgspec

    from fastsend.delivery.mtasts import refresh_at

    _sts_zone(world, "cached.test")
    world.https.policies["mta-sts.cached.test"] = policy("enforce", "mx.cached.test", max_age=1000)
    cfg = _own_spool(world)

    async def go() -> None:
        r = MXResolver(cfg)
        sts = r.sts
        assert sts is not None
        p, _ = await sts.policy("cached.test")
        assert p is not None and refresh_at(p) == p.fetched + 500
        assert len(world.https.requests) == 1
        # 600 s later (past the refresh point, before the end): same id, new content
        sts.policies["cached.test"] = old = msgspec.structs.replace(p, fetched=p.fetched - 600)
        sts._write(old)
        world.https.policies["mta-sts.cached.test"] = policy("enforce", "mx.cached.test", "mx2.cached.test", max_age=1000)  # fmt: skip
        sts.txt.clear()
        now, ttl = await sts.policy("cached.test")
        assert now == old and ttl <= 300  # not waited for: the cached one answers
        for _ in range(100):
            if not sts._refreshing:
                break
            await asyncio.sleep(0.02)
        assert len(world.https.requests) == 2
        fresh, _ = await sts.policy("cached.test")
        assert fresh is not None and fresh.mx == ("mx.cached.test", "mx2.cached.test")
        assert fresh.fetched > p.fetched - 1
        # another worker reads the refreshed one from the directory
        other = MTASTS(cfg, r._txt, r._policy_addresses)
        assert (await other.policy("cached.test"))[0] == fresh
        # the host down at the next refresh: the cached policy stays in force
        world.https.policies["mta-sts.cached.test"] = 503
        sts.policies["cached.test"] = aged = msgspec.structs.replace(fresh, fetched=fresh.fetched - 900)
        sts._write(aged)
        sts.txt.clear()
        got, _ = await sts.policy("cached.test")
        await asyncio.sleep(0)
        for _ in range(100):
            if not sts._refreshing:
                break
            await asyncio.sleep(0.02)
        assert got == aged and len(world.https.requests) == 3
        assert (await sts.policy("cached.test"))[0] == aged
        assert len(world.https.requests) == 3  # not again before FETCH_RETRY
        assert [e["result"] for e in sts.take_events()] == ["sts-policy-fetch-error"]

    asyncio.run(go())


def test_dane_with_only_unusable_tlsa_records_still_requires_tls(world: World) -> None:
    """RFC 7672 2.2 / 3.1.3: an authenticated TLSA RRset whose records are all
    unusable (PKIX-TA/PKIX-EE usages) still proves the host speaks TLS:
    STARTTLS required, any certificate ("mandatory unauthenticated TLS", as
    Postfix's encrypt level). It was treated as no TLSA at all: a receiver
    without STARTTLS (or an attacker stripping it) got the mail in clear."""
    assert dane.usable([(0, 0, 1, b"x"), (1, 1, 1, b"y")]) == (dane.UNUSABLE,)
    assert dane.usable([]) == ()
    assert dane.check((dane.UNUSABLE,), ("mx.any.test", "any.test"), [b"not even DER"]) == ""
    port = free_port("127.0.0.1")
    cert = world.ca.issue_cert("some-other-name.test")
    crt, key = world.tmp / "o.crt", world.tmp / "o.key"
    crt.write_bytes(cert.cert_chain_pems[0].bytes())
    cert.private_key_pem.write_to_path(str(key))
    sec = ("SECURE", "")
    pkix = ("TLSA", "0 0 1 " + "cd" * 32)
    world.dns.set_zones({
        "pkix-plain.test": [("MX", "10 mx6.dane.test."), sec],
        "pkix-tls.test": [("MX", "10 mx7.dane.test."), sec],
        "mx6.dane.test": [("A", "127.0.0.6"), sec],
        "mx7.dane.test": [("A", "127.0.0.7"), sec],
        f"_{port}._tcp.mx6.dane.test": [pkix, sec],
        f"_{port}._tcp.mx7.dane.test": [pkix, sec],
    })  # fmt: skip
    camp = write_campaign(world.tmp)
    lst = write_recipients(world.tmp, ["u@pkix-plain.test", "u@pkix-tls.test"])
    spool = world.tmp / "spool"
    plain_log, tls_log = world.tmp / "plain.jsonl", world.tmp / "tls.jsonl"
    with (
        SinkProcess("--log", str(plain_log), listen=f"127.0.0.6:{port}"),
        SinkProcess("--log", str(tls_log), "--tls-cert", str(crt), "--tls-key", str(key),
                    listen=f"127.0.0.7:{port}"),
    ):  # fmt: skip
        proc = run_fastsend(
            "send", str(camp), "-r", str(lst), "-c", str(world.config(port, 'dane = "on"\n')),
            "--spool", str(spool), "--json", "--no-dkim", "--no-progress", "--max-wait", "1",
        )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert _received(plain_log) == {}  # never in clear
    assert _received(tls_log) == {"u@pkix-tls.test": True}
    deferred = [e for e in _events(spool) if e["event"] == "deferred"]
    assert [e["rcpt"] for e in deferred] == ["u@pkix-plain.test"], deferred
    assert deferred[0]["enhanced"] == "4.7.5"


def test_dane_mx_host_that_is_a_cname_uses_the_tlsa_of_its_secure_target(world: World) -> None:
    """RFC 7672 2.2.2 (RFC 7671 7): an MX host name that is an alias has its
    TLSA records looked for at the CNAME target when the whole chain is
    authenticated, then at the original name; with an unauthenticated chain at
    the original name only. The target's records were never looked at: a
    provider publishing TLSA at its own host names (MX names of its customers
    being CNAMEs to them) got no DANE at all."""
    sec = ("SECURE", "")
    aa, bb = "3 1 1 " + "aa" * 32, "3 1 1 " + "bb" * 32
    world.dns.set_zones({
        "cn-secure.test": [("MX", "10 mx.alias.test."), sec],
        "mx.alias.test": [("CNAME", "host.target.test."), sec],
        "host.target.test": [("A", "127.0.0.5"), sec],
        "_25._tcp.host.target.test": [("TLSA", aa), sec],
        "_25._tcp.mx.alias.test": [("TLSA", bb), sec],
        # the chain's target is not signed: its records are not to be trusted
        "cn-insecure.test": [("MX", "10 mx.alias2.test."), sec],
        "mx.alias2.test": [("CNAME", "host.unsigned.test."), sec],
        "host.unsigned.test": [("A", "127.0.0.5")],
        "_25._tcp.host.unsigned.test": [("TLSA", aa), sec],
        "_25._tcp.mx.alias2.test": [("TLSA", bb), sec],
        # a secure chain, no records at the target: the original name's
        "cn-fallback.test": [("MX", "10 mx.alias3.test."), sec],
        "mx.alias3.test": [("CNAME", "host.bare.test."), sec],
        "host.bare.test": [("A", "127.0.0.5"), sec],
        "_25._tcp.mx.alias3.test": [("TLSA", bb), sec],
        # no MX, the domain itself an alias (2.2.3): its target's records
        "cn-implicit.test": [("CNAME", "host.target.test."), sec],
    })  # fmt: skip
    cfg = _own_spool(world, 'dane = "on"\nmta_sts = "off"\n')

    async def go() -> list[Any]:
        r = MXResolver(cfg)
        return [await r.site_for(d) for d in
                ("cn-secure.test", "cn-insecure.test", "cn-fallback.test", "cn-implicit.test")]  # fmt: skip

    secure, insecure, fallback, implicit = asyncio.run(go())
    for site in (secure, insecure, fallback, implicit):
        assert isinstance(site, Site) and site.dane, site
    a, b = ((3, 1, 1, b"\xaa" * 32),), ((3, 1, 1, b"\xbb" * 32),)
    assert (secure.hosts[0].tlsa, secure.hosts[0].tlsa_name) == (a, "host.target.test")
    assert (insecure.hosts[0].tlsa, insecure.hosts[0].tlsa_name) == (b, "")
    assert (fallback.hosts[0].tlsa, fallback.hosts[0].tlsa_name) == (b, "")
    assert (implicit.hosts[0].tlsa, implicit.hosts[0].tlsa_name) == (a, "host.target.test")


def test_dane_mx_host_with_unauthenticated_addresses_has_no_tlsa_lookup(world: World) -> None:
    """RFC 7672 2.2.2: an MX host whose address records are not authenticated
    (a signed domain's MX in an unsigned provider zone) does not do DANE: its
    TLSA records are not asked for. They were: a TLSA record there was
    enforced (an insecure host's record forged or stale made every message
    defer 4.7.5), and such a zone's nameserver failing the TLSA query
    (SERVFAIL, common for unsigned zones) deferred all of the domain's mail.
    An alias whose own CNAME is authenticated still has TLSA at its name."""
    sec = ("SECURE", "")
    world.dns.set_zones({
        "signed-a.test": [("MX", "10 mx.unsigned-a.test."), sec],
        "mx.unsigned-a.test": [("A", "127.0.0.5")],
        "_25._tcp.mx.unsigned-a.test": [("SERVFAIL", "")],
        "signed-b.test": [("MX", "10 mx.unsigned-b.test."), sec],
        "mx.unsigned-b.test": [("A", "127.0.0.5")],
        "_25._tcp.mx.unsigned-b.test": [("TLSA", "3 1 1 " + "cd" * 32), sec],
        # a signed alias to an unsigned target: TLSA at the alias (its first link)
        "signed-c.test": [("MX", "10 mx.alias-c.test."), sec],
        "mx.alias-c.test": [("CNAME", "host.unsigned-c.test."), sec],
        "host.unsigned-c.test": [("A", "127.0.0.5")],
        "_25._tcp.mx.alias-c.test": [("TLSA", "3 1 1 " + "ef" * 32), sec],
        # an unsigned alias: nothing asked either
        "signed-d.test": [("MX", "10 mx.alias-d.test."), sec],
        "mx.alias-d.test": [("CNAME", "host.unsigned-c.test.")],
        "_25._tcp.mx.alias-d.test": [("SERVFAIL", "")],
    })  # fmt: skip
    cfg = _own_spool(world, 'dane = "on"\nmta_sts = "off"\n')

    async def go() -> list[Any]:
        r = MXResolver(cfg)
        return [await r.site_for(d) for d in ("signed-a.test", "signed-b.test", "signed-c.test",
                                               "signed-d.test")]  # fmt: skip

    world.dns.resolver.queries.clear()
    a, b, c, d = asyncio.run(go())
    for site in (a, b, d):
        assert isinstance(site, Site) and not site.dane, site
        assert site.hosts and not site.hosts[0].tlsa and "|dane:" not in site.key, site
    asked = {q for q, t in world.dns.resolver.queries if t == "TLSA"}
    assert asked == {"_25._tcp.mx.alias-c.test"}, asked
    assert isinstance(c, Site) and c.dane == "signed-c.test", c
    assert (c.hosts[0].tlsa, c.hosts[0].tlsa_name) == (((3, 1, 1, b"\xef" * 32),), "")


def test_dane_ta_through_a_cname_checks_the_target_name_end_to_end(world: World) -> None:
    """A DANE-TA record at the CNAME target of the MX host: the server's
    certificate names only the target (the provider's host), which is a
    reference identifier (the TLSA base domain, RFC 7672 3.2.2): delivered
    over TLS and counted as a tlsa session; a certificate naming neither is
    deferred 4.7.5."""
    port = free_port("127.0.0.1")
    cert = world.ca.issue_cert("host.target.test")
    crt, key = world.tmp / "t.crt", world.tmp / "t.key"
    crt.write_bytes(cert.cert_chain_pems[0].bytes() + world.ca.cert_pem.bytes())
    cert.private_key_pem.write_to_path(str(key))
    ta = f"2 0 1 {hashlib.sha256(_der(world.ca.cert_pem.bytes())).hexdigest()}"
    sec = ("SECURE", "")
    world.dns.set_zones({
        "cn-ta.test": [("MX", "10 mx.alias.test."), sec],
        "mx.alias.test": [("CNAME", "host.target.test."), sec],
        "host.target.test": [("A", "127.0.0.5"), sec],
        f"_{port}._tcp.host.target.test": [("TLSA", ta), sec],
        "cn-other.test": [("MX", "10 mx.other.test."), sec],
        "mx.other.test": [("CNAME", "host.other.test."), sec],
        "host.other.test": [("A", "127.0.0.5"), sec],
        f"_{port}._tcp.host.other.test": [("TLSA", ta), sec],  # the cert names no such host
    })  # fmt: skip
    camp = write_campaign(world.tmp)
    lst = write_recipients(world.tmp, ["u@cn-ta.test", "v@cn-other.test"])
    spool = world.tmp / "spool"
    log = world.tmp / "sink.jsonl"
    cfg = world.config(port, 'dane = "on"\nmta_sts = "off"\n')
    with SinkProcess(
        "--log", str(log), "--tls-cert", str(crt), "--tls-key", str(key),
        listen=f"127.0.0.5:{port}",
    ):  # fmt: skip
        proc = run_fastsend(
            "send", str(camp), "-r", str(lst), "-c", str(cfg),
            "--spool", str(spool), "--json", "--no-dkim", "--no-progress", "--max-wait", "1",
        )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert _received(log) == {"u@cn-ta.test": True}
    ev = _events(spool)
    deferred = [e for e in ev if e["event"] == "deferred"]
    assert [(e["rcpt"], e["enhanced"]) for e in deferred] == [("v@cn-other.test", "4.7.5")], deferred
    sessions = [e for e in ev if e["event"] == "tls_sessions"]
    assert {(e["policy_type"], e["policy_domain"]) for e in sessions} == {("tlsa", "cn-ta.test")}
