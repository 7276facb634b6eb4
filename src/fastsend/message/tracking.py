"""Signed tracking links: open pixel, click redirects and unsubscribe URLs.

NAME
    fastsend.message.tracking -- sign/verify tokens, rewrite HTML once per campaign.

SUMMARY
    secret = load_secret("/etc/fastsend/tracking.key")
    tok = sign(secret, CLICK, "42", "ann@example.org", "https://example.com/a")
    verify(secret, tok)  # -> ("c", ("42", "ann@example.org", "https://example.com/a"))
    t = Tracker.from_spec(spec["tracking"])            # None when tracking is off
    html = t.compile_html(spec["html"])                # once: links -> placeholders
    vs.update(t.variables(rcpt, vs, message_id))      # per recipient: signed URLs only

DESCRIPTION
    A token is ``b64url(payload) "." b64url(mac)`` where payload is the kind
    letter (``o`` open, ``c`` click, ``u`` unsubscribe) followed by the
    message id, the recipient and (clicks) the target URL, joined by LF, and
    mac is the first 16 octets of HMAC-SHA256(secret, payload). The kind is
    inside the MAC, so an open token can never be replayed as a click or an
    unsubscribe; the URL is inside it, so a click link cannot be turned into
    an open redirect. Verification is constant-time (hmac.compare_digest) and
    needs no state: the tracking endpoints answer without touching the spool.

    URLs built on ``base_url``: ``/t/o/<token>.gif`` (open pixel),
    ``/t/c/<token>`` (click), ``/u/<token>`` (unsubscribe page and RFC 8058
    one-click POST), served by :mod:`fastsend.serve.tracking`.

    HTML rewriting happens when a campaign is compiled: every ``href`` of an
    ``<a>``/``<area>`` element becomes a placeholder ``{{ _fs.lN }}`` and the
    original URL a small template of its own (it may contain ``{{ }}``
    placeholders); a 1x1 pixel ``<img src="{{ _fs.o }}">`` goes before
    ``</body>`` (or at the end). Per recipient only the signed URLs are
    computed and spliced. A link whose rendered URL is not http(s), or that
    carries ``data-fs-notrack``, keeps its original URL.

    Tracking is on when the table has a ``base_url`` and at least one of
    ``opens``, ``clicks``, ``unsubscribe``; without base_url the table is
    only stored. With ``unsubscribe`` the List-Unsubscribe header carries the
    signed ``/u/`` URL (plus List-Unsubscribe-Post: One-Click) instead of
    ``[list_unsubscribe] url``, and ``{{ unsubscribe_url }}`` can be used in
    the bodies.

    The secret never travels in a campaign spec (specs are stored in the
    spool). It comes from, in order: the ``[tracking]`` table's
    ``secret_file``; the process secret set by :func:`set_process_secret`
    (``fastsend serve`` sets it from its context before forking workers, which
    inherit it); the file named by ``$FASTSEND_TRACKING_SECRET_FILE``.

DELIBERATELY NOT HERE
    No HTML parser (a tolerant regex over start tags, so odd markup is left
    untouched rather than rewritten wrongly), no key rotation (one secret;
    rotating it invalidates old links), no bot/prefetch filtering.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any

from fastsend.message.errors import CampaignError
from fastsend.message.template import Template

__all__ = [
    "CLICK",
    "OPEN",
    "SECRET_ENV",
    "UNSUBSCRIBE",
    "Tracker",
    "ensure_secret",
    "load_secret",
    "set_process_secret",
    "sign",
    "verify",
]

OPEN, CLICK, UNSUBSCRIBE = "o", "c", "u"
_FIELDS = {OPEN: 2, CLICK: 3, UNSUBSCRIBE: 2}
MAC_LEN = 16  # octets of HMAC-SHA256 kept: 128 bits
MAX_TOKEN = 4096  # longer tokens are refused before any decoding
SECRET_ENV = "FASTSEND_TRACKING_SECRET_FILE"
TRACKING_KEYS = {"opens", "clicks", "unsubscribe", "base_url", "secret_file"}

# A start tag of <a> or <area>, and an href attribute inside one (quoted values only).
_LINK_TAG = re.compile(r"<(?:a|area)\b[^<>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\bhref\s*=\s*)(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_PIXEL = (
    '<img src="{{ _fs.o }}" width="1" height="1" alt="" '
    'style="display:block;border:0;width:1px;height:1px" />'
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, kind: str, *fields: str) -> str:
    """A compact token for ``kind`` over ``fields`` (ValueError on a field with LF)."""
    if _FIELDS.get(kind) != len(fields):
        raise ValueError(f"kind {kind!r} takes {_FIELDS.get(kind)} fields")
    if any("\n" in f for f in fields):
        raise ValueError("token fields must not contain LF")
    payload = (kind + "\n".join(fields)).encode("utf-8")
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:MAC_LEN]
    return _b64(payload) + "." + _b64(mac)


def verify(secret: bytes, token: str) -> tuple[str, tuple[str, ...]] | None:
    """``(kind, fields)`` of a genuine token; None for anything forged or malformed."""
    if not secret or len(token) > MAX_TOKEN:
        return None
    body, dot, mac_text = token.partition(".")
    if not dot or not body or not mac_text:
        return None
    try:
        payload = _unb64(body)
        mac = _unb64(mac_text)
    except (binascii.Error, ValueError):
        return None
    want = hmac.new(secret, payload, hashlib.sha256).digest()[:MAC_LEN]
    if not hmac.compare_digest(mac, want):
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    kind, fields = text[:1], tuple(text[1:].split("\n"))
    if _FIELDS.get(kind) != len(fields):
        return None
    return kind, fields


# ---------------------------------------------------------------- the secret
_SECRETS: dict[str, bytes] = {}
_PROCESS_SECRET: list[bytes] = []


def set_process_secret(secret: bytes) -> None:
    """The key renderers in this process (and processes forked later) sign with."""
    if len(secret) < 16:
        raise ValueError("tracking secret shorter than 16 octets")
    _PROCESS_SECRET[:] = [secret]


def process_secret() -> bytes | None:
    return _PROCESS_SECRET[0] if _PROCESS_SECRET else None


def load_secret(path: str) -> bytes:
    """The key in ``path`` (cached per process); CampaignError if unreadable or short."""
    cached = _SECRETS.get(path)
    if cached is not None:
        return cached
    try:
        with open(path, "rb") as f:
            data = f.read().strip()
    except OSError as exc:
        raise CampaignError(f"tracking secret file {path}: {exc.strerror}") from None
    if len(data) < 16:
        raise CampaignError(f"tracking secret file {path}: key shorter than 16 octets")
    _SECRETS[path] = data
    return data


def ensure_secret(path: str) -> bytes:
    """The key in ``path``, creating it (32 random octets as hex, mode 0600) if missing."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process won the race: read its key
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(32).encode("ascii") + b"\n")
    return load_secret(path)


