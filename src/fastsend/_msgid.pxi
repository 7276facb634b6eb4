# _msgid.pxi: compiled twin of fastsend.msgid.token (the pure version there is
# the reference; same value for every row id and secret).
#
# HMAC-SHA256 (RFC 2104) from two SHA-256 states kept per secret (after the
# inner and outer padded keys), with libcrypto's SHA-256 (the OpenSSL that
# Python's hashlib uses; the CPU's SHA instructions): a token is two
# struct copies and two one-block hashes, no Python objects but the result
# (an int row id's digits written here, not by str(); the str made from
# its ASCII octets at once).

from libc.string cimport memcpy, memset
from cpython.unicode cimport PyUnicode_DecodeASCII


cdef class _MacPads:
    """The SHA-256 states after HMAC's inner and outer padded keys, for one key."""
    cdef SHA256_CTX inner
    cdef SHA256_CTX outer

    def __cinit__(self, bytes key):
        cdef unsigned char ipad[64]
        cdef unsigned char opad[64]
        cdef Py_ssize_t i, n = len(key)
        cdef const unsigned char* k = key
        if n > 64:
            raise ValueError("HMAC key longer than a SHA-256 block")
        memset(ipad, 0x36, 64)
        memset(opad, 0x5C, 64)
        for i in range(n):
            ipad[i] = k[i] ^ 0x36
            opad[i] = k[i] ^ 0x5C
        SHA256_Init(&self.inner)
        SHA256_Update(&self.inner, ipad, 64)
        SHA256_Init(&self.outer)
        SHA256_Update(&self.outer, opad, 64)


cdef dict _MAC_PADS = {}
cdef char* _B32_ALPHABET = b"abcdefghijklmnopqrstuvwxyz234567"


cdef _MacPads _mac_pads(bytes secret):
    cdef _MacPads p = _MAC_PADS.get(secret)
    if p is None:
        import hmac

        p = _MacPads(hmac.digest(secret, b"fastsend message id v1", "sha256"))
        if len(_MAC_PADS) >= 16:
            _MAC_PADS.clear()
        _MAC_PADS[secret] = p
    return p


def token(row_id, secret):
    """``"<row id>-<mac>"``; just the row id when there is no secret (twin of
    fastsend.msgid.token)."""
    return _token(row_id, secret)


cdef str _token(row_id, secret):
    if not secret:
        return str(row_id)
    if type(secret) is not bytes:
        return _token_py(row_id, secret)
    cdef str head
    cdef Py_ssize_t n, i
    cdef const char* h
    cdef char digits[24]
    cdef int overflow = 1
    cdef long long rid = 0
    cdef unsigned long long u
    if type(row_id) is int:  # (the usual case) its decimal digits written here, no str
        rid = PyLong_AsLongLongAndOverflow(row_id, &overflow)
    if overflow == 0:
        u = <unsigned long long> (-(rid + 1)) + 1 if rid < 0 else <unsigned long long> rid
        n = 24
        while True:
            n -= 1
            digits[n] = 48 + <char> (u % 10)
            u //= 10
            if u == 0:
                break
        if rid < 0:
            n -= 1
            digits[n] = 45
        h = digits + n
        n = 24 - n
    else:
        head = str(row_id)
        h = PyUnicode_AsUTF8AndSize(head, &n)
        if n > 64:
            return _token_py(row_id, secret)
    cdef _MacPads p = _mac_pads(secret)
    cdef SHA256_CTX ctx
    cdef unsigned char md[32]
    cdef char out[80]
    cdef unsigned long long v
    memcpy(&ctx, &p.inner, sizeof(SHA256_CTX))
    SHA256_Update(&ctx, h, n)
    SHA256_Final(md, &ctx)
    memcpy(&ctx, &p.outer, sizeof(SHA256_CTX))
    SHA256_Update(&ctx, md, 32)
    SHA256_Final(md, &ctx)
    v = 0
    for i in range(7):
        v = (v << 8) | md[i]
    v >>= 6  # the first 50 bits
    memcpy(out, h, n)
    out[n] = 45  # "-"
    for i in range(10):
        out[n + 1 + i] = _B32_ALPHABET[(v >> (45 - 5 * i)) & 31]
    return PyUnicode_DecodeASCII(out, n + 11, NULL)


def _token_py(row_id, secret):
    from fastsend.msgid import PURE

    return PURE["token"](row_id, secret)
