"""``fastsend send CAMPAIGN.toml --recipients FILE``: spool a campaign and deliver it.

Validates everything before the first message leaves: the campaign (template,
variables against the recipient columns, DKIM for the From domain unless
--no-dkim), and every recipient row (bad rows are reported with their line
number; with --strict nothing is sent if any row is bad). Good rows are spooled
(durable) in chunks, suppressed addresses are recorded as suppressed, then the
engine delivers until every recipient is final or deferred past --max-wait.
Exit status: 0 when all went as far as it can, 1 when bad rows were skipped, 2
on unusable input.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from fastsend import engine, recipients
from fastsend.commands.common import add_engine_arguments, build_config, die, print_summary
from fastsend.config import ConfigError
from fastsend.spool import QUEUED, SUPPRESSED, open_spool, spool_local_dir
from fastsend.spool.sqlite import SpoolError

CHUNK = 2000  # rows per spool transaction while delivery runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("campaign", help="campaign file (TOML)")
    p.add_argument("--recipients", "-r", required=True, help="CSV (header row) or JSON lines")
    p.add_argument("--strict", action="store_true", help="send nothing if any row is bad")
    p.add_argument("--no-dkim", action="store_true", help="allow a From domain without DKIM")
    p.add_argument("--name", default="", help="campaign name (default: the file name)")
    add_engine_arguments(p)


def _load_suppression(spool_dir: str) -> Any:
    try:
        from fastsend.suppression import SuppressionList
    except ImportError:
        return None
    path = os.path.join(spool_dir, "suppression.db")
    return SuppressionList(path) if os.path.exists(path) else None


def run(args: argparse.Namespace) -> int:
    from fastsend.message import Campaign, CampaignError

    try:
        cfg = build_config(args)
    except ConfigError as e:
        return die(str(e))
    # A directory (SQLite) or a redis:// URL; events, suppression and the secret
    # live in the local directory (a Redis URL's dir= parameter).
    spool_url, cfg.spool_dir = cfg.spool_dir, spool_local_dir(cfg.spool_dir)
    try:
        camp = Campaign.load(args.campaign)
    except FileNotFoundError:
        return die(f"campaign file {args.campaign!r} not found")
    except CampaignError as e:
        return die(f"{args.campaign}: {e}")
    if not args.no_dkim:
        dkim_for = getattr(camp, "dkim_for", None)
        if dkim_for is not None and not dkim_for(camp.from_domain):
            return die(
                f"{args.campaign}: no DKIM key configured for the From domain"
                f" {camp.from_domain!r}; add a [dkim] table or pass --no-dkim"
            )
    spec = camp.to_dict()
    # The spec crosses a worker's ring in one record: say so now, not per recipient.
    from fastsend.queue import supervisor, wire

    size = len(wire.encoder.encode(wire.CampaignSpec(0, spec)))
    if size > supervisor.RING_BYTES - 64:
        return die(
            f"{args.campaign}: the campaign is {size} bytes with its files inlined;"
            f" at most {supervisor.RING_BYTES - 64} bytes"
        )
    try:
        cols = recipients.columns(args.recipients)
        camp.check_columns(cols | {"email"})
    except recipients.RecipientsError as e:
        return die(str(e))
    except CampaignError as e:
        return die(f"{args.campaign}: {e}")

    bad: list[recipients.BadRow] = []
    try:
        if args.strict:
            for row in recipients.read(args.recipients):
                if isinstance(row, recipients.BadRow):
                    bad.append(row)
            if bad:
                for b in bad[:50]:
                    print(f"fastsend: {args.recipients}: {b}", file=sys.stderr)
                return die(f"{len(bad)} bad recipient row(s); nothing was sent (--strict)", 1)
        spool = open_spool(spool_url)
        cid = spool.create_campaign(spec, name=args.name or os.path.basename(args.campaign))
        suppression = _load_suppression(cfg.spool_dir)
        rows = recipients.read(args.recipients)
        count = [0]  # good rows spooled so far

        def spool_chunk(chunk: list[tuple[str, str, bytes]]) -> None:
            now = time.time()
            if suppression is not None:
                hits = set(suppression.contains_many([r[0] for r in chunk]))
                keep = [r for r in chunk if r[0] not in hits]
                gone = [r for r in chunk if r[0] in hits]
                spool.add_messages(cid, keep, now, state=QUEUED)
                spool.add_messages(cid, gone, now, state=SUPPRESSED)
            else:
                spool.add_messages(cid, chunk, now)
            count[0] += len(chunk)

        def read_chunk() -> bool:
            """Spool the next CHUNK good rows (durable); False at the end of the list."""
            chunk: list[tuple[str, str, bytes]] = []
            for row in rows:
                if isinstance(row, recipients.BadRow):
                    bad.append(row)
                    print(f"fastsend: {args.recipients}: {row} (skipped)", file=sys.stderr)
                    continue
                chunk.append((row[1], row[2], row[3]))
                if len(chunk) >= CHUNK:
                    spool_chunk(chunk)
                    return True
            if chunk:
                spool_chunk(chunk)
            return False

        # The first chunk before the engine starts (file errors surface here);
        # the rest is spooled while the first is already being delivered.
        more = read_chunk()

        def feeder() -> Iterator[None]:
            while read_chunk():
                yield None

    except (recipients.RecipientsError, SpoolError) as e:
        return die(str(e))
    summary = engine.run(
        cfg,
        spool,
        max_wait=args.max_wait,
        total=count[0],
        progress=not args.no_progress,
        campaign=cid,
        feeder=feeder() if more else None,
        total_fn=lambda: count[0],
    )
    if summary.get("feed_error"):
        print(
            f"fastsend: reading {args.recipients} stopped: {summary['feed_error']};"
            f" {count[0]} recipient(s) were spooled",
            file=sys.stderr,
        )
    summary["spool"] = spool_url
    summary["rejected_rows"] = len(bad)
    print_summary(summary, args.json)
    spool.close()
    if bad:
        print(f"fastsend: {len(bad)} bad recipient row(s) were skipped", file=sys.stderr)
        return 1
    return 0
