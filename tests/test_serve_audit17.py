"""Audit of `fastsend serve` against hostile peers and tenants, session 17.

Real parts: the SMTP listeners on loopback over raw sockets (asyncio streams), a
ServeContext on a temporary spool, `fastsend serve` as a process where the whole
server is what is judged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

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
    async def open(cls, port: int) -> _Peer:
        r, w = await asyncio.open_connection("127.0.0.1", port)
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
    taken."""
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
            for _ in range(2):  # 2 x 280 KB held, messages not ended
                p = await _Peer.open(port)
                peers.append(p)
                assert (await p.begin(rcpt)).startswith(b"354")
                await p.content(280_000)
            for _ in range(100):  # (read by the server)
                if guard.held >= 2 * 270_000:
                    break
                await asyncio.sleep(0.02)
            late = await _Peer.open(port)
            assert (await late.begin(rcpt)).startswith(b"354")
            await late.content(280_000)
            got = await late.end()
            assert got.startswith(b"452 4.3.1"), got
            assert guard.held <= 700_000 and guard.dropped == 1
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
        a, b = await _Peer.open(port), await _Peer.open(port)
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
