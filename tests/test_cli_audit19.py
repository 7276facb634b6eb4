"""The small promises of the ``fastsend`` command line, audited from outside as a
new user meets them (session 19): usage errors, exit statuses, what a command
says when there is nothing for it to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._engine_helpers import send_via, summary, write_campaign, write_recipients
from tests.test_bounce_parse import DSN

from fastsend.sink import SinkProcess


def fastsend(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args], input=stdin, capture_output=True, timeout=60
    )


def test_no_command_is_a_usage_error() -> None:
    """`fastsend` alone printed the help on stdout and exited 0: a script that lost
    its command passed as done. Now: the usage on stderr, exit 2, as argparse does
    for every other usage error."""
    r = fastsend()
    assert r.returncode == 2
    assert r.stdout == b""
    assert b"usage: fastsend" in r.stderr and b"a command is required" in r.stderr
    assert fastsend("--help").returncode == 0  # asked for: not an error


def test_bounce_classify_says_not_a_bounce(tmp_path: Path) -> None:
    """A message that is no bounce printed nothing and exited 0, as a bounce whose
    lines were lost would: now it is said on stderr and the status is 1; the
    other files are still classified."""
    plain = tmp_path / "plain.eml"
    plain.write_bytes(b"From: a@b.example\r\nTo: c@d.example\r\nSubject: hi\r\n\r\nhello\r\n")
    dsn = tmp_path / "dsn.eml"
    dsn.write_bytes(DSN)
    r = fastsend("bounce", "classify", str(plain))
    assert r.returncode == 1 and r.stdout == b""
    assert f"{plain}: not a bounce".encode() in r.stderr
    r = fastsend("bounce", "classify", str(plain), str(dsn))
    assert r.returncode == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and {row["file"] for row in rows} == {str(dsn)}
    r = fastsend("bounce", "classify", "-", stdin=b"")
    assert r.returncode == 1 and b"-: not a bounce" in r.stderr
    assert fastsend("bounce", "classify", str(dsn)).returncode == 0


def test_fail_deferred_exits_75_while_mail_is_still_deferred(tmp_path: Path) -> None:
    """`send` exits 0 with mail still deferred (documented: it stays queued); a job
    that must know gets `--fail-deferred`: exit 75 (try again later), the count
    and the resume command on stderr; `resume` the same. With nothing deferred the
    flag changes nothing."""
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["ok@example.net", "tempfail-x@example.net"])
    with SinkProcess() as sink:
        addr = sink.addresses[0]
        engine = ("--workers", "1", "--max-wait", "0")
        common = ("--no-dkim", *engine)
        plain = send_via(camp, rcpts, addr, tmp_path / "s1", *common)
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert summary(plain)["deferred"] == 1
        strict = send_via(camp, rcpts, addr, tmp_path / "s2", *common, "--fail-deferred")
        assert strict.returncode == 75, strict.stderr[-2000:]
        s = summary(strict)
        assert (s["delivered"], s["deferred"]) == (1, 1)
        assert "1 recipient(s) still deferred" in strict.stderr
        assert "fastsend resume" in strict.stderr and "--fail-deferred" in strict.stderr
        again = subprocess.run(
            [sys.executable, "-m", "fastsend", "resume", "--spool", str(tmp_path / "s2"),
             "--route", f"*={addr[0]}:{addr[1]}", "--json", "--no-progress",
             *engine, "--fail-deferred"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode == 75, again.stderr[-2000:]
        clean = write_recipients(tmp_path, ["ok2@example.net"], name="clean.csv")
        done = send_via(camp, clean, addr, tmp_path / "s3", *common, "--fail-deferred")
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary(done)["deferred"] == 0
