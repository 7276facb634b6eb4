"""Non-delivery notices (RFC 3464) for mail taken by SMTP submission: a message
that bounces or expires is told to its envelope sender (fastsend.serve.dsn).

Real parts: ``fastsend serve`` with its submission listener (STARTTLS, AUTH),
aiosmtplib as the client, fastsend's sink as every receiver (``permfail-*``
refused 550 5.1.1 at RCPT, ``tempfail-*`` 451), the notices read back with the
stdlib's email parser and fastsend's own bounce parser (as a sender's
software would take them)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import orjson
import pytest
from tests._serve_helpers import Served

from conftest import free_port, wait_port
from fastsend.bounce import parse_bounce
from fastsend.serve.dsn import Failure, build, header_section, status_of
from fastsend.sink import SinkThread

MESSAGE = (
    b"From: App <app@example.com>\r\nTo: x@example.org\r\nSubject: order 42\r\n"
    b"Message-ID: <order42@example.com>\r\n\r\nHello\r\n"
)


def _serve(
    tmp: Path, certs: Any, sink: Any, retry: str = "", spool_url: str = ""
) -> tuple[Served, int]:
    cert, key, _client = certs
    port = free_port()
    extra = (
        f'[submission]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        f"{retry}"
    )
    served = Served(tmp, f"{sink.host}:{sink.port}", extra=extra, spool_url=spool_url,
                    serve_args=("--allow-volatile",) if spool_url else ())  # fmt: skip
    wait_port("127.0.0.1", port, timeout=60)
    return served, port


def _submit(port: int, key: str, tls: ssl.SSLContext, sender: str, rcpts: list[str]) -> None:
    async def go() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls)
        await smtp.connect()
        await smtp.login("acme", key)
        await smtp.sendmail(sender, rcpts, MESSAGE)
        await smtp.quit()

    asyncio.run(go())


def _notices(sink: Any, to: str, n: int, timeout: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        got = [m for m in sink.sink.messages if to in m.recipients]
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, [m.recipients for m in sink.sink.messages]
        time.sleep(0.05)


def test_a_bounce_is_told_to_the_sender(tmp_path: Path, certs: Any) -> None:
    with SinkThread(keep_messages=True) as sink:
        served, port = _serve(tmp_path, certs, sink)
        try:
            _submit(port, served.keys["acme"], certs[2], "app@example.com",
                    ["permfail-1@example.org", "ann@example.org"])  # fmt: skip
            (notice,) = _notices(sink, "app@example.com", 1)
            time.sleep(1.0)  # (no second notice comes, nor one about the notice)
            assert [m.recipients for m in sink.sink.messages if "app@example.com"
                    in m.recipients] == [["app@example.com"]]  # fmt: skip
        finally:
            served.stop()
    assert notice.mail_from == ""  # a null reverse-path: never answered in turn
    msg = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied" and "MAILER-DAEMON@" in msg["From"]
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"
    ]  # fmt: skip
    status = notice.data.decode()
    assert "Final-Recipient: rfc822; permfail-1@example.org" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1" in status
    assert "Subject: order 42" in status and "Hello" not in status  # headers only
    # what a sender's bounce processing makes of it
    (b,) = parse_bounce(notice.data)
    assert b.recipient == "permfail-1@example.org" and b.hard, b
    # ann's copy was delivered, and no notice names her
    assert b"ann@example.org" not in notice.data


def test_an_expiry_is_told_to_the_sender(tmp_path: Path, certs: Any) -> None:
    """A message retried past [retry] max_age: the notice says failed, 4.x.x."""
    with SinkThread(keep_messages=True) as sink:
        served, port = _serve(tmp_path, certs, sink, "[retry]\nmax_age = 1\n")
        try:
            _submit(port, served.keys["acme"], certs[2], "app@example.com",
                    ["tempfail-1@example.org"])  # fmt: skip
            (notice,) = _notices(sink, "app@example.com", 1)
        finally:
            served.stop()
    text = notice.data.decode()
    assert "Final-Recipient: rfc822; tempfail-1@example.org" in text
    assert "Action: failed" in text and "Status: 4.3.0" in text
    assert "retry time ran out" in text


def test_one_notice_names_every_recipient_the_message_failed_for(
    tmp_path: Path, certs: Any
) -> None:
    """RFC 3464: one notice a message, a group of per-recipient fields for each
    recipient it failed for. Before, a message refused for two of its three
    recipients (at two domains) gave its sender two notices (found by an audit)."""
    with SinkThread(keep_messages=True) as sink:
        served, port = _serve(tmp_path, certs, sink)
        try:
            _submit(port, served.keys["acme"], certs[2], "app@example.com",
                    ["permfail-1@example.org", "ann@example.org", "permfail-2@example.net"])  # fmt: skip
            (notice,) = _notices(sink, "app@example.com", 1)
            time.sleep(1.5)  # (no second notice comes)
            assert len([m for m in sink.sink.messages if "app@example.com" in m.recipients]) == 1
        finally:
            served.stop()
    text = notice.data.decode()
    assert text.count("Final-Recipient:") == 2 and text.count("Action: failed") == 2
    assert "Final-Recipient: rfc822; permfail-1@example.org" in text
    assert "Final-Recipient: rfc822; permfail-2@example.net" in text
    assert "2 of its recipients" in text and b"ann@example.org" not in notice.data
    msg = email.message_from_bytes(notice.data, policy=email.policy.default)
    status = next(p for p in msg.iter_parts() if p.get_content_type() == "message/delivery-status")
    # the per-message group, then one group per recipient (RFC 3464 2.1)
    groups = [g for g in status.get_payload()]
    assert len(groups) == 3 and "Reporting-MTA" in str(groups[0]), groups
    got = sorted(b.recipient for b in parse_bounce(notice.data))
    assert got == ["permfail-1@example.org", "permfail-2@example.net"], got


@pytest.mark.parametrize("spool", ["sqlite", "redis"])
def test_a_kill_between_the_failure_and_its_notice_loses_no_notice(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch, spool: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """kill -9 of serve right after a bounce is committed, before its notice is
    spooled: the notice was lost for good (the failure was in the spool and the
    event log, its sender never told). Now the failure is journalled before its
    commit and the next start tells it; once told, it is not told again. On a
    shared (Redis) spool as on SQLite: the journal is in the node's local dir."""
    url = request.getfixturevalue("redis_server").url() if spool == "redis" else ""
    with SinkThread(keep_messages=True) as sink:
        monkeypatch.setenv("FASTSEND_TEST_FAULT", "outcomes-kill-after-commit:1")
        served, port = _serve(tmp_path, certs, sink, spool_url=url)
        monkeypatch.delenv("FASTSEND_TEST_FAULT")
        try:
            _submit(port, served.keys["acme"], certs[2], "app@example.com",
                    ["permfail-1@example.org", "permfail-2@example.org"])  # fmt: skip
            assert served.proc.wait(20) == -9
            assert not [m for m in sink.sink.messages if "app@example.com" in m.recipients]
            served.start()
            wait_port("127.0.0.1", port, timeout=60)
            (notice,) = _notices(sink, "app@example.com", 1)
            served.stop()
            served.start()  # told once: the journal is done with it
            time.sleep(2.0)
            assert len([m for m in sink.sink.messages if "app@example.com" in m.recipients]) == 1
        finally:
            served.stop()
    text = notice.data.decode()
    assert "Final-Recipient: rfc822; permfail-1@example.org" in text
    assert "Final-Recipient: rfc822; permfail-2@example.org" in text


