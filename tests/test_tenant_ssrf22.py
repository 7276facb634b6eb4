"""Hostile tenants, session 22: requests the server makes for a tenant (SSRF).

Real parts: the config loader, a ServeContext on a temporary spool, the webhook
dispatcher POSTing to aiohttp receivers on loopback through aiohttp's real
connector (getaddrinfo answers replaced only where a test plays a DNS answer).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastsend import netguard
from fastsend.config import ConfigError, from_dict

TENANT_SECRET = "acme-hook-secret-0123456789"
OPERATOR_SECRET = "operator-hook-secret-000000"

# Every spelling of an inside address a tenant could hand in as its webhook URL.
INSIDE = [
    "http://127.0.0.1:8080/hook",
    "http://2130706433/hook",  # 127.0.0.1 as one decimal number
    "http://0177.0.0.1/hook",  # octal
    "http://0x7f.0.0.1/hook",  # hex
    "http://0x7f000001/hook",
    "http://127.1/hook",  # inet_aton's short form
    "http://[::1]:8080/hook",
    "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of the metadata service
    "http://169.254.169.254/latest/meta-data/iam/",  # cloud metadata
    "http://[fe80::1]/hook",  # link-local
    "http://10.1.2.3/hook",
    "http://172.16.0.1/hook",
    "https://192.168.1.1/hook",
    "http://100.64.0.1/hook",  # CGNAT (shared address space)
    "http://[fd12:3456::1]/hook",  # ULA
    "http://0.0.0.0:8080/hook",  # unspecified: connects to this host
    "http://[::]:8080/hook",
    "http://224.0.0.1/hook",  # multicast
    "http://255.255.255.255/hook",
    "http://localhost:8080/hook",  # RFC 6761: always loopback
    "http://LOCALHOST./hook",
    "http://api.localhost/hook",
    "http://user:pw@127.0.0.1/hook",
]


def _tenant_cfg(url: str, **webhooks: Any) -> dict[str, Any]:
    return {
        "spool": {"dir": "/nonexistent-spool"},
        "webhooks": webhooks,
        "tenants": {"acme": {"domains": ["acme.example"], "webhook_urls": [url],
                             "webhook_secret": TENANT_SECRET}},
    }  # fmt: skip


@pytest.mark.parametrize("url", INSIDE)
def test_a_tenant_webhook_url_inside_the_network_is_refused_at_load(url: str) -> None:
    """A tenant's webhook URL whose host is an inside address, in any spelling
    getaddrinfo reads as one (new: loaded, and every event of the tenant POSTed
    into the operator's network, the cloud metadata service included): refused
    when the config loads, naming the tenant, the URL and the key that allows it."""
    with pytest.raises(ConfigError) as e:
        from_dict(_tenant_cfg(url))
    msg = str(e.value)
    assert "[tenants.acme] webhook_urls" in msg and url in msg
    assert "[webhooks] allow_private" in msg


def test_allow_private_lets_the_operator_name_inside_networks() -> None:
    """``[webhooks] allow_private``: the networks a tenant's URL may reach although
    not public (a receiver in the operator's network, tests' loopback receivers),
    only those; the operator's own ``urls`` are trusted config; public hosts and
    names load (a name is checked on each connection's address)."""
    allow = {"allow_private": ["127.0.0.0/8", "::1"]}
    for url in ("http://127.0.0.1:8080/hook", "http://2130706433/hook", "http://[::1]/h",
                "http://localhost:9/h", "http://[::ffff:127.0.0.1]/h"):
        from_dict(_tenant_cfg(url, **allow))
    for url in ("http://169.254.169.254/", "http://10.1.2.3/hook", "http://[fe80::1]/"):
        with pytest.raises(ConfigError, match="allow_private"):
            from_dict(_tenant_cfg(url, **allow))
    for url in ("https://hooks.acme.example/fastsend", "https://203.0.113.7.nip.example/h",
                "https://8.8.8.8/hook", "http://[2606:4700::1111]/hook"):
        from_dict(_tenant_cfg(url))
    from_dict({"spool": {"dir": "/x"},
               "webhooks": {"urls": ["http://127.0.0.1:9/ops"], "secret": OPERATOR_SECRET}})  # fmt: skip
    with pytest.raises(ConfigError, match="allow_private"):
        from_dict(_tenant_cfg("https://hooks.acme.example/", allow_private=["10.0.0.0/33"]))


def test_netguard_judges_every_address_form() -> None:
    """The rules themselves, address by address: an IPv6 address carrying IPv4
    judged by that, site-local and IPv4-compatible never public."""
    public = ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]
    inside = ["127.0.0.1", "::1", "::", "0.0.0.0", "10.0.0.1", "169.254.169.254", "fe80::1",
              "fc00::1", "100.64.0.1", "224.0.0.1", "ff02::1", "fec0::1", "::7f00:1",
              "::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:a9fe:a9fe::", "192.0.2.1", "not-an-ip"]
    assert [a for a in public if not netguard.public(a)] == []
    assert [a for a in inside if netguard.public(a)] == []
    allow = netguard.networks(["127.0.0.0/8"])
    assert not netguard.refused("::ffff:127.0.0.1", allow)
    assert netguard.refused("::1", allow) and netguard.refused("10.0.0.1", allow)
    assert netguard.literal("example.com") is None and netguard.literal("1e3") is None


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def _webhook_ctx(tmp_path: Path, urls: list[str], **webhooks: Any) -> Any:
    from fastsend.serve.context import open_context

    return open_context(from_dict({
        "spool": {"dir": str(tmp_path / "spool")},
        "webhooks": {"retry_min": 0.02, "retry_max": 0.05, "flush_interval": 0.01, **webhooks},
        "tenants": {"acme": {"domains": ["acme.example"], "webhook_urls": urls,
                             "webhook_secret": TENANT_SECRET}},
    }))  # fmt: skip


@pytest.mark.parametrize("allowed", [False, True])
def test_a_tenant_url_whose_name_resolves_inside_is_refused_on_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    allowed: bool,
) -> None:
    """A tenant URL naming a host that loads fine (a public-looking name) but whose
    DNS answer at the time of the POST is loopback (DNS rebinding: public when
    checked, inside when used; new: POSTed to). The connection's own address is
    checked: nothing reaches the receiver, the log says why, the events stay in the
    outbox (retried: the answer may change back). With the network in ``[webhooks]
    allow_private`` the same setup delivers (the rebinding was played for real)."""
    from tests.test_serve_webhooks import Receiver

    from fastsend.serve.webhooks import WebhookDispatcher

    real = socket.getaddrinfo
    asked: list[str] = []

    def rebound(host: Any, *a: Any, **k: Any) -> Any:
        if host == "hooks.acme.example":
            asked.append(host)
            host = "127.0.0.1"
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", rebound)

    async def main() -> None:
        rx = Receiver(TENANT_SECRET)
        url = await rx.start()
        port = url.split(":")[2].split("/")[0]
        hook = f"http://hooks.acme.example:{port}/hook"
        extra = {"allow_private": ["127.0.0.0/8"]} if allowed else {}
        ctx = _webhook_ctx(tmp_path, [hook], **extra)
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            camp = ctx.tenant_campaign("acme")
            ctx.emit({"event": "bounced", "id": 1, "campaign": camp, "rcpt": "a@example.org"})
            if allowed:
                await _until(lambda: len(rx.events) == 1)
            else:
                await _until(lambda: d.stats["failed"] >= 2)
                assert rx.attempts == 0 and asked
                assert d.outbox is not None and d.outbox.pending(hook) == 1
                said = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
                assert any("127.0.0.1 is a loopback, private" in m for m in said), said
        finally:
            await d.stop()
            ctx.close()
            await rx.close()

    with caplog.at_level(logging.WARNING, logger="fastsend.webhooks"):
        asyncio.run(main())


