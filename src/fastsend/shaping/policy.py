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
        [domain."example.org"]         # one recipient domain (and subdomains):
        messages_per_minute = 60       # a queue and lanes of its own, even when
                                       # other domains share its MX hosts
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
    No clocks, no buckets, no sockets, no parsing: the layers arrive typed
    (:class:`fastsend.config.shaping.ShapingFile`, checked when the config
    loaded); this module merges them and answers "what are the limits".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import msgspec

from fastsend.config import Config
from fastsend.config.base import set_fields
from fastsend.config.shaping import ShapingFile, shipped_shaping
from fastsend.config.tenants import norm_domain

AIMD_KEYS = {"decrease": 0.5, "increase": 5.0, "defer_share": 0.2, "hold": 1.0, "min_rate": 0.5}
REST_KEYS = {"duration": 3600.0}
TLS_MODES = ("opportunistic", "required", "off")


class Limits(msgspec.Struct, frozen=True):
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
    # max_connections of the address over every worker sending from it, when
    # split_limits gave each worker a part of it (0: not split)
    address_connections: int = 0

    @property
    def message_rate(self) -> float:
        """The tightest sustained messages/s (inf when unlimited)."""
        return min((r for r, _ in self.rates), default=math.inf)


class Provider(msgspec.Struct):
    name: str
    mx_suffixes: tuple[str, ...]
    domains: frozenset[str]
    values: dict[str, Any]


class Policy(msgspec.Struct, dict=True):
    """Merged shaping data; :meth:`resolve` answers per site. (``dict``: the
    MX suffix look-up it builds at its first use after a merge, never encoded
    nor compared: ``_mx_index``.)"""

    default: dict[str, Any] = msgspec.field(default_factory=dict)
    providers: dict[str, Provider] = msgspec.field(default_factory=dict)
    domains: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    aimd: dict[str, float] = msgspec.field(default_factory=lambda: dict(AIMD_KEYS))
    rest: dict[str, float] = msgspec.field(default_factory=lambda: dict(REST_KEYS))
    rules: list[dict[str, Any]] = msgspec.field(default_factory=list)
    engine_connections: int = 16
    engine_messages_per_connection: int = 1000
    engine_tls: str = "opportunistic"

    # -- matching ------------------------------------------------------------

    def provider_for(self, hosts: tuple[str, ...] | list[str], domain: str = "") -> str:
        """The provider whose MX suffix matches a host (longest wins), else by domain."""
        best = self.provider_by_mx(hosts)
        if best:
            return best
        d = domain.lower().rstrip(".")
        for p in self.providers.values():
            if d in p.domains:
                return p.name
        return ""

    def provider_by_mx(self, hosts: tuple[str, ...] | list[str]) -> str:
        """The provider whose MX suffix matches a host (longest wins; of one
        suffix listed twice, the first provider; of hosts matching alike, the
        first host), or "". Each of the host's dot-suffixes looked up, longest
        first (``_mx_index``), where every call had tried every provider's
        every suffix (~10 us a call; the rollups ask once per recipient
        domain, the workers once per site: a list over 30,000 domains spent
        ~0.3 s of the supervisor's CPU here). :func:`py_provider_by_mx` is the
        reference."""
        if not hosts:
            return ""
        index = self.__dict__.get("_mx")
        if index is None:
            index = self.__dict__["_mx"] = _mx_index(self.providers.values())
        dotted, other = index
        best, best_len = "", 0
        for h in hosts:
            name = "." + h.lower().rstrip(".")
            i = 0  # (name[0] is a dot: every dotted suffix matches from a dot)
            while i >= 0 and len(name) - i > best_len:
                found = dotted.get(name[i:])
                if found is not None:
                    best, best_len = found, len(name) - i
                    break
                i = name.find(".", i + 1)
            for s, pname in other:  # (suffixes not starting with a dot: none shipped)
                if len(s) > best_len and name.endswith(s):
                    best, best_len = pname, len(s)
        return best

    def domain_values(self, domain: str) -> dict[str, Any]:
        """The ``[shaping.domain]`` values of ``domain`` (or its parent's), {} for none."""
        return self._domain_values(domain)

    def _domain_values(self, domain: str) -> dict[str, Any]:
        entry = self.domain_entry(domain)
        return self.domains[entry] if entry else {}

    def domain_entry(self, domain: str) -> str:
        """The ``[shaping.domain]`` entry that applies to ``domain`` (its own or
        its nearest parent's name), "" for none."""
        d = domain.lower().rstrip(".")
        while d:
            if d in self.domains:
                return d
            d = d.partition(".")[2]
        return ""

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

    def merge(self, layer: ShapingFile) -> None:
        """Overlay one layer (the shipped file, the user's file, the config's table)."""
        self.__dict__.pop("_mx", None)  # (the MX suffixes may change)
        self.default.update(set_fields(layer.default))
        for name, pv in layer.provider.items():
            vals = set_fields(pv)
            old = self.providers.get(name)
            suffixes = vals.pop("mx_suffixes", None)
            doms = vals.pop("domains", None)
            if old is None:
                old = self.providers[name] = Provider(name, (), frozenset(), {})
            # Names in lower-case A-labels, as MX hosts and recipients' domains are
            # (a Unicode key was only lower-cased: it never matched)
            if suffixes is not None:
                old.mx_suffixes = tuple("." + norm_domain(s.strip(".")) for s in suffixes)
            if doms is not None:
                old.domains = frozenset(norm_domain(d) for d in doms)
            old.values.update(vals)
        for dom, dv in layer.domain.items():
            self.domains.setdefault(norm_domain(dom), {}).update(set_fields(dv))
        self.aimd.update(set_fields(layer.aimd))
        self.rest.update(set_fields(layer.rest))
        for r in layer.rule:
            rule = set_fields(r)
            self.rules = [x for x in self.rules if x["name"] != rule["name"]]  # same name replaces
            self.rules.append(rule)


