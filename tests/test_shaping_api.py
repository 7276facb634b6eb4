"""A campaign's own shaping through the HTTP API: ``pool`` and ``max_rate`` on
POST /v1/campaigns, as ``fastsend send --pool --max-rate`` sets them, checked
against the config (a pool given to another tenant is its reputation)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from fastsend.config import from_dict
from fastsend.queue.shaping import DispatchGate
from fastsend.serve.app import make_app
from fastsend.serve.context import open_context
from fastsend.testing.http import app_on_loopback
from test_serve_api import Client

TPL = {"from": "a@example.com", "subject": "Hi", "text": "Hello"}
POOLS = {
    "shared": {"ips": ["127.0.0.2"]},
    "beta_ips": {"ips": ["127.0.0.3"]},
    "acme_ips": {"ips": ["127.0.0.4"]},
    "default": "shared",
    "tenants": {"beta": "beta_ips", "acme": "acme_ips"},
}


def run(tmp_path: Any, fn: Any, **extra: Any) -> None:
    cfg = from_dict({
        "spool": {"dir": str(tmp_path / "spool")}, "api": {"listen": "127.0.0.1:0"},
        "pools": POOLS, **extra,
    })  # fmt: skip

    async def main() -> None:
        ctx = open_context(cfg)
        try:
            app = make_app(ctx, cfg.api)
            async with app_on_loopback(app) as base, aiohttp.ClientSession() as session:
                await fn(Client(session, base, ctx))
        finally:
            ctx.close()

    asyncio.run(main())


def campaign(**kw: Any) -> dict[str, Any]:
    return {"template": TPL, "recipients": [{"email": "u@example.org"}], **kw}


def test_campaign_pool_and_rate_are_kept_and_shown(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", campaign(pool="shared", max_rate=25))
        assert st == 201, body
        info = c.ctx.spool.get_campaign(body["id"])
        assert info is not None
        assert info.options["pool"] == "shared" and info.options["max_rate"] == 25
        st, view = await c.req("GET", f"/v1/campaigns/{body['id']}")
        assert st == 200 and view["pool"] == "shared" and view["max_rate"] == 25
        # its own dedicated pool, by name
        st, body = await c.req("POST", "/v1/campaigns", campaign(pool="acme_ips"))
        assert st == 201, body
        # without: nothing set (the tenant's pool applies at dispatch)
        st, body = await c.req("POST", "/v1/campaigns", campaign())
        assert st == 201
        st, view = await c.req("GET", f"/v1/campaigns/{body['id']}")
        assert "pool" not in view and "max_rate" not in view

    run(tmp_path, t)


def test_another_tenants_pool_or_a_missing_one_is_refused(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        for pool in ("beta_ips", "nosuch"):
            st, body = await c.req("POST", "/v1/campaigns", campaign(pool=pool))
            assert st == 400, body
            err = body["error"]
            assert err["field"] == "pool"
            # the pools acme may use are named; another tenant's never
            assert "acme_ips" in err["message"] and "shared" in err["message"]
            assert "beta_ips" not in err["message"].split("its pools:")[1]
        assert list(c.ctx.spool.campaigns(None)) == []  # nothing was made
        for rate in (0, -5):
            st, body = await c.req("POST", "/v1/campaigns", campaign(max_rate=rate))
            assert st == 400 and body["error"]["field"] == "max_rate", body
        st, body = await c.req(
            "POST", "/v1/campaigns", raw=b'{"template": {}, "max_rate": 1e999}',
        )  # fmt: skip
        assert st == 400, body
        assert list(c.ctx.spool.campaigns(None)) == []

    run(tmp_path, t)


def test_max_rate_caps_and_never_raises_the_operators_campaign_rate(tmp_path: Any) -> None:
    """A tenant's max_rate of 1000 on a server whose campaigns go at most 10/s
    went out at 1000/s: the option replaced the operator's rate."""
    cfg = from_dict({"shaping": {"dispatch": {"campaign_rate": 10}}})
    from fastsend.spool import open_spool

    spool = open_spool(str(tmp_path / "spool"))
    fast = spool.create_campaign({"kind": "t"}, options={"max_rate": 1000})
    slow = spool.create_campaign({"kind": "t"}, options={"max_rate": 4})
    plain = spool.create_campaign({"kind": "t"})
    gate = DispatchGate(cfg, spool, None)
    assert gate.rate_of(fast) == 10
    assert gate.rate_of(slow) == 4
    assert gate.rate_of(plain) == 10
    # no operator rate: the campaign's own
    free = DispatchGate(from_dict({}), spool, None)
    assert free.rate_of(fast) == 1000 and free.rate_of(plain) == 0
    spool.close()


