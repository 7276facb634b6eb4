"""Transports as data: ``[transports.NAME]`` tables, route values, credentials.

A route value names one transport or several in failover order::

    [routes]
    "*"             = "ses:eu-west-1"            # shorthand: kind[:argument]
    "example.org"   = ["smtp", "backup-relay"]   # direct MX first, then a relay
    "campaign:spring-sale" = "sendgrid"          # by campaign name (or id)
    "tenant:acme"   = "mailgun:eu"               # by tenant
    "pool:transactional" = "ses-main"            # by source-IP pool
    "bulk.example"  = "127.0.0.1:2525"           # HOST:PORT, a static SMTP route (as before)

    [transports.backup-relay]
    kind = "relay"; host = "smtp.relay.example"; port = 587   # 465: implicit TLS
    max_connections = 4; rate = 50                            # across all workers
    credentials_file = "/etc/fastsend/relay.secret"           # 0600: username=..., password=...

Kinds: ``smtp`` (direct MX), ``relay`` (SMTP submission with AUTH), ``ses``
(SES v2 SendEmail, raw MIME), ``sendgrid`` (v3 mail/send), ``mailgun``
(messages.mime). Shorthand arguments: ``ses:REGION``, ``mailgun:us|eu`` (its
sending domain from MAILGUN_DOMAIN).

Credentials never come from the TOML file (keys such as ``password`` or
``api_key`` there are errors), never from a campaign, and are never logged
(``repr`` hides them). They come from ``credentials_file`` -- ``field=value``
lines, a file readable by its owner only (mode 0600 or stricter) -- or from the
environment: ``FASTSEND_<NAME>_<FIELD>`` (NAME upper-cased, non-alphanumerics
as ``_``) and then the provider's usual variable (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, SENDGRID_API_KEY, MAILGUN_API_KEY).

This module parses and validates (reading credentials); it opens no sockets.
The transports themselves are :mod:`fastsend.transports`.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Annotated, Any, Literal

import msgspec

from fastsend.config.base import (
    ConfigError,
    NonNegFloat,
    NonNegInt,
    Path,
    PosFloat,
    PosInt,
    Section,
    _struct,
    where,
)

KINDS = ("smtp", "relay", "ses", "sendgrid", "mailgun")
HTTP_KINDS = ("ses", "sendgrid", "mailgun")

# The secret fields of each kind, and the conventional environment variable of each.
SECRETS: dict[str, dict[str, str]] = {
    "relay": {"username": "", "password": ""},
    "ses": {
        "access_key_id": "AWS_ACCESS_KEY_ID",
        "secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "session_token": "AWS_SESSION_TOKEN",
    },
    "sendgrid": {"api_key": "SENDGRID_API_KEY"},
    "mailgun": {"api_key": "MAILGUN_API_KEY"},
}
OPTIONAL_SECRETS = {"session_token"}
# The most recipients a provider takes in one request (SES SendEmail: 50
# destinations; SendGrid: 1,000 personalizations; Mailgun: 1,000 ``to``).
PROVIDER_RECIPIENTS = {"ses": 50, "sendgrid": 1000, "mailgun": 1000}
FORBIDDEN = re.compile(r"pass|secret|api_key|apikey|token|access_key", re.I)
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


class TransportError(ConfigError):
    """A transport table or route value is invalid (the message names it)."""


class TransportTable(Section):
    """``[transports.NAME]`` as written (credentials are never keys here)."""

    kind: Literal["relay", "ses", "sendgrid", "mailgun"]
    host: str = ""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    endpoint: str = ""
    region: str = ""
    configuration_set: str = ""
    domain: str = ""
    tls: Literal["starttls", "implicit", "opportunistic", "off", ""] = ""
    auth_mechanism: str = ""
    auth_in_clear: bool = False
    ca_file: str = ""
    max_connections: PosInt = 4
    rate: NonNegFloat = 0.0
    timeout: PosFloat = 30.0
    answer_timeout: PosFloat = 600.0
    max_recipients: NonNegInt = 0
    credentials_file: str = ""

    @classmethod
    def config_decode(cls, value: Any, path: Path) -> TransportTable:
        if isinstance(value, dict):
            for k in value:
                if k not in cls.__struct_fields__ and FORBIDDEN.search(k):
                    raise TransportError(
                        f"{where(path)} {k}: secrets never go in the config file; use the"
                        " environment or a 0600 credentials_file"
                    )
        return _struct(value, cls, path)


class TransportSpec(msgspec.Struct):
    """One transport: its kind, where it sends, its limits and its secrets."""

    name: str
    kind: str
    # Where: relay host/port, or an HTTP API endpoint ("" = the provider's default).
    host: str = ""
    port: int = 0
    endpoint: str = ""
    region: str = ""  # ses: AWS region; mailgun: "us" or "eu"
    configuration_set: str = ""  # ses
    domain: str = ""  # mailgun: the sending domain (required: else MAILGUN_DOMAIN)
    # relay
    tls: str = "starttls"  # starttls (required) | implicit | opportunistic | off
    auth_mechanism: str = ""  # "" = the best offered
    # PLAIN/LOGIN (the password itself) in a session without TLS: refused
    # unless the operator says so here (a closed network); CRAM-MD5 needs no TLS
    auth_in_clear: bool = False
    ca_file: str = ""  # verify the relay against this CA bundle instead of the system's
    # limits, across all workers (divided among them)
    max_connections: int = 4  # relay: SMTP connections; http: requests in flight
    rate: float = 0.0  # messages (recipients) per second, 0 = unlimited (ses: its MaxSendRate)
    # HTTP: connecting and sending a request. Once it is sent the provider may
    # have the message (no provider API takes an idempotency key), so its
    # answer is waited for up to answer_timeout (RFC 5321 4.5.3.2.6 waits 10
    # minutes for the reply to the final dot for the same reason): giving up
    # sooner and sending again is a duplicate.
    timeout: float = 30.0
    answer_timeout: float = 600.0
    max_recipients: int = 0  # per request/transaction, 0 = the provider's limit
    secrets: dict[str, str] = msgspec.field(default_factory=dict)  # not in the repr

    def __repr__(self) -> str:
        shown = (f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__ if f != "secrets")
        return f"TransportSpec({', '.join(shown)})"

    @property
    def label(self) -> str:
        """How events name this transport (never a secret)."""
        if self.kind == "relay":
            return f"relay:{self.name}[{self.host}]:{self.port}"
        if self.kind == "ses":
            return f"ses:{self.region}"
        if self.kind == "mailgun":
            return f"mailgun:{self.region}"
        return self.kind if self.name == self.kind else f"{self.kind}:{self.name}"

    def recipients_limit(self) -> int:
        """Recipients a request or transaction carries: ``max_recipients``, at
        most the provider's own limit (a request over it is refused whole:
        SES "Too many recipients", and each of its recipients bounced)."""
        most = PROVIDER_RECIPIENTS.get(self.kind, 0)
        if not self.max_recipients:
            return most
        return min(self.max_recipients, most) if most else self.max_recipients


def env_name(name: str, fld: str) -> str:
    return "FASTSEND_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_" + fld.upper()


def read_credentials_file(path: str, where: str) -> dict[str, str]:
    """``field=value`` lines from a file only its owner can read (0600 or stricter)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TransportError(f"{where}: credentials_file {path!r}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TransportError(
            f"{where}: credentials_file {path!r} is readable by others"
            f" (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    if st.st_uid != os.getuid():
        raise TransportError(f"{where}: credentials_file {path!r} is not owned by this user")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            k, sep, v = line.partition("=")
            if not sep:
                raise TransportError(f"{where}: {path}:{n}: expected field=value")
            out[k.strip().lower()] = v.strip()
    return out


def _load_secrets(spec: TransportSpec, file: str, where: str) -> None:
    fields = SECRETS.get(spec.kind, {})
    from_file = read_credentials_file(file, where) if file else {}
    unknown = set(from_file) - set(fields)
    if unknown:
        raise TransportError(f"{where}: credentials_file has unknown fields {sorted(unknown)}")
    for fld, conventional in fields.items():
        v = from_file.get(fld) or os.environ.get(env_name(spec.name, fld), "")
        if not v and conventional:
            v = os.environ.get(conventional, "")
        if v:
            spec.secrets[fld] = v
        elif fld not in OPTIONAL_SECRETS:
            hint = env_name(spec.name, fld) + (f" or {conventional}" if conventional else "")
            raise TransportError(
                f"{where}: no {fld} (set {hint} in the environment, or use credentials_file)"
            )


def build_spec(name: str, t: TransportTable, base_dir: str) -> TransportSpec:
    """The transport ``t`` names, its secrets read (TransportError naming what is missing)."""
    where = f"[transports.{name}]"
    spec = TransportSpec(
        name=name, kind=t.kind, host=t.host, port=t.port, endpoint=t.endpoint,
        region=t.region, configuration_set=t.configuration_set, domain=t.domain,
        tls=t.tls or "starttls", auth_mechanism=t.auth_mechanism, ca_file=t.ca_file,
        auth_in_clear=t.auth_in_clear,
        max_connections=t.max_connections, rate=t.rate, timeout=t.timeout,
        answer_timeout=t.answer_timeout, max_recipients=t.max_recipients,
    )  # fmt: skip
    _check(spec, where, base_dir, explicit_tls=bool(t.tls))
    cf = t.credentials_file
    _load_secrets(spec, os.path.join(base_dir, cf) if cf else "", where)
    return spec


SENDGRID_EU = "https://api.eu.sendgrid.com"
_DOMAIN = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}\.?"
)


