"""A body sent to many recipients is stored once (issue 16): a content-addressed
blob in the spool (SQLite and Redis), rows that reference it, the supervisor and
worker reading it once per batch. Against a real ``fastsend serve`` and a real
sink: 1,000 recipients of one 1 MB message grow the spool by about 1 MB, and
each recipient gets the message byte for byte; a kill -9 between the blob and
the rows leaves no row without its body."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from tests._serve_helpers import ENV, Served

from fastsend import wire
from fastsend.sink import ReceivedMessage, SinkConfig, SinkThread
from fastsend.spool import open_spool

N = 1000
VOLATILE = ("--allow-volatile",)  # the test's redis-server keeps no AOF (nor does SQLite care)


def big_message(size: int = 1 << 20, marker: str = "blob") -> bytes:
    line = b"The same body for every recipient, stored once in the spool." + b"." * 13 + b"\r\n"
    head = (
        "From: News <news@evil.example>\r\nTo: undisclosed-recipients:;\r\n"
        # its own Date and Message-ID: a raw message without them gets them added
        f"Subject: {marker}\r\nDate: Mon, 01 Jun 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{marker}@evil.example>\r\n\r\n"
    ).encode()
    return head + line * (size // len(line)) + b".a line that starts with a dot\r\n"


class Received:
    """What a sink got, without keeping the bodies: per body digest, the recipients."""

    def __init__(self) -> None:
        self.rcpts: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()
        self.unstamped: Counter[str] = Counter()  # ... without a first Received field

    def __call__(self, m: ReceivedMessage) -> None:
        self.bodies[hashlib.sha256(m.data).hexdigest()] += 1
        rest = re.sub(rb"\AReceived:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", b"", bytes(m.data))
        self.unstamped[hashlib.sha256(rest).hexdigest()] += 1
        self.rcpts.update(m.recipients)

    def wait(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(self.rcpts.values()) < n:
            assert time.monotonic() < deadline, f"{sum(self.rcpts.values())} of {n} delivered"
            time.sleep(0.1)


@pytest.fixture
def sink() -> Iterator[tuple[SinkThread, Received]]:
    got = Received()
    with SinkThread(SinkConfig(fast_path=False, max_size=8 << 20)) as s:
        s.sink.on_message = got
        yield s, got


@pytest.fixture(params=["sqlite", "redis"])
def spool_url(request: Any, tmp_path: Path) -> str:
    """The spool ``fastsend serve`` uses: "" (SQLite in tmp/spool) or a Redis URL."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("redis_server").url(dir=str(tmp_path / "spool")))


def spool_bytes(tmp: Path, url: str) -> int:
    """What the spool holds: the SQLite files, or Redis's used memory."""
    if url:
        return int(redis.Redis.from_url(url.split("?")[0]).info("memory")["used_memory"])
    return sum(p.stat().st_size for p in (tmp / "spool").glob("spool.db*"))


def test_one_body_to_a_thousand_recipients_is_stored_once(
    spool_url: str, tmp_path: Path, sink: tuple[SinkThread, Received]
) -> None:
    s_thread, got = sink
    url = spool_url
    raw = big_message()
    rcpts = [f"r{i}@example.org" for i in range(N)]
    s = Served(tmp_path, f"{s_thread.host}:{s_thread.port}", spool_url=url, serve_args=VOLATILE,
               api="max_spooled_bytes = 4000000000\nmax_body_bytes = 8000000\n")  # fmt: skip
    try:
        before = spool_bytes(tmp_path, url)
        body = {"from": "news@evil.example", "to": rcpts, "raw": raw.decode()}
        st, out = s.req("POST", "/v1/messages", body, timeout=120)
        assert st == 202 and out["accepted"] == N, out
        grew = spool_bytes(tmp_path, url) - before
        # The body once (base64: 1.4 MB) and 1,000 small rows, not 1,000 bodies (1.4 GB).
        assert grew < 8 << 20, f"the spool grew by {grew} bytes"
        got.wait(N)
        assert got.rcpts == Counter(rcpts)  # each recipient once
        assert got.bodies.keys() == {hashlib.sha256(raw).hexdigest()}  # byte for byte
        assert sum(got.bodies.values()) < N / 10  # recipients share transactions
    finally:
        s.stop()


