"""A hostile tenant against a real ``fastsend serve`` process (issue 16).

Each test is one attack from the issue's list, made over the network against a
``fastsend serve`` subprocess (HTTP API, SMTP submission and intake listeners,
tracking) with two tenants, ``acme`` (the victim) and ``evil`` (the attacker),
each with its own sending domain and DKIM key. Mail goes to a SinkThread by a
static route.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import free_port
from fastsend.sink import SinkThread

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def http(
    method: str,
    url: str,
    body: Any = None,
    key: str | None = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        h = dict(headers or {})
        if key:
            h["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else orjson.dumps(body) if body is not None else None
        t = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(timeout=t) as s,
            s.request(method, url, data=data, headers=h, allow_redirects=False) as r,
        ):
            got = await r.read()
            if "json" in r.headers.get("Content-Type", ""):
                return r.status, orjson.loads(got)
            return r.status, got.decode("utf-8", "replace")

    return asyncio.run(go())


def cli(*args: str, cwd: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args],
        check=True, capture_output=True, text=True, env=ENV, cwd=cwd,
    ).stdout.strip()  # fmt: skip


class Served:
    """``fastsend serve`` in a subprocess with tenants acme and evil."""

    def __init__(self, tmp: Path, route: str, extra: str = "") -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "fastsend.toml"
        self.route = route
        self.extra = extra
        self.write_config()
        self.keys = {t: cli("apikey", "create", "--tenant", t, "-c", str(self.cfg), cwd=tmp)
                     for t in ("acme", "evil")}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsend", "serve", "-c", str(self.cfg)],
            stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp,
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_line("ready in")

    def write_config(self) -> None:
        self.cfg.write_text(
            f"""
