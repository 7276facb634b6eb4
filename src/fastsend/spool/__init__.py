"""The spool: where accepted mail lives until it is final.

:class:`Spool` is the seam between the scheduler and storage. The embedded
default is :class:`fastsend.spool.sqlite.SQLiteSpool`; a shared multi-node
backend (Redis) implements the same methods. Nothing outside ``spool/`` knows
which one is in use, and nothing outside ``spool/`` writes SQL.

What it deliberately does not do: render messages, speak SMTP, decide retry
times (the scheduler passes the decided state and next time in).
"""

from __future__ import annotations

import os

from fastsend.redisurl import foreign_url
from fastsend.spool.base import (
    ABANDONED,
    AGE_BUCKETS_MIN,
    BOUNCED,
    CAMPAIGN_STATUSES,
    CANCELLED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    FINAL_STATES,
    IDEM_RELEASED,
    INFLIGHT,
    INGEST_STATUSES,
    PENDING_STATES,
    QUEUED,
    REDIS_PARAMS,
    SITE_STATUSES,
    STAGING,
    STATE_BY_NAME,
    STATE_NAMES,
    SUPPRESSED,
    UNKNOWN_CODE,
    UNKNOWN_ENHANCED,
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
    SpoolLocked,
    SpoolProxy,
    SpoolStorageError,
    TakenBack,
    Untold,
    is_redis_url,
    parse_redis_url,
    spool_local_dir,
    storage_problem,
)

__all__ = [
    "ABANDONED",
    "AGE_BUCKETS_MIN",
    "BOUNCED",
    "CAMPAIGN_STATUSES",
    "CANCELLED",
    "DEFERRED",
    "DELIVERED",
    "EXPIRED",
    "FINAL_STATES",
    "IDEM_RELEASED",
    "INFLIGHT",
    "INGEST_STATUSES",
    "PENDING_STATES",
    "QUEUED",
    "REDIS_PARAMS",
    "SITE_STATUSES",
    "STAGING",
    "STATE_BY_NAME",
    "STATE_NAMES",
    "SUPPRESSED",
    "UNKNOWN_CODE",
    "UNKNOWN_ENHANCED",
    "CampaignInfo",
    "Claimed",
    "FpsChanged",
    "IdemLost",
    "IdemMark",
    "IdemRecord",
    "IngestBusy",
    "IngestJob",
    "IngestLost",
    "IngestMark",
    "LocalDirBusy",
    "Result",
    "SharedStore",
    "Spool",
    "SpoolBusy",
    "SpoolError",
    "SpoolLocked",
    "SpoolProxy",
    "SpoolStorageError",
    "TakenBack",
    "Untold",
    "is_redis_url",
    "open_spool",
    "parse_redis_url",
    "spool_local_dir",
    "storage_problem",
]


def open_spool(url_or_dir: str, *, readonly: bool = False, must_exist: bool = False) -> Spool:
    """Open the spool named by a directory path (SQLite), ``sqlite:PATH``, or a
    ``redis://`` / ``rediss://`` / ``unix://`` URL (the shared multi-node spool,
    :mod:`fastsend.spool.redis`). ``readonly``: a view for tools that only look
    (SQLite opens the file read-only; Redis is written nothing at the open, so a
    replica serves it). ``must_exist``: SpoolError instead of creating an empty
    spool (implied by ``readonly``; on Redis: no spool under the URL's prefix)."""
    if (foreign := foreign_url(url_or_dir)) is not None:
        raise SpoolError(foreign)
    if is_redis_url(url_or_dir):
        from fastsend.spool.redis import RedisSpool

        return RedisSpool(url_or_dir, must_exist=must_exist or readonly, readonly=readonly)
    from fastsend.spool.sqlite import SQLiteSpool

    path = url_or_dir.removeprefix("sqlite:")
    if os.path.exists(path) and not os.path.isdir(path):
        # (was "cannot be opened: [Errno 17] File exists", or "no spool")
        raise SpoolError(f"the spool at {path!r} is not a directory: a file is there")
    if must_exist and not os.path.exists(os.path.join(path, "spool.db")):
        raise SpoolError(f"no spool at {path!r}")
    return SQLiteSpool(path, readonly=readonly)
