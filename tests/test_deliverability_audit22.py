"""Deliverability audit, session 22: MX sets, shared rates and warm-up counts
seen from outside, as a PowerMTA/KumoMTA operator would check them."""

from __future__ import annotations

from pathlib import Path

import orjson
from tests._engine_helpers import run_fastsend, summary, write_campaign, write_recipients

from _smtp_helpers import aiosmtpd_server
from conftest import free_port
from fastsend.testing.dnsserver import DNSServer


def test_domains_with_one_mx_set_in_swapped_preferences_each_go_to_their_preferred_host(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """a.test prefers mxa (mxb its backup), b.test prefers mxb (mxa its backup),
    both hosts up: each domain's mail goes to its own preferred host (RFC 5321
    5.1: the lowest preference first). Before, both domains shared one site
    queue keyed by the sorted MX names, and the first domain's order won: every
    b.test message went to its backup, mxa."""
    port = free_port()
    dns_server.set_zones(
        {
            "a.test": [("MX", "10 mxa.hosting.test."), ("MX", "20 mxb.hosting.test.")],
            "b.test": [("MX", "10 mxb.hosting.test."), ("MX", "20 mxa.hosting.test.")],
            "mxa.hosting.test": [("A", "127.0.0.21")],
            "mxb.hosting.test": [("A", "127.0.0.22")],
        }
    )
    camp = write_campaign(tmp_path)
    # a.test first: its batch makes the site queue
    rcpts = write_recipients(
        tmp_path, [f"u{i}@a.test" for i in range(4)] + [f"v{i}@b.test" for i in range(4)]
    )
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 1\n'
        "[delivery]\nallow_private_mx = true\n"
    )
    with (
        aiosmtpd_server(port, host="127.0.0.21") as (_c1, at_a),
        aiosmtpd_server(port, host="127.0.0.22") as (_c2, at_b),
    ):
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(proc)["delivered"] == 8
    to_a = sorted(r for m in at_a.messages for r in m["rcpts"])
    to_b = sorted(r for m in at_b.messages for r in m["rcpts"])
    assert to_a == [f"u{i}@a.test" for i in range(4)], (to_a, to_b)
    assert to_b == [f"v{i}@b.test" for i in range(4)], (to_a, to_b)
    events = [
        orjson.loads(x) for x in (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()
    ]
    mx = {e["rcpt"]: e.get("mx", "") for e in events if e["event"] == "delivered"}
    assert all(v.startswith("mxb.hosting.test") for k, v in mx.items() if k.endswith("@b.test"))
