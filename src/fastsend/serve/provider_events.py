"""Provider event webhooks -> fastsend events and suppressions.

``fastsend serve`` mounts, when ``[provider_events]`` configures them:

- ``POST /webhooks/ses`` -- Amazon SNS (SES event publishing or notifications).
  Every message is verified the SNS way: the ``SigningCertURL`` must be https
  on a host of the allow-list (default ``sns.<region>.amazonaws.com``), the
  certificate is fetched (TLS verified, cached) and must be valid now, and the
  ``Signature`` (SignatureVersion 1: SHA1withRSA, 2: SHA256withRSA) must verify
  over the documented string to sign of the message type. A verified
  ``SubscriptionConfirmation`` for an allowed topic is confirmed by fetching its
  ``SubscribeURL`` (same host rules); a ``Notification`` carries the SES event,
  parsed by fastsend.bounce (bounce, complaint, delivery).
- ``POST /webhooks/sendgrid`` -- the SendGrid Event Webhook: ECDSA (P-256,
  SHA-256) over ``timestamp + body``, headers
  ``X-Twilio-Email-Event-Webhook-Signature`` (base64 DER) and
  ``-Timestamp``, against the configured public key (base64 DER SPKI).
- ``POST /webhooks/mailgun`` -- Mailgun webhooks: HMAC-SHA256 of
  ``timestamp + token`` with the webhook signing key (from the environment
  ``FASTSEND_MAILGUN_WEBHOOK_KEY`` or a 0600 ``mailgun_signing_key_file``); a
  token is accepted once.

A post without a valid signature, or with a timestamp older than ``max_age``
(replays), is answered 401 and changes nothing. A provider that retries a post
our answer did not take resends it as it was, with its first timestamp: Mailgun
for 8 hours (``MAILGUN_RETRIES``), SNS for up to an hour (``SNS_RETRIES``, its
HTTP/S delivery policy's hard limit), SendGrid for up to 24 hours
(``SENDGRID_RETRIES``; signed anew or not, its docs do not say); their posts
are taken that much older than ``max_age`` (which stays the clocks'
allowance), and their ids (Mailgun's token, the SNS MessageId, SendGrid's
signature and each event's ``sg_event_id``) are remembered as long, so a replay
within it is still refused and a SendGrid event posted again is handled once. A post whose handling failed (the spool out of reach, say) is
answered 500 and forgotten: the provider's retry of it is handled, not taken
for a replay (before, the retry was refused and the event lost). Verified events name messages
by the signed id tokens fastsend sent with them (SES: Message-ID; SendGrid:
``custom_args.fastsend``; Mailgun: ``v:fastsend``), so a post can only touch
messages fastsend sent; each becomes an event ("bounced", "complained",
"unsubscribed", or "provider" for deliveries, opens, ...) and hard bounces,
complaints and unsubscribes suppress the address for the message's tenant.

It never logs keys or signatures and never raises into aiohttp for bad input.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from fastsend import msgid, safejson
from fastsend.bounce import BounceRecord
from fastsend.bounce.reply import classify_reply, ses_verdict
from fastsend.config import Config
from fastsend.config.serve import DEFAULT_SNS_HOSTS
from fastsend.serve.eventindex import ONCE_PER_MESSAGE, already_told, first_telling
from fastsend.serve.httpguard import body_deadline
from fastsend.suppression import DEFAULT_TENANT, SuppressionError, suppress_from

log = logging.getLogger("fastsend.serve.provider_events")

MAX_BODY = 4 * 1024 * 1024
# How long after its first post a provider resends one it could not deliver,
# keeping the original timestamp: Mailgun retries "during 8 hours" (its
# webhook-retries page: 5, 10, 15 min, 1, 2, 4 h), the signature block as it
# was; SNS's HTTP/S delivery policy cannot retry for more than 3,600 s in all.
# Feedback reports that are no complaint (as serve.listeners.NOT_COMPLAINTS).
NOT_COMPLAINTS = frozenset({"auth-failure", "not-spam"})
MAILGUN_RETRIES = 8 * 3600.0
SNS_RETRIES = 3600.0
# SendGrid retries a post not answered 2xx "at increasing intervals for up to 24
# hours after the event occurs" (its Event Webhook troubleshooting page); its
# docs do not say whether a retry is signed anew, so one keeping its first
# timestamp is taken as long. Each event's sg_event_id is remembered as long:
# SendGrid may post an event twice ("use sg_event_id" to deduplicate).
SENDGRID_RETRIES = 24 * 3600.0


@dataclass
class ProviderEventSettings:
    """What the endpoints check, from ``[provider_events]`` (typed and checked
    when the config loaded) and the environment."""

    sns_cert_hosts: tuple[str, ...] = DEFAULT_SNS_HOSTS  # regexes, full match on the host
    sns_topics: tuple[str, ...] = ()  # allowed TopicArns (empty: none -> SES endpoint off)
    sns_ca_file: str = ""  # trust store for fetching certificates ("" = the system's)
    sendgrid_public_key: str = ""  # base64 DER (SendGrid's "verification key"); public
    mailgun_key: bytes = field(default=b"", repr=False)
    max_age: float = 600.0

    @classmethod
    def of(cls, config: Config) -> ProviderEventSettings:
        t = config.provider_events
        return cls(
            tuple(t.sns_cert_hosts),
            tuple(t.sns_topics),
            t.sns_ca_file,
            t.sendgrid_public_key or os.environ.get("FASTSEND_SENDGRID_WEBHOOK_PUBLIC_KEY", ""),
            config.mailgun_webhook_key
            or os.environ.get("FASTSEND_MAILGUN_WEBHOOK_KEY", "").encode(),
            t.max_age,
        )


def _ec_key(b64: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    key = load_der_public_key(base64.b64decode(b64, validate=True))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an EC key")
    return key


class _Unauthorized(Exception):
    pass


class ProviderEvents:
    def __init__(self, ctx: Any, settings: ProviderEventSettings) -> None:
        self.ctx = ctx
        self.s = settings
        self.sendgrid_key = (
            _ec_key(settings.sendgrid_public_key) if settings.sendgrid_public_key else None
        )
        self.certs: dict[str, Any] = {}  # SigningCertURL -> public key (bounded)
        self.seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # replays
        self.session: Any = None
        self.body_timeout = float(ctx.config.api.body_timeout)

    # -- plumbing ---------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY, actual_size=request.content_length
            )
        body = await body_deadline(_read(request.content, MAX_BODY + 1), self.body_timeout)
        if len(body) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
        return body

    def _once(self, key: str, retries: float = 0.0) -> bool:
        """False when ``key`` was seen within its window (a replayed post):
        ``max_age`` and the provider's ``retries`` (how much older than
        max_age its posts are taken, so as long as a replay could pass). On a
        shared spool seen by any node (``SET NX`` with that expiry): before,
        a post replayed to another node behind the balancer was taken again."""
        now = time.time()
        seen = self.seen
        while seen:  # (kept in the order seen; a longer window ahead only keeps more)
            first = next(iter(seen))
            if seen[first] > now:
                break
            del seen[first]
        if seen.get(key, 0.0) > now:
            return False
        window = self.s.max_age + retries
        store = self.ctx.spool.shared()
        if store is not None:
            try:
                if not store.client.set(self._shared_key(store, key), b"1", nx=True,
                                        px=max(1, int(window * 1000))):  # fmt: skip
                    return False
            except Exception as e:  # Redis away a moment: this node's own memory holds
                log.warning("provider events: the nodes' replay check is out of reach: %s", e)
        seen[key] = now + window
        seen.move_to_end(key)
        if len(seen) > 100_000:
            seen.popitem(last=False)
        return True

    @staticmethod
    def _shared_key(store: Any, key: str) -> str:
        return store.key("pev", hashlib.sha256(key.encode()).hexdigest()[:32])

    def _forget(self, key: str) -> None:
        """A post whose handling failed: its retry is no replay."""
        self.seen.pop(key, None)
        store = self.ctx.spool.shared()
        if store is not None:
            with contextlib.suppress(Exception):
                store.client.delete(self._shared_key(store, key))

    def _fresh(self, ts: str, retries: float = 0.0) -> None:
        """``ts`` (Unix seconds) within max_age of now, or up to ``retries``
        older still (a provider resending a post with its first timestamp)."""
        try:
            t = float(ts)
        except ValueError:
            raise _Unauthorized("bad timestamp") from None
        if not math.isfinite(t):
            raise _Unauthorized("bad timestamp")
        age = time.time() - t
        if age > self.s.max_age + retries or -age > self.s.max_age:
            raise _Unauthorized("timestamp outside max_age")

    def _session(self) -> Any:
        if self.session is None:
            import aiohttp

            ctx = ssl.create_default_context(cafile=self.s.sns_ca_file or None)
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    # -- messages named by tokens ------------------------------------------------

    def find(self, tokens: list[str], rcpt: str) -> tuple[int, int, str, str] | None:
        """(id, campaign, rcpt, tenant) of the message among ``tokens`` sent to
        ``rcpt``; else, when a token names a message shared by several
        recipients (its first row: SES's tag, the group's Message-ID), the
        message of the same campaign to ``rcpt`` (as for a DSN about it).
        The messages the tokens name are looked up at once (Spool.owners),
        and a campaign's message to ``rcpt`` once per campaign: a Mailgun
        event names each message of its group (500 tokens), and cost 500
        lookups one after the other (1,000 with a recipient not among them)."""
        secret = self.ctx.secret
        firsts: list[int] = []
        singles: list[int] = []
        for tok in tokens:
            mid = msgid.parse(tok, secret)
            if mid is None:
                mid = msgid.parse_group(tok, secret)
                if mid is not None:
                    firsts.append(mid)
                continue
            singles.append(mid)
            firsts.append(mid)
        if not firsts:
            return None
        spool = self.ctx.spool
        if len(firsts) == 1:
            got = spool.owner(firsts[0])
            rows = {firsts[0]: got} if got is not None else {}
        else:
            rows = spool.owners(firsts)
        tenants: dict[int, str] = {}
        want = rcpt.lower()
        for mid in singles:
            row = rows.get(mid)
            if row is not None and (not rcpt or row[1].lower() == want):
                return mid, row[0], row[1], self._tenant(row[0], tenants)
        asked: set[int] = set()
        for first in firsts if rcpt else []:
            row = rows.get(first)
            if row is None or row[0] in asked:
                continue
            asked.add(row[0])
            got = spool.sibling(row[0], rcpt, first)
            if got is not None:
                return int(got[0]), row[0], str(got[1]), self._tenant(row[0], tenants)
        return None

    def _tenant(self, campaign: int, seen: dict[int, str]) -> str:
        t = seen.get(campaign)
        if t is None:
            try:
                t = self.ctx.campaign_tenant(campaign)
            except KeyError:
                t = DEFAULT_TENANT
            seen[campaign] = t
        return t

    def apply(
        self,
        provider: str,
        rec: BounceRecord,
        tokens: list[str],
        kind: str,
        extra: dict[str, Any],
        suppress_as: BounceRecord | None = None,
    ) -> dict[str, Any]:
        """One provider event: emitted (and the address suppressed when it calls
        for it: ``rec``, or ``suppress_as`` when the reason to suppress is not
        the event's own, e.g. mail dropped because the address unsubscribed)."""
        found = self.find(tokens, rec.recipient)
        if found is not None:
            mid, campaign, rcpt, tenant = found
            ev: dict[str, Any] = {"id": mid, "campaign": campaign, "rcpt": rcpt, "tenant": tenant}
            if extra.get("provider_event") not in NOT_TAKEN.get(provider, ()):
                self.settle(provider, found, extra)
        else:
            ev = {"id": None, "campaign": None, "rcpt": rec.recipient, "tenant": DEFAULT_TENANT}
        ev.update(event=kind, provider=provider, time=time.time(), **extra)
        if found is not None and already_told(self.ctx, ev["id"], kind):
            ev["repeated"] = True  # (SendGrid retries a batch with a new signature):
            return ev  # not recorded or counted again, nothing suppressed again
        if kind == "bounced":
            ev.update(reason=rec.reason, hard=rec.hard, status=rec.status, code=rec.reply_code,
                      text=rec.diagnostic[:500], source="async")  # fmt: skip
        elif kind in ("complained", "feedback"):
            ev["feedback_type"] = rec.feedback_type
        entry = None
        # Only a message fastsend sent can change its tenant's suppression list.
        if found is not None and kind in ONCE_PER_MESSAGE:
            try:
                entry = suppress_from(
                    self.ctx.suppression,
                    ev["rcpt"],
                    suppress_as or rec,
                    tenant=ev["tenant"],
                    source=provider,
                )
            except SuppressionError:
                entry = None
        ev["suppressed"] = entry is not None
        if found is not None and not first_telling(self.ctx, ev["id"], kind):
            ev["repeated"] = True  # (told a moment ago, at this node or another)
            return ev
        self.ctx.emit(ev)
        return ev

    def settle(
        self, provider: str, found: tuple[int, int, str, str], extra: dict[str, Any]
    ) -> None:
        """The provider has the message ``found`` names (any event of it but
        :data:`NOT_TAKEN` says so): while it is deferred in the spool (its
        request left unanswered -- a timeout, a connection lost before the
        answer: an unknown outcome, retried later), it is delivered now
        (``Spool.settle``), with a "delivered" event (``settled``: true).
        Before, it stayed deferred and the retry sent it again: a duplicate
        for every request the provider took and answered too late. What is in
        flight again already, or final, is left as it is."""
        mid, campaign, rcpt, tenant = found
        what = str(extra.get("provider_event") or "an event")
        text = f"{provider} reported it ({what}) after its request went unanswered"
        if not self.ctx.spool.settle([mid], text):
            return
        ev = {"event": "delivered", "id": mid, "campaign": campaign, "rcpt": rcpt,
              "tenant": tenant, "provider": provider, "mx": provider, "code": 250,
              "enhanced": "2.0.0", "text": text, "settled": True}  # fmt: skip
        if extra.get("queue_id"):
            ev["queue_id"] = extra["queue_id"]
        log.info("provider events: message %d settled delivered by %s's %s", mid, provider, what)
        self.ctx.emit(ev)
        if self.ctx.supervisor is None:
            # No supervisor here (serve --no-workers) to say, after its next
            # flush, that what Spool.settle noted untold is told: its event is
            # written now, and the note dropped (else the next start told the
            # delivery again, "resumed"). A kill before this: told then, once.
            self.ctx.events.flush()
            self.ctx.spool.told()

    def notice(
        self,
        provider: str,
        kind: str,
        rcpt: str,
        tokens: list[str],
        extra: dict[str, Any],
        feedback_type: str | None = None,
    ) -> dict[str, Any]:
        """A provider event that is no bounce: ``complained`` (``feedback_type``,
        default "abuse"), ``unsubscribed`` or ``provider`` (recorded only)."""
        if kind == "complained" and feedback_type in NOT_COMPLAINTS:
            # A DMARC failure report or a "not spam" correction (RFC 5965 3.1):
            # no complaint, as at the intake (serve.listeners): recorded, nothing
            # suppressed or counted.
            kind = "feedback"
        if kind in ("complained", "feedback"):
            rec = BounceRecord(rcpt, None, None, "", "feedback", False, feedback_type or "abuse")
        elif kind == "unsubscribed":
            rec = BounceRecord(rcpt, None, None, "", "feedback", False, "unsubscribe")
            extra = {**extra, "method": "provider"}
        else:
            rec = BounceRecord(rcpt, None, None, "", "delivered", False)
        return self.apply(provider, rec, tokens, kind, extra)

    # -- SES via SNS ---------------------------------------------------------------

    def _allowed_url(self, url: str) -> bool:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        host = (u.hostname or "").lower()
        return u.scheme == "https" and any(re.fullmatch(p, host) for p in self.s.sns_cert_hosts)

    async def _cert_key(self, url: str) -> Any:
        from urllib.parse import urlsplit

        from cryptography import x509

        key = self.certs.get(url)
        if key is not None:
            return key
        if not self._allowed_url(url) or not _SNS_CERT_PATH.fullmatch(urlsplit(url).path):
            # SNS's own file names only ("/SimpleNotificationService-<id>.pem"):
            # an allowed host serving other files is not SNS's certificate.
            raise _Unauthorized("SigningCertURL not allowed")
        try:
            # Not through a redirect: only the allowed hosts are asked (sns_cert_hosts).
            async with self._session().get(url, timeout=_timeout(10), allow_redirects=False) as r:
                if r.status != 200:
                    raise _Unauthorized("certificate not fetched")
                pem = await _read(r.content, 64 * 1024)
            cert = x509.load_pem_x509_certificate(pem)
        except _Unauthorized:
            raise
        except Exception as e:  # network, TLS verification, PEM
            raise _Unauthorized(f"certificate: {e.__class__.__name__}") from None
        now = time.time()
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            raise _Unauthorized("certificate not valid now")
        if len(self.certs) > 64:
            self.certs.clear()
        key = self.certs[url] = cert.public_key()
        return key

    async def verify_sns(self, doc: dict[str, Any]) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        typ = doc.get("Type")
        if typ == "Notification":
            names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
        elif typ in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
            names = [
                "Message",
                "MessageId",
                "SubscribeURL",
                "Timestamp",
                "Token",
                "TopicArn",
                "Type",
            ]
        else:
            raise _Unauthorized("unknown SNS message type")
        parts = []
        for n in names:
            v = doc.get(n)
            if v is None:
                if n == "Subject":
                    continue
                raise _Unauthorized(f"missing {n}")
            if not isinstance(v, str):
                raise _Unauthorized(f"bad {n}")
            parts.append(f"{n}\n{v}\n")
        self._fresh(str(_sns_time(doc["Timestamp"])), SNS_RETRIES)
        algo = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(str(doc.get("SignatureVersion")))
        if algo is None:
            raise _Unauthorized("unknown SignatureVersion")
        try:
            sig = base64.b64decode(str(doc.get("Signature", "")), validate=True)
        except ValueError:
            raise _Unauthorized("bad signature encoding") from None
        key = await self._cert_key(str(doc.get("SigningCertURL", "")))
        try:
            key.verify(sig, "".join(parts).encode(), padding.PKCS1v15(), algo)
        except (InvalidSignature, TypeError, ValueError, AttributeError):
            raise _Unauthorized("signature does not verify") from None

    async def ses(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            doc = safejson.loads(body)  # (read before any signature is checked)
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            return _unauthorized()  # not even an SNS message: not signed
        try:
            await self.verify_sns(doc)
        except _Unauthorized as e:
            log.warning("ses webhook refused: %s", e)
            return _unauthorized()
        topic = str(doc.get("TopicArn"))
        if topic not in self.s.sns_topics:
            return web.json_response({"error": "topic not allowed"}, status=403)
        key = "sns:" + str(doc.get("MessageId"))
        if not self._once(key, SNS_RETRIES):
            return web.json_response({"ok": True, "duplicate": True})
        try:
            answer = await self._sns(doc, topic)
        except BaseException:
            self._forget(key)  # SNS retries it: handled then, not taken for a replay
            raise
        if answer.status >= 300:
            self._forget(key)
        return answer

    async def _sns(self, doc: dict[str, Any], topic: str) -> web.Response:
        typ = doc["Type"]
        if typ == "SubscriptionConfirmation":
            url = str(doc.get("SubscribeURL"))
            if not self._allowed_url(url):
                return web.json_response({"error": "SubscribeURL not allowed"}, status=400)
            try:
                async with self._session().get(
                    url, timeout=_timeout(10), allow_redirects=False
                ) as r:
                    ok = r.status == 200
            except Exception:
                ok = False
            self.ctx.emit(
                {
                    "event": "provider_subscription",
                    "provider": "ses",
                    "topic": topic,
                    "confirmed": ok,
                }
            )
            return web.json_response({"confirmed": ok}, status=200 if ok else 502)
        if typ == "UnsubscribeConfirmation":
            self.ctx.emit(
                {
                    "event": "provider_subscription",
                    "provider": "ses",
                    "topic": topic,
                    "unsubscribed": True,
                }
            )
            return web.json_response({"ok": True})
        return web.json_response({"events": self._ses_message(str(doc["Message"]))})

    def _ses_message(self, text: str) -> int:
        """An SES event (event publishing or notification) -> events."""
        from fastsend.bounce.vendors import parse_ses_json

        records = parse_ses_json(text) or []
        tokens: list[str] = []
        ses_type = ses_sub = ""
        try:
            doc = safejson.loads(text)
            mail = doc.get("mail") or {}
            tags = mail.get("tags") or {}
            tokens += [str(t) for t in tags.get("fastsend", []) if isinstance(t, str)]
            bounce = doc.get("bounce") or {}
            ses_type = str(bounce.get("bounceType") or "")
            ses_sub = str(bounce.get("bounceSubType") or "")
            if str(doc.get("eventType") or "") == "Reject" and not records:
                return self._ses_reject(doc, mail, tokens)
            kind = str(doc.get("eventType") or doc.get("notificationType") or "").lower()
            if kind in SES_TAKEN and not records:
                return self._ses_taken(doc, mail, tokens, kind)
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            pass
        for r in records:
            toks = (
                [*tokens, r.message_id.strip().strip("<>").partition("@")[0]]
                if r.message_id
                else tokens
            )
            extra = {"provider_event": r.kind}
            if r.kind == "bounce":
                diag = r.diagnostic.split(";", 1)[-1].strip()
                m = re.match(r"\s*([245]\d\d)\b", diag)
                code = int(m.group(1)) if m else 550
                c = classify_reply(code, r.status, diag, command="")
                permanent = r.action == "failed" and code >= 500
                # SES's own verdict where the text says nothing more (its NoEmail /
                # Suppressed often carry no diagnostic at all): as the bounce
                # intake reads a mailed notification (bounce.reply.ses_verdict).
                reason, hard = ses_verdict(ses_type, ses_sub, c, c.hard and permanent)
                rec = BounceRecord(r.recipient, r.status or None, code, diag, reason, hard)
                self.apply("ses", rec, toks, "bounced", extra)
            elif r.kind == "complaint":
                self.notice("ses", "complained", r.recipient, toks, extra, r.feedback_type)
            else:
                self.notice("ses", "provider", r.recipient, toks, extra)
        return len(records)

    def _ses_taken(
        self, doc: dict[str, Any], mail: dict[str, Any], tokens: list[str], kind: str
    ) -> int:
        """An SES event that shows SES took the message (Send, DeliveryDelay,
        Open, Click): a "provider" event per recipient it names (a delay's
        delayed recipients, else the message's destination), which settles a
        message whose request went unanswered (:meth:`settle`). Before,
        nothing: no event, and such a message was sent again."""
        common = mail.get("commonHeaders") or {}
        mid = str(common.get("messageId") or "").strip().strip("<>").partition("@")[0]
        toks = [*tokens, mid] if mid else tokens
        rcpts: list[Any] = []
        delay = doc.get("deliveryDelay")
        if kind == "deliverydelay" and isinstance(delay, dict):
            rcpts = [r.get("emailAddress") for r in delay.get("delayedRecipients") or []
                     if isinstance(r, dict)]  # fmt: skip
        if not rcpts:
            rcpts = list(mail.get("destination") or [])
        n = 0
        for rcpt in rcpts:
            if isinstance(rcpt, str) and "@" in rcpt:
                self.notice("ses", "provider", rcpt, toks, {"provider_event": kind})
                n += 1
        return n

    def _ses_reject(self, doc: dict[str, Any], mail: dict[str, Any], tokens: list[str]) -> int:
        """SES took the request (our "delivered") but then refused to send the
        message (event publishing's "Reject": a virus found): each recipient's
        message bounced, for its content (not the address: nothing suppressed).
        Before, no event at all: the mail stood delivered."""
        why = str((doc.get("reject") or {}).get("reason") or "rejected")
        common = mail.get("commonHeaders") or {}
        mid = str(common.get("messageId") or "").strip().strip("<>").partition("@")[0]
        toks = [*tokens, mid] if mid else tokens
        n = 0
        for rcpt in mail.get("destination") or []:
            if isinstance(rcpt, str) and "@" in rcpt:
                text = f"SES did not send it: {why}"
                rec = BounceRecord(rcpt, "5.7.1", 550, text, "virusdetected", False)
                self.apply("ses", rec, toks, "bounced", {"provider_event": "reject"})
                n += 1
        return n

    # -- SendGrid ----------------------------------------------------------------

    async def sendgrid(self, request: web.Request) -> web.Response:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        body = await self._body(request)
        sig = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
        ts = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
        try:
            if not sig or not ts:
                raise _Unauthorized("unsigned")
            self._fresh(ts, SENDGRID_RETRIES)
            raw_sig = base64.b64decode(sig, validate=True)
            assert self.sendgrid_key is not None  # the route exists only with a key
            self.sendgrid_key.verify(raw_sig, ts.encode() + body, ec.ECDSA(hashes.SHA256()))
            key = "sg:" + hashlib.sha256(raw_sig).hexdigest()
            if not self._once(key, SENDGRID_RETRIES):
                raise _Unauthorized("replayed")
        except (_Unauthorized, InvalidSignature, ValueError) as e:
            log.warning("sendgrid webhook refused: %s", e.__class__.__name__)
            return _unauthorized()
        try:
            return self._sendgrid_events(body)
        except BaseException:
            self._forget(key)  # a retry of it is no replay
            raise

    def _sendgrid_events(self, body: bytes) -> web.Response:
        try:
            items = safejson.loads(body)
        except orjson.JSONDecodeError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(items, list):
            return web.json_response({"error": "expected a JSON array of events"}, status=400)
        n = repeated = 0
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("email"), str):
                continue
            eid = it.get("sg_event_id")
            once = "sge:" + eid[:200] if isinstance(eid, str) and eid else ""
            if once and not self._once(once, SENDGRID_RETRIES):
                repeated += 1  # posted before (a retry signed anew): handled then
                continue
            try:
                self._sendgrid_event(it)
            except BaseException:
                if once:
                    self._forget(once)  # the retry of the post handles it
                raise
            n += 1
        return web.json_response({"events": n, "repeated": repeated})

    def _sendgrid_event(self, it: dict[str, Any]) -> None:
        rcpt = it["email"]
        kind = str(it.get("event", ""))
        tokens = [str(it["fastsend"])] if it.get("fastsend") else []
        extra = {"provider_event": kind, "queue_id": str(it.get("sg_message_id", ""))[:200]}
        if kind == "dropped" and _DROPPED.get(str(it.get("reason", "")).strip().lower()):
            # Not sent: the address is on one of SendGrid's own lists. The message
            # bounced; the address is suppressed for the list's reason.
            why = _DROPPED[str(it["reason"]).strip().lower()]
            text = f"dropped by SendGrid: {it['reason']}"[:1000]
            hard = why == "userunknown"
            rec = BounceRecord(rcpt, "5.1.1" if hard else None, 550, text,
                               "userunknown" if hard else "onhold", hard)  # fmt: skip
            cause = None
            if not hard:  # an unsubscribe or a spam report, made at SendGrid
                cause = BounceRecord(rcpt, None, None, "", "feedback", False, why)
            self.apply("sendgrid", rec, tokens, "bounced", extra, suppress_as=cause)
        elif kind in ("bounce", "dropped"):
            text = str(it.get("reason", ""))[:1000]
            status = str(it.get("status", "")) or None
            m = re.match(r"\s*([245]\d\d)\b", text)
            code = int(m.group(1)) if m else 550
            c = classify_reply(code, status or "", text, command="")
            blocked = it.get("type") == "blocked"
            hard = c.hard and not blocked
            rec = BounceRecord(rcpt, status, code, text, c.reason, hard)
            self.apply("sendgrid", rec, tokens, "bounced", extra)
        elif kind == "spamreport":
            self.notice("sendgrid", "complained", rcpt, tokens, extra)
        elif kind in ("unsubscribe", "group_unsubscribe"):
            self.notice("sendgrid", "unsubscribed", rcpt, tokens, extra)
        else:  # processed, delivered, deferred, open, click: recorded, nothing suppressed
            self.notice("sendgrid", "provider", rcpt, tokens, extra)

    # -- Mailgun -----------------------------------------------------------------

    async def mailgun(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            doc = safejson.loads(body)  # (read before any signature is checked)
            sig = doc["signature"]
            ts, token, mac = str(sig["timestamp"]), str(sig["token"]), str(sig["signature"])
            # Mailgun resends a post we did not answer 200 with its first signature block.
            self._fresh(ts, MAILGUN_RETRIES)
            want = hmac.new(self.s.mailgun_key, (ts + token).encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, mac):
                raise _Unauthorized("signature does not verify")
            if not self._once("mg:" + token, MAILGUN_RETRIES):
                raise _Unauthorized("replayed token")
        except (_Unauthorized, ValueError, KeyError, TypeError) as e:
            log.warning("mailgun webhook refused: %s", e.__class__.__name__)
            return _unauthorized()
        try:
            return self._mailgun_event(doc)
        except BaseException:
            self._forget("mg:" + token)  # Mailgun retries it: handled then, not a replay
            raise

    def _mailgun_event(self, doc: dict[str, Any]) -> web.Response:
        ed = doc.get("event-data")
        if not isinstance(ed, dict) or not isinstance(ed.get("recipient"), str):
            return web.json_response({"error": "no event-data"}, status=400)
        rcpt = ed["recipient"]
        kind = str(ed.get("event", ""))
        uv = ed.get("user-variables") or {}
        tokens = str(uv.get("fastsend", "")).split() if isinstance(uv, dict) else []
        msg = ed.get("message") or {}
        headers = msg.get("headers") if isinstance(msg, dict) else {}
        qid = str((headers or {}).get("message-id", ""))[:200] if isinstance(headers, dict) else ""
        extra = {"provider_event": kind, "queue_id": qid}
        if kind == "failed" and ed.get("severity") == "temporary":
            # A receiver deferred it and Mailgun retries (a post per attempt): no
            # bounce yet. Recorded only: as the message's "bounced" it would be
            # counted as one, and the permanent failure that may follow would be
            # taken for its repeat (never recorded, the address never suppressed).
            ds = ed.get("delivery-status") or {}
            text = str(ds.get("message") or ds.get("description") or "")[:500]
            extra.update(severity="temporary", text=text)
            self.notice("mailgun", "provider", rcpt, tokens, extra)
        elif kind == "failed" and str(ed.get("reason", "")) in _MAILGUN_LISTS:
            # Not sent: the address is on one of Mailgun's own lists (it bounced,
            # unsubscribed or complained before): the message bounced, and the
            # address is suppressed for that list's reason, as for SendGrid's
            # "dropped" (before: a soft "bounced" that suppressed nothing, so a
            # complainer kept getting mail through every other route).
            why = _MAILGUN_LISTS[str(ed["reason"])]
            ds = ed.get("delivery-status") or {}
            text = f"dropped by Mailgun ({ed['reason']}): " + str(
                ds.get("description") or ds.get("message") or ""
            )
            hard = why == "userunknown"
            rec = BounceRecord(rcpt, "5.1.1" if hard else None, 550, text[:1000],
                               "userunknown" if hard else "onhold", hard)  # fmt: skip
            cause = None if hard else BounceRecord(rcpt, None, None, "", "feedback", False, why)
            self.apply("mailgun", rec, tokens, "bounced",
                       {**extra, "severity": ed.get("severity")}, suppress_as=cause)  # fmt: skip
        elif kind == "failed":
            ds = ed.get("delivery-status") or {}
            code = int(ds.get("code") or 550) if str(ds.get("code", "")).isdigit() else 550
            text = str(ds.get("message") or ds.get("description") or ed.get("reason") or "")[:1000]
            permanent = ed.get("severity") == "permanent"
            c = classify_reply(code if 200 <= code <= 599 else 550, "", text, command="")
            rec = BounceRecord(rcpt, None, code, text, c.reason, c.hard and permanent)
            self.apply("mailgun", rec, tokens, "bounced", {**extra, "severity": ed.get("severity")})
        elif kind == "complained":
            self.notice("mailgun", "complained", rcpt, tokens, extra)
        elif kind == "unsubscribed":
            self.notice("mailgun", "unsubscribed", rcpt, tokens, extra)
        else:
            self.notice("mailgun", "provider", rcpt, tokens, extra)
        return web.json_response({"events": 1})


# Events that do not show the provider took the message (every other one does:
# it is about a message the provider has): Mailgun's "rejected" is its refusal
# of the request itself.
NOT_TAKEN: dict[str, tuple[str, ...]] = {"mailgun": ("rejected",)}
# SES events that name no recipient's outcome but show SES took the message:
# recorded as "provider" events, one per recipient (and settle it).
SES_TAKEN = ("send", "deliverydelay", "open", "click")

# The path of SNS's signing certificates ("/SimpleNotificationService-
# 01d088a6f77103d0fe307c0069e40ed6.pem").
_SNS_CERT_PATH = re.compile(r"/SimpleNotificationService-[A-Za-z0-9]+\.pem")

# SendGrid's "dropped" reasons that name one of its lists the address is on ->
# why fastsend suppresses it (a hard bounce, or the feedback type).
_DROPPED = {
    "bounced address": "userunknown",  # it bounced hard before (SendGrid's bounce list)
    "invalid": "userunknown",  # not a valid address
    "unsubscribed address": "unsubscribe",
    "unsubscribed group": "unsubscribe",
    "spam reporting address": "abuse",  # the recipient reported spam before
}


def _sns_time(value: str) -> float:
    """SNS's Timestamp (ISO 8601 UTC, "2026-12-06T09:30:01.123Z") in Unix seconds."""
    import datetime

    try:
        t = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise _Unauthorized("bad Timestamp") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


# Mailgun's "failed" reasons for mail it did not send because the address is on
# one of its suppression lists (delivery-status code 605) -> why fastsend suppresses it.
_MAILGUN_LISTS = {
    "suppress-bounce": "userunknown",  # "Not delivering to previously bounced address"
    "suppress-unsubscribe": "unsubscribe",
    "suppress-complaint": "abuse",  # the recipient marked earlier mail as spam
}


def _unauthorized() -> web.Response:
    return web.json_response({"error": "missing or invalid signature"}, status=401)


async def _read(stream: Any, limit: int) -> bytes:
    """A body whole, up to ``limit`` bytes (an aiohttp ``StreamReader``).
    ``read(n)`` answers with what has arrived: a signed post over ~64 KB was cut
    short, its JSON broken, and refused 401."""
    parts: list[bytes] = []
    n = 0
    while n < limit:
        block = await stream.read(limit - n)
        if not block:
            break
        parts.append(block)
        n += len(block)
    return b"".join(parts)


def _timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


def setup_provider_events(app: web.Application, ctx: Any) -> None:
    """Mount the endpoints that ``[provider_events]`` configures (none by default)."""
    s = ProviderEventSettings.of(ctx.config)
    pe = ProviderEvents(ctx, s)
    if s.sns_topics:
        app.router.add_post("/webhooks/ses", pe.ses)
    if pe.sendgrid_key is not None:
        app.router.add_post("/webhooks/sendgrid", pe.sendgrid)
    if s.mailgun_key:
        app.router.add_post("/webhooks/mailgun", pe.mailgun)

    async def close(app: web.Application) -> None:
        await pe.close()

    app.on_cleanup.append(close)