def test_a_tenant_url_answering_a_redirect_is_not_followed(tmp_path: Path) -> None:
    """A tenant receiver answering 307 to an inside address: the redirect is not
    followed (the inside receiver gets nothing), the batch is not taken (retried)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from tests.test_serve_webhooks import Receiver

    from fastsend.serve.webhooks import WebhookDispatcher

    async def main() -> None:
        inside = Receiver(TENANT_SECRET)
        target = await inside.start()
        hits = 0

        async def redirect(_r: web.Request) -> web.Response:
            nonlocal hits
            hits += 1
            raise web.HTTPTemporaryRedirect(target)

        app = web.Application()
        app.router.add_post("/hook", redirect)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        hook = str(server.make_url("/hook"))
        ctx = _webhook_ctx(tmp_path, [hook], allow_private=["127.0.0.1/32"])
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            camp = ctx.tenant_campaign("acme")
            ctx.emit({"event": "bounced", "id": 1, "campaign": camp, "rcpt": "a@example.org"})
            await _until(lambda: hits >= 2)
            assert inside.attempts == 0
            assert d.outbox is not None and d.outbox.pending(hook) == 1
        finally:
            await d.stop()
            ctx.close()
            await server.close()
            await inside.close()

    asyncio.run(main())


def test_a_reload_that_narrows_allow_private_drops_kept_alive_connections(
    tmp_path: Path,
) -> None:
    """A SIGHUP taking a network out of ``[webhooks] allow_private`` (new: the tenant's
    kept-alive connection, checked against the old list, went on carrying its POSTs
    for as long as it was reused, every few seconds: for ever): the next POST
    connects anew and is refused."""
    import dataclasses

    from tests.test_serve_webhooks import Receiver

    from fastsend.serve.webhooks import WebhookDispatcher

    async def main() -> None:
        rx = Receiver(TENANT_SECRET)
        url = await rx.start()
        ctx = _webhook_ctx(tmp_path, [url], allow_private=["127.0.0.0/8"])
        d = WebhookDispatcher(ctx)
        await d.start()
        try:
            camp = ctx.tenant_campaign("acme")
            ctx.emit({"event": "bounced", "id": 1, "campaign": camp, "rcpt": "a@example.org"})
            await _until(lambda: len(rx.events) == 1)
            await d.reconfigure(dataclasses.replace(d.config, allow=()))
            failed = d.stats["failed"]
            ctx.emit({"event": "bounced", "id": 2, "campaign": camp, "rcpt": "b@example.org"})
            await _until(lambda: d.stats["failed"] >= failed + 2 or len(rx.events) > 1)
            assert len(rx.events) == 1 and rx.attempts == 1
        finally:
            await d.stop()
            ctx.close()
            await rx.close()

    asyncio.run(main())


def test_a_templates_header_section_has_raw_mimes_caps(tmp_path: Path) -> None:
    """A template message's header fields held to the caps SMTP submission and the
    API's ``raw`` already had (1,000 fields, 100,000 octets; new: POST /v1/messages
    with 20,000 ``headers``, one 900 KB header or a 200 KB subject was 202 and each
    message went out with a 1.2-1.5 MB header section, which Postfix cuts at 102,400
    octets and Gmail refuses): 400 naming ``headers``, for messages and campaigns;
    1,000 small headers still go."""
    from tests.test_tenant_caps import node

    def msg(**kw: Any) -> dict[str, Any]:
        return {"from": "a@acme.example", "to": ["x@example.org"], "subject": "s", "text": "t",
                **kw}

    async def main() -> None:
        tables = {"spool": {"dir": str(tmp_path / "spool")},
                  "tenants": {"acme": {"domains": ["acme.example"]}}}  # fmt: skip
        async with node(tables) as n:
            for bad in (msg(headers={f"X-H{i}": "v" for i in range(1001)}),
                        msg(headers={"X-Big": "v" * 900_000}),
                        msg(headers={f"X-H{i}": "w " * 150 for i in range(500)}),
                        msg(subject="s" * 200_000)):  # fmt: skip
                st, body, _h = await n.req("POST", "/v1/messages", bad)
                assert st == 400 and "headers" in body["error"]["message"], (st, body)
                assert "at most" in body["error"]["message"]
            camp = {"name": "c", "template": msg(headers={"X-Big": "v" * 200_000}),
                    "recipients": [{"email": "r@example.org"}]}  # fmt: skip
            del camp["template"]["to"]
            st, body, _h = await n.req("POST", "/v1/campaigns", camp)
            assert st == 400 and "headers" in body["error"]["message"], (st, body)
            st, body, _h = await n.req("POST", "/v1/messages",
                                       msg(headers={f"X-H{i}": "v" * 50 for i in range(1000)}))
            assert st == 202, body

    asyncio.run(main())


@pytest.mark.parametrize("allow", [False, True])
def test_an_mx_whose_ipv6_address_carries_an_inside_ipv4_one_is_refused(
    dns_server: Any, allow: bool
) -> None:
    """An MX (or a recipient's address literal) whose IPv6 address carries an inside
    IPv4 one: NAT64 ``64:ff9b::7f00:1`` (on an IPv6-only host with NAT64, 127.0.0.1
    or 169.254.169.254 as seen from the gateway), 6to4 ``2002:7f00:1::``, the
    deprecated site-local ``fec0::/10`` and IPv4-compatible ``::127.0.0.1`` (new:
    Python's ``is_global`` takes them all for public, so a tenant's recipient domain
    could aim delivery, and the MTA-STS and TLS-RPT fetches held to the same rule,
    at them): refused 5.4.4 as a loopback MX is; with ``allow_private_mx`` allowed.
    A public address in the same forms is a site."""
    from fastsend.config import loader
    from fastsend.delivery.mx import MXResolver, Site
    from fastsend.outcome import Outcome

    inside = {"nat64.test": "64:ff9b::a9fe:a9fe", "sixtofour.test": "2002:7f00:1::1",
              "sitelocal.test": "fec0::1", "compat.test": "::7f00:1"}
    zones: dict[str, list[tuple[str, str]]] = {"public.test": [("AAAA", "64:ff9b::808:808")]}
    for dom, addr in inside.items():
        zones[dom] = [("MX", f"10 mx.{dom}.")]
        zones[f"mx.{dom}"] = [("AAAA", addr)]
    dns_server.set_zones(zones)
    cfg = loader.from_dict(
        {"dns": {"nameservers": [dns_server.nameserver]},
         "delivery": {"allow_private_mx": allow}}, base_dir=".", files=False,
    )  # fmt: skip

    async def main() -> None:
        r = MXResolver(cfg)
        for dom in [*inside, "[IPv6:64:ff9b::7f00:1]"]:
            got = await r.site_for(dom)
            if allow:
                assert isinstance(got, Site), (dom, got)
            else:
                assert isinstance(got, Outcome) and got.enhanced == "5.4.4", (dom, got)
        assert isinstance(await r.site_for("public.test"), Site)

    asyncio.run(main())
