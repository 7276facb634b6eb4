"""fastsend's configuration: one TOML file (or CLI flags) -> typed settings.

The loader: :func:`load` / :func:`from_dict` build a :class:`Config` (the
typed values live in :mod:`fastsend.settings`, re-exported here) and validate
every section at load, the areas' own included (shaping, pools, guardrails).
Every section has defaults that work on one machine with no outside services.
Unknown keys and wrong types are errors naming the key, so a typo never
silently changes behaviour. This module only parses and validates; it does not
open sockets or files other than the config itself.

    [spool]      dir = "./spool"; url = "redis://HOST:PORT/DB?prefix=&node=" (shared)
    [workers]    count = 0                      # 0: one per CPU core
    [ips]        source = ["127.0.0.2", "127.0.0.3"]; helo = "mta.example.com"
    [routes]     "*" = "127.0.0.1:2525"         # static routes bypass MX
                 "example.org" = "relay.example.net:587"
    [delivery]   batch_size, window, max_connections, max_messages_per_connection,
                 recipients_per_transaction, pipeline, tls, idle_timeout, connect_timeout,
                 max_ready, ready_horizon, allow_private_mx
    [retry]      min_backoff = 300, max_backoff = 4000, max_age = 432000, jitter = 0.2
    [dns]        nameservers = ["127.0.0.1:53"], timeout = 5
    [events]     log = "events.jsonl"
    [shaping]    per-site limits, rules, dispatch rates (fastsend.shaping.policy)
    [pools]      source-IP pools, weights, EHLO names, warm-up (fastsend.shaping.pools)
    [guardrails] campaign bounce/complaint thresholds (fastsend.shaping.guardrails)
    [tenants]    per-tenant From domains, DKIM keys, tracking base URL (fastsend.tenants)
"""

from __future__ import annotations

import os
import time
import tomllib
from typing import Any

from fastsend.settings import (
    _HELO,
    Config,
    ConfigError,
    DeliveryConfig,
    DNSConfig,
    RetryConfig,
    Route,
    _fill,
    _section,
    validate_ip,
)
from fastsend.shaping.guardrails import GuardrailSettings
from fastsend.shaping.policy import dispatch_settings, load_policy
from fastsend.shaping.pools import load_pools
from fastsend.spool import is_redis_url, spool_local_dir
from fastsend.tenants import Tenants

__all__ = [
    "_HELO",
    "Config",
    "ConfigError",
    "DNSConfig",
    "DeliveryConfig",
    "RetryConfig",
    "Route",
    "from_dict",
    "load",
    "validate_ip",
]


SECTIONS = frozenset(
    {
        # parsed here
        "spool", "workers", "ips", "routes", "delivery", "retry", "dns", "events",
        "shaping", "pools", "guardrails", "tenants", "dkim",
        # read by fastsend serve's parts from cfg.raw
        "api", "webhooks", "submission", "intake", "dashboard", "tracking", "analytics",
        "reputation", "proxy", "transports", "provider_events",
    }
)  # fmt: skip
"""Every top-level table a config may have: any other name is an error."""


