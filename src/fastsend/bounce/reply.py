"""Classify one SMTP reply (code, enhanced status, text) into a bounce reason.

The rules are data: ``rules.toml`` shipped next to this module, optionally
preceded by user rule files (same format; their rules are tried first and
their status entries replace the shipped ones). Reasons are named as Sisimai
names them ("userunknown", "mailboxfull", "blocked", ...), and ``hard`` follows
Sisimai's meaning: true only where the address itself can never receive
(userunknown, hostunknown, hasmoved, and notaccept unless the reply was a
4xx). A permanent 5xx for policy, content or reputation is *not* hard. A
synchronous 4xx reply (classify_reply) and a DSN whose Action is
"delayed" are never hard: delivery is still being retried. (A DSN with
Action: failed whose last reply was "450 4.1.1 user unknown" is hard, as
Sisimai counts it: the reporting MTA gave up on an unknown user.)

Evidence is read in a fixed order (see the header of rules.toml): the status
class and the refused SMTP stage gate the rules; then a provider's or an
MTA's documented code or fixed text (tier "provider", each rule with a
``ref``); then phrases naming a specific reason; then the RFC 3463 status
table; then broad phrases and stage-only rules; then fallbacks.

The classification also says whether the reply is a "slow down" signal
(``rate_limited``) or an "your IP is listed/blocked" signal (``ip_blocked``)
for the feedback loops of the delivery side. A temporary (4xx) refusal whose
reason comes from its status code or refused stage alone (a generic 4.7.1, a
421 at the greeting) is ``ip_blocked`` only when its words are about the IP:
greylisting, a busy server and a policy check answer the same way. A rule
may name its own signal: "ratelimit" is then the whole answer (a documented
throttle such as Microsoft's 4.7.500 or Yahoo's [TSS04] slows down and never
rests the IP), "none" drives neither (greylisting, a refused HELO name, a
TCP connection refused before any reply).

This module does no I/O except reading rule files, and never decides what to
do about a reply (retry, suppress, rest an IP): callers do.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import msgspec

from fastsend.config.base import read_toml
from fastsend.faults import FAULT, countdown

# Reasons where the address itself can never receive (Sisimai's hard bounce).
HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved"})
# Reasons that are not failures at all.
NOT_BOUNCES = frozenset({"delivered", "feedback", "vacation"})
# Reasons that, by themselves, mean "sending too fast" / "this IP is refused".
RATE_REASONS = frozenset({"speeding", "toomanyconn"})
IPBLOCK_REASONS = frozenset({"blocked", "badreputation", "requireptr"})
# Reasons about one mailbox (or its domain), not about how we send to the site.
MAILBOX_REASONS = frozenset(
    {"userunknown", "hostunknown", "hasmoved", "mailboxfull", "suspend", "mesgtoobig"}
)
# Reasons that say an address or its domain cannot receive. Said in reply to
# MAIL FROM they are about our envelope sender (RFC 5321 3.3: that reply
# judges the reverse-path; RFC 7504 3: a 556 there names the sender's domain;
# Exim's failed sender verification ends "Unrouteable address"): the sender
# was refused ("rejected"), and nothing is known of any recipient.
SENDER_STAGE_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved", "notaccept"})

# Stages of a session before any transaction (classify_reply's names): a
# refusal there is about the client or the site, no recipient is named yet.
SESSION_STAGES = frozenset({"CONN", "EHLO", "STARTTLS", "TLS", "AUTH"})
# The stages a reply can answer, as classify sees them (what the reader's
# find_command and a delivery Outcome's stage name, after STAGE_ALIASES; ""
# when nothing says which).
STAGES = frozenset({*SESSION_STAGES, "MAIL", "RCPT", "DATA", "RSET", "QUIT", ""})
# Other names of those stages: an Outcome's ("greeting", "helo", "bdat") and
# the commands as written ("RCPT TO", "MAIL FROM", LMTP's "LHLO").
STAGE_ALIASES = {
    "CONNECT": "CONN",
    "GREETING": "CONN",
    "HELO": "EHLO",
    "LHLO": "EHLO",
    "BDAT": "DATA",
    "MAIL FROM": "MAIL",
    "RCPT TO": "RCPT",
}


def stage_name(command: str) -> str:
    """``command`` as a stage name of STAGES (or upper-cased as given)."""
    stage = " ".join((command or "").upper().replace(":", " ").split())
    return STAGE_ALIASES.get(stage, stage)


# RFC 3463 statuses (after the class digit) about our sender's address.
_SENDER_STATUSES = frozenset({".1.7", ".1.8"})

TIERS = ("provider", "strong", "weak")
SIGNALS = ("ratelimit", "ipblock")
# A rule's own signal: one of SIGNALS (the reply drives that feedback loop,
# whatever its reason), or "none" (it drives neither: a greylisting deferral
# is retried from the same IP, RFC 6647, and says nothing about the IP).
RULE_SIGNALS = (*SIGNALS, "none")
_ENHANCED_RE = re.compile(r"([245])(?<!\w[245])\.(\d{1,3})\.(\d{1,3})\b")  # (\b first: 3x slower)
# Continuation prefixes of multi-line replies ("550-5.7.1 ") inside the text.
# (At a line start or after a blank: the digit first, then "not after a
# non-blank", so the engine skips ahead to the digits 2, 4 and 5.)
_CONT_RE = re.compile(r"[245](?<![^\s][245])\d\d[- ](?:[245]\.\d{1,3}\.\d{1,3}\s)?(?=\S)")


# Rules see at most this much of a reply text. An SMTP reply line is at most
# 512 octets (RFC 5321 4.5.3.1.5); a multi-line reply or the explanation of a
# free-text bounce fits easily. The cap makes every rule's cost per message
# bounded whatever its regular expression, however large the bounce.
MAX_TEXT = 8192
_MEMO_SIZE = 2048


def normalize_text(text: str) -> str:
    """The reply text as rules see it: continuation prefixes dropped, whitespace
    collapsed, lower case, at most MAX_TEXT characters."""
    # (" ".join(split()): what re.sub(r"\s+", " ", ...).strip() gives, 2x faster)
    return " ".join(_CONT_RE.sub(" ", (text or "")[: 2 * MAX_TEXT]).split()).lower()[:MAX_TEXT]


class RuleError(ValueError):
    """A rule file is malformed (bad TOML, unknown key, bad regex, ...)."""


class Classification(msgspec.Struct, frozen=True):
    """What a reply means for the recipient and for the sending IP.

    ``reason`` is a Sisimai reason name; ``hard`` is true only when the address
    can never receive; ``soft`` is true for every other failure (retrying
    later or from elsewhere may work); neither is true for "delivered",
    "feedback" and "vacation". ``permanent`` says the reply itself was a 5xx.
    ``rule`` names the rule that decided (for debugging rule files).
    """

    reason: str
    hard: bool
    soft: bool
    permanent: bool = False
    rate_limited: bool = False
    ip_blocked: bool = False
    rule: str = ""


class Rule(msgspec.Struct, frozen=True):
    """One rule of a rule file (see the header of rules.toml)."""

    id: str
    reason: str
    match: tuple[re.Pattern[str], ...] = ()
    not_match: tuple[re.Pattern[str], ...] = ()
    codes: frozenset[int] = frozenset()
    status: tuple[str, ...] = ()
    not_status: tuple[str, ...] = ()
    commands: frozenset[str] | None = None
    tier: str = "strong"
    signal: str = ""
    ref: str = ""

    def applies(self, text: str, code: int, enhanced: str, command: str) -> bool:
        if self.codes and code not in self.codes:
            return False
        if self.status and not any(
            enhanced == s or (s.endswith(".") and enhanced.startswith(s)) for s in self.status
        ):
            return False
        if self.not_status and any(
            enhanced == s or (s.endswith(".") and enhanced.startswith(s)) for s in self.not_status
        ):
            return False
        if self.commands is not None and command not in self.commands:
            return False
        if self.match and not _any_search(self.match, text):
            return False
        return not (self.not_match and _any_search(self.not_match, text))


def _any_search(patterns: tuple[re.Pattern[str], ...], text: str) -> bool:
    return _search_prepared(_prepared(patterns), text)


def _prepared(patterns: tuple[re.Pattern[str], ...]) -> _Prepared:
    # Keyed by identity: hashing a tuple of patterns rehashes every pattern on
    # every call. The entry keeps the tuple alive, so its id is not reused.
    entry = _PREPARED.get(id(patterns))
    if entry is not None and entry[0] is patterns:
        return entry[1]
    return _prepare(patterns)


def _search_prepared(prepared: _Prepared, text: str) -> bool:
    """Any of the prepared patterns found in ``text`` (see _prepare)."""
    gate, items = prepared
    if gate is not None:
        # Every pattern has required words: none present, none can match.
        for lit in gate:
            if lit in text:
                break
        else:
            return False
    for p, lits in items:
        if lits:
            for lit in lits:
                if lit in text:
                    break
            else:
                continue  # none of its required words is in the text
        if p.search(text) is not None:
            return True
    return False


_Prepared = tuple[tuple[str, ...] | None, tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]]
_PREPARED: dict[int, tuple[tuple[re.Pattern[str], ...], _Prepared]] = {}

# _Prepared with the required words as sets, tested against the set of the
# words present in a text (found by one scan, see _WordScan) rather than one
# substring search per word.
_Gated = tuple[frozenset[str] | None, tuple[tuple[re.Pattern[str], frozenset[str] | None], ...]]


def _gated(prepared: _Prepared) -> _Gated:
    gate, items = prepared
    return (
        None if gate is None else frozenset(gate),
        tuple((p, frozenset(lits) if lits else None) for p, lits in items),
    )


def _search_gated(gated: _Gated, text: str, present: set[str]) -> bool:
    """As _search_prepared, ``present`` being the required words in ``text``."""
    gate, items = gated
    if gate is not None and gate.isdisjoint(present):
        return False  # every pattern has required words: none present, none can match
    for p, lits in items:
        if lits is not None and lits.isdisjoint(present):
            continue  # none of its required words is in the text
        if p.search(text) is not None:
            return True
    return False


class _WordScan:
    """Which of a fixed set of words occur in a text, in one regex scan.

    The words go into a trie-shaped pattern inside a look-ahead, so the scan
    stops at every position and reports the longest word starting there;
    every other word starting there is a prefix of it (``covers``). One
    per set of words (the rules' required words, lower case as the rules'
    text is), shared. Compiling the pattern costs about as much as 500
    texts searched word by word, so the first texts are searched word by
    word: a process that classifies a few replies never compiles it."""

    COMPILE_AFTER = 200

    def __init__(self, words: frozenset[str]) -> None:
        self.words = tuple(sorted(words))
        self.rx: re.Pattern[str] | None = None
        # The same for ASCII text (most replies), without the words it cannot
        # hold: each word's first letter is one more branch tried at every
        # position of the scan (non-ASCII words made it ~40% slower).
        self.ascii_words = tuple(w for w in self.words if w.isascii())
        self.ascii_rx: re.Pattern[str] | None = None
        self.covers: dict[str, tuple[str, ...]] = {}
        self.uses = 0

    def _compile(self) -> re.Pattern[str]:
        _compiling()
        self.ascii_rx = self._trie(self.ascii_words)
        self.rx = self._trie(self.words)
        return self.rx

    def _trie(self, word_list: tuple[str, ...]) -> re.Pattern[str]:
        words = set(word_list)
        trie: dict[str, Any] = {}
        for w in words:
            node = trie
            for ch in w:
                node = node.setdefault(ch, {})
            node[""] = {}
        self.covers.update(
            {w: tuple(w[:i] for i in range(1, len(w) + 1) if w[:i] in words) for w in words}
        )
        return re.compile("(?=(" + self._source(trie) + "))", re.DOTALL)

    @classmethod
    def _source(cls, node: dict[str, Any]) -> str:
        alts = [re.escape(ch) + cls._source(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    def present(self, text: str) -> set[str]:
        """The words that occur in ``text``."""
        rx = self.rx
        if rx is None:
            self.uses += 1
            if self.uses <= self.COMPILE_AFTER:
                return {w for w in self.words if w in text}
            rx = self._compile()
        if text.isascii():
            rx = self.ascii_rx or rx
        found: set[str] = set()
        covers = self.covers
        for m in rx.finditer(text):
            found.update(covers[m.group(1)])
        return found


_SCANS: dict[frozenset[str], _WordScan] = {}


def _word_scan(words: frozenset[str]) -> _WordScan:
    scan = _SCANS.get(words)
    if scan is None:
        scan = _WordScan(words)
        if len(_SCANS) < 64:
            _SCANS[words] = scan
    return scan


def _words_of(gated: _Gated | None) -> set[str]:
    if gated is None:
        return set()
    out = set(gated[0] or ())
    for _, lits in gated[1]:
        out |= lits or set()
    return out


# A rule's conditions laid out for RuleSet's loop (the same tests as
# Rule.applies, in the same order): codes, exact statuses, status prefixes,
# the same two for not_status, commands, gated match and not_match.
_Entry = tuple[
    Rule,
    frozenset[int],
    frozenset[str],
    tuple[str, ...],
    frozenset[str],
    tuple[str, ...],
    "frozenset[str] | None",
    "_Gated | None",
    "_Gated | None",
]


def _entry(rule: Rule) -> _Entry:
    return (
        rule,
        rule.codes,
        frozenset(s for s in rule.status if not s.endswith(".")),
        tuple(s for s in rule.status if s.endswith(".")),
        frozenset(s for s in rule.not_status if not s.endswith(".")),
        tuple(s for s in rule.not_status if s.endswith(".")),
        rule.commands,
        _gated(_prepared(rule.match)) if rule.match else None,
        _gated(_prepared(rule.not_match)) if rule.not_match else None,
    )


# A tier's entries with the index that skips, without looking at them, the
# rules whose every pattern needs a word the text lacks: word -> positions of
# the rules needing it, and the positions of the rules that need none.
_Indexed = tuple[list[_Entry], dict[str, list[int]], list[int]]


def _indexed(entries: list[_Entry]) -> _Indexed:
    index: dict[str, list[int]] = {}
    always: list[int] = []
    for i, e in enumerate(entries):
        gate = e[7][0] if e[7] is not None else None
        if gate is None:
            always.append(i)
            continue
        for word in gate:
            index.setdefault(word, []).append(i)
    return entries, index, always


def _first_rule(
    tier: _Indexed, t: str, present: set[str], code: int, enhanced: str, command: str
) -> Rule | None:
    """The first rule of the tier that applies (as Rule.applies decides;
    ``enhanced`` is empty or a whole status code, never a prefix). Only the
    rules a word of ``present`` can satisfy, and those needing no word, are
    looked at (the rest cannot match: their gate is disjoint from it), in
    file order."""
    entries, index, always = tier
    picked = set(always)
    for word in present:
        hit = index.get(word)
        if hit is not None:
            picked.update(hit)
    for i in sorted(picked):
        rule, codes, st, st_pre, nst, nst_pre, commands, match, not_match = entries[i]
        if codes and code not in codes:
            continue
        if (st or st_pre) and not (enhanced in st or enhanced.startswith(st_pre)):
            continue
        if (nst or nst_pre) and (enhanced in nst or enhanced.startswith(nst_pre)):
            continue
        if commands is not None and command not in commands:
            continue
        if match is not None and not _search_gated(match, t, present):
            continue
        if not_match is not None and _search_gated(not_match, t, present):
            continue
        return rule
    return None


def _prepare(
    patterns: tuple[re.Pattern[str], ...],
) -> tuple[tuple[str, ...] | None, tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]]:
    items = tuple((p, _required_literals(p.pattern)) for p in patterns)
    gate = None
    if all(lits for _, lits in items):
        gate = tuple(dict.fromkeys(lit for _, lits in items for lit in lits))
    out = (gate, items)
    if len(_PREPARED) < 10_000:
        _PREPARED[id(patterns)] = (patterns, out)
    return out


_QUANT = frozenset("?*+{")
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789 '\"-_,;:/=<>!@%&~`")

try:  # the characters re's case-insensitive matching pairs beyond lower/upper
    from re._casefix import _EXTRA_CASES as _CASEFIX  # Python >= 3.11

    _FOLDS_ODDLY = frozenset(chr(c) for k, v in _CASEFIX.items() for c in (k, *v) if c > 0x7F)
    _CASED_OK = True
except ImportError:  # pragma: no cover - another interpreter: caseless letters only
    _FOLDS_ODDLY = frozenset()
    _CASED_OK = False


def _plain_letter(c: str) -> bool:
    """A non-ASCII letter a case-insensitive pattern matches only as itself in
    lower-cased text (a literal for the prefilter): a caseless letter (CJK,
    kana, Hangul), or a lower-case one (Cyrillic, accented Latin) that no
    other character folds to ("в" also matches U+1C80: not plain)."""
    if c.isascii() or not c.isalpha() or c != c.lower() or c in _FOLDS_ODDLY:
        return False
    return _CASED_OK or c == c.upper()


def _long_enough(lit: str) -> bool:
    """A literal selective enough to index a pattern by: three characters, or
    two non-ASCII letters (a CJK word is often two, "用户", "宛先"; two
    Cyrillic letters are as rare in the mostly English replies)."""
    lit = lit.strip()
    return len(lit) >= 3 or (len(lit) == 2 and not lit.isascii() and lit.isalpha())


def _split_top(pattern: str) -> list[str] | None:
    """The top-level alternatives of a pattern, or None when it cannot tell."""
    out, depth, cls, i, start = [], 0, False, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if cls:
            cls = c != "]"
        elif c == "[":
            cls = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    if depth != 0 or cls:
        return None
    out.append(pattern[start:])
    return out


def _class_end(branch: str, i: int) -> int:
    """The index after the character class that starts at ``branch[i]`` ("[")."""
    n, j = len(branch), i + 1
    if j < n and branch[j] == "^":
        j += 1
    if j < n and branch[j] == "]":
        j += 1
    while j < n and branch[j] != "]":
        j += 2 if branch[j] == "\\" else 1
    return j + 1


def _group_end(branch: str, i: int) -> tuple[int, int]:
    """The index after the group that starts at ``branch[i]`` ("("), and the
    nesting level left open there (0 unless the group is never closed)."""
    n, level, j = len(branch), 1, i + 1
    while j < n and level:
        if branch[j] == "\\":
            j += 2
            continue
        if branch[j] == "[":
            j += 1
            while j < n and branch[j] != "]":
                j += 2 if branch[j] == "\\" else 1
        elif branch[j] == "(":
            level += 1
        elif branch[j] == ")":
            level -= 1
        j += 1
    return j, level


def _prefix_literal(branch: str) -> str:
    """The longest literal run at the top level of ``branch`` ("" if none):
    text that every match of the branch contains."""
    best, run = "", list[str]()
    i, n = 0, len(branch)
    while i < n:
        c = branch[i]
        if c == "\\" and i + 1 < n and not branch[i + 1].isalnum():
            ch, step = branch[i + 1], 2
        elif c.lower() in _PLAIN or _plain_letter(c):
            ch, step = c.lower(), 1
        else:
            # Not a literal: end the run, skip a group or a class whole.
            if len("".join(run).strip()) > len(best.strip()):
                best = "".join(run)
            run = []
            if c == "\\":
                i += 2
            elif c == "{":
                j = branch.find("}", i)
                i = n if j < 0 else j + 1
            elif c == "[":
                i = _class_end(branch, i)
            elif c == "(":
                i = _group_end(branch, i)[0]
            else:
                i += 1
            continue
        if i + step < n and branch[i + step] in _QUANT:
            # This character is optional or repeated: the run ends before it.
            if len("".join(run).strip()) > len(best.strip()):
                best = "".join(run)
            run = []
            i += step
            continue
        run.append(ch)
        i += step
    if len("".join(run).strip()) > len(best.strip()):
        best = "".join(run)
    return best


def _group_literals(branch: str, depth: int = 0) -> tuple[str, ...]:
    """Words one of which every match of ``branch`` contains, taken from a
    group that every match goes through (not optional, not repeated, not a
    lookaround): one word of each of its alternatives. () if there is none.

    ``(?:invalid|bogus) (?:sender|mail from)`` -> ("invalid", "bogus")."""
    if depth > 4:
        return ()
    best: tuple[str, ...] = ()
    i, n = 0, len(branch)
    while i < n:
        c = branch[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = _class_end(branch, i)
            continue
        if c != "(":
            i += 1
            continue
        j, level = _group_end(branch, i)
        if level:
            return ()
        inner = branch[i + 1 : j - 1]
        i = j
        if j < n and branch[j] in _QUANT:
            continue  # optional or repeated: not every match has it
        if inner.startswith("?:"):
            inner = inner[2:]
        elif inner.startswith("?P<") and ">" in inner:
            inner = inner[inner.index(">") + 1 :]
        elif inner.startswith("?"):
            continue  # a lookaround, a flag group, a back reference
        alts = _split_top(inner)
        if not alts:
            continue
        words: list[str] = []
        for alt in alts:
            lit = _prefix_literal(alt)
            if _long_enough(lit):
                words.append(lit)
                continue
            sub = _group_literals(alt, depth + 1)
            if not sub:
                break
            words.extend(sub)
        else:
            cand = tuple(dict.fromkeys(words))
            if not best or min(len(w.strip()) for w in cand) > min(len(w.strip()) for w in best):
                best = cand
    return best


def _required_literals(pattern: str) -> tuple[str, ...]:
    """Words one of which any match must contain (a prefilter), or () if unknown.

    Each top-level alternative gives its longest literal run, or, when it
    has none of three letters or more, one word of each alternative of a
    group every match goes through; so the answer is conservative: a pattern
    is skipped only when it cannot match."""
    branches = _split_top(pattern)
    if not branches:
        return ()
    lits: list[str] = []
    for b in branches:
        lit = _prefix_literal(b)
        if _long_enough(lit):
            lits.append(lit)
            continue
        words = _group_literals(b)
        if not words:
            return ()
        lits.extend(words)
    return tuple(dict.fromkeys(lits))


def _compile(patterns: Any, where: str) -> tuple[re.Pattern[str], ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise RuleError(f"{where}: expected a list of regular expressions")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise RuleError(f"{where}: bad regular expression {p!r}: {e}") from None
    return tuple(out)


_RULE_KEYS = {
    "id",
    "reason",
    "match",
    "match_from",
    "not_match",
    "codes",
    "status",
    "not_status",
    "commands",
    "tier",
    "signal",
    "ref",
}
_STATUS_PREFIX = re.compile(r"[245](\.\d{1,3}){0,2}\.?")


def _status_list(d: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(
        isinstance(s, str) and _STATUS_PREFIX.fullmatch(s) for s in v
    ):
        raise RuleError(f"{where}: {key!r} must be a list like ['5.7.', '4.2.2']")
    return tuple(v)


_REASON_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def _is_reason(v: Any) -> TypeGuard[str]:
    """A reason name: one lowercase word ("userunknown", a file's own "my-reason")."""
    return isinstance(v, str) and _REASON_NAME.fullmatch(v) is not None


def _parse_rule(d: Any, where: str, known: dict[str, Rule]) -> Rule:
    if not isinstance(d, dict):
        raise RuleError(f"{where}: a rule must be a table")
    unknown = set(d) - _RULE_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    reason = d.get("reason")
    if not _is_reason(reason):
        raise RuleError(f"{where}: 'reason' must be a lowercase word, got {reason!r}")
    tier = d.get("tier", "strong")
    if tier not in TIERS:
        raise RuleError(f"{where}: 'tier' must be one of {TIERS}, got {tier!r}")
    signal = d.get("signal", "")
    if signal and signal not in RULE_SIGNALS:
        raise RuleError(f"{where}: 'signal' must be one of {RULE_SIGNALS}, got {signal!r}")
    codes = d.get("codes", [])
    if not isinstance(codes, list) or not all(
        isinstance(c, int) and (c == 0 or 200 <= c <= 599) for c in codes
    ):
        # (0: the text names no reply code, as in a report's own sentence.)
        raise RuleError(f"{where}: 'codes' must be a list of reply codes (200-599, or 0: none)")
    status = _status_list(d, "status", where)
    commands = d.get("commands")
    if commands is not None and (
        not isinstance(commands, list) or not all(isinstance(c, str) for c in commands)
    ):
        raise RuleError(f"{where}: 'commands' must be a list of SMTP command names")
    if commands is not None:
        # As classify sees them: a rule naming HELO or BDAT matched no reply
        # (classify_reply reads them as EHLO and DATA), nor did "RCPT TO".
        commands = [stage_name(c) for c in commands]
        bad = [c for c in commands if c not in STAGES]
        if bad:
            raise RuleError(
                f"{where}: unknown command(s) {', '.join(map(repr, bad))} in 'commands';"
                f' expected some of {", ".join(sorted(c for c in STAGES if c))} or ""'
            )
    match = _compile(d.get("match"), where)
    if "match_from" in d:
        # Reuse (and extend) the patterns of an earlier rule of the same file.
        base = known.get(str(d["match_from"]))
        if base is None:
            raise RuleError(f"{where}: match_from names no earlier rule: {d['match_from']!r}")
        match = base.match + match
    if not match and not codes and not status:
        raise RuleError(f"{where}: a rule needs 'match', 'codes' or 'status'")
    return Rule(
        id=str(d.get("id", reason)),
        reason=reason,
        match=match,
        not_match=_compile(d.get("not_match"), where),
        codes=frozenset(codes),
        status=status,
        not_status=_status_list(d, "not_status", where),
        commands=None if commands is None else frozenset(commands),
        tier=tier,
        signal=signal,
        ref=str(d.get("ref", "")),
    )


@dataclass
class RuleSet:
    """An ordered set of rules plus the status table; see rules.toml."""

    rules: list[Rule] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)
    weak: frozenset[str] = frozenset()
    signals: dict[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)
    # (code, status, text, command, action) -> (reason, rule id): the recipients
    # of one bounce often share a reply text; bounded, cleared when full.
    _memo: dict[tuple[int, str, str, str, str], Classification] = field(
        default_factory=dict, repr=False, compare=False
    )
    # tier -> its rules in order (as _entry lays them out), built on first
    # use (``rules`` is not changed after construction: ``extended`` makes a
    # new RuleSet); with "<signal name>" -> its prepared patterns.
    _tiers: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "<rules>") -> RuleSet:
        unknown = set(d) - {"rule", "status", "weak", "signals"}
        if unknown:
            raise RuleError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}")
        raw_rules = d.get("rule", [])
        if not isinstance(raw_rules, list):
            raise RuleError(f"{where}: 'rule' must be an array of tables ([[rule]])")
        rules: list[Rule] = []
        known: dict[str, Rule] = {}
        for i, r in enumerate(raw_rules):
            rule = _parse_rule(r, f"{where}: rule #{i + 1}", known)
            known[rule.id] = rule
            rules.append(rule)
        status = d.get("status", {})
        if not isinstance(status, dict) or not all(
            isinstance(k, str) and _ENHANCED_RE.fullmatch(k) and _is_reason(v)
            for k, v in status.items()
        ):
            raise RuleError(f'{where}: [status] maps codes like "5.1.1" to reason names')
        weak_table = d.get("weak", {})
        if not isinstance(weak_table, dict) or set(weak_table) - {"reasons"}:
            raise RuleError(f"{where}: [weak] holds one key, reasons")
        weak = weak_table.get("reasons", [])
        if not isinstance(weak, list) or not all(_is_reason(r) for r in weak):
            # (A string would have been read as its letters.)
            raise RuleError(f"{where}: [weak] reasons must be a list of reason names")
        raw_signals = d.get("signals", {})
        if not isinstance(raw_signals, dict):
            raise RuleError(f"{where}: [signals] maps {' / '.join(SIGNALS)} to regular expressions")
        signals = {
            name: _compile(pats, f"{where}: signals.{name}") for name, pats in raw_signals.items()
        }
        for name in signals:
            if name not in SIGNALS:
                raise RuleError(f"{where}: unknown signal {name!r}; expected one of {SIGNALS}")
        return cls(rules=rules, status=dict(status), weak=frozenset(weak), signals=signals)

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        """Read one rule file; RuleError (naming the file) on any problem."""
        return cls.from_dict(read_toml(path, "rule file", RuleError), str(path))

    @classmethod
    def default(cls) -> RuleSet:
        _compiling()
        # Beside this module (not through importlib.resources: see config.shaping).
        with open(os.path.join(os.path.dirname(__file__), "rules.toml"), encoding="utf-8") as f:
            text = f.read()
        return cls.from_dict(tomllib.loads(text), "fastsend/bounce/rules.toml")

    def extended(self, *others: RuleSet) -> RuleSet:
        """A new RuleSet where ``others`` (earlier first) take precedence over self."""
        rules: list[Rule] = []
        status = dict(self.status)
        weak = set(self.weak)
        signals = dict(self.signals)
        for o in others:
            rules.extend(o.rules)
            weak |= o.weak
            for k, v in o.signals.items():
                signals[k] = v + signals.get(k, ())
        for o in reversed(others):
            status.update(o.status)
        return RuleSet(rules + self.rules, status, frozenset(weak), signals)

    def classify(
        self,
        code: int,
        enhanced: str,
        text: str,
        *,
        command: str = "",
        action: str = "",
    ) -> Classification:
        """Classify one reply; see the module docstring and rules.toml."""
        key = (code, enhanced or "", text or "", command or "", action or "")
        hit = self._memo.get(key)
        if hit is None:
            hit = self._classify(code, enhanced, text, command, action)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def _classify(
        self, code: int, enhanced: str, text: str, command: str, action: str
    ) -> Classification:
        enhanced = (enhanced or "").strip()
        if enhanced and not _ENHANCED_RE.fullmatch(enhanced):
            m = _ENHANCED_RE.search(enhanced)
            enhanced = m.group(0) if m else ""
        t = normalize_text(text)
        if not enhanced:
            m = _ENHANCED_RE.search(text[: 2 * MAX_TEXT])
            if m and (not code or m.group(1) == str(code)[0]):
                enhanced = m.group(0)
        command = stage_name(command)
        tiers = self._tiers or self._build_tiers()
        present = tiers["<scan>"].present(t)
        reason, rule_id, signal = self._reason(code, enhanced, t, present, command, action)
        if reason in SENDER_STAGE_REASONS and (
            command == "MAIL" or enhanced[1:] in _SENDER_STATUSES
        ):
            # Whatever the words ("Domain does not exist", "Unrouteable
            # address", "Invalid domain"), a refused MAIL FROM is about our
            # sender: as hard, it would suppress every recipient of the
            # transaction, none of whom the server had been told of. So is a
            # reply whose status names the sender's address (RFC 3463 X.1.7
            # "Bad sender's mailbox address syntax", X.1.8 "Bad sender's
            # system address": "550 5.1.8 Domain not found" at RCPT, as
            # Postfix's reject_unknown_sender_domain answers by default).
            reason = "rejected"
        elif command in SESSION_STAGES and reason in MAILBOX_REASONS:
            # Nor can a refusal before MAIL ("550 5.1.1" to EHLO, a 552 greeting)
            # be about one mailbox, none named yet: the site refused the
            # session (the client, its name or address), never a hard bounce
            # (it suppressed every recipient of the batch). (A host saying it
            # takes no mail at all, RFC 7504's 521, stays notaccept.)
            reason = "rejected"
        klass = enhanced[:1] if enhanced else (str(code)[0] if code else "")
        # The reason came from the status code or the refused stage alone:
        # no words in the reply say what was refused.
        bare = rule_id in ("status", "fallback") or rule_id in self._bare_rules()
        permanent = klass == "5"
        hard = reason in HARD_REASONS or (reason == "notaccept" and klass != "4")
        if action in ("delayed", "relayed", "delivered", "expanded"):
            # Not a final failure: the reporting MTA still retries (or it worked).
            hard = False
        soft = not hard and reason not in NOT_BOUNCES
        if signal == "none":
            return Classification(reason, hard, soft, permanent, False, False, rule_id)
        if signal == "ratelimit":
            # The rule names a throttle (Microsoft's 4.7.500-699 "server busy /
            # rate limited due to IP reputation", Yahoo's [TSS04]): slowing
            # down is the documented remedy; resting the IP is not asked for.
            return Classification(reason, hard, soft, permanent, True, False, rule_id)
        rate = reason in RATE_REASONS or signal == "ratelimit"
        # A temporary refusal whose reason is only its status or stage (a
        # generic 4.7.1, a 421 at the greeting) says nothing about the IP:
        # greylisting, a busy server and a policy check answer the same.
        # Only words about the IP make it a block then.
        # (The reply's own code says whether it was temporary: Postfix files a
        # 554 greeting under a 4.7.1 status, as it goes on to the next MX.)
        temporary = 400 <= code < 500 if code else klass == "4"
        ipb = signal == "ipblock" or (reason in IPBLOCK_REASONS and not (bare and temporary))
        if not rate and reason not in MAILBOX_REASONS and not _ONE_MAILBOX.search(t):
            # (A refusal about one mailbox, "Mailbox full, try again later",
            # is not the site asking us to slow down: its "try again later"
            # is the usual suffix of a 4xx. Nor is one whose words say one
            # mailbox is busy, locked or receiving too fast, whatever its
            # status made the reason: "450 4.2.1 Recipient is receiving too
            # many messages", "451 Mailbox temporarily unavailable, try again
            # later" slowed all mail to the site for one recipient. A rule
            # naming a throttle still says so with its own signal.)
            gated = tiers["<ratelimit>"]
            rate = gated is not None and _search_gated(gated, t, present)
            if not rate and _TRY_LATER in t:
                # The usual suffix of a 4xx. Under a policy status (X.7.x,
                # RFC 3463 "delivery not authorized") it asks for a retry, not
                # a slower pace: greylisting (RFC 6647) and a filter's soft
                # reject answer "451 4.7.1 Please try again later"; cutting the
                # site's rate for them slowed all its mail. So with no status
                # saying what failed (none, or the undefined X.0.0): OpenBSD
                # spamd greylists with "451 Temporary failure, please try
                # again later". A 421 (the server closing the channel) or a
                # status naming the system or the network (X.3, X.4): the
                # site sheds load.
                rate = (
                    code == 421
                    or not temporary
                    or (enhanced[1:] not in ("", ".0.0") and enhanced[1:4] != ".7.")
                )
        if not ipb:
            gated = tiers["<ipblock>"]
            ipb = gated is not None and _search_gated(gated, t, present)
            if ipb and reason == "rejected" and not _NAMES_THE_CLIENT.search(t):
                # A block list of addresses ("Your email address has been
                # blacklisted", "sending to/from an address that has been
                # blacklisted"): our sender is refused, from any IP. Resting
                # this IP for the site held every other sender's mail there.
                ipb = False
        return Classification(reason, hard, soft, permanent, rate, ipb, rule_id)

    def _bare_rules(self) -> frozenset[str]:
        """Ids of the rules with no words to find (only codes, statuses or
        stages, or a match-anything pattern such as "blocked-at-connect")."""
        tiers = self._tiers or self._build_tiers()
        bare: frozenset[str] | None = tiers.get("<bare>")
        if bare is None:
            bare_ids, worded = set(), set()
            for r in self.rules:
                if not r.match or all(p.pattern in (".", ".*", "^", "") for p in r.match):
                    bare_ids.add(r.id)
                else:
                    worded.add(r.id)
            # An id shared with a rule that has words (ids need not be unique)
            # does not say which of them decided: not bare.
            bare = tiers["<bare>"] = frozenset(bare_ids - worded)
        return bare

    def _build_tiers(self) -> dict[str, Any]:
        _compiling()
        # Built aside, then put in at once: another thread classifying meanwhile
        # (serve's loop while warm_rules runs) never sees half of them.
        tiers: dict[str, Any] = {}
        entries: dict[int, _Entry] = {}
        for tier in TIERS:
            tiers[tier] = _indexed(
                [entries.setdefault(id(r), _entry(r)) for r in self.rules if r.tier == tier]
            )
        words: set[str] = set()
        for e in entries.values():
            words |= _words_of(e[7]) | _words_of(e[8])
        for name in SIGNALS:
            pats = self.signals.get(name, ())
            gated = _gated(_prepared(pats)) if pats else None
            tiers[f"<{name}>"] = gated
            words |= _words_of(gated)
        tiers["<scan>"] = _word_scan(frozenset(words))
        self._tiers.update(tiers)
        return self._tiers

    def _reason(
        self, code: int, enhanced: str, t: str, present: set[str], command: str, action: str
    ) -> tuple[str, str, str]:
        if enhanced.startswith("2.") or (not enhanced and 200 <= code < 300):
            return "delivered", "status", ""
        by_status = self.status.get(enhanced, "")
        tiers = self._tiers or self._build_tiers()
        rule = _first_rule(tiers["provider"], t, present, code, enhanced, command)
        if rule is None:
            rule = _first_rule(tiers["strong"], t, present, code, enhanced, command)
        if rule is not None:
            return rule.reason, rule.id, rule.signal
        if by_status and by_status not in self.weak:
            return by_status, "status", ""
        rule = _first_rule(tiers["weak"], t, present, code, enhanced, command)
        if rule is not None:
            return rule.reason, rule.id, rule.signal
        if by_status:
            return by_status, "status", ""
        return _fallback(code, enhanced, t, command, action), "fallback", ""


