"""A site queue's connections (delivery/pool.py) against real receivers:
the size of each pipelined group a connection takes (Postfix's smtp-sink), a
receiver that ends each session after N messages (Exim), and the fallback to
the next MX host when a host's addresses do not answer (aiosmtpd)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socketserver
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from _smtp_helpers import aiosmtpd_server
from conftest import free_port, require_program, start_exim, wait_port
from fastsend.config import loader
from fastsend.delivery import pool
from fastsend.delivery.mx import Host, Site
from fastsend.outcome import Envelope, TxnResult

Run = Callable[[Any], Any]


@contextlib.contextmanager
def smtp_sink(*options: str) -> Iterator[int]:
    exe = require_program("smtp-sink")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    cmd = [exe, "-4", *user, *options, f"127.0.0.1:{port}", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def send_groups(
    run: Run,
    port: int,
    n: int,
    tmp: str,
    pipeline: int = 4,
    site: Site | None = None,
    connections: int = 1,
    rcpts: int = 1,
    names: Callable[[int], str] | None = None,
    delivery: dict[str, Any] | None = None,
    **connect: Any,
) -> list[list[TxnResult]]:
    """``n`` messages through up to ``connections`` connections at a time
    (``pipeline`` per group): the groups reported. ``names``: the local part
    of message ``i``'s recipient (one each; default ``r{i}``); ``delivery``:
    more of the [delivery] section."""
    cfg = loader.from_dict(
        {"delivery": {"pipeline": pipeline, "max_connections": connections, **(delivery or {})}},
        base_dir=tmp,
        files=False,
    )
    if site is None:
        site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
    groups: list[list[TxnResult]] = []

    async def go() -> None:
        done = asyncio.Event()

        def report(results: list[TxnResult], ip: str, mx: str) -> None:
            groups.append(results)
            if sum(len(r.outcomes) for g in groups for r in g) >= n:
                done.set()

        q = pool.SiteQueue(
            site, ["127.0.0.1"], cfg, report, "localhost", connect_options=connect or None
        )
        body = b"Subject: x\r\n\r\nhi\r\n"
        if rcpts == 1:
            local = names or (lambda i: f"r{i}")
            envs = [
                Envelope("s@example.org", [f"{local(i)}@x.example"], body, tag=i) for i in range(n)
            ]
        else:  # identical messages: one transaction for `rcpts` recipients
            envs = [
                Envelope(
                    "s@example.org",
                    [f"r{i}@x.example" for i in range(k, k + rcpts)],
                    body,
                    tag=list(range(k, k + rcpts)),
                )
                for k in range(0, n, rcpts)
            ]
        q.push(envs)
        await asyncio.wait_for(done.wait(), 120)  # only a hang reaches it (CI: 4 tests on 2 cores)
        await q.close()

    run(go())
    return groups


def test_groups_all_delivered_in_time_double_up_to_four_pipelines(
    run: Run, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "GROUP_QUICK", 3600.0)  # any group is answered in time
    with smtp_sink() as port:
        groups = send_groups(run, port, 4 + 8 + 16 + 16 + 16 + 3, str(tmp_path))
    assert [len(g) for g in groups] == [4, 8, 16, 16, 16, 3]
    assert [r.tag for g in groups for r in g] == list(range(63))
    assert all(o.delivered for g in groups for r in g for o in r.outcomes)


def test_groups_stay_at_pipeline_when_slow_or_not_all_delivered(
    run: Run, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "GROUP_QUICK", 0.0)  # no group is answered in time
    with smtp_sink() as port:
        groups = send_groups(run, port, 12, str(tmp_path))
    assert [len(g) for g in groups] == [4, 4, 4]
    monkeypatch.setattr(pool, "GROUP_QUICK", 3600.0)
    with smtp_sink("-f", "RCPT") as port:  # every recipient refused (5xx)
        groups = send_groups(run, port, 12, str(tmp_path))
    assert [len(g) for g in groups] == [4, 4, 4]
    assert all(o.failed for g in groups for r in g for o in r.outcomes)


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_a_receiver_that_ends_each_session_after_n_messages_gets_the_rest_on_new_ones(
    run: Run, tmp_path: Any, chunking: bool
) -> None:
    """Exim answers 421 "too many messages in this connection" to the MAIL
    after 10 (smtp_accept_max_per_connection): the rest of a pipelined group
    was never taken (nor refused) by it, so it goes out on a new session,
    not back to the queue as deferred (a retry interval later, an attempt
    counted, a deferral for the shaping to slow down on) -- as Postfix, which
    has one message in flight, would lose none."""
    with start_exim("smtp_accept_max_per_connection = 10\n") as exim:
        groups = send_groups(run, exim.port, 60, str(tmp_path), 25, chunking=chunking)
        received = exim.received()
    outcomes = [o for g in groups for r in g for o in r.outcomes]
    assert sorted(r.tag for g in groups for r in g) == list(range(60))
    assert [o for o in outcomes if not o.delivered] == []
    assert len(received) == 60


def test_a_host_whose_addresses_do_not_answer_falls_back_to_the_next_mx(
    run: Run, tmp_path: Any
) -> None:
    """The preferred MX has three addresses and none answers: the next MX
    (RFC 5321 5.1: try the next in preference order) still gets the mail. It
    used to be left untried: only the site's first three addresses were."""
    port = free_port()
    dead = [Host("mx1.example.test", f"127.0.0.{i}", port) for i in (9, 10, 11)]
    site = Site(
        "mx:mx1.example.test,mx2.example.test",
        (*dead, Host("mx2.example.test", "127.0.0.1", port)),
    )
    with aiosmtpd_server(port) as (_ctl, handler):
        groups = send_groups(run, port, 6, str(tmp_path), site=site)
    assert [o.delivered for g in groups for r in g for o in r.outcomes] == [True] * 6
    assert len(handler.messages) == 6


