"""The JSON-lines event log: one line per delivery-attempt outcome and state change.

Each line has: time (unix seconds), event (delivered / deferred / bounced /
expired / suppressed / ...), id (message id), campaign, rcpt, source_ip, mx,
code, enhanced, text, attempt. Written by the supervisor only (it owns the
state transitions), buffered and flushed each scheduler tick, appended with
O_APPEND so several writers (or log shippers reading along) stay safe.
It never logs message bodies or credentials.

A batch of events is encoded to JSON lines in one call (msgspec's
``encode_lines``: the same bytes orjson writes per event, without a call and a
bytes object per event); listeners get the batch as the list of dicts.

The two events of nearly every message (``accepted``, ``delivered``) may
travel as :class:`Rows` instead: one batch of one kind in columns, made of
the values the acceptor and the supervisor already hold (no dict per event).
:meth:`EventLog.emit_rows` writes a Rows' lines straight from the columns
(``accepted_lines`` / ``delivered_lines``, compiled twins in ``_events.pxi``:
the bytes ``encode_lines`` writes for its dicts) and hands it to a listener's
own rows handler (:meth:`EventLog.listen`), or the dicts to a listener
without one (made once per batch).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from fastsend._accel import pick

_encode_lines = msgspec.json.Encoder().encode_lines

Listener = Callable[[list[dict[str, Any]]], None]

# Every event carries the version of the log's schema (docs/EVENTS.md): its
# field ``SCHEMA_FIELD`` is ``SCHEMA``. The number moves only with a change a
# consumer must know of (a field renamed, removed or given another meaning);
# fields added keep it. A line without the field was written before it was
# (version 1: read_back gives it the field, as the events written now).
SCHEMA_FIELD = "schema"
SCHEMA = 1
FIRST_SCHEMA = 1  # the version of a line that has no schema field


def stamped(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` with the schema version (see :data:`SCHEMA`) in each (set in
    place where missing), as they go to the log, the webhooks and the index."""
    for e in events:
        if SCHEMA_FIELD not in e:
            e[SCHEMA_FIELD] = SCHEMA
    return events


