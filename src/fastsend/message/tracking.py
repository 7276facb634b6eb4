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
    A token is ``b64url(nonce) "." b64url(AES-256-GCM(payload))``: the
    payload is the kind letter (``o`` open, ``c`` click, ``u`` unsubscribe)
    followed by the message id, the recipient, (clicks) the target URL, the
    tenant and the expiry (Unix seconds), joined by LF; the key is derived
    from the installation secret. Encryption keeps the recipient (and the
    rest) unreadable to whoever sees the link; the GCM tag authenticates all
    of it, so nothing can be changed: the kind (an open token is never a
    click or an unsubscribe), the URL (no open redirect), the tenant (the
    endpoint checks it against the message's owner) or the expiry (links
    answer 404 after it: ``[tracking] link_ttl_days``, default 90 for opens
    and clicks, at least 365 for unsubscribe links). Verification needs no
    state: the tracking endpoints answer without touching the spool.

    Links signed before tokens were encrypted (``b64url(payload) "."
    b64url(HMAC-SHA256(secret, payload)[:16])``, no tenant, no expiry) are
    still accepted by :func:`open_legacy` until ``link_ttl_days`` after the
    installation's upgrade (recorded once in the spool), bound to the tenant
    of the message they name.

    URLs built on ``base_url``: ``/t/o/<token>.gif`` (open pixel),
    ``/t/c/<token>`` (click), ``/u/<token>`` (unsubscribe page and RFC 8058
    one-click POST), served by :mod:`fastsend.serve.tracking`.

    HTML rewriting happens when a campaign is compiled: every ``href`` of an
    ``<a>``/``<area>`` element becomes a placeholder ``{{ _fs.lN }}`` and the
    original URL a small template of its own (it may contain ``{{ }}``
    placeholders, their values percent-encoded for the part of the URL
    they stand in, as in an untracked link: template.url_escapes); a 1x1
    pixel ``<img src="{{ _fs.o }}">`` goes before
    ``</body>`` (or at the end). Per recipient only the signed URLs are
    computed and spliced. A link whose rendered URL is not http(s), that
    carries ``data-fs-notrack``, or whose tracked URL would be longer than
    ``MAX_LINK`` (no request line could carry it), keeps its original URL. The
    link is the tag's attribute named ``href`` (quoted or not; spaces at its ends
    stripped, as browsers do), never ``data-href`` or words inside another value,
    of an ``<a>``, ``<area>`` or VML element (``<v:roundrect href>``: the button
    Outlook for Windows draws). An ``<a>`` whose text shows an address (a URL or
    ``www.``...) keeps its URL: tracked, its text's host would not be the link's
    host, which Thunderbird's scam detection (and filters) flag as phishing.

    With ``text_links = true`` (and ``clicks``) the text part's http(s) URLs are
    tracked too, found as mail clients linkify them (up to white space, ``<``,
    ``>`` or ``"``; trailing punctuation and an unbalanced ``)`` are the
    sentence's), each a ``{{ _fs.tN }}`` placeholder whose value is not
    HTML-escaped; ``{{ unsubscribe_url }}`` and other schemes stay as written.

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
import bisect
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from fastsend.message.errors import CampaignError
from fastsend.message.template import Template, UnsafeValue, url_escapes, url_scheme_unsafe

__all__ = [
    "CLICK",
    "OPEN",
    "SECRET_ENV",
    "UNSUBSCRIBE",
    "Tracker",
    "ensure_secret",
    "load_secret",
    "open_legacy",
    "open_token",
    "set_link_ttl",
    "set_process_secret",
    "sign",
    "verify",
]

OPEN, CLICK, UNSUBSCRIBE = "o", "c", "u"
_FIELDS = {OPEN: 2, CLICK: 3, UNSUBSCRIBE: 2}
MAC_LEN = 16  # octets of HMAC-SHA256 kept: 128 bits
# Longer tokens are refused before any decoding. A click link's request line
# ("GET <base path>/t/c/<token> HTTP/1.1") must fit the 8,190 octets aiohttp (and a
# proxy's usual 8 KB buffer) take: a link whose token would be longer is left as it is
# (untracked, working) rather than sent dead (issue: a 3,000-octet URL was a 404).
MAX_TOKEN = 7900
MAX_LINK = 8000  # the longest tracked click URL (base URL included) put in a message
SECRET_ENV = "FASTSEND_TRACKING_SECRET_FILE"
TRACKING_KEYS = {
    "opens", "clicks", "text_links", "unsubscribe", "base_url", "secret_file", "tenant",
}  # fmt: skip

# A start tag of <a> or <area>, and one attribute inside it (HTML's tokenizer, in
# short: a name, then "=" and a double-quoted, single-quoted or unquoted value). The
# attributes are read one after the other so that "href" is the attribute of that
# name, not the end of another's name ("data-href") or words inside a value.
# Outlook for Windows draws a "bulletproof button" from the VML element in an
# <!--[if mso]> comment (<v:roundrect href=...>) and never shows the <a> beside it:
# VML elements' hrefs are links too.
_LINK_TAG = re.compile(r"<(?:a|area|v:[a-z]+)\b[^<>]*>", re.IGNORECASE)
_TAG_NAME = re.compile(r"<[A-Za-z][A-Za-z0-9:]*")
_A_END = re.compile(r"</a\s*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<[^<>]*>")
# Link text that shows an address (a URL, or www.host...): the link stays as written,
# or Thunderbird's scam detection (the link text's host vs the href's) and filters
# that compare them warn of phishing on every such tracked link.
_URL_TEXT = re.compile(r"(?:[a-z][a-z0-9+.\-]*://|www\.)\S+", re.IGNORECASE)
_ATTRIBUTE = re.compile(r"""([^\s"'<>/=]+)(\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'<>=`]+)))?""")
_BETWEEN = re.compile(r"[\s/]*")
_HTML_SPACE = "\t\n\f\r "  # stripped from both ends of a URL attribute (HTML's rule)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
# A URL in a text part, as mail clients linkify one: http(s):// up to white space or
# <>" (placeholders inside it kept whole); trailing punctuation is the sentence's.
_TEXT_URL = re.compile(r"""https?://(?:[^\s<>"{}]|\{\{[^{}]*\}\})+""", re.IGNORECASE)
_TRAILING = ".,;:!?'"
_PIXEL = (
    '<img src="{{ _fs.o }}" width="1" height="1" alt="" '
    'style="display:block;border:0;width:1px;height:1px" />'
)


LINK_TTL = 90 * 86400.0  # seconds an open/click token stays valid (config: link_ttl_days)
# Links rewritten a message, as SendGrid's click tracking ("up to 1000 links per
# email"): each is signed per recipient (an AES-GCM token, ~30 us), so 60,000
# links made each message 1.3 s of a worker's loop; the rest stay as written.
MAX_TRACKED_LINKS = 1000
UNSUBSCRIBE_TTL_MIN = 365 * 86400.0  # unsubscribe links outlive clicks (CAN-SPAM, RFC 8058)
_AAD = b"fastsend-tracking-v2"
_KEYS: dict[bytes, Any] = {}
_TTL: list[float] = [LINK_TTL]


def set_link_ttl(seconds: float) -> None:
    """How long tokens signed from now on in this process (and its forks) stay valid."""
    if not seconds > 0:
        raise ValueError("link ttl must be positive")
    _TTL[0] = float(seconds)


def _aead(secret: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    k = _KEYS.get(secret)
    if k is None:
        if len(_KEYS) > 16:
            _KEYS.clear()
        k = _KEYS[secret] = AESGCM(hashlib.sha256(b"fastsend tracking v2\0" + secret).digest())
    return k


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """The octets of ``text``, written as :func:`_b64` writes them (ValueError else).
    A lenient decoder reads up to 16 spellings of one token alike (the spare bits of
    its last character): each would be a link of its own to whatever counts links
    by their text (serve's link_events_per_hour)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical base64url spelling")
    return data


def sign(
    secret: bytes, kind: str, *fields: str, tenant: str = "", expires: float | None = None
) -> str:
    """An encrypted, authenticated token for ``kind`` over ``fields`` (ValueError on LF)."""
    if _FIELDS.get(kind) != len(fields):
        raise ValueError(f"kind {kind!r} takes {_FIELDS.get(kind)} fields")
    if any("\n" in f for f in (*fields, tenant)):
        raise ValueError("token fields must not contain LF")
    if expires is None:
        expires = time.time() + _ttl(kind)
    payload = (kind + "\n".join((*fields, tenant, str(int(expires))))).encode("utf-8")
    nonce = os.urandom(12)
    return _b64(nonce) + "." + _b64(_aead(secret).encrypt(nonce, payload, _AAD))


def open_token(
    secret: bytes, token: str, now: float | None = None
) -> tuple[str, tuple[str, ...], str] | None:
    """``(kind, fields, tenant)`` of a genuine, unexpired token; None otherwise."""
    if not secret or len(token) > MAX_TOKEN:
        return None
    nonce_text, dot, body = token.partition(".")
    if not dot or not nonce_text or not body:
        return None
    try:
        nonce, ct = _unb64(nonce_text), _unb64(body)
    except (binascii.Error, ValueError):
        return None
    if len(nonce) != 12 or len(ct) < 17:
        return None
    from cryptography.exceptions import InvalidTag

    try:
        text = _aead(secret).decrypt(nonce, ct, _AAD).decode("utf-8")
    except (InvalidTag, UnicodeDecodeError):
        return None
    kind, parts = text[:1], text[1:].split("\n")
    n = _FIELDS.get(kind)
    if n is None or len(parts) != n + 2 or not parts[-1].isdigit():
        return None
    if int(parts[-1]) < (time.time() if now is None else now):
        return None  # expired
    return kind, tuple(parts[:n]), parts[n]


def _ttl(kind: str) -> float:
    return _TTL[0] if kind != UNSUBSCRIBE else max(_TTL[0], UNSUBSCRIBE_TTL_MIN)


def open_legacy(
    secret: bytes, token: str, since: float, now: float | None = None
) -> tuple[str, tuple[str, ...], str] | None:
    """``(kind, fields, "")`` of a genuine token of the format before encryption
    (``b64url(payload) "." b64url(HMAC-SHA256(secret, payload)[:16])``, the
    payload readable: kind letter, then the fields joined by LF), or None.

    Links already in mailboxes keep working for their natural life: such a
    token expires ``link_ttl_days`` (unsubscribe: at least 365 days) after
    ``since``, the time this installation first ran the encrypted format (the
    old format had no expiry). It names no tenant: the caller binds it to the
    owner of the message it names. The MAC covers the kind and every field
    (the click URL included), so nothing in it can be changed."""
    if not secret or len(token) > MAX_TOKEN:
        return None
    body, dot, mac_text = token.partition(".")
    if not dot or not body or not mac_text:
        return None
    try:
        payload, mac = _unb64(body), _unb64(mac_text)
    except (binascii.Error, ValueError):
        return None
    want = hmac.new(secret, payload, hashlib.sha256).digest()[:MAC_LEN]
    if len(mac) != MAC_LEN or not hmac.compare_digest(mac, want):
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    kind, fields = text[:1], tuple(text[1:].split("\n"))
    if _FIELDS.get(kind) != len(fields):
        return None
    if since + _ttl(kind) < (time.time() if now is None else now):
        return None  # past its natural life
    return kind, fields, ""


def verify(secret: bytes, token: str) -> tuple[str, tuple[str, ...]] | None:
    """``(kind, fields)`` of a genuine, unexpired token; None for anything else."""
    got = open_token(secret, token)
    return None if got is None else (got[0], got[1])


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
    for k in ("opens", "clicks", "text_links", "unsubscribe"):
        if k in out and not isinstance(out[k], bool):
            raise CampaignError(f"tracking.{k} must be true or false")
    for k in ("base_url", "secret_file", "tenant"):
        if k in out and (not isinstance(out[k], str) or not out[k]):
            raise CampaignError(f"tracking.{k} must be a non-empty string")
    base = out.get("base_url", "")
    if base and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(?:/[!-~]*)?", base):
        raise CampaignError(f"tracking.base_url is not an http(s) URL: {base!r}")
    if out.get("unsubscribe") and not base.lower().startswith("https://"):
        raise CampaignError("tracking.base_url must be https:// for unsubscribe (RFC 8058)")
    return out


def _attributes(tag: str) -> tuple[set[str], re.Match[str] | None]:
    """The attribute names (lower case) of a start ``tag`` and its first ``href``
    attribute's match (groups: 1 name, 2 "=" and the value, 3/4/5 the double-quoted,
    single-quoted or unquoted value), or None when it has no href with a value. A
    repeated attribute is ignored after its first, as HTML does."""
    names: set[str] = set()
    href = None
    pos = _TAG_NAME.match(tag).end()  # type: ignore[union-attr]  # (a _LINK_TAG match)
    while True:
        a = _ATTRIBUTE.match(tag, _BETWEEN.match(tag, pos).end())  # type: ignore[union-attr]
        if a is None:
            break
        name = a.group(1).lower()
        if name == "href" and name not in names and a.group(2) is not None:
            href = a
        names.add(name)
        pos = a.end()
    return names, href


def _shows_address(m: re.Match[str], ends: list[int]) -> bool:
    """Whether the <a> element whose start tag ``m`` matched shows an address as its
    text ("https://shop.example/a", "www.shop.example"). ``ends``: where each </a>
    of the source starts (found once: a search per link from each start tag was
    quadratic, 5.9 s for 30,000 unclosed links in 1 MB)."""
    if m.group(0)[2:3].isalnum() or m.group(0)[1:2].lower() != "a":
        return False  # <area>, <v:...>: no text of their own
    i = bisect.bisect_left(ends, m.end())
    if i == len(ends) or ends[i] - m.end() > MAX_LINK:
        return False  # (no address is that long)
    import html

    text = html.unescape(_ANY_TAG.sub("", m.string[m.end() : ends[i]])).strip()
    return _URL_TEXT.fullmatch(text) is not None


class Tracker:
    """Per-campaign tracking state: the secret, base URL and compiled link templates."""

    def __init__(
        self, secret: bytes, base_url: str, opens: bool, clicks: bool, unsubscribe: bool,
        tenant: str = "",
    ) -> None:  # fmt: skip
        self.secret = secret
        self.tenant = tenant  # set by the server in a tenant's campaign; "" for the CLI's
        self.base = base_url.rstrip("/")
        self.opens = opens
        self.clicks = clicks
        self.unsubscribe = unsubscribe
        self.links: list[Template] = []
        self.link_escapes: list[tuple[int, ...]] = []  # each link's values: url_escapes
        self.text_links: list[Template] = []  # the text part's ([tracking] text_links)
        self.text_escapes: list[tuple[int, ...]] = []
        self.has_pixel = False
        self.track_text = False  # the text part's links too ([tracking] text_links)

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
        tracker = cls(secret, t["base_url"], opens, clicks, unsub, str(t.get("tenant", "")))
        tracker.track_text = clicks and bool(t.get("text_links"))
        return tracker

    # -- compile time ---------------------------------------------------------
    def compile_html(self, source: str) -> str:
        """``source`` with links turned into placeholders and the pixel added."""
        out = source
        if self.clicks:
            closes = [e.start() for e in _A_END.finditer(out)]
            out = _LINK_TAG.sub(lambda m: self._rewrite_tag(m, closes), out)
        if self.opens:
            self.has_pixel = True
            ends = list(_BODY_END.finditer(out))
            at = ends[-1].start() if ends else len(out)
            out = out[:at] + _PIXEL + out[at:]
        return out

    def compile_text(self, source: str) -> str:
        """A text part's ``source`` with its http(s) URLs turned into placeholders
        (``[tracking] text_links``: a reader clicks them as the HTML part's links)."""
        if not self.track_text:
            return source
        return _TEXT_URL.sub(self._rewrite_text_url, source)

    def _rewrite_text_url(self, m: re.Match[str]) -> str:
        url = m.group(0)
        end = len(url)
        opened, closed = url.count("("), url.count(")")
        # "(see https://x.example/a).": the sentence's, not the URL's (a URL's own
        # balanced parentheses stay)
        while url[end - 1] in _TRAILING or (url[end - 1] == ")" and opened < closed):
            closed -= url[end - 1] == ")"
            end -= 1
        url, rest = url[:end], url[end:]
        if "{{ _fs." in url or "unsubscribe_url" in url:
            return m.group(0)
        try:
            template = Template(url)
        except ValueError:
            return m.group(0)
        n = len(self.text_links)
        if n >= MAX_TRACKED_LINKS:  # (as the HTML part's: each signed per recipient)
            return m.group(0)
        self.text_links.append(template)
        self.text_escapes.append(url_escapes(template))
        return f"{{{{ _fs.t{n} }}}}{rest}"

    def _rewrite_tag(self, m: re.Match[str], ends: list[int]) -> str:
        tag = m.group(0)
        names, h = _attributes(tag)
        if h is None or "data-fs-notrack" in names or _shows_address(m, ends):
            return tag
        quoted = h.group(3) if h.group(3) is not None else h.group(4)
        raw = quoted if quoted is not None else h.group(5)
        url = raw.strip(_HTML_SPACE)
        if "{{ _fs." in url:
            return tag
        import html  # here: ~2.5 ms to import (html.entities), needed only for links

        try:  # (entities first, then the ends: "&#32;https://..." is stripped too)
            template = Template(html.unescape(url).strip(_HTML_SPACE))
        except ValueError:
            return tag
        if "unsubscribe_url" in template.names:
            return tag  # already a signed fastsend link
        lit = template.literals[0].lower()
        if template.is_static and not lit.startswith(("http://", "https://")):
            return tag  # mailto:, tel:, #anchors, relative links stay as they are
        n = len(self.links)
        if n >= MAX_TRACKED_LINKS:
            return tag  # (the rest stay as written, as SendGrid's)
        self.links.append(template)
        self.link_escapes.append(url_escapes(template))
        start, end = h.span(2)  # '="..."' after the name: an unquoted value gets quotes
        return f'{tag[:start]}="{{{{ _fs.l{n} }}}}"{tag[end:]}'

    # -- per recipient --------------------------------------------------------
    def url(self, kind: str, *fields: str) -> str:
        tok = sign(self.secret, kind, *fields, tenant=self.tenant)
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
            tok = sign(self.secret, UNSUBSCRIBE, message_id, rcpt, tenant=self.tenant)
            out["_fs.u"] = tok
            out["unsubscribe_url"] = f"{self.base}/u/{tok}"
            variables = {**variables, "unsubscribe_url": out["unsubscribe_url"]}
        if self.has_pixel:
            out["_fs.o"] = self.url(OPEN, message_id, rcpt)
        if self.links:
            import html  # (imported by the compile that found the links: a lookup)
        for i, t in enumerate(self.links):
            target = t.render(variables, self.link_escapes[i])  # values percent-encoded
            if target.lower().startswith(("http://", "https://")) and "\n" not in target:
                link = self.url(CLICK, message_id, rcpt, target)
                # A link too long to be asked for stays as it is: it works, uncounted.
                out[f"_fs.l{i}"] = html.escape(link if len(link) <= MAX_LINK else target)
            else:
                if url_scheme_unsafe(target):  # a javascript: link from a variable
                    raise UnsafeValue(
                        f"a link starts with {url_scheme_unsafe(target)!r}:"
                        " only http, https, mailto, tel, cid or relative URLs"
                    )
                out[f"_fs.l{i}"] = html.escape(target)
        for i, t in enumerate(self.text_links):  # (plain text: nothing escaped)
            target = t.render(variables, self.text_escapes[i])
            link = target
            if target.isprintable() and " " not in target:
                link = self.url(CLICK, message_id, rcpt, target)
            out[f"_fs.t{i}"] = link if len(link) <= MAX_LINK else target
        return out
