"""Monitoring, analytics, tracking and webhooks audit, session 20.

Real parts: the event log on a device that is always full (``/dev/full``: every
write is ENOSPC), a ServeContext on a temporary spool, the aiohttp tracking app
served on loopback and an aiohttp client.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from fastsend.config import from_dict
from fastsend.message import tracking as tr
from fastsend.serve.context import open_context
from fastsend.serve.tracking import PIXEL_GIF, setup_tracking

SECRET = b"k" * 32


def test_opens_and_clicks_while_the_event_log_cannot_be_written_are_capped(
    tmp_path: Path,
) -> None:
    """The event log's disk full: every open and click waited in memory for it (the
    log's buffer, and each listener's rows) for as long as the disk stayed full; a
    campaign's opens grew serve without bound. Now at most ``[tracking] held_events``
    (and ``held_bytes`` of their lines) wait; more are answered as always, dropped
    and counted (/metrics), and once the log is written again they are kept again."""
    from fastsend.serve.metrics import Metrics

    async def main() -> None:
        cfg = from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "events": {"log": "/dev/full"},
            "tracking": {"held_events": 10, "held_bytes": 1 << 20, "link_events_per_hour": 0},
        })  # fmt: skip
        ctx = open_context(cfg)
        ctx.secret = SECRET
        seen: list[dict[str, Any]] = []
        ctx.events.listeners.append(seen.extend)
        metrics = Metrics(ctx)
        app = web.Application()
        setup_tracking(app, ctx)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        base = str(server.make_url("")).rstrip("/")
        try:
            cid = ctx.tenant_campaign("acme")
            (mid,) = ctx.inject(cid, [("ann@example.org", "example.org", b'{"raw":""}')])
            with pytest.raises(OSError) as e:
                ctx.events.flush()  # the accepted event: the disk is full
            assert e.value.errno == errno.ENOSPC and ctx.events.failing
            seen.clear()
            async with ClientSession() as http:
                for i in range(40):
                    o = tr.sign(SECRET, tr.OPEN, str(mid), f"r{i}@example.org", tenant="acme")
                    async with http.get(f"{base}/t/o/{o}.gif") as resp:
                        assert resp.status == 200 and await resp.read() == PIXEL_GIF
                    c = tr.sign(SECRET, tr.CLICK, str(mid), f"r{i}@example.org",
                                "https://example.com/x", tenant="acme")  # fmt: skip
                    async with http.get(f"{base}/t/c/{c}", allow_redirects=False) as resp:
                        assert resp.status == 302
                assert len(seen) == 10, len(seen)  # told to the listeners, kept for the log
                assert ctx.events.dropped == 70
                text = metrics.render()
                assert "\nfastsend_tracking_events_dropped_total 70\n" in text
                assert "# TYPE fastsend_tracking_events_dropped_total counter" in text
                # The log written again (its buffer taken): opens are kept again.
                ctx.events._buf.clear()
                ctx.events.failing = False
                seen.clear()
                o = tr.sign(SECRET, tr.OPEN, str(mid), "new@example.org", tenant="acme")
                async with http.get(f"{base}/t/o/{o}.gif") as resp:
                    assert resp.status == 200
                assert [e["event"] for e in seen] == ["opened"]
        finally:
            await server.close()
            ctx.events._buf.clear()
            ctx.events._fd, fd = -1, ctx.events._fd
            import os

            os.close(fd)
            ctx.close()

    asyncio.run(main())


def test_held_bytes_cap_the_opens_kept_for_a_failing_log() -> None:
    """The bytes cap holds alone: long User-Agents (512 characters each, as kept)
    reach ``held_bytes`` long before ``held_events``."""
    from fastsend.events import EventLog

    log = EventLog("/dev/full")
    try:
        log.emit({"event": "accepted", "id": 1})
        with pytest.raises(OSError):
            log.flush()
        kept = [log.emit_optional({"event": "opened", "id": 1, "user_agent": "u" * 512},
                                  1000, 4096) for _ in range(50)]  # fmt: skip
        assert 0 < kept.count(True) <= 8 and not any(kept[kept.count(True):])
        assert log.dropped == 50 - kept.count(True)
        assert sum(map(len, log._buf)) < 4096 + 1024  # (the accepted line, then the opens)
    finally:
        log._buf.clear()
        log.close()


def test_security_scanners_fetching_the_pixel_are_machine_opens() -> None:
    """Security gateways fetch a message's images (its pixel) as they fetch its links,
    from HTTP libraries, headless browsers or under their vendor's name: those opens
    counted as human-likely (only clicks had the scanner rule), so a campaign to
    scanned mailboxes showed near-100% opens. Mail clients and the mailbox
    providers' image proxies (fetching when the reader opens) stay human-likely."""
    from fastsend.analytics.machine import load_machine_rules

    m = load_machine_rules()
    for ua in ("python-requests/2.31.0", "curl/8.1.2", "Go-http-client/1.1", "okhttp/4.9.2",
               "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
               " HeadlessChrome/120.0.0.0 Safari/537.36",
               "Barracuda Sentinel (EE)", "Mozilla/5.0 (compatible; Proofpoint URL Defense)",
               "Mimecast-Scanner/1.0", "Java/1.8.0_281", "Wget/1.21.4",
               "Mozilla/5.0 (compatible; SomeBot/1.0; +https://bot.example/)"):  # fmt: skip
        assert m.classify("open", ua) == "scanner-agent", ua
    for ua in (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
        "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
        "Mozilla/4.0 (compatible; ms-office; MSOffice 16)",  # Outlook for Windows
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15"
        " (KHTML, like Gecko) Mobile/15E148",
        "Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/120.0 Mobile Safari/537.36",
    ):
        assert m.classify("open", ua) == "", ua
    assert m.classify("open", "Mozilla/5.0") == "apple-mpp"  # (the earlier rule names it)
