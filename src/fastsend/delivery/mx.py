"""Where to deliver a domain's mail: static routes, then MX (RFC 5321 s5.1).

dnspython's asyncio resolver does the lookups (chosen over aiodns: pure Python,
no c-ares build, gives TTLs and typed answers, and honours per-resolver
nameserver:port settings, which the loopback test DNS server needs).

Answers are cached by their TTL (floored at 5 s, capped at 1 h; failures are
cached for 30 s). Lookups of one name already under way are shared: the
batches of a domain not yet cached (a campaign's first seconds), or many
domains of one provider naming the same MX host, ask the DNS once. The result is a :class:`Site` — the sorted set of MX host names
that serve the domain (and their preference order), so every domain hosted by one
provider shares a site — or
an :class:`~fastsend.outcome.Outcome` saying why there is none:

- null MX (RFC 7505, "0 .")     -> failed 556 5.1.10
- MX records naming IP addresses, not hosts (RFC 5321 5.1) -> skipped; none
  left: failed 5.4.4 (never connected to)
- NXDOMAIN                      -> failed 5.1.2 (host unknown)
- no MX: the domain's own A/AAAA is the implicit MX; none either -> failed 5.1.2
- timeout / SERVFAIL            -> deferred 4.4.3
- MX (or implicit MX) addresses all loopback, private, link-local, ULA or
  otherwise not global (fastsend.netguard: NAT64/6to4 by their IPv4) -> failed 5.4.4,
  unless ``[delivery] allow_private_mx``
  (a hostile domain must not make the MTA connect to internal hosts; static
  routes are the operator's and stay allowed)

A domain delivered by MX also gets its MTA-STS policy (delivery/mtasts.py,
``[tls] mta_sts``): the TXT query goes beside the MX query, and a domain with
a policy in force gets a site of its own (key ``...|sts:DOMAIN``, the policy
in :attr:`Site.sts`, in enforce mode only its MX hosts that match the policy),
while its connections share the MX set's shaping lanes (:attr:`Site.lanes`).

It does not connect anywhere; delivery/pool.py does.

dnspython is imported (and the resolver configured) on the first lookup, not at
start: a run whose domains all go to static routes at IP addresses never loads
it. :func:`prepare` imports it before the supervisor forks the workers when the
config may look a name up, so the workers share those pages instead of each
importing it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from fastsend import netguard
from fastsend.config import Config, Route, parse_nameserver
from fastsend.delivery import dane
from fastsend.delivery.mtasts import MTASTS, Policy, has_tlsrpt
from fastsend.outcome import DEFERRED, FAILED, Outcome

if TYPE_CHECKING:
    import dns.asyncresolver


def may_resolve(config: Config) -> bool:
    """Whether delivery on ``config`` may look a name up in DNS: any domain not
    covered by a static route to an IP address (routes of transports included:
    their relays and "smtp" hops may name hosts)."""
    catch_all = config.routes.get("*")
    if catch_all is None:
        return True
    return any(not r.host or not _is_ip(r.host) for r in config.routes.values())


def prepare(config: Config) -> None:
    """Before fork: import dnspython once, in the supervisor, when ``config`` may
    need it (each worker would otherwise import it, ~20-40 ms of CPU each)."""
    if may_resolve(config):
        import dns.asyncresolver
        import dns.exception
        import dns.resolver  # noqa: F401


class Host(msgspec.Struct, frozen=True):
    name: str  # MX host name (or route host)
    address: str  # IP to connect to
    port: int
    pref: int = 0  # the MX preference (0 for a route): equal ones share the load
    # its usable TLSA records, DNSSEC-authenticated ([tls] dane): STARTTLS required,
    # the certificate checked against them (delivery/dane.py)
    tlsa: tuple[dane.Tlsa, ...] = ()
    # where ``tlsa`` was found when not at ``name`` (RFC 7672 2.2.2: the MX name
    # is an alias, its CNAME chain authenticated, the records at its target):
    # the TLSA base domain, sent as SNI and a DANE-TA reference identifier
    tlsa_name: str = ""


class Site(msgspec.Struct, frozen=True):
    """A set of receiving hosts, in preference order. ``key`` names the site
    (its ready queue); ``sts``: the recipient domain's MTA-STS policy in force
    (enforce or testing), which its connections apply."""

    key: str
    hosts: tuple[Host, ...]
    sts: Policy | None = None
    dane: str = ""  # the recipient domain whose MX hosts have TLSA records (DANE)

    @property
    def lanes(self) -> str:
        """The key of the site's shaping lanes: the MX set's, with or without a
        policy (one domain's policy must not double the connections to its
        provider)."""
        return self.key.partition("|")[0]


T = TypeVar("T")
_MIN_TTL, _MAX_TTL, _NEG_TTL = 5.0, 3600.0, 30.0
CACHE_MAX = 20000  # entries per cache: expired ones go first, then the oldest half


class MXResolver:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._resolver: dns.asyncresolver.Resolver | None = None
        self.mx_port = config.dns.mx_port
        # A domain's MX is anyone's to set: by default it may not point mail at this
        # machine or its private network (static routes are the operator's and may).
        self.allow_private = config.delivery.allow_private_mx
        # An IPv6 source address: MX hosts' AAAA records are asked beside their A
        # (an IPv4 answer was enough, and an IPv6-only pool could reach no host
        # that had both: each connection "Address family not supported")
        self.ipv6 = any(":" in ip for ip in config.source_ips)
        self._cache: dict[str, tuple[float, Site | Outcome]] = {}
        self._addr_cache: dict[str, tuple[float, list[str]]] = {}
        # [tls] dane: a host name -> (its CNAME-expanded name, whether its address
        # answer was authenticated), from its last address lookup (_host_tlsa)
        self._canonical: dict[str, tuple[str, bool]] = {}
        self._route_cache: dict[tuple[str, int], tuple[float, Site]] = {}
        # domain as a batch names it -> its static route (or None): the routes
        # are the config's, fixed for the process; looked up per batch.
        self._route_of: dict[str, Route | None] = {}
        # Lookups under way, by (kind, name): a second asker awaits the first's.
        self._inflight: dict[tuple[str, str], asyncio.Future[Any]] = {}
        # MTA-STS policies (None: [tls] turns them off for every domain)
        t = config.tls
        self.dane = t.dane == "on"
        self.sts: MTASTS | None = (
            MTASTS(config, self._txt, self._policy_addresses)
            if t.mta_sts == "on" or "on" in t.domains.values() or t.dane == "on"
            else None  # (with DANE alone: its reports only)
        )
        # TLS-RPT's no-policy-found sessions (RFC 8460 4.4): a domain delivered
        # without a policy whose `_smtp._tls` record asks for reports has its
        # sessions counted; asked beside the MX query, only when sessions are
        # counted and reports can be sent ([tls] report_from)
        self.count_no_policy = self.sts is not None and bool(t.report_from)
        self._tlsrpt: dict[str, tuple[float, bool]] = {}

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        """dnspython's resolver, made on the first lookup."""
        if self._resolver is None:
            self._resolver = self._make_resolver()
        return self._resolver

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        import dns.asyncresolver

        config = self.config
        import dns.nameserver

        resolver = dns.asyncresolver.Resolver(configure=not config.dns.nameservers)
        if config.dns.nameservers:
            # Each asked on its own port (one port for all took the last one named:
            # "127.0.0.1:5353" beside "10.0.0.1" asked 10.0.0.1 on 5353 too).
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns))
                for ns in config.dns.nameservers
            ]
        resolver.lifetime = config.dns.timeout
        resolver.timeout = config.dns.timeout
        if self.dane:
            import dns.flags

            # ask the (trusted, validating) resolver to say what it authenticated
            resolver.use_edns(0, dns.flags.DO, 1232)
            resolver.flags = dns.flags.RD | dns.flags.AD
        return resolver

    def cached(self, domain: str) -> Site | Outcome | None:
        """The site of ``domain`` when known without a lookup (a fresh cache
        entry, or a route to an IP literal), else None: then await site_for().
        Lets a worker place a batch without a task per batch."""
        try:
            route = self._route_of[domain]
        except KeyError:  # (the first batch for this domain name)
            if len(self._route_of) >= CACHE_MAX:
                self._route_of.clear()
            route = self._route_of[domain] = self.config.route_for(domain.lower().rstrip("."))
        now = time.monotonic()
        hit: tuple[float, Site | Outcome] | None
        if route is not None and route.host:
            hit = self._route_cache.get((route.host, route.port))
        else:
            hit = self._cache.get(domain.lower().rstrip("."))
        if hit is not None and hit[0] > now:
            return hit[1]
        return None

    async def site_for(self, domain: str) -> Site | Outcome:
        domain = domain.lower().rstrip(".")
        route = self.config.route_for(domain)
        if route is not None and route.host:  # a route of transports sends "smtp" by MX
            now = time.monotonic()
            rkey = (route.host, route.port)
            rhit = self._route_cache.get(rkey)
            if rhit is not None and rhit[0] > now:
                return rhit[1]
            addrs = await self._route_addresses(route.host)
            if isinstance(addrs, Outcome):
                return addrs
            # One Site object per route while its addresses are fresh (forever for
            # an IP literal), so each batch does not build one again.
            site = Site(
                f"route:{route.host}:{route.port}",
                tuple(Host(route.host, a, route.port) for a in addrs),
            )
            if _is_ip(route.host):
                expires = float("inf")
            else:
                ahit = self._addr_cache.get(route.host)
                expires = ahit[0] if ahit is not None else now
            _put(self._route_cache, rkey, (expires, site), now)  # type: ignore[arg-type]
            return site
        now = time.monotonic()
        hit = self._cache.get(domain)
        if hit is not None and hit[0] > now:
            return hit[1]
        return await self._shared("mx", domain, self._lookup_and_cache)

    async def _lookup_and_cache(self, domain: str) -> Site | Outcome:
        sts = self.sts
        # (a task beside the MX query, like the policy's)
        rpt = (
            asyncio.ensure_future(self._tlsrpt_lookup(domain))
            if self.count_no_policy and domain[:1] != "["
            else None
        )
        if sts is not None and self.config.mta_sts_for(domain):
            # Beside the MX query, not after it: no policy costs no time.
            (result, ttl), (policy, pttl) = await asyncio.gather(
                self._lookup(domain), sts.policy(domain)
            )
            if isinstance(result, Site):
                ttl = min(ttl, pttl)  # the TXT record is asked again when its answer ends
                # DANE wins over MTA-STS (RFC 8461 2): TLSA records say more
                if policy is not None and not any(h.tlsa for h in result.hosts):
                    result = self._with_policy(result, policy)
        else:
            result, ttl = await self._lookup(domain)
        if rpt is not None:
            await rpt
            if isinstance(result, Site) and (result.sts is not None or result.dane):
                # a domain under a policy is never no-policy-found (its report
                # mail goes without the policy, RFC 8460 5.3: not a session of it)
                self._tlsrpt.pop(domain, None)
        now = time.monotonic()
        _put(self._cache, domain, (now + ttl, result), now)
        return result

    async def _tlsrpt_lookup(self, domain: str) -> None:
        """Whether ``domain`` publishes a TLS-RPT record (``reports_tls``); a
        failed lookup counts as none (its sessions go uncounted for a while)."""
        try:
            texts, ttl = await self._txt(f"_smtp._tls.{domain}")
        except Exception:
            texts, ttl = None, _NEG_TTL
        now = time.monotonic()
        _put(self._tlsrpt, domain, (now + max(_MIN_TTL, ttl), has_tlsrpt(texts or [])), now)

    def reports_tls(self, domain: str) -> bool:
        """Whether ``domain`` (lower case) asked for TLS-RPT reports when its
        MX was last looked up: its sessions without a policy are counted."""
        hit = self._tlsrpt.get(domain)
        return hit is not None and hit[1]

    async def _shared(self, kind: str, name: str, lookup: Callable[[str], Awaitable[T]]) -> T:
        """``lookup(name)``, or the result of the same lookup already under way."""
        key = (kind, name)
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)  # type: ignore[no-any-return]
        fut = asyncio.ensure_future(lookup(name))
        self._inflight[key] = fut
        fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    def _literal(self, domain: str) -> Site | Outcome:
        """The site of a recipient at an address literal, ``u@[192.0.2.1]`` or
        ``u@[IPv6:2001:db8::1]``: that address, as any MX address is (not a
        private one unless [delivery] allow_private_mx). It was looked up as a
        name ("[192.0.2.1]": NXDOMAIN), a hard bounce that suppressed it."""
        inner = domain[1:-1]
        inner = inner[5:] if inner[:5].lower() == "ipv6:" else inner
        try:
            address = str(ipaddress.ip_address(inner))
        except ValueError:
            return _fail("5.1.2", f"{domain} is not an address literal")
        refused: list[str] = []
        if not self._public([address], refused):
            return _refused(domain, refused)
        return Site(f"literal:{address}", (Host(address, address, self.mx_port),))

    def _public(self, addrs: list[str], refused: list[str]) -> list[str]:
        """``addrs`` without loopback, private, link-local, ULA and other non-global
        addresses (appended to ``refused``), unless [delivery] allow_private_mx."""
        if self.allow_private:
            return addrs
        ok = []
        for a in addrs:
            if _is_global(a):
                ok.append(a)
            else:
                refused.append(a)
        return ok

    async def route_site(self, key: str, host: str, port: int) -> Site | Outcome:
        """The site of a fixed host (a static route, a relay): its addresses."""
        addrs = await self._route_addresses(host)
        if isinstance(addrs, Outcome):
            return addrs
        return Site(key, tuple(Host(host, a, port) for a in addrs))

    def _with_policy(self, site: Site, policy: Policy) -> Site | Outcome:
        """``site`` under ``policy``: its own key; in enforce mode only the MX
        hosts the policy names (none: deferred, never an unlisted MX)."""
        hosts = site.hosts
        if policy.mode == "enforce":
            hosts = tuple(h for h in site.hosts if policy.matches(h.name))
            if not hosts:
                names = ", ".join(sorted({h.name for h in site.hosts}))
                text = (
                    f"MTA-STS policy of {policy.domain} (enforce): no MX host ({names})"
                    f" matches its mx {', '.join(policy.mx)}"
                )
                assert self.sts is not None
                self.sts.report(
                    policy.domain, policy.mode, "validation-failure", text,
                    mx=names, source_ip="", went=False, policy=policy.lines, mx_host=policy.mx,
                )  # fmt: skip
                return Outcome(DEFERRED, 451, "4.7.5", text, "sts")
        return Site(f"{site.key}|sts:{policy.domain}", hosts, policy)

    async def _txt(self, name: str) -> tuple[list[str] | None, float]:
        """The TXT strings of ``name`` (None: no record) and their TTL; raises
        on a DNS failure."""
        import dns.resolver

        try:
            ans = await self.resolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None, 3600.0  # a domain without a policy: asked again in an hour at most
        ttl = float(ans.rrset.ttl) if ans.rrset is not None else 300.0
        return [b"".join(r.strings).decode("utf-8", "replace") for r in ans], ttl

    async def _policy_addresses(self, name: str) -> list[str] | str:
        """The addresses of a policy host (mta-sts.DOMAIN), held to the MX rule
        (a domain's owner must not make this MTA fetch from its private network)."""
        addrs = await self._addresses(name)
        if isinstance(addrs, Outcome):
            return addrs.text
        refused: list[str] = []
        ok = self._public(addrs, refused)
        return ok if ok else _refused(name, refused).text

    @property
    def cache_entries(self) -> int:
        return len(self._cache) + len(self._addr_cache) + len(self._route_cache)

    async def _lookup(self, domain: str) -> tuple[Site | Outcome, float]:
        if domain.startswith("["):  # an address literal (RFC 5321 4.1.3): no DNS
            return self._literal(domain), _MAX_TTL
        import dns.exception
        import dns.resolver

        try:
            ans = await self.resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            return _fail("5.1.2", f"domain {domain} does not exist (NXDOMAIN)"), _NEG_TTL
        except dns.resolver.NoAnswer as e:
            # RFC 5321 5.1: no MX -> the domain itself is the implicit MX.
            addrs = await self._addresses(domain)
            if isinstance(addrs, Outcome):
                return addrs, _NEG_TTL
            refused: list[str] = []
            addrs = self._public(addrs, refused)
            if not addrs:
                return _refused(domain, refused), _NEG_TTL
            own: tuple[dane.Tlsa, ...] = ()
            base = ""
            if self.dane and self._authenticated(e.response()):
                # RFC 7672 2.2.2: an authenticated denial of MX records makes the
                # domain its own MX host, its TLSA records at _25._tcp.DOMAIN
                # (or at its CNAME target, 2.2.3)
                got = await self._host_tlsa(domain)
                if isinstance(got, Outcome):  # 2.2: a failed lookup, maybe an attack
                    return got, _NEG_TTL
                own, base = got
            key = f"mx:{domain}" + (f"|dane:{domain}" if own else "")
            implicit = tuple(Host(domain, a, self.mx_port, 0, own, base) for a in addrs)
            return Site(key, implicit, dane=domain if own else ""), 300.0
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            return _defer(f"MX lookup for {domain} failed: {e.__class__.__name__}"), _NEG_TTL
        except dns.exception.DNSException as e:
            return _defer(f"MX lookup for {domain} failed: {e}"), _NEG_TTL
        ttl = min(_MAX_TTL, max(_MIN_TTL, float(ans.rrset.ttl if ans.rrset else 300)))
        records = sorted((r.preference, str(r.exchange).rstrip(".").lower()) for r in ans)
        if any(name in ("", ".") for _, name in records) or (
            len(records) == 1 and records[0][1] in ("", ".")
        ):
            return (
                # reported 556 5.1.10, as RFC 7505 has it (it was 550)
                _fail("5.1.10", f"domain {domain} does not accept mail (null MX, RFC 7505)", 556),
                ttl,
            )
        # RFC 5321 5.1, RFC 1035 3.3.9: an MX names a host. One that reads as an
        # address ("10 192.0.2.1.") is the domain's misconfiguration, never
        # connected to (as Postfix: "numeric domain name in resource data of MX
        # record"); the domain's other MX records still serve.
        numeric = [name for _, name in records if _is_ip(name)]
        if numeric:
            records = [r for r in records if not _is_ip(r[1])]
            if not records:
                shown = ", ".join(numeric[:4])
                return (
                    _fail(
                        "5.4.4",
                        f"MX of {domain} names an IP address ({shown}), not a host name"
                        " (RFC 5321 5.1): a misconfigured domain, not used",
                    ),
                    ttl,
                )
        hosts: list[Host] = []
        last_err: Outcome | None = None
        refused = []
        # DANE: only for an MX answer the (trusted) resolver authenticated
        secure = self.dane and self._authenticated(ans.response)
        for pref, name in records:
            addrs = await self._addresses(name)
            if isinstance(addrs, Outcome):
                last_err = addrs
                continue
            tlsa: tuple[dane.Tlsa, ...] = ()
            base = ""
            if secure:
                got = await self._host_tlsa(name)
                if isinstance(got, Outcome):  # RFC 7672 2.2: not this host, maybe an attack
                    last_err = got
                    continue
                tlsa, base = got
            ok = self._public(addrs, refused)
            hosts.extend(Host(name, a, self.mx_port, pref, tlsa, base) for a in ok)
        if not hosts and refused:
            return _refused(domain, refused), ttl
        if not hosts:
            assert last_err is not None
            return _defer(f"no address for any MX of {domain}: {last_err.text}"), _NEG_TTL
        key = "mx:" + ",".join(sorted({name for _, name in records})) + _order(records)
        if any(h.tlsa for h in hosts):
            key += f"|dane:{domain}"  # its own queue, the MX set's lanes (Site.lanes)
        return Site(key, tuple(hosts), dane=domain if "|dane:" in key else ""), ttl

    @staticmethod
    def _authenticated(response: Any) -> bool:
        """Whether the (trusted, validating) resolver flagged ``response`` AD."""
        import dns.flags

        return response is not None and bool(response.flags & dns.flags.AD)

    async def _host_tlsa(self, name: str) -> tuple[tuple[dane.Tlsa, ...], str] | Outcome:
        """The usable TLSA records of host ``name`` and their base domain when
        it is not ``name`` (RFC 7672 2.2.2, RFC 7671 7): a host name that is an
        alias whose CNAME chain the resolver authenticated (its address answer
        AD) has its records looked for at the fully expanded name first, then,
        none there, at ``name``; an unauthenticated chain whose first CNAME is
        authenticated, at ``name`` only (its target is anyone's to name). A
        host whose address records are not authenticated (nor its first CNAME)
        does not do DANE: no TLSA lookup at all (2.2.2; an unsigned zone's
        servers that fail TLSA queries must not hold its mail back)."""
        if name not in self._canonical:  # (emptied, CACHE_MAX, since its address lookup)
            await self._shared("a", name, self._address_lookup)
        canonical, secure = self._canonical.get(name, (name, False))
        if secure and canonical != name:
            got = await self._shared("tlsa", canonical, self._tlsa)
            if isinstance(got, Outcome) or got:
                return got if isinstance(got, Outcome) else (got, canonical)
        elif not secure and (
            canonical == name or not await self._shared("cname", name, self._cname_secure)
        ):
            return (), ""
        got = await self._shared("tlsa", name, self._tlsa)
        return got if isinstance(got, Outcome) else (got, "")

    async def _cname_secure(self, name: str) -> bool:
        """Whether alias ``name``'s own CNAME record is authenticated (asked by
        type: the answer is not chased into the target's unsigned zone)."""
        import dns.exception

        try:
            ans = await self.resolver.resolve(name, "CNAME", search=False)
        except dns.exception.DNSException:
            return False
        return self._authenticated(ans.response)

    async def _tlsa(self, name: str) -> tuple[dane.Tlsa, ...] | Outcome:
        """The usable TLSA records of MX host ``name`` (``_PORT._tcp.NAME``) when
        the answer is authenticated; () for none or an unauthenticated one; an
        Outcome when the lookup failed (the host must not be used)."""
        import dns.exception
        import dns.flags
        import dns.resolver

        try:
            ans = await self.resolver.resolve(f"_{self.mx_port}._tcp.{name}", "TLSA", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return ()
        except dns.exception.DNSException as e:
            return _defer(f"TLSA lookup for {name} failed: {e.__class__.__name__}")
        if not self._authenticated(ans.response):
            return ()
        return dane.usable([(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in ans])

    async def _route_addresses(self, name: str) -> list[str] | Outcome:
        """The addresses of a host the operator named (a static route, a
        relay): the DNS, else the system's resolver, /etc/hosts included
        ("localhost", a relay named there; dnspython reads no hosts file);
        not found, deferred (4.3.5): the configuration's fault, never the
        recipient's. A route to "localhost" was NXDOMAIN, failed 5.1.2
        "hostunknown": every recipient bounced hard and suppressed."""
        addrs = await self._addresses(name)
        if not isinstance(addrs, Outcome):
            return addrs
        if addrs.kind != FAILED:
            return addrs  # a DNS failure (deferred): asked again later
        found = await _system_addresses(name, self.ipv6)  # (no such name, or no address)
        if found:
            now = time.monotonic()
            _put(self._addr_cache, name, (now + _SYSTEM_TTL, found), now)
            return found
        return Outcome(
            DEFERRED, 451, "4.3.5",
            f"route host {name}: {addrs.text} (check the [routes]/[transports] host)",
            "dns",
        )  # fmt: skip

    async def _addresses(self, name: str) -> list[str] | Outcome:
        # Literal IPs need no lookup.
        if _is_ip(name):
            return [name]
        hit = self._addr_cache.get(name)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return await self._shared("a", name, self._address_lookup)

    async def _address_lookup(self, name: str) -> list[str] | Outcome:
        now = time.monotonic()
        import dns.exception
        import dns.resolver

        addrs: list[str] = []
        ttl = _MAX_TTL
        nx = False
        for rtype in ("A", "AAAA"):
            try:
                ans = await self.resolver.resolve(name, rtype, search=False)
            except dns.resolver.NXDOMAIN:
                nx = True
                break
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException as e:
                return _defer(f"address lookup for {name} failed: {e.__class__.__name__}")
            addrs.extend(r.address for r in ans)
            if ans.rrset is not None:
                ttl = min(ttl, float(ans.rrset.ttl))
            if self.dane and addrs:  # (DANE's TLSA base domain: _host_tlsa)
                if len(self._canonical) >= CACHE_MAX:
                    self._canonical.clear()
                canonical = str(ans.canonical_name).rstrip(".").lower()
                self._canonical[name] = (canonical, self._authenticated(ans.response))
            if addrs and not self.ipv6:
                break  # IPv4 is enough for IPv4 source addresses
        if not addrs:
            return _fail("5.1.2", f"host {name} has no address" + (" (NXDOMAIN)" if nx else ""))
        _put(self._addr_cache, name, (now + max(_MIN_TTL, ttl), addrs), now)
        return addrs


# How long a route host's addresses from the system's resolver are kept.
_SYSTEM_TTL = 60.0


async def _system_addresses(name: str, ipv6: bool) -> list[str]:
    """``name``'s addresses from getaddrinfo (nsswitch: /etc/hosts, then its
    DNS): IPv4 ones only when there are some and no source address is IPv6."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    found: list[str] = []
    for family, _t, _p, _n, addr in infos:
        a = str(addr[0])
        if family in (socket.AF_INET, socket.AF_INET6) and a not in found:
            found.append(a)
    v4 = [a for a in found if ":" not in a]
    return found if ipv6 or not v4 else v4


def _order(records: list[tuple[int, str]]) -> str:
    """The preference order of an MX set of more than one preference, as a key
    suffix (``|pref:A;B,C``: A first, then B and C, equal): two domains naming
    the same hosts in other orders need queues of their own, each trying its
    own preferred host first (RFC 5321 5.1), while their connections share the
    MX set's lanes (:attr:`Site.lanes`, the key before the first ``|``). Keyed
    by the sorted names only, the first domain's order was every domain's: a
    domain whose preferred host was the other's backup had all its mail sent
    to its backup."""
    tiers: dict[int, set[str]] = {}
    seen: set[str] = set()
    for pref, name in records:  # (sorted by preference)
        if name not in seen:
            seen.add(name)
            tiers.setdefault(pref, set()).add(name)
    if len(tiers) < 2:
        return ""
    return "|pref:" + ";".join(",".join(sorted(t)) for t in tiers.values())


def _put(
    cache: dict[str, tuple[float, Any]], key: str, value: tuple[float, Any], now: float
) -> None:
    """Insert, keeping the cache bounded (memory flat however many domains a run sees)."""
    if len(cache) >= CACHE_MAX:
        for k in [k for k, (exp, _) in cache.items() if exp <= now]:
            del cache[k]
        excess = len(cache) - CACHE_MAX // 2
        if excess > 0:
            for k in list(itertools.islice(cache, excess)):  # oldest first
                del cache[k]
    cache.pop(key, None)
    cache[key] = value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _is_global(text: str) -> bool:
    """A public address (fastsend.netguard.public: IPv4-mapped, NAT64 and 6to4 by the
    IPv4 address they carry; site-local and IPv4-compatible never). Python's
    ``is_global`` alone took ``64:ff9b::7f00:1`` and ``2002:7f00:1::`` for public."""
    return netguard.public(text)


def _refused(domain: str, addrs: list[str]) -> Outcome:
    shown = ", ".join(sorted(set(addrs))[:4])
    return _fail(
        "5.4.4",
        f"MX of {domain} resolves only to non-public addresses ({shown}): refused"
        " ([delivery] allow_private_mx = true allows it)",
    )


def _fail(enhanced: str, text: str, code: int = 550) -> Outcome:
    return Outcome(FAILED, code, enhanced, text, "dns")


def _defer(text: str) -> Outcome:
    return Outcome(DEFERRED, 451, "4.4.3", text, "dns")
