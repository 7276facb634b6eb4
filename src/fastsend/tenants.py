"""Tenants of ``fastsend serve``: their sending domains, DKIM keys and tracking base URL.

CONFIG
    [tenants.acme]
    domains = ["acme.example", "mail.acme.example"]   # required, non-empty
    tracking_base_url = "https://t.acme.example"       # optional
    [[tenants.acme.dkim]]                              # optional: the tenant's own keys
    domain = "acme.example"; selector = "s1"; key = "keys/acme.pem"

DESCRIPTION
    A tenant (the owner of API keys and submission users) may put in From only
    an address at one of its ``domains`` or a subdomain of one; the HTTP API
    answers 403 naming the domain, SMTP submission 550 5.7.1, and the worker
    fails such a message rather than sign it (a config change after it was
    accepted). DKIM keys are chosen by (tenant, From domain): the tenant's own
    ``dkim`` entries whose domain aligns (relaxed) with the From domain, then
    the config's top-level ``[dkim]`` entries whose domain is one of the
    tenant's ``domains`` (an operator key for a parent domain the tenant does
    not own never signs its mail).

    Without a ``[tenants]`` table the server runs single-tenant: every key may
    use any From domain and the config's ``[dkim]`` signs by From domain alone
    (``fastsend serve`` warns at start). The CLI's own campaigns (tenant
    ``default``) are the operator's and are not restricted.

    This module only parses and answers questions; it opens no files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from fastsend.settings import Config, ConfigError

__all__ = ["Tenant", "TenantDomainError", "Tenants", "domain_of"]

_DOMAIN = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}")
_KEYS = {"domains", "dkim", "tracking_base_url"}
_DKIM_KEYS = {"domain", "selector", "key", "canonicalization", "headers"}
OPERATOR = "default"  # fastsend.suppression.DEFAULT_TENANT: CLI campaigns


class TenantDomainError(ValueError):
    """The From domain is not one of the tenant's (``domain`` names it)."""

    def __init__(self, tenant: str, domain: str) -> None:
        super().__init__(f"domain {domain!r} is not one of tenant {tenant!r}'s sending domains")
        self.tenant = tenant
        self.domain = domain


@dataclass(frozen=True)
class Tenant:
    name: str
    domains: tuple[str, ...]
    dkim: tuple[dict[str, Any], ...] = ()
    tracking_base_url: str = ""


def _norm(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def _under(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def domain_of(address: str) -> str:
    """The lower-case domain of an address (IDNA-encoded when it is not ASCII)."""
    d = _norm(address.rpartition("@")[2])
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return d


@dataclass
class Tenants:
    by_name: dict[str, Tenant] = field(default_factory=dict)
    configured: bool = False
    global_dkim: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> Tenants:
        raw = cfg.raw
        out = cls(global_dkim=tuple(_global_dkim(raw, cfg.base_dir)))
        t = raw.get("tenants")
        if t is None:
            return out
        if not isinstance(t, dict):
            raise ConfigError("[tenants] must be a table of [tenants.NAME] tables")
        out.configured = True
        for name, spec in t.items():
            where = f"[tenants.{name}]"
            if not isinstance(spec, dict):
                raise ConfigError(f"{where} must be a table")
            if name.lower() == OPERATOR:
                raise ConfigError(f"{where}: the tenant name {OPERATOR!r} is the operator's")
            bad = set(spec) - _KEYS
            if bad:
                raise ConfigError(f"{where} unknown keys: {', '.join(sorted(bad))}")
            doms = spec.get("domains")
            if not isinstance(doms, list) or not doms:
                raise ConfigError(
                    f'{where} needs domains = ["..."]: the From domains it may send as'
                )
            domains = []
            for d in doms:
                if not isinstance(d, str) or not _DOMAIN.fullmatch(_norm(d)):
                    raise ConfigError(f"{where} domains: {d!r} is not a domain name")
                domains.append(_norm(d))
            dk = spec.get("dkim", [])
            items = [dk] if isinstance(dk, dict) else dk
            if not isinstance(items, list):
                raise ConfigError(f"{where} dkim must be a table or a list of tables")
            keys = []
            for e in items:
                e = _dkim_entry(e, f"{where} dkim", cfg.base_dir)
                if not any(_under(e["domain"], d) for d in domains):
                    raise ConfigError(
                        f"{where} dkim domain {e['domain']!r} is not under the tenant's domains"
                    )
                keys.append(e)
            base = spec.get("tracking_base_url", "")
            if not isinstance(base, str) or (
                base and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(?:/[!-~]*)?", base)
            ):
                raise ConfigError(f"{where} tracking_base_url must be an http(s) URL")
            out.by_name[name] = Tenant(name, tuple(domains), tuple(keys), base)
        return out

    def get(self, tenant: str) -> Tenant | None:
        return self.by_name.get(tenant)

    def allows(self, tenant: str, domain: str) -> bool:
        """Whether ``tenant`` may send From ``domain``."""
        if not self.configured or tenant == OPERATOR:
            return True
        t = self.by_name.get(tenant)
        d = _norm(domain)
        return t is not None and bool(d) and any(_under(d, x) for x in t.domains)

    def check_from(self, tenant: str, domain: str) -> None:
        """TenantDomainError unless ``tenant`` may send From ``domain``."""
        if not self.allows(tenant, domain):
            raise TenantDomainError(tenant, _norm(domain))

    def dkim_for(self, tenant: str | None, domain: str) -> list[dict[str, Any]]:
        """The DKIM settings that sign mail From ``domain`` sent by ``tenant``."""
        d = _norm(domain)
        if not d:
            return []
        aligned = [e for e in self.global_dkim if _under(d, e["domain"])]
        if not self.configured or tenant in (None, "", OPERATOR):
            return [dict(e) for e in aligned]
        t = self.by_name.get(tenant)
        if t is None or not self.allows(tenant, d):
            return []
        own = [dict(e) for e in t.dkim if _under(d, e["domain"])]
        return own + [dict(e) for e in aligned if e["domain"] in t.domains]

    def tracking_base_url(self, tenant: str) -> str:
        t = self.by_name.get(tenant)
        return t.tracking_base_url if t is not None else ""


def _dkim_entry(e: Any, where: str, base_dir: str) -> dict[str, Any]:
    if not isinstance(e, dict) or not {"domain", "selector", "key"} <= set(e):
        raise ConfigError(f"{where} entries need domain, selector and key")
    bad = set(e) - _DKIM_KEYS
    if bad:
        raise ConfigError(f"{where} unknown keys: {', '.join(sorted(bad))}")
    e = dict(e)
    e["domain"] = _norm(str(e["domain"]))
    e["key"] = os.path.join(base_dir, str(e["key"]))
    return e


def _global_dkim(raw: dict[str, Any], base_dir: str) -> list[dict[str, Any]]:
    dk = raw.get("dkim", [])
    items = [dk] if isinstance(dk, dict) else list(dk) if isinstance(dk, list) else []
    return [_dkim_entry(e, "config [dkim]", base_dir) for e in items]
