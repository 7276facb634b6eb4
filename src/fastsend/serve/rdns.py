"""Forward-confirmed reverse DNS names of SMTP clients, for our Received field.

NAME
    fastsend.serve.rdns -- ReverseNames(nameservers, timeout).

DESCRIPTION
    A submission session starts its client's lookup when it connects
    (:meth:`ReverseNames.start`) and takes the answer when it writes a Received
    field (:meth:`ReverseNames.name`), as Postfix writes ``from HELO (NAME [IP])``:
    the PTR names of the address, and of those the first whose A (AAAA) records
    hold the address again (FCrDNS: anyone can make a PTR record say any name,
    only the name's owner its address records). A name that does not come back
    to the address, no PTR, a DNS failure or no answer within ``timeout`` (from
    the connection's start) is None: ``unknown``, as Postfix writes it. A name
    is taken only when it is a host name (letters, digits, hyphens, dots): a
    PTR record is anyone's text, and it goes into a header field.

    Answers are kept ``KEEP`` seconds (``FAILED_KEEP`` for a failure), at most
    ``MAX_KEPT`` addresses, and one lookup runs at a time per address: a client
    opening many connections costs one lookup.

DELIBERATELY NOT HERE
    No policy: a client without a name is not refused (submission is
    authenticated; an application's host seldom has a PTR record).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import OrderedDict
from typing import Any

from fastsend.config.base import parse_nameserver

__all__ = ["ReverseNames"]

KEEP = 600.0  # s a name found (or found missing) is kept
FAILED_KEEP = 60.0  # s a lookup that failed (timeout, SERVFAIL) is kept
MAX_KEPT = 10_000
MAX_PTRS = 4  # PTR names of one address tried forward
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9\-]{0,61}"
    r"[A-Za-z0-9])?"
)


class ReverseNames:
    """Reverse names of client addresses (see the module), on the running loop."""

    def __init__(self, nameservers: list[str], timeout: float) -> None:
        self.nameservers = list(nameservers)
        self.timeout = timeout
        self._resolver: Any = None
        self._kept: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._running: dict[str, asyncio.Future[str | None]] = {}

    def _make_resolver(self) -> Any:
        import dns.asyncresolver
        import dns.nameserver

        r = dns.asyncresolver.Resolver(configure=not self.nameservers)
        if self.nameservers:
            r.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in self.nameservers
            ]
        r.lifetime = r.timeout = self.timeout
        return r

    def start(self, ip: str) -> asyncio.Future[str | None] | None:
        """Begin (or join) the lookup of ``ip``; None when the answer is kept already."""
        now = time.monotonic()
        got = self._kept.get(ip)
        if got is not None and got[0] > now:
            return None
        fut = self._running.get(ip)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup(ip))
            self._running[ip] = fut
        return fut

    async def name(self, ip: str, deadline: float) -> str | None:
        """The confirmed name of ``ip``, waiting for its lookup until ``deadline``
        (monotonic); None when it has none (or is not known by then)."""
        fut = self.start(ip)
        if fut is None:
            return self._kept[ip][1] if ip in self._kept else None
        wait = deadline - time.monotonic()
        if wait <= 0 and not fut.done():
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(wait, 0.0))
        except (TimeoutError, asyncio.CancelledError):
            return None

    def _keep(self, ip: str, name: str | None, failed: bool) -> None:
        self._kept[ip] = (time.monotonic() + (FAILED_KEEP if failed else KEEP), name)
        self._kept.move_to_end(ip)
        while len(self._kept) > MAX_KEPT:
            self._kept.popitem(last=False)

    async def _lookup(self, ip: str) -> str | None:
        name: str | None = None
        failed = False
        try:
            name = await asyncio.wait_for(self._confirmed(ip), self.timeout)
        except Exception:  # (a timeout, SERVFAIL, no nameserver: no name, for a while)
            failed = True
        finally:
            self._running.pop(ip, None)
        self._keep(ip, name, failed)
        return name

    async def _confirmed(self, ip: str) -> str | None:
        import dns.resolver
        import dns.reversename

        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if self._resolver is None:
            self._resolver = self._make_resolver()
        res = self._resolver
        try:
            ptrs = await res.resolve(dns.reversename.from_address(ip), "PTR")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        rtype = "A" if addr.version == 4 else "AAAA"
        for rr in list(ptrs)[:MAX_PTRS]:
            host = rr.target.to_text(omit_final_dot=True)
            if not host.isascii() or _HOST.fullmatch(host) is None or len(host) > 253:
                continue
            try:
                fwd = await res.resolve(host, rtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            if any(ipaddress.ip_address(a.address) == addr for a in fwd):
                return host.lower()
        return None
