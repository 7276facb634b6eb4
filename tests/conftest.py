"""Shared fixtures: event-loop flavours, free ports, real servers on loopback.

Fixtures here start real programs (Postfix's smtp-sink, a dnslib DNS server);
nothing is mocked. Area-specific fixtures live in the area's test files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastsend.testing.dnsserver import DNSServer

IN_CI = bool(os.environ.get("CI") or os.environ.get("FASTSEND_CI"))


def bounce_corpus() -> Path | None:
    """The labelled bounce corpus (read-only, beside the repo): ../shared/corpora/bounces,
    or FASTSEND_BOUNCE_CORPUS. None when this checkout has no shared/ beside it
    (it is data, not something CI can install, so tests skip then)."""
    candidates = [
        os.environ.get("FASTSEND_BOUNCE_CORPUS", ""),
        str(Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "bounces"),
        "/work/shared/corpora/bounces",
    ]
    for c in candidates:
        if c and (Path(c) / "labels.json").exists():
            return Path(c)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def require_program(name: str) -> str:
    """Path of an external program; in CI its absence is a failure, not a skip."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_kind: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to completion on the parametrised loop flavour."""

    def _run(coro: Coroutine[Any, Any, Any]) -> Any:
        if loop_kind == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                return r.run(coro)
        with asyncio.Runner() as r:
            return r.run(coro)

    return _run


@pytest.fixture(params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> str:
    """'py' or 'c': tests of accelerated code run over both implementations."""
    if request.param == "c":
        from fastsend import _accel

        if not _accel.HAVE_EXTENSIONS:
            if IN_CI:
                pytest.fail("fastsend._core must be built in CI")
            pytest.skip("fastsend._core not built")
    return str(request.param)


class PostfixSink:
    """Postfix's smtp-sink on loopback (a real, fast C SMTP server)."""

    def __init__(self, host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.host, self.port, self.proc = host, port, proc


@pytest.fixture
def postfix_sink() -> Iterator[PostfixSink]:
    exe = require_program("smtp-sink")
    port = free_port()
    # -c: count, -4: IPv4, -u: run as (we may be root), backlog 256
    proc = subprocess.Popen(
        [exe, "-4", "-u", "nobody", "-c", f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
        yield PostfixSink("127.0.0.1", port, proc)
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free loopback port (tests/_redis_helpers.py);
    each ``url()`` gets a fresh key prefix, so tests share the server safely."""
    from tests._redis_helpers import start_redis  # it imports this module

    with start_redis() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    """Opens the same spool again on each call: SQLite, then Redis (one node)."""
    from fastsend.spool import open_spool
    from fastsend.spool.sqlite import SQLiteSpool

    if request.param == "sqlite":
        return lambda: SQLiteSpool(str(tmp_path))
    url = request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path))
    return lambda: open_spool(url)


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """An empty DNS server on 127.0.0.1; tests call ``set_zones``."""
    with DNSServer({}) as server:
        yield server
