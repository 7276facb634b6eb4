"""The classifier skips a rule pattern when none of its required literal words
is in the reply text. That must never skip a pattern that would match: for
every shipped pattern, strings generated from the pattern itself still pass."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsend.bounce import default_rules
from fastsend.bounce.reply import _required_literals

PATTERNS = sorted(
    {p.pattern for r in default_rules().rules for p in (*r.match, *r.not_match)}
    | {p.pattern for ps in default_rules().signals.values() for p in ps}
)


def test_literals_of_known_shapes() -> None:
    assert _required_literals(r"(?:user|mailbox) (?:\S+ )?(?:does not|not) exist") == (" exist",)
    assert _required_literals(r"mailbox .{0,40}(?:full|quota)") == ("mailbox ",)
    assert _required_literals(r"[a-z]{2,63} not found") == (" not found",)
    assert _required_literals(r"over ?quota") == ("quota",)
    assert _required_literals(r"abc|de") == ()  # a branch without a usable word
    assert _required_literals(r"a(?:b)?c") == ()
    assert _required_literals(r"x{2}yzw|\[ts0[1-4]\]") == ("yzw", "[ts0")


def _lowered_matches(pattern: str) -> st.SearchStrategy[tuple[str, str]]:
    return st.from_regex(re.compile(pattern, re.IGNORECASE)).map(lambda s: (pattern, s))


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(st.sampled_from(PATTERNS).flatmap(_lowered_matches))
def test_prefilter_never_skips_a_match(case: tuple[str, str]) -> None:
    pattern, text = case
    text = text.lower()
    compiled = re.compile(pattern, re.IGNORECASE)
    lits = _required_literals(pattern)
    if lits and compiled.search(text):
        assert any(lit in text for lit in lits), (pattern, text, lits)
