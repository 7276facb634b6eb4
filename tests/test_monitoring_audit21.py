"""Monitoring, analytics, tracking and webhooks audit, session 21.

Real parts: a ServeContext on a temporary spool, the webhook dispatcher POSTing to
aiohttp receivers on loopback (and to a closed port), /metrics through
prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastsend.config import from_dict
from fastsend.serve.context import open_context

TENANT_SECRETS = {"acme": "acme-hook-secret-0123456789", "evil": "evil-hook-secret-9876543210"}
OPERATOR_SECRET = "operator-hook-secret-000000"
DEAD = "http://127.0.0.1:9/hook"  # the discard port: nothing listens (refused at once)


async def _until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def _emit_mail(ctx: Any, camp: dict[str, int], n: int) -> None:
    """``n`` messages per tenant, interleaved: accepted, delivered, then every third
    bounced and every fourth clicked."""
    for i in range(n):
        for t in ("acme", "evil"):
            rcpt = f"{t}{i}@example.org"
            ctx.emit({"event": "accepted", "id": i, "campaign": camp[t], "rcpt": rcpt})
            ctx.emit({"event": "delivered", "id": i, "campaign": camp[t], "rcpt": rcpt})
            if i % 3 == 0:
                ctx.emit({"event": "bounced", "id": i, "campaign": camp[t], "rcpt": rcpt})
            if i % 4 == 0:
                ctx.emit({"event": "clicked", "id": i, "campaign": camp[t], "rcpt": rcpt,
                          "url": "https://example.com/"})  # fmt: skip


def test_each_tenant_chooses_the_events_its_webhook_urls_get(tmp_path: Path) -> None:
    """``[tenants.NAME] webhook_events`` (new: a tenant's URL got every event type the
    operator's ``[webhooks] events`` let through, so a tenant wanting only bounces
    and clicks took every accepted and delivered event too, and one wanting clicks
    got none when the operator's filter left them out): each tenant's URLs get the
    types it names, of its own mail; unset, [webhooks] events as before. The
    operator's URL still gets only what [webhooks] events names, though the outbox
    now keeps what any URL wants."""
    from tests.test_serve_webhooks import Receiver

    from fastsend.serve.webhooks import WebhookDispatcher

    async def main() -> None:
        rx = {n: Receiver(s) for n, s in (*TENANT_SECRETS.items(), ("op", OPERATOR_SECRET))}
        urls = {n: await r.start() for n, r in rx.items()}
        cfg = from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "webhooks": {"urls": [urls["op"]], "secret": OPERATOR_SECRET, "batch_size": 5,
                         "events": ["delivered", "bounced"], "retry_min": 0.02,
                         "retry_max": 0.1, "flush_interval": 0.01},
            "tenants": {
                "acme": {"domains": ["acme.example"], "webhook_urls": [urls["acme"]],
                         "webhook_secret": TENANT_SECRETS["acme"],
                         "webhook_events": ["bounced", "clicked"]},
                "evil": {"domains": ["evil.example"], "webhook_urls": [urls["evil"]],
                         "webhook_secret": TENANT_SECRETS["evil"]},
            },
        })  # fmt: skip
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            camp = {n: ctx.tenant_campaign(n) for n in ("acme", "evil")}
            _emit_mail(ctx, camp, 12)  # per tenant: 12 delivered, 4 bounced, 3 clicked
            await _until(lambda: len(rx["acme"].events) >= 7 and len(rx["evil"].events) >= 16
                         and len(rx["op"].events) >= 32)  # fmt: skip
            assert d.outbox is not None
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 0)

            def kinds(n: str) -> dict[str, int]:
                out: dict[str, int] = {}
                for e in rx[n].events:
                    out[e["event"]] = out.get(e["event"], 0) + 1
                return out

            assert kinds("acme") == {"bounced": 4, "clicked": 3}
            assert all(e["rcpt"].startswith("acme") for e in rx["acme"].events)
            assert kinds("evil") == {"delivered": 12, "bounced": 4}  # [webhooks] events
            assert all(e["rcpt"].startswith("evil") for e in rx["evil"].events)
            assert kinds("op") == {"delivered": 24, "bounced": 8}  # never the clicks
            for r in rx.values():
                assert r.bad_signatures == 0
                ids = [e["event_id"] for e in r.events]
                assert ids == sorted(set(ids))
        finally:
            await d.stop()
            ctx.close()
            for r in rx.values():
                await r.close()

    asyncio.run(main())


def test_tenant_webhook_events_are_checked_at_load(tmp_path: Path) -> None:
    """A typo in ``webhook_events`` subscribes to nothing: refused at load, naming
    the tenant and the known events, as [webhooks] events."""
    from fastsend.config import ConfigError, load

    p = tmp_path / "fastsend.toml"
    p.write_text('[spool]\ndir = "spool"\n[tenants.acme]\ndomains = ["acme.example"]\n'
                 'webhook_urls = ["https://acme.example/h"]\n'
                 'webhook_secret = "acme-secret-0123456789"\n'
                 'webhook_events = ["bounce"]\n')  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape("unknown event 'bounce'")):
        load(str(p))


def _pending(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "fastsend_webhook_pending":
            for s in fam.samples:
                out[s.labels["url"]] = s.value
    return out


def test_a_tenant_urls_pending_counts_only_the_events_it_will_get(tmp_path: Path) -> None:
    """``fastsend_webhook_pending`` of a tenant's URL counted every event past its
    cursor, the other tenants' (and the types it does not take) included: a tenant's
    receiver down showed 44 pending where 4 were its own (an alert on it fired for
    another tenant's traffic). Now it counts what that URL will be sent; it follows
    new events, and the URL's cursor moving past them."""
    from fastsend.serve.metrics import Metrics
    from fastsend.serve.webhooks import WebhookDispatcher, safe_url

    async def main() -> None:
        cfg = from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "webhooks": {"flush_interval": 0.01, "retry_min": 600, "retry_max": 600},
            "tenants": {
                "acme": {"domains": ["acme.example"], "webhook_urls": [DEAD],
                         "webhook_secret": TENANT_SECRETS["acme"],
                         "webhook_events": ["bounced"]},
                "evil": {"domains": ["evil.example"],
                         "webhook_urls": ["http://127.0.0.1:9/evil"],
                         "webhook_secret": TENANT_SECRETS["evil"]},
            },
        })  # fmt: skip
        ctx = open_context(cfg)
        m = Metrics(ctx)
        d = WebhookDispatcher(ctx)
        await d.start()
        m.webhooks = d
        try:
            assert d.outbox is not None
            camp = {n: ctx.tenant_campaign(n) for n in ("acme", "evil")}
            _emit_mail(ctx, camp, 12)  # per tenant: 12 + 12 + 4 + 3 = 31 events
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 62)
            resp = await m.handler(None)  # type: ignore[arg-type]
            got = _pending(resp.body.decode())  # type: ignore[union-attr]
            assert got == {safe_url(DEAD): 4, safe_url("http://127.0.0.1:9/evil"): 31}
            # More events, and acme's cursor moved past the first 40 rows (its receiver
            # took its first bounces): the figure follows both (the cache expired).
            _emit_mail(ctx, camp, 3)  # rows 63..: acme 1 more bounce (i = 0)
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 78)
            taken = [i for i, b in d.outbox.fetch(DEAD, 40)]
            d.outbox.ack(DEAD, taken[-1])
            left = sum(1 for i, b in d.outbox.fetch(DEAD, 1000)
                       if b'"bounced"' in b and b'"rcpt":"acme' in b)  # fmt: skip
            m._hook_cache = (0.0, m._hook_cache[1])
            resp = await m.handler(None)  # type: ignore[arg-type]
            got = _pending(resp.body.decode())  # type: ignore[union-attr]
            assert got[safe_url(DEAD)] == left and 0 < left < 5
            assert got[safe_url("http://127.0.0.1:9/evil")] == 39
        finally:
            await d.stop()
            ctx.close()

    asyncio.run(main())
