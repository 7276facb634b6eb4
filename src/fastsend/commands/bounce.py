"""``fastsend bounce classify FILE...``: one JSON line per reported recipient.

Each line has: file, recipient, status (or null), reply_code (or null),
reason, hard, feedback_type (or null), plus action, diagnostic,
original_message_id, verp_id, remote_mta, rate_limited, ip_blocked.
``-`` reads one message from stdin. ``--rules FILE`` (repeatable) adds rule
files that take precedence over the shipped ones. Records of recipients that
were delivered are left out unless ``--include-delivered``.

An unreadable file, or one that is not a bounce (no failure report or
complaint found in it: an auto-reply, ordinary mail), is reported on stderr
("FILE: not a bounce") and the others are still processed; the exit status is
then 1. A report of delivered recipients only prints nothing but a note on
stderr (status 0). A bad rule file stops before any work (status 2).
"""

from __future__ import annotations

import argparse
import sys

import orjson

from fastsend.bounce.parse import parse_bounce
from fastsend.bounce.reply import RuleError, load_rules


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("classify", help="parse bounce/complaint messages and classify them")
    c.add_argument("files", nargs="+", metavar="FILE", help="message files ('-' for stdin)")
    c.add_argument(
        "--rules",
        action="append",
        default=[],
        metavar="FILE",
        help="extra rule file (TOML, same format as the shipped rules); repeatable",
    )
    c.add_argument(
        "--include-delivered", action="store_true", help="also print delivered recipients"
    )


def run(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(args.rules)
    except RuleError as e:
        print(f"fastsend bounce: {e}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    rc = 0
    for name in args.files:
        try:
            if name == "-":
                raw = sys.stdin.buffer.read()
            else:
                with open(name, "rb") as f:
                    raw = f.read()
        except OSError as e:
            print(f"fastsend bounce: {name}: cannot read: {e.strerror or e}", file=sys.stderr)
            rc = 1
            continue
        records = parse_bounce(raw, rules=rules)
        if not records:
            # Said, not left as an empty output a script cannot tell from a
            # bounce whose lines were lost: an auto-reply, a newsletter, a
            # message with no failure report in it.
            print(
                f"fastsend bounce: {name}: not a bounce (no delivery failure or complaint in it)",
                file=sys.stderr,
            )
            rc = 1
            continue
        shown = 0
        for rec in records:
            if rec.reason == "delivered" and not args.include_delivered:
                continue
            d = {"file": name, **rec.to_dict()}
            out.write(orjson.dumps(d) + b"\n")
            shown += 1
        if not shown:
            print(
                f"fastsend bounce: {name}: a delivery report of delivered recipients only"
                " (--include-delivered shows them)",
                file=sys.stderr,
            )
    out.flush()
    return rc