def _fallback(code: int, enhanced: str, t: str, command: str, action: str) -> str:
    subject = enhanced[2:4] if enhanced else ""
    if subject == "6.":
        return "contenterror"
    if subject == "7.":
        return "securityerror"
    if subject == "3.":
        # RFC 3463 X.3.X "Mail system status": the destination system itself.
        return "systemerror"
    if action in ("delayed", "expired"):
        return "expired"
    if 401 <= code <= 407 or 501 <= code <= 507 or code == 555:
        # (RFC 5321 4.2.3: 555 "MAIL FROM/RCPT TO parameters not recognized
        # or not implemented": what we sent, as the 50x codes.)
        return "syntaxerror"
    if code == 451:
        # RFC 5321 4.2.3: "451 Requested action aborted: local error in processing".
        return "systemerror"
    if command in ("EHLO", "HELO", "CONN"):
        return "blocked"
    if command == "MAIL":
        return "rejected"
    if subject == "4." and enhanced.startswith("4"):
        return "networkerror"
    if action == "failed" and enhanced == "" and code == 0 and not t:
        return "undefined"
    if action == "failed" and not enhanced and not code:
        # A final failure report naming no reply code and no status at all,
        # whose words no rule knows: the reporting MTA gave up without the
        # remote server refusing anything (connections that failed until the
        # queue lifetime ran out, Gmail's "did not accept our requests to
        # connect", OpenSMTPD's "Envelope expired"). Measured on the corpus
        # (rules held out by family): expired is the most frequent reason of
        # such reports (9 of 22), "onhold" never.
        return "expired"
    return "onhold" if (t or code or enhanced) else "undefined"


