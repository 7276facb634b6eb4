"""bnc30's audit of the bounce classifier: where its rules compile, and what it
reads.

Real parts: ``fastsend serve`` (tests/_serve_helpers.Served) delivering to
fastsend's own sink on loopback, a refusal at RCPT classified by its rollups,
its supervisor and its workers; the classifier itself in-process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests._serve_helpers import Served, http, until

from fastsend.bounce import reply
from fastsend.sink import SinkThread


def _events(s: Served) -> list[dict[str, Any]]:
    path = s.tmp / "spool" / "events.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_serve_first_bounce_compiles_nothing_on_its_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first deferral or bounce classified on serve's loop compiled the bounce
    rules there (~0.3 s): every listener (API, SMTP, tracking) stalled for as long.
    Under the fault the process freezes if any rule compiles on a thread running
    an event loop: serve must have compiled them aside, before its workers fork."""
    monkeypatch.setenv("FASTSEND_TEST_FAULT", "bounce-rules-on-loop")
    with SinkThread() as sink:
        s = Served(tmp_path, f"{sink.host}:{sink.port}")
        try:
            st, body = s.req("POST", "/v1/messages", {
                "from": "news@example.com", "subject": "s", "text": "t",
                "to": ["permfail-1@x.test", "tempfail-1@x.test", "ok-1@x.test"]})  # fmt: skip
            assert st == 202, body
            until("the bounce and the deferral in the event log", lambda: {"bounced", "deferred"}
                  <= {e["event"] for e in _events(s)})  # fmt: skip
            bounced = next(e for e in _events(s) if e["event"] == "bounced")
            assert bounced["reason"] == "userunknown" and bounced["hard"]

            def counted() -> bool:  # the rollups classified both (on serve's loop)
                st, stats = s.req("GET", "/v1/stats?from=-1h&dims=", timeout=20)
                assert st == 200, stats  # (a frozen loop: no answer, a timeout)
                n = stats["totals"]["counts"]
                return n.get("bounced", 0) >= 1 and n.get("deferred", 0) >= 1

            until("the rollups counting the bounce and the deferral", counted)
            st, health = http("GET", s.base + "/v1/health", timeout=20)
            assert st == 200, health
            assert s.proc.poll() is None
        finally:
            s.stop()


def test_warm_rules_leaves_nothing_to_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """After warm_rules (in another thread), classifying compiles nothing: not the
    rules, not their tiers, not the word scan (compiled at the 200th reply before)."""
    monkeypatch.setattr(reply, "_default", None)
    t = threading.Thread(target=reply.warm_rules)
    t.start()
    t.join()
    rules = reply.default_rules()

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("compiled after warm_rules")

    monkeypatch.setattr(reply.RuleSet, "default", classmethod(refuse))
    monkeypatch.setattr(reply.RuleSet, "_build_tiers", refuse)
    monkeypatch.setattr(reply._WordScan, "_compile", refuse)
    for i in range(300):  # past _WordScan.COMPILE_AFTER distinct texts
        c = reply.classify_reply(550, "5.1.1", f"<u{i}@x.test>: Recipient address rejected: "
                                 f"User unknown in table {i}")  # fmt: skip
        assert c.reason == "userunknown"
        c = reply.classify_reply(421, "", f"Too many connections from your IP {i}")
    assert reply.default_rules() is rules


def test_warm_rules_classifies_as_before() -> None:
    """The rules warmed give the same answers as rules compiled on first use."""
    cold = reply.RuleSet.default()
    warm = reply.warm_rules()
    texts = [
        (550, "5.1.1", "User unknown"),
        (451, "4.7.1", "Greylisted, please try again later"),
        (421, "", "Too much mail from 192.0.2.1, slow down"),
        (
            554,
            "5.7.1",
            "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        ),
        (452, "4.2.2", "Mailbox full"),
    ]
    for code, st, text in texts:
        assert warm.classify(code, st, text, command="RCPT") == cold.classify(
            code, st, text, command="RCPT"
        )


def test_rewritten_patterns_find_what_the_old_ones_did() -> None:
    """The status, reply-code and blank patterns were rewritten to start with a
    character the engine can skip ahead to (3x faster): every text gives the
    same matches at the same places as the old patterns."""
    import random
    import re

    from fastsend.bounce import vendors

    old = [
        (re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)"), vendors.ENHANCED_RE),
        (
            re.compile(r"(?<![\d.:/#-])([245][0-5]\d)(?:[ _-]|$)(?![\d]{2})", re.MULTILINE),
            vendors.REPLY_RE,
        ),
        (re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b"), reply._ENHANCED_RE),
    ]
    rnd = random.Random(30)
    pieces = [*"2455501.1 .-_:/#\na\t_xé", "550", "5.1.1", "4.7.0", "421-", "250 "]
    for _ in range(30000):
        t = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 10)))
        for a, b in old:
            assert [(m.span(), m.groups()) for m in a.finditer(t)] == [
                (m.span(), m.groups()) for m in b.finditer(t)
            ], (a.pattern, t)
            assert bool(a.fullmatch(t)) == bool(b.fullmatch(t)), (a.pattern, t)
    blanks = re.compile(r"\s{2,}|[\t\n\r]")
    spaces = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\xa0", "\u2003", "a", "B", "550-"]
    for _ in range(30000):
        t = "".join(rnd.choice(spaces) for _ in range(rnd.randint(0, 12)))
        assert vendors._BLANKS_RE.sub(" ", t) == blanks.sub(" ", t), repr(t)
        assert (
            reply.normalize_text(t)
            == re.sub(r"\s+", " ", reply._CONT_RE.sub(" ", t)).strip().lower()
        ), repr(t)


def test_mime_parameters_parsed_once_follow_a_changed_header() -> None:
    """A part's Content-Type parameters are parsed once (kept with its header
    index); a header changed afterwards is read anew, as the standard Message."""
    from fastsend.bounce.mime import message_from_bytes

    raw = (
        b"Content-Type: multipart/report; report-type=delivery-status;\n"
        b' boundary="b1"\n\n--b1\nContent-Type: text/plain; charset="ISO-8859-1"\n\n'
        b"caf\xe9\n--b1--\n"
    )
    msg = message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_boundary() == "b1" and msg.get_param("report-type") == "delivery-status"
    part = msg.get_payload()[0]
    assert part.get_content_charset() == "iso-8859-1"
    assert part.get_param("nothing") is None and part.get_param("x", "dflt", "x-none") == "dflt"
    part.set_param("charset", "utf-8")  # (replace_header)
    assert part.get_content_charset() == "utf-8"
    del part["Content-Type"]
    part["Content-Type"] = "text/html; charset=koi8-r"
    assert part.get_content_type() == "text/html" and part.get_content_charset() == "koi8-r"
    msg.set_type("multipart/mixed")
    assert msg.get_content_type() == "multipart/mixed" and msg.get_boundary() == "b1"


def test_parse_child_warms_the_rules_before_its_first_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bounce parse child (serve.parsepool) only imported the parsers before
    its first report: the rules' compile (~0.3 s of CPU) ran inside that report's
    CPU cap. Its warm-up now leaves nothing to compile."""
    from fastsend.serve import parsepool

    monkeypatch.setattr(reply, "_default", None)
    parsepool._warm()
    rules = reply._default
    assert rules is not None and rules._tiers
    assert rules._tiers["<scan>"].rx is not None
