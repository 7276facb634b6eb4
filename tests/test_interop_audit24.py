"""Interop from outside (session 24): the delivery side against real and
scripted receivers where they cut a session or refuse it before any mail.

- A session cut at the receiver's error cap: Postfix's smtpd_hard_error_limit
  (a run of unknown recipients, then "421 4.7.0 Error: too many errors"),
  Exchange's "421 4.7.0 Too many errors on this connection": what the server
  neither took nor refused goes out on a new session at once, not deferred.
"""

from __future__ import annotations

import contextlib
import re
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests._mta_helpers import private_postfix, read_log
from tests.test_delivery_pool import send_groups

from conftest import free_port

Run = Callable[[Any], Any]

# Postfix refusing every "bad*" recipient, with its error caps lowered (20 and
# 10, 1 s a refusal past the soft one, by default): a session with five refusals
# is cut.
ERROR_CAP_CF = """\
smtpd_recipient_restrictions =
    check_recipient_access regexp:{{ {{/^bad/ 550 5.1.1 no such user}} }},
    permit_mynetworks, reject
default_transport = discard
relay_transport = discard
smtpd_hard_error_limit = 5
smtpd_soft_error_limit = 3
smtpd_error_sleep_time = 0
"""


def _bad_first(k: int) -> Callable[[int], str]:
    return lambda i: f"bad{i}" if i < k else f"good{i}"


def _check_every_recipient_answered_once(groups: list[list[Any]], n: int, bad: int) -> None:
    got = {r.tag: r.outcomes[0] for g in groups for r in g}
    assert len(got) == n == sum(len(g) for g in groups)
    kinds = [(t, got[t].kind, got[t].code) for t in range(n)]
    assert kinds == [(t, "failed", 550) for t in range(bad)] + [
        (t, "delivered", 250) for t in range(bad, n)
    ], [(t, o.kind, o.code, o.text) for t, o in sorted(got.items()) if o.kind == "deferred"]


def test_postfix_error_cap_cuts_the_session_the_rest_goes_on_a_new_one(
    run: Run, tmp_path: Any
) -> None:
    """Twelve unknown recipients, then good ones, one site, groups of ten:
    Postfix ends the session with "421 4.7.0 Error: too many errors" at its
    fifth error. The group's envelopes it never answered were deferred with
    that 421 (a retry interval away, and read by the shaping as a refusal)
    though never tried; now they go on the next session: every bad recipient
    refused 5.1.1, every good one delivered, nothing deferred."""
    port = free_port()
    n, bad = 30, 12
    with private_postfix(ERROR_CAP_CF, f"127.0.0.1:{port} inet n - n - - smtpd\n", [port]) as d:
        groups = send_groups(run, port, n, str(tmp_path), 10, names=_bad_first(bad))
        log = read_log(d / "maillog")
    assert "too many errors" in log  # (the cap was reached)
    _check_every_recipient_answered_once(groups, n, bad)


@contextlib.contextmanager
def error_capped_server(cap: int, reply: bytes) -> Iterator[tuple[int, list[int]]]:
    """A pipelining server refusing ``bad*`` recipients 550 that ends a session
    with ``reply`` at its ``cap``-th refusal (as Exchange and Postfix do);
    yields (port, refusals per session)."""
    sessions: list[int] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            errors = 0
            sessions.append(0)
            k = len(sessions) - 1
            ok = False
            self.wfile.write(b"220 scripted ESMTP\r\n")
            while line := self.rfile.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.wfile.write(b"250-scripted\r\n250 PIPELINING\r\n")
                elif verb == b"RCPT" and re.search(rb"<bad", line):
                    errors += 1
                    sessions[k] = errors
                    if errors >= cap:
                        self.wfile.write(reply)
                        return
                    self.wfile.write(b"550 5.1.1 User unknown\r\n")
                elif verb == b"RCPT":
                    ok = True
                    self.wfile.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    if not ok:
                        self.wfile.write(b"554 5.5.1 No valid recipients\r\n")
                        continue
                    self.wfile.write(b"354 go\r\n")
                    while self.rfile.readline() not in (b".\r\n", b""):
                        pass
                    self.wfile.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    ok = False if verb in (b"MAIL", b"RSET") else ok
                    self.wfile.write(b"250 2.0.0 Ok\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], sessions
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "reply",
    [
        b"421 4.7.0 Too many errors on this connection, closing transmission channel\r\n",
        b"421 4.7.0 mx.example.net Error: too many errors\r\n",
    ],
    ids=["exchange", "postfix"],
)
def test_a_session_cut_at_its_error_cap_sends_the_rest_on_a_new_one(
    run: Run, tmp_path: Any, reply: bytes
) -> None:
    """The same with Exchange's words: the cap's 421 is about this session,
    not a request to slow down: what it left unanswered goes on the next."""
    n, bad = 24, 9
    with error_capped_server(4, reply) as (port, sessions):
        groups = send_groups(run, port, n, str(tmp_path), 8, names=_bad_first(bad))
    _check_every_recipient_answered_once(groups, n, bad)
    assert sessions == [4, 4, 3]  # (each cut refusal is refused again on the next)
