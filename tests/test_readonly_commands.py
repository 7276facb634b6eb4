"""The operator's read-only commands on a spool nothing can write (a snapshot,
a mount made read-only after a disk error, a directory of another user), and
the write commands there: real ``fastsend`` processes on a read-only bind mount
of a spool that the project's own stores made.

- ``suppress list``/``export``, ``apikey list``, ``tls-report show`` and ``top``
  read what is there (exit 0). Before: "cannot open suppression list: unable to
  open database file", "the disk cannot be opened or created" (exit 2) for each:
  they opened their SQLite files for writing, and a read-only open of a WAL file
  needs a -shm index that nothing could make there.
- ``suppress add``/``remove``/``import``, ``apikey create``/``revoke``,
  ``campaign pause`` and ``tls-report send`` refuse with one line naming the
  read-only file (exit 2), and nothing changes.
- A view of a spool whose path holds ``#`` or ``%`` (``queue``, ``campaign
  list``, ``top``): read-only opens went through a ``file:`` URI without
  quoting, and SQLite took ``#1`` as a fragment ("cannot be opened or created").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from tests._engine_helpers import run_fastsend
from tests._mounts import mounted

from fastsend.analytics.store import SQLiteRollupStore
from fastsend.analytics.tlsrpt import Store as TLSStore
from fastsend.analytics.tlsrpt import day_of
from fastsend.spool import open_spool
from fastsend.sqlitedb import ReadOnlyDatabase, connect


def _make_spool(where: Path) -> str:
    """A spool with one campaign, its (empty) rollups, a suppressed address, an API key and a day
    of TLS-RPT counts, made by the project's own code and CLI (every file
    closed: no write-ahead log left, as after a clean stop). The key's id."""
    spool = open_spool(str(where))
    try:
        spool.create_campaign({"from": "a@example.com"}, name="spring")
    finally:
        spool.close()
    added = run_fastsend("suppress", "add", "gone@example.net", "--spool", str(where))
    assert added.returncode == 0, added.stderr
    made = run_fastsend("apikey", "create", "--tenant", "acme", "--spool", str(where))
    assert made.returncode == 0, made.stderr
    SQLiteRollupStore(str(where)).close()  # (what send and serve count into: top's)
    store = TLSStore(str(where))
    try:
        sts = {"policy_type": "sts", "policy_domain": "mail.example.org",
               "mx_host": ["mx.example.org"], "policy": ["version: STSv1", "mode: enforce"]}
        store.listener([
            {"event": "tls_sessions", "time": time.time(), "count": 3, **sts},
            {"event": "tls_report", "time": time.time(), "result": "certificate-expired",
             "source_ip": "192.0.2.1", "mx": "mx.example.org", "receiving_ip": "198.51.100.7",
             "text": "certificate has expired", **sts},
        ])  # fmt: skip
    finally:
        store.close()
    return made.stdout.strip().split("_")[1]


def _digests(where: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(where.iterdir())
        if p.is_file()
    }


