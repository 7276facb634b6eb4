"""Session 15's outside audit of ``fastsend serve`` (what session 14's audit left):

- the worker's own check of a raw message's From (mail accepted before a config
  change took a domain away) read a bare CR as no line end, as the API and
  submission no longer do, and did not judge Sender: a second From hidden behind a
  bare CR went out at another tenant's domain;
- a click link to a URL with non-ASCII characters (an IDN host, an accented path)
  or spaces was redirected with them raw in ``Location``;
- ``POST /v1/campaigns`` on a full disk answered 500 and left an empty campaign
  behind; a JSON list of more than one spool transaction (20,000 rows) was
  dispatched chunk by chunk, so a failure between chunks left part of it queued;
- a DATA phase fed a byte at a time held a submission connection until
  ``max_session`` (an hour).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from tests._serve_helpers import Served, sink_message
from tests.conftest import free_port

from fastsend.sink import SinkThread


@pytest.fixture(scope="module")
def sink() -> Iterator[SinkThread]:
    with SinkThread() as s:
        yield s


def _final_state(s: Served, mid: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st, m = s.req("GET", f"/v1/messages/{mid}")
        assert st == 200, m
        if m["state"] in ("delivered", "bounced", "expired") or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


# ------------------------------------------------- the worker reads From as it is sent
BOTH = """
[tenants.evil]
domains = ["evil.example", "acme.example"]
[tenants.acme]
domains = ["other.example"]
"""
SPLIT = """
[tenants.evil]
domains = ["evil.example"]
[tenants.acme]
domains = ["acme.example"]
"""


def test_worker_judges_a_from_behind_a_bare_cr_and_the_sender(
    tmp_path: Path, sink: SinkThread
) -> None:
    """evil owned acme.example when it sent these (no workers yet); then the
    operator gave acme.example to tenant acme. The worker's own check must read
    the message as it goes out (a bare CR ends a line there) and judge Sender
    too, as the API does: both are refused (5.6.0), nothing reaches the sink; a
    message at evil's own domain is still delivered."""
    s = Served(tmp_path, f"{sink.host}:{sink.port}", BOTH, serve_args=("--no-workers",))
    heads = {
        "cr": "From: <x@evil.example>\r\nX-Note: hi\rFrom: <ceo@acme.example>\r\n",
        "sender": "From: <x@evil.example>\r\nSender: <ceo@acme.example>\r\n",
        "ok": "From: <x@evil.example>\r\n",
    }
    ids = {}
    try:
        for name, head in heads.items():
            raw = f"{head}To: <r@example.org>\r\nSubject: w15-{name}\r\n\r\nbody\r\n"
            st, out = s.req("POST", "/v1/messages", {"from": "x@evil.example",
                                                     "to": "r@example.org", "raw": raw})  # fmt: skip
            assert st == 202, out
            ids[name] = out["messages"][0]["ids"][0]
    finally:
        s.stop()
    s.extra = SPLIT
    s.serve_args = ()
    s.write_config()
    s.start()
    try:
        sink_message(sink, b"w15-ok")
        for name in ("cr", "sender"):
            m = _final_state(s, ids[name])
            assert m["state"] == "bounced", m
            assert "acme.example is not the tenant's" in m["last_reply"]["text"], m
        assert not any(b"w15-cr" in x.data or b"w15-sender" in x.data for x in sink.messages)
    finally:
        s.stop()