def from_dict(raw: dict[str, Any], *, base_dir: str = ".") -> Config:
    cfg = Config(raw=raw, base_dir=base_dir)
    unknown = sorted(set(raw) - SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(sorted(SECTIONS))})")
    # The areas' own sections (api, webhooks, submission, ...) are read by
    # their areas from cfg.raw; shaping, pools, guardrails and tenants here.
    spool = _section(raw, "spool")
    if "dir" in spool:
        cfg.spool_dir = os.path.join(base_dir, str(spool["dir"]))
    if "url" in spool:
        # The shared spool of several nodes (docs/DEPLOY.md); [spool] dir, else the
        # URL's dir=, is this node's local directory (events, DKIM state, ...).
        url = str(spool["url"])
        if not is_redis_url(url):
            raise ConfigError(f"[spool] url must be redis://, rediss:// or unix://, not {url!r}")
        cfg.spool_url = url
        if "dir" not in spool:
            cfg.spool_dir = os.path.join(base_dir, spool_local_dir(url))
    workers = _section(raw, "workers")
    if "count" in workers:
        if not isinstance(workers["count"], int) or workers["count"] < 0:
            raise ConfigError("[workers] count must be a non-negative integer")
        cfg.workers = workers["count"]
    ips = _section(raw, "ips")
    cfg.source_ips = [validate_ip(ip, "[ips] source") for ip in ips.get("source", [])]
    cfg.helo = str(ips.get("helo", ""))
    if cfg.helo and not _HELO.fullmatch(cfg.helo):
        raise ConfigError(f"[ips] helo {cfg.helo!r} is not a host name or address literal")
    from fastsend.transports.spec import TransportError, parse_route, parse_transports

    try:
        cfg.transports = parse_transports(raw, base_dir)
        for dom, target in _section(raw, "routes").items():
            where = f"[routes] {dom!r}"
            chain = parse_route(target, cfg.transports, base_dir, where)
            key = dom if dom.split(":", 1)[0] in ("campaign", "tenant", "pool") else dom.lower()
            if chain is None:
                cfg.routes[key] = Route.parse(target, where=where)
            else:
                cfg.routes[key] = Route("", 0, chain)
    except TransportError as e:
        raise ConfigError(str(e)) from None
    _fill(cfg.delivery, _section(raw, "delivery"), "delivery")
    if cfg.delivery.tls not in ("opportunistic", "required", "off"):
        raise ConfigError("[delivery] tls must be opportunistic, required or off")
    for k in ("batch_size", "window", "max_connections", "pipeline", "recipients_per_transaction"):
        if getattr(cfg.delivery, k) < 1:
            raise ConfigError(f"[delivery] {k} must be at least 1")
    if cfg.delivery.max_ready < 0 or not cfg.delivery.ready_horizon > 0:
        raise ConfigError("[delivery] max_ready must be >= 0 and ready_horizon > 0")
    _fill(cfg.retry, _section(raw, "retry"), "retry")
    _fill(cfg.dns, _section(raw, "dns"), "dns")
    events = _section(raw, "events")
    if "log" in events:
        cfg.event_log = os.path.join(base_dir, str(events["log"]))
    _shaping(cfg, raw, base_dir)
    cfg.tenants = Tenants.from_config(cfg)
    _check_routes_vs_shaping(cfg, raw)
    return cfg


def _check_routes_vs_shaping(cfg: Config, raw: dict[str, Any]) -> None:
    """A static route carries all its domains to one site, whose limits are the
    default or ``[shaping.domain."ROUTE-HOST"]``: a domain entry for a routed
    domain would be ignored, so say so."""
    shaping = raw.get("shaping")
    domains = shaping.get("domain", {}) if isinstance(shaping, dict) else {}
    if not isinstance(domains, dict):
        return
    for dom in domains:
        route = cfg.route_for(dom)
        if route is not None and dom.lower().rstrip(".") != route.host.lower():
            cfg.warnings.append(
                f'[shaping.domain."{dom}"] does not apply: mail to {dom} goes through'
                f" the static route {route}, whose site takes the [shaping] default"
                f' limits or [shaping.domain."{route.host}"]'
            )


def _shaping(cfg: Config, raw: dict[str, Any], base_dir: str) -> None:
    """Parse [shaping], [pools] and [guardrails] (errors name the key); with
    [pools] and no [ips] source, the pools' addresses are the source IPs."""
    shaping = raw.get("shaping")
    if isinstance(shaping, dict) and isinstance(shaping.get("file"), str):
        shaping["file"] = os.path.join(base_dir, shaping["file"])
    cfg.shaping = load_policy(cfg)
    if "pools" in raw:
        cfg.pools = load_pools(cfg, time.time())
        if not cfg.source_ips:
            cfg.source_ips = cfg.pools.all_ips()
    GuardrailSettings.from_config(cfg)
    dispatch_settings(cfg)


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return from_dict(raw, base_dir=os.path.dirname(os.path.abspath(path)))
