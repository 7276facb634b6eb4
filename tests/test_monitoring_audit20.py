"""Monitoring, analytics, tracking and webhooks audit, session 20.

Real parts: the event log on a device that is always full (``/dev/full``: every
write is ENOSPC), a ServeContext on a temporary spool, the aiohttp tracking app
served on loopback and an aiohttp client.
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
from collections.abc import Callable
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


# ---------------------------------------------------------------- per-tenant webhooks
TENANT_SECRETS = {"acme": "acme-hook-secret-0123456789", "evil": "evil-hook-secret-9876543210"}
OPERATOR_SECRET = "operator-hook-secret-000000"


def test_a_tenants_webhook_gets_its_own_events_only_signed_with_its_secret(
    tmp_path: Path,
) -> None:
    """``[tenants.NAME] webhook_urls`` (new: every URL got every tenant's events, signed
    with the operator's one secret, so a tenant's receiver would have read the other
    tenants' recipients and could forge the operator's batches): each tenant's URL
    gets the events of its campaigns (the campaign's owner decides, not a field of
    the event), and an open of a message no longer in the spool by the tenant it
    names; node events (blocklists) and other tenants' never; signed with that
    tenant's secret. The operator's URL still gets everything."""
    from tests.test_serve_webhooks import Receiver

    from fastsend.serve.webhooks import WebhookDispatcher

    async def main() -> None:
        rx = {n: Receiver(s) for n, s in (*TENANT_SECRETS.items(), ("op", OPERATOR_SECRET))}
        urls = {n: await r.start() for n, r in rx.items()}
        cfg = from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "webhooks": {"urls": [urls["op"]], "secret": OPERATOR_SECRET, "batch_size": 4,
                         "retry_min": 0.02, "retry_max": 0.1, "flush_interval": 0.01,
                         "allow_private": ["127.0.0.0/8"]},
            "tenants": {n: {"domains": [f"{n}.example"], "webhook_urls": [urls[n]],
                            "webhook_secret": s} for n, s in TENANT_SECRETS.items()},
        })  # fmt: skip
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            camp = {n: ctx.tenant_campaign(n) for n in ("acme", "evil")}
            for i in range(12):  # interleaved: every batch holds both tenants' events
                n = ("acme", "evil")[i % 2]
                ctx.emit({"event": "accepted", "id": i, "campaign": camp[n], "tenant": n,
                          "rcpt": f"{n}{i}@example.org"})  # fmt: skip
                ctx.emit({"event": "delivered", "id": i, "campaign": camp[n],
                          "rcpt": f"{n}{i}@example.org", "code": 250})  # fmt: skip
            ctx.emit({"event": "ip_listed", "source_ip": "127.0.0.2", "zone": "bl.example"})
            ctx.emit({"event": "opened", "id": 999, "campaign": None, "tenant": "evil",
                      "rcpt": "gone@example.org"})  # fmt: skip
            ctx.emit({"event": "clicked", "id": 5, "campaign": camp["evil"], "tenant": "acme",
                      "rcpt": "evil5@example.org"})  # fmt: skip  (the campaign's owner wins)
            await _until(lambda: len(rx["op"].events) == 27 and len(rx["evil"].events) == 14
                         and len(rx["acme"].events) == 12)  # fmt: skip
            await asyncio.sleep(0.2)  # (nothing more arrives)
            for n in ("acme", "evil"):
                got = rx[n].events
                assert all(e["rcpt"].startswith(n) or e["rcpt"] == "gone@example.org"
                           for e in got), got  # fmt: skip
                assert rx[n].bad_signatures == 0
                ids = [e["event_id"] for e in got]
                assert ids == sorted(set(ids))
            assert [e["rcpt"] for e in rx["evil"].events][-2:] == [
                "gone@example.org", "evil5@example.org"]
            assert "ip_listed" in [e["event"] for e in rx["op"].events]
            assert rx["op"].bad_signatures == 0
            # A tenant's receiver cannot check the operator's batches, nor another's.
            wrong = Receiver(TENANT_SECRETS["acme"])
            assert wrong.secret != rx["op"].secret != rx["evil"].secret
            assert d.outbox is not None
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 0)
        finally:
            await d.stop()
            ctx.close()
            for r in rx.values():
                await r.close()

    asyncio.run(main())


def test_tenant_webhook_settings_are_checked_at_load(tmp_path: Path) -> None:
    """A tenant URL with no or a short secret, a secret shared with the operator or
    another tenant (the one receiver could forge the other's), a URL that is also the
    operator's or another tenant's, a URL that is not http(s): refused at load; the
    secret is never in the config's repr; a secret file is read like [webhooks]'."""
    from fastsend.config import ConfigError, load

    def cfg(hooks: str, tenants: str) -> Path:
        p = tmp_path / "fastsend.toml"
        p.write_text(f'[spool]\ndir = "spool"\n{hooks}\n{tenants}')
        return p

    op = '[webhooks]\nurls = ["https://ops.example/h"]\nsecret = "operator-secret-0123456789"\n'

    def tenant(name: str, urls: str, secret: str = "") -> str:
        line = f'webhook_secret = "{secret}"\n' if secret else ""
        return f'[tenants.{name}]\ndomains = ["{name}.example"]\nwebhook_urls = {urls}\n{line}'

    good = tenant("acme", '["https://acme.example/h"]', "acme-secret-0123456789")
    loaded = load(str(cfg(op, good)))
    assert loaded.tenants is not None
    assert "acme-secret" not in repr(loaded.tenants["acme"])
    for bad, why in (
        (tenant("acme", '["https://acme.example/h"]'), "16+ characters"),
        (tenant("acme", '["https://acme.example/h"]', "short"), "16+ characters"),
        (tenant("acme", '["https://acme.example/h"]', "operator-secret-0123456789"),
         "another receiver's"),
        (good + tenant("beta", '["https://b.example/h"]', "acme-secret-0123456789"),
         "another receiver's"),
        (tenant("acme", '["https://ops.example/h"]', "acme-secret-0123456789"),
         "also [webhooks] urls's"),
        (good + tenant("beta", '["https://acme.example/h"]', "beta-secret-0123456789"),
         "also [tenants.acme] webhook_urls's"),
        (tenant("acme", '["ftp://acme.example/h"]', "acme-secret-0123456789"),
         "not an http(s) URL"),
    ):
        with pytest.raises(ConfigError, match=re.escape(why)):
            load(str(cfg(op, bad)))
    secret = tmp_path / "acme.key"
    secret.write_text("acme-file-secret-0123456789\n")
    got = load(str(cfg(op, tenant("acme", '["https://acme.example/h"]')
                       + 'webhook_secret_file = "acme.key"\n')))  # fmt: skip
    assert got.tenants is not None
    assert got.tenants["acme"].webhook_secret == "acme-file-secret-0123456789"


async def _until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_serve_posts_each_tenants_events_to_its_own_url_and_a_sighup_rotates_it(
    tmp_path: Path,
) -> None:
    """``fastsend serve`` with [tenants.acme] and [tenants.evil] webhook_urls: mail
    each tenant posts through the API reaches its own receiver only, signed with its
    secret; a SIGHUP with acme's secret rotated signs acme's next batch with the new one."""
    import signal

    from tests._serve_helpers import Served
    from tests.test_monitoring_audit17 import _Hook

    hooks = {"acme": _Hook(), "evil": _Hook()}
    secrets = {"acme": "acme-secret-0123456789", "evil": "evil-secret-0123456789"}

    def extra(acme_secret: str) -> str:
        out = ('[webhooks]\nflush_interval = 0.05\nevents = ["accepted"]\n'
               'allow_private = ["127.0.0.0/8"]\n')
        for n in ("acme", "evil"):
            sec = acme_secret if n == "acme" else secrets[n]
            out += (f'[tenants.{n}]\ndomains = ["{n}.example"]\n'
                    f'webhook_urls = ["{hooks[n].url}"]\nwebhook_secret = "{sec}"\n')  # fmt: skip
        return out

    def post(tenant: str, rcpt: str) -> int:
        st, body = s.req("POST", "/v1/messages", {"from": f"a@{tenant}.example", "subject": "s",
                                                   "text": "t", "to": [rcpt]},
                         tenant=tenant)  # fmt: skip
        assert st == 202, body
        return int(body["messages"][0]["ids"][0])

    def wait(cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    s = Served(tmp_path, None, extra(secrets["acme"]), serve_args=("--no-workers",))
    try:
        a1 = post("acme", "x@example.org")
        e1 = post("evil", "y@example.org")
        a2 = post("acme", "z@example.org")
        wait(lambda: len(hooks["acme"].events(secrets["acme"])) == 2
             and len(hooks["evil"].events(secrets["evil"])) == 1)  # fmt: skip
        assert [e["id"] for e in hooks["acme"].events(secrets["acme"])] == [a1, a2]
        assert [e["id"] for e in hooks["evil"].events(secrets["evil"])] == [e1]
        assert hooks["acme"].events(secrets["evil"]) == []  # never signed with another's
        rotated = "acme-rotated-9876543210"
        s.extra = extra(rotated)
        s.write_config()
        s.proc.send_signal(signal.SIGHUP)
        s.wait_line("configuration reloaded")
        a3 = post("acme", "w@example.org")
        wait(lambda: [e["id"] for e in hooks["acme"].events(rotated)] == [a3])
        assert [e["id"] for e in hooks["evil"].events(secrets["evil"])] == [e1]
    finally:
        s.stop()
        for h in hooks.values():
            h.close()


def test_a_tenant_url_stepping_past_other_tenants_events_gives_the_loop_up(
    tmp_path: Path,
) -> None:
    """A tenant's URL whose outbox holds a long run of other tenants' events steps its
    cursor past them a batch at a time without a POST: with no await between those
    batches, serve's one loop (API, tracking, supervisor) waited for the whole run.
    Each batch skipped now gives the loop up (another task runs between two)."""
    from fastsend.serve.webhooks import WebhookDispatcher

    async def main() -> None:
        cfg = from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "webhooks": {"batch_size": 5, "flush_interval": 0.01, "retry_min": 0.02,
                         "allow_private": ["127.0.0.0/8"]},
            "tenants": {"acme": {"domains": ["acme.example"],
                                 "webhook_urls": ["http://127.0.0.1:9/hook"],
                                 "webhook_secret": TENANT_SECRETS["acme"]},
                        "evil": {"domains": ["evil.example"]}},
        })  # fmt: skip
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        turns = 0
        seen: list[int] = []  # the other task's turns at each batch skipped

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        try:
            assert d.outbox is not None
            ack = d.outbox.ack

            def counted(url: str, last: int) -> None:
                seen.append(turns)
                ack(url, last)

            d.outbox.ack = counted  # type: ignore[method-assign]
            camp = ctx.tenant_campaign("evil")
            for i in range(200):
                ctx.emit({"event": "accepted", "id": i, "campaign": camp, "rcpt": f"e{i}@x.org"})
            ticker = asyncio.create_task(other())
            await _until(lambda: len(seen) >= 30)
            ticker.cancel()
            assert len(set(seen)) >= len(seen) - 2, seen  # the other task ran between them
        finally:
            await d.stop()
            ctx.close()

    asyncio.run(main())
