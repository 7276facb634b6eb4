"""Session 23's outside audit of the SMTP submission listener as a real MTA's
front door: each test on a defect it found, failing before its fix.

- The listener added no Received field to what it accepted (RFC 5321 4.4: a
  server MUST insert one): a receiver could not tell where the mail entered,
  and the hop count that stops a loop did not count this hop. Now one goes on
  top of the spooled message ("from" the HELO and the client's address, "by"
  our host name, "with" ESMTPSA (RFC 3848), the id the 250 names, "for" a sole
  recipient, the time), so it is on the mail as delivered and under the DKIM
  signature (dkimpy and OpenDKIM verify); the AUTH identity is not written.
- An internationalised domain after an ASCII local part (RCPT TO or MAIL
  FROM, given with SMTPUTF8) was spooled as given, in UTF-8: every receiver
  without SMTPUTF8 refused it (5.6.7). Such a domain is written in A-labels at
  accept (the envelope sent, the events, the Received "for"); only a
  non-ASCII local part still needs SMTPUTF8.
- Address literals (``u@[192.0.2.1]``, ``u@[IPv6:2001:db8::1]``, RFC 5321
  4.1.3) were refused by our SMTP server (501), though delivery takes them
  (to that address, never a private one): Postfix and Exim relaying through
  submission bounced them. Taken as Postfix takes them; submission refuses a
  literal that is no public address at RCPT (550 5.7.1: a tenant must not reach
  the operator's network through it) unless [delivery] allow_private_mx.
- Without [tenants] (users of [submission.users] alone) a message with no
  From (or an empty BDAT 0 LAST) was spooled and sent: receivers refuse it
  (RFC 5322 3.6; Gmail 5.7.1) and the API's raw refuses it always: 550 5.7.1.
- AUTH PLAIN with an authorization identity of another user (RFC 4616 2: must
  fail) went on as the authenticating user: 535.
- Five wrong passwords for a tenant's name from anywhere locked the tenant's
  own application out (454 with the right password, 15 minutes): an address
  that logged in as the user is kept out of the per-user lock-out (on every
  node of a shared spool), still held to the per-address limit.
- A message under SIZE that grows past [delivery] max_message_size once its
  8-bit parts are re-encoded (or with our Received and its signatures) was
  taken with a 250 and bounced 5.3.4 by the worker: refused in the session.
- No implicit TLS (RFC 8314 3.3: submission SHOULD be offered on port 465,
  TLS from the first byte; many applications are set up for it):
  ``[submission] listen_tls``.
- A tenant's raw message kept its Authentication-Results (verdicts nobody here
  made: RFC 8601 5) and Delivered-To (a saved message sent again bounced as a
  mail loop at Postfix's local delivery): both taken out, as the campaign path
  refuses them; Received fields stay (RFC 5321 4.4: never deleted).
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
import smtplib
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from _smtp_helpers import RecordingHandler, aiosmtpd_server
from conftest import free_port, wait_port
from fastsend.smtp.server import NEED_DATA, ServerProtocol
from test_message_audit import DOMAIN, Served, header_values, keys, receiver, verdicts, wait_for

__all__ = ["keys", "receiver"]  # (fixtures, used by name)

HOST = "submit.fastsend.test"


def _served(tmp_path: Path, port: int, certs: Any, keydir: Path | None = None) -> tuple[Served, int]:
    cert, key, _tls = certs
    sub = free_port()
    dkim = (
        f"""
[[tenants.acme.dkim]]
domain = "{DOMAIN}"
selector = "ed1"
key = "{keydir / "ed1.pem"}"
"""
        if keydir is not None
        else ""
    )
    extra = f"""
[submission]
listen = "127.0.0.1:{sub}"
tls_cert = "{cert}"
tls_key = "{key}"
hostname = "{HOST}"
[tenants.acme]
domains = ["{DOMAIN}", "bücher.example"]
{dkim}
"""
    s = Served(tmp_path, f"127.0.0.1:{port}", extra)
    wait_port("127.0.0.1", sub, timeout=60)
    return s, sub


def _submit(
    port: int, tls: ssl.SSLContext, key: str, rcpts: list[str], data: bytes,
    helo: str = "client.example", sender: str = f"app@{DOMAIN}", utf8: bool = False,
) -> str:  # fmt: skip
    """Send one message through submission; the 250's text."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=60) as c:
        c.starttls(context=tls)
        c.login("acme", key)
        c.ehlo_or_helo_if_needed()
        code, text = c.mail(sender, ["SMTPUTF8"] if utf8 else [])
        assert code == 250, (code, text)
        for r in rcpts:
            code, text = c.rcpt(r)
            assert code == 250, (r, code, text)
        code, text = c.data(data)
        assert code == 250, (code, text)
        return text.decode()


