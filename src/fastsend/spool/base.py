"""The spool's values and its seam: message states, the records crossing the
seam, :class:`Spool` (the abstract backend), :class:`SpoolProxy`, SpoolError
and spool URL parsing. The backends (``sqlite``, ``redis``) import this; the
package (:mod:`fastsend.spool`) re-exports it and opens a backend by URL."""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import functools
import os
import socket
import time
import types
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgspec
import orjson

from fastsend.redisurl import REDIS_PARAMS, is_redis_url, parse_redis_url

__all__ = ["REDIS_PARAMS", "is_redis_url", "parse_redis_url"]  # the spool's URL syntax

# Message states (stored as small ints).
QUEUED = 0
INFLIGHT = 1
DEFERRED = 2
DELIVERED = 3
BOUNCED = 4
SUPPRESSED = 5
EXPIRED = 6
CANCELLED = 7

STATE_NAMES = {
    QUEUED: "queued",
    INFLIGHT: "inflight",
    DEFERRED: "deferred",
    DELIVERED: "delivered",
    BOUNCED: "bounced",
    SUPPRESSED: "suppressed",
    EXPIRED: "expired",
    CANCELLED: "cancelled",
}
STATE_BY_NAME = {v: k for k, v in STATE_NAMES.items()}
FINAL_STATES = frozenset({DELIVERED, BOUNCED, SUPPRESSED, EXPIRED, CANCELLED})
PENDING_STATES = frozenset({QUEUED, DEFERRED})


_TAKE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""

_DROP_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# Each field whose line (JSON) still names this node (ARGV[1]) deleted; a line
# another node took since (it names that node) or an unreadable one is left.
_DROP_MINE_LUA = """
local n = 0
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local ok, rec = pcall(cjson.decode, v)
    if ok and type(rec) == 'table' and rec['node'] == ARGV[1] then
      n = n + redis.call('HDEL', KEYS[1], ARGV[i])
    end
  end
end
return n
"""


class SharedStore(msgspec.Struct, frozen=True):
    """What :meth:`Spool.shared` gives: the shared spool's store (a redis-py
    client, bytes replies), its key namespace (every key ``{prefix}:...``, one
    Redis Cluster slot), this node's name and lease (s)."""

    client: Any
    prefix: str
    node: str
    lease: float

    def key(self, *parts: object) -> str:
        """``{prefix}:part:part...``"""
        return ":".join(["{" + self.prefix + "}", *map(str, parts)])

    def take(self, key: str, field: bytes | str, seen: bytes, mine: bytes) -> bool:
        """Hash ``key``'s ``field`` set to ``mine`` if it still holds ``seen`` (one
        Lua script: a compare-and-set): whether this node took it. Two live nodes
        adopting one dead node's line (``P:held``, ``P:dsnj``) both read it; only
        the one whose write finds it unchanged finishes it."""
        return bool(self.client.eval(_TAKE_LUA, 1, key, field, seen, mine))

    def drop(self, key: str, field: bytes | str, seen: bytes) -> bool:
        """Hash ``key``'s ``field`` deleted if it still holds ``seen`` (a
        compare-and-delete): a node that finished a line it took removes it only
        while it is still its own, never a line another node took since."""
        return bool(self.client.eval(_DROP_LUA, 1, key, field, seen))

    def drop_mine(self, key: str, fields: Iterable[bytes | str]) -> int:
        """Hash ``key``'s ``fields`` deleted whose line (JSON, its ``node``) still
        names this node (one Lua script: checked and deleted at once); how many.
        A line another node took since (this one stalled past its status) is
        that node's to finish: left."""
        fields = list(fields)
        if not fields:
            return 0
        return int(self.client.eval(_DROP_MINE_LUA, 1, key, self.node, *fields))

    def mine(self, key: str, field: bytes | str, line: bytes) -> bool:
        """Whether hash ``key``'s ``field`` still holds ``line`` exactly (this
        node's as it took it): :meth:`take` of it as itself."""
        return self.take(key, field, line, line)


class SpoolError(Exception):
    """The spool cannot be opened, is not a fastsend spool, or a write did not
    become durable. Every backend raises this (or a subclass). ``exit_status``:
    what a command that stops on it exits with (README: 2, nothing was done;
    75, try again later)."""

    exit_status = 2


class SpoolLocked(SpoolError):
    """A local spool another process holds locked past the lock wait (a long
    transaction of another command, a stuck sqlite3 shell): try again later."""

    exit_status = 75


class SpoolStorageError(SpoolError):
    """A local spool's storage refused a write (a full disk, a read-only file
    system, an I/O error): nothing of that write was kept. An outage of the
    spool (``Spool.outage_errors``): the supervisor keeps what it holds and
    tries again, so freeing space lets the run go on."""

    exit_status = 75


# SQLite's primary result codes that mean the storage refused a write.
_SQLITE_STORAGE = {8: "is read-only", 10: "cannot be written (I/O error)", 13: "is full",
                   14: "cannot be opened or created"}  # fmt: skip
# The -shm file of a WAL database could not be made its size: its disk is full
# (it read "cannot be written (I/O error)", exit 2, opening a spool on a full disk).
_SQLITE_IOERR_SHMSIZE = 4874
_ERRNO_STORAGE = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its disk quota",
                  errno.EROFS: "is read-only", errno.EACCES: "is not writable (permission denied)",
                  errno.EIO: "cannot be written (I/O error)"}  # fmt: skip


# What storage_problem says of a storage that may take writes again by itself
# (room freed): not now, try again later (exit 75), where a read-only or
# unwritable one is the operator's to change (exit 2).
TEMPORARY_STORAGE = frozenset({"is full", "is over its disk quota"})


def storage_problem(e: BaseException | None) -> str | None:
    """What is wrong with the storage under a local spool when ``e`` (or an
    error it was raised from or while handling) is a full disk, a read-only
    file system or directory, an I/O error: "is full", "is read-only", ...;
    None for any other error."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "sqlite_errorcode", None)
        if code == _SQLITE_IOERR_SHMSIZE:
            return "is full"
        if isinstance(code, int) and (code & 0xFF) in _SQLITE_STORAGE:
            return _SQLITE_STORAGE[code & 0xFF]
        if isinstance(e, OSError) and e.errno in _ERRNO_STORAGE:
            return _ERRNO_STORAGE[e.errno]
        e = e.__cause__ or e.__context__
    return None


class IngestBusy(SpoolError):
    """Another live process is reading this ingest job (``holder`` says which:
    its pid, host and start time)."""

    def __init__(self, job_id: int, holder: dict[str, Any]) -> None:
        self.job_id = job_id
        self.holder = holder
        super().__init__(
            f"ingest job {job_id} is being read by {describe_holder(holder)};"
            " wait for it to finish, or stop it (its spooled rows stay) and try again"
        )


class IngestLost(SpoolError):
    """This process's hold on an ingest job lapsed (a stall longer than its
    lease; ``holder``: who holds it now, or None): its rows are refused, so
    two readers never spool the same lines."""

    def __init__(self, job_id: int, holder: dict[str, Any] | None) -> None:
        self.job_id = job_id
        self.holder = holder
        now = f"; {describe_holder(holder)} reads it now" if holder else ""
        super().__init__(
            f"ingest job {job_id}: this process's lease on it lapsed{now}; no rows were"
            " added (the job goes on from its last committed row: `fastsend resume`)"
        )


class FpsChanged(SpoolError):
    """Another node recorded one of the fingerprints a write was to record
    (``add_messages(fps=)``) since the caller asked (:meth:`Spool.recorded_fps`):
    nothing was written; the caller asks again and leaves out what is recorded."""


class IdemLost(SpoolError):
    """The request's hold on its Idempotency-Key was taken over (its lease
    lapsed and another request judged it dead, or the key is gone): its rows
    are refused, so two attempts of one request never spool the same part."""

    def __init__(self, scope: str, key: str) -> None:
        self.scope = scope
        self.key = key
        super().__init__(
            "Idempotency-Key: another attempt of this request took it over; nothing more was"
            " spooled by this one"
        )


class SpoolBusy(SpoolError):
    """Another live process supervises this spool (``holder``: its pid, host,
    start time and command): two supervisors would take each other's mail."""

    def __init__(self, where: str, holder: dict[str, Any]) -> None:
        self.holder = holder
        command = holder.get("command") or "?"
        super().__init__(
            f"spool {where} is in use by pid {holder.get('pid', '?')} ({command})"
            f"{_since(holder)}; stop it first, or wait for it to finish"
        )


