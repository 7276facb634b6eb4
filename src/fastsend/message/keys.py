"""DKIM keys: load a PEM private key once, derive the DNS TXT record.

Keys are loaded with ``cryptography`` (OpenSSL): RSA of 1024-4096 bits or
Ed25519. The algorithm is inferred from the key. Loaded keys are cached per
path while the file does not change. Nothing here ever logs or formats private
key material; errors name the path only.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fastsend import durable
from fastsend.message.errors import KeyUnavailable

__all__ = ["DkimKeyError", "PrivateKey", "generate", "load_private_key", "public_txt", "write_key"]

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimKeyError(KeyUnavailable):
    """A key file that cannot be used for DKIM."""


def algorithm_of(key: PrivateKey) -> str:
    """``"rsa-sha256"`` or ``"ed25519-sha256"``."""
    return "ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa-sha256"


def _rsa_consistent(key: rsa.RSAPrivateKey) -> bool:
    """Whether an RSA key's numbers belong together: n = p q (both odd), e odd,
    d e = 1 modulo p - 1 and q - 1, and the CRT values derived from them. What
    OpenSSL's full check adds is a primality test of p and q: 47 ms for a
    2048-bit key, 377 for a 4096-bit one (on every send's start and every
    serve's start or reload, per key), for keys the operator's config names."""
    n = key.private_numbers()
    p, q, d, pub = n.p, n.q, n.d, n.public_numbers
    return (
        p > 2 and q > 2 and p % 2 == 1 and q % 2 == 1 and p * q == pub.n
        and pub.e > 2 and pub.e % 2 == 1
        and d * pub.e % (p - 1) == 1 and d * pub.e % (q - 1) == 1
        and n.dmp1 == d % (p - 1) and n.dmq1 == d % (q - 1) and n.iqmp * q % p == 1
    )  # fmt: skip


def parse_private_key(pem: bytes, where: str = "key") -> PrivateKey:
    try:
        # OpenSSL's RSA key check (p and q prime) is left out: _rsa_consistent below
        key = serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError) as exc:
        msg = str(exc).split("\n")[0] if "password" in str(exc).lower() else "not a PEM private key"
        raise DkimKeyError(f"{where}: {msg}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if not 1024 <= key.key_size <= 4096:
            raise DkimKeyError(f"{where}: RSA key of {key.key_size} bits (DKIM needs 1024-4096)")
        if not _rsa_consistent(key):
            raise DkimKeyError(f"{where}: not a valid RSA private key (its numbers disagree)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimKeyError(f"{where}: unsupported key type {type(key).__name__} (need RSA or Ed25519)")


def load_private_key(path: str) -> PrivateKey:
    """The private key at ``path``, cached for the process while the file is the
    same (its inode, size and modification time): a key replaced at the same path
    (a rotation) is read again, so a SIGHUP's new workers sign with it; before, the
    one first read was used until a restart."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DkimKeyError(f"cannot read DKIM key {path}: {exc.strerror}") from None
    return _load_private_key(path, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _load_private_key(path: str, _ino: int, _size: int, _mtime_ns: int) -> PrivateKey:
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"cannot read DKIM key {path}: {exc.strerror}") from None
    return parse_private_key(pem, path)


def public_p(key: PrivateKey) -> str:
    """The base64 ``p=`` value of the DNS record."""
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def public_txt(key: PrivateKey) -> str:
    """The TXT value to publish at ``selector._domainkey.domain``."""
    k = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={k}; p={public_p(key)}"


def generate(algorithm: str = "rsa", bits: int = 2048) -> PrivateKey:
    """A new key: ``rsa`` (``bits`` 1024-4096) or ``ed25519``."""
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != "rsa":
        raise DkimKeyError(f"unknown algorithm {algorithm!r} (rsa or ed25519)")
    if not 1024 <= bits <= 4096:
        raise DkimKeyError(f"RSA key size {bits} out of range 1024-4096")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(key: PrivateKey, path: str | Path, overwrite: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM with mode 0600 (created that way),
    whole or not at all: a full disk left an empty key file (which the next
    keygen called existing and a campaign "holds no key"), and ``overwrite``
    truncated the key in use before writing its successor
    (``durable.replace``; FileExistsError when it exists and not ``overwrite``)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    durable.replace(pem, os.fspath(path), 0o600, exclusive=not overwrite)
