"""Session 13's outside audit of monitoring and of ``fastsend serve``'s leftovers.

Each test drives a real ``fastsend serve`` (tests/_serve_helpers.Served) with
real receivers (fastsend's sink), talks to it over loopback sockets and HTTP,
and reads what it exposes with a real reader of the format: the Prometheus
exposition with prometheus_client's text parser.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests._serve_helpers import Served, http
from tests.conftest import REPORT_REPLY_TIMEOUT, free_port

from fastsend.sink import SinkThread

CONFIG = """
[dashboard]
admin_tenants = ["ops"]
[intake]
listen = "127.0.0.1:{intake}"
verp_domain = "bounces.example"
fbl_address = "fbl@bounces.example"
max_size = 1000000
[webhooks]
urls = ["http://127.0.0.1:{hook}/services/T0/B0/HOOKSECRET"]
secret = "whsec-audit13-0123456789"
"""


@pytest.fixture(scope="module")
def sink() -> Iterator[SinkThread]:
    with SinkThread() as s:
        yield s


class Audited(Served):
    """A serve with an admin listener (``admin``: its base URL) and an intake (port)."""

    def __init__(self, tmp: Path, route: str) -> None:
        admin, self.intake = free_port(), free_port()
        self.admin = f"http://127.0.0.1:{admin}"
        # the webhook receiver is a port nobody listens on: every batch is refused
        super().__init__(tmp, route, CONFIG.format(intake=self.intake, hook=free_port()),
                         api=f'admin_listen = "127.0.0.1:{admin}"')  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sink: SinkThread) -> Iterator[Audited]:
    s = Audited(tmp_path_factory.mktemp("audit13"), f"{sink.host}:{sink.port}")
    try:
        yield s
    finally:
        s.stop()


def smtp_dialogue(port: int, lines: list[bytes]) -> list[bytes]:
    """Each line's reply (first line of it) from an SMTP listener on loopback."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        replies = [f.readline()]
        for line in lines:
            sock.sendall(line + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            replies.append(reply)
        return replies


# ---------------------------------------------------------------- SMTP SIZE
@pytest.mark.parametrize("digits", ["1" + "0" * 18, "9" * 20, "1" + "0" * 40])
def test_a_size_too_large_for_64_bits_is_552_not_555(served: Audited, digits: str) -> None:
    """RFC 1870 6.1: a SIZE over the server's fixed maximum is 552 5.3.4, however many
    digits it has; 555 (unknown parameter) told the client its syntax was wrong."""
    got = smtp_dialogue(
        served.intake, [b"EHLO client.example", f"MAIL FROM:<a@b.example> SIZE={digits}".encode()]
    )
    assert got[2].startswith(b"552 5.3.4"), got


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "12a", "-1", ""])
def test_a_size_that_is_not_ascii_digits_is_555(served: Audited, value: str) -> None:
    got = smtp_dialogue(
        served.intake, [b"EHLO client.example", f"MAIL FROM:<a@b.example> SIZE={value}".encode()]
    )
    assert got[2].startswith(b"555"), got
    # and the session goes on
    got = smtp_dialogue(served.intake, [b"EHLO client.example", b"NOOP"])
    assert got[2].startswith(b"250"), got


# ---------------------------------------------------------------- /metrics
def scrape(served: Audited) -> tuple[str, dict[str, Any]]:
    """The admin listener's /metrics: (Content-Type, families by name), read with
    prometheus_client's parser; a family named twice fails the test."""
    import asyncio

    import aiohttp

    async def get() -> tuple[str, str]:
        async with aiohttp.ClientSession() as s, s.get(served.admin + "/metrics") as r:
            assert r.status == 200
            return r.headers["Content-Type"], await r.text()

    ctype, text = asyncio.run(get())
    families: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in families, f"{fam.name} is not one group of lines:\n{text}"
        families[fam.name] = fam
    return ctype, families


def worker_pid(served: Audited, ops: str) -> int:
    st, out = http("GET", served.base + "/v1/dashboard/workers", key=ops)
    assert st == 200, out
    return int(out["workers"][0]["pid"])


def send(served: Audited, n: int, tag: str) -> None:
    msgs = [{"from": "a@example.com", "to": f"{tag}{i}@d{i % 3}.example", "subject": tag,
             "text": "hi"} for i in range(n)]  # fmt: skip
    st, out = served.req("POST", "/v1/messages", {"messages": msgs}, tenant="acme")
    assert st == 202, out


def wait_delivered(served: Audited, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, fams = scrape(served)
        fam = fams.get("fastsend_outcomes")
        got = (
            sum(s.value for s in fam.samples if s.labels.get("state") == "delivered") if fam else 0
        )
        if got >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} delivered")