# Amazon SES bounce notifications (SES Developer Guide, "Amazon SES
# notification contents", bounce types): SES's own verdict, read when the
# recipient's diagnosticCode says nothing more (SES often sends none).
# Permanent: "remove the recipient's address from your mailing list";
# NoEmail, Suppressed and OnAccountSuppressionList (an address that has
# hard-bounced before) say so of the address itself.
SES_NO_ADDRESS = frozenset({"NoEmail", "Suppressed", "OnAccountSuppressionList"})
# Transient subtypes name their reason (as Sisimai's lhost AmazonSES maps them).
SES_TRANSIENT = {
    "MailboxFull": "mailboxfull",
    "MessageTooLarge": "mesgtoobig",
    "ContentRejected": "contenterror",
    "AttachmentRejected": "securityerror",
}


def ses_verdict(bounce_type: str, sub_type: str, c: Classification, hard: bool) -> tuple[str, bool]:
    """(reason, hard) for an SES bounce whose text was classified as ``c``
    (``hard`` as the caller weighs it): SES's bounceType/bounceSubType decide
    where the text did not (only the fallback spoke: no words a rule knows),
    and a Permanent bounce whose subtype says the address is gone is a hard
    userunknown. The webhook (serve's provider events) and a notification
    mailed to the bounce intake go through here, so both decide alike."""
    guessed = c.rule == "fallback"
    gone = sub_type in SES_NO_ADDRESS or (sub_type == "General" and guessed)
    if bounce_type == "Permanent" and not hard and gone:
        return "userunknown", True
    if bounce_type == "Transient" and guessed and sub_type in SES_TRANSIENT:
        return SES_TRANSIENT[sub_type], False
    return c.reason, hard


