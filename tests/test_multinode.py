"""Three `fastsend serve` nodes on one Redis behind a real HAProxy, as one MTA.

Real parts: redis-server (AOF on), HAProxy (PROXY v2 to each node's API), three
serve processes with distinct source IPs 127.0.0.2-4, a sink process logging
every recipient. Recipients are injected through HAProxy's API port in batches;
one node is killed with kill -9 mid-run. Checked against the sink's log: every
recipient delivered at least once, duplicates within the dead node's window,
every source IP used; a suppression added on one node is honoured by all; a
campaign paused on one node stops on all; a message accepted by one node is
answered by another; a node refuses a Redis without AOF and an IP another
live node holds.

Size: MULTINODE_N recipients (CI-friendly on 2 shared cores); bench/multinode.py
runs the same shape at 60,000.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from tests._engine_helpers import received_counts, sink_log
from tests._haproxy_helpers import start_haproxy
from tests._redis_helpers import start_redis

from conftest import free_port
from fastsend.sink import SinkProcess
from fastsend.spool import open_spool

MULTINODE_N = int(os.environ.get("MULTINODE_N", "6000"))
BATCH = 1000
WINDOW = 300  # [delivery] window of each node's one worker
IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
PAUSED_N = 3000


class Hooks:
    """A webhook receiver: every event posted, with its event_id."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        hooks = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hooks.events.extend(orjson.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Node:
    def __init__(self, tmp: Path, name: str, ip: str, url: str, sink: tuple[str, int],
                 *extra: str, hook: int = 0, delivery: str = "") -> None:  # fmt: skip
        self.name, self.ip = name, ip
        self.port = free_port()
        d = tmp / name
        d.mkdir(exist_ok=True)
        self.cfg = d / "fastsend.toml"
        self.cfg.write_text(
            f"""
[spool]
url = "{url}&node={name}&dir={d / "local"}"
[workers]
count = 1
[ips]
source = ["{ip}"]
[routes]
"*" = "{sink[0]}:{sink[1]}"
[delivery]
tls = "off"
window = {WINDOW}
batch_size = 50
{delivery}
[api]
listen = "127.0.0.1:{self.port}"
rate_limit = 100000
[proxy]
trusted = ["127.0.0.1"]
[dashboard]
admin_tenants = ["acme"]
[shaping.dispatch]
campaign_rate = {max(600, MULTINODE_N // 10)}
tenants = {{ slow = 300 }}
"""
            + (
                f"""
[webhooks]
urls = ["http://127.0.0.1:{hook}/hook"]
secret = "test-webhook-secret"
events = ["delivered"]
batch_size = 1000
"""
                if hook
                else ""
            )
        )
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsend", "serve", "-c", str(self.cfg), *extra],
            stderr=subprocess.PIPE, text=True, cwd=d,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while "ready in" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _req(s: aiohttp.ClientSession, method: str, url: str, key: str, body: Any = None,
               ok: int = 200) -> Any:  # fmt: skip
    async with s.request(
        method, url, data=None if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    ) as r:  # fmt: skip
        raw = await r.read()
        assert r.status == ok, (method, url, r.status, raw[:500])
        return orjson.loads(raw) if raw else None


def _rows(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"email": f"{prefix}{i}@d{i % 7}.example", "name": f"n{i}"} for i in range(n)]


def test_node_refuses_volatile_redis_and_a_live_nodes_ip(tmp_path: Path) -> None:
    with start_redis() as server:  # appendonly no
        url = server.url()
        sink = ("127.0.0.1", 9)
        a = Node(tmp_path, "a", "127.0.0.2", url, sink)
        a.proc.wait(30)
        assert a.proc.returncode == 2 and "appendonly no" in a.output(), a.output()
        assert "--allow-volatile" in a.output()
        a = Node(tmp_path, "a", "127.0.0.2", url, sink, "--allow-volatile", "--no-workers")
        a.wait_ready()
        assert "survives nothing" in a.output()
        b = Node(tmp_path, "b", "127.0.0.2", url, sink, "--allow-volatile", "--no-workers")
        b.proc.wait(30)
        assert b.proc.returncode == 2, b.output()
        assert "127.0.0.2 (node a)" in b.output(), b.output()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(30) == 0
        # A clean exit gives the IP back at once.
        b = Node(tmp_path, "b", "127.0.0.2", url, sink, "--allow-volatile", "--no-workers")
        b.wait_ready()
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(30) == 0


