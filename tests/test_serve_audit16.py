"""Session 16's outside audit of ``fastsend serve`` (what session 15's audit left):

- ``POST /v1/campaigns`` under an Idempotency-Key whose request failed after its
  first part told "accepted" for rows of a campaign that was never shown and, never
  retried, ends abandoned (their webhooks and stats counted mail never sent); the
  campaign stayed staging (hidden, unsent) for the key's whole 24 h;
- ``[tracking] link_events_per_hour`` (and ``link_ttl_days``) changed by a SIGHUP
  kept the value read at start;
- a redacted complaint (RFC 6590: the reporter removed the recipient) about mail
  sent to several recipients in one transaction (its Message-ID names the group)
  counted toward nothing: its campaign's complaint guardrail never saw it.
"""

from __future__ import annotations

import re
import signal
import smtplib
import time
from pathlib import Path

import orjson
import pytest
from tests._serve_helpers import Served, sink_message
from tests.conftest import free_port

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
        return sweep_staging(spool, 86400.0, time.time() + ahead)
    finally:
        spool.close()


@pytest.fixture
def failing_after_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Served:
    """A serve (no workers) whose keyed requests fail once their first part is spooled."""
    monkeypatch.setenv("FASTSEND_TEST_FAULT", "idem-fail-after-part:0")
    s = Served(tmp_path, "127.0.0.1:9", serve_args=("--no-workers",))
    monkeypatch.delenv("FASTSEND_TEST_FAULT")
    return s


def test_a_keyed_create_that_failed_tells_nothing_until_its_retry_completes_it(
    failing_after_part: Served,
) -> None:
    """A keyed POST /v1/campaigns failing after its first part (a 500): no
    "accepted" event for its rows (it told 3, for a campaign nobody saw); the retry
    completes it and each row is told once."""
    s = failing_after_part
    body = {"template": TPL, "recipients": [{"email": f"r{i}@example.org", "name": "R"}
                                            for i in range(3)]}  # fmt: skip
    key = {"Idempotency-Key": "k-events"}
    try:
        st, got = s.req("POST", "/v1/campaigns", body, headers=key)
        assert st == 500, got
        assert _campaign(s, 1).status == "staging"  # type: ignore[attr-defined]
        assert _events(s, "accepted") == []
        st, got = s.req("POST", "/v1/campaigns", body, headers=key)
        assert st == 201 and got["accepted"] == 3, got
        told = sorted(e["rcpt"] for e in _events(s, "accepted"))
        assert told == [f"r{i}@example.org" for i in range(3)], told
        st, view = s.req("GET", f"/v1/campaigns/{got['id']}")
        assert st == 200 and view["total"] == 3 and view["status"] == "active", view
    finally:
        s.stop()


def test_a_keyed_create_never_retried_is_abandoned_within_the_hour_and_a_late_retry_is_whole(
    failing_after_part: Served,
) -> None:
    """The same failed keyed create, never retried: an hour later serve's sweep
    abandons it (it waited for the key's 24 h, hidden and unsent); a retry after
    that (same key, within its 24 h) makes the campaign whole again rather than
    answering from the abandoned rows."""
    s = failing_after_part
    body = {"template": TPL, "recipients": [{"email": f"r{i}@example.org", "name": "R"}
                                            for i in range(3)]}  # fmt: skip
    key = {"Idempotency-Key": "k-late"}
    try:
        st, got = s.req("POST", "/v1/campaigns", body, headers=key)
        assert st == 500, got
        assert _sweep(s, 60) == 0  # a retry soon continues it
        assert _sweep(s, 3601) == 1
        assert _campaign(s, 1).status == "abandoned"  # type: ignore[attr-defined]
        st, got = s.req("POST", "/v1/campaigns", body, headers=key)
        assert st == 201 and got["accepted"] == 3 and got["id"] != 1, got
        st, view = s.req("GET", f"/v1/campaigns/{got['id']}")
        assert st == 200 and view["total"] == 3 and view["counts"]["queued"] == 3, view
        st, listed = s.req("GET", "/v1/campaigns")
        assert [c["id"] for c in listed["campaigns"]] == [got["id"]], listed
        assert _events(s, "accepted") and {e["campaign"] for e in _events(s, "accepted")} == {
            got["id"]
        }
        st, again = s.req("POST", "/v1/campaigns", body, headers=key)  # replayed
        assert st == 201 and again["id"] == got["id"], again
    finally:
        s.stop()


def _hup(s: Served, want: str = "configuration reloaded", timeout: float = 20.0) -> None:
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
        deadline = time.monotonic() + 10
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
            deadline = time.monotonic() + 20
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
                with smtplib.SMTP("127.0.0.1", intake, timeout=10) as c:
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
