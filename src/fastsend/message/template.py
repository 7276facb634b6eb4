"""Placeholder templates: ``{{ name }}`` and ``{{ name | default("x") }}``.

A template string is parsed once into a :class:`Template`: alternating literal
text and placeholders. Rendering splices the recipient's values between the
literals; nothing is re-parsed per recipient.

Syntax (the whole of it, deliberately small):

- ``{{ name }}``: the value of column ``name``; missing -> error.
- ``{{ name | default("text") }}`` (or single quotes): ``text`` when the column
  is missing or empty.
- Names are letters, digits, ``_``, ``-`` and ``.``, starting with a letter or
  ``_``. Whitespace inside the braces is optional.
- ``{{ "{{" }}`` writes a literal ``{{`` (any quoted string works that way).

It deliberately has no loops, conditions, filters other than ``default``, or
HTML auto-escaping: values are spliced verbatim (the MIME layer encodes them
for the part's transfer encoding; header values are checked for injection).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from fastsend._accel import pick

__all__ = ["Placeholder", "Template", "TemplateError"]


class TemplateError(ValueError):
    """A template string that does not parse (bad placeholder syntax)."""


_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_STR = r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"
_PLACEHOLDER = re.compile(
    r"\{\{\s*(?:(?P<name>" + _NAME + r")"
    r"(?:\s*\|\s*default\s*\(\s*(?P<default>" + _STR + r")\s*\))?"
    r"|(?P<literal>" + _STR + r"))\s*\}\}"
)


def _unquote(s: str) -> str:
    body = s[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def splice(
    literals: tuple[str, ...],
    names: tuple[str, ...],
    defaults: tuple[str | None, ...],
    variables: Mapping[str, str],
) -> str:
    """``literals[0] value[0] literals[1] ... literals[n]`` (KeyError naming a missing one).

    A value that is missing, or empty while a default exists, takes the default.
    """
    parts = [literals[0]]
    for i, name in enumerate(names):
        v = variables.get(name)
        if v is None or (not v and defaults[i] is not None):
            d = defaults[i]
            if d is None:
                raise KeyError(name)
            v = d
        parts.append(v)
        parts.append(literals[i + 1])
    return "".join(parts)


# The readable twin, by name (tests run both; the compiled one is picked).
PURE = {"splice": splice}
splice = pick(splice)


class Placeholder:
    """One ``{{ ... }}``: a column name and an optional default (None = required)."""

    __slots__ = ("default", "name")

    def __init__(self, name: str, default: str | None) -> None:
        self.name = name
        self.default = default

    def __repr__(self) -> str:
        return f"Placeholder({self.name!r}, {self.default!r})"


class Template:
    """A parsed template: ``literals[0] ph[0] literals[1] ph[1] ... literals[n]``."""

    __slots__ = ("_defaults", "_names", "literals", "names", "placeholders", "source")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise TemplateError(f"template must be a string, not {type(source).__name__}")
        self.source = source
        literals: list[str] = []
        phs: list[Placeholder] = []
        pos = 0
        buf = ""
        while True:
            start = source.find("{{", pos)
            if start < 0:
                buf += source[pos:]
                break
            m = _PLACEHOLDER.match(source, start)
            if m is None:
                line = source.count("\n", 0, start) + 1
                snippet = source[start : start + 40].split("\n")[0]
                raise TemplateError(f"bad placeholder on line {line}: {snippet!r}")
            buf += source[pos:start]
            if m.group("literal") is not None:
                buf += _unquote(m.group("literal"))
            else:
                literals.append(buf)
                buf = ""
                d = m.group("default")
                phs.append(Placeholder(m.group("name"), None if d is None else _unquote(d)))
            pos = m.end()
        literals.append(buf)
        self.literals: tuple[str, ...] = tuple(literals)
        self.placeholders: tuple[Placeholder, ...] = tuple(phs)
        self.names: frozenset[str] = frozenset(p.name for p in phs)
        self._names = tuple(p.name for p in phs)
        self._defaults = tuple(p.default for p in phs)

    @property
    def is_static(self) -> bool:
        return not self.placeholders

    def required(self) -> set[str]:
        """Names used at least once without a default."""
        return {p.name for p in self.placeholders if p.default is None}

    def values(self, variables: Mapping[str, str]) -> list[str]:
        """The value of each placeholder, in order (KeyError naming a missing one)."""
        out: list[str] = []
        for p in self.placeholders:
            v = variables.get(p.name)
            if v is None or (v == "" and p.default is not None):
                if p.default is None:
                    raise KeyError(p.name)
                v = p.default
            out.append(v)
        return out

    def render(
        self, variables: Mapping[str, str], escape: Callable[[str], str] | None = None
    ) -> str:
        """The template with values spliced in (``escape`` applied to each value)."""
        if escape is None:
            return splice(self.literals, self._names, self._defaults, variables)
        vals = self.values(variables)
        if escape is not None:
            vals = [escape(v) for v in vals]
        lits = self.literals
        parts = [lits[0]]
        for i, v in enumerate(vals):
            parts.append(v)
            parts.append(lits[i + 1])
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"
