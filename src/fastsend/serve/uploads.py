"""Recipient lists uploaded through the HTTP API, as durable ingest jobs.

``POST /v1/campaigns/{id}/recipients`` with a CSV or JSON-lines body:

1. the body is streamed to ``uploads/upload-*.csv|.jsonl`` in the spool's
   local directory (0600) and fsynced, the file and then the directory;
2. it is checked (the columns the template needs, every row parsed, the
   campaign's recipient cap, ``?strict=1``) off the event loop; a bad upload
   is answered 400/413 and its file removed;
3. it becomes an ingest job (:mod:`fastsend.accept`: path, size, SHA-256, row
   count), held by this process, and its rows are spooled in transactions that
   carry the job's position (:class:`~fastsend.spool.IngestMark`), as
   ``fastsend send`` spools a list;
4. a list of at most :data:`SYNC_ROWS` rows is spooled before the answer (the
   synchronous answer: accepted, rejected, errors); a longer one is answered
   202 with the job id and the rows spooled so far and spooled on in the
   background, a chunk per loop turn.

A serve killed in the middle continues its jobs at its next start (or
``fastsend resume`` does: the file is in the spool directory); meanwhile a
running serve takes over every upload job whose reader died (this host: its
pid is gone; another: its lease on the job lapsed, Redis) and whose file it can
read, unchanged (:meth:`Uploads.adopt`, every few seconds):
its own uploads, or another node's when the file is on storage both see. Meanwhile
``GET /v1/campaigns/{id}`` and ``fastsend queue`` show "spooling: X of Y
rows". The file is removed once its job is done. Nothing acknowledged is
lost: the answer comes after the job is durable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from array import array
from collections.abc import AsyncIterable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fastsend import durable, recipients
from fastsend.accept import Acceptor, row_checks, row_sizer, rows_left, source_problem
from fastsend.message import Campaign
from fastsend.serve.tenantcaps import job_quota
from fastsend.spool import IngestBusy, IngestJob, IngestLost, IngestMark, Spool

log = logging.getLogger("fastsend.serve")

UPLOAD_DIR = "uploads"
SYNC_ROWS = 20_000  # at most this many rows: spooled before the answer, one transaction
CHUNK = 2_000  # rows per transaction in the background (a loop turn each)
ORPHAN_AGE = 3600.0  # s: an upload file no job names (its request died before the job)
RETRY_FAILED = 60.0  # s before a job whose spooling failed here is tried again
# A shared spool: a list spooled in the background has its address fingerprints in
# Redis (``{P}:upfp:JOB``, 8 bytes each) while it spools, so that another node's
# request counts an address of it once (Uploads.not_pending); kept at most this
# long (a job ends sooner: deleted then), and the unfinished jobs read again at most
# every JOBS_TTL s
SHARED_FPS_TTL = 86400
JOBS_TTL = 1.0
_UNREAD = object()


class UploadTooLarge(ValueError):
    """The body exceeds the API's body limit."""


@dataclass
class Scan:
    """What checking an uploaded list found (before anything is spooled)."""

    good: int = 0  # rows to spool: a duplicate of an earlier row of the list is not one
    bad: list[recipients.BadRow] = field(default_factory=list)
    rejected: int = 0
    duplicates: int = 0
    # the good rows' address fingerprints (``scan(collect=True)``: a campaign that
    # has rows already, to learn which it has: 8 bytes a row)
    fps: array[int] | None = None


@dataclass
class Saved:
    """An uploaded body on disk (:meth:`Uploads.save`); ``taken`` once a handler
    owns the file (a job, or its own removal), else whoever saved it removes it."""

    path: str
    sha256: str
    taken: bool = False


UPLOAD: web.RequestKey[Saved] = web.RequestKey("fastsend_upload", Saved)  # a request's list


