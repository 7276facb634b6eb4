"""``Idempotency-Key``: a request that accepts mail, retried, is not accepted twice.

Every route that accepts mail (``POST /v1/messages``, one message or a batch;
``POST /v1/campaigns``; ``POST /v1/campaigns/{id}/recipients``, JSON, CSV or
JSON lines) takes an optional ``Idempotency-Key`` header (1-255 visible ASCII
characters). With it:

- the first request reserves the key in the spool (:meth:`Spool.idem_begin`:
  SQLite or Redis, so every node of a shared spool sees it), scoped to the
  key's tenant: one tenant's key never matches another tenant's;
- every spool write of the request is recorded under the key **in the same
  transaction** (SQLite) or MULTI/EXEC (Redis) as its rows
  (:class:`~fastsend.spool.IdemMark`: a "part", the ids its rows got); a new
  campaign carries the key's token in its options and an uploaded list's
  ingest job in its source, written with them. So whatever the moment a serve
  dies, the spool knows what the request accepted;
- when it accepts (a 2xx answer), its status and body are stored with the key,
  durably, before the answer is sent; an answer that accepted nothing (a 4xx)
  frees the key, so a corrected request may use it again; a failure (5xx,
  an exception) after some parts were spooled, or after it created its
  campaign or list job, releases the key with what it wrote;
- a retry with the same key and the same request (method, path and query,
  content type, body: a SHA-256 fingerprint) gets the stored answer again
  with ``Idempotent-Replayed: true``, and nothing is accepted again;
- a retry of a request whose attempt died or failed (the key released, or its
  holder dead) takes the key over and runs the request again, **continuing**
  it: each part an earlier attempt spooled is answered from the record (the
  same ids, nothing spooled again), the campaign it created and the list job
  it started are reused, and only what is missing is spooled; the answer is
  the one the first attempt would have given, with ``Idempotent-Resumed: N``
  (rows the earlier attempts had spooled, not spooled again);
- the same key with another request: 422; while the first is still running:
  409 with ``Retry-After`` (the request is running on this or another node);
- the holder of a running request renews a lease on its key every third of
  ``[api] idempotency_lease_s`` (30 s) while it works. A holder on this host
  is judged by its pid (dead: taken over at once; alive: never, however slow);
  one on another host is dead once its lease lapsed. A holder that was judged
  dead after all (a stall longer than its lease) cannot spool more: its next
  part is refused (:class:`~fastsend.spool.IdemLost`, answered 409), so two
  attempts never spool the same part. Keys are kept ``[api]
  idempotency_ttl_s`` (24 h) from their first request, then swept.

Events: each part's "accepted" / "suppressed" events are emitted and indexed
right after its commit; a part answered from the record whose events the
index lacks (the attempt died between the commit and them) has them emitted
by the retry, with ``"resumed": true``: at least once, never missing.

``FASTSEND_TEST_FAULT`` (tests only; inert when unset): ``idem-kill-after-part:N``
(kill -9 once part N is committed and told), ``idem-kill-after-commit:N`` (once
it is committed, before its events), ``idem-fail-after-part:N`` (an exception
there: a 500), ``idem-fail-after-campaign`` / ``idem-fail-after-job`` (an
exception once a new campaign / an upload's list job is written),
``idem-kill-before-answer`` (kill -9 after the handler, before its answer is
stored), ``idem-slow-before-answer:S`` (wait S seconds there),
``idem-stop-after-note`` (SIGSTOP once a new campaign's note is written: the test
changes the world, then SIGCONT), ``held-stop-after-read`` / ``held-stop-after-take``
(SIGSTOP once a dead node's notes are read / taken by this node).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import orjson
from aiohttp import web

from fastsend import durable
from fastsend.serve.api import (
    OFF_LOOP_BYTES,
    ApiError,
    Handler,
    api_of,
    bad,
    error_response,
    read_body,
    tenant_of,
)
from fastsend.serve.context import ServeContext
from fastsend.serve.uploads import UPLOAD, Uploads
from fastsend.spool import (
    ABANDONED,
    IDEM_RELEASED,
    STAGING,
    IdemLost,
    IdemMark,
    IdemRecord,
    IngestJob,
    Spool,
)
from fastsend.spool.base import holder_gone, holder_tag, same_pid_space

log = logging.getLogger("fastsend.serve")

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
RESUMED = "Idempotent-Resumed"
MAX_KEY = 255
KEY_RE = re.compile(f"[!-~]{{1,{MAX_KEY}}}")
TOKEN_OPTION = "idempotency"  # a campaign's option / an ingest job's source field

Digest = Callable[[web.Request], Awaitable[str]]

_FAULT = os.environ.get("FASTSEND_TEST_FAULT", "")


def fault(point: str, n: int = 0) -> float:
    """Tests only (``FASTSEND_TEST_FAULT``, see the module docstring); returns
    seconds to wait for a slow fault, else 0."""
    if not _FAULT:
        return 0.0
    name, _, arg = _FAULT.partition(":")
    if name == f"idem-kill-{point}" and (not arg or int(arg) == n):
        os.kill(os.getpid(), signal.SIGKILL)
    if name == f"idem-fail-{point}" and (not arg or int(arg) == n):
        raise RuntimeError(f"test fault {_FAULT}")
    if name == f"idem-stop-{point}" and (not arg or int(arg) == n):
        os.kill(os.getpid(), signal.SIGSTOP)  # (frozen until the test's SIGCONT)
    if name == f"idem-slow-{point}":
        return float(arg)
    return 0.0


async def json_digest(request: web.Request) -> str:
    """SHA-256 of the request's body (read once: the handler reads it again from aiohttp)."""
    return hashlib.sha256(await read_body(request)).hexdigest()


