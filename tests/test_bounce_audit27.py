"""bnc27's audit of the bounce classifier (session 27).

- A 4xx whose only words are the usual "(please) try again later", with no
  status saying what failed (none, or the undefined X.0.0), was a slow-down
  signal (rate_limited): OpenBSD spamd's greylisting answers "451 Temporary
  failure, please try again later" to every new (IP, sender, recipient)
  triplet, so the first mail to a greylisting site cut its rate. Such a reply
  names no pace: it slows nothing by itself (a 421 still does, and words or a
  status naming the pace or the system). Whether it was the recipient's or
  the site's is then told by the pipeline (shaping.lanes.recipient_only) and
  a site deferring most mail is still cut by its deferred share.
"""

from __future__ import annotations

import pytest

from fastsend.bounce import classify_reply

# ---------------------------------------------------------------- greylisting without a status
GREYLIST_LIKE = [
    (451, "", "Temporary failure, please try again later.", "RCPT"),
    (451, "", "Temporary failure, please try again later", ""),
    (450, "", "Please try again later", "RCPT"),
    (451, "4.0.0", "Temporary failure, please try again later", "RCPT"),
    (451, "", "Try again later", "DATA"),
    (451, "", "Try again later", "RCPT"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), GREYLIST_LIKE)
def test_a_wordless_try_later_slows_nothing(code: int, status: str, text: str, stage: str) -> None:
    c = classify_reply(code, status, text, command=stage)
    assert (c.hard, c.rate_limited, c.ip_blocked) == (False, False, False), c


THROTTLES = [
    (421, "", "Temporary failure, please try again later", "CONN"),
    (421, "", "Try again later", "RCPT"),
    (451, "", "Too many messages, slow down and try again later", "RCPT"),
    (450, "", "Rate limit exceeded, try again later", "MAIL"),
    (451, "4.3.2", "System not accepting network messages, try again later", "RCPT"),
    (452, "", "Too many connections from your host, try again later", "RCPT"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "status", "text", "stage"), THROTTLES)
def test_throttling_wording_still_slows(code: int, status: str, text: str, stage: str) -> None:
    assert classify_reply(code, status, text, command=stage).rate_limited


def test_spamd_greylisting_one_recipient_does_not_cut_the_site() -> None:
    """A group of four, the first recipient greylisted by spamd ("451
    Temporary failure, please try again later", a new triplet), the other
    three taken: before, the reply was a slow-down and cut the site's AIMD
    rate; now it is that recipient's deferral, and a site answering it to
    every message is still cut (its deferred share)."""
    from tests.test_guard_audit24 import OK, a_lane

    from fastsend.outcome import DEFERRED, Outcome, TxnResult

    grey = Outcome(DEFERRED, 451, "", "Temporary failure, please try again later.", "rcpt")
    ln = a_lane()
    t = 10.0
    for _ in range(10):
        ln.aimd.sent(t, 4)  # type: ignore[union-attr]
        ln.observe([TxnResult(0, [grey]), TxnResult(1, [OK]), TxnResult(2, [OK]),
                    TxnResult(3, [OK])], t)  # fmt: skip
        t += 2.0
    assert ln.rate() == 200, ln.events
    assert not [e for e in ln.events if e["action"] == "aimd_decrease"], ln.events
    for _ in range(10):
        ln.aimd.sent(t, 4)  # type: ignore[union-attr]
        ln.observe([TxnResult(i, [grey]) for i in range(4)], t)
        t += 2.0
    assert ln.rate() < 200 and [e for e in ln.events if e["action"] == "aimd_decrease"]
