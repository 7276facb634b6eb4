"""The sans-I/O server-side SMTP protocol: table-driven sessions and a fuzz target.

No sockets: bytes go in, events come out, replies are chosen by a tiny policy.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsend.smtp.server import (
    NEED_DATA,
    AuthRequest,
    DataStart,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    Message,
    RcptTo,
    ServerConfig,
    ServerProtocol,
    StartTLS,
)

Policy = Callable[[ServerProtocol, Event], None]


def accept_all(proto: ServerProtocol, ev: Event) -> None:
    if isinstance(ev, AuthRequest) and ev.password != "secret":
        proto.reply(535, "5.7.8", "Authentication credentials invalid")
    elif isinstance(ev, RcptTo) and ev.address.startswith("bad"):
        proto.reply(550, "5.1.1", "User unknown")
    elif ev.needs_reply:
        proto.accept()


class Session:
    """Feed bytes, answer events with a policy, collect replies and events."""

    def __init__(self, config: ServerConfig | None = None, policy: Policy = accept_all) -> None:
        self.proto = ServerProtocol(config or ServerConfig(hostname="mx.test"))
        self.policy = policy
        self.events: list[Event] = []
        self.proto.start()
        self.greeting = self.proto.data_to_send()

    def feed(self, data: bytes) -> bytes:
        self.proto.receive_data(data)
        while True:
            ev = self.proto.next_event()
            if ev is NEED_DATA:
                break
            assert not isinstance(ev, type(NEED_DATA))
            self.events.append(ev)
            self.policy(self.proto, ev)
        return self.proto.data_to_send()

    def codes(self, data: bytes) -> list[str]:
        """Final reply lines' first word (code) for the bytes fed."""
        out = self.feed(data).decode()
        return [ln[:3] for ln in out.split("\r\n") if len(ln) > 3 and ln[3] == " "]

    @property
    def messages(self) -> list[Message]:
        return [e for e in self.events if isinstance(e, Message)]


def ehlo(s: Session) -> None:
    assert s.codes(b"EHLO client.test\r\n") == ["250"]


def test_greeting_and_ehlo_keywords() -> None:
    s = Session(ServerConfig(hostname="mx.test", max_message_size=1000, starttls=True))
    assert s.greeting == b"220 mx.test ESMTP fastsend\r\n"
    out = s.feed(b"EHLO client.test\r\n").decode()
    lines = out.split("\r\n")[:-1]
    assert lines[0] == "250-mx.test"
    keywords = [ln[4:] for ln in lines[1:]]
    for kw in (
        "PIPELINING",
        "SIZE 1000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ):
        assert kw in keywords
    assert lines[-1].startswith("250 ")
    assert all(ln.startswith("250-") for ln in lines[:-1])
    assert s.events == [Hello("client.test", True)]


@pytest.mark.parametrize(
    ("before", "command", "expect"),
    [
        # (commands fed first, the command under test, its reply code)
        ([], b"MAIL FROM:<a@b.c>", "503"),  # no EHLO
        ([b"EHLO x"], b"RCPT TO:<a@b.c>", "503"),  # no MAIL
        ([b"EHLO x"], b"DATA", "503"),
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"DATA", "554"),  # no valid recipients
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"MAIL FROM:<a@b.c>", "503"),  # nested
        ([b"EHLO x"], b"MAIL FROM:a@b.c", "501"),
        ([b"EHLO x"], b"MAIL TO:<a@b.c>", "501"),
        ([b"EHLO x"], b"MAIL FROM:<a@b.c> SIZE=99999999999", "552"),
        ([b"EHLO x"], b"MAIL FROM:<a@b.c> SIZE=abc", "555"),
        ([b"EHLO x"], b"MAIL FROM:<a@b.c> BODY=BINARYMIME", "555"),
        ([b"EHLO x"], b"MAIL FROM:<a@b.c> RET=FULL", "555"),
        ([b"EHLO x"], b"MAIL FROM:<a@b.c> BODY=8BITMIME", "250"),
        ([b"EHLO x"], b"MAIL FROM:<> SMTPUTF8", "250"),
        ([b"EHLO x"], b"MAIL FROM:<\xc3\xa9@b.c>", "553"),  # UTF-8 needs SMTPUTF8
        ([b"EHLO x"], b"MAIL FROM:<\xc3\xa9@b.c> SMTPUTF8", "250"),
        ([b"EHLO x"], b"MAIL FROM:<\xff@b.c>", "500"),  # not UTF-8
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"RCPT TO:<>", "501"),
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"RCPT TO:<no-at-sign>", "501"),
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"RCPT TO:<Postmaster>", "250"),
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"RCPT TO:<@relay.test:u@b.c>", "250"),
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"RCPT TO:<u@b.c> NOTIFY=NEVER", "555"),
        ([b"EHLO x", b"MAIL FROM:<a@b.c>"], b"RCPT TO:<bad@b.c>", "550"),
        ([], b"EHLO", "501"),
        ([], b"HELO x", "250"),
        ([], b"NOOP", "250"),
        ([], b"VRFY u", "252"),
        ([], b"EXPN l", "502"),
        ([], b"HELP", "214"),
        ([], b"RSET", "250"),
        ([], b"FOO bar", "500"),
        ([], b"MAILX", "500"),
        ([], b"STARTTLS", "502"),  # not offered
        ([], b"AUTH PLAIN", "502"),  # not offered
        ([b"EHLO x"], b"BDAT x", "501"),
        ([], b"NOOP\x00", "500"),  # control characters
        ([], b"NOOP \x1b[2J", "500"),
        ([], b"QUIT", "221"),
    ],
)
def test_command_table(before: list[bytes], command: bytes, expect: str) -> None:
    s = Session()
    for line in before:
        s.feed(line + b"\r\n")
    assert s.codes(command + b"\r\n") == [expect]


