"""DNS blocklists: is a source IP listed? Checked by ``fastsend check-ip`` and, in serve, on a
schedule that rests a listed IP for the providers the list matters to.

NAME
    fastsend.analytics.dnsbl -- ReputationSettings, Blocklist, check, Reputation.

DESCRIPTION
    Config::

        [reputation]
        check_every = 3600          # seconds between checks in serve (0: never)
        rest_hours = 24             # a listed IP rests this long (re-checked, renewed)
        blocklists = [
          { zone = "zen.spamhaus.org", providers = ["*"] },
          { zone = "b.barracudacentral.org", providers = ["outlook", "yahoo"] },
        ]

    A lookup (RFC 5782) asks for the A record of the IP's reversed octets
    (IPv6: reversed nibbles) under the zone: NXDOMAIN is "not listed", an
    answer in 127.0.0.0/8 is "listed" with its return codes (and the TXT
    record's text, when there is one). Answers that are not listing codes
    -- 127.255.255.x, Spamhaus's "query refused" / "public resolver"
    replies, or anything outside 127/8 -- are errors, never listings, so a
    misconfigured resolver cannot rest every IP. Lookups go to the config's
    ``[dns] nameservers`` (the loopback test DNS server in tests).

    :class:`Reputation` keeps the last result per (IP, zone). A new listing
    emits ``{"event": "ip_listed", "source_ip", "zone", "codes", "text",
    "providers"}`` (and ``ip_delisted`` when it clears) and calls ``rest(ip,
    providers, until, reason, key, recheck)`` at every check while listed: the
    supervisor rests the IP's lanes for those providers ("*": every provider)
    under key ``dnsbl:ZONE``, renewed each time, and the mail the rest holds back
    comes back after ``check_every`` at most. A check that finds the IP no longer
    listed calls ``lift(ip, key)``: the rest ends then, not ``rest_hours`` later
    (before, a delisted IP stayed rested, its mail held, for up to a day).

DELIBERATELY NOT HERE
    No decision about which lists matter: the operator's config says so.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from fastsend import periodic
from fastsend.config import Config

log = logging.getLogger("fastsend.analytics.dnsbl")


@dataclass(frozen=True)
class Blocklist:
    zone: str
    providers: tuple[str, ...] = ("*",)


@dataclass
class ReputationSettings:
    blocklists: list[Blocklist] = field(default_factory=list)
    check_every: float = 3600.0
    rest_hours: float = 24.0

    @classmethod
    def from_config(cls, config: Config) -> ReputationSettings:
        """From ``[reputation]`` (typed and checked when the config loaded)."""
        r = config.reputation
        lists = [Blocklist(b.zone.strip(".").lower(), tuple(b.providers)) for b in r.lists]
        return cls(lists, r.check_every, r.rest_hours)


@dataclass
class Listing:
    ip: str
    zone: str
    listed: bool
    codes: list[str] = field(default_factory=list)
    text: str = ""
    error: str = ""
    checked: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "zone": self.zone, "listed": self.listed, "codes": self.codes,
                "text": self.text, "error": self.error, "checked": self.checked}  # fmt: skip


def query_name(ip: str, zone: str) -> str:
    """RFC 5782 2.1 / 2.4: reversed octets (IPv4) or nibbles (IPv6), then the zone."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        return ".".join(reversed(str(a).split("."))) + "." + zone
    return ".".join(reversed(a.exploded.replace(":", ""))) + "." + zone


def node_ips(config: Config) -> list[str]:
    """The node's source IPs: ``[ips] source`` and every pool's addresses."""
    ips = list(config.source_ips)
    if config.pools is not None:
        for p in config.pools.pools.values():
            ips.extend(e.ip for e in p.ips if e.ip not in ips)
    return ips


def make_resolver(config: Config) -> dns.asyncresolver.Resolver:
    from fastsend.delivery.mx import MXResolver

    return MXResolver(config).resolver


