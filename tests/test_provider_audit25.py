"""Providers and relays, session 25's audit (prov25).

- A transport's ``endpoint`` (or a relay's ``host``) carrying
  ``user:password@`` was taken: the plain-http refusal quoted the password,
  and the request could never be made right (aiohttp refuses a URL's
  credentials beside the transport's own auth). It is refused at load, and no
  refusal quotes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests._engine_helpers import run_fastsend

from fastsend.config import ConfigError, from_dict

PW = "Sup3rS3cretPw"


def _cfg(transports: dict[str, object]) -> object:
    return from_dict({"routes": {"*": "t"}, "transports": transports})


@pytest.mark.parametrize(
    "kind,endpoint",
    [
        ("mailgun", f"http://api:{PW}@10.1.2.3:8080"),
        ("mailgun", f"https://api:{PW}@api.mailgun.example"),
        ("sendgrid", f"https://apikey:{PW}@api.sendgrid.example:443/"),
        ("ses", f"https://{PW}@email.eu-west-1.amazonaws.com"),
        ("ses", f"https://:{PW}@127.0.0.1:8443"),
        ("sendgrid", f"https://api.sendgrid.example?key={PW}"),
        ("sendgrid", f"https://api.sendgrid.example#{PW}"),
        ("mailgun", f"https://api.mailgun.example:99999{PW}"),
    ],
)
def test_an_endpoint_with_credentials_or_more_than_a_host_is_refused_unquoted(
    monkeypatch: pytest.MonkeyPatch, kind: str, endpoint: str
) -> None:
    monkeypatch.setenv("MAILGUN_API_KEY", "key-0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("MAILGUN_DOMAIN", "mg.example.com")
    monkeypatch.setenv("SENDGRID_API_KEY", "SG.aaaaaaaaaa.bbbbbbbbbb")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secretexample")
    t: dict[str, object] = {"kind": kind, "endpoint": endpoint}
    if kind == "ses":
        t["region"] = "eu-west-1"
    with pytest.raises(ConfigError) as exc:
        _cfg({"t": t})
    assert PW not in str(exc.value)
    assert "endpoint" in str(exc.value)
    # and the same endpoint without them is taken
    if "@" in endpoint:
        t["endpoint"] = endpoint.replace(endpoint.partition("//")[2].partition("@")[0] + "@", "")
        if t["endpoint"].startswith("http://"):  # type: ignore[union-attr]
            t["auth_in_clear"] = True
        _cfg({"t": t})


def test_a_relay_host_with_credentials_is_refused_unquoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTSEND_T_USERNAME", "u")
    monkeypatch.setenv("FASTSEND_T_PASSWORD", "p")
    for host in (f"u:{PW}@relay.example.net", f"smtp://relay.example.net/{PW}"):
        with pytest.raises(ConfigError, match="host must be a host name") as exc:
            _cfg({"t": {"kind": "relay", "host": host}})
        assert PW not in str(exc.value)
    _cfg({"t": {"kind": "relay", "host": "relay.example.net"}})
    # The binary refuses it before anything is sent, and says nothing of the password.
    f = tmp_path / "fastsend.toml"
    f.write_text(
        '[routes]\n"*" = "mg"\n[transports.mg]\nkind = "mailgun"\ndomain = "mg.example.com"\n'
        f'endpoint = "http://api:{PW}@10.1.2.3:8080"\n'
    )
    res = run_fastsend("check-config", "-c", str(f))
    assert res.returncode != 0, res
    assert "user or password" in res.stderr and PW not in res.stdout + res.stderr, res