def test_the_notice_never_carries_a_remote_servers_lines() -> None:
    """A reply text is the receiving server's: CR, LF and other controls are cut,
    so it can start no header, field or MIME part of the notice."""
    evil = "no such user\r\nContent-Type: text/html\r\n\r\n--x\x1b[31m"
    f = Failure("b@example.org", status_of(550, "", False),
                "550 " + evil.replace("\r", "").replace("\n", ""), "mx.example.org", False, 1.0)
    data = build("mta.example", "a@example.com", [f], 0.0, 1.0, header_section(MESSAGE))
    from fastsend.serve.dsn import _clean

    assert "\n" not in _clean(evil) and "\x1b" not in _clean(evil)
    assert b"\x1b" not in data
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert len(list(msg.iter_parts())) == 3
    assert status_of(0, "", True) == "4.4.7" and status_of(550, "", False) == "5.0.0"
    assert status_of(451, "4.7.1", True) == "4.7.1"
    # a sender not in ASCII is named with RFC 6533's utf-8 type
    f2 = Failure("jörg@example.org", "5.1.1", "", "", False, 1.0)
    d2 = build("mta.example", "a@example.com", [f2], 0.0, 1.0, header_section(MESSAGE))
    assert b"Final-Recipient: utf-8; j\\x{F6}rg@example.org" in d2


def test_a_null_reverse_path_is_sent_as_mail_from_empty(impl: str) -> None:
    """MAIL FROM:<> (a notice's sender): the compiled client refused "" as an
    invalid sender (5.1.7, locally), the reference sent it: every notice bounced."""
    from _smtp_helpers import client_class
    from fastsend.outcome import Envelope

    c = client_class(impl)("client.example", mx="mx.example:25")
    c.receive_data(b"220 mx.example ESMTP\r\n")
    c.send_ehlo()
    c.receive_data(b"250-mx.example\r\n250 PIPELINING\r\n")
    wire = c.send_envelopes([Envelope("", ["a@example.com"], b"hi\r\n", tag=1)])
    assert wire.startswith(b"MAIL FROM:<>")
    assert not c.events()