def test_a_template_campaign_at_a_domain_taken_from_its_tenant_is_not_sent(
    tmp_path: Path, sink: SinkThread
) -> None:
    """evil owned acme.example when it queued a template campaign From it (no
    workers yet); then the operator gave acme.example to tenant acme. The worker
    judges the campaign's From again, as it does each self-contained message:
    its recipients fail 5.6.0 and nothing reaches the sink, while evil's
    campaign at its own domain is delivered. Before: only self-contained
    messages were judged again; the template campaign went out as acme."""
    s = Served(tmp_path, f"{sink.host}:{sink.port}", BOTH, serve_args=("--no-workers",))
    camps = {}
    try:
        for name, frm in (("taken", "ceo@acme.example"), ("own", "x@evil.example")):
            st, out = s.req("POST", "/v1/campaigns", {
                "template": {"from": frm, "subject": f"t15-{name} {{{{ n }}}}", "text": "hi"},
                "recipients": [{"email": f"{name}{i}@example.org", "n": str(i)}
                               for i in range(3)]})  # fmt: skip
            assert st == 201, out
            camps[name] = out["id"]
    finally:
        s.stop()
    s.extra = SPLIT
    s.serve_args = ()
    s.write_config()
    s.start()
    try:
        sink_message(sink, b"t15-own")
        deadline = time.monotonic() + 60
        while True:
            st, c = s.req("GET", f"/v1/campaigns/{camps['taken']}")
            assert st == 200, c
            if c["counts"].get("bounced") == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert c["counts"].get("bounced") == 3 and not c["counts"].get("delivered"), c
        assert not any(b"t15-taken" in x.data for x in sink.messages)
    finally:
        s.stop()


# ------------------------------------------------- click redirects: Location in ASCII
def test_click_redirect_location_is_ascii(tmp_path: Path, sink: SinkThread) -> None:
    """A link to an IDN host with an accented path, query and fragment (and a space,
    as HTML authors write them): the redirect's Location is the same URL in ASCII
    (A-label host, UTF-8 percent-encoding), as a browser would have asked for it;
    existing escapes stay as they are."""
    s = Served(tmp_path, f"{sink.host}:{sink.port}")
    try:
        href = "https://Bücher.example:8443/straße/%41?q=naïve&amp;x=1 2&y=%C3%A9#café"
        html = f'<html><body><a href="{href}">x</a></body></html>'
        st, out = s.req("POST", "/v1/campaigns", {
            "template": {"from": "a@evil.example", "subject": "click-15", "html": html,
                         "tracking": {"clicks": True, "base_url": "https://t.example"}},
            "recipients": [{"email": "reader@example.org"}]})  # fmt: skip
        assert st == 201, out
        data = sink_message(sink, b"click-15")
        text = data.decode("ascii", "replace").replace("=\r\n", "").replace("=3D", "=")
        m = re.search(r"https://t\.example/t/c/([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)", text)
        assert m, text
        async def location() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(f"GET /t/c/{m.group(1)} HTTP/1.1\r\nHost: t.example\r\n"
                         "Connection: close\r\n\r\n".encode())  # fmt: skip
            head = (await reader.read(65536)).partition(b"\r\n\r\n")[0]
            writer.close()
            assert head.startswith(b"HTTP/1.1 302"), head
            return next(ln.partition(b":")[2].strip() for ln in head.split(b"\r\n")
                        if ln.lower().startswith(b"location:"))  # fmt: skip

        loc = asyncio.run(location())
        assert loc.isascii(), loc
        assert loc == (b"https://xn--bcher-kva.example:8443/stra%C3%9Fe/%41"
                       b"?q=na%C3%AFve&x=1%202&y=%C3%A9#caf%C3%A9"), loc  # fmt: skip
    finally:
        s.stop()


# ------------------------------------------------- a spool that cannot write
def _fill(where: Path) -> Path:
    """A file taking every free byte of ``where``'s file system."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"\0" * (1 << 16)
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]  # the last pages too
    finally:
        os.close(fd)
    return filler


TPL = {"from": "a@evil.example", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


class Limited:
    """A serve (no workers) with submission and intake, its spool on an 8 MB tmpfs
    (``mounted``: False when not root, the full-disk test then skips)."""

    def __init__(self, disk: Path, certs: tuple[str, str, ssl.SSLContext], mounted: bool):
        self.disk, self.mounted, self.client = disk, mounted, certs[2]
        self.sub, self.intake = free_port(), free_port()
        extra = _submission(self.sub, certs) + f"""
