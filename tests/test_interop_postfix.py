"""The SMTP client against a real Postfix smtpd (not smtp-sink): a private
Postfix instance on loopback (its own config, queue and log, run by its own
master), whose mail goes to the discard transport so each accepted recipient
is logged "status=sent".

One master runs several smtpd listeners, each with its own overrides:

- "full": PIPELINING, CHUNKING (BDAT), SIZE, 8BITMIME, SMTPUTF8, as Postfix
  3.x offers them;
- "data": CHUNKING withheld (pipelined DATA);
- "lockstep": PIPELINING and CHUNKING withheld (one command at a time);
  Postfix logs "improper command pipelining" if the client writes ahead;
- "small": message_size_limit 3000 (SIZE 3000);
- "tls": STARTTLS with a certificate for postfix.test from a CA only the
  test knows;
- "oldtls": STARTTLS as an older MX has it: TLS 1.2 at most, CBC ciphers
  with SHA-1 MACs only (ECDHE-ECDSA-AES128-SHA, ...-AES256-SHA);
- "rate": 5 messages per client per minute (anvil), then 421 4.7.0 "too
  many messages from" and the session ends.

Recipients: ``permfail@`` 550 5.1.1, ``tempfail@`` 450 4.2.0, ``policy@`` 554
5.7.1 (check_recipient_access), anyone else accepted.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests._mta_helpers import private_postfix, read_log

from _smtp_helpers import client_class, link_class
from conftest import free_port
from fastsend.outcome import Envelope, Outcome
from fastsend.smtp import ConnectOptions, SMTPConnection, connect
from fastsend.smtp import transport as tr

Run = Callable[[Any], Any]
# After _mta_helpers.POSTFIX_MAIN_CF (directories, name, loopback relaying, log).
MAIN_CF = """\
smtpd_recipient_restrictions =
    check_recipient_access inline:{{
        {{ permfail@x.test = 550 5.1.1 no such user }},
        {{ tempfail@x.test = 450 4.2.0 try again later }},
        {{ policy@x.test = 554 5.7.1 refused by policy }} }},
    permit_mynetworks, reject
