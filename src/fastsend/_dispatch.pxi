# _dispatch.pxi: compiled twins of fastsend.queue.dispatch.batch_record,
# blob_digests and group_claims (the pure versions there are the references:
# the same record bytes, digests and groups for every claim).
#
# Every claimed message is grouped by (campaign, domain) and written into a
# Batch record for a worker's ring. Here the record's msgpack is written
# straight from the claims (no wire.Item per message): the parts a batch
# shares (tag, campaign, domain, blobs) by msgspec once, each item's id,
# recipient, vars and attempts in msgspec's own encoding (the smallest int,
# str and bin forms). A value of another type is left to the reference.

cdef object _dp_encode = None  # fastsend.wire.encoder.encode
cdef object _dp_digest = None  # fastsend.wire.blob_digest
cdef _Out _dp_out = _Out(NULL, 0, 0)
DEF _DP_BLOB_LEN = 78          # len(wire.blob_ref(sha256 hex digest))
cdef tuple _CLAIM_ITEM = ("id", "rcpt", "vars", "attempts")
cdef tuple _CLAIM_VARS = ("vars",)
cdef tuple _CLAIM_GROUP = ("id", "campaign", "domain")


cdef inline int _mp_head(_Out* o, unsigned char small, Py_ssize_t small_max,
                         unsigned char c8, unsigned char c16, unsigned char c32,
                         Py_ssize_t n) except -1:
    """A str/bin/array length header in msgpack's smallest form (c8 = 0: none)."""
    cdef unsigned char h[5]
    if small and n <= small_max:
        h[0] = small | <unsigned char>n
        return _out_raw(o, <char*>h, 1)
    if c8 and n < 256:
        h[0] = c8
        h[1] = <unsigned char>n
        return _out_raw(o, <char*>h, 2)
    if n < 65536:
        h[0] = c16
        h[1] = <unsigned char>(n >> 8)
        h[2] = <unsigned char>n
        return _out_raw(o, <char*>h, 3)
    h[0] = c32
    h[1] = <unsigned char>(n >> 24)
    h[2] = <unsigned char>(n >> 16)
    h[3] = <unsigned char>(n >> 8)
    h[4] = <unsigned char>n
    return _out_raw(o, <char*>h, 5)


cdef int _mp_int(_Out* o, object v) except -1:
    cdef long long x
    cdef unsigned long long u
    cdef int overflow = 0
    cdef unsigned char h[9]
    cdef int k, n
    if type(v) is not int:
        return _out_bytes(o, _dp_encode(v))
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow:
        return _out_bytes(o, _dp_encode(v))
    if x >= 0:
        u = <unsigned long long>x
        if u < 128:
            h[0] = <unsigned char>u
            return _out_raw(o, <char*>h, 1)
        if u < 256:
            h[0] = 0xcc
            n = 1
        elif u < 65536:
            h[0] = 0xcd
            n = 2
        elif u < 4294967296ULL:
            h[0] = 0xce
            n = 4
        else:
            h[0] = 0xcf
            n = 8
    else:
        if x >= -32:
            h[0] = <unsigned char>(<signed char>x)
            return _out_raw(o, <char*>h, 1)
        u = <unsigned long long>x
        if x >= -128:
            h[0] = 0xd0
            n = 1
        elif x >= -32768:
            h[0] = 0xd1
            n = 2
        elif x >= -2147483648LL:
            h[0] = 0xd2
            n = 4
        else:
            h[0] = 0xd3
            n = 8
    for k in range(n):
        h[n - k] = <unsigned char>(u >> (8 * k))
    return _out_raw(o, <char*>h, n + 1)


cdef int _mp_str(_Out* o, object v) except -1:
    cdef const char* p
    cdef Py_ssize_t n
    if type(v) is not str:
        return _out_bytes(o, _dp_encode(v))
    p = PyUnicode_AsUTF8AndSize(v, &n)
    _mp_head(o, 0xa0, 31, 0xd9, 0xda, 0xdb, n)
    return _out_raw(o, p, n)


cdef int _mp_bin(_Out* o, object v) except -1:
    if type(v) is not bytes:
        return _out_bytes(o, _dp_encode(v))
    _mp_head(o, 0, 0, 0xc4, 0xc5, 0xc6, len(<bytes>v))
    return _out_bytes(o, <bytes>v)


cdef _dp_init():
    global _dp_encode, _dp_digest
    if _dp_encode is None:
        from fastsend import wire as _w
        _dp_encode, _dp_digest = _w.encoder.encode, _w.blob_digest


def batch_record(campaign, domain, list items, dict blobs):
    cdef _Out* o = &_dp_out
    cdef object c
    cdef bytes out
    cdef _Fields f = None
    _dp_init()
    o.len = 0
    _out_raw(o, b"\x95\x02", 2)  # Batch: array_like, 5 values, tag 2
    _mp_int(o, campaign)
    _mp_str(o, domain)
    _mp_head(o, 0x90, 15, 0, 0xdc, 0xdd, len(items))
    for c in items:
        f = _fields_for(c, f, _CLAIM_ITEM)
        _out_raw(o, b"\x94", 1)  # Item: 4 values
        _mp_int(o, _get(c, f, 0))
        _mp_str(o, _get(c, f, 1))
        _mp_bin(o, _get(c, f, 2))
        _mp_int(o, _get(c, f, 3))
    _out_bytes(o, _dp_encode(blobs))
    out = PyBytes_FromStringAndSize(o.buf, o.len)
    o.len = 0
    if o.cap > (8 << 20):
        free(o.buf)
        o.buf = NULL
        o.cap = 0
    return out


def blob_digests(list items):
    cdef set out = set()
    cdef object c, v, d
    _dp_init()
    cdef _Fields f = None
    for c in items:
        f = _fields_for(c, f, _CLAIM_VARS)
        v = _get(c, f, 0)
        if type(v) is bytes and len(<bytes>v) != _DP_BLOB_LEN:
            continue  # not a blob reference (the usual row)
        d = _dp_digest(v)
        if d is not None:
            out.add(d)
    return out


def group_claims(list claimed, dict inflight, dict groups):
    cdef object c, key, have
    cdef _Fields f = None
    for c in claimed:
        f = _fields_for(c, f, _CLAIM_GROUP)
        inflight[_get(c, f, 0)] = c
        key = (_get(c, f, 1), _get(c, f, 2))
        have = groups.get(key)
        if have is None:
            groups[key] = [c]
        else:
            have.append(c)
