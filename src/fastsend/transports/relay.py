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
shaped); this module only builds their settings.
"""

from __future__ import annotations

import math
import ssl
from typing import Any

from fastsend.config.transports import TransportSpec
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
