"""The two errors of the message area.

:class:`CampaignError` is the campaign author's fault (bad file, bad template,
missing columns): raised before sending starts, the campaign does not run.
:class:`RenderError` is one recipient's fault (bad address, CR/LF in a value
bound for a header, a missing value): that recipient fails, the campaign goes
on.
"""

from __future__ import annotations

__all__ = ["CampaignError", "RenderError"]


class CampaignError(ValueError):
    """A campaign that cannot be sent as written (raised before sending starts)."""


class RenderError(ValueError):
    """One recipient's message cannot be built; the campaign goes on."""
