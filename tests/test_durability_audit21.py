"""Durability and crash-safety audit, session 21: no process fastsend starts
outlives the one that started it (a kill -9 of the parent); signals at each
phase (SIGHUP while serve starts, to a worker, to a foreground send); clients
that leave mid-request."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
from tests._engine_helpers import (
    _env as engine_env,
)
from tests._engine_helpers import (
    fastsend_cmd,
    received_counts,
    write_campaign,
    write_recipients,
)
from tests._serve_helpers import Served, sink_message

from conftest import ServeProcess, free_port
from fastsend.sink import SinkProcess, SinkThread
from fastsend.spool import open_spool

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH") or str(ROOT / "src")
    return env


def _all_gone(procs: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    """The processes of ``procs`` still alive (zombies count as gone) after waiting
    up to ``timeout`` for all of them to end; killed then, so none outlives the test."""

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.05)
    left = [p for p in procs if alive(p)]
    for p in left:
        p.kill()
    return left


def _refused(port: int, timeout: float = 30.0) -> bool:
    """Whether connections to ``port`` are refused, waiting up to ``timeout`` for it:
    a killed process's socket outlives its main thread (shown a zombie) until its
    last thread has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_sink_workers_die_with_a_killed_parent_and_free_the_port() -> None:
    """``fastsend sink --workers 2``, its parent SIGKILLed: its workers had gone on
    running (adopted by init), the port still bound and taking mail, nothing to
    stop them. Now they die with it and the port refuses connections."""
    sink = SinkProcess("--workers", "2").start()
    assert sink.proc is not None
    parent = psutil.Process(sink.proc.pid)
    workers = parent.children()
    assert len(workers) == 2
    os.kill(sink.proc.pid, signal.SIGKILL)
    sink.proc.wait(30)
    assert _all_gone(workers) == [], "sink workers outlived their parent"
    assert _refused(sink.port)
    sink.stop()


def test_a_sink_started_to_die_with_its_parent_goes_with_it() -> None:
    """``fastsend demo`` starts a sink (SinkProcess); a kill -9 of the demo left
    the sink process and its port behind. ``SinkProcess(die_with_parent=True)``
    (demo's) has the sink, and its own workers, killed with the process that
    started it."""
    code = (
        "import sys, time\n"
        "from fastsend.sink import SinkProcess\n"
        "s = SinkProcess('--workers', '2', die_with_parent=True).start()\n"
        "print(s.proc.pid, s.port, flush=True)\n"
        "time.sleep(120)\n"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=_env(), text=True
    )
    try:
        assert starter.stdout is not None
        pid_text, port_text = starter.stdout.readline().split()
        sink = psutil.Process(int(pid_text))
        procs = [sink, *sink.children()]
        assert len(procs) == 3
        starter.kill()
        starter.wait(30)
        assert _all_gone(procs) == [], "the sink outlived the process that started it"
        assert _refused(int(port_text))
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()


def test_serves_report_parser_child_dies_with_a_killed_serve() -> None:
    """serve parses bounces and DMARC reports in a spawned child (ParsePool); a
    kill -9 of serve left that child (and multiprocessing's resource tracker it
    holds open) waiting forever on a queue nobody writes. It dies with serve now."""
    code = (
        "import asyncio\n"
        "from fastsend.serve.parsepool import ParsePool\n"
        "async def main():\n"
        "    pool = ParsePool()\n"
        "    await pool.read(b'Subject: x\\r\\n\\r\\nhello\\r\\n')\n"
        "    print(*pool._pool._processes, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=_env(), text=True
    )
    try:
        assert starter.stdout is not None
        pids = [int(x) for x in starter.stdout.readline().split()]
        assert pids
        procs = [psutil.Process(p) for p in pids]
        starter.kill()
        starter.wait(30)
        assert _all_gone(procs) == [], "the parse child outlived serve"
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()


