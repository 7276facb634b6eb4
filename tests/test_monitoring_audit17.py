"""Monitoring audit, session 17: webhooks' event names, the event log's catch-up
after a copytruncate rotation, blocklist rests lifted on delisting.

Real parts: ``fastsend check-config`` on a written config file, the event log
file (rotated as logrotate's copytruncate does: copied, then truncated in place),
the SQLite event index, webhook outbox and rollup store, the loopback DNS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastsend.cli import main
from fastsend.config.serve import EVENT_NAMES

SRC = Path(__file__).resolve().parent.parent / "src" / "fastsend"


def test_an_unknown_webhook_event_name_is_refused_naming_the_valid_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``[webhooks] events = ["bounce"]`` (not "bounced") subscribed to nothing and
    said nothing: every event was dropped before the outbox, for good."""
    f = tmp_path / "fastsend.toml"
    f.write_text('[webhooks]\nurls = ["https://h.example/"]\nsecret = "0123456789abcdefghij"\n'
                 'events = ["bounced", "bounce", "complaint"]\n')  # fmt: skip
    assert main(["check-config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "[webhooks] events: unknown event 'bounce', 'complaint'" in err, err
    assert "complained" in err and "delivered" in err  # the valid names are listed
    f.write_text('[webhooks]\nurls = ["https://h.example/"]\nsecret = "0123456789abcdefghij"\n'
                 'events = ["bounced", "complained", "alarm", "opened"]\n')  # fmt: skip
    assert main(["check-config", str(f)]) == 0, capsys.readouterr().err


_WRITES = (
    re.compile(r'"event":\s*"([a-z_]+)"'),  # {"event": "x", ...}
    re.compile(r'\["event"\]\s*=\s*"([a-z_]+)"'),  # ev["event"] = "x"
    re.compile(r'\._event\(\s*"([a-z_]+)"'),  # tracking's self._event("opened", ...)
    re.compile(r'\.notice\(\s*"[a-z]+",\s*"([a-z_]+)"'),  # provider events' notice(p, "x")
    re.compile(r'outcome_dict\(\s*\w+,\s*"([a-z_]+)"'),
)


def test_every_event_the_source_writes_is_a_valid_webhook_event_name() -> None:
    """The list [webhooks] events is checked against must not fall behind the code:
    an event added later and missing from it could not be subscribed to."""
    found: set[str] = set()
    for p in [*SRC.rglob("*.py"), *SRC.rglob("*.pxi")]:
        text = p.read_text()
        for rx in _WRITES:
            found.update(rx.findall(text))
    found.update({"campaign_paused", "campaign_active", "campaign_cancelled"})  # f"campaign_{s}"
    assert {"accepted", "delivered", "opened", "ip_listed", "alarm"} <= found  # the scan works
    assert found <= EVENT_NAMES, sorted(found - EVENT_NAMES)


def test_the_readme_lists_every_event() -> None:
    readme = (SRC.parent.parent / "README.md").read_text()
    missing = [n for n in sorted(EVENT_NAMES) if not re.search(rf"\b{n}\b", readme)]
    assert not missing


def _copytruncate(path: Path) -> None:
    """What logrotate's ``copytruncate`` does: copy the log aside, empty it in place
    (the writer keeps its descriptor, same inode, and appends from 0)."""
    shutil.copyfile(path, str(path) + ".1")
    with open(path, "r+b") as f:
        f.truncate(0)


def _evs(kind: str, ids: range) -> list[dict[str, Any]]:
    t = time.time()
    return [{"time": t, "event": kind, "id": i, "campaign": 1, "rcpt": f"r{i}@example.org",
             "source_ip": "127.0.0.2", "mx": "mx.example.org", "code": 250}
            for i in ids]  # fmt: skip


def test_the_event_index_catches_up_after_a_copytruncate_rotation(tmp_path: Path) -> None:
    """After logrotate's copytruncate the log's offsets kept counting from the old
    size, so every mark the index kept named a point past the file's end: a kill -9
    then lost the index's last rows for good (the next start read nothing back)."""
    from fastsend.events import EventLog
    from fastsend.serve.eventindex import EventIndex

    spool = tmp_path / "spool"
    spool.mkdir()
    path = spool / "events.jsonl"
    log = EventLog(str(path))
    ix = EventIndex(str(spool))
    ix.attach(log)
    log.emit_many(_evs("accepted", range(300)))
    log.flush()
    ix.flush()
    _copytruncate(path)
    log.emit_many(_evs("delivered", range(0, 100)))  # serve goes on: ticks, index writes
    log.flush()
    log.emit_many(_evs("delivered", range(100, 200)))
    log.flush()
    ix.flush()
    log.emit_many(_evs("delivered", range(200, 300)))
    log.flush()  # in the log; the index holds them in memory only: kill -9
    log2 = EventLog(str(path))
    ix2 = EventIndex(str(spool))
    assert ix2.attach(log2) == 100
    for i in (0, 150, 250, 299):
        assert [e["event"] for e in ix2.for_message(i)] == ["accepted", "delivered"], i
    ix2.close()
    log2.close()


def test_webhooks_and_rollups_catch_up_after_a_copytruncate_rotation(tmp_path: Path) -> None:
    """The webhook outbox kept only a mark past the one it held, so after a
    copytruncate (smaller offsets) it kept the old one for good; with the rollups',
    a kill -9 after the rotation left the last events unsent and uncounted."""
    from fastsend.analytics.query import make_query, run_query
    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.webhooks import WebhookDispatcher

    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")},
                     "webhooks": {"urls": ["http://127.0.0.1:9/hook"],  # down: kept
                                  "secret": "0123456789abcdefghij", "retry_min": 60}})  # fmt: skip
    path = tmp_path / "spool" / "events.jsonl"

    def delivered(store: Any) -> int:
        now = time.time()
        q = make_query("*", {"from": str(int(now) - 3600), "dims": ""}, now + 60)
        return int(run_query(store, q)["totals"]["counts"]["delivered"])

    async def main() -> None:
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        ctx.events.emit_many(_evs("delivered", range(300)))
        ctx.events.flush()
        d._flush()
        ctx.rollups.flush()
        _copytruncate(path)
        ctx.events.emit_many(_evs("delivered", range(300, 400)))
        ctx.events.flush()
        ctx.events.emit_many(_evs("delivered", range(400, 500)))
        ctx.events.flush()
        d._flush()
        ctx.rollups.flush()
        ctx.events.emit_many(_evs("delivered", range(500, 600)))
        ctx.events.flush()  # in the log only: kill -9 (nothing closed, no last flush)
        for t in [*d._tasks, *d._senders.values()]:
            t.cancel()
        assert d._session is not None
        await d._session.close()
        ctx2 = open_context(cfg)
        d2 = WebhookDispatcher(ctx2)
        await d2.start()
        try:
            assert d2.outbox is not None
            ids = [orjson.loads(b)["id"] for _i, b in d2.outbox.fetch_all(-1, 10_000)]
            assert ids == list(range(600))  # each once, in order
            assert delivered(ctx2.rollups.store) == 600
        finally:
            await d2.stop()
            ctx2.close()

    asyncio.run(main())


