"""The claim's cost as the campaigns with due mail grow: us per claimed message.

A claim shares its room between the active campaigns with mail due
(spool/fair.py); what it costs per message must not grow with how many
campaigns are due (a provider's spool: thousands of tenants' campaigns, many
of a message or two, e.g. transactional mail). Each setting spools ``total``
messages spread over N campaigns (of N/4 tenants, at least one), all due, then
claims the spool empty in claims of ``--limit`` (the dispatcher's windows) and
prints the CPU (process time; Redis: the wall time of the calls, its server
included) per claimed message. Also what an idle supervisor's claims cost (a
claim every 20 ms tick for a second, ms of CPU / Redis time per second) while
the N campaigns hold mail due later.

    python bench/claim_scale.py [--limit 500] [--redis] [--campaigns 1,100,2000]

Settings: 1 campaign of 20,000; 100 of 200; 2,000 of 10; 2,000 of 1.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _common import free_port, machine, program, wait_port

from fastsend.spool import open_spool

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi", "text": "Hi\n"}
SETTINGS = [(1, 20_000), (100, 200), (2_000, 10), (2_000, 1)]


def fill(url: str, camps: int, each: int, due: float) -> Any:
    sp = open_spool(url)
    tenants = max(1, camps // 4)
    for c in range(camps):
        cid = sp.create_campaign(SPEC, name=f"c{c}", tenant=f"t{c % tenants}")
        rows = [(f"u{i}@d{c % 50}.example", f"d{c % 50}.example", b"{}") for i in range(each)]
        sp.add_messages(cid, rows, due)
    return sp


def run(url: str, camps: int, each: int, limit: int, redis: bool) -> tuple[float, float, int]:
    """(us per claimed message, us per empty claim, claims)."""
    now = time.time()
    sp = fill(url + "a", camps, each, now - 10)
    clock = time.perf_counter if redis else time.process_time
    got, claims = 0, 0
    t0 = clock()
    while batch := sp.claim_due(now, limit):
        got += len(batch)
        claims += 1
    per_msg = (clock() - t0) / max(got, 1) * 1e6
    sp.close()
    if got != camps * each:
        raise SystemExit(f"claimed {got} of {camps * each}")
    # an idle supervisor: the same spool's mail due in an hour, a claim every
    # tick (20 ms) for a second: the time the claims take (ms per second)
    sp = fill(url + "b", camps, each, now + 3600)
    sp.claim_due(time.time(), limit)  # (a spool's first claim: once-only work)
    spent = 0.0
    for _ in range(50):
        t0 = clock()
        if sp.claim_due(time.time(), limit):
            raise SystemExit("claimed mail not due")
        spent += clock() - t0
        time.sleep(0.02)
    sp.close()
    return per_msg, spent * 1e3, claims


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=500, help="messages per claim")
    ap.add_argument("--redis", action="store_true", help="the Redis spool too")
    a = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"claims of {a.limit}; us per claimed message (CPU: SQLite; wall: Redis)")
    print(f"{'spool':8} {'campaigns':>9} {'each':>6} {'claims':>7} {'us/msg':>8} {'idle ms/s':>9}")
    rproc = None
    with tempfile.TemporaryDirectory() as tmp:
        spools = [("sqlite", lambda: os.path.join(tmp, secrets.token_hex(3)))]
        if a.redis:
            rport = free_port()
            rproc = subprocess.Popen(
                [program("redis-server"), "--port", str(rport), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", tmp],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_port(rport)
            spools.append(("redis", lambda: (
                f"redis://127.0.0.1:{rport}/0?node=n1&dir={tmp}&prefix=b{secrets.token_hex(3)}"
            )))  # fmt: skip
        try:
            for name, url in spools:
                for camps, each in SETTINGS:
                    u = url()
                    if name == "redis":  # (a prefix per spool: "a" and "b" apart)
                        u += "x"
                    per_msg, idle, claims = run(u, camps, each, a.limit, name == "redis")
                    print(f"{name:8} {camps:>9} {each:>6} {claims:>7} {per_msg:>8.2f}"
                          f" {idle:>9.1f}")  # fmt: skip
        finally:
            if rproc is not None:
                rproc.terminate()
                rproc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
