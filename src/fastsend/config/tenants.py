"""[tenants.NAME] and [dkim]: who may send as which domains, and the DKIM
keys that sign them (:mod:`fastsend.tenants` answers the questions)."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

import msgspec

from fastsend.config.base import NonNegFloat, NonNegInt, Section

OPERATOR = "default"  # fastsend.suppression.DEFAULT_TENANT: CLI campaigns
DOMAIN = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}")
_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(?:/[!-~]*)?")


def norm_domain(domain: str) -> str:
    """Lower case, no trailing dot; a Unicode name in A-labels (IDNA 2008 + UTS 46,
    as fastsend.address.idna_domain: a tenant's ``bücher.example`` is the From
    domain ``xn--bcher-kva.example``); one that is not a valid IDN is left as it is
    (then refused as "not a domain name")."""
    d = domain.strip().rstrip(".")
    if not d.isascii():
        import idna

        try:
            return idna.encode(d, uts46=True).decode("ascii").lower()
        except Exception:  # idna.IDNAError and its codec's other refusals
            pass
    return d.lower()


def under(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


class DkimKey(Section):
    """One signing key: ``key`` is a PEM file (relative to the config's directory)."""

    domain: str
    selector: str
    key: str
    canonicalization: Literal[
        "relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"
    ] = "relaxed/relaxed"
    headers: list[str] = []  # empty: the signer's default list (must include From)

    def __post_init__(self) -> None:
        self.domain = norm_domain(self.domain)
        if not DOMAIN.fullmatch(self.domain):
            raise ValueError(f"domain {self.domain!r} is not a domain name")
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9\-._]*[A-Za-z0-9])?", self.selector):
            raise ValueError(f"selector {self.selector!r} is not a DKIM selector")
        if not self.key:
            raise ValueError("key (a PEM file) is required")
        if self.headers and "from" not in [h.lower() for h in self.headers]:
            raise ValueError("headers must include From (RFC 6376)")

    def entry(self, base_dir: str) -> dict[str, Any]:
        """The signer's form (fastsend.message.dkim.Signer.from_settings)."""
        out: dict[str, Any] = {
            "domain": self.domain,
            "selector": self.selector,
            "key": os.path.join(base_dir, self.key),
            "canonicalization": self.canonicalization,
        }
        if self.headers:
            out["headers"] = [h.lower() for h in self.headers]
        return out


TenantWeight = Annotated[int, msgspec.Meta(ge=1, le=1000)]  # (spool/fair.py WEIGHT_RANGE)


class TenantTable(Section):
    """[tenants.NAME]: the From domains a tenant may send as, its DKIM keys
    (under those domains) and its tracking links' base URL."""

    domains: list[str]
    dkim: DkimKey | list[DkimKey] = []
    tracking_base_url: str = ""
    # This tenant's caps on what it submits (unset: [api] tenant_daily_messages,
    # tenant_message_rate, tenant_message_burst; 0: none). fastsend.serve.tenantcaps.
    daily_messages: NonNegInt | None = None
    message_rate: NonNegFloat | None = None
    message_burst: NonNegInt | None = None
    # Its share of the delivery claims among the tenants with mail due (1: an
    # equal one; 3: three times a tenant of 1's), as spool/fair.py's campaign
    # weights (same range). The operator's alone: no API call sets it.
    weight: TenantWeight = 1
    # Webhooks of its own, set by the operator (no tenant can make the server post
    # anywhere): each URL gets this tenant's events only, signed with the tenant's
    # own secret (16+ characters, or webhook_secret_file), with [webhooks]' batch
    # size, timeout and retries (fastsend.serve.webhooks). ``webhook_events``: the
    # event types they get (unset: [webhooks] events; names checked at load).
    webhook_urls: list[str] = []
    webhook_secret: str = ""
    webhook_secret_file: str = ""
    webhook_events: list[str] | None = None

    def __repr__(self) -> str:  # never print the webhook secret
        return f"TenantTable(domains={self.domains!r}, webhook_urls={self.webhook_urls!r})"

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError('needs domains = ["..."]: the From domains it may send as')
        doms = []
        for d in self.domains:
            if not DOMAIN.fullmatch(norm_domain(d)):
                raise ValueError(f"domains: {d!r} is not a domain name")
            doms.append(norm_domain(d))
        self.domains = doms
        for e in self.keys:
            if not any(under(e.domain, d) for d in self.domains):
                raise ValueError(f"dkim domain {e.domain!r} is not under the tenant's domains")
        if self.tracking_base_url and not _URL.fullmatch(self.tracking_base_url):
            raise ValueError("tracking_base_url must be an http(s) URL")
        for u in self.webhook_urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"webhook_urls: {u!r} is not an http(s) URL")
        self.webhook_urls = list(dict.fromkeys(self.webhook_urls))

    @property
    def keys(self) -> list[DkimKey]:
        return [self.dkim] if isinstance(self.dkim, DkimKey) else self.dkim
