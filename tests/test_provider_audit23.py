"""Providers and relays, session 23's audit: what SendGrid's v3 API is handed
of a message fastsend rendered (transports.sendgrid.mime_to_v3), checked at
the local stand-in that follows its documented request rules."""

from __future__ import annotations

import asyncio
import base64
import email
import email.header
from typing import Any

from tests._provider_servers import Recorder, ThreadedApp, sendgrid_app

from fastsend.outcome import DELIVERED, Envelope, TxnResult


def _send_sendgrid(messages: list[bytes]) -> tuple[list[TxnResult], Recorder]:
    """Each raw message through SendGridTransport to the stand-in, one request
    each (recipient rN@example.net); the answers and what the stand-in took."""
    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.transports.sendgrid import SendGridTransport

    rec = Recorder()

    async def main(endpoint: str) -> list[TxnResult]:
        spec = TransportSpec(name="sg", kind="sendgrid", endpoint=endpoint,
                             secrets={"api_key": "sg-key"})  # fmt: skip
        t = SendGridTransport(spec, b"")
        out: list[TxnResult] = []
        async with aiohttp.ClientSession() as session:
            for n, data in enumerate(messages):
                env = Envelope("news@sender.example.com", [f"r{n}@example.net"], data, n + 1)
                ans = await t.send(session, [env])
                assert isinstance(ans, list), ans
                out += ans
        return out

    with ThreadedApp(sendgrid_app("sg-key", rec)) as app:
        answers = asyncio.run(main(app.url))
    return answers, rec


def _taken(rec: Recorder) -> dict[str, dict[str, Any]]:
    return {b["personalizations"][0]["to"][0]["email"]: b for b in rec.accepted}


def test_sendgrid_takes_a_message_without_a_subject() -> None:
    """A message with no Subject field (RFC 5322 3.6: optional; raw MIME from
    the API or SMTP submission) or an empty one: v3 refuses a request without
    a subject ("The subject is required."), so the request carries one space.
    Before, every recipient of such a message bounced (HTTP 400, 5.0.0) where
    SMTP and the other providers deliver it."""
    none = b"From: news@sender.example.com\r\nTo: r0@example.net\r\n\r\nhello\r\n"
    empty = b"From: news@sender.example.com\r\nTo: r1@example.net\r\nSubject: \r\n\r\nhi\r\n"
    answers, rec = _send_sendgrid([none, empty])
    assert [a.outcomes[0].kind for a in answers] == [DELIVERED, DELIVERED], answers
    got = _taken(rec)
    assert got["r0@example.net"]["content"] == [{"type": "text/plain", "value": "hello\r\n"}]
    for doc in got.values():
        assert doc["subject"] and not doc["subject"].strip(), doc["subject"]


def test_sendgrid_keeps_an_attached_message_whole() -> None:
    """A forwarded message attached as message/rfc822: one attachment of that
    type holding the message (its headers and both its parts), and the body is
    the outer message's alone. Before, the walk went into the attached message:
    its text/plain became the body of a message whose own body was HTML only
    (the recipient's text view showed the forwarded text as if written to
    them), its HTML an attachment named "attachment", its headers lost."""
    inner = (
        b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: the original\r\n"
        b"Message-ID: <orig-1@example.org>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="in"\r\n\r\n'
        b"--in\r\nContent-Type: text/plain\r\n\r\nINNER TEXT\r\n"
        b"--in\r\nContent-Type: text/html\r\n\r\n<p>INNER HTML</p>\r\n--in--\r\n"
    )
    outer = (
        b"From: news@sender.example.com\r\nTo: r0@example.net\r\nSubject: Fwd: the original\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="out"\r\n\r\n'
        b"--out\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>see below</p>\r\n"
        b"--out\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
        + inner
        + b"\r\n--out--\r\n"
    )
    answers, rec = _send_sendgrid([outer])
    assert answers[0].outcomes[0].kind == DELIVERED, answers
    (doc,) = rec.accepted
    assert doc["content"] == [{"type": "text/html", "value": "<p>see below</p>"}], doc["content"]
    (att,) = doc["attachments"]
    assert att["type"] == "message/rfc822" and att["filename"].endswith(".eml"), att
    attached = email.message_from_bytes(base64.b64decode(att["content"]))
    assert attached["Subject"] == "the original"
    assert attached["Message-ID"] == "<orig-1@example.org>"
    parts = [p.get_payload() for p in attached.walk() if not p.is_multipart()]
    assert [p.strip() for p in parts] == ["INNER TEXT", "<p>INNER HTML</p>"]


def test_sendgrid_custom_headers_go_encoded_and_reply_to_whole() -> None:
    """v3 writes the ``headers`` values into the message as given (its docs:
    "you must ensure these are properly encoded if they contain unicode
    characters"): an RFC 2047 word stays encoded, UTF-8 header text (RFC 6532)
    is encoded, and neither can carry a line break. Before, both went decoded,
    as 8-bit text in a header. A Reply-To of several addresses goes whole
    (``reply_to_list``): before, replies reached the first one only."""
    raw = (
        "From: news@sender.example.com\r\nTo: r0@example.net\r\nSubject: s\r\n"
        "Reply-To: Sales <sales@sender.example.com>, =?utf-8?q?J=C3=B6rg?= <j@sender.example.com>\r\n"
        "Comments: =?utf-8?q?caf=C3=A9?=\r\nX-Note: Grüße aus Köln\r\n"
        "X-Trick: =?utf-8?q?a=0D=0ABcc=3A_victim=40evil.example?=\r\n\r\nbody\r\n"
    ).encode()
    answers, rec = _send_sendgrid([raw])
    assert answers[0].outcomes[0].kind == DELIVERED, answers
    (doc,) = rec.accepted
    assert "reply_to" not in doc
    assert doc["reply_to_list"] == [
        {"email": "sales@sender.example.com", "name": "Sales"},
        {"email": "j@sender.example.com", "name": "Jörg"},
    ]
    h = doc["headers"]
    for value in h.values():
        assert value.isascii() and "\r" not in value and "\n" not in value, value

    def text(v: str) -> str:
        return str(email.header.make_header(email.header.decode_header(v)))

    assert h["Comments"] == "=?utf-8?q?caf=C3=A9?="
    assert text(h["X-Note"]) == "Grüße aus Köln"
    assert h["X-Trick"] == "=?utf-8?q?a=0D=0ABcc=3A_victim=40evil.example?="
