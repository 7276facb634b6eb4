"""[analytics] and [reputation] (blocklists, provider feeds, alarms, warm-up):
the tables :mod:`fastsend.analytics` reads."""

from __future__ import annotations

from typing import Annotated

import msgspec

from fastsend.config.base import NonNegFloat, NonNegInt, PosFloat, Section, Share

# The rollup store's retention per bucket width (fastsend.analytics.store).
RETENTION_DAYS = {60: 8, 3600: 120, 86400: 800}


class AnalyticsSettings(Section):
    """[analytics]: rollups of events by tenant, campaign, provider and IP."""

    enabled: bool = True
    minute_days: PosFloat = RETENTION_DAYS[60]
    hour_days: PosFloat = RETENTION_DAYS[3600]
    day_days: PosFloat = RETENTION_DAYS[86400]
    remember_messages: NonNegInt = 500_000
    # Other stores that only grow, pruned by serve's retention pass (fastsend.serve.retention);
    # 0 keeps them for ever.
    events_days: NonNegFloat = 30.0  # the per-message event index (events.db)
    dmarc_days: NonNegFloat = 400.0  # DMARC aggregate reports (dmarc.db), by report day
    machine_rules: str = ""  # a TOML file of machine-open rules (relative to the config)

    @property
    def retention(self) -> dict[int, float]:
        return {60: self.minute_days, 3600: self.hour_days, 86400: self.day_days}


class BlocklistTable(Section):
    zone: str
    providers: list[str] = msgspec.field(default_factory=lambda: ["*"])

    def __post_init__(self) -> None:
        if not self.zone.strip(".") or " " in self.zone:
            raise ValueError("zone must be a DNS name")
        if not self.providers or not all(self.providers):
            raise ValueError("providers must be a non-empty list of names")


Every = Annotated[float, msgspec.Meta(ge=60)]


class PostmasterFeed(Section):
    domains: list[str]
    token_file: str
    url: str = "https://gmailpostmastertools.googleapis.com"
    every: Every = 86400.0

    def __post_init__(self) -> None:
        _url(self.url)
        if not self.domains or not all(self.domains):
            raise ValueError("domains: a list of domains")
        if not self.token_file:
            raise ValueError("token_file is required")


class SndsFeed(Section):
    key_file: str
    url: str = "https://sendersupport.olc.protection.outlook.com/snds/data.aspx"
    every: Every = 86400.0

    def __post_init__(self) -> None:
        _url(self.url)
        if not self.key_file:
            raise ValueError("key_file is required")


def _url(v: str) -> None:
    if not v.startswith(("https://", "http://")):
        raise ValueError("url must be an http(s) URL")


class FeedsTable(Section):
    postmaster: PostmasterFeed | None = None
    snds: SndsFeed | None = None


class AlarmSettings(Section):
    """[reputation.alarms]: complaint/bounce rate alarms per window."""

    window_s: NonNegFloat = 3600.0
    min_delivered: NonNegInt = 200
    complaint_rate_warn: NonNegFloat = 0.001
    complaint_rate_max: NonNegFloat = 0.003
    bounce_rate_warn: NonNegFloat = 0.02
    bounce_rate_max: NonNegFloat = 0.05


class WarmupPolicy(Section):
    """[reputation.warmup]: when an IP's warm-up advances, holds or goes back."""

    enabled: bool = True
    min_delivered: NonNegInt = 200
    advance_complaint: Share = 0.0005
    advance_bounce: Share = 0.01
    hold_complaint: Share = 0.001
    hold_bounce: Share = 0.02
    back_complaint: Share = 0.003
    back_bounce: Share = 0.05
    max_ahead: NonNegInt = 7


class ReputationSection(Section):
    """[reputation]: DNS blocklists, provider feeds, alarms and warm-up policy."""

    blocklists: list[str | BlocklistTable] = []
    check_every: NonNegFloat = 3600.0
    rest_hours: NonNegFloat = 24.0
    feeds: FeedsTable = msgspec.field(default_factory=FeedsTable)
    alarms: AlarmSettings = msgspec.field(default_factory=AlarmSettings)
    warmup: WarmupPolicy = msgspec.field(default_factory=WarmupPolicy)

    def __post_init__(self) -> None:
        out: list[str | BlocklistTable] = []
        for i, b in enumerate(self.blocklists):
            if isinstance(b, str):
                if not b.strip(".") or " " in b:
                    raise ValueError(f"blocklists[{i}]: zone must be a DNS name")
                b = BlocklistTable(zone=b)
            out.append(b)
        self.blocklists = out

    @property
    def lists(self) -> list[BlocklistTable]:
        return [b for b in self.blocklists if isinstance(b, BlocklistTable)]
