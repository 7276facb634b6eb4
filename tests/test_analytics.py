"""Rollups against a generated event stream with known answers; machine rules on crafted
requests; the query planner; the SQLite and Redis stores give the same answers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsend.analytics.machine import load_machine_rules
from fastsend.analytics.query import QueryError, StatsQuery, make_query, plan, run_query
from fastsend.analytics.rollup import Rollups, policy_provider
from fastsend.analytics.store import COUNTERS, SQLiteRollupStore
from fastsend.config import ConfigError

MPP = "Mozilla/5.0"
HUMAN = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15"


def make(store: Any) -> Rollups:
    return Rollups(store, tenant_of=lambda cid: {1: "acme", 2: "acme", 3: "beta"}[cid],
                   provider_of=policy_provider(None))  # fmt: skip


def stream(t0: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """1,000 messages over campaigns 1 (acme), 2 (acme), 3 (beta) with a known outcome each;
    returns the events and acme's expected totals."""
    evs: list[dict[str, Any]] = []
    want = dict.fromkeys(COUNTERS, 0)
    doms = ["gmail.com", "yahoo.com", "hotmail.com", "example.org"]
    mx = {
        "gmail.com": "gmail-smtp-in.l.google.com",
        "yahoo.com": "mta5.am0.yahoodns.net",
        "hotmail.com": "hotmail-com.olc.protection.outlook.com",
        "example.org": "mx.example.org",
    }
    for i in range(1000):
        cid = 1 + i % 3
        tenant = "beta" if cid == 3 else "acme"
        mine = tenant == "acme"
        dom = doms[i % 4]
        rcpt = f"u{i}@{dom}"
        t = t0 + i * 0.5
        evs.append({"time": t, "event": "accepted", "id": i, "campaign": cid, "tenant": tenant,
                    "rcpt": rcpt})  # fmt: skip
        want["accepted"] += mine
        base = {"id": i, "campaign": cid, "rcpt": rcpt, "mx": mx[dom],
                "source_ip": f"127.0.0.{2 + i % 2}"}  # fmt: skip
        if i % 50 == 1:  # one deferral, then delivered
            evs.append({**base, "time": t + 1, "event": "deferred", "code": 421,
                        "enhanced": "4.7.0", "text": "Too many connections, slow down"})  # fmt: skip
            want["deferred"] += mine
        if i % 25 == 0:
            hard = i % 50 == 0
            evs.append({**base, "time": t + 2, "event": "bounced", "code": 550,
                        "enhanced": "5.1.1" if hard else "5.7.1",
                        "text": "user unknown" if hard else "message refused as spam"})  # fmt: skip
            want["bounced"] += mine
            want["bounced_hard" if hard else "bounced_soft"] += mine
            continue
        evs.append({**base, "time": t + 2, "event": "delivered", "code": 250})
        want["delivered"] += mine
        eng = {"id": i, "campaign": cid, "tenant": tenant, "rcpt": rcpt}
        if i % 4 == 1:  # a human open, twice
            for k in range(2):
                evs.append({**eng, "time": t + 600 + k, "event": "opened", "user_agent": HUMAN})
            want["opens"] += 2 * mine
            want["opens_unique"] += mine
        if i % 6 == 1:  # an Apple MPP prefetch
            evs.append({**eng, "time": t + 3, "event": "opened", "user_agent": MPP})
            want["opens_machine"] += mine
            want["opens_machine_unique"] += mine
        if i % 8 == 1:  # a human click (after the human open)
            evs.append({**eng, "time": t + 700, "event": "clicked", "user_agent": HUMAN,
                        "url": "https://example.com/a"})  # fmt: skip
            want["clicks"] += mine
            want["clicks_unique"] += mine
        if i % 10 == 3:  # a scanner: every link within a second, right after delivery
            for k, u in enumerate(("https://example.com/a", "https://example.com/b",
                                   "https://example.com/c")):  # fmt: skip
                evs.append({**eng, "time": t + 2.5 + k * 0.1, "event": "clicked",
                            "user_agent": HUMAN, "url": u})  # fmt: skip
            want["clicks_machine"] += 3 * mine
            want["clicks_machine_unique"] += mine
        if i % 200 == 5:
            evs.append({**eng, "time": t + 900, "event": "complained"})
            want["complaints"] += mine
        if i % 100 == 7:
            evs.append({**eng, "time": t + 950, "event": "unsubscribed"})
            want["unsubscribes"] += mine
    evs.sort(key=lambda e: e["time"])
    return evs, want


