"""DMARC aggregate reports: safe parsing (sizes, no DTDs or entities), gzip and zip
attachments, rollups per reporter / source IP / alignment, and the real SMTP intake."""

from __future__ import annotations

import asyncio
import gzip
import io
import time
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from fastsend.analytics.dmarc import (
    MAX_XML,
    DmarcError,
    DmarcStore,
    extract_reports,
    ingest_mail,
    parse_report,
)
from fastsend.config import from_dict
from fastsend.serve.context import open_context
from fastsend.serve.listeners import start_listeners

BEGIN = int(time.time()) // 86400 * 86400 - 86400


def report(org: str = "google.com", rid: str = "r1", rows: Any = None,
           domain: str = "example.com") -> bytes:  # fmt: skip
    rows = rows or [("127.0.0.2", 120, "pass", "pass", "example.com", "example.com"),
                    ("203.0.113.9", 7, "fail", "fail", "example.com", "spammer.test")]
    recs = "".join(
        f"<record><row><source_ip>{ip}</source_ip><count>{n}</count><policy_evaluated>"
        f"<disposition>none</disposition><dkim>{dk}</dkim><spf>{sp}</spf></policy_evaluated>"
        f"</row><identifiers><header_from>{hf}</header_from></identifiers><auth_results>"
        f"<dkim><domain>{hf}</domain><result>{dk}</result></dkim>"
        f"<spf><domain>{spf_dom}</domain><result>pass</result></spf></auth_results></record>"
        for ip, n, dk, sp, hf, spf_dom in rows
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<feedback xmlns="http://dmarc.org/dmarc-xml/0.1">'
        f"<report_metadata><org_name>{org}</org_name><email>dmarc@{org}</email>"
        f"<report_id>{rid}</report_id><date_range><begin>{BEGIN}</begin>"
        f"<end>{BEGIN + 86399}</end></date_range></report_metadata>"
        f"<policy_published><domain>{domain}</domain><adkim>r</adkim><aspf>r</aspf>"
        f"<p>none</p><pct>100</pct></policy_published>{recs}</feedback>"
    ).encode()


def mail(attachment: bytes, filename: str, ctype: str, subject: str = "") -> bytes:
    m = EmailMessage()
    m["From"] = "noreply-dmarc-support@google.com"
    m["To"] = "dmarc@bounces.example.com"
    m["Subject"] = subject or "Report Domain: example.com Submitter: google.com Report-ID: <r1>"
    m.set_content("This is an aggregate report from google.com.")
    main, sub = ctype.split("/")
    m.add_attachment(attachment, maintype=main, subtype=sub, filename=filename)
    return m.as_bytes()


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def test_parse_a_report() -> None:
    r = parse_report(report())
    assert (r.org, r.report_id, r.domain, r.policy) == ("google.com", "r1", "example.com", "none")
    assert [(x.source_ip, x.count, x.dkim_eval, x.spf_eval) for x in r.records] == [
        ("127.0.0.2", 120, "pass", "pass"), ("203.0.113.9", 7, "fail", "fail")]
    assert r.records[1].spf == [("spammer.test", "pass")]


@pytest.mark.parametrize("doc,why", [
    (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
     b"<feedback>&b;</feedback>", "DOCTYPE"),  # entity expansion (billion laughs)
    (b'<?xml version="1.0"?><!DOCTYPE f [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
     b"<feedback>&x;</feedback>", "DOCTYPE"),  # an external entity
    (b'<!DOCTYPE feedback SYSTEM "http://127.0.0.1:1/dtd"><feedback/>', "DOCTYPE"),
    (b"<feedback><report_metadata>", "not well-formed"),
    (b"<html><body>hi</body></html>", "not a DMARC aggregate report"),
    (b"<feedback>" + b"<a>" * 40 + b"</a>" * 40 + b"</feedback>", "nested deeper"),
])  # fmt: skip
def test_unsafe_or_bad_xml_is_refused(doc: bytes, why: str) -> None:
    t = time.monotonic()
    with pytest.raises(DmarcError, match=why):
        parse_report(doc)
    assert time.monotonic() - t < 5


def test_attachments_gzip_zip_and_bombs() -> None:
    xml = report()
    for att, name, ctype in ((gzip.compress(xml), "google.com!example.com!1!2.xml.gz",
                              "application/gzip"),
                             (zipped("google.com!example.com!1!2.xml", xml),
                              "google.com!example.com!1!2.zip", "application/zip"),
                             (xml, "report.xml", "text/xml")):  # fmt: skip
        assert extract_reports(mail(att, name, ctype)) == [xml]
    bomb = gzip.compress(b"<feedback>" + b" " * (MAX_XML + 10))
    assert len(bomb) < MAX_XML // 100
    t = time.monotonic()
    with pytest.raises(DmarcError, match="larger than"):
        extract_reports(mail(bomb, "x.xml.gz", "application/gzip"))
    with pytest.raises(DmarcError, match="larger than"):
        extract_reports(mail(zipped("x.xml", b" " * (MAX_XML + 10)), "x.zip", "application/zip"))
    assert time.monotonic() - t < 30