[spool]
dir = "spool"
[workers]
count = 1
[routes]
"*" = "{self.route}"
[delivery]
tls = "off"
idle_timeout = 1.0
[api]
listen = "127.0.0.1:{self.port}"
{self.extra}
"""
        )

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_line(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in server output: {''.join(self.lines)}")
            time.sleep(0.02)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def req(self, method: str, path: str, body: Any = None, tenant: str | None = "evil",
            **kw: Any) -> tuple[int, Any]:  # fmt: skip
        return http(method, self.base + path, body, self.keys[tenant] if tenant else None, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def sink() -> Iterator[SinkThread]:
    with SinkThread() as s:
        yield s


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sink: SinkThread) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("hostile"), f"{sink.host}:{sink.port}")
    try:
        yield s
    finally:
        s.stop()


TEMPLATE = {"from": "News <news@evil.example>", "subject": "hi", "text": "hello"}


# ---------------------------------------------------------------- 1. server files
@pytest.mark.parametrize(
    ("where", "template", "field"),
    [
        ("campaign", {"text_file": "{secret}"}, "template.text_file"),
        ("campaign", {"html_file": "{secret}"}, "template.html_file"),
        ("campaign", {"attachments": [{"path": "{secret}"}]}, "template.attachments[0].path"),
        ("campaign", {"attachments": ["{secret}"]}, "template.attachments[0].path"),
        ("campaign", {"dkim": {"domain": "evil.example", "selector": "s", "key": "{secret}"}},
         "template.dkim.key"),
        ("campaign", {"tracking": {"opens": True, "base_url": "https://t.evil.example",
                                   "secret_file": "{secret}"}}, "template.tracking.secret_file"),
        ("message", {"text_file": "{secret}"}, "message.template.text_file"),
        ("message", {"attachments": [{"path": "{fifo}"}]}, "message.template.attachments[0].path"),
        ("campaign", {"text_file": "/dev/zero"}, "template.text_file"),
        ("campaign", {"text_file": "{fifo}"}, "template.text_file"),
    ],
)  # fmt: skip
def test_1_no_server_file_is_read(
    served: Served, where: str, template: dict[str, Any], field: str
) -> None:
    """Path-bearing keys are a 400 naming the key, before anything is opened: a FIFO
    (which would block the reader), /dev/zero and a secret file are never read, and
    a missing path answers exactly as an existing one."""
    secret = served.tmp / "spool" / "secret.key"
    fifo = served.tmp / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    names = {"{secret}": str(secret), "{fifo}": str(fifo)}

    def fill(v: Any) -> Any:
        if isinstance(v, str):
            return names.get(v, v)
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v

    tpl = {**TEMPLATE, **fill(template)}
    if "text_file" in tpl:
        del tpl["text"]
    if where == "campaign":
        body: dict[str, Any] = {"template": tpl, "recipients": [{"email": "a@example.org"}]}
        path = "/v1/campaigns"
    else:
        body, path = {"to": "a@example.org", "template": tpl}, "/v1/messages"
    st, out = served.req("POST", path, body, timeout=5)
    assert st == 400, out
    assert out["error"]["field"] == field, out
    # A path that does not exist gets the very same answer: errors reveal nothing.
    missing = orjson.loads(orjson.dumps(body).replace(str(secret).encode(), b"/nonexistent/x"))
    st2, out2 = served.req("POST", path, missing, timeout=5)
    assert (st2, out2["error"]["field"]) == (st, field)
    assert served.proc.poll() is None


# ---------------------------------------------------------------- 3. other tenants' objects
def test_3_other_tenants_ids_answer_like_missing_ones(served: Served) -> None:
    st, out = served.req("POST", "/v1/messages",
                         {"from": "a@acme.example", "to": "x@example.org", "subject": "s",
                          "text": "t"}, tenant="acme")  # fmt: skip
    assert st == 202, out
    mid = out["messages"][0]["ids"][0]
    st, out = served.req(
        "POST", "/v1/campaigns",
        {"template": {**TEMPLATE, "from": "a@acme.example"}, "paused": True,
         "recipients": [{"email": "y@example.org"}]}, tenant="acme",
    )  # fmt: skip
    assert st == 201, out
    cid = out["id"]
    missing_mid, missing_cid = mid + 10_000, cid + 10_000
    for method, path, other in [
        ("GET", f"/v1/messages/{mid}", f"/v1/messages/{missing_mid}"),
        ("GET", f"/v1/campaigns/{cid}", f"/v1/campaigns/{missing_cid}"),
        ("POST", f"/v1/campaigns/{cid}/pause", f"/v1/campaigns/{missing_cid}/pause"),
        ("POST", f"/v1/campaigns/{cid}/cancel", f"/v1/campaigns/{missing_cid}/cancel"),
    ]:
        st, out = served.req(method, path)
        st2, out2 = served.req(method, other)
        assert st == st2 == 404, (path, out)
        norm = orjson.dumps(out).replace(str(mid).encode(), b"N").replace(str(cid).encode(), b"N")
        norm2 = orjson.dumps(out2).replace(str(missing_mid).encode(), b"N")
        assert norm == norm2.replace(str(missing_cid).encode(), b"N")
    st, out = served.req("POST", f"/v1/campaigns/{cid}/recipients",
                         {"recipients": [{"email": "z@example.org"}]})  # fmt: skip
    assert st == 404, out
    st, out = served.req("POST", "/v1/messages", {"to": "z@example.org", "template": cid})
    st2, out2 = served.req("POST", "/v1/messages", {"to": "z@example.org", "template": missing_cid})
    assert st == st2 == 400
    assert out["error"]["message"].replace(str(cid), "N") == out2["error"]["message"].replace(
        str(missing_cid), "N"
    )
    # acme's campaign is untouched (still paused, not cancelled)
    st, out = served.req("GET", f"/v1/campaigns/{cid}", tenant="acme")
    assert st == 200 and out["status"] == "paused", out


def test_3_default_tenant_cannot_get_a_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[spool]\ndir = "spool"\n')
    for name in ("default", "DEFAULT"):
        r = subprocess.run(
            [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", name, "-c",
             str(tmp_path / "c.toml")], capture_output=True, text=True, env=ENV, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode != 0 and "reserved" in r.stderr, r.stderr
        assert "fs_" not in r.stdout
