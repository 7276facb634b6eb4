"""The HTTP API of fastsend serve: auth, validation, messages (in-process app, real client).

The application runs on a real loopback port in the test's own loop, without
supervisor or workers (the end-to-end path with delivery is in
test_serve_main.py). Every request goes through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from fastsend.config import from_dict
from fastsend.serve.api import API_KEY, ApiSettings
from fastsend.serve.app import make_app
from fastsend.serve.auth import KeyStore
from fastsend.serve.context import ServeContext, open_context
from fastsend.testing.http import app_on_loopback


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, ctx: ServeContext) -> None:
        self.session = session
        self.base = base
        self.ctx = ctx
        self.keys: dict[str, str] = {}

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            store = KeyStore.for_spool(self.ctx.config.spool_dir)
            self.keys[tenant] = store.create(tenant)[0]
            store.close()
        return self.keys[tenant]

    async def req(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        tenant: str | None = "acme",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        h = dict(headers or {})
        if tenant is not None:
            h["Authorization"] = f"Bearer {self.key(tenant)}"
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=h) as r:
            text = await r.read()
            ctype = r.headers.get("Content-Type", "")
            return r.status, orjson.loads(text) if "json" in ctype else text.decode()


@asynccontextmanager
async def serving(tmp: str, **api: Any) -> AsyncIterator[Client]:
    cfg = from_dict({"spool": {"dir": tmp}, "api": {"listen": "127.0.0.1:0", **api}})
    ctx = open_context(cfg)
    app = make_app(ctx, cfg.api)
    try:
        async with app_on_loopback(app) as base, aiohttp.ClientSession() as session:
            yield Client(session, base, ctx)
    finally:
        ctx.close()


def arun(tmp_path: Any, fn: Callable[[Client], Awaitable[None]], **api: Any) -> None:
    async def main() -> None:
        async with serving(str(tmp_path / "spool"), **api) as c:
            await fn(c)

    asyncio.run(main())


MSG = {"from": "News <news@example.com>", "to": "a@example.org", "subject": "Hi", "text": "Hello"}


def test_post_single_and_get(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, body = await c.req(
            "POST",
            "/v1/messages",
            {**MSG, "to": ["a@example.org", "B@Example.ORG"], "tags": ["w"], "metadata": {"k": 1}},
        )
        assert st == 202, body
        assert body["accepted"] == 2
        ids = body["messages"][0]["ids"]
        assert body["messages"][0]["to"] == ["a@example.org", "B@example.org"]
        # durable when answered: a fresh read of the spool sees the rows
        assert c.ctx.spool.counts()["queued"] == 2
        st, m = await c.req("GET", f"/v1/messages/{ids[1]}")
        assert st == 200
        assert m["state"] == "queued" and m["to"] == "B@example.org"
        assert m["tags"] == ["w"] and m["metadata"] == {"k": 1}
        assert [e["event"] for e in m["events"]] == ["accepted"]
        info = c.ctx.spool.get_campaign(m["campaign"])
        assert info is not None and info.spec["kind"] == "transactional"
        assert info.tenant == "acme"

    arun(tmp_path, t)


def test_batch_raw_and_template(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        raw = "From: a@example.com\r\nSubject: r\r\n\r\nbody\r\n"
        tpl = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
        batch = {
            "messages": [
                MSG,
                {"from": "a@example.com", "to": "r@example.org", "raw": raw},
                {"to": ["t1@example.org", "t2@example.org"], "template": tpl,
                 "variables": {"name": "Kiji"}},
            ]
        }  # fmt: skip
        st, body = await c.req("POST", "/v1/messages", batch)
        assert st == 202, body
        assert body["accepted"] == 4
        rid = body["messages"][1]["ids"][0]
        row = c.ctx.spool.message(rid)
        assert row is not None
        assert base64.b64decode(row["vars"]["raw"]).decode() == raw
        tid = body["messages"][2]["ids"][0]
        trow = c.ctx.spool.message(tid)
        assert trow is not None and trow["vars"] == {"name": "Kiji"}
        info = c.ctx.spool.get_campaign(trow["campaign"])
        assert info is not None and info.spec["subject"] == "Hi {{ name }}"
        # the same template again reuses its campaign; a template by id works too
        st, body2 = await c.req("POST", "/v1/messages", batch["messages"][2])
        assert st == 202
        assert c.ctx.spool.message(body2["messages"][0]["ids"][0])["campaign"] == info.id  # type: ignore[index]
        st, body3 = await c.req(
            "POST",
            "/v1/messages",
            {"to": "x@example.org", "template": info.id, "variables": {"name": "X"}},
        )
        assert st == 202, body3
        # a missing variable is a 400 naming it
        st, err = await c.req("POST", "/v1/messages", {"to": "x@example.org", "template": info.id})
        assert st == 400 and err["error"]["field"] == "message.variables"

    arun(tmp_path, t)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "a@example.org", "subject": "s", "text": "t"}, "message.from"),
        ({**MSG, "to": ["ok@example.org", "not-an-address"]}, "message.to[1]"),
        ({**MSG, "to": []}, "message.to"),
        ({**MSG, "to": 5}, "to"),
        ({**MSG, "subject": None, "html": "<p>x</p>"}, "message.subject"),
        ({**MSG, "text": None}, "message.text"),
        ({**MSG, "headers": {"X-Evil": "a\r\nBcc: victim@example.net"}}, "message.headers.X-Evil"),
        ({**MSG, "subject": "hi\nBcc: x@example.net"}, "message.subject"),
        ({**MSG, "headers": {"Bad Name": "v"}}, "message.headers"),
        ({**MSG, "from": "not an address"}, "message.from"),
        ({**MSG, "bogus": 1}, "bogus"),
        ({"messages": [MSG, {**MSG, "to": "bad@"}]}, "messages[1].to[0]"),
        ({"messages": [MSG, {**MSG, "subject": 7}]}, "messages[1].subject"),
        ({"messages": "x"}, "messages"),
        ({"messages": []}, "messages"),
        ({**MSG, "raw": "no blank line"}, "message.subject"),
        ({"from": "a@example.com", "to": "r@example.org", "raw": "no blank line"}, "message.raw"),
    ],
)
def test_bad_input_is_400_naming_the_field(tmp_path: Any, body: Any, field: str) -> None:
    async def t(c: Client) -> None:
        st, err = await c.req("POST", "/v1/messages", body)
        assert st == 400, err
        assert err["error"]["field"] == field, err
        assert field.split(".")[-1].split("[")[0] in err["error"]["message"]
        assert c.ctx.spool.counts()["queued"] == 0  # nothing from a bad request

    arun(tmp_path, t)


def test_malformed_json_and_sizes(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        for raw in (b"{", b"", b"[1,2]", b"null", b"\xff\xfe"):
            st, err = await c.req("POST", "/v1/messages", raw=raw)
            assert st == 400, (raw, err)
            assert err["error"]["message"]
        big = orjson.dumps({**MSG, "text": "x" * 20000})
        st, err = await c.req("POST", "/v1/messages", raw=big)
        assert st == 413, err
        many = {"messages": [MSG] * 6}
        st, err = await c.req("POST", "/v1/messages", many)
        assert st == 413
        st, err = await c.req(
            "POST", "/v1/messages", {**MSG, "to": [f"u{i}@example.org" for i in range(6)]}
        )
        assert st == 413
        # what was accepted before stays
        st, _ = await c.req("POST", "/v1/messages", MSG)
        assert st == 202
        st, _ = await c.req("POST", "/v1/messages", raw=b"{bad")
        assert c.ctx.spool.counts()["queued"] == 1

    arun(tmp_path, t, max_batch=5, max_body_bytes=16384)


def test_auth_401_403_and_rate_limit(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, err = await c.req("POST", "/v1/messages", MSG, tenant=None)
        assert st == 401 and err["error"]["status"] == 401
        key = c.key("acme")
        for bad_key in (key[:-1] + ("A" if key[-1] != "A" else "B"), "fs_nope", "x" * 500):
            st, _ = await c.req(
                "GET", "/v1/messages/1", tenant=None, headers={"X-API-Key": bad_key}
            )
            assert st == 401
        st, body = await c.req("POST", "/v1/messages", MSG)
        assert st == 202
        mid = body["messages"][0]["ids"][0]
        st, err = await c.req("GET", f"/v1/messages/{mid}", tenant="other")
        st2, err2 = await c.req("GET", "/v1/messages/999999", tenant="other")
        assert st == st2 == 404, err  # exactly as a missing id: ids reveal nothing
        assert err["error"]["message"].replace(str(mid), "N") == err2["error"]["message"].replace(
            "999999", "N"
        )
        st, _ = await c.req("GET", f"/v1/messages/{mid}", headers={})
        assert st == 200
        st, _ = await c.req("GET", "/v1/messages/999999")
        assert st == 404
        st, err = await c.req("GET", "/v1/messages/abc")
        assert st == 400 and err["error"]["field"] == "id"
        # the OpenAPI document needs no key
        st, _ = await c.req("GET", "/v1/openapi.json", tenant=None)
        assert st == 200

    arun(tmp_path, t)


def test_rate_limit_per_key(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        statuses = []
        for _ in range(6):
            st, _ = await c.req("GET", "/v1/messages/999999", tenant="burst")
            statuses.append(st)
        assert statuses[:3] == [404, 404, 404] and 429 in statuses
        st, _ = await c.req("GET", "/v1/messages/999999", tenant="another")  # its own bucket
        assert st == 404

    arun(tmp_path, t, rate_limit=1.0, rate_burst=3)


def test_revoked_key(tmp_path: Any) -> None:
    async def main() -> None:
        async with serving(str(tmp_path / "spool")) as c:
            key = c.key("acme")
            st, _ = await c.req("GET", "/v1/messages/1")
            assert st == 404
            store = KeyStore.for_spool(c.ctx.config.spool_dir)
            assert store.revoke(key.split("_")[1])
            store.close()
        async with serving(str(tmp_path / "spool")) as c2:
            c2.keys["acme"] = key
            st, _ = await c2.req("GET", "/v1/messages/1")
            assert st == 401

    asyncio.run(main())


def test_suppressed_recipient_is_recorded_not_queued(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        c.ctx.suppression.add("gone@example.org", tenant="acme")
        st, body = await c.req(
            "POST", "/v1/messages", {**MSG, "to": ["gone@example.org", "ok@example.org"]}
        )
        assert st == 202
        ids = body["messages"][0]["ids"]
        st, m = await c.req("GET", f"/v1/messages/{ids[0]}")
        assert m["state"] == "suppressed"
        assert m["events"][0]["event"] == "suppressed"
        st, m = await c.req("GET", f"/v1/messages/{ids[1]}")
        assert m["state"] == "queued"

    arun(tmp_path, t)


def test_secret_file_is_private(tmp_path: Any) -> None:
    cfg = from_dict({"spool": {"dir": str(tmp_path / "s")}})
    ctx = open_context(cfg)
    ctx.close()
    st = os.stat(tmp_path / "s" / "secret.key")
    assert st.st_mode & 0o777 == 0o600
    assert open_context(cfg).secret == ctx.secret


def test_api_key_on_app(tmp_path: Any) -> None:
    cfg = from_dict({"spool": {"dir": str(tmp_path / "s")}})
    ctx = open_context(cfg)
    app = make_app(ctx, ApiSettings())
    assert app[API_KEY].settings.max_batch == 1000
    app[API_KEY].close()
    ctx.close()


def test_openapi_covers_every_route(tmp_path: Any) -> None:
    async def t(c: Client) -> None:
        st, doc = await c.req("GET", "/v1/openapi.json", tenant=None)
        assert st == 200 and doc["openapi"].startswith("3.")
        paths = doc["paths"]
        app = make_app(c.ctx, ApiSettings())
        routes = set()
        for route in app.router.routes():
            info = route.resource.canonical if route.resource else ""
            if route.method == "HEAD":
                continue
            for p in (
                [info.replace("{action}", a) for a in ("pause", "resume", "cancel")]
                if "{action}" in info
                else [info]
            ):
                routes.add((p, route.method.lower()))
        assert routes
        for p, method in routes:
            assert method in paths.get(p, {}), (p, method)
            op = paths[p][method]
            assert op["summary"] and op["responses"]
            for ref in orjson.dumps(op).decode().split('"$ref":"')[1:]:
                name = ref.split('"')[0].rsplit("/", 1)[1]
                assert name in doc["components"]["schemas"], name
        app[API_KEY].close()

    arun(tmp_path, t)
