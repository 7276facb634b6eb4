"""Deliverability audit, session 21: what one MX host's refusal at the
greeting (or its silence) says, and what it does not. RFC 5321 5.1: a client
tries the next MX host when one refuses or does not answer; Postfix skips a
host greeting 5xx (smtp_skip_5xx_greeting) and caps the greeting wait of a
host that is not the last one (smtp_connect_timeout/smtp_helo_timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socketserver
import threading
import time as real_time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import run_fastsend, summary, write_campaign, write_recipients

from _smtp_helpers import aiosmtpd_server
from conftest import free_port
from fastsend.config import loader
from fastsend.delivery import pool
from fastsend.delivery.mx import Host, Site
from fastsend.outcome import Envelope, TxnResult
from fastsend.testing.dnsserver import DNSServer

Run = Callable[[Any], Any]


@contextlib.contextmanager
def greeter(host: str, port: int, greeting: bytes, ehlo: bytes = b"") -> Iterator[list[int]]:
    """A server on ``host``:``port`` that greets with ``greeting`` and closes
    (b"": accepts the connection and never greets), or with ``ehlo`` given,
    greets 220 and answers EHLO and HELO with it; yields the count of
    connections it took, in a list."""
    seen = [0]
    stop = threading.Event()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            seen[0] += 1
            if ehlo:
                self.wfile.write(greeting)
                while line := self.rfile.readline():
                    verb = line[:4].upper()
                    if verb == b"QUIT":
                        self.wfile.write(b"221 2.0.0 Bye\r\n")
                        return
                    self.wfile.write(ehlo if verb in (b"EHLO", b"HELO") else b"503 5.5.1 no\r\n")
            elif greeting:
                self.wfile.write(greeting)
                with contextlib.suppress(OSError):
                    self.rfile.readline()  # (a QUIT, or the close)
            else:
                stop.wait(120)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def deliver(
    run: Run,
    site: Site,
    n: int,
    tmp: str,
    delivery: dict[str, Any] | None = None,
    max_messages: int = 0,
    refresh: Site | None = None,
) -> tuple[list[TxnResult], pool.SiteQueue]:
    """``n`` messages to ``site`` from 127.0.0.1, one connection at a time:
    every result reported, and the site queue (its lanes, its shaper);
    ``refresh``: the site's next DNS answer, given before the mail."""
    d = {"pipeline": 2, "max_connections": 1, **(delivery or {})}
    if max_messages:
        d["max_messages_per_connection"] = max_messages
    cfg = loader.from_dict({"delivery": d}, base_dir=tmp, files=False)
    results: list[TxnResult] = []
    holder: list[pool.SiteQueue] = []

    async def go() -> None:
        done = asyncio.Event()

        def report(rs: list[TxnResult], ip: str, mx: str) -> None:
            results.extend(rs)
            if len(results) >= n:
                done.set()

        def handback(envs: list[Envelope], *_a: Any) -> None:
            results.extend(TxnResult(e.tag, []) for e in envs)
            if len(results) >= n:
                done.set()

        q = pool.SiteQueue(site, ["127.0.0.1"], cfg, report, "localhost", handback=handback)
        holder.append(q)
        if refresh is not None:
            q.site = refresh  # (as Worker.site_queue does)
        body = b"Subject: x\r\n\r\nhi\r\n"
        q.push([Envelope("s@example.org", [f"r{i}@x.example"], body, tag=i) for i in range(n)])
        await asyncio.wait_for(done.wait(), 60)  # only a hang reaches it
        await q.close()

    run(go())
    return results, holder[0]


REFUSALS = [
    b"554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.spamhaus.org\r\n",
    b"554 No SMTP service here\r\n",
    b"554 5.7.1 Access denied\r\n",
    b"421 4.3.2 Service not available, closing transmission channel\r\n",
]


