"""SMTP listeners of ``fastsend serve``: authenticated submission, bounce and FBL intake.

NAME
    fastsend.serve.listeners -- start_listeners(ctx), hash_password, process_report.

CONFIG
    [submission]
    listen = "0.0.0.0:587"            # or a list of HOST:PORT
    tls_cert = "/etc/fastsend/smtp.crt"; tls_key = "/etc/fastsend/smtp.key"   # required
    hostname = "smtp.example.com"; max_size = 26214400
    [submission.users]               # optional: tenant = hash_password("...") output
    acme = "pbkdf2_sha256$200000$<salt b64>$<hash b64>"

    [intake]
    listen = "0.0.0.0:25"
    verp_domain = "bounces.example.com"   # any local part: VERP return paths
    fbl_address = "fbl@example.com"       # feedback-loop (ARF) reports
    hostname = "mx.example.com"; max_size = 10485760
    tls_cert/tls_key                       # optional: offer STARTTLS

DESCRIPTION
    Both listeners are ``asyncio.Protocol`` connections around the sans-I/O
    :class:`fastsend.smtp.server.ServerProtocol`, as the test sink is: the
    foundation's server already does STARTTLS (session reset, no plaintext
    carried over), AUTH PLAIN/LOGIN, PIPELINING, BDAT and refuses SMTP
    smuggling, so aiosmtpd would add a second SMTP stack and nothing else.

    Submission: STARTTLS, then AUTH (offered only under TLS and required
    before MAIL). The user name is the tenant; the password is one of the
    tenant's API keys (``fs_...``, checked against the key store of
    :mod:`fastsend.serve.auth`) or matches the tenant's entry in
    ``[submission.users]`` (PBKDF2-SHA256, checked off the event loop). Three
    failed attempts close the connection. Each accepted message is spooled
    with ``ctx.inject`` into the tenant's transactional campaign, one row per
    recipient with vars ``{"raw": base64 MIME, "mail_from": ...}``; the 250
    (naming the spool ids) is sent only after inject returned, i.e. once the
    rows are durable. A spool error answers 451 and keeps nothing half done.

    Intake: accepts RCPT only for ``@verp_domain`` and ``fbl_address``.
    Each message is parsed with :func:`fastsend.bounce.parse_bounce`; for each
    record the original message is found (VERP id from the record or the
    envelope recipient, else a Message-ID ``<id@...>`` or X-Fastsend-Id whose
    spool row has the same recipient), then "bounced" (reason, hard, status,
    code, text), "complained" or "unsubscribed" is emitted and the suppression
    list is updated with ``suppress_from`` (hard bounces and complaints) in the
    message's tenant. A report that names no message of ours, or whose id does
    not verify, is recorded (``"verified": false``, tenant ``default``) but
    suppresses nothing: anyone can send the intake a forged bounce. ARF reports of
    type auth-failure or not-spam are recorded as "feedback" and suppress
    nothing. Delivery
    notices and auto-replies are dropped. Reports are always answered 250:
    refusing a bounce only makes another bounce.

DELIBERATELY NOT HERE
    No relaying (intake never forwards), no sender-domain policy per tenant,
    no Received header, no spool state changes for asynchronous bounces (the
    event stream carries them).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastsend import msgid
from fastsend.bounce import BounceRecord, parse_bounce
from fastsend.delivery.signing import raw_from_domains
from fastsend.message import verp
from fastsend.message.headers import HeaderError, encode_domain
from fastsend.serve.proxyproto import ProxySettings, wrap_factory
from fastsend.smtp.server import (
    AuthRequest,
    DataStart,
    Hello,
    MailFrom,
    Message,
    RcptTo,
    ServerConfig,
    StartTLS,
    _NeedData,
)
from fastsend.smtp.server_conn import ServerConnection
from fastsend.suppression import (
    DEFAULT_TENANT,
    SOURCE_COMPLAINT,
    SOURCE_DSN,
    SOURCE_UNSUBSCRIBE,
    SuppressionError,
    suppress_from,
)

__all__ = [
    "IntakeConfig",
    "SubmissionConfig",
    "hash_password",
    "process_report",
    "start_listeners",
    "verify_password",
]

log = logging.getLogger("fastsend.listeners")
MAX_AUTH_FAILURES = 3
NOT_COMPLAINTS = frozenset({"auth-failure", "not-spam"})  # ARF types that are no complaint
PBKDF2_ITERATIONS = 200_000


# ---------------------------------------------------------------- passwords
def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>`` for [submission.users]."""
    salt = os.urandom(16)
    dk = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"pbkdf2_sha256${iterations}${b64(salt).decode()}${b64(dk).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    try:
        algo, iters, salt, want = stored.split("$")
        if algo != "pbkdf2_sha256":
            return False
        dk = hashlib.pbkdf2_hmac(
            "sha256", password.encode("utf-8"), base64.b64decode(salt), int(iters)
        )
        return hmac.compare_digest(dk, base64.b64decode(want))
    except (ValueError, TypeError):
        return False