default_transport = discard
relay_transport = discard
smtpd_banner = $myhostname ESMTP
smtpd_tls_cert_file = {d}/cert.pem
smtpd_tls_key_file = {d}/key.pem
smtpd_tls_security_level = none
"""

# Its smtpd listeners (master.cf; _mta_helpers.POSTFIX_SERVICES after them).
LISTENERS_CF = """\
127.0.0.1:{full} inet n - n - - smtpd
127.0.0.1:{data} inet n - n - - smtpd -o smtpd_discard_ehlo_keywords=chunking
127.0.0.1:{lockstep} inet n - n - - smtpd -o smtpd_discard_ehlo_keywords=pipelining,chunking
127.0.0.1:{small} inet n - n - - smtpd -o message_size_limit=3000
127.0.0.1:{tls} inet n - n - - smtpd -o smtpd_tls_security_level=may
127.0.0.1:{oldtls} inet n - n - - smtpd -o smtpd_tls_security_level=may -o smtpd_tls_protocols=!SSLv2,!SSLv3,!TLSv1.3 -o smtpd_tls_ciphers=medium -o tls_medium_cipherlist=ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA -o smtpd_tls_loglevel=1
127.0.0.1:{rate} inet n - n - - smtpd -o smtpd_client_message_rate_limit=5 -o smtpd_client_event_limit_exceptions= -o smtpd_error_sleep_time=0 -o smtpd_soft_error_limit=100
"""

LISTENERS = ("full", "data", "lockstep", "small", "tls", "oldtls", "rate")


@dataclass
class Postfix:
    ports: dict[str, int]
    dir: Path
    ca: trustme.CA

    def log(self) -> str:
        return read_log(self.dir / "maillog")

    def sent(self, want: int, timeout: float = 60.0) -> list[str]:
        """The recipients the discard transport took ("status=sent"), once
        there are ``want`` of them (Postfix's queue manager is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            got = re.findall(r"to=<([^>]*)>, relay=none.*status=sent", self.log())
            if len(got) >= want or time.monotonic() > deadline:
                return sorted(got)
            time.sleep(0.05)

    def errors(self) -> list[str]:
        """Protocol trouble Postfix logged (the port probes' "lost connection
        after CONNECT" aside)."""
        return [
            ln
            for ln in self.log().splitlines()
            if "improper command pipelining" in ln
            or ("lost connection" in ln and "after CONNECT" not in ln)
            or "timeout after" in ln
        ]


@contextlib.contextmanager
def start_postfix() -> Iterator[Postfix]:
    ca = trustme.CA()

    def prepare(d: Path) -> None:
        cert = ca.issue_cert("postfix.test")
        cert.private_key_pem.write_to_path(str(d / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))

    ports = {name: free_port() for name in LISTENERS}
    with private_postfix(
        MAIN_CF, LISTENERS_CF.format(**ports), ports.values(), prepare=prepare
    ) as d:
        yield Postfix(ports, d, ca)


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    with start_postfix() as pf:
        yield pf


@pytest.fixture(autouse=True)
def client_twin(impl: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(tr, "SMTPClient", client_class(impl))
    monkeypatch.setattr(tr, "Link", link_class(impl))
    return impl


def envelope(tag: int, rcpts: list[str], body: bytes = b"") -> Envelope:
    data = b"Subject: %d\r\nFrom: s@sender.test\r\n\r\n.dot line\r\n%sbody\r\n" % (tag, body)
    return Envelope(f"bounce-{tag}@sender.test", rcpts, data, tag=tag)


async def must_connect(opts: ConnectOptions) -> SMTPConnection:
    conn = await connect(opts)
    assert isinstance(conn, SMTPConnection), conn
    return conn


RCPT_SETS = [
    ["a{n}@x.test", "permfail@x.test", "tempfail@x.test"],
    ["permfail@x.test", "policy@x.test"],  # nothing accepted
    ["b{n}@x.test"],
    ["c{n}@x.test", "d{n}@x.test"],
]
WANT = {"permfail": ("failed", "5.1.1"), "tempfail": ("deferred", "4.2.0")}
WANT["policy"] = ("failed", "5.7.1")


@pytest.mark.parametrize("listener", ["full", "data", "lockstep"])
def test_postfix_smtpd_transactions_with_refusals_at_rcpt(
    run: Run, postfix: Postfix, listener: str, loop_kind: str, client_twin: str
) -> None:
    """Pipelined with BDAT, pipelined with DATA, and one command at a time:
    each recipient's outcome as Postfix answered it, Postfix took exactly
    the accepted ones, and logged no improper pipelining or lost connection."""
    n = f"-{listener}-{loop_kind}-{client_twin}-"
    batch = [
        envelope(i, [r.format(n=n + str(i)) for r in rs])
        for i, rs in enumerate(RCPT_SETS * 3)
    ]
    before = len(postfix.sent(0, 0))

    async def go() -> Any:
        opts = ConnectOptions(host="127.0.0.1", port=postfix.ports[listener], tls="off")
        conn = await must_connect(opts)
        caps = set(conn.capabilities)
        results = await conn.send(batch)
        await conn.quit()
        return caps, results

    caps, results = run(go())
    assert ("CHUNKING" in caps, "PIPELINING" in caps) == {
        "full": (True, True), "data": (False, True), "lockstep": (False, False)
    }[listener]  # fmt: skip
    accepted = []
    for r, e in zip(results, batch, strict=True):
        assert r.tag == e.tag
        for o, rcpt in zip(r.outcomes, e.rcpts, strict=True):
            local = rcpt.split("@")[0]
            if local in WANT:
                assert (o.kind, o.enhanced, o.stage) == (*WANT[local], "rcpt"), (rcpt, o)
            else:
                assert (o.kind, o.stage) == ("delivered", "data"), (rcpt, o)
                accepted.append(rcpt)
    assert len(accepted) == 3 * 4
    got = [r for r in postfix.sent(before + len(accepted)) if n in r]
    assert got == sorted(accepted)
    assert [e for e in postfix.errors() if "127.0.0.1" in e] == []


def test_postfix_smtpd_takes_quoted_local_parts_with_spaces(
    run: Run, postfix: Postfix, loop_kind: str, client_twin: str
) -> None:
    """A recipient and a sender whose local part is a quoted string with a
    space (RFC 5321 4.1.2 Quoted-string: ``"john doe"@x.test``, which every
    accept path takes) go to the server as written and are delivered. The
    client refused them as "invalid recipient address": 5.1.3 without an
    attempt, classified as an unknown user, and the address suppressed. A
    space anywhere else (or a control character) is still refused locally."""
    n = f"{loop_kind}-{client_twin}"
    quoted = f'"john doe {n}"@x.test'
    bad = [f"john doe{n}@x.test", f'"john{n}" @x.test', f'"j{n}"@x .test', f'"a\rb{n}"@x.test']
    before = len(postfix.sent(0, 0))

    async def go() -> Any:
        conn = await must_connect(
            ConnectOptions(host="127.0.0.1", port=postfix.ports["full"], tls="off")
        )
        results = await conn.send(
            [
                envelope(0, [quoted, *bad]),
                Envelope(
                    '"the sender"@sender.test',
                    [f"plain{n}@x.test"],
                    b"Subject: s\r\n\r\nx\r\n",
                    tag=1,
                ),
            ]
        )
        await conn.quit()
        return results

    results = run(go())
    results.sort(key=lambda r: r.tag)
    first, second = results[0].outcomes, results[1].outcomes
    assert first[0].delivered, first[0]
    assert [(o.kind, o.enhanced, o.stage) for o in first[1:]] == [("failed", "5.1.3", "local")] * 4
    assert second[0].delivered, second[0]
    sent = postfix.sent(before + 2)  # (Postfix logs them as its queue manager gets to them)
    assert quoted in sent and f"plain{n}@x.test" in sent
    assert 'from=<"the sender"@sender.test>' in postfix.log()
    assert not any(b.split("@")[0].strip('"') in postfix.log() for b in bad[:2])


def test_postfix_smtpd_size_limit(run: Run, postfix: Postfix) -> None:
    """SIZE 3000: a larger message is failed 5.3.4 without being sent (RFC
    1870), the others on the same connection are delivered."""

    async def go() -> Any:
        opts = ConnectOptions(host="127.0.0.1", port=postfix.ports["small"], tls="off")
        conn = await must_connect(opts)
        size = conn.capabilities.get("SIZE")
        results = await conn.send(
            [
                envelope(0, ["small0@x.test"]),
                envelope(1, ["big1@x.test"], (b"x" * 70 + b"\r\n") * 60),
                envelope(2, ["small2@x.test"]),
            ]
        )
        await conn.quit()
        return size, results

    size, results = run(go())
    assert size == "3000"
    results.sort(key=lambda r: r.tag)  # the local refusal comes first
    kinds = [(r.outcomes[0].kind, r.outcomes[0].enhanced) for r in results]
    assert kinds == [("delivered", "2.0.0"), ("failed", "5.3.4"), ("delivered", "2.0.0")], results
    assert "big1@x.test" not in postfix.log()


def test_postfix_smtpd_starttls_opportunistic_and_required(run: Run, postfix: Postfix) -> None:
    """STARTTLS with a certificate no system CA signed: opportunistic TLS
    encrypts anyway (RFC 7435); "required" verifies, so it defers unless the
    CA is trusted and the MX name matches the certificate."""
    import ssl

    port = postfix.ports["tls"]
    trusted = ssl.create_default_context()
    postfix.ca.configure_trust(trusted)

    async def go() -> Any:
        conn = await must_connect(ConnectOptions(host="127.0.0.1", port=port))
        tls = conn.tls_active
        first = await conn.send([envelope(0, ["tls0@x.test"])])
        await conn.quit()
        bad = await connect(ConnectOptions(host="127.0.0.1", port=port, tls="required"))
        wrong_name = await connect(
            ConnectOptions(
                host="127.0.0.1", port=port, tls="required", ssl_context=trusted,
                server_hostname="mx.other.test",
            )
        )  # fmt: skip
        good = await must_connect(
            ConnectOptions(
                host="127.0.0.1", port=port, tls="required", ssl_context=trusted,
                server_hostname="postfix.test",
            )
        )  # fmt: skip
        second = await good.send([envelope(1, ["tls1@x.test"])])
        await good.quit()
        return tls, first, bad, wrong_name, second

    tls, first, bad, wrong_name, second = run(go())
    assert tls and first[0].outcomes[0].delivered
    for out in (bad, wrong_name):
        assert isinstance(out, Outcome) and out.deferred and out.stage == "starttls", out
    assert second[0].outcomes[0].delivered
    assert postfix.sent(2)
    assert "starttls=1 mail=1" in postfix.log()


def test_postfix_smtpd_older_tls_setup_is_still_encrypted(
    run: Run, postfix: Postfix, loop_kind: str, client_twin: str
) -> None:
    """An MX whose STARTTLS speaks TLS 1.2 with CBC-SHA1 ciphers only (many
    older MTAs and appliances; RSA key exchange and TLS 1.0 alike):
    opportunistic TLS encrypts, as Postfix's "medium" ciphers do (RFC 7435).
    Python's default client list (TLS 1.2+, ECDHE/DHE only, no SHA-1 MAC,
    security level 2) had no cipher in common with it: the handshake failed
    and every message went in clear on the retry."""

    rcpt = f"oldtls-{loop_kind}-{client_twin}@x.test"
    before = len(postfix.sent(0, 0))

    async def go() -> Any:
        conn = await must_connect(ConnectOptions(host="127.0.0.1", port=postfix.ports["oldtls"]))
        tls_obj = conn._link.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        cipher = (tls_obj.cipher()[0], tls_obj.version()) if tls_obj is not None else None
        tls = conn.tls_active
        results = await conn.send([envelope(0, [rcpt])])
        await conn.quit()
        return tls, cipher, results

    tls, cipher, results = run(go())
    assert tls, "the session fell back to clear text"
    assert cipher is not None and cipher[0].endswith("-SHA") and cipher[1] == "TLSv1.2", cipher
    assert results[0].outcomes[0].delivered
    assert rcpt in postfix.sent(before + 1)
    assert re.search(r"TLS connection established from \S+: TLSv1\.2 with cipher \S+-SHA ", postfix.log())


def test_postfix_message_rate_limit_defers_the_rest_of_the_group(
    run: Run, postfix: Postfix, tmp_path: Any, loop_kind: str, client_twin: str
) -> None:
    """Postfix's per-client message rate (smtpd_client_message_rate_limit 5,
    anvil) answers the 6th MAIL and on "450 4.7.1 Error: too much mail from":
    through a site queue, 5 delivered and 15 deferred (by that reply, or held
    by the shaping because of it), in one session, none sent again."""
    import asyncio

    from fastsend.config import loader
    from fastsend.delivery import pool
    from fastsend.delivery.mx import Host, Site
    from fastsend.outcome import TxnResult

    # anvil counts per client address: one address per variant of the test
    source = {"py": "127.0.0.21", "c": "127.0.0.22"}[client_twin]
    source = source[:-1] + str(int(source[-1]) + (2 if loop_kind == "uvloop" else 0))
    port = postfix.ports["rate"]
    cfg = loader.from_dict(
        {"delivery": {"pipeline": 20, "max_connections": 1}}, base_dir=str(tmp_path), files=False
    )
    site = Site("route:127.0.0.1", (Host("127.0.0.1", "127.0.0.1", port),))
    got: list[TxnResult] = []
    sessions_from = re.compile(rf": connect from \S+\[{re.escape(source)}\]")
    before = len(sessions_from.findall(postfix.log()))

    async def go() -> None:
        done = asyncio.Event()

        def report(results: list[TxnResult], ip: str, mx: str) -> None:
            got.extend(results)
            if len(got) >= 20:
                done.set()

        q = pool.SiteQueue(site, [source], cfg, report, "localhost")
        q.push([envelope(i, [f"rate{i}@x.test"]) for i in range(20)])
        await asyncio.wait_for(done.wait(), 30)
        await q.close()

    run(go())
    delivered = [r for r in got if r.outcomes[0].delivered]
    late = [o for r in got for o in r.outcomes if not o.delivered]
    assert len(delivered) == 5 and len(late) == 15 and all(o.deferred for o in late)
    # the reply itself (the shaping may hold the rest of the group on it)
    assert f"450 4.7.1 Error: too much mail from {source}" in " ".join(
        f"{o.code} {o.enhanced} {o.text}" for o in late
    )
    assert len(sessions_from.findall(postfix.log())) - before == 1
