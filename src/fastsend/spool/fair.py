"""How a claim shares its room between the campaigns with due mail.

A claim (``Spool.claim_due``) takes up to ``limit`` due messages. Taken oldest
due first across every campaign, one tenant's 20,000-message campaign spooled a
minute before another tenant's 3 messages sent those 3 after ~17,700 of its own
(an audit); a production MTA queues per campaign / tenant (PowerMTA per VMTA,
KumoMTA per ``campaign:tenant@domain``) so a large queue never starves a small
one. Both spools (SQLite: ``spool/sqlite.py``; Redis: ``claim.lua`` with
``fair_shares`` in ``lib.lua``, the same arithmetic) share the room alike:

1. the tenants with due mail share it equally, or by the weight the operator
   gives a tenant (``[tenants.NAME] weight``, default 1: a paying tenant's 3
   takes 3 times the share of a tenant of 1; :meth:`Spool.set_tenant_weights`);
2. a tenant's share goes to its campaigns of the highest ``priority`` first
   (campaign option, default 0; a transactional campaign, the mail of
   ``POST /v1/messages`` and SMTP submission, 1), then to the next;
3. campaigns of one priority share by ``weight`` (campaign option, default 1);
4. within a campaign, the oldest due first (as before).

Priority and weight order a tenant's own campaigns only: a tenant (untrusted)
cannot take another tenant's share by marking its mail urgent; its share among
tenants is the operator's config alone.

Shares are whole messages by water-filling: each open member gets
``floor(left * weight / total weight)`` capped at what it has due, again with
what the capped ones left, until the room or the mail runs out; when the floors
are all 0 (fewer messages left than members), one each to ``left`` members,
starting at member ``turn * left % members``: ``turn`` counts the claims that
were shared (the spool's own counter: in memory for SQLite, ``P:fair:turn`` on
Redis), so the odd messages go round instead of always to the same campaign, and
each claim starts where the last one stopped (it started one member further on:
with 2,000 tenants due and claims of 500, the last tenant's first message waited
~1,500 claims; now 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PRIORITY = "priority"  # campaign option: a tenant's higher priority is claimed first
WEIGHT = "weight"  # campaign option: its share among the tenant's campaigns of one priority
PRIORITY_RANGE = (-100, 100)
WEIGHT_RANGE = (1, 1000)
TRANSACTIONAL_PRIORITY = 1  # a campaign whose spec kind is "transactional", unless it says


def rank(spec: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[int, int]:
    """(priority, weight) of a campaign from its spec and options; a value out of
    range or not a whole number is clamped or ignored (callers check what users
    give: :func:`check_rank`)."""
    default = TRANSACTIONAL_PRIORITY if spec.get("kind") == "transactional" else 0
    return (
        _whole(options.get(PRIORITY), PRIORITY_RANGE, default),
        _whole(options.get(WEIGHT), WEIGHT_RANGE, 1),
    )


def _whole(v: Any, bounds: tuple[int, int], default: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        return default
    return int(min(max(int(v), bounds[0]), bounds[1]))


def check_rank(priority: Any = None, weight: Any = None) -> str | None:
    """What is wrong with a priority or weight a user gave (None: both fine)."""
    for name, v, (lo, hi) in (
        (PRIORITY, priority, PRIORITY_RANGE),
        (WEIGHT, weight, WEIGHT_RANGE),
    ):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"{name}: a whole number from {lo} to {hi}"
    return None


def fill(limit: int, weights: Sequence[int], avail: Sequence[int], turn: int) -> list[int]:
    """Split ``limit`` between members by ``weights``, none above its ``avail``
    (water-filling; the odd ones from member ``turn * odd % open``; see the module)."""
    give = [0] * len(avail)
    left = limit
    live = [i for i, a in enumerate(avail) if a > 0]
    if len(live) > left and len({weights[i] for i in live}) == 1:
        # fewer than one each, alike: every floor would be 0
        k = len(live)
        start = turn * left % k
        for j in range(left):
            give[live[(start + j) % k]] += 1
        return give
    while left > 0 and live:
        total = sum(weights[i] for i in live)
        moved = 0
        for i in live:
            q = min(left * weights[i] // total, avail[i] - give[i])
            give[i] += q
            moved += q
        left -= moved
        live = [i for i in live if give[i] < avail[i]]
        if moved == 0:
            k = len(live)
            m = min(k, left)  # (= left: a floor is 0 only while left < k)
            start = turn * m % k
            for j in range(m):
                give[live[(start + j) % k]] += 1
            left -= m
            live = [i for i in live if give[i] < avail[i]]
    return give


def fair_shares(
    cands: Sequence[tuple[int, str, int, int, int]],
    limit: int,
    turn: int,
    tenant_weights: Mapping[str, int] | None = None,
) -> dict[int, int]:
    """{campaign: messages to claim} for ``cands`` = (campaign, tenant, priority,
    weight, due messages (at most ``limit``)); only campaigns given something.
    ``tenant_weights``: the operator's weight of a tenant (absent: 1)."""
    tenants: dict[str, list[tuple[int, str, int, int, int]]] = {}
    sums: dict[str, int] = {}  # tenant -> its campaigns' due
    for c in sorted(cands):  # tenants in the order of their lowest campaign id
        t = c[1]
        camps = tenants.get(t)
        if camps is None:
            tenants[t] = [c]
            sums[t] = c[4]
        else:
            camps.append(c)
            sums[t] += c[4]
    tw = tenant_weights or {}
    weights = [tw.get(t, 1) for t in tenants] if tw else [1] * len(tenants)
    got = fill(limit, weights, list(sums.values()), turn)
    out: dict[int, int] = {}
    for camps, room in zip(tenants.values(), got, strict=True):
        if not room:
            continue
        if len(camps) == 1:  # (its share is at most what it has due)
            out[camps[0][0]] = room
            continue
        if room == 1:  # (many tenants due: what fill gives one message, cheaper)
            top = max(c[2] for c in camps if c[4] > 0)
            live = [c for c in camps if c[2] == top and c[4] > 0]
            out[live[turn % len(live)][0]] = 1
            continue
        for prio in sorted({c[2] for c in camps}, reverse=True):
            if room <= 0:
                break
            tier = [c for c in camps if c[2] == prio]
            give = fill(room, [c[3] for c in tier], [c[4] for c in tier], turn)
            for c, n in zip(tier, give, strict=True):
                if n:
                    out[c[0]] = n
            room -= sum(give)
    return out
