"""The compiled Assembly's fast path (``_mime.pxi``, ``Assembly._fast_make``):
a message made from the recipient's JSON where its values lie, or from a dict's
strs, with no Python object but the message -- the same octets as the pure
twin makes, or, for anything it does not cover, the usual way (the same
octets, or the same error and fallback)."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _message_helpers import use_impl
from fastsend import _accel
from fastsend.message import Campaign
from fastsend.message import dkim as dkim_mod
from fastsend.message import mime as mime_mod
from fastsend.message.keys import generate, write_key

pytestmark = pytest.mark.skipif(not _accel.HAVE_EXTENSIONS, reason="compiled core not built")

ANY = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
SPACEY = st.text(st.sampled_from(list(' \t\r\n=aZ.é€\x00"\\')), max_size=120)
DOTS = st.lists(st.sampled_from(["\n", ".", "..", " ", "a", "\r\n.", "From "]), max_size=20).map(
    "".join
)
LONG = st.text(st.sampled_from(["x", " ", "é", "=", "\t", "\n"]), min_size=70, max_size=400)
URLISH = st.text(st.sampled_from(list("az09_.-~@ /?%é")), max_size=30)
VALUE = st.one_of(ANY, SPACEY, DOTS, LONG, URLISH, st.just(""))
RCPTS = ["rcpt@example.org", "Zoë@bücher.example", "a@[127.0.0.1]", "x@EXAMPLE.org."]
MIDS = ["1234-abcdefghij", "x y", "é-1"]
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

SPECS: dict[str, dict[str, Any]] = {
    "bench": {  # the shape bench/end_to_end.py sends
        "subject": "Your report, {{ name }}",
        "text": "Hello {{ name }},\n\nAccount {{ a }}, plan {{ b }}.\n"
        + "lorem ipsum " * 300
        + "\n",
    },
    "alternative": {
        "subject": "{{ a }} and {{ name | default('you') }}",
        "text": "Hi {{ name }},\n{{ b }}  \t end {{ a }}\n",
        "html": "<p>{{ b }}</p>\n\n",
        "headers": {"X-Value": "v={{ a }}", "X-Mail": "{{ email }} {{ message_id }}"},
        "list_unsubscribe": {"mailto": "u@example.com", "url": "https://example.com/u/{{ a }}"},
    },
    "long-lines": {  # whole static lines of long literals (pre-encoded once)
        "subject": "{{ a | default('x') }}",
        "to": "Someone <someone@example.net>",
        "text": "Hi {{ name }},\n"
        + ("static = line \t with é, " * 4 + "\n") * 3
        + "{{ b }}\n"
        + ".dot at a line start\n"
        + "y" * 200
        + "{{ a }}"
        + "z" * 90
        + "\n.\n",
        "html": "<p>{{ a }}</p>\n" + ("<p>" + "x" * 90 + "</p>  \n") * 3 + "{{ b }}",
        "feedback_id": "{{ b | default('c1') }}:fs",
        "list_unsubscribe": {
            "mailto": "u@example.com?subject={{ a }}",
            "url": "https://e.example/{{ b }}/{{ name | default('n') }}",
        },
    },
    "no-end": {"subject": "s", "text": "{{ b }}"},
    "callable": {  # a mailbox header with a placeholder: never the fast path
        "subject": "s",
        "reply_to": "{{ name }} <reply@example.com>",
        "text": "{{ b }}\n",
    },
}


def _assemblies(spec: str) -> tuple[Any, Any]:
    d: dict[str, Any] = {"from": "Sender <news@example.com>", **SPECS[spec]}
    r = Campaign.from_dict(d).compile()
    return _accel.compiled("Assembly")(*r._layout), mime_mod.PURE["Assembly"](*r._layout)


def _fallback(rcpt: str, variables: object, mid: str) -> tuple[str, str]:
    return ("fallback", mid)


def _made(fn: Any, *args: Any) -> object:
    try:
        return fn(*args)
    except Exception as exc:  # the same error from both twins
        return type(exc)


def _forms(variables: dict[str, Any]) -> list[bytes]:
    """The recipient's values as JSON, as the supervisor sends them and otherwise."""
    forms = [orjson.dumps(variables), json.dumps(variables).encode()]  # \\u escapes
    forms.append(json.dumps(variables, indent=1).encode())  # white space
    forms.append(json.dumps(variables, ensure_ascii=False, separators=(" , ", " : ")).encode())
    return forms


