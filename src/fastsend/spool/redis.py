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
  node once its lease expires. One live process per name: ``send``,
  ``resume`` and ``serve`` hold it (``P:name:NODE``, :meth:`hold_supervisor`)
  and a second one is refused; a holder that died on this host is taken over
  at once, one on another host when its lease lapses.
- ``lease`` (seconds, default 30): how long a node's claims stay its own
  without a renewal. The supervisor renews every tick (:meth:`renew`, rate
  limited to a few calls per lease), claims and outcomes renew too.
- ``replicas`` (default 0): ``add_messages`` waits (``WAIT``/``WAITAOF``) until
  that many replicas acknowledged the write.

Layout (``P`` = ``{prefix}``): ``P:c:CID`` a hash per campaign (spec and
options as JSON), ``P:camps`` the ids (sorted set), ``P:tc:TENANT`` a
tenant's ids (sorted set: a tenant's listing reads only its own campaigns),
``P:active`` the ids of active campaigns; ``P:m:B`` a hash per bucket of ``BUCKET`` consecutive
message ids (``B = id // BUCKET``) with two fields per message: ``ID`` =
``rcpt NUL domain NUL created NUL vars`` (written once) and ``IDs`` =
``state|owner|campaign|attempts|next|updated|code|enhanced|text`` (``spool/lib.lua``
reads and writes it). The ids of one batch are consecutive, so a claim or an
outcome of a whole batch is one HMGET and one HSET per bucket, not per message
(bench/multinode.py counts well under one Redis command per message). ``P:layout``
is the layout's version (a spool of another layout is refused). ``P:due:CID`` a sorted set per campaign of its pending
(queued/deferred) ids scored by next attempt time (less 10 us per digit
an id has fewer than 20, :func:`due_score`: ties come out by number);
``P:dfr:DOMAIN`` the ids a site deferred (421, or an enhanced status of
``SITE_STATUSES``) scored by next attempt, written by ``record.lua`` (entries due
by then dropped), read by :meth:`RedisSpool.bring_forward` (``bring.lua``);
``P:dueidx`` the active campaigns with mail in their due set, each scored at
most its set's head (``lib.lua``: a claim reads only the campaigns due now;
swept from ``P:active`` every 30 s, ``P:dueidx:swept``, in steps of
``SWEEP_STEP`` campaigns from the cursor ``P:dueidx:cursor``); ``P:n:CID`` and ``P:n``
counters per state (a campaign's moves between states in ``P:nd``, fields
``CID|state``, added to its ``P:n:CID``: lib.lua flush_tally); ``P:nodes`` node -> lease deadline (ms, Redis server time:
no clock skew between nodes); ``P:fl:NODE`` the ids a node holds in flight;
``P:wh`` the webhook outbox (a sorted set of ``ID:JSON`` by id, ids from
``P:wh:seq``): outcomes append their events to it in the same script
(:meth:`RedisSpool.record_outcomes`), and ``fastsend.serve.shared_state.RedisOutbox``
sends from it; ``P:untold:NODE`` what a node recorded whose events its event log
may not have yet (noted in the same script, dropped by :meth:`RedisSpool.told`),
``P:untold`` those of dead nodes for any node to tell; ``P:meta`` facts about the spool (:meth:`meta_once`); ``P:b:HEX``,
``P:bm:HEX``, ``P:br:HEX`` and ``P:blobs`` the bodies stored once
(:meth:`put_blob`);
``P:idem:HEX`` an Idempotency-Key's record (HEX: SHA-256 of tenant NUL key;
``spool/idem.lua``, expiring with the key's ttl; its parts are written in the
MULTI/EXEC of their rows, which WATCHes it) and ``P:idem:HEX:lease`` its
running holder's lease;
``P:ing:JOB`` a hash per list-ingest job (its position, and the ids of the
batch whose events are not told yet, are written in the same MULTI/EXEC as the
batch of rows it describes), ``P:ings`` their ids,
``P:ings:run`` the ids of the running ones (what a serve polls for upload
jobs whose reader died).

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
scripts (``spool/*.lua``, package data, each loaded after ``spool/lib.lua``), so each is all-or-nothing and two nodes never claim the same message.
A claim also requeues the windows of nodes whose lease expired (a node that
died), so the surviving nodes deliver them: nothing is lost, and duplicates
are bounded by the dead node's window. Each message taken back counts one
attempt of unknown outcome (deferred, due at once; ``P:unk`` lists them for
their deferred events, :meth:`RedisSpool.taken_back`). An outcome is applied whoever holds the
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

Final messages stay ``[spool] final_retention_days`` after their last change
(``message(id)`` answers for them, as in SQLite), then the supervisors delete
them a bucket at a time (:meth:`RedisSpool.prune_final`, ``spool/prune.lua``:
``P:prune`` its cursor, ``P:prune:keep`` the buckets a sweep left messages in;
``P:fp:CID`` a campaign's duplicate set, ``P:fplast`` campaign -> its last id:
the sets whose rows are gone, found at a sweep's end);
the per-state counters, and so every count, stay as they were.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import secrets
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

import orjson
import redis

from fastsend.redisurl import redact_url
from fastsend.retry import retry_hint
from fastsend.ring import clear_write_logs, read_write_logs
from fastsend.sendruns import RUN_OPTION
from fastsend.spool.base import (
    _LOCKS,
    AGE_BUCKETS_MIN,
    CAMPAIGN_STATUSES,
    ENDED,
    INGEST_STATUSES,
    ORPHAN_GRACE,
    PENDING_STATES,
    REDIS_PARAMS,
    SITE_STATUSES,
    STAGING,
    STATE_NAMES,
    SUPERVISOR_LOCK,
    SUPPRESSED,
    TAKEN_TTL,
    CampaignInfo,
    Claimed,
    FpsChanged,
    IdemLost,
    IdemMark,
    IdemRecord,
    IngestBusy,
    IngestJob,
    IngestLost,
    IngestMark,
    LocalDirBusy,
    Result,
    SharedStore,
    Spool,
    SpoolBusy,
    SpoolError,
    TakenBack,
    Untold,
    describe_holder,
    holder_gone,
    holder_tag,
    id_runs,
    idem_part,
    idem_part_ids,
    lock_file,
    parse_redis_url,
    same_pid_space,
    unknown_text,
    unlock_file,
)
from fastsend.spool.fair import rank
from fastsend.wire import blob_ref

OUR_PARAMS = REDIS_PARAMS
# ref_blob: one pending reference fewer, never below 0
_UNPEND = (
    "local v = redis.call('HINCRBY', KEYS[1], 'pending', -1)"
    " if v < 0 then redis.call('HSET', KEYS[1], 'pending', 0) end return v"
)
CHUNK = 2000  # ids per script call / pipeline for bulk work
BUCKET = 128  # message ids per hash (as B in spool/lib.lua)
SKEW_APPLY = 1.0  # s between this host's clock and Redis's from which due times are corrected
SKEW_EVERY = 60.0  # s between readings of the gap (renew)

# The client's socket options unless the URL sets them (?socket_timeout=...; a
# unix:// socket takes the timeout alone): a
# Redis that stops answering (paused, a host gone with its connections, a
# partition dropping packets) is an outage after this long, not a node stuck
# in a read for good (redis-py before 6 waits forever by default).
SOCKET_OPTIONS: dict[str, Any] = {
    "socket_timeout": 5.0, "socket_connect_timeout": 5.0, "socket_keepalive": True,
}  # fmt: skip
SWEEP_MS = 30_000  # lib.lua SWEEP_MS: the index of campaigns with mail due is swept this often
# Active campaigns a step of that sweep looks at (one script call, ~1-3 ms of
# Redis): a renew() makes one step while a sweep is under way.
SWEEP_STEP = 1000
# The oldest Redis the spool runs on: SMISMEMBER (a campaign's duplicate
# addresses, recorded_fps) came in 6.2; before, the first upload failed with
# "unknown command" after the node had started.
MIN_VERSION = (6, 2)
# A due set's ties (ids due at one time) come out as strings ("10" before "9"):
# an id's score is its due time less DUE_STEP per digit it has fewer than 20
# (lib.lua due_score), so ids due at one time go by length, then as strings:
# by number. Due at most 0.2 ms early; times closer than 10 us may swap.
DUE_STEP = 1e-5


def due_score(at: float, digits: int) -> float:
    """The due-set score of an id of ``digits`` digits due at ``at`` (lib.lua due_score)."""
    return at - (20 - digits) * DUE_STEP
# How often a node looks for this host's dead holders' write logs to remove (renew).
LOGS_SWEEP_S = 60.0

PRUNE_BUCKETS = 4  # buckets per prune_final call (one script)
PRUNE_FPS = 100  # campaigns' duplicate sets looked at per prune_final call (prune.lua 'fps')
LAYOUT = b"2"  # P:layout: the message layout above
AHEAD_TTL = 0.5  # s: a claim sent ahead and answered later than this is put back
# s: after a claim that found nothing due, this node's next claims within this
# time answer "nothing" without running claim.lua (unless it spooled or handed
# back mail, or set a status, meanwhile): an idle supervisor claims every tick
# (20 ms), and each claim is a script call (before the index of campaigns with
# mail due, it read every active campaign's due set: 2,000 campaigns ~4 ms of
# Redis's one thread). Mail another node spools, or that comes due by the
# clock, waits at most this long.
QUIET_REUSE = 0.1

class RedisSpoolError(SpoolError):
    """The Redis spool cannot be used (bad URL, durability not reached)."""


class RedisUnreachable(RedisSpoolError):
    """Redis does not answer (refused, timed out, down for now): a command stops
    with 75, try again later, not 2 as for a wrong URL (a job runner retries)."""

    exit_status = 75


class RedisTakesNoWrites(RedisSpoolError):
    """Redis answers but takes no writes now (a replica answering READONLY while a
    failover is under way, MISCONF with its disk full, OOM): 75 as for a Redis
    that does not answer, so a job runner tries again once it takes writes (it
    was 2, the status of a wrong URL, and such a command was not retried)."""

    exit_status = 75


class RedisRefusesWrites(redis.exceptions.ResponseError):
    """Redis answers but refuses writes for now: its persistence fails (MISCONF:
    the AOF or a snapshot cannot be written, its disk full), too few replicas
    acknowledge (NOREPLICAS: ``min-replicas-to-write``), or a script runs long
    (BUSY). An outage of the spool (:meth:`RedisSpool.outage_errors`), as are a
    replica answering READONLY (a failover demoted this server) and
    maxmemory's OOM: what waits is written once it takes writes again."""


# Error replies that end once the server takes writes again, whatever the
# command: raised as RedisRefusesWrites (redis-py raises a plain ResponseError,
# which would end the supervisor's run like a bug).
_REFUSALS = ("MISCONF", "NOREPLICAS", "BUSY")


@functools.cache
def _client_options(scheme: str = "redis") -> dict[str, Any]:
    """redis-py client options for a URL of ``scheme``: its hiredis reply parser
    (a dependency) with :data:`_REFUSALS` raised as RedisRefusesWrites (without
    hiredis: redis-py refuses a subclass of its own parser, and the refusals
    stay plain ResponseErrors), and a connection class that drops its
    connection when the server answers READONLY (:func:`_failover_class`)."""
    from redis.connection import DefaultParser
    from redis.utils import HIREDIS_AVAILABLE

    out: dict[str, Any] = {"connection_class": _failover_class(scheme)}
    if not HIREDIS_AVAILABLE:
        return out
    table = {**DefaultParser.EXCEPTION_CLASSES, **dict.fromkeys(_REFUSALS, RedisRefusesWrites)}
    out["parser_class"] = type("SpoolParser", (DefaultParser,), {"EXCEPTION_CLASSES": table})
    return out


def _failover_class(scheme: str) -> type[Any]:
    """The redis-py connection class of ``scheme`` (``redis``, ``rediss``,
    ``unix``), made to close its connection when an answer is READONLY: the
    server it reached was demoted by a failover, and the address the URL names
    (a virtual IP, a proxy, a DNS name) leads to the new primary only on a new
    connection. Before, an established connection stayed on the demoted
    server, and every node rode out an outage that never ended."""
    base: type[Any] = {"rediss": redis.SSLConnection,
                       "unix": redis.UnixDomainSocketConnection}.get(scheme, redis.Connection)  # fmt: skip

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return base.read_response(self, *args, **kwargs)
        except redis.exceptions.ReadOnlyError:
            self.disconnect()  # the next command connects anew
            raise

    return type("Failover" + base.__name__, (base,), {"read_response": read_response})


# What an outage of a Redis spool is: out of reach (refused, reset, timed out,
# LOADING its AOF after a restart: a ConnectionError), or answering but taking
# no writes for a while.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    RedisRefusesWrites,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterDownError,  # and MASTERDOWN: a replica cut off from its master
    redis.exceptions.TryAgainError,
)


class NodeNameBusy(SpoolBusy):
    """Another live process runs under this node name on this spool."""

    def __init__(self, node: str, prefix: str, holder: dict[str, Any], left: float) -> None:
        self.holder = holder
        lapse = (
            f" (if it is gone, its hold lapses within {max(left, 0.0):.0f} s)"
            if not same_pid_space(holder)
            else ""
        )
        SpoolError.__init__(
            self,
            f"node name {node!r} is in use on this spool (prefix {prefix!r}) by"
            f" {describe_holder(holder)} ({holder.get('command') or '?'}){lapse}: two"
            " processes under one name would take each other's in-flight mail back and"
            " send it twice; give each node its own name (node= in the spool URL), or"
            " stop that one first",
        )


# KEYS: the name's key, P:holders. ARGV: our tag, lease_ms, the tag we take it from
# ('' : none), the node name -> 1 held (set, renewed or taken over), else the
# holder's tag. P:holders keeps each node name's last holder past its lease
# (RedisSpool.recover: a dead one on this host is known dead).
_HOLD_NAME = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] or (ARGV[3] ~= '' and cur == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[1])
  return 1
end
return cur
"""
# KEYS: the name's key, P:holders. ARGV: our tag, the node name
_DROP_NAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 0
"""


def _fair_field(tenant: str, spec: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """A campaign's ``P:fair`` field: "priority|weight|tenant" (claim.lua)."""
    priority, weight = rank(spec, options)
    return f"{priority}|{weight}|{tenant}"


@functools.cache
def _script(name: str) -> str:
    """The Lua script ``spool/NAME.lua`` (package data) after ``spool/lib.lua``."""
    here = resources.files("fastsend.spool")
    return here.joinpath("lib.lua").read_text() + here.joinpath(f"{name}.lua").read_text()


def _holder(tag: Any) -> dict[str, Any]:
    try:
        out = orjson.loads(tag)
    except orjson.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


def _s(b: Any) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)


def _same_process(tag: dict[str, Any]) -> bool:
    """``tag`` (holder_tag) names this very process (another spool object of it)."""
    me = holder_tag()
    return all(tag.get(k) == me[k] for k in ("pid", "host", "start", "ns"))


def _untold_note(chunk: Sequence[Result]) -> bytes:
    """``ID[-LAST]/ATTEMPTS,...``: the ids of a chunk of outcomes in runs of
    consecutive ids with one attempt count (deliveries of a batch: a few runs)."""
    pairs = sorted([(r.id, r.attempts) for r in chunk])
    out: list[bytes] = []
    lo, prev, att = pairs[0][0], pairs[0][0], pairs[0][1]
    for i, a in pairs[1:]:
        if i == prev + 1 and a == att:
            prev = i
            continue
        out.append(b"%d/%d" % (lo, att) if lo == prev else b"%d-%d/%d" % (lo, prev, att))
        lo, prev, att = i, i, a
    out.append(b"%d/%d" % (lo, att) if lo == prev else b"%d-%d/%d" % (lo, prev, att))
    return b",".join(out)


def _buckets(ids: Iterable[int]) -> dict[int, list[int]]:
    """Ids grouped by their bucket hash (``P:m:B``), in order."""
    out: dict[int, list[int]] = {}
    for i in ids:
        out.setdefault(i // BUCKET, []).append(i)
    return out


def _state(raw: bytes) -> list[bytes]:
    """The stored ``state|owner|campaign|attempts|next|updated|code|enhanced|text``
    as [state, attempts, next, updated, campaign, owner, code, enhanced, text]."""
    s, o, c, a, n, u, lc, le, lt = raw.split(b"|", 8)
    return [s, a, n, u, c, o, lc, le, lt]


# The files a ``rediss://`` URL may name for redis-py (its query arguments).
_TLS_FILES = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
# TLS failures that are a cut connection (a restart mid-handshake), not a setting.
_TLS_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ssl.SSLWantReadError,
            ssl.SSLWantWriteError)  # fmt: skip


def _tls_setting_fault(redis_url: str, e: BaseException | None) -> str | None:
    """What is wrong in a ``rediss://`` URL's TLS settings, or None when the
    failure may pass: a file it names missing or unreadable, the server's
    certificate refused (another CA, a host name or IP address it does not
    name, expired), or a TLS refusal (the server wants a client certificate,
    no common protocol). Trying again cannot mend these: a command exits 2
    (was 75, as for a Redis down for now, and a job runner retried for ever)."""
    query = redis_url.partition("?")[2]
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k in _TLS_FILES and v and not os.access(v, os.R_OK):
            why = "not found" if not os.path.exists(v) else "not readable"
            return f"{k} {v!r} in the spool URL: {why}"
    while e is not None:
        if isinstance(e, ssl.SSLCertVerificationError):
            return (
                f"the server's TLS certificate is refused ({e.verify_message}): give the"
                " CA that signed it (ssl_ca_certs= in the URL), and a host in the URL that"
                " the certificate names"
            )
        if isinstance(e, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(e.reason or ""):
            return CLIENT_CERT_WANTED
        if isinstance(e, ssl.SSLError) and not isinstance(e, _TLS_CUT):
            return (
                f"TLS with the server fails ({e.reason or e}): check the URL's ssl_ settings"
                " (a client certificate, ssl_certfile/ssl_keyfile, if the server asks for"
                " one) and that the port speaks TLS"
            )
        e = e.__cause__ or e.__context__
    return None


CLIENT_CERT_WANTED = (
    "the server wants a TLS client certificate (tls-auth-clients): give it in the URL"
    " as ssl_certfile= and ssl_keyfile="
)
# How long each probe of :func:`_tls_probe_fault` waits for an answer.
_PROBE_TIMEOUT = 2.0


def _tls_probe_fault(r: Any, redis_url: str) -> str | None:
    """After a ``rediss://`` failure that reads as a cut or a timeout (not a
    setting by itself), what one look at the server shows to be a setting, or
    None. A port that speaks plain RESP (``redis://``'s port) never answers a
    ClientHello (a 5 s timeout, 75) but answers a plain ``PING`` (asked first:
    answered at once, and a TLS port closes on it). A TLS 1.3 server wanting a
    client certificate the URL does not give completes the handshake and closes
    at the first command (an EOF, read as a restart: 75, and a job runner
    retried for ever); its alert ``certificate required`` comes only to a
    client that reads first. Each probe is bounded by ``_PROBE_TIMEOUT``; a
    Redis that is down refuses them at once (75 as before)."""
    query = dict(parse_qsl(redis_url.partition("?")[2], keep_blank_values=True))
    try:
        conn = r.connection_pool.make_connection()
        host, port = conn.host, int(conn.port)
    except Exception:  # a probe only: the first error stands
        return None
    try:
        plain = socket.create_connection((host, port), _PROBE_TIMEOUT)
    except OSError:
        return None  # down
    try:
        plain.settimeout(_PROBE_TIMEOUT)
        plain.sendall(b"PING\r\n")
        got = plain.recv(64)
    except OSError:
        got = b""  # a TLS port resetting on a plain PING
    finally:
        plain.close()
    if got[:1] in (b"+", b"-"):  # a RESP answer (+PONG, -NOAUTH ...): no TLS on this port
        return (
            f"port {port} answers in plain text, not TLS: use redis:// for it, or the"
            " port the server serves TLS on (tls-port)"
        )
    if query.get("ssl_certfile"):
        return None
    try:
        sock = conn._connect()  # redis-py's own TLS settings: TCP + handshake
        try:
            sock.settimeout(_PROBE_TIMEOUT)
            sock.recv(1)
        finally:
            sock.close()
    except ssl.SSLError as e:
        if "CERTIFICATE_REQUIRED" in str(e.reason or ""):
            return CLIENT_CERT_WANTED
    except Exception:  # down, reset, timed out: not a setting
        pass
    return None


CLUSTER_REFUSED = (
    "a Redis Cluster node: the spool runs on one primary, not a cluster (its keys"
    " would be answered MOVED whenever their slot is on, or moves to, another node);"
    " give it a standalone primary (with replicas; for failover, an address that"
    " follows the primary: a virtual IP Sentinel or keepalived moves, HAProxy"
    " checking role:master)"
)


def _cluster_node(r: Any) -> bool:
    """The server runs in cluster mode (INFO cluster; an ACL user without INFO:
    the spool's first key then answers MOVED, refused as such)."""
    try:
        return str(r.info("cluster").get("cluster_enabled", 0)) == "1"
    except redis.exceptions.ResponseError:
        return False


def _server_version(r: Any) -> tuple[int, ...]:
    """The server's ``redis_version`` (Valkey and KeyDB report the Redis version
    they match), () when INFO is refused (an ACL user without it) or unclear."""
    try:
        raw = r.info("server").get("redis_version", "")
    except redis.exceptions.ResponseError:
        return ()
    try:
        return tuple(int(x) for x in str(raw).split(".")[:3])
    except ValueError:
        return ()


class RedisSpool(Spool):
    def __init__(self, url: str, *, must_exist: bool = False, readonly: bool = False) -> None:
        redis_url, p = parse_redis_url(url)
        self.url = url
        self.prefix = p.get("prefix") or "fastsend"
        self.local_dir = p.get("dir") or "./spool"
        self.node = p.get("node") or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        if "|" in self.node or not self.node.isprintable():
            raise RedisSpoolError(f"bad node name {self.node!r} (printable, no '|')")
        try:
            self.lease = float(p.get("lease") or 30.0)
            self.replicas = int(p.get("replicas") or 0)
        except ValueError:
            raise RedisSpoolError(f"bad lease or replicas in spool URL {redact_url(url)!r}") from None
        if self.lease <= 0 or self.replicas < 0:
            raise RedisSpoolError(f"bad lease or replicas in spool URL {redact_url(url)!r}")
        self.k = "{" + self.prefix + "}"
        # Any: redis-py's annotations are unions of sync/async and bytes/str replies.
        scheme = redis_url.partition(":")[0].lower()
        self.r: Any = redis.Redis.from_url(
            redis_url, decode_responses=False, **_client_options(scheme),
            **(SOCKET_OPTIONS if scheme != "unix" else {"socket_timeout": SOCKET_OPTIONS["socket_timeout"]}),
        )  # fmt: skip
        safe = redact_url(redis_url)
        try:
            self.r.ping()
            version = _server_version(self.r)
        except redis.RedisError as e:
            fault = None
            if scheme == "rediss":
                fault = _tls_setting_fault(redis_url, e) or _tls_probe_fault(self.r, redis_url)
            if fault is not None:
                raise RedisSpoolError(f"cannot use Redis at {safe!r}: {fault}") from None
            raise RedisUnreachable(f"cannot reach Redis at {safe!r}: {e}") from None
        if _cluster_node(self.r):
            raise RedisSpoolError(f"Redis at {safe!r}: {CLUSTER_REFUSED}")
        if version and version < MIN_VERSION:
            raise RedisSpoolError(
                f"Redis at {safe!r} is version {'.'.join(map(str, version))}: the spool"
                f" needs Redis >= {'.'.join(map(str, MIN_VERSION))} (SMISMEMBER, for a"
                " campaign's duplicate addresses); upgrade Redis (or Valkey)"
            )
        self._readonly = readonly  # a view: writes nothing (works against a replica)
        lay = f"{self.k}:layout"
        try:
            if must_exist and self.r.get(lay) is None:
                raise RedisSpoolError(
                    f"no spool under prefix {self.prefix!r} at {safe!r} (a mistyped prefix"
                    " or database, or a Redis that came back without its data)"
                )
            # (a view, readonly, writes nothing here: `queue`, `campaign list` and
            # `top` work against a replica)
            if (readonly or not self.r.set(lay, LAYOUT, nx=True)) and self.r.get(lay) != LAYOUT:
                raise RedisSpoolError(
                    f"the spool under prefix {self.prefix!r} has message layout"
                    f" {_s(self.r.get(lay))}, this fastsend writes {_s(LAYOUT)}: drain it"
                    " with the fastsend that wrote it, or use another prefix"
                )
            # P:epoch: a token made by the first process to open the spool; a spool
            # that lost its data (Redis back without it) has none, or another's.
            if not readonly and self.r.set(f"{self.k}:epoch", secrets.token_hex(8), nx=True):
                # a new spool: its index of campaigns with mail due (lib.lua) is
                # whole from the start, swept first in SWEEP_MS like any other
                self.r.set(f"{self.k}:dueidx:swept", b"1", px=SWEEP_MS)
            self._epoch = self.r.get(f"{self.k}:epoch")
        except (redis.exceptions.MovedError, redis.exceptions.AskError):
            raise RedisSpoolError(f"Redis at {safe!r}: {CLUSTER_REFUSED}") from None
        except OUTAGE_ERRORS as e:  # a replica (READONLY), its disk full (MISCONF), ...
            raise RedisTakesNoWrites(
                f"Redis at {safe!r} takes no writes now ({e.__class__.__name__}: {e});"
                " point the spool URL at the primary, or try again once it takes writes"
            ) from None
        reg = self.r.register_script
        self._claim = reg(_script("claim"))
        self._record = reg(_script("record"))
        self._release = reg(_script("release"))
        self._requeue = reg(_script("requeue"))
        self._recover = reg(_script("recover"))
        self._renew = reg(_script("renew"))
        self._leave = reg(_script("leave"))
        self._status = reg(_script("status"))
        self._cancel = reg(_script("cancel"))
        self._next_due = reg(_script("next_due"))
        self._ingest_lease = reg(_script("ingest_lease"))
        self._idem = reg(_script("idem"))
        self._prune = reg(_script("prune"))
        self._untold_script = reg(_script("untold"))
        self._sweep = reg(_script("sweep"))
        self._settle = reg(_script("settle"))
        self._bring = reg(_script("bring"))
        self._swept = time.monotonic()
        self._sweeping = False  # a sweep of the index under way (renew() steps on)
        self._due_gen = 0  # changes here that may make mail due (_is_quiet)
        if not readonly:  # a spool made before the index: made whole now (lib.lua)
            try:
                while self._sweep_step():
                    pass
            except OUTAGE_ERRORS as e:
                raise RedisTakesNoWrites(f"Redis at {safe!r} takes no writes now: {e}") from None
        # Redis's clock less this host's, added to every due time this node writes
        # or claims by (and taken from next_due): the due axis is one clock for every
        # node. 0 unless the gap is SKEW_APPLY s or more; read again every SKEW_EVERY s.
        self.skew = 0.0
        self._skew_read = time.monotonic()
        if not readonly:
            self._read_skew()
        self._untold_held = False  # P:untold:NODE may hold entries (told() drops them)
        self._untold_read: list[bytes] = []  # the entries untold() handed out
        self._keep_from: int | None = -1  # prune_final: the kept buckets first
        self._tag = orjson.dumps(holder_tag())  # this process, as an ingest job's reader
        self._hold_name = reg(_HOLD_NAME)
        self._drop_name = reg(_DROP_NAME)
        self._name_tag: bytes | None = None  # hold_supervisor: this node name is ours
        self._name_renewed = 0.0
        self._logs_swept = 0.0  # (renew: _sweep_dead_logs, at its first call and each LOGS_SWEEP_S)
        self._name_lost = False
        self._dir_lock = ""  # hold_local_dir: the lock file this object holds
        self._ingests: set[int] = set()  # ingest jobs this object holds
        self._ingests_renewed = 0.0
        self._lease_ms = int(self.lease * 1000)
        self._renewed = 0.0
        self._tw_args: list[str | int] = []  # claim.lua's tenant weights (set_tenant_weights)
        self._holding = False  # claimed anything: this node keeps a lease
        self._waitaof: bool | None = None  # decided at the first add_messages
        self.durability = "unknown"
        self._limits: Any = None
        # claim_next: claims sent ahead on self._aconn, (key, sent) oldest first,
        # and per key what they claimed that is not handed out yet
        self._aconn: Any = None
        # key, sent (monotonic), want, self._due_gen when sent
        self._ahead: collections.deque[tuple[int, float, int, int]] = collections.deque()
        # (change count, now, monotonic time) of a claim that found nothing due
        self._quiet: tuple[int, float, float] | None = None
        self._stock: dict[int, list[Claimed]] = {}
        self._tenants_indexed = False
        self._fair_indexed = False  # P:fair covers every campaign (_index_fair)

    # -- campaigns -----------------------------------------------------------

    def create_campaign(
        self,
        spec: dict[str, Any],
        *,
        name: str = "",
        tenant: str = "default",
        options: dict[str, Any] | None = None,
        status: str = "active",
    ) -> int:
        if status not in ("active", "paused", STAGING):
            raise ValueError(f"bad status {status!r} for a new campaign")
        k = self.k
        cid = int(self.r.incr(f"{k}:seq:c"))
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            f"{k}:c:{cid}",
            mapping={
                "name": name,
                "tenant": tenant,
                "created": repr(time.time()),
                "status": status,
                "spec": orjson.dumps(spec),
                "options": orjson.dumps(options or {}),
            },
        )
        pipe.zadd(f"{k}:camps", {cid: cid})
        pipe.zadd(self._tenant_key(tenant), {cid: cid})
        pipe.hset(f"{k}:fair", str(cid), _fair_field(tenant, spec, options or {}))
        if status == "active":
            pipe.sadd(f"{k}:active", cid)
        if RUN_OPTION in (options or {}):  # a `send`'s: this process's alone (claim.lua)
            pipe.hset(f"{k}:own", str(cid), self.node)
        pipe.execute()
        self._wait_durable()
        return cid

    # A `fastsend send`'s campaign belongs to the process running it (P:own,
    # campaign -> its node name, written with the campaign): claim.lua gives its
    # mail to no other node (before, every serve node claimed a live send's mail
    # and delivered it by its own routes, IPs and HELO); serve sets aside one
    # whose process is dead (sendruns.set_aside_sends), `resume` adopts it.

    def send_owners(self) -> dict[int, tuple[str, bool]]:
        """The `send` campaigns with an owner: campaign -> (its node name,
        whether a live process holds that name: ``P:name:NODE`` held, by a
        process not known dead here)."""
        own = {int(c): _s(n) for c, n in self.r.hgetall(f"{self.k}:own").items()}
        names = sorted(set(own.values()))
        tags = dict(zip(names, self.r.mget([f"{self.k}:name:{n}" for n in names]) if names else [],
                        strict=True))  # fmt: skip
        live = {n: t is not None and not holder_gone(_holder(t)) for n, t in tags.items()}
        return {c: (n, live[n]) for c, n in own.items()}

    def adopt_sends(self) -> list[int]:
        """`resume`: the `send` campaigns whose process is dead are this node's
        now (its claims take them); returns their ids."""
        dead = [c for c, (n, live) in self.send_owners().items() if not live and n != self.node]
        if dead:
            self.r.hset(f"{self.k}:own", mapping=dict.fromkeys(map(str, dead), self.node))
            self._due_gen += 1
        return dead

    def disown(self, campaign_id: int) -> None:
        """A campaign any node may claim again (serve's own run, its send dead)."""
        self.r.hdel(f"{self.k}:own", str(int(campaign_id)))
        self._due_gen += 1

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
            reason=_s(h.get(b"reason", b"")),
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

    def _backfill(
        self, done: str, fields: tuple[str, ...], add: Callable[[Any, int, list[Any]], None]
    ) -> None:
        """Once per spool: an index over every campaign of a spool made before
        it. ``add(pipe, cid, values)`` queues the writes for one campaign from
        its hash's ``fields``; ``P:done`` marks the index complete."""
        k, r = self.k, self.r
        if r.exists(f"{k}:{done}"):
            return
        ids = [int(x) for x in r.zrange(f"{k}:camps", 0, -1)]
        for j in range(0, len(ids), CHUNK):
            part = ids[j : j + CHUNK]
            pipe = r.pipeline(transaction=False)
            for cid in part:
                pipe.hmget(f"{k}:c:{cid}", *fields)
            got = pipe.execute()
            pipe = r.pipeline(transaction=False)
            for cid, values in zip(part, got, strict=True):
                if values[0] is not None:  # the first field: the tenant, always set
                    add(pipe, cid, values)
            pipe.execute()
        r.set(f"{k}:{done}", 1)

    def _index_fair(self) -> None:
        """Each campaign's tenant, priority and weight for the claim (``P:fair``,
        claim.lua) of a spool made before them."""

        def add(pipe: Any, cid: int, values: list[Any]) -> None:
            tenant, spec, options = values
            field = _fair_field(_s(tenant), orjson.loads(spec or b"{}"), orjson.loads(options or b"{}"))
            pipe.hsetnx(f"{self.k}:fair", str(cid), field)

        self._backfill("fair-ok", ("tenant", "spec", "options"), add)

    def _tenant_key(self, tenant: str) -> str:
        """The sorted set of a tenant's campaign ids (scored by id)."""
        return f"{self.k}:tc:{tenant}"

    def _index_tenants(self) -> None:
        """The per-tenant sets of a spool made before them."""
        self._backfill(
            "tc-ok",
            ("tenant",),
            lambda pipe, cid, values: pipe.zadd(self._tenant_key(_s(values[0])), {cid: cid}),
        )

    def campaigns(
        self, tenant: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[CampaignInfo]:
        if not self._tenants_indexed:
            self._index_tenants()
            self._tenants_indexed = True
        key = f"{self.k}:camps" if tenant is None else self._tenant_key(tenant)
        page = (0, int(limit)) if limit is not None else (None, None)
        if limit is not None and limit <= 0:
            return []
        ids = [int(x) for x in self.r.zrangebyscore(key, f"({int(after)}", "+inf", *page)]
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            pipe.hgetall(f"{self.k}:c:{cid}")
        out = [self._campaign(cid, h) for cid, h in zip(ids, pipe.execute(), strict=True)]
        return [c for c in out if c is not None and (tenant is None or c.tenant == tenant)]

    def set_campaign_status(self, campaign_id: int, status: str, reason: str = "") -> None:
        if status not in CAMPAIGN_STATUSES:
            raise ValueError(f"bad campaign status {status!r}")
        cid = str(int(campaign_id))
        self._due_gen += 1  # (a campaign resumed: its mail is due)
        if not self._status(args=[self.k, cid, status, str(reason)]):
            return
        if status in ENDED:
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
        suppressed: Collection[int] = (),
        ingest: IngestMark | None = None,
        idem: IdemMark | None = None,
        fps: Sequence[int] | None = None,
    ) -> list[int]:
        rows = list(rows)
        self._due_gen += 1  # (mail due: a claim that found none is stale)
        if not rows and ingest is None:
            return []
        k = self.k
        cid = int(campaign_id)
        fkey = f"{k}:fp:{cid}"
        members = [f.to_bytes(8, "big") for f in fps] if fps else []
        ids: list[int] = []
        if rows:
            last = int(self.r.incrby(f"{k}:seq:m", len(rows)))
            ids = list(range(last - len(rows) + 1, last + 1))
        sup = frozenset(suppressed)
        due_at = float(now) + self.skew  # (on Redis's clock: _read_skew)
        nowr = repr(due_at).encode()  # created: on Redis's clock too (expiry, ages)
        st = str(int(state)).encode()
        due_r = repr(due_at).encode()
        tail = b"||%d|0|%s|%s|0||" % (cid, due_r, due_r)
        pending = state in PENDING_STATES
        pipe = self.r.pipeline(transaction=True)  # MULTI/EXEC: all of it or nothing
        lease = f"{k}:ing:{int(ingest.job)}:lease" if ingest is not None else ""
        ikey = f"{k}:idem:{self._idem_key(idem.scope, idem.key)}" if idem is not None else ""
        if lease or ikey or members:
            # A list's rows only while this process holds the job: the lease is
            # WATCHed, so a takeover or expiry before EXEC aborts the transaction.
            # Rows under an Idempotency-Key only while the caller holds the key:
            # its record is WATCHed (a takeover rewrites its holder). Rows whose
            # addresses' fingerprints go into the campaign's set only while no
            # other node adds to it: two nodes spooling one address at once.
            pipe.watch(*[x for x in (lease, ikey, fkey if members else "") if x])
            if lease and pipe.get(lease) != self._tag:
                pipe.reset()
                raise self._ingest_lost(int(ingest.job))  # type: ignore[union-attr]
            if idem is not None and not self._idem_ours(pipe, ikey, idem):
                pipe.reset()
                raise IdemLost(idem.scope, idem.key)
            if members and any(pipe.smismember(fkey, members)):
                pipe.reset()
                raise FpsChanged(f"campaign {cid}: an address was spooled meanwhile")
            pipe.multi()
        due: list[int] = []
        n_sup = 0
        fields: dict[int, dict[bytes, bytes]] = {}
        sup_s = str(SUPPRESSED).encode()
        for j, (i, (rcpt, domain, vars_)) in enumerate(zip(ids, rows, strict=True)):
            if "\0" in rcpt or "\0" in domain:
                pipe.reset()
                raise SpoolError(f"NUL in recipient {rcpt!r}")
            gone = j in sup
            n_sup += gone
            if not gone and pending:
                due.append(i)
            f = fields.get(i // BUCKET)
            if f is None:
                f = fields[i // BUCKET] = {}
            f[b"%d" % i] = b"%s\0%s\0%s\0%s" % (rcpt.encode(), domain.encode(), nowr, vars_)
            f[b"%ds" % i] = (sup_s if gone else st) + tail
        for bkt, f in fields.items():
            pipe.hset(f"{k}:m:{bkt}", mapping=f)  # type: ignore[arg-type]
        for j in range(0, len(due), CHUNK):
            part = due[j : j + CHUNK]  # (ascending)
            lo, hi = len(str(part[0])), len(str(part[-1]))
            if lo == hi:  # (nearly always: one score for the part)
                pipe.zadd(f"{k}:due:{cid}", dict.fromkeys(part, due_score(due_at, lo)))
            else:
                pipe.zadd(f"{k}:due:{cid}", {i: due_score(due_at, len(str(i))) for i in part})
        if due:  # the index of campaigns with mail due (lib.lua): at most its head
            pipe.zadd(f"{k}:dueidx", {cid: due_score(due_at, len(str(due[0])))}, lt=True)
        for state_s, n in ((st, len(ids) - n_sup), (str(SUPPRESSED), n_sup)):
            if n:
                pipe.hincrby(f"{k}:n:{cid}", state_s, n)
                pipe.hincrby(f"{k}:n", state_s, n)
        for j in range(0, len(members), CHUNK):
            pipe.sadd(fkey, *members[j : j + CHUNK])
        if members:  # (kept while the campaign has rows: prune.lua deletes it with the last)
            pipe.persist(fkey)
            pipe.zadd(f"{k}:fplast", {str(cid): ids[-1] if ids else 0}, gt=True)
        if idem is not None:
            pipe.hset(ikey, f"p{idem.part}", orjson.dumps(idem_part(cid, ids)))
        if ingest is not None:
            pipe.hset(
                f"{k}:ing:{int(ingest.job)}",
                mapping={
                    "line": ingest.line,
                    "accepted": ingest.accepted,
                    "rejected": ingest.rejected,
                    "duplicates": ingest.duplicates,
                    # its rows' events are untold until told_ingest
                    "untold": b"%d %d" % ((ids[0], ids[-1]) if ids else (0, 0)),
                },
            )
        try:
            pipe.execute()
        except redis.WatchError:
            if idem is not None and not self._idem_ours(self.r, ikey, idem):
                raise IdemLost(idem.scope, idem.key) from None
            if ingest is not None and self.r.get(lease) != self._tag:
                raise self._ingest_lost(int(ingest.job)) from None
            if members:  # (the set changed: another node spooled to the campaign)
                raise FpsChanged(f"campaign {cid}: an address was spooled meanwhile") from None
            raise self._ingest_lost(int(ingest.job)) from None  # type: ignore[union-attr]
        finally:
            pipe.reset()
        # (again once written: serve spools in a thread, so a claim may have run
        # since the first and found none of these rows: stale too)
        self._due_gen += 1
        self._wait_durable()
        return ids

    def recorded_fps(self, campaign_id: int, fps: Sequence[int]) -> list[bool] | None:
        # The campaign's set P:fp:CID (8-byte members), written with its rows.
        if not fps:
            return []
        members = [f.to_bytes(8, "big") for f in fps]
        key = f"{self.k}:fp:{int(campaign_id)}"
        out: list[bool] = []
        for j in range(0, len(members), CHUNK):
            out += map(bool, self.r.smismember(key, members[j : j + CHUNK]))
        return out

    @staticmethod
    def _idem_ours(r: Any, ikey: str, idem: IdemMark) -> bool:
        """The caller holds the running record and it has exactly ``idem.part`` parts."""
        holder, status, last, nxt = r.hmget(
            ikey, "holder", "status", f"p{idem.part - 1}", f"p{idem.part}"
        )
        return (
            holder == idem.holder and status == b"0" and nxt is None
            and (idem.part == 0 or last is not None)
        )  # fmt: skip

    def _ingest_lost(self, jid: int) -> IngestLost:
        self._ingests.discard(jid)
        cur = self.r.get(f"{self.k}:ing:{jid}:lease")
        return IngestLost(jid, _holder(cur) if cur else None)

    def _wait_durable(self) -> None:
        """Block until the last writes are as durable as Redis is configured to make them."""
        wait_ms = self._wait_ms()
        if self._waitaof is None:
            try:
                info = self.r.info("persistence")
            except redis.exceptions.NoPermissionError:
                # an ACL user without INFO (-@dangerous): WAITAOF says (before, every
                # write of such a user failed after it was made: nothing accepted)
                self._waitaof = True
                self.durability = "unknown (INFO refused to this user)"
            else:
                aof = bool(int(info.get("aof_enabled", 0)))
                self._waitaof = aof
                self.durability = "aof" if aof else "memory (no AOF)"
        if self._waitaof:
            try:
                local, reps = self._wait_after_mark("WAITAOF", 1, self.replicas, wait_ms)
            except redis.ResponseError as e:
                text = str(e).lower()
                if not (isinstance(e, redis.exceptions.NoPermissionError)
                        or "unknown command" in text or "appendonly is disabled" in text):  # fmt: skip
                    raise
                # Redis < 7.2: with appendfsync always the reply already meant fsynced.
                self._waitaof = False
                if "appendonly is disabled" in text:
                    self.durability = "memory (no AOF)"
                elif not self.durability.startswith("unknown"):
                    self.durability = "aof (fsync per appendfsync; no WAITAOF before Redis 7.2)"
            else:
                if int(local) < 1 or int(reps) < self.replicas:
                    raise RedisSpoolError(
                        f"the write was not fsynced within {wait_ms / 1000:g} s (WAITAOF)"
                    )
                return
        if self.replicas:
            got = int(self._wait_after_mark("WAIT", self.replicas, wait_ms))
            if got < self.replicas:
                raise RedisSpoolError(f"only {got} of {self.replicas} replicas acknowledged")

    def _wait_after_mark(self, *wait: Any) -> Any:
        """``WAIT``/``WAITAOF`` covers the writes of the connection it is sent on
        (up to its last command; on Redis >= 7.2 its last write), and the pool
        hands a thread any idle connection: one that last wrote before this
        thread's rows answered at once, covering none of them (a node's threads
        spool, stow and claim at once). So it goes in one pipeline on one
        connection after a write of its own (``P:durable``), whose offset is past
        every write this thread made."""
        pipe = self.r.pipeline(transaction=False)
        pipe.set(f"{self.k}:durable", b"1")
        pipe.execute_command(*wait)
        return pipe.execute()[1]

    def _wait_ms(self) -> int:
        """How long WAITAOF / WAIT may wait: 10 s, and 1 s less than the client's
        socket timeout (a wait longer than it ended as a timeout of the
        connection, an outage, after Redis had the write)."""
        t = self.r.connection_pool.connection_kwargs.get("socket_timeout")
        return int(max(0.5, min(10.0, float(t) - 1.0 if t else 10.0)) * 1000)

    def claim_due(self, now: float, limit: int) -> list[Claimed]:
        if limit <= 0 or self._is_quiet(now):
            return []
        if not self._fair_indexed:
            self._index_fair()
            self._fair_indexed = True
        gen, mono = self._due_gen, time.monotonic()
        flat = self._claim(
            args=[self.k, repr(float(now) + self.skew), int(limit), self.node, self._lease_ms,
                  *self._tw_args]
        )
        self._holding = True
        self._renewed = time.monotonic()
        self._quiet = None if flat else (gen, now, mono)
        return self._claimed(flat)

    def _is_quiet(self, now: float) -> bool:
        """A claim found nothing due less than QUIET_REUSE s ago (by the claims'
        clock and by this process's) and nothing here made mail due since."""
        q = self._quiet
        return (
            q is not None
            and q[0] == self._due_gen
            and 0 <= now - q[1] < QUIET_REUSE
            and time.monotonic() - q[2] < QUIET_REUSE
        )

    def claim_next(self, now: float, limit: int, key: int = 0) -> list[Claimed]:
        """Claim-ahead (see :meth:`Spool.claim_next`): hand out what the claim sent
        at ``key``'s previous call got, and send a claim for the rest of
        ``limit`` (if half of it or more) on a connection of its own without reading its reply, so the
        supervisor's loop does not wait for the round trip (Redis runs the
        script while the loop applies outcomes). A key's window in flight, its
        answered claims and its claim on the way together stay within
        ``limit``. A claim answered more than :data:`AHEAD_TTL` s after it was
        sent is put back (a campaign paused meanwhile stops within that)."""
        if not self._fair_indexed:
            self._index_fair()
            self._fair_indexed = True
        got = self._collect(key)
        out = self._stock.pop(key, [])
        if len(out) > limit:
            self._stock[key], out = out[limit:], out[:limit]
        want = limit - len(out)
        # got False: nothing was due just now. A rest under half the limit waits
        # for the next call: claims stay as large as the caller asks for.
        if (
            want > 0
            and got is not False
            and (not out or 2 * want >= limit)
            and not self._is_quiet(now)
        ):
            conn = self._ahead_conn()
            conn.send_command(
                "EVALSHA", self._claim.sha, 0,
                self.k, repr(float(now) + self.skew), want, self.node, self._lease_ms,
                *self._tw_args,
            )  # fmt: skip
            self._ahead.append((key, time.monotonic(), want, self._due_gen))
            self._holding = True
            self._renewed = time.monotonic()
        return out

    def set_tenant_weights(self, weights: Mapping[str, int]) -> None:
        super().set_tenant_weights(weights)
        # claim.lua's ARGV after the first five: tenant, weight, ...
        self._tw_args = [x for t, w in sorted(self.tenant_weights.items()) for x in (t, w)]

    def held(self, key: int = 0) -> int:
        return len(self._stock.get(key, ())) + sum(a[2] for a in self._ahead if a[0] == key)

    def _ahead_conn(self) -> Any:
        if self._aconn is None:
            self._aconn = self.r.connection_pool.get_connection()
            self.r.script_load(self._claim.script)
        return self._aconn

    def _collect(self, key: int | None) -> bool | None:
        """Read the answers of the claims on the way, in the order they were sent,
        up to the last one of ``key`` (None: all) into each key's stock. Returns
        whether ``key``'s last answer claimed anything (None: none was on the way)."""
        last: bool | None = None
        if key is not None and all(a[0] != key for a in self._ahead):
            return None
        while self._ahead:
            k, sent, _want, gen = self._ahead.popleft()
            try:
                flat = self._aconn.read_response()
            except redis.exceptions.NoScriptError:  # Redis lost its scripts: claimed nothing
                self.r.script_load(self._claim.script)
                flat = []
            except BaseException:
                # Unread answers would be taken for later ones: start afresh. What
                # those claims took is held by this node until it exits (or its
                # lease lapses), then recovered, as for a failed claim_due.
                self._ahead.clear()
                conn, self._aconn = self._aconn, None
                conn.disconnect()
                self.r.connection_pool.release(conn)
                raise
            got = self._claimed(flat)
            if got and time.monotonic() - sent > AHEAD_TTL:
                self.release([c.id for c in got])
                got = []
            if got:
                self._stock.setdefault(k, []).extend(got)
            if k == key:
                last = bool(flat)
                if not flat:  # (its now: about when it was sent)
                    self._quiet = (gen, time.time() - (time.monotonic() - sent), sent)
                if not any(a[0] == key for a in self._ahead):
                    break
        return last

    def _claimed(self, flat: list[bytes]) -> list[Claimed]:
        out: list[Claimed] = []
        add = out.append
        for j in range(0, len(flat), 3):  # id, state (1|node|campaign|attempts|...), data
            _s1, _o, cid, att, _rest = flat[j + 1].split(b"|", 4)
            rcpt, domain, created, vars_ = flat[j + 2].split(b"\0", 3)
            add(Claimed(int(flat[j]), int(cid), rcpt.decode(), domain.decode(), vars_,
                        int(att), self._local(created)))  # fmt: skip
        return out

    def record_results(self, results: Iterable[Result], now: float) -> None:
        self._due_gen += 1  # (deferrals: due again)
        self._record_chunks(list(results), now, (), False, ())

    def record_outcomes(
        self, results: Iterable[Result], now: float, events: Sequence[bytes] = (),
        event_ids: Sequence[int] = (),
    ) -> int | None:  # fmt: skip
        """The events go with the first chunk of outcomes: a crash between two
        chunks can leave an event whose outcome is not recorded yet (its message
        is sent again: a duplicate, as for any in-flight message), never an
        outcome without its event. Each chunk's ids are noted untold
        (``P:untold:NODE``) in its own script call, until :meth:`told`: a node
        killed before its event log has their events leaves them to its next
        start, or to the node that takes its window back."""
        self._due_gen += 1  # (deferrals: due again)
        return self._record_chunks(list(results), now, events, True, event_ids)

    def _record_chunks(
        self, batch: list[Result], now: float, events: Sequence[bytes], untold: bool,
        event_ids: Sequence[int],
    ) -> int | None:  # fmt: skip
        skew = self.skew  # (due times on Redis's clock: _read_skew)
        head: list[Any] = [self.k, repr(float(now) + skew), self.node if self._holding else "",
                           self._lease_ms]  # fmt: skip
        # One JSON argument per chunk (cjson in the script), every value a string:
        # packing 7 arguments per message cost more than the script itself.
        dumps = orjson.dumps
        first: int | None = None
        mids = b""
        if untold and events:  # the message id of each event, in outbox order
            mids = b",".join([b"%d" % i for i in event_ids])
        for j in range(0, max(len(batch), 1), CHUNK):
            chunk = batch[j : j + CHUNK]
            blob = dumps(
                [
                    (str(r.id), str(r.state), str(r.attempts),
                     repr(float(r.next_at) + skew if r.next_at > 0 else float(r.next_at)),
                     str(r.code), r.enhanced.replace("|", " "), r.text)
                    for r in chunk
                ]
            )  # fmt: skip
            note = b""
            if untold and chunk:
                note = _untold_note(chunk) + b"|" + (mids if j == 0 else b"")
                self._untold_held = True
            got = self._record(args=[*head, blob, self.node if note else "", note,
                                     *(events if j == 0 else ())])  # fmt: skip
            if j == 0 and events:
                first = int(got)
        return first

    def told(self, ids: Collection[int] | None = None) -> None:
        """Forget what :meth:`record_outcomes` noted untold (its events are in the
        event log now); with ``ids`` (after :meth:`untold` / :meth:`untold_of_dead`:
        their events written), the entries those handed out."""
        key = f"{self.k}:untold:{self.node}"
        if ids is not None:
            read, self._untold_read = self._untold_read, []
            if read:
                pipe = self.r.pipeline(transaction=True)
                for entry in read:
                    pipe.lrem(key, 1, entry)
                pipe.execute()
            return
        if self._untold_held:
            self.r.delete(key)
            self._untold_held = False

    def untold(self) -> list[Untold]:
        """At start: the outcomes the last process under this node name recorded
        and died before writing their events (its ``P:untold:NODE``), as their
        rows hold them now. Holds the node name first (another live process's
        are not ours to tell)."""
        self.hold_supervisor("fastsend")
        return self._untold_rows(self._untold_script(args=[self.k, self.node, "0"]))

    def untold_of_dead(self) -> list[Untold]:
        """What nodes whose window was taken back (dead: their lease lapsed, or
        their process gone on this host) had recorded without telling: moved to
        this node's own list first, so this node's death while telling them
        leaves them to the next taker. One round trip when there is none."""
        return self._untold_rows(self._untold_script(args=[self.k, self.node, "1"]))

    def _untold_rows(self, entries: list[bytes]) -> list[Untold]:
        """The rows of untold entries (``IDS|MSGIDS|FIRST``) whose attempt is still
        the one recorded (a later attempt told its own outcome), each with the
        outbox id of its event when the webhooks took one (so they do not
        append it again)."""
        if not entries:
            return []
        self._untold_read += entries
        self._untold_held = True
        want: dict[int, int] = {}
        eids: dict[int, int] = {}
        for entry in entries:
            spans, mids, first = _s(entry).split("|")
            for part in filter(None, spans.split(",")):
                run, _, att = part.partition("/")
                lo, _, hi = run.partition("-")
                for i in range(int(lo), int(hi or lo) + 1):
                    want[i] = int(att)
            for k, mid in enumerate(filter(None, mids.split(","))):
                if int(first) and int(mid) not in eids:
                    eids[int(mid)] = int(first) + k
        out: list[Untold] = []
        for i, data, st in self._rows(sorted(want)):
            # st: [state, attempts, next, updated, campaign, owner, code, enhanced, text]
            if int(st[1] or 0) != want[i]:
                continue
            out.append(Untold(
                i, int(st[4]), data.split(b"\0", 1)[0].decode(), int(st[0]), want[i],
                self._local(st[2]), int(st[6] or 0), _s(st[7]), _s(st[8]), self._local(st[3]),
                eids.get(i, 0),
            ))  # fmt: skip
        return out

    def outage_errors(self) -> tuple[type[BaseException], ...]:
        return OUTAGE_ERRORS

    def probe(self) -> None:
        """A small write: an outage where Redis answers but refuses writes
        (READONLY, MISCONF, NOREPLICAS, OOM) ends when writes are taken again."""
        self.r.set(f"{self.k}:probe", b"1", px=60_000)

    def intact(self) -> bool:
        epoch = f"{self.k}:epoch"
        now = self.r.get(epoch)
        if now == self._epoch:
            return True
        # Gone (or made anew by another process that opened the empty spool):
        # the spool as it is now is the one expected from here on.
        self.r.set(f"{self.k}:layout", LAYOUT, nx=True)
        self.r.set(epoch, secrets.token_hex(8), nx=True)
        self._epoch = self.r.get(epoch)
        return False

    def bring_forward(
        self, domain: str, now: float, step: float, limit: int, deferred_before: float
    ) -> int:
        """Spool.bring_forward from the domain's index of the site's deferrals
        (``P:dfr:DOMAIN``, record.lua; soonest due first), each checked against
        its state (still deferred, unclaimed, last updated by the site's
        deferral and past any wait its reply named) and re-scored only if no
        outcome was recorded since (bring.lua). Before: 0 (each waited its own
        backoff, up to ``max_backoff``, after a site's short outage)."""
        key = f"{self.k}:dfr:{domain}"
        now_r, before_r = float(now) + self.skew, float(deferred_before) + self.skew
        picked: list[tuple[bytes, bytes]] = []  # (id, updated)
        stale: list[bytes] = []
        start, page = 0, 500
        while len(picked) < limit:
            ids = self.r.zrangebyscore(key, f"({now_r!r}", "+inf", start=start, num=page)
            if not ids:
                break
            start += len(ids)
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hget(f"{self.k}:m:{int(i) // BUCKET}", i + b"s")
            for i, st in zip(ids, pipe.execute(), strict=True):
                f = st.split(b"|", 8) if st else []
                if len(f) < 9 or f[0] != b"2":
                    stale.append(i)  # (claimed, final or gone since)
                    continue
                code, enhanced, text = f[6], f[7].decode(), f[8].decode(errors="replace")
                upd = float(f[5])
                if (f[1] or float(f[4]) <= now_r or upd > before_r
                        or not (code == b"421" or enhanced[:4] in SITE_STATUSES)
                        or upd + retry_hint(text) > now_r):  # fmt: skip
                    continue
                picked.append((i, f[5]))
                if len(picked) >= limit:
                    break
            if len(ids) < page:
                break
        if stale:
            self.r.zrem(key, *stale)
        n = 0
        for j in range(0, len(picked), CHUNK):
            args: list[Any] = [self.k, domain]
            for k, (i, at) in enumerate(picked[j : j + CHUNK], start=j):
                args += [i, at, repr(now_r + k * step)]
            n += int(self._bring(args=args))
        if n:
            self._due_gen += 1
        return n

    def clock_offset(self) -> float:
        t0 = time.time()
        sec, usec = self.r.time()
        t1 = time.time()
        return float(sec) + float(usec) / 1e6 - (t0 + t1) / 2

    def _local(self, v: bytes | None) -> float:
        """A time a row holds (Redis's clock: :attr:`skew`) on this host's clock."""
        t = float(v or 0)
        return t - self.skew if t > 0 else t

    def _read_skew(self) -> None:
        """Measure :attr:`skew` (Redis TIME against this host's clock). Before, each
        node wrote and claimed due times by its own clock: a node two minutes behind
        retried every deferral (greylisting's too) two minutes early and claimed the
        retries other nodes set that much early too, and mail a node ahead spooled
        waited that long for every other node."""
        self._skew_read = time.monotonic()
        off = self.clock_offset()
        if abs(off) < SKEW_APPLY:
            self.skew = 0.0
        elif abs(off - self.skew) >= SKEW_APPLY / 2:  # (not moved by each read's noise)
            self.skew = round(off, 3)

    def release_strays(self, known: Collection[int]) -> int:
        """This node's in-flight set less ``known`` and the claims answered but
        not handed out yet: claims an outage cut off (a claim run whose answer
        was lost, a claim dropped before it reached a window) back to queued.
        Call it with every claim this node knows of in ``known``."""
        self._collect(None)
        stock = {c.id for cs in self._stock.values() for c in cs}
        mine = self.r.smembers(f"{self.k}:fl:{self.node}")
        stray = [i for i in map(int, mine) if i not in known and i not in stock]
        if stray:
            self.release(stray)
        return len(stray)

    def release(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        self._due_gen += 1
        for j in range(0, len(ids), CHUNK):
            self._release(args=[self.k, self.node, *ids[j : j + CHUNK]])

    def requeue(self, items: Iterable[tuple[int, float]], now: float) -> None:
        rows = list(items)
        self._due_gen += 1
        for j in range(0, len(rows), CHUNK):
            args: list[Any] = [self.k, repr(float(now) + self.skew), self.node]
            for i, at in rows[j : j + CHUNK]:
                args += [i, repr(float(at) + self.skew if at > 0 else float(at))]
            self._requeue(args=args)

    def hold_supervisor(self, command: str) -> None:
        """This process becomes the one running under this node name: the name's
        key (``P:name:NODE``, this process's pid, host, start time and command)
        set for a lease, renewed by :meth:`renew`, dropped by :meth:`close`.
        :class:`NodeNameBusy` when another live process holds it; one on this
        host that died is taken over at once, one on another host once its
        lease lapses (a node cannot tell from here that it died)."""
        if self._name_tag is not None:
            return
        logs = self._log_dir(self.node)  # (where its workers' write logs are: _logs_of)
        tag = orjson.dumps({**orjson.loads(self._tag), "command": command,
                            **({"logs": logs} if logs else {})})  # fmt: skip
        key = f"{self.k}:name:{self.node}"
        stale = ""
        for _ in range(3):
            got = self._hold_name(keys=[key, f"{self.k}:holders"],
                                  args=[tag, self._lease_ms, stale, self.node])  # fmt: skip
            if got == 1:
                self._name_tag = tag
                self._name_renewed = time.monotonic()
                return
            holder = _holder(got)
            if _same_process(holder):
                return  # another spool object of this process holds (and renews) it
            if holder_gone(holder):
                stale = _s(got)  # died on this host: ours now
                continue
            raise NodeNameBusy(self.node, self.prefix, holder, self.r.pttl(key) / 1000)
        raise NodeNameBusy(self.node, self.prefix, holder, self.r.pttl(key) / 1000)

    def hold_local_dir(self, directory: str, command: str) -> None:
        """``supervisor.lock`` in the node's local directory, locked as a SQLite
        spool's directory is (the kernel drops it when its holder dies): two nodes
        started with one directory (two units copied on a host, an NFS share)
        would append to one event log and keep their marks into it under one key.
        Held until :meth:`close`; a hold by another spool object of this process
        is shared (POSIX locks are the process's)."""
        real = os.path.realpath(directory)
        os.makedirs(real, 0o700, exist_ok=True)
        path = os.path.join(real, SUPERVISOR_LOCK)
        if self._dir_lock == path or path in _LOCKS:
            return
        holder = lock_file(path, {**holder_tag(), "command": command, "node": self.node})
        if holder is not None:
            raise LocalDirBusy(directory, holder)
        self._dir_lock = path

    def _renew_name(self) -> None:
        """Keep this node name ours (every lease/4); said once if another process
        took it while our lease had lapsed (a stall longer than the lease)."""
        assert self._name_tag is not None
        key = f"{self.k}:name:{self.node}"
        got = self._hold_name(keys=[key, f"{self.k}:holders"],
                              args=[self._name_tag, self._lease_ms, "", self.node])  # fmt: skip
        if got != 1 and not self._name_lost:
            self._name_lost = True
            holder = _holder(got)
            print(
                f"fastsend: error: node name {self.node!r} is now held by"
                f" {describe_holder(holder)} (this process's hold lapsed): two processes"
                " under one name take each other's in-flight mail; stop one of them",
                file=sys.stderr,
                flush=True,
            )
        elif got == 1:
            self._name_lost = False

    def recover(self) -> int:
        """This node's in-flight messages (a restart under the same ``node`` name)
        and those of every node whose lease expired, back to pending, each an
        attempt of unknown outcome (``lib.lua`` ``take_back``). Holds the node
        name first (:meth:`hold_supervisor`): another live process's window under
        this name is not ours to take."""
        self._due_gen += 1
        self.hold_supervisor("fastsend")
        dead = self._dead_here()
        # A whole-process kill: what the workers' write logs (files, in the local
        # dir: write_log_dir) of this name or of a dead process of this host do not
        # name was never begun (no DATA written): back as it was, no attempt (the
        # node-checked release). Logs that may not hold every write: all counts.
        logs = [(self.node, self._log_dir(self.node), b"")]
        logs += [(_s(d), self._logs_of(_s(d), t), t) for d, t in zip(dead[::2], dead[1::2], strict=True)]
        for node, where, tag in logs:
            written = read_write_logs(where) if where is not None else None
            if written is not None:
                self._release_unwritten(node, tag, written)
        n = int(self._recover(args=[self.k, self.node, self._lease_ms, *dead]))
        for node, where, _tag in logs:  # read: the next supervisor makes its own (or none)
            if where is not None and node != self.node:
                shutil.rmtree(where, ignore_errors=True)
            elif where is not None:
                with contextlib.suppress(OSError):
                    clear_write_logs(where)
        return n

    def _release_unwritten(self, node: str, tag: bytes, written: set[int]) -> None:
        """Node ``node``'s in-flight messages that ``written`` (its write logs) does
        not name, back with no attempt; a dead process's (``tag``: its holder) only
        while that process is still the name's holder (WATCHed: a process taking the
        name meanwhile holds its own claims, never released from here)."""
        hkey = f"{self.k}:holders"
        with self.r.pipeline(transaction=True) as pipe:
            try:
                if tag:
                    pipe.watch(hkey)
                    if pipe.hget(hkey, node) != tag:
                        return
                held = [int(i) for i in (pipe if tag else self.r).smembers(f"{self.k}:fl:{node}")]
                unsent = [i for i in held if i not in written]
                if not unsent:
                    return
                pipe.multi()
                for j in range(0, len(unsent), CHUNK):
                    self._release(args=[self.k, node, *unsent[j : j + CHUNK]], client=pipe)
                pipe.execute()
            except redis.WatchError:
                return  # (its name taken meanwhile: recover.lua leaves it too)

    def write_log_dir(self) -> str | None:
        return None if self._readonly else self._log_dir(self.node)

    def _log_dir(self, node: str) -> str | None:
        """Where the workers of node ``node``'s supervisor on this host keep their
        write logs: the local dir's ``writelogs/``, a dir per spool and node name
        (hashed: a name may hold any printable character; the server and prefix
        in it: a node name reused on another spool with one local dir is
        another's)."""
        if self._readonly:
            return None
        kw = self.r.connection_pool.connection_kwargs
        where = f"{kw.get('host')}:{kw.get('port')}:{kw.get('path')}/{kw.get('db')}"
        name = hashlib.sha256(f"{where}\0{self.k}\0{node}".encode()).hexdigest()[:24]
        return os.path.join(os.path.realpath(self.local_dir), "writelogs", name)

    def _logs_of(self, node: str, tag: bytes) -> str | None:
        """The write-log dir of node ``node``'s holder ``tag`` (P:holders), in the
        local dir that process was given (its tag says: ``hold_supervisor``), not
        this one's: a process of this host with another local dir read none of a
        dead one's logs (all counted unknown) and never removed them. Taken
        only if it is that node's dir of this spool (``writelogs/HASH``)."""
        mine = self._log_dir(node)
        got = _holder(tag).get("logs")
        if mine is None or not isinstance(got, str):
            return mine
        if (os.path.isabs(got) and os.path.basename(got) == os.path.basename(mine)
                and os.path.basename(os.path.dirname(got)) == "writelogs"):  # fmt: skip
            return got
        return mine

    def _sweep_dead_logs(self) -> None:
        """Remove the write logs of this host's dead holders whose window is
        back in the spool (taken back by any node, of any host, after their
        lease): nothing is left for them to tell. Before, only the dead one's own
        clean close (never) or a later recover on this host with its local dir
        removed them (2 MiB a worker, for good)."""
        for node, tag in self.r.hgetall(f"{self.k}:holders").items():
            name = _s(node)
            if name == self.node or not (h := _holder(tag)) or not holder_gone(h):
                continue
            where = self._logs_of(name, tag)
            if where is None or not os.path.isdir(where):
                continue
            if self.r.scard(f"{self.k}:fl:{name}") == 0:
                shutil.rmtree(where, ignore_errors=True)

    def _dead_here(self) -> list[bytes]:
        """(node name, holder tag) of the other node names whose last holder
        ran here and is dead (its pid gone: ``holder_gone``): their windows are
        taken back at once, not after their lease (nor one more, when the spool
        was silent since), unless another process holds the name by then."""
        out: list[bytes] = []
        for node, tag in self.r.hgetall(f"{self.k}:holders").items():
            if _s(node) != self.node and (h := _holder(tag)) and holder_gone(h):
                out += [node, tag]
        return out

    def taken_back(self) -> list[TakenBack]:
        """What claims and :meth:`recover` took back from dead nodes (``P:unk``,
        written by ``lib.lua``'s ``take_back``), up to 1,000 at a call, each to
        one node: one round trip when there is none."""
        key = f"{self.k}:unk"
        pipe = self.r.pipeline(transaction=True)
        pipe.lrange(key, 0, 999)
        pipe.ltrim(key, 1000, -1)
        got, _ = pipe.execute()
        if not got:
            return []
        rows: dict[int, tuple[int, int, float, str]] = {}
        for raw in got:
            f = _s(raw).split("|", 4)
            rows[int(f[0])] = (int(f[1]), int(f[2]), float(f[3]), f[4])
        out = []
        for i, data, _st in self._rows(sorted(rows)):
            cid, att, at, node = rows[i]
            rcpt = data.split(b"\0", 1)[0].decode()
            out.append(TakenBack(i, cid, rcpt, att, at, unknown_text(node)))
        return out

    def renew(self) -> None:
        """Extend this node's lease on its claims and this process's leases on the
        ingest jobs it reads (cheap: at most ~4 calls a lease)."""
        if self._ingests:
            self._renew_ingests()
        if time.monotonic() - self._skew_read >= SKEW_EVERY:
            self._read_skew()
        if self._sweeping or time.monotonic() - self._swept >= SWEEP_MS / 1000:
            self._swept = time.monotonic()  # (the first node to ask in SWEEP_MS sweeps)
            self._sweep_step()
        if self._name_tag is not None and time.monotonic() - self._name_renewed >= self.lease / 4:
            self._name_renewed = time.monotonic()
            self._renew_name()
        if self._name_tag is not None and time.monotonic() - self._logs_swept >= LOGS_SWEEP_S:
            self._logs_swept = time.monotonic()
            self._sweep_dead_logs()
        if not self._holding:
            return
        mono = time.monotonic()
        if mono - self._renewed < self.lease / 4:
            return
        self._renewed = mono
        self._renew(args=[self.k, self.node, self._lease_ms])

    def _sweep_step(self) -> bool:
        """One step of the index's sweep (sweep.lua: SWEEP_STEP campaigns, on
        from where any node's last step left it): True while more are to come.
        Before, one script looked at every active campaign: 100,000 held Redis
        (every node's claims and accepts) about a second."""
        got = int(self._sweep(args=[self.k, SWEEP_STEP]))
        if got:
            self._due_gen += 1  # (mail it found may be due: claim again)
        self._sweeping = got == 1
        return self._sweeping

    def counts(self, campaign_id: int | None = None) -> dict[str, int]:
        if campaign_id is not None:
            return self.counts_by_campaign([campaign_id])[int(campaign_id)]
        out = dict.fromkeys(STATE_NAMES.values(), 0)
        for state, n in self.r.hgetall(f"{self.k}:n").items():
            out[STATE_NAMES.get(int(state), _s(state))] = int(n)
        return out

    def next_due(self) -> float | None:
        if self._ahead:
            self._collect(None)
        if any(self._stock.values()):  # claimed ahead, not handed out yet
            return time.time()
        v = self._next_due(args=[self.k, self.node])
        return None if v is None else float(v) - self.skew

    def _rows(self, ids: list[int]) -> list[tuple[int, bytes, list[bytes]]]:
        """(id, data, state fields) of those of ``ids`` that exist: one HMGET per
        bucket, pipelined."""
        groups = list(_buckets(ids).items())
        pipe = self.r.pipeline(transaction=False)
        for b, g in groups:
            pipe.hmget(f"{self.k}:m:{b}", [f for i in g for f in (b"%d" % i, b"%ds" % i)])
        out = []
        for (_b, g), vals in zip(groups, pipe.execute(), strict=True):
            for j, i in enumerate(g):
                data, st = vals[2 * j], vals[2 * j + 1]
                if data is not None and st is not None:
                    out.append((i, data, _state(st)))
        return out

    def _pending_rows(
        self, campaign_ids: Collection[int]
    ) -> Iterable[tuple[int, bytes, list[bytes]]]:
        """Rows of every pending or in-flight message of those campaigns (due
        sets, then every node's in-flight set), CHUNK ids at a time."""
        k, r = self.k, self.r
        cids = {str(int(c)).encode() for c in campaign_ids}
        for cid in sorted(cids):
            start = 0
            while ids := r.zrange(f"{k}:due:{_s(cid)}", start, start + CHUNK - 1):
                yield from self._rows([int(x) for x in ids])
                start += CHUNK
        for node in r.zrange(f"{k}:nodes", 0, -1):
            fl = [int(x) for x in r.smembers(f"{k}:fl:{_s(node)}")]
            for j in range(0, len(fl), CHUNK):
                for row in self._rows(fl[j : j + CHUNK]):
                    if row[2][4] in cids:
                        yield row

    def _all_campaigns(self) -> list[int]:
        return [int(x) for x in self.r.zrange(f"{self.k}:camps", 0, -1)]

    def queue_shape(self, now: float) -> list[tuple[str, list[int]]]:
        edges = [m * 60.0 for m in AGE_BUCKETS_MIN]
        shape: dict[str, list[int]] = {}
        for _i, data, st in self._pending_rows(self._all_campaigns()):
            if st[0] not in (b"0", b"1", b"2"):
                continue
            _r, domain, created, _v = data.split(b"\0", 3)
            d = _s(domain)
            buckets = shape.get(d)
            if buckets is None:
                buckets = shape[d] = [0] * (len(edges) + 1)
            age = now - self._local(created)
            i = 0
            while i < len(edges) and age >= edges[i]:
                i += 1
            buckets[i] += 1
        return sorted(shape.items(), key=lambda kv: -sum(kv[1]))

    def message(self, message_id: int) -> dict[str, Any] | None:
        rows = self._rows([int(message_id)])
        if not rows:
            return None
        i, data, st = rows[0]
        rcpt, domain, created, vars_ = data.split(b"\0", 3)
        state = int(st[0])
        return {
            "id": i,
            "campaign": int(st[4]),
            "rcpt": _s(rcpt),
            "domain": _s(domain),
            "vars": orjson.loads(vars_ or b"{}"),
            "state": STATE_NAMES.get(state, state),
            "attempts": int(st[1]),
            "created": self._local(created),
            "next_at": self._local(st[2]),
            "updated": self._local(st[3]),
            "last_code": int(st[6] or 0),
            "last_enhanced": _s(st[7]),
            "last_text": _s(st[8]),
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

    def senders(self) -> int:
        # P:nodes: node -> the end of its lease on its claims (Redis time, ms),
        # renewed every lease/4 while it holds any (renew.lua); a node that
        # has not claimed yet counts itself
        pipe = self.r.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(f"{self.k}:nodes", 0, -1, withscores=True)
        (sec, usec), held = pipe.execute()
        now = int(sec) * 1000 + int(usec) // 1000
        live = {_s(n) for n, until in held if until > now}
        return len(live | {self.node})

    # -- bodies stored once (see Spool.put_blob): P:b:HEX the bytes, P:bm:HEX
    # {touched, pending}, P:br:HEX the id runs holding it ("first-last"),
    # P:blobs HEX -> when a sweep looks at it next (oldest first).

    # put_blob / ref_blob from any thread (serve stores a large body off its loop,
    # Acceptor.stow): redis-py's client is thread-safe. (Its WAIT/WAITAOF
    # follows a write of its own on its connection: `_wait_after_mark`.)
    blobs_aside = True

    def put_blob(self, digest: str, data: bytes, now: float) -> None:
        k = self.k
        first = int(self.r.get(f"{k}:seq:m") or 0) + 1  # its rows' ids are at least this
        pipe = self.r.pipeline(transaction=True)
        pipe.set(f"{k}:b:{digest}", data, nx=True)
        pipe.hsetnx(f"{k}:bm:{digest}", "since", first)
        pipe.hset(f"{k}:bm:{digest}", "touched", repr(float(now)))
        pipe.hincrby(f"{k}:bm:{digest}", "pending", 1)
        pipe.zadd(f"{k}:blobs", {digest: float(now)})
        pipe.execute()
        self._wait_durable()  # the rows that follow are "accepted"

    def ref_blob(self, digest: str, ids: Iterable[int]) -> None:
        runs = [f"{a}-{b}" for a, b in id_runs(sorted(ids))]
        pipe = self.r.pipeline(transaction=True)
        if runs:
            pipe.rpush(f"{self.k}:br:{digest}", *runs)
        # (never below 0: a reference the sweep ended as a dead accept's)
        pipe.eval(_UNPEND, 1, f"{self.k}:bm:{digest}")
        pipe.execute()

    def get_blobs(self, digests: Collection[str]) -> dict[str, bytes]:
        want = list(digests)
        if not want:
            return {}
        got = self.r.mget([f"{self.k}:b:{d}" for d in want])
        return {d: v for d, v in zip(want, got, strict=True) if v is not None}

    def sweep_blobs(
        self, now: float, retention: float, limit: int = 100, grace: float = ORPHAN_GRACE
    ) -> int:
        k, cutoff = self.k, now - retention
        gone = 0
        for raw in self.r.zrangebyscore(f"{k}:blobs", "-inf", f"({cutoff!r}", 0, int(limit)):
            d = _s(raw)
            bm, br = f"{k}:bm:{d}", f"{k}:br:{d}"
            pending, touched, since = self.r.hmget(bm, "pending", "touched", "since")
            if int(pending or 0) > 0 and float(touched or 0) < now - grace:
                self._reclaim_pending(d, touched, int(since or 1))
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    # Deleted only if no put or ref happened since these reads.
                    pipe.watch(bm, br)
                    pending, touched = pipe.hmget(bm, "pending", "touched")
                    runs = [_s(x).partition("-") for x in pipe.lrange(br, 0, -1)]
                    if (
                        int(pending or 0) > 0
                        or float(touched or 0) >= cutoff
                        or not self._runs_done([(int(a), int(b)) for a, _, b in runs], cutoff)
                    ):
                        pipe.unwatch()
                        # Still needed: looked at again a retention later, so the
                        # blobs behind it get their turn.
                        self.r.zadd(f"{k}:blobs", {d: float(now)}, xx=True)
                        continue
                    pipe.multi()
                    pipe.delete(f"{k}:b:{d}", bm, br)
                    pipe.zrem(f"{k}:blobs", d)
                    pipe.execute()
                    gone += 1
                except redis.WatchError:
                    continue
        return gone

    # -- retention (see Spool.prune_final; spool/prune.lua) -----------------------

    def prune_final(self, before: float, limit: int = 2000) -> tuple[int, bool]:
        # A sweep: the buckets an earlier sweep left messages in (P:prune:keep,
        # by this process's own cursor), then on from the shared P:prune 'next'
        # bucket to the young ones. Each call is one script over about ``limit``
        # messages (a bucket holds BUCKET), so Redis is never held long.
        # (at most PRUNE_BUCKETS buckets a call: ~2 ms of Redis, never held long)
        k, n = self.k, max(1, min(PRUNE_BUCKETS, int(limit) // BUCKET))
        before = float(before) + self.skew  # (rows' times are on Redis's clock)
        if self._keep_from is not None:
            got = [int(x) for x in self.r.zrangebyscore(
                f"{k}:prune:keep", f"({self._keep_from}", "+inf", 0, n
            )]  # fmt: skip
            if got:
                self._keep_from = got[-1]
                d, _more = self._prune(args=[k, repr(float(before)), "keep", n, *got])
                return int(d), True
            self._keep_from = None
        d, more = self._prune(args=[k, repr(float(before)), "next", n])
        if not more:
            # the sweep's end: the duplicate sets whose rows are gone though
            # P:pruned did not count them (prune.lua 'fps'), a step a call
            _sets, more = self._prune(args=[k, repr(float(before)), "fps", PRUNE_FPS])
            if not more:
                self._keep_from = -1  # the next sweep starts again with the kept buckets
        return int(d), bool(more)

    # -- idempotency keys (see Spool.idem_begin; spool/idem.lua) ----------------

    @staticmethod
    def _idem_key(scope: str, key: str) -> str:
        return hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()

    def idem_begin(
        self, scope: str, key: str, fingerprint: str, now: float, ttl: float, holder: bytes,
        *, lease: float = 30.0, stale: bytes | None = None,
    ) -> IdemRecord | None:  # fmt: skip
        got = self._idem(args=[
            self.k, "begin", self._idem_key(scope, key), holder, fingerprint,
            max(1, int(ttl * 1000)), repr(float(now)), max(1, int(lease * 1000)), stale or b"",
        ])  # fmt: skip
        if not got:
            return None
        fp, who, created, status, body, left, *parts = got
        return IdemRecord(_s(fp), bytes(who), float(created), int(status), bytes(body or b""),
                          [idem_part_ids(orjson.loads(p)) for p in parts],
                          int(left) / 1000)  # fmt: skip

    def idem_renew(self, scope: str, key: str, holder: bytes, lease: float) -> bool:
        return bool(self._idem(args=[
            self.k, "renew", self._idem_key(scope, key), holder, max(1, int(lease * 1000)),
        ]))  # fmt: skip

    def idem_finish(self, scope: str, key: str, holder: bytes, status: int, body: bytes) -> None:
        self._idem(args=[self.k, "finish", self._idem_key(scope, key), holder, int(status), body])
        self._wait_durable()  # the answer says "accepted"

    def idem_drop(self, scope: str, key: str, holder: bytes, *, keep: bool = False) -> None:
        self._idem(args=[self.k, "drop", self._idem_key(scope, key), holder, int(keep)])

    def sweep_idem(self, now: float, limit: int = 1000) -> int:
        return 0  # the keys expire by themselves

    def _reclaim_pending(self, digest: str, touched: bytes, since: int) -> None:
        """A blob whose pending reference outlived the grace (its accept died):
        record the rows that hold it (every row spooled since its first put is
        read: only after a crash) and end the pending references."""
        k, ref = self.k, blob_ref(digest)
        last = int(self.r.get(f"{k}:seq:m") or 0)
        ids: list[int] = []
        buckets = list(range(since // BUCKET, last // BUCKET + 1))
        for j in range(0, len(buckets), 64):
            pipe = self.r.pipeline(transaction=False)
            for b in buckets[j : j + 64]:
                pipe.hgetall(f"{k}:m:{b}")
            for h in pipe.execute():
                for f, v in h.items():
                    if not f.endswith(b"s") and v.split(b"\0", 3)[-1] == ref:
                        ids.append(int(f))
        bm, br = f"{k}:bm:{digest}", f"{k}:br:{digest}"
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(bm)  # a put meanwhile (an accept running) leaves it be
                if pipe.hget(bm, "touched") != touched:
                    return
                pipe.multi()
                for a, b in id_runs(sorted(ids)):
                    pipe.rpush(br, f"{a}-{b}")
                pipe.hset(bm, "pending", 0)
                pipe.execute()
            except redis.WatchError:
                pass

    def meta_once(self, key: str, value: str) -> str:
        self.r.hsetnx(f"{self.k}:meta", key, value)
        return _s(self.r.hget(f"{self.k}:meta", key))

    def stats(self) -> dict[str, int]:
        """Spool-wide counters every node shares: ``taken_over``, in-flight messages
        put back after their node's lease expired (or at its restart), each a
        possible duplicate."""
        return {_s(k): int(v) for k, v in self.r.hgetall(f"{self.k}:stats").items()}

    def shared(self) -> SharedStore:
        return SharedStore(self.r, self.prefix, self.node, self.lease)

    def shared_limits(self) -> Any:
        """GCRA buckets on this Redis, under this spool's prefix (one per spool)."""
        if self._limits is None:
            from fastsend.shared_limits import SharedLimits

            self._limits = SharedLimits(self.r, prefix=self.prefix)
        return self._limits

    def owner(self, message_id: int) -> tuple[int, str] | None:
        rows = self._rows([int(message_id)])
        if not rows:
            return None
        _i, data, st = rows[0]
        return int(st[4]), _s(data.split(b"\0", 1)[0])

    def owners(self, message_ids: Collection[int]) -> dict[int, tuple[int, str]]:
        rows = self._rows(sorted({int(i) for i in message_ids}))
        return {i: (int(st[4]), _s(data.split(b"\0", 1)[0])) for i, data, st in rows}

    def settle(self, message_ids: Collection[int], text: str) -> list[int]:
        ids = sorted({int(i) for i in message_ids})
        if not ids:
            return []
        text = text[:400].replace("\n", " ")
        got = self._settle(args=[self.k, "event", text, int(TAKEN_TTL), self.node, *ids])
        if got:
            self._untold_held = True  # noted untold until told (settle.lua)
        return sorted(int(i) for i in got)

    def settle_taken(self, message_ids: Collection[int]) -> dict[int, str]:
        ids = sorted({int(i) for i in message_ids})
        if not ids:
            return {}
        got = self._settle(args=[self.k, "taken", "", 0, self.node, *ids])
        if got:
            self._untold_held = True
        return {int(got[n]): _s(got[n + 1]) for n in range(0, len(got), 2)}

    SIBLING_SPAN = 8192  # ids searched each side of near_id (no index by recipient)

    def sibling(self, campaign_id: int, rcpt: str, near_id: int) -> tuple[int, str] | None:
        """As SQLite's, within :attr:`SIBLING_SPAN` ids of ``near_id``: a shared
        transaction's rows are claimed and spooled together, so they lie close."""
        want, cid = rcpt.lower(), str(int(campaign_id)).encode()
        step = 512
        for dist in range(0, self.SIBLING_SPAN, step):
            ids = [
                i
                for d in range(dist, dist + step)
                for i in ((near_id - d, near_id + d) if d else (near_id,))
                if i > 0
            ]
            got = {i: (st[4], data) for i, data, st in self._rows(ids)}
            for i in ids:  # nearest first
                if i in got and got[i][0] == cid:
                    r = _s(got[i][1].split(b"\0", 1)[0])
                    if r.lower() == want:
                        return i, r
        return None

    def counts_by_campaign(
        self, campaign_ids: Collection[int] | None = None
    ) -> dict[int, dict[str, int]]:
        k = self.k
        if campaign_ids is None:
            ids = [int(x) for x in self.r.zrange(f"{k}:camps", 0, -1)]
        else:
            ids = [int(c) for c in campaign_ids]
        # what was spooled (P:n:CID) plus the moves between states (P:nd "CID|state",
        # lib.lua flush_tally)
        states = sorted(STATE_NAMES)
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            pipe.hgetall(f"{k}:n:{cid}")
            pipe.hmget(f"{k}:nd", [f"{cid}|{s}" for s in states])
        got = pipe.execute()
        out: dict[int, dict[str, int]] = {}
        for j, cid in enumerate(ids):
            per = out[cid] = dict.fromkeys(STATE_NAMES.values(), 0)
            for state, n in got[2 * j].items():
                name = STATE_NAMES.get(int(state), _s(state))
                per[name] = per.get(name, 0) + int(n)
            for state, n in zip(states, got[2 * j + 1], strict=True):
                if n is not None:
                    per[STATE_NAMES[state]] += int(n)
        return out

    def pending_domains(
        self, campaign_ids: Collection[int] | None = None, limit: int = 100
    ) -> list[tuple[str, int]]:
        cids = self._all_campaigns() if campaign_ids is None else campaign_ids
        counts: dict[str, int] = {}
        for _i, data, st in self._pending_rows(cids):
            if st[0] in (b"0", b"1", b"2"):
                d = _s(data.split(b"\0", 2)[1])
                counts[d] = counts.get(d, 0) + 1
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(0, limit)]

    # -- list ingest jobs ----------------------------------------------------

    def create_ingest(self, campaign_id: int, source: dict[str, Any], total: int) -> int:
        k = self.k
        jid = int(self.r.incr(f"{k}:seq:ing"))
        self.hold_ingest(jid)  # before the job is listed: no other reader can start it
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            f"{k}:ing:{jid}",
            mapping={
                "campaign": int(campaign_id),
                "source": orjson.dumps(source),
                "total": int(total),
                "line": 0,
                "accepted": 0,
                "rejected": 0,
                "status": "running",
                "created": repr(time.time()),
            },
        )
        pipe.zadd(f"{k}:ings", {jid: jid})
        pipe.zadd(f"{k}:ings:run", {jid: jid})
        pipe.execute()
        self._wait_durable()
        return jid

    @staticmethod
    def _ingest(jid: int, h: dict[bytes, Any]) -> IngestJob | None:
        if not h:
            return None
        return IngestJob(
            id=jid,
            campaign=int(h[b"campaign"]),
            source=orjson.loads(h[b"source"]),
            total=int(h[b"total"]),
            line=int(h[b"line"]),
            accepted=int(h[b"accepted"]),
            rejected=int(h[b"rejected"]),
            status=_s(h[b"status"]),
            created=float(h[b"created"]),
            untold=tuple(map(int, h.get(b"untold", b"0 0").split())),  # type: ignore[arg-type]
            duplicates=int(h.get(b"duplicates", 0)),
        )

    def get_ingest(self, job_id: int) -> IngestJob | None:
        return self._ingest(int(job_id), self.r.hgetall(f"{self.k}:ing:{int(job_id)}"))

    def list_ingests(self, *, unfinished: bool = False) -> list[IngestJob]:
        k = self.k
        if unfinished and not self.r.exists(f"{k}:ings:run-ok"):
            # Once per spool: the running jobs of a spool made before P:ings:run
            # (a view reads them from every job, writing nothing: `queue` on a
            # replica ended in a traceback, "You can't write against a read only
            # replica").
            every = self.list_ingests()
            if self._readonly:
                return [j for j in every if not j.finished]
            running = {j.id: j.id for j in every if not j.finished}
            if running:
                self.r.zadd(f"{k}:ings:run", running)
            self.r.set(f"{k}:ings:run-ok", 1)
        ids = [int(x) for x in self.r.zrange(f"{k}:ings:run" if unfinished else f"{k}:ings", 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for jid in ids:
            pipe.hgetall(f"{k}:ing:{jid}")
        jobs = [self._ingest(j, h) for j, h in zip(ids, pipe.execute(), strict=True)]
        if unfinished and not self._readonly:  # finished meanwhile (a race with the first
            # listing): not running
            done = [i for i, j in zip(ids, jobs, strict=True) if j is None or j.finished]
            if done:
                self.r.zrem(f"{k}:ings:run", *done)
        return [j for j in jobs if j is not None and not (unfinished and j.finished)]

    def finish_ingest(self, job_id: int, status: str) -> None:
        if status not in INGEST_STATUSES[1:]:
            raise ValueError(f"bad ingest status {status!r}")
        key = f"{self.k}:ing:{int(job_id)}"
        if self.r.exists(key):
            self.r.hset(key, "status", status)
        self.r.zrem(f"{self.k}:ings:run", int(job_id))  # P:ings:run: the running ones

    def told_ingest(self, job_id: int) -> None:
        key = f"{self.k}:ing:{int(job_id)}"
        if self.r.exists(key):
            self.r.hset(key, "untold", b"0 0")

    def hold_ingest(self, job_id: int) -> None:
        """A lease key (``lease`` seconds, renewed by :meth:`renew`) naming this
        process; a lease whose holder ran on this host and is dead is taken
        over at once, one of another host's is waited out."""
        jid = int(job_id)
        if jid in self._ingests:
            return
        args: list[Any] = [self.k, "hold", jid, self._tag, self._lease_ms]
        cur = self._ingest_lease(args=args)
        if cur:
            holder = _holder(cur)
            if holder_gone(holder):
                cur = self._ingest_lease(args=[*args, cur])
            if cur:
                raise IngestBusy(jid, _holder(cur))
        self._ingests.add(jid)
        self._ingests_renewed = time.monotonic()

    def release_ingest(self, job_id: int) -> None:
        jid = int(job_id)
        if jid in self._ingests:
            self._ingests.discard(jid)
            self._ingest_lease(args=[self.k, "release", jid, self._tag, self._lease_ms])

    def _renew_ingests(self) -> None:
        mono = time.monotonic()
        if mono - self._ingests_renewed < self.lease / 4:
            return
        self._ingests_renewed = mono
        for jid in sorted(self._ingests):
            if not self._ingest_lease(args=[self.k, "renew", jid, self._tag, self._lease_ms]):
                # Our lease lapsed (a stall longer than it) and another process holds the job.
                self._ingests.discard(jid)
                print(f"fastsend: lost the lease on ingest job {jid}", file=sys.stderr)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Spool]:
        # This very object: redis-py takes a connection from the client's pool for
        # each command (a pipeline for one call), so another thread's reads never
        # share a connection with this thread's calls; the read calls keep no state.
        yield self

    def close(self) -> None:
        try:
            for jid in list(self._ingests):
                self.release_ingest(jid)
        except redis.RedisError:
            pass
        try:
            if self._ahead:
                self._collect(None)
            held = [c.id for cs in self._stock.values() for c in cs]
            self._stock.clear()
            self.release(held)  # claimed ahead, never handed out: queued again
            if self._aconn is not None:
                self.r.connection_pool.release(self._aconn)
                self._aconn = None
            if self._holding:
                self._leave(args=[self.k, self.node])
            if self._name_tag is not None:
                self._drop_name(keys=[f"{self.k}:name:{self.node}", f"{self.k}:holders"],
                                args=[self._name_tag, self.node])  # fmt: skip
                self._name_tag = None
                # (the name no longer ours: no recover on this host reads its write
                # logs again; kept, each run under a name of its own left 2 MiB a worker)
                where = self._log_dir(self.node)
                if where is not None:
                    shutil.rmtree(where, ignore_errors=True)
        except redis.RedisError:
            pass
        self._drop_dir_lock()
        self.r.close()

    def _drop_dir_lock(self) -> None:
        if self._dir_lock:
            unlock_file(self._dir_lock)
            self._dir_lock = ""

    def abandon(self) -> None:
        self._stock.clear()
        self._drop_dir_lock()
        self.r.close()
