"""``fastsend suppress``: manage the suppression list of a spool.

    fastsend suppress add ADDR... [--reason R] [--expires 30d] [--tenant T] --spool DIR
    fastsend suppress remove ADDR... [--tenant T] --spool DIR
    fastsend suppress list [--json] [--all-tenants] [--tenant T] --spool DIR
        (address, tenant, reason, source, added=UTC time, message=spool id that caused it)
    fastsend suppress import FILE [--reason R] [--expires 30d] [--tenant T] --spool DIR
    fastsend suppress export [--tenant T] [--all-tenants] --spool DIR

``--global`` (each action): the operator's global list, which suppresses for
every tenant (``fastsend.suppression.GLOBAL_TENANT``).

The list lives in ``<spool>/suppression.db``. Bad input (a malformed
address, a bad duration, an unreadable file) is reported on stderr with exit
status 2 and changes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from fastsend.commands.common import EX_TEMPFAIL, add_spool_arguments, spool_arg
from fastsend.suppression import (
    DEFAULT_TENANT,
    GLOBAL_TENANT,
    MANUAL,
    SOURCE_IMPORT,
    SOURCE_MANUAL,
    SuppressionError,
    SuppressionList,
    parse_duration,
)

DB_NAME = "suppression.db"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    # a directory, or a Redis spool URL (redis://...: the list every node shares)
    add_spool_arguments(common, default=None)
    common.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant (default: default)")
    common.add_argument(
        "--global", dest="global_", action="store_true",
        help="the global list: suppressed for every tenant",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = sub.add_parser("add", parents=[common], help="suppress addresses")
    a.add_argument("addresses", nargs="+", metavar="ADDR", help="addresses to suppress")
    a.add_argument("--reason", default=MANUAL, help="reason (default: manual)")
    a.add_argument("--expires", help="expire after a duration such as 30d, 12h, 90m")
    a.add_argument("--source", default=SOURCE_MANUAL, help="source (default: manual)")
    r = sub.add_parser("remove", parents=[common], help="stop suppressing addresses")
    r.add_argument("addresses", nargs="+", metavar="ADDR", help="addresses to send to again")
    ls = sub.add_parser("list", parents=[common], help="list suppressed addresses")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument("--all-tenants", action="store_true", help="every tenant's entries")
    ls.add_argument(
        "--include-expired", action="store_true", help="also entries whose --expires passed"
    )
    i = sub.add_parser("import", parents=[common], help="import CSV or one address per line")
    i.add_argument("file", help="file to import ('-' for stdin)")
    i.add_argument("--reason", default=MANUAL, help="reason for lines without one")
    i.add_argument("--expires", help="expiry for imported entries, such as 30d")
    e = sub.add_parser("export", parents=[common], help="export as CSV to stdout")
    e.add_argument("--all-tenants", action="store_true", help="every tenant's entries")
    y = sub.add_parser(
        "sync", parents=[common],
        help="add the addresses on a provider's own suppression lists (SES, SendGrid, Mailgun)",
    )  # fmt: skip
    y.add_argument(
        "transport", metavar="TRANSPORT",
        help="a [transports] name of the config (-c), or ses:REGION, sendgrid, mailgun[:REGION]",
    )  # fmt: skip
    y.add_argument("--dry-run", action="store_true", help="say what would be added; add nothing")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _fail(msg: str, code: int = 2) -> int:
    print(f"fastsend suppress: {msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from fastsend.config import ConfigError
    from fastsend.spool import SpoolError, is_redis_url

    try:
        args.spool = spool_arg(args)
    except ConfigError as e:
        return _fail(str(e))
    if args.global_:
        if args.tenant != DEFAULT_TENANT:
            return _fail("--global and --tenant: one or the other")
        args.tenant = GLOBAL_TENANT
    elif args.tenant != DEFAULT_TENANT:  # as the API keys name them ("a b" was taken)
        from fastsend.serve.auth import AuthError, check_tenant

        try:
            check_tenant(args.tenant)
        except AuthError as e:
            return _fail(f"--tenant: {e}")
    if is_redis_url(str(args.spool)):
        import redis

        from fastsend.serve.shared_state import RedisSuppressionList, shared_store

        try:
            # list, export: a view (it works against a replica, and writes nothing)
            store = shared_store(str(args.spool), readonly=args.action in ("list", "export"))
            assert store is not None
            shared = RedisSuppressionList(store.client, store.prefix)
            return _dispatch(shared, args)  # type: ignore[arg-type]
        except SpoolError as e:
            return _fail(str(e), e.exit_status)
        except SuppressionError as e:
            return _fail(str(e))
        except redis.RedisError as e:  # (down for now: try again later)
            return _fail(f"Redis: {e}", EX_TEMPFAIL)
    spool = Path(args.spool)
    if args.action in ("add", "import", "sync") and not spool.exists():
        # The people a new user brings along (unsubscribes, complaints) go in before the
        # first campaign is sent, which would make the spool: made here for them.
        spool.mkdir(parents=True)
    if not spool.is_dir():
        return _fail(f"{spool}: not a directory (no spool yet: `fastsend send` or `serve` makes one)")
    try:
        # list, export: a view (it works on a read-only spool, and writes nothing)
        with SuppressionList(spool / DB_NAME, readonly=args.action in ("list", "export")) as s:
            return _dispatch(s, args)
    except SuppressionError as e:
        return _fail(str(e))


def _dispatch(s: SuppressionList, args: argparse.Namespace) -> int:
    tenant = args.tenant
    whose = "every tenant (the global list)" if tenant == GLOBAL_TENANT else f"tenant {tenant}"
    if args.action == "add":
        exp = parse_duration(args.expires) if args.expires else None
        entries = s.add_many(
            args.addresses, args.reason, tenant=tenant, source=args.source, expires_in=exp
        )
        print(f"suppressed {len(entries)} address(es) for {whose}")
        return 0
    if args.action == "remove":
        missing = [a for a in args.addresses if not s.remove(a, tenant=tenant)]
        for a in missing:
            print(f"fastsend suppress: {a}: not in the list", file=sys.stderr)
        return 1 if missing else 0
    if args.action == "list":
        who = None if args.all_tenants else tenant
        out = sys.stdout
        for e in s.list(tenant=who, include_expired=args.include_expired):
            if args.json:
                out.write(orjson.dumps(e.to_dict()).decode() + "\n")
            else:
                fields = [
                    e.address,
                    e.tenant,
                    e.reason,
                    e.source or "-",
                    f"added={_iso(e.created)}",
                ]
                fields.append(f"message={e.message if e.message is not None else '-'}")
                if e.expires is not None:
                    fields.append(f"expires={_iso(e.expires)}")
                out.write("\t".join(fields) + "\n")
        return 0
    if args.action == "import":
        exp = parse_duration(args.expires) if args.expires else None
        if args.file == "-":
            n = s.import_text(
                sys.stdin.read(), tenant=tenant, reason=args.reason, expires_in=exp,
                source=SOURCE_IMPORT,
            )  # fmt: skip
        else:
            n = s.import_file(
                args.file, tenant=tenant, reason=args.reason, expires_in=exp, source=SOURCE_IMPORT
            )
        print(f"imported {n} address(es) for {whose}")
        return 0
    if args.action == "export":
        sys.stdout.write(s.export_csv(tenant=None if args.all_tenants else tenant))
        return 0
    if args.action == "sync":
        return _sync(s, args, whose)
    return _fail(f"unknown action {args.action!r}")


def _sync(s: SuppressionList, args: argparse.Namespace, whose: str) -> int:
    """``suppress sync TRANSPORT``: the provider's lists read whole
    (fastsend.transports.suppressions), then the addresses not yet suppressed
    for the tenant added in one transaction (source ``sync-NAME``). A provider
    that cannot be read: exit 75 (EX_TEMPFAIL), nothing added."""
    import asyncio
    import os

    from fastsend.config import ConfigError, load
    from fastsend.config.transports import shorthand
    from fastsend.transports.suppressions import SyncError, fetch

    spec = None
    try:
        if args.config:
            spec = load(args.config).transports.get(args.transport)
        if spec is None:
            base = os.path.dirname(os.path.abspath(args.config)) if args.config else os.getcwd()
            spec = shorthand(args.transport, base)
    except ConfigError as e:
        return _fail(str(e))
    if spec is None:
        return _fail(
            f"{args.transport}: no such transport (a [transports] name of -c CONFIG, or"
            " ses:REGION, sendgrid, mailgun[:REGION])"
        )

    async def read() -> Any:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await fetch(spec, session)

    try:
        listed = asyncio.run(read())
    except SyncError as e:
        return _fail(f"sync: {e}", EX_TEMPFAIL)
    have = s.contains_many(listed.reasons, tenant=args.tenant)
    new = [(a, r) for a, r in listed.reasons.items() if a not in have]
    counts = ", ".join(f"{k} {n}" for k, n in sorted(listed.counts.items())) or "none"
    if not args.dry_run and new:
        s.add_entries((args.tenant, a, r, f"sync-{spec.name}", None) for a, r in new)
    verb = "would add" if args.dry_run else "added"
    print(
        f"{spec.label}: {len(listed.reasons)} address(es) listed ({counts}); {verb} {len(new)} "
        f"for {whose}, {len(listed.reasons) - len(new)} already suppressed"
    )
    return 0
