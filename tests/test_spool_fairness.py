"""Fairness of the claim between campaigns and tenants, in both spools alike.

An audit: tenant A spooled a 20,000-message campaign, tenant B then 3 messages;
the claim took due mail oldest first across every campaign, so B's 3 went out
at positions 17,693-17,695 of 20,003. A claim now shares its room between the
campaigns with mail due (spool/fair.py): the tenants alike, then a tenant's
highest priority first, then by weight, each campaign's oldest due first.
Every test runs on the SQLite spool and on a real redis-server (the
``make_spool`` fixture) and asserts the same numbers, so both spools keep the
same semantics; the Lua arithmetic (lib.lua) is also held equal to the Python
one (spool/fair.py) on random inputs.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastsend.spool import DEFERRED, DELIVERED, Result, Spool
from fastsend.spool.fair import check_rank, fair_shares, fill, rank

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi", "text": "Hi\n"}
TRANSACTIONAL = {"kind": "transactional", "defaults": {}}


def spool_rows(spool: Spool, cid: int, n: int, at: float, tag: str = "") -> list[int]:
    ids: list[int] = []
    for j in range(0, n, 5000):  # (as an ingest spools a list: in parts)
        rows = [(f"u{i}{tag}@d{cid}.example", f"d{cid}.example", b"{}")
                for i in range(j, min(n, j + 5000))]  # fmt: skip
        ids += spool.add_messages(cid, rows, at + j / 1e6)
    return ids


def per_campaign(claimed: list[Any]) -> dict[int, int]:
    return dict(Counter(c.campaign for c in claimed))


def test_a_small_tenant_goes_in_the_first_claim_after_a_big_campaign(
    make_spool: Callable[[], Spool],
) -> None:
    spool = make_spool()
    now = time.time() - 10
    a = spool.create_campaign(SPEC, name="big", tenant="A")
    ids_a = spool_rows(spool, a, 20_000, now)
    b = spool.create_campaign(SPEC, name="small", tenant="B")
    spool_rows(spool, b, 3, now + 1)  # spooled after every one of A's
    first = spool.claim_due(time.time(), 500)
    assert per_campaign(first) == {a: 497, b: 3}
    # within a campaign: oldest due first, as before
    assert {c.id for c in first if c.campaign == a} == set(ids_a[:497])
    # the rest is A's alone
    assert per_campaign(spool.claim_due(time.time(), 500)) == {a: 500}
    spool.close()


def test_two_tenants_with_equal_big_campaigns_interleave(
    make_spool: Callable[[], Spool],
) -> None:
    spool = make_spool()
    now = time.time() - 10
    a = spool.create_campaign(SPEC, tenant="A")
    b = spool.create_campaign(SPEC, tenant="B")
    spool_rows(spool, a, 2_000, now)
    spool_rows(spool, b, 2_000, now + 5)  # later: oldest first would take none of B's
    for _ in range(4):
        assert per_campaign(spool.claim_due(time.time(), 100)) == {a: 50, b: 50}
    # An odd room: the odd message goes round (the spool counts the shared claims)
    got = [per_campaign(spool.claim_due(time.time(), 101)) for _ in range(4)]
    assert [g[a] + g[b] for g in got] == [101] * 4
    assert sum(g[a] for g in got) == sum(g[b] for g in got) == 202
    spool.close()


def test_more_tenants_than_room_all_get_mail_within_a_round(
    make_spool: Callable[[], Spool],
) -> None:
    """More tenants with mail due than a claim's room: each claim gives one
    each to ``room`` of them, and the next claim goes on from where it
    stopped. It started one tenant further on instead, so with 30 tenants and
    claims of 10 the last tenant's first message waited for the 21st claim
    (2,000 tenants, claims of 500: ~1,500 claims, 750,000 other messages)."""
    spool = make_spool()
    now = time.time() - 10
    camps = [spool.create_campaign(SPEC, tenant=f"T{i}") for i in range(30)]
    for cid in camps:
        spool_rows(spool, cid, 40, now)
    seen: Counter[int] = Counter()
    for _ in range(3):
        got = per_campaign(spool.claim_due(time.time(), 10))
        assert sorted(got.values()) == [1] * 10 and not set(got) & set(seen)
        seen.update(got)
    assert set(seen) == set(camps)  # a round: every tenant once
    for _ in range(3):
        seen.update(per_campaign(spool.claim_due(time.time(), 10)))
    assert set(seen.values()) == {2}
    spool.close()


def test_mail_due_at_one_time_is_claimed_in_id_order(
    make_spool: Callable[[], Spool],
) -> None:
    """Within a campaign, mail due at one time goes in the order it was spooled
    (by id), retries too. Redis keeps a campaign's due ids in a sorted set by
    due time, whose ties come out as strings: of ids 1..120 spooled together a
    claim of 5 took 1, 10, 100, 101, 102, and of retries 95..105 due together
    100..105 went before 95."""
    spool = make_spool()
    now = time.time() - 100
    cid = spool.create_campaign(SPEC)
    rows = [(f"u{i}@d.example", "d.example", b"{}") for i in range(120)]
    ids = spool.add_messages(cid, rows, now)
    assert ids == list(range(1, 121))  # (a fresh spool: ids cross 9/10 and 99/100)
    assert sorted(c.id for c in spool.claim_due(now, 5)) == ids[:5]
    rest = sorted(c.id for c in spool.claim_due(now, 1000))
    assert rest == ids[5:]
    later = now + 50
    spool.record_results(
        [Result(i, DEFERRED, 1, later, 451, "4.7.1", "try later") if 95 <= i <= 105
         else Result(i, DELIVERED, 1, 0.0, 250, "2.0.0", "ok") for i in ids],
        now,
    )  # fmt: skip
    assert sorted(c.id for c in spool.claim_due(later, 3)) == [95, 96, 97]
    assert sorted(c.id for c in spool.claim_due(later, 100)) == list(range(98, 106))
    spool.close()


def test_a_tenant_with_many_campaigns_gets_one_tenants_share(
    make_spool: Callable[[], Spool],
) -> None:
    spool = make_spool()
    now = time.time() - 10
    mine = [spool.create_campaign(SPEC, tenant="A") for _ in range(4)]
    for cid in mine:
        spool_rows(spool, cid, 300, now)
    b = spool.create_campaign(SPEC, tenant="B")
    spool_rows(spool, b, 300, now)
    got = per_campaign(spool.claim_due(time.time(), 200))
    assert got[b] == 100  # half the room: B is one tenant, as A is
    assert sorted(got[c] for c in mine) == [25, 25, 25, 25]
    spool.close()


def test_a_retry_due_of_a_small_campaign_is_not_starved(
    make_spool: Callable[[], Spool],
) -> None:
    spool = make_spool()
    now = time.time() - 100
    small = spool.create_campaign(SPEC, tenant="A", name="small")
    (sid,) = spool_rows(spool, small, 1, now)
    assert [c.id for c in spool.claim_due(now, 10)] == [sid]
    spool.record_results(
        [Result(sid, DEFERRED, 1, now + 50, 451, "4.7.1", "try later")], now
    )
    big = spool.create_campaign(SPEC, tenant="A", name="big")
    spool_rows(spool, big, 5_000, now + 1)  # queued before the retry is due
    first = spool.claim_due(time.time(), 200)
    assert sid in {c.id for c in first}  # one tenant, two campaigns: shared
    assert [c.attempts for c in first if c.id == sid] == [1]
    assert per_campaign(first) == {small: 1, big: 199}
    spool.close()


def test_priority_orders_a_tenants_own_campaigns_not_other_tenants(
    make_spool: Callable[[], Spool],
) -> None:
    spool = make_spool()
    now = time.time() - 10
    bulk = spool.create_campaign(SPEC, tenant="A", name="bulk")
    spool_rows(spool, bulk, 1_000, now)
    tx = spool.create_campaign(TRANSACTIONAL, tenant="A", name="transactional:A")
    spool_rows(spool, tx, 30, now + 1)
    other = spool.create_campaign(SPEC, tenant="B", name="bulk B")
    spool_rows(spool, other, 1_000, now + 2)
    # A's half goes to its transactional mail first (priority 1 by default), the
    # rest of A's half to its bulk; B's half is B's whatever A marks urgent.
    assert per_campaign(spool.claim_due(time.time(), 100)) == {tx: 30, bulk: 20, other: 50}
    urgent = spool.create_campaign(SPEC, tenant="A", options={"priority": 100})
    spool_rows(spool, urgent, 1_000, now + 3)
    assert per_campaign(spool.claim_due(time.time(), 100)) == {urgent: 50, other: 50}
    spool.close()


def test_weight_shares_a_tenants_campaigns_of_one_priority(
    make_spool: Callable[[], Spool],
) -> None:
    spool = make_spool()
    now = time.time() - 10
    heavy = spool.create_campaign(SPEC, tenant="A", options={"weight": 3})
    light = spool.create_campaign(SPEC, tenant="A")
    spool_rows(spool, heavy, 1_000, now + 1)
    spool_rows(spool, light, 1_000, now)
    assert per_campaign(spool.claim_due(time.time(), 200)) == {heavy: 150, light: 50}
    # what one campaign cannot use goes to the others
    few = spool.create_campaign(SPEC, tenant="A", options={"weight": 1000})
    spool_rows(spool, few, 7, now)
    assert per_campaign(spool.claim_due(time.time(), 207)) == {few: 7, heavy: 150, light: 50}
    spool.close()


def test_the_operator_weights_a_tenants_share(make_spool: Callable[[], Spool]) -> None:
    """``[tenants.NAME] weight``: a tenant of weight 3 gets 3 times the share of
    a tenant of 1 (what it cannot use goes to the others); a tenant's own
    campaign options move only its own campaigns."""
    spool = make_spool()
    now = time.time() - 10
    paying = spool.create_campaign(SPEC, tenant="A")
    free = spool.create_campaign(SPEC, tenant="B")
    spool_rows(spool, paying, 2_000, now + 1)
    spool_rows(spool, free, 2_000, now)
    spool.set_tenant_weights({"A": 3, "C": 5})
    assert per_campaign(spool.claim_due(time.time(), 400)) == {paying: 300, free: 100}
    # B's weight-1000, priority-100 campaign still shares B's quarter only
    urgent = spool.create_campaign(SPEC, tenant="B", options={"weight": 1000, "priority": 100})
    spool_rows(spool, urgent, 40, now)
    assert per_campaign(spool.claim_due(time.time(), 400)) == {paying: 300, urgent: 40, free: 60}
    spool.set_tenant_weights({})  # (a reload without weights: alike again)
    assert per_campaign(spool.claim_due(time.time(), 400)) == {paying: 200, free: 200}
    spool.close()


def test_tenant_weights_come_from_the_config(make_spool: Callable[[], Spool], tmp_path: Path) -> None:
    """The supervisor gives the spool ``[tenants.NAME] weight`` (and again at a
    reload); check-config refuses a weight out of 1..1000 and says the shares."""
    from _engine_helpers import run_fastsend
    from fastsend import config as cfgmod
    from fastsend.events import EventLog
    from fastsend.queue.supervisor import Supervisor

    def tenants(w: Any) -> dict[str, Any]:
        return {"A": {"domains": ["a.example"], "weight": w}, "B": {"domains": ["b.example"]}}

    raw: dict[str, Any] = {"spool": {"dir": "spool"}, "tenants": tenants(3)}
    cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
    assert cfg.tenant_weights == {"A": 3}
    spool = make_spool()
    now = time.time() - 10
    a = spool.create_campaign(SPEC, tenant="A")
    b = spool.create_campaign(SPEC, tenant="B")
    spool_rows(spool, a, 500, now)
    spool_rows(spool, b, 500, now)
    events = EventLog(cfg.event_log_path)
    try:
        Supervisor(cfg, spool, events, until_idle=True)
        assert per_campaign(spool.claim_due(time.time(), 100)) == {a: 75, b: 25}
    finally:
        events.close()
        spool.close()
    for bad in (0, 1001, "3"):
        with pytest.raises(cfgmod.ConfigError, match="weight"):
            cfgmod.from_dict({**raw, "tenants": tenants(bad)}, base_dir=str(tmp_path))
    toml = tmp_path / "f.toml"
    toml.write_text(
        '[tenants.A]\ndomains = ["a.example"]\nweight = 3\n'
        '[tenants.B]\ndomains = ["b.example"]\n'
    )
    ok = run_fastsend("check-config", str(toml))
    assert ok.returncode == 0, ok.stderr
    assert "claim weights: A 3; the other 1 tenant(s) and the operator 1" in ok.stdout
    toml.write_text('[tenants.A]\ndomains = ["a.example"]\nweight = 0\n')
    bad_run = run_fastsend("check-config", str(toml))
    assert bad_run.returncode == 2 and "weight" in bad_run.stderr, bad_run.stderr


def test_paused_and_not_yet_due_campaigns_take_no_share(
    make_spool: Callable[[], Spool],
) -> None:
    spool = make_spool()
    now = time.time() - 10
    a = spool.create_campaign(SPEC, tenant="A")
    b = spool.create_campaign(SPEC, tenant="B")
    c = spool.create_campaign(SPEC, tenant="C")
    spool_rows(spool, a, 300, now)
    spool_rows(spool, b, 300, now)
    spool_rows(spool, c, 300, time.time() + 3600)  # due in an hour
    spool.set_campaign_status(b, "paused")
    assert per_campaign(spool.claim_due(time.time(), 100)) == {a: 100}
    spool.set_campaign_status(b, "active")
    assert per_campaign(spool.claim_due(time.time(), 100)) == {a: 50, b: 50}
    spool.set_campaign_status(a, "cancelled")
    assert per_campaign(spool.claim_due(time.time(), 100)) == {b: 100}
    assert spool.next_due() is not None
    spool.close()


def test_a_spool_opened_again_keeps_sharing(make_spool: Callable[[], Spool]) -> None:
    """The ranks are the spool's, not the process's: a restart (or another
    node) shares the same way."""
    spool = make_spool()
    now = time.time() - 10
    a = spool.create_campaign(SPEC, tenant="A", options={"weight": 2})
    b = spool.create_campaign(SPEC, tenant="A")
    spool_rows(spool, a, 500, now)
    spool_rows(spool, b, 500, now)
    spool.close()
    spool = make_spool()
    assert spool.recover() == 0
    assert per_campaign(spool.claim_due(time.time(), 90)) == {a: 60, b: 30}
    spool.close()


def test_parked_rows_take_their_campaigns_share(tmp_path: Path) -> None:
    """SQLite's parked rows (spooled in flight for a claim that came back short)
    count as their campaign's due mail: they do not push another tenant's
    mail out of the next claim."""
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(tmp_path))
    a = spool.create_campaign(SPEC, tenant="A")
    b = spool.create_campaign(SPEC, tenant="B")
    assert spool.claim_next(time.time(), 200) == []  # short: its room is open
    parked = spool_rows(spool, a, 300, time.time())  # 200 of them parked
    queued_b = spool_rows(spool, b, 10, time.time())
    first = spool.claim_next(time.time(), 100)
    assert per_campaign(first) == {a: 90, b: 10}
    assert {c.id for c in first if c.campaign == a} == set(parked[:90])  # parked first
    assert {c.id for c in first if c.campaign == b} == set(queued_b)
    got = spool.claim_next(time.time(), 1000)
    assert sorted(c.id for c in got) == parked[90:]  # nothing lost, nothing twice
    spool.close()


def test_fill_and_fair_shares() -> None:
    assert fill(10, [1, 1], [3, 100], 0) == [3, 7]
    assert fill(3, [1, 1, 1, 1], [5, 5, 5, 5], 0) == [1, 1, 1, 0]
    # the next claim (turn 1) goes on after the last one's 3: members 3, 0, 1
    assert fill(3, [1, 1, 1, 1], [5, 5, 5, 5], 1) == [1, 1, 0, 1]
    assert fill(3, [1, 1, 1, 1], [5, 5, 5, 5], 2) == [1, 0, 1, 1]
    assert fill(0, [1], [5], 0) == [0]
    assert fill(5, [1, 1], [0, 0], 0) == [0, 0]
    assert fair_shares([(2, "b", 0, 1, 9), (1, "a", 0, 1, 9)], 10, 0) == {1: 5, 2: 5}
    assert rank({"kind": "transactional"}, {}) == (1, 1)
    assert rank({}, {"priority": 5, "weight": 0}) == (5, 1)
    assert rank({}, {"priority": "x", "weight": 10**9}) == (0, 1000)
    assert check_rank(1, 2) is None
    assert check_rank(True) is not None and check_rank(weight=0) is not None


@pytest.fixture(params=["sqlite", "redis"])
def new_spool(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Spool]:
    """A new empty spool on each call: SQLite, then Redis (one node)."""
    from fastsend.spool import open_spool
    from fastsend.spool.sqlite import SQLiteSpool

    made = iter(range(1 << 30))
    if request.param == "sqlite":
        return lambda: SQLiteSpool(str(tmp_path / f"s{next(made)}"))
    server = request.getfixturevalue("redis_server")
    return lambda: open_spool(server.url(node="n1", dir=str(tmp_path)))


def test_the_spool_claims_the_shares_of_the_true_counts(new_spool: Callable[[], Spool]) -> None:
    """SQLite counts each campaign's due rows only up to about twice a fair
    share (counting every campaign's up to the claim's room cost O(room) each
    claim), and keeps what it counted from one claim to the next; Redis counts
    none ahead (claim.lua: the campaigns due come from its index, each read for
    one more than its share, the shares made again with the counts of those
    that had no more): the shares must still be fair_shares of the true counts,
    claim after claim, whatever the room, the weights, the priorities and the
    counts."""
    rnd = random.Random(19)
    for run in range(6):
        spool = new_spool()
        now = time.time() - 10
        left: dict[int, int] = {}
        ranks: dict[int, tuple[str, int, int]] = {}
        for _ in range(rnd.choice([3, 20, 60])):
            tenant = f"T{rnd.randrange(rnd.choice([2, 8, 40]))}"
            prio, weight = rnd.choice([0, 0, 1]), rnd.choice([1, 1, 2, 7, 300])
            cid = spool.create_campaign(SPEC, tenant=tenant,
                                        options={"priority": prio, "weight": weight})  # fmt: skip
            n = rnd.choice([1, 2, 5, 30, 400])
            spool_rows(spool, cid, n, now + rnd.random())
            left[cid], ranks[cid] = n, (tenant, prio, weight)
        tw = rnd.choice([{}, {"T1": 5}])
        spool.set_tenant_weights(tw)
        turn = 0
        while any(left.values()):
            limit = rnd.choice([1, 7, 50, 100, 500])
            cands = [(c, *ranks[c], min(n, limit)) for c, n in left.items() if n]
            want = fair_shares(cands, limit, turn, tw) if len(cands) > 1 else {
                cands[0][0]: min(limit, cands[0][4])}  # fmt: skip
            turn += len(cands) > 1
            got = per_campaign(spool.claim_due(time.time(), limit))
            assert got == want, (run, limit, turn)
            for c, k in got.items():
                left[c] -= k
        spool.close()


def _scans(spool: Spool) -> Callable[[], int]:
    """How many times the spool has read its campaigns' due mail since."""
    n = [0]
    if hasattr(spool, "_claim"):  # Redis: claim.lua runs
        run = spool._claim

        def counted(*a: Any, **kw: Any) -> Any:
            n[0] += 1
            return run(*a, **kw)

        spool._claim = counted  # type: ignore[attr-defined]
    else:  # SQLite: the statements reading each campaign's pending rows
        spool.db.set_trace_callback(  # type: ignore[attr-defined]
            lambda sql: n.__setitem__(0, n[0] + ("WITH RECURSIVE" in sql))
        )
    return lambda: n[0]


