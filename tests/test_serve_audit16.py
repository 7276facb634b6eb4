"""Session 16's outside audit of ``fastsend serve`` (what session 15's audit left):

- ``POST /v1/campaigns`` under an Idempotency-Key whose request failed after its
  first part told "accepted" for rows of a campaign that was never shown and, never
  retried, ends abandoned (their webhooks and stats counted mail never sent); the
  campaign stayed staging (hidden, unsent) for the key's whole 24 h;
- ``[tracking] link_events_per_hour`` (and ``link_ttl_days``) changed by a SIGHUP
  kept the value read at start;
- a redacted complaint (RFC 6590: the reporter removed the recipient) about mail
  sent to several recipients in one transaction (its Message-ID names the group)
  counted toward nothing: its campaign's complaint guardrail never saw it;
- each new inline template of ``POST /v1/messages`` searched every campaign of
  the tenant (decoding each) on the event loop: a batch of 1,000 new templates held
  every tenant's requests for 8 s, then 18, 40, 60 s as the campaigns grew; serve's
  staging sweep read every campaign of every tenant every 5 minutes;
- a SIGHUP left the intake as it started (its VERP domain, feedback-loop address,
  size and limits), though the API took the new ``[intake] verp_domain`` for
  campaigns at once (their bounces were refused, 550: nobody suppressed), and left
  submission's message size limit as it started;
- a campaign's name, the tenant's text printed as it is by the operator's
  ``fastsend campaign list``, took control characters: escape sequences reached the
  operator's terminal and a line feed forged a line of the listing;
- once a tenant cancelled its transactional campaign (or an inline template's),
  every later message of POST /v1/messages (and SMTP submission) went into the
  cancelled campaign: answered 202, never sent, never ended;
- the public listener (tracking and unsubscribe, the one SECURITY.md has published
  through the balancer) ignored ``[proxy] trusted``: behind HAProxy's PROXY
  protocol every click was a 400, and without it every recipient shared the
  balancer's per-address connection cap.
"""

from __future__ import annotations

import re
import signal
import smtplib
import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from tests._serve_helpers import Served, sink_message
from tests.conftest import REPORT_REPLY_TIMEOUT, free_port

from fastsend.sink import SinkThread