def _frozen(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP: state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def test_a_sighup_while_serve_starts_is_a_reload_once_it_is_ready(
    tmp_path: Path,
) -> None:
    """serve handled SIGHUP only once started (listeners, webhooks, workers
    forked): one sent before (``systemctl reload`` or logrotate's postrotate
    during a start or a Restart=) killed it with the default action, its workers
    with it mid-transaction. serve is frozen right after its API listens
    (FASTSEND_TEST_FAULT), SIGHUP sent, then it goes on: it reaches ready, reads
    the config again and keeps running; SIGTERM still drains it (exit 0)."""
    port = free_port()
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[spool]\ndir = "spool"\n[workers]\ncount = 1\n'
        f'[delivery]\ntls = "off"\n[api]\nlisten = "127.0.0.1:{port}"\n'
    )
    s = ServeProcess(cfg, port, env={"FASTSEND_TEST_FAULT": "serve-stop-after-listen"},
                     ready=False)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _frozen(s.proc.pid):
            assert s.proc.poll() is None and time.monotonic() < deadline, s.lines
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGHUP)
        s.proc.send_signal(signal.SIGCONT)
        s.wait_line("configuration reloaded")
        assert s.proc.poll() is None, "".join(s.lines)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0, "".join(s.lines)
    finally:
        s.stop()


def test_a_worker_leaves_sighup_to_its_supervisor(tmp_path: Path) -> None:
    """A SIGHUP reaching serve's worker (a terminal's hangup to a foreground
    serve's process group, ``kill -HUP -PGID``) killed it mid-transaction ("worker
    0 exited with status -1; restarting it": what it was sending is sent again).
    A worker ignores it, as it does SIGTERM: reloads are the supervisor's. The
    message posted after it is delivered by the same worker."""
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}")
        try:
            (worker,) = psutil.Process(s.proc.pid).children()
            worker.send_signal(signal.SIGHUP)
            raw = "From: <x@evil.example>\r\nTo: <r@example.org>\r\nSubject: hup-1\r\n\r\nbody\r\n"
            st, out = s.req("POST", "/v1/messages",
                            {"from": "x@evil.example", "to": "r@example.org", "raw": raw})  # fmt: skip
            assert st == 202, out
            sink_message(sink, b"hup-1")
            log = "".join(s.lines)
            assert "exited with status" not in log, log
            assert worker.is_running()
        finally:
            s.stop()


# Runs a command with SIGHUP's default action, as in a terminal: a test runner
# started under nohup (a CI job, a landing gate) passes SIGHUP on ignored, and a
# send started ignoring it rightly rides a hangup out.
SIGHUP_DEFAULT = [sys.executable, "-c", "import os, signal, sys;"
                  " signal.signal(signal.SIGHUP, signal.SIG_DFL);"
                  " os.execv(sys.argv[1], sys.argv[1:])"]  # fmt: skip


