"""A stop now tells what was never sent from what may have been: the SMTP
client's ``unsent()`` over both twins of its core (the end-to-end stop is in
test_shutdown.py, ``test_a_stop_now_counts_an_attempt_for_mail_past_data``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    write_campaign,
    write_recipients,
)

from _smtp_helpers import client_class
from fastsend.outcome import Envelope
from fastsend.sink import SinkProcess
from fastsend.spool import open_spool


def ready(impl: str, *caps: str) -> Any:
    c = client_class(impl)("client.example", mx="mx.example:25")
    c.receive_data(b"220 mx.example ESMTP\r\n")
    c.send_ehlo()
    lines = [b"250-mx.example"] + [b"250-" + k.encode() for k in caps] + [b"250 HELP"]
    c.receive_data(b"\r\n".join(lines) + b"\r\n")
    return c


def env(tag: Any, *rcpts: str) -> Envelope:
    return Envelope("s@example.org", list(rcpts or ("a@example.com",)), b"hi\r\n", tag=tag)


def test_pipelined_data_unsent_until_its_body_is_written(impl: str) -> None:
    c = ready(impl, "PIPELINING")
    c.send_envelopes([env(1), env([2, 3], "b@example.com", "c@example.com"), env(4)])
    # MAIL, RCPT, DATA of the first written, no 354 yet: nothing has a body out
    assert c.unsent() == [1, [2, 3], 4]
    c.receive_data(b"250 Ok\r\n250 Ok\r\n")
    assert c.unsent() == [1, [2, 3], 4]  # still waiting for 354
    c.receive_data(b"354 go\r\n")  # the body and its dot are written: past end of data
    assert c.data_to_send().startswith(b"hi\r\n.\r\n")
    assert c.unsent() == [[2, 3], 4]
    c.receive_data(b"250 2.0.0 queued\r\n")  # answered; the second's commands go out
    c.data_to_send()
    assert c.unsent() == [[2, 3], 4]
    c.receive_data(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert c.unsent() == [4]


def test_without_pipelining_and_with_bdat(impl: str) -> None:
    c = ready(impl)
    c.send_envelopes([env(1), env(2)])
    c.receive_data(b"250 Ok\r\n")  # MAIL taken, RCPT written
    assert c.unsent() == [1, 2]
    c.receive_data(b"250 Ok\r\n")
    c.receive_data(b"354 go\r\n")
    assert c.unsent() == [2]
    # CHUNKING: BDAT LAST goes with MAIL and RCPT, message and all: none unsent
    # once written, however many are in flight; the rest of the queue is.
    b = ready(impl, "PIPELINING", "CHUNKING")
    b.send_envelopes([env(i) for i in range(1, 40)])
    left = b.unsent()
    assert left and left == list(range(40 - len(left), 40))
    assert 1 not in left


def test_sigterm_to_the_whole_process_group_still_drains(tmp_path: Path) -> None:
    """systemd stops a unit with SIGTERM to every process of its cgroup
    (KillMode=control-group, its default), as ``kill -TERM -PGID`` does: the
    workers got the supervisor's SIGTERM too and died at once, mid-transaction,
    so a ``systemctl stop`` was never the drain it promises (every message on
    a connection one attempt of unknown outcome, sent again). A worker now
    leaves SIGTERM to its supervisor, which drains it (Drain) or stops it now
    (SIGUSR1)."""
    addrs = [f"u{i}@d{i % 3}.example" for i in range(300)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "150") as sink:
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(rcpts), "--spool", str(spool), "--route",
                         f"*={sink.host}:{sink.port}", "--workers", "2", "--no-dkim",
                         "--no-progress"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not log.exists() or len(received_counts(log)) < 10:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 143, err[-3000:]
    events = [json.loads(x) for x in (spool / "events.jsonl").read_text().splitlines()]
    unknown = [e for e in events if "outcome unknown" in e.get("text", "")]
    assert not unknown, (len(unknown), unknown[:2], err[-2000:])
    s = open_spool(str(spool))
    try:
        counts = s.counts()
        rows = [m for i in range(1, len(addrs) + 1) if (m := s.message(i))]
    finally:
        s.close()
    assert counts.get("inflight", 0) == 0, counts
    got = received_counts(log)
    assert {m["rcpt"] for m in rows if m["state"] == "delivered"} == set(got)
    assert all(m["attempts"] == 0 for m in rows if m["state"] == "queued")
