"""Traffic-shaping policy: which limits apply to a (source IP, site).

NAME
    fastsend.shaping.policy -- Limits, Policy, load_policy().

DESCRIPTION
    The rules are data: ``shaping.toml`` shipped next to this module, then an
    optional user file (``[shaping] file = "..."`` in the config), then the
    config's own ``[shaping]`` table, each layer overriding the one before key
    by key. Every layer has the same form::

        [default]                      # every site
        max_connections = 10
        [provider.google]              # sites whose MX names end in a suffix
        mx_suffixes = [".google.com"]; domains = ["gmail.com"]; tls = "required"
        [domain."example.org"]         # one recipient domain (and subdomains)
        messages_per_minute = 60
        [aimd] / [rest] / [[rule]]     # feedback settings (fastsend.shaping.feedback)

    :meth:`Policy.resolve` turns (MX host names, recipient domain) into one
    frozen :class:`Limits`: default <- provider (longest MX suffix match, else
    a provider listing the domain) <- domain override. Keys left unset fall
    back to the engine's ``[delivery]`` values (max_connections,
    max_messages_per_connection, tls), so an unknown site with no shaping
    configured runs exactly as the engine would without this module.

    Resolution happens once per (site, domain) when a worker first meets the
    site, never per message. Rates become compiled GCRA buckets
    (:mod:`fastsend.throttle`) in :mod:`fastsend.shaping.lanes`.

DELIBERATELY NOT HERE
    No clocks, no buckets, no sockets: this module only parses and answers
    "what are the limits". Unknown keys are errors naming the key, as in
    :mod:`fastsend.config`.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastsend.settings import Config, ConfigError
from fastsend.tables import read_toml

LIMIT_KEYS = frozenset(
    {
        "max_connections",
        "max_messages_per_connection",
        "messages_per_second",
        "messages_per_minute",
        "messages_per_hour",
        "burst",
        "connections_per_minute",
        "tls",
        "aimd",
    }
)
PROVIDER_KEYS = LIMIT_KEYS | {"mx_suffixes", "domains"}
TOP_KEYS = frozenset(
    {"default", "provider", "domain", "aimd", "rest", "rule", "file", "defaults", "dispatch"}
)
AIMD_KEYS = {"decrease": 0.5, "increase": 5.0, "defer_share": 0.2, "hold": 1.0, "min_rate": 0.5}
REST_KEYS = {"duration": 3600.0}
TLS_MODES = ("opportunistic", "required", "off")


@dataclass(frozen=True, slots=True)
class Limits:
    """The effective limits of one (source IP, site).

    ``rates`` holds (events per second, burst) pairs, one per configured
    messages_per_second/_minute/_hour; empty means no message rate limit.
    ``connection_rate`` is new connections per second (0: none), with a burst
    of one minute's worth (KumoMTA's "100 connections per minute").
    """

    max_connections: int
    max_messages_per_connection: int
    rates: tuple[tuple[float, int], ...] = ()
    connection_rate: float = 0.0
    tls: str = "opportunistic"
    aimd: bool = True
    provider: str = ""  # matched provider name ("" when none)

    @property
    def message_rate(self) -> float:
        """The tightest sustained messages/s (inf when unlimited)."""
        return min((r for r, _ in self.rates), default=math.inf)


@dataclass
class Provider:
    name: str
    mx_suffixes: tuple[str, ...]
    domains: frozenset[str]
    values: dict[str, Any]


@dataclass
class Policy:
    """Merged shaping data; :meth:`resolve` answers per site."""

    default: dict[str, Any] = field(default_factory=dict)
    providers: dict[str, Provider] = field(default_factory=dict)
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)
    aimd: dict[str, float] = field(default_factory=lambda: dict(AIMD_KEYS))
    rest: dict[str, float] = field(default_factory=lambda: dict(REST_KEYS))
    rules: list[dict[str, Any]] = field(default_factory=list)
    engine_connections: int = 16
    engine_messages_per_connection: int = 1000
    engine_tls: str = "opportunistic"

    # -- matching ------------------------------------------------------------

    def provider_for(self, hosts: tuple[str, ...] | list[str], domain: str = "") -> str:
        """The provider whose MX suffix matches a host (longest wins), else by domain."""
        best, best_len = "", 0
        for h in hosts:
            name = "." + h.lower().rstrip(".")
            for p in self.providers.values():
                for s in p.mx_suffixes:
                    if len(s) > best_len and name.endswith(s):
                        best, best_len = p.name, len(s)
        if best:
            return best
        d = domain.lower()
        for p in self.providers.values():
            if d in p.domains:
                return p.name
        return ""

    def _domain_values(self, domain: str) -> dict[str, Any]:
        d = domain.lower().rstrip(".")
        while d:
            v = self.domains.get(d)
            if v is not None:
                return v
            d = d.partition(".")[2]
        return {}

    def resolve(self, hosts: tuple[str, ...] | list[str], domain: str = "") -> Limits:
        """Effective limits for a site (its MX host names) reached for ``domain``."""
        provider = self.provider_for(hosts, domain)
        v: dict[str, Any] = dict(self.default)
        if provider:
            v.update(self.providers[provider].values)
        v.update(self._domain_values(domain))
        rates: list[tuple[float, int]] = []
        for key, per in (
            ("messages_per_second", 1.0),
            ("messages_per_minute", 60.0),
            ("messages_per_hour", 3600.0),
        ):
            n = float(v.get(key, 0) or 0)
            if n > 0:
                rate = n / per
                burst = int(v.get("burst", 0)) or max(1, round(rate))
                rates.append((rate, burst))
        cpm = float(v.get("connections_per_minute", 0) or 0)
        return Limits(
            max_connections=int(v.get("max_connections", self.engine_connections)),
            max_messages_per_connection=int(
                v.get("max_messages_per_connection", self.engine_messages_per_connection)
            ),
            rates=tuple(rates),
            connection_rate=cpm / 60.0,
            tls=str(v.get("tls", self.engine_tls)),
            aimd=bool(v.get("aimd", True)),
            provider=provider,
        )

    # -- building ------------------------------------------------------------

    def merge(self, data: dict[str, Any], where: str) -> None:
        """Overlay one layer (a parsed shaping file or the config's table)."""
        for k in data:
            if k not in TOP_KEYS:
                raise ConfigError(
                    f"{where}: unknown key {k!r} (known: {', '.join(sorted(TOP_KEYS))})"
                )
        self.default.update(_limits(data.get("default", {}), f"{where} [default]", LIMIT_KEYS))
        for name, pv in _table(data, "provider", where).items():
            vals = _limits(pv, f"{where} [provider.{name}]", PROVIDER_KEYS)
            old = self.providers.get(name)
            suffixes = vals.pop("mx_suffixes", None)
            doms = vals.pop("domains", None)
            if old is None:
                old = self.providers[name] = Provider(name, (), frozenset(), {})
            if suffixes is not None:
                old.mx_suffixes = tuple("." + s.lower().strip(".") for s in suffixes)
            if doms is not None:
                old.domains = frozenset(d.lower() for d in doms)
            old.values.update(vals)
        for dom, dv in _table(data, "domain", where).items():
            vals = _limits(dv, f'{where} [domain."{dom}"]', LIMIT_KEYS)
            self.domains.setdefault(dom.lower().rstrip("."), {}).update(vals)
        for sect, target in (("aimd", self.aimd), ("rest", self.rest)):
            for k, val in _table(data, sect, where).items():
                if k not in target:
                    raise ConfigError(f"{where} [{sect}]: unknown key {k!r}")
                if not isinstance(val, int | float) or isinstance(val, bool) or val < 0:
                    raise ConfigError(f"{where} [{sect}] {k} must be a non-negative number")
                target[k] = float(val)
        rules = data.get("rule", [])
        if not isinstance(rules, list):
            raise ConfigError(f"{where}: rule must be an array of tables ([[rule]])")
        from fastsend.shaping.feedback import parse_rule

        for i, r in enumerate(rules):
            rule = parse_rule(r, f"{where} rule #{i + 1}")
            self.rules = [x for x in self.rules if x["name"] != rule["name"]]  # same name replaces
            self.rules.append(rule)


def _table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    v = data.get(name, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return v


def _limits(values: Any, where: str, known: frozenset[str]) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table")
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in known:
            raise ConfigError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        if k == "tls":
            if v not in TLS_MODES:
                raise ConfigError(f"{where}: tls must be one of {', '.join(TLS_MODES)}")
        elif k == "aimd":
            if not isinstance(v, bool):
                raise ConfigError(f"{where}: aimd must be true or false")
        elif k in ("mx_suffixes", "domains"):
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise ConfigError(f"{where}: {k} must be a list of names")
        else:
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{where}: {k} must be a non-negative number")
            if k in ("max_connections", "max_messages_per_connection", "burst") and (
                not isinstance(v, int) or (v < 1 and k != "burst")
            ):
                raise ConfigError(f"{where}: {k} must be a positive integer")
        out[k] = v
    return out


def shipped() -> dict[str, Any]:
    """The shipped shaping.toml, parsed."""
    text = resources.files("fastsend.shaping").joinpath("shaping.toml").read_text()
    return tomllib.loads(text)


def load_file(path: str) -> dict[str, Any]:
    return read_toml(path, "shaping file")


def load_policy(config: Config | None = None) -> Policy:
    """Shipped defaults <- [shaping] file <- the config's [shaping] table.

    ``[shaping] defaults = false`` starts from nothing instead of the shipped file.
    """
    p = Policy()
    table: dict[str, Any] = {}
    if config is not None:
        d = config.delivery
        p.engine_connections = d.max_connections
        p.engine_messages_per_connection = d.max_messages_per_connection
        p.engine_tls = d.tls
        raw = config.raw.get("shaping", {})
        if not isinstance(raw, dict):
            raise ConfigError("[shaping] must be a table")
        table = dict(raw)
    use_shipped = table.pop("defaults", True)
    if not isinstance(use_shipped, bool):
        raise ConfigError("[shaping] defaults must be true or false")
    if use_shipped:
        p.merge(shipped(), "shaping.toml (shipped)")
    path = table.pop("file", None)
    if path is not None:
        if not isinstance(path, str):
            raise ConfigError("[shaping] file must be a path")
        p.merge(load_file(path), path)
    p.merge(table, "[shaping]")
    return p


def dispatch_settings(config: Config) -> dict[str, Any]:
    """The validated ``[shaping.dispatch]`` table (errors name the key)."""
    raw = config.raw.get("shaping", {}).get("dispatch", {})
    if not isinstance(raw, dict):
        raise ConfigError("[shaping.dispatch] must be a table")
    known = {"global_rate", "campaign_rate", "tenant_rate", "tenants"}
    for k, v in raw.items():
        if k not in known:
            raise ConfigError(
                f"[shaping.dispatch] unknown key {k!r} (known: {', '.join(sorted(known))})"
            )
        vals = v.values() if k == "tenants" and isinstance(v, dict) else [v]
        for x in vals:
            if not isinstance(x, int | float) or isinstance(x, bool) or x < 0:
                raise ConfigError(f"[shaping.dispatch] {k} must be non-negative rates")
    return raw