def test_a_mark_past_the_logs_end_after_a_kill_rereads_nothing(tmp_path: Path) -> None:
    """A listener's mark may count events still in the log's buffer (told before the
    tick writes them); killed then, the file ends before the mark. That is not a
    truncation: the next start must not count the whole log again."""
    from fastsend.analytics.attach import attach
    from fastsend.analytics.query import make_query, run_query
    from fastsend.config import from_dict
    from fastsend.events import EventLog

    class Spool:
        directory = str(tmp_path)

        def shared(self) -> None:
            return None

        def get_campaign(self, cid: int) -> Any:
            return type("C", (), {"tenant": "acme"})()

    cfg = from_dict({"spool": {"dir": str(tmp_path)}})
    path = str(tmp_path / "events.jsonl")
    now = time.time()

    def delivered(store: Any) -> int:
        q = make_query("acme", {"from": str(int(now) - 3600), "dims": ""}, now + 60)
        return int(run_query(store, q)["totals"]["counts"]["delivered"])

    log = EventLog(path)
    r = attach(cfg, Spool(), log)
    assert r is not None
    log.emit_many(_evs("delivered", range(300)))
    log.flush()
    log.emit_many(_evs("delivered", range(300, 305)))  # buffered, not written
    r.flush()  # counted, with a mark past the file's end: kill -9
    log2 = EventLog(path)
    r2 = attach(cfg, Spool(), log2)
    assert r2 is not None and delivered(r2.store) == 305
    r2.close()
    log2.close()


