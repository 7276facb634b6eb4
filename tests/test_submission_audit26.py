"""Session 26's outside audit of SMTP submission (sub26): each test on a defect it
found, failing before its fix.

- AUTH with no [submission.users] at all (API keys only) still spent 600k PBKDF2
  iterations on each password, bounded only by the AUTH throttle: nobody can log
  in with a password then, so it is refused at once, the same for every name.
- Password checks were bounded by nothing but the connection caps: the throttle
  counts failures once answered, so AUTHs from many addresses all ran their
  600k-iteration check at once. At most AUTH_CHECKS run, AUTH_WAITING wait, the
  rest are answered 454 4.7.0 unchecked (no failure counted).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from _mta_helpers import private_postfix
from _serve_helpers import Served, until
from _smtp_helpers import aiosmtpd_server
from conftest import free_port, wait_port
from fastsend.serve import listeners
from fastsend.wire import blob_digest
from test_interop_audit25 import RELAY_CF
from test_submission_audit23 import _listener, _plain, _run, _session


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    spent: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counted(name: str, password: bytes, salt: bytes, iterations: int, *a: Any) -> bytes:
        spent.append(iterations)
        return real(name, password, salt, 1, *a)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counted)
    return spent


def test_auth_without_a_user_table_checks_nothing(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = certs[2]
    spent = _counting(monkeypatch)

    async def go(port: int) -> list[bytes]:
        spent.clear()  # (the table _listener made for acme and globex)
        return [(await _session(port, tls, [_plain("", user, "pw")]))[0]
                for user in ("acme", "nobody", "x" * 200)]  # fmt: skip

    got, ctx = _run(tmp_path, certs, go, submission={"users": {}})
    ctx.close()
    assert all(r.startswith(b"535 5.7.8") for r in got), got
    assert spent == [], spent  # (before: 600,000 iterations each)


async def _poll(what: str, ok: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_password_checks_at_once_are_bounded(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = certs[2]
    monkeypatch.setattr(listeners, "AUTH_CHECKS", 2)
    monkeypatch.setattr(listeners, "AUTH_WAITING", 2)
    release = threading.Event()
    lock = threading.Lock()
    running = [0, 0]  # now, most at once
    real = hashlib.pbkdf2_hmac

    def held(name: str, password: bytes, salt: bytes, iterations: int, *a: Any) -> bytes:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        try:
            release.wait(60)
            # (a check of acme's hash as it is, the padding to today's cost cut short)
            return real(name, password, salt, iterations if iterations <= 1000 else 1, *a)
        finally:
            with lock:
                running[0] -= 1

    ctx = _listener(tmp_path, certs)  # (its users hashed first)
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", held)

    async def main() -> tuple[list[bytes], bytes, bytes]:
        servers = await listeners.start_listeners(ctx)
        sub = servers.submission
        port = int(servers[0].sockets[0].getsockname()[1])
        try:
            # Four sessions, within the throttle's allowance: two checked, two waiting.
            tasks = [asyncio.ensure_future(_session(port, tls, [_plain("", "acme", "bad")]))
                     for _ in range(4)]  # fmt: skip
            await _poll("two checks running and two waiting",
                        lambda: running[0] >= 2 and getattr(sub, "_checking", 0) >= 4)
            busy = (await _session(port, tls, [_plain("", "acme", "pw")]))[0]
            release.set()
            first = [(await t)[0] for t in tasks]
            # Nothing of the 454 was counted as a failure: the right password logs in.
            again = (await _session(port, tls, [_plain("", "acme", "pw")]))[0]
            return first, busy, again
        finally:
            release.set()
            for srv in servers:
                srv.close()

    try:
        first, busy, again = asyncio.run(main())
    finally:
        ctx.close()
    assert busy.startswith(b"454 4.7.0"), busy
    assert all(r.startswith(b"535") for r in first), first
    assert again.startswith(b"235"), again
    assert running[1] == 2, running


# -- NOTIFY=SUCCESS relayed to a next hop offering DSN: that hop tells, we do not --

MESSAGE = (
    b"From: App <app@example.com>\r\nTo: x@example.org\r\nSubject: order 42\r\n"
    b"Message-ID: <order42@example.com>\r\n\r\nHello\r\n"
)


def _ours(handler: Any) -> list[bytes]:
    """fastsend's notices among what aiosmtpd took (Postfix's carry its queue id)."""
    return [m["data"] for m in handler.messages
            if m["mail_from"] in ("", "<>") and b"X-Postfix-Queue-ID" not in m["data"]]  # fmt: skip


def _postfix_notices(handler: Any) -> list[bytes]:
    return [m["data"] for m in handler.messages
            if m["mail_from"] in ("", "<>") and b"X-Postfix-Queue-ID" in m["data"]]  # fmt: skip


def test_notify_success_relayed_to_a_dsn_hop_gets_no_relayed_notice_of_ours(
    tmp_path: Path, certs: Any
) -> None:
    """Real parts: `fastsend serve` takes one message for ann@dsn.test and
    bob@plain.test, both NOTIFY=SUCCESS (one group: one notice of ours for
    both, before). dsn.test's next hop is Postfix (DSN offered: NOTIFY goes on;
    Postfix tells the success itself, RFC 3461 5.2.2), plain.test's aiosmtpd (no
    DSN: NOTIFY left off, so ours is the only word the sender gets). Our notice
    names bob alone; Postfix's names ann."""
    cert, key, tls = certs
    aio, pf = free_port(), free_port()
    with aiosmtpd_server(aio) as (_ctl, handler), private_postfix(
        RELAY_CF, f"127.0.0.1:{pf} inet n - n - - smtpd\n", [pf], mx=aio
    ):
        port = free_port()
        extra = (f'[submission]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\n'
                 f'tls_key = "{key}"\n')  # fmt: skip
        served = Served(tmp_path, f"127.0.0.1:{aio}", extra=extra,
                        routes=f'"dsn.test" = "127.0.0.1:{pf}"')  # fmt: skip
        try:
            wait_port("127.0.0.1", port, timeout=60)
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
                c.starttls(context=tls)
                c.login("acme", served.keys["acme"])
                assert c.mail("app@example.com", ["ENVID=o42"])[0] == 250
                for rcpt in ("ann@dsn.test", "bob@plain.test"):
                    assert c.rcpt(rcpt, ["NOTIFY=SUCCESS"])[0] == 250
                assert c.data(MESSAGE)[0] == 250
            until("our notice", lambda: _ours(handler), timeout=90)
            until("Postfix's notice", lambda: _postfix_notices(handler), timeout=90)
            delivered = [m["rcpts"] for m in handler.messages
                         if m["mail_from"] not in ("", "<>")]  # fmt: skip
        finally:
            served.stop()
    assert sorted(delivered) == [["ann@dsn.test"], ["bob@plain.test"]], delivered
    (ours,) = _ours(handler)
    text = ours.decode()
    assert "Final-Recipient: rfc822; bob@plain.test" in text and "Action: relayed" in text
    assert "ann@dsn.test" not in text, text  # (before: named, and Postfix's too)
    (theirs,) = _postfix_notices(handler)
    assert b"ann@dsn.test" in theirs and b"bob@plain.test" not in theirs, theirs
    assert re.search(rb"Action: (delivered|relayed)", theirs), theirs


