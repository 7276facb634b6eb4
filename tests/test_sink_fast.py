"""The sink's fast path (fastsend.sink.fast.SinkScanner and its compiled twin).

The reference is the full path (ServerProtocol answered by the sink): every
session below is played over a real socket against a sink with the fast path
and one without, and the reply streams and counters must be identical. The
scanners themselves (pure Python and compiled) are fed the same sessions in
random chunks and must agree with each other and with one-piece feeding.
"""

from __future__ import annotations

import random
import re
import socket
import time
from typing import Any

import pytest

from fastsend import _accel
from fastsend.sink import SinkThread
from fastsend.sink import fast as fast_py

HEAD = b"EHLO client.test\r\n"
BODY = b"Subject: t\r\n\r\nline one\r\n.dot-stuffed\r\n..two dots\r\n\r\nend\r\n"
MSG = b"MAIL FROM:<s@example.test>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n" + BODY + b".\r\n"

SESSIONS: dict[str, bytes] = {
    "plain": HEAD + MSG + MSG + b"RSET\r\nNOOP\r\nQUIT\r\n",
    "helo-lowercase": b"helo c.test\r\nmail from: <s@e.test> SIZE=100 BODY=8BITMIME\r\n"
    b"rcpt to:<a@e.net>\r\nrcpt to:<b@e.net>\r\ndata\r\nhi\r\n.\r\nquit\r\n",
    "null-sender": HEAD + b"MAIL FROM:<>\r\nRCPT TO:<a@e.net>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    "empty-body": HEAD + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nDATA\r\n.\r\nQUIT\r\n",
    "bare-lf": HEAD
    + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nDATA\r\na\nb\r\n.\r\n"
    + MSG
    + b"QUIT\r\n",
    "bare-cr": HEAD + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nDATA\r\na\rb\r\n.\r\nQUIT\r\n",
    "smuggling": HEAD + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nDATA\r\nx\n.\r\n"
    b"MAIL FROM:<evil@e.t>\r\n\r\n.\r\nQUIT\r\n",
    "too-big": HEAD
    + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nDATA\r\n"
    + b"y" * 3000
    + b"\r\n.\r\n"
    + MSG
    + b"QUIT\r\n",
    "size-param-too-big": HEAD + b"MAIL FROM:<s@e.t> SIZE=999999\r\n" + MSG + b"QUIT\r\n",
    "faults": HEAD
    + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<tempfail-1@e.n>\r\nRCPT TO:<Permfail-2@e.n>\r\n"
    b"RCPT TO:<defer1-x@e.n>\r\nRCPT TO:<defer1-x@e.n>\r\nRCPT TO:<safe@e.n>\r\n"
    b"RCPT TO:<sam@e.n>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n",
    "slow-handover": HEAD + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nRCPT TO:<slow-1@e.n>\r\n"
    b"DATA\r\nhello\r\n.\r\n" + MSG + b"QUIT\r\n",
    "421": HEAD + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nRCPT TO:<421-x@e.n>\r\nQUIT\r\n",
    "unknown-command": HEAD + b"XYZZ\r\nMAIL FROM:<s@e.t>\r\n" + b"RCPT TO:<a@e.n>\r\n"
    b"DATA\r\nz\r\n.\r\nQUIT\r\n",
    "sequence-errors": b"MAIL FROM:<s@e.t>\r\n"
    + HEAD
    + b"RCPT TO:<a@e.n>\r\nDATA\r\n"
    + MSG
    + b"QUIT\r\n",
    "bad-address": HEAD + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a b@e.n>\r\nRCPT TO:<postmaster>\r\n"
    b"DATA\r\nq\r\n.\r\nQUIT\r\n",
    "starttls-unoffered": HEAD + b"STARTTLS\r\n" + MSG + b"QUIT\r\n",
    "bdat": HEAD
    + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nBDAT 5 LAST\r\nhello"
    + MSG
    + b"QUIT\r\n",
    "long-line": HEAD + b"NOOP " + b"n" * 3000 + b"\r\n" + MSG + b"QUIT\r\n",
    "rcpt-param": HEAD + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n> NOTIFY=NEVER\r\nQUIT\r\n",
    "utf8": HEAD
    + "MAIL FROM:<s@é.t> SMTPUTF8\r\n".encode()
    + "RCPT TO:<ü@e.n>\r\n".encode()
    + b"DATA\r\nx\r\n.\r\nQUIT\r\n",
    "long-body-line": HEAD
    + b"MAIL FROM:<s@e.t>\r\nRCPT TO:<a@e.n>\r\nDATA\r\n."
    + b"L" * 150_000
    + b"\r\n.\r\nQUIT\r\n",
    "too-many-rcpts": HEAD
    + b"MAIL FROM:<s@e.t>\r\n"
    + b"".join(b"RCPT TO:<r%d@e.n>\r\n" % i for i in range(5))
    + b"DATA\r\nx\r\n.\r\nQUIT\r\n",
}
CONFIG: dict[str, Any] = {
    "keep_messages": False,
    "slow_ms": 50,
    "max_size": 2000,
    "max_recipients": 3,
    "seed": 7,
}
# long-body-line is over max_size by design: 552 on both paths.