_default: RuleSet | None = None
_default_lock = threading.Lock()


def _compiling() -> None:
    """Tests (FASTSEND_TEST_FAULT=bounce-rules-on-loop): freeze the process when
    the shipped rules compile on a thread running an event loop (serve's: every
    listener stalled for as long)."""
    if FAULT:
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        countdown({"bounce-rules-on-loop": signal.SIGSTOP})


# Words that make a listing the sending client's (its IP, host or network, a
# DNS block list or a reputation service), not an address's.
# (Not an IP address alone: a DSN's "host mx[192.0.2.1] said:" is the
# receiver's. Spamhaus's DBL lists domains.)
# Words that make one mailbox the subject of a temporary refusal (RFC 5321's
# 450 "mailbox unavailable (e.g., mailbox busy ...)", a recipient receiving too
# fast, a locked mailbox): no slow-down of the site. Searched in the
# normalised (lower-case, one-space) text.
_ONE_MAILBOX = re.compile(
    r"\b(?:mailbox|recipient|user|account|inbox)(?:'s| mailbox| account)?"
    r"(?: <[^<>\s]{1,254}>| [^\s@]{1,64}@[^\s]{1,255})? (?:is |was |has been )?"
    r"(?:temporarily |currently |now )?(?:unavailable|busy|locked|in use"
    r"|receiving (?:too|(?:e-?)?mail (?:at a rate|too))|has received too many)"
    r"|too many (?:messages|mails|e-?mails) (?:for|to) (?:this|the|that) (?:recipient|user|mailbox)"
)
# The 4xx's usual suffix (see classify: a slow-down unless a policy status
# says why the site deferred).
_TRY_LATER = "try again later"
_NAMES_THE_CLIENT = re.compile(
    r"\bip\b|client|your (?:host|server|network|mta|provider)"
    r"|dnsbl|\brbl\b|spamhaus(?! dbl)(?!\.org/dbl)|spamcop|barracuda|sorbs|blocked using|reputation"
)


