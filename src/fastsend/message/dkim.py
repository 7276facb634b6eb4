"""DKIM signing (RFC 6376): rsa-sha256 and ed25519-sha256 (RFC 8463).

A :class:`Signer` is made once per process from campaign settings (the key is
loaded once). ``sign(headers, body)`` takes the message as the serializer
produced it, a list of ``(lower-case name, raw folded line)`` plus the body
bytes, and returns the complete ``DKIM-Signature`` header line to prepend.
The hot path is ``plan(names)`` once per header layout, then
``sign_lines(plan, lines, body)`` per message: the signed lines are picked by
index and canonicalized in one pass (``relaxed_headers``). A campaign's
messages go through ``message_signer(plan)``: a :class:`MessageSigner` makes
the whole signed message, and its compiled twin writes it in one buffer with
the body hashed where it lies (``Assembly.signed``).

Canonicalization (simple and relaxed, header and body) are twins: the
readable versions here, compiled ones in ``_dkim.pxi`` (picked at import).
The body hash is cached: when consecutive messages have the same body (no
per-recipient variables in it), it is not hashed again; so is the
``DKIM-Signature`` head within one second. The signature math is OpenSSL's
via ``cryptography``, except Ed25519 when PyNaCl is installed: libsodium is
then used (the same signature, deterministic, in ~60% of the time), and
``ed25519_sign_lines`` (twins again) does canonicalization, SHA-256 and the
signature in one call.

It deliberately does not verify (tests use dkimpy and OpenDKIM for that), does
not do l= body length limits, and never prints key material.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import operator
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from fastsend._accel import pick
from fastsend.message.keys import PrivateKey, algorithm_of, load_private_key

__all__ = [
    "DEFAULT_HEADERS",
    "OVERSIGN_ALWAYS",
    "OVERSIGN_PRESENT",
    "MessageSigner",
    "Plan",
    "Signer",
    "body_relaxed",
    "body_simple",
    "ed25519_sign_lines",
    "header_relaxed",
    "relaxed_headers",
]

# Signed when present, in this order (RFC 6376 5.4.1 recommendations + RFC 8058).
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding", "list-unsubscribe",
    "list-unsubscribe-post", "feedback-id", "list-id",
)  # fmt: skip

# Oversigning (RFC 6376 8.15, 5.4.2): a name listed in h= once more than the
# message has instances of it signs a "null" instance, so a header of that
# name added later (above the signed one, where readers look first) breaks
# the signature. The ones a reader trusts most are oversigned even when the
# message has none (an added Reply-To, Sender or Cc would be covered by the
# signature otherwise); the other single-instance ones when present. Only
# names the signer signs (its ``headers``) are oversigned.
OVERSIGN_ALWAYS = frozenset({"from", "sender", "reply-to", "to", "cc", "subject"})
OVERSIGN_PRESENT = frozenset({
    "date", "message-id", "mime-version", "content-type", "content-transfer-encoding",
    "list-unsubscribe", "list-unsubscribe-post", "feedback-id", "list-id",
    "in-reply-to", "references",
})  # fmt: skip

# Ed25519 signatures are deterministic (RFC 8032), so libsodium (through
# PyNaCl, when installed) gives the same bytes as OpenSSL, in about 60% of the time.
try:
    from nacl.bindings import crypto_sign as _sodium_sign
    from nacl.bindings import crypto_sign_seed_keypair as _sodium_keypair
except ImportError:  # pragma: no cover - PyNaCl is optional
    _sodium_sign = _sodium_keypair = None  # type: ignore[assignment]

_WSP_RUN = re.compile(rb"[ \t]+")
_TRAIL_WSP = re.compile(rb"[ \t]+\r\n")
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_TRAIL_CRLF = re.compile(rb"(?:\r\n)*\Z")


def body_relaxed(body: bytes) -> bytes:
    """RFC 6376 3.4.4: WSP runs -> one SP, no WSP at line ends, no empty lines at the end."""
    b = _WSP_RUN.sub(b" ", body)
    b = b.replace(b" \r\n", b"\r\n").rstrip(b" \t\r\n")
    return b + b"\r\n" if b else b""


def body_simple(body: bytes) -> bytes:
    """RFC 6376 3.4.3: trailing empty lines removed; ends with exactly one CRLF."""
    return _TRAIL_CRLF.sub(b"", body) + b"\r\n"


def header_relaxed(line: bytes) -> bytes:
    """RFC 6376 3.4.2 for one raw header line ``Name: value\\r\\n`` (folds allowed)."""
    name, _, value = line.partition(b":")
    value = _FOLD.sub(b"", value)
    if value.endswith(b"\r\n"):
        value = value[:-2]
    value = _WSP_RUN.sub(b" ", value).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_headers(lines: tuple[bytes, ...]) -> bytes:
    """The relaxed forms of raw header ``lines``, concatenated (the signed-header block)."""
    return b"".join([_header_relaxed_py(ln) for ln in lines])


def ed25519_sign_lines(
    lines: tuple[bytes, ...],
    sig_head: bytes,
    sig_head_c14n: bytes,
    sodium_key: bytes,
    relaxed: bool,
) -> bytes:
    """The ``DKIM-Signature`` line: ``sig_head`` and the folded base64 Ed25519 signature.

    ``lines`` are the raw header lines to sign, in ``h=`` order, canonicalized
    here (relaxed, or simple: as they are); ``sig_head_c14n`` is ``sig_head``
    canonicalized, without its final CRLF. The signature is libsodium's (needs
    PyNaCl) with ``sodium_key``, its 64-octet secret key, over the SHA-256 of
    the canonical header block (RFC 8463).
    """
    signed = _header_block(lines, sig_head_c14n, relaxed)
    sig = _sodium_sign(hashlib.sha256(signed).digest(), sodium_key)[:64]
    return _sig_line(sig_head, sig)


def _sig_line(sig_head: bytes, sig: bytes) -> bytes:
    """``sig_head``, then ``sig`` in base64 folded in lines of 72 (CRLF, two
    spaces), then CRLF: the rest of the ``DKIM-Signature`` line after ``b=``."""
    b64 = base64.b64encode(sig)
    folded = b"\r\n  ".join([b64[i : i + 72] for i in range(0, len(b64), 72)])
    return b"".join([sig_head, folded, b"\r\n"])


def _header_block(lines: tuple[bytes, ...], sig_head_c14n: bytes, relaxed: bool) -> bytes:
    """The signed header block: ``lines`` canonicalized, then ``sig_head_c14n``."""
    if relaxed:
        return _relaxed_headers_py(lines) + sig_head_c14n
    return b"".join((*lines, sig_head_c14n))


class RsaSigner:
    """rsa-sha256 signatures (RSASSA-PKCS1-v1_5 over SHA-256) with one RSA key.

    ``sign_lines(lines, sig_head, sig_head_c14n, relaxed)`` is the
    ``DKIM-Signature`` line, as :func:`ed25519_sign_lines` makes it. The
    compiled twin parses the key once into libcrypto and keeps one signing
    context for every message (``cryptography`` makes one per call).
    """

    def __init__(self, key: Any) -> None:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("RsaSigner needs an RSA private key")
        self.key = key
        self.size = key.key_size // 8
        self._padding = padding.PKCS1v15()
        self._sha256 = hashes.SHA256()

    def sign_lines(
        self, lines: tuple[bytes, ...], sig_head: bytes, sig_head_c14n: bytes, relaxed: bool
    ) -> bytes:
        signed = _header_block(lines, sig_head_c14n, relaxed)
        return _sig_line(sig_head, self.key.sign(signed, self._padding, self._sha256))


PREFIX_MIN = 256  # octets of a common body prefix worth keeping a SHA-256 state for


class BodyHasher:
    """``bh=`` of bodies (RFC 6376 3.7): base64 SHA-256 of the canonical body,
    doing once the work consecutive bodies share.

    The same body as the last one is not hashed again. Bodies that differ per
    recipient usually share a prefix (the static text before the first
    per-recipient value: a newsletter personalised in its footer shares nearly
    all of it): the SHA-256 state after the longest 64-octet-aligned prefix
    two consecutive bodies share (at least ``PREFIX_MIN`` octets) is kept, and
    a body starting with those octets only hashes the rest (hashlib
    ``.copy()`` of the state). The compiled twin keeps libcrypto's state.
    """

    def __init__(self, relaxed: bool) -> None:
        self.relaxed = relaxed
        self.last: bytes | None = None  # the last canonical body
        self.last_bh = b""
        self.prefix = 0  # octets of a body hashed into ``state``
        self.state: Any = None

    def __call__(self, body: bytes) -> bytes:
        canon = _body_relaxed_py(body) if self.relaxed else _body_simple_py(body)
        last = self.last
        if last is not None and (last is canon or last == canon):
            return self.last_bh
        k = self.prefix
        if not (k and canon[:k] == last[:k]):  # type: ignore[index]
            k = 0
            if last is not None:
                n = min(len(canon), len(last))
                while k + 64 <= n and canon[k : k + 64] == last[k : k + 64]:
                    k += 64
            if k >= PREFIX_MIN:
                self.state = hashlib.sha256(canon[:k])
            else:
                k, self.state = 0, None
            self.prefix = k
        if k:
            h = self.state.copy()
            h.update(canon[k:])
        else:
            h = hashlib.sha256(canon)
        self.last, self.last_bh = canon, base64.b64encode(h.digest())
        return self.last_bh


class MessageSigner:
    """Whole messages signed by one :class:`Signer`, laid out as one
    :class:`Plan` says: ``message(lines, body)`` is the ``DKIM-Signature``
    line, the header ``lines``, the empty line and ``body``, in one bytes
    object (what ``Signer.sign_lines`` signs, joined). ``Signer.message_signer``
    makes one; a :class:`~fastsend.message.mime.Assembly` holding one makes
    its messages signed (``Assembly.signed``).

    The compiled twin (``_dkim.pxi``) does the same in one buffer: the
    Assembly writes the header lines and the body after room kept for the
    signature, the body is hashed where it lies (``BodyHasher``), then the
    header block is signed and the line written into that room -- no body
    copied, no join (rsa-sha256 by the compiled ``RsaSigner``, Ed25519 by
    libsodium; any other key through the Signer, as here)."""

    def __init__(self, signer: Signer, plan: Plan) -> None:
        self.signer, self.plan = signer, plan

    def message(self, lines: Sequence[bytes], body: bytes) -> bytes:
        return b"".join([self.signer.sign_lines(self.plan, lines, body), *lines, b"\r\n", body])


_header_relaxed_py = header_relaxed
_relaxed_headers_py = relaxed_headers
_body_relaxed_py = body_relaxed
_body_simple_py = body_simple

# The readable twins, by name (tests run both; the compiled ones are picked).
PURE = {
    "body_relaxed": body_relaxed,
    "body_simple": body_simple,
    "header_relaxed": header_relaxed,
    "relaxed_headers": relaxed_headers,
    "ed25519_sign_lines": ed25519_sign_lines,
    "BodyHasher": BodyHasher,
    "RsaSigner": RsaSigner,
    "MessageSigner": MessageSigner,
}
body_relaxed = pick(body_relaxed)
body_simple = pick(body_simple)
header_relaxed = pick(header_relaxed)
relaxed_headers = pick(relaxed_headers)
ed25519_sign_lines = pick(ed25519_sign_lines)
PyBodyHasher = BodyHasher
PyRsaSigner = RsaSigner
PyMessageSigner = MessageSigner
if not TYPE_CHECKING:
    BodyHasher = pick(PyBodyHasher)
    RsaSigner = pick(PyRsaSigner)
    MessageSigner = pick(PyMessageSigner)


def rsa_signer(key: rsa.RSAPrivateKey) -> RsaSigner:
    """The :class:`RsaSigner` of ``key``: one per key object (keys are cached
    per path, ``load_private_key``), so the compiled one parses the key into
    libcrypto once per process, not once per campaign compiled."""
    return _rsa_signer(RsaSigner, key)


@functools.lru_cache(maxsize=64)
def _rsa_signer(cls: type[RsaSigner], key: rsa.RSAPrivateKey) -> RsaSigner:
    return cls(key)


class Plan(NamedTuple):
    """Which lines of a fixed header layout a :class:`Signer` signs (``idx``:
    their positions, in ``h=`` order; ``pick``: them, from the lines), and its
    ``h=`` part."""

    pick: Callable[[Sequence[bytes]], tuple[bytes, ...]]
    h_part: bytes
    idx: tuple[int, ...] = ()


def _picker(idx: tuple[int, ...]) -> Callable[[Sequence[bytes]], tuple[bytes, ...]]:
    if len(idx) == 1:
        i = idx[0]
        return lambda lines: (lines[i],)
    return operator.itemgetter(*idx)


def _fold_names(names: Sequence[str]) -> bytes:
    """``a:b:c`` for the h= tag, folded before a colon so that no line of the
    ``DKIM-Signature`` passes 78 characters (FWS is allowed there, RFC 6376 3.5)."""
    lines: list[str] = []
    line = " h="
    for i, n in enumerate(names):
        tok = n if i == 0 else ":" + n
        if len(line) + len(tok) > 76 and i:
            lines.append(line)
            line = " "
        line += tok
    lines.append(line)
    return "\r\n".join(lines)[3:].encode("ascii")


class Signer:
    """Signs messages for one (domain, selector, key)."""

    def __init__(
        self,
        domain: str,
        selector: str,
        key: PrivateKey,
        canonicalization: str = "relaxed/relaxed",
        headers: Sequence[str] = DEFAULT_HEADERS,
    ) -> None:
        hc, _, bc = canonicalization.partition("/")
        if hc not in ("relaxed", "simple") or bc not in ("relaxed", "simple"):
            raise ValueError(f"bad canonicalization {canonicalization!r}")
        self.domain = domain
        self.selector = selector
        self.key = key
        self.algorithm = algorithm_of(key)
        self._sodium_key: bytes | None = None  # libsodium's secret key (seed + public key)
        if isinstance(key, ed25519.Ed25519PrivateKey) and _sodium_keypair is not None:
            seed = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            self._sodium_key = _sodium_keypair(seed)[1]
        self._hrelaxed = hc == "relaxed"
        self._brelaxed = bc == "relaxed"
        self.headers = tuple(h.lower() for h in headers)
        if "from" not in self.headers:
            raise ValueError("DKIM must sign From")
        self._head = (
            f"DKIM-Signature: v=1; a={self.algorithm}; c={canonicalization};\r\n"
            f" d={domain}; s={selector};\r\n t="
        ).encode("ascii")
        self._body_hash = BodyHasher(self._brelaxed)
        self._last_head: tuple[int, Plan | None, bytes, bytes] = (-1, None, b"", b"")
        self._plans: dict[tuple[str, ...], Plan] = {}
        self._rsa = rsa_signer(key) if isinstance(key, rsa.RSAPrivateKey) else None

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> Signer:
        """From a normalised campaign ``[dkim]`` entry (loads the key, cached)."""
        return cls(
            s["domain"],
            s["selector"],
            load_private_key(s["key"]),
            s.get("canonicalization", "relaxed/relaxed"),
            s.get("headers") or DEFAULT_HEADERS,
        )

    def body_hash(self, body: bytes) -> bytes:
        """base64 SHA-256 of the canonical body (:class:`BodyHasher`: not made
        again while the body repeats, a shared prefix hashed once)."""
        return self._body_hash(body)  # type: ignore[no-any-return]

    def plan(self, names: Sequence[str]) -> Plan:
        """The signing plan for messages whose header lines are named ``names`` (lower case).

        Made once per header layout (a :class:`~fastsend.message.mime.Renderer`
        has one), so per message nothing is looked up by name.
        """
        # Each name's lines, bottom up: the first h= entry of a name signs its
        # last instance, the next one the instance above (RFC 6376 5.4.2).
        pos: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            pos.setdefault(n, []).insert(0, i)
        wanted = list(dict.fromkeys(self.headers))
        if "list-unsubscribe-post" in pos:  # RFC 8058 4: one-click needs both signed
            wanted += [n for n in ("list-unsubscribe", "list-unsubscribe-post") if n not in wanted]
        signed = [n for n in wanted if n in pos]
        idx = [pos[n][0] for n in signed]
        h_names = list(signed)
        # Then each oversigned name's other instances (a message with one has
        # none) and once more: no line of the message is picked for that
        # entry (a verifier signs it as an empty header), so adding a header
        # of that name breaks the signature (``OVERSIGN_ALWAYS``,
        # ``OVERSIGN_PRESENT``; a name listed twice in ``headers`` too).
        twice = {n for n in wanted if self.headers.count(n) > 1}
        for n in wanted:
            if n in OVERSIGN_ALWAYS or n in twice or (n in OVERSIGN_PRESENT and n in pos):
                rest = pos.get(n, [])[1:]
                idx += rest
                h_names += [n] * (len(rest) + 1)
        h_part = b";\r\n h=" + _fold_names(h_names) + b";\r\n bh="
        return Plan(_picker(tuple(idx)), h_part, tuple(idx))

    def message_signer(self, plan: Plan) -> MessageSigner:
        """The :class:`MessageSigner` of messages laid out as ``plan`` says (the
        compiled one when the core is built: the whole signed message written
        in one buffer)."""
        return MessageSigner(self, plan)

    def _sig_head(self, plan: Plan, bh: bytes) -> tuple[bytes, bytes]:
        """The DKIM-Signature line up to ``b=``, and its canonical form without the final CRLF.

        The part before the body hash depends only on the second and the plan:
        it (and its canonical form) is made once and reused while those stay
        the same. A body hash is base64 (no white space), so relaxed
        canonicalization of the whole is that of the part before it, the hash,
        and ``; b=`` (the fold removed).
        """
        now = int(time.time())
        cached = self._last_head
        if cached[0] != now or cached[1] is not plan:
            pre = b"".join([self._head, b"%d" % now, plan.h_part])
            pre_c14n = relaxed_headers((pre,))[:-2] if self._hrelaxed else pre
            cached = self._last_head = (now, plan, pre, pre_c14n)
        head = cached[2] + bh + b";\r\n b="
        return head, (cached[3] + bh + b"; b=" if self._hrelaxed else head)

    def sign_lines(self, plan: Plan, lines: Sequence[bytes], body: bytes) -> bytes:
        """The ``DKIM-Signature: ...\\r\\n`` line for header ``lines`` laid out as ``plan`` says."""
        sig_head, sig_head_c14n = self._sig_head(plan, self._body_hash(body))
        if self._sodium_key is not None:
            return ed25519_sign_lines(
                plan.pick(lines), sig_head, sig_head_c14n, self._sodium_key, self._hrelaxed
            )
        if self._rsa is not None:
            return self._rsa.sign_lines(  # type: ignore[no-any-return]
                plan.pick(lines), sig_head, sig_head_c14n, self._hrelaxed
            )
        # Ed25519 without PyNaCl: OpenSSL through cryptography.
        signed = _header_block(plan.pick(lines), sig_head_c14n, self._hrelaxed)
        sig = self.key.sign(hashlib.sha256(signed).digest())  # type: ignore[call-arg]
        return _sig_line(sig_head, sig)

    def sign(self, headers: Sequence[tuple[str, bytes]], body: bytes) -> bytes:
        """The ``DKIM-Signature: ...\\r\\n`` line for ``(lower-case name, raw line)`` pairs."""
        names = tuple(n for n, _ in headers)
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plans[names] = self.plan(names)
        return self.sign_lines(plan, [ln for _, ln in headers], body)
