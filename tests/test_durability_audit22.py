"""Durability and operator-error audit, session 22: ``rediss://`` settings
that can never work but read as a Redis down for now (exit 75, retried for ever
by a job runner): a server wanting a client certificate the URL does not give,
a URL naming the plain-text port; a ``send`` whose terminal hangs up; a
``serve`` whose terminal hangs up; a SQLite spool of a newer fastsend;
``sink``/``apikey`` given paths that are not there.

Real parts: redis-server on loopback with a TLS port asking clients for a
certificate (a throwaway CA from trustme), a pty as the controlling terminal,
fastsend's sink, the ``fastsend`` binary.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    write_campaign,
    write_recipients,
)
from tests._redis_helpers import RedisServer, start_redis
from tests.conftest import free_port, wait_port

from fastsend.sink import SinkProcess
from fastsend.spool import SpoolError, open_spool
from fastsend.spool.redis import RedisSpool, RedisUnreachable
from fastsend.spool.sqlite import SCHEMA_VERSION, SQLiteSpool

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi", "text": "Hi\n"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fastsend_cmd(*args), capture_output=True, text=True, env=_env(),
                          timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def mtls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server whose TLS port wants a client certificate signed by the CA
    in ``ca.pem`` (its own certificate names 127.0.0.1); ``client.pem`` and
    ``client.key`` are one."""
    d = tmp_path_factory.mktemp("redis-mtls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client = ca.issue_cert("client.example.net")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    tport = free_port()
    with start_redis("--tls-port", str(tport), "--tls-cert-file", str(d / "cert.pem"),
                     "--tls-key-file", str(d / "key.pem"), "--tls-ca-cert-file", str(d / "ca.pem"),
                     "--tls-auth-clients", "yes") as srv:  # fmt: skip
        wait_port("127.0.0.1", tport)
        yield srv, tport, d


def test_rediss_settings_read_as_an_outage_exit_2_naming_them(
    mtls_redis: tuple[RedisServer, int, Path], tmp_path: Path
) -> None:
    """A TLS 1.3 Redis wanting a client certificate completes the handshake and
    closes at the first command: the spool read the EOF as a restart and
    exited 75 "cannot reach Redis", so a job runner retried for ever what only
    the operator can mend. A ``rediss://`` URL naming the plain-text port
    timed out in the handshake, 75 again. Now both exit 2 saying what to give;
    the right certificate opens the spool, a port with nothing on it stays 75,
    and a client certificate file that is not there is 2 naming it."""
    srv, tport, d = mtls_redis
    ca = f"ssl_ca_certs={d / 'ca.pem'}"
    base = f"rediss://127.0.0.1:{tport}/0?{ca}&dir={tmp_path}&node=n1&prefix=mtls22"
    mine = f"ssl_certfile={d / 'client.pem'}&ssl_keyfile={d / 'client.key'}"
    # a short handshake timeout (redis-py's URL option): the plain port never answers it
    plain = f"rediss://127.0.0.1:{srv.port}/0?{ca}&dir={tmp_path}&socket_connect_timeout=1"
    cases = {
        "no client certificate": (base, "ssl_certfile= and ssl_keyfile="),
        "the plain port": (plain, f"port {srv.port} answers in plain text"),
        "a client certificate not there": (
            f"{base}&ssl_certfile={d / 'gone.pem'}&ssl_keyfile={d / 'client.key'}",
            "ssl_certfile",
        ),
    }
    for what, (url, says) in cases.items():
        with pytest.raises(SpoolError) as e:
            RedisSpool(url)
        assert e.value.exit_status == 2, (what, e.value)
        assert says in str(e.value), (what, e.value)
    for what in ("no client certificate", "the plain port"):
        got = _run("queue", "--spool", cases[what][0])
        assert got.returncode == 2, (what, got.stderr)
        assert cases[what][1] in got.stderr and "Traceback" not in got.stderr, got.stderr
        assert len(got.stderr.strip().splitlines()) == 1, got.stderr
    ok = RedisSpool(f"{base}&{mine}")
    assert ok.create_campaign(SPEC) > 0
    ok.close()
    with pytest.raises(RedisUnreachable) as down:
        RedisSpool(f"rediss://127.0.0.1:{free_port()}/0?{ca}&dir={tmp_path}")
    assert down.value.exit_status == 75


def _controlling_terminal() -> None:
    """In the child: a session of its own whose controlling terminal is its stdin
    (a pty), SIGHUP as a shell leaves it: what ``fastsend send`` typed in a
    terminal (an ssh session) has."""
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.parametrize("stderr_to", ["terminal", "file"])
def test_a_send_whose_terminal_hangs_up_exits_129_with_the_resume_command(
    tmp_path: Path, stderr_to: str
) -> None:
    """A real hangup (the pty's master closed, as a dropped ssh session does: the
    kernel sends SIGHUP and fails every later write to the terminal with EIO),
    not a SIGHUP sent by hand: the drain finished, but the summary's first
    write to the dead terminal raised, said as "the disk cannot be written"
    (exit 2, the resume command lost from a ``2>file``) or with a traceback
    (exit 1). Now 129 as for any hangup, the resume command in the file when
    stderr is one, nothing in flight and the spool agreeing with the receiver."""
    addrs = [f"u{i}@d{i % 3}.example" for i in range(4000)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    errf = tmp_path / "stderr.txt"
    master, slave = os.openpty()
    os.set_blocking(master, False)  # nothing reads it: a full pty blocks no one here
    try:
        with SinkProcess("--log", str(log), "--latency-ms", "300") as sink, open(errf, "w") as ef:
            proc = subprocess.Popen(
                fastsend_cmd("send", str(camp), "-r", str(rcpts), "--spool", str(spool),
                             "--route", f"*={sink.host}:{sink.port}", "--workers", "2",
                             "--no-dkim", "--helo", "mta.example.com"),
                stdin=slave, stdout=slave, stderr=slave if stderr_to == "terminal" else ef,
                env=_env(), preexec_fn=_controlling_terminal,
            )  # fmt: skip
            os.close(slave)
            slave = -1
            try:
                deadline = time.monotonic() + 60
                while not log.exists() or len(received_counts(log)) < 10:
                    assert proc.poll() is None and time.monotonic() < deadline
                    with contextlib.suppress(OSError):
                        os.read(master, 65536)  # the progress line: keep the pty from filling
                    time.sleep(0.02)
                os.close(master)  # the hangup
                master = -1
                proc.wait(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
    err = errf.read_text()
    assert proc.returncode == 129, (proc.returncode, err)
    if stderr_to == "file":
        assert "stopped by SIGHUP" in err and "fastsend resume --spool" in err, err
        assert "Traceback" not in err and "disk" not in err, err
    sp = open_spool(str(spool))
    try:
        counts = sp.counts()
        delivered = {m["rcpt"] for i in range(1, len(addrs) + 1)
                     if (m := sp.message(i)) and m["state"] == "delivered"}  # fmt: skip
    finally:
        sp.close()
    assert counts.get("inflight", 0) == 0, counts
    assert 0 < len(delivered) < len(addrs), counts
    assert delivered == set(received_counts(log))


def test_a_spool_made_by_a_newer_fastsend_is_refused_untouched(tmp_path: Path) -> None:
    """A SQLite spool records its schema (meta 'schema') but nothing read it: a
    spool of a newer fastsend (a downgrade, an older package on a second host)
    was opened without a word, our schema applied to its tables and our rows
    written into them (`resume` exit 0). Now every command refuses it, exit 2
    naming both versions, and writes nothing; the spool of this version opens."""
    sp = SQLiteSpool(str(tmp_path / "spool"))
    sp.create_campaign(SPEC)
    sp.close()
    db = sqlite3.connect(tmp_path / "spool" / "spool.db")
    db.execute("UPDATE meta SET value = '9' WHERE key = 'schema'")
    db.commit()
    before = db.execute("SELECT * FROM meta ORDER BY key").fetchall()
    db.close()
    with pytest.raises(SpoolError) as e:
        SQLiteSpool(str(tmp_path / "spool"))
    assert e.value.exit_status == 2 and "spool schema 9" in str(e.value), e.value
    for args in (("queue",), ("resume", "--max-wait", "0"), ("campaign", "list")):
        got = _run(*args, "--spool", str(tmp_path / "spool"))
        assert got.returncode == 2, (args, got.stderr)
        assert "newer fastsend" in got.stderr and "Traceback" not in got.stderr, got.stderr
    db = sqlite3.connect(tmp_path / "spool" / "spool.db")
    assert db.execute("SELECT * FROM meta ORDER BY key").fetchall() == before
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
    db.commit()
    db.close()
    SQLiteSpool(str(tmp_path / "spool")).close()


def test_a_sink_log_or_save_path_that_cannot_be_written_is_a_usage_error(
    tmp_path: Path,
) -> None:
    """``fastsend sink --log`` into a directory that is not there (or naming a
    directory) said "cannot listen: [Errno 2] No such file or directory", exit
    1, as if the port were the trouble. Now exit 2 naming the option, before it
    listens; ``--save`` naming a file likewise."""
    (tmp_path / "f").write_text("x")
    for args, says in (
        (("--log", str(tmp_path / "gone" / "log.jsonl")), "--log"),
        (("--log", str(tmp_path)), "is a directory"),
        (("--save", str(tmp_path / "f")), "not a directory"),
    ):
        got = _run("sink", "--listen", f"127.0.0.1:{free_port()}", *args)
        assert got.returncode == 2, (args, got.stderr)
        assert says in got.stderr and "cannot listen" not in got.stderr, got.stderr
        assert len(got.stderr.strip().splitlines()) == 1, got.stderr


def test_apikey_list_and_revoke_of_no_spool_make_nothing(tmp_path: Path) -> None:
    """``fastsend apikey list --spool /mistyped/dir`` made the directory and an
    empty key store and answered nothing, exit 0 (revoke likewise, exit 1):
    the operator read "no keys" and was left a spool-like directory. Now exit 2
    naming the path, nothing made; ``create`` still makes it (keys may come
    before the first serve)."""
    gone = tmp_path / "mistyped" / "spool"
    for args in (("list",), ("revoke", "abcdefgh")):
        got = _run("apikey", *args, "--spool", str(gone))
        assert got.returncode == 2, (args, got.stderr)
        assert "not a directory" in got.stderr and not (tmp_path / "mistyped").exists()
    made = _run("apikey", "create", "--tenant", "acme", "--spool", str(gone))
    assert made.returncode == 0 and made.stdout.startswith("fs_"), made.stderr
    listed = _run("apikey", "list", "--spool", str(gone))
    assert listed.returncode == 0 and "\tacme\tactive\t" in listed.stdout, listed


def test_serve_whose_terminal_hangs_up_goes_on_and_stops_cleanly(tmp_path: Path) -> None:
    """``fastsend serve`` in the foreground of a terminal that hangs up: the
    SIGHUP is a reload and serve goes on, but its stderr stayed the dead
    terminal, so a later SIGTERM drained and then died on its last line's EIO
    (a traceback, exit 1 for a clean stop). Now its output goes to /dev/null
    at the hangup: it answers on, a second SIGHUP reloads, SIGTERM exits 0."""
    port = free_port()
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n[api]\nlisten = "127.0.0.1:{port}"\n')
    master, slave = os.openpty()
    os.set_blocking(master, False)
    said = b""
    proc = subprocess.Popen(
        fastsend_cmd("serve", "-c", str(cfg)), stdin=slave, stdout=slave, stderr=slave,
        env=_env(), cwd=tmp_path, preexec_fn=_controlling_terminal,
    )  # fmt: skip
    os.close(slave)
    try:
        deadline = time.monotonic() + 120
        while b"ready in" not in said:
            assert proc.poll() is None and time.monotonic() < deadline, said
            with contextlib.suppress(OSError):
                said += os.read(master, 65536)
            time.sleep(0.05)
        os.close(master)  # the hangup
        master = -1
        for _ in range(2):  # after the hangup's reload, and after one more
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, "serve died after the hangup"
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2):
                    break
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()


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


def test_a_send_whose_first_rows_went_in_but_not_their_events_says_resume(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A Redis spool whose node directory (its event log) is on a full disk: the
    list's first rows went into Redis, their events could not be written, and
    closing the event log raised again: "fastsend send: the disk is full", exit
    75, no `resume` command, so a job runner ran `send` again and made a second
    campaign of the same list. Now 75 with what is kept and the `resume`
    command, the campaign left active with its rows, and once there is room
    `resume` sends the whole list once."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        addrs = [f"u{i}@d{i % 3}.example" for i in range(600)]
        camp = write_campaign(tmp_path)
        rcpts = write_recipients(tmp_path, addrs)
        url = redis_server.url(node="n1", dir=str(disk / "node"))
        log = tmp_path / "sink.jsonl"
        with SinkProcess("--log", str(log)) as sink:
            route = ("--route", f"*={sink.host}:{sink.port}", "--helo", "mta.example.com")
            one = write_recipients(tmp_path, ["a@d0.example"], "one.csv")
            first = _run("send", str(camp), "-r", str(one), "--spool", url, "--no-dkim", *route)
            assert first.returncode == 0, first.stderr  # (the node directory made)
            filler = _fill(disk)
            got = _run("send", str(camp), "-r", str(rcpts), "--spool", url, "--no-dkim", *route)
            assert got.returncode == 75, got.stderr
            assert "Traceback" not in got.stderr and "fastsend resume --spool" in got.stderr, got.stderr
            filler.unlink()
            sp = open_spool(url)
            try:
                (camp2,) = [c for c in sp.list_campaigns() if c.id != 1]
                assert camp2.status == "active" and sum(sp.counts(camp2.id).values()) > 0
            finally:
                sp.close()
            again = _run("resume", "--spool", url, *route)
            assert again.returncode == 0, again.stderr
        got_rcpts = received_counts(log)
        assert set(addrs) <= set(got_rcpts) and all(got_rcpts[a] == 1 for a in addrs)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_list_from_a_pipe_is_refused_not_dropped(tmp_path: Path) -> None:
    """``cat list.csv | fastsend send c.toml -r /dev/stdin`` (or ``-r <(query)``,
    a /dev/fd/N pipe): the list's columns were read from the pipe, its rows found
    it empty, and send ended "delivered 0", exit 0: the whole list dropped with
    a success status. (``-r -`` was refused already.) Now exit 2 saying to save
    it to a file, before any spool or campaign is made."""
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"u{i}@d{i % 3}.example" for i in range(50)])
    spool = tmp_path / "spool"
    args = ("send", str(camp), "--spool", str(spool), "--no-dkim", "--route", "*=127.0.0.1:9",
            "--max-wait", "0", "--no-progress")  # fmt: skip
    piped = subprocess.run(fastsend_cmd(*args, "-r", "/dev/stdin"), input=rcpts.read_text(),
                           capture_output=True, text=True, env=_env(), timeout=60)  # fmt: skip
    substituted = subprocess.run(
        ["bash", "-c", 'exec "$@" -r <(cat "$0")', str(rcpts), *fastsend_cmd(*args)],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    for got in (piped, substituted):
        assert got.returncode == 2, (got.stdout, got.stderr)
        assert "not a regular file" in got.stderr and "save it to a file" in got.stderr, got.stderr
    assert not spool.exists()
    ok = subprocess.run(fastsend_cmd(*args, "-r", str(rcpts)), capture_output=True, text=True,
                        env=_env(), timeout=60)  # fmt: skip
    assert ok.returncode == 0 and "deferred 50" in ok.stdout, (ok.stdout, ok.stderr)
