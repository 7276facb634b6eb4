"""Open the rollup store beside a spool: :func:`open_store` picks the SQLite
form (:mod:`fastsend.analytics.store`) or the Redis one
(:mod:`fastsend.analytics.store_redis`). Kept apart from both so that neither
imports the other."""

from __future__ import annotations

from typing import Any

from fastsend.analytics.store import RollupStore, SQLiteRollupStore
from fastsend.analytics.store_redis import RedisRollupStore
from fastsend.spool import is_redis_url, spool_local_dir


def open_store(
    spool: str | Any, local_dir: str | None = None, *, readonly: bool = False
) -> RollupStore:
    """The store beside a spool: a shared spool (``Spool.shared()``, or a
    ``redis://`` URL) gets the Redis form under the spool's prefix; otherwise
    ``<dir>/rollups.db``."""
    if isinstance(spool, str):
        if is_redis_url(spool):
            return RedisRollupStore.from_url(spool)
        return SQLiteRollupStore(local_dir or spool_local_dir(spool), readonly=readonly)
    shared = spool.shared()
    if shared is not None:
        return RedisRollupStore(shared.client, shared.prefix)
    path = local_dir or getattr(spool, "directory", None) or "."
    return SQLiteRollupStore(str(path), readonly=readonly)
