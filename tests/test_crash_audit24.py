"""Crash safety and the first hour, audited from outside (crash24): the real
``fastsend`` command, fastsend's own sink and its log, a real redis-server.

- ``send --route`` (or ``-c`` with ``[routes]``) killed -9 says no resume command;
  ``fastsend resume --spool DIR``, as README says, then delivered what was left by
  MX instead of the route: 2,012 of 20,000 recipients of a routed test campaign
  bounced 5.1.2 and were suppressed for good, the rest deferred on DNS. ``send``
  now records the options that say where its mail goes with its campaign, and
  ``resume`` given none of them takes them back (and says so); campaigns still
  pending that were sent with different options make it ask (exit 2).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests._engine_helpers import (
    _env,
    fastsend_cmd,
    received_counts,
    run_fastsend,
    run_killed,
    summary,
    write_campaign,
    write_recipients,
)
from tests._serve_helpers import until

from fastsend.sink import SinkProcess


def test_resume_after_a_kill_delivers_by_the_route_send_was_given(
    spool_url: str, tmp_path: Path
) -> None:
    """``send --route '*=SINK'`` of 6,000 rows is killed -9 once its list's 2nd
    batch is committed; ``resume --spool`` alone delivers every recipient to the
    sink (none bounced by an MX lookup of the test domains), says whose options
    it took, and each address reaches the sink (a re-send only of what was in
    flight at the kill)."""
    n = 6000
    addrs = [f"user{i}@d{i % 7}.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        route = f"*={host}:{port}"
        run_killed(
            "ingest-kill-after-commit:2", "send", str(camp), "-r", str(rcpts), "--no-dkim",
            "--spool", spool_url, "--route", route, "--retry", "1,5,3600", "--workers", "2",
            "--json", "--no-progress",
        )  # fmt: skip
        res = run_fastsend(
            "resume", "--spool", spool_url, "--json", "--no-progress", "--max-wait", "10",
            timeout=300,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = summary(res)
    assert (out["bounced"], out["deferred"]) == (0, 0), res.stderr[-3000:]
    assert f"resuming campaign 1 with the options its send was given: --route '{route}'" in (
        res.stderr
    )
    got = received_counts(log)
    assert set(got) == set(addrs)


def test_resume_takes_a_recorded_config_and_asks_when_pending_runs_differ(
    tmp_path: Path,
) -> None:
    """Campaign 1 sent with ``-c`` (its ``[routes]`` to sink A), campaign 2 with
    ``--route`` to sink B, each left deferred: ``resume`` with no option cannot
    tell which to use and says both (exit 2, nothing sent); once campaign 2 is
    cancelled it resumes campaign 1 with its config, to sink A; explicit options
    are used as given."""
    spool = str(tmp_path / "spool")
    camp = write_campaign(tmp_path)
    a_log, b_log = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with SinkProcess("--log", str(a_log)) as a, SinkProcess("--log", str(b_log)) as b:
        conf = tmp_path / "fastsend.toml"
        conf.write_text(f'[routes]\n"*" = "{a.addresses[0][0]}:{a.addresses[0][1]}"\n')
        common = ["--no-dkim", "--spool", spool, "--retry", "4,4,3600", "--max-wait", "0",
                  "--json", "--no-progress", "--workers", "1"]  # fmt: skip
        one = write_recipients(tmp_path, ["defer1-one@a.example"], name="one.csv")
        two = write_recipients(tmp_path, ["defer1-two@b.example"], name="two.csv")
        r1 = run_fastsend("send", str(camp), "-r", str(one), "-c", str(conf), *common)
        route_b = f"*={b.addresses[0][0]}:{b.addresses[0][1]}"
        r2 = run_fastsend("send", str(camp), "-r", str(two), "--route", route_b, *common)
        assert [summary(r)["deferred"] for r in (r1, r2)] == [1, 1], r1.stderr + r2.stderr
        res = run_fastsend("resume", "--spool", spool, "--json", "--no-progress")
        assert res.returncode == 2, res.stderr
        assert f"campaign 1: -c {conf}" in res.stderr
        assert f"campaign 2: --route '{route_b}'" in res.stderr
        assert not res.stdout
        cancel = run_fastsend("campaign", "cancel", "2", "--spool", spool)
        assert cancel.returncode == 0, cancel.stderr
        res = run_fastsend("resume", "--spool", spool, "--json", "--no-progress")
        assert res.returncode == 0, res.stderr
        assert summary(res)["delivered"] == 1
        assert f"resuming campaign 1 with the options its send was given: -c {conf}" in (
            res.stderr
        )
        # Explicit options are the operator's choice: no recorded ones taken.
        three = write_recipients(tmp_path, ["defer1-three@c.example"], name="three.csv")
        r3 = run_fastsend("send", str(camp), "-r", str(three), "--route", route_b, *common)
        assert summary(r3)["deferred"] == 1
        res = run_fastsend(
            "resume", "--spool", spool, "-c", str(conf), "--retry", "1,1,60", "--json",
            "--no-progress",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "options its send was given" not in res.stderr
    # (the sinks' logs are whole once they stopped)
    assert set(received_counts(a_log)) == {"defer1-one@a.example", "defer1-three@c.example"}
    assert not received_counts(b_log)


def test_an_event_log_whose_last_line_was_cut_short_starts_the_next_event_on_a_line(
    tmp_path: Path,
) -> None:
    """A process that died mid-line (a full disk took part of a write, then it
    ended; a power loss) leaves the event log without its last line feed. The next
    opener ends that fragment first: its own events are whole lines, and a catch-up
    (``read_back``) from a mark before them reads them. Before, the next run's first
    event was appended to the fragment: one line no reader parses, that event lost
    (a ``send`` on such a spool: its campaign's first "accepted")."""
    import orjson

    from fastsend.events import EventLog, read_back

    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event":"delivered","id":1}\n{"time":1796630079.5,"event":"deliv')
    log = EventLog(str(path))
    before = log.mark()
    log.emit({"event": "accepted", "id": 2, "rcpt": "a@x.example"})
    log.emit({"event": "accepted", "id": 3, "rcpt": "b@x.example"})
    after = log.mark()
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"time":1796630079.5,"event":"deliv' and lines[-1] == b""
    assert [orjson.loads(x)["id"] for x in (lines[0], *lines[2:-1])] == [1, 2, 3]
    assert before is not None and after is not None
    got = [e["id"] for batch in read_back(str(path), before, after) for e in batch]
    assert got == [2, 3]
    # A whole log gains nothing; a second opener of the mended one neither.
    size = path.stat().st_size
    EventLog(str(path)).close()
    assert path.stat().st_size == size


def test_resume_refuses_recorded_source_ips_that_are_not_this_machines(tmp_path: Path) -> None:
    """A shared spool's other node (here: the recorded run edited to name an
    address of another machine) resumed with no option: the recorded source IP is
    refused before anything is claimed, exit 2, saying whose options they were and
    what to give instead."""
    import sqlite3

    import orjson

    spool = str(tmp_path / "spool")
    camp = write_campaign(tmp_path)
    one = write_recipients(tmp_path, ["defer1-one@a.example"])
    with SinkProcess() as sink:
        host, port = sink.addresses[0]
        r = run_fastsend(
            "send", str(camp), "-r", str(one), "--no-dkim", "--spool", spool, "--route",
            f"*={host}:{port}", "--source-ip", "127.0.0.2", "--retry", "60,60,3600",
            "--max-wait", "0", "--json", "--no-progress", "--workers", "1",
        )  # fmt: skip
    assert summary(r)["deferred"] == 1, r.stderr
    db = sqlite3.connect(os.path.join(spool, "spool.db"))
    (raw,) = db.execute("SELECT options FROM campaigns WHERE id = 1").fetchone()
    options = orjson.loads(raw)
    assert options["run"]["source_ip"] == "127.0.0.2"
    options["run"]["source_ip"] = "192.0.2.77"
    with db:
        db.execute("UPDATE campaigns SET options = ? WHERE id = 1", (orjson.dumps(options),))
    db.close()
    res = run_fastsend("resume", "--spool", spool, "--json", "--no-progress")
    assert res.returncode == 2, res.stderr
    assert "192.0.2.77" in res.stderr and "the options `send` was given for campaign 1" in (
        res.stderr
    )
    assert "give resume this machine's" in res.stderr and not res.stdout


def test_ctrl_c_of_send_waits_for_the_replies_on_the_wire_and_sends_nothing_twice(
    tmp_path: Path,
) -> None:
    """``send`` to a sink answering each command after 50 ms, stopped by SIGINT
    (Ctrl-C) mid-delivery: the workers give back what no connection has taken and
    wait (at most ``STOP_GRACE``) for the replies to what is past its end of data,
    so every message the sink took is recorded delivered, and ``resume`` sends the
    rest: each address reaches the sink once. Before, a stop now exited at once:
    each message whose 250 was a few milliseconds away counted an attempt of
    unknown outcome and was sent again (1,440 of 3,860 to a 5 ms sink)."""
    n = 4000
    addrs = [f"user{i}@d{i % 9}.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = str(tmp_path / "spool")
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--latency-ms", "50") as sink:
        host, port = sink.addresses[0]
        proc = subprocess.Popen(
            fastsend_cmd(
                "send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", spool,
                "--route", f"*={host}:{port}", "--workers", "1", "--json", "--no-progress",
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )  # fmt: skip
        try:
            until("300 messages at the sink, send running",
                  lambda: proc.poll() is not None or sum(received_counts(log).values()) >= 300,
                  120)  # fmt: skip
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err[-3000:]
        first = summary(subprocess.CompletedProcess([], 0, out, err))
        assert 0 < first["delivered"] < n, first
        events = Path(spool) / "events.jsonl"
        unknown = [line for line in events.read_text().splitlines() if "outcome unknown" in line]
        assert not unknown, unknown[:3]
        res = run_fastsend("resume", "--spool", spool, "--json", "--no-progress", timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    got = received_counts(log)
    assert set(got) == set(addrs)
    twice = sorted(a for a, k in got.items() if k > 1)
    assert not twice, (len(twice), twice[:5])


def test_a_spool_path_that_is_a_file_is_said_so(tmp_path: Path) -> None:
    """``--spool`` (or ``[spool] dir``) naming a file, not a directory: every command
    says so, exit 2, the file untouched. Before: "cannot be opened: [Errno 17] File
    exists" (send, serve), "no spool" (resume, queue)."""
    spot = tmp_path / "spoolfile"
    spot.write_text("not a spool\n")
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@x.example"])
    conf = tmp_path / "fastsend.toml"
    conf.write_text(f'[spool]\ndir = "{spot}"\n[api]\nlisten = "127.0.0.1:0"\n')
    for args in (
        ("send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spot), "--no-progress"),
        ("resume", "--spool", str(spot), "--no-progress"),
        ("queue", "--spool", str(spot)),
        ("campaign", "list", "--spool", str(spot)),
        ("serve", "-c", str(conf)),
    ):
        r = run_fastsend(*args, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert "not a directory: a file is there" in r.stderr, (args, r.stderr)
        assert "Errno" not in r.stderr, r.stderr
    assert spot.read_text() == "not a spool\n"


def test_send_run_again_after_a_kill_is_refused_and_resume_named(tmp_path: Path) -> None:
    """``send`` killed -9 mid-list, then the same ``send`` again (a job runner's
    retry, a shell's history): refused, exit 2, naming the campaign and `resume`,
    nothing spooled; ``resume`` delivers each address once; once that campaign is
    done the same command sends it anew (a new campaign). Before: the retry spooled
    the whole list as a second campaign and every recipient the first had
    delivered got the mail twice."""
    n = 5000
    addrs = [f"user{i}@d{i % 7}.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    spool = str(tmp_path / "spool")
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        cmd = ["send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", spool, "--route",
               f"*={host}:{port}", "--workers", "1", "--json", "--no-progress"]  # fmt: skip
        run_killed("ingest-kill-after-commit:2", *cmd)
        again = run_fastsend(*cmd)
        assert again.returncode == 2, again.stderr[-2000:]
        assert "was sent with this campaign before" in again.stderr, again.stderr
        assert "campaign 1 'campaign.toml'" in again.stderr and "`fastsend resume`" in again.stderr
        listed = run_fastsend("campaign", "list", "--spool", spool)
        assert "campaign.toml" in listed.stdout and not any(
            line.lstrip().startswith("2 ") for line in listed.stdout.splitlines()
        ), listed.stdout
        res = run_fastsend("resume", "--spool", spool, "--json", "--no-progress", timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert summary(res)["delivered"] == n
        anew = run_fastsend(*cmd, timeout=300)
        assert anew.returncode == 0, anew.stderr[-2000:]
        assert summary(anew)["campaign"] == 2 and summary(anew)["delivered"] == n
    got = received_counts(log)  # (whole once the sink stopped)
    assert set(got) == set(addrs) and min(got.values()) >= 2
