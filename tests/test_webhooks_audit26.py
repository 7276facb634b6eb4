"""Session 26's outside audit of webhooks (sub26): each test on a defect it found,
failing before its fix.

- After a 413 (the receiver's body limit) halved a URL's batch, it never grew
  back: a receiver whose limit was raised, or a burst of large events that had
  passed, left the URL at one or two events a POST for good. The batch is
  doubled again after GROW_AFTER batches taken, up to batch_size.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastsend.serve import webhooks
from test_monitoring_audit17 import SizeLimitedHook, _evs


def test_the_batch_grows_back_after_a_413(tmp_path: Path) -> None:
    rx = SizeLimitedHook(tmp_path, 2)

    async def main() -> None:
        async with rx.running() as ctx:
            ctx.events.emit_many(_evs("delivered", range(8)))
            await rx.wait_for(8)
            assert max(rx.sizes) <= 2, rx.sizes
            rx.limit[0] = 100  # the receiver's limit raised
            rx.sizes.clear()
            n = 8 + 4 * webhooks.GROW_AFTER * 8
            ctx.events.emit_many(_evs("delivered", range(8, n)))
            await rx.wait_for(n)

    asyncio.run(main())
    assert rx.got == sorted(rx.got) and len(set(rx.got)) == len(rx.got)
    assert max(rx.sizes) == 8, rx.sizes  # (before: 2 for good)
