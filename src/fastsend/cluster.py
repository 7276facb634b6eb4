"""Many nodes as one MTA: what a node on the shared Redis checks and holds.

NAME
    fastsend.cluster -- read_durability, ClusterNode.

DESCRIPTION
    Several ``fastsend serve`` nodes share one Redis (``[spool] url =
    "redis://..."``): one queue, one set of limits. Before such a node
    accepts anything it

    - reads Redis's persistence settings (``CONFIG GET appendonly
      appendfsync save``, ``INFO server/persistence``) and states what an
      acknowledged message survives (:func:`read_durability`):

      ========================  ==================================================
      ``appendfsync always``    a power loss (every write fsynced before the reply)
      ``everysec`` + WAITAOF    a power loss (Redis >= 7.2: the spool waits with
                                ``WAITAOF`` before it answers "accepted")
      ``everysec``, no WAITAOF  a crash of redis-server, not a power loss (the
                                last second may be lost)
      ``appendfsync no``        a crash of redis-server (the kernel flushes)
      ``appendonly no``         nothing: memory only (RDB snapshots are periodic)
      ========================  ==================================================

      and refuses ``appendonly no`` unless the operator says
      ``--allow-volatile``;
    - claims its source IPs in a registry (:class:`ClusterNode`; ``send``
      and ``resume`` on a shared spool too): ``P:ips``
      maps each IP to the node holding it, ``P:ipnodes`` each node to its
      lease deadline (ms, Redis server time). A node refuses to start with an
      IP another *live* node holds (two nodes sending from one IP would each
      count only half of that IP's per-site rates and warm-up); an IP whose
      holder's lease expired (it died) is taken over. The lease is renewed
      every ``lease/4`` seconds; a clean exit gives the IPs back at once.
    - takes the installation secret (HMAC key of Message-IDs, VERP and
      tracking links) from Redis, created once by the first node
      (:meth:`ClusterNode.shared_secret`), unless ``[tracking] secret`` is set:
      a link signed by one node verifies on every other.

    - publishes its status about once a second (:meth:`ClusterNode.publish`:
      ``P:status`` node -> JSON, ``P:seen`` node -> Redis time of the last
      one) so the dashboard of any node lists every live node with its IPs,
      lease and rates, and the cluster's totals (:meth:`ClusterNode.members`).

    ``P`` is the spool's ``{prefix}`` (a Redis Cluster hash tag).

DELIBERATELY NOT HERE
    No queue (fastsend.spool.redis), no rate limits (fastsend.shared_limits).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("fastsend.cluster")


class ClusterError(Exception):
    """This node must not start on this Redis (durability, a source IP in use)."""


@dataclass
class Durability:
    version: str
    appendonly: bool | None  # None: CONFIG GET refused (a managed Redis)
    appendfsync: str  # always / everysec / no / unknown
    rdb: bool  # RDB snapshots configured ("save" not empty)
    waitaof: bool  # Redis >= 7.2: the spool waits for the fsync itself
    level: str  # power-loss / redis-crash / none / unknown (CONFIG and INFO refused)
    survives: str  # one sentence for the operator
    evicts: str = ""  # maxmemory-policy when Redis deletes keys at maxmemory ("": it never does)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        try:
            out.append(int(part))
        except ValueError:
            out.append(0)
    return tuple(out)


def read_durability(r: Any) -> Durability:
    """What an acknowledged write to this Redis survives (see the module doc)."""

    def s(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    def info(section: str) -> dict[str, Any] | None:
        # None: refused (an ACL user without INFO, e.g. -@dangerous; serve did
        # not start for such a user, a traceback)
        try:
            return dict(r.info(section))
        except Exception as e:
            if "permission" in str(e).lower() or "unknown command" in str(e).lower():
                return None
            raise

    server = info("server") or {}
    version = s(server.get("redis_version", "unknown"))
    evicts = _evicts(r, info)
    waitaof = _version_tuple(version) >= (7, 2)
    appendonly: bool | None
    try:
        conf = {s(k): s(v) for k, v in r.config_get("appendonly").items()}
        conf.update({s(k): s(v) for k, v in r.config_get("appendfsync").items()})
        conf.update({s(k): s(v) for k, v in r.config_get("save").items()})
        appendonly = conf.get("appendonly", "no") == "yes"
        fsync = conf.get("appendfsync", "unknown")
        rdb = bool(conf.get("save", "").strip())
    except Exception:  # CONFIG renamed or refused: what INFO says
        pers = info("persistence")
        appendonly = None if pers is None else bool(int(pers.get("aof_enabled", 0)))
        fsync = "unknown"
        rdb = True
    if appendonly is None:
        level = "unknown"
        survives = (
            "what this Redis's persistence makes it survive, which this user may not"
            " read (CONFIG and INFO refused): run it with appendonly yes"
        )
        return Durability(version, appendonly, fsync, rdb, waitaof, level, survives, evicts)
    if not appendonly:
        level = "none"
        survives = (
            "nothing: Redis keeps accepted mail in memory only (appendonly no"
            + (
                "; RDB snapshots are periodic, mail accepted since the last one is lost"
                if rdb
                else ""
            )
            + ")"
        )
    elif fsync == "always":
        level = "power-loss"
        survives = "a power loss: every write is fsynced before Redis answers (appendfsync always)"
    elif fsync == "everysec" and waitaof:
        level = "power-loss"
        survives = (
            "a power loss: appendfsync everysec, and the spool waits for the fsync"
            " (WAITAOF) before it answers"
        )
    elif fsync in ("everysec", "no"):
        level = "redis-crash"
        survives = (
            f"a crash of redis-server, not a power loss or kernel crash (appendfsync {fsync},"
            f" Redis {version} has no WAITAOF: up to the last second may be lost;"
            " set appendfsync always, or run Redis >= 7.2)"
        )
    else:
        level = "redis-crash"
        survives = "a crash of redis-server (AOF on; its fsync policy could not be read)"
    return Durability(version, appendonly, fsync, rdb, waitaof, level, survives, evicts)


def _evicts(r: Any, info: Callable[[str], dict[str, Any] | None]) -> str:
    """The maxmemory-policy when this Redis deletes keys to stay under maxmemory
    (any policy but noeviction, with a maxmemory set): queued messages, a
    campaign, a node's lease deleted without a word; "" when it refuses writes
    instead (OOM: the spool's outage, nothing lost) or cannot be read."""
    try:
        got = {str(k.decode() if isinstance(k, bytes) else k): v
               for k, v in r.config_get("maxmemory*").items()}  # fmt: skip
        policy, limit = got.get("maxmemory-policy"), got.get("maxmemory")
    except Exception:  # CONFIG renamed or refused: what INFO says
        mem = info("memory") or {}
        policy, limit = mem.get("maxmemory_policy"), mem.get("maxmemory")
    if isinstance(policy, bytes):
        policy = policy.decode()
    try:
        limited = int(limit or 0) > 0
    except (TypeError, ValueError):
        limited = False
    return str(policy) if limited and policy and policy != "noeviction" else ""


def evicts_text(policy: str) -> str:
    return (
        f"Redis deletes keys at maxmemory (maxmemory-policy {policy}): queued mail, a"
        " campaign or a node's lease could be dropped without a word. Set"
        " maxmemory-policy noeviction (deploy/redis.conf: at maxmemory writes are refused,"
        " answered 507, and what is accepted stays)"
    )


def check_durability(d: Durability, *, allow_volatile: bool) -> None:
    """Refuse a Redis that keeps accepted mail in memory only, or deletes keys
    at maxmemory (an eviction policy: mail gone without a bounce), unless allowed."""
    if d.evicts and not allow_volatile:
        raise ClusterError(evicts_text(d.evicts) + ", or start with --allow-volatile to accept that")
    if d.level == "none" and not allow_volatile:
        raise ClusterError(
            "Redis has appendonly no: an acknowledged message would survive "
            + d.survives.split(":", 1)[0]
            + ". Set appendonly yes (deploy/redis.conf), or start with --allow-volatile"
            " to accept that"
        )


# KEYS: ips hash, nodes zset. ARGV: node, lease_ms, dead nodes ('|' between: known
# dead, their lease notwithstanding), ips... -> {} or {ip, holder, ...}
_CLAIM_IPS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, lease = ARGV[1], tonumber(ARGV[2])
local dead = {}
for d in string.gmatch(ARGV[3], '[^|]+') do dead[d] = true end
local taken = {}
for i = 4, #ARGV do
  local holder = redis.call('HGET', KEYS[1], ARGV[i])
  if holder and holder ~= node and not dead[holder] then
    local dl = redis.call('ZSCORE', KEYS[2], holder)
    if dl and tonumber(dl) > now then
      taken[#taken + 1] = ARGV[i]
      taken[#taken + 1] = holder
    end
  end
end
if #taken > 0 then return taken end
for i = 4, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], node) end
redis.call('ZADD', KEYS[2], now + lease, node)
return taken
"""

# KEYS: ips hash, nodes zset. ARGV: node, lease_ms, ips... -> the IPs another live
# node holds now. One no live node holds (released, its holder's lease lapsed, or
# gone with Redis's data) is this node's again.
_RENEW_IPS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local lost = {}
for i = 3, #ARGV do
  local holder = redis.call('HGET', KEYS[1], ARGV[i])
  if holder ~= ARGV[1] then
    local dl = holder and redis.call('ZSCORE', KEYS[2], holder)
    if dl and tonumber(dl) > now then
      lost[#lost + 1] = ARGV[i]
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
    end
  end
end
return lost
"""

# KEYS: ips hash, nodes zset. ARGV: node, ips...
_RELEASE_IPS = """
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""


# KEYS: ips hash. ARGV: node, ips... (those the node holds given back; its lease stays)
_DROP_IPS = """
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 0
"""


STATUS_STALE = 5.0  # s without a status: a node is not listed as live
STATUS_FORGET = 3600.0  # s without a status: its record is dropped

# KEYS: seen zset, status hash. ARGV: node, JSON, forget_ms -> Redis time (ms)
_PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]), 'LIMIT', 0, 100)
for _, n in ipairs(old) do
  redis.call('HDEL', KEYS[2], n)
  redis.call('ZREM', KEYS[1], n)
end
return now
"""


def dead_here(r: Any, prefix: str, node: str) -> list[str]:
    """The other node names whose last process (``P:holders``: the spool's
    node-name holds) ran on this host and is gone: their IPs are not waited
    for (their lease may still run)."""
    from fastsend.spool.base import holder_gone

    out = []
    for name, tag in r.hgetall("{" + prefix + "}:holders").items():
        try:
            h = orjson.loads(tag)
        except orjson.JSONDecodeError:
            continue
        if _s(name) != node and isinstance(h, dict) and holder_gone(h):
            out.append(_s(name))
    return out


class ClusterNode:
    """One node's hold on its source IPs, and the shared secret."""

    def __init__(self, r: Any, prefix: str, node: str, lease: float = 30.0) -> None:
        self.r = r
        self.k = "{" + prefix + "}"
        self.node = node
        self.lease = float(lease)
        self.ips: list[str] = []
        self._claim = r.register_script(_CLAIM_IPS)
        self._renew = r.register_script(_RENEW_IPS)
        self._release = r.register_script(_RELEASE_IPS)
        self._publish = r.register_script(_PUBLISH)
        self.lost: list[str] = []  # IPs another node took while our lease had lapsed

    @property
    def _keys(self) -> list[str]:
        return [f"{self.k}:ips", f"{self.k}:ipnodes"]

    def claim_ips(self, ips: list[str], dead: Iterable[str] = ()) -> None:
        """Hold ``ips`` for this node, or ClusterError naming the live node holding one.
        ``dead``: node names known dead whatever their lease (their last process
        ran on this host and is gone: a kill -9 of ``send`` and the ``resume``
        after it, each under its own default node name)."""
        taken = self._claim(
            keys=self._keys, args=[self.node, int(self.lease * 1000), "|".join(dead), *ips]
        )
        if taken:
            pairs = [f"{_s(taken[i])} (node {_s(taken[i + 1])})" for i in range(0, len(taken), 2)]
            raise ClusterError(
                "source IP held by another live node: "
                + ", ".join(pairs)
                + "; each IP must belong to one node (per-site rates and warm-up are per IP)"
            )
        self.ips = list(ips)

    def add_ips(self, ips: list[str]) -> None:
        """A reload's source IPs held beside those this node holds (ClusterError
        naming the live node holding one, and nothing changed)."""
        both = list(dict.fromkeys([*self.ips, *ips]))
        self.claim_ips(both)

    def keep_ips(self, ips: list[str]) -> None:
        """Give back at once the IPs this node holds and ``ips`` lacks (a reload
        dropped them); its lease on the others stays."""
        gone = [ip for ip in self.ips if ip not in ips]
        if gone:
            self.r.eval(_DROP_IPS, 1, self._keys[0], self.node, *gone)
        self.ips = [ip for ip in self.ips if ip in ips]
        self.lost = [ip for ip in self.lost if ip in self.ips]

    def renew(self) -> list[str]:
        """Extend the lease; returns IPs another live node holds now (our lease
        lapsed and it claimed them). One no live node holds any more (that
        node released it or died, or Redis lost the registry) is ours again."""
        if not self.ips:
            return []
        lost = [
            _s(x)
            for x in self._renew(
                keys=self._keys, args=[self.node, int(self.lease * 1000), *self.ips]
            )
        ]
        if lost and lost != self.lost:
            log.error(
                "source IPs %s are now held by another node (this node's lease lapsed)",
                ", ".join(lost),
            )
        back = sorted(set(self.lost) - set(lost))
        if back:
            log.warning("source IPs %s are this node's again", ", ".join(back))
        self.lost = lost
        return lost

    def renew_and_rest(
        self, rest_ip: Callable[[str, list[str], float, str], None] | None
    ) -> list[str]:
        """:meth:`renew`, and each IP another live node holds now (this node
        stalled past its lease, and that one started with the IP) rested for every
        provider (``Supervisor.rest_ip``) for half a lease, so again at each
        renewal while it lasts: two nodes sending from one address would each keep
        its per-site rates and warm-up cap (twice the limit). Once the IP is this
        node's again, the last rest lapses within half a lease."""
        lost = self.renew()
        if lost and rest_ip is not None:
            until = time.time() + self.lease / 2
            for ip in lost:
                rest_ip(ip, ["*"], until, "source IP held by another live node")
        return lost

    def release(self) -> None:
        """A clean exit: the IPs back at once, and off every node's dashboard."""
        if self.ips:
            self._release(keys=self._keys, args=[self.node, *self.ips])
            self.ips = []
        self.r.zrem(f"{self.k}:seen", self.node)
        self.r.hdel(f"{self.k}:status", self.node)

    def holders(self) -> dict[str, str]:
        """IP -> node, for status pages."""
        return {_s(k): _s(v) for k, v in self.r.hgetall(f"{self.k}:ips").items()}

    def publish(self, status: dict[str, Any]) -> None:
        """This node's status (JSON-able: rates, workers, ...) for every node's
        dashboard; the time it was published is Redis's."""
        body = orjson.dumps({**status, "lease": self.lease})
        self._publish(
            keys=[f"{self.k}:seen", f"{self.k}:status"],
            args=[self.node, body, int(STATUS_FORGET * 1000)],
        )

    def members(self) -> list[dict[str, Any]]:
        """Every live node (a status within ``STATUS_STALE`` s), by name: its last
        status plus ``node``, ``ips`` (those it holds in the registry), ``seen_s``
        (age of that status), ``lease_left_s`` / ``lease_age_s`` (its IP lease:
        time to expiry, time since the last renewal; None without IPs) and
        ``self`` (this node)."""
        k = self.k
        pipe = self.r.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(f"{k}:seen", 0, -1, withscores=True)
        pipe.hgetall(f"{k}:status")
        pipe.zrange(f"{k}:ipnodes", 0, -1, withscores=True)
        pipe.hgetall(f"{k}:ips")
        (sec, usec), seen, status, leases, ips = pipe.execute()
        now = int(sec) * 1000 + int(usec) // 1000
        held: dict[str, list[str]] = {}
        for ip, n in ips.items():
            held.setdefault(_s(n), []).append(_s(ip))
        deadline = {_s(n): float(d) for n, d in leases}
        out = []
        for n, at in seen:
            node = _s(n)
            age = (now - float(at)) / 1000
            if age > STATUS_STALE:
                continue
            raw = status.get(n)
            st = orjson.loads(raw) if raw else {}
            dl = deadline.get(node)
            left = None if dl is None else round((dl - now) / 1000, 3)
            lease = float(st.get("lease") or self.lease)
            out.append({
                **st, "node": node, "ips": sorted(held.get(node, [])), "seen_s": round(age, 3),
                "lease_left_s": left,
                "lease_age_s": None if left is None else round(max(0.0, lease - left), 3),
                "self": node == self.node,
            })  # fmt: skip
        return sorted(out, key=lambda m: m["node"])

    def shared_secret(self) -> bytes:
        """The installation secret, made once by the first node (SET NX)."""
        key = f"{self.k}:secret"
        self.r.set(key, secrets.token_hex(32), nx=True)
        v = self.r.get(key)
        return v if isinstance(v, bytes) else str(v).encode()


def _s(b: Any) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)
