"""Transport and route settings a typo or an unsafe value used to pass silently.

- A route naming a transport never defined (``"*" = "sg2"``, a typo of ``sg``)
  was taken as a static route to host ``sg2`` port 25: check-config said ok and
  every message deferred against a host that does not exist.
- An HTTP provider ``endpoint = "http://..."`` on another host sent its API key
  over the network in clear text.
- SendGrid ``region = "eu"`` was ignored (the global endpoint refuses an EU
  subuser's key); Mailgun ``domain = "bad domain"`` was taken.

Real parts: the config loader (``from_dict``) and ``fastsend check-config``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests._engine_helpers import run_fastsend

from fastsend.config import ConfigError, from_dict


def _cfg(routes: dict[str, object], transports: dict[str, object] | None = None) -> object:
    return from_dict({"routes": routes, "transports": transports or {}})


def test_a_route_naming_an_undefined_transport_is_refused_not_sent_to_that_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENDGRID_API_KEY", "SG.x")
    sg = {"sg": {"kind": "sendgrid"}}
    with pytest.raises(ConfigError, match=r"'sg2' is no transport \(defined: sg;"):
        _cfg({"*": "sg2"}, sg)
    with pytest.raises(ConfigError, match="'mailhub:25'"):
        _cfg({"example.com": "mailhub"})
    # What stays a static route: a port, a dotted name, an address.
    cfg = _cfg({"a.example": "mailhub:2525", "b.example": "relay.example.net",
                "c.example": "127.0.0.1", "d.example": "[::1]:25", "*": "sg"}, sg)  # fmt: skip
    got = {k: str(v) for k, v in cfg.routes.items()}  # type: ignore[attr-defined]
    assert got == {"a.example": "mailhub:2525", "b.example": "relay.example.net:25",
                   "c.example": "127.0.0.1:25", "d.example": "[::1]:25", "*": "sg"}  # fmt: skip
    # The binary says it before anything is sent.
    f = tmp_path / "fastsend.toml"
    f.write_text('[routes]\n"*" = "sg2"\n[transports.sg]\nkind = "sendgrid"\n')
    res = run_fastsend("check-config", "-c", str(f))
    assert res.returncode != 0 and "'sg2' is no transport" in res.stderr + res.stdout, res


def test_a_plain_http_endpoint_off_this_machine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGUN_API_KEY", "key-x")
    monkeypatch.setenv("MAILGUN_DOMAIN", "mg.example.com")
    for host in ("api.mailgun.example", "10.0.0.5:8080", "[2001:db8::1]:80"):
        t = {"mg": {"kind": "mailgun", "endpoint": f"http://{host}"}}
        with pytest.raises(ConfigError, match="in clear text"):
            _cfg({"*": "mg"}, t)
    for host in ("127.0.0.1:8025", "localhost:9", "[::1]:8080", "127.0.0.7"):
        t = {"mg": {"kind": "mailgun", "endpoint": f"http://{host}"}}
        _cfg({"*": "mg"}, t)  # a stand-in on this machine
    t = {"mg": {"kind": "mailgun", "endpoint": "http://10.0.0.5", "auth_in_clear": True}}
    _cfg({"*": "mg"}, t)  # the operator's say-so
    _cfg({"*": "mg"}, {"mg": {"kind": "mailgun", "endpoint": "https://api.mailgun.example"}})


def test_sendgrid_eu_region_and_mailgun_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDGRID_API_KEY", "SG.x")
    monkeypatch.setenv("MAILGUN_API_KEY", "key-x")
    cfg = _cfg({"*": "sg"}, {"sg": {"kind": "sendgrid", "region": "eu"}})
    assert cfg.transports["sg"].endpoint == "https://api.eu.sendgrid.com"  # type: ignore[attr-defined]
    cfg = _cfg({"*": "sg"}, {"sg": {"kind": "sendgrid"}})
    assert cfg.transports["sg"].endpoint == ""  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="region must be global or eu"):
        _cfg({"*": "sg"}, {"sg": {"kind": "sendgrid", "region": "us-east-1"}})
    with pytest.raises(ConfigError, match="is not a domain name"):
        _cfg({"*": "mg"}, {"mg": {"kind": "mailgun", "domain": "bad domain"}})
    _cfg({"*": "mg"}, {"mg": {"kind": "mailgun", "domain": "mg.example.com"}})


def test_a_mailgun_transport_without_its_domain_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mailgun sends as the domain in its URL; without ``domain`` the envelope
    sender's was taken, a VERP or bounce domain Mailgun does not know, and every
    message was deferred ("Domain not found"; found by an audit). Now the config
    says what to set; MAILGUN_DOMAIN gives it to a shorthand route."""
    monkeypatch.setenv("MAILGUN_API_KEY", "key-x")
    monkeypatch.delenv("MAILGUN_DOMAIN", raising=False)
    with pytest.raises(ConfigError, match='needs domain = "mg'):
        _cfg({"*": "mg"}, {"mg": {"kind": "mailgun", "region": "eu"}})
    with pytest.raises(ConfigError, match="MAILGUN_DOMAIN"):
        from_dict({"routes": {"*": "mailgun:eu"}})
    monkeypatch.setenv("MAILGUN_DOMAIN", "mg.example.org")
    assert from_dict({"routes": {"*": "mailgun:eu"}}).transports["mailgun:eu"].domain == (  # type: ignore[attr-defined]
        "mg.example.org"
    )
    cfg = _cfg({"*": "mg"}, {"mg": {"kind": "mailgun", "domain": "mg.example.com"}})
    assert cfg.transports["mg"].domain == "mg.example.com"  # type: ignore[attr-defined]
