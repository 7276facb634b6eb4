"""A real authoritative DNS server on loopback, serving in-memory test zones.

Used by tests (MX routing, SPF/DKIM/DMARC checks, PTR) and by demos; it speaks
real DNS over UDP and TCP through dnslib, so the resolver code under test is
exercised exactly as in production.

    zones = {
        "example.test": [("MX", "10 mx1.example.test."), ("TXT", "v=spf1 ip4:127.0.0.2 -all")],
        "mx1.example.test": [("A", "127.0.0.1")],
        "2.0.0.127.in-addr.arpa": [("PTR", "out1.example.test.")],
    }
    with DNSServer(zones) as dns:
        dns.port  # -> nameserver 127.0.0.1:dns.port

Names are matched case-insensitively; a name with no records answers NXDOMAIN,
a name with records but none of the asked type answers NOERROR with no answer
(NODATA). A CNAME is followed within the zones, as a recursive resolver
answers (the CNAME, then the target's records of the asked type); a name
with a ``("SERVFAIL", "")`` record answers SERVFAIL (a broken zone). It does
not do wildcards, DNSSEC or delegation; a name with a ``("SECURE", "")``
record has its answers flagged authenticated (the AD bit), as a validating
resolver flags a signed zone's (DANE tests); an answer through a CNAME chain
only when every name of the chain has one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

try:
    from dnslib import QTYPE, RCODE, RR, DNSRecord
    from dnslib.server import BaseResolver, DNSLogger
    from dnslib.server import DNSServer as _LibServer
except ImportError as exc:  # pragma: no cover - dnslib is a test dependency
    raise ImportError("fastsend.testing.dnsserver needs dnslib (pip install dnslib)") from exc

Record = tuple[str, str] | tuple[str, str, int]


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zones: dict[str, Iterable[Record]], default_ttl: int) -> None:
        self.default_ttl = default_ttl
        self.zones: dict[str, list[tuple[str, str, int]]] = {}
        self.lock = threading.Lock()
        self.set_zones(zones)
        self.queries: list[tuple[str, str]] = []

    def set_zones(self, zones: dict[str, Iterable[Record]]) -> None:
        norm: dict[str, list[tuple[str, str, int]]] = {}
        for name, recs in zones.items():
            key = name.rstrip(".").lower()
            out = norm.setdefault(key, [])
            for rec in recs:
                rtype, value = rec[0].upper(), rec[1]
                ttl = rec[2] if len(rec) > 2 else self.default_ttl  # type: ignore[misc]
                out.append((rtype, value, int(ttl)))
        with self.lock:
            self.zones = norm

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        reply.header.ad = 0  # (dnslib copies the query's AD bit) authenticated: SECURE names only
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        self.queries.append((qname, qtype))
        with self.lock:
            zones = self.zones
        name = qname
        secure = True  # every name of the chain so far is SECURE
        for _hop in range(8):  # a CNAME chain, followed as a recursive resolver would
            records = zones.get(name)
            if records is None:
                if name == qname:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply
            if any(rtype == "SERVFAIL" for rtype, _v, _t in records):
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            secure = secure and any(rtype == "SECURE" for rtype, _v, _t in records)
            reply.header.ad = int(secure)
            target = ""
            for rtype, value, ttl in records:
                if rtype == qtype or (rtype == "CNAME" and qtype != "CNAME"):
                    zone = f"{name}. {ttl} IN {rtype} {_quote(rtype, value)}"
                    for rr in RR.fromZone(zone):
                        reply.add_answer(rr)
                    if rtype == "CNAME" and qtype != "CNAME":
                        target = value.rstrip(".").lower()
            if not target:
                break
            name = target
        return reply


def _quote(rtype: str, value: str) -> str:
    if rtype != "TXT":
        return value
    if value.startswith('"'):
        return value
    # Split long TXT values into 255-octet character-strings, as DNS requires.
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class DNSServer:
    """UDP+TCP DNS server on ``address`` (default 127.0.0.1) and a free port."""

    def __init__(
        self,
        zones: dict[str, Iterable[Record]] | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
        default_ttl: int = 300,
    ) -> None:
        self.resolver = _ZoneResolver(zones or {}, default_ttl)
        self.address = address
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        # UDP and TCP share one port number. With port 0 the kernel picks a free UDP
        # port, and the same TCP port may be taken (another test's connection):
        # then try another port rather than fail.
        for attempt in range(50):
            self._udp = _LibServer(
                self.resolver, address=address, port=port, tcp=False, logger=quiet
            )
            self.port: int = self._udp.server.server_address[1]
            try:
                self._tcp = _LibServer(
                    self.resolver, address=address, port=self.port, tcp=True, logger=quiet
                )
                break
            except OSError:
                self._udp.server.server_close()
                if port or attempt == 49:
                    raise

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def set_zones(self, zones: dict[str, Iterable[Record]]) -> None:
        self.resolver.set_zones(zones)

    def start(self) -> DNSServer:
        self._udp.start_thread()
        self._tcp.start_thread()
        return self

    def stop(self) -> None:
        self._udp.stop()
        self._tcp.stop()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def query(name: str, rtype: str, port: int, address: str = "127.0.0.1") -> Any:
    """Ask the server directly (handy in tests of the server itself)."""
    q = DNSRecord.question(name, rtype)
    return DNSRecord.parse(q.send(address, port, timeout=2))
