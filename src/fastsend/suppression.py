"""The suppression list: addresses fastsend must not send to, per tenant.

The operator's global list (tenant ``*``, :data:`GLOBAL_TENANT`: no tenant's
name) suppresses for every tenant (``fastsend suppress add --global``): a
legal removal request, a spam trap, a role address no tenant may mail.

A SQLite file of its own (WAL mode; the engine passes
``<spool dir>/suppression.db``) holding one entry per (tenant, address) with
a reason ("userunknown", "hostunknown", ... for hard bounces, "complaint",
"unsubscribe", "manual", or a soft reason with an expiry), a source (who
wrote it: ``unsubscribe``, ``complaint``, ``bounce-delivery`` -- a refusal
while delivering --, ``bounce-dsn`` -- an asynchronous bounce --, ``manual``
-- the CLI --, ``api``, ``import``), the time it was added, the message that
caused it (spool id, when there is one) and an optional expiry time. Expired
entries no longer suppress and are purged by
:meth:`SuppressionList.purge_expired`.

A write is durable when it returns (``synchronous=FULL``, as for accepted
mail): an acknowledged unsubscribe or bounce survives a power cut.

Checked twice: when mail is accepted, and again when the supervisor
dispatches it (``entries_many``, one query per batch), so an address
suppressed while its mail waits for a retry is not mailed.

Addresses are normalised the usual way: the domain is lowercased, a Unicode
one converted to A-labels as recipients are (IDNA 2008 + UTS 46:
``u@bücher.example`` is ``u@xn--bcher-kva.example``, the spool's spelling),
and the local part is matched case-insensitively, so ``Kiji@Example.COM``
and ``kiji@example.com`` are the same entry; the first spelling stored is kept
for display. An entry an older version stored under a Unicode domain still
suppresses (``_legacy_key``).

``suppress_from`` turns a bounce record or classification into an entry:
hard bounces and complaints are suppressed, soft bounces are not (unless
asked to, with an expiry).

This module never sends mail and never parses bounces; checking a batch of
recipients is one indexed query per batch (``contains_many``).
"""

from __future__ import annotations

import csv
import functools
import io
import re
import sqlite3
import string
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import msgspec

from fastsend.address import (
    ATEXT_CHARS,
    AddressError,
    ascii_and_non_ascii,
    idna_domain,
    quoted_local,
)
from fastsend.address import literal as address_literal
from fastsend.sqlitedb import connect

DEFAULT_TENANT = "default"
# Entries under this tenant suppress for every tenant (not a valid tenant name:
# fastsend.serve.auth.check_tenant).
GLOBAL_TENANT = "*"
MANUAL = "manual"
COMPLAINT = "complaint"
UNSUBSCRIBE = "unsubscribe"
# Sources: who wrote an entry.
SOURCE_UNSUBSCRIBE = "unsubscribe"
SOURCE_COMPLAINT = "complaint"
SOURCE_DELIVERY = "bounce-delivery"  # a refusal answered while delivering
SOURCE_DSN = "bounce-dsn"  # an asynchronous bounce (DSN) read by the intake
SOURCE_MANUAL = "manual"  # fastsend suppress add
SOURCE_API = "api"
SOURCE_IMPORT = "import"
_LOCAL_RE = re.compile(rf"^{ascii_and_non_ascii(ATEXT_CHARS + '.')}+$")
_LD = ascii_and_non_ascii(string.ascii_lowercase + string.digits)  # letter/digit, or non-ASCII
_LDH = ascii_and_non_ascii(string.ascii_lowercase + string.digits + "-")
_L = ascii_and_non_ascii(string.ascii_lowercase)
_DOMAIN_RE = re.compile(rf"^(?:{_LD}(?:{_LDH}{{0,61}}{_LD})?\.)+{_L}{_LDH}{{0,62}}$")
_REASON_RE = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_CHUNK = 500  # SQLite host parameters per query stay well under the limit


class SuppressionError(ValueError):
    """Bad input to the suppression list (malformed address, reason, expiry, file)."""