def _loopback(host: str) -> bool:
    """``host`` (an endpoint's) is this machine: localhost or a loopback address."""
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain"):
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_endpoint(endpoint: str, where: str) -> None:
    """``endpoint`` is ``http(s)://HOST[:PORT]`` and nothing more. A user and
    password in it (``https://api:KEY@host``) are refused, and the refusal
    never quotes it: credentials come only from the environment or a 0600
    credentials_file. Before, it was taken (``[^/\\s]+`` let ``@``, ``?`` and
    ``#`` by): the error of a plain-http one quoted the password, aiohttp
    refused every Mailgun request ("local error", deferred for ever) and SES
    signed for a host it did not send to."""
    import urllib.parse

    authority = endpoint.partition("://")[2].partition("/")[0]
    if "@" in authority:
        raise TransportError(
            f"{where} endpoint must not carry a user or password (user:password@):"
            " credentials come only from the environment or a 0600 credentials_file"
        )
    bad = TransportError(f"{where} endpoint must be http(s)://HOST[:PORT]")
    if not re.fullmatch(r"https?://[^/\s?#@\\]+", endpoint.rstrip("/")):
        raise bad
    try:
        u = urllib.parse.urlsplit(endpoint)
        port = u.port
    except ValueError:
        raise bad from None
    if not u.hostname or (port is not None and not 0 < port < 65536):
        raise bad


