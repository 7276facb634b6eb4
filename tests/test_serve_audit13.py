"""Session 13's outside audit of monitoring and of ``fastsend serve``'s leftovers.

Each test drives a real ``fastsend serve`` (tests/_serve_helpers.Served) with
real receivers (fastsend's sink), talks to it over loopback sockets and HTTP,
and reads what it exposes with a real reader of the format: the Prometheus
exposition with prometheus_client's text parser.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests._serve_helpers import Served, http
from tests.conftest import free_port

from fastsend.sink import SinkThread

CONFIG = """
[dashboard]
admin_tenants = ["ops"]
[intake]
listen = "127.0.0.1:{intake}"
verp_domain = "bounces.example"
fbl_address = "fbl@bounces.example"
max_size = 1000000
"""


@pytest.fixture(scope="module")
def sink() -> Iterator[SinkThread]:
    with SinkThread() as s:
        yield s


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sink: SinkThread) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("audit13")
    admin, intake = free_port(), free_port()
    s = Served(tmp, f"{sink.host}:{sink.port}", CONFIG.format(intake=intake),
               api=f'admin_listen = "127.0.0.1:{admin}"')  # fmt: skip
    s.admin = f"http://127.0.0.1:{admin}"  # type: ignore[attr-defined]
    s.intake = intake  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


def smtp_dialogue(port: int, lines: list[bytes]) -> list[bytes]:
    """Each line's reply (first line of it) from an SMTP listener on loopback."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        replies = [f.readline()]
        for line in lines:
            sock.sendall(line + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            replies.append(reply)
        return replies


# ---------------------------------------------------------------- SMTP SIZE
@pytest.mark.parametrize("digits", ["1" + "0" * 18, "9" * 20, "1" + "0" * 40])
def test_a_size_too_large_for_64_bits_is_552_not_555(served: Served, digits: str) -> None:
    """RFC 1870 6.1: a SIZE over the server's fixed maximum is 552 5.3.4, however many
    digits it has; 555 (unknown parameter) told the client its syntax was wrong."""
    got = smtp_dialogue(served.intake, [b"EHLO client.example",  # type: ignore[attr-defined]
                                        f"MAIL FROM:<a@b.example> SIZE={digits}".encode()])
    assert got[2].startswith(b"552 5.3.4"), got


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "12a", "-1", ""])
def test_a_size_that_is_not_ascii_digits_is_555(served: Served, value: str) -> None:
    got = smtp_dialogue(served.intake, [b"EHLO client.example",  # type: ignore[attr-defined]
                                        f"MAIL FROM:<a@b.example> SIZE={value}".encode()])
    assert got[2].startswith(b"555"), got
    # and the session goes on
    got = smtp_dialogue(served.intake, [b"EHLO client.example", b"NOOP"])  # type: ignore[attr-defined]
    assert got[2].startswith(b"250"), got
