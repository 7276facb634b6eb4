"""Shaping, guardrails and backoff from outside (shape26's audit): real
receivers that limit and refuse, a site queue or a whole send over them."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _engine_helpers import send_via, summary, write_campaign, write_recipients
from fastsend.config import loader
from fastsend.delivery import pool
from fastsend.delivery.mx import Host, Site
from fastsend.outcome import Envelope, TxnResult
from fastsend.sink import SinkThread

Run = Callable[[Any], Any]


def _rounds(run: Run, port: int, tmp: str, rounds: list[int], between: Callable[..., Any]) -> Any:
    """Mail for one site in ``rounds`` pushes (max_connections 8, groups of 4),
    each once the one before is answered whole and ``between(queue)`` says go
    (awaited); returns the queue and the results."""
    cfg = loader.from_dict(
        {"delivery": {"pipeline": 4, "max_connections": 8}}, base_dir=tmp, files=False
    )
    site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
    results: list[TxnResult] = []

    async def go() -> pool.SiteQueue:
        got = asyncio.Event()

        def report(rs: list[TxnResult], ip: str, mx: str) -> None:
            results.extend(rs)
            got.set()

        q = pool.SiteQueue(site, ["127.0.0.1"], cfg, report, "localhost")
        body = b"Subject: x\r\n\r\nhi\r\n"
        n = 0
        for k, count in enumerate(rounds):
            if k:
                await between(q)
            q.push([Envelope("s@example.org", [f"r{i}@x.example"], body, tag=i)
                    for i in range(n, n + count)])  # fmt: skip
            n += count
            deadline = time.monotonic() + 120  # (only a hang reaches it)
            while len(results) < n:
                got.clear()
                await asyncio.wait_for(got.wait(), max(0.0, deadline - time.monotonic()))
        await q.close()
        return q

    return run(go()), results


def test_a_learned_connection_cap_is_what_the_site_took_and_reprobes_one_more(
    run: Run, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver takes 3 connections from us (421 "Too many connections" over
    that) and the site may have 8. The first round's refusals cap the site at
    the sessions that worked: 3 (it was the sessions open when the first
    refusal came back, as few as 1 while the others were still greeting: a cap
    below what the site takes). Once the cap expires, the next round probes one
    connection more, not the whole 8 again (5 refusals each time before; as
    PowerMTA and KumoMTA feel their way back): at most one refused, and the
    site's 3 used again."""
    monkeypatch.setattr(pool, "CAP_FOR", 0.5)
    with SinkThread(max_connections=3, latency_ms=5.0) as sink:
        seen: dict[str, int] = {}

        async def expired(q: pool.SiteQueue) -> None:
            seen["cap"] = q.cap
            while time.monotonic() < q.cap_until:  # (the cap's end: a condition)
                await asyncio.sleep(0.02)
            seen["refused"] = sink.stats.faults.get("max-connections", 0)
            seen["connections"] = sink.stats.connections

        q, results = _rounds(run, sink.port, str(tmp_path), [400, 400], expired)
        refused = sink.stats.faults.get("max-connections", 0) - seen["refused"]
        opened = sink.stats.connections - seen["connections"]
    assert all(o.delivered for r in results for o in r.outcomes)
    assert seen["refused"] >= 1  # (the first round met the limit)
    assert seen["cap"] == 3, seen
    assert refused <= 1, (refused, opened)
    assert q.cap == 3, q.cap  # (the probe's refusal: the 3 that work)


def test_a_connection_refused_for_another_workers_connections_defers_nothing(
    tmp_path: Path,
) -> None:
    """Two workers send to a receiver that takes 2 connections from the
    address (421 "Too many connections" over that). A worker whose lone
    connection is refused because the other holds both is not refused for its
    mail: it goes back unattempted, to the worker with the connections or a
    few seconds later. Before, each group was deferred for the retry interval:
    1,872 deferrals of 4,000 and 370 s where 6 s will do (here: nothing would
    be due again within --max-wait)."""
    campaign = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"u{i}@d{i % 5}.test" for i in range(1000)])
    with SinkThread(max_connections=2, latency_ms=10.0, keep_messages=False) as sink:
        proc = send_via(campaign, rcpts, (sink.host, sink.port), tmp_path / "spool",
                        "--workers", "2", "--no-dkim", "--max-wait", "20")  # fmt: skip
        refused = sink.stats.faults.get("max-connections", 0)
    got = summary(proc)
    assert got["delivered"] == 1000, got
    assert got["deferrals"] == 0 and got["attempts"] == 1000, (got, refused)


