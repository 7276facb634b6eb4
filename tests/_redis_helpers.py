"""A real redis-server on a free loopback port for the Redis spool and shared limits.

No persistence (``--save "" --appendonly no``) and a temporary working directory:
the tests are about semantics across processes, not Redis's own durability.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import tempfile
from collections.abc import Iterator

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
