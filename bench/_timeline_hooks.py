"""Run ``fastsend`` (as ``python -m fastsend`` would) with milestone marks: the
child side of bench/send_timeline.py. Usage: ``python _timeline_hooks.py OUT
send ...``. Each mark is one line "monotonic_s pid name" appended to OUT
(O_APPEND: the supervisor and its forked workers share the file); marks that
repeat (deliveries) are kept in memory and only their first and last written.

The hooks wrap functions by name (no change to fastsend itself): when one is
renamed this prints which, and the timeline lacks that mark.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

OUT = sys.argv[1]
_seen: dict[str, float] = {}


def mark(name: str, once: bool = False) -> None:
    if once:
        key = f"{os.getpid()} {name}"
        if key in _seen:
            return
        _seen[key] = 1.0
    cpu = time.process_time() * 1e3
    line = f"{time.monotonic():.6f} {os.getpid()} {name} (cpu {cpu:.0f} ms)\n".encode()
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


mark("interpreter up (site imported, hooks script started)")


def wrap(obj: object, attr: str, before: str = "", after: str = "", once: bool = False) -> None:
    fn = getattr(obj, attr, None)
    if fn is None:
        print(f"timeline: no {obj!r}.{attr}: mark left out", file=sys.stderr)
        return
    import inspect

    if inspect.iscoroutinefunction(fn):

        async def awrapper(*a: object, **k: object) -> object:
            if before:
                mark(before, once)
            r = await fn(*a, **k)
            if after:
                mark(after, once)
            return r

        setattr(obj, attr, awrapper)
        return

    def wrapper(*a: object, **k: object) -> object:
        if before:
            mark(before, once)
        r = fn(*a, **k)
        if after:
            mark(after, once)
        return r

    setattr(obj, attr, wrapper)


def install() -> None:
    import fastsend.commands.send as send_mod

    mark("send command imported")
    from fastsend import engine
    from fastsend.accept import Acceptor
    from fastsend.delivery import pool, worker
    from fastsend.queue import dispatch, lifecycle, outcomes, supervisor

    wrap(send_mod, "engine_config", before="run: config loading", after="config loaded")
    import fastsend.spool as spool_pkg  # send.run imports open_spool from it when it runs

    wrap(spool_pkg, "open_spool", after="spool opened")
    wrap(Acceptor, "start_ingest", after="ingest job started (list opened)")
    wrap(engine, "run", before="engine start (first chunk spooled)", after="engine done")
    wrap(supervisor.Supervisor, "run", before="supervisor loop start")
    wrap(lifecycle.WorkerLifecycle, "spawn", before="fork a worker")
    wrap(worker, "run_worker", before="worker running (after fork)", after="worker main done")
    wrap(dispatch.Dispatch, "batch_records", before="first batch dispatched", once=True)
    wrap(worker.Worker, "main", before="worker main start")
    wrap(worker.Worker, "renderer", before="first renderer", after="renderer ready", once=True)
    wrap(worker.Worker, "push_placed", after="first batches placed", once=True)
    wrap(worker.Worker, "handle_batch", before="first handle_batch", once=True)
    wrap(pool.SiteQueue, "_connection", before="first connection task runs", once=True)
    wrap(pool, "connect", before="first connect started", after="first connection ready", once=True)
    wrap(worker.Worker, "report", before="first results in a worker", once=True)
    wrap(outcomes.Outcomes, "apply", before="first outcomes applied", once=True)
    wrap(supervisor.Supervisor, "_feed", after="list fully read (feeder done)")
    from fastsend.spool.sqlite import SQLiteSpool

    wrap(SQLiteSpool, "counts", before="spool counts", after="spool counted")
    wrap(SQLiteSpool, "close", before="spool close", after="spool closed")
    wrap(lifecycle.WorkerLifecycle, "shutdown", before="shutdown start", after="workers reaped")

    # In each worker: its ready queues sampled every 5 ms (mail rendered and not
    # yet written to a connection, and groups awaiting replies), written at exit:
    # a worker whose queues run dry while its window is in flight waits on the
    # supervisor's refill. Also over the middle of its run (from its first
    # results to the last batch it received): the start and the tail empty the
    # queues whatever the refill does.
    main = worker.Worker.main
    place_batch = worker.Worker.place_batch
    times = {"first": 0.0, "batch": 0.0}

    def place_batch_timed(self: Any, *a: Any, **k: Any) -> None:
        place_batch(self, *a, **k)
        times["batch"] = time.monotonic()

    worker.Worker.place_batch = place_batch_timed  # type: ignore[method-assign]

    async def main_sampled(self: Any) -> None:
        import asyncio

        samples: list[tuple[float, int, int]] = []
        report = self.report
        last = [0.0]

        def report_last(*a: Any) -> None:
            report(*a)
            last[0] = time.monotonic()
            if not times["first"]:
                times["first"] = last[0]

        self.report = report_last  # the site queues made from here on report through it

        async def sample() -> None:
            while True:
                await asyncio.sleep(0.005)
                qs = list(self.sites.values())
                samples.append((time.monotonic(), sum(len(q.pending) for q in qs),
                                sum(q.sending for q in qs)))  # fmt: skip

        task = asyncio.get_running_loop().create_task(sample())
        try:
            await main(self)
        finally:
            task.cancel()
            busy = [s for s in samples if s[2]]
            dry = sum(1 for _t, p, _s in busy if p == 0)
            med = sorted(p for _t, p, _s in busy)[len(busy) // 2] if busy else 0
            mid = [s for s in samples if times["first"] <= s[0] <= times["batch"]]
            mid_dry = sum(1 for _t, p, _s in mid if p == 0)
            line = f"{last[0]:.6f} {os.getpid()} last results in a worker\n".encode()
            fd = os.open(OUT, os.O_WRONLY | os.O_APPEND)
            os.write(fd, line)
            os.close(fd)
            mark(f"ready queues while sending: {len(busy)} samples, empty in {dry}"
                 f" ({dry / max(1, len(busy)) * 100:.0f}%), median {med} ready;"
                 f" from first results to last batch: {len(mid)} samples, empty in"
                 f" {mid_dry} ({mid_dry / max(1, len(mid)) * 100:.0f}%)")  # fmt: skip

    worker.Worker.main = main_sampled  # type: ignore[method-assign]

    # The last outcome batch: remembered, written once the engine returns.
    last = [0.0]
    apply = outcomes.Outcomes.apply

    def apply_last(self: object, slot: object, items: list) -> None:
        apply(self, slot, items)  # type: ignore[arg-type]
        last[0] = time.monotonic()

    outcomes.Outcomes.apply = apply_last  # type: ignore[method-assign]
    run = engine.run

    def run_marked(*a: object, **k: object) -> object:
        r = run(*a, **k)
        line = f"{last[0]:.6f} {os.getpid()} last outcomes applied\n".encode()
        fd = os.open(OUT, os.O_WRONLY | os.O_APPEND)
        os.write(fd, line)
        os.close(fd)
        return r

    engine.run = run_marked  # type: ignore[assignment]
    exit_ = os._exit

    def exit_marked(code: int) -> None:
        mark("os._exit")
        exit_(code)

    os._exit = exit_marked  # type: ignore[assignment]


install()
sys.argv = ["fastsend", *sys.argv[2:]]
from fastsend.cli import run_process  # noqa: E402

run_process()
