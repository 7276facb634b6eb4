"""Providers and relays, session 23's audit: what SendGrid's v3 API is handed
of a message fastsend rendered (transports.sendgrid.mime_to_v3), checked at
the local stand-in that follows its documented request rules; the providers'
own suppression lists read into fastsend's (`fastsend suppress sync`)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.header
import os
import subprocess
from pathlib import Path
from typing import Any

from tests._engine_helpers import fastsend_cmd
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
    parts = [str(p.get_payload()) for p in attached.walk() if not p.is_multipart()]
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


def test_sendgrid_shows_a_related_image_where_the_html_names_it() -> None:
    """An image of a multipart/related HTML body with a Content-ID and no
    Content-Disposition (as most mail writers make one): "inline" with its
    content_id, which v3 uses only with "inline". Before, "attachment": the
    HTML's cid: image broken, the logo a separate attachment."""
    raw = (
        b"From: news@sender.example.com\r\nTo: r0@example.net\r\nSubject: logo\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=r\r\n\r\n"
        b'--r\r\nContent-Type: text/html\r\n\r\n<img src="cid:logo@sender">\r\n'
        b"--r\r\nContent-Type: image/png\r\nContent-ID: <logo@sender>\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
        b"--r\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"JVBERi0=\r\n--r--\r\n"
    )
    answers, rec = _send_sendgrid([raw])
    assert answers[0].outcomes[0].kind == DELIVERED, answers
    (doc,) = rec.accepted
    logo, pdf = doc["attachments"]
    assert logo["disposition"] == "inline" and logo["content_id"] == "logo@sender", logo
    assert pdf["disposition"] == "attachment" and "content_id" not in pdf, pdf


def test_sendgrid_never_names_an_address_twice_in_one_request() -> None:
    """Identical messages of one campaign batched as personalizations: a second
    message to an address already in the request (duplicates kept, or the
    same address in another case) waits for the next request, since v3 refuses
    a request naming an address twice (its error names no personalization).
    Before, that request was refused whole and every recipient of it bounced
    (HTTP 400, 5.0.0): five messages lost for one address twice."""
    import collections

    import aiohttp

    from fastsend.config.transports import TransportSpec
    from fastsend.transports.sendgrid import SendGridTransport

    data = b"From: news@sender.example.com\r\nSubject: same\r\n\r\nsame for all\r\n"
    groups = [["a@example.net", "dup@example.net"], ["Dup@example.net", "b@example.net"],
              ["c@example.net"]]  # fmt: skip
    pending = collections.deque(
        Envelope("news@sender.example.com", g, data, [10 * n + k for k in range(len(g))])
        for n, g in enumerate(groups)
    )
    rec = Recorder()

    async def main(endpoint: str) -> list[list[TxnResult]]:
        spec = TransportSpec(name="sg", kind="sendgrid", endpoint=endpoint,
                             secrets={"api_key": "sg-key"})  # fmt: skip
        t = SendGridTransport(spec, b"")
        out = []
        async with aiohttp.ClientSession() as session:
            while pending:
                ans = await t.send(session, t.take(pending, 1000, lambda a, b: True))
                assert isinstance(ans, list), ans
                out.append(ans)
        return out

    with ThreadedApp(sendgrid_app("sg-key", rec)) as app:
        answers = asyncio.run(main(app.url))
    outs = [o for ans in answers for tr in ans for o in tr.outcomes]
    assert [o.kind for o in outs] == [DELIVERED] * 5, outs
    assert rec.refused_twice == 0 and rec.requests == 2, (rec.refused_twice, rec.requests)
    assert sum(rec.recipients.values()) == 5


# -- fastsend suppress sync: the providers' own suppression lists -------------


