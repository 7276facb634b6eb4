"""Complaint-rate and bounce-rate alarms over the rollups, with the providers' published lines.

NAME
    fastsend.analytics.alarms -- AlarmSettings, Alarms.

DESCRIPTION
    Config (``[reputation.alarms]``, every key optional)::

        window_s = 3600            # rates over the last hour
        min_delivered = 200        # judge a rate only over this much mail: delivered for
                                   # the complaint rate, ended (delivered, bounced or
                                   # expired) for the bounce rate
        complaint_rate_warn = 0.001  # Gmail: keep the spam rate under 0.1% ...
        complaint_rate_max = 0.003   # ... and never reach 0.3% (Gmail and Yahoo bulk-sender
                                     # requirements, February 2024)
        bounce_rate_warn = 0.02    # no provider publishes a bounce line; 2% / 5% are the
        bounce_rate_max = 0.05     # common industry guidance (and the guardrails' default)

    :meth:`Alarms.evaluate` (in serve, every minute) reads each tenant's
    rollups per campaign and per provider, and the node's per source IP and per
    provider (all tenants' mail: a provider judges the IP, and the sender, on all
    of it; ``"tenant": "*"``), over the window and emits
    ``{"event": "alarm", "kind": "complaint_rate" | "bounce_rate", "level":
    "warning" | "critical", "tenant", "campaign" | "provider" | "source_ip", "rate", "line",
    "delivered", "window_s"}`` when a group crosses a line (once per group and
    level, again only after it cleared: ``alarm_cleared``; a group with no mail
    in the window clears with ``rate`` null, so its next crossing is told). Events reach the
    webhooks like every other event. What is raised is kept in the rollup store
    (:meth:`RollupStore.states`, scope ``alarm``) and changed by compare-and-set:
    a restart neither raises an alarm again nor forgets to clear it, and of two
    nodes sharing a Redis spool (the same rollups) only one tells each change.

DELIBERATELY NOT HERE
    No pausing (the guardrails pause campaigns: fastsend.shaping.guardrails).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from fastsend.analytics.query import rates
from fastsend.analytics.store import IDX, RollupStore, store_outage
from fastsend.config.analytics import AlarmSettings

log = logging.getLogger("fastsend.analytics")

NODE = "*"
SCOPE = "alarm"  # the rollup store's states of raised alarms: JSON [tenant, dim, value, kind]




class Alarms:
    def __init__(self, settings: AlarmSettings, store: RollupStore,
                 emit: Callable[[dict[str, Any]], None]) -> None:  # fmt: skip
        self.settings = settings
        self.store = store
        self.emit = emit
        self.raised: dict[tuple[Any, ...], str] = {}  # (tenant, dim, value, kind) -> level
        self._outage = False  # the store refused the last change (a full disk)

    def _load(self) -> None:
        """What is raised, as the store keeps it (this node's and the others' changes)."""
        self.raised = {}
        for k, level in self.store.states(SCOPE).items():
            try:
                key = tuple(orjson.loads(k))
            except (orjson.JSONDecodeError, TypeError):
                continue
            self.raised[key] = level

    def _level(self, rate: float | None, warn: float, top: float) -> str:
        if rate is None:
            return ""
        if rate >= top:
            return "critical"
        return "warning" if rate >= warn else ""

    def evaluate(self, tenants: list[str], now: float | None = None) -> list[dict[str, Any]]:
        """The alarms raised and cleared since the last evaluation (emitted). A store
        that refuses writes (a full disk, a read-only file system) is said once, not
        a traceback an evaluation: the changes are told once it takes them."""
        out: list[dict[str, Any]] = []
        try:
            self._evaluate(tenants, now, out)
        except Exception as e:
            what = store_outage(e)
            if what is None:
                raise
            if not self._outage:
                log.warning("analytics: alarms: the rollup store %s; alarm changes are"
                            " told once it can be written", what)  # fmt: skip
            self._outage = True
            return out
        if self._outage:
            log.warning("analytics: alarms: the rollup store is written again")
            self._outage = False
        return out

    def _evaluate(self, tenants: list[str], now: float | None, out: list[dict[str, Any]]) -> None:
        s = self.settings
        now = time.time() if now is None else now
        t1 = int(now) - int(now) % 60 + 60
        t0 = t1 - int(s.window_s) // 60 * 60
        self._load()
        # Each tenant's campaigns and providers, and the node's source IPs and
        # providers: a provider judges an IP (and the sender's domains and IPs
        # together) on all the mail it gets, whichever tenants' it is. Before, five
        # tenants each under the sample at Gmail made no alarm at 1% complaints
        # over the node's 750 deliveries there. A provider only one tenant sends to
        # is that tenant's alarm already (not told twice).
        judged = [(t, dim) for t in tenants if t != NODE for dim in ("campaign", "provider")]
        senders: dict[Any, int] = {}  # provider -> tenants with mail to it in the window
        for tenant, dim in [*judged, (NODE, "source_ip"), (NODE, "provider")]:
            rows = self.store.aggregate(60, t0, t1, tenant, {}, [dim], False)
            measured: set[tuple[Any, ...]] = set()  # (value, kind) with mail in the window
            for (value,), row in rows:
                if dim == "source_ip" and not value:
                    continue  # no IP of ours (a relay or provider route)
                if dim == "provider":
                    if tenant != NODE:
                        senders[value] = senders.get(value, 0) + 1
                    elif senders.get(value, 0) < 2:
                        continue
                delivered = row[IDX["delivered"]]
                ended = delivered + row[IDX["bounced"]] + row[IDX["expired"]]
                if delivered:
                    measured.add((value, "complaint_rate"))
                if ended:
                    measured.add((value, "bounce_rate"))
                if ended < s.min_delivered:
                    continue
                r = rates(row)
                # Each rate is judged on the mail it is a rate of: complaints over
                # delivered mail, bounces over mail that ended (a list that mostly
                # bounces delivers little, and is the one to warn about).
                for kind, warn, top, sample in (
                    ("complaint_rate", s.complaint_rate_warn, s.complaint_rate_max,
                     delivered),
                    ("bounce_rate", s.bounce_rate_warn, s.bounce_rate_max, ended),
                ):  # fmt: skip
                    if sample < s.min_delivered:
                        continue
                    key = (tenant, dim, value, kind)
                    level = self._level(r[kind], warn, top)
                    was = self.raised.get(key, "")
                    if level == was:
                        continue
                    if not self.store.set_state(SCOPE, orjson.dumps(key).decode(), was,
                                                level):  # fmt: skip
                        continue  # another node told this change first
                    if level:
                        self.raised[key] = level
                        ev = {"event": "alarm", "kind": kind, "level": level,
                              "tenant": tenant, dim: value, "rate": r[kind],
                              "line": top if level == "critical" else warn,
                              "delivered": row[IDX["delivered"]],
                              "window_s": int(s.window_s)}  # fmt: skip
                    else:
                        del self.raised[key]
                        ev = {"event": "alarm_cleared", "kind": kind, "tenant": tenant,
                              dim: value, "rate": r[kind]}  # fmt: skip
                    self.emit(ev)
                    out.append(ev)
            self._clear_unmeasured(tenant, dim, measured, out)

    def _clear_unmeasured(self, tenant: str, dim: str, measured: set[tuple[Any, ...]],
                          out: list[dict[str, Any]]) -> None:  # fmt: skip
        """A raised alarm whose group had no mail in the window (the campaign ended,
        the provider gets nothing tonight) is judged on nothing: it clears (rate None),
        so the group's next crossing is told again instead of matching a stale level."""
        for key in [k for k in self.raised if k[0] == tenant and k[1] == dim]:
            _t, _d, value, kind = key
            if (value, kind) in measured:
                continue
            if not self.store.set_state(SCOPE, orjson.dumps(list(key)).decode(),
                                        self.raised[key], ""):  # fmt: skip
                continue  # another node told it first
            del self.raised[key]
            ev = {"event": "alarm_cleared", "kind": kind, "tenant": tenant, dim: value,
                  "rate": None, "delivered": 0}  # fmt: skip
            self.emit(ev)
            out.append(ev)