class LocalDirBusy(SpoolBusy):
    """Another live process runs a node of a shared spool with this local
    directory: both would append to one event log and keep their marks into it
    (rollups, webhook outbox) under one key."""

    def __init__(self, where: str, holder: dict[str, Any]) -> None:
        self.holder = holder
        SpoolError.__init__(
            self,
            f"local directory {where} is in use by pid {holder.get('pid', '?')}"
            f" ({holder.get('command') or '?'}){_since(holder)}: each node of a shared"
            " spool needs its own (dir= in the spool URL, or [spool] dir); two would write"
            " one event log and count and send each other's events again",
        )


SUPERVISOR_LOCK = "supervisor.lock"  # held by the one process supervising a directory
# Lock files this process holds, by path: POSIX locks belong to the process, so
# a second hold from the same process must be refused (or shared) here, and
# only the holder may close the descriptor (closing any descriptor of the file
# drops it).
_LOCKS: dict[str, tuple[int, dict[str, Any]]] = {}


def lock_file(path: str, tag: dict[str, Any]) -> dict[str, Any] | None:
    """Lock ``path`` (made 0600 if missing) for this process, writing ``tag`` in it,
    and note it in :data:`_LOCKS`: None, or the tag of the live process holding it
    (the kernel drops the lock when its holder dies: a kill -9 leaves none behind).
    The caller checks :data:`_LOCKS` first (this process may hold it already)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder: dict[str, Any] = {}
        for _ in range(20):  # the holder writes its name just after locking
            try:
                holder = orjson.loads(os.pread(fd, 4096, 0) or b"{}")
            except orjson.JSONDecodeError:
                holder = {}
            if holder:
                break
            time.sleep(0.005)
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, orjson.dumps(tag), 0)
    _LOCKS[path] = (fd, tag)
    return None


def unlock_file(path: str) -> None:
    """Drop a lock :func:`lock_file` took (the file stays: unlinking it would race
    a waiter)."""
    held = _LOCKS.pop(path, None)
    if held is not None:
        os.close(held[0])


def _since(tag: dict[str, Any]) -> str:
    since = tag.get("since")
    return time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(float(since))) if since else ""


def holder_tag() -> dict[str, Any]:
    """Who holds an ingest job, a node name or a request: this process (pid,
    host, start time: a pid reused by another process after a crash is not
    mistaken for the holder; ``ns``: the kernel's boot and this process's PID
    namespace, where that pid means this process)."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid),
            "since": time.time(), "ns": pid_space()}  # fmt: skip


@functools.cache
def pid_space() -> str:
    """Where this process's pids mean what they say: the running kernel's boot
    id and this process's PID namespace. A host name alone does not tell:
    containers sharing the host's name (``--network host``, Kubernetes'
    ``hostNetwork``) each count pids of their own, and cloned machines share
    their name; "" when /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def same_pid_space(tag: dict[str, Any]) -> bool:
    """The holder ``tag`` ran where this process can see its pid: this host
    (its name), the same boot and PID namespace (a tag of an older version,
    without ``ns``: the host name alone)."""
    if tag.get("host") != socket.gethostname():
        return False
    ns = tag.get("ns")
    return ns is None or (ns != "" and ns == pid_space())


def describe_holder(tag: dict[str, Any]) -> str:
    where = str(tag.get("host", "?"))
    if tag.get("host") == socket.gethostname() and not same_pid_space(tag):
        where += " (another machine or container by that name)"
    return f"pid {tag.get('pid', '?')} on {where}{_since(tag)}"


def holder_gone(tag: dict[str, Any]) -> bool:
    """True when the holder ran here (:func:`same_pid_space`) and is dead (its
    pid is gone or now names a process started at another time): its lease
    need not be waited out. A holder elsewhere (another host, or a container
    or machine by the same name) is never judged from here (its lease
    expires)."""
    if not same_pid_space(tag):
        return False
    try:
        pid = int(tag.get("pid", 0))
    except (TypeError, ValueError):
        return True
    if pid <= 0:
        return True
    start = _start_time(pid)
    return start is None or (tag.get("start") is not None and abs(start - tag["start"]) > 1.0)


_PROC = os.path.exists("/proc/self/stat")


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (unix seconds), None when there is no such
    process. On Linux from /proc, as psutil's ``create_time()`` computes it (the
    same float: start ticks after boot / ticks per second + boot time), without
    importing psutil (~10 ms) at every command's start (``holder_tag``)."""
    if _PROC:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            ticks = float(stat.rpartition(b")")[2].split()[19])  # field 22, starttime
            return ticks / os.sysconf("SC_CLK_TCK") + _boot_time()
        except (OSError, ValueError, IndexError):
            return None  # gone (or a /proc this does not understand: treated as gone)
    import psutil  # elsewhere

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


@functools.cache
def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


class Claimed(msgspec.Struct, gc=False):
    """A message taken from the spool for one delivery attempt. A C struct (built
    for every claimed row: cheaper than a dataclass), not tracked by the cycle
    collector (it holds no containers)."""

    id: int
    campaign: int
    rcpt: str
    domain: str
    vars: bytes  # orjson-encoded dict of the recipient's variables
    attempts: int  # attempts made before this one
    created: float


class Result(msgspec.Struct, gc=False):
    """What the scheduler decided for one message after an attempt."""

    id: int
    state: int
    attempts: int
    next_at: float
    code: int = 0
    enhanced: str = ""
    text: str = ""


# How long a provider's event about a message in flight is kept for its outcome
# (Spool.settle, settle_taken): longer than any request's answer_timeout.
TAKEN_TTL = 86400.0

# The reply recorded for a message taken back from a process that died holding
# it (its whole node: kill -9, a crash, a power loss): it may have been sent.
UNKNOWN_CODE, UNKNOWN_ENHANCED = 451, "4.3.0"
# The enhanced status classes of a deferral that says the site, not the
# recipient, is not taking mail (RFC 3463: mail system, network and routing,
# policy and rates), with 421: what a site taking mail again brings forward
# (Spool.bring_forward).
SITE_STATUSES = ("4.3.", "4.4.", "4.7.")


def unknown_text(node: str = "") -> str:
    who = f"node {node}" if node else "the process sending it"
    return f"local error: {who} stopped with this message in flight: outcome unknown, sent again"