def test_outcomes_told_after_a_truncation_carry_marks_inside_the_file(tmp_path: Path) -> None:
    """The supervisor's order (append_rows, flush, tell): a batch taken before the
    flush that found the file truncated is told with its end moved back."""
    from fastsend.events import EventLog

    path = tmp_path / "events.jsonl"
    log = EventLog(str(path))
    log.emit_many(_evs("accepted", range(50)))
    log.flush()
    _copytruncate(path)
    marks: list[str | None] = []
    log.listen(lambda evs: marks.append(log.mark()))
    pending = log.append_rows(_evs("delivered", range(10)))
    log.flush()
    log.tell(pending)
    size = path.stat().st_size
    assert marks and marks[-1] is not None and marks[-1].endswith(f":{size}")
    assert log.mark() is not None and log.mark().endswith(f":{size}")  # type: ignore[union-attr]
    log.close()


def test_a_delisting_lifts_that_lists_rest_only(tmp_path: Path) -> None:
    """A lane rested by two blocklists and by its own block reply: the first list's
    delisting leaves the second's rest; the second's leaves the lane's own; an IP
    rested by one list alone carries mail again at once."""
    from fastsend import wire
    from fastsend.config import from_dict
    from fastsend.shaping.lanes import Shaper

    cfg = from_dict({"ips": {"source": ["127.0.0.2", "127.0.0.3"]}})
    sh = Shaper(cfg, ["127.0.0.2", "127.0.0.3"])
    now = time.time()
    lim = sh.site_limits("gmail", ("gmail-smtp-in.l.google.com",), "gmail.com")
    pool = sh.pool("")
    a = sh.lane("127.0.0.2", "gmail", lim, pool, now)
    b = sh.lane("127.0.0.3", "gmail", lim, pool, now)

    def order(rec: Any) -> None:  # as the worker decodes the supervisor's records
        msg = wire.to_worker_decoder.decode(wire.encoder.encode(rec))
        if isinstance(msg, wire.IPRest):
            sh.rest_ip(msg.ip, msg.providers, msg.until, msg.reason, msg.key, msg.recheck)
        else:
            assert isinstance(msg, wire.IPLift)
            sh.lift_ip(msg.ip, msg.key)

    order(wire.IPRest("127.0.0.2", ["*"], now + 86400, "listed on zen", "dnsbl:zen", 3600))
    order(wire.IPRest("127.0.0.2", ["google"], now + 7200, "listed on bb", "dnsbl:bb", 3600))
    order(wire.IPRest("127.0.0.3", ["*"], now + 86400, "listed on zen", "dnsbl:zen", 3600))
    mono = time.monotonic()
    a.block(mono, 600.0, "rest", "ip blocked: 550 5.7.1 blocked")  # its own reply
    assert not a.usable(mono) and not b.usable(mono)
    assert 0 < a.resume_at(mono) <= 3600  # mail is handed back until the next check only
    order(wire.IPLift("127.0.0.2", "dnsbl:zen"))
    assert not a.usable(mono) and "bb" in a.blocked_reason
    assert 7100 < a.blocked_until - mono < 7201  # (wall and monotonic clocks: a few us apart)
    assert 0 < a.resume_at(mono) <= 3600  # (bb's rest is looked at again hourly too)
    order(wire.IPLift("127.0.0.2", "dnsbl:bb"))
    assert not a.usable(mono) and "550" in a.blocked_reason
    assert 590 < a.blocked_until - mono <= 600.001  # (float sums: 600.0000000000009 seen)
    order(wire.IPLift("127.0.0.3", "dnsbl:zen"))
    assert b.usable(time.monotonic())
    assert [e["action"] for e in sh.events if e["source_ip"] == "127.0.0.3"][-1] == "resume"
    # A lane made after the lift is not rested.
    lim_y = sh.site_limits("yahoo", ("mta5.am0.yahoodns.net",), "yahoo.com")
    assert sh.lane("127.0.0.3", "yahoo", lim_y, pool, now).usable(time.monotonic())


