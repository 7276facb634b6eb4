"""``fastsend check-domain DOMAIN``: judge MX, SPF, DKIM, DMARC and PTR for a sender.

    fastsend check-domain example.com --ip 192.0.2.10 \\
        --selector s2026 --key keys/s2026.pem [--return-path-domain bounce.example.com] \\
        [--dkim-domain example.com] [--nameserver 127.0.0.1:5353] [--json]
    fastsend check-domain example.com -c fastsend.toml

``-c`` checks what the MTA will send with: the config's source IPs and every
pool's addresses (``--ip`` when none is given), its DKIM keys for the DKIM
domain (``--selector/--key`` when none is given), its ``[dns] nameservers``
(``--nameserver``) and the name each IP says in EHLO (the pool address's
``ehlo``, else ``[ips] helo``, else the IP's forward-confirmed PTR name, this
host's fully qualified name or the IP's address literal, as
:mod:`fastsend.delivery.ehlo` chooses; ``--helo`` for all): a fully qualified
name that resolves to the IP, ideally its PTR name. Flags given on the command
line win.

Prints a pass/warn/fail table, then the exact records to add or change for
every check that is not a pass. ``--json`` prints the document described in
:mod:`fastsend.authcheck` instead. Exit status: 0 when nothing fails (warnings
allowed), 1 when a check fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shutil
import sys
import textwrap

from fastsend.authcheck import FAIL, PASS, check_domain, report
from fastsend.authcheck.common import parse_nameserver
from fastsend.message.keys import DkimKeyError

__all__ = ["add_arguments", "format_table", "run"]

_NAME_W = 20
# two or more labels of letters (any script), digits, '-' and '_', none empty or over 63
_DOMAIN = re.compile(r"(?=.{1,253}\.?$)(?:(?!-)[\w-]{1,63}(?<!-)\.)+(?!-)[\w-]{1,63}(?<!-)\.?")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="the sending (From) domain")
    p.add_argument("-c", "--config", help="config file (TOML): source/pool IPs, DKIM keys, DNS")
    p.add_argument("--ip", action="append", default=[], help="a sending IP (repeatable)")
    p.add_argument("--selector", action="append", default=[], help="DKIM selector (repeatable)")
    p.add_argument("--key", action="append", default=[], help="private key for each --selector")
    p.add_argument("--return-path-domain", help="envelope sender domain (default: DOMAIN)")
    p.add_argument("--dkim-domain", help="the DKIM d= domain of the keys (default: DOMAIN)")
    p.add_argument("--nameserver", action="append", default=[], help="HOST[:PORT] to ask")
    p.add_argument("--helo", help="the name said in EHLO from every --ip (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON")


def format_table(doc: dict, width: int = 100) -> str:
    """The human report for a :func:`fastsend.authcheck.report` document."""
    lines = [f"check-domain {doc['domain']} (organizational domain "
             f"{doc['organizational_domain']})", ""]  # fmt: skip
    indent = " " * (6 + _NAME_W + 1)
    for c in doc["checks"]:
        head = f"{c['status'].upper():5s} {c['name']:{_NAME_W}s} "
        for i, note in enumerate(c["notes"]):
            wrapped = textwrap.wrap(
                note,
                width=max(40, width),
                initial_indent=head if i == 0 else indent,
                subsequent_indent=indent + "  ",
                break_on_hyphens=False,
            )
            lines.extend(wrapped or [head.rstrip()])
    s = doc["summary"]
    lines += ["", f"{s['pass']} pass, {s['warn']} warn, {s['fail']} fail"]
    fixes = [c for c in doc["checks"] if c["fix"] and c["status"] != PASS]
    if fixes:
        lines += ["", "records to add or change:"]
        for c in fixes:
            lines.append(f"  ; {c['name']} ({c['status']})")
            lines.extend(f"  {f}" for f in c["fix"].splitlines())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if len(args.selector) != len(args.key):
        print("check-domain: give one --key per --selector", file=sys.stderr)
        return 2
    for ip in args.ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            print(f"check-domain: bad IP {ip!r}", file=sys.stderr)
            return 2
    for flag, value in (("", args.domain), ("--return-path-domain ", args.return_path_domain),
                        ("--dkim-domain ", args.dkim_domain)):  # fmt: skip
        if value is not None and not _DOMAIN.fullmatch(value):
            print(f"check-domain: {flag}{value!r} is not a domain name", file=sys.stderr)
            return 2
    ips, keys, nameservers = (
        args.ip,
        list(zip(args.selector, args.key, strict=True)),
        args.nameserver,
    )
    ehlo: dict[str, str] = {}
    if getattr(args, "config", None):
        from fastsend.analytics.dnsbl import node_ips
        from fastsend.config import ConfigError, load

        try:
            cfg = load(args.config)
        except (ConfigError, OSError) as exc:
            print(f"check-domain: {exc}", file=sys.stderr)
            return 2
        from fastsend.hostname import host_name

        dd = host_name(args.dkim_domain or args.domain)
        ips = ips or node_ips(cfg)
        all_keys = [*cfg.dkim, *(k for t in (cfg.tenants or {}).values() for k in t.keys)]
        keys = keys or list(dict.fromkeys(
            (k.selector, k.entry(cfg.base_dir)["key"]) for k in all_keys if host_name(k.domain) == dd
        ))  # fmt: skip
        nameservers = nameservers or list(cfg.dns.nameservers)
        # what the workers say (fastsend.delivery.ehlo): the pool address's ehlo, else
        # [ips] helo, else the IP's forward-confirmed PTR name, this host's full name,
        # its address literal
        from fastsend.delivery.ehlo import choose

        if nameservers:
            cfg.dns.nameservers = list(nameservers)
        pool_ips = {e.ip for p in (cfg.pools.pools.values() if cfg.pools else ()) for e in p.ips}
        cfg.source_ips = [ip for ip in ips if ip not in pool_ips]
        chosen = choose(cfg, lookups=True)
        ehlo = {ip: chosen.name(ip) for ip in ips}
    if getattr(args, "helo", None):
        ehlo = {ip: args.helo for ip in ips}
    for ns in nameservers:
        try:
            parse_nameserver(ns)
        except ValueError as exc:
            print(f"check-domain: --nameserver {exc}", file=sys.stderr)
            return 2
    try:
        checks = check_domain(
            args.domain,
            ips,
            keys,
            nameservers,
            args.return_path_domain,
            args.dkim_domain,
            ehlo,
        )
    except DkimKeyError as exc:
        print(f"check-domain: {exc}", file=sys.stderr)
        return 2
    doc = report(args.domain, checks)
    if args.json:
        print(json.dumps(doc, indent=None))
    else:
        print(format_table(doc, shutil.get_terminal_size((100, 24)).columns))
    return 1 if any(c.status == FAIL for c in checks) else 0
