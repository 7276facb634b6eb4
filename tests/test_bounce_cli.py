"""`fastsend bounce classify` through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_bounce_audit24 import EXIM_TEXT
from test_bounce_parse import ARF, DSN


def _run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", "bounce", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def test_classify_files(tmp_path: Path) -> None:
    dsn, arf = tmp_path / "dsn.eml", tmp_path / "arf.eml"
    dsn.write_bytes(DSN)
    arf.write_bytes(ARF)
    p = _run("classify", str(dsn), str(arf))
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["recipient"] for r in rows] == [
        "nobody@example.org",
        "full@example.org",
        "later@example.org",
        "victim@isp.example",
    ]  # the delivered one is left out
    first = rows[0]
    for key in ("file", "recipient", "status", "reply_code", "reason", "hard", "feedback_type"):
        assert key in first
    assert (first["file"], first["status"], first["reply_code"]) == (str(dsn), "5.1.1", 550)
    assert (first["reason"], first["hard"], first["feedback_type"]) == ("userunknown", True, None)
    assert rows[3]["feedback_type"] == "abuse" and rows[3]["status"] is None
    p = _run("classify", "--include-delivered", str(dsn))
    assert len(p.stdout.splitlines()) == 4


def test_unreadable_file_reported_others_processed(tmp_path: Path) -> None:
    dsn = tmp_path / "dsn.eml"
    dsn.write_bytes(DSN)
    p = _run("classify", str(tmp_path / "missing.eml"), str(dsn))
    assert p.returncode == 1
    assert b"missing.eml" in p.stderr and b"cannot read" in p.stderr
    assert len(p.stdout.splitlines()) == 3


def test_stdin_and_extra_rules(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nreason = "filtered"\nmatch = ["local recipient table"]\n')
    p = _run("classify", "--rules", str(rules), "-", stdin=DSN)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[0])["reason"] == "filtered"


def test_bad_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text("[[rule]]\nreason = 'x'\nmatch = ['(']\n")
    p = _run("classify", "--rules", str(rules), "-", stdin=DSN)
    assert p.returncode == 2
    assert b"bad regular expression" in p.stderr and p.stdout == b""


def test_a_report_with_a_broken_encoded_word_is_read(tmp_path: Path) -> None:
    """A subject cut inside its encoded word: a traceback and exit 1 before."""
    f = tmp_path / "b.eml"
    f.write_bytes(
        EXIM_TEXT.format(subject="Undeliverable: =?UTF-8?B?0JLQsNGI0?=", params="").encode()
    )
    p = _run("classify", str(f))
    assert p.returncode == 0, p.stderr
    assert b"Traceback" not in p.stderr
    (line,) = p.stdout.splitlines()
    assert json.loads(line)["reason"] == "userunknown"