def _check(spec: TransportSpec, where: str, base_dir: str, explicit_tls: bool) -> None:
    if spec.kind == "relay":
        if not spec.host:
            raise TransportError(f"{where} a relay needs host")
        if "@" in spec.host or re.search(r"[\s/?#]", spec.host):
            # "user:password@relay": never quoted (credentials: the environment
            # or a 0600 credentials_file), and no host of that name exists.
            raise TransportError(
                f"{where} host must be a host name or address (no user:password@, no URL):"
                " credentials come only from the environment or a 0600 credentials_file"
            )
        spec.port = spec.port or 587
        if not 0 < spec.port < 65536:
            raise TransportError(f"{where} port out of range")
        if spec.port == 465 and not explicit_tls:
            spec.tls = "implicit"  # submissions (RFC 8314): TLS from the first byte
        if spec.tls not in ("starttls", "implicit", "opportunistic", "off"):
            raise TransportError(f"{where} tls must be starttls, implicit, opportunistic or off")
        spec.auth_mechanism = spec.auth_mechanism.upper()
        if spec.auth_mechanism not in ("", *AUTH_MECHANISMS):
            raise TransportError(f"{where} auth_mechanism must be one of {AUTH_MECHANISMS}")
        clear = spec.tls == "off" and spec.auth_mechanism in ("PLAIN", "LOGIN")
        if clear and not spec.auth_in_clear:
            raise TransportError(
                f'{where} tls = "off" with auth_mechanism = "{spec.auth_mechanism}" sends the'
                ' password in clear text: use TLS (tls = "starttls" or "implicit"),'
                ' auth_mechanism = "CRAM-MD5", or, on a network you trust, auth_in_clear = true'
            )
        if spec.ca_file:
            spec.ca_file = os.path.join(base_dir, spec.ca_file)
    elif spec.kind == "ses":
        if not _REGION.fullmatch(spec.region):
            raise TransportError(f"{where} region {spec.region!r} is not an AWS region")
    elif spec.kind == "mailgun":
        spec.region = spec.region or "us"
        if spec.region not in ("us", "eu"):
            raise TransportError(f"{where} region must be us or eu")
        # Mailgun sends as the domain in its URL (/v3/DOMAIN/messages.mime), one
        # added and verified in the account: no other domain stands for it. The
        # envelope sender's, taken before, is a VERP or bounce domain Mailgun
        # does not know ("Domain not found"): every message was deferred.
        spec.domain = spec.domain or os.environ.get("MAILGUN_DOMAIN", "")
        if not spec.domain:
            raise TransportError(
                f'{where} a mailgun transport needs domain = "mg.example.com" (the sending'
                " domain as added in Mailgun; or MAILGUN_DOMAIN in the environment)"
            )
        if not _DOMAIN.fullmatch(spec.domain):
            raise TransportError(f"{where} domain {spec.domain!r} is not a domain name")
    elif spec.kind == "sendgrid":
        # EU regional subusers are served at their own host (it was ignored:
        # the mail went to the global endpoint, which refuses their key).
        if spec.region not in ("", "global", "eu"):
            raise TransportError(f"{where} region must be global or eu")
        if spec.region == "eu" and not spec.endpoint:
            spec.endpoint = SENDGRID_EU
    if spec.endpoint:
        _check_endpoint(spec.endpoint, where)
    spec.endpoint = spec.endpoint.rstrip("/")
    if spec.endpoint.startswith("http://") and not spec.auth_in_clear:
        host = spec.endpoint[7:]
        host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
        if not _loopback(host):
            raise TransportError(
                f"{where} endpoint {spec.endpoint} is plain http: the API key would cross"
                " the network in clear text; use https, or, on a network you trust,"
                " auth_in_clear = true"
            )
    if spec.max_connections < 1:
        raise TransportError(f"{where} max_connections must be at least 1")
    if not spec.timeout > 0:
        raise TransportError(f"{where} timeout must be positive")


