"""Mailgun: ``POST /v3/DOMAIN/messages.mime`` with the raw MIME fastsend signed.

Endpoint ``https://api.mailgun.net`` (region us) or ``https://api.eu.mailgun.net``
(eu) unless configured; HTTP basic auth ``api:KEY``; a multipart form with
``to`` (each of the envelope's recipients, one field each), ``message`` (the MIME, as a file) and
``v:fastsend`` (the recipients' message id tokens, in order: the webhooks
echo it in ``user-variables``). DOMAIN is ``domain`` from the transport (the
config requires it: the envelope sender's, a VERP or bounce domain, is no
Mailgun domain). One request per envelope.

Answers: 200 ``{"id": "<...>", "message": "Queued. Thank you."}`` ->
delivered (queue_id = id); 429 and 503 -> throttled (Retry-After); 400
``{"message": ...}`` -> failed, classified, unless it is about our domain or
account ("Domain D is not allowed to send: Sandbox subdomains are for test
purposes only ... authorized recipients"): deferred, as are 401 ("Forbidden"),
403, 404 ("Domain not found") and 5xx. A 400 about the ``to`` parameter or
naming one of the recipients of a request of several (identical mail grouped:
Mailgun refuses it whole for one address, "to parameter is not a valid
address") sends its recipients again in halves, split again while refused
(HTTPTransport.bisect), so only the refused one bounces.
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import Any

import orjson

from fastsend import msgid
from fastsend.outcome import Envelope
from fastsend.transports.http import (
    PAUSE_STATUSES,
    Answer,
    HTTPTransport,
    Throttled,
    answered,
    delivered,
    map_status,
    not_the_api,
    retry_after,
)

BASE = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}
# Mailgun refuses a request whose o:, h: and v: options pass 16 kB in all (400
# "Send options ... are limited to 16 kB total"): v:fastsend holds a token of up
# to 30 octets per recipient, so a request carries at most 500 recipients.
MAX_TOKENS = 500


class MailgunTransport(HTTPTransport):
    def __init__(self, spec: Any, secret: bytes) -> None:
        super().__init__(spec, secret)
        if secret:
            self.max_rcpts = min(self.max_rcpts or MAX_TOKENS, MAX_TOKENS)
        self.base = spec.endpoint or BASE[spec.region]
        token = base64.b64encode(b"api:" + spec.secrets["api_key"].encode()).decode()
        self.headers_base = {"Authorization": "Basic " + token}

    def form(self, env: Envelope) -> tuple[bytes, str]:
        """The multipart/form-data body, built in one join (aiohttp's FormData
        costs ~0.3 ms a message here)."""
        boundary = secrets.token_hex(16)
        while boundary.encode() in env.data:
            boundary = secrets.token_hex(16)
        b = boundary.encode()
        # One ``to`` field per recipient (Mailgun takes the parameter several
        # times): an address-list joined with commas leaves a quoted local
        # part holding a comma ("a,b"@example.net) to Mailgun's list parser.
        fields = [(b"to", r.encode()) for r in env.rcpts]
        ids = env.tag if isinstance(env.tag, list) else [env.tag]
        if self.secret and all(isinstance(i, int) for i in ids):
            fields.append(
                (b"v:fastsend", " ".join(msgid.token(int(i), self.secret) for i in ids).encode())  # type: ignore[arg-type]
            )
        parts = [
            b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (b, k, v)
            for k, v in fields
        ]
        parts.append(
            b'--%s\r\nContent-Disposition: form-data; name="message"; filename="message.mime"\r\n'
            b"Content-Type: message/rfc822\r\n\r\n" % b
        )
        parts += [env.data, b"\r\n--%s--\r\n" % b]
        return b"".join(parts), f"multipart/form-data; boundary={boundary}"

    async def request(self, session: Any, envs: list[Envelope]) -> Answer:
        env = envs[0]
        url = f"{self.base}/v3/{self.spec.domain}/messages.mime"
        body, ctype = self.form(env)
        headers = {**self.headers_base, "Content-Type": ctype}
        timeout = self.client_timeout()
        async with session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as r:
            raw = await r.read()
            status = r.status
            ra = retry_after(r.headers.get("Retry-After"))
            location = r.headers.get("Location", "")
        if 300 <= status < 400:
            return answered(envs, map_status(self.label, status, location))
        text = raw[:300].decode("utf-8", "replace")
        doc: Any = None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        if isinstance(doc, dict) and doc.get("message"):
            text = str(doc["message"])
        if 200 <= status < 300:
            mid = str(doc.get("id") or "") if isinstance(doc, dict) else ""
            if not mid:
                return not_the_api(envs, self.label, status, raw)
            return delivered(envs, self.label, mid, f"{self.label} accepted as {mid}")
        if status in PAUSE_STATUSES:
            return Throttled(ra, text, status)
        ours = _ACCOUNT.search(text) is not None
        if (
            status == 400
            and not ours
            and len(env.rcpts) > 1
            and _about_a_recipient(text, env.rcpts)
        ):
            return await self.bisect(session, envs)
        return answered(envs, map_status(self.label, status, text, account_trouble=ours))


# Refusals about our Mailgun domain or account, never the message or a recipient:
# "Domain D is not allowed to send: Sandbox subdomains are for test purposes
# only. Please add your own domain or add the address to authorized recipients
# in Account Settings." (a 400 before Mailgun answered it 403), "Free accounts
# are for test purposes only", an unverified or disabled domain.
_ACCOUNT = re.compile(
    r"is not allowed to send|authorized recipients|free accounts are for test purposes", re.I
)


def _about_a_recipient(text: str, rcpts: list[str]) -> bool:
    """Mailgun's 400 is about the ``to`` parameter or names a recipient."""
    low = text.lower()
    return "to parameter" in low or "'to'" in low or any(r.lower() in low for r in rcpts)
