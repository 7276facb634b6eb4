"""The sending engine end to end: `fastsend send` (supervisor, forked uvloop
workers, shared-memory rings, SQLite spool) delivering to a real SMTP sink."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
from tests._engine_helpers import (
    received_counts,
    run_fastsend,
    send_via,
    sink_log,
    summary,
    write_campaign,
    write_recipients,
)

from fastsend.sink import SinkProcess

IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


def test_20000_recipients_exactly_once_from_every_source_ip(tmp_path: Path) -> None:
    n = 20000
    addrs = [f"user{i}@d{i % 7}.example.net" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        proc = send_via(
            camp,
            rcpts,
            (host, port),
            tmp_path / "spool",
            "--source-ip",
            ",".join(IPS),
            "--workers",
            "2",
            "--no-dkim",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert s["delivered"] == n and s["deferred"] == 0 and s["bounced"] == 0
    got = received_counts(log)
    assert len(got) == n and set(got) == set(addrs)
    assert max(got.values()) == 1, "a recipient was delivered twice in a clean run"
    peers = {rec["peer"] for rec in sink_log(log)}
    assert peers == set(IPS)
    # The event log has one "accepted" line per recipient (fastsend.accept), then
    # one line per attempt, with source IP and MX host.
    lines = [
        orjson.loads(x) for x in (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()
    ]
    accepted = [e for e in lines if e["event"] == "accepted"]
    assert len(accepted) == n and {e["rcpt"] for e in accepted} == set(got)
    assert all(e["tenant"] == "default" for e in accepted)
    events = [e for e in lines if e["event"] != "accepted"]
    assert len(events) == n
    e = events[0]
    assert e["event"] == "delivered" and e["source_ip"] in IPS and e["mx"] == f"{host}:{port}"
    assert e["code"] == 250 and e["attempt"] == 1 and e["rcpt"] in got
    # The personalised bodies arrived: one message per recipient.
    db = sqlite3.connect(tmp_path / "spool" / "spool.db")
    assert db.execute("SELECT COUNT(*) FROM messages WHERE state=3").fetchone()[0] == n


def test_faults_retry_defer_expire_and_bounce(tmp_path: Path) -> None:
    addrs = [
        "ok1@example.net",
        "ok2@example.net",
        "defer2-a@example.net",  # 451 twice, then accepted
        "tempfail-b@example.net",  # 451 forever -> expires
        "permfail-c@example.net",  # 550 -> bounced, never retried
    ]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    log = tmp_path / "sink.jsonl"
    spool = tmp_path / "spool"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        proc = send_via(
            camp,
            rcpts,
            (host, port),
            spool,
            "--source-ip",
            "127.0.0.2",
            "--workers",
            "1",
            "--retry",
            # (max age counts from the spooling, before the worker has started: at a
            # loaded host's ~8 s start 2.5 s and then 8 s left defer2-a's third try
            # past it, and it expired; tempfail-b's expiry waits for it, ~20 s)
            "0.2,0.4,20",
            "--max-wait",
            "5",
            "--no-dkim",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"], s["expired"], s["deferred"]) == (3, 1, 1, 0)
    got = received_counts(log)
    assert got == {"ok1@example.net": 1, "ok2@example.net": 1, "defer2-a@example.net": 1}
    events = [orjson.loads(x) for x in (spool / "events.jsonl").read_bytes().splitlines()]
    by: dict[str, list[dict[str, object]]] = {}
    for e in events:
        if e["event"] != "accepted":
            by.setdefault(str(e["rcpt"]), []).append(e)
    d = by["defer2-a@example.net"]
    assert [e["event"] for e in d] == ["deferred", "deferred", "delivered"]
    assert [e["attempt"] for e in d] == [1, 2, 3]
    assert d[0]["code"] == 451
    # Retries wait at least the backoff (0.2 s, then 0.4 s, minus 20% jitter).
    assert float(d[1]["time"]) - float(d[0]["time"]) >= 0.15  # type: ignore[arg-type]
    t = by["tempfail-b@example.net"]
    assert t[-1]["event"] == "expired" and all(e["event"] == "deferred" for e in t[:-1])
    assert len(t) >= 3
    p = by["permfail-c@example.net"]
    assert [e["event"] for e in p] == ["bounced"] and p[0]["enhanced"].startswith("5.")  # type: ignore[union-attr]


def test_bad_input_is_reported_with_line_numbers_and_good_rows_sent(tmp_path: Path) -> None:
    camp = write_campaign(tmp_path)
    rcpts = tmp_path / "r.csv"
    rcpts.write_text("email,name\ngood@example.net,A\nnot-an-address,B\nalso@example.net,C\n")
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        common = [
            "--route",
            f"*={host}:{port}",
            "--workers",
            "1",
            "--json",
            "--no-dkim",
            "--no-progress",
        ]
        strict = run_fastsend(
            "send",
            str(camp),
            "-r",
            str(rcpts),
            "--strict",
            "--spool",
            str(tmp_path / "s1"),
            *common,
        )
        lax = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "--spool", str(tmp_path / "s2"), *common
        )
        missing = run_fastsend(
            "send",
            str(camp),
            "-r",
            str(tmp_path / "nope.csv"),
            "--spool",
            str(tmp_path / "s3"),
            *common,
        )
        nocamp = run_fastsend(
            "send",
            str(tmp_path / "nope.toml"),
            "-r",
            str(rcpts),
            "--spool",
            str(tmp_path / "s4"),
            *common,
        )
    assert (
        strict.returncode == 1 and "line 3" in strict.stderr and "nothing was sent" in strict.stderr
    )
    assert lax.returncode == 1 and "line 3" in lax.stderr
    assert summary(lax)["delivered"] == 2
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert nocamp.returncode == 2 and "No such file" in nocamp.stderr
    assert set(received_counts(log)) == {"good@example.net", "also@example.net"}


def test_missing_variable_is_an_error_before_sending(tmp_path: Path) -> None:
    camp = write_campaign(
        tmp_path, 'from = "a@sender.example.com"\nsubject = "{{ plan }}"\ntext = "x"\n'
    )
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    proc = run_fastsend(
        "send",
        str(camp),
        "-r",
        str(rcpts),
        "--route",
        "*=127.0.0.1:9",
        "--spool",
        str(tmp_path / "s"),
        "--no-dkim",
        "--json",
    )
    assert proc.returncode == 2 and "plan" in proc.stderr


def test_refuses_a_from_domain_without_dkim_unless_no_dkim(tmp_path: Path) -> None:
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.net"])
    proc = run_fastsend(
        "send",
        str(camp),
        "-r",
        str(rcpts),
        "--route",
        "*=127.0.0.1:9",
        "--spool",
        str(tmp_path / "s"),
        "--json",
    )
    assert proc.returncode == 2 and "DKIM" in proc.stderr and "--no-dkim" in proc.stderr


def test_queue_shows_shape_and_states(tmp_path: Path) -> None:
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"t{i}@slow.example.org" for i in range(5)])
    # Nothing listens on port 9: every attempt is deferred, the queue keeps them.
    proc = run_fastsend(
        "send",
        str(camp),
        "-r",
        str(rcpts),
        "--route",
        "*=127.0.0.1:9",
        "--spool",
        str(tmp_path / "s"),
        "--workers",
        "1",
        "--max-wait",
        "1",
        "--json",
        "--no-dkim",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["deferred"] == 5
    q = run_fastsend("queue", "--spool", str(tmp_path / "s"), "--json")
    assert q.returncode == 0, q.stderr
    shape = orjson.loads(q.stdout)
    assert shape["states"]["deferred"] == 5
    assert sum(shape["domains"]["slow.example.org"]) == 5
    text = run_fastsend("queue", "--spool", str(tmp_path / "s"))
    assert "slow.example.org" in text.stdout and "TOTAL" in text.stdout


def test_a_long_list_is_spooled_while_delivery_runs(tmp_path: Path) -> None:
    """Rows past the first chunk are spooled while the first is delivered; a bad
    row there is still reported with its line number, and every good row is sent."""
    n = 5000
    addrs = [f"user{i}@example.net" for i in range(n)]
    rcpts = write_recipients(tmp_path, addrs)
    lines = rcpts.read_text().splitlines()
    lines.insert(4500, "broken-row-without-at,X")  # becomes line 4501
    rcpts.write_text("\n".join(lines) + "\n")
    camp = write_campaign(tmp_path)
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        host, port = sink.addresses[0]
        proc = send_via(camp, rcpts, (host, port), tmp_path / "spool", "--workers", "2", "--no-dkim")  # fmt: skip
    assert proc.returncode == 1 and "line 4501" in proc.stderr
    s = summary(proc)
    assert s["delivered"] == n and s["rejected_rows"] == 1
    got = received_counts(log)
    assert set(got) == set(addrs) and max(got.values()) == 1
