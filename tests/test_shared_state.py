"""State shared by nodes on one Redis: API keys and revocations, suppression per
tenant, the webhook outbox (one sender per URL, in order, taken over when the
sender's lease lapses) and the per-message event index, each seen by a second
node (a second object with its own connection) as soon as the first writes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
from tests._redis_helpers import RedisServer

from fastsend.serve import shared_state
from fastsend.serve.shared_state import (
    RedisEventIndex,
    RedisKeyStore,
    RedisOutbox,
    RedisSuppressionList,
)
from fastsend.suppression import SuppressionError


def _two(server: RedisServer) -> tuple[redis.Redis, redis.Redis, str]:
    a = redis.Redis(host="127.0.0.1", port=server.port)
    b = redis.Redis(host="127.0.0.1", port=server.port)
    return a, b, "st" + str(time.monotonic_ns())


def test_api_keys_shared_and_revocation_seen_within_cache(redis_server: RedisServer) -> None:
    ra, rb, p = _two(redis_server)
    a, b = RedisKeyStore(ra, p), RedisKeyStore(rb, p)
    key, rec = a.create("acme", "ci")
    assert b.verify(key) == (rec.id, "acme")
    assert b.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert [k.id for k in b.list("acme")] == [rec.id] and b.list("other") == []
    assert b.revoke(rec.id) and not b.revoke(rec.id)
    time.sleep(0.6)  # a's cached row is older than the 0.5 s cache
    assert a.verify(key) is None
    with pytest.raises(Exception, match="default"):
        a.create("default")
    # Only hashes are stored.
    assert key.encode() not in b"".join(v for v in ra.hgetall(f"{{{p}}}:key:{rec.id}").values())


def test_suppression_shared_per_tenant(redis_server: RedisServer) -> None:
    ra, rb, p = _two(redis_server)
    a, b = RedisSuppressionList(ra, p), RedisSuppressionList(rb, p)
    a.add("Ann@Example.ORG", "bounce", tenant="acme", source="dsn")
    assert b.contains("ann@example.org", tenant="acme")
    assert not b.contains("ann@example.org", tenant="globex")
    assert b.contains_many(["ANN@example.org", "bob@example.org", "bad"], tenant="acme") == {
        "ANN@example.org"
    }
    e = b.get("ann@example.org", tenant="acme")
    assert e is not None and e.reason == "bounce" and e.source == "dsn"
    # All-or-nothing: a malformed address stores nothing.
    with pytest.raises(SuppressionError):
        a.add_many(["ok@example.org", "not an address"], tenant="acme")
    assert not b.contains("ok@example.org", tenant="acme")
    assert a.import_text("address,reason\nx@example.net,complaint\n", tenant="globex") == 1
    assert [x.address for x in b.list(tenant=None)] == ["Ann@example.org", "x@example.net"]
    a.add("t@example.org", tenant="acme", expires_in=1.0)  # (0.2 s: a loaded CI's stall)
    assert b.contains("t@example.org", tenant="acme")
    time.sleep(1.1)
    assert not b.contains("t@example.org", tenant="acme")
    assert b.purge_expired() == 1
    assert b.remove("ann@example.org", tenant="acme") and not a.contains(
        "ann@example.org", tenant="acme"
    )
    assert "x@example.net" in a.export_csv(tenant="globex")
    # The delivery path: entries naming their message; the dispatch-time check.
    got = a.add_entries([("acme", "hard@d.example", "userunknown", "bounce-delivery", 42),
                         ("acme", "not an address", "userunknown", "bounce-delivery", 43)])  # fmt: skip
    assert [e.address for e in got] == ["hard@d.example"]
    assert b.reasons_many(["HARD@d.example", "x@d.example"], tenant="acme") == {
        "HARD@d.example": "userunknown"
    }
    e = b.get("hard@d.example", tenant="acme")
    assert e is not None and e.message == 42 and e.source == "bounce-delivery"


def test_outbox_one_sender_per_url_in_order(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_state, "WEBHOOK_LOCK", 1.0)  # (0.3 s: a loaded CI's stall)
    ra, rb, p = _two(redis_server)
    a, b = RedisOutbox(ra, p, "node-a"), RedisOutbox(rb, p, "node-b")
    url = "https://hooks.example/x"
    a.set_urls([url])
    b.set_urls([url])
    a.append([b'{"n":1}', b'{"n":2}'])
    b.append([b'{"n":3}'])
    assert a.hold(url) and not b.hold(url) and a.hold(url)
    rows = a.fetch(url, 2)
    assert rows == [(1, b'{"n":1}'), (2, b'{"n":2}')]
    a.ack(url, 2)
    assert b.pending(url) == 1 and b.pending() == 1  # acknowledged rows pruned
    time.sleep(1.1)  # a died: its lease lapses, b continues from the cursor
    assert b.hold(url) and not a.hold(url)
    assert b.fetch(url, 10) == [(3, b'{"n":3}')]
    b.ack(url, 3)
    assert a.pending() == 0


def test_event_index_read_on_another_node(redis_server: RedisServer) -> None:
    ra, rb, p = _two(redis_server)
    a, b = RedisEventIndex(ra, p), RedisEventIndex(rb, p)
    a.listener([{"time": 2.0, "event": "delivered", "id": 7}, {"event": "campaign_paused"}])
    a.listener([{"time": 1.0, "event": "accepted", "id": 7, "rcpt": "a@b.c"}])
    a.add_meta([(7, ["t1"], {"k": "v"})])
    a.flush()
    assert [e["event"] for e in b.for_message(7)] == ["accepted", "delivered"]
    assert b.meta(7) == (["t1"], {"k": "v"})
    assert b.for_message(8) == [] and b.meta(8) == ([], {})
    assert 0 < int(rb.ttl(f"{{{p}}}:ev:0")) <= shared_state.EVENT_TTL


def test_event_index_stats_answer_as_on_sqlite(redis_server: RedisServer, tmp_path: Path) -> None:
    """/v1/stats?by=domain|source_ip|campaign&window=: the counts one node's events
    make, read on another node, equal the SQLite index's for the same events."""
    from fastsend.serve.eventindex import EventIndex

    ra, rb, p = _two(redis_server)
    a, b = RedisEventIndex(ra, p), RedisEventIndex(rb, p)
    sq = EventIndex(str(tmp_path))
    now = time.time()
    evs: list[dict[str, Any]] = [
        {"time": now - (10 if i % 5 else 7200), "event": ("delivered", "bounced")[i % 7 == 0],
         "id": i, "campaign": 1 + i % 2, "rcpt": f"u{i}@D{i % 3}.Example", "source_ip": f"127.0.0.{2 + i % 2}"}
        for i in range(1, 400)
    ] + [{"time": now, "event": "campaign_paused", "campaign": 1}]  # fmt: skip
    for ix in (a, sq):
        ix.listener(evs[:200])
        ix.listener(evs[200:])
    a.flush()
    for since in (now - 3600, now - 86400):
        for by in ("campaign", "domain", "source_ip"):
            for camps in (None, [1], [2, 3], []):
                got = sorted(b.stats(since, camps, by))
                assert got == sorted(sq.stats(since, camps, by)), (since, by, camps)
    assert ("d0.example", "delivered", 91) in b.stats(now - 3600, None, "domain")
    sq.close()


