"""fastsend.periodic.every: the loops of serve (flush tick, alarms, warm-up, blocklists)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fastsend.periodic import every

log = logging.getLogger("fastsend.test.periodic")


def test_runs_again_after_a_failure_and_stops_when_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []

    def step() -> None:
        runs.append(len(runs))
        if len(runs) == 2:
            raise RuntimeError("one bad pass")

    async def main() -> None:
        task = asyncio.create_task(every(0.01, step, "the step", log))
        while len(runs) < 4:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger=log.name):
        asyncio.run(main())
    assert runs[:4] == [0, 1, 2, 3]
    failed = [r for r in caplog.records if r.getMessage() == "the step failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None


def test_awaits_a_coroutine_step_and_can_wait_first() -> None:
    seen: list[str] = []

    async def step() -> None:
        await asyncio.sleep(0)
        seen.append("ran")

    async def main() -> None:
        task = asyncio.create_task(every(0.2, step, "async step", log, wait_first=True))
        await asyncio.sleep(0.05)
        assert seen == []  # still in the first wait
        await asyncio.sleep(0.25)
        assert seen == ["ran"]  # the coroutine ran to its end
        task.cancel()

    asyncio.run(main())
