"""SendGrid through the v3 API: ``POST /v3/mail/send`` (Bearer API key).

The v3 API takes a message's parts, not raw MIME: fastsend renders the
message as for every transport, then hands SendGrid its parts -- From,
Reply-To, Subject, the text and HTML bodies, attachments and the other
headers (List-Unsubscribe, Feedback-ID, ...) -- so subject, bodies and
headers are the same bytes of text whatever the transport (a message with no
body text, attachments only, gets a one-space text body, and one with no
subject a one-space subject: v3 requires both; an attached message is one
message/rfc822 attachment; custom header values go as encoded in the
message); SendGrid builds the
MIME and DKIM-signs it with the domain's authenticated key (it refuses a
DKIM-Signature header, which would not survive its re-encoding anyway).
Routes that must carry fastsend's own signature use SendGrid's SMTP relay
(``kind = "relay"``, host smtp.sendgrid.net, username "apikey").

Non-personalised mail is batched: consecutive grouped envelopes of one
campaign share one request, one personalization per recipient (so no
recipient sees another), up to 1,000 recipients (SendGrid's limit). Each
personalization carries ``custom_args.fastsend`` = the message's id token,
which the Event Webhook echoes (fastsend.serve.provider_events).

Answers: 202 + ``X-Message-Id`` -> delivered (queue_id); 429 -> throttled
(Retry-After, or X-RateLimit-Reset), 503 too (Retry-After); 400 ``{"errors": [{"message", "field"}]}``
and 413 -> failed, classified; 401/403/404 and 5xx -> deferred. A 400 naming a
personalization of a request of several recipients refuses the whole request
for one of them: each is then sent on its own, and only the refused bounce.
"""

from __future__ import annotations

import base64
import collections
import email.generator
import email.header
import email.utils
import io
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from fastsend import msgid
from fastsend.outcome import Envelope, TxnResult
from fastsend.transports.http import (
    PAUSE_STATUSES,
    Answer,
    HTTPTransport,
    Throttled,
    answered,
    delivered,
    map_status,
    not_the_api,
    rejected,
    retry_after,
)

PATH = "/v3/mail/send"
# Headers SendGrid sets itself or refuses as custom headers.
RESERVED = frozenset(
    [
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
        "dkim-signature",
        "received",
        "date",
        "x-sg-id",
        "x-sg-eid",
        "message-id",
    ]
)


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


