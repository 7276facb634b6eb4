"""A site queue's connections (delivery/pool.py) against Postfix's smtp-sink:
the size of each pipelined group a connection takes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import free_port, require_program, wait_port
from fastsend.config import loader
from fastsend.delivery import pool
from fastsend.delivery.mx import Host, Site
from fastsend.outcome import Envelope, TxnResult

Run = Callable[[Any], Any]


@contextlib.contextmanager
def smtp_sink(*options: str) -> Iterator[int]:
    exe = require_program("smtp-sink")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    cmd = [exe, "-4", *user, *options, f"127.0.0.1:{port}", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def send_groups(run: Run, port: int, n: int, tmp: str) -> list[list[TxnResult]]:
    """``n`` messages through one connection (pipeline 4): the groups reported."""
    cfg = loader.from_dict(
        {"delivery": {"pipeline": 4, "max_connections": 1}}, base_dir=tmp, files=False
    )
    site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
    groups: list[list[TxnResult]] = []

    async def go() -> None:
        done = asyncio.Event()

        def report(results: list[TxnResult], ip: str, mx: str) -> None:
            groups.append(results)
            if sum(len(g) for g in groups) >= n:
                done.set()

        q = pool.SiteQueue(site, ["127.0.0.1"], cfg, report, "localhost")
        body = b"Subject: x\r\n\r\nhi\r\n"
        q.push([Envelope("s@example.org", [f"r{i}@x.example"], body, tag=i) for i in range(n)])
        await asyncio.wait_for(done.wait(), 30)
        await q.close()

    run(go())
    return groups


def test_groups_all_delivered_in_time_double_up_to_four_pipelines(
    run: Run, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "GROUP_QUICK", 3600.0)  # any group is answered in time
    with smtp_sink() as port:
        groups = send_groups(run, port, 4 + 8 + 16 + 16 + 16 + 3, str(tmp_path))
    assert [len(g) for g in groups] == [4, 8, 16, 16, 16, 3]
    assert [r.tag for g in groups for r in g] == list(range(63))
    assert all(o.delivered for g in groups for r in g for o in r.outcomes)


def test_groups_stay_at_pipeline_when_slow_or_not_all_delivered(
    run: Run, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "GROUP_QUICK", 0.0)  # no group is answered in time
    with smtp_sink() as port:
        groups = send_groups(run, port, 12, str(tmp_path))
    assert [len(g) for g in groups] == [4, 4, 4]
    monkeypatch.setattr(pool, "GROUP_QUICK", 3600.0)
    with smtp_sink("-f", "RCPT") as port:  # every recipient refused (5xx)
        groups = send_groups(run, port, 12, str(tmp_path))
    assert [len(g) for g in groups] == [4, 4, 4]
    assert all(o.failed for g in groups for r in g for o in r.outcomes)
