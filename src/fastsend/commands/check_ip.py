"""``fastsend check-ip -c fastsend.toml [IP ...]``: each source IP's standing.

For the given IPs (default: the node's source IPs, ``[ips] source`` and the
pools' addresses), through the config's ``[dns] nameservers``:

- ``<zone>``: a DNS blocklist listing, for each of ``[reputation] blocklists``
  (or ``--zone``, repeated; none: skipped) (:mod:`fastsend.analytics.dnsbl`);
- ``PTR``: forward-confirmed reverse DNS (a PTR record whose name resolves back
  to the IP), and the name the MTA says in EHLO from the IP (as
  :mod:`fastsend.delivery.ehlo` chooses it, or ``--helo``): fully qualified,
  resolving to the IP, ideally the PTR name;
- ``SPF helo``: RFC 7208 2.3, the EHLO name's SPF record authorises the IP
  (receivers that check the HELO identity, and every one for a bounce).

The identity checks follow check-domain's rules: a lookup that fails (SERVFAIL,
timeout) is a failure saying so, never read as a missing record; whatever is
wrong comes with the records to publish. Prints one line per (IP, check), then
the records; ``--json`` prints a list with one object per (IP, check): a
listing has ``zone``, ``listed``, ``codes``, ``text``, ``error``, ``checked``;
every object has ``ip``, ``check`` (``dnsbl``, ``PTR``, ``SPF helo``) and
``status`` (``pass``/``warn``/``fail``); an identity check has ``ehlo``,
``detail``, ``notes`` and ``fix``.

Exit status: 0 when no IP is listed and no check fails (warnings allowed), 1
when one is, 2 on bad input or when no blocklist lookup could be answered.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from typing import Any

import orjson

from fastsend.commands.common import die


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ips", nargs="*", help="IP addresses (default: the node's source IPs)")
    p.add_argument("-c", "--config", help="config file (TOML): blocklists, DNS, source IPs")
    p.add_argument("--zone", action="append", default=[], help="a blocklist zone (repeatable)")
    p.add_argument("--helo", help="the name said in EHLO from every IP (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from fastsend.analytics.dnsbl import (
        Blocklist,
        Reputation,
        ReputationSettings,
        make_resolver,
        node_ips,
    )
    from fastsend.config import Config, ConfigError, load, validate_helo

    try:
        cfg = load(args.config) if args.config else Config()
        settings = ReputationSettings.from_config(cfg)
    except ConfigError as e:
        return die(str(e))
    for z in args.zone:
        if not z.strip(".") or " " in z:
            return die(f"--zone {z!r} is not a DNS name")
        settings.blocklists.append(Blocklist(z.strip(".").lower()))
    helo = ""
    if getattr(args, "helo", None):
        try:
            helo = validate_helo(args.helo, "--helo")
        except ValueError as e:
            return die(str(e))
    ips = args.ips or node_ips(cfg)
    if not ips:
        return die("no IPs: give some, or set [ips] source / [pools] in the config")
    for i, ip in enumerate(ips):
        try:
            ips[i] = str(ipaddress.ip_address(ip.strip()))
        except ValueError:
            return die(f"{ip!r} is not an IP address")
    ips = list(dict.fromkeys(ips))
    for ns in cfg.dns.nameservers:
        from fastsend.authcheck.common import parse_nameserver

        try:
            parse_nameserver(ns)
        except ValueError as exc:
            return die(f"[dns] nameservers: {exc}")
    results = []
    if settings.blocklists:
        rep = Reputation(settings, make_resolver(cfg), lambda ev: None)
        results = asyncio.run(rep.check_ips(ips))
    elif not args.json:
        print("check-ip: no blocklists ([reputation] blocklists or --zone): checking "
              "reverse DNS and the EHLO name only", file=sys.stderr)  # fmt: skip
    identity = _identity(cfg, ips, helo)
    if args.json:
        docs: list[dict[str, Any]] = []
        for r in results:
            d = r.as_dict()
            st = "fail" if r.listed else ("warn" if r.error else "pass")
            docs.append({"ip": d["ip"], "check": "dnsbl", "status": st, **d})
        for ip, name, c in identity:
            docs.append({"ip": ip, "check": c.name, "status": c.status, "ehlo": name,
                         "listed": False, **{k: v for k, v in c.as_dict().items()
                                             if k not in ("name", "status")}})  # fmt: skip
        print(orjson.dumps(docs).decode())
    else:
        _print(results, identity)
    if any(r.listed for r in results) or any(c.status == "fail" for _, _, c in identity):
        return 1
    return 2 if results and all(r.error for r in results) else 0


def _identity(cfg: Any, ips: list[str], helo: str) -> list[tuple[str, str, Any]]:
    """(IP, EHLO name, check) for the PTR and SPF helo checks of each IP."""
    from fastsend.authcheck.common import make_lookup, org_domain
    from fastsend.authcheck.ptr import check_ptr
    from fastsend.authcheck.spf_check import check_helo_spf
    from fastsend.delivery.ehlo import choose
    from fastsend.hostname import is_fqdn

    if helo:
        names = {ip: helo for ip in ips}
    else:
        # what the workers would say from each IP (the given ones as if configured)
        pool_ips = {e.ip for p in (cfg.pools.pools.values() if cfg.pools else ()) for e in p.ips}
        cfg.source_ips = [ip for ip in ips if ip not in pool_ips]
        chosen = choose(cfg, lookups=True)
        names = {ip: chosen.name(ip) for ip in ips}
    look = make_lookup(cfg.dns.nameservers, min(cfg.dns.timeout, 2.0), cfg.dns.timeout)
    out = []
    for ip in ips:
        name = names[ip]
        domain = org_domain(name) if is_fqdn(name) else "example.com"
        out.append((ip, name, check_ptr(ip, domain, look, name, "PTR")))
        out.append((ip, name, check_helo_spf(ip, name, look)))
    return out


def _print(results: list[Any], identity: list[tuple[str, str, Any]]) -> None:
    for r in results:
        state = "LISTED" if r.listed else ("error" if r.error else "ok")
        detail = ", ".join(r.codes) if r.listed else r.error
        text = f"  {r.text}" if r.text else ""
        print(f"{r.ip:<40} {r.zone:<32} {state:<7} {detail}{text}".rstrip())
    for ip, name, c in identity:
        state = c.status if c.status != "pass" else "ok"
        print(f"{ip:<40} {c.name + ' (EHLO ' + name + ')':<32} {state:<7} {c.detail}".rstrip())
    fixes = [(ip, c) for ip, _, c in identity if c.fix and c.status != "pass"]
    if fixes:
        print("\nrecords to add or change:")
        seen: set[str] = set()
        for ip, c in fixes:
            lines = [ln for ln in c.fix.splitlines() if ln not in seen]
            seen.update(lines)
            if lines:
                print(f"  ; {ip} {c.name} ({c.status})")
                print("\n".join(f"  {ln}" for ln in lines))
