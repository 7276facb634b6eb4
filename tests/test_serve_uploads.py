"""A recipient list uploaded to `fastsend serve` (CSV or JSON lines to
/v1/campaigns/{id}/recipients) is a durable ingest job, on both backends:

- a small list is spooled before the answer (the synchronous answer, with its
  job id), and its upload file is gone afterwards;
- a large one is answered 202 with the job id and the rows spooled so far, and
  spooled on in the background; GET /v1/campaigns/{id} shows "spooling: X of Y";
- a serve killed -9 in the middle of spooling it continues the job at its next
  start: every row of the acknowledged list ends in the spool exactly once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import ServeProcess, create_api_key, free_port
from fastsend.spool import open_spool

TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}
BIG = 300_000  # rows: several seconds of background spooling on a shared machine


@pytest.fixture(params=["sqlite", "redis"])
def spool_line(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """([spool] line of the config, the spool's URL or directory for tools)."""
    if request.param == "sqlite":
        return 'dir = "spool"', str(tmp_path / "spool")
    url = request.getfixturevalue("redis_server").url(node="n1", dir=str(tmp_path / "spool"))
    return f'url = "{url}"', url


class Serve:
    """`fastsend serve --no-workers` on a config of its own (conftest.ServeProcess),
    started again after a kill on the same spool."""

    def __init__(self, tmp: Path, spool_line: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "fastsend.toml"
        self.cfg.write_text(
            f'[spool]\n{spool_line}\n[workers]\ncount = 1\n[routes]\n"*" = "127.0.0.1:9"\n'
            f'[api]\nlisten = "127.0.0.1:{self.port}"\n'
        )
        self.key = create_api_key(self.cfg, "acme")
        self.server: ServeProcess | None = None

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "fastsend", *args], capture_output=True,
                             text=True, cwd=self.tmp, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start(self) -> None:
        self.server = ServeProcess(self.cfg, self.port, "--no-workers", "--allow-volatile")

    def output(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")

    def kill9(self) -> None:
        assert self.server is not None
        self.server.proc.kill()
        self.server.proc.wait(10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def req(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
            ctype: str = "application/json") -> tuple[int, Any]:  # fmt: skip
        async def go() -> tuple[int, Any]:
            data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
            timeout = aiohttp.ClientTimeout(total=120)
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.request(method, f"http://127.0.0.1:{self.port}{path}", data=data,
                          headers={"Authorization": f"Bearer {self.key}",
                                   "Content-Type": ctype}) as r,
            ):  # fmt: skip
                return r.status, orjson.loads(await r.read())

        return asyncio.run(go())


def csv_body(prefix: str, n: int) -> bytes:
    return b"email,name\n" + b"".join(
        f"{prefix}{i}@d{i % 13}.example,N{i}\n".encode() for i in range(n)
    )


def uploads(tmp: Path) -> list[str]:
    d = tmp / "spool" / "uploads"
    return sorted(os.listdir(d)) if d.exists() else []


def test_a_small_list_is_spooled_before_the_answer(spool_line: tuple[str, str],
                                                   tmp_path: Path) -> None:  # fmt: skip
    s = Serve(tmp_path, spool_line[0])
    s.start()
    try:
        st, c = s.req("POST", "/v1/campaigns", {"template": TPL, "paused": True})
        assert st == 201, c
        body = csv_body("s", 500) + b"broken,X\n"
        st, up = s.req("POST", f"/v1/campaigns/{c['id']}/recipients", raw=body, ctype="text/csv")
        assert st == 202, up
        assert (up["accepted"], up["rejected"], up["status"]) == (500, 1, "spooled"), up
        assert up["errors"][0]["row"] == 502 and isinstance(up["job"], int)
        st, v = s.req("GET", f"/v1/campaigns/{c['id']}")
        assert v["total"] == 500 and "spooling" not in v
        assert uploads(tmp_path) == []  # a finished job's file is removed
    finally:
        s.stop()


def test_serve_killed_while_spooling_an_upload_continues_it_at_start(
    spool_line: tuple[str, str], tmp_path: Path
) -> None:
    s = Serve(tmp_path, spool_line[0])
    s.start()
    try:
        st, c = s.req("POST", "/v1/campaigns", {"template": TPL, "paused": True})
        assert st == 201, c
        cid = c["id"]
        st, up = s.req("POST", f"/v1/campaigns/{cid}/recipients", raw=csv_body("u", BIG),
                       ctype="text/csv")  # fmt: skip
        assert st == 202, up
        assert up["status"] == "spooling" and up["rows"] == BIG and up["rejected"] == 0, up
        assert 0 < up["accepted"] < BIG
        st, v = s.req("GET", f"/v1/campaigns/{cid}")
        assert st == 200 and v["spooling"][0]["job"] == up["job"], v
        assert v["spooling"][0]["text"].startswith("spooling: ")
        s.kill9()  # in the middle of the background spooling
        spool = open_spool(spool_line[1], readonly=True)
        try:
            job = spool.get_ingest(up["job"])
            assert job is not None and job.status == "running", job
            assert up["accepted"] <= job.accepted < BIG  # killed mid-way
            assert sum(spool.counts(cid).values()) == job.accepted
        finally:
            spool.close()
        q = s.cli("queue", "--spool", spool_line[1])
        assert f"of {BIG:,} rows" in q
        s.start()  # continues the job
        deadline = time.monotonic() + 240
        while True:
            st, v = s.req("GET", f"/v1/campaigns/{cid}")
            assert st == 200
            if not v.get("spooling"):
                break
            assert time.monotonic() < deadline, v
            time.sleep(0.5)
        assert v["total"] == BIG, v  # every row once: none lost, none spooled twice
        assert "continuing the uploaded list" in s.output(), s.output()
        while uploads(tmp_path) and time.monotonic() < deadline:  # removed right after
            time.sleep(0.1)
        assert uploads(tmp_path) == []
    finally:
        s.stop()
    spool = open_spool(spool_line[1], readonly=True)
    try:
        job = spool.get_ingest(up["job"])
        assert job is not None and (job.status, job.accepted) == ("done", BIG)
    finally:
        spool.close()