def _head(data: bytes) -> list[bytes]:
    """The header fields of ``data``, unfolded, in order."""
    head = data.partition(b"\r\n\r\n")[0]
    return [re.sub(rb"\r\n[ \t]+", b" ", f) for f in re.split(rb"\r\n(?![ \t])", head)]


def _fields(data: bytes, name: bytes) -> list[bytes]:
    return [f for f in _head(data) if f.lower().startswith(name.lower() + b":")]


def test_received_on_the_mail_delivered_and_under_its_signature(
    tmp_path: Path, keys: tuple[Path, dict[str, str]], receiver: tuple[int, RecordingHandler],
    certs: Any,
) -> None:  # fmt: skip
    keydir, records = keys
    port, handler = receiver
    _cert, _key, tls = certs
    s, sub = _served(tmp_path, port, certs, keydir)
    one = (
        f"Received: from mua.example (mua.example [192.0.2.7]) by app.example; "
        f"Mon, 7 Dec 2026 04:00:00 +0000\r\n"
        f"Authentication-Results: mx.google.com; dkim=pass header.d={DOMAIN}; spf=pass\r\n"
        f"Delivered-To: one@example.org\r\nX-Original-To: one@example.org\r\n"
        f"From: App <app@{DOMAIN}>\r\nTo: one@example.org\r\nSubject: one\r\n"
        f"\r\nbody one\r\n"
    ).encode()
    two = f"From: app@{DOMAIN}\r\nTo: a@example.org\r\nSubject: two\r\n\r\nbody two\r\n".encode()
    try:
        r1 = _submit(sub, tls, s.keys["acme"], ["one@example.org"], one)
        r2 = _submit(sub, tls, s.keys["acme"], ["a@example.org", "b@example.org"], two)
        r3 = _submit(sub, tls, s.keys["acme"], ["odd@example.org"], two.replace(b"two", b"3"),
                     helo="[bad(helo]")  # fmt: skip
        msgs = wait_for(handler, 4, rcpts=True)
    finally:
        s.stop()
    by_rcpt = {r: m["data"] for m in msgs for r in m["rcpts"]}
    ids = [re.search(r"id ([0-9A-F]{12})", r).group(1) for r in (r1, r2, r3)]  # type: ignore[union-attr]

    data = by_rcpt["one@example.org"]
    fields = _head(data)
    received = [f for f in fields if f.lower().startswith(b"received:")]
    assert len(received) == 2, fields
    ours, theirs = received
    # Ours above the earlier hop's (RFC 5321 4.4: at the top of what we relay)
    assert fields.index(ours) < fields.index(theirs) and theirs.startswith(b"Received: from mua")
    text = ours.decode()
    # (the reverse name of 127.0.0.1 is the system resolver's: test_submission_audit24)
    assert re.match(r"Received: from client\.example \([a-z0-9.-]+ \[127\.0\.0\.1\]\)", text), text
    assert f"by {HOST} (fastsend) with ESMTPSA id {ids[0]}" in text, text
    assert "for <one@example.org>;" in text and "using TLSv1." in text, text
    when = email.utils.parsedate_to_datetime(text.rpartition(";")[2].strip())
    assert when.tzinfo is not None
    assert b"acme" not in ours  # no AUTH identity
    # Verdicts and a past delivery's trace are taken out; the message is signed with them gone.
    assert header_values(data, b"Authentication-Results") == [], data
    assert header_values(data, b"Delivered-To") == [] and header_values(data, b"X-Original-To") == []
    assert verdicts(tmp_path, data, records) == [(True, True)], data

    for rcpt in ("a@example.org", "b@example.org"):
        (got,) = _fields(by_rcpt[rcpt], b"Received")
        assert f"with ESMTPSA id {ids[1]};".encode() in got, got  # no "for": two recipients
        assert b" for " not in got
        assert verdicts(tmp_path, by_rcpt[rcpt], records) == [(True, True)]
    (got,) = _fields(by_rcpt["odd@example.org"], b"Received")
    assert re.match(rb"Received: from \[127\.0\.0\.1\] \([a-z0-9.-]+ \[127\.0\.0\.1\]\)"
                    rb" \(HELO is no domain\)", got), got
    assert b"bad(" not in by_rcpt["odd@example.org"]


