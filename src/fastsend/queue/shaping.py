"""The supervisor's side of shaping (engine layer): limits that span workers,
and shaping state. The shaping area (``fastsend.shaping``) holds the policy,
pools, guardrails and the workers' lanes; this module applies them where the
supervisor dispatches.

NAME
    fastsend.queue.shaping -- DispatchGate, ShapingState, SupervisorShaping.

DESCRIPTION
    Maximum rates per campaign, per tenant and globally span every worker, so
    they are enforced where messages are handed out: the supervisor's
    dispatch. Config (``[shaping.dispatch]``; messages per second, 0 = none)::

        [shaping.dispatch]
        global_rate = 2000
        campaign_rate = 0            # default for every campaign
        tenant_rate = 0              # default for every tenant
        tenants = { acme = 100 }     # per tenant
    and per campaign, its option ``max_rate`` (``create_campaign(...,
    options={"max_rate": 50})``): a cap below ``campaign_rate``, never above.

    :meth:`DispatchGate.admit` answers how many of a (campaign) group may go
    now, consuming compiled GCRA buckets (burst: one second's worth); the
    supervisor holds the rest in memory (still in flight in the spool, still
    inside the worker's window, so memory stays bounded) and offers them
    again on the next tick.

    :class:`ShapingState` keeps the workers' warm-up counters (``DAY|IP|PROVIDER``
    -> messages sent that UTC day) in the spool (``Spool.add_counters``: they
    survive a restart and, on a Redis spool, add up over every node), written
    about once a second and at the end, and handed to each (re)started worker
    through its ring, and to every worker when other nodes' sends raised them.

    Shaping events from the workers (rate cuts and restores, rests,
    suspensions, throttles: ``{"event": "shaping", "action": ...}``) are
    written to ``shaping.jsonl`` next to the event log; a paused campaign is
    an event in the event log itself (``campaign_paused``).

    :class:`SupervisorShaping` bundles them with the guardrails and the pool
    choice of each campaign, so the supervisor calls a few methods only.

DELIBERATELY NOT HERE
    No SMTP and no per-site limits (workers own those: fastsend.shaping.lanes;
    an IP belongs to one node, so per-(IP, site) limits stay local).

SHARED
    On a shared spool (Redis: ``spool.shared_limits()`` is a
    :class:`fastsend.shared_limits.SharedLimits`) the campaign, tenant and
    global rates are one bucket for every node: each gate leases tokens in
    batches (:class:`fastsend.shared_limits.LeasedBucket`), about one Redis
    call per 100 messages at high rates. So is the ``rate`` of a transport
    (``[transports.NAME]``: a relay, a provider account) that a message's route
    sends through first: one bucket ``transport:NAME`` for every node.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastsend import wire
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.shaping.guardrails import Guardrails
from fastsend.shaping.lanes import THROTTLE_KEY, debt, spent
from fastsend.spool import Spool
from fastsend.throttle import Gcra

STATE_FILE = "shaping-state.json"
ROUTED_MAX = 100_000  # (campaign, domain) -> transport bucket entries kept
SHAPING_LOG = "shaping.jsonl"
# The workers' rests, suspensions and rule throttles of (source IP, site) still
# running (SupervisorShaping.site_rests), for the workers of the next start
RESTS_FILE = "shaping-rests.json"
RESTS_MAX = 10_000


SHARE_EVERY = 0.5  # s between renewals of the transports' connection split
SHARE_LINGER = 5.0  # s a node keeps its place in a transport's split after its last mail for it
# s between sweeps of SPOOL/lane-places/ (transports.slots.sweep: the files of
# the (source IP, site) places no worker holds nor waits on; the first at start)
PLACES_SWEEP_EVERY = 600.0


def _node_of(spool: Any) -> str:
    """The spool's node name (a Redis spool's ``node=``), through wrappers."""
    for _ in range(4):
        node = getattr(spool, "node", None)
        if isinstance(node, str) and node:
            return node
        spool = getattr(spool, "inner", None)
        if spool is None:
            break
    return ""


def _bucket(rate: float) -> Gcra | None:
    return Gcra(rate, max(1, round(rate))) if rate > 0 else None


class DispatchGate:
    def __init__(self, config: Config, spool: Spool, limits: Any = None) -> None:
        raw = config.shaping.dispatch
        self.spool = spool
        self.limits = limits  # SharedLimits: rates shared by every node
        self.campaign_rate = raw.campaign_rate
        self.tenant_rate = raw.tenant_rate
        self.tenant_rates = dict(raw.tenants)
        # name -> (rate, debt s, at): what the gate a SIGHUP replaced had spent
        # (carry), taken by the bucket of that name when it is made here.
        self.carried: dict[str, tuple[float, float, float]] = {}
        self.global_rate = raw.global_rate
        self.global_bucket = self._bucket("global", raw.global_rate)
        # campaign -> its buckets (campaign's own, tenant's); tenant -> bucket
        self.campaigns: dict[int, tuple[Any, ...]] = {}
        self.own: dict[int, Any] = {}  # campaign -> its own bucket (in campaigns too)
        self.tenants: dict[str, Any] = {}
        # A transport's rate (a relay's, a provider account's) is one limit for
        # every node on a shared spool: each node's workers keep their share of
        # it (rate / workers), so N nodes would send N times it; here the mail
        # routed to it is admitted from one bucket in Redis for all of them.
        self.config = config
        self.transport_rates = (
            {n: t.rate for n, t in config.transports.items() if t.rate > 0}
            if limits is not None
            else {}
        )
        self.transport_buckets: dict[str, Any] = {}
        self.routed: dict[tuple[int, str], Any] = {}  # (campaign, domain) -> bucket or None
        self.pool_of: Callable[[int], str] = lambda campaign: ""
        self.enabled = bool(
            self.global_bucket
            or self.campaign_rate
            or self.tenant_rate
            or self.tenant_rates
            or self.transport_rates
        )

    def _bucket(self, name: str, rate: float) -> Any:
        """A Gcra, or a LeasedBucket on the shared limits (burst: one second's worth)."""
        if rate <= 0:
            return None
        if self.limits is None:
            was = self.carried.pop(name, None)
            if was is not None:
                return spent(rate, max(1, round(rate)), *was)
            return _bucket(rate)
        return self.limits.leased("dispatch:" + name, rate, max(1, round(rate)))

    def _buckets(self, campaign: int) -> tuple[Any, ...]:
        bs = self.campaigns.get(campaign)
        if bs is None:
            info = self.spool.get_campaign(campaign)
            tenant = info.tenant if info else "default"
            rate = float((info.options or {}).get("max_rate", 0) or 0) if info else 0.0
            # A campaign's max_rate caps it, never raises it past the operator's
            # campaign_rate (a tenant sets it through the API).
            rate = min(rate, self.campaign_rate) if rate and self.campaign_rate else (
                rate or self.campaign_rate)  # fmt: skip
            out = []
            if (b := self._bucket(f"campaign:{campaign}", rate)) is not None:
                out.append(b)
                self.own[campaign] = b
            if tenant not in self.tenants:
                self.tenants[tenant] = self._bucket(
                    f"tenant:{tenant}", self.tenant_rates.get(tenant, self.tenant_rate)
                )
            if (tb := self.tenants[tenant]) is not None:
                out.append(tb)
            if self.global_bucket is not None:
                out.append(self.global_bucket)
            bs = self.campaigns[campaign] = tuple(out)
            if out:
                self.enabled = True
        return bs

    def carry(self, old: DispatchGate) -> None:
        """Start each rate where the gate this one replaces (a SIGHUP) left it:
        the global, each tenant's and each campaign's bucket as spent (scaled to
        a changed rate), so a reload releases no second burst. Before, the new
        gate's buckets started full. (Shared limits live in Redis: unchanged.)"""
        if self.limits is not None or old.limits is not None:
            return
        at = time.monotonic()
        named = [("global", old.global_bucket)]
        named += [(f"tenant:{t}", b) for t, b in old.tenants.items()]
        named += [(f"campaign:{c}", b) for c, b in old.own.items()]
        for name, b in named:
            if b is not None and (owed := debt(b, at)) > 0:
                self.carried[name] = (float(b.rate), owed, at)
        if "global" in self.carried and self.global_bucket is not None:
            self.global_bucket = self._bucket("global", self.global_rate)

    def transport_bucket(self, campaign: int, domain: str) -> Any:
        """The shared bucket of the transport the (campaign, domain)'s route
        sends through first, when that transport has a rate (else None)."""
        key = (campaign, domain)
        try:
            return self.routed[key]
        except KeyError:
            pass
        info = self.spool.get_campaign(campaign)
        named = None
        if info is not None:
            named = (campaign, (info.name, str(info.spec.get("name", ""))), info.tenant)
        route = self.config.route_lookup(domain, named, self.pool_of(campaign))
        name = route.transports[0] if route is not None and route.transports else ""
        b = None
        if (rate := self.transport_rates.get(name, 0.0)) > 0:
            b = self.transport_buckets.get(name)
            if b is None:
                b = self.transport_buckets[name] = self._bucket(f"transport:{name}", rate)
        if len(self.routed) >= ROUTED_MAX:
            self.routed.clear()
        self.routed[key] = b
        return b

    def rate_of(self, campaign: int, domain: str = "") -> float:
        """The lowest rate (messages/s) of the buckets ``campaign``'s mail to
        ``domain`` passes (0.0: none)."""
        bs = self._buckets(campaign)
        if self.transport_rates and (tb := self.transport_bucket(campaign, domain)) is not None:
            bs = (*bs, tb)
        return min((float(b.rate) for b in bs), default=0.0)

    def admit(self, campaign: int, n: int, now: float, domain: str = "") -> int:
        """How many of ``n`` messages of ``campaign`` (to ``domain``) may be
        dispatched now (consumed)."""
        bs = self._buckets(campaign)
        if self.transport_rates and (tb := self.transport_bucket(campaign, domain)) is not None:
            bs = (*bs, tb)
        if not bs:
            return n
        for b in bs:
            a = b.available(now)
            if a < n:
                n = a
                if n <= 0:
                    return 0  # the next buckets are not asked (a shared one is a round trip)
        if n > 0:
            for b in bs:
                b.acquire(now, n)
        return n


class ShapingState:
    """Warm-up counters (``DAY|IP|PROVIDER`` -> messages sent that UTC day) kept in
    the spool (counters ``warm:...``: they survive a restart and, on a shared
    spool, add up over the nodes). Workers report cumulative counts; the
    increases go to the spool about once a second, and the totals (other
    nodes' sends included) come back and are handed to the workers. A
    ``shaping-state.json`` written by an older version is taken over once."""

    def __init__(self, spool_dir: str, spool: Spool | None = None) -> None:
        self.path = os.path.join(spool_dir, STATE_FILE)
        self.spool = spool
        self.warm: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.changed = False  # totals grew beyond what the workers were told
        self.saved_at = 0.0
        self.read_at = 0.0
        today = int(time.time() // 86400)
        stored = self._read()
        old = [k for k in stored if not _recent(k, today)]
        if old and spool is not None:
            spool.drop_counters(WARM + k for k in old)
        self.warm = {k: v for k, v in stored.items() if _recent(k, today)}
        try:
            with open(self.path) as f:
                import json  # only for the legacy file, which a new spool never has

                data = json.load(f)
            legacy = {k: int(v) for k, v in data.get("warmup", {}).items() if _recent(k, today)}
        except (OSError, ValueError, AttributeError):
            legacy = {}
        self.merge(legacy)

    def _read(self) -> dict[str, int]:
        if self.spool is None:
            return {}
        return {k[len(WARM) :]: v for k, v in self.spool.counters(WARM).items()}

    def merge(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            cur = self.warm.get(k, 0)
            if v > cur:
                self.pending[k] = self.pending.get(k, 0) + v - cur
                self.warm[k] = v

    def save(self, now: float, force: bool = False) -> None:
        """Add the increases to the spool (about once a second) and take the totals
        back; every few seconds read every counter (other nodes' new keys)."""
        if self.spool is None or (not force and now - self.saved_at < 1.0):
            return
        self.saved_at = now
        totals: dict[str, int] = {}
        if self.pending:
            pending, self.pending = self.pending, {}
            got = self.spool.add_counters({WARM + k: v for k, v in pending.items()})
            totals = {k[len(WARM) :]: v for k, v in got.items()}
        if force or now - self.read_at >= 5.0:
            self.read_at = now
            totals.update(self._read())
        for k, v in totals.items():
            if v > self.warm.get(k, 0):
                self.warm[k] = v
                self.changed = True


WARM = "warm:"


def wire_json(rests: list[wire.IPRest]) -> bytes:
    """IPRest records as a JSON list (RESTS_FILE)."""
    import msgspec

    return msgspec.json.encode(rests)


def _recent(key: str, today: int) -> bool:
    """A warm-up counter of today or yesterday (older days no longer matter)."""
    day = key.split("|", 1)[0]
    return day.isdigit() and int(day) >= today - 1


# A rest told to the workers sharing an address (IPRest.reason starts with it),
# for the site named in its providers as SITE_PREFIX + the site's key.
SHARED_REST = "another worker's rest of this address: "
SITE_PREFIX = "site:"


class SupervisorShaping:
    """What the supervisor calls: gate, guardrails, pools, state, worker records."""

    def __init__(
        self, config: Config, spool: Spool, emit: Callable[[dict[str, Any]], None]
    ) -> None:
        from fastsend.shaping.pools import load_pools

        self.config = config
        self.spool = spool
        shared = getattr(spool, "shared_limits", None)
        self.limits = shared() if callable(shared) else None
        self.gate = DispatchGate(config, spool, self.limits)
        self.guardrails = Guardrails(spool, config.guardrails, emit)
        self.poolset = load_pools(config, time.time())
        self.gate.pool_of = self.pool_of
        self.state = ShapingState(config.spool_dir, spool)
        self.emit = emit
        # Shaping decisions (event "shaping") go to their own JSON-lines file next
        # to the event log, which stays one line per message outcome.
        self.log_path = os.path.join(os.path.dirname(config.event_log_path), SHAPING_LOG)
        self.log: EventLog | None = None
        self.listeners: list[Callable[[list[dict[str, Any]]], None]] = []  # e.g. dashboards
        self.ip_rests: list[wire.IPRest] = []  # blocklist rests, for (re)started workers
        # A worker's rest or suspension of (source IP, site) on a block reply:
        # each is told to the other workers sending from that address
        # (``Dispatch.share_rests``: origin worker, record), and kept for
        # workers started later until it ends ((ip, site) -> record).
        self.rests_to_share: list[tuple[int, wire.IPRest]] = []
        self.site_rests: dict[tuple[str, str], wire.IPRest] = {}
        # ... kept in the spool directory (RESTS_FILE) across a restart: a
        # stop, a crash, a `send` then `resume` (before, only a reload's
        # workers had them: a restart an hour into a receiver's 2-hour
        # suspension sent it mail again at once)
        self.rests_path = os.path.join(config.spool_dir, RESTS_FILE)
        self.rests_changed = False
        self._load_rests()
        self.warmup_offsets: dict[str, int] = {}  # engagement-aware warm-up, likewise
        # Each transport's max_connections split among the nodes (shared spool).
        self.shares: Any = None  # a fastsend.shared_limits.ConnectionShares
        self.shares_changed = False
        self.shares_at = 0.0
        self.swept_at = -PLACES_SWEEP_EVERY
        # () -> the (campaign, domain) of the mail in this node's windows (the
        # supervisor sets it): the transports this node has mail for take part
        # in their split, the others not (a node merely configured with one).
        self.demand: Callable[[], Iterable[tuple[int, str]]] | None = None
        self._chains: dict[tuple[int, str], tuple[str, ...]] = {}
        # campaign -> ((id, names, tenant), pool): what its routes are looked up by
        self._named: dict[int, tuple[tuple[int, tuple[str, str], str], str]] = {}
        self._wanted_at: dict[str, float] = {}  # transport -> last seen wanted (monotonic)
        self._start_shares(config)

    def _start_shares(self, config: Config) -> None:
        """Join the connection split of each transport a route names (a shared
        spool with transports); when other nodes already send through one, wait
        until they have seen this node (their next renewal) so that together
        they stay within it. From then on this node keeps its place in a split
        while it has mail for that transport (``tick``: its windows, then
        :data:`SHARE_LINGER` s), and leaves it when it has none, so a node
        merely configured with the transport (idle, or sending elsewhere) takes
        no part of it. Joining again later while others send, it keeps to 1
        connection until they have seen it (ConnectionShares, JOIN_GRACE)."""
        node = _node_of(self.spool)
        if self.limits is None or not config.transports or not node:
            return
        import math

        from fastsend.shared_limits import ConnectionShares

        totals = {n: t.max_connections for n, t in config.transports.items()}
        shares = ConnectionShares(self.limits, node, totals)
        mono = time.monotonic()
        for route in config.routes.values():
            for name in route.transports:
                self._wanted_at[name] = mono
        try:
            wanted = self.transports_wanted(mono)
            shares.refresh(wanted)
            if shares.others:
                time.sleep(4 * SHARE_EVERY)  # their renewals: every SHARE_EVERY s
                shares.joined = dict.fromkeys(shares.joined, -math.inf)  # they saw it
                shares.refresh(wanted)
        except Exception as e:  # Redis out of reach: each node's own limits until it is back
            print(f"fastsend: transport connection shares not read ({e.__class__.__name__}: {e});"
                  " trying again", file=sys.stderr, flush=True)  # fmt: skip
        self.shares = shares
        self.shares_changed = bool(shares.shares)
        self.shares_at = time.monotonic()

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: new dispatch rates, guardrail thresholds and pools. Buckets start
        afresh (a reload refills their burst); guardrail counts and warm-up
        counters carry over."""
        from fastsend.shaping.pools import load_pools

        self.config = config
        old, self.gate = self.gate, DispatchGate(config, self.spool, self.limits)
        self.gate.carry(old)  # no second burst of the dispatch rates
        self.guardrails.settings = config.guardrails
        self.poolset = load_pools(config, time.time())
        self.gate.pool_of = self.pool_of
        self._chains.clear()  # routes and pools may have changed
        self._named.clear()
        if self.shares is not None and sorted(config.transports) == self.shares.names:
            self.shares.totals = {n: t.max_connections for n, t in config.transports.items()}
            self.shares_at = 0.0  # renewed (and the new totals split) at the next tick
        elif self.shares is not None or config.transports:
            self.shares = None
            self._start_shares(config)

    def pool_of(self, campaign: int) -> str:
        """The source-IP pool a campaign's mail goes from (what its workers are told)."""
        info = self.spool.get_campaign(campaign)
        if info is None:
            return ""
        return self.poolset.pool_for(str((info.options or {}).get("pool", "")), info.tenant)

    def campaign_records(self, campaign: int) -> list[bytes]:
        """Records to send a worker with a campaign's spec (its pool)."""
        if self.spool.get_campaign(campaign) is None:
            return []
        pool = self.pool_of(campaign)
        return [wire.encoder.encode(wire.CampaignShaping(campaign, pool))]

    def rest_ip(self, rec: wire.IPRest) -> None:
        """Remember an IP rest (a blocklist listing) for workers started later: it
        replaces the IP's earlier rest under the same key (its renewal), and only
        that one (before, any: a listing on a second list, or SNDS's, made a worker
        restarted later forget the first)."""
        now = time.time()
        self.ip_rests = [r for r in self.ip_rests
                         if r.until > now and (r.ip, r.key) != (rec.ip, rec.key)]  # fmt: skip
        self.ip_rests.append(rec)

    def lift_ip(self, ip: str, key: str) -> bool:
        """Forget ``ip``'s rest under ``key``; True when there was one."""
        kept = [r for r in self.ip_rests if (r.ip, r.key) != (ip, key)]
        gone = len(kept) < len(self.ip_rests)
        self.ip_rests = kept
        return gone

    def spawn_records(self) -> list[bytes]:
        now = time.time()
        out = [wire.encoder.encode(r) for r in self.ip_rests if r.until > now]
        out += [wire.encoder.encode(r) for r in self.site_rests.values() if r.until > now]
        if self.shares is not None and self.shares.shares:
            out.append(self.shares_record())
        if self.warmup_offsets:
            out.append(wire.encoder.encode(wire.WarmupAdjust(dict(self.warmup_offsets))))
        if not self.state.warm:
            return out
        return [wire.encoder.encode(wire.WarmupCounts(dict(self.state.warm))), *out]

    def on_record(self, msg: Any, origin: int = -1) -> bool:
        """A worker's shaping record (from worker ``origin``); True when it was one."""
        if isinstance(msg, wire.ShapingEvents):
            if self.log is None:
                self.log = EventLog(self.log_path)
            self.log.emit_many(msg.events)
            for fn in self.listeners:
                fn(msg.events)
            for ev in msg.events:
                if ev.get("action") in ("rest", "suspend", "throttle"):
                    self.note_rest(ev, origin)
            return True
        if isinstance(msg, wire.WarmupCounts):
            self.state.merge(msg.counts)
            return True
        return False

    def log_event(self, ev: dict[str, Any]) -> None:
        """A shaping event of the supervisor's own (a site's recovery): to the
        shaping log and its listeners, as the workers' are."""
        if self.log is None:
            self.log = EventLog(self.log_path)
        self.log.emit_many([ev])
        for fn in self.listeners:
            fn([ev])

    def note_rest(self, ev: dict[str, Any], origin: int) -> None:
        """A worker rested or suspended a (source IP, site) lane: the address is
        refused there, from whichever worker it is sent; or a rule throttled
        it (under THROTTLE_KEY: each worker takes its part of the throttle).
        Told to the others sharing the address (a rest they were told is not
        told again)."""
        reason = str(ev.get("reason", ""))
        site = str(ev.get("site", ""))
        if ev.get("ordered") or reason.startswith(SHARED_REST) or not site:
            return  # (a rest the supervisor ordered reached every worker already)
        now = time.time()
        until = float(ev.get("time", now)) + float(ev.get("duration", 0.0) or 0.0)
        if until <= now:
            return
        ip = str(ev.get("source_ip", ""))
        key = ""
        if ev.get("action") == "throttle":  # (a rule's: applied as a throttle, not a rest)
            if not ev.get("rule"):
                return  # (no rule to apply it by)
            key = f"{THROTTLE_KEY}{ev['rule']}|{site}"
        rec = wire.IPRest(ip, [SITE_PREFIX + site], until, f"{SHARED_REST}{reason}", key)
        if len(self.site_rests) > 10_000:
            self.site_rests = {k: r for k, r in self.site_rests.items() if r.until > now}
        self.site_rests[(ip, key or site)] = rec
        self.rests_to_share.append((origin, rec))
        self.rests_changed = True

    def shares_record(self) -> bytes:
        assert self.shares is not None
        return wire.encoder.encode(
            wire.TransportShares(dict(self.shares.shares), dict(self.shares.nodes))
        )

    def broadcast_records(self) -> list[bytes]:
        """Records for every worker: warm-up totals that grew (other nodes' sends),
        this node's new share of the transports' connections (and node counts)."""
        out = []
        if self.shares_changed and self.shares is not None:
            self.shares_changed = False
            out.append(self.shares_record())
        if self.state.changed:
            self.state.changed = False
            out.append(wire.encoder.encode(wire.WarmupCounts(dict(self.state.warm))))
        return out

    def tick(self, force: bool = False) -> None:
        self.guardrails.flush()
        self.state.save(time.time(), force)
        if self.log is not None:
            self.log.flush()
        mono = time.monotonic()
        if self.shares is not None and (force or mono - self.shares_at >= SHARE_EVERY):
            self.shares_at = mono  # a failure (an outage) keeps the last shares
            if self.shares.refresh(self.transports_wanted(mono)):
                self.shares_changed = True
        if self.rests_changed:
            self.save_rests()
        if mono - self.swept_at >= PLACES_SWEEP_EVERY:
            self.swept_at = mono
            self.sweep_places()

    def _load_rests(self) -> None:
        """The rests :meth:`save_rests` kept that still run."""
        import msgspec

        try:
            with open(self.rests_path, "rb") as f:
                data = f.read(16 << 20)
            got = msgspec.json.decode(data, type=list[wire.IPRest])
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            print(f"fastsend: {self.rests_path} not read ({e}); the rests in it are forgotten",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        now = time.time()
        for r in got[-RESTS_MAX:]:
            prov = r.providers[0] if len(r.providers) == 1 else ""
            if r.until > now and prov.startswith(SITE_PREFIX):
                self.site_rests[(r.ip, r.key or prov[len(SITE_PREFIX) :])] = r

    def save_rests(self) -> None:
        """Write the rests that still run to RESTS_FILE (at the tick after one
        changed; a failure is tried again at the next)."""
        from fastsend import durable

        now = time.time()
        live = [r for r in self.site_rests.values() if r.until > now]
        try:
            if live or os.path.exists(self.rests_path):
                durable.replace(wire_json(live), self.rests_path)
        except OSError as e:
            print(f"fastsend: {self.rests_path} not written ({e}); trying again",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        self.rests_changed = False

    def sweep_places(self) -> int:
        """Remove the lane places files no worker uses now (a file per (source
        IP, site) that ever needed places: they grew with every site)."""
        from fastsend.transports.slots import sweep

        try:
            return sweep(os.path.join(self.config.spool_dir, "lane-places"))
        except OSError:
            return 0

    def transports_wanted(self, mono: float) -> set[str]:
        """The transports named by the routes of the mail in this node's windows
        now, or within the last :data:`SHARE_LINGER` s (between two batches a
        node keeps its place)."""
        if self.demand is not None and any(r.transports for r in self.config.routes.values()):
            chains = self._chains
            if len(chains) > 100_000:
                chains.clear()
                self._named.clear()
            wanted = self._wanted_at
            for key in set(self.demand()):
                chain = chains.get(key)
                if chain is None:
                    chain = chains[key] = self._chain(*key)
                for name in chain:
                    wanted[name] = mono
        for name in [n for n, t in self._wanted_at.items() if mono - t > SHARE_LINGER]:
            del self._wanted_at[name]  # no mail for it lately: its place goes to the others
        return set(self._wanted_at)

    def _chain(self, campaign: int, domain: str) -> tuple[str, ...]:
        """The transports a campaign's mail to ``domain`` may go through, as the
        worker's router finds them (campaign, tenant, pool, then domain routes)."""
        named = self._named.get(campaign)
        if named is None:  # once per campaign (a Redis round trip), not per domain
            info = self.spool.get_campaign(campaign)
            if info is None:
                return ()
            names = (info.name, str((info.spec or {}).get("name", "")))
            pool = self.poolset.pool_for(str((info.options or {}).get("pool", "")), info.tenant)
            named = self._named[campaign] = ((campaign, names, info.tenant), pool)
        route = self.config.route_lookup(domain, *named)
        return tuple(route.transports) if route is not None else ()

    def close(self) -> None:
        self.tick(force=True)
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.shares is not None:
            with contextlib.suppress(Exception):  # else its lease lapses by itself
                self.shares.leave()
            self.shares = None