class Entry(msgspec.Struct, frozen=True):
    """One suppressed address."""

    address: str
    tenant: str
    reason: str
    source: str
    created: float
    expires: float | None
    message: int | None = None  # spool id of the message that caused it

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "tenant": self.tenant,
            "reason": self.reason,
            "source": self.source,
            "created": self.created,
            "expires": self.expires,
            "message": self.message,
        }


def normalize(address: str) -> tuple[str, str]:
    """(key, display) for an address; SuppressionError if it is malformed.

    The key lowercases the whole address (local parts are matched
    case-insensitively); the display form lowercases only the domain.
    """
    if not isinstance(address, str):
        raise SuppressionError(f"address must be a string, got {type(address).__name__}")
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1].strip()
    if a.lower().startswith("mailto:"):
        a = a[7:]
    local, sep, domain = a.rpartition("@")
    # A quoted local part ("john doe"@example.com) is a recipient as the list and the
    # API accept it (address.quoted_local): its unsubscribe had been refused (400)
    # and its hard bounce not kept. Its spaces are inside the quotes.
    quoted = local.startswith('"') and quoted_local(local)
    if not a or len(a) > 320 or any(c.isspace() or ord(c) < 32 for c in (domain if quoted else a)):
        raise SuppressionError(f"malformed address: {address!r}")
    domain = domain.rstrip(".")
    literal = domain.startswith("[")
    if literal:
        # an address literal, u@[192.0.2.1]: recipients may be one (address.literal)
        try:
            domain = address_literal(domain)
        except AddressError:
            raise SuppressionError(f"malformed address: {address!r}") from None
    elif domain.isascii():
        domain = domain.lower()
    else:
        # the A-label form the spool holds (IDNA 2008 + UTS 46, as recipients are
        # normalised): u@bücher.example is the entry of u@xn--bcher-kva.example
        try:
            domain = idna_domain(domain)
        except UnicodeError:
            raise SuppressionError(f"malformed address: {address!r}") from None
    if (
        not sep
        or not local
        or len(local) > 64
        or not (quoted or _LOCAL_RE.match(local))
        or (not quoted and (local.startswith(".") or local.endswith(".") or ".." in local))
        or not (literal or _DOMAIN_RE.match(domain))
    ):
        raise SuppressionError(f"malformed address: {address!r}")
    display = f"{local}@{domain}"
    return display.lower(), display


def _fast_key(address: str) -> str:
    """normalize()'s key, with a shortcut for the common address that is its own
    key (lower case, nothing to strip): the dispatch-time check runs over every
    message. Were such an address malformed, it cannot have been stored, so
    looking it up finds nothing, as normalize()'s error would."""
    if (
        address.isascii()  # (a Unicode domain's key is its A-label form)
        and address.islower()
        and address[0] not in "< \t"
        and address[-1] not in ". \t>"
        and not address.startswith("mailto:")
    ):
        return address
    return normalize(address)[0]


def _legacy_key(key: str) -> str | None:
    """The key fastsend before 2026-12 stored for this one when the address was
    written with a Unicode domain (kept as written, lower-cased): such an entry
    still suppresses, and is found and removed by either spelling. None for a
    domain without A-labels."""
    local, _, domain = key.rpartition("@")
    if "xn--" not in domain:
        return None
    u = _u_labels(domain)
    return f"{local}@{u}" if u else None


@functools.lru_cache(maxsize=4096)
def _u_labels(domain: str) -> str:
    """``domain`` in U-labels ("" when that is itself, or not a valid A-label
    name): cached, the dispatch check asks it for every such recipient."""
    import idna

    try:
        u = idna.decode(domain)
    except Exception:  # not a valid A-label: nothing was stored under another form
        return ""
    return u if u != domain else ""


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' or plain seconds -> seconds."""
    m = _DURATION_RE.match(str(text).strip().lower())
    if not m or int(m.group(1)) <= 0:
        raise SuppressionError(f"bad duration {text!r}: expected e.g. 30d, 12h, 90m, 3600")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def _check_reason(reason: str) -> str:
    if not isinstance(reason, str) or not _REASON_RE.match(reason):
        raise SuppressionError(f"bad reason {reason!r}: expected a lowercase word")
    return reason


def _check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not tenant or len(tenant) > 200:
        raise SuppressionError(f"bad tenant {tenant!r}")
    return tenant


