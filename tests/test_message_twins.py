"""The compiled and pure-Python renderers give byte-identical messages."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _message_helpers import use_impl
from fastsend import _accel
from fastsend.message import Campaign, RenderError
from fastsend.message.keys import generate, write_key

ANY = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
SPACEY = st.text(st.sampled_from(list(" \t\r\n=aZ.é€\x00")), max_size=120)
HEADER = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\x00"), max_size=120
)
VALUE = st.one_of(ANY, SPACEY, HEADER)
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

SPECS: dict[str, dict[str, Any]] = {
    "alternative": {
        "reply_to": "{{ name }} <reply@example.com>",
        "subject": "{{ a }} and {{ name | default('you') }}",
        "text": "Hi {{ name }},\n{{ b }}  \t end {{ a }}\n",
        "html": "<p>{{ b }}</p>\n\n",
        "headers": {"X-Value": "v={{ a }}"},
        "list_unsubscribe": {"mailto": "u@example.com", "url": "https://example.com/u/{{ a }}"},
    },
    "text-only": {"subject": "s", "text": "{{ b }}"},
    "mixed": {
        "subject": "{{ a }}",
        "html": "{{ b }}\t\n",
        "attachments": [{"filename": "x.bin", "data_b64": base64.b64encode(b"\x00" * 99).decode()}],
    },
    "base64": {"subject": "{{ a }}", "text": "{{ b }} {{ name }}", "transfer_encoding": "base64"},
    "long-lines": {  # whole static lines (pre-encoded once by the compiled twin)
        "subject": "{{ a }}",
        "text": "Hi {{ name }},\n" + ("static = line \t with é, " * 4 + "\n") * 3 + "{{ b }}\n",
        "html": "<p>{{ a }}</p>\n" + ("<p>" + "x" * 90 + "</p>  \n") * 3 + "{{ b }}",
        "list_unsubscribe": {
            "mailto": "u@example.com?subject={{ a }}",
            "url": "https://e.example/{{ b }}",
        },
    },
}


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("twinkeys") / "ed.pem"
    write_key(generate("ed25519", 0), path)
    return path


def _render(r: Any, variables: dict[str, str], mid: str) -> bytes | str:
    try:
        return bytes(r.render("rcpt@example.org", variables, mid))
    except RenderError as exc:
        return str(exc)


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("spec", sorted(SPECS))
@SETTINGS
@given(a=VALUE, b=VALUE, name=VALUE, mid=st.sampled_from(["m-1", "x y", "01HXYZ"]))
def test_compiled_and_pure_render_identical(
    monkeypatch: pytest.MonkeyPatch,
    key: Path,
    spec: str,
    canon: str,
    a: str,
    b: str,
    name: str,
    mid: str,
) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    d: dict[str, Any] = {"from": "Sender <news@example.com>", **SPECS[spec]}
    d["dkim"] = {"domain": "example.com", "selector": "ed", "key": str(key),
                 "canonicalization": canon}  # fmt: skip
    r = Campaign.from_dict(d).compile()  # one renderer: same boundaries for both
    variables = {"a": a, "b": b, "name": name}
    use_impl(monkeypatch, "py")
    want = _render(r, variables, mid)
    use_impl(monkeypatch, "c")
    got = _render(r, variables, mid)
    assert got == want
