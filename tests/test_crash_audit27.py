"""Crash safety audited again (crash27), from outside: the real ``fastsend``
command killed -9, fastsend's own sink and its log, the event log.

- A ``fastsend send --route ...`` killed -9 left its campaign's mail in the
  spool; a ``serve`` started on that spool delivered it by serve's own routes
  (its MX, its source IPs), not the send's. It now sets such a campaign aside
  (paused, saying the ``fastsend resume`` that continues it with the send's
  recorded options), and ``resume`` takes it back.
- A whole-process kill (the supervisor and its workers at once: the OOM
  killer, ``kill -9`` of the group, a container stopped) counted every message
  in flight an attempt of unknown outcome at the next start (1,176 of a
  1,200-message send killed after 88 were received; 48 had been written): the
  workers' write logs (crash26's ``WriteLog``) were anonymous memory and died
  with them. They are files in the spool now (``SPOOL/writes``), and
  ``Spool.recover`` counts only what they name; mail they do not goes back
  with no attempt, unless the logs cannot be trusted (another boot, a log
  that went round): then all, as before.
- A site that deferred (4xx) and then took mail again left its deferred mail
  waiting each message's own backoff (up to ``max_backoff``, an hour more
  after a short outage). A delivery after a run of deferrals now brings the
  domain's deferred mail forward, spaced at the site's rate (SQLite).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tests._engine_helpers import (
    received_counts,
    run_fastsend,
    run_killed_when,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)
from tests._mounts import mounted
from tests._serve_helpers import Served

from fastsend.ring import WRITE_LOG_RUN, WriteLog, reset_write_logs
from fastsend.sink import SinkProcess
from fastsend.spool import DEFERRED, Result, open_spool


def test_serve_sets_aside_a_killed_sends_campaign_and_resume_sends_it_by_its_route(
    tmp_path: Path,
) -> None:
    """A send routed to sink A is killed -9 (supervisor and workers) once A took
    a few of its 60 messages; serve, routed to sink B, starts on its spool: it
    says the campaign is set aside and B gets none of it; ``fastsend resume``
    (no options: the send's recorded ones) delivers the rest to A. Before,
    serve delivered the rest to B."""
    n = 60
    addrs = [f"user{i}@d.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = tmp_path / "spool"
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with SinkProcess("--log", str(log_a), "--latency-ms", "100") as a, \
            SinkProcess("--log", str(log_b)) as b:  # fmt: skip
        (ha, pa), (hb, pb) = a.addresses[0], b.addresses[0]
        run_killed_when(
            ["send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
             "--route", f"*={ha}:{pa}", "--retry", "1,5,3600", "--workers", "1",
             "--no-progress"],
            lambda: len(sink_log(log_a)) >= 3,
        )  # fmt: skip
        assert len(received_counts(log_a)) < n
        srv = Served(tmp_path, f"{hb}:{pb}")
        try:
            srv.wait_line("set aside")
        finally:
            srv.stop()
        said = "".join(srv.lines)
        assert f"--route '*={ha}:{pa}'" in said and "fastsend resume --spool" in said, said
        assert not sink_log(log_b)
        proc = run_fastsend("resume", "--spool", str(spool), "--json", "--no-progress",
                            "--max-wait", "60")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "set aside by serve, is active again" in proc.stderr
        s = summary(proc)
        assert s["deferred"] == 0 and s["bounced"] == 0, s
    assert set(received_counts(log_a)) == set(addrs)
    assert not sink_log(log_b)


def _unknown(spool: Path) -> list[str]:
    """The recipients of the events saying "outcome unknown"."""
    return [json.loads(line)["rcpt"] for line in (spool / "events.jsonl").read_text().splitlines()
            if "outcome unknown" in line]  # fmt: skip


def test_a_whole_send_killed_counts_unknown_only_what_its_workers_had_written(
    tmp_path: Path,
) -> None:
    """1,200 messages to one site, one worker, 2 connections of pipelined
    groups of 4 (the sink answers each write after 30 ms): the send is killed
    -9 whole (supervisor and worker at once) once the sink took 40; ``resume``
    delivers the rest. What counts unknown is at most what was on the wire,
    each one attempt more, and every message the sink got twice is one of
    them. Before: every message in flight (1,176) counted unknown."""
    n, conns, group = 1200, 2, 4
    addrs = [f"user{i}@d.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    conf = tmp_path / "fastsend.toml"
    conf.write_text(f"[delivery]\nmax_connections = {conns}\npipeline = {group}\n")
    spool = tmp_path / "spool"
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "30") as sink:
        host, port = sink.addresses[0]
        run_killed_when(
            ["send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
             "-c", str(conf), "--route", f"*={host}:{port}", "--workers", "1", "--no-progress"],
            lambda: len(sink_log(log)) >= 40,
        )  # fmt: skip
        proc = run_fastsend("resume", "--spool", str(spool), "--json", "--no-progress",
                            "--max-wait", "60")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    got = received_counts(log)
    assert set(got) == set(addrs) and s["deferred"] == 0, s
    unknown = _unknown(spool)
    assert len(unknown) <= 3 * conns * group * 4, len(unknown)  # (measured: 48)
    twice = {a for a, k in got.items() if k > 1}
    assert twice <= set(unknown), sorted(twice - set(unknown))[:10]


@pytest.mark.parametrize("logs", ["kept", "another boot", "went round", "none"])
def test_recover_counts_unknown_what_the_write_logs_name_or_all_when_unsure(
    tmp_path: Path, logs: str
) -> None:
    """10 messages in flight when their process died, 3 named by a worker's
    write log: those 3 count an attempt of unknown outcome, the other 7 go
    back as they were (no attempt). Logs of another boot (a power loss may
    have lost their pages), one that went round (its oldest ids lost), or
    none at all (a version that kept none): all 10 count, as before."""
    sp = open_spool(str(tmp_path / "spool"))
    cid = sp.create_campaign({"from": "a@b.example"})
    now = time.time()
    sp.add_messages(cid, [(f"u{i}@d.example", "d.example", b"{}") for i in range(10)], now - 1)
    ids = [c.id for c in sp.claim_due(now, 10)]
    assert len(ids) == 10
    where = sp.write_log_dir()
    assert where is not None
    if logs != "none":
        reset_write_logs(where)
        w = WriteLog(4, path=f"{where}/1.log")
        w.mark(ids[:3])
        if logs == "went round":
            w.mark([ids[3]] * 2)
        w.close()
    if logs == "another boot":
        (Path(where) / WRITE_LOG_RUN).write_text("0f6b1c52-0000-4000-8000-000000000000")
    sp.close()
    again = open_spool(str(tmp_path / "spool"))
    unknown = again.recover()
    c = again.counts()
    if logs == "kept":
        assert unknown == 3 and (c["queued"], c["deferred"]) == (7, 3), c
        assert {t.id for t in again.taken_back()} == set(ids[:3])
    else:
        assert unknown == 10 and c["deferred"] == 10, c
    assert c["inflight"] == 0
    assert again.recover() == 0  # (its own logs since: none, nothing in flight)
    again.close()


def test_write_logs_without_room_on_their_disk_are_memory_and_trusted_by_no_one(
    tmp_path: Path,
) -> None:
    """A spool on a disk without room for its workers' write logs (2 MiB each:
    a 1 MiB tmpfs): a log is refused when it is made (its blocks are taken
    then: a page first written on a full disk would have killed the worker,
    SIGBUS) and leaves no file; ``send`` says so, delivers with logs in
    memory, and leaves no ``run`` note (a kill -9 then counts all unknown)."""
    disk = tmp_path / "disk"
    with mounted(disk, "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        with pytest.raises(OSError):
            WriteLog(path=str(disk / "1.log"))
        assert not (disk / "1.log").exists()
        spool = disk / "spool"
        camp = write_campaign(tmp_path)
        rcpts = write_recipients(tmp_path, [f"u{i}@d.example" for i in range(5)])
        log = tmp_path / "sink.jsonl"
        with SinkProcess("--log", str(log)) as sink:
            host, port = sink.addresses[0]
            proc = run_fastsend(
                "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
                "--route", f"*={host}:{port}", "--json", "--no-progress", "--workers", "1",
            )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert summary(proc)["delivered"] == 5
        assert "write log cannot be kept" in proc.stderr
        assert not (spool / "writes" / WRITE_LOG_RUN).exists()
        assert not list((spool / "writes").glob("*.log"))


def test_a_site_that_takes_mail_again_gets_its_deferred_mail_at_once(tmp_path: Path) -> None:
    """20 messages of an earlier run to d.example wait, deferred by the site
    (451 4.7.1) 1,000 s ago, due in an hour, and 5 deferred for their full
    mailboxes (4.2.2); a send to the same site is deferred 3 times in a row
    (``defer3-``) then delivered: the 20 are brought forward and delivered in
    the same run, in well under the hour; the 5 still wait their own backoff
    (a mailbox's deferral, not the site's). Before: the send ended with the
    20 still deferred (``--max-wait``)."""
    spool = tmp_path / "spool"
    sp = open_spool(str(spool))
    cid = sp.create_campaign({"from": "news@sender.example.com", "subject": "Earlier",
                              "text": "Hello\n"})  # fmt: skip
    now = time.time()
    sp.add_messages(cid, [(f"old{i}@d.example", "d.example", b"{}") for i in range(20)], now - 2000)
    sp.add_messages(cid, [(f"full{i}@d.example", "d.example", b"{}") for i in range(5)], now - 2000)
    claimed = sp.claim_due(now, 100)
    sp.record_results(
        [Result(c.id, DEFERRED, 1, now + 3600, 451, "4.7.1", "451 4.7.1 busy")
         if c.rcpt.startswith("old") else
         Result(c.id, DEFERRED, 1, now + 3600, 452, "4.2.2", "452 4.2.2 mailbox full")
         for c in claimed],
        now - 1000,
    )  # fmt: skip
    sp.close()
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["defer3-a@d.example"])
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
            "--route", f"*={host}:{port}", "--retry", "0.5,600,86400", "--max-wait", "20",
            "--json", "--no-progress", "--workers", "1",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = received_counts(log)
    assert set(got) == {"defer3-a@d.example", *(f"old{i}@d.example" for i in range(20))}, got
    recovered = [json.loads(line) for line in (spool / "shaping.jsonl").read_text().splitlines()
                 if "site_recovered" in line]  # fmt: skip
    assert [(e["site"], e["brought_forward"]) for e in recovered] == [("d.example", 20)]