def scan(path: str, camp: Campaign, keep: int, dedup: bool = False,
         collect: bool = False, max_size: int = 0) -> Scan:  # fmt: skip
    """Check an uploaded list: its columns (CampaignError when the template
    needs one it lacks) and every row as the ingest will (``row_checks``); the
    first ``keep`` bad rows are kept. ``dedup``: a row whose address an earlier
    row has is counted a duplicate, not a good row (the campaign's cap and the
    tenant's quota count what is spooled); ``collect`` (with ``dedup``): the good
    rows' fingerprints are kept in ``fps``, for the caller to leave out those the
    campaign has (:meth:`fastsend.accept.Acceptor.fresh`). Raises RecipientsError /
    UnicodeDecodeError for a file that cannot be read. ``max_size``: [delivery]
    max_message_size, a row whose message would be larger is a bad row, as the
    ingest refuses it (accept.row_sizer; it had been counted good and reported so,
    then left out by the job)."""
    camp.check_columns(recipients.columns(path) | {"email"})
    refuse, need = row_checks(camp.to_dict())
    sizer = row_sizer(camp.to_dict(), max_size)
    out = Scan()
    seen = recipients.FpSet() if dedup else None
    fps: list[int] | None = [] if dedup and collect else None
    if fps is not None:
        out.fps = array("Q")
    for row in recipients.read(path, refuse=refuse, need=need):
        if sizer is not None and not isinstance(row, recipients.BadRow):
            why = sizer(row[3])
            if why is not None:
                row = recipients.BadRow(row[0], why)
        if isinstance(row, recipients.BadRow):
            out.rejected += 1
            if len(out.bad) < keep:
                out.bad.append(row)
        elif seen is not None and seen.add_rows([(row[1], row[2], row[3])], fps):
            out.duplicates += 1
        else:
            out.good += 1
            if fps is not None and out.fps is not None:
                out.fps.append(fps.pop())
    return out


