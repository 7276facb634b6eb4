"""The ``PTR <ip>`` checks: forward-confirmed reverse DNS of each source IP."""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.exception
import dns.resolver
import dns.reversename

from fastsend.authcheck.common import (
    FAIL,
    PASS,
    WARN,
    Check,
    _Judge,
    _Lookup,
    _records,
)
from fastsend.hostname import host_name, is_fqdn


def check_ptr(
    ip: str, domain: str, look: _Lookup, ehlo: str | None = None, name: str = ""
) -> Check:
    """FCrDNS of ``ip``; with ``ehlo`` (the name said in EHLO from it) also that name.
    A missing PTR record's fix names ``out.<domain>``, or ``ehlo`` when it is a full
    name (check-ip, which has no domain). ``name``: the check's (``PTR <ip>``)."""
    j = _Judge(name or f"PTR {ip}")
    host = ehlo.rstrip(".").lower() if ehlo and is_fqdn(ehlo) else f"out.{domain}"
    c = _check_ptr(j, ip, domain, look, host)
    if ehlo is None:
        return c
    _check_ehlo(j, ip, ehlo, c.status != FAIL, look)
    return j.check()


def _check_ehlo(j: _Judge, ip: str, ehlo: str, ptr_ok: bool, look: _Lookup) -> None:
    addr = ipaddress.ip_address(ip)
    rtype = "A" if addr.version == 4 else "AAAA"
    rev = dns.reversename.from_address(ip).to_text().rstrip(".")
    name = host_name(ehlo) or ehlo.rstrip(".").lower()
    hint = "set the pool address's ehlo or [ips] helo to the IP's PTR name"
    if name.startswith("["):
        j.add(WARN, f"EHLO {ehlo}: an address literal, which many receivers score as spam; {hint}")
        return
    if not is_fqdn(name):
        j.add(FAIL, f"EHLO {ehlo}: not a fully qualified domain name (RFC 5321 4.1.1.1), "
                    f"receivers reject or score it; {hint}")  # fmt: skip
        return
    fwd = _records(look, j, name, rtype)
    if fwd is None:
        return
    if not any(_same_ip(v, addr) for v in fwd):
        j.add(FAIL, f"EHLO {ehlo} does not resolve to {ip}"
                    + (f" ({', '.join(fwd)})" if fwd else ""), f"{name}. IN {rtype} {ip}")  # fmt: skip
        return
    ptrs = [v.rstrip(".").lower() for v in (look(rev, "PTR") if ptr_ok else [])]
    if ptrs and name not in ptrs:
        j.add(WARN, f"EHLO {ehlo} resolves to {ip} but is not its PTR name ({ptrs[0]}): "
                    "say the PTR name")  # fmt: skip
    else:
        j.add(PASS, f"EHLO {ehlo} resolves to {ip}")


def _check_ptr(j: _Judge, ip: str, domain: str, look: _Lookup, host: str) -> Check:
    addr = ipaddress.ip_address(ip)
    rev = dns.reversename.from_address(ip).to_text().rstrip(".")
    rtype = "A" if addr.version == 4 else "AAAA"
    answers = _records(look, j, rev, "PTR")
    if answers is None:
        return j.check()
    ptrs = [v.rstrip(".").lower() for v in answers]
    if not ptrs:
        j.add(FAIL, f"no PTR record for {ip}: many receivers reject mail from it",
              f"{rev}. IN PTR {host}.", f"{host}. IN {rtype} {ip}")  # fmt: skip
        return j.check()
    if len(ptrs) > 1:
        j.add(WARN, f"{len(ptrs)} PTR records ({', '.join(ptrs)}): keep one")
    confirmed = []
    for h in ptrs:
        fwd = _records(look, j, h, rtype)
        if fwd is None:
            continue
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


def fcrdns(ip: str, look: _Lookup) -> tuple[str | None, str]:
    """``ip``'s forward-confirmed PTR name, or (None, why it has none). Raises
    :class:`~fastsend.authcheck.spf.DnsTempError` when a lookup failed: that
    says nothing about what is published."""
    addr = ipaddress.ip_address(ip)
    rev = dns.reversename.from_address(ip).to_text().rstrip(".")
    ptrs = [v.rstrip(".").lower() for v in look.query(rev, "PTR")]
    if not ptrs:
        return None, "no PTR record"
    for h in ptrs:
        if any(_same_ip(v, addr) for v in addresses(h, ip, look)):
            return h, ""
    return None, f"its PTR name {ptrs[0]} does not resolve back to it"


def addresses(name: str, ip: str, look: _Lookup) -> list[str]:
    """The addresses of ``name`` in ``ip``'s family (A or AAAA); raises DnsTempError."""
    rtype = "A" if ipaddress.ip_address(ip).version == 4 else "AAAA"
    return look.query(name.rstrip("."), rtype)


def same_ip(v: str, ip: str) -> bool:
    return _same_ip(v, ipaddress.ip_address(ip))


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
