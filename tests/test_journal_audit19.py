"""Event log and notice journal audit, session 19: marks kept under the key of an
older version, the event log's schema version, the non-delivery notice journal.

Real parts: the event log file, the SQLite webhook outbox and rollup store,
``fastsend serve`` with its submission listener delivering to fastsend's sink.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson


def _evs(kind: str, ids: range) -> list[dict[str, Any]]:
    t = time.time()
    return [{"time": t, "event": kind, "id": i, "campaign": 1, "rcpt": f"r{i}@example.org",
             "source_ip": "127.0.0.2", "mx": "mx.example.org", "code": 250}
            for i in ids]  # fmt: skip


def test_webhooks_and_rollups_catch_up_from_their_marks_of_before_the_node_id(
    tmp_path: Path,
) -> None:
    """The webhook outbox and the rollups keep how far into the event log they went
    under a key naming the node's id (events.mark_key); the version before kept it
    under this host's name and the log's path. A kill -9 just before an upgrade left
    the last events under the old key, and the first start after it found no mark:
    200 deliveries never sent to the webhooks nor counted. Both read the old key
    then (once: a later start does not read it again)."""
    from fastsend.analytics.query import make_query, run_query
    from fastsend.config import from_dict
    from fastsend.events import legacy_mark_key, mark_key
    from fastsend.serve.context import open_context
    from fastsend.serve.webhooks import WebhookDispatcher

    spool = tmp_path / "spool"
    cfg = from_dict({"spool": {"dir": str(spool)},
                     "webhooks": {"urls": ["http://127.0.0.1:9/hook"],  # down: kept
                                  "secret": "0123456789abcdefghij", "retry_min": 60}})  # fmt: skip
    path = str(spool / "events.jsonl")

    def delivered(store: Any) -> int:
        now = time.time()
        q = make_query("*", {"from": str(int(now) - 3600), "dims": ""}, now + 60)
        return int(run_query(store, q)["totals"]["counts"]["delivered"])

    async def stop(d: Any) -> None:  # a kill -9: no last flush, nothing closed
        for t in [*d._tasks, *d._senders.values()]:
            t.cancel()
        await d._session.close()

    async def main() -> None:
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        ctx.events.emit_many(_evs("delivered", range(300)))
        ctx.events.flush()
        d._flush()
        ctx.rollups.flush()
        ctx.events.emit_many(_evs("delivered", range(300, 500)))
        ctx.events.flush()  # in the log only: kill -9
        await stop(d)
        # As the version before left them: each mark under host:path.
        new, old = mark_key(path), legacy_mark_key(path)
        for db, sql in (("webhooks.db", "UPDATE marks SET log=? WHERE log=?"),
                        ("rollups.db", "UPDATE states SET key=? WHERE key=?")):  # fmt: skip
            with sqlite3.connect(spool / db) as c:
                assert c.execute(sql, (old, new)).rowcount == 1
        for _ in range(2):  # the upgraded start, then a clean stop and a start again
            ctx = open_context(cfg)
            d = WebhookDispatcher(ctx)
            await d.start()
            try:
                assert d.outbox is not None
                ids = [orjson.loads(b)["id"] for _i, b in d.outbox.fetch_all(-1, 10_000)]
                assert ids == list(range(500))  # each once, in order
                assert delivered(ctx.rollups.store) == 500
                assert old not in d.outbox.marks() and new in d.outbox.marks()
            finally:
                await d.stop()
                ctx.close()

    asyncio.run(main())
