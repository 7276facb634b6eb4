"""`fastsend dkim keygen` and the example campaign file."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import dkim as dkimpy
import pytest

from fastsend.cli import main
from fastsend.message import Campaign
from fastsend.message.keys import load_private_key

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("alg", "bits"), [("rsa", 2048), ("rsa", 1024), ("ed25519", 0)])
def test_keygen_writes_0600_key_and_prints_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], alg: str, bits: int
) -> None:
    out = tmp_path / "k.pem"
    argv = ["dkim", "keygen", "--domain", "Example.COM", "--selector", "s1",
            "--algorithm", alg, "--out", str(out), "--json"]  # fmt: skip
    if bits:
        argv += ["--bits", str(bits)]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["name"] == "s1._domainkey.example.com"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = load_private_key(str(out))
    assert rec["value"].startswith(f"v=DKIM1; k={'ed25519' if alg == 'ed25519' else 'rsa'}; p=")
    assert "PRIVATE" not in rec["value"]
    if alg == "rsa":
        assert key.key_size == bits  # type: ignore[union-attr]
        # the printed record verifies a signature made with the written key
        d = {"from": "a@example.com", "subject": "s", "text": "t",
             "dkim": {"domain": "example.com", "selector": "s1", "key": str(out)}}  # fmt: skip
        data = Campaign.from_dict(d).compile().render("b@example.org", {}, "m")
        assert dkimpy.verify(data, dnsfunc=lambda name, timeout=5: rec["value"].encode())


def test_keygen_zone_line_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k.pem"
    args = ["dkim", "keygen", "--domain", "example.com", "--selector", "s", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert 's._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=' in text
    before = out.read_bytes()
    assert main(args) == 2  # (nothing done: a usage error)
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize(
    "extra", [["--bits", "512"], ["--domain", "bad domain!"], ["--selector", "x_"]]
)
def test_keygen_bad_input(tmp_path: Path, extra: list[str]) -> None:
    args = ["dkim", "keygen", "--domain", "example.com", "--selector", "s",
            "--out", str(tmp_path / "k.pem")]  # fmt: skip
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i : i + 2]
    assert main(args) == 2
    assert not (tmp_path / "k.pem").exists()


def test_example_campaign_loads_and_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its tracking links are signed (by send and serve: the spool's secret; here a file's).
    (tmp_path / "secret.key").write_text("k" * 64)
    monkeypatch.setenv("FASTSEND_TRACKING_SECRET_FILE", str(tmp_path / "secret.key"))
    for f in ("campaign.toml", "campaign.html"):
        shutil.copy(ROOT / "examples" / f, tmp_path / f)
    (tmp_path / "keys").mkdir()
    for sel, alg in (("s2026", "rsa"), ("ed2026", "ed25519")):
        argv = ["dkim", "keygen", "--domain", "example.com", "--selector", sel,
                "--algorithm", alg, "--out", str(tmp_path / "keys" / f"{sel}.example.com.pem")]  # fmt: skip
        assert main(argv) == 0
    camp = Campaign.load(tmp_path / "campaign.toml")
    assert camp.variables == {"code"}
    assert len(camp.dkim_for("example.com")) == 2
    assert camp.dkim_for("other.example") == []
    r = camp.compile()
    data = r.render("ann@example.org", {"code": "C1"}, "01H")
    assert data.count(b"DKIM-Signature:") == 2
    assert r.envelope_from("01H") == "b-01H@bounces.example.com"
