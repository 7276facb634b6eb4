"""TLS-RPT aggregate reports (RFC 8460), end to end on loopback: a real `fastsend
send` under MTA-STS policies (the loopback DNS server, a trustme HTTPS policy
host, fastsend's sink with and without a valid certificate) counts its
sessions; `fastsend tls-report send` finds each policy domain's
``_smtp._tls`` record, POSTs the gzipped JSON to a real HTTPS receiver and
spools the report mail, which `fastsend resume` delivers to a real SMTP sink.
Every report is checked against RFC 8460 4.4's fields."""

from __future__ import annotations

import contextlib
import datetime
import email
import email.policy
import gzip
import http.server
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import run_fastsend, write_campaign, write_recipients
from tests.conftest import free_port
from tests.test_mta_sts import World, policy

from fastsend.analytics.tlsrpt import (
    RedisStore,
    Store,
    day_of,
    filename,
    message,
    open_store,
    parse_txt,
)
from fastsend.config import ConfigError, loader
from fastsend.sink import SinkProcess
from fastsend.testing.dnsserver import DNSServer

RESULT_TYPES = {
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
}  # fmt: skip
_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def check_report(doc: dict[str, Any]) -> None:
    """RFC 8460 4.4 (the JSON schema's required fields and types)."""
    assert isinstance(doc["organization-name"], str) and doc["organization-name"]
    dr = doc["date-range"]
    assert _DATETIME.fullmatch(dr["start-datetime"]) and _DATETIME.fullmatch(dr["end-datetime"])
    assert dr["start-datetime"] < dr["end-datetime"]
    assert isinstance(doc["contact-info"], str) and doc["contact-info"]
    assert isinstance(doc["report-id"], str) and doc["report-id"]
    assert isinstance(doc["policies"], list) and doc["policies"]
    for p in doc["policies"]:
        pol = p["policy"]
        assert pol["policy-type"] in ("sts", "tlsa", "no-policy-found")
        assert isinstance(pol["policy-domain"], str) and pol["policy-domain"]
        if pol["policy-type"] != "no-policy-found":
            assert pol["policy-string"] and all(isinstance(x, str) for x in pol["policy-string"])
        for x in pol.get("mx-host", []):
            assert isinstance(x, str)
        s = p["summary"]
        ok, bad = s["total-successful-session-count"], s["total-failure-session-count"]
        assert isinstance(ok, int) and isinstance(bad, int) and ok >= 0 and bad >= 0
        details = p.get("failure-details", [])
        assert sum(d["failed-session-count"] for d in details) <= bad
        for d in details:
            assert d["result-type"] in RESULT_TYPES, d
            assert isinstance(d["failed-session-count"], int) and d["failed-session-count"] > 0
            for k in ("sending-mta-ip", "receiving-mx-hostname", "receiving-ip",
                      "failure-reason-code", "additional-information"):  # fmt: skip
                assert isinstance(d.get(k, ""), str)


# ---------------------------------------------------------------- units


def test_rua_record_parsing() -> None:
    assert parse_txt(["v=TLSRPTv1; rua=mailto:a@b.test,https://r.test/x"]) == [
        "mailto:a@b.test", "https://r.test/x",
    ]  # fmt: skip
    assert parse_txt(["v=spf1 -all", "v=TLSRPTv1;rua=mailto:a@b.test"]) == ["mailto:a@b.test"]
    assert parse_txt(["v=TLSRPTv1; rua=mailto:a@b.test", "v=TLSRPTv1; rua=mailto:c@d.test"]) == []
    assert parse_txt(["v=TLSRPTv1; rua=http://plain.test/x, ftp://x, mailto:nobody"]) == []
    assert parse_txt(["v=TLSRPTv2; rua=mailto:a@b.test"]) == []
    assert parse_txt([]) == []
    # the record is the domain owner's to write: no header (nor a second
    # recipient) smuggled into the report mail through an escaped mailto
    hostile = ("v=TLSRPTv1; rua=mailto:x%0D%0ABcc:%20v@o.test@evil.test,mailto:a%20b@evil.test,"
               "mailto:ok@evil.test")  # fmt: skip
    assert parse_txt([hostile]) == ["mailto:ok@evil.test"]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """A spool's TLS-RPT store per call: the node's tlsrpt.db (SQLite), or a
    Redis spool's (each call a node of the same spool: ``node`` names it)."""
    from fastsend.spool import open_spool

    spools: list[Any] = []
    if request.param == "sqlite":
        yield lambda node: Store(str(tmp_path))
        return
    server = request.getfixturevalue("redis_server")
    prefix = "t" + os.urandom(4).hex()

    def make(node: str) -> Any:
        d = tmp_path / node
        d.mkdir(exist_ok=True)
        spools.append(open_spool(server.url(node=node, dir=str(d), prefix=prefix)))
        return open_store(None, spools[-1])

    yield make
    for sp in spools:
        sp.close()


