"""Crash safety audited again (crash26), from outside: the real ``fastsend``
command, fastsend's own sink and its log, the event log.

- A worker killed -9 had every message it had been handed counted an attempt
  of unknown outcome (a deferred event "outcome unknown", one attempt more, its
  backoff), also the mail still on its ready queues that no connection had
  taken: 2,476-3,776 of a 4,000 window, where only a few per connection had
  their message written. A worker now notes each message it begins to write
  (a DATA's 354 answered, a BDAT LAST, a provider's request) in memory shared
  with the supervisor (``fastsend.ring.WriteLog``) before the bytes go out;
  only those count unknown, the rest go back with no attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)

from fastsend.sink import SinkProcess


def _unknown(spool: Path) -> list[str]:
    """The recipients of the events saying "outcome unknown" (a worker died)."""
    return [json.loads(line)["rcpt"] for line in (spool / "events.jsonl").read_text().splitlines()
            if "outcome unknown" in line]  # fmt: skip


def test_a_worker_killed_mid_send_counts_unknown_only_what_it_had_written(
    tmp_path: Path,
) -> None:
    """1,200 messages to one site over 2 connections of pipelined groups of 4
    (the sink answers each write after 30 ms): the whole list is in the
    worker's window, nearly all of it on its ready queue. The worker is killed
    -9 once the sink took 40: what counts unknown is at most what was on the
    wire (one group per connection), each of them one attempt more; every
    other message goes out once more with no attempt counted. Before, all of
    the window not yet told (1,100+) counted unknown."""
    n, conns, group = 1200, 2, 4
    addrs = [f"user{i}@d.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    conf = tmp_path / "fastsend.toml"
    conf.write_text(f"[delivery]\nmax_connections = {conns}\npipeline = {group}\n")
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    killed = 0
    with SinkProcess("--log", str(log), "--latency-ms", "30") as sink:
        host, port = sink.addresses[0]
        proc = subprocess.Popen(
            fastsend_cmd(
                "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
                "-c", str(conf), "--route", f"*={host}:{port}", "--workers", "1", "--json",
                "--no-progress",
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None:
                assert time.monotonic() < deadline, "send did not end"
                if not killed and len(sink_log(log)) >= 40:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        workers = psutil.Process(proc.pid).children()
                        if workers:
                            killed = workers[0].pid
                            os.kill(killed, signal.SIGKILL)
                time.sleep(0.05)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert killed, "the worker was not found"
    assert proc.returncode == 0, err[-3000:]
    s = summary(subprocess.CompletedProcess([], 0, out, err))
    assert s["delivered"] == n and s["worker_restarts"] == 1, s
    got = received_counts(log)
    assert set(got) == set(addrs)
    unknown = _unknown(spool)
    # What was written and not yet told: the groups on the wire (the pool grows
    # a quick connection's group up to 4x `pipeline`) and an ended one whose
    # results were still to be flushed (measured: 32; before, 500).
    assert len(unknown) <= 3 * conns * group * 4, len(unknown)
    # Each one counted is one attempt more; none of the rest is.
    assert s["attempts"] == n + len(unknown), (s, len(unknown))
    twice = {a for a, k in got.items() if k > 1}
    assert twice <= set(unknown), sorted(twice - set(unknown))[:10]
