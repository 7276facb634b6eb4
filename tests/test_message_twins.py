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
from fastsend.message import dkim as dkim_mod
from fastsend.message import mime as mime_mod
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
    "inline-image": {  # alternative(text, related(html, image)) in mixed; the text from the HTML
        "subject": "{{ a }}",
        "html": "<p>{{ b }}</p><img src=\"cid:logo\" alt=\"{{ name }}\">",
        "attachments": [
            {"filename": "logo.png", "data_b64": base64.b64encode(b"\x89PNG" * 9).decode(), "cid": "logo"},
            {"filename": "x.bin", "data_b64": base64.b64encode(b"\x00" * 9).decode()},
        ],
    },
    "inline-image-html-only": {
        "subject": "s",
        "html": "<img src=\"cid:logo\">{{ b }}",
        "text_from_html": False,
        "attachments": [{"filename": "l.gif", "data_b64": base64.b64encode(b"GIF89a").decode(), "cid": "logo"}],
    },
    "html-contexts": {  # each value HTML-escaped for where it stands (and one raw)
        "subject": "{{ a }}",
        "text": "{{ a }} {{ b }}",
        "html": "<p title=\"{{ a }}\">{{ b }}</p><a href='{{ b }}'>{{ name | raw }}</a>"
        "<img alt={{ name }} src={{ a }}><!-- {{ a }} --><a href=\"https://e.example/{{ b }}\">"
        "<b {{ a }}><{{ name }}>",
    },
    "html-base64": {
        "subject": "s",
        "html": "<a href=\"{{ a }}\">{{ b }}</a>",
        "transfer_encoding": "base64",
    },
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
    for signer, _plan in r._plans:
        signer._body_hash = dkim_mod.BodyHasher(signer._brelaxed)
    r._assemble()  # the Assembly and MessageSigner use_impl chose
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


@SETTINGS
@given(mid=st.one_of(st.text(max_size=220), st.text("ab_-Z09", min_size=195, max_size=205)))
def test_message_id_safe_twins(mid: str) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    assert _accel.compiled("message_id_safe")(mid) == mime_mod.PURE["message_id_safe"](mid)


def test_assembly_twins_same_bytes() -> None:
    """Every kind of entry and segment, both twins: the same lines, body and message."""
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    head = (
        b"From: a@example.com\r\n",
        ("Subject", ("Hi ", "!"), ("name",), (None,)),
        lambda v: b"X-Call: " + v["name"].encode() + b"\r\n",
    )
    tail = (
        ("X-Tail", ("t=",), (), ()),
        ("List-Unsubscribe", ((("https://e.example/u/", ""), ("name",), (None,)),)),
    )
    content = (b"Content-Type: text/plain\r\n",)
    for end_crlf in (True, False):
        for body in (
            ((("Hello ", "\n"), ("name",), (None,)),),
            ((("no end ",), (), ()),),
            (b"--b\r\n", (("x=", ""), ("name",), (None,)), b"\r\n", lambda v: b"cb\r\n"),
            ((("",), (), ()),),
        ):
            for variables in ({"name": "Zoë  \t"}, {"name": "x" * 300}):
                args = (variables, b"To: r@example.org\r\n", b"Date: x\r\n", b"Message-ID: <m>\r\n")
                py = mime_mod.PURE["Assembly"](head, tail, content, body, end_crlf)
                c = _accel.compiled("Assembly")(head, tail, content, body, end_crlf)
                assert c.headers(*args) == py.headers(*args)
                assert c.body(variables) == py.body(variables)
                assert c.message(*args) == py.message(*args)
                assert c.message(variables, b"", b"D\r\n", b"M\r\n") == py.message(
                    variables, b"", b"D\r\n", b"M\r\n"
                )
    for to_custom in (False, True):
        py = mime_mod.PURE["Assembly"](head, tail, content, body, True, to_custom, "example.com")
        c = _accel.compiled("Assembly")(head, tail, content, body, True, to_custom, "example.com")
        for rcpt in ("r@example.org", "Zoë@bücher.example", "a@[127.0.0.1]"):
            for mid in ("12-abc", "x y", "é" * 3):
                for sign in (False, True):
                    args = ({"name": "n", "email": "x"}, rcpt, mid, b"Date: d\r\n", sign)
                    assert c.personal(*args) == py.personal(*args)
    for bad in ({}, {"name": 5}):
        for cls in (mime_mod.PURE["Assembly"], _accel.compiled("Assembly")):
            with pytest.raises(KeyError if not bad else TypeError):
                cls(head, tail, content, (), True).message(bad, b"", b"", b"")


def test_body_hasher_twins_and_reference() -> None:
    """Both BodyHasher twins give the plain SHA-256 of the canonical body whatever
    the sequence (repeats, shared prefixes of any length, short, empty, unclean)."""
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    import hashlib
    import random

    rng = random.Random(7)
    static = b"static line of text here\r\n" * 40
    for relaxed in (True, False):
        canon = dkim_mod.PURE["body_relaxed" if relaxed else "body_simple"]
        c = _accel.compiled("BodyHasher")(relaxed)
        p = dkim_mod.PURE["BodyHasher"](relaxed)
        for i in range(2000):
            kind = rng.randrange(6)
            if kind == 0:  # a per-recipient tail: the prefix state is used
                body = static + b"tail %d\r\n" % i
            elif kind == 1:  # a per-recipient head: no common prefix
                body = b"x%d\r\n" % i + static
            elif kind == 2:  # cut anywhere, white space to canonicalize
                body = static[: rng.randrange(len(static))] + b"v  \t%d\r\n\r\n" % (i % 3)
            elif kind == 3:
                body = b""
            elif kind == 4:
                body = static
            else:
                body = bytes(rng.choice(b" \tab\r\n") for _ in range(rng.randrange(300)))
            want = base64.b64encode(hashlib.sha256(canon(body)).digest())
            assert c(body) == p(body) == want, (relaxed, i, kind)
        assert c.prefix == p.prefix


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple"])
def test_signature_head_is_the_canonical_form(key: Path, canon: str) -> None:
    """The DKIM-Signature head made from a cached part before ``bh=`` canonicalizes
    exactly as the whole line does."""
    from fastsend.message.dkim import Signer, relaxed_headers
    from fastsend.message.keys import load_private_key

    s = Signer("example.com", "ed", load_private_key(str(key)), canon)
    plan = s.plan(["from", "to", "subject", "date"])
    for bh in (b"A" * 44, b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", b"x+/="):
        head, c14n = s._sig_head(plan, bh)
        assert head.endswith(b"bh=" + bh + b";\r\n b=")
        if canon.startswith("relaxed"):
            assert c14n == relaxed_headers((head,))[:-2]
        else:
            assert c14n == head
