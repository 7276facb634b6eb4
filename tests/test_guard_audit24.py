"""Shaping and feedback loops, session 24's audit (guard24).

Real parts: ``fastsend send`` as a subprocess, its supervisor and forked
workers, a SinkThread on loopback whose per-recipient faults are real SMTP
replies. Assertions are on the shaping log and the summary, never on speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests._engine_helpers import run_fastsend, summary, write_campaign, write_recipients

from fastsend.outcome import DEFERRED, DELIVERED, Outcome, TxnResult
from fastsend.shaping.lanes import Lane, Shaper, recipient_only
from fastsend.sink import SinkThread
from fastsend.sink.server import parse_fault_text

OK = Outcome(DELIVERED, 250, "2.0.0", "ok", "data")


def shaping_log(spool: Path) -> list[dict[str, Any]]:
    p = spool / "shaping.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def a_lane(raw: dict[str, Any] | None = None) -> Lane:
    from fastsend import config as cfgmod

    cfg = cfgmod.from_dict(raw or {"shaping": {"default": {"messages_per_second": 200}}})
    sh = Shaper(cfg, ["127.0.0.2"], now=1_700_000_000.0)
    lim = sh.site_limits("site", ("mx.mail.ru",), "mail.ru")
    return sh.lane("127.0.0.2", "site", lim, sh.pool(""), 1_700_000_000.0)


# (code, enhanced, text, stage) -> whether it speaks for its recipient alone
REPLIES = [
    ((452, "4.2.2", "Mailbox full", "rcpt"), True),
    ((452, "4.2.2", "The email account that you tried to reach is over quota", "rcpt"), True),
    ((451, "", "Ratelimit exceeded for mailbox ivan@mail.ru. Try again later", "rcpt"), True),
    (
        (
            450,
            "4.2.1",
            "The user you are trying to contact is receiving mail at a rate that "
            "prevents additional messages from being delivered",
            "rcpt",
        ),
        True,
    ),
    (
        (
            450,
            "4.2.0",
            "<a@b.test>: Recipient address rejected: Greylisted, see "
            "http://postgrey.schweikert.ch/help/b.test.html",
            "rcpt",
        ),
        True,
    ),
    ((451, "4.7.1", "Greylisting in action, please come back later", "rcpt"), True),
    ((452, "4.2.2", "Quota exceeded (mailbox for user is full)", "data"), True),
    # the client, its address, its sender, the service: the site's word
    ((421, "4.7.0", "Mailbox service closing transmission channel", "rcpt"), False),
    (
        (
            451,
            "4.7.651",
            "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation",
            "rcpt",
        ),
        False,
    ),
    ((450, "4.7.1", "<a@b.test>: Recipient address rejected: Rate limit exceeded", "rcpt"), False),
    ((450, "4.7.1", "Client host rejected: cannot find your hostname", "rcpt"), False),
    ((451, "4.1.8", "<a@b.test>: Sender address rejected: Domain not found", "rcpt"), False),
    # words naming neither: the site's, unless one after it was taken
    ((451, "4.3.0", "Temporary failure", "rcpt"), False),
    ((451, "", "Try again later", "rcpt"), False),
    ((451, "4.2.2", "Mailbox over quota", "mail"), False),  # (MAIL: every recipient's)
    # an address's words are not the reply's
    ((451, "4.3.0", "Try again later <user-spam-ip@b.test>", "rcpt"), False),
]


@pytest.mark.parametrize(("reply", "own"), REPLIES)
def test_which_deferrals_speak_for_one_recipient(reply: tuple[Any, ...], own: bool) -> None:
    assert recipient_only(Outcome(DEFERRED, *reply)) is own


def test_a_mailboxs_deferrals_neither_cut_rest_nor_slow_the_lane() -> None:
    """Mail.ru answers one mailbox "451 Ratelimit exceeded for mailbox" (the
    classifier calls it rate limited), another is over quota: groups where
    every other message is one of those. Before, each report cut the lane's
    AIMD rate (a slow-down reply, and a deferred share over defer_share); now
    none does, and a site-wide deferral still does."""
    ln = a_lane()
    rl = Outcome(DEFERRED, 451, "", "Ratelimit exceeded for mailbox x@mail.ru. Try again", "rcpt")
    full = Outcome(DEFERRED, 452, "4.2.2", "Mailbox full", "rcpt")
    t = 10.0
    for _ in range(20):
        ln.aimd.sent(t, 4)  # type: ignore[union-attr]
        ln.observe([TxnResult(0, [rl]), TxnResult(1, [OK]), TxnResult(2, [full]),
                    TxnResult(3, [OK])], t)  # fmt: skip
        t += 2.0
    assert ln.rate() == 200 and ln.aimd_bucket is None and not ln.blocked_until
    assert not [e for e in ln.events if e["action"] == "aimd_decrease"], ln.events
    site = Outcome(DEFERRED, 451, "4.3.0", "Temporary local problem, try again later", "rcpt")
    ln.aimd.sent(t, 2)  # type: ignore[union-attr]
    ln.observe([TxnResult(0, [site]), TxnResult(1, [OK])], t)
    assert ln.rate() < 200 and ln.events[-1]["action"] == "aimd_decrease"


def test_a_data_deferral_with_a_later_message_taken_is_that_messages() -> None:
    """A pipelined group of three messages: the first's end of data deferred
    with words that name nothing ("451 4.3.0 Temporary failure"), the next two
    taken: the receiver takes mail from this address now, the deferral was
    that message's. The same reply to the last (after the others were taken:
    a limit met) still counts for the site. "451 Try again later" to a RCPT
    names no pace either (greylisting answers so, bnc27): the same."""
    vague = Outcome(DEFERRED, 451, "4.3.0", "Temporary failure", "data")
    assert recipient_only(vague, accepted_after=True)
    assert not recipient_only(vague, accepted_after=False)
    ln = a_lane()
    ln.aimd.sent(10.0, 3)  # type: ignore[union-attr]
    ln.observe([TxnResult(0, [vague]), TxnResult(1, [OK]), TxnResult(2, [OK])], 10.0)
    assert ln.rate() == 200
    ln.aimd.sent(12.0, 3)  # type: ignore[union-attr]
    ln.observe([TxnResult(0, [OK]), TxnResult(1, [OK]), TxnResult(2, [vague])], 12.0)
    assert ln.rate() < 200
    later = Outcome(DEFERRED, 451, "", "Try again later", "rcpt")
    assert recipient_only(later, accepted_after=True)
    assert not recipient_only(later, accepted_after=False)


def test_a_rule_naming_a_mailbox_reply_still_applies() -> None:
    """The operator's rules are read for every reply, one mailbox's too."""
    raw = {"shaping": {"rule": [{"name": "quota-bounce", "match": "over quota",
                                 "action": "bounce", "duration": 1.0}]}}  # fmt: skip
    ln = a_lane(raw)
    full = Outcome(DEFERRED, 452, "4.2.2", "Mailbox over quota", "rcpt")
    out = ln.observe([TxnResult(0, [full]), TxnResult(1, [OK])], 10.0)
    assert out[0].outcomes[0].kind == "failed"


@pytest.mark.parametrize(
    "reply",
    [
        "452 4.2.2 Mailbox over quota",
        "451 Ratelimit exceeded for mailbox. Try again later",  # (Mail.ru-like)
        "450 4.7.1 Greylisted, see http://grey.example/",
    ],
)
def test_one_mailbox_in_four_over_quota_does_not_slow_the_site(tmp_path: Path, reply: str) -> None:
    """600 messages to one site capped at 200/s, a quarter of them to
    mailboxes the receiver answers "452 4.2.2 Mailbox over quota" at RCPT (a
    mailbox's rate limit, greylisting). Before, every
    group carrying one cut the site's AIMD rate: 41-54 cuts, 200/s down to
    10/s, the 450 deliverable messages took a minute. Now no cut: the 450
    delivered, the 150 deferred for their own retry."""
    n = 600
    addrs = [f"tempfail-u{i}@d.test" if i % 4 == 0 else f"u{i}@d.test" for i in range(n)]
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, addrs)
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text("[retry]\nmin_backoff = 300\n[shaping.default]\nmessages_per_second = 200\n")
    kind, words = parse_fault_text("tempfail=" + reply)
    spool = tmp_path / "spool"
    with SinkThread(fault_text={kind: words}, latency_ms=2.0) as sink:
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--route", f"*={sink.host}:{sink.port}", "--spool", str(spool),
            "--json", "--no-progress", "--no-dkim", "--max-wait", "120",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = summary(proc)
    assert got["delivered"] == 450 and got["deferred"] == 150, got
    cuts = [e for e in shaping_log(spool) if e.get("action") == "aimd_decrease"]
    assert not cuts, cuts[:3]


HOLDER = """
import sys
from fastsend.transports.slots import Slots
s = Slots(sys.argv[1], int(sys.argv[2]), 1)
print("open", flush=True)
for line in sys.stdin:
    print(s.acquire(), flush=True)
"""


class Holder:
    """A process with a Slots of one place on ``path`` (POSIX record locks are
    per process: a second holder must be another process)."""

    def __init__(self, path: Path, index: int) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), str(index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "open\n"

    def acquire(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def test_idle_places_files_are_swept_and_a_swept_files_opener_holds_no_second_place(
    tmp_path: Path,
) -> None:
    """SPOOL/lane-places/ held a file per (source IP, site) that ever needed
    places, never removed. sweep() removes those no process holds a place in;
    one a worker opened before the sweep is not a second set of places: its
    worker locks the file made again, where another already holds the one
    place (before the check, both held place 0: two connections for one)."""
    from fastsend.transports.slots import sweep

    d = tmp_path / "lane-places"
    d.mkdir()
    for i in range(50):
        (d / f"idle{i}").write_bytes(b"")
    held = d / "held"
    keeper = Holder(held, 0)
    early = Holder(d / "early", 0)  # opened, holds nothing yet
    try:
        assert keeper.acquire() == "0"
        assert sweep(str(d)) == 51  # every idle one, "early" too
        assert sorted(p.name for p in d.iterdir()) == ["held"]
        late = Holder(d / "early", 1)  # made again
        try:
            assert late.acquire() == "0"
            assert early.acquire() == "None"  # the one place is late's
        finally:
            late.close()
        assert early.acquire() == "0"  # (late exited: its lock went with it)
    finally:
        early.close()
        keeper.close()
    assert sweep(str(d)) == 2  # held and early, once their processes let go
    assert sweep(str(tmp_path / "none")) == 0


def test_a_send_sweeps_the_places_no_worker_holds(tmp_path: Path) -> None:
    """A spool's SPOOL/lane-places/ with 200 files of sites long gone and one a
    live process holds a place in: a `fastsend send` removes the 200 (its
    supervisor sweeps at start, then every PLACES_SWEEP_EVERY) and leaves the
    held one."""
    spool = tmp_path / "spool"
    d = spool / "lane-places"
    d.mkdir(parents=True)
    for i in range(200):
        (d / f"{i:032x}").write_bytes(b"")
    keeper = Holder(d / "held", 0)
    try:
        assert keeper.acquire() == "0"
        camp = write_campaign(tmp_path)
        rcpts = write_recipients(tmp_path, [f"u{i}@d.test" for i in range(5)])
        with SinkThread() as sink:
            proc = run_fastsend(
                "send", str(camp), "-r", str(rcpts), "--route", f"*={sink.host}:{sink.port}",
                "--spool", str(spool), "--json", "--no-progress", "--no-dkim",
            )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert summary(proc)["delivered"] == 5
        assert [p.name for p in d.iterdir()] == ["held"]
    finally:
        keeper.close()


def test_a_reload_keeps_a_connection_throttle_of_an_address_workers_share() -> None:
    """Two workers send from one address (no [ips] source, the default). An
    Outlook-style "exceeded the maximum number of connections" reply twice:
    the rule throttles the address to 1 connection, below its 2 workers, so
    each connection holds the one place on the node (Lane.address_limit).
    A SIGHUP's new worker inherited the throttle's end and its own part (1)
    but not the address's whole (1): no places, each worker its own
    connection, 2 at a receiver that allows 1 -- refused again after every
    reload. Now the new lane holds the address to 1, whether the lane's
    state or the supervisor's word of the throttle (wire.IPRest) comes first."""
    import time

    from fastsend import config as cfgmod
    from fastsend.shaping.lanes import THROTTLE_KEY

    cfg = cfgmod.from_dict({"workers": {"count": 2}})
    refusal = Outcome(DEFERRED, 421, "4.7.0", "exceeded the maximum number of connections", "rcpt")

    def lane(sh: Shaper) -> Lane:
        lim = sh.site_limits("site", ("d-test.mail.protection.outlook.com",), "d.test")
        return sh.lane("", "site", lim, sh.pool(""), time.time())

    old = lane(Shaper(cfg, [], index=0))
    assert old.part == (2, 0) and old.address_limit(time.monotonic()) == 0  # (5 for 2)
    now = time.monotonic()
    old.observe([TxnResult(0, [refusal])], now)
    old.observe([TxnResult(1, [refusal])], now)
    assert old.address_limit(now) == 1 and old.throttle_conns == 1
    st = old.state(now)
    assert st is not None
    rule = "outlook-max-connections"
    for word_first in (False, True):
        sh = Shaper(cfg, [], index=0)
        if word_first:  # (the supervisor's spawn records before the lanes)
            sh.rest_ip("", ["site:site"], time.time() + 3600, "x", f"{THROTTLE_KEY}{rule}|site")
        sh.inherit([st])
        new = lane(sh)
        if not word_first:
            sh.rest_ip("", ["site:site"], time.time() + 3600, "x", f"{THROTTLE_KEY}{rule}|site")
        assert new.throttle_until > now
        assert new.address_limit(time.monotonic()) == 1, word_first


def test_a_sites_suspension_outlives_a_restart(tmp_path: Path) -> None:
    """A receiver answers Yahoo's "421 4.7.0 [TSS04]": the shipped rule
    suspends the address there for two hours. The next `fastsend send` on
    the spool (a restart: a stop, a crash, or `send` then `resume`) sent the
    site its mail at once (5 of 5): the workers' rests and throttles lived in
    the supervisor's memory only. Now they are kept in the spool directory
    (shaping-rests.json) until they end: none sent, all 5 deferred. A file
    that cannot be read is said and forgotten, never fatal."""
    camp = write_campaign(tmp_path)
    spool = tmp_path / "spool"
    kind, reply = parse_fault_text(
        "tempfail=421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred"
    )
    with SinkThread(fault_text={kind: reply}) as sink:

        def send(addrs: list[str], name: str) -> dict[str, Any]:
            proc = run_fastsend(
                "send", str(camp), "-r", str(write_recipients(tmp_path, addrs, name)),
                "--route", f"*={sink.host}:{sink.port}", "--spool", str(spool),
                "--json", "--no-progress", "--no-dkim", "--max-wait", "3",
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            got = summary(proc)
            got["stderr"] = proc.stderr
            return got

        assert send(["tempfail-a@d.test"], "a.csv")["deferred"] == 1
        assert [e["action"] for e in shaping_log(spool)][:1] == ["suspend"]
        got = send([f"u{i}@d.test" for i in range(5)], "b.csv")
        assert (got["delivered"], got["deferred"]) == (0, 5), got
        assert sink.stats.messages == 0
        held = [e for e in shaping_log(spool) if e.get("ordered")]
        assert held and "[TSS04]" in held[0]["reason"], held
        (spool / "shaping-rests.json").write_text("{not json")
        got = send(["v@d.test"], "c.csv")
        assert got["delivered"] == 1 and "shaping-rests.json not read" in got["stderr"]


class Refuser:
    """A receiver whose every greeting is ``greeting`` (then it closes),
    counting the connections made to it."""

    def __init__(self, greeting: str) -> None:
        import asyncio
        import threading

        self.greeting = greeting.encode() + b"\r\n"
        self.connections = 0
        self.loop = asyncio.new_event_loop()

        async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            w.write(self.greeting)
            await w.drain()
            w.close()

        self.server = self.loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize(
    ("greeting", "most"),
    [
        ("421 4.3.2 Service not available, try again later", 2),  # the site's "not now"
        ("554 5.7.1 Service unavailable; client host blocked", 1),  # a block: the IP rests
    ],
)
def test_a_greeting_that_refuses_is_one_connection_not_one_per_group(
    tmp_path: Path, greeting: str, most: int
) -> None:
    """2,000 messages to a receiver whose greeting refuses (one worker, 2
    connections, groups of 64). A 421 answered one group a connection: a
    receiver that asked for no mail now got a connection per 64 messages (32
    in a row, as fast as it answered). Now, as Postfix's "host refused to
    talk to me", the site's waiting mail is deferred at once and it is left
    alone for a while: the first connections only. A 5xx greeting that rests
    the address sends its mail back untried (was: one group deferred, its
    attempt counted)."""
    srv = Refuser(greeting)
    try:
        camp = write_campaign(tmp_path)
        rcpts = write_recipients(tmp_path, [f"u{i}@d.test" for i in range(2000)])
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f"[workers]\ncount = 1\n[delivery]\nmax_connections = {most}\npipeline = 64\n"
        )
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--route", f"*=127.0.0.1:{srv.port}", "--spool", str(tmp_path / "spool"),
            "--json", "--no-progress", "--no-dkim", "--max-wait", "3",
        )  # fmt: skip
    finally:
        srv.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = summary(proc)
    assert got["deferred"] == 2000 and got["delivered"] == 0, got
    assert srv.connections <= most, srv.connections
    if greeting.startswith("5"):
        assert got["attempts"] == 0, got