def test_metrics_parse_as_prometheus_text_with_counters_that_never_go_back(
    served: Audited, tmp_path: Path
) -> None:
    """/metrics through prometheus_client's parser: the Content-Type names the format,
    every family is one group with one TYPE, figures of the moment are gauges (a
    counter that goes down reads as a reset to rate()), and a worker's counters go on
    from where they were after the worker is killed and started again."""
    from tests._serve_helpers import cli

    ops = cli("apikey", "create", "--tenant", "ops", "-c", str(served.cfg), cwd=served.tmp)
    send(served, 6, "m1-")
    wait_delivered(served, 6)
    deadline = time.monotonic() + 30
    while True:  # a worker reports its counters about once a second
        ctype, fams = scrape(served)
        if any(n.startswith("fastsend_worker_connections_opened") for n in fams):
            break
        assert time.monotonic() < deadline, sorted(fams)
        time.sleep(0.2)
    assert ctype.replace(" ", "") == "text/plain;version=0.0.4;charset=utf-8", ctype
    for name in ("fastsend_worker_connections_open", "fastsend_worker_ready_queue",
                 "fastsend_worker_lanes", "fastsend_worker_inflight", "fastsend_queue_depth",
                 "fastsend_start_time_seconds"):  # fmt: skip
        assert fams[name].type == "gauge", (name, fams[name].type)
    counters = {n: f for n, f in fams.items() if f.type == "counter"}
    assert "fastsend_worker_connections_opened" in counters, sorted(fams)
    # every family says what it counts (the workers' and the supervisor's had no HELP)
    assert not [n for n, f in fams.items() if not f.documentation], sorted(fams)
    for name, fam in counters.items():
        for s in fam.samples:
            assert s.name.endswith(("_total", "_created")), (name, s.name)
    before = {s.labels["worker"]: s.value
              for s in counters["fastsend_worker_connections_opened"].samples}  # fmt: skip
    assert before["0"] >= 1, before
    pid = worker_pid(served, ops)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker_pid(served, ops) in (pid, 0):
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.1)
    send(served, 3, "m2-")
    wait_delivered(served, 9)
    deadline = time.monotonic() + 60
    while True:  # the new worker's counters arrive about once a second
        _, fams = scrape(served)
        after = {s.labels["worker"]: s.value
                 for s in fams["fastsend_worker_connections_opened"].samples}  # fmt: skip
        if after.get("0", 0) > before["0"]:
            break
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.2)
    # The webhook receiver is down: the refused batches and the backlog are there to
    # alert on (the log's warnings are rate-limited), the URL without its secret path.
    batches = {s.labels["result"]: s.value for s in fams["fastsend_webhook_batches"].samples}
    assert batches["refused"] >= 1 and batches["accepted"] == 0, batches
    deadline = time.monotonic() + 30
    while True:  # (the backlog is a COUNT, cached for a few seconds)
        (pending,) = scrape(served)[1]["fastsend_webhook_pending"].samples
        if pending.value >= 9 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pending.value >= 9 and "HOOKSECRET" not in str(pending.labels), pending
    assert pending.labels["url"].startswith("http://127.0.0.1:"), pending
    restarts = {s.labels["worker"]: s.value for s in fams["fastsend_worker_restarts"].samples}
    assert restarts["0"] == 1, restarts


# ---------------------------------------------------------------- log floods
def test_repeated_warnings_and_tracebacks_are_held_back(
    tmp_path: Path, sink: SinkThread
) -> None:
    """A client repeating a bad request must not write the log full: lines alike
    (same logger and text before its arguments) are limited, the limit is said once,
    and a line that differs still gets through. Before: one warning per 401 and one
    aiohttp traceback per unparsable request."""


    served = Audited(tmp_path, f"{sink.host}:{sink.port}")  # its own: the limit is held
    try:
        flood_it(served)
    finally:
        served.stop()


def flood_it(served: Audited) -> None:
    import asyncio

    import aiohttp

    before = len(served.lines)

    async def flood() -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(300):
                h = {"Authorization": f"Bearer fs_nokey{i}_x"}
                async with s.get(served.base + "/v1/campaigns", headers=h) as r:
                    assert r.status == 401

    asyncio.run(flood())
    for _ in range(60):  # requests aiohttp cannot parse (a header line without a colon)
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.") # 400, JSON (httpguard)
    lines = served.lines[before:]
    text = "".join(lines)
    assert text.count("API: 401") <= 30, text[-3000:]
    assert text.count("Traceback") <= 10, text[-3000:]
    assert "held back" in text, text[-3000:]


