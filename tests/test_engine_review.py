"""Second-look review of the engine's promises, each scenario on the real engine
(supervisor, forked uvloop workers, shared-memory rings, SQLite spool, a sink on
loopback): every claimed message gets exactly one outcome per attempt and no
message is stuck "in flight" in a running supervisor, whatever goes wrong on the
way (a connection task that raises, a record too big for a ring, a batch whose
campaign is missing, a worker killed while its inbox is full, a reload).

No wall-clock-speed assertions: every run is bounded by a generous timeout that
only a hang reaches.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastsend import config as cfgmod
from fastsend import msgid, wire
from fastsend.events import EventLog
from fastsend.message import Campaign
from fastsend.queue import dispatch as dispatchmod
from fastsend.queue import lifecycle as lifemod
from fastsend.queue import supervisor as supmod
from fastsend.queue.supervisor import Supervisor
from fastsend.sink import SinkThread
from fastsend.spool.sqlite import SQLiteSpool

SPEC = {
    "from": "Review Test <news@sender.example.com>",
    "subject": "Hi {{ name }}",
    "text": "Hi {{ name }} at {{ email }}\n",
}
RUN_LIMIT = 25.0  # seconds; only a hang reaches it


def make_config(tmp: Path, sink: SinkThread, **tables: Any) -> cfgmod.Config:
    raw: dict[str, Any] = {
        "spool": {"dir": "spool"},
        "workers": {"count": 1},
        "ips": {"source": ["127.0.0.2"], "helo": "out.example.com"},
        "routes": {"*": f"{sink.host}:{sink.port}"},
        "retry": {"min_backoff": 0.05, "max_backoff": 0.2, "max_age": 1.0, "jitter": 0.1},
    }
    for name, table in tables.items():
        raw[name] = {**raw.get(name, {}), **table}
    return cfgmod.from_dict(raw, base_dir=str(tmp))


def spool_messages(spool: SQLiteSpool, cid: int, rcpts: list[str], pad: int = 0) -> list[int]:
    rows = [
        (r, r.rpartition("@")[2], orjson.dumps({"name": f"N{i}" + "x" * pad}))
        for i, r in enumerate(rcpts)
    ]
    return spool.add_messages(cid, rows, time.time())


def new_campaign(spool: SQLiteSpool) -> int:
    return spool.create_campaign(Campaign.from_dict(SPEC).to_dict(), name="review")


def run(sup: Supervisor, limit: float = RUN_LIMIT) -> None:
    """Run the supervisor to its end; a hang fails the test (and still cleans up)."""

    async def main() -> None:
        task = asyncio.ensure_future(sup.run())
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            shape = [(x.alive, len(x.backlog), len(x.inflight)) for x in sup.slots]
            sup.on_signal(signal.SIGINT)  # stop now: workers killed, windows released
            await task
            pytest.fail(f"no end within {limit} s (a hang); (alive, backlog, inflight): {shape}")
        task.result()

    with asyncio.Runner() as r:
        r.run(main())


def supervisor(cfg: cfgmod.Config, spool: SQLiteSpool, **kw: Any) -> Supervisor:
    kw.setdefault("max_wait", 5.0)
    return Supervisor(cfg, spool, EventLog(cfg.event_log_path), **kw)


def events(cfg: cfgmod.Config) -> list[dict[str, Any]]:
    p = Path(cfg.event_log_path)
    return [orjson.loads(x) for x in p.read_bytes().splitlines()] if p.exists() else []


def assert_consistent(spool: SQLiteSpool) -> None:
    assert spool.counts()["inflight"] == 0, "a message was left in flight"


# -- a connection task that raises --------------------------------------------


def test_a_connection_that_raises_defers_its_mail_and_the_run_ends(tmp_path: Path) -> None:
    """A local error inside a connection task (here: a HELO name the SMTP client
    refuses, which the config also rejects since) used to kill the task silently: the mail it held stayed in flight
    forever and the pool respawned the failing task in a tight loop, so the
    worker could never drain. Now its mail is deferred (then expires by policy)."""
    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink)
        # The config refuses such a name now; set it behind its back to reach the
        # connection task's own guard (any local error there must defer, not strand).
        cfg.helo = "bad helo name"
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        spool_messages(spool, cid, [f"u{i}@raise.example" for i in range(20)])
        sup = supervisor(cfg, spool)
        run(sup)
        assert not sink.messages
    counts = spool.counts(cid)
    assert counts["expired"] == 20, counts
    assert_consistent(spool)
    evs = events(cfg)
    assert evs and all(e["code"] == 451 for e in evs)
    assert all("local error" in e["text"] for e in evs), evs[0]


# -- records too big for a ring; a batch whose campaign is missing --------------


def test_batches_split_to_fit_the_ring_and_an_oversized_message_bounces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch record larger than the ring made Ring.put raise ValueError out of
    dispatch: the supervisor died, and on restart the same messages killed it
    again (with 8 MB rings, 200 transactional messages of 50 KB are enough).
    Now batches are split to fit, and a single message that can never cross the
    ring is bounced (5.3.4). Rings are shrunk to 64 KB here to keep it small."""
    monkeypatch.setattr(lifemod, "RING_BYTES", 1 << 16)  # the rings forked with
    monkeypatch.setattr(dispatchmod, "RING_BYTES", 1 << 16)  # what dispatch fits
    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink, delivery={"batch_size": 200})
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        ok = [f"u{i}@big.example" for i in range(150)]
        spool_messages(spool, cid, ok, pad=2000)  # 150 x 2 KB: ~300 KB in one batch
        (huge,) = spool_messages(spool, cid, ["huge@big.example"], pad=70000)
        sup = supervisor(cfg, spool)
        run(sup)
        got = sorted(r for m in sink.messages for r in m.recipients)
    assert got == sorted(ok)
    counts = spool.counts(cid)
    assert counts["delivered"] == 150 and counts["bounced"] == 1, counts
    m = spool.message(huge)
    assert m is not None and m["state"] == "bounced" and m["last_enhanced"] == "5.3.4"
    assert_consistent(spool)