TPL = {"from": "a@evil.example", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


def _events(s: Served, event: str) -> list[dict]:
    p = s.tmp / "spool" / "events.jsonl"
    if not p.exists():
        return []
    return [e for e in map(orjson.loads, p.read_bytes().splitlines()) if e["event"] == event]


def _campaign(s: Served, cid: int) -> object:
    from fastsend.spool import open_spool

    spool = open_spool(str(s.tmp / "spool"), readonly=True)
    try:
        return spool.get_campaign(cid)
    finally:
        spool.close()


def _sweep(s: Served, ahead: float) -> int:
    """serve's staging sweep, run ``ahead`` seconds from now (an hour later...)."""
    from fastsend.serve.api_campaigns import sweep_staging
    from fastsend.spool import open_spool

    spool = open_spool(str(s.tmp / "spool"))
    try:
        return sweep_staging(spool, 86400.0, time.time() + ahead)[0]
    finally:
        spool.close()


@pytest.fixture(scope="module")
def failing_after_part(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A serve (no workers) whose keyed requests fail once their first part is spooled."""
    with pytest.MonkeyPatch.context() as mp:  # (the server's environment only)
        mp.setenv("FASTSEND_TEST_FAULT", "idem-fail-after-part:0")
        s = Served(tmp_path_factory.mktemp("audit16k"), "127.0.0.1:9",
                   '[dashboard]\nadmin_tenants = ["acme"]\n',
                   serve_args=("--no-workers",))  # fmt: skip
    try:
        yield s
    finally:
        s.stop()


def _staging(s: Served, tenant: str) -> object:
    """The tenant's one campaign that is not yet its (staging or abandoned)."""
    from fastsend.spool import open_spool

    spool = open_spool(str(s.tmp / "spool"), readonly=True)
    try:
        (info,) = [c for c in spool.campaigns(tenant) if c.status in ("staging", "abandoned")]
        return info
    finally:
        spool.close()


BODY = {"template": TPL, "recipients": [{"email": f"r{i}@example.org", "name": "R"}
                                        for i in range(3)]}  # fmt: skip


def test_a_keyed_create_that_failed_tells_nothing_until_its_retry_completes_it(
    failing_after_part: Served,
) -> None:
    """A keyed POST /v1/campaigns failing after its first part (a 500): no
    "accepted" event for its rows (it told 3, for a campaign nobody saw) and none
    counted in fastsend_api_accepted_total; the retry completes it and each row is
    told and counted once."""
    s = failing_after_part

    def counted() -> int:
        st, text = s.req("GET", "/metrics", tenant="acme")
        assert st == 200, text
        return int(re.search(r"^fastsend_api_accepted_total (\d+)", text, re.M)[1])  # type: ignore[index]

    before = counted()
    key = {"Idempotency-Key": "k-events"}
    st, got = s.req("POST", "/v1/campaigns", BODY, headers=key)
    assert st == 500, got
    staging = _staging(s, "evil")
    assert staging.status == "staging"  # type: ignore[attr-defined]
    assert [e for e in _events(s, "accepted") if e["tenant"] == "evil"] == []
    db = sqlite3.connect(s.tmp / "spool" / "spool.db")
    (row,) = db.execute("SELECT min(id) FROM messages WHERE campaign=?",
                        (staging.id,)).fetchone()  # type: ignore[attr-defined]  # fmt: skip
    db.close()
    st, seen = s.req("GET", f"/v1/messages/{row}")  # a row of a campaign never shown
    assert st == 404 and seen["error"]["message"] == f"no message {row}", seen
    assert counted() == before
    st, got = s.req("POST", "/v1/campaigns", BODY, headers=key)
    assert st == 201 and got["accepted"] == 3, got
    told = sorted(e["rcpt"] for e in _events(s, "accepted") if e["tenant"] == "evil")
    assert told == [f"r{i}@example.org" for i in range(3)], told
    assert counted() == before + 3
    st, view = s.req("GET", f"/v1/campaigns/{got['id']}")
    assert st == 200 and view["total"] == 3 and view["status"] == "active", view


def test_a_keyed_create_never_retried_is_abandoned_within_the_hour_and_a_late_retry_is_whole(
    failing_after_part: Served,
) -> None:
    """The same failed keyed create, never retried: an hour later serve's sweep
    abandons it (it waited for the key's 24 h, hidden and unsent); a retry after
    that (same key, within its 24 h) makes the campaign whole again rather than
    answering from the abandoned rows."""
    s = failing_after_part
    key = {"Idempotency-Key": "k-late"}
    st, got = s.req("POST", "/v1/campaigns", BODY, headers=key, tenant="acme")
    assert st == 500, got
    assert _sweep(s, 60) == 0  # a retry soon continues it
    assert _sweep(s, 3601) == 1
    old = _staging(s, "acme")
    assert old.status == "abandoned"  # type: ignore[attr-defined]
    st, got = s.req("POST", "/v1/campaigns", BODY, headers=key, tenant="acme")
    assert st == 201 and got["accepted"] == 3 and got["id"] != old.id, got  # type: ignore[attr-defined]
    st, view = s.req("GET", f"/v1/campaigns/{got['id']}", tenant="acme")
    assert st == 200 and view["total"] == 3 and view["counts"]["queued"] == 3, view
    st, listed = s.req("GET", "/v1/campaigns", tenant="acme")
    assert [c["id"] for c in listed["campaigns"]] == [got["id"]], listed
    told = [e for e in _events(s, "accepted") if e["tenant"] == "acme"]
    assert len(told) == 3 and {e["campaign"] for e in told} == {got["id"]}, told
    st, again = s.req("POST", "/v1/campaigns", BODY, headers=key, tenant="acme")  # replayed
    assert st == 201 and again["id"] == got["id"], again


def _hup(s: Served, want: str = "configuration reloaded", timeout: float = 60.0) -> None:
    n = len(s.lines)
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while not any(want in ln for ln in s.lines[n:]):
        assert time.monotonic() < deadline and s.proc.poll() is None, "".join(s.lines)
        time.sleep(0.05)


SECRET = "k" * 32


def _token(sink: SinkThread, marker: bytes) -> str:
    data = sink_message(sink, marker)
    text = data.decode("ascii", "replace").replace("=\r\n", "").replace("=3D", "=")
    m = re.search(r"https://t\.example/t/c/([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)", text)
    assert m, text
    return m.group(1)


def test_link_event_cap_and_link_ttl_follow_a_sighup(tmp_path: Path) -> None:
    """[tracking] link_events_per_hour 2 and link_ttl_days 30, then 5 and 2 by a
    SIGHUP: a link clicked 6 times after the reload records 5 clicks (it recorded 2,
    the cap read at start), and a link in mail sent after it expires in 2 days (it
    was good for 30: the workers started again by the reload kept the old lifetime)."""
    from fastsend.message import tracking as tr

    def tracking(cap: int, days: float) -> str:
        return (f'[tracking]\nsecret = "{SECRET}"\nlink_events_per_hour = {cap}\n'
                f"link_ttl_days = {days}\n")  # fmt: skip

    def send(marker: str) -> str:
        html = f'<html><body><a href="https://example.com/{marker}">x</a></body></html>'
        st, out = s.req("POST", "/v1/campaigns", {
            "template": {"from": "a@evil.example", "subject": marker, "html": html,
                         "tracking": {"clicks": True, "base_url": "https://t.example"}},
            "recipients": [{"email": "reader@example.org"}]})  # fmt: skip
        assert st == 201, out
        return _token(sink, marker.encode())

    def clicks(tok: str, url: str, n: int) -> int:
        """Clicks recorded of ``n`` on the link ``tok``."""
        for _ in range(n):
            st, _body = s.req("GET", f"/t/c/{tok}", tenant=None)
            assert st == 302, _body
        # A click on a new link (recorded: the cap is per link), after them in the log.
        mid = tr.open_token(SECRET.encode(), tok)[1][0]  # type: ignore[index]
        fence = f"https://example.com/fence-{time.monotonic_ns()}"
        st, _body = s.req("GET", "/t/c/" + tr.sign(SECRET.encode(), tr.CLICK, mid,
                          "reader@example.org", fence, tenant="evil"), tenant=None)  # fmt: skip
        assert st == 302, _body
        deadline = time.monotonic() + 60
        while not any(e.get("url") == fence for e in _events(s, "clicked")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return sum(e.get("url") == url for e in _events(s, "clicked"))

    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}", tracking(2, 30))
        try:
            before = send("ttl-before")
            assert clicks(before, "https://example.com/ttl-before", 3) == 2
            s.extra = tracking(5, 2)
            s.write_config()
            _hup(s)
            after = send("ttl-after")
            assert clicks(after, "https://example.com/ttl-after", 6) == 5
            in3days = time.time() + 3 * 86400
            assert tr.open_token(SECRET.encode(), before, now=in3days) is not None
            assert tr.open_token(SECRET.encode(), after, now=in3days) is None
            assert tr.open_token(SECRET.encode(), after, now=time.time() + 86400) is not None
        finally:
            s.stop()


REDACTED = """\
From: feedbackloop@fbl.example.net
To: fbl@bounces.example
Subject: Abuse Report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="R"

--R
Content-Type: text/plain

This is an email abuse report for an email message received from IP 127.0.0.1.

--R
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
Source-IP: 127.0.0.1

--R
Content-Type: text/rfc822-headers

From: <a@evil.example>
To: undisclosed-recipients:;
Subject: grouped-16
Message-ID: {mid}

--R--
"""


def test_a_redacted_complaint_about_grouped_mail_counts_to_its_campaign(tmp_path: Path) -> None:
    """Ten recipients at one domain get one transaction (its Message-ID names the
    group); the mailbox provider's loop sends a redacted complaint (no recipient)
    about it, twice: the campaign's complaint guardrail counts it once (1 of 10, over
    the 5 % set here) and pauses the campaign, the event names the campaign and its
    tenant, and no recipient is suppressed (the report names no one). It was an
    unverified event of no campaign: the guardrail never saw a complaint."""
    intake = free_port()
    extra = (f'[intake]\nlisten = "127.0.0.1:{intake}"\nverp_domain = "bounces.example"\n'
             'fbl_address = "fbl@bounces.example"\n'
             "[guardrails]\nmin_sample = 5\ncomplaint_rate = 0.05\n")  # fmt: skip
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}", extra)
        try:
            rcpts = [f"m{i}@example.org" for i in range(10)]
            st, got = s.req("POST", "/v1/campaigns", {
                "template": {"from": "a@evil.example", "subject": "grouped-16", "text": "same"},
                "recipients": [{"email": a} for a in rcpts]})  # fmt: skip
            assert st == 201, got
            cid = got["id"]
            data = sink_message(sink, b"grouped-16")
            deadline = time.monotonic() + 60
            m = re.search(rb"^Message-ID: (<[^>]+>)", data, re.M | re.I)
            assert m, data
            while True:  # every row delivered (the guardrail's sample)
                _, view = s.req("GET", f"/v1/campaigns/{cid}")
                if view["counts"].get("delivered") == 10:
                    break
                assert time.monotonic() < deadline, view
                time.sleep(0.05)
            report = REDACTED.format(mid=m.group(1).decode()).replace("\n", "\r\n")
            for _ in range(2):
                with smtplib.SMTP("127.0.0.1", intake, timeout=REPORT_REPLY_TIMEOUT) as c:
                    c.sendmail("", ["fbl@bounces.example"], report.encode())
            while True:
                _, view = s.req("GET", f"/v1/campaigns/{cid}")
                if view["status"] == "paused" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert view["status"] == "paused", view
            assert "complaint rate" in view["reason"] and "(1 of 10)" in view["reason"], view
            # An event after the reports' (the log is written in order, flushed later).
            assert s.req("POST", f"/v1/campaigns/{cid}/pause")[0] == 200
            while not any(e.get("source") == "api" for e in _events(s, "campaign_paused")):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            told = _events(s, "complained")
            assert len(told) == 1, told
            assert told[0]["campaign"] == cid and told[0]["tenant"] == "evil", told
            assert told[0]["suppressed"] is False and not told[0]["rcpt"], told
            st, supp = s.req("GET", "/v1/suppressions")
            assert st == 200 and supp["suppressions"] == [], supp
        finally:
            s.stop()


class _Counting:
    """Counts the campaigns a spool's ``campaigns()`` reads (the real spool's answer)."""

    def __init__(self, spool: object) -> None:
        self.inner = spool.campaigns  # type: ignore[attr-defined]
        self.calls = self.rows = 0

    def __call__(self, *args: object, **kw: object) -> list:
        got = self.inner(*args, **kw)
        self.calls += 1
        self.rows += len(got)
        return got


def test_new_inline_templates_do_not_search_every_campaign(tmp_path: Path) -> None:
    """Three batches of 100 messages, each with an inline template of its own (an
    order number written into the text): the tenant's campaigns are read once, not
    once per new template (300 searches of up to 300 campaigns); a template used
    again, after a restart too, goes to the campaign it had."""
    import asyncio

    from tests.test_serve_api import serving

    def batch(n: int) -> dict:
        return {"messages": [{"template": {"from": "a@example.com", "subject": "Order",
                                           "text": f"Your order {n}-{i}"},
                              "to": [f"r{i}@example.org"]} for i in range(100)]}  # fmt: skip

    async def main() -> None:
        async with serving(str(tmp_path / "spool")) as c:
            count = _Counting(c.ctx.spool)
            c.ctx.spool.campaigns = count  # type: ignore[method-assign]
            for n in range(3):
                st, got = await c.req("POST", "/v1/messages", batch(n))
                assert st == 202 and got["accepted"] == 100, got
            first = got["messages"][0]["ids"][0]
            assert count.calls <= 1, (count.calls, count.rows)
            cid = c.ctx.spool.owner(first)[0]
        async with serving(str(tmp_path / "spool")) as c:
            st, again = await c.req("POST", "/v1/messages", batch(2))
            assert st == 202, again
            assert c.ctx.spool.owner(again["messages"][0]["ids"][0])[0] == cid
            assert len({c.ctx.spool.owner(m["ids"][0])[0] for m in again["messages"]}) == 100

    asyncio.run(main())


def test_the_staging_sweep_reads_settled_campaigns_once(tmp_path: Path) -> None:
    """serve's 5-minute staging sweep: campaigns long past staging are read once,
    not at every sweep (it read every campaign of every tenant each time); a
    staging campaign made later is still found and abandoned."""
    from fastsend.accept import check_campaign
    from fastsend.message import Campaign
    from fastsend.serve.api_campaigns import sweep_staging
    from fastsend.spool import open_spool

    spool = open_spool(str(tmp_path / "spool"))
    try:
        spec = check_campaign(Campaign.from_dict(TPL))
        for _ in range(50):
            spool.create_campaign(spec, name="old", tenant="evil")
        later = time.time() + 2 * 3600
        count = _Counting(spool)
        spool.campaigns = count  # type: ignore[method-assign]
        n, after = sweep_staging(spool, 86400.0, later)
        assert n == 0 and count.rows == 50
        staged = spool.create_campaign(spec, name="staged", tenant="evil", status="staging",
                                       options={"staging": {"host": "elsewhere", "pid": 1}})  # fmt: skip
        n, after = sweep_staging(spool, 86400.0, later + 3601, after)
        assert n == 1 and count.rows == 51, count.rows  # read: the new one only
        assert spool.get_campaign(staged).status == "abandoned"  # type: ignore[union-attr]
    finally:
        spool.close()


def test_a_sighup_reaches_the_intake_and_the_submission_size(
    tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]
) -> None:
    """[intake] verp_domain b1.example -> b2.example and [submission] max_size 100000
    -> 5000 by a SIGHUP: the intake takes bounces at b2.example (550 before: the API
    already let campaigns use it) and submission advertises and holds SIZE 5000."""
    sub, intake = free_port(), free_port()

    def extra(verp: str, size: int) -> str:
        return (f'[submission]\nlisten = "127.0.0.1:{sub}"\ntls_cert = "{certs[0]}"\n'
                f'tls_key = "{certs[1]}"\nmax_size = {size}\n'
                f'[intake]\nlisten = "127.0.0.1:{intake}"\nverp_domain = "{verp}"\n'
                f'fbl_address = "fbl@{verp}"\n')  # fmt: skip

    def intake_takes(rcpt: str) -> int:
        with smtplib.SMTP("127.0.0.1", intake, timeout=10) as c:
            c.ehlo("mx.example.org")
            c.mail("")
            return c.rcpt(rcpt)[0]

    def submission_size() -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", sub, timeout=10) as c:
            c.starttls(context=certs[2])
            c.ehlo("app.example")
            c.login("evil", s.keys["evil"])
            size = int(c.esmtp_features["size"])
            msg = b"From: <a@evil.example>\r\nTo: <r@example.org>\r\nSubject: big\r\n\r\n"
            try:
                c.sendmail("a@evil.example", ["r@example.org"], msg + b"x" * 20_000 + b"\r\n")
                code = 250
            except smtplib.SMTPException as e:
                code = getattr(e, "smtp_code", 0) or 554
            return size, code

    s = Served(tmp_path, "127.0.0.1:9", extra("b1.example", 100_000),
               serve_args=("--no-workers",))  # fmt: skip
    try:
        assert intake_takes("b-1@b2.example") == 550
        assert submission_size() == (100_000, 250)
        s.extra = extra("b2.example", 5000)
        s.write_config()
        _hup(s)
        assert intake_takes("b-1@b2.example") == 250
        assert intake_takes("fbl@b2.example") == 250
        assert submission_size()[0] == 5000
        assert submission_size()[1] == 552
    finally:
        s.stop()