def test_store_rolls_up_and_counts_a_report_once(tmp_path: Path) -> None:
    store = DmarcStore(str(tmp_path))
    m = mail(gzip.compress(report()), "r.xml.gz", "application/gzip")
    evs = ingest_mail(store, m)
    assert evs is not None and [e["event"] for e in evs] == ["dmarc_report"]
    assert evs[0]["messages"] == 127 and evs[0]["unaligned"] == 7
    assert ingest_mail(store, m) == []  # mailed twice: counted once
    ingest_mail(store, mail(report("yahoo.com", "y1", [("203.0.113.9", 3, "fail", "fail",
                                                          "example.com", "x.test")]),
                            "y.xml", "text/xml"))  # fmt: skip
    s = store.summary(BEGIN - 86400, time.time())
    assert s["reports"] == 2
    top = s["unaligned_sources"][0]
    assert (top["source_ip"], top["unaligned"], top["org"]) == ("203.0.113.9", 7, "google.com")
    assert {(u["source_ip"], u["org"]) for u in s["unaligned_sources"]} == {
        ("203.0.113.9", "google.com"), ("203.0.113.9", "yahoo.com")}
    ok = next(x for x in s["sources"] if x["source_ip"] == "127.0.0.2")
    assert ok["aligned"] == 120 and ok["unaligned"] == 0 and ok["dkim_aligned"] == 120
    # A DSN is not a report; a broken attachment in a non-report is the bounce parser's.
    dsn = b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x--\r\n"
    assert ingest_mail(store, dsn) is None
    assert ingest_mail(store, mail(b"PK\x03\x04junk", "a.zip", "application/zip",
                                   subject="your order")) is None  # fmt: skip
    refused = ingest_mail(store, mail(b"PK\x03\x04junk", "a.zip", "application/zip"))
    assert refused is not None and refused[0]["event"] == "dmarc_report_refused"


def test_reports_through_the_smtp_intake(tmp_path: Path) -> None:
    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")},
                     "intake": {"listen": "127.0.0.1:0",
                                "verp_domain": "bounces.example.com"}})  # fmt: skip
    ctx = open_context(cfg)
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)

    async def main() -> None:
        servers = await start_listeners(ctx)
        try:
            port = int(servers[0].sockets[0].getsockname()[1])
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            await smtp.connect()
            raw = mail(zipped("google.com!example.com.xml", report()), "g.zip", "application/zip")
            errors, reply = await smtp.sendmail("", ["dmarc@bounces.example.com"], raw)
            assert errors == {} and "1 event" in reply, reply
            await smtp.quit()
        finally:
            for s in servers:
                s.close()

    asyncio.run(main())
    assert [e["event"] for e in events] == ["dmarc_report"]
    s = ctx.dmarc.summary(BEGIN - 86400, time.time())
    assert s["unaligned_sources"][0]["source_ip"] == "203.0.113.9"
    ctx.close()


def test_the_intake_stores_reports_about_the_tenants_domains_only(tmp_path: Path) -> None:
    """Anyone can mail an aggregate report about any domain: with [tenants], a report
    whose policy domain is not a tenant's (or under one) is refused, not stored (it
    would fill dmarc.db and the view of where mail claiming our domains comes from)."""
    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")},
                     "tenants": {"acme": {"domains": ["example.com"]}},
                     "intake": {"listen": "127.0.0.1:0",
                                "verp_domain": "bounces.example.com"}})  # fmt: skip
    ctx = open_context(cfg)
    events: list[dict[str, Any]] = []
    ctx.events.listeners.append(events.extend)

    async def main() -> None:
        servers = await start_listeners(ctx)
        try:
            port = int(servers[0].sockets[0].getsockname()[1])
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            await smtp.connect()
            for rid, domain in (("a1", "victim.test"), ("a2", "mail.example.com"),
                                ("a3", "notexample.com")):  # fmt: skip
                raw = mail(zipped("r.xml", report(rid=rid, domain=domain)), "r.zip",
                           "application/zip", f"Report Domain: {domain} Submitter: google.com"
                           f" Report-ID: <{rid}>")  # fmt: skip
                errors, _ = await smtp.sendmail("", ["dmarc@bounces.example.com"], raw)
                assert errors == {}
            await smtp.quit()
        finally:
            for s in servers:
                s.close()

    asyncio.run(main())
    got = [(e["event"], e.get("domain") or e.get("error")) for e in events]
    assert got[1] == ("dmarc_report", "mail.example.com"), got
    assert [g[0] for g in got] == ["dmarc_report_refused", "dmarc_report", "dmarc_report_refused"]
    assert "victim.test" in got[0][1] and "notexample.com" in got[2][1], got
    s = ctx.dmarc.summary(BEGIN - 86400, time.time())
    assert s["reports"] == 1 and [d["domain"] for d in s["domains"]] == ["mail.example.com"], s
    ctx.close()
