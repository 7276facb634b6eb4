"""A provider's own suppression lists, read for ``fastsend suppress sync``.

A provider keeps lists of addresses it will not send to (it answers "sent" and
drops the mail, or bounces it at once): the addresses that bounced hard, that
complained, that unsubscribed through its links. Mail fastsend routes through
another transport (direct MX, a relay, another provider) knows nothing of them;
``fastsend suppress sync TRANSPORT`` reads them into fastsend's suppression
list, so every route honours them (webhooks tell of each one as it happens:
serve.provider_events; a sync takes what happened before them or while they
were off).

- SES v2: ``GET /v2/email/suppression/addresses`` (ListSuppressedDestinations,
  SigV4, ``PageSize`` 1,000, ``NextToken``): reason BOUNCE -> a hard bounce,
  COMPLAINT -> a complaint (the account-level list holds nothing else).
- SendGrid v3 (Bearer key, ``limit`` 500 / ``offset`` pages):
  ``/v3/suppression/bounces`` (its "reason" text classified; SendGrid lists
  hard bounces there, soft ones are blocks, not read: they pass),
  ``/v3/suppression/invalid_emails``, ``/v3/suppression/spam_reports``,
  ``/v3/suppression/unsubscribes`` (global unsubscribes).
- Mailgun (basic auth, ``limit`` 1,000, ``paging.next``):
  ``/v3/DOMAIN/bounces``, ``/v3/DOMAIN/complaints``, ``/v3/DOMAIN/unsubscribes``.

Every request has the transport's ``timeout``; redirects are never followed and
a next-page URL elsewhere than the endpoint is not asked (the credentials go
only to the endpoint); every error text goes through :func:`http.scrub`.
A list is read whole before anything is written (:class:`SyncError` on any
failure: nothing half-synced). Read-only: nothing is removed at the provider.
"""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastsend.config.transports import TransportSpec
from fastsend.transports.http import scrub

HARD_BOUNCE = "hardbounce"  # a provider's bounce list names no finer reason
COMPLAINT = "complaint"
UNSUBSCRIBE = "unsubscribe"
MAX_PAGES = 100_000  # a provider answering the same page for ever stops here


class SyncError(Exception):
    """The provider could not be read (network, credentials, an answer not its
    API's): its text, without credentials."""


@dataclass
class Listed:
    """What a provider's lists hold: address -> fastsend's reason (a hard
    bounce's classified reason, "complaint", "unsubscribe"), and counts."""

    reasons: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, address: str, reason: str, kind: str) -> None:
        address = address.strip()
        if not address or "@" not in address:
            return
        self.counts[kind] = self.counts.get(kind, 0) + 1
        # A complaint or an unsubscribe says more of the person than a bounce.
        if address not in self.reasons or reason in (COMPLAINT, UNSUBSCRIBE):
            self.reasons[address] = reason


def _bounce_reason(text: str, status: str = "") -> str:
    """A provider's bounce text as fastsend's reason when it reads as a hard
    bounce (userunknown, hostunknown, ...), else :data:`HARD_BOUNCE`."""
    if not text and not status:
        return HARD_BOUNCE
    from fastsend.bounce.reply import classify_reply

    c = classify_reply(550, status, text, command="")
    return c.reason if c.hard and c.reason else HARD_BOUNCE


async def fetch(spec: TransportSpec, session: Any) -> Listed:
    """Every address on the transport's provider's suppression lists."""
    got = Listed()
    try:
        if spec.kind == "ses":
            await _ses(spec, session, got)
        elif spec.kind == "sendgrid":
            await _sendgrid(spec, session, got)
        elif spec.kind == "mailgun":
            await _mailgun(spec, session, got)
        else:
            raise SyncError(f"{spec.label}: a {spec.kind} transport keeps no suppression list")
    except SyncError:
        raise
    except Exception as e:  # network, TLS, timeouts
        text = scrub(f"{spec.label}: {e.__class__.__name__}: {e}", _secrets(spec))
        raise SyncError(text) from None
    return got


def _secrets(spec: TransportSpec) -> tuple[str, ...]:
    return tuple(v for v in spec.secrets.values() if len(v) >= 6)


async def _get(spec: TransportSpec, session: Any, url: str, headers: dict[str, str]) -> Any:
    """One page, its JSON; SyncError for anything but a 200 with JSON."""
    import aiohttp

    t = spec.timeout
    timeout = aiohttp.ClientTimeout(total=t + spec.answer_timeout, connect=t, sock_read=t)
    async with session.get(url, headers=headers, timeout=timeout, allow_redirects=False) as r:
        raw = await r.read()
        status = r.status
    if status != 200:
        text = raw[:300].decode("utf-8", "replace").replace("\n", " ").strip()
        raise SyncError(scrub(f"{spec.label}: HTTP {status} for {_path(url)}: {text}",
                              _secrets(spec)))  # fmt: skip
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SyncError(
            f"{spec.label}: {_path(url)} answered no JSON (check the endpoint)"
        ) from None


def _path(url: str) -> str:
    return urllib.parse.urlsplit(url).path


