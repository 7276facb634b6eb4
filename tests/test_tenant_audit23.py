"""Hostile tenants, session 23: each test on a defect the outside audit of
``fastsend serve`` found, failing before its fix.

- A recipient's value inside a template header (``X-A: {{ v }}``, a subject
  ``{{ s }}``) was bounded only by [delivery] max_message_size (25 MiB): a 1 MB
  value was accepted (202) and each message went out with a 1.4-1.7 MB header
  section, which Postfix cuts at 102,400 octets (header_size_limit) and Gmail
  refuses. The header section a row's values make is held to raw MIME's
  100,000 octets at accept (API, campaign rows, lists) and by both renderers
  (rows past the header guard are measured before they are built).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson
import pytest

from _message_helpers import use_impl
from fastsend import _accel
from fastsend.accept import row_sizer
from fastsend.message import Campaign, MessageTooBig, RenderError
from fastsend.message.rawmime import MAX_HEADER_OCTETS
from test_message_audit21 import _arun
from test_serve_api import Client

IMPLS = ["py", "c"] if _accel.HAVE_EXTENSIONS else ["py"]
RCPT = "u@example.org"


def _campaign(spec: dict[str, Any]) -> Campaign:
    return Campaign.from_dict({"from": "news@example.com", "subject": "s", "text": "t",
                               "text_from_html": False, **spec})  # fmt: skip


def _fallback(render: Any, rcpt: str, vs: Any, mid: str) -> Any:
    """A DeferredMessage's fallback as the worker's: the renderer's render."""
    return render(rcpt, vs if isinstance(vs, dict) else orjson.loads(vs), mid)


def _head(message: bytes) -> bytes:
    return message.partition(b"\r\n\r\n")[0] + b"\r\n"


# Where a row's value can stand in a header, and what it grows most into there.
HEADER_SPECS = [
    {"headers": {"X-A": "{{ v }}"}},
    {"subject": "Hello {{ v }}"},
    {"to": "{{ v }} <{{ email }}>"},
    {"reply_to": "{{ v }} <r@example.com>"},
    {"headers": {"X-A": "{{ v }}", "X-B": "{{ v }} and {{ v }}"}, "subject": "{{ v }}"},
]
VALUES = ["x", "\U0001f600", "\u00e9", "word ", '"', "=?", "\u2028"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", HEADER_SPECS, ids=lambda s: str(s)[:50])
def test_a_rows_header_section_is_held_to_the_header_cap(
    monkeypatch: pytest.MonkeyPatch, impl: str, spec: dict[str, Any]
) -> None:
    """With no message size limit at all, and with the default one: values up
    to the header guard make a header section under 100,000 octets, never
    measured; longer ones are measured: those over the cap are refused by
    the renderer (MessageTooBig, 552 5.3.4, before the message is built, by
    the compiled DeferredMessage the worker uses too) and at accept (the
    row's words name the header cap and the variable); those under it are
    made as before."""
    use_impl(monkeypatch, impl)
    camp = _campaign(spec)
    for limit in (0, 25 << 20) if "headers" in spec else (0,):
        r = camp.compile("", limit)
        assert 1000 < r.guard < MAX_HEADER_OCTETS, r.guard  # (a usual row is under it)
        sizer = row_sizer(camp.to_dict(), limit)
        assert sizer is not None
        for ch in VALUES if impl == "c" else VALUES[:4]:  # (the pure twin: slow, the same code)
            n = max(1, r.guard // len(ch))
            try:
                made = r.render(RCPT, {"v": (ch * n)[: r.guard]}, "01ABC")
            except MessageTooBig:
                raise
            except RenderError:
                continue  # (a value no mailbox can take: a word over 998 octets)
            assert len(_head(made)) <= MAX_HEADER_OCTETS, (spec, ch, len(_head(made)))
            big = {"v": ch * (120_000 // len(ch))}
            try:
                made = r.render(RCPT, big, "01ABC")
            except MessageTooBig as e:
                assert "header section would be" in str(e), e
            else:  # (a display name of quotes or spaces only: nothing of it is written)
                assert len(_head(made)) <= MAX_HEADER_OCTETS and ch != "x", (spec, ch)
                continue
            why = sizer(orjson.dumps(big))
            assert why is not None and "{{ v }}" in why, why
            assert "header section" in why or "word too long" in why, why  # (a mailbox: either)
            assert "max_message_size" not in why, why
            # the worker's way: a DeferredMessage whose fallback is render
            mid = "01ABC"
            d = r.assembly.deferred(orjson.dumps(big), RCPT, mid, r.date_line(),
                                    functools.partial(_fallback, r.render))  # fmt: skip
            with pytest.raises(MessageTooBig):
                d()


def test_the_measure_refuses_no_header_section_that_fits() -> None:
    """A value making a header section just under the cap (measured: 9x,xxx
    octets) is accepted and made, the one past it refused: the measure is
    the header fields as encoded, not a bound on them."""
    camp = _campaign({"headers": {"X-A": "{{ v }}"}})
    r = camp.compile("", 0)
    sizer = row_sizer(camp.to_dict(), 0)
    assert sizer is not None
    lo, hi = 1, MAX_HEADER_OCTETS
    while lo < hi:  # the longest value whose message's header section fits
        mid = (lo + hi + 1) // 2
        if sizer(orjson.dumps({"v": "a " * mid})) is None:
            lo = mid
        else:
            hi = mid - 1
    made = r.render(RCPT, {"v": "a " * lo}, "01ABC")
    assert MAX_HEADER_OCTETS - 3000 < len(_head(made)) <= MAX_HEADER_OCTETS, len(_head(made))
    with pytest.raises(MessageTooBig):
        r.render(RCPT, {"v": "a " * (lo + 1)}, "01ABC")


def test_the_api_refuses_a_header_value_past_the_cap(tmp_path: Path) -> None:
    """POST /v1/messages with a template and 1 MB in a header's variable was
    202 (and sent with a 1.4 MB header section), so were a campaign's rows:
    422 naming ``variables`` and the header cap; the campaign's other rows go."""
    tpl = {"from": "a@example.com", "subject": "Hi {{ s }}", "text": "t",
           "headers": {"X-A": "{{ v }}"}}  # fmt: skip

    async def go(c: Client) -> None:
        for vs in ({"v": "x" * 1_000_000, "s": "a"}, {"v": "\u00e9" * 300_000, "s": "a"},
                   {"v": "a", "s": "y" * 500_000}):  # fmt: skip
            msg = {"to": "t@example.org", "template": tpl, "variables": vs}
            st, body = await c.req("POST", "/v1/messages", msg)
            assert st == 422 and body["error"]["field"] == "message.variables", (st, body)
            assert "header section" in body["error"]["message"], body
        st, body = await c.req("POST", "/v1/messages", {"to": "t@example.org", "template": tpl,
                                                        "variables": {"v": "x" * 20_000, "s": "a"}})  # fmt: skip
        assert st == 202, (st, body)
        st, body = await c.req("POST", "/v1/campaigns", {"name": "x", "template": tpl,
                                                          "recipients": [{"email": "a@example.org", "v": "V" * 200_000, "s": "a"},
                                                                         {"email": "b@example.org", "v": "B", "s": "a"}]})  # fmt: skip
        assert st == 201 and body["accepted"] == 1 and body["rejected"] == 1, body
        assert "header section" in body["errors"][0]["error"], body

    _arun(tmp_path, 0, go)
