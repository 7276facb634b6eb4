"""The errors of the message area.

:class:`CampaignError` is the campaign author's fault (bad file, bad template,
missing columns): raised before sending starts, the campaign does not run.
:class:`RenderError` is one recipient's fault (bad address, CR/LF in a value
bound for a header, a missing value): that recipient fails, the campaign goes
on.
"""

from __future__ import annotations

__all__ = ["CampaignError", "DkimKeyMissing", "KeyUnavailable", "MessageTooBig", "RenderError"]


class CampaignError(ValueError):
    """A campaign that cannot be sent as written (raised before sending starts)."""


class RenderError(ValueError):
    """One recipient's message cannot be built; the campaign goes on."""


class MessageTooBig(RenderError):
    """One recipient's message would be over the size limit ([delivery]
    max_message_size): failed 552 5.3.4 (RFC 3463: message too big for the
    system), never deferred (it will not shrink), never sent for the
    receiver's SIZE to refuse."""


class KeyUnavailable(ValueError):
    """A DKIM key the configuration names cannot be used (no such file, not
    readable, not a key): the operator's to put right, so the mail it signs is
    deferred (a local error), never failed: a key moved away during a rotation
    had bounced every message of the domain (550 5.6.0)."""


class DkimKeyMissing(CampaignError, KeyUnavailable):
    """A campaign's (or the config's) [dkim] key file is not there: refused at
    accept as the campaign's error; met when the mail is built, deferred."""
