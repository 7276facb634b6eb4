"""An authenticated SMTP relay as a route: the ConnectOptions and limits of
a :class:`~fastsend.delivery.pool.SiteQueue` that submits to one host.

- TLS: ``starttls`` (the default) requires STARTTLS and a verified
  certificate before AUTH; ``implicit`` (the default on port 465, RFC 8314)
  speaks TLS from the first byte; ``opportunistic`` and ``off`` exist for
  closed networks. ``ca_file`` replaces the system trust store.
- AUTH: the mechanism configured, else the best offered (PLAIN or LOGIN
  inside TLS, CRAM-MD5 when in clear text), with the credentials of the
  transport (environment or 0600 file, fastsend.config.transports). A
  session that ends up without TLS (``off``; ``opportunistic`` with
  STARTTLS not offered, refused or failed) never sends the password (PLAIN,
  LOGIN) unless ``auth_in_clear = true``: it is deferred at "auth" instead.
- Limits: ``max_connections`` and ``rate`` (messages/s) are the relay's,
  across all workers: every session holds one of the node's places and every
  message spends from one bucket of the rate that the node's workers share
  (fastsend.transports.slots), so that together they never pass the total
  and one worker alone may use all of it (a lane's burst is the node's:
  at most ``ceil(rate)`` at once, 1 for a rate under 1/s).
  On a shared spool both span the nodes: the rate is one bucket in Redis
  (fastsend.queue.shaping), the connections are split among the live nodes
  (fastsend.shared_limits.ConnectionShares), each node's part of them here.

The connections themselves are the SiteQueue's (pipelined, reused,
shaped); this module only builds their settings, and reads the relay's
refusals of us (:func:`refused_us`): "554 5.7.1 Relay access denied", "530
Authentication required", a sender our login may not use -- the relay's
configuration or our credentials, not the recipient: deferred (and failed over
to the route's next transport), never bounced.
"""

from __future__ import annotations

import math
import re
import ssl
from typing import Any

from fastsend.config.transports import TransportSpec
from fastsend.outcome import DEFERRED, FAILED, Outcome
from fastsend.shaping.policy import Limits


def connect_options(spec: TransportSpec) -> dict[str, Any]:
    """ConnectOptions fields for the relay (AUTH secrets stay in memory only)."""
    tls = {"starttls": "required", "implicit": "required"}.get(spec.tls, spec.tls)
    ctx: ssl.SSLContext | None = None
    if tls == "required":
        ctx = ssl.create_default_context(cafile=spec.ca_file or None)
    opts: dict[str, Any] = {
        "tls": tls,
        "implicit_tls": spec.tls == "implicit",
        "ssl_context": ctx,
        "server_hostname": spec.host,
        "auth_mechanism": spec.auth_mechanism,
        "auth_in_clear": spec.auth_in_clear,
    }
    if spec.secrets.get("username"):
        opts["auth"] = (spec.secrets["username"], spec.secrets.get("password", ""))
    return opts


def limits(
    spec: TransportSpec,
    workers: int,
    ips: int,
    per_connection: int,
    total: int | None = None,
    shared_rate: bool = False,
) -> Limits:
    """This worker's share of the relay's limits, per lane (source IP).
    ``total``: this node's connections to the relay when several nodes share
    its ``max_connections`` (wire.TransportShares), else the whole of it.
    ``shared_rate``: the lanes also spend one bucket of the relay's rate that
    every worker of the node shares (transports.slots.SharedGcra): each lane
    may then take all of it (its AIMD ceiling); else each takes its part."""
    share = max(1, workers) * max(1, ips)
    conns = max(1, math.ceil((total or spec.max_connections) / share))
    rates: tuple[tuple[float, int], ...] = ()
    if spec.rate > 0:
        r = spec.rate if shared_rate else spec.rate / share
        rates = ((r, max(1, math.ceil(r))),)
    tls = {"starttls": "required", "implicit": "required"}.get(spec.tls, spec.tls)
    return Limits(conns, per_connection, rates, 0.0, tls, True, "")


# What a relay answers when it will not take mail from us, whoever the
# recipient: it does not relay for our address or login (Postfix "Relay access
# denied", Exchange/O365 "5.7.54 Unable to relay", "5.7.64 TenantAttribution;
# Relay Access Denied", Sendmail "Relaying denied", Exim "relay not
# permitted"), it wants AUTH first (RFC 4954's 530 5.7.0; O365 "5.7.57 Client
# was not authenticated"), or our login may not send as this sender (Postfix
# reject_sender_login_mismatch "not owned by user", O365 "5.7.60 Client does
# not have permissions to send as this sender", SES's SMTP interface "Email
# address is not verified"/"identities failed the check", "not authorized to
# perform ses:SendRawEmail", Google's "Invalid credentials for relay").
_REFUSED_US = re.compile(
    r"relay(?:ing)?\s+(?:access\s+)?(?:denied|not\s+permitted|prohibited|not\s+allowed)"
    r"|unable\s+to\s+relay|(?:not|isn't)\s+(?:permitted|allowed|authori[sz]ed)\s+to\s+relay"
    r"|we\s+do\s+not\s+relay|relay\s+not\s+(?:permitted|allowed|authori[sz]ed)"
    r"|authentication\s+(?:is\s+)?required|not\s+authenticated|must\s+(?:first\s+)?authenticate"
    r"|not\s+owned\s+by\s+(?:user|login)|permissions?\s+to\s+send\s+as"
    r"|not\s+authori[sz]ed\s+to\s+(?:send|perform|use)|identities\s+failed\s+the\s+check"
    r"|email\s+address\s+is\s+not\s+verified|invalid\s+credentials\s+for\s+relay",
    re.I,
)


def refused_us(o: Outcome) -> bool:
    """A relay's permanent refusal (at MAIL, RCPT or the end of data) that is
    about us, not the message or a recipient (see :data:`_REFUSED_US`; a 530
    is "authentication required" whatever its words)."""
    if o.kind != FAILED or not 500 <= o.code <= 599:
        return False
    if o.code == 530 or _REFUSED_US.search(o.text):
        return True
    from fastsend.bounce.reply import classify_reply

    try:
        return classify_reply(o.code, o.enhanced, o.text, command=o.stage).reason == "norelaying"
    except ValueError:
        return False


def as_configuration(o: Outcome, name: str) -> Outcome:
    """The refusal ``o`` of relay ``name`` as what it is: deferred (the
    relay's configuration or our credentials; the address is not suppressed,
    the message neither bounced nor lost, and a route with a next transport
    goes on to it), its reply kept."""
    text = f"relay {name} refused us, not the recipient (check its configuration): {o.text}"
    return Outcome(DEFERRED, o.code, o.enhanced, text[:400], o.stage, o.mx)
