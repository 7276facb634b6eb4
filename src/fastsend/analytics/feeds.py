"""Provider reputation feeds: Google Postmaster Tools (API v2) and Microsoft SNDS.

NAME
    fastsend.analytics.feeds -- FeedSettings, fetch_postmaster, fetch_snds, Feeds.

DESCRIPTION
    Config (``[reputation.feeds.*]``; endpoints are settings, so tests and
    proxies can point them elsewhere)::

        [reputation.feeds.postmaster]
        url = "https://gmailpostmastertools.googleapis.com"
        token_file = "/etc/fastsend/postmaster.token"   # an OAuth 2 access token
        domains = ["example.com"]
        every = 86400                                    # seconds between imports
        [reputation.feeds.snds]
        url = "https://sendersupport.olc.protection.outlook.com/snds/data.aspx"
        key_file = "/etc/fastsend/snds.key"              # the automated-access key
        every = 86400

    Postmaster Tools v2: ``POST {url}/v2/domains/{domain}/domainStats:query``
    with metric definitions for SPAM_RATE (and AUTH_SUCCESS_RATE,
    DELIVERY_ERROR_RATE) over yesterday, daily; the answer's ``domainStats``
    carry ``metric`` (our names) and ``value`` (``doubleValue`` /
    ``floatValue`` / ``intValue``). ``GET {url}/v2/domains/{domain}/complianceStatus``
    gives ``complianceData.rowData[]`` (``requirement``: SPF, DKIM,
    DMARC_POLICY, USER_REPORTED_SPAM_RATE, ...; ``status.status``: COMPLIANT or
    NEEDS_WORK). v2 has no reputation grade of its own (v1's HIGH ... BAD is
    gone), so fastsend grades the domain: "bad" when the spam rate reaches
    0.3% or a requirement NEEDS_WORK, "low" from 0.1%, else "good".

    SNDS: ``GET {url}?key=KEY`` answers CSV lines: IP address, activity start,
    activity end, RCPT commands, DATA commands, message recipients, filter
    result (GREEN / YELLOW / RED), complaint rate ("< 0.1%" or "1.5%"), trap
    message start, trap message end, trap hits, sample HELO, sample MAIL FROM,
    comments.

    :class:`Feeds` runs both on their schedules: each result is a gauge in the
    node's rollups (``postmaster_spam_rate:<domain>``, ``snds_filter:<ip>`` 0/1/2
    for green/yellow/red, ``snds_complaint_rate:<ip>``, ``snds_trap_hits:<ip>``)
    and an event (``reputation_feed``); an SNDS RED (or trap hits) rests the IP
    for Outlook (key ``snds``, renewed each import; lifted by an import that no
    longer says so); :meth:`Feeds.verdict` ("good" / "hold" / "bad" per IP and
    provider) is what the warm-up consults.

DELIBERATELY NOT HERE
    No OAuth flow (the token file is refreshed by the operator's tooling), no
    credentials in logs or events.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastsend.config import Config

log = logging.getLogger("fastsend.analytics.feeds")

MAX_BODY = 8 << 20
TIMEOUT = 30.0
POSTMASTER_METRICS = {"spam_rate": "SPAM_RATE", "auth_success_rate": "AUTH_SUCCESS_RATE",
                      "delivery_error_rate": "DELIVERY_ERROR_RATE"}  # fmt: skip
SNDS_FILTER = {"GREEN": 0, "YELLOW": 1, "RED": 2}
SNDS_REST = "snds"  # the key of the rest an SNDS RED orders (wire.IPRest.key)


class FeedError(Exception):
    """A feed could not be read (HTTP status, format); the message names why."""


@dataclass
class FeedSettings:
    postmaster_url: str = ""
    postmaster_token_file: str = ""
    postmaster_domains: list[str] = field(default_factory=list)
    postmaster_every: float = 86400.0
    snds_url: str = ""
    snds_key_file: str = ""
    snds_every: float = 86400.0

    @classmethod
    def from_config(cls, config: Config) -> FeedSettings:
        """From ``[reputation.feeds]`` (typed and checked when the config loaded)."""
        s = cls()
        pm, sn = config.reputation.feeds.postmaster, config.reputation.feeds.snds
        if pm is not None:
            s.postmaster_url = pm.url.rstrip("/")
            s.postmaster_token_file = pm.token_file
            s.postmaster_domains = [d.lower().strip(".") for d in pm.domains]
            s.postmaster_every = pm.every
        if sn is not None:
            s.snds_url = sn.url.rstrip("/")
            s.snds_key_file = sn.key_file
            s.snds_every = sn.every
        return s


def _secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise FeedError(f"cannot read {path}: {e.strerror}") from None


async def _read(resp: Any) -> bytes:
    body = await resp.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise FeedError(f"answer larger than {MAX_BODY} bytes")
    if resp.status != 200:
        raise FeedError(f"HTTP {resp.status}: {body[:200].decode('utf-8', 'replace')}")
    return bytes(body)


# -- Postmaster Tools v2 -------------------------------------------------------------

def _value(v: Any) -> float | None:
    if not isinstance(v, dict):
        return None
    for k in ("doubleValue", "floatValue", "intValue"):
        if k in v:
            try:
                return float(v[k])
            except (TypeError, ValueError):
                return None
    return None


def _date(d: dt.date) -> dict[str, int]:
    return {"year": d.year, "month": d.month, "day": d.day}


@dataclass
class DomainReputation:
    domain: str
    date: str
    spam_rate: float | None
    metrics: dict[str, float]
    compliance: dict[str, str]
    grade: str  # good / low / bad / unknown


def grade(spam_rate: float | None, compliance: dict[str, str]) -> str:
    if any(v == "NEEDS_WORK" for v in compliance.values()):
        return "bad"
    if spam_rate is None:
        return "unknown"
    if spam_rate >= 0.003:
        return "bad"
    return "low" if spam_rate >= 0.001 else "good"


async def fetch_postmaster(session: Any, s: FeedSettings, domain: str,
                           day: dt.date | None = None) -> DomainReputation:  # fmt: skip
    import aiohttp

    token = _secret(s.postmaster_token_file)
    day = day or (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))
    h = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    body = {
        "metricDefinitions": [{"name": n, "baseMetric": {"standardMetric": m}}
                              for n, m in POSTMASTER_METRICS.items()],
        "timeQuery": {"dateRanges": {"dateRanges": [{"start": _date(day), "end": _date(day)}]}},
        "aggregationGranularity": "DAILY",
    }  # fmt: skip
    t = aiohttp.ClientTimeout(total=TIMEOUT)
    url = f"{s.postmaster_url}/v2/domains/{domain}/domainStats:query"
    metrics: dict[str, float] = {}
    async with session.post(url, json=body, headers=h, timeout=t) as r:
        data = _json(await _read(r))
    for st in data.get("domainStats", []) or []:
        if isinstance(st, dict) and st.get("metric") in POSTMASTER_METRICS:
            v = _value(st.get("value"))
            if v is not None:
                metrics[st["metric"]] = v
    async with session.get(f"{s.postmaster_url}/v2/domains/{domain}/complianceStatus",
                           headers=h, timeout=t) as r:  # fmt: skip
        comp = _json(await _read(r))
    compliance: dict[str, str] = {}
    cdata = comp.get("complianceData") or {}
    for row in cdata.get("rowData", []) if isinstance(cdata, dict) else []:
        if isinstance(row, dict) and isinstance(row.get("requirement"), str):
            status = row.get("status") or {}
            compliance[row["requirement"]] = str(status.get("status", "STATE_UNSPECIFIED")
                                                 if isinstance(status, dict) else status)  # fmt: skip
    spam = metrics.get("spam_rate")
    return DomainReputation(domain, day.isoformat(), spam, metrics, compliance,
                            grade(spam, compliance))  # fmt: skip


def _json(body: bytes) -> dict[str, Any]:
    import orjson

    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FeedError("answer is not JSON") from None
    if not isinstance(data, dict):
        raise FeedError("answer is not a JSON object")
    return data


# -- SNDS ---------------------------------------------------------------------------

@dataclass
class IpReputation:
    ip: str
    start: str
    end: str
    rcpt: int
    data: int
    recipients: int
    filter_result: str
    complaint_rate: float | None
    trap_hits: int


def _rate(text: str) -> float | None:
    t = text.strip().replace("%", "")
    if not t:
        return None
    try:
        return float(t.lstrip("<> ").strip()) / 100
    except ValueError:
        return None


def _int(text: str) -> int:
    try:
        return int(text.strip() or 0)
    except ValueError:
        return 0


def parse_snds(text: str) -> list[IpReputation]:
    out = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 11 or row[0].strip().lower().startswith("ip"):
            continue
        out.append(IpReputation(row[0].strip(), row[1].strip(), row[2].strip(), _int(row[3]),
                                _int(row[4]), _int(row[5]), row[6].strip().upper(),
                                _rate(row[7]), _int(row[10])))  # fmt: skip
    return out


async def fetch_snds(session: Any, s: FeedSettings) -> list[IpReputation]:
    import aiohttp

    key = _secret(s.snds_key_file)
    t = aiohttp.ClientTimeout(total=TIMEOUT)
    async with session.get(s.snds_url, params={"key": key}, timeout=t) as r:
        body = await _read(r)
    return parse_snds(body.decode("utf-8", "replace"))


# -- the schedule ----------------------------------------------------------------------

class Feeds:
    """Imports on their schedules; gauges, events, rests, and the warm-up verdict."""

    def __init__(self, settings: FeedSettings, gauge: Callable[[str, str, float], None],
                 emit: Callable[[dict[str, Any]], None],
                 rest: Callable[..., None] | None = None,
                 lift: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        self.gauge = gauge  # (tenant, name, value)
        self.emit = emit
        self.rest = rest
        self.lift = lift
        self.rested: set[str] = set()  # IPs an SNDS import rested
        self.domains: dict[str, DomainReputation] = {}
        self.ips: dict[str, IpReputation] = {}
        self.errors: dict[str, str] = {}

    def verdict(self, ip: str, provider: str) -> str:
        """What the feeds say for sending from ``ip`` to ``provider``: "good", "hold"
        (yellow, or a low domain grade) or "bad" (red, traps, a bad grade); "" unknown."""
        if provider == "outlook" and ip in self.ips:
            r = self.ips[ip]
            if r.filter_result == "RED" or r.trap_hits:
                return "bad"
            return "hold" if r.filter_result == "YELLOW" else "good"
        if provider == "google" and self.domains:
            grades = {d.grade for d in self.domains.values()}
            if "bad" in grades:
                return "bad"
            if "low" in grades:
                return "hold"
            return "good" if "good" in grades else ""
        return ""

    async def postmaster_once(self, session: Any) -> None:
        for dom in self.settings.postmaster_domains:
            try:
                rep = await fetch_postmaster(session, self.settings, dom)
            except (TimeoutError, FeedError, OSError) as e:
                self.errors[f"postmaster:{dom}"] = str(e)[:300]
                self.emit({"event": "reputation_feed_failed", "feed": "postmaster",
                           "domain": dom, "error": str(e)[:300]})  # fmt: skip
                continue
            except Exception as e:  # aiohttp's own errors
                self.errors[f"postmaster:{dom}"] = type(e).__name__
                self.emit({"event": "reputation_feed_failed", "feed": "postmaster",
                           "domain": dom, "error": type(e).__name__})  # fmt: skip
                continue
            self.domains[dom] = rep
            if rep.spam_rate is not None:
                self.gauge("*", f"postmaster_spam_rate:{dom}", rep.spam_rate)
            self.emit({"event": "reputation_feed", "feed": "postmaster", "domain": dom,
                       "date": rep.date, "spam_rate": rep.spam_rate, "grade": rep.grade,
                       "compliance": rep.compliance, "metrics": rep.metrics})  # fmt: skip

    async def snds_once(self, session: Any) -> None:
        try:
            rows = await fetch_snds(session, self.settings)
        except (TimeoutError, FeedError, OSError) as e:
            self.errors["snds"] = str(e)[:300]
            self.emit({"event": "reputation_feed_failed", "feed": "snds", "error": str(e)[:300]})
            return
        except Exception as e:  # aiohttp's own errors
            self.errors["snds"] = type(e).__name__
            self.emit({"event": "reputation_feed_failed", "feed": "snds",
                       "error": type(e).__name__})  # fmt: skip
            return
        until = time.time() + 86400
        for r in rows:
            self.ips[r.ip] = r
            self.gauge("*", f"snds_filter:{r.ip}", SNDS_FILTER.get(r.filter_result, -1))
            if r.complaint_rate is not None:
                self.gauge("*", f"snds_complaint_rate:{r.ip}", r.complaint_rate)
            self.gauge("*", f"snds_trap_hits:{r.ip}", r.trap_hits)
            self.emit({"event": "reputation_feed", "feed": "snds", "source_ip": r.ip,
                       "filter_result": r.filter_result, "complaint_rate": r.complaint_rate,
                       "trap_hits": r.trap_hits, "recipients": r.recipients})  # fmt: skip
            if (r.filter_result == "RED" or r.trap_hits) and self.rest is not None:
                self.rest(r.ip, ["outlook"], until,
                          f"SNDS {r.filter_result}, {r.trap_hits} trap hits", SNDS_REST,
                          self.settings.snds_every)  # fmt: skip
                self.rested.add(r.ip)
            elif r.ip in self.rested:
                self.rested.discard(r.ip)
                if self.lift is not None:
                    self.lift(r.ip, SNDS_REST)

    async def loop(self) -> None:
        import aiohttp

        s = self.settings
        next_pm = next_snds = 0.0
        async with aiohttp.ClientSession() as session:
            while True:
                now = time.monotonic()
                if s.postmaster_domains and now >= next_pm:
                    next_pm = now + s.postmaster_every
                    await self.postmaster_once(session)
                if s.snds_url and now >= next_snds:
                    next_snds = now + s.snds_every
                    await self.snds_once(session)
                await asyncio.sleep(30)
