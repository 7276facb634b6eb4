"""Hostile tenants, session 24: each test on a defect the outside audit of
``fastsend serve`` found, failing before its fix.

- An HTML-only template holding 5,001-10,000 placeholders was accepted (201/202)
  and spooled with its text part said from the HTML, which doubled them: every
  later use of the campaign (a message naming its id, more recipients) was a
  500 and the worker failed each of its messages. Counted with the text part
  it carries: refused when it arrives.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsend.message import Campaign, CampaignError
from fastsend.message.campaign import MAX_PLACEHOLDERS
from test_serve_api import Client, arun

TPL = {"from": "a@example.com", "subject": "Hi {{ name }}", "text": "Hello {{ name }}"}


def test_an_html_only_template_is_counted_with_the_text_said_from_it(tmp_path: Path) -> None:
    """6,000 placeholders in an HTML-only template: 12,000 with its text part,
    which the spooled spec carries and from_dict refused when it was read
    back (the 201 campaign then a 500 for each use, each message failed by the
    worker). Refused when it arrives, saying how to fit; every campaign
    accepted is one its spec builds again."""
    html = "<p>{{ v }}</p>" * 6000
    with pytest.raises(CampaignError, match=r"12,000 placeholders with the text part said"):
        Campaign.from_dict({"from": "a@example.com", "subject": "s", "html": html})
    for spec in ({"html": html, "text_from_html": False}, {"html": html, "text": "t {{ v }}"},
                 {"html": "<p>{{ v }}</p>" * (MAX_PLACEHOLDERS // 2)}):  # fmt: skip
        camp = Campaign.from_dict({"from": "a@example.com", "subject": "s", **spec})
        Campaign.from_dict(camp.to_dict())

    async def t(c: Client) -> None:
        tpl = {"from": "a@example.com", "subject": "s", "html": html}
        st, got = await c.req("POST", "/v1/campaigns", {
            "template": tpl, "recipients": [{"email": "u@example.org", "v": "x"}]})  # fmt: skip
        assert st == 400 and "text_from_html" in got["error"]["message"], got
        st, got = await c.req("POST", "/v1/messages", {
            "template": tpl, "to": "u@example.org", "variables": {"v": "x"}})  # fmt: skip
        assert st == 400 and got["error"]["field"] == "message.template", got
        assert c.ctx.spool.counts().get("queued", 0) == 0
        st, got = await c.req("POST", "/v1/messages", {
            "template": {**tpl, "text": "t"}, "to": "u@example.org", "variables": {"v": "x"}})
        assert st == 202, got
        cid = c.ctx.spool.get_campaign(1) and 1
        st, got = await c.req("POST", "/v1/messages", {
            "template": cid, "to": "w@example.org", "variables": {"v": "x"}})  # fmt: skip
        assert st == 202, got

    arun(tmp_path, t)
