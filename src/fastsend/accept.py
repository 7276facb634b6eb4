"""Accepting mail: the one way recipients enter the spool.

``fastsend send``, the HTTP API (``serve/context.inject``, campaigns and
messages) and SMTP submission all come through :class:`Acceptor`, so the
same input gives the same spool rows and the same events whichever way it
arrives:

1. :func:`check_campaign`: the campaign is valid (DKIM for the From domain when
   required) and its spec fits a worker's ring in one record;
2. :meth:`Acceptor.create_campaign`: the campaign is created (paused or active);
3. :meth:`Acceptor.accept`: a batch of (rcpt, ascii_domain, vars_json) rows is
   checked against the campaign tenant's suppression list and spooled in one
   durable transaction (suppressed rows are stored as SUPPRESSED, final), then
   one "accepted" or "suppressed" event per row is emitted and the supervisor
   is woken. A body shared by several rows (a message to many recipients) is
   stored once, before the rows, as a content-addressed blob
   (``Spool.put_blob``) that the rows reference (``wire.blob_ref``);
4. ``accept(dedup=True)`` (a campaign's list and the API's chunks of its
   recipients, unless the campaign keeps duplicates: ``keep_duplicates`` in its
   options) spools no address the campaign has already, nor one twice in a batch
   (:meth:`Acceptor.unseen`: a compiled table of 8-byte fingerprints per campaign,
   rebuilt from the spool by a process that did not write it -- ``resume`` after a
   kill -9 --; on a spool several nodes write, the campaign's fingerprints recorded
   in the spool with its rows), and counts what it left out (``duplicates``);
5. :meth:`Acceptor.start_ingest` / :meth:`Acceptor.ingest`: a recipient list is
   a durable job in the spool (its source's path, size, mtime and SHA-256,
   its row count, and the last committed source line, written in the same
   transaction as each batch), so a crash in the middle of a list resumes
   where the last batch ended (``fastsend resume``) instead of silently
   dropping the rest; :func:`source_problem` says when the file changed. The
   job also names its last batch's ids until that batch's events are out, so
   a reader killed between the commit and the events has them emitted by the
   next one (:meth:`Acceptor.retell`, marked ``"resumed": true``).

It never renders, never speaks SMTP and never decides delivery: that is the
engine's (``queue/``), woken through the ``wake`` callback.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import re
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from typing import Any, NamedTuple

import msgspec
import orjson

from fastsend import recipients
from fastsend.events import AcceptedRows, EventLog, accepted_dicts
from fastsend.faults import FAULT, countdown
from fastsend.message import Campaign, CampaignError
from fastsend.spool import (
    FpsChanged,
    IdemMark,
    IngestJob,
    IngestMark,
    Spool,
    SpoolError,
    SpoolStorageError,
    storage_problem,
)
from fastsend.suppression import DEFAULT_TENANT, SuppressionList
from fastsend.wire import MAX_RECORD, NOTIFY_HEAD, CampaignSpec, blob_ref, encoder

log = logging.getLogger("fastsend.accept")


def _fault_after_commit(_ids: list[int]) -> None:
    countdown(
        {"ingest-kill-after-commit": signal.SIGKILL, "ingest-stop-after-commit": signal.SIGSTOP}
    )


CHUNK = 2000  # rows per spool transaction of a list ingest
# Rows of the first transaction of `send`'s list: delivery starts after it (the
# workers fork once it is spooled), the rest is read as the windows have room.
FIRST_CHUNK = 256
# A row's vars (its message body, for the API and submission) is stored once as
# a content-addressed blob when several rows of a batch share it and it is at
# least BLOB_SHARED bytes, or when it is at least BLOB_ALONE bytes (the same big
# body may come again in another request).
BLOB_SHARED = 1024
BLOB_ALONE = 64 << 10
_third = operator.itemgetter(2)  # a row's vars
# Campaigns whose address tables (Acceptor.unseen) a process keeps; the one used
# least recently is dropped, and rebuilt from the spool if its rows come again.
DEDUP_TABLES = 8
# The campaign option that keeps a list's duplicate addresses (send
# --keep-duplicates, the API's "keep_duplicates": true): each row is sent.
KEEP_DUPLICATES = "keep_duplicates"

Row = tuple[str, str, bytes]  # (rcpt, ascii domain, vars as JSON)


class Stowed(NamedTuple):
    """:meth:`Acceptor.stow`'s: ``rows`` as spooled (``stored``: bodies replaced by
    references to blobs stored already), which rows hold each blob, and once
    spooled the blobs' rows to record (:meth:`Acceptor.ref_stowed`: updating a
    blob's row rewrites all of it, ~0.3 s for 28 MB)."""

    rows: list[Row]
    stored: list[Row]
    blobs: dict[str, list[int]]
    refs: list[tuple[str, list[int]]]

