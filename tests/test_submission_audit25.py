"""Session 25's outside audit of the SMTP submission listener: each test on a defect
it found, failing before its fix.

- VRFY without an argument was answered 252 as if it named someone (RFC 5321
  4.1.1.6: VRFY names a string; Postfix answers 501): 501 5.5.4.
- AUTH after STARTTLS without a new EHLO was taken (the STARTTLS reset the
  session, RFC 3207 4.2, the client's EHLO forgotten; RFC 4954 4: AUTH follows
  EHLO), as it was before any EHLO at all: 503 5.5.1, as Postfix answers.
- AUTH's time told which user names exist: a known user whose hash is of an
  older, cheaper cost was checked with that cost, an unknown name against a
  dummy hash at today's (made on the event loop at its first use, twice the
  work then). Every password check now spends the same PBKDF2 work (today's
  cost, or the dearest configured hash's), known name or not.
- 8-bit header text that is not UTF-8 (a Latin-1 Subject) was taken and sent
  with SMTPUTF8, which says it is UTF-8 (RFC 6532 allows nothing else): refused
  554 5.6.0 naming the line (the API's raw: 400 alike).
- A submitted message's checks (line ends, 8-bit re-encoding, names, senders)
  ran on serve's event loop: a 14 MB 8-bit message held every listener, the API
  and dispatch for 1.7 s. A large one's are made in a thread now.
- NOTIFY=SUCCESS and NOTIFY=DELAY were taken and nothing ever sent (RFC 3461
  5.2.2, 6.2): a delivery is told as "relayed" (to the receiving server, which
  may tell nothing more), a deferral once the message is [submission]
  delay_warning old as "delayed" (once a recipient), ENVID and ORCPT named.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import re
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from _serve_helpers import until
from conftest import wait_port
from fastsend.bounce import parse_bounce
from fastsend.message.rawmime import RawMimeError
from fastsend.message.rawmime import check as check_raw
from fastsend.serve import listeners
from fastsend.serve.api import OFF_LOOP_BYTES
from fastsend.serve.dsn import Failure, build, retry_until
from fastsend.serve.listeners import PBKDF2_ITERATIONS, hash_password
from fastsend.sink import SinkThread
from fastsend.smtp.server import ServerConfig, StartTLS
from test_serve_dsn import MESSAGE as DSN_MESSAGE
from test_serve_dsn import _notices as dsn_notices
from test_serve_dsn import _serve as dsn_serve
from test_smtp_server import Session
from test_submission_audit23 import _plain, _run, _session


def test_vrfy_without_an_argument_is_501() -> None:
    s = Session()
    assert s.feed(b"EHLO x\r\nVRFY\r\n") .endswith(b"501 5.5.4 Syntax: VRFY address\r\n")
    assert s.feed(b"VRFY   \r\n") == b"501 5.5.4 Syntax: VRFY address\r\n"
    assert s.codes(b"VRFY someone\r\nVRFY <a@b.c>\r\n") == ["252", "252"]


def test_auth_before_ehlo_is_503_after_starttls_too() -> None:
    def policy(proto: Any, ev: Any) -> None:
        proto.accept()

    cfg = ServerConfig(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",),
                       auth_required=True)  # fmt: skip
    s = Session(cfg, policy)
    plain = b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n"
    assert s.codes(b"EHLO x\r\nSTARTTLS\r\n") == ["250", "220"]
    assert isinstance(s.events[-1], StartTLS)
    s.proto.tls_started()
    assert s.feed(plain) == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    assert s.codes(b"AUTH PLAIN\r\n") == ["503"]  # (no 334: no exchange begun)
    assert s.codes(b"EHLO x\r\n" + plain) == ["250", "235"]
    # Implicit TLS: no EHLO yet either.
    s = Session(cfg, policy)
    s.proto.tls_active = True
    assert s.codes(plain) == ["503"]


def test_submission_refuses_auth_after_starttls_until_ehlo(tmp_path: Path, certs: Any) -> None:
    tls = certs[2]

    async def go(port: int) -> list[list[bytes]]:
        return [
            await _session(port, tls, [_plain("", "acme", "pw"), b"MAIL FROM:<a@example.com>\r\n"],
                           ehlo_again=False),
            await _session(port, tls, [b"EHLO c.test\r\n", _plain("", "acme", "pw")],
                           ehlo_again=False),
        ]  # fmt: skip

    (bare, again), ctx = _run(tmp_path, certs, go)
    ctx.close()
    assert bare[0].startswith(b"503 5.5.1"), bare
    assert bare[1].startswith(b"503 5.5.1"), bare  # (MAIL: no EHLO either)
    assert again[1].startswith(b"235"), again


def test_auth_spends_the_same_pbkdf2_work_for_every_name(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = certs[2]
    spent: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counted(name: str, password: bytes, salt: bytes, iterations: int, *a: Any) -> bytes:
        spent.append(iterations)
        return real(name, password, salt, 1, *a)  # (the count is what is measured)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counted)
    # acme and globex (test_submission_audit23's users) are of cost 1000, an old one;
    # "today" has one at today's cost.
    today = hash_password("pw3")
    spent.clear()
    attempts = {"unknown": ("nobody", "pw"), "known, wrong": ("acme", "nope"),
                "today, wrong": ("today", "nope"), "unknown again": ("nobody2", "x")}  # fmt: skip

    async def go(port: int) -> dict[str, tuple[bytes, int]]:
        out = {}
        for what, (user, pw) in attempts.items():
            spent.clear()
            reply = (await _session(port, tls, [_plain("", user, pw)]))[0]
            out[what] = (reply, sum(spent))
        return out

    got, ctx = _run(tmp_path, certs, go, submission={"users": {
        "acme": hash_password("pw", iterations=1000), "today": today}})  # fmt: skip
    ctx.close()
    assert all(r.startswith(b"535") for r, _ in got.values()), got
    assert {n for _, n in got.values()} == {PBKDF2_ITERATIONS}, got


def _txn(body: bytes, rcpt: bytes = b"u@example.org") -> list[bytes]:
    return [_plain("", "acme", "pw"), b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<" + rcpt + b">\r\n", b"DATA\r\n", body + b"\r\n.\r\n"]  # fmt: skip


def test_8bit_header_text_that_is_not_utf8_is_refused(tmp_path: Path, certs: Any) -> None:
    tls = certs[2]
    latin1 = b"From: J\xf6rg <a@example.com>\r\nSubject: Gr\xfc\xdfe\r\n\r\nhi"
    utf8 = "From: Jörg <a@example.com>\r\nSubject: Grüße\r\n\r\nhi".encode()
    overlong = b"From: a@example.com\r\nSubject: \xc0\xae\r\n\r\nhi"  # (not UTF-8 either)

    async def go(port: int) -> list[bytes]:
        return [(await _session(port, tls, _txn(m)))[-1] for m in (latin1, utf8, overlong)]

    (bad, good, bad2), ctx = _run(tmp_path, certs, go)
    ctx.close()
    assert bad.startswith(b"554 5.6.0") and b"header line 1" in bad and b"not UTF-8" in bad, bad
    assert bad2.startswith(b"554 5.6.0") and b"header line 2" in bad2, bad2
    assert good.startswith(b"250 2.0.0"), good
    # The API's raw is judged alike.
    with pytest.raises(RawMimeError, match="header line 2 has 8-bit text that is not UTF-8"):
        check_raw(b"From: a@example.com\nSubject: caf\xe9\n\nhi\n")
    check_raw("From: a@example.com\nSubject: café\n\nhi\n".encode())


def test_a_large_messages_checks_leave_the_loop_free(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = certs[2]
    judging = threading.Event()
    release = threading.Event()
    waited: list[bool] = []
    real = listeners.prepare_raw

    def held(data: bytes) -> Any:
        if len(data) > OFF_LOOP_BYTES:
            judging.set()
            # On the loop this waits out its ceiling: nobody else is answered meanwhile.
            waited.append(release.wait(60))
        return real(data)

    monkeypatch.setattr(listeners, "prepare_raw", held)
    big = b"From: a@example.com\r\nSubject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 8000

    async def go(port: int) -> tuple[bytes, list[bytes]]:
        sending = asyncio.ensure_future(_session(port, tls, _txn(big)))
        while not judging.is_set():
            await asyncio.sleep(0.01)
        other = await _session(port, tls, [b"NOOP\r\n"])  # answered meanwhile
        release.set()
        return (await sending)[-1], other

    (reply, other), ctx = _run(tmp_path, certs, go)
    ctx.close()
    assert waited == [True], waited
    assert other[0].startswith(b"250"), other
    assert reply.startswith(b"250 2.0.0"), reply


def _dsn_session(port: int, key: str, tls: Any, rcpts: list[tuple[str, list[str]]],
                 mail: list[str], data: bytes = DSN_MESSAGE) -> None:  # fmt: skip
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.starttls(context=tls)
        c.login("acme", key)
        assert c.mail("app@example.com", mail)[0] == 250
        for rcpt, opts in rcpts:
            code, text = c.rcpt(rcpt, opts)
            assert code == 250, (rcpt, code, text)
        code, text = c.data(data)
        assert code == 250, (code, text)


def _kinds(sink: Any) -> list[str]:
    return [re.findall(r"Action: (\w+)", m.data.decode())[0] for m in sink.sink.messages
            if "app@example.com" in m.recipients]  # fmt: skip


def test_notify_success_is_told_as_relayed(tmp_path: Path, certs: Any) -> None:
    with SinkThread(keep_messages=True) as sink:
        served, port = dsn_serve(tmp_path, certs, sink)
        try:
            _dsn_session(port, served.keys["acme"], certs[2], [
                ("ann@example.org", ["NOTIFY=SUCCESS", "ORCPT=rfc822;Sales+2B1@example.org"]),
                ("bob@example.org", ["NOTIFY=FAILURE,SUCCESS"]),
                ("carol@example.org", ["NOTIFY=FAILURE"]),
                ("dave@example.org", []),
                # the same vars, a body worth sharing (accept.BLOB_SHARED): one notice
                ("erin@example.org", ["NOTIFY=SUCCESS"]),
                ("frank@example.org", ["NOTIFY=SUCCESS"]),
            ], ["RET=FULL", "ENVID=order+2B42"], DSN_MESSAGE + b"y" * 70 * 40 + b"\r\n")  # fmt: skip
            notices = dsn_notices(sink, "app@example.com", 3)
            until("all six delivered", lambda: sum(
                len(m.recipients) for m in sink.sink.messages
                if "app@example.com" not in m.recipients) >= 6)  # fmt: skip
            time.sleep(1.5)  # (no notice comes for carol and dave: they asked for none)
            assert _kinds(sink) == ["relayed"] * 3, _kinds(sink)
        finally:
            served.stop()
    (pair,) = [n for n in notices if b"erin@" in n.data]
    assert b"Final-Recipient: rfc822; frank@example.org" in pair.data, pair.data
    assert b"Final-Recipient: rfc822; erin@example.org" in pair.data
    notices.remove(pair)
    by = {("ann@" in n.data.decode()): n for n in notices}
    ann, bob = by[True], by[False]
    assert ann.mail_from == "" and bob.mail_from == ""
    for n, rcpt in ((ann, "ann@example.org"), (bob, "bob@example.org")):
        text = n.data.decode()
        msg = email.message_from_bytes(n.data, policy=email.policy.default)
        assert msg["Subject"] == "Successful Mail Delivery Report", text
        assert [p.get_content_type() for p in msg.iter_parts()] == [
            "text/plain", "message/delivery-status", "text/rfc822-headers"]  # fmt: skip
        assert f"Final-Recipient: rfc822; {rcpt}" in text and "Action: relayed" in text
        assert re.search(r"Status: 2\.\d\.\d", text) and "Diagnostic-Code: smtp; 250" in text
        assert "Original-Envelope-Id: order+42" in text
        assert "Hello" not in text  # (headers only: RET is about failures)
        assert "carol" not in text and "dave" not in text
        # what a sender's bounce processing makes of it: no failure (RFC 3464 2.3.3)
        assert [(b.recipient, b.action) for b in parse_bounce(n.data)] == [(rcpt, "relayed")]
    assert "Original-Recipient: rfc822;Sales+1@example.org" in ann.data.decode()
    assert "Original-Recipient" not in bob.data.decode()


def test_notify_delay_is_told_once_then_the_failure(tmp_path: Path, certs: Any) -> None:
    retry = ("delay_warning = 0.001\n[retry]\nmin_backoff = 0.2\nmax_backoff = 0.2\n"
             "max_age = 4\njitter = 0\n")  # fmt: skip
    with SinkThread(keep_messages=True) as sink:
        served, port = dsn_serve(tmp_path, certs, sink, retry)
        try:
            _dsn_session(port, served.keys["acme"], certs[2], [
                ("tempfail-1@example.org", ["NOTIFY=DELAY,FAILURE"]),
                ("tempfail-2@example.org", ["NOTIFY=FAILURE"]),
            ], ["ENVID=e1"])  # fmt: skip
            dsn_notices(sink, "app@example.com", 3, timeout=90)
            time.sleep(1.5)
            kinds = _kinds(sink)
        finally:
            served.stop()
    assert sorted(kinds) == ["delayed", "failed", "failed"], kinds
    assert kinds[0] == "delayed", kinds
    (delayed,) = [m for m in sink.sink.messages if b"Action: delayed" in m.data]
    text = delayed.data.decode()
    assert "Final-Recipient: rfc822; tempfail-1@example.org" in text
    assert "tempfail-2" not in text  # (it asked for no delay notice)
    assert re.search(r"Status: 4\.\d\.\d", text) and "Will-Retry-Until: " in text
    assert "Original-Envelope-Id: e1" in text
    assert [(b.recipient, b.action) for b in parse_bounce(delayed.data)] == [
        ("tempfail-1@example.org", "delayed")]  # fmt: skip


def test_a_kill_after_the_delivery_loses_no_success_notice(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 right after the delivery's commit, before its notice is spooled: the
    journal's line (written and synced before the commit) tells it at the next
    start, once."""
    with SinkThread(keep_messages=True) as sink:
        monkeypatch.setenv("FASTSEND_TEST_FAULT", "outcomes-kill-after-commit:1")
        served, port = dsn_serve(tmp_path, certs, sink)
        monkeypatch.delenv("FASTSEND_TEST_FAULT")
        try:
            _dsn_session(port, served.keys["acme"], certs[2],
                         [("ann@example.org", ["NOTIFY=SUCCESS"])], [])  # fmt: skip
            assert served.proc.wait(20) == -9
            assert [m.recipients for m in sink.sink.messages] == [["ann@example.org"]]
            served.start()
            wait_port("127.0.0.1", port, timeout=60)
            (notice,) = dsn_notices(sink, "app@example.com", 1)
            served.stop()
            served.start()  # told once: the journal is done with it
            wait_port("127.0.0.1", port, timeout=60)
            time.sleep(2.0)
            assert _kinds(sink) == ["relayed"], _kinds(sink)
            assert [m.recipients for m in sink.sink.messages if "app@example.com"
                    not in m.recipients] == [["ann@example.org"]]  # (its journal told it)
        finally:
            served.stop()
    assert b"Final-Recipient: rfc822; ann@example.org" in notice.data


def test_a_delay_notice_names_no_retry_date_when_retries_have_no_limit() -> None:
    """[retry] max_age = 0 (no limit): the delay notice said Will-Retry-Until the
    message's own arrival, a date already past."""
    assert retry_until(1000.0, 0.0) == 0.0 and retry_until(1000.0, 60.0) == 1060.0
    f = Failure("a@example.org", "4.2.0", "451 4.2.0 later", "mx.example.org", False, 1010.0)
    text = build("mx.test", "s@example.com", [f], 1000.0, 1010.0, b"Subject: x\r\n",
                 kind="delayed", retry_until=retry_until(1000.0, 0.0)).decode()  # fmt: skip
    assert "Action: delayed" in text and "Will-Retry-Until" not in text, text
    text = build("mx.test", "s@example.com", [f], 1000.0, 1010.0, b"Subject: x\r\n",
                 kind="delayed", retry_until=retry_until(1000.0, 60.0)).decode()  # fmt: skip
    assert "Will-Retry-Until: Thu, 01 Jan 1970 00:17:40 -0000" in text, text
