"""DMARC aggregate reports (RFC 7489 section 7.2, "rua"): intake, safe parsing, rollups.

NAME
    fastsend.analytics.dmarc -- read_mail, store_reports, parse_report, DmarcStore,
    ingest_mail.

DESCRIPTION
    Mailbox providers send a daily XML report per domain to the address in the
    domain's DMARC record (``rua=mailto:...``), usually as a gzip or zip
    attachment. Point ``rua`` at an address the bounce intake accepts (any
    address at ``[intake] verp_domain``): :func:`ingest_mail` recognises a
    report by its attachment, unpacks it and parses it; everything else goes on
    to the bounce/ARF parser.

    Safety (the XML comes from anyone who can send mail):

    - sizes: a message part at most ``MAX_PART`` bytes, a decompressed report
      at most ``MAX_XML`` (gzip is inflated in steps with a ceiling; a zip
      member's declared size is checked and its stream cut at the ceiling);
      at most ``MAX_MEMBERS`` zip members and ``MAX_RECORDS`` records;
    - XML: the standard library's expat with any DOCTYPE refused (so no
      entity declarations, no entity expansion, no external entities or DTDs)
      and a depth limit; a report that breaks a rule is refused with a
      :class:`DmarcError` naming it, never half-stored;
    - CPU: ``fastsend serve`` unpacks and parses (:func:`read_mail`) in the
      intake's parse process, under its size and CPU-time caps
      (:mod:`fastsend.serve.parsepool`); only storing the parsed report runs
      in the server.

    :class:`DmarcStore` (``<spool>/dmarc.db``) keeps each report once (by
    reporting org and report id: a report mailed twice counts once) and rolls
    records up per day x policy domain x reporting org x source IP x header
    From x DKIM domain/result x SPF domain/result x disposition, with DKIM and
    SPF alignment (the report's policy_evaluated results: "pass" there is an
    aligned pass). :meth:`DmarcStore.summary` answers where mail claiming a
    domain came from, aligned or not.

DELIBERATELY NOT HERE
    No forensic (ruf) reports (ARF, the bounce parser's), no policy advice.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import logging
import os
import socket
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any
from xml.parsers import expat

import orjson

from fastsend.sqlitedb import connect, transaction

log = logging.getLogger("fastsend.analytics.dmarc")

MAX_PART = 10 << 20  # bytes of one attachment as mailed
MAX_XML = 50 << 20  # bytes of one decompressed report
MAX_MEMBERS = 4  # zip members looked at
MAX_RECORDS = 200_000
MAX_DEPTH = 16
MAX_TEXT = 1024  # characters kept of any text value


class DmarcError(ValueError):
    """A report that cannot be taken: too big, not XML, DTDs, not a DMARC report."""


@dataclass
class Record:
    source_ip: str
    count: int
    disposition: str
    dkim_eval: str
    spf_eval: str
    header_from: str
    dkim: list[tuple[str, str]] = field(default_factory=list)  # (domain, result)
    spf: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Report:
    org: str
    report_id: str
    begin: int
    end: int
    domain: str
    policy: str
    records: list[Record]


# -- unpacking ------------------------------------------------------------------------

def _inflate_gzip(data: bytes) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    buf = data
    while buf:
        out += d.decompress(buf, MAX_XML + 1 - len(out))
        if len(out) > MAX_XML:
            raise DmarcError(f"report larger than {MAX_XML} bytes when decompressed")
        buf = d.unconsumed_tail
        if d.eof:
            break
    if not d.eof:
        raise DmarcError("truncated gzip data")
    return bytes(out)


def _unzip(data: bytes) -> list[bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise DmarcError(f"bad zip: {e}") from None
    out = []
    for info in zf.infolist()[:MAX_MEMBERS]:
        if info.is_dir() or not info.filename.lower().endswith(".xml"):
            continue
        if info.file_size > MAX_XML:
            raise DmarcError(f"zip member larger than {MAX_XML} bytes")
        with zf.open(info) as f:
            body = f.read(MAX_XML + 1)
        if len(body) > MAX_XML:
            raise DmarcError(f"zip member larger than {MAX_XML} bytes")
        out.append(body)
    return out


def unpack(data: bytes, name: str = "", ctype: str = "") -> list[bytes]:
    """The XML documents in one attachment (gzip, zip or plain XML)."""
    if len(data) > MAX_PART:
        raise DmarcError(f"attachment larger than {MAX_PART} bytes")
    n = name.lower()
    if data[:2] == b"\x1f\x8b" or n.endswith(".gz"):
        return [_inflate_gzip(data)]
    if data[:4] == b"PK\x03\x04" or n.endswith(".zip"):
        return _unzip(data)
    if data.lstrip()[:1] == b"<" or "xml" in ctype:
        return [data]
    return []


_REPORT_TYPES = ("application/zip", "application/x-zip-compressed", "application/gzip",
                 "application/x-gzip", "application/xml", "text/xml",
                 "application/octet-stream")  # fmt: skip


def extract_reports(message: bytes) -> list[bytes]:
    """The report documents attached to (or forming) one mail message."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(message)
    out: list[bytes] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        name = part.get_filename() or ""
        if ctype not in _REPORT_TYPES and not name.lower().endswith((".zip", ".gz", ".xml")):
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and payload:
            out.extend(unpack(payload, name, ctype))
    return out


