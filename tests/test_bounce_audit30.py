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