def test_store_counts_and_the_report_document(make_store: Callable[[str], Any]) -> None:
    """Failures and session counts of sts, tlsa and no-policy-found policies
    give one policy entry each, its summary and failure details, per UTC day;
    a day is due once it is over, and not again once sent."""
    st = make_store("n1")
    d0 = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    t = (d0 - datetime.timedelta(days=3)).timestamp() + 12 * 3600  # counts kept KEEP_DAYS
    day1, day2, day3 = (day_of(t + i * 86400) for i in range(3))
    sts = {"policy_type": "sts", "policy_domain": "a.test", "mx_host": ["*.a.test"],
           "policy": ["version: STSv1", "mode: enforce", "mx: *.a.test", "max_age: 86400"]}
    tlsa = {"policy_type": "tlsa", "policy_domain": "a.test", "mx_host": ["mx.a.test"],
            "policy": ["3 1 1 ab"]}  # fmt: skip
    st.listener([
        {"event": "tls_sessions", "time": t, "count": 40, **sts},
        {"event": "tls_sessions", "time": t + 60, "count": 2, **sts},
        {"event": "tls_report", "time": t, "result": "certificate-expired", "source_ip": "192.0.2.1",
         "mx": "mx1.a.test", "receiving_ip": "198.51.100.7", "text": "certificate has expired", **sts},
        {"event": "tls_report", "time": t, "result": "certificate-expired", "source_ip": "192.0.2.1",
         "mx": "mx1.a.test", "receiving_ip": "198.51.100.7", "text": "certificate has expired", **sts},
        {"event": "tls_sessions", "time": t, "count": 5, **tlsa},
        {"event": "tls_report", "time": t, "result": "tlsa-invalid", "source_ip": "192.0.2.2",
         "mx": "mx.a.test", "receiving_ip": "198.51.100.8", "text": "no match", **tlsa},
        {"event": "tls_report", "time": t, "result": "sts-policy-fetch-error",
         "policy_type": "no-policy-found", "policy_domain": "b.test", "text": "HTTP 500"},
        {"event": "delivered", "time": t, "rcpt": "x@a.test"},  # not TLS-RPT's
        {"event": "tls_sessions", "time": t + 86400, "count": 1, **sts},  # the next day
    ])  # fmt: skip
    assert st.due(day1) == []
    assert st.due(day2) == [(day1, "a.test"), (day1, "b.test")]
    doc = st.report(day1, "a.test", organization="Org", contact="c@o.test", report_id="r1")
    check_report(doc)
    assert doc["date-range"] == {"start-datetime": f"{day1}T00:00:00Z",
                                 "end-datetime": f"{day1}T23:59:59Z"}  # fmt: skip
    by = {p["policy"]["policy-type"]: p for p in doc["policies"]}
    assert by["sts"]["summary"] == {"total-successful-session-count": 42,
                                    "total-failure-session-count": 2}  # fmt: skip
    assert by["sts"]["policy"]["policy-string"][1] == "mode: enforce"
    assert by["sts"]["policy"]["mx-host"] == ["*.a.test"]
    assert by["sts"]["failure-details"] == [{
        "result-type": "certificate-expired", "sending-mta-ip": "192.0.2.1",
        "receiving-mx-hostname": "mx1.a.test", "receiving-ip": "198.51.100.7",
        "failed-session-count": 2, "failure-reason-code": "certificate has expired",
    }]  # fmt: skip
    assert by["tlsa"]["summary"]["total-successful-session-count"] == 5
    assert by["tlsa"]["failure-details"][0]["result-type"] == "tlsa-invalid"
    nopol = st.report(day1, "b.test", organization="O", contact="c", report_id="r2")
    check_report(nopol)
    assert nopol["policies"][0]["policy"] == {"policy-type": "no-policy-found",
                                              "policy-domain": "b.test"}  # fmt: skip
    st.mark_sent(day1, "a.test", "https://r.test")
    assert st.due(day3) == [(day1, "b.test"), (day2, "a.test")]
    st.close()


