"""Bounce and complaint classification.

``classify_reply`` classifies a synchronous SMTP reply; ``parse_bounce``
reads an asynchronous bounce (RFC 3464 DSN, RFC 5965 ARF, vendor formats)
into one :class:`BounceRecord` per recipient. Rules are data
(``rules.toml``), extendable with user rule files (:func:`load_rules`).

This package never touches the spool or the suppression list: the engine
feeds records to :mod:`fastsend.suppression` (see ``suppress_from``).
"""

from fastsend.bounce.parse import BounceRecord, default_verp_decoder, parse_bounce
from fastsend.bounce.reply import (
    HARD_REASONS,
    Classification,
    RuleError,
    RuleSet,
    classify_reply,
    default_rules,
    load_rules,
)

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
