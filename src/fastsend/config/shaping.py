"""Traffic shaping's tables: [shaping] (and the shaping files it layers,
shipped ``shaping.toml`` and ``[shaping] file``), [pools], [guardrails].
:mod:`fastsend.shaping` builds its Policy and PoolSet from these."""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from fastsend.config.base import (
    ConfigError,
    NonNegFloat,
    NonNegInt,
    Path,
    PosFloat,
    PosInt,
    Section,
    Share,
    build,
    decode,
    validate_helo,
    validate_ip,
    where,
)

ACTIONS = ("suspend", "rest", "throttle", "bounce")
TLS = Literal["opportunistic", "required", "off"]


class LimitsTable(Section):
    """[shaping.default], [shaping.domain."NAME"]: UNSET keys fall through to
    the layer below (provider, default, then the engine's [delivery])."""

    max_connections: PosInt | UnsetType = UNSET
    max_messages_per_connection: PosInt | UnsetType = UNSET
    messages_per_second: NonNegFloat | UnsetType = UNSET
    messages_per_minute: NonNegFloat | UnsetType = UNSET
    messages_per_hour: NonNegFloat | UnsetType = UNSET
    burst: NonNegInt | UnsetType = UNSET  # most messages at one instant (0: a second's worth)
    connections_per_minute: NonNegFloat | UnsetType = UNSET
    tls: TLS | UnsetType = UNSET
    aimd: bool | UnsetType = UNSET


class ProviderTable(LimitsTable):
    """[shaping.provider.NAME]: sites whose MX names end in a suffix, or listed domains."""

    mx_suffixes: list[str] | UnsetType = UNSET
    domains: list[str] | UnsetType = UNSET

    def __post_init__(self) -> None:
        for k in ("mx_suffixes", "domains"):
            v = getattr(self, k)
            if v is not UNSET and not all(v):
                raise ValueError(f"{k} must be a list of names (no empty ones)")


class AimdTable(Section):
    decrease: NonNegFloat | UnsetType = UNSET
    increase: NonNegFloat | UnsetType = UNSET
    defer_share: NonNegFloat | UnsetType = UNSET
    hold: NonNegFloat | UnsetType = UNSET
    min_rate: NonNegFloat | UnsetType = UNSET


class RestTable(Section):
    duration: NonNegFloat | UnsetType = UNSET


class RuleTable(Section):
    """One ``[[shaping.rule]]``: replies matching it ``threshold`` times within
    ``period`` trigger ``action`` (fastsend.shaping.feedback)."""

    name: str
    action: Literal["suspend", "rest", "throttle", "bounce"]
    match: str = ""  # a regex over the reply line
    reasons: list[str] = []  # the bounce classifier's reasons (empty: any)
    provider: str = ""  # only sites of this provider ("" = all)
    codes: list[int] = []
    threshold: PosInt = 1
    period: NonNegFloat = 3600.0
    duration: NonNegFloat = 3600.0
    messages_per_second: NonNegFloat | UnsetType = UNSET
    messages_per_minute: NonNegFloat | UnsetType = UNSET
    messages_per_hour: NonNegFloat | UnsetType = UNSET
    max_connections: PosInt | UnsetType = UNSET

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name is required")
        if not all(self.reasons):
            raise ValueError(f"({self.name}): reasons must be a list of reason names")
        if not (self.match or self.reasons):
            raise ValueError(f"({self.name}): match (a regex) or reasons is required")
        try:
            re.compile(self.match, re.I)
        except re.error as e:
            raise ValueError(f"({self.name}): bad regex {self.match!r}: {e}") from None
        if self.action == "throttle" and all(
            getattr(self, k) is UNSET
            for k in ("messages_per_second", "messages_per_minute", "messages_per_hour",
                      "max_connections")
        ):  # fmt: skip
            raise ValueError(f"({self.name}): a throttle rule needs a rate or max_connections")


class DispatchTable(Section):
    """[shaping.dispatch]: messages per second leaving the supervisor (0: no limit)."""

    global_rate: NonNegFloat = 0.0
    campaign_rate: NonNegFloat = 0.0
    tenant_rate: NonNegFloat = 0.0
    tenants: dict[str, NonNegFloat] = {}  # one tenant's own rate


