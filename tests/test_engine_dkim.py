"""`fastsend send` with DKIM end to end: keys made by `fastsend dkim keygen`, dual
signing (rsa-sha256 + ed25519-sha256), every message as the sink saved it
verifies with dkimpy, the VERP return path and Message-ID carry the signed id."""

from __future__ import annotations

from pathlib import Path

import dkim
import orjson
from tests._engine_helpers import run_fastsend, send_via, summary, write_recipients

from fastsend import msgid
from fastsend.sink import SinkProcess


def test_dkim_signed_campaign_verifies_at_the_sink(tmp_path: Path) -> None:
    records: dict[bytes, bytes] = {}
    for sel, alg in (("rsa1", "rsa"), ("ed1", "ed25519")):
        key = tmp_path / f"{sel}.pem"
        r = run_fastsend(
            "dkim",
            "keygen",
            "--domain",
            "sender.example.com",
            "--selector",
            sel,
            "--algorithm",
            alg,
            "--out",
            str(key),
            "--json",
        )
        assert r.returncode == 0, r.stderr
        rec = orjson.loads(r.stdout)
        name = f"{sel}._domainkey.sender.example.com."
        records[name.encode()] = rec["value"].encode() if "value" in rec else rec["txt"].encode()
    camp = tmp_path / "campaign.toml"
    camp.write_text(
        'from = "News <news@sender.example.com>"\n'
        'subject = "Héllo {{ name }}"\n'
        'text = "Hi {{ name }} — ünïcode body.\\n"\n'
        'html = "<p>Hi <b>{{ name }}</b></p>"\n'
        'verp_domain = "bounces.sender.example.com"\n'
        "[[dkim]]\n"
        f'domain = "sender.example.com"\nselector = "rsa1"\nkey = "{tmp_path / "rsa1.pem"}"\n'
        "[[dkim]]\n"
        f'domain = "sender.example.com"\nselector = "ed1"\nkey = "{tmp_path / "ed1.pem"}"\n'
    )
    rcpts = write_recipients(tmp_path, [f"u{i}@example.net" for i in range(20)])
    saved = tmp_path / "saved"
    log = tmp_path / "sink.jsonl"
    with SinkProcess("--save", str(saved), "--log", str(log)) as sink:
        host, port = sink.addresses[0]
        proc = send_via(camp, rcpts, (host, port), tmp_path / "spool", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary(proc)["delivered"] == 20

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name, b"")

    files = sorted(saved.iterdir())
    assert len(files) == 20
    for f in files:
        msg = f.read_bytes()
        assert msg.count(b"DKIM-Signature:") == 2
        d = dkim.DKIM(msg)
        assert d.verify(idx=0, dnsfunc=dnsfunc), f"{f.name}: first signature"
        assert d.verify(idx=1, dnsfunc=dnsfunc), f"{f.name}: second signature"
    secret = (tmp_path / "spool" / "secret.key").read_bytes().strip()
    for rec in map(orjson.loads, log.read_bytes().splitlines()):
        local = rec["mail_from"].split("@")[0]
        assert rec["mail_from"].endswith("@bounces.sender.example.com")
        assert msgid.parse(local.removeprefix("b-"), secret) is not None
        assert msgid.parse(rec["message_id"].strip("<>").split("@")[0], secret) is not None


def test_config_dkim_signs_api_and_submitted_messages(tmp_path: Path) -> None:
    """Self-contained messages (HTTP API, SMTP submission) are signed with the
    config's [dkim] for their From domain: raw MIME and field-built alike."""
    import asyncio
    import base64
    import time

    from fastsend.config import Route, from_dict
    from fastsend.events import EventLog
    from fastsend.queue.supervisor import Supervisor
    from fastsend.spool.sqlite import SQLiteSpool

    r = run_fastsend(
        "dkim",
        "keygen",
        "--domain",
        "api.example.com",
        "--selector",
        "k1",
        "--algorithm",
        "ed25519",
        "--out",
        str(tmp_path / "k1.pem"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    txt = orjson.loads(r.stdout)["value"].encode()
    cfg = from_dict(
        {
            "dkim": {"domain": "api.example.com", "selector": "k1", "key": "k1.pem"},
            "workers": {"count": 1},
        },
        base_dir=str(tmp_path),
    )
    cfg.spool_dir = str(tmp_path / "spool")
    spool = SQLiteSpool(cfg.spool_dir)
    cid = spool.create_campaign({"kind": "transactional"})
    raw = (
        b"From: App <app@api.example.com>\r\nTo: x@example.net\r\nSubject: raw\r\n"
        b"Message-ID: <r1@api.example.com>\r\n\r\nHello raw.\r\n"
    )
    spool.add_messages(
        cid,
        [
            (
                "x@example.net",
                "example.net",
                orjson.dumps(
                    {"raw": base64.b64encode(raw).decode(), "mail_from": "app@api.example.com"}
                ),
            ),
            (
                "y@example.net",
                "example.net",
                orjson.dumps(
                    {"from": "App <app@api.example.com>", "subject": "fields", "text": "Hi.\n"}
                ),
            ),
            (
                "z@example.net",
                "example.net",
                orjson.dumps(
                    {"from": "other@unsigned.example.org", "subject": "no key", "text": "Hi.\n"}
                ),
            ),
        ],
        time.time(),
    )
    saved = tmp_path / "saved"
    with SinkProcess("--save", str(saved)) as sink:
        host, port = sink.addresses[0]
        cfg.routes["*"] = Route(host, port)
        asyncio.run(Supervisor(cfg, spool, EventLog(None), max_wait=1).run())
    assert spool.counts(cid)["delivered"] == 3

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt if name == b"k1._domainkey.api.example.com." else b""

    msgs = [p.read_bytes() for p in sorted(saved.iterdir())]
    signed = [m for m in msgs if m.startswith(b"DKIM-Signature:") or b"\r\nDKIM-Signature:" in m]
    assert len(signed) == 2
    for m in signed:
        assert dkim.DKIM(m).verify(dnsfunc=dnsfunc)
    assert any(m.endswith(raw) for m in signed)  # raw MIME otherwise byte for byte
    unsigned = [m for m in msgs if m not in signed]
    assert len(unsigned) == 1 and b"unsigned.example.org" in unsigned[0]
