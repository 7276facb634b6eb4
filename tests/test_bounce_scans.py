"""The bounce reader's faster scans find what the plain searches they replace
find: the address scan around each "@", the lower-cased ASCII searches, the
newline-led line searches, the classifier's one-scan word set and its
continuation-prefix pattern."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsend.bounce import default_rules, parse, reply, vendors

FRAGMENTS = [
    " ",
    "\n",
    "\t",
    "\n\n",
    "  ",
    "@",
    ".",
    "-",
    ">",
    "<",
    ":",
    ";",
    "\u00e9",
    "\u017f",
    "\u212a",
    "user@example.org",
    "<A.B@Mail.Example.COM>",
    "x@y",
    "mailer-daemon@mx.example.net",
    "550",
    "550-5.1.1 ",
    "452 4.2.2 ",
    "5.7.1",
    "250 ok",
    " 421-",
    "\n550 ",
    "RCPT TO:<a@b.example>",
    ">>> DATA",
    "<<< 550 ",
    "in reply to RCPT TO command",
    "after end of data",
    "does not like recipient",
    "but sender was rejected",
    "greeting",
    "while talking to mx.example.org.:",
    "Remote host said:",
    "SMTP error from remote mail server",
    "----- Original message -----",
    "--- Forwarded Message ---",
    "Begin forwarded message",
    "------ This is a copy of the message, including all the headers. ------",
    "Content-Type: message/rfc822",
    "   ----- Returned mail follows",
    "Original message headers:",
    "Received: from a\n",
    "Message-ID: <m@x>\n",
    "Subject: hi\n",
    "X-Fastsend-Id: abc-1\n",
    "message-id: <LOW@x>\n",
    "To: a@b.example\n",
    " folded\n",
    "From: b@c.example\n",
    "User Unknown",
    "MAILBOX FULL",
    "spamhaus",
    "Rate Limit",
    "rbl",
    "try again later",
]
TEXT = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(TEXT)
def test_address_spans_are_the_pattern_matches(text: str) -> None:
    want = tuple((m.start(1), m.end(1), m.group(1)) for m in vendors.ADDR_RE.finditer(text))
    assert vendors.address_spans.__wrapped__(text) == want


def _find_command_reference(text: str) -> str:
    text = vendors._BLANKS_RE.sub(" ", text)  # a phrase wrapped across lines still names its command
    for pattern, name in vendors._COMMAND_PHRASES:
        if pattern.search(text):
            return name
    sent = vendors._SENT_RE.findall(text)
    if sent:
        verb = sent[-1].upper()
        return {"HELO": "EHLO", "RCPT TO": "RCPT", "MAIL FROM": "MAIL"}.get(verb, verb)
    for ctx in vendors._COMMAND_CONTEXT.finditer(text):
        for pattern, name in vendors._COMMANDS:
            if pattern.search(ctx.group(0)):
                return name
    return ""


@SETTINGS
@given(TEXT, st.sampled_from([str.upper, str.lower, str.title, str.swapcase, str]))
def test_find_command_as_the_case_insensitive_patterns(text: str, case) -> None:
    text = case(text)
    assert vendors.find_command(text) == _find_command_reference(text)


def _cut_reference(text: str) -> str:
    m = vendors._CUT_RE.search(text)
    if m:
        text = text[: m.start()]
    m = vendors._HEADER_RUN.search(text)
    if m:
        return text[: max(0, m.start() - 1)]
    return text


@SETTINGS
@given(TEXT, st.sampled_from([str.upper, str.lower, str]))
def test_cut_original_as_the_line_patterns(text: str, case) -> None:
    text = case(text)
    assert vendors.cut_original.__wrapped__(text) == _cut_reference(text)


@SETTINGS
@given(TEXT, st.sampled_from([str.upper, str.lower, str]))
def test_line_fields_and_forward_text_as_the_patterns(text: str, case) -> None:
    text = case(text)
    for pats, old in (
        (parse._FASTSEND_ID, re.compile(r"(?im)^X-Fastsend-Id:\s*(\S+)")),
        (parse._MESSAGE_ID, re.compile(r"(?im)^Message-I[Dd]:\s*(<[^>\s]+>|\S+)")),
    ):
        m = old.search(text)
        assert parse._line_field(pats, text) == (m.group(1) if m else None)
    assert parse._forward_text(text) == bool(parse._FORWARD_TEXT.search(text))


_OLD_CONT = re.compile(r"(?:(?<=\s)|(?<=^))[245]\d\d[- ](?:[245]\.\d{1,3}\.\d{1,3}\s)?(?=\S)", re.M)


@SETTINGS
@given(TEXT)
def test_continuation_prefixes_as_before(text: str) -> None:
    assert reply._CONT_RE.sub(" ", text) == _OLD_CONT.sub(" ", text)


WORDS = sorted(
    {
        w
        for r in default_rules().rules
        for p in (*r.match, *r.not_match)
        for w in reply._required_literals(p.pattern)
    }
)


# Compiled once for every example (compiling the rules' whole word set is
# what an example used to spend its time on); each example also asks a fresh
# scan, which answers word by word before it compiles.
_COMPILED = reply._WordScan(frozenset(WORDS))
_COMPILED.uses = _COMPILED.COMPILE_AFTER


@SETTINGS
@given(st.lists(st.sampled_from([*WORDS, " ", "x", "-", "un"]), max_size=30).map("".join))
def test_word_scan_finds_every_word_present(text: str) -> None:
    want = {w for w in WORDS if w in text}
    scan = reply._WordScan(frozenset(WORDS))
    assert scan.present(text) == want  # word by word, before compiling
    assert scan.rx is None
    assert _COMPILED.present(text) == want  # compiled
    assert _COMPILED.rx is not None


_HEADER_LINE = re.compile(r"From |[!-9;-~]*:|[ \t]")


def _split_head_by_lines(text: str, pos: int) -> tuple[list[tuple[str, str]], str | None, int]:
    """mime._split_head as it was written line by line (the reference)."""
    headers: list[tuple[str, str]] = []
    unixfrom = None
    name = ""
    value: list[str] = []
    first = True
    n = len(text)
    while pos < n:
        end = text.find("\n", pos)
        nxt = n if end < 0 else end + 1
        line = text[pos : n if end < 0 else end]
        if not line:
            pos = nxt
            break
        if not _HEADER_LINE.match(line):
            break
        pos = nxt
        if line[0] in (" ", "\t"):
            if name:
                value.append("\n" + line)
            first = False
            continue
        if name:
            headers.append((name, "".join(value)))
            name = ""
        if line.startswith("From "):
            if first:
                unixfrom = line
            first = False
            continue
        first = False
        i = line.find(":")
        if i <= 0:
            continue
        name = line[:i]
        value = [line[i + 1 :].lstrip(" \t")]
    if name:
        headers.append((name, "".join(value)))
    return headers, unixfrom, min(pos, n)


HEAD_FRAGMENTS = [
    "Subject: hi\n",
    "To:  a@b\n",
    " folded\n",
    "\tfolded\n",
    " \n",
    "\n",
    "From x y\n",
    "From: z\n",
    "From ",
    ":empty\n",
    "X-A:\n",
    "X-B:   \n",
    "not a header\n",
    "a b: c\n",
    "Content-Type: text/plain;\n",
    "\tcharset=x\n",
    "body\n",
    "Last: line",
    "\u00e9: x\n",
    "X:\t v",
]


@SETTINGS
@given(st.lists(st.sampled_from(HEAD_FRAGMENTS), max_size=14).map("".join), st.integers(0, 3))
def test_split_head_as_line_by_line(text: str, pos: int) -> None:
    from fastsend.bounce import mime

    pos = min(pos, len(text))
    assert mime._split_head(text, pos) == _split_head_by_lines(text, pos)
