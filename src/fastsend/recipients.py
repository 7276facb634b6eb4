"""Read recipient lists: CSV with a header row, or JSON lines; an ``email``
column plus variables. Streams (a 10M-row file never sits in memory) and
reports every bad row with its line number instead of stopping.

Each good row becomes (line, address, ascii_domain, vars_json_bytes); vars hold
every column except ``email`` (JSON lines may carry nested values; they are
kept as JSON). The format is chosen by extension (.csv / .jsonl / .ndjson /
.json) or sniffed from the first character. :func:`read` yields rows one by
one; :func:`batches` hands them over as lists (how a list is spooled: no call
and no tuple per row); :func:`survey` hashes a file and counts its rows in one
pass over its bytes, before any is spooled.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Iterator
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import msgspec
import orjson

from fastsend import safejson
from fastsend._accel import pick
from fastsend.address import AddressError, normalize


class RecipientsError(ValueError):
    """The file as a whole cannot be read (missing, no email column, ...)."""


class BadRow(msgspec.Struct):
    line: int
    error: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.error}"


Row = tuple[int, str, str, bytes]


def _open(path: str) -> io.TextIOWrapper:
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - returned open
    except FileNotFoundError:
        if path == "-":  # (was "recipient file '-' not found")
            raise RecipientsError(
                "a recipient list is read from a file, not stdin ('-'): its position is"
                " kept in the spool for `fastsend resume`; save it to a file first"
            ) from None
        raise RecipientsError(f"recipient file {path!r} not found") from None
    except OSError as e:
        raise RecipientsError(f"cannot read recipient file {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        # A pipe (`-r /dev/stdin`, `-r <(query)`: /dev/fd/N) is read once: the
        # columns took its first lines, the rows found nothing left, and `send`
        # ended "delivered 0", exit 0, the whole list dropped without a word.
        f.close()
        raise RecipientsError(
            f"recipient list {path!r} is not a regular file (a pipe or device): it is"
            " read more than once and its position is kept in the spool for `fastsend"
            " resume`; save it to a file first"
        )
    return f


def detect_format(path: str, first: str) -> str:
    p = path.lower()
    if p.endswith(".csv"):
        return "csv"
    if p.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "jsonl" if first.lstrip().startswith("{") else "csv"


SAMPLE_ROWS = 1000  # JSON lines whose keys are a JSON-lines list's "columns"


def columns(path: str) -> set[str]:
    """The variable names a file provides: a CSV's header; a JSON-lines list's
    keys in its first :data:`SAMPLE_ROWS` rows (a variable none of them gives is
    a template's typo, refused before anything is sent; a row lacking one is a
    bad row, :func:`batches`). Only the first row was read: when it lacked a
    variable, or was no JSON, the whole list was refused for one bad row."""
    with _open(path) as f:
        first = _readline(path, f)
        fmt = detect_format(path, first)
        if fmt == "csv":
            return set(_csv_names(first, csv_separator(first)))
        keys: set[str] = set()
        n = 0
        line = first
        while line and n < SAMPLE_ROWS:
            if line.strip():
                n += 1
                try:
                    obj = safejson.loads(line)  # (a row nested past any depth: no crash)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and not isinstance(got := json_row(obj), str):
                    keys.add("email")
                    keys.update(got[1])
                elif isinstance(obj, dict) and len(obj) > MAX_VARIABLES:
                    # (its first names: the list is judged row by row, that row refused
                    # for its number of variables, not for columns the list lacks)
                    keys.update(islice(obj, MAX_VARIABLES))
            line = _readline(path, f)
        return keys


# Variables of one recipient at most (a CSV's columns besides the address, a JSON
# row's keys): a 4.7 MB CSV of 400,000 columns held serve's loop 4.6 s and took
# 0.5 GB, each row's variables 5.5 MB of JSON. Lists exported from a CRM carry
# tens to a few hundred columns.
MAX_VARIABLES = 1000

# What spreadsheets and other senders' exports name the address column
# (Mailchimp "Email Address", HubSpot "Email", "E-mail"), any case.
# "To": as the API's messages name it.
_EMAIL_HEADERS = frozenset({"email", "e-mail", "email address", "e-mail address", "to"})


# The nested objects a JSON row may hold its variables in, as the API's messages
# do ("variables"): {"email": "a@x", "vars": {"name": "A"}} is {"email": "a@x", "name": "A"}.
NESTED_VARS = ("variables", "vars", "data")


def json_row(obj: dict[str, Any]) -> tuple[object, dict[str, Any]] | str:
    """(the address as given, the variables) of a JSON-lines row or an API
    recipient, or why it is a bad row. The address is its ``email`` key, else
    the one key named as a CSV's address column may be (``Email``, ``E-mail``,
    ``Email Address``, any case) or ``to`` (the API's messages); its
    variables are its other keys, with those of a nested ``variables``,
    ``vars`` or ``data`` object (a name given twice is a bad row); a null is no
    value. Only ``email`` was taken: a list exported with "Email" or "to" was
    refused row by row ("missing or non-text email")."""
    row = {k: v for k, v in obj.items() if v is not None}
    if "email" in row:
        email = row.pop("email")
    else:
        alike = [k for k in row if k.strip().lower() in _EMAIL_HEADERS]
        if len(alike) > 1:
            return f"no 'email' key and {len(alike)} keys that may be the address: " + ", ".join(
                repr(k[:32]) for k in alike
            )
        email = row.pop(alike[0]) if alike else None
    for key in NESTED_VARS:
        nested = row.get(key)
        if isinstance(nested, dict):
            del row[key]
            for k, v in nested.items():
                if v is None:
                    continue
                if k in row or k == "email":
                    return f"variable {k[:64]!r} is given twice (in {key!r} and beside it)"
                row[k] = v
    if len(row) > MAX_VARIABLES:
        return f"{len(row):,} variables; a recipient has at most {MAX_VARIABLES:,}"
    return email, row


def csv_header(fields: list[str]) -> list[str]:
    """A CSV header's column names, stripped; without an ``email`` column, the
    one column named as exports name it (``Email``, ``E-mail``, ``Email
    Address``, ``To``, any case) is the ``email`` column (the list was refused: "no
    'email' column (columns: Email, ...)")."""
    header = [h.strip() for h in fields]
    if "email" not in header:
        alike = [i for i, h in enumerate(header) if h.lower() in _EMAIL_HEADERS]
        if len(alike) == 1:
            header[alike[0]] = "email"
    return header


# The separators a list's CSV may use besides ",": a spreadsheet in a locale
# whose decimal mark is a comma (German, French, Spanish, ... Excel) saves
# "CSV" with ";"; a TSV export uses tab.
SEPARATORS = (";", "\t")


def csv_separator(first: str) -> str:
    """The separator of a CSV whose header line is ``first``: "," unless the
    header read with "," has no ``email`` column (:func:`csv_header`) and read
    with ";" or tab it has one (and more than one column). A list refused
    before ("its columns are separated by ';'") is read as it was written."""
    try:
        header = csv_header(next(csv.reader([first]), []))
        if "email" in header:
            return ","
        for sep in SEPARATORS:
            if sep in first:
                other = csv_header(next(csv.reader([first], delimiter=sep), []))
                if "email" in other and len(other) > 1:
                    return sep
    except csv.Error:
        pass
    return ","


def _csv_names(first: str, sep: str = ",") -> list[str]:
    """The column names of a CSV's header line ``first`` (:func:`csv_header`),
    its columns separated by ``sep``; RecipientsError when it has no ``email``
    column."""
    try:
        header = csv_header(next(csv.reader([first], delimiter=sep), []))
    except csv.Error as e:
        raise RecipientsError(f"line 1: {e}") from None
    if len(header) > MAX_VARIABLES + 1:
        raise RecipientsError(
            f"CSV header has {len(header):,} columns; a list has at most {MAX_VARIABLES:,}"
            " besides the address"
        )
    if "email" not in header:
        shown = ", ".join(header[:20]) + (", ..." if len(header) > 20 else "")
        why = f"CSV header has no 'email' column (columns: {shown})"
        other = next((c for c in "|" if c in first and "email" in first.lower()), "")
        if len(header) == 1 and other:
            why += f": its columns are separated by {other!r}; a list's CSV separates them by"
            why += " ',' (or ';' or tab)"
        raise RecipientsError(why)
    return header


def _readline(path: str, f: io.TextIOWrapper) -> str:
    try:
        return f.readline()
    except UnicodeDecodeError as e:
        raise RecipientsError(f"{path}: not UTF-8 text ({e.reason})") from None


def read(
    path: str, *, refuse: frozenset[str] = frozenset(), need: frozenset[str] = frozenset()
) -> Iterator[Row | BadRow]:
    """Yield good rows and BadRow entries, in file order (``refuse``, ``need``:
    as :func:`batches` checks them)."""
    for b in batches(path, size=256, refuse=refuse, need=need):
        good = list(zip(b.lines, b.rows, strict=True))
        j = 0
        for bad in b.bad:  # the bad rows where they were among the good ones
            while j < len(good) and good[j][0] < bad.line:
                yield (good[j][0], *good[j][1])
                j += 1
            yield bad
        for line, row in islice(good, j, None):
            yield (line, *row)


class Batch(NamedTuple):
    """Rows of a list as :func:`batches` reads them."""

    rows: list[tuple[str, str, bytes]]  # the good rows: (address, ascii domain, vars JSON)
    lines: list[int]  # the line of each good row
    bad: list[BadRow]  # the bad rows among them
    line: int  # the last line of a row read (good or bad), 0: none yet
    last: bool  # the file ends here


def batches(
    path: str,
    *,
    after: int = 0,
    size: int = 2000,
    first: int = 0,
    refuse: frozenset[str] = frozenset(),
    need: frozenset[str] = frozenset(),
) -> Iterator[Batch]:
    """The rows after line ``after`` (lines up to it are parsed as the format
    needs, not checked), ``size`` good rows a batch (the first: ``first``, if
    given); the last batch, marked, may hold fewer or none. What :func:`read`
    yields, without a call and a tuple per row: the form a list is spooled in
    (``Acceptor.ingest``). A row whose value of a variable in ``refuse`` (the
    campaign's header-bound ones) holds CR, LF or NUL is a bad row (only a
    quoted CSV field or a JSON string can hold one: the plain CSV path, one
    line per row, never looks). ``need``: the variables the campaign uses
    without a default: a JSON line lacking one (or holding null) is a bad row,
    refused as the list is read rather than spooled to bounce at render (550
    5.6.0); a CSV's header must name them all (every row has every column)."""
    f = _open(path)
    with f:
        head = _readline(path, f)
        if not head:
            yield Batch([], [], [], after, True)
            return
        parse = _csv_batches if detect_format(path, head) == "csv" else _jsonl_batches
        try:
            yield from parse(head, f, after, first or size, size, refuse, need)
        except UnicodeDecodeError as e:  # survey() finds it first, unless the file changed
            raise RecipientsError(f"{path}: not UTF-8 text ({e.reason})") from None


def count_rows(path: str) -> int:
    """How many rows :func:`read` yields (good and bad), without checking them:
    for progress ("38,000 of 50,000 rows"). See :func:`survey`."""
    return survey(path)[1]


BLOCK = 1 << 20  # bytes per read of survey()
# Bytes that may begin a line holding only whitespace (what str.strip() removes):
# ASCII whitespace, the separators U+001C-U+001F, and the lead bytes of the
# UTF-8 forms of U+0085, U+00A0, U+1680, U+2000-U+205F and U+3000.
_MAY_BE_BLANK = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\xc2\xe1\xe2\xe3,;"  # (",,,": a CSV's empty row)
_MAY_BE_BLANK_AFTER_BREAK = re.compile(b"\n[" + re.escape(_MAY_BE_BLANK) + b"]")


def survey(path: str, *, block: int = BLOCK) -> tuple[str, int]:
    """(SHA-256 of the file's bytes, how many rows :func:`read` yields) in one
    pass over the bytes, at C speed: line breaks are counted (the csv module
    and a text file split lines at CR, LF and CRLF alike), a run of lines is
    decoded and looked at line by line only when one of them may be blank
    (such a line is no row), and non-ASCII text is checked to be UTF-8
    (RecipientsError naming the line, before anything is spooled). A CSV with a
    quoted field (a '"' opening a field: only there is it not a plain
    character, and only such a field may span lines) is counted again by the
    csv module."""
    digest = hashlib.sha256()
    counter = _LineCounter(path)
    try:
        with open(path, "rb") as f:
            while data := f.read(block):
                digest.update(data)
                counter.feed(data)
    except FileNotFoundError:
        raise RecipientsError(f"recipient file {path!r} not found") from None
    except OSError as e:
        raise RecipientsError(f"cannot read recipient file {path!r}: {e.strerror}") from None
    rows = counter.end()
    if rows is None:  # quoted fields: the csv module's own count
        rows = _count_records(path)
    return digest.hexdigest(), rows


class _LineCounter:
    """Rows of a list fed as blocks of bytes (see :func:`survey`). A block is
    looked at by ranges, not copied: copying 1 MB costs as much as the search."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.carry = b""  # the line begun at the end of the last block
        self.fmt = ""  # "csv" / "jsonl" once the first line is known
        self.rows = 0
        self.lines = 0  # line breaks counted (for the line of a decoding error)
        self.quoted = False  # a CSV with a quoted field: counted by the csv module
        self.sep = b","  # a CSV's separator (csv_separator)

    def feed(self, data: bytes) -> None:
        if b"\r" in data or self.carry.endswith(b"\r"):  # CR or CRLF line ends
            buf = self.carry + data
            held = b""
            if buf.endswith(b"\r"):  # maybe the CR of a CRLF the block split
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            end = buf.rfind(b"\n") + 1
            self.carry = buf[end:] + held
            if end:
                self._lines(buf, 0, end)
            return
        start = data.find(b"\n") + 1
        if not start:
            self.carry += data
            return
        if self.carry:  # the line the last block began
            line = self.carry + data[:start]
            self._lines(line, 0, len(line))
        else:
            start = 0
        end = data.rfind(b"\n") + 1
        if start < end:
            self._lines(data, start, end)
        self.carry = data[end:]

    def end(self) -> int | None:
        last = self.carry[:-1] if self.carry.endswith(b"\r") else self.carry
        if last:
            last += b"\n"
            self._lines(last, 0, len(last))
        return None if self.quoted else self.rows

    def _lines(self, buf: bytes, start: int, end: int) -> None:
        """Count the complete lines of ``buf[start:end]`` (each ends with LF)."""
        if not self.fmt:
            cut = buf.index(b"\n", start, end) + 1
            first = self._text(buf, start, cut).removeprefix("\ufeff")
            self.fmt = detect_format(self.path, first)
            if self.fmt != "csv" and first.strip():  # a CSV's first line is its header
                self.rows += 1
            if self.fmt == "csv":
                self.sep = csv_separator(first).encode()
            self.lines += 1
            start = cut
            if start == end:
                return
        n = buf.count(b"\n", start, end)
        if not buf.isascii():
            self._text(buf, start, end)  # UTF-8, or an error naming the line
        if self.fmt == "csv" and not self.quoted and buf.find(b'"', start, end) >= 0:
            self.quoted = (
                buf[start] == 0x22
                or buf.find(b'\n"', start, end) >= 0
                or buf.find(self.sep + b'"', start, end) >= 0
            )
        if buf[start] in _MAY_BE_BLANK or _MAY_BE_BLANK_AFTER_BREAK.search(buf, start, end):
            lines = self._text(buf, start, end).split("\n")[:-1]
            if self.fmt == "csv":  # fields of white space only: no row (_blank_record)
                sep = self.sep.decode()
                self.rows += sum(1 for line in lines if line.replace(sep, "").strip())
            else:
                self.rows += sum(1 for line in lines if line.strip())
        else:
            self.rows += n
        self.lines += n

    def _text(self, buf: bytes, start: int, end: int) -> str:
        try:
            return str(memoryview(buf)[start:end], "utf-8")
        except UnicodeDecodeError as e:
            line = self.lines + buf.count(b"\n", start, start + e.start) + 1
            raise RecipientsError(
                f"{self.path}: line {line}: not UTF-8 text ({e.reason})"
            ) from None


def _count_records(path: str) -> int:
    """What read() yields from a CSV, counted by the csv module (no address
    parsing): the exact count of a list with quoted fields."""
    with _open(path) as f:
        first = f.readline()
        if not first:
            return 0
        if detect_format(path, first) == "csv":
            n = 0
            reader = csv.reader(f, delimiter=csv_separator(first))
            end = 1  # the last line of the record before
            try:
                for rec in reader:
                    end = 1 + reader.line_num
                    if not _blank_record(rec):
                        n += 1
            except csv.Error as e:  # the file as a whole cannot be read: before any row
                where = csv_error(end + 1, 1 + reader.line_num, e)
                raise RecipientsError(f"{path}: {where}") from None
            return n
        return sum(1 for text in _chain(first, f) if text.strip())


def csv_error(start: int, line: int, e: csv.Error) -> str:
    """What the csv module's error ``e`` means, for the record that begins on
    line ``start`` and was read up to line ``line``."""
    if "field larger than field limit" in str(e):
        limit = f"{csv.field_size_limit():,}"
        if start < line:
            return (
                f"line {start}: a quote opened on this line is not closed within"
                f" {limit} characters (lines {start}-{line} were read into one field)"
            )
        return f"line {start}: a field longer than {limit} characters"
    return f"line {line}: {e}"


_encode = msgspec.json.Encoder().encode


def _vars_struct(names: list[str]) -> type[msgspec.Struct] | None:
    """A struct type whose JSON encoding is ``{name: value, ...}`` in column
    order: byte for byte what orjson writes for the dict of a row's variables,
    without building the dict. None when msgspec cannot name a field so (a
    duplicate, a quote, a backslash or a control character in a name): those
    lists take the dict."""
    fields = [f"f{i}" for i in range(len(names))]
    try:
        return msgspec.defstruct(
            "Vars",
            [(f, str) for f in fields],
            rename=dict(zip(fields, names, strict=True)),
            gc=False,
        )
    except (ValueError, TypeError):
        return None


def csv_plain_rows(
    chunk: list[str],
    at: int,
    line: int,
    after: int,
    width: int,
    ei: int,
    keys: list[bytes],
    maxlen: int,
    limit: int,
    rows: list[tuple[str, str, bytes]],
    lines: list[int],
    bad: list[BadRow],
    last: int,
) -> tuple[int, int, int, bool]:
    """The rows of ``chunk`` (lines of a CSV list, terminators kept) from index
    ``at`` (line ``line`` the last one read): what the csv module reads from a
    line holding no '"' and no NUL (its fields split at ","), checked and
    appended to ``rows``/``lines``/``bad`` as :func:`_csv_batches` does, the
    vars the JSON object of ``keys`` (each name's JSON and ":") and the
    fields. Stops once ``rows`` holds ``limit`` rows, at the end of the chunk,
    or before a line with '"' or NUL or longer than ``maxlen`` (the csv
    module's field size limit: the csv module's to read, or refuse: quoted is
    True); returns (index of the next line, its line - 1, last, quoted).
    ``fastsend._core`` has the compiled twin (_recipients.pxi)."""
    n = len(chunk)
    while at < n:
        text = chunk[at]
        if '"' in text or "\0" in text or len(text) > maxlen:
            return at, line, last, True
        at += 1
        line += 1
        if line <= after:
            continue
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        elif text.endswith("\r"):
            text = text[:-1]
        rec = text.split(",")
        got = _address_of(rec, line, width, ei, bad)
        if not isinstance(got, tuple):
            if got is False:
                last = line
            continue
        rows.append((got[0], got[1], vars_json(keys, rec)))
        lines.append(line)
        last = line
        if len(rows) >= limit:
            break
    return at, line, last, False


def _address_of(
    rec: list[str], line: int, width: int, ei: int, bad: list[BadRow]
) -> tuple[str, str] | bool | None:
    """The (address, ascii domain) of a CSV record, its email field popped;
    None: a blank line (no row: every field empty or white space, as a
    spreadsheet writes an empty row, ",,,"); False: a bad row (appended to ``bad``)."""
    if len(rec) != width:
        if _blank_record(rec):
            return None
        bad.append(BadRow(line, f"expected {width} columns, found {len(rec)}"))
        return False
    if not rec[ei].strip() and _blank_record(rec):
        return None
    try:
        return normalize(rec.pop(ei))
    except AddressError as e:
        bad.append(BadRow(line, str(e)))
        return False


def _blank_record(rec: list[str]) -> bool:
    """Whether a CSV record is no row: no field holds more than white space."""
    return not any(f.strip() for f in rec)


def vars_json(keys: list[bytes], values: list[str]) -> bytes:
    """The JSON object of ``keys`` (each a name's JSON and ":") and ``values``:
    the bytes of the dict's JSON, without the dict (compiled twin in _recipients.pxi)."""
    return b"{" + b",".join([k + _encode(v) for k, v in zip(keys, values, strict=True)]) + b"}"


py_csv_plain_rows, py_vars_json = csv_plain_rows, vars_json  # the references (twin tests)
csv_plain_rows = pick(csv_plain_rows)
vars_json = pick(vars_json)


# -- duplicate recipients ----------------------------------------------------------
#
# A list (or a campaign's chunks posted through the API) naming one address twice
# would have it sent twice: every bulk sender drops the second. An address is
# compared as spooled (``normalize``: surrounding spaces gone, the domain lower
# case and its A-label; the local part as written, RFC 5321 2.4 makes its case
# significant), by an 8-byte fingerprint of it: a table of them costs 8-16 bytes a
# recipient (a 1M list: 16 MB), and two different addresses of one list share a
# fingerprint with a probability of about n^2 / 2^65 (3e-8 for 1M rows).

_SEED = 0x243F6A8885A308D3
_MUL = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def fingerprint(rcpt: str) -> int:
    """The 64-bit fingerprint of a spooled address: its UTF-8 bytes taken 8 at a
    time (little-endian words, the last padded with zeros) each xored in,
    multiplied and folded, from a seed holding the length; then MurmurHash3's
    finalizer (every input bit in the low bits a table indexes by); never 0 (a
    table's empty slot). Stable across processes and hosts: nodes of a shared
    spool compare the fingerprints each other recorded (compiled twin in
    _recipients.pxi, the same numbers)."""
    data = rcpt.encode("utf-8", "surrogatepass")
    h = _SEED ^ len(data)
    for i in range(0, len(data), 8):
        h = ((h ^ int.from_bytes(data[i : i + 8], "little")) * _MUL) & _M64
        h ^= h >> 32
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    h ^= h >> 33
    return h or 1


class FpSet:
    """The fingerprints (:func:`fingerprint`) of a campaign's recipients: what a
    list's next row is checked against. The compiled twin (_recipients.pxi) is an
    open-addressing table of 8-byte slots, no object per recipient."""

    def __init__(self) -> None:
        self._fps: set[int] = set()

    def __len__(self) -> int:
        return len(self._fps)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more fingerprints now (a list's rows, known before
        it is read): the compiled table is then never grown row by row."""

    def add_all(self, rcpts: list[str]) -> None:
        """Record the addresses ``rcpts`` (a table's rebuild from the spool)."""
        self._fps.update(map(fingerprint, rcpts))

    def add_fps(self, fps: list[int]) -> None:
        """Record fingerprints as they are (a shared spool's own)."""
        self._fps.update(fps)

    def has_fps(self, fps: list[int]) -> list[bool]:
        """Whether each fingerprint of ``fps`` is recorded (nothing is recorded: a
        look before a list is counted against a quota)."""
        seen = self._fps
        return [(f or 1) in seen for f in fps]

    def add_rows(self, rows: list[tuple[str, str, bytes]], fps: list[int] | None = None) -> list[int]:
        """Record each row's address; returns the indexes of the rows whose
        address was already recorded (by an earlier row of ``rows`` too), in
        order. ``fps``: the fingerprint of each new row is appended there."""
        seen = self._fps
        dups: list[int] = []
        for i, row in enumerate(rows):
            fp = fingerprint(row[0])
            if fp in seen:
                dups.append(i)
            else:
                seen.add(fp)
                if fps is not None:
                    fps.append(fp)
        return dups


PyFpSet: Final = FpSet
py_fingerprint = fingerprint
fingerprint = pick(fingerprint)
if not TYPE_CHECKING:
    FpSet = pick(PyFpSet)

CHUNK_CHARS = 1 << 16  # characters of lines read at a time by the plain path


def _breaks(names: list[str], refuse: frozenset[str]) -> list[tuple[int, str]]:
    """(index among ``names``, name) of the variables in ``refuse``."""
    return [(i, n) for i, n in enumerate(names) if n in refuse]


def _broken(values: list[str], checks: list[tuple[int, str]]) -> str | None:
    """The first checked variable whose value holds CR, LF or NUL."""
    for i, name in checks:
        v = values[i]
        if "\n" in v or "\r" in v or "\0" in v:
            return name
    return None


def _break_row(line: int, name: str) -> BadRow:
    return BadRow(
        line, f"variable {name[:64]!r}: CR, LF and NUL are not allowed in a header value"
    )


def _swallowed(values: list[str], width: int, ei: int, sep: str = ",") -> int:
    """How many lines inside the multi-line fields of a record (its email
    popped) read on their own as rows of the list: ``width`` fields, an
    address in column ``ei``. A quoted field may hold line breaks (an address
    block, a paragraph), but one holding whole rows is a quote left open that
    a later quote happened to close: its rows would be lost inside one field,
    and the row that swallowed them would carry them in its variables."""
    n = 0
    for v in values:
        if "\n" not in v and "\r" not in v:
            continue
        for text in v.splitlines():
            if sep not in text and width > 1:
                continue
            try:
                rec = next(csv.reader([text], delimiter=sep), [])
            except csv.Error:
                continue
            if len(rec) == width:
                try:
                    normalize(rec[ei])
                except AddressError:
                    continue
                n += 1
    return n


def _lacking_row(line: int, names: set[str] | frozenset[str]) -> BadRow:
    shown = ", ".join(repr(n[:64]) for n in sorted(names)[:10])
    return BadRow(line, f"no value for the variable(s) {shown} (the template has no default)")


def _csv_batches(
    first: str,
    f: io.TextIOWrapper,
    after: int,
    limit: int,
    size: int,
    refuse: frozenset[str] = frozenset(),
    need: frozenset[str] = frozenset(),
) -> Iterator[Batch]:
    """Batches of ``limit`` good rows, then of ``size``. Lines with no '"' (no
    quoted field can begin or continue there) are read by ``csv_plain_rows``;
    from the first line holding one on, the csv module reads the rest (all of
    a list whose separator is not ",": :func:`csv_separator`)."""
    sep = csv_separator(first)
    header = _csv_names(first, sep)
    named = [h for h in header if h]  # (unnamed columns: a spreadsheet's empty ones)
    if len(set(named)) != len(named):  # one name, two values: which one is meant?
        twice = next(h for i, h in enumerate(named) if h in named[:i])
        raise RecipientsError(f"line 1: CSV header names the column {twice[:64]!r} twice")
    if lacking := need - set(header):
        raise RecipientsError(
            "recipient list lacks columns for variables without a default: "
            + ", ".join(sorted(lacking))
        )
    ei = header.index("email")
    names = header[:ei] + header[ei + 1 :]  # the variables, in column order
    width = len(header)
    # A column without a name (Excel and Sheets export "email,name,," for columns
    # once touched) is no variable: its values are left out (two of them made
    # the header "name the column '' twice", the list refused).
    unnamed = "" in names
    row_type = None if unnamed else _vars_struct(names)
    rows: list[tuple[str, str, bytes]] = []
    lines: list[int] = []
    bad: list[BadRow] = []
    last = after
    line = 1  # the lines read so far (the header)
    rest: Iterator[str] = f
    if row_type is not None and sep == ",":  # names a row's vars' JSON can be written with
        keys = [_encode(name) + b":" for name in names]
        maxlen = csv.field_size_limit()
        while chunk := f.readlines(CHUNK_CHARS):
            at = 0
            quoted = False
            while at < len(chunk) and not quoted:
                at, line, last, quoted = csv_plain_rows(
                    chunk, at, line, after, width, ei, keys, maxlen, limit, rows, lines, bad, last
                )
                if len(rows) >= limit:
                    yield Batch(rows, lines, bad, last, False)
                    rows, lines, bad = [], [], []
                    limit = size
            if quoted:
                rest = chain(chunk[at:], f)
                break
        else:
            yield Batch(rows, lines, bad, last, True)
            return
    reader = csv.reader(rest, delimiter=sep)
    base = line  # reader.line_num counts the lines after it
    dumps = orjson.dumps
    encode = _encode
    checks = _breaks(names, refuse)
    end = base  # the last line of the record before
    spans: tuple[BadRow, int] | None = None  # a bad record over several lines, its end
    try:
        for rec in reader:
            line = base + reader.line_num
            start, end = end + 1, line
            if line <= after:
                continue
            got = _address_of(rec, line, width, ei, bad)
            if not isinstance(got, tuple):
                if got is False:
                    last = line
                    if start < line:  # named by its first line, and its span said
                        bad[-1] = BadRow(start, f"{bad[-1].error} (one record over lines"
                                         f" {start}-{line}: a quoted field holds line breaks)")  # fmt: skip
                        spans = bad[-1], line
                continue
            if start < line and (n := _swallowed(rec, width, ei, sep)):
                bad.append(BadRow(start, f"lines {start}-{line} were read as one record (a"
                                  f" quoted field holds line breaks) and {n} of its lines read"
                                  " as rows of their own: a quote left open, closed by a later"
                                  " one? Refused, with the rows inside it"))  # fmt: skip
                last = line
                continue
            if checks and (name := _broken(rec, checks)) is not None:
                bad.append(_break_row(line, name))
                last = line
                continue
            addr, domain = got
            if row_type is not None:  # the same bytes as the dict below, a third of the CPU
                rows.append((addr, domain, encode(row_type(*rec))))
            elif unnamed:
                named_vars = {n: v for n, v in zip(names, rec, strict=True) if n}
                rows.append((addr, domain, dumps(named_vars)))
            else:
                rows.append((addr, domain, dumps(dict(zip(names, rec, strict=True)))))
            lines.append(line)
            last = line
            if len(rows) >= limit:
                yield Batch(rows, lines, bad, line, False)
                rows, lines, bad = [], [], []
                limit = size
    except csv.Error as e:  # a field over csv.field_size_limit() (an unclosed quote?), ...
        raise RecipientsError(csv_error(end + 1, base + reader.line_num, e)) from None
    if spans is not None and spans[1] == end and bad and bad[-1] is spans[0]:
        # The file ended inside the quoted field: a quote that is never closed
        # (the csv module reads the rest of the file into it). Say so, rather than
        # one bad row that silently holds every row after it.
        opened = spans[0].line
        bad[-1] = BadRow(opened, f"a quote opened on this line is never closed: the"
                         f" {end - opened} line(s) after it, to the end of the file, were"
                         " read into one field and not as rows")  # fmt: skip
    yield Batch(rows, lines, bad, last, True)


def _jsonl_batches(
    first: str,
    f: io.TextIOWrapper,
    after: int,
    limit: int,
    size: int,
    refuse: frozenset[str] = frozenset(),
    need: frozenset[str] = frozenset(),
) -> Iterator[Batch]:
    """Batches of ``limit`` good rows, then of ``size``."""
    rows: list[tuple[str, str, bytes]] = []
    lines: list[int] = []
    bad: list[BadRow] = []
    last = after
    line = 0
    checked = sorted(refuse)
    for text in _chain(first, f):
        line += 1
        if line <= after or not text.strip():
            continue
        last = line
        try:
            obj = safejson.loads(text)  # (orjson dies of a row nested 150,000 deep)
        except orjson.JSONDecodeError as e:
            bad.append(BadRow(line, f"invalid JSON: {e}"))
            continue
        if not isinstance(obj, dict):
            bad.append(BadRow(line, "a JSON line must be an object with an 'email' key"))
            continue
        if text.count("{") > 1 or "[" in text:  # maybe nested (or a bracket in a string)
            keys, depth = _shape(obj)
            if depth > MAX_DEPTH:
                bad.append(BadRow(line, f"a value nested deeper than {MAX_DEPTH} levels"))
                continue
        else:
            keys = len(obj)
        # Each key ends '"' then ':' (whitespace between allowed); a value holds such
        # a pair only after an escaped quote. So more of them than keys is the sign.
        ends = text.count('":')
        if '" ' in text or '"\t' in text or '"\r' in text:  # whitespace before a ':'?
            ends = len(_KEY_END.findall(text))
        if ends > keys and (twice := _key_twice(text)) is not None:
            bad.append(BadRow(line, f"invalid JSON: the key {twice[:64]!r} appears twice"))
            continue
        got = json_row(obj)  # a null is no value (text_vars); "Email", "to", nested "vars"
        if isinstance(got, str):
            bad.append(BadRow(line, got))
            continue
        email, obj = got
        if not isinstance(email, str):
            bad.append(BadRow(line, "missing or non-text email"))
            continue
        try:
            addr, domain = normalize(email)
        except AddressError as e:
            bad.append(BadRow(line, str(e)))
            continue
        values = {k: _text(v) for k, v in obj.items()}
        if any(type(v) is float for v in obj.values()):
            _as_written(text, obj, values)
        if need and not need <= values.keys():
            bad.append(_lacking_row(line, need - values.keys()))
            continue
        if refuse:
            name = next(
                (n for n in checked if any(c in values.get(n, "") for c in "\r\n\0")), None
            )
            if name is not None:
                bad.append(_break_row(line, name))
                continue
        rows.append((addr, domain, orjson.dumps(values)))
        lines.append(line)
        if len(rows) >= limit:
            yield Batch(rows, lines, bad, line, False)
            rows, lines, bad = [], [], []
            limit = size
    yield Batch(rows, lines, bad, last, True)


MAX_DEPTH = 32  # nesting of a row's values (as JSON request bodies: fastsend.serve.api)
_KEY_END = re.compile(r'"[ \t\r\n]*:')


def _shape(v: object) -> tuple[int, int]:
    """(how many keys the parsed JSON value holds, nested objects included; how deep
    it nests). A loop, not recursion: orjson reads 1,024 levels, more than Python's
    recursion limit (and more than orjson writes: 254)."""
    n = depth = 0
    stack = [(v, 1)]
    while stack:
        x, d = stack.pop()
        depth = max(depth, d)
        if isinstance(x, dict):
            n += len(x)
            stack.extend((y, d + 1) for y in x.values() if isinstance(y, dict | list))
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x if isinstance(y, dict | list))
    return n, depth


class _Twice(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise _Twice(k)
        seen.add(k)


def _key_twice(text: str) -> str | None:
    """The first key named twice in one object of a JSON line, or None. A row naming
    a key twice means two things (RFC 8259 4; I-JSON, RFC 7493 2.3, MUST NOT): orjson
    keeps the last, a spreadsheet or the sender's own tools may read the first.
    Asked only when the line has more colons than the parsed row has keys (each key
    is followed by one; a value's text may hold more), so a plain row costs a count."""
    try:
        json.loads(text, object_pairs_hook=_pairs, parse_int=_none, parse_float=_none)
    except _Twice as e:
        return str(e.args[0])
    except (ValueError, RecursionError):
        return None
    return None


def _none(_text: str) -> None:
    return None


def text_vars(obj: dict[str, Any]) -> dict[str, str]:
    """A row's template variables as text (:func:`_text`). A null is no value:
    the placeholder's default, or a missing variable -- never the text "null"
    in a message ("Hi null,")."""
    return {k: _text(v) for k, v in obj.items() if v is not None}


def _as_written(text: str, obj: dict[str, Any], values: dict[str, str]) -> None:
    """The numbers among a JSON line's values as the line writes them. orjson
    reads a number with a fraction or an exponent, or an integer too large for
    64 bits, as a float: ``19.90`` became "19.9", ``1e3`` "1000.0" and a 23-digit
    account number "1.2345678901234568e+22". Read again, those only, keeping
    each number's text (the rare row that has one)."""
    try:
        exact = json.loads(text, parse_float=str, parse_int=str)
    except (ValueError, RecursionError):
        return
    if not isinstance(exact, dict):
        return
    for key in NESTED_VARS:  # (a nested object's variables: json_row)
        if isinstance(exact.get(key), dict):
            exact = {**exact, **exact[key]}
    for k, v in obj.items():
        if type(v) is float and isinstance(exact.get(k), str):
            values[k] = exact[k]


def _text(v: object) -> str:
    """Template variables are text: numbers as written, other values as JSON."""
    if isinstance(v, str):
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    return orjson.dumps(v).decode()


def _chain(first: str, f: io.TextIOWrapper) -> Iterator[str]:
    yield first
    yield from f
