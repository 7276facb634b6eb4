"""Host names and addresses as SMTP says them, shared by the checks
(:mod:`fastsend.authcheck`) and the workers' EHLO choice
(:mod:`fastsend.delivery.ehlo`): an IP address, an address literal, a name in
its EHLO form, a fully qualified name. Imports nothing heavy (no dnspython): the
send path uses it."""

from __future__ import annotations

import ipaddress
import re

# A name that is not a name on the internet: a receiver's HELO checks reject it
# (Postfix reject_non_fqdn_helo_hostname wants a dot; "localhost.localdomain" has
# one and names nobody). RFC 6761 6.3 (localhost), RFC 6762 (local), and the
# "localdomain" every default /etc/hosts carries.
_LOCAL_TLDS = frozenset({"localhost", "localdomain", "local"})
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def is_ip(s: str) -> bool:
    """Whether ``s`` (a trailing dot allowed, as DNS answers print one) is an IP address."""
    try:
        ipaddress.ip_address(s.rstrip("."))
    except ValueError:
        return False
    return True


def address_literal(ip: str) -> str:
    """The RFC 5321 4.1.3 address literal of ``ip``: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``."""
    a = ipaddress.ip_address(ip.partition("%")[0])  # a link-local socket's %scope is local
    if a.version == 6:
        if a.ipv4_mapped is not None:
            return f"[{a.ipv4_mapped}]"
        return f"[IPv6:{a.compressed}]"
    return f"[{a}]"


def host_name(name: str) -> str:
    """``name`` as said in EHLO: an internationalised name in A-labels (RFC 5890;
    EHLO comes before the server says whether it takes UTF-8), lower case, no
    trailing dot (RFC 5321 4.1.2 Domain has none); "" when it is not a name."""
    n = name.strip().rstrip(".")
    if not n or n.startswith("["):
        return ""
    if not n.isascii():
        import idna  # IDNA 2008 + UTS 46, as fastsend.address.idna_domain (a sibling layer)

        try:
            n = idna.encode(n, uts46=True).decode("ascii")
        except Exception:  # idna.IDNAError and its codec's other refusals
            return ""
    return n.lower()


def is_fqdn(name: str) -> bool:
    """Whether ``name`` is a fully qualified domain name a receiver can look up:
    two labels or more, valid labels, a top label that is not numeric and not a
    local-only one (``localhost``, ``localdomain``, ``local``)."""
    n = host_name(name)
    if not n or len(n) > 253 or is_ip(n):
        return False
    labels = n.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        return False
    top = labels[-1]
    return not top.isdigit() and top not in _LOCAL_TLDS
