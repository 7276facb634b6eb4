"""The record of one recipient a bounce or complaint reports: a value module
(no parsing), so that code handling records (serve's provider events and
intake) does not load the DSN/ARF reader (:mod:`fastsend.bounce.parse`, its
vendor rules' regular expressions) until a message is read."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["BounceRecord"]


@dataclass(slots=True)
class BounceRecord:
    """One recipient reported by a bounce or complaint message.

    ``status`` is the enhanced status ("5.1.1") or None, ``reply_code`` the
    SMTP reply code or None; ``reason``/``hard`` as in Classification;
    ``feedback_type`` is set for complaints ("abuse", "opt-out", ...).
    """

    recipient: str
    status: str | None
    reply_code: int | None
    diagnostic: str
    reason: str
    hard: bool
    feedback_type: str | None = None
    original_message_id: str | None = None
    verp_id: str | None = None
    action: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    command: str | None = None
    rate_limited: bool = False
    ip_blocked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
