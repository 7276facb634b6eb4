"""Machine opens and clicks: which tracking requests software made, by rules as data.

NAME
    fastsend.analytics.machine -- MachineRules, Rule, load_machine_rules.

DESCRIPTION
    ``machine.toml`` (shipped beside this module, documented there) lists
    rules for opens and for clicks; a user file named by ``[analytics]
    machine_rules`` is tried first (``replace = true`` drops the shipped
    rules). A rule matches when every condition it gives holds: a User-Agent
    regex, the HTTP method, a delay after delivery at most N seconds, and
    (clicks) N distinct links of one message clicked within W seconds.

    :meth:`MachineRules.classify` takes what one request carried plus what
    the caller knows (the delivery time, the message's other clicks) and
    returns the name of the first matching rule, or "" (human-likely).

DELIBERATELY NOT HERE
    No state: the rollup remembers deliveries and click bursts and passes
    them in. No IP address rules: tracking events carry no client address.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

import msgspec

from fastsend.config import ConfigError
from fastsend.config.base import read_toml

KINDS = ("open", "click")
_KEYS = {"name", "user_agent", "method", "within_s_of_delivery", "burst_links", "burst_window_s"}


class Rule(msgspec.Struct, frozen=True):
    name: str
    user_agent: re.Pattern[str] | None = None
    method: str = ""
    within_s_of_delivery: float | None = None
    burst_links: int = 0
    burst_window_s: float = 0.0

    def static_match(self, ua: str, method: str) -> bool:
        """The conditions that depend on the request alone (method, User-Agent)."""
        if self.method and method.upper() != self.method:
            return False
        return self.user_agent is None or self.user_agent.search(ua) is not None

    def matches(self, ua: str, method: str, since_delivery: float | None, burst: int) -> bool:
        if not self.static_match(ua, method):
            return False
        if self.within_s_of_delivery is not None and (
            since_delivery is None or not 0 <= since_delivery <= self.within_s_of_delivery
        ):
            return False
        return not (self.burst_links and burst < self.burst_links)


def _rule(d: Any, where: str) -> Rule:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: a rule must be a table")
    extra = set(d) - _KEYS
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (known: {sorted(_KEYS)})")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string")
    where = f"{where} ({name})"
    ua = d.get("user_agent")
    pat = None
    if ua is not None:
        if not isinstance(ua, str):
            raise ConfigError(f"{where}: user_agent must be a regex string")
        try:
            pat = re.compile(ua)
        except re.error as e:
            raise ConfigError(f"{where}: bad user_agent regex: {e}") from None
    method = d.get("method", "")
    if not isinstance(method, str):
        raise ConfigError(f"{where}: method must be a string")
    within = d.get("within_s_of_delivery")
    if within is not None and (not isinstance(within, int | float) or isinstance(within, bool)
                               or within < 0):  # fmt: skip
        raise ConfigError(f"{where}: within_s_of_delivery must be a number >= 0")
    links = d.get("burst_links", 0)
    window = d.get("burst_window_s", 0.0)
    if not isinstance(links, int) or isinstance(links, bool) or links < 0:
        raise ConfigError(f"{where}: burst_links must be an integer >= 0")
    if not isinstance(window, int | float) or isinstance(window, bool) or window < 0:
        raise ConfigError(f"{where}: burst_window_s must be a number >= 0")
    if links and not window:
        raise ConfigError(f"{where}: burst_links needs burst_window_s")
    if not (pat or method or within is not None or links):
        raise ConfigError(f"{where}: a rule needs at least one condition")
    return Rule(name, pat, method.upper(), None if within is None else float(within), links,
                float(window))  # fmt: skip


def _rules(data: dict[str, Any], where: str) -> dict[str, list[Rule]]:
    extra = set(data) - {*KINDS, "replace"}
    if extra:
        raise ConfigError(
            f"{where}: unknown key {sorted(extra)[0]!r} (known: open, click, replace)"
        )
    out: dict[str, list[Rule]] = {}
    for kind in KINDS:
        items = data.get(kind, [])
        if not isinstance(items, list):
            raise ConfigError(f"{where}: [[{kind}]] must be an array of tables")
        out[kind] = [_rule(d, f"{where} [[{kind}]] #{i + 1}") for i, d in enumerate(items)]
    return out


class MachineRules:
    def __init__(self, opens: list[Rule], clicks: list[Rule]) -> None:
        self.rules = {"open": opens, "click": clicks}
        self._static: dict[tuple[str, str, str], tuple[Rule, ...]] = {}
        # The largest burst window: how long a click waits before it is judged.
        self.burst_window = max((r.burst_window_s for r in clicks if r.burst_links), default=0.0)

    def classify(
        self,
        kind: str,
        ua: str,
        method: str = "GET",
        since_delivery: float | None = None,
        burst: int = 0,
    ) -> str:
        """The first matching rule's name ("": human-likely). ``burst``: distinct links of
        the message clicked within the rule's window around this click."""
        ck = (kind, ua, method)
        cands = self._static.get(ck)
        if cands is None:  # which rules' User-Agent and method parts match (cached)
            cands = tuple(r for r in self.rules[kind] if r.static_match(ua, method))
            if len(self._static) > 4096:
                self._static.clear()
            self._static[ck] = cands
        for r in cands:
            if r.matches(ua, method, since_delivery, burst):
                return r.name
        return ""

    def burst_rules(self) -> list[Rule]:
        return [r for r in self.rules["click"] if r.burst_links]


def shipped_rules() -> dict[str, Any]:
    # Beside this module (not through importlib.resources: see config.shaping).
    with open(os.path.join(os.path.dirname(__file__), "machine.toml"), encoding="utf-8") as f:
        text = f.read()
    return tomllib.loads(text)


def load_machine_rules(path: str | None = None) -> MachineRules:
    """The shipped rules, preceded (or replaced) by a user file's."""
    shipped = _rules(shipped_rules(), "machine.toml (shipped)")
    if not path:
        return MachineRules(shipped["open"], shipped["click"])
    data = read_toml(path, "machine rules file")
    replace = data.get("replace", False)
    if not isinstance(replace, bool):
        raise ConfigError(f"{path}: replace must be true or false")
    mine = _rules(data, path)
    if replace:
        return MachineRules(mine["open"], mine["click"])
    return MachineRules(mine["open"] + shipped["open"], mine["click"] + shipped["click"])