[intake]
listen = "127.0.0.1:{self.intake}"
verp_domain = "bounces.example"
fbl_address = "fbl@bounces.example"
{DRIP_LIMITS}
"""
        self.s = Served(disk, "127.0.0.1:9", extra, serve_args=("--no-workers",))


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, certs: tuple[str, str, ssl.SSLContext]
) -> Iterator[Limited]:
    disk = tmp_path_factory.mktemp("audit15") / "disk"
    disk.mkdir()
    root = os.geteuid() == 0
    if root:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        x = Limited(disk, certs, root)
        try:
            yield x
        finally:
            x.s.stop()
    finally:
        if root:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_campaign_is_507_with_retry_after_and_nothing_half_made(
    limited: Limited,
) -> None:
    """POST /v1/campaigns while the spool's disk is full: 507 with Retry-After (it
    was a 500), and no campaign is left behind (it was an empty campaign that the
    tenant saw); with room again the same request is created whole. SMTP
    submission answers 452 4.3.1 (insufficient system storage; it was 451 4.3.0
    and a traceback a message)."""
    if not limited.mounted:
        pytest.skip("needs root (mount): CI runs as root")
    s, disk, port = limited.s, limited.disk, limited.sub
    body = {"name": "full", "template": TPL,
            "recipients": [{"email": f"r{i}@example.org", "name": "N" * 900}
                           for i in range(200)]}  # fmt: skip
    st, ready = s.req("POST", "/v1/campaigns", {"template": TPL, "paused": True})
    assert st == 201, ready
    filler = _fill(disk)
    # A CSV list (streamed to the spool's disk first): 507, its partial file gone.
    csv = b"email,name\n" + b"".join(b"c%d@example.org,%s\n" % (i, b"N" * 900)
                                      for i in range(2000))  # fmt: skip
    st, got = s.req("POST", f"/v1/campaigns/{ready['id']}/recipients", raw=csv,
                    headers={"Content-Type": "text/csv"})  # fmt: skip
    assert st == 507, got
    uploads = disk / "spool" / "uploads"
    assert not uploads.exists() or os.listdir(uploads) == []
    st, got = s.req("POST", "/v1/campaigns", body)
    headers = _headers(s, "POST", "/v1/campaigns", body)
    assert st == 507, got
    assert "full" in got["error"]["message"], got
    assert int(headers["retry-after"]) > 0, headers
    st, listed = s.req("GET", "/v1/campaigns")
    assert st == 200 and [c["id"] for c in listed["campaigns"]] == [ready["id"]], listed
    tls = _submission_session(s, port, limited.client)
    assert _command(tls, b"MAIL FROM:<a@evil.example>").startswith(b"250")
    assert _command(tls, b"RCPT TO:<r@example.org>").startswith(b"250")
    assert _command(tls, b"DATA").startswith(b"354")
    reply = _command(tls, b"From: <a@evil.example>\r\nSubject: full\r\n\r\n"
                     + b"x" * 300_000 + b"\r\n.")  # fmt: skip
    assert reply.startswith(b"452 4.3.1"), reply
    filler.unlink()
    assert _command(tls, b"MAIL FROM:<a@evil.example>").startswith(b"250")
    assert _command(tls, b"RCPT TO:<r@example.org>").startswith(b"250")
    assert _command(tls, b"DATA").startswith(b"354")
    reply = _command(tls, b"From: <a@evil.example>\r\nSubject: room\r\n\r\nx\r\n.")
    assert reply.startswith(b"250"), reply
    tls.close()
    st, got = s.req("POST", "/v1/campaigns", body)
    assert st == 201 and got["accepted"] == 200, got
    st, listed = s.req("GET", "/v1/campaigns")
    assert got["id"] in [c["id"] for c in listed["campaigns"]], listed
    assert [c["kind"] for c in listed["campaigns"]].count("template") == 2, listed
    st, view = s.req("GET", f"/v1/campaigns/{got['id']}")
    assert view["total"] == 200 and view["status"] == "active", view


def _headers(s: Served, method: str, path: str, body: object) -> dict[str, str]:
    """The response headers of one more such request (lower-case names)."""

    async def go() -> dict[str, str]:
        async with (
            aiohttp.ClientSession() as c,
            c.request(method, s.base + path, data=orjson.dumps(body),
                      headers={"Authorization": f"Bearer {s.keys['evil']}"}) as r,
        ):  # fmt: skip
            return {k.lower(): v for k, v in r.headers.items()}

    return asyncio.run(go())


class OnRedis:
    """A serve (no workers) on a Redis spool of its own, and a client to that Redis."""

    def __init__(self, tmp: Path, port: int) -> None:
        import redis as redis_client

        self.s = Served(tmp, "127.0.0.1:9", spool_url=f"redis://127.0.0.1:{port}/0?prefix=a15",
                        api="max_body_bytes = 33554432",
                        serve_args=("--no-workers", "--allow-volatile"))  # fmt: skip
        self.r = redis_client.Redis(port=port)
        self.r.config_set("maxmemory-policy", "noeviction")

    def used(self) -> int:
        return int(self.r.info("memory")["used_memory"])


@pytest.fixture(scope="module")
def on_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnRedis]:
    from tests._redis_helpers import start_redis

    with start_redis() as server:
        x = OnRedis(tmp_path_factory.mktemp("audit15r"), server.port)
        try:
            yield x
        finally:
            x.r.close()
            x.s.stop()


def test_a_json_list_without_a_key_is_spooled_whole_or_not_at_all(on_redis: OnRedis) -> None:
    """40,000 recipients in one JSON body, no Idempotency-Key, to a Redis spool that
    runs out of memory half-way (maxmemory just above what the first 20,000 take):
    either every row is spooled or none is (it was 20,000 queued and a 500: the
    client, retrying, would send those twice)."""
    s, r = on_redis.s, on_redis.r

    def rows(tag: str, n: int) -> dict:
        return {"recipients": [{"email": f"{tag}{i}@example.org", "name": "N" * 40}
                               for i in range(n)]}  # fmt: skip

    st, c = s.req("POST", "/v1/campaigns", {"template": TPL, "paused": True})
    assert st == 201, c
    url = f"/v1/campaigns/{c['id']}/recipients"
    before = on_redis.used()
    st, got = s.req("POST", url, rows("a", 5_000), timeout=60)
    assert st == 202 and got["accepted"] == 5_000, got
    # Room for 1.3 times what 20,000 rows (one transaction of old) take.
    chunk = (on_redis.used() - before) * 4
    r.config_set("maxmemory", on_redis.used() + chunk * 13 // 10)
    try:
        st, got = s.req("POST", url, rows("b", 40_000), timeout=60)
    finally:
        r.config_set("maxmemory", 0)
    _, view = s.req("GET", f"/v1/campaigns/{c['id']}")
    if st == 202:
        assert got["accepted"] == 40_000 and view["total"] == 45_000, (got, view)
    else:
        assert view["total"] == 5_000, (st, view)  # nothing of the failed list
        assert st in (503, 507), got


def test_a_batch_failing_after_its_first_transaction_says_what_was_accepted(
    on_redis: OnRedis,
) -> None:
    """POST /v1/messages with a template message (its own campaign: one transaction)
    and a 2 MB message (the transactional campaign: another), no key, Redis full
    after the first: the first is spooled and stays; the answer is a 507 with
    Retry-After naming it and its ids (it was a 500: a client resending the whole
    batch sent the first twice)."""
    s, r = on_redis.s, on_redis.r
    batch = {"messages": [
        {"template": TPL, "to": [f"t{i}@one.example" for i in range(3)],
         "variables": {"name": "T"}},
        {"from": "a@evil.example", "to": ["m1@two.example", "m2@two.example"],
         "subject": "big", "text": "x" * (2 << 20)},
    ]}  # fmt: skip
    r.config_set("maxmemory", on_redis.used() + (256 << 10))
    try:
        st, got = s.req("POST", "/v1/messages", batch, timeout=60)
    finally:
        r.config_set("maxmemory", 0)
    assert st == 507, got
    assert got["accepted"] == 3 and len(got["messages"][0]["ids"]) == 3, got
    assert got["messages"][1]["ids"] == [], got
    assert "messages[0] had been accepted" in got["error"]["message"], got
    for mid in got["messages"][0]["ids"]:
        st, m = s.req("GET", f"/v1/messages/{mid}")
        assert st == 200 and m["state"] == "queued", m


# ------------------------------------------------- a DATA phase dripped a byte at a time
DRIP_LIMITS = "timeout = 5.0\ndata_timeout = 1.0\nmax_session = 120.0\n"


def _reply(sock: socket.socket) -> bytes:
    """One SMTP reply (all its lines)."""
    got = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return got
        got += chunk
        lines = got.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return got


def _command(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return _reply(sock)


def _submission(port: int, certs: tuple[str, str, ssl.SSLContext]) -> str:
    return f"""
