"""Session 26's outside audit of tracking (sub26): each test on a defect it found,
failing before its fix.

- A message leaves the spool [spool] final_retention_days after it is final (the
  tenant's transactional mail soonest); its links live [tracking] link_ttl_days.
  An open or click of such a message lost its campaign: an old-format link (no
  tenant inside) was recorded as tenant "default"'s, and a current one had no
  campaign, so GET /v1/events (the tenant's campaigns' events), the campaign's
  stats and webhooks filtered by campaign never saw it. The message's own events
  in the per-message index ([analytics] events_days) name both.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import ClientSession

from fastsend.message import tracking as tr
from test_hostile_tenant import legacy_token
from test_serve_tracking import SECRET, _message, _run, _served


def test_a_click_of_mail_gone_from_the_spool_keeps_its_campaign_and_tenant(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with _served(tmp_path) as (ctx, base, events), ClientSession() as http:
            index = ctx.event_index()  # (as serve's API attaches it)
            index.attach(ctx.events, 0)
            ctx.acceptor.index = index
            mid = _message(ctx, "acme")
            cid = ctx.tenant_campaign("acme")
            ctx.events.flush()
            db = getattr(ctx.spool, "db", None) or ctx.spool.inner.db
            db.execute("DELETE FROM messages WHERE id=?", (mid,))  # (pruned: retention)
            assert ctx.spool.owner(mid) is None
            del events[:]
            url = "https://example.com/a"
            old = legacy_token(SECRET, "c", str(mid), "ann@example.org", url)
            new = tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", url, tenant="acme")
            for token in (old, new):
                async with http.get(f"{base}/t/c/{token}", allow_redirects=False) as resp:
                    assert resp.status == 302
            # Another tenant's name on it is still refused (the index says whose it is).
            evil = tr.sign(SECRET, tr.CLICK, str(mid), "ann@example.org", url, tenant="evil")
            async with http.get(f"{base}/t/c/{evil}", allow_redirects=False) as resp:
                assert resp.status == 404
            ctx.events.flush()
            got = [(e["event"], e["tenant"], e["campaign"]) for e in events]
            # (before: ("clicked", "default", None), ("clicked", "acme", None))
            assert got == [("clicked", "acme", cid), ("clicked", "acme", cid)], got
            index.close()

    _run(main())
