"""fastsend's configuration: one TOML file (or CLI flags) -> typed settings.

Every section has defaults that work on one machine with no outside services.
Unknown keys and wrong types are errors naming the key, so a typo never
silently changes behaviour. This module only parses and validates; it does not
open sockets or files other than the config itself.

    [spool]      dir = "./spool"
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
    [shaping]    per-site limits, rules, dispatch rates (fastsend.shaping.policy/.supervise)
    [pools]      source-IP pools, weights, EHLO names, warm-up (fastsend.shaping.pools)
    [guardrails] campaign bounce/complaint thresholds (fastsend.shaping.guardrails)
    [tenants]    per-tenant From domains, DKIM keys, tracking base URL (fastsend.tenants)
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

# An EHLO name: a domain (letters, digits, hyphens, dots) or an address literal.
_HELO = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]"
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid (the message names it)."""


@dataclass
class Route:
    host: str
    port: int = 25

    @classmethod
    def parse(cls, text: str, *, where: str) -> Route:
        host, sep, port = text.strip().rpartition(":")
        if not sep:
            host, port = text.strip(), "25"
        host = host.strip("[]")
        if not host:
            raise ConfigError(f"{where}: route {text!r} has no host")
        try:
            p = int(port)
        except ValueError:
            raise ConfigError(f"{where}: route {text!r} has a bad port") from None
        if not 0 < p < 65536:
            raise ConfigError(f"{where}: route {text!r} port out of range")
        return cls(host, p)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class DeliveryConfig:
    batch_size: int = 200  # messages per ring record (supervisor -> worker)
    window: int = 4000  # claimed-but-unanswered messages per worker (active window)
    max_connections: int = 16  # per (source IP, site)
    max_messages_per_connection: int = 1000
    recipients_per_transaction: int = 50  # for identical (non-personalised) messages
    pipeline: int = 64  # messages written per pipelined group on one connection
    tls: str = "opportunistic"  # opportunistic / required / off
    idle_timeout: float = 5.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    # Per site, in a worker: envelopes held ready (0: no bound but the window),
    # and the seconds of a shaped site's rate worth holding; the rest goes back
    # to the supervisor (queued again, no attempt counted) so that one slow site
    # cannot fill the window (KumoMTA's max_ready, Postfix's per-destination limits).
    max_ready: int = 0
    ready_horizon: float = 10.0
    # MX answers that resolve to loopback/private/link-local/ULA addresses are refused
    # (fastsend.delivery.mx); static [routes] are not affected.
    allow_private_mx: bool = False
    # Check the suppression list again when mail is dispatched (one query per
    # claimed batch), not only when it is accepted. Off only to measure its cost.
    check_suppression: bool = True


@dataclass
class RetryConfig:
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_age: float = 5 * 86400.0
    jitter: float = 0.2


@dataclass
class DNSConfig:
    nameservers: list[str] = field(default_factory=list)  # empty: the system's resolv.conf
    timeout: float = 5.0
    mx_port: int = 25  # the SMTP port of MX hosts (25; tests point it at a sink's port)


@dataclass
class Config:
    spool_dir: str = "./spool"
    spool_url: str = ""  # [spool] url: a shared (Redis) spool; spool_dir stays the local dir
    workers: int = 0
    source_ips: list[str] = field(default_factory=list)
    helo: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    event_log: str = ""  # "" = DIR/events.jsonl of the spool
    raw: dict[str, Any] = field(default_factory=dict)  # the whole parsed file, for other areas
    # The installation secret (fastsend.msgid.load_secret), set by the supervisor
    # before it forks: message-id MACs, tracking links. Never from TOML, never logged.
    secret: bytes = field(default=b"", repr=False)
    base_dir: str = "."  # the config file's directory: relative paths in it start here
    shaping: Any = None  # fastsend.shaping.policy.Policy, parsed from [shaping]
    pools: Any = None  # fastsend.shaping.pools.PoolSet, parsed from [pools]
    tenants: Any = None  # fastsend.tenants.Tenants, parsed from [tenants] and [dkim]

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    @property
    def event_log_path(self) -> str:
        return self.event_log or os.path.join(self.spool_dir, "events.jsonl")

    def route_for(self, domain: str) -> Route | None:
        """The static route for ``domain`` (exact, then parent domains, then '*')."""
        d = domain.lower()
        while True:
            r = self.routes.get(d)
            if r is not None:
                return r
            if "." not in d:
                break
            d = d.split(".", 1)[1]
        return self.routes.get("*")

    def ips_for_worker(self, index: int) -> list[str]:
        """The source IPs owned by worker ``index`` (round-robin split of the pool)."""
        if not self.source_ips:
            return []
        n = self.worker_count
        mine = self.source_ips[index % n :: n] if len(self.source_ips) >= n else []
        return mine or [self.source_ips[index % len(self.source_ips)]]


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    v = raw.get(name, {})
    if not isinstance(v, dict):
        raise ConfigError(f"[{name}] must be a table")
    return v


def _fill(obj: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for k, v in values.items():
        f = known.get(k)
        if f is None:
            raise ConfigError(f"[{where}] unknown key {k!r} (known: {', '.join(sorted(known))})")
        cur = getattr(obj, k)
        if isinstance(cur, bool) or isinstance(v, bool):
            ok = isinstance(v, bool) and isinstance(cur, bool)
        elif isinstance(cur, float):
            ok = isinstance(v, int | float)
            v = float(v)
        elif isinstance(cur, int):
            ok = isinstance(v, int)
        else:
            ok = isinstance(v, type(cur))
        if not ok:
            raise ConfigError(f"[{where}] {k} must be {type(cur).__name__}, got {v!r}")
        if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"[{where}] {k} must not be negative")
        setattr(obj, k, v)


def validate_ip(text: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an IP address") from None


def from_dict(raw: dict[str, Any], *, base_dir: str = ".") -> Config:
    cfg = Config(raw=raw, base_dir=base_dir)
    known_sections = {"spool", "workers", "ips", "routes", "delivery", "retry", "dns", "events"}
    # Other areas (api, shaping, pools, tracking, webhooks, ...) read cfg.raw themselves.
    spool = _section(raw, "spool")
    if "dir" in spool:
        cfg.spool_dir = os.path.join(base_dir, str(spool["dir"]))
    if "url" in spool:
        # The shared spool of several nodes (docs/DEPLOY.md); [spool] dir, else the
        # URL's dir=, is this node's local directory (events, DKIM state, ...).
        from fastsend.spool import is_redis_url, spool_local_dir

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
    for dom, target in _section(raw, "routes").items():
        if not isinstance(target, str):
            raise ConfigError(f"[routes] {dom!r} must be 'HOST:PORT'")
        cfg.routes[dom.lower()] = Route.parse(target, where=f"[routes] {dom!r}")
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
    del known_sections
    _shaping(cfg, raw, base_dir)
    from fastsend.tenants import Tenants

    cfg.tenants = Tenants.from_config(cfg)
    return cfg


def _shaping(cfg: Config, raw: dict[str, Any], base_dir: str) -> None:
    """Parse [shaping], [pools] and [guardrails] (errors name the key); with
    [pools] and no [ips] source, the pools' addresses are the source IPs."""
    import time

    from fastsend.shaping.guardrails import GuardrailSettings
    from fastsend.shaping.policy import load_policy
    from fastsend.shaping.pools import load_pools
    from fastsend.shaping.supervise import dispatch_settings

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
