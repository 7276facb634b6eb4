"""Crash safety audited again (crash25): what a kill -9 or a power loss at each
stage leaves, read from outside (the files a restart reads, the real
``fastsend`` command, the sink's log).

- The warm-up state a restart reads (``SPOOL/warmup-offsets.json``, the
  engagement offsets; ``SPOOL/warmup-anchors.json``, each ``warmup_day``
  address's day 1) was renamed into place without the directory's fsync (and
  the offsets without the file's): after a power loss the name could point at
  the new file with none of its bytes (an empty file: every offset read as
  none), or the anchor never made it (a later day's restart anchored day N
  anew: the IP back to day N's cap). Power loss simulated by
  tests/test_power_loss.PowerLoss.
- A worker killed -9 had every message of its window counted an attempt of
  unknown outcome and sent again, those of a pipelined group whose 250 it had
  read included: a group takes seconds at a slow receiver, and its outcomes
  were told only when it ended (a 12,000-message send to a sink answering
  after 2 ms, one worker killed: 1,280 duplicates, 833 of them taken by the
  sink up to 1.5 s before the kill). The worker now tells a long group's
  deliveries as it reads them (wire.Answered); a worker that dies before the
  group ends has those applied as delivered.
- A ``send`` killed between making its campaign and starting its list left
  the campaign "active" and empty for good; ``send`` and ``resume`` now
  abandon such a campaign and say so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests._engine_helpers import (
    _env,
    received_counts,
    run_fastsend,
    run_killed,
    send_killing_a_worker,
    summary,
    write_campaign,
    write_recipients,
)
from tests.test_power_loss import PowerLoss

from fastsend.analytics.rollup import _node_rows
from fastsend.analytics.store import IDX, NC, SQLiteRollupStore
from fastsend.analytics.warmup import EngagementWarmup, WarmupPolicy
from fastsend.config import from_dict
from fastsend.shaping.pools import ANCHORS, utc_day, warmup_anchors
from fastsend.sink import SinkProcess


def _fsync_dir(d: Path) -> None:
    """What any later file made in the directory does (SQLite's journal, an
    event log opened): the directory's names made durable."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_engagement_offsets_survive_a_power_loss_after_they_are_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offsets judged and saved (an IP one day ahead), then a power loss, at once
    or after another file was made in the spool directory: the file a restart
    reads holds the new offsets whole. Before: the old offsets at once (the
    rename not durable), an empty file after the directory's next fsync."""
    spool = tmp_path / "spool"
    spool.mkdir()
    store = SQLiteRollupStore(str(spool))
    now = time.time()
    y0 = (int(now) // 86400 - 1) * 86400
    row = [0] * NC
    row[IDX["delivered"]] = 1000
    counts: dict[Any, list[int]] = {(86400, y0, ("acme", 1, "google", "127.0.0.2")): row}
    _node_rows(counts, {})
    store.add(counts, {}, {})
    path = spool / "warmup-offsets.json"
    path.write_text(json.dumps({"127.0.0.2": {"offset": 2, "day": 1}}))  # an older day's
    pl = PowerLoss(spool, monkeypatch)
    ew = EngagementWarmup(WarmupPolicy(), store, str(spool), lambda e: None)
    assert ew.evaluate(["127.0.0.2"], now)
    assert ew.offsets() == {"127.0.0.2": 3}
    want = path.read_bytes()
    assert json.loads(pl.view(path) or b"null") == json.loads(want)
    _fsync_dir(spool)
    assert pl.view(path) == want
    assert not [p.name for p in spool.iterdir() if p.name.endswith(".tmp")]


def test_warmup_day_anchors_survive_a_power_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``warmup_day = 3`` read for the first time: its anchor (day 1 two days
    ago) is durable once read, so a power loss and a start on a later day goes on
    from day 3, not from day 3 again."""
    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = from_dict({"spool": {"dir": str(spool)},
                     "pools": {"main": {"ips": [{"ip": "127.0.0.2", "warmup_day": 3}]}}})  # fmt: skip
    pl = PowerLoss(spool, monkeypatch)
    now = time.time()
    got = warmup_anchors(cfg, now)
    assert got == {"127.0.0.2": (3, utc_day(now) - 2)}
    view = pl.view(spool / ANCHORS)
    assert view is not None and json.loads(view) == {"127.0.0.2": [3, utc_day(now) - 2]}


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def test_a_worker_killed_with_a_group_on_the_wire_sends_nothing_it_had_answered(
    tmp_path: Path,
) -> None:
    """40 messages on one connection, one pipelined group; the sink holds the
    reply to the 21st's RCPT (a ``slow-`` recipient) for seconds, after taking
    the first 20. The worker, frozen once it has told what it read and the
    group has stalled (``worker-stop-in-stalled-group``, after 20 looks), is
    killed -9: the 20 the sink took are delivered, not sent again; the rest go
    out once from the restarted worker (a later freeze of it is let go).
    Before, all 40 counted attempts of unknown outcome: the first 20 twice at
    the sink."""
    n = 40
    addrs = [f"user{i}@d.example.net" for i in range(n)]
    addrs[20] = "slow-20@d.example.net"
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    conf = tmp_path / "fastsend.toml"
    conf.write_text("[delivery]\nmax_connections = 1\npipeline = 64\n")
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    env = dict(_env(), FASTSEND_TEST_FAULT="worker-stop-in-stalled-group:20")
    _s, got = send_killing_a_worker(  # (the worker picked: one frozen in a stalled group)
        ["--slow-ms", "8000"], log, camp, rcpts, spool, conf, addrs,
        lambda workers: next((w for w in workers if _stopped(w.pid)), None), env,
    )  # fmt: skip
    twice = sorted(a for a, k in got.items() if k > 1)
    assert not twice, twice
    unknown = [json.loads(line)["rcpt"] for line in (spool / "events.jsonl").read_text().splitlines()
               if "outcome unknown" in line]  # fmt: skip
    assert "slow-20@d.example.net" in unknown and not set(unknown) & {a for a in addrs[:20]}


def test_a_send_killed_before_reading_its_list_leaves_no_campaign_active_forever(
    tmp_path: Path,
) -> None:
    """``send`` killed -9 between making its campaign and starting to read its
    list: ``resume`` says so and abandons the campaign (nothing of it was
    spooled); the same ``send`` again then sends the list as campaign 2. Before,
    campaign 1 stayed "active" with nothing in it for good (every campaign list,
    the API's and the dashboard's). A campaign with rows is never touched."""
    spool = str(tmp_path / "spool")
    camp = write_campaign(tmp_path)
    addrs = [f"user{i}@d{i % 3}.example.net" for i in range(30)]
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        cmd = ["send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", spool, "--route",
               f"*={host}:{port}", "--workers", "1", "--json", "--no-progress"]  # fmt: skip
        done = run_fastsend(*cmd)  # a campaign that was sent: kept as it is
        assert summary(done)["delivered"] == len(addrs), done.stderr[-2000:]
        run_killed("send-kill-after-campaign", *cmd)
        listed = run_fastsend("campaign", "list", "--spool", spool)
        assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
            ["1", "active"], ["2", "active"]
        ], listed.stdout
        res = run_fastsend("resume", "--spool", spool, "--json", "--no-progress")
        assert res.returncode == 0, res.stderr[-2000:]
        assert "campaign 2 'campaign.toml': its `send` died before it began reading" in (
            res.stderr
        )
        again = run_fastsend(*cmd)
        assert again.returncode == 0, again.stderr[-2000:]
        assert summary(again)["campaign"] == 3 and summary(again)["delivered"] == len(addrs)
        assert "died before" not in again.stderr
        listed = run_fastsend("campaign", "list", "--spool", spool, "--json")
    got = {c["id"]: c["status"] for c in json.loads(listed.stdout)}
    assert got == {1: "active", 2: "abandoned", 3: "active"}, listed.stdout
    assert set(received_counts(log).values()) == {2}