class ShapingFile(Section):
    """The form of every shaping layer: the shipped shaping.toml, the file
    ``[shaping] file`` names, and the config's [shaping] table."""

    default: LimitsTable = msgspec.field(default_factory=LimitsTable)
    provider: dict[str, ProviderTable] = {}
    domain: dict[str, LimitsTable] = {}
    aimd: AimdTable = msgspec.field(default_factory=AimdTable)
    rest: RestTable = msgspec.field(default_factory=RestTable)
    rule: list[RuleTable] = []


_SHIPPED: list[ShapingFile] = []


def shipped_shaping() -> ShapingFile:
    """The shipped ``fastsend/shaping/shaping.toml``, typed (read once)."""
    if not _SHIPPED:
        # Beside the package's modules (a compiled extension: never a zip), read
        # without importlib.resources (its import: ~5 ms of every send's start).
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "shaping", "shaping.toml")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        _SHIPPED.append(decode(tomllib.loads(text), ShapingFile))
    return _SHIPPED[0]


class ShapingSection(ShapingFile):
    """[shaping]: the config's own layer, plus where the others come from."""

    defaults: bool = True  # false: start from nothing instead of the shipped file
    file: str = ""  # a shaping file layered between the shipped one and this table
    dispatch: DispatchTable = msgspec.field(default_factory=DispatchTable)


# ---------------------------------------------------------------- pools


class PoolIPTable(Section):
    ip: str
    weight: PosInt = 1
    ehlo: str = ""
    warmup_start: dt.date | None = None  # the IP's first warm-up day (YYYY-MM-DD)
    warmup_day: PosInt | None = None  # or: the IP is on this day of its warm-up today

    def __post_init__(self) -> None:
        self.ip = validate_ip(self.ip, "ip")
        if self.ehlo:
            self.ehlo = validate_helo(self.ehlo, "ehlo")

    @classmethod
    def config_decode(cls, value: Any, path: Path) -> PoolIPTable:
        if isinstance(value, str):
            value = {"ip": value}
        if isinstance(value, dict) and isinstance(value.get("warmup_start"), dt.datetime):
            value = {**value, "warmup_start": value["warmup_start"].date()}
        from fastsend.config.base import _struct

        return _struct(value, cls, path)


class PoolTable(Section):
    ips: list[PoolIPTable]

    def __post_init__(self) -> None:
        if not self.ips:
            raise ValueError("ips is empty")


class PoolWarmup(Section):
    schedule: list[PosInt] = []  # messages per day and provider on day 1, 2, ...


class PoolsSection(Section):
    """[pools]: named source-IP pools ([pools.NAME] ips = [...]), the default
    pool, tenants' pools and the warm-up schedule."""

    pools: dict[str, PoolTable] = {}
    default: str = ""
    tenants: dict[str, str] = {}  # tenant -> pool
    warmup: PoolWarmup = msgspec.field(default_factory=PoolWarmup)

    @classmethod
    def config_decode(cls, value: Any, path: Path) -> PoolsSection:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path)} must be a table")
        rest = {k: v for k, v in value.items() if k not in ("default", "tenants", "warmup")}
        for k, v in rest.items():
            if not isinstance(v, dict):
                raise ConfigError(
                    f'{where(path)} unknown key "{k}" (known: default, tenants, warmup,'
                    " and [pools.NAME] tables)"
                )
        kw = {
            "pools": decode(rest, dict[str, PoolTable], path),
            "default": decode(value.get("default", ""), str, (*path, "default")),
            "tenants": decode(value.get("tenants", {}), dict[str, str], (*path, "tenants")),
            "warmup": decode(value.get("warmup", {}), PoolWarmup, (*path, "warmup")),
        }
        return build(cls, kw, path)

    def __post_init__(self) -> None:
        if self.default and self.pools and self.default not in self.pools:
            raise ValueError(f"default {self.default!r} is not a pool")
        for t, p in self.tenants.items():
            if p not in self.pools and not (p == "default" and not self.pools):
                raise ValueError(f"tenants: {t!r} names unknown pool {p!r}")


class GuardrailSettings(Section):
    """[guardrails]: a campaign pauses when its bounce or complaint rate passes
    these, once ``min_sample`` messages were delivered or bounced (bounces
    reported later, DSNs and provider events, included). Until then at most
    ``min_sample`` of its messages are out unanswered at a time, a message out
    longer than ``sample_wait`` s no longer counted (a receiver that never
    answers would hold the campaign for its command timeouts)."""

    bounce_rate: Share = 0.05
    complaint_rate: Share = 0.003
    min_sample: PosInt = 500
    sample_wait: PosFloat = 30.0
    enabled: bool = True
