"""Monitoring audit, session 17: webhooks' event names, the event log's catch-up
after a copytruncate rotation, blocklist rests lifted on delisting.

Real parts: ``fastsend check-config`` on a written config file, the event log
file (rotated as logrotate's copytruncate does: copied, then truncated in place),
the SQLite event index, webhook outbox and rollup store, the loopback DNS server.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastsend.cli import main
from fastsend.config.serve import EVENT_NAMES

SRC = Path(__file__).resolve().parent.parent / "src" / "fastsend"


def test_an_unknown_webhook_event_name_is_refused_naming_the_valid_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``[webhooks] events = ["bounce"]`` (not "bounced") subscribed to nothing and
    said nothing: every event was dropped before the outbox, for good."""
    f = tmp_path / "fastsend.toml"
    f.write_text('[webhooks]\nurls = ["https://h.example/"]\nsecret = "0123456789abcdefghij"\n'
                 'events = ["bounced", "bounce", "complaint"]\n')  # fmt: skip
    assert main(["check-config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "[webhooks] events: unknown event 'bounce', 'complaint'" in err, err
    assert "complained" in err and "delivered" in err  # the valid names are listed
    f.write_text('[webhooks]\nurls = ["https://h.example/"]\nsecret = "0123456789abcdefghij"\n'
                 'events = ["bounced", "complained", "alarm", "opened"]\n')  # fmt: skip
    assert main(["check-config", str(f)]) == 0, capsys.readouterr().err


_WRITES = (
    re.compile(r'"event":\s*"([a-z_]+)"'),  # {"event": "x", ...}
    re.compile(r'\["event"\]\s*=\s*"([a-z_]+)"'),  # ev["event"] = "x"
    re.compile(r'\._event\(\s*"([a-z_]+)"'),  # tracking's self._event("opened", ...)
    re.compile(r'\.notice\(\s*"[a-z]+",\s*"([a-z_]+)"'),  # provider events' notice(p, "x")
    re.compile(r'outcome_dict\(\s*\w+,\s*"([a-z_]+)"'),
)


def test_every_event_the_source_writes_is_a_valid_webhook_event_name() -> None:
    """The list [webhooks] events is checked against must not fall behind the code:
    an event added later and missing from it could not be subscribed to."""
    found: set[str] = set()
    for p in [*SRC.rglob("*.py"), *SRC.rglob("*.pxi")]:
        text = p.read_text()
        for rx in _WRITES:
            found.update(rx.findall(text))
    found.update({"campaign_paused", "campaign_active", "campaign_cancelled"})  # f"campaign_{s}"
    assert {"accepted", "delivered", "opened", "ip_listed", "alarm"} <= found  # the scan works
    assert found <= EVENT_NAMES, sorted(found - EVENT_NAMES)


def _copytruncate(path: Path) -> None:
    """What logrotate's ``copytruncate`` does: copy the log aside, empty it in place
    (the writer keeps its descriptor, same inode, and appends from 0)."""
    shutil.copyfile(path, str(path) + ".1")
    with open(path, "r+b") as f:
        f.truncate(0)


def _evs(kind: str, ids: range) -> list[dict[str, Any]]:
    t = time.time()
    return [{"time": t, "event": kind, "id": i, "campaign": 1, "rcpt": f"r{i}@example.org",
             "source_ip": "127.0.0.2", "mx": "mx.example.org", "code": 250}
            for i in ids]  # fmt: skip


def test_the_event_index_catches_up_after_a_copytruncate_rotation(tmp_path: Path) -> None:
    """After logrotate's copytruncate the log's offsets kept counting from the old
    size, so every mark the index kept named a point past the file's end: a kill -9
    then lost the index's last rows for good (the next start read nothing back)."""
    from fastsend.events import EventLog
    from fastsend.serve.eventindex import EventIndex

    spool = tmp_path / "spool"
    spool.mkdir()
    path = spool / "events.jsonl"
    log = EventLog(str(path))
    ix = EventIndex(str(spool))
    ix.attach(log)
    log.emit_many(_evs("accepted", range(300)))
    log.flush()
    ix.flush()
    _copytruncate(path)
    log.emit_many(_evs("delivered", range(0, 100)))  # serve goes on: ticks, index writes
    log.flush()
    log.emit_many(_evs("delivered", range(100, 200)))
    log.flush()
    ix.flush()
    log.emit_many(_evs("delivered", range(200, 300)))
    log.flush()  # in the log; the index holds them in memory only: kill -9
    log2 = EventLog(str(path))
    ix2 = EventIndex(str(spool))
    assert ix2.attach(log2) == 100
    for i in (0, 150, 250, 299):
        assert [e["event"] for e in ix2.for_message(i)] == ["accepted", "delivered"], i
    ix2.close()
    log2.close()


def test_webhooks_and_rollups_catch_up_after_a_copytruncate_rotation(tmp_path: Path) -> None:
    """The webhook outbox kept only a mark past the one it held, so after a
    copytruncate (smaller offsets) it kept the old one for good; with the rollups',
    a kill -9 after the rotation left the last events unsent and uncounted."""
    from fastsend.analytics.query import make_query, run_query
    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.webhooks import WebhookDispatcher

    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")},
                     "webhooks": {"urls": ["http://127.0.0.1:9/hook"],  # down: kept
                                  "secret": "0123456789abcdefghij", "retry_min": 60}})  # fmt: skip
    path = tmp_path / "spool" / "events.jsonl"

    def delivered(store: Any) -> int:
        now = time.time()
        q = make_query("*", {"from": str(int(now) - 3600), "dims": ""}, now + 60)
        return int(run_query(store, q)["totals"]["counts"]["delivered"])

    async def main() -> None:
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        ctx.events.emit_many(_evs("delivered", range(300)))
        ctx.events.flush()
        d._flush()
        ctx.rollups.flush()
        _copytruncate(path)
        ctx.events.emit_many(_evs("delivered", range(300, 400)))
        ctx.events.flush()
        ctx.events.emit_many(_evs("delivered", range(400, 500)))
        ctx.events.flush()
        d._flush()
        ctx.rollups.flush()
        ctx.events.emit_many(_evs("delivered", range(500, 600)))
        ctx.events.flush()  # in the log only: kill -9 (nothing closed, no last flush)
        for t in d._tasks:
            t.cancel()
        assert d._session is not None
        await d._session.close()
        ctx2 = open_context(cfg)
        d2 = WebhookDispatcher(ctx2)
        await d2.start()
        try:
            assert d2.outbox is not None
            ids = [orjson.loads(b)["id"] for _i, b in d2.outbox.fetch_all(-1, 10_000)]
            assert ids == list(range(600))  # each once, in order
            assert delivered(ctx2.rollups.store) == 600
        finally:
            await d2.stop()
            ctx2.close()

    asyncio.run(main())


def test_outcomes_told_after_a_truncation_carry_marks_inside_the_file(tmp_path: Path) -> None:
    """The supervisor's order (append_rows, flush, tell): a batch taken before the
    flush that found the file truncated is told with its end moved back."""
    from fastsend.events import EventLog

    path = tmp_path / "events.jsonl"
    log = EventLog(str(path))
    log.emit_many(_evs("accepted", range(50)))
    log.flush()
    _copytruncate(path)
    marks: list[str | None] = []
    log.listen(lambda evs: marks.append(log.mark()))
    pending = log.append_rows(_evs("delivered", range(10)))
    log.flush()
    log.tell(pending)
    size = path.stat().st_size
    assert marks and marks[-1] is not None and marks[-1].endswith(f":{size}")
    assert log.mark() is not None and log.mark().endswith(f":{size}")  # type: ignore[union-attr]
    log.close()
