"""Hostile tenants, session 24: each test on a defect the outside audit of
``fastsend serve`` found, failing before its fix.

- A tenant's template was built (parsed, checked, compiled, its row measure
  made) on serve's one loop: a template at the caps held every other tenant's
  API calls 1.3-1.8 s, each time it was named (an inline template was built
  again by every request, a stored one by every message naming its id). Built
  in a thread (two at a time, one a tenant at a time) and kept.
- An HTML-only template holding 5,001-10,000 placeholders was accepted (201/202)
  and spooled with its text part said from the HTML, which doubled them: every
  later use of the campaign (a message naming its id, more recipients) was a
  500 and the worker failed each of its messages. Counted with the text part
  it carries: refused when it arrives.
- Attachment names padded with spaces (``invoice.pdf      .exe`` shows as
  ``invoice.pdf`` in a client's column) or holding letters that show as nothing
  were accepted; and the names inside a forwarded message attached base64 or
  quoted-printable were never read. Both refused like the other disguises.
- A tenant's large raw message was checked on serve's loop by a regex tried at
  every offset (11-21 s for 15-20 MB): linear, and in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import quopri
import threading
from pathlib import Path
from typing import Any

import pytest

from fastsend.message import Campaign, CampaignError, rawmime
from fastsend.message.campaign import MAX_PLACEHOLDERS
from fastsend.message.rawmime import RawMimeError
from fastsend.serve import api_campaigns, api_messages
from test_serve_api import Client, arun

TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Hello {{ name }}"}


def _held(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event, list[Any]]:
    """Template builds that wait (in their thread) until ``release`` is set;
    ``entered`` is set as one starts; ``calls``: (thread name, subject) of each."""
    entered, release = threading.Event(), threading.Event()
    calls: list[Any] = []
    real = api_messages.build_inline

    def build(template: dict[str, Any], limit: int) -> Any:
        calls.append((threading.current_thread().name, template.get("subject")))
        entered.set()
        assert release.wait(60), "never released"
        return real(template, limit)

    monkeypatch.setattr(api_messages, "build_inline", build)
    monkeypatch.setattr(api_campaigns, "build_inline", build)
    return entered, release, calls


async def _wait(event: threading.Event) -> None:
    for _ in range(6000):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


def test_a_template_being_built_holds_no_other_tenants_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one tenant's template is being built (held here until the other
    tenant's requests are answered: built on the loop, nothing else ran and
    this test never ended), another tenant lists its campaigns, sends a
    message and makes a campaign of its own template; the build then ends
    and its message is accepted."""
    entered, release, calls = _held(monkeypatch)

    async def t(c: Client) -> None:
        c.key("acme"), c.key("other")
        slow = asyncio.create_task(c.req("POST", "/v1/messages", {
            "template": TPL, "to": "u@example.org", "variables": {"name": "x"}}))  # fmt: skip
        await _wait(entered)
        st, _ = await c.req("GET", "/v1/campaigns", tenant="other")
        assert st == 200
        st, got = await c.req("POST", "/v1/messages", {
            "from": "b@example.com", "to": "v@example.org", "subject": "s", "text": "t"},
            tenant="other")  # fmt: skip
        assert st == 202, got
        # another tenant's own template: a build of its own, not behind acme's
        entered.clear()
        other = asyncio.create_task(c.req("POST", "/v1/messages", {
            "template": {**TPL, "subject": "Other {{ name }}"}, "to": "w@example.org",
            "variables": {"name": "y"}}, tenant="other"))  # fmt: skip
        await _wait(entered)
        assert len(calls) == 2 and not slow.done()
        release.set()
        for task in (slow, other):
            st, got = await task
            assert st == 202, got
        assert all(name != "MainThread" for name, _ in calls), calls

    arun(tmp_path, t)


