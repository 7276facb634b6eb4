"""Audit of `fastsend serve` against hostile peers and tenants, session 17.

Real parts: the SMTP listeners on loopback over raw sockets (asyncio streams), a
ServeContext on a temporary spool, `fastsend serve` as a process where the whole
server is what is judged.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests._serve_helpers import Served, http

from fastsend.config import ConfigError, from_dict
from fastsend.serve.context import ServeContext, open_context
from fastsend.serve.listeners import start_listeners


def _ctx(tmp_path: Path, **tables: Any) -> ServeContext:
    return open_context(from_dict({"spool": {"dir": str(tmp_path / "spool")}, **tables}))


class _Peer:
    """One raw SMTP session: commands written as given, replies read whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> _Peer:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        peer = cls(r, w)
        assert (await peer.reply()).startswith(b"220")
        return peer

    async def reply(self) -> bytes:
        out = b""
        while True:
            line = await asyncio.wait_for(self.r.readline(), 10)
            out += line
            if len(line) < 4 or line[3:4] != b"-":
                return out

    async def cmd(self, line: bytes) -> bytes:
        self.w.write(line + b"\r\n")
        return await self.reply()

    async def begin(self, rcpt: bytes, size: int = 0) -> bytes:
        """EHLO, MAIL (SIZE= when given), RCPT; the reply to MAIL if not 250, else DATA's."""
        assert (await self.cmd(b"EHLO peer.example")).startswith(b"250")
        got = await self.cmd(b"MAIL FROM:<>" + (b" SIZE=%d" % size if size else b""))
        if not got.startswith(b"250"):
            return got
        assert (await self.cmd(b"RCPT TO:<" + rcpt + b">")).startswith(b"250")
        return await self.cmd(b"DATA")

    async def content(self, n: int) -> None:
        line = b"x" * 998 + b"\r\n"
        self.w.write(b"Subject: load\r\n\r\n" + line * (n // len(line)))
        await self.w.drain()

    async def end(self) -> bytes:
        self.w.write(b".\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except OSError:
            pass


# ------------------------------------------- SMTP listeners: message bytes held at once
def test_intake_holds_at_most_max_held_bytes_of_content(tmp_path: Path) -> None:
    """The intake kept every session's message in memory until its end (and then
    until its parse): 200 sessions x max_size (10 MB) was the only bound, 2 GB from
    anyone on the Internet. Now the sessions' content together stays within
    [intake] max_held_bytes: the message that would cross it is read and dropped,
    and its end answered 452 4.3.1 (its sender tries again later), as is a MAIL
    FROM whose SIZE= does not fit; once the others are done the same message is
    taken. One peer address holds at most a quarter of it (at least max_size)."""
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example",
              "max_size": 300_000, "max_held_bytes": 700_000}  # fmt: skip
    ctx = _ctx(tmp_path, intake=intake)
    rcpt = b"b-1-x@bounces.example"

    async def main() -> None:
        servers = await start_listeners(ctx)
        guard = servers.intake.guard  # type: ignore[union-attr]
        port = int(servers[0].sockets[0].getsockname()[1])
        peers: list[_Peer] = []
        try:
            for src in ("127.0.0.2", "127.0.0.3"):  # 2 x 280 KB held, messages not ended
                p = await _Peer.open(port, src)
                peers.append(p)
                assert (await p.begin(rcpt)).startswith(b"354")
                await p.content(280_000)
            for _ in range(100):  # (read by the server)
                if guard.held >= 2 * 270_000:
                    break
                await asyncio.sleep(0.02)
            # A second message from .2 at once: over that address's share (300 KB).
            again = await _Peer.open(port, "127.0.0.2")
            assert (await again.begin(rcpt)).startswith(b"354")
            await again.content(50_000)
            assert (await again.end()).startswith(b"452 4.3.1")
            await again.close()
            late = await _Peer.open(port, "127.0.0.4")
            assert (await late.begin(rcpt)).startswith(b"354")
            await late.content(280_000)
            got = await late.end()
            assert got.startswith(b"452 4.3.1"), got
            assert guard.held <= 700_000 and guard.dropped == 2
            # The session goes on; a declared size that does not fit is refused at once.
            assert (await late.cmd(b"RSET")).startswith(b"250")
            sized = await late.cmd(b"MAIL FROM:<> SIZE=250000")
            assert sized.startswith(b"452 4.3.1"), sized
            for p in peers:  # the first two are whole and taken
                assert (await p.end()).startswith(b"250"), p
            assert guard.held < 10_000
            assert (await late.begin(rcpt, size=250_000)).startswith(b"354")
            await late.content(280_000)
            assert (await late.end()).startswith(b"250")
            peers.append(late)
        finally:
            for p in peers:
                await p.close()
            for s in servers:
                s.close()
                await s.wait_closed()
            servers.shutdown()
        assert guard.held == 0

    asyncio.run(main())
    ctx.close()


def test_bdat_content_counts_against_max_held_bytes(tmp_path: Path) -> None:
    """BDAT chunks are held across commands until LAST: a session past the budget
    gets 452 4.3.1 for its chunks and the transaction is not taken."""
    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example",
              "max_size": 200_000, "max_held_bytes": 300_000}  # fmt: skip
    ctx = _ctx(tmp_path, intake=intake)

    async def main() -> None:
        servers = await start_listeners(ctx)
        guard = servers.intake.guard  # type: ignore[union-attr]
        port = int(servers[0].sockets[0].getsockname()[1])
        a, b = await _Peer.open(port, "127.0.0.2"), await _Peer.open(port, "127.0.0.3")
        try:
            for p in (a, b):
                assert (await p.cmd(b"EHLO peer.example")).startswith(b"250")
                assert (await p.cmd(b"MAIL FROM:<>")).startswith(b"250")
                assert (await p.cmd(b"RCPT TO:<b-1-x@bounces.example>")).startswith(b"250")
            chunk = b"Subject: x\r\n\r\n" + b"y" * 180_000
            a.w.write(b"BDAT %d\r\n" % len(chunk) + chunk)
            assert (await a.reply()).startswith(b"250")
            b.w.write(b"BDAT %d\r\n" % len(chunk) + chunk)
            assert (await b.reply()).startswith(b"452 4.3.1")
            b.w.write(b"BDAT 2 LAST\r\nz\n")
            assert (await b.reply()).startswith(b"452 4.3.1")
            a.w.write(b"BDAT 2 LAST\r\nz\n")
            assert (await a.reply()).startswith(b"250")
            assert guard.held < 10_000
        finally:
            for p in (a, b):
                await p.close()
            for s in servers:
                s.close()
                await s.wait_closed()
            servers.shutdown()

    asyncio.run(main())
    ctx.close()


def test_max_held_bytes_below_max_size_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_held_bytes"):
        from_dict({"spool": {"dir": str(tmp_path)},
                   "intake": {"max_size": 2_000_000, "max_held_bytes": 1_000_000}})  # fmt: skip


# ------------------------------------------- campaigns a tenant makes: a daily cap
TPL = {"from": "a@evil.example", "subject": "Hi {{ name }}", "text": "Dear {{ name }}"}


def test_campaigns_a_tenant_makes_are_capped_per_day(tmp_path: Path) -> None:
    """Every POST /v1/campaigns and every new inline template of POST /v1/messages
    made a campaign kept in the spool for good (spec up to 16 MiB, a row in every
    listing, an entry in the template index): one tenant looping over new templates
    grew them without bound. Now [api] max_campaigns_per_day (3 here) holds per
    tenant: the next is 429 with Retry-After naming the setting, a known template
    still takes mail, another tenant is not affected, and a restart counts the
    campaigns already in the spool."""
    s = Served(tmp_path, "127.0.0.1:9", api="max_campaigns_per_day = 3",
               serve_args=("--no-workers",))  # fmt: skip
    try:
        for i in range(2):
            st, got = s.req("POST", "/v1/campaigns", {"name": f"c{i}", "template": TPL})
            assert st == 201, got
        one = {"to": "r@example.org", "template": TPL, "variables": {"name": "R"}}
        st, got = s.req("POST", "/v1/messages", one)
        assert st == 202, got  # the third campaign: the template's
        st, got = s.req("POST", "/v1/messages", one)
        assert st == 202, got  # the same template: no new campaign
        other = {**one, "template": {**TPL, "subject": "Other {{ name }}"}}
        st, got = s.req("POST", "/v1/messages", other)
        assert st == 429 and "max_campaigns_per_day" in got["error"]["message"], got
        st, got = s.req("POST", "/v1/campaigns", {"name": "c3", "template": TPL})
        assert st == 429, got
        st, got = s.req("POST", "/v1/campaigns", {"name": "a", "template": TPL}, tenant="acme")
        assert st == 201, got  # acme counts its own
        st, listed = s.req("GET", "/v1/campaigns")
        assert len(listed["campaigns"]) == 3, listed
        s.stop()
        s.start()
        st, got = s.req("POST", "/v1/campaigns", {"name": "c4", "template": TPL})
        assert st == 429, got
        st, got = s.req("POST", "/v1/messages", one)
        assert st == 202, got
    finally:
        s.stop()


# ------------------------------------------- a graceful stop: HTTP served through the drain
def test_the_api_and_tracking_are_served_while_a_stop_drains(tmp_path: Path) -> None:
    """SIGTERM while a message is on a connection to a receiver that never answers
    (the drain waits [delivery] drain_limit, 3 s here): every HTTP port closed
    first, so for the whole drain the API and the public tracking and unsubscribe
    routes refused connections (a recipient's one-click unsubscribe, tried once by
    its mailbox provider, was lost). Now they are served until the drain ends; mail
    the API takes meanwhile is spooled (queued for the next start, its "accepted"
    event written) and the process still exits 0."""
    import signal
    import socket
    import time

    import orjson

    from conftest import free_port
    from fastsend.spool import open_spool

    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)  # completes handshakes, never says a word
    public = free_port()
    s = Served(tmp_path, f"127.0.0.1:{mute.getsockname()[1]}",
               delivery="drain_limit = 3", api=f'public_listen = "127.0.0.1:{public}"')  # fmt: skip
    try:
        msg = {"from": "a@example.com", "subject": "s", "text": "t"}
        st, got = s.req("POST", "/v1/messages", {**msg, "to": "held@example.org"})
        assert st == 202, got
        held = got["messages"][0]["ids"][0]
        deadline = time.monotonic() + 60
        while s.req("GET", f"/v1/messages/{held}")[1]["state"] != "inflight":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        s.wait_line("draining")
        t0 = time.monotonic()
        st, got = s.req("POST", "/v1/messages", {**msg, "to": "late@example.org"})
        assert st == 202, got
        late = got["messages"][0]["ids"][0]
        st, page = http("GET", f"http://127.0.0.1:{public}/u/not-a-token")
        assert st in (400, 404), (st, page)  # the public listener answers
        assert time.monotonic() - t0 < 2.5 and s.proc.poll() is None
        assert s.proc.wait(30) == 0
        spool = open_spool(str(tmp_path / "spool"), readonly=True)
        try:
            m = spool.message(late)
            assert m is not None and m["state"] == "queued", m
        finally:
            spool.close()
        log = (tmp_path / "spool" / "events.jsonl").read_bytes().splitlines()
        evs = [orjson.loads(x) for x in log if x.strip()]
        assert any(e.get("event") == "accepted" and late in (e.get("ids") or [e.get("id")])
                   for e in evs), evs[-5:]  # fmt: skip
    finally:
        s.stop()
        mute.close()


