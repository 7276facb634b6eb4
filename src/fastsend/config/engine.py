"""The engine's own tables: [spool], [workers], [ips], [routes], [delivery],
[retry], [dns], [tls], [events]."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from fastsend.config.base import (
    ConfigError,
    NonNegFloat,
    NonNegInt,
    Port,
    PosFloat,
    PosInt,
    Section,
    Share,
    parse_nameserver,
    validate_helo,
    validate_ip,
)
from fastsend.config.tenants import norm_domain


@dataclass
class Route:
    """A static SMTP route (host, port), or -- with ``transports`` -- the names
    of transports in failover order (:mod:`fastsend.config.transports`)."""

    host: str
    port: int = 25
    transports: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, *, where: str) -> Route:
        """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` (port 25 when
        none is given); a host name in A-labels. A bare IPv6 address is refused:
        ``::1:2525`` could be either (and ``::1`` was read as host ``::``, port 1)."""
        t = text.strip()
        if t.startswith("["):
            host, sep, rest = t[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(f"{where}: route {text!r}: expected [ADDRESS] or [ADDRESS]:PORT")
            port = rest[1:] if rest else "25"
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:  # [mx.example]: a host name, as Postfix writes a relay
                if ":" in host:
                    raise ConfigError(
                        f"{where}: route {text!r}: {host!r} is not an IP address"
                    ) from None
                host = norm_domain(host)
        else:
            host, sep, port = t.rpartition(":")
            if not sep:
                host, port = t, "25"
            if ":" in host:
                raise ConfigError(
                    f"{where}: route {text!r}: an IPv6 address goes in brackets:"
                    " [ADDRESS] or [ADDRESS]:PORT"
                )
            host = norm_domain(host) if not host.isascii() else host
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
        if self.transports:
            return ", ".join(self.transports)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class SpoolSection(Section):
    dir: str = ""  # this node's local directory (default ./spool, or the URL's dir=)
    # A shared (Redis) spool of several nodes (docs/DEPLOY.md)
    url: str = ""
    # Bodies stored once (Spool.put_blob): kept this long after the last message
    # that needed one is final, swept this often by the supervisor; a body whose
    # accept died before its rows were recorded is checked after blob_orphan_grace_s.
    blob_retention_days: Annotated[float, msgspec.Meta(gt=0, le=3650)] = 7.0
    blob_sweep_interval_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 600.0
    blob_orphan_grace_s: Annotated[float, msgspec.Meta(ge=60, le=30 * 86400)] = 3600.0
    # Final messages (delivered, bounced, suppressed, expired, cancelled) are kept
    # this long after their last change (GET /v1/messages/ID, late bounces and
    # complaints matched to their message), then deleted by the supervisor (its
    # campaign's counts stay); 0 keeps them for ever (the spool only grows).
    final_retention_days: Annotated[float, msgspec.Meta(ge=0, le=36500)] = 30.0

    def __post_init__(self) -> None:
        if "://" in self.dir:  # it made a directory named 'redis:' and a local spool
            raise ValueError(
                f"dir is this node's local directory, not a URL ({self.dir!r}):"
                " a shared Redis spool goes in url = \"redis://...\""
            )
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must be redis://, rediss:// or unix://, not {self.url!r}")


class WorkersSection(Section):
    count: NonNegInt = 0  # 0: one per CPU core


class IpsSection(Section):
    source: list[str] = []
    helo: str = ""

    def __post_init__(self) -> None:
        self.source = [validate_ip(ip, "source") for ip in self.source]
        if self.helo:
            self.helo = validate_helo(self.helo, "helo")


# [delivery] window = 0 (the default): a worker's window is this many times what
# its connections to one site keep in flight, and never under WINDOW_MIN
# (Config.window_for).
WINDOW_PIPELINES = 3
WINDOW_MIN = 4000


class DeliveryConfig(Section):
    batch_size: PosInt = 200  # messages per ring record (supervisor -> worker)
    # Claimed-but-unanswered messages per worker (the active window: what a crash
    # may send twice). 0: sized per worker from what its connections keep in
    # flight (Config.window_for: 3 x max_connections x pipeline x its source
    # IPs, at least WINDOW_MIN).
    window: NonNegInt = 0
    max_connections: PosInt = 16  # per (source IP, site)
    max_messages_per_connection: NonNegInt = 1000  # 0: no limit
    recipients_per_transaction: PosInt = 50  # for identical (non-personalised) messages
    # Octets of one message at most, as sent (headers, body, attachments, DKIM):
    # a list row or API message whose values would make one larger is refused
    # when it is accepted (naming the variable), and a message found larger as
    # it is made fails 552 5.3.4, never sent for the receiver's SIZE to refuse
    # (Postfix's message_size_limit; Gmail takes 25 MB). 0: no limit.
    max_message_size: NonNegInt = 25 << 20
    # messages per pipelined group on one connection (a connection whose groups
    # are all delivered quickly takes up to 4x: delivery/pool.py, GROUP_GROW)
    pipeline: PosInt = 64
    tls: Literal["opportunistic", "required", "off"] = "opportunistic"
    idle_timeout: NonNegFloat = 5.0  # 0: QUIT as soon as nothing is waiting
    # Never 0 (refused when the config loads): as "no cap" it would hold a connection
    # on a receiver that never answers for ever; as a limit it timed every attempt
    # out at once (all mail deferred).
    connect_timeout: PosFloat = 30.0
    command_timeout: PosFloat = 300.0
    # An MX host's greeting is waited for this long (at most command_timeout)
    # while another host of the site is left to try; the last one tried gets
    # command_timeout (Postfix: smtp_connect_timeout, smtp_helo_timeout).
    next_mx_after: PosFloat = 30.0
    # Per site, in a worker: envelopes held ready (0: no bound but the window),
    # and the seconds of a shaped site's rate worth holding; the rest goes back
    # to the supervisor (queued again, no attempt counted) so that one slow site
    # cannot fill the window (KumoMTA's max_ready, Postfix's per-destination limits).
    max_ready: NonNegInt = 0
    ready_horizon: PosFloat = 10.0
    # MX answers that resolve to loopback/private/link-local/ULA addresses are refused
    # (fastsend.delivery.mx); static [routes] are not affected.
    allow_private_mx: bool = False
    # Check the suppression list again when mail is dispatched (one query per
    # claimed batch), not only when it is accepted. Off only to measure its cost.
    check_suppression: bool = True
    # A SIGTERM drain waits at most drain_limit s for open connections to finish
    # (a receiver that never answers would hold them for command_timeout), and at
    # most drain_outage s with the spool out of reach; then it stops, and what is
    # still in flight goes back to the queue. Keep drain_limit under the service
    # manager's stop timeout (deploy/fastsend.service: TimeoutStopSec=90).
    drain_limit: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    drain_outage: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class RetryConfig(Section):
    min_backoff: NonNegFloat = 300.0
    max_backoff: NonNegFloat = 4000.0
    max_age: NonNegFloat = 5 * 86400.0
    jitter: Share = 0.2


class DNSConfig(Section):
    nameservers: list[str] = []  # empty: the system's resolv.conf; ADDR, ADDR:PORT, [V6]:PORT
    timeout: PosFloat = 5.0
    mx_port: Port = 25  # the SMTP port of MX hosts (25; tests point it at a sink's port)

    def __post_init__(self) -> None:
        # Checked here, not at the first lookup: a name ("ns1.example") or a typo
        # was taken, and every message was then deferred "local error: ValueError".
        for ns in self.nameservers:
            try:
                parse_nameserver(ns)
            except ValueError as exc:
                raise ValueError(f"nameservers: {exc}") from None


class TLSSection(Section):
    """[tls]: the recipient domains' own TLS policies for delivery by MX
    (fastsend.delivery.mtasts): MTA-STS (RFC 8461) and TLS-RPT counting."""

    # Look up and honour each recipient domain's MTA-STS policy ("off": every
    # domain gets [delivery]/[shaping] tls only). Static routes to a host are
    # the operator's and never take a policy.
    mta_sts: Literal["on", "off"] = "on"
    # Per recipient domain (and its subdomains, as [routes] keys): "on" or "off",
    # overriding mta_sts for that domain.
    domains: dict[str, Literal["on", "off"]] = {}
    # PEM trust store for the policy's HTTPS fetch and for the MX certificates
    # checked under a policy ("": the system's; relative to the config file).
    ca_file: str = ""
    # One policy fetch (connect, TLS, answer) gives up after this many seconds;
    # the domain's mail then goes by its cached policy, or as if it had none.
    policy_timeout: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    # The HTTPS port of mta-sts.DOMAIN (443; tests point it at a local server).
    policy_port: Port = 443
    # DANE (RFC 7672, fastsend.delivery.dane): the MX hosts' TLSA records, used
    # only when the resolver says they are DNSSEC-authenticated (its AD bit).
    # "on" only with a trusted local validating resolver in [dns] nameservers
    # (unbound, Knot Resolver on 127.0.0.1), as Postfix's
    # smtp_dns_support_level = dnssec: its AD bit is believed.
    dane: Literal["on", "off"] = "off"
    # TLS-RPT aggregate reports (RFC 8460, fastsend.analytics.tlsrpt): "on":
    # serve sends each UTC day's report to every policy domain that asks for one
    # (its _smtp._tls TXT record) a few minutes after midnight; `fastsend
    # tls-report send` does it on demand either way. The sessions are counted
    # whenever MTA-STS or DANE is on.
    reports: Literal["on", "off"] = "off"
    # The reports' From address (its domain is the report's submitter; DKIM-signed
    # by [dkim] when it has a key for that domain). Needed to send any report.
    report_from: str = ""
    # The report's organization-name ("" = the submitter domain) and contact-info
    # ("" = report_from).
    report_organization: Annotated[str, msgspec.Meta(max_length=200)] = ""
    report_contact: Annotated[str, msgspec.Meta(max_length=200)] = ""
    # The port of the https rua destinations (0 = the URI's; tests point it at a local server).
    report_post_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class EventsSection(Section):
    log: str = ""  # "" = DIR/events.jsonl of the spool