class Rows:
    """Events of one kind in columns (see the module docstring): their dicts,
    and their JSON lines (the bytes ``encode_lines`` writes for the dicts)."""

    __slots__ = ("_dicts",)
    _dicts: list[dict[str, Any]] | None

    def dicts(self) -> list[dict[str, Any]]:
        d = self._dicts
        if d is None:
            d = self._dicts = self._make()
        return d

    def _make(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def lines(self) -> bytes:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class AcceptedRows(Rows):
    """The ``accepted`` events of rows spooled together: message ``ids[i]`` to
    ``rcpts[i]``, of one campaign and tenant, at ``time``."""

    __slots__ = ("campaign", "ids", "rcpts", "tenant", "time")

    def __init__(
        self, time: float, campaign: int, tenant: str, ids: list[int], rcpts: list[str]
    ) -> None:
        self._dicts = None
        self.time, self.campaign, self.tenant = time, campaign, tenant
        self.ids, self.rcpts = ids, rcpts

    def __len__(self) -> int:
        return len(self.ids)

    def _make(self) -> list[dict[str, Any]]:
        return accepted_dicts(self.time, self.campaign, self.tenant, self.ids, self.rcpts)

    def lines(self) -> bytes:
        return accepted_lines(self.time, self.campaign, self.tenant, self.ids, self.rcpts)


class DeliveredRows(Rows):
    """The ``delivered`` events of one flush of outcomes at ``time``: message
    ``claims[i]`` (id, campaign, rcpt, attempts before this one) answered
    ``results[i]`` (code, enhanced, text, mx, source_ip, queue_id: a
    ``wire.Res``, or the ``wire.Sent`` group of messages sharing one text)."""

    __slots__ = ("claims", "results", "time")

    def __init__(self, time: float) -> None:
        self._dicts = None
        self.time = time
        self.claims: list[Any] = []
        self.results: list[Any] = []

    def __len__(self) -> int:
        return len(self.claims)

    def _make(self) -> list[dict[str, Any]]:
        return delivered_dicts(self.time, self.claims, self.results)

    def lines(self) -> bytes:
        return delivered_lines(self.time, self.claims, self.results)


def accepted_dicts(
    now: float, campaign: int, tenant: str, ids: list[int], rcpts: list[str]
) -> list[dict[str, Any]]:
    return [
        {"time": now, "event": "accepted", "id": mid, "campaign": campaign, "tenant": tenant,
         "rcpt": rcpt, SCHEMA_FIELD: SCHEMA}
        for mid, rcpt in zip(ids, rcpts, strict=True)
    ]  # fmt: skip


def outcome_dict(now: float, name: str, c: Any, r: Any, failed: bool = False) -> dict[str, Any]:
    """An outcome's event (``name``: delivered, deferred, bounced, expired) of
    claim ``c`` (id, campaign, rcpt, attempts before this one) answered ``r``:
    what every outcome says, and for a failed or deferred one the stage, reason
    and hard verdict (before the remote queue id, last when there is one)."""
    ev = {
        "time": now,
        "event": name,
        "id": c.id,
        "campaign": c.campaign,
        "rcpt": c.rcpt,
        "source_ip": r.source_ip,
        "mx": r.mx,
        "code": r.code,
        "enhanced": r.enhanced,
        "text": r.text,
        "attempt": c.attempts + 1,
    }
    if failed:
        ev["stage"] = r.stage
        ev["reason"] = r.reason
        ev["hard"] = r.hard
    if r.queue_id:
        ev["queue_id"] = r.queue_id
    ev[SCHEMA_FIELD] = SCHEMA
    return ev


def delivered_dicts(now: float, claims: list[Any], results: list[Any]) -> list[dict[str, Any]]:
    return [outcome_dict(now, "delivered", c, r) for c, r in zip(claims, results, strict=True)]


def accepted_lines(
    now: float, campaign: int, tenant: str, ids: list[int], rcpts: list[str]
) -> bytes:
    """The JSON lines of :func:`accepted_dicts` (compiled twin in ``_events.pxi``)."""
    return _encode_lines(accepted_dicts(now, campaign, tenant, ids, rcpts))


def delivered_lines(now: float, claims: list[Any], results: list[Any]) -> bytes:
    """The JSON lines of :func:`delivered_dicts` (compiled twin in ``_events.pxi``)."""
    return _encode_lines(delivered_dicts(now, claims, results))


py_accepted_lines = accepted_lines  # the references (tests compare the twins with them)
py_delivered_lines = delivered_lines
accepted_lines = pick(accepted_lines)
delivered_lines = pick(delivered_lines)


class Pending:
    """Batches :meth:`EventLog.append_rows` put in the log, not yet told to its
    listeners: runs of dicts and Rows, where each ends in the log, and how many
    bytes the log had been shifted by then (``EventLog.shifted``)."""

    __slots__ = ("ends", "segs", "shifted")

    def __init__(self, segs: list[Any], ends: list[int | None], shifted: int = 0) -> None:
        self.segs, self.ends, self.shifted = segs, ends, shifted


def _torn(fd: int, size: int) -> bool:
    """True when the file open for appending as ``fd``, of ``size`` bytes, does not
    end with a line feed (read through /proc/self/fd: ``fd`` is write-only)."""
    try:
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            f.seek(size - 1)
            return f.read(1) not in (b"\n", b"")
    except OSError:
        return False


class EventLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._buf: list[bytes] = []
        self._fd = -1
        self.listeners: list[Listener] = []
        # A listener's own handler of Rows batches (listen(fn, rows=)); a
        # listener without one gets a Rows batch's dicts.
        self.rows_listeners: dict[Listener, Callable[[Rows], None]] = {}
        self._reported: set[str] = set()
        # Where the log ends (bytes written and buffered) and, while listeners are
        # called, where the batch they are given ends: how far a listener that has
        # seen everything so far has read (the rollups keep it beside their counts
        # and, after a crash, count the rest from the file: ``mark``).
        self.pos = 0
        self.delivering: int | None = None
        # Bytes the log's offsets moved back, in all, when the file was found
        # truncated in place (logrotate's copytruncate: the same inode, emptied):
        # ``pos`` then restarts from the file's real end, and batches taken before
        # (``Pending``) are told with their ends moved back as much.
        self.shifted = 0
        self._ident = ""  # "dev:inode" of the file written
        # The last flush could not write (a full disk): what it held waits in _buf.
        # The intake refuses new mail until a flush writes again (Acceptor.accept).
        self.failing = False
        # Events that may be lost (opens, clicks: emit_optional) taken into _buf while
        # the log is failing, and those dropped over its caps (counted for /metrics).
        self.optional_held = 0
        self.optional_bytes = 0
        self.dropped = 0
        self.dropping = False
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._opened()

    def _opened(self) -> None:
        st = os.fstat(self._fd)
        self.pos, self._ident = st.st_size, f"{st.st_dev}:{st.st_ino}"
        if st.st_size and _torn(self._fd, st.st_size):
            # The last writer died mid-line (a full disk took part of a write, then
            # the process ended; a power loss): that fragment ends here, so the next
            # event starts a line of its own. Before, the first event of the next
            # run was appended to it: one line no reader could parse, that event lost.
            self._buf.append(b"\n")
            self.pos += 1

    def listen(self, listener: Listener, rows: Callable[[Rows], None] | None = None) -> None:
        """Add ``listener`` (it sees every batch of event dicts); ``rows``: its
        handler of a :class:`Rows` batch, which then reaches it without dicts."""
        self.listeners.append(listener)
        if rows is not None:
            self.rows_listeners[listener] = rows

    def emit(self, event: dict[str, Any]) -> None:
        self.emit_many([event])

    def emit_optional(self, event: dict[str, Any], max_events: int, max_bytes: int) -> bool:
        """:meth:`emit` an event the server can do without (an open, a click): while the
        log cannot be written (``failing``: a full disk), at most ``max_events`` of them
        and ``max_bytes`` of their lines wait in memory for the next write; past either
        cap the event is dropped (``dropped`` counts it: not in the log, nor told to the
        listeners, whose own stores are on that disk too) and False returned. Before, a
        recipients' flood of opens grew the buffer (and the index's and outbox's rows)
        without bound for as long as the disk stayed full."""
        if self.failing and (self.optional_held >= max_events or self.optional_bytes >= max_bytes):
            if not self.dropping:  # said once per outage
                self.dropping = True
                logging.getLogger("fastsend.events").warning(
                    "the event log cannot be written and %d opens/clicks (%d bytes) wait for"
                    " it: more are dropped (counted) until it can", self.optional_held,
                    self.optional_bytes)  # fmt: skip
            self.dropped += 1
            return False
        before = self.pos
        self.emit_many([event])
        if self.failing:
            self.optional_held += 1
            self.optional_bytes += self.pos - before
        return True

    def emit_rows(self, parts: list[Any]) -> None:
        """Event dicts and :class:`Rows` batches, in order: to the log, then to
        each listener (a Rows batch to its rows handler, else its dicts)."""
        self.tell(self.append_rows(parts))

    def append_rows(self, parts: list[Any]) -> Pending:
        """The first half of :meth:`emit_rows`: ``parts`` into the log's buffer
        (written by the next :meth:`flush`); :meth:`tell` then hands them to the
        listeners. The supervisor writes the log between the two, before the
        spool records the outcomes the events tell: a crash in between leaves
        the events in the log and the messages in flight (sent again, one
        attempt of unknown outcome: the log may tell a delivery twice, never
        none of one the spool holds)."""
        segs: list[Any] = []  # runs of dicts, and Rows batches
        run: list[dict[str, Any]] = []
        for p in parts:
            if isinstance(p, Rows):
                if run:
                    segs.append(run)
                    run = []
                if len(p):
                    segs.append(p)
            else:
                if SCHEMA_FIELD not in p:
                    p[SCHEMA_FIELD] = SCHEMA
                run.append(p)
        if run:
            segs.append(run)
        ends: list[int | None] = [None] * len(segs)
        if self._fd >= 0:
            add = self._buf.append
            for i, seg in enumerate(segs):
                data = seg.lines() if isinstance(seg, Rows) else _encode_lines(seg)
                add(data)
                self.pos += len(data)
                ends[i] = self.pos
        return Pending(segs, ends, self.shifted)

    def tell(self, pending: Pending) -> None:
        """The second half of :meth:`emit_rows`: the batches :meth:`append_rows`
        took, to each listener, in order."""
        outer = self.delivering
        back = self.shifted - pending.shifted  # the file was truncated since: see flush
        ends = pending.ends if not back else [
            None if e is None else max(0, e - back) for e in pending.ends
        ]  # fmt: skip
        for listener in self.listeners:
            on_rows = self.rows_listeners.get(listener)
            for seg, end in zip(pending.segs, ends, strict=True):
                self.delivering = end
                try:
                    if not isinstance(seg, Rows):
                        listener(seg)
                    elif on_rows is not None:
                        on_rows(seg)
                    else:
                        listener(seg.dicts())
                except Exception:  # one broken listener must not starve the others
                    self._report(listener)
        self.delivering = outer

    def emit_many(self, events: list[dict[str, Any]]) -> None:
        stamped(events)
        if self._fd >= 0 and events:
            data = _encode_lines(events)  # newline-terminated lines
            self._buf.append(data)
            self.pos += len(data)
        outer, self.delivering = self.delivering, self.pos
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:  # one broken listener must not starve the others
                self._report(listener)
        self.delivering = outer

    def mark(self) -> str | None:
        """How far into this log every listener has seen (``dev:inode:offset``), for a
        listener that keeps counts of it: the offset where the batch being delivered
        ends, or the log's end between deliveries. None without a log file."""
        if not self._ident:
            return None
        at = self.delivering if self.delivering is not None else self.pos
        return f"{self._ident}:{at}"

    def _report(self, listener: Callable[..., Any]) -> None:
        name = getattr(listener, "__qualname__", repr(listener))
        if name not in self._reported:
            self._reported.add(name)
            import sys
            import traceback

            print(f"fastsend: event listener {name} failed (reported once):", file=sys.stderr)
            traceback.print_exc()

    def catch_up_mark(self, who: str) -> str | None:
        """Write what is buffered, then :meth:`mark`: how far a listener catching up
        at start (:func:`read_back` from the mark it kept) reads, the file holding
        all of it. None without a log file. A buffer that cannot be written (a full
        disk) is said, naming ``who``: the catch-up reads what the file holds."""
        if not self.path or self._fd < 0:
            return None
        try:
            self.flush()
        except OSError as e:
            logging.getLogger("fastsend.events").warning(
                "%s: the event log cannot be written (%s): catching up on what it holds", who, e
            )
        return self.mark()

    def flush(self) -> None:
        if self._buf and self._fd >= 0:
            data = b"".join(self._buf)
            self._buf.clear()
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._fd, view)
                except OSError:  # a full disk: the rest is written by the next flush
                    self._buf.append(bytes(view))
                    self.failing = True
                    raise
                view = view[n:]
            self.failing = False
            self.optional_held = self.optional_bytes = 0
            self.dropping = False
            size = os.fstat(self._fd).st_size
            if size < self.pos:
                # Truncated in place since the last write (logrotate's copytruncate;
                # O_APPEND wrote this batch at the new end): offsets restart from the
                # file's real end, else every mark named a point past it and a
                # restart's catch-up (read_back) found nothing to read.
                self.shifted += self.pos - size
                self.pos = size

    def reopen(self) -> None:
        """Write what is buffered, then go on in a file at ``path`` again (serve's
        SIGHUP: the old one was renamed by a log rotation)."""
        if self._fd < 0 or not self.path:
            return
        self.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.close(self._fd)
        self._fd = fd
        self._opened()

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


