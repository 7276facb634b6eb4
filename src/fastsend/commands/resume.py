"""``fastsend resume --spool DIR``: deliver what a spool still holds.

After a crash or a stop: every in-flight message goes back to the queue, and
everything queued or deferred is delivered with the same engine, progress and
summary as ``send``.
"""

from __future__ import annotations

import argparse
import os

from fastsend import engine
from fastsend.commands.common import add_engine_arguments, build_config, die, print_summary
from fastsend.config import ConfigError
from fastsend.spool.sqlite import SQLiteSpool


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
    except ConfigError as e:
        return die(str(e))
    if not os.path.exists(os.path.join(cfg.spool_dir, "spool.db")):
        return die(f"no spool at {cfg.spool_dir!r}")
    spool = SQLiteSpool(cfg.spool_dir)
    recovered = spool.recover()
    counts = spool.counts()
    total = counts["queued"] + counts["deferred"]
    summary = engine.run(
        cfg, spool, max_wait=args.max_wait, total=total, progress=not args.no_progress
    )
    summary["recovered_inflight"] = recovered
    summary["spool"] = cfg.spool_dir
    print_summary(summary, args.json)
    spool.close()
    return 0