def test_an_idn_domain_after_an_ascii_local_part_needs_no_smtputf8(
    tmp_path: Path, certs: Any
) -> None:
    _cert, _key, tls = certs
    port = free_port()
    with aiosmtpd_server(port, enable_SMTPUTF8=False) as (_ctl, handler):
        _idn(tmp_path, port, handler, certs, tls)


def _idn(tmp_path: Path, port: int, handler: RecordingHandler, certs: Any,
         tls: ssl.SSLContext) -> None:  # fmt: skip
    s, sub = _served(tmp_path, port, certs)
    data = (f"From: app@{DOMAIN}\r\nTo: user@xn--bcher-kva.example\r\nSubject: idn\r\n"
            f"\r\nbody\r\n").encode()  # fmt: skip
    try:
        _submit(sub, tls, s.keys["acme"], ["user@Bücher.example"], data, utf8=True,
                sender="app@bücher.example")  # fmt: skip
        _submit(sub, tls, s.keys["acme"], ["jörg@bücher.example"], data, utf8=True)
        msgs = wait_for(handler, 1, rcpts=True)
        log = tmp_path / "spool" / "events.jsonl"
        rcpts: set[str] = set()
        deadline = time.monotonic() + 60
        while len(rcpts) < 2 and time.monotonic() < deadline:  # (written in batches)
            lines = log.read_text().splitlines() if log.exists() else []
            rcpts = {e["rcpt"] for e in map(json.loads, lines) if e["event"] == "accepted"}
            time.sleep(0.05)
    finally:
        s.stop()
    assert [(m["mail_from"], m["rcpts"]) for m in msgs] == [
        ("app@xn--bcher-kva.example", ["user@xn--bcher-kva.example"])
    ]
    (rec,) = _fields(msgs[0]["data"], b"Received")
    assert b"with UTF8SMTPSA" in rec and b"for <user@xn--bcher-kva.example>;" in rec, rec
    assert rcpts == {"user@xn--bcher-kva.example", "jörg@bücher.example"}, rcpts


@pytest.mark.parametrize(
    ("address", "code"),
    [
        ("u@[192.0.2.1]", b"250"),
        ("u@[IPv6:2001:db8::1]", b"250"),
        ("u@[ipv6:::ffff:192.0.2.1]", b"250"),
        ('"john doe"@[192.0.2.1]', b"250"),
        ("u@[1.2.3]", b"501"),
        ("u@[2001:db8::1]", b"501"),  # (IPv6 only after its tag)
        ("u@[x:y]", b"501"),
        ("u@[IPv6:fe80::1%eth0]", b"501"),
        ("u@[192.0.2.1", b"501"),
        ("u@example.org]", b"501"),
        ("u@[192.0.2.1]x", b"501"),
    ],
)
def test_address_literals_are_addresses(address: str, code: bytes) -> None:
    proto = ServerProtocol()
    proto.start()
    out = []
    for line in (b"EHLO c.example", f"MAIL FROM:<{address}>".encode(), b"RSET",
                 b"MAIL FROM:<a@example.org>", f"RCPT TO:<{address}>".encode()):  # fmt: skip
        proto.receive_data(line + b"\r\n")
        while (ev := proto.next_event()) is not NEED_DATA:
            if getattr(ev, "needs_reply", False):
                proto.accept()
        out.append(proto.data_to_send())
    assert out[1][:3] == code and out[4][:3] == code, out


