"""``fastsend top`` driven in a real terminal (tmux): its screen captured, a live update
seen, ``q`` quits and gives the terminal back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import require_program
from fastsend.analytics.rollup import Rollups, policy_provider
from fastsend.analytics.store import SQLiteRollupStore

ARTIFACTS = os.environ.get("FASTSEND_ARTIFACTS", "")


def emit(spool: Path, first: int, n: int, t: float) -> None:
    store = SQLiteRollupStore(str(spool))
    r = Rollups(store, tenant_of=lambda c: "acme", provider_of=policy_provider(None))
    evs = []
    for i in range(first, first + n):
        rcpt = f"u{i}@gmail.com" if i % 2 else f"u{i}@yahoo.com"
        mx = "gmail-smtp-in.l.google.com" if i % 2 else "mta5.am0.yahoodns.net"
        evs.append({"time": t, "event": "accepted", "id": i, "campaign": 1, "tenant": "acme",
                    "rcpt": rcpt})  # fmt: skip
        kind = "bounced" if i % 10 == 0 else "delivered"
        evs.append({"time": t, "event": kind, "id": i, "campaign": 1, "rcpt": rcpt, "mx": mx,
                    "source_ip": "127.0.0.2", "code": 550, "enhanced": "5.1.1",
                    "text": "user unknown"})  # fmt: skip
    r.listener(evs)
    r.close()


def test_top_in_tmux(tmp_path: Path) -> None:
    require_program("tmux")
    spool = tmp_path / "spool"
    now = time.time()
    emit(spool, 0, 100, now - 120)
    session = f"fstop{os.getpid()}"
    sock = ["-L", session]  # a private tmux server: nothing shared with a user's tmux
    cmd = (f"cd {tmp_path} && PYTHONPATH={os.environ.get('PYTHONPATH', '')} {sys.executable}"
           f" -m fastsend top --spool {spool} --interval 0.5; echo TOP-EXITED $?; sleep 30")  # fmt: skip
    subprocess.run(["tmux", *sock, "new-session", "-d", "-s", session, "-x", "150", "-y", "50",
                    cmd], check=True)  # fmt: skip
    try:
        cap = lambda: subprocess.run(  # noqa: E731
            ["tmux", *sock, "capture-pane", "-p", "-t", session], check=True,
            capture_output=True, text=True).stdout  # fmt: skip

        def wait(want: str, timeout: float = 60.0) -> str:
            deadline = time.monotonic() + timeout
            while True:
                screen = cap()
                if want in screen:
                    return screen
                if time.monotonic() > deadline:
                    raise AssertionError(f"{want!r} not on the screen:\n{screen}")
                time.sleep(0.2)

        subprocess.run(["tmux", *sock, "resize-window", "-t", session, "-x", "150", "-y", "50"],
                       check=True)  # fmt: skip
        screen = wait("127.0.0.2")
        assert "fastsend top" in screen and "all tenants" in screen
        assert "bounced 10 (hard 10)" in screen
        assert "BY PROVIDER" in screen and "google" in screen and "yahoo" in screen
        assert "bounced by reason: userunknown 10" in screen
        assert "10.00%" in screen  # the bounce rate
        if ARTIFACTS:
            Path(ARTIFACTS, "top-1.txt").write_text(screen)
        emit(spool, 100, 100, time.time())  # more mail: the screen follows
        screen = wait("delivered 180")
        assert "userunknown 20" in wait("yahoo")
        assert "bounced 20 (hard 20)" in screen
        if ARTIFACTS:
            Path(ARTIFACTS, "top-2.txt").write_text(screen)
        subprocess.run(["tmux", *sock, "send-keys", "-t", session, "q"], check=True)
        screen = wait("TOP-EXITED 0")
        assert "BY PROVIDER" not in screen  # the alternate screen is gone
    finally:
        subprocess.run(["tmux", *sock, "kill-server"], check=False, capture_output=True)


def test_top_once_and_errors(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    emit(spool, 0, 20, time.time() - 60)
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "fastsend", "top", "--spool", str(spool),
                          "--once", "--tenant", "acme"], capture_output=True, text=True,
                         env=env, check=True).stdout  # fmt: skip
    assert "tenant acme" in out and "delivered 18" in out
    other = subprocess.run([sys.executable, "-m", "fastsend", "top", "--spool", str(spool),
                            "--once", "--tenant", "beta"], capture_output=True, text=True,
                           env=env, check=True).stdout  # fmt: skip
    assert "delivered 0" in other
    bad = subprocess.run([sys.executable, "-m", "fastsend", "top", "--spool",
                          str(tmp_path / "nothing"), "--once"], capture_output=True, text=True,
                         env=env)  # fmt: skip
    assert bad.returncode == 2 and "no rollups yet" in bad.stderr


def test_top_to_a_file_or_pipe_writes_plain_frames(tmp_path: Path) -> None:
    """`fastsend top > top.log` (or `| tee`) wrote the full-screen view's screen and
    cursor sequences into the file, a frame a second, for ever. Output that is no
    terminal now gets plain frames, one per --interval, as `top -b`."""
    spool = tmp_path / "spool"
    emit(spool, 0, 20, time.time() - 60)
    proc = subprocess.Popen([sys.executable, "-m", "fastsend", "top", "--spool", str(spool),
                             "--interval", "0.2"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        got = b""
        assert proc.stdout is not None
        while got.count(b"fastsend top") < 2:  # two frames
            chunk = proc.stdout.read1(65536)
            assert chunk, proc.stderr.read() if proc.stderr else b""
            got += chunk
    finally:
        proc.terminate()
        proc.wait(30)
    assert b"\x1b" not in got and b"delivered 18" in got and b"(q quits)" not in got