@pytest.mark.parametrize("make_store", ["redis"], indirect=True)
def test_a_shared_spool_counts_every_node_in_one_report(make_store: Callable[[str], Any]) -> None:
    """Redis: each node's sessions go into the spool's one count (a domain got
    one report per node per day, each with that node's share only); one
    sender at a time (the report lease), and what one sent is not due for
    the other."""
    a, b = make_store("n1"), make_store("n2")
    assert isinstance(a, RedisStore) and isinstance(b, RedisStore)
    t = time.time() - 86400
    day = day_of(t)
    sts = {"policy_type": "sts", "policy_domain": "a.test", "mx_host": ["mx.a.test"],
           "policy": ["version: STSv1", "mode: enforce", "mx: mx.a.test", "max_age: 86400"]}
    fail = {"event": "tls_report", "time": t, "result": "certificate-expired",
            "source_ip": "192.0.2.1", "mx": "mx.a.test", "receiving_ip": "198.51.100.7",
            "text": "certificate has expired", **sts}  # fmt: skip
    a.listener([{"event": "tls_sessions", "time": t, "count": 40, **sts}, fail])
    b.listener([{"event": "tls_sessions", "time": t, "count": 2, **sts}, fail,
                {**fail, "source_ip": "192.0.2.2"}])  # fmt: skip
    assert a.due(day_of(time.time())) == b.due(day_of(time.time())) == [(day, "a.test")]
    doc = b.report(day, "a.test", organization="O", contact="c@o.test", report_id="r")
    check_report(doc)
    [p] = doc["policies"]
    assert p["summary"] == {"total-successful-session-count": 42, "total-failure-session-count": 3}
    assert [(d["sending-mta-ip"], d["failed-session-count"]) for d in p["failure-details"]] == [
        ("192.0.2.1", 2), ("192.0.2.2", 1)]  # fmt: skip
    with a.sending() as mine:
        assert mine
        with b.sending() as theirs:
            assert not theirs
        a.mark_sent(day, "a.test", "https://r.test")
    assert b.due(day_of(time.time())) == [] and b.was_sent(day, "a.test")
    with b.sending() as mine:
        assert mine  # released


def test_report_message_format_rfc8460_5_3() -> None:
    report = {"organization-name": "O", "date-range": {"start-datetime": "2026-03-01T00:00:00Z",
              "end-datetime": "2026-03-01T23:59:59Z"}, "contact-info": "c@s.test",
              "report-id": "rid-1", "policies": [{"policy": {"policy-type": "sts",
              "policy-domain": "d.test"}, "summary": {"total-successful-session-count": 3,
              "total-failure-session-count": 1}}]}  # fmt: skip
    gz = gzip.compress(orjson.dumps(report))
    raw = message(report, gz, domain="d.test", submitter="s.test", sender="tls@s.test",
                  to=["rua@d.test"], unique="u1", now=time.time())  # fmt: skip
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    m = email.message_from_bytes(raw, policy=email.policy.default)
    assert m["TLS-Report-Domain"] == "d.test" and m["TLS-Report-Submitter"] == "s.test"
    assert m["Subject"] == "Report Domain: d.test Submitter: s.test Report-ID: <rid-1>"
    assert m.get_content_type() == "multipart/report"
    assert m.get_param("report-type") == "tlsrpt"
    parts = list(m.iter_parts())
    assert parts[0].get_content_type() == "text/plain"
    att = parts[1]
    assert att.get_content_type() == "application/tlsrpt+gzip"
    start = int(datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC).timestamp())
    assert att.get_filename() == f"s.test!d.test!{start}!{start + 86399}!u1.json.gz"
    assert att.get_filename() == filename("s.test", "d.test", start, start + 86399, "u1")
    assert orjson.loads(gzip.decompress(att.get_content())) == report