def _suppress(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
    full.update(env or {})
    return subprocess.run(fastsend_cmd("suppress", *args), capture_output=True, text=True,
                          timeout=120, env=full)  # fmt: skip


def _listed(spool: Path, tenant: str = "default") -> dict[str, tuple[str, str]]:
    from fastsend.suppression import SuppressionList

    with SuppressionList(spool / "suppression.db") as s:
        return {e.address: (e.reason, e.source) for e in s.list(tenant=tenant)}


def _sendgrid_lists(key: str, lists: dict[str, list[dict[str, Any]]], asked: list[str]) -> Any:
    """SendGrid's suppression endpoints (Bearer key, limit <= 500, offset pages)."""
    from aiohttp import web

    async def get(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        if request.headers.get("Authorization") != f"Bearer {key}":
            msg = "The provided authorization grant is invalid, expired, or revoked"
            return web.json_response({"errors": [{"message": msg, "field": None}]}, status=401)
        limit, offset = int(request.query.get("limit", 500)), int(request.query.get("offset", 0))
        if limit > 500:
            return web.json_response({"errors": [{"message": "limit too large"}]}, status=400)
        items = lists.get(request.match_info["name"], [])
        return web.json_response(items[offset : offset + limit])

    app = web.Application()
    app.router.add_get("/v3/suppression/{name}", get)
    return app


def test_suppress_sync_reads_sendgrid_lists_whole(tmp_path: Path) -> None:
    """`fastsend suppress sync sendgrid`: every page of SendGrid's bounces,
    invalid emails, spam reports and global unsubscribes, each with fastsend's
    reason (a bounce's text classified); run again, nothing new; a key the
    provider refuses: exit 75, the key in no output, nothing written.
    Before, there was no way to take them: an address SendGrid had on its
    bounce list was mailed again through every other route."""
    bounces = [{"email": f"gone{i}@example.net", "reason": "550 5.1.1 The email account that you"
                " tried to reach does not exist", "status": "5.1.1", "created": 1700000000}
               for i in range(1203)]  # fmt: skip
    lists = {
        "bounces": bounces,
        "invalid_emails": [
            {
                "email": "bad@example.org",
                "reason": "Mail domain mentioned in email address is unknown",
                "created": 1700000000,
            }
        ],
        "spam_reports": [{"email": "angry@example.com", "ip": "10.0.0.1", "created": 1}],
        "unsubscribes": [
            {"email": "bye@example.com", "created": 1},
            {"email": "gone0@example.net", "created": 1},
        ],
        "blocks": [{"email": "soft@example.com", "reason": "451 try later", "created": 1}],
    }
    asked: list[str] = []
    spool = tmp_path / "spool"
    with ThreadedApp(_sendgrid_lists("SG.abcdefgh.ijklmnop", lists, asked)) as app:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(f'[spool]\ndir = "{spool}"\n[transports.sg]\nkind = "sendgrid"\n'
                       f'endpoint = "{app.url}"\n')  # fmt: skip
        env = {"FASTSEND_SG_API_KEY": "SG.abcdefgh.ijklmnop"}
        p = _suppress("sync", "sg", "-c", str(cfg), env=env)
        assert p.returncode == 0, p.stderr
        got = _listed(spool)
        assert len(got) == 1203 + 3, len(got)
        assert got["gone7@example.net"] == ("userunknown", "sync-sg")
        assert got["gone0@example.net"][0] == "unsubscribe"  # the person's own word first
        assert got["angry@example.com"][0] == "complaint"
        assert got["bye@example.com"][0] == "unsubscribe"
        assert got["bad@example.org"][0] == "userunknown"
        assert "soft@example.com" not in got  # blocks are temporary: not read
        assert any("offset=1000" in a for a in asked)  # the third page of bounces
        assert "1206" in p.stdout, p.stdout
        again = _suppress("sync", "sg", "-c", str(cfg), env=env)
        assert again.returncode == 0 and " 0 " in again.stdout, again.stdout
        other = tmp_path / "other"
        bad = _suppress("sync", "sg", "-c", str(cfg), "--spool", str(other),
                        env={"FASTSEND_SG_API_KEY": "SG.wrongkey.zzzzzzzzzz"})  # fmt: skip
    assert bad.returncode == 75, (bad.returncode, bad.stderr)
    assert "401" in bad.stderr and "wrongkey" not in bad.stderr + bad.stdout
    assert not (other / "suppression.db").exists() or not _listed(other)


def test_suppress_sync_reads_mailgun_pages_and_keeps_the_key_home(tmp_path: Path) -> None:
    """Mailgun's bounces, complaints and unsubscribes of the transport's domain,
    page after page (``paging.next``), into a tenant's list; a next page
    pointing at another host is not asked (the Basic key would go there):
    exit 75 and nothing written."""
    import base64

    from aiohttp import web

    asked: list[str] = []
    state = {"evil_next": ""}

    async def get(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        auth = request.headers.get("Authorization", "")
        if auth != "Basic " + base64.b64encode(b"api:key-" + b"0" * 32).decode():
            return web.Response(status=401, text="Forbidden")
        if request.match_info["domain"] != "mg.example.com":
            return web.json_response({"message": "Domain not found"}, status=404)
        name = request.match_info["name"]
        page = int(request.query.get("page", 0))
        per = {"bounces": 2, "complaints": 1, "unsubscribes": 1}[name]
        items: list[dict[str, Any]] = []
        if page < per:
            if name == "bounces":
                items = [{"address": f"b{page}@example.net", "code": "550",
                          "error": "5.1.1 No such user", "created_at": "Fri, 21 Oct 2011"}]  # fmt: skip
            elif name == "complaints":
                items = [{"address": "c@example.net", "created_at": "Fri, 21 Oct 2011"}]
            else:
                items = [{"address": "u@example.net", "tags": ["*"], "created_at": "x"}]
        base = f"http://127.0.0.1:{request.url.port}"
        nxt = f"{base}{request.path}?page={page + 1}&limit=1000"
        if state["evil_next"] and name == "bounces":
            nxt = state["evil_next"]
        return web.json_response({"items": items, "paging": {"next": nxt, "first": "", "last": ""}})

    app_ = web.Application()
    app_.router.add_get("/v3/{domain}/{name}", get)
    spool = tmp_path / "spool"
    with ThreadedApp(app_) as app:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(f'[spool]\ndir = "{spool}"\n[transports.mg]\nkind = "mailgun"\n'
                       f'endpoint = "{app.url}"\ndomain = "mg.example.com"\n')  # fmt: skip
        env = {"FASTSEND_MG_API_KEY": "key-" + "0" * 32}
        p = _suppress("sync", "mg", "-c", str(cfg), "--tenant", "acme", env=env)
        assert p.returncode == 0, p.stderr
        got = _listed(spool, "acme")
        assert got == {
            "b0@example.net": ("userunknown", "sync-mg"),
            "b1@example.net": ("userunknown", "sync-mg"),
            "c@example.net": ("complaint", "sync-mg"),
            "u@example.net": ("unsubscribe", "sync-mg"),
        }, got
        assert not _listed(spool)  # the default tenant's list untouched
        state["evil_next"] = "http://127.0.0.2:9/v3/mg.example.com/bounces?page=1"
        n = len(asked)
        other = tmp_path / "other"
        bad = _suppress("sync", "mg", "-c", str(cfg), "--spool", str(other), env=env)
    assert bad.returncode == 75, (bad.returncode, bad.stderr)
    assert "elsewhere" in bad.stderr and "key-" not in bad.stderr
    assert len(asked) == n + 1  # the first page only; nothing asked of the other host
    assert not (other / "suppression.db").exists() or not _listed(other)


def test_suppress_sync_reads_the_ses_account_list_signed(tmp_path: Path) -> None:
    """SES v2 ListSuppressedDestinations (GET /v2/email/suppression/addresses,
    PageSize and NextToken in the SigV4-signed query, checked with botocore's
    signer): BOUNCE -> a hard bounce, COMPLAINT -> a complaint, into the
    global list with --global."""
    from aiohttp import web
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    pages = {
        "": ([{"EmailAddress": "hard@example.net", "Reason": "BOUNCE", "LastUpdateTime": 1}], "t2"),
        "t2": (
            [{"EmailAddress": "spam@example.net", "Reason": "COMPLAINT", "LastUpdateTime": 1}],
            "",
        ),
    }
    refused: list[str] = []

    async def get(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        req = AWSRequest("GET", str(request.url), headers={
            "X-Amz-Date": request.headers.get("X-Amz-Date", "")})  # fmt: skip
        req.headers["host"] = request.headers["Host"]
        signer = SigV4Auth(Credentials("AKIDSYNC", "sync/SECRET+1"), "ses", "eu-west-1")
        req.context["timestamp"] = request.headers.get("X-Amz-Date", "")
        sig = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        if not auth.endswith(f"Signature={sig}"):
            refused.append(request.path_qs)
            return web.json_response({"message": "The request signature we calculated does"
                                      " not match"}, status=403,
                                     headers={"x-amzn-ErrorType": "SignatureDoesNotMatch"})  # fmt: skip
        if request.query.get("PageSize") != "1000":
            return web.json_response({"message": "bad PageSize"}, status=400)
        items, nxt = pages[request.query.get("NextToken", "")]
        doc: dict[str, Any] = {"SuppressedDestinationSummaries": items}
        if nxt:
            doc["NextToken"] = nxt
        return web.json_response(doc)

    app_ = web.Application()
    app_.router.add_get("/v2/email/suppression/addresses", get)
    spool = tmp_path / "spool"
    with ThreadedApp(app_) as app:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(f'[spool]\ndir = "{spool}"\n[transports.ses1]\nkind = "ses"\n'
                       f'region = "eu-west-1"\nendpoint = "{app.url}"\n')  # fmt: skip
        env = {"FASTSEND_SES1_ACCESS_KEY_ID": "AKIDSYNC",
               "FASTSEND_SES1_SECRET_ACCESS_KEY": "sync/SECRET+1"}  # fmt: skip
        p = _suppress("sync", "ses1", "-c", str(cfg), "--global", env=env)
    assert p.returncode == 0, (p.stderr, refused)
    assert not refused
    assert _listed(spool, "*") == {
        "hard@example.net": ("hardbounce", "sync-ses1"),
        "spam@example.net": ("complaint", "sync-ses1"),
    }