def _abandoned(rec: IdemRecord) -> bool:
    """A running record whose request will not answer: released after a
    failure, or its holder dead (this host: its pid; another: its lease)."""
    if rec.holder == IDEM_RELEASED:
        return True
    try:
        tag = orjson.loads(rec.holder)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(tag, dict):
        return True
    if same_pid_space(tag):
        return holder_gone(tag)  # a live process here is never taken over
    return rec.lease_left <= 0


class IdemRun:
    """One attempt of a request under an Idempotency-Key: holds the key, and
    spools each part with its mark, or answers it from the record when an
    earlier attempt spooled it (``done``)."""

    def __init__(
        self, spool: Spool, scope: str, key: str, holder: bytes, created: float,
        done: list[tuple[int, list[int]]], index: Any = None,
    ) -> None:  # fmt: skip
        self.spool = spool
        self.index = index  # the event index (EventIndex / RedisEventIndex), if any
        self.scope = scope
        self.key = key
        self.holder = holder
        self.done = done
        self.resumed = bool(done)  # set too when a campaign or job is found again
        self.skipped = 0  # rows earlier attempts spooled, answered from the record
        self.next = 0
        # What a campaign or ingest job created by this request carries, the same
        # for every attempt (the record's creation time is kept by a takeover).
        self.token = hashlib.sha256(f"{scope}\0{key}\0{created!r}".encode()).hexdigest()[:32]
        self.taken_over = False
        self.wrote = False  # created a campaign or list job: a failure keeps the key
        self.void: set[int] = set()  # abandoned campaigns of earlier attempts

    def tags(self) -> dict[str, str]:
        """What a campaign (options) or list job (source) this request creates
        carries, written with it, so that a retry finds it again."""
        self.wrote = True
        return {TOKEN_OPTION: self.token}

    def accept(self, ctx: ServeContext, campaign_id: int, rows: list[tuple[str, str, bytes]],
               held: Held | None = None, dedup: bool = False) -> list[int]:  # fmt: skip
        """:meth:`ServeContext.inject` as one part of the request (its events
        kept in ``held`` while its campaign is staging). ``dedup``: rows whose
        address the campaign has are left out, so a part may hold fewer ids
        than rows."""
        if not rows:
            return []
        n = self.next
        self.next += 1
        live = self.live
        if n < len(live):
            _cid, ids = live[n]
            if len(ids) > len(rows) or (len(ids) < len(rows) and not dedup):
                raise ApiError(
                    409, f"{HEADER}: an earlier attempt of this request spooled its part {n}"
                    f" with {len(ids)} rows, this one has {len(rows)}; use a new key", HEADER,
                )  # fmt: skip
            self.skipped += len(ids)
            if held is not None:
                held.earlier.append((_cid, ids))
            else:
                self._events_of(ctx, _cid, ids)
            return ids
        # The record's parts, the void ones included, number the next.
        part = len(self.done) + n - len(live)
        mark = IdemMark(self.scope, self.key, self.holder, part)
        def hook(_ids: list[int]) -> None:
            fault("after-commit", part)

        ids = ctx.acceptor.accept(
            campaign_id, rows, idem=mark, committed=hook if _FAULT else None,
            held=held.rows if held is not None else None, dedup=dedup,
        )  # fmt: skip
        if self.index is not None:
            self.index.flush()  # the part's events indexed now: what a retry checks
        fault("after-part", part)
        return ids

    def _events_of(self, ctx: ServeContext, campaign_id: int, ids: list[int]) -> None:
        """The "accepted" / "suppressed" events of a part an earlier attempt
        committed and died before emitting (the index lacks them), emitted now
        with ``"resumed": true``. Events are at least once: an attempt killed
        between writing the log line and indexing it has its lines twice."""
        if self.index is None or not ids:
            return
        ctx.acceptor.retell(campaign_id, ids, f"{HEADER}: an earlier attempt", self.index)

    @property
    def live(self) -> list[tuple[int, list[int]]]:
        """The recorded parts a retry answers from: not those of a campaign that
        was abandoned meanwhile (their rows were cancelled: spooled again)."""
        if not self.void:
            return self.done
        return [p for p in self.done if p[0] not in self.void]

    def spooled(self, campaign_id: int) -> int:
        """Rows of ``campaign_id`` earlier attempts of this request spooled."""
        return sum(len(ids) for cid, ids in self.done if cid == campaign_id)

    def campaign(self, spool: Spool, tenant: str) -> int | None:
        """The campaign an earlier attempt of this request created, if any."""
        if not self.taken_over:
            return None
        for info in spool.campaigns(tenant):
            if info.options.get(TOKEN_OPTION) == self.token:
                if info.status == ABANDONED:  # given up on (serve's sweep): made anew
                    self.void.add(info.id)
                    continue
                self.resumed = True
                return info.id
        return None

    def ingest_job(self, spool: Spool) -> IngestJob | None:
        """The list job an earlier attempt of this request started, if any."""
        if not self.taken_over:
            return None
        for job in spool.list_ingests():
            if job.source.get(TOKEN_OPTION) == self.token:
                self.resumed = True
                return job
        return None


