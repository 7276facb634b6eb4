"""What the delivery side records when a receiving server gives no reply.

A server that resets or closes the connection in the middle of a session
(after the greeting, at MAIL, RCPT or DATA) has answered nothing: the
outcome carries our own socket error ("connection lost: [Errno 104]
Connection reset by peer"), and the classifier must not read those words
as the site's refusal (it did: "blocked", or "rejected" at MAIL).
Driven through the real ``fastsend send`` against a loopback server that
drops the connection at a chosen command.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import send_via, summary, write_campaign, write_recipients

from conftest import free_port


class DroppingServer:
    """Greets, answers EHLO and the commands before ``at``, then resets the
    connection (SO_LINGER 0: an RST, as a crashed or overloaded server's
    kernel sends) or, with ``reset=False``, closes it with no reply."""

    def __init__(self, at: str, reset: bool = True, reply: str = "") -> None:
        self.at, self.reset, self.reply = at.encode(), reset, reply.encode()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", free_port()))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buf = b""
        refused = False  # MAIL FROM was refused: RCPT and DATA get 503 until RSET
        try:
            conn.sendall(b"220 mx.drop.test ESMTP\r\n")
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
                    if verb == self.at and self.reply:
                        conn.sendall(self.reply + b"\r\n")  # a refusal, and the session goes on
                        refused = True
                        continue
                    if refused and verb in (b"RCPT", b"DATA"):
                        conn.sendall(b"503 5.5.1 Error: need MAIL command\r\n")
                        continue
                    if verb == b"RSET":
                        refused = False
                    if verb == self.at:
                        if self.reset:
                            conn.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        return
                    if verb in (b"EHLO", b"HELO"):
                        conn.sendall(b"250-mx.drop.test\r\n250 PIPELINING\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def dropper(request: pytest.FixtureRequest) -> Iterator[DroppingServer]:
    at, reset = request.param
    srv = DroppingServer(at, reset)
    try:
        yield srv
    finally:
        srv.close()


def _events(spool: Path) -> list[dict[str, Any]]:
    p = spool / "events.jsonl"
    return [orjson.loads(x) for x in p.read_bytes().splitlines() if x.strip()]


@pytest.mark.parametrize(
    "dropper",
    [("MAIL", True), ("RCPT", True), ("DATA", True), ("RCPT", False)],
    indirect=True,
    ids=["reset-at-mail", "reset-at-rcpt", "reset-at-data", "closed-at-rcpt"],
)
def test_connection_dropped_mid_session_is_a_network_deferral(
    tmp_path: Path, dropper: DroppingServer
) -> None:
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["bob@example.com"])
    spool = tmp_path / "spool"
    proc = send_via(camp, rcpts, ("127.0.0.1", dropper.port), spool, "--no-dkim",
                    "--workers", "1", "--max-wait", "0")  # fmt: skip
    s = summary(proc)
    assert s["delivered"] == 0 and s["bounced"] == 0, (s, proc.stderr[-2000:])
    evs = [e for e in _events(spool) if e["event"] == "deferred"]
    assert evs, _events(spool)
    for ev in evs:
        # Nothing was refused: no reason naming a block or our sender, nothing hard.
        assert (ev["reason"], ev["hard"]) == ("networkerror", False), ev


# Refusals of MAIL FROM whose words say an address or a domain does not
# exist: Exim's failed sender verification (its last line), RFC 7504's 556
# for a domain that takes no mail (at MAIL FROM: the sender's), a server
# whose sender-domain check names no sender. They are about our envelope
# sender; none may be read as a recipient that can never receive (hard: the
# recipients were suppressed, none of whom the server had been told of).
@pytest.mark.parametrize(
    "reply",
    [
        "550 Unrouteable address",
        "556 Domain does not accept mail",
        "550 Domain does not exist: bounce.example.org",
    ],
)
def test_refused_mail_from_never_suppresses_recipients(tmp_path: Path, reply: str) -> None:
    srv = DroppingServer("MAIL", reply=reply)
    try:
        camp = write_campaign(tmp_path)
        rcpts = write_recipients(tmp_path, ["bob@example.com", "carol@example.com"])
        spool = tmp_path / "spool"
        proc = send_via(camp, rcpts, ("127.0.0.1", srv.port), spool, "--no-dkim",
                        "--workers", "1", "--max-wait", "0")  # fmt: skip
    finally:
        srv.close()
    s = summary(proc)
    assert s["bounced"] == 2, (s, proc.stderr[-2000:])
    evs = [e for e in _events(spool) if e["event"] == "bounced"]
    assert len(evs) == 2, _events(spool)
    for ev in evs:
        assert (ev["reason"], ev["hard"], ev["suppressed"]) == ("rejected", False, False), ev
