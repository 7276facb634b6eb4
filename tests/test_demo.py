"""`fastsend demo`: the whole engine against `fastsend sink`, with the report."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_reports_what_the_sink_received_and_the_bound() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastsend", "demo", "--recipients", "300", "--ips", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["delivered"] == 300 and summary["sink_received"] == 300
    assert set(summary["sink_peers"]) <= {"127.0.0.2", "127.0.0.3"}
    assert sum(summary["sink_peers"].values()) == 300
    assert summary["bound_by"].startswith(("the machine", "the sink", "the sender", "neither"))
    assert "sink " in summary["bound_by"] and "sender " in summary["bound_by"]


def test_a_size_no_message_can_have_is_a_usage_error() -> None:
    """``--size`` past what ``[delivery] max_message_size`` lets a message be: one
    line, exit 2, before any sink or list. Before: 30,000,000 ran the demo (send
    refused its campaign, then a report of nothing, exit 1) and 999999999999 was a
    MemoryError traceback."""
    for size in ("30000000", "999999999999"):
        out = subprocess.run(
            [sys.executable, "-m", "fastsend", "demo", "--size", size, "--recipients", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("fastsend demo: --size must be at most"), out.stderr
        assert "Traceback" not in out.stderr and not out.stdout
