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

# Private-key signatures (DKIM rsa-sha256, _dkim.pxi): a key parsed once into
# an EVP_PKEY, one EVP_PKEY_CTX set up once (PKCS#1 v1.5, SHA-256) and reused
# for every EVP_PKEY_sign of a digest: no per-message context, provider
# look-up or parameter setting. (In OpenSSL 1.1 the setters are macros; 3.x
# functions: both compile.)
cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_PKEY:
        pass
    ctypedef struct EVP_PKEY_CTX:
        pass
    ctypedef struct EVP_MD:
        pass
    ctypedef struct ENGINE:
        pass
    int EVP_PKEY_RSA
    EVP_PKEY* d2i_AutoPrivateKey(EVP_PKEY** a, const unsigned char** pp, long length)
    void EVP_PKEY_free(EVP_PKEY* pkey)
    int EVP_PKEY_base_id(const EVP_PKEY* pkey)
    int EVP_PKEY_size(const EVP_PKEY* pkey)
    EVP_PKEY_CTX* EVP_PKEY_CTX_new(EVP_PKEY* pkey, ENGINE* e)
    void EVP_PKEY_CTX_free(EVP_PKEY_CTX* ctx)
    int EVP_PKEY_sign_init(EVP_PKEY_CTX* ctx)
    int EVP_PKEY_sign(EVP_PKEY_CTX* ctx, unsigned char* sig, size_t* siglen,
                      const unsigned char* tbs, size_t tbslen)
    int EVP_PKEY_CTX_set_signature_md(EVP_PKEY_CTX* ctx, const EVP_MD* md)
    const EVP_MD* EVP_sha256()

cdef extern from "openssl/rsa.h" nogil:
    int RSA_PKCS1_PADDING
    int EVP_PKEY_CTX_set_rsa_padding(EVP_PKEY_CTX* ctx, int pad)

cdef extern from "openssl/err.h" nogil:
    void ERR_clear_error()
