"""Analytics (issue 14): rollup cost per event, and GET /v1/stats latency over 30 days of
minute rollups for 100 campaigns.

1. Rollup cost: CPU seconds per event of the rollup listener *and* its flushes (one a
   second's worth at a time, as ``fastsend serve`` runs it) over a generated stream
   (per message: accepted, delivered or a deferral/bounce; 10% opened, some by Apple
   MPP; 3% clicked), against the baseline of the same stream through the per-message
   event index (``serve/eventindex.py``: what /v1/stats counted before: a row per
   event). Goal: <= 2 us per event.
2. Stats latency: a store holding ``--days`` (30) of minute rollups (and the hour and
   day rollups written beside them) for ``--campaigns`` (100) campaigns, two providers
   and two source IPs; a real ``fastsend serve`` API application (aiohttp on loopback,
   a real API key) answers GET /v1/stats for a mix of questions (30 days per campaign,
   7 days per hour by provider, the last 6 hours per minute for one campaign, a month
   of totals by source IP); p50/p99 over ``--requests``. Baseline: the same totals
   summed from the minute rows alone (no range planning), timed in the same run.
   Goal: p99 <= 50 ms.

    python bench/analytics.py [--events 200000] [--days 30] [--campaigns 100]
                              [--requests 300] [--strict]

Prints the machine; exits 2 when a figure cannot be measured, 1 with ``--strict``
when a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from typing import Any

from _common import machine

from fastsend.analytics.rollup import Rollups, _node_rows, policy_provider
from fastsend.analytics.store import COUNTERS, IDX, NC, SQLiteRollupStore

HUMAN = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15"


def stream(n: int, t0: float) -> list[list[dict[str, Any]]]:
    """Events in ticks of ~1,000 (the supervisor emits a tick's outcomes at once)."""
    doms = ["gmail.com", "yahoo.com", "outlook.com", "example.org", "icloud.com"]
    mxs = ["gmail-smtp-in.l.google.com", "mta5.am0.yahoodns.net",
           "x.olc.protection.outlook.com", "mx.example.org", "mx01.mail.icloud.com"]  # fmt: skip
    evs: list[dict[str, Any]] = []
    i = 0
    while len(evs) < n:
        k = i % 5
        t = t0 + i * 0.001
        rcpt = f"user{i}@{doms[k]}"
        cid = 1 + i % 100
        evs.append({"time": t, "event": "accepted", "id": i, "campaign": cid,
                    "tenant": "acme", "rcpt": rcpt})  # fmt: skip
        base = {"id": i, "campaign": cid, "rcpt": rcpt, "mx": mxs[k],
                "source_ip": f"127.0.0.{2 + i % 4}", "code": 250, "enhanced": "2.0.0",
                "text": "ok", "attempt": 1}  # fmt: skip
        if i % 50 == 7:
            evs.append({**base, "time": t + 1, "event": "deferred", "code": 421,
                        "enhanced": "4.7.0", "text": "try again later"})  # fmt: skip
        if i % 100 == 3:
            evs.append({**base, "time": t + 2, "event": "bounced", "code": 550,
                        "enhanced": "5.1.1", "text": "user unknown"})  # fmt: skip
        else:
            evs.append({**base, "time": t + 2, "event": "delivered"})
            eng = {"id": i, "campaign": cid, "tenant": "acme", "rcpt": rcpt}
            if i % 10 == 0:
                evs.append({**eng, "time": t + 60, "event": "opened",
                            "user_agent": HUMAN if i % 20 else "Mozilla/5.0"})  # fmt: skip
            if i % 33 == 0:
                evs.append({**eng, "time": t + 90, "event": "clicked", "user_agent": HUMAN,
                            "url": "https://example.com/x"})  # fmt: skip
        i += 1
    evs = evs[:n]
    return [evs[j : j + 1000] for j in range(0, len(evs), 1000)]


def rollup_cost(n: int) -> tuple[float, float, int]:
    """(rollup CPU s/event, event-index CPU s/event, events)."""
    from fastsend.serve.eventindex import EventIndex

    t0 = time.time() - 3600
    ticks = stream(n, t0)
    events = sum(len(t) for t in ticks)
    with tempfile.TemporaryDirectory() as d:
        r = Rollups(SQLiteRollupStore(d), tenant_of=lambda c: "acme",
                    provider_of=policy_provider(None))  # fmt: skip
        r.listener(ticks[0][:10])  # warm caches (rules, policy)
        r.flush(final=True)
        per_flush = 10  # ~10 ticks a second in serve: one flush per 10 ticks
        c0 = time.process_time()
        for j, tick in enumerate(ticks):
            r.listener(tick)
            if j % per_flush == per_flush - 1:
                r.flush()
        r.flush(final=True)
        ours = (time.process_time() - c0) / events
        r.close()
    with tempfile.TemporaryDirectory() as d:
        idx = EventIndex(d)
        c0 = time.process_time()
        for j, tick in enumerate(ticks):
            idx.listener(tick)
            if j % 10 == 9:
                idx.flush()
        idx.flush()
        base = (time.process_time() - c0) / events
        idx.close()
    return ours, base, events


def build_store(d: str, days: int, campaigns: int) -> tuple[int, int]:
    """``days`` of minute rollups (+ hour, day) for ``campaigns``: (rows, end time)."""
    store = SQLiteRollupStore(d)
    end = int(time.time()) // 60 * 60
    start = end - days * 86400
    rows = 0  # per-campaign rows (the all-campaigns and node rows come on top)
    provs = ("google", "yahoo")
    ips = ("127.0.0.2", "127.0.0.3")
    for day in range(days):
        counts: dict[Any, list[int]] = {}
        t_day = start + day * 86400
        for m in range(1440):
            t = t_day + m * 60
            for c in range(1, campaigns + 1):
                key = ("acme", c, provs[c % 2], ips[(c // 2) % 2])
                row = [0] * NC
                row[IDX["accepted"]] = 10
                row[IDX["delivered"]] = 9
                row[IDX["bounced"]] = 1
                row[IDX["bounced_hard"]] = 1
                row[IDX["opens"]] = 2
                row[IDX["opens_unique"]] = 2
                row[IDX["clicks"]] = 1
                row[IDX["clicks_unique"]] = 1
                for g in (60, 3600, 86400):
                    ck = (g, t - t % g, key)
                    have = counts.get(ck)
                    if have is None:
                        counts[ck] = row
                        rows += 1
                    else:
                        counts[ck] = [a + b for a, b in zip(have, row, strict=True)]
        _node_rows(counts, {})  # the all-campaigns rows, as Rollups writes them
        store.add(counts, {}, {})
    store.close()
    return rows, end


async def stats_latency(d: str, requests: int, campaigns: int) -> list[float]:
    import aiohttp

    from fastsend.config import from_dict
    from fastsend.serve.app import make_app
    from fastsend.serve.auth import KeyStore
    from fastsend.serve.context import open_context
    from fastsend.testing.http import app_on_loopback

    cfg = from_dict({"spool": {"dir": d}, "api": {"listen": "127.0.0.1:0",
                                                   "rate_limit": 100000}})  # fmt: skip
    ks = KeyStore.for_spool(d)
    key = ks.create("acme")[0]
    ks.close()
    ctx = open_context(cfg)
    app = make_app(ctx, cfg.api)
    queries = [
        "from=-30d&granularity=total&dims=campaign",
        "from=-30d&granularity=day&dims=&campaign={c}",
        "from=-7d&granularity=hour&dims=provider",
        "from=-6h&granularity=minute&dims=&campaign={c}",
        "from=-30d&granularity=total&dims=source_ip",
        "from=-24h&granularity=hour&dims=provider,source_ip&campaign={c}",
    ]
    lat: list[float] = []
    h = {"Authorization": f"Bearer {key}"}
    try:
        async with app_on_loopback(app) as base, aiohttp.ClientSession() as http:
            for i in range(requests):
                q = queries[i % len(queries)].format(c=1 + i % campaigns)
                t = time.perf_counter()
                async with http.get(f"{base}/v1/stats?{q}", headers=h) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"{q}: {r.status} {body}")
                lat.append(time.perf_counter() - t)
                if i == 0 and body["totals"]["counts"]["delivered"] <= 0:
                    raise RuntimeError("no data in the answer")
    finally:
        ctx.close()
    return lat


def naive_minutes(d: str, end: int, days: int) -> float:
    """The baseline: 30 days of totals per campaign summed from minute rows only."""
    import sqlite3

    db = sqlite3.connect(os.path.join(d, "rollups.db"))
    t = time.perf_counter()
    sums = ", ".join(f"SUM({c})" for c in COUNTERS)
    db.execute(
        f"SELECT campaign, {sums} FROM counts WHERE g = 60 AND tenant = 'acme' AND t >= ?"
        " AND t < ? GROUP BY campaign",
        (end - days * 86400, end + 60),
    ).fetchall()
    took = time.perf_counter() - t
    db.close()
    return took


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--campaigns", type=int, default=100)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()} (shared with other jobs: figures are noisy)")
    ours, base, n = rollup_cost(args.events)
    if not (ours > 0 and base > 0):
        print("UNMEASURABLE: rollup cost", file=sys.stderr)
        return 2
    print(f"\n1. rollup cost over {n:,} events (listener + per-second flushes, CPU):")
    print(f"   fastsend rollups     {ours * 1e6:7.3f} us/event   (goal <= 2 us)")
    print(f"   event index baseline {base * 1e6:7.3f} us/event")
    print(f"   ratio baseline/rollups {base / ours:.2f}x")
    bad = args.strict and ours > 2e-6
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        t = time.perf_counter()
        rows, end = build_store(d, args.days, args.campaigns)
        print(f"\n2. GET /v1/stats over {args.days} days of minute rollups for"
              f" {args.campaigns} campaigns ({rows:,} rows, built in"
              f" {time.perf_counter() - t:.0f} s)")  # fmt: skip
        try:
            lat = asyncio.run(stats_latency(d, args.requests, args.campaigns))
        except (RuntimeError, OSError) as e:
            print(f"UNMEASURABLE: {e}", file=sys.stderr)
            return 2
        naive = min(naive_minutes(d, end, args.days) for _ in range(3))
    p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
    print(f"   fastsend /v1/stats   p50 {p50 * 1e3:6.1f} ms   p99 {p99 * 1e3:6.1f} ms   max"
          f" {max(lat) * 1e3:6.1f} ms over {len(lat)} requests (goal p99 <= 50 ms)")  # fmt: skip
    print(f"   baseline (30 days of totals from minute rows, SQL only) {naive * 1e3:8.1f} ms")
    print(f"   ratio baseline / p99 {naive / p99:.1f}x")
    bad = bad or (args.strict and p99 > 0.050)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
