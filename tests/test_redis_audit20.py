"""Session 20's audit of the Redis spool from an operator's side: what a command
says and exits with when its Redis cannot serve it (a replica, an old server, a
mistyped prefix, a server out of reach), and the client's socket limits.

Real parts: redis-server on loopback, the ``fastsend`` binary; an "old Redis" is
a loopback server speaking RESP that reports version 6.0 (no older redis-server
is installed), as such a server answers the spool's first commands.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
from tests._engine_helpers import _env, fastsend_cmd
from tests._redis_helpers import RedisServer, start_redis

from fastsend.spool import SpoolError, open_spool
from fastsend.spool.redis import RedisSpool


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with start_redis() as s:
        yield s


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fastsend_cmd(*args), capture_output=True, text=True, env=_env(),
                          timeout=60)  # fmt: skip


def test_a_replica_is_a_temporary_failure_and_serves_the_views(tmp_path: Path) -> None:
    """A Redis that turned replica (a failover under way, or the URL names one):
    a command that writes exits 75 (EX_TEMPFAIL: a job runner tries again), not
    2 as for a wrong URL; the views (``queue``, ``campaign list``) open without
    a write and answer from the replica. Before: exit 2, and the views failed
    with READONLY at the open (it wrote the layout and epoch keys)."""
    with start_redis() as srv:
        url = srv.url(dir=str(tmp_path / "d"))
        s = RedisSpool(url)
        cid = s.create_campaign({"from": "a@b.example"}, name="spring")
        s.close()
        redis_py.Redis(port=srv.port).execute_command("REPLICAOF", "127.0.0.1", "1")
        for cmd in (("resume", "--spool", url, "--no-progress"),
                    ("campaign", "pause", str(cid), "--spool", url)):  # fmt: skip
            r = _run(*cmd)
            assert r.returncode == 75, (cmd, r.stderr)
            assert "takes no writes now" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = _run("campaign", "list", "--spool", url, "--json")
        assert r.returncode == 0, r.stderr
        assert '"spring"' in r.stdout, r.stdout


def test_a_mistyped_prefix_is_no_spool_not_an_empty_one(server: RedisServer, tmp_path: Path) -> None:
    """``tls-report show``, ``resume``, ``queue`` given a Redis URL under which no
    spool exists (a mistyped prefix or database, a Redis back without its data)
    say so and exit 2, as for a SQLite directory with no spool, and leave no key
    behind. Before: each made an empty spool there, ``tls-report show`` printed
    ``[]`` and exit 0, ``resume`` reported nothing to do."""
    url = server.url(dir=str(tmp_path / "d"))
    prefix = url.partition("prefix=")[2].partition("&")[0]
    for cmd in (("tls-report", "show", "--spool", url), ("resume", "--spool", url, "--no-progress"),
                ("queue", "--spool", url)):  # fmt: skip
        r = _run(*cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert f"no spool under prefix {prefix!r}" in r.stderr, r.stderr
    assert redis_py.Redis(port=server.port).keys(f"{{{prefix}}}*") == []
    with pytest.raises(SpoolError, match="no spool under prefix"):
        open_spool(url, must_exist=True)
    open_spool(url).close()  # (made by a writer, it exists from then on)
    open_spool(url, must_exist=True).close()
    r = _run("tls-report", "show", "--spool", url)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_tls_report_with_redis_out_of_reach_exits_75(tmp_path: Path) -> None:
    """``tls-report`` on a Redis spool out of reach: one line, exit 75 (try again
    later) as every other command; it was 2, the status of a bad argument."""
    from conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0?prefix=x&dir={tmp_path}"
    for action in ("show", "send"):
        r = _run("tls-report", action, "--spool", url)
        assert r.returncode == 75, r.stderr
        assert "cannot reach Redis" in r.stderr and "Traceback" not in r.stderr, r.stderr


class _OldRedis:
    """A loopback server answering RESP as a Redis 6.0 would the commands a
    client sends first: PING, INFO (redis_version:6.0.16), the rest an error."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.commands: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while line := f.readline():
                n = int(line[1:])
                args = []
                for _ in range(n):
                    size = int(f.readline()[1:])
                    args.append(f.read(size + 2)[:-2].decode())
                cmd = args[0].upper()
                self.commands.append(cmd)
                if cmd == "PING":
                    conn.sendall(b"+PONG\r\n")
                elif cmd == "INFO":
                    body = b"# Server\r\nredis_version:6.0.16\r\nredis_mode:standalone\r\n"
                    conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                else:
                    conn.sendall(b"-ERR unknown command '%s'\r\n" % cmd.encode())
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_redis_older_than_6_2_is_refused_at_start(tmp_path: Path) -> None:
    """The spool needs Redis >= 6.2 (SMISMEMBER, a campaign's duplicate
    addresses): an older server is refused at the open, naming its version and
    the minimum, exit 2, before anything is written. Before: the node started,
    and the first upload to a campaign failed with "unknown command"."""
    old = _OldRedis()
    try:
        url = f"redis://127.0.0.1:{old.port}/0?prefix=x&dir={tmp_path}"
        with pytest.raises(SpoolError, match=r"version 6\.0\.16: the spool needs Redis >= 6\.2"):
            RedisSpool(url)
        r = _run("resume", "--spool", url, "--no-progress")
        assert r.returncode == 2, r.stderr
        assert "needs Redis >= 6.2" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not {"SET", "EVALSHA", "EVAL", "SCRIPT"} & set(old.commands), old.commands
    finally:
        old.close()


def test_a_paused_redis_is_an_outage_after_the_socket_timeout(tmp_path: Path) -> None:
    """A Redis that stops answering (SIGSTOP here; a host gone with its
    connections, a partition dropping packets) is an outage error after the
    client's socket timeout (5 s unless the URL sets ``socket_timeout``), which
    the node rides out; redis-py before 6 waits for ever by default, and the
    node stayed stuck in one read for good. The URL's own value wins."""
    with start_redis() as srv:
        s = RedisSpool(srv.url(dir=str(tmp_path / "a")))
        kw = s.r.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == 5.0 and kw["socket_keepalive"] is True
        t = RedisSpool(srv.url(dir=str(tmp_path / "b"), socket_timeout="1"))
        assert float(t.r.connection_pool.connection_kwargs["socket_timeout"]) == 1.0
        cid = t.create_campaign({"from": "a@b.example"})
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            got: list[BaseException] = []

            def look() -> None:
                try:
                    t.counts(cid)
                except BaseException as e:  # (what the thread met)
                    got.append(e)

            th = threading.Thread(target=look, daemon=True)
            th.start()
            th.join(60)  # (1 s timeout; generous for a loaded machine)
            assert not th.is_alive(), "a read of a paused Redis never ended"
            assert got and isinstance(got[0], t.outage_errors()), got
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        s.close()
        t.close()
