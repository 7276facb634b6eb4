"""fastsend.tables.load_table: the scalar sections ([api], [analytics], [guardrails],
[reputation.alarms], [reputation.warmup]) read through one loop, each with its bounds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fastsend.analytics.alarms import AlarmSettings
from fastsend.analytics.rollup import AnalyticsSettings
from fastsend.analytics.warmup import WarmupPolicy
from fastsend.config import ConfigError, from_dict
from fastsend.serve.api import ApiSettings
from fastsend.shaping.guardrails import GuardrailSettings
from fastsend.tables import load_table, read_toml


@dataclass
class S:
    on: bool = True
    name: str = "x"
    count: int = 3
    share: float = 0.5


def test_defaults_values_and_float_from_int() -> None:
    assert load_table(S, {}, "s") == S()
    got = load_table(S, {"on": False, "name": "y", "count": 0, "share": 1}, "s")
    assert got == S(False, "y", 0, 1.0) and isinstance(got.share, float)


@pytest.mark.parametrize(
    ("raw", "kw", "error"),
    [
        ([], {}, "[s] must be a table"),
        ({"cuont": 1}, {}, "[s] unknown key 'cuont' (known: count, name, on, share)"),
        ({"on": 1}, {}, "[s] on has a bad value 1: it must be true or false"),
        ({"name": 5}, {}, "[s] name has a bad value 5: it must be a string"),
        ({"count": True}, {}, "[s] count has a bad value True: it must be an integer >= 0"),
        ({"count": 1.5}, {}, "[s] count has a bad value 1.5: it must be an integer >= 0"),
        ({"count": -1}, {}, "[s] count has a bad value -1: it must be an integer >= 0"),
        ({"count": 0}, {"int_min": 1}, "[s] count has a bad value 0: it must be an integer >= 1"),
        ({"share": "1"}, {}, "[s] share has a bad value '1': it must be a number >= 0"),
        ({"share": False}, {}, "[s] share has a bad value False: it must be a number >= 0"),
        (
            {"share": 2},
            {"float_max": 1.0},
            "[s] share has a bad value 2: it must be a number from 0 to 1",
        ),
        (
            {"share": 0},
            {"float_min_open": True},
            "[s] share has a bad value 0: it must be a number > 0",
        ),
    ],
)
def test_refusals_name_section_key_and_want(raw: object, kw: dict, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_table(S, raw, "s", **kw)
    assert str(e.value) == error


def test_each_section_keeps_its_bounds() -> None:
    cfg = from_dict({"guardrails": {"min_sample": 20, "bounce_rate": 0.1},
                     "analytics": {"minute_days": 2, "enabled": False},
                     "reputation": {"alarms": {"window_s": 600, "min_delivered": 10},
                                    "warmup": {"max_ahead": 3, "hold_bounce": 0.03}}})  # fmt: skip
    g = GuardrailSettings.from_config(cfg)
    assert (g.min_sample, g.bounce_rate) == (20, 0.1)
    a = AnalyticsSettings.from_config(cfg)
    assert a.minute_days == 2.0 and a.enabled is False
    # judged by the declared type (float), not the default's (an int number of days)
    assert (
        AnalyticsSettings.from_config(from_dict({"analytics": {"day_days": 2.5}})).day_days == 2.5
    )
    al = AlarmSettings.from_config(cfg)
    assert (al.window_s, al.min_delivered) == (600.0, 10) and isinstance(al.window_s, float)
    w = WarmupPolicy.from_config(cfg)
    assert (w.max_ahead, w.hold_bounce) == (3, 0.03)
    assert ApiSettings.from_raw({"api": {"rate_limit": 5}}).rate_limit == 5.0
    bad = [
        (GuardrailSettings.from_config, {"guardrails": {"min_sample": 0}}, "integer >= 1"),
        (GuardrailSettings.from_config, {"guardrails": {"bounce_rate": 1.5}}, "from 0 to 1"),
        (AnalyticsSettings.from_config, {"analytics": {"hour_days": 0}}, "number > 0"),
        (WarmupPolicy.from_config, {"reputation": {"warmup": {"back_bounce": 2}}}, "from 0 to 1"),
        (AlarmSettings.from_config, {"reputation": {"alarms": {"window_s": -1}}}, "number >= 0"),
        (AlarmSettings.from_config, {"reputation": {"alarms": {"min_delivered": 2.5}}}, "integer"),
    ]
    for fn, raw, want in bad:
        with pytest.raises(ConfigError, match=want):
            fn(from_dict(raw))
    with pytest.raises(
        ConfigError, match=r"\[api\] max_batch has a bad value -1: it must be an integer >= 0"
    ):
        ApiSettings.from_raw({"api": {"max_batch": -1}})
    with pytest.raises(
        ConfigError, match=r"\[api\] listen has a bad value 8025: it must be a string"
    ):
        ApiSettings.from_raw({"api": {"listen": 8025}})


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
