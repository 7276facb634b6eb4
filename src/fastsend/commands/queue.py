"""``fastsend queue --spool DIR``: the queue's shape, like Postfix's qshape.

Counts of pending and in-flight messages per destination domain and age bucket
(minutes since spooled), plus totals per state and per campaign, and each
recipient list still being accepted ("spooling: 38,000 of 50,000 rows"). Reads
the spool read-only, so it is safe while ``send``/``serve`` runs.
"""

from __future__ import annotations

import argparse
import time

import orjson

from fastsend.commands.common import add_spool_arguments, die, spool_arg
from fastsend.config import ConfigError
from fastsend.spool import AGE_BUCKETS_MIN, SpoolError, open_spool


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spool_arguments(p)
    p.add_argument("--top", type=int, default=20, help="domains to show (default 20)")
    p.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    if args.top < 0:  # (-1 showed no domain, said nothing)
        return die(f"--top {args.top}: a count of domains, 0 or more")
    try:
        spool = open_spool(spool_arg(args), readonly=True)
    except SpoolError as e:
        return die(str(e), e.exit_status)
    except ConfigError as e:
        return die(str(e))
    now = time.time()
    shape = spool.queue_shape(now)
    counts = spool.counts()
    campaigns = [
        {"id": c.id, "name": c.name, "status": c.status, "reason": c.reason,
         **spool.counts(c.id)}
        for c in spool.list_campaigns()
    ]
    ingests = [
        {
            "job": j.id,
            "campaign": j.campaign,
            "path": j.source.get("path", ""),
            "origin": j.source.get("origin", "file"),
            "read": j.accepted + j.rejected + j.duplicates,
            "rows": j.total,
            "accepted": j.accepted,
            "rejected": j.rejected,
            "duplicates": j.duplicates,
        }
        for j in spool.list_ingests(unfinished=True)
    ]
    spool.close()
    labels = [f"{m}m" for m in AGE_BUCKETS_MIN] + [f"{AGE_BUCKETS_MIN[-1]}m+"]
    if args.json:
        out = {
            "states": counts,
            "buckets": labels,
            "domains": {d: b for d, b in shape},
            "campaigns": campaigns,
            "spooling": ingests,
        }
        print(orjson.dumps(out).decode())
        return 0
    print("states: " + "  ".join(f"{k} {v}" for k, v in counts.items() if v))
    for j in ingests:
        print(
            f"spooling: {j['read']:,} of {j['rows']:,} rows"
            f" (campaign {j['campaign']}, {j['path']}; "
            + (
                "uploaded through the API: `fastsend serve` continues it at start"
                if j["origin"] == "api"
                else "`fastsend resume` continues it"
            )
            + ")"
        )
    head = f"{'':30s} {'T':>7s} " + " ".join(f"{x:>6s}" for x in labels)
    print(head)
    total = [0] * (len(labels))
    for _d, b in shape:
        total = [a + c for a, c in zip(total, b, strict=True)]
    print(f"{'TOTAL':30s} {sum(total):7d} " + " ".join(f"{x:6d}" for x in total))
    for d, b in shape[: args.top]:
        print(f"{d[:30]:30s} {sum(b):7d} " + " ".join(f"{x:6d}" for x in b))
    if campaigns:
        print()
        for c in campaigns:
            rest = "  ".join(
                f"{k} {c[k]}"
                for k in ("queued", "inflight", "deferred", "delivered", "bounced", "expired")
                if c[k]
            )
            print(f"campaign {c['id']} {c['name']!r} [{c['status']}]  {rest}")
            if c["reason"]:
                print(f"  {c['status']}: {c['reason']}")
    return 0
