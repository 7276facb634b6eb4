"""Engagement-aware warm-up: a warming IP's schedule moves with its complaint and bounce
rates and with what the providers' feeds say.

NAME
    fastsend.analytics.warmup -- WarmupPolicy, decide, EngagementWarmup.

DESCRIPTION
    Config (``[reputation.warmup]``, every key optional)::

        enabled = true
        min_delivered = 200        # judge a day only with this much delivered mail
        advance_complaint = 0.0005 # under both: one extra day ahead (faster ramp)
        advance_bounce = 0.01
        hold_complaint = 0.001     # from either: hold (the day does not advance)
        hold_bounce = 0.02
        back_complaint = 0.003     # from either (Gmail/Yahoo's 0.3% line): one day back
        back_bounce = 0.05
        max_ahead = 7              # days ahead of the calendar at most

    Once per UTC day and warming IP, :meth:`EngagementWarmup.evaluate` reads the
    previous day's node-wide rollups of the IP (delivered, bounced, complaints)
    and the feeds' verdict (:meth:`fastsend.analytics.feeds.Feeds.verdict`:
    SNDS for Outlook, Postmaster Tools for Gmail; "bad" steps back, "hold"
    holds), and :func:`decide` moves the IP's day offset by +1, 0, -1 or -2.
    Offsets are kept in ``<spool>/warmup-offsets.json`` and handed to the
    workers (``wire.WarmupAdjust``), where ``PoolIP.warmup_day`` adds them, so
    today's caps change at once. A ``warmup_adjusted`` event says why.

    Mail over a cold IP's daily cap is not held to the next day: the pool's
    smooth weighted round-robin passes over an IP at its cap, so its share
    goes to the pool's warmed IPs (fastsend.shaping.pools).

DELIBERATELY NOT HERE
    No sending and no caps: fastsend.shaping decides limits, this only moves
    the warm-up day.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from fastsend import durable
from fastsend.analytics.query import rates
from fastsend.analytics.store import IDX, RollupStore
from fastsend.config.analytics import WarmupPolicy

NODE = "*"
ADVANCE, NORMAL, HOLD, BACK = 1, 0, -1, -2




def decide(delivered: int, complaint_rate: float | None, bounce_rate: float | None,
           verdict: str, p: WarmupPolicy) -> tuple[int, str]:  # fmt: skip
    """(day offset change, why) for one IP's last day."""
    c = complaint_rate or 0.0
    b = bounce_rate or 0.0
    if verdict == "bad":
        return BACK, "a provider feed says bad"
    if delivered >= p.min_delivered and (c >= p.back_complaint or b >= p.back_bounce):
        return BACK, f"complaint {c:.4%}, bounce {b:.2%} at or over the lines"
    if verdict == "hold":
        return HOLD, "a provider feed says hold"
    if delivered < p.min_delivered:
        return NORMAL, f"only {delivered} delivered: the schedule as written"
    if c >= p.hold_complaint or b >= p.hold_bounce:
        return HOLD, f"complaint {c:.4%}, bounce {b:.2%} over the hold lines"
    if c < p.advance_complaint and b < p.advance_bounce:
        return ADVANCE, f"complaint {c:.4%}, bounce {b:.2%} well under the lines"
    return NORMAL, "rates between the lines"


class EngagementWarmup:
    """Offsets per IP, judged once per UTC day, kept in a small JSON file."""

    def __init__(self, policy: WarmupPolicy, store: RollupStore, spool_dir: str,
                 emit: Callable[[dict[str, Any]], None],
                 verdict: Callable[[str, str], str] | None = None) -> None:  # fmt: skip
        self.policy = policy
        self.store = store
        self.emit = emit
        self.verdict = verdict
        self.path = os.path.join(spool_dir, "warmup-offsets.json")
        self.state: dict[str, dict[str, int]] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                self.state = {k: v for k, v in data.items() if isinstance(v, dict)}
        except (OSError, ValueError):
            pass

    def offsets(self) -> dict[str, int]:
        return {ip: int(v.get("offset", 0)) for ip, v in self.state.items()}

    def _verdict(self, ip: str) -> str:
        if self.verdict is None:
            return ""
        got = {self.verdict(ip, prov) for prov in ("google", "outlook")}
        for v in ("bad", "hold", "good"):
            if v in got:
                return v
        return ""

    def evaluate(self, ips: list[str], now: float | None = None) -> bool:
        """Judge each IP's previous day once; True when an offset changed."""
        if not self.policy.enabled:
            return False
        now = time.time() if now is None else now
        today = int(now) // 86400
        y0 = (today - 1) * 86400
        rows = dict(self.store.aggregate(86400, y0, y0 + 86400, NODE, {"source_ip": list(ips)},
                                         ["source_ip"], False))  # fmt: skip
        changed = False
        for ip in ips:
            st = self.state.setdefault(ip, {"offset": 0, "day": 0})
            if st.get("day") == today:
                continue
            st["day"] = today
            row = rows.get((ip,))
            delivered = row[IDX["delivered"]] if row else 0
            r = rates(row) if row else {"complaint_rate": None, "bounce_rate": None}
            delta, why = decide(delivered, r["complaint_rate"], r["bounce_rate"],
                                self._verdict(ip), self.policy)  # fmt: skip
            if delta == NORMAL:
                continue
            old = int(st.get("offset", 0))
            new = min(self.policy.max_ahead, old + delta)
            if new != old:
                st["offset"] = new
                changed = True
                self.emit({"event": "warmup_adjusted", "source_ip": ip, "change": delta,
                           "offset": new, "reason": why, "delivered": delivered})  # fmt: skip
        self._save()
        return changed

    def _save(self) -> None:
        """Durably (durable.replace: the old offsets or the new after a power
        loss, never an empty file that reads as no offsets: every IP's warm-up
        back to its schedule as written)."""
        durable.replace(json.dumps(self.state).encode(), self.path, 0o644)