@pytest.mark.parametrize("impl", ["py", "c"])
def test_a_delivery_whose_dsn_parameters_went_on_is_its_own_res(impl: str) -> None:
    """collect_delivered (either twin) stops at a delivery whose DSN parameters
    were relayed (TxnResult.dsn): the worker gives it a Res of its own saying so
    (never a Sent group, which has no room for it), what the supervisor's result
    hooks read (serve.dsn)."""
    from fastsend import _accel
    from fastsend.delivery import worker as worker_mod
    from fastsend.outcome import Outcome, TxnResult
    from fastsend.wire import Sent

    fn = worker_mod.py_collect_delivered if impl == "py" else _accel.compiled("collect_delivered")
    ok = Outcome("delivered", 250, "2.0.0", "Ok", "", "mx")
    rs = [TxnResult(1, [ok]), TxnResult(2, [ok], "Q2", True), TxnResult(3, [ok])]
    out: list[Any] = []
    assert fn(rs, 0, out, "127.0.0.2", "") == 1
    assert fn(rs, 2, out, "127.0.0.2", "") == 3
    assert [type(x) for x in out] == [Sent] and out[0].ids == [1, 3]


def test_the_worker_reports_the_dsn_flag(tmp_path: Path) -> None:
    from fastsend.delivery.worker import Worker
    from fastsend.outcome import Outcome, TxnResult
    from fastsend.ring import Ring
    from fastsend.wire import Res, expand
    from test_worker_build import _config

    ok = Outcome("delivered", 250, "2.0.0", "Ok", "", "mx")
    w = Worker(0, _config(tmp_path), ["127.0.0.2"], Ring(1 << 16), Ring(1 << 16))

    async def go() -> list[Res]:
        w.add_results([TxnResult(1, [ok]), TxnResult(2, [ok], "Q2", True),
                       TxnResult([3, 4], [ok, ok], "Q3", True)], "127.0.0.2", "")  # fmt: skip
        if w.flush_handle is not None:
            w.flush_handle.cancel()
        return expand(w.out)

    got = asyncio.run(go())
    assert [(r.id, r.dsn) for r in got] == [(1, False), (2, True), (3, True), (4, True)]


