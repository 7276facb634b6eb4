"""The bounce reader on bounces real MTAs write, made on loopback.

A "remote site" (aiosmtpd) refuses recipients by local part with the replies
real servers give (unknown user, full mailbox, relay denied, a DNSBL hit,
spam, Postfix's rate limit, a reply with no enhanced code, a refusal after
the message). Other domains lead to a closed port, to hosts that refuse at
the greeting (554, 421), to a site refusing every MAIL FROM and (Postfix) to
a Postfix smtpd refusing the relay's HELO name. A private Postfix and an
unpacked Exim each relay a test message there, give up at once (queue
lifetime 0 / a retry rule with no times), and send their own DSN back to
the same site, which keeps every message with a null sender. Each
recipient of each DSN is then checked: found, reason, hard or soft, the
refused command, and the two signals. The sites and the Postfix are shared
by the module's tests.

The limits Postfix's own smtpd enforces (anvil rate limits, the
per-message recipient limit, the connection limits) are driven with a real
client and their replies classified as the delivery side classifies them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from tests._mta_helpers import exim_daemon, exim_or_skip, exim_workdir, private_postfix

from _smtp_helpers import aiosmtpd_running
from conftest import free_port
from fastsend.bounce import classify_reply, parse_bounce

# Local part prefix -> the remote site's reply at RCPT.
REFUSALS = {
    "unknown": "550 5.1.1 <{a}>: Recipient address rejected: User unknown in virtual mailbox table",
    "full": "552 5.2.2 <{a}>: Recipient address rejected: Mailbox quota exceeded",
    "relay": "554 5.7.1 <{a}>: Relay access denied",
    "dnsbl": (
        "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
        "zen.spamhaus.org; https://www.spamhaus.org/query/ip/127.0.0.1"
    ),
    "rate": "450 4.7.1 Error: too much mail from 127.0.0.1",
    "spam": "554 5.7.1 Spam message rejected",
    # No enhanced status code: the MTA writing the DSN says "5.0.0".
    "nouser": "550 User unknown",
}
# Local part prefix -> the reply at the end of the data.
DATA_REFUSALS = {
    "big": "552 5.3.4 Message size exceeds fixed limit",
    "content": "550 5.7.1 Message content rejected",
}


class RemoteSite:
    """Refuses by local part; keeps each null-sender message (a bounce)."""

    def __init__(self) -> None:
        self.bounces: list[bytes] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        local = address.split("@")[0].lower()
        for prefix, reply in REFUSALS.items():
            if local.startswith(prefix):
                return reply.format(a=address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if envelope.mail_from in ("", "<>"):
            self.bounces.append(envelope.original_content)
            return "250 2.0.0 Ok"
        for rcpt in envelope.rcpt_tos:
            for prefix, reply in DATA_REFUSALS.items():
                if rcpt.lower().startswith(prefix):
                    return reply
        return "250 2.0.0 Ok"

    def wait(self, n: int, timeout: float = 180.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.bounces) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.bounces)


class SenderRefusingSite:
    """Refuses every MAIL FROM (a policy on the sender, not a recipient)."""

    REPLY = "553 5.7.1 <{a}>: Sender address rejected: not owned by user"

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return self.REPLY.format(a=address)


class Greeter:
    """A host that answers every connection with one fixed greeting line
    (a refusal) and closes after the client's QUIT or a second."""

    def __init__(self, line: str) -> None:
        self.line = line.encode() + b"\r\n"
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    conn.sendall(self.line)
                    conn.recv(512)
                    conn.sendall(b"221 2.0.0 Bye\r\n")

    def close(self) -> None:
        self.sock.close()


