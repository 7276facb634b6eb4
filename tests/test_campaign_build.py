"""A campaign whose own headers can never be written is refused, not retried.

A header name over the line limit (or any static header the writer refuses)
passed the accept checks; once spooled, every message was deferred as a
"local error" at each attempt until it expired, days later. It is now refused
before anything is spooled (``send`` exits non-zero naming it), and one
already spooled (accepted by an older version) fails its mail at once, 5.6.0.

Real parts: the ``fastsend send`` and ``resume`` binaries, a SQLite spool,
fastsend's sink.
"""

from __future__ import annotations

from pathlib import Path

from tests._engine_helpers import run_fastsend, summary

from fastsend.accept import Acceptor
from fastsend.events import EventLog
from fastsend.sink import SinkProcess
from fastsend.spool import open_spool

LONG = "X-" + "a" * 995  # a header name no line can hold


def _campaign(tmp: Path) -> Path:
    p = tmp / "campaign.toml"
    p.write_text(
        'from = "News <news@example.com>"\nsubject = "Hi {{ name }}"\ntext = "Hello {{ name }}"\n'
        f'[headers]\n"{LONG}" = "v"\n'
    )
    return p


def test_a_campaign_whose_header_cannot_be_written_is_refused_before_spooling(
    tmp_path: Path,
) -> None:
    rcpts = tmp_path / "r.csv"
    rcpts.write_text("email,name\na@example.net,A\n")
    spool = tmp_path / "spool"
    res = run_fastsend("send", str(_campaign(tmp_path)), "-r", str(rcpts), "--no-dkim",
                       "--spool", str(spool), "--route", "*=127.0.0.1:9", "--json")  # fmt: skip
    assert res.returncode != 0
    assert "the campaign cannot be built" in res.stderr and "X-aaa" in res.stderr, res.stderr
    assert not (spool / "spool.db").exists() or not open_spool(str(spool)).list_campaigns()


def test_one_already_spooled_fails_its_mail_at_once_not_deferred_until_it_expires(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    s = open_spool(str(spool))
    acceptor = Acceptor(s, EventLog(str(spool / "events.jsonl")), None)
    spec = {"from": "news@example.com", "subject": "s", "text": "t", "headers": {LONG: "v"}}
    cid = acceptor.create_campaign(spec, name="old")  # as an older version took it
    acceptor.accept(cid, [("a@example.net", "example.net", b"{}"), ("b@example.net", "example.net", b"{}")])
    s.close()
    with SinkProcess() as sink:
        res = run_fastsend("resume", "--spool", str(spool), "--route",
                           f"*={sink.host}:{sink.port}", "--workers", "1", "--json",
                           "--no-progress", "--max-wait", "5")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = summary(res)
    assert out["bounced"] == 2 and out["deferred"] == 0 and out["delivered"] == 0, out
    counts = open_spool(str(spool)).counts(cid)
    assert counts["bounced"] == 2, counts


def test_a_list_refused_before_any_row_leaves_no_active_campaign(tmp_path: Path) -> None:
    """``send`` whose list is refused when it is first read (a quote never
    closed, the rest of the file one field) left an empty campaign "active" in
    the spool, listed by ``fastsend queue`` for good: it is abandoned."""
    camp = tmp_path / "campaign.toml"
    camp.write_text('from = "news@example.com"\nsubject = "Hi"\ntext = "Hello"\n')
    rcpts = tmp_path / "r.csv"
    rcpts.write_text('email,name\na@example.net,"A\n' + "x" * 200_000 + "\n")
    spool = tmp_path / "spool"
    res = run_fastsend("send", str(camp), "-r", str(rcpts), "--no-dkim", "--spool", str(spool),
                       "--route", "*=127.0.0.1:9", "--json")  # fmt: skip
    assert res.returncode != 0 and "line 2" in res.stderr, res.stderr[-2000:]
    s = open_spool(str(spool))
    assert [c.status for c in s.list_campaigns()] in ([], ["abandoned"])
    q = run_fastsend("queue", "--spool", str(spool))
    assert "active" not in q.stdout, q.stdout