def test_a_large_messages_body_is_stored_off_the_loop(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large submitted message's body (a blob: its SHA-256, a write of tens of
    MB with an fsync) was stored on serve's loop, after its checks had moved to a
    thread (a 21 MB one held every listener, the API and dispatch ~0.7 s). Held
    here while it is stored: another session is answered meanwhile; then the
    message is spooled whole."""
    from fastsend import accept
    from fastsend.serve.api import OFF_LOOP_BYTES

    tls = certs[2]
    storing = threading.Event()
    release = threading.Event()
    waited: list[bool] = []

    class Held:
        def __getattr__(self, name: str) -> Any:
            return getattr(hashlib, name)

        @staticmethod
        def sha256(data: bytes = b"") -> Any:
            if len(data) > OFF_LOOP_BYTES:
                storing.set()
                waited.append(release.wait(60))  # (on the loop: nobody answered meanwhile)
            return hashlib.sha256(data)

    monkeypatch.setattr(accept, "hashlib", Held())
    line = b"x" * 76 + b"\r\n"
    big = b"From: a@example.com\r\nSubject: big\r\n\r\n" + line * 8000
    txn = [_plain("", "acme", "pw"), b"MAIL FROM:<a@example.com>\r\n",
           b"RCPT TO:<u@example.org>\r\n", b"DATA\r\n", big + b"\r\n.\r\n"]  # fmt: skip

    async def go(port: int) -> tuple[bytes, list[bytes]]:
        sending = asyncio.ensure_future(_session(port, tls, txn))
        while not storing.is_set():
            await asyncio.sleep(0.01)
        other = await _session(port, tls, [b"NOOP\r\n"])  # answered meanwhile
        release.set()
        return (await sending)[-1], other

    (reply, other), ctx = _run(tmp_path, certs, go)
    try:
        assert waited == [True], waited
        assert other[0].startswith(b"250"), other
        assert reply.startswith(b"250 2.0.0"), reply
        mid = int(re.search(rb"queued as (\d+)", reply).group(1))  # type: ignore[union-attr]
        m = ctx.spool.message(mid)
        digest = blob_digest(orjson.dumps(m["vars"]))
        assert digest is not None, m["vars"]
        body = ctx.spool.get_blobs([digest])
        assert len(body) == 1 and line * 100 in base64.b64decode(
            orjson.loads(next(iter(body.values())))["raw"])  # fmt: skip
        # Its row recorded as the blob's (in a thread too, before the 250): no reference
        # left pending for the sweep to find.
        db = getattr(ctx.spool, "db", None) or ctx.spool.inner.db
        assert db.execute("SELECT pending FROM blobs WHERE digest=?", (digest,)).fetchall() == [
            (0,)]  # fmt: skip
        assert db.execute("SELECT first, last FROM blob_rows WHERE digest=?",
                          (digest,)).fetchall() == [(mid, mid)]  # fmt: skip
    finally:
        ctx.close()
