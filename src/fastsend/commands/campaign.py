"""``fastsend campaign list|pause|resume|cancel [ID] --spool DIR``: campaign status.

``list`` prints each campaign's id, status, name, tenant and message counts
per state (``list ID``: that campaign's only). ``pause`` stops new claims of a campaign's messages (what is in
flight finishes), ``resume`` makes a paused campaign active again (e.g. after
a guardrail paused it: ``list`` prints why under the campaign, as the
``campaign_paused`` event said), ``cancel`` stops it for good (its pending messages stay in the
spool, never claimed again). A running ``send``/``serve`` sees the change at
its next claim; after ``resume`` with no engine running, ``fastsend resume
--spool DIR`` delivers the rest.

It only changes the campaign's status in the spool: it never sends mail.
"""

from __future__ import annotations

import argparse

import orjson

from fastsend.commands.common import add_spool_arguments, die, spool_arg
from fastsend.config import ConfigError
from fastsend.spool import SpoolError, open_spool

STATUS = {"pause": "paused", "resume": "active", "cancel": "cancelled"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["list", "pause", "resume", "cancel"],
        help="list every campaign (or campaign ID), or pause / resume / cancel campaign ID",
    )
    p.add_argument("id", nargs="?", type=int, help="campaign id (list: only that one)")
    add_spool_arguments(p)
    p.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        args.spool = spool_arg(args)
        spool = open_spool(args.spool, readonly=args.action == "list", must_exist=True)
    except SpoolError as e:
        return die(str(e), e.exit_status)
    except ConfigError as e:
        return die(str(e))
    try:
        if args.action == "list":
            rows = [
                {
                    "id": c.id,
                    "name": c.name,
                    "tenant": c.tenant,
                    "status": c.status,
                    **({"reason": c.reason} if c.reason else {}),
                    **{k: v for k, v in spool.counts(c.id).items() if v},
                }
                for c in spool.list_campaigns()
                if args.id is None or c.id == args.id
            ]
            if args.id is not None and not rows:  # (an ID was silently ignored)
                return die(f"no campaign {args.id} in {args.spool!r}")
            if args.json:
                print(orjson.dumps(rows).decode())
            else:
                for r in rows:
                    counts = "  ".join(
                        f"{k} {v}"
                        for k, v in r.items()
                        if k not in ("id", "name", "tenant", "status", "reason")
                    )
                    print(f"{r['id']:>6}  {r['status']:<9}  {str(r['name'])[:30]:<30}  {counts}")
                    if r.get("reason"):
                        print(f"        {r['status']}: {r['reason']}")
            return 0
        if args.id is None:
            return die(f"campaign {args.action}: give a campaign ID")
        info = spool.get_campaign(args.id)
        if info is None:
            return die(f"no campaign {args.id} in {args.spool!r}")
        new = STATUS[args.action]
        if info.status in ("cancelled", "abandoned") and new != "cancelled":
            # (abandoned: its creating request failed; its mail already ended cancelled)
            return die(f"campaign {args.id} is {info.status}; it cannot be {new} again")
        spool.set_campaign_status(args.id, new)
        out = {"id": args.id, "status": new, "was": info.status}
        print(
            orjson.dumps(out).decode()
            if args.json
            else f"campaign {args.id}: {info.status} -> {new}"
        )
        return 0
    finally:
        spool.close()
