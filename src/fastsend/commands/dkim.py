"""``fastsend dkim keygen``: write a DKIM private key, print the DNS TXT record.

    fastsend dkim keygen --domain example.com --selector s2026 \\
        [--algorithm rsa|ed25519] [--bits 2048] [--out s2026.example.com.pem]

The key is written as unencrypted PKCS#8 PEM with mode 0600 (an existing file
is never overwritten unless --force). The record to publish is printed as a
zone-file line and, with --json, as a JSON object. It deliberately never
prints the private key.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fastsend.address import AddressError, normalize
from fastsend.message.keys import DkimKeyError, generate, public_txt, write_key

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = sub.add_parser("keygen", help="write a new DKIM key and print its DNS TXT record")
    k.add_argument("--domain", required=True, help="signing domain (d=)")
    k.add_argument("--selector", required=True, help="selector (s=)")
    k.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519"],
        default="rsa",
        help="rsa (rsa-sha256, every verifier) or ed25519 (RFC 8463: dual-sign it with an"
        " RSA key, as not every receiver checks it); default rsa",
    )
    k.add_argument("--bits", type=int, default=2048, help="RSA key size, 1024-4096 (default 2048)")
    k.add_argument("--out", help="key file (default SELECTOR.DOMAIN.pem)")
    k.add_argument("--force", action="store_true", help="overwrite an existing key file")
    k.add_argument("--json", action="store_true", help="print the record as JSON")


def txt_zone_line(name: str, value: str) -> str:
    """A zone-file TXT line, the value split into <= 255-octet strings."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
    return f"{name}. IN TXT ( " + " ".join(f'"{c}"' for c in chunks) + " )"


def run(args: argparse.Namespace) -> int:
    try:  # in A-labels (IDNA 2008 + UTS 46), as d= and the DNS name are written
        domain = normalize(f"x@{args.domain}")[1]
    except AddressError:
        domain = ""
    if not domain or domain.startswith("["):
        print(f"fastsend dkim keygen: bad domain {args.domain!r}", file=sys.stderr)
        return 2
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.\-_]*[A-Za-z0-9])?", args.selector):
        print(f"fastsend dkim keygen: bad selector {args.selector!r}", file=sys.stderr)
        return 2
    out = Path(args.out or f"{args.selector}.{domain}.pem")
    try:
        key = generate(args.algorithm, args.bits)
        # A key under a directory not made yet (--out keys/s1.example.com.pem, as the
        # example campaign names them): made, for this user only (the umask).
        out.parent.mkdir(parents=True, exist_ok=True)
        write_key(key, out, overwrite=args.force)
    except DkimKeyError as exc:
        print(f"fastsend dkim keygen: {exc}", file=sys.stderr)
        return 2
    except FileExistsError:  # (a usage error, nothing done: 2, as the README's exit status)
        print(f"fastsend dkim keygen: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    except OSError as exc:  # nothing written; a full disk: try again later (75), else 2
        from fastsend.spool.base import TEMPORARY_STORAGE, storage_problem

        print(f"fastsend dkim keygen: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return 75 if storage_problem(exc) in TEMPORARY_STORAGE else 2
    name = f"{args.selector}._domainkey.{domain}"
    value = public_txt(key)
    if args.json:
        print(json.dumps({"key_file": str(out), "name": name, "type": "TXT", "value": value}))
    else:
        print(f"; private key written to {out} (mode 0600)")
        print("; publish this record:")
        print(txt_zone_line(name, value))
    return 0