def test_a_reload_keeps_a_sites_learned_connection_cap(tmp_path: Path) -> None:
    """A receiver takes 2 connections from us (421 "Too many connections"
    over that) and fastsend may open 8: the third connection's refusal caps
    the site at the sessions that worked (SiteQueue.cap, CAP_FOR). A SIGHUP's
    new worker started without it: it opened the whole 8 again (less the
    retiring worker's), and the receiver refused each one over 2 again. Now
    the cap goes with the lanes (wire.Lanes ``sites``): no refusal between the
    reload and the new worker's next 200 deliveries."""
    import time

    from tests._serve_helpers import Served
    from tests.test_multinode import TPL
    from tests.test_serve_reload import hup

    with SinkThread(max_connections=2, latency_ms=20.0) as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}",
                   delivery="max_connections = 8\npipeline = 4")  # fmt: skip
        try:

            def post(prefix: str, n: int) -> None:
                rows = [{"email": f"{prefix}{i}@d.test", "name": "x"} for i in range(n)]
                st, out = s.req("POST", "/v1/campaigns", {"template": TPL, "recipients": rows})
                assert st == 201, out

            def until(ok: Any, what: str) -> None:
                deadline = time.monotonic() + 60
                while not ok():
                    assert time.monotonic() < deadline and s.proc.poll() is None, what
                    time.sleep(0.02)

            post("a", 3000)
            until(lambda: sink.stats.faults.get("max-connections", 0) >= 1, "no refusal")
            hup(s, "configuration reloaded")
            refused, sent = sink.stats.faults.get("max-connections", 0), sink.stats.messages
            until(lambda: sink.stats.messages >= sent + 200, "the new worker sends nothing")
            # (one refusal may still come from a connection the retiring worker was
            # opening as the signal came; before, the new worker's own 6 of 8 were refused)
            assert sink.stats.faults.get("max-connections", 0) <= refused + 1, sink.stats.faults
        finally:
            s.stop()