def _check(spec: str, variables: dict[str, Any], rcpt: str, mid: str) -> None:
    c, py = _assemblies(spec)
    date = b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    want = _made(py.personal, variables, rcpt, mid, date, False)
    assert _made(c.personal, variables, rcpt, mid, date, False) == want
    for raw in _forms(variables):
        want = py.deferred(raw, rcpt, mid, date, _fallback)()
        assert c.deferred(raw, rcpt, mid, date, _fallback)() == want


@pytest.mark.parametrize("spec", sorted(SPECS))
@SETTINGS
@given(a=VALUE, b=VALUE, name=VALUE, rcpt=st.sampled_from(RCPTS), mid=st.sampled_from(MIDS))
def test_fast_path_makes_what_the_pure_twin_makes(
    spec: str, a: str, b: str, name: str, rcpt: str, mid: str
) -> None:
    _check(spec, {"a": a, "b": b, "name": name, "email": "not@used.example"}, rcpt, mid)


@pytest.mark.parametrize("spec", ["bench", "alternative", "long-lines"])
def test_fast_path_edges(spec: str) -> None:
    """Values missing, null, empty (with and without a default), not strings;
    CR/LF (header injection: refused), NUL, long and non-ASCII values, dots."""
    base = {"a": "A", "b": "B", "name": "N"}
    cases: list[dict[str, Any]] = [
        base,
        {},
        {"a": "A", "b": "B"},
        {**base, "name": None},
        {**base, "a": None},
        {**base, "a": ""},
        {**base, "name": ""},
        {**base, "b": 5},
        {**base, "x": 5, "y": [1], "z": {"k": None}},
        {**base, "name": "Evil\r\nBcc: x@example.com"},
        {**base, "name": "line\nbreak"},
        {**base, "a": "A\r\nX-Injected: 1"},
        {**base, "name": "nul\x00"},
        {**base, "name": "Zoë 日本 😀" * 30},
        {**base, "name": "x" * 2000},
        {**base, "name": "word " * 400},
        {**base, "b": "\n.\n..\r\n.end\n"},
        {**base, "a": "=?utf-8?b?x?="},
        {**base, "a": "a b/c?d=e&f", "b": "ö"},
        {**base, "a": "x" * 990},
    ]
    for variables in cases:
        for rcpt in RCPTS:
            for mid in MIDS:
                _check(spec, variables, rcpt, mid)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":"A","b":"B","name":"N"}',
        b' {"a" : "A" ,\n"b":"B","name":"N"}\r\n',
        b'{"a":"A","b":"B","name":"N","name":"M"}',  # a name given twice
        b'{"a":"A","b":"B","name":null,"name":"M"}',
        b'{"a":"A","b":"B","name":"N",}',  # not JSON
        b'{"a":"A","b":"B","name":"N"} x',
        b'{"a":"A","b":"B","name":"N"',
        b'{"a":"A","b":"B","name":"\xc3"}',  # not UTF-8
        b'{"a":"A","b":"B","name":"\xed\xa0\x80"}',  # a surrogate's UTF-8
        b'{"a":"A","b":"B","name":"\xe0\x80\xaf"}',  # overlong
        b'{"a":"A","b":"B","name":"\xf4\x90\x80\x80"}',  # past U+10FFFF
        b'{"a":"A","b":"B","name":"\xf0\x9f\x98\x80\xc3\xa9"}',
        b'{"a":"A","b":"B","name":"tab\there"}',  # a control character: not JSON
        b'{"a":"A","b":"B","na\\u006de":"N"}',  # an escaped key
        b'{"a":"A","b":"B","name":"q\\"uote\\\\"}',
        b'{"a":"A","b":"B","name":1}',
        b'{"a":"A","b":"B","name":true}',
        b"[]",
        b"null",
        b"{}",
        b"",
    ],
)
def test_fast_path_json_forms(raw: bytes) -> None:
    """Whatever the recipient's JSON holds, the message the pure twin makes of
    it (orjson.loads), or its fallback when it makes none."""
    for spec in ("bench", "long-lines"):
        c, py = _assemblies(spec)
        for rcpt in RCPTS[:2]:
            want = py.deferred(raw, rcpt, MIDS[0], b"Date: d\r\n", _fallback)()
            assert c.deferred(raw, rcpt, MIDS[0], b"Date: d\r\n", _fallback)() == want


