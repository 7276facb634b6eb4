"""Providers and relays, session 24's audit: a relay that refuses us (not the
recipient) defers and fails over instead of bouncing."""

from __future__ import annotations

import ssl
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from tests import test_transports_relay
from tests._engine_helpers import summary, write_recipients
from tests.test_transports_http import dkim_campaign, events, send
from tests.test_transports_relay import ENV, PASSWORD, USER, Relay, RelayHandler, relay_config

from fastsend.outcome import FAILED, Outcome
from fastsend.transports.relay import refused_us

certs = test_transports_relay.certs  # its trustme CA and relay certificate (a fixture)


class RefusingRelay(RelayHandler):
    """A relay that takes our login but will not relay for it: ``at`` "rcpt"
    answers every RCPT ``reply``, "mail" answers MAIL FROM."""

    def __init__(self, reply: str, at: str = "rcpt") -> None:
        super().__init__()
        self.reply, self.at = reply, at

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.at == "mail":
            return self.reply
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return self.reply.replace("ADDR", address)


def _shaping(tmp: Path) -> list[dict[str, Any]]:
    p = tmp / "spool" / "shaping.jsonl"
    return [orjson.loads(x) for x in p.read_bytes().splitlines() if x.strip()] if p.exists() else []


def test_a_relay_refusing_to_relay_fails_over_and_bounces_no_one(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path]
) -> None:
    """Route ``["relay1", "relay2"]``: relay1 takes the login and answers every
    RCPT "554 5.7.1 <a>: Relay access denied" (Postfix refusing a client it does
    not relay for). That is relay1's configuration, not the recipient: every
    message goes on to relay2, no bounce, no address suppressed, and a shaping
    event says relay1 refused us. Before, every message bounced ("norelaying")
    at relay1, lost, and relay2 was never tried."""
    ctx, ca = certs
    camp, _ = dkim_campaign(tmp_path)
    addrs = [f"u{i}@example.{('net', 'org')[i % 2]}" for i in range(6)]
    rcpts = write_recipients(tmp_path, addrs)
    bad = RefusingRelay("554 5.7.1 <ADDR>: Relay access denied")
    good = RelayHandler()
    with Relay(bad, ctx, implicit=False) as r1, Relay(good, ctx, implicit=False) as r2:
        cfg = relay_config(r1.port, ca).replace('"*" = "relay1"', '"*" = ["relay1", "relay2"]')
        cfg += (
            f'[transports.relay2]\nkind = "relay"\nhost = "127.0.0.1"\nport = {r2.port}\n'
            f'ca_file = "{ca}"\n'
        )
        env = {**ENV, "FASTSEND_RELAY2_USERNAME": USER, "FASTSEND_RELAY2_PASSWORD": PASSWORD}
        proc = send(tmp_path, camp, rcpts, cfg, env, "--max-wait", "5", "--no-dkim")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(proc)
    assert (s["delivered"], s["bounced"], s["suppressed"]) == (6, 0, 0), s
    assert Counter(r for rs, _ in good.messages for r in rs) == Counter(addrs)
    evs = events(tmp_path)
    assert not [e for e in evs if e["event"] == "bounced"]
    fo = [e for e in evs if e["event"] == "failover"]
    assert sorted(e["rcpt"] for e in fo) == sorted(addrs)
    assert all(e["from"] == "relay1" and e["to"] == "relay2" and e["code"] == 554 for e in fo)
    told = [e for e in _shaping(tmp_path) if e.get("action") == "relay refused us"]
    assert told and told[0]["transport"] == "relay1" and "Relay access denied" in told[0]["text"]


def test_a_relay_wanting_auth_defers_instead_of_bouncing(
    tmp_path: Path, certs: tuple[ssl.SSLContext, Path]
) -> None:
    """One relay, answering MAIL FROM "530 5.7.0 Authentication required" (a
    relay that wants another login, or whose AUTH we did not do): every message
    deferred, with the relay's reply, nothing bounced or suppressed. Before,
    each was a permanent failure at "mail": the whole list bounced."""
    ctx, ca = certs
    camp, _ = dkim_campaign(tmp_path)
    addrs = ["a@example.net", "b@example.org"]
    rcpts = write_recipients(tmp_path, addrs)
    bad = RefusingRelay("530 5.7.0 Authentication required", at="mail")
    with Relay(bad, ctx, implicit=False) as r1:
        cfg = "[retry]\nmin_backoff = 60\nmax_backoff = 60\n" + relay_config(
            r1.port, ca, retry=False
        )
        proc = send(tmp_path, camp, rcpts, cfg, ENV, "--max-wait", "1", "--no-dkim")
    s = summary(proc)
    assert (s["delivered"], s["bounced"], s["suppressed"]) == (0, 0, 0), s
    evs = events(tmp_path)
    assert not [e for e in evs if e["event"] == "bounced"]
    dfr = [e for e in evs if e["event"] == "deferred"]
    assert sorted(e["rcpt"] for e in dfr) == sorted(addrs)
    assert all(e["code"] == 530 and "relay relay1 refused us" in e["text"] for e in dfr), dfr


def test_which_relay_refusals_are_about_us() -> None:
    def o(code: int, enhanced: str, text: str, stage: str = "rcpt") -> Outcome:
        return Outcome(FAILED, code, enhanced, text, stage, "relay:r[127.0.0.1]:25")

    ours = [
        o(554, "5.7.1", "<a@b.example>: Relay access denied"),
        o(550, "5.7.54", "SMTP; Unable to relay recipient in non-accepted domain"),
        o(550, "5.7.64", "TenantAttribution; Relay Access Denied"),
        o(550, "5.7.1", "Relaying denied. Proper authentication required."),
        o(550, "", "relay not permitted"),
        o(
            530,
            "5.7.57",
            "Client was not authenticated to send anonymous mail during MAIL FROM",
            "mail",
        ),
        o(553, "5.7.1", "<x@y.example>: Sender address rejected: not owned by user alice", "mail"),
        o(550, "5.7.60", "SMTP; Client does not have permissions to send as this sender", "mail"),
        o(
            554,
            "",
            "Message rejected: Email address is not verified. The following identities"
            " failed the check in region EU-WEST-1: x@y.example",
            "data",
        ),
    ]
    theirs = [
        o(
            550,
            "5.1.1",
            "<a@b.example>: Recipient address rejected: User unknown in relay recipient table",
        ),
        o(552, "5.2.2", "Mailbox full"),
        o(550, "5.7.1", "Message rejected as spam", "data"),
    ]
    assert [refused_us(x) for x in ours] == [True] * len(ours)
    assert [refused_us(x) for x in theirs] == [False] * len(theirs)
