"""Stopping ``fastsend serve`` while its Redis spool is gone or paused, and
``fastsend send`` while its receiver never answers.

Real parts: redis-server (AOF, ``appendfsync always``), the ``fastsend serve``
binary, a receiver that accepts TCP and never answers (the windows stay in
flight), then fastsend's own sink for the restart. The promise (serve/main.py,
queue/supervisor.py, deploy/fastsend.service): the first SIGTERM drains and
ends, a second stops at once, and nothing accepted is lost: a restart with
Redis back delivers every recipient.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    run_fastsend,
    write_campaign,
    write_recipients,
)
from tests.test_multinode import TPL, Node, _req, _rows
from tests.test_multinode_outage import Redis

from fastsend.sink import SinkProcess
from fastsend.spool import open_spool

N = 200


def _mute_receiver() -> tuple[socket.socket, tuple[str, int]]:
    """A port that completes TCP handshakes (the backlog) and never says a word."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    return s, s.getsockname()


async def _inject(node: Node, key: str) -> int:
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0), force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        r = await _req(s, "POST", node.base + "/v1/campaigns", key,
                       {"name": "m", "template": TPL, "recipients": _rows("s", N)},
                       ok=201)  # fmt: skip
        return int(r["id"])


def _start(tmp: Path, redis: Redis) -> tuple[str, str, Node, socket.socket]:
    url = f"redis://127.0.0.1:{redis.port}/0?prefix=st&lease=4"
    key = subprocess.run(
        [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", "acme", "--spool", url],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    mute, addr = _mute_receiver()
    # short drain limits (defaults 30 s and 10 s) keep the test quick
    node = Node(tmp, "n0", "127.0.0.2", url, addr, delivery="drain_limit = 8\ndrain_outage = 2")
    node.wait_ready()
    return url, key, node, mute


def _redeliver(tmp: Path, url: str, cid: int) -> None:
    """Redis back: the same node (same node= name) started again with a sink
    that answers delivers every recipient."""
    log = tmp / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        node = Node(tmp, "n0", "127.0.0.2", url, sink.addresses[0])
        try:
            node.wait_ready()
            spool = open_spool(url)
            deadline = time.monotonic() + 120
            while (c := spool.counts(cid))["delivered"] < N:
                assert time.monotonic() < deadline, (c, node.output()[-3000:])
                time.sleep(0.2)
            spool.close()
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(120) == 0, node.output()[-3000:]
        finally:
            if node.proc.poll() is None:
                node.proc.kill()
    got = received_counts(log)
    assert set(got) >= {r["email"] for r in _rows("s", N)}


def test_one_sigterm_ends_a_drain_while_redis_is_down(tmp_path: Path) -> None:
    """Redis killed under a node whose windows wait on a receiver that never
    answers: one SIGTERM ends the process (exit 0), saying why, with one line
    per outage from the periodic flush, not a traceback every 0.2 s; a restart
    delivers everything. Before: the drain waited for Redis for ever (systemctl
    stop ended in SIGKILL), and a second SIGTERM exited 1 with a traceback."""
    rdir = tmp_path / "redis"
    rdir.mkdir()
    redis = Redis(rdir)
    redis.start()
    node = None
    try:
        url, key, node, mute = _start(tmp_path, redis)
        cid = asyncio.run(_inject(node, key))
        time.sleep(1.0)  # the windows claim and connect
        redis.kill()
        time.sleep(1.5)
        node.proc.send_signal(signal.SIGTERM)
        try:
            rc = node.proc.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError("still draining: " + node.output()[-3000:]) from None
        out = node.output()
        assert rc == 0, out[-3000:]
        assert "draining with the spool out of reach" in out, out[-3000:]
        assert "periodic flush failed" not in out, out[-3000:]
        assert out.count("periodic flush: the spool is out of reach") <= 2, out[-3000:]
        mute.close()
        redis.start()
        _redeliver(tmp_path, url, cid)
    finally:
        if node is not None and node.proc.poll() is None:
            node.proc.kill()
        redis.stop()


def test_two_sigterms_stop_a_node_whose_redis_is_paused(tmp_path: Path) -> None:
    """Redis paused (SIGSTOP: connections open, no reply): two SIGTERMs stop
    the node cleanly (exit 0, no traceback); once Redis continues, a restart
    delivers everything. Before: the stop path called Redis unguarded and
    exited 1 with a traceback (its workers not reaped), after every step of
    the loop had waited out the client's timeout in turn."""
    rdir = tmp_path / "redis"
    rdir.mkdir()
    redis = Redis(rdir)
    redis.start()
    node = None
    assert redis.proc is not None
    try:
        url, key, node, mute = _start(tmp_path, redis)
        cid = asyncio.run(_inject(node, key))
        time.sleep(1.0)
        redis.proc.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        node.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        node.proc.send_signal(signal.SIGTERM)
        try:
            rc = node.proc.wait(150)
        except subprocess.TimeoutExpired:
            raise AssertionError("still up: " + node.output()[-3000:]) from None
        assert rc == 0, node.output()[-3000:]
        assert "Traceback" not in node.output(), node.output()[-3000:]
        redis.proc.send_signal(signal.SIGCONT)
        mute.close()
        _redeliver(tmp_path, url, cid)
    finally:
        if node is not None and node.proc.poll() is None:
            node.proc.kill()
        if redis.proc.poll() is None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


def test_one_sigterm_ends_a_send_whose_receiver_never_answers(tmp_path: Path) -> None:
    """``fastsend send`` to a receiver that accepts TCP and never says a word:
    one SIGTERM ends it within the drain limit (the windows go back to the
    queue, none left in flight), and ``fastsend resume`` delivers every
    recipient. Before: the drain waited for the connections' command timeout
    (300 s; systemd's TimeoutStopSec=90 would SIGKILL a serve node)."""
    import sqlite3

    addrs = [f"u{i}@d{i % 5}.example" for i in range(N)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = tmp_path / "spool"
    conf = tmp_path / "fastsend.toml"
    conf.write_text("[delivery]\ndrain_limit = 3\n")  # configurable (default 30 s)
    mute, (host, port) = _mute_receiver()
    proc = subprocess.Popen(
        fastsend_cmd("send", str(camp), "-r", str(rcpts), "--route", f"*={host}:{port}",
                     "--spool", str(spool), "--no-dkim", "--no-progress", "--workers", "1",
                     "-c", str(conf)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        db = sqlite3.connect(spool / "spool.db") if (spool / "spool.db").exists() else None
        deadline = time.monotonic() + 60
        while True:  # wait until the window is on the mute connections
            if db is None and (spool / "spool.db").exists():
                db = sqlite3.connect(spool / "spool.db")
            if db is not None:
                try:
                    n = db.execute("SELECT count(*) FROM messages WHERE state = 1").fetchone()[0]
                except sqlite3.OperationalError:
                    n = 0
                if n:
                    break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=200)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
            raise AssertionError("still draining: " + err[-3000:]) from None
        assert "still draining after 3 s" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        mute.close()
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        r = run_fastsend("resume", "--spool", str(spool), "--route", f"*={sink.host}:{sink.port}",
                         "--no-progress", "--workers", "1", "--max-wait", "5")  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert set(received_counts(log)) == set(addrs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_send_stopped_by_a_signal_exits_non_zero_with_the_command_that_resumes(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """``fastsend send`` stopped by SIGTERM (it drains) or SIGINT (stops now)
    while a list is delivered to a slow receiver: it exits 128 + the signal
    (143, 130: what a shell reports for a process the signal ended, so a script
    or systemd sees the run did not finish), says how many messages are still
    queued, and prints the exact ``fastsend resume`` command, which run as it
    is (from another directory) delivers the rest. Before: exit 0, and nothing
    said that mail was left."""
    import shlex

    addrs = [f"s{i}@d{i % 3}.example" for i in range(N)]
    # 20/s: a SIGTERM drain keeps what a site may send within 2 s (DRAIN_HORIZON),
    # so mail is surely left queued (at 80/s the drain sometimes sent it all)
    (tmp_path / "fastsend.toml").write_text(
        "[shaping.default]\nmessages_per_second = 20.0\nburst = 1\n"
    )
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(rcpts), "--spool", "spool", "-c",
                         "fastsend.toml",
                         "--route", f"*={sink.host}:{sink.port}", "--no-dkim", "--no-progress",
                         "--workers", "1", "--max-wait", "5"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(received_counts(log)) < 20:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
        counts = dict(zip(out.split()[::2], out.split()[1::2], strict=False))
        line = next((x for x in err.splitlines() if "continue with: " in x), "")
        assert f"stopped by {sig.name}" in line, err[-3000:]
        left = int(counts["deferred"])
        assert left > 0 and left == len(addrs) - int(counts["delivered"]), out
        assert f" {left:,} message(s) still queued" in line, (left, line)
        cmd = shlex.split(line.split("continue with: ", 1)[1])
        assert cmd[:2] == ["fastsend", "resume"], cmd
        other = tmp_path / "elsewhere"
        other.mkdir()
        # The rest at full speed (the 20/s only had to leave mail at the signal; the
        # resume spent ~8 s sending it): the command reads this same file.
        (tmp_path / "fastsend.toml").write_text("")
        r = subprocess.run([*fastsend_cmd(*cmd[1:]), "--no-progress"],
                           capture_output=True, text=True, env=_env(), cwd=other, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert set(received_counts(log)) == set(addrs)


@pytest.mark.parametrize("workers", [False, True])
def test_a_second_sigterm_stops_serve_at_once_while_a_request_is_in_progress(
    workers: bool, tmp_path: Path
) -> None:
    """``fastsend serve`` (with and without ``--no-workers``) draining while an
    authenticated client sends a request body slowly: the first SIGTERM waits
    for the request (a drain lets requests in progress finish), a second one
    stops the process at once, cut-off request and all. Before: the second
    SIGTERM did nothing and the drain waited for the request up to aiohttp's
    60 s shutdown timeout (systemd's stop would end in SIGKILL)."""
    from conftest import free_port

    spool = tmp_path / "spool"
    key = run_fastsend("apikey", "create", "--tenant", "acme", "--spool", str(spool))
    assert key.returncode == 0, key.stderr
    port = free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'[spool]\ndir = "{spool}"\n[api]\nlisten = "127.0.0.1:{port}"\n'
                   '[workers]\ncount = 1\n')  # fmt: skip
    args = ["serve", "-c", str(cfg)] + ([] if workers else ["--no-workers"])
    proc = subprocess.Popen(fastsend_cmd(*args), stderr=subprocess.PIPE, text=True, env=_env())
    slow = None
    try:
        assert proc.stderr is not None
        err = ""
        while "ready in" not in err:
            line = proc.stderr.readline()
            assert line, err
            err += line
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(
            b"POST /v1/campaigns HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key.stdout.strip().encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
        slow.settimeout(30)
        time.sleep(0.5)  # the request reaches its handler (reading the body)
        proc.send_signal(signal.SIGTERM)
        while "draining" not in err:
            line = proc.stderr.readline()
            assert line, err
            err += line
        time.sleep(0.5)
        assert proc.poll() is None, err  # the drain waits for the request
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)  # well under the 60 s the request could hold the drain
        except subprocess.TimeoutExpired:
            raise AssertionError("the second SIGTERM did not stop serve: " + err) from None
        err += proc.stderr.read()
        assert rc == 0, err
        assert "stopping now" in err and "Traceback" not in err, err
    finally:
        if slow is not None:
            slow.close()
        if proc.poll() is None:
            proc.kill()


def test_send_and_resume_stop_the_same_way_when_the_spools_storage_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``send`` and ``resume`` run their engine through one helper
    (``commands.common.run_engine``): a run that ends in the spool's storage
    refusing a write (a full disk) says so plainly with the command that goes
    on, exit 75 (EX_TEMPFAIL), the event log and the suppression list closed
    (the event log even when its own flush fails on that disk); any other
    error propagates; a run that ends closes both and gives its summary."""
    import errno

    from fastsend.commands.common import run_engine
    from fastsend.events import EventLog

    class Closable:
        closed = 0

        def close(self) -> None:
            self.closed += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    def full() -> dict[str, int]:
        raise OSError(errno.ENOSPC, "No space left on device")

    events, supp = Closable(), Closable()
    assert run_engine(full, str(tmp_path / "spool"), events, supp) == 75
    err = capsys.readouterr().err
    assert "is full" in err and "Nothing accepted is lost" in err, err
    assert f"fastsend resume --spool {tmp_path / 'spool'}" in err, err
    assert events.closed == supp.closed == 1

    def broken() -> dict[str, int]:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        run_engine(broken, "spool", EventLog(None), None)
    log = EventLog(str(tmp_path / "events.jsonl"))
    log.emit_rows([{"event": "x"}])
    assert run_engine(lambda: {"delivered": 1}, "spool", log, None) == {"delivered": 1}
    assert log._fd == -1 and (tmp_path / "events.jsonl").read_text().count("\n") == 1


class _NeverAnswersTheDot:
    """An aiosmtpd handler that takes every message whole (recording its
    recipients) and never answers the final dot: what was sent is past DATA
    and its outcome unknown to the sender (a reply lost, a stalled receiver)."""

    def __init__(self) -> None:
        self.rcpts: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.rcpts.extend(envelope.rcpt_tos)
        await asyncio.sleep(3600)
        return "250 2.0.0 never said"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_stop_now_counts_an_attempt_for_mail_past_data(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``fastsend send`` stopped now (SIGINT) while its receiver holds messages
    past DATA without answering the final dot: each of those messages may have
    been delivered, so it counts one attempt of unknown outcome (attempts 1,
    a deferred event saying so), as a killed worker's or node's window does;
    ``resume`` then delivers every recipient (nothing lost). Before: the
    windows went back as if never tried (attempts 0, no event); then the whole
    window counted, also what had never been sent (the worker now tells which:
    ``Worker.stop_now``)."""
    from aiosmtpd.controller import Controller

    from conftest import free_port

    addrs = [f"u{i}@d{i % 4}.example" for i in range(40)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    if backend == "redis":
        spool = request.getfixturevalue("redis_server").url(dir=str(tmp_path / "local"))
        events = tmp_path / "local" / "events.jsonl"
    else:
        spool = str(tmp_path / "spool")
        events = tmp_path / "spool" / "events.jsonl"
    handler = _NeverAnswersTheDot()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        proc = subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(rcpts), "--spool", spool, "--route",
                         f"*=127.0.0.1:{ctl.port}", "--no-dkim", "--no-progress", "--workers",
                         "1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not handler.rcpts:  # a transaction is past DATA
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.05)
            time.sleep(0.5)  # the other connections' transactions get there too
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err[-3000:]
    finally:
        ctl.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(ctl.loop)])
        ctl.stop()
    past_data = set(handler.rcpts)
    assert past_data, err[-3000:]
    s = open_spool(spool)
    try:
        rows = {m["rcpt"]: m for i in range(1, len(addrs) + 1) if (m := s.message(i))}
        assert set(rows) == set(addrs)
        for rcpt in past_data:
            assert rows[rcpt]["attempts"] == 1 and rows[rcpt]["state"] != "delivered", rows[rcpt]
    finally:
        s.close()
    told = {
        e["rcpt"]
        for e in map(json.loads, events.read_text().splitlines())
        if e.get("event") == "deferred" and "outcome unknown" in e.get("text", "")
    }
    assert past_data <= told, (past_data - told, err[-2000:])
    # What had not reached its end of data (queued behind the stuck message on
    # its connection, or on the ready queue) was never sent: released without an
    # attempt. Before, the worker's whole window counted one attempt each.
    never_sent = set(addrs) - past_data
    assert never_sent and not (never_sent & told), (never_sent & told, err[-2000:])
    for rcpt in never_sent:
        assert rows[rcpt]["attempts"] == 0 and rows[rcpt]["state"] == "queued", rows[rcpt]
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        r = run_fastsend("resume", "--spool", spool, "--route", f"*={sink.host}:{sink.port}",
                         "--no-progress", "--workers", "1", "--max-wait", "5")  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert set(received_counts(log)) == set(addrs)


def test_a_reload_stops_a_worker_that_cannot_finish_its_window(tmp_path: Path) -> None:
    """``fastsend serve`` (one worker) reloaded (SIGHUP) while a receiver holds
    a message past DATA without answering: the worker being replaced finishes
    its window for at most ``[delivery] drain_limit``, then stops (that
    message one attempt of unknown outcome, sent again), and the new worker
    delivers the mail that came meanwhile. Before: the slot took no mail until
    the stuck transaction timed out (minutes): the node delivered nothing."""
    from aiosmtpd.controller import Controller

    from conftest import free_port

    spool = tmp_path / "spool"
    key = run_fastsend("apikey", "create", "--tenant", "acme", "--spool", str(spool))
    assert key.returncode == 0, key.stderr
    handler = _NeverAnswersTheDot()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    port = free_port()
    log = tmp_path / "sink.jsonl"
    proc = None
    try:
        with SinkProcess("--log", str(log)) as sink:
            cfg = tmp_path / "serve.toml"
            cfg.write_text(
                f'[spool]\ndir = "{spool}"\n[workers]\ncount = 1\n'
                f'[routes]\n"stuck.example" = "127.0.0.1:{ctl.port}"\n'
                f'"*" = "{sink.host}:{sink.port}"\n'
                f'[delivery]\ntls = "off"\ndrain_limit = 2\n[api]\nlisten = "127.0.0.1:{port}"\n'
            )
            proc = subprocess.Popen(fastsend_cmd("serve", "-c", str(cfg)),
                                    stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
            assert proc.stderr is not None
            err = ""
            while "ready in" not in err:
                line = proc.stderr.readline()
                assert line, err
                err += line

            async def post(rows: list[dict[str, str]]) -> None:
                async with aiohttp.ClientSession() as s:
                    await _req(s, "POST", f"http://127.0.0.1:{port}/v1/campaigns",
                               key.stdout.strip(), {"name": "r", "template": TPL,
                                                    "recipients": rows}, ok=201)  # fmt: skip

            asyncio.run(post([{"email": "a@stuck.example", "name": "a"}]))
            deadline = time.monotonic() + 60
            while not handler.rcpts:
                assert time.monotonic() < deadline and proc.poll() is None, err
                time.sleep(0.05)
            proc.send_signal(signal.SIGHUP)
            good = [{"email": f"u{i}@ok.example", "name": f"n{i}"} for i in range(30)]
            asyncio.run(post(good))
            deadline = time.monotonic() + 60
            while len(received_counts(log)) < len(good):
                assert time.monotonic() < deadline and proc.poll() is None, (
                    "nothing delivered since the reload"
                )
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _out, rest = proc.communicate(timeout=120)
            err += rest
            assert proc.returncode == 0, err
            assert "into the reload: stopping it now" in err, err
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        ctl.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(ctl.loop)])
        ctl.stop()
    told = [
        e for e in map(json.loads, (spool / "events.jsonl").read_text().splitlines())
        if e.get("event") == "deferred" and e.get("rcpt") == "a@stuck.example"
    ]  # fmt: skip
    assert told and "outcome unknown" in told[0]["text"] and told[0]["attempt"] == 1, told


class _HoldsTheDot:
    """An aiosmtpd handler that takes every message whole and answers its final
    dot only once ``release`` is called (from another thread): a slow
    transaction on the wire; it counts the transactions held at once."""

    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.open = self.peak = 0
        self.gate: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.gate is None:
            self.gate, self.loop = asyncio.Event(), asyncio.get_running_loop()
        self.rcpts.extend(envelope.rcpt_tos)
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await self.gate.wait()
        finally:
            self.open -= 1
        return "250 2.0.0 taken"

    def release(self) -> None:
        gate, loop = self.gate, self.loop
        assert gate is not None and loop is not None
        loop.call_soon_threadsafe(gate.set)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_reload_keeps_delivering_while_the_old_worker_finishes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``fastsend serve`` (one worker, one connection per site) reloaded
    (SIGHUP) while a receiver holds a message past DATA: mail keeps going out
    at once (a new worker on the new config takes the slot, as Postfix's and
    PowerMTA's reloads keep delivering) while the old worker still holds that
    transaction; the new worker opens no second connection to the slow site
    beside the old one's (max_connections = 1), and sends its mail there once
    the old worker is done. Every message arrives once, none is lost. Before:
    the slot took no mail until the old worker finished or was stopped after
    ``[delivery] drain_limit`` (here 60 s): nothing arrived meanwhile."""
    from aiosmtpd.controller import Controller

    from conftest import free_port

    if backend == "redis":
        url = request.getfixturevalue("redis_server").url(dir=str(tmp_path / "local"))
        spool, spool_table = tmp_path / "local", f'[spool]\nurl = "{url}"\n'
    else:
        url = str(tmp_path / "spool")
        spool, spool_table = tmp_path / "spool", f'[spool]\ndir = "{url}"\n'
    key = run_fastsend("apikey", "create", "--tenant", "acme", "--spool", url)
    assert key.returncode == 0, key.stderr
    handler = _HoldsTheDot()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    port = free_port()
    log = tmp_path / "sink.jsonl"
    proc = None
    try:
        with SinkProcess("--log", str(log)) as sink:
            cfg = tmp_path / "serve.toml"
            cfg.write_text(
                f'{spool_table}[workers]\ncount = 1\n'
                f'[routes]\n"slow.example" = "127.0.0.1:{ctl.port}"\n'
                f'"*" = "{sink.host}:{sink.port}"\n'
                '[delivery]\ntls = "off"\ndrain_limit = 60\nmax_connections = 1\n'
                f'[api]\nlisten = "127.0.0.1:{port}"\n'
            )
            volatile = ("--allow-volatile",) if backend == "redis" else ()  # (the test's Redis)
            proc = subprocess.Popen(fastsend_cmd("serve", "-c", str(cfg), *volatile),
                                    stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
            assert proc.stderr is not None
            err = ""
            while "ready in" not in err:
                line = proc.stderr.readline()
                assert line, err
                err += line

            async def post(rows: list[dict[str, str]]) -> None:
                async with aiohttp.ClientSession() as s:
                    await _req(s, "POST", f"http://127.0.0.1:{port}/v1/campaigns",
                               key.stdout.strip(), {"name": "r", "template": TPL,
                                                    "recipients": rows}, ok=201)  # fmt: skip

            asyncio.run(post([{"email": "a@slow.example", "name": "a"}]))
            deadline = time.monotonic() + 60
            while not handler.rcpts:
                assert time.monotonic() < deadline and proc.poll() is None, err
                time.sleep(0.05)
            proc.send_signal(signal.SIGHUP)
            while "configuration reloaded" not in err:
                line = proc.stderr.readline()
                assert line, err
                err += line
            good = [{"email": f"u{i}@ok.example", "name": f"n{i}"} for i in range(30)]
            asyncio.run(post([*good, {"email": "b@slow.example", "name": "b"}]))
            deadline = time.monotonic() + 40  # (< drain_limit: the old worker still runs)
            while len(received_counts(log)) < len(good):
                assert time.monotonic() < deadline and proc.poll() is None, (
                    "nothing delivered since the reload while the old worker held a transaction",
                    _rest(proc),
                )
                time.sleep(0.1)
            # The old worker's transaction is still on the wire, and the slow site
            # got no second connection beside it.
            assert handler.open == 1 and handler.rcpts == ["a@slow.example"], handler.rcpts
            time.sleep(1.0)  # (a second connection would have opened by now)
            assert handler.peak == 1 and handler.rcpts == ["a@slow.example"], handler.rcpts
            handler.release()
            deadline = time.monotonic() + 60
            while "b@slow.example" not in handler.rcpts:
                assert time.monotonic() < deadline and proc.poll() is None, handler.rcpts
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _out, rest = proc.communicate(timeout=120)
            err += rest
            assert proc.returncode == 0, err
            assert "stopping it now" not in err, err
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        ctl.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(ctl.loop)])
        ctl.stop()
    assert handler.peak == 1
    assert sorted(handler.rcpts) == ["a@slow.example", "b@slow.example"]
    assert received_counts(log) == {g["email"]: 1 for g in good}
    events = list(map(json.loads, (spool / "events.jsonl").read_text().splitlines()))
    delivered = [e["rcpt"] for e in events if e.get("event") == "delivered"]
    assert sorted(delivered) == sorted([*(g["email"] for g in good), "a@slow.example",
                                        "b@slow.example"])  # fmt: skip
    assert not [e for e in events if "outcome unknown" in str(e.get("text", ""))]


def _rest(proc: subprocess.Popen[str]) -> str:
    """What the process wrote to stderr so far (stopped first: for a message)."""
    proc.kill()
    _out, err = proc.communicate(timeout=30)
    return str(err)[-3000:]
