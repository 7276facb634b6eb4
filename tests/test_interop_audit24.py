"""Interop from outside (session 24): the delivery side against real and
scripted receivers where they cut a session or refuse it before any mail.

- A session cut at the receiver's error cap: Postfix's smtpd_hard_error_limit
  (a run of unknown recipients, then "421 4.7.0 Error: too many errors"),
  Exchange's "421 4.7.0 Too many errors on this connection": what the server
  neither took nor refused goes out on a new session at once, not deferred.
- A host refusing the session at EHLO (then HELO), as Postfix's
  smtpd_helo_restrictions do with smtpd_delay_reject = no, or at EHLO alone
  before it closes: HELO is tried after any 5xx, the refusal is deferred
  (none of the recipients was named), and the site's next MX takes the mail.
- Exim with recipients_max_reject: the RCPTs over its recipients_max 552,
  then the whole message "554 Too many recipients" at DATA: the recipients
  it took go again alone, the surplus after them, none bounced.
- A static route naming a host the DNS does not know but the system does
  ("localhost", a relay in /etc/hosts): delivered; one nobody knows: the
  operator's configuration, deferred, never a hard bounce that suppresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._engine_helpers import run_fastsend, summary, write_campaign, write_recipients
from tests._mta_helpers import private_postfix, read_log
from tests.test_delivery_pool import send_groups
from tests.test_smtp_faults import Scripted, scripted, session

from _smtp_helpers import aiosmtpd_server, client_class, link_class
from conftest import free_port, start_exim, wait_port
from fastsend.outcome import Outcome
from fastsend.smtp import transport as tr
from fastsend.testing.dnsserver import DNSServer

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


BLOCKED = b"554 5.7.1 Service unavailable; Client host [127.0.0.2] blocked using zen.spamhaus.org"


@pytest.fixture
def client_twin(impl: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(tr, "SMTPClient", client_class(impl))
    monkeypatch.setattr(tr, "Link", link_class(impl))
    return impl


@pytest.mark.parametrize(
    ("replies", "want"),
    [
        # EHLO and HELO refused: HELO's words (it was no HELO, failed for good)
        ({"EHLO": BLOCKED + b"\r\n", "HELO": BLOCKED + b"\r\n"}, ("helo", 554)),
        # EHLO refused, then the close: EHLO's words, not "connection closed"
        ({"EHLO": BLOCKED + b"\r\n", "HELO": b""}, ("ehlo", 554)),
        # 421: no HELO, the session is over
        ({"EHLO": b"421 4.7.0 mx busy, closing\r\n"}, ("ehlo", 421)),
    ],
    ids=["ehlo-helo-554", "ehlo-554-close", "ehlo-421"],
)
def test_a_session_refused_at_ehlo_is_deferred_with_the_servers_words(
    run: Run, client_twin: str, replies: dict[str, bytes], want: tuple[str, int]
) -> None:
    server = Scripted(replies=replies)
    out = scripted(run, server, lambda s: session(s))
    assert isinstance(out, Outcome), out
    assert (out.kind, out.stage, out.code) == ("deferred", *want), out
    if want[1] == 554:
        assert out.enhanced == "5.7.1" and "zen.spamhaus.org" in out.text, out
        assert server.sessions[0][:2] == [b"EHLO localhost", b"HELO localhost"]
    else:
        assert server.sessions[0] == [b"EHLO localhost"]


@pytest.mark.parametrize("code", [b"553 5.5.2 EHLO name not FQDN", b"554 5.5.1 ESMTP disabled"])
def test_any_5xx_to_ehlo_falls_back_to_helo(run: Run, client_twin: str, code: bytes) -> None:
    """RFC 5321 3.2, as Postfix: EHLO refused with any 5xx (not only
    500/501/502/504/550), HELO is tried; taken, the mail goes (one command at a
    time). A 553 or 554 ended the session, every message bounced."""
    server = Scripted(replies={"EHLO": code + b"\r\n", "HELO": b"250 scripted\r\n"})
    _tls, results = scripted(run, server, lambda s: session(s, n=2))
    assert all(o.delivered for r in results for o in r.outcomes), results
    assert server.sessions[0][:2] == [b"EHLO localhost", b"HELO localhost"]


# A Postfix refusing the client's HELO name at EHLO and HELO (its
# smtpd_helo_restrictions answered there: smtpd_delay_reject = no).
HELO_REFUSED_CF = """\
smtpd_delay_reject = no
smtpd_helo_restrictions =
    check_helo_access inline:{{ {{out.example.test = 554 5.7.1 HELO name on our blocklist}} }}
