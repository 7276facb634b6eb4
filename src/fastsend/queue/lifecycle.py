"""Worker lifecycle: fork the uvloop workers with their two rings, feed records
to a ring as it has room, watch for exits and silence, restart (or, in a crash
loop, answer the window as deferred), replace workers on reload without a gap
(the new one starts while the old one finishes its transactions), and stop them
(Drain and wait, or terminate).

Before forking worker i the supervisor creates two rings (``inbox`` supervisor ->
worker, ``outbox`` worker -> supervisor); each worker owns a slice of the
source-IP pool. A worker that dies has its outbox drained, its window released
back to queued, and is forked again with fresh rings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence

from fastsend import msgid, wire
from fastsend.config import Config
from fastsend.queue.state import RING_BYTES, SupervisorState, WorkerSlot, answered_in_window
from fastsend.ring import WRITE_LOG_RUN, Ring, WriteLog, reset_write_logs

WORKER_SILENCE = 30.0  # s without a record (Stats come every second): hung, kill -9 it
CRASH_LOOP = 3, 60.0  # this many abnormal exits within this many seconds: a crash loop
RETIRE_ANSWER = 5.0  # s for a worker told wire.Retire to say which connections it holds


def wait(slot: WorkerSlot, options: int) -> tuple[int, int]:
    """``os.waitpid`` of the slot's worker, adding its CPU time to ``slot.cpu_s``
    when it has exited."""
    pid, status, usage = os.wait4(slot.pid, options)
    if pid:
        slot.cpu_s += usage.ru_utime + usage.ru_stime
    return pid, status


def watch_exits(pids: list[int], on_exit: Callable[[], None]) -> list[int]:
    """Call ``on_exit`` from the running loop when one of ``pids`` exits (a
    pidfd each, Linux >= 5.3); returns the pidfds for :func:`unwatch` (none
    where pidfds are not available: the caller polls)."""
    loop = asyncio.get_running_loop()

    def exited(fd: int) -> None:
        loop.remove_reader(fd)  # readable for good now: once is enough
        on_exit()

    fds: list[int] = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            continue
        loop.add_reader(fd, exited, fd)
        fds.append(fd)
    return fds


def unwatch(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for fd in fds:
        loop.remove_reader(fd)
        os.close(fd)


def fold(into: dict[str, float], counters: dict[str, float]) -> None:
    """Add ``counters`` to ``into``, name by name."""
    for k, v in counters.items():
        into[k] = into.get(k, 0.0) + v


class WorkerLifecycle(SupervisorState):
    def rest_ip(
        self,
        ip: str,
        providers: list[str],
        until: float,
        reason: str,
        key: str = "",
        recheck: float = 0.0,
    ) -> None:
        """Rest a source IP for providers ("*": all) until ``until`` (unix seconds) in the
        worker that owns it (and any worker started later): a DNS blocklist listing.
        ``key``, ``recheck``: see wire.IPRest (:meth:`lift_ip` ends it)."""
        rest = wire.IPRest(ip, list(providers), until, reason, key, recheck)
        self.shaping.rest_ip(rest)
        self._to_ip_workers(ip, wire.encoder.encode(rest))

    def lift_ip(self, ip: str, key: str) -> None:
        """End the rest of ``ip`` under ``key`` early (its blocklist delisted it): its
        workers send from it again at once, and mail they handed back for it may go
        to them again (``pool_avoid``)."""
        if not self.shaping.lift_ip(ip, key):
            return
        mine = [s.index for s in self.slots if ip in s.ips or not s.ips]
        for held in self.pool_avoid.values():
            for w in mine:
                held.pop(w, None)
        self._to_ip_workers(ip, wire.encoder.encode(wire.IPLift(ip, key)))

    def _to_ip_workers(self, ip: str, rec: bytes) -> None:
        for slot in self.slots:
            if slot.alive and slot.inbox is not None and (ip in slot.ips or not slot.ips):
                slot.backlog.append(rec)
                self.push_backlog(slot)

    def set_warmup_offsets(self, offsets: dict[str, int]) -> None:
        """Warm-up day offsets per IP for every worker (and any started later)."""
        self.shaping.warmup_offsets = dict(offsets)
        rec = wire.encoder.encode(wire.WarmupAdjust(dict(offsets)))
        for slot in self.slots:
            if slot.alive and slot.inbox is not None:
                slot.backlog.append(rec)
                self.push_backlog(slot)

    def new_write_log(self) -> WriteLog:
        """A worker's write log: a file of the spool's write log directory (a
        kill -9 of this process and its workers leaves it to the next start's
        recovery), or memory when the spool keeps none or it cannot be made
        (then the logs' ``run`` note goes: the next start trusts none)."""
        where = self.write_logs
        if where is not None:
            self.write_logs_made += 1
            try:
                if self.write_logs_made == 1:  # (after recover read the last run's)
                    reset_write_logs(where)
                return WriteLog(path=os.path.join(where, f"{self.write_logs_made}.log"))
            except OSError as e:
                print(f"fastsend: warning: a worker's write log cannot be kept in {where}"
                      f" ({e}): a kill -9 now counts all in flight unknown", file=sys.stderr)  # fmt: skip
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(where, WRITE_LOG_RUN))
                self.write_logs = None
        return WriteLog()

    def spawn(self, slot: WorkerSlot, olds: Sequence[WorkerSlot] = ()) -> None:
        """Start slot ``slot``'s worker. ``olds``: the workers a reload retired
        for it (and its sister slots): where they left their lanes and provider
        queues (:meth:`bequest`), even those already exited and reaped."""
        from fastsend.delivery.worker import prepare, run_worker

        prepare(self.config)  # imports and keys the workers share (done once, cached)
        slot.inbox, slot.outbox = Ring(RING_BYTES), Ring(RING_BYTES)
        slot.writes, slot.handed = self.new_write_log(), deque()
        # An empty get() arms the consumer's waiting flag, so the worker's first
        # put signals our eventfd (the ring signals only a consumer that waits).
        slot.outbox.get()
        slot.campaigns.clear()
        slot.backlog.clear()
        slot.drain_sent = False
        slot.backlog.extend(self.shaping.spawn_records())
        lent = slot.told_conns = self.lent(slot.index)
        if lent:  # before any batch: what the workers it replaces hold (a reload)
            slot.backlog.append(wire.encoder.encode(wire.Conns(lent)))
        bequest = self.bequest(slot.index, olds)
        if bequest is not None:  # and where they left each lane: its buckets, an AIMD cut
            slot.backlog.append(wire.encoder.encode(bequest))
        parent = os.getpid()  # the child dies with us (PR_SET_PDEATHSIG), checked from here
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                code = run_worker(
                    slot.index, self.config, slot.ips, slot.inbox, slot.outbox, parent,
                    slot.writes,
                )
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        slot.pid = pid
        slot.alive = True
        slot.last_seen = time.monotonic()
        loop = asyncio.get_running_loop()
        outbox = slot.outbox
        loop.add_reader(outbox.reader_fd, self.on_outbox, slot, outbox)
        self.push_backlog(slot)  # (left waiting, the slot would take no mail: can_take)

    def reap(self) -> None:
        if self.retired:
            self.reap_retired()
        for slot in self.slots:
            if not slot.alive:
                continue
            try:
                pid, status = wait(slot, os.WNOHANG)
            except ChildProcessError:
                pid, status = slot.pid, 0
            if pid == 0:
                if time.monotonic() - slot.last_seen > WORKER_SILENCE:
                    # Hung (its loop blocked, or stopped): its window would stay in
                    # flight forever. Kill it; the next reap restarts it.
                    print(
                        f"fastsend: worker {slot.index} (pid {slot.pid}) silent for"
                        f" {WORKER_SILENCE:g} s; killing it",
                        file=sys.stderr,
                    )
                    slot.last_seen = time.monotonic()
                    try:
                        os.kill(slot.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                continue
            slot.alive = False
            code = os.waitstatus_to_exitcode(status)
            why = ""
            if not slot.retiring and not self.stopping and not (self.draining and code == 0):
                now = time.monotonic()
                slot.crashes = [t for t in slot.crashes if now - t < CRASH_LOOP[1]] + [now]
                if len(slot.crashes) >= CRASH_LOOP[0]:
                    # Its window may hold a message that kills it: counting the
                    # attempt (backoff, then expiry) ends the loop, and with it
                    # the duplicates each release would send again.
                    why = (
                        f"local error: worker {slot.index} exited {len(slot.crashes)} times"
                        f" in {CRASH_LOOP[1]:g} s (last status {code})"
                    )
            unknown = ""
            if not why and not self.stopping and code != 0:
                # Killed or crashed holding its window (also one stopped or dead
                # in a reload's drain): what it had begun to send may have
                # reached the receiver, and is sent again.
                unknown = (
                    f"local error: worker {slot.index} exited with status {code} while"
                    " this message was in its window: outcome unknown, sent again"
                )
            self.retire(slot, why, unknown)
            fold(slot.counters_done, slot.counters)  # (its last wire.Stats read by retire)
            slot.counters, slot.counters_pid = {}, 0
            if not (self.draining and code == 0) and not self.stopping:
                print(
                    f"fastsend: worker {slot.index} (pid {slot.pid}) exited with status {code};"
                    " restarting it",
                    file=sys.stderr,
                )
                slot.restarts += 1
                self.stats.worker_restarts += 1
                self.spawn(slot)

    def retire(self, slot: WorkerSlot, defer: str = "", unknown: str = "") -> None:
        """A worker is gone: take its last outcomes, requeue the rest of its window
        (or, given a reason ``defer``, answer it as a deferred attempt). Given
        ``unknown`` (it died abnormally), what had been handed to it counts as an
        attempt whose outcome is unknown: an attempt in the spool, a deferred
        event, and due again at once (``unknown_outcomes``); what never reached
        it (rate-held, still in the backlog) goes back unattempted."""
        loop = asyncio.get_running_loop()
        if slot.outbox is not None:
            loop.remove_reader(slot.outbox.reader_fd)
            self.drain_outbox(slot, slot.outbox)
        if slot.inflight and (slot.answered or slot.answered_before):
            # Delivered in a group it had not finished (wire.Answered): the
            # receiver's 250 was read, so not an attempt of unknown outcome.
            known = answered_in_window(slot)
            if known:
                self.apply(slot, known)
        if slot.inflight:
            ids = list(slot.inflight)
            self.stats.duplicates_possible += len(ids)
            if defer:
                self.apply(
                    slot, [wire.Res(i, wire.K_DEFERRED, 451, "4.3.0", defer, "", "") for i in ids]
                )
            elif unknown:
                self.unknown_outcomes(slot, ids, unknown)
            # In an outage of a shared spool the outcomes wait, and the window
            # goes back once it answers (Supervisor.outage_wait: release_strays).
            self.guard(self.flush_results)
            self.guard(self.spool.release, ids)
            slot.inflight.clear()
        slot.held.clear()
        if slot.inbox is not None:
            # A backlog may be waiting for inbox space: the fd is about to close
            # and its number to be reused by the next rings, so unregister it.
            loop.remove_reader(slot.inbox.writer_fd)
        for ring in (slot.inbox, slot.outbox):
            if ring is not None:
                ring.close()
        slot.inbox = slot.outbox = None
        if slot.writes is not None:
            slot.writes.close()
        slot.writes, slot.handed = None, deque()

    async def reload(self, config: Config) -> None:
        """Swap in a new config (routes, shaping, ...) and replace the workers
        without a gap in delivery, as Postfix's and PowerMTA's reloads do: each
        worker is told to retire (wire.Retire: it hands back, unattempted and due
        now, what no connection has taken, and finishes the transactions on the
        wire), and the moment it has said which connections it still holds
        (wire.Conns) a new worker on the new config takes its slot, its ready
        mail and new claims, opening per (source IP, site) only what the limit
        leaves beside those. The old one's outcomes apply as any; it exits when
        its connections are done, or is stopped after ``[delivery]
        drain_limit`` (what it was still handed past its end of data one attempt
        of unknown outcome). Before, the slot took no mail until the old worker
        had finished: a receiver that never answered held a one-worker node's
        delivery for drain_limit. The worker count and the spool do not change
        here (they need a restart)."""
        config.workers = self.config.workers
        if not config.secret:  # as in __init__: Message-ID/VERP tokens must still verify
            config.secret = msgid.load_secret(config)
        config.msgid_tag = config.msgid_tag or self.config.msgid_tag
        # What spawn prepares for the new config (the EHLO names' DNS checks, up to
        # ehlo.BUDGET_S at a slow server; its DKIM keys read), in a thread: on the
        # loop it held every listener, API request and dispatch (a serve's reload).
        from fastsend.delivery.worker import prepare

        await asyncio.to_thread(prepare, config)
        self.config = config
        self.spool.set_tenant_weights(config.tenant_weights)  # the tenants' claim shares
        self.shaping.reconfigure(config)  # dispatch rates, guardrails, pools
        olds: list[WorkerSlot] = []
        for slot in self.slots:
            if self.draining or self.stopping:
                return
            if slot.alive and slot.inbox is not None:
                olds.append(self.detach(slot))
            # A slot respawned by reap() meanwhile gets them too.
            slot.ips = config.ips_for_worker(slot.index)
            slot.window = config.window_for(slot.index)  # claims from here on
        # Their answers come within a loop turn: every one is in before a new
        # worker starts, so each starts knowing the connections and lanes of its
        # addresses wherever they were (an address added to [ips] moves others
        # between workers: the round-robin split; before, each new worker knew
        # only its own slot's predecessor). A worker whose loop does not answer
        # (stuck) keeps its slot until it exits or is stopped, as before.
        limit = time.monotonic() + RETIRE_ANSWER
        waiting = list(olds)
        while waiting and not (self.draining or self.stopping):
            waiting = [o for o in waiting if o.conns is None and o.alive]
            if not waiting or time.monotonic() >= limit:
                break
            await asyncio.sleep(0.01)
        for old in olds:
            if self.draining or self.stopping:
                return
            if old in waiting:
                continue
            self.spawn(self.slots[old.index], olds)
        for old in waiting:
            print(
                f"fastsend: worker {old.index} (pid {old.pid}) did not answer the reload"
                f" within {RETIRE_ANSWER:g} s: its slot waits for it to end",
                file=sys.stderr,
                flush=True,
            )
        for old in waiting:
            while old.alive and not (self.draining or self.stopping):
                await asyncio.sleep(0.02)
            if self.draining or self.stopping:
                return
            self.spawn(self.slots[old.index], olds)

    async def retirements(self) -> None:
        """Until the workers a reload replaced have exited (or a stop began)."""
        while any(s.alive for s in self.retired) and not self.stopping:
            await asyncio.sleep(0.05)

    def detach(self, slot: WorkerSlot) -> WorkerSlot:
        """Move ``slot``'s running worker (its process, rings, window) to a
        retiring slot in :attr:`retired` and tell it wire.Retire; ``slot`` is
        left empty for the worker that replaces it. Its rate-held mail, which
        it was never sent, goes back to the queue for the new one."""
        loop = asyncio.get_running_loop()
        old = WorkerSlot(
            slot.index,
            list(slot.ips),
            pid=slot.pid,
            inbox=slot.inbox,
            outbox=slot.outbox,
            inflight=slot.inflight,
            campaigns=slot.campaigns,
            backlog=slot.backlog,
            alive=True,
            counters=slot.counters,
            counters_pid=slot.counters_pid,
            retiring=True,
            last_seen=slot.last_seen,
            drain_sent=True,
            unwritten=slot.unwritten,
            window=slot.window,
            withdrawn=slot.withdrawn,
            answered=slot.answered,
            answered_before=slot.answered_before,
            answered_n=slot.answered_n,
            stop_at=time.monotonic() + self.config.delivery.drain_limit,
            writes=slot.writes,
            handed=slot.handed,
        )
        held = [c.id for items in slot.held.values() for c in items]
        for i in held:
            old.inflight.pop(i, None)
        assert old.outbox is not None and old.inbox is not None
        loop.remove_reader(old.outbox.reader_fd)
        loop.add_reader(old.outbox.reader_fd, self.on_outbox, old, old.outbox)
        if loop.remove_reader(old.inbox.writer_fd):  # its backlog waits for ring space
            loop.add_reader(old.inbox.writer_fd, self.on_inbox_space, old, old.inbox)
        slot.pid, slot.inbox, slot.outbox, slot.alive = 0, None, None, False
        slot.counters, slot.counters_pid = {}, 0  # (the old one's go on in ``old``)
        slot.inflight, slot.campaigns, slot.backlog = {}, set(), []
        slot.held, slot.unwritten, slot.withdrawn = {}, 0, set()
        slot.answered, slot.answered_before, slot.answered_n = [], [], 0
        slot.writes, slot.handed = None, deque()
        slot.drain_sent = False
        self.retired.append(old)
        if held:
            self.guard(self.spool.release, held)
        old.backlog.append(wire.encoder.encode(wire.Retire()))
        self.push_backlog(old)
        return old

    def _owners(self) -> dict[str, list[int]]:
        """Source address -> the slots sending from it now (for :meth:`_takes_over`,
        made once per pass: not once per connection and slot)."""
        owners: dict[str, list[int]] = {}
        for s in self.slots:
            for ip in s.ips:
                owners.setdefault(ip, []).append(s.index)
        return owners

    def _takes_over(
        self, index: int, old: WorkerSlot, ip: str, owners: dict[str, list[int]]
    ) -> bool:
        """Whether slot ``index``'s new worker takes over what retiring worker
        ``old`` held from source address ``ip``: the address is the new
        worker's alone now (wherever it was before: a reload may move an
        address to another worker), or it is shared (fewer addresses than
        workers, or the host's: "") and ``old`` had this slot (each sharer
        keeps its own part of the address's limits)."""
        if not ip:
            return old.index == index
        mine = owners.get(ip, ())
        if len(mine) == 1 and mine[0] == index:
            return True
        return index in mine and (old.index == index or old.index not in mine)

    def lent(
        self, index: int, owners: dict[str, list[int]] | None = None
    ) -> list[tuple[str, str, int]]:
        """The connections the retiring workers hold that slot ``index``'s new
        worker takes over (:meth:`_takes_over`), summed per (source IP, site)."""
        owners = self._owners() if owners is None else owners
        total: dict[tuple[str, str], int] = {}
        for old in self.retired:
            if old.alive:
                for ip, site, n in old.conns or ():
                    if self._takes_over(index, old, ip, owners):
                        total[(ip, site)] = total.get((ip, site), 0) + n
        return [(ip, site, n) for (ip, site), n in sorted(total.items())]

    def bequest(self, index: int, olds: Sequence[WorkerSlot] = ()) -> wire.Lanes | None:
        """What the retiring workers left (wire.Lanes) that slot ``index``'s new
        worker takes over: the lanes of its addresses (:meth:`_takes_over`), the
        latest one's where two reloads' workers both had a lane, and its slot's
        provider queues (a Retry-After pause). ``olds``: the workers the reload
        starting it retired, counted even once reaped: an idle worker answers
        wire.Retire and exits at once, and the reap every 0.1 s could take it
        out of :attr:`retired` before the reload's next look (a loaded host):
        its new worker then started with fresh provider queues and sent into a
        provider's 429 pause (seen in CI: test_serve_reload)."""
        held = {id(o) for o in self.retired}
        sources = [*self.retired, *(o for o in olds if id(o) not in held)]
        out: dict[tuple[str, str], wire.LaneState] = {}
        providers: dict[str, tuple[float, float, int, float]] = {}
        caps: dict[tuple[str, str], tuple[str, str, int, float]] = {}
        marks: dict[tuple[str, str], wire.SiteMarks] = {}
        owners = self._owners()
        for old in sources:
            out.update(((st.ip, st.site), st) for st in old.lanes
                       if self._takes_over(index, old, st.ip, owners))  # fmt: skip
            if old.index == index:
                providers.update(old.providers)
                caps.update(((c[0], c[1]), c) for c in old.sites)  # (its site caps)
                marks.update(((m.pool, m.key), m) for m in old.marks)
        if not out and not providers and not caps and not marks:
            return None
        return wire.Lanes(list(out.values()), providers, list(caps.values()),
                          list(marks.values()))  # fmt: skip

    def worker_counters(self, index: int, gauges: Collection[str] = ()) -> dict[str, float]:
        """Slot ``index``'s counters (wire.Stats) over every worker it ran: what
        its exited workers counted (``counters_done``), its worker's and those
        of its workers a reload is retiring, so a total never goes backwards
        and includes the old worker's work during and after a reload's overlap
        (before, /metrics showed only the slot's current worker: what the old
        one sent after the last scrape, and during the overlap, was lost).
        ``gauges``: names that are figures of the moment, summed over the
        running workers only."""
        out = {k: v for k, v in self.slots[index].counters_done.items() if k not in gauges}
        for s in (self.slots[index], *(o for o in self.retired if o.index == index)):
            fold(out, s.counters)
        return out

    def lend(self) -> None:
        """Tell each worker what the retiring workers hold now on its addresses
        (when it changed)."""
        owners = self._owners()
        for slot in self.slots:
            if slot.alive and slot.inbox is not None:
                held = self.lent(slot.index, owners)
                if held != slot.told_conns:
                    slot.told_conns = held
                    slot.backlog.append(wire.encoder.encode(wire.Conns(held)))
                    self.push_backlog(slot)

    def on_lanes(self, slot: WorkerSlot, msg: wire.Lanes) -> None:
        """wire.Lanes from a retiring worker: with its answer to wire.Retire (kept
        for the workers that take over, :meth:`inherited`), or later, the lanes
        its last replies slowed down: told at once to the new workers sending
        from those addresses."""
        if slot.conns is None:
            slot.lanes, slot.providers = list(msg.lanes), dict(msg.providers)
            slot.sites = list(msg.sites)
            slot.marks = list(msg.marks)
            return
        now = {(st.ip, st.site): st for st in slot.lanes}
        now.update(((st.ip, st.site), st) for st in msg.lanes)
        slot.lanes = list(now.values())
        slot.providers.update(msg.providers)
        if msg.sites:  # (a site's cap it learned since: for a worker started later too)
            caps = {(c[0], c[1]): c for c in slot.sites}
            caps.update(((c[0], c[1]), c) for c in msg.sites)
            slot.sites = list(caps.values())
        if msg.marks:
            was = {(m.pool, m.key): m for m in slot.marks}
            was.update(((m.pool, m.key), m) for m in msg.marks)
            slot.marks = list(was.values())
        owners = self._owners()
        for new in self.slots:
            if new.alive and new.inbox is not None:
                mine = [st for st in msg.lanes
                        if self._takes_over(new.index, slot, st.ip, owners)]  # fmt: skip
                providers, sites, marks = (
                    (msg.providers, msg.sites, msg.marks) if new.index == slot.index
                    else ({}, [], []))  # fmt: skip
                if mine or providers or sites or marks:
                    new.backlog.append(
                        wire.encoder.encode(wire.Lanes(mine, providers, sites, marks))
                    )
                    self.push_backlog(new)

    def on_conns(self, slot: WorkerSlot, msg: wire.Conns) -> None:
        """wire.Conns from a retiring worker: its connections, for its slot's new worker."""
        if slot.retiring:
            slot.conns = msg.held
            if self.shaping.rests_to_share:  # a rest it met first: before a lane frees
                self.share_rests()
            self.lend()

    def reap_retired(self) -> None:
        """The retiring workers: an exit ends one (what it still held goes back,
        as any worker's), one past ``[delivery] drain_limit`` is stopped now."""
        now = time.monotonic()
        for old in list(self.retired):
            try:
                pid, status = wait(old, os.WNOHANG)
            except ChildProcessError:
                pid, status = old.pid, 0
            if pid == 0:
                if old.stop_at and now >= old.stop_at:
                    print(
                        f"fastsend: worker {old.index} (pid {old.pid}) still finishing its"
                        f" window {self.config.delivery.drain_limit:g} s into the reload:"
                        f" stopping it now; {len(old.inflight)} message(s) on connections"
                        " that did not finish go back to the queue",
                        file=sys.stderr,
                        flush=True,
                    )
                    old.stop_at = 0.0
                    old.last_seen = now  # from here, WORKER_SILENCE to exit, else SIGKILL
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(old.pid, wire.STOP_NOW)
                elif now - old.last_seen > WORKER_SILENCE:
                    old.last_seen = now
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(old.pid, signal.SIGKILL)
                continue
            old.alive = False
            code = os.waitstatus_to_exitcode(status)
            unknown = ""
            if code != 0 and not self.stopping:
                unknown = (
                    f"local error: worker {old.index} exited with status {code} while"
                    " this message was in its window: outcome unknown, sent again"
                )
            self.retire(old, "", unknown)
            self.retired.remove(old)
            self.slots[old.index].cpu_s += old.cpu_s
            fold(self.slots[old.index].counters_done, old.counters)
            self.lend()

    def drain_workers(self) -> None:
        """SIGTERM: tell each worker at once, so it hands back the mail of sites
        that cannot finish soon instead of the drain waiting for them."""
        for slot in self.slots:
            if slot.alive and slot.inbox is not None and not slot.drain_sent:
                slot.drain_sent = True
                slot.backlog.append(wire.encoder.encode(wire.Drain()))
                self.push_backlog(slot)

    def push_backlog(self, slot: WorkerSlot) -> None:
        ring = slot.inbox
        if ring is None:
            return
        while slot.backlog:
            if not ring.put(slot.backlog[0]):
                loop = asyncio.get_running_loop()
                loop.add_reader(ring.writer_fd, self.on_inbox_space, slot, ring)
                return
            slot.backlog.pop(0)

    def on_inbox_space(self, slot: WorkerSlot, ring: Ring) -> None:
        asyncio.get_running_loop().remove_reader(ring.writer_fd)
        ring.clear_writer()
        if slot.inbox is ring:
            self.push_backlog(slot)

    async def shutdown(self) -> None:
        """Stop the workers: Drain and wait (normal end), or terminate (stop now)."""
        for slot in self.slots:
            if slot.alive and slot.inbox is not None and not self.stopping and not slot.drain_sent:
                slot.drain_sent = True
                slot.backlog.append(wire.encoder.encode(wire.Drain()))
                self.push_backlog(slot)
        deadline = time.monotonic() + (2.0 if self.stopping else 60.0)
        exited = asyncio.Event()
        pidfds = watch_exits([s.pid for s in (*self.slots, *self.retired) if s.alive], exited.set)
        try:
            while (
                any(s.alive for s in (*self.slots, *self.retired))
                and time.monotonic() < deadline
            ):
                if self.stopping:
                    self.signal_workers(wire.STOP_NOW)
                # Woken the moment a worker exits (its pidfd), else every 20 ms.
                try:
                    await asyncio.wait_for(exited.wait(), 0.02)
                except TimeoutError:
                    pass
                exited.clear()
                self.draining = True
                if not self.outage_since:  # a spool out of reach: no call blocks the stop
                    self.guard(self.spool.renew)
                self.reap_final()
        finally:
            unwatch(pidfds)
        self.signal_workers(signal.SIGKILL)
        for s in (*self.slots, *self.retired):
            if s.alive:
                _pid, status = wait(s, 0)
                s.alive = False
                self.retire(s, unknown=self.stopped_text(s, status))
        self.retired.clear()
        if not self.outage_since:
            self.guard(self.tell_taken_back)
            self.guard(self.flush_results)

    def stopped_text(self, slot: WorkerSlot, status: int) -> str:
        """The reason recorded for a worker's window when the worker ended
        with ``status`` during the stop: a worker stopped now (our
        ``wire.STOP_NOW``, after it gave back what it never sent, or SIGKILL)
        or dead in the drain may have had messages past DATA whose reply never
        came, so what it was still handed counts one attempt of unknown
        outcome (``retire``'s ``unknown``), as a killed worker's window does
        while running; "" when it exited by itself (its window finished). Not
        while the spool is out of reach: what the node holds then stays
        claimed, and the next start (or another node, the lease lapsed)
        counts it (``Spool.recover``)."""
        code = os.waitstatus_to_exitcode(status)
        if code == 0 or self.outage_since:
            return ""
        why = "stopped now" if self.stopping else f"exited with status {code}"
        return (
            f"local error: worker {slot.index} {why} while this message was in its window:"
            " outcome unknown, sent again"
        )

    def signal_workers(self, sig: int) -> None:
        for s in (*self.slots, *self.retired):
            if s.alive:
                try:
                    os.kill(s.pid, sig)
                except ProcessLookupError:
                    pass

    def reap_final(self) -> None:
        for slot in (*self.slots, *self.retired):
            if not slot.alive:
                continue
            try:
                pid, status = wait(slot, os.WNOHANG)
            except ChildProcessError:
                pid, status = slot.pid, 0
            if pid:
                slot.alive = False
                self.retire(slot, unknown=self.stopped_text(slot, status))
            elif slot.outbox is not None:
                self.drain_outbox(slot, slot.outbox)
        if not self.outage_since:
            self.guard(self.flush_results)
