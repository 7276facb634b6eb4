"""JSON from untrusted peers, read with orjson but never nested past a depth.

orjson (3.8) reads nesting of any depth and builds the Python objects by
recursing on the C stack: 150,000 ``[`` (300 KB) overflow it and the process
dies with SIGSEGV, nothing to catch. A tenant's JSON-lines list uploaded to
``fastsend serve`` with one such row, or an unauthenticated post to a provider
webhook, took the whole node down (every tenant's API, submission, delivery).
The standard library's parser and msgspec stop at the interpreter's recursion
limit (RecursionError); orjson has no limit, so :func:`loads` looks first.

The look costs two ``count`` calls for text with few brackets (a recipient row,
an event); only text with more than :data:`MAX_DEPTH` brackets is measured:
its strings taken out (a bracket inside one nests nothing), then the running
depth of what is left, all in C (``split``, ``translate``,
``itertools.accumulate``: ~25 ms for 4 MB of 600,000 brackets).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import orjson

__all__ = ["MAX_DEPTH", "depth", "loads"]

# Deeper than any document fastsend reads (orjson.dumps itself refuses 255 levels).
MAX_DEPTH = 512

_KEEP = frozenset(b"[]{}")
_OTHERS = bytes(b for b in range(256) if b not in _KEEP)  # deleted: all but brackets
# +1 for an opening bracket, -1 for a closing one (indexed by byte value)
_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def depth(data: bytes | str, limit: int = MAX_DEPTH) -> int:
    """The deepest nesting of the JSON text ``data``, exact when it exceeds
    ``limit`` (below it, a cheap bound: at most ``limit``)."""
    if isinstance(data, str):
        if data.count("[") + data.count("{") <= limit:
            return min(limit, data.count("[") + data.count("{"))
        data = data.encode("utf-8", "surrogatepass")
    opened = data.count(b"[") + data.count(b"{")
    if opened <= limit:
        return opened
    # Outside the strings: with the escaped backslashes and then the escaped quotes
    # taken out, every other piece between quotes (JSON has no backslash outside one).
    plain = data.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2]
    brackets = b"".join(plain).translate(None, _OTHERS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(data: bytes | str, limit: int = MAX_DEPTH) -> Any:
    """``orjson.loads(data)``, or ``orjson.JSONDecodeError`` (a ValueError, as
    for any malformed text) when it nests deeper than ``limit``."""
    if depth(data, limit) > limit:
        text = data if isinstance(data, str) else data[:64].decode("utf-8", "replace")
        raise orjson.JSONDecodeError(f"JSON nested deeper than {limit} levels", text, 0)
    return orjson.loads(data)