RUN: web.RequestKey[IdemRun] = web.RequestKey("fastsend_idem_run", IdemRun)


def run_of(request: web.Request) -> IdemRun | None:
    """The request's attempt under an Idempotency-Key, or None (no key)."""
    return request.get(RUN)


async def accept_rows(request: web.Request, campaign_id: int,
                      rows: list[tuple[str, str, bytes]], dedup: bool = False) -> list[int]:  # fmt: skip
    """Spool rows for a route that accepts mail: ``ctx.inject``, recorded under the
    request's Idempotency-Key when it has one (see :class:`IdemRun`). ``dedup``:
    rows whose address the campaign has are left out (``Acceptor.accept``).
    Without a key, large bodies are stored as blobs in a thread first
    (``Acceptor.stow``), and on a shared spool the rows are spooled in a thread
    too (on the loop, a slow Redis held every listener for each of the spool's
    calls), their events emitted on the loop (the event log's listeners are the
    loop's)."""
    ctx = api_of(request).ctx
    run = run_of(request)
    held = request.get(HELD)
    if run is not None:
        return run.accept(ctx, campaign_id, rows, held, dedup=dedup)
    acceptor = ctx.acceptor
    stowed = None
    if not dedup and sum(len(r[2]) for r in rows) > OFF_LOOP_BYTES:
        stowed = await asyncio.to_thread(acceptor.stow, rows)
    try:
        return await ctx.inject_off(campaign_id, rows, dedup=dedup, stowed=stowed,
                                    held=held.rows if held is not None else None)  # fmt: skip
    finally:
        if stowed is not None and stowed.refs:  # (spooled: its blobs' rows recorded)
            try:
                await asyncio.to_thread(acceptor.ref_stowed, stowed)
            except Exception:  # (the sweep records them from the rows: not lost)
                log.warning("%s: a blob's rows not recorded", HEADER, exc_info=True)


