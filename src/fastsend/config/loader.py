"""The loader: a TOML file -> :class:`Config`, every section typed and
checked before anything runs.

:func:`load` reads the file; :func:`from_dict` decodes each top-level table
into its section struct (:class:`ConfigFile` lists them), so an unknown key or
a wrong type anywhere is a :class:`ConfigError` naming its full key path; then
the checks that span sections (routes and transports, pools and source IPs,
tenants and what names them). A setting that loads but cannot take effect as
written is a warning in :attr:`Config.warnings` (the front ends print them),
never silence.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import msgspec

from fastsend import netguard
from fastsend.config.analytics import AnalyticsSettings, ReputationSection
from fastsend.config.base import ConfigError, Section, decode, read_toml, where
from fastsend.config.engine import (
    WINDOW_MIN,
    WINDOW_PIPELINES,
    DeliveryConfig,
    DNSConfig,
    EventsSection,
    IpsSection,
    RetryConfig,
    Route,
    SpoolSection,
    TLSSection,
    WorkersSection,
)
from fastsend.config.serve import (
    ApiSettings,
    DashboardSettings,
    IntakeSettings,
    ProviderEventSettings,
    ProxySettings,
    SubmissionSettings,
    TrackingSettings,
    WebhookSettings,
    check_events,
)
from fastsend.config.shaping import (
    GuardrailSettings,
    PoolsSection,
    ShapingFile,
    ShapingSection,
    shipped_shaping,
)
from fastsend.config.tenants import DOMAIN, OPERATOR, DkimKey, TenantTable, norm_domain
from fastsend.config.transports import (
    TransportSpec,
    TransportTable,
    build_transports,
    parse_route,
    read_credentials_file,
)

_new = msgspec.field


class ConfigFile(Section):
    """Every top-level table a config may have (any other name is an error)."""

    spool: SpoolSection = _new(default_factory=SpoolSection)
    workers: WorkersSection = _new(default_factory=WorkersSection)
    ips: IpsSection = _new(default_factory=IpsSection)
    routes: dict[str, str | list[str]] = {}
    delivery: DeliveryConfig = _new(default_factory=DeliveryConfig)
    retry: RetryConfig = _new(default_factory=RetryConfig)
    dns: DNSConfig = _new(default_factory=DNSConfig)
    tls: TLSSection = _new(default_factory=TLSSection)
    events: EventsSection = _new(default_factory=EventsSection)
    shaping: ShapingSection = _new(default_factory=ShapingSection)
    pools: PoolsSection | None = None
    guardrails: GuardrailSettings = _new(default_factory=GuardrailSettings)
    tenants: dict[str, TenantTable] | None = None
    dkim: DkimKey | list[DkimKey] = []
    transports: dict[str, TransportTable] = {}
    api: ApiSettings = _new(default_factory=ApiSettings)
    webhooks: WebhookSettings = _new(default_factory=WebhookSettings)
    submission: SubmissionSettings = _new(default_factory=SubmissionSettings)
    intake: IntakeSettings = _new(default_factory=IntakeSettings)
    proxy: ProxySettings = _new(default_factory=ProxySettings)
    dashboard: DashboardSettings = _new(default_factory=DashboardSettings)
    tracking: TrackingSettings = _new(default_factory=TrackingSettings)
    provider_events: ProviderEventSettings = _new(default_factory=ProviderEventSettings)
    analytics: AnalyticsSettings = _new(default_factory=AnalyticsSettings)
    reputation: ReputationSection = _new(default_factory=ReputationSection)


SECTIONS = frozenset(ConfigFile.__struct_fields__)


# Config fields its repr leaves out.
_SECRET = frozenset({"secret", "transports", "tracking", "mailgun_webhook_key"})


class Config(msgspec.Struct):
    """The loaded configuration: each section typed (the areas read their own),
    plus what the loader derived (paths made absolute, routes parsed,
    transports with their credentials)."""

    spool_dir: str = "./spool"
    spool_url: str = ""  # [spool] url: a shared (Redis) spool; spool_dir stays the local dir
    workers: int = 0
    spool: SpoolSection = _new(default_factory=SpoolSection)  # [spool] (blob retention)
    source_ips: list[str] = _new(default_factory=list)
    helo: str = ""
    routes: dict[str, Route] = _new(default_factory=dict)
    delivery: DeliveryConfig = _new(default_factory=DeliveryConfig)
    retry: RetryConfig = _new(default_factory=RetryConfig)
    dns: DNSConfig = _new(default_factory=DNSConfig)
    tls: TLSSection = _new(default_factory=TLSSection)  # [tls] (ca_file made absolute)
    event_log: str = ""  # "" = DIR/events.jsonl of the spool
    # The installation secret (fastsend.msgid.load_secret), set by the supervisor
    # before it forks: message-id MACs, tracking links. Never from TOML, never logged.
    secret: bytes = b""
    # This spool's Message-ID label (fastsend.msgid.new_tag, kept in the spool),
    # set by the supervisor beside the secret: ids are <token@TAG.from-domain>.
    msgid_tag: str = ""
    base_dir: str = "."  # the config file's directory: relative paths in it start here
    shaping: ShapingSection = _new(default_factory=ShapingSection)
    shaping_file: ShapingFile | None = None  # the file [shaping] file names, parsed
    pools: PoolsSection | None = None  # None: one pool "default" of the source IPs
    guardrails: GuardrailSettings = _new(default_factory=GuardrailSettings)
    tenants: dict[str, TenantTable] | None = None  # None: no [tenants] (one operator)
    dkim: list[DkimKey] = _new(default_factory=list)  # [dkim]: keys of any tenant's domains
    # [transports.NAME] and route shorthands; they hold credentials read from the
    # environment or a 0600 file: never logged.
    transports: dict[str, TransportSpec] = _new(default_factory=dict)
    api: ApiSettings = _new(default_factory=ApiSettings)
    webhooks: WebhookSettings = _new(default_factory=WebhookSettings)
    submission: SubmissionSettings = _new(default_factory=SubmissionSettings)
    intake: IntakeSettings = _new(default_factory=IntakeSettings)
    proxy: ProxySettings = _new(default_factory=ProxySettings)
    dashboard: DashboardSettings = _new(default_factory=DashboardSettings)
    tracking: TrackingSettings = _new(default_factory=TrackingSettings)
    provider_events: ProviderEventSettings = _new(default_factory=ProviderEventSettings)
    mailgun_webhook_key: bytes = b""  # [provider_events]
    analytics: AnalyticsSettings = _new(default_factory=AnalyticsSettings)
    reputation: ReputationSection = _new(default_factory=ReputationSection)
    # Settings that load but cannot take effect as written (the loader explains
    # each; the front ends print them): never silence.
    warnings: list[str] = _new(default_factory=list)

    def __repr__(self) -> str:
        """Every field but the secrets (the installation secret, transports'
        credentials, tracking keys, the Mailgun webhook key): never logged."""
        shown = (f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__ if f not in _SECRET)
        return f"Config({', '.join(shown)})"

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    @property
    def event_log_path(self) -> str:
        return self.event_log or os.path.join(self.spool_dir, "events.jsonl")

    @property
    def tenant_names(self) -> frozenset[str]:
        return frozenset(self.tenants or ())

    @property
    def tenant_weights(self) -> dict[str, int]:
        """``[tenants.NAME] weight`` of the tenants whose share of the claims is
        not 1 (Spool.set_tenant_weights)."""
        return {n: t.weight for n, t in (self.tenants or {}).items() if t.weight != 1}

    def path(self, p: str) -> str:
        """A path from the config file, relative to its directory ("" stays "")."""
        return os.path.join(self.base_dir, p) if p else ""

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

    def mta_sts_for(self, domain: str) -> bool:
        """Whether mail to ``domain`` (lowercase A-labels) by MX honours its
        MTA-STS policy: [tls] domains (the domain, then its parents), else
        [tls] mta_sts. A static route to a host has no policy (the caller
        checks :meth:`route_for` first)."""
        d = domain
        own = self.tls.domains
        if own:
            while True:
                v = own.get(d)
                if v is not None:
                    return v == "on"
                if "." not in d:
                    break
                d = d.split(".", 1)[1]
        return self.tls.mta_sts == "on"

    def ips_for_worker(self, index: int) -> list[str]:
        """The source IPs owned by worker ``index`` (round-robin split of the pool)."""
        if not self.source_ips:
            return []
        n = self.worker_count
        mine = self.source_ips[index % n :: n] if len(self.source_ips) >= n else []
        return mine or [self.source_ips[index % len(self.source_ips)]]

    def window_for(self, index: int) -> int:
        """Worker ``index``'s active window: ``[delivery] window``, or when that
        is 0, WINDOW_PIPELINES times what its connections to one site keep in
        flight (``max_connections`` per source IP x ``pipeline``), at least
        WINDOW_MIN. A window that only covers what is at the receiver leaves the
        worker nothing rendered when replies come back: the rest holds the next
        claim on its way (a claim waits for a quarter of the window), what is
        rendered and ready, and what is answered but not yet written to the
        spool (still counted: a crash would send it again). A deeper ready
        queue costs CPU (rendered bytes cold in cache when sent): see
        docs/SCHEDULER.md for the measures."""
        d = self.delivery
        if d.window:
            return d.window
        ips = max(1, len(self.ips_for_worker(index)))
        return max(WINDOW_MIN, WINDOW_PIPELINES * d.max_connections * d.pipeline * ips)

    def route(self, target: str | list[str], where: str) -> Route:
        """A ``[routes]`` value (or ``--route``): HOST:PORT or transports
        (a shorthand such as ``ses:eu-west-1`` adds its transport)."""
        chain = parse_route(target, self.transports, self.base_dir, where)
        if chain is not None:
            return Route("", 0, chain)
        assert isinstance(target, str)
        return Route.parse(target, where=where)


def route_key(key: str) -> str:
    """A ``[routes]`` / ``--route`` key as :meth:`Config.route_for` looks it up:
    ``campaign:``, ``tenant:`` and ``pool:`` keys as written, a domain in
    lower-case A-labels without a trailing dot, as recipients' domains are (a
    Unicode or ``example.org.`` key never matched: the mail went by MX)."""
    if key.split(":", 1)[0] in ("campaign", "tenant", "pool"):
        return key
    return key if key.strip() == "*" else norm_domain(key)


def never_matches(key: str, subdomains: bool = True) -> str:
    """Why a domain key (``[routes]``, ``--route``, ``[shaping.domain]``, a
    provider's ``domains``), as :func:`route_key` keeps it, can match no
    recipient domain; "" when it can. ``*.example.org`` or ``.example.org``
    (other MTAs' forms for subdomains) matched nothing, silently: a domain
    key covers its subdomains already (``subdomains``; a provider's
    ``domains`` are matched exactly)."""
    if key == "*" or key.split(":", 1)[0] in ("campaign", "tenant", "pool"):
        return ""
    if DOMAIN.fullmatch(key):
        return ""
    if subdomains and key.lstrip("*.") and DOMAIN.fullmatch(key.lstrip("*.")):
        return (f"{key!r} matches no domain: write {key.lstrip('*.')!r} (a domain key"
                " covers its subdomains too)")  # fmt: skip
    return f"{key!r} is not a domain name, so it matches no recipient"


def from_dict(raw: dict[str, Any], *, base_dir: str = ".", files: bool = True) -> Config:
    """Decode and check every section of a parsed config file. ``files``: also
    check the TLS certificates and keys it names (False: a config shown in the
    docs, whose paths are placeholders)."""
    f: ConfigFile = decode(raw, ConfigFile)
    cfg = Config(base_dir=base_dir)
    if f.spool.url:
        cfg.spool_url = f.spool.url
        from fastsend.redisurl import parse_redis_url

        local = f.spool.dir or parse_redis_url(f.spool.url)[1].get("dir") or "./spool"
        cfg.spool_dir = os.path.join(base_dir, local)
    elif f.spool.dir:
        cfg.spool_dir = os.path.join(base_dir, f.spool.dir)
    cfg.spool = f.spool
    cfg.workers = f.workers.count
    cfg.source_ips = list(f.ips.source)
    cfg.helo = f.ips.helo
    cfg.transports = build_transports(f.transports, base_dir)
    for name, spec in cfg.transports.items():
        if spec.max_recipients > spec.recipients_limit():
            cfg.warnings.append(
                f"[transports.{name}] max_recipients = {spec.max_recipients} is over what"
                f" {spec.kind} takes in one request: {spec.recipients_limit()} are sent"
            )
    for dom, target in f.routes.items():
        cfg.routes[key := route_key(dom)] = cfg.route(target, f"[routes] {dom!r}")
        if why := never_matches(key):
            cfg.warnings.append(f"[routes] {why}")
    cfg.delivery, cfg.retry, cfg.dns = f.delivery, f.retry, f.dns
    cfg.tls = f.tls
    if f.tls.ca_file:
        cfg.tls.ca_file = os.path.join(base_dir, f.tls.ca_file)
    # keys in A-labels, as recipients' domains are (a Unicode key never matched)
    cfg.tls.domains = {norm_domain(d): v for d, v in f.tls.domains.items()}
    if f.tls.report_from or f.tls.reports == "on":
        _check_report_from(f.tls.report_from)
    if f.tls.dane == "on" and not all(_loopback(ns) for ns in f.dns.nameservers or ["?"]):
        cfg.warnings.append(
            '[tls] dane = "on" believes the AD bit of [dns] nameservers: list only a local'
            " validating resolver there (127.0.0.1, ::1), not the system's resolv.conf"
            " nor a remote one (a forged AD bit would choose the certificate)"
        )
    if f.events.log:
        cfg.event_log = os.path.join(base_dir, f.events.log)
    cfg.shaping = f.shaping
    if f.shaping.file:
        cfg.shaping.file = os.path.join(base_dir, f.shaping.file)
        cfg.shaping_file = load_shaping_file(cfg.shaping.file)
    cfg.pools, cfg.guardrails = f.pools, f.guardrails
    cfg.tenants = f.tenants
    cfg.dkim = [f.dkim] if isinstance(f.dkim, DkimKey) else list(f.dkim)
    cfg.api, cfg.webhooks, cfg.submission, cfg.intake = f.api, f.webhooks, f.submission, f.intake
    cfg.proxy, cfg.dashboard, cfg.tracking = f.proxy, f.dashboard, f.tracking
    cfg.provider_events, cfg.analytics, cfg.reputation = f.provider_events, f.analytics, f.reputation
    _check(cfg)
    if files:
        _check_tls(cfg)
        _check_ca(cfg)
    return cfg


def load_shaping_file(path: str) -> ShapingFile:
    """A shaping file (the shipped shaping.toml's form), typed."""
    data = read_toml(path, "shaping file")
    try:
        result: ShapingFile = decode(data, ShapingFile)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return result


def _check(cfg: Config) -> None:
    """What spans sections: paths, secrets read from files, names that must exist."""
    tenants = cfg.tenants
    if tenants is not None:
        for name in tenants:
            if name.lower() == OPERATOR:
                raise ConfigError(f"[tenants.{name}]: the tenant name {OPERATOR!r} is the operator's")
    names = cfg.tenant_names

    def unknown_tenant(t: str) -> bool:
        return tenants is not None and t not in names and t != OPERATOR

    # [pools]: the pools' addresses are the source IPs, or must be among them
    if cfg.pools is not None:
        if not cfg.pools.pools and cfg.pools.default not in ("", "default"):
            raise ConfigError(f"[pools] default {cfg.pools.default!r} is not a pool")
        ips = [ip.ip for p in cfg.pools.pools.values() for ip in p.ips]
        if cfg.source_ips:
            for pname, p in cfg.pools.pools.items():
                for i, ip in enumerate(p.ips):
                    if ip.ip not in cfg.source_ips:
                        raise ConfigError(
                            f"{where(('pools', pname, 'ips', i))} {ip.ip} is not one of"
                            " [ips] source: no worker would send from it"
                        )
        else:
            cfg.source_ips = list(dict.fromkeys(ips))
        for t in cfg.pools.tenants:
            if unknown_tenant(t):
                cfg.warnings.append(f"[pools] tenants: {t!r} is not a tenant of [tenants]")
    pools = set(cfg.pools.pools) if cfg.pools is not None and cfg.pools.pools else {"default"}
    for key in cfg.routes:
        kind, _, name = key.partition(":")
        if kind == "pool" and name not in pools:
            cfg.warnings.append(
                f"[routes] {key!r} never applies: no pool {name!r} (pools: {', '.join(sorted(pools))})"
            )
        if kind == "tenant" and unknown_tenant(name):
            cfg.warnings.append(f"[routes] {key!r}: {name!r} is not a tenant of [tenants]")
    _check_routes_vs_shaping(cfg)
    _check_rule_providers(cfg)
    for t in cfg.shaping.dispatch.tenants:
        if unknown_tenant(t):
            cfg.warnings.append(f"[shaping.dispatch] tenants: {t!r} is not a tenant of [tenants]")
    if tenants is not None:  # a domain is one tenant's: else each sends (and signs) as the other
        listed: dict[str, str] = {}
        for name, domains in ((n, x.domains) for n, x in tenants.items()):
            for d in domains:
                if listed.setdefault(d, name) != name:
                    raise ConfigError(
                        f"[tenants.{name}] domains: {d!r} is also [tenants.{listed[d]}]'s"
                        " (a sending domain belongs to one tenant)"
                    )
    # DKIM: keys are files relative to the config; a key no tenant can use is said
    if tenants is not None:
        owned = {d for t in tenants.values() for d in t.domains}
        for k in cfg.dkim:
            if k.domain not in owned:
                cfg.warnings.append(
                    f"[dkim] key {k.selector}._domainkey.{k.domain}: no tenant owns {k.domain}"
                    " (tenants' mail is signed only with keys of their own domains), so it"
                    " signs only the operator's (CLI) mail"
                )
    # RFC 8460 3: report mail is DKIM-signed by the reporting domain ([dkim], the
    # operator's keys, sign the tls-reports campaign); receivers may drop it unsigned
    rdomain = norm_domain(cfg.tls.report_from.rpartition("@")[2]) if cfg.tls.report_from else ""
    if rdomain and not any(k.domain == rdomain for k in cfg.dkim):
        cfg.warnings.append(
            f"[tls] report_from {cfg.tls.report_from}: no [dkim] key for {rdomain}, so the"
            " TLS-RPT report mail goes unsigned (RFC 8460 asks for its domain's DKIM"
            " signature; receivers may discard it): add a [[dkim]] key of that domain"
        )
    for sec, users in (("submission.users", cfg.submission.users),
                       ("dashboard", {n: "" for n in cfg.dashboard.admin_tenants})):  # fmt: skip
        for t in users:
            if unknown_tenant(t):
                cfg.warnings.append(f"[{sec}] {t!r} is not a tenant of [tenants]")
    for t in cfg.submission.users:
        if tenants is None and t != OPERATOR:
            cfg.warnings.append(
                f"[submission.users] {t!r}: without [tenants] every user sends as the operator"
            )
            break
    r = cfg.retry
    if r.min_backoff > r.max_backoff:
        raise ConfigError(
            f"[retry] min_backoff {r.min_backoff:g} is more than max_backoff {r.max_backoff:g}"
        )
    if r.max_age < r.min_backoff:
        cfg.warnings.append(
            f"[retry] max_age {r.max_age:g} is less than min_backoff {r.min_backoff:g}:"
            " a deferred message expires before its first retry"
        )
    if cfg.pools is not None and cfg.pools.warmup.schedule and not any(
        e.warmup_start is not None or e.warmup_day is not None
        for p in cfg.pools.pools.values()
        for e in p.ips
    ):
        cfg.warnings.append(
            "[pools.warmup] schedule applies to no address: give an IP warmup_start or warmup_day"
        )
    if not cfg.analytics.enabled:
        rep = cfg.reputation
        for name, table in (("alarms", rep.alarms), ("warmup", rep.warmup)):
            if _changed(table):
                cfg.warnings.append(
                    f"[reputation.{name}] does not apply: it reads the rollups, and"
                    " [analytics] enabled = false"
                )
    # serve's secrets
    w = cfg.webhooks
    if w.secret_file:
        w.secret_file = cfg.path(w.secret_file)
        w.secret = _read_secret(w.secret_file, "[webhooks] secret_file")
    if w.url_list and len(w.secret) < 16:
        raise ConfigError("[webhooks] needs a secret (or secret_file) of 16+ characters")
    hooked = dict.fromkeys(w.url_list, "[webhooks] urls")
    tables = tenants or {}
    for name, tt in tables.items():
        if tt.webhook_secret_file:
            tt.webhook_secret_file = cfg.path(tt.webhook_secret_file)
            tt.webhook_secret = _read_secret(
                tt.webhook_secret_file, f"[tenants.{name}] webhook_secret_file"
            )
        try:
            check_events(f"[tenants.{name}] webhook_events", tt.webhook_events)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if tt.webhook_urls and len(tt.webhook_secret) < 16:
            raise ConfigError(f"[tenants.{name}] webhook_urls need a webhook_secret (or"
                              " webhook_secret_file) of 16+ characters: the tenant's own")  # fmt: skip
        others = {w.secret} | {o.webhook_secret for n, o in tables.items()
                               if n != name and o.webhook_urls}  # fmt: skip
        if tt.webhook_urls and tt.webhook_secret in others:
            raise ConfigError(f"[tenants.{name}] webhook_secret is another receiver's: each"
                              " tenant's receiver checks signatures with a secret of its own")  # fmt: skip
        for u in tt.webhook_urls:
            bad = tenant_url_problem(u, netguard.networks(w.allow_private))
            if bad:
                raise ConfigError(f"[tenants.{name}] webhook_urls: {bad}")
            # One URL, one receiver: its cursor and its events are one tenant's, or all.
            other = hooked.setdefault(u, f"[tenants.{name}] webhook_urls")
            if other != f"[tenants.{name}] webhook_urls":
                raise ConfigError(f"[tenants.{name}] webhook_urls: {u!r} is also {other}'s"
                                  " (a URL gets one tenant's events, or the operator's all)")  # fmt: skip
    pe = cfg.provider_events
    if pe.sns_ca_file:
        pe.sns_ca_file = cfg.path(pe.sns_ca_file)
    if pe.sendgrid_public_key:
        try:
            import base64

            from cryptography.hazmat.primitives.serialization import load_der_public_key

            load_der_public_key(base64.b64decode(pe.sendgrid_public_key))
        except ValueError:
            raise ConfigError(
                "[provider_events] sendgrid_public_key is not a base64 DER EC public key"
            ) from None
    if pe.mailgun_signing_key_file:
        pe.mailgun_signing_key_file = cfg.path(pe.mailgun_signing_key_file)
        got = read_credentials_file(pe.mailgun_signing_key_file, "[provider_events]")
        cfg.mailgun_webhook_key = got.get("signing_key", "").encode()
    if cfg.analytics.machine_rules:
        cfg.analytics.machine_rules = cfg.path(cfg.analytics.machine_rules)
    feeds = cfg.reputation.feeds
    if feeds.postmaster is not None:
        feeds.postmaster.token_file = cfg.path(feeds.postmaster.token_file)
    if feeds.snds is not None:
        feeds.snds.key_file = cfg.path(feeds.snds.key_file)
    # a listener that names no listen address does nothing: say so
    for sec, s in (("submission", cfg.submission), ("intake", cfg.intake)):
        if not s.listen and _changed(s):
            cfg.warnings.append(f"[{sec}] has settings but no listen address: no listener starts")


def _read_secret(path: str, where: str) -> str:
    """A secret kept in a file of its own (its surrounding whitespace dropped)."""
    try:
        with open(path, "rb") as fh:
            return fh.read().strip().decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} {path!r}: {e}") from None


def _changed(s: msgspec.Struct) -> bool:
    """Whether any key of section ``s`` was set to other than its default."""
    return msgspec.structs.asdict(s) != msgspec.structs.asdict(type(s)())


def _check_rule_providers(cfg: Config) -> None:
    """A feedback rule for a provider no shaping layer defines never matches: say so."""
    layers: list[tuple[str, ShapingFile]] = []
    if cfg.shaping.defaults:
        layers.append(("", shipped_shaping()))
    if cfg.shaping_file is not None:
        layers.append((f"{cfg.shaping.file}: [[rule]]", cfg.shaping_file))
    layers.append(("[[shaping.rule]]", cfg.shaping))
    known = sorted({name for _, layer in layers for name in layer.provider})
    for label, layer in layers:
        for rule in layer.rule if label else ():  # the shipped rules are right
            if rule.provider and rule.provider not in known:
                cfg.warnings.append(
                    f'{label} "{rule.name}": provider {rule.provider!r} is not a provider of'
                    f" the shaping tables (known: {', '.join(known) or 'none'}): the rule"
                    " never applies"
                )


def tenant_url_problem(url: str, allow: netguard.Networks) -> str:
    """Why a tenant's ``url`` must not be requested ("" when it may be): its host
    an address (in any spelling) that is not public and not in ``allow``
    (``[webhooks] allow_private``). A name is checked on the addresses each
    connection goes to (fastsend.serve.webhooks), not here: its answer can change."""
    import urllib.parse

    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return f"{url!r} is not a URL"
    if not host:
        return f"{url!r} has no host"
    ip = netguard.literal(host)
    if ip is not None and netguard.refused(ip, allow):
        return f"{url!r} is {ip}, " + netguard.describe("[webhooks] allow_private")
    return ""


def _loopback(ns: str) -> bool:
    """Whether a [dns] nameservers entry (ADDR, ADDR:PORT, [V6]:PORT) is on loopback."""
    import ipaddress

    host = ns[1:].partition("]")[0] if ns.startswith("[") else (
        ns.split(":")[0] if ns.count(":") == 1 else ns
    )
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_ca(cfg: Config) -> None:
    """[tls] ca_file: a readable PEM trust store (a typo would make every
    policy fetch fail, and every enforced domain's mail wait)."""
    ca = cfg.tls.ca_file
    if not ca:
        return
    try:
        ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[tls] ca_file: {ca}: no usable PEM certificates ({e})") from None


def _check_report_from(addr: str) -> None:
    """[tls] report_from: one plain address (it goes into a From header: no
    display name, no line break), needed when reports are on."""
    if not addr:
        raise ConfigError(
            '[tls] reports = "on" needs report_from, the address TLS-RPT reports come from'
            ' (e.g. report_from = "tls-reports@example.com")'
        )
    local, at, domain = addr.rpartition("@")
    if (
        not at or not local or "." not in domain or not addr.isascii()
        or any(c.isspace() or c in '<>,;:"()[]\\' for c in addr)
    ):  # fmt: skip
        raise ConfigError(f"[tls] report_from: {addr[:100]!r} is not a plain address (user@domain)")


def _check_tls(cfg: Config) -> None:
    """[submission]/[intake] tls_cert and tls_key (relative to the config file):
    readable, a PEM certificate and the private key that matches it. Checked at
    load, so a bad file fails `check-config` and a reload, not the next start."""
    for sec, s in (("submission", cfg.submission), ("intake", cfg.intake)):
        if not (s.tls_cert and s.tls_key):
            continue
        s.tls_cert, s.tls_key = cfg.path(s.tls_cert), cfg.path(s.tls_key)
        for key in ("tls_cert", "tls_key"):
            path = getattr(s, key)
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(f"[{sec}] {key}: cannot read {path}: {e.strerror}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_verify_locations(cafile=s.tls_cert)
        except ssl.SSLError:
            raise ConfigError(
                f"[{sec}] tls_cert: {s.tls_cert} holds no PEM certificate"
            ) from None
        try:
            ctx.load_cert_chain(s.tls_cert, s.tls_key)
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(
                    f"[{sec}] tls_key: {s.tls_key} is not the key of tls_cert {s.tls_cert}"
                ) from None
            raise ConfigError(
                f"[{sec}] tls_key: {s.tls_key} holds no usable PEM private key"
            ) from None


def _check_routes_vs_shaping(cfg: Config) -> None:
    """A static route carries all its domains to one site, whose limits are the
    default or ``[shaping.domain."ROUTE-HOST"]``: a domain entry for a routed
    domain would be ignored, so say so; so is one that names no domain."""
    for place, layer in (("[shaping]", cfg.shaping), (cfg.shaping.file, cfg.shaping_file)):
        if layer is None:
            continue
        for dom in layer.domain:
            if why := never_matches(norm_domain(dom)):
                cfg.warnings.append(f"{place} domain: {why}")
        for name, p in layer.provider.items():
            for dom in p.domains or ():
                if why := never_matches(norm_domain(dom), subdomains=False):
                    cfg.warnings.append(f"{place} provider {name!r} domains: {why}")
    for dom in cfg.shaping.domain:
        route = cfg.route_for(dom)
        if route is not None and norm_domain(dom) != route.host.lower():
            cfg.warnings.append(
                f'[shaping.domain."{dom}"] does not apply: mail to {dom} goes through'
                f" the static route {route}, whose site takes the [shaping] default"
                f' limits or [shaping.domain."{route.host}"]'
            )


def load(path: str) -> Config:
    """Read and check a config file (ConfigError naming the file and the key)."""
    raw = read_toml(path, "config file")
    try:
        return from_dict(raw, base_dir=os.path.dirname(os.path.abspath(path)))
    except ConfigError as e:
        raise ConfigError(f"{os.path.basename(path)}: {e}") from None


load_config = load
