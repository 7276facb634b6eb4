"""The spool: where accepted mail lives until it is final.

:class:`Spool` is the seam between the scheduler and storage. The embedded
default is :class:`fastsend.spool.sqlite.SQLiteSpool`; a shared multi-node
backend (Redis) implements the same methods. Nothing outside ``spool/`` knows
which one is in use, and nothing outside ``spool/`` writes SQL.

What it deliberately does not do: render messages, speak SMTP, decide retry
times (the scheduler passes the decided state and next time in).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(slots=True)
class Claimed:
    """A message taken from the spool for one delivery attempt."""

    id: int
    campaign: int
    rcpt: str
    domain: str
    vars: bytes  # orjson-encoded dict of the recipient's variables
    attempts: int  # attempts made before this one
    created: float


@dataclass(slots=True)
class Result:
    """What the scheduler decided for one message after an attempt."""

    id: int
    state: int
    attempts: int
    next_at: float
    code: int = 0
    enhanced: str = ""
    text: str = ""


@dataclass(slots=True)
class CampaignInfo:
    id: int
    name: str
    tenant: str
    created: float
    status: str  # active / paused / cancelled
    spec: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


class Spool(abc.ABC):
    """Durable storage of campaigns and messages. Every write is durable on return."""

    @abc.abstractmethod
    def create_campaign(
        self,
        spec: dict[str, Any],
        *,
        name: str = "",
        tenant: str = "default",
        options: dict[str, Any] | None = None,
    ) -> int: ...

    @abc.abstractmethod
    def get_campaign(self, campaign_id: int) -> CampaignInfo | None: ...

    @abc.abstractmethod
    def list_campaigns(self) -> list[CampaignInfo]: ...

    @abc.abstractmethod
    def set_campaign_status(self, campaign_id: int, status: str) -> None: ...

    @abc.abstractmethod
    def add_messages(
        self,
        campaign_id: int,
        rows: Iterable[tuple[str, str, bytes]],
        now: float,
        *,
        state: int = QUEUED,
    ) -> list[int]:
        """Spool (rcpt, domain, vars) rows; durable when it returns their ids."""

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int) -> list[Claimed]:
        """Take up to ``limit`` due messages (queued/deferred, next_at <= now) of
        active campaigns, oldest due first, and mark them in flight."""

    @abc.abstractmethod
    def record_results(self, results: Iterable[Result], now: float) -> None:
        """Apply attempt outcomes (one transaction)."""

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
        """At start: every in-flight message back to queued. Returns how many."""

    def renew(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Keep this process's claims its own: a shared backend (Redis) leases them
        per node and the supervisor calls this every tick. A no-op by default."""

    def shared_limits(self) -> Any:
        """Rate limits shared by every node on this spool (a
        :class:`fastsend.shared_limits.SharedLimits`), or None: a local spool's
        limits are the supervisor's own."""
        return None

    @abc.abstractmethod
    def counts(self, campaign_id: int | None = None) -> dict[str, int]:
        """Messages per state name."""

    @abc.abstractmethod
    def next_due(self) -> float | None:
        """Earliest next attempt time of a pending message of an active campaign."""

    @abc.abstractmethod
    def queue_shape(self, now: float) -> list[tuple[str, list[int]]]:
        """(domain, counts per age bucket) of pending and in-flight messages."""

    @abc.abstractmethod
    def message(self, message_id: int) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

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


AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
"""qshape-style age buckets in minutes (the last bucket is 'older')."""


def is_redis_url(url_or_dir: str) -> bool:
    return url_or_dir.startswith(("redis://", "rediss://", "unix://"))


def open_spool(url_or_dir: str) -> Spool:
    """Open the spool named by a directory path (SQLite), ``sqlite:PATH``, or a
    ``redis://`` / ``rediss://`` / ``unix://`` URL (the shared multi-node spool,
    :mod:`fastsend.spool.redis`)."""
    if is_redis_url(url_or_dir):
        from fastsend.spool.redis import RedisSpool

        return RedisSpool(url_or_dir)
    from fastsend.spool.sqlite import SQLiteSpool

    path = url_or_dir.removeprefix("sqlite:")
    return SQLiteSpool(path)


def spool_local_dir(url_or_dir: str) -> str:
    """The local directory of a spool: its own directory for SQLite; for a Redis
    URL its ``dir=`` parameter (default ``./spool``). Events, the suppression list,
    the secret and shaping state live there (they are per node)."""
    if is_redis_url(url_or_dir):
        from urllib.parse import parse_qs, urlsplit

        return parse_qs(urlsplit(url_or_dir).query).get("dir", ["./spool"])[0] or "./spool"
    return url_or_dir.removeprefix("sqlite:")