def test_address_literals_through_submission(
    tmp_path: Path, receiver: tuple[int, RecordingHandler], certs: Any
) -> None:
    port, handler = receiver
    _cert, _key, tls = certs
    s, sub = _served(tmp_path, port, certs)
    data = f"From: app@{DOMAIN}\r\nTo: someone\r\nSubject: literal\r\n\r\nbody\r\n".encode()
    try:
        with smtplib.SMTP("127.0.0.1", sub, local_hostname="c.example", timeout=60) as c:
            c.starttls(context=tls)
            c.login("acme", s.keys["acme"])
            c.mail(f"app@{DOMAIN}")
            refused = {}
            for r in ("u@[127.0.0.2]", "u@[10.1.2.3]", "u@[IPv6:::1]", "u@[169.254.169.254]",
                      "u@[IPv6:::ffff:127.0.0.1]", "u@[100.64.0.1]"):  # fmt: skip
                code, text = c.rcpt(r)
                refused[r] = code
                assert code == 550 and b"5.7.1" in text and b"not a public address" in text
            assert c.rcpt("u@[8.8.8.8]")[0] == 250
            assert c.rcpt("v@[IPv6:2001:4860:4860::8888]")[0] == 250
            code, text = c.data(data)
            assert code == 250, text
        msgs = wait_for(handler, 2, rcpts=True)
    finally:
        s.stop()
    got = sorted(r for m in msgs for r in m["rcpts"])
    assert got == ["u@[8.8.8.8]", "v@[IPv6:2001:4860:4860::8888]"], got


# ---------------------------------------------------------------- in-process listener
def _listener(tmp_path: Path, certs: Any, **tables: Any) -> Any:
    from fastsend.config import from_dict
    from fastsend.serve.context import open_context
    from fastsend.serve.listeners import hash_password

    cert, key, _tls = certs
    users = {"acme": hash_password("pw", iterations=1000),
             "globex": hash_password("pw2", iterations=1000)}  # fmt: skip
    sub = {"listen": "127.0.0.1:0", "tls_cert": cert, "tls_key": key, "hostname": HOST,
           "users": users, "auth_backoff_max": 0.01, **tables.pop("submission", {})}  # fmt: skip
    return open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")},
                                   "submission": sub, **tables}))  # fmt: skip


async def _session(port: int, tls: ssl.SSLContext, lines: list[bytes], helo: bytes = b"c.test",
                   source: str = "127.0.0.1", ehlo_again: bool = True) -> list[bytes]:  # fmt: skip
    """Each line's reply (after EHLO, STARTTLS, EHLO) in a raw session (``ehlo_again``
    false: no EHLO after STARTTLS, the first line's reply is the first one)."""
    import asyncio

    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

    async def reply() -> bytes:
        got = b""
        while True:
            line = await asyncio.wait_for(r.readline(), 30)
            got += line
            if len(line) < 4 or line[3:4] == b" ":
                return got

    await reply()
    w.write(b"EHLO " + helo + b"\r\n")
    await reply()
    w.write(b"STARTTLS\r\n")
    await reply()
    await w.start_tls(tls)
    out = []
    first = [b"EHLO " + helo + b"\r\n"] if ehlo_again else []
    for line in [*first, *lines]:
        w.write(line)
        out.append(await reply())
    w.close()
    return out[len(first):]


def _plain(authzid: str, user: str, password: str) -> bytes:
    import base64

    return b"AUTH PLAIN " + base64.b64encode(f"{authzid}\0{user}\0{password}".encode()) + b"\r\n"


def _run(tmp_path: Path, certs: Any, go: Any, **tables: Any) -> Any:
    import asyncio

    from fastsend.serve.listeners import start_listeners

    ctx = _listener(tmp_path, certs, **tables)

    async def main() -> Any:
        servers = await start_listeners(ctx)
        try:
            ports = [int(srv.sockets[0].getsockname()[1]) for srv in servers]
            return await go(*ports)
        finally:
            for srv in servers:
                srv.close()

    try:
        return asyncio.run(main()), ctx
    except BaseException:
        ctx.close()
        raise