class Held:
    """The "accepted" / "suppressed" events of a request's rows, held back while
    their campaign is staging (it may yet be abandoned: its rows are then never
    the tenant's, never sent) and emitted by :meth:`tell` once the campaign is
    complete. Parts an earlier attempt spooled are told then too (never before:
    they are staging rows as well)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, list[int], list[str], set[int], float]] = []
        self.earlier: list[tuple[int, list[int]]] = []

    def ids(self) -> list[tuple[int, list[int]]]:
        """(campaign, ids) of every row whose events are held."""
        return [*self.earlier, *((cid, ids) for cid, ids, _r, _g, _n in self.rows)]

    async def tell(self, ctx: ServeContext, index: Any) -> None:
        """Emit (and index) the held events, a part at a time, the loop free between."""
        acceptor = ctx.acceptor
        for cid, ids in self.earlier:
            acceptor.retell(cid, ids, f"{HEADER}: an earlier attempt", index)
            await asyncio.sleep(0)
        for cid, ids, rcpts, gone, now in self.rows:
            acceptor.emit_accepted(cid, ids, rcpts, gone, now)
            if index is not None:
                index.flush()
            await asyncio.sleep(0)
        self.rows, self.earlier = [], []


HELD: web.RequestKey[Held] = web.RequestKey("fastsend_held_events", Held)


def _runs(ids: list[int]) -> list[list[int]]:
    """[[first, last], ...] of sorted ``ids``: a list's rows, spooled in one go,
    are a run of consecutive ids (one pair for 300,000 rows)."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] + 1 == i:
            out[-1][1] = i
        elif not out or out[-1][1] != i:
            out.append([i, i])
    return out