def test_serve_sends_again_from_an_ip_once_its_blocklist_delists_it(
    tmp_path: Path, dns_server: Any
) -> None:
    """serve rested a listed IP for rest_hours (24) and its mail waited all that
    time: a delisting an hour later was told (ip_delisted) but nothing was lifted.
    Now the delisting ends the rest and the held mail goes within a check."""
    from tests._serve_helpers import Served, sink_message

    from fastsend.sink import SinkThread

    dns_server.set_zones({"2.0.0.127.bl.test": [("A", "127.0.0.2")]})
    extra = f"""
[ips]
source = ["127.0.0.2"]
[dns]
nameservers = ["{dns_server.nameserver}"]
timeout = 2
[reputation]
blocklists = ["bl.test"]
check_every = 0.5
rest_hours = 24
"""
    log = tmp_path / "spool" / "events.jsonl"

    def events(name: str) -> list[dict[str, Any]]:
        if not log.exists():
            return []
        whole = log.read_bytes().rpartition(b"\n")[0]
        return [e for e in map(orjson.loads, whole.splitlines()) if e["event"] == name]

    def wait(cond: Any, what: str) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    with SinkThread() as sink:
        # (mail a rest holds is handed back for check_every, or the ready horizon)
        s = Served(tmp_path, f"{sink.host}:{sink.port}", extra, delivery="ready_horizon = 1")
        try:
            wait(lambda: events("ip_listed"), "listed")
            st, body = s.req("POST", "/v1/messages", {
                "from": "a@example.com", "subject": "dnsbl-held", "text": "t",
                "to": ["u1@example.org"]}, tenant="acme")  # fmt: skip
            assert st == 202, body
            shaping = tmp_path / "spool" / "shaping.jsonl"
            wait(lambda: shaping.exists() and b"listed on bl.test" in shaping.read_bytes(),
                 "the worker's rest")  # fmt: skip
            assert not events("delivered")  # held by the rest
            dns_server.set_zones({})
            wait(lambda: events("ip_delisted"), "delisted")
            sink_message(sink, b"dnsbl-held")
            wait(lambda: events("delivered"), "the delivery's event")
            assert events("delivered")[0]["source_ip"] == "127.0.0.2"
        finally:
            s.stop()