def test_a_template_is_built_once_not_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline template named by many requests, and the campaign id it makes
    named by many messages, cost one build each (before: one a request, one a
    message, each on the loop); the same template from another tenant is that
    tenant's own build and campaign; a template that fails is not kept."""
    _, release, calls = _held(monkeypatch)
    release.set()
    stored: list[str] = []
    real = api_messages.build_stored

    def build_stored(spec: dict[str, Any], limit: int) -> Any:
        stored.append(spec["subject"])
        return real(spec, limit)

    monkeypatch.setattr(api_messages, "build_stored", build_stored)

    async def t(c: Client) -> None:
        msg = {"template": TPL, "to": "u@example.org", "variables": {"name": "x"}}
        for _ in range(5):
            st, got = await c.req("POST", "/v1/messages", msg)
            assert st == 202, got
        st, got = await c.req("POST", "/v1/messages", {"messages": [msg] * 20})
        assert st == 202 and got["accepted"] == 20, got
        assert len(calls) == 1, calls
        (cid,) = {i["id"] for i in (await c.req("GET", "/v1/campaigns"))[1]["campaigns"]}
        for _ in range(5):
            st, got = await c.req("POST", "/v1/messages", {**msg, "template": cid})
            assert st == 202, got
        assert stored == [TPL["subject"]]  # (its stored spec, once)
        st, got = await c.req("POST", "/v1/messages", msg, tenant="other")
        assert st == 202 and len(calls) == 2, got
        st, got = await c.req("GET", "/v1/campaigns", tenant="other")
        assert [i["id"] for i in got["campaigns"]] != [cid], got
        bad = {**msg, "template": {**TPL, "html": "{{ x"}}
        for _ in range(2):
            st, got = await c.req("POST", "/v1/messages", bad)
            assert st == 400 and got["error"]["field"] == "message.template.html", got
        assert len(calls) == 4, calls

    arun(tmp_path, t)


