"""Nodes on one Redis: when Redis goes away for a while and comes back, and
the limits they share.

Real parts: redis-server (AOF, ``appendfsync always``: every acknowledged write
is on disk), two ``fastsend serve`` nodes with distinct source IPs, a sink
process logging every recipient. Redis is killed (kill -9) while the nodes
deliver, and started again a few seconds later on the same port and data.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests._engine_helpers import received_counts
from tests.test_multinode import TPL, Node, _req, _rows

from conftest import free_port, require_program, wait_port
from fastsend.sink import SinkProcess
from fastsend.spool import open_spool

N = 3000
IPS = ["127.0.0.2", "127.0.0.3"]


class Redis:
    """A redis-server that can be killed and started again on its port and data."""

    def __init__(self, d: Path) -> None:
        self.exe = require_program("redis-server")
        self.dir = d
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port("127.0.0.1", self.port)
        # Listening is not answering: it loads its AOF first (LOADING), which took
        # long enough on a loaded machine for the test's own open_spool to fail.
        import redis

        client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.BusyLoadingError:
                    assert time.monotonic() < deadline, "Redis still loading after 30 s"
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def test_nodes_survive_a_redis_restart_and_deliver_everything(tmp_path: Path) -> None:
    """Two nodes deliver a campaign; Redis is killed mid-delivery and comes back
    3 s later. Both nodes stay up, say the spool was out of reach and answers
    again, and go on: every recipient accepted is delivered, none lost (the
    duplicates are within the windows in flight). Before: the supervisor's loop
    ended at the first refused connection while serve kept answering the API,
    so nothing more was ever delivered (the rest stayed queued and in flight)."""
    rdir = tmp_path / "redis"
    rdir.mkdir()
    redis = Redis(rdir)
    redis.start()
    log = tmp_path / "sink.jsonl"
    url = f"redis://127.0.0.1:{redis.port}/0?prefix=out&lease=4"
    nodes: list[Node] = []
    try:
        with SinkProcess("--log", str(log), "--latency-ms", "2") as sink:
            key = subprocess.run(
                [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", "acme",
                 "--spool", url],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            nodes = [
                Node(tmp_path, f"n{i}", ip, url, sink.addresses[0]) for i, ip in enumerate(IPS)
            ]
            for n in nodes:
                n.wait_ready()
            cid = asyncio.run(_inject(nodes, key))
            spool = open_spool(url)
            deadline = time.monotonic() + 60
            while spool.counts(cid)["delivered"] < N // 5:
                assert time.monotonic() < deadline, spool.counts(cid)
                time.sleep(0.01)
            spool.close()
            redis.kill()
            time.sleep(3.0)
            # Each node met the outage (a node stalled through those 3 s on a loaded
            # CI has not yet: it would then never say so, nor that it answers again).
            deadline = time.monotonic() + 60
            while not all("the spool is out of reach" in n.output() for n in nodes):
                assert time.monotonic() < deadline, [n.output()[-2000:] for n in nodes]
                assert all(n.proc.poll() is None for n in nodes), [n.output() for n in nodes]
                time.sleep(0.05)
            assert all(n.proc.poll() is None for n in nodes), [n.output() for n in nodes]
            redis.start()
            spool = open_spool(url)
            deadline = time.monotonic() + 60
            while (c := spool.counts(cid))["delivered"] < N:
                assert time.monotonic() < deadline, c
                time.sleep(0.2)
            assert c["inflight"] == 0 and c["queued"] == 0, c
            spool.close()
            for n in nodes:
                assert n.proc.poll() is None, n.output()
                out = n.output()
                assert "the spool is out of reach" in out, out[-3000:]
                assert "the spool answers again" in out, out[-3000:]
            for n in nodes:
                n.proc.send_signal(signal.SIGTERM)
            for n in nodes:
                assert n.proc.wait(60) == 0, n.output()[-3000:]
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.kill()
        redis.stop()
    got = received_counts(log)
    want = {r["email"] for r in _rows("m", N)}
    assert set(got) == want, f"lost {len(want - set(got))}"
    assert sum(v - 1 for v in got.values()) <= 2 * 300  # at most the windows in flight


def test_a_node_rides_out_a_redis_that_refuses_writes(tmp_path: Path) -> None:
    """Redis answers but takes no writes for a while: a failover made it a
    replica (READONLY), as Sentinel does to a master it demotes. The node
    keeps what it holds and says the spool is out of reach, and once writes
    are taken again it delivers every recipient and drains on SIGTERM (exit
    0), no traceback. Before: the first refused write (a plain ResponseError)
    ended the supervisor's run while serve went on answering the API: nothing
    more was delivered, ever, and SIGTERM killed the process (no drain)."""
    import redis as redis_py

    rdir = tmp_path / "redis"
    rdir.mkdir()
    redis = Redis(rdir)
    redis.start()
    log = tmp_path / "sink.jsonl"
    url = f"redis://127.0.0.1:{redis.port}/0?prefix=ro&lease=4"
    n = 900  # ~1.5 s at the nodes' campaign_rate (600/s)
    node = None
    r = redis_py.Redis(port=redis.port)
    try:
        with SinkProcess("--log", str(log), "--latency-ms", "5") as sink:
            key = subprocess.run(
                [sys.executable, "-m", "fastsend", "apikey", "create", "--tenant", "acme",
                 "--spool", url],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            node = Node(tmp_path, "n0", IPS[0], url, sink.addresses[0])
            node.wait_ready()
            cid = asyncio.run(_inject([node], key, n))
            spool = open_spool(url)
            deadline = time.monotonic() + 60
            while spool.counts(cid)["delivered"] < n // 10:
                assert time.monotonic() < deadline, spool.counts(cid)
                time.sleep(0.01)
            before = len(node.output())
            r.execute_command("REPLICAOF", "127.0.0.1", "1")
            try:
                # Becoming a replica, Redis also closes the connections blocked
                # in a command: the node's first refused call may be that
                # ConnectionError, and its next tries the ReadOnlyError (said
                # once per outage). Either starts the outage; writes stay
                # refused 3 s more, so the node's retries meet READONLY.
                deadline = time.monotonic() + 30
                while "the spool is out of reach (" not in node.output()[before:]:
                    assert node.proc.poll() is None and time.monotonic() < deadline, node.output()[
                        -3000:
                    ]
                    time.sleep(0.05)
                time.sleep(3)
                assert node.proc.poll() is None, node.output()[-3000:]
            finally:
                r.execute_command("REPLICAOF", "NO", "ONE")
            deadline = time.monotonic() + 60
            while (c := spool.counts(cid))["delivered"] < n:
                assert time.monotonic() < deadline, (c, node.output()[-3000:])
                time.sleep(0.1)
            spool.close()
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(60) == 0, node.output()[-3000:]
            out = node.output()
            assert "the spool answers again" in out and "Traceback" not in out, out[-3000:]
    finally:
        if node is not None and node.proc.poll() is None:
            node.proc.kill()
        redis.stop()
    assert set(received_counts(log)) == {r["email"] for r in _rows("m", n)}


async def _inject(nodes: list[Node], key: str, n: int = N) -> int:
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0), force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        rows = _rows("m", n)
        first = await _req(s, "POST", nodes[0].base + "/v1/campaigns", key,
                           {"name": "main", "template": TPL, "recipients": rows[:1000]},
                           ok=201)  # fmt: skip
        cid = int(first["id"])
        for i in range(1000, n, 1000):
            await _req(s, "POST", f"{nodes[(i // 1000) % len(nodes)].base}/v1/campaigns/{cid}/recipients",
                       key, {"recipients": rows[i : i + 1000]}, ok=202)  # fmt: skip
        return cid


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_transports_rate_holds_for_every_node_together(
    nodes: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A provider account's rate (``[transports.mg] rate = 20``, the Mailgun
    account's) is one limit, however many nodes send through it: two nodes on
    one Redis spool (two ``fastsend send``, each with its own list) together
    stay within it, as the provider counts: in any 3 s the provider accepts at
    most what the rate allows (its burst, 3 s of rate, and 2 s of slack for a
    stalled process). One node (a SQLite spool) keeps it too. Before: each
    node kept the whole rate for itself, so two nodes sent twice it, and each
    worker's bucket took a burst of 1000 (Mailgun's recipients per request), so
    even one node sent its 150 messages within a second. Every recipient is
    delivered once."""
    from tests._engine_helpers import fastsend_cmd
    from tests._provider_servers import Recorder, ThreadedApp, mailgun_app

    rate, per_node, window = 20, 150, 3.0
    prefix = "tr" + tmp_path.name[-6:]
    rec = Recorder()
    camp = tmp_path / "campaign.toml"
    camp.write_text(
        'from = "T <news@sender.example.com>"\nsubject = "Hi {{ name }}"\ntext = "Dear {{ name }}"\n'
    )
    procs = []
    with ThreadedApp(mailgun_app("mg-key", rec, "mg.sender.example.com")) as app:
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            f'[transports.mg]\nkind = "mailgun"\nendpoint = "{app.url}"\n'
            f'domain = "mg.sender.example.com"\nrate = {rate}\n[routes]\n"*" = "mg"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
        env["FASTSEND_MG_API_KEY"] = "mg-key"
        for node, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3"))[:nodes]:
            lst = tmp_path / f"{node}.csv"
            lst.write_text(
                "email,name\n"
                + "".join(f"{node}{i}@d{i % 5}.example,n{i}\n" for i in range(per_node))
            )
            url: Any = tmp_path / "spool"
            if nodes > 1:
                server = request.getfixturevalue("redis_server")
                url = server.url(node=node, dir=str(tmp_path / node), prefix=prefix)
            procs.append(subprocess.Popen(
                fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                             "--spool", url, "--workers", "1", "--source-ip", ip, "--json",
                             "--no-progress", "--max-wait", "5"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            ))  # fmt: skip
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    want = {f"{n}{i}@d{i % 5}.example" for n in "ab"[:nodes] for i in range(per_node)}
    assert dict(rec.recipients) == {r: 1 for r in want}
    times = sorted(rec.times)
    most = max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))
    allowed = rate + rate * window + 2 * rate  # the burst, the window's rate, 2 s of slack
    assert most <= allowed, (
        f"{most} accepted within {window:g} s; the account's rate allows {allowed}"
    )


