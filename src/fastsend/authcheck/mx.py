"""The ``MX`` checks: the sending and return-path domains take mail."""

from __future__ import annotations

from fastsend.authcheck.common import (
    FAIL,
    PASS,
    WARN,
    Check,
    _Judge,
    _Lookup,
    _records,
)
from fastsend.hostname import is_ip


def _addresses(look: _Lookup, host: str, j: _Judge | None = None) -> list[str] | None:
    """The host's addresses; None when a lookup failed and none was found (noted in ``j``)."""
    out: list[str] = []
    failed = _Judge("")
    for rtype in ("A", "AAAA"):
        out += [v for v in (_records(look, failed, host, rtype) or []) if is_ip(v)]
    if failed.items and not out:
        if j is not None:
            j.items += failed.items
        return None
    return out


def check_mx(domain: str, look: _Lookup, name: str = "MX") -> Check:
    j = _Judge(name)
    want = f"{domain}. IN MX 10 mx.{domain}."
    mx: list[tuple[int, str]] = []
    answers = _records(look, j, domain, "MX")
    if answers is None:
        return j.check()
    for v in answers:
        pref, _, host = v.partition(" ")
        mx.append((int(pref) if pref.isdigit() else 0, host.strip()))
    if not mx:
        addrs = _addresses(look, domain, j)
        if addrs is None:
            return j.check()
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
        if is_ip(h):
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
        addrs = _addresses(look, target, j)
        if addrs is None:
            continue
        if not addrs:
            j.add(FAIL, f"MX host {h} has no A/AAAA record", f"{target}. IN A <address>")
        else:
            good.append(f"{pref} {h} ({', '.join(addrs[:2])})")
    if good:
        j.add(PASS, "MX " + ", ".join(good))
    return j.check()
