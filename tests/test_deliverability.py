"""Deliverability promises end to end (issue 15), on real processes and real receivers:
a CHUNKING session survives refusals (Exim), refusals at RCPT are final and
classified, hard ones are suppressed, grouped mail names no other recipient,
suppression is checked again when mail is dispatched."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests._engine_helpers import (
    send_via,
    summary,
    write_campaign,
    write_recipients,
)
from tests.conftest import EximServer


def test_exim_chunking_session_survives_refused_recipients(
    tmp_path: Path, exim_server: EximServer
) -> None:
    """Exim offers CHUNKING and PIPELINING and refuses every third recipient with
    550 at RCPT: each refused one is bounced (not deferred), each other is
    accepted exactly once, and Exim logs no protocol error (RFC 3030: RSET
    after a BDAT transaction that failed)."""
    addrs = [
        f"permfail-{i}@example.com" if i % 3 == 0 else f"user{i}@example.com" for i in range(30)
    ]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    proc = send_via(
        camp, rcpts, (exim_server.host, exim_server.port), tmp_path / "spool",
        "--no-dkim", "--workers", "1", "--max-wait", "0",
    )  # fmt: skip
    s = summary(proc)
    refused = [a for a in addrs if a.startswith("permfail-")]
    assert s["bounced"] == len(refused), (s, exim_server.mainlog()[-3000:])
    assert s["delivered"] == len(addrs) - len(refused), (s, exim_server.mainlog()[-3000:])
    got = Counter(r for _sender, rs in exim_server.received() for r in rs)
    assert got == Counter(a for a in addrs if not a.startswith("permfail-")), got
    assert exim_server.protocol_errors() == [], exim_server.protocol_errors()[:5]