class TakenBack(msgspec.Struct, gc=False):
    """A message taken back from a dead process's window (:meth:`Spool.recover`,
    or on a shared spool a claim reaping a node whose lease lapsed), already
    recorded as an attempt of unknown outcome: deferred, due again at once
    (``at``), ``attempts`` counting it. The supervisor tells it as a deferred
    event (:meth:`Spool.taken_back`)."""

    id: int
    campaign: int
    rcpt: str
    attempts: int
    at: float
    text: str


class Untold(msgspec.Struct, gc=False):
    """A message whose outcome a process recorded (:meth:`Spool.record_outcomes`)
    and may have died before telling (its event not written): as its row holds
    it now, for :meth:`Spool.untold`. ``at``: when it was recorded; ``next_at``:
    a deferral's next attempt."""

    id: int
    campaign: int
    rcpt: str
    state: int
    attempts: int
    next_at: float
    code: int
    enhanced: str
    text: str
    at: float
    # its event's id in a shared spool's webhook outbox (written with the
    # outcome), 0 when none: the webhooks do not append that event again
    event_id: int = 0


class CampaignInfo(msgspec.Struct):
    id: int
    name: str
    tenant: str
    created: float
    status: str  # active / paused / cancelled
    spec: dict[str, Any]
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    # why the status is what it is, when something said (a guardrail's pause:
    # "guardrail: bounce rate 9.0% ..."); written with the status, so it
    # outlives a restart; "" when the status was set without a reason
    reason: str = ""


class IngestMark(msgspec.Struct):
    """Where a list ingest stands once a batch commits: written in the same
    transaction as the batch's rows, so the spool never holds rows past the
    mark or a mark past its rows (see :class:`IngestJob`)."""

    job: int
    line: int  # source line of the last row this batch read (0: none yet)
    accepted: int  # rows spooled by the job so far, this batch included
    rejected: int  # bad rows skipped so far
    # rows skipped so far because the campaign had their address already (a list
    # naming one twice: fastsend.accept); not "rejected": nothing was wrong with them
    duplicates: int = 0


class IngestJob(msgspec.Struct):
    """A recipient list being accepted: a durable job, so that a crash in the
    middle of a list is resumed where the last committed batch ended (and a
    changed or missing source is detected, never silently skipped).

    ``source`` is {"path", "size", "mtime_ns", "sha256"} of the file as read
    when the job started; ``total`` its good and bad data rows."""

    id: int
    campaign: int
    source: dict[str, Any]
    total: int
    line: int = 0
    accepted: int = 0
    rejected: int = 0
    status: str = "running"  # running / done / abandoned
    created: float = 0.0
    # (first, last) ids of the last committed batch while its "accepted" /
    # "suppressed" events may not have been emitted: set in the batch's
    # transaction, cleared (told_ingest) once they are flushed; (0, 0) if none.
    untold: tuple[int, int] = (0, 0)
    duplicates: int = 0  # rows skipped: an address the campaign had (IngestMark)

    @property
    def finished(self) -> bool:
        return self.status != "running"


INGEST_STATUSES = ("running", "done", "abandoned")
# A campaign's status: "active" (its mail is claimed), "paused", "cancelled" (its
# pending mail ends cancelled), "staging" (being created: not claimed, not shown to
# its tenant until every row of the request creating it is in) and "abandoned"
# (a staging campaign whose request failed or died: as cancelled, never shown).
CAMPAIGN_STATUSES = ("active", "paused", "cancelled", "staging", "abandoned")
STAGING = "staging"
ABANDONED = "abandoned"
ENDED = frozenset({"cancelled", ABANDONED})  # pending mail ends cancelled
ORPHAN_GRACE = 3600.0  # s: a blob reference pending this long after its put is a dead accept's


IDEM_RELEASED = b"released"  # the holder of a record whose request failed after some parts


class IdemRecord(msgspec.Struct):
    """What the spool holds for one idempotency key of a tenant (see
    :meth:`Spool.idem_begin`): the request's fingerprint, who runs it (a holder
    tag, JSON; :data:`IDEM_RELEASED` once a request that failed gave it up),
    and once it answered, its status and body (``status`` 0: still running).

    ``parts``: what the request's attempts have accepted so far, one entry per
    :meth:`Spool.add_messages` call made under an :class:`IdemMark` (its
    campaign and the ids its rows got), each written in the same transaction
    as its rows. ``lease_left``: seconds the holder's lease has left (it
    renews it while it works; <= 0: lapsed)."""

    fingerprint: str
    holder: bytes
    created: float
    status: int = 0
    body: bytes = b""
    parts: list[tuple[int, list[int]]] = msgspec.field(default_factory=list)
    lease_left: float = 0.0

    @property
    def running(self) -> bool:
        return self.status == 0


class IdemMark(msgspec.Struct):
    """Rows spooled under an Idempotency-Key (``add_messages(..., idem=)``):
    recorded as part ``part`` of the key's record (their campaign and ids) in
    the same transaction as the rows, and only while ``holder`` holds the key
    and the record has exactly ``part`` parts; else :class:`IdemLost` and
    nothing is added."""

    scope: str
    key: str
    holder: bytes
    part: int


def idem_part(campaign_id: int, ids: Sequence[int]) -> list[Any]:
    """One part of an idempotency record as stored (JSON): [campaign, id runs]."""
    return [int(campaign_id), id_runs(list(ids))]


def idem_part_ids(part: Any) -> tuple[int, list[int]]:
    """(campaign, ids) of a stored part (:func:`idem_part`)."""
    cid, runs = part
    return int(cid), [i for a, b in runs for i in range(int(a), int(b) + 1)]