# ------------------------------------------- a new campaign's held events survive a kill
def test_a_kill_after_a_campaign_leaves_staging_loses_no_accepted_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/campaigns without an Idempotency-Key holds its rows' "accepted" events
    until the campaign is complete; serve killed -9 right after the campaign left
    staging (active: its mail is sent) and before the events were told lost them for
    good (no retry would tell them): mail sent that was never said accepted. Now the
    rows are noted (fsynced) first, and the next start tells them ("resumed")."""
    import orjson

    monkeypatch.setenv("FASTSEND_TEST_FAULT", "idem-kill-after-note")  # (the first start)
    s = Served(tmp_path, "127.0.0.1:9", serve_args=("--no-workers",))
    monkeypatch.delenv("FASTSEND_TEST_FAULT")
    try:
        rows = [{"email": f"r{i}@example.org", "name": f"R{i}"} for i in range(50)]
        with pytest.raises(aiohttp.ClientError):
            s.req("POST", "/v1/campaigns", {"name": "k", "template": TPL, "recipients": rows})
        assert s.proc.wait(20) == -9
        log = tmp_path / "spool" / "events.jsonl"
        before = log.read_bytes() if log.exists() else b""
        assert b'"accepted"' not in before  # lost, as things were
        s.start()
        st, listed = s.req("GET", "/v1/campaigns")
        assert [c["status"] for c in listed["campaigns"]] == ["active"], listed
        for mid in (1, 25, 50):
            st, m = s.req("GET", f"/v1/messages/{mid}")
            assert st == 200 and [e["event"] for e in m["events"]] == ["accepted"], m
        told = [orjson.loads(x) for x in log.read_bytes().splitlines() if b'"accepted"' in x]
        assert told and all(e.get("resumed") for e in told), told[:2]
        n = log.read_bytes().count(b'"accepted"')
        s.stop()
        s.start()  # told once: the journal is done with
        assert log.read_bytes().count(b'"accepted"') == n
        assert not (tmp_path / "spool" / "held.jsonl").exists()
    finally:
        s.stop()


class _Counting:
    """Counts the campaigns a spool's ``campaigns()`` reads (the real spool's answer)."""

    def __init__(self, spool: Any) -> None:
        self.inner = spool.campaigns
        self.rows = 0

    def __call__(self, *args: Any, **kw: Any) -> list[Any]:
        got = self.inner(*args, **kw)
        self.rows += len(got)
        return list(got)


def test_a_cancel_and_send_loop_neither_reads_every_campaign_nor_makes_them_unbounded(
    tmp_path: Path,
) -> None:
    """A tenant cancels its transactional campaign and sends a message, again and again:
    each message after a cancel read every campaign of the tenant on the event loop
    (300 campaigns here: 300 rows decoded a cycle, growing with each) and made a new
    campaign, without limit. Now the kept one, ended, is made anew without a search,
    and the new one counts against [api] max_campaigns_per_day (429 with Retry-After,
    and 451 4.7.0 at SMTP submission, which shares the campaign)."""
    from tests.test_serve_api import serving

    from fastsend.accept import check_campaign
    from fastsend.message import Campaign

    msg = {"from": "a@example.com", "to": "r@example.org", "subject": "s", "text": "t"}

    async def main() -> None:
        async with serving(str(tmp_path / "spool"), max_campaigns_per_day=310) as c:
            spec = check_campaign(Campaign.from_dict(TPL))
            for _ in range(300):
                c.ctx.spool.create_campaign(spec, name="old", tenant="acme")
            st, got = await c.req("POST", "/v1/messages", msg)
            assert st == 202, got
            count = _Counting(c.ctx.spool)
            c.ctx.spool.campaigns = count  # type: ignore[method-assign]
            statuses = []
            for _ in range(12):
                cid = c.ctx.spool.owner(got["messages"][0]["ids"][0])[0]
                st, _ = await c.req("POST", f"/v1/campaigns/{cid}/cancel")
                assert st == 200
                st, got = await c.req("POST", "/v1/messages", msg)
                statuses.append(st)
                if st != 202:
                    break
            assert count.rows == 0, count.rows  # no search after a cancel
            # 300 + the first + 9 anew = 310: the 10th cycle's is refused
            assert statuses == [202] * 9 + [429], (statuses, got)
            assert "max_campaigns_per_day" in got["error"]["message"], got

    asyncio.run(main())


def test_the_intake_keeps_only_what_it_parses_of_a_report(tmp_path: Path) -> None:
    """A DSN returning a 2.5 MB message: the intake held all of it in memory (up to
    max_size, 10 MB, a session), though only its first parse_max_bytes are ever
    parsed. Now the rest is read and dropped as it arrives: the session holds about
    parse_max_bytes, the report is still parsed (the hard bounce suppresses), and
    SIZE is still enforced on the whole."""
    from tests._serve_helpers import dsn

    from fastsend import msgid

    intake = {"listen": "127.0.0.1:0", "verp_domain": "bounces.example.com",
              "max_size": 3_000_000, "max_held_bytes": 3_000_000,
              "parse_max_bytes": 100_000}  # fmt: skip
    ctx = _ctx(tmp_path, intake=intake)
    cid = ctx.tenant_campaign("acme")
    mid = ctx.inject(cid, [("gone@example.org", "example.org", b"{}")])[0]
    report = dsn("gone@example.org", msgid.token(mid, ctx.secret)).replace("\n", "\r\n")
    rcpt = f"b-{msgid.token(mid, ctx.secret)}@bounces.example.com".encode()

    async def main() -> None:
        servers = await start_listeners(ctx)
        guard = servers.intake.guard  # type: ignore[union-attr]
        port = int(servers[0].sockets[0].getsockname()[1])
        p = await _Peer.open(port)
        try:
            assert (await p.begin(rcpt)).startswith(b"354")
            p.w.write(report.rstrip("\r\n").encode() + b"\r\n")
            line = b"x" * 998 + b"\r\n"
            most = 0
            for _ in range(25):  # 2.5 MB of returned body, in 100 KB writes
                p.w.write(line * 100)
                await p.w.drain()
                await asyncio.sleep(0.01)
                most = max(most, guard.held)
            got = await p.end()
            assert got.startswith(b"250 2.0.0 Ok: 1 event"), got
            assert most < 700_000, most  # (it was the whole 2.5 MB)
            # the whole still counts against SIZE
            assert (await p.begin(rcpt)).startswith(b"354")
            for _ in range(31):
                p.w.write(line * 100)
            got = await p.end()
            assert got.startswith(b"552 5.3.4"), got
        finally:
            await p.close()
            for s in servers:
                s.close()
                await s.wait_closed()
            servers.shutdown()

    asyncio.run(main())
    assert ctx.suppression.contains("gone@example.org", tenant="acme")
    ctx.close()


def test_keep_bytes_cuts_the_message_the_protocol_hands_over() -> None:
    """ServerProtocol(keep_bytes=N): DATA and BDAT hand over the message's first N
    bytes; a message of exactly SIZE is taken whole when N is 0 and cut when not."""
    from fastsend.smtp.server import Message, ServerConfig, ServerProtocol

    def session(keep: int, body: bytes, bdat: bool) -> bytes:
        p = ServerProtocol(ServerConfig(max_message_size=len(body), keep_bytes=keep))
        p.start()
        cmds = b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@b.example>\r\n"
        cmds += b"BDAT %d LAST\r\n" % len(body) + body if bdat else b"DATA\r\n"
        p.receive_data(cmds)
        msg = None
        while msg is None:
            ev = p.next_event()
            if isinstance(ev, Message):
                msg = ev
                break
            if getattr(ev, "needs_reply", False):
                p.accept()
                if not bdat and type(ev).__name__ == "DataStart":
                    for i in range(0, len(body), 7000):  # in pieces
                        p.receive_data(body[i : i + 7000])
                    p.receive_data(b".\r\n")
            elif type(ev).__name__ == "_NeedData":
                raise AssertionError(p.data_to_send())
        return msg.data

    body = b"".join(b"line %06d .. padding padding\r\n" % i for i in range(3000))
    for bdat in (False, True):
        whole = session(0, body, bdat)
        assert whole.rstrip(b"\r\n") == body.rstrip(b"\r\n")
        cut = session(10_000, body, bdat)
        assert body.startswith(cut) and 9_000 < len(cut) <= 10_002, len(cut)


# ------------------------------------------- one tenant's big batch does not hold the loop
def test_a_big_batch_is_decoded_off_the_loop_and_checked_in_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/messages with a 16 MiB batch of small values (1,000 template messages
    of 1,400 variables each) held serve's one event loop for 3.4 s: every tenant's
    requests, tracking redirects, the SMTP listeners and the supervisor's dispatch
    waited (a tenant sending such batches in a row stopped the server). Now a body
    over 256 KiB is decoded and checked in a thread (as POST /v1/campaigns' is),
    and the per-message checks let the loop run other tasks between messages
    (measured: the longest stall 3.4 s -> 0.2 s, the spool's one transaction);
    POST /v1/suppressions' body too (16 MiB of addresses: ~0.5 s on the loop)."""
    import threading

    from tests.test_serve_api import serving

    from fastsend.serve import api as api_mod
    from fastsend.serve import api_campaigns, api_messages

    threads: list[str] = []
    real = api_mod.decode_body

    def decode(body: bytes, typ: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(body, typ)

    monkeypatch.setattr(api_messages, "decode_body", decode)
    monkeypatch.setattr(api_campaigns, "decode_body", decode)
    monkeypatch.setattr(api_messages, "YIELD_EVERY", 0.0)  # (a turn between any two)
    tpl = {"from": "a@example.com", "subject": "s", "text": "t {{ k1 }}"}
    msgs = [{"template": tpl, "to": f"r{i}@example.org",
             "variables": {f"k{j}": j for j in range(300)}} for i in range(200)]  # fmt: skip

    async def main() -> None:
        async with serving(str(tmp_path / "spool")) as c:
            turns: list[int] = []
            ticks = 0
            done = False

            async def other() -> None:
                nonlocal ticks
                while not done:
                    ticks += 1
                    await asyncio.sleep(0)

            real_prepare = api_messages.MessagesHandler.prepare

            def prepare(self: Any, *a: Any, **kw: Any) -> Any:
                turns.append(ticks)
                return real_prepare(self, *a, **kw)

            monkeypatch.setattr(api_messages.MessagesHandler, "prepare", prepare)
            task = asyncio.create_task(other())
            st, got = await c.req("POST", "/v1/messages", {"messages": msgs})
            done = True
            await task
            assert st == 202 and got["accepted"] == 200, got
            # the other task ran between the checks of one message and the next
            assert len(set(turns)) == len(turns) == 200, turns[:10]
            # POST /v1/suppressions: a body of 100,000 addresses, decoded in a thread too
            many = {"addresses": [f"s{i}@example.org" for i in range(100_000)]}
            st, got = await c.req("POST", "/v1/suppressions", many)
            assert st == 413, got

    asyncio.run(main())
    assert len(threads) == 2 and "MainThread" not in threads, threads


def test_a_new_campaigns_rows_and_events_go_in_parts_before_it_is_claimable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/campaigns with 300,000 recipients and no Idempotency-Key spooled them
    in one transaction and then told their "accepted" events and indexed them in one
    go: serve's loop (every tenant, the listeners, the supervisor) stood still 2.6 s.
    The campaign is staging until every row is in, so its rows now go in parts and
    their events are told a part at a time, the loop free in between, before it
    leaves staging (nothing is claimed before its "accepted"): the longest stall
    measured 2.6 s -> 0.6 s."""
    from tests.test_serve_api import serving

    from fastsend.serve import api_campaigns, idempotency

    monkeypatch.setattr(api_campaigns, "CHUNK", 10)
    rows = [{"email": f"r{i}@example.org", "name": "N"} for i in range(50)]

    async def main() -> None:
        async with serving(str(tmp_path / "spool")) as c:
            ticks = 0
            done = False

            async def other() -> None:
                nonlocal ticks
                while not done:
                    ticks += 1
                    await asyncio.sleep(0)

            spooled: list[int] = []
            real_accept = api_campaigns.accept_rows

            def accept(request: Any, cid: int, part: list[Any], **kw: Any) -> list[int]:
                spooled.append(ticks)
                return real_accept(request, cid, part, **kw)

            told: list[tuple[int, str]] = []
            real_emit = c.ctx.acceptor.emit_accepted

            def emit(cid: int, *a: Any, **kw: Any) -> None:
                told.append((ticks, c.ctx.spool.get_campaign(cid).status))  # type: ignore[union-attr]
                real_emit(cid, *a, **kw)

            monkeypatch.setattr(api_campaigns, "accept_rows", accept)
            monkeypatch.setattr(c.ctx.acceptor, "emit_accepted", emit)
            task = asyncio.create_task(other())
            st, got = await c.req("POST", "/v1/campaigns",
                                  {"name": "p", "template": TPL, "recipients": rows})  # fmt: skip
            done = True
            await task
            assert st == 201 and got["accepted"] == 50, got
            assert len(spooled) == 5 and len(set(spooled)) == 5, spooled
            assert len(told) == 5 and len({t for t, _ in told}) == 5, told
            assert {s for _, s in told} == {"staging"}, told
            st, m = await c.req("GET", "/v1/messages/50")
            assert st == 200 and [e["event"] for e in m["events"]] == ["accepted"], m
            assert c.ctx.spool.get_campaign(got["id"]).status == "active"  # type: ignore[union-attr]
        assert idempotency.HeldJournal.NAME not in os.listdir(tmp_path / "spool") or (
            b'"told"' in (tmp_path / "spool" / idempotency.HeldJournal.NAME).read_bytes()
        )

    asyncio.run(main())