async def check(resolver: Any, ip: str, zone: str) -> Listing:
    now = time.time()
    name = query_name(ip, zone)
    try:
        ans = await resolver.resolve(name, "A")
    except dns.resolver.NXDOMAIN:
        return Listing(ip, zone, False, checked=now)
    except dns.resolver.NoAnswer:
        return Listing(ip, zone, False, checked=now)
    except (dns.exception.DNSException, OSError) as e:
        return Listing(ip, zone, False, error=f"lookup failed: {type(e).__name__}", checked=now)
    codes = sorted({r.address for r in ans})
    good = [c for c in codes if c.startswith("127.") and not c.startswith("127.255.255.")]
    if not good:  # 127.255.255.x (refused, public resolver) or not a listing code at all
        return Listing(ip, zone, False, codes, error="not a listing answer: " + ", ".join(codes),
                       checked=now)  # fmt: skip
    text = ""
    try:
        txt = await resolver.resolve(name, "TXT")
        text = " ".join(b"".join(r.strings).decode("utf-8", "replace") for r in txt)[:300]
    except (dns.exception.DNSException, OSError):
        pass
    return Listing(ip, zone, True, good, text, checked=now)


DNSBL = "dnsbl"  # the rollup store's states: "IP ZONE" -> "1" while listed


def rest_key(zone: str) -> str:
    """The key of the rest a listing on ``zone`` orders (wire.IPRest.key)."""
    return f"{DNSBL}:{zone}"


class Reputation:
    """Last results per (IP, zone); emits events and rests IPs on a new listing."""

    def __init__(
        self,
        settings: ReputationSettings,
        resolver: Any,
        emit: Callable[[dict[str, Any]], None],
        rest: Callable[..., None] | None = None,
        state: Any = None,
        lift: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.emit = emit
        self.rest = rest
        self.lift = lift
        self.rested: set[tuple[str, str]] = set()  # (IP, zone) this process rested
        self.results: dict[tuple[str, str], Listing] = {}
        # The rollup store (RollupStore.states, scope "dnsbl"): which (IP, zone) are
        # listed, kept over restarts, so a listing is told once and a delisting that
        # happened while the server was down is still told.
        self.state = state

    async def check_ips(self, ips: list[str]) -> list[Listing]:
        jobs = [check(self.resolver, ip, b.zone) for ip in ips for b in self.settings.blocklists]
        got = await asyncio.gather(*jobs)
        by_zone = {b.zone: b for b in self.settings.blocklists}
        until = time.time() + self.settings.rest_hours * 3600
        kept = self.state.states(DNSBL) if self.state is not None else None
        for res in got:
            key = (res.ip, res.zone)
            skey = f"{res.ip} {res.zone}"
            old = self.results.get(key)
            was = (kept.get(skey) == "1") if kept is not None else (old is not None and old.listed)
            if res.error:  # a failed lookup changes nothing
                res = Listing(res.ip, res.zone, was, old.codes if old else [],
                              old.text if old else "", res.error, res.checked)  # fmt: skip
            self.results[key] = res
            provs = list(by_zone[res.zone].providers)
            if res.listed:
                if not was and self._moved(skey, "", "1"):
                    self.emit({"event": "ip_listed", "source_ip": res.ip, "zone": res.zone,
                               "codes": res.codes, "text": res.text, "providers": provs})  # fmt: skip
                if self.rest is not None and self.settings.rest_hours > 0:
                    self.rest(res.ip, provs, until,
                              f"listed on {res.zone} ({', '.join(res.codes)})",
                              rest_key(res.zone), self.settings.check_every)  # fmt: skip
                    self.rested.add(key)
                continue
            if res.error:
                continue
            if key in self.rested:  # (whichever node tells the event: each lifts its own)
                self.rested.discard(key)
                if self.lift is not None:
                    self.lift(res.ip, rest_key(res.zone))
            if was and self._moved(skey, "1", ""):
                self.emit({"event": "ip_delisted", "source_ip": res.ip, "zone": res.zone})
        return got

    def _moved(self, key: str, was: str, value: str) -> bool:
        return self.state is None or bool(self.state.set_state(DNSBL, key, was, value))

    def status(self, ip: str) -> list[dict[str, Any]]:
        out = []
        for b in self.settings.blocklists:
            r = self.results.get((ip, b.zone))
            out.append(r.as_dict() if r is not None else
                       {"ip": ip, "zone": b.zone, "listed": False, "codes": [], "text": "",
                        "error": "", "checked": 0.0})  # fmt: skip
        return out

    async def loop(self, ips: Callable[[], list[str]]) -> None:
        every = self.settings.check_every
        if every <= 0 or not self.settings.blocklists:
            return
        await periodic.every(every, lambda: self.check_ips([ip for ip in ips() if ip]),
                             "blocklist check", log)  # fmt: skip
