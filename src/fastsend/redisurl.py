"""Redis spool URLs: ``redis://HOST:PORT/DB?prefix=&dir=&node=&lease=&replicas=``
(``rediss://``, ``unix://`` as redis-py reads them). A value module: the spool
(:mod:`fastsend.spool`, which re-exports these) and the shared rate limits
(:mod:`fastsend.shared_limits`, which the Redis spool builds) both read them.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDIS_PARAMS = ("prefix", "dir", "node", "lease", "replicas")
"""Our parameters in a Redis spool URL (the rest goes to redis-py)."""


REDIS_SCHEMES = ("redis", "rediss", "unix")
"""The URL schemes of a Redis spool (redis-py's; any case, as it reads them)."""
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_redis_url(url_or_dir: str) -> bool:
    m = _SCHEME.match(url_or_dir)
    return m is not None and m.group(1).lower() in REDIS_SCHEMES


def foreign_url(url_or_dir: str) -> str | None:
    """Why ``url_or_dir`` names no spool fastsend can open: a URL of a scheme
    other than a Redis spool's (``redis+sentinel://``, ``valkey://``,
    ``postgres://``), or None (a Redis URL, a directory, ``sqlite:PATH``).
    Before, such a value was taken for a directory: ``fastsend send`` made a
    SQLite spool under ``./redis+sentinel:/HOST:26379/...`` and sent from it,
    each node on a queue of its own."""
    m = _SCHEME.match(url_or_dir)
    if m is None or m.group(1).lower() in (*REDIS_SCHEMES, "sqlite"):
        return None
    return (
        f"spool {redact_url(url_or_dir)!r}: fastsend has no spool of scheme"
        f" {m.group(1)!r} (a shared spool is redis://, rediss:// or unix:// naming the"
        " Redis primary; with Sentinel, an address that follows the primary: a virtual"
        " IP Sentinel or keepalived moves, HAProxy checking role:master; a local spool"
        " is a directory)"
    )


def parse_redis_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a Redis spool URL into the redis-py URL and our parameters
    (:data:`REDIS_PARAMS`)."""
    base, _, query = url.partition("?")  # (not urlunsplit: it made unix:///x unix:/x)
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k in REDIS_PARAMS:
            ours[k] = v
        else:
            rest.append((k, v))
    return base + ("?" + urlencode(rest) if rest else ""), ours


def redact_url(url: str) -> str:
    """A spool URL fit to print: a Redis password (``redis://:PW@host``,
    ``redis://user:PW@host``) as ``****``; anything else as it is."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:****@{host}"))
