"""A real HAProxy (the Debian package) started on loopback with a given config."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator

from tests.conftest import require_program, wait_port

GLOBAL = """\
global
    maxconn 4096
defaults
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""


@contextlib.contextmanager
def start_haproxy(body: str, ports: list[int]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``haproxy -db`` on ``GLOBAL + body`` until the block ends; waits for ``ports``."""
    exe = require_program("haproxy")
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(GLOBAL + body)
        check = subprocess.run([exe, "-c", "-q", "-f", cfg], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr + check.stdout
        proc = subprocess.Popen(
            [exe, "-db", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            for p in ports:
                wait_port("127.0.0.1", p)
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)
