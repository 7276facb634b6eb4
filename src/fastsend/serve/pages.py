"""The dashboard's HTML pages, put together once at start from partials.

NAME
    fastsend.serve.pages -- load(name): a file of ``static/``, a page with its includes done.

DESCRIPTION
    The pages of ``static/`` (``dashboard.html``, ``campaign.html``, ``ip.html``)
    share their head, the "Over time" charts section and the rate tables. Each
    shared block is written once, in a partial: a file of ``static/`` whose name
    starts with ``_`` (never served by itself). A page or partial takes one in
    with a server-side include, an HTML comment standing on its own line::

        <!--#include file="_rates_table.html" id="tbl-ip" heading="By source IP" -->

    In the partial, ``{{name}}`` is the include's value of ``name``, and
    ``<!--#if name-->`` ... ``<!--#endif-->`` keeps its text only when that value
    is not empty (no nesting of ifs). Values are markup written in this package
    and go in as they stand: no request data ever reaches a page, which is what
    lets the strict CSP of :mod:`fastsend.serve.dashboard` hold (no inline code).
    A partial may include partials (fields are filled first, so a value can be
    passed on with ``title="{{title}}"``).

    Rendering happens once, when serve starts; the bytes served are as static as
    the files were. A missing partial, a field or if without a value, a bad file
    name or includes nested deeper than ``MAX_DEPTH`` raise :class:`ValueError`
    there (the dashboard tests render every page).

DELIBERATELY NOT HERE
    No template language (loops, expressions, escaping of untrusted values): the
    pages are static and their data arrives later through ``fetch`` and
    ``textContent``. No serving: ``dashboard.py`` and ``charts.py`` do that.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources

__all__ = ["MAX_DEPTH", "load", "render"]

MAX_DEPTH = 4
_INCLUDE = re.compile(r'<!--#include file="([^"]*)"((?:\s+\w+="[^"]*")*)\s*-->\n?')
_ARG = re.compile(r'(\w+)="([^"]*)"')
_IF = re.compile(r"<!--#if (\w+)-->\n?(.*?)<!--#endif-->\n?", re.DOTALL)
_FIELD = re.compile(r"\{\{(\w+)\}\}")
_PARTIAL = re.compile(r"_[a-z0-9_-]+\.html")


def _read(name: str) -> str:
    return (resources.files("fastsend.serve") / "static" / name).read_text("utf-8")


def _value(values: dict[str, str], name: str, where: str) -> str:
    try:
        return values[name]
    except KeyError:
        raise ValueError(f"{where}: no value for {name!r}") from None


def _expand(
    text: str, values: dict[str, str], where: str, depth: int, read: Callable[[str], str]
) -> str:
    text = _FIELD.sub(lambda m: _value(values, m.group(1), where), text)
    text = _IF.sub(lambda m: m.group(2) if _value(values, m.group(1), where) else "", text)

    def include(m: re.Match[str]) -> str:
        name = m.group(1)
        if not _PARTIAL.fullmatch(name):
            raise ValueError(f"{where}: {name!r} is not a partial (_name.html)")
        if depth >= MAX_DEPTH:
            raise ValueError(f"{where}: includes nested deeper than {MAX_DEPTH}")
        body = _expand(read(name), dict(_ARG.findall(m.group(2))), name, depth + 1, read)
        return body if body.endswith("\n") else body + "\n"

    return _INCLUDE.sub(include, text)


def render(name: str, read: Callable[[str], str] = _read) -> bytes:
    """The page ``static/<name>`` with every include done, as UTF-8.

    ``read`` gives a file's text by name (the package's ``static/`` by default).
    """
    return _expand(read(name), {}, name, 0, read).encode("utf-8")


def load(name: str) -> bytes:
    """The bytes to serve for ``static/<name>``: rendered if a page, else as stored."""
    if name.endswith(".html"):
        return render(name)
    return (resources.files("fastsend.serve") / "static" / name).read_bytes()
