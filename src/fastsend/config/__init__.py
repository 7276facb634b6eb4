"""fastsend's configuration: one TOML file (or CLI flags) -> a typed :class:`Config`.

Each area's settings are a msgspec struct (a :class:`~fastsend.config.base.Section`:
every key typed, unknown keys refused), declared in this package by area:

    engine.py     [spool] [workers] [ips] [routes] [delivery] [retry] [dns] [events]
    shaping.py    [shaping] (default, provider.NAME, domain."D", aimd, rest, [[rule]],
                  dispatch, file), [pools], [guardrails]
    tenants.py    [tenants.NAME], [dkim]
    transports.py [transports.NAME] and route values (credentials from env / 0600 files)
    serve.py      [api] [webhooks] [submission] (+ users) [intake] [proxy] [dashboard]
                  [tracking] [provider_events]
    analytics.py  [analytics] [reputation] (blocklists, feeds, alarms, warmup)
    loader.py     load() / from_dict(): every section decoded and checked at load

A value layer: it imports no area; the areas read their typed section from a
:class:`Config` (``cfg.api``, ``cfg.shaping``, ...). ``fastsend check-config``
loads a file and reports what is wrong, naming the key.
"""

from fastsend.config.base import HELO, ConfigError, parse_nameserver, validate_helo, validate_ip
from fastsend.config.engine import DeliveryConfig, DNSConfig, RetryConfig, Route
from fastsend.config.loader import (
    SECTIONS,
    Config,
    ConfigFile,
    from_dict,
    load,
    load_config,
    never_matches,
    route_key,
)

_HELO = HELO  # the name the CLI used

__all__ = [
    "HELO",
    "SECTIONS",
    "Config",
    "ConfigError",
    "ConfigFile",
    "DNSConfig",
    "DeliveryConfig",
    "RetryConfig",
    "Route",
    "from_dict",
    "load",
    "load_config",
    "never_matches",
    "parse_nameserver",
    "route_key",
    "validate_helo",
    "validate_ip",
]
