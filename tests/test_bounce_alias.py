"""A DSN about an address the receiver's alias expanded suppresses the one we sent to.

Postfix reports a virtual alias's failure with ``Final-Recipient`` the expanded
mailbox and ``Original-Recipient`` the address we sent to. Mail without VERP
(and grouped identical mail, which never has VERP) is found by its Message-ID
and the recipient must match: only the Final-Recipient was compared, so the
report was attributed to no message and the hard bounce suppressed no one.
Found by bnc16.

Real parts: serve's report processing (``process_report``) over a SQLite spool
and suppression list, RFC 3464 DSNs.
"""

from __future__ import annotations

from pathlib import Path

from tests._serve_helpers import dsn

from fastsend import msgid
from fastsend.config import from_dict


def _aliased(final: str, original: str, mid: str) -> bytes:
    text = dsn(final, mid, to=original).replace(
        f"Final-Recipient: rfc822; {final}\n",
        f"Original-Recipient: rfc822; {original}\nFinal-Recipient: rfc822; {final}\n",
    )
    assert "Original-Recipient" in text
    return text.encode()


def test_a_hard_bounce_at_an_expanded_alias_suppresses_the_address_we_sent_to(
    tmp_path: Path,
) -> None:
    from fastsend.serve.context import open_context
    from fastsend.serve.listeners import process_report

    ctx = open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}}))
    try:
        cid = ctx.tenant_campaign("shop")
        rows = [(a, "x.test", b"{}") for a in ("bob@x.test", "cy@x.test", "di@x.test")]
        one, first, second = ctx.inject(cid, rows)
        # A message of its own (its Message-ID names its row)...
        evs = process_report(ctx, _aliased("bob.internal@mail.x.test", "bob@x.test",
                                           msgid.token(one, ctx.secret)), [])  # fmt: skip
        assert [(e["id"], e["rcpt"]) for e in evs] == [(one, "bob@x.test")], evs
        assert ctx.suppression.contains("bob@x.test", tenant="shop")
        # ... and one shared by several recipients (the group's first row's id).
        group = msgid.group_token(first, ctx.secret)
        evs = process_report(ctx, _aliased("di.x@mail.x.test", "di@x.test", group), [])
        assert [(e["id"], e["rcpt"]) for e in evs] == [(second, "di@x.test")], evs
        assert ctx.suppression.contains("di@x.test", tenant="shop")
        assert not ctx.suppression.contains("cy@x.test", tenant="shop")
        # An Original-Recipient that is not the message's names no message.
        evs = process_report(ctx, _aliased("zed@mail.x.test", "zed@x.test",
                                           msgid.token(one, ctx.secret)), [])  # fmt: skip
        assert [e["id"] for e in evs] == [None], evs
    finally:
        ctx.close()
