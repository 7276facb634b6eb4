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
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests._serve_helpers import Served, sink_message

from fastsend.sink import SinkThread


@pytest.fixture(scope="module")
def sink() -> Iterator[SinkThread]:
    with SinkThread() as s:
        yield s


def _final_state(s: Served, mid: int, timeout: float = 20.0) -> dict:
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
