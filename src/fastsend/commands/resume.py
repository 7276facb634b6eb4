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
from fastsend.spool import is_redis_url, open_spool, spool_local_dir
from fastsend.spool.sqlite import SpoolError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
    except ConfigError as e:
        return die(str(e))
    spool_url, cfg.spool_dir = cfg.spool_dir, spool_local_dir(cfg.spool_dir)
    if not is_redis_url(spool_url) and not os.path.exists(os.path.join(cfg.spool_dir, "spool.db")):
        return die(f"no spool at {cfg.spool_dir!r}")
    try:
        spool = open_spool(spool_url)
    except SpoolError as e:
        return die(str(e))
    recovered = spool.recover()
    counts = spool.counts()
    total = counts["queued"] + counts["deferred"]
    summary = engine.run(
        cfg, spool, max_wait=args.max_wait, total=total, progress=not args.no_progress
    )
    summary["recovered_inflight"] = recovered
    summary["spool"] = spool_url
    print_summary(summary, args.json)
    spool.close()
    return 0
