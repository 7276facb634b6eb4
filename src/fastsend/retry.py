"""Retry policy: exponential backoff with jitter, and the maximum age.

Attempt n (1-based) that is deferred waits ``min(max_backoff, min_backoff *
2**(n-1))`` seconds, times a uniform jitter factor in [1-j, 1+j]. Postfix backs
off between 300 s and 4,000 s; KumoMTA doubles from 20 minutes; the defaults
here follow Postfix's range. A message whose next attempt would fall after
``created + max_age`` expires instead.
"""

from __future__ import annotations

import random

from fastsend.config import RetryConfig


def next_attempt(policy: RetryConfig, attempts: int, now: float, created: float) -> float | None:
    """When to try again after ``attempts`` attempts, or None when it expires."""
    # The exponent is capped: 2**1025 overflows a float, and 2**62 is past any cap.
    base = min(policy.max_backoff, policy.min_backoff * (2 ** min(62, max(0, attempts - 1))))
    j = policy.jitter
    delay = base * (1.0 + random.uniform(-j, j)) if j else base
    at = now + delay
    if at > created + policy.max_age:
        return None
    return at
