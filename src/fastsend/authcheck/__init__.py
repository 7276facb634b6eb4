"""Sender-authentication checks for a sending domain (``fastsend check-domain``).

``check_domain(domain, ips, keys, nameservers, return_path_domain, dkim_domain)``
looks up and judges, each as a pass/warn/fail :class:`Check` with the exact
records to add or change when something is wrong:

- ``MX`` (and ``MX <return-path domain>`` when it differs): the domain takes
  mail, so bounces and replies arrive. No MX with an address record is a
  warning (implicit MX), no MX at all a failure; a null MX (RFC 7505) fails
  for a sending domain, as does a null MX mixed with others and an MX naming
  an IP literal; an MX host that is a CNAME warns (RFC 2181 10.3); an MX host
  without an address fails.
- ``SPF`` (RFC 7208, :mod:`fastsend.authcheck.spf`), for the return-path
  domain (the envelope sender SPF is evaluated on): one record, valid syntax,
  each ``--ip`` authorised (and by which mechanism), within the 10-lookup and
  2-void-lookup limits for an IP that matches nothing, an ``all`` term that is
  neither ``+all`` nor missing; ``ptr`` and ``%{p}`` warn.
- ``DKIM <selector>`` for each (selector, private key): one key record at
  ``selector._domainkey.<dkim domain>``, ``v=DKIM1``, ``k=`` matching the key
  type, ``p=`` not empty (revoked) and equal to the private key's public half,
  ``h=`` allowing sha256, ``s=`` allowing email, ``t=y`` (testing) warns, an
  RSA key under 1024 bits fails and under 2048 warns.
- ``DMARC`` (RFC 7489): discovery at ``_dmarc.<domain>``, then at the
  organizational domain; several records, a syntax error or a bad/missing
  ``p=`` fail; the policy that applies to the domain (``sp=`` for a subdomain
  covered by the organizational record); ``p=none``, ``pct`` < 100, no ``rua``
  and an external ``rua`` without its ``_report._dmarc`` authorisation warn.
- ``alignment``: the From domain against the DKIM ``d=`` (``adkim``) and the
  return-path domain (``aspf``), strict (equal) or relaxed (same
  organizational domain), counting only a DKIM key / SPF result that passed.
- ``PTR <ip>``: a PTR record whose name resolves back to the IP (FCrDNS);
  several PTR names or a generic-looking name warn.
- ``DNS``: warns when lookups failed (timeouts, server failures).

The organizational domain comes from the Public Suffix List (the
``publicsuffixlist`` package's bundled snapshot, no network); without that
package a small built-in heuristic is used and ``org_source`` says so.

JSON (``fastsend check-domain --json``; schema 1, fields are only ever added)::

    {
      "schema": 1,
      "domain": "example.com",               # the From domain, lower case
      "organizational_domain": "example.com",
      "org_source": "psl" | "heuristic",
      "status": "pass" | "warn" | "fail",    # the worst check
      "summary": {"pass": 5, "warn": 1, "fail": 0},
      "checks": [
        {"name": "SPF",                      # MX, MX <d>, SPF, DKIM <sel>, DKIM, DMARC,
                                             # alignment, PTR <ip>, DNS
         "status": "pass" | "warn" | "fail",
         "detail": "...",                    # the notes joined with "; "
         "notes": ["...", ...],              # one finding each, worst first
         "fix": "..."}                       # records to add/change, one a line ("" if none)
      ],
      "records": ["name. IN TXT \\"...\\"", ...] # every fix line of a non-pass check
    }

It does no network I/O other than DNS queries through dnspython to the given
nameservers (the system's when none are given).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.resolver
import dns.reversename
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fastsend.authcheck.spf import DnsTempError, SpfResult, check_host, parse_record, spf_record
from fastsend.message.keys import load_private_key, public_p, public_txt

try:  # the Public Suffix List, bundled by the package (works offline)
    from publicsuffixlist import PublicSuffixList as _PSLClass

    _PSL: Any = _PSLClass()
except ImportError:  # pragma: no cover - a dependency; the heuristic is a fallback
    _PSL = None

__all__ = [
    "FAIL",
    "PASS",
    "WARN",
    "Check",
    "check_domain",
    "make_lookup",
    "org_domain",
    "parse_dkim",
    "parse_dmarc",
    "report",
]

PASS, WARN, FAIL = "pass", "warn", "fail"
_RANK = {PASS: 0, WARN: 1, FAIL: 2}
ORG_SOURCE = "psl" if _PSL is not None else "heuristic"
_SLD = {"co", "com", "net", "org", "ac", "gov", "edu", "ne", "or", "go", "gob", "nic", "mil"}


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): public suffix plus one label."""
    d = domain.lower().rstrip(".")
    if _PSL is not None:
        return str(_PSL.privatesuffix(d) or d)
    labels = d.split(".")  # fallback: two labels, three under e.g. co.uk / com.au
    n = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SLD else 2
    return ".".join(labels[-n:])


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "notes": list(self.notes) or [self.detail], "fix": self.fix}  # fmt: skip


