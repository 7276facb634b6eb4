"""Shaping policy: shipped defaults matched by MX suffix, user overrides, config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fastsend import config as cfgmod
from fastsend.config import ConfigError
from fastsend.shaping.policy import load_policy
from fastsend.shaping.pools import load_pools


def policy(raw: dict | None = None, tmp: Path | None = None):  # type: ignore[no-untyped-def]
    return load_policy(cfgmod.from_dict(raw or {}, base_dir=str(tmp or ".")))


@pytest.mark.parametrize(
    ("host", "provider"),
    [
        ("gmail-smtp-in.l.google.com", "google"),
        ("ALT1.ASPMX.L.GOOGLE.COM.", "google"),
        ("aspmx2.googlemail.com", "google"),
        ("mta5.am0.yahoodns.net", "yahoo"),
        ("example-com.mail.protection.outlook.com", "outlook"),
        ("hotmail-com.olc.protection.outlook.com", "outlook"),
        ("contoso-com.l-v1.mx.microsoft", "outlook"),  # Exchange Online, DNSSEC (2024-)
        ("mx.microsoft.example", ""),
        ("mx01.mail.icloud.com", "icloud"),
        ("mx1.comcast.net", "comcast"),
        ("mx00.emig.gmx.net", "gmx"),
        ("mx-ha03.web.de", "gmx"),
        ("mxs.mail.ru", "mailru"),
        ("mx.yandex.net", "yandex"),
        ("mx.example.org", ""),
        ("notgoogle.com", ""),  # a suffix match is on a label boundary
    ],
)
def test_provider_by_mx_suffix(host: str, provider: str) -> None:
    assert policy().provider_for([host]) == provider


def test_shipped_values_for_providers() -> None:
    p = policy()
    g = p.resolve(("gmail-smtp-in.l.google.com",), "customer.example")
    assert (g.provider, g.tls, g.max_connections, g.max_messages_per_connection) == (
        "google",
        "required",
        5,
        50,
    )
    assert p.resolve(("mta6.am0.yahoodns.net",), "aol.com").max_messages_per_connection == 20
    icloud = p.resolve(("mx02.mail.icloud.com",), "me.com")
    assert (icloud.max_connections, icloud.max_messages_per_connection) == (10, 5)
    comcast = p.resolve(("mx2.comcast.net",), "comcast.net")
    assert (comcast.max_connections, comcast.max_messages_per_connection, comcast.tls) == (
        25,
        1000,
        "required",
    )
    # An unknown site keeps the engine's [delivery] values and has no message rate.
    other = p.resolve(("mx.example.org",), "example.org")
    assert other.provider == "" and other.rates == () and math.isinf(other.message_rate)
    assert other.max_connections == 16 and other.max_messages_per_connection == 1000
    assert other.connection_rate == 0  # no connection-rate cap by default


def test_provider_by_domain_when_mx_names_do_not_match() -> None:
    # Custom MX names (or the implicit MX) still get the provider's limits by domain.
    assert policy().resolve(("mx.custom-gmail-host.example",), "gmail.com").provider == "google"
    # A static route resolves with the route host and no domain: the default.
    assert policy().resolve(("127.0.0.1",), "").provider == ""


def test_overrides_default_provider_domain(tmp_path: Path) -> None:
    f = tmp_path / "extra.toml"
    f.write_text(
        '[provider.google]\nmessages_per_hour = 36000\n[provider.acme]\nmx_suffixes = ["mx.acme.test"]\nmax_connections = 2\n'
    )
    raw = {
        "delivery": {"max_connections": 8},
        "shaping": {
            "file": "extra.toml",
            "default": {"messages_per_second": 100},
            "provider": {"google": {"max_connections": 3}},
            "domain": {"slow.example": {"messages_per_minute": 60, "tls": "off"}},
        },
    }
    p = policy(raw, tmp_path)
    g = p.resolve(("aspmx.l.google.com",), "x.example")
    # default's 100/s, then google's 36000/h from the file; file < config table.
    assert g.max_connections == 3 and g.tls == "required"
    assert g.rates == ((100.0, 100), (10.0, 10))
    assert g.message_rate == 10.0
    acme = p.resolve(("in1.mx.acme.test",), "acme.test")
    assert acme.provider == "acme" and acme.max_connections == 2
    # A domain override wins over provider and default, for subdomains too.
    s = p.resolve(("mx.example.org",), "news.slow.example")
    assert s.tls == "off" and s.rates == ((100.0, 100), (1.0, 1))
    assert s.max_connections == 8  # from [delivery]
    # The user's rule replaces the shipped one of the same name.
    assert "yahoo-ts04" in [r["name"] for r in p.rules]


def test_no_shipped_defaults() -> None:
    p = policy({"shaping": {"defaults": False}})
    assert p.providers == {} and p.rules == []
    assert p.resolve(("aspmx.l.google.com",), "gmail.com").provider == ""


@pytest.mark.parametrize(
    ("raw", "msg"),
    [
        ({"shaping": {"defualt": {}}}, r'\[shaping\] unknown key "defualt"'),
        ({"shaping": {"default": {"max_conections": 3}}}, r'\[shaping.default\] unknown key "max_conections"'),
        ({"shaping": {"default": {"tls": "maybe"}}}, r"\[shaping.default\] tls: must be one of"),
        ({"shaping": {"default": {"max_connections": 0}}}, r"\[shaping.default\] max_connections: expected int >= 1"),
        ({"shaping": {"provider": {"g": {"mx_suffixes": "google.com"}}}}, r"\[shaping.provider.g\] mx_suffixes: expected an array, got str"),
        ({"shaping": {"aimd": {"decrease": -1}}}, r"\[shaping.aimd\] decrease: expected float >= 0"),
        ({"shaping": {"rule": [{"name": "x", "match": "(", "action": "suspend"}]}}, "bad regex"),
        ({"shaping": {"rule": [{"name": "x", "match": "a", "action": "explode"}]}}, "action"),
        (
            {"shaping": {"rule": [{"name": "x", "match": "a", "action": "throttle"}]}},
            "needs a rate",
        ),
        ({"shaping": {"file": "/nonexistent/shaping.toml"}}, "not found"),
        ({"shaping": {"dispatch": {"global_rte": 1}}}, r'\[shaping.dispatch\] unknown key "global_rte"'),
        ({"guardrails": {"bounce_rate": 5}}, r"\[guardrails\] bounce_rate: expected float <= 1"),
        ({"pools": {"main": {"ips": [{"ip": "127.0.0.2", "weight": 0}]}}}, "weight"),
        ({"pools": {"main": {"ips": ["not-an-ip"]}}}, "not an IP"),
        ({"pools": {"default": "nope", "main": {"ips": ["127.0.0.2"]}}}, "not a pool"),
    ],
)
def test_config_errors_name_the_key(raw: dict, msg: str | None) -> None:  # type: ignore[type-arg]
    if msg is None:
        cfgmod.from_dict(raw)
        return
    with pytest.raises(ConfigError, match=msg):
        cfgmod.from_dict(raw)


def test_load_policy_without_config_is_the_shipped_file() -> None:
    p = load_policy(None)
    assert {"google", "yahoo", "outlook", "icloud", "comcast", "gmx", "mailru", "yandex"} <= set(
        p.providers
    )
    names = {r["name"] for r in p.rules}
    assert {"gmail-unusual-rate", "yahoo-ts04", "outlook-max-connections"} <= names


def test_pools_give_source_ips() -> None:
    cfg = cfgmod.from_dict(
        {"pools": {"main": {"ips": [{"ip": "127.0.0.2", "ehlo": "o1.example"}, "127.0.0.3"]}}}
    )
    assert cfg.source_ips == ["127.0.0.2", "127.0.0.3"]
    assert load_pools(cfg, 0).ehlo_names() == {"127.0.0.2": "o1.example"}
