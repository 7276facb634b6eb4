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
                         "retry_max": 0.1, "flush_interval": 0.01,
                         "allow_private": ["127.0.0.0/8"]},
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


def _spool(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """[spool]: SQLite in ``tmp_path``, or the shared one on the session's Redis."""
    if kind == "sqlite":
        return {"dir": str(tmp_path / "spool")}
    url = request.getfixturevalue("redis_server").url(node="n1")
    return {"dir": str(tmp_path / "spool"), "url": url}


def _acme_bounces_evil_all(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Two tenants' URLs, both dead: acme's takes its bounces only, evil's everything."""
    return from_dict({
        "spool": _spool(kind, tmp_path, request),
        "webhooks": {"flush_interval": 0.01, "retry_min": 600, "retry_max": 600,
                     "allow_private": ["127.0.0.0/8"]},
        "tenants": {
            "acme": {"domains": ["acme.example"], "webhook_urls": [DEAD],
                     "webhook_secret": TENANT_SECRETS["acme"],
                     "webhook_events": ["bounced"]},
            "evil": {"domains": ["evil.example"],
                     "webhook_urls": ["http://127.0.0.1:9/evil"],
                     "webhook_secret": TENANT_SECRETS["evil"]},
        },
    })  # fmt: skip


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_tenant_urls_pending_counts_only_the_events_it_will_get(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """``fastsend_webhook_pending`` of a tenant's URL counted every event past its
    cursor, the other tenants' (and the types it does not take) included: a tenant's
    receiver down showed 44 pending where 4 were its own (an alert on it fired for
    another tenant's traffic). Now it counts what that URL will be sent; it follows
    new events, and the URL's cursor moving past them. Both outboxes (SQLite, the
    shared one on Redis)."""
    from fastsend.serve.metrics import Metrics
    from fastsend.serve.webhooks import WebhookDispatcher, safe_url

    async def main() -> None:
        cfg = _acme_bounces_evil_all(kind, tmp_path, request)
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


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_tenant_urls_expired_events_count_only_the_events_it_would_get(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """Past ``[webhooks] retention_days`` the retention pass drops what a URL never took
    and says how many per URL (and ``fastsend_webhook_events_expired_total``): a
    tenant's URL down for the window was said to lose every event of it, the other
    tenants' and the types it does not take included (acme, taking its bounces: 62
    where 4 were for it; the counter 124 for 35). Now each URL's own, on both outboxes."""
    from fastsend.serve.retention import prune_once
    from fastsend.serve.webhooks import WebhookDispatcher

    async def main() -> None:
        cfg = _acme_bounces_evil_all(kind, tmp_path, request)
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            camp = {n: ctx.tenant_campaign(n) for n in ("acme", "evil")}
            _emit_mail(ctx, camp, 12)  # per tenant: 12 + 12 + 4 + 3 = 31 events
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 62)
            done = await asyncio.to_thread(prune_once, ctx, time.time() + 8 * 86400)
            assert done["webhooks"] == 35
            assert ctx.webhook_expired == 35
            assert d.outbox is not None and d.outbox.pending() == 0
        finally:
            await d.stop()
            ctx.close()

    asyncio.run(main())


def test_each_operator_url_may_take_event_types_of_its_own(tmp_path: Path) -> None:
    """``[webhooks.url_events]`` (new: every URL of ``[webhooks] urls`` got the same
    types, so an alerting endpoint wanting blocklist listings took every delivery):
    a URL named there gets those types, the others ``events``; names are checked at
    load, and a URL not in ``urls`` is refused (a typo would filter nothing)."""
    from tests.test_serve_webhooks import Receiver

    from fastsend.config import ConfigError
    from fastsend.serve.webhooks import WebhookDispatcher

    async def main() -> None:
        rx = {n: Receiver(OPERATOR_SECRET) for n in ("crm", "alerts")}
        urls = {n: await r.start() for n, r in rx.items()}
        cfg = from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "webhooks": {"urls": [urls["crm"], urls["alerts"]], "secret": OPERATOR_SECRET,
                         "events": ["delivered", "bounced"],
                         "url_events": {urls["alerts"]: ["ip_listed", "alarm"]},
                         "retry_min": 0.02, "retry_max": 0.1, "flush_interval": 0.01},
        })  # fmt: skip
        ctx = open_context(cfg)
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            camp = ctx.tenant_campaign("acme")
            for i in range(5):
                ctx.emit({"event": "delivered", "id": i, "campaign": camp, "rcpt": f"r{i}@x.org"})
                ctx.emit({"event": "opened", "id": i, "campaign": camp, "rcpt": f"r{i}@x.org"})
            ctx.emit({"event": "ip_listed", "source_ip": "127.0.0.2", "zone": "bl.example"})
            ctx.emit({"event": "bounced", "id": 9, "campaign": camp, "rcpt": "b@x.org"})
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 0
                         and len(rx["crm"].events) == 6)  # fmt: skip
            assert [e["event"] for e in rx["alerts"].events] == ["ip_listed"]
            assert {e["event"] for e in rx["crm"].events} == {"delivered", "bounced"}
        finally:
            await d.stop()
            ctx.close()
            for r in rx.values():
                await r.close()

    asyncio.run(main())
    for bad, why in (({"https://other.example/h": ["alarm"]}, "is not one of urls"),
                     ({"https://ops.example/h": ["alarms"]}, "unknown event 'alarms'")):
        with pytest.raises(ConfigError, match=re.escape(why)):
            from_dict({"webhooks": {"urls": ["https://ops.example/h"], "secret": OPERATOR_SECRET,
                                    "url_events": bad}})  # fmt: skip