# ---------------------------------------------------------------- campaigns
def check_spec(t: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a campaign's ``[tracking]`` table (CampaignError naming the key)."""
    bad = set(t) - TRACKING_KEYS
    if bad:
        raise CampaignError(f"unknown [tracking] keys: {', '.join(sorted(bad))}")
    out = dict(t)
    for k in ("opens", "clicks", "unsubscribe"):
        if k in out and not isinstance(out[k], bool):
            raise CampaignError(f"tracking.{k} must be true or false")
    for k in ("base_url", "secret_file"):
        if k in out and (not isinstance(out[k], str) or not out[k]):
            raise CampaignError(f"tracking.{k} must be a non-empty string")
    base = out.get("base_url", "")
    if base and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(?:/[!-~]*)?", base):
        raise CampaignError(f"tracking.base_url is not an http(s) URL: {base!r}")
    if out.get("unsubscribe") and not base.lower().startswith("https://"):
        raise CampaignError("tracking.base_url must be https:// for unsubscribe (RFC 8058)")
    return out


class Tracker:
    """Per-campaign tracking state: the secret, base URL and compiled link templates."""

    def __init__(
        self, secret: bytes, base_url: str, opens: bool, clicks: bool, unsubscribe: bool
    ) -> None:
        self.secret = secret
        self.base = base_url.rstrip("/")
        self.opens = opens
        self.clicks = clicks
        self.unsubscribe = unsubscribe
        self.links: list[Template] = []
        self.has_pixel = False

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> Tracker | None:
        """The tracker a ``[tracking]`` table asks for, or None when everything is off."""
        t = check_spec(spec or {})
        opens, clicks = bool(t.get("opens")), bool(t.get("clicks"))
        unsub = bool(t.get("unsubscribe"))
        if not (opens or clicks or unsub) or not t.get("base_url"):
            return None
        path = t.get("secret_file")
        secret = load_secret(path) if path else process_secret()
        if secret is None:
            env = os.environ.get(SECRET_ENV)
            if not env:
                raise CampaignError(
                    "tracking needs a secret: [tracking] secret_file, fastsend serve,"
                    f" or ${SECRET_ENV}"
                )
            secret = load_secret(env)
        return cls(secret, t["base_url"], opens, clicks, unsub)

    # -- compile time ---------------------------------------------------------
    def compile_html(self, source: str) -> str:
        """``source`` with links turned into placeholders and the pixel added."""
        out = source
        if self.clicks:
            out = _LINK_TAG.sub(self._rewrite_tag, out)
        if self.opens:
            self.has_pixel = True
            ends = list(_BODY_END.finditer(out))
            at = ends[-1].start() if ends else len(out)
            out = out[:at] + _PIXEL + out[at:]
        return out

    def _rewrite_tag(self, m: re.Match[str]) -> str:
        tag = m.group(0)
        if "data-fs-notrack" in tag.lower():
            return tag
        h = _HREF.search(tag)
        if h is None:
            return tag
        url = h.group(2) if h.group(2) is not None else h.group(3)
        if "{{ _fs." in url:
            return tag
        try:
            template = Template(html.unescape(url))
        except ValueError:
            return tag
        if "unsubscribe_url" in template.names:
            return tag  # already a signed fastsend link
        lit = template.literals[0].lstrip().lower()
        if template.is_static and not lit.startswith(("http://", "https://")):
            return tag  # mailto:, tel:, #anchors, relative links stay as they are
        n = len(self.links)
        self.links.append(template)
        return f'{tag[: h.start()]}{h.group(1)}"{{{{ _fs.l{n} }}}}"{tag[h.end() :]}'

    # -- per recipient --------------------------------------------------------
    def url(self, kind: str, *fields: str) -> str:
        tok = sign(self.secret, kind, *fields)
        if kind == OPEN:
            return f"{self.base}/t/o/{tok}.gif"
        if kind == CLICK:
            return f"{self.base}/t/c/{tok}"
        return f"{self.base}/u/{tok}"

    def unsubscribe_header_template(self) -> Template:
        """The List-Unsubscribe URL as a template: only the token is a placeholder."""
        return Template(self.base + "/u/{{ _fs.u }}")

    def variables(self, rcpt: str, variables: Mapping[str, str], message_id: str) -> dict[str, str]:
        """The ``_fs.*`` values (signed URLs) for one recipient."""
        out: dict[str, str] = {}
        if self.unsubscribe:
            tok = sign(self.secret, UNSUBSCRIBE, message_id, rcpt)
            out["_fs.u"] = tok
            out["unsubscribe_url"] = f"{self.base}/u/{tok}"
            variables = {**variables, "unsubscribe_url": out["unsubscribe_url"]}
        if self.has_pixel:
            out["_fs.o"] = self.url(OPEN, message_id, rcpt)
        for i, t in enumerate(self.links):
            target = t.render(variables)
            if target.lower().startswith(("http://", "https://")) and "\n" not in target:
                out[f"_fs.l{i}"] = html.escape(self.url(CLICK, message_id, rcpt, target))
            else:
                out[f"_fs.l{i}"] = html.escape(target)
        return out
