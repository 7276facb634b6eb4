"""The text/plain part of a campaign given only as HTML.

A message with an HTML part alone is what spam filters score against
(SpamAssassin's MIME_HTML_ONLY) and what a text-only reader cannot read;
bulk senders give every HTML message a plain-text alternative. When a
campaign has ``html`` and no ``text``, :func:`html_to_text` derives the text
part's template from the HTML template, once, as the campaign is made: the
``{{ }}`` placeholders stay as they are (a text part's values are never
HTML-escaped), the markup becomes lines: blocks and ``<br>`` break lines,
paragraphs and headings are set apart by a blank line, list items start with
"- ", a link shows its URL after its text ("text (URL)"; the URL alone when
it is its text or the link has none, nothing for ``#`` anchors and
``javascript:``), an image its ``alt`` text, ``<hr>`` a rule; ``<head>``,
``<script>``, ``<style>``, comments (Outlook's ``<!--[if mso]>`` blocks
among them) and elements hidden with ``display:none`` (a preheader) are
left out; entities are decoded and runs of spaces made one, except in
``<pre>``. A ``| raw`` placeholder's value (trusted HTML) goes in as it is.
"""

from __future__ import annotations

import re
from html import unescape

from fastsend.message.template import placeholder_spans

__all__ = ["html_to_text"]

# Placeholders are set aside as private-use characters while the HTML is
# read (a placeholder's quotes and braces are not markup) and put back after.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")
_PUA = re.compile(f"[{_OPEN}{_CLOSE}]")
_PIECES = re.compile(f"[^\n{_OPEN}{_CLOSE}]+")  # a line's text between placeholders


def _as_literal(m: re.Match[str]) -> str:
    """A piece of text holding what template.Template or foreign_tag may read
    ("{", "*|") as one literal placeholder; any other as it is."""
    piece = m.group()
    if "{" not in piece and "*|" not in piece:
        return piece
    return '{{ "' + piece.replace("\\", "\\\\").replace('"', '\\"') + '" }}'


_SKIP = frozenset({"head", "script", "style", "template", "title", "noscript", "svg", "object"})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})  # fmt: skip
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "ul",
                        "ol", "dl", "pre", "center", "header", "footer", "section", "article",
                        "address", "figure", "hr"})  # fmt: skip
_LINE = frozenset({"div", "tr", "li", "dt", "dd", "br", "caption", "tbody", "thead", "tfoot",
                   "main", "nav", "aside", "form", "fieldset", "figcaption", "summary",
                   "details", "body", "html"})  # fmt: skip
_CELL = frozenset({"td", "th"})
_HIDDEN = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden|mso-hide\s*:\s*all", re.I)
_SPACE = re.compile(r"[ \t\r\n\f\v\u00a0]+")  # (a no-break space is a space in text)


def html_to_text(source: str) -> str:
    """A text template saying what the HTML template ``source`` says."""
    marks: list[str] = []
    parts: list[str] = []
    pos = 0
    for start, end in placeholder_spans(source):
        parts.append(_PUA.sub("", source[pos:start]))  # (only the marks are these)
        parts.append(f"{_OPEN}{len(marks)}{_CLOSE}")
        marks.append(source[start:end])
        pos = end
    parts.append(_PUA.sub("", source[pos:]))
    reader = _Reader()
    reader.read("".join(parts))
    # Text that could read as template syntax once its entities are decoded
    # (&#123;&#123; is "{{"; a "{" before a placeholder) is written as a literal,
    # each "{" and "*|", so that it is text in the text part too.
    # A line's piece holding either goes in one literal ({{ "..." }}): one a
    # "{" made 200 KB of "{#" 100,000 placeholders to parse, ~7 s on serve's loop.
    text = _PIECES.sub(_as_literal, reader.text())
    return _MARK.sub(lambda m: marks[int(m.group(1))], text)


# One pass of a regex over the markup (html.parser's HTMLParser took ~10x as
# long: a transactional message's text is made per message): a comment, a
# declaration or processing instruction, a tag (its attributes' quoted values
# may hold ">"), text, or a "<" that starts none of them (text).
# A tag runs to its ">" or, unclosed, to the end (as HTML's tokenizer reads it:
# EOF in a tag drops it), a quoted value to its quote or the end: a "<" never
# fails to be a tag after a long scan, to be read again as text from the next
# character ("<p " x 66,000, no ">", made every "<" scan to the end: 200 KB held
# serve's loop over 20 s, a quadratic read).
_TOKEN = re.compile(
    r"<!--.*?(?:-->|\Z)|<![^>]*>?|<\?[^>]*>?"
    r"|<(/?)([A-Za-z][A-Za-z0-9:_-]*)((?:[^>\"']|\"[^\"]*(?:\"|\Z)|'[^']*(?:'|\Z))*)(?:>|\Z)"
    r"|[^<]+|<",
    re.S,
)
_ATTR = re.compile(r"""([^\s=/>"']+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]*))?""")
_RAWTEXT = frozenset({"script", "style", "textarea", "title"})  # no markup inside