def test_connections_over_the_receivers_limit_leave_the_mail_to_the_others(
    run: Run, tmp_path: Any
) -> None:
    """Exim takes 2 connections per client IP (smtp_accept_max_per_host) and
    greets the rest with 421 "Too many concurrent SMTP connections": those
    connections end and leave their mail to the two that work, instead of
    each deferring a group for a retry interval (600 messages over 8
    connections: ~9,900 deferrals for 3,000 through the real binary before)."""
    with start_exim("smtp_accept_max_per_host = 2\n") as exim:
        groups = send_groups(run, exim.port, 600, str(tmp_path), 25, connections=8)
        received = exim.received()
    outcomes = [o for g in groups for r in g for o in r.outcomes]
    assert sorted(r.tag for g in groups for r in g) == list(range(600))
    assert [o for o in outcomes if not o.delivered][:3] == []
    assert len(received) == 600


def test_recipients_over_the_receivers_limit_go_in_the_next_transaction(
    run: Run, tmp_path: Any
) -> None:
    """Exim takes 10 recipients per message (recipients_max) and answers the
    11th RCPT "452 too many recipients": the rest of a 25-recipient
    transaction goes in the next transaction on the same connection (RFC
    5321 4.5.3.1.10; Postfix does the same), not back to the queue as
    deferred for a retry interval (300 identical messages: 286 deferrals
    through the binary before)."""
    with start_exim("recipients_max = 10\n") as exim:
        groups = send_groups(run, exim.port, 75, str(tmp_path), rcpts=25)
        received = exim.received()
    ids = sorted(i for g in groups for r in g for i in r.tag)
    outcomes = [o for g in groups for r in g for o in r.outcomes]
    assert ids == list(range(75)) and len(outcomes) == 75
    assert [o for o in outcomes if not o.delivered][:3] == []
    assert sorted(r for _s, rs in received for r in rs) == sorted(
        f"r{i}@x.example" for i in range(75)
    )
    assert max(len(rs) for _s, rs in received) == 10


def test_equal_preference_hosts_share_the_connections(run: Run, tmp_path: Any) -> None:
    """Two MX hosts of one preference (RFC 5321 5.1: spread the load) and a
    backup: new connections take the two in turn (one message per connection
    here), the backup none. Before, every connection went to the first."""
    port = free_port()
    site = Site(
        "mx:a.example.test,b.example.test,c.example.test",
        (
            Host("a.example.test", "127.0.0.1", port, 10),
            Host("b.example.test", "127.0.0.5", port, 10),
            Host("c.example.test", "127.0.0.6", port, 20),
        ),
    )
    with (
        aiosmtpd_server(port) as (_c1, first),
        aiosmtpd_server(port, host="127.0.0.5") as (_c2, second),
        aiosmtpd_server(port, host="127.0.0.6") as (_c3, backup),
    ):
        groups = send_groups(run, port, 8, str(tmp_path), site=site, max_messages=1)
    assert [o.delivered for g in groups for r in g for o in r.outcomes] == [True] * 8
    assert (len(first.messages), len(second.messages), len(backup.messages)) == (4, 4, 0)