@pytest.mark.parametrize("greeting", REFUSALS, ids=["spamhaus", "no-service", "denied", "421"])
def test_a_refusing_preferred_mx_leaves_the_mail_to_the_backup(
    run: Run, tmp_path: Any, greeting: bytes
) -> None:
    """The preferred MX greets with a refusal, the backup takes mail: every
    message goes to the backup (RFC 5321 5.1; Postfix's smtp_skip_5xx_greeting),
    the source IP is not rested for the site (the evidence is about one
    host), and later connections try the backup first. Before, the refusal
    rested the IP for the whole site for an hour: the backup's session was
    opened and not used, the mail handed back for the hour."""
    port = free_port()
    site = Site(
        "mx:mx1.example.test,mx2.example.test",
        (
            Host("mx1.example.test", "127.0.0.9", port, 10),
            Host("mx2.example.test", "127.0.0.1", port, 20),
        ),
    )
    with greeter("127.0.0.9", port, greeting) as seen, aiosmtpd_server(port) as (_c, backup):
        results, q = deliver(run, site, 6, str(tmp_path), max_messages=2)
    assert [
        (r.tag, [o.kind for o in r.outcomes]) for r in sorted(results, key=lambda r: r.tag)
    ] == [(i, ["delivered"]) for i in range(6)]
    assert len(backup.messages) == 6
    assert q.lane("127.0.0.1").blocked_until == 0.0
    assert seen[0] == 1  # three sessions, the refusing host tried by the first only
    # one event; a 4xx (busy for now) keeps the host last for 5 minutes, a 5xx an hour
    refused = [e for e in q.shaper.events if e["action"] == "host_refused"]
    assert [e["duration"] for e in refused] == [300.0 if greeting[:1] == b"4" else 3600.0]
    assert refused[0]["mx"].startswith("mx1.example.test[127.0.0.9]")


def test_every_mx_refusing_still_rests_the_ip_for_the_site(run: Run, tmp_path: Any) -> None:
    """Both MX hosts refuse the address naming a block list: now the evidence
    is about the site, the lane rests (as before) and the mail is handed
    back until the rest ends, with the block's words in the rest's reason."""
    port = free_port()
    site = Site(
        "mx:mx1.example.test,mx2.example.test",
        (
            Host("mx1.example.test", "127.0.0.9", port, 10),
            Host("mx2.example.test", "127.0.0.1", port, 20),
        ),
    )
    with greeter("127.0.0.9", port, REFUSALS[0]), greeter("127.0.0.1", port, REFUSALS[0]):
        results, q = deliver(run, site, 3, str(tmp_path))
    got = sorted((r.tag, [(o.kind, o.code) for o in r.outcomes]) for r in results)
    # every message handed back, unattempted, until the rest ends (before
    # guard24's audit the first connection's group was deferred with the
    # refusal, an attempt counted for mail no server was offered)
    assert got == [(0, []), (1, []), (2, [])]
    ln = q.lane("127.0.0.1")
    assert ln.blocked_until > 0.0 and "spamhaus" in ln.blocked_reason
    actions = [e["action"] for e in q.shaper.events]
    assert actions.count("rest") == 1 and actions.count("host_refused") == 1


def test_a_preferred_mx_that_never_greets_gives_way_after_next_mx_after(
    run: Run, tmp_path: Any
) -> None:
    """The preferred MX takes the TCP connection and never greets: the backup
    gets the mail once ``next_mx_after`` (here 1 s) has passed, not after the
    whole command_timeout (300 s: the test's 60 s wait met it before), and
    the next connections go to the backup first."""
    port = free_port()
    site = Site(
        "mx:mx1.example.test,mx2.example.test",
        (
            Host("mx1.example.test", "127.0.0.9", port, 10),
            Host("mx2.example.test", "127.0.0.1", port, 20),
        ),
    )
    with greeter("127.0.0.9", port, b"") as seen, aiosmtpd_server(port) as (_c, backup):
        results, _q = deliver(run, site, 4, str(tmp_path), {"next_mx_after": 1.0}, max_messages=2)
    assert sorted((r.tag, r.outcomes[0].kind) for r in results) == [
        (i, "delivered") for i in range(4)
    ]
    assert len(backup.messages) == 4 and seen[0] == 1


