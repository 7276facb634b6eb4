"""Crash safety audited again (crash27), from outside: the real ``fastsend``
command killed -9, fastsend's own sink and its log, the event log.

- A ``fastsend send --route ...`` killed -9 left its campaign's mail in the
  spool; a ``serve`` started on that spool delivered it by serve's own routes
  (its MX, its source IPs), not the send's. It now sets such a campaign aside
  (paused, saying the ``fastsend resume`` that continues it with the send's
  recorded options), and ``resume`` takes it back.
"""

from __future__ import annotations

from pathlib import Path

from tests._engine_helpers import (
    received_counts,
    run_fastsend,
    run_killed_when,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)
from tests._serve_helpers import Served

from fastsend.sink import SinkProcess


def test_serve_sets_aside_a_killed_sends_campaign_and_resume_sends_it_by_its_route(
    tmp_path: Path,
) -> None:
    """A send routed to sink A is killed -9 (supervisor and workers) once A took
    a few of its 60 messages; serve, routed to sink B, starts on its spool: it
    says the campaign is set aside and B gets none of it; ``fastsend resume``
    (no options: the send's recorded ones) delivers the rest to A. Before,
    serve delivered the rest to B."""
    n = 60
    addrs = [f"user{i}@d.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = tmp_path / "spool"
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with SinkProcess("--log", str(log_a), "--latency-ms", "100") as a, \
            SinkProcess("--log", str(log_b)) as b:  # fmt: skip
        (ha, pa), (hb, pb) = a.addresses[0], b.addresses[0]
        run_killed_when(
            ["send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
             "--route", f"*={ha}:{pa}", "--retry", "1,5,3600", "--workers", "1",
             "--no-progress"],
            lambda: len(sink_log(log_a)) >= 3,
        )  # fmt: skip
        assert len(received_counts(log_a)) < n
        srv = Served(tmp_path, f"{hb}:{pb}")
        try:
            srv.wait_line("set aside")
        finally:
            srv.stop()
        said = "".join(srv.lines)
        assert f"--route '*={ha}:{pa}'" in said and "fastsend resume --spool" in said, said
        assert not sink_log(log_b)
        proc = run_fastsend("resume", "--spool", str(spool), "--json", "--no-progress",
                            "--max-wait", "60")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "set aside by serve, is active again" in proc.stderr
        s = summary(proc)
        assert s["deferred"] == 0 and s["bounced"] == 0, s
    assert set(received_counts(log_a)) == set(addrs)
    assert not sink_log(log_b)