def test_fast_path_is_taken() -> None:
    """The bench campaign's messages are made by the fast path (a dict or the
    JSON: no vars dict made), one with a mailbox template is not."""
    c, py = _assemblies("bench")
    date = b"Date: d\r\n"
    v = {"a": "A", "b": "B", "name": "N"}
    assert c._fast_made_by(v, "r@example.org", "1-x", date) == py.personal(
        v, "r@example.org", "1-x", date, False
    )
    assert c._fast_made_by(orjson.dumps(v), "r@example.org", "1-x", date) == py.personal(
        v, "r@example.org", "1-x", date, False
    )
    escaped = json.dumps({**v, "name": "Zoë"}).encode()  # "Zo\\u00eb": the usual way
    assert c._fast_made_by(escaped, "r@example.org", "1-x", date) is None
    assert c._fast_made_by(v, "Zoë@example.org", "1-x", date) is None
    c, _py = _assemblies("callable")
    assert c._fast_made_by(v, "r@example.org", "1-x", date) is None


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for alg, bits in (("ed25519", 0), ("rsa", 1024)):
        path = tmp_path_factory.mktemp("fastkeys") / f"{alg}.pem"
        write_key(generate(alg, bits), path)
        out[alg] = str(path)
    return out


def _signed(r: Any, how: str, variables: Any, rcpt: str, mid: str, date: bytes) -> object:
    for signer, _plan in r._plans:
        signer._body_hash = dkim_mod.BodyHasher(signer._brelaxed)
    r._assemble()  # the Assembly and MessageSigner use_impl chose
    a = r.assembly
    if how == "fast":
        return a._fast_made_by(variables, rcpt, mid, date, True)
    if how == "deferred":
        return a.deferred(orjson.dumps(variables), rcpt, mid, date, _fallback)()
    return _made(a.signed, variables, rcpt, mid, date)


@pytest.mark.parametrize("alg", ["ed25519", "rsa"])
@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple"])
@pytest.mark.parametrize("spec", ["bench", "alternative", "long-lines"])
def test_fast_path_signs_what_the_pure_twin_signs(
    monkeypatch: pytest.MonkeyPatch, keys: dict[str, str], spec: str, canon: str, alg: str
) -> None:
    """A signed message made by the fast path (its header lines hashed where
    they lie in it, the signature written into the room kept for it) is the
    pure twin's, octet for octet; one it declines, the usual way's."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    d: dict[str, Any] = {"from": "Sender <news@example.com>", **SPECS[spec]}
    d["dkim"] = {"domain": "example.com", "selector": "s", "key": keys[alg],
                 "canonicalization": canon}  # fmt: skip
    r = Campaign.from_dict(d).compile()
    date = b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    cases = [
        {"a": "A-b", "b": "B", "name": "N  x"},
        {"a": "A-b", "b": "B\tc ", "name": "N"},
        {"a": "Zoë " * 40, "b": "\n.\n", "name": "x" * 300},
        {"a": "", "b": "", "name": "Evil\r\nBcc: x@example.com"},
    ]
    for variables in cases:
        for rcpt in RCPTS[:2]:
            use_impl(monkeypatch, "py")
            want = _signed(r, "usual", variables, rcpt, MIDS[0], date)
            use_impl(monkeypatch, "c")
            assert _signed(r, "usual", variables, rcpt, MIDS[0], date) == want
            fast = _signed(r, "fast", variables, rcpt, MIDS[0], date)
            assert fast is None or fast == want
            if isinstance(want, bytes):
                assert _signed(r, "deferred", variables, rcpt, MIDS[0], date) == want
    use_impl(monkeypatch, "c")  # (values percent-encoding leaves as they are: the fast path)
    plain = {"a": "A-b", "b": "B", "name": "N-x"}
    assert _signed(r, "fast", plain, RCPTS[0], MIDS[0], date) is not None