def test_mx_fallback_and_session_refusals_through_the_binary(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """``fastsend send`` through real DNS: backup.test's preferred MX greets
    "554 ... blocked using zen.spamhaus.org", its backup takes the mail: all
    delivered by the backup, a ``host_refused`` shaping event, no rest of the
    address (it rested the IP for the site an hour, the mail deferred).
    ehlo.test's only MX answers EHLO and HELO "550 5.1.1": the site's
    refusal of the client, deferred (interop24: it was bounced, "rejected";
    before that as userunknown, every recipient of the batch suppressed), no
    recipient suppressed."""
    port = free_port()
    dns_server.set_zones(
        {
            "backup.test": [("MX", "10 mx1.backup.test."), ("MX", "20 mx2.backup.test.")],
            "mx1.backup.test": [("A", "127.0.0.9")],
            "mx2.backup.test": [("A", "127.0.0.1")],
            "ehlo.test": [("MX", "10 mx.ehlo.test.")],
            "mx.ehlo.test": [("A", "127.0.0.10")],
        }
    )
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(
        tmp_path, [f"u{i}@backup.test" for i in range(5)] + ["a@ehlo.test", "b@ehlo.test"]
    )
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[ips]\nsource = ["127.0.0.2"]\n[workers]\ncount = 1\n'
        "[delivery]\nallow_private_mx = true\n"
    )
    refuse = (
        b"554 5.7.1 Service unavailable; Client host [127.0.0.2] blocked using zen.spamhaus.org\r\n"
    )
    with (
        greeter("127.0.0.9", port, refuse),
        greeter("127.0.0.10", port, b"220 ehlo.test ESMTP\r\n", b"550 5.1.1 User unknown\r\n"),
        aiosmtpd_server(port) as (_ctl, handler),
    ):
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
            "--max-wait", "1",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"], s["deferred"]) == (5, 0, 2), s
    assert len(handler.messages) == 5
    events = [
        orjson.loads(x) for x in (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()
    ]
    assert [e for e in events if e["event"] == "bounced"] == []
    shaping = [
        orjson.loads(x) for x in (tmp_path / "spool" / "shaping.jsonl").read_bytes().splitlines()
    ]
    assert [e["action"] for e in shaping if e.get("action") in ("rest", "suspend")] == []
    refused = [e for e in shaping if e.get("action") == "host_refused"]
    assert len(refused) == 1 and refused[0]["mx"].startswith("mx1.backup.test[127.0.0.9]")
    listed = run_fastsend("suppress", "list", "--spool", str(tmp_path / "spool")).stdout
    assert "ehlo.test" not in listed


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "stage"),
    [
        (550, "5.1.1", "User unknown", "ehlo"),
        (550, "5.1.1", "<a@x.test>: Recipient address rejected: User unknown", "helo"),
        (552, "5.2.2", "Mailbox full", "greeting"),
        (550, "5.1.1", "No such user here", "auth"),
    ],
)
def test_a_mailbox_reason_before_mail_is_the_sites_refusal(
    code: int, enhanced: str, text: str, stage: str
) -> None:
    """No recipient is named before MAIL: a mailbox's words there (a server's
    misworded refusal of the client) are "rejected", never hard (they
    suppressed every recipient of the batch as userunknown)."""
    from fastsend.bounce.reply import classify_reply

    c = classify_reply(code, enhanced, text, command=stage)
    assert (c.reason, c.hard) == ("rejected", False)
    assert classify_reply(code, enhanced, text, command="rcpt").reason != "rejected"


