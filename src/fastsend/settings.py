"""fastsend's settings as typed values: :class:`Config` and its sections, the
errors naming a bad key, and the small validators the sections share.

A value module (the bottom layer): every area reads its settings from a
:class:`Config`; the loader that fills one from a TOML file and validates
every area's sections is :mod:`fastsend.config`, one layer up, so the areas
that declare settings (shaping) never import the loader.
"""

from __future__ import annotations

import ipaddress
import os
import re
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
    """A static SMTP route (host, port), or -- with ``transports`` -- the names
    of transports in failover order (fastsend.transports.spec)."""

    host: str
    port: int = 25
    transports: tuple[str, ...] = ()

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
        return ", ".join(self.transports) if self.transports else f"{self.host}:{self.port}"


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
    # [transports.NAME] and route shorthands (fastsend.transports.spec.TransportSpec);
    # they hold credentials read from the environment or a 0600 file: never logged.
    transports: dict[str, Any] = field(default_factory=dict, repr=False)
    # Settings that load but cannot take effect as written (the loader explains
    # each; the front ends print them): never silence.
    warnings: list[str] = field(default_factory=list)

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    @property
    def event_log_path(self) -> str:
        return self.event_log or os.path.join(self.spool_dir, "events.jsonl")

    def route_lookup(
        self,
        domain: str,
        campaign: tuple[int, tuple[str, ...], str] | None = None,
        pool: str = "",
    ) -> Route | None:
        """The route of a message: ``campaign:ID`` or ``campaign:NAME``, then
        ``tenant:NAME``, then ``pool:NAME``, then the domain's (``campaign`` is
        (id, names, tenant): its spool name and the name in its spec)."""
        routes = self.routes
        if campaign is not None:
            cid, names, tenant = campaign
            keys = [f"campaign:{cid}", *(f"campaign:{n}" for n in names if n)]
            if tenant:
                keys.append(f"tenant:{tenant}")
            for key in keys:
                if key in routes:
                    return routes[key]
        if pool and f"pool:{pool}" in routes:
            return routes[f"pool:{pool}"]
        return self.route_for(domain)

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
