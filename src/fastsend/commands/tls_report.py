"""``fastsend tls-report``: TLS-RPT aggregate reports (RFC 8460).

    fastsend tls-report show -c fastsend.toml [--day 2026-12-05]
    fastsend tls-report send -c fastsend.toml [--spool DIR] [--day 2026-12-05] [--json]

``show`` prints the JSON report of each policy domain for the day (default:
yesterday, UTC) from the node's counts (``SPOOL/tlsrpt.db``), sending
nothing. ``send`` sends every finished day's reports not sent yet (``--day``:
that day's, again) to each domain's ``_smtp._tls`` destinations: HTTPS POSTs
at once, mail spooled into the ``tls-reports`` campaign of the spool. The
command then delivers that mail itself (the spool's engine, as ``resume``:
whatever else is due in the spool goes too), for up to ``--max-wait``
seconds -- unless a live ``fastsend serve`` (or ``send``, ``resume``)
supervises the spool: that one delivers it, and the command says so (it
only spooled it before, and a spool nobody ran kept the reports forever).
``[tls] reports = "on"`` makes serve do this itself every day. Exit status 0,
1 when a report could go nowhere (or its mail bounced), 75 when report mail is
still deferred at the end (it stays queued: the next serve or resume retries
it) or a Redis spool is out of reach or takes no writes (try again later), 2
on bad arguments or config, or a spool that does not exist.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sqlite3
import sys
import time
from typing import Any

from fastsend.commands.common import EX_TEMPFAIL, die, redact_url


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("send", "show"), help="send the due reports, or show them")
    p.add_argument("-c", "--config", help="config file (TOML): [tls] report_from, DNS, spool")
    p.add_argument("--spool", help="spool directory (default ./spool or the config's)")
    p.add_argument("--day", help="the UTC day YYYY-MM-DD (show: default yesterday; send: again)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--max-wait",
        type=float,
        default=120.0,
        help="send: how long to keep trying to deliver the report mail when no fastsend"
        " process runs the spool (seconds, default 120)",
    )


def run(args: argparse.Namespace) -> int:
    import orjson

    from fastsend.analytics.tlsrpt import (
        REPORTS_CAMPAIGN,
        Sender,
        SendingElsewhere,
        Store,
        day_of,
        open_store,
        reports_campaign,
    )
    from fastsend.config import Config, ConfigError, load
    from fastsend.delivery.mx import MXResolver
    from fastsend.spool import SpoolError, is_redis_url, open_spool, spool_local_dir

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
    spool_url = cfg.spool_url or cfg.spool_dir
    if not cfg.spool_url:
        cfg.spool_dir = spool_local_dir(cfg.spool_dir)
    opened: list[Any] = []  # the spool, then its event log and acceptor
    try:  # (a mistyped --spool was a new empty directory: "no report due", exit 0)
        # (show: a view, which works on a read-only spool or a Redis replica)
        opened.append(open_spool(spool_url, must_exist=True, readonly=args.action == "show"))
    except SpoolError as e:  # (a Redis out of reach or taking no writes: 75, try later)
        return die(str(e), e.exit_status)
    # a shared spool: every node's counts, in it; else the node's tlsrpt.db
    try:
        store: Store = open_store(cfg, opened[0] if is_redis_url(spool_url) else None,
                                  readonly=args.action == "show")  # fmt: skip
    except sqlite3.Error as e:  # (send on a read-only spool: said, nothing written)
        opened[0].close()
        return die(f"cannot open the TLS-RPT counts: {e}")
    try:
        if args.action == "show":
            day = args.day or day_of(time.time() - 86400)
            domains = store.domains(day)
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
        campaign: list[int] = []

        def spool_mail(rows: list[tuple[str, str, bytes]]) -> None:
            if len(opened) < 3:
                from fastsend.accept import Acceptor
                from fastsend.events import EventLog

                events = EventLog(cfg.event_log_path)
                opened.extend([events, Acceptor(opened[0], events, None)])
            spool, _events, acceptor = opened
            cid = reports_campaign(acceptor, spool)
            campaign[:] = [cid]
            spooled.extend(acceptor.accept(cid, rows))

        sender = Sender(cfg, store, MXResolver(cfg), spool_mail)
        delivery: dict[str, Any] = {}
        try:
            out = asyncio.run(sender.run(today, only_day=args.day or ""))
            if spooled:
                delivery = _deliver(cfg, spool_url, opened[0], opened[1], campaign[0], args.max_wait)
        except SendingElsewhere as e:
            print(f"fastsend: {e}; try again later", file=sys.stderr)
            return EX_TEMPFAIL
    except opened[0].outage_errors() as e:  # Redis lost mid-way: said, not a traceback
        return die(f"the spool ({redact_url(spool_url)}) stopped answering: {e}", EX_TEMPFAIL)
    finally:
        store.close()
        if len(opened) > 1:
            opened[1].close()
        if opened:
            opened[0].close()
    nowhere = [o for o in out if not o["posted"] and not o["mailed"] and o["failed"]
               != ["no TLSRPTv1 record"]]  # fmt: skip
    if isinstance(delivery.get("exit"), int):
        return int(delivery["exit"])  # the spool's storage refused a write (said)
    mail = {k: delivery[k] for k in ("delivered", "deferred", "bounced", "by") if k in delivery}
    if args.json:
        doc = {"reports": out, "mail_spooled": len(spooled), "mail": mail}
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        for o in out:
            done = ", ".join(o["posted"] + [f"mailto:{m}" for m in o["mailed"]]) or "not sent"
            why = f" ({'; '.join(o['failed'])})" if o["failed"] else ""
            print(f"{o['day']} {o['domain']}: {done}{why}")
        if spooled:
            print(f"{len(spooled)} report message(s) spooled in campaign {REPORTS_CAMPAIGN!r}: "
                  + (f"{mail['by']} delivers them" if "by" in mail else
                     f"{mail.get('delivered', 0)} delivered, {mail.get('deferred', 0)} deferred,"
                     f" {mail.get('bounced', 0)} bounced"))  # fmt: skip
        if not out:
            print("no report due")
    if mail.get("deferred"):
        print(f"fastsend: {mail['deferred']} report message(s) still deferred: they stay in the"
              f" spool ({redact_url(spool_url)}), for fastsend serve or resume to retry",
              file=sys.stderr)  # fmt: skip
    if nowhere or mail.get("bounced"):
        return 1
    return EX_TEMPFAIL if mail.get("deferred") else 0


def _deliver(
    cfg: Any, spool_url: str, spool: Any, events: Any, campaign: int, max_wait: float
) -> dict[str, Any]:
    """Deliver the report mail just spooled: by this process's engine (as
    ``resume``) for up to ``max_wait`` s, unless a live process supervises
    the spool (``by``: that one delivers it). Its counts: delivered, deferred
    (still queued), bounced; ``exit``: the spool's storage refused a write."""
    from fastsend import engine
    from fastsend.commands.common import hold_source_ips, open_suppression, run_engine
    from fastsend.spool import SpoolBusy

    try:
        spool.hold_supervisor("fastsend tls-report")
        spool.hold_local_dir(cfg.spool_dir, "fastsend tls-report")
    except SpoolBusy as e:
        h = getattr(e, "holder", {})
        return {"by": f"the running {h.get('command') or 'fastsend'} (pid {h.get('pid', '?')})"}
    spool.recover()  # a dead supervisor's in-flight mail, as resume does
    ips = hold_source_ips(spool, cfg)  # a shared spool: this node's addresses
    if isinstance(ips, int):
        return {"exit": ips}
    suppression = open_suppression(spool_url, cfg.spool_dir)
    summary = run_engine(
        lambda: engine.run(
            cfg, spool, max_wait=max_wait, progress=False, campaign=campaign, events=events,
            suppression=suppression if spool.shared() is not None else None, cluster=ips,
        ),
        spool_url, _Kept(events), suppression,
    )  # fmt: skip
    if isinstance(summary, int):
        return {"exit": summary}
    return {k: int(summary.get(k) or 0) for k in ("delivered", "deferred", "bounced")}


class _Kept:
    """The event log for :func:`run_engine`, which closes it: the caller does."""

    def __init__(self, events: Any) -> None:
        self.events = events

    def close(self) -> None:
        self.events.flush()
