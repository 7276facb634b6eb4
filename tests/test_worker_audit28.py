"""wkr28's audit of the worker's own cost per message (issue 11: workers <= 1.3x
the SMTP client alone).

- A group of answers from a static route's smarthost (or a relay) was read
  twice: once whole for a refusal of us (``Router.relay_refusals``'
  ``all_delivered``), then again as its outcomes were collected
  (``collect_delivered``): ~1% of a worker's CPU samples in a send through a
  smarthost. Its leading deliveries are collected first, in the one pass, and
  only what follows them is looked at for refusals.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests._supervisor_helpers import worker_results

from fastsend import wire
from fastsend.config import Config, Route
from fastsend.delivery import routes
from fastsend.delivery.worker import Worker
from fastsend.outcome import DELIVERED, FAILED, Outcome, TxnResult
from fastsend.ring import Ring
from fastsend.transports import relay


def test_a_smarthosts_answers_are_read_once_and_its_refusals_still_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A smarthost's group all delivered: reported with no second pass over it
    (no ``all_delivered``, no ``refused_us``); a group with a refusal of us
    after deliveries: the deliveries reported as such, only the rest looked
    at, the refusal deferred (the relay's configuration, not the recipient),
    every id once, in order."""
    calls = {"all": 0, "refused": 0}
    real_all, real_refused = routes.all_delivered, relay.refused_us

    def counted_all(results: list[TxnResult]) -> int:
        calls["all"] += 1
        return real_all(results)

    def counted_refused(o: Outcome) -> bool:
        calls["refused"] += 1
        return real_refused(o)

    monkeypatch.setattr(routes, "all_delivered", counted_all)
    monkeypatch.setattr(relay, "refused_us", counted_refused)
    config = Config(spool_dir=str(tmp_path), routes={"*": Route("smart.example.net", 2525)})
    inbox, outbox = Ring(1 << 16), Ring(1 << 16)
    w = Worker(0, config, ["127.0.0.2"], inbox, outbox)
    mx = "smart.example.net[127.0.0.1]:2525"
    assert w.smarthosts

    def ok(i: int) -> TxnResult:
        return TxnResult(i, [Outcome(DELIVERED, 250, "2.0.0", f"Ok q{i}", "data", mx)], "")

    refused = Outcome(FAILED, 554, "5.7.1", "<u9@b.example>: Relay access denied", "rcpt", mx)

    async def run() -> None:
        w.report([ok(i) for i in range(64)], "127.0.0.2", mx)
        assert calls == {"all": 0, "refused": 0}
        w.report([*[ok(i) for i in range(100, 105)], TxnResult(109, [refused], ""), ok(110)],
                 "127.0.0.2", mx)  # fmt: skip
        assert calls["refused"] <= 3  # (the refusal and the delivery after it)
        w.flush()

    asyncio.run(run())
    got = worker_results(outbox)
    assert [r.id for r in got] == [*range(64), *range(100, 105), 109, 110]
    by_id: dict[int, Any] = {r.id: r for r in got}
    assert all(by_id[i].kind == wire.K_DELIVERED for i in [*range(64), *range(100, 105), 110])
    assert by_id[109].kind == wire.K_DEFERRED and by_id[109].code == 554
    assert not by_id[109].hard
