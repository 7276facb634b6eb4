"""Retry policy: exponential backoff with jitter, and the maximum age.

Attempt n (1-based) that is deferred waits ``min(max_backoff, min_backoff *
2**(n-1))`` seconds, times a uniform jitter factor in [1-j, 1+j]. Postfix backs
off between 300 s and 4,000 s; KumoMTA doubles from 20 minutes; the defaults
here follow Postfix's range. A message whose next attempt would fall after
``created + max_age`` expires instead.

A deferral whose reply names a wait ("try again in 30 minutes", "retry after
900 seconds", milter-greylist's "come back in 00:05:00") is not tried again
before it (:func:`retry_hint`; at most ``max_backoff``): a receiver that is
retried early counts it against the sender, and a greylist restarts its clock.
"""

from __future__ import annotations

import random
import re

from fastsend.config import RetryConfig

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_HINT = re.compile(
    r"\b(?:try(?:\s+again)?|retry|come\s+back|wait|greylist(?:ed|ing)?|again)"
    r"\s+(?:(?:in|after|for)\s+)?"
    r"(?:(\d{1,2}):(\d\d):(\d\d)\b|(\d{1,7})\s*(s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?)\b)",
    re.IGNORECASE,
)


def retry_hint(text: str) -> float:
    """Seconds a deferral's reply text asks to wait before the next try (0.0:
    none said): "try again in 5 minutes", "retry after 900 seconds", "come back
    in 00:05:00", "greylisted for 300 seconds"."""
    m = _HINT.search(text) if text else None
    if m is None:
        return 0.0
    if m.group(1) is not None:
        return float(int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)))
    return float(m.group(4)) * _UNITS[m.group(5)[0].lower()]


def next_attempt(
    policy: RetryConfig, attempts: int, now: float, created: float, hint: float = 0.0
) -> float | None:
    """When to try again after ``attempts`` attempts, or None when it expires;
    not before ``hint`` seconds (:func:`retry_hint`, at most ``max_backoff``)."""
    # The exponent is capped: 2**1025 overflows a float, and 2**62 is past any cap.
    base = min(policy.max_backoff, policy.min_backoff * (2 ** min(62, max(0, attempts - 1))))
    j = policy.jitter
    delay = base * (1.0 + random.uniform(-j, j)) if j else base
    if hint > delay:
        delay = min(hint, max(policy.max_backoff, delay))
    at = now + delay
    if at > created + policy.max_age:
        return None
    return at