smtpd_recipient_restrictions = permit_mynetworks, reject
default_transport = discard
"""


def test_a_preferred_mx_refusing_ehlo_leaves_the_mail_to_the_backup(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """``fastsend send`` through real DNS: refuse.test's preferred MX, a real
    Postfix, refuses our HELO name at EHLO and HELO "554 5.7.1 <...>: Helo
    command rejected"; its backup takes every message, a ``host_refused``
    shaping event names the first, nothing bounced. Before: no HELO after a
    554 and the whole group failed 554 at once, the backup never tried."""
    port = free_port()
    dns_server.set_zones(
        {
            "refuse.test": [("MX", "10 mx1.refuse.test."), ("MX", "20 mx2.refuse.test.")],
            "mx1.refuse.test": [("A", "127.0.0.11")],
            "mx2.refuse.test": [("A", "127.0.0.1")],
        }
    )
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, [f"u{i}@refuse.test" for i in range(6)])
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\nmx_port = {port}\n'
        '[ips]\nsource = ["127.0.0.2"]\nhelo = "out.example.test"\n[workers]\ncount = 1\n'
        "[delivery]\nallow_private_mx = true\n"
    )
    with (
        private_postfix(HELO_REFUSED_CF, f"127.0.0.11:{port} inet n - n - - smtpd\n", []) as d,
        aiosmtpd_server(port) as (_ctl, handler),
    ):
        wait_port("127.0.0.11", port)
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg),
            "--spool", str(tmp_path / "spool"), "--json", "--no-dkim", "--no-progress",
            "--max-wait", "5",
        )  # fmt: skip
        log = read_log(d / "maillog")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Helo command rejected" in log
    s = summary(proc)
    assert (s["delivered"], s["bounced"], s["deferred"]) == (6, 0, 0), s
    assert len(handler.messages) == 6
    shaping = [
        orjson.loads(x) for x in (tmp_path / "spool" / "shaping.jsonl").read_bytes().splitlines()
    ]
    refused = [e for e in shaping if e.get("action") == "host_refused"]
    assert len(refused) == 1 and refused[0]["mx"].startswith("mx1.refuse.test[127.0.0.11]")
    assert "Helo command rejected" in refused[0]["reason"]


def test_a_route_to_localhost_delivers_and_an_unknown_route_host_defers(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """``--route '*=localhost:PORT'`` with a DNS that does not know "localhost"
    (the test's; dnspython reads no /etc/hosts): every message bounced 5.1.2
    "host localhost has no address", hostunknown, hard, and every recipient
    was suppressed. Now the system's resolver finds it: delivered. A route
    host nobody knows is deferred 4.3.5 naming the route, nothing suppressed."""
    port = free_port()
    camp = write_campaign(tmp_path)
    rcpts = write_recipients(tmp_path, ["a@example.com", "b@example.org"])
    cfg = tmp_path / "fastsend.toml"
    cfg.write_text(f'[dns]\nnameservers = ["127.0.0.1:{dns_server.port}"]\n')

    def send(route: str, spool: str) -> dict[str, Any]:
        proc = run_fastsend(
            "send", str(camp), "-r", str(rcpts), "-c", str(cfg), "--route", route,
            "--spool", str(tmp_path / spool), "--json", "--no-dkim", "--no-progress",
            "--max-wait", "2",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return summary(proc)

    with aiosmtpd_server(port) as (_ctl, handler):
        s = send(f"*=localhost:{port}", "s1")
        assert (s["delivered"], s["bounced"]) == (2, 0), s
        assert len(handler.messages) == 2
        s = send(f"*=no-such-relay.invalid:{port}", "s2")
    assert (s["delivered"], s["bounced"], s["deferred"]) == (0, 0, 2), s
    events = [orjson.loads(x) for x in (tmp_path / "s2" / "events.jsonl").read_bytes().splitlines()]
    deferred = [e for e in events if e["event"] == "deferred"]
    assert [(e["code"], e["enhanced"]) for e in deferred] == [(451, "4.3.5")] * 2, deferred
    assert "route host no-such-relay.invalid" in deferred[0]["text"]
    listed = run_fastsend("suppress", "list", "--spool", str(tmp_path / "s2"))
    assert listed.stdout.strip() == "", listed.stdout


def test_exim_refusing_the_whole_message_over_recipients_max_gets_it_split(
    run: Run, tmp_path: Any
) -> None:
    """Exim's recipients_max = 3 with recipients_max_reject = true: it refuses
    the fourth and fifth RCPT 552 and then DATA "554 Too many recipients".
    All five were answered failed (the three it took bounced 554, the surplus
    deferred). Now the three go again alone and the two after them: every
    recipient delivered once."""
    with start_exim("recipients_max = 3\nrecipients_max_reject = true\n") as exim:
        groups = send_groups(run, exim.port, 20, str(tmp_path), rcpts=5)
        received = exim.received()
        log = exim.mainlog()
    assert "too many recipients" in log  # (the limit was met)
    outcomes = [
        (t, o.kind) for g in groups for r in g for t, o in zip(r.tag, r.outcomes, strict=True)
    ]
    assert sorted(outcomes) == [(i, "delivered") for i in range(20)], outcomes
    got = sorted(r for _sender, rs in received for r in rs)
    assert got == sorted(f"r{i}@x.example" for i in range(20))
    assert max(len(rs) for _sender, rs in received) == 3


class TLSThenBroken(Scripted):
    """A server that takes STARTTLS, completes the TLS handshake, and then
    answers the EHLO inside TLS with ``after`` (b"": closes the connection)."""

    def __init__(self, cert: str, key: str, after: bytes) -> None:
        super().__init__({"EHLO": b"250-scripted\r\n250-STARTTLS\r\n250 PIPELINING\r\n"})
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.after = after
        self.tls_sessions = 0

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            w.write(b"220 scripted ESMTP\r\n")
            line = await r.readline()  # EHLO
            w.write(self.replies["EHLO"])
            line = await r.readline()
            if line.startswith(b"STARTTLS"):
                w.write(b"220 2.0.0 Ready to start TLS\r\n")
                await w.drain()
                await w.start_tls(self.ctx)
                self.tls_sessions += 1
                await r.readline()  # EHLO inside TLS
                if self.after:
                    w.write(self.after)
                    await w.drain()
                w.close()
                return
        if line:  # no STARTTLS: the clear session, as the usual scripted one
            await self._clear(r, w, line)

    async def _clear(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, line: bytes) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line:
                verb = line[:4].upper()
                if verb == b"DATA":
                    w.write(b"354 go\r\n")
                    body = b""
                    while (chunk := await r.readline()) not in (b".\r\n", b""):
                        body += chunk
                    self.messages.append(body)
                    w.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 2.0.0 Bye\r\n")
                    await w.drain()
                    w.close()
                    return
                else:
                    w.write(b"250 2.0.0 Ok\r\n")
                await w.drain()
                line = await r.readline()


@pytest.mark.parametrize("after", [b"", b"this is not SMTP\r\n"], ids=["close", "garbage"])
def test_a_session_broken_right_after_the_tls_handshake_goes_on_in_clear(
    run: Run, client_twin: str, certs: Any, after: bytes
) -> None:
    """STARTTLS taken, the handshake done, and then the server drops the
    session (or writes garbage) instead of answering EHLO: a broken TLS
    setup, as a failed handshake is. Opportunistic TLS delivers on a second
    connection in clear; before, every attempt deferred 'connection closed'
    until the mail expired. "required" still defers."""
    cert, key, client = certs
    server = TLSThenBroken(cert, key, after)

    async def body(s: Scripted) -> Any:
        return await session(s), await session(s, tls="required", ssl_context=client)

    (tls, results), required = scripted(run, server, body)
    assert not tls and all(o.delivered for r in results for o in r.outcomes), results
    assert len(server.messages) == 2 and server.tls_sessions == 2
    assert isinstance(required, Outcome) and required.deferred, required
    assert required.stage == "ehlo" and required.code == 0, required
