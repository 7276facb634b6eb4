"""What survives a power loss, not only a kill -9.

A kill -9 loses nothing a process wrote: the kernel keeps its page cache. A
power loss (or a kernel crash) keeps only what was fsynced: a file's bytes
once the file is fsynced, a file's name (created, renamed, linked) once its
directory is (fsync(2)). :class:`PowerLoss` records, for the files under one
directory, what each fsync made durable (the real calls run, the real files
are written), and :meth:`PowerLoss.view` is what a power loss at that moment
would leave of a file: absent if its name was never made durable, else the
bytes of its inode's last fsync. Each test takes that view at the moment a
promise is made (an outcome's commit, an answer) and checks the promise's
record is in it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from fastsend import wire
from fastsend.config import Config
from fastsend.events import EventLog
from fastsend.queue.supervisor import Supervisor
from fastsend.ring import Ring
from fastsend.spool.sqlite import SQLiteSpool


class PowerLoss:
    """Durable state of the files under ``root`` as fsync(2) promises it."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root)
        self.names: dict[str, dict[str, int]] = {}  # dir -> {name: inode} durable
        self.content: dict[int, bytes] = {}  # inode -> bytes durable
        for d, _dirs, files in os.walk(self.root):  # what is there before: durable
            self._sync_dir(d)
            for f in files:
                p = os.path.join(d, f)
                with open(p, "rb") as fh:
                    self.content[os.stat(p).st_ino] = fh.read()
        real_fsync, real_fdatasync = os.fsync, os.fdatasync

        def fsync(fd: Any) -> None:
            real_fsync(fd)
            self._synced(fd)

        def fdatasync(fd: Any) -> None:
            real_fdatasync(fd)
            self._synced(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def _synced(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not path.startswith(self.root):
            return
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            self._sync_dir(path)
        else:
            with open(f"/proc/self/fd/{fd}", "rb") as f:  # (fd may be write-only)
                self.content[st.st_ino] = f.read()

    def _sync_dir(self, d: str) -> None:
        self.names[d] = {n: os.lstat(os.path.join(d, n)).st_ino for n in os.listdir(d)}

    def view(self, path: Path | str) -> bytes | None:
        """``path``'s content after a power loss now (None: the file is gone)."""
        d, name = os.path.split(str(path))
        ino = self.names.get(d, {}).get(name)
        if ino is None:
            return None
        return self.content.get(ino, b"")


def test_power_loss_sees_only_what_was_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:  # fmt: skip
    """The simulation itself: a written file's name and bytes need their fsyncs."""
    (tmp_path / "old").write_bytes(b"kept")
    pl = PowerLoss(tmp_path, monkeypatch)
    assert pl.view(tmp_path / "old") == b"kept"
    fd = os.open(tmp_path / "new", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"a\n")
        assert pl.view(tmp_path / "new") is None  # the name is not durable
        os.fsync(fd)
        assert pl.view(tmp_path / "new") is None  # its bytes are, its name is not
        dfd = os.open(tmp_path, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        assert pl.view(tmp_path / "new") == b"a\n"
        os.write(fd, b"b\n")
        assert pl.view(tmp_path / "new") == b"a\n"
        os.fdatasync(fd)
        assert pl.view(tmp_path / "new") == b"a\nb\n"
    finally:
        os.close(fd)


SUBMITTED = orjson.dumps({"dsn": True, "mail_from": "app@example.com", "raw": "RnJvbTogYQ0KDQp4"})


def test_a_bounces_dsn_journal_line_is_durable_before_its_outcome_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submitted message bounced: its failure is a line of ``dsn.journal``,
    written by the result hook before the outcome's commit, so that a crash
    after the commit still sends the sender its notice. The line was written,
    not fsynced (and the journal's name never was): a power loss once the
    bounced row reached the disk left no line, and no notice was ever sent. Now
    the journal's lines are synced (one fdatasync a commit) before the commit,
    and what a power loss at the commit leaves is a journal that a start takes
    the failure again from."""
    from fastsend.serve import dsn

    cfg = Config(spool_dir=str(tmp_path / "spool"), workers=1)
    spool = SQLiteSpool(cfg.spool_dir)
    cid = spool.create_campaign({"kind": "transactional", "defaults": {}})
    spool.add_messages(cid, [("u1@example.org", "example.org", SUBMITTED),
                             ("u2@example.org", "example.org", SUBMITTED)], 1.0)  # fmt: skip
    events = EventLog(cfg.event_log_path)
    sup = Supervisor(cfg, spool, events)
    ctx = SimpleNamespace(config=cfg, spool=spool)
    journal = tmp_path / "spool" / dsn.JOURNAL
    try:
        pl = PowerLoss(tmp_path / "spool", monkeypatch)
        notices = dsn.Notices(ctx, "mx.example.com")
        sup.result_hooks.append(notices.on_result)
        hook = getattr(notices, "sync", None)
        if hook is not None:
            sup.before_commit.append(hook)
        at_commit: list[bytes | None] = []
        record = spool.record_outcomes

        def committing(*a: Any, **kw: Any) -> Any:
            at_commit.append(pl.view(journal))  # the power goes as the commit lands
            return record(*a, **kw)

        monkeypatch.setattr(spool, "record_outcomes", committing)
        slot = sup.slots[0]
        slot.outbox = Ring(1 << 20)
        for c in spool.claim_next(2.0, 100):
            slot.inflight[c.id] = c
        failed = [wire.Res(i, wire.K_FAILED, 550, "5.1.1", "no such user", "mx", "127.0.0.2",
                           "rcpt", "", True) for i in (1, 2)]  # fmt: skip
        assert slot.outbox.put(wire.encoder.encode(wire.Results(failed)))
        sup.drain_outbox(slot, slot.outbox)
        sup.flush_results()
        assert [m["state"] for m in map(spool.message, (1, 2))] == ["bounced", "bounced"]
        assert len(at_commit) == 1
        left = at_commit[0]
        assert left is not None, "a power loss at the commit left no journal at all"
        ids = [orjson.loads(x).get("id") for x in left.splitlines()]
        assert ids == [1, 2], left
        # A start on what the power loss left owes the notice of both failures.
        sup.result_hooks.remove(notices.on_result)
        journal.write_bytes(left)
        again = dsn.Notices(ctx, "mx.example.com")
        assert sorted(i for g in again.pending.values() for i in g.ids) == [1, 2]
    finally:
        sup.suppression.close()
        events.close()
        spool.close()


def test_a_new_campaigns_note_survives_a_power_loss(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``held.jsonl`` is a new campaign's commit point: its note is fsynced before
    the campaign leaves staging (a commit of synchronous=NORMAL, not yet on disk
    when the 201 is answered) so that the next start gives it its status. The
    journal is made anew by each start's first note, and its name was never made
    durable: a power loss after the answer lost the file, the campaign stayed
    staging and the sweep abandoned it, mail answered 201 never sent."""
    from fastsend.serve.idempotency import Held, HeldJournal

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    pl = PowerLoss(spool_dir, monkeypatch)
    journal = HeldJournal(str(spool_dir))
    held = Held()
    held.earlier.append((7, [1, 2, 3]))
    journal.note(held, 7, "active")
    left = pl.view(spool_dir / HeldJournal.NAME)
    assert left is not None, "a power loss right after the note left no journal"
    assert orjson.loads(left.splitlines()[0])["campaign"] == 7


def test_the_installation_secret_survives_a_power_loss(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``<spool>/secret.key`` signs tracking links, VERP return paths and one-click
    unsubscribe URLs: made once (fsynced, then linked into place), its name was
    never made durable; a power loss lost it, a new one was made at the next
    start and every link already sent out failed its signature."""
    from fastsend.msgid import load_secret

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    pl = PowerLoss(spool_dir, monkeypatch)
    key = load_secret(Config(spool_dir=str(spool_dir)))
    assert pl.view(spool_dir / "secret.key") == key


def test_a_new_spools_directory_and_its_first_upload_survive_a_power_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool directory a first command makes (``fastsend send --spool new``,
    serve's ``[spool] dir``) and the uploads directory the first uploaded list is
    saved in were made with ``os.makedirs``, their names never fsynced in their
    parents: a power loss lost the directory, with the mail accepted into it and
    the list answered 202. Now each directory made is fsynced into its parent."""
    import asyncio
    from typing import cast

    from fastsend.serve.uploads import Uploads

    pl = PowerLoss(tmp_path, monkeypatch)
    spool = SQLiteSpool(str(tmp_path / "new" / "spool"))
    spool.close()
    assert pl.view(tmp_path / "new") is not None, "the new spool's parent was lost"
    assert pl.view(tmp_path / "new" / "spool") is not None, "the new spool was lost"

    async def body() -> Any:
        yield b"email\na@example.org\n"

    up = Uploads(cast(Any, None), str(tmp_path / "new" / "spool"))
    saved = asyncio.run(up.save(body(), ".csv", 1 << 20))
    assert pl.view(tmp_path / "new" / "spool" / "uploads") is not None, "uploads/ was lost"
    assert pl.view(saved.path) == b"email\na@example.org\n"
