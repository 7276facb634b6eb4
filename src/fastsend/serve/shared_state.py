"""What ``fastsend serve`` nodes on one Redis share, besides the queue.

NAME
    fastsend.serve.shared_state -- RedisKeyStore, RedisSuppressionList,
    RedisOutbox, RedisEventIndex.

DESCRIPTION
    With ``[spool] url = "redis://..."`` every node answers any API call, so
    what a call reads or writes cannot be one node's file. Each class here
    keeps the interface of its SQLite twin (``serve.auth.KeyStore``,
    ``suppression.SuppressionList``, ``serve.webhooks.Outbox``,
    ``serve.eventindex.EventIndex``) on keys under the spool's ``{prefix}``
    (``P``):

    ``P:key:ID``        hash per API key (tenant, SHA-256 of the key, created,
                        revoked, note); ``P:keys`` the ids. A revocation on one
                        node is seen by every node within the 0.5 s key cache.
    ``P:sup:TENANT``    hash per tenant: normalized address -> JSON entry.
                        Added on one node, honoured by all at the next check
                        (injection, dispatch).
    ``P:wh``            the webhook outbox: sorted set scored by event id
                        (``P:wh:seq``), ``P:wh:cur`` a cursor per URL, and
                        ``P:wh:lock:URL`` the node sending to that URL (a
                        lease, ``SET NX PX``): each event is posted by one
                        node, in order; a dead sender's lease lapses and
                        another node continues from the cursor.
    ``P:ev:B``          list of the events (``ID:JSON``) of the messages of
                        bucket B (ids ``B*128 ...``), ``P:meta:B`` their tags
                        and metadata: GET /v1/messages/ID on any node; each
                        expires ``[analytics] events_days`` (30) after
                        its last write.
    ``P:evs:STEP:T``    event counts per minute (kept 6 h) and per hour (8 d)
                        by campaign, domain and source IP: /v1/stats?by=domain.
    ``P:dash:TENANT:M`` the dashboard's outcomes of minute M of the tenant's
                        messages (and ``*``: all), per second and by domain and
                        source IP, every node's added up (each adds what it
                        counted once a second); kept 17 min. ``P:dash:TENANT:r``
                        its newest recent events (40): any node's dashboard
                        answers for the cluster.
    ``P:ipstate``       source IP -> its node's rests, blocklist checks, pool and
                        warm-up day: the IP page on any node.
    ``P:evx``           the same events by time (GET /v1/events): a stream whose
                        entries each name a run of one ``P:ev:B`` list (bucket,
                        start, count) holding events of one campaign and one
                        type, with their first and last times; in the order
                        the nodes recorded them; trimmed after ``events_days``.

DELIBERATELY NOT HERE
    The queue (fastsend.spool.redis), rates (fastsend.shared_limits),
    node registry and durability (fastsend.cluster).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import orjson

from fastsend.events import legacy_mark_key
from fastsend.serve.auth import (
    _KEY_RE,
    CACHE_TTL,
    PREFIX,
    RESERVED_TENANTS,
    ApiKey,
    check_key_tenant,
)
from fastsend.serve.eventindex import CatchesUp
from fastsend.spool import SharedStore
from fastsend.suppression import Entry, Suppressions

log = logging.getLogger("fastsend.serve")

EVENT_TTL = 30 * 86400  # s a message's event history stays readable in Redis
WEBHOOK_LOCK = 10.0  # s a node's lease on sending to one webhook URL
STATUS_EVERY = 1.0  # s between two status records of this node (the cluster view)


def _s(b: Any) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)


def _sha(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


# ---------------------------------------------------------------- API keys
class RedisKeyStore:
    """API keys (hashes only) shared by every node."""

    def __init__(self, r: Any, prefix: str) -> None:
        self.r = r
        self.k = "{" + prefix + "}"
        self._cache: dict[str, tuple[bytes, str, float | None, float]] = {}

    def create(self, tenant: str, note: str = "") -> tuple[str, ApiKey]:
        check_key_tenant(tenant)
        while True:
            kid = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
            key = f"{PREFIX}{kid}_{secrets.token_urlsafe(32)}"
            now = time.time()
            k = f"{self.k}:key:{kid}"
            if not self.r.hsetnx(k, "hash", _sha(key)):
                continue  # id collision: draw again
            self.r.hset(k, mapping={"tenant": tenant, "created": repr(now), "note": note})
            self.r.zadd(f"{self.k}:keys", {kid: now})
            return key, ApiKey(kid, tenant, now, None, note)

    def _row(self, kid: str) -> ApiKey | None:
        h = self.r.hgetall(f"{self.k}:key:{kid}")
        if not h or b"tenant" not in h:
            return None
        rev = h.get(b"revoked")
        return ApiKey(
            kid, _s(h[b"tenant"]), float(h[b"created"]), float(rev) if rev else None,
            _s(h.get(b"note", b"")),
        )  # fmt: skip

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        out = [self._row(_s(kid)) for kid in self.r.zrange(f"{self.k}:keys", 0, -1)]
        return [a for a in out if a is not None and (tenant is None or a.tenant == tenant)]

    def revoke(self, kid: str) -> bool:
        k = f"{self.k}:key:{kid}"
        self._cache.pop(kid, None)
        if not self.r.exists(k):
            return False
        return bool(self.r.hsetnx(k, "revoked", repr(time.time())))

    def verify(self, key: str) -> tuple[str, str] | None:
        m = _KEY_RE.fullmatch(key)
        if m is None:
            return None
        kid = m.group(1)
        now = time.monotonic()
        row = self._cache.get(kid)
        if row is None or now - row[3] > CACHE_TTL:
            h, tenant, rev = self.r.hmget(f"{self.k}:key:{kid}", "hash", "tenant", "revoked")
            if h is None or tenant is None:
                self._cache.pop(kid, None)
                hmac.compare_digest(_sha(key), b"\0" * 32)
                return None
            if len(self._cache) > 10_000:
                self._cache.clear()
            # (stamped as read: a read that took a while, a slow Redis, is not stale
            # at once, read again by the next look on the loop)
            row = self._cache[kid] = (bytes(h), _s(tenant), float(rev) if rev else None,
                                      time.monotonic())  # fmt: skip
        stored, tenant_s, revoked, _ = row
        if not hmac.compare_digest(_sha(key), stored) or revoked is not None:
            return None
        if tenant_s.lower() in RESERVED_TENANTS:
            return None
        return kid, tenant_s

    def cached(self, key: str) -> bool:
        """Whether :meth:`verify` answers ``key`` from its cache, without Redis."""
        m = _KEY_RE.fullmatch(key)
        if m is None:
            return True
        row = self._cache.get(m.group(1))
        return row is not None and time.monotonic() - row[3] <= CACHE_TTL

    def forget_cache(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- suppression
class RedisSuppressionList(Suppressions):
    """The suppression list per tenant, shared by every node: the policy of
    :class:`fastsend.suppression.Suppressions` on a hash per tenant. Every
    write also increments ``{prefix}:supver`` in the same MULTI/EXEC, the
    list's :meth:`version`: one GET tells a node's supervisor whether any
    node changed the list since it last screened its mail in flight."""

    def __init__(self, r: Any, prefix: str, *, clock: Any = time.time) -> None:
        self.r = r
        self.k = "{" + prefix + "}"
        self._clock = clock
        self.path = f"redis {self.k}:sup:*"
        self._ver = f"{self.k}:supver"

    def version(self) -> int | None:
        return int(self.r.get(self._ver) or 0)

    def _key(self, tenant: str) -> str:
        return f"{self.k}:sup:{tenant}"

    def __enter__(self) -> RedisSuppressionList:
        return self

    def _put(self, rows: list[tuple[str, Entry]]) -> None:
        """(key, entry) rows, any tenants, in one MULTI/EXEC (durable as the spool's
        writes: the AOF policy Redis runs with)."""
        if not rows:
            return
        pipe = self.r.pipeline(transaction=True)
        by_tenant: dict[str, list[tuple[str, Entry]]] = {}
        for key, e in rows:
            by_tenant.setdefault(e.tenant, []).append((key, e))
        for tenant, trows in by_tenant.items():
            pipe.sadd(f"{self.k}:suptenants", tenant)
            for i in range(0, len(trows), 1000):
                pipe.hset(
                    self._key(tenant),
                    mapping={
                        key: orjson.dumps(
                            [e.address, e.reason, e.source, e.created, e.expires, e.message]
                        )
                        for key, e in trows[i : i + 1000]
                    },
                )
        pipe.incr(self._ver)
        pipe.execute()

    @staticmethod
    def _entry(tenant: str, raw: bytes) -> Entry:
        a, reason, source, created, expires, *rest = orjson.loads(raw)
        return Entry(a, tenant, reason, source, created, expires, rest[0] if rest else None)

    def _delete(self, tenant: str, key: str) -> bool:
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self._key(tenant), key)
        pipe.incr(self._ver)
        return bool(pipe.execute()[0])

    def _tenants(self) -> list[str]:
        return sorted(_s(t) for t in self.r.smembers(f"{self.k}:suptenants"))

    def _purge(self, now: float) -> int:
        n = 0
        for t in self._tenants():
            gone = [
                k
                for k, v in self.r.hscan_iter(self._key(t))
                if (e := self._entry(t, v)).expires is not None and e.expires <= now
            ]
            if gone:
                pipe = self.r.pipeline(transaction=True)
                pipe.hdel(self._key(t), *gone)
                pipe.incr(self._ver)
                n += int(pipe.execute()[0])
        return n

    def _reasons(self, tenant: str, keys: list[str], now: float) -> dict[str, str]:
        """One HMGET per 1000 keys (the dispatch-time check of every batch)."""
        hit: dict[str, str] = {}
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            for key, raw in zip(chunk, self.r.hmget(self._key(tenant), chunk), strict=True):
                if raw is not None:
                    e = self._entry(tenant, raw)
                    if e.expires is None or e.expires > now:
                        hit[key] = e.reason
        return hit

    def _get(self, tenant: str, key: str) -> Entry | None:
        raw = self.r.hget(self._key(tenant), key)
        return None if raw is None else self._entry(tenant, raw)

    def _entries(self, tenant: str | None, now: float | None) -> Iterator[Entry]:
        for t in [tenant] if tenant is not None else self._tenants():
            for _k, v in sorted(self.r.hgetall(self._key(t)).items()):
                e = self._entry(t, v)
                if now is None or e.expires is None or e.expires > now:
                    yield e

    def __len__(self) -> int:
        return sum(int(self.r.hlen(self._key(t))) for t in self._tenants())


# ---------------------------------------------------------------- webhook outbox
# KEYS: outbox zset, cursors hash. ARGV: url, last_id
_ACK = """
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1')
if cur < 0 then return 0 end
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
local low = nil
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  local x = tonumber(v)
  if low == nil or x < low then low = x end
