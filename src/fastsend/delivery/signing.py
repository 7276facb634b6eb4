"""DKIM for mail that does not come from a campaign file: the `[dkim]` of the
config (``fastsend serve``) applied to API and SMTP-submitted messages.

A campaign file signs with its own ``[dkim]``/``[[dkim]]`` tables. Messages that
carry their own content (the transactional kind) are signed with the config's
``[dkim]`` entries whose domain aligns (relaxed) with the message's From domain:

- campaign-format messages (from, subject, text, ...) get those entries as their
  ``dkim`` key, so the renderer signs them like any campaign;
- raw MIME (``{"raw": ...}``) is signed here: a DKIM-Signature header per entry
  is put in front of the message, which is otherwise sent byte for byte.

Keys are loaded once per worker (fastsend.message.keys caches them). This module
does not decide policy about unsigned mail; a From domain with no key is sent
unsigned (``fastsend check-domain`` reports the missing DKIM record).
"""

from __future__ import annotations

import email.utils
import os
from functools import cached_property
from typing import Any

from fastsend.config import Config
from fastsend.message.dkim import Signer


class ConfigDKIM:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._signers: dict[str, list[Signer]] = {}

    @cached_property
    def entries(self) -> list[dict[str, Any]]:
        raw = self.config.raw.get("dkim", [])
        items = [raw] if isinstance(raw, dict) else list(raw) if isinstance(raw, list) else []
        out = []
        for e in items:
            if not isinstance(e, dict) or not {"domain", "selector", "key"} <= set(e):
                raise ValueError("config [dkim] entries need domain, selector and key")
            e = dict(e)
            e["domain"] = str(e["domain"]).lower().rstrip(".")
            e["key"] = os.path.join(self.config.base_dir, str(e["key"]))
            out.append(e)
        return out

    def for_domain(self, domain: str) -> list[dict[str, Any]]:
        d = domain.lower().rstrip(".")
        return [e for e in self.entries if d == e["domain"] or d.endswith("." + e["domain"])]

    def signers(self, domain: str) -> list[Signer]:
        s = self._signers.get(domain)
        if s is None:
            s = self._signers[domain] = [Signer.from_settings(e) for e in self.for_domain(domain)]
        return s

    def sign_raw(self, data: bytes) -> bytes:
        """``data`` with DKIM-Signature headers for its From domain (unchanged if none)."""
        if not self.entries:
            return data
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return data
        headers = _header_lines(head + b"\r\n")
        from_line = next((ln for name, ln in headers if name == "from"), None)
        if from_line is None:
            return data
        value = from_line.split(b":", 1)[1].decode("utf-8", "replace")
        addr = email.utils.parseaddr(" ".join(value.split()))[1]
        domain = addr.rpartition("@")[2]
        sigs = [s.sign(headers, body) for s in self.signers(domain)] if domain else []
        return b"".join(sigs) + data if sigs else data


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
