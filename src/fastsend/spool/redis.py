"""The shared spool: several fastsend nodes on one Redis, one queue.

URL: ``redis://HOST:PORT/DB?prefix=fs1&dir=/var/lib/fastsend&node=mx1&lease=30``
(``rediss://`` and ``unix://`` as redis-py reads them). Our parameters are
taken out of the URL; the rest goes to redis-py.

- ``prefix`` (default ``fastsend``): every key is ``{prefix}:...``; the braces
  are a Redis Cluster hash tag, so all keys of one spool sit in one slot and
  the Lua scripts may touch several of them.
- ``dir`` (default ``./spool``): the node's local directory for what is not
  shared: ``events.jsonl``, ``suppression.db``, ``secret.key`` (give every
  node the same secret: copy the file or set ``[tracking] secret``).
  Guardrail and warm-up counters are shared, in ``{prefix}:counters``. See :func:`fastsend.spool.spool_local_dir`.
- ``node`` (default ``HOST:PID:RANDOM``): this node's name. With a stable
  name a restarted node takes its own in-flight window back at once
  (:meth:`RedisSpool.recover`); with the default name it is taken back by any
  node once its lease expires.
- ``lease`` (seconds, default 30): how long a node's claims stay its own
  without a renewal. The supervisor renews every tick (:meth:`renew`, rate
  limited to a few calls per lease), claims and outcomes renew too.
- ``replicas`` (default 0): ``add_messages`` waits (``WAIT``/``WAITAOF``) until
  that many replicas acknowledged the write.

Layout (``P`` = ``{prefix}``): ``P:c:CID`` a hash per campaign (spec and
options as JSON), ``P:camps`` the ids (sorted set), ``P:active`` the ids of
active campaigns; ``P:m:ID`` a small hash per message (short field names,
listpack-encoded); ``P:due:CID`` a sorted set per campaign of its pending
(queued/deferred) ids scored by next attempt time; ``P:n:CID`` and ``P:n``
counters per state; ``P:nodes`` node -> lease deadline (ms, Redis server time:
no clock skew between nodes); ``P:fl:NODE`` the ids a node holds in flight.

Sorted sets rather than Streams: a spool is a schedule, not a log. Every
deferred message comes back at its own retry time, and a Stream has no delayed
delivery (we would still need a sorted set for retries, and two structures
to keep consistent); pausing a campaign means skipping its entries, cancelling
means finding its pending ones, counting and ``message(id)`` need random
access. A sorted set per campaign, scored by due time, answers all of these
with one structure: claims are "the lowest scores <= now" over the active
campaigns. Consumer-group leases (XAUTOCLAIM) are replaced by a lease per
node, which costs one ZADD to renew however large the window.

Atomicity: claims, outcomes, releases, recovery and cancellation are Lua
scripts, so each is all-or-nothing and two nodes never claim the same message.
A claim also requeues the windows of nodes whose lease expired (a node that
died), so the surviving nodes deliver them: nothing is lost, and duplicates
are bounded by the dead node's window. An outcome is applied whoever holds the
message now (as SQLite's ``record_results``): a late answer from a node whose
lease expired still makes the message final, so it is not sent again.

Durability ("accepted" = on disk), which the operator configures in Redis:
``appendonly yes`` and ``appendfsync always`` (every write fsynced before
Redis answers: the same guarantee as SQLite's ``synchronous=FULL``).
With ``appendfsync everysec`` a crash of redis-server loses nothing (the AOF
is written before the reply) but a power loss may lose the last second; on
Redis >= 7.2 ``add_messages`` then waits with ``WAITAOF 1 R`` until the write
is fsynced locally (and on R replicas), so it is durable on return again.
Without AOF (RDB snapshots or none) Redis holds accepted mail in memory only;
``durability`` says which case applies. Claims and outcomes are never waited
for: a lost one means a retry, never a loss.

Final messages stay (``message(id)`` answers for them, as in SQLite); purging
old final messages is left to an operator's job.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis

from fastsend.spool import (
    AGE_BUCKETS_MIN,
    PENDING_STATES,
    STATE_NAMES,
    CampaignInfo,
    Claimed,
    Result,
    Spool,
)
from fastsend.spool.sqlite import SpoolError

OUR_PARAMS = ("prefix", "dir", "node", "lease", "replicas")
CHUNK = 2000  # ids per script call / pipeline for bulk work

_LUA_LIB = """
local P = ARGV[1]
local function move(cid, old, new)
  if old == new then return end
  if old then
    redis.call('HINCRBY', P..':n:'..cid, old, -1)
    redis.call('HINCRBY', P..':n', old, -1)
  end
  redis.call('HINCRBY', P..':n:'..cid, new, 1)
  redis.call('HINCRBY', P..':n', new, 1)
