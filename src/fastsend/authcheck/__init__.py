"""Sender-authentication checks for a sending domain (``fastsend check-domain``).

``check_domain(domain, ips, keys, nameserver)`` looks up and judges, each as a
pass/warn/fail :class:`Check` with the record to add when something is missing:

- MX: the domain receives mail (bounces and replies can arrive); null MX fails.
- SPF (RFC 7208, :mod:`fastsend.authcheck.spf`): one record, authorising each
  sending IP.
- DKIM: for each (selector, private key), the published ``p=`` matches the key.
- DMARC (RFC 7489): a record at ``_dmarc.domain`` (or the organisational
  domain), its policy, and alignment of the From domain with the DKIM ``d=``
  and the return-path domain (relaxed: same organisational domain).
- PTR and forward-confirmed reverse DNS for each IP.

The organisational domain is approximated as the last two labels (no Public
Suffix List). It does no network I/O other than DNS queries through dnspython
to the configured nameservers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dns.exception
import dns.resolver
import dns.reversename

from fastsend.authcheck.spf import check_host, spf_record
from fastsend.message.keys import load_private_key, public_p, public_txt

__all__ = ["Check", "check_domain", "make_lookup"]

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Lookup:
    resolver: dns.resolver.Resolver
    errors: list[str] = field(default_factory=list)

    def __call__(self, name: str, rtype: str) -> list[str]:
        try:
            ans = self.resolver.resolve(name, rtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.DNSException, OSError) as exc:
            self.errors.append(f"{name} {rtype}: {exc}")
            return []
        out = []
        for rr in ans:
            if rtype == "TXT":
                out.append(b"".join(rr.strings).decode("utf-8", "replace"))
            else:
                out.append(rr.to_text())
        return out


def make_lookup(nameservers: Sequence[str] = ()) -> _Lookup:
    """A DNS lookup function over ``host[:port]`` nameservers (system ones if empty)."""
    if not nameservers:
        r = dns.resolver.Resolver()
    else:
        r = dns.resolver.Resolver(configure=False)
        hosts, port = [], 53
        for ns in nameservers:
            host, _, p = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "")
            hosts.append(host)
            port = int(p) if p else 53
        r.nameservers = hosts
        r.port = port
    r.timeout, r.lifetime = 2.0, 5.0
    return _Lookup(r)


def _org(domain: str) -> str:
    return ".".join(domain.lower().rstrip(".").split(".")[-2:])


def _tags(rec: str) -> dict[str, str]:
    out = {}
    for part in rec.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip().lower()] = "".join(v.split())
    return out


def check_domain(
    domain: str,
    ips: Sequence[str] = (),
    keys: Sequence[tuple[str, str]] = (),
    nameservers: Sequence[str] = (),
    return_path_domain: str | None = None,
) -> list[Check]:
    """All checks for ``domain``; ``keys`` are (selector, private-key path) pairs."""
    domain = domain.lower().rstrip(".")
    look = make_lookup(nameservers)
    checks: list[Check] = []
    # MX
    mx = look(domain, "MX")
    if not mx:
        checks.append(Check("MX", FAIL, "no MX record", f"{domain}. IN MX 10 mx.{domain}."))
    elif any(v.split()[-1] == "." for v in mx):
        checks.append(Check("MX", FAIL, "null MX: the domain accepts no mail (no bounces)"))
    else:
        checks.append(Check("MX", PASS, ", ".join(sorted(mx))))
    # SPF
    rec = spf_record(domain, look)
    ip_terms = " ".join(f"ip{ipaddress.ip_address(i).version}:{i}" for i in ips) or "ip4:YOUR.IP"
    if rec is None:
        checks.append(
            Check("SPF", FAIL, "no SPF record", f'{domain}. IN TXT "v=spf1 {ip_terms} -all"')
        )
    elif isinstance(rec, list):
        checks.append(
            Check("SPF", FAIL, f"{len(rec)} SPF records (must be one)", "merge them into one")
        )
    else:
        bad = []
        for ip in ips:
            res = check_host(ip, domain, look)
            if res.result != "pass":
                bad.append(f"{ip}: {res.result} ({res.note})")
        if bad:
            checks.append(Check("SPF", FAIL, "; ".join(bad), f"add {ip_terms} to: {rec}"))
        else:
            checks.append(
                Check("SPF", PASS if ips else WARN, rec if ips else f"{rec} (no --ip given)")
            )
    # DKIM
    if not keys:
        checks.append(Check("DKIM", WARN, "no --selector/--key given: nothing checked"))
    for sel, path in keys:
        name = f"{sel}._domainkey.{domain}"
        key = load_private_key(path)
        txts = [t for t in look(name, "TXT") if "p=" in t]
        want = public_p(key)
        if not txts:
            checks.append(
                Check(
                    f"DKIM {sel}", FAIL, f"no key at {name}", f'{name}. IN TXT "{public_txt(key)}"'
                )
            )
        elif any(_tags(t).get("p") == want for t in txts):
            checks.append(Check(f"DKIM {sel}", PASS, f"{name} matches {path}"))
        else:
            checks.append(Check(f"DKIM {sel}", FAIL, f"{name} does not match {path}",
                                f'{name}. IN TXT "{public_txt(key)}"'))  # fmt: skip
    # DMARC
    dmarc = [t for t in look(f"_dmarc.{domain}", "TXT") if t.lower().startswith("v=dmarc1")]
    if not dmarc and _org(domain) != domain:
        dmarc = [
            t for t in look(f"_dmarc.{_org(domain)}", "TXT") if t.lower().startswith("v=dmarc1")
        ]
    fix = f'_dmarc.{domain}. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc@{domain}"'
    if not dmarc:
        checks.append(Check("DMARC", FAIL, "no DMARC record", fix))
    else:
        tags = _tags(dmarc[0])
        p = tags.get("p", "")
        if p not in ("none", "quarantine", "reject"):
            checks.append(Check("DMARC", FAIL, f"bad or missing p= in {dmarc[0]!r}", fix))
        else:
            checks.append(Check("DMARC", WARN if p == "none" else PASS, f"p={p}: {dmarc[0]}"))
        strict_d, strict_s = tags.get("adkim") == "s", tags.get("aspf") == "s"
        ok_dkim = [sel for sel, _ in keys]  # keys are for d=domain: aligned (exact)
        rp = (return_path_domain or domain).lower().rstrip(".")
        spf_aligned = rp == domain if strict_s else _org(rp) == _org(domain)
        if keys or spf_aligned:
            detail = []
            if keys:
                detail.append(f"DKIM d={domain} aligned (selectors {', '.join(ok_dkim)})")
            detail.append(f"return path {rp} {'aligned' if spf_aligned else 'NOT aligned'} for SPF")
            checks.append(Check("alignment", PASS if keys else WARN, "; ".join(detail)))
        else:
            checks.append(Check("alignment", FAIL, f"return path {rp} not aligned and no DKIM key",
                                "sign with d=" + domain))  # fmt: skip
        del strict_d
    # PTR / FCrDNS
    for ip in ips:
        rev = dns.reversename.from_address(ip).to_text().rstrip(".")
        ptrs = [v.rstrip(".") for v in look(rev, "PTR")]
        if not ptrs:
            checks.append(Check(f"PTR {ip}", FAIL, "no PTR record", f"{rev}. IN PTR out.{domain}."))
            continue
        rtype = "A" if ipaddress.ip_address(ip).version == 4 else "AAAA"
        confirmed = [h for h in ptrs if ip in look(h, rtype)]
        if confirmed:
            checks.append(Check(f"PTR {ip}", PASS, f"{confirmed[0]} (forward-confirmed)"))
        else:
            checks.append(Check(f"PTR {ip}", FAIL, f"{ptrs[0]} does not resolve back to {ip}",
                                f"{ptrs[0]}. IN {rtype} {ip}"))  # fmt: skip
    if look.errors:
        checks.append(Check("DNS", WARN, "; ".join(look.errors[:3])))
    return checks
