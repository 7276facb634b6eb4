"""The per-message event index (``events.db``: GET /v1/messages/ID, GET /v1/events, the
once-per-message checks of reports) agrees with the event log after a stop or a crash.

It wrote its rows every 0.2 s from memory and was closed with the API, before serve's
drain: a SIGTERM while 2,000 messages were in flight left all 2,000 deliveries out of
it for good (GET /v1/messages/ID said "accepted" only), and a kill -9 lost its last
0.2 s (1,024 deliveries of 3,000 in a run). Each write now keeps how far into the event
log its rows go; the next start indexes the rest from the log.

Real parts: the event log file, the SQLite index in a process killed with SIGKILL;
``fastsend serve`` stopped with SIGTERM mid-delivery to fastsend's own sink, restarted,
and its export compared with its event log.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from tests._serve_helpers import Served

from fastsend.events import EventLog
from fastsend.serve.eventindex import EventIndex
from fastsend.sink import SinkThread

_KILLED = """
import os, signal, sys, time
from fastsend.events import EventLog
from fastsend.serve.eventindex import EventIndex

spool, url = sys.argv[1:3]
log = EventLog(os.path.join(spool, "events.jsonl"))
if url:
    from fastsend.spool import open_spool

    from fastsend.serve.shared_state import SharedState

    ix = SharedState(open_spool(url)).index()
else:
    ix = EventIndex(spool)
ix.attach(log)
t = time.time()
log.emit_many([{"time": t, "event": "accepted", "id": i, "campaign": 1,
                "rcpt": f"r{i}@example.org"} for i in range(5)])
ix.flush()  # written
log.emit_many([{"time": t, "event": "delivered", "id": i, "campaign": 1,
                "rcpt": f"r{i}@example.org", "source_ip": "127.0.0.2"} for i in range(5)])
log.flush()  # in the log (serve's tick), in the index's memory only
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_killed_runs_unwritten_rows_are_indexed_at_the_next_start(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    url = ""
    if backend == "redis":
        url = str(request.getfixturevalue("redis_server").url(node="n1", dir=str(spool)))
    rc = subprocess.run([sys.executable, "-c", _KILLED, str(spool), url], check=False).returncode
    assert rc == -signal.SIGKILL
    path = str(spool / "events.jsonl")
    for _start in range(2):  # the next start catches up; the one after adds nothing
        log = EventLog(path)
        if url:
            from fastsend.serve.shared_state import SharedState
            from fastsend.spool import open_spool

            ix: Any = SharedState(open_spool(url)).index()
        else:
            ix = EventIndex(str(spool))
        ix.attach(log)
        for i in range(5):
            assert [e["event"] for e in ix.for_message(i)] == ["accepted", "delivered"], i
        assert ix.for_message(0)[1]["source_ip"] == "127.0.0.2"
        ix.close()
        log.close()


def _export(s: Served) -> list[dict[str, object]]:
    async def go() -> bytes:
        h = {"Authorization": f"Bearer {s.keys['acme']}"}
        async with aiohttp.ClientSession() as c, c.get(
            s.base + "/v1/events?from=-1h&format=ndjson", headers=h
        ) as r:
            assert r.status == 200
            assert "Fastsend-Next-Cursor" not in r.headers  # one page
            return await r.read()

    return [orjson.loads(x) for x in asyncio.run(go()).splitlines() if x]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_events_of_a_stops_drain_are_indexed(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = ""
    if backend == "redis":
        url = str(request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path)))
    with SinkThread(latency_ms=10) as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}", spool_url=url,
                   serve_args=("--allow-volatile",) if url else ())  # fmt: skip
        try:
            st, body = s.req("POST", "/v1/messages", {
                "from": "a@example.com", "subject": "s", "text": "t",
                "to": [f"u{j}@example.com" for j in range(300)]}, tenant="acme")  # fmt: skip
            assert st == 202, body
            sink.wait_messages(50, timeout=30)
            s.proc.send_signal(signal.SIGTERM)  # the drain ends what is in flight
            assert s.proc.wait(timeout=60) == 0
            s.start()
            logged = [orjson.loads(x) for x in
                      (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()]  # fmt: skip
            want = {(e["event"], e["id"]) for e in logged if "id" in e}
            assert sum(1 for e, _ in want if e == "delivered") >= 50
            got = {(e["event"], e["id"]) for e in _export(s)}
            assert want <= got, sorted(want - got)[:5]
        finally:
            s.stop()


def test_a_long_run_of_another_process_is_indexed_only_up_to_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the log holds past the index's mark is mostly a kill's or a drain's tail; a
    `fastsend send` run on the same spool between two serve runs can be millions of
    events (200,000 took 6 s and 280 MB of a start, all in memory at once). A start
    indexes a batch at a time and at most CATCH_UP_MAX events, then goes on from the
    log's end."""
    from fastsend.serve import eventindex

    monkeypatch.setattr(eventindex, "CATCH_UP_MAX", 5000)
    spool = tmp_path / "spool"
    path = str(spool / "events.jsonl")
    log = EventLog(path)
    ix = EventIndex(str(spool))
    ix.attach(log)  # serve ran: the mark is at the log's end
    ix.close()
    log.close()
    log = EventLog(path)  # another process's run
    for k in range(0, 12000, 1000):
        log.emit_many([{"event": "accepted", "id": i, "campaign": 1, "rcpt": f"u{i}@example.org"}
                       for i in range(k, k + 1000)])  # fmt: skip
    log.close()
    for n in (5000, 0):  # the start indexes up to the bound; the next one nothing more
        log = EventLog(path)
        ix = EventIndex(str(spool))
        assert ix.attach(log) == n
        assert [e["event"] for e in ix.for_message(0)] == ["accepted"]
        assert ix.for_message(11999) == []
        ix.close()
        log.close()
