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
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from tests.test_power_loss import PowerLoss

from fastsend.analytics.rollup import _node_rows
from fastsend.analytics.store import IDX, NC, SQLiteRollupStore
from fastsend.analytics.warmup import EngagementWarmup, WarmupPolicy
from fastsend.config import from_dict
from fastsend.shaping.pools import ANCHORS, utc_day, warmup_anchors


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
