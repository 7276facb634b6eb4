"""Why a campaign has its status (aud15r): a guardrail's pause says why in the
``campaign_paused`` event, and the reason is also written on the campaign with
the status, so it is still there after a restart (``fastsend campaign list``,
``GET /v1/campaigns/ID``, the dashboard). Real SQLite files and redis-server."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from tests._engine_helpers import run_fastsend

from fastsend.shaping.guardrails import Guardrails, GuardrailSettings
from fastsend.spool import BOUNCED, DELIVERED, Claimed


def _claimed(cid: int) -> Claimed:
    return Claimed(1, cid, "x@example.com", "example.com", b"{}", 0, 0.0)


def test_a_guardrail_pause_keeps_its_reason_after_a_restart(
    make_spool: Callable[[], Any],
) -> None:
    spool = make_spool()
    cid = spool.create_campaign({"from": "a@sender.example.com"}, tenant="acme")
    other = spool.create_campaign({"from": "a@sender.example.com"}, tenant="acme")
    events: list[dict[str, Any]] = []
    g = Guardrails(spool, GuardrailSettings(bounce_rate=0.1, min_sample=20), events.append)
    for i in range(20):
        g.on_result(_claimed(cid), None, BOUNCED if i % 4 == 3 else DELIVERED)
    assert [e["event"] for e in events] == ["campaign_paused"]
    spool.close()

    spool = make_spool()  # the process that paused it is gone
    info = spool.get_campaign(cid)
    assert info.status == "paused"
    assert info.reason == f"guardrail: {events[0]['reason']}", info.reason
    assert "bounce rate 25.0%" in info.reason
    assert [c.reason for c in spool.campaigns("acme")] == [info.reason, ""]
    assert [c.reason for c in spool.list_campaigns()] == [info.reason, ""]
    assert spool.get_campaign(other).reason == ""
    spool.set_campaign_status(cid, "active")  # resumed: the reason is past
    assert spool.get_campaign(cid).reason == ""
    spool.set_campaign_status(cid, "paused", "by hand")
    assert (spool.get_campaign(cid).status, spool.get_campaign(cid).reason) == ("paused", "by hand")
    spool.close()


def test_campaign_list_prints_why_a_guardrail_paused_it(tmp_path: Path) -> None:
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(tmp_path / "spool"))
    cid = spool.create_campaign({"from": "a@sender.example.com"}, name="spring")
    g = Guardrails(spool, GuardrailSettings(bounce_rate=0.1, min_sample=20), lambda e: None)
    for i in range(20):
        g.on_result(_claimed(cid), None, BOUNCED if i % 2 else DELIVERED)
    spool.close()
    out = run_fastsend("campaign", "list", "--spool", str(tmp_path / "spool"))
    assert out.returncode == 0, out.stderr
    assert "paused: guardrail: bounce rate 50.0% (10 of 20)" in out.stdout, out.stdout
    listed = orjson.loads(
        run_fastsend("campaign", "list", "--spool", str(tmp_path / "spool"), "--json").stdout
    )
    assert listed[0]["reason"].startswith("guardrail: bounce rate 50.0%")
    out = run_fastsend("queue", "--spool", str(tmp_path / "spool"))
    assert "campaign 1 'spring' [paused]" in out.stdout, out.stdout
    assert "paused: guardrail: bounce rate 50.0%" in out.stdout, out.stdout


def test_a_spool_made_before_campaign_reasons_opens(tmp_path: Path) -> None:
    """A spool written by an older fastsend (no ``reason`` column): a read-only view
    reads '' for it; a writable open adds the column."""
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(tmp_path))
    cid = spool.create_campaign({"from": "a@sender.example.com"})
    spool.close()
    if sqlite3.sqlite_version_info < (3, 35):  # DROP COLUMN
        print("old SQLite: cannot make an old spool", file=sys.stderr)
        return
    db = sqlite3.connect(tmp_path / "spool.db")
    db.execute("ALTER TABLE campaigns DROP COLUMN reason")
    db.commit()
    db.close()
    ro = SQLiteSpool(str(tmp_path), readonly=True)
    assert ro.get_campaign(cid).reason == "" and ro.get_campaign(cid).status == "active"
    ro.close()
    rw = SQLiteSpool(str(tmp_path))
    rw.set_campaign_status(cid, "paused", "why")
    assert rw.get_campaign(cid).reason == "why"
    rw.close()