def test_an_html_only_template_is_counted_with_the_text_said_from_it(tmp_path: Path) -> None:
    """6,000 placeholders in an HTML-only template: 12,000 with its text part,
    which the spooled spec carries and from_dict refused when it was read
    back (the 201 campaign then a 500 for each use, each message failed by the
    worker). Refused when it arrives, saying how to fit; every campaign
    accepted is one its spec builds again."""
    html = "<p>{{ v }}</p>" * 6000
    with pytest.raises(CampaignError, match=r"12,000 placeholders with the text part said"):
        Campaign.from_dict({"from": "a@example.com", "subject": "s", "html": html})
    for spec in ({"html": html, "text_from_html": False}, {"html": html, "text": "t {{ v }}"},
                 {"html": "<p>{{ v }}</p>" * (MAX_PLACEHOLDERS // 2)}):  # fmt: skip
        camp = Campaign.from_dict({"from": "a@example.com", "subject": "s", **spec})
        Campaign.from_dict(camp.to_dict())

    async def t(c: Client) -> None:
        tpl = {"from": "a@example.com", "subject": "s", "html": html}
        st, got = await c.req("POST", "/v1/campaigns", {
            "template": tpl, "recipients": [{"email": "u@example.org", "v": "x"}]})  # fmt: skip
        assert st == 400 and "text_from_html" in got["error"]["message"], got
        st, got = await c.req("POST", "/v1/messages", {
            "template": tpl, "to": "u@example.org", "variables": {"v": "x"}})  # fmt: skip
        assert st == 400 and got["error"]["field"] == "message.template", got
        assert c.ctx.spool.counts().get("queued", 0) == 0
        st, got = await c.req("POST", "/v1/messages", {
            "template": {**tpl, "text": "t"}, "to": "u@example.org", "variables": {"v": "x"}})
        assert st == 202, got
        cid = c.ctx.spool.get_campaign(1) and 1
        st, got = await c.req("POST", "/v1/messages", {
            "template": cid, "to": "w@example.org", "variables": {"v": "x"}})  # fmt: skip
        assert st == 202, got

    arun(tmp_path, t)


# ---------------------------------------------------------------- attachment names


def _inner(name: bytes) -> bytes:
    """A message with one attachment named ``name`` (as a forward attaches it)."""
    return (b"From: x@example.net\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="in"\r\n\r\n--in\r\n'
            b"Content-Type: text/plain\r\n\r\nsee attached\r\n--in\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="' + name + b'"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n--in--\r\n")  # fmt: skip


def _forward(inner: bytes, cte: bytes = b"base64", ctype: bytes = b"message/rfc822",
             name: bytes = b"fwd.eml") -> bytes:  # fmt: skip
    body = (base64.encodebytes(inner).replace(b"\n", b"\r\n") if cte == b"base64"
            else quopri.encodestring(inner).replace(b"\n", b"\r\n"))  # fmt: skip
    return (b"From: a@acme.example\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: " + ctype + b"\r\n"
            b"Content-Transfer-Encoding: " + cte + b"\r\n"
            b'Content-Disposition: attachment; filename="' + name + b'"\r\n\r\n'
            + body + b"\r\n--b--\r\n")  # fmt: skip


PADDED = [b"invoice.pdf      .exe", b"invoice.pdf\xc2\xa0\xc2\xa0\xc2\xa0.exe",  # NBSP
          b"invoice.pdf\xe3\x80\x80\xe3\x80\x80\xe3\x80\x80.scr",  # ideographic spaces
          b"invoice.pdf \xe2\x80\x83\xe2\x80\x83.exe",  # a space and em spaces
          b"invoice.pdf   .exe", b"notes.txt ",  # three; a space after the extension
          b"photo\xe2\xa0\x80.exe", b"doc\xe3\x85\xa4.exe"]  # Braille blank, Hangul filler  # fmt: skip
NAMES_FINE = [b"report 2024 final.pdf", b"typo  twice.pdf", b"\xe8\xb3\x87\xe6\x96\x99\xe3\x80\x80\xe4\xb8\x80.pdf",
              b"r\xc3\xa9sum\xc3\xa9 v2.pdf", b"a b c.txt"]  # fmt: skip


def test_space_padded_and_blank_attachment_names_are_refused() -> None:
    """``invoice.pdf      .exe`` shows as ``invoice.pdf`` in a mail client's
    attachment column (the program's extension pushed out of view), and so do
    runs of other spaces and letters that show as nothing: accepted before,
    now refused as disguised names (a template's attachment; raw MIME's parts);
    single spaces between words (an ideographic one too) still go."""
    for name in PADDED:
        text = name.decode()
        with pytest.raises(CampaignError, match=r"out of view|shows as nothing|ends with a space"):
            Campaign.from_dict({**TPL, "attachments": [{"filename": text, "data_b64": "aGk="}]})
        with pytest.raises(RawMimeError):
            rawmime.check(_inner(name))
    for name in NAMES_FINE:
        camp = Campaign.from_dict(
            {**TPL, "attachments": [{"filename": name.decode(), "data_b64": "aGk="}]}
        )
        assert camp.to_dict()["attachments"][0]["filename"] == name.decode()
        rawmime.check(_inner(name))


def test_names_inside_an_encoded_forwarded_message_are_checked(
    tmp_path: Path, certs: Any
) -> None:
    """A forwarded message attached base64 or quoted-printable (message/rfc822,
    or any part named ``*.eml``, one inside another) hid its own attachments'
    names from the check: ``invoice<U+202E>fdp.exe`` inside went through the
    API and SMTP submission, and as a template's message/rfc822 attachment.
    Decoded and read as a mail client opens it: refused (400 naming raw, 554
    5.6.0); the same with an honest name goes; nesting past 8 is refused."""
    import aiosmtplib

    from test_tenant_caps import node

    bad = _inner(b"invoice\xe2\x80\xaefdp.exe")
    disguised = [_forward(bad), _forward(bad, b"quoted-printable"),
                 _forward(bad, ctype=b"application/octet-stream"),  # named .eml
                 _forward(_forward(bad), ctype=b"message/rfc822", name=b"outer.eml"),
                 _forward(_inner(b"invoice.pdf      .exe"))]  # fmt: skip
    fine = [_forward(_inner(b"invoice.pdf")), _forward(_inner(b"a b.pdf"), b"quoted-printable")]
    for raw in disguised:
        with pytest.raises(RawMimeError):
            rawmime.check(raw)
    deep = bad
    for _ in range(rawmime.MAX_NESTING + 1):
        deep = _forward(deep)
    with pytest.raises(RawMimeError, match="nested more than 8"):
        rawmime.check(deep)
    with pytest.raises(CampaignError, match=r"U\+202E"):
        Campaign.from_dict({**TPL, "attachments": [{
            "filename": "fwd.eml", "content_type": "message/rfc822",
            "data_b64": base64.b64encode(bad).decode()}]})  # fmt: skip
    Campaign.from_dict({**TPL, "attachments": [{
        "filename": "fwd.eml", "content_type": "message/rfc822",
        "data_b64": base64.b64encode(_inner(b"invoice.pdf")).decode()}]})  # fmt: skip

    async def main() -> None:
        tables = {"spool": {"dir": str(tmp_path / "spool")},
                  "tenants": {"acme": {"domains": ["acme.example"]}}}  # fmt: skip
        async with node(tables, certs) as n:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=n.smtp_port, tls_context=certs[2],
                                   start_tls=True, timeout=30)  # fmt: skip
            await smtp.connect()
            await smtp.login("acme", n.key("acme"))
            for raw in disguised:
                st, body, _h = await n.req("POST", "/v1/messages", {
                    "from": "a@acme.example", "to": "r@example.org",
                    "raw": raw.decode("utf-8")})  # fmt: skip
                assert st == 400 and body["error"]["field"] == "message.raw", (st, body)
                with pytest.raises(aiosmtplib.SMTPDataError) as e:
                    await smtp.sendmail("a@acme.example", ["r@example.org"], raw)
                assert e.value.code == 554 and "5.6.0" in e.value.message, e.value
            assert n.ctx.spool.counts().get("queued", 0) == 0
            for raw in fine:
                st, body, _h = await n.req("POST", "/v1/messages", {
                    "from": "a@acme.example", "to": "r@example.org",
                    "raw": raw.decode("utf-8")})  # fmt: skip
                assert st == 202, body
                await smtp.sendmail("a@acme.example", ["r@example.org"], raw)
            await smtp.quit()
            assert n.ctx.spool.counts()["queued"] == 2 * len(fine)

    asyncio.run(main())


def test_a_large_raw_message_is_checked_off_the_loop_in_linear_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant's 15 MB raw message was checked on serve's loop with a regex
    (``[^\\r\\n]{999}``) tried at every offset: 11-21 s of every tenant's requests.
    Lines over 998 octets are found in linear time (``rawmime.long_line``, the
    same lines as before: any line end, CR or LF, the first long line's number)
    and a large raw message is checked in a thread."""
    cases = [(b"a" * 999, 0), (b"ab\r\n" + b"x" * 998 + b"\r\n" + b"y" * 999, 1004),
             (b"x" * 998 + b"\r" + b"y" * 998 + b"\n" + b"z" * 1200, 1998),
             (b"x" * 998 + b"\r\n" + b"y" * 998, -1), (b"", -1), (b"\r\n" * 2000, -1)]  # fmt: skip
    for data, at in cases:
        assert rawmime.long_line(data) == at, (data[:20], at)
    with pytest.raises(RawMimeError, match="line 5 is over 998"):  # (signed: not re-encoded)
        rawmime.check(b"From: a@acme.example\r\nDKIM-Signature: v=1\r\n\r\nx\r\n"
                      + b"y" * 999 + b"\r\n")  # fmt: skip
    threads: list[str] = []
    real = api_messages.check_raw

    def check_raw(raw: bytes) -> None:
        threads.append(threading.current_thread().name)
        real(raw)

    monkeypatch.setattr(api_messages, "check_raw", check_raw)
    body = base64.encodebytes(b"\x00" * 600_000).replace(b"\n", b"\r\n")
    raw = (b"From: a@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + body)  # fmt: skip

    async def t(c: Client) -> None:
        st, got = await c.req("POST", "/v1/messages", {
            "from": "a@example.com", "to": "u@example.org", "raw": raw.decode()})  # fmt: skip
        assert st == 202, got
        long = raw + b"z" * 1000 + b"\r\n"
        st, got = await c.req("POST", "/v1/messages", {
            "from": "a@example.com", "to": "u@example.org", "raw": long.decode()})  # fmt: skip
        assert st == 202, got  # (re-encoded: a base64 part's long line is no harm)

    arun(tmp_path, t)
    assert threads and "MainThread" not in threads, threads


# ---------------------------------------------------------------- bodies held


async def _stalled(c: Client, tenant: str, size: int) -> asyncio.StreamWriter:
    """A POST /v1/messages whose body (``size`` octets said) stops after 10 octets."""
    host, _, port = c.base.removeprefix("http://").rstrip("/").rpartition(":")
    _r, w = await asyncio.open_connection(host, int(port))
    w.write(f"POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {c.key(tenant)}\r\nContent-Length: {size}\r\n\r\n"
            '{"to": "a@'.encode())  # fmt: skip
    await w.drain()
    return w


async def _until(c: Client, tenant: str, status: int) -> Any:
    probe = b"[" * (100 << 10)  # over 64 KiB (counted); malformed once read: 400
    for _ in range(600):
        st, got = await c.req("POST", "/v1/messages", tenant=tenant, raw=probe)
        if st == status:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {status}: {st} {got}")


def test_request_bodies_held_at_once_are_capped_per_node_and_tenant(tmp_path: Path) -> None:
    """Each API connection may send up to max_body_bytes, read whole into memory
    and decoded, and nothing bounded how many at once: 256 connections from one
    address of 16 MiB each held 4 GiB (one tenant could exhaust the node). With
    [api] max_held_bytes 4 MiB (bodies of 1 MiB): a tenant holding 2 MiB (its
    half) gets 429 for more, the node holding 4 MiB answers 503, both with
    Retry-After, before a body is read; small requests still go, and once the
    held bodies end, a large one goes again."""

    async def t(c: Client) -> None:
        size = 1 << 20
        held = [await _stalled(c, "acme", size) for _ in range(2)]
        got = await _until(c, "acme", 429)
        assert "max_held_bytes" in got["error"]["message"], got
        held += [await _stalled(c, "other", size) for _ in range(2)]
        got = await _until(c, "third", 503)
        assert "max_held_bytes" in got["error"]["message"], got
        st, got = await c.req("POST", "/v1/messages", {
            "from": "a@example.com", "to": "u@example.org", "subject": "s", "text": "t"},
            tenant="third")  # fmt: skip
        assert st == 202, got
        for w in held:
            w.close()
        await _until(c, "acme", 400)

    arun(tmp_path, t, max_held_bytes=4 << 20, max_body_bytes=1 << 20)


def test_max_held_bytes_below_max_body_bytes_is_a_config_error() -> None:
    from fastsend.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="max_held_bytes"):
        from_dict({"api": {"max_held_bytes": 1 << 20, "max_body_bytes": 2 << 20}})


def test_a_large_self_contained_message_is_checked_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message with its own 15 MB HTML was parsed, checked and its text part
    said from the HTML (Campaign.from_dict) on serve's loop: 2.6-4.3 s of every
    tenant's requests, each such message. In a thread when large; a small one
    stays on the loop (a thread hop costs more than it)."""
    threads: list[str] = []
    real = Campaign.from_dict

    def from_dict(d: Any, *a: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(d, *a, **kw)

    monkeypatch.setattr(api_messages.Campaign, "from_dict", from_dict)

    async def t(c: Client) -> None:
        msg = {"from": "a@example.com", "to": "u@example.org", "subject": "s"}
        st, got = await c.req("POST", "/v1/messages", {**msg, "html": "<p>hi</p>"})
        assert st == 202 and threads == ["MainThread"], (got, threads)
        st, got = await c.req("POST", "/v1/messages", {
            **msg, "html": "<p>" + "word " * 100_000 + "</p>"})  # fmt: skip
        assert st == 202, got
        assert len(threads) == 2 and threads[1] != "MainThread", threads

    arun(tmp_path, t)
