"""Which network addresses a request made for a tenant may reach (SSRF guard).

A tenant's webhook URL is the tenant's choice: a URL whose host is, or
resolves to, an address inside the operator's network (loopback, RFC 1918,
ULA, link-local with the cloud metadata service at 169.254.169.254, CGNAT,
...) would make the server POST into it. :func:`public` says whether an
address is one the Internet routes; :func:`literal` reads a URL host written
as an address in any spelling the system resolver takes (``2130706433``,
``0177.0.0.1``, ``0x7f.1``, ``127.1``, ``[::ffff:127.0.0.1]``): getaddrinfo
reads those as addresses, so a check of the name alone would pass them.

Checking a name when the URL is given is not enough (its DNS answer can change
between the check and the request: DNS rebinding), so the connection itself is
checked: fastsend.serve.webhooks opens tenants' sockets through :func:`refused`
on the very address it connects to.

An IPv6 address carrying an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, NAT64
``64:ff9b::/96``, 6to4 ``2002::/16``) is judged by the IPv4 address inside;
multicast, the deprecated site-local ``fec0::/10`` and IPv4-compatible
``::a.b.c.d`` are never public.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

__all__ = ["Networks", "describe", "literal", "networks", "public", "refused"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_COMPAT = ipaddress.ip_network("::/96")  # IPv4-compatible (RFC 4291 2.5.5.1, deprecated)
# What inet_aton reads as an IPv4 address: 1 to 4 parts, each decimal, octal or hex.
_V4_SPELLING = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}")
# RFC 6761 6.3: these names are loopback wherever they are looked up.
_LOOPBACK_NAMES = ("localhost", ".localhost")


def networks(specs: Iterable[str]) -> Networks:
    """``["127.0.0.0/8", "10.1.2.3"]`` as networks; ValueError naming a bad one."""
    out = []
    for s in specs:
        try:
            out.append(ipaddress.ip_network(s.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{s!r} is not an address or network (CIDR)") from None
    return tuple(out)


def _embedded(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4), else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def public(ip: IPAddress | str) -> bool:
    """Whether ``ip`` is a global unicast address (an IPv6 one carrying IPv4 judged
    by that): not loopback, private, shared (CGNAT), link-local, reserved,
    documentation, unspecified, broadcast or multicast."""
    try:
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and (
        addr in _SITE_LOCAL or (addr in _COMPAT and int(addr) > 1)
    ):
        return False
    addr = _embedded(addr)
    return addr.is_global and not addr.is_multicast


def refused(ip: IPAddress | str, allow: Networks = ()) -> bool:
    """Whether a tenant's request must not reach ``ip``: not :func:`public` and in
    none of the operator's ``allow`` networks (an IPv4-mapped address matched by
    its IPv4 form too)."""
    try:
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        return True
    if public(addr):
        return False
    forms = {addr, _embedded(addr)}
    return not any(a.version == n.version and a in n for a in forms for n in allow)


def literal(host: str) -> IPAddress | None:
    """The address a URL host names without DNS: an IPv6 literal (brackets or not,
    a zone id dropped), an IPv4 address in any spelling inet_aton takes, or the
    loopback names (``localhost``, ``*.localhost``: 127.0.0.1); None for other names."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0].rstrip(".")
    if h == _LOOPBACK_NAMES[0] or h.endswith(_LOOPBACK_NAMES[1]):
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if _V4_SPELLING.fullmatch(h):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def describe(allow_key: str) -> str:
    """The end of a refusal: what it covers and where the operator allows it."""
    return (
        "a loopback, private, link-local, shared or otherwise non-public address:"
        f" refused for a tenant's URL ({allow_key} allows networks)"
    )