def test_a_batch_whose_campaign_is_missing_bounces_and_the_rest_is_sent(tmp_path: Path) -> None:
    """Messages whose campaign row is gone made campaign_spec() raise KeyError
    out of dispatch: the supervisor died, and again at every restart (a poison
    message). Now they are bounced with a clear reason and the rest is sent."""
    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink)
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        spool_messages(spool, cid, [f"u{i}@ok.example" for i in range(30)])
        orphans = spool_messages(spool, 999, [f"o{i}@orphan.example" for i in range(3)])
        sup = supervisor(cfg, spool)
        run(sup)
        assert len(sink.messages) == 30
    assert spool.counts(cid)["delivered"] == 30
    for i in orphans:
        m = spool.message(i)
        assert m is not None and m["state"] == "bounced", m
        assert "missing" in m["last_text"]
    assert_consistent(spool)


# -- kill -9 of a worker whose inbox is full ---------------------------------


def test_kill_9_of_a_worker_with_a_full_inbox_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker is stopped (SIGSTOP) until its inbox ring is full and the
    supervisor waits for ring space on the inbox's writer eventfd, then killed
    (SIGKILL). Its window goes back to the queue and a new worker takes it, on
    new rings whose eventfds reuse the old numbers: the old writer_fd must not
    stay registered on the loop, or the new inbox's space wake-ups are lost and
    the backlog (and every message in it) stays in flight forever."""
    monkeypatch.setattr(lifemod, "RING_BYTES", 1 << 16)  # the rings forked with
    monkeypatch.setattr(dispatchmod, "RING_BYTES", 1 << 16)  # what dispatch fits
    n = 3000
    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink, delivery={"batch_size": 50, "window": n})
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        rcpts = [f"u{i}@full.example" for i in range(n)]
        state = {"stopped": 0, "killed": 0}

        def on_tick(sup: Supervisor) -> None:
            slot = sup.slots[0]
            if not state["stopped"] and slot.alive:
                os.kill(slot.pid, signal.SIGSTOP)  # then the mail arrives
                state["stopped"] = slot.pid
                spool_messages(spool, cid, rcpts, pad=500)
            elif not state["killed"] and slot.backlog and slot.pid == state["stopped"]:
                os.kill(slot.pid, signal.SIGKILL)
                state["killed"] = 1

        sup = supervisor(cfg, spool, on_tick=on_tick)
        run(sup)
        got = [r for m in sink.messages for r in m.recipients]
    assert state["killed"] and sup.stats.worker_restarts == 1
    assert spool.counts(cid)["delivered"] == n
    assert set(got) == set(rcpts)
    assert len(got) - n <= sup.stats.duplicates_possible
    assert_consistent(spool)


# -- Supervisor.reload ---------------------------------------------------------


def test_reload_mid_send_gives_one_outcome_each_and_keeps_the_secret(tmp_path: Path) -> None:
    """SIGHUP's Supervisor.reload drains and respawns each worker while mail is
    being sent: every message gets exactly one outcome (one attempt, one
    delivery, no release of a drained window). The respawned worker must sign
    Message-ID/VERP tokens with the installation secret: a reloaded Config has
    none of its own, and the worker used to fall back to bare row ids, which
    the bounce intake (msgid.parse) then rejected."""
    first = [f"a{i}@reload.example" for i in range(300)]
    second = [f"b{i}@reload.example" for i in range(20)]
    with SinkThread(latency_ms=5) as sink:
        cfg = make_config(tmp_path, sink, delivery={"pipeline": 4, "max_connections": 2})
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        sup = supervisor(cfg, spool, until_idle=False)
        secret = cfg.secret
        assert secret

        async def main() -> None:
            task = asyncio.ensure_future(sup.run())
            spool_messages(spool, cid, first)
            sup.wake.set()
            deadline = time.monotonic() + RUN_LIMIT
            while len(sink.messages) < 50:  # mid-send
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.005)
            old_pid = sup.slots[0].pid
            await asyncio.wait_for(sup.reload(make_config(tmp_path, sink)), RUN_LIMIT)
            assert sup.slots[0].pid != old_pid and sup.slots[0].alive
            spool_messages(spool, cid, second)
            sup.wake.set()
            while spool.counts(cid)["delivered"] < len(first) + len(second):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            sup.on_signal(signal.SIGTERM)
            await asyncio.wait_for(task, RUN_LIMIT)

        with asyncio.Runner() as r:
            r.run(main())
        msgs = list(sink.messages)
    got = [r for m in msgs for r in m.recipients]
    assert sorted(got) == sorted(first + second), "lost or duplicated across the reload"
    evs = events(cfg)
    assert len(evs) == len(got) and all(e["attempt"] == 1 for e in evs)
    assert sup.stats.duplicates_possible == 0
    for m in msgs:
        token = m.message_id.strip("<>").partition("@")[0]
        assert msgid.parse(token, secret) is not None, m.message_id
    assert_consistent(spool)


# -- memory flat with the number of destinations --------------------------------


def test_worker_state_stays_bounded_over_many_destinations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dns_server: Any
) -> None:
    """Each destination site used to keep its SiteQueue, its lanes and its DNS
    cache entries for the life of the worker: a list over 100k domains with
    their own MX (B2B mail) grew a worker by ~6 KB per site, past the 1 GB
    target. Now idle site queues and stateless lanes are forgotten and the DNS
    caches are bounded. Limits are shrunk here (the worker is forked after the
    patch) so that 400 domains show it (unbounded: 400 site queues, 800 cache
    entries); the worker reports its sizes in Stats. 400 sessions through a sink
    thread in this process take 20-30 s under load: a longer limit (a hang only
    reaches it; 25 s failed such runs)."""
    from fastsend.delivery import mx, worker

    monkeypatch.setattr(worker, "SITES_MIN", 50)
    monkeypatch.setattr(mx, "CACHE_MAX", 100)
    n = 400
    zones: dict[str, list[tuple[str, str]]] = {}
    for i in range(n):
        zones[f"d{i}.example"] = [("MX", f"10 mx.d{i}.example.")]
        zones[f"mx.d{i}.example"] = [("A", "127.0.0.1")]
    dns_server.set_zones(zones)
    with SinkThread() as sink:
        cfg = make_config(
            tmp_path,
            sink,
            routes={},
            dns={"nameservers": [f"127.0.0.1:{dns_server.port}"], "mx_port": sink.port},
            delivery={"window": 20, "batch_size": 10, "idle_timeout": 0, "allow_private_mx": True},
        )
        cfg.routes.clear()  # MX routing
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        rcpts = [f"u@d{i}.example" for i in range(n)]
        spool_messages(spool, cid, rcpts)
        peak = {"site_queues": 0.0, "lanes": 0.0, "dns_cache_entries": 0.0}

        def on_tick(sup: Supervisor) -> None:
            for k in peak:
                peak[k] = max(peak[k], sup.slots[0].counters.get(k, 0.0))

        sup = supervisor(cfg, spool, on_tick=on_tick)
        run(sup, limit=120.0)
        on_tick(sup)
        got = sorted(r for m in sink.messages for r in m.recipients)
    assert got == sorted(rcpts)
    assert spool.counts(cid)["delivered"] == n
    assert 0 < peak["site_queues"] <= 150, peak
    assert 0 < peak["lanes"] <= 150, peak
    assert 0 < peak["dns_cache_entries"] <= 2 * 100, peak


# -- a result hook or event listener that raises --------------------------------


def test_a_raising_result_hook_or_listener_strands_nothing(tmp_path: Path) -> None:
    """Result hooks (metrics, guardrails: which may write the spool) and event
    listeners (webhooks, the event index) run inside apply()/flush_results(). One
    that raised used to abort apply() half-way through a Results record, leaving
    the rest of it in flight forever, or to kill the supervisor's loop. Now a
    failing hook is reported and the outcomes are still applied."""
    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink)
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        rcpts = [f"u{i}@hook.example" for i in range(200)]
        spool_messages(spool, cid, rcpts)
        sup = supervisor(cfg, spool)
        calls = {"hook": 0, "listener": 0}

        def bad_hook(claimed: Any, res: Any, state: int) -> None:
            calls["hook"] += 1
            if calls["hook"] % 7 == 1:
                raise RuntimeError("hook bug")

        def bad_listener(evs: list[dict[str, Any]]) -> None:
            calls["listener"] += 1
            raise RuntimeError("listener bug")

        sup.result_hooks.append(bad_hook)
        sup.events.listeners.append(bad_listener)
        run(sup)
        got = sorted(r for m in sink.messages for r in m.recipients)
    assert got == sorted(rcpts)
    assert spool.counts(cid)["delivered"] == 200
    assert calls["hook"] == 200 and calls["listener"] >= 1
    assert len(events(cfg)) == 200
    assert_consistent(spool)


# -- SIGTERM, then SIGINT while draining -----------------------------------------


def test_sigterm_then_sigint_stops_now_and_a_restart_resumes(tmp_path: Path) -> None:
    """Real signals to the supervisor's process: SIGTERM starts a drain, SIGINT
    during the drain stops now. Nothing is left in flight, every message the
    spool calls delivered reached the sink, and a restart delivers the rest
    with duplicates bounded by the window.

    The worker is frozen (SIGSTOP) from before the SIGTERM until the SIGINT
    is taken, so the drain is still going when it lands: the test used to send
    SIGINT once 8 more were delivered, and a supervisor stalled for ~1 s (a
    loaded CI) read the whole rest of the drain at once, sent SIGINT and ended
    the finished drain in that same pass, before the signal was handled."""
    n, window = 400, 100
    with SinkThread(latency_ms=20) as sink:
        cfg = make_config(
            tmp_path,
            sink,
            delivery={"window": window, "batch_size": 20, "pipeline": 4, "max_connections": 2},
            # (the stop-now defers what it held: older than make_config's 1 s
            # max_age, as a loaded CI makes it, that mail expired instead)
            retry={"max_age": 3600.0},
        )
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        rcpts = [f"u{i}@stop.example" for i in range(n)]
        spool_messages(spool, cid, rcpts)
        sent: dict[str, int] = {}

        def on_tick(sup: Supervisor) -> None:
            worker = sup.slots[0].pid
            if sup.stopping:  # SIGINT taken: the worker may take its stop-now
                if sent.pop("frozen", 0):
                    os.kill(worker, signal.SIGCONT)
            elif "frozen" not in sent and "term" not in sent and sup.stats.delivered >= 20:
                os.kill(worker, signal.SIGSTOP)
                sent["frozen"] = worker
            elif "term" not in sent and "frozen" in sent:
                # A pass after the freeze: what the worker wrote before it is read.
                if sup.inflight:  # it holds mail: the drain cannot end without it
                    sent["term"] = sup.stats.delivered
                    os.kill(os.getpid(), signal.SIGTERM)
                else:  # it had finished its window: let it take more, freeze again
                    os.kill(sent.pop("frozen"), signal.SIGCONT)
            elif "term" in sent and "int" not in sent and sup.draining:
                assert sup.inflight, "the drain ended with the worker frozen"
                sent["int"] = 1
                os.kill(os.getpid(), signal.SIGINT)

        sup = supervisor(cfg, spool, on_tick=on_tick)
        run(sup)
        assert sup.stopping and "int" in sent and "frozen" not in sent
        assert_consistent(spool)
        counts = spool.counts(cid)
        assert 0 < counts["delivered"] < n
        assert counts["delivered"] + counts["queued"] + counts["deferred"] == n
        received = {r for m in sink.messages for r in m.recipients}
        rows = [spool.message(i) for i in range(1, n + 1)]
        db_delivered = {m["rcpt"] for m in rows if m is not None and m["state"] == "delivered"}
        assert db_delivered <= received
        again = supervisor(cfg, spool)
        run(again)
        got = [r for m in sink.messages for r in m.recipients]
    assert spool.counts(cid)["delivered"] == n
    assert set(got) == set(rcpts)
    assert len(got) - n <= window


# -- DNS that does not answer --------------------------------------------------------


def test_dns_down_defers_then_expires_without_stranding(tmp_path: Path) -> None:
    """No DNS server at the configured address: every batch gets a deferral per
    attempt (a DNS reason, not a local error), and the mail expires by policy."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with SinkThread() as sink:
        cfg = make_config(
            tmp_path,
            sink,
            dns={"nameservers": [f"127.0.0.1:{port}"], "timeout": 0.2},
        )
        cfg.routes.clear()
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        spool_messages(spool, cid, [f"u{i}@nodns.example" for i in range(5)])
        run(supervisor(cfg, spool))
        assert not sink.messages
    assert spool.counts(cid)["expired"] == 5
    assert_consistent(spool)
    evs = events(cfg)
    assert evs and all(e["enhanced"] == "4.4.3" and "lookup" in e["text"] for e in evs), evs[:2]


