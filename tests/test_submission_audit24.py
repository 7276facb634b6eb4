"""Session 24's outside audit of the SMTP submission listener: each test on a defect
it found, failing before its fix.

- AUTH before STARTTLS, where AUTH needs TLS, was answered 503 5.5.1 "AUTH not
  available": RFC 4954 4/6 says 538 5.7.11 (encryption required), which tells a
  client to STARTTLS; MAIL before it says so too (RFC 3207 4: 530 5.7.0 "Must
  issue a STARTTLS command first").
- RSET and QUIT with an argument were taken (RFC 5321 4.1.1.5/4.1.1.10: no
  argument; Postfix answers 501): 501 5.5.4, the session goes on.
- The SIZE offered was [delivery] max_message_size itself, though our Received
  field and room for signing are added to what is accepted: a 7-bit message
  just under SIZE was refused 552 after its whole content was sent. SIZE now
  leaves that room (SIGN_ROOM + TRACE_ROOM): such a message is taken.
- Our Received field named no reverse DNS name: ``from HELO ([IP])``. Now
  ``from HELO (NAME [IP])`` as Postfix writes it, NAME the client's PTR name
  when its address records come back to the client's address (FCrDNS), else
  ``unknown``; looked up from the connection's start, with a timeout.
"""

from __future__ import annotations

import base64

from fastsend.smtp.server import ServerConfig
from test_smtp_server import Session


def test_auth_before_starttls_is_538_and_mail_before_it_names_starttls() -> None:
    cfg = ServerConfig(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN", "LOGIN"),
                       auth_required=True)  # fmt: skip
    s = Session(cfg)
    assert b"AUTH" not in s.feed(b"EHLO x\r\n")
    out = s.feed(b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\nAUTH LOGIN\r\n").decode()
    assert out.splitlines() == [
        "538 5.7.11 Encryption required for requested authentication mechanism: STARTTLS first"
    ] * 2, out
    assert s.feed(b"MAIL FROM:<a@b.c>\r\n") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    # Without AUTH configured at all: not implemented, as before.
    s = Session(ServerConfig(hostname="mx.test"))
    assert s.codes(b"EHLO x\r\nAUTH PLAIN\r\n") == ["250", "502"]


def test_rset_and_quit_with_an_argument_are_501() -> None:
    s = Session()
    s.feed(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert s.feed(b"RSET now\r\n") == b"501 5.5.4 Syntax: RSET\r\n"
    assert s.proto.mail_from == "a@b.c"  # (nothing reset)
    assert s.feed(b"QUIT please\r\n") == b"501 5.5.4 Syntax: QUIT\r\n"
    assert not s.proto.closed
    assert s.codes(b"RSET \r\nRSET\r\nNOOP some text\r\n") == ["250", "250", "250"]
    assert s.proto.mail_from is None
    assert s.codes(b"QUIT\r\n") == ["221"] and s.proto.closed