def test_report_config(tmp_path: Path) -> None:
    cfg = loader.from_dict({"tls": {"reports": "on", "report_from": "tls@s.test"}})
    assert cfg.tls.reports == "on" and cfg.tls.report_from == "tls@s.test"
    with pytest.raises(ConfigError, match="report_from"):
        loader.from_dict({"tls": {"reports": "on"}})
    for bad in ("no-at", "Name <a@b.test>", "a@b.test\r\nBcc: x@y.test", "a@localhost"):
        with pytest.raises(ConfigError, match="report_from"):
            loader.from_dict({"tls": {"report_from": bad}})
    with pytest.raises(ConfigError, match="reports"):
        loader.from_dict({"tls": {"reports": "yes"}})
    # RFC 8460 3: the report mail is DKIM-signed by its domain: unsigned is said
    unsigned = loader.from_dict({"tls": {"report_from": "tls@S.test"}})
    assert any("no [dkim] key for s.test" in w for w in unsigned.warnings), unsigned.warnings
    signed = loader.from_dict({"tls": {"report_from": "tls@s.test"},
                               "dkim": {"domain": "s.test", "selector": "s", "key": "k.pem"}})  # fmt: skip
    assert not any("report_from" in w for w in signed.warnings), signed.warnings


# ---------------------------------------------------------------- end to end