# ---------------------------------------------------------------- config
def _listen(value: Any, where: str) -> list[tuple[str, int]]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"[{where}] listen must be 'HOST:PORT' or a list of them")
    out = []
    for it in items:
        host, sep, port = str(it).rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"[{where}] listen {it!r}: expected HOST:PORT")
        out.append((host.strip("[]") or "0.0.0.0", int(port)))
    return out


def _ssl_context(cert: str | None, key: str | None, where: str) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError(f"[{where}] give both tls_cert and tls_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _table(raw: dict[str, Any], name: str, known: set[str]) -> dict[str, Any] | None:
    t = raw.get(name)
    if t is None:
        return None
    if not isinstance(t, dict):
        raise ValueError(f"[{name}] must be a table")
    bad = set(t) - known
    if bad:
        raise ValueError(f"unknown [{name}] keys: {', '.join(sorted(bad))}")
    return t


SUBMISSION_KEYS = {"listen", "tls_cert", "tls_key", "hostname", "max_size", "users"}


@dataclass
class SubmissionConfig:
    listen: list[tuple[str, int]]
    ssl: ssl.SSLContext
    hostname: str = "localhost"
    # As the HTTP API's body limit: a message spooled base64-encoded must still
    # cross a worker ring (32 MB) in one record, else it would bounce after the 250.
    max_size: int = 16 * 1024 * 1024
    users: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_raw(cls, raw: dict[str, Any], *, tls: bool = True) -> SubmissionConfig | None:
        t = _table(raw, "submission", SUBMISSION_KEYS)
        if t is None or "listen" not in t:
            return None
        ctx = _ssl_context(t.get("tls_cert"), t.get("tls_key"), "submission") if tls else None
        if ctx is None and tls:
            raise ValueError("[submission] needs tls_cert and tls_key (AUTH only under TLS)")
        users = t.get("users", {})
        if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
            raise ValueError("[submission.users] must map tenant = password hash")
        return cls(
            _listen(t["listen"], "submission"),
            ctx,  # type: ignore[arg-type]
            str(t.get("hostname", "localhost")),
            int(t.get("max_size", cls.max_size)),
            dict(users),
        )

    @classmethod
    def users_from_raw(cls, raw: dict[str, Any]) -> SubmissionConfig | None:
        """The table without loading TLS files (SIGHUP keeps the running listener's)."""
        return cls.from_raw(raw, tls=False)


@dataclass
class IntakeConfig:
    listen: list[tuple[str, int]]
    verp_domain: str = ""
    fbl_address: str = ""
    ssl: ssl.SSLContext | None = None
    hostname: str = "localhost"
    max_size: int = 10 * 1024 * 1024
    verp_prefix: str = "b"

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> IntakeConfig | None:
        known = {"listen", "verp_domain", "fbl_address", "tls_cert", "tls_key", "hostname"}
        known |= {"max_size", "verp_prefix"}
        t = _table(raw, "intake", known)
        if t is None or "listen" not in t:
            return None
        if not t.get("verp_domain") and not t.get("fbl_address"):
            raise ValueError("[intake] needs verp_domain and/or fbl_address")
        return cls(
            _listen(t["listen"], "intake"),
            str(t.get("verp_domain", "")).lower().rstrip("."),
            str(t.get("fbl_address", "")).lower(),
            _ssl_context(t.get("tls_cert"), t.get("tls_key"), "intake"),
            str(t.get("hostname", "localhost")),
            int(t.get("max_size", cls.max_size)),
            str(t.get("verp_prefix", "b")),
        )


# ---------------------------------------------------------------- policies
class _Policy:
    """What a listener decides; the connection class does the SMTP plumbing."""

    server_config: ServerConfig
    ssl: ssl.SSLContext | None = None

    def rcpt(self, conn: _Connection, address: str) -> tuple[int, str, str] | None:
        return None  # None: accept

    def message(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        raise NotImplementedError

    async def authenticate(self, username: str, password: str) -> str | None:
        return None


class _Submission(_Policy):
    def __init__(self, ctx: Any, cfg: SubmissionConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.ssl = cfg.ssl
        self.server_config = ServerConfig(
            hostname=cfg.hostname,
            banner="ESMTP fastsend submission",
            max_message_size=cfg.max_size,
            starttls=True,
            auth_mechanisms=("PLAIN", "LOGIN"),
            auth_requires_tls=True,
            auth_required=True,
        )
        self._keys: Any = None
        try:
            from fastsend.serve.auth import KeyStore

            opener = getattr(ctx, "key_store", None)
            self._keys = opener() if opener else KeyStore.for_spool(ctx.config.spool_dir)
        except ImportError:  # pragma: no cover - serve.auth ships with serve
            pass

    async def authenticate(self, username: str, password: str) -> str | None:
        if self._keys is not None and password.startswith("fs_"):
            got = self._keys.verify(password)
            return username if got is not None and got[1] == username else None
        stored = self.cfg.users.get(username)
        if stored is None:
            return None
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, verify_password, password, stored)
        return username if ok else None

    def still_valid(self, conn: _Connection) -> bool:
        """Whether the session's credential still holds: a key revoked (by the CLI, seen
        within KeyStore.CACHE_TTL) or a user removed or changed by SIGHUP ends it."""
        cred = conn.credential
        if cred is None or conn.tenant is None:
            return False
        password, stored = cred
        if self._keys is not None and password.startswith("fs_"):
            got = self._keys.verify(password)
            return got is not None and got[1] == conn.tenant
        return self.cfg.users.get(conn.tenant) == stored

    def reload(self, cfg: SubmissionConfig) -> None:
        """SIGHUP: new [submission.users] (and sizes); listen and TLS stay as started."""
        cfg.listen, cfg.ssl = self.cfg.listen, self.cfg.ssl
        self.cfg = cfg

    def rcpt(self, conn: _Connection, address: str) -> tuple[int, str, str] | None:
        try:
            encode_domain(address.rpartition("@")[2])
        except HeaderError:
            return 553, "5.1.3", "Bad recipient domain"
        return None

    def message(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        tenant = conn.tenant
        if tenant is None:  # the protocol requires AUTH before MAIL; belt and braces
            return 530, "5.7.0", "Authentication required"
        if not self.still_valid(conn):
            conn.close_after_reply = True
            return 535, "5.7.8", "Authentication credentials no longer valid"
        tenants = self.ctx.config.tenants
        if tenants is not None and tenants.configured:
            domains = raw_from_domains(ev.data)
            if not domains:
                return 550, "5.7.1", "Message has no From address"
            for d in [*domains, ev.mail_from.rpartition("@")[2].lower()]:
                if d and not tenants.allows(tenant, d):
                    return 550, "5.7.1", f"From domain {d} is not one of your sending domains"
        vars_ = orjson.dumps(
            {"raw": base64.b64encode(ev.data).decode("ascii"), "mail_from": ev.mail_from}
        )
        rows = [(r, encode_domain(r.rpartition("@")[2]).lower(), vars_) for r in ev.recipients]
        try:
            ids = self.ctx.inject(self.ctx.tenant_campaign(tenant), rows)
        except Exception:
            log.exception("submission: spooling failed")
            return 451, "4.3.0", "Temporary failure, try again later"
        return 250, "2.0.0", f"Ok: queued as {ids[0]} ({len(ids)} recipient(s))"


class _Intake(_Policy):
    def __init__(self, ctx: Any, cfg: IntakeConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.ssl = cfg.ssl
        self.server_config = ServerConfig(
            hostname=cfg.hostname,
            banner="ESMTP fastsend intake",
            max_message_size=cfg.max_size,
            starttls=cfg.ssl is not None,
            reject_bare_newlines=False,  # never relayed, so no smuggling risk downstream
        )

    def rcpt(self, conn: _Connection, address: str) -> tuple[int, str, str] | None:
        a = address.lower()
        if (self.cfg.fbl_address and a == self.cfg.fbl_address) or (
            self.cfg.verp_domain and a.rpartition("@")[2].rstrip(".") == self.cfg.verp_domain
        ):
            return None
        return 550, "5.7.1", "Relay access denied"

    def message(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        try:
            evs = process_report(self.ctx, ev.data, ev.recipients, self.cfg.verp_prefix)
        except Exception:  # a parser bug must not make the sender retry forever
            log.exception("intake: report not processed")
            evs = []
        return 250, "2.0.0", f"Ok: {len(evs)} event(s)"


# ---------------------------------------------------------------- reports
def _owner(ctx: Any, mid: int) -> tuple[int, str, str] | None:
    row = ctx.spool.owner(mid)
    if row is None:
        return None
    campaign = row[0]
    try:
        tenant = ctx.campaign_tenant(campaign)
    except (KeyError, AttributeError):
        info = ctx.spool.get_campaign(campaign)
        tenant = info.tenant if info is not None else DEFAULT_TENANT
    return campaign, str(row[1]), tenant


def _source(event: str) -> str:
    """The suppression source of an intake event."""
    if event == "unsubscribed":
        return SOURCE_UNSUBSCRIBE
    return SOURCE_COMPLAINT if event == "complained" else SOURCE_DSN


def _message_id_local(text: str | None) -> str:
    return text.strip().strip("<>").partition("@")[0] if text else ""


def find_original(
    ctx: Any, rec: BounceRecord, envelope_ids: list[str]
) -> tuple[int, int, str, str] | None:
    """(message id, campaign, rcpt, tenant) of the message a record reports, if ours."""
    # Ids on the wire carry a MAC (fastsend.msgid): a forged bounce cannot name a message.
    for vid in [rec.verp_id, *envelope_ids]:
        row = msgid.parse(vid, ctx.secret)
        if row is not None:
            got = _owner(ctx, row)
            if got is not None:
                return row, *got
    local = _message_id_local(rec.original_message_id)
    mid = msgid.parse(local, ctx.secret)
    if mid is not None:
        got = _owner(ctx, mid)
        # A Message-ID is only a hint (other senders use digits too): the recipient must match.
        if got is not None and (not rec.recipient or rec.recipient.lower() == got[1].lower()):
            return mid, *got
        return None
    first = msgid.parse_group(local, ctx.secret)
    if first is not None and rec.recipient:
        # A message shared by several recipients carries its first row's id: the
        # report is about the recipient it names, if that is one of the campaign's
        # (a report naming no recipient names no one: never the first row's).
        got = _owner(ctx, first)
        if got is None:
            return None
        row = ctx.spool.sibling(got[0], rec.recipient, first)
        if row is not None:
            return row[0], got[0], row[1], got[2]
    return None


def process_report(
    ctx: Any, data: bytes, envelope_rcpts: list[str], verp_prefix: str = "b"
) -> list[dict[str, Any]]:
    """Parse one bounce/ARF message; emit its events, update suppression; return the events."""
    dmarc = getattr(ctx, "dmarc", None)  # issue 14: DMARC aggregate reports (rua) come here too
    if dmarc is not None:
        from fastsend.analytics.dmarc import ingest_mail

        got = ingest_mail(dmarc, data)
        if got is not None:
            for report_ev in got:
                ctx.emit(report_ev)
            return got
    envelope_ids = []
    for r in envelope_rcpts:
        try:
            envelope_ids.append(verp.decode(r, verp_prefix))
        except verp.VerpError:
            pass
    out: list[dict[str, Any]] = []
    now = time.time()
    for rec in parse_bounce(data):
        if rec.reason in ("delivered", "vacation"):
            continue
        found = find_original(ctx, rec, envelope_ids)
        if found is not None:
            mid, campaign, rcpt, tenant = found
            ev: dict[str, Any] = {"id": mid, "campaign": campaign, "rcpt": rcpt, "tenant": tenant}
        else:
            ev = {"id": None, "campaign": None, "rcpt": rec.recipient, "tenant": DEFAULT_TENANT}
        ev["time"] = now
        # Only a report whose VERP id or Message-ID verifies (fastsend.msgid's MAC) names a
        # message, a tenant and a recipient we sent to; anything else is anyone's forgery
        # and changes no suppression list (it is still recorded as an event).
        suppress = found is not None
        if found is None:
            ev["verified"] = False
        if rec.reason == "feedback":
            ftype = (rec.feedback_type or "abuse").lower()
            unsub = ftype in ("opt-out", "unsubscribe")
            ev["event"] = "unsubscribed" if unsub else "complained"
            ev["feedback_type"] = ftype
            if unsub:
                ev["method"] = "report"
            elif ftype in NOT_COMPLAINTS:
                ev["event"] = "feedback"  # a DMARC failure report or "not spam": no suppression
                suppress = False
        else:
            ev["event"] = "bounced"
            ev.update(
                reason=rec.reason,
                hard=rec.hard,
                status=rec.status,
                code=rec.reply_code,
                text=rec.diagnostic[:500],
                remote_mta=rec.remote_mta,
                source="async",
            )
        entry = None
        if ev["rcpt"] and suppress:
            try:
                entry = suppress_from(
                    ctx.suppression, ev["rcpt"], rec, tenant=ev["tenant"],
                    source=_source(ev["event"]), message=ev["id"],
                )  # fmt: skip
            except SuppressionError:
                entry = None
        ev["suppressed"] = entry is not None
        ctx.emit(ev)
        out.append(ev)
    return out


# ---------------------------------------------------------------- the connection
class _Connection(ServerConnection):
    """One SMTP session: feeds the protocol, answers its events through the policy."""

    def __init__(self, policy: _Policy) -> None:
        super().__init__(policy.server_config, policy.ssl)
        self.policy = policy
        self.tenant: str | None = None
        self.credential: tuple[str, str | None] | None = None  # (password, stored hash)
        self.close_after_reply = False
        self.auth_failures = 0
        self._task: asyncio.Future[None] | None = None
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # The client's address (the PROXY header's, behind a trusted balancer).
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) and peer else ""
        self.proto.start()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _process(self) -> None:
        proto, policy = self.proto, self.policy
        while self.transport is not None:
            ev = proto.next_event()
            if isinstance(ev, _NeedData):
                break
            t = type(ev)
            if t is RcptTo:
                assert isinstance(ev, RcptTo)
                bad = policy.rcpt(self, ev.address)
                if bad is None:
                    proto.accept()
                else:
                    proto.reply(*bad)
            elif t is Message:
                assert isinstance(ev, Message)
                code, enh, text = policy.message(self, ev)
                proto.reply(421 if self.close_after_reply else code, enh, text)
            elif t is StartTLS:
                self._begin_tls()
                return
            elif t is AuthRequest:
                assert isinstance(ev, AuthRequest)
                self._waiting = True
                self._task = asyncio.ensure_future(self._auth(ev))
                break
            elif t in (Hello, MailFrom) or (t is DataStart and ev.needs_reply):
                proto.accept()
        self._flush()

    async def _auth(self, ev: AuthRequest) -> None:
        try:
            tenant = await self.policy.authenticate(ev.username, ev.password)
        except Exception:
            log.exception("authentication check failed")
            tenant = None
        if self.transport is None:
            return
        if tenant is not None:
            self.tenant = tenant
            stored = getattr(self.policy, "cfg", None)
            users = getattr(stored, "users", {})
            self.credential = (ev.password, users.get(tenant))
            self.proto.accept()
        else:
            self.auth_failures += 1
            log.warning("submission: authentication failed from %s", self.client or "?")
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.proto.reply(421, "4.7.0", "Too many failed authentications")
            else:
                self.proto.reply(535, "5.7.8", "Authentication credentials invalid")
        self._waiting = False
        self._flush()
        if not self.proto.closed:
            self._process()

    def _tls_started(self) -> None:
        self.tenant = None  # TLS resets the session: AUTH again
        self.credential = None


async def _serve(
    policy: _Policy, listen: list[tuple[str, int]], proxy: ProxySettings | None = None
) -> list[asyncio.AbstractServer]:
    """Listen on each address; behind a PROXY gate when [proxy] trusts a balancer."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    factory = wrap_factory(lambda: _Connection(policy), proxy)
    for host, port in listen:
        servers.append(await loop.create_server(factory, host, port, reuse_address=True))
    return servers


class Listeners(list[asyncio.AbstractServer]):
    """The listening servers, and what SIGHUP may change in them (:meth:`reload`)."""

    submission: _Submission | None = None

    def reload(self, raw: dict[str, Any]) -> None:
        """Re-read [submission.users] (ValueError for a bad table: nothing changes)."""
        sub = SubmissionConfig.users_from_raw(raw)
        if self.submission is not None and sub is not None:
            self.submission.reload(sub)


async def start_listeners(ctx: Any) -> Listeners:
    """Start the SMTP listeners the config names ([submission], [intake]); their servers."""
    raw = ctx.config.raw
    servers = Listeners()
    try:
        sub = SubmissionConfig.from_raw(raw)
        if sub is not None:
            servers.submission = _Submission(ctx, sub)
            servers += await _serve(servers.submission, sub.listen, ProxySettings.from_raw(raw))
        intake = IntakeConfig.from_raw(raw)
        if intake is not None:
            servers += await _serve(_Intake(ctx, intake), intake.listen)
    except BaseException:
        for s in servers:
            s.close()
        raise
    return servers
