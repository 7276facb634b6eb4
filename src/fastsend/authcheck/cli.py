"""``fastsend check-domain DOMAIN``: judge MX, SPF, DKIM, DMARC and PTR for a sender.

    fastsend check-domain example.com --ip 192.0.2.10 \\
        --selector s2026 --key keys/s2026.pem [--nameserver 127.0.0.1:5353] [--json]

Prints a pass/warn/fail table and the records to add. Exit status: 0 when
nothing fails, 1 when a check fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from fastsend.authcheck import FAIL, check_domain
from fastsend.message.keys import DkimKeyError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="the sending (From) domain")
    p.add_argument("--ip", action="append", default=[], help="a sending IP (repeatable)")
    p.add_argument("--selector", action="append", default=[], help="DKIM selector (repeatable)")
    p.add_argument("--key", action="append", default=[], help="private key for each --selector")
    p.add_argument("--return-path-domain", help="envelope sender domain (default: DOMAIN)")
    p.add_argument("--nameserver", action="append", default=[], help="HOST[:PORT] to ask")
    p.add_argument("--json", action="store_true", help="print JSON")


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
    try:
        checks = check_domain(
            args.domain,
            args.ip,
            list(zip(args.selector, args.key, strict=True)),
            args.nameserver,
            args.return_path_domain,
        )
    except DkimKeyError as exc:
        print(f"check-domain: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"domain": args.domain, "checks": [c.as_dict() for c in checks]}))
    else:
        for c in checks:
            print(f"{c.status.upper():5s} {c.name:18s} {c.detail}")
        fixes = [c.fix for c in checks if c.fix and c.status != "pass"]
        if fixes:
            print("\nrecords to add or change:")
            for f in fixes:
                print(f"  {f}")
    return 1 if any(c.status == FAIL for c in checks) else 0
