"""Message ids on the wire: the token is the documented MAC, and parse() verifies it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random

from fastsend import _accel, msgid


def reference(row_id: int, secret: bytes) -> str:
    """The format as documented: the first 50 bits of HMAC-SHA256 under the id key,
    lower-case base32 (written with the standard library's slow, obvious calls)."""
    key = hmac.new(secret, b"fastsend message id v1", hashlib.sha256).digest()
    digest = hmac.new(key, str(row_id).encode(), hashlib.sha256).digest()
    return f"{row_id}-{base64.b32encode(digest[:7]).decode().lower()[:10]}"


def test_token_is_the_documented_mac(impl: str) -> None:
    """Both twins (the pure one and the compiled one on libcrypto) give the documented MAC."""
    token = msgid.PURE["token"] if impl == "py" else _accel.compiled("token")
    rng = random.Random(11)
    for secret in (b"x", b"s" * 64, b"k" * 200, bytes(range(40))):
        # (the compiled twin writes an int's digits itself within 64 bits: its edges)
        edges = [-1, -5, -9, -10, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**19, 10**70, True]
        for row_id in [*range(300), *edges, *(rng.randrange(10**18) for _ in range(2000))]:
            assert token(row_id, secret) == reference(row_id, secret)
    assert token(7, b"") == "7"


def test_parse_verifies() -> None:
    secret = b"installation secret"
    tok = msgid.token(4242, secret)
    assert msgid.parse(tok, secret) == 4242
    assert msgid.parse(tok.upper(), secret) == 4242
    assert msgid.parse(tok[:-1] + ("a" if tok[-1] != "a" else "b"), secret) is None
    assert msgid.parse(tok, b"other secret") is None
    assert msgid.token(7, b"") == "7" and msgid.parse("7", b"") == 7