class ReportReceiver:
    """HTTPS on 127.0.0.1 taking POSTed reports (trustme certificate)."""

    def __init__(self, cert: Any) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                outer.posts.append((self.path, dict(self.headers.items()), body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def world(tmp_path: Path, dns_server: DNSServer) -> Iterator[World]:
    w = World(tmp_path, dns_server)
    try:
        yield w
    finally:
        w.https.close()


def test_reports_from_a_real_send_posted_and_mailed(world: World) -> None:
    port = free_port("127.0.0.1")
    good = world.pem("good", "mx.ok.test")
    bad = world.pem("bad", "wrong-name.test")
    receiver = ReportReceiver(world.ca.issue_cert("rpt.reports.test"))
    # the report mail's own domain enforces MTA-STS and its MX offers no STARTTLS:
    # the report goes anyway (RFC 8460 5.3: despite any TLS-related failures)
    rua = "v=TLSRPTv1; rua=mailto:tlsrpt@enforce-notls.test,https://rpt.reports.test/v1/tlsrpt"
    world.dns.set_zones({
        "enforce-ok.test": [("MX", "10 mx.ok.test.")],
        "enforce-badcert.test": [("MX", "10 mx.bad.test.")],
        "mx.ok.test": [("A", "127.0.0.1")],
        "mx.bad.test": [("A", "127.0.0.3")],
        "_mta-sts.enforce-ok.test": [("TXT", "v=STSv1; id=1")],
        "_mta-sts.enforce-badcert.test": [("TXT", "v=STSv1; id=1")],
        "mta-sts.enforce-ok.test": [("A", "127.0.0.1")],
        "mta-sts.enforce-badcert.test": [("A", "127.0.0.1")],
        "_smtp._tls.enforce-ok.test": [("TXT", rua)],
        "_smtp._tls.enforce-badcert.test": [("TXT", "v=TLSRPTv1; rua=https://rpt.reports.test/b")],
        "rpt.reports.test": [("A", "127.0.0.1")],
        "enforce-notls.test": [("MX", "10 mx.reports.test.")],
        "_mta-sts.enforce-notls.test": [("TXT", "v=STSv1; id=1")],
        "mta-sts.enforce-notls.test": [("A", "127.0.0.1")],
        "mx.reports.test": [("A", "127.0.0.6")],
        # the report mail's own session is not one to report (RFC 8460 5.3)
        "_smtp._tls.enforce-notls.test": [("TXT", "v=TLSRPTv1; rua=mailto:x@enforce-notls.test")],
    })  # fmt: skip
    world.https.policies["mta-sts.enforce-ok.test"] = policy("enforce", "mx.ok.test")
    world.https.policies["mta-sts.enforce-badcert.test"] = policy("enforce", "mx.bad.test")
    world.https.policies["mta-sts.enforce-notls.test"] = policy("enforce", "mx.reports.test")
    cfg = world.config(
        port, f'report_from = "tls-reports@sender.test"\nreport_post_port = {receiver.port}\n'
        'report_organization = "Sender Org"\n'
        # tenants configured: the report mail is the operator's, its From no tenant's
        '[tenants.acme]\ndomains = ["acme.test"]\n',
    )  # fmt: skip
    spool = world.tmp / "spool"
    saved = world.tmp / "saved"
    saved.mkdir()
    camp = write_campaign(world.tmp)
    lst = write_recipients(world.tmp, ["u@enforce-ok.test", "v@enforce-ok.test", "u@enforce-badcert.test"])
    common = ("-c", str(cfg), "--spool", str(spool))
    try:
        with (
            SinkProcess("--tls-cert", good[0], "--tls-key", good[1], listen=f"127.0.0.1:{port}"),
            SinkProcess("--tls-cert", bad[0], "--tls-key", bad[1], listen=f"127.0.0.3:{port}"),
            SinkProcess("--save", str(saved), listen=f"127.0.0.6:{port}"),
        ):
            proc = run_fastsend("send", str(camp), "-r", str(lst), *common, "--json", "--no-dkim",
                                "--no-progress", "--max-wait", "1")  # fmt: skip
            assert proc.returncode in (0, 1), proc.stderr[-3000:]
            today = day_of(time.time())
            st = Store(str(spool))
            counted = st.report(today, "enforce-ok.test", organization="o", contact="c", report_id="x")
            bad_counted = st.report(today, "enforce-badcert.test", organization="o", contact="c",
                                    report_id="y")  # fmt: skip
            st.close()
            ok_sum = counted["policies"][0]["summary"]
            assert ok_sum["total-successful-session-count"] >= 1, counted
            assert ok_sum["total-failure-session-count"] == 0, counted
            assert bad_counted["policies"][0]["summary"]["total-failure-session-count"] >= 1
            detail = bad_counted["policies"][0]["failure-details"][0]
            assert detail["result-type"] == "certificate-host-mismatch", detail
            assert detail["receiving-mx-hostname"] == "mx.bad.test", detail
            assert detail["receiving-ip"] == "127.0.0.3" and detail["sending-mta-ip"] == "127.0.0.2"
            # nothing due before the day is over; --day sends that day's
            rep = run_fastsend("tls-report", "send", *common, "--json")
            assert rep.returncode == 0, rep.stderr
            assert orjson.loads(rep.stdout)["reports"] == []
            # the report mail is delivered by the command itself (no serve runs):
            # it was only spooled, and nothing delivered it
            rep = run_fastsend("tls-report", "send", *common, "--day", today, "--json",
                               "--max-wait", "2")  # fmt: skip
            assert rep.returncode == 0, rep.stderr + rep.stdout
            out = orjson.loads(rep.stdout)
            assert out["mail_spooled"] == 1, out
            assert out["mail"] == {"delivered": 1, "deferred": 0, "bounced": 0}, out
            st = Store(str(spool))
            assert st.domains(today) == ["enforce-badcert.test", "enforce-ok.test"]
            st.close()
    finally:
        receiver.close()
    # HTTPS: one POST per domain, gzipped JSON of its own policy domain
    assert sorted(p[0] for p in receiver.posts) == ["/b", "/v1/tlsrpt"], receiver.posts
    for path, headers, body in receiver.posts:
        assert headers["Content-Type"] == "application/tlsrpt+gzip"
        doc = orjson.loads(gzip.decompress(body))
        check_report(doc)
        want = "enforce-ok.test" if path == "/v1/tlsrpt" else "enforce-badcert.test"
        assert {p["policy"]["policy-domain"] for p in doc["policies"]} == {want}
        assert doc["organization-name"] == "Sender Org"
        assert doc["contact-info"] == "tls-reports@sender.test"
    # mail: delivered by fastsend's own queue to the rua's MX
    files = list(saved.iterdir())
    assert len(files) == 1, files
    m = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert m["TLS-Report-Domain"] == "enforce-ok.test"
    assert m["TLS-Report-Submitter"] == "sender.test"
    assert m["To"] == "tlsrpt@enforce-notls.test" and m["From"] == "tls-reports@sender.test"
    assert m.get_content_type() == "multipart/report" and m.get_param("report-type") == "tlsrpt"
    att = next(p for p in m.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip")
    assert (att.get_filename() or "").startswith("sender.test!enforce-ok.test!")
    doc = orjson.loads(gzip.decompress(att.get_content()))
    check_report(doc)
    assert doc["policies"][0]["policy"]["policy-string"][1] == "mode: enforce"
    assert doc["policies"][0]["summary"]["total-successful-session-count"] >= 1
    # sent: not again
    rep = run_fastsend("tls-report", "send", *common, "--json")
    assert orjson.loads(rep.stdout)["reports"] == []


def test_sessions_without_a_policy_counted_for_domains_asking_for_reports(world: World) -> None:
    """RFC 8460 4.4: a domain that publishes a TLS-RPT record but no policy gets
    its sessions reported as no-policy-found: TLS negotiated is a success, an
    MX offering no STARTTLS a starttls-not-supported failure (the mail still
    goes, as without a policy); a domain without the record is not counted.
    They were not counted at all: such a domain got no report."""
    port = free_port("127.0.0.1")
    good = world.pem("good", "mx.ok.test")
    rua = "v=TLSRPTv1; rua=https://rpt.reports.test/v1"
    world.dns.set_zones({
        "np-tls.test": [("MX", "10 mx.ok.test.")],
        "np-also.test": [("MX", "10 mx.ok.test.")],
        "np-plain.test": [("MX", "10 mx.plain.test.")],
        "np-none.test": [("MX", "10 mx.ok.test.")],
        "mx.ok.test": [("A", "127.0.0.1")],
        "mx.plain.test": [("A", "127.0.0.6")],
        "_smtp._tls.np-tls.test": [("TXT", rua)],
        "_smtp._tls.np-also.test": [("TXT", rua)],
        "_smtp._tls.np-plain.test": [("TXT", rua)],
    })  # fmt: skip
    cfg = world.config(port, 'report_from = "tls-reports@sender.test"\n')
    spool = world.tmp / "spool"
    camp = write_campaign(world.tmp)
    rcpts = ["a@np-tls.test", "b@NP-TLS.test", "c@np-also.test", "d@np-plain.test",
             "e@np-none.test"]  # fmt: skip
    lst = write_recipients(world.tmp, rcpts)
    with (
        SinkProcess("--tls-cert", good[0], "--tls-key", good[1], listen=f"127.0.0.1:{port}"),
        SinkProcess(listen=f"127.0.0.6:{port}"),
    ):
        proc = run_fastsend("send", str(camp), "-r", str(lst), "-c", str(cfg), "--spool",
                            str(spool), "--json", "--no-dkim", "--no-progress", "--max-wait", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert orjson.loads(proc.stdout)["delivered"] == len(rcpts)
    today = day_of(time.time())
    st = Store(str(spool))
    try:
        assert st.due("9999-12-31") == [(today, d) for d in
                                        ("np-also.test", "np-plain.test", "np-tls.test")]  # fmt: skip
        docs = {d: st.report(today, d, organization="o", contact="c", report_id="r")
                for d in ("np-tls.test", "np-also.test", "np-plain.test")}  # fmt: skip
    finally:
        st.close()
    for doc in docs.values():
        check_report(doc)
        assert [p["policy"]["policy-type"] for p in doc["policies"]] == ["no-policy-found"]
    ok = docs["np-tls.test"]["policies"][0]
    # both recipients went on one session at most per connection: >= 1, never a failure
    assert ok["summary"]["total-successful-session-count"] >= 1, ok
    assert ok["summary"]["total-failure-session-count"] == 0, ok
    assert docs["np-also.test"]["policies"][0]["summary"]["total-successful-session-count"] >= 1
    plain = docs["np-plain.test"]["policies"][0]
    assert plain["summary"]["total-successful-session-count"] == 0, plain
    assert plain["summary"]["total-failure-session-count"] >= 1, plain
    d = plain["failure-details"][0]
    assert d["result-type"] == "starttls-not-supported", d
    assert d["receiving-mx-hostname"] == "mx.plain.test" and d["receiving-ip"] == "127.0.0.6", d


def test_report_mail_left_to_the_live_supervisor_or_said_deferred(world: World) -> None:
    """`tls-report send` with a live process supervising the spool leaves the
    report mail to it and names it (exit 0); with none, it delivers the mail
    itself, and mail it could not deliver by --max-wait is said to be deferred
    (exit 75, still queued): before, it only spooled the mail and exited 0
    whether or not anything would ever deliver it."""
    from fastsend.spool import open_spool

    rua = "v=TLSRPTv1; rua=mailto:tlsrpt@rua.test"
    world.dns.set_zones({
        "_smtp._tls.a.test": [("TXT", rua)],
        "rua.test": [("MX", "10 mx.rua.test.")],
        "mx.rua.test": [("A", "127.0.0.7")],  # nothing listens there: deferred
    })  # fmt: skip
    cfg = world.config(free_port("127.0.0.7"), 'report_from = "tls-reports@sender.test"\n')
    spool = world.tmp / "spool"
    sp = open_spool(str(spool))
    sp.close()
    day = day_of(time.time() - 86400)
    t = time.time() - 86400
    st = Store(str(spool))
    st.listener([{"event": "tls_sessions", "time": t, "count": 3, "policy_type": "sts",
                  "policy_domain": "a.test", "policy": ["version: STSv1"], "mx_host": []}])  # fmt: skip
    st.close()
    common = ("-c", str(cfg), "--spool", str(spool))
    holder = open_spool(str(spool))
    try:
        holder.hold_supervisor("fastsend serve")
        rep = run_fastsend("tls-report", "send", *common, "--day", day)
        assert rep.returncode == 0, rep.stderr + rep.stdout
        assert "1 report message(s) spooled" in rep.stdout, rep.stdout
        assert f"the running fastsend serve (pid {os.getpid()}) delivers them" in rep.stdout
    finally:
        holder.close()
    rep = run_fastsend("tls-report", "send", *common, "--day", day, "--json", "--max-wait", "1")
    assert rep.returncode == 75, rep.stderr + rep.stdout
    # (the message the "live" one was left, and the one --day spooled again)
    assert orjson.loads(rep.stdout)["mail"] == {"delivered": 0, "deferred": 2, "bounced": 0}
    assert "still deferred" in rep.stderr


def test_tls_report_send_on_a_redis_spool_sends_every_nodes_counts_once(
    world: World, redis_server: Any
) -> None:
    """`tls-report send` on a shared spool reads the spool's counts (every
    node's, in Redis): one POST with the sum, then nothing due for any node."""
    from fastsend.spool import open_spool

    receiver = ReportReceiver(world.ca.issue_cert("rpt.reports.test"))
    world.dns.set_zones({
        "_smtp._tls.a.test": [("TXT", "v=TLSRPTv1; rua=https://rpt.reports.test/r")],
        "rpt.reports.test": [("A", "127.0.0.1")],
    })  # fmt: skip
    prefix = "t" + os.urandom(4).hex()
    t = time.time() - 86400
    sts = {"policy_type": "sts", "policy_domain": "a.test", "mx_host": ["mx.a.test"],
           "policy": ["version: STSv1", "mode: enforce", "mx: mx.a.test", "max_age: 86400"]}
    urls = {}
    for node, n in (("n1", 5), ("n2", 7)):
        d = world.tmp / node
        d.mkdir()
        urls[node] = redis_server.url(node=node, dir=str(d), prefix=prefix)
        sp = open_spool(urls[node])
        open_store(None, sp).listener([{"event": "tls_sessions", "time": t, "count": n, **sts}])
        sp.close()
    cfg = world.config(25, f'report_from = "tls-reports@sender.test"\nreport_post_port = {receiver.port}\n')
    try:
        rep = run_fastsend("tls-report", "send", "-c", str(cfg), "--spool", urls["n2"], "--json")
        assert rep.returncode == 0, rep.stderr + rep.stdout
        assert [o["domain"] for o in orjson.loads(rep.stdout)["reports"]] == ["a.test"]
        rep = run_fastsend("tls-report", "send", "-c", str(cfg), "--spool", urls["n1"], "--json")
        assert rep.returncode == 0 and orjson.loads(rep.stdout)["reports"] == [], rep.stdout
    finally:
        receiver.close()
    [(_path, _headers, body)] = receiver.posts
    doc = orjson.loads(gzip.decompress(body))
    check_report(doc)
    assert doc["policies"][0]["summary"]["total-successful-session-count"] == 12


def test_tls_report_on_a_spool_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    """A mistyped --spool made a new empty directory and answered "no report
    due" (exit 0): a cron job would never send a report, silently."""
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text('[tls]\nreport_from = "tls@sender.test"\n')
    for action in ("send", "show"):
        rep = run_fastsend("tls-report", action, "-c", str(cfg), "--spool", str(tmp_path / "typo"))
        assert rep.returncode == 2, (action, rep.stdout, rep.stderr)
        assert "error" in rep.stderr and not (tmp_path / "typo").exists(), rep.stderr


class HangingHTTPS:
    """A report destination that takes connections and never answers (not even
    the TLS handshake) until ``release``; counts how many it holds at once."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.most = 0
        self.released = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.released:
                    conn.close()
                    continue
                self.held.append(conn)
                self.most = max(self.most, len(self.held))

    def release(self) -> None:
        with self.lock:
            self.released = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept; a close alone doesn't)
        self.sock.close()
        with self.lock:
            for c in self.held:
                c.close()
            self.held.clear()


def test_hanging_report_destinations_do_not_hold_back_other_domains(world: World) -> None:
    """Five domains whose rua URIs never answer, one whose does: the good
    domain's report is POSTed (and the others' POSTs are all in flight at once)
    while the hanging ones still hang -- sent one after another, the good one
    waited up to POST_TIMEOUT per hanging domain before it (150 s)."""
    import asyncio

    from fastsend.analytics import tlsrpt
    from fastsend.delivery.mx import MXResolver

    assert tlsrpt.POST_CONCURRENCY > 5 and tlsrpt.SEND_CONCURRENCY > 5
    receiver = ReportReceiver(world.ca.issue_cert("rpt.good.test"))
    hang = HangingHTTPS()
    zones: dict[str, list[tuple[str, str]]] = {"rpt.good.test": [("A", "127.0.0.1")],
                                                "rpt.hang.test": [("A", "127.0.0.1")]}  # fmt: skip
    bad = [f"hang{i}.test" for i in range(5)]
    for d in bad:
        zones[f"_smtp._tls.{d}"] = [("TXT", f"v=TLSRPTv1; rua=https://rpt.hang.test:{hang.port}/{d}")]
    zones["_smtp._tls.ok.test"] = [("TXT", f"v=TLSRPTv1; rua=https://rpt.good.test:{receiver.port}/g")]
    world.dns.set_zones(zones)
    cfg = loader.load(str(world.config(free_port("127.0.0.1"), 'report_from = "tls@sender.test"\n')))
    spool = world.tmp / "spool"
    spool.mkdir(exist_ok=True)
    t = time.time() - 86400
    result: list[Any] = []

    def run() -> None:  # (the store's SQLite connection is this thread's)
        st = Store(str(spool))
        # the hanging domains come first in the due order
        st.listener([{"event": "tls_report", "time": t, "result": "sts-policy-fetch-error",
                      "policy_type": "no-policy-found", "policy_domain": d, "text": "HTTP 500"}
                     for d in [*bad, "ok.test"]])  # fmt: skip
        sender = tlsrpt.Sender(cfg, st, MXResolver(cfg), lambda rows: None)
        result.append(asyncio.run(sender.run(day_of(time.time()))))
        st.close()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 20  # far below one POST_TIMEOUT (30 s): a hang's only
        while time.monotonic() < deadline and not (receiver.posts and hang.most >= 5):
            time.sleep(0.05)
        assert receiver.posts, f"the good domain waited behind hanging ones (held {hang.most})"
        assert hang.most == 5, hang.most  # one per hanging domain, all at once
    finally:
        hang.release()
        runner.join(60)
        receiver.close()
    assert not runner.is_alive()
    by = {o["domain"]: o for o in result[0]}
    assert by["ok.test"]["posted"] == [f"https://rpt.good.test:{receiver.port}/g"]
    for d in bad:
        assert by[d]["posted"] == [] and len(by[d]["failed"]) == 1, by[d]
    # sent once anything took it: the hanging domains are due again, the good one not
    st = Store(str(spool))
    assert [d for _day, d in st.due(day_of(time.time()))] == bad
    st.close()