class Uploads:
    """The uploaded lists of one serving process (see the module docstring)."""

    def __init__(self, acceptor: Acceptor, local_dir: str) -> None:
        self.acceptor = acceptor
        self.dir = os.path.join(local_dir, UPLOAD_DIR)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.on_spooled: Callable[[int], None] | None = None  # rows spooled (metrics)
        self.failed: dict[int, float] = {}  # job id -> monotonic time its spooling failed here
        self.reported: set[int] = set()  # jobs whose file was found gone or changed (said)
        self.busy: set[int] = set()  # jobs of ours another live process read (said)
        # called with each job this process spooled to its end, whoever started it
        # (serve: the tenant's quota counts what the job spooled, TenantCaps.settle_job)
        self.on_done: Callable[[IngestJob], None] | None = None
        # job id -> (campaign, its list's address fingerprints, the addresses it was
        # counted for): the lists this process spools in the background, so that a
        # request naming their addresses counts them once (:meth:`not_pending`)
        self.pending: dict[int, tuple[int, recipients.FpSet, int]] = {}
        # a shared spool: other nodes' (and processes') lists still spooling, by job
        # id: their fingerprints as they published them (None: none published),
        # and the unfinished jobs as read last (when, monotonic s)
        self._shared: Any = _UNREAD  # (read at first use: the spool's SharedStore or None)
        self.remote: dict[int, recipients.FpSet | None] = {}
        self._jobs: tuple[float, list[IngestJob]] = (-JOBS_TTL, [])

    @property
    def spool(self) -> Spool:
        return self.acceptor.spool

    @property
    def shared(self) -> Any:
        """The spool's shared store (``Spool.shared()``: Redis), None for a local spool."""
        if self._shared is _UNREAD:
            self._shared = self.spool.shared()
        return self._shared

    async def save(self, body: AsyncIterable[bytes], suffix: str, limit: int) -> Saved:
        """Stream a request body to a new file in the uploads directory, durably;
        returns its path and SHA-256. UploadTooLarge past ``limit`` bytes (nothing
        kept)."""
        durable.makedirs(self.dir, mode=0o700)  # (its name too: the first upload)
        fd, path = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=self.dir)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f:
                n = 0
                async for block in body:
                    n += len(block)
                    if n > limit:
                        raise UploadTooLarge(f"request body exceeds {limit} bytes")
                    f.write(block)
                    digest.update(block)
                f.flush()
                os.fsync(f.fileno())
            durable.fsync_dir(self.dir)  # the name too, before a job refers to it
        except BaseException:
            self.discard(path)
            raise
        return Saved(path, digest.hexdigest())

    @staticmethod
    def discard(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def owns(self, job: IngestJob) -> bool:
        """A job whose list was uploaded to this process's uploads directory."""
        path = str(job.source.get("path", ""))
        return job.source.get("origin") == "api" and os.path.dirname(
            os.path.realpath(path)
        ) == os.path.realpath(self.dir)

    def start(self, campaign_id: int, path: str, tags: dict[str, str] | None = None) -> IngestJob:
        """Make the checked upload at ``path`` a durable ingest job (:meth:`accept`
        spools it). ``tags``: written into the job's source (an Idempotency-Key's
        token, what the tenant's quota counted for it)."""
        return self.acceptor.start_ingest(campaign_id, path, origin="api", tags=tags)

    def accept(
        self,
        job: IngestJob,
        on_bad: Callable[[recipients.BadRow], None] | None = None,
        fps: tuple[recipients.FpSet, int] | None = None,
        raw_fps: array[int] | None = None,
    ) -> IngestMark:
        """Spool the job of :meth:`start`: all of it when it has at most SYNC_ROWS
        rows (the mark is then the job's last), else its first chunk, the rest in
        the background (:meth:`running`). ``fps``: its list's address fingerprints
        and how many of them it was counted for, kept while it spools on;
        ``raw_fps`` the same fingerprints, published for the other nodes on a
        shared spool while it spools on."""
        path = str(job.source["path"])
        if job.total > SYNC_ROWS and raw_fps is not None and self.shared is not None:
            try:
                self.shared.client.set(self._fps_key(job.id), raw_fps.tobytes(),
                                       ex=SHARED_FPS_TTL)  # fmt: skip
            except Exception as e:  # the other nodes may count its addresses twice: said
                log.warning("uploaded list %s: its addresses not shared with the other"
                            " nodes (%s)", path, e)  # fmt: skip
        if job.total <= SYNC_ROWS:
            mark = IngestMark(job.id, 0, 0, 0, 0)
            for mark in self.acceptor.ingest(job, chunk=SYNC_ROWS, on_bad=on_bad):
                self._spooled(mark, job)
                job.accepted, job.rejected = mark.accepted, mark.rejected
                job.duplicates = mark.duplicates
            self.discard(path)
            self._done(job)
            return mark
        feed = self.acceptor.ingest(job, chunk=CHUNK, on_bad=on_bad)
        mark = next(feed)
        self._spooled(mark, job)
        job.accepted, job.rejected = mark.accepted, mark.rejected
        job.duplicates = mark.duplicates
        if fps is not None:
            self.pending[job.id] = (job.campaign, *fps)
        self._start(job, feed)
        return mark

    def _fps_key(self, job_id: int) -> str:
        assert self.shared is not None
        return "{" + self.shared.prefix + "}:upfp:" + str(job_id)

    def _done(self, job: IngestJob) -> None:
        if self.shared is not None and job.total > SYNC_ROWS:
            try:
                self.shared.client.delete(self._fps_key(job.id))
            except Exception:  # (it expires)
                pass
        if self.on_done is not None:
            try:
                self.on_done(job)
            except Exception:
                log.exception("ending ingest job %s", job.id)

    def not_pending(self, campaign_id: int, fps: list[int]) -> list[int]:
        """``fps`` less the fingerprints a list of the campaign this process still
        spools names (that list counted them; the spool may not have them yet)."""
        for cid, table, _n in self.pending.values():
            if cid == campaign_id and fps:
                fps = [fp for fp, has in zip(fps, table.has_fps(fps), strict=True) if not has]
        if self.shared is not None and fps:  # and another node's (or process's)
            for t in self._remote_tables(campaign_id):
                fps = [fp for fp, has in zip(fps, t.has_fps(fps), strict=True) if not has]
                if not fps:
                    break
        return fps

    def _remote_tables(self, campaign_id: int) -> list[recipients.FpSet]:
        """The fingerprint sets of the campaign's lists another node (or process)
        spools now, as they published them (:meth:`accept`); read once per job.
        Before, a node counted an address of such a list again: the tenant's
        quota and the campaign's cap were over-counted until that list ended (a
        false 429/413 near them). Redis out of reach: none (counted again, as
        before)."""
        now = time.monotonic()
        at, jobs = self._jobs
        try:
            if now - at >= JOBS_TTL:
                jobs = [j for j in self.spool.list_ingests(unfinished=True)
                        if j.source.get("origin") == "api" and j.total > SYNC_ROWS]  # fmt: skip
                self._jobs = (now, jobs)
                live = {j.id for j in jobs}
                for gone in [i for i in self.remote if i not in live]:
                    del self.remote[gone]
            out = []
            for j in jobs:
                if j.campaign != campaign_id or j.id in self.pending:
                    continue
                if j.id not in self.remote:
                    assert self.shared is not None
                    raw = self.shared.client.get(self._fps_key(j.id))
                    table = None
                    if raw:
                        table = recipients.FpSet()
                        got = array("Q")
                        got.frombytes(raw[: len(raw) - len(raw) % 8])
                        table.reserve(len(got))
                        table.add_fps(got.tolist())
                    self.remote[j.id] = table
                t = self.remote[j.id]
                if t is not None:
                    out.append(t)
            return out
        except Exception as e:
            log.debug("uploads: other nodes' pending lists not read: %s", e)
            return []

    def left(self, job: IngestJob) -> int:
        """How many more recipients an unfinished job may spool: the addresses it
        was counted for less those spooled, when this process spools it; else the
        rows it has not read (another process's, or node's), at most what its
        request counted less those spooled."""
        held = self.pending.get(job.id)
        if held is None:  # (its request counted its addresses: no more than that)
            q = job_quota(job)
            left = rows_left(job)
            return left if q is None else max(0, min(left, q[1] - job.accepted))
        return max(0, held[2] - job.accepted)

    def _spooled(self, mark: IngestMark, before: IngestJob) -> None:
        if self.on_spooled is not None and mark.accepted > before.accepted:
            self.on_spooled(mark.accepted - before.accepted)

    def _start(self, job: IngestJob, feed: Iterator[IngestMark]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job, feed), name=f"ingest-{job.id}")
        self.tasks[job.id] = task

    async def _run(self, job: IngestJob, feed: Iterator[IngestMark]) -> None:
        path = str(job.source["path"])
        try:
            for mark in feed:  # one transaction per step
                self._spooled(mark, job)
                job.accepted, job.rejected = mark.accepted, mark.rejected
                job.duplicates = mark.duplicates
                await asyncio.sleep(0)  # requests (and the supervisor) between chunks
        except asyncio.CancelledError:
            raise  # stopping: the job stays unfinished, the next start continues it
        except IngestLost as e:  # another process reads it now (our lease lapsed)
            log.warning("uploaded list %s: %s", path, e)
        except Exception:
            log.exception("spooling uploaded list %s (ingest job %s) stopped", path, job.id)
            self.failed[job.id] = time.monotonic()
        else:
            self.discard(path)
            self._done(job)
        finally:
            self.tasks.pop(job.id, None)
            self.pending.pop(job.id, None)

    def resume(self) -> list[IngestJob]:
        """At start: continue every unfinished upload job whose reader died
        (:meth:`adopt`: a serve killed while spooling it); returns them. Old
        upload files no job names are removed."""
        named: set[str] = set()
        out = self.adopt(named)
        self._remove_orphans(named)
        return out

    def adopt(
        self, named: set[str] | None = None, jobs: list[IngestJob] | None = None
    ) -> list[IngestJob]:
        """Continue every unfinished upload job nobody reads any more (see
        :meth:`take_over`); returns them. ``named``: gets the real path of every
        unfinished upload job's file. Cheap when there is none: one query.
        ``jobs``: the unfinished jobs, read already (serve's tick, in a thread)."""
        out: list[IngestJob] = []
        for job in self.spool.list_ingests(unfinished=True) if jobs is None else jobs:
            if job.source.get("origin") != "api":
                continue  # a `fastsend send` list: `fastsend resume` continues it
            if named is not None:
                named.add(os.path.realpath(str(job.source.get("path", ""))))
            if self.take_over(job):
                out.append(job)
        return out

    def take_over(self, job: IngestJob) -> bool:
        """Continue an unfinished upload job in the background if nobody reads it:
        its reader died (this host) or its lease lapsed (Redis), and its file is
        here and unchanged. A job another live process reads, or whose file is
        elsewhere (another node's disk), is left alone; one of this node's whose
        file is gone or changed is reported once (``fastsend resume
        --abandon-rest`` closes it)."""
        if job.id in self.tasks or job.finished or job.id in self.reported:
            return False  # reading it, or its file was found gone or changed (said once)
        if time.monotonic() - self.failed.get(job.id, -RETRY_FAILED) < RETRY_FAILED:
            return False
        path = str(job.source.get("path", ""))
        if not self.owns(job) and not os.path.exists(path):
            return False  # another node's upload, on its disk: its node continues it
        try:
            self.spool.hold_ingest(job.id)
        except IngestBusy as e:
            if self.owns(job) and job.id not in self.busy:
                self.busy.add(job.id)
                log.warning("%s", e)
            return False
        fresh = self.spool.get_ingest(job.id)  # where it stands now that it is ours
        if fresh is None or fresh.finished:
            self.spool.release_ingest(job.id)
            return False
        problem = source_problem(fresh)
        if problem is not None:
            self.spool.release_ingest(job.id)
            if job.id not in self.reported:
                self.reported.add(job.id)
                log.error(
                    "uploaded list %s of campaign %s is %s: %d row(s) were never accepted",
                    path, fresh.campaign, problem,
                    rows_left(fresh),
                )  # fmt: skip
            return False
        log.warning(
            "continuing the uploaded list of campaign %s (ingest job %s): %d of %d rows read",
            fresh.campaign, fresh.id, fresh.total - rows_left(fresh), fresh.total,
        )  # fmt: skip
        self._start(fresh, self.acceptor.ingest(fresh, chunk=CHUNK))
        return True

    def _remove_orphans(self, named: set[str]) -> None:
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        old = time.time() - ORPHAN_AGE
        for e in entries:
            if e.name.startswith("upload-") and os.path.realpath(e.path) not in named:
                try:
                    if e.stat().st_mtime < old:
                        os.unlink(e.path)
                except FileNotFoundError:
                    pass

    async def stop(self) -> None:
        """Stopping: background spooling ends after its current chunk; the jobs
        stay unfinished (and durable) for the next start."""
        held = dict(self.tasks)
        for t in held.values():
            t.cancel()
        for t in held.values():
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for jid in held:
            self.spool.release_ingest(jid)

    def progress(self, campaign_id: int) -> list[dict[str, Any]]:
        """The campaign's lists still being spooled, for its API view."""
        return [
            {
                "job": j.id,
                "rows": j.total,
                "read": j.accepted + j.rejected + j.duplicates,
                "accepted": j.accepted,
                "rejected": j.rejected,
                "duplicates": j.duplicates,
                "text": f"spooling: {j.accepted + j.rejected + j.duplicates:,} of"
                f" {j.total:,} rows",
            }
            for j in self.spool.list_ingests(unfinished=True)
            if j.campaign == campaign_id
        ]
