"""Deliverability control: traffic shaping, IP pools and warm-up, feedback loops.

NAME
    fastsend.shaping -- rules as data for how fast, from where and how often.

DESCRIPTION
    - policy.py    shipped ``shaping.toml`` + user layers -> Limits per (IP, site),
                   matched by MX host suffix -> provider, overridable per domain.
    - feedback.py  automation rules (regex + threshold -> suspend / rest /
                   throttle / bounce) and AIMD of the per-site rate.
    - pools.py     IP pools (weights, EHLO names), smooth weighted round-robin,
                   warm-up schedules with daily caps per provider.
    - lanes.py     the live state of one (source IP, site) in a worker: GCRA
                   buckets, connection counts, AIMD, rests; what pool.py asks.
    - guardrails.py campaign bounce / complaint thresholds -> pause + event.
    - supervise.py the supervisor's side: dispatch rates per campaign / tenant /
                   global, warm-up state file, records for the workers.

DELIBERATELY NOT HERE
    No sockets and no spool access from the worker side: delivery/pool.py does
    the I/O and asks lanes what it may do; only supervise.py (run by the
    supervisor) touches the spool. Bounce classification is fastsend.bounce.
"""

from fastsend.shaping.feedback import Aimd, Rule, Trigger
from fastsend.shaping.guardrails import Guardrails, GuardrailSettings
from fastsend.shaping.lanes import Lane, Shaper
from fastsend.shaping.policy import Limits, Policy, load_policy
from fastsend.shaping.pools import Pool, PoolIP, PoolSet, WarmupSchedule, load_pools

__all__ = [
    "Aimd",
    "GuardrailSettings",
    "Guardrails",
    "Lane",
    "Limits",
    "Policy",
    "Pool",
    "PoolIP",
    "PoolSet",
    "Rule",
    "Shaper",
    "Trigger",
    "WarmupSchedule",
    "load_policy",
    "load_pools",
]