def _notices_spooled(tmp: Path, to: str) -> int:
    """Notices to ``to`` the spool took (their "accepted" events, in the log)."""
    n = 0
    raw = (tmp / "spool" / "events.jsonl").read_bytes()
    for line in raw[: raw.rfind(b"\n") + 1].splitlines():  # (whole lines: serve writes)
        e = orjson.loads(line)
        n += e.get("event") == "accepted" and e.get("rcpt") == to
    return n


def _journal_settled(tmp: Path, timeout: float = 30) -> None:
    """Wait until the notice journal holds nothing untold (emptied once told)."""
    path = tmp / "spool" / "dsn.journal"
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_size:
        assert time.monotonic() < deadline, path.read_bytes()[-500:]
        time.sleep(0.05)


@pytest.mark.parametrize("spool", ["sqlite", "redis"])
def test_a_kill_between_a_notice_and_its_journal_line_sends_it_once(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch, spool: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """kill -9 of serve once a notice is spooled, before the journal names it told:
    the next start took the failure again and spooled a second notice (the sender
    got two for one failure). Now each notice has an id (its message's rows and
    their attempt), recorded with the notice in the spool's transaction and
    checked before spooling: the notice taken again is not spooled again."""
    url = request.getfixturevalue("redis_server").url() if spool == "redis" else ""
    with SinkThread(keep_messages=True) as sink:
        monkeypatch.setenv("FASTSEND_TEST_FAULT", "dsn-kill-after-notice:1")
        served, port = _serve(tmp_path, certs, sink, spool_url=url)
        monkeypatch.delenv("FASTSEND_TEST_FAULT")
        try:
            _submit(port, served.keys["acme"], certs[2], "app@example.com",
                    ["permfail-1@example.org", "permfail-2@example.org"])  # fmt: skip
            assert served.proc.wait(20) == -9
            assert _notices_spooled(tmp_path, "app@example.com") == 1
            served.start()
            _journal_settled(tmp_path)  # the failures taken again and told
            assert _notices_spooled(tmp_path, "app@example.com") == 1
            (notice,) = _notices(sink, "app@example.com", 1)
        finally:
            served.stop()
    text = notice.data.decode()
    assert "Final-Recipient: rfc822; permfail-1@example.org" in text
    assert "Final-Recipient: rfc822; permfail-2@example.org" in text


def test_notices_a_start_could_not_take_are_told_once_the_spool_answers(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that finds the shared spool out of reach cannot take again the
    failures a killed run left untold in its journal: they waited for the next
    start (a node that never restarts never told them) and the journal, no longer
    rewritten, grew with every failure after. Now a flush takes them again once
    the spool answers (every OWED_EVERY s) and the journal is rewritten then.
    Real parts: serve killed after its bounces' commit, a redis-server of this
    test's own killed and started again on its data, the journal taken in this
    process (serve's tick calls the same flush)."""
    from tests.test_multinode_outage import Redis

    from fastsend.config import load
    from fastsend.serve import dsn
    from fastsend.serve.context import open_context

    redis = Redis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    url = f"redis://127.0.0.1:{redis.port}/0?prefix=dsn&node=n1"
    try:
        with SinkThread(keep_messages=True) as sink:
            monkeypatch.setenv("FASTSEND_TEST_FAULT", "outcomes-kill-after-commit:1")
            served, port = _serve(tmp_path, certs, sink, spool_url=url)
            monkeypatch.delenv("FASTSEND_TEST_FAULT")
            _submit(port, served.keys["acme"], certs[2], "app@example.com",
                    ["permfail-1@example.org", "permfail-2@example.org"])  # fmt: skip
            assert served.proc.wait(20) == -9
        journal = tmp_path / "spool" / "dsn.journal"
        assert journal.read_bytes().count(b"\n") == 2  # two failures, untold
        ctx = open_context(load(str(served.cfg)))
        try:
            redis.kill()  # out of reach as the notices start
            notices = dsn.Notices(ctx, "mx.example.com")
            assert notices.owed and not notices.pending
            assert journal.read_bytes().count(b"\n") == 2  # kept for later
            redis.start()
            monkeypatch.setattr(dsn, "OWED_EVERY", 0.0)
            assert notices.flush(settle=0.0) == 1  # one notice, both recipients
            assert not notices.owed and journal.read_bytes() == b""
            assert _notices_spooled(tmp_path, "app@example.com") == 1
        finally:
            ctx.close()
    finally:
        redis.stop()