# -- a dead worker's last outcomes ---------------------------------------------------


def test_a_dead_workers_outbox_is_applied_before_its_window_is_released(tmp_path: Path) -> None:
    """kill -9 of a worker whose outbox holds outcomes the supervisor has not
    read yet: retire() applies them first, then releases only the rest of the
    window. Each message ends with exactly one delivered event (no outcome
    applied twice, none applied to a released message): at attempt 1, or, for
    a message the dead worker held (outcome unknown: one deferred event of
    stage "worker"), at attempt 2; the duplicates the sink sees stay within
    what was released."""
    # Two windows' worth: the kill happens while the worker still has at least
    # ``busy`` messages to answer (a late tick under load may find the first
    # window done; the next claim refills it).
    n, busy = 8000, 500
    with SinkThread(latency_ms=1) as sink:
        # the whole window out from the start (a campaign not yet judged by its
        # guardrails has at most min_sample out: the worker had answered them
        # all by the kill, and none was of unknown outcome)
        cfg = make_config(
            tmp_path, sink, delivery={"pipeline": 16}, guardrails={"min_sample": n}
        )
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        rcpts = [f"u{i}@dead.example" for i in range(n)]
        spool_messages(spool, cid, rcpts)
        seen: dict[str, float] = {}

        def on_tick(sup: Supervisor) -> None:
            slot = sup.slots[0]
            if seen or not slot.alive or slot.outbox is None or len(sink.messages) < 200:
                return
            # ``busy`` handed to it: mail still in the supervisor's backlog (the
            # worker's inbox full) or rate-held never reached it and goes back
            # unattempted, with no "worker" event (on a loaded host a kill found
            # every unanswered message there).
            unsent = {c.id for items in slot.held.values() for c in items}
            for rec in slot.backlog:
                msg = wire.to_worker_decoder.decode(rec)
                if isinstance(msg, wire.Batch):
                    unsent.update(item.id for item in msg.items)
            if len(slot.inflight.keys() - unsent) < busy:
                return
            # The loop is blocked here: the worker's outcomes pile up unread.
            deadline = time.monotonic() + RUN_LIMIT / 2
            while slot.outbox.used() < 4096:
                assert time.monotonic() < deadline, "the worker reported nothing"
                time.sleep(0.001)
            pid = slot.pid
            os.kill(pid, signal.SIGKILL)
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
            seen["before"] = sup.stats.delivered
            seen["window"] = len(slot.inflight)
            sup.reap()
            seen["applied"] = sup.stats.delivered - seen["before"]
            seen["released"] = sup.stats.duplicates_possible

        sup = supervisor(cfg, spool, on_tick=on_tick)
        run(sup)
        got = [r for m in sink.messages for r in m.recipients]
    assert seen["applied"] > 0, "the dead worker's outbox was not applied"
    assert seen["applied"] + seen["released"] == seen["window"]
    assert sup.stats.worker_restarts == 1
    assert spool.counts(cid)["delivered"] == n and set(got) == set(rcpts)
    assert len(got) - n <= seen["released"]
    evs = events(cfg)
    done = [e for e in evs if e["event"] == "delivered"]
    unknown = {e["id"] for e in evs if e["event"] == "deferred" and e["stage"] == "worker"}
    assert len(done) + len(unknown) == len(evs)
    assert 0 < len(unknown) <= seen["released"]
    assert sorted(e["id"] for e in done) == list(range(1, n + 1))
    assert all(e["attempt"] == 1 + (e["id"] in unknown) for e in done)
    assert_consistent(spool)