def test_suppress_cli_on_a_redis_spool(redis_server: RedisServer) -> None:
    import subprocess
    import sys

    url = redis_server.url()
    prefix = url.split("prefix=")[1]
    run = [sys.executable, "-m", "fastsend", "suppress"]
    out = subprocess.run([*run, "add", "cli@example.org", "--tenant", "acme", "--spool", url],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    r = redis.Redis(host="127.0.0.1", port=redis_server.port)
    assert RedisSuppressionList(r, prefix).contains("cli@example.org", tenant="acme")
    out = subprocess.run([*run, "list", "--tenant", "acme", "--spool", url],
                         capture_output=True, text=True)  # fmt: skip
    assert "cli@example.org" in out.stdout
    bad = subprocess.run([*run, "add", "nope", "--spool", url], capture_output=True, text=True)
    assert bad.returncode == 2 and "malformed" in bad.stderr


def test_apikey_cli_on_a_redis_spool(redis_server: RedisServer) -> None:
    """`fastsend apikey --spool redis://...` writes the shared key store every
    node reads (the URL is read through fastsend.spool, not a backend module)."""
    import subprocess
    import sys

    url = redis_server.url()
    prefix = url.split("prefix=")[1]
    run = [sys.executable, "-m", "fastsend", "apikey"]
    out = subprocess.run([*run, "create", "--tenant", "acme", "--spool", url],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    r = redis.Redis(host="127.0.0.1", port=redis_server.port)
    got = RedisKeyStore(r, prefix).verify(key)
    assert got is not None and got[1] == "acme"
    out = subprocess.run([*run, "list", "--json", "--spool", url], capture_output=True, text=True)
    assert out.returncode == 0 and got[0] in out.stdout and key not in out.stdout
