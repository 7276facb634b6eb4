"""Feedback loops on a driven clock: rule thresholds and actions, IP blocks, AIMD."""

from __future__ import annotations

import itertools
import math

import pytest

from fastsend import config as cfgmod
from fastsend.outcome import DEFERRED, DELIVERED, Outcome, TxnResult
from fastsend.shaping.feedback import DECREASED, INCREASED, LIFTED, SAME, Aimd, Rule, Trigger
from fastsend.shaping.lanes import FOREVER, Lane, Shaper
from fastsend.shaping.policy import AIMD_KEYS

OK = Outcome(DELIVERED, 250, "2.0.0", "ok", "data")


def defer(text: str, code: int = 421, enhanced: str = "4.7.0") -> Outcome:
    return Outcome(DEFERRED, code, enhanced, text, "rcpt")


def results(*outcomes: Outcome) -> list[TxnResult]:
    return [TxnResult(i, [o]) for i, o in enumerate(outcomes)]


def lane_for(host: str, raw: dict | None = None, ip: str = "127.0.0.2") -> Lane:  # type: ignore[type-arg]
    cfg = cfgmod.from_dict(raw or {})
    sh = Shaper(cfg, [ip], now=1_700_000_000.0)
    lim = sh.site_limits("site", (host,), "x.example")
    return sh.lane(ip, "site", lim, sh.pool(""), 1_700_000_000.0)


def test_trigger_threshold_within_period() -> None:
    r = Rule.from_dict(
        {"name": "r", "match": "x", "action": "suspend", "threshold": 2, "period": 60.0,
         "duration": 1.0, "codes": []}
    )  # fmt: skip
    t = Trigger(r)
    assert not t.hit(0.0)
    assert not t.hit(100.0)  # the first match is out of the period
    assert t.hit(150.0)  # two within 60 s
    assert not t.hit(151.0)  # fired: counting starts again


def test_gmail_unusual_rate_twice_throttles_to_10_per_minute() -> None:
    ln = lane_for("gmail-smtp-in.l.google.com")
    text = "Our system has detected an unusual rate of unsolicited mail"
    ln.observe(results(defer(text, 421, "4.7.28")), 10.0)
    assert ln.throttle_bucket is None  # threshold is 2
    ln.observe(results(defer(text, 421, "4.7.28")), 20.0)
    assert ln.throttle_bucket is not None and ln.throttle_bucket.rate == pytest.approx(10 / 60)
    assert [e["action"] for e in ln.events].count("throttle") == 1
    # 10/min: the next message may go 6 s after the throttle began, not before.
    assert ln.take(20.5, 5) == (0, pytest.approx(5.5, abs=0.01))
    n, wait = ln.take(26.0, 5)
    assert (n, wait) == (1, 0.0)
    # After 30 minutes the throttle ends and the lane is free again.
    assert ln.take(20.0 + 1800.0, 5)[0] >= 1
    assert "throttle_end" in [e["action"] for e in ln.events]


def test_yahoo_ts04_suspends_two_hours() -> None:
    ln = lane_for("mta7.am0.yahoodns.net")
    ln.observe(results(defer("[TSS04] Messages from 127.0.0.2 temporarily deferred")), 100.0)
    assert not ln.usable(100.0 + 7199) and ln.take(200.0, 10) == (0, FOREVER)
    assert not ln.can_connect(200.0)
    assert ln.usable(100.0 + 7200.5)
    actions = [e["action"] for e in ln.events]
    assert actions[0] == "suspend" and "resume" in actions
    assert "yahoo-ts04" in ln.events[0]["reason"]


def test_outlook_max_connections_drops_to_one_connection() -> None:
    ln = lane_for("contoso-com.mail.protection.outlook.com")
    msg = "4.7.0 exceeded the maximum number of connections"
    ln.reply(Outcome(DEFERRED, 421, "4.7.0", msg, "greeting"), 1.0)
    ln.active = 1
    assert ln.can_connect(2.0)  # one match of two
    ln.reply(Outcome(DEFERRED, 421, "4.7.0", msg, "greeting"), 3.0)
    assert not ln.can_connect(4.0)  # 1 connection for 1 hour
    ln.active = 0
    assert ln.can_connect(4.0)
    ln.active = 4
    assert ln.can_connect(3.0 + 3601.0)  # back to 5


