"""Repeated log lines held back: a client that repeats a bad request cannot fill the disk.

NAME
    fastsend.serve.lograte -- RepeatLimit and OneLine, logging filters; install(handlers).

DESCRIPTION
    Lines alike are records of the same logger, level and text before its
    arguments (``record.msg``: "API: 401 %s %s from %s" is one kind, whatever the
    path and address). Each kind may write ``burst`` lines at once and then one
    every ``60 / per_minute`` seconds (a token bucket). The first line held back
    in a run is written with " [lines like this are held back: N a minute]" (said
    again only after the kind was quiet long enough to have its burst back), and
    the next line of that kind that gets through says how many were held back
    since. Tracebacks (``exc_info``) go with their record. Kinds are forgotten
    when there are more than ``MAX_KINDS`` of them (the table stays small).

    :class:`OneLine` writes the control characters of a message (CR, LF, ...) as
    escapes: a client's text in a log line (a decoded request path, an address)
    cannot start a forged line.

    ``fastsend serve`` installs both on the root logger's handlers at start, so
    every logger (fastsend's, aiohttp's, asyncio's) is covered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["OneLine", "RepeatLimit", "install"]

MAX_KINDS = 4096


class RepeatLimit(logging.Filter):
    def __init__(
        self, burst: int = 10, per_minute: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        super().__init__()
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.lock = threading.Lock()
        # kind -> [tokens, time of the last update, lines held back, 1 once that was said]
        self.kinds: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        seen = getattr(record, "_fastsend_repeat", None)
        if seen is not None:  # another handler with the same limit: decided already
            return bool(seen)
        ok = self._decide(record)
        record._fastsend_repeat = ok
        return ok

    def _decide(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self.lock:
            st = self.kinds.get(kind)
            if st is None:
                if len(self.kinds) >= MAX_KINDS:
                    self.kinds.clear()
                st = self.kinds[kind] = [self.burst, now, 0.0, 0.0]
            st[0] = min(self.burst, st[0] + (now - st[1]) * self.rate)
            st[1] = now
            if st[0] >= 1.0:
                if st[0] >= self.burst:  # quiet for a while: a new run will be said again
                    st[3] = 0.0
                st[0] -= 1.0
                held, st[2] = int(st[2]), 0.0
                if held:
                    _append(record, f" [{held} more like this held back]")
                return True
            first = st[3] == 0.0
            if first:
                st[3] = 1.0
            else:
                st[2] += 1
        if first:  # say once per run that lines are held back, with this one's text
            record.exc_info = record.exc_text = None
            record.stack_info = None
            _append(record, f" [lines like this are held back: {self.rate * 60:g} a minute]")
            return True
        return False


class OneLine(logging.Filter):
    """Each record's message on one line: CR, LF and the other control characters of
    its text (a request's decoded path, an address, a peer's words) are written as
    escapes, so no client can forge a line of the log. A traceback (``exc_info``) keeps
    its lines: it is the server's own text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_fastsend_one_line", False):
            return True  # another handler escaped it already
        record._fastsend_one_line = True
        try:
            text = record.getMessage()
        except Exception:
            return True  # (logging reports the bad format itself)
        if not text.isprintable():
            record.msg = text.translate(_ESCAPES)
            record.args = None
        return True


# Every C0/C1 control character and the line/paragraph separators, as \xNN / \uNNNN.
_ESCAPES = {c: ascii(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}


def _append(record: logging.LogRecord, note: str) -> None:
    record.msg = f"{record.getMessage()}{note}"
    record.args = None  # (getMessage formats with args only when there are some)


def install(handlers: Iterable[logging.Handler], limit: RepeatLimit | None = None) -> RepeatLimit:
    """One limit shared by ``handlers`` (serve: the root logger's), then each message
    made one line (:class:`OneLine`; after the limit, which tells kinds apart by the
    text before the arguments)."""
    limit = limit or RepeatLimit()
    one_line = OneLine()
    for h in handlers:
        h.addFilter(limit)
        h.addFilter(one_line)
    return limit