async def _ses(spec: TransportSpec, session: Any, got: Listed) -> None:
    from fastsend.transports.sigv4 import Signer

    s = spec.secrets
    signer = Signer(s["access_key_id"], s["secret_access_key"], spec.region, "ses",
                    s.get("session_token", ""))  # fmt: skip
    base = (spec.endpoint or f"https://email.{spec.region}.amazonaws.com").rstrip("/")
    token = ""
    for _ in range(MAX_PAGES):
        q = {"PageSize": "1000"}
        if token:
            q["NextToken"] = token
        url = f"{base}/v2/email/suppression/addresses?{urllib.parse.urlencode(q)}"
        doc = await _get(spec, session, url, signer.sign("GET", url, {}, b""))
        items = doc.get("SuppressedDestinationSummaries") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise SyncError(f"{spec.label}: the answer holds no SuppressedDestinationSummaries")
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("EmailAddress"), str):
                continue
            why = str(it.get("Reason", "")).upper()
            if why == "COMPLAINT":
                got.add(it["EmailAddress"], COMPLAINT, "complaints")
            else:  # BOUNCE: SES puts hard bounces only on the account's list
                got.add(it["EmailAddress"], HARD_BOUNCE, "bounces")
        token = str(doc.get("NextToken") or "")
        if not token:
            return
    raise SyncError(f"{spec.label}: more than {MAX_PAGES} pages")


SENDGRID_LISTS = (
    ("bounces", "bounces"),
    ("invalid_emails", "invalid"),
    ("spam_reports", "complaints"),
    ("unsubscribes", "unsubscribes"),
)
SENDGRID_PAGE = 500  # the suppression endpoints' largest ``limit``


async def _sendgrid(spec: TransportSpec, session: Any, got: Listed) -> None:
    base = (spec.endpoint or "https://api.sendgrid.com").rstrip("/")
    headers = {"Authorization": "Bearer " + spec.secrets["api_key"]}
    for name, kind in SENDGRID_LISTS:
        offset = 0
        for _ in range(MAX_PAGES):
            url = f"{base}/v3/suppression/{name}?limit={SENDGRID_PAGE}&offset={offset}"
            items = await _get(spec, session, url, headers)
            if not isinstance(items, list):
                raise SyncError(f"{spec.label}: /v3/suppression/{name} answered no list")
            for it in items:
                if not isinstance(it, dict) or not isinstance(it.get("email"), str):
                    continue
                if kind == "bounces":
                    reason = _bounce_reason(
                        str(it.get("reason") or ""), str(it.get("status") or "")
                    )
                elif kind == "invalid":
                    reason = "userunknown"  # not a deliverable address (as a "dropped: invalid")
                elif kind == "complaints":
                    reason = COMPLAINT
                else:
                    reason = UNSUBSCRIBE
                got.add(it["email"], reason, kind)
            if len(items) < SENDGRID_PAGE:
                break
            offset += len(items)
        else:
            raise SyncError(f"{spec.label}: more than {MAX_PAGES} pages of {name}")


MAILGUN_LISTS = (("bounces", "bounces"), ("complaints", "complaints"),
                 ("unsubscribes", "unsubscribes"))  # fmt: skip
MAILGUN_PAGE = 1000


async def _mailgun(spec: TransportSpec, session: Any, got: Listed) -> None:
    from fastsend.transports.mailgun import BASE

    base = (spec.endpoint or BASE[spec.region]).rstrip("/")
    origin = urllib.parse.urlsplit(base)[:2]
    token = base64.b64encode(b"api:" + spec.secrets["api_key"].encode()).decode()
    headers = {"Authorization": "Basic " + token}
    domain = urllib.parse.quote(spec.domain, safe="")
    for name, kind in MAILGUN_LISTS:
        url = f"{base}/v3/{domain}/{name}?limit={MAILGUN_PAGE}"
        for _ in range(MAX_PAGES):
            doc = await _get(spec, session, url, headers)
            items = doc.get("items") if isinstance(doc, dict) else None
            if not isinstance(items, list):
                raise SyncError(f"{spec.label}: /v3/{spec.domain}/{name} answered no items")
            for it in items:
                if not isinstance(it, dict) or not isinstance(it.get("address"), str):
                    continue
                if kind == "bounces":
                    code = str(it.get("code") or "")
                    err = str(it.get("error") or "")
                    reason = _bounce_reason(f"{code} {err}".strip())
                else:
                    reason = COMPLAINT if kind == "complaints" else UNSUBSCRIBE
                got.add(it["address"], reason, kind)
            nxt = (
                (doc.get("paging") or {}).get("next") if isinstance(doc.get("paging"), dict) else ""
            )
            if not items or not isinstance(nxt, str) or not nxt or nxt == url:
                break
            if urllib.parse.urlsplit(nxt)[:2] != origin:
                # Our key goes to the endpoint only, never where an answer points.
                raise SyncError(f"{spec.label}: a next page elsewhere than the endpoint: not asked")
            url = nxt
        else:
            raise SyncError(f"{spec.label}: more than {MAX_PAGES} pages of {name}")
