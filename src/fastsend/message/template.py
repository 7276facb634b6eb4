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
- ``{{ row["First Name"] }}`` (or single quotes; ``| default`` and ``| raw``
  as above): the column named so, whatever its name holds (a spreadsheet's
  header: spaces, ``/``, accents, ...), as the list writes it.
- ``{{ "{{" }}`` writes a literal ``{{`` (any quoted string works that way).
- Nothing else: a campaign holding a ``{% ... %}`` tag or a ``{# ... #}``
  comment (another template language's) is refused as it arrives
  (:func:`foreign_tag`), not sent as written.
- ``{{ name | raw }}`` (also ``{{ name | default("x") | raw }}``): in an HTML
  part, the value is inserted as it is, not escaped (trusted HTML only: a
  value from a signup form must never be raw).

In an HTML part every other value is escaped for where it stands
(:func:`html_escapes` finds that once per template, :func:`html_value`
escapes): in text and quoted attribute values ``& < > " '`` become character
references; an unquoted attribute value has every character but letters,
digits and ``-._:/`` escaped (a placeholder standing for an attribute or a
tag's name: all but letters, digits, ``-`` and ``_``).

- In a URL attribute (``href``, ``src``, ...): a value that starts the URL
  is a whole URL, kept as it is, and must be an ``http``, ``https``,
  ``mailto``, ``tel`` or ``cid`` URL or a relative one (``javascript:`` and
  the like fail that recipient, :class:`UnsafeValue`); a value further in
  is percent-encoded (UTF-8) for its part: in the host part, the query or
  the fragment all but ``A-Z a-z 0-9 - . _ ~`` (one component: ``&``, ``=``,
  ``#``, ``/`` cannot add a parameter or leave the host), in the path all
  but those, ``+``, ``@`` and ``/`` (``?`` and ``#`` cannot leave the path;
  a value with a ``.`` or ``..`` segment fails, :class:`UnsafeValue`, and a
  leading ``/`` is encoded, so it cannot make ``//``, another host).
- In ``<script>`` and ``on*`` attributes (JavaScript): every character but
  ``A-Z a-z 0-9 _ .`` is written as ``\\uXXXX`` (placed in a string literal,
  the value reads back as itself and can end neither the string nor the
  script).
- In ``<style>`` and ``style`` attributes (CSS): a value may hold letters,
  digits, space and ``# % . , + - _ /`` only (a colour, a size, a font
  name); anything else (``;``, ``:``, braces, parentheses, quotes,
  backslash, ``*``) fails that recipient, :class:`UnsafeValue`. Inside
  ``url(...)`` the URL rules apply, a whole URL percent-encoded where it
  holds what could end the ``url()`` (space, quotes, parentheses,
  backslash).

Defaults are escaped like values. Text parts, the subject and other headers
are never HTML-escaped (headers are checked for injection instead).

It deliberately has no loops, conditions or filters other than ``default``
and ``raw``: values are spliced as they are (escaped in HTML parts), and the
MIME layer encodes them for the part's transfer encoding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastsend._accel import pick

__all__ = [
    "Placeholder",
    "Template",
    "TemplateError",
    "UnsafeValue",
    "foreign_tag",
    "html_escapes",
    "html_value",
    "placeholder_spans",
    "url_escapes",
]


class TemplateError(ValueError):
    """A template string that does not parse (bad placeholder syntax)."""


class UnsafeValue(ValueError):
    """A value that cannot go where its placeholder stands (a ``javascript:``
    URL starting an ``href``): that recipient fails, the campaign goes on."""


_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
# (unrolled: "[^"\\]*(?:\\.[^"\\]*)*" reads a run of plain characters at a time;
# one alternation a character took 0.3 us each, 16 MB of one literal ~5 s)
_STR = r"\"[^\"\\]*(?:\\.[^\"\\]*)*\"|'[^'\\]*(?:\\.[^'\\]*)*'"
PLAIN_NAME = re.compile(_NAME)  # what {{ name }} takes; any other column is {{ row["..."] }}
_PLACEHOLDER = re.compile(
    r"\{\{\s*(?:(?:(?P<name>" + _NAME + r")|row\s*\[\s*(?P<key>" + _STR + r")\s*\])"
    r"(?:\s*\|\s*default\s*\(\s*(?P<default>" + _STR + r")\s*\))?"
    r"(?P<raw>\s*\|\s*raw)?"
    r"|(?P<literal>" + _STR + r"))\s*\}\}"
)


# What another template language would make a tag or a comment of (Jinja,
# Django, Twig, Nunjucks: ``{% if premium %}``, ``{#- note -#}``; Mailchimp's
# merge tags, ``*|FNAME|*``): this one has none, so such text goes out as it is
# written, to every recipient.
_FOREIGN_TAG = re.compile(r"\{%-?\s*[A-Za-z_][^%]*%\}|\{#|\*\|[A-Za-z_][A-Za-z0-9_:\-]*\|\*")


def _foreign_search(source: str, pos: int, end: int) -> tuple[int, str] | None:
    """The first foreign tag in ``source[pos:end]``: (where, its text), or None.
    A ``{#`` is a comment only when a ``#}`` closes it, looked for once with
    str.find: the regex ``{#.*?#}`` scanned to the end from every ``{#``
    (quadratic: 200 KB of "{#" took 188 s on serve's loop, 16 MB for ever)."""
    while True:
        m = _FOREIGN_TAG.search(source, pos, end)
        if m is None:
            return None
        if m.group() != "{#":
            return m.start(), m.group()
        close = source.find("#}", m.end(), end)
        if close >= 0:
            return m.start(), source[m.start() : close + 2]
        # no "#}" after this "{#", so none after a later one: only the others are left
        end_tags = _FOREIGN_NO_COMMENT.search(source, m.end(), end)
        return None if end_tags is None else (end_tags.start(), end_tags.group())


_FOREIGN_NO_COMMENT = re.compile(r"\{%-?\s*[A-Za-z_][^%]*%\}|\*\|[A-Za-z_][A-Za-z0-9_:\-]*\|\*")


def foreign_tag(source: str) -> str | None:
    """Why ``source`` is not meant as this template language: the first ``{%
    ... %}`` tag, ``{# ... #}`` comment or ``*|MERGE|*`` tag outside a
    placeholder, with its line; None when it holds none. (Asked of a campaign
    as it arrives, ``accept.check_campaign``: a campaign already spooled still
    builds.)"""
    if "{%" not in source and "{#" not in source and "*|" not in source:
        return None
    pos = 0
    for m in _PLACEHOLDER.finditer(source):  # a quoted "{%" in one is text
        got = _foreign_search(source, pos, m.start())
        if got is not None:
            break
        pos = m.end()
    else:
        got = _foreign_search(source, pos, len(source))
    if got is None:
        return None
    at, text = got
    line = source.count("\n", 0, at) + 1
    return (
        f"line {line}: {text[:40].splitlines()[0]!r}: a template has only {{{{ name }}}}"
        ' placeholders (with | default("x") or | raw), no {% %} tags, {# #} comments or'
        ' *|MERGE|* tags ({{ "{%" }} writes the characters)'
    )


_WORDS = re.compile(r"\{\{\s*([^{}|\"']*?)\s*(?:\||\}\})")


def _hint(snippet: str) -> str:
    """What a placeholder naming a column that is no plain name (``{{ First Name
    }}``, ``{{ Zip/Postal }}``) is written as instead."""
    m = _WORDS.match(snippet)
    if m is None or not m.group(1) or re.fullmatch(_NAME, m.group(1)):
        return ""
    name = m.group(1).replace("\\", "\\\\").replace('"', '\\"')
    return f' (a column whose name is no plain name is written {{{{ row["{name}"] }}}})'


def _unquote(s: str) -> str:
    body = s[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def splice(
    literals: tuple[str, ...],
    names: tuple[str, ...],
    defaults: tuple[str | None, ...],
    variables: Mapping[str, str],
    escapes: tuple[int, ...] | None = None,
) -> str:
    """``literals[0] value[0] literals[1] ... literals[n]`` (KeyError naming a missing one).

    A value that is missing, or empty while a default exists, takes the default.
    ``escapes``: each (str) value escaped by :func:`html_value` with its mode
    (an HTML part's, :func:`html_escapes`; UnsafeValue when one is refused).
    """
    parts = [literals[0]]
    for i, name in enumerate(names):
        v = variables.get(name)
        if v is None or (not v and defaults[i] is not None):
            d = defaults[i]
            if d is None:
                raise KeyError(name)
            v = d
        if escapes is not None and escapes[i] and type(v) is str:
            v = html_value(v, escapes[i], name)
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


def placeholder_spans(source: str) -> list[tuple[int, int]]:
    """(start, end) of each placeholder of ``source``, as :class:`Template`
    reads them (a ``{{`` that starts none is left out: Template refuses it)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while (start := source.find("{{", pos)) >= 0:
        m = _PLACEHOLDER.match(source, start)
        if m is None:
            pos = start + 2
            continue
        spans.append((start, m.end()))
        pos = m.end()
    return spans


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
        buf: list[str] = []  # (a list: += on a str copied it each time, quadratic in
        # a text of many {{ "{" }}, what htmltext writes for each "{" of the HTML)
        while True:
            start = source.find("{{", pos)
            if start < 0:
                buf.append(source[pos:])
                break
            m = _PLACEHOLDER.match(source, start)
            if m is None or m.group("key") in ('""', "''"):
                line = source.count("\n", 0, start) + 1
                snippet = source[start : start + 40].split("\n")[0]
                raise TemplateError(f"bad placeholder on line {line}: {snippet!r}{_hint(snippet)}")
            buf.append(source[pos:start])
            if m.group("literal") is not None:
                buf.append(_unquote(m.group("literal")))
            else:
                literals.append("".join(buf))
                buf = []
                d = m.group("default")
                key = m.group("key")
                phs.append(
                    Placeholder(
                        m.group("name") if key is None else _unquote(key),
                        None if d is None else _unquote(d),
                        m.group("raw") is not None,
                    )
                )
            pos = m.end()
        literals.append("".join(buf))
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

    def render(self, variables: Mapping[str, str], escapes: tuple[int, ...] | None = None) -> str:
        """The template with values spliced in (``escapes``: as :func:`splice`)."""
        return splice(self.literals, self._names, self._defaults, variables, escapes)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


# -- HTML parts: each placeholder's escaping, found once per template ----------

#: :func:`html_value` modes (bits). How a value is written: ESC_JS, ESC_CSS,
#: ESC_URLPART, ESC_URLPATH or ESC_CSSURL (at most one), then ESC_UNQUOTED or
#: ESC_HTML; ESC_URL checks its scheme first.
ESC_HTML = 1  # escape ``& < > " '`` (text, quoted attribute values)
ESC_UNQUOTED = 2  # escape all but ``[A-Za-z0-9-._:/]`` (an unquoted value, an attribute's place)
ESC_URL = 4  # the value starts a URL (its scheme is checked)
ESC_NAME = 8  # a tag's or an attribute's name: everything but [A-Za-z0-9_-] escaped
ESC_URLPATH = 16  # in a URL's path: percent-encode all but [A-Za-z0-9-._~+@/], no dot segment
ESC_URLPART = 32  # in a URL's host, query or fragment: percent-encode all but [A-Za-z0-9-._~]
ESC_JS = 64  # JavaScript: all but [A-Za-z0-9_.] as \uXXXX
ESC_CSS = 128  # CSS: only [A-Za-z0-9 #%.,+-_/] and non-ASCII letters, else UnsafeValue
ESC_CSSURL = 256  # a whole URL in CSS url(): percent-encode space, quotes, ( ) \ and the like

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
# Characters a numeric reference would not give back (HTML's tokenizer maps &#x80;-&#x9F;
# to windows-1252's letters: "\x80" would read as "€"; readers drop or replace a
# noncharacter's reference): written as they are in an unquoted attribute value, where
# they end nothing (only white space and ">" do).
_RAW_IN_UNQUOTED = re.compile(
    "[\x80-\x9f\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(1, 17))
    + "]"
).fullmatch
_HTML_SPECIAL = re.compile(r"[&<>\"']")
_HTML_REFS = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
_TAG_OPEN = re.compile(r"<([A-Za-z][A-Za-z0-9:\-]*)")
_TAG_CLOSE = re.compile(r"</[A-Za-z]")
_ATTR = re.compile(r"[^\s\"'>/=]+")
# Elements whose content is JavaScript or CSS up to their end tag (no markup
# inside). (Others, title, textarea, noscript ..., are read as markup: escaped
# as text, whatever a client makes of them.)
_RAW_TEXT = frozenset(["script", "style"])
_AUTHORITY = re.compile(r"\s*(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//[^/?#]*")
_CSS_URL = re.compile(r"url\(\s*['\"]?", re.IGNORECASE)


def url_escape(prefix: str) -> int:
    """The mode of a value in a URL after ``prefix`` (the URL's text before
    it, placeholders as ``x``): ESC_URL at its start, ESC_URLPART in its
    host part, query or fragment, ESC_URLPATH in its path."""
    if not prefix.strip():
        return ESC_URL
    if "?" in prefix or "#" in prefix or _AUTHORITY.fullmatch(prefix):
        return ESC_URLPART
    return ESC_URLPATH


def url_escapes(template: Template) -> tuple[int, ...]:
    """Each placeholder's :func:`html_value` mode in a ``template`` that is a
    URL (a tracked link's target): :func:`url_escape` of where it stands, no
    HTML escaping (0 for ``| raw`` and ``_fs.*``)."""
    modes: list[int] = []
    prefix = ""
    for i, p in enumerate(template.placeholders):
        prefix += template.literals[i]
        modes.append(0 if p.raw or p.name.startswith("_fs.") else url_escape(prefix))
        prefix += "x"
    return tuple(modes)


def _attr_url(attr: str, value: str) -> int:
    """The URL mode of a value at the end of ``value`` in attribute ``attr``."""
    if attr == "srcset":  # "url [descriptor], url [descriptor]"
        cand = value.rsplit(",", 1)[-1].lstrip()
        if cand and (" " in cand or "\t" in cand or "\n" in cand):
            return ESC_URLPART  # in a descriptor
        return url_escape(cand)
    return url_escape(value)


def _css_escape(css: str) -> int:
    """The mode of a value at the end of ``css`` (the CSS before it)."""
    opened = None
    for m in _CSS_URL.finditer(css):
        opened = m
    if opened is not None and ")" not in css[opened.end() :]:
        mode = url_escape(css[opened.end() :])
        return ESC_URL | ESC_CSSURL if mode == ESC_URL else mode
    return ESC_CSS


def html_escapes(template: Template) -> tuple[int, ...]:
    """Each placeholder's :func:`html_value` mode, from where it stands in the
    HTML ``template`` (0: ``| raw``, or fastsend's own ``_fs.*`` values,
    already escaped). A small HTML tokenizer over the literals: text, tags,
    attribute names, quoted and unquoted values, comments, and the raw text
    of ``<script>`` (JavaScript) and ``<style>`` (CSS). The content of an
    Outlook conditional comment (``<!--[if mso]> ... <![endif]-->``) is
    read as markup, as Outlook reads it (a browser ignores it: whatever
    escaping markup takes is no less than a comment's)."""
    modes: list[int] = []
    state = "text"  # text | tag | name | aname | before | dq | sq | uq | comment | raw
    tag = ""  # the current start tag's name (lower case), "" in an end tag
    raw = ""  # in state "raw": the element whose end tag ends it
    attr = ""  # the current attribute's name (lower case)
    value = ""  # its value so far (placeholders as "x")
    content = ""  # a raw text element's content so far
    for i, lit in enumerate(template.literals):
        j, n = 0, len(lit)
        while j < n:
            c = lit[j]
            if state == "text":
                k = lit.find("<", j)
                if k < 0:
                    break
                if lit.startswith("<!--", k):
                    if lit.startswith("<!--[if", k) and (e := lit.find("]>", k)) >= 0:
                        j = e + 2  # Outlook's conditional comment: markup to Outlook
                        continue
                    if lit.startswith(("<!-->", "<!--->"), k):
                        j = k + (5 if lit.startswith("<!-->", k) else 6)  # an empty comment
                        continue
                    state, j = "comment", k + 4
                    continue
                m = _TAG_OPEN.match(lit, k)
                if m is not None:
                    tag = m.group(1).lower()
                else:
                    m = _TAG_CLOSE.match(lit, k)
                    tag = ""
                if m is None:
                    j = k + 1
                    continue
                state, j = "tag", m.end()
                continue
            if state == "raw":
                k = lit.lower().find("</" + raw, j)
                if k < 0:
                    content += lit[j:]
                    break
                state, content = "text", ""
                j = k
                continue
            if state == "comment":
                k = lit.find("-->", j)
                if k < 0:
                    break
                state, j = "text", k + 3
                continue
            if state == "tag":
                if c == ">":
                    state = _after_tag(tag)
                    raw, content = tag, ""
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
                    state = _after_tag(tag)
                    raw, content = tag, ""
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
                    state = _after_tag(tag)
                    raw, content = tag, ""
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
                state = _after_tag(tag)
                raw, content = tag, ""
            else:
                value += c
            j += 1
        if i == len(template.placeholders):
            break
        p = template.placeholders[i]
        if p.raw or p.name.startswith("_fs."):
            modes.append(0)
        else:
            modes.append(_mode(state, lit, attr, value, raw, content))
        if state == "before":
            state = "uq"
        elif state == "aname":
            state = "tag"
        if state in ("uq", "dq", "sq"):
            value += "x"  # (what follows is no longer the value's start)
        elif state == "raw":
            content += "x"
    return tuple(modes)


def _after_tag(tag: str) -> str:
    return "raw" if tag in _RAW_TEXT else "text"


def _mode(state: str, lit: str, attr: str, value: str, raw: str, content: str) -> int:
    """A placeholder's mode where the tokenizer stands (see html_escapes)."""
    if state == "raw":
        if raw == "script":
            return ESC_JS
        if raw == "style":
            return _css_escape(content)
        return ESC_HTML
    mode = ESC_HTML
    if state in ("before", "uq"):
        mode |= ESC_UNQUOTED
    elif state in ("tag", "aname") or (state == "text" and lit.endswith(("<", "</"))):
        return mode | ESC_UNQUOTED | ESC_NAME  # an attribute's place, a tag's name: <{{ x }}
    if state in ("before", "uq", "dq", "sq"):
        if attr.startswith("on"):
            mode |= ESC_JS
        elif attr == "style":
            mode |= _css_escape(value)
        elif attr in _URL_ATTRS:
            mode |= _attr_url(attr, value)
    return mode


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
_PART_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PATH_SAFE = _PART_SAFE | frozenset(b"+@")
# A whole URL in CSS url(): what RFC 3986 allows in a URL but ' and ( ) (an
# unquoted url() ends at space, quote or parenthesis), % kept before two hex digits.
_CSSURL_SAFE = _PART_SAFE | frozenset(b":/?#[]@!$&*+,;=")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_CSS_SAFE = re.compile(r"[A-Za-z0-9 #%.,+\-_/]*")
_CSS_CHARS = " #%.,+-_/"


def percent_encode(value: str, safe: frozenset[int], keep_pct: bool = False) -> str:
    """``value``'s UTF-8 with every octet not in ``safe`` as ``%HH`` (with
    ``keep_pct``, a ``%`` followed by two hex digits is kept)."""
    raw = value.encode("utf-8")
    out: list[str] = []
    n = len(raw)
    for k, b in enumerate(raw):
        if b in safe or (
            keep_pct and b == 37 and k + 2 < n and raw[k + 1] in _HEX and raw[k + 2] in _HEX
        ):
            out.append(chr(b))
        else:
            out.append(f"%{b:02X}")
    return "".join(out)


def js_escape(value: str) -> str:
    """``value`` with every character but ``A-Z a-z 0-9 _ .`` as ``\\uXXXX``
    (UTF-16: a surrogate pair for one past U+FFFF)."""
    out: list[str] = []
    for ch in value:
        if (ch.isascii() and ch.isalnum()) or ch in "_.":
            out.append(ch)
            continue
        o = ord(ch)
        if o > 0xFFFF:
            o -= 0x10000
            out.append(f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}")
        else:
            out.append(f"\\u{o:04x}")
    return "".join(out)


def html_value(value: str, mode: int, name: str = "") -> str:
    """``value`` escaped for an HTML part (``mode``: :func:`html_escapes`'s).
    UnsafeValue for a value starting a URL with a scheme other than http,
    https, mailto, tel or cid, and for a CSS value with more than a colour,
    size or font name needs."""
    if not mode:
        return value
    if mode & ESC_URL and (scheme := url_scheme_unsafe(value)):
        raise UnsafeValue(
            f"the value of {name or 'a variable'!r} starts a link with {scheme!r}:"
            " only http, https, mailto, tel, cid or relative URLs"
        )
    if mode & ESC_JS:
        value = js_escape(value)
    elif mode & ESC_CSS:
        if _CSS_SAFE.fullmatch(value) is None and not all(
            ch.isalnum() or ch in _CSS_CHARS for ch in value
        ):
            raise UnsafeValue(
                f"the value of {name or 'a variable'!r} is in CSS: only letters, digits,"
                " space and # % . , + - _ / (a colour, a size, a font name)"
            )
    elif mode & ESC_URLPART:
        value = percent_encode(value, _PART_SAFE)
    elif mode & ESC_URLPATH:
        # Its '/' kept (a value like "images/logo.png" is a path, as Go's html/template
        # keeps it); no "." or ".." segment (it would climb out of where it stands),
        # and a leading '/' encoded (after a "/" it would make "//": another host).
        segs = value.split("/")
        if "." in segs or ".." in segs:
            raise UnsafeValue(
                f"the value of {name or 'a variable'!r} is {value!r} in a URL's path:"
                " a '.' or '..' segment would climb out of it"
            )
        value = "/".join([percent_encode(s, _PATH_SAFE) for s in segs])
        if value.startswith("/"):
            value = "%2F" + value[1:]
    elif mode & ESC_CSSURL:
        value = percent_encode(value, _CSSURL_SAFE, True)
    if mode & ESC_UNQUOTED:
        safe = "-_" if mode & ESC_NAME else "-._:/"
        if (_NAME_SAFE if mode & ESC_NAME else _UNQUOTED_SAFE).fullmatch(value):
            return value
        return "".join(
            ch
            if (ch.isalnum() and ch.isascii()) or ch in safe or _RAW_IN_UNQUOTED(ch)
            else f"&#x{ord(ch):X};"
            for ch in value
        )
    if not mode & ESC_HTML or _HTML_SPECIAL.search(value) is None:
        return value
    return _HTML_SPECIAL.sub(lambda m: _HTML_REFS[m.group(0)], value)
