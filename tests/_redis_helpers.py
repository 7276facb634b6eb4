"""A real redis-server on a free loopback port for the Redis spool and shared limits.

No persistence (``--save "" --appendonly no``) and a temporary working directory:
the tests are about semantics across processes, not Redis's own durability.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tests.conftest import free_port, require_program, wait_port


class RedisServer:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port, self.proc = port, proc

    def url(self, **params: str) -> str:
        """A spool URL with a fresh key prefix (one spool per call) unless given."""
        params.setdefault("prefix", "t" + secrets.token_hex(4))
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"redis://127.0.0.1:{self.port}/0?{q}"


@contextlib.contextmanager
def start_redis(*extra: str) -> Iterator[RedisServer]:
    """Each test module's session fixture: ``with start_redis() as server: yield server``.
    ``extra``: more redis-server options (a later option overrides an earlier one),
    e.g. ``"--appendonly", "yes"``."""
    exe = require_program("redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", d, "--daemonize", "no", "--loglevel", "warning", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_port("127.0.0.1", port)
            yield RedisServer(port, proc)
        finally:
            proc.terminate()
            proc.wait(10)


class RedisHold:
    """A loopback TCP proxy in front of a Redis (a thread): a node given
    ``url()`` reaches the Redis through it; ``hold()`` keeps what the node sends
    from reaching the Redis (a Redis that stalls: a long script, a fork, a
    network pause) until ``release()``; ``waiting`` counts the connections with
    a request held (the node is waiting for its answer). ``slow(s)``: each
    request reaches the Redis ``s`` seconds late instead (a Redis that answers,
    slowly: its calls return, each after a while). ``stepping()``: each request
    is held until ``step()`` lets through the ones held then (a Redis that
    answers one round trip at a time, when the test says: see answers_each_held)."""

    def __init__(self, server: RedisServer) -> None:
        import socket
        import threading

        self.server = server
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.lsock.getsockname()[1])
        self.lock = threading.Condition()
        self.held = False
        self.delay = 0.0
        self.stepped: int | None = None  # (stepping: how many steps so far)
        self.waiting: set[int] = set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, **params: str) -> str:
        params.setdefault("prefix", "t" + secrets.token_hex(4))
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"redis://127.0.0.1:{self.port}/0?{q}"

    def hold(self) -> None:
        with self.lock:
            self.held = True

    def release(self) -> None:
        with self.lock:
            self.held = False
            self.delay = 0.0
            self.stepped = None
            self.lock.notify_all()

    def slow(self, seconds: float) -> None:
        with self.lock:
            self.delay = seconds

    def stepping(self) -> None:
        with self.lock:
            self.stepped = 0

    def step(self) -> None:
        with self.lock:
            if self.stepped is not None:
                self.stepped += 1
            self.waiting.clear()  # (each wakes and goes on)
            self.lock.notify_all()

    def close(self) -> None:
        self.release()
        self.closed = True
        self.lsock.close()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.server.port))
            threading.Thread(target=self._pump, args=(c, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, c, False), daemon=True).start()

    def _pump(self, src: Any, dst: Any, outbound: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if outbound:
                    with self.lock:
                        if self.held:
                            self.waiting.add(id(src))
                            self.lock.notify_all()
                        while self.held:
                            self.lock.wait()
                        if self.stepped is not None:
                            at = self.stepped
                            self.waiting.add(id(src))
                            self.lock.notify_all()
                            while self.stepped is not None and self.stepped == at:
                                self.lock.wait()
                        self.waiting.discard(id(src))
                        delay = self.delay
                    if delay:
                        time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(2)


def answers_each_held(node: Any, px: RedisHold, threads: list[Any], timeout: float = 20) -> int:
    """While ``threads`` run (requests to ``node`` that ask its Redis, reached
    through ``px``, started: ``px.stepping()`` first), one Redis round trip at a
    time: while a request of the node's is held
    at ``px``, the node's HTTP listener answers what needs no Redis (GET
    /v1/openapi.json, within ``timeout`` s: a ceiling, never reached unless a
    held call blocks serve's event loop); then the held requests go on. Until
    every thread ends; returns how many round trips were held (each proven off
    the loop). No fixed delays: a call made on the loop fails the probe however
    fast the host is."""
    from tests._serve_helpers import http

    if px.stepped is None:
        px.stepping()
    steps = 0
    try:
        while any(t.is_alive() for t in threads):
            with px.lock:
                px.lock.wait_for(lambda: bool(px.waiting), timeout=0.05)
                held = bool(px.waiting)
            if not held:
                continue
            st, doc = http("GET", node.base + "/v1/openapi.json", timeout=timeout)
            assert st == 200 and "paths" in doc
            px.step()
            steps += 1
    finally:
        px.release()
    return steps


def stop_nodes(*nodes: Any) -> None:
    """Stops each node given (Served; None skipped) in turn, a frozen one
    (SIGSTOP: dead_note_and_frozen_node's b) continued first so it can stop."""
    import os
    import signal

    from tests.test_multinode_audit26 import _state

    for n in nodes:
        if n is None:
            continue
        if n.proc.poll() is None and _state(n.proc.pid) == "T":
            os.kill(n.proc.pid, signal.SIGCONT)
        n.stop()


def dead_note_and_frozen_node(tmp_path: Any, url: str, monkeypatch: Any, fault: str,
                              n_rows: int) -> tuple[Any, Any]:  # fmt: skip
    """Nodes a and b of one Redis spool (``url``; their dirs tmp_path/a, /b, and /c
    made for a third): a is killed right after noting a new campaign of ``n_rows``
    rows complete (FASTSEND_TEST_FAULT idem-kill-after-note); b, started with
    ``fault`` (held-stop-after-read, -take: it stops itself), is frozen once it has
    the dead node's note. Returns (a, b), b stopped (SIGSTOP); on a failure here
    both are stopped."""

    import aiohttp
    import pytest
    from tests._serve_helpers import Served, until
    from tests.test_multinode_audit26 import _state
    from tests.test_serve_audit17 import TPL

    for n in ("a", "b", "c"):
        (tmp_path / n).mkdir()
    args = ("--allow-volatile", "--no-workers")
    monkeypatch.setenv("FASTSEND_TEST_FAULT", "idem-kill-after-note")  # (a's start)
    a = Served(tmp_path / "a", "127.0.0.1:9", spool_url=url + "&node=a", serve_args=args)
    b = None
    try:
        monkeypatch.setenv("FASTSEND_TEST_FAULT", fault)  # (b's)
        b = Served(tmp_path / "b", "127.0.0.1:9", spool_url=url + "&node=b", serve_args=args)
        monkeypatch.delenv("FASTSEND_TEST_FAULT")
        rows = [{"email": f"r{i}@example.org", "name": f"R{i}"} for i in range(n_rows)]
        with pytest.raises(aiohttp.ClientError):
            a.req("POST", "/v1/campaigns", {"name": "k", "template": TPL, "recipients": rows})
        assert a.proc.wait(20) == -9
        until("b frozen having the dead node's note",
              lambda: _state(b.proc.pid) == "T", timeout=90)  # fmt: skip
        return a, b
    except BaseException:
        stop_nodes(b, a)
        raise