def test_repeat_limit_counts_kinds_apart_and_says_what_it_held_back() -> None:
    import logging

    from fastsend.serve.lograte import RepeatLimit

    now = [0.0]
    limit = RepeatLimit(burst=3, per_minute=6, clock=lambda: now[0])

    def rec(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)

    got = [limit.filter(r) for r in (rec("401 %s", i) for i in range(10))]
    assert got == [True] * 4 + [False] * 6  # 3, then the one that says so
    assert limit.filter(rec("another kind %s", 1))
    now[0] = 10.0  # one line's worth of time later
    r = rec("401 %s", "x")
    assert limit.filter(r) and r.getMessage() == "401 x [6 more like this held back]"
    assert not limit.filter(rec("401 %s", "y"))


# ---------------------------------------------------------------- big JSON lists
def test_a_large_json_recipient_list_does_not_hold_other_requests(served: Audited) -> None:
    """400k JSON recipients (13 MB) are decoded and checked in a thread: meanwhile
    another tenant's requests are answered. Before, decoding and checking the list
    held the event loop for the whole time it took (every other request waited).
    Measured relatively: the longest wait of the small requests against the time
    the big one took (the list's rows all lack a variable, so nothing is spooled
    and the big request is nearly all decoding and checking)."""
    import asyncio

    import aiohttp
    import orjson

    tpl = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "x"}
    st, out = served.req("POST", "/v1/campaigns", {"template": tpl, "paused": True},
                         tenant="acme")  # fmt: skip
    assert st == 201, out
    big = orjson.dumps({"recipients": [{"email": f"u{i}@example.com"} for i in range(400_000)]})
    assert len(big) < 16 << 20
    url = f"{served.base}/v1/campaigns/{out['id']}/recipients"

    async def main() -> tuple[float, float, int]:
        done = asyncio.Event()
        waits: list[float] = []

        async def others(s: aiohttp.ClientSession) -> None:
            while not done.is_set():  # (a recipient's open: no key, no rate limit)
                t = time.perf_counter()
                async with s.get(served.base + "/t/o/AAAA.BBBB.gif") as r:
                    assert r.status == 404
                    await r.read()
                waits.append(time.perf_counter() - t)

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            h = {"Authorization": f"Bearer {served.keys['acme']}",
                 "Content-Type": "application/json"}  # fmt: skip
            task = asyncio.create_task(others(s))
            t0 = time.perf_counter()
            async with s.post(url, data=big, headers=h) as r:
                body = await r.json()
                took = time.perf_counter() - t0
            done.set()
            await task
        assert body["rejected"] == 400_000 and body["accepted"] == 0, str(body)[:300]
        return took, max(waits), len(waits)

    took, longest, n = asyncio.run(main())
    assert longest < took / 2, (took, longest, n)