def test_ip_blocked_reply_rests_the_ip() -> None:
    ln = lane_for("mx.example.org", {"shaping": {"rest": {"duration": 600}}})
    ln.observe(
        results(defer("Service unavailable; Client host [127.0.0.2] blocked using zen.spamhaus.org", 554, "5.7.1")),
        50.0,
    )  # fmt: skip
    assert not ln.usable(60.0) and ln.usable(651.0)
    assert ln.events[0]["action"] == "rest" and ln.events[0]["source_ip"] == "127.0.0.2"


def test_bounce_rule_rewrites_deferral_to_failure() -> None:
    raw = {"shaping": {"rule": [{"name": "gone", "match": "mailbox disabled", "action": "bounce"}]}}
    ln = lane_for("mx.example.org", raw)
    out = ln.observe(results(OK, defer("4.2.1 mailbox disabled, not accepting", 450)), 1.0)
    assert out[0].outcomes[0].kind == DELIVERED
    assert out[1].outcomes[0].kind == "failed" and out[1].outcomes[0].code == 554


def test_rule_limited_to_provider() -> None:
    ln = lane_for("mx.example.org")  # not google: the unusual-rate rule does not apply
    for t in (1.0, 2.0, 3.0):
        ln.reply(defer("unusual rate of unsolicited mail"), t)
    assert ln.throttle_bucket is None


SETTINGS = dict(AIMD_KEYS, increase=10.0, hold=1.0, min_rate=1.0)


def test_aimd_unlimited_site_cuts_from_measured_rate_then_restores() -> None:
    a = Aimd(math.inf, SETTINGS)
    t = 0.0
    for _ in range(11):  # 100 msg/s sent, all delivered: nothing to do
        a.sent(t, 10)
        assert a.observe(t, 10, 0) == SAME
        t += 0.1
    assert a.sending(t) == pytest.approx(100.0)
    assert a.observe(t, 5, 5) == DECREASED  # half deferred
    assert a.peak == pytest.approx(100.0) and a.rate == pytest.approx(50.0)
    first = a.rate
    assert a.observe(t + 0.5, 5, 5) == SAME  # within hold: one cut per cohort
    assert a.observe(t + 1.2, 5, 5) == DECREASED
    assert a.rate < first
    # Recovery: each rate's worth of deliveries adds `increase` msg/s ...
    t += 2.0
    seen = []
    while True:
        r = a.observe(t, 10, 0)
        seen.append(r)
        t += 0.1
        if r == LIFTED:
            break
        assert r == INCREASED and len(seen) < 10_000
    # ... until the rate measured before the first cut: then the limit is lifted.
    assert math.isinf(a.rate)


def test_aimd_configured_rate_is_the_ceiling_and_floor_holds() -> None:
    a = Aimd(100.0, SETTINGS)
    for i in range(20):
        a.observe(float(i * 2), 1, 9)  # 90% deferred, one cut per report
    assert a.rate == 1.0  # min_rate
    t = 100.0
    while a.observe(t, 50, 0) != LIFTED:
        t += 0.5
    assert a.rate == 100.0
    assert a.observe(t + 1, 50, 0) == SAME  # at the ceiling


def test_aimd_slow_down_reply_cuts_even_when_few_deferrals() -> None:
    a = Aimd(200.0, SETTINGS)
    assert a.observe(1.0, 99, 1) == SAME  # 1% deferred: no cut
    assert a.observe(2.5, 99, 1, slow_down=True) == DECREASED


def test_lane_aimd_bucket_follows_the_rate() -> None:
    ln = lane_for("mx.example.org", {"shaping": {"default": {"messages_per_second": 100}}})
    assert ln.take(0.0, 64) == (64, 0.0)  # burst of 100
    ln.observe(results(*([OK] * 5 + [defer("try later", 451, "4.3.0")] * 5)), 0.5)
    assert ln.aimd_bucket is not None and ln.rate() <= 50.0
    assert ln.events[-1]["action"] == "aimd_decrease"
    # The cut starts empty: no burst is released by lowering the rate.
    assert ln.take(0.5, 10)[0] == 0


