"""``fastsend check-config``: load a config file as ``send``/``serve`` would
and report what is wrong (as ``postfix check`` does for main.cf).

    fastsend check-config [-c] FILE [--strict] [--quiet]

Every section is decoded into its typed struct (fastsend.config) and the
checks that span sections run, including those of the sections only
``serve`` uses ([api], [webhooks], [submission], [intake], ...), so a typo
is found before anything starts. Errors name the file and the full key path
(``fastsend.toml: [submission] unknown key "listn"``) and exit 2; settings
that load but cannot take effect are warnings (exit 0, or 1 with
``--strict``). Nothing is opened but the config and the files it names
(shaping file, secrets, credentials).
"""

from __future__ import annotations

import argparse
import sys

from fastsend.config import ConfigError, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="the config file (TOML)")
    parser.add_argument("-c", "--config", help="the config file (same as FILE)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when it is fine")


def run(args: argparse.Namespace) -> int:
    path = args.config or args.file
    if not path:
        print("fastsend check-config: give the config file (FILE or -c FILE)", file=sys.stderr)
        return 2
    try:
        cfg = load(path)
    except ConfigError as e:
        print(f"fastsend check-config: error: {e}", file=sys.stderr)
        return 2
    for w in cfg.warnings:
        print(f"fastsend check-config: warning: {path}: {w}", file=sys.stderr)
    if not args.quiet:
        n = len(cfg.warnings)
        print(f"{path}: ok" + (f" ({n} warning{'s' if n != 1 else ''})" if n else ""))
    return 1 if args.strict and cfg.warnings else 0
