"""What the supervisor and its workers keep per campaign is dropped once the
campaign has had nothing in any window for a while (Dispatch.forget_idle).

serve runs for months and makes a campaign for every list (and template) a
tenant sends: before, each one's spec, status, tenant, pool, rate buckets,
guardrail sample (every id a campaign under ``min_sample`` let out) and each
worker's spec and compiled template were kept for good (serve's supervisor
grew ~70 KB a campaign of 100 messages, over 80 campaigns). Through the real
engine (supervisor, a forked worker, rings, a sink on loopback), with the
look made every 0.2 s instead of 60: a campaign delivered whole is forgotten,
and mail of it spooled afterwards is delivered (its spec sent to the worker
again, rendered as before).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from fastsend import config as cfgmod
from fastsend import wire
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.queue import supervisor as supmod
from fastsend.queue.supervisor import Supervisor
from fastsend.sink import SinkThread
from fastsend.spool.sqlite import SQLiteSpool

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi {{ name }}",
        "text": "Dear {{ name }}\n"}  # fmt: skip


def _kept(sup: Supervisor, cid: int) -> list[str]:
    """Where the supervisor still keeps something of campaign ``cid``."""
    g, gate = sup.shaping.guardrails, sup.shaping.gate
    places: dict[str, Any] = {
        "spec_cache": sup.spec_cache, "status_cache": sup.status_cache,
        "tenant_cache": sup.tenant_cache, "campaign_pool": sup.campaign_pool,
        "guardrails.counts": g.counts, "guardrails.out": g.out, "guardrails.reasons": g.reasons,
        "gate.campaigns": gate.campaigns, "gate.own": gate.own,
        "slot.campaigns": set().union(*(s.campaigns for s in sup.slots)),
    }  # fmt: skip
    return [name for name, d in places.items() if cid in d]


def test_an_idle_campaign_is_forgotten_and_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supmod, "FORGET_EVERY", 0.2, raising=False)
    with SinkThread() as sink:
        cfg = cfgmod.from_dict({
            "spool": {"dir": "spool"},
            "workers": {"count": 1},
            "routes": {"*": f"{sink.host}:{sink.port}"},
            "delivery": {"tls": "off"},
            "shaping": {"dispatch": {"campaign_rate": 1000}},  # (a bucket per campaign)
        }, base_dir=str(tmp_path))  # fmt: skip
        spool = SQLiteSpool(cfg.spool_dir)
        cid = spool.create_campaign(Campaign.from_dict(SPEC).to_dict(), name="c")
        spool.add_messages(cid, [(f"r{i}@d.example", "d.example", b'{"name": "A"}')
                                 for i in range(20)], time.time())  # fmt: skip
        seen: dict[str, Any] = {"phase": 0, "kept": None}
        deadline = time.monotonic() + 30

        def on_tick(sup: Supervisor) -> None:
            assert time.monotonic() < deadline, seen
            if seen["phase"] == 0 and spool.counts(cid)["delivered"] == 20:
                seen["phase"], seen["kept"] = 1, _kept(sup, cid)
            elif seen["phase"] == 1:
                seen["kept"] = _kept(sup, cid)
                if not seen["kept"]:  # forgotten: more of its mail now
                    seen["phase"] = 2
                    spool.add_messages(cid, [("late@d.example", "d.example", b'{"name": "B"}')],
                                       time.time())  # fmt: skip
            elif seen["phase"] == 2 and spool.counts(cid)["delivered"] == 21:
                sup.stopping = True

        events = EventLog(cfg.event_log_path)
        sup = Supervisor(cfg, spool, events, until_idle=False, on_tick=on_tick)
        try:
            with asyncio.Runner() as r:
                r.run(asyncio.wait_for(sup.run(), 40))
        finally:
            events.close()
        assert seen["phase"] == 2, seen
        bodies = [bytes(m.data) for m in sink.messages]
        assert len(bodies) == 21
        late = [b for b in bodies if b"Dear B" in b]
        assert len(late) == 1 and b"Subject: Hi B" in late[0]
        spool.close()


def test_forget_reaches_the_worker() -> None:
    """wire.Forget crosses the ring and the worker drops each place it keeps a
    campaign in (spec, compiled template, sharing, direct path, ownership, pool,
    route names)."""
    from types import SimpleNamespace

    from fastsend.delivery.worker import Worker

    msg = wire.to_worker_decoder.decode(wire.encoder.encode(wire.Forget([3, 5])))
    assert isinstance(msg, wire.Forget) and msg.campaigns == [3, 5]
    names = ("campaign_specs", "renderers", "shared", "directs", "unowned", "campaign_pools")
    w = SimpleNamespace(**{n: {3: object(), 4: object()} for n in names},
                        router=SimpleNamespace(campaigns={3: (), 4: ()}))  # fmt: skip
    Worker.forget(w, msg.campaigns)  # type: ignore[arg-type]
    assert all(list(getattr(w, n)) == [4] for n in names) and list(w.router.campaigns) == [4]