def test_a_node_whose_clock_is_off_says_so(redis_server: Any, tmp_path: Path) -> None:
    """Expiry and event times are decided by each node's clock, and due and
    retry times, leases and shared rates by Redis's (test_multinode_audit24):
    a node whose clock is two minutes ahead
    says so at start, naming the gap (here ``fastsend send`` with its
    ``time.time`` shifted); one in step says nothing. Before: nothing was
    said, and such a node retried every deferral two minutes early."""
    from tests._engine_helpers import fastsend_cmd

    shift = tmp_path / "shift"
    shift.mkdir()
    (shift / "sitecustomize.py").write_text(
        "import time\n_t = time.time\ntime.time = lambda: _t() + 120.0\n"
    )
    camp = tmp_path / "campaign.toml"
    camp.write_text('from = "T <news@sender.example.com>"\nsubject = "Hi"\ntext = "Dear"\n')
    lst = tmp_path / "list.csv"
    lst.write_text("email\na@example.com\n")
    outs = {}
    for name, extra in (("skewed", [str(shift)]), ("in-step", [])):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*extra, env.get("PYTHONPATH", "")])
        url = redis_server.url(node=name, dir=str(tmp_path / name))
        proc = subprocess.run(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "--spool", url,
                         "--route", "*=127.0.0.1:9", "--workers", "1", "--json",
                         "--no-progress", "--max-wait", "0"),
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        outs[name] = proc.stderr
    assert "clock is 120." in outs["skewed"] and "ahead of the shared spool" in outs["skewed"], (
        outs["skewed"][-2000:]
    )
    assert "clock is" not in outs["in-step"], outs["in-step"][-2000:]


