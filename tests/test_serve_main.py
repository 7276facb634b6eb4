"""`fastsend serve` as a real process: end to end to a sink, /metrics, SIGHUP, SIGTERM.

The server runs as a subprocess with one worker and a static route to a
SinkThread; the test talks to it with aiohttp's client.
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

from conftest import free_port, wait_port
from fastsend.sink import SinkThread


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = orjson.dumps(body) if body is not None else None
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, url, data=data, headers=headers) as r,
        ):
            raw = await r.read()
            if "json" in r.headers.get("Content-Type", ""):
                return r.status, orjson.loads(raw)
            return r.status, raw.decode()

    return asyncio.run(go())


def write_config(path: Path, port: int, route: str) -> None:
    path.write_text(
        f"""
[spool]
dir = "spool"
[workers]
count = 1
[routes]
"*" = "{route}"
[delivery]
tls = "off"
idle_timeout = 1.0
[api]
listen = "127.0.0.1:{port}"
[dashboard]
admin_tenants = ["ops"]
"""
    )


class Served:
    def __init__(self, tmp: Path, route: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "fastsend.toml"
        write_config(self.cfg, self.port, route)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.key = subprocess.run(
            [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", "acme",
             "-c", str(self.cfg)],
            check=True, capture_output=True, text=True, env=env, cwd=tmp,
        ).stdout.strip()  # fmt: skip
        self.admin_key = subprocess.run(
            [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", "ops",
             "-c", str(self.cfg)],
            check=True, capture_output=True, text=True, env=env, cwd=tmp,
        ).stdout.strip()  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsend", "serve", "-c", str(self.cfg)],
            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_port("127.0.0.1", self.port, timeout=60)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in server output: {''.join(self.lines)}")
            time.sleep(0.02)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, body: Any) -> tuple[int, Any]:
        return http("POST", self.base + "/v1/messages", body, self.key)

    def get(self, path: str) -> tuple[int, Any]:
        return http("GET", self.base + path, None, self.key)

    def wait_state(self, mid: int, state: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st, m = self.get(f"/v1/messages/{mid}")
            assert st == 200, m
            if m["state"] == state:
                return dict(m)
            if time.monotonic() > deadline:
                raise TimeoutError(f"message {mid} is {m['state']}, not {state}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, SinkThread]]:
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}")
        try:
            yield s, sink
        finally:
            s.stop()


MSG = {"from": "a@example.com", "subject": "Hello", "text": "Hi there {{ not a var }}"}


def test_end_to_end_metrics_reload_and_drain(served: tuple[Served, SinkThread]) -> None:
    s, sink = served
    s.wait_line("ready in")
    # (no bound on the start's wall time here: 5.28 s on a loaded 2-core machine
    # failed this test; how fast serve starts is bench/'s to measure)
    st, body = s.post({**MSG, "to": ["one@example.org", "two@example.net"]})
    assert st == 202, body
    ids = body["messages"][0]["ids"]
    msgs = sink.wait_messages(2, timeout=60)
    m = s.wait_state(ids[0], "delivered")
    assert [e["event"] for e in m["events"]] == ["accepted", "delivered"]
    assert m["last_reply"]["code"] == 250
    data = b"".join(x.data for x in msgs)
    assert b"{{ not a var }}" in data  # user text is sent literally

    st, _ = http("GET", s.base + "/metrics")
    assert st == 401  # operational data: admin keys or the admin listener only
    st, text = http("GET", s.base + "/metrics", key=s.admin_key)
    assert st == 200
    assert 'fastsend_outcomes_total{state="delivered",domain="example.org"} 1' in text
    assert "fastsend_api_accepted_total 2" in text
    assert 'fastsend_reply_codes_total{code="250"}' in text
    assert 'fastsend_worker_up{worker="0"} 1' in text
    assert 'fastsend_spool_write_seconds_count{op="record_results"}' in text
    assert 'fastsend_messages{state="delivered"} 2' in text

    # SIGHUP: route to a second sink; the worker is replaced, the API stays up.
    with SinkThread() as sink2:
        write_config(s.cfg, s.port, f"{sink2.host}:{sink2.port}")
        s.proc.send_signal(signal.SIGHUP)
        s.wait_line("configuration reloaded")
        st, body = s.post({**MSG, "to": "three@example.org"})
        assert st == 202
        sink2.wait_messages(1, timeout=60)
        s.wait_state(body["messages"][0]["ids"][0], "delivered")
    assert not any("restarting" in ln for ln in s.lines)

    # SIGTERM: drains and exits 0; the HTTP port closes.
    assert s.stop() == 0
    s.wait_line("stopped after draining")
    with pytest.raises(OSError):
        wait_port("127.0.0.1", s.port, timeout=0.3)


def test_sigterm_keeps_accepted_mail(tmp_path: Path) -> None:
    """Mail accepted but not yet delivered (the route is down) stays queued."""
    s = Served(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        st, _ = s.post({"messages": [{**MSG, "to": f"u{i}@example.org"} for i in range(20)]})
        assert st == 202
        assert s.stop() == 0
    finally:
        s.stop()
    from fastsend.spool.sqlite import SQLiteSpool

    spool = SQLiteSpool(str(tmp_path / "spool"), readonly=True)
    counts = spool.counts()
    spool.close()
    assert counts["queued"] + counts["deferred"] == 20, counts
    assert counts["inflight"] == 0


def test_example_config_is_valid() -> None:
    from fastsend.config import load

    path = Path(__file__).resolve().parent.parent / "examples" / "fastsend.toml"
    cfg = load(str(path))
    s = cfg.api
    assert s.host_port == ("127.0.0.1", 8025)
    assert cfg.route_for("example.org") is not None


def test_apikey_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastsend.cli import main
    from fastsend.serve.auth import KeyStore

    spool = str(tmp_path / "spool")
    assert main(["apikey", "create", "--tenant", "acme", "--note", "ci", "--spool", spool]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("fs_")
    # fs_<8-char id>_<43-char secret>; the secret may itself contain "_".
    kid, secret = key[3:11], key[12:]
    store = KeyStore.for_spool(spool)
    assert store.verify(key) == (kid, "acme")
    raw = (tmp_path / "spool" / "apikeys.db").read_bytes()
    assert key.encode() not in raw and secret.encode() not in raw
    store.close()
    assert main(["apikey", "list", "--spool", spool]) == 0
    listing = capsys.readouterr().out
    assert "acme" in listing and key not in listing and secret not in listing
    assert main(["apikey", "revoke", kid, "--spool", spool]) == 0
    store = KeyStore.for_spool(spool)
    assert store.verify(key) is None
    store.close()
    assert main(["apikey", "create", "--tenant", "bad name", "--spool", spool]) == 2


def test_kill_9_of_serve_frees_its_port_and_ends_its_workers(tmp_path: Path) -> None:
    """A worker keeps no copy of the listeners and dies with its parent: after
    kill -9 of `fastsend serve` the API port refuses within a second, no worker
    is left, and the port can be bound again at once (a restart)."""
    import socket

    import psutil

    s = Served(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        deadline = time.monotonic() + 60
        kids: list[psutil.Process] = []
        while not kids:
            kids = psutil.Process(s.proc.pid).children(recursive=True)
            assert time.monotonic() < deadline, "no worker started"
            time.sleep(0.05)
        for k in kids:  # no worker holds a listening socket
            try:
                conns = k.net_connections("inet")
            except psutil.NoSuchProcess:  # a short-lived child already gone holds nothing
                continue
            assert not [c for c in conns if c.status == "LISTEN"], k
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(10)
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=0.2).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() - t0 < 1.0, "the API port still accepts after kill -9"
            time.sleep(0.02)
        def running() -> list[psutil.Process]:
            out = []
            for k in kids:
                try:
                    if k.status() != psutil.STATUS_ZOMBIE:
                        out.append(k)
                except psutil.NoSuchProcess:
                    pass
            return out

        while running():
            assert time.monotonic() - t0 < 1.0, f"workers outlived their parent: {running()}"
            time.sleep(0.02)
        with socket.socket() as b:  # a restarted node can listen there again
            b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            b.bind(("127.0.0.1", s.port))
    finally:
        s.stop()
