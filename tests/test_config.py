"""Every section of the config is typed: an unknown key or a wrong type is an
error naming the full key path, found at load time by ``fastsend check-config``
(exit 2) -- the sections only ``serve`` uses included -- and every config the
repository ships loads cleanly."""

from __future__ import annotations

import glob
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fastsend.cli import main
from fastsend.config import SECTIONS, ConfigError, from_dict, load
from fastsend.config.base import read_toml

ROOT = Path(__file__).resolve().parent.parent


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


def _write(path: Path, raw: dict[str, Any]) -> None:
    """``raw`` as TOML (nested tables by dotted headers)."""
    lines: list[str] = []

    def table(name: str, t: dict[str, Any]) -> None:
        scalars = {k: v for k, v in t.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines.extend(f'"{k}" = {_toml(v)}' for k, v in scalars.items())
        for k, v in t.items():
            if isinstance(v, dict):
                table(f'{name}."{k}"' if "." in k else f"{name}.{k}", v)

    for name, t in raw.items():
        table(name, t)
    path.write_text("\n".join(lines) + "\n")


# (the table's path, a valid base table there, a key of it and a value of the wrong type)
SECTION_CASES: list[tuple[tuple[str, ...], dict[str, Any], str, Any]] = [
    (("spool",), {}, "dir", 5),
    (("workers",), {}, "count", "four"),
    (("ips",), {}, "helo", 5),
    (("delivery",), {}, "window", "big"),
    (("retry",), {}, "jitter", "x"),
    (("dns",), {}, "timeout", "x"),
    (("tls",), {}, "policy_timeout", "x"),
    (("events",), {}, "log", 5),
    (("shaping",), {}, "defaults", "yes"),
    (("shaping", "default"), {}, "max_connections", "x"),
    (("shaping", "domain", "example.org"), {}, "burst", "x"),
    (("shaping", "provider", "google"), {}, "mx_suffixes", 3),
    (("shaping", "aimd"), {}, "decrease", "x"),
    (("shaping", "dispatch"), {}, "global_rate", "x"),
    (("pools", "main"), {"ips": ["127.0.0.2"]}, "ips", "127.0.0.2"),
    (("guardrails",), {}, "enabled", "yes"),
    (("tenants", "acme"), {"domains": ["acme.example"]}, "domains", "acme.example"),
    (("dkim",), {"domain": "a.example", "selector": "s", "key": "k.pem"}, "selector", 5),
    (("transports", "relay1"), {"kind": "relay", "host": "r.example"}, "port", "x"),
    (("api",), {}, "max_body_bytes", "16MB"),
    (("webhooks",), {}, "batch_size", "x"),
    (("submission",), {}, "max_size", "x"),
    (("submission", "users"), {}, "acme", 5),
    (("intake",), {}, "hostname", 5),
    (("proxy",), {}, "timeout", "x"),
    (("dashboard",), {}, "admin_tenants", "acme"),
    (("tracking",), {}, "link_ttl_days", "x"),
    (("provider_events",), {}, "max_age", "x"),
    (("analytics",), {}, "enabled", "yes"),
    (("reputation",), {}, "check_every", "x"),
    (("reputation", "alarms"), {}, "window_s", "x"),
    (("reputation", "warmup"), {}, "enabled", "x"),
    (("reputation", "feeds", "snds"), {"key_file": "k"}, "every", "x"),
]


def _nest(path: tuple[str, ...], table: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = table
    for p in reversed(path):
        raw = {p: raw}
    return raw


def _where(path: tuple[str, ...]) -> str:
    return "[" + ".".join(f'"{p}"' if "." in p else p for p in path) + "]"


def _check(tmp_path: Path, raw: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    f = tmp_path / "fastsend.toml"
    _write(f, raw)
    rc = main(["check-config", str(f)])
    return rc, capsys.readouterr().err


def test_every_top_level_section_has_a_case() -> None:
    covered = {c[0][0] for c in SECTION_CASES} | {"routes"}
    assert covered == set(SECTIONS)


@pytest.mark.parametrize(("path", "base", "key", "bad"), SECTION_CASES,
                         ids=[".".join(c[0]) for c in SECTION_CASES])  # fmt: skip
def test_unknown_key_and_wrong_type_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    path: tuple[str, ...], base: dict[str, Any], key: str, bad: Any,
) -> None:  # fmt: skip
    monkeypatch.setenv("FASTSEND_RELAY1_USERNAME", "u")
    monkeypatch.setenv("FASTSEND_RELAY1_PASSWORD", "p")
    if path == ("dkim",):  # check-config loads the key it names
        from fastsend.message.keys import generate, write_key

        write_key(generate("ed25519", 0), tmp_path / "k.pem")
    rc, err = _check(tmp_path, _nest(path, dict(base)), capsys)
    assert rc == 0, err  # the base table is valid
    if path[-1] != "users":  # [submission.users] keys are tenant names
        rc, err = _check(tmp_path, _nest(path, {**base, "bogus_key": 1}), capsys)
        assert rc == 2
        assert f'fastsend.toml: {_where(path)} unknown key "bogus_key"' in err, err
    rc, err = _check(tmp_path, _nest(path, {**base, key: bad}), capsys)
    assert rc == 2
    assert f"fastsend.toml: {_where(path)} {key}: expected" in err, err


def test_routes_values_are_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _check(tmp_path, {"routes": {"*": 25}}, capsys)
    assert rc == 2 and '[routes] "*": expected' in err


def test_unknown_section_and_the_cli_exit_code(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[submision]\nlisten = '127.0.0.1:587'\n")
    r = subprocess.run([sys.executable, "-m", "fastsend", "check-config", str(f)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "c.toml: unknown section [submision]" in r.stderr
    # serve's sections are checked by every command that loads the config, not at serve start
    f.write_text("[api]\nmax_body_bytes = '1'\n")
    r = subprocess.run([sys.executable, "-m", "fastsend", "send", "x.toml", "-r", "x.csv",
                        "-c", str(f)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "[api] max_body_bytes: expected int, got str" in r.stderr


@pytest.mark.parametrize(
    ("raw", "warning"),
    [
        ({"routes": {"*": "127.0.0.1:2525"}, "shaping": {"domain": {"example.org": {}}}},
         r'\[shaping.domain."example.org"\] does not apply'),
        ({"tenants": {"acme": {"domains": ["acme.example"]}},
          "dkim": {"domain": "other.example", "selector": "s", "key": "k.pem"}},
         r"no tenant owns other.example"),
        ({"tenants": {"acme": {"domains": ["acme.example"]}},
          "pools": {"main": {"ips": ["127.0.0.2"]}, "tenants": {"acne": "main"}}},
         r"\[pools\] tenants: 'acne' is not a tenant"),
        ({"routes": {"pool:bulk": "127.0.0.1:2525"}}, r"no pool 'bulk'"),
        ({"tenants": {"acme": {"domains": ["acme.example"]}},
          "shaping": {"dispatch": {"tenants": {"acne": 5}}}}, r"'acne' is not a tenant"),
        ({"submission": {"hostname": "mx.example"}}, r"\[submission\] has settings but no listen"),
        ({"retry": {"min_backoff": 600, "max_age": 60}}, r"expires before its first retry"),
        ({"pools": {"main": {"ips": ["127.0.0.2"]}, "warmup": {"schedule": [10, 20]}}},
         r"\[pools.warmup\] schedule applies to no address"),
        ({"analytics": {"enabled": False}, "reputation": {"alarms": {"window_s": 60}}},
         r"\[reputation.alarms\] does not apply"),
    ],
)  # fmt: skip
def test_settings_that_cannot_apply_are_warnings(raw: dict[str, Any], warning: str) -> None:
    cfg = from_dict(raw)
    assert any(re.search(warning, w) for w in cfg.warnings), cfg.warnings


def test_retry_bounds_that_contradict_are_an_error() -> None:
    with pytest.raises(ConfigError, match=r"\[retry\] min_backoff 900 is more than max_backoff 60"):
        from_dict({"retry": {"min_backoff": 900, "max_backoff": 60}})


def test_a_pool_naming_an_address_workers_do_not_have_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"\[pools.main.ips\[1\]\] 127.0.0.9 is not one of"):
        from_dict({"ips": {"source": ["127.0.0.2"]},
                   "pools": {"main": {"ips": ["127.0.0.2", "127.0.0.9"]}}})  # fmt: skip


def _doc_configs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    files = ["README.md", "ARCHITECTURE.md", "SECURITY.md", *glob.glob(str(ROOT / "docs" / "*.md"))]
    for name in files:
        p = ROOT / name
        if not p.exists():
            continue
        for i, m in enumerate(re.finditer(r"```toml\n(.*?)```", p.read_text(), re.S)):
            raw = tomllib.loads(m.group(1))
            if raw and set(raw) <= SECTIONS:  # a fastsend config (not a campaign file)
                out.append((f"{p.name}#{i}", raw))
    return out


def test_every_shipped_config_loads_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    examples = sorted(glob.glob(str(ROOT / "examples" / "*.toml")) + glob.glob(
        str(ROOT / "deploy" / "*.toml")))  # fmt: skip
    configs = [e for e in examples if not Path(e).name.startswith("campaign")]
    assert configs
    for path in configs:
        assert main(["check-config", "--strict", path]) == 0, capsys.readouterr().err
        assert load(path).warnings == []
    docs = _doc_configs()
    assert docs  # docs/DEPLOY.md's node config at least
    for name, raw in docs:  # their file paths are placeholders
        assert from_dict(raw, files=False).warnings == [], name


class Bad(Exception):
    pass


def test_read_toml_names_the_file_and_what_it_is(tmp_path: Path) -> None:
    good = tmp_path / "a.toml"
    good.write_text("x = 1\n[t]\ny = 'z'\n")
    assert read_toml(good, "shaping file") == {"x": 1, "t": {"y": "z"}}
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError, match=r"cannot read shaping file '.*none\.toml': not found"):
        read_toml(missing, "shaping file")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(Bad, match=r"bad\.toml: not valid TOML"):
        read_toml(bad, "rule file", Bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"x = '\xe9'\n")
    with pytest.raises(Bad, match=r"latin\.toml: not valid TOML"):
        read_toml(latin, "rule file", Bad)
    with pytest.raises(Bad, match=r"cannot read rule file '.*': Is a directory"):
        read_toml(tmp_path, "rule file", Bad)


RULE = {"name": "r", "action": "rest", "match": "x"}


def test_a_rule_for_an_unknown_provider_is_a_warning(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cfg = from_dict({"shaping": {"rule": [{**RULE, "provider": "gogle"}]}})
    assert any(re.search(r'\[\[shaping.rule\]\] "r": provider \'gogle\' is not a provider'
                         r".*known: comcast, gmx, google", w) for w in cfg.warnings), cfg.warnings
    # Known: the shipped providers, a shaping file's and the config's own.
    assert from_dict({"shaping": {"rule": [{**RULE, "provider": "google"}]}}).warnings == []
    own = {"provider": {"corp": {"domains": ["corp.example"]}},
           "rule": [{**RULE, "provider": "corp"}]}  # fmt: skip
    assert from_dict({"shaping": own}).warnings == []
    # Without the shipped tables "google" is unknown too; a shaping file's rule is checked.
    assert from_dict({"shaping": {"defaults": False,
                                  "rule": [{**RULE, "provider": "google"}]}}).warnings  # fmt: skip
    (tmp_path / "s.toml").write_text('[[rule]]\nname = "f"\naction = "rest"\nmatch = "x"\n'
                                     'provider = "yahooo"\n')  # fmt: skip
    f = tmp_path / "c.toml"
    f.write_text('[shaping]\nfile = "s.toml"\n')
    assert main(["check-config", str(f)]) == 0
    assert "s.toml: [[rule]] \"f\": provider 'yahooo'" in capsys.readouterr().err
    assert main(["check-config", "--strict", str(f)]) != 0


def test_tls_files_are_checked_at_load(tmp_path: Path, certs: Any) -> None:
    """[submission]/[intake] tls_cert and tls_key: missing, unreadable, not PEM or
    not a pair is an error naming the key, from any command that loads the config
    (check-config here), not only when serve starts its listeners."""
    import shutil

    import trustme

    cert, key, _ = certs
    shutil.copy(cert, tmp_path / "cert.pem")  # relative paths: from the config's folder
    shutil.copy(key, tmp_path / "key.pem")
    trustme.CA().issue_cert("other.example").private_key_pem.write_to_path(
        str(tmp_path / "other.pem"))  # fmt: skip
    (tmp_path / "junk.pem").write_text("not pem\n")
    f = tmp_path / "c.toml"

    def check(sec: str, c: str, k: str) -> subprocess.CompletedProcess[str]:
        extra = 'verp_domain = "b.example"\n' if sec == "intake" else ""
        f.write_text(f'[{sec}]\nlisten = "127.0.0.1:2525"\n{extra}tls_cert = "{c}"\n'
                     f'tls_key = "{k}"\n')  # fmt: skip
        return subprocess.run([sys.executable, "-m", "fastsend", "check-config", str(f)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    for sec in ("submission", "intake"):
        assert check(sec, "cert.pem", "key.pem").returncode == 0
        for c, k, want in (
            ("missing.pem", "key.pem", f"[{sec}] tls_cert: cannot read {tmp_path}/missing.pem"),
            ("cert.pem", "gone.pem", f"[{sec}] tls_key: cannot read {tmp_path}/gone.pem"),
            ("junk.pem", "key.pem", f"[{sec}] tls_cert: {tmp_path}/junk.pem holds no PEM cert"),
            ("cert.pem", "junk.pem", f"[{sec}] tls_key: {tmp_path}/junk.pem holds no usable"),
            ("cert.pem", "other.pem", f"[{sec}] tls_key: {tmp_path}/other.pem is not the key"),
        ):
            r = check(sec, c, k)
            assert r.returncode == 2 and want in r.stderr, (c, k, r.stderr)
    assert check("intake", "cert.pem", "key.pem").returncode == 0
    assert load(str(f)).intake.tls_cert == str(tmp_path / "cert.pem")  # resolved


def test_blob_settings_are_validated() -> None:
    cfg = from_dict({"spool": {"blob_retention_days": 2.5, "blob_sweep_interval_s": 60}})
    assert (cfg.spool.blob_retention_days, cfg.spool.blob_sweep_interval_s) == (2.5, 60)
    for key, bad in (("blob_retention_days", 0), ("blob_sweep_interval_s", 0.5),
                     ("blob_orphan_grace_s", 1), ("blob_retention_days", "7")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"\[spool\] {key}"):
            from_dict({"spool": {key: bad}})


def test_drain_limits_are_validated() -> None:
    cfg = from_dict({"delivery": {"drain_limit": 75, "drain_outage": 4}})
    assert (cfg.delivery.drain_limit, cfg.delivery.drain_outage) == (75, 4)
    assert from_dict({}).delivery.drain_limit == 30.0  # under systemd's TimeoutStopSec=90
    for key, bad in (("drain_limit", 0), ("drain_outage", -1), ("drain_limit", 7200)):
        with pytest.raises(ConfigError, match=rf"\[delivery\] {key}"):
            from_dict({"delivery": {key: bad}})


def test_a_url_in_spool_dir_is_an_error_that_names_url() -> None:
    """[spool] dir = "redis://..." made a local directory literally named 'redis:'
    and a SQLite spool in it: the node silently shared nothing."""
    with pytest.raises(ConfigError, match=r"\[spool\] dir is this node's local directory.*url ="):
        from_dict({"spool": {"dir": "redis://127.0.0.1:6379/0"}})
    assert from_dict({"spool": {"dir": "spool-a"}}).spool.dir == "spool-a"