def _send_nodes(
    tmp: Path, redis_server: Any, cfg: Path, per_node: int, env: dict[str, str], tag: str
) -> list[tuple[subprocess.Popen[str], str, str]]:
    """Two ``fastsend send`` nodes (a, b) on one Redis spool, each with its own list,
    started together; -> each process with its stdout and stderr once it ended."""
    from tests._engine_helpers import fastsend_cmd

    camp = tmp / "campaign.toml"
    camp.write_text(
        'from = "T <news@sender.example.com>"\nsubject = "Hi {{ name }}"\ntext = "Dear {{ name }}"\n'
    )
    prefix = tag + tmp.name[-6:]
    procs = []
    for node, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        lst = tmp / f"{node}.csv"
        lst.write_text(
            "email,name\n" + "".join(f"{node}{i}@d{i % 5}.example,n{i}\n" for i in range(per_node))
        )
        url = redis_server.url(node=node, dir=str(tmp / node), prefix=prefix)
        procs.append(subprocess.Popen(
            fastsend_cmd("send", str(camp), "-r", str(lst), "--no-dkim", "-c", str(cfg),
                         "--spool", url, "--workers", "1", "--source-ip", ip, "--json",
                         "--no-progress", "--max-wait", "5"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ))  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p, o, e) for p, (o, e) in zip(procs, outs, strict=True)]


def test_a_relays_max_connections_hold_for_every_node_together(
    redis_server: Any, tmp_path: Path
) -> None:
    """A relay that takes 2 sessions at once (``max_connections = 2``, the
    relay's own cap: above it, 421 at connect) and two nodes on one Redis
    spool sending through it: together they hold at most 2 sessions, so the
    relay never refuses one, and no message is deferred. Before: each node
    opened its 2 and the relay refused the extra ones (deferrals, connections
    over the site's cap)."""
    import orjson

    log = tmp_path / "sink.jsonl"
    with SinkProcess("--log", str(log), "--max-connections", "2", "--latency-ms", "20",
                     "--auth", "u:p") as sink:  # fmt: skip
        cfg = tmp_path / "fastsend.toml"
        cfg.write_text(
            "[retry]\nmin_backoff = 1.0\nmax_backoff = 1.0\njitter = 0.0\n"
            f'[transports.relay1]\nkind = "relay"\nhost = "{sink.host}"\nport = {sink.port}\n'
            'tls = "off"\nauth_mechanism = "plain"\nauth_in_clear = true\nmax_connections = 2\n[routes]\n"*" = "relay1"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "FASTSEND_NO_EXTENSIONS"}
        env |= {"FASTSEND_RELAY1_USERNAME": "u", "FASTSEND_RELAY1_PASSWORD": "p"}
        ran = _send_nodes(tmp_path, redis_server, cfg, 300, env, "rc")
    for p, out, err in ran:
        assert p.returncode == 0, err[-3000:]
        s = orjson.loads([x for x in out.splitlines() if x.startswith("{")][-1])
        assert s["deferrals"] == 0 and s["delivered"] == 300, (s, err[-2000:])
    got = received_counts(log)
    assert len(got) == 600 and set(got.values()) == {1}, len(got)