end
if low ~= nil then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', low) end
return 1
"""

# KEYS: sequence, outbox zset, marks hash. ARGV: n, log, mark ("": forget), n bodies
_WH_APPEND = """
local n = tonumber(ARGV[1])
local last = redis.call('INCRBY', KEYS[1], n)
for i = 1, n do
  local id = last - n + i
  redis.call('ZADD', KEYS[2], id, string.format('%d', id) .. ':' .. ARGV[3 + i])
end
if ARGV[3] == '' then redis.call('HDEL', KEYS[3], ARGV[2])
else redis.call('HSET', KEYS[3], ARGV[2], ARGV[3]) end
return last
"""


class RedisOutbox:
    """The webhook outbox shared by every node: one node at a time sends to a URL.
    Its keys (``P:wh``, ``P:wh:seq``) are the shared spool's: a node's outcomes
    append their events in the same script (``Spool.record_outcomes``)."""

    written_with_outcomes = True

    def __init__(self, r: Any, prefix: str, node: str) -> None:
        self.r = r
        self.k = "{" + prefix + "}"
        self.node = node
        self._ack = r.register_script(_ACK)
        self._append_marked = r.register_script(_WH_APPEND)
        self.zkey, self.ckey = f"{self.k}:wh", f"{self.k}:wh:cur"
        self.mkey = f"{self.k}:wh:marks"  # each node's event log: how far its events are in

    def set_urls(self, urls: list[str]) -> None:
        start = int(self.r.get(f"{self.k}:wh:seq") or 0)
        for u in urls:
            self.r.hsetnx(self.ckey, u, start)
        # URLs other nodes still configure stay (a rolling config change).

    def append(self, bodies: list[bytes], marks: dict[str, str] | None = None) -> None:
        """As :meth:`fastsend.serve.webhooks.Outbox.append`: with ``marks``, the
        bodies and how far into the node's event log they go in one script."""
        if marks:
            for log_key, mark in marks.items():
                self._append_marked(keys=[f"{self.k}:wh:seq", self.zkey, self.mkey],
                                    args=[len(bodies), log_key, mark, *bodies])  # fmt: skip
                bodies = []
            return
        if not bodies:
            return
        last = int(self.r.incrby(f"{self.k}:wh:seq", len(bodies)))
        first = last - len(bodies) + 1
        self.r.zadd(self.zkey, {b"%d:" % (first + i) + b: first + i for i, b in enumerate(bodies)})

    def marks(self) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.r.hgetall(self.mkey).items()}

    def renew_every(self) -> float:
        """Seconds between renewals of a :meth:`hold` while its sender waits."""
        return WEBHOOK_LOCK / 3

    def hold(self, url: str) -> bool:
        """This node sends to ``url`` (taken or renewed), or another node does."""
        key = f"{self.k}:wh:lock:{hashlib.sha256(url.encode()).hexdigest()[:16]}"
        ms = int(WEBHOOK_LOCK * 1000)
        if self.r.set(key, self.node, nx=True, px=ms):
            return True
        if _s(self.r.get(key) or b"") == self.node:
            self.r.pexpire(key, ms)
            return True
        return False

    def fetch(self, url: str, limit: int) -> list[tuple[int, bytes]]:
        cur = self.r.hget(self.ckey, url)
        if cur is None:
            return []
        rows = self.r.zrangebyscore(self.zkey, f"({int(cur)}", "+inf", start=0, num=limit)
        out = []
        for m in rows:
            i, _, body = bytes(m).partition(b":")
            out.append((int(i), body))
        return out

    def ack(self, url: str, last_id: int) -> None:
        self._ack(keys=[self.zkey, self.ckey], args=[url, int(last_id)])

    def prune(self) -> None:
        pass  # ack prunes

    def fetch_all(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = self.r.zrangebyscore(self.zkey, f"({int(after)}", "+inf", start=0, num=limit)
        out = []
        for m in rows:
            i, _, body = bytes(m).partition(b":")
            out.append((int(i), body))
        return out

    def expire(self, before: float, sent: Any = None) -> dict[str, int]:
        """As :meth:`fastsend.serve.webhooks.Outbox.expire`, on the shared outbox (also
        what a URL no node sends to any more held back)."""
        from fastsend.serve.webhooks import count_until, expired_until

        cut = expired_until(self.fetch_all, before)
        if cut is None:
            return {}
        lost = {}
        for u, c in self.r.hgetall(self.ckey).items():
            count = sent(_s(u)) if sent is not None else None
            if count is None:
                n = int(self.r.zcount(self.zkey, f"({int(c)}", cut))
            else:
                n = count_until(self.fetch_all, int(c), cut, count)
            if n:
                lost[_s(u)] = n
        self.r.zremrangebyscore(self.zkey, "-inf", cut)
        return lost

    def pending(self, url: str | None = None) -> int:
        if url is None:
            return int(self.r.zcard(self.zkey))
        cur = self.r.hget(self.ckey, url)
        return 0 if cur is None else int(self.r.zcount(self.zkey, f"({int(cur)}", "+inf"))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- event index
EV_BUCKET = 128  # message ids per event list / meta hash (as the spool's buckets)
RUN_MAX = 1000  # events per time-index entry (P:evx): a run of one list
EVX_SLACK = 300.0  # s: an event is in the time index within this of its own time
EVX_SEQ = 1024  # an export position: (entry ms, entry seq * EVX_SEQ + index in the run)
EVX_READ = 2000  # event bodies an export reads in one round trip (a batch of entries)
# The runs of a batch of time-index entries, in one call. ARGV: P, then per run:
# bucket, first, last (list indexes) -> one list of bodies per run.
_READ = """
local out = {}
for i = 2, #ARGV, 3 do
  out[#out + 1] = redis.call('LRANGE', ARGV[1]..':ev:'..ARGV[i], ARGV[i + 1], ARGV[i + 2])
end
return out
"""
# The events of a flush in runs: each run RPUSHed to its bucket's list and named
# by one time-index entry (bucket, where it starts, how many, campaign, type,
# first and last time), in one call: a run and its entry are never apart.
# ARGV: P, ttl (s, 0: kept), trim (ms: entries before it go, 0: none), then per
# run: bucket, campaign, type, tmin, tmax, n, and its n bodies.
_APPEND = """
local P, ttl = ARGV[1], tonumber(ARGV[2])
local i = 4
while i <= #ARGV do
  local b, n = ARGV[i], tonumber(ARGV[i + 5])
  local key = P..':ev:'..b
  local len = redis.call('RPUSH', key, unpack(ARGV, i + 6, i + 5 + n))
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  redis.call('XADD', P..':evx', '*', 'b', b, 's', len - n, 'n', n, 'c', ARGV[i + 1],
             'e', ARGV[i + 2], 't0', ARGV[i + 3], 't1', ARGV[i + 4])
  i = i + 6 + n
end
if ARGV[3] ~= '0' then
  local t = redis.pcall('XTRIM', P..':evx', 'MINID', '~', ARGV[3])
  if type(t) == 'table' and t.err then  -- Redis before 6.2: no MINID; the oldest by hand
    for _, e in ipairs(redis.call('XRANGE', P..':evx', '-', ARGV[3], 'COUNT', 200)) do
      redis.call('XDEL', P..':evx', e[1])
    end
  end
end
return 1
"""
# KEYS: a bucket's event list. ARGV: message ids. The "delivered" entries of those ids.
_DELIVERED = """
local want = {}
for i = 1, #ARGV do want[ARGV[i] .. ':'] = true end
local out = {}
for _, e in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local c = string.find(e, ':', 1, true)
  if c and want[string.sub(e, 1, c)] and string.find(e, '"event":"delivered"', 1, true) then
    out[#out + 1] = e
  end
end
return out
"""
STAT_STEPS = ((60, 6 * 3600), (3600, 8 * 86400))  # (bucket s, kept s): minutes, hours
_SEP = "\x1f"


class RedisEventIndex(CatchesUp):
    """Per-message events for GET /v1/messages/{id} and the per-domain /
    per-IP counts of /v1/stats?by=..., readable on every node.

    A flush (every ``FLUSH_EVERY`` s) is a handful of commands whatever the
    number of events: a message's events go to the list of its bucket of
    ``EV_BUCKET`` ids (``P:ev:B``, entries ``ID:json``), tags and metadata to
    the hash ``P:meta:B``, and counts to one hash per minute and per hour
    (``P:evs:STEP:T``, fields ``d|ip<US>campaign<US>value<US>event``)."""

    def __init__(self, r: Any, prefix: str, ttl: int = EVENT_TTL) -> None:
        self.r = r
        self.k = "{" + prefix + "}"
        self.ttl = ttl  # s a message's history is kept ([analytics] events_days; 0: for ever)
        # (id, "ID:json", campaign, type, time) in the order recorded
        self.pending: list[tuple[int, bytes, int, str, float]] = []
        self._append = r.register_script(_APPEND)
        self._read = r.register_script(_READ)
        self._delivered = r.register_script(_DELIVERED)
        self.pending_meta: list[tuple[int, bytes, bytes]] = []
        self.counts: dict[tuple[int, str], int] = {}  # (minute, field) -> n
        self.last_flush = time.monotonic()
        self.closed = False
        self._said = False
        self.mkey = f"{self.k}:evmarks"  # each node's event log: how far its rows are in
        # The loop adds events while a flush may run in a thread (serve's tick, the
        # message route): _lock guards the buffers (held for their swap, never
        # over a Redis call), _flushing keeps flushes (and their marks) in order.
        self._lock = threading.Lock()
        self._flushing = threading.Lock()

    def _kept_mark(self) -> str | None:
        v = self.r.hget(self.mkey, self.mark_key)
        if v is None and self.log is not None and self.log.path:
            # Kept by a version before the node's id (events.legacy_mark_key): a
            # kill -9 just before the upgrade, or its stop's drain, is indexed from
            # it (as the SQLite index does). Read while the new key has no mark.
            v = self.r.hget(self.mkey, legacy_mark_key(self.log.path))
        return None if v is None else _s(v)

    def listener(self, events: list[dict[str, Any]]) -> None:
        super().listener(events)
        if self.closed:  # no tick flushes any more (a stop's drain)
            try:
                self.flush()
            except Exception as e:  # (never fail the event log; said once)
                if not self._said:
                    import logging

                    logging.getLogger("fastsend.serve.eventindex").warning(
                        "event index: events after the API closed not written (%s)", e)
                    self._said = True

    def _add(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            self._add_locked(events)

    def _add_locked(self, events: list[dict[str, Any]]) -> None:
        dumps = orjson.dumps
        add = self.pending.append
        counts = self.counts
        for e in events:
            mid = e.get("id")
            if not isinstance(mid, int):
                continue
            t = e.get("time")
            t = float(t) if isinstance(t, (int, float)) else time.time()
            cid = int(e.get("campaign") or 0)
            kind = str(e.get("event", ""))
            add((mid, b"%d:%s" % (mid, dumps(e)), cid, kind, t))
            minute = int(t) // 60
            rcpt = e.get("rcpt")
            dom = rcpt.rpartition("@")[2].lower() if isinstance(rcpt, str) else ""
            head = f"{_SEP}{cid}{_SEP}"
            ev = _SEP + kind.replace(_SEP, " ")
            for f in (
                "d" + head + dom.replace(_SEP, " ") + ev,
                "i" + head + str(e.get("source_ip") or "").replace(_SEP, " ") + ev,
            ):
                key = (minute, f)
                counts[key] = counts.get(key, 0) + 1

    def add_meta(self, rows: Iterable[tuple[int, list[str], dict[str, Any]]]) -> None:
        dumps = orjson.dumps
        got = [(mid, dumps(tags), dumps(md)) for mid, tags, md in rows]
        with self._lock:
            self.pending_meta.extend(got)

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush >= 0.2:
            self.flush()

    def flush(self) -> None:
        """Write what was added since the last flush; from any thread."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        self.last_flush = time.monotonic()
        with self._lock:
            mark = self._mark if self._mark != self._mark_written else None
            if not self.pending and not self.pending_meta and not self.counts and mark is None:
                return
            rows, self.pending = self.pending, []
            meta, self.pending_meta = self.pending_meta, []
            counts, self.counts = self.counts, {}
        k = self.k
        pipe = self.r.pipeline(transaction=False)
        # Runs of consecutive events of one bucket, campaign and type (a batch of
        # deliveries is one or a few), in the order recorded.
        runs: list[list[Any]] = []
        cur: list[Any] | None = None
        for mid, body, cid, kind, t in rows:
            b = mid // EV_BUCKET
            if cur is None or cur[0] != b or cur[1] != cid or cur[2] != kind or len(
                cur[5]
            ) >= RUN_MAX:
                cur = [b, cid, kind, t, t, []]
                runs.append(cur)
            elif t < cur[3]:
                cur[3] = t
            elif t > cur[4]:
                cur[4] = t
            cur[5].append(body)
        trim = int((time.time() - self.ttl - EVX_SLACK) * 1000) if self.ttl else 0
        args: list[Any] = []
        for j, (b, cid, kind, t0, t1, bodies) in enumerate(runs):
            args += [b, cid, kind, repr(t0), repr(t1), len(bodies), *bodies]
            if len(args) >= 4 * RUN_MAX or j == len(runs) - 1:
                self._append(args=[k, self.ttl, trim, *args], client=pipe)
                args = []
        hashes: dict[int, dict[bytes, bytes]] = {}
        for mid, tags, md in meta:
            h = hashes.setdefault(mid // EV_BUCKET, {})
            h[b"%dt" % mid], h[b"%dm" % mid] = tags, md
        for b, h in hashes.items():
            key = f"{k}:meta:{b}"
            pipe.hset(key, mapping=h)  # type: ignore[arg-type]
            if self.ttl:
                pipe.expire(key, self.ttl)
        for step, keep in STAT_STEPS:
            per: dict[int, dict[str, int]] = {}
            for (minute, f), n in counts.items():
                h2 = per.setdefault(minute * 60 // step, {})
                h2[f] = h2.get(f, 0) + n
            for t, h2 in per.items():
                key = f"{k}:evs:{step}:{t}"
                for f, n in h2.items():
                    pipe.hincrby(key, f, n)
                pipe.expire(key, keep + step)
        if mark is not None:  # last: rows written without it are indexed again, not lost
            pipe.hset(self.mkey, self.mark_key, mark)
        pipe.execute()
        if mark is not None:
            self._mark_written = mark

    def for_message(self, mid: int) -> list[dict[str, Any]]:
        self.flush()
        head = b"%d:" % int(mid)
        raw = self.r.lrange(f"{self.k}:ev:{int(mid) // EV_BUCKET}", 0, -1)
        evs = [orjson.loads(b[len(head) :]) for b in raw if b.startswith(head)]
        evs.sort(key=lambda e: e.get("time") or 0)
        return evs

    def logged(self, ids: Collection[int], events: tuple[str, ...]) -> set[int]:
        """Which of ``ids`` have one of ``events`` indexed (what is buffered included)."""
        self.flush()
        want = set(ids)
        buckets = sorted({mid // EV_BUCKET for mid in want})
        pipe = self.r.pipeline(transaction=False)
        for b in buckets:
            pipe.lrange(f"{self.k}:ev:{b}", 0, -1)
        out: set[int] = set()
        for raw in pipe.execute():
            for entry in raw:
                head, _, body = entry.partition(b":")
                mid = int(head)
                if mid in want and mid not in out and orjson.loads(body).get("event") in events:
                    out.add(mid)
        return out

    def deliveries(self, ids: Collection[int]) -> dict[int, tuple[float, dict[str, Any]]]:
        """As :meth:`fastsend.serve.eventindex.EventIndex.deliveries`, from every node's
        events (the node that delivered a message is seldom the one its open reaches)."""
        self.flush()
        want = {int(i) for i in ids}
        by_bucket: dict[int, list[int]] = {}
        for mid in want:
            by_bucket.setdefault(mid // EV_BUCKET, []).append(mid)
        pipe = self.r.pipeline(transaction=False)
        for b, mids in sorted(by_bucket.items()):
            # only the wanted messages' deliveries come back, not the bucket's list
            self._delivered(keys=[f"{self.k}:ev:{b}"], args=mids, client=pipe)
        out: dict[int, tuple[float, dict[str, Any]]] = {}
        for raw in pipe.execute():
            for entry in raw:
                head, _, body = entry.partition(b":")
                mid = int(head)
                if mid in want and b'"delivered"' in body:
                    e = orjson.loads(body)
                    t = e.get("time")
                    if (e.get("event") == "delivered" and isinstance(t, int | float)
                            and (mid not in out or t >= out[mid][0])):  # fmt: skip
                        out[mid] = (float(t), e)
        return out

    def meta(self, mid: int) -> tuple[list[str], dict[str, Any]]:
        self.flush()
        mid = int(mid)
        t, m = self.r.hmget(f"{self.k}:meta:{mid // EV_BUCKET}", b"%dt" % mid, b"%dm" % mid)
        if t is None or m is None:
            return [], {}
        return orjson.loads(t), orjson.loads(m)

    def stats(
        self, since: float, campaigns: list[int] | None, by: str
    ) -> list[tuple[str, str, int]]:
        """(group, event, count) over events since ``since`` (to the minute, or
        to the hour beyond six hours) as EventIndex.stats; ``by`` is campaign,
        domain or source_ip; ``campaigns`` limits to a tenant's."""
        if by not in ("campaign", "domain", "source_ip"):
            raise ValueError(by)
        self.flush()
        if campaigns is not None and not campaigns:
            return []
        now = time.time()
        step = STAT_STEPS[0][0] if now - since <= STAT_STEPS[0][1] else STAT_STEPS[1][0]
        keys = [f"{self.k}:evs:{step}:{t}" for t in range(int(since) // step, int(now) // step + 1)]
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        want = None if campaigns is None else {str(int(c)) for c in campaigns}
        kind = "i" if by == "source_ip" else "d"
        out: dict[tuple[str, str], int] = {}
        for h in pipe.execute():
            for f, n in h.items():
                k, cid, value, event = _s(f).split(_SEP, 3)
                if k != kind or (want is not None and cid not in want):
                    continue
                g = (cid if by == "campaign" else value, event)
                out[g] = out.get(g, 0) + int(n)
        return [(g, e, n) for (g, e), n in out.items()]

    # -- bulk export (GET /v1/events), as EventIndex's ---------------------------
    # A position is (entry ms, entry seq * EVX_SEQ + index of the event in its
    # run): in the order the nodes recorded the events (a flush's events are
    # within a fraction of a second of each other), each event once.

    def _walk(
        self, q: Any, after: tuple[float, int] | None, read: Callable[[dict[bytes, bytes]], bool]
    ) -> Iterator[tuple[int, int, dict[bytes, bytes], int, list[bytes] | None]]:
        """(ms, seq, fields, first index, bodies) of the time index's entries past
        ``after`` that may hold events of ``q`` (their campaign and type match, their
        times meet [t0, t1)); entries are read EVX_SLACK s beyond the range's ends.
        The bodies (from the first index on, JSON without the "ID:") of the entries
        ``read`` asks for are fetched a few thousand at a time in one round trip;
        None for the others."""
        key = f"{self.k}:evx"
        if after is not None:
            ms, rest = int(after[0]), int(after[1])
            seq, k0 = divmod(rest, EVX_SEQ)
            if not (0 <= ms < 1 << 63 and 0 <= seq < 1 << 63):
                return  # no entry is there (a cursor this server never gave)
            start, first = f"{ms}-{seq}", k0 + 1
        else:
            start, first = f"{max(0, int((q.t0 - EVX_SLACK) * 1000))}-0", 0
        stop = int((q.t1 + EVX_SLACK) * 1000)
        camps = None if q.campaigns is None else {b"%d" % c for c in q.campaigns}
        if camps is not None and q.tenant is not None:
            camps.add(b"0")  # (the tenant's own among them: _fits reads each)
        kinds = None if q.kinds is None else {x.encode() for x in q.kinds}
        while True:
            page = self.r.xrange(key, start, f"{stop}-18446744073709551615", count=500)
            if not page:
                return
            items: list[tuple[int, int, dict[bytes, bytes], int]] = []
            for raw_id, f in page:
                ms_s, _, seq_s = _s(raw_id).partition("-")
                ms, seq = int(ms_s), int(seq_s)
                lo = first if f"{ms}-{seq}" == start else 0
                if (
                    (camps is None or f.get(b"c") in camps)
                    and (kinds is None or f.get(b"e") in kinds)
                    and float(f[b"t1"]) >= q.t0
                    and float(f[b"t0"]) < q.t1
                    and lo < int(f[b"n"])
                ):
                    items.append((ms, seq, f, lo))
            j = 0
            while j < len(items):  # a batch of entries, its bodies in one round trip
                batch: list[tuple[int, int, dict[bytes, bytes], int]] = []
                size = 0
                while j < len(items) and (not batch or size < EVX_READ):
                    batch.append(items[j])
                    size += int(items[j][2][b"n"]) - items[j][3]
                    j += 1
                want = [it for it in batch if read(it[2])]
                got: dict[tuple[int, int], list[bytes]] = {}
                if want:
                    args: list[Any] = [self.k]
                    for _ms, _seq, f, lo in want:
                        s0 = int(f[b"s"])
                        args += [int(f[b"b"]), s0 + lo, s0 + int(f[b"n"]) - 1]
                    for it, raw in zip(want, self._read(args=args), strict=True):
                        got[(it[0], it[1])] = [x.partition(b":")[2] for x in raw]
                for ms, seq, f, lo in batch:
                    yield ms, seq, f, lo, got.get((ms, seq))
            last = _s(page[-1][0])
            ms_s, _, seq_s = last.partition("-")
            start = f"{ms_s}-{int(seq_s) + 1}"
            first = 0

    @staticmethod
    def _fits(q: Any, f: dict[bytes, bytes], body: bytes) -> bool:
        try:
            e = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        t = e.get("time")
        return (
            isinstance(t, (int, float)) and q.t0 <= t < q.t1
            and str(e.get("event", "")).encode() == f[b"e"]
            and b"%d" % int(e.get("campaign") or 0) == f[b"c"]
            and (f[b"c"] != b"0" or q.campaigns is None or e.get("tenant") == q.tenant)
        )  # fmt: skip

    def _inside(self, q: Any, f: dict[bytes, bytes]) -> bool:
        """Every event of the run is inside [t0, t1) (counted without reading it);
        a run of no campaign for one tenant's export is read (whose each is)."""
        if f[b"c"] == b"0" and q.campaigns is not None:
            return False
        return float(f[b"t0"]) >= q.t0 and float(f[b"t1"]) < q.t1

    def export_end(self, q: Any) -> tuple[tuple[float, int] | None, bool]:
        """As EventIndex.export_end: the position of the page's last event and
        whether more follow; (None, False) when the page is everything left."""
        self.flush()
        if q.selects_nothing():
            return None, False
        left = q.limit
        end: tuple[float, int] | None = None
        for ms, seq, f, lo, bodies in self._walk(q, q.after, lambda f: not self._inside(q, f)):
            n = int(f[b"n"])
            if bodies is None:  # wholly inside the range: counted without reading it
                idx = list(range(lo, n))
            else:
                idx = [lo + j for j, b in enumerate(bodies) if self._fits(q, f, b)]
            if end is not None:
                if idx:
                    return end, True
                continue
            if len(idx) >= left:
                end = (float(ms), seq * EVX_SEQ + idx[left - 1])
                if len(idx) > left:
                    return end, True
                left = 0
            else:
                left -= len(idx)
        return end, False

    def export_chunk(
        self, q: Any, after: tuple[float, int] | None, until: tuple[float, int] | None,
        n: int = 1000,
    ) -> tuple[list[bytes], tuple[float, int] | None]:  # fmt: skip
        """As EventIndex.export_chunk: up to ``n`` bodies past ``after``, not past
        ``until``, and the position of the last one."""
        if q.selects_nothing():
            return [], None
        out: list[bytes] = []
        pos: tuple[float, int] | None = None
        for ms, seq, f, lo, bodies in self._walk(q, after, lambda f: True):
            for j, body in enumerate(bodies or ()):
                here = (float(ms), seq * EVX_SEQ + lo + j)
                if until is not None and here > until:
                    return out, pos
                if self._fits(q, f, body):
                    out.append(body)
                    pos = here
                    if len(out) >= n:
                        return out, pos
        return out, pos

    def prune(self, before: float) -> int:
        return 0  # keys expire on their own (the time index is trimmed as it grows)

    def close(self) -> None:
        """Flush. The API closes before serve's drain ends: the events of the drain
        (the outcomes of the mail in flight at a SIGTERM) still come, and each batch
        is written as it comes (they were left in memory, out of the index for good)."""
        self.flush()
        self.closed = True


# ---------------------------------------------------------------- the bundle
def shared_store(url: str, *, readonly: bool = False) -> SharedStore | None:
    """The shared store of the spool a URL names (``Spool.shared()``), or None for
    a local spool: what the CLI tools (apikey, suppress) open. ``readonly``: for
    a view (``suppress list``, ``apikey list``): it writes nothing, so it works
    against a replica and needs the spool to exist."""
    from fastsend.spool import is_redis_url, open_spool

    return open_spool(url, readonly=readonly).shared() if is_redis_url(url) else None


class SharedState:
    """What a serving node on a shared spool keeps in Redis (built from the spool)."""

    def __init__(self, spool: Any) -> None:
        from fastsend.cluster import ClusterNode

        shared = spool.shared()
        if shared is None:
            raise ValueError("SharedState needs a shared spool (Spool.shared())")
        self.r = shared.client
        self.prefix: str = shared.prefix
        self.node: str = shared.node
        self.lease: float = shared.lease
        self.cluster = ClusterNode(self.r, self.prefix, self.node, self.lease)
        self._spool = spool
        self.durability: Any = None
        self._renewed = 0.0
        self._published = 0.0
        self._started = time.time()
        # () -> this node's status for the cluster view (the dashboard sets it)
        self.status_source: Callable[[], dict[str, Any]] | None = None
        # () -> None: the dashboard's counts since the last tick added to Redis
        self.live_source: Callable[[], None] | None = None
        # () -> (the dashboard's counts since the last tick as live_add's arguments,
        # a callable putting them back when they could not be written) or None:
        # tick_async's, taken on the loop and written in a thread
        self.live_take: Callable[[], tuple[tuple[Any, ...], Callable[[], None]] | None] | None
        self.live_take = None
        self._live_failed = False
        # Supervisor.rest_ip (serve sets it with workers): a source IP another
        # live node took while this node's lease on it had lapsed is rested here
        # until it is this node's again
        self.rest_ip: Callable[[str, list[str], float, str], None] | None = None

    def start(self, config: Any, *, allow_volatile: bool) -> list[str]:
        """Before anything is accepted: durability stated (and checked), this node's
        source IPs claimed (the shared secret was taken by open_context). ClusterError when the node must not start. Returns lines for the operator."""
        from fastsend.cluster import check_durability, dead_here, read_durability

        d = self.durability = read_durability(self.r)
        check_durability(d, allow_volatile=allow_volatile)
        self.cluster.claim_ips(list(config.source_ips), dead_here(self.r, self.prefix, self.node))
        self._renewed = time.monotonic()
        return [
            f"node {self.node} on Redis {d.version} (prefix {self.prefix!r}); an acknowledged"
            f" message survives {d.survives}",
            f"source IPs held by this node: {', '.join(config.source_ips) or '(none)'}",
        ]

    def tick(self) -> None:
        """Renew this node's hold on its IPs (every lease/4); publish its status
        (``status_source()``, every ``STATUS_EVERY`` s) for every node's dashboard.
        An IP another live node holds now is rested while it lasts
        (:meth:`ClusterNode.renew_and_rest`); before, it was only logged."""
        now = time.monotonic()
        if now - self._renewed >= self.lease / 4:
            self._renewed = now
            self.cluster.renew_and_rest(self.rest_ip)
            self._spool.renew()  # its node name (also without workers: no supervisor)
        if now - self._published >= STATUS_EVERY:
            self._published = now
            if self.live_source is not None:
                try:  # (its counts wait for the next tick; the status goes on)
                    self.live_source()
                    self._live_failed = False
                except Exception as e:
                    if not self._live_failed:  # once per run of failures
                        log.warning("dashboard: this node's counts not published to"
                                    " Redis (%s: %s); tried again each second",
                                    e.__class__.__name__, e)  # fmt: skip
                    self._live_failed = True
            st = self.status_source() if self.status_source is not None else {}
            self.cluster.publish({**st, "host": socket.gethostname(), "pid": os.getpid(),
                                  "started": self._started})  # fmt: skip

    async def tick_async(self) -> None:
        """:meth:`tick` for serve's event loop: what it decides and gathers (the
        status, the dashboard's counts: ``live_take``) on the loop, its Redis calls
        in a thread, an IP lost rested on the loop (``rest_ip``: the supervisor's).
        On the loop, a Redis that answers slowly or not at all (a fork, a long
        script, a partition: each call waits for the client's timeout) held every
        listener of the node (API, tracking, SMTP) for as long."""
        now = time.monotonic()
        renew = now - self._renewed >= self.lease / 4
        if renew:
            self._renewed = now
        live: tuple[tuple[Any, ...], Callable[[], None]] | None = None
        status: dict[str, Any] | None = None
        if now - self._published >= STATUS_EVERY:
            self._published = now
            if self.live_take is not None:
                live = self.live_take()
            st = self.status_source() if self.status_source is not None else {}
            status = {**st, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": self._started}  # fmt: skip
        if not renew and status is None:
            return
        lost, live_error = await asyncio.to_thread(
            self._tick_io, renew, live[0] if live is not None else None, status
        )
        if live is not None:
            if live_error is not None:
                live[1]()  # (kept for the next tick)
                if not self._live_failed:  # once per run of failures
                    log.warning("dashboard: this node's counts not published to"
                                " Redis (%s: %s); tried again each second",
                                live_error.__class__.__name__, live_error)  # fmt: skip
                self._live_failed = True
            else:
                self._live_failed = False
        if lost and self.rest_ip is not None:
            until = time.time() + self.lease / 2
            for ip in lost:
                self.rest_ip(ip, ["*"], until, "source IP held by another live node")

    def _tick_io(
        self, renew: bool, live: tuple[Any, ...] | None, status: dict[str, Any] | None
    ) -> tuple[list[str], Exception | None]:
        """tick_async's Redis calls (a thread): the IPs lost, the live counts' error."""
        lost: list[str] = []
        if renew:
            lost = self.cluster.renew()
            self._spool.renew()  # its node name (also without workers: no supervisor)
        live_error: Exception | None = None
        if live is not None:
            try:
                self.live_add(*live)
            except Exception as e:  # (the status goes on)
                live_error = e
        if status is not None:
            self.cluster.publish(status)
        return lost, live_error

    def reload(self, config: Any) -> None:
        """A reload's source IPs (``[ips]``) held before any worker uses them
        (ClusterError naming the live node holding one: the reload is refused);
        :meth:`reloaded` gives back those it dropped once it took effect."""
        self.cluster.add_ips(list(config.source_ips))

    def reloaded(self, config: Any) -> None:
        self.cluster.keep_ips(list(config.source_ips))

    def cluster_view(self) -> dict[str, Any]:
        """Every live node (ClusterNode.members) and the cluster's totals: the sum
        of each number the nodes publish under ``rates`` and ``totals``."""
        nodes = self.cluster.members()
        sums: dict[str, dict[str, float]] = {"rates": {}, "totals": {}}
        for m in nodes:
            for part, acc in sums.items():
                for name, v in (m.get(part) or {}).items():
                    if isinstance(v, int | float):
                        acc[name] = round(acc.get(name, 0) + v, 3)
        return {"nodes": nodes, "count": len(nodes), **sums}

    def _live_key(self, tenant: str) -> str:
        return "{" + self.prefix + "}:dash:" + tenant

    def live_add(
        self,
        minutes: dict[str, dict[int, dict[str, int]]],
        recent: dict[str, list[bytes]],
        keep_s: int,
        recent_keep_s: int,
        recent_n: int,
    ) -> None:
        """Add a node's dashboard counts (tenant -> minute -> field -> n) to the
        cluster's, ``P:dash:TENANT:MINUTE`` hashes each kept ``keep_s`` after its
        last write, and its recent events (oldest first) to ``P:dash:TENANT:r``,
        the newest ``recent_n`` kept: one MULTI/EXEC, all or nothing."""
        pipe = self.r.pipeline(transaction=True)
        for tenant, by_min in minutes.items():
            base = self._live_key(tenant)
            for m, fields in by_min.items():
                if fields:
                    k = f"{base}:{m}"
                    for f, n in fields.items():
                        pipe.hincrby(k, f, n)
                    pipe.expire(k, keep_s)
        for tenant, rows in recent.items():
            if rows:
                k = self._live_key(tenant) + ":r"
                pipe.lpush(k, *rows)
                pipe.ltrim(k, 0, recent_n - 1)
                pipe.expire(k, recent_keep_s)
        pipe.execute()

    def live_read(
        self, tenant: str, minutes: list[int], recent_n: int
    ) -> tuple[list[dict[bytes, bytes]], list[bytes]]:
        """A tenant's dashboard counts of these minutes (every node's, added up) and
        its newest ``recent_n`` recent events: one round trip (a thread's)."""
        base = self._live_key(tenant)
        pipe = self.r.pipeline(transaction=False)
        for m in minutes:
            pipe.hgetall(f"{base}:{m}")
        pipe.lrange(base + ":r", 0, recent_n - 1)
        *hashes, recent = pipe.execute()
        return hashes, recent

    def ip_state_put(self, states: dict[str, bytes]) -> None:
        """Source IP -> what its node alone knows of it (``Charts.publish_ips``),
        in the hash ``P:ipstate``, kept a day after its last write."""
        k = "{" + self.prefix + "}:ipstate"
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(k, mapping=states)
        pipe.expire(k, 86400)
        pipe.execute()

    def ip_state_get(self, ip: str) -> bytes | None:
        raw = self.r.hget("{" + self.prefix + "}:ipstate", ip)
        return raw if isinstance(raw, bytes | None) else str(raw).encode()

    def stop(self) -> None:
        self.cluster.release()

    def spool_stats(self) -> dict[str, int]:
        """Counters of the shared spool (``taken_over``: possible duplicates)."""
        return dict(self._spool.stats())

    def keys(self) -> RedisKeyStore:
        return RedisKeyStore(self.r, self.prefix)

    def link_event(self, token: str, window: float, cap: int) -> bool:
        """Whether one more open or click of this link (its token) is recorded: at
        most ``cap`` in ``window`` seconds from its first, counted across every node
        (one INCR; the key, a digest of the token, expires with the window)."""
        k = "{" + self.prefix + "}:lk:" + hashlib.sha256(token.encode()).hexdigest()[:32]
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(k)
        pipe.expire(k, max(1, int(window)), nx=True)
        n = int(pipe.execute()[0])
        return n <= cap

    def once(self, name: str, ttl: float) -> bool:
        """True for the first node to ask for ``name`` within ``ttl`` s (SET NX)."""
        k = "{" + self.prefix + "}:once:" + name
        return bool(self.r.set(k, b"1", nx=True, ex=max(1, int(ttl))))

    def suppression(self) -> RedisSuppressionList:
        return RedisSuppressionList(self.r, self.prefix)

    def outbox(self) -> RedisOutbox:
        return RedisOutbox(self.r, self.prefix, self.node)

    def index(self, ttl: int = EVENT_TTL) -> RedisEventIndex:
        return RedisEventIndex(self.r, self.prefix, ttl)