def test_a_scrape_does_not_wait_for_a_long_backlog_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant URL's first count reads every row past its cursor (a receiver down for
    a day: millions, ~5 us each): a scrape waits ``HOOK_WAIT`` s for it at most, then
    answers without the figure (no sample rather than a wrong one) while the count goes
    on; the next scrape after it shows it."""
    from fastsend.serve import metrics as metrics_mod
    from fastsend.serve.metrics import Metrics
    from fastsend.serve.webhooks import WebhookDispatcher, safe_url

    monkeypatch.setattr(metrics_mod, "HOOK_WAIT", 0.05)

    async def main() -> None:
        cfg = from_dict({
            "spool": {"dir": str(tmp_path / "spool")},
            "webhooks": {"flush_interval": 0.01, "retry_min": 600, "retry_max": 600,
                         "allow_private": ["127.0.0.0/8"]},
            "tenants": {"acme": {"domains": ["acme.example"], "webhook_urls": [DEAD],
                                 "webhook_secret": TENANT_SECRETS["acme"]},
                        "evil": {"domains": ["evil.example"]}},
        })  # fmt: skip
        ctx = open_context(cfg)
        m = Metrics(ctx)
        d = WebhookDispatcher(ctx)
        await d.start()
        m.webhooks = d
        try:
            camp = {n: ctx.tenant_campaign(n) for n in ("acme", "evil")}
            _emit_mail(ctx, camp, 3)  # per tenant: 3 + 3 + 1 + 1 = 8 events
            await _until(lambda: d.outbox is not None and d.outbox.pending() == 16)
            go = asyncio.Event()
            count = d.pending

            async def slow() -> dict[str, int]:  # a count that takes long
                await go.wait()
                return await count()

            d.pending = slow  # type: ignore[method-assign]
            resp = await m.handler(None)  # type: ignore[arg-type]
            assert _pending(resp.body.decode()) == {}  # type: ignore[union-attr]
            go.set()
            await _until(lambda: m._hook_refresh is not None and m._hook_refresh.done())
            resp = await m.handler(None)  # type: ignore[arg-type]
            assert _pending(resp.body.decode()) == {safe_url(DEAD): 8}  # type: ignore[union-attr]
        finally:
            await d.stop()
            ctx.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_webhook_events_total_counts_the_outcomes_events_on_a_shared_spool(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """``fastsend_webhook_events_total`` ("events written to the webhook outbox") left
    out, on a Redis spool, every event the supervisor writes there itself with its
    outcomes (delivered, bounced, ...: the most of them): 3 messages showed 3 (their
    ``accepted``) where the receiver got 6. Counted now as the SQLite outbox's."""
    from tests._serve_helpers import Served, http
    from tests.test_monitoring_audit17 import _Hook

    from fastsend.sink import SinkThread

    url = ""
    if backend == "redis":
        url = str(request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path)))
    hook = _Hook()
    extra = (f'[webhooks]\nurls = ["{hook.url}"]\nsecret = "{OPERATOR_SECRET}"\n'
             'flush_interval = 0.05\n[dashboard]\nadmin_tenants = ["acme"]\n')  # fmt: skip
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}", extra=extra, spool_url=url,
                   serve_args=("--allow-volatile",) if url else ())  # fmt: skip
        try:
            st, body = s.req("POST", "/v1/messages", {
                "from": "a@evil.example", "subject": "s", "text": "t",
                "to": [f"u{j}@example.com" for j in range(3)]})  # fmt: skip
            assert st == 202, body
            deadline = time.monotonic() + 60
            while len(hook.events(OPERATOR_SECRET)) < 6:
                assert time.monotonic() < deadline, hook.events(OPERATOR_SECRET)
                time.sleep(0.05)
            st, text = http("GET", s.base + "/metrics", key=s.keys["acme"])
            assert st == 200, text
            (total,) = [smp.value for fam in text_string_to_metric_families(text)
                        for smp in fam.samples if smp.name == "fastsend_webhook_events_total"]
            assert total == 6
        finally:
            s.stop()
            hook.close()


def test_the_stats_counters_say_what_they_count() -> None:
    """GET /v1/stats's ``opens`` (8) was not the event log's ``opened`` events (13) and
    nothing said why: machine opens (Apple MPP, scanners) are counted apart. Each
    counter of the OpenAPI document now says what it counts, machine ones included."""
    import msgspec

    from fastsend.analytics.store import COUNTERS
    from fastsend.serve.stats import StatsAnswer

    _, comps = msgspec.json.schema_components([StatsAnswer])
    props = comps["StatsCounts"]["properties"]
    assert set(props) == set(COUNTERS)
    assert all(props[c].get("description") for c in COUNTERS)
    assert "opened events" in props["opens"]["description"]
    assert "Apple" in props["opens_machine"]["description"]
