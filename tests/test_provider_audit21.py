"""Providers and relays, session 21's audit: a transport's rate shared by the
node's workers (transports.slots.SharedGcra)."""

from __future__ import annotations

import bisect
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests._engine_helpers import summary, write_recipients
from tests._provider_servers import Recorder, ThreadedApp, mailgun_app
from tests.test_transports_http import send

# Two workers, one address each; the campaign's pool has worker 0's only: all
# its mail goes through that one worker (delivery by the pool's owners).
ONE_WORKER_POOL = (
    '[ips]\nsource = ["127.0.0.2", "127.0.0.3"]\n'
    '[pools]\ndefault = "one"\n[pools.one]\nips = ["127.0.0.2"]\n'
)


def _most_within(times: list[float], window: float) -> int:
    """The most events of ``times`` within any ``window`` seconds."""
    ts = sorted(times)
    return max((bisect.bisect_left(ts, t + window) - i for i, t in enumerate(ts)), default=0)


def test_shared_gcra_is_one_bucket_for_every_process(tmp_path: Path) -> None:
    """transports.slots.SharedGcra: what one process takes, another finds
    taken (one bucket, not one each); its own lower rate costs the one
    timeline more; a TAT left by another boot is forgotten."""
    from fastsend.transports.slots import SharedGcra

    path = str(tmp_path / "transport-rates" / "relay1")
    now = 1000.0
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # another worker takes the whole burst at ``now``
        try:
            b = SharedGcra(path, 10.0, 10)
            got = sum(1 for _ in range(12) if b.acquire(now) == 0.0)
            os.write(from_child, bytes([got]))
        finally:
            os._exit(0)
    got = os.read(to_parent, 1)[0]
    os.waitpid(pid, 0)
    assert got == 10
    me = SharedGcra(path, 10.0, 10)
    assert me.available(now) == 0 and me.acquire(now) == pytest.approx(0.1)
    assert me.available(now + 0.5) == 5 and me.acquire(now + 0.5, 5) == 0.0
    assert me.available(now + 0.5) == 0
    me.set_rate(5.0, burst=1)  # this worker's lower rate: each event costs it 0.2 s
    assert me.acquire(now + 1.0) == pytest.approx(0.5) and me.acquire(now + 1.5) == 0.0
    assert me.acquire(now + 1.6) == pytest.approx(0.1)
    # A TAT from another boot (another CLOCK_MONOTONIC) is not this one's debt.
    import struct

    with open(path, "r+b") as f:
        f.write(struct.pack("=qq", int(5e18), 12345))
    assert me.available(now + 2) == 1
    me.close()


def test_a_providers_rate_is_the_nodes_a_worker_alone_may_use_all_of_it(tmp_path: Path) -> None:
    """A transport's ``rate`` is its messages a second across all workers
    (examples/fastsend.toml). Each worker had its own ``rate / workers``: a
    campaign whose pool only worker 0 sends from went at half the rate with
    two workers (Mailgun at 20/s: at most 30 in any 2 s, 10 at once and 10/s).
    Now the workers share one bucket: the busiest 2 s see more than the half
    rate could give, and never more than the rate allows (a second's burst
    and 2 s of it), as the provider counts."""
    rate = 20
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"m{i}@example.{('net', 'org', 'com')[i % 3]}" for i in range(100)]
    rcpts = write_recipients(tmp_path, addrs)
    rec = Recorder()
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = (
            ONE_WORKER_POOL + f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            f'rate = {rate}\ndomain = "mg.sender.example.com"\n[routes]\n"*" = "mg"\n'
        )
        proc = send(tmp_path, camp, rcpts, cfg, {"FASTSEND_MG_API_KEY": "mg-key"},
                    "--max-wait", "5", "--no-dkim")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == len(addrs) and rec.recipients == Counter(addrs), (s, proc.stderr[-2000:])
    most = _most_within(rec.times, 2.0)
    half = rate // 2 + 2 * rate // 2  # what rate / 2 workers allowed in 2 s
    assert half < most <= rate + 2 * rate, most


def test_a_relays_small_rate_holds_across_workers_and_addresses(tmp_path: Path) -> None:
    """A relay's ``rate`` of 1/s with two workers of two addresses each: every
    (worker, address) lane had a rate of 1/4 and a burst of one: four
    messages went at once (four sessions, one per lane). One bucket for the
    node: one at a time, a second apart (at most 2 within any 0.5 s: a burst
    of one, and one more for the delays of a loaded machine)."""
    import ssl

    import trustme
    from tests.test_transports_relay import ENV, Relay, RelayHandler, relay_config

    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    camp = tmp_path / "c.toml"
    camp.write_text('from = "news@sender.example.com"\nsubject = "s {{ name }}"\ntext = "t"\n')
    addrs = [f"s{i}@example.{('net', 'org', 'com')[i % 3]}" for i in range(6)]
    rcpts = write_recipients(tmp_path, addrs)
    times: list[float] = []

    class Timed(RelayHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            import time

            times.extend([time.monotonic()] * len(envelope.rcpt_tos))
            return await super().handle_DATA(server, session, envelope)

    handler = Timed()
    with Relay(handler, ctx, implicit=False) as relay:
        ips = '[ips]\nsource = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]\n'
        cfg = "[delivery]\nbatch_size = 1\npipeline = 1\n" + ips + relay_config(
            relay.port, ca_path, retry=False, extra="rate = 1\n"
        )
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "5", "--no-dkim")
    s = summary(proc)
    got = Counter(r for rs, _ in handler.messages for r in rs)
    assert s["delivered"] == len(addrs) and got == Counter(addrs), (s, proc.stderr[-2000:])
    assert _most_within(times, 0.5) <= 2, sorted(t - min(times) for t in times)