def test_pipelined_group_replies_in_order() -> None:
    s = Session()
    ehlo(s)
    group = (
        b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nRCPT TO:<bad@b.c>\r\nRCPT TO:<y@b.c>\r\nDATA\r\n"
    )
    assert s.codes(group) == ["250", "250", "550", "250", "354"]
    # the body and the next transaction's group in one write
    s.codes(b"hello\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<z@b.c>\r\nDATA\r\n")
    assert [m.recipients for m in s.messages] == [["x@b.c", "y@b.c"]]
    assert s.messages[0].data == b"hello\r\n"
    assert s.codes(b".\r\n") == ["250"]
    assert s.messages[1].data == b""


def test_bytes_one_at_a_time() -> None:
    s = Session()
    wire = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nDATA\r\n..a\r\n.\r\nQUIT\r\n"
    out = b"".join(s.feed(wire[i : i + 1]) for i in range(len(wire)))
    assert out.endswith(b"221 2.0.0 Bye\r\n")
    assert s.messages[0].data == b".a\r\n"
    assert s.proto.closed


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n"),
        (b".\r\n", b""),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"..leading\r\n...two\r\nmid.dle\r\n.\r\n", b".leading\r\n..two\r\nmid.dle\r\n"),
        (b"no final newline\r\n.\r\n", b"no final newline\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, body: bytes) -> None:
    s = Session()
    ehlo(s)
    s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nDATA\r\n")
    assert s.codes(wire) == ["250"]
    assert s.messages[0].data == body


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\n",  # bare LF dot bare LF
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r\n.\r",
    ],
)
def test_smuggling_never_ends_data(smuggle: bytes) -> None:
    """Only <CRLF>.<CRLF> ends DATA; the smuggled MAIL is body text, and the body is refused."""
    s = Session()
    ehlo(s)
    s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nDATA\r\n")
    wire = (
        b"Subject: one\r\n\r\nbody" + smuggle + b"MAIL FROM:<evil@b.c>\r\n"
        b"RCPT TO:<victim@b.c>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    assert s.codes(wire) == ["550"]
    assert s.messages == []
    assert not [e for e in s.events if isinstance(e, MailFrom) and e.address == "evil@b.c"]


def test_bare_lf_allowed_when_configured() -> None:
    s = Session(ServerConfig(reject_bare_newlines=False))
    ehlo(s)
    s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nDATA\r\n")
    assert s.codes(b"a\n.\nb\r\n.\r\n") == ["250"]
    assert s.messages[0].data == b"a\n.\nb\r\n"


def test_size_limit_in_data_and_memory_bounded() -> None:
    s = Session(ServerConfig(max_message_size=1000))
    ehlo(s)
    s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nDATA\r\n")
    for _ in range(100):
        assert s.feed(b"x" * 1000 + b"\r\n") == b""
        assert len(s.proto._buf) < 4000
    assert s.codes(b".\r\nNOOP\r\n") == ["552", "250"]
    assert s.messages == []


def test_recipient_limit() -> None:
    s = Session(ServerConfig(max_recipients=2))
    ehlo(s)
    s.feed(b"MAIL FROM:<a@b.c>\r\n")
    assert s.codes(b"RCPT TO:<a@b.c>\r\nRCPT TO:<b@b.c>\r\nRCPT TO:<c@b.c>\r\n") == [
        "250",
        "250",
        "452",
    ]


def test_line_length_limit() -> None:
    s = Session(ServerConfig(max_line_length=100))
    ehlo(s)
    assert s.codes(b"NOOP " + b"x" * 200) == ["500"]
    assert s.codes(b"y" * 300) == []  # still discarding up to the CRLF
    assert s.codes(b"\r\nNOOP\r\n") == ["250"]
    assert s.codes(b"NOOP " + b"x" * 120 + b"\r\n") == ["500"]


def test_too_many_errors_closes() -> None:
    s = Session(ServerConfig(max_errors=3))
    assert s.codes(b"A\r\nB\r\nC\r\nNOOP\r\n") == ["500", "500", "500", "421"]
    assert s.proto.closed


def test_bdat_chunks() -> None:
    s = Session()
    ehlo(s)
    s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\n")
    assert s.codes(b"BDAT 5\r\nab\r\nc") == ["250"]
    assert s.codes(b"BDAT 4 LAST\r\n\n.\n\r") == ["250"]
    assert s.messages[0].data == b"ab\r\nc\n.\n\r"  # length-delimited, taken as is
    assert s.messages[0].bdat
    assert any(isinstance(e, DataStart) and e.bdat for e in s.events)
    # BDAT without a transaction consumes its bytes and fails
    assert s.codes(b"BDAT 6 LAST\r\nQUIT\r\n") == ["503"]
    assert s.codes(b"NOOP\r\n") == ["250"]


def test_bdat_size_limit_and_data_after_bdat() -> None:
    s = Session(ServerConfig(max_message_size=10))
    ehlo(s)
    s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\n")
    assert s.codes(b"BDAT 8\r\n12345678") == ["250"]
    assert s.codes(b"DATA\r\n") == ["503"]
    assert s.codes(b"BDAT 8 LAST\r\n12345678") == ["552"]
    assert s.messages == []
    assert s.codes(b"MAIL FROM:<a@b.c>\r\n") == ["250"]  # transaction was reset


def test_starttls_resets_and_drops_injected_plaintext() -> None:
    s = Session(ServerConfig(starttls=True))
    ehlo(s)
    assert s.codes(b"STARTTLS\r\nMAIL FROM:<injected@b.c>\r\n") == ["220"]
    assert isinstance(s.events[-1], StartTLS)
    assert s.feed(b"more plaintext\r\n") == b""  # ignored until the handshake is done
    s.proto.tls_started()
    assert s.proto.tls_active and s.proto.helo is None
    assert s.codes(b"MAIL FROM:<a@b.c>\r\n") == ["503"]  # must EHLO again
    out = s.feed(b"EHLO x\r\n")
    assert b"STARTTLS" not in out
    assert not [e for e in s.events if isinstance(e, MailFrom)]
    assert s.codes(b"STARTTLS\r\n") == ["503"]


def test_starttls_refused_by_policy() -> None:
    def no_tls(proto: ServerProtocol, ev: Event) -> None:
        if isinstance(ev, StartTLS):
            proto.reply(454, "4.7.0", "TLS not available")
        elif ev.needs_reply:
            proto.accept()

    s = Session(ServerConfig(starttls=True), no_tls)
    ehlo(s)
    assert s.codes(b"STARTTLS\r\nNOOP\r\n") == ["454", "250"]
    with pytest.raises(LocalProtocolError):
        s.proto.tls_started()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_plain_and_login() -> None:
    cfg = ServerConfig(
        auth_mechanisms=("PLAIN", "LOGIN"), auth_requires_tls=False, auth_required=True
    )
    s = Session(cfg)
    assert b"AUTH PLAIN LOGIN" in s.feed(b"EHLO x\r\n")
    assert s.codes(b"MAIL FROM:<a@b.c>\r\n") == ["530"]
    assert s.codes(b"AUTH PLAIN " + b64(b"\0user\0wrong") + b"\r\n") == ["535"]
    assert s.codes(b"AUTH PLAIN\r\n") == ["334"]
    assert s.codes(b"*\r\n") == ["501"]
    assert s.codes(b"AUTH LOGIN\r\n") == ["334"]
    assert s.codes(b"!!notbase64\r\n") == ["501"]
    assert s.codes(b"AUTH LOGIN\r\n" + b64(b"user") + b"\r\n") == ["334", "334"]
    assert s.codes(b64(b"secret") + b"\r\n") == ["235"]
    auths = [e for e in s.events if isinstance(e, AuthRequest)]
    assert [(a.mechanism, a.username) for a in auths] == [("PLAIN", "user"), ("LOGIN", "user")]
    assert "secret" not in repr(auths[-1])
    assert s.proto.authenticated == "user"
    assert s.codes(b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n") == ["503"]
    assert s.codes(b"MAIL FROM:<a@b.c>\r\n") == ["250"]


def test_auth_requires_tls_by_default() -> None:
    s = Session(ServerConfig(auth_mechanisms=("PLAIN",)))
    assert b"AUTH" not in s.feed(b"EHLO x\r\n")
    assert s.codes(b"AUTH PLAIN\r\n") == ["538"]


def test_reply_text_and_multiline_and_421() -> None:
    def policy(proto: ServerProtocol, ev: Event) -> None:
        if isinstance(ev, RcptTo):
            proto.reply(421, "4.7.0", "[TS04] go away\r\nINJECTED")
        elif ev.needs_reply:
            proto.accept()

    s = Session(policy=policy)
    ehlo(s)
    out = s.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@b.c>\r\nNOOP\r\n")
    assert out == b"250 2.1.0 Ok\r\n421-4.7.0 [TS04] go away\r\n421 4.7.0 INJECTED\r\n"
    assert s.proto.closed


def test_local_misuse_raises() -> None:
    p = ServerProtocol()
    with pytest.raises(LocalProtocolError):
        p.accept()
    p.receive_data(b"EHLO x\r\nNOOP\r\n")
    assert isinstance(p.next_event(), Hello)
    with pytest.raises(LocalProtocolError):
        p.next_event()  # a reply is owed
    with pytest.raises(LocalProtocolError):
        p.reply(354, "", "wrong positive code")
    p.accept()
    assert p.next_event() is NEED_DATA


def test_no_enhanced_codes_when_disabled() -> None:
    s = Session(ServerConfig(enhanced_status_codes=False))
    out = s.feed(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nFOO\r\n")
    assert b"ENHANCEDSTATUSCODES" not in out
    assert out.endswith(b"250 Ok\r\n500 Command unrecognized\r\n")


def test_eof_closes() -> None:
    s = Session()
    s.feed(b"")
    assert s.proto.closed


# ---------------------------------------------------------------- fuzzing

_TOKENS = [
    b"EHLO x\r\n",
    b"HELO y\r\n",
    b"MAIL FROM:<a@b.c>\r\n",
    b"MAIL FROM:<>\r\n",
    b"RCPT TO:<u@b.c>\r\n",
    b"RCPT TO:<bad@b.c>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN dXNlcg==\r\n",
    b"c2VjcmV0\r\n",
    b"*\r\n",
    b"..x\r\n",
    b"\n.\n",
    b"\r",
    b"\n",
    b".",
    b"\x00",
    b"QUIT\r\n",
    b"BDAT 99999999999999999999\r\n",
]


def _fuzz_config() -> ServerConfig:
    return ServerConfig(
        max_line_length=64,
        max_message_size=200,
        max_recipients=3,
        max_errors=50,
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        auth_requires_tls=False,
    )


def _check_replies(out: bytes) -> None:
    for line in out.split(b"\r\n")[:-1]:
        assert len(line) >= 3 and line[:3].isdigit(), line
        assert line[3:4] in (b" ", b"-", b""), line


def _fuzz_policy(choices: list[bool]) -> Policy:
    it = iter(choices * 50)

    def policy(proto: ServerProtocol, ev: Event) -> None:
        if not ev.needs_reply:
            return
        if next(it, True):
            proto.accept()
            if isinstance(ev, StartTLS):
                proto.tls_started()
        else:
            proto.reply(451, "4.3.0", "no")

    return policy


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=40)), max_size=40),
    st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_fuzz_junk_only_yields_replies(chunks: list[bytes], choices: list[bool]) -> None:
    s = Session(_fuzz_config(), _fuzz_policy(choices))
    for chunk in chunks:
        _check_replies(s.feed(chunk))
    for m in s.messages:
        assert len(m.data) <= 200 and len(m.recipients) <= 3
