"""A new user's first hour: README.md, docs/ and the examples, followed literally.

Each test is a claim the documentation makes (or a thing a user of the CLI expects
from it) checked against what the commands do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fastsend.sink import SinkThread

ROOT = Path(__file__).resolve().parent.parent

CAMPAIGN = """\
from = "News <news@example.com>"
subject = "Hello {{ first_name }}"
text = "Hi {{ first_name }}, ..."
html = "<p>Hi {{ first_name }}, ...</p>"
"""


def fastsend(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_send_counts_every_accepted_recipient_and_warns_of_no_crash(tmp_path: Path) -> None:
    """`fastsend send` accepts the list's first chunk before the engine starts. The
    rollups (`fastsend top`, /v1/stats) were attached after it: on a fresh spool the
    first chunk's accepted events were never counted (top: accepted 0, delivered 2),
    and every later send warned "the last run stopped without its last flush" after a
    run that ended cleanly."""
    (tmp_path / "campaign.toml").write_text(CAMPAIGN)
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\nb@example.org,B\n")
    with SinkThread() as sink:
        for _ in range(2):
            r = fastsend(
                "send", "campaign.toml", "-r", "list.csv", "--no-dkim", "--no-progress",
                "--route", f"*=127.0.0.1:{sink.port}", "--helo", "mta.example.com",
                "--spool", "spool", cwd=tmp_path,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert "rollups missed" not in r.stderr
    top = fastsend("top", "--once", "--spool", "spool", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", top.stdout)
    accepted = re.search(r"accepted\s+([\d,]+)\s+delivered\s+([\d,]+)", plain)
    assert accepted is not None, plain
    assert (accepted.group(1), accepted.group(2)) == ("4", "4")


def test_the_example_campaigns_own_instructions_work(tmp_path: Path) -> None:
    """examples/campaign.toml opens with the commands that send it. They said
    `fastsend send examples/campaign.toml recipients.csv` (send takes the list only as
    --recipients: exit 2), never made the keys its [[dkim]] tables name (exit 2, "key
    file not found", no word of keygen), and `dkim keygen --out keys/...` failed on
    the directory not made yet. Each command of the comment is run here as written,
    plus a route to a local sink for the send."""
    import shutil

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    head = (ROOT / "examples" / "campaign.toml").read_text().split("\n\n", 1)[0]
    commands = [
        ln[1:].strip() for ln in head.splitlines() if ln[1:].strip().startswith("fastsend ")
    ]
    assert [c.split()[1] for c in commands] == ["dkim", "dkim", "send"], commands
    (tmp_path / "recipients.csv").write_text("email,first_name,code\na@example.org,A,X1\n")
    with SinkThread() as sink:
        for c in commands:
            args = c.split()[1:]
            if args[0] == "send":
                args += ["--route", f"*=127.0.0.1:{sink.port}", "--helo", "mta.example.com",
                         "--no-progress", "--spool", "spool"]  # fmt: skip
            r = fastsend(*args, cwd=tmp_path)
            assert r.returncode == 0, (c, r.stderr)
        assert len(sink.messages) == 1


def test_a_missing_dkim_key_says_how_to_make_it(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        CAMPAIGN + '[dkim]\ndomain = "example.com"\nselector = "s1"\nkey = "k/s1.pem"\n'
    )
    (tmp_path / "list.csv").write_text("email,first_name\na@example.org,A\n")
    r = fastsend("send", "c.toml", "-r", "list.csv", "--spool", "spool", cwd=tmp_path)
    assert r.returncode == 2
    assert "key file not found" in r.stderr
    hint = re.search(r"`(fastsend dkim keygen [^`]+)`", r.stderr)
    assert hint is not None, r.stderr
    assert fastsend(*hint.group(1).split()[1:], cwd=tmp_path).returncode == 0
    assert (tmp_path / "k" / "s1.pem").is_file()