def play(port: int, script: bytes, chunk: int = 0) -> bytes:
    """Send a session (all at once, or in chunks), read every reply until close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if chunk:
            for i in range(0, len(script), chunk):
                sock.sendall(script[i : i + chunk])
                time.sleep(0.001)
        else:
            sock.sendall(script)
        data = b""
        while True:
            try:
                got = sock.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            data += got
        return data
    finally:
        sock.close()


def normalise(replies: bytes) -> bytes:
    return re.sub(rb"queued as [0-9A-F]+", b"queued as QID", replies)


def stats_of(s: SinkThread) -> dict[str, Any]:
    d = s.stats.as_dict()
    return {k: d[k] for k in ("messages", "recipients", "bytes", "faults", "peers")}


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_fast_path_answers_as_the_full_path(name: str) -> None:
    script = SESSIONS[name]
    results = []
    for fast in (True, False):
        with SinkThread(fast_path=fast, **CONFIG) as s:
            assert s.sink._fast is fast
            replies = normalise(play(s.port, script))
            if name == "plain":  # chunked too: replies do not depend on how bytes arrive
                assert normalise(play(s.port, script, chunk=7)) == replies
            time.sleep(0.05)
            results.append((replies, stats_of(s)))
    assert results[0] == results[1]
    assert results[0][0].startswith(b"220 ")


def test_fast_path_counts_and_stops_at_count() -> None:
    with SinkThread(keep_messages=False, count=3) as s:
        assert s.sink._fast
        replies = play(s.port, HEAD + MSG * 3 + b"QUIT\r\n")
        assert replies.count(b"250 2.0.0 Ok: queued as ") == 3
        assert s.stats.messages == 3
        assert s.stats.recipients == 3
        assert s.stats.bytes == 3 * (len(BODY) - 2)  # two stuffed dots each
        assert s.stats.peers == {"127.0.0.1": 3}


def test_fast_path_off_when_messages_are_kept(tmp_path: Any) -> None:
    assert not SinkThread(keep_messages=True).sink._fast
    assert not SinkThread(keep_messages=False, log_path=str(tmp_path / "l")).sink._fast
    assert not SinkThread(keep_messages=False, latency_ms=5).sink._fast
    assert not SinkThread(
        keep_messages=False, fault_text={"tempfail": (421, "4.7.0", "go away")}
    ).sink._fast
    assert SinkThread(keep_messages=False, defer_rate=0.5).sink._fast


def test_random_faults_on_the_fast_path() -> None:
    script = HEAD + b"MAIL FROM:<s@e.t>\r\n" + b"RCPT TO:<a@e.n>\r\n" * 40 + b"RSET\r\nQUIT\r\n"
    out = []
    for fast in (True, False):
        cfg = {**CONFIG, "max_recipients": 1000, "defer_rate": 0.3, "reject_rate": 0.2}
        with SinkThread(fast_path=fast, **cfg) as s:
            out.append((play(s.port, script), stats_of(s)))
    assert out[0] == out[1]
    assert out[0][1]["faults"]["random-defer"] > 0


# ---------------------------------------------------------------- the scanners


def scanner_class(impl: str) -> Any:
    if impl == "c":
        return _accel.compiled("SinkScanner")
    return fast_py.SinkScanner


def run_scanner(cls: Any, script: bytes, cuts: list[int]) -> tuple[bytes, Any]:
    msgs: list[tuple[list[str], int]] = []

    def on_message(rcpts: list[str], size: int) -> bytes:
        msgs.append((list(rcpts), size))
        return b"250 ok %d\r\n" % len(msgs)

    def hook(addr: str) -> Any:
        if addr.startswith("slow"):
            return False
        if addr.startswith("tempfail"):
            return b"451 no\r\n"
        return None

    sc = cls(b"250 EHLO\r\n", b"250 HELO\r\n", 2000, 3, 2048, on_message, hook, False)
    out = b""
    last = 0
    for cut in [*cuts, len(script)]:
        out += sc.feed(script[last:cut])
        last = cut
        if sc.state:
            break
    state = (sc.state, sc.rest if sc.state == 2 else b"", sc.helo, sc.esmtp, sc.mail_from)
    return out, (state, list(sc.recipients), sc.rcpt_count, msgs)


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_scanner_twins_agree_whatever_the_chunks(impl: str, name: str) -> None:
    script = SESSIONS[name]
    whole = run_scanner(fast_py.SinkScanner, script, [])
    rng = random.Random(name)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(script)), min(12, len(script) - 1)))
        got = run_scanner(scanner_class(impl), script, cuts)
        # Chunking may stop a hand-over earlier or later in the stream only by
        # what is still unread: compare replies and what was established.
        assert got[0] == whole[0], name
        assert got[1][1:] == whole[1][1:], name
        assert got[1][0][0] == whole[1][0][0], name
    assert run_scanner(scanner_class(impl), script, []) == whole
