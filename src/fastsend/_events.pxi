# _events.pxi: compiled twins of fastsend.events.accepted_lines and
# delivered_lines (the pure versions there are the references: the bytes
# msgspec's encode_lines writes for the events' dicts, for every input).
#
# Nearly every message has two events (accepted, delivered). Here their JSON
# lines are written from the columns the acceptor and the supervisor already
# hold, with no dict per event: the parts every line of a batch shares are
# encoded once (msgspec), and per row an integer is formatted in C and a plain
# string (ASCII, no quote, backslash or control character: an address, an IP,
# a reply) copied as it is; any other value is msgspec's to encode. Each line
# ends with the schema version (events.SCHEMA_FIELD, events.SCHEMA: a test
# holds the twins to the references).

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1

cdef object _ev_encode = None  # msgspec.json.Encoder().encode


# -- fields read from their slots ---------------------------------------------
# The rows these loops read are msgspec structs (Claimed, wire.Res): each field
# a slot at a fixed offset, which getattr finds through the type's dict and a
# member descriptor every time (a third of a loop's time). _Fields keeps, per
# type, the offset of each field read (from its member descriptor, once) and
# _get reads the slot; a field that is not a plain object slot, or an empty
# one, is read by getattr, so the answer is getattr's for any object.

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member

cdef object _member_descriptor = type(type.__dict__["__dictoffset__"])
cdef dict _fields_cache = {}


cdef class _Fields:
    cdef object tp
    cdef tuple names
    cdef Py_ssize_t off[16]


cdef _Fields _fields_of(object tp, tuple names):
    cdef _Fields f = _fields_cache.get((tp, names))
    cdef Py_ssize_t k
    cdef PyMemberDef* m
    if f is not None:
        return f
    f = _Fields()
    f.tp = tp
    f.names = names
    for k in range(min(len(names), 16)):
        d = getattr(tp, names[k], None)
        f.off[k] = -1
        if type(d) is _member_descriptor and isinstance(tp, type) and issubclass(tp, d.__objclass__):
            m = (<PyMemberDescrObject*>d).d_member
            if m.type == 6 or m.type == 16:  # T_OBJECT, T_OBJECT_EX
                f.off[k] = m.offset
    if len(_fields_cache) > 64:
        _fields_cache.clear()
    _fields_cache[(tp, names)] = f
    return f


cdef inline _Fields _fields_for(object o, _Fields f, tuple names):
    """``f`` if it describes ``o``'s type, else the _Fields of its type."""
    if f is not None and type(o) is f.tp:
        return f
    return _fields_of(type(o), names)


cdef inline object _get(object o, _Fields f, int k):
    cdef Py_ssize_t off = f.off[k]
    cdef PyObject* v
    if off >= 0:
        v = (<PyObject**>((<char*><PyObject*>o) + off))[0]
        if v != NULL:
            return <object>v
    return getattr(o, f.names[k])


cdef tuple _CLAIM_LINE = ("id", "campaign", "rcpt", "attempts")
cdef tuple _RES_LINE = ("source_ip", "mx", "code", "enhanced", "text", "queue_id")


cdef struct _Out:
    char* buf
    Py_ssize_t len
    Py_ssize_t cap


# One output buffer, kept between calls (the supervisor's one thread writes
# events; a batch's lines are copied out into their bytes object).
cdef _Out _ev_out = _Out(NULL, 0, 0)


cdef int _out_room(_Out* o, Py_ssize_t n) except -1:
    cdef Py_ssize_t cap
    cdef char* nb
    if o.len + n <= o.cap:
        return 0
    cap = o.cap * 2
    if cap < o.len + n:
        cap = o.len + n + 4096
    nb = <char*>realloc(o.buf, cap)
    if nb == NULL:
        raise MemoryError()
    o.buf = nb
    o.cap = cap
    return 0


cdef bytes _out_take(_Out* o):
    """The lines written, as bytes; a buffer grown past 8 MB is let go."""
    cdef bytes out = PyBytes_FromStringAndSize(o.buf, o.len)
    o.len = 0
    if o.cap > (8 << 20):
        free(o.buf)
        o.buf = NULL
        o.cap = 0
    return out


cdef inline int _out_raw(_Out* o, const char* p, Py_ssize_t n) except -1:
    _out_room(o, n)
    memcpy(o.buf + o.len, p, n)
    o.len += n
    return 0


cdef inline int _out_bytes(_Out* o, bytes b) except -1:
    return _out_raw(o, <const char*>b, len(b))