def shorthand(text: str, base_dir: str) -> TransportSpec | None:
    """``ses:REGION``, ``sendgrid``, ``mailgun[:REGION]`` as a transport with
    defaults (credentials from the environment); None if ``text`` is no kind."""
    kind, _, arg = text.partition(":")
    if kind not in HTTP_KINDS:
        return None
    region = ""
    if kind == "ses" or (kind == "mailgun" and arg):
        region = arg
    elif arg:
        raise TransportError(f"route {text!r}: sendgrid takes no argument")
    return build_spec(text, TransportTable(kind=kind, region=region), base_dir)  # type: ignore[arg-type]


def parse_route(
    value: Any, names: dict[str, TransportSpec], base_dir: str, where: str
) -> tuple[str, ...] | None:
    """The transport names of a route value (created for shorthands), or None
    when the value is a plain HOST:PORT static route."""
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = [x.strip() for x in value.split(",")]
    else:
        raise TransportError(f"{where} must be a string or a list of transport names")
    if not items or not all(isinstance(x, str) and x for x in items):
        raise TransportError(f"{where} names no transport")
    chain: list[str] = []
    for item in items:
        if item == "smtp" or item in names:
            chain.append(item)
            continue
        spec = shorthand(item, base_dir)
        if spec is None:
            if len(items) == 1 and isinstance(value, str):
                if ":" not in item and "." not in item:
                    # A typo of a transport's name (or a name never defined)
                    # became a static route to that "host", port 25: every
                    # message deferred, check-config said ok.
                    defined = ", ".join(sorted(names)) or "none"
                    raise TransportError(
                        f"{where}: {item!r} is no transport (defined: {defined}; else add"
                        f" [transports.{item}]) and no HOST:PORT (a one-label host name"
                        f" needs its port: '{item}:25')"
                    )
                return None  # HOST:PORT
            raise TransportError(f"{where}: {item!r} is no transport (define [transports.{item}])")
        names[item] = spec
        chain.append(item)
    if len(set(chain)) != len(chain):
        raise TransportError(f"{where} names a transport twice")
    return tuple(chain)


def build_transports(
    tables: dict[str, TransportTable], base_dir: str
) -> dict[str, TransportSpec]:
    out: dict[str, TransportSpec] = {}
    for name, t in tables.items():
        if name in KINDS or ":" in name or "," in name:
            raise TransportError(f"[transports.{name}]: a name cannot be a kind or hold ':' ','")
        out[name] = build_spec(name, t, base_dir)
    return out