def _attrs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in _ATTR.finditer(text):
        v = m.group(2) or ""
        if v[:1] in ("'", '"'):
            v = v[1:-1]
        out.setdefault(m.group(1).lower(), unescape(v))
    return out


class _Reader:
    def __init__(self) -> None:
        self.lines: list[str] = []  # finished lines ("" a blank line)
        self.line: list[str] = []  # the line being written
        self.skip: list[str] = []  # open elements whose content is left out
        self.pre = 0
        self.links: list[tuple[str, int]] = []  # (href, where its text starts in self.line)
        self.lists: list[list[int]] = []  # per open list: [0] unordered, [n] next number

    # -- output
    def _write(self, s: str) -> None:
        if not s:
            return
        if self.pre:
            first, *rest = s.split("\n")
            self.line.append(first)
            for ln in rest:
                self._end_line()
                self.line.append(ln)
            return
        s = _SPACE.sub(" ", s)
        if s.startswith(" ") and self._spaced():
            s = s[1:]
        if s:
            self.line.append(s)

    def _spaced(self) -> bool:
        """Is the line empty so far, or ending in a space?"""
        for piece in reversed(self.line):
            if piece:
                return piece.endswith(" ")
        return True

    def _end_line(self) -> None:
        self.lines.append("".join(self.line).rstrip() if not self.pre else "".join(self.line))
        self.line = []

    def _break(self, blank: bool) -> None:
        if "".join(self.line).strip():
            self._end_line()
        if blank and self.lines and self.lines[-1] != "":
            self.lines.append("")

    def text(self) -> str:
        if self.line:
            self._end_line()
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        while self.lines and self.lines[0] == "":
            self.lines.pop(0)
        out: list[str] = []
        for ln in self.lines:  # at most one blank line in a row
            if ln == "" and out and out[-1] == "":
                continue
            out.append(ln)
        return "\n".join(out) + "\n" if out else ""

    def read(self, html: str) -> None:
        pos, n = 0, len(html)
        while pos < n:
            m = _TOKEN.match(html, pos)
            assert m is not None  # (every position starts one of them)
            pos = m.end()
            name = m.group(2)
            if name is None:
                if not m.group().startswith("<!") and not m.group().startswith("<?"):
                    self.handle_data(unescape(m.group()))
                continue
            tag = name.lower()
            if m.group(1):
                self.handle_endtag(tag)
                continue
            raw = m.group(3)
            attrs = _attrs(raw) if "=" in raw or "hidden" in raw.lower() else {}
            self.handle_starttag(tag, attrs)
            if tag in _RAWTEXT:  # up to its end tag, unread
                end = re.compile(rf"</{tag}\s*>", re.I).search(html, pos)
                if tag in ("textarea", "title") and not self.skip:
                    self.handle_data(unescape(html[pos : end.start() if end else n]))
                pos = end.end() if end else n
                self.handle_endtag(tag)
            elif raw.rstrip().endswith("/") and tag not in _VOID:
                self.handle_endtag(tag)

    # -- events
    def handle_starttag(self, tag: str, a: dict[str, str]) -> None:
        if self.skip:
            if tag == self.skip[-1] and tag not in _VOID:
                self.skip.append(tag)
            return
        if tag in _SKIP or _HIDDEN.search(a.get("style", "")) or "hidden" in a:
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if tag in _PARAGRAPH:
            self._break(not (self.lists and tag in ("ul", "ol")))  # a nested list: no gap
        elif tag in _LINE:
            self._break(False)
        elif tag in _CELL and not self._spaced():
            self.line.append(" ")
        if tag == "pre":
            self.pre += 1
        elif tag in ("ul", "ol"):
            self.lists.append([1 if tag == "ol" else 0])
        elif tag == "li":
            depth = max(len(self.lists) - 1, 0)
            if self.lists and self.lists[-1][0]:
                self.line.append("  " * depth + f"{self.lists[-1][0]}. ")
                self.lists[-1][0] += 1
            else:
                self.line.append("  " * depth + "- ")
        elif tag == "a":
            self.links.append((a.get("href", "").strip(), len(self.line)))
        elif tag == "img":
            alt = _SPACE.sub(" ", a.get("alt", "")).strip()
            if alt:
                self._write(f"[{alt}]")
        elif tag == "hr":
            self.line.append("-" * 20)
            self._break(True)

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            return
        if tag == "a" and self.links:
            href, at = self.links.pop()
            label = "".join(self.line[at:]).strip()
            shown = href.removeprefix("mailto:")
            if href and not href.startswith("#") and not href.lower().startswith("javascript:"):
                if not label:
                    self._write(shown)
                elif label not in (href, shown):
                    self._write(f" ({shown})")
        elif tag == "pre":
            self.pre = max(self.pre - 1, 0)
            self._break(True)
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._break(not self.lists)
        elif tag in _PARAGRAPH:
            self._break(True)
        elif tag in _LINE:
            self._break(False)

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self._write(data)
