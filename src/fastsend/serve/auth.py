"""API keys: created once, stored hashed, checked in constant time, scoped to a tenant.

A key is ``fs_<id>_<secret>``: ``id`` is a short public handle (it names the
row and appears in listings and logs), ``secret`` is 32 random bytes in
URL-safe base64. ``<spool>/apikeys.db`` (SQLite) stores only SHA-256 of the
whole key: a key is 256 bits of randomness, so a fast hash is as strong as a
slow one here (no dictionary to attack), and checking costs microseconds per
request. Lookup is by id, then :func:`hmac.compare_digest` on the hashes, so
timing says nothing about how much of a guess was right.

The key itself is printed once by ``fastsend apikey create`` and never stored
or logged. A checked row is cached for at most :data:`CACHE_TTL` seconds, so a
key revoked by ``fastsend apikey revoke`` (another process) stops working for
the HTTP API and SMTP submission of a running server within a second, with no
SIGHUP. The tenant name ``default`` is the operator's (CLI campaigns, unknown
senders) and is never given to a key. This module knows nothing of HTTP: :mod:`fastsend.serve.api` turns a
failed check into 401 and a tenant mismatch into 403.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from fastsend.sqlitedb import connect

PREFIX = "fs_"
_KEY_RE = re.compile(r"^fs_([a-z0-9]{8})_([A-Za-z0-9_-]{43})$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_TENANTS = frozenset({"default"})  # the operator's (fastsend.suppression.DEFAULT_TENANT)
CACHE_TTL = 0.5  # seconds a checked key row is trusted before the database is read again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apikeys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    hash BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    note TEXT NOT NULL DEFAULT ''
);
"""


class AuthError(ValueError):
    """A bad tenant name or key id (the message says which)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    tenant: str
    created: float
    revoked: float | None
    note: str


def check_tenant(tenant: str) -> str:
    if not _TENANT_RE.fullmatch(tenant):
        raise AuthError(
            f"bad tenant name {tenant!r}: 1-64 of letters, digits, '.', '_', '-'"
            " (starting with a letter or digit)"
        )
    return tenant


def check_key_tenant(tenant: str) -> str:
    """A tenant an API key may be given: a good name, and not the operator's ``default``."""
    check_tenant(tenant)
    if tenant.lower() in RESERVED_TENANTS:
        raise AuthError(
            f"tenant {tenant!r} is reserved for the operator's CLI campaigns;"
            " an API key needs a tenant of its own"
        )
    return tenant


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """``apikeys.db``: one row per key (hash only). One object per thread."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        """``readonly``: a view that writes nothing (``apikey list``: it works on a
        read-only spool, and makes no key store where there is none)."""
        self.path = path
        self.db = connect(path, schema=_SCHEMA, readonly=readonly)
        if not readonly:
            try:
                os.chmod(path, 0o600)
            except OSError:
                pass
        # id -> (hash, tenant, revoked, monotonic time read)
        self._cache: dict[str, tuple[bytes, str, float | None, float]] = {}

    @classmethod
    def for_spool(cls, spool_dir: str, *, readonly: bool = False) -> KeyStore:
        return cls(os.path.join(spool_dir, "apikeys.db"), readonly=readonly)

    def create(self, tenant: str, note: str = "") -> tuple[str, ApiKey]:
        """A new key for ``tenant``: returns (the key, shown once; its record)."""
        check_key_tenant(tenant)
        while True:
            kid = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
            key = f"{PREFIX}{kid}_{secrets.token_urlsafe(32)}"
            now = time.time()
            try:
                self.db.execute(
                    "INSERT INTO apikeys(id, tenant, hash, created, note) VALUES (?,?,?,?,?)",
                    (kid, tenant, _hash(key), now, note),
                )
            except sqlite3.IntegrityError:
                continue  # id collision: draw again
            return key, ApiKey(kid, tenant, now, None, note)

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        sql = "SELECT id, tenant, created, revoked, note FROM apikeys"
        args: tuple[str, ...] = ()
        if tenant is not None:
            sql += " WHERE tenant=?"
            args = (tenant,)
        return [ApiKey(*r) for r in self.db.execute(sql + " ORDER BY created", args)]

    def revoke(self, kid: str) -> bool:
        cur = self.db.execute(
            "UPDATE apikeys SET revoked=? WHERE id=? AND revoked IS NULL", (time.time(), kid)
        )
        self._cache.pop(kid, None)
        return cur.rowcount > 0

    def verify(self, key: str) -> tuple[str, str] | None:
        """(key id, tenant) for a valid, unrevoked key; None otherwise."""
        m = _KEY_RE.fullmatch(key)
        if m is None:
            return None
        kid = m.group(1)
        now = time.monotonic()
        row = self._cache.get(kid)
        if row is None or now - row[3] > CACHE_TTL:
            r = self.db.execute(
                "SELECT hash, tenant, revoked FROM apikeys WHERE id=?", (kid,)
            ).fetchone()
            if r is None:
                self._cache.pop(kid, None)
                # Same work as a hit, so a missing id costs the same time.
                hmac.compare_digest(_hash(key), b"\0" * 32)
                return None
            if len(self._cache) > 10_000:
                self._cache.clear()
            row = self._cache[kid] = (bytes(r[0]), r[1], r[2], now)
        stored, tenant, revoked, _ = row
        if not hmac.compare_digest(_hash(key), stored) or revoked is not None:
            return None
        if tenant.lower() in RESERVED_TENANTS:
            return None  # a key made for "default" by an older version: never valid
        return kid, tenant

    def forget_cache(self) -> None:
        """Drop cached rows (after SIGHUP, so revocations by the CLI take effect)."""
        self._cache.clear()

    def close(self) -> None:
        self.db.close()