@contextlib.contextmanager
def closing_server(
    after: int, reply: bytes, rcpt_limit: int = 0, rcpt_reply: bytes = b"", verb: bytes = b"MAIL"
) -> Iterator[tuple[int, list[int]]]:
    """A pipelining SMTP server (in a thread) that answers the MAIL (or
    ``verb``: DATA) after ``after`` messages with ``reply`` and closes
    (``after`` < 0: never), and
    RCPTs beyond ``rcpt_limit`` per transaction with ``rcpt_reply``; yields
    (port, messages per session)."""
    sessions: list[int] = []
    refused = verb

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            n = rcpts = 0
            sessions.append(0)
            k = len(sessions) - 1
            self.wfile.write(b"220 scripted ESMTP\r\n")
            while line := self.rfile.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.wfile.write(b"250-scripted\r\n250 PIPELINING\r\n")
                elif verb == refused and n == after:
                    self.wfile.write(reply)
                    return
                elif verb == b"MAIL":
                    rcpts = 0
                    self.wfile.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT" and rcpt_limit and rcpts >= rcpt_limit:
                    self.wfile.write(rcpt_reply)
                elif verb == b"RCPT":
                    rcpts += 1
                    self.wfile.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    self.wfile.write(b"354 go\r\n")
                    while self.rfile.readline() not in (b".\r\n", b""):
                        pass
                    n += 1
                    sessions[k] = n
                    self.wfile.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    self.wfile.write(b"250 2.0.0 Ok\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], sessions
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("reply", "again"),
    [
        (b"421 4.7.0 Too many messages in this session, closing\r\n", True),
        (b"421 4.7.28 Unusual rate of unsolicited mail from your IP, closing\r\n", False),
        (b"421 4.7.0 Try again later, closing connection.\r\n", False),
    ],
    ids=["per-session-cap", "rate", "try-later"],
)
@pytest.mark.parametrize("verb", [b"MAIL", b"DATA"], ids=["mail", "data"])
def test_a_421_that_asks_to_slow_down_is_deferred_not_resent_at_once(
    run: Run, tmp_path: Any, reply: bytes, again: bool, verb: bytes
) -> None:
    """The server ends the session with 421 at the third MAIL (or DATA) of a
    group. A per-session cap ("in this session") sends the rest on a new
    session at once; a 421 about the rate or a plain "try again later" is the
    receiver asking to slow down: the rest is deferred with it (and the
    shaping reads it), not sent again on a new session. The same 421 to DATA
    (before its 354: nothing of the message sent) was a deferral even for a
    per-session cap (stage "data", as a reply to the final dot; shape26's
    audit)."""
    with closing_server(2, reply, verb=verb) as (port, sessions):
        groups = send_groups(run, port, 8, str(tmp_path), 8)
    outcomes = sorted((r.tag, r.outcomes[0].kind, r.outcomes[0].code) for g in groups for r in g)
    if again:
        assert [k for _t, k, _c in outcomes] == ["delivered"] * 8
        assert sessions == [2, 2, 2, 2]
    else:
        assert [(k, c) for _t, k, c in outcomes] == [("delivered", 250)] * 2 + [
            ("deferred", 421)
        ] * 6
        assert sessions == [2]


@pytest.mark.parametrize(
    "reply",
    [b"452 4.5.3 Error: too many recipients\r\n", b"552 5.5.3 Too many recipients\r\n"],
    ids=["452", "552"],
)
def test_too_many_recipients_452_or_552_go_in_the_next_transaction(
    run: Run, tmp_path: Any, reply: bytes
) -> None:
    """Postfix's reply to the RCPT over smtpd_recipient_limit, and the 552
    RFC 821 gave it (RFC 5321 4.5.3.1.10: "clients SHOULD treat a 552 code in
    this case as a temporary, rather than permanent, failure"): the rest of
    the transaction goes in the next one, none bounced."""
    with closing_server(-1, b"", rcpt_limit=4, rcpt_reply=reply) as (port, sessions):
        groups = send_groups(run, port, 20, str(tmp_path), rcpts=10)
    outcomes = [o for g in groups for r in g for o in r.outcomes]
    assert sorted(i for g in groups for r in g for i in r.tag) == list(range(20))
    assert [o for o in outcomes if not o.delivered][:3] == []
    assert sum(sessions) == 6  # 4 + 4 + 2 recipients per message, twice
