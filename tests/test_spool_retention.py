"""Retention of final messages in the spool (issue 14 leftovers, aud15r).

Before: no row was ever deleted; a spool sending a million messages a day grew
by a million rows a day for ever (SQLite file, Redis memory). Now
``Spool.prune_final`` deletes final messages (delivered, bounced, suppressed,
expired, cancelled) ``[spool] final_retention_days`` after their last change,
and nothing else: pending, deferred and in-flight rows stay whatever their age
(a paused campaign), every count stays as it was, ids are never handed out
again. Real SQLite files and a real redis-server; then ``fastsend send`` and
``resume`` run by the real binary against fastsend's sink."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastsend.spool import (
    BOUNCED,
    CANCELLED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    Result,
    SpoolProxy,
)

Factory = Callable[[], Any]
DAY = 86400.0


def _rows(n: int, tag: str = "u") -> list[tuple[str, str, bytes]]:
    return [(f"{tag}{i}@example.com", "example.com", b"{}") for i in range(n)]


def _sweep(s: Any, before: float, limit: int = 300) -> int:
    """Whole sweeps until one deletes nothing more (as the supervisor's calls do)."""
    total = 0
    for _ in range(1000):
        n, more = s.prune_final(before, limit)
        total += n
        if not more:
            n2, more2 = s.prune_final(before, limit)  # the next sweep: the kept rows again
            total += n2
            while more2:
                n2, more2 = s.prune_final(before, limit)
                total += n2
            if n2 == 0:
                return total
    raise AssertionError("prune_final never finished a sweep")


def test_final_messages_past_retention_go_and_nothing_else(make_spool: Factory) -> None:
    s = make_spool()
    old = time.time() - 40 * DAY
    a = s.create_campaign({"from": "a@b.example"}, tenant="t")  # finished 40 days ago
    paused = s.create_campaign({"from": "a@b.example"}, tenant="t")  # paused 40 days ago
    ids_a = s.add_messages(a, _rows(1000, "a"), old)
    ids_p = s.add_messages(paused, _rows(300, "p"), old + 1)
    got = s.claim_due(old + 2, 2000)
    assert {c.id for c in got} == set(ids_a) | set(ids_p)
    states = [DELIVERED, BOUNCED, EXPIRED, DELIVERED, CANCELLED]
    s.record_results(
        [Result(i, states[k % 5], 1, 0, 250, "2.0.0", "ok") for k, i in enumerate(ids_a)]
        + [Result(i, DEFERRED, 1, old + 60, 451, "4.0.0", "later") for i in ids_p],
        old + 3,
    )
    s.set_campaign_status(paused, "paused")
    # 100 of campaign a bounced again much later (a retry a day ago): too recent
    late = ids_a[100:200]
    s.record_results([Result(i, BOUNCED, 2, 0, 550, "5.1.1", "no") for i in late],
                     time.time() - DAY)  # fmt: skip
    b = s.create_campaign({"from": "a@b.example"}, tenant="t")  # this week's campaign
    ids_b = s.add_messages(b, _rows(200, "b"), time.time() - 3600)
    s.claim_due(time.time(), 100)
    counts = {c: s.counts(c) for c in (a, paused, b)}
    total = s.counts()
    by_campaign = s.counts_by_campaign()

    gone = _sweep(s, time.time() - 30 * DAY)

    assert gone == 900  # campaign a's final rows older than 30 days; no other row
    for c in (a, paused, b):
        assert s.counts(c) == counts[c], c  # counts do not change
    assert s.counts() == total and s.counts_by_campaign() == by_campaign
    assert s.counts_by_campaign([a]) == {a: counts[a]}
    assert s.message(ids_a[0]) is None and s.owner(ids_a[0]) is None
    assert s.message(ids_a[150])["state"] == "bounced"  # changed a day ago: kept
    assert all(s.message(i)["state"] == "deferred" for i in ids_p[:5] + ids_p[-5:])
    assert s.message(ids_b[0]) is not None and s.message(ids_b[-1]) is not None
    assert _sweep(s, time.time() - 30 * DAY) == 0  # a second sweep finds nothing
    s.close()

    s = make_spool()  # a restart: the paused campaign resumes, nothing of it was lost
    s.recover()
    s.set_campaign_status(paused, "active")
    due = s.claim_due(time.time(), 1000)
    assert {c.id for c in due} >= set(ids_p)
    new = s.add_messages(b, _rows(5, "n"), time.time())
    assert min(new) > max(ids_b)  # ids are never handed out again
    s.close()


def test_the_newest_row_stays_so_ids_are_never_reused(make_spool: Factory) -> None:
    """Every row final and old, the newest included: the next ids still follow it
    (SQLite hands out the largest id + 1: its newest row is kept)."""
    s = make_spool()
    old = time.time() - 40 * DAY
    c = s.create_campaign({"from": "a@b.example"})
    ids = s.add_messages(c, _rows(50), old)
    s.claim_due(old, 100)
    s.record_results([Result(i, DELIVERED, 1, 0, 250, "2.0.0", "ok") for i in ids], old)
    gone = _sweep(s, time.time() - DAY)
    assert 48 <= gone <= 50 and s.counts(c)["delivered"] == 50
    new = s.add_messages(c, _rows(3, "z"), time.time())
    assert min(new) == max(ids) + 1
    assert s.counts(c)["delivered"] == 50 and s.counts(c)["queued"] == 3
    s.close()


def test_a_spool_proxy_forwards_prune_final(make_spool: Factory) -> None:
    inner = make_spool()
    s = SpoolProxy(inner)
    c = s.create_campaign({"from": "a@b.example"})
    old = time.time() - 40 * DAY
    ids = s.add_messages(c, _rows(400), old)
    s.claim_due(old, 1000)
    s.record_results([Result(i, DELIVERED, 1, 0, 250, "2.0.0", "ok") for i in ids], old)
    s.add_messages(c, _rows(1, "new"), time.time())
    n, _more = s.prune_final(time.time() - DAY, 1000)
    assert n > 0
    s.close()


@pytest.mark.parametrize("limit", [1, 128, 5000])
def test_any_chunk_size_sweeps_the_same(make_spool: Factory, limit: int) -> None:
    s = make_spool()
    old = time.time() - 40 * DAY
    c = s.create_campaign({"from": "a@b.example"})
    ids = s.add_messages(c, _rows(700), old)
    s.claim_due(old, 1000)
    s.record_results(
        [Result(i, DELIVERED if i % 7 else DEFERRED, 1, old + 9, 250, "", "") for i in ids], old
    )
    s.add_messages(c, _rows(1, "new"), time.time())
    assert _sweep(s, time.time() - DAY, limit) == 600
    assert s.counts(c)["delivered"] == 600 and s.counts(c)["deferred"] == 100
    s.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_send_prunes_what_an_earlier_run_finished(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The real binary: ``send`` of 300 recipients, then a second ``send`` with
    ``final_retention_days`` just under the time since: its supervisor deletes the
    first campaign's rows at its first tick; the counts of both campaigns read as
    before, new ids follow the old ones, ``resume`` has nothing to do."""
    import orjson
    from tests._engine_helpers import (
        received_counts,
        run_fastsend,
        summary,
        write_campaign,
        write_recipients,
    )

    from fastsend.sink import SinkProcess
    from fastsend.spool import open_spool

    spool = str(tmp_path / "spool")
    if backend == "redis":
        spool = str(request.getfixturevalue("redis_server").url(node="n1", dir=spool))
    camp = write_campaign(tmp_path)
    keep = tmp_path / "keep.toml"
    keep.write_text("[spool]\nfinal_retention_days = 0.00001\n")  # 0.864 s
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log)) as sink:
        common = ["--route", f"*={sink.host}:{sink.port}", "--spool", spool, "--workers", "1",
                  "--json", "--no-progress"]  # fmt: skip
        first = write_recipients(tmp_path, [f"a{i}@one.example" for i in range(300)], "1.csv")
        proc = run_fastsend("send", str(camp), "-r", str(first), "--no-dkim", *common)
        assert proc.returncode == 0 and summary(proc)["delivered"] == 300, proc.stderr[-2000:]
        sp = open_spool(spool)
        ids = sorted(int(e["id"]) for e in _events(spool) if e["event"] == "delivered")
        assert len(ids) == 300 and sp.message(ids[0])["state"] == "delivered"
        sp.close()
        time.sleep(1.0)  # older than final_retention_days (not a timing assert)
        second = write_recipients(tmp_path, [f"b{i}@two.example" for i in range(5)], "2.csv")
        proc = run_fastsend("send", str(camp), "-r", str(second), "-c", str(keep), "--no-dkim",
                            *common)  # fmt: skip
        assert proc.returncode == 0 and summary(proc)["delivered"] == 5, proc.stderr[-2000:]
        proc = run_fastsend("resume", "-c", str(keep), *common)
        assert proc.returncode == 0, proc.stderr[-2000:]
    listed = orjson.loads(run_fastsend("campaign", "list", "--spool", spool, "--json").stdout)
    assert [(c["id"], c.get("delivered")) for c in listed] == [(1, 300), (2, 5)]
    sp = open_spool(spool)
    assert all(sp.message(i) is None for i in ids[:-1])  # gone (SQLite keeps the newest)
    new = sorted(int(e["id"]) for e in _events(spool)
                 if e["event"] == "delivered" and e["campaign"] == 2)  # fmt: skip
    assert len(new) == 5 and min(new) > max(ids)  # never an id twice
    assert sp.counts()["delivered"] == 305
    sp.close()
    got = received_counts(log)
    assert len(got) == 305 and max(got.values()) == 1


def _events(spool: str) -> list[dict[str, Any]]:
    import orjson

    from fastsend.spool import spool_local_dir

    path = Path(spool_local_dir(spool)) / "events.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def test_a_campaign_cancelled_today_keeps_its_rows_from_today(make_spool: Factory) -> None:
    """Cancelling is a change: rows spooled 40 days ago and cancelled now are kept
    final_retention_days from now (they went at once: their last attempt was old)."""
    s = make_spool()
    old = time.time() - 40 * DAY
    c = s.create_campaign({"from": "a@b.example"})
    ids = s.add_messages(c, _rows(300), old)
    s.add_messages(c, _rows(1, "new"), time.time())  # (the newest row)
    s.set_campaign_status(c, "cancelled")
    assert s.message(ids[0])["state"] == "cancelled"
    assert s.message(ids[0])["updated"] > time.time() - 60
    assert _sweep(s, time.time() - 30 * DAY) == 0
    assert s.counts(c)["cancelled"] == 301
    assert _sweep(s, time.time() + 1) >= 300  # 30 days later
    assert s.counts(c)["cancelled"] == 301
    s.close()
