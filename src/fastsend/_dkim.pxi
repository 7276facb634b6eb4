# _dkim.pxi: compiled twins of the DKIM canonicalizations in
# fastsend.message.dkim (body_relaxed, body_simple, header_relaxed; RFC 6376
# 3.4). The pure versions there are the reference; behaviour is identical.

from libc.stdlib cimport malloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize


def body_relaxed(bytes body):
    """Relaxed body canonicalization (RFC 6376 3.4.4)."""
    cdef const unsigned char* s = body
    cdef Py_ssize_t n = len(body)
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


def header_relaxed(bytes line):
    """Relaxed canonicalization of one raw header line (RFC 6376 3.4.2)."""
    cdef const unsigned char* s = line
    cdef Py_ssize_t n = len(line)
    cdef unsigned char* out = <unsigned char*> malloc(n + 3)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i = 0, o = 0, colon = -1
    cdef unsigned char c
    cdef bint wsp = False, started = False
    try:
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
            if c == 13 and i + 1 < n and s[i + 1] == 10 and (
                i + 2 == n or s[i + 2] == 32 or s[i + 2] == 9
            ):
                i += 2
                continue
            if c == 32 or c == 9:
                wsp = True
            else:
                if wsp and started:
                    out[o] = 32
                    o += 1
                wsp = False
                started = True
                out[o] = c
                o += 1
            i += 1
        out[o] = 13
        out[o + 1] = 10
        o += 2
        return PyBytes_FromStringAndSize(<char*> out, o)
    finally:
        free(out)
