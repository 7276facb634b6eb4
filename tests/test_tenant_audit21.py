"""Hostile input that took a whole ``fastsend serve`` node down (session 21).

orjson reads JSON nested to any depth by recursing on the C stack: a row of
150,000 ``[`` (300 KB) overflows it and the process dies with SIGSEGV, nothing
to catch. A tenant's JSON-lines list with one such row, uploaded to
``POST /v1/campaigns/{id}/recipients``, killed serve (every tenant's API,
submission and delivery with it); so could an unauthenticated post to a provider
webhook, once its body was read whole (it was not: only what had arrived, so a
provider's signed post over ~64 KB was refused 401). Real parts: the API and the
provider webhooks in-process on loopback over a temporary SQLite spool.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from tests.test_provider_events import make_ctx, serve

from fastsend import recipients, safejson
from fastsend.config import from_dict
from fastsend.serve.app import make_app
from fastsend.serve.context import open_context
from fastsend.serve.provider_events import setup_provider_events
from fastsend.testing.http import app_on_loopback

DEEP = 200_000  # levels: orjson's C stack overflows past ~150,000 (8 MB stacks)


def bomb(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def test_a_json_line_nested_past_any_depth_is_a_bad_row(tmp_path: Path) -> None:
    """A JSON-lines list whose second row nests 200,000 levels: its columns are
    read from the other rows and that row is a bad row naming its line (was: the
    process died, SIGSEGV, as soon as the row was parsed)."""
    path = tmp_path / "list.jsonl"
    path.write_text(
        '{"email": "a@example.org", "name": "A"}\n'
        f'{{"email": "b@example.org", "name": {bomb()}}}\n'
        '{"email": "c@example.org", "name": "C"}\n'
    )
    assert recipients.columns(str(path)) == {"email", "name"}
    rows = list(recipients.read(str(path)))
    good = [r[1] for r in rows if not isinstance(r, recipients.BadRow)]
    bad = [r for r in rows if isinstance(r, recipients.BadRow)]
    assert good == ["a@example.org", "c@example.org"]
    assert [b.line for b in bad] == [2] and "nested deeper" in bad[0].error, bad


@pytest.mark.parametrize(
    ("doc", "deep"),
    [
        (bomb(), True),
        ('{"a": "' + "[" * 2000 + '"}', False),  # brackets in a string nest nothing
        ('{"a": "\\\\", "b": ' + bomb(600) + "}", True),  # an escaped backslash ends no string
        ('{"a": "\\"' + "{" * 2000 + '"}', False),  # an escaped quote ends no string
        (orjson.dumps([{"k": [i, {"v": [1]}]} for i in range(2000)]).decode(), False),
        (bomb(512), False),
        (bomb(513), True),
    ],
)
def test_untrusted_json_is_refused_past_the_depth_limit_and_read_below(doc: str, deep: bool) -> None:
    for data in (doc, doc.encode()):
        if deep:
            with pytest.raises(orjson.JSONDecodeError, match="nested deeper"):
                safejson.loads(data)
        else:
            assert safejson.loads(data) == orjson.loads(data)


def test_a_tenants_nested_list_row_is_refused_and_serve_answers_on(tmp_path: Path) -> None:
    """Over the API: the upload is answered (the bad row with its line) and the
    API answers the next request (was: no answer, the process gone)."""
    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")},
                     "api": {"listen": "127.0.0.1:0"}})  # fmt: skip
    ctx = open_context(cfg)
    key = ctx.key_store().create("acme")[0]
    h = {"Authorization": f"Bearer {key}"}
    tpl = {"from": "a@acme.example", "subject": "Hi", "text": "Dear {{ name }}"}

    async def main() -> None:
        async with app_on_loopback(make_app(ctx, cfg.api)) as base, aiohttp.ClientSession() as s:
            async with s.post(f"{base}/v1/campaigns", json={"name": "c", "template": tpl},
                              headers=h) as r:  # fmt: skip
                got = await r.json()
                assert r.status == 201, got
            cid = got["id"]
            body = ('{"email": "a@example.org", "name": "A"}\n'
                    f'{{"email": "b@example.org", "name": {bomb()}}}\n').encode()  # fmt: skip
            async with s.post(f"{base}/v1/campaigns/{cid}/recipients", data=body,
                              headers={**h, "Content-Type": "application/x-ndjson"}) as r:  # fmt: skip
                got = await r.json()
                assert r.status == 202, got
            assert got["accepted"] == 1 and [e["row"] for e in got["errors"]] == [2], got
            async with s.get(f"{base}/v1/campaigns/{cid}", headers=h) as r:
                assert r.status == 200

    try:
        asyncio.run(main())
    finally:
        ctx.close()


def test_a_recipient_has_at_most_max_variables(tmp_path: Path) -> None:
    """A CSV header of 1,002 columns (the address and 1,001 variables) refuses the
    list at once, naming the count; a JSON-lines row of 1,001 variables is a bad row
    naming its line, one of 1,000 is spooled. Was: any number, a 4.7 MB list of
    400,000 columns held serve's loop 4.6 s and took 0.5 GB, each row's variables
    5.5 MB of JSON."""
    cap = recipients.MAX_VARIABLES
    wide = tmp_path / "wide.csv"
    names = [f"v{i}" for i in range(cap + 1)]
    wide.write_text("email," + ",".join(names) + "\na@example.org," + ",".join("x" * len(names)) + "\n")
    with pytest.raises(recipients.RecipientsError, match="1,002 columns; a list has at most 1,000"):
        recipients.columns(str(wide))
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b"".join(orjson.dumps({"email": f"{u}@example.org", **{n: "x" for n in names[:k]}}) + b"\n"
                              for u, k in (("a", cap), ("b", cap + 1), ("c", 1))))  # fmt: skip
    assert "v0" in recipients.columns(str(rows))
    got = list(recipients.read(str(rows)))
    assert [r[1] for r in got if not isinstance(r, recipients.BadRow)] == [
        "a@example.org", "c@example.org"]  # fmt: skip
    bad = [r for r in got if isinstance(r, recipients.BadRow)]
    assert [b.line for b in bad] == [2] and "1,001 variables" in bad[0].error, bad


def test_the_apis_recipients_and_messages_have_at_most_max_variables(tmp_path: Path) -> None:
    """Over the API as in a list: a campaign's recipient of 1,001 variables is a bad
    row (1,000: spooled), a template message of 1,001 variables a 400 naming the
    field (was 202: 400,000 variables, 5.5 MB of JSON a message, were taken)."""
    cfg = from_dict({"spool": {"dir": str(tmp_path / "spool")},
                     "api": {"listen": "127.0.0.1:0"}})  # fmt: skip
    ctx = open_context(cfg)
    h = {"Authorization": f"Bearer {ctx.key_store().create('acme')[0]}"}
    tpl = {"from": "a@acme.example", "subject": "Hi", "text": "Dear {{ v0 }}"}
    cap = recipients.MAX_VARIABLES

    def row(who: str, n: int) -> dict[str, str]:
        return {"email": f"{who}@example.org", **{f"v{i}": "x" for i in range(n)}}

    async def main() -> None:
        async with app_on_loopback(make_app(ctx, cfg.api)) as base, aiohttp.ClientSession() as s:
            body = {"name": "c", "template": tpl, "recipients": [row("a", cap), row("b", cap + 1)]}
            async with s.post(f"{base}/v1/campaigns", json=body, headers=h) as r:
                got = await r.json()
                assert r.status == 201, got
            assert got["accepted"] == 1 and [e["row"] for e in got["errors"]] == [2], got
            assert "1,001 variables" in got["errors"][0]["error"], got
            for n, want in ((cap + 1, 400), (cap, 202)):
                msg = {"template": tpl, "to": ["m@example.org"],
                       "variables": {f"v{i}": "x" for i in range(n)}}  # fmt: skip
                async with s.post(f"{base}/v1/messages", json=msg, headers=h) as r:
                    got = await r.json()
                    assert r.status == want, got
                if want == 400:
                    assert got["error"]["field"] == "message.variables", got
                    assert "1,001 variables" in got["error"]["message"], got

    try:
        asyncio.run(main())
    finally:
        ctx.close()


SIGNING_KEY = "key-mailgun-signing-0123456789"


def test_provider_posts_are_read_whole_and_nested_ones_refused(tmp_path: Path) -> None:
    """A signed Mailgun post of 1 MB (a large event: Mailgun's limit is far above)
    is taken (was 401: only the part of the body that had arrived was read, its
    JSON cut short); unsigned posts nested 200,000 levels to /webhooks/mailgun and
    /webhooks/ses (read before any signature can be checked) are 401 and the
    endpoints answer on."""
    kf = tmp_path / "mg.secret"
    kf.write_text(f"signing_key = {SIGNING_KEY}\n")
    kf.chmod(0o600)
    ctx, _ids = make_ctx(tmp_path, {"mailgun_signing_key_file": str(kf),
                                    "sns_topics": ["arn:aws:sns:eu-west-1:1:t"]})  # fmt: skip

    def signed(event: dict[str, Any]) -> bytes:
        ts, token = str(int(time.time())), hashlib.sha256(str(time.monotonic_ns()).encode())
        tok = token.hexdigest()[:50]
        sig = hmac.new(SIGNING_KEY.encode(), f"{ts}{tok}".encode(), hashlib.sha256).hexdigest()
        return orjson.dumps({"signature": {"timestamp": ts, "token": tok, "signature": sig},
                             "event-data": event})  # fmt: skip

    event = {"event": "delivered", "recipient": "u0@example.net",
             "message": {"headers": {"message-id": "1@mg.example.com"}}}  # fmt: skip

    async def main() -> None:
        app = web.Application()
        setup_provider_events(app, ctx)
        runner, url = await serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                big = signed({**event, "user-variables": {"note": "x" * 1_000_000}})
                async with s.post(url + "/webhooks/mailgun", data=big) as r:
                    assert r.status == 200, await r.text()
                for path in ("/webhooks/mailgun", "/webhooks/ses"):
                    async with s.post(url + path, data=bomb().encode()) as r:
                        assert r.status == 401, await r.text()
                async with s.post(url + "/webhooks/mailgun", data=signed(event)) as r:
                    assert r.status == 200, await r.text()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        ctx.close()
