# _dkim.pxi: compiled twins of the DKIM canonicalizations in
# fastsend.message.dkim (body_relaxed, body_simple, header_relaxed,
# relaxed_headers; RFC 6376 3.4). The pure versions there are the reference;
# behaviour is identical.

from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE


cdef bint _relaxed_clean(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """True when relaxed body canonicalization leaves ``s`` unchanged.

    That is: no TAB, no SP followed by SP or CR, and the body ends with one
    CRLF after a character that is not WSP, CR or LF (or is empty). Generated
    quoted-printable and base64 bodies nearly always pass, so the common case
    is a branch-free (vectorisable) scan and no copy.
    """
    cdef Py_ssize_t i = 0, j, end
    cdef unsigned char acc = 0, c, d
    if n == 0:
        return True
    if n < 3 or s[n - 2] != 13 or s[n - 1] != 10:
        return False
    c = s[n - 3]
    if c == 13 or c == 10 or c == 32 or c == 9:
        return False
    while i < n - 1:
        end = i + 256
        if end > n - 1:
            end = n - 1
        for j in range(i, end):
            c = s[j]
            d = s[j + 1]
            acc |= (c == 9) | ((c == 32) & ((d == 32) | (d == 13)))
        if acc:
            return False
        i = end
    return True


def body_relaxed(bytes body):
    """Relaxed body canonicalization (RFC 6376 3.4.4)."""
    cdef const unsigned char* s = body
    cdef Py_ssize_t n = len(body)
    if _relaxed_clean(s, n):
        return body
    cdef unsigned char* out = <unsigned char*> malloc(n + 3)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i = 0, o = 0
    cdef unsigned char c
    cdef bint wsp = False
    try:
        while i < n:
            c = s[i]
            if c == 32 or c == 9:
                wsp = True
            elif c == 13 and i + 1 < n and s[i + 1] == 10:
                wsp = False
                out[o] = 13
                out[o + 1] = 10
                o += 2
                i += 1
            else:
                if wsp:
                    out[o] = 32
                    o += 1
                    wsp = False
                out[o] = c
                o += 1
            i += 1
        while o > 0 and (out[o - 1] == 13 or out[o - 1] == 10 or out[o - 1] == 32
                         or out[o - 1] == 9):
            o -= 1
        if o > 0:
            out[o] = 13
            out[o + 1] = 10
            o += 2
        return PyBytes_FromStringAndSize(<char*> out, o)
    finally:
        free(out)


def body_simple(bytes body):
    """Simple body canonicalization (RFC 6376 3.4.3)."""
    cdef const unsigned char* s = body
    cdef Py_ssize_t o = len(body)
    while o >= 2 and s[o - 2] == 13 and s[o - 1] == 10:
        o -= 2
    if o == len(body) - 2:
        return body
    return body[:o] + b"\r\n"


# 0: an octet relaxed header canonicalization copies as is; 1: SP or TAB;
# 2: CR (the start of a fold or of the final CRLF, else copied as is).
cdef unsigned char _HR_CLASS[256]


cdef void _hr_init() noexcept:
    cdef int b
    for b in range(256):
        _HR_CLASS[b] = 0
    _HR_CLASS[32] = 1
    _HR_CLASS[9] = 1
    _HR_CLASS[13] = 2


_hr_init()


cdef Py_ssize_t _header_relaxed(const unsigned char* s, Py_ssize_t n,
                                unsigned char* out) noexcept nogil:
    """Write the relaxed form of one raw header line to ``out`` (room: n + 3).

    Name: lower case, WSP before the colon dropped. Value: folds (CRLF before
    WSP, and the final CRLF) removed, each WSP run one SP, none at either end.
    """
    cdef Py_ssize_t i = 0, o = 0
    cdef unsigned char c, k
    cdef bint wsp = False, started = False
    while i < n and s[i] != 58:
        c = s[i]
        if 65 <= c <= 90:
            c += 32
        out[o] = c
        o += 1
        i += 1
    while o > 0 and (out[o - 1] == 32 or out[o - 1] == 9):
        o -= 1
    out[o] = 58
    o += 1
    i += 1
    while i < n:
        c = s[i]
        k = _HR_CLASS[c]
        if k == 1:
            wsp = True
            i += 1
            continue
        if k == 2 and i + 1 < n and s[i + 1] == 10 and (
            i + 2 == n or s[i + 2] == 32 or s[i + 2] == 9
        ):
            i += 2
            continue
        if wsp and started:
            out[o] = 32
            o += 1
        wsp = False
        started = True
        out[o] = c
        o += 1
        i += 1
        while i < n and _HR_CLASS[s[i]] == 0:  # the rest of the word
            out[o] = s[i]
            o += 1
            i += 1
    out[o] = 13
    out[o + 1] = 10
    return o + 2


def header_relaxed(bytes line):
    """Relaxed canonicalization of one raw header line (RFC 6376 3.4.2)."""
    cdef Py_ssize_t n = len(line)
    cdef unsigned char* out = <unsigned char*> malloc(n + 3)
    if out == NULL:
        raise MemoryError()
    try:
        return PyBytes_FromStringAndSize(<char*> out, _header_relaxed(line, n, out))
    finally:
        free(out)


def relaxed_headers(tuple lines):
    """``b"".join(header_relaxed(ln) for ln in lines)`` in one buffer."""
    cdef Py_ssize_t k, m = len(lines), cap = 0, o = 0
    cdef object ln
    for k in range(m):
        ln = lines[k]
        if type(ln) is not bytes:
            raise TypeError("relaxed_headers() takes a tuple of bytes")
        cap += PyBytes_GET_SIZE(ln) + 3
    cdef unsigned char* out = <unsigned char*> malloc(cap + 1)
    if out == NULL:
        raise MemoryError()
    try:
        for k in range(m):
            ln = lines[k]
            o += _header_relaxed(<const unsigned char*> PyBytes_AS_STRING(ln),
                                 PyBytes_GET_SIZE(ln), out + o)
        return PyBytes_FromStringAndSize(<char*> out, o)
    finally:
        free(out)


# -- Ed25519 signing with libsodium (twin: fastsend.message.dkim.ed25519_sign_lines)

from libc.stdint cimport uintptr_t

ctypedef int (*_sodium_sign_t)(unsigned char* sm, unsigned long long* smlen,
                               const unsigned char* m, unsigned long long mlen,
                               const unsigned char* sk) noexcept nogil

# libsodium's crypto_sign, found through PyNaCl's cffi module on first use
# (PyNaCl carries its own libsodium; this module does not link it). SHA-256
# is libcrypto's (_openssl.pxi: the CPU's SHA instructions; libsodium's is
# portable C, four times slower).
# 0: not looked up yet; 1: found; -1: not available (the pure twin is used).
cdef int _sodium_state = 0
cdef _sodium_sign_t _sodium_sign = NULL


cdef int _sodium_load() except -1:
    global _sodium_state, _sodium_sign
    _sodium_state = -1
    try:
        import nacl.bindings  # noqa: F401  (runs sodium_init)
        from nacl._sodium import ffi, lib
        sign = int(ffi.cast("uintptr_t", ffi.addressof(lib, "crypto_sign")))
    except (ImportError, AttributeError):
        return 0
    _sodium_sign = <_sodium_sign_t> <uintptr_t> sign
    _sodium_state = 1
    return 0


cdef int _block_digest(tuple lines, bytes sig_head_c14n, bint relaxed,
                       unsigned char* digest) except -1:
    """SHA-256 of the signed header block: ``lines`` canonicalized (relaxed, or
    simple: as they are) and ``sig_head_c14n``, made in one buffer."""
    return _lines_digest(lines, None, <const unsigned char*> PyBytes_AS_STRING(sig_head_c14n),
                         PyBytes_GET_SIZE(sig_head_c14n), relaxed, digest)


cdef int _lines_digest(object lines, tuple idx, const unsigned char* tail, Py_ssize_t tn,
                       bint relaxed, unsigned char* digest, const unsigned char* base=NULL,
                       const Py_ssize_t* spans=NULL) except -1:
    """SHA-256 of the signed header block: the header lines (``lines``, a list
    or tuple: those at the positions ``idx``, or all of them in order when it
    is None) canonicalized (relaxed, or simple: as they are), then the ``tn``
    octets at ``tail`` (the DKIM-Signature line canonicalized), in one buffer.
    With ``spans`` (and ``idx``), line k is the octets ``base[spans[2k]:
    spans[2k + 1]]`` (a message's own lines, where they lie: Assembly._fast_make)."""
    cdef Py_ssize_t k, j, m = len(idx) if idx is not None else len(lines), cap = tn, o = 0, n
    cdef object ln
    cdef SHA256_CTX ctx
    cdef unsigned char* buf
    cdef const unsigned char* p
    for k in range(m):
        if spans != NULL:
            j = <Py_ssize_t> idx[k]
            cap += spans[2 * j + 1] - spans[2 * j] + 3
            continue
        ln = lines[<Py_ssize_t> idx[k]] if idx is not None else lines[k]
        if type(ln) is not bytes:
            raise TypeError("the header lines to sign must be a tuple of bytes")
        cap += PyBytes_GET_SIZE(ln) + 3
    buf = <unsigned char*> malloc(cap + 1)
    if buf == NULL:
        raise MemoryError()
    try:
        for k in range(m):
            if spans != NULL:
                j = <Py_ssize_t> idx[k]
                p = base + spans[2 * j]
                n = spans[2 * j + 1] - spans[2 * j]
            else:
                ln = lines[<Py_ssize_t> idx[k]] if idx is not None else lines[k]
                p = <const unsigned char*> PyBytes_AS_STRING(ln)
                n = PyBytes_GET_SIZE(ln)
            if relaxed:
                o += _header_relaxed(p, n, buf + o)
            else:
                memcpy(buf + o, p, n)
                o += n
        memcpy(buf + o, tail, tn)
        o += tn
        with nogil:
            SHA256_Init(&ctx)
            SHA256_Update(&ctx, buf, o)
            SHA256_Final(digest, &ctx)
    finally:
        free(buf)
    return 0


cdef inline Py_ssize_t _folded_len(Py_ssize_t n) noexcept nogil:
    """Octets of a signature of ``n`` octets in base64 folded as ``_fold_sig``
    writes it, with the final CRLF."""
    cdef Py_ssize_t bn = (n + 2) // 3 * 4
    return bn + (bn - 1) // 72 * 4 + 2


cdef Py_ssize_t _fold_sig(const unsigned char* sig, Py_ssize_t n, unsigned char* out) except -1:
    """The base64 of ``sig`` in lines of 72 joined by CRLF and two spaces, and
    CRLF, written to ``out`` (room: ``_folded_len(n)``); its length."""
    cdef Py_ssize_t bn = (n + 2) // 3 * 4, i = 0, o = 0, take
    cdef unsigned char* b64 = <unsigned char*> malloc(bn + 1)
    if b64 == NULL:
        raise MemoryError()
    try:
        _b64(sig, n, b64)
        while i < bn:
            if i:
                memcpy(out + o, b"\r\n  ", 4)
                o += 4
            take = bn - i if bn - i < 72 else 72
            memcpy(out + o, b64 + i, take)
            o += take
            i += take
        out[o] = 13
        out[o + 1] = 10
        return o + 2
    finally:
        free(b64)


cdef bytes _sig_line(bytes sig_head, const unsigned char* sig, Py_ssize_t n):
    """``sig_head``, the base64 of ``sig`` in lines of 72 joined by CRLF and two
    spaces, and CRLF (the pure twins' ``_sig_line``)."""
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(sig_head)
    cdef bytes res = PyBytes_FromStringAndSize(NULL, hn + _folded_len(n))
    cdef unsigned char* out = <unsigned char*> PyBytes_AS_STRING(res)
    memcpy(out, PyBytes_AS_STRING(sig_head), hn)
    _fold_sig(sig, n, out + hn)
    return res


def ed25519_sign_lines(tuple lines, bytes sig_head, bytes sig_head_c14n, bytes sodium_key,
                       bint relaxed):
    """The DKIM-Signature line: ``sig_head`` and the folded base64 Ed25519 signature.

    Twin of the pure ``ed25519_sign_lines``: the canonical block is made in
    one buffer, and libsodium is called directly (no cffi wrapper).
    """
    cdef unsigned char digest[32]
    cdef unsigned char sm[96]
    cdef unsigned long long smlen = 0
    cdef int rc
    if _sodium_state == 0:
        _sodium_load()
    if _sodium_state < 0 or len(sodium_key) != 64:
        return _ed25519_sign_lines_py(lines, sig_head, sig_head_c14n, sodium_key, relaxed)
    _block_digest(lines, sig_head_c14n, relaxed, digest)
    rc = _sodium_sign(sm, &smlen, digest, 32,
                      <const unsigned char*> PyBytes_AS_STRING(sodium_key))
    if rc != 0:
        raise RuntimeError("libsodium failed to sign")
    return _sig_line(sig_head, sm, 64)


def _ed25519_sign_lines_py(lines, sig_head, sig_head_c14n, sodium_key, relaxed):
    from fastsend.message.dkim import PURE

    return PURE["ed25519_sign_lines"](lines, sig_head, sig_head_c14n, sodium_key, relaxed)


# -- rsa-sha256 (twin: fastsend.message.dkim.RsaSigner) --------------------------

cdef class RsaSigner:
    """rsa-sha256 DKIM signatures with one RSA key (twin of the pure
    ``RsaSigner``: the same bytes). The key is parsed once into libcrypto's
    EVP_PKEY and one signing context (PKCS#1 v1.5 over a SHA-256 digest) is
    set up once and reused: per message the header block is canonicalized
    and hashed in one buffer, signed by ``EVP_PKEY_sign``, and the line is written base64-folded, with no context made, no
    algorithm looked up and no Python objects in between."""
    cdef EVP_PKEY* pkey
    cdef EVP_PKEY_CTX* ctx
    cdef readonly Py_ssize_t size  # octets of a signature

    def __cinit__(self):
        self.pkey = NULL
        self.ctx = NULL

    def __init__(self, key):
        from cryptography.hazmat.primitives import serialization

        cdef bytes der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cdef const unsigned char* p = der
        if self.pkey != NULL:
            raise TypeError("RsaSigner is initialised once")
        self.pkey = d2i_AutoPrivateKey(NULL, &p, PyBytes_GET_SIZE(der))
        if self.pkey == NULL or EVP_PKEY_base_id(self.pkey) != EVP_PKEY_RSA:
            ERR_clear_error()
            raise ValueError("RsaSigner needs an RSA private key")
        self.size = EVP_PKEY_size(self.pkey)
        self.ctx = EVP_PKEY_CTX_new(self.pkey, NULL)
        if (self.ctx == NULL or EVP_PKEY_sign_init(self.ctx) <= 0
                or EVP_PKEY_CTX_set_rsa_padding(self.ctx, RSA_PKCS1_PADDING) <= 0
                or EVP_PKEY_CTX_set_signature_md(self.ctx, EVP_sha256()) <= 0):
            ERR_clear_error()
            raise RuntimeError("libcrypto could not set up rsa-sha256 signing")

    def __dealloc__(self):
        if self.ctx != NULL:
            EVP_PKEY_CTX_free(self.ctx)
        if self.pkey != NULL:
            EVP_PKEY_free(self.pkey)

    def sign_lines(self, tuple lines, bytes sig_head, bytes sig_head_c14n, bint relaxed):
        """The DKIM-Signature line: ``sig_head`` and the folded base64 signature
        of the SHA-256 of ``lines`` canonicalized (relaxed, or simple) and
        ``sig_head_c14n`` (``sig_head`` canonicalized, without its CRLF)."""
        cdef unsigned char digest[32]
        cdef unsigned char sig[512]  # RSA up to 4096 bits
        cdef Py_ssize_t n
        if self.size > <Py_ssize_t> sizeof(sig):
            raise ValueError("RSA keys of more than 4096 bits are not supported")
        _block_digest(lines, sig_head_c14n, relaxed, digest)
        n = self._sign(digest, sig)
        return _sig_line(sig_head, sig, n)

    cdef Py_ssize_t _sign(self, const unsigned char* digest, unsigned char* sig) except -1:
        """The signature of a SHA-256 ``digest`` into ``sig`` (room: 512); its length."""
        cdef size_t n = 512
        if self.size > 512:
            raise ValueError("RSA keys of more than 4096 bits are not supported")
        # With the GIL held: the context is this object's, so two threads must
        # not sign with it at once (a worker has one thread).
        if EVP_PKEY_sign(self.ctx, sig, &n, digest, 32) <= 0:
            ERR_clear_error()
            raise RuntimeError("libcrypto failed to sign")
        return n


# -- body hashes (twin: fastsend.message.dkim.BodyHasher) -----------------------

cdef Py_ssize_t _PREFIX_MIN = 256  # as fastsend.message.dkim.PREFIX_MIN


cdef class BodyHasher:
    """``bh=`` of bodies: base64 SHA-256 of the canonical body, the same body
    not hashed again and a prefix shared with the last body hashed once (twin
    of the pure ``BodyHasher``: the same values; the state is libcrypto's,
    copied with memcpy, and hashing runs without the GIL)."""
    cdef readonly bint relaxed
    cdef bytes last  # the last canonical body: last_len octets at last_off in it
    cdef Py_ssize_t last_off, last_len
    cdef bytes last_bh
    cdef readonly Py_ssize_t prefix
    cdef SHA256_CTX state

    def __init__(self, bint relaxed):
        self.relaxed = relaxed
        self.last = None
        self.last_off = self.last_len = 0
        self.last_bh = b""
        self.prefix = 0

    def __call__(self, bytes body):
        return self._hash_at(body, 0, PyBytes_GET_SIZE(body))

    cdef bytes _hash_at(self, bytes owner, Py_ssize_t off, Py_ssize_t n):
        """``bh=`` of the body at ``off`` in ``owner``, ``n`` octets long (the
        part of a whole message that is its body: hashed where it lies, not
        copied, when it is its own canonical form, as generated bodies are)."""
        cdef const unsigned char* s = <const unsigned char*> PyBytes_AS_STRING(owner) + off
        cdef Py_ssize_t o
        if self.relaxed:
            if not _relaxed_clean(s, n):
                owner = body_relaxed(owner if off == 0 and n == PyBytes_GET_SIZE(owner)
                                     else PyBytes_FromStringAndSize(<const char*> s, n))
                return self._canon_hash(owner, 0, PyBytes_GET_SIZE(owner))
        else:
            o = n
            while o >= 2 and s[o - 2] == 13 and s[o - 1] == 10:
                o -= 2
            if o != n - 2:  # (body_simple's canonical form is a new object)
                owner = PyBytes_FromStringAndSize(<const char*> s, o) + b"\r\n"
                return self._canon_hash(owner, 0, o + 2)
        return self._canon_hash(owner, off, n)

    cdef bytes _canon_hash(self, bytes canon, Py_ssize_t off, Py_ssize_t n):
        """``bh=`` of the canonical body at ``off`` in ``canon``, ``n`` octets."""
        cdef bytes last = self.last
        cdef const unsigned char* c = <const unsigned char*> PyBytes_AS_STRING(canon) + off
        cdef const unsigned char* p
        cdef Py_ssize_t k = self.prefix, m, shared
        cdef SHA256_CTX ctx
        cdef unsigned char md[32]
        cdef unsigned char b64[44]
        if last is not None:
            p = <const unsigned char*> PyBytes_AS_STRING(last) + self.last_off
            m = self.last_len
            if (p == c and m == n) or (m == n and memcmp(p, c, n) == 0):
                return self.last_bh
            if not (k and n >= k and memcmp(p, c, k) == 0):
                k = 0
                shared = m if m < n else n
                while k + 64 <= shared and memcmp(p + k, c + k, 64) == 0:
                    k += 64
                if k >= _PREFIX_MIN:
                    with nogil:
                        SHA256_Init(&self.state)
                        SHA256_Update(&self.state, c, k)
                else:
                    k = 0
                self.prefix = k
        with nogil:
            if k:
                memcpy(&ctx, &self.state, sizeof(SHA256_CTX))
            else:
                SHA256_Init(&ctx)
            SHA256_Update(&ctx, c + k, n - k)
            SHA256_Final(md, &ctx)
            _b64(md, 32, b64)
        self.last = canon  # (holds the whole message the body is part of)
        self.last_off = off
        self.last_len = n
        self.last_bh = PyBytes_FromStringAndSize(<char*> b64, 44)
        return self.last_bh


# -- whole signed messages (twin: fastsend.message.dkim.MessageSigner) ----------

import time as _dkim_time


cdef class MessageSigner:
    """Whole messages signed by one ``Signer`` for one header layout (twin of
    the pure ``MessageSigner``: the same bytes). The compiled ``Assembly``
    asks for the room the DKIM-Signature line takes (``_reserve``), writes
    the header lines and the body after it in one bytes object, and has the
    line written into that room (``_sign_into``): the body hashed where it
    lies, the header block canonicalized and hashed in one buffer, one
    signature (rsa-sha256: the compiled ``RsaSigner``'s context; Ed25519:
    libsodium), no copy of the body and no join. Keys of any other kind (or
    a pure BodyHasher / RsaSigner) are signed through the Signer (mode 0)."""
    cdef object signer, plan
    cdef readonly int mode  # 0: through the Signer; 1: rsa-sha256; 2: Ed25519 (libsodium)
    cdef RsaSigner rsa
    cdef bytes sodium_key
    cdef BodyHasher hasher
    cdef bint hrelaxed
    cdef tuple idx
    cdef bytes head, h_part
    cdef Py_ssize_t siglen  # octets of a signature
    # The line up to its body hash, and its canonical form, for the second ``sec``
    # (the pure Signer._sig_head's cache).
    cdef object sec
    cdef bytes pre, pre_c14n

    def __init__(self, signer, plan):
        self.signer = signer
        self.plan = plan
        self.idx = tuple(plan.idx)
        self.h_part = plan.h_part
        self.head = signer._head
        self.hrelaxed = signer._hrelaxed
        self.sec = None
        self.mode = 0
        hasher, rsa, sk = signer._body_hash, signer._rsa, signer._sodium_key
        if type(hasher) is not BodyHasher:
            return
        if sk is not None:
            if _sodium_state == 0:
                _sodium_load()
            if _sodium_state > 0 and len(sk) == 64:
                self.sodium_key = sk
                self.siglen = 64
                self.mode = 2
        elif type(rsa) is RsaSigner and (<RsaSigner> rsa).size <= 512:
            self.rsa = <RsaSigner> rsa
            self.siglen = self.rsa.size
            self.mode = 1
        if self.mode:
            self.hasher = <BodyHasher> hasher

    cdef Py_ssize_t _reserve(self) except -1:
        """Octets of the DKIM-Signature line of a message signed now (the line
        up to ``bh=`` made once a second)."""
        cdef object now = int(_dkim_time.time())
        cdef bytes pre
        if now != self.sec:
            pre = b"".join([self.head, b"%d" % now, self.h_part])
            self.pre_c14n = relaxed_headers((pre,))[:-2] if self.hrelaxed else pre
            self.pre = pre
            self.sec = now
        return PyBytes_GET_SIZE(self.pre) + 44 + 6 + _folded_len(self.siglen)

    cdef int _sign_into(self, bytes msg, Py_ssize_t room, object lines, Py_ssize_t off,
                        Py_ssize_t n, const Py_ssize_t* spans=NULL) except -1:
        """Write the DKIM-Signature line (``room`` octets: ``_reserve``) at the
        start of ``msg``, whose header ``lines`` follow it and whose body is
        the ``n`` octets at ``off``. With ``spans``, ``lines`` is None and
        header line k is ``msg[spans[2k]:spans[2k + 1]]`` (``_lines_digest``)."""
        cdef bytes bh = self.hasher._hash_at(msg, off, n)
        cdef unsigned char* w = <unsigned char*> PyBytes_AS_STRING(msg)
        cdef Py_ssize_t pn = PyBytes_GET_SIZE(self.pre), hl, cn, sn
        cdef unsigned char digest[32]
        cdef unsigned char sig[512]
        cdef unsigned char* tail
        memcpy(w, PyBytes_AS_STRING(self.pre), pn)
        memcpy(w + pn, PyBytes_AS_STRING(bh), 44)
        memcpy(w + pn + 44, b";\r\n b=", 6)
        hl = pn + 50  # the line up to b=
        if self.hrelaxed:  # bh is base64 (no white space): the canonical head, bh, "; b="
            cn = PyBytes_GET_SIZE(self.pre_c14n)
            tail = <unsigned char*> malloc(cn + 48)
            if tail == NULL:
                raise MemoryError()
            try:
                memcpy(tail, PyBytes_AS_STRING(self.pre_c14n), cn)
                memcpy(tail + cn, PyBytes_AS_STRING(bh), 44)
                memcpy(tail + cn + 44, b"; b=", 4)
                _lines_digest(lines, self.idx, tail, cn + 48, True, digest, w, spans)
            finally:
                free(tail)
        else:
            _lines_digest(lines, self.idx, w, hl, False, digest, w, spans)
        if self.mode == 1:
            sn = self.rsa._sign(digest, sig)
        else:
            sn = self._ed25519(digest, sig)
        if sn != self.siglen or hl + _fold_sig(sig, sn, w + hl) != room:
            raise RuntimeError("the DKIM-Signature line does not fit the room kept for it")
        return 0

    cdef Py_ssize_t _ed25519(self, const unsigned char* digest, unsigned char* sig) except -1:
        cdef unsigned char sm[96]
        cdef unsigned long long smlen = 0
        if _sodium_sign(sm, &smlen, digest, 32,
                        <const unsigned char*> PyBytes_AS_STRING(self.sodium_key)) != 0:
            raise RuntimeError("libsodium failed to sign")
        memcpy(sig, sm, 64)
        return 64

    def message(self, lines, bytes body):
        """The DKIM-Signature line, the header ``lines``, the empty line and
        ``body``, in one bytes object."""
        cdef Py_ssize_t room, k, o, n, bn = PyBytes_GET_SIZE(body)
        cdef object ln
        cdef list ls
        cdef bytes msg
        cdef unsigned char* w
        if self.mode == 0:
            return b"".join([self.signer.sign_lines(self.plan, lines, body), *lines, b"\r\n",
                             body])
        ls = list(lines)
        for k in range(len(ls)):
            if type(ls[k]) is not bytes:  # (any buffer, as b"".join takes it)
                ls[k] = b"".join((ls[k],))
        room = self._reserve()
        o = room
        for ln in ls:
            o += PyBytes_GET_SIZE(ln)
        msg = PyBytes_FromStringAndSize(NULL, o + 2 + bn)
        w = <unsigned char*> PyBytes_AS_STRING(msg)
        o = room
        for ln in ls:
            n = PyBytes_GET_SIZE(ln)
            memcpy(w + o, PyBytes_AS_STRING(ln), n)
            o += n
        w[o] = 13
        w[o + 1] = 10
        memcpy(w + o + 2, PyBytes_AS_STRING(body), bn)
        self._sign_into(msg, room, ls, o + 2, bn)
        return msg
