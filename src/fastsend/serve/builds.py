"""Tenants' templates, built off serve's loop.

A template is parsed, checked and compiled (``Campaign.from_dict``,
``accept.check_campaign``, the row size measure ``accept.row_sizer``) in up to a
couple of seconds at the caps (10,000 placeholders, 100,000 HTML tags): on serve's
one loop that held every tenant's API calls, tracking links and listeners that
long, each time (an inline template was built again by every request naming it,
a stored one by every message naming its id). Built here in a thread, at most
``THREADS`` at a time and one a tenant at a time (a tenant sending many costly
templates waits for its own, not the others), and kept: a template already
built (the same tenant's same template, the same size limit) is not built again,
up to ``KEPT`` templates and ``KEPT_BYTES`` of memory they are reckoned to take
(``Built.weight``), least recently used dropped first. The loop keeps running between a thread's bytecodes (it gets the
GIL every switch interval, 5 ms).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import orjson

from fastsend.accept import check_campaign, header_variables, row_sizer
from fastsend.message import Campaign
from fastsend.message.campaign import check_inline

THREADS = 2  # builds at once (of all tenants)
KEPT = 1024  # templates kept built
KEPT_BYTES = 256 << 20  # of memory, as Built.weight reckons it


class Built:
    """A template built: its Campaign, its spec as spooled (``spec``: without the
    server's DKIM and tenant binding), the variables it puts into headers
    (``names``) and the measure of a row's message size (``sizer``: None when
    no row can be over the limit)."""

    __slots__ = ("camp", "names", "sizer", "spec", "weight")

    def __init__(self, camp: Campaign, spec: dict[str, Any], limit: int) -> None:
        self.camp = camp
        self.spec = spec
        self.names = header_variables(camp.to_dict())
        self.sizer = row_sizer(camp.to_dict(), limit)
        # What it holds, measured (tracemalloc): twice its spec's JSON (attachments
        # kept as sent and as read), and some 8 octets a character of its text and
        # HTML parsed (literals, placeholders, HTML escapes: 5.7 MB for 650 KB of HTML
        # at the caps), kept once a process (the renderer row_sizer holds).
        parts = sum(len(v) for k, v in spec.items() if k in ("text", "html") and isinstance(v, str))
        self.weight = 2 * len(orjson.dumps(spec)) + 8 * parts

    def own_spec(self) -> dict[str, Any]:
        """A copy of the spec a request may complete (``api.server_dkim`` sets its
        ``dkim`` and its tracking's ``tenant``): the kept one stays as built."""
        spec = dict(self.spec)
        if isinstance(spec.get("tracking"), dict):
            spec["tracking"] = dict(spec["tracking"])
        return spec


def build_inline(template: dict[str, Any], limit: int) -> Built:
    """A tenant's inline template: no server file named (check_inline, before
    anything is read), valid, and spoolable (CampaignError, PathKeyError,
    AcceptError otherwise)."""
    check_inline(template)
    camp = Campaign.from_dict(template)
    return Built(camp, check_campaign(camp, max_size=limit), limit)


def build_stored(spec: dict[str, Any], limit: int) -> Built:
    """A campaign's spec as spooled (accepted before)."""
    return Built(Campaign.from_dict(spec), spec, limit)


def inline_key(tenant: str, template: Any, limit: int) -> Hashable | None:
    """The key of a tenant's inline template as given (None: not to be kept,
    e.g. JSON orjson does not write back, an integer past 64 bits)."""
    try:
        digest = hashlib.sha256(orjson.dumps(template, option=orjson.OPT_SORT_KEYS)).digest()
    except (TypeError, orjson.JSONEncodeError):
        return None
    return ("inline", tenant, digest, limit)


class Builds:
    """The builds of one process (see the module's doc)."""

    def __init__(self, threads: int = THREADS, kept: int = KEPT, kept_bytes: int = KEPT_BYTES):
        self.threads = threads
        self.kept, self.kept_bytes = kept, kept_bytes
        self.done: OrderedDict[Hashable, Built] = OrderedDict()
        self.bytes = 0
        self.gate: asyncio.Semaphore | None = None  # (made in the loop that uses it)
        self.tenants: dict[str, tuple[asyncio.Lock, int]] = {}  # lock, requests using it
        self.built = 0  # templates built (tests, metrics)

    async def get(
        self, key: Hashable | None, tenant: str, fn: Callable[..., Built], *args: Any
    ) -> Built:
        """The template ``key`` built, by ``fn(*args)`` in a thread when it is
        not kept (its exceptions raised here; a failure is not kept)."""
        if key is not None and (hit := self.done.get(key)) is not None:
            self.done.move_to_end(key)
            return hit
        lock, users = self.tenants.get(tenant) or (asyncio.Lock(), 0)
        self.tenants[tenant] = (lock, users + 1)
        try:
            async with lock:  # one build a tenant at a time
                if key is not None and (hit := self.done.get(key)) is not None:
                    return hit  # (built while this request waited)
                if self.gate is None:
                    self.gate = asyncio.Semaphore(self.threads)
                async with self.gate:
                    built = await asyncio.to_thread(fn, *args)
                self.built += 1
                if key is not None:
                    self._keep(key, built)
                return built
        finally:
            lock, users = self.tenants[tenant]
            if users <= 1:
                del self.tenants[tenant]
            else:
                self.tenants[tenant] = (lock, users - 1)

    def _keep(self, key: Hashable, built: Built) -> None:
        if built.weight > self.kept_bytes:
            return
        old = self.done.pop(key, None)
        if old is not None:
            self.bytes -= old.weight
        self.done[key] = built
        self.bytes += built.weight
        while len(self.done) > self.kept or self.bytes > self.kept_bytes:
            _, gone = self.done.popitem(last=False)
            self.bytes -= gone.weight