def test_a_lane_whose_throttle_ended_and_rule_matches_aged_is_pruned() -> None:
    """Gmail's "unusual rate" twice throttles a lane for 30 minutes. Long after
    it ended, with no mail for the site, the worker's prune kept the lane (its
    throttle bucket, never ended by a take, and its rule's match history):
    every site that ever met a rule's reply stayed in memory for good. Now it
    goes once the throttle has ended and the matches are older than the
    rule's period; not before."""
    from fastsend import config as cfgmod

    cfg = cfgmod.from_dict({})
    sh = Shaper(cfg, ["127.0.0.2"], now=1_700_000_000.0)
    lim = sh.site_limits("site", ("gmail-smtp-in.l.google.com",), "gmail.com")
    ln = sh.lane("127.0.0.2", "site", lim, sh.pool(""), 1_700_000_000.0)
    text = "Our system has detected an unusual rate of unsolicited mail"
    unusual = Outcome(DEFERRED, 421, "4.7.28", text, "rcpt")
    ln.observe([TxnResult(0, [unusual])], 10.0)
    ln.observe([TxnResult(1, [unusual])], 20.0)
    assert ln.throttle_bucket is not None
    sh.prune(600.0, set())  # throttled: kept
    assert ("127.0.0.2", "site") in sh.lanes
    sh.prune(20.0 + 1800.0 + 1.0, set())  # throttle over, matches within the hour
    assert ("127.0.0.2", "site") in sh.lanes
    ln.triggers["gmail-unusual-rate"].times.append(30.0)  # (a match that did not fire)
    sh.prune(30.0 + 3600.0 + 1.0, set())  # all older than the period, AIMD_FORGET
    assert ("127.0.0.2", "site") not in sh.lanes
