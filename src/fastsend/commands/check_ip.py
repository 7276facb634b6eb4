"""``fastsend check-ip -c fastsend.toml [IP ...]``: source IPs against DNS blocklists.

Checks the given IPs (default: the node's source IPs, ``[ips] source`` and the
pools' addresses) against ``[reputation] blocklists`` (or ``--zone``, repeated)
through the config's ``[dns] nameservers`` (:mod:`fastsend.analytics.dnsbl`).
Prints one line per (IP, zone); ``--json`` prints them as JSON.

Exit status: 0 when no IP is listed, 1 when one is, 2 on bad input or when no
lookup could be answered.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress

import orjson

from fastsend.commands.common import die


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ips", nargs="*", help="IP addresses (default: the node's source IPs)")
    p.add_argument("-c", "--config", help="config file (TOML): blocklists, DNS, source IPs")
    p.add_argument("--zone", action="append", default=[], help="a blocklist zone (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from fastsend.analytics.dnsbl import (
        Blocklist,
        Reputation,
        ReputationSettings,
        make_resolver,
        node_ips,
    )
    from fastsend.config import Config, ConfigError, load

    try:
        cfg = load(args.config) if args.config else Config()
        settings = ReputationSettings.from_config(cfg)
    except ConfigError as e:
        return die(str(e))
    for z in args.zone:
        if not z.strip(".") or " " in z:
            return die(f"--zone {z!r} is not a DNS name")
        settings.blocklists.append(Blocklist(z.strip(".").lower()))
    if not settings.blocklists:
        return die("no blocklists: set [reputation] blocklists or give --zone")
    ips = args.ips or node_ips(cfg)
    if not ips:
        return die("no IPs: give some, or set [ips] source / [pools] in the config")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return die(f"{ip!r} is not an IP address")
    rep = Reputation(settings, make_resolver(cfg), lambda ev: None)
    results = asyncio.run(rep.check_ips(ips))
    if args.json:
        print(orjson.dumps([r.as_dict() for r in results]).decode())
    else:
        for r in results:
            state = "LISTED" if r.listed else ("error" if r.error else "ok")
            detail = ", ".join(r.codes) if r.listed else r.error
            text = f"  {r.text}" if r.text else ""
            print(f"{r.ip:<40} {r.zone:<32} {state:<7} {detail}{text}".rstrip())
    if any(r.listed for r in results):
        return 1
    return 2 if all(r.error for r in results) else 0