end
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function requeue_node(node)
  local fl = P..':fl:'..node
  local ids = redis.call('SMEMBERS', fl)
  local n = 0
  for _, id in ipairs(ids) do
    local k = P..':m:'..id
    local f = redis.call('HMGET', k, 's', 'c', 'n', 'o')
    if f[1] == '1' and f[4] == node then
      redis.call('HSET', k, 's', '0')
      redis.call('HDEL', k, 'o')
      redis.call('ZADD', P..':due:'..f[2], f[3], id)
      move(f[2], '1', '0')
      n = n + 1
    end
  end
  redis.call('DEL', fl)
  -- Taken back from a node that did not finish: some may have been delivered
  -- already and are sent again (the duplicates the issue bounds by the window).
  if n > 0 then redis.call('HINCRBY', P..':stats', 'taken_over', n) end
  return n
end
-- Counter moves of a batch, summed: tally(cid, old, new) per message, then
-- flush_tally() writes one HINCRBY per (campaign, state) touched (not per message).
local tally_t = {}
local function tally(cid, old, new)
  if old == new then return end
  local t = tally_t[cid]
  if t == nil then t = {}; tally_t[cid] = t end
  if old then t[old] = (t[old] or 0) - 1 end
  t[new] = (t[new] or 0) + 1
end
local function flush_tally()
  local all = {}
  for cid, t in pairs(tally_t) do
    for st, d in pairs(t) do
      if d ~= 0 then
        redis.call('HINCRBY', P..':n:'..cid, st, d)
        all[st] = (all[st] or 0) + d
      end
    end
  end
  for st, d in pairs(all) do
    if d ~= 0 then redis.call('HINCRBY', P..':n', st, d) end
  end
  tally_t = {}
