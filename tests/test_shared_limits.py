"""Shared GCRA on Redis: Gcra's answers, and the burst + rate*T bound held by
several processes sharing one key over a simulated clock (``now`` passed in)."""

from __future__ import annotations

import multiprocessing as mp
import random

import pytest
from tests._redis_helpers import RedisServer

from fastsend.shared_limits import SharedLimits
from fastsend.throttle import PyGcra

RATE, BURST, T = 200.0, 20, 5.0  # 5,000 us interval: Gcra's decisions exactly


def test_same_answers_as_gcra(redis_server: RedisServer) -> None:
    lim = SharedLimits(redis_server.url())
    b = lim.bucket("campaign:1", RATE, BURST)
    ref = PyGcra(RATE, BURST)
    rnd = random.Random(7)
    now = 1000.0
    admitted = 0
    for _ in range(3000):
        now += rnd.choice([0.0, 0.0, 0.001, 0.003, 0.0125, 0.2])
        n = rnd.randint(1, 4)
        want = ref.acquire(now, n)
        got = b.acquire(now, n)
        assert got == pytest.approx(want, abs=1e-6), (now, n)
        admitted += got == 0.0
    assert 0 < admitted < 3000
    # Names are separate buckets; a fresh one starts full; reset refills.
    assert lim.acquire("campaign:2", RATE, BURST, now, BURST) == 0.0
    assert lim.acquire("campaign:2", RATE, BURST, now, 1) > 0
    lim.reset("campaign:2")
    assert lim.acquire("campaign:2", RATE, BURST, now, BURST) == 0.0
    with pytest.raises(ValueError):
        b.acquire(now, BURST + 1)
    with pytest.raises(ValueError):
        lim.bucket("x", 0.0, 1)
    # now=None: the Redis server's clock (one clock for every node).
    assert lim.acquire("wall", RATE, BURST) == 0.0
    lim.close()


def _node(url: str, seed: int, steps: int, barrier: object, out: object) -> None:
    lim = SharedLimits(url)
    rnd = random.Random(seed)
    events: list[tuple[float, int]] = []
    dt = T / steps
    for k in range(steps + 1):
        if k % 25 == 0:
            barrier.wait()  # type: ignore[attr-defined]  # keep the two clocks close
        now = k * dt
        for _ in range(rnd.randint(0, 3)):
            n = rnd.randint(1, 3)
            if lim.acquire("global", RATE, BURST, now, n) == 0.0:
                events.append((now, n))
    out.put(events)  # type: ignore[attr-defined]


def test_two_processes_sharing_a_key_stay_within_the_bound(redis_server: RedisServer) -> None:
    url = redis_server.url()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    steps = 1000
    procs = [ctx.Process(target=_node, args=(url, s, steps, barrier, out)) for s in (1, 2)]
    for p in procs:
        p.start()
    per_proc = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(sum(n for _, n in ev) > 0 for ev in per_proc), "both processes were admitted"
    events = sorted(e for ev in per_proc for e in ev)
    total = sum(n for _, n in events)
    assert total <= RATE * T + BURST
    assert total >= RATE * T * 0.9, "demand exceeded the rate: the bucket should be busy"
    # Every window [a, b] of simulated time: at most burst + rate*(b - a).
    times = [t for t, _ in events]
    prefix = [0]
    for _, n in events:
        prefix.append(prefix[-1] + n)
    for i, a in enumerate(times):
        if i and times[i - 1] == a:
            continue  # the window starting at a begins at its first event
        for j in range(i, len(times)):
            if j + 1 < len(times) and times[j + 1] == times[j]:
                continue  # ... and ends after its last event at b
            assert prefix[j + 1] - prefix[i] <= BURST + RATE * (times[j] - a) + 1e-9


def test_dispatch_gates_of_two_nodes_share_rates_with_leased_tokens(
    redis_server: RedisServer, tmp_path: object
) -> None:
    """Two nodes' dispatch gates on one Redis spool: a campaign's max_rate holds
    for both together, and Redis sees about one call per lease batch."""
    import time

    from fastsend.config import from_dict
    from fastsend.queue.shaping import DispatchGate
    from fastsend.shared_limits import lease_batch
    from fastsend.spool import open_spool

    url = redis_server.url(dir=str(tmp_path))
    spools = [open_spool(url), open_spool(url)]
    rate = 2000
    cid = spools[0].create_campaign({"kind": "t"}, options={"max_rate": rate})
    cfg = from_dict({"shaping": {"dispatch": {"tenant_rate": 100000}}})
    gates = [DispatchGate(cfg, s, s.shared_limits()) for s in spools]
    admitted = [0, 0]
    t0 = time.monotonic()
    while (now := time.monotonic()) - t0 < 1.5:
        for i, g in enumerate(gates):
            admitted[i] += g.admit(cid, 40, now)
        time.sleep(0.002)
    elapsed = time.monotonic() - t0
    total = sum(admitted)
    batch = lease_batch(rate, rate)
    assert batch == 100
    # GCRA: at most burst + rate*T over both, plus the batches leased and unspent.
    assert rate <= total <= rate + rate * elapsed + 2 * 2 * batch, (admitted, elapsed)
    assert min(admitted) > 0  # both nodes got a share
    calls = sum(s.shared_limits().calls for s in spools)
    # Two buckets (campaign, tenant): a lease tops a bucket up once it is under
    # half a batch, so at most one call per half batch each, at the limit too.
    assert calls <= 2 * total / (batch / 2) + 20, (calls, total)
    for s in spools:
        s.close()