class HeldJournal:
    """``<spool dir>/held.jsonl``: a new campaign complete (every row spooled, still
    staging), with the status it takes and the ids of the rows whose held events
    (:class:`Held`) are to be told, written (fsynced) before they are told and it
    leaves staging, and marked done after. It is the creation's commit point: a
    kill -9 after it, the next start (:meth:`replay`) gives the campaign its status
    and tells the rows' events the index lacks (before: a kill between the status
    change and the events lost them for good without an Idempotency-Key), unless
    the campaign was abandoned meanwhile (never the tenant's: nothing to tell).
    One process per spool dir (SQLite's supervisor lock; a Redis node's own dir).

    On a shared spool (``shared``: ``Spool.shared()``) each note is also in Redis
    (hash ``P:held``, campaign -> the note and its node), removed once told: a
    node whose process is dead (no status for ``STATUS_STALE`` s, ``NOTE_GRACE`` s
    after its note) and whose local journal is out of reach (its host lost, never
    started again) has its notes finished by one live node (:meth:`dead_notes` takes each,
    serve's tick), and the staging sweep leaves a noted campaign alone. Before, the
    note was only in the dead node's directory: the campaign stayed staging and
    every node's sweep abandoned it an hour later, its 201'd-to-be rows never sent."""

    NAME = "held.jsonl"
    NOTE_GRACE = 10.0  # s a note's node must have been silent (and the note this old)
    ADOPT_EVERY = 5.0  # s between two looks at the notes of dead nodes

    def __init__(self, spool_dir: str, shared: Any = None) -> None:
        self.path = os.path.join(spool_dir, self.NAME)
        self.shared = shared  # SharedStore or None
        self.adopted = 0.0  # monotonic time of the last adopt_dead look
        self.seq = 0
        self.noted: dict[int, dict[str, Any]] = {}  # notes not yet told, by number
        # Notes whose request could neither complete nor abandon their campaign
        # (the spool refused both): :meth:`complete` finishes them.
        self.unfinished: dict[int, dict[str, Any]] = {}

    def note(self, held: Held, campaign: int, status: str) -> int:
        """Record ``held``'s rows and ``campaign``'s coming ``status`` durably; the
        number :meth:`told` takes."""
        self.seq += 1
        parts = [[cid, _runs(ids)] for cid, ids in held.ids()]
        rec = {"n": self.seq, "campaign": campaign, "status": status, "parts": parts}
        self._append(rec, sync=True)
        if self.shared is not None:  # (a failure: the request abandons the campaign)
            sh = self.shared
            sh.client.hset(sh.key("held"), str(campaign),
                           orjson.dumps({**rec, "node": sh.node, "at": time.time()}))  # fmt: skip
        self.noted[self.seq] = rec
        return self.seq

    def told(self, n: int) -> None:
        rec = self.noted.pop(n, None)
        self.unfinished.pop(n, None)
        if rec is not None and self.shared is not None:
            try:  # (left: a live node finishes it again once this one is dead: a no-op)
                self.shared.client.hdel(self.shared.key("held"), str(rec["campaign"]))
            except Exception as e:
                log.warning("%s: the shared note of campaign %s not removed (%s)", HEADER,
                            rec["campaign"], e)  # fmt: skip
        try:
            self._append({"told": n}, sync=False)  # lost: told again, the index filters it
        except OSError as e:  # (a full disk): the campaign is complete all the same
            log.warning("%s: %s cannot be written (%s): its events may be told again at"
                        " the next start", HEADER, self.path, e)  # fmt: skip

    def finish_later(self, n: int) -> None:
        """Note ``n`` stands (the creation's commit point) though its request could
        neither complete its campaign nor abandon it: :meth:`complete` (serve's
        tick) finishes it, as the next start would."""
        rec = self.noted.get(n)
        if rec is not None:
            self.unfinished[n] = rec

    def complete(self, ctx: ServeContext, index: Any) -> list[int]:
        """Finish the notes :meth:`finish_later` left (their campaign's status, the
        events the index lacks); returns their campaigns. Raises the spool's outage
        errors (tried again at the next call)."""
        done: list[int] = []
        for n, rec in list(self.unfinished.items()):
            self._finish(ctx, index, rec)
            self.told(n)
            done.append(int(rec["campaign"]))
        return done

    def dead_notes(self, live: Callable[[], Collection[str]]) -> list[tuple[bytes, dict[str, Any]]]:
        """The shared notes (``P:held``: field, note) of nodes not ``live()`` (their
        process dead), and of this node's name (an earlier process of it: the
        caller leaves this process's own), ``NOTE_GRACE`` s old; none when looked
        at less than ``ADOPT_EVERY`` s ago, each taken by this node (the note names
        it from now on) if still as read: another node that took it meanwhile
        finishes it. Redis only: a thread may call it (serve's tick); :meth:`adopt`
        finishes them on the loop."""
        sh = self.shared
        mono = time.monotonic()
        if sh is None or mono - self.adopted < self.ADOPT_EVERY:
            return []
        self.adopted = mono
        key = sh.key("held")
        notes = sh.client.hgetall(key)
        if not notes:
            return []
        alive = set(live())
        mine = {int(r["campaign"]) for r in list(self.noted.values())}  # (this process's)
        found: list[tuple[bytes, bytes, dict[str, Any]]] = []
        for field, raw in notes.items():
            try:
                rec = orjson.loads(raw)
                cid = int(rec["campaign"])
                node, at = str(rec["node"]), float(rec["at"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                sh.client.hdel(key, field)  # (unreadable: nothing to finish by)
                continue
            if time.time() - at < self.NOTE_GRACE or (node in alive and node != sh.node):
                continue  # its node is alive: it finishes it (finish_later, a restart)
            if cid not in mine:
                found.append((field, raw, rec))
        if found and _FAULT == "held-stop-after-read":  # tests: another node meanwhile
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(0.5)  # (the stop reaches this thread a moment later: before the takes)
        # Each note taken by this node (it names this node from now on) only if it
        # is still as read: two live nodes reading one dead node's note both
        # finished it, its rows' events told twice (each node's webhooks).
        out: list[tuple[bytes, dict[str, Any]]] = []
        for field, raw, rec in found:
            taken = {**rec, "node": sh.node, "at": time.time()}
            if sh.take(key, field, raw, orjson.dumps(taken)):
                out.append((field, taken))
            else:
                log.warning("campaign %s: a dead node's note of its creation is being"
                            " finished by another node", rec["campaign"])
        if out and _FAULT == "held-stop-after-take":  # tests: this node stalls, others go on
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(0.5)
        return out

    def adopt(self, ctx: ServeContext, index: Any, notes: list[tuple[bytes, dict[str, Any]]],
              working: Collection[int]) -> list[int]:  # fmt: skip
        """Finish :meth:`dead_notes`'s notes (their campaign's status, the events
        the index lacks) but this process's own; returns their campaigns. Raises
        the spool's outage errors (the notes stay: taken again next time)."""
        sh = self.shared
        if sh is None:
            return []
        mine = {int(r["campaign"]) for r in self.noted.values()}
        key = sh.key("held")
        done: list[int] = []
        for field, rec in notes:
            cid = int(rec["campaign"])
            if cid in mine or cid in working:
                continue
            # Still this node's (fenced): a node that took the note, then stalled
            # (a pause, a swap storm, a SIGSTOP) past NOTE_GRACE while its status
            # lapsed had another node take the note and finish it; it then went on
            # and finished it too (its own "complete now", the rows' events again
            # unless the other's index had them, the note deleted under the other).
            # Taken again as read (its time renewed: the grace starts over) or left.
            fresh = {**rec, "at": time.time()}
            if not sh.take(key, field, orjson.dumps(rec), orjson.dumps(fresh)):
                log.warning("campaign %s: a dead node's note of its creation is being"
                            " finished by another node", cid)
                continue
            self._finish(ctx, index, fresh)
            sh.drop(key, field, orjson.dumps(fresh))  # (only while still ours)
            done.append(cid)
        return done

    @staticmethod
    def noted_shared(spool: Any, campaign: int) -> bool:
        """Whether ``campaign`` has a shared note (a staging sweep leaves it)."""
        sh = spool.shared() if hasattr(spool, "shared") else None
        return sh is not None and bool(sh.client.hexists(sh.key("held"), str(campaign)))

    def _append(self, rec: dict[str, Any], *, sync: bool) -> None:
        # (a new journal's name made durable too: a power loss after the fsynced
        # note of the journal's first line had lost the file, and the campaign
        # answered 201 stayed staging until the sweep abandoned it, never sent)
        fd = durable.open_append(self.path)
        try:
            end = os.fstat(fd).st_size
            try:
                os.write(fd, orjson.dumps(rec) + b"\n")
                if sync:
                    os.fsync(fd)
            except OSError:
                # Nothing of a failed note may stay: a line written but not synced
                # would still be replayed (a campaign its request gave up on made
                # active), a line cut short (a full disk) would swallow the next.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)

    @staticmethod
    def _finish(ctx: ServeContext, index: Any, rec: dict[str, Any]) -> int:
        """A note's campaign given its status if still staging, and its rows'
        events the index lacks told; the rows told."""
        made = ctx.spool.get_campaign(rec["campaign"])
        if made is not None and made.status == STAGING:  # complete: its status now
            ctx.spool.set_campaign_status(made.id, rec["status"])
        n = 0
        for cid, runs in rec["parts"]:
            info = ctx.spool.get_campaign(cid)
            if info is None or info.status in (STAGING, ABANDONED):
                continue  # never the tenant's: nothing to tell
            ids = [i for a, b in runs for i in range(a, b + 1)]
            n += ctx.acceptor.retell(cid, ids, "a campaign's creation", index)
        return n

    def replay(self, ctx: ServeContext, index: Any) -> int:
        """At start: tell what a killed process noted and did not tell (only what
        ``index`` lacks); then start the journal afresh. Returns the rows told."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0
        noted: dict[int, dict[str, Any]] = {}
        for line in lines:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:  # a line cut by the kill: never fsynced
                continue
            if isinstance(rec, dict) and "told" in rec:
                noted.pop(rec["told"], None)
            elif isinstance(rec, dict) and "n" in rec:
                noted[rec["n"]] = rec
        n = 0
        for rec in noted.values():
            n += self._finish(ctx, index, rec)
            if self.shared is not None:  # (finished: no other node need)
                self.shared.client.hdel(self.shared.key("held"), str(rec["campaign"]))
        if index is not None and n:
            index.flush()
        os.unlink(self.path)
        return n


async def _keep(spool: Spool, scope: str, key: str, holder: bytes, lease: float) -> None:
    """Renew the hold on a key while its request runs."""
    while True:
        await asyncio.sleep(lease / 3)
        try:
            if not spool.idem_renew(scope, key, holder, lease):
                log.warning("%s: lost the hold on a key (taken over or answered)", HEADER)
                return
        except Exception:  # the spool unreachable a moment: try again next time
            log.exception("%s: renewing the hold on a key failed", HEADER)


def idempotent(handler: Handler, digest: Digest = json_digest) -> Handler:
    """``handler`` (a route that accepts mail) honouring ``Idempotency-Key``
    (see the module docstring). ``digest``: the SHA-256 of the request's body."""

    async def run(request: web.Request) -> web.StreamResponse:
        key = request.headers.get(HEADER)
        if key is None:
            return await handler(request)
        if not KEY_RE.fullmatch(key):
            raise bad(f"{HEADER}: 1 to {MAX_KEY} visible ASCII characters", HEADER)
        try:
            return await _run(request, key)
        finally:
            saved = request.get(UPLOAD)
            if saved is not None and not saved.taken:  # never handed to a job
                Uploads.discard(saved.path)

    async def _run(request: web.Request, key: str) -> web.StreamResponse:
        api = api_of(request)
        spool = api.ctx.spool
        tenant = tenant_of(request)
        body = await digest(request)
        fp = hashlib.sha256(
            f"{request.method}\0{request.raw_path}\0{request.content_type}\0{body}".encode()
        ).hexdigest()
        holder = orjson.dumps({**holder_tag(), "req": secrets.token_hex(6)})
        now = time.time()
        ttl = api.settings.idempotency_ttl_s
        lease = api.settings.idempotency_lease_s
        rec = spool.idem_begin(tenant, key, fp, now, ttl, holder, lease=lease)
        if rec is not None and rec.fingerprint != fp:
            raise ApiError(
                422, f"{HEADER}: this key was used for another request (method, path or"
                " body differ); use a new key for a new request", HEADER,
            )  # fmt: skip
        if rec is not None and rec.running and _abandoned(rec):
            rec = spool.idem_begin(tenant, key, fp, now, ttl, holder, lease=lease,
                                   stale=rec.holder)  # fmt: skip
        if rec is not None and rec.holder != holder:
            if rec.running:
                return error_response(
                    ApiError(409, f"{HEADER}: a request with this key is still being processed;"
                             " retry later", HEADER),
                    {"Retry-After": "1"},
                )  # fmt: skip
            return web.Response(
                body=rec.body, status=rec.status, content_type="application/json",
                headers={REPLAYED: "true", HEADER: key},
            )  # fmt: skip
        attempt = IdemRun(spool, tenant, key, holder, now if rec is None else rec.created,
                          [] if rec is None else rec.parts, api.index)  # fmt: skip
        attempt.taken_over = rec is not None
        request[RUN] = attempt
        keeper = asyncio.get_running_loop().create_task(
            _keep(spool, tenant, key, holder, lease), name="idempotency-lease"
        )
        try:
            try:
                resp = await handler(request)
            except ApiError as e:
                resp = error_response(e)
            except IdemLost:
                return error_response(ApiError(
                    409, f"{HEADER}: another attempt of this request took it over (this one"
                    " was too slow); retry to get its answer", HEADER,
                ), {"Retry-After": "1"})  # fmt: skip
            except BaseException:
                spool.idem_drop(tenant, key, holder, keep=attempt.wrote)  # released, with parts
                raise
            if (
                200 <= resp.status < 300
                and isinstance(resp, web.Response)
                and resp.body is not None
            ):
                slow = fault("before-answer")
                if slow:
                    await asyncio.sleep(slow)
                spool.idem_finish(tenant, key, holder, resp.status, bytes(resp.body))  # type: ignore[arg-type]
                resp.headers[HEADER] = key
                if attempt.resumed:
                    resp.headers[RESUMED] = str(attempt.skipped)
                    log.warning(
                        "%s: continued a request an earlier attempt left unanswered"
                        " (%d row(s) it had spooled were not spooled again)",
                        HEADER, attempt.skipped,
                    )  # fmt: skip
            else:  # nothing accepted (or, after some parts, released with them)
                spool.idem_drop(tenant, key, holder, keep=attempt.wrote)
            return resp
        finally:
            keeper.cancel()

    return run