MAX_NAME = 256  # a campaign name's characters
TENANTS_KEPT = 100_000  # campaigns whose tenant is remembered (then read again)
# C0 controls, DEL and C1 controls (ESC and CSI start terminal escape sequences),
# the line and paragraph separators and the bidirectional overrides and isolates
# (they reorder what is shown after them: a name could pass for another).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def name_problem(name: str) -> str:
    """Why ``name`` cannot be a campaign's name ("" when it can), for every way in
    (``POST /v1/campaigns``, ``fastsend send --name``): it is text the operator
    reads (``fastsend campaign list``, the dashboard, logs), so no control character
    (an escape sequence would act on the operator's terminal, a line feed forge a
    line), at most MAX_NAME characters."""
    if len(name) > MAX_NAME:
        return f"at most {MAX_NAME} characters"
    if _CONTROL.search(name):
        return "control characters (CR, LF, ESC, ...) are not allowed"
    return ""


class AcceptError(ValueError):
    """The campaign or list cannot be accepted; the message says why (``key``: the
    campaign key at fault, when one is)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_VERP_PREFIX = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.=+\-]{0,30}[A-Za-z0-9])?")
_BREAKS = ("\r", "\n", "\0")


def header_sources(spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(key, template source) of every value that becomes a header field."""
    for key in ("subject", "feedback_id", "to", "reply_to", "return_path", "verp_domain"):
        yield key, spec.get(key)
    for name, value in (spec.get("headers") or {}).items():
        yield f"headers.{name}", value
    for key in ("mailto", "url"):
        yield f"list_unsubscribe.{key}", (spec.get("list_unsubscribe") or {}).get(key)


def header_variables(spec: dict[str, Any]) -> frozenset[str]:
    """The variables a campaign spec puts into header fields (subject,
    headers, To, ...): a recipient row whose value of one of them holds CR,
    LF or NUL is refused as the list is read (``Acceptor.ingest``)."""
    from fastsend.message.template import Template

    names: set[str] = set()
    for _key, src in header_sources(spec):
        if isinstance(src, str) and "{{" in src:
            try:
                names |= Template(src).names
            except ValueError:
                pass  # (the campaign's own check reports it)
    return frozenset(names - {"email"})


