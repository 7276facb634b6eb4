"""Ready queues and connection pools of one worker, per destination site.

A :class:`SiteQueue` holds the envelopes ready for one site (the Postfix
"active queue" for that destination, bounded by the supervisor's window). Up to
``max_connections`` connections per source IP pull from it; each connection is
persistent and pipelined: it takes up to ``pipeline`` envelopes per write
group, reuses itself for up to ``max_messages_per_connection`` messages, and
closes (QUIT) after ``idle_timeout`` with nothing to do. Connections are spread
over the worker's source IPs round-robin.

A connection that cannot be opened tries the site's next host; when every host
fails, the envelopes it would have carried are answered with that failure
(deferred or failed), so nothing waits forever on a dead site.

It does not decide retries or touch the spool: outcomes go to ``report``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable
from typing import Any

from fastsend.config import Config
from fastsend.delivery.mx import Site
from fastsend.outcome import Envelope, Outcome, TxnResult
from fastsend.smtp.transport import ConnectOptions, SMTPConnection, Timeouts, connect

Report = Callable[[list[TxnResult], str, str], None]  # results, source_ip, mx


class SiteQueue:
    def __init__(
        self,
        site: Site,
        ips: list[str],
        config: Config,
        report: Report,
        helo: str,
        count: Callable[..., None] | None = None,
    ) -> None:
        self.site = site
        self.ips = ips or [""]
        self.config = config
        self.report = report
        self.helo = helo
        self.count: Callable[..., None] = count or (lambda name, n=1.0: None)
        self.pending: collections.deque[Envelope] = collections.deque()
        self.wakeup = asyncio.Event()
        self.conns_per_ip: dict[str, int] = dict.fromkeys(self.ips, 0)
        self._ip_cycle = itertools.cycle(self.ips)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        self.sending = 0  # pipelined groups written and not yet answered
        d = config.delivery
        t = d.command_timeout
        self.timeouts = Timeouts(
            connect=d.connect_timeout,
            greeting=t,
            ehlo=t,
            starttls=t,
            mail=t,
            rcpt=t,
            data=min(t, 120.0),
            data_block=min(t, 180.0),
            data_end=max(t, 600.0) if t >= 300 else t,
        )

    @property
    def active(self) -> int:
        return len(self.tasks)

    def push(self, envelopes: list[Envelope]) -> None:
        self.pending.extend(envelopes)
        self.wakeup.set()
        self._scale()

    def _scale(self) -> None:
        d = self.config.delivery
        limit = d.max_connections * len(self.ips)
        # One more connection per `pipeline` envelopes waiting, up to the limit.
        want = min(limit, max(1, -(-len(self.pending) // d.pipeline)))
        while self.active < want and not self.closing:
            ip = self._next_ip()
            if ip is None:
                break
            task = asyncio.get_running_loop().create_task(self._connection(ip))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _next_ip(self) -> str | None:
        limit = self.config.delivery.max_connections
        for _ in range(len(self.ips)):
            ip = next(self._ip_cycle)
            if self.conns_per_ip[ip] < limit:
                return ip
        return None

    def _take(self, limit: int = 1 << 30) -> list[Envelope]:
        n = min(self.config.delivery.pipeline, len(self.pending), limit)
        pop = self.pending.popleft
        return [pop() for _ in range(n)]

    async def _open(self, ip: str) -> SMTPConnection | Outcome:
        d = self.config.delivery
        last: Outcome | None = None
        for host in self.site.hosts[:3]:
            opts = ConnectOptions(
                host=host.address,
                port=host.port,
                source_ip=ip or None,
                helo_name=self.helo,
                tls=d.tls,  # type: ignore[arg-type]  # validated by config
                max_messages=d.max_messages_per_connection,
                timeouts=self.timeouts,
                server_hostname=host.name,
            )
            conn = await connect(opts)
            if not isinstance(conn, Outcome):
                self.count("connections_opened")
                # Postfix-style "name[address]:port" for the event log.
                conn.mx = (
                    f"{host.name}[{host.address}]:{host.port}"
                    if host.name != host.address
                    else f"{host.address}:{host.port}"
                )
                return conn
            self.count("connections_failed")
            last = conn
            if conn.failed:  # a 5xx greeting is an answer, not a dead host
                break
        assert last is not None
        return last

    async def _connection(self, ip: str) -> None:
        self.conns_per_ip[ip] += 1
        try:
            while self.pending and not self.closing:
                conn = await self._open(ip)
                if isinstance(conn, Outcome):
                    batch = self._take()
                    if batch:
                        self.report(
                            [TxnResult(e.tag, [conn] * len(e.rcpts)) for e in batch],
                            ip,
                            conn.mx,
                        )
                    continue
                mx = conn.mx
                try:
                    while conn.usable:
                        if not self.pending:
                            if self.closing:
                                break
                            self.wakeup.clear()
                            try:
                                await asyncio.wait_for(
                                    self.wakeup.wait(), self.config.delivery.idle_timeout
                                )
                            except TimeoutError:
                                break
                            if not self.pending:
                                continue
                        batch = self._take(conn.remaining)
                        self.sending += 1
                        try:
                            results = await conn.send(batch)
                        finally:
                            self.sending -= 1
                        self.report(results, ip, mx)
                finally:
                    if conn.usable:
                        await conn.quit()
                    else:
                        conn.close()
                if not self.pending:
                    break
        finally:
            self.conns_per_ip[ip] -= 1
            if self.pending and not self.closing:
                self._scale()

    async def close(self) -> None:
        self.closing = True
        self.wakeup.set()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