def test_a_hangup_stops_a_foreground_send_as_sigterm_does(tmp_path: Path) -> None:
    """``fastsend send`` in a terminal that closes (an ssh session dropped: SIGHUP
    to the foreground process group) died at once, its workers too, mid-
    transaction (exit -1, no summary, every message on a connection an attempt
    of unknown outcome, sent again by resume). A hangup now stops it as SIGTERM
    does: the workers drain, exit 129 with the resume command, nothing in flight
    or of unknown outcome, the spool agreeing with what the receiver got."""
    addrs = [f"u{i}@d{i % 3}.example" for i in range(300)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "150") as sink:
        proc = subprocess.Popen(
            [*SIGHUP_DEFAULT, *fastsend_cmd("send", str(camp), "-r", str(rcpts), "--spool",
             str(spool), "--route", f"*={sink.host}:{sink.port}", "--workers", "2", "--no-dkim",
             "--no-progress")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=engine_env(),
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not log.exists() or len(received_counts(log)) < 10:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGHUP)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 129, err[-3000:]
    assert "stopped by SIGHUP" in err and "fastsend resume --spool" in err, err[-3000:]
    events = [orjson.loads(x) for x in (spool / "events.jsonl").read_bytes().splitlines()]
    assert not [e for e in events if "outcome unknown" in e.get("text", "")]
    sp = open_spool(str(spool))
    try:
        counts = sp.counts()
        rows = [m for i in range(1, len(addrs) + 1) if (m := sp.message(i))]
    finally:
        sp.close()
    assert counts.get("inflight", 0) == 0, counts
    got = received_counts(log)
    assert {m["rcpt"] for m in rows if m["state"] == "delivered"} == set(got)


def _left_mid_body(port: int, key: str, path: str, ctype: str) -> bytes:
    """A request whose client leaves once the server has taken it (its ``100
    Continue`` answered: the handler reads the body) with 10 of its 1,000 bytes
    sent; what the server had answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    got = sock.recv(4096)
    sock.sendall(b'{"to": "ab')
    sock.close()
    return got


def test_a_client_leaving_mid_body_is_no_internal_error(tmp_path: Path) -> None:
    """Each API client that left in the middle of its request body (a timeout, a
    crash, a balancer's reset) was logged as "internal error on POST ..." with a
    traceback: one per dropped request, a log any client could flood and an
    operator reads as a server bug. Now nothing is logged; a list being uploaded
    leaves no file; the API goes on answering."""
    s = Served(tmp_path, "127.0.0.1:9", serve_args=("--no-workers",))
    try:
        tpl = {"from": "a@evil.example", "subject": "s", "text": "t"}
        st, camp = s.req("POST", "/v1/campaigns", {"template": tpl, "paused": True})
        assert st == 201, camp
        paths = [("/v1/messages", "application/json"),
                 (f"/v1/campaigns/{camp['id']}/recipients", "text/csv")]  # fmt: skip
        for path, ctype in paths * 3:
            got = _left_mid_body(s.port, s.keys["evil"], path, ctype)
            assert got.startswith(b"HTTP/1.1 100"), got
        for _ in range(2):
            st, _listed = s.req("GET", "/v1/campaigns")
            assert st == 200
        log = "".join(s.lines)
        assert "internal error" not in log and "Traceback" not in log, log
        uploads = tmp_path / "spool" / "uploads"
        assert not uploads.exists() or os.listdir(uploads) == []
    finally:
        s.stop()


# ------------------------------------------------- a disk that is full from the start
def _fill(where: Path) -> Path:
    """A file taking every free byte of ``where``'s file system."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"\0" * (1 << 16)
        while block:
            try:
                os.write(fd, block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                block = block[: len(block) // 2]  # the last pages too
    finally:
        os.close(fd)
    return filler


def _fastsend(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastsend", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=_env())  # fmt: skip


def test_a_new_spool_on_a_full_disk_is_try_again_later_and_made_once_there_is_room(
    tmp_path: Path,
) -> None:
    """The first start of serve with its spool on a full disk (a 1 MB tmpfs
    filled) exited 2, "a usage or config error"; `apikey create` ended in a
    traceback; and the empty spool.db the cut creation left made `fastsend queue`
    a traceback ("no such table: messages"). Now: 75 (try again later) with one
    line saying the disk is full, `queue` says there is no spool (2), and once
    there is room the same serve starts and takes mail."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        port = free_port()
        cfg = disk / "fastsend.toml"
        cfg.write_text(
            f'[spool]\ndir = "spool"\n[workers]\ncount = 1\n'
            f'[delivery]\ntls = "off"\n[api]\nlisten = "127.0.0.1:{port}"\n'
        )
        filler = _fill(disk)
        serve = _fastsend("serve", "-c", str(cfg), cwd=disk)
        key = _fastsend("apikey", "create", "--tenant", "t", "-c", str(cfg), cwd=disk)
        for res in (serve, key):
            assert res.returncode == 75, res.stderr
            assert "is full" in res.stderr and "Traceback" not in res.stderr, res.stderr
        view = _fastsend("queue", "--spool", str(disk / "spool"), cwd=disk)
        assert view.returncode == 2, view.stderr
        assert "no spool at" in view.stderr and "Traceback" not in view.stderr, view.stderr
        filler.unlink()
        s = ServeProcess(cfg, port)
        try:
            assert s.proc.poll() is None, "".join(s.lines)
            key = _fastsend("apikey", "create", "--tenant", "t", "-c", str(cfg), cwd=disk)
            assert key.returncode == 0, key.stderr
            view = _fastsend("queue", "--spool", str(disk / "spool"), cwd=disk)
            assert view.returncode == 0, view.stderr
        finally:
            s.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_spool_opened_on_a_full_disk_is_try_again_later_and_goes_on_after(
    tmp_path: Path,
) -> None:
    """A spool a clean stop left (no -shm file) on a disk since filled: SQLite
    cannot size the -shm file (SQLITE_IOERR_SHMSIZE), which read "cannot be
    written (I/O error)", exit 2 "usage or config error", for `resume` and `serve`
    alike. It is the full disk: 75 (try again later); `queue` still shows it, and
    with room again `resume` carries on."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        spool = str(disk / "spool")
        camp = write_campaign(tmp_path)
        rcpts = write_recipients(tmp_path, [f"u{i}@example.net" for i in range(10)])
        route = ["--route", "*=127.0.0.1:9", "--max-wait", "1"]  # (nothing listens: deferred)
        first = _fastsend("send", str(camp), "-r", str(rcpts), "--spool", spool, "--no-dkim",
                          *route, cwd=tmp_path)  # fmt: skip
        assert first.returncode == 0, first.stderr
        assert not os.path.exists(os.path.join(spool, "spool.db-shm"))
        filler = _fill(disk)
        full = _fastsend("resume", "--spool", spool, *route, cwd=tmp_path)
        assert full.returncode == 75, full.stderr
        assert "is full" in full.stderr and "Traceback" not in full.stderr, full.stderr
        view = _fastsend("queue", "--spool", spool, cwd=tmp_path)
        assert view.returncode == 0, view.stderr
        filler.unlink()
        again = _fastsend("resume", "--spool", spool, *route, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_demo_stopped_by_ctrl_c_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    """``fastsend demo`` stopped by Ctrl-C while it sends exited 1 (its engine's 130
    read as a failed demo), its work directory removed under the ``resume`` command
    send had just printed for it. Now 130 as every command (README), saying the
    directory is gone (``--keep`` keeps it); its sink is gone too."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsend", "demo", "--recipients", "200000", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        demo = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        # Sending: its sink and its worker (a fork of the demo's own process) are up.
        while len(demo.children()) < 2 or not any(
            "sink" in " ".join(c.cmdline()) for c in demo.children()
        ):
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.05)
        kids = demo.children(recursive=True)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "removed (--keep keeps it)" in err, err[-3000:]
    assert _all_gone(kids) == []


def test_a_send_started_under_nohup_rides_out_the_hangup(tmp_path: Path) -> None:
    """``nohup fastsend send``: started ignoring SIGHUP so as to outlive its
    terminal; the hangup is no stop then: the send goes on to its end (exit 0,
    every recipient delivered)."""
    addrs = [f"u{i}@d{i % 3}.example" for i in range(300)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "20") as sink:
        proc = subprocess.Popen(
            ["nohup", *fastsend_cmd("send", str(camp), "-r", str(rcpts), "--spool",
             str(tmp_path / "spool"), "--route", f"*={sink.host}:{sink.port}", "--workers", "2",
             "--no-dkim", "--no-progress")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=engine_env(),
            start_new_session=True, cwd=tmp_path,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not log.exists() or len(received_counts(log)) < 10:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGHUP)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "delivered 300" in out, out
    assert set(received_counts(log)) == set(addrs)
