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
