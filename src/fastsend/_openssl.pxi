# _openssl.pxi: the libcrypto (OpenSSL) functions the core calls directly: the
# library Python's hashlib wraps, linked by setup.py (libssl-dev to build).
# SHA-256 through its low-level API: a context is a plain struct, copied
# with memcpy, so a state after a common prefix is kept and continued.

cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)