def test_an_snds_import_no_longer_red_lifts_its_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SNDS RED rests the IP for Outlook a day, renewed by each import; an
    import that says GREEN (no trap hits) now ends it."""
    import aiohttp
    import tests.test_feeds as tf

    from fastsend.analytics.feeds import Feeds

    rests: list[tuple[Any, ...]] = []
    lifts: list[tuple[str, str]] = []

    async def main() -> None:
        async with tf.provider_apis(0.001, False) as (base, _seen), aiohttp.ClientSession() as s:
            f = Feeds(tf.settings(tmp_path, base), lambda *a: None, lambda e: None,
                      lambda *a: rests.append(a), lambda *a: lifts.append(a))  # fmt: skip
            await f.snds_once(s)
            assert not lifts
            green = tf.SNDS_CSV.replace("RED,1.4%", "GREEN,< 0.1%").replace(",3,out2", ",0,out2")
            monkeypatch.setattr(tf, "SNDS_CSV", green)
            await f.snds_once(s)
            await f.snds_once(s)

    asyncio.run(main())
    assert [(r[0], r[1], r[4]) for r in rests] == [("127.0.0.3", ["outlook"], "snds")]
    assert lifts == [("127.0.0.3", "snds")]


def test_a_provider_over_the_line_across_tenants_is_an_alarm(tmp_path: Path) -> None:
    """Each of three tenants sends Gmail 150 messages from its own IP with 2
    complaints: every tenant's provider group and every IP is under the sample
    (200), so nothing was raised, while Gmail saw 1.3% complaints over the node's
    450. The node's mail per provider is judged too ("tenant": "*")."""
    from fastsend.analytics.alarms import Alarms
    from fastsend.analytics.rollup import _node_rows
    from fastsend.analytics.store import IDX, NC, SQLiteRollupStore
    from fastsend.config.analytics import AlarmSettings

    store = SQLiteRollupStore(str(tmp_path))
    events: list[dict[str, Any]] = []
    alarms = Alarms(AlarmSettings(min_delivered=200), store, events.append)
    now = time.time()
    t = int(now) - int(now) % 60
    counts = {}
    for cid, tenant, ip in ((1, "acme", "127.0.0.2"), (2, "beta", "127.0.0.3"),
                            (3, "gamma", "127.0.0.4")):  # fmt: skip
        row = [0] * NC
        row[IDX["delivered"]], row[IDX["complaints"]] = 150, 2
        counts[(60, t, (tenant, cid, "google", ip))] = row
    _node_rows(counts, {})
    store.add(counts, {}, {})
    alarms.evaluate(["acme", "beta", "gamma"], now)
    assert [(e["event"], e["tenant"], e.get("provider"), e["kind"], e["level"])
            for e in events] == [("alarm", "*", "google", "complaint_rate", "critical")]
    assert events[0]["delivered"] == 450
    alarms.evaluate(["acme", "beta", "gamma"], now)  # told once
    assert len(events) == 1
    store.close()


