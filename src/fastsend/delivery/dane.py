"""DANE for SMTP (RFC 7672): an MX host's TLSA records, published under
DNSSEC, say which certificate it presents; a client that finds them must use
STARTTLS and accept only that certificate.

Only with ``[tls] dane = "on"``: the resolver (``[dns] nameservers``, which
must then be a trusted local validating resolver, as Postfix's
``smtp_dns_support_level = dnssec`` asks) is asked for the AD bit, and a
domain's MX answer that carries it (authenticated) has each MX host's TLSA
RRset ``_PORT._tcp.MX`` looked up; only an authenticated answer counts
(:class:`~fastsend.delivery.mx.MXResolver`). An MX host name that is an alias
whose CNAME chain is authenticated has its records looked for at the chain's
target first, then at the MX name (RFC 7672 2.2.2; the target is then the TLSA
base domain: SNI and a reference identifier). A host with usable records
(usage DANE-TA(2) or DANE-EE(3), selector 0 or 1, matching type 0, 1 or 2;
PKIX usages 0 and 1 are unusable for SMTP, 3.1.3) is connected with STARTTLS
required and its certificate checked by :func:`check` after the handshake:

- DANE-EE(3): the server's own certificate (or its public key) matches; no
  name nor expiry check (3.1.1);
- DANE-TA(2): a certificate of the chain the server sent matches, and the
  server's certificate chains to it and is valid for the MX name (3.1.2).

A failure defers the mail (4.7.5): never clear text, never an unchecked
certificate. DANE wins over MTA-STS (RFC 8461 2): a domain whose MX hosts
have usable TLSA records gets no MTA-STS treatment.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import ssl

Tlsa = tuple[int, int, int, bytes]  # usage, selector, matching type, data
USABLE_USAGES = (2, 3)
# An authenticated TLSA RRset none of whose records is usable (PKIX usages,
# unknown selectors or matching types): STARTTLS is still required, with any
# certificate ("mandatory unauthenticated TLS", RFC 7672 2.2 and 3.1.3; as
# Postfix's "encrypt" level): the records prove the host speaks TLS, so a
# stripped STARTTLS is a downgrade, never a reason to send in clear.
UNUSABLE: Tlsa = (255, 255, 255, b"")


def usable(records: list[Tlsa]) -> tuple[Tlsa, ...]:
    """The records a client may use (RFC 7672 3.1.3, RFC 6698 2.1); (UNUSABLE,)
    when there are records but none of them is."""
    ok = tuple(
        r for r in records if r[0] in USABLE_USAGES and r[1] in (0, 1) and r[2] in (0, 1, 2)
    )
    return ok if ok or not records else (UNUSABLE,)


@functools.cache
def context() -> ssl.SSLContext:
    """The handshake's context: OpenSSL verifies nothing (the TLSA records
    decide, :func:`check`), TLS 1.2 or later (RFC 7672 asks for TLS 1.0+;
    every current MTA speaks 1.2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _selected(der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def matches(der: bytes, rec: Tlsa) -> bool:
    _usage, selector, mtype, data = rec
    try:
        got = _selected(der, selector)
    except ValueError:
        return False
    if mtype == 1:
        got = hashlib.sha256(got).digest()
    elif mtype == 2:
        got = hashlib.sha512(got).digest()
    return got == data


def check(records: tuple[Tlsa, ...], names: str | tuple[str, ...], chain: list[bytes]) -> str:
    """"" when the server's ``chain`` (DER, its own certificate first)
    satisfies one of ``records``, else why not. ``names``: the reference
    identifiers a DANE-TA(2) match needs the server certificate to carry (RFC
    7672 3.2.2: the TLSA base domain -- the MX host name, or the recipient
    domain itself for an implicit MX -- and the next-hop domain)."""
    if records and all(r == UNUSABLE for r in records):
        return ""  # TLS it is; no record says which certificate
    if not chain:
        return "the server sent no certificate"
    refs = (names,) if isinstance(names, str) else names
    leaf = chain[0]
    for rec in records:
        if rec[0] == 3 and matches(leaf, rec):
            return ""
    why = "the certificate matches no TLSA record"
    for rec in records:
        if rec[0] != 2:
            continue
        for i, der in enumerate(chain):
            if matches(der, rec):
                bad = _chains(chain[: i + 1], refs)
            elif rec[1:3] == (1, 0):  # a full public key: the anchor need not be sent (3.1.2)
                bad = _chains(chain[: i + 1], refs, anchor_key=rec[3])
                if bad == _NOT_SIGNED:
                    continue
            else:
                continue
            if not bad:
                return ""
            why = f"the certificate does not chain to its TLSA trust anchor: {bad}"
    return why


_NOT_SIGNED = "not issued by the TLSA trust anchor's key"


def _chains(chain: list[bytes], names: tuple[str, ...], anchor_key: bytes = b"") -> str:
    """"" when ``chain[0]`` is valid now and names one of ``names``, and each
    certificate of ``chain`` is signed by the next, up to ``chain[-1]`` -- the
    trust anchor a TLSA record named, itself neither dated nor named (RFC 7672
    3.1.2) -- or, with ``anchor_key`` (a record's full public key), up to a
    ``chain[-1]`` that this key signed. The server's own certificate is always
    name-checked, also when it is the anchor (DANE-TA never skips the names;
    only DANE-EE does). Checked by hand with cryptography's primitives: a web
    PKI verifier refuses what MTAs' certificates often are (critical SANs, no
    key usage)."""
    import datetime

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        certs = [x509.load_der_x509_certificate(d) for d in chain]
        now = datetime.datetime.now(datetime.UTC)
        dated = certs if anchor_key else certs[:-1]
        for c in dated:
            if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                return f"{c.subject.rfc4514_string()[:80]} is not valid now"
        if anchor_key:
            try:
                _signed_by(certs[-1], serialization.load_der_public_key(anchor_key))
            except (InvalidSignature, ValueError, TypeError):
                return _NOT_SIGNED
        for c, issuer in itertools.pairwise(certs):
            c.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return "a signature in the chain does not verify"
    except (ValueError, TypeError) as e:
        return str(e)[:200]
    if not any(_names(certs[0], n) for n in names if n):
        return f"the certificate is not valid for {' or '.join(n for n in names if n)}"
    return ""


def _signed_by(cert: object, key: object) -> None:
    """Raise unless ``key`` (a trust anchor's public key) signed ``cert``."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    assert isinstance(cert, x509.Certificate)
    sig, tbs, algo = cert.signature, cert.tbs_certificate_bytes, cert.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey) and algo is not None:
        pad = cert.signature_algorithm_parameters
        if not isinstance(pad, padding.PSS | padding.PKCS1v15):
            raise TypeError("an RSA signature without its padding")
        key.verify(sig, tbs, pad, algo)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algo is not None:
        key.verify(sig, tbs, ec.ECDSA(algo))
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(sig, tbs)
    else:
        raise TypeError("an anchor key of a kind that signs no certificate")


def _names(cert: object, name: str) -> bool:
    """Whether ``cert`` names ``name`` (its DNS subjectAltNames, else its CN;
    a ``*`` stands for one whole leftmost label)."""
    from cryptography import x509

    assert isinstance(cert, x509.Certificate)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    want = name.lower().rstrip(".")
    for n in names:
        n = n.lower().rstrip(".")
        if n == want:
            return True
        if n.startswith("*.") and want.partition(".")[2] == n[2:] and want.partition(".")[0]:
            return True
    return False
