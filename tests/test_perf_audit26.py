"""Per-message work of the supervisor and the workers (perf26's audit, issue 11).

Each test pins down work that had been done per message (or per message in a
window, several times a second) and is now done per campaign, per group or
per batch, with the behaviour it served unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from fastsend import config as cfgmod
from fastsend import wire
from fastsend.events import EventLog
from fastsend.queue.supervisor import Supervisor
from fastsend.ring import Ring
from fastsend.spool import Claimed
from fastsend.spool.sqlite import SQLiteSpool

SPEC = {
    "from": "Sender <news@sender.example.com>",
    "subject": "Hello {{ name }}",
    "text": "Hi {{ name }}.",
}


def _supervisor(tmp_path: Path) -> Supervisor:
    raw: dict[str, Any] = {
        "spool": {"dir": "spool"},
        "workers": {"count": 2},
        "ips": {"source": ["127.0.0.2", "127.0.0.3"], "helo": "out.example.com"},
    }
    cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
    sup = Supervisor(cfg, SQLiteSpool(cfg.spool_dir), EventLog(None))
    for slot in sup.slots:  # not started: rings of its own, workers stood in
        slot.inbox, slot.outbox = Ring(1 << 20), Ring(1 << 20)
        slot.alive = True
    return sup


class CountingWindow(dict[int, Claimed]):
    """A window (``WorkerSlot.inflight``) that counts the passes over its claims."""

    passes = 0

    def values(self) -> Any:
        CountingWindow.passes += 1
        return super().values()

    def items(self) -> Any:
        CountingWindow.passes += 1
        return super().items()


def _withdrawn(sup: Supervisor) -> list[int]:
    ids: list[int] = []
    for slot in sup.slots:
        assert slot.inbox is not None
        while (rec := slot.inbox.get()) is not None:
            msg = wire.to_worker_decoder.decode(rec)
            if isinstance(msg, wire.Withdraw):
                ids += msg.ids
    return ids


def test_a_look_for_stopped_campaigns_reads_their_status_not_every_claim(
    tmp_path: Path,
) -> None:
    """Every STATUS_TTL s the supervisor looks for mail in the windows of a
    campaign paused or cancelled since its claim. While every campaign with
    mail in a window is active, that is their status (one read each), not a
    pass over each window's claims (two full windows: ~12,000 claims, twice a
    second, whatever the send's rate); once one is paused, its mail not yet
    sent is asked back (wire.Withdraw) as before, and a campaign gone from
    every window is not read again."""
    sup = _supervisor(tmp_path)
    try:
        spool = sup.spool
        a = spool.create_campaign(SPEC, name="a")
        b = spool.create_campaign(SPEC, name="b")
        now = time.time()
        claims = {
            cid: [
                Claimed(cid * 1000 + i, cid, f"u{i}@d{i % 3}.example.net", f"d{i % 3}.example.net",
                        orjson.dumps({"name": f"N{i}"}), 0, now)
                for i in range(40)
            ]
            for cid in (a, b)
        }  # fmt: skip
        slot0, slot1 = sup.slots
        sup.hand(slot0, claims[a] + claims[b][:20], False)
        sup.hand(slot1, claims[b][20:], False)
        _withdrawn(sup)  # (the batches)
        for slot in sup.slots:
            slot.inflight = CountingWindow(slot.inflight)
        CountingWindow.passes = 0
        mono = time.monotonic()
        for k in range(1, 4):  # all active: status reads only
            sup.withdraw_stopped(mono + k)
        assert CountingWindow.passes == 0
        assert _withdrawn(sup) == []

        spool.set_campaign_status(b, "paused")
        sup.status_cache.clear()  # (read again at once: not STATUS_TTL later)
        sup.withdraw_stopped(mono + 10)
        assert sorted(_withdrawn(sup)) == sorted(c.id for c in claims[b])
        assert CountingWindow.passes > 0
        assert sup.window_campaigns == {a, b}  # b's mail is still in the windows

        # b's mail answered (handed back): gone from the windows, not read again
        for slot in sup.slots:
            for c in claims[b]:
                slot.inflight.pop(c.id, None)
        sup.status_cache.clear()
        sup.withdraw_stopped(mono + 20)
        assert sup.window_campaigns == {a}
        CountingWindow.passes = 0
        sup.status_cache.clear()
        sup.withdraw_stopped(mono + 30)
        assert CountingWindow.passes == 0 and _withdrawn(sup) == []
    finally:
        sup.suppression.close()
        sup.spool.close()


def test_a_relays_answers_are_looked_at_for_refusals_only_when_one_failed(
    monkeypatch: Any,
) -> None:
    """Each group of answers from a relay or a static route's smarthost is
    looked at for a refusal of us ("554 5.7.1 Relay access denied": deferred,
    the relay's configuration, not the recipient). A group all delivered (the
    usual answer) is passed on as it is, in one compiled pass (before: a
    call per outcome, ~0.8 us per message of the workers); a group with a
    refusal in it is still mapped."""
    from types import SimpleNamespace

    from fastsend.config import Config
    from fastsend.delivery.routes import Router
    from fastsend.outcome import DEFERRED, DELIVERED, FAILED, Outcome, TxnResult
    from fastsend.transports import relay

    calls = [0]
    real = relay.refused_us

    def counted(o: Outcome) -> bool:
        calls[0] += 1
        return real(o)

    monkeypatch.setattr(relay, "refused_us", counted)
    worker = SimpleNamespace(config=Config(), shaper=SimpleNamespace(events=[]))
    router = Router(worker)
    mx = "smart.example.net[127.0.0.1]:2525"
    ok = [TxnResult(i, [Outcome(DELIVERED, 250, "2.0.0", "Ok", "data", mx)], "") for i in range(64)]
    assert router.relay_refusals(ok, mx) is ok
    assert calls[0] == 0

    refused = Outcome(FAILED, 554, "5.7.1", "<a@b.example>: Relay access denied", "rcpt", mx)
    mixed = [*ok[:3], TxnResult(99, [refused], ""), *ok[3:6]]
    out = router.relay_refusals(mixed, mx)
    assert [tr.tag for tr in out] == [tr.tag for tr in mixed]
    assert out[3].outcomes[0].kind == DEFERRED and out[3].outcomes[0].code == 554
    assert all(out[i] is mixed[i] for i in (0, 1, 2, 4, 5, 6))
    assert worker.shaper.events and worker.shaper.events[0]["action"] == "relay refused us"


def test_a_worker_reads_its_inbox_without_a_cpu_clock_system_call_per_batch(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A worker reading its inbox stops after READ_SLICE s of CPU time (the
    rest read in the loop's next iteration). The CPU clock is a system call
    (~4 us on a VM) and was read after every batch: a batch per recipient
    domain holds a few messages, so ~0.4 us per message. Now the wall clock
    (no system call) is read per batch, the CPU clock once READ_SLICE s of wall
    time have passed (CPU time cannot be ahead of it): a few reads a wake-up.
    Every message is still delivered once."""
    import asyncio

    from fastsend.config import Config, Route
    from fastsend.delivery import worker as worker_mod
    from fastsend.delivery.worker import Worker
    from fastsend.sink import SinkProcess

    n_batches, per = 200, 3
    reads = [0]
    real = time.process_time

    def counted() -> float:
        reads[0] += 1
        return real()

    with SinkProcess() as sink:
        config = Config(
            spool_dir=str(tmp_path),
            secret=b"perf26 test secret 0123456789abcdef",
            routes={"*": Route("127.0.0.1", sink.addresses[0][1])},
        )
        inbox, outbox = Ring(1 << 22), Ring(1 << 22)
        enc = wire.encoder.encode
        inbox.put(enc(wire.CampaignSpec(1, SPEC)))
        for b in range(n_batches):
            items = [
                wire.Item(b * per + i + 1, f"u{b}x{i}@d.example.net",
                          orjson.dumps({"name": f"N{b}"}), 0)
                for i in range(per)
            ]  # fmt: skip
            inbox.put(enc(wire.Batch(1, "d.example.net", items)))
        inbox.put(enc(wire.Drain()))
        w = Worker(0, config, ["127.0.0.2"], inbox, outbox)

        async def run() -> None:
            await w.resolver.site_for("d.example.net")  # every batch placed as read
            monkeypatch.setattr(worker_mod.time, "process_time", counted)
            await asyncio.wait_for(w.main(), 60)

        asyncio.run(run())
    monkeypatch.undo()
    delivered: list[int] = []
    while (rec := outbox.get()) is not None:
        msg = wire.from_worker_decoder.decode(rec)
        if isinstance(msg, wire.Results):
            delivered += [r.id for r in wire.expand(msg.items) if r.kind == wire.K_DELIVERED]
    assert sorted(delivered) == list(range(1, n_batches * per + 1))
    assert reads[0] < n_batches // 4, reads[0]