[submission]
listen = "127.0.0.1:{port}"
tls_cert = "{certs[0]}"
tls_key = "{certs[1]}"
{DRIP_LIMITS}
"""


def _submission_session(s: Served, port: int, client: ssl.SSLContext) -> ssl.SSLSocket:
    """A submission session over STARTTLS, authenticated as evil (its API key)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert _reply(sock).startswith(b"220")
    _command(sock, b"EHLO drip.example")
    assert _command(sock, b"STARTTLS").startswith(b"220")
    tls = client.wrap_socket(sock, server_hostname="127.0.0.1")
    _command(tls, b"EHLO drip.example")
    plain = base64.b64encode(b"\0evil\0" + s.keys["evil"].encode())
    assert _command(tls, b"AUTH PLAIN " + plain).startswith(b"235")
    return tls


def _drip(sock: socket.socket, limit: float = 20.0) -> bytes:
    """A byte of message content every 0.2 s (each well within data_timeout) until
    the server answers or closes; what it said."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and b"421" not in got:
        try:
            sock.sendall(b"x")
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    return got


def test_a_dripped_message_is_cut_not_held_to_max_session(limited: Limited) -> None:
    """After DATA (submission: over STARTTLS, authenticated) a peer sends a byte every
    0.2 s: each block is within data_timeout (1 s here), so only max_session (120 s)
    ended it. Now the content must arrive at data_min_rate (500 bytes/s) after
    data_timeout: 421 within seconds, on both listeners; nothing is accepted."""
    s, sub, intake = limited.s, limited.sub, limited.intake
    before = s.req("GET", "/v1/campaigns")[1]["campaigns"]
    tls = _submission_session(s, sub, limited.client)
    assert _command(tls, b"MAIL FROM:<a@evil.example>").startswith(b"250")
    assert _command(tls, b"RCPT TO:<r@example.org>").startswith(b"250")
    assert _command(tls, b"DATA").startswith(b"354")
    got = _drip(tls)
    tls.close()
    assert b"421" in got, got
    sock = socket.create_connection(("127.0.0.1", intake), timeout=10)
    assert _reply(sock).startswith(b"220")
    _command(sock, b"EHLO drip.example")
    assert _command(sock, b"MAIL FROM:<>").startswith(b"250")
    assert _command(sock, b"RCPT TO:<b-1-x@bounces.example>").startswith(b"250")
    assert _command(sock, b"DATA").startswith(b"354")
    got = _drip(sock)
    sock.close()
    assert b"421" in got, got
    st, listed = s.req("GET", "/v1/campaigns")
    assert st == 200 and listed["campaigns"] == before, listed  # nothing accepted


def test_a_campaign_whose_request_died_is_never_shown_nor_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve killed -9 right after POST /v1/campaigns created its campaign (no
    Idempotency-Key: the client never learns its id and sends the request again):
    it was an empty active campaign in the tenant's list; now it stays unseen and,
    at the next start, is abandoned (its creator is gone); the retry is whole."""
    from fastsend.spool import open_spool

    monkeypatch.setenv("FASTSEND_TEST_FAULT", "idem-kill-after-campaign")  # (the first start)
    s = Served(tmp_path, "127.0.0.1:9", serve_args=("--no-workers",))
    monkeypatch.delenv("FASTSEND_TEST_FAULT")
    try:
        body = {"template": TPL, "recipients": [{"email": "a@example.org", "name": "A"}]}
        with pytest.raises(aiohttp.ClientError):
            s.req("POST", "/v1/campaigns", body)
        assert s.proc.wait(20) == -9
        s.start()
        st, listed = s.req("GET", "/v1/campaigns")
        assert st == 200 and listed["campaigns"] == [], listed
        assert s.req("GET", "/v1/campaigns/1")[0] == 404
        deadline = time.monotonic() + 60
        while True:  # serve's first tick sweeps it
            spool = open_spool(str(tmp_path / "spool"), readonly=True)
            try:
                info = spool.get_campaign(1)
            finally:
                spool.close()
            assert info is not None
            if info.status == "abandoned" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert info.status == "abandoned", info
        st, got = s.req("POST", "/v1/campaigns", body)
        assert st == 201 and got["accepted"] == 1, got
        st, listed = s.req("GET", "/v1/campaigns")
        assert [c["id"] for c in listed["campaigns"]] == [got["id"]], listed
    finally:
        s.stop()


