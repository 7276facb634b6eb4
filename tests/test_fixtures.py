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



def test_sink_log_reads_whole_lines_only_while_the_sink_writes(tmp_path: Path) -> None:
    """A test polling a running sink's ``--log`` may read it mid-write: the last
    line without its newline yet. sink_log parsed it (orjson: "unexpected end of
    data", test_stop_now failed so in a lander run); it leaves it for the next read."""
    from tests._engine_helpers import received_counts, sink_log

    log = tmp_path / "sink.jsonl"
    log.write_bytes(b'{"recipients": ["a@x.test"]}\n{"recipients": ["b@x.te')
    assert sink_log(log) == [{"recipients": ["a@x.test"]}]
    assert received_counts(log) == {"a@x.test": 1}
    with open(log, "ab") as f:
        f.write(b'st"]}\n')
    assert [r["recipients"] for r in sink_log(log)] == [["a@x.test"], ["b@x.test"]]
