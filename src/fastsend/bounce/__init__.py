"""Bounce and complaint classification.

``classify_reply`` classifies a synchronous SMTP reply; ``parse_bounce``
reads an asynchronous bounce (RFC 3464 DSN, RFC 5965 ARF, vendor formats)
into one :class:`BounceRecord` per recipient. Rules are data
(``rules.toml``), extendable with user rule files (:func:`load_rules`).

This package never touches the spool or the suppression list: the engine
feeds records to :mod:`fastsend.suppression` (see ``suppress_from``).

The DSN/ARF reader (``parse``: the email package, vendor rules) is imported on
first use: a delivery worker needs only ``classify_reply``, serve's start-up
only ``BounceRecord`` (``record``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastsend.bounce.record import BounceRecord
from fastsend.bounce.reply import (
    HARD_REASONS,
    Classification,
    RuleError,
    RuleSet,
    classify_reply,
    default_rules,
    load_rules,
)

if TYPE_CHECKING:
    from fastsend.bounce.parse import default_verp_decoder, parse_bounce

_LAZY = {"default_verp_decoder", "parse_bounce"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fastsend.bounce import parse

        return getattr(parse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HARD_REASONS",
    "BounceRecord",
    "Classification",
    "RuleError",
    "RuleSet",
    "classify_reply",
    "default_rules",
    "default_verp_decoder",
    "load_rules",
    "parse_bounce",
]