class _Judge:
    """Collects findings for one check; the check's status is the worst one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[tuple[str, str]] = []
        self.fixes: list[str] = []

    def add(self, status: str, note: str, *fixes: str) -> None:
        self.items.append((status, note))
        for f in fixes:
            if f and f not in self.fixes:
                self.fixes.append(f)

    def check(self) -> Check:
        status = max((s for s, _ in self.items), key=_RANK.__getitem__, default=PASS)
        notes = [n for _, n in sorted(self.items, key=lambda x: -_RANK[x[0]])]
        fix = "\n".join(self.fixes) if status != PASS else ""
        return Check(self.name, status, "; ".join(notes), fix, notes)


@dataclass
class _Lookup:
    resolver: dns.resolver.Resolver
    errors: list[str] = field(default_factory=list)
    cache: dict[tuple[str, str], list[str] | DnsTempError] = field(default_factory=dict)

    def query(self, name: str, rtype: str) -> list[str]:
        """Answers as text, [] for NXDOMAIN/NODATA; raises DnsTempError on failure."""
        key = (name.lower().rstrip("."), rtype)
        hit = self.cache.get(key)
        if hit is None:
            hit = self._ask(*key)
            self.cache[key] = hit
        if isinstance(hit, DnsTempError):
            raise hit
        return list(hit)

    def _ask(self, name: str, rtype: str) -> list[str] | DnsTempError:
        try:
            ans = self.resolver.resolve(name + ".", rtype, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            self.errors.append(f"{name} {rtype}: {exc}")
            return DnsTempError(str(exc))
        out = []
        for rr in ans:
            if rtype == "TXT":
                out.append(b"".join(rr.strings).decode("utf-8", "replace"))
            else:
                out.append(rr.to_text())
        return out

    def __call__(self, name: str, rtype: str) -> list[str]:
        try:
            return self.query(name, rtype)
        except DnsTempError:
            return []


def make_lookup(nameservers: Sequence[str] = ()) -> _Lookup:
    """A caching DNS lookup over ``host[:port]`` nameservers (system ones if empty)."""
    if not nameservers:
        r = dns.resolver.Resolver()
    else:
        r = dns.resolver.Resolver(configure=False)
        hosts, port = [], 53
        for ns in nameservers:
            host, _, p = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "")
            hosts.append(host.strip("[]"))
            port = int(p) if p else 53
        r.nameservers = hosts
        r.port = port
    r.timeout, r.lifetime = 2.0, 5.0
    return _Lookup(r)


def _tag_list(rec: str) -> tuple[list[tuple[str, str]], list[str]]:
    """RFC 6376 3.2 tag=value list: (pairs in order, syntax errors)."""
    pairs: list[tuple[str, str]] = []
    errors: list[str] = []
    for part in rec.split(";"):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        k = k.strip()
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", k):
            errors.append(f"bad tag {part.strip()!r}")
            continue
        if any(k == pk for pk, _ in pairs):
            errors.append(f"tag {k}= given twice")
            continue
        pairs.append((k, v.strip()))
    return pairs, errors


def _txt(name: str, value: str) -> str:
    return f'{name}. IN TXT "{value}"'


# --- MX ----------------------------------------------------------------------


def _addresses(look: _Lookup, host: str) -> list[str]:
    out = []
    for rtype in ("A", "AAAA"):
        out += [v for v in look(host, rtype) if _is_ip(v)]
    return out


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s.rstrip("."))
    except ValueError:
        return False
    return True


def check_mx(domain: str, look: _Lookup, name: str = "MX") -> Check:
    j = _Judge(name)
    want = f"{domain}. IN MX 10 mx.{domain}."
    mx: list[tuple[int, str]] = []
    for v in look(domain, "MX"):
        pref, _, host = v.partition(" ")
        mx.append((int(pref) if pref.isdigit() else 0, host.strip()))
    if not mx:
        addrs = _addresses(look, domain)
        if addrs:
            j.add(WARN, f"no MX record: mail for {domain} goes to its address {addrs[0]} "
                        "(implicit MX); publish an MX", want)  # fmt: skip
        else:
            j.add(FAIL, f"no MX record and no address: bounces and replies to {domain} "
                        "cannot be delivered", want)  # fmt: skip
        return j.check()
    if any(h == "." for _, h in mx):
        if len(mx) > 1:
            j.add(FAIL, "null MX mixed with other MX records (RFC 7505 2: it must be alone)")
        else:
            j.add(FAIL, f"null MX (RFC 7505): {domain} accepts no mail, so bounces and "
                        "replies are lost; remove it and publish a real MX", want)  # fmt: skip
        return j.check()
    good = []
    for prio, host in sorted(mx):
        pref = str(prio)
        h = host.rstrip(".")
        if _is_ip(h):
            j.add(FAIL, f"MX {pref} {host} is an IP address literal, not a host name "
                        "(RFC 5321 5.1)",
                  f"{domain}. IN MX {pref} mx.{domain}.", f"mx.{domain}. IN A {h}")  # fmt: skip
            continue
        cname = [c.rstrip(".") for c in look(h, "CNAME")]
        target = h
        if cname:
            target = cname[0]
            j.add(WARN, f"MX host {h} is a CNAME to {target} (RFC 2181 10.3: MX must name "
                        "the host itself)", f"{domain}. IN MX {pref} {target}.")  # fmt: skip
        addrs = _addresses(look, target)
        if not addrs:
            j.add(FAIL, f"MX host {h} has no A/AAAA record", f"{target}. IN A <address>")
        else:
            good.append(f"{pref} {h} ({', '.join(addrs[:2])})")
    if good:
        j.add(PASS, "MX " + ", ".join(good))
    return j.check()


# --- SPF ---------------------------------------------------------------------

# Documentation/reserved addresses that no real record should authorise: evaluating one
# walks the whole record, as a receiver does for a forger's IP.
_PROBE_IPS = ("192.0.2.254", "198.51.100.254", "203.0.113.254", "240.0.0.1")


def _ip_terms(ips: Sequence[str]) -> list[str]:
    return [f"ip{ipaddress.ip_address(i).version}:{i}" for i in ips]


def _spf_with(rec: str, add: list[str]) -> str:
    """``rec`` with the ``add`` terms inserted before its first mechanism."""
    parts = rec.split()
    return " ".join([parts[0], *[t for t in add if t not in parts], *parts[1:]])


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
    rec = spf_record(domain, look)
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
        j.add(FAIL, f"syntax error in {rec!r}: {exc} (permerror)")
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
    for ip in _PROBE_IPS:
        probe = check_host(ip, domain, look.query)
        if probe.result != "pass" or probe.mechanism.lstrip("+").lower() == "all":
            break
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
    for w in dict.fromkeys(w for r in results for w in r.warnings):
        j.add(WARN, w)
    if not ips:
        j.add(WARN, f"no --ip given: only the record was checked ({rec})")
    return j.check(), all_pass


# --- DKIM --------------------------------------------------------------------


def parse_dkim(rec: str) -> tuple[dict[str, str], list[str]]:
    """A DKIM key record's tags (p= without whitespace) and its syntax errors."""
    pairs, errors = _tag_list(rec)
    tags = {k.lower(): v for k, v in pairs}
    if "v" in tags:
        if pairs[0][0].lower() != "v":
            errors.append("v= must be the first tag")
        if tags["v"] != "DKIM1":
            errors.append(f"v={tags['v']} (must be DKIM1)")
    if "p" not in tags:
        errors.append("no p= tag")
    else:
        tags["p"] = "".join(tags["p"].split())
    return tags, errors