# SMTP stages where a reply code of 0 (and no enhanced status) means no reply
# was read, when the outcome says why (our own error: "connection lost: ...";
# with no words at all there is nothing to go on: "undefined"). A code-0
# outcome at STARTTLS/TLS or a local check carries words of its own that do
# say what failed.
_NO_REPLY_STAGES = frozenset({"CONN", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT"})


def default_rules() -> RuleSet:
    """The shipped rules, loaded once (a caller meeting :func:`warm_rules` under
    way waits for it)."""
    global _default
    rules = _default
    if rules is None:
        with _default_lock:
            if _default is None:
                _default = RuleSet.default()
            rules = _default
    return rules


def warm_rules() -> RuleSet:
    """The shipped rules with all they compile on first use done now: the rules'
    patterns (~130 ms), their tiers (~40 ms) and the word scan (~120 ms, else
    compiled at the 200th reply). ``fastsend serve`` calls it in a thread at
    start: on its loop, the first deferral or bounce classified (the rollups,
    the supervisor's lanes, a provider's webhook) stalled every listener for as
    long, and the workers, forked after it, inherit them compiled."""
    global _default
    with _default_lock:
        rules = _default or RuleSet.default()
        tiers = rules._tiers or rules._build_tiers()
        rules._bare_rules()
        scan = tiers["<scan>"]
        if scan.rx is None:
            scan._compile()
        _default = rules
    return rules


def load_rules(paths: Iterable[str | Path] = ()) -> RuleSet:
    """The shipped rules preceded by the user rule files in ``paths`` (first wins)."""
    extra: Sequence[RuleSet] = [RuleSet.load(p) for p in paths]
    return default_rules().extended(*extra) if extra else default_rules()


def classify_reply(
    code: int,
    enhanced: str,
    text: str,
    *,
    command: str = "RCPT",
    rules: RuleSet | None = None,
) -> Classification:
    """Classify a synchronous SMTP reply (e.g. from an Outcome).

    ``command`` is the SMTP command the reply answered ("RCPT", "MAIL",
    "DATA", "EHLO", "CONN", ...; an Outcome's ``stage`` fits, any case). It
    matters: "user unknown" after DATA is a content filter, a refusal at MAIL
    FROM is about the sender, one at connect or EHLO is about the client.
    It defaults to RCPT, where most per-recipient replies come from; pass ""
    when it is not known. ``rules`` defaults to the shipped rules.
    """
    if command == "data-command":  # (DATA unanswered, no 354: outcome.DATA_COMMAND)
        command = "DATA"
    if not isinstance(code, int) or not (code == 0 or 200 <= code <= 599):
        raise ValueError(f"reply code must be 0 or 200..599, got {code!r}")
    stage = stage_name(command)
    if (
        not code
        and not (enhanced or "").strip()
        and (stage == "CONN" or (stage in _NO_REPLY_STAGES and (text or "").strip()))
    ):
        # No reply at all (connection refused, unreachable, timed out; or,
        # later in the session, the connection reset, closed or timed out
        # before the reply): the network, not a refusal by the site (a block
        # is the server's reply). The words of our own error ("Connection
        # reset by peer") are not the site's: they must not read as one.
        return Classification("networkerror", False, True, rule="no-reply")
    c = (rules or default_rules()).classify(code, enhanced, text, command=stage)
    if c.hard and (400 <= code < 500 or (enhanced or "").strip().startswith("4.")):
        # A 4xx reply is temporary: the sender retries, so nothing is known
        # yet about the address (an asynchronous bounce whose final reply
        # was a 4xx is different: the reporting MTA has given up).
        c = msgspec.structs.replace(c, hard=False, soft=True)
    return c
