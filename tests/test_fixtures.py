"""The suite's own helpers (tests/conftest.py) hold under a loaded CI: four
xdist workers, each starting servers on ports picked before they bind."""

from __future__ import annotations

import socket
from pathlib import Path

from conftest import free_port


def _ephemeral() -> tuple[int, int]:
    lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(lo), int(hi)


def test_free_port_never_hands_out_a_port_the_kernel_gives_to_outgoing_connections() -> None:
    """A port from the ephemeral range may be taken, between the pick and the
    server's bind, by any other ``bind(addr, 0)`` (another worker's pick, an
    outgoing connection bound to a source IP): free_port keeps below that
    range, and two calls never give the same port."""
    lo, hi = _ephemeral()
    ports = [free_port() for _ in range(200)]
    assert [p for p in ports if lo <= p <= hi] == []
    assert len(set(ports)) == len(ports)
    for p in ports[:5]:  # each one is free to bind
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))

