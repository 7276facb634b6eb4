"""`fastsend sink` as a real subprocess: startup line, faults, --count, SIGTERM summary, errors."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsend.sink import SinkProcess

FROM = "sender@example.test"
BODY = b"Message-ID: <cli@example.test>\r\nSubject: t\r\n\r\nhello\r\n"


def fastsend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_sink() -> None:
    out = fastsend("--help").stdout
    assert "sink" in out and "fault-injecting" in out
    assert "--defer-rate" in fastsend("sink", "--help").stdout


def test_sigterm_prints_summary() -> None:
    with SinkProcess() as p:
        with smtplib.SMTP(p.host, p.port) as c:
            c.sendmail(FROM, ["a@x.test", "permfail-1@x.test"], BODY)
            c.sendmail(FROM, ["b@x.test"], BODY)
        rc = p.stop(signal.SIGTERM)
    assert rc == 0
    summary = [ln for ln in p.stdout.splitlines() if ln.startswith("summary:")]
    assert len(summary) == 1
    s = summary[0]
    assert "connections 1," in s and "messages 2," in s and "recipients 2," in s
    assert "permfail 1" in s and "msg/s" in s


def test_sigint_also_summarises() -> None:
    with SinkProcess("--json") as p:
        rc = p.stop(signal.SIGINT)
    assert rc == 0
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["messages"] == 0 and summary["faults"] == {}


def test_count_exits_and_logs(tmp_path: Path) -> None:
    log, save = tmp_path / "log.jsonl", tmp_path / "msgs"
    with SinkProcess(
        "--count",
        "3",
        "--log",
        str(log),
        "--save",
        str(save),
        "--json",
        listen="127.0.0.1:0,127.0.0.3:0",
    ) as p:
        assert len(p.addresses) == 2 and p.addresses[1][0] == "127.0.0.3"
        with smtplib.SMTP(p.host, p.port) as c:
            c.sendmail(FROM, ["a@x.test"], BODY)
        with smtplib.SMTP("127.0.0.3", p.addresses[1][1]) as c:
            c.sendmail(FROM, ["b@x.test", "c@x.test"], BODY)
            c.sendmail(FROM, ["tempfail-x@x.test", "d@x.test"], BODY)
        rc = p.wait(timeout=60)
    assert rc == 0
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["messages"] == 3 and summary["recipients"] == 4
    assert summary["faults"] == {"tempfail": 1}
    records = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [r["recipients"] for r in records] == [
        ["a@x.test"],
        ["b@x.test", "c@x.test"],
        ["d@x.test"],
    ]
    assert {r["message_id"] for r in records} == {"<cli@example.test>"}
    assert sorted(f.read_bytes() for f in save.iterdir()) == [BODY] * 3


def test_fault_text_and_max_connections() -> None:
    with SinkProcess(
        "--fault-text",
        "permfail=554 5.7.1 Service unavailable; client blocked",
        "--max-connections",
        "1",
    ) as p:
        with smtplib.SMTP(p.host, p.port) as c:
            refused = c.sendmail(FROM, ["ok@x.test", "permfail-a@x.test"], BODY)
            assert refused["permfail-a@x.test"] == (
                554,
                b"5.7.1 Service unavailable; client blocked",
            )
            with pytest.raises(smtplib.SMTPConnectError) as e:
                smtplib.SMTP(p.host, p.port)
            assert e.value.smtp_code == 421
        p.stop()
    assert "max-connections 1" in p.stdout


def test_progress_lines() -> None:
    """A progress line a second on stderr with --progress (no TTY). Read until it
    comes (it was a fixed 2.5 s: a loaded CI's sink had printed none yet)."""
    import select

    with SinkProcess("--progress") as p:
        assert p.proc is not None and p.proc.stderr is not None
        fd = p.proc.stderr.fileno()
        got = b""
        deadline = time.monotonic() + 60
        while b"sink: 0 msgs" not in got:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], got
            chunk = os.read(fd, 65536)
            assert chunk, got  # (the sink exited)
            got += chunk
        p.stop()
    assert p.returncode == 0 and "rcpts" in got.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defer-rate", "2"], "within 0..1"),
        (["--listen", "nonsense"], "bad listen address"),
        (["--fault-text", "bogus=451 x"], "bad fault text"),
        (["--fault-text", "tempfail=250 fine"], "4xx or 5xx"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"], "no such file"),
        (["--tls-cert", __file__], "both tls_cert and tls_key"),
        (["--auth", "nocolon"], "USER:PASSWORD"),
    ],
)
def test_bad_options(args: list[str], message: str) -> None:
    r = fastsend("sink", "--listen", "127.0.0.1:0", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


def test_port_in_use() -> None:
    """Exit 2, as serve's (a config error before anything was done; was 1,
    "it ran, but not all of it was done"), with or without --workers."""
    with SinkProcess() as p:
        r = fastsend("sink", "--listen", f"127.0.0.1:{p.port}", "--quiet")
        many = fastsend("sink", "--listen", f"127.0.0.1:{p.port}", "--workers", "2", "--quiet")
        p.stop()
    assert r.returncode == 2, r.stderr
    assert "cannot listen" in r.stderr
    assert many.returncode == 2 and "cannot listen" in many.stderr, many.stderr


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (/proc/PID/status SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def test_quiet_prints_nothing() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsend", "sink", "--listen", "127.0.0.1:0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Nothing to read: until it handles SIGTERM (it was a fixed 1 s, and a sink that
    # started later, on a loaded CI, was killed by the signal: status -15).
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and out == "" and err == ""


def test_workers_share_the_port_and_sum_their_counters(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    with SinkProcess("--workers", "2", "--json", "--log", str(log)) as p:
        for i in range(12):
            with smtplib.SMTP(p.host, p.port) as c:
                c.sendmail(FROM, [f"a{i}@x.test", f"permfail-{i}@x.test"], BODY)
        rc = p.stop(signal.SIGTERM)
    assert rc == 0
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2
    assert summary["connections"] == 12 and summary["messages"] == 12
    assert summary["recipients"] == 12 and summary["faults"] == {"permfail": 12}
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert sorted(r["recipients"][0] for r in lines) == sorted(f"a{i}@x.test" for i in range(12))
    peers = {r["queue_id"][6:10] for r in lines}  # the pid part of the queue id
    assert len(peers) == 2, "both workers took connections"


def test_workers_stop_at_the_total_count() -> None:
    with SinkProcess("--workers", "2", "--count", "5", "--json") as p:
        for i in range(5):
            with smtplib.SMTP(p.host, p.port) as c:
                c.sendmail(FROM, [f"b{i}@x.test"], BODY)
        rc = p.wait(timeout=20)
    assert rc == 0
    assert json.loads(p.stdout.strip().splitlines()[-1])["messages"] == 5


def _frozen(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP: state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


@pytest.mark.parametrize(("fault", "workers"), [("sink-stop-after-listen", "1"),
                                                ("sink-stop-after-fork", "2")])  # fmt: skip
def test_a_sigterm_once_the_port_answers_gets_the_summary(fault: str, workers: str) -> None:
    """A script that waits for the sink's port (not its "ready" line) and then
    sends SIGTERM: the sink listened before it handled SIGTERM (with --workers,
    the parent before its handler, its workers listening), and a signal in that
    window killed it without a summary (status -15; a loaded CI met it). The sink
    is frozen (SIGSTOP, FASTSEND_TEST_FAULT) right after it listens / forks, the
    SIGTERM sent, then it goes on: the signal is handled, the summary printed."""
    from conftest import free_port, wait_port

    port = free_port()
    env = {**os.environ, "FASTSEND_TEST_FAULT": fault}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsend", "sink", "--listen", f"127.0.0.1:{port}",
         "--workers", workers, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _frozen(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        wait_port("127.0.0.1", port)  # it listens (the kernel answers for it)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (proc.returncode, err)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["messages"] == 0, out
