"""`fastsend send` with DKIM end to end: keys made by `fastsend dkim keygen`, dual
signing (rsa-sha256 + ed25519-sha256), every message as the sink saved it
verifies with dkimpy, the VERP return path and Message-ID carry the signed id."""

from __future__ import annotations

from pathlib import Path

import dkim
import orjson
from tests._engine_helpers import run_fastsend, summary, write_recipients

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
        proc = run_fastsend(
            "send",
            str(camp),
            "-r",
            str(rcpts),
            "--route",
            f"*={host}:{port}",
            "--workers",
            "1",
            "--spool",
            str(tmp_path / "spool"),
            "--json",
            "--no-progress",
        )
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
