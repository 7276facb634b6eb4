"""wkr30's audit: DKIM keys are checked without OpenSSL's primality test of
p and q (47 ms a 2048-bit key, 377 ms a 4096-bit one, on every send's and
serve's start and reload), and a key whose numbers disagree is still refused
with a clear error naming the file."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fastsend.message.keys import DkimKeyError, generate, load_private_key, parse_private_key


@dataclasses.dataclass
class _N:
    p: int
    q: int
    d: int
    dmp1: int
    dmq1: int
    iqmp: int
    n: int
    e: int


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    size = (
        bytes([n])
        if n < 128
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + size + body


def _pem(n: _N) -> bytes:
    """PKCS#1 PEM of the numbers as given (consistent or not: written by hand,
    as cryptography refuses to build some inconsistent keys)."""
    ints = (0, n.n, n.e, n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp)
    body = b"".join(_der(2, x.to_bytes(x.bit_length() // 8 + 1, "big")) for x in ints)
    b64 = base64.encodebytes(_der(0x30, body)).decode()
    return f"-----BEGIN RSA PRIVATE KEY-----\n{b64}-----END RSA PRIVATE KEY-----\n".encode()


@pytest.fixture(scope="module")
def numbers() -> _N:
    k = generate("rsa", 1024)
    assert isinstance(k, rsa.RSAPrivateKey)
    x = k.private_numbers()
    return _N(x.p, x.q, x.d, x.dmp1, x.dmq1, x.iqmp, x.public_numbers.n, x.public_numbers.e)


def test_a_sound_key_loads_and_signs_what_its_public_key_verifies(numbers: _N, tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(_pem(numbers))
    key = load_private_key(str(path))
    assert isinstance(key, rsa.RSAPrivateKey)
    sig = key.sign(b"data", padding.PKCS1v15(), hashes.SHA256())
    key.public_key().verify(sig, b"data", padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize(
    "field,change",
    [
        ("d", lambda n: n.d + 2),
        ("dmp1", lambda n: n.dmp1 ^ 2),
        ("dmq1", lambda n: n.dmq1 ^ 2),
        ("iqmp", lambda n: n.iqmp ^ 2),
        ("n", lambda n: n.n + 2),  # not p q
        ("e", lambda n: 3 if n.e != 3 else 5),  # d is not its inverse
        ("q", lambda n: n.q + 2),  # n is not p q
        ("p", lambda n: n.p + 2),
    ],
)
def test_a_key_whose_numbers_disagree_is_refused_naming_the_file(
    numbers: _N, field: str, change, tmp_path
):
    bad = dataclasses.replace(numbers, **{field: change(numbers)})
    path = tmp_path / f"bad-{field}.pem"
    path.write_bytes(_pem(bad))
    with pytest.raises(DkimKeyError) as ei:
        load_private_key(str(path))
    assert str(path) in str(ei.value)
    assert "not a valid RSA private key" in str(ei.value)


def test_garbage_is_still_refused():
    with pytest.raises(DkimKeyError, match="not a PEM private key"):
        parse_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
