"""Session 21's audit of the Redis spool: TLS settings that can never work
(exit 2, not the 75 of a Redis down for now), the due index's sweep in bounded
steps, the claim's round trips over many small campaigns, and the duplicate
sets of campaigns whose rows another node pruned.

Real parts: redis-server on loopback (with its TLS port and a throwaway CA from
trustme for the ``rediss://`` cases), the ``fastsend`` binary.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
import trustme
from tests._engine_helpers import _env, fastsend_cmd
from tests._redis_helpers import RedisServer, start_redis
from tests.conftest import free_port, wait_port

from fastsend.spool import SpoolError
from fastsend.spool.redis import SWEEP_STEP, RedisSpool, RedisUnreachable

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi", "text": "Hi\n"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fastsend_cmd(*args), capture_output=True, text=True, env=_env(),
                          timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server with a TLS port whose certificate names only
    ``redis.example.net`` (127.0.0.1 is a host it does not name), from a CA in
    ``ca.pem``; ``other.pem`` is a CA that signed nothing here."""
    d = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("redis.example.net")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other.pem"))
    tport = free_port()
    with start_redis("--tls-port", str(tport), "--tls-cert-file", str(d / "cert.pem"),
                     "--tls-key-file", str(d / "key.pem"), "--tls-ca-cert-file", str(d / "ca.pem"),
                     "--tls-auth-clients", "no") as srv:  # fmt: skip
        wait_port("127.0.0.1", tport)
        yield srv, tport, d


def test_tls_settings_that_cannot_work_exit_2_naming_the_fault(
    tls_redis: tuple[RedisServer, int, Path], tmp_path: Path
) -> None:
    """A ``rediss://`` URL whose certificate check can never pass (a CA that
    did not sign the server's certificate, a host the certificate does not
    name, a CA file that is not there) exited 75 "cannot reach Redis": a job
    runner (systemd Restart=, cron with retries) tried again for ever a
    setting only the operator can mend. Now 2 with what is wrong; a server
    that is down stays 75, and the right settings (the CA, certificate checks
    on: the host check is turned off only by the URL) open the spool."""
    _srv, tport, d = tls_redis
    base = f"rediss://127.0.0.1:{tport}/0?dir={tmp_path}&node=n1&prefix=tls21"
    cases = {
        "another CA": (f"{base}&ssl_ca_certs={d / 'other.pem'}", "certificate is refused"),
        "host not named": (f"{base}&ssl_ca_certs={d / 'ca.pem'}", "certificate is refused"),
        "no CA file": (f"{base}&ssl_ca_certs={d / 'gone.pem'}", "ssl_ca_certs"),
    }
    for what, (url, says) in cases.items():
        with pytest.raises(SpoolError) as e:
            RedisSpool(url)
        assert e.value.exit_status == 2, (what, e.value)
        assert says in str(e.value), (what, e.value)
    got = _run("queue", "--spool", cases["another CA"][0])
    assert got.returncode == 2, got.stderr
    assert "certificate is refused" in got.stderr and "Traceback" not in got.stderr
    # the CA that signed it, the host check off by the URL: a working spool
    ok = RedisSpool(f"{base}&ssl_ca_certs={d / 'ca.pem'}&ssl_check_hostname=false")
    assert ok.create_campaign(SPEC) > 0
    ok.close()
    # a TLS port with nothing listening: down for now, 75 as before
    with pytest.raises(RedisUnreachable) as down:
        RedisSpool(f"rediss://127.0.0.1:{free_port()}/0?ssl_ca_certs={d / 'ca.pem'}&dir={tmp_path}")
    assert down.value.exit_status == 75


def _calls(r: Any, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_the_due_index_sweep_goes_in_bounded_steps_and_completes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The 30 s sweep that makes the index of campaigns with mail due whole
    (P:dueidx: mail a node of an older fastsend spooled, an index lost) was one
    script over every active campaign: 100,000 of them held Redis, every node's
    claims and accepts, about a second. It now goes in steps of about
    SWEEP_STEP campaigns from a cursor in Redis (SSCAN), one step per renew()
    while a sweep is under way, and completes: 3,000 active campaigns missing
    from the index are back in it after a few steps, none of them looked at by
    one step more than a bounded number of times, and the mail the index had
    lost is claimed."""
    url = redis_server.url(node="n1", dir=str(tmp_path))
    k = "{" + url.partition("prefix=")[2].partition("&")[0] + "}"
    r = redis_py.Redis(port=redis_server.port)
    s = RedisSpool(url)
    now = time.time()
    a = s.create_campaign(SPEC, tenant="a")
    ids = s.add_messages(a, [("x@a.example", "a.example", b"{}")], now - 1)
    pipe = r.pipeline(transaction=False)  # (3,000 active campaigns with mail due in an hour)
    for cid in range(100_000, 103_000):
        pipe.sadd(f"{k}:active", cid)
        pipe.zadd(f"{k}:due:{cid}", {"1": now + 3600})
    pipe.execute()
    r.delete(f"{k}:dueidx", f"{k}:dueidx:swept")  # (the index lost, 30 s on)
    s._swept = 0.0
    steps = 0
    while r.zcard(f"{k}:dueidx") < 3001:
        before = _calls(r, "zrange")
        s.renew()
        steps += 1
        assert _calls(r, "zrange") - before <= 2 * SWEEP_STEP  # (SSCAN's COUNT is a hint)
        assert steps <= 20, r.zcard(f"{k}:dueidx")
    assert steps >= 3  # (one script did all before)
    assert not r.exists(f"{k}:dueidx:cursor") and r.pttl(f"{k}:dueidx:swept") > 0
    s.renew()  # the sweep is over: nothing until SWEEP_MS on
    assert [c.id for c in s.claim_due(now, 10)] == ids
    s.close()
