"""Redis spool URLs: ``redis://HOST:PORT/DB?prefix=&dir=&node=&lease=&replicas=``
(``rediss://``, ``unix://`` as redis-py reads them). A value module: the spool
(:mod:`fastsend.spool`, which re-exports these) and the shared rate limits
(:mod:`fastsend.shared_limits`, which the Redis spool builds) both read them.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDIS_PARAMS = ("prefix", "dir", "node", "lease", "replicas")
"""Our parameters in a Redis spool URL (the rest goes to redis-py)."""


def is_redis_url(url_or_dir: str) -> bool:
    return url_or_dir.startswith(("redis://", "rediss://", "unix://"))


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
