"""Tracking, webhooks and metrics audited from outside (session 25, track25).

Real parts only: campaigns rendered by the message module, the tracking endpoints
served by aiohttp on loopback (tests/test_serve_tracking.py's ``_served``), an
aiohttp client following the links as a mail reader would.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import ClientSession

from fastsend.serve.tracking import ascii_url
from test_monitoring_audit23 import _follow, _hrefs, _render
from test_serve_tracking import _run, _served


def test_a_link_with_an_invisible_character_is_redirected_as_a_browser_asks_for_it(
    tmp_path: Path,
) -> None:
    """A link whose URL holds a character Python does not call printable (a no-break
    space from an author's ``&nbsp;``, an emoji sequence's zero-width joiner, a soft
    hyphen, a bidi mark, a tab) was tracked by the renderer, but the click endpoint
    answered 404 (``url.isprintable()``): a dead link in every recipient's mail, where
    the untracked link works (a browser percent-encodes them, and drops tabs and line
    breaks). Now each is redirected to the URL a browser asks for."""
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    cases = [
        ("https://shop.example/s?q=red&nbsp;shoes", "https://shop.example/s?q=red%C2%A0shoes"),
        (f"https://shop.example/e/{family}",
         "https://shop.example/e/%F0%9F%91%A8%E2%80%8D%F0%9F%91%A9%E2%80%8D%F0%9F%91%A7"),
        ("https://shop.example/co\u00adop", "https://shop.example/co%C2%ADop"),
        ("https://shop.example/a\u200eb#x\u200fy", "https://shop.example/a%E2%80%8Eb#x%E2%80%8Fy"),
        ("https://shop.example/a\tb?c=\td", "https://shop.example/ab?c=d"),
        ("https://shop.example/a\x01b?c=\x7f", "https://shop.example/a%01b?c=%7F"),
    ]  # fmt: skip
    body = "".join(f'<a href="{url}">{i}</a>' for i, (url, _want) in enumerate(cases))

    async def main() -> None:
        async with _served(tmp_path) as (_ctx, base, events), ClientSession() as http:
            links = _hrefs(_render(tmp_path, base, body))
            assert len(links) == len(cases)
            for link, (url, want) in zip(links, cases, strict=True):
                assert await _follow(http, base, link) == (302, want), url
            assert sum(e["event"] == "clicked" for e in events) == len(cases)

    _run(main())
    for _url, want in cases:  # what is sent is sent again as it is
        assert ascii_url(want) == want
