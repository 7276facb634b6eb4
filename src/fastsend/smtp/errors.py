"""The two SMTP error types, after h11: our fault versus the peer's fault.

- :class:`LocalProtocolError` means fastsend itself misused the protocol (a
  bug, or a caller asking for something the state machine cannot do now). It
  should never be caught and turned into a delivery outcome.
- :class:`RemoteProtocolError` means the server sent something that is not
  SMTP (a malformed or unsolicited reply, an over-long line). The transport
  catches it, drops the connection and answers every pending recipient with a
  *deferred* outcome.

This module defines exceptions only; it performs no I/O and holds no state.
"""

from __future__ import annotations


class SMTPProtocolError(Exception):
    """Base class of both SMTP protocol errors."""


class LocalProtocolError(SMTPProtocolError):
    """fastsend broke the protocol (a bug or misuse on our side)."""


class RemoteProtocolError(SMTPProtocolError):
    """The peer broke the protocol (garbage, unsolicited or malformed replies)."""
