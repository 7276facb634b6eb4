"""fastsend sink: a fast, fault-injecting SMTP server for tests and load tests.

Three ways to run it:

In-process, on a running loop (the test's own loop)::

    from fastsend.sink import Sink, SinkConfig
    sink = Sink(SinkConfig(keep_messages=True))
    await sink.start()                   # binds 127.0.0.1 on a free port
    ... deliver to ("127.0.0.1", sink.port) ...
    sink.messages[0].recipients, sink.stats.faults
    await sink.aclose()

In a background thread with its own uvloop loop (synchronous tests)::

    from fastsend.sink import SinkThread
    with SinkThread(defer_rate=0.0, count=0) as s:   # any SinkConfig field
        smtplib.SMTP(s.host, s.port).sendmail(...)
        s.wait_messages(1)               # -> list[ReceivedMessage]
        s.stats.as_dict()

As the real command, in a subprocess (what load tests and CLI tests use)::

    from fastsend.sink import SinkProcess
    with SinkProcess("--log", "/tmp/log.jsonl") as p:  # extra `fastsend sink` options
        ... deliver to (p.host, p.port) ...
    p.returncode, p.stdout                  # stopped with SIGTERM; stdout has the summary

Faults come from the recipient's local part: ``tempfail-*`` (451),
``deferN-*`` (451 for the first N attempts at the address), ``permfail-*``
(550 5.1.1), ``policy-*`` (550 5.7.1), ``mailboxfull-*`` (552 5.2.2), ``421-*``
(421 and close), ``disconnect-in-data*`` (drop after
354), ``slow-*`` (delayed RCPT and end-of-data replies); see
:mod:`fastsend.sink.server` for the rest.

This package does not relay or queue anything; accepted mail is counted,
optionally logged (JSON lines), saved (one file per message) or kept in memory.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from fastsend.procs import PARENT_ENV
from fastsend.sink.server import (
    FAULT_KINDS,
    ReceivedMessage,
    Sink,
    SinkConfig,
    SinkStats,
    parse_fault_text,
)

__all__ = [
    "FAULT_KINDS",
    "ReceivedMessage",
    "Sink",
    "SinkConfig",
    "SinkProcess",
    "SinkStats",
    "SinkThread",
    "parse_fault_text",
]


class SinkThread:
    """A :class:`Sink` on its own event loop in a daemon thread.

    Keyword arguments are :class:`SinkConfig` fields (``keep_messages`` is on
    by default here), or pass ``config=``. ``loop="asyncio"`` uses the plain
    asyncio loop instead of uvloop.
    """

    def __init__(
        self, config: SinkConfig | None = None, *, loop: str = "uvloop", **fields: Any
    ) -> None:
        if config is None:
            fields.setdefault("keep_messages", True)
            config = SinkConfig(**fields)
        elif fields:
            raise TypeError("pass either config= or SinkConfig fields, not both")
        if loop not in ("uvloop", "asyncio"):
            raise ValueError(f"loop must be 'uvloop' or 'asyncio', not {loop!r}")
        self.sink = Sink(config)
        self._loop_kind = loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------ what tests read

    @property
    def host(self) -> str:
        return self.sink.addresses[0][0]

    @property
    def port(self) -> int:
        return self.sink.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        return self.sink.messages

    @property
    def stats(self) -> SinkStats:
        return self.sink.stats

    def wait_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until at least ``n`` messages were accepted; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while self.sink.stats.messages < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink got {self.sink.stats.messages} of {n} messages")
            time.sleep(0.005)
        return list(self.sink.messages)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> SinkThread:
        self._thread = threading.Thread(target=self._main, name="fastsend-sink", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise TimeoutError("sink thread did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(self.sink.stop)
            except RuntimeError:  # loop already closed
                pass
            thread.join(10)

    def __enter__(self) -> SinkThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        if self._loop_kind == "uvloop":
            import uvloop

            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        else:
            factory = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            self._loop = runner.get_loop()
            runner.run(self._serve())

    async def _serve(self) -> None:
        try:
            await self.sink.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self.sink.wait_done()
        finally:
            await self.sink.aclose()


class SinkProcess:
    """``python -m fastsend sink`` in a subprocess, started and stopped for you.

    ``args`` are extra ``fastsend sink`` options. It listens on
    ``listen`` (default: a free port on 127.0.0.1) and returns from
    ``__enter__`` once the sink prints that it listens. ``stop()`` (or leaving
    the ``with`` block) sends SIGTERM and collects ``returncode``, ``stdout``
    (listening lines and the summary) and ``stderr``. With ``die_with_parent``
    the sink (and its workers) are killed when this process dies, even by a
    kill -9 (``fastsend demo``); start it from the main thread then (the kernel
    signals the child when the thread that started it ends: fastsend.procs).
    """

    def __init__(
        self,
        *args: str,
        listen: str = "127.0.0.1:0",
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        if "--quiet" in args or "-q" in args:
            raise ValueError("SinkProcess reads the listening line: do not pass --quiet")
        self.args = [sys.executable, "-m", "fastsend", "sink", "--listen", listen, *args]
        self.env = env
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.addresses: list[tuple[str, int]] = []
        self.returncode: int | None = None
        self.stdout = ""
        self.stderr = ""
        self._lines: list[str] = []

    @property
    def host(self) -> str:
        return self.addresses[0][0]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def start(self, timeout: float = 20.0) -> SinkProcess:
        env = dict(os.environ if self.env is None else self.env)
        if self.die_with_parent:
            env[PARENT_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        pending = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise TimeoutError(f"sink did not start: {self.stderr.strip()}")
            chunk = os.read(fd, 65536)  # unbuffered: select() must see what is left
            if not chunk:
                self.stop()
                raise RuntimeError(f"sink exited ({self.returncode}): {self.stderr.strip()}")
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                self._lines.append(line + "\n")
                if line.startswith("listening on "):
                    host, _, port = line.split()[2].rpartition(":")
                    self.addresses.append((host.strip("[]"), int(port)))
                elif line == "ready":
                    self._lines.append(pending.decode("utf-8", "replace"))
                    return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the sink, wait for it, collect its output; returns the exit code."""
        proc = self.proc
        if proc is None:
            return -1
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        self.stdout = "".join(self._lines) + (out or b"").decode("utf-8", "replace")
        self.stderr = (err or b"").decode("utf-8", "replace")
        self.returncode = proc.returncode
        return proc.returncode

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the sink to exit by itself (e.g. ``--count``), then collect output."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.stop(timeout=timeout)

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.returncode is None:
            self.stop()