cdef int _out_value(_Out* o, object v) except -1:
    """``v`` as msgspec encodes it: plain strings and ints here, the rest by msgspec."""
    cdef Py_ssize_t n, i
    cdef const char* p
    cdef unsigned char ch
    cdef long long x
    cdef unsigned long long u
    cdef int overflow = 0
    cdef char num[24]
    if type(v) is str and PyUnicode_IS_ASCII(v):
        p = PyUnicode_AsUTF8AndSize(v, &n)
        for i in range(n):
            ch = <unsigned char>p[i]
            if ch < 0x20 or ch == 0x22 or ch == 0x5c:
                break
        else:
            _out_room(o, n + 2)
            o.buf[o.len] = b'"'
            memcpy(o.buf + o.len + 1, p, n)
            o.buf[o.len + n + 1] = b'"'
            o.len += n + 2
            return 0
    elif type(v) is int:
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if not overflow:
            u = <unsigned long long>(-x) if x < 0 else <unsigned long long>x
            i = 24
            while True:
                i -= 1
                num[i] = <char>(48 + u % 10)
                u //= 10
                if u == 0:
                    break
            if x < 0:
                i -= 1
                num[i] = b'-'
            return _out_raw(o, num + i, 24 - i)
    return _out_bytes(o, _ev_encode(v))


cdef object _ev_encoder():
    global _ev_encode
    if _ev_encode is None:
        import msgspec
        _ev_encode = msgspec.json.Encoder().encode
    return _ev_encode


def accepted_lines(now, campaign, tenant, list ids, list rcpts):
    cdef object enc = _ev_encoder()
    cdef Py_ssize_t i, n = len(ids)
    cdef bytes head, mid
    cdef _Out* o = &_ev_out
    if len(rcpts) != n:
        raise ValueError("accepted_lines: ids and rcpts differ in length")
    head = b'{"time":' + enc(now) + b',"event":"accepted","id":'
    mid = b',"campaign":' + enc(campaign) + b',"tenant":' + enc(tenant) + b',"rcpt":'
    o.len = 0
    _out_room(o, n * 128 + 64)
    for i in range(n):
        _out_bytes(o, head)
        _out_value(o, ids[i])
        _out_bytes(o, mid)
        _out_value(o, rcpts[i])
        _out_raw(o, b',"schema":1}\n', 13)
    return _out_take(o)


def delivered_lines(now, list claims, list results):
    cdef object enc = _ev_encoder()
    cdef Py_ssize_t i, n = len(claims)
    cdef bytes head
    cdef object c, r, qid, last_r = None
    cdef _Out* o = &_ev_out
    cdef _Fields fc = None, fr = None
    # A row answered by the same object as the row before (a wire.Sent group
    # whose messages share their text: nearly every delivery) repeats that
    # row's answer fields: copied from where they were written.
    cdef Py_ssize_t mid_at = 0, mid_n = 0, q_at = 0, q_n = 0
    if len(results) != n:
        raise ValueError("delivered_lines: claims and results differ in length")
    head = b'{"time":' + enc(now) + b',"event":"delivered","id":'
    o.len = 0
    _out_room(o, n * 256 + 64)
    for i in range(n):
        c = claims[i]
        r = results[i]
        fc = _fields_for(c, fc, _CLAIM_LINE)
        _out_bytes(o, head)
        _out_value(o, _get(c, fc, 0))
        _out_raw(o, b',"campaign":', 12)
        _out_value(o, _get(c, fc, 1))
        _out_raw(o, b',"rcpt":', 8)
        _out_value(o, _get(c, fc, 2))
        if r is last_r:
            _out_room(o, mid_n)
            memcpy(o.buf + o.len, o.buf + mid_at, mid_n)
            o.len += mid_n
        else:
            fr = _fields_for(r, fr, _RES_LINE)
            mid_at = o.len
            _out_raw(o, b',"source_ip":', 13)
            _out_value(o, _get(r, fr, 0))
            _out_raw(o, b',"mx":', 6)
            _out_value(o, _get(r, fr, 1))
            _out_raw(o, b',"code":', 8)
            _out_value(o, _get(r, fr, 2))
            _out_raw(o, b',"enhanced":', 12)
            _out_value(o, _get(r, fr, 3))
            _out_raw(o, b',"text":', 8)
            _out_value(o, _get(r, fr, 4))
            mid_n = o.len - mid_at
        _out_raw(o, b',"attempt":', 11)
        _out_value(o, _get(c, fc, 3) + 1)
        if r is last_r:
            if q_n:
                _out_room(o, q_n)
                memcpy(o.buf + o.len, o.buf + q_at, q_n)
                o.len += q_n
        else:
            q_at = o.len
            qid = _get(r, fr, 5)
            if qid:
                _out_raw(o, b',"queue_id":', 12)
                _out_value(o, qid)
            q_n = o.len - q_at
            last_r = r
        _out_raw(o, b',"schema":1}\n', 13)
    return _out_take(o)