class _Hook:
    """A webhook receiver on loopback (its own thread): what was posted to it."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.posts: list[tuple[str, bytes]] = []  # (Fastsend-Signature, body)
        hook = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.posts.append((self.headers.get("Fastsend-Signature", ""), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, secret: str) -> list[dict[str, Any]]:
        """The events of the posts signed with ``secret`` (others are not counted)."""
        import hashlib
        import hmac

        out = []
        for sig, body in list(self.posts):
            parts = dict(kv.split("=", 1) for kv in sig.split(","))
            want = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body,
                            hashlib.sha256).hexdigest()  # fmt: skip
            if hmac.compare_digest(want, parts["v1"]):
                out.extend(orjson.loads(body))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_sighup_applies_new_webhook_urls_and_secret(tmp_path: Path) -> None:
    """An operator rotating the webhook secret (or moving the endpoint) and sending
    SIGHUP: serve said "configuration reloaded" and kept posting to the old URL
    with the old secret until restarted, so the receiver refused every batch."""
    import signal

    from tests._serve_helpers import Served

    old, new = _Hook(), _Hook()
    s1, s2 = "old-secret-0123456789", "new-secret-9876543210"

    def hooks(url: str, secret: str) -> str:
        return (f'[webhooks]\nurls = ["{url}"]\nsecret = "{secret}"\nflush_interval = 0.05\n'
                'events = ["accepted"]\n')  # fmt: skip

    def post(subject: str) -> int:
        st, body = s.req("POST", "/v1/messages", {"from": "a@example.com", "subject": subject,
                                                   "text": "t", "to": ["u@example.org"]},
                         tenant="acme")  # fmt: skip
        assert st == 202, body
        return int(body["messages"][0]["ids"][0])

    def wait(cond: Any) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    s = Served(tmp_path, None, hooks(old.url, s1), serve_args=("--no-workers",))
    try:
        first = post("before")
        wait(lambda: [e["id"] for e in old.events(s1)] == [first])
        s.extra = hooks(new.url, s2)
        s.write_config()
        s.proc.send_signal(signal.SIGHUP)
        s.wait_line("configuration reloaded")
        second = post("after")
        wait(lambda: [e["id"] for e in new.events(s2)] == [second])
        assert [e["id"] for e in old.events(s1)] == [first]  # the old URL gets no more
    finally:
        s.stop()
        old.close()
        new.close()


def test_metrics_show_each_source_ip_on_each_blocklist(tmp_path: Path, dns_server: Any) -> None:
    """A listing was an event (webhooks) and a dashboard line, and nothing Prometheus
    could alert on."""
    from fastsend.analytics.dnsbl import Reputation, ReputationSettings, make_resolver
    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.metrics import Metrics

    dns_server.set_zones({"2.0.0.127.bl.test": [("A", "127.0.0.2")]})
    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")},
                     "dns": {"nameservers": [dns_server.nameserver], "timeout": 2},
                     "ips": {"source": ["127.0.0.2", "127.0.0.3"]},
                     "reputation": {"blocklists": ["bl.test"]}})  # fmt: skip
    ctx = open_context(cfg)
    try:
        ctx.reputation = Reputation(ReputationSettings.from_config(cfg), make_resolver(cfg),
                                    ctx.emit)  # fmt: skip
        asyncio.run(ctx.reputation.check_ips(["127.0.0.2", "127.0.0.3"]))
        text = Metrics(ctx).render()
        assert "# TYPE fastsend_blocklist_listed gauge" in text
        assert 'fastsend_blocklist_listed{source_ip="127.0.0.2",zone="bl.test"} 1' in text
        assert 'fastsend_blocklist_listed{source_ip="127.0.0.3",zone="bl.test"} 0' in text
    finally:
        ctx.close()


def test_a_receivers_retry_after_is_kept(tmp_path: Path) -> None:
    """A receiver answering 429 with Retry-After was tried again after retry_min (1 s
    by default, doubling): it asked for a pause and got a stream of refused batches."""
    from email.utils import formatdate

    from aiohttp import web

    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.webhooks import WebhookDispatcher, retry_after
    from fastsend.testing.http import app_on_loopback

    assert retry_after("120") == 120.0 and retry_after("") == 0.0 and retry_after("soon") == 0.0
    assert 55 < retry_after(formatdate(time.time() + 60, usegmt=True)) <= 61
    seen: list[float] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        seen.append(time.monotonic())
        if len(seen) == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        async with app_on_loopback(app) as base:
            ctx = open_context(from_dict({
                "spool": {"dir": str(tmp_path / "spool")},
                "webhooks": {"urls": [f"{base}/hook"], "secret": "0123456789abcdefghij",
                             "retry_min": 0.02, "flush_interval": 0.01}}))  # fmt: skip
            d = WebhookDispatcher(ctx)
            await d.start()
            try:
                ctx.emit({"event": "delivered", "id": 1, "rcpt": "r@example.org"})
                deadline = time.monotonic() + 60
                while len(seen) < 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
            finally:
                await d.stop()
                ctx.close()

    asyncio.run(main())
    assert seen[1] - seen[0] >= 0.95  # not before the second the receiver asked for


def test_a_scrape_reads_the_spools_figures_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics counted the spool's states and every pending message's age on serve's
    event loop, which also carries the supervisor's dispatch and every request: ~0.45 s
    a scrape at 500,000 pending (Prometheus scrapes every 15 s). They are made in a
    thread on a read-only connection now, and counted by SQLite."""
    import threading

    from aiohttp.test_utils import make_mocked_request

    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.metrics import Metrics
    from fastsend.spool.sqlite import SQLiteSpool

    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}}))
    cid = ctx.spool.create_campaign({"from": "a@example.com", "subject": "s", "text": "t"},
                                    status="paused")  # fmt: skip
    now = time.time()
    ctx.spool.add_messages(cid, [(f"u{i}@d{i % 3}.example", f"d{i % 3}.example", b"{}")
                                 for i in range(30)], now - 7200)  # fmt: skip
    ctx.spool.add_messages(cid, [(f"v{i}@d0.example", "d0.example", b"{}") for i in range(5)],
                           now)  # fmt: skip
    threads: list[int] = []
    shape = SQLiteSpool.queue_shape

    def spy(self: Any, at: float) -> Any:
        threads.append(threading.get_ident())
        return shape(self, at)

    monkeypatch.setattr(SQLiteSpool, "queue_shape", spy)
    m = Metrics(ctx)

    async def scrape() -> str:
        resp = await m.handler(make_mocked_request("GET", "/metrics"))
        assert resp.body is not None
        return bytes(resp.body).decode()  # type: ignore[arg-type]

    try:
        text = asyncio.run(scrape())
        assert threads and threading.get_ident() not in threads
        assert "fastsend_queue_depth 35" in text
        assert 'fastsend_queue_age{le_minutes="5"} 5' in text
        assert 'fastsend_messages{state="queued"} 35' in text
    finally:
        ctx.close()