NODE_ID_FILE = ".fastsend-node-id"
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def _machine_id() -> str:
    """This machine's id (systemd's /etc/machine-id), "" where there is none."""
    for path in MACHINE_ID_FILES:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                v = f.read().strip()
        except OSError:
            continue
        if v.isalnum():
            return v
    return ""


def node_id(directory: str) -> str:
    """A random id of the installation whose files are in ``directory``, kept there
    in ``NODE_ID_FILE`` (made at first use, with this machine's id: a directory
    copied to another machine, whose machine id differs, gets an id of its own
    there; a machine id shared by clones, or none, leaves it to the copy's own
    first start). "" when the directory takes no file."""
    import secrets

    path = os.path.join(directory, NODE_ID_FILE)
    machine = _machine_id()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            have, _, made_on = f.read().strip().partition(" ")
        if have.isalnum() and (not machine or not made_on or made_on == machine):
            return have
        replace = True  # a copy from another machine: not that machine's id
    except FileNotFoundError:
        replace = False
    except OSError:
        return ""
    new = secrets.token_hex(8)
    tmp = f"{path}.{os.getpid()}.{new}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="ascii") as f:
            f.write(f"{new} {machine}\n")
        if replace:
            os.replace(tmp, path)
            return new
        try:
            os.link(tmp, path)  # (never over one another process made meanwhile)
        except FileExistsError:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read().split(" ", 1)[0].strip()
        return new
    except OSError:
        return ""
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def mark_key(path: str) -> str:
    """The name a listener keeps its :meth:`EventLog.mark` under: the log's
    installation (:func:`node_id` of its directory) and real path, as several
    nodes may share one store. Before, this host's name and the path: cloned
    machines (one image: one host name, one path) shared the key, each overwrote
    the other's mark, and a restart after a kill -9 caught up from the other's
    (tests/test_monitoring_audit18.py). A directory that takes no file: the host
    name, as before."""
    real = os.path.realpath(path)
    ident = node_id(os.path.dirname(real))
    return f"node-{ident}:{real}" if ident else legacy_mark_key(path)


