"""A campaign not judged yet by its guardrails has at most ``min_sample`` of its
messages out unanswered (``Dispatch.sample_cap``); one whose sample went to a
receiver that never answers must not wait for their command timeouts (minutes)
before the rest of its mail, to every other domain, goes: a message out longer
than ``[guardrails] sample_wait`` no longer holds its place."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    write_campaign,
    write_recipients,
)

from fastsend.sink import SinkProcess
from fastsend.spool import open_spool


def test_a_sample_stuck_at_a_mute_receiver_does_not_hold_the_campaign(tmp_path: Path) -> None:
    mute = socket.socket()  # completes TCP handshakes, never says a word
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)
    stuck = [f"s{i}@stuck.example" for i in range(5)]
    ok = [f"u{i}@ok.example" for i in range(20)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, stuck + ok)
    conf = tmp_path / "fastsend.toml"
    conf.write_text("[guardrails]\nmin_sample = 5\nsample_wait = 0.5\n")
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    try:
        with SinkProcess("--log", str(log)) as sink:
            proc = subprocess.Popen(
                fastsend_cmd("send", str(camp), "-r", str(rcpts), "-c", str(conf), "--spool",
                             str(spool), "--route", f"stuck.example=127.0.0.1:{mute.getsockname()[1]}",
                             "--route", f"*={sink.host}:{sink.port}", "--workers", "1",
                             "--no-dkim", "--no-progress"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
            )  # fmt: skip
            try:
                # (before: nothing of ok.example went until the stuck sample's
                # greeting timeout, 300 s)
                deadline = time.monotonic() + 60
                while len(received_counts(log)) < len(ok) if log.exists() else True:
                    assert proc.poll() is None and time.monotonic() < deadline, (
                        "the campaign's other mail waited for its stuck sample"
                    )
                    time.sleep(0.1)
                proc.send_signal(signal.SIGINT)
                _out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        mute.close()
    assert proc.returncode == 130, err[-3000:]
    assert set(received_counts(log)) == set(ok)
    s = open_spool(str(spool))
    try:
        rows = {m["rcpt"]: m for i in range(1, 26) if (m := s.message(i))}
    finally:
        s.close()
    for r in stuck:  # still waiting for a greeting when stopped: never sent
        assert rows[r]["state"] == "queued" and rows[r]["attempts"] == 0, rows[r]
    events = [json.loads(x) for x in (spool / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e.get("rcpt") in stuck and e["event"] != "accepted"]


def test_a_list_that_starts_at_a_mute_receiver_is_not_let_out_a_sample_at_a_time(
    tmp_path: Path,
) -> None:
    """The first 200 rows at a receiver that never answers, min_sample 5: each
    sample_wait (2 s) let 5 more of them out, so the other domain's mail waited 40
    rounds (80 s; at the defaults, 10,000 rows of a dead domain held the rest for
    10 minutes). A domain whose sample went unanswered past sample_wait is slow:
    its mail leaves the count, and the rest goes after one sample_wait."""
    mute = socket.socket()  # completes TCP handshakes, never says a word
    mute.bind(("127.0.0.1", 0))
    mute.listen(512)
    stuck = [f"s{i}@stuck.example" for i in range(200)]
    ok = [f"u{i}@ok.example" for i in range(20)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, stuck + ok)
    conf = tmp_path / "fastsend.toml"
    conf.write_text("[guardrails]\nmin_sample = 5\nsample_wait = 2.0\n")
    log = tmp_path / "sink.jsonl"
    try:
        with SinkProcess("--log", str(log)) as sink:
            proc = subprocess.Popen(
                fastsend_cmd("send", str(camp), "-r", str(rcpts), "-c", str(conf), "--spool",
                             str(tmp_path / "spool"), "--route",
                             f"stuck.example=127.0.0.1:{mute.getsockname()[1]}",
                             "--route", f"*={sink.host}:{sink.port}", "--workers", "1",
                             "--no-dkim", "--no-progress"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 60  # (before: 80 s at the least)
                while len(received_counts(log)) < len(ok) if log.exists() else True:
                    assert proc.poll() is None and time.monotonic() < deadline, (
                        "the campaign's other mail waited for its dead domain, a sample at a time"
                    )
                    time.sleep(0.1)
                proc.send_signal(signal.SIGINT)
                _out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        mute.close()
    assert proc.returncode == 130, err[-3000:]
    assert set(received_counts(log)) == set(ok)