def _mx_index(
    providers: Iterable[Provider],
) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """``Policy.provider_by_mx``'s look-up of the providers' MX suffixes, in
    order: each suffix starting with a dot -> the first provider listing it,
    and the others as (suffix, provider) in order (the merge writes every
    suffix with its dot). Made at the first look-up after a merge
    (:meth:`Policy.merge` drops it)."""
    dotted: dict[str, str] = {}
    other: list[tuple[str, str]] = []
    for p in providers:
        for s in p.mx_suffixes:
            if s.startswith("."):
                dotted.setdefault(s, p.name)
            else:
                other.append((s, p.name))
    return dotted, tuple(other)


def py_provider_by_mx(policy: Policy, hosts: tuple[str, ...] | list[str]) -> str:
    """The reference of :meth:`Policy.provider_by_mx` (tests compare them):
    every provider's every suffix tried against every host."""
    best, best_len = "", 0
    for h in hosts:
        name = "." + h.lower().rstrip(".")
        for p in policy.providers.values():
            for s in p.mx_suffixes:
                if len(s) > best_len and name.endswith(s):
                    best, best_len = p.name, len(s)
    return best


shipped = shipped_shaping  # the shipped shaping.toml, typed (read once)


def load_policy(config: Config | None = None) -> Policy:
    """Shipped defaults <- [shaping] file <- the config's [shaping] table.

    ``[shaping] defaults = false`` starts from nothing instead of the shipped file.
    """
    p = Policy()
    if config is None:
        p.merge(shipped())
        return p
    d = config.delivery
    p.engine_connections = d.max_connections
    p.engine_messages_per_connection = d.max_messages_per_connection
    p.engine_tls = d.tls
    if config.shaping.defaults:
        p.merge(shipped())
    if config.shaping_file is not None:
        p.merge(config.shaping_file)
    p.merge(config.shaping)
    return p
