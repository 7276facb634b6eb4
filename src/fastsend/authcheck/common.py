"""What every check shares: the verdicts, :class:`Check`, the DNS lookup
wrapper (:func:`make_lookup`) and the organizational domain (Public Suffix List)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.nameserver
import dns.resolver
import dns.reversename

from fastsend.authcheck.spf import DnsTempError
from fastsend.config.base import parse_nameserver  # (re-exported: check-domain, check-ip)

try:  # the Public Suffix List, bundled by the package (works offline)
    from publicsuffixlist import PublicSuffixList as _PSLClass

    _PSL: Any = _PSLClass()
except ImportError:  # pragma: no cover - a dependency; the heuristic is a fallback
    _PSL = None


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
    down: str = ""  # set once no server answered a lookup in time: later ones fail at once

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
        if self.down:
            return DnsTempError(self.down)
        try:
            ans = self.resolver.resolve(name + ".", rtype, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout as exc:
            # No server answered within a lookup's lifetime: the next lookups would
            # each wait as long (minutes over a pool of IPs) for the same failure.
            self.errors.append(f"{name} {rtype}: {exc}")
            self.down = f"not asked: the nameservers did not answer an earlier lookup ({exc})"
            return DnsTempError(str(exc))
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


def make_lookup(
    nameservers: Sequence[str] = (), timeout: float = 2.0, lifetime: float = 5.0
) -> _Lookup:
    """A caching DNS lookup over ``host[:port]`` nameservers (system ones if empty),
    each asked on its own port; ``timeout`` per server, ``lifetime`` per lookup."""
    if not nameservers:
        r = dns.resolver.Resolver()
    else:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(n)) for n in nameservers]
    r.timeout, r.lifetime = min(timeout, lifetime), lifetime
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


def _records(look: _Lookup, j: _Judge, name: str, rtype: str) -> list[str] | None:
    """The answers, or None (a FAIL noted in ``j``, no record to publish) when the lookup
    failed: a timeout or SERVFAIL says nothing about whether the record exists, and
    telling the operator to add a record they already have would make two."""
    try:
        return look.query(name, rtype)
    except DnsTempError as exc:
        j.add(FAIL, f"DNS lookup of {name} {rtype} failed ({exc}): cannot tell what is "
                    "published; check the nameservers and run again")  # fmt: skip
        return None


def _txt(name: str, value: str) -> str:
    """A zone-file TXT line: ``"`` and ``\\`` escaped, a value over 255 characters (a
    2048-bit DKIM key) split into several character-strings, which DNS joins back
    (RFC 7208 3.3, RFC 6376 3.6.2.2); one longer string is a zone-file error."""
    esc = [c.replace("\\", "\\\\").replace('"', '\\"') for c in
           (value[i : i + 255] for i in range(0, len(value), 255))] or [""]  # fmt: skip
    return f"{name}. IN TXT " + " ".join(f'"{c}"' for c in esc)