def _published_key(k: str, p: str) -> tuple[Any, str]:
    """(public key object or None, problem)."""
    try:
        raw = base64.b64decode(p, validate=True)
    except ValueError:
        return None, "p= is not valid base64"
    if k == "ed25519":
        if len(raw) != 32:
            return None, f"p= is {len(raw)} bytes (an Ed25519 key is 32)"
        return ed25519.Ed25519PublicKey.from_public_bytes(raw), ""
    try:
        pub = serialization.load_der_public_key(raw)
    except ValueError:
        return None, "p= is not a DER RSA public key"
    if not isinstance(pub, rsa.RSAPublicKey):
        return None, f"p= holds a {type(pub).__name__}, not an RSA key"
    return pub, ""


def check_dkim(sel: str, path: str, domain: str, look: _Lookup) -> Check:
    j = _Judge(f"DKIM {sel}")
    name = f"{sel}._domainkey.{domain}"
    key = load_private_key(path)
    want_txt = _txt(name, public_txt(key))
    key_type = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    recs = [t for t in look(name, "TXT") if "p=" in t or t.lstrip().startswith("v=DKIM1")]
    if not recs:
        j.add(FAIL, f"no key record at {name}", want_txt)
        return j.check()
    if len(recs) > 1:
        j.add(FAIL, f"{len(recs)} key records at {name}: verifiers may take either",
              want_txt)  # fmt: skip
    rec = recs[0]
    tags, errors = parse_dkim(rec)
    for e in errors:
        j.add(FAIL, f"syntax: {e}", want_txt)
    k = tags.get("k", "rsa").lower()
    if k not in ("rsa", "ed25519"):
        j.add(FAIL, f"unknown key type k={k}", want_txt)
    elif k != key_type:
        j.add(FAIL, f"k={k} but {path} is an {key_type} key", want_txt)
    h = [a.strip().lower() for a in tags.get("h", "").split(":") if a.strip()]
    if h and "sha256" not in h:
        j.add(FAIL, f"h={tags['h']} does not allow sha256 (the hash fastsend signs with)",
              want_txt)  # fmt: skip
    s = [a.strip().lower() for a in tags.get("s", "*").split(":")]
    if "*" not in s and "email" not in s:
        j.add(FAIL, f"s={tags['s']} does not allow email", want_txt)
    flags = [f.strip().lower() for f in tags.get("t", "").split(":")]
    if "y" in flags:
        j.add(WARN, "t=y: testing mode, receivers treat failures as unsigned; drop t=y",
              _txt(name, public_txt(key)))  # fmt: skip
    p = tags.get("p")
    if p == "":
        j.add(FAIL, "p= is empty: the key is revoked (RFC 6376 3.6.1)", want_txt)
    elif p and k in ("rsa", "ed25519"):
        pub, problem = _published_key(k, p)
        if pub is None:
            j.add(FAIL, problem, want_txt)
        else:
            if isinstance(pub, rsa.RSAPublicKey):
                bits = pub.key_size
                if bits < 1024:
                    j.add(FAIL, f"RSA key of {bits} bits (< 1024: verifiers ignore it)",
                          want_txt)  # fmt: skip
                elif bits < 2048:
                    j.add(WARN, f"RSA key of {bits} bits (use 2048)")
            if public_p(key) == p or _same_key(pub, key.public_key()):
                j.add(PASS, f"{name} ({k}) matches {path}")
            else:
                j.add(FAIL, f"{name} does not match {path}", want_txt)
    return j.check()