@pytest.mark.parametrize("name", ["x\x1b]0;owned\x07", "x\x1b[2J", "x\n     9  active     forged",
                                  "x\r", "x\x9b31m", "x\x7f", "x\u2028y", "txt.\u202eexe", "n" * 257])
def test_a_campaign_name_with_control_characters_is_a_400_and_never_reaches_the_operator(
    name: str, tmp_path: Path,
) -> None:
    """POST /v1/campaigns named with a terminal escape, CR, LF, a C1 control or DEL, or
    over 256 characters: a 400 naming ``name``, no campaign (it was made, and
    ``fastsend campaign list`` printed its name raw to the operator's terminal)."""
    import asyncio

    from tests.test_serve_api import serving

    async def main() -> None:
        async with serving(str(tmp_path / "spool")) as c:
            st, got = await c.req("POST", "/v1/campaigns", {"name": name, "template": {
                "from": "a@example.com", "subject": "s", "text": "t"}})  # fmt: skip
            assert st == 400 and got["error"]["field"] == "name", got
            st, listed = await c.req("GET", "/v1/campaigns")
            assert listed["campaigns"] == [], listed
            st, ok = await c.req("POST", "/v1/campaigns", {"name": "Spring sale – ünïcode", "template": {
                "from": "a@example.com", "subject": "s", "text": "t"}})  # fmt: skip
            assert st == 201, ok

    asyncio.run(main())