def test_a_reloads_dispatch_gate_starts_where_the_old_one_left(tmp_path: Any) -> None:
    """SIGHUP makes a new DispatchGate (SupervisorShaping.reconfigure): its
    campaign, tenant and global buckets start as the old gate's were spent
    (DispatchGate.carry), so a reload releases no second burst. Before, they
    started full: each reload let a campaign at 5/s send 5 more at once."""
    import time

    from fastsend.spool import open_spool

    raw = {"shaping": {"dispatch": {"campaign_rate": 5, "tenant_rate": 8, "global_rate": 20}}}
    spool = open_spool(str(tmp_path / "spool"))
    camp = spool.create_campaign({"kind": "t"}, tenant="acme")
    other = spool.create_campaign({"kind": "t"}, tenant="acme")
    gate = DispatchGate(from_dict(raw), spool, None)
    now = time.monotonic()
    assert gate.admit(camp, 10, now) == 5  # the campaign's burst, spent
    assert gate.admit(other, 10, now) == 3  # the tenant's 8, spent
    fresh = DispatchGate(from_dict(raw), spool, None)
    assert fresh.admit(camp, 10, now) == 5  # (before: a second burst)
    new = DispatchGate(from_dict(raw), spool, None)
    new.carry(gate)
    assert new.admit(camp, 10, now) == 0 and new.admit(other, 10, now) == 0
    # A raised rate (and burst) keeps the 5 spent: 5 of its 10 now, drained in
    # 0.5 s at 10/s.
    raw["shaping"]["dispatch"] = {"campaign_rate": 10}
    faster = DispatchGate(from_dict(raw), spool, None)
    faster.carry(gate)
    b = faster._buckets(camp)[0]
    assert b.available(now + 0.01) == 5 and b.available(now + 0.51) == 10
    spool.close()


def test_a_guardrails_pause_is_the_operators_to_lift(tmp_path: Any) -> None:
    """A tenant resuming the campaign the guardrails paused got a fresh sample each
    time: min_sample more bounces a resume, without end. It may still cancel it,
    and pause and resume its own pauses; an admin key resumes it."""

    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", campaign())
        assert st == 201
        cid = body["id"]
        why = "guardrail: bounce rate 31.0% (155 of 500) is over the 5.0% guardrail"
        c.ctx.spool.set_campaign_status(cid, "paused", why)
        st, body = await c.req("POST", f"/v1/campaigns/{cid}/resume")
        assert st == 409 and "guardrails" in body["error"]["message"], body
        assert c.ctx.spool.get_campaign(cid).status == "paused"  # type: ignore[union-attr]
        st, body = await c.req("POST", f"/v1/campaigns/{cid}/resume", tenant="ops")
        assert st == 404  # (another tenant's campaign: ops is not an admin here)
        # its own pause it lifts itself
        st, other = await c.req("POST", "/v1/campaigns", campaign())
        oid = other["id"]
        assert (await c.req("POST", f"/v1/campaigns/{oid}/pause"))[0] == 200
        st, body = await c.req("POST", f"/v1/campaigns/{oid}/resume")
        assert st == 200 and body["status"] == "active"
        st, body = await c.req("POST", f"/v1/campaigns/{cid}/cancel")
        assert st == 200 and body["status"] == "cancelled"

    run(tmp_path, t)


def test_an_admin_key_lifts_a_guardrails_pause(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", campaign(), tenant="ops")
        assert st == 201
        cid = body["id"]
        c.ctx.spool.set_campaign_status(cid, "paused", "guardrail: bounce rate 9.0%")
        st, body = await c.req("POST", f"/v1/campaigns/{cid}/resume", tenant="ops")
        assert st == 200 and body["status"] == "active", body

    run(tmp_path, t, dashboard={"admin_tenants": ["ops"]})


def test_campaign_priority_and_weight_are_kept_checked_and_shown(tmp_path: Any) -> None:
    """``priority`` and ``weight`` (spool/fair.py: how the claims share their
    room between a tenant's campaigns) as ``fastsend send --priority --weight``."""

    async def t(c: Client) -> None:
        st, body = await c.req("POST", "/v1/campaigns", campaign(priority=5, weight=3))
        assert st == 201, body
        info = c.ctx.spool.get_campaign(body["id"])
        assert info is not None
        assert info.options["priority"] == 5 and info.options["weight"] == 3
        st, view = await c.req("GET", f"/v1/campaigns/{body['id']}")
        assert st == 200 and view["priority"] == 5 and view["weight"] == 3
        made = len(list(c.ctx.spool.campaigns(None)))
        for field, v in (("priority", 101), ("priority", 1.5), ("weight", 0), ("weight", True)):
            st, body = await c.req("POST", "/v1/campaigns", campaign(**{field: v}))
            assert st == 400 and body["error"]["field"] == field, body
        assert len(list(c.ctx.spool.campaigns(None))) == made  # nothing was made

    run(tmp_path, t)
