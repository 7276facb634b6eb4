# _mime.pxi: compiled twin of fastsend.message.mime.qp_encode_text (the pure
# version there is the reference; names and behaviour are identical).
# Quoted-printable (RFC 2045) encoding of text bodies, one pass over UTF-8 bytes.

from libc.stdlib cimport malloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef char* _QP_HEX = b"0123456789ABCDEF"


def qp_encode_text(str text):
    """Quoted-printable UTF-8 encoding of ``text`` with CRLF line ends."""
    cdef bytes raw = text.encode("utf-8")
    cdef const unsigned char* s = raw
    cdef Py_ssize_t n = len(raw)
    cdef Py_ssize_t cap = 3 * n + n // 8 + 16
    cdef unsigned char* out = <unsigned char*> malloc(cap)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i = 0, o = 0, col = 0
    cdef unsigned char c, nx
    cdef bint enc
    try:
        while i < n:
            c = s[i]
            if c == 13 or c == 10:
                if c == 13 and i + 1 < n and s[i + 1] == 10:
                    i += 1
                out[o] = 13
                out[o + 1] = 10
                o += 2
                col = 0
                i += 1
                continue
            if c == 32 or c == 9:
                if i + 1 == n:
                    enc = True
                else:
                    nx = s[i + 1]
                    enc = nx == 13 or nx == 10
            else:
                enc = not (33 <= c <= 126 and c != 61)
            if enc:
                if col + 3 > 75:
                    out[o] = 61
                    out[o + 1] = 13
                    out[o + 2] = 10
                    o += 3
                    col = 0
                out[o] = 61
                out[o + 1] = _QP_HEX[c >> 4]
                out[o + 2] = _QP_HEX[c & 15]
                o += 3
                col += 3
            else:
                if col + 1 > 75:
                    out[o] = 61
                    out[o + 1] = 13
                    out[o + 2] = 10
                    o += 3
                    col = 0
                out[o] = c
                o += 1
                col += 1
            i += 1
        return PyBytes_FromStringAndSize(<char*> out, o)
    finally:
        free(out)


def splice(tuple literals, tuple names, tuple defaults, variables):
    """Template splice (twin of fastsend.message.template.splice)."""
    cdef Py_ssize_t k, m = len(names)
    if m == 0:
        return literals[0]
    cdef list parts = [None] * (2 * m + 1)
    parts[0] = literals[0]
    cdef object v, d
    cdef bint isdict = type(variables) is dict
    for k in range(m):
        if isdict:
            v = (<dict> variables).get(names[k])
        else:
            v = variables.get(names[k])
        if v is None or (not v and defaults[k] is not None):
            d = defaults[k]
            if d is None:
                raise KeyError(names[k])
            v = d
        parts[2 * k + 1] = v
        parts[2 * k + 2] = literals[k + 1]
    return "".join(parts)
