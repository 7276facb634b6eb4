"""The ``SPF`` check of the return-path domain (evaluation: :mod:`.spf`)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from fastsend.authcheck.common import (
    FAIL,
    PASS,
    WARN,
    Check,
    _Judge,
    _Lookup,
    _records,
    _txt,
)
from fastsend.authcheck.spf import SpfResult, check_host, parse_record, spf_record
from fastsend.hostname import host_name, is_fqdn

# Documentation/reserved addresses that no real record should authorise: evaluating one
# walks the whole record, as a receiver does for a forger's IP.
_PROBE_IPS = ("192.0.2.254", "198.51.100.254", "203.0.113.254", "240.0.0.1")
# IPv6: documentation (RFC 3849, RFC 9637) and discard-only (RFC 6666) addresses
_PROBE_IPS6 = ("2001:db8:ffff:ffff::fe", "3fff:fff:ffff::fe", "100::fe")


def _probe(domain: str, look: _Lookup, ips: Sequence[str]) -> SpfResult:
    """The result for an unauthorised IP: the first probe not passed by a narrow term."""
    for ip in ips:
        probe = check_host(ip, domain, look.query)
        if probe.result != "pass" or probe.mechanism.lstrip("+").lower() == "all":
            break
    return probe


def _orphans(txts: list[str]) -> list[str]:
    """TXT records at the name that hold SPF mechanisms without ``v=spf1``: the second
    half of a record a DNS panel took as two records."""
    out = []
    for t in txts:
        if re.match(r"(?i)v=spf1(?: |$)", t):
            continue
        try:
            terms = parse_record("v=spf1 " + t)
        except ValueError:
            continue
        if any(not x.modifier or x.name == "redirect" for x in terms):
            out.append(t)
    return out


def _ip_terms(ips: Sequence[str]) -> list[str]:
    return [f"ip{ipaddress.ip_address(i).version}:{i}" for i in ips]


def _spf_with(rec: str, add: list[str]) -> str:
    """``rec`` with the ``add`` terms inserted before its first mechanism."""
    parts = rec.split()
    return " ".join([parts[0], *[t for t in add if t not in parts], *parts[1:]])


def _address_fix(domain: str, rec: str) -> str:
    """The record with each ``a:<address>``/``mx:<address>`` written as ip4:/ip6:, if
    that was its only error ("" otherwise)."""

    def term(t: str) -> str:
        m = re.fullmatch(r"([+\-~?]?)(?:a|mx):([0-9A-Fa-f.:]+?)(/\d+)?", t, re.I)
        if not m:
            return t
        try:
            v = ipaddress.ip_address(m.group(2)).version
        except ValueError:
            return t
        return f"{m.group(1)}ip{v}:{m.group(2)}{m.group(3) or ''}"

    fixed = " ".join(term(t) for t in rec.split())
    try:
        parse_record(fixed)
    except ValueError:
        return ""
    return _txt(domain, fixed) if fixed != " ".join(rec.split()) else ""


def _merge_spf(recs: list[str]) -> str:
    terms: list[str] = []
    last = ""
    for r in recs:
        for t in r.split()[1:]:
            if re.fullmatch(r"[+\-~?]?all", t, re.I):
                last = last or t
            elif t not in terms:
                terms.append(t)
    return " ".join(["v=spf1", *terms, last or "~all"])


def check_spf(domain: str, ips: Sequence[str], look: _Lookup) -> tuple[Check, bool]:
    """The SPF check for the return-path ``domain``; also whether every IP passed."""
    j = _Judge("SPF")
    terms = _ip_terms(ips)
    txts = _records(look, j, domain, "TXT")
    if txts is None:
        return j.check(), False
    rec = spf_record(domain, lambda n, t: txts)
    for part in _orphans(txts):
        joined = _txt(domain, f"{rec} {part}") if isinstance(rec, str) else ""
        j.add(FAIL, f"the TXT record {part!r} at {domain} looks like the rest of the SPF "
                    "record, which receivers never see: publish one TXT record (of several "
                    "strings if long), not two", joined)  # fmt: skip
    if rec is None:
        value = " ".join(["v=spf1", *(terms or ["mx"]), "-all"])
        j.add(FAIL, f"no SPF record at {domain}", _txt(domain, value))
        return j.check(), False
    if isinstance(rec, list):
        merged = _spf_with(_merge_spf(rec), terms)
        j.add(FAIL, f"{len(rec)} SPF records at {domain}: permerror (RFC 7208 4.5); "
                    "replace them with one", _txt(domain, merged))  # fmt: skip
        return j.check(), False
    try:
        parse_record(rec)
    except ValueError as exc:
        j.add(FAIL, f"syntax error in {rec!r}: {exc} (permerror)", _address_fix(domain, rec))
        return j.check(), False
    all_pass = bool(ips)
    results: list[SpfResult] = []
    missing = []
    for ip in ips:
        res = check_host(ip, domain, look.query)
        results.append(res)
        how = f" via {res.matched}" if res.matched else ""
        if res.result == "pass":
            j.add(PASS, f"{ip}: pass{how}")
            continue
        all_pass = False
        if res.result in ("permerror", "temperror"):
            j.add(FAIL, f"{ip}: {res.result} ({res.note})")
        else:
            j.add(FAIL, f"{ip}: {res.result}{how or ' (' + res.note + ')'}: not authorised")
            missing.append(_ip_terms([ip])[0])
    # one corrected record for every finding: missing IPs added, a lax or missing all fixed
    fixed = _spf_with(rec, missing)
    fixed = re.sub(r"(^| )[+?]?all(?= |$)", r"\1-all", fixed, flags=re.I)
    if not re.search(r"(^| )([+\-~?]?all|redirect=\S+)(?= |$)", fixed, re.I):
        fixed += " -all"
    fix = _txt(domain, fixed) if fixed != rec else ""
    if missing:
        j.add(FAIL, f"record: {rec}", fix)
    probe = _probe(domain, look, _PROBE_IPS)
    results.append(probe)
    if probe.result in ("permerror", "temperror"):
        j.add(FAIL, f"an unauthorised IP gets {probe.result}: {probe.note}"
                    + (" (flatten includes)" if "lookups" in probe.note else ""))  # fmt: skip
    elif probe.result == "pass":
        j.add(FAIL, f"{probe.matched} authorises every IP on the Internet", fix)
    elif probe.result == "neutral":
        j.add(WARN, "unauthorised mail gets neutral: end the record with -all or ~all", fix)
    else:
        j.add(PASS, f"unauthorised IPs get {probe.result} ({probe.matched or probe.note}); "
                    f"{probe.lookups}/10 DNS lookups")  # fmt: skip
    if probe.result != "pass":
        probe6 = _probe(domain, look, _PROBE_IPS6)
        if probe6.result == "pass":
            j.add(FAIL, f"{probe6.matched} authorises every IPv6 address on the Internet")
    for w in dict.fromkeys(w for r in results for w in r.warnings):
        j.add(WARN, w)
    if not ips:
        j.add(WARN, f"no --ip given: only the record was checked ({rec})")
    orphans = _orphans(txts)
    if orphans:  # the one record to publish is the joined one; its own findings come next run
        j.fixes = [_txt(domain, " ".join([rec, *orphans]))]
    return j.check(), all_pass


def check_helo_spf(ip: str, helo: str, look: _Lookup) -> Check:
    """RFC 7208 2.3: the SPF check of the HELO identity, ``ip`` saying ``helo``.
    Receivers that check it (RFC 7208 recommends it) and every receiver of a bounce
    (an empty MAIL FROM is checked as ``postmaster@<helo>``) need the EHLO name to
    authorise its IP; the record to publish is the usual ``v=spf1 a -all``."""
    j = _Judge("SPF helo")
    name = host_name(helo)
    if not is_fqdn(name):
        j.add(WARN, f"EHLO {helo} is not a domain name, so it has no SPF record to check "
                    "(RFC 7208 2.3); say a fully qualified name")  # fmt: skip
        return j.check()
    term = _ip_terms([ip])[0]
    txts = _records(look, j, name, "TXT")
    if txts is None:
        return j.check()
    rec = spf_record(name, lambda n, t: txts)
    if rec is None:
        j.add(WARN, f"no SPF record at the EHLO name {name}: receivers that check the HELO "
                    "identity (RFC 7208 2.3), as every one does for a bounce, get none",
              _txt(name, f"v=spf1 {term} -all"))  # fmt: skip
        return j.check()
    if isinstance(rec, list):
        j.add(FAIL, f"{len(rec)} SPF records at {name}: permerror (RFC 7208 4.5); replace "
                    "them with one", _txt(name, _spf_with(_merge_spf(rec), [term])))  # fmt: skip
        return j.check()
    try:
        parse_record(rec)
    except ValueError as exc:
        j.add(FAIL, f"syntax error in {rec!r} at {name}: {exc} (permerror)",
              _address_fix(name, rec))  # fmt: skip
        return j.check()
    res = check_host(ip, name, look.query, helo=name)
    how = f" via {res.matched}" if res.matched else ""
    fix = _txt(name, _spf_with(rec, [term]))
    if res.result == "pass":
        j.add(PASS, f"{name} authorises {ip}{how}")
    elif res.result == "temperror":
        j.add(FAIL, f"{name}: temperror ({res.note}): cannot tell what is published; check "
                    "the nameservers and run again")  # fmt: skip
    elif res.result == "permerror":
        j.add(FAIL, f"{name}: permerror ({res.note})")
    elif res.result == "fail":
        j.add(FAIL, f"{name} does not authorise {ip} (fail{how}): receivers checking the "
                    "HELO identity reject its mail", fix)  # fmt: skip
    else:
        j.add(WARN, f"{name} does not authorise {ip} ({res.result}{how})", fix)
    for w in res.warnings:
        j.add(WARN, w)
    return j.check()
