"""Where rollups live: :class:`RollupStore` (the seam), its SQLite and Redis forms.

NAME
    fastsend.analytics.store -- RollupStore, SQLiteRollupStore (open_store: .stores).

DESCRIPTION
    A rollup row is a bucket (granularity ``g`` in seconds: 60, 3600 or
    86400, and its start ``t``) of one (tenant, campaign, provider, source
    IP), holding the counters named by :data:`COUNTERS`. Each bucket also
    has all-campaigns rows (campaign :data:`ALL`) per (tenant, provider,
    source IP): a question that neither groups nor filters by campaign reads
    only those (the stores choose, so nothing is counted twice). Beside them:

    - reasons: (bucket, dims, kind "bounced"/"deferred", reason) -> n;
    - gauges: (bucket, tenant, name) -> last value (queue depth, age);
    - firsts: (kind, message id) seen once, for unique opens and clicks.

    :meth:`RollupStore.add` adds counts (upsert, never replaces), one
    transaction per call (the caller batches a second of events into one
    call). :meth:`first_seen` answers which (kind, id) pairs are new and
    records them. :meth:`aggregate` sums counters over whole buckets of one
    granularity, grouped by the asked dimensions and optionally by bucket.

    The SQLite form is ``<spool dir>/rollups.db`` (WAL, synchronous=NORMAL:
    a power loss can lose the last second of counts, never corrupt them);
    :mod:`fastsend.analytics.store_redis` is the form beside a Redis spool.

DELIBERATELY NOT HERE
    No rates, no time-range planning (:mod:`fastsend.analytics.query`), no
    event parsing (:mod:`fastsend.analytics.rollup`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence
from typing import Any

from fastsend.spool.base import storage_problem
from fastsend.sqlitedb import connect, transaction

COUNTERS: tuple[str, ...] = (
    "accepted", "delivered", "deferred", "bounced", "bounced_hard", "bounced_soft",
    "expired", "suppressed", "complaints", "unsubscribes",
    "opens", "opens_unique", "opens_machine", "opens_machine_unique",
    "clicks", "clicks_unique", "clicks_machine", "clicks_machine_unique",
)  # fmt: skip
NC = len(COUNTERS)
IDX = {name: i for i, name in enumerate(COUNTERS)}
DIMS = ("campaign", "provider", "source_ip")
ALL = -1  # the campaign of all-campaigns rows (written beside each campaign's rows)
GRANULARITIES = {"minute": 60, "hour": 3600, "day": 86400}
# Default retention per granularity, in days ([analytics] minute_days, ...).
RETENTION_DAYS = {60: 8, 3600: 120, 86400: 800}



def store_outage(e: BaseException) -> str | None:
    """What is wrong with a rollup store when ``e`` is an outage of it, for a line
    said once ("is full", "is out of reach or refuses writes (...)"); None for
    any other error (a bug: its traceback is worth logging). A full disk, a
    read-only file system, an I/O error (SQLite's codes too), and any Redis
    error: out of reach, or answering without taking writes (READONLY, MISCONF,
    NOREPLICAS, OOM, BUSY; the spool client raises its own subclass of
    redis-py's errors for some, so the class's whole lineage is looked at, not
    its own module: ``redis`` is not imported here)."""
    problem = storage_problem(e)
    if problem is not None:
        return f"{problem} ({e})"
    if isinstance(e, OSError) or any(
        c.__module__.partition(".")[0] == "redis" for c in type(e).__mro__
    ):
        return f"is out of reach or refuses writes ({type(e).__name__}: {e})"
    return None


# One rollup key: (tenant, campaign, provider, source_ip).
Key = tuple[str, int, str, str]
# add(): {(g, t, key): counts}, {(g, t, key, kind, reason): n}, {(g, t, tenant, name): value}
Counts = dict[tuple[int, int, Key], list[int]]
Reasons = dict[tuple[int, int, Key, str, str], int]
Gauges = dict[tuple[int, int, str, str], float]


class RollupStore(abc.ABC):
    """The durable side of the rollups; every method is one round trip or transaction."""

    @abc.abstractmethod
    def add(self, counts: Counts, reasons: Reasons, gauges: Gauges,
            marks: dict[str, str] | None = None) -> None:  # fmt: skip
        """Add ``counts`` and ``reasons`` to their buckets, set ``gauges``; durable on return
        (to the store's sync level). ``marks``: states of scope ``logmark`` (how far into
        an event log the counts go) written in the same step as the counts."""

    @abc.abstractmethod
    def first_seen(self, pairs: Sequence[tuple[int, int]], t: int) -> list[bool]:
        """For each (kind, message id): True if never seen before (and now recorded)."""

    @abc.abstractmethod
    def aggregate(
        self,
        g: int,
        t0: int,
        t1: int,
        tenant: str,
        filters: dict[str, Any],
        dims: Sequence[str],
        by_time: bool,
    ) -> list[tuple[tuple[Any, ...], list[int]]]:
        """Sums of the counters over buckets of granularity ``g`` starting in [t0, t1),
        grouped by ``dims`` (names of :data:`DIMS`), with the bucket start first in the
        group when ``by_time``. ``filters``: dim name -> value or list of values."""

    @abc.abstractmethod
    def reasons(
        self, g: int, t0: int, t1: int, tenant: str, filters: dict[str, Any], by_time: bool
    ) -> list[tuple[tuple[Any, ...], int]]:
        """((t?, kind, reason), n) over the range (t first when ``by_time``)."""

    @abc.abstractmethod
    def gauges(self, g: int, t0: int, t1: int, tenant: str) -> list[tuple[int, str, float]]:
        """(bucket start, name, value) of the tenant's gauges in the range."""

    @abc.abstractmethod
    def prune(self, now: float, retention: dict[int, float]) -> int:
        """Drop buckets older than their granularity's retention (days); rows dropped."""

    @abc.abstractmethod
    def states(self, scope: str) -> dict[str, str]:
        """Every kept state of ``scope`` (``alarm``: a raised rate alarm's level,
        ``dnsbl``: a listed IP), key -> value: what a restart or another node knows."""

    @abc.abstractmethod
    def set_state(self, scope: str, key: str, was: str, value: str) -> bool:
        """Move ``key`` from ``was`` to ``value`` ("" = none) if it is ``was`` now, in one
        atomic step; False when it is not (another node moved it): the caller that
        gets True is the one that tells (one event per change, whatever the nodes)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS counts (
    g INTEGER NOT NULL, t INTEGER NOT NULL, tenant TEXT NOT NULL, campaign INTEGER NOT NULL,
    provider TEXT NOT NULL, source_ip TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COUNTERS)},
    PRIMARY KEY (g, tenant, t, campaign, provider, source_ip)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reasons (
    g INTEGER NOT NULL, t INTEGER NOT NULL, tenant TEXT NOT NULL, campaign INTEGER NOT NULL,
    provider TEXT NOT NULL, source_ip TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (g, tenant, t, campaign, provider, source_ip, kind, reason)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gauges (
    g INTEGER NOT NULL, t INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (g, tenant, t, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS firsts (
    kind INTEGER NOT NULL, msg INTEGER NOT NULL, t INTEGER NOT NULL,
    PRIMARY KEY (kind, msg)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS firsts_t ON firsts(t);
CREATE TABLE IF NOT EXISTS states (
    scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
"""

_UPSERT = (
    f"INSERT INTO counts (g, t, tenant, campaign, provider, source_ip, {', '.join(COUNTERS)})"
    f" VALUES (?,?,?,?,?,?,{','.join('?' * NC)})"
    " ON CONFLICT (g, tenant, t, campaign, provider, source_ip) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
)
_UPSERT_REASON = (
    "INSERT INTO reasons VALUES (?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (g, tenant, t, campaign, provider, source_ip, kind, reason)"
    " DO UPDATE SET n = n + excluded.n"
)
_SUMS = ", ".join(f"SUM({c})" for c in COUNTERS)


def uses_campaigns(filters: dict[str, Any], dims: Sequence[str]) -> bool:
    """Whether a question needs per-campaign rows; otherwise the all-campaigns rows
    (campaign ``ALL``) answer it, one row where there were one per campaign."""
    return "campaign" in dims or "campaign" in filters


def _where(filters: dict[str, Any], args: list[Any], dims: Sequence[str] = ()) -> str:
    sql = " AND campaign >= 0" if uses_campaigns(filters, dims) else f" AND campaign = {ALL}"
    for dim, v in filters.items():
        if dim not in DIMS:
            raise ValueError(dim)
        vals = list(v) if isinstance(v, list | tuple | set | frozenset) else [v]
        if not vals:
            return " AND 0"
        sql += f" AND {dim} IN ({','.join('?' * len(vals))})"
        args.extend(vals)
    return sql


class SQLiteRollupStore(RollupStore):
    def __init__(self, spool_dir: str, *, readonly: bool = False) -> None:
        self.path = os.path.join(spool_dir, "rollups.db")
        if readonly and not os.path.exists(self.path):
            raise FileNotFoundError(self.path)
        self.db = connect(self.path, readonly=readonly, synchronous="NORMAL", schema=_SCHEMA)

    def add(self, counts: Counts, reasons: Reasons, gauges: Gauges,
            marks: dict[str, str] | None = None) -> None:  # fmt: skip
        if not counts and not reasons and not gauges and not marks:
            return
        db = self.db
        with transaction(db, immediate=False):
            if marks:
                db.executemany("INSERT OR REPLACE INTO states VALUES ('logmark', ?, ?)",
                               list(marks.items()))  # fmt: skip
            if counts:
                db.executemany(_UPSERT, [(g, t, *k, *row) for (g, t, k), row in counts.items()])
            if reasons:
                db.executemany(
                    _UPSERT_REASON,
                    [(g, t, *k, kind, r, n) for (g, t, k, kind, r), n in reasons.items()],
                )
            if gauges:
                db.executemany(
                    "INSERT OR REPLACE INTO gauges VALUES (?,?,?,?,?)",
                    [(g, t, tenant, name, v) for (g, t, tenant, name), v in gauges.items()],
                )

    def first_seen(self, pairs: Sequence[tuple[int, int]], t: int) -> list[bool]:
        if not pairs:
            return []
        db = self.db
        out = []
        with transaction(db, immediate=False):
            for kind, msg in pairs:
                cur = db.execute(
                    "INSERT INTO firsts VALUES (?,?,?) ON CONFLICT DO NOTHING", (kind, msg, t)
                )
                out.append(cur.rowcount == 1)
        return out

    def aggregate(
        self,
        g: int,
        t0: int,
        t1: int,
        tenant: str,
        filters: dict[str, Any],
        dims: Sequence[str],
        by_time: bool,
    ) -> list[tuple[tuple[Any, ...], list[int]]]:
        for d in dims:
            if d not in DIMS:
                raise ValueError(d)
        cols = (["t"] if by_time else []) + list(dims)
        args: list[Any] = [g, tenant, t0, t1]
        sql = (
            f"SELECT {', '.join([*cols, _SUMS])} FROM counts"
            " WHERE g = ? AND tenant = ? AND t >= ? AND t < ?" + _where(filters, args, dims)
        )
        if cols:
            sql += f" GROUP BY {', '.join(cols)}"
        n = len(cols)
        return [
            (tuple(r[:n]), [int(x or 0) for x in r[n:]])
            for r in self.db.execute(sql, args)
            if r[n] is not None
        ]

    def reasons(
        self, g: int, t0: int, t1: int, tenant: str, filters: dict[str, Any], by_time: bool
    ) -> list[tuple[tuple[Any, ...], int]]:
        cols = (["t"] if by_time else []) + ["kind", "reason"]
        args: list[Any] = [g, tenant, t0, t1]
        sql = (
            f"SELECT {', '.join(cols)}, SUM(n) FROM reasons"
            " WHERE g = ? AND tenant = ? AND t >= ? AND t < ?"
            + _where(filters, args)
            + f" GROUP BY {', '.join(cols)}"
        )
        return [(tuple(r[:-1]), int(r[-1])) for r in self.db.execute(sql, args)]

    def gauges(self, g: int, t0: int, t1: int, tenant: str) -> list[tuple[int, str, float]]:
        return [
            (int(t), str(name), float(v))
            for t, name, v in self.db.execute(
                "SELECT t, name, value FROM gauges WHERE g = ? AND tenant = ? AND t >= ?"
                " AND t < ? ORDER BY t",
                (g, tenant, t0, t1),
            )
        ]

    def states(self, scope: str) -> dict[str, str]:
        rows = self.db.execute("SELECT key, value FROM states WHERE scope = ?", (scope,))
        return {str(k): str(v) for k, v in rows}

    def set_state(self, scope: str, key: str, was: str, value: str) -> bool:
        db = self.db
        with transaction(db):
            r = db.execute("SELECT value FROM states WHERE scope = ? AND key = ?",
                           (scope, key)).fetchone()  # fmt: skip
            if (r[0] if r else "") != was:
                return False
            if value:
                db.execute("INSERT OR REPLACE INTO states VALUES (?,?,?)", (scope, key, value))
            else:
                db.execute("DELETE FROM states WHERE scope = ? AND key = ?", (scope, key))
        return True

    def prune(self, now: float, retention: dict[int, float]) -> int:
        n = 0
        db = self.db
        # Per tenant, so each DELETE is a range of the primary key (g, tenant, t, ...);
        # the tenants are read from the day rows (few).
        tenants = [r[0] for r in db.execute("SELECT DISTINCT tenant FROM counts WHERE g = 86400")]
        tenants += [r[0] for r in db.execute("SELECT DISTINCT tenant FROM gauges WHERE g = 86400")]
        for g, days in retention.items():
            before = int(now - days * 86400)
            for tenant in set(tenants):
                for table in ("counts", "reasons", "gauges"):
                    n += db.execute(
                        f"DELETE FROM {table} WHERE g = ? AND tenant = ? AND t < ?",
                        (g, tenant, before),
                    ).rowcount
        oldest = max(retention.values(), default=0)
        n += db.execute("DELETE FROM firsts WHERE t < ?", (int(now - oldest * 86400),)).rowcount
        return n

    def close(self) -> None:
        self.db.close()


def merge_rows(
    into: dict[Any, list[int]], rows: Iterable[tuple[tuple[Any, ...], list[int]]]
) -> None:
    for key, row in rows:
        acc = into.get(key)
        if acc is None:
            into[key] = list(row)
        else:
            for i, v in enumerate(row):
                acc[i] += v
