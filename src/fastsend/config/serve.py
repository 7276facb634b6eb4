"""``fastsend serve``'s tables: [api], [webhooks], [submission] (and its
users), [intake], [proxy], [dashboard], [tracking], [provider_events].
Validated with every other section when the config loads, not when serve
starts; serve builds its listeners from these."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

import msgspec

from fastsend import netguard
from fastsend.config.base import (
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Section,
    check_listen,
    split_listen,
)
from fastsend.config.tenants import norm_domain

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NO_CAP = 1 << 62  # what a cap of 0 (none) compares as


class ApiSettings(Section):
    """[api]: the HTTP API (fastsend.serve.api)."""

    listen: str = "127.0.0.1:8025"
    max_batch: PosInt = 1000  # messages (and recipients) per POST /v1/messages
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16 << 20
    rate_limit: PosFloat = 100.0  # requests per second per key
    rate_burst: NonNegInt = 0  # 0: max(1, rate_limit)
    max_campaign_recipients: NonNegInt = 1_000_000  # per campaign (create + added lists); 0: no cap
    # Campaigns a tenant makes through the API in any 24 hours (POST /v1/campaigns, each
    # new inline template of POST /v1/messages); beyond: 429 with Retry-After. 0: no cap.
    max_campaigns_per_day: NonNegInt = 1000
    # What each tenant may submit (fastsend.serve.tenantcaps), a message per
    # recipient: the daily quota counts every way in (campaign lists too), the rate
    # POST /v1/messages and SMTP submission; [tenants.NAME]
    # daily_messages / message_rate / message_burst set one tenant's. 0: no cap.
    # Beyond: 429 with Retry-After (SMTP: 451 4.7.1), nothing of it spooled. On a
    # shared spool counted across the nodes.
    tenant_daily_messages: NonNegInt = 0  # per UTC day
    tenant_message_rate: NonNegFloat = 0.0  # per second, sustained
    tenant_message_burst: NonNegInt = 0  # at once (0: max(1, rate)); a bigger request: 429
    # Spooled bytes of one request: each recipient's row carries its message, so a
    # body of B bytes to N recipients costs B x N (413 beyond this; 0: no cap).
    max_spooled_bytes: NonNegInt = 256 << 20
    # How long an Idempotency-Key's answer is kept (a retry with the key within it
    # gets the first answer again); swept afterwards. At least a minute.
    idempotency_ttl_s: Annotated[float, msgspec.Meta(ge=60.0)] = 86400.0
    # A request running under an Idempotency-Key renews its lease on the key
    # (every third of it) while it works; a holder on another host whose lease
    # lapsed is dead and a retry takes the request over (on this host a dead
    # holder is seen at once, a live one never taken over).
    idempotency_lease_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = 30.0
    # Operational data and recipients' pages on listeners of their own.
    admin_listen: str = ""  # "HOST:PORT": /metrics without a key (bind it to a private net)
    public_listen: str = ""  # "HOST:PORT": tracking and unsubscribe only (what recipients reach)
    # Every HTTP listener (API, public, admin; fastsend.serve.httpguard): a connection
    # sends a whole request's headers within header_timeout of opening or of its last
    # answer (else it is closed: slowloris, idle keep-alive), a request's body within
    # body_timeout (else 408); beyond max_connections open at once, or
    # max_connections_per_ip from one address, a connection gets a 503.
    header_timeout: PosFloat = 30.0
    body_timeout: PosFloat = 60.0
    max_connections: PosInt = 1024
    max_connections_per_ip: PosInt = 256
    # Request bodies over 64 KiB held in memory at once (read whole, then decoded) on
    # this node, a tenant at most half of it (at least one max_body_bytes): beyond, 503
    # (the node's) or 429 (the tenant's) with Retry-After, before the body is read.
    # A body of unknown length counts as max_body_bytes. CSV/JSON-lines uploads stream
    # to disk and do not count.
    max_held_bytes: PosInt = 256 << 20

    def __post_init__(self) -> None:
        if self.max_held_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_held_bytes ({self.max_held_bytes}) is below max_body_bytes"
                f" ({self.max_body_bytes}): no request of the largest size could be taken"
            )
        check_listen(self.listen, "listen")
        for k in ("admin_listen", "public_listen"):
            if getattr(self, k):
                check_listen(getattr(self, k), k)

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)

    # A cap of 0 is no cap, as every other cap's (max_campaigns_per_day, the tenant
    # quotas): it refused every campaign and every message instead.
    @property
    def recipient_cap(self) -> int:
        """``max_campaign_recipients``, 0 (no cap) as a count never reached."""
        return self.max_campaign_recipients or NO_CAP

    @property
    def spooled_bytes_cap(self) -> int:
        """``max_spooled_bytes``, 0 (no cap) as a size never reached."""
        return self.max_spooled_bytes or NO_CAP


# Every event the event log carries (its "event" field), what ``[webhooks] events``
# may name: a name not here would subscribe to nothing, silently (a typo such as
# "bounce" or "complaint"). tests/test_serve_webhooks.py checks that every event the
# source writes is listed.
EVENT_NAMES = frozenset({
    # a message's life (the supervisor, the acceptor, the worker's routes)
    "accepted", "suppressed", "delivered", "deferred", "bounced", "expired", "failover",
    # what recipients and receivers tell later (tracking, the intake, provider webhooks)
    "opened", "clicked", "unsubscribed", "complained", "feedback", "provider",
    "provider_subscription",
    # campaigns (the API, `fastsend campaign`, guardrails)
    "campaign_paused", "campaign_active", "campaign_cancelled", "guardrail_exceeded",
    # the node's sending reputation (shaping, blocklists, feeds, warm-up, alarms, DMARC)
    "shaping", "ip_listed", "ip_delisted", "reputation_feed", "reputation_feed_failed",
    "warmup_adjusted", "alarm", "alarm_cleared", "dmarc_report", "dmarc_report_refused",
    # TLS (MTA-STS / DANE failures counted per policy domain, RFC 8460; the
    # successful sessions per policy, a worker's sum a minute: TLS-RPT's counts)
    "tls_report", "tls_sessions",
})  # fmt: skip


def check_events(key: str, names: list[str] | None) -> None:
    """ValueError naming ``key`` when ``names`` holds an event the log never carries."""
    unknown = [e for e in names or () if e not in EVENT_NAMES]
    if unknown:
        raise ValueError(
            f"{key}: unknown event {', '.join(map(repr, unknown))} (the events are: "
            f"{', '.join(sorted(EVENT_NAMES))})"
        )


class WebhookSettings(Section):
    """[webhooks]: where events are POSTed (fastsend.serve.webhooks)."""

    urls: str | list[str] = []
    secret: str = ""  # or secret_file; 16+ characters
    secret_file: str = ""
    batch_size: PosInt = 100
    events: list[str] | None = None  # None: every event
    timeout: PosFloat = 10.0
    retry_min: PosFloat = 1.0
    retry_max: PosFloat = 300.0
    flush_interval: PosFloat = 0.2
    # Events no URL took within this many days are dropped (logged, counted); 0: never.
    retention_days: NonNegFloat = 7.0
    # A URL of ``urls`` that gets event types of its own (a URL not named: ``events``):
    # [webhooks.url_events] "https://ops.example/alerts" = ["ip_listed", "alarm"]
    url_events: dict[str, list[str]] = {}
    # Networks a tenant's webhook_urls may reach although not public (fastsend.netguard:
    # loopback, RFC 1918, ULA, link-local, CGNAT, ... are refused by default, when the
    # config loads and again on the address each connection goes to), e.g. a receiver
    # inside the operator's network: allow_private = ["10.20.0.0/16"]. The operator's
    # own ``urls`` are its trusted config and not held to it.
    allow_private: list[str] = []

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            self.urls = [self.urls]
        try:
            netguard.networks(self.allow_private)
        except ValueError as e:
            raise ValueError(f"allow_private: {e}") from None
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"urls: {u!r} is not an http(s) URL")
        self.urls = list(dict.fromkeys(self.urls))
        check_events("events", self.events)
        for u, names in self.url_events.items():
            if u not in self.urls:
                raise ValueError(f"url_events: {u!r} is not one of urls")
            check_events(f"url_events {u!r}", names)

    def __repr__(self) -> str:  # never print the secret
        return f"WebhookSettings(urls={self.urls!r}, events={self.events!r})"

    @property
    def url_list(self) -> list[str]:
        return [self.urls] if isinstance(self.urls, str) else list(self.urls)


class ListenerLimits(Section):
    """What one SMTP listener allows a peer (both [submission] and [intake])."""

    timeout: PosFloat = 300.0  # each complete command line (RFC 5321 4.5.3.2: 5 min)
    data_timeout: PosFloat = 180.0  # between DATA/BDAT blocks (RFC 5321 4.5.3.2.5: 3 min)
    # A message's content (DATA, or a transaction's BDAT chunks) must arrive within
    # data_timeout + its bytes / data_min_rate of its first block (Postfix 3.7's
    # smtpd_min_data_rate): a byte dripped every few seconds is cut after ~3 min,
    # not held to max_session. 0: no floor (only data_timeout between blocks).
    data_min_rate: NonNegFloat = 500.0  # bytes a second
    max_session: PosFloat = 3600.0  # a whole connection, whatever it does
    max_connections: PosInt = 200  # open at once on this listener
    max_connections_per_ip: PosInt = 10
    max_commands: PosInt = 1000  # replies per connection (commands, pipelined or not)
    auth_failures_per_ip: PosInt = 10  # then AUTH answers 454 until the window has passed
    auth_failures_per_user: PosInt = 5
    auth_window: PosFloat = 900.0
    auth_backoff_max: PosFloat = 4.0  # seconds a failed AUTH waits for its answer, at most
    # Message content held in memory by all of this listener's sessions at once
    # (received, not yet spooled or parsed): the message that would take it over is
    # answered 452 4.3.1 (a MAIL FROM whose SIZE= would, at once) and sent again
    # later, as is one that takes a peer address past a quarter of it (at least
    # max_size); at least max_size. Without it 200 sessions x max_size was the bound.
    max_held_bytes: PosInt = 256 << 20

    def _check_held(self, max_size: int) -> None:
        if self.max_held_bytes < max_size:
            raise ValueError(
                f"max_held_bytes ({self.max_held_bytes}) is below max_size ({max_size}):"
                " no message of the largest size could be taken"
            )


def _listens(v: str | list[str]) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not items:
        raise ValueError("listen must be 'HOST:PORT' or a list of them")
    for it in items:
        _, sep, port = it.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen {it!r}: expected HOST:PORT")
    return items


def listen_pairs(v: str | list[str]) -> list[tuple[str, int]]:
    out = []
    for it in _listens(v):
        host, _, port = it.rpartition(":")
        out.append((host.strip("[]") or "0.0.0.0", int(port)))
    return out


# What fastsend.serve.listeners.hash_password writes: pbkdf2_sha256$ITERATIONS$SALT$HASH.
_PASSWORD_HASH = re.compile(r"pbkdf2_sha256\$[1-9][0-9]{3,8}\$[A-Za-z0-9+/]+=*\$[A-Za-z0-9+/]{43}=")


class SubmissionSettings(ListenerLimits):
    """[submission]: SMTP submission with AUTH (tenants' passwords in [submission.users])."""

    listen: str | list[str] = []  # empty: no submission listener
    # Implicit TLS (RFC 8314 3.3, "submissions", port 465): TLS from the first byte,
    # as many applications and mail clients are set up to use; the rest as on listen.
    listen_tls: str | list[str] = []
    tls_cert: str = ""
    tls_key: str = ""
    hostname: str = "localhost"
    # As the HTTP API's body limit: a message spooled base64-encoded must still
    # cross a worker ring (32 MB) in one record, else it would bounce after the 250.
    max_size: PosInt = 16 * 1024 * 1024
    max_spooled_bytes: PosInt = 256 << 20  # message size x recipients, per message
    users: dict[str, str] = {}  # tenant = password hash (fastsend apikey hash-password)
    # A message that bounces or expires gets its envelope sender a non-delivery
    # notice (RFC 3464 DSN, fastsend.serve.dsn), as RFC 5321 6.1 has a server that
    # said 250 do; false: events and webhooks only.
    dsn: bool = True
    # A recipient whose RCPT TO asked NOTIFY=DELAY and whose message is still being
    # retried this many seconds after it came gets one delay notice (RFC 3464
    # "delayed"; Postfix's delay_warning_time, 4 h as it is commonly set); 0: none.
    delay_warning: NonNegFloat = 4 * 3600.0

    def __post_init__(self) -> None:
        self._check_held(self.max_size)
        if self.listen or self.listen_tls:
            for v in (self.listen, self.listen_tls):
                if v:
                    _listens(v)
            if not (self.tls_cert and self.tls_key):
                raise ValueError("needs tls_cert and tls_key (AUTH only under TLS)")
        for user, stored in self.users.items():
            # A password written as it is (or a hash cut short) never matched: that
            # user's AUTH failed for ever, said by nothing but 535, and the password
            # sat in the config file in clear.
            if not _PASSWORD_HASH.fullmatch(stored):
                raise ValueError(
                    f"users: {user!r} is not a password hash: put the line `fastsend apikey"
                    f" hash-password --tenant {user}` prints here (never the password itself)"
                )


class IntakeSettings(ListenerLimits):
    """[intake]: the SMTP listener for bounces (VERP) and feedback reports."""

    listen: str | list[str] = []  # empty: no intake listener
    verp_domain: str = ""
    fbl_address: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    hostname: str = "localhost"
    max_size: PosInt = 10 * 1024 * 1024
    verp_prefix: str = "b"
    parse_max_bytes: PosInt = 1 << 20  # of each report, parsed (fastsend.serve.parsepool)
    parse_cpu_seconds: PosFloat = 2.0
    max_held_bytes: PosInt = 64 << 20  # (a report is parsed from its first parse_max_bytes)

    def __post_init__(self) -> None:
        self._check_held(self.max_size)
        # A-labels, as campaigns' VERP return paths and RCPT TO carry them
        self.verp_domain = norm_domain(self.verp_domain)
        if "@" in self.fbl_address:
            local, _, domain = self.fbl_address.rpartition("@")
            self.fbl_address = f"{local}@{norm_domain(domain)}"
        self.fbl_address = self.fbl_address.lower()
        if self.listen:
            _listens(self.listen)
            if not self.verp_domain and not self.fbl_address:
                raise ValueError("needs verp_domain and/or fbl_address")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("give both tls_cert and tls_key")


class ProxySettings(Section):
    """[proxy]: load balancers trusted to send PROXY protocol headers."""

    trusted: list[str] = []  # addresses or networks
    timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0

    def __post_init__(self) -> None:
        for x in self.trusted:
            try:
                ipaddress.ip_network(x.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted: {x!r} is not an address or network") from None

    @property
    def networks(self) -> list[Network]:
        return [ipaddress.ip_network(x.strip(), strict=False) for x in self.trusted]


class DashboardSettings(Section):
    """[dashboard]: tenants whose keys see operational, all-tenant data."""

    admin_tenants: list[str] = []


class TrackingSettings(Section):
    """[tracking]: link and open tracking."""

    secret: str = ""  # "" = <spool>/secret.key (or the cluster's shared one)
    link_ttl_days: PosFloat | None = None  # tracking links expire after this
    # Opens/clicks one link (one recipient's pixel or link) records an hour, across
    # every node of a shared spool; more are answered (pixel, redirect), not
    # recorded: a replayed link cannot fill the event log, index and webhooks. 0: all.
    link_events_per_hour: NonNegInt = 20
    # Opens/clicks kept in memory while the event log cannot be written (a full
    # disk), by count and by the bytes of their lines; more are dropped, counted
    # (/metrics fastsend_tracking_events_dropped_total): the endpoint never waits.
    held_events: PosInt = 100_000
    held_bytes: PosInt = 32 << 20

    def __post_init__(self) -> None:
        # Links carry an HMAC of this: a short one is guessed offline from one link
        # (then any link, unsubscribe and redirect, is forged). As [webhooks] secret.
        if self.secret and len(self.secret) < 16:
            raise ValueError("secret: 16+ characters (or none: <spool>/secret.key is made)")

    def __repr__(self) -> str:  # never print the secret
        return f"TrackingSettings(link_ttl_days={self.link_ttl_days!r})"


# SNS's regional hosts (sns.us-east-1.amazonaws.com, sns.cn-north-1.amazonaws.com.cn,
# sns.us-gov-west-1...): a region's name, not any label. "sns\.[a-z0-9-]+\." let
# in S3's endpoints, where a bucket named "sns" is anyone's:
# https://sns.s3-ap-southeast-2.amazonaws.com/ serves its owner's certificate.
DEFAULT_SNS_HOSTS = (r"sns\.[a-z]{2}(-[a-z]+)+-\d{1,2}\.amazonaws\.com(\.cn)?",)


class ProviderEventSettings(Section):
    """[provider_events]: SES (via SNS), SendGrid and Mailgun event webhooks."""

    sns_cert_hosts: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_SNS_HOSTS))  # regexes, full match on the host
    sns_topics: list[str] = []  # allowed TopicArns (empty: none -> SES endpoint off)
    sns_ca_file: str = ""  # trust store for fetching certificates ("" = the system's)
    sendgrid_public_key: str = ""  # base64 DER (SendGrid's "verification key"); public
    mailgun_signing_key_file: str = ""  # 0600 file: signing_key=...
    max_age: PosFloat = 600.0

    def __post_init__(self) -> None:
        for h in self.sns_cert_hosts:
            try:
                re.compile(h)
            except re.error as e:
                raise ValueError(f"sns_cert_hosts {h!r}: {e}") from None


__all__ = [
    "ApiSettings",
    "DashboardSettings",
    "IntakeSettings",
    "ListenerLimits",
    "NonNegFloat",
    "ProviderEventSettings",
    "ProxySettings",
    "SubmissionSettings",
    "TrackingSettings",
    "WebhookSettings",
    "listen_pairs",
]
