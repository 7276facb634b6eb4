"""The supervisor's cost per message (sup30's audit, issue 11).

- ``Policy.provider_by_mx`` (the rollups ask it once per recipient domain, the
  workers once per site) tried every provider's every MX suffix against every
  host; it now looks each of a host's dot-suffixes up, longest first: the same
  answer as the scan (``py_provider_by_mx``), shown here on generated
  providers and hosts, suffix ties and a merge after a first look-up included.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fastsend.config.shaping import ProviderTable, ShapingFile
from fastsend.shaping.policy import Policy, Provider, load_policy, py_provider_by_mx

LABEL = st.sampled_from(["a", "b", "mx", "google", "com", "x-y", ""])
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
SUFFIX = st.one_of(NAME.map(lambda n: "." + n), NAME)  # (a merge writes the dot; not all do)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("pqrs"), st.lists(SUFFIX, max_size=4)), max_size=4),
    st.lists(NAME.map(lambda n: n + st_case_dot(n)), max_size=3),
)
def test_provider_by_mx_is_the_scan(
    providers: list[tuple[str, list[str]]], hosts: list[str]
) -> None:
    policy = Policy(
        providers={f"k{i}": Provider(name, tuple(sfx), frozenset(), {})
                   for i, (name, sfx) in enumerate(providers)}
    )  # fmt: skip
    assert policy.provider_by_mx(hosts) == py_provider_by_mx(policy, hosts)
    assert policy.provider_by_mx(tuple(hosts)) == py_provider_by_mx(policy, hosts)


def st_case_dot(name: str) -> str:
    """Hosts as DNS gives them: some with the root's dot (ignored by the match)."""
    return "." if len(name) % 3 == 0 else ""


def test_shipped_hosts_and_a_merge_after_a_look_up() -> None:
    policy = load_policy(None)
    hosts = [
        "ALT1.ASPMX.L.GOOGLE.COM.", "mx.x.olc.protection.outlook.com", "notgoogle.com",
        "mx00.emig.gmx.net", "a.google.com.example", "", ".",
    ]  # fmt: skip
    for h in hosts:
        assert policy.provider_by_mx([h]) == py_provider_by_mx(policy, [h]), h
    assert policy.provider_by_mx(["mx.outlook.com", "a.google.com"]) == "google"
    assert policy.provider_by_mx(["hotmail-com.olc.protection.outlook.com", "x.google.com"]) == (
        "outlook"  # the longest suffix of any host wins
    )
    assert policy.provider_by_mx(["mx.acme.test"]) == ""
    layer = ShapingFile(provider={"acme": ProviderTable(mx_suffixes=["acme.test"])})
    policy.merge(layer)  # (after a look-up: the index made for it is not kept)
    assert policy.provider_by_mx(["mx.acme.test"]) == "acme"
    assert policy.provider_for(["mx.acme.test"], "x.example") == "acme"


def test_hosts_matching_alike_the_first_wins() -> None:
    policy = Policy(
        providers={
            "p": Provider("p", (".mx.com",), frozenset(), {}),
            "q": Provider("q", (".ab.com", ".mx.com"), frozenset(), {}),
        }
    )
    assert policy.provider_by_mx(["x.mx.com", "x.ab.com"]) == "p"  # (same length: the first host)
    assert policy.provider_by_mx(["x.ab.com", "x.mx.com"]) == "q"
    assert policy.provider_by_mx(["y.x.ab.com"]) == "q"