def test_rule_by_the_classifiers_reason() -> None:
    """A rule may name the bounce classifier's reasons instead of (or with) a regex:
    a mailbox-full reply rests nothing, a "too many connections" one throttles."""
    raw = {
        "shaping": {
            "rule": [
                {"name": "conns", "reasons": ["toomanyconn"], "action": "throttle",
                 "max_connections": 1, "duration": 600},
                {"name": "full", "reasons": ["mailboxfull"], "match": "quota", "action": "bounce"},
            ]
        }
    }  # fmt: skip
    ln = lane_for("mx.example.org", raw)
    ln.active = 3
    ln.reply(defer("Mailbox full", 452, "4.2.2"), 1.0)  # no "quota": no bounce rule
    assert ln.can_connect(1.5)
    out = ln.observe(results(defer("over quota", 452, "4.2.2")), 2.0)
    assert out[0].outcomes[0].kind == "failed"
    ln.reply(defer("Too many connections from your IP", 421, "4.7.0"), 3.0)
    assert not ln.can_connect(4.0)
    with pytest.raises(cfgmod.ConfigError, match=r"match .* or reasons"):
        lane_for("mx.example.org", {"shaping": {"rule": [{"name": "x", "action": "rest"}]}})


def test_all_delivered_twins_agree_and_observe_reads_a_delivered_group_as_before() -> None:
    """``all_delivered`` (compiled twin and reference) counts a group's
    outcomes when every one is a delivery, else -1; ``Lane.observe`` of such a
    group feeds AIMD the same count and returns the results unchanged."""
    from fastsend import _accel
    from fastsend.outcome import FAILED, py_all_delivered

    twin = _accel.compiled("all_delivered")
    multi = TxnResult([1, 2], [OK, OK])
    cases = [
        [],
        results(OK),
        results(OK, OK, OK),
        [multi, *results(OK)],
        [TxnResult(5, [])],
        results(OK, defer("busy")),
        [TxnResult([1, 2], [OK, Outcome(FAILED, 550, "5.1.1", "no", "rcpt")])],
        results(Outcome("delivered", 250)),  # an equal string, not the constant
    ]
    for rs in cases:
        assert twin(rs) == py_all_delivered(rs)
    assert [py_all_delivered(rs) for rs in cases] == [0, 1, 3, 3, 0, -1, -1, 1]
    a, b = lane_for("mx.example.net"), lane_for("mx.example.net")
    assert a.aimd is not None and b.aimd is not None
    cut = results(OK, defer("busy", 451, "4.3.0"), defer("busy", 451, "4.3.0"))
    a.observe(cut, 1.0)
    b.observe(cut, 1.0)
    assert a.rate() < math.inf  # cut: the delivered groups below raise it again
    group = [multi, *results(OK, OK)]
    for t in (2.0, 5.0, 9.0, 14.0, 30.0):
        assert a.observe(group, t) is group
        b.feed_aimd(t, 4, 0, False)  # what the loop over each outcome fed it
        assert a.rate() == b.rate()
        assert [(e["action"], e.get("rate")) for e in a.events] == [
            (e["action"], e.get("rate")) for e in b.events
        ]


def test_observe_told_every_result_is_one_delivery_reads_none() -> None:
    """``Lane.observe(results, now, delivered_one)``: told by the SMTP client
    that every result is one recipient delivered, AIMD is fed that count
    without a look at the outcomes, as reading them feeds it; told less (a
    group with anything else), it reads them, deferrals and rules included."""
    a, b = lane_for("mx.example.net"), lane_for("mx.example.net")
    cut = results(OK, defer("busy", 451, "4.3.0"), defer("busy", 451, "4.3.0"))
    a.observe(cut, 1.0, 1)  # one of three delivered: read, the deferrals cut
    b.observe(cut, 1.0)
    assert a.rate() == b.rate() < math.inf
    for t in (2.0, 5.0, 9.0, 14.0, 30.0):
        group = results(OK, OK, OK)
        assert a.observe(group, t, 3) is group
        assert b.observe(group, t) is group
        assert a.rate() == b.rate()
        assert [(e["action"], e.get("rate")) for e in a.events] == [
            (e["action"], e.get("rate")) for e in b.events
        ]


