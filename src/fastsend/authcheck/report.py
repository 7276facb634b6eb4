""":func:`check_domain` (every check, in order) and :func:`report` (the JSON)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastsend.authcheck.common import (
    _RANK,
    FAIL,
    ORG_SOURCE,
    PASS,
    WARN,
    Check,
    make_lookup,
    org_domain,
)
from fastsend.authcheck.dkim import (
    check_dkim,
)
from fastsend.authcheck.dmarc import (
    check_alignment,
    check_dmarc,
)
from fastsend.authcheck.mx import (
    check_mx,
)
from fastsend.authcheck.ptr import (
    check_ptr,
)
from fastsend.authcheck.spf_check import (
    check_spf,
)
from fastsend.hostname import host_name


def check_domain(
    domain: str,
    ips: Sequence[str] = (),
    keys: Sequence[tuple[str, str]] = (),
    nameservers: Sequence[str] = (),
    return_path_domain: str | None = None,
    dkim_domain: str | None = None,
    ehlo: Mapping[str, str] | None = None,
) -> list[Check]:
    """All checks for ``domain``; ``keys`` are (selector, private-key path) pairs for
    ``dkim_domain`` (default: ``domain``); ``ehlo`` maps a source IP to the name said
    in EHLO from it (checked in its ``PTR`` check)."""
    # An internationalised domain in A-labels, as DNS holds it: in U-labels the
    # DMARC rua/ruf of the same domain looked external, and the records to publish
    # were not valid zone-file names.
    domain = _a_labels(domain)
    rp = _a_labels(return_path_domain or domain)
    dd = _a_labels(dkim_domain or domain)
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
        checks.append(check_ptr(ip, domain, look, (ehlo or {}).get(ip)))
    if look.errors:
        errs = list(dict.fromkeys(look.errors))
        checks.append(Check("DNS", WARN, "; ".join(errs[:3]), notes=errs[:10]))
    return checks


def _a_labels(domain: str) -> str:
    return host_name(domain) or domain.lower().rstrip(".")


def report(domain: str, checks: Sequence[Check]) -> dict[str, Any]:
    """The ``--json`` document (schema in the module docstring)."""
    summary = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)}
    worst = max((c.status for c in checks), key=_RANK.__getitem__, default=PASS)
    d = _a_labels(domain)
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
