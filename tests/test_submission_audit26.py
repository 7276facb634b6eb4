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
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fastsend.serve import listeners
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