def test_read_commands_read_and_write_commands_refuse_on_a_read_only_spool(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    kid = _make_spool(spool)
    before = _digests(spool)
    ro = tmp_path / "ro"
    today = day_of(time.time())
    with mounted(ro, "--bind", str(spool), read_only=True):
        assert not (ro / "suppression.db-shm").exists()  # (what made the old opens fail)
        listed = run_fastsend("suppress", "list", "--spool", str(ro), "--json")
        exported = run_fastsend("suppress", "export", "--spool", str(ro))
        keys = run_fastsend("apikey", "list", "--spool", str(ro), "--json")
        shown = run_fastsend("tls-report", "show", "--spool", str(ro), "--day", today)
        top = run_fastsend("top", "--once", "--spool", str(ro))
        writes = [
            run_fastsend("suppress", "add", "x@example.net", "--spool", str(ro)),
            run_fastsend("suppress", "remove", "gone@example.net", "--spool", str(ro)),
            run_fastsend("apikey", "create", "--tenant", "acme", "--spool", str(ro)),
            run_fastsend("apikey", "revoke", kid, "--spool", str(ro)),
            run_fastsend("campaign", "pause", "1", "--spool", str(ro)),
            run_fastsend("tls-report", "send", "--spool", str(ro)),
        ]
    for res in (listed, exported, keys, shown, top):
        assert res.returncode == 0, res.stderr
    assert [orjson.loads(x)["address"] for x in listed.stdout.splitlines()] == [
        "gone@example.net"
    ]
    assert "gone@example.net" in exported.stdout
    assert [(k["id"], k["tenant"]) for k in map(orjson.loads, keys.stdout.splitlines())] == [
        (kid, "acme")
    ]
    docs = orjson.loads(shown.stdout)
    assert [d["policies"][0]["summary"] for d in docs] == [
        {"total-successful-session-count": 3, "total-failure-session-count": 1}
    ]
    assert "BY CAMPAIGN" in top.stdout, top.stdout
    for res in writes:
        assert res.returncode == 2, (res.args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr, res.stderr
        assert "read-only" in res.stderr, (res.args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert _digests(spool) == before  # (nothing written: the bind's own files)


def test_a_view_of_a_spool_with_no_stores_yet_makes_none(tmp_path: Path) -> None:
    """``apikey list``/``suppress list`` on a spool with no key store or list yet
    answer empty and leave no file behind (``apikey list`` made an empty
    ``apikeys.db``)."""
    spool = tmp_path / "spool"
    open_spool(str(spool)).close()
    before = sorted(p.name for p in spool.iterdir())
    for cmd in (("apikey", "list"), ("suppress", "list"), ("suppress", "export")):
        res = run_fastsend(*cmd, "--spool", str(spool))
        assert res.returncode == 0, res.stderr
        assert "@" not in res.stdout
    assert sorted(p.name for p in spool.iterdir()) == before


@pytest.mark.parametrize("name", ["spool#1", "50%41", "a?mode=rwc"])
def test_views_of_a_spool_whose_path_holds_uri_characters(tmp_path: Path, name: str) -> None:
    spool = tmp_path / name
    s = open_spool(str(spool))
    try:
        s.create_campaign({"from": "a@example.com"}, name="spring")
    finally:
        s.close()
    for cmd in (("queue",), ("campaign", "list")):
        res = run_fastsend(*cmd, "--spool", str(spool))
        assert res.returncode == 0, res.stderr
        assert "spring" in res.stdout, res.stdout


def test_a_readonly_open_of_a_log_still_to_replay_is_refused_not_read_stale(
    tmp_path: Path,
) -> None:
    """A WAL file whose log holds commits (a crash, a copy taken while a writer
    ran) on a read-only mount: read as immutable it would show the file
    without them, so the open fails rather than answer stale."""
    d = tmp_path / "d"
    db = connect(str(d / "x.db"), schema="CREATE TABLE t(v);")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("INSERT INTO t VALUES (1)")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in d.iterdir():
        if not f.name.endswith("-shm"):
            (copy / f.name).write_bytes(f.read_bytes())
    db.close()
    assert os.path.getsize(copy / "x.db-wal") > 0
    ro = tmp_path / "ro"
    with mounted(ro, "--bind", str(copy), read_only=True):
        with pytest.raises(ReadOnlyDatabase, match="write-ahead log"):
            connect(str(ro / "x.db"), readonly=True)
        with pytest.raises(ReadOnlyDatabase, match="read-only file system"):
            connect(str(ro / "x.db"))


def _keygen(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_fastsend(
        "dkim", "keygen", "--domain", "example.com", "--selector", "s1", "--out", str(out), *extra
    )


def test_keygen_on_a_full_disk_writes_no_key_and_keeps_the_old_one(tmp_path: Path) -> None:
    """``dkim keygen`` onto a full disk: exit 75 (try again later, as every
    command's full disk), no file left; with ``--force`` over the key in use,
    that key is kept. Before: exit 1 and an empty ``k2.pem`` (the next keygen:
    "exists, use --force"; a campaign naming it: "holds no key"), and
    ``--force`` truncated the old key before writing the new one."""
    disk = tmp_path / "disk"
    with mounted(disk, "-t", "tmpfs", "-o", "size=12k", "tmpfs"):
        first = _keygen(disk / "k.pem")
        assert first.returncode == 0, first.stderr
        key = (disk / "k.pem").read_bytes()
        with contextlib.suppress(OSError), open(disk / "fill", "wb") as f:
            while True:
                f.write(b"\0" * 1024)
                f.flush()
        full = _keygen(disk / "k2.pem")
        forced = _keygen(disk / "k.pem", "--force")
        left = sorted(p.name for p in disk.iterdir())
        kept = (disk / "k.pem").read_bytes()
    assert full.returncode == 75, full.stderr
    assert "No space left" in full.stderr, full.stderr
    assert left == ["fill", "k.pem"]  # (no k2.pem, no temporary file)
    assert forced.returncode == 75, forced.stderr  # (no room for the new key beside it)
    assert kept == key


def test_keygen_refusing_to_overwrite_or_a_read_only_place_is_a_usage_error(
    tmp_path: Path,
) -> None:
    """A key file that exists (no ``--force``) and a directory on a read-only
    file system: nothing done, exit 2 (was 1, "it ran, but not all of it")."""
    out = tmp_path / "k.pem"
    assert _keygen(out).returncode == 0
    again = _keygen(out)
    assert again.returncode == 2 and "exists" in again.stderr, again.stderr
    ro = tmp_path / "ro"
    with mounted(ro, "--bind", str(tmp_path / "ro"), read_only=True):
        res = _keygen(ro / "k.pem")
    assert res.returncode == 2, res.stderr
    assert "Read-only file system" in res.stderr


def test_read_commands_work_against_a_redis_replica(tmp_path: Path) -> None:
    """A Redis spool looked at through a replica (read-only: a standby, a
    reporting copy): ``suppress list``/``export``, ``apikey list``, ``queue``,
    ``campaign list``, ``tls-report show`` and ``top`` read it (exit 0); the
    commands that write say it takes no writes (75, one line). Before:
    ``suppress list``/``export`` and ``top`` 75 "takes no writes", ``apikey
    list`` and ``queue`` a traceback (exit 1)."""
    import redis
    from tests._redis_helpers import start_redis

    with start_redis() as primary:
        url = primary.url(dir=str(tmp_path / "local"))
        spool = open_spool(url)
        try:
            spool.create_campaign({"from": "a@example.com"}, name="spring")
        finally:
            spool.close()
        assert run_fastsend("suppress", "add", "gone@example.net", "--spool", url).returncode == 0
        made = run_fastsend("apikey", "create", "--tenant", "acme", "--spool", url)
        assert made.returncode == 0, made.stderr
        kid = made.stdout.strip().split("_")[1]
        with start_redis("--replicaof", "127.0.0.1", str(primary.port)) as replica:
            r = redis.Redis(port=replica.port)
            keys = redis.Redis(port=primary.port).dbsize()
            deadline = time.monotonic() + 60
            while not (
                r.info("replication").get("master_link_status") == "up" and r.dbsize() == keys
            ):
                assert time.monotonic() < deadline, r.info("replication")
                time.sleep(0.05)
            view = url.replace(f":{primary.port}/", f":{replica.port}/")
            reads = {
                cmd: run_fastsend(*cmd.split(), "--spool", view)
                for cmd in ("suppress list", "suppress export", "apikey list", "queue",
                            "campaign list", "tls-report show", "top --once")
            }  # fmt: skip
            writes = [
                run_fastsend("suppress", "add", "x@example.net", "--spool", view),
                run_fastsend("apikey", "create", "--tenant", "acme", "--spool", view),
                run_fastsend("apikey", "revoke", kid, "--spool", view),
                run_fastsend("campaign", "pause", "1", "--spool", view),
            ]
    for cmd, res in reads.items():
        assert res.returncode == 0, (cmd, res.stderr)
    assert "gone@example.net" in reads["suppress list"].stdout
    assert "gone@example.net" in reads["suppress export"].stdout
    assert kid in reads["apikey list"].stdout
    assert "spring" in reads["queue"].stdout and "spring" in reads["campaign list"].stdout
    for res in writes:
        assert res.returncode == 75, (res.args, res.stderr)
        assert "takes no writes" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
