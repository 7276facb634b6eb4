"""perf27's audit of the supervisor's dispatch: the guardrails' sample
(``Dispatch.sample_cap``) no longer looks up, at each dispatch, the held
messages it held itself while the sample stays full; messages of the sample
that a rate held (``WorkerSlot.held_sampled``) still go as the rate lets them,
the sample full or not."""

from __future__ import annotations

import time
from pathlib import Path

from _engine_helpers import CAMPAIGN, spool_rows, write_campaign
from _serve_helpers import until
from _supervisor_helpers import close_supervisor, handed
from fastsend import config as cfgmod
from fastsend import wire
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.queue.supervisor import Supervisor
from fastsend.ring import Ring
from fastsend.spool.sqlite import SQLiteSpool


def test_sample_messages_a_rate_held_go_while_the_sample_is_full(tmp_path: Path) -> None:
    raw = {
        "spool": {"dir": "spool"},
        "workers": {"count": 1},
        "ips": {"source": ["127.0.0.2"], "helo": "out.example.com"},
        "guardrails": {"min_sample": 10},
    }
    cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
    spool = SQLiteSpool(cfg.spool_dir)
    spec = Campaign.load(str(write_campaign(tmp_path, CAMPAIGN))).to_dict()
    # 4/s: a burst of 4, so 6 of the 10 the sample lets out wait for the rate
    cid = spool.create_campaign(spec, name="c", options={"max_rate": 4})
    spool.add_messages(cid, spool_rows(20, "a.example") + spool_rows(20, "b.example"), time.time())
    sup = Supervisor(cfg, spool, EventLog(None), max_wait=1.0)
    for slot in sup.slots:
        slot.inbox, slot.outbox = Ring(wire.RING_BYTES), Ring(wire.RING_BYTES)
        slot.alive = True
    try:
        sup.dispatch(any_room=True)
        out = handed(sup)
        slot = sup.slots[0]
        assert 0 < len(out) < 10  # the rate's burst of the sample
        assert slot.held_sampled  # the rest of the sample waits for the rate
        sample = set(sup.shaping.guardrails.out[cid])
        assert len(sample) == 10 and set(out) <= sample
        # No outcome comes back: the sample stays full. What the rate held of
        # it goes as the rate lets it; none of the 30 others.
        got = until(
            "the rate-held sample messages",
            lambda: (out.extend(handed(sup)), sup.dispatch(any_room=True), len(out) >= 10)[-1],
            timeout=30,
        )
        assert got
        out += handed(sup)
        assert sorted(out) == sorted(sample)
        held = {c.id for items in slot.held.values() for c in items}
        assert len(held) == 30 and not held & sample
        # Once the rate holds none of it, the flag is cleared with an empty hold.
        slot.held.clear()
        sup.gate(slot, {})
        assert not slot.held_sampled
    finally:
        close_supervisor(sup, spool)