def feed(r: Rollups, evs: list[dict[str, Any]]) -> None:
    for k in range(0, len(evs), 97):  # in ticks, as the supervisor emits them
        r.listener(evs[k : k + 97])
    r.flush(final=True)


def test_rollups_known_answers(tmp_path: Path) -> None:
    t0 = (time.time() // 3600 - 3) * 3600 + 1234.0
    store = SQLiteRollupStore(str(tmp_path))
    r = make(store)
    evs, want = stream(t0)
    feed(r, evs)
    q = make_query("acme", {"from": str(int(t0) - 60), "to": str(int(t0) + 7200),
                            "granularity": "total", "dims": ""}, time.time())  # fmt: skip
    got = run_query(store, q)["totals"]
    assert got["counts"] == want
    rt = got["rates"]
    final = want["delivered"] + want["bounced"]
    assert rt["bounce_rate"] == round(want["bounced"] / final, 6)
    assert rt["complaint_rate"] == round(want["complaints"] / want["delivered"], 6)
    assert rt["unique_open_rate"] == round(want["opens_unique"] / want["delivered"], 6)
    assert rt["click_to_open_rate"] == round(want["clicks_unique"] / want["opens_unique"], 6)
    # Minute, hour and day series each add up to the same totals.
    for gran in ("minute", "hour", "day"):
        q2 = make_query("acme", {"from": str(int(t0) - 86400), "to": str(int(t0) + 86400),
                                 "granularity": gran, "dims": ""} if gran != "minute" else
                        {"from": str(int(t0) - 60), "to": str(int(t0) + 7200),
                         "granularity": gran, "dims": ""}, time.time())  # fmt: skip
        s = run_query(store, q2)["series"]
        assert {c: sum(s[c]) for c in COUNTERS} == want, gran
    # Providers from the MX names; reasons from the reply classification.
    by = run_query(store, StatsQuery("acme", int(t0) - 60, int(t0) + 7200, "total",
                                     ["provider"], {}))  # fmt: skip
    assert set(by["groups"]) == {"google", "yahoo", "outlook", "other"}
    assert by["reasons"]["bounced"] == {"userunknown": want["bounced_hard"],
                                        "spamdetected": want["bounced_soft"]}  # fmt: skip
    assert list(by["reasons"]["deferred"]) == ["toomanyconn"]
    # Tenants never see each other's rows; filters narrow.
    beta = run_query(store, StatsQuery("beta", int(t0) - 60, int(t0) + 7200, "total",
                                       ["campaign"], {}))  # fmt: skip
    assert set(beta["groups"]) == {"3"}
    one = run_query(store, StatsQuery("acme", int(t0) - 60, int(t0) + 7200, "total", [],
                                      {"campaign": [2], "source_ip": ["127.0.0.3"]}))  # fmt: skip
    assert 0 < one["totals"]["counts"]["delivered"] < want["delivered"] / 2
    nobody = run_query(store, StatsQuery("gamma", int(t0) - 60, int(t0) + 7200, "total", [], {}))
    assert nobody["totals"]["counts"]["accepted"] == 0


class _Ev(dict):  # type: ignore[type-arg]
    """An event that is a dict subclass (the compiled twin's generic .get path)."""


def test_compiled_count_events_is_its_reference_twin() -> None:
    """fastsend._core.count_events counts, queues and remembers exactly as the
    pure reference in fastsend.analytics.rollup does, odd events included."""
    from fastsend import _accel
    from fastsend.analytics import rollup

    compiled = _accel.compiled("count_events")
    pure = rollup.py_count_events
    assert compiled is not pure
    t0 = 1_700_000_000.5
    evs, _want = stream(t0)
    odd: list[Any] = [
        {"event": "delivered", "id": 1, "campaign": 1, "rcpt": "a@b.example"},  # no time
        {"time": 0, "event": "accepted", "id": 2, "campaign": 1, "rcpt": "x@y.example"},
        {"time": t0, "event": "delivered", "campaign": 2, "rcpt": None, "mx": None},  # no id
        {"time": t0, "event": "delivered", "id": 3, "rcpt": 7, "source_ip": 0},
        {"time": t0, "event": "nonsense", "id": 4, "rcpt": "q@r.example"},
        {"time": t0 + 61, "event": "bounced", "id": 5, "campaign": 3, "rcpt": "@@"},
        _Ev(time=t0 + 120, event="delivered", id=6, campaign=1, rcpt="noat", tenant="acme"),
        {"time": t0 + 120.0, "event": "accepted", "id": 8, "campaign": 1, "rcpt": "A@B.Example"},
    ]
    for remember in (True, False):
        got = []
        for fn in (pure, compiled):
            acc: dict[Any, list[int]] = {}
            special: list[Any] = []
            mem: list[Any] | None = [] if remember else None
            for k in range(0, len(evs), 97):
                fn(evs[k : k + 97], acc, special, mem, rollup._PLAIN, rollup._SPECIAL,
                   rollup.NC, 1_700_000_500.0)  # fmt: skip
            fn(odd, acc, special, mem, rollup._PLAIN, rollup._SPECIAL, rollup.NC, 42.0)
            got.append((acc, special, mem))
        assert got[0] == got[1]
        assert got[0][0] and got[0][1] and (got[0][2] is None) != remember


def test_rows_count_as_their_dicts() -> None:
    """count_accepted / count_delivered (both twins) count and remember a Rows
    batch exactly as count_events counts the batch's dicts."""
    from fastsend import _accel, wire
    from fastsend.analytics import rollup
    from fastsend.events import AcceptedRows, DeliveredRows
    from fastsend.spool import Claimed

    t0 = 1_700_000_000.5
    rcpts = ["a@b.example", "C@D.Example", "noat", "@@", "x@y@z.example", "ü@例え.jp"] * 9
    acc_rows = AcceptedRows(t0, 3, "acme", list(range(len(rcpts))), rcpts)
    dl = DeliveredRows(t0 + 61)
    for i, r in enumerate(rcpts):
        dl.claims.append(Claimed(100 + i, i % 3, r, "d", b"{}", i % 2, t0))
        dl.results.append(wire.Res(100 + i, 0, 250, "2.0.0", "ok", "" if i % 4 else "mx.b.example",
                                   f"127.0.0.{i % 3}" if i % 5 else "", queue_id="q"))  # fmt: skip
    for remember in (True, False):
        want_acc: dict[Any, list[int]] = {}
        want_mem: list[Any] | None = [] if remember else None
        for batch in (acc_rows, dl):
            rollup.py_count_events(batch.dicts(), want_acc, [], want_mem, rollup._PLAIN,
                                   rollup._SPECIAL, rollup.NC, 1.0)  # fmt: skip
        for ca, cd in ((rollup.py_count_accepted, rollup.py_count_delivered),
                       (_accel.compiled("count_accepted"), _accel.compiled("count_delivered"))):
            acc: dict[Any, list[int]] = {}
            mem: list[Any] | None = [] if remember else None
            ca(acc_rows.time, 3, "acme", rcpts, acc, rollup.NC, rollup._ACCEPTED)
            cd(dl.time, dl.claims, dl.results, acc, mem, rollup.NC, rollup._DELIVERED)
            assert acc == want_acc and mem == want_mem
        assert want_acc and (want_mem is None) != remember


def test_delivered_rows_in_runs_count_as_their_dicts() -> None:
    """count_delivered's compiled twin bumps the last key's row again for a
    delivery sharing it (campaign, MX, source IP, recipient domain): the same
    counts and remembered keys as the reference, whether consecutive
    deliveries share a key or differ in any one part of it (a domain that is
    a suffix of the last, a changed case, no '@', a campaign id 1 vs True)."""
    from fastsend import _accel, wire
    from fastsend.analytics import rollup
    from fastsend.spool import Claimed

    t0 = 1_700_000_000.5
    rcpts = ["a@b.example", "q@b.example", "q@xb.example", "z@b.example", "w@B.example",
             "noat", "noat2", "@", "y@", "x@b.example"]  # fmt: skip
    claims: list[Any] = []
    results: list[Any] = []
    for i in range(90):
        rcpt = rcpts[(i // 3) % len(rcpts)]
        cid: Any = True if i % 17 == 16 else (i // 30) + 1
        claims.append(Claimed(i, cid, rcpt, "d", b"{}", 0, t0))
        mx = "mx.b.example" if i % 7 else ""
        results.append(wire.Res(i, 0, 250, "2.0.0", "ok", mx, "127.0.0.2" if i % 11 else "",
                                queue_id="q"))  # fmt: skip
    for remember in (True, False):
        got = []
        for fn in (rollup.py_count_delivered, _accel.compiled("count_delivered")):
            acc: dict[Any, list[int]] = {}
            mem: list[Any] | None = [] if remember else None
            fn(t0, claims, results, acc, mem, rollup.NC, rollup._DELIVERED)
            got.append((acc, mem))
        assert got[0] == got[1]
        assert sum(row[rollup._DELIVERED] for row in got[0][0].values()) == 90


def test_unique_counts_survive_a_restart(tmp_path: Path) -> None:
    now = time.time()
    ev = {"time": now, "event": "opened", "id": 7, "campaign": 1, "tenant": "acme",
          "rcpt": "a@example.org", "user_agent": HUMAN}  # fmt: skip
    r = make(SQLiteRollupStore(str(tmp_path)))
    r.listener([ev])
    r.close()
    r = make(SQLiteRollupStore(str(tmp_path)))
    r.listener([{**ev, "time": now + 1}])
    r.flush(final=True)
    c = run_query(r.store, StatsQuery("acme", int(now) - 120, int(now) + 120, "total", [], {}))
    assert c["totals"]["counts"]["opens"] == 2 and c["totals"]["counts"]["opens_unique"] == 1


def test_a_failed_flush_keeps_its_counts(tmp_path: Path) -> None:
    store = SQLiteRollupStore(str(tmp_path))
    r = make(store)
    real = store.add
    calls = []

    def broken(*a: Any) -> None:
        calls.append(1)
        raise OSError("disk full")

    store.add = broken  # type: ignore[method-assign]
    now = time.time()
    r.listener([{"time": now, "event": "accepted", "id": 1, "campaign": 1, "tenant": "acme",
                 "rcpt": "a@example.org"}])  # fmt: skip
    r.flush()
    assert calls and r.failed == 1
    store.add = real  # type: ignore[method-assign]
    r.flush()
    c = run_query(store, StatsQuery("acme", int(now) - 120, int(now) + 120, "total", [], {}))
    assert c["totals"]["counts"]["accepted"] == 1


# ------------------------------------------------------------------ machine rules
def test_machine_rules_on_crafted_requests() -> None:
    m = load_machine_rules()
    assert m.classify("open", MPP) == "apple-mpp"
    assert m.classify("open", HUMAN) == ""
    assert m.classify("open", HUMAN, "HEAD") == "head-request"
    assert m.classify("open", "") == "no-user-agent"
    assert m.classify("open", HUMAN, since_delivery=1.0) == "soon-after-delivery"
    assert m.classify("open", HUMAN, since_delivery=300.0) == ""
    gmail = (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
    )
    assert m.classify("open", gmail) == ""  # fetched when the reader opens: human-likely
    for ua in ("python-requests/2.31", "curl/8.1", "Mozilla/5.0 HeadlessChrome/120",
               "Barracuda Sentinel (EE)", "Go-http-client/1.1"):  # fmt: skip
        assert m.classify("click", ua) == "scanner-agent", ua
    assert m.classify("click", HUMAN, "HEAD") == "head-request"
    assert m.classify("click", HUMAN, since_delivery=4.0) == "soon-after-delivery"
    assert m.classify("click", HUMAN, since_delivery=3600.0, burst=3) == "every-link-at-once"
    assert m.classify("click", HUMAN, since_delivery=3600.0, burst=2) == ""


def test_machine_rules_from_a_user_file(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text('[[open]]\nname = "our-monitor"\nuser_agent = "^uptime-bot"\n')
    m = load_machine_rules(str(f))
    assert m.classify("open", "uptime-bot/1") == "our-monitor"
    assert m.classify("open", MPP) == "apple-mpp"  # shipped rules still apply
    f.write_text('replace = true\n[[open]]\nname = "only"\nmethod = "HEAD"\n')
    m = load_machine_rules(str(f))
    assert m.classify("open", MPP) == "" and m.classify("open", MPP, "HEAD") == "only"
    for bad, msg in (('[[open]]\nname = "x"\n', "at least one condition"),
                     ('[[open]]\nname = "x"\nuser_agent = "("\n', "bad user_agent regex"),
                     ('[[click]]\nname = "x"\nburst_links = 3\n', "burst_window_s"),
                     ('[[open]]\nname = "x"\ncolour = 1\n', "unknown key")):  # fmt: skip
        f.write_text(bad)
        with pytest.raises(ConfigError, match=msg):
            load_machine_rules(str(f))


def test_head_and_burst_clicks_counted_as_machine(tmp_path: Path) -> None:
    store = SQLiteRollupStore(str(tmp_path))
    r = make(store)
    now = time.time() - 60
    r.listener([{"time": now, "event": "delivered", "id": 1, "campaign": 1, "rcpt": "a@x.org",
                 "mx": "mx.x.org", "source_ip": "127.0.0.2"}])  # fmt: skip
    eng = {"id": 1, "campaign": 1, "tenant": "acme", "rcpt": "a@x.org", "user_agent": HUMAN}
    r.listener([{**eng, "time": now + 30, "event": "clicked", "url": "u1", "http_method": "HEAD"}])
    r.listener([{**eng, "time": now + 40 + k * 0.3, "event": "clicked", "url": f"l{k}"}
                for k in range(4)])  # fmt: skip
    r.listener([{**eng, "time": now + 50, "event": "clicked", "url": "l0"}])
    r.flush(final=True)
    c = run_query(store, StatsQuery("acme", int(now) - 120, int(now) + 120, "total", [], {}))
    counts = c["totals"]["counts"]
    assert counts["clicks_machine"] == 5 and counts["clicks"] == 1
    # The delivery's source IP is the click's.
    by = run_query(store, StatsQuery("acme", int(now) - 120, int(now) + 120, "total",
                                     ["source_ip"], {}))  # fmt: skip
    assert by["groups"]["127.0.0.2"]["counts"]["clicks_machine"] == 5


# ------------------------------------------------------------------ the planner
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**9), st.integers(60, 40 * 86400))
def test_plan_tiles_the_range(a: int, span: int) -> None:
    t0 = a - a % 60
    t1 = t0 + span - span % 60 + 60
    pieces = plan(t0, t1)
    pos = t0
    for g, s, e in pieces:
        assert s == pos and e > s and s % g == 0 and e % g == 0
        pos = e
    assert pos == t1
    assert len(pieces) <= 5


def test_query_parameters() -> None:
    now = 1_800_000_000.0
    q = make_query("t", {"from": "-7d", "to": "now", "dims": "provider,source_ip",
                         "campaign": "3,4", "granularity": "hour"}, now)  # fmt: skip
    assert q.t1 - q.t0 >= 7 * 86400 and q.dims == ["provider", "source_ip"]
    assert q.filters == {"campaign": [3, 4]}
    assert make_query("t", {"from": "2027-01-15T00:00:00Z", "to": "2027-01-16T00:00:00Z"},
                      now).granularity == "hour"  # fmt: skip
    for params, field in (({"from": "yesterday"}, "from"), ({"granularity": "week"}, "granularity"),
                          ({"dims": "rcpt"}, "dims"), ({"campaign": "x"}, "campaign"),
                          ({"from": "-1d", "to": "-2d"}, "to"),
                          ({"from": "-30d", "granularity": "minute"}, "granularity"),
                          ({"limit": "0"}, "limit")):  # fmt: skip
        with pytest.raises(QueryError) as e:
            make_query("t", params, now)
        assert e.value.field == field


# ------------------------------------------------------------------ Redis form
def test_redis_store_gives_the_same_answers(tmp_path: Path, redis_server: Any) -> None:
    import redis as redis_lib

    from fastsend.analytics.store_redis import RedisRollupStore

    t0 = (time.time() // 3600 - 3) * 3600 + 1234.0
    url = redis_server.url(node="n1", dir=str(tmp_path))
    r_client = redis_lib.Redis.from_url(url.split("?")[0])
    prefix = f"an{time.monotonic_ns()}"
    stores = [SQLiteRollupStore(str(tmp_path)), RedisRollupStore(r_client, prefix)]
    evs, want = stream(t0)
    answers = []
    for s in stores:
        feed(make(s), evs)
        for gran in ("total", "minute"):
            q = StatsQuery("acme", int(t0) - 60, int(t0) + 7200, gran, ["provider"], {}, 50)
            answers.append(run_query(s, q))
    assert answers[0]["totals"]["counts"] == want
    assert answers[0] == answers[2] and answers[1] == answers[3]


def test_a_human_click_counts_as_its_messages_unique_open(tmp_path: Path) -> None:
    """Apple Mail's proxy fetches the pixel (a machine open) and the reader's own view
    fetches nothing; images off fetch nothing either: such a reader's click was the
    only human sign, and the click-to-open rate came out over 1 (3 clicks over 1 open
    here: 300%). A human-likely click now counts as its message's unique human open
    when none was counted (never twice, and not for a scanner's click)."""
    store = SQLiteRollupStore(str(tmp_path))
    r = make(store)
    t0 = float(int(time.time()) // 3600 * 3600 - 7200)
    evs: list[dict[str, Any]] = []
    for i in range(1, 6):
        rcpt = f"u{i}@gmail.com"
        evs.append({"time": t0, "event": "delivered", "id": i, "campaign": 1, "rcpt": rcpt,
                    "mx": "gmail-smtp-in.l.google.com", "source_ip": "127.0.0.2"})
    eng = {"campaign": 1, "tenant": "acme"}
    evs += [
        {**eng, "id": 1, "time": t0 + 5, "event": "opened", "user_agent": MPP},  # Apple MPP
        {**eng, "id": 1, "time": t0 + 900, "event": "clicked", "user_agent": HUMAN,
         "url": "https://example.com/a"},  # the reader: a click, no human open
        {**eng, "id": 2, "time": t0 + 900, "event": "clicked", "user_agent": HUMAN,
         "url": "https://example.com/a"},  # images off
        {**eng, "id": 3, "time": t0 + 600, "event": "opened", "user_agent": HUMAN},
        {**eng, "id": 3, "time": t0 + 700, "event": "clicked", "user_agent": HUMAN,
         "url": "https://example.com/a"},  # an open, then a click: one unique open
        {**eng, "id": 4, "time": t0 + 1, "event": "clicked", "user_agent": HUMAN,
         "url": "https://example.com/a"},  # a scanner, a second after delivery
    ]
    feed(r, evs)
    q = StatsQuery("acme", int(t0) - 60, int(t0) + 3600, "total", [], {})
    got = run_query(store, q)["totals"]
    c = got["counts"]
    assert (c["opens"], c["opens_unique"], c["opens_machine_unique"]) == (1, 3, 1)
    assert (c["clicks_unique"], c["clicks_machine_unique"]) == (3, 1)
    assert got["rates"]["click_to_open_rate"] == 1.0  # was 3.0
    r.close()


# Browsers and mail apps people click from (a click rule's false positive hides a
# real reader from the human counts): phones whose model ends in "bot" (Cubot)
# included; and what bots and link scanners send, each in the form its vendor
# documents it.
PEOPLE = (
    "Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 9; Cubot KingKong) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/99.0.4844.88 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 11; CUBOT) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/108.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/119.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/118.0.0.0 YaBrowser/23.11.0.0 Safari/537.36",
    "Mozilla/5.0 (compatible; MSIE 10.0; Windows NT 6.1; Trident/6.0)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/437.0.0.31.110]",
)
BOTS = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "Slackbot 1.0 (+https://api.slack.com/robots)",
    "TelegramBot (like TwitterBot)",
    "Mozilla/5.0 (compatible;PetalBot;+https://webmaster.petalsearch.com/site/petalbot)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like"
    " Gecko) Chrome/120.0.6099.71 Mobile Safari/537.36 (compatible; Googlebot/2.1;"
    " +http://www.google.com/bot.html)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.0;"
    " +https://openai.com/gptbot)",
    "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
    "Discordbot/2.0", "Twitterbot/1.0", "LinkedInBot/1.0", "MJ12bot/v1.4.8",
)


def test_click_scanner_agents_are_bots_not_phones_named_like_one() -> None:
    """A click from a Cubot phone counted as a scanner's: the rule's ``bot\\b``
    matched any word ending in "bot" (found by an audit)."""
    m = load_machine_rules()
    for ua in PEOPLE:
        assert m.classify("click", ua, since_delivery=3600.0) == "", ua
        assert m.classify("open", ua, since_delivery=3600.0) == "", ua
    for ua in BOTS:
        assert m.classify("click", ua, since_delivery=3600.0) == "scanner-agent", ua
