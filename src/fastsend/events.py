"""The JSON-lines event log: one line per delivery-attempt outcome and state change.

Each line has: time (unix seconds), event (delivered / deferred / bounced /
expired / suppressed / ...), id (message id), campaign, rcpt, source_ip, mx,
code, enhanced, text, attempt. Written by the supervisor only (it owns the
state transitions), buffered and flushed each scheduler tick, appended with
O_APPEND so several writers (or log shippers reading along) stay safe.
It never logs message bodies or credentials.

A batch of events is encoded to JSON lines in one call (msgspec's
``encode_lines``: the same bytes orjson writes per event, without a call and a
bytes object per event); listeners get the batch as the list of dicts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import msgspec

_encode_lines = msgspec.json.Encoder().encode_lines


class EventLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._buf: list[bytes] = []
        self._fd = -1
        self.listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self._reported: set[str] = set()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def emit(self, event: dict[str, Any]) -> None:
        self.emit_many([event])

    def emit_many(self, events: list[dict[str, Any]]) -> None:
        if self._fd >= 0 and events:
            self._buf.append(_encode_lines(events))  # newline-terminated lines
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:  # one broken listener must not starve the others
                self._report(listener)

    def _report(self, listener: Callable[..., Any]) -> None:
        name = getattr(listener, "__qualname__", repr(listener))
        if name not in self._reported:
            self._reported.add(name)
            import sys
            import traceback

            print(f"fastsend: event listener {name} failed (reported once):", file=sys.stderr)
            traceback.print_exc()

    def flush(self) -> None:
        if self._buf and self._fd >= 0:
            data = b"".join(self._buf)
            self._buf.clear()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
