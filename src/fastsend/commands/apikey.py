"""``fastsend apikey``: create, list and revoke API keys of ``fastsend serve``.

    fastsend apikey create --tenant NAME [--note TEXT] -c fastsend.toml
    fastsend apikey list [--tenant NAME] [--json] -c fastsend.toml
    fastsend apikey revoke KEY_ID -c fastsend.toml
    fastsend apikey hash-password --tenant NAME      # a [submission.users] line

``create`` prints the new key once on stdout (only its SHA-256 is stored, in
``<spool>/apikeys.db``); nothing else ever prints a key. A running server
picks up revocations on SIGHUP (or at once for keys it has not seen yet).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import orjson

from fastsend.config import ConfigError, load
from fastsend.serve.auth import AuthError, KeyStore
from fastsend.spool import SpoolError, is_redis_url
from fastsend.sqlitedb import ReadOnlyDatabase


def add_arguments(p: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="config file (TOML): its [spool] dir holds the keys")
    common.add_argument("--spool", help="spool directory (instead of -c)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("create", parents=[common], help="create a key (printed once)")
    c.add_argument("--tenant", required=True, help="tenant the key may act for")
    c.add_argument("--note", default="", help="a free-text note (who, what for)")
    ls = sub.add_parser("list", parents=[common], help="list keys (ids and tenants, never keys)")
    ls.add_argument("--tenant", help="only this tenant's keys")
    ls.add_argument("--json", action="store_true", help="JSON lines")
    r = sub.add_parser("revoke", parents=[common], help="revoke a key by its id")
    r.add_argument("key_id", help="the id shown by list (the 8 characters after fs_)")
    h = sub.add_parser(
        "hash-password",
        help="hash an SMTP submission password for [submission.users] (asked for, or one"
        " line on stdin)",
    )
    h.add_argument(
        "--tenant", help='print the whole line for [submission.users]: TENANT = "HASH"'
    )


# A submission password is a shared secret typed into mail clients and apps: one this
# short falls to an online guesser within the AUTH failure limits' patience.
MIN_PASSWORD = 8


def _hash_password(args: argparse.Namespace) -> int:
    """``hash-password``: the value [submission.users] keeps for a password (PBKDF2;
    the password itself is never stored, printed or taken as an argument, where
    ``ps`` and the shell's history would show it)."""
    import getpass

    from fastsend.serve.listeners import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("fastsend apikey: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        print(f"fastsend apikey: a password needs at least {MIN_PASSWORD} characters",
              file=sys.stderr)  # fmt: skip
        return 2
    value = hash_password(password)
    print(f'{args.tenant} = "{value}"' if args.tenant else value)
    return 0


def _spool_dir(args: argparse.Namespace) -> str:
    if args.spool:
        return str(args.spool)
    if not args.config:
        raise ConfigError("give -c CONFIG or --spool DIR")
    return load(args.config).spool_dir


def _store(args: argparse.Namespace) -> Any:
    """The key store: the spool directory's, or the shared one of a Redis spool
    (``--spool redis://...`` or ``[spool] url``: every node sees the key)."""
    url = str(args.spool) if args.spool else (load(args.config).spool_url if args.config else "")
    if url and is_redis_url(url):
        from fastsend.serve.shared_state import RedisKeyStore, shared_store

        shared = shared_store(url, readonly=args.action == "list")  # (list: works on a replica)
        assert shared is not None
        return RedisKeyStore(shared.client, shared.prefix)
    where = _spool_dir(args)
    if args.action != "create" and not os.path.isdir(where):
        # `list`/`revoke` made the directory and an empty key store (a mistyped
        # --spool answered "no keys", exit 0, and left a spool-like directory);
        # `create` still makes it: keys may come before the first `serve`.
        raise ConfigError(f"{where}: not a directory (no spool there: `create` or `serve` makes one)")
    # list: a view (it works on a read-only spool and makes no store where there is none)
    return KeyStore.for_spool(where, readonly=args.action == "list")


def run(args: argparse.Namespace) -> int:
    if args.action == "hash-password":  # no store: a value for the config file
        return _hash_password(args)
    try:
        store = _store(args)
    except (ConfigError, ReadOnlyDatabase) as e:  # (a read-only spool: create, revoke)
        print(f"fastsend apikey: {e}", file=sys.stderr)
        return 2
    except SpoolError as e:  # a Redis spool out of reach or taking no writes (75), none (2)
        print(f"fastsend apikey: {e}", file=sys.stderr)  # (was a traceback, exit 1)
        return e.exit_status
    try:
        if args.action == "create":
            from fastsend.accept import name_problem

            if why := name_problem(args.note):  # (a line feed forged a line of `list`)
                print(f"fastsend apikey: --note: {why}", file=sys.stderr)
                return 2
            key, rec = store.create(args.tenant, args.note)
            print(key)
            print(
                f"fastsend apikey: created key {rec.id} for tenant {rec.tenant!r};"
                " it is shown only this once",
                file=sys.stderr,
            )
        elif args.action == "list":
            for k in store.list(args.tenant):
                if args.json:
                    sys.stdout.write(orjson.dumps(_as_dict(k)).decode())
                    sys.stdout.write("\n")
                else:
                    state = "revoked" if k.revoked else "active"
                    made = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created))
                    print(f"{k.id}\t{k.tenant}\t{state}\t{made}Z\t{k.note}")
        elif args.action == "revoke":
            if not store.revoke(args.key_id):
                print(f"fastsend apikey: no active key {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"fastsend apikey: revoked {args.key_id}", file=sys.stderr)
    except AuthError as e:
        print(f"fastsend apikey: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def _as_dict(k: object) -> dict[str, object]:
    return {s: getattr(k, s) for s in ("id", "tenant", "created", "revoked", "note")}