class Spool(abc.ABC):
    """Durable storage of campaigns and messages. Every write is durable on return."""

    # The operator's weight of a tenant among tenants in the claims (spool/fair.py),
    # those other than 1: set_tenant_weights replaces it whole.
    tenant_weights: Mapping[str, int] = types.MappingProxyType({})

    def set_tenant_weights(self, weights: Mapping[str, int]) -> None:
        """The weight of each tenant among tenants for the claims from now on
        (``[tenants.NAME] weight``, absent: 1; :func:`fastsend.spool.fair.fair_shares`):
        the config of the process that claims (the supervisor sets it at start
        and at each reload), never a campaign's own options, so a tenant cannot
        raise its own share. The nodes of a shared spool run one config."""
        self.tenant_weights = types.MappingProxyType(
            {str(t): int(w) for t, w in weights.items() if int(w) != 1}
        )

    @abc.abstractmethod
    def create_campaign(
        self,
        spec: dict[str, Any],
        *,
        name: str = "",
        tenant: str = "default",
        options: dict[str, Any] | None = None,
        status: str = "active",
    ) -> int:
        """A new campaign; ``status`` "active", "paused" or "staging" (written with it)."""

    @abc.abstractmethod
    def get_campaign(self, campaign_id: int) -> CampaignInfo | None: ...

    @abc.abstractmethod
    def list_campaigns(self) -> list[CampaignInfo]: ...

    @abc.abstractmethod
    def campaigns(
        self, tenant: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[CampaignInfo]:
        """Campaigns of ``tenant`` (None: every tenant's) with ids above ``after``,
        by id, at most ``limit``: a page of a listing whose cursor is the last id.
        Backends find a tenant's campaigns by an index (SQLite) or a set per
        tenant (Redis): another tenant's specs are never read or decoded."""

    @abc.abstractmethod
    def set_campaign_status(self, campaign_id: int, status: str, reason: str = "") -> None:
        """The campaign's status and why (``CampaignInfo.reason``), written together:
        a status set without a reason clears the one before."""

    @abc.abstractmethod
    def add_messages(
        self,
        campaign_id: int,
        rows: Iterable[tuple[str, str, bytes]],
        now: float,
        *,
        state: int = QUEUED,
        suppressed: Collection[int] = (),
        ingest: IngestMark | None = None,
        idem: IdemMark | None = None,
        fps: Sequence[int] | None = None,
    ) -> list[int]:
        """Spool (rcpt, domain, vars) rows in one transaction; durable when it
        returns their ids (in the order of ``rows``). Rows whose index is in
        ``suppressed`` are stored as SUPPRESSED (final), the others as ``state``.
        ``ingest``: the list-ingest job's new position, committed atomically
        with the rows. ``idem``: the rows are a part of a request made under an
        Idempotency-Key, recorded in the key's record atomically with the rows
        (:class:`IdemMark`; :class:`IdemLost` when the key is not the caller's).
        ``fps``: the fingerprints of the rows' addresses, for a spool that
        records them (:meth:`recorded_fps`), atomically with the rows: when one
        was recorded since the caller asked, nothing is written
        (:class:`FpsChanged`: ask again)."""

    # -- duplicate recipients (fastsend.accept) ------------------------------

    def spooled_rcpts(self, campaign_id: int) -> Iterator[list[str]]:
        """The addresses spooled for a campaign, a chunk at a time: what a
        process that alone writes this spool rebuilds its table of the
        campaign's addresses from (a list's duplicates are not spooled)."""
        raise NotImplementedError

    def recorded_fps(self, campaign_id: int, fps: Sequence[int]) -> list[bool] | None:
        """For a spool several nodes write (Redis): whether each fingerprint of
        ``fps`` (fastsend.recipients.fingerprint) was recorded with a row of the
        campaign (``add_messages(fps=)``); None: this spool records none (one
        process writes it: :meth:`spooled_rcpts` gives that process all)."""
        return None

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int) -> list[Claimed]:
        """Take up to ``limit`` due messages (queued/deferred, next_at <= now) of
        active campaigns and mark them in flight: ``limit`` shared between the
        campaigns with mail due as :mod:`fastsend.spool.fair` says (tenants
        alike, then a tenant's priority, then weight), each campaign's oldest
        due first."""

    def claim_next(self, now: float, limit: int, key: int = 0) -> list[Claimed]:
        """:meth:`claim_due` for a dispatcher that claims over and over, one
        window per ``key`` (a worker): a shared spool may answer with the claim
        it sent at the previous call and send the next one without waiting for
        it (what is claimed and not yet handed out counts against ``limit``, so
        a window's in-flight set stays within it; :meth:`next_due` and
        :meth:`close` account for it). An empty answer may mean "not back yet":
        ask :meth:`next_due` before concluding nothing is due."""
        return self.claim_due(now, limit)

    def held(self, key: int = 0) -> int:
        """Messages :meth:`claim_next` has claimed for ``key`` (in flight in the
        spool) and not handed out yet: what a caller giving ``key``'s window
        more mail from elsewhere must count against its room."""
        return 0

    @abc.abstractmethod
    def record_results(self, results: Iterable[Result], now: float) -> None:
        """Apply attempt outcomes (one transaction). A backend may leave a
        delivery's reply text out of its row (SQLite does: the delivered event
        carries it); a bounce's or deferral's reply is kept."""

    def record_outcomes(
        self, results: Iterable[Result], now: float, events: Sequence[bytes] = (),
        event_ids: Sequence[int] = (),
    ) -> int | None:  # fmt: skip
        """:meth:`record_results`, and ``events`` (JSON records) appended to the
        spool's shared event outbox (the webhook outbox of every node) in the
        same atomic step: an outcome is never durable without its events.
        Returns the first event's outbox id (the others follow in order), or
        None when this spool keeps no outbox (a local spool: the caller writes
        the events elsewhere, after the outcome). ``event_ids``: the message id
        of each event (0: none), kept with the outcomes' untold note."""
        self.record_results(results, now)
        return None

    def told(self, ids: Collection[int] | None = None) -> None:  # noqa: B027 (optional hook)
        """The events of every outcome :meth:`record_outcomes` recorded are out
        (written to the event log): forget them (only ``ids`` when given). A local spool remembers the
        ids of what it recorded in the same transaction (a shared spool: in
        the outcomes' own script call, per node), until this, so that
        outcomes recorded by a process killed before their events were written
        are told at the next start (:meth:`untold`; on a shared spool also by
        the node that takes its window back, :meth:`untold_of_dead`). A no-op
        by default."""

    def untold(self) -> list[Untold]:
        """At start: the outcomes the last process (a shared spool: under this
        node name) recorded without telling (:meth:`told` never came: it died
        in between), as their rows hold them now; they stay untold until
        :meth:`told`. None by default."""
        return []

    def untold_of_dead(self) -> list[Untold]:
        """While running: what other processes recorded and died before telling,
        handed to this one when their window was taken back (a shared spool's
        nodes); they stay untold until :meth:`told`. None by default (a local
        spool has one supervisor: its next start tells them, :meth:`untold`)."""
        return []

    @abc.abstractmethod
    def release(self, ids: Iterable[int]) -> None:
        """Put in-flight messages back to queued (a worker died, or a stop)."""

    def requeue(self, items: Iterable[tuple[int, float]], now: float) -> None:
        """Put in-flight messages back pending, unattempted: each (id, next_at)
        becomes due at next_at, attempts and last reply unchanged (queued if never
        attempted, else deferred; cancelled if its campaign was). A worker handed
        it back (its site is slow, or a drain). This default only releases them
        (due at once); the backends override it."""
        self.release(i for i, _at in items)

    @abc.abstractmethod
    def recover(self) -> int:
        """At start: every in-flight message (a dead process's window) back to
        pending, each counted as an attempt of unknown outcome (deferred, due
        at once: it may have been sent; :meth:`taken_back` tells them). Returns
        how many."""

    def taken_back(self) -> list[TakenBack]:
        """Messages taken back from dead processes' windows since the last call
        (see :class:`TakenBack`), each returned once (by whichever node asks
        first on a shared spool), for their deferred events."""
        return []

    def renew(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Keep this process's claims its own: a shared backend (Redis) leases them
        per node and the supervisor calls this every tick. A no-op by default."""

    def outage_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mean the backend cannot be reached for now (a shared
        spool's server restarting, a network blip): the supervisor keeps what
        it holds, waits and goes on. None for a local spool."""
        return ()

    def checkpoint_behind(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """While a run delivers: a local spool's housekeeping of its log (SQLite's
        WAL checkpoints) in a thread of its own, off the supervisor's loop, until
        :meth:`checkpoint_soon` or :meth:`close`. A no-op by default."""

    def checkpoint_soon(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """The run is over: :meth:`checkpoint_behind`'s last pass now, while the
        caller goes on (a spool closed next waits for it). A no-op by default."""

    def probe(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """A small write that fails as the next real one would while a local
        spool's storage refuses writes (``SpoolStorageError``): the end of such
        an outage is judged by it. A no-op by default."""

    def intact(self) -> bool:
        """The spool still holds what it held when this object opened it. False
        when a shared spool's server came back without its data (a Redis
        restarted with no persistence or without its AOF, another server at the
        address): every row, campaign and list job it held is gone. Said once:
        from then on the spool as it is now is the one expected. Always True
        for a local spool."""
        return True

    def clock_offset(self) -> float:
        """Seconds a shared spool's clock (Redis TIME) is ahead of this
        process's ``time.time()``; 0.0 for a local spool. Due times, retry
        times and expiry are judged by each node's clock, so nodes must agree."""
        return 0.0

    def bring_forward(
        self, domain: str, now: float, step: float, limit: int, deferred_before: float
    ) -> int:
        """A site of ``domain`` takes mail again: up to ``limit`` of its deferred
        messages due later than ``now``, deferred no later than
        ``deferred_before`` by the site (421, :data:`SITE_STATUSES`) and past
        any wait their reply named, are due from ``now`` on, ``step`` s apart (the
        soonest due first); how many (Redis: from ``P:dfr:DOMAIN``)."""
        return 0

    def write_log_dir(self) -> str | None:
        """Where the workers of the process supervising this spool keep their
        write logs (:class:`fastsend.ring.WriteLog` files), for :meth:`recover`
        after a kill -9 of it all: in-flight mail no log names was never begun
        and goes back with no attempt. None: this spool keeps none (a Redis
        spool keeps them per node in its local dir; a window another host
        takes back after its lease counts whole)."""
        return None

    def release_strays(self, known: Collection[int]) -> int:
        """Back to queued: what this process holds in flight in the spool that
        is none of ``known`` (the supervisor's windows and unwritten outcomes):
        claims whose answers an outage lost. How many; 0 where claims cannot
        be lost (a local spool)."""
        return 0

    def shared_limits(self) -> Any:
        """Rate limits shared by every node on this spool (a
        :class:`fastsend.shared_limits.SharedLimits`), or None: a local spool's
        limits are the supervisor's own."""
        return None

    def shared(self) -> SharedStore | None:
        """Where nodes on this spool keep what they share besides the queue (API
        keys, suppression, webhook outbox, event index, rollups, node registry):
        a :class:`SharedStore`, or None for a spool only this node uses. The one
        way code outside ``fastsend.spool`` learns that a spool is shared."""
        return None

    def reader(self) -> contextlib.AbstractContextManager[Spool]:
        """A view of this spool that another thread may read while this object
        goes on being used where it is (``with spool.reader() as view:
        view.queue_shape(now)``; read calls only): serve's /metrics and dashboard
        count the pending mail in a thread, off the event loop that carries the
        supervisor's dispatch and every request."""
        raise NotImplementedError(f"{type(self).__name__} gives no reader for other threads")

    def stats(self) -> dict[str, int]:
        """Spool-wide counters of a shared spool (``taken_over``: in-flight
        messages put back after their node's lease expired, each a possible
        duplicate); empty for a local spool."""
        return {}

    @abc.abstractmethod
    def counts(self, campaign_id: int | None = None) -> dict[str, int]:
        """Messages per state name."""

    def pending(self) -> dict[str, int]:
        """Messages queued and deferred (what a run has left to send): those two
        of :meth:`counts`, which a backend may count without its final rows."""
        c = self.counts()
        return {"queued": c["queued"], "deferred": c["deferred"]}

    def tally(self, campaign_id: int) -> tuple[int, int] | None:
        """(rows spooled, of which suppressed) of a campaign this object created,
        when every row of it was spooled through this object and nothing else
        has written the spool since it was created: the outcomes this process
        applied to it are then all it has had, and its counts follow from them
        without reading its rows (``engine.run``'s summary). None when that
        cannot be known (this default, another process's write, a cancel)."""
        return None

    @abc.abstractmethod
    def next_due(self) -> float | None:
        """Earliest next attempt time of a pending message of an active campaign."""

    def due_version(self) -> int | None:
        """A number that changes whenever this process makes mail due sooner
        (rows added, deferrals, releases, a campaign resumed): a ``next_due``
        read in the future stands while it is unchanged (claims only make it
        later). None (this default): unknown, read ``next_due`` again."""
        return None

    @abc.abstractmethod
    def queue_shape(self, now: float) -> list[tuple[str, list[int]]]:
        """(domain, counts per age bucket) of pending and in-flight messages."""

    @abc.abstractmethod
    def message(self, message_id: int) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def owner(self, message_id: int) -> tuple[int, str] | None:
        """(campaign id, recipient) of a message, or None: the cheap lookup that
        tracking, bounce and FBL processing make per event."""

    def owners(self, message_ids: Collection[int]) -> dict[int, tuple[int, str]]:
        """:meth:`owner` of each of ``message_ids`` that exists, in one query
        (one round trip on Redis): a provider's event about a message sent to
        a group (Mailgun's names the group's 500 messages) asked one each."""
        out: dict[int, tuple[int, str]] = {}
        for i in message_ids:
            if (got := self.owner(i)) is not None:
                out[i] = got
        return out

    @abc.abstractmethod
    def settle(self, message_ids: Collection[int], text: str) -> list[int]:
        """Those of ``message_ids`` deferred and not claimed (due again later)
        made delivered (250 2.0.0, ``text``), in one transaction (one script on
        Redis): a provider's event shows it has them, after a request whose
        answer never came (an unknown outcome, deferred and retried: the
        retry would send them twice). The ids it settled, in order; what is
        queued or final is left as it is, and for what is in flight the
        evidence is kept (``text``, :data:`TAKEN_TTL`) for :meth:`settle_taken`
        (the event came before the request's timeout). The ids settled are
        noted untold in the same transaction, as :meth:`record_outcomes`'
        are, until :meth:`told` (their "delivered" events are written after
        the commit: a kill in between leaves them to :meth:`untold`)."""

    @abc.abstractmethod
    def settle_taken(self, message_ids: Collection[int]) -> dict[int, str]:
        """Of ``message_ids`` (just recorded deferred, their outcome unknown),
        those a provider's event named while they were in flight (:meth:`settle`
        kept its text): delivered now, the evidence dropped, noted untold as
        :meth:`settle`'s. id -> its text."""

    @abc.abstractmethod
    def sibling(self, campaign_id: int, rcpt: str, near_id: int) -> tuple[int, str] | None:
        """(id, recipient) of the campaign's message to ``rcpt`` (case-insensitive)
        whose id is nearest ``near_id``, or None: a bounce for a message shared by
        several recipients names the first row's id and another row's address."""

    @abc.abstractmethod
    def counts_by_campaign(
        self, campaign_ids: Collection[int] | None = None
    ) -> dict[int, dict[str, int]]:
        """Messages per state name of each campaign (None: every campaign)."""

    @abc.abstractmethod
    def pending_domains(
        self, campaign_ids: Collection[int] | None = None, limit: int = 100
    ) -> list[tuple[str, int]]:
        """(domain, pending messages) of the given campaigns (None: all), most
        first, at most ``limit``; pending = queued, in flight or deferred."""

    # -- list ingest jobs ----------------------------------------------------

    @abc.abstractmethod
    def create_ingest(self, campaign_id: int, source: dict[str, Any], total: int) -> int:
        """Record a new list-ingest job (durable on return); returns its id."""

    @abc.abstractmethod
    def get_ingest(self, job_id: int) -> IngestJob | None: ...

    @abc.abstractmethod
    def list_ingests(self, *, unfinished: bool = False) -> list[IngestJob]:
        """Every ingest job (or the running ones), oldest first."""

    @abc.abstractmethod
    def finish_ingest(self, job_id: int, status: str) -> None:
        """Mark a job done (the whole source was read) or abandoned (the rest
        of its source will never be accepted)."""

    @abc.abstractmethod
    def told_ingest(self, job_id: int) -> None:
        """The events of the job's last committed batch are out: clear its
        ``untold`` ids (the rows' transaction set them). No sync needed: a
        clear lost to a crash only tells those events again."""

    # One reader per ingest job: two processes reading on from the same line
    # would spool its rows twice. ``create_ingest`` holds the new job for its
    # creator before another process can see it; ``resume`` (or a restarted
    # ``serve``) holds a job before reading it. A hold ends with
    # ``release_ingest``, ``close`` or the death of the process: a hold left by
    # a killed process never blocks (SQLite: a POSIX lock the kernel drops;
    # Redis: a lease renewed by ``renew`` that expires, taken over at once when
    # its holder ran on this host and is gone).

    @abc.abstractmethod
    def hold_ingest(self, job_id: int) -> None:
        """Become the only reader of a job; :class:`IngestBusy` names the live
        process that is. Holding a job this spool object holds already is a no-op."""

    @abc.abstractmethod
    def release_ingest(self, job_id: int) -> None:
        """Stop being the job's reader (no-op if not held)."""

    def hold_supervisor(self, command: str) -> None:  # noqa: B027 (optional hook)
        """Become the one process supervising this spool (claims, recovery,
        accepting as ``send``/``resume``/``serve``) until :meth:`close` or death;
        :class:`SpoolBusy` names the live one. SQLite: a POSIX lock the kernel
        drops when its holder dies. A shared spool (Redis) has a supervisor per
        node by design (leases keep their claims apart): a no-op."""

    def hold_local_dir(self, directory: str, command: str) -> None:  # noqa: B027 (optional hook)
        """A node of a shared spool: make its local ``directory`` (the event log and
        the listeners' marks into it, suppression.db, secret.key, shaping state)
        this process's alone until :meth:`close` or death; :class:`LocalDirBusy`
        names the live holder. A local spool's directory is held by
        :meth:`hold_supervisor` already: a no-op."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def abandon(self) -> None:
        """Close without another call to a shared spool known to be out of
        reach (a paused Redis would hold each for the client's timeout, with
        retries): what this node holds is queued again when its lease lapses.
        A local spool closes as usual."""
        self.close()

    # -- bodies stored once (content-addressed blobs) --------------------------
    # A body sent to many recipients is stored once, by its SHA-256 (hex), and
    # each row's vars is a reference to it (fastsend.wire.blob_ref). Order on
    # accept: put_blob (durable, counts one pending reference), then the rows
    # (add_messages), then ref_blob (records which rows hold it, ends the
    # pending reference). A crash anywhere in between leaves a blob without
    # rows (its pending reference never ends), never a row without its blob.
    # sweep_blobs deletes a blob only when no reference is pending, it was not
    # put again within ``retention`` and every row holding it is final and has
    # been for ``retention``. A reference still pending ``grace`` after the
    # blob's last put belongs to an accept that died: the sweep then finds the
    # rows that hold the blob (those the dead accept spooled, if any), records
    # them and ends the pending references, so the blob goes once they are
    # final like any other (a full scan of the rows: rare, only after a crash).
    # These defaults keep blobs in memory; SQLite and Redis store them.

    def put_blob(self, digest: str, data: bytes, now: float) -> None:
        """Store ``data`` under ``digest`` (if absent), durable on return, with one
        more pending reference; ``now`` marks it as just used."""
        mem = self.__dict__.setdefault("_blobs", {})
        ent = mem.setdefault(digest, [data, now, 0, []])
        ent[1], ent[2] = now, ent[2] + 1

    # Whether put_blob_aside may be called from another thread than the spool's.
    blobs_aside = False

    def put_blob_aside(self, digest: str, data: bytes, now: float) -> None:
        """:meth:`put_blob` from a thread other than the one that uses the spool (a
        large body written off serve's loop: ``Acceptor.stow``), when
        :attr:`blobs_aside`. This default: the same call."""
        self.put_blob(digest, data, now)

    def ref_blob_aside(self, digest: str, ids: Iterable[int]) -> None:
        """:meth:`ref_blob` from another thread, as :meth:`put_blob_aside`."""
        self.ref_blob(digest, ids)

    def ref_blob(self, digest: str, ids: Iterable[int]) -> None:
        """The rows ``ids`` (spooled) hold blob ``digest``: ends one pending reference."""
        ent = self.__dict__.get("_blobs", {}).get(digest)
        if ent is not None:
            ent[2] -= 1
            ent[3].extend(id_runs(sorted(ids)))

    def get_blobs(self, digests: Collection[str]) -> dict[str, bytes]:
        """The stored blobs among ``digests`` (a missing one is absent)."""
        mem = self.__dict__.get("_blobs", {})
        return {d: mem[d][0] for d in digests if d in mem}

    def sweep_blobs(
        self, now: float, retention: float, limit: int = 100, grace: float = ORPHAN_GRACE
    ) -> int:
        """Delete up to ``limit`` blobs no message needs any more (see above);
        returns how many."""
        mem = self.__dict__.get("_blobs", {})
        for ent in mem.values():  # an accept that died (this default keeps no rows)
            if ent[2] > 0 and ent[1] < now - grace:
                ent[2] = 0
        gone = 0
        for d, (_data, touched, pending, runs) in list(mem.items()):
            if gone >= limit:
                break
            if (
                pending <= 0
                and touched < now - retention
                and self._runs_done(runs, now - retention)
            ):
                del mem[d]
                gone += 1
        return gone

    def _runs_done(self, runs: Iterable[tuple[int, int]], before: float) -> bool:
        """Every row in ``runs`` is final and was last updated before ``before``."""
        for first, last in runs:
            for i in range(first, last + 1):
                m = self.message(i)
                if m is not None and (
                    STATE_BY_NAME.get(m["state"], -1) not in FINAL_STATES or m["updated"] >= before
                ):
                    return False
        return True

    # -- retention of final messages ---------------------------------------------
    # A message that is final (delivered, bounced, suppressed, expired, cancelled)
    # is kept ``[spool] final_retention_days`` after its last change (GET
    # /v1/messages/ID, late bounces and complaints found by their id), then
    # deleted by the supervisor a chunk at a time. The counts of a campaign do
    # not change: what was deleted is counted per campaign and state (SQLite:
    # table ``pruned``; Redis counts by counters, never from rows). Ids are never
    # handed out again (SQLite keeps the row with the largest id: its ids are
    # the largest + 1). Nothing pending, in flight or changed since ``before``
    # is touched, whatever its age (a paused campaign keeps its rows).

    def prune_final(self, before: float, limit: int = 2000) -> tuple[int, bool]:
        """Delete final messages last changed before ``before``, looking at about
        ``limit`` messages (oldest first); (how many were deleted, whether more
        may be due now: call again). This default keeps everything."""
        return 0, False

    # -- idempotency keys (fastsend.serve.idempotency) ---------------------------
    # One record per (scope, key), scope being the tenant: reserved by the first
    # request (running, its holder's tag and lease), the parts its attempts
    # accepted (add_messages with an IdemMark), then its answer; a retry finds
    # it. Kept ``ttl`` seconds from the reservation, then gone (SQLite: deleted
    # by sweep_idem; Redis: the key expires). These defaults keep them in memory.

    def idem_begin(
        self, scope: str, key: str, fingerprint: str, now: float, ttl: float, holder: bytes,
        *, lease: float = 30.0, stale: bytes | None = None,
    ) -> IdemRecord | None:  # fmt: skip
        """Reserve ``key`` for the caller (``holder``, its lease ``lease``
        seconds), atomically (of two callers only one reserves):

        - None: it was free (absent or expired) and is now the caller's;
        - a record whose ``holder`` is the caller's: it was running under
          ``stale`` (a holder the caller judged dead, or :data:`IDEM_RELEASED`)
          and the caller took it over, its fingerprint, creation and parts kept
          (the caller continues the request after those parts);
        - else the record as it is (answered, or running under another holder)."""
        mem: dict[tuple[str, str], tuple[IdemRecord, float]] = self.__dict__.setdefault("_idem", {})
        cur = mem.get((scope, key))
        if cur is not None and cur[1] > now:
            rec = cur[0]
            if stale is not None and rec.running and rec.holder == stale:
                rec.holder, rec.lease_left = holder, lease
            return rec
        mem[(scope, key)] = (IdemRecord(fingerprint, holder, now, lease_left=lease), now + ttl)
        return None

    def idem_renew(self, scope: str, key: str, holder: bytes, lease: float) -> bool:
        """Extend the caller's lease on a running key it holds; False when it
        does not hold it any more (taken over, answered or gone)."""
        cur = self.__dict__.get("_idem", {}).get((scope, key))
        if cur is None or cur[0].holder != holder or not cur[0].running:
            return False
        cur[0].lease_left = lease
        return True

    def idem_finish(self, scope: str, key: str, holder: bytes, status: int, body: bytes) -> None:
        """Record the answer of the request ``holder`` reserved ``key`` for
        (durable on return); nothing if another holder took the key over."""
        cur = self.__dict__.get("_idem", {}).get((scope, key))
        if cur is not None and cur[0].holder == holder:
            cur[0].status, cur[0].body = int(status), body

    def idem_drop(self, scope: str, key: str, holder: bytes, *, keep: bool = False) -> None:
        """A request that did not answer with an acceptance gives its key up:
        forgotten when none of its parts was spooled and not ``keep`` (it wrote
        nothing else either: a retry runs anew), else released
        (:data:`IDEM_RELEASED`: the next retry takes it over at once and
        continues after the parts, with the campaign or list job it created)."""
        mem = self.__dict__.get("_idem", {})
        cur = mem.get((scope, key))
        if cur is not None and cur[0].holder == holder and cur[0].running:
            if cur[0].parts or keep:
                cur[0].holder, cur[0].lease_left = IDEM_RELEASED, 0.0
            else:
                del mem[(scope, key)]

    def sweep_idem(self, now: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records; returns how many."""
        mem = self.__dict__.get("_idem", {})
        old = [k for k, (_r, until) in mem.items() if until <= now][:limit]
        for k in old:
            del mem[k]
        return len(old)

    # -- facts about the spool itself ------------------------------------------

    def meta_once(self, key: str, value: str) -> str:
        """The value stored under ``key``; ``value`` is stored first when there
        is none (the first writer wins, on every node of a shared spool): e.g.
        when this installation first ran a format. This default keeps it in
        memory; SQLite and Redis store it."""
        mem: dict[str, str] = self.__dict__.setdefault("_meta", {})
        return mem.setdefault(key, value)

    # -- counters: shaping state that must outlive the process ---------------
    # Guardrail counts per campaign and warm-up counts per (day, IP, provider)
    # survive a restart and, on a shared spool, are shared by every node. Names
    # are short ASCII strings; values integers. These defaults keep them in
    # memory (a backend without storage); SQLite and Redis store them.

    def add_counters(self, deltas: Mapping[str, int]) -> dict[str, int]:
        """Add ``deltas`` to named counters (absent ones start at 0), atomically;
        returns the new totals of those names (other nodes' additions included)."""
        mem: dict[str, int] = self.__dict__.setdefault("_counters", {})
        for k, v in deltas.items():
            mem[k] = mem.get(k, 0) + int(v)
        return {k: mem[k] for k in deltas}

    def counters(self, prefix: str) -> dict[str, int]:
        """Every counter whose name starts with ``prefix``."""
        mem: dict[str, int] = self.__dict__.get("_counters", {})
        return {k: v for k, v in mem.items() if k.startswith(prefix)}

    def drop_counters(self, names: Iterable[str]) -> None:
        mem: dict[str, int] = self.__dict__.get("_counters", {})
        for k in names:
            mem.pop(k, None)

    def senders(self) -> int:
        """How many nodes send from this spool now, this one included (those
        holding claims, each under its lease): what a limit over every node is
        split by (the guardrails' sample). A local spool has one."""
        return 1


def id_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as (first, last) runs of consecutive values."""
    out: list[tuple[int, int]] = []
    if not ids:
        return out
    start = prev = ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            out.append((start, prev))
            start = i
        prev = i
    out.append((start, prev))
    return out


AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
"""qshape-style age buckets in minutes (the last bucket is 'older')."""


def spool_local_dir(url_or_dir: str) -> str:
    """The local directory of a spool: its own directory for SQLite; for a Redis
    URL its ``dir=`` parameter (default ``./spool``). Events, the suppression list,
    the secret and shaping state live there (they are per node)."""
    if is_redis_url(url_or_dir):
        return parse_redis_url(url_or_dir)[1].get("dir") or "./spool"
    return url_or_dir.removeprefix("sqlite:")


class SpoolProxy(Spool):
    """A spool that forwards every call to another one: subclass it to observe
    a spool (metrics time its writes) without touching the backend."""

    def __init__(self, inner: Spool) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        # What only one backend has.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def shared_limits(self) -> Any:
        return self.inner.shared_limits()

    def outage_errors(self) -> tuple[type[BaseException], ...]:
        return self.inner.outage_errors()

    def release_strays(self, known: Collection[int]) -> int:
        return self.inner.release_strays(known)

    def write_log_dir(self) -> str | None:
        return self.inner.write_log_dir()

    def bring_forward(
        self, domain: str, now: float, step: float, limit: int, deferred_before: float
    ) -> int:
        return self.inner.bring_forward(domain, now, step, limit, deferred_before)

    def probe(self) -> None:
        self.inner.probe()

    def checkpoint_behind(self) -> None:
        self.inner.checkpoint_behind()

    def checkpoint_soon(self) -> None:
        self.inner.checkpoint_soon()

    def intact(self) -> bool:
        return self.inner.intact()

    def clock_offset(self) -> float:
        return self.inner.clock_offset()

    def shared(self) -> SharedStore | None:
        return self.inner.shared()

    def reader(self) -> contextlib.AbstractContextManager[Spool]:
        return self.inner.reader()

    def stats(self) -> dict[str, int]:
        return self.inner.stats()

    def create_campaign(
        self,
        spec: dict[str, Any],
        *,
        name: str = "",
        tenant: str = "default",
        options: dict[str, Any] | None = None,
        status: str = "active",
    ) -> int:
        return self.inner.create_campaign(
            spec, name=name, tenant=tenant, options=options, status=status
        )

    def get_campaign(self, campaign_id: int) -> CampaignInfo | None:
        return self.inner.get_campaign(campaign_id)

    def list_campaigns(self) -> list[CampaignInfo]:
        return self.inner.list_campaigns()

    def campaigns(
        self, tenant: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[CampaignInfo]:
        return self.inner.campaigns(tenant, after=after, limit=limit)

    def set_campaign_status(self, campaign_id: int, status: str, reason: str = "") -> None:
        self.inner.set_campaign_status(campaign_id, status, reason)

    def add_messages(
        self,
        campaign_id: int,
        rows: Iterable[tuple[str, str, bytes]],
        now: float,
        *,
        state: int = QUEUED,
        suppressed: Collection[int] = (),
        ingest: IngestMark | None = None,
        idem: IdemMark | None = None,
        fps: Sequence[int] | None = None,
    ) -> list[int]:
        return self.inner.add_messages(
            campaign_id, rows, now, state=state, suppressed=suppressed, ingest=ingest, idem=idem,
            fps=fps,
        )  # fmt: skip

    def spooled_rcpts(self, campaign_id: int) -> Iterator[list[str]]:
        return self.inner.spooled_rcpts(campaign_id)

    def recorded_fps(self, campaign_id: int, fps: Sequence[int]) -> list[bool] | None:
        return self.inner.recorded_fps(campaign_id, fps)

    def claim_due(self, now: float, limit: int) -> list[Claimed]:
        return self.inner.claim_due(now, limit)

    def claim_next(self, now: float, limit: int, key: int = 0) -> list[Claimed]:
        return self.inner.claim_next(now, limit, key)

    def held(self, key: int = 0) -> int:
        return self.inner.held(key)

    def record_results(self, results: Iterable[Result], now: float) -> None:
        self.inner.record_results(results, now)

    def record_outcomes(
        self, results: Iterable[Result], now: float, events: Sequence[bytes] = (),
        event_ids: Sequence[int] = (),
    ) -> int | None:  # fmt: skip
        return self.inner.record_outcomes(results, now, events, event_ids)

    def told(self, ids: Collection[int] | None = None) -> None:
        self.inner.told(ids)

    def untold(self) -> list[Untold]:
        return self.inner.untold()

    def untold_of_dead(self) -> list[Untold]:
        return self.inner.untold_of_dead()

    def release(self, ids: Iterable[int]) -> None:
        self.inner.release(ids)

    def requeue(self, items: Iterable[tuple[int, float]], now: float) -> None:
        self.inner.requeue(items, now)

    def recover(self) -> int:
        return self.inner.recover()

    def taken_back(self) -> list[TakenBack]:
        return self.inner.taken_back()

    def renew(self) -> None:
        self.inner.renew()

    def counts(self, campaign_id: int | None = None) -> dict[str, int]:
        return self.inner.counts(campaign_id)

    def pending(self) -> dict[str, int]:
        return self.inner.pending()

    def tally(self, campaign_id: int) -> tuple[int, int] | None:
        return self.inner.tally(campaign_id)

    def next_due(self) -> float | None:
        return self.inner.next_due()

    def queue_shape(self, now: float) -> list[tuple[str, list[int]]]:
        return self.inner.queue_shape(now)

    def message(self, message_id: int) -> dict[str, Any] | None:
        return self.inner.message(message_id)

    def owner(self, message_id: int) -> tuple[int, str] | None:
        return self.inner.owner(message_id)

    def owners(self, message_ids: Collection[int]) -> dict[int, tuple[int, str]]:
        return self.inner.owners(message_ids)

    def settle(self, message_ids: Collection[int], text: str) -> list[int]:
        return self.inner.settle(message_ids, text)

    def settle_taken(self, message_ids: Collection[int]) -> dict[int, str]:
        return self.inner.settle_taken(message_ids)

    def sibling(self, campaign_id: int, rcpt: str, near_id: int) -> tuple[int, str] | None:
        return self.inner.sibling(campaign_id, rcpt, near_id)

    def counts_by_campaign(
        self, campaign_ids: Collection[int] | None = None
    ) -> dict[int, dict[str, int]]:
        return self.inner.counts_by_campaign(campaign_ids)

    def pending_domains(
        self, campaign_ids: Collection[int] | None = None, limit: int = 100
    ) -> list[tuple[str, int]]:
        return self.inner.pending_domains(campaign_ids, limit)

    def create_ingest(self, campaign_id: int, source: dict[str, Any], total: int) -> int:
        return self.inner.create_ingest(campaign_id, source, total)

    def get_ingest(self, job_id: int) -> IngestJob | None:
        return self.inner.get_ingest(job_id)

    def list_ingests(self, *, unfinished: bool = False) -> list[IngestJob]:
        return self.inner.list_ingests(unfinished=unfinished)

    def finish_ingest(self, job_id: int, status: str) -> None:
        self.inner.finish_ingest(job_id, status)

    def told_ingest(self, job_id: int) -> None:
        self.inner.told_ingest(job_id)

    def meta_once(self, key: str, value: str) -> str:
        return self.inner.meta_once(key, value)

    def put_blob(self, digest: str, data: bytes, now: float) -> None:
        self.inner.put_blob(digest, data, now)

    @property
    def blobs_aside(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "blobs_aside", False))

    def put_blob_aside(self, digest: str, data: bytes, now: float) -> None:
        self.inner.put_blob_aside(digest, data, now)

    def ref_blob_aside(self, digest: str, ids: Iterable[int]) -> None:
        self.inner.ref_blob_aside(digest, ids)

    def ref_blob(self, digest: str, ids: Iterable[int]) -> None:
        self.inner.ref_blob(digest, ids)

    def get_blobs(self, digests: Collection[str]) -> dict[str, bytes]:
        return self.inner.get_blobs(digests)

    def sweep_blobs(
        self, now: float, retention: float, limit: int = 100, grace: float = ORPHAN_GRACE
    ) -> int:
        return self.inner.sweep_blobs(now, retention, limit, grace)

    def hold_ingest(self, job_id: int) -> None:
        self.inner.hold_ingest(job_id)

    def hold_supervisor(self, command: str) -> None:
        self.inner.hold_supervisor(command)

    def hold_local_dir(self, directory: str, command: str) -> None:
        self.inner.hold_local_dir(directory, command)

    def idem_begin(
        self, scope: str, key: str, fingerprint: str, now: float, ttl: float, holder: bytes,
        *, lease: float = 30.0, stale: bytes | None = None,
    ) -> IdemRecord | None:  # fmt: skip
        return self.inner.idem_begin(
            scope, key, fingerprint, now, ttl, holder, lease=lease, stale=stale
        )

    def idem_renew(self, scope: str, key: str, holder: bytes, lease: float) -> bool:
        return self.inner.idem_renew(scope, key, holder, lease)

    def idem_finish(self, scope: str, key: str, holder: bytes, status: int, body: bytes) -> None:
        self.inner.idem_finish(scope, key, holder, status, body)

    def idem_drop(self, scope: str, key: str, holder: bytes, *, keep: bool = False) -> None:
        self.inner.idem_drop(scope, key, holder, keep=keep)

    def sweep_idem(self, now: float, limit: int = 1000) -> int:
        return self.inner.sweep_idem(now, limit)

    def prune_final(self, before: float, limit: int = 2000) -> tuple[int, bool]:
        return self.inner.prune_final(before, limit)

    def release_ingest(self, job_id: int) -> None:
        self.inner.release_ingest(job_id)

    def add_counters(self, deltas: Mapping[str, int]) -> dict[str, int]:
        return self.inner.add_counters(deltas)

    def counters(self, prefix: str) -> dict[str, int]:
        return self.inner.counters(prefix)

    def drop_counters(self, names: Iterable[str]) -> None:
        self.inner.drop_counters(names)

    def senders(self) -> int:
        return self.inner.senders()

    def close(self) -> None:
        self.inner.close()

    def abandon(self) -> None:
        self.inner.abandon()