def test_an_idle_claim_does_not_read_every_campaign_each_tick(
    make_spool: Callable[[], Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that finds nothing due is taken as said for a moment: an idle
    supervisor claims every tick (20 ms), and each claim read every campaign's
    pending mail (2,000 campaigns holding retries: ~80 ms a second of the
    supervisor's CPU on SQLite, ~400-600 ms a second of Redis's one thread per
    node). What this process spools, defers or sets makes the next claim read
    again: that mail is claimed at once."""
    import fastsend.spool.redis as redis_spool
    import fastsend.spool.sqlite as sqlite_spool

    monkeypatch.setattr(sqlite_spool, "DUE_REUSE", 3600.0)  # (whatever the load)
    monkeypatch.setattr(redis_spool, "QUIET_REUSE", 3600.0)
    spool = make_spool()
    camps = [spool.create_campaign(SPEC, tenant=f"T{i}") for i in range(30)]
    for cid in camps:
        spool_rows(spool, cid, 3, time.time() + 3600)
    scans = _scans(spool)
    now = time.time()
    for _ in range(10):
        assert spool.claim_due(now, 100) == []
    assert scans() == 1
    ids = spool_rows(spool, camps[0], 2, now - 1, tag="x")  # spooled here: at once
    got = spool.claim_due(now, 100)
    assert sorted(c.id for c in got) == ids
    assert spool.claim_due(now, 100) == []
    spool.record_results(
        [Result(ids[0], DEFERRED, 1, now - 1, 451, "4.7.1", "later"),
         Result(ids[1], DELIVERED, 1, 0.0, 250, "2.0.0", "ok")], now,
    )  # fmt: skip
    assert [c.id for c in spool.claim_due(now, 100)] == [ids[0]]  # a retry due: at once
    spool.set_campaign_status(camps[1], "paused")
    assert spool.claim_due(now, 100) == []
    spool.close()


def test_mail_another_process_spools_is_claimed_soon_after_an_idle_claim(
    make_spool: Callable[[], Spool],
) -> None:
    """What another process (SQLite) or node (Redis) spools after an idle claim
    here is claimed within a moment (DUE_REUSE / QUIET_REUSE, 0.1 s)."""
    spool, other = make_spool(), make_spool()
    cid = spool.create_campaign(SPEC)
    spool_rows(spool, cid, 3, time.time() + 3600)
    assert spool.claim_due(time.time(), 100) == []
    ids = spool_rows(other, cid, 4, time.time() - 1, tag="o")
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        got = spool.claim_due(time.time(), 100)
        time.sleep(0.01)
    assert sorted(c.id for c in got) == ids
    other.close()
    spool.close()


def test_lua_shares_are_the_python_shares(redis_server: Any) -> None:
    """lib.lua's fair_shares is spool/fair.py's, on random inputs."""
    import redis

    from fastsend.spool.redis import _script

    r = redis.Redis(port=redis_server.port)
    lua = _script("next_due").split("-- ARGV: P, node")[0] + (
        "local cands, k = {}, 4\n"
        "for i = 1, tonumber(ARGV[2]) do\n"
        "  cands[i] = {tonumber(ARGV[k]), ARGV[k+1], tonumber(ARGV[k+2]),"
        " tonumber(ARGV[k+3]), tonumber(ARGV[k+4])}\n"
        "  k = k + 5\n"
        "end\n"
        "local tw = {}\n"
        "for j = 5 + 5 * #cands, #ARGV - 1, 2 do tw[ARGV[j]] = tonumber(ARGV[j + 1]) end\n"
        "local out = {}\n"
        "for _, s in ipairs(fair_shares(cands, tonumber(ARGV[3]), tonumber(ARGV[4 + 5 * #cands]),"
        " tw)) do\n"
        "  out[#out + 1] = s[1]; out[#out + 1] = s[2]\n"
        "end\n"
        "return out\n"
    )
    script = r.register_script(lua)
    rnd = random.Random(18)
    for _ in range(300):
        n = rnd.randint(1, 9)
        limit = rnd.choice([1, 2, 3, 7, 100, 101, 999])
        cands = [
            (cid, rnd.choice("ABC"), rnd.choice([0, 0, 1, -2]), rnd.choice([1, 1, 2, 5, 1000]),
             min(limit, rnd.choice([0, 1, 3, 50, 10_000])))
            for cid in rnd.sample(range(1, 60), n)
        ]  # fmt: skip
        turn = rnd.randint(0, 50)
        tw = rnd.choice([{}, {"A": 3}, {"B": 2, "C": 1000}])  # the operator's tenant weights
        args: list[Any] = ["p", len(cands), limit]
        for c in cands:
            args += list(c)
        args.append(turn)
        for t, w in tw.items():
            args += [t, w]
        flat = script(args=args)
        got = {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        assert got == fair_shares(cands, limit, turn, tw), (cands, limit, turn, tw)
        assert sum(got.values()) == min(limit, sum(c[4] for c in cands))


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 2, 3)])
def test_fill_never_gives_more_than_asked(weights: tuple[int, ...]) -> None:
    rnd = random.Random(sum(weights))
    for _ in range(200):
        avail = [rnd.randint(0, 20) for _ in weights]
        limit = rnd.randint(0, 70)
        give = fill(limit, list(weights), avail, rnd.randint(0, 9))
        assert all(0 <= g <= a for g, a in zip(give, avail, strict=True))
        assert sum(give) == min(limit, sum(avail))


def test_through_the_engine_a_small_tenants_mail_is_not_held_behind_a_big_one(
    make_spool: Callable[[], Spool], tmp_path: Path
) -> None:
    """The audit's case through the real supervisor, worker and sink: tenant B's
    3 messages, spooled after A's 3,000 (one site for both), are delivered
    within the first claims, not after A's whole campaign."""
    import asyncio

    from fastsend import config as cfgmod
    from fastsend.events import EventLog
    from fastsend.queue.supervisor import Supervisor
    from fastsend.sink import SinkThread

    with SinkThread() as sink:
        raw: dict[str, Any] = {
            "spool": {"dir": "spool"},
            "workers": {"count": 1},
            "ips": {"source": ["127.0.0.2"], "helo": "out.example.com"},
            "routes": {d: f"{sink.host}:{sink.port}" for d in ("a.example", "b.example")},
            "delivery": {"window": 100, "batch_size": 20, "pipeline": 10},
        }
        cfg = cfgmod.from_dict(raw, base_dir=str(tmp_path))
        spool = make_spool()
        now = time.time() - 10
        a = spool.create_campaign(SPEC, name="big", tenant="A")
        spool.add_messages(a, [(f"a{i}@a.example", "a.example", b"{}") for i in range(3000)], now)
        b = spool.create_campaign(SPEC, name="small", tenant="B")
        spool.add_messages(b, [(f"b{i}@b.example", "b.example", b"{}") for i in range(3)], now + 1)
        events = EventLog(cfg.event_log_path)
        sup = Supervisor(cfg, spool, events, until_idle=True, max_wait=60.0)
        try:
            with asyncio.Runner() as r:
                r.run(asyncio.wait_for(sup.run(), 60))
        finally:
            events.close()
        rcpts = [rcpt for m in sink.messages for rcpt in m.recipients]
    assert len(rcpts) == 3003 and len(set(rcpts)) == 3003
    where = [i for i, x in enumerate(rcpts) if x.endswith("@b.example")]
    assert len(where) == 3 and max(where) < 300, where  # oldest first: ~3,000


def test_send_sets_the_campaigns_priority_and_weight(tmp_path: Path) -> None:
    """`fastsend send --priority N --weight N`: kept with the campaign; out of
    range refused before anything is spooled."""
    from _engine_helpers import run_fastsend, summary, write_campaign, write_recipients
    from fastsend.sink import SinkProcess
    from fastsend.spool import open_spool

    camp = write_campaign(tmp_path)
    rfile = write_recipients(tmp_path, [f"u{i}@d{i % 3}.example" for i in range(20)])
    spool = tmp_path / "spool"
    with SinkProcess() as sink:
        common = ["--route", f"*={sink.host}:{sink.port}", "--spool", str(spool),
                  "--json", "--no-progress", "--no-dkim", "--max-wait", "2"]  # fmt: skip
        for flag, v in (("--priority", "101"), ("--weight", "0")):
            bad = run_fastsend("send", str(camp), "-r", str(rfile), flag, v, *common)
            assert bad.returncode == 2 and f"{flag}" in bad.stderr, bad.stderr
            assert not spool.exists() or open_spool(str(spool)).list_campaigns() == []
        proc = run_fastsend(
            "send", str(camp), "-r", str(rfile), "--priority", "3", "--weight", "7", *common
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert summary(proc)["delivered"] == 20
    info = open_spool(str(spool)).get_campaign(1)
    assert info is not None and (info.options["priority"], info.options["weight"]) == (3, 7)


def test_a_spool_made_before_gets_the_pending_index(tmp_path: Path) -> None:
    """A spool whose pending rows were indexed by next_at alone (messages_due)
    is given the (campaign, next_at) index at its first writable open, the old
    one dropped, and claims fairly from then on."""
    import sqlite3

    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(tmp_path))
    now = time.time() - 10
    a = spool.create_campaign(SPEC, tenant="A")
    b = spool.create_campaign(SPEC, tenant="B")
    spool_rows(spool, a, 300, now)
    spool_rows(spool, b, 300, now + 1)
    spool.close()
    db = sqlite3.connect(tmp_path / "spool.db")
    db.executescript(
        "DROP INDEX messages_pending;"
        " CREATE INDEX messages_due ON messages(next_at) WHERE state IN (0, 2);"
    )
    db.close()
    spool = SQLiteSpool(str(tmp_path))
    names = {r[0] for r in spool.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "messages_pending" in names and "messages_due" not in names
    assert per_campaign(spool.claim_due(time.time(), 100)) == {a: 50, b: 50}
    spool.close()