def _same_key(a: Any, b: Any) -> bool:
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return bool(a.public_numbers() == b.public_numbers())
    return False


# --- DMARC -------------------------------------------------------------------

_POLICIES = ("none", "quarantine", "reject")
_DMARC_RE = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)", re.I)


def parse_dmarc(rec: str) -> tuple[dict[str, str], list[str], list[str]]:
    """A DMARC record's tags (lower-case names), syntax errors and warnings."""
    pairs, errors = _tag_list(rec)
    tags = {k.lower(): v for k, v in pairs}
    warns: list[str] = []
    if not pairs or pairs[0][0].lower() != "v" or pairs[0][1] != "DMARC1":
        errors.append("must start with v=DMARC1")
    if "p" not in tags:
        errors.append("no p= tag (required)")
    elif tags["p"].lower() not in _POLICIES:
        errors.append(f"p={tags['p']} (none, quarantine or reject)")
    if "sp" in tags and tags["sp"].lower() not in _POLICIES:
        errors.append(f"sp={tags['sp']} (none, quarantine or reject)")
    for t in ("adkim", "aspf"):
        if t in tags and tags[t].lower() not in ("r", "s"):
            errors.append(f"{t}={tags[t]} (r or s)")
    if "pct" in tags and not (tags["pct"].isdigit() and int(tags["pct"]) <= 100):
        errors.append(f"pct={tags['pct']} (0-100)")
    if "ri" in tags and not tags["ri"].isdigit():
        errors.append(f"ri={tags['ri']} (seconds)")
    if "fo" in tags and not all(o.strip() in ("0", "1", "d", "s") for o in tags["fo"].split(":")):
        errors.append(f"fo={tags['fo']} (0, 1, d, s separated by ':')")
    for t in ("rua", "ruf"):
        for uri in _uris(tags.get(t, "")):
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+", uri) or (
                uri.lower().startswith("mailto:") and "@" not in uri
            ):
                errors.append(f"{t}: bad URI {uri!r}")
    known = {"v", "p", "sp", "adkim", "aspf", "pct", "rua", "ruf", "fo", "rf", "ri", "np",
             "psd", "t"}  # fmt: skip
    for k in tags:
        if k not in known:
            warns.append(f"unknown tag {k}= (ignored by receivers; a typo?)")
    return tags, errors, warns


