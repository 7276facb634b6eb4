"""The name a worker says in EHLO from each source IP.

RFC 5321 4.1.1.1 / 4.1.4: the client's fully qualified domain name, or an
address literal when it has none. Receivers check it: Postfix's
``reject_non_fqdn_helo_hostname`` / ``reject_unknown_helo_hostname``, Gmail
and Microsoft score a name that is not the sending IP's, Spamhaus-style
checks list hosts saying ``localhost``. The choice, per source IP:

1. the pool address's ``ehlo``, else ``[ips] helo`` (``--helo``): the
   operator's name, said as given (in A-labels, no trailing dot);
2. else the IP's forward-confirmed PTR name (its PTR record names a host whose
   A/AAAA record is the IP), as Exim's common ``helo_data`` lookup does;
3. else this host's name (``gethostname()``) when it is fully qualified, as
   Postfix's ``myhostname`` defaults;
4. else the IP's address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``):
   no name is better than a false one.

With no source IP configured (the kernel picks it) the same, from step 3; with
no name at all the EHLO says the connection's own address as a literal
(``SMTPClient`` gets "" and :mod:`fastsend.smtp.transport` fills it in).

:func:`prepare` runs in the supervisor before it forks the workers (``send``
and ``serve`` alike): it looks the names up once and prints a warning on
stderr for every name that is not fully qualified, does not resolve back to
its IP, or could not be checked. DNS is asked only when delivery uses it
anyway (MX lookups) or ``[dns] nameservers`` is set, all lookups together
within :data:`BUDGET_S`; a DNS that fails or does not answer never stops
sending, the name falls to the next step and the warning says why.
"""

from __future__ import annotations

import socket
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from fastsend.config import Config
from fastsend.delivery.mx import may_resolve
from fastsend.hostname import address_literal, host_name, is_fqdn

__all__ = ["BUDGET_S", "EhloNames", "choose", "names_for", "prepare"]

BUDGET_S = 3.0  # every startup lookup together; past it, sending starts with what is known
SHOWN = 8  # warnings printed one by one; the rest are counted
FIX = "set the pool address's ehlo (or [ips] helo, or --helo) to the IP's PTR name"


@dataclass
class EhloNames:
    by_ip: dict[str, str] = field(default_factory=dict)  # source IP -> the EHLO name
    default: str = ""  # with no source IP: a name, or "" (the connection's own literal)
    warnings: list[str] = field(default_factory=list)

    def name(self, ip: str) -> str:
        if not ip:
            return self.default
        return self.by_ip.get(ip) or address_literal(ip)


def _node_ips(config: Config) -> list[str]:
    ips = list(config.source_ips)
    if config.pools is not None:
        for p in config.pools.pools.values():
            ips.extend(e.ip for e in p.ips if e.ip not in ips)
    return ips


def foreign_ips(config: Config) -> list[tuple[str, str]]:
    """The node's source IPs ([ips] source, [pools]) no interface of this machine has,
    each with why a socket cannot be bound to it. Mail from one is deferred at every
    attempt ("Cannot assign requested address") until it expires, so `send`,
    `resume` and `serve` refuse to start with one (a mistyped --source-ip, a config
    copied from another node) instead of deferring everything without a word."""
    import socket

    out = []
    for ip in _node_ips(config):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((ip, 0))
        except OSError as e:
            out.append((ip, e.strerror or str(e)))
        finally:
            s.close()
    return out


def foreign_ips_error(config: Config) -> str | None:
    """:func:`foreign_ips` said as an error with what to do, or None."""
    bad = foreign_ips(config)
    if not bad:
        return None
    said = ", ".join(f"{ip} ({why})" for ip, why in bad)
    return (
        f"source IP {said} is not an address of this machine: add it to an interface,"
        " or leave it out of --source-ip, [ips] source and [pools]"
    )


def _said(name: str) -> str:
    """A configured name as it goes on the wire: a literal as given, a name in A-labels."""
    return name if name.startswith("[") else (host_name(name) or name)


