"""Provider control headers: taken out of every message a route carries.

SES reads ``X-SES-*`` headers of the raw message it is given (API or SMTP):
``X-SES-CONFIGURATION-SET`` picks the configuration set (and so where its
bounce and complaint events go), ``X-SES-SOURCE-ARN`` / ``-FROM-ARN`` /
``-RETURN-PATH-ARN`` send on another identity's authorization,
``X-SES-MESSAGE-TAGS`` tags it. SendGrid's SMTP relay reads ``X-SMTPAPI``
(recipients to add, unsubscribe groups, filters that turn tracking off,
a send time). Mailgun reads ``X-Mailgun-*`` (a sending IP or IP pool,
``X-Mailgun-Require-TLS`` / ``-Skip-Verification``, ``X-Mailgun-Variables``
that its webhooks echo, a delivery time, tracking). In the content of a
tenant's message (campaign ``[headers]``, raw MIME from the API or SMTP
submission) they would let the tenant send to addresses fastsend never
accepted nor checked against suppression, from another tenant's dedicated
IP, or with its bounces and complaints sent where fastsend never hears of
them. fastsend sets what the provider needs from the transport's own
settings (SES ``configuration_set``, the id tokens): these are removed before
the message leaves by a route that names transports (relays, providers and
``smtp`` in such a route). Not signed by DKIM unless the operator lists them
(``DEFAULT_HEADERS`` does not), so the signature holds.
"""

from __future__ import annotations

import re

# A control header's field name at the start of a header line.
_CONTROL = re.compile(rb"(?im)^(?:x-ses-[!-9;-~]*|x-smtpapi|x-mailgun-[!-9;-~]*)[ \t]*:")


def is_control(name: str) -> bool:
    """``name`` (a header field name) is a provider control header."""
    return _CONTROL.match(name.encode("ascii", "replace") + b":") is not None


def strip(data: bytes) -> bytes:
    """``data`` (CRLF line ends) without its provider control header fields
    (each with its folded continuation lines); the same object when it has none."""
    end = data.find(b"\r\n\r\n")
    head_end = end + 2 if end >= 0 else len(data)
    if _CONTROL.search(data, 0, head_end) is None:
        return data
    out: list[bytes] = []
    dropping = False
    for line in data[:head_end].split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # a continuation of the field above
            if not dropping:
                out.append(line)
            continue
        dropping = _CONTROL.match(line + b"\r\n") is not None
        if not dropping:
            out.append(line)
    return b"\r\n".join(out) + data[head_end:]
