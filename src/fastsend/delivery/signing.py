"""DKIM for mail that does not come from a campaign file: the `[dkim]` of the
config (``fastsend serve``) applied to API and SMTP-submitted messages.

A campaign file signs with its own ``[dkim]``/``[[dkim]]`` tables. Messages that
carry their own content (the transactional kind) are signed with the keys
:meth:`fastsend.tenants.Tenants.dkim_for` chooses by (tenant, From domain): the
tenant's own keys, and the config's ``[dkim]`` entries for the tenant's domains
(without ``[tenants]``: the ``[dkim]`` entries aligned with the From domain):

- campaign-format messages (from, subject, text, ...) get those entries as their
  ``dkim`` key, so the renderer signs them like any campaign;
- raw MIME (``{"raw": ...}``) is made ready here (:meth:`ConfigDKIM.sign_raw`):
  its line ends made CRLF (a bare LF or CR is one line end, RFC 5322 2.3: a
  message written with LF alone, as programs often do, would otherwise go
  out unsigned, and one with a stray CR with a signature no verifier
  accepts), a ``Date`` and a ``Message-ID`` put in front when it has none
  (RFC 5322 3.6 requires the first; Gmail refuses mail without the second),
  its ``Bcc`` fields taken out (every recipient would read them), and its
  Return-Path, Authentication-Results and Delivered-To / X-Original-To /
  Envelope-To (see ``_ready``; Received stays), its 8-bit
  parts and lines over 998 octets re-encoded to 7 bit before it is signed
  (:mod:`fastsend.message.rawmime`: RFC 6376 5.3; what cannot be re-encoded
  goes with BODY=8BITMIME, or is refused), then a DKIM-Signature header per
  entry; it is otherwise sent byte for byte.

Keys are loaded once per process (fastsend.message.keys caches them), by
:meth:`ConfigDKIM.preload` in the supervisor before it forks the workers, so
they share them. ``fastsend.message.dkim`` (and ``cryptography``) is imported
only when there is a key to sign with. This module
does not decide policy about unsigned mail; a From domain with no key is sent
unsigned (``fastsend check-domain`` reports the missing DKIM record).
"""

from __future__ import annotations

import re
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from fastsend import msgid
from fastsend.config import Config
from fastsend.message.rawmime import crlf_lines, prepare
from fastsend.tenants import Tenants, ascii_domain

if TYPE_CHECKING:
    from fastsend.message.dkim import Signer


class ConfigDKIM:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tenants = Tenants.from_config(config)
        self._signers: dict[tuple[str | None, str], list[Signer]] = {}

    @cached_property
    def entries(self) -> bool:
        """Whether any key is configured (the config's [dkim] or a tenant's)."""
        t = self.tenants
        return bool(t.global_dkim) or any(x.dkim for x in t.by_name.values())

    def problems(self) -> list[str]:
        """Load every configured key now (before fork: the workers share them);
        what is wrong with those that cannot be loaded, one line each naming its
        table, domain and selector (check-config's errors; a warning at start:
        the mail such a key signs is deferred, 4.3.5, until it can be read)."""
        if not self.entries:
            return []
        from fastsend.message.keys import DkimKeyError, load_private_key

        t = self.tenants
        out: list[str] = []
        for where, entries in [("[dkim]", t.global_dkim),
                               *((f"[tenants.{n}.dkim]", x.dkim) for n, x in t.by_name.items())]:  # fmt: skip
            for e in entries:
                try:
                    load_private_key(e["key"])
                except DkimKeyError as exc:
                    out.append(f"{where} {e['domain']} selector {e['selector']}: {exc}")
        return out

    def preload(self) -> None:
        """:meth:`problems`, each said on stderr as a warning."""
        import sys

        for p in self.problems():
            print(
                f"fastsend: warning: {p}: the mail it signs is deferred until it can be read",
                file=sys.stderr,
            )

    def for_domain(self, domain: str, tenant: str | None = None) -> list[dict[str, Any]]:
        return self.tenants.dkim_for(tenant, domain)

    def signers(self, domain: str, tenant: str | None = None) -> list[Signer]:
        d = domain.lower().rstrip(".")
        s = self._signers.get((tenant, d))
        if s is None:
            from fastsend.message.dkim import Signer

            s = self._signers[(tenant, d)] = [
                Signer.from_settings(e) for e in self.for_domain(d, tenant)
            ]
        return s

    def sign_raw(self, data: bytes, tenant: str | None = None, message_id: str = "") -> bytes:
        """What :meth:`prepare_raw` returns, without its ``eightbit``."""
        return self.prepare_raw(data, tenant, message_id)[0]

    def prepare_raw(
        self, data: bytes, tenant: str | None = None, message_id: str = ""
    ) -> tuple[bytes, bool]:
        """``(data ready to send, eightbit)``: CRLF line ends, within the caps
        and its 8-bit parts and long lines re-encoded to 7 bit
        (fastsend.message.rawmime.prepare: RawMimeError when it cannot be sent
        unbroken; ``eightbit`` when 8-bit octets are left, to send with
        BODY=8BITMIME), no Bcc, a Date and (with a ``message_id``:
        ``<message_id@From domain>``) a Message-ID added in front when it has
        none, and DKIM-Signature headers for (tenant, its From domain) when
        there are keys."""
        data, eightbit = prepare(crlf_lines(data))
        return self._ready(data, tenant, message_id), eightbit

    def _ready(self, data: bytes, tenant: str | None, message_id: str) -> bytes:
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            # No blank line: a message that is all header section (RFC 5322 3.5:
            # the body is optional), as rawmime.prepare reads it; given its empty
            # body. (Returned as it came, its Bcc went to every recipient, and it
            # went with no Date, no Message-ID and unsigned.)
            head = data[:-2] if data.endswith(b"\r\n") else data
            data = head + b"\r\n\r\n"
        headers = _header_lines(head + b"\r\n")
        if any(n in _TAKEN_OUT for n, _ in headers):
            # Blind copies are blind (RFC 5322 3.6.3): every recipient would
            # read the Bcc field. A Return-Path is the final delivery's to write
            # from the envelope (RFC 5321 4.4: a message-originating system
            # SHOULD NOT send one; a tenant's would show readers an address
            # bounces never go to). Both taken out, as Postfix's cleanup does.
            # Authentication-Results are verdicts nobody here made (RFC 8601 5:
            # a border MTA removes those claiming its trust boundary, and may
            # remove all); Delivered-To / X-Original-To / Envelope-To tell of a
            # past final delivery (a saved message sent again: Postfix's local
            # delivery bounced it as a mail loop, 5.4.6). The campaign path
            # refuses all of these in [headers]; a raw message loses them.
            # Received fields stay (RFC 5321 4.4: never deleted; they bound a
            # real loop by hop count), ARC sets and Received-SPF too (trace and
            # signed chains a relay must not cut).
            headers = [(n, ln) for n, ln in headers if n not in _TAKEN_OUT]
            data = b"".join(ln for _, ln in headers) + b"\r\n" + body
        domains = _from_domains(headers)
        domain = ascii_domain(domains[0]) if len(domains) == 1 else ""
        names = {n for n, _ in headers}
        added: list[tuple[str, bytes]] = []
        if "date" not in names:
            stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
            added.append(("date", f"Date: {stamp}\r\n".encode("ascii")))
        if "message-id" not in names and message_id and _DOMAIN.fullmatch(domain):
            right = msgid.message_id_domain(self.config.msgid_tag, domain)  # (unique per spool)
            added.append(("message-id", f"Message-ID: <{message_id}@{right}>\r\n".encode()))
        if added:
            data = b"".join(ln for _, ln in added) + data
            headers = added + headers
        if not self.entries or not domain:
            return data  # no key; or no From, or several: nothing to align a signature with
        sigs = [s.sign(headers, body) for s in self.signers(domain, tenant)]
        return b"".join(sigs) + data if sigs else data