def test_mail_after_its_campaign_was_cancelled_is_sent_not_black_holed(tmp_path: Path) -> None:
    """The tenant cancels the campaign its plain messages go to (the transactional
    one) and an inline template's: the next messages go to a new campaign, active
    (they went into the cancelled one, queued forever behind a 202); a template
    named by the id of a cancelled campaign is a 409."""
    import asyncio

    from tests.test_serve_api import serving

    plain = {"from": "a@example.com", "to": ["p@example.org"], "subject": "s", "text": "t"}
    tpl = {"template": {"from": "a@example.com", "subject": "Hi {{ n }}", "text": "t"},
           "to": ["t@example.org"], "variables": {"n": "1"}}  # fmt: skip

    async def main() -> None:
        async with serving(str(tmp_path / "spool")) as c:
            async def campaign_of(body: dict) -> int:
                st, got = await c.req("POST", "/v1/messages", body)
                assert st == 202, got
                st, m = await c.req("GET", f"/v1/messages/{got['messages'][0]['ids'][0]}")
                return int(m["campaign"])

            for body in (plain, tpl):
                first = await campaign_of(body)
                st, view = await c.req("POST", f"/v1/campaigns/{first}/cancel")
                assert st == 200 and view["status"] == "cancelled", view
                then = await campaign_of(body)
                assert then != first
                st, view = await c.req("GET", f"/v1/campaigns/{then}")
                assert view["status"] == "active" and view["counts"]["queued"] == 1, view
                assert await campaign_of(body) == then  # kept while it takes mail
            st, got = await c.req("POST", "/v1/messages", {**tpl, "template": first})
            assert st == 409 and "cancelled" in got["error"]["message"], got

    asyncio.run(main())


