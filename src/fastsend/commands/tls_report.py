"""``fastsend tls-report``: TLS-RPT aggregate reports (RFC 8460).

    fastsend tls-report show -c fastsend.toml [--day 2026-12-05]
    fastsend tls-report send -c fastsend.toml [--spool DIR] [--day 2026-12-05] [--json]

``show`` prints the JSON report of each policy domain for the day (default:
yesterday, UTC) from the node's counts (``SPOOL/tlsrpt.db``), sending
nothing. ``send`` sends every finished day's reports not sent yet (``--day``:
that day's, again) to each domain's ``_smtp._tls`` destinations: HTTPS POSTs
at once, mail spooled into the ``tls-reports`` campaign of the spool, which
the running ``fastsend serve`` delivers (or ``fastsend resume --spool DIR``).
``[tls] reports = "on"`` makes serve do this itself every day. Exit status 0,
1 when a report could go nowhere, 2 on bad arguments or config.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import time
from typing import Any

from fastsend.commands.common import die


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("send", "show"), help="send the due reports, or show them")
    p.add_argument("-c", "--config", help="config file (TOML): [tls] report_from, DNS, spool")
    p.add_argument("--spool", help="spool directory (default ./spool or the config's)")
    p.add_argument("--day", help="the UTC day YYYY-MM-DD (show: default yesterday; send: again)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    import orjson

    from fastsend.analytics.tlsrpt import REPORTS_CAMPAIGN, Sender, Store, day_of, reports_campaign
    from fastsend.config import Config, ConfigError, load
    from fastsend.delivery.mx import MXResolver

    try:
        cfg = load(args.config) if args.config else Config()
    except ConfigError as e:
        return die(str(e))
    if args.spool:
        cfg.spool_dir = args.spool
    if args.day:
        try:
            datetime.datetime.strptime(args.day, "%Y-%m-%d")
        except ValueError:
            return die(f"--day {args.day!r}: expected YYYY-MM-DD")
    today = day_of(time.time())
    store = Store(cfg.spool_dir)
    try:
        if args.action == "show":
            day = args.day or day_of(time.time() - 86400)
            domains = [d for (d,) in store.db.execute(
                "SELECT DISTINCT domain FROM sessions WHERE day = ? ORDER BY domain", (day,))]  # fmt: skip
            org = cfg.tls.report_organization or cfg.tls.report_from.rpartition("@")[2]
            docs = [
                store.report(day, d, organization=org, contact=cfg.tls.report_contact
                             or cfg.tls.report_from, report_id=f"{day}_{d}")
                for d in domains
            ]  # fmt: skip
            sys.stdout.write(orjson.dumps(docs, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        if not cfg.tls.report_from:
            return die('[tls] report_from is needed to send reports (e.g. "tls-reports@example.com")')
        spooled: list[int] = []
        opened: list[Any] = []

        def spool_mail(rows: list[tuple[str, str, bytes]]) -> None:
            if not opened:
                from fastsend.accept import Acceptor
                from fastsend.events import EventLog
                from fastsend.spool import open_spool

                spool = open_spool(cfg.spool_url or cfg.spool_dir)
                events = EventLog(cfg.event_log_path)
                opened.extend([spool, events, Acceptor(spool, events, None)])
            spool, _events, acceptor = opened
            spooled.extend(acceptor.accept(reports_campaign(acceptor, spool), rows))

        sender = Sender(cfg, store, MXResolver(cfg), spool_mail)
        try:
            out = asyncio.run(sender.run(today, only_day=args.day or ""))
        finally:
            if opened:
                opened[1].close()
                opened[0].close()
    finally:
        store.close()
    nowhere = [o for o in out if not o["posted"] and not o["mailed"] and o["failed"]
               != ["no TLSRPTv1 record"]]  # fmt: skip
    if args.json:
        sys.stdout.write(orjson.dumps({"reports": out, "mail_spooled": len(spooled)}).decode() + "\n")
    else:
        for o in out:
            done = ", ".join(o["posted"] + [f"mailto:{m}" for m in o["mailed"]]) or "not sent"
            why = f" ({'; '.join(o['failed'])})" if o["failed"] else ""
            print(f"{o['day']} {o['domain']}: {done}{why}")
        if spooled:
            print(f"{len(spooled)} report message(s) spooled in campaign {REPORTS_CAMPAIGN!r}:"
                  " fastsend serve delivers them, or run fastsend resume --spool "
                  f"{cfg.spool_url or cfg.spool_dir}")  # fmt: skip
        if not out:
            print("no report due")
    return 1 if nowhere else 0