def legacy_mark_key(path: str) -> str:
    """The key of marks kept before :func:`mark_key` named the node's id: this host's
    name and the log's real path (a local store's mark of an upgraded install)."""
    import socket

    return f"{socket.gethostname()}:{os.path.realpath(path)}"


def rotated(path: str, dev: str, ino: str) -> str | None:
    """The file beside the log at ``path`` whose device and inode are ``dev``,
    ``ino`` (a mark's): the log renamed by a rotation (``events.jsonl.1``,
    ``events.jsonl-20261206``: logrotate's names begin with the log's), or None."""
    d, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(d)
    except OSError:
        return None
    for name in names:
        if name == base or not name.startswith(base):
            continue
        full = os.path.join(d, name)
        try:
            st = os.stat(full)
        except OSError:
            continue
        if str(st.st_dev) == dev and str(st.st_ino) == ino:
            return full
    return None


def read_back(path: str, kept: str, mine: str, chunk: int = 5000) -> Iterator[list[dict[str, Any]]]:
    """The events of the log at ``path`` past mark ``kept`` up to mark ``mine``
    (:meth:`EventLog.mark` strings), in batches of up to ``chunk``: what a killed
    process's listener had not made durable when it died. When the marks name
    different files, the file ``kept`` names renamed beside the log (a rotation:
    :func:`rotated`) is read from the mark to its end, then the log from its
    start; when there is no such file, nothing (the log was replaced otherwise:
    copied to another disk, its events counted already). Nothing either when
    ``kept`` is not before ``mine``.
    A line cut short by the crash ends it; a line that is not a JSON object is
    skipped; a line of before the schema field gets it (:data:`FIRST_SCHEMA`)."""
    dev, ino, end = [*mine.rsplit(":", 2), "", ""][:3]
    kdev, kino, koff = [*kept.rsplit(":", 2), "", "", ""][:3]
    if not (koff.isdigit() and end.isdigit()):
        return
    if (kdev, kino) != (dev, ino):
        # Renamed by a rotation since the mark (logrotate's ``create``, then serve's
        # reopen at SIGHUP; or a node killed, rotated, then started): its rest, then
        # the new log. Before, nothing: the listeners' last events were lost.
        old = rotated(path, kdev, kino)
        if old is None:
            return
        yield from _read_span(old, int(koff), None, chunk)
        yield from _read_span(path, 0, int(end), chunk)
        return
    start, stop = int(koff), int(end)
    if start >= stop:
        # (a mark past the end: events a killed run had buffered and never written,
        # or a copytruncate while the writer was down, which wrote nothing since)
        return
    yield from _read_span(path, start, stop, chunk)


def _read_span(
    path: str, start: int, stop: int | None, chunk: int
) -> Iterator[list[dict[str, Any]]]:
    """The events of the file at ``path`` from offset ``start`` (from the next line
    when it is not at a line's start) up to ``stop`` (None: its end), in batches."""
    import orjson

    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # not at a line's start: from the next one
                f.readline()
        batch: list[dict[str, Any]] = []
        while stop is None or f.tell() < stop:
            line = f.readline()
            if not line.endswith(b"\n"):
                break  # a line cut short by the crash
            try:
                e = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(e, dict):
                if SCHEMA_FIELD not in e:
                    e[SCHEMA_FIELD] = FIRST_SCHEMA
                batch.append(e)
                if len(batch) >= chunk:
                    yield batch
                    batch = []
        if batch:
            yield batch
