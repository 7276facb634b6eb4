"""Session 25's outside audit of the SMTP submission listener: each test on a defect
it found, failing before its fix.

- VRFY without an argument was answered 252 as if it named someone (RFC 5321
  4.1.1.6: VRFY names a string; Postfix answers 501): 501 5.5.4.
- AUTH after STARTTLS without a new EHLO was taken (the STARTTLS reset the
  session, RFC 3207 4.2, the client's EHLO forgotten; RFC 4954 4: AUTH follows
  EHLO), as it was before any EHLO at all: 503 5.5.1, as Postfix answers.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from fastsend.smtp.server import ServerConfig, StartTLS
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