def _utf8(value: str) -> str:
    """Text the compat32 parser read from 8-bit octets (RFC 6532 UTF-8 header
    text, as surrogate escapes) as the characters they are: orjson refuses
    surrogates (every such message failed with a local error, retried until
    it expired)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _header(value: str) -> str:
    """A header's text: unfolded, RFC 2047 words decoded, and no control
    character left (an encoded word may hold CR LF: "=?utf-8?q?a=0D=0ABcc:..."
    must not become a line break in the header SendGrid writes)."""
    value = _utf8(value).replace("\r\n", "").replace("\n", "")
    if "=?" in value:
        try:
            value = str(email.header.make_header(email.header.decode_header(value)))
        except (ValueError, LookupError):  # a malformed word, an unknown charset: as written
            pass
    return _CONTROLS.sub(" ", value).strip()


def _custom(value: str) -> str:
    """A custom header's value for v3's ``headers`` as the message carries it:
    unfolded, RFC 2047 words kept encoded, no control character. SendGrid
    writes these values into the header section as given ("you must ensure
    these are properly encoded if they contain unicode characters"): decoded,
    a "Comments: =?utf-8?q?caf=C3=A9?=" went as raw 8-bit text, not the
    header fastsend rendered. UTF-8 header text (RFC 6532) is encoded here."""
    value = _utf8(value).replace("\r\n", "").replace("\n", "")
    value = _CONTROLS.sub(" ", value).strip()
    if not value.isascii():
        enc = email.header.Header(value, "utf-8").encode(linesep="\n")
        value = " ".join(w.strip() for w in enc.split("\n"))
    return value


def _addrs(value: str) -> list[dict[str, str]]:
    """Every address of an address-list header (Reply-To may name several),
    each as :func:`_addr` reads one."""
    text = _utf8(value).replace("\r\n", "").replace("\n", "")
    out = []
    for name, addr in email.utils.getaddresses([text]):
        addr = _CONTROLS.sub("", addr)
        if not addr:
            continue
        name = _header(name) if name else ""
        out.append({"email": addr, "name": name} if name else {"email": addr})
    return out


def _addr(value: str) -> dict[str, str]:
    """The header's first address as written (the one fastsend judged the
    tenant's, delivery.signing.identity_domains), then its display name
    decoded. Decoding the whole header first let a display name's encoded
    word ("=?utf-8?q?=3Cceo=40bank.example=3E?= <news@tenant.example>")
    become the address SendGrid sent From."""
    name, addr = email.utils.parseaddr(_utf8(value).replace("\r\n", "").replace("\n", ""))
    name = _header(name) if name else ""
    addr = _CONTROLS.sub("", addr)
    return {"email": addr, "name": name} if name else {"email": addr}


def _raw(msg: Any, name: str) -> str | None:
    """A header's value as written (compat32's ``get`` gives an 8-bit one as
    an ``email.header.Header``, not text)."""
    low = name.lower()
    for k, v in msg.raw_items():
        if k.lower() == low:
            return str(v)
    return None


def mime_to_v3(data: bytes) -> dict[str, Any]:
    """The v3 fields of a rendered message (everything but personalizations).
    The compat32 parser: the modern policy costs ~4 ms a message here."""
    msg = email.message_from_bytes(data)
    doc: dict[str, Any] = {
        "from": _addr(_raw(msg, "From") or ""),
        # v3 refuses a request without a subject or with an empty one (400 "The
        # subject is required"), and a message may have none (RFC 5322 3.6:
        # optional; raw MIME through the API or SMTP submission): one space
        # stands for it, as for an empty body below (before, every recipient
        # of such a message bounced).
        "subject": _header(_raw(msg, "Subject") or "") or " ",
    }
    reply_to = _raw(msg, "Reply-To")
    if reply_to:
        # Several addresses (RFC 5322 3.6.2: an address-list) go in
        # reply_to_list: before, replies reached only the first.
        many = _addrs(reply_to)
        if len(many) > 1:
            doc["reply_to_list"] = many
        else:
            doc["reply_to"] = _addr(reply_to)
    headers = {k: _custom(str(v)) for k, v in msg.raw_items() if k.lower() not in RESERVED}
    if headers:
        doc["headers"] = headers
    content: list[dict[str, str]] = []
    attachments: list[dict[str, str]] = []
    for part in _leaves(msg):
        ctype = part.get_content_type()
        disp = part.get_content_disposition()
        filename = part.get_filename()
        if part.get_content_maintype() == "message":
            # An attached message (a forward, a bounce's original) is one
            # attachment, its bytes as they are: walk() went into it, its text
            # became this message's body and its other parts anonymous
            # attachments, its headers lost.
            attachments.append({
                "content": base64.b64encode(_inner(part)).decode(),
                "type": ctype,
                "filename": _header(filename or "") or (
                    "forwarded-message.eml" if ctype == "message/rfc822" else "attachment"),
                "disposition": "attachment",
            })  # fmt: skip
            continue
        payload = part.get_payload(decode=True) or b""
        assert isinstance(payload, bytes)
        if (
            (disp is None or (disp == "inline" and not filename))
            and ctype in ("text/plain", "text/html")
            and all(c["type"] != ctype for c in content)
        ):
            # The body (a mail client's "inline" text part too: it had none,
            # and SendGrid refuses a request without content).
            charset = part.get_content_charset() or "us-ascii"
            try:
                text = payload.decode(charset, "replace")
            except LookupError:
                text = payload.decode("utf-8", "replace")
            content.append({"type": ctype, "value": text})
            continue
        cid = _raw(part, "Content-ID")
        att = {
            "content": base64.b64encode(payload).decode(),
            "type": ctype,
            "filename": _header(filename or "") or "attachment",
            # A part with a Content-ID and no disposition (an image of a
            # multipart/related HTML body, as most mail writers make it) is
            # shown where the HTML's cid: names it: v3 uses content_id only
            # with "inline" (as "attachment", the image came apart from the
            # HTML: a broken image and an attachment).
            "disposition": disp or ("inline" if cid else "attachment"),
        }
        if cid:
            att["content_id"] = _header(cid).strip("<>")
        attachments.append(att)
    content.sort(key=lambda c: c["type"] != "text/plain")  # v3: text/plain first
    # v3 refuses a request without content or with an empty value (400 "The
    # content value must be a string at least one character in length"): a
    # message of attachments only, or with an empty body, which SMTP takes, has
    # one space for its body (before, it bounced, every recipient).
    for c in content:
        c["value"] = c["value"] or " "
    doc["content"] = content or [{"type": "text/plain", "value": " "}]
    if attachments:
        doc["attachments"] = attachments
    return doc


class SendGridTransport(HTTPTransport):
    many_envelopes = True  # personalizations: several envelopes of one campaign a request

    def __init__(self, spec: Any, secret: bytes) -> None:
        super().__init__(spec, secret)
        self.url = (spec.endpoint or "https://api.sendgrid.com") + PATH
        self.auth = "Bearer " + spec.secrets["api_key"]

    def take(
        self,
        pending: collections.deque[Envelope],
        max_rcpts: int,
        same: Callable[[Envelope, Envelope], bool],
    ) -> list[Envelope]:
        first = pending.popleft()
        out = [first]
        n = len(first.rcpts)
        seen = {r.lower() for r in first.rcpts}
        while pending and same(first, pending[0]) and n + len(pending[0].rcpts) <= max_rcpts:
            low = [r.lower() for r in pending[0].rcpts]
            if not seen.isdisjoint(low):
                # v3 refuses a request naming an address twice ("Each unique email
                # address in the personalizations array should only be included
                # once", naming no personalization): a second message to it (kept
                # duplicates, a case variant) goes in the next request. Before,
                # the request was refused whole and all its recipients bounced.
                break
            e = pending.popleft()
            n += len(e.rcpts)
            seen.update(low)
            out.append(e)
        return out

    def body(self, envs: list[Envelope]) -> bytes:
        return self._body(envs[0].data, [p for env in envs for p in _pairs(env)])

    def _body(self, data: bytes, pairs: list[tuple[str, object]]) -> bytes:
        doc = mime_to_v3(data)
        names = _to_names(data)
        pers: list[dict[str, Any]] = []
        for rcpt, mid in pairs:
            to = {"email": rcpt}
            if name := names.get(rcpt.lower()):
                to["name"] = name
            p: dict[str, Any] = {"to": [to]}
            if isinstance(mid, int) and self.secret:
                p["custom_args"] = {"fastsend": msgid.token(mid, self.secret)}
            pers.append(p)
        doc = {"personalizations": pers, **doc}
        return orjson.dumps(doc)

    async def _post(self, session: Any, body: bytes) -> tuple[int, bytes, str, float, str]:
        headers = {"Authorization": self.auth, "Content-Type": "application/json"}
        timeout = self.client_timeout()
        async with session.post(
            self.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as r:
            raw = await r.read()
            if 300 <= r.status < 400:  # never followed: where it points is the text
                raw = r.headers.get("Location", "").encode()
            return (
                r.status,
                raw,
                r.headers.get("X-Message-Id", ""),
                retry_after(r.headers.get("Retry-After")),
                r.headers.get("X-RateLimit-Reset", ""),
            )

    async def request(self, session: Any, envs: list[Envelope]) -> Answer:
        body = self.body(envs)
        status, raw, mid, ra, reset = await self._post(session, body)
        if 200 <= status < 300:
            if not mid:
                return not_the_api(envs, self.label, status, raw)
            return delivered(envs, self.label, mid, f"{self.label} accepted as {mid}")
        if 300 <= status < 400:
            return answered(envs, map_status(self.label, status, raw.decode("utf-8", "replace")))
        text = _errors(raw)
        if status in PAUSE_STATUSES:
            if not ra and reset.isdigit() and status == 429:
                ra = max(0.0, int(reset) - time.time())
            return Throttled(ra, text, status)
        if status == 400 and b"personalizations." in raw and sum(len(e.rcpts) for e in envs) > 1:
            # SendGrid refuses the whole request for the personalizations it
            # does not take (recipients), naming each ("personalizations.3.to.0.
            # email"): those bounce and the others go again in one request (not
            # one request each: up to 1,000 in a row, outside the lane's rate).
            # Errors that name no personalization: each recipient alone.
            refused = _refused(raw, sum(len(e.rcpts) for e in envs))
            if refused:
                return await self.without(session, envs, refused)
            return await self.bisect(session, envs)
        return answered(envs, map_status(self.label, status, text))

    async def without(
        self, session: Any, envs: list[Envelope], refused: dict[int, str]
    ) -> list[TxnResult]:
        """``envs`` answered: the recipients at the personalization indexes of
        ``refused`` failed with its texts, the others sent again in one request
        (which may refuse some of them in turn)."""
        units = [(n, k) for n, env in enumerate(envs) for k in range(len(env.rcpts))]
        outs, qids = await self.subset(
            session, envs, [u for i, u in enumerate(units) if i not in refused]
        )
        for i, u in enumerate(units):
            if i in refused:
                outs[u] = rejected(self.label, 400, refused[i])
        return [
            TxnResult(env.tag, [outs[(n, k)] for k in range(len(env.rcpts))], qids.get(n, ""))
            for n, env in enumerate(envs)
        ]


def _leaves(msg: Any) -> Iterator[Any]:
    """The parts of ``msg`` that are not multipart, in order, an attached
    message (message/rfc822, message/global, ...) counted as one part, not
    gone into as ``Message.walk`` does."""
    if msg.get_content_maintype() == "multipart" and msg.is_multipart():
        for sub in msg.get_payload():
            yield from _leaves(sub)
    else:
        yield msg


def _inner(part: Any) -> bytes:
    """An attached message's octets (compat32 parsed them into Message objects:
    written back as read, CRLF line ends)."""
    body = part.get_payload()
    if not isinstance(body, list):  # encoded, or not parsed as a message
        raw = part.get_payload(decode=True)
        return raw if isinstance(raw, bytes) else str(body).encode("utf-8", "surrogateescape")
    buf = io.BytesIO()
    for sub in body:
        email.generator.BytesGenerator(buf, mangle_from_=False).flatten(sub, linesep="\r\n")
    return buf.getvalue()


def _to_names(data: bytes) -> dict[str, str]:
    """Lowercased address -> display name of the message's To header (SendGrid
    writes To from the personalization: "Ann Lee <ann@...>" reached the
    recipient as "ann@..." unless its name goes there too)."""
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data
    if b"to:" not in head.lower():
        return {}
    msg = email.message_from_bytes(head + b"\r\n")
    values = [_utf8(str(v)).replace("\r\n", "").replace("\n", "")
              for k, v in msg.raw_items() if k.lower() == "to"]  # fmt: skip
    out: dict[str, str] = {}
    for name, addr in email.utils.getaddresses(values):
        if name and addr:
            out.setdefault(addr.lower(), _header(name))
    return out


def _pairs(env: Envelope) -> list[tuple[str, object]]:
    """(recipient, message id) of each of an envelope's recipients."""
    ids = env.tag if isinstance(env.tag, list) else [env.tag] * len(env.rcpts)
    return list(zip(env.rcpts, ids, strict=False))


_PERSONALIZATION = re.compile(r"personalizations\.(\d+)\.")


def _refused(raw: bytes, n: int) -> dict[int, str]:
    """Personalization index -> SendGrid's text, when every error of a 400
    names one of the ``n`` personalizations sent (else empty: the refusal is
    about more than recipients)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list) or not errors:
        return {}
    out: dict[int, str] = {}
    for e in errors:
        m = _PERSONALIZATION.match(str(e.get("field") or "")) if isinstance(e, dict) else None
        if m is None or int(m.group(1)) >= n:
            return {}
        out[int(m.group(1))] = f"{e.get('message', '')} (field {e['field']})"
    return out


def _errors(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:300].decode("utf-8", "replace")
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        parts = []
        for e in doc["errors"][:5]:
            if isinstance(e, dict):
                f = e.get("field")
                parts.append(f"{e.get('message', '')}" + (f" (field {f})" if f else ""))
        return "; ".join(parts)
    return raw[:300].decode("utf-8", "replace")
