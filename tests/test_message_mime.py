"""Property tests: arbitrary Unicode values round-trip through Python's email parser."""

from __future__ import annotations

import email
import email.policy
import html as html_mod
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _message_helpers import use_impl
from fastsend import _accel
from fastsend.message import Campaign, RenderError
from fastsend.message import headers as headers_mod
from fastsend.message import mime as mime_mod
from fastsend.message import template as template_mod

CAMPAIGN = {
    "from": "Sender <news@example.com>",
    "reply_to": "{{ name }} <reply@example.com>",
    "subject": "{{ a }}",
    "text": "pre {{ b }} post",
    "html": "<p>{{ b }}</p>",
    "headers": {"X-Value": "v={{ a }}"},
}
# Any character except surrogates; header values also without CR, LF, NUL.
ANY = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
HEADER = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\x00"), max_size=300
)
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def norm_body(s: str) -> str:
    s = re.sub(r"\r\n?", "\n", s)
    return s if s.endswith("\n") else s + "\n"


def ws(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def check_lines(data: bytes) -> None:
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


# Python's parser (unlike RFC 2047 6.2) keeps the space between adjacent
# encoded-words in a *phrase*, so display names are kept to one encoded-word
# (45 UTF-8 octets) here; longer names are split per RFC 2047.
NAME = HEADER.filter(lambda s: len(s.encode()) <= 45)


@FAST
@given(a=HEADER, name=NAME, b=ANY)
@example(a="=??B??=", name="=??B??=", b="")  # atoms that look like an encoded-word
def test_values_round_trip(
    impl: str, monkeypatch: pytest.MonkeyPatch, a: str, name: str, b: str
) -> None:
    use_impl(monkeypatch, impl)
    r = Campaign.from_dict(CAMPAIGN).compile()
    data = r.render("rcpt@example.org", {"a": a, "b": b, "name": name}, "id-1")
    check_lines(data)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects
    assert str(msg["Subject"]) == a
    assert str(msg["X-Value"]) == "v=" + a
    reply = msg["Reply-To"].addresses[0]
    assert reply.addr_spec == "reply@example.com"
    # a phrase's whitespace is not significant (and Python's parser rewrites it)
    assert ws(reply.display_name) == ws(name)
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().replace("\r\n", "\n") == norm_body("pre " + b + " post")
    # (a value in an HTML part is HTML-escaped; the text part has it as it is)
    want = norm_body("<p>" + html_mod.escape(b) + "</p>")
    assert html.get_content().replace("\r\n", "\n") == want


@FAST
@given(a=st.tuples(HEADER, st.sampled_from(["\r", "\n", "\x00", "\r\n"]), HEADER).map("".join))
def test_header_injection_always_refused(
    impl: str, monkeypatch: pytest.MonkeyPatch, a: str
) -> None:
    use_impl(monkeypatch, impl)
    r = Campaign.from_dict(CAMPAIGN).compile()
    with pytest.raises(RenderError):
        r.render("rcpt@example.org", {"a": a, "b": "", "name": "n"}, "id")


@settings(max_examples=300, deadline=None)
@given(text=ANY)
def test_qp_twins_agree(text: str) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    pure = mime_mod.PURE["qp_encode_text"](text)
    assert _accel.compiled("qp_encode_text")(text) == pure
    assert all(len(ln) <= 76 for ln in pure.split(b"\r\n"))


@settings(max_examples=200, deadline=None)
@given(vals=st.dictionaries(st.sampled_from(["x", "y", "z"]), ANY), src=st.sampled_from(
    ["{{x}}", "a{{ x }}b{{y|default('d')}}c", "{{ z | default(\"\") }}{{ x | default('q') }}"]))  # fmt: skip
def test_splice_twins_agree(vals: dict[str, str], src: str) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    t = template_mod.Template(src)
    args = (t.literals, t._names, t._defaults, vals)
    try:
        want: str | None = template_mod.PURE["splice"](*args)
    except KeyError:
        want = None
    try:
        got: str | None = _accel.compiled("splice")(*args)
    except KeyError:
        got = None
    assert got == want


NAMES = st.sampled_from(["Subject", "X-A", "Feedback-ID", "X-" + "n" * 70, "Ü"])
WORDY = st.lists(
    st.sampled_from([" ", "\t", "=?", "a", "é", "€", "😀", "x" * 50, "y" * 950, "\r", "\x00"]),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(name=NAMES, value=st.one_of(ANY, WORDY))
def test_text_header_twins_agree(name: str, value: str) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")

    def run(f: Any) -> object:
        try:
            return f(name, value)
        except Exception as exc:  # the same error, with the same text
            return (type(exc).__name__, str(exc))

    assert run(_accel.compiled("text_header")) == run(mime_mod.PURE["text_header"])


# Literals with whole lines inside (the compiled twin pre-encodes those once):
# values next to the first and last line break, trailing white space, "=",
# lines longer than 76, a CR value before a literal that starts with LF.
LINES = "w =\t \n" + ("é" * 40 + " x" * 30 + "\n") * 3 + "\n \n"
LONG = [
    "a {{ x }}\n" + LINES + "{{ y }} end",
    "{{x}}" + LINES + "{{y}}\r\n" + LINES,
    "\n" + LINES + "{{ x | default('d') }}\n" + LINES + "tail \t",
    LINES + LINES,
]


@settings(max_examples=300, deadline=None)
@given(vals=st.dictionaries(st.sampled_from(["x", "y"]), st.one_of(ANY, WORDY)), src=st.sampled_from(
    ["{{x}}", "a {{ x }}\t{{y|default('d')}}c \n", "", "static \t\n", "\r{{x}}\n{{y}}\r", *LONG]))  # fmt: skip
def test_qp_template_twins_agree(vals: dict[str, str], src: str) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    t = template_mod.Template(src)

    def run(f: Any) -> object:
        try:
            return f(t.literals, t._names, t._defaults, vals)
        except KeyError as exc:
            return exc.args

    assert run(_accel.compiled("qp_template")) == run(mime_mod.PURE["qp_template"])


URI = st.lists(
    st.sampled_from([*"ab@.-~_/%:é ", "<", ">", "\r", "\x00", "x" * 300]), max_size=8
).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    vals=st.dictionaries(st.sampled_from(["x", "y"]), st.one_of(URI, ANY)),
    srcs=st.lists(
        st.sampled_from(
            ["mailto:u@example.com?subject={{ x }}", "https://example.com/u/{{ y }}/{{ x }}",
             "https://e.example/{{ x | default('a b') }}", "{{ y }}", "https://" + "h" * 70]
        ), min_size=1, max_size=3,
    ),
)  # fmt: skip
def test_uri_header_twins_agree(vals: dict[str, str], srcs: list[str]) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")
    ts = [template_mod.Template(src) for src in srcs]
    uris = tuple((t.literals, t._names, t._defaults) for t in ts)

    def run(f: Any) -> object:
        try:
            return f("List-Unsubscribe", uris, vals)
        except Exception as exc:  # the same error, with the same text
            return (type(exc).__name__, str(exc))

    assert run(_accel.compiled("uri_header")) == run(mime_mod.PURE["uri_header"])


ADDRESS = st.lists(
    st.sampled_from([*'ab.@-+!"\\ é\r\n\x00Z9_', "x" * 30, "example.org", "@", "..", "bücher.de"]),
    max_size=10,
).map("".join)


DOMAIN_EDGES = [
    "a@b", "a@b.", "a@b..c", "a@-b.c", "a@b-.c", "a@b.c-", "a@a-b.c", "a@.", "a@a.-",
    "a@" + "x" * 63 + ".c", "a@" + "x" * 64 + ".c", "a@[192.0.2.1]", "a@Example.ORG",
    "a@ex_ample.org", "a@a..", "a@b.c.", "a@b.c..", "a@bücher.de", "a@b c", "a@b\rc",
]  # fmt: skip


@pytest.mark.parametrize("addr", DOMAIN_EDGES)
def test_split_address_domain_edges_twins_agree(addr: str) -> None:
    """The compiled twin returns plain LDH domains itself: exactly what
    encode_domain accepts and returns, at every edge of a label."""
    test_split_address_twins_agree.hypothesis.inner_test(addr)  # type: ignore[attr-defined]


@settings(max_examples=500, deadline=None)
@given(addr=st.one_of(ADDRESS, st.emails(), ANY))
def test_split_address_twins_agree(addr: str) -> None:
    if not _accel.HAVE_EXTENSIONS:
        pytest.skip("compiled core not built")

    def run(f: Any) -> object:
        try:
            return f(addr)
        except Exception as exc:  # the same error, with the same text
            return (type(exc).__name__, str(exc))

    assert run(_accel.compiled("split_address")) == run(headers_mod.PURE["split_address"])