# ------------------------------------------------- one link's events: configured, all nodes
def test_link_event_cap_is_configured_and_counted_across_nodes(
    redis_server: Any, tmp_path: Path
) -> None:
    """Two serving nodes on one Redis spool, [tracking] link_events_per_hour = 3: one
    click link replayed 5 times on each records 3 clicks in all, every request is
    still redirected; another link keeps its own count (the cap was 20 an hour on
    each node, not configurable: N nodes behind a balancer recorded 20 x N)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from fastsend.config import from_dict
    from fastsend.message import tracking as tr
    from fastsend.serve.context import open_context
    from fastsend.serve.tracking import setup_tracking

    prefix = "lk" + os.urandom(4).hex()

    async def main() -> None:
        ctxs, servers, events = [], [], []
        try:
            for node in ("A", "B"):
                cfg = from_dict({"spool": {"dir": str(tmp_path / node),
                                           "url": redis_server.url(prefix=prefix, node=node)},
                                 "tracking": {"link_events_per_hour": 3}})  # fmt: skip
                ctx = open_context(cfg)
                ctxs.append(ctx)
                ctx.events.listeners.append(events.extend)
                app = web.Application()
                setup_tracking(app, ctx)
                server = TestServer(app, host="127.0.0.1")
                await server.start_server()
                servers.append(server)
            secret = ctxs[0].secret
            assert secret == ctxs[1].secret  # the cluster's one secret
            a = tr.sign(secret, tr.CLICK, "1", "ann@example.org", "https://example.com/a")
            b = tr.sign(secret, tr.CLICK, "1", "ann@example.org", "https://example.com/b")
            async with aiohttp.ClientSession() as http:
                for server in servers:
                    for _ in range(5):
                        async with http.get(server.make_url(f"/t/c/{a}"),
                                            allow_redirects=False) as r:  # fmt: skip
                            assert r.status == 302
                async with http.get(servers[1].make_url(f"/t/c/{b}"),
                                    allow_redirects=False) as r:  # fmt: skip
                    assert r.status == 302
            for ctx in ctxs:
                ctx.events.flush()
            urls = [e.get("url") for e in events if e["event"] == "clicked"]
            assert urls.count("https://example.com/a") == 3, urls
            assert urls.count("https://example.com/b") == 1, urls
        finally:
            for server in servers:
                await server.close()
            for ctx in ctxs:
                ctx.close()

    asyncio.run(main())