class SizeLimitedHook:
    """A webhook receiver on loopback that answers 413 to a batch of more than
    ``limit[0]`` events (its body limit, changeable while it runs), with a
    WebhookDispatcher feeding it (batch_size 8): what it took, batch by batch."""

    def __init__(self, tmp_path: Path, limit: int) -> None:
        self.tmp_path, self.limit = tmp_path, [limit]
        self.got: list[int] = []
        self.sizes: list[int] = []

    async def _hook(self, request: Any) -> Any:
        from aiohttp import web

        batch = orjson.loads(await request.read())
        if len(batch) > self.limit[0]:
            return web.Response(status=413)
        self.sizes.append(len(batch))
        self.got.extend(e["id"] for e in batch)
        return web.Response(status=204)

    async def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.got) < n:
            assert time.monotonic() < deadline, self.got
            await asyncio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Any]:
        """Yield the dispatcher's context (emit events on ``ctx.events``)."""
        from aiohttp import web

        from fastsend.config import from_dict
        from fastsend.serve.context import open_context
        from fastsend.serve.webhooks import WebhookDispatcher
        from fastsend.testing.http import app_on_loopback

        app = web.Application()
        app.router.add_post("/hook", self._hook)
        async with app_on_loopback(app) as base:
            ctx = open_context(from_dict({
                "spool": {"dir": str(self.tmp_path / "spool")},
                "webhooks": {"urls": [f"{base}/hook"], "secret": "0123456789abcdefghij",
                             "batch_size": 8, "retry_min": 30, "flush_interval": 0.01}}))  # fmt: skip
            d = WebhookDispatcher(ctx)
            await d.start()
            try:
                yield ctx
            finally:
                await d.stop()
                ctx.close()


def test_a_413_halves_the_batch_instead_of_holding_the_url(tmp_path: Path) -> None:
    """A receiver whose body limit is under a batch answered 413 to it for ever (until
    retention_days): every later event for the URL waited behind it."""
    rx = SizeLimitedHook(tmp_path, 2)

    async def main() -> None:
        async with rx.running() as ctx:
            ctx.events.emit_many(_evs("delivered", range(8)))
            await rx.wait_for(8)

    asyncio.run(main())
    assert rx.got == list(range(8)) and max(rx.sizes) <= 2
