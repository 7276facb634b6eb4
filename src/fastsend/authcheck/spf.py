"""An SPF evaluator (RFC 7208) for ``check-domain``: does a record authorise an IP?

``check_host(ip, domain, lookup, sender=..., helo=...)`` follows RFC 7208
section 4 and 5:

- record selection (4.5): exactly one ``v=spf1`` TXT record, several is a
  permerror, none is "none";
- the whole record is parsed before anything is evaluated (4.6): a syntax
  error anywhere (unknown mechanism, bad CIDR, bad macro, a duplicated
  ``redirect``/``exp``) is a permerror;
- mechanisms ``all``, ``include``, ``a``, ``mx``, ``ptr`` (discouraged by 5.5:
  evaluated, with a warning), ``ip4``, ``ip6`` (with CIDR and the dual
  ``/v4//v6`` form for ``a``/``mx``), ``exists``; qualifiers ``+ - ~ ?``;
- modifiers ``redirect=`` (ignored when the record has ``all``) and ``exp=``
  (parsed and then ignored: no explanation is fetched); unknown modifiers are
  ignored;
- macros (section 7): ``%{s l o d i p v h}`` with the digit and ``r``
  transformers and the ``. - + , / _ =`` delimiters, upper-case letters
  URL-escaped, ``%% %_ %-``; ``c r t`` only in ``exp`` (a permerror elsewhere);
  an expanded name longer than 253 characters loses labels on the left;
- limits (4.6.4): more than 10 DNS-querying terms (``include a mx ptr exists
  redirect``) is a permerror, so are more than 10 MX hosts for one ``mx``, and
  more than 2 void lookups (NXDOMAIN or no answer); ``ptr`` looks at 10 names
  at most; an include/redirect loop is reported as a permerror by itself;
- an IPv4-mapped IPv6 address is evaluated as IPv4.

The result names the matched mechanism and the include/redirect path to it.
``lookup(name, rtype)`` returns the answers as text ([] for NXDOMAIN and
NODATA) and raises :class:`DnsTempError` for a server failure or a timeout,
which gives "temperror".
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from fastsend.hostname import is_ip

__all__ = ["DnsTempError", "SpfResult", "check_host", "expand_macros", "parse_record", "spf_record"]

Lookup = Callable[[str, str], list[str]]  # (name, rtype) -> values ([] for NXDOMAIN/NODATA)
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_QUAL = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_DNS_TERMS = ("include", "a", "mx", "ptr", "exists")
MAX_LOOKUPS, MAX_VOID, MAX_MX, MAX_PTR = 10, 2, 10, 10
_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.\-]*)=(.*)$")
_MECH = re.compile(r"^([+\-~?]?)([A-Za-z][A-Za-z0-9_.\-]*)(.*)$")
_CIDR = re.compile(r"^(.*?)(?:/(\d+))?(?://(\d+))?$")
_CIDR_LEN = re.compile(r"0|[1-9][0-9]{0,2}")  # RFC 7208 5.6: no leading zeros
# domain-end (RFC 7208 7.1): "." toplabel ["."] or a macro-expand; a toplabel has a letter
# or an inner hyphen, so "a:192.0.2.5" (ip4: was meant) and "include:spfhost" are errors.
_DOMAIN_END = re.compile(
    r"(?:.+\.(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9])\.?"
    r"|.*(?:%\{[^}]*\}|%[%_\-])\.?)"
)
_MACRO = re.compile(r"%(?:\{([a-zA-Z])(\d*)([rR]?)([.\-+,/_=]*)\}|(.))", re.S)


class DnsTempError(Exception):
    """A DNS server failure or timeout while evaluating (gives "temperror")."""


class _Stop(Exception):
    def __init__(self, result: str, note: str) -> None:
        super().__init__(note)
        self.result, self.note = result, note


@dataclass
class SpfResult:
    """The result of ``check_host``: ``result`` is one of RFC 7208 section 2.6."""

    result: str
    note: str = ""
    mechanism: str = ""  # the matched term, e.g. "ip4:192.0.2.0/24" or "-all"
    path: list[str] = field(default_factory=list)  # include:/redirect= terms leading to it
    lookups: int = 0
    void_lookups: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def matched(self) -> str:
        """ "include:_spf.example.com > a:out.example.com", or "" if none matched."""
        return " > ".join([*self.path, self.mechanism]) if self.mechanism else ""


@dataclass
class _Term:
    qual: str
    name: str  # mechanism or modifier name, lower case
    arg: str  # the domain-spec / network ("" if none)
    cidr4: int | None = None
    cidr6: int | None = None
    text: str = ""
    modifier: bool = False


def spf_record(domain: str, lookup: Lookup) -> str | list[str] | None:
    """The single ``v=spf1`` TXT record, None if none, the list if several."""
    recs = [t for t in lookup(domain, "TXT") if re.match(r"(?i)v=spf1(?: |$)", t)]
    if len(recs) > 1:
        return recs
    return recs[0] if recs else None


def _check_macros(s: str, exp: bool) -> None:
    pos = 0
    for m in _MACRO.finditer(s):
        if "%" in s[pos : m.start()]:
            raise _Stop("permerror", f"bad macro in {s!r}")
        pos = m.end()
        if m.group(5) is not None:
            if m.group(5) not in "%_-":
                raise _Stop("permerror", f"bad macro %{m.group(5)} in {s!r}")
            continue
        letter, digits = m.group(1).lower(), m.group(2)
        if letter not in "slodiphvcrt" or (letter in "crt" and not exp):
            raise _Stop("permerror", f"macro %{{{m.group(1)}}} not allowed in {s!r}")
        if digits and int(digits) == 0:
            raise _Stop("permerror", f"macro transformer 0 in {s!r}")
    if "%" in s[pos:]:
        raise _Stop("permerror", f"bad macro in {s!r}")


def _check_domain_spec(spec: str, text: str) -> None:
    if not _DOMAIN_END.fullmatch(spec):
        raise _Stop(
            "permerror",
            f"{spec!r} in {text!r} is not a domain name (RFC 7208 7.1"
            + ("; an address belongs in ip4:/ip6:)" if is_ip(spec) else ")"),
        )


def parse_record(record: str) -> list[_Term]:
    """The terms of ``record``; raises ``ValueError`` (the permerror reason) on bad syntax."""
    try:
        return _parse(record)
    except _Stop as exc:
        raise ValueError(exc.note) from None


def _parse(record: str) -> list[_Term]:
    parts = record.split(" ")
    if parts[0].lower() != "v=spf1":
        raise _Stop("permerror", "record does not start with v=spf1")
    terms: list[_Term] = []
    seen_mod: set[str] = set()
    for text in parts[1:]:
        if not text:
            continue  # several spaces
        mod = _MODIFIER.match(text)
        if mod:
            name, arg = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                if name in seen_mod:
                    raise _Stop("permerror", f"{name}= given twice")
                seen_mod.add(name)
                if not arg:
                    raise _Stop("permerror", f"{name}= without a domain")
            _check_macros(arg, exp=False)
            if name in ("redirect", "exp"):
                _check_domain_spec(arg, text)
            terms.append(_Term("", name, arg, text=text, modifier=True))
            continue
        m = _MECH.match(text)
        if not m:
            raise _Stop("permerror", f"bad term {text!r}")
        qual, name, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
        if name not in _MECHS:
            raise _Stop("permerror", f"unknown mechanism {name!r}")
        term = _Term(qual, name, "", text=text)
        if rest and rest[0] not in ":/":
            raise _Stop("permerror", f"bad term {text!r}")
        if name == "all":
            if rest:
                raise _Stop("permerror", f"bad term {text!r}")
        elif name in ("ip4", "ip6"):
            if not rest.startswith(":"):
                raise _Stop("permerror", f"{name} without a network in {text!r}")
            net, slash, cidr = rest[1:].partition("/")
            try:
                ip = ipaddress.ip_address(net)
                if ip.version != int(name[2]):
                    raise ValueError
                if slash and not _CIDR_LEN.fullmatch(cidr):
                    raise ValueError
                bits = int(cidr) if slash else ip.max_prefixlen
                if bits > ip.max_prefixlen:
                    raise ValueError
            except ValueError:
                raise _Stop("permerror", f"bad network in {text!r}") from None
            term.arg = net
            term.cidr4 = bits if name == "ip4" else None
            term.cidr6 = bits if name == "ip6" else None
        else:
            spec = rest[1:] if rest.startswith(":") else rest
            if name in ("a", "mx"):
                cm = _CIDR.match(spec)
                assert cm is not None
                spec = cm.group(1)
                c4, c6 = cm.group(2), cm.group(3)
                if any(c is not None and not _CIDR_LEN.fullmatch(c) for c in (c4, c6)):
                    raise _Stop("permerror", f"bad CIDR length in {text!r}")
                term.cidr4 = int(c4) if c4 else None
                term.cidr6 = int(c6) if c6 else None
                if (term.cidr4 or 0) > 32 or (term.cidr6 or 0) > 128:
                    raise _Stop("permerror", f"bad CIDR length in {text!r}")
            elif "/" in spec and "%" not in spec:
                raise _Stop("permerror", f"CIDR not allowed in {text!r}")
            if rest.startswith(":") and not spec:
                raise _Stop("permerror", f"empty domain in {text!r}")
            if name in ("include", "exists") and not spec:
                raise _Stop("permerror", f"{name} needs a domain in {text!r}")
            _check_macros(spec, exp=False)
            if spec:
                _check_domain_spec(spec, text)
            term.arg = spec
        terms.append(term)
    return terms


def _nibbles(ip: IP) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))


class _Eval:
    def __init__(self, ip: IP, sender: str, helo: str, lookup: Lookup) -> None:
        self.ip, self.sender, self.helo, self.lookup = ip, sender, helo, lookup
        self.lookups = 0
        self.void = 0
        self.warnings: list[str] = []
        self.stack: list[str] = []
        self._validated: str | None = None

    # --- DNS with the limits -------------------------------------------
    def count(self, what: str) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise _Stop("permerror", f"more than {MAX_LOOKUPS} DNS lookups (at {what})")

    def query(self, name: str, rtype: str, void_counts: bool = True) -> list[str]:
        try:
            out = self.lookup(name, rtype)
        except DnsTempError as exc:
            raise _Stop("temperror", f"DNS error for {name} {rtype}: {exc}") from None
        if not out and void_counts:
            self.void += 1
            if self.void > MAX_VOID:
                raise _Stop("permerror", f"more than {MAX_VOID} void DNS lookups (at {name})")
        return out

    def addrs(self, name: str, void_counts: bool = True) -> list[IP]:
        rtype = "A" if self.ip.version == 4 else "AAAA"
        out: list[IP] = []
        for v in self.query(name, rtype, void_counts):
            try:
                out.append(ipaddress.ip_address(v))
            except ValueError:
                continue
        return out

    # --- macros ----------------------------------------------------------
    def validated_name(self, target: str) -> str | None:
        """The ptr validation of RFC 7208 5.5: a PTR name of the IP that resolves back
        to it, preferring ``target`` or a subdomain of it."""
        rev = ipaddress.ip_address(self.ip).reverse_pointer
        try:
            answers = self.query(rev, "PTR")
        except _Stop as exc:  # a DNS error: ptr does not match (RFC 7208 5.5)
            if exc.result != "temperror":
                raise
            return None
        names = [n.rstrip(".").lower() for n in answers][:MAX_PTR]
        target = target.lower().rstrip(".")
        names.sort(key=lambda n: not (n == target or n.endswith("." + target)))
        for n in names:
            try:
                if self.ip in self.addrs(n, void_counts=False):
                    return n
            except _Stop as exc:
                if exc.result != "temperror":
                    raise
        return None

    def expand(self, spec: str, domain: str, exp: bool = False) -> str:
        local, _, sdom = self.sender.rpartition("@")
        local = local or "postmaster"

        def letter_value(letter: str) -> str:
            if letter == "s":
                return f"{local}@{sdom}"
            if letter == "l":
                return local
            if letter == "o":
                return sdom
            if letter == "d":
                return domain
            if letter == "i":
                return _nibbles(self.ip)
            if letter == "v":
                return "in-addr" if self.ip.version == 4 else "ip6"
            if letter == "h":
                return self.helo
            if letter == "p":
                if self._validated is None:
                    self.warnings.append("the %{p} macro is discouraged (RFC 7208 7.3)")
                    self._validated = self.validated_name(domain) or "unknown"
                return self._validated
            if letter == "c":
                return str(self.ip)
            if letter == "r":
                return "unknown"
            return "0"  # t: no timestamp in a check

        def repl(m: re.Match[str]) -> str:
            if m.group(5) is not None:
                return {"%": "%", "_": " ", "-": "%20"}[m.group(5)]
            raw, digits, rev, delims = m.group(1), m.group(2), m.group(3), m.group(4)
            value = letter_value(raw.lower())
            parts = re.split("[" + re.escape(delims or ".") + "]", value)
            if rev:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            out = ".".join(parts)
            if raw.isupper():
                out = urllib.parse.quote(out, safe="-._~")
            return out

        out = _MACRO.sub(repl, spec)
        if exp:
            return out
        out = out.rstrip(".")
        while len(out) > 253 and "." in out:
            out = out.split(".", 1)[1]
        if not out or any(not label for label in out.split(".")):
            raise _Stop("permerror", f"{spec!r} expands to the bad name {out!r}")
        return out

    # --- check_host() ------------------------------------------------------
    def check_host(self, domain: str) -> SpfResult:
        domain = domain.lower().rstrip(".")
        if domain in self.stack:
            chain = " -> ".join([*self.stack, domain])
            raise _Stop("permerror", f"include/redirect loop: {chain}")
        rec = spf_record(domain, self._txt)
        if rec is None:
            return SpfResult("none", f"no SPF record at {domain}")
        if isinstance(rec, list):
            raise _Stop("permerror", f"{len(rec)} SPF records at {domain} (must be one)")
        terms = _parse(rec)
        self.stack.append(domain)
        try:
            return self._evaluate(domain, terms)
        finally:
            self.stack.pop()

    def _txt(self, name: str, rtype: str) -> list[str]:
        try:
            return self.lookup(name, rtype)
        except DnsTempError as exc:
            raise _Stop("temperror", f"DNS error for {name} TXT: {exc}") from None

    def _evaluate(self, domain: str, terms: list[_Term]) -> SpfResult:
        redirect = next((t for t in terms if t.modifier and t.name == "redirect"), None)
        has_all = any(t.name == "all" and not t.modifier for t in terms)
        for t in terms:
            if t.modifier:
                continue
            if t.name in _DNS_TERMS:
                self.count(t.text)
            if t.name == "ptr":
                self.warnings.append(f"{t.text} at {domain}: ptr is discouraged (RFC 7208 5.5)")
            sub_path: list[str] = []
            if t.name == "include":
                target = self.expand(t.arg, domain)
                sub = self.check_host(target)
                if sub.result == "pass":
                    sub_path = [*sub.path, sub.mechanism]
                elif sub.result in ("temperror", "permerror"):
                    sub.path = [t.text, *sub.path]
                    return sub
                elif sub.result == "none":
                    raise _Stop("permerror", f"{t.text}: {target} has no SPF record")
                matched = sub.result == "pass"
            else:
                matched = self._match(t, domain)
            if matched:
                if sub_path:
                    return SpfResult(_QUAL[t.qual], f"matched {sub_path[-1]} via {t.text}",
                                     mechanism=sub_path[-1], path=[t.text, *sub_path[:-1]])  # fmt: skip
                return SpfResult(_QUAL[t.qual], f"matched {t.text} at {domain}", mechanism=t.text)
        if redirect is not None and not has_all:
            self.count(redirect.text)
            target = self.expand(redirect.arg, domain)
            sub = self.check_host(target)
            if sub.result == "none":
                raise _Stop("permerror", f"{redirect.text}: {target} has no SPF record")
            sub.path = [redirect.text, *sub.path]
            return sub
        return SpfResult("neutral", f"no mechanism matched at {domain} (default ?all)")

    def _match(self, t: _Term, domain: str) -> bool:
        ip = self.ip
        if t.name == "all":
            return True
        if t.name in ("ip4", "ip6"):
            net = ipaddress.ip_network(f"{t.arg}/{t.cidr4 if t.name == 'ip4' else t.cidr6}",
                                       strict=False)  # fmt: skip
            return net.version == ip.version and ip in net
        target = self.expand(t.arg, domain) if t.arg else domain
        if t.name == "exists":
            return bool(self.query(target, "A"))
        if t.name == "ptr":
            name = self.validated_name(target)
            return name is not None and (name == target or name.endswith("." + target))
        bits = t.cidr4 if ip.version == 4 else t.cidr6
        if t.name == "a":
            hosts = [target]
        else:  # mx
            mxs = self.query(target, "MX")
            if len(mxs) > MAX_MX:
                raise _Stop("permerror", f"{t.text}: more than {MAX_MX} MX records at {target}")
            hosts = [v.split()[-1].rstrip(".") for v in mxs if v.split()[-1] != "."]
        for h in hosts:
            for addr in self.addrs(h, void_counts=t.name == "a"):
                if ip in ipaddress.ip_network(f"{addr}/{bits if bits is not None else addr.max_prefixlen}", strict=False):  # fmt: skip
                    return True
        return False


def check_host(
    ip: str,
    domain: str,
    lookup: Lookup,
    sender: str | None = None,
    helo: str | None = None,
) -> SpfResult:
    """RFC 7208 check_host() for ``ip``, ``domain`` and ``sender`` (default postmaster@domain)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    domain = domain.lower().rstrip(".")
    ev = _Eval(addr, sender or f"postmaster@{domain}", helo or domain, lookup)
    try:
        res = ev.check_host(domain)
    except _Stop as exc:
        res = SpfResult(exc.result, exc.note)
    res.lookups, res.void_lookups = ev.lookups, ev.void
    res.warnings = list(dict.fromkeys(ev.warnings))
    return res


def expand_macros(
    spec: str,
    ip: str,
    domain: str,
    sender: str | None = None,
    helo: str | None = None,
    lookup: Lookup | None = None,
    exp: bool = False,
) -> str:
    """RFC 7208 section 7 expansion of ``spec``; ``ValueError`` for a bad macro."""
    addr = ipaddress.ip_address(ip)
    ev = _Eval(addr, sender or f"postmaster@{domain}", helo or domain, lookup or (lambda n, t: []))
    try:
        _check_macros(spec, exp)
        return ev.expand(spec, domain, exp)
    except _Stop as exc:
        raise ValueError(exc.note) from None