def _uris(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def _uri_domain(uri: str) -> str:
    if not uri.lower().startswith("mailto:"):
        return ""
    addr = uri[7:].split("!")[0].split("?")[0]
    return addr.rpartition("@")[2].lower().rstrip(".")


def _dmarc_records(name: str, look: _Lookup) -> list[str]:
    return [t for t in look(name, "TXT") if _DMARC_RE.match(t)]


_KNOWN_DMARC = ("sp", "adkim", "aspf", "rua", "ruf", "fo", "rf", "ri")


def _rebuild_dmarc(tags: dict[str, str], org: str, sub: bool = False) -> str:
    """The recommended record: valid tags kept, unknown ones and pct < 100 dropped,
    a none policy raised to quarantine, rua added when missing."""
    p = tags.get("p", "").lower()
    out = {"v": "DMARC1", "p": p if p in _POLICIES else "none"}
    for k in _KNOWN_DMARC:
        if k in tags and not parse_dmarc(f"v=DMARC1; p=none; {k}={tags[k]}")[1]:
            out[k] = tags[k]
    if sub and out.get("sp", "").lower() == "none":
        out["sp"] = "quarantine"
    elif (not sub or "sp" not in out) and out["p"] == "none" and p in _POLICIES:
        out["p"] = "quarantine"
    if "rua" not in out:
        out["rua"] = f"mailto:dmarc-reports@{org}"
    return "; ".join(f"{k}={v}" for k, v in out.items())


def check_dmarc(domain: str, look: _Lookup) -> tuple[Check, dict[str, str]]:
    """The DMARC check; also the tags of the record that applies ({} if none)."""
    j = _Judge("DMARC")
    org = org_domain(domain)
    where = domain
    recs = _dmarc_records(f"_dmarc.{domain}", look)
    if not recs and org != domain:
        where, recs = org, _dmarc_records(f"_dmarc.{org}", look)
    name = f"_dmarc.{where}"
    default = f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{org}"
    if not recs:
        looked = f"_dmarc.{domain}" + (f" or _dmarc.{org}" if org != domain else "")
        j.add(FAIL, f"no DMARC record at {looked}", _txt(f"_dmarc.{domain}", default))
        return j.check(), {}
    if len(recs) > 1:
        j.add(FAIL, f"{len(recs)} DMARC records at {name}: receivers apply none "
                    "(RFC 7489 6.6.3); keep one",
              _txt(name, _rebuild_dmarc(parse_dmarc(recs[0])[0], org, where != domain)))  # fmt: skip
        return j.check(), {}
    rec = recs[0]
    tags, errors, warns = parse_dmarc(rec)
    fixed = _txt(name, _rebuild_dmarc(tags, org, where != domain))
    for e in errors:
        j.add(FAIL, f"syntax error in {rec!r}: {e}", fixed)
    for w in warns:
        j.add(WARN, w, fixed)
    p = tags.get("p", "").lower()
    sub = where != domain
    policy = (tags.get("sp") or p).lower() if sub else p
    whence = f"record at {name}" + (" (sp= for subdomains)" if sub and "sp" in tags else "")
    if policy in _POLICIES:
        if policy == "none":
            j.add(WARN, f"policy for {domain} is none ({whence}): monitoring only, spoofed "
                        "mail is still delivered; move to quarantine once reports are clean",
                  fixed)  # fmt: skip
        else:
            j.add(PASS, f"p={p}: policy for {domain} is {policy} ({whence})")
    pct = tags.get("pct", "100")
    if pct.isdigit() and int(pct) < 100:
        j.add(WARN, f"pct={pct}: the policy applies to {pct}% of failing mail only", fixed)
    rua = _uris(tags.get("rua", ""))
    if not rua:
        j.add(WARN, "no rua=: you get no aggregate reports", fixed)
    for uri in rua:
        dest = _uri_domain(uri)
        if dest and org_domain(dest) != org:
            auth = f"{where}._report._dmarc.{dest}"
            if not _dmarc_records(auth, look):
                j.add(WARN, f"rua {uri} is in another domain, which has not authorised "
                            f"reports for {where} (RFC 7489 7.1)", _txt(auth, "v=DMARC1"))  # fmt: skip
    if "ruf" in tags:
        j.add(PASS, f"ruf={tags['ruf']} (failure reports: few receivers send them)")
    return j.check(), tags


def _aligned(a: str, b: str, strict: bool) -> bool:
    return a == b if strict else org_domain(a) == org_domain(b)


def check_alignment(
    domain: str,
    tags: dict[str, str],
    dkim_domain: str,
    dkim_ok: bool | None,
    rp: str,
    spf_ok: bool,
) -> Check:
    """DMARC identifier alignment (RFC 7489 3.1); ``dkim_ok`` is None when no key was given."""
    j = _Judge("alignment")
    strict_d = tags.get("adkim", "r").lower() == "s"
    strict_s = tags.get("aspf", "r").lower() == "s"
    mode = lambda s: "strict" if s else "relaxed"  # noqa: E731
    d_al = _aligned(dkim_domain, domain, strict_d)
    s_al = _aligned(rp, domain, strict_s)
    if dkim_ok is None:
        dk = "no DKIM key given"
    elif not d_al:
        dk = f"DKIM d={dkim_domain} NOT aligned with {domain} ({mode(strict_d)})"
    elif not dkim_ok:
        dk = f"DKIM d={dkim_domain} aligned but its key check failed"
    else:
        dk = f"DKIM d={dkim_domain} aligned ({mode(strict_d)})"
    if not s_al:
        sp = f"return path {rp} NOT aligned with {domain} ({mode(strict_s)})"
    elif not spf_ok:
        sp = f"return path {rp} aligned but SPF does not pass for every --ip"
    else:
        sp = f"return path {rp} aligned and SPF passes ({mode(strict_s)})"
    dkim_good = bool(dkim_ok) and d_al
    spf_good = spf_ok and s_al
    if dkim_good:
        j.add(PASS, f"{dk}; {sp}")
    elif spf_good:
        j.add(WARN, f"{dk}; {sp}: only SPF aligns, which forwarding breaks; sign with "
                    f"DKIM d={domain}")  # fmt: skip
    else:
        j.add(FAIL, f"{dk}; {sp}: DMARC fails for this mail; sign with DKIM d={domain}")
    return j.check()


# --- PTR ---------------------------------------------------------------------


def check_ptr(ip: str, domain: str, look: _Lookup) -> Check:
    j = _Judge(f"PTR {ip}")
    addr = ipaddress.ip_address(ip)
    rev = dns.reversename.from_address(ip).to_text().rstrip(".")
    rtype = "A" if addr.version == 4 else "AAAA"
    ptrs = [v.rstrip(".").lower() for v in look(rev, "PTR")]
    if not ptrs:
        host = f"out.{domain}"
        j.add(FAIL, f"no PTR record for {ip}: many receivers reject mail from it",
              f"{rev}. IN PTR {host}.", f"{host}. IN {rtype} {ip}")  # fmt: skip
        return j.check()
    if len(ptrs) > 1:
        j.add(WARN, f"{len(ptrs)} PTR records ({', '.join(ptrs)}): keep one")
    confirmed = []
    for h in ptrs:
        fwd = look(h, rtype)
        if any(_same_ip(v, addr) for v in fwd):
            confirmed.append(h)
        elif fwd:
            j.add(FAIL, f"{h} resolves to {', '.join(fwd)}, not {ip} (not forward-confirmed)",
                  f"{h}. IN {rtype} {ip}")  # fmt: skip
        else:
            j.add(FAIL, f"{h} has no {rtype} record: {ip} is not forward-confirmed",
                  f"{h}. IN {rtype} {ip}")  # fmt: skip
    if confirmed:
        j.items = [(s if s != FAIL else WARN, n) for s, n in j.items]  # one good name suffices
        h = confirmed[0]
        j.add(PASS, f"{h} (forward-confirmed)")
        if _generic(h, addr):
            j.add(WARN, f"{h} looks like a generic (dynamic) name; use one under {domain}")
    return j.check()


def _same_ip(v: str, addr: Any) -> bool:
    try:
        return bool(ipaddress.ip_address(v) == addr)
    except ValueError:
        return False


def _generic(host: str, addr: Any) -> bool:
    if addr.version != 4:
        return False
    o = str(addr).split(".")
    return any(sep.join(seq) in host for sep in "-." for seq in (o, o[::-1]))


# --- all together ------------------------------------------------------------


def check_domain(
    domain: str,
    ips: Sequence[str] = (),
    keys: Sequence[tuple[str, str]] = (),
    nameservers: Sequence[str] = (),
    return_path_domain: str | None = None,
    dkim_domain: str | None = None,
) -> list[Check]:
    """All checks for ``domain``; ``keys`` are (selector, private-key path) pairs for
    ``dkim_domain`` (default: ``domain``)."""
    domain = domain.lower().rstrip(".")
    rp = (return_path_domain or domain).lower().rstrip(".")
    dd = (dkim_domain or domain).lower().rstrip(".")
    look = make_lookup(nameservers)
    checks = [check_mx(domain, look)]
    if rp != domain:
        checks.append(check_mx(rp, look, f"MX {rp}"))
    spf, spf_ok = check_spf(rp, ips, look)
    checks.append(spf)
    dkim_ok: bool | None = None
    if not keys:
        checks.append(Check("DKIM", WARN, "no --selector/--key given: nothing checked"))
    for sel, path in keys:
        c = check_dkim(sel, path, dd, look)
        checks.append(c)
        dkim_ok = bool(dkim_ok) or c.status != FAIL
    dmarc, tags = check_dmarc(domain, look)
    checks.append(dmarc)
    checks.append(check_alignment(domain, tags, dd, dkim_ok, rp, spf_ok))
    for ip in ips:
        checks.append(check_ptr(ip, domain, look))
    if look.errors:
        errs = list(dict.fromkeys(look.errors))
        checks.append(Check("DNS", WARN, "; ".join(errs[:3]), notes=errs[:10]))
    return checks


def report(domain: str, checks: Sequence[Check]) -> dict[str, Any]:
    """The ``--json`` document (schema in the module docstring)."""
    summary = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)}
    worst = max((c.status for c in checks), key=_RANK.__getitem__, default=PASS)
    d = domain.lower().rstrip(".")
    records = [line for c in checks if c.status != PASS for line in c.fix.splitlines()]
    return {
        "schema": 1,
        "domain": d,
        "organizational_domain": org_domain(d),
        "org_source": ORG_SOURCE,
        "status": worst,
        "summary": summary,
        "checks": [c.as_dict() for c in checks],
        "records": list(dict.fromkeys(records)),
    }