def choose(
    config: Config, lookups: bool | None = None, budget: float = BUDGET_S, hostname: str = ""
) -> EhloNames:
    """The EHLO name for each of ``config``'s source IPs and the default; with
    ``lookups`` (default: when delivery uses DNS) the PTR names are looked up and
    each name is checked against its IP. ``hostname``: this host's name (default
    ``socket.gethostname()``)."""
    if lookups is None:
        lookups = bool(config.dns.nameservers) or may_resolve(config)
    ips = _node_ips(config)
    pools = config.pools.pools.values() if config.pools is not None else ()
    pool_ehlo = {e.ip: e.ehlo for p in pools for e in p.ips if e.ehlo}
    host = host_name(hostname or socket.gethostname())
    host_ok = is_fqdn(host)
    out = EhloNames()
    problems: list[str] = []
    checks: dict[str, Future[Any]] = {}
    if lookups and (ips or config.helo):
        from fastsend.authcheck.common import make_lookup
        from fastsend.authcheck.ptr import addresses, fcrdns

        t = min(config.dns.timeout, budget)
        ns = list(config.dns.nameservers)

        def _fcrdns(ip: str) -> tuple[str | None, str]:
            return fcrdns(ip, make_lookup(ns, t, t))

        def _addresses(name: str, ip: str) -> list[str]:
            return addresses(name, ip, make_lookup(ns, t, t))

        def _any_address(name: str) -> list[str]:
            return _addresses(name, "0.0.0.0") or _addresses(name, "::")

        # Threads, so that one slow server costs the budget once, not once per IP.
        pool_exec = ThreadPoolExecutor(max_workers=min(16, len(ips) + 1))
        for ip in ips:
            name = pool_ehlo.get(ip) or config.helo
            if not name:
                checks[ip] = pool_exec.submit(_fcrdns, ip)
                if host_ok:
                    checks[f"host {ip}"] = pool_exec.submit(_addresses, host, ip)
            elif is_fqdn(name):
                checks[ip] = pool_exec.submit(_addresses, _said(name), ip)
        if not ips and config.helo and is_fqdn(config.helo):
            checks[""] = pool_exec.submit(_any_address, _said(config.helo))
        wait(list(checks.values()), timeout=budget)
        pool_exec.shutdown(wait=False, cancel_futures=True)

    def result(key: str) -> tuple[str, Any]:
        """("ok", value), ("error", text) or ("", None) when not looked up."""
        f = checks.get(key)
        if f is None:
            return "", None
        if not f.done() or f.cancelled():
            return "error", f"DNS gave no answer within {budget:g} s"
        exc = f.exception()
        if exc is not None:
            return "error", f"DNS lookup failed ({exc})"
        return "ok", f.result()

    for ip in ips:
        name = pool_ehlo.get(ip) or config.helo
        if name:
            said = out.by_ip[ip] = _said(name)
            if said.startswith("["):
                continue
            if not is_fqdn(said):
                problems.append(f"EHLO from {ip}: {said!r} is not a fully qualified domain "
                                f"name; receivers refuse or penalise it; {FIX}")  # fmt: skip
                continue
            kind, value = result(ip)
            if kind == "error":
                problems.append(f"EHLO from {ip}: could not check that {said} resolves to "
                                f"{ip}: {value}")  # fmt: skip
            elif kind == "ok" and not _has(value, ip):
                problems.append(f"EHLO from {ip}: {said} does not resolve to {ip}"
                                + (f" ({', '.join(value)})" if value else "") + f"; {FIX}")
            continue
        kind, value = result(ip)
        if kind == "ok" and value[0] and is_fqdn(value[0]):
            out.by_ip[ip] = host_name(value[0])  # the forward-confirmed PTR name
            continue
        if kind == "ok" and value[0]:
            kind, value = "ok", (None, f"its PTR name {value[0]!r} is not fully qualified")
        why = value[1] if kind == "ok" else value
        if host_ok and not kind:  # no DNS to check with: this host's name, as Postfix says
            out.by_ip[ip] = host
            continue
        if host_ok:
            out.by_ip[ip] = host
            note = f"EHLO from {ip}: saying this host's name {host}"
            hk, hv = result(f"host {ip}")
            if hk == "ok" and not _has(hv, ip):
                note += f", which does not resolve to {ip}"
        else:
            out.by_ip[ip] = address_literal(ip)
            note = (f"EHLO from {ip}: saying {address_literal(ip)} (this host's name "
                    f"{host!r} is not fully qualified)")  # fmt: skip
        if kind == "ok":
            note += f": {ip} has no forward-confirmed PTR name ({why})"
        elif kind:
            note += f": could not look up {ip}'s PTR name: {why}"
        problems.append(f"{note}; {FIX}")
    if config.helo:
        out.default = _said(config.helo)
        if not out.default.startswith("[") and not is_fqdn(out.default):
            problems.append(f"EHLO: [ips] helo {out.default!r} is not a fully qualified "
                            "domain name; receivers refuse or penalise it")  # fmt: skip
        elif not ips:
            kind, value = result("")
            if kind == "error":
                problems.append(f"EHLO: could not check that {out.default} resolves: {value}")
            elif kind == "ok" and not value:
                problems.append(f"EHLO: {out.default} has no address record; receivers "
                                "refuse a name that does not resolve")  # fmt: skip
    elif host_ok:
        out.default = host
    elif not ips:
        problems.append(f"EHLO: no [ips] helo and this host's name {host!r} is not fully "
                        "qualified: saying the connection's own address as a literal; set "
                        "[ips] helo (or --helo) to the sending IP's PTR name")  # fmt: skip
    out.warnings = problems
    return out


def _has(values: list[str], ip: str) -> bool:
    from fastsend.authcheck.ptr import same_ip

    return any(same_ip(v, ip) for v in values)


_CHOSEN: dict[int, tuple[Config, EhloNames]] = {}


def prepare(config: Config, err: Any = None) -> EhloNames:
    """In the supervisor, before forking workers on ``config``: choose (with DNS
    when delivery uses it) and warn on ``err`` (stderr), once per config."""
    got = _CHOSEN.get(id(config))
    if got is not None and got[0] is config:
        return got[1]
    names = choose(config)
    _CHOSEN.clear()  # one config at a time (serve's reload makes a new one)
    _CHOSEN[id(config)] = (config, names)
    err = err or sys.stderr
    for w in names.warnings[:SHOWN]:
        print(f"fastsend: warning: {w}", file=err)
    if len(names.warnings) > SHOWN:
        print(f"fastsend: warning: ... and {len(names.warnings) - SHOWN} more EHLO warnings "
              "(fastsend check-ip -c CONFIG lists each IP)", file=err)  # fmt: skip
    err.flush()
    return names


def names_for(config: Config) -> EhloNames:
    """In a worker: what :func:`prepare` chose before the fork (inherited), else
    chosen now without DNS (a worker made outside the supervisor: tests)."""
    got = _CHOSEN.get(id(config))
    if got is not None and got[0] is config:
        return got[1]
    return choose(config, lookups=False)