_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.\-]*[a-z0-9])?")
# Fields a raw message loses (see _ready).
_TAKEN_OUT = frozenset({
    "bcc", "return-path", "authentication-results", "delivered-to", "x-original-to",
    "envelope-to",
})  # fmt: skip


# The fields a reader sees as a message's author or sender (RFC 5322 3.6.2, 3.6.6;
# Outlook shows Sender as "on behalf of"): each address's domain must be the tenant's.
IDENTITY_FIELDS = ("from", "sender", "resent-from", "resent-sender")


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of ``raw``'s header section,
    with the line ends it will be sent with (a bare CR or LF ends a line)."""
    head = crlf_lines(raw).partition(b"\r\n\r\n")[0]
    out: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            field, prev = out[-1]
            out[-1] = (field, prev + " " + line.decode("utf-8", "replace"))
        elif b":" in line:
            name, _, value = line.partition(b":")
            out.append((name.strip().lower().decode("latin-1"), value.decode("utf-8", "replace")))
        else:
            out.append(("", line.decode("utf-8", "replace")))
    return out


def identity_domains(raw: bytes) -> tuple[bool, list[tuple[str, str]]]:
    """(whether it has a From field, [(field name, domain), ...] of every address in
    its From, Sender, Resent-From and Resent-Sender fields), read as it is sent. An
    address with no domain gives "" (a domain no tenant has). The API and SMTP
    submission judge these at intake (fastsend.serve.senders), the worker again
    before sending (a config change may have taken a domain away since)."""
    import email.utils  # here: ~3 ms to import, and only self-contained messages need it

    has_from = False
    out: list[tuple[str, str]] = []
    for name, value in header_fields(raw):
        if name not in IDENTITY_FIELDS:
            continue
        has_from = has_from or name == "from"
        for _, addr in email.utils.getaddresses([" ".join(value.split())]):
            out.append((name, addr.rpartition("@")[2].lower().rstrip(".") if addr else ""))
    return has_from, out


def _from_domains(headers: list[tuple[str, bytes]]) -> list[str]:
    import email.utils  # here: ~3 ms to import, and only self-contained messages need it

    out = []
    for name, line in headers:
        if name == "from":
            value = line.split(b":", 1)[1].decode("utf-8", "replace")
            for _, addr in email.utils.getaddresses([" ".join(value.split())]):
                out.append(addr.rpartition("@")[2].lower().rstrip(".") if addr else "")
    return out


def _header_lines(head: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw line with its folds and CRLF) for each header field."""
    out: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and out:
            name, prev = out[-1]
            out[-1] = (name, prev + line + b"\r\n")
        else:
            out.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), line + b"\r\n"))
    return out
