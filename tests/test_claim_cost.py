"""Claims sized by what building a message costs its worker (perf: issue 11).

A worker's window claims once a quarter of it is free; with rsa-sha256 mail,
signed as it is built (~0.3 ms a message at 2048 bits), a quarter of a 6,144
window is ~0.5 s of one core, and the workers of a signed send ended that far
apart (one core idle meanwhile: ~58/42 of 20,000 messages). The worker reports
what building costs (``build_cpu_seconds`` / ``messages_built`` in its Stats,
the first at once), and the supervisor claims for it once CLAIM_SECONDS of
building is free (``Dispatch.claim_at``), at least a batch. Unsigned mail
(made when sent, building costs microseconds) claims as before.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from fastsend import config as cfgmod
from fastsend import wire
from fastsend.config import Config, Route
from fastsend.delivery.worker import COST_TOLD, Worker
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.message.keys import generate, write_key
from fastsend.queue import dispatch as dispatch_mod
from fastsend.queue.supervisor import Supervisor
from fastsend.ring import Ring
from fastsend.sink import SinkProcess
from fastsend.spool import Claimed
from fastsend.spool.sqlite import SQLiteSpool

SPEC = {
    "from": "Sender <news@sender.example.com>",
    "subject": "Hello {{ name }}",
    "text": "Hi {{ name }}, " + "lorem ipsum dolor sit amet " * 40,
}


def test_a_worker_reports_what_building_costs_at_once(tmp_path: Path) -> None:
    """A worker building signed mail counts the messages it built and the CPU
    they took in its Stats, and sends its first Stats once COST_TOLD are built,
    before any outcome (the supervisor sizes the next claims by it, not a
    second later); its last Stats counts every message once."""
    key = tmp_path / "rsa.pem"
    write_key(generate("rsa", 1024), key)
    dk = {"domain": "sender.example.com", "selector": "s1", "key": str(key)}
    spec = Campaign.from_dict({**SPEC, "dkim": dk}).to_dict()
    n = COST_TOLD + 20
    with SinkProcess() as sink:
        config = Config(
            spool_dir=str(tmp_path),
            secret=b"claim cost test secret 0123456789",
            routes={"*": Route("127.0.0.1", sink.addresses[0][1])},
        )
        inbox, outbox = Ring(1 << 22), Ring(1 << 22)
        enc = wire.encoder.encode
        inbox.put(enc(wire.CampaignSpec(1, spec)))
        for at in range(0, n, 40):
            items = [
                wire.Item(i, f"u{i}@d.example.net", orjson.dumps({"name": f"N{i}"}), 0)
                for i in range(at + 1, min(at + 40, n) + 1)
            ]
            inbox.put(enc(wire.Batch(1, "d.example.net", items)))
        inbox.put(enc(wire.Drain()))
        w = Worker(0, config, ["127.0.0.2"], inbox, outbox)

        async def run() -> None:
            await w.resolver.site_for("d.example.net")  # every batch placed as read
            await asyncio.wait_for(w.main(), 60)

        asyncio.run(run())
    kinds: list[str] = []
    stats: list[dict[str, float]] = []
    delivered = 0
    while (rec := outbox.get()) is not None:
        msg = wire.from_worker_decoder.decode(rec)
        kinds.append(type(msg).__name__)
        if isinstance(msg, wire.Stats):
            stats.append(msg.counters)
        elif isinstance(msg, wire.Results):
            delivered += sum(r.kind == wire.K_DELIVERED for r in wire.expand(msg.items))
    assert delivered == n
    first_stats = kinds.index("Stats")
    assert "Results" not in kinds[:first_stats], kinds[: first_stats + 1]
    assert stats[0]["messages_built"] >= COST_TOLD
    assert stats[-1]["messages_built"] == n
    assert stats[-1]["build_cpu_seconds"] > 0.0


def _stats(pid: int, built: float, cpu: float) -> bytes:
    return wire.encoder.encode(
        wire.Stats(pid, {"messages_built": built, "build_cpu_seconds": cpu})
    )


def _supervisor(tmp_path: Path, **delivery: Any) -> Supervisor:
    raw: dict[str, Any] = {
        "spool": {"dir": "spool"},
        "workers": {"count": 2},
        "ips": {"source": ["127.0.0.2", "127.0.0.3"], "helo": "out.example.com"},
        "delivery": delivery,
    }
    cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
    return Supervisor(cfg, SQLiteSpool(cfg.spool_dir), EventLog(None))


def test_claims_follow_what_building_costs(tmp_path: Path) -> None:
    """A window of 6,144 claims once a quarter (1,536) is free while building is
    cheap; once its worker says a message costs ~0.3 ms to build, once
    CLAIM_SECONDS of building (333) is free; at ~2 ms (rsa 4096), once a batch
    is. The cost comes from the messages built between two Stats (a restarted
    worker counts from 0), and a Stats with too few built keeps the last."""
    sup = _supervisor(tmp_path, window=6144, batch_size=200)
    try:
        a, b = sup.slots
        assert sup.claim_at(a) == 1536  # not known yet: a quarter
        ring = Ring(1 << 16)
        ring.put(_stats(100, 1000, 0.002))  # 2 us a message: unsigned
        sup.drain_outbox(a, ring)
        assert a.build_cost == 2e-6 and sup.claim_at(a) == 1536
        ring.put(_stats(100, 2000, 0.302))  # 1,000 more at 0.3 ms each
        sup.drain_outbox(a, ring)
        assert abs(a.build_cost - 3e-4) < 1e-9
        assert sup.claim_at(a) == int(dispatch_mod.CLAIM_SECONDS / a.build_cost)
        assert 200 < sup.claim_at(a) < 1536
        ring.put(_stats(100, 2010, 0.4))  # too few built to say: kept
        sup.drain_outbox(a, ring)
        assert abs(a.build_cost - 3e-4) < 1e-9
        ring.put(_stats(101, 500, 1.0))  # a restarted worker: 2 ms a message
        sup.drain_outbox(a, ring)
        assert a.build_cost == 0.002 and sup.claim_at(a) == 200  # a batch at least
        assert sup.claim_at(b) == 1536  # per worker
        # The feeder is asked for its next chunk at that room too.
        sup.note_room(a, 199)
        assert not sup.feed_room.is_set()
        sup.note_room(a, 200)
        assert sup.feed_room.is_set()
    finally:
        sup.suppression.close()
        sup.spool.close()


def test_a_window_of_costly_mail_claims_before_a_quarter_is_free(tmp_path: Path) -> None:
    """Due mail and 400 free of a 6,144 window: no claim while building is
    cheap (under a quarter), a claim of the 400 once building a message costs
    0.3 ms (over CLAIM_SECONDS of building free)."""
    sup = _supervisor(tmp_path, window=6144, batch_size=200)
    spool = sup.spool
    try:
        cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict())
        now = time.time()
        for slot in sup.slots:
            slot.inbox, slot.outbox = Ring(wire.RING_BYTES), Ring(wire.RING_BYTES)
            slot.alive = True
            for i in range(6144 - 400):  # the window's claims, answers still to come
                k = -(slot.index * 10_000 + i + 1)
                slot.inflight[k] = Claimed(k, cid, "x@y.example", "y.example", b"{}", 0, now)
        rows = [(f"u{i}@d.example", "d.example", b"{}") for i in range(1000)]
        spool.add_messages(cid, rows, now)
        a, b = sup.slots
        a.build_cost, b.build_cost = 2e-6, 3e-4
        sup.dispatch()
        assert [len(s.inflight) for s in sup.slots] == [6144 - 400, 6144]
        assert spool.counts(cid)["inflight"] == 400
    finally:
        sup.suppression.close()
        spool.close()