def test_a_reloads_new_lane_starts_where_the_old_one_left() -> None:
    """Lane.state -> Lane.inherit (a reload's wire.Lanes): the new worker's lane
    has the old one's spent burst (no second one; at a changed rate the same
    messages drain at the new rate), its AIMD cut and its rule throttle."""
    raw = {"shaping": {"domain": {"x.example": {"messages_per_minute": 60, "burst": 10}}}}
    host = "gmail-smtp-in.l.google.com"
    old = lane_for(host, raw)
    assert old.take(100.0, 10) == (10, 0.0)  # the burst, spent
    text = "Our system has detected an unusual rate of unsolicited mail"
    for t in (100.1, 100.2):
        old.observe(results(defer(text, 421, "4.7.28")), t)
    assert old.throttle_bucket is not None and old.aimd is not None and old.aimd.rate < 1.0
    st = old.state(100.5)
    assert st is not None and old.take(100.5, 1)[0] == 0
    new = lane_for(host, raw)
    assert new.take(100.5, 1)[0] == 1  # a fresh lane: a second burst (before)
    new = lane_for(host, raw)
    new.inherit(st, 100.5)
    for t in (100.5, 105.0, 109.0):  # what the old lane answers, the new one answers
        assert new.take(t, 1) == old.take(t, 1)
    assert new.aimd is not None and new.aimd.rate == old.aimd.rate
    assert new.throttle_until == old.throttle_until and new.throttle_conns == old.throttle_conns
    # The burst's debt at twice the rate: the 10 messages drain in 5 s, not 10
    # (a message every 0.5 s, not every 1 s).
    faster = {"shaping": {"domain": {"x.example": {"messages_per_minute": 120, "burst": 10}}}}
    ln = lane_for("mx.x.example", faster)
    was = lane_for("mx.x.example", raw)
    was.take(0.0, 10)
    ln.inherit(was.state(0.0) or pytest.fail("no state"), 0.0)
    b = ln.buckets[0]
    assert (b.available(0.4), b.available(0.51), b.available(4.9), b.available(5.0)) == (0, 1, 9, 10)
    # An idle lane hands over nothing.
    assert lane_for("mx.x.example", raw).state(0.0) is None


def test_aimd_increase_events_are_coalesced_and_every_cut_is_told() -> None:
    """A site slowed down by deferrals climbs back with nearly every report:
    before, an aimd_increase event a second a lane (112 in 50 s for two
    addresses), the log and the webhooks flooded. Now the first increase of a
    climb is told at once, then one each time the rate has grown by a quarter
    (or 30 s on), with the reports it stands for summed; every cut and the
    restore are still told, and the events chain: each one's previous_rate is
    the rate the one before it told, the last one's rate is the lane's."""
    ln = lane_for("mx.example.org", {"shaping": {"default": {"messages_per_second": 100}}})
    assert ln.aimd is not None
    cuts = 0
    t = 0.0
    for _ in range(3):  # three cuts, each followed by a climb back
        t += 2.0
        before = ln.aimd.rate
        ln.feed_aimd(t, 2, 8, False)
        assert ln.aimd.rate < before
        cuts += 1
        reports = 0
        while ln.aimd.rate < ln.aimd.ceiling and reports < 100_000:
            t += 0.1
            ln.feed_aimd(t, 2, 0, False)  # 20 msg/s delivered, every report a step up
            reports += 1
        assert reports > 200  # many increases happened ...
    aimd = [e for e in ln.events if e["action"].startswith("aimd_")]
    actions = [e["action"] for e in aimd]
    assert actions.count("aimd_decrease") == cuts
    assert actions.count("aimd_restore") == 3
    ups = [e for e in aimd if e["action"] == "aimd_increase"]
    # ... a handful told (from 50 to 100 by quarters: 3 steps, + one per 30 s)
    assert 3 <= len(ups) <= 3 * 12, [(e["previous_rate"], e["rate"]) for e in ups]
    for prev, ev in itertools.pairwise(aimd):
        if ev["action"] != "aimd_decrease":
            assert ev["previous_rate"] == prev["rate"], (prev, ev)
    assert sum(e.get("reports", 1) for e in ups) + 3 > 3 * 200  # (restores' reports apart)
    assert aimd[-1]["rate"] == 100.0
    # The first increase after a cut is told at once (a log reader sees the climb begin).
    first = actions.index("aimd_increase")
    assert actions[first - 1] == "aimd_decrease" and "reports" not in aimd[first]
