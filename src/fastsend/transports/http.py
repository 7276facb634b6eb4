"""HTTP provider transports in a worker: answers -> Outcomes, and the lane.

:class:`HTTPTransport` is what SES, SendGrid and Mailgun share: one request
per group of envelopes (``take``), sent on the worker's one aiohttp session
(keep-alive), its answer mapped honestly to Outcomes of the same kinds SMTP
gives (:func:`map_status`):

- 2xx: delivered, the provider's message id kept as the result's queue_id;
- 429 and the providers' throttling errors (SES ``TooManyRequestsException``,
  ``Throttling``/"Maximum sending rate exceeded"), and 503 (the provider
  overloaded or in maintenance, with or without Retry-After):
  :class:`Throttled` -- not an attempt; the lane pauses and slows down (below);
- 5xx, network errors, timeouts, and refusals that are about our account or
  credentials (401/403, SES ``SendingPausedException``...) or configuration
  (404: Mailgun's "Domain not found" for a sending domain it does not have):
  deferred;
- other 4xx of our account or request (402, 420, 423, ...; any status whose
  text says our account is over its sending limit): deferred;
- 400, 413 and 422 (a permanent rejection of the message or a recipient): failed,
  the provider's text classified by :func:`fastsend.bounce.reply.classify_reply`
  (its reason and an RFC 3463 status in the Outcome). A request of several
  recipients (identical mail grouped) refused whole because of one recipient
  (SendGrid's 400 naming a personalization, Mailgun's 400 on the ``to``
  parameter, SES's MessageRejected/BadRequestException naming an address) is
  sent again in halves, each half refused whole split again
  (:meth:`HTTPTransport.bisect`), so
  only the refused recipient bounces.

:class:`ProviderQueue` is the ready queue of one HTTP transport in a worker
(it stands where a :class:`~fastsend.delivery.pool.SiteQueue` stands, with the
same attributes the worker reads): at most its part of ``max_connections``
requests in flight (the parts add up to it; with fewer than the workers, one
at a time while it holds one of the places they share: transports.slots; in a
reload's overlap, the retiring worker's counted in: ``borrowed``), a GCRA bucket when the transport has a rate (SES: its
account's MaxSendRate, read once), one for the node's workers together
(transports.slots.SharedGcra), and on throttling: a pause (Retry-After, or
1 s doubling), the rate halved (or, with no rate, the in-flight bound), the
throttled envelopes back at the head of the queue -- after ``MAX_THROTTLES``
throttles of one envelope, or when the pause is longer than the ready horizon,
they go on to their route's next transport, or back to the supervisor, due
when the pause ends: unattempted either way (nothing was sent; before, they
were answered deferred, an attempt each); when the
pause is past the horizon, the mail the lane holds goes the same way. Successes
raise the rate again additively. Every change is a "shaping" event.

It never raises for provider or network trouble, and logs no secret.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from fastsend import ring
from fastsend.config.transports import TransportSpec
from fastsend.outcome import DEFERRED, DELIVERED, FAILED, Envelope, Outcome, TxnResult
from fastsend.throttle import Gcra

if TYPE_CHECKING:
    from fastsend.transports.slots import SharedGcra, Slots

MAX_THROTTLES = 8  # throttles of one envelope before it is answered deferred
# A provider no request could connect to, none in flight: its lane answers what
# it holds, and what is pushed for this long (at most [retry] min_backoff), with
# that failure, without a request (as delivery.pool.DEAD_FOR for a site).
DEAD_FOR = 60.0
MIN_PAUSE = 0.5
# Fewer requests in flight allowed than workers (transports.slots): how often a
# worker waiting for a place tries again, and how long one that freed a place
# while another waited leaves it to that one.
SLOT_POLL = 0.005
SLOT_YIELD = 0.05
MAX_PAUSE = 60.0
# Reasons of fastsend.bounce.reply -> the RFC 3463 status a bounce carries.
_STATUS = {
    "userunknown": "5.1.1", "hostunknown": "5.1.2", "hasmoved": "5.1.6", "mailboxfull": "5.2.2",
    "mesgtoobig": "5.3.4", "notaccept": "5.1.10", "rejected": "5.7.1", "policyviolation": "5.7.1",
    "contenterror": "5.6.0", "spamdetected": "5.7.1", "securityerror": "5.7.0", "blocked": "5.7.1",
    "suspend": "5.2.1", "systemerror": "5.3.0", "norelaying": "5.7.1", "virusdetected": "5.7.1",
}  # fmt: skip


class Throttled(msgspec.Struct, frozen=True):
    """The provider asked us to slow down (429, its throttling errors) or is
    unavailable for now (503: overloaded or in maintenance, RFC 9110 15.6.4);
    nothing was sent."""

    retry_after: float  # seconds (0: not said)
    text: str
    status: int = 429

    @property
    def what(self) -> str:
        return "unavailable" if self.status == 503 else "throttled"


# Answers that pause the lane as a whole (the provider, not the message): 429
# and 503. A 503 answered each request of a lane deferred, an attempt each:
# the whole queue sent at a provider in maintenance, whatever its Retry-After.
PAUSE_STATUSES = (429, 503)


Answer = list[TxnResult] | Throttled


def retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # here: rare, and ~5 ms to import in every worker

    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when - time.time())


def delivered(envs: list[Envelope], label: str, queue_id: str, text: str) -> list[TxnResult]:
    out = Outcome(DELIVERED, 250, "2.0.0", text[:400], "http", label)
    return [TxnResult(e.tag, [out] * len(e.rcpts), queue_id) for e in envs]


def not_the_api(envs: list[Envelope], label: str, status: int, raw: bytes) -> list[TxnResult]:
    """A 2xx without the message id every answer of the provider's API to a
    send carries (SES's MessageId, Mailgun's id, SendGrid's X-Message-Id): not
    the API answering (a wrong ``endpoint``: a web server, a proxy's page, a
    health check taking any POST). Before, delivered: every message of the
    route "delivered" and never sent. The request went whole, so it is an
    unknown outcome (stage "data", no code: retried later, never failed over:
    delivery.routes.unknown_outcome), and the text says what to check."""
    head = raw[:80].decode("utf-8", "replace").replace("\r", " ").replace("\n", " ").strip()
    text = (
        f"HTTP {status} without a message id: not the provider's API answering (check the"
        f" transport's endpoint){': ' + head if head else ''}"
    )
    return answered(envs, deferred(label, text, 0, "", "data"))


def answered(envs: list[Envelope], out: Outcome) -> list[TxnResult]:
    return [TxnResult(e.tag, [out] * len(e.rcpts)) for e in envs]


class ThrottledPart(Outcome, frozen=True, gc=False, array_like=True):
    """A recipient of a split request (:meth:`HTTPTransport.subset`) whose part
    the provider throttled: nothing of it was sent. ``ProviderQueue`` holds it
    as any throttled request's (no attempt); elsewhere it reads as a deferral."""

    retry_after: float = 0.0
    status: int = 429


def deferred(
    label: str, text: str, code: int = 451, enhanced: str = "4.3.0", stage: str = "http"
) -> Outcome:
    return Outcome(DEFERRED, code, enhanced, f"{label}: {text}"[:400], stage, label)


def rejected(label: str, status: int, text: str) -> Outcome:
    """A permanent rejection, its reason classified (bounce/reply.classify_reply)."""
    from fastsend.bounce.reply import classify_reply

    c = classify_reply(550, "", text, command="DATA")
    if status == 413 or _TOO_BIG.search(text):
        # HTTP's own "Content Too Large" (RFC 9110 15.5.14), SES's "Message
        # length is more than N bytes": the message's size, whatever the words
        # (they read as "onhold", 5.0.0).
        c = msgspec.structs.replace(c, reason="mesgtoobig")
    enhanced = _STATUS.get(c.reason, "5.0.0")
    return Outcome(
        FAILED, 550, enhanced, f"{label} rejected (HTTP {status}, {c.reason}): {text}"[:400],
        "http", label,
    )  # fmt: skip


_TOO_BIG = re.compile(r"message length is more than|too large|size exceeds", re.I)

# What an error text may echo of our request, never kept (events, webhooks,
# logs): SigV4's SignatureDoesNotMatch (SES, API Gateway's
# InvalidSignatureException) quotes the canonical request it expected -- our
# headers, the X-Amz-Security-Token's session token among them -- and the
# string to sign; an intermediary's error page may quote our Authorization
# header. Before, only the 400-character cut of an outcome's text kept the
# session token out (it came ~450 characters in).
_ECHOED = re.compile(
    r"\s*'?\s*The (?:Canonical String|String-to-Sign) for this request should have been.*",
    re.I | re.S,
)
_CREDENTIAL_FORMS = re.compile(
    r"(x-amz-security-token\s*[:=]\s*|\b(?:X-Amz-)?(?:Signature|Credential)\s*=\s*)"
    r"[^\s'\"&<>,;]+"
    r"|(\b(?:Bearer|Basic)\s+)[\w\-.~+/]{12,}=*",
    re.I,
)
# The providers' key forms: SendGrid's "SG.<id>.<secret>", Mailgun's "key-<hex>".
_KEY_FORMS = re.compile(r"\bSG\.[\w-]{8,}\.[\w-]{8,}|\bkey-[0-9a-f]{32}\b")
REDACTED = "[redacted]"


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` (a provider's or the network's words) without what it echoes
    of our credentials: the canonical request and string to sign of a SigV4
    refusal (cut, with a note), an X-Amz-Security-Token, an Authorization
    header's value, a Bearer/Basic token, a SigV4 Signature=/Credential=, a
    SendGrid or Mailgun key, and each of ``secrets`` verbatim."""
    if not text:
        return text
    out = _ECHOED.sub(" (the request it expected, echoing our headers, left out)", text)
    out = _CREDENTIAL_FORMS.sub(lambda m: (m.group(1) or m.group(2)) + REDACTED, out)
    out = _KEY_FORMS.sub(REDACTED, out)
    for secret in secrets:
        if secret in out:
            out = out.replace(secret, REDACTED)
    return out

# 4xx that are about our request's form or the URL, never the message or a
# recipient: 405 Method Not Allowed, 406, 410 Gone, 411, 414 URI Too Long,
# 415 Unsupported Media Type, 426 Upgrade Required, 431 headers too large.
REQUEST_TROUBLE = (405, 406, 410, 411, 414, 415, 426, 431)


# The only 4xx a provider refuses a message or a recipient with (400: SES's
# MessageRejected, SendGrid's and Mailgun's field errors; 413 the message's size;
# 422 an unprocessable message). Any other 4xx is about our account, key or
# request -- 402 Payment Required (Mailgun's "Request failed", an unpaid or
# limited account), 420 (Mailgun's sending limit), 423, 425, 428, ... --:
# deferred. Before, they bounced every message (and suppressed nothing, but
# the mail was lost).
MESSAGE_REFUSALS = (400, 413, 422)
# A refusal of the message's sender, whatever the status: a provider's 400 or
# 422 about the From or the sender ("from parameter is not a valid address",
# "'from' parameter is missing", "The from address does not match a verified
# Sender Identity", "Sender address rejected"): our configuration or the
# campaign's, never the recipient's; every message of it would bounce alike.
_SENDER = re.compile(
    r"\bfrom\b['\"]?\s+(?:parameter|address|field|email|domain)\b"
    r"|\bsender\s+(?:address|identity|domain|email)\b",
    re.I,
)
# A refusal of our account for its volume, whatever the status: "Domain D has
# exceeded its hourly sending limit", "Daily message quota exceeded", "monthly
# limit reached": the account's, never the message's or a recipient's.
_OVER_LIMIT = re.compile(
    r"\b(?:sending|daily|hourly|monthly|message)\s+(?:limit|quota)\b"
    r"|\bexceeded\s+(?:your|our)\s+(?:\w+\s+){0,2}(?:limit|quota)",
    re.I,
)


def map_status(
    label: str,
    status: int,
    text: str,
    *,
    account_trouble: bool = False,
    credentials: bool = False,
) -> Outcome:
    """An HTTP error status (not 2xx, not throttling) as an Outcome. A 404 is
    the request's URL: our configuration (Mailgun's "Domain not found: D" for a
    sending domain it does not have, or the wrong region), never the message
    or a recipient: deferred, and no address suppressed. So are a redirect
    (never followed: the endpoint is not the API's; ``text`` is where it
    points) and the statuses of :data:`REQUEST_TROUBLE` (before, a 405 from a
    wrong endpoint bounced every message sent through it).

    A 401 (the API key wrong, expired or revoked) and what a provider says
    about the whole account or its credentials (``credentials``: SES's
    signature and key errors, a paused or suspended account) are deferred at
    stage "auth", as a relay's refused AUTH: the transport, not the message,
    and :class:`ProviderQueue` stops sending through it for a while
    (:meth:`ProviderQueue._refused`). A 403 alone is not: SendGrid's "from
    address does not match a verified Sender Identity" and an IAM policy's
    condition on the From refuse one sender's mail, not the others'."""
    if status == 401 or credentials:
        what = "refused our credentials" if status in (401, 403) else "refused (account)"
        return deferred(label, f"HTTP {status} {what}: {text}", stage="auth")
    if 300 <= status < 400:
        return deferred(label, f"HTTP {status} redirect to {text or '?'} (not followed:"
                        " check the transport's endpoint and region)")  # fmt: skip
    if (
        status >= 500
        or status not in MESSAGE_REFUSALS
        or account_trouble
        or _OVER_LIMIT.search(text)
        or _SENDER.search(text)
    ):
        what = "provider error" if status >= 500 else "refused (account or credentials)"
        if _SENDER.search(text) and status < 500:
            what = "refused our sender (configuration)"
        if status == 404:
            what = "not found (account or configuration)"
        elif status in REQUEST_TROUBLE:
            what = "refused the request (endpoint or configuration)"
        elif _OVER_LIMIT.search(text):
            what = "refused: our account's sending limit"
        return deferred(label, f"HTTP {status} {what}: {text}")
    return rejected(label, status, text)


class HTTPTransport:
    """Base of the provider transports: ``take`` one request's envelopes from
    the queue, ``send`` them (never raises for the network or the provider)."""

    def __init__(self, spec: TransportSpec, secret: bytes) -> None:
        self.spec = spec
        self.label = spec.label
        self.secret = secret  # the installation secret: message-id tokens for webhooks
        self.max_rcpts = spec.recipients_limit()
        self.rate_hint = spec.rate  # messages/s across workers (0: unknown)
        # The credentials' values, kept out of every text an answer carries (scrub).
        self.secrets = tuple(v for v in spec.secrets.values() if len(v) >= 6)

    many_envelopes = False  # one request carries one envelope (SES, Mailgun: one MIME)

    def fit(self, envs: list[Envelope], limit: int = 0) -> list[Envelope]:
        """``envs`` with each envelope of more recipients than a request may
        carry (``max_rcpts``: SES's 50, Mailgun's 500, SendGrid's 1,000) cut
        into envelopes of at most that many, in order. The engine groups
        identical mail by ``recipients_per_transaction`` (an SMTP setting):
        set above a provider's limit, every group was refused whole and
        bounced (SES "Recipient count exceeds 50", Mailgun's 16 kB of v:
        options, SendGrid's 1,000 personalizations). ``limit``: that many at
        most instead."""
        n = limit or self.max_rcpts
        if not n or all(len(e.rcpts) <= n for e in envs):
            return envs
        out: list[Envelope] = []
        for e in envs:
            if len(e.rcpts) <= n or not isinstance(e.tag, list):
                out.append(e)
                continue
            for i in range(0, len(e.rcpts), n):
                out.append(msgspec.structs.replace(e, rcpts=e.rcpts[i : i + n],
                                                   tag=e.tag[i : i + n]))  # fmt: skip
        return out

    def take(
        self,
        pending: collections.deque[Envelope],
        max_rcpts: int,
        same: Callable[[Envelope, Envelope], bool],
    ) -> list[Envelope]:
        """One envelope per request (SES, Mailgun: one MIME each)."""
        return [pending.popleft()]

    async def setup(self, session: Any) -> None:
        """Called once before the first request (SES reads its send quota)."""

    def client_timeout(self) -> Any:
        """aiohttp's timeouts of a request: ``timeout`` to connect (and, with
        the wait below, bounds the whole), ``answer_timeout`` for the answer
        once the request is sent (aiohttp starts ``sock_read`` when the body
        is written). A provider that has the message but answers slowly is
        waited for, not sent the message again."""
        import aiohttp

        t, a = self.spec.timeout, self.spec.answer_timeout
        return aiohttp.ClientTimeout(total=t + a, connect=t, sock_read=a)

    async def send(self, session: Any, envs: list[Envelope]) -> Answer:
        """One request's answer, its texts without what they echo of our
        credentials (:func:`scrub`): they reach events, webhooks and logs."""
        ans = await self._send(session, envs)
        if isinstance(ans, Throttled):
            text = scrub(ans.text, self.secrets)
            return ans if text is ans.text else msgspec.structs.replace(ans, text=text)
        done: dict[int, Outcome] = {}
        for tr in ans:
            outs = tr.outcomes
            for i, o in enumerate(outs):
                if o.kind == DELIVERED:
                    continue
                clean = done.get(id(o))
                if clean is None:
                    text = scrub(o.text, self.secrets)
                    clean = done[id(o)] = (
                        o if text == o.text else msgspec.structs.replace(o, text=text[:400])
                    )
                if clean is not o:
                    outs[i] = clean
        return ans

    async def _send(self, session: Any, envs: list[Envelope]) -> Answer:
        import aiohttp

        # aiohttp >= 3.10 tells the two timeouts apart (both ServerTimeoutError before).
        unanswered = getattr(aiohttp, "SocketTimeoutError", ())
        unconnected = getattr(aiohttp, "ConnectionTimeoutError", ())
        # No connection, or (3.10+) a write to a connection found closed.
        reset = getattr(aiohttp, "ClientConnectionResetError", None)
        unsent: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,) + (
            (reset,) if reset is not None else ()
        )
        try:
            return await self.request(session, envs)
        except unconnected:
            text = f"could not connect within {self.spec.timeout:g} s"
            return answered(envs, deferred(self.label, text, 0, "", "connect"))
        except unanswered:
            # Sent, no answer: the provider may have the message. At least once,
            # as after SMTP's final dot: deferred (a retry may be a duplicate),
            # stage "data" with no code, which is never failed over (see
            # delivery.routes.unknown_outcome).
            text = (
                f"no answer within {self.spec.answer_timeout:g} s after the request was"
                " sent (the provider may have taken it)"
            )
            return answered(envs, deferred(self.label, text, 0, "", "data"))
        except aiohttp.ServerDisconnectedError:
            # The provider closed the connection where its answer was awaited:
            # it may have read the whole request and taken the message.
            text = "disconnected before answering (the provider may have taken it)"
            return answered(envs, deferred(self.label, text, 0, "", "data"))
        except unsent as e:
            # No connection (refused, DNS, TLS), or the request could not be
            # written (a keep-alive connection found closed): nothing was sent.
            return answered(envs, deferred(self.label, f"connection failed: {e}", 0, "", "connect"))
        except (
            aiohttp.ClientOSError,
            aiohttp.ClientPayloadError,
            aiohttp.ClientResponseError,
        ) as e:
            # Broken where the answer was awaited or read (an RST from the
            # provider's load balancer, a 200 whose body was cut short, an
            # answer that is not HTTP): the request went whole, so the provider
            # may have the message. Unknown, as above: never failed over.
            text = f"connection broken before a whole answer ({e}; the provider may have taken it)"
            return answered(envs, deferred(self.label, text, 0, "", "data"))
        except (aiohttp.ClientError, OSError) as e:
            return answered(envs, deferred(self.label, f"connection failed: {e}", 0, "", "connect"))
        except TimeoutError:
            text = (
                f"no answer within {self.spec.timeout + self.spec.answer_timeout:g} s"
                " (the provider may have taken it)"
            )
            return answered(envs, deferred(self.label, text, 0, "", "data"))

    async def request(self, session: Any, envs: list[Envelope]) -> Answer:
        raise NotImplementedError

    async def bisect(self, session: Any, envs: list[Envelope]) -> list[TxnResult]:
        """After a request of several recipients was refused whole because of
        one (or some) of them: its recipients again in two requests, one half
        each. A half refused whole again is split again by ``request`` (it
        calls this), down to single recipients, so only the refused ones are
        answered failed (the others delivered, or deferred if throttled or
        the network fails): about 2·log2(n) requests for one refused
        recipient of n, not n requests one after the other (up to 1,000 in a
        row, outside the lane's rate)."""
        units = [(n, k) for n, env in enumerate(envs) for k in range(len(env.rcpts))]
        half = len(units) // 2
        outs: dict[tuple[int, int], Outcome] = {}
        qids: dict[int, str] = {}
        for part in (units[:half], units[half:]):
            o, q = await self.subset(session, envs, part)
            outs.update(o)
            for n, qid in q.items():
                qids[n] = qids.get(n) or qid
        return [
            TxnResult(env.tag, [outs[(n, k)] for k in range(len(env.rcpts))], qids.get(n, ""))
            for n, env in enumerate(envs)
        ]

    async def subset(
        self, session: Any, envs: list[Envelope], part: list[tuple[int, int]]
    ) -> tuple[dict[tuple[int, int], Outcome], dict[int, str]]:
        """Send only the recipients ``part`` ((envelope, recipient) indexes) of
        ``envs``: in one request when the provider takes several envelopes in
        one (``many_envelopes``), else one per envelope. Their outcomes, and
        the provider's id of each envelope's request."""
        by_env: dict[int, list[int]] = {}
        for n, k in part:
            by_env.setdefault(n, []).append(k)
        subs: list[tuple[int, list[int], Envelope]] = []
        for n, ks in by_env.items():
            env = envs[n]
            tag = [env.tag[k] for k in ks] if isinstance(env.tag, list) else env.tag
            rcpts = [env.rcpts[k] for k in ks]
            subs.append((n, ks, msgspec.structs.replace(env, rcpts=rcpts, tag=tag)))
        groups = [subs] if self.many_envelopes else [[s] for s in subs]
        outs: dict[tuple[int, int], Outcome] = {}
        qids: dict[int, str] = {}
        for g in groups:
            if not g:
                continue
            ans = await self.send(session, [e for _n, _ks, e in g])
            for j, (n, ks, _e) in enumerate(g):
                if isinstance(ans, Throttled):  # nothing sent: later, as any throttled request
                    text = f"{self.label}: HTTP {ans.status} {ans.what}: {ans.text}"[:400]
                    held = ThrottledPart(DEFERRED, 451, "4.3.0", text, "http", self.label,
                                         ans.retry_after, ans.status)  # fmt: skip
                    got: list[Outcome] = [held] * len(ks)
                else:
                    got = list(ans[j].outcomes)
                    got += got[-1:] * (len(ks) - len(got))
                    qids[n] = ans[j].queue_id
                for k, o in zip(ks, got, strict=False):
                    outs[(n, k)] = o
        return outs, qids


class ProviderSite(NamedTuple):
    """What the worker reads of a queue's site (delivery.mx.Site's fields)."""

    key: str
    hosts: tuple[Any, ...] = ()


Report = Callable[[list[TxnResult], str, str], None]
Handback = Callable[[list[Envelope], float, float, str], None]
# Envelopes of a lane paused past the horizon -> those it could not move on to
# their route's next transport (delivery.routes.Router.move_on).
MoveOn = Callable[[list[Envelope], str], list[Envelope]]


def _unconnected(ans: list[TxnResult]) -> bool:
    """Every recipient of a request's answer deferred at "connect" with no
    code: it could not connect (HTTPTransport.send), nothing was sent."""
    return bool(ans) and all(
        o.kind == DEFERRED and o.stage == "connect" and not o.code for r in ans for o in r.outcomes
    )


def _refused_us(ans: list[TxnResult]) -> bool:
    """Every recipient of a request's answer deferred at "auth": the provider
    refused our credentials or account (:func:`map_status`)."""
    return bool(ans) and all(o.kind == DEFERRED and o.stage == "auth" for r in ans for o in r.outcomes)


class ProviderQueue:
    """The ready queue and lane of one HTTP transport in a worker."""

    def __init__(
        self,
        transport: HTTPTransport,
        session: Callable[[], Any],
        report: Report,
        handback: Handback | None,
        *,
        workers: int,
        horizon: float,
        conns: int | None = None,
        nodes: int = 1,
        count: Callable[..., None] | None = None,
        events: list[dict[str, Any]] | None = None,
        move_on: MoveOn | None = None,
        on_cut: Callable[[Envelope, list[Envelope]], None] | None = None,
        dead_for: float = DEAD_FOR,
        index: int = 0,
        slots: Slots | None = None,
        shared_rate: Callable[[float, int], SharedGcra | None] | None = None,
    ) -> None:
        self.transport = transport
        self.move_on = move_on
        self.on_cut = on_cut  # an envelope cut in pieces (Router.on_cut: their failover)
        self.site = ProviderSite(f"provider:{transport.spec.name}")
        self.session = session
        self.report = report
        self.handback = handback
        self.count: Callable[..., None] = count or (lambda name, n=1.0: None)
        self.events = events if events is not None else []
        self.horizon = horizon
        self.workers = max(1, workers)
        self.pending: collections.deque[Envelope] = collections.deque()
        self.campaign_of: dict[int, int] = {}  # first tag id -> campaign (batching)
        self.throttles: dict[int, int] = {}
        # This worker's part of the transport's requests in flight (``_share``),
        # and the places shared with the other workers when there are fewer
        # requests than workers (transports.slots; the worker's one for this
        # transport: delivery.routes).
        self.index = index
        self.slots = slots
        self.yield_until = 0.0  # monotonic: another worker waits for the place freed
        self.limit_max = 1
        self._share(conns or transport.spec.max_connections)
        self.limit = self.limit_max
        # The transport's rate as one bucket the node's workers share (its
        # rate and burst for this worker -> the bucket, or None: each worker
        # then keeps its part): transports.slots.SharedGcra.
        self.shared_rate = shared_rate
        self.bucket: Gcra | SharedGcra | None = None
        self.rate_max = 0.0
        self.nodes = max(1, nodes)  # nodes sending through this transport (shared spool)
        self.quota = 0.0  # the account's rate read from the provider (0: none read)
        self.set_rate(transport.rate_hint)
        self.paused_until = 0.0
        self.backoff = MIN_PAUSE
        # When the lane last slowed down for a throttle: the answers to requests
        # sent before it are the same signal (they were in flight together),
        # not one more each (a burst of 16 throttles paused the lane 60 s).
        self.slowed_at = -math.inf
        self.nconn = 0  # requests in flight
        # Requests a reload's retiring worker of this slot still has in flight
        # here (wire.Conns): counted against the cap with ours, as a lane's
        # borrowed connections are.
        self.borrowed = 0
        self.sending = 0
        self.closing = False
        self.ready = False
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        # A request could not connect: no new one until those in flight are
        # answered (one that gets through clears it; the last one failing too
        # makes the provider unreachable: _unreachable).
        self.failing = False
        self.dead_for = dead_for
        self.dead_until = 0.0  # monotonic; 0: reachable
        self.dead: Outcome | None = None

    @property
    def active(self) -> int:
        return self.nconn

    def state(self, now: float) -> tuple[float, float, int, float] | None:
        """What a reload's new worker takes over (:meth:`take_over`): a pause
        the provider asked for, a rate or request cap it made us lower, the
        backoff; None when a fresh queue would decide the same."""
        rate = self.bucket.rate if self.bucket is not None else 0.0
        if self.paused_until <= now and rate >= self.rate_max and self.limit >= self.limit_max:
            return None
        return self.paused_until, rate, self.limit, self.backoff

    def take_over(self, st: tuple[float, float, int, float]) -> None:
        """A reload's retiring worker's queue of this transport (:meth:`state`):
        its pause, and its lowered rate and cap (never above this one's). Before,
        the new worker sent at once, at the full rate, into the provider's
        Retry-After."""
        paused, rate, limit, backoff = st
        now = time.monotonic()
        self.paused_until = max(self.paused_until, paused)
        self.backoff = max(self.backoff, backoff)
        if self.bucket is not None and 0 < rate < self.bucket.rate:
            self.bucket.set_rate(rate, now)
        self.limit = max(1, min(self.limit, limit))
        if self.ready and self.pending:
            self.pump()

    def _share(self, total: int) -> None:
        """This worker's part of ``total`` requests in flight (the node's):
        ``total // workers``, the remainder to the first workers, so that the
        parts add up to the total (each worker took ``ceil(total / workers)``:
        max_connections = 3 over 2 workers was 4 in flight, 1 over 2 was 2).
        With fewer than one each, every worker may hold one, and only while it
        holds one of the ``total`` places it shares with the others
        (:class:`~fastsend.transports.slots.Slots`)."""
        total = max(1, total)
        w = self.workers
        if total >= w or self.slots is None:
            self.limit_max = max(1, total // w + (1 if self.index % w < total % w else 0))
            if self.slots is not None:
                self.slots.total = 0  # what is held is released as its request ends
            return
        self.limit_max = 1
        self.slots.total = total

    def set_conns(self, total: int) -> None:
        """This node's share of the transport's max_connections changed (other
        nodes came or went): this worker's part of it. Requests over it finish."""
        self._share(total)
        new = self.limit_max
        full = self.limit >= self.limit_max
        self.limit_max = new
        self.limit = new if full else min(self.limit, new)
        if self.ready and self.pending:
            self.pump()

    def set_nodes(self, n: int) -> None:
        """``n`` nodes now send through this transport: a rate read from the
        provider (the account's, one for every node) is split among them."""
        n = max(1, n)
        if n == self.nodes:
            return
        self.nodes = n
        if self.quota > 0:
            self.set_rate(self.quota / n)

    def set_rate(self, rate_all: float) -> None:
        """The transport's rate across workers (0: none): one bucket the
        node's workers share (``shared_rate``), so a worker sending alone may
        use all of it (each kept ``rate / workers``: a campaign one worker
        held went at half the rate with two); else this worker's share."""
        if rate_all > 0:
            # A second's worth: a request carries at most that many recipients
            # (pump's cap), so the rate holds over any second, not only on
            # average (a burst of max_rcpts, 1000 for Mailgun, let a rate of 20
            # send 1000 messages at once).
            shared = None
            if self.shared_rate is not None:
                shared = self.shared_rate(rate_all, max(1, math.ceil(rate_all)))
            if shared is not None:
                self.rate_max, self.bucket = rate_all, shared
                return
            self.rate_max = rate_all / self.workers
            burst = max(1, math.ceil(self.rate_max))
            self.bucket = Gcra(self.rate_max, burst)
        else:
            self.rate_max, self.bucket = 0.0, None

    # -- queue ----------------------------------------------------------------

    def push(self, envelopes: list[Envelope], campaign: int = 0) -> None:
        if self.dead_until:
            if time.monotonic() < self.dead_until and self.dead is not None:
                self.report(answered(envelopes, self.dead), "", self.transport.label)
                return
            self.dead_until, self.dead = 0.0, None
        for e in envelopes:
            self.campaign_of[_key(e)] = campaign
        self.pending.extend(envelopes)
        if self.handback is not None:
            self.trim()
        self.pump()

    def trim(self) -> int:
        """Keep what this lane may send within the horizon; hand back the rest.
        A lane the provider paused past the horizon (a Retry-After, a 503 in
        maintenance) hands back all it holds, unattempted, until the pause
        ends: before, that mail waited in the worker (up to 10 minutes), and
        a drain (SIGTERM) waited for it."""
        if self.handback is None or not self.pending:
            return 0
        wait = self.paused_until - time.monotonic()
        if wait > self.horizon:
            back = list(self.pending)
            self.pending.clear()
            for e in back:
                self.campaign_of.pop(_key(e), None)
                self.throttles.pop(_key(e), None)
            why = f"{self.transport.label} paused for {wait:.0f} s by the provider"
            if self.move_on is not None:
                # Mail whose route names another transport goes there now, not
                # after the pause (a backup that served one request a pause).
                back = self.move_on(back, why)
            step = 1.0 / self.bucket.rate if self.bucket is not None else 0.0
            if back:
                self.handback(back, wait, step, f"handed back: {why}")
            return len(back)
        if self.bucket is None:
            return 0
        # A bucket the node's workers share: this worker's part of its rate
        # (each planned on the whole rate: n workers kept n horizons' worth)
        b = self.bucket
        rate = b.rate if isinstance(b, Gcra) else b.share(time.monotonic())
        keep = int(rate * self.horizon) + b.burst
        excess = 0
        n = 0
        for i, e in enumerate(self.pending):
            n += len(e.rcpts)
            if n > keep:
                excess = len(self.pending) - i
                break
        if excess <= 0:
            return 0
        back = [self.pending.pop() for _ in range(excess)]
        back.reverse()
        for e in back:
            self.campaign_of.pop(_key(e), None)
            self.throttles.pop(_key(e), None)
        self.handback(back, self.horizon, 1.0 / rate, f"handed back: {self.transport.label} "
                      f"may take {keep} within {self.horizon:g} s")  # fmt: skip
        return excess

    def _same(self, a: Envelope, b: Envelope) -> bool:
        """Two non-personalised envelopes of one campaign (one content)."""
        return (
            isinstance(a.tag, list)
            and isinstance(b.tag, list)
            and self.campaign_of.get(_key(a), -1) == self.campaign_of.get(_key(b), -2)
        )

    def pump(self) -> None:
        if self.slots is not None and self.slots.wanting:
            self.slots.unwant()  # marked again below if it still finds no place
        if self.closing:
            return
        loop = asyncio.get_running_loop()
        if not self.ready:
            if not self.tasks:
                self._spawn(self._setup())
            return
        now = time.monotonic()
        while self.pending and self.nconn + self.borrowed < self.limit and not self.failing:
            if now < self.paused_until:
                self._later(self.paused_until - now)
                return
            bucket = self.bucket
            cap = self.transport.max_rcpts or 1 << 30
            if bucket is not None:
                cap = min(cap, bucket.burst)
            if len(self.pending[0].rcpts) > cap:
                self._cut(cap)
            place = -1
            slots = self.slots
            if slots is not None and slots.total:
                # Fewer requests than workers: one of the places they share.
                if now < self.yield_until:
                    self._later(self.yield_until - now)
                    return
                got = slots.acquire()
                if got is None:
                    self._later(SLOT_POLL)
                    return
                place = got
            envs = self.transport.take(self.pending, cap, self._same)
            if bucket is not None:
                n = min(sum(len(e.rcpts) for e in envs), bucket.burst)
                wait = bucket.acquire(now, n)
                if wait > 0:
                    self.pending.extendleft(reversed(envs))
                    if place >= 0 and slots is not None:
                        slots.release(place)
                    self._later(wait)
                    return
            self.nconn += 1
            self.sending += 1
            self._spawn(self._request(envs, place))
        del loop

    def _cut(self, cap: int) -> None:
        """The head envelope (identical mail to several recipients) in pieces
        of ``cap`` recipients, each its own request: a request's recipients
        count against the rate one by one (SES's MaxSendRate is recipients a
        second), and a group of 50 went out as one request of the burst's
        worth (7 at 14/s over two workers: seven times the rate)."""
        head = self.pending[0]
        if not isinstance(head.tag, list) or cap < 1:
            return
        self.pending.popleft()
        pieces = self.transport.fit([head], cap)
        k = _key(head)
        campaign = self.campaign_of.pop(k, 0)
        throttled = self.throttles.pop(k, 0)
        for p in pieces:
            self.campaign_of[_key(p)] = campaign
            if throttled:
                self.throttles[_key(p)] = throttled
        self.pending.extendleft(reversed(pieces))
        if self.on_cut is not None:
            self.on_cut(head, pieces)

    def _later(self, delay: float) -> None:
        if self.timer is None:

            def fire() -> None:
                self.timer = None
                self.pump()

            self.timer = asyncio.get_running_loop().call_later(max(0.001, delay), fire)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _setup(self) -> None:
        try:
            await self.transport.setup(self.session())
        except Exception as e:  # best effort: the quota read is shaping data, not required
            self.count("provider_setup_failed")
            del e
        if self.transport.rate_hint and self.bucket is None:
            # The account's rate (SES: MaxSendRate) holds for every node
            # together: each node takes its part (set_nodes), each worker its own.
            self.quota = self.transport.rate_hint
            self.set_rate(self.quota / self.nodes)
            self._event("rate from provider quota", rate=self.rate_max, nodes=self.nodes)
        self.ready = True
        self.pump()

    async def _request(self, envs: list[Envelope], place: int = -1) -> None:
        started = time.monotonic()
        writes = ring.WRITES
        if writes is not None:  # a worker: the request may reach the provider from here on
            for sent in envs:
                writes.mark(sent.tag)
        try:
            try:
                ans = await self.transport.send(self.session(), envs)
            except Exception as e:  # a local bug must not strand the mail: defer it, loudly
                import traceback

                traceback.print_exc()
                ans = answered(
                    envs,
                    deferred(
                        self.transport.label,
                        f"local error: {e.__class__.__name__}",
                        451,
                        "4.3.0",
                        "local",
                    ),
                )
        finally:
            self.nconn -= 1
            self.sending -= 1
            if place >= 0 and self.slots is not None:
                self.slots.release(place)
                if self.slots.others_waiting(self.workers):
                    # Another worker waits for a place: it goes first (this one
                    # would take it again at once, below, and that one never).
                    self.yield_until = time.monotonic() + SLOT_YIELD
        if isinstance(ans, Throttled):
            self.failing = False
            self._throttled(envs, ans, started)
        else:
            # A split request (bisect) with a part throttled: that part waits as
            # a throttled request's, no attempt (before: deferred, an attempt each).
            ans, held, t = throttled_parts(envs, ans)
            campaigns = [self.campaign_of.get(_key(env), 0) for env in envs]
            self.failing = unconnected = _unconnected(ans)
            self._succeeded(ans)
            for env in envs:
                self.campaign_of.pop(_key(env), None)
                self.throttles.pop(_key(env), None)
            self.count("provider_requests")
            if ans:
                self.report(ans, "", self.transport.label)
            if held and t is not None:
                for n, env in held:
                    self.campaign_of[_key(env)] = campaigns[n]
                self._throttled([env for _n, env in held], t, started)
            if unconnected and not self.nconn:
                self._unreachable(ans[0].outcomes[0])
            elif _refused_us(ans):
                self._refused(ans[0].outcomes[0])
        self.pump()

    def _refused(self, out: Outcome) -> None:
        """The provider refused our credentials or the account as a whole (a
        401: the API key wrong or revoked; SES's signature errors, a paused
        account): every request would be refused alike, so the lane sends
        none for ``dead_for`` seconds -- what it holds and what is pushed
        meanwhile is answered deferred with that reason, without a request
        (a route's next transport takes it, delivery.routes) -- and says so in
        a "shaping" event. Then one request tries again. Before, each message
        was its own request answered 401, an attempt each, at every retry
        until the key was fixed (a relay's refused AUTH suspends its site
        the same way, delivery.pool)."""
        if time.monotonic() >= self.dead_until:
            self._event("provider refused credentials", pause=self.dead_for, text=out.text[:200])
        self._unreachable(out, "refused: requests suspended", "providers_refused")


    def _unreachable(
        self,
        out: Outcome,
        why: str = "unreachable: requests suspended",
        counter: str = "providers_unreachable",
    ) -> None:
        """No request could connect to the provider (its endpoint refused or
        dropped the connection attempts, DNS failed) and none is in flight:
        what the lane holds is answered with that failure now (a route's next
        transport takes it: delivery.routes), and so is what is pushed in the
        next ``dead_for`` seconds, without a request. Before, each request
        waited out its connect timeout and answered its own envelopes (one
        each for SES and Mailgun): a lane of a thousand waited a hundred
        connect timeouts in the worker's window."""
        self.failing = False
        waiting = list(self.pending)
        self.pending.clear()
        for e in waiting:
            self.campaign_of.pop(_key(e), None)
            self.throttles.pop(_key(e), None)
        if waiting:
            self.report(answered(waiting, out), "", self.transport.label)
        if self.dead_for > 0:
            self.dead_until = time.monotonic() + self.dead_for
            text = f"{out.text} ({why} for {self.dead_for:g} s)"
            self.dead = Outcome(DEFERRED, 0, out.enhanced, text[:400], out.stage, out.mx)
        self.count(counter)

    def _succeeded(self, results: list[TxnResult]) -> None:
        if not any(o.kind == DELIVERED for r in results for o in r.outcomes[:1]):
            return
        self.backoff = MIN_PAUSE
        now = time.monotonic()
        if self.bucket is not None and self.bucket.rate < self.rate_max:
            self.bucket.set_rate(min(self.rate_max, self.bucket.rate + self.rate_max / 20), now)
        if self.limit < self.limit_max:
            self.limit += 1

    def _throttled(self, envs: list[Envelope], t: Throttled, started: float = math.inf) -> None:
        """Slow the lane; the envelopes wait at the head of the queue (no attempt),
        or go back deferred when the wait is long or they were throttled often.
        A request sent before the lane last slowed down (``started``) was in
        flight with the one that slowed it: its throttle is the same signal,
        so it waits with it (its Retry-After still holds) and slows nothing more."""
        now = time.monotonic()
        self.count("provider_throttled")
        if started < self.slowed_at:
            pause = min(t.retry_after, MAX_PAUSE * 10)
            self.paused_until = max(self.paused_until, now + pause)
            pause = self.paused_until - now
        else:
            self.slowed_at = now
            pause = t.retry_after or self.backoff
            self.backoff = min(MAX_PAUSE, self.backoff * 2)
            pause = min(pause, MAX_PAUSE * 10)
            self.paused_until = max(self.paused_until, now + pause)
            if self.bucket is not None:
                new = max(self.bucket.rate / 2, self.rate_max / 64, 0.01)
                if new < self.bucket.rate:
                    self.bucket.set_rate(new, now)
                rate: float | None = self.bucket.rate
            else:
                self.limit = max(1, self.limit // 2)
                rate = None
            self._event(
                f"provider {t.what}",
                pause=round(pause, 3),
                rate=rate,
                limit=self.limit,
                text=t.text[:200],
            )
        keep: list[Envelope] = []
        give: list[Envelope] = []
        for e in envs:
            k = _key(e)
            n = self.throttles[k] = self.throttles.get(k, 0) + 1
            (give if n > MAX_THROTTLES or pause > self.horizon or self.closing else keep).append(e)
        if keep:
            self.pending.extendleft(reversed(keep))
        if give:
            for e in give:
                self.campaign_of.pop(_key(e), None)
                self.throttles.pop(_key(e), None)
            self._give_up(give, t, now)
        if pause > self.horizon:
            self.trim()  # the rest of the lane waits in the supervisor, not here

    def _give_up(self, give: list[Envelope], t: Throttled, now: float) -> None:
        """Throttled envelopes the lane will not hold (throttled ``MAX_THROTTLES``
        times, a pause past the horizon, the worker closing): nothing of them
        was sent, so they go back unattempted -- to their route's next
        transport first (``move_on``), the rest to the supervisor, due when the
        pause ends (at least the lane's backoff). Before, they were answered
        deferred: an attempt each, the backoff doubling and the retry budget
        spent on requests the provider never took."""
        label = self.transport.label
        if self.handback is None:  # no supervisor to hand back to (a bare queue)
            out = deferred(label, f"{t.what}: {t.text}", 421, "4.7.0")
            self.report(answered(give, out), "", label)
            return
        wait = max(self.paused_until - now, self.backoff, 0.0)
        why = f"{label} {t.what} (HTTP {t.status}): {t.text}"[:300]
        back = give if self.move_on is None else self.move_on(give, why)
        if back:
            step = 1.0 / self.bucket.rate if self.bucket is not None else 0.0
            self.handback(back, wait, step, f"handed back unattempted: {why}")

    def _event(self, action: str, **fields: Any) -> None:
        ev: dict[str, Any] = {
            "time": time.time(),
            "event": "shaping",
            "action": action,
            "site": self.site.key,
            "transport": self.transport.label,
        }
        ev.update({k: v for k, v in fields.items() if v is not None})
        self.events.append(ev)

    async def close(self) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def throttled_parts(
    envs: list[Envelope], ans: list[TxnResult]
) -> tuple[list[TxnResult], list[tuple[int, Envelope]], Throttled | None]:
    """Split a request's answer (``ans``, one result per envelope of ``envs``,
    as ``bisect`` answers) into what was answered and the recipients of a part
    the provider throttled (``ThrottledPart``): (the answered results, (index in
    ``envs``, an envelope of the throttled recipients), the throttle)."""
    if len(ans) != len(envs) or not any(
        type(o) is ThrottledPart for r in ans for o in r.outcomes
    ):
        return ans, [], None
    kept: list[TxnResult] = []
    held: list[tuple[int, Envelope]] = []
    t: Throttled | None = None
    for n, (env, r) in enumerate(zip(envs, ans, strict=True)):
        outs = r.outcomes
        ks = [k for k, o in enumerate(outs) if type(o) is ThrottledPart]
        tags = env.tag if isinstance(env.tag, list) else None
        if not ks or len(outs) != len(env.rcpts) or (
            len(ks) < len(outs) and (tags is None or len(tags) != len(outs))
        ):
            kept.append(r)  # (cannot be split by recipient: answered as it is)
            continue
        o = outs[ks[0]]
        assert isinstance(o, ThrottledPart)
        if t is None or o.retry_after > t.retry_after:
            t = Throttled(o.retry_after, o.text, o.status)
        if len(ks) == len(outs):
            held.append((n, env))
            continue
        rest = [k for k in range(len(outs)) if k not in ks]
        assert tags is not None
        held.append((n, msgspec.structs.replace(
            env, rcpts=[env.rcpts[k] for k in ks], tag=[tags[k] for k in ks])))  # fmt: skip
        kept.append(TxnResult([tags[k] for k in rest], [outs[k] for k in rest], r.queue_id))
    return kept, held, t


def _key(e: Envelope) -> int:
    t = e.tag
    if isinstance(t, list):
        return int(t[0]) if t else id(e)
    return t if isinstance(t, int) else id(e)