def test_a_campaigns_guardrail_sample_goes_out_from_every_worker_at_once(
    tmp_path: Path,
) -> None:
    """Until a campaign is judged, at most min_sample (500) of its messages are
    out unanswered. The first worker dispatched to took all 500 and the other
    sent nothing of the campaign until they were answered: at a receiver
    answering in 0.3 s, 1.3 s quiet at the start of a send (and the first
    refusals read from one worker's lanes). Now each worker gets its part of
    the sample: the first 200 messages received come from both (each worker
    sends from its own address; the receiver answers in 1 s: a worker started
    a little later still sends its first wave with the other's)."""
    campaign = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"u{i}@d{i % 5}.test" for i in range(1000)])
    with SinkThread(latency_ms=1000.0) as sink:
        proc = send_via(campaign, rcpts, (sink.host, sink.port), tmp_path / "spool",
                        "--workers", "2", "--no-dkim",
                        "--source-ip", "127.0.0.2,127.0.0.3")  # fmt: skip
        first = sorted(sink.messages, key=lambda m: m.time)[:200]
    assert summary(proc)["delivered"] == 1000, proc.stderr[-2000:]
    peers = Counter(m.peer for m in first)
    assert sorted(peers) == ["127.0.0.2", "127.0.0.3"], peers
    assert min(peers.values()) >= 20, peers


def test_a_reloads_dns_checks_do_not_hold_serves_loop(tmp_path: Path) -> None:
    """A SIGHUP's new config is prepared for its workers: its EHLO names
    checked in DNS (up to 3 s at a server that does not answer) and its DKIM
    keys read. That ran on serve's loop: every API request (and listener, and
    the supervisor's dispatch) waited for it; a request made while the reload
    waited on DNS was answered only after "configuration reloaded". Now in a
    thread: it is answered while the reload still waits."""
    import socket
    import threading

    from tests._serve_helpers import Served

    mute = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a DNS server that never answers
    mute.bind(("127.0.0.1", 0))
    asked: list[float] = []
    stop = threading.Event()

    def listen() -> None:
        mute.settimeout(0.1)
        while not stop.is_set():
            try:
                mute.recv(512)
                asked.append(time.monotonic())
            except (TimeoutError, OSError):
                continue

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    dns = (f'[dns]\nnameservers = ["127.0.0.1:{mute.getsockname()[1]}"]\ntimeout = 3.0\n'
           '[ips]\nhelo = "mx.sender.example.com"\n')  # fmt: skip
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}", extra=dns)
        try:
            n = len(asked)
            s.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while len(asked) == n:  # the reload's checks have begun (and wait)
                assert time.monotonic() < deadline and s.proc.poll() is None, "no DNS query"
                time.sleep(0.01)
            status, _ = s.req("GET", "/v1/campaigns")
            answered_before = not any("configuration reloaded" in ln for ln in s.lines)
            s.wait_line("configuration reloaded")  # (it still completes)
        finally:
            s.stop()
            stop.set()
            reader.join(2)
            mute.close()
    assert status == 200
    assert answered_before, "the request waited for the reload's DNS checks"


def test_a_receiver_that_always_says_too_many_connections_gets_the_mail_back_ever_later(
    run: Run, tmp_path: Any
) -> None:
    """A receiver whose every greeting is 421 "Too many connections" (its own
    limit, whatever we hold): the mail goes back unattempted each time, due
    5 s later, then 10, 20, ... (at most BUSY_FOR), not a connection every 5 s
    for the mail's whole max_age."""
    cfg = loader.from_dict({"delivery": {"pipeline": 4, "max_connections": 8}},
                           base_dir=str(tmp_path), files=False)  # fmt: skip
    waits: list[float] = []

    async def go() -> None:
        async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"421 4.7.0 Too many connections from your IP, try later\r\n")
            await w.drain()
            w.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
        back = asyncio.Event()

        def handback(envs: list[Envelope], delay: float, *_a: Any) -> None:
            waits.append(delay)
            back.set()

        def report(rs: list[TxnResult], ip: str, mx: str) -> None:
            raise AssertionError(f"reported: {rs}")

        q = pool.SiteQueue(site, ["127.0.0.1"], cfg, report, "localhost", handback=handback)
        body = b"Subject: x\r\n\r\nhi\r\n"
        for k in range(4):
            back.clear()
            q.push([Envelope("s@example.org", [f"r{k}@x.example"], body, tag=k)])
            await asyncio.wait_for(back.wait(), 60)
        await q.close()
        server.close()

    run(go())
    assert waits == [5.0, 10.0, 20.0, 40.0], waits