CRASH = """
import base64, os, signal, sys
import orjson
from fastsend.config import from_dict
from fastsend.serve.context import open_context

spool_dir, url, stage = sys.argv[1:4]
raw = open(sys.argv[4], "rb").read()
ctx = open_context(from_dict({"spool": {"dir": spool_dir, **({"url": url} if url else {})}}))
cid = ctx.tenant_campaign("evil")
spool = ctx.spool
real = getattr(spool, stage)

def die(*args, **kw):
    # add_messages: the blob is in, the rows are not; ref_blob: the rows are in
    # too, but the blob never learns which they are.
    os.kill(os.getpid(), signal.SIGKILL)

setattr(spool, stage, die)
vars_ = orjson.dumps({"raw": base64.b64encode(raw).decode(), "mail_from": "news@evil.example"})
ctx.inject(cid, [(f"c{i}@example.org", "example.org", vars_) for i in range(3)])
"""


def test_kill_between_blob_and_rows_leaves_no_row_without_its_body(
    spool_url: str, tmp_path: Path, sink: tuple[SinkThread, Received]
) -> None:
    s_thread, got = sink
    url = spool_url
    raw = big_message(200_000, "crash")
    (tmp_path / "raw.eml").write_bytes(raw)
    for stage in ("add_messages", "ref_blob"):
        p = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "spool"), url, stage,
                            str(tmp_path / "raw.eml")], env=ENV, capture_output=True, timeout=60)  # fmt: skip
        assert p.returncode == -9, p.stderr.decode()
    spool = open_spool(url or str(tmp_path / "spool"))
    rows = spool.claim_due(time.time() + 1, 100)
    assert len(rows) == 3  # the second run's rows; the first died before any row
    refs = {wire.blob_digest(c.vars) for c in rows}
    assert len(refs) == 1 and None not in refs
    digest = refs.pop()
    assert digest is not None
    assert set(spool.get_blobs([digest])) == {digest}  # no row without its body
    # A reference never recorded (the kill): the sweep finds the rows that hold
    # the body and keeps it while they are not final, however late.
    assert spool.sweep_blobs(time.time() + 365 * 86400, 86400) == 0
    spool.release([c.id for c in rows])
    spool.close()
    s = Served(tmp_path, f"{s_thread.host}:{s_thread.port}", spool_url=url, serve_args=VOLATILE)
    try:
        got.wait(3, timeout=60)
        assert got.rcpts == Counter(f"c{i}@example.org" for i in range(3))
        assert got.bodies.keys() == {hashlib.sha256(raw).hexdigest()}
    finally:
        s.stop()
    # Delivered: a retention after, the dead accepts' body is reclaimed.
    spool = open_spool(url or str(tmp_path / "spool"))
    try:
        deadline = time.monotonic() + 60
        while spool.counts()["delivered"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spool.sweep_blobs(time.time() + 367 * 86400, 86400) == 1  # after the one above
        assert spool.get_blobs([digest]) == {}
    finally:
        spool.close()


def test_submission_to_many_rcpts_stores_the_message_once(
    tmp_path: Path, sink: tuple[SinkThread, Received], certs: Any
) -> None:
    import asyncio

    import aiosmtplib
    from tests.conftest import free_port

    from fastsend.serve.listeners import hash_password

    s_thread, got = sink
    port = free_port()
    extra = f"""
[submission]
listen = "127.0.0.1:{port}"
tls_cert = "{certs[0]}"
tls_key = "{certs[1]}"
[submission.users]
app = "{hash_password("pw", iterations=1000)}"
"""
    raw = big_message(300_000, "submitted")
    rcpts = [f"s{i}@example.org" for i in range(200)]
    s = Served(tmp_path, f"{s_thread.host}:{s_thread.port}", extra=extra)
    try:
        before = spool_bytes(tmp_path, "")

        async def go() -> None:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=certs[2],
                                   start_tls=True, timeout=60)  # fmt: skip
            await smtp.connect()
            await smtp.login("app", "pw")
            errors, _ = await smtp.sendmail("news@evil.example", rcpts, raw)
            assert errors == {}
            await smtp.quit()

        asyncio.run(go())
        grew = spool_bytes(tmp_path, "") - before
        assert grew < 4 << 20, f"the spool grew by {grew} bytes (200 copies: 80 MB)"
        got.wait(len(rcpts))
        assert got.rcpts == Counter(rcpts)
        # One copy for all (one Received field: no "for" with 200 recipients).
        assert len(got.bodies) == 1
        assert got.unstamped.keys() == {hashlib.sha256(raw).hexdigest()}
    finally:
        s.stop()