class _Clock:
    """``time`` for delivery.pool with a wall clock the test moves (monotonic real)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return real_time.monotonic()


def test_a_session_across_utc_midnight_counts_against_the_new_days_cap(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warming address (caps 6 then 4 a day per provider) keeps one session
    open across UTC midnight: what it sends after midnight counts against the
    new day's cap, 4 in all that day, the rest handed back. Before, the
    session kept counting on yesterday's counter (3 left), then today's
    started at zero: 7 sent on a day capped at 4."""
    midnight = (real_time.time() // 86400 + 1) * 86400
    clock = _Clock(midnight - 60)
    monkeypatch.setattr(pool, "time", clock)
    start = dt.datetime.fromtimestamp(midnight - 60, dt.UTC).date().isoformat()
    port = free_port()
    cfg = loader.from_dict(
        {
            "workers": {"count": 1},
            "delivery": {"pipeline": 1, "max_connections": 1, "idle_timeout": 30},
            "pools": {
                "warmup": {"schedule": [6, 4]},
                "main": {"ips": [{"ip": "127.0.0.1", "warmup_start": start}]},
            },
        },
        base_dir=str(tmp_path),
        files=False,
    )
    site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
    day2: list[str] = []
    results: list[TxnResult] = []

    async def go() -> None:
        want = [6]
        done = asyncio.Event()

        def note(rs: list[TxnResult], kind: str) -> None:
            for r in rs:
                results.append(r)
                if clock.t >= midnight:
                    day2.append(kind)
            if sum(1 for r in results if r.outcomes) == 3 and clock.t < midnight:
                clock.t = midnight + 60  # three sent: the session goes on past midnight
            if len(results) >= want[0]:
                done.set()

        def report(rs: list[TxnResult], ip: str, mx: str) -> None:
            note(rs, rs[0].outcomes[0].kind)

        def handback(envs: list[Envelope], *_a: Any) -> None:
            note([TxnResult(e.tag, []) for e in envs], "back")

        q = pool.SiteQueue(site, ["127.0.0.1"], cfg, report, "localhost", handback=handback)
        body = b"Subject: x\r\n\r\nhi\r\n"
        envs = [Envelope("s@example.org", [f"r{i}@x.example"], body, tag=i) for i in range(10)]
        q.push(envs[:6])
        await asyncio.wait_for(done.wait(), 60)  # only a hang reaches it
        done.clear()
        want[0] = 10
        q.push(envs[6:])
        await asyncio.wait_for(done.wait(), 60)
        await q.close()

    with aiosmtpd_server(port) as (_c, handler):
        asyncio.run(go())
    assert (day2.count("delivered"), day2.count("back")) == (4, 3), day2
    assert len(handler.messages) == 7


@pytest.mark.parametrize(
    "text",
    [
        "<localhost>: Helo command rejected: need fully-qualified hostname",
        "Syntactically invalid EHLO argument(s)",
        "bad helo",
    ],
)
def test_a_refused_helo_name_at_ehlo_rests_no_ip(text: str) -> None:
    """A HELO name refused at EHLO itself (Postfix's helo restrictions without
    smtpd_delay_reject, Exim's "Syntactically invalid EHLO argument(s)") is
    the name's matter: no rest of the address (the rule for refusals at
    connect read it as an IP block: an hour's rest for the site); a block
    list named in the same words still is one."""
    from fastsend.bounce.reply import classify_reply

    c = classify_reply(550, "", text, command="ehlo")
    assert (c.reason, c.ip_blocked) == ("blocked", False)
    listed = classify_reply(550, "", f"{text}; your IP is blacklisted", command="ehlo")
    assert listed.ip_blocked


def test_a_refreshed_dns_answer_is_followed(run: Run, tmp_path: Any) -> None:
    """The worker hands a site queue its MX set's refreshed DNS answer
    (Worker.site_queue: ``q.site = site``; here the MX host moved from
    127.0.0.9, nothing listening, to 127.0.0.1): new connections go to the
    new address. Before, the queue kept the addresses it was made with for
    as long as it lived (a serve's whole life): every connection failed."""
    port = free_port()
    old = Site("mx:mx.example.test", (Host("mx.example.test", "127.0.0.9", port, 10),))
    new = Site("mx:mx.example.test", (Host("mx.example.test", "127.0.0.1", port, 10),))
    with aiosmtpd_server(port) as (_c, handler):
        results, _q = deliver(run, old, 3, str(tmp_path), refresh=new)
    assert sorted((r.tag, r.outcomes[0].kind) for r in results) == [
        (i, "delivered") for i in range(3)
    ]
    assert len(handler.messages) == 3
