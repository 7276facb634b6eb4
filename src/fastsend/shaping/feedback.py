"""Feedback loops: replies drive the rate of a (source IP, site).

NAME
    fastsend.shaping.feedback -- automation rules and AIMD.

DESCRIPTION
    Automation rules (data, ``[[rule]]`` in a shaping layer)::

        [[rule]]
        name = "yahoo-ts04"          # unique; a later layer's rule of the same name replaces it
        match = '\\[TSS?04\\]'        # case-insensitive regex on "CODE ENHANCED TEXT"
        reasons = ["blocked"]        # and/or: the bounce classifier's reasons (match or
                                     # reasons is required; both given: both must hold)
        provider = "yahoo"           # optional: only sites of this provider
        codes = [421, 451]           # optional: only these reply codes
        threshold = 1; period = 3600 # N matches within period seconds (per IP and site)
        action = "suspend"           # suspend | rest | throttle | bounce
        duration = 7200              # seconds the action lasts
        messages_per_minute = 10     # throttle: lower rates (per second/minute/hour)
        max_connections = 1          # throttle: fewer connections

    :class:`Trigger` counts matches per (rule, IP, site) in a sliding window
    and says when a rule fires. :class:`Aimd` is the additive-increase /
    multiplicative-decrease controller of one (IP, site)'s message rate: a
    report whose deferred share reaches ``defer_share`` (or carries a "rate
    limited" reply) multiplies the rate by ``decrease`` -- at most once per
    ``hold`` seconds, so one cohort of replies to mail sent before the cut
    does not cut again -- and every rate's worth of delivered messages adds
    ``increase`` messages/s (TCP's +1 per round trip, with one second as the
    round trip). A site with no configured rate starts unlimited; the first
    cut starts from the measured sending rate (:meth:`Aimd.sent` counts what is
    written), and the limit is lifted again once the rate climbs back to the
    rate measured before the first cut.

    Clocks are passed in (monotonic seconds), so tests drive them.

DELIBERATELY NOT HERE
    No buckets and no I/O: :mod:`fastsend.shaping.lanes` applies what these
    classes decide to GCRA buckets and connection limits. No bounce
    classification: :mod:`fastsend.bounce.reply` owns that (its
    ``rate_limited`` / ``ip_blocked`` flags feed in here).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import msgspec

ACTIONS = ("suspend", "rest", "throttle", "bounce")  # fastsend.config.shaping.RuleTable
# Aimd.observe answers
SAME, DECREASED, INCREASED, LIFTED = 0, 1, 2, 3


class Rule(msgspec.Struct, frozen=True):
    """A compiled automation rule."""

    name: str
    regex: re.Pattern[str]
    action: str
    threshold: int
    period: float
    duration: float
    codes: frozenset[int]
    rate: float  # throttle: messages/s (0: unchanged)
    max_connections: int  # throttle: 0 unchanged
    reasons: frozenset[str] = frozenset()  # the classifier's reasons (empty: any)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        rates = [
            float(d[k]) / per
            for k, per in (
                ("messages_per_second", 1.0),
                ("messages_per_minute", 60.0),
                ("messages_per_hour", 3600.0),
            )
            if d.get(k)
        ]
        return cls(
            d["name"],
            re.compile(d["match"], re.I),
            d["action"],
            int(d["threshold"]),
            float(d["period"]),
            float(d["duration"]),
            frozenset(d["codes"]),
            min(rates) if rates else 0.0,
            int(d.get("max_connections", 0)),
            frozenset(d.get("reasons") or ()),
        )

    def matches(self, code: int, line: str, reason: str = "") -> bool:
        """``reason`` is the bounce classifier's name for the reply (see reasons)."""
        if self.codes and code not in self.codes:
            return False
        if self.reasons and reason not in self.reasons:
            return False
        return not self.regex.pattern or self.regex.search(line) is not None


def rules_for(rules: list[dict[str, Any]], provider: str) -> tuple[Rule, ...]:
    """The compiled rules that apply to sites of ``provider``."""
    return tuple(
        Rule.from_dict(r) for r in rules if not r.get("provider") or r["provider"] == provider
    )


class Trigger:
    """Counts one rule's matches (per IP and site) within its period."""

    __slots__ = ("rule", "times")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.times: collections.deque[float] = collections.deque(maxlen=rule.threshold)

    def hit(self, now: float) -> bool:
        """Record a match at ``now``; True when the threshold is reached (then reset)."""
        self.times.append(now)
        if len(self.times) == self.rule.threshold and now - self.times[0] <= self.rule.period:
            self.times.clear()
            return True
        return False


class Aimd:
    """AIMD of one (IP, site)'s message rate. ``rate`` is inf when unlimited."""

    __slots__ = (
        "_n",
        "_start",
        "ceiling",
        "decrease",
        "defer_share",
        "hold",
        "increase",
        "last_cut",
        "measured",
        "min_rate",
        "peak",
        "rate",
    )

    def __init__(self, ceiling: float, settings: dict[str, float]) -> None:
        self.ceiling = ceiling  # configured rate (inf: none)
        self.rate = ceiling
        self.decrease = settings["decrease"]
        self.increase = settings["increase"]
        self.defer_share = settings["defer_share"]
        self.hold = settings["hold"]
        self.min_rate = max(settings["min_rate"], 1e-3)
        self.last_cut = -math.inf
        self.measured = 0.0  # attempts/s over the last complete one-second window
        self.peak = 0.0  # measured rate before the first cut (for unlimited sites)
        self._start = -math.inf
        self._n = 0

    def sent(self, now: float, n: int) -> None:
        """Count ``n`` messages written at ``now`` (the sending rate is measured
        over one-second windows)."""
        if now - self._start >= 1.0:
            if self._start > -math.inf:
                self.measured = self._n / (now - self._start)
            self._start, self._n = now, 0
        self._n += n

    def last_active(self) -> float:
        """When it last cut the rate or counted mail written (monotonic)."""
        return max(self.last_cut, self._start)

    def sending(self, now: float) -> float:
        """The measured sending rate (0.0: not known yet)."""
        el = now - self._start
        current = self._n / max(el, 0.01) if el < 1e9 else 0.0
        return max(self.measured, current)

    def observe(self, now: float, delivered: int, deferred: int, slow_down: bool = False) -> int:
        """Feed one report's counts; returns SAME, DECREASED, INCREASED or LIFTED."""
        total = delivered + deferred
        if total <= 0:
            return SAME
        sending = self.sending(now)
        if slow_down or deferred >= self.defer_share * total:
            if now - self.last_cut < self.hold:
                return SAME
            self.last_cut = now
            if math.isinf(self.rate):
                self.peak = sending or float(total)
                base = self.peak
            else:
                base = min(self.rate, sending) if sending > 0 else self.rate
            self.rate = max(self.min_rate, base * self.decrease)
            return DECREASED
        if deferred or self.rate >= self.ceiling:
            return SAME
        self.rate += self.increase * delivered / max(self.rate, 1.0)
        if math.isinf(self.ceiling):
            if self.rate >= self.peak:
                self.rate = math.inf
                return LIFTED
        elif self.rate >= self.ceiling:
            self.rate = self.ceiling
            return LIFTED
        return INCREASED