end
-- A variadic command over a long list, 1000 arguments a call (Lua's stack).
local function each_chunk(cmd, key, list)
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
local function reap_dead(now_ms)
  local n = 0
  local dead = redis.call('ZRANGEBYSCORE', P..':nodes', '-inf', now_ms, 'LIMIT', 0, 16)
  for _, d in ipairs(dead) do
    n = n + requeue_node(d)
    redis.call('ZREM', P..':nodes', d)
  end
  return n
end
"""

# ARGV: P, now, limit, node, lease_ms
_CLAIM = (
    _LUA_LIB
    + """
-- Per message: one HMGET and one HSET; per campaign one ZREMRANGEBYRANK (the
-- claimed ids are a prefix of its due set), one SADD and the counters per batch.
local now, limit, node, lease = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ms = clock_ms()
redis.call('ZADD', P..':nodes', ms + lease, node)
reap_dead(ms)
local act = redis.call('SMEMBERS', P..':active')
local cand = {}
for _, cid in ipairs(act) do
  local r = redis.call('ZRANGEBYSCORE', P..':due:'..cid, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #r, 2 do cand[#cand + 1] = {tonumber(r[i + 1]), r[i], cid, i} end
end
if #act > 1 then
  -- A total order that keeps each campaign's rank order (ties included), so
  -- what is taken of each campaign is a prefix of its due set.
  table.sort(cand, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[3] ~= b[3] then return a[3] < b[3] end
    return a[4] < b[4]
  end)
end
local out = {}
local ids = {}
local taken = {}
for i = 1, math.min(limit, #cand) do
  local id, cid = cand[i][2], cand[i][3]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 'r', 'd', 'v', 's', 'a', 't')
  redis.call('HSET', k, 's', '1', 'o', node)
  ids[#ids + 1] = id
  taken[cid] = (taken[cid] or 0) + 1
  tally(cid, f[4], '1')
  out[#out + 1] = {id, cid, f[1], f[2], f[3], f[5] or '0', f[6]}
end
for cid, n in pairs(taken) do
  redis.call('ZREMRANGEBYRANK', P..':due:'..cid, 0, n - 1)
end
each_chunk('SADD', P..':fl:'..node, ids)
flush_tally()
return out
"""
)

# ARGV: P, now, node, lease_ms, JSON [[id, state, attempts, next_at, code, enhanced, text], ...]
# (every value a string: one argument, decoded by cjson in the script)
_RECORD = (
    _LUA_LIB
    + """
-- Per message: one HMGET and one HSET (the owner is cleared there); the due set
-- only for a retry (or a message no longer in flight); SREM and counters per batch.
local now = ARGV[2]
if ARGV[3] ~= '' then redis.call('ZADD', P..':nodes', 'XX', clock_ms() + tonumber(ARGV[4]), ARGV[3]) end
local gone = {}
local cancelled = {}
local rows = cjson.decode(ARGV[5])
for _, row in ipairs(rows) do
  local id = row[1]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 's', 'c', 'o')
  if f[1] then
    local new, nxt = row[2], row[4]
    -- deferred after its campaign was cancelled: final too (never claimed again)
    if new == '2' then
      local c = cancelled[f[2]]
      if c == nil then
        c = redis.call('HGET', P..':c:'..f[2], 'status') == 'cancelled'
        cancelled[f[2]] = c
      end
      if c then new, nxt = '7', '0' end
    end
    redis.call('HSET', k, 's', new, 'a', row[3], 'n', nxt, 'u', now,
               'lc', row[5], 'le', row[6], 'lt', row[7], 'o', '')
    if f[3] and f[3] ~= '' then
      local g = gone[f[3]]
      if g == nil then g = {}; gone[f[3]] = g end
      g[#g + 1] = id
    end
    if new == '0' or new == '2' then
      redis.call('ZADD', P..':due:'..f[2], nxt, id)
    elseif f[1] == '0' or f[1] == '2' then
      redis.call('ZREM', P..':due:'..f[2], id)  -- requeued meanwhile: final now
    end
    tally(f[2], f[1], new)
  end
end
for owner, g in pairs(gone) do each_chunk('SREM', P..':fl:'..owner, g) end
flush_tally()
return 0
"""
)

# ARGV: P, node, ids...: only messages this node holds (after its lease expired
# another node may hold them now: releasing those would send them twice)
_RELEASE = (
    _LUA_LIB
    + """
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 's', 'c', 'n', 'o')
  if f[1] == '1' and (not f[4] or f[4] == ARGV[2]) then
    redis.call('HSET', k, 's', '0')
    if f[4] then
      redis.call('SREM', P..':fl:'..f[4], id)
      redis.call('HDEL', k, 'o')
    end
    redis.call('ZADD', P..':due:'..f[2], f[3], id)
    move(f[2], '1', '0')
    n = n + 1
  end
end
return n
"""
)

# ARGV: P, now, node, then (id, next_at)*: handed back unattempted; only messages
# this node holds (as _RELEASE); attempts and last reply unchanged
_REQUEUE = (
    _LUA_LIB
    + """
local now, node = ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV, 2 do
  local id, nxt = ARGV[i], ARGV[i + 1]
  local k = P..':m:'..id
  local f = redis.call('HMGET', k, 's', 'c', 'a', 'o')
  if f[1] == '1' and (not f[4] or f[4] == node) then
    local new = '0'
    if f[3] and f[3] ~= '0' then new = '2' end
    if redis.call('HGET', P..':c:'..f[2], 'status') == 'cancelled' then
      new, nxt = '7', '0'
    end
    redis.call('HSET', k, 's', new, 'n', nxt, 'u', now)
    if f[4] then
      redis.call('SREM', P..':fl:'..f[4], id)
      redis.call('HDEL', k, 'o')
    end
    if new ~= '7' then redis.call('ZADD', P..':due:'..f[2], nxt, id) end
    move(f[2], '1', new)
    n = n + 1
  end
end
return n
"""
)

# ARGV: P, node
_RECOVER = (
    _LUA_LIB
    + """
local n = requeue_node(ARGV[2])
return n + reap_dead(clock_ms())
"""
)

# ARGV: P, node, lease_ms
_RENEW = (
    _LUA_LIB
    + """
redis.call('ZADD', P..':nodes', clock_ms() + tonumber(ARGV[3]), ARGV[2])
return 0
"""
)

# ARGV: P, node: forget this node if it holds nothing (a clean exit)
_LEAVE = (
    _LUA_LIB
    + """
if redis.call('SCARD', P..':fl:'..ARGV[2]) == 0 then redis.call('ZREM', P..':nodes', ARGV[2]) end
return 0
"""
)

# ARGV: P, cid, status
_STATUS = (
    _LUA_LIB
    + """
local k = P..':c:'..ARGV[2]
if redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, 'status', ARGV[3])
if ARGV[3] == 'active' then
  redis.call('SADD', P..':active', ARGV[2])
else
  redis.call('SREM', P..':active', ARGV[2])
end
return 1
"""
)

# ARGV: P, cid, n: cancel up to n pending messages of a (non-active) campaign
_CANCEL = (
    _LUA_LIB
    + """
local cid, due = ARGV[2], P..':due:'..ARGV[2]
local ids = redis.call('ZRANGE', due, 0, tonumber(ARGV[3]) - 1)
for _, id in ipairs(ids) do
  local k = P..':m:'..id
  local s = redis.call('HGET', k, 's')
  if s == '0' or s == '2' then
    redis.call('HSET', k, 's', '7', 'n', '0')
    move(cid, s, '7')
  end
end
if #ids > 0 then redis.call('ZREMRANGEBYRANK', due, 0, #ids - 1) end
return #ids
"""
)

# ARGV: P, node -> earliest due time of an active campaign's pending message, or
# the earliest lease deadline of another node holding messages in flight (they
# come back when it expires), as a string; nil when neither.
_NEXT_DUE = (
    _LUA_LIB
    + """
local best = nil
for _, cid in ipairs(redis.call('SMEMBERS', P..':active')) do
  local r = redis.call('ZRANGE', P..':due:'..cid, 0, 0, 'WITHSCORES')
  if r[2] then
    local s = tonumber(r[2])
    if best == nil or s < best then best = s end
  end
end
local nodes = redis.call('ZRANGE', P..':nodes', 0, -1, 'WITHSCORES')
for i = 1, #nodes, 2 do
  if nodes[i] ~= ARGV[2] and redis.call('SCARD', P..':fl:'..nodes[i]) > 0 then
    local s = tonumber(nodes[i + 1]) / 1000
    if best == nil or s < best then best = s end
  end
end
if best == nil then return false end
return string.format('%.6f', best)
"""
)


class RedisSpoolError(SpoolError):
    """The Redis spool cannot be used (bad URL, durability not reached)."""


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a spool URL into the redis-py URL and our parameters."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        (ours.__setitem__(k, v) if k in OUR_PARAMS else rest.append((k, v)))
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


def _s(b: Any) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)


class RedisSpool(Spool):
    def __init__(self, url: str) -> None:
        redis_url, p = parse_url(url)
        self.url = url
        self.prefix = p.get("prefix") or "fastsend"
        self.local_dir = p.get("dir") or "./spool"
        self.node = p.get("node") or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        try:
            self.lease = float(p.get("lease") or 30.0)
            self.replicas = int(p.get("replicas") or 0)
        except ValueError:
            raise RedisSpoolError(f"bad lease or replicas in spool URL {url!r}") from None
        if self.lease <= 0 or self.replicas < 0:
            raise RedisSpoolError(f"bad lease or replicas in spool URL {url!r}")
        self.k = "{" + self.prefix + "}"
        # Any: redis-py's annotations are unions of sync/async and bytes/str replies.
        self.r: Any = redis.Redis.from_url(redis_url, decode_responses=False)
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise RedisSpoolError(f"cannot reach Redis at {redis_url!r}: {e}") from None
        reg = self.r.register_script
        self._claim = reg(_CLAIM)
        self._record = reg(_RECORD)
        self._release = reg(_RELEASE)
        self._requeue = reg(_REQUEUE)
        self._recover = reg(_RECOVER)
        self._renew = reg(_RENEW)
        self._leave = reg(_LEAVE)
        self._status = reg(_STATUS)
        self._cancel = reg(_CANCEL)
        self._next_due = reg(_NEXT_DUE)
        self._lease_ms = int(self.lease * 1000)
        self._renewed = 0.0
        self._holding = False  # claimed anything: this node keeps a lease
        self._waitaof: bool | None = None  # decided at the first add_messages
        self.durability = "unknown"
        self._limits: Any = None

    # -- campaigns -----------------------------------------------------------

    def create_campaign(
        self,
        spec: dict[str, Any],
        *,
        name: str = "",
        tenant: str = "default",
        options: dict[str, Any] | None = None,
    ) -> int:
        k = self.k
        cid = int(self.r.incr(f"{k}:seq:c"))
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            f"{k}:c:{cid}",
            mapping={
                "name": name,
                "tenant": tenant,
                "created": repr(time.time()),
                "status": "active",
                "spec": orjson.dumps(spec),
                "options": orjson.dumps(options or {}),
            },
        )
        pipe.zadd(f"{k}:camps", {cid: cid})
        pipe.sadd(f"{k}:active", cid)
        pipe.execute()
        self._wait_durable()
        return cid

    def _campaign(self, cid: int, h: dict[bytes, Any]) -> CampaignInfo | None:
        if not h:
            return None
        return CampaignInfo(
            id=cid,
            name=_s(h[b"name"]),
            tenant=_s(h[b"tenant"]),
            created=float(h[b"created"]),
            status=_s(h[b"status"]),
            spec=orjson.loads(h[b"spec"]),
            options=orjson.loads(h.get(b"options", b"{}")),
        )

    def get_campaign(self, campaign_id: int) -> CampaignInfo | None:
        return self._campaign(campaign_id, self.r.hgetall(f"{self.k}:c:{int(campaign_id)}"))

    def list_campaigns(self) -> list[CampaignInfo]:
        ids = [int(x) for x in self.r.zrange(f"{self.k}:camps", 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            pipe.hgetall(f"{self.k}:c:{cid}")
        out = [self._campaign(cid, h) for cid, h in zip(ids, pipe.execute(), strict=True)]
        return [c for c in out if c is not None]

    def set_campaign_status(self, campaign_id: int, status: str) -> None:
        if status not in ("active", "paused", "cancelled"):
            raise ValueError(f"bad campaign status {status!r}")
        cid = str(int(campaign_id))
        if not self._status(args=[self.k, cid, status]):
            return
        if status == "cancelled":
            # Not active any more, so no node claims it; pending mail becomes final
            # in chunks (Redis is never blocked long). What is in flight finishes.
            # Interrupted, a second cancel finishes the job.
            while self._cancel(args=[self.k, cid, CHUNK]):
                pass

    # -- messages ------------------------------------------------------------

    def add_messages(
        self,
        campaign_id: int,
        rows: Iterable[tuple[str, str, bytes]],
        now: float,
        *,
        state: int = 0,
    ) -> list[int]:
        rows = list(rows)
        if not rows:
            return []
        k = self.k
        cid = int(campaign_id)
        last = int(self.r.incrby(f"{k}:seq:m", len(rows)))
        first = last - len(rows) + 1
        ids = list(range(first, last + 1))
        nowr = repr(float(now))
        st = str(int(state))
        pipe = self.r.pipeline(transaction=True)
        for i, (rcpt, domain, vars_) in zip(ids, rows, strict=True):
            pipe.hset(
                f"{k}:m:{i}",
                mapping={
                    "c": cid,
                    "r": rcpt,
                    "d": domain,
                    "v": vars_,
                    "s": st,
                    "t": nowr,
                    "n": nowr,
                    "u": nowr,
                },
            )
        if state in PENDING_STATES:
            for j in range(0, len(ids), CHUNK):
                pipe.zadd(f"{k}:due:{cid}", dict.fromkeys(ids[j : j + CHUNK], float(now)))
        pipe.hincrby(f"{k}:n:{cid}", st, len(ids))
        pipe.hincrby(f"{k}:n", st, len(ids))
        pipe.execute()
        self._wait_durable()
        return ids

    def _wait_durable(self) -> None:
        """Block until the last writes are as durable as Redis is configured to make them."""
        if self._waitaof is None:
            info = self.r.info("persistence")
            aof = bool(int(info.get("aof_enabled", 0)))
            self._waitaof = aof
            self.durability = "aof" if aof else "memory (no AOF)"
        if self._waitaof:
            try:
                local, reps = self.r.execute_command("WAITAOF", 1, self.replicas, 10_000)
            except redis.ResponseError as e:
                if "unknown command" not in str(e).lower():
                    raise
                # Redis < 7.2: with appendfsync always the reply already meant fsynced.
                self._waitaof = False
                self.durability = "aof (fsync per appendfsync; no WAITAOF before Redis 7.2)"
            else:
                if int(local) < 1 or int(reps) < self.replicas:
                    raise RedisSpoolError("the write was not fsynced within 10 s (WAITAOF)")
                return
        if self.replicas:
            got = int(self.r.execute_command("WAIT", self.replicas, 10_000))
            if got < self.replicas:
                raise RedisSpoolError(f"only {got} of {self.replicas} replicas acknowledged")

    def claim_due(self, now: float, limit: int) -> list[Claimed]:
        if limit <= 0:
            return []
        rows = self._claim(args=[self.k, repr(float(now)), int(limit), self.node, self._lease_ms])
        self._holding = True
        self._renewed = time.monotonic()
        return [
            Claimed(int(r[0]), int(r[1]), _s(r[2]), _s(r[3]), r[4], int(r[5]), float(r[6]))
            for r in rows
        ]

    def record_results(self, results: Iterable[Result], now: float) -> None:
        batch = list(results)
        head = [self.k, repr(float(now)), self.node if self._holding else "", self._lease_ms]
        # One JSON argument per chunk (cjson in the script), every value a string:
        # packing 7 arguments per message cost more than the script itself.
        dumps = orjson.dumps
        for j in range(0, len(batch), CHUNK):
            blob = dumps(
                [
                    (str(r.id), str(r.state), str(r.attempts), repr(float(r.next_at)),
                     str(r.code), r.enhanced, r.text)
                    for r in batch[j : j + CHUNK]
                ]
            )  # fmt: skip
            self._record(args=[*head, blob])

    def release(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        for j in range(0, len(ids), CHUNK):
            self._release(args=[self.k, self.node, *ids[j : j + CHUNK]])

    def requeue(self, items: Iterable[tuple[int, float]], now: float) -> None:
        rows = list(items)
        for j in range(0, len(rows), CHUNK):
            args: list[Any] = [self.k, repr(float(now)), self.node]
            for i, at in rows[j : j + CHUNK]:
                args += [i, repr(float(at))]
            self._requeue(args=args)

    def recover(self) -> int:
        """This node's in-flight messages (a restart under the same ``node`` name)
        and those of every node whose lease expired, back to queued."""
        return int(self._recover(args=[self.k, self.node]))

    def renew(self) -> None:
        """Extend this node's lease on its claims (cheap: at most ~4 calls a lease)."""
        if not self._holding:
            return
        mono = time.monotonic()
        if mono - self._renewed < self.lease / 4:
            return
        self._renewed = mono
        self._renew(args=[self.k, self.node, self._lease_ms])

    def counts(self, campaign_id: int | None = None) -> dict[str, int]:
        key = f"{self.k}:n" if campaign_id is None else f"{self.k}:n:{int(campaign_id)}"
        out = dict.fromkeys(STATE_NAMES.values(), 0)
        for state, n in self.r.hgetall(key).items():
            out[STATE_NAMES.get(int(state), _s(state))] = int(n)
        return out

    def next_due(self) -> float | None:
        v = self._next_due(args=[self.k, self.node])
        return None if v is None else float(v)

    def queue_shape(self, now: float) -> list[tuple[str, list[int]]]:
        k, r = self.k, self.r
        edges = [m * 60.0 for m in AGE_BUCKETS_MIN]
        shape: dict[str, list[int]] = {}
        keys = [f"{k}:due:{int(c)}" for c in r.zrange(f"{k}:camps", 0, -1)]
        keys += [f"{k}:fl:{_s(n)}" for n in r.zrange(f"{k}:nodes", 0, -1)]

        def add(ids: list[bytes]) -> None:
            pipe = r.pipeline(transaction=False)
            for mid in ids:
                pipe.hmget(f"{k}:m:{_s(mid)}", "d", "t", "s")
            for domain, created, st in pipe.execute():
                if domain is None or int(st) not in (0, 1, 2):
                    continue
                d = _s(domain)
                buckets = shape.get(d)
                if buckets is None:
                    buckets = shape[d] = [0] * (len(edges) + 1)
                age = now - float(created)
                i = 0
                while i < len(edges) and age >= edges[i]:
                    i += 1
                buckets[i] += 1

        for key in keys:
            if key.startswith(f"{k}:fl:"):
                add(list(r.smembers(key)))
                continue
            start = 0
            while True:
                ids = r.zrange(key, start, start + CHUNK - 1)
                if not ids:
                    break
                add(ids)
                start += CHUNK
        return sorted(shape.items(), key=lambda kv: -sum(kv[1]))

    def message(self, message_id: int) -> dict[str, Any] | None:
        h = self.r.hgetall(f"{self.k}:m:{int(message_id)}")
        if not h:
            return None

        def g(f: bytes, default: bytes = b"0") -> bytes:
            v = h.get(f, default)
            return v if isinstance(v, bytes) else default

        state = int(g(b"s"))
        return {
            "id": int(message_id),
            "campaign": int(g(b"c")),
            "rcpt": _s(g(b"r", b"")),
            "domain": _s(g(b"d", b"")),
            "vars": orjson.loads(g(b"v", b"{}")),
            "state": STATE_NAMES.get(state, state),
            "attempts": int(g(b"a")),
            "created": float(g(b"t")),
            "next_at": float(g(b"n")),
            "updated": float(g(b"u")),
            "last_code": int(g(b"lc")),
            "last_enhanced": _s(g(b"le", b"")),
            "last_text": _s(g(b"lt", b"")),
        }

    def add_counters(self, deltas: Mapping[str, int]) -> dict[str, int]:
        if not deltas:
            return {}
        pipe = self.r.pipeline(transaction=True)
        for k, v in deltas.items():
            pipe.hincrby(f"{self.k}:counters", k, int(v))
        return {k: int(v) for k, v in zip(deltas, pipe.execute(), strict=True)}

    def counters(self, prefix: str) -> dict[str, int]:
        out: dict[str, int] = {}
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        for k, v in self.r.hscan_iter(f"{self.k}:counters", match=pattern, count=1000):
            out[k.decode()] = int(v)
        return out

    def drop_counters(self, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            self.r.hdel(f"{self.k}:counters", *names)

    def stats(self) -> dict[str, int]:
        """Spool-wide counters every node shares: ``taken_over``, in-flight messages
        put back after their node's lease expired (or at its restart), each a
        possible duplicate."""
        return {_s(k): int(v) for k, v in self.r.hgetall(f"{self.k}:stats").items()}

    def shared_limits(self) -> Any:
        """GCRA buckets on this Redis, under this spool's prefix (one per spool)."""
        if self._limits is None:
            from fastsend.shared_limits import SharedLimits

            self._limits = SharedLimits(self.r, prefix=self.prefix)
        return self._limits

    def close(self) -> None:
        try:
            if self._holding:
                self._leave(args=[self.k, self.node])
        except redis.RedisError:
            pass
        self.r.close()