def test_three_nodes_behind_haproxy(tmp_path: Path) -> None:
    log = tmp_path / "sink.jsonl"
    with (
        start_redis("--appendonly", "yes", "--appendfsync", "everysec") as server,
        SinkProcess("--log", str(log), "--latency-ms", "2") as sink,
    ):
        url = server.url(lease="4")
        key, slow_key = (
            subprocess.run(
                [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", tenant,
                 "--spool", url],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            for tenant in ("acme", "slow")
        )  # fmt: skip
        hooks = Hooks()
        nodes = [
            Node(tmp_path, f"n{i}", ip, url, sink.addresses[0], hook=hooks.port)
            for i, ip in enumerate(IPS)
        ]
        for n in nodes:
            n.wait_ready()
            assert "an acknowledged message survives a" in n.output()
        lb = free_port()
        servers = "\n".join(
            f"    server {n.name} 127.0.0.1:{n.port} send-proxy-v2 check check-send-proxy"
            " inter 300 fall 1 rise 2"
            for n in nodes
        )
        cfg = f"""
frontend api
    mode tcp
    bind 127.0.0.1:{lb}
    default_backend api
backend api
    mode tcp
    balance roundrobin
    retries 3
    option redispatch 1
{servers}
"""
        spool = open_spool(url)
        r = spool.r
        r.config_resetstat()
        try:
            with start_haproxy(cfg, [lb]):
                out = asyncio.run(_run(nodes, key, slow_key, f"http://127.0.0.1:{lb}", spool))
            # Everything Redis ran for the serve path (API, claims, outcomes, events,
            # index, webhooks, dashboards, leases), per recipient: reported, not timed.
            calls = sum(v["calls"] for v in r.info("commandstats").values())
            out["redis_per_msg"] = calls / (MULTINODE_N + PAUSED_N)
            # The outbox drained to the receiver: every delivery the sink logged has
            # its event (the sink writes its log within a second).
            deadline = time.monotonic() + 60
            while True:
                time.sleep(1.0)
                hooked = {e["rcpt"] for e in list(hooks.events)}
                sent = {r for rec in sink_log(log) for r in rec["recipients"]}
                if sent <= hooked:
                    break
                if time.monotonic() > deadline:
                    break  # the assertion below says how many
            out["hooks"] = list(hooks.events)
        finally:
            for n in nodes:
                if n.proc.poll() is None:
                    n.proc.send_signal(signal.SIGTERM)
            for n in nodes:
                try:
                    n.proc.wait(60)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
            spool.close()
    # The sink has exited: its log is complete.
    held, blocked = out["held"], out["blocked"]
    got = received_counts(log)
    main = {a: n for a, n in got.items() if a.startswith("m")}
    want = {r["email"] for r in _rows("m", MULTINODE_N)} - set(blocked)
    assert set(main) == want, f"lost {len(want - set(main))}, unexpected {len(set(main) - want)}"
    dups = sum(n - 1 for n in main.values())
    assert dups <= out["taken_over"], f"{dups} duplicates exceed the windows taken over"
    # The paused campaign: what the sink got is what the spool says was delivered
    # (before the pause took effect), nothing after.
    # A window taken over from a node whose lease lapsed under load may have been
    # delivered without its outcome being accepted: bounded by what was taken over.
    paused = {a for a in got if a.startswith("p")}
    assert out["paused_delivered"] <= len(paused) <= out["paused_delivered"] + out["taken_over"]
    assert len(paused) < PAUSED_N
    peers = Counter(rec["peer"] for rec in sink_log(log) for _ in rec["recipients"])
    assert set(IPS) <= set(peers), peers
    # The shared webhook outbox: each event posted once (one sender node at a
    # time), and every delivery has its "delivered" event, those of the node
    # killed with kill -9 included: its events went into the outbox with its
    # outcomes, and what it delivered without recording was sent again by another
    # node (which posted the event).
    # Delivery is at least once: a batch the frozen-then-killed node had POSTed
    # (received here) but not acknowledged is sent again by the node that takes
    # its hold over. Nothing else is posted twice: the repeats are one run of
    # consecutive events of the outbox, at most one batch ([webhooks] batch_size).
    times = Counter(e["event_id"] for e in out["hooks"])
    uniq = sorted(times)
    again = [k for k, i in enumerate(uniq) if times[i] > 1]  # positions in the outbox order
    assert max(times.values()) <= 2, "an event was posted three times"
    if again:
        assert len(again) <= 1000 and again == list(range(again[0], again[-1] + 1)), (
            f"events posted twice beyond one unacknowledged batch: {[uniq[k] for k in again]}"
        )
    hooked = {e["rcpt"] for e in out["hooks"] if e["event"] == "delivered"}
    sent = {r for rec in sink_log(log) for r in rec["recipients"]}
    assert sent <= hooked, f"{len(sent - hooked)} deliveries without a webhook event"
    print(f"\nmultinode: {MULTINODE_N} recipients, dead node's window {held}, duplicates {dups},"
          f" per IP {dict(peers)}, taken over {out['taken_over']},"
          f" Redis commands per recipient {out['redis_per_msg']:.2f}")  # fmt: skip


async def _cluster(s: aiohttp.ClientSession, base: str, key: str, n: int) -> dict[str, Any]:
    """GET /v1/dashboard/workers' cluster view once it lists n live nodes."""
    deadline = time.monotonic() + 60
    while True:
        view = (await _req(s, "GET", base + "/v1/dashboard/workers", key))["cluster"]
        if view["count"] == n or time.monotonic() > deadline:
            return dict(view)
        await asyncio.sleep(0.2)


async def _run(nodes: list[Node], key: str, slow_key: str, lb: str, spool: Any) -> dict[str, Any]:
    n1, n2, n3 = nodes
    # From 127.0.0.9: HAProxy (127.0.0.1) is the nodes' only trusted proxy; a direct
    # call from an untrusted address needs no PROXY header.
    # force_close: HAProxy in TCP mode ties a kept-alive connection to one node, and
    # one node dies here; each request takes a fresh connection (a fresh choice).
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0), force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        # Suppression added on node 1 only, before the recipients arrive (through
        # any node): honoured by every node's injection.
        blocked = [f"m{i}@d{i % 7}.example" for i in range(0, MULTINODE_N, 97)]
        await _req(s, "POST", n1.base + "/v1/suppressions", key,
                   {"addresses": blocked, "reason": "manual"}, ok=201)  # fmt: skip
        # Campaign "other" of tenant "slow" (300/s for all nodes together), paused
        # on node 3 once under way: every node stops dispatching it.
        prow = _rows("p", PAUSED_N)
        other = await _req(s, "POST", lb + "/v1/campaigns", slow_key,
                           {"name": "other", "template": TPL,
                            "recipients": prow[:BATCH]}, ok=201)  # fmt: skip
        pid = other["id"]
        for i in range(BATCH, PAUSED_N, BATCH):
            await _req(s, "POST", f"{lb}/v1/campaigns/{pid}/recipients", slow_key,
                       {"recipients": prow[i : i + BATCH]}, ok=202)  # fmt: skip
        deadline = time.monotonic() + 60
        while spool.counts(pid)["delivered"] < 200:
            assert time.monotonic() < deadline, spool.counts(pid)
            await asyncio.sleep(0.05)
        await _req(s, "POST", f"{n3.base}/v1/campaigns/{pid}/pause", slow_key)
        # Within a second of the pause (in-flight batches finish), nothing more of it.
        await asyncio.sleep(1.5)
        c = spool.counts(pid)
        assert c["inflight"] == 0 and c["queued"] > 0, c
        paused_at = c["delivered"]
        # The dashboard of any node shows every live node, with its IPs (admin key).
        view = await _cluster(s, n1.base, key, 3)
        assert {n["node"]: n["ips"] for n in view["nodes"]} == {
            n.name: [n.ip] for n in nodes
        }, view
        assert all(n["lease_age_s"] is not None for n in view["nodes"])
        # "main" through HAProxy in batches; node 2 killed (kill -9) half way, while
        # it holds a window. HAProxy's checks take it out; injection goes on.
        rows = _rows("m", MULTINODE_N)
        first = await _req(s, "POST", lb + "/v1/campaigns", key,
                           {"name": "main", "template": TPL, "recipients": rows[:BATCH]},
                           ok=201)  # fmt: skip
        cid = first["id"]
        k = spool.k
        held = 0
        for i in range(BATCH, MULTINODE_N, BATCH):
            await _req(s, "POST", f"{lb}/v1/campaigns/{cid}/recipients", key,
                       {"recipients": rows[i : i + BATCH]}, ok=202)  # fmt: skip
            if not held and i >= MULTINODE_N // 2:
                # Freeze the whole node (SIGSTOP) at a moment it holds a window, then
                # kill it (its workers too: they hold the inherited listening socket,
                # which would keep accepting for a dead node).
                deadline = time.monotonic() + 30
                procs = [psutil.Process(n2.proc.pid)]
                procs += procs[0].children(recursive=True)
                while True:
                    assert time.monotonic() < deadline, "node 2 never held a window"
                    if spool.r.scard(f"{k}:fl:{n2.name}"):
                        for p in procs:
                            p.suspend()
                        held = int(spool.r.scard(f"{k}:fl:{n2.name}"))
                        if held:
                            break
                        for p in procs:
                            p.resume()
                    await asyncio.sleep(0.002)
                for p in procs:
                    p.kill()
                n2.proc.wait(30)
                psutil.wait_procs(procs[1:], timeout=10)
                assert held <= WINDOW
        # A message accepted by node 1 is answered by node 3.
        one = await _req(s, "POST", n1.base + "/v1/messages", key,
                         {"from": "a@example.com", "to": "solo@d1.example",
                          "subject": "s", "text": "t"}, ok=202)  # fmt: skip
        mid = one["messages"][0]["ids"][0]
        for _ in range(50):  # node 1 writes its index within 0.2 s
            got = await _req(s, "GET", f"{n3.base}/v1/messages/{mid}", key)
            if any(e["event"] == "accepted" for e in got["events"]):
                break
            await asyncio.sleep(0.1)
        assert any(e["event"] == "accepted" for e in got["events"]), got
        # Everything of "main" ends up final, the dead node's window included.
        deadline = time.monotonic() + 120
        while True:
            c = spool.counts(cid)
            if c["delivered"] + c["suppressed"] == MULTINODE_N:
                break
            assert time.monotonic() < deadline, c
            await asyncio.sleep(0.2)
        assert c["suppressed"] == len(blocked)
        c = spool.counts(pid)
        assert c["delivered"] == paused_at and c["inflight"] == 0, "a paused campaign was sent"
        st = await _req(s, "GET", f"{n1.base}/v1/campaigns/{pid}", slow_key)
        assert st["status"] == "paused"
        # The dead node drops out of the cluster view; the per-domain counts of the
        # event index are the cluster's (any node answers the same).
        view = await _cluster(s, n3.base, key, 2)
        assert sorted(n["node"] for n in view["nodes"]) == [n1.name, n3.name]
        by_dom = await _req(s, "GET", f"{n3.base}/v1/stats?by=domain&window=1h", key)
        got = {d: g["counts"].get("delivered", 0) for d, g in by_dom["groups"].items()}
        assert set(got) >= {f"d{i}.example" for i in range(7)}, got
        assert sum(got.values()) >= MULTINODE_N // 2, got
        # The dead node's window was taken over (and any window of a node whose lease
        # lapsed under load), and every node's metrics say so.
        taken = spool.stats()["taken_over"]
        assert taken >= held, (taken, held)
        async with s.get(n3.base + "/metrics", headers={"Authorization": f"Bearer {key}"}) as r:
            assert f"fastsend_redelivered_total {taken}" in await r.text()
    return {"held": held, "blocked": blocked, "paused_delivered": paused_at, "taken_over": taken}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