_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    tenant   TEXT NOT NULL,
    key      TEXT NOT NULL,
    address  TEXT NOT NULL,
    reason   TEXT NOT NULL,
    source   TEXT NOT NULL DEFAULT '',
    created  REAL NOT NULL,
    expires  REAL,
    message  INTEGER,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
"""
_COLUMNS = "address, tenant, reason, source, created, expires, message"
_UPSERT = (
    "INSERT INTO suppression (tenant, key, address, reason, source, created, expires, message)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, key) DO UPDATE SET reason = excluded.reason,"
    " source = excluded.source, created = excluded.created,"
    " expires = excluded.expires, message = excluded.message"
)


class Suppressions:
    """The suppression list's policy, whatever stores it: validation, the
    normalised key, expiry, import / export. A store (:class:`SuppressionList`
    in SQLite here, ``serve.shared_state.RedisSuppressionList`` in Redis for
    several nodes) supplies the primitives named ``_put`` ... ``__len__``."""

    _clock: Any = staticmethod(time.time)

    # ------------------------------------------------------------ the store's part
    def _put(self, rows: list[tuple[str, Entry]]) -> None:
        """Upsert ``(key, entry)`` rows (any tenants) all-or-nothing, durably."""
        raise NotImplementedError

    def _delete(self, tenant: str, key: str) -> bool:
        raise NotImplementedError

    def _purge(self, now: float) -> int:
        """Delete entries expired at ``now``; how many."""
        raise NotImplementedError

    def _reasons(self, tenant: str, keys: list[str], now: float) -> dict[str, str]:
        """``{key: reason}`` of those of ``keys`` not expired at ``now``."""
        raise NotImplementedError

    def _get(self, tenant: str, key: str) -> Entry | None:
        raise NotImplementedError

    def _any(self, tenant: str) -> bool:
        """Might the tenant have entries? (True: look them up.)"""
        return True

    def version(self) -> int | None:
        """A number that changes when another connection or process has written
        the list since (None: the store cannot tell; ask the list again). The
        supervisor checks its mail in flight again when it changes."""
        return None

    def _entries(self, tenant: str | None, now: float | None) -> Iterator[Entry]:
        """Entries of one tenant (every tenant: None) not expired at ``now``
        (None: expired ones too), by tenant then key."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Suppressions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ writes
    def add(
        self,
        address: str,
        reason: str = MANUAL,
        *,
        tenant: str = DEFAULT_TENANT,
        source: str = "",
        expires_in: float | None = None,
        message: int | None = None,
    ) -> Entry:
        """Add (or replace) one entry; returns it. ``expires_in`` in seconds."""
        return self.add_many(
            [address], reason, tenant=tenant, source=source, expires_in=expires_in,
            message=message,
        )[0]  # fmt: skip

    def add_many(
        self,
        addresses: Iterable[str],
        reason: str = MANUAL,
        *,
        tenant: str = DEFAULT_TENANT,
        source: str = "",
        expires_in: float | None = None,
        message: int | None = None,
    ) -> list[Entry]:
        """Add many entries in one transaction: all are validated first, so a
        malformed address stores nothing and loses nothing already stored."""
        _check_reason(reason)
        _check_tenant(tenant)
        if expires_in is not None and not expires_in > 0:
            raise SuppressionError(f"expires_in must be positive seconds, got {expires_in!r}")
        now = float(self._clock())
        expires = None if expires_in is None else now + expires_in
        rows = []
        for a in addresses:
            key, display = normalize(a)
            rows.append((key, Entry(display, tenant, reason, source, now, expires, message)))
        self._put(rows)
        return [e for _k, e in rows]

    def add_entries(self, items: Iterable[tuple[str, str, str, str, int | None]]) -> list[Entry]:
        """Add ``(tenant, address, reason, source, message)`` entries (no expiry) in
        one durable transaction; malformed addresses are skipped, not fatal (they
        come from the delivery path, not from a user). Returns what was stored."""
        now = float(self._clock())
        rows = []
        for tenant, a, reason, source, message in items:
            try:
                key, display = normalize(a)
                _check_reason(reason)
                _check_tenant(tenant)
            except SuppressionError:
                continue
            rows.append((key, Entry(display, tenant, reason, source, now, None, message)))
        if rows:
            self._put(rows)
        return [e for _k, e in rows]

    def remove(self, address: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        """Remove one entry; True if it was there."""
        key, _ = normalize(address)
        old = _legacy_key(key)
        gone = self._delete(tenant, key)
        return (self._delete(tenant, old) or gone) if old else gone

    def purge_expired(self) -> int:
        """Delete expired entries of every tenant; returns how many."""
        return self._purge(float(self._clock()))

    # ------------------------------------------------------------ reads
    def contains(self, address: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        """Is this address suppressed (now) for this tenant?"""
        return bool(self.reasons_many([address], tenant=tenant))

    def contains_many(self, addresses: Iterable[str], *, tenant: str = DEFAULT_TENANT) -> set[str]:
        """The subset of ``addresses`` (as given) that is suppressed now: meant
        for checking a batch of recipients right before sending (one lookup per
        batch). Malformed addresses are not reported (they cannot be stored)."""
        return set(self.reasons_many(addresses, tenant=tenant))

    def reasons_many(
        self, addresses: Iterable[str], *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, str]:
        """``{address as given: reason}`` for those of ``addresses`` suppressed
        now, for ``tenant`` or for every tenant (the global list)."""
        scopes = [t for t in dict.fromkeys((tenant, GLOBAL_TENANT)) if self._any(t)]
        if not scopes:
            return {}  # the lists are empty: one probe each, not one lookup per address
        by_key: dict[str, list[str]] = {}
        for a in addresses:
            try:
                key = _fast_key(a)
            except SuppressionError:
                continue
            by_key.setdefault(key, []).append(a)
        if not by_key:
            return {}
        legacy = {old: k for k in by_key if "xn--" in k and (old := _legacy_key(k))}
        hit: dict[str, str] = {}
        keys = [*by_key, *legacy]
        now = float(self._clock())
        for scope in scopes:
            for key, reason in self._reasons(scope, keys, now).items():
                for a in by_key[legacy.get(key, key)]:
                    hit.setdefault(a, reason)
        return hit

    def get(self, address: str, *, tenant: str = DEFAULT_TENANT) -> Entry | None:
        """The entry for this address (even if expired), or None."""
        key, _ = normalize(address)
        got = self._get(tenant, key)
        if got is None and (old := _legacy_key(key)):
            got = self._get(tenant, old)
        return got

    def list(
        self, *, tenant: str | None = DEFAULT_TENANT, include_expired: bool = False
    ) -> Iterator[Entry]:
        """Entries of one tenant (all tenants when None), sorted by address."""
        return self._entries(tenant, None if include_expired else float(self._clock()))

    # ------------------------------------------------------------ import / export
    def import_text(
        self,
        text: str,
        *,
        tenant: str = DEFAULT_TENANT,
        reason: str = MANUAL,
        source: str = "import",
        expires_in: float | None = None,
    ) -> int:
        """Import CSV (with an ``address`` or ``email`` column, optional
        ``reason``, ``source``, ``expires`` columns) or one address per line.

        All-or-nothing: any malformed line raises SuppressionError naming the
        line, and nothing is stored. Blank lines and lines starting with '#'
        are skipped. Returns the number of entries stored.
        """
        rows = list(_read_rows(text, reason, source))
        now = float(self._clock())
        parsed = []
        for lineno, addr, r, src, exp in rows:
            try:
                key, display = normalize(addr)
                _check_reason(r)
                if exp is not None and exp <= now:
                    continue  # already expired: nothing to import
                e = exp if exp is not None else (None if expires_in is None else now + expires_in)
            except SuppressionError as err:
                raise SuppressionError(f"line {lineno}: {err}") from None
            parsed.append((key, Entry(display, tenant, r, src, now, e, None)))
        _check_tenant(tenant)
        self._put(parsed)
        return len(parsed)

    def import_file(self, path: str | Path, **kw: Any) -> int:
        """:meth:`import_text` on a file; SuppressionError naming the file on failure."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise SuppressionError(f"{p}: cannot read: {e}") from None
        try:
            return self.import_text(text, **kw)
        except SuppressionError as e:
            raise SuppressionError(f"{p}: {e}") from None

    def export_csv(self, *, tenant: str | None = DEFAULT_TENANT) -> str:
        """CSV with header address,reason,source,created,expires,tenant (what import
        reads). Text cells are guarded (:func:`cell_guard`): an address such as
        ``=HYPERLINK(...)@x.example`` (a valid local part) or a source named by a
        feedback report is never read as a formula by a spreadsheet."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["address", "reason", "source", "created", "expires", "tenant"])
        for e in self.list(tenant=tenant):
            w.writerow(
                [
                    cell_guard(e.address),
                    cell_guard(e.reason),
                    cell_guard(e.source or ""),
                    f"{e.created:.3f}",
                    "" if e.expires is None else f"{e.expires:.3f}",
                    cell_guard(e.tenant),
                ]
            )
        return buf.getvalue()


class SuppressionList(Suppressions):
    """Suppressed addresses per tenant in a SQLite file (see module docstring).

    Safe to open from several processes (WAL, busy timeout); one object per
    thread. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, path: str | Path, *, clock: Any = time.time, readonly: bool = False
    ) -> None:
        """``readonly``: a view that writes nothing (``suppress list``/``export``:
        they work on a read-only spool, and a list not made yet is empty)."""
        self.path = Path(path)
        self._clock = clock
        try:
            # An acknowledged suppression must survive a crash or power cut: FULL.
            self._db = connect(str(self.path), readonly=readonly, synchronous="FULL",
                               schema=_SCHEMA)  # fmt: skip
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(suppression)")}
            if "message" not in cols and readonly:  # (an older list, as below: a view of it)
                self._db.execute(
                    f"CREATE TEMP VIEW suppression AS SELECT {_COLUMNS[:-9]}, key,"
                    " NULL AS message FROM main.suppression"
                )
            elif "message" not in cols:  # a list written before entries named their message
                self._db.execute("ALTER TABLE suppression ADD COLUMN message INTEGER")
        except sqlite3.DatabaseError as e:
            raise SuppressionError(f"{self.path}: cannot open suppression list: {e}") from None

    def close(self) -> None:
        self._db.close()

    def version(self) -> int | None:
        # SQLite's data_version: changed by commits of other connections only.
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def __enter__(self) -> SuppressionList:
        return self

    def _put(self, rows: list[tuple[str, Entry]]) -> None:
        with self._tx():
            self._db.executemany(
                _UPSERT,
                [(e.tenant, key, e.address, e.reason, e.source, e.created, e.expires, e.message)
                 for key, e in rows],
            )  # fmt: skip

    def _delete(self, tenant: str, key: str) -> bool:
        with self._tx():
            cur = self._db.execute(
                "DELETE FROM suppression WHERE tenant = ? AND key = ?", (tenant, key)
            )
        return cur.rowcount > 0

    def _purge(self, now: float) -> int:
        with self._tx():
            cur = self._db.execute(
                "DELETE FROM suppression WHERE expires IS NOT NULL AND expires <= ?", (now,)
            )
        return cur.rowcount

    def _any(self, tenant: str) -> bool:
        probe = self._db.execute("SELECT 1 FROM suppression WHERE tenant = ? LIMIT 1", (tenant,))
        return probe.fetchone() is not None

    def _reasons(self, tenant: str, keys: list[str], now: float) -> dict[str, str]:
        """One indexed query per 500 keys."""
        hit: dict[str, str] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, reason in self._db.execute(
                f"SELECT key, reason FROM suppression WHERE tenant = ? AND key IN ({marks})"
                " AND (expires IS NULL OR expires > ?)",
                (tenant, *chunk, now),
            ):
                hit[key] = reason
        return hit

    def _get(self, tenant: str, key: str) -> Entry | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM suppression WHERE tenant = ? AND key = ?",
            (tenant, key),
        ).fetchone()
        return Entry(*row) if row else None

    def _entries(self, tenant: str | None, now: float | None) -> Iterator[Entry]:
        sql = f"SELECT {_COLUMNS} FROM suppression"
        where: list[str] = []
        args: list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if now is not None:
            where.append("(expires IS NULL OR expires > ?)")
            args.append(now)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY tenant, key"
        for row in self._db.execute(sql, args):
            yield Entry(*row)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM suppression").fetchone()[0])

    def _tx(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


# A cell a spreadsheet reads as a formula (or as a comment line, for '#': the
# importer skips those): =, +, -, @, TAB, CR (OWASP "CSV injection").
_FORMULA = re.compile(r"'*[=+\-@\t\r#]")


def cell_guard(value: str) -> str:
    """``value`` with a ``'`` in front when a spreadsheet would read it as a formula
    (it starts with = + - @ TAB CR, or with quotes before one; '#' too, which the
    importer reads as a comment): spreadsheets show the text and drop the quote.
    :func:`cell_unguard` takes it off again, so an export imports as it was."""
    return "'" + value if _FORMULA.match(value) else value


def cell_unguard(value: str) -> str:
    """The value :func:`cell_guard` was given (a cell it did not change is as it was)."""
    return value[1:] if value[:1] == "'" and _FORMULA.match(value, 1) else value


# The address column of a list: ours (export_csv), and as other tools' exports name it
# (Mailchimp "Email Address", HubSpot "Email", "E-mail"), any case: the names `fastsend
# send` takes (recipients._EMAIL_HEADERS), so an unsubscribe export imports as it is.
_ADDRESS_HEADERS = frozenset({"address", "email", "e-mail", "email address", "e-mail address"})


def _read_rows(
    text: str, reason: str, source: str
) -> Iterator[tuple[int, str, str, str, float | None]]:
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    header = [h.strip().lower() for h in next(csv.reader([first]))] if first else []
    named = [i for i, h in enumerate(header) if h in _ADDRESS_HEADERS]
    if named:
        col = header.index("address") if "address" in header else named[0]
        reader = csv.reader(io.StringIO(text))
        seen_header = False
        for lineno, row in enumerate(reader, 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if not seen_header:
                seen_header = True
                continue
            cells = {
                h: (cell_unguard(row[i].strip()) if i < len(row) else "")
                for i, h in enumerate(header)
            }
            if col >= len(row):
                raise SuppressionError(f"line {lineno}: missing address column")
            exp_text = cells.get("expires", "")
            try:
                exp = float(exp_text) if exp_text else None
            except ValueError:
                raise SuppressionError(f"line {lineno}: bad expires {exp_text!r}") from None
            yield (
                lineno,
                cell_unguard(row[col].strip()),
                cells.get("reason") or reason,
                cells.get("source", source),
                exp,
            )
        return
    for lineno, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        yield lineno, s, reason, source, None


# ---------------------------------------------------------------- bounces -> entries
class _BounceLike(Protocol):
    @property
    def reason(self) -> str: ...

    @property
    def hard(self) -> bool: ...


def suppression_reason(result: _BounceLike, *, soft_too: bool = False) -> str | None:
    """The entry reason a bounce record/classification calls for, or None.

    Hard bounces -> their reason; complaints ("feedback" with a feedback type
    other than "opt-out"/"unsubscribe") -> "complaint"; unsubscribe reports ->
    "unsubscribe"; soft bounces -> None (or their reason with ``soft_too``);
    delivered and vacation -> None.
    """
    reason = result.reason
    if reason == "feedback":
        ftype = (getattr(result, "feedback_type", None) or "abuse").lower()
        return UNSUBSCRIBE if ftype in ("opt-out", "unsubscribe") else COMPLAINT
    if result.hard:
        return reason
    if reason in ("delivered", "vacation"):
        return None
    return reason if soft_too else None


def suppress_from(
    slist: SuppressionList,
    address: str,
    result: _BounceLike,
    *,
    tenant: str = DEFAULT_TENANT,
    source: str = SOURCE_DSN,
    soft_expires_in: float | None = None,
    message: int | None = None,
) -> Entry | None:
    """Suppress ``address`` if ``result`` (a BounceRecord or Classification)
    calls for it: hard bounces and complaints forever, soft bounces only when
    ``soft_expires_in`` (seconds) is given, and then with that expiry."""
    reason = suppression_reason(result, soft_too=soft_expires_in is not None)
    if reason is None:
        return None
    hard_or_complaint = result.hard or result.reason == "feedback"
    expires = None if hard_or_complaint else soft_expires_in
    return slist.add(
        address, reason, tenant=tenant, source=source, expires_in=expires, message=message
    )