def test_no_from_is_refused_without_tenants_too(tmp_path: Path, certs: Any) -> None:
    tls = certs[2]
    txn = [_plain("", "acme", "pw"), b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<u@example.org>\r\n"]

    async def go(port: int) -> list[list[bytes]]:
        return [
            await _session(port, tls, [*txn, b"DATA\r\n", b"Subject: no from\r\n\r\nhi\r\n.\r\n"]),
            await _session(port, tls, [*txn, b"BDAT 0 LAST\r\n"]),
            await _session(port, tls, [*txn, b"DATA\r\n",
                                       b"From: a@example.com\r\nSubject: s\r\n\r\nhi\r\n.\r\n"]),
        ]  # fmt: skip

    (nofrom, empty, ok), ctx = _run(tmp_path, certs, go)
    ctx.close()
    assert nofrom[-1].startswith(b"550 5.7.1") and b"no From" in nofrom[-1], nofrom
    assert empty[-1].startswith(b"550 5.7.1"), empty
    assert ok[-1].startswith(b"250 2.0.0"), ok


def test_authzid_of_another_user_fails(tmp_path: Path, certs: Any) -> None:
    tls = certs[2]

    async def go(port: int) -> list[bytes]:
        return [
            (await _session(port, tls, [_plain("globex", "acme", "pw")]))[0],
            (await _session(port, tls, [_plain("acme", "acme", "pw")]))[0],
            (await _session(port, tls, [_plain("", "acme", "pw")]))[0],
        ]

    (other, same, none), ctx = _run(tmp_path, certs, go)
    ctx.close()
    assert other.startswith(b"535 5.7.8"), other
    assert same.startswith(b"235") and none.startswith(b"235"), (same, none)


def test_a_tenants_name_cannot_lock_its_own_application_out(tmp_path: Path, certs: Any) -> None:
    tls = certs[2]

    async def go(port: int) -> dict[str, bytes]:
        out = {"first": (await _session(port, tls, [_plain("", "acme", "pw")]))[0]}
        for i in range(3):  # 6 failures from elsewhere (auth_failures_per_user = 5)
            await _session(port, tls, [_plain("", "acme", "x"), _plain("", "acme", "y")],
                           source=f"127.0.4.{i + 1}")  # fmt: skip
        out["app"] = (await _session(port, tls, [_plain("", "acme", "pw")]))[0]
        out["stranger"] = (await _session(port, tls, [_plain("", "acme", "pw")],
                                          source="127.0.4.9"))[0]  # fmt: skip
        out["other user"] = (await _session(port, tls, [_plain("", "globex", "pw2")],
                                            source="127.0.4.9"))[0]  # fmt: skip
        return out

    got, ctx = _run(tmp_path, certs, go)
    ctx.close()
    assert got["first"].startswith(b"235") and got["app"].startswith(b"235"), got
    assert got["stranger"].startswith(b"454"), got  # (the lock-out holds for others)
    assert got["other user"].startswith(b"235"), got


def test_auth_throttle_familiar_addresses_keep_the_per_ip_limit() -> None:
    from fastsend.config.serve import ListenerLimits
    from fastsend.serve.listeners import AuthThrottle

    t = AuthThrottle(ListenerLimits(auth_failures_per_ip=3, auth_failures_per_user=2))
    t.succeeded("acme", "192.0.2.1", now=0.0)
    for ip in ("198.51.100.1", "198.51.100.2"):
        t.failed(ip, "acme", 1.0)
    assert t.blocked("198.51.100.3", "acme", 2.0)
    assert not t.blocked("192.0.2.1", "acme", 2.0)
    for _ in range(3):
        t.failed("192.0.2.1", "someone", 3.0)
    assert t.blocked("192.0.2.1", "acme", 4.0)  # (its own failures count)
    # The familiar address's own failures as the user count against it (a balancer
    # hiding its clients' addresses is one familiar address: no weaker than before).
    t = AuthThrottle(ListenerLimits(auth_failures_per_ip=10, auth_failures_per_user=2))
    t.succeeded("acme", "192.0.2.1", now=0.0)
    t.failed("192.0.2.1", "acme", 1.0)
    assert not t.blocked("192.0.2.1", "acme", 2.0)
    t.failed("192.0.2.1", "acme", 2.0)
    assert t.blocked("192.0.2.1", "acme", 3.0)


def test_received_names_an_idn_helo_in_a_labels(tmp_path: Path, certs: Any) -> None:
    tls = certs[2]
    msg = b"From: a@example.com\r\nSubject: s\r\n\r\nhi\r\n.\r\n"

    async def go(port: int) -> list[bytes]:
        return await _session(port, tls, [
            _plain("", "acme", "pw"), b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<u@example.org>\r\n", b"DATA\r\n", msg,
        ], helo="münchen.example".encode())  # fmt: skip

    got, ctx = _run(tmp_path, certs, go)
    assert got[-1].startswith(b"250"), got
    mid = int(re.search(rb"queued as (\d+)", got[-1]).group(1))  # type: ignore[union-attr]
    m = ctx.spool.message(mid)
    ctx.close()
    raw = base64.b64decode(m["vars"]["raw"])  # type: ignore[index]
    assert re.match(rb"Received: from xn--mnchen-3ya\.example \([a-z0-9.-]+ \[127\.0\.0\.1\]\)",
                    raw), raw


def test_a_message_that_grows_past_the_limit_when_relayed_is_refused_in_session(
    tmp_path: Path, certs: Any
) -> None:
    tls = certs[2]
    head = b"From: a@example.com\r\nSubject: s\r\nContent-Type: text/plain; charset=utf-8\r\n"
    eight = head + b"Content-Transfer-Encoding: 8bit\r\n\r\n" + ("\u00e9" * 60 + "\r\n").encode() * 100
    seven = head + b"\r\n" + (b"x" * 70 + b"\r\n") * 200
    assert len(eight) < 16_000 and len(seven) < 16_000
    txn = [_plain("", "acme", "pw"), b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<u@example.org>\r\n",
           b"DATA\r\n"]  # fmt: skip

    async def go(port: int) -> list[bytes]:
        return [(await _session(port, tls, [*txn, m + b".\r\n"]))[-1] for m in (eight, seven)]

    # (SIZE is 21,000 less room for our Received and signing: test_submission_audit24)
    (big, ok), ctx = _run(tmp_path, certs, go, delivery={"max_message_size": 21_000})
    ctx.close()
    # 12,000 octets of UTF-8 are 36,000 once quoted-printable: the worker refused it (552)
    # after a 250; now the session does.
    assert big.startswith(b"552 5.3.4") and b"21,000-octet limit" in big, big
    assert ok.startswith(b"250 2.0.0"), ok


def test_implicit_tls_submission(tmp_path: Path, certs: Any) -> None:
    import asyncio

    from fastsend.config import from_dict

    with pytest.raises(ValueError, match="tls_cert"):
        from_dict({"submission": {"listen_tls": "127.0.0.1:465"}})
    tls = certs[2]

    async def go(port: int, tls_port: int) -> list[bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", tls_port, ssl=tls,
                                             server_hostname="localhost")  # fmt: skip

        async def reply() -> bytes:
            got = b""
            while True:
                line = await asyncio.wait_for(r.readline(), 30)
                got += line
                if len(line) < 4 or line[3:4] == b" ":
                    return got

        out = [await reply()]
        for line in [b"EHLO c.test\r\n", b"STARTTLS\r\n", _plain("", "acme", "pw"),
                     b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<u@example.org>\r\n",
                     b"DATA\r\n", b"From: a@example.com\r\nSubject: s\r\n\r\nhi\r\n.\r\n",
                     b"QUIT\r\n"]:  # fmt: skip
            w.write(line)
            out.append(await reply())
        w.close()
        # The plain listener still wants STARTTLS before AUTH.
        plain = await _session(port, tls, [_plain("", "acme", "pw")])
        return [*out, *plain]

    got, ctx = _run(tmp_path, certs, go, submission={"listen_tls": "127.0.0.1:0"})
    greeting, ehlo, starttls, auth, _mail, _rcpt, _data, done, _quit, plain_auth = got
    assert greeting.startswith(b"220 " + HOST.encode()), greeting
    assert b"AUTH PLAIN LOGIN" in ehlo and b"STARTTLS" not in ehlo, ehlo
    assert starttls.startswith(b"503"), starttls
    assert auth.startswith(b"235") and done.startswith(b"250 2.0.0"), (auth, done)
    assert plain_auth.startswith(b"235"), plain_auth
    mid = int(re.search(rb"queued as (\d+)", done).group(1))  # type: ignore[union-attr]
    m = ctx.spool.message(mid)
    ctx.close()
    raw = base64.b64decode(m["vars"]["raw"])  # type: ignore[index]
    assert b"with ESMTPSA" in raw.partition(b"\r\n\r\n")[0], raw