# -- parsing ---------------------------------------------------------------------------

def parse_report(xml: bytes) -> Report:
    """One aggregate report; DmarcError if the XML is unsafe, malformed or not a report."""
    if len(xml) > MAX_XML:
        raise DmarcError(f"report larger than {MAX_XML} bytes")
    p = expat.ParserCreate()
    stack: list[str] = []
    text: list[str] = []
    meta: dict[str, str] = {}
    records: list[Record] = []
    rec: dict[str, Any] = {}
    auth: dict[str, str] = {}

    def refuse(*_a: Any) -> Any:
        raise DmarcError("a DOCTYPE or entity declaration: refused (no DTDs in reports)")

    def start(name: str, _attrs: dict[str, str]) -> None:
        stack.append(name)
        if len(stack) > MAX_DEPTH:
            raise DmarcError(f"XML nested deeper than {MAX_DEPTH}")
        text.clear()
        if name == "record":
            rec.clear()
            rec.update(dkim=[], spf=[])
        elif name in ("dkim", "spf") and "auth_results" in stack:
            auth.clear()

    def end(name: str) -> None:
        value = "".join(text).strip()[:MAX_TEXT]
        text.clear()
        stack.pop()
        if name == "record":
            if len(records) >= MAX_RECORDS:
                raise DmarcError(f"more than {MAX_RECORDS} records")
            try:
                count = int(rec.get("count", "0"))
            except ValueError:
                raise DmarcError("record count is not a number") from None
            if not rec.get("source_ip") or count < 0:
                raise DmarcError("record without source_ip or with a negative count")
            records.append(Record(rec["source_ip"], count, rec.get("disposition", ""),
                                  rec.get("pe_dkim", ""), rec.get("pe_spf", ""),
                                  rec.get("header_from", "").lower(), rec["dkim"],
                                  rec["spf"]))  # fmt: skip
            return
        if "record" in stack:
            parent = stack[-1]
            if parent == "auth_results" and name in ("dkim", "spf"):
                rec[name].append((auth.get("domain", "").lower(), auth.get("result", "")))
            elif parent in ("dkim", "spf") and len(stack) > 1 and stack[-2] == "auth_results":
                auth[name] = value
            elif parent == "policy_evaluated" and name in ("dkim", "spf", "disposition"):
                rec["pe_" + name if name != "disposition" else name] = value
            elif name in ("source_ip", "count", "header_from"):
                rec[name] = value
            return
        if name in ("org_name", "report_id", "begin", "end") and "report_metadata" in stack:
            meta[name] = value
        elif name in ("domain", "p") and stack and stack[-1] == "policy_published":
            meta["policy_" + name] = value

    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    p.ExternalEntityRefHandler = refuse
    p.StartElementHandler = start
    p.EndElementHandler = end
    def chars(data: str) -> None:
        if len(text) < 64:  # a value is short; more pieces than this is padding
            text.append(data)

    p.CharacterDataHandler = chars
    try:
        p.Parse(xml, True)
    except expat.ExpatError as e:
        raise DmarcError(f"not well-formed XML: {e}") from None
    if not meta.get("org_name") or not meta.get("report_id") or not meta.get("policy_domain"):
        raise DmarcError("not a DMARC aggregate report (no report_metadata or policy_published)")
    try:
        begin, end_ = int(meta.get("begin", "0")), int(meta.get("end", "0"))
    except ValueError:
        raise DmarcError("date_range is not unix seconds") from None
    return Report(meta["org_name"], meta["report_id"], begin, end_,
                  meta["policy_domain"].lower(), meta.get("policy_p", ""), records)  # fmt: skip


