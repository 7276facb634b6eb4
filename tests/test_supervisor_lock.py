"""One supervisor per SQLite spool, with real processes.

Every process that supervises a SQLite spool (``send``, ``resume``, ``serve``)
holds ``supervisor.lock`` in it (a POSIX lock: the kernel drops it when the
holder dies). While a live one runs, a second one exits 75 naming it ("spool
DIR is in use by pid P (fastsend serve) since ...") before it touches the
queue, so the first one's in-flight mail is not requeued under it; the
read-only views (``fastsend queue``) still answer. After kill -9 of the holder
the next start runs and delivers every message exactly once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import orjson
from tests._engine_helpers import fastsend_cmd, received_counts, run_fastsend, summary
from tests._serve_helpers import Served

from fastsend.sink import SinkProcess
from fastsend.spool import open_spool

N = 40


def counts(spool: Path) -> dict[str, int]:
    view = open_spool(str(spool), readonly=True)
    try:
        return view.counts()
    finally:
        view.close()


def wait_inflight(spool: Path, timeout: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        c = counts(spool)
        if c["inflight"] > 0:
            return c
        assert time.monotonic() < deadline, c
        time.sleep(0.1)


def resume(spool: Path, route: str, *extra: str) -> list[str]:
    return ["resume", "--spool", str(spool), "--route", f"*={route}", "--workers", "1",
            "--json", "--no-progress", *extra]  # fmt: skip


def test_one_supervisor_per_sqlite_spool_and_kill_9_frees_it(tmp_path: Path) -> None:
    # A server that accepts connections and never greets: mail stays in flight.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)
    mute = f"127.0.0.1:{silent.getsockname()[1]}"
    spool = tmp_path / "spool"
    s = Served(tmp_path, mute)
    first: subprocess.Popen[str] | None = None
    try:
        msgs = [{"from": "a@example.com", "to": f"r{i}@d{i % 4}.example", "subject": "s",
                 "text": "t"} for i in range(N)]  # fmt: skip
        st, out = s.req("POST", "/v1/messages", {"messages": msgs}, tenant="acme")
        assert st == 202 and out["accepted"] == N, out
        before = wait_inflight(spool)

        # A second supervisor of any kind is refused, naming the live one.
        busy = run_fastsend(*resume(spool, mute, "--max-wait", "5"), timeout=60)
        assert busy.returncode == 75, busy.stderr
        assert f"spool {spool} is in use by pid {s.proc.pid} (fastsend serve) since " in busy.stderr
        camp = tmp_path / "c.toml"
        camp.write_text('from = "a@example.com"\nsubject = "x"\ntext = "y"\n')
        rcpts = tmp_path / "r.csv"
        rcpts.write_text("email\nz@d.example\n")
        sent = run_fastsend("send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool",
                            str(spool), "--route", f"*={mute}", "--no-progress")  # fmt: skip
        assert sent.returncode == 75 and "(fastsend serve)" in sent.stderr, sent.stderr
        again = run_fastsend("serve", "-c", str(s.cfg), timeout=60)  # a second server
        assert again.returncode == 75 and f"pid {s.proc.pid} (fastsend serve)" in again.stderr
        # Nothing was requeued or added under the live supervisor; the views still work.
        after = counts(spool)
        assert sum(after.values()) == N and after["inflight"] >= before["inflight"] > 0, after
        q = run_fastsend("queue", "--spool", str(spool))
        assert q.returncode == 0, q.stderr

        # kill -9 of the holder: its lock goes with it.
        s.proc.kill()
        s.proc.wait(10)
        first = subprocess.Popen(fastsend_cmd(*resume(spool, mute, "--max-wait", "120")),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 30
        lock = spool / "supervisor.lock"  # the holder names itself there once it holds it
        while orjson.loads(lock.read_bytes() or b"{}").get("pid") != first.pid:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr
            time.sleep(0.1)
        second = run_fastsend(*resume(spool, mute, "--max-wait", "5"), timeout=60)
        assert second.returncode == 75, second.stderr
        assert f"is in use by pid {first.pid} (fastsend resume) since " in second.stderr
        wait_inflight(spool)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)

        log = tmp_path / "sink.jsonl"
        with SinkProcess("--log", str(log)) as sink:
            host, port = sink.addresses[0]
            done = run_fastsend(*resume(spool, f"{host}:{port}", "--max-wait", "10"),
                                timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary(done)["delivered"] == N
        got = received_counts(log)
        assert len(got) == N and max(got.values()) == 1
    finally:
        if first is not None and first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        s.stop()
        silent.close()