# -- a hung worker --------------------------------------------------------------------


def test_a_hung_worker_is_killed_and_its_window_requeued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that stops answering (here SIGSTOP: its loop never runs again)
    used to hold its window in flight for as long as the supervisor ran. A
    worker sends Stats every second; after WORKER_SILENCE without any record
    the supervisor kills it, and its window goes to a fresh worker."""
    monkeypatch.setattr(lifemod, "WORKER_SILENCE", 3.0)
    n = 300
    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink)
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        rcpts = [f"u{i}@hung.example" for i in range(n)]
        stopped: list[int] = []

        def on_tick(sup: Supervisor) -> None:
            slot = sup.slots[0]
            if not stopped and slot.alive:
                os.kill(slot.pid, signal.SIGSTOP)  # then the mail arrives
                stopped.append(slot.pid)
                spool_messages(spool, cid, rcpts)

        sup = supervisor(cfg, spool, on_tick=on_tick)
        run(sup)
        got = [r for m in sink.messages for r in m.recipients]
    assert sup.stats.worker_restarts >= 1 and sup.slots[0].pid != stopped[0]
    assert spool.counts(cid)["delivered"] == n
    assert sorted(got) == sorted(rcpts)  # the stopped worker sent nothing
    assert_consistent(spool)


# -- retry policy --------------------------------------------------------------------


def test_a_message_with_many_attempts_is_retried_then_expires(tmp_path: Path) -> None:
    """The backoff's 2**(n-1) overflowed a float from attempt 1026 on (reachable:
    60 s .. 300 s over 7 days is 2,016 attempts): OverflowError in apply() lost
    the rest of the Results record (stranded in flight) or killed the loop.
    Now the interval is capped as the policy says and the message expires."""
    from fastsend.retry import next_attempt
    from fastsend.spool import DEFERRED, Result

    policy = cfgmod.from_dict({"retry": {"min_backoff": 60, "max_backoff": 300}}).retry
    for n in (1, 1025, 1026, 5000):
        at = next_attempt(policy, n, 0.0, 0.0)
        assert at is not None and at <= 300 * (1 + policy.jitter)
    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink)
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        ids = spool_messages(spool, cid, ["tempfail-x@many.example", "ok@many.example"])
        spool.record_results([Result(i, DEFERRED, 1100, time.time()) for i in ids], time.time())
        run(supervisor(cfg, spool))
        assert [r for m in sink.messages for r in m.recipients] == ["ok@many.example"]
    first, second = (spool.message(i) for i in ids)
    assert first is not None and first["state"] == "expired" and first["attempts"] > 1100
    assert second is not None and second["state"] == "delivered" and second["attempts"] == 1101
    assert_consistent(spool)


# -- a campaign cancelled while its mail is in flight ---------------------------------


def test_mail_deferred_after_its_campaign_was_cancelled_is_cancelled(tmp_path: Path) -> None:
    """Cancelling a campaign makes its pending mail final and lets what is in
    flight finish its attempt. An attempt that then came back deferred left the
    message "deferred" in a cancelled campaign for ever (never claimed, never
    expired, counted as pending). Now it is cancelled too; delivered stays."""
    with SinkThread(defer_rate=1.0, latency_ms=100) as sink:
        # (make_config's 1 s max_age: on a loaded machine the deferral came after
        # it and the mail expired, cancelled 0 of 10)
        cfg = make_config(tmp_path, sink, retry={"max_age": 3600.0})
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        spool_messages(spool, cid, [f"u{i}@cancel.example" for i in range(10)])

        def on_tick(sup: Supervisor) -> None:
            if sup.inflight and spool.get_campaign(cid).status == "active":  # type: ignore[union-attr]
                spool.set_campaign_status(cid, "cancelled")

        sup = supervisor(cfg, spool, on_tick=on_tick)
        run(sup)
    counts = spool.counts(cid)
    assert counts["cancelled"] == 10 and counts["deferred"] == 0, counts
    assert sup.stats.deferred == 10  # each attempt's outcome was still applied
    assert_consistent(spool)


# -- every fault: exactly one outcome per attempt ------------------------------------


def test_every_fault_gets_exactly_one_outcome_per_attempt(tmp_path: Path) -> None:
    """All the sink's faults in the same pipelined groups as good mail: each
    attempt of each message has exactly one outcome event (attempt numbers
    1..k, no gap, no repeat), the last one is the message's final state, and
    good mail caught in a dropped or 421-closed connection is retried and
    delivered."""
    faults = ["tempfail-a", "defer2-b", "permfail-c", "421-d", "disconnect-in-data-e", "slow-f"]
    rcpts = [f"{f}@fault.example" for f in faults] + [f"ok{i}@fault.example" for i in range(40)]
    with SinkThread(slow_ms=50) as sink:
        cfg = make_config(
            tmp_path,
            sink,
            delivery={"pipeline": 8, "max_connections": 2},
            # The tempfails expire after it; the good mail caught in a dropped group
            # is retried within it (2 s: on a loaded machine slow-f's retry came
            # later and it expired).
            retry={"max_age": 6.0},
        )
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        ids = spool_messages(spool, cid, rcpts)
        run(supervisor(cfg, spool))
        received = [r for m in sink.messages for r in m.recipients]
    by_id: dict[int, list[dict[str, Any]]] = {}
    for e in events(cfg):
        by_id.setdefault(e["id"], []).append(e)
    final = {"delivered", "bounced", "expired"}
    for i, rcpt in zip(ids, rcpts, strict=True):
        m = spool.message(i)
        assert m is not None
        evs = by_id.get(i, [])
        assert [e["attempt"] for e in evs] == list(range(1, m["attempts"] + 1)), (rcpt, evs)
        assert evs[-1]["event"] == m["state"] and m["state"] in final, (rcpt, m["state"])
        assert all(e["event"] == "deferred" for e in evs[:-1]), rcpt
    state = {r: spool.message(i)["state"] for i, r in zip(ids, rcpts, strict=True)}  # type: ignore[index]
    assert state["permfail-c@fault.example"] == "bounced"
    assert state["defer2-b@fault.example"] == "delivered"
    assert state["slow-f@fault.example"] == "delivered"
    for f in ("tempfail-a", "421-d", "disconnect-in-data-e"):
        assert state[f"{f}@fault.example"] == "expired", f
    assert all(state[f"ok{i}@fault.example"] == "delivered" for i in range(40))
    assert sorted(received) == sorted(r for r in rcpts if state[r] == "delivered")
    assert_consistent(spool)


def test_send_refuses_a_campaign_too_large_for_the_ring(tmp_path: Path) -> None:
    """`fastsend send` says at once that a campaign (files inlined) cannot cross
    a worker's ring, and spools nothing, rather than bouncing every recipient."""
    from tests._engine_helpers import run_fastsend, write_campaign, write_recipients

    # an attachment inlined past the ring's size (a body as big costs seconds of TOML
    # and template parsing before the check)
    (tmp_path / "big.bin").write_bytes(os.urandom(supmod.RING_BYTES // 4 * 3 + 4096))
    camp = write_campaign(tmp_path, 'from = "A <a@sender.example.com>"\nsubject = "s"\n'
                                    'text = "t"\nattachments = ["big.bin"]\n')  # fmt: skip
    rcpts = write_recipients(tmp_path, ["u@big.example"])
    spool = tmp_path / "spool"
    res = run_fastsend(
        "send", str(camp), "-r", str(rcpts), "--route", "*=127.0.0.1:9", "--spool", str(spool),
        "--no-dkim", "--json", "--no-progress", "--max-wait", "1",
    )  # fmt: skip
    assert res.returncode == 2 and "campaign is" in res.stderr and "at most" in res.stderr
    assert not (spool / "spool.db").exists()


# -- a worker in a crash loop ----------------------------------------------------------


def test_a_crash_loop_counts_an_attempt_instead_of_releasing_for_ever(tmp_path: Path) -> None:
    """A worker that dies again and again (a message that crashes it, the OOM
    killer): each death used to release its window as if nothing was tried, so
    the same messages went straight back to the next worker -- a poison message
    never expired and every round re-sent the window (duplicates without
    bound). From the third abnormal exit within a minute the window is answered
    as a deferred attempt instead: backoff, then expiry, as for any failure."""
    n = 200
    with SinkThread(latency_ms=20) as sink:
        # max_age well beyond three worker restarts on a loaded host: the mail
        # must be retried (attempt 2), not expire while the workers respawn.
        cfg = make_config(
            tmp_path, sink, delivery={"pipeline": 4, "max_connections": 2}, retry={"max_age": 60.0}
        )
        spool = SQLiteSpool(cfg.spool_dir)
        cid = new_campaign(spool)
        rcpts = [f"u{i}@crash.example" for i in range(n)]
        spool_messages(spool, cid, rcpts)
        kills: list[int] = []

        def on_tick(sup: Supervisor) -> None:
            slot = sup.slots[0]
            mid_send = slot.alive and bool(slot.inflight) and slot.pid not in kills
            if len(kills) < supmod.CRASH_LOOP[0] and mid_send:  # each new worker, once
                kills.append(slot.pid)
                os.kill(slot.pid, signal.SIGKILL)

        sup = supervisor(cfg, spool, on_tick=on_tick)
        run(sup)
        got = [r for m in sink.messages for r in m.recipients]
    assert sup.stats.worker_restarts == len(kills) == 3
    assert spool.counts(cid)["delivered"] == n and set(got) == set(rcpts)
    assert len(got) - n <= sup.stats.duplicates_possible
    evs = events(cfg)
    deferred = [e for e in evs if e["event"] == "deferred"]
    crashed = [e for e in deferred if "exited 3 times" in e["text"]]
    # The first two deaths: each message the worker held is an attempt of unknown outcome.
    assert all("outcome unknown" in e["text"] for e in deferred if e not in crashed)
    assert crashed
    tries = Counter(e["id"] for e in deferred)
    delivered = {e["id"]: e["attempt"] for e in evs if e["event"] == "delivered"}
    assert all(delivered[i] == tries[i] + 1 for i in tries)  # each death counted an attempt
    assert_consistent(spool)


def test_the_listeners_are_told_a_flush_when_the_spool_cannot_drop_its_untold_note(
    tmp_path: Path,
) -> None:
    """A flush of outcomes whose event log write went through but whose
    ``Spool.told`` failed (a Redis spool's is a call to Redis, which can be in an
    outage right then): the listeners (webhooks, the event index, rollups) are
    told the batch anyway, then the outage is raised for the supervisor's guard;
    the note stays, so the next start tells them again at worst. Before, the
    listeners missed the batch until the next start's catch-up."""
    from fastsend.spool import SpoolProxy

    class Outage(SpoolProxy):
        def told(self, ids: Any = None) -> None:
            raise ConnectionError("Redis is restarting")

    with SinkThread() as sink:
        cfg = make_config(tmp_path, sink)
        spool = SQLiteSpool(cfg.spool_dir)
        log = EventLog(cfg.event_log_path)
        told: list[dict[str, Any]] = []
        log.listeners.append(told.extend)
        sup = Supervisor(cfg, Outage(spool), log, max_wait=5.0)
        sup.event_buf = [{"time": time.time(), "event": "delivered", "id": 1, "campaign": 1,
                          "rcpt": "a@b.example"}]  # fmt: skip
        with pytest.raises(ConnectionError):
            sup.flush_results()
        assert [e["id"] for e in told] == [1]
        assert [orjson.loads(x)["id"] for x in Path(cfg.event_log_path).read_bytes().splitlines()] == [1]
        log.close()
        spool.close()