# -- the store -------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    org TEXT NOT NULL, report_id TEXT NOT NULL, domain TEXT NOT NULL,
    begin INTEGER NOT NULL, end INTEGER NOT NULL, received REAL NOT NULL, records INTEGER NOT NULL,
    PRIMARY KEY (org, report_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rows (
    day INTEGER NOT NULL, domain TEXT NOT NULL, org TEXT NOT NULL, source_ip TEXT NOT NULL,
    header_from TEXT NOT NULL, dkim_domain TEXT NOT NULL, dkim_result TEXT NOT NULL,
    spf_domain TEXT NOT NULL, spf_result TEXT NOT NULL, disposition TEXT NOT NULL,
    dkim_aligned INTEGER NOT NULL, spf_aligned INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (day, domain, org, source_ip, header_from, dkim_domain, dkim_result,
                 spf_domain, spf_result, disposition, dkim_aligned, spf_aligned)
) WITHOUT ROWID;
"""


def _pick(results: list[tuple[str, str]]) -> tuple[str, str]:
    for dom, res in results:
        if res == "pass":
            return dom, res
    return results[0] if results else ("", "none")


class DmarcStore:
    def __init__(self, spool_dir: str) -> None:
        # The server stores reports from a thread (a large report is many rows):
        # one connection, used under a lock.
        self.db = connect(os.path.join(spool_dir, "dmarc.db"), schema=_SCHEMA, threads=True)
        self.lock = threading.Lock()

    def add(self, r: Report) -> bool:
        """Store a report (one transaction); False if this org's report id was seen."""
        with self.lock:
            return self._add(r)

    def _add(self, r: Report) -> bool:
        db = self.db
        with transaction(db, immediate=False):
            cur = db.execute(
                "INSERT INTO reports VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (r.org, r.report_id, r.domain, r.begin, r.end, time.time(), len(r.records)),
            )
            if cur.rowcount != 1:
                return False  # seen: nothing was written
            day = (r.begin or int(time.time())) // 86400 * 86400
            rows = []
            for rec in r.records:
                dd, dr = _pick(rec.dkim)
                sd, sr = _pick(rec.spf)
                rows.append((day, r.domain, r.org, rec.source_ip, rec.header_from or r.domain,
                             dd, dr, sd, sr, rec.disposition, int(rec.dkim_eval == "pass"),
                             int(rec.spf_eval == "pass"), rec.count))  # fmt: skip
            db.executemany(
                "INSERT INTO rows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE"
                " SET n = n + excluded.n", rows)  # fmt: skip
        return True

    def summary(self, t0: float, t1: float, limit: int = 50) -> dict[str, Any]:
        """Per reporting org and per source IP: messages, DMARC-aligned (DKIM or SPF
        aligned pass) and unaligned; the unaligned sources first."""
        with self.lock:
            return self._summary(t0, t1, limit)

    def _summary(self, t0: float, t1: float, limit: int) -> dict[str, Any]:
        args = (int(t0) // 86400 * 86400, int(t1))
        q = ("SELECT {g}, SUM(n), SUM(CASE WHEN dkim_aligned OR spf_aligned THEN n ELSE 0 END),"
             " SUM(dkim_aligned * n), SUM(spf_aligned * n) FROM rows WHERE day >= ? AND day < ?"
             " GROUP BY {g}")  # fmt: skip

        def rows(g: str) -> list[dict[str, Any]]:
            out = []
            for r in self.db.execute(q.format(g=g), args):
                *keys, n, aligned, dkim, spf = r
                out.append({**dict(zip(g.split(", "), keys, strict=True)), "messages": n,
                            "aligned": aligned, "unaligned": n - aligned, "dkim_aligned": dkim,
                            "spf_aligned": spf})  # fmt: skip
            return out

        sources = rows("source_ip, header_from, org")
        sources.sort(key=lambda d: (-d["unaligned"], -d["messages"], d["source_ip"]))
        n = self.db.execute("SELECT COUNT(*) FROM reports WHERE begin >= ? AND begin < ?",
                            args).fetchone()[0]  # fmt: skip
        return {"reports": n, "domains": rows("domain"), "reporters": rows("org"),
                "sources": sources[:limit],
                "unaligned_sources": [s for s in sources if s["unaligned"]][:limit]}  # fmt: skip

    def prune(self, before: float) -> int:
        """Forget reports and their rows of days before ``before`` (``[analytics]
        dmarc_days``): one day per transaction, so the intake never waits long for
        the lock. Rows deleted."""
        cut = int(before) // 86400 * 86400
        n = 0
        while True:
            with self.lock, transaction(self.db):
                day = self.db.execute("SELECT MIN(day) FROM rows").fetchone()[0]
                if day is None or day >= cut:
                    break
                n += self.db.execute("DELETE FROM rows WHERE day = ?", (day,)).rowcount
        with self.lock:
            self.db.execute("DELETE FROM reports WHERE begin < ? AND received < ?", (cut, cut))
        return n

    def close(self) -> None:
        with self.lock:
            self.db.close()


# ARGV: P, guard key ('' : none), guard value, n reports, then per report (its id,
# begin, its row in the reports hash), then per row (day, field, count). A report
# whose id is known adds nothing (when unguarded, as one arriving by mail); with a
# guard (carrying a node's dmarc.db once) nothing is added if the guard exists.
# One script: the report's id and its rows are written together or not at all.
_REDIS_ADD = """
local P = ARGV[1]
if ARGV[2] ~= '' then
  if redis.call('EXISTS', ARGV[2]) == 1 then return 0 end
  redis.call('SET', ARGV[2], ARGV[3])
end
local nrep = tonumber(ARGV[4])
local i, fresh = 5, 0
for _ = 1, nrep do
  if redis.call('HSETNX', P..':dmarc:reports', ARGV[i], ARGV[i + 2]) == 1 then
    redis.call('ZADD', P..':dmarc:begins', ARGV[i + 1], ARGV[i])
    fresh = fresh + 1
  end
  i = i + 3
end
if ARGV[2] == '' and fresh == 0 then return 0 end
while i <= #ARGV do
  redis.call('HINCRBY', P..':dmarc:d:'..ARGV[i], ARGV[i + 1], ARGV[i + 2])
  redis.call('ZADD', P..':dmarc:days', ARGV[i], ARGV[i])
  i = i + 3
end
return 1
"""

_KEYS = ("domain", "org", "source_ip", "header_from", "dkim_domain", "dkim_result",
         "spf_domain", "spf_result", "disposition", "dkim_aligned", "spf_aligned")  # fmt: skip


def _rows_of(r: Report) -> tuple[int, dict[tuple[Any, ...], int]]:
    """(day, {row key: messages}) of a report: its records rolled up as dmarc.db's rows."""
    day = (r.begin or int(time.time())) // 86400 * 86400
    rows: dict[tuple[Any, ...], int] = {}
    for rec in r.records:
        dd, dr = _pick(rec.dkim)
        sd, sr = _pick(rec.spf)
        key = (r.domain, r.org, rec.source_ip, rec.header_from or r.domain, dd, dr, sd, sr,
               rec.disposition, int(rec.dkim_eval == "pass"), int(rec.spf_eval == "pass"))  # fmt: skip
        rows[key] = rows.get(key, 0) + rec.count
    return day, rows


class RedisDmarcStore:
    """:class:`DmarcStore` beside a shared (Redis) spool: every node's intake
    stores into it and every node's ``/v1/dmarc`` reads it (a node's own
    ``dmarc.db`` showed the reports that reached that node only, so the answer
    behind a balancer depended on the node, and a report mailed to two nodes
    counted on each). Keys under the spool's prefix: ``dmarc:reports`` (hash,
    "org US report id" -> [domain, begin, end, received, records]),
    ``dmarc:begins`` (its ids by begin), ``dmarc:d:DAY`` (hash, the row's key
    as JSON -> messages), ``dmarc:days`` (the days that have rows)."""

    def __init__(self, shared: Any) -> None:
        self.r = shared.client
        self.P = shared.key()
        self._add_script = self.r.register_script(_REDIS_ADD)

    @staticmethod
    def _rid(r: Report) -> str:
        return f"{r.org}\x1f{r.report_id}"

    def add(self, r: Report) -> bool:
        """Store a report (one script); False if this org's report id was seen by any node."""
        day, rows = _rows_of(r)
        meta = orjson.dumps([r.domain, r.begin, r.end, time.time(), len(r.records)])
        args: list[Any] = [self.P, "", "", 1, self._rid(r), r.begin, meta]
        for key, n in rows.items():
            args += [day, orjson.dumps(key), n]
        return bool(self._add_script(args=args))

    def carry(self, spool_dir: str) -> int:
        """Add a node's own ``dmarc.db`` in ``spool_dir`` (what it stored before its
        reports went to Redis) to the shared reports, once: one script with a mark
        naming the file (a second start or node finds it: nothing added twice), then
        the file is renamed ``dmarc.db.carried``. Rows carried."""
        path = os.path.join(spool_dir, "dmarc.db")
        if not os.path.exists(path):
            return 0
        st = os.stat(path)
        mark = (f"{self.P}:dmarc:carried:{socket.gethostname()}:{os.path.realpath(path)}"
                f":{st.st_dev}:{st.st_ino}")  # fmt: skip
        db = connect(path, schema=_SCHEMA)
        try:
            reports = db.execute(
                "SELECT org, report_id, domain, begin, end, received, records FROM reports"
            ).fetchall()
            rows = db.execute(f"SELECT day, {', '.join(_KEYS)}, n FROM rows").fetchall()
        finally:
            db.close()
        args: list[Any] = [self.P, mark, repr(time.time()), len(reports)]
        for org, rid, domain, begin, end, received, n in reports:
            args += [f"{org}\x1f{rid}", begin, orjson.dumps([domain, begin, end, received, n])]
        for day, *key, n in rows:
            args += [day, orjson.dumps(key), n]
        self._add_script(args=args)
        os.replace(path, path + ".carried")
        return len(rows)

    def _days(self, t0: float, t1: float) -> list[int]:
        lo, hi = int(t0) // 86400 * 86400, int(t1)
        return [int(d) for d in self.r.zrangebyscore(f"{self.P}:dmarc:days", lo, f"({hi}")]

    def summary(self, t0: float, t1: float, limit: int = 50) -> dict[str, Any]:
        """As :meth:`DmarcStore.summary`, over every node's reports."""
        days = self._days(t0, t1)
        pipe = self.r.pipeline(transaction=False)
        for d in days:
            pipe.hgetall(f"{self.P}:dmarc:d:{d}")
        groups: dict[str, dict[tuple[Any, ...], list[int]]] = {
            g: {} for g in ("source_ip, header_from, org", "domain", "org")}  # fmt: skip
        for h in pipe.execute() if days else []:
            for field_, n in h.items():
                row = dict(zip(_KEYS, orjson.loads(field_), strict=True))
                n = int(n)
                add = [n, n if row["dkim_aligned"] or row["spf_aligned"] else 0,
                       row["dkim_aligned"] * n, row["spf_aligned"] * n]  # fmt: skip
                for g, acc in groups.items():
                    k = tuple(row[c] for c in g.split(", "))
                    tot = acc.setdefault(k, [0, 0, 0, 0])
                    for j in range(4):
                        tot[j] += add[j]

        def rows(g: str) -> list[dict[str, Any]]:
            return [{**dict(zip(g.split(", "), k, strict=True)), "messages": n,
                     "aligned": aligned, "unaligned": n - aligned, "dkim_aligned": dkim,
                     "spf_aligned": spf}
                    for k, (n, aligned, dkim, spf) in groups[g].items()]  # fmt: skip

        sources = rows("source_ip, header_from, org")
        sources.sort(key=lambda d: (-d["unaligned"], -d["messages"], d["source_ip"]))
        lo = int(t0) // 86400 * 86400
        n = int(self.r.zcount(f"{self.P}:dmarc:begins", lo, f"({int(t1)}"))
        return {"reports": n, "domains": rows("domain"), "reporters": rows("org"),
                "sources": sources[:limit],
                "unaligned_sources": [s for s in sources if s["unaligned"]][:limit]}  # fmt: skip

    def prune(self, before: float) -> int:
        """Forget the days before ``before`` and the reports that began and arrived
        before it (as :meth:`DmarcStore.prune`). Rows deleted."""
        cut = int(before) // 86400 * 86400
        n = 0
        for d in self.r.zrangebyscore(f"{self.P}:dmarc:days", "-inf", f"({cut}"):
            key = f"{self.P}:dmarc:d:{int(d)}"
            pipe = self.r.pipeline(transaction=True)
            pipe.hlen(key)
            pipe.delete(key)
            pipe.zrem(f"{self.P}:dmarc:days", d)
            n += int(pipe.execute()[0])
        old = self.r.zrangebyscore(f"{self.P}:dmarc:begins", "-inf", f"({cut}")
        for i in range(0, len(old), 500):
            ids = old[i : i + 500]
            metas = self.r.hmget(f"{self.P}:dmarc:reports", ids)
            gone = [rid for rid, m in zip(ids, metas, strict=True)
                    if m is None or float(orjson.loads(m)[3]) < cut]  # fmt: skip
            if gone:
                pipe = self.r.pipeline(transaction=True)
                pipe.hdel(f"{self.P}:dmarc:reports", *gone)
                pipe.zrem(f"{self.P}:dmarc:begins", *gone)
                pipe.execute()
        return n

    def close(self) -> None:
        pass  # the spool's client: the spool closes it


def open_store(spool_dir: str, spool: Any = None) -> DmarcStore | RedisDmarcStore:
    """The DMARC report store: in Redis for a shared spool (every node's reports; a
    node's own ``dmarc.db`` of before is carried into it once), else
    ``<spool_dir>/dmarc.db``."""
    shared = spool.shared() if spool is not None else None
    if shared is None:
        return DmarcStore(spool_dir)
    store = RedisDmarcStore(shared)
    try:
        store.carry(spool_dir)
    except Exception as e:  # (Redis out of reach, a damaged file: the next start tries again)
        log.warning("the DMARC reports of %s are not carried into Redis yet: %s",
                    os.path.join(spool_dir, "dmarc.db"), e)  # fmt: skip
    return store


def _looks_like_report(message: bytes) -> tuple[bool, bool]:
    """(maybe a report, surely one): DSNs and ARF (multipart/report) never are; RFC 7489
    7.2.1.1's Subject ("Report Domain: ... Submitter: ... Report-ID: ...") surely is."""
    head = message[:16384].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].lower()
    if b"multipart/report" in head:
        return False, False
    return True, b"report domain:" in head and b"report-id:" in head


def read_mail(message: bytes) -> list[Report | str] | None:
    """The aggregate reports in one mail message, unpacked and parsed (nothing
    stored): each a :class:`Report`, or the reason one was refused (a str).
    None: not a DMARC report (the caller tries the bounce parser). Pure and
    CPU-bound: ``fastsend serve`` runs it in its capped parse process
    (:mod:`fastsend.serve.parsepool`), never on its event loop."""
    maybe, surely = _looks_like_report(message)
    if not maybe:
        return None
    try:
        docs = extract_reports(message)
    except DmarcError as e:
        if surely:
            return [str(e)[:300]]
        return None  # e.g. a returned message with a broken attachment: a bounce
    docs = [d for d in docs if b"<feedback" in d[:65536]]
    if not docs:
        return ["no aggregate report attached"] if surely else None
    out: list[Report | str] = []
    for doc in docs:
        try:
            out.append(parse_report(doc))
        except DmarcError as e:
            out.append(str(e)[:300])
    return out


def store_reports(store: DmarcStore | RedisDmarcStore, items: list[Report | str]) -> list[dict[str, Any]]:
    """Store what :func:`read_mail` found; the events to emit ([] when every
    report was already stored)."""
    events: list[dict[str, Any]] = []
    for rep in items:
        if isinstance(rep, str):
            events.append({"event": "dmarc_report_refused", "error": rep})
        elif store.add(rep):
            total = sum(r.count for r in rep.records)
            unaligned = sum(r.count for r in rep.records
                            if r.dkim_eval != "pass" and r.spf_eval != "pass")  # fmt: skip
            events.append({"event": "dmarc_report", "org": rep.org[:200],
                           "report_id": rep.report_id[:200], "domain": rep.domain,
                           "begin": rep.begin, "end": rep.end, "messages": total,
                           "unaligned": unaligned, "records": len(rep.records)})  # fmt: skip
    return events


def ingest_mail(store: DmarcStore | RedisDmarcStore, message: bytes) -> list[dict[str, Any]] | None:
    """Reports in a mail message -> stored; the events to emit. None: not a DMARC report
    (the caller tries the bounce parser); [] when every report was already stored.
    In-process (the CLI, tests); the server reads in its parse pool instead."""
    items = read_mail(message)
    return None if items is None else store_reports(store, items)
