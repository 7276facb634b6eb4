"""A small SPF evaluator (RFC 7208) for ``check-domain``: does a record authorise an IP?

Supports ``all``, ``ip4``, ``ip6``, ``a``, ``mx``, ``include``, ``exists``
(without macros), ``redirect=``, qualifiers, and the 10-lookup limit
(permerror beyond). It deliberately does not expand macros (a record using
them gives "neutral" with a note) and treats ``ptr`` as not matching (RFC
7208 5.5 says do not use it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

__all__ = ["SpfResult", "check_host"]

Lookup = Callable[[str, str], list[str]]  # (name, rtype) -> values ([] for NXDOMAIN/NODATA)
_QUAL = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


class SpfResult:
    def __init__(self, result: str, note: str = "") -> None:
        self.result, self.note = result, note

    def __repr__(self) -> str:
        return f"SpfResult({self.result!r}, {self.note!r})"


def spf_record(domain: str, lookup: Lookup) -> str | list[str] | None:
    """The single ``v=spf1`` TXT record, None if none, the list if several."""
    recs = [
        t for t in lookup(domain, "TXT") if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")
    ]
    if len(recs) > 1:
        return recs
    return recs[0] if recs else None


def check_host(ip: str, domain: str, lookup: Lookup, _count: list[int] | None = None) -> SpfResult:
    """RFC 7208 check_host() for ``ip`` and ``domain`` (no macros)."""
    count = _count if _count is not None else [0]
    addr = ipaddress.ip_address(ip)
    rec = spf_record(domain, lookup)
    if rec is None:
        return SpfResult("none", f"no SPF record at {domain}")
    if isinstance(rec, list):
        return SpfResult("permerror", f"{len(rec)} SPF records at {domain}")
    redirect = None
    for term in rec.split()[1:]:
        if "%" in term:
            return SpfResult("neutral", f"macros are not evaluated ({term})")
        if term.lower().startswith("redirect="):
            redirect = term.split("=", 1)[1]
            continue
        if "=" in term.split(":")[0]:
            continue  # other modifiers (exp=, unknown)
        qual = "+"
        if term[0] in _QUAL:
            qual, term = term[0], term[1:]
        mech, _, arg = term.partition(":")
        mech, cidr = mech.lower(), ""
        if "/" in mech:
            mech, cidr = mech.split("/", 1)
        if "/" in arg and mech in ("a", "mx"):
            arg, cidr = arg.split("/", 1)
        if mech in ("a", "mx", "include", "exists", "ptr"):
            count[0] += 1
            if count[0] > 10:
                return SpfResult("permerror", "more than 10 DNS lookups")
        target = arg or domain
        matched = False
        if mech == "all":
            matched = True
        elif mech in ("ip4", "ip6"):
            try:
                matched = addr in ipaddress.ip_network(arg, strict=False)
            except ValueError:
                return SpfResult("permerror", f"bad {mech} {arg!r}")
        elif mech in ("a", "mx"):
            hosts = [target]
            if mech == "mx":
                hosts = [v.split()[-1].rstrip(".") for v in lookup(target, "MX")]
            c4 = cidr.split("//")[0] if cidr else ""
            for h in hosts:
                for v in lookup(h, "A" if addr.version == 4 else "AAAA"):
                    net = ipaddress.ip_network(f"{v}/{c4}" if c4 else v, strict=False)
                    matched = matched or addr in net
        elif mech == "include":
            sub = check_host(ip, target, lookup, count)
            if sub.result in ("temperror", "permerror"):
                return sub
            if sub.result == "none":
                return SpfResult("permerror", f"include:{target} has no SPF record")
            matched = sub.result == "pass"
        elif mech == "exists":
            matched = bool(lookup(target, "A"))
        elif mech == "ptr":
            matched = False
        else:
            return SpfResult("permerror", f"unknown mechanism {mech!r}")
        if matched:
            return SpfResult(_QUAL[qual], f"matched {qual}{term}")
    if redirect:
        count[0] += 1
        if count[0] > 10:
            return SpfResult("permerror", "more than 10 DNS lookups")
        sub = check_host(ip, redirect, lookup, count)
        return SpfResult("permerror", "redirect target has no SPF") if sub.result == "none" else sub
    return SpfResult("neutral", "no mechanism matched")
