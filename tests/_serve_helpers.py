"""What the serve tests share: ``fastsend serve`` in a subprocess (:class:`Served`)
and its HTTP client, TLS certificates from a throwaway CA, a sink reader, and a
DSN builder. Fixtures built on these live in ``conftest.py``."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import trustme
from tests.conftest import ServeProcess, free_port

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
    timeout: float = 60.0,
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


def cli(*args: str, cwd: Path, umask: int = -1) -> str:
    return subprocess.run(
        [sys.executable, "-m", "fastsend", *args],
        check=True, capture_output=True, text=True, env=ENV, cwd=cwd, umask=umask,
    ).stdout.strip()  # fmt: skip


class Served:
    """``fastsend serve`` (conftest.ServeProcess) on a config of its own, with API
    keys for tenants acme and evil."""

    def __init__(
        self, tmp: Path, route: str | None, extra: str = "", delivery: str = "", umask: int = -1,
        api: str = "", spool_url: str = "", serve_args: tuple[str, ...] = (), routes: str = "",
        workers: int = 1,
    ) -> None:  # fmt: skip
        self.tmp = tmp
        self.routes = routes  # more lines of [routes]
        self.workers = workers
        self.port = free_port()
        self.cfg = tmp / "fastsend.toml"
        self.route = route
        self.extra = extra
        self.delivery = delivery
        self.api = api
        self.spool_url = spool_url  # a Redis spool ("" : SQLite in tmp/spool)
        self.write_config()
        self.keys = {t: cli("apikey", "create", "--tenant", t, "-c", str(self.cfg), cwd=tmp,
                            umask=umask)
                     for t in ("acme", "evil")}  # fmt: skip
        self.umask = umask
        self.serve_args = serve_args
        self.env: dict[str, str] = {}  # more environment for the next start
        self.client_tls: ssl.SSLContext | None = None
        self.start()

    def start(self) -> None:
        """Start the server (again, after a stop or a kill: same config and spool)."""
        self.server = ServeProcess(self.cfg, self.port, *self.serve_args, umask=self.umask,
                                   env=self.env)  # fmt: skip
        self.proc = self.server.proc
        self.wait_line("ready in")

    def write_config(self) -> None:
        self.cfg.write_text(
            f"""
[spool]
dir = "spool"
{f'url = "{self.spool_url}"' if self.spool_url else ""}
[workers]
count = {self.workers}
[routes]
{f'"*" = "{self.route}"' if self.route else ""}
{self.routes}
[delivery]
tls = "off"
idle_timeout = 1.0
{self.delivery}
[api]
listen = "127.0.0.1:{self.port}"
{self.api}
{self.extra}
"""
        )

    @property
    def lines(self) -> list[str]:
        """What the server printed so far (serve.log), line by line."""
        return self.server.lines

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        self.server.wait_line(text, timeout)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def req(self, method: str, path: str, body: Any = None, tenant: str | None = "evil",
            **kw: Any) -> tuple[int, Any]:  # fmt: skip
        return http(method, self.base + path, body, self.keys[tenant] if tenant else None, **kw)

    def stop(self) -> int:
        return self.server.stop()


def until(what: str, ok: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``ok`` every 0.1 s until it returns something true and return that;
    fail naming ``what`` (and the last answer) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = ok()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {got!r})"
        time.sleep(0.1)


def sink_message(sink: SinkThread, marker: bytes, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in list(sink.messages):
            if marker in m.data:
                return bytes(m.data)
        time.sleep(0.05)
    raise TimeoutError(f"no message with {marker!r} at the sink")


def make_certs(d: Path) -> tuple[str, str, ssl.SSLContext]:
    """A throwaway CA's certificate for localhost/127.0.0.1 in ``d``: (cert.pem,
    key.pem, a client context that trusts it)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(d / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return str(d / "cert.pem"), str(d / "key.pem"), client


DSN = """From: MAILER-DAEMON@mx.example.org
To: {envelope_to}
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

Your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown

--B
Content-Type: text/rfc822-headers

From: News <news@example.com>
To: {to}
Subject: Hi
Message-ID: <{mid}@example.com>

--B--
"""


def dsn(rcpt: str, mid: str | int, *, to: str = "", envelope_to: str = "") -> str:
    """A Postfix-style DSN (RFC 3464) reporting ``rcpt`` as unknown (5.1.1); the
    returned headers carry Message-ID ``<mid@example.com>`` and To ``to``
    (default: ``rcpt``)."""
    return DSN.format(rcpt=rcpt, mid=mid, to=to or rcpt,
                      envelope_to=envelope_to or "bounces@bounces.example.com")  # fmt: skip


def answers_while(node: Served, threads: list[Any], timeout: float, pause: float) -> None:
    """``node``'s HTTP listener answers what needs no Redis (GET /v1/openapi.json,
    each within ``timeout`` s, every ``pause`` s) for as long as any of ``threads``
    (requests waiting for a slow Redis) runs: its event loop is free while they wait."""
    while any(t.is_alive() for t in threads):
        st, doc = http("GET", node.base + "/v1/openapi.json", timeout=timeout)
        assert st == 200 and "paths" in doc
        time.sleep(pause)
