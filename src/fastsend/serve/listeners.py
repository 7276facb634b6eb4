"""SMTP listeners of ``fastsend serve``: authenticated submission, bounce and FBL intake.

NAME
    fastsend.serve.listeners -- start_listeners(ctx), hash_password, process_report.

CONFIG
    [submission]
    listen = "0.0.0.0:587"            # or a list of HOST:PORT
    listen_tls = "0.0.0.0:465"        # implicit TLS (RFC 8314 3.3), optional
    tls_cert = "/etc/fastsend/smtp.crt"; tls_key = "/etc/fastsend/smtp.key"   # required
    hostname = "smtp.example.com"; max_size = 26214400
    [submission.users]               # optional: tenant = hash_password("...") output
    acme = "pbkdf2_sha256$600000$<salt b64>$<hash b64>"

    # Both tables also take (defaults shown): timeout = 300 (per command line; a
    # TLS handshake: at most 60),
    # data_timeout = 180 (between DATA/BDAT blocks), data_min_rate = 500 (bytes/s:
    # a message's content arrives within data_timeout + bytes/rate), max_session = 3600,
    # max_connections = 200, max_connections_per_ip = 10, max_commands = 1000,
    # auth_failures_per_ip = 10, auth_failures_per_user = 5, auth_window = 900,
    # auth_backoff_max = 4, max_held_bytes = 268435456 (intake: 67108864; message
    # content all sessions hold at once, at least max_size).

    [intake]
    listen = "0.0.0.0:25"
    verp_domain = "bounces.example.com"   # any local part: VERP return paths
    fbl_address = "fbl@example.com"       # feedback-loop (ARF) reports
    hostname = "mx.example.com"; max_size = 10485760
    tls_cert/tls_key                       # optional: offer STARTTLS
    parse_max_bytes = 1048576; parse_cpu_seconds = 2.0   # per report, parsed off the loop

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
    ``[submission.users]`` (PBKDF2-SHA256 at 600,000 iterations, checked off
    the event loop; an unknown user costs the same work; an older, cheaper
    hash is re-made at today's cost on the next good login and kept in
    ``<spool>/passwords.json``). Three failed attempts close the connection;
    failures are throttled per peer IP and per user name (:class:`AuthThrottle`:
    an address that logged in as the user meets only its own failures, so a
    stranger cannot lock a tenant's application out); an AUTH PLAIN
    authorization identity other than the user fails (RFC 4616 2). A message
    with no From is refused (550), and one over [delivery] max_message_size as
    it will be relayed (re-encoded, with room for signing) is refused 552.
    A session whose key is revoked or whose user changes (SIGHUP) is refused
    at its next message.

    Every connection is under a :class:`Guard`: global and per-IP connection
    caps (421 at the greeting), a timeout per command line and per DATA
    block, a floor on the rate of a message's content (a byte dripped every few
    seconds is cut after ~data_timeout) and a session cap (a slowloris peer is closed with 421), a cap on
    commands per connection, and back-pressure (a peer that does not read its
    replies is not read either). Each accepted message is spooled
    with ``ctx.inject`` into the tenant's transactional campaign, one row per
    recipient with vars ``{"raw": base64 MIME, "mail_from": ...}``; the 250
    (naming the spool ids) is sent only after inject returned, i.e. once the
    rows are durable. A spool error answers 451 and keeps nothing half done.

    Intake: accepts RCPT only for ``@verp_domain`` and ``fbl_address``.
    Each message is parsed with :func:`fastsend.bounce.parse_bounce` (or, a
    DMARC aggregate report, unpacked and parsed by
    :func:`fastsend.analytics.dmarc.read_mail`) in a separate process with a
    size and CPU cap (:mod:`fastsend.serve.parsepool`), so no report can stall
    the loop; for each
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
    refusing a bounce only makes another bounce (only one arriving while the
    sessions hold max_held_bytes gets 452 4.3.1: sent again later). Only a
    report's first parse_max_bytes are kept (``ServerConfig.keep_bytes``).

    Each accepted message gets a Received field on top (RFC 5321 4.4;
    :meth:`_Submission.received`: ``from HELO (NAME [IP])``, NAME the client's
    forward-confirmed reverse DNS name or ``unknown``, :mod:`fastsend.serve.rdns`), spooled with it so it is under the DKIM
    signature; an internationalised domain after an ASCII local part is
    spooled in A-labels (:func:`a_labels`: no SMTPUTF8 needed); an address
    literal recipient must be a public address (netguard) unless [delivery]
    allow_private_mx.

DELIBERATELY NOT HERE
    No relaying (intake never forwards), no sender-domain policy per tenant,
    no spool state changes for asynchronous bounces (the event stream carries
    them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import email.utils
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from fastsend import msgid, netguard
from fastsend.address import literal
from fastsend.config import Config
from fastsend.config.serve import IntakeSettings, ListenerLimits, SubmissionSettings, listen_pairs
from fastsend.message import verp
from fastsend.message.headers import HeaderError, encode_domain
from fastsend.message.rawmime import (
    MAX_HEADER_OCTETS,
    RawMimeError,
    check_head,
    check_header_text,
    check_names,
    crlf_lines,
)
from fastsend.message.rawmime import prepare as prepare_raw
from fastsend.serve.api import OFF_LOOP_BYTES, off_loop
from fastsend.serve.context import CampaignQuotaExceeded
from fastsend.serve.eventindex import ONCE_PER_MESSAGE, already_told, first_telling
from fastsend.serve.parsepool import ParsePool, ParseUnavailable
from fastsend.serve.proxyproto import ProxySettings, wrap_factory
from fastsend.serve.rdns import ReverseNames
from fastsend.serve.senders import header_nul, sender_domains
from fastsend.serve.tenantcaps import TenantCapExceeded
from fastsend.smtp.server import _BDAT as _BDAT_MODE
from fastsend.smtp.server import _DATA as _DATA_MODE
from fastsend.smtp.server import _TLS_WAIT as _TLS_WAIT_MODE
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
    xtext_decode,
)
from fastsend.smtp.server_conn import ServerConnection
from fastsend.spool import storage_problem
from fastsend.suppression import (
    DEFAULT_TENANT,
    SOURCE_COMPLAINT,
    SOURCE_DSN,
    SOURCE_UNSUBSCRIBE,
    SuppressionError,
    suppress_from,
)
from fastsend.tenants import ascii_domain

if TYPE_CHECKING:
    from fastsend.bounce import BounceRecord

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
SHARED_ALONE = 10.0  # s a node counts AUTH failures alone after a shared count failed
# Octets a raw message may grow by in the worker besides re-encoding: a Date, a
# Message-ID and DKIM-Signature fields (rsa-4096: ~900 each).
SIGN_ROOM = 4096
# Octets our Received field can take at most (a 255-octet HELO and reverse name, an
# IPv6 literal, the TLS cipher, our host name, a 256-octet "for" path, the date).
TRACE_ROOM = 1536
RDNS_WAIT = 5.0  # s from a connection's start its client's reverse DNS name is waited for
KNOWN_FOR = 30 * 86400.0  # s an address that logged in as a user stays out of its lock-out
# Stress (Postfix's stress-adaptive behaviour): with STRESS_SHARE of max_connections
# open, a session idle between commands for STRESS_IDLE s is closed (421), not after
# the whole command timeout: idle peers cannot hold every slot against those sending.
STRESS_SHARE = 0.8
STRESS_IDLE = 10.0
FAILS_KEPT = 100_000  # AUTH failure counters kept (per IP, user, both); beyond: the stalest go
KNOWN_PER_USER = 64  # such addresses remembered per user (the latest)
NOT_COMPLAINTS = frozenset({"auth-failure", "not-spam"})  # ARF types that are no complaint
# RFC 3464 2.3.3 actions of a report that is no final failure of the recipient.
NOT_FINAL_ACTIONS = frozenset({"delayed", "delivered", "relayed", "expanded"})
PBKDF2_ITERATIONS = 600_000  # PBKDF2-HMAC-SHA256, OWASP 2023
# Password checks (PBKDF2, in threads) running at once on a listener, and waiting for
# one of those; an AUTH past both is answered 454 4.7.0 (RFC 4954 6: temporary) with
# nothing checked. Before, every AUTH of every address started its check at once:
# the throttle counts failures once they are answered, so a spray from many
# addresses (each within its own allowance) ran as many 600k-iteration checks as
# there were connections, every core and the loop's default thread pool taken.
AUTH_CHECKS = max(2, os.cpu_count() or 2)
AUTH_WAITING = 8 * AUTH_CHECKS
_PAD_SALT = b"fastsend-auth-pad"  # (the padding's own salt: its output is never used)


def _iterations(stored: str) -> int:
    try:
        return int(stored.split("$")[1])
    except (IndexError, ValueError):
        return 0


class PasswordUpgrades:
    """``<spool>/passwords.json``: hashes re-made at today's cost on a successful login,
    for [submission.users] entries of an older, cheaper cost. An upgrade applies while
    the config keeps the entry it was made from (a changed password in the config wins).
    File mode 0600; written atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, dict[str, str]] = {}
        try:
            with open(path, "rb") as f:
                got = orjson.loads(f.read())
            if isinstance(got, dict):
                self.data = got
        except (OSError, orjson.JSONDecodeError):
            pass

    @staticmethod
    def _tag(stored: str) -> str:
        return hashlib.sha256(stored.encode()).hexdigest()

    def current(self, user: str, stored: str) -> str:
        up = self.data.get(user)
        if isinstance(up, dict) and up.get("from") == self._tag(stored) and up.get("hash"):
            return str(up["hash"])
        return stored

    def save(self, user: str, stored: str, new: str) -> None:
        self.data[user] = {"from": self._tag(stored), "hash": new}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(self.data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError:
            log.exception("submission: cannot save an upgraded password hash")


# ---------------------------------------------------------------- passwords
def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>`` for [submission.users]."""
    salt = os.urandom(16)
    dk = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"pbkdf2_sha256${iterations}${b64(salt).decode()}${b64(dk).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    return _verify(password, stored)[0]


def _verify(password: str, stored: str) -> tuple[bool, int]:
    """:func:`verify_password`, and the PBKDF2 iterations it spent."""
    try:
        algo, iters, salt, want = stored.split("$")
        if algo != "pbkdf2_sha256":
            return False, 0
        raw_salt, n = base64.b64decode(salt), int(iters)
        if n <= 0:
            return False, 0
        dk = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), raw_salt, n)
        return hmac.compare_digest(dk, base64.b64decode(want)), n
    except (ValueError, TypeError):
        return False, 0


def check_password(password: str, stored: str | None, cost: int) -> bool:
    """``password`` against ``stored`` (None: no such user), with PBKDF2 work of at
    least ``cost`` iterations whatever the outcome: a user unknown, or one whose hash
    is of an older, cheaper cost, takes as long as any other (the time an AUTH takes
    does not tell which names exist, nor which hashes are cheap to attack)."""
    ok, spent = _verify(password, stored) if stored is not None else (False, 0)
    if spent < cost:
        hashlib.pbkdf2_hmac("sha256", password.encode("utf-8", "replace"), _PAD_SALT,
                            cost - spent)  # fmt: skip
    return ok


def auth_cost(users: dict[str, str]) -> int:
    """The PBKDF2 iterations every password check spends: today's cost, or the
    costliest configured hash's when one is dearer."""
    return max([PBKDF2_ITERATIONS, *(_iterations(v) for v in users.values())])


# ---------------------------------------------------------------- config
def _ssl_context(cert: str | None, key: str | None, where: str) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError(f"[{where}] give both tls_cert and tls_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


# What one listener allows a peer: the [submission]/[intake] keys of
# fastsend.config.serve.ListenerLimits (those sections are ListenerLimits).
Limits = ListenerLimits


_T = TypeVar("_T")


class Guard:
    """One listener's connections: caps (global, per peer IP) and a watchdog that ends
    sessions over their timeouts with 421 (a slowloris peer gains nothing)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.conns: set[_Connection] = set()
        self.per_ip: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None
        self.timed_out = 0
        self.refused = 0
        # Message content the sessions hold in memory now (limits.max_held_bytes),
        # and the messages answered 452 4.3.1 for want of room.
        self.held = 0
        self.held_ip: dict[str, int] = {}  # ... of it, per peer address
        self.dropped = 0
        self.stressed = False  # (said in the log when it begins)

    def admit(self, conn: _Connection, ip: str) -> str | None:
        lim = self.limits
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.watch())
        if len(self.conns) >= lim.max_connections:
            self.refused += 1
            return "Too many connections, try again later"
        if self.per_ip.get(ip, 0) >= lim.max_connections_per_ip:
            self.refused += 1
            return "Too many connections from your address, try again later"
        self.conns.add(conn)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def room(self, ip: str, more: int) -> bool:
        """Whether ``more`` bytes of message content may be held besides what is: within
        max_held_bytes, and for one peer address within a quarter of it (at least
        max_size), so that one peer's slow messages cannot take all of it."""
        lim = self.limits
        share = max(lim.max_held_bytes // 4, getattr(lim, "max_size", 0))
        return (
            self.held + more <= lim.max_held_bytes
            and self.held_ip.get(ip, 0) + more <= share
        )

    def hold(self, ip: str, delta: int) -> None:
        """``delta`` more (or fewer) bytes held by a session of ``ip``."""
        self.held += delta
        n = self.held_ip.get(ip, 0) + delta
        if n > 0:
            self.held_ip[ip] = n
        else:
            self.held_ip.pop(ip, None)

    def release(self, conn: _Connection) -> None:
        self.hold(conn.peer_ip, -conn.held)
        conn.held = 0
        if conn in self.conns:
            self.conns.discard(conn)
            n = self.per_ip.get(conn.peer_ip, 0) - 1
            if n > 0:
                self.per_ip[conn.peer_ip] = n
            else:
                self.per_ip.pop(conn.peer_ip, None)

    async def watch(self) -> None:
        lim = self.limits
        step = max(0.05, min(1.0, lim.timeout / 4, lim.data_timeout / 4))
        last = time.monotonic()
        while self.conns:
            await asyncio.sleep(step)
            now = time.monotonic()
            lag, last = now - last - step, now
            if lag > step:
                # The loop itself was held up (a busy machine): what peers sent
                # meanwhile is not read yet. Timeouts measure their silence, not ours.
                for c in self.conns:
                    c.deadline += lag
            stress = len(self.conns) >= lim.max_connections * STRESS_SHARE
            if stress != self.stressed:
                self.stressed = stress
                if stress:
                    log.warning("listener: %d of max_connections %d open: sessions idle"
                                " between commands are closed after %g s", len(self.conns),
                                lim.max_connections, min(STRESS_IDLE, lim.timeout))  # fmt: skip
            for c in list(self.conns):
                if now - c.started > lim.max_session or (
                    not c._waiting
                    and (now > c.deadline or now > c.content_deadline()
                         or (stress and c.idle_since(now) > STRESS_IDLE))
                ):  # fmt: skip
                    self.timed_out += 1
                    c.time_out()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


class AuthBusy(Exception):
    """Too many password checks running and waiting: AUTH is answered 454 4.7.0."""


class AuthThrottle:
    """Failed AUTH attempts per peer IP and per user name, over a sliding window: past
    the limit AUTH is refused (454) without checking anything, and every failure is
    answered after a back-off that doubles with the failures (0.25 s up to
    auth_backoff_max). On a shared spool (``shared``: its SharedStore) the failures
    are also counted for every node (a counter per IP, per user name and per both,
    ``{P}:af:`` a digest, expiring ``auth_window`` after its first failure): a
    password guessed through a balancer got N x the attempts from N nodes. Redis out
    of reach: this node's own count holds for a while.

    An address that logged in as a user (within KNOWN_FOR, on any node: ``{P}:ak:``)
    is familiar: for it the per-user limit counts only the failures made from it.
    Anyone who knows a tenant's name could otherwise lock the tenant's own
    application out (5 wrong passwords from anywhere: 454 for 15 minutes, the right
    password unchecked), as smart-lockout schemes keep familiar sources out of a
    lock-out; a guesser from other addresses still meets the whole per-user count,
    and a balancer that hides its clients' addresses is one address (no weaker)."""

    def __init__(self, limits: Limits, shared: Any = None) -> None:
        self.limits = limits
        self.fails: dict[str, list[float]] = {}
        self.shared = shared
        self._alone = -SHARED_ALONE  # monotonic: the last shared count that failed
        # user -> {peer address: when it last logged in as that user (monotonic)}
        self.known: dict[str, OrderedDict[str, float]] = {}

    @staticmethod
    def _names(ip: str, user: str) -> tuple[str, str, str]:
        return "ip:" + ip, "user:" + user, f"uip:{user}\0{ip}"

    def _keys(self, ip: str, user: str) -> list[str]:
        sh = self.shared
        return [
            sh.key("af", hashlib.sha256(k.encode()).hexdigest()[:32])
            for k in self._names(ip, user)
        ]

    def _shared_up(self) -> bool:
        return self.shared is not None and time.monotonic() - self._alone > SHARED_ALONE

    def _shared_down(self, e: Exception) -> None:
        self._alone = time.monotonic()
        log.warning("submission: the nodes' AUTH failure counts are out of reach (%s);"
                    " counting on this node alone for %g s", e, SHARED_ALONE)  # fmt: skip

    def _shared_counts(self, ip: str, user: str) -> tuple[int, int, int, bool]:
        """(failures by ip, by user, by both, whether ip is familiar) for every node."""
        if not self._shared_up():
            return 0, 0, 0, False
        try:
            pipe = self.shared.client.pipeline(transaction=False)
            pipe.mget(self._keys(ip, user))
            pipe.exists(self._known_key(ip, user))
            got, known = pipe.execute()
        except Exception as e:
            self._shared_down(e)
            return 0, 0, 0, False
        a, b, c = (int(v) if v is not None else 0 for v in got)
        return a, b, c, bool(known)

    def _recent(self, key: str, now: float) -> int:
        times = self.fails.get(key)
        if not times:
            return 0
        cut = now - self.limits.auth_window
        while times and times[0] < cut:
            times.pop(0)
        if not times:
            del self.fails[key]
        return len(times)

    async def _off(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` (a step asking the nodes' counts in Redis) in a thread while
        the shared counts are in use, else here (nothing to wait for). On the loop,
        a slow or paused Redis held every listener of the node for the client's
        timeout at each AUTH, twice for a failure."""
        if not self._shared_up():
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def blocked_off(self, ip: str, user: str, now: float) -> bool:
        """:meth:`blocked`, the nodes' counts read in a thread."""
        counts = await self._off(self._shared_counts, ip, user)
        return self.blocked(ip, user, now, counts)

    async def failed_off(self, ip: str, user: str, now: float) -> float:
        """:meth:`failed`, the nodes' counts moved in a thread."""
        n = self._failed_here(ip, user, now)
        return self._backoff(max(n, await self._off(self._failed_shared, ip, user)))

    async def succeeded_off(self, user: str, ip: str) -> None:
        """:meth:`succeeded`, the nodes' marks written in a thread."""
        if ip and self._succeeded_here(user, ip, time.monotonic()):
            await self._off(self._succeeded_shared, user, ip)

    def blocked(self, ip: str, user: str, now: float,
                counts: tuple[int, int, int, bool] | None = None) -> bool:  # fmt: skip
        """Whether AUTH from ``ip`` as ``user`` is refused unchecked (see the class);
        ``counts``: :meth:`_shared_counts`'s, read already."""
        lim = self.limits
        k_ip, k_user, k_both = self._names(ip, user)
        if counts is None:
            counts = self._shared_counts(ip, user)
        by_ip, by_user, by_both, known = counts
        known = known or self.familiar(ip, user, now)
        by_ip = max(by_ip, self._recent(k_ip, now))
        by_user = max(by_both if known else by_user,
                      self._recent(k_both if known else k_user, now))  # fmt: skip
        out = by_ip >= lim.auth_failures_per_ip or by_user >= lim.auth_failures_per_user
        if out:  # (a lock-out being tried is fresh: the last to go, _prune)
            for k in (k_ip, k_user, k_both):
                if k in self.fails:
                    self.fails[k] = self.fails.pop(k)
        return out

    def _prune(self, now: float) -> None:
        """Counters over FAILS_KEPT: those out of the window go, then the stalest
        (least recently failed or tried while locked out) down to 3/4 of it.
        Before, all were cleared: a spray of junk names from many addresses wiped
        every lock-out, the per-user count of the name being guessed too."""
        cut = now - self.limits.auth_window
        for k in [k for k, t in self.fails.items() if not t or t[-1] < cut]:
            del self.fails[k]
        fails = self.fails
        while len(fails) > FAILS_KEPT * 3 // 4:
            del fails[next(iter(fails))]

    def familiar(self, ip: str, user: str, now: float) -> bool:
        """Whether ``ip`` logged in as ``user`` on this node within KNOWN_FOR."""
        seen = self.known.get(user)
        when = seen.get(ip) if seen is not None else None
        return when is not None and now - when < KNOWN_FOR

    def _known_key(self, ip: str, user: str) -> str:
        digest = hashlib.sha256(f"{user}\0{ip}".encode()).hexdigest()[:32]
        return str(self.shared.key("ak", digest))

    def failed(self, ip: str, user: str, now: float) -> float:
        """Record a failure; the back-off (seconds) before answering it."""
        n = self._failed_here(ip, user, now)
        return self._backoff(max(n, self._failed_shared(ip, user)))

    def _backoff(self, n: int) -> float:
        return float(min(self.limits.auth_backoff_max, 0.25 * 2 ** min(n - 1, 16)))

    def _failed_here(self, ip: str, user: str, now: float) -> int:
        """A failure counted on this node; the larger of its counts (ip, user)."""
        if len(self.fails) > FAILS_KEPT:  # bounded memory under a spray of names
            self._prune(now)
        names = self._names(ip, user)
        for key in names:  # (each now the freshest: insertion order is recency)
            times = self.fails.pop(key, [])
            times.append(now)
            self.fails[key] = times
        return max(self._recent(names[0], now), self._recent(names[1], now))

    def _failed_shared(self, ip: str, user: str) -> int:
        """A failure counted for every node; the larger of those counts (0: none kept)."""
        if not self._shared_up():
            return 0
        try:
            pipe = self.shared.client.pipeline(transaction=True)
            for k in self._keys(ip, user):
                pipe.incr(k)
                pipe.expire(k, max(1, int(self.limits.auth_window)), nx=True)
            got = pipe.execute()
            return max(int(got[0]), int(got[2]))
        except Exception as e:
            self._shared_down(e)
            return 0

    def succeeded(self, user: str, ip: str = "", now: float | None = None) -> None:
        """A good login: ``ip`` a familiar address of the user's, on every node of a
        shared spool, and its own failures as the user forgotten. The user's other
        failures are not (before, each login of the application wiped them, and a
        guesser from many addresses got a fresh allowance after each): the one who
        logged in is out of their reach now."""
        if ip and self._succeeded_here(user, ip, time.monotonic() if now is None else now):
            self._succeeded_shared(user, ip)

    def _succeeded_here(self, user: str, ip: str, now: float) -> bool:
        both = self._names(ip, user)[2]
        self.fails.pop(both, None)  # (its own typos before: forgotten, as before)
        if len(self.known) > 100_000:  # bounded memory
            self.known.clear()
        seen = self.known.setdefault(user, OrderedDict())
        seen[ip] = now
        seen.move_to_end(ip)
        while len(seen) > KNOWN_PER_USER:
            seen.popitem(last=False)
        return self._shared_up()

    def _succeeded_shared(self, user: str, ip: str) -> None:
        if not self._shared_up():
            return
        try:
            pipe = self.shared.client.pipeline(transaction=False)
            pipe.set(self._known_key(ip, user), 1, ex=int(KNOWN_FOR))
            pipe.delete(self._keys(ip, user)[2])
            pipe.execute()
        except Exception as e:
            self._shared_down(e)


@dataclass
class SubmissionConfig:
    listen: list[tuple[str, int]]
    ssl: ssl.SSLContext
    hostname: str = "localhost"
    # As the HTTP API's body limit: a message spooled base64-encoded must still
    # cross a worker ring (32 MB) in one record, else it would bounce after the 250.
    max_size: int = 16 * 1024 * 1024
    users: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    max_spooled_bytes: int = 256 << 20  # message size x recipients, per message
    dsn: bool = True  # a failure is told to the envelope sender (fastsend.serve.dsn)
    message_limit: int = 0  # [delivery] max_message_size (0: none): the message as sent
    listen_tls: list[tuple[str, int]] = field(default_factory=list)  # implicit TLS (465)

    @classmethod
    def of(
        cls, t: SubmissionSettings, *, tls: bool = True, limit: int = 0
    ) -> SubmissionConfig | None:
        """From ``[submission]`` (checked when the config loaded); None without listen.
        ``tls=False`` does not load the TLS files (SIGHUP keeps the running
        listener's and takes only the users and limits). ``limit``: [delivery]
        max_message_size (0: none), less SIGN_ROOM and TRACE_ROOM, the SIZE offered
        when it is the smaller: a larger message is refused 552 in the session, not
        bounced after its 250, and a 7-bit one within SIZE is never refused for its
        size at the end of DATA (before, SIZE was the limit itself: a message just
        under it, with our Received and room for signing, was refused after its
        whole content was sent)."""
        if not t.listen and not t.listen_tls:
            return None
        ctx = _ssl_context(t.tls_cert, t.tls_key, "submission") if tls else None
        return cls(
            listen_pairs(t.listen) if t.listen else [],
            ctx,  # type: ignore[arg-type]
            t.hostname,
            min(t.max_size, max(1, limit - SIGN_ROOM - TRACE_ROOM)) if limit else t.max_size,
            dict(t.users),
            t,
            t.max_spooled_bytes,
            t.dsn,
            limit,
            listen_pairs(t.listen_tls) if t.listen_tls else [],
        )


@dataclass
class IntakeConfig:
    listen: list[tuple[str, int]]
    verp_domain: str = ""
    fbl_address: str = ""
    ssl: ssl.SSLContext | None = None
    hostname: str = "localhost"
    max_size: int = 10 * 1024 * 1024
    verp_prefix: str = "b"
    parse_max_bytes: int = 1 << 20  # of each report, parsed (fastsend.serve.parsepool)
    parse_cpu_seconds: float = 2.0
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def of(cls, t: IntakeSettings, *, tls: bool = True) -> IntakeConfig | None:
        """From ``[intake]`` (checked when the config loaded); None without listen.
        ``tls=False``: as SubmissionConfig.of."""
        if not t.listen:
            return None
        return cls(
            listen_pairs(t.listen),
            t.verp_domain,
            t.fbl_address,
            _ssl_context(t.tls_cert, t.tls_key, "intake") if tls else None,
            t.hostname,
            t.max_size,
            t.verp_prefix,
            t.parse_max_bytes,
            t.parse_cpu_seconds,
            t,
        )


# ---------------------------------------------------------------- policies
# A HELO name a Received field may carry: a domain name (A-labels) or an address literal.
_HELO_OK = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}"
    r"[A-Za-z0-9])?\.?|\[[0-9.]{7,15}\]|\[IPv6:[0-9A-Fa-f:.]{2,45}\]"
)


def a_labels(address: str) -> str:
    """``address`` with its domain in A-labels when its local part is ASCII (an
    address that needs SMTPUTF8 only for its domain then needs none); else as given."""
    local, at, domain = address.rpartition("@")
    if not at or address.isascii() or not local.isascii():
        return address
    try:
        return f"{local}@{encode_domain(domain)}"
    except HeaderError:
        return address


def _head_of(data: bytes) -> bytes:
    """The header section of raw ``data`` (any line ends) with CRLF line ends and its
    last CRLF, as rawmime.check_head takes it (the whole, when no blank line ends it)."""
    data = crlf_lines(data)
    head, sep, _ = data.partition(b"\r\n\r\n")
    return head + b"\r\n" if sep else data


def _trace_id() -> str:
    """An id for one accepted message: its Received field's, said in the 250 too."""
    return secrets.token_hex(6).upper()


class _Policy:
    """What a listener decides; the connection class does the SMTP plumbing."""

    server_config: ServerConfig
    ssl: ssl.SSLContext | None = None
    guard: Guard
    limits: Limits
    async_messages = False  # True: message_async answers (off the loop's critical path)

    def __init__(
        self, ctx: Any, cfg: SubmissionConfig | IntakeConfig, banner: str, **server: Any
    ) -> None:
        self.ctx = ctx
        self.ssl = cfg.ssl
        self.server_config = ServerConfig(
            hostname=cfg.hostname, banner=banner, max_message_size=cfg.max_size, **server
        )
        self.limits = cfg.limits
        self.guard = Guard(cfg.limits)

    def take(self, cfg: SubmissionConfig | IntakeConfig) -> None:
        """SIGHUP: the new limits, size and host name, for connections from now on
        (each takes the server config when it opens; ``max_size`` was kept as at
        start, though SIZE is what a SIGHUP's operator changes first)."""
        self.limits = self.guard.limits = cfg.limits
        self.server_config = dataclasses.replace(
            self.server_config, hostname=cfg.hostname, max_message_size=cfg.max_size
        )

    async def message_async(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        return self.message(conn, ev)

    def rcpt(self, conn: _Connection, address: str) -> tuple[int, str, str] | None:
        return None  # None: accept

    def message(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        raise NotImplementedError

    async def authenticate(self, username: str, password: str) -> str | None:
        return None

    def connected(self, conn: _Connection) -> None:
        """A session was admitted (its client's address known)."""


@dataclass
class _Begun:
    """A submitted message's session facts, taken on the loop."""

    tenant: str
    trace_id: str
    trace: bytes  # our Received field
    rcpts: list[str]  # (A-labels)
    sender: str


@dataclass
class _Judged:
    """A submitted message found fit: its rows to spool (recipient, domain, vars)."""

    rows: list[tuple[str, str, bytes]]


class _Submission(_Policy):
    def __init__(self, ctx: Any, cfg: SubmissionConfig) -> None:
        super().__init__(
            ctx,
            cfg,
            "ESMTP fastsend submission",
            starttls=True,
            auth_mechanisms=("PLAIN", "LOGIN"),
            auth_requires_tls=True,
            auth_required=True,
            dsn=cfg.dsn,  # (RFC 3461: what a failure notice tells, and whether one is sent)
        )
        self.cfg = cfg
        # The client's confirmed reverse DNS name for our Received field (Postfix's
        # "from HELO (NAME [IP])"), looked up from the connection's start.
        dns_cfg = ctx.config.dns
        self.rdns = ReverseNames(dns_cfg.nameservers, min(dns_cfg.timeout, RDNS_WAIT))
        spool = getattr(ctx, "spool", None)  # (shared: AUTH failures counted by all nodes)
        self.throttle = AuthThrottle(cfg.limits, spool.shared() if spool is not None else None)
        self.upgrades = PasswordUpgrades(os.path.join(ctx.config.spool_dir, "passwords.json"))
        self.cost = auth_cost(cfg.users)  # (PBKDF2 iterations of every password check)
        self._checks = asyncio.Semaphore(AUTH_CHECKS)  # (see AUTH_CHECKS)
        self._checking = 0  # password checks running or waiting
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
        users = self.cfg.users
        if not users:
            # No user table: no password can log in (API keys above), so nothing is
            # checked and the refusal takes no time, the same for every name (no
            # oracle). Before, each such AUTH spent 600k PBKDF2 iterations.
            return None
        stored = users.get(username)
        if self._checking >= AUTH_CHECKS + AUTH_WAITING:
            raise AuthBusy
        self._checking += 1
        try:
            async with self._checks:
                return await self._check(username, password, stored)
        finally:
            self._checking -= 1

    async def _check(self, username: str, password: str, stored: str | None) -> str | None:
        loop = asyncio.get_running_loop()
        # The same PBKDF2 work for every name, known or not, whatever its hash's cost
        # (before: an unknown name was checked against a dummy hash made on the event
        # loop at its first use, and a known user's cheaper, older hash answered
        # sooner than an unknown name: the time told which names exist).
        current = self.upgrades.current(username, stored) if stored is not None else None
        ok = await loop.run_in_executor(None, check_password, password, current, self.cost)
        if stored is None:
            return None
        if ok and _iterations(current or "") < PBKDF2_ITERATIONS:
            # An old, cheaper hash: re-hashed at today's cost now that the password is known.
            new = await loop.run_in_executor(None, hash_password, password)
            self.upgrades.save(username, stored, new)
        return username if ok else None

    async_messages = True  # (the client's reverse name may still be on its way)

    def connected(self, conn: _Connection) -> None:
        if conn.client:
            self.rdns.start(conn.client)

    async def message_async(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        if conn.client:
            conn.rdns = await self.rdns.name(conn.client, conn.started + self.rdns.timeout)
        if self.ctx.shared is not None and self._keys is not None:
            # The session's key read again in a thread (its cached row is trusted
            # KeyStore.CACHE_TTL, 0.5 s): _begin's look then finds it cached. On the
            # loop, a slow Redis held every listener of the node for it, per message.
            await asyncio.to_thread(self.still_valid, conn)
        begun = self._begin(conn, ev)
        if not isinstance(begun, _Begun):
            return begun
        # The message's checks and its spooled form: in a thread when it is large
        # (before, on the loop: a 14 MB 8-bit message held every listener, the API and
        # the supervisor's dispatch for 1.7 s, a few at once for as many times that).
        judged = await off_loop(len(ev.data), self._judge, begun, ev)
        if not isinstance(judged, _Judged):
            return judged
        stowed = None
        if len(ev.data) > OFF_LOOP_BYTES:
            # Its body stored as a blob in a thread too (a 21 MB message's SHA-256 and
            # write held the loop ~0.7 s): the rows referring to it spooled below.
            try:
                stowed = await asyncio.to_thread(self.ctx.acceptor.stow, judged.rows)
            except Exception as e:
                return self._not_spooled(e)
        answer = await self._spool_off(begun, judged, stowed)
        if stowed is not None and stowed.refs:  # (spooled: its blob's rows recorded)
            try:
                await asyncio.to_thread(self.ctx.acceptor.ref_stowed, stowed)
            except Exception:  # (the sweep records them from the rows: not lost)
                log.warning("submission: a blob's rows not recorded", exc_info=True)
        return answer

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
        """SIGHUP: new [submission.users] (and sizes), and the TLS certificate and key
        read again for new sessions (a renewed certificate at the same paths: before,
        the one of the start was served until it expired); listen stays as started."""
        cfg.listen, cfg.listen_tls = self.cfg.listen, self.cfg.listen_tls
        self.ssl = cfg.ssl = cfg.ssl or self.cfg.ssl
        self.cfg = cfg
        self.cost = auth_cost(cfg.users)
        self.take(cfg)
        self.server_config = dataclasses.replace(self.server_config, dsn=cfg.dsn)
        self.throttle.limits = cfg.limits

    def rcpt(self, conn: _Connection, address: str) -> tuple[int, str, str] | None:
        domain = address.rpartition("@")[2]
        try:
            encode_domain(domain)
        except HeaderError:
            return 553, "5.1.3", "Bad recipient domain"
        if domain.startswith("["):
            # An address literal is delivered to that address: never to one inside the
            # operator's network (a tenant reaching 127.0.0.1:25 or 10.x through us),
            # as an MX resolving there is not, unless [delivery] allow_private_mx.
            ip = literal(domain)[1:-1].removeprefix("ipv6:")
            if not self.ctx.config.delivery.allow_private_mx and not netguard.public(ip):
                return 550, "5.7.1", f"{domain} is not a public address"
        if conn.tenant is not None:  # a quota used up: said before the body is sent
            over = self.ctx.caps.exhausted(conn.tenant)
            if over is not None:
                return 451, "4.7.1", str(over)
        return None

    def message(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        """The answer to a message's end (all on the loop; message_async: the checks
        of a large one in a thread)."""
        begun = self._begin(conn, ev)
        if not isinstance(begun, _Begun):
            return begun
        judged = self._judge(begun, ev)
        if not isinstance(judged, _Judged):
            return judged
        return self._spool(begun, judged)

    def _begin(self, conn: _Connection, ev: Message) -> tuple[int, str, str] | _Begun:
        """On the loop: the session's credential still good, and our trace field."""
        tenant = conn.tenant
        if tenant is None:  # the protocol requires AUTH before MAIL; belt and braces
            return 530, "5.7.0", "Authentication required"
        if not self.still_valid(conn):
            conn.close_after_reply = True
            return 535, "5.7.8", "Authentication credentials no longer valid"
        trace_id = _trace_id()
        # An internationalised domain after an ASCII local part is written in
        # A-labels (IDNA 2008, UTS 46): the same domain, and it needs no SMTPUTF8
        # (spooled as given, every receiver without SMTPUTF8 refused it 5.6.7).
        # Only a non-ASCII local part needs SMTPUTF8 (RFC 6531 3.2).
        rcpts = [a_labels(r) for r in ev.recipients]
        # Our trace field (RFC 5321 4.4 MUST) goes on top of the message as
        # spooled, so it is on the mail delivered and under its DKIM signature,
        # and the caps hold with it.
        trace = self.received(conn, ev, rcpts, trace_id)
        return _Begun(tenant, trace_id, trace, rcpts, a_labels(ev.mail_from))

    def _judge(self, begun: _Begun, ev: Message) -> tuple[int, str, str] | _Judged:
        """The message's checks and the rows to spool: no I/O, no shared state
        written (run in a thread for a large message)."""
        tenant, trace, rcpts, sender = begun.tenant, begun.trace, begun.rcpts, begun.sender
        try:  # within the header caps, and relayable unbroken (long lines)
            lines = crlf_lines(ev.data)
            check_header_text(lines)  # (8-bit header text: UTF-8 only, RFC 6532)
            ready = prepare_raw(lines)[0]  # (as sent: 8-bit re-encoded)
            check_names(lines)  # (what rawmime.check refuses besides: disguised names)
            check_head(_head_of(trace + ev.data[: MAX_HEADER_OCTETS + 1024]))
            data = trace + ev.data
        except RawMimeError as e:
            return (552 if e.enhanced == "5.3.4" else 554), e.enhanced, f"Message refused: {e}"
        limit = self.cfg.message_limit
        if limit and len(ready) + len(trace) + SIGN_ROOM > limit:
            # As the worker will measure it (re-encoded, our Received, its Date,
            # Message-ID and signatures: SIGN_ROOM): refused now, not bounced after
            # the 250 (an 8-bit body under SIZE grew past it once re-encoded).
            size = len(ready) + len(trace)
            return 552, "5.3.4", (
                f"Message refused: {size:,} octets as relayed (8-bit parts encoded, with"
                f" its trace field), over the {limit:,}-octet limit less {SIGN_ROOM:,}"
                " for signing"
            )
        # A message needs a From (RFC 5322 3.6; receivers refuse one without, Gmail
        # 5.7.1), as the API's raw needs one: before, without [tenants] (users of
        # [submission.users] alone) it was spooled and sent, an empty BDAT 0 LAST too.
        has_from, senders = sender_domains(ev.data)
        if not has_from:
            return 550, "5.7.1", "Message has no From address"
        tenants = self.ctx.tenants
        if tenants is not None and tenants.configured:
            if header_nul(ev.data):
                return 550, "5.6.0", "NUL in the header section"
            envelope = ("MAIL FROM", sender.rpartition("@")[2].lower())
            for field, d in [*senders, envelope]:
                if (d or field != "MAIL FROM") and not tenants.allows(tenant, d):
                    name = field.title() if field != "MAIL FROM" else field
                    return 550, "5.7.1", f"{name} domain {d} is not one of your sending domains"
        cap = self.cfg.max_spooled_bytes
        if len(data) * 4 // 3 * len(rcpts) > cap:  # each row holds the message
            return 552, "5.3.4", "Message size x recipients exceeds the limit; send fewer"
        msg: dict[str, Any] = {"raw": base64.b64encode(data).decode("ascii"),
                               "mail_from": sender}  # fmt: skip
        if self.cfg.dsn:  # its failure is told to the envelope sender (serve.dsn)
            # RFC 3461: the notice names the ENVID and returns the whole message for
            # RET=FULL; a recipient's NOTIFY without FAILURE gets none, its ORCPT is
            # named (before: 555 to each, DSN was not offered; an application that
            # sends NOTIFY=NEVER regardless could send nothing).
            envid, ret = ev.mail_params.get("ENVID"), ev.mail_params.get("RET")
            if envid:
                msg["envid"] = xtext_decode(envid)
            if ret == "FULL":
                msg["ret"] = "full"
            # RFC 3461 4: relayed as received to a next hop that offers DSN (its
            # notices then come from where the message goes on; before, they were
            # dropped there, and that hop answered NOTIFY=NEVER mail with bounces).
            relay = " ".join(f"{k}={v}" for k, v in (("RET", ret), ("ENVID", envid)) if v)
            if relay:
                msg["dsn_mail"] = relay
        shared = orjson.dumps({**msg, "dsn": 1} if self.cfg.dsn else msg)
        # One copy of the message a mailbox: RCPT TO given twice (or with the domain in
        # another case) is one recipient, as Postfix's duplicate filter makes it.
        rows: list[tuple[str, str, bytes]] = []
        seen: set[str] = set()
        for i, r in enumerate(rcpts):
            p = ev.rcpt_params[i] if i < len(ev.rcpt_params) else {}
            vars_ = shared
            if self.cfg.dsn and p:
                notify, orcpt = p.get("NOTIFY"), p.get("ORCPT")
                # NOTIFY=SUCCESS or DELAY: a notice of its relay or of its delay too
                # (serve.dsn; before, taken and nothing sent), said first in its vars
                # (wire.NOTIFY_HEAD: the delivery's hook reads no more of them).
                asked = [w for w in (notify or "").split(",") if w in ("SUCCESS", "DELAY")]
                one = {"notify": ",".join(asked), **msg} if asked else dict(msg)
                if notify is None or "FAILURE" in notify.split(","):
                    one["dsn"] = 1
                if orcpt:
                    one["orcpt"] = xtext_decode(orcpt)
                words = [f"NOTIFY={notify}"] if notify else []
                if orcpt and orcpt.isascii():  # (UTF-8 xtext only in an SMTPUTF8 session)
                    words.append(f"ORCPT={orcpt}")
                if words:
                    one["dsn_rcpt"] = " ".join(words)
                vars_ = orjson.dumps(one)
            local, _, dom = r.rpartition("@")
            # (a literal in the one form suppression keys it by: [ipv6:2001:db8::1])
            domain = literal(dom) if dom.startswith("[") else encode_domain(dom).lower()
            if (key := f"{local}@{domain}") not in seen:
                seen.add(key)
                rows.append((r, domain, vars_))
        return _Judged(rows)

    @staticmethod
    def _caps_refused(e: Exception) -> tuple[int, str, str]:
        """The reply when the tenant's caps did not take a message (in an ``except``:
        :meth:`_spool` and :meth:`_spool_off`): over its daily quota or submission
        rate, or the spool's counters out of reach (as a spool error)."""
        if isinstance(e, TenantCapExceeded):
            return 451, "4.7.1", str(e)
        log.warning("submission: the tenant's caps could not be counted", exc_info=e)
        return 451, "4.3.0", "Temporary failure (storage), try again later"

    def _spool(self, begun: _Begun, judged: _Judged, stowed: Any = None) -> tuple[int, str, str]:
        """On the loop: the tenant's caps counted and the rows spooled (``stowed``:
        their bodies stored already, ``Acceptor.stow``)."""
        tenant, rows, trace_id = begun.tenant, judged.rows, begun.trace_id
        try:  # the tenant's daily quota and submission rate: a message per recipient
            taken = self.ctx.caps.take(tenant, len(rows))
        except Exception as e:
            return self._caps_refused(e)
        try:
            ids = self.ctx.inject(self.ctx.tenant_campaign(tenant, fresh=True), rows,
                                  stowed=stowed)  # fmt: skip
        except CampaignQuotaExceeded as e:  # (a cancel-and-send loop), said without a trace
            self.ctx.caps.refund(taken)
            return 451, "4.7.0", f"{e}; try again later"
        except Exception as e:
            self.ctx.caps.refund(taken)
            return self._not_spooled(e)
        return 250, "2.0.0", f"Ok: queued as {ids[0]} ({len(ids)} recipient(s)) id {trace_id}"

    async def _spool_off(
        self, begun: _Begun, judged: _Judged, stowed: Any = None
    ) -> tuple[int, str, str]:
        """:meth:`_spool`, its spool calls in threads on a shared spool (on the
        loop a slow Redis held every listener of the node for each of them)."""
        ctx = self.ctx
        if ctx.shared is None:
            return self._spool(begun, judged, stowed)
        tenant, rows, trace_id = begun.tenant, judged.rows, begun.trace_id
        try:  # the tenant's daily quota and submission rate: a message per recipient
            taken = await asyncio.to_thread(ctx.caps.take, tenant, len(rows))
        except Exception as e:
            return self._caps_refused(e)
        try:
            cid = await asyncio.to_thread(ctx.tenant_campaign, tenant, True)
            ids = await ctx.inject_off(cid, rows, stowed=stowed)
        except CampaignQuotaExceeded as e:
            await asyncio.to_thread(ctx.caps.refund, taken)
            return 451, "4.7.0", f"{e}; try again later"
        except Exception as e:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ctx.caps.refund, taken)
            return self._not_spooled(e)
        return 250, "2.0.0", f"Ok: queued as {ids[0]} ({len(ids)} recipient(s)) id {trace_id}"

    @staticmethod
    def _not_spooled(e: Exception) -> tuple[int, str, str]:
        """The answer to a message the spool did not take (``e``: why)."""
        problem = storage_problem(e)
        if problem is not None:  # nothing kept; said once a message, no traceback
            log.warning("submission: message not accepted: the spool %s", problem)
            if problem in ("is full", "is over its disk quota"):  # RFC 5321 4.2.2, 3463
                return 452, "4.3.1", "Insufficient system storage, try again later"
            return 451, "4.3.0", "Temporary failure (storage), try again later"
        log.exception("submission: spooling failed")
        return 451, "4.3.0", "Temporary failure, try again later"

    def received(
        self, conn: _Connection, ev: Message, rcpts: list[str], trace_id: str
    ) -> bytes:
        """The Received field this hop adds (RFC 5321 4.4, RFC 5322 3.6.7): "from" the
        client's HELO name (when it is a domain or an address literal; else the
        address alone) and its address (the PROXY header's behind a trusted
        balancer), "by" our host name, "with" the RFC 3848 / RFC 6531 protocol
        (ESMTPSA: TLS and AUTH), the id the 250 names, "for" the recipient when
        there is one (more would tell each the others, Bcc ones included), the
        time. ASCII only (the HELO is the client's: anything else is left out).
        The AUTH identity is not written: the tenant's account name is no business
        of the receivers' (RFC 4954 leaves it out of Received; Postfix's
        smtpd_sasl_authenticated_header is off by default)."""
        proto = conn.proto
        ip = conn.client or "unknown"
        lit = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        helo = proto.helo or ""
        if not helo.isascii():  # (an internationalised name: its A-labels)
            try:
                helo = encode_domain(helo)
            except HeaderError:
                pass
        # TCP-info (RFC 5321 4.4): the client's confirmed reverse name, or "unknown"
        # (Postfix's form; serve.rdns), and its address.
        info = f"({conn.rdns or 'unknown'} {lit})"
        if _HELO_OK.fullmatch(helo) is not None and len(helo) <= 255:
            origin = f"from {helo} {info}"
        else:
            origin = f"from {lit} {info}" + (" (HELO is no domain)" if helo else "")
        base = "UTF8SMTP" if ev.smtputf8 else "ESMTP"
        if not proto.esmtp:
            with_ = "SMTP"
        else:
            with_ = base + ("S" if proto.tls_active else "") + ("A" if conn.tenant else "")
        tls = ""
        t = conn.transport
        sslobj = t.get_extra_info("ssl_object") if t is not None else None
        if sslobj is not None:
            cipher = sslobj.cipher()
            tls = f"\r\n\t(using {sslobj.version()} with cipher {cipher[0] if cipher else '?'})"
        one = rcpts[0] if len({r.lower() for r in rcpts}) == 1 else ""
        for_ = f"\r\n\tfor <{one}>" if one and one.isascii() and len(one) <= 256 else ""
        stamp = email.utils.format_datetime(datetime.datetime.now(datetime.UTC))
        host = self.server_config.hostname
        return (
            f"Received: {origin}{tls}\r\n\tby {host} (fastsend) with {with_} id {trace_id}"
            f"{for_}; {stamp}\r\n"
        ).encode("ascii", "replace")


class _Intake(_Policy):
    def __init__(self, ctx: Any, cfg: IntakeConfig) -> None:
        super().__init__(
            ctx,
            cfg,
            "ESMTP fastsend intake",
            starttls=cfg.ssl is not None,
            reject_bare_newlines=False,  # never relayed, so no smuggling risk downstream
            # Only a report's first parse_max_bytes are parsed (serve.parsepool): the
            # rest of a bounce that returns a 10 MB message is read and dropped.
            keep_bytes=cfg.parse_max_bytes,
        )
        self.cfg = cfg
        self.pool = ParsePool(cfg.parse_max_bytes, cfg.parse_cpu_seconds)

    def reload(self, cfg: IntakeConfig) -> None:
        """SIGHUP: the new VERP domain and prefix, feedback-loop address, sizes and
        limits (listen, TLS and the parse process stay as started). The API takes
        ``[intake] verp_domain`` for campaigns at once: an intake still refusing it
        would refuse every bounce of their mail (550), and no one would be suppressed.
        Its TLS certificate is read again for new sessions, when it started with one."""
        cfg.listen = self.cfg.listen
        if self.cfg.ssl is None:  # (STARTTLS is offered or not as started)
            cfg.ssl = None
        self.ssl = cfg.ssl = cfg.ssl or self.cfg.ssl
        self.cfg = cfg
        self.take(cfg)
        self.server_config = dataclasses.replace(self.server_config,
                                                 keep_bytes=cfg.parse_max_bytes)  # fmt: skip

    def rcpt(self, conn: _Connection, address: str) -> tuple[int, str, str] | None:
        a = address.lower()
        if (self.cfg.fbl_address and a == self.cfg.fbl_address) or (
            self.cfg.verp_domain and a.rpartition("@")[2].rstrip(".") == self.cfg.verp_domain
        ):
            return None
        return 550, "5.7.1", "Relay access denied"

    async_messages = True

    async def message_async(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        # Parsed in another process with a size and CPU cap (fastsend.serve.parsepool):
        # a pathological report cannot stall the API, tracking or submission.
        # DMARC aggregate reports (zip/gzip, XML) too: only storing one runs here.
        try:
            dmarc = getattr(self.ctx, "dmarc", None)
            kind, got = await self.pool.read(ev.data, dmarc=dmarc is not None)
            if kind == "dmarc":  # stored from a thread: a report may be many rows
                from fastsend.analytics.dmarc import store_reports

                got = [r if isinstance(r, str) or self.ours(r.domain) else
                       f"policy domain {r.domain[:255]!r} is not one of the tenants' domains"
                       for r in got]  # fmt: skip
                evs = await asyncio.to_thread(store_reports, self.ctx.dmarc, got)
                for report_ev in evs:
                    self.ctx.emit(report_ev)
            else:
                evs = apply_records(self.ctx, got, ev.recipients, self.cfg.verp_prefix)
        except ParseUnavailable as e:  # (no report was read: nothing of it applied)
            log.warning("intake: report deferred (451): %s", e)
            return 451, "4.3.0", "Temporary failure, try again later"
        except Exception as e:  # a parser bug must not make the sender retry forever
            if self._storage_out(e):
                # The spool or suppression list cannot be read or written now (a Redis
                # restart, failover or partition; a full or read-only disk): the report
                # could not be matched nor its recipient suppressed. Deferred, so the
                # reporting MTA retries (was 250 and the report gone; a hard bounce's
                # address was mailed again). A record applied before the error is not
                # counted twice: each message's bounce/complaint is recorded once.
                log.warning("intake: report deferred (451): the spool is out of reach"
                            " or refuses writes: %s", e)  # fmt: skip
                return 451, "4.3.0", "Temporary failure (storage), try again later"
            log.exception("intake: report not processed")
            evs = []
        return 250, "2.0.0", f"Ok: {len(evs)} event(s)"

    def _storage_out(self, e: BaseException) -> bool:
        """Whether ``e`` (or what caused it) is the storage's temporary failure: the
        spool's outage errors (Redis out of reach or refusing writes) or a disk's."""
        outage = self.ctx.spool.outage_errors()
        x: BaseException | None = e
        for _ in range(8):
            if x is None:
                break
            if (outage and isinstance(x, outage)) or storage_problem(x) is not None:
                return True
            x = x.__cause__ or x.__context__
        return False

    def message(self, conn: _Connection, ev: Message) -> tuple[int, str, str]:
        raise NotImplementedError("the intake answers in message_async")

    def ours(self, domain: str) -> bool:
        """A DMARC report's policy domain is one of ours (a tenant's domain or under
        it; any, without [tenants]): anyone can mail a report about any domain, and
        the view is about where mail claiming our domains comes from."""
        tenants = getattr(self.ctx, "tenants", None)
        if tenants is None or not tenants.configured:
            return True
        d = ascii_domain(domain)
        return any(
            d == (x := ascii_domain(y)) or d.endswith("." + x)
            for t in tenants.by_name.values()
            for y in t.domains
        )


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
    # The address the report names, and the one we sent to when the receiver's
    # alias expanded it (a DSN's Original-Recipient beside its Final-Recipient:
    # Postfix virtual aliases); before, such a hard bounce suppressed no one.
    named = [a for a in (rec.recipient, getattr(rec, "original_recipient", None)) if a]
    mid = msgid.parse(local, ctx.secret)
    if mid is not None:
        got = _owner(ctx, mid)
        # A Message-ID is only a hint (other senders use digits too): the recipient must match.
        if got is not None and (
            not rec.recipient or any(a.lower() == got[1].lower() for a in named)
        ):
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
        for a in named:
            row = ctx.spool.sibling(got[0], a, first)
            if row is not None:
                return row[0], got[0], row[1], got[2]
    return None


def redacted_group(ctx: Any, rec: BounceRecord) -> tuple[int, int, str] | None:
    """(first row, campaign, tenant) of the message shared by several recipients
    that a report naming no recipient is about (its Message-ID is the group's,
    verified), else None. RFC 6590 lets a feedback loop redact the recipient: the
    complaint is still about the campaign, though it names no one to suppress."""
    if rec.recipient or rec.verp_id:
        return None
    first = msgid.parse_group(_message_id_local(rec.original_message_id), ctx.secret)
    if first is None:
        return None
    got = _owner(ctx, first)
    return None if got is None else (first, got[0], got[2])


_GROUPS_KEPT = 100_000  # groups remembered as complained about (a replay is not counted)
GROUP_TOLD_TTL = 30 * 86400.0  # s a shared spool remembers them


def _group_told(ctx: Any, first: tuple[int, str]) -> bool:
    """Whether a redacted report (group's first row, event) was counted already;
    remembers it if not. One per group and event: the reports cannot be told apart
    (the recipient is gone), and anyone holding one could replay it to pause a
    campaign (a complaint) or swell its figures. On a shared spool remembered in
    Redis for every node, ``GROUP_TOLD_TTL``: in this process's memory, a replay
    counted again at each node and after each restart."""
    shared = getattr(ctx, "shared", None)
    if shared is not None:
        return not shared.once(f"g:{first[0]}:{first[1]}", GROUP_TOLD_TTL)
    seen = getattr(ctx, "group_complaints", None)
    if seen is None:
        seen = OrderedDict()
        with contextlib.suppress(AttributeError):
            ctx.group_complaints = seen
    if first in seen:
        return True
    seen[first] = None
    if len(seen) > _GROUPS_KEPT:
        seen.popitem(last=False)
    return False


def process_report(
    ctx: Any, data: bytes, envelope_rcpts: list[str], verp_prefix: str = "b"
) -> list[dict[str, Any]]:
    """Parse one bounce/ARF message; emit its events, update suppression; return the events."""
    from fastsend.bounce import parse_bounce  # the DSN/ARF reader: on first use (start-up time)

    got = _dmarc_report(ctx, data)
    if got is not None:
        return got
    return apply_records(ctx, parse_bounce(data), envelope_rcpts, verp_prefix)


def _dmarc_report(ctx: Any, data: bytes) -> list[dict[str, Any]] | None:
    """Issue 14: DMARC aggregate reports (rua) come here too; their events, or None."""
    dmarc = getattr(ctx, "dmarc", None)
    if dmarc is None:
        return None
    from fastsend.analytics.dmarc import ingest_mail

    got = ingest_mail(dmarc, data)
    if got is not None:
        for report_ev in got:
            ctx.emit(report_ev)
    return got


def apply_records(
    ctx: Any, records: list[BounceRecord], envelope_rcpts: list[str], verp_prefix: str = "b"
) -> list[dict[str, Any]]:
    """The events and suppressions of one report's parsed records (on the loop: cheap)."""
    envelope_ids = []
    for r in envelope_rcpts:
        try:
            envelope_ids.append(verp.decode(r, verp_prefix))
        except verp.VerpError:
            pass
    out: list[dict[str, Any]] = []
    now = time.time()
    told: set[tuple[int, str]] = set()
    for rec in records:
        if rec.reason in ("delivered", "vacation") or rec.action in NOT_FINAL_ACTIONS:
            # A delay warning (RFC 3464 Action "delayed": the reporting MTA still
            # retries) or a report of mail handed on is no bounce: as "bounced" it
            # was counted by the bounce-rate guardrail for mail that may yet be
            # delivered, and the final report that follows was then dropped as a
            # repeat of the message's "bounced" event (its hard bounce never
            # suppressed the address).
            continue
        found = find_original(ctx, rec, envelope_ids)
        group = None
        if found is not None:
            mid, campaign, rcpt, tenant = found
            ev: dict[str, Any] = {"id": mid, "campaign": campaign, "rcpt": rcpt, "tenant": tenant}
        elif rec.reason == "feedback" and (group := redacted_group(ctx, rec)) is not None:
            # A redacted complaint about grouped mail: its campaign's (the guardrail,
            # the rollups, the tenant's webhooks), no message's, no one suppressed.
            ev = {"id": None, "campaign": group[1], "rcpt": "", "tenant": group[2],
                  "group": group[0]}  # fmt: skip
        else:
            ev = {"id": None, "campaign": None, "rcpt": rec.recipient, "tenant": DEFAULT_TENANT}
        ev["time"] = now
        # Only a report whose VERP id or Message-ID verifies (fastsend.msgid's MAC) names a
        # message, a tenant and a recipient we sent to; anything else is anyone's forgery
        # and changes no suppression list (it is still recorded as an event).
        suppress = found is not None
        if found is None and group is None:
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
        if found is not None and ev["event"] in ONCE_PER_MESSAGE:
            # A report about a message that already has this event is a repeat (a
            # provider resending it, or anyone replaying a genuine one): each event is
            # counted by the rollups, the rate alarms and the guardrails, so it is
            # recorded once, and the suppression decided then is not made again.
            key = (ev["id"], ev["event"])
            if key in told or already_told(ctx, ev["id"], ev["event"]):
                continue
            told.add(key)
        elif group is not None and _group_told(ctx, (group[0], ev["event"])):
            continue
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
        if found is not None and not first_telling(ctx, ev["id"], ev["event"]):
            continue  # (another copy, at this node or another, told it a moment ago)
        ctx.emit(ev)
        out.append(ev)
    return out


# ---------------------------------------------------------------- the connection
class _Connection(ServerConnection):
    """One SMTP session: feeds the protocol, answers its events through the policy."""

    def __init__(self, policy: _Policy, implicit_tls: bool = False) -> None:
        super().__init__(policy.server_config, policy.ssl)
        self.policy = policy
        self.implicit_tls = implicit_tls  # (RFC 8314: TLS first, then the greeting)
        self.tenant: str | None = None
        self.credential: tuple[str, str | None] | None = None  # (password, stored hash)
        self.close_after_reply = False
        self.auth_failures = 0
        self._task: asyncio.Future[None] | None = None
        self.client = ""
        self.rdns: str | None = None  # the client's confirmed reverse DNS name, once known
        self.peer_ip = ""
        self.started = time.monotonic()
        self.deadline = self.started + policy.limits.timeout
        # The watchdog waits while a handshake runs: it is held to the command
        # timeout (at most asyncio's 60 s) itself. Before, a peer that sent STARTTLS,
        # or connected to the implicit TLS port, and then nothing held its slot 60 s
        # whatever [submission] timeout said.
        self.handshake_timeout = min(policy.limits.timeout, 60.0)
        self.replies = 0
        self._input_paused = False
        # The message content now arriving (DATA, or a transaction's BDAT chunks):
        # when its first block came and its bytes so far (ListenerLimits.data_min_rate).
        self.content_started: float | None = None
        self.content_bytes = 0
        # What of the guard's held bytes are this session's: received data stored
        # (the protocol's buffer, BDAT chunks) and a message being answered.
        self.held = 0
        self.answering = 0  # bytes of the message whose answer is awaited

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # The client's address (the PROXY header's, behind a trusted balancer).
        peer = transport.get_extra_info("peername")
        self.client = self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        why = self.policy.guard.admit(self, self.peer_ip)
        if why is not None:
            if self.implicit_tls:  # (no TLS yet: nothing can be said; the cap holds)
                transport.close()
                return
            self.proto.refuse(421, "4.7.0", why)
            self._flush()
            return
        self.policy.connected(self)
        if self.implicit_tls:
            # As after STARTTLS: no plaintext is read; the greeting once TLS is up.
            self.proto.mode = _TLS_WAIT_MODE
            self._waiting = True
            self._tls_early = []
            transport.pause_reading()  # type: ignore[attr-defined]
            self._tls_task = asyncio.ensure_future(self._start_tls())
            return
        self.proto.start()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.policy.guard.release(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        # Commands are fed a line at a time, so that max_commands holds exactly even for
        # a pipelined flood of commands the protocol answers by itself (NOOP, RSET, ...).
        feed = super().data_received
        start, n = 0, len(data)
        while start < n and self.transport is not None:
            mode = self.proto.mode
            if mode in (_DATA_MODE, _BDAT_MODE):  # a block of the message arrived
                if not self.policy.guard.room(self.peer_ip, n - start):
                    self._no_room()
                now = time.monotonic()
                self.deadline = now + self.policy.limits.data_timeout
                if self.content_started is None:
                    self.content_started = now
                self.content_bytes += n - start
            if mode in (_DATA_MODE, _BDAT_MODE) or self._waiting or self._tls_early is not None:
                feed(data[start:] if start else data)
                break
            nl = data.find(b"\n", start)
            end = n if nl < 0 else nl + 1
            self.proto.input_after = n - end  # (sent with it, before any reply to it)
            feed(data[start:end])
            self.proto.input_after = 0
            start = end
        self._account()
        if self._waiting and self.transport is not None and len(self.proto._buf) > 65536:
            self._input_paused = True  # the peer runs ahead of an answer we owe it
            self.transport.pause_reading()

    def _account(self) -> None:
        """Bring the guard's count of held bytes up to date with this session's."""
        now = self.proto.held_bytes() + self.answering if self.transport is not None else 0
        if now != self.held:
            self.policy.guard.hold(self.peer_ip, now - self.held)
            self.held = now

    def _no_room(self) -> None:
        """The listener holds max_held_bytes of content: the message arriving here is
        not kept (its stored part freed, the rest discarded as it comes) and its end
        is answered 452 4.3.1, so that its sender tries again later."""
        proto = self.proto
        if proto._drop_reply or proto._bdat_failed:  # (already dropped)
            return
        self.policy.guard.dropped += 1
        proto.drop_content(452, "4.3.1", "Insufficient system storage, try again later")
        self._account()

    def _resume_input(self) -> None:
        if self._input_paused and self.transport is not None and not self._write_paused:
            self._input_paused = False
            self.transport.resume_reading()

    def idle_since(self, now: float) -> float:
        """Seconds the peer has owed us its next command line (0 while a message's
        content arrives: that has its own limits)."""
        if self.proto.mode in (_DATA_MODE, _BDAT_MODE):
            return 0.0
        return now - (self.deadline - self.policy.limits.timeout)

    def content_deadline(self) -> float:
        """When the message content arriving must be complete: data_timeout after its
        first block, plus a second for every data_min_rate bytes received (a peer
        dripping a byte at a time is cut there, not at max_session; RFC 5321
        4.5.3.2.5 gives 3 minutes a block, which such a peer never exceeds)."""
        lim = self.policy.limits
        if self.content_started is None or not lim.data_min_rate:
            return float("inf")
        return self.content_started + lim.data_timeout + self.content_bytes / lim.data_min_rate

    def time_out(self) -> None:
        """The watchdog's verdict: 421 and close (abort if the peer reads nothing)."""
        t = self.transport
        if t is None:
            return
        self.transport = None
        if t.get_write_buffer_size() == 0:
            t.write(b"421 4.4.2 Timeout exceeded, closing connection\r\n")
            t.close()
        else:
            t.abort()
        self.policy.guard.release(self)

    def _flush(self) -> None:
        n = len(self.proto._out)
        if n:
            self.replies += n
            self.deadline = time.monotonic() + self.policy.limits.timeout
        super()._flush()

    def _process(self) -> None:
        proto, policy = self.proto, self.policy
        while self.transport is not None:
            if self.replies >= policy.limits.max_commands and not proto.closed:
                proto.refuse(421, "4.7.0", "Too many commands in one session")
                break
            ev = proto.next_event()
            if isinstance(ev, _NeedData):
                break
            t = type(ev)
            if t is Message or t is MailFrom:  # the content is complete, or a new one begins
                self.content_started, self.content_bytes = None, 0
            if t is RcptTo:
                assert isinstance(ev, RcptTo)
                bad = policy.rcpt(self, ev.address)
                if bad is None:
                    proto.accept()
                else:
                    proto.reply(*bad)
            elif t is Message and policy.async_messages:
                assert isinstance(ev, Message)
                self._waiting = True
                self.answering = len(ev.data)  # held until answered
                self._task = asyncio.ensure_future(self._message(ev))
                break
            elif t is Message:
                assert isinstance(ev, Message)
                code, enh, text = policy.message(self, ev)
                proto.reply(421 if self.close_after_reply else code, enh, text)
            elif isinstance(ev, MailFrom) and ev.size and not policy.guard.room(
                self.peer_ip, ev.size
            ):
                # RFC 1870 6.1: the declared size does not fit now; a later try may.
                proto.reply(452, "4.3.1", "Insufficient system storage, try again later")
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
        self._account()
        self._flush()

    async def _message(self, ev: Message) -> None:
        try:
            code, enh, text = await self.policy.message_async(self, ev)
        except Exception:
            log.exception("message not processed")
            code, enh, text = 451, "4.3.0", "Temporary failure, try again later"
        self.answering = 0
        self._account()
        if self.transport is None:
            return
        self.proto.reply(421 if self.close_after_reply else code, enh, text)
        self._waiting = False
        self._flush()
        if not self.proto.closed:
            self._process()
            self._resume_input()

    async def _auth(self, ev: AuthRequest) -> None:
        throttle: AuthThrottle | None = getattr(self.policy, "throttle", None)
        user = ev.username[:256]
        if throttle is not None and await throttle.blocked_off(self.peer_ip, user,
                                                               time.monotonic()):  # fmt: skip
            self._auth_refused("Too many failed authentications, try again later")
            return
        try:
            # RFC 4616 2: an authorization identity other than the user's own (acting
            # for another tenant) must fail; before, it was ignored and the session
            # went on as the user, the client believing it acted for the other.
            proxy = bool(ev.authzid) and ev.authzid != ev.username
            tenant = None if proxy else await self.policy.authenticate(ev.username, ev.password)
        except AuthBusy:  # (nothing checked: no failure counted)
            self._auth_refused("Temporary authentication failure, try again later")
            return
        except Exception:
            log.exception("authentication check failed")
            tenant = None
        if self.transport is None:
            return
        if tenant is not None:
            if throttle is not None:
                await throttle.succeeded_off(user, self.peer_ip)
                if self.transport is None:
                    return
            self.tenant = tenant
            stored = getattr(self.policy, "cfg", None)
            users = getattr(stored, "users", {})
            self.credential = (ev.password, users.get(tenant))
            self.proto.accept()
        else:
            if throttle is not None:
                await asyncio.sleep(await throttle.failed_off(self.peer_ip, user,
                                                              time.monotonic()))  # fmt: skip
                if self.transport is None:
                    return
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
            self._resume_input()

    def _auth_refused(self, text: str) -> None:
        """Answer an AUTH left unchecked (throttled, or the check is busy) 454 4.7.0,
        a temporary refusal that counts no failure, and go on with the session (input
        paused while the answer was owed resumes, as after any AUTH answer)."""
        if self.transport is None:
            return
        self.proto.reply(454, "4.7.0", text)
        self._waiting = False
        self._flush()
        if not self.proto.closed:
            self._process()
            self._resume_input()

    def _tls_started(self) -> None:
        self.tenant = None  # TLS resets the session: AUTH again
        self.credential = None
        if self.implicit_tls and not self.replies:
            self.proto.start()  # the 220 greeting, now under TLS


async def _serve(
    policy: _Policy,
    listen: list[tuple[str, int]],
    proxy: ProxySettings | None = None,
    implicit_tls: bool = False,
) -> list[asyncio.AbstractServer]:
    """Listen on each address; behind a PROXY gate when [proxy] trusts a balancer
    (``implicit_tls``: the TLS handshake first, after the PROXY header if any)."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    factory = wrap_factory(lambda: _Connection(policy, implicit_tls), proxy)
    for host, port in listen:
        servers.append(
            await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
        )
    return servers


class Listeners(list[asyncio.AbstractServer]):
    """The listening servers, and what SIGHUP may change in them (:meth:`reload`)."""

    submission: _Submission | None = None
    intake: _Intake | None = None

    def shutdown(self) -> None:
        """After the servers closed: stop the watchdogs and the intake's parser process."""
        for p in (self.submission, self.intake):
            if p is not None:
                p.guard.close()
        if self.intake is not None:
            self.intake.pool.close()

    def reload(self, config: Config) -> None:
        """Take the new [submission] users and limits, the [intake] addresses and
        limits, and both TLS certificates read again (the config loaded and
        checked; a certificate that cannot be read is a ValueError: nothing taken).
        A listener added, removed or moved is a warning: the next start."""
        try:
            sub = SubmissionConfig.of(
                config.submission, limit=config.delivery.max_message_size
            )
            intake = IntakeConfig.of(config.intake)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"TLS certificate or key: {e}") from None
        for name, old, new in (("submission", self.submission, sub),
                               ("intake", self.intake, intake)):  # fmt: skip
            if (old is None) != (new is None) or (
                old is not None
                and new is not None
                and (old.cfg.listen != new.listen
                     or getattr(old.cfg, "listen_tls", []) != getattr(new, "listen_tls", []))
            ):  # fmt: skip
                log.warning("SIGHUP: [%s] listen changed; it takes effect at the next start",
                            name)  # fmt: skip
        if self.submission is not None and sub is not None:
            self.submission.reload(sub)
        if self.intake is not None and intake is not None:
            self.intake.reload(intake)


async def start_listeners(ctx: Any) -> Listeners:
    """Start the SMTP listeners the config names ([submission], [intake]); their servers."""
    cfg = ctx.config
    servers = Listeners()
    try:
        sub = SubmissionConfig.of(cfg.submission, limit=cfg.delivery.max_message_size)
        if sub is not None:
            servers.submission = _Submission(ctx, sub)
            proxy = ProxySettings.of(cfg.proxy)
            servers += await _serve(servers.submission, sub.listen, proxy)
            servers += await _serve(servers.submission, sub.listen_tls, proxy, implicit_tls=True)
        intake = IntakeConfig.of(cfg.intake)
        if intake is not None:
            servers.intake = _Intake(ctx, intake)
            servers += await _serve(servers.intake, intake.listen)
    except BaseException:
        for s in servers:
            s.close()
        raise
    return servers