def row_checks(spec: dict[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """What every row of a list for the campaign ``spec`` is checked for as the
    list is read (:func:`fastsend.recipients.batches`): the variables its headers
    take (no CR, LF or NUL in their values) and those it uses without a
    default (a JSON line must give each a value). A row failing either would
    only fail at render (550 5.6.0), after the list was taken as good."""
    try:
        need = frozenset(Campaign.from_dict(spec).variables)
    except CampaignError:
        need = frozenset()  # (a spooled campaign that no longer builds: its mail says why)
    return header_variables(spec), need


def row_sizer(spec: dict[str, Any], max_size: int) -> Callable[[bytes], str | None] | None:
    """What each recipient row of the campaign ``spec`` is checked with for
    what its values make of the message as it is accepted: ``sizer(vars_json)``
    says why the row's message would be over ``max_size`` ([delivery]
    max_message_size; naming the variable whose value weighs most: its octets x
    the template's uses of it, and what escaping makes of them), or why a
    header built from its values (Reply-To, To, List-Unsubscribe) cannot be
    written (a word over 998 octets, not a mailbox), or why the header section
    its values make would be over raw MIME's 100,000 octets (whatever
    ``max_size``), else None. The renderer's own checks (``Renderer.too_big``:
    what the message holds at the least; ``Renderer.header_problem``,
    ``Renderer.header_too_big``), so a row passed here fails at render only
    when its message is a few percent from the limit. A row short enough for
    the renderer's guard is never decoded unless such a header takes its
    values. None: nothing to check, or a spec that no longer builds."""
    from fastsend.message.headers import HeaderError
    from fastsend.message.mime import Renderer

    try:
        r = Renderer(spec, max_size=max_size)
    except (HeaderError, CampaignError, ValueError):
        return None
    names = r.row_headers
    if r.guard == sys.maxsize and not names:  # (no size limit, no header a value makes)
        return None
    guard, too_big, header_problem = r.guard, r.too_big, r.header_problem
    (size_guard, header_guard), header_too_big = r.guards, r.header_too_big
    loads = orjson.loads
    said: dict[tuple[object, ...], str | None] = {}  # header values -> header_problem's answer

    def sizer(vars_json: bytes) -> str | None:
        if not names and len(vars_json) <= guard:
            return None
        try:
            values = loads(vars_json) if vars_json else {}
        except orjson.JSONDecodeError:
            return None
        if not isinstance(values, dict):
            return None
        if names:
            # Lists repeat them (a few account managers' names): asked once each.
            key = tuple(values.get(n) for n in names)
            try:
                if key in said:
                    why = said[key]
                else:
                    if len(said) >= 4096:
                        said.clear()
                    why = said[key] = header_problem(values)
            except TypeError:  # (a value no string: the renderer says why)
                why = header_problem(values)
            if why is not None:
                return why
        if len(vars_json) <= guard:
            return None
        if len(vars_json) > header_guard and (why := header_too_big(values)) is not None:
            return why
        if len(vars_json) <= size_guard:
            return None
        why = too_big(values)
        return None if why is None else f"{why} ([delivery] max_message_size)"

    # Rows whose vars are at most this long pass without a call (_size_rows): no
    # header takes their values and the guard holds (-1: each row is asked).
    setattr(sizer, "short", -1 if names else guard)  # noqa: B010
    return sizer


def _size_rows(b: recipients.Batch, sizer: Callable[[bytes], str | None]) -> None:
    """Move the rows of ``b`` whose message would be over the size limit to
    its bad rows (refused with their line, the others spooled). A batch whose
    rows are all within the sizer's ``short`` (no header takes their values)
    is measured in one pass at C speed, not a call per row (~0.35 us/row)."""
    short = getattr(sizer, "short", -1)
    if short >= 0 and max(map(len, map(_third, b.rows)), default=0) <= short:
        return
    keep = [i for i, row in enumerate(b.rows) if sizer(row[2]) is None]
    if len(keep) == len(b.rows):
        return
    for i in sorted(set(range(len(b.rows))) - set(keep)):
        b.bad.append(recipients.BadRow(b.lines[i], str(sizer(b.rows[i][2]))))
    b.bad.sort(key=lambda row: row.line)
    b.rows[:] = [b.rows[i] for i in keep]
    b.lines[:] = [b.lines[i] for i in keep]


def _check_header_values(spec: dict[str, Any]) -> None:
    """A campaign whose own text would put CR, LF or NUL in a header is refused
    now: the renderer refuses it too, but only once the campaign is spooled,
    when every message would wait in the queue until it expires."""
    for key, value in header_sources(spec):
        if isinstance(value, str) and any(c in value for c in _BREAKS):
            raise AcceptError(
                f"{key}: CR, LF and NUL are not allowed in a header value (header injection"
                " refused)", key,
            )  # fmt: skip
    prefix = spec.get("verp_prefix")
    if prefix is not None and not _VERP_PREFIX.fullmatch(prefix):
        raise AcceptError(
            f"verp_prefix: {prefix[:80]!r} is not a VERP prefix (1-32 letters, digits and"
            " _.=+-, a letter or digit at each end)", "verp_prefix",
        )  # fmt: skip


def _check_foreign_tags(spec: dict[str, Any]) -> None:
    """A campaign written for another template language (``{% if vip %}``) is
    refused: its tags would be sent as text to every recipient."""
    from fastsend.message.template import foreign_tag

    for key, src in [*header_sources(spec), ("html", spec.get("html")), ("text", spec.get("text"))]:
        if isinstance(src, str) and (why := foreign_tag(src)) is not None:
            raise AcceptError(f"{key}: {why}", key)


def _check_tracking_base(spec: dict[str, Any]) -> None:
    """Opens or clicks asked for with no ``base_url`` to put the links on: refused, not
    sent untracked. The renderer makes no pixel and rewrites no link without one (a
    campaign stored so is still sent as it always was), and the example campaign asked
    for both without one: every open and click of such a campaign was lost, silently.
    (Unsubscribe links without an https base are refused by the spec's own check; a
    tenant's ``tracking_base_url`` is filled in before this, by the API.)"""
    t = spec.get("tracking")
    if isinstance(t, dict) and (t.get("opens") or t.get("clicks")) and not t.get("base_url"):
        asked = " and ".join(k for k in ("opens", "clicks") if t.get(k))
        raise AcceptError(
            f"[tracking] {asked} need base_url: the http(s) address where fastsend serve"
            " answers tracking links (its [api] public_listen, or its API listener, behind"
            " your proxy); e.g. base_url = \"https://t.example.com\"",
            "tracking.base_url",
        )


def check_header_section(spec: dict[str, Any]) -> None:
    """The header fields a campaign writes held to raw MIME's caps
    (fastsend.message.rawmime: MAX_HEADER_FIELDS fields, MAX_HEADER_OCTETS octets),
    which SMTP submission and the API's ``raw`` already refused: receivers cut or
    refuse a larger header section (Postfix keeps 102,400 octets and drops the rest,
    Gmail answers 552 5.3.4), so a template with 20,000 ``headers`` or a 900 KB one
    was accepted, and each message sent with a 1.2-1.5 MB header section. Counted
    on the template's own text: a variable's value adds to it per recipient."""
    from fastsend.message.rawmime import MAX_HEADER_FIELDS, MAX_HEADER_OCTETS

    fields = len(spec.get("headers") or {})
    if fields > MAX_HEADER_FIELDS:
        raise AcceptError(
            f"headers: {fields:,} header fields, at most {MAX_HEADER_FIELDS:,} (receivers cut"
            " or refuse a larger header section)", "headers",
        )  # fmt: skip
    octets = 0
    for key, value in [("from", spec.get("from")), *header_sources(spec)]:
        if isinstance(value, str):
            octets += len(key.rpartition(".")[2]) + 2 + len(value.encode("utf-8", "surrogatepass"))
    if octets > MAX_HEADER_OCTETS:
        raise AcceptError(
            f"headers: the header fields it writes (subject, addresses, headers) are {octets:,}"
            f" octets, at most {MAX_HEADER_OCTETS:,} (receivers cut or refuse a larger header"
            " section)", "headers",
        )  # fmt: skip


def check_campaign(
    camp: Campaign, *, require_dkim: bool = False, max_size: int = 0
) -> dict[str, Any]:
    """Validate a loaded campaign for spooling; returns its self-contained spec.

    ``require_dkim``: a DKIM key must be configured for the From domain. The
    spec crosses a worker's ring as one record, so a spec too large for it is
    refused here, once, instead of failing per recipient later; so is one whose
    own content (attachments, text) makes every message over ``max_size``
    ([delivery] max_message_size, 0: no limit)."""
    if require_dkim and not camp.dkim_for(camp.from_domain):
        raise AcceptError(
            f"no DKIM key configured for the From domain {camp.from_domain!r};"
            " add a [dkim] table or pass --no-dkim"
        )
    spec = camp.to_dict()
    _check_header_values(spec)
    _check_foreign_tags(spec)
    _check_tracking_base(spec)
    check_header_section(spec)
    # Built once now (no keys): a campaign whose own headers can never be
    # written (a header name over the line limit) is refused before anything is
    # spooled, not failed for every recipient later.
    from fastsend.message.headers import HeaderError
    from fastsend.message.mime import Renderer

    try:
        r = Renderer(spec, max_size=max_size)
    except (HeaderError, CampaignError) as e:
        raise AcceptError(f"the campaign cannot be built: {e}") from None
    if spec.get("dkim"):
        # Each key is loaded (and checked) now: a bad one is refused before a
        # message is spooled, and workers forked after this share it (no load each).
        from fastsend.message.dkim import Signer

        for entry in spec["dkim"]:
            try:
                Signer.from_settings(entry)
            except ValueError as e:  # DkimKeyError, a bad canonicalization
                raise AcceptError(f"[dkim] {entry.get('domain', '')}: {e}") from None
    size = len(encoder.encode(CampaignSpec(0, spec)))
    if size > MAX_RECORD:
        raise AcceptError(
            f"the campaign is {size} bytes with its files inlined; at most {MAX_RECORD} bytes"
        )
    # (after the ring's: a campaign too large for it is refused as that, whatever the limit)
    if (why := r.too_big({}, defaults=False)) is not None:
        raise AcceptError(f"{why} ([delivery] max_message_size) with no variable in it yet")
    return spec


# -- list sources ---------------------------------------------------------------


def describe_source(path: str) -> tuple[dict[str, Any], int]:
    """({path, size, mtime_ns, sha256}, data rows) of a recipient list as it is
    now: one pass over its bytes (:func:`recipients.survey`)."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise recipients.RecipientsError(f"recipient file {path!r} not found") from None
    except OSError as e:
        raise recipients.RecipientsError(f"cannot read recipient file {path!r}: {e}") from None
    sha256, total = recipients.survey(path)
    src = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    return src, total


def source_problem(job: IngestJob) -> str | None:
    """Why the rest of a job's list cannot be read any more ("gone", "changed"),
    or None when the file is the one the job started from (same bytes)."""
    path = str(job.source.get("path", ""))
    if not os.path.exists(path):
        return "gone"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return "unreadable"
    if size != job.source.get("size") or sha256 != job.source.get("sha256"):
        return "changed"
    return None


def _identity(path: str) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime) of a list file: what a rewrite changes."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise recipients.RecipientsError(f"cannot read recipient file {path!r}: {e}") from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_unchanged(path: str, opened: tuple[int, int, int, int], line: int) -> None:
    if _identity(path) != opened:
        raise recipients.RecipientsError(
            f"{path} changed while it was being read (rows after line {line} are not"
            " accepted); restore it and run `fastsend resume`, or resume --abandon-rest"
        )


def rows_left(job: IngestJob) -> int:
    """Rows of a job's list not read yet (neither accepted, rejected nor a duplicate)."""
    return max(0, job.total - job.accepted - job.rejected - job.duplicates)


def _without(rows: list[Row], drop: list[int]) -> list[Row]:
    """``rows`` without the indexes ``drop`` (ascending)."""
    out: list[Row] = []
    at = 0
    for i in drop:
        out += rows[at:i]
        at = i + 1
    out += rows[at:]
    return out


# -- the acceptor -----------------------------------------------------------------


class Acceptor:
    """Creates campaigns and spools recipients (see the module docstring).

    ``suppression`` may be None (no list yet: nothing is suppressed); ``wake``
    is called after rows that need delivering were spooled."""

    def __init__(
        self,
        spool: Spool,
        events: EventLog,
        suppression: SuppressionList | None,
        wake: Callable[[], None] | None = None,
        max_size: int = 0,
    ) -> None:
        self.spool = spool
        # [delivery] max_message_size: a list row whose message would be larger is
        # refused as the list is read (row_sizer), with its line
        self.max_size = max_size
        self.events = events
        self.suppression = suppression
        self.wake = wake
        # The per-message event index (serve's EventIndex / RedisEventIndex), if
        # any: what :meth:`retell` asks which rows' events are already out.
        self.index: Any = None
        self._tenants: dict[int, str] = {}
        # campaign -> the fingerprints of its spooled addresses (a spool one process
        # writes; see unseen), the most recently used last
        self._seen: OrderedDict[int, recipients.FpSet] = OrderedDict()
        self._records_fps: bool | None = None  # the spool keeps fingerprints itself

    # -- campaigns -------------------------------------------------------------

    def create_campaign(
        self,
        spec: dict[str, Any],
        *,
        name: str = "",
        tenant: str = DEFAULT_TENANT,
        options: dict[str, Any] | None = None,
        paused: bool = False,
        status: str | None = None,
    ) -> int:
        """Create a campaign from a spec :func:`check_campaign` returned, active,
        ``paused`` or in ``status`` (``"staging"``: see fastsend.spool.STAGING)."""
        status = status or ("paused" if paused else "active")
        cid = self.spool.create_campaign(
            spec, name=name, tenant=tenant, options=options, status=status
        )
        self._tenants[cid] = tenant
        return cid

    def tenant(self, campaign_id: int) -> str:
        """The tenant owning a campaign (KeyError if there is no such campaign)."""
        t = self._tenants.get(campaign_id)
        if t is None:
            info = self.spool.get_campaign(campaign_id)
            if info is None:
                raise KeyError(campaign_id)
            if len(self._tenants) >= TENANTS_KEPT:  # (serve makes campaigns for months)
                self._tenants.clear()
            t = self._tenants[campaign_id] = info.tenant or DEFAULT_TENANT
        return t

    # -- recipients ------------------------------------------------------------

    def accept(
        self,
        campaign_id: int,
        rows: list[Row],
        *,
        ingest: IngestMark | None = None,
        idem: IdemMark | None = None,
        committed: Callable[[list[int]], None] | None = None,
        held: list[tuple[int, list[int], list[str], set[int], float]] | None = None,
        dedup: bool = False,
        stowed: Stowed | None = None,
        wake: bool = True,
    ) -> list[int]:
        """Spool ``rows`` durably (one transaction, with ``ingest``'s position, or
        recorded as a part of an Idempotency-Key's request: ``idem``); returns
        their ids in the order of ``rows``. ``committed`` (tests' fault points)
        is called with the ids once they are durable, before their events.
        ``held``: the events are not emitted but added there, (campaign, ids,
        rcpts, suppressed indexes, time), for :meth:`emit_accepted` once the
        rows are the tenant's (a campaign still staging may be abandoned).
        ``dedup``: a row whose address the campaign has (or an earlier row of
        ``rows``) is left out (:meth:`unseen`): the ids are then those of the
        rows spooled, in order, fewer than ``rows``; ``ingest``'s counts are
        taken as counting every row, its ``accepted`` lowered and its
        ``duplicates`` raised by those left out. ``stowed``: :meth:`stow`'s of
        ``rows`` (their bodies stored already, in a thread). ``wake=False``: the
        supervisor is not woken (a caller in another thread than the loop's, with
        ``held``: it emits the events and wakes it on the loop)."""
        if not rows and ingest is None:
            return []
        if self.events.failing and ingest is None:
            # The event log could not be written (its disk full): nothing is spooled
            # until it can (OSError: the request is refused whole, as when the
            # spool's own disk is full), else mail would be taken without its record.
            self.events.flush()
        if not dedup or not rows:
            return self._accept(campaign_id, rows, ingest, idem, committed, held, None, stowed,
                                wake)  # fmt: skip
        for attempt in range(1, 11):
            table = None
            try:
                todo, fps, table = self.unseen(campaign_id, rows)
                mark = ingest
                if mark is not None and len(todo) < len(rows):
                    d = len(rows) - len(todo)
                    mark = msgspec.structs.replace(
                        mark, accepted=mark.accepted - d, duplicates=mark.duplicates + d
                    )
                return self._accept(campaign_id, todo, mark, idem, committed, held, fps,
                                    wake=wake)  # fmt: skip
            except FpsChanged:  # another node spooled to the campaign meanwhile: again
                if attempt == 10:
                    raise
            except BaseException:
                if table is not None:  # (what it noted may not be spooled: rebuilt)
                    self._seen.pop(campaign_id, None)
                raise
        raise AssertionError("unreachable")

    def unseen(
        self, campaign_id: int, rows: list[Row]
    ) -> tuple[list[Row], list[int] | None, recipients.FpSet | None]:
        """The rows of ``rows`` whose address the campaign has not (nor an earlier
        row of them), in order; the fingerprints to record with them (a spool
        several nodes write: :meth:`Spool.recorded_fps`), and the table that
        noted them (a spool this process alone writes: the campaign's table,
        rebuilt from :meth:`Spool.spooled_rcpts` the first time, which the
        caller drops if the rows are not spooled)."""
        table = self._table(campaign_id)
        if table is not None:
            dups = table.add_rows(rows)
            return (_without(rows, dups) if dups else rows), None, table
        fps: list[int] = []
        dups = recipients.FpSet().add_rows(rows, fps)
        todo = _without(rows, dups) if dups else rows
        known = self.spool.recorded_fps(campaign_id, fps) or []
        if any(known):
            todo = [r for r, k in zip(todo, known, strict=True) if not k]
            fps = [f for f, k in zip(fps, known, strict=True) if not k]
        return todo, fps, None

    def fresh(
        self,
        campaign_id: int,
        rows: list[Row],
        look: bool = True,
        drop: Callable[[list[int]], list[int]] | None = None,
    ) -> int:
        """How many of ``rows`` :meth:`accept` with ``dedup`` would spool now: those
        whose address neither the campaign has nor an earlier row of them. A look
        that records nothing (a tenant's quota counts these before they are
        spooled, not the rows a list repeats); another request may spool some of
        them meanwhile, so what is spooled can be fewer, never more. ``look=False``:
        the campaign has no rows (a new one): its addresses are not looked up.
        ``drop``: the fingerprints less those counted elsewhere (a list of the
        campaign still being spooled), left out first."""
        fps: list[int] = []
        recipients.FpSet().add_rows(rows, fps)  # (each address once, in order)
        rest = drop(fps) if drop is not None else fps
        return len(rest) - (self.known(campaign_id, rest) if look else 0)

    def known(self, campaign_id: int, fps: list[int]) -> int:
        """How many of the fingerprints ``fps`` the campaign's spooled rows have."""
        if not fps:
            return 0
        table = self._table(campaign_id)
        if table is not None:
            return sum(table.has_fps(fps))
        return sum(self.spool.recorded_fps(campaign_id, fps) or [])

    def _table(self, campaign_id: int, more: int = 0) -> recipients.FpSet | None:
        """The campaign's table of addresses (built from the spool if this process
        has none), with room for ``more``; None for a spool that records them."""
        if self._records_fps is None:
            self._records_fps = self.spool.recorded_fps(campaign_id, []) is not None
        if self._records_fps:
            return None
        table = self._seen.get(campaign_id)
        if table is None:
            table = recipients.FpSet()
            for chunk in self.spool.spooled_rcpts(campaign_id):
                table.reserve(len(chunk))
                table.add_all(chunk)
            self._seen[campaign_id] = table
            while len(self._seen) > DEDUP_TABLES:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(campaign_id)
        table.reserve(more)
        return table

    def _accept(
        self,
        campaign_id: int,
        rows: list[Row],
        ingest: IngestMark | None,
        idem: IdemMark | None,
        committed: Callable[[list[int]], None] | None,
        held: list[tuple[int, list[int], list[str], set[int], float]] | None,
        fps: list[int] | None,
        stowed: Stowed | None = None,
        wake: bool = True,
    ) -> list[int]:
        now = time.time()
        tenant = self.tenant(campaign_id)
        rcpts = [r[0] for r in rows]
        hits: set[str] = set()
        if self.suppression is not None and rows:
            hits = self.suppression.contains_many(rcpts, tenant=tenant)
        gone = {i for i, r in enumerate(rcpts) if r in hits} if hits else set()
        if stowed is not None and stowed.rows is rows:
            stored, blobs = stowed.stored, stowed.blobs
        else:
            stored, blobs = self._store_blobs(rows, now)
        ids = self.spool.add_messages(
            campaign_id, stored, now, suppressed=gone, ingest=ingest, idem=idem, fps=fps
        )
        for digest, where in blobs.items():
            if stowed is not None and stowed.blobs is blobs:
                stowed.refs.append((digest, [ids[i] for i in where]))  # (ref_stowed)
            else:
                self.spool.ref_blob(digest, [ids[i] for i in where])
        if committed is not None:
            committed(ids)
        if held is not None:
            if ids:
                held.append((campaign_id, ids, rcpts, gone, now))
        elif ids:
            try:
                self.emit_accepted(campaign_id, ids, rcpts, gone, now)
            except OSError as e:
                # The rows are spooled: their events wait in the log's buffer for the
                # next flush that can write. Before, the error reached the caller, and
                # the API answered 507 "not accepted" (SMTP submission 452) for mail it
                # had taken: the client's retry spooled it again. A list's ingest (its
                # ids noted untold) still stops here: its next read tells them again.
                if ingest is not None or storage_problem(e) is None:
                    raise
                log.error("the event log cannot be written (%s): the events of %d row(s)"
                          " just spooled wait in memory; no more mail is taken until it"
                          " can be", e, len(ids))  # fmt: skip
        if wake and self.wake is not None and len(gone) < len(ids):
            self.wake()
        return ids

    def emit_accepted(
        self, campaign_id: int, ids: list[int], rcpts: list[str], gone: Collection[int],
        now: float, **extra: Any,
    ) -> None:  # fmt: skip
        """The "accepted" event of each spooled row ("suppressed" for the indexes
        in ``gone``), to the log and its listeners, flushed."""
        tenant = self.tenant(campaign_id)
        if not gone and not extra:  # every row accepted: columns, no dict per event
            self.events.emit_rows([AcceptedRows(now, campaign_id, tenant, ids, rcpts)])
            self.events.flush()
            return
        evs = accepted_dicts(now, campaign_id, tenant, ids, rcpts)
        for i in gone:
            evs[i]["event"] = "suppressed"
        if extra:
            for e in evs:
                e.update(extra)
        self.events.emit_many(evs)
        self.events.flush()

    def retell(self, campaign_id: int, ids: Collection[int], why: str, index: Any = None) -> int:
        """Emit, with ``"resumed": true``, the "accepted" / "suppressed" events
        of spooled rows an earlier process committed and died before telling
        (``why`` names them in the log); returns how many. With an event index
        (``index``, else :attr:`index`), only the rows it lacks; without one,
        all of them: events are at least once (a process killed between its log
        line and what recorded it as told has those lines twice, never none)."""
        index = index if index is not None else self.index
        have = index.logged(ids, ("accepted", "suppressed")) if index is not None else set()
        miss: list[int] = []
        rcpts: list[str] = []
        gone: list[int] = []
        for mid in ids:
            if mid in have:
                continue
            m = self.spool.message(mid)
            if m is None:  # gone already (swept): nothing to tell
                continue
            if m["state"] == "suppressed":
                gone.append(len(miss))
            miss.append(mid)
            rcpts.append(str(m["rcpt"]))
        if miss:
            self.emit_accepted(campaign_id, miss, rcpts, gone, time.time(), resumed=True)
            log.warning(
                "%s: emitted the events of %d row(s) it spooled and died before telling",
                why, len(miss),
            )  # fmt: skip
        return len(miss)

    def stow(self, rows: list[Row]) -> Stowed | None:
        """The bodies of ``rows`` worth a blob stored now, from any thread (a
        large submitted message's, off serve's loop: its SHA-256 and a write of
        tens of MB held every listener, the API and dispatch); :meth:`accept`
        then spools the rows that refer to them. None: nothing to store, or a
        spool that writes from its own thread only (``Spool.blobs_aside``)."""
        if not getattr(self.spool, "blobs_aside", False):
            return None
        stored, blobs = self._store_blobs(rows, time.time(), self.spool.put_blob_aside)
        return Stowed(rows, stored, blobs, []) if blobs else None

    def ref_stowed(self, stowed: Stowed) -> None:
        """The rows :meth:`accept` spooled with ``stowed`` recorded as its blobs'
        (from any thread, as :meth:`stow`). Not done (a kill, a storage error):
        the blob's pending reference is ended by the sweep, from the rows that
        name it, as after any accept that died before it (``sweep_blobs``)."""
        for digest, ids in stowed.refs:
            self.spool.ref_blob_aside(digest, ids)

    def _store_blobs(
        self, rows: list[Row], now: float, put: Callable[[str, bytes, float], None] | None = None
    ) -> tuple[list[Row], dict[str, list[int]]]:
        """``rows`` with each body worth sharing replaced by a reference to a blob
        stored (durably) before the rows; and which rows hold each blob. Rows are
        spooled after their blob, so no row is ever without its body."""
        # Nearly every list's vars are short: that is found at C speed, each
        # row visited in Python only when one may be worth sharing.
        if max(map(len, map(_third, rows)), default=0) < BLOB_SHARED:
            return rows, {}
        uses: dict[bytes, list[int]] = {}
        for i, r in enumerate(rows):
            if len(r[2]) >= BLOB_SHARED and not r[2].startswith(NOTIFY_HEAD):
                uses.setdefault(r[2], []).append(i)
        if not uses:
            return rows, {}
        out = list(rows)
        blobs: dict[str, list[int]] = {}
        for body, where in uses.items():
            if len(where) < 2 and len(body) < BLOB_ALONE:
                continue
            digest = hashlib.sha256(body).hexdigest()
            (put or self.spool.put_blob)(digest, body, now)
            ref = blob_ref(digest)
            for i in where:
                out[i] = (rows[i][0], rows[i][1], ref)
            blobs[digest] = where
        return out, blobs

    # -- recipient lists ---------------------------------------------------------

    def start_ingest(
        self, campaign_id: int, path: str, *, origin: str = "", tags: dict[str, str] | None = None
    ) -> IngestJob:
        """Record a durable ingest job for the list at ``path`` (not read yet),
        held by this process. ``origin``: where the list came from ("api": an
        upload a serving process continues); ``tags``: more fields of its
        source, written with the job (an Idempotency-Key's token)."""
        source, total = describe_source(path)
        if origin:
            source["origin"] = origin
        source.update(tags or {})
        job_id = self.spool.create_ingest(campaign_id, source, total)
        job = self.spool.get_ingest(job_id)
        assert job is not None
        return job

    def ingest(
        self,
        job: IngestJob,
        *,
        chunk: int = CHUNK,
        on_bad: Callable[[recipients.BadRow], None] | None = None,
        first: int = 0,
    ) -> Iterator[IngestMark]:
        """Read the job's list from after its last committed line, spooling
        ``chunk`` good rows per transaction (the first: ``first``, if given)
        together with the job's new position; yields each position once durable. The job is marked done
        after the last row. The caller checks :func:`source_problem` first
        when resuming. ``on_bad`` sees each bad row (not spooled).

        The job is held for this process first (one reader per job:
        :class:`~fastsend.spool.IngestBusy` names the live one), and released
        once done; a holder that dies leaves nothing that blocks."""
        self.spool.hold_ingest(job.id)  # a no-op for the job's creator, who holds it
        if job.untold != (0, 0):  # a reader died between a batch's commit and its events
            first, last = job.untold
            self.retell(job.campaign, range(first, last + 1), f"list ingest job {job.id}")
            self.spool.told_ingest(job.id)
        # Tests only: ingest-kill-after-commit:N kills this process (SIGKILL) once
        # the N-th batch read here is committed, before its events are emitted;
        # ingest-stop-after-commit:N stops it there (SIGSTOP: the test breaks the
        # spool meanwhile, then sends SIGCONT).
        hook = _fault_after_commit if FAULT else None
        path = str(job.source["path"])
        # Read as delivery makes room (send's feeder is paced), so the file may be
        # rewritten meanwhile: each batch is checked against the file as it was
        # opened before it is accepted (rows read from a changed file never are).
        opened = _identity(path)
        committed = job.line
        accepted, rejected, duplicates = job.accepted, job.rejected, job.duplicates
        # A row whose header-bound variable holds a line break, or that gives no
        # value for a variable without a default, is refused here, with its
        # line, not spooled to bounce at render (550 5.6.0).
        info = self.spool.get_campaign(job.campaign)
        refuse, need = row_checks(info.spec) if info is not None else (frozenset(), frozenset())
        sizer = row_sizer(info.spec, self.max_size) if info is not None else None
        dedup = info is None or not (info.options or {}).get(KEEP_DUPLICATES)
        if dedup:  # the table sized for the list at once (grown row by row: 1.5x the CPU)
            self._table(job.campaign, rows_left(job))
        for b in recipients.batches(
            path, after=job.line, size=chunk, first=first, refuse=refuse, need=need
        ):
            if sizer is not None and b.rows:
                _size_rows(b, sizer)
            if b.bad:
                rejected += len(b.bad)
                if on_bad is not None:
                    for row in b.bad:
                        on_bad(row)
            _check_unchanged(path, opened, committed)
            mark = IngestMark(job.id, b.line, accepted + len(b.rows), rejected, duplicates)
            ids = self.accept(job.campaign, b.rows, ingest=mark, committed=hook, dedup=dedup)
            duplicates += len(b.rows) - len(ids)  # (as accept wrote them with the rows)
            accepted += len(ids)
            mark = IngestMark(job.id, b.line, accepted, rejected, duplicates)
            self.spool.told_ingest(job.id)  # the batch's events are out (accept flushed them)
            committed = b.line
            if b.last:
                self.spool.finish_ingest(job.id, "done")
                self.spool.release_ingest(job.id)
            else:
                self.spool.renew()  # the hold, on a backend that leases it
            yield mark

    def feed(
        self,
        job: IngestJob,
        *,
        on_bad: Callable[[recipients.BadRow], None] | None = None,
        first: int = 0,
    ) -> Iterator[IngestMark | BaseException]:
        """:meth:`ingest`, carried on across outages of a shared spool (Redis
        restarting, a network blip: ``Spool.outage_errors``) for a process that
        delivers meanwhile (``send``, ``resume``). An outage is yielded as its
        error: the caller waits until the spool answers again, then asks for
        more, and reading goes on from the job's last committed row (a batch
        and the job's position commit together, so a batch the outage cut off
        is read again or, if it landed, its events are told: nothing twice).
        A file that changed meanwhile stops it (AcceptError: ``resume`` tells
        how many rows were never accepted). Each bad row is told once."""
        outage = self.spool.outage_errors()
        told: set[int] = set()

        def bad(row: recipients.BadRow) -> None:
            if row.line not in told and on_bad is not None:
                told.add(row.line)
                on_bad(row)

        current: IngestJob | None = job
        read = job.accepted + job.rejected + job.duplicates
        while current is not None:
            try:
                for mark in self.ingest(current, on_bad=bad, first=first):
                    read = mark.accepted + mark.rejected + mark.duplicates
                    yield mark
                return
            except outage as e:
                yield e
            except OSError as e:  # the event log's disk full: the spool's outage too
                problem = storage_problem(e) if outage else None
                if problem is None:
                    raise
                refused = SpoolStorageError(f"the event log's storage {problem} ({e})")
                refused.__cause__ = e  # (storage_problem reads it: `send` says what to run)
                yield refused
            first = 0
            while True:  # where the job stands now that the spool answers
                try:
                    current = self.spool.get_ingest(job.id)
                    break
                except outage as e:
                    yield e
            if current is None:
                raise SpoolError(
                    f"the spool came back without this list's ingest job {job.id} (it lost"
                    f" its data while out of reach): {read:,} of {job.total:,} rows of"
                    f" {job.source.get('path')} had been read, and what they spooled is gone"
                    " with it"
                )
            if current.finished:
                return
            problem = source_problem(current)
            if problem is not None:
                raise AcceptError(
                    f"{current.source.get('path')} is {problem}: {rows_left(current):,} row(s)"
                    " not read"
                )