# ---------------------------------------------------------------- duplicate JSON keys
@pytest.mark.parametrize(
    "raw",
    [
        b'{"from":"a@example.com","to":"dup1@example.com","subject":"s","text":"t",'
        b'"to":"other@example.com"}',
        b'{"messages":[{"from":"a@example.com","to":"dup2@example.com","subject":"s",'
        b'"text":"t","metadata":{"k":1,"\\u006b":2}}]}',
        b'{"messages":[{"from":"a@example.com","to":"dup3@example.com","subject":"s",'
        b'"text":"t"}],"messages":[]}',
    ],
)
def test_a_key_named_twice_in_an_object_is_a_400_and_nothing_is_spooled(
    served: Audited, raw: bytes
) -> None:
    """RFC 7493 2.3 (I-JSON): names MUST be unique. The server kept the last, while a
    proxy, a signer or the client's own log may read the first: one body, two meanings."""
    st, out = served.req("POST", "/v1/messages", raw=raw, tenant="acme",
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert st == 400 and "twice" in out["error"]["message"], out
    st, found = served.req("GET", "/v1/messages?limit=1000", tenant="acme")
    assert "dup" not in str(found), found


def test_a_recipient_row_naming_email_twice_is_refused(served: Audited) -> None:
    tpl = {"from": "a@example.com", "subject": "Hi", "text": "x"}
    raw = (b'{"template":{"from":"a@example.com","subject":"Hi","text":"x"},"recipients":'
           b'[{"email":"good@example.com"},{"email":"a@example.com","email":"b@example.com"}]}')  # fmt: skip
    st, out = served.req("POST", "/v1/campaigns", raw=raw, tenant="acme",
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert st == 400 and "email" in out["error"]["message"], out
    st, out = served.req("POST", "/v1/campaigns", {"template": tpl}, tenant="acme")
    assert st == 201, out  # the same without the repeated key


# ---------------------------------------------------------------- reports counted once
ARF = """From: fbl@isp.example
To: fbl@bounces.example
Subject: complaint
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="B"

--B
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: isp/1.0
Version: 1

--B
Content-Type: text/rfc822-headers

From: <a@example.com>
To: {rcpt}
Message-ID: <{mid}@example.com>

--B--
"""


def intake(served: Audited, rcpt: str, data: str) -> bytes:
    import asyncio

    import aiosmtplib

    async def go() -> bytes:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=served.intake,
                               timeout=REPORT_REPLY_TIMEOUT)
        await smtp.connect()
        _, reply = await smtp.sendmail("", [rcpt], data.replace("\n", "\r\n").encode())
        await smtp.quit()
        return reply.encode()

    return asyncio.run(go())


def test_a_report_sent_again_is_one_complaint_or_bounce(served: Audited) -> None:
    """The same feedback report (or DSN) about one message, received five times, is one
    "complained" (one "bounced") event: each event is counted by the rollups, the rate
    alarms and the campaign guardrails, so a recipient who replays one genuine report
    (or a provider that resends it) could otherwise pause a whole campaign."""
    from tests._serve_helpers import dsn

    from fastsend import msgid

    st, out = served.req("POST", "/v1/messages", {"from": "a@example.com",
                         "to": ["fbl-once@example.org", "dsn-once@example.org"],
                         "subject": "once", "text": "t"}, tenant="acme")  # fmt: skip
    assert st == 202, out
    complained_id, bounced_id = out["messages"][0]["ids"]
    secret = (served.tmp / "spool" / "secret.key").read_bytes().strip()
    arf = ARF.format(rcpt="fbl-once@example.org", mid=msgid.token(complained_id, secret))
    report = dsn("dsn-once@example.org", msgid.token(bounced_id, secret))
    for _ in range(5):
        intake(served, "fbl@bounces.example", arf)
        intake(served, "bounces@bounces.example", report)

    def events(mid: int) -> list[str]:
        st, got = served.req("GET", f"/v1/messages/{mid}", tenant="acme")
        assert st == 200, got
        return [e["event"] for e in got["events"]]

    assert events(complained_id).count("complained") == 1, events(complained_id)
    assert events(bounced_id).count("bounced") == 1, events(bounced_id)


def test_a_client_cannot_write_a_line_of_the_log(served: Audited) -> None:
    """The 401 warning names the request's path, which aiohttp decodes: %0d%0a in it
    started a forged line of the log ("... FORGED admin login ok"). Control characters
    of a message are written as escapes; the server's own tracebacks keep their lines."""
    before = len(served.lines)
    forged = "2026-12-05%2023:59:59,000%20fastsend.serve.api:%20FORGED%20login%20ok"
    for sep in ("%0d%0a", "%0a", "%e2%80%a8"):
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(f"GET /v1/x{sep}{forged} HTTP/1.1\r\nHost: x\r\n"
                         "Connection: close\r\n\r\n".encode())  # fmt: skip
            assert sock.recv(100).startswith(b"HTTP/1.1 401")
    deadline = time.monotonic() + 60
    while sum("FORGED" in ln for ln in served.lines[before:]) < 3:
        assert time.monotonic() < deadline, "".join(served.lines[before:])
        time.sleep(0.05)
    lines = [ln for ln in served.lines[before:] if "FORGED" in ln]
    assert all("API: 401" in ln for ln in lines), lines  # each on the 401's own line
    assert not any(ln.startswith("2026-12-05 23:59:59,000") for ln in served.lines), lines


def test_unsubscribing_twice_is_one_event(served: Audited, sink: SinkThread) -> None:
    """A mail client may send RFC 8058's one-click POST more than once (and a person
    may confirm the page again): the address is suppressed once, and "unsubscribed"
    is recorded once (the rollups count each event)."""
    import re

    from tests._serve_helpers import sink_message

    tpl = {"from": "a@example.com", "subject": "unsub-twice", "text": "hi",
           "tracking": {"unsubscribe": True, "base_url": "https://t.example.com"}}  # fmt: skip
    st, out = served.req("POST", "/v1/messages", {"template": tpl, "to": "twice@example.org"},
                         tenant="acme")  # fmt: skip
    assert st == 202, out
    mid = out["messages"][0]["ids"][0]
    data = sink_message(sink, b"unsub-twice")
    path = re.search(rb"List-Unsubscribe: <https://t\.example\.com(/u/[A-Za-z0-9_\-.]+)>", data)
    assert path, data[:2000]
    for body in ("List-Unsubscribe=One-Click", "List-Unsubscribe=One-Click", "confirm=yes"):
        st, _ = http("POST", served.base + path.group(1).decode(), raw=body.encode(),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert st == 200
    st, got = served.req("GET", f"/v1/messages/{mid}", tenant="acme")
    assert st == 200, got
    assert [e["event"] for e in got["events"]].count("unsubscribed") == 1, got["events"]