def test_the_public_listener_takes_the_proxy_protocol_from_the_balancer(tmp_path: Path) -> None:
    """[api] public_listen with [proxy] trusted = the balancer (127.0.0.9): a click
    arriving behind a PROXY v1 header is redirected (it was a 400: the header was
    read as the request line); a direct connection from elsewhere still works."""
    import socket

    from fastsend.message import tracking as tr

    pub = free_port()
    s = Served(tmp_path, "127.0.0.1:9", f'[tracking]\nsecret = "{SECRET}"\n'
               '[proxy]\ntrusted = ["127.0.0.9"]\n', api=f'public_listen = "127.0.0.1:{pub}"',
               serve_args=("--no-workers",))  # fmt: skip
    try:
        tok = tr.sign(SECRET.encode(), tr.CLICK, "1", "r@example.org", "https://example.com/p",
                      tenant="evil")  # fmt: skip
        ask = f"GET /t/c/{tok} HTTP/1.1\r\nHost: t.example\r\nConnection: close\r\n\r\n"

        def answer(source: str, head: str) -> bytes:
            with socket.create_connection(("127.0.0.1", pub), timeout=10,
                                          source_address=(source, 0)) as c:  # fmt: skip
                c.sendall((head + ask).encode())
                got = b""
                while chunk := c.recv(65536):
                    got += chunk
            return got.partition(b"\r\n")[0]

        assert answer("127.0.0.9", "PROXY TCP4 198.51.100.7 127.0.0.1 5555 443\r\n") == (
            b"HTTP/1.1 302 Found"
        )
        assert answer("127.0.0.1", "") == b"HTTP/1.1 302 Found"
    finally:
        s.stop()
