"""``fastsend check-config``: load a config file as ``send``/``serve`` would
and report what is wrong (as ``postfix check`` does for main.cf).

    fastsend check-config [-c] FILE [--strict] [--quiet]

Every section is decoded into its typed struct (fastsend.config) and the
checks that span sections run, including those of the sections only
``serve`` uses ([api], [webhooks], [submission], [intake], ...), so a typo
is found before anything starts; every [dkim] key (the config's and the
tenants') is loaded: one that cannot be read or is no key is an error. Errors name the file and the full key path
(``fastsend.toml: [submission] unknown key "listn"``) and exit 2; settings
that load but cannot take effect are warnings (exit 0, or 1 with
``--strict``). Nothing is opened but the config and the files it names
(shaping file, secrets, credentials).
"""

from __future__ import annotations

import argparse
import sys

from fastsend.config import Config, ConfigError, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="the config file (TOML)")
    parser.add_argument("-c", "--config", help="the config file (same as FILE)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when it is fine")


def tls_line(cfg: Config) -> str:
    """What delivery by MX does about the recipient domains' TLS policies."""
    t = cfg.tls
    line = f"[tls] MTA-STS {t.mta_sts}"
    if t.mta_sts == "on":
        line += " (each recipient domain's policy honoured: enforce defers rather than send in clear)"
    for want in ("off", "on"):
        names = sorted(d for d, v in t.domains.items() if v == want and v != t.mta_sts)
        if names:
            line += f"; {want} for {', '.join(names)}"
    routed = sorted(d for d, r in cfg.routes.items() if r.host and d != "*")
    if "*" in cfg.routes and cfg.routes["*"].host:
        line += "; no policy applies: every domain has a static route"
    elif routed:
        line += f"; static routes, no policy: {', '.join(routed[:5])}" + (", ..." if len(routed) > 5 else "")
    line += "; trust store: " + (t.ca_file or "the system's")
    if t.dane == "on":
        ns = ", ".join(cfg.dns.nameservers) or "the system's resolv.conf"
        line += f"\n[tls] DANE on (TLSA records the resolver authenticates decide; resolver: {ns})"
    else:
        line += "\n[tls] DANE off"
    if t.reports == "on":
        line += f"\n[tls] TLS-RPT reports on: sent daily from {t.report_from}"
    else:
        line += "\n[tls] TLS-RPT reports off (`fastsend tls-report send` sends them on demand)"
    counting = t.mta_sts == "on" or "on" in t.domains.values() or t.dane == "on"
    if counting and t.report_from:
        line += (
            "; sessions to domains without a policy counted too when they publish a"
            " _smtp._tls record (one more TXT lookup per domain, beside its MX)"
        )
    elif not counting:
        line += "; no session is counted (MTA-STS and DANE both off)"
    return line


def size_line(cfg: Config) -> str:
    """The largest message taken and sent ([delivery] max_message_size)."""
    limit = cfg.delivery.max_message_size
    if not limit:
        return "[delivery] max_message_size 0: no limit (a message is refused only by the receiver's SIZE)"
    line = (
        f"[delivery] max_message_size {limit:,} octets ({limit / (1 << 20):.1f} MiB): a row or"
        " message that would be larger is refused when accepted, one found larger as it is"
        " made fails 552 5.3.4"
    )
    sub = cfg.submission
    if sub.listen and sub.max_size > limit:
        line += f"; [submission] offers SIZE {limit:,} (its max_size {sub.max_size:,} is larger)"
    return line


def tenants_line(cfg: Config) -> str:
    """How the tenants share the delivery claims, when some are weighted."""
    tw = cfg.tenant_weights
    shares = ", ".join(f"{n} {w}" for n, w in sorted(tw.items()))
    rest = len(cfg.tenant_names) - len(tw)
    return (
        f"[tenants] claim weights: {shares}"
        + (f"; the other {rest} tenant(s) and the operator 1" if rest else "; the operator 1")
        + " (a tenant with mail due gets its weight's part of each claim)"
    )


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
    from fastsend.delivery.signing import ConfigDKIM

    keys = ConfigDKIM(cfg).problems()  # a key that cannot sign defers all its mail
    for p in keys:
        print(f"fastsend check-config: error: {path}: {p}", file=sys.stderr)
    if keys:
        return 2
    for w in cfg.warnings:
        print(f"fastsend check-config: warning: {path}: {w}", file=sys.stderr)
    if not args.quiet:
        n = len(cfg.warnings)
        print(f"{path}: ok" + (f" ({n} warning{'s' if n != 1 else ''})" if n else ""))
        print(tls_line(cfg))
        print(size_line(cfg))
        if cfg.tenant_weights:
            print(tenants_line(cfg))
    return 1 if args.strict and cfg.warnings else 0
