"""Amazon SES through the v2 API: SendEmail with the raw MIME fastsend signed.

``POST {endpoint}/v2/email/outbound-emails`` (endpoint
``https://email.REGION.amazonaws.com`` unless configured), SigV4-signed
(service ``ses``), JSON body::

    {"Destination": {"ToAddresses": [...]}, "Content": {"Raw": {"Data": base64}},
     "ConfigurationSetName": ..., "EmailTags": [{"Name": "fastsend", "Value": ...}]}

No FromEmailAddress: SES takes the message's From header (a verified identity),
so the bytes it sends are the bytes fastsend rendered and DKIM-signed. One
request per envelope (at most 50 recipients, SES's limit). The answer's
MessageId becomes the result's queue_id.

Errors (the ``x-amzn-ErrorType`` header, the body's ``message``):
TooManyRequestsException / ThrottlingException / "Maximum sending rate
exceeded" and 503 ServiceUnavailable -> throttled; "Daily message quota exceeded" -> throttled for 10
minutes (so deferred); MessageRejected / BadRequestException -> failed
(classified); account trouble (SendingPausedException, AccountSuspended,
MailFromDomainNotVerified, NotFound, signature or key errors), the sandbox's
or an unverified sender's MessageRejected "Email address is not verified"
(moto: "Did not have authority to send from email") and 5xx -> deferred: our
account's configuration, never a bounce of the recipient; those about the
whole account or our key (CREDENTIALS: a bad signature or key, a paused or
suspended account) suspend the transport's requests for a while
(http.ProviderQueue._refused). A request of several
recipients (identical mail grouped) refused with a MessageRejected /
BadRequestException about an address, or with any InvalidParameterValue (its
texts about a recipient often name no address: "Missing final '@domain'"), is
sent again in halves (split again while refused), so only the refused one
bounces.

Its rate is shaping data: with no ``rate`` configured, the account's
MaxSendRate (``GET /v2/email/account``, bounded by ``timeout``: a read) sets
the lane's rate.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from fastsend import msgid
from fastsend.config.transports import TransportSpec
from fastsend.outcome import Envelope
from fastsend.transports.http import (
    Answer,
    HTTPTransport,
    Throttled,
    answered,
    delivered,
    map_status,
    not_the_api,
    retry_after,
    scrub,
)
from fastsend.transports.sigv4 import Signer

PATH = "/v2/email/outbound-emails"
THROTTLING = ("TooManyRequestsException", "ThrottlingException", "Throttling")
# About the whole account or our credentials: every request would be refused
# alike, so the transport stops sending for a while (http.ProviderQueue._refused).
CREDENTIALS = (
    "SendingPausedException", "AccountSuspendedException", "UnrecognizedClientException",
    "InvalidSignatureException", "SignatureDoesNotMatch", "IncompleteSignature",
    "ExpiredTokenException", "ExpiredToken", "InvalidClientTokenId",
    "MissingAuthenticationToken",
)  # fmt: skip
# About our configuration, perhaps one identity's (an unverified MAIL FROM
# domain, an IAM policy's condition on the From): deferred, the others go on.
ACCOUNT = (
    *CREDENTIALS, "MailFromDomainNotVerifiedException", "NotFoundException", "LimitExceededException",
    "AccessDeniedException",
)  # fmt: skip
# MessageRejected texts about our identities (the sandbox, an unverified From),
# not the recipient: deferred like the ACCOUNT errors.
UNVERIFIED = ("is not verified", "not have authority to send")
REFUSALS = ("MessageRejected", "BadRequestException", "InvalidParameterValue")
DAILY_QUOTA_PAUSE = 600.0  # SES: "wait for an interval of up to 10 minutes"


class SESTransport(HTTPTransport):
    def __init__(self, spec: TransportSpec, secret: bytes) -> None:
        super().__init__(spec, secret)
        s = spec.secrets
        self.signer = Signer(
            s["access_key_id"], s["secret_access_key"], spec.region, "ses",
            s.get("session_token", ""),
        )  # fmt: skip
        self.base = spec.endpoint or f"https://email.{spec.region}.amazonaws.com"
        self.url = self.base + PATH

    async def setup(self, session: Any) -> None:
        if self.spec.rate:
            return
        import aiohttp

        url = self.base + "/v2/email/account"
        headers = self.signer.sign("GET", url, {}, b"")
        # A read, sent again at no cost: ``timeout`` bounds it whole (not
        # answer_timeout, which waits for a sent message's answer: a quota
        # read left unanswered held the lane, and all its mail, 10 minutes).
        t = self.spec.timeout
        timeout = aiohttp.ClientTimeout(total=2 * t, connect=t, sock_read=t)
        async with session.get(url, headers=headers, timeout=timeout, allow_redirects=False) as r:
            if r.status != 200:
                return
            doc = orjson.loads(await r.read())
        rate = float((doc.get("SendQuota") or {}).get("MaxSendRate") or 0)
        if rate > 0:
            self.rate_hint = rate

    def body(self, env: Envelope) -> bytes:
        doc: dict[str, Any] = {
            "Destination": {"ToAddresses": env.rcpts},
            "Content": {"Raw": {"Data": base64.b64encode(env.data).decode()}},
        }
        if self.spec.configuration_set:
            doc["ConfigurationSetName"] = self.spec.configuration_set
        first = env.tag[0] if isinstance(env.tag, list) and env.tag else env.tag
        if isinstance(first, int) and self.secret:
            # Tag values: [A-Za-z0-9_-]; the token's '.'-free form is the message id.
            doc["EmailTags"] = [{"Name": "fastsend", "Value": msgid.token(first, self.secret)}]
        return orjson.dumps(doc)

    async def request(self, session: Any, envs: list[Envelope]) -> Answer:
        env = envs[0]
        body = self.body(env)
        headers = self.signer.sign("POST", self.url, {"Content-Type": "application/json"}, body)
        timeout = self.client_timeout()
        async with session.post(
            self.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as r:
            raw = await r.read()
            status = r.status
            etype = r.headers.get("x-amzn-ErrorType", "").split(":", 1)[0]
            ra = r.headers.get("Retry-After")
            location = r.headers.get("Location", "")
        if 300 <= status < 400:
            return answered(envs, map_status(self.label, status, location))
        doc: dict[str, Any] = {}
        try:
            parsed = orjson.loads(raw) if raw else {}
            doc = parsed if isinstance(parsed, dict) else {}
        except orjson.JSONDecodeError:
            pass
        if 200 <= status < 300:
            mid = str(doc.get("MessageId") or "")
            if not mid:
                return not_the_api(envs, self.label, status, raw)
            return delivered(envs, self.label, mid, f"{self.label} accepted as {mid}")
        etype = etype or str(doc.get("__type", "") or doc.get("Code", "")).rsplit("#", 1)[-1]
        # (scrubbed here, before any cut: a secret cut in two is no longer found whole)
        text = str(doc.get("message") or doc.get("Message") or raw[:2000].decode("utf-8", "replace"))
        text = scrub(text, self.secrets)[:300]
        what = f"{etype}: {text}" if etype else text
        if "daily message quota" in text.lower():
            return Throttled(DAILY_QUOTA_PAUSE, what)
        if status == 503:  # ServiceUnavailable: the service, not the message
            return Throttled(retry_after(ra), what, 503)
        if status == 429 or etype in THROTTLING or "maximum sending rate" in text.lower():
            return Throttled(retry_after(ra), what)
        low = text.lower()
        ours = etype in ACCOUNT or any(u in low for u in UNVERIFIED)
        if (
            not ours
            and status == 400
            and etype in REFUSALS
            and len(env.rcpts) > 1
            and (
                etype == "InvalidParameterValue"
                or "address" in low
                or any(r.lower() in low for r in env.rcpts)
            )
        ):
            # Refused whole for one recipient: again in halves, down to that
            # one alone, and only it bounces. An
            # InvalidParameterValue is about a field of the request, and SES's
            # texts about a recipient often name neither it nor "address"
            # ("Missing final '@domain'", "Domain starts with dot"). If it was
            # the message, every single request is refused too, each a
            # bounce as before; a group's answers never suppress (bisect
            # answers a group as one TxnResult, Worker.add_results).
            return await self.bisect(session, envs)
        return answered(
            envs,
            map_status(
                self.label, status, what, account_trouble=ours, credentials=etype in CREDENTIALS
            ),
        )
