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
- ``{{ name | raw }}`` (also ``{{ name | default("x") | raw }}``): in an HTML
  part, the value is inserted as it is, not escaped (trusted HTML only: a
  value from a signup form must never be raw).

In an HTML part every other value is HTML-escaped for where it stands
(:func:`html_escapes` finds that once per template, :func:`html_value`
escapes): in text and quoted attribute values ``& < > " '`` become character
references; an unquoted attribute value has every character but letters,
digits and ``-._:/`` escaped (a placeholder standing for an attribute or a
tag's name: all but letters, digits, ``-`` and ``_``);
a value that starts a URL attribute (``href``, ``src``, ...) must be an
``http``, ``https``, ``mailto``, ``tel`` or ``cid`` URL or a relative one
(``javascript:`` and the like fail that recipient, :class:`UnsafeValue`).
Defaults are escaped like values. Text parts, the subject and other headers
are never HTML-escaped (headers are checked for injection instead).

It deliberately has no loops, conditions or filters other than ``default``
and ``raw``: values are spliced as they are (escaped in HTML parts), and the
MIME layer encodes them for the part's transfer encoding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from fastsend._accel import pick

__all__ = [
    "Placeholder",
    "Template",
    "TemplateError",
    "UnsafeValue",
    "html_escapes",
    "html_value",
]


class TemplateError(ValueError):
    """A template string that does not parse (bad placeholder syntax)."""


class UnsafeValue(ValueError):
    """A value that cannot go where its placeholder stands (a ``javascript:``
    URL starting an ``href``): that recipient fails, the campaign goes on."""


_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_STR = r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"
_PLACEHOLDER = re.compile(
    r"\{\{\s*(?:(?P<name>" + _NAME + r")"
    r"(?:\s*\|\s*default\s*\(\s*(?P<default>" + _STR + r")\s*\))?"
    r"(?P<raw>\s*\|\s*raw)?"
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
    """One ``{{ ... }}``: a column name, an optional default (None = required)
    and whether it is ``| raw`` (not HTML-escaped in an HTML part)."""

    __slots__ = ("default", "name", "raw")

    def __init__(self, name: str, default: str | None, raw: bool = False) -> None:
        self.name = name
        self.default = default
        self.raw = raw

    def __repr__(self) -> str:
        return f"Placeholder({self.name!r}, {self.default!r}, raw={self.raw})"


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
                phs.append(
                    Placeholder(
                        m.group("name"),
                        None if d is None else _unquote(d),
                        m.group("raw") is not None,
                    )
                )
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

    def values_or_none(self, variables: Mapping[str, str]) -> list[object]:
        """Each placeholder's value as given (None when missing), defaults
        where they apply; never raises."""
        out: list[object] = []
        for p in self.placeholders:
            v = variables.get(p.name)
            out.append(p.default if (v is None or v == "") and p.default is not None else v)
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


# -- HTML parts: each placeholder's escaping, found once per template ----------

#: :func:`html_value` modes (bits): escape ``& < > " '``; escape everything
#: but ``[A-Za-z0-9-._:/]`` (an unquoted attribute value, or an attribute's
#: place); the value starts a URL attribute (its scheme is checked).
ESC_HTML = 1
ESC_UNQUOTED = 2
ESC_URL = 4
ESC_NAME = 8  # a tag's or an attribute's name: everything but [A-Za-z0-9_-] escaped

# Attributes whose value is a URL a mail client may follow or load.
_URL_ATTRS = frozenset(
    [
        "href",
        "src",
        "action",
        "formaction",
        "background",
        "poster",
        "cite",
        "longdesc",
        "lowsrc",
        "dynsrc",
        "usemap",
        "xlink:href",
        "data",
        "srcset",
    ]
)
_SAFE_SCHEMES = ("http", "https", "mailto", "tel", "cid")
_SCHEME = re.compile(r"[\x00- ]*([A-Za-z][A-Za-z0-9+.\-]*):")
_UNQUOTED_SAFE = re.compile(r"[A-Za-z0-9\-._:/]*")
_NAME_SAFE = re.compile(r"[A-Za-z0-9_\-]*")
_HTML_SPECIAL = re.compile(r"[&<>\"']")
_HTML_REFS = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
_TAG_OPEN = re.compile(r"<([A-Za-z][A-Za-z0-9:\-]*)")
_ATTR = re.compile(r"[^\s\"'>/=]+")


def html_escapes(template: Template) -> tuple[int, ...]:
    """Each placeholder's :func:`html_value` mode, from where it stands in the
    HTML ``template`` (0: ``| raw``, or fastsend's own ``_fs.*`` values,
    already escaped). A small HTML tokenizer over the literals: text, tags,
    attribute names, quoted and unquoted values, comments; ``<script>`` and
    ``<style>`` contents are escaped as text (mail clients do not run them)."""
    modes: list[int] = []
    state = "text"  # text | tag | name | aname | before | dq | sq | uq | comment
    attr = ""  # the current attribute's name (lower case)
    value = ""  # its value so far (before a placeholder: "" = at the start)
    for i, lit in enumerate(template.literals):
        j, n = 0, len(lit)
        while j < n:
            c = lit[j]
            if state == "text":
                k = lit.find("<", j)
                if k < 0:
                    break
                if lit.startswith("<!--", k):
                    state, j = "comment", k + 4
                    continue
                m = _TAG_OPEN.match(lit, k) or re.compile(r"</[A-Za-z]").match(lit, k)
                if m is None:
                    j = k + 1
                    continue
                state, j = "tag", m.end()
                continue
            if state == "comment":
                k = lit.find("-->", j)
                if k < 0:
                    break
                state, j = "text", k + 3
                continue
            if state == "tag":
                if c == ">":
                    state = "text"
                elif not c.isspace() and c != "/":
                    m = _ATTR.match(lit, j)
                    if m is not None:
                        attr, state, j = m.group(0).lower(), "aname", m.end()
                        continue
                j += 1
                continue
            if state == "aname":
                if c == "=":
                    state, value = "before", ""
                elif c == ">":
                    state = "text"
                elif not c.isspace():
                    state = "tag"
                    continue
                j += 1
                continue
            if state == "before":
                if c == '"':
                    state = "dq"
                elif c == "'":
                    state = "sq"
                elif c == ">":
                    state = "text"
                elif not c.isspace():
                    state = "uq"
                    continue
                j += 1
                continue
            if state in ("dq", "sq"):
                k = lit.find('"' if state == "dq" else "'", j)
                if k < 0:
                    value += lit[j:]
                    break
                state, j = "tag", k + 1
                continue
            # unquoted value: up to white space or ">"
            if c.isspace():
                state = "tag"
            elif c == ">":
                state = "text"
            else:
                value += c
            j += 1
        if i == len(template.placeholders):
            break
        p = template.placeholders[i]
        if p.raw or p.name.startswith("_fs."):
            modes.append(0)
            continue
        mode = ESC_HTML
        if state in ("before", "uq"):
            mode |= ESC_UNQUOTED
        elif state in ("tag", "aname") or (state == "text" and lit.endswith(("<", "</"))):
            mode |= ESC_UNQUOTED | ESC_NAME  # an attribute's place, a tag's name: <{{ x }}
        if state in ("before", "uq", "dq", "sq") and attr in _URL_ATTRS and not value.strip():
            mode |= ESC_URL
        if state == "before":
            state = "uq"
        elif state == "aname":
            state = "tag"
        if state in ("uq", "dq", "sq"):
            value += "x"  # (what follows is no longer the value's start)
        modes.append(mode)
    return tuple(modes)


def url_scheme_unsafe(url: str) -> str:
    """The scheme of ``url`` as a browser reads it (leading C0 controls and
    spaces dropped, tabs and line ends anywhere ignored: ``java\tscript:``
    is ``javascript:``) when it is not http, https, mailto, tel or cid;
    "" for those and for relative URLs."""
    m = _SCHEME.match(url.translate(_TAB_NL))
    if m is None or m.group(1).lower() in _SAFE_SCHEMES:
        return ""
    return m.group(1).lower()


_TAB_NL = {9: None, 10: None, 13: None}


def html_value(value: str, mode: int, name: str = "") -> str:
    """``value`` escaped for an HTML part (``mode``: :func:`html_escapes`'s).
    UnsafeValue for a value starting a URL attribute with a scheme other
    than http, https, mailto, tel or cid."""
    if not mode:
        return value
    if mode & ESC_URL and (scheme := url_scheme_unsafe(value)):
        raise UnsafeValue(
            f"the value of {name or 'a variable'!r} starts a link with {scheme!r}:"
            " only http, https, mailto, tel, cid or relative URLs"
        )
    if mode & ESC_UNQUOTED:
        safe = "-_" if mode & ESC_NAME else "-._:/"
        if (_NAME_SAFE if mode & ESC_NAME else _UNQUOTED_SAFE).fullmatch(value):
            return value
        return "".join(
            ch if (ch.isalnum() and ch.isascii()) or ch in safe else f"&#x{ord(ch):X};"
            for ch in value
        )
    if _HTML_SPECIAL.search(value) is None:
        return value
    return _HTML_SPECIAL.sub(lambda m: _HTML_REFS[m.group(0)], value)