class Sites:
    """The remote site, plus hosts that refuse at the greeting or at MAIL
    FROM, reached by domain (see ROUTED). ``mark``/``since``: the bounces
    that arrived after a point (the sites are shared by the module's tests)."""

    def __init__(self) -> None:
        self.site = RemoteSite()
        self.port = free_port()
        self.sender_port = free_port()
        self.greet554 = Greeter("554 5.7.1 mx.greet.test ESMTP not accepting messages")
        self.greet421 = Greeter(
            "421 4.3.2 mx.busy.test Service not available, closing transmission channel"
        )
        self.closed = free_port()  # nothing listens there
        self._running = contextlib.ExitStack()

    def start(self) -> None:
        self._running.enter_context(aiosmtpd_running(self.site, self.port))
        self._running.enter_context(aiosmtpd_running(SenderRefusingSite(), self.sender_port))

    def stop(self) -> None:
        self._running.close()
        self.greet554.close()
        self.greet421.close()

    def routes(self) -> dict[str, int]:
        return {
            "refused.test": self.closed,
            "greet.test": self.greet554.port,
            "busy.test": self.greet421.port,
            "sender.test": self.sender_port,
        }

    def send_and_collect(self, port: int, messages: list[list[str]]) -> list[bytes]:
        start = len(self.site.bounces)
        for i, rcpts in enumerate(messages):
            _send(port, rcpts, f"m{start + i}")
        return self.site.wait(start + len(messages))[start:]


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    s = Sites()
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _send(port: int, rcpts: list[str], subject: str) -> None:
    m = EmailMessage()
    m["From"] = "sender@s.test"
    m["To"] = ", ".join(rcpts)
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject}@s.test>"
    m.set_content("hello\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.send_message(m, from_addr="sender@s.test", to_addrs=rcpts)


# What each refusal must give: (reason, hard, command, rate_limited, ip_blocked).
EXPECTED = {
    "unknown": ("userunknown", True, "RCPT", False, False),
    "full": ("mailboxfull", False, "RCPT", False, False),
    "relay": ("norelaying", False, "RCPT", False, False),
    "dnsbl": ("blocked", False, "RCPT", False, True),
    "rate": ("speeding", False, "RCPT", True, False),
    "spam": ("spamdetected", False, "RCPT", False, False),
    "nouser": ("userunknown", True, "RCPT", False, False),
    "big": ("mesgtoobig", False, "DATA", False, False),
}
# Recipient lists sent: one message with mixed results, then one each.
# "nouser" addresses of many lengths: the MTA wraps its explanation at a
# different place for each, also inside "(in reply to RCPT TO command)".
MESSAGES = [
    ["unknown1@r.test", "full1@r.test", "ok1@r.test"],
    ["relay1@r.test"],
    ["dnsbl1@r.test"],
    ["rate1@r.test"],
    ["spam1@r.test"],
    ["big1@r.test"],
    *[[f"nouser{'x' * n}@r.test"] for n in range(14)],
]


# Recipients at sites the relaying MTA cannot reach or that refuse its HELO
# name (routed there by domain): the MTA's own words, not the site's reply.
# A refused TCP connection (ECONNREFUSED) is no verdict on the sending IP;
# a refused HELO name is about the name, which resting the IP cannot fix.
ROUTED = {
    "refused": ("expired", False, None, False, False),
    "helo": ("blocked", False, "RCPT", False, False),
    "greet": ("blocked", False, "CONN", False, True),
    "busy": ("blocked", False, "CONN", False, False),
    "sender": ("rejected", False, "MAIL", False, False),
}
ROUTED_MESSAGES = [
    ["refused1@refused.test"],
    ["greet1@greet.test"],
    ["busy1@busy.test"],
    ["sender1@sender.test"],
]
POSTFIX_MESSAGES = [*ROUTED_MESSAGES, ["helo1@helo.test"]]
EXIM_MESSAGES = ROUTED_MESSAGES


def _check_bounces(
    bounces: list[bytes],
    expected: dict[str, tuple[str, bool, str, bool, bool]] = EXPECTED,
    messages: list[list[str]] = MESSAGES,
) -> None:
    got: dict[str, Any] = {}
    for raw in bounces:
        for r in parse_bounce(raw):
            got[r.recipient] = r
    want = {a for rcpts in messages for a in rcpts if not a.startswith("ok")}
    assert set(got) == want
    wrong = []
    for addr, r in sorted(got.items()):
        prefix = next(p for p in expected if addr.startswith(p))
        decision = (r.reason, r.hard, r.command, r.rate_limited, r.ip_blocked)
        if decision != expected[prefix]:
            wrong.append((addr, decision, r.diagnostic))
    assert wrong == [], wrong


# ---------------------------------------------------------------- Postfix

# After _mta_helpers.POSTFIX_MAIN_CF (directories, name, loopback relaying, log).
MAIN_CF = """\
smtpd_recipient_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{remote}
transport_maps = inline:{{ {routes}, helo.test=heloclient:[127.0.0.1]:{helo} }}
maximal_queue_lifetime = 0
bounce_queue_lifetime = 0
smtp_tls_security_level = none
"""

# Its smtpd listeners (master.cf; _mta_helpers.POSTFIX_SERVICES after them).
LISTENERS_CF = """\
127.0.0.1:{relay} inet n - n - - smtpd
127.0.0.1:{msgrate} inet n - n - - smtpd -o smtpd_client_message_rate_limit=1 -o smtpd_client_event_limit_exceptions= -o smtpd_error_sleep_time=0
127.0.0.1:{rcptrate} inet n - n - - smtpd -o smtpd_client_recipient_rate_limit=2 -o smtpd_client_event_limit_exceptions= -o smtpd_error_sleep_time=0
127.0.0.1:{rcptlimit} inet n - n - - smtpd -o smtpd_recipient_limit=2 -o smtpd_error_sleep_time=0
127.0.0.1:{connrate} inet n - n - - smtpd -o smtpd_client_connection_rate_limit=1 -o smtpd_client_event_limit_exceptions= -o smtpd_error_sleep_time=0
127.0.0.1:{helo} inet n - n - - smtpd -o smtpd_helo_required=yes -o smtpd_helo_restrictions=reject_non_fqdn_helo_hostname -o smtpd_error_sleep_time=0
heloclient unix - - n - - smtp -o smtp_helo_name=badhelo
"""

LISTENERS = ("relay", "msgrate", "rcptrate", "rcptlimit", "connrate", "helo")


@contextlib.contextmanager
def start_postfix(sites: Sites) -> Iterator[dict[str, int]]:
    ports = {name: free_port() for name in LISTENERS}
    routes = ", ".join(f"{dom}=relay:[127.0.0.1]:{p}" for dom, p in sites.routes().items())
    with private_postfix(
        MAIN_CF, LISTENERS_CF.format(**ports), ports.values(), prefix="fastsend-pfbounce-",
        remote=sites.port, routes=routes, helo=ports["helo"],
    ):  # fmt: skip
        yield ports


@pytest.fixture(scope="module")
def postfix(sites: Sites) -> Iterator[dict[str, int]]:
    with start_postfix(sites) as ports:
        yield ports


def test_postfix_dsns_each_recipient_decided(sites: Sites, postfix: dict[str, int]) -> None:
    messages = MESSAGES + POSTFIX_MESSAGES
    bounces = sites.send_and_collect(postfix["relay"], messages)
    assert len(bounces) == len(messages)
    _check_bounces(bounces, {**EXPECTED, **ROUTED}, messages)


def _replies(port: int, rcpts: list[str], messages: int) -> list[tuple[str, int, str]]:
    """(command, code, text) of every reply to MAIL and RCPT in one session."""
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.test")
        for _ in range(messages):
            code, text = s.mail("a@s.test")
            out.append(("MAIL", code, text.decode()))
            if code < 400:
                for r in rcpts:
                    code, text = s.rcpt(r)
                    out.append(("RCPT", code, text.decode()))
            s.rset()
    return out


def _classified(command: str, code: int, text: str) -> tuple[str, bool, bool, bool]:
    enhanced, _, rest = text.partition(" ")
    c = classify_reply(code, enhanced, rest, command=command)
    return c.reason, c.hard, c.rate_limited, c.ip_blocked


def test_postfix_smtpd_limits_classified(postfix: dict[str, int]) -> None:
    """Postfix's own limits, as a sending MTA meets them: rate limits slow
    down and never rest the IP; the recipients-per-message limit is neither."""
    ports = postfix
    msg = [r for r in _replies(ports["msgrate"], ["x@r.test"], 3) if r[1] >= 400]
    rcpt = [
        r
        for r in _replies(ports["rcptrate"], ["x@r.test", "y@r.test", "z@r.test"], 1)
        if r[1] >= 400
    ]
    limit = [
        r
        for r in _replies(ports["rcptlimit"], ["x@r.test", "y@r.test", "z@r.test"], 1)
        if r[1] >= 400
    ]
    conn = []
    for _ in range(3):
        try:
            with smtplib.SMTP("127.0.0.1", ports["connrate"], timeout=60) as s:
                s.ehlo("client.test")
        except smtplib.SMTPConnectError as e:
            conn.append(("CONN", e.smtp_code, e.smtp_error.decode()))
    # The HELO check, delayed to RCPT as Postfix does by default: about the
    # name the client gives, never its IP.
    with smtplib.SMTP("127.0.0.1", ports["helo"], timeout=60) as s:
        s.ehlo("badhelo")
        s.mail("a@s.test")
        code, text = s.rcpt("x@r.test")
    helo = [("RCPT", code, text.decode())]
    assert msg and all("too much mail from" in t for _, _, t in msg)
    assert rcpt and all("too many recipients from" in t for _, _, t in rcpt)
    assert limit and all(c == 452 for _, c, _ in limit)
    assert conn and all("too many connections from" in t for _, _, t in conn)
    assert {_classified(*r) for r in msg} == {("speeding", False, True, False)}
    assert {_classified(*r) for r in rcpt} == {("speeding", False, True, False)}
    assert {_classified(*r) for r in limit} == {("toomanyconn", False, False, False)}
    assert {_classified(*r) for r in conn} == {("toomanyconn", False, True, False)}
    assert helo[0][1] == 504 and "Helo command rejected" in helo[0][2]
    assert {_classified(*r) for r in helo} == {("blocked", False, False, False)}


# ---------------------------------------------------------------- Exim

EXIM_CONF = """\
primary_hostname = exim.test
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
exim_path = {d}/exim-wrap
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
tls_advertise_hosts =
host_lookup =
rfc1413_hosts =
keep_environment =
acl_smtp_rcpt = acl_rcpt
begin acl
acl_rcpt:
  accept
begin routers
{routers}remote:
  driver = manualroute
  route_list = * 127.0.0.1::{remote} byname
  self = send
  transport = remote_smtp
begin transports
remote_smtp:
  driver = smtp
  hosts_avoid_tls = *
  allow_localhost
begin retry
# No retry times: a temporary error is final at once.
* *
"""


@contextlib.contextmanager
def start_exim_relay(sites: Sites) -> Iterator[int]:
    """Exim relaying everything to the remote site. Exim re-executes itself
    to deliver (and to submit its bounces) as its own user, which cannot read
    the unpacked tree under root's home and for which the dynamic linker
    drops LD_LIBRARY_PATH when the binary is setuid: so a copy of the tree
    in a readable place, without the setuid bit, behind a wrapper that sets
    the library path."""
    root = exim_or_skip()
    with exim_workdir("fastsend-eximbounce-") as d:
        shutil.copytree(root, d / "root", symlinks=True)
        binary = d / "root" / "usr" / "sbin" / "exim4"
        binary.chmod(0o755)
        libs = f"{d}/root/usr/lib/x86_64-linux-gnu:{d}/root/lib/x86_64-linux-gnu"
        wrap = d / "exim-wrap"
        wrap.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH={libs} exec {binary} "$@"\n')
        wrap.chmod(0o755)
        subprocess.run(["chmod", "-R", "a+rX", str(d / "root")], check=True)
        port = free_port()
        conf = d / "exim.conf"
        routers = "".join(
            f"{dom.split('.')[0]}:\n  driver = manualroute\n  domains = {dom}\n"
            f"  route_list = * 127.0.0.1::{p} byname\n  self = send\n  transport = remote_smtp\n"
            for dom, p in sites.routes().items()
        )
        conf.write_text(EXIM_CONF.format(d=d, port=port, remote=sites.port, routers=routers))
        conf.chmod(0o644)
        argv = [str(wrap), "-C", str(conf), "-bdf", "-oX", str(port)]
        with exim_daemon(argv, port, greeting=b"exim.test"):
            yield port


# Exim gives up on a temporary refusal with "retry timeout exceeded": the
# message expired, whatever the last reply said.
EXIM_EXPECTED = {**EXPECTED, "rate": ("expired", False, "RCPT", True, False)}
EXIM_ROUTED = {**ROUTED, "busy": ("expired", False, "CONN", False, False)}


def test_exim_dsns_each_recipient_decided(sites: Sites) -> None:
    if os.geteuid() != 0:
        pytest.skip("Exim's daemon changes to its own user: needs root")
    messages = MESSAGES + EXIM_MESSAGES
    with start_exim_relay(sites) as port:
        bounces = sites.send_and_collect(port, messages)
    assert len(bounces) == len(messages)
    _check_bounces(bounces, {**EXIM_EXPECTED, **EXIM_ROUTED}, messages)
