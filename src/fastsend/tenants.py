"""Tenants of ``fastsend serve``: their sending domains, DKIM keys and tracking base URL.

CONFIG
    [tenants.acme]
    domains = ["acme.example", "mail.acme.example"]   # required, non-empty
    tracking_base_url = "https://t.acme.example"       # optional
    [[tenants.acme.dkim]]                              # optional: the tenant's own keys
    domain = "acme.example"; selector = "s1"; key = "keys/acme.pem"

DESCRIPTION
    A tenant (the owner of API keys and submission users) may put in From only
    an address at one of its ``domains`` or a subdomain of one (unless another
    tenant is listed for that subdomain or one nearer: the most specific listed
    domain decides, and no domain is listed for two tenants); the HTTP API
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

from typing import Any

import msgspec

from fastsend.config import Config
from fastsend.config.tenants import OPERATOR, norm_domain, under

__all__ = ["OPERATOR", "Tenant", "TenantDomainError", "Tenants", "ascii_domain", "domain_of"]




class TenantDomainError(ValueError):
    """The From domain is not one of the tenant's (``domain`` names it)."""

    def __init__(self, tenant: str, domain: str) -> None:
        super().__init__(f"domain {domain!r} is not one of tenant {tenant!r}'s sending domains")
        self.tenant = tenant
        self.domain = domain


class Tenant(msgspec.Struct, frozen=True):
    name: str
    domains: tuple[str, ...]
    dkim: tuple[dict[str, Any], ...] = ()
    tracking_base_url: str = ""


_norm = norm_domain
_under = under


def ascii_domain(domain: str) -> str:
    """``domain`` lower-cased, without its trailing dot, in A-labels as message headers
    write it (IDNA 2008 with UTS 46: ``straße`` is not ``strasse``); a name that is not
    a valid IDN is returned as it is (it matches no configured domain, all ASCII)."""
    d = _norm(domain)
    if d.isascii():
        return d
    from fastsend.message.headers import HeaderError, encode_domain

    try:
        return encode_domain(d).lower()
    except HeaderError:
        return d


def domain_of(address: str) -> str:
    """The lower-case domain of an address (in A-labels when it is not ASCII)."""
    return ascii_domain(address.rpartition("@")[2])


class Tenants(msgspec.Struct):
    by_name: dict[str, Tenant] = msgspec.field(default_factory=dict)
    configured: bool = False
    global_dkim: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> Tenants:
        """From ``[tenants]`` and ``[dkim]`` (typed and checked when the config loaded)."""
        out = cls(global_dkim=tuple(k.entry(cfg.base_dir) for k in cfg.dkim))
        if cfg.tenants is None:
            return out
        out.configured = True
        for name, t in cfg.tenants.items():
            keys = tuple(k.entry(cfg.base_dir) for k in t.keys)
            out.by_name[name] = Tenant(name, tuple(t.domains), keys, t.tracking_base_url)
        return out

    def get(self, tenant: str) -> Tenant | None:
        return self.by_name.get(tenant)

    def allows(self, tenant: str, domain: str) -> bool:
        """Whether ``tenant`` may send From ``domain``."""
        if not self.configured or tenant == OPERATOR:
            return True
        t = self.by_name.get(tenant)
        d = ascii_domain(domain)
        return t is not None and bool(d) and self.owner_of(d) == tenant

    def owner_of(self, domain: str) -> str | None:
        """The tenant whose listed domain covering ``domain`` (A-labels, lower case) is
        the most specific: a tenant listed for ``example.com`` does not send as
        ``shop.example.com`` when another tenant is listed for that (with its key for
        example.com, relaxed DMARC alignment would pass). None: no tenant's."""
        best, size = None, -1
        for name, t in self.by_name.items():
            for x in t.domains:
                if len(x) > size and _under(domain, x):
                    best, size = name, len(x)
        return best

    def check_from(self, tenant: str, domain: str) -> None:
        """TenantDomainError unless ``tenant`` may send From ``domain``."""
        if not self.allows(tenant, domain):
            raise TenantDomainError(tenant, ascii_domain(domain))

    def dkim_for(self, tenant: str | None, domain: str) -> list[dict[str, Any]]:
        """The DKIM settings that sign mail From ``domain`` sent by ``tenant``."""
        d = ascii_domain(domain)
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
