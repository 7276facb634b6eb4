"""Durability and operator-error audit, session 22: ``rediss://`` settings
that can never work but read as a Redis down for now (exit 75, retried for ever
by a job runner): a server wanting a client certificate the URL does not give,
a URL naming the plain-text port.

Real parts: redis-server on loopback with a TLS port asking clients for a
certificate (a throwaway CA from trustme), the ``fastsend`` binary.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tests._engine_helpers import _env, fastsend_cmd
from tests._redis_helpers import RedisServer, start_redis
from tests.conftest import free_port, wait_port

from fastsend.spool import SpoolError
from fastsend.spool.redis import RedisSpool, RedisUnreachable

SPEC = {"from": "News <news@sender.example.com>", "subject": "Hi", "text": "Hi\n"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fastsend_cmd(*args), capture_output=True, text=True, env=_env(),
                          timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def mtls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server whose TLS port wants a client certificate signed by the CA
    in ``ca.pem`` (its own certificate names 127.0.0.1); ``client.pem`` and
    ``client.key`` are one."""
    d = tmp_path_factory.mktemp("redis-mtls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client = ca.issue_cert("client.example.net")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    tport = free_port()
    with start_redis("--tls-port", str(tport), "--tls-cert-file", str(d / "cert.pem"),
                     "--tls-key-file", str(d / "key.pem"), "--tls-ca-cert-file", str(d / "ca.pem"),
                     "--tls-auth-clients", "yes") as srv:  # fmt: skip
        wait_port("127.0.0.1", tport)
        yield srv, tport, d


def test_rediss_settings_read_as_an_outage_exit_2_naming_them(
    mtls_redis: tuple[RedisServer, int, Path], tmp_path: Path
) -> None:
    """A TLS 1.3 Redis wanting a client certificate completes the handshake and
    closes at the first command: the spool read the EOF as a restart and
    exited 75 "cannot reach Redis", so a job runner retried for ever what only
    the operator can mend. A ``rediss://`` URL naming the plain-text port
    timed out in the handshake, 75 again. Now both exit 2 saying what to give;
    the right certificate opens the spool, a port with nothing on it stays 75,
    and a client certificate file that is not there is 2 naming it."""
    srv, tport, d = mtls_redis
    ca = f"ssl_ca_certs={d / 'ca.pem'}"
    base = f"rediss://127.0.0.1:{tport}/0?{ca}&dir={tmp_path}&node=n1&prefix=mtls22"
    mine = f"ssl_certfile={d / 'client.pem'}&ssl_keyfile={d / 'client.key'}"
    # a short handshake timeout (redis-py's URL option): the plain port never answers it
    plain = f"rediss://127.0.0.1:{srv.port}/0?{ca}&dir={tmp_path}&socket_connect_timeout=1"
    cases = {
        "no client certificate": (base, "ssl_certfile= and ssl_keyfile="),
        "the plain port": (plain, f"port {srv.port} answers in plain text"),
        "a client certificate not there": (
            f"{base}&ssl_certfile={d / 'gone.pem'}&ssl_keyfile={d / 'client.key'}",
            "ssl_certfile",
        ),
    }
    for what, (url, says) in cases.items():
        with pytest.raises(SpoolError) as e:
            RedisSpool(url)
        assert e.value.exit_status == 2, (what, e.value)
        assert says in str(e.value), (what, e.value)
    for what in ("no client certificate", "the plain port"):
        got = _run("queue", "--spool", cases[what][0])
        assert got.returncode == 2, (what, got.stderr)
        assert cases[what][1] in got.stderr and "Traceback" not in got.stderr, got.stderr
        assert len(got.stderr.strip().splitlines()) == 1, got.stderr
    ok = RedisSpool(f"{base}&{mine}")
    assert ok.create_campaign(SPEC) > 0
    ok.close()
    with pytest.raises(RedisUnreachable) as down:
        RedisSpool(f"rediss://127.0.0.1:{free_port()}/0?{ca}&dir={tmp_path}")
    assert down.value.exit_status == 75
