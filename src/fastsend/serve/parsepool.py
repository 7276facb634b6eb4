"""Bounce/FBL/DMARC parsing off the event loop, with a CPU-time and a size cap.

NAME
    fastsend.serve.parsepool -- ParsePool: ``await pool.read(data, dmarc=)``
    -> ("dmarc", reports) or ("bounce", records).

DESCRIPTION
    Whatever arrives at the intake is anyone's message. DMARC aggregate
    reports (:func:`fastsend.analytics.dmarc.read_mail`: unzip/gunzip and
    XML) and :func:`parse_bounce` run in a separate process (one, spawned on
    first use, reused), so the serving loop (HTTP API, tracking, submission)
    never waits for them:

    - size cap: only the first ``max_bytes`` (default 1 MiB) of a message are
      parsed; the report parts (text, delivery-status, feedback-report, the
      returned headers) come first, the returned body last;
    - CPU cap: before each parse the child lowers its RLIMIT_CPU soft limit to
      its CPU time so far plus ``cpu_seconds``; a parse that runs over is
      killed by SIGXCPU. A wall-clock limit (``2 x cpu_seconds + 5``) backs it
      up, for a child that used its CPU time: one that did not (starved on a
      loaded machine, niced) waits on, up to ``WALL_SECONDS_MAX``. Either way
      the child is replaced and the message yields no record (the intake still
      answers 250: refusing a bounce only makes another).
      A new child is started and imports its parsers first, uncapped (up to
      ``START_SECONDS``; one that cannot start is :class:`ParseUnavailable`,
      451 at the intake): a slow start is no report's fault.
      A zip/gzip bomb, a deeply nested or huge XML report meets the same caps
      (and dmarc's own: decompressed size, depth, records).

    Reports are parsed one at a time (one child): a flood queues here rather
    than taking the machine's cores from the delivery workers.

DELIBERATELY NOT HERE
    Making the parser itself linear (fastsend.bounce); deciding what a record
    means (fastsend.serve.listeners).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fastsend.procs import die_with_parent

log = logging.getLogger("fastsend.serve.parsepool")

MAX_BYTES = 1 << 20
CPU_SECONDS = 2.0
START_SECONDS = 120.0  # s a new child may take to start and import its parsers
WALL_SECONDS_MAX = 60.0  # s a parse starved of CPU may wait before it is stopped


class ParseUnavailable(Exception):
    """The parse child could not be started (not within START_SECONDS, or it died
    starting): no report was read, the intake answers 451 for it to come again."""


def _warm() -> None:
    """In a new child, before its first report: the parsers imported and the
    bounce rules compiled (~0.3 s of CPU: the first report paid it inside its
    CPU cap), so neither the start nor the imports count against a report's caps."""
    import fastsend.analytics.dmarc  # noqa: F401
    from fastsend.bounce.reply import warm_rules

    warm_rules()


def _read_capped(data: bytes, cpu_seconds: float, dmarc: bool) -> tuple[str, list[Any]]:
    """In the child: raise the CPU ceiling to now + cpu_seconds, then read the
    message as a DMARC aggregate report (when ``dmarc``) or else as a bounce."""
    _cap_cpu(cpu_seconds)
    if dmarc:
        from fastsend.analytics.dmarc import read_mail

        reports = read_mail(data)
        if reports is not None:
            return "dmarc", reports
    from fastsend.bounce import parse_bounce

    return "bounce", parse_bounce(data)


def _cap_cpu(cpu_seconds: float) -> None:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    used = ru.ru_utime + ru.ru_stime
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    limit = int(used + cpu_seconds) + 1
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))


def _cpu_of(pid: int | None) -> float | None:
    """Process ``pid``'s CPU time so far (user + system, seconds); None unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _child_init(parent: int) -> None:
    # A kill -9 of serve had left this child (and multiprocessing's resource
    # tracker, held by it) waiting forever on a queue nobody writes.
    die_with_parent(parent)
    os.nice(5)  # behind the API and the delivery workers when cores are scarce


class ParsePool:
    def __init__(self, max_bytes: int = MAX_BYTES, cpu_seconds: float = CPU_SECONDS) -> None:
        self.max_bytes = max_bytes
        self.cpu_seconds = cpu_seconds
        self._pool: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self.killed = 0  # parses stopped by a cap (for tests and metrics)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init,
                initargs=(os.getpid(),),
            )
        return self._pool

    def _discard(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for p in list(getattr(pool, "_processes", {}).values()):
            try:
                p.kill()
            except (OSError, AttributeError):
                pass
        pool.shutdown(wait=False, cancel_futures=True)

    async def read(self, data: bytes, *, dmarc: bool = False) -> tuple[str, list[Any]]:
        """("dmarc", reports or refusals) if ``data`` (its first max_bytes) is a
        DMARC aggregate report and ``dmarc``, else ("bounce", its records);
        ("bounce", []) if a cap stopped the parse."""
        data = data[: self.max_bytes]
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._pool is None:
                # A new child: spawned and its parsers imported before the caps run.
                # Before, both counted against the first report's wall-clock cap: on
                # a loaded machine a plain bounce "exceeded the parse limits", was
                # answered 250 and lost, its address never suppressed.
                try:
                    await asyncio.wait_for(
                        loop.run_in_executor(self._executor(), _warm), START_SECONDS
                    )
                except (TimeoutError, BrokenProcessPool, OSError) as e:
                    self._discard()
                    raise ParseUnavailable(f"the report parser did not start: {e!r}") from e
            try:
                fut = loop.run_in_executor(
                    self._executor(), _read_capped, data, self.cpu_seconds, dmarc
                )
                return await self._wait(fut)
            except (TimeoutError, BrokenProcessPool):
                self.killed += 1
                log.warning("intake: a report exceeded the parse limits; ignored")
                self._discard()
                return "bounce", []

    def _child_pid(self) -> int | None:
        procs = list(getattr(self._pool, "_processes", None) or {})
        return procs[0] if len(procs) == 1 else None

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        """``fut``'s result, within the wall-clock cap, or longer while the child
        has not used its CPU time: before, a parse starved of CPU (a loaded
        machine; the child niced) was stopped at the cap and its report lost
        (an ordinary DSN answered 250, its hard bounce never suppressing the
        address). TimeoutError past the cap once it used it, or at
        WALL_SECONDS_MAX."""
        loop = asyncio.get_running_loop()
        pid = self._child_pid()
        cpu0 = _cpu_of(pid)
        end = loop.time() + WALL_SECONDS_MAX
        step = 2 * self.cpu_seconds + 5
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), step)
            except TimeoutError:
                cpu = _cpu_of(pid)
                if cpu is None or cpu0 is None or cpu - cpu0 >= self.cpu_seconds:
                    raise
                if loop.time() >= end:
                    raise
                step = min(step, max(end - loop.time(), 0.1))

    async def parse(self, data: bytes) -> list[Any]:
        """Bounce records of ``data`` (its first max_bytes); [] if a cap stopped it."""
        return (await self.read(data))[1]

    def close(self) -> None:
        self._discard()
