"""The bounce intake's parse process (session 24's audit, multi24).

Real parts: ParsePool's spawned child; its start slowed by a sitecustomize
module on the child's PYTHONPATH (a loaded machine, a cold disk).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from tests._serve_helpers import dsn

from fastsend.serve.parsepool import ParsePool


def assert_hard_bounce(got: tuple[str, list[object]]) -> None:
    """The DSN both tests read (gone@example.org, 5.1.1) came back whole."""
    kind, records = got
    assert kind == "bounce"
    assert [(r.recipient, r.hard) for r in records] == [("gone@example.org", True)]  # type: ignore[attr-defined]


def test_a_slow_starting_parse_child_costs_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first report after serve starts (or after a capped parse replaced the
    child) waits for a new child to spawn and import its parsers. That start
    counted against the report's wall-clock cap (2 x cpu_seconds + 5 s): on a
    loaded machine an ordinary DSN "exceeded the parse limits", was answered 250
    and lost, its hard bounce never suppressing the address. Now the child
    starts uncapped first, then the report is read under the caps."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('FASTSEND_TEST_SLOW_START'):\n"
        "    time.sleep(float(os.environ['FASTSEND_TEST_SLOW_START']))\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FASTSEND_TEST_SLOW_START", "8")
    raw = dsn("gone@example.org", "1234").encode()

    async def main() -> tuple[str, list[object]]:
        pool = ParsePool(cpu_seconds=0.5)  # (a wall-clock cap of 6 s)
        try:
            got = await pool.read(raw)
            assert pool.killed == 0
            return got
        finally:
            pool.close()

    assert_hard_bounce(asyncio.run(main()))


def test_a_parse_starved_of_cpu_past_the_wall_clock_cap_costs_no_report() -> None:
    """The child stopped (SIGSTOP: a niced process on a loaded machine gets no CPU)
    for longer than the wall-clock cap (2 x cpu_seconds + 5 s) while a DSN waits:
    once it runs again the report is read, the child kept. Before, the cap
    stopped the parse though it had used none of its CPU time: the report was
    answered 250 and lost (a flaky test_bounce_unseen22 under load)."""
    raw = dsn("gone@example.org", "1234").encode()

    async def main() -> tuple[str, list[object]]:
        pool = ParsePool(cpu_seconds=0.5)  # (a wall-clock cap of 6 s)
        try:
            assert (await pool.read(raw))[1]  # (the child started)
            (pid,) = list(pool._pool._processes)  # type: ignore[union-attr]
            os.kill(pid, signal.SIGSTOP)
            try:
                task = asyncio.ensure_future(pool.read(raw))
                t0 = time.monotonic()
                while time.monotonic() - t0 < 7.5:  # (past the cap, the child stopped)
                    await asyncio.sleep(0.25)
                    assert not task.done()
            finally:
                os.kill(pid, signal.SIGCONT)
            got = await task
            assert pool.killed == 0 and list(pool._pool._processes) == [pid]  # type: ignore[union-attr]
            return got
        finally:
            pool.close()

    assert_hard_bounce(asyncio.run(main()))