def test_a_lists_short_rows_are_measured_in_one_pass() -> None:
    """Each row of a list is measured as it is accepted (row_sizer: over
    [delivery] max_message_size, or a header its values cannot make). When no
    header takes a row's values, a row within the renderer's guard is never
    decoded: a batch whose rows are all that short passes in one pass over
    their lengths, not a call per row (~0.35 us a row of the supervisor);
    a batch with a longer row is measured row by row and its row too big is
    refused with its line, as before."""
    from fastsend.accept import _size_rows, row_sizer
    from fastsend.message import Campaign
    from fastsend.recipients import Batch

    spec = {**SPEC, "text": "Hi {{ name }}.\n" * 20}
    sizer = row_sizer(Campaign.from_dict(spec).to_dict(), 200_000)
    assert sizer is not None
    calls = [0]

    def counted(vars_json: bytes) -> str | None:
        calls[0] += 1
        return sizer(vars_json)

    counted.short = getattr(sizer, "short", -1)  # type: ignore[attr-defined]
    rows = [(f"u{i}@example.net", "example.net", orjson.dumps({"name": f"N{i}"}))
            for i in range(500)]  # fmt: skip
    b = Batch(list(rows), list(range(2, 502)), [], 501, True)
    _size_rows(b, counted)
    assert calls[0] == 0 and b.rows == rows and not b.bad

    big = ("big@example.net", "example.net", orjson.dumps({"name": "x" * 20_000}))
    b = Batch([*rows[:3], big, *rows[3:6]], list(range(2, 9)), [], 8, True)
    _size_rows(b, counted)
    assert calls[0] >= 7
    assert [r[0] for r in b.rows] == [r[0] for r in rows[:6]]
    assert [bad.line for bad in b.bad] == [5] and "max_message_size" in b.bad[0].error
