"""The sink over real loopback sockets, with smtplib, aiosmtplib and raw pipelined writes."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from fastsend.sink import Sink, SinkConfig, SinkThread, parse_fault_text

FROM = "sender@example.test"
BODY = b"From: s@example.test\r\nMessage-ID: <m1@example.test>\r\nSubject: t\r\n\r\nhello\r\n"


@pytest.fixture
def sink(loop_kind: str) -> Iterator[SinkThread]:
    with SinkThread(loop=loop_kind, slow_ms=300) as s:
        yield s


def raw_session(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert recv_replies(sock, 1)[0].startswith("220")
    sock.sendall(b"EHLO raw.test\r\n")
    recv_replies(sock, 1)
    return sock


def recv_replies(sock: socket.socket, n: int) -> list[str]:
    """Read until ``n`` complete (final-line) replies arrived; returns their final lines."""
    data = b""
    while True:
        finals = [ln for ln in data.split(b"\r\n") if len(ln) >= 4 and ln[3:4] == b" "]
        if len(finals) >= n and data.endswith(b"\r\n"):
            return [f.decode() for f in finals]
        chunk = sock.recv(65536)
        if not chunk:
            return [f.decode() for f in finals] + ["EOF"]
        data += chunk


def test_smtplib_multiple_recipients(sink: SinkThread) -> None:
    with smtplib.SMTP(sink.host, sink.port) as c:
        refused = c.sendmail(FROM, ["a@x.test", "b@x.test", "c@y.test"], BODY)
        assert refused == {}
        c.sendmail(FROM, ["d@x.test"], b"Subject: 2\r\n\r\n.dot\r\n")
    msgs = sink.wait_messages(2)
    assert msgs[0].recipients == ["a@x.test", "b@x.test", "c@y.test"]
    assert msgs[0].mail_from == FROM
    assert msgs[0].data == BODY
    assert msgs[0].message_id == "<m1@example.test>"
    assert msgs[1].data == b"Subject: 2\r\n\r\n.dot\r\n"
    assert sink.stats.recipients == 4 and sink.stats.connections == 1


def test_raw_pipelined_groups(sink: SinkThread) -> None:
    sock = raw_session(sink.port)
    n = 20
    wire = b"".join(
        b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a%d@x.test>\r\nRCPT TO:<permfail-%d@x.test>\r\n"
        b"DATA\r\n" % (i, i)
        for i in range(1)
    )
    sock.sendall(wire)
    assert [r[:3] for r in recv_replies(sock, 4)] == ["250", "250", "550", "354"]
    # each body goes in the same write as the next transaction's commands
    for i in range(1, n):
        sock.sendall(
            b"body %d\r\n.\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a%d@x.test>\r\nDATA\r\n" % (i, i)
        )
        assert [r[:3] for r in recv_replies(sock, 4)] == ["250", "250", "250", "354"]
    sock.sendall(b"last\r\n.\r\nQUIT\r\n")
    assert [r[:3] for r in recv_replies(sock, 2)] == ["250", "221"]
    sock.close()
    msgs = sink.wait_messages(n)
    assert [m.recipients for m in msgs[:2]] == [["a0@x.test"], ["a1@x.test"]]
    assert sink.stats.faults == {"permfail": 1}


def test_smuggling_attempt_rejected(sink: SinkThread) -> None:
    sock = raw_session(sink.port)
    sock.sendall(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@x.test>\r\nDATA\r\n")
    recv_replies(sock, 3)
    sock.sendall(
        b"Subject: real\r\n\r\nhi\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@x.test>\r\n"
        b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nNOOP\r\n"
    )
    assert [r[:3] for r in recv_replies(sock, 2)] == ["550", "250"]
    sock.close()
    assert sink.messages == [] and sink.stats.messages == 0


def test_size_refused(loop_kind: str) -> None:
    with SinkThread(loop=loop_kind, max_size=1000) as s, smtplib.SMTP(s.host, s.port) as c:
        c.ehlo()
        assert c.esmtp_features["size"] == "1000"
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail(FROM, ["a@x.test"], b"x" * 2000)  # smtplib sends SIZE=2000
        assert e.value.smtp_code == 552
        c.rset()
        # a client that lies about SIZE is refused at the end of DATA
        c.mail(FROM)
        c.rcpt("a@x.test")
        code, _ = c.data(b"x" * 5000)
        assert code == 552
    assert s.stats.messages == 0


def test_fault_kinds(sink: SinkThread) -> None:
    with smtplib.SMTP(sink.host, sink.port) as c:
        refused = c.sendmail(
            FROM, ["ok@x.test", "tempfail-a@x.test", "PermFail-b@x.test", "defer2-c@x.test"], BODY
        )
        assert refused["tempfail-a@x.test"][0] == 451
        assert refused["PermFail-b@x.test"][0] == 550
        assert refused["PermFail-b@x.test"][1].startswith(b"5.1.1")
        assert refused["defer2-c@x.test"][0] == 451
    # deferN counts per address across connections
    with smtplib.SMTP(sink.host, sink.port) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail(FROM, ["defer2-c@x.test"], BODY)
        assert c.sendmail(FROM, ["defer2-c@x.test"], BODY) == {}
    assert sink.stats.faults == {"tempfail": 1, "permfail": 1, "defer": 2}


def test_421_closes(sink: SinkThread) -> None:
    sock = raw_session(sink.port)
    sock.sendall(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<421-a@x.test>\r\nNOOP\r\n")
    replies = recv_replies(sock, 3)
    assert [r[:3] for r in replies] == ["250", "421", "EOF"]
    sock.close()


def test_disconnect_in_data(sink: SinkThread) -> None:
    c = smtplib.SMTP(sink.host, sink.port)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        c.sendmail(FROM, ["disconnect-in-data@x.test"], BODY * 100)
    c.close()
    with smtplib.SMTP(sink.host, sink.port) as c:
        assert c.sendmail(FROM, ["fine@x.test"], BODY) == {}
    assert sink.stats.messages == 1
    assert sink.stats.faults == {"disconnect": 1}


def test_slow_answers_late(sink: SinkThread) -> None:
    with smtplib.SMTP(sink.host, sink.port) as c:
        c.ehlo()
        c.mail(FROM)
        t0 = time.monotonic()
        assert c.rcpt("slow-a@x.test")[0] == 250
        assert time.monotonic() - t0 >= 0.25  # slow_ms=300 in the fixture
        t0 = time.monotonic()
        assert c.data(BODY)[0] == 250
        assert time.monotonic() - t0 >= 0.25


def test_random_faults_and_latency(loop_kind: str) -> None:
    with SinkThread(loop=loop_kind, defer_rate=1.0) as s, smtplib.SMTP(s.host, s.port) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail(FROM, ["a@x.test"], BODY)
        assert e.value.recipients["a@x.test"][0] == 451
    with SinkThread(loop=loop_kind, reject_rate=1.0, latency_ms=100) as s:
        t0 = time.monotonic()
        with smtplib.SMTP(s.host, s.port) as c:
            assert time.monotonic() - t0 >= 0.09  # even the greeting waits
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                c.sendmail(FROM, ["a@x.test"], BODY)
            assert e.value.recipients["a@x.test"][0] == 550
        assert s.stats.faults == {"random-reject": 1}


def test_fault_text_421_closes(loop_kind: str) -> None:
    kind, reply = parse_fault_text('tempfail="421 4.7.0 [TS04] Messages from 1.2.3.4 deferred"')
    with SinkThread(loop=loop_kind, fault_text={kind: reply}) as s:
        sock = raw_session(s.port)
        sock.sendall(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<tempfail-1@x.test>\r\n")
        replies = recv_replies(sock, 3)
        assert replies[1] == "421 4.7.0 [TS04] Messages from 1.2.3.4 deferred"
        assert replies[2] == "EOF"
        sock.close()


@pytest.mark.parametrize(
    "spec", ["nosuch=451 x", "tempfail=250 ok", "tempfail", "defer=451 5.1.1 x"]
)
def test_bad_fault_text(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_fault_text(spec)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="defer_rate"):
        SinkConfig(defer_rate=2)
    with pytest.raises(ValueError, match="tls_cert"):
        SinkConfig(tls_cert="x.pem")


def test_max_connections(loop_kind: str) -> None:
    with SinkThread(loop=loop_kind, max_connections=2) as s:
        a, b = raw_session(s.port), raw_session(s.port)
        c = socket.create_connection((s.host, s.port), timeout=10)
        assert [r[:3] for r in recv_replies(c, 2)] == ["421", "EOF"]
        c.close()
        a.close()
        deadline = time.monotonic() + 60
        while s.stats.active > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        d = raw_session(s.port)  # room again
        for sock in (b, d):
            sock.close()
        assert s.stats.faults == {"max-connections": 1}


def test_count_stops(loop_kind: str) -> None:
    sink = SinkThread(loop=loop_kind, count=2).start()
    with smtplib.SMTP(sink.host, sink.port) as c:
        c.sendmail(FROM, ["a@x.test"], BODY)
        c.sendmail(FROM, ["a@x.test"], BODY)
    assert sink._thread is not None
    sink._thread.join(10)
    assert not sink._thread.is_alive()
    assert sink.stats.messages == 2


def test_log_and_save(tmp_path: Path, loop_kind: str) -> None:
    log, save = tmp_path / "sink.jsonl", tmp_path / "saved"
    bodies = [
        BODY,
        b"Subject: x\r\n\r\n..two dots\r\n\xc3\xa9 8bit\r\n" * 50,
        b"Subject: empty body\r\n\r\n",
    ]
    with SinkThread(loop=loop_kind, log_path=str(log), save_dir=str(save)) as s:
        with smtplib.SMTP(s.host, s.port, source_address=("127.0.0.2", 0)) as c:
            for i, body in enumerate(bodies):
                c.sendmail(FROM, [f"r{i}@x.test", f"q{i}@x.test"], body)
        s.wait_messages(3)
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["peer"] == "127.0.0.2"
    assert first["mail_from"] == FROM
    assert first["recipients"] == ["r0@x.test", "q0@x.test"]
    assert first["size"] == len(BODY)
    assert first["message_id"] == "<m1@example.test>"
    assert abs(first["time"] - time.time()) < 60
    saved = {p.name: p.read_bytes() for p in save.iterdir()}
    for line, body in zip(lines, bodies, strict=True):
        assert saved[f"{line['queue_id']}.eml"] == body
        assert line["size"] == len(body)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return ca, str(cert_path), str(key_path)


def test_starttls_smtplib(tls_files: tuple[trustme.CA, str, str], loop_kind: str) -> None:
    ca, cert, key = tls_files
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with SinkThread(loop=loop_kind, tls_cert=cert, tls_key=key, auth_users={"u": "pw"}) as s:
        with smtplib.SMTP("127.0.0.1", s.port) as c:
            c.ehlo()
            assert c.has_extn("starttls")
            c.starttls(context=ctx)
            c.ehlo()
            assert not c.has_extn("starttls")
            c.login("u", "pw")
            c.sendmail(FROM, ["a@x.test"], BODY)
        msg = s.wait_messages(1)[0]
        assert msg.tls and msg.auth_user == "u"
        with smtplib.SMTP("127.0.0.1", s.port) as c, pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("u", "wrong")


RunFn = Callable[[Coroutine[Any, Any, Any]], Any]


def test_aiosmtplib_in_process(run: RunFn, tls_files: tuple[trustme.CA, str, str]) -> None:
    ca, cert, key = tls_files
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    async def main() -> None:
        sink = Sink(SinkConfig(keep_messages=True, tls_cert=cert, tls_key=key))
        await sink.start()
        try:
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=sink.port, tls_context=ctx, start_tls=True
            )
            await client.connect()
            for i in range(5):
                errors, _ = await client.sendmail(
                    FROM, [f"a{i}@x.test", f"tempfail-{i}@x.test"], BODY
                )
                assert errors[f"tempfail-{i}@x.test"][0] == 451
            # BDAT is not spoken by aiosmtplib; a message with 8-bit content and SMTPUTF8
            await client.sendmail(
                "séndér@x.test",
                ["rcpt@x.test"],
                "Subject: é\r\n\r\né\r\n".encode(),
                mail_options=["SMTPUTF8", "BODY=8BITMIME"],
            )
            await client.quit()
            await asyncio.sleep(0)
            assert len(sink.messages) == 6
            assert all(m.tls for m in sink.messages)
            assert sink.messages[-1].mail_from == "séndér@x.test"
        finally:
            await sink.aclose()

    run(main())


def test_bdat_over_socket(sink: SinkThread) -> None:
    sock = raw_session(sink.port)
    sock.sendall(
        b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@x.test>\r\nBDAT 7\r\nabc\r\n.\nBDAT 3 LAST\r\nxyz"
    )
    assert [r[:3] for r in recv_replies(sock, 4)] == ["250", "250", "250", "250"]
    sock.close()
    assert sink.wait_messages(1)[0].data == b"abc\r\n.\nxyz"


def test_save_dir_created_and_env_clean(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    with SinkThread(save_dir=str(target)) as s, smtplib.SMTP(s.host, s.port) as c:
        c.sendmail(FROM, ["a@x.test"], BODY)
    assert len(os.listdir(target)) == 1
