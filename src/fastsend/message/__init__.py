"""Messages: campaign templates, MIME serialization, DKIM signing, VERP.

    from fastsend.message import Campaign, CampaignError, RenderError
    camp = Campaign.load("campaign.toml")
    camp.check_columns(["email", "first_name"])
    r = camp.compile()                      # once per process
    data = r.render("a@example.org", {"first_name": "Ann"}, "01HXYZ")
    mail_from = r.envelope_from("01HXYZ")

See ``campaign.py`` (the file format), ``mime.py`` (serialization),
``dkim.py`` (signing), ``verp.py`` (bounce addresses). Delivery, queueing and
tracking-link rewriting live elsewhere.
"""

from __future__ import annotations

from fastsend.message.campaign import Campaign
from fastsend.message.errors import CampaignError, MessageTooBig, RenderError
from fastsend.message.mime import Renderer

__all__ = ["Campaign", "CampaignError", "MessageTooBig", "RenderError", "Renderer"]
