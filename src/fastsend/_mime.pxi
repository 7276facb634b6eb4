# _mime.pxi: compiled twins of fastsend.message.mime (qp_encode_text,
# qp_template) and fastsend.message.template.splice (the pure versions there
# are the reference; names and behaviour are identical).
# Quoted-printable (RFC 2045) encoding of text bodies, one pass over UTF-8 bytes.

from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_Check

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL

cdef char* _QP_HEX = b"0123456789ABCDEF"

# 1: printable ASCII other than "=" (always literal); 2: SP/TAB (literal unless
# before a line end); 3: CR/LF; 0: always =HH.
cdef unsigned char _QP_CLASS[256]


cdef void _qp_init() noexcept:
    cdef int b
    for b in range(256):
        _QP_CLASS[b] = 1 if (33 <= b <= 126 and b != 61) else 0
    _QP_CLASS[32] = 2
    _QP_CLASS[9] = 2
    _QP_CLASS[13] = 3
    _QP_CLASS[10] = 3


_qp_init()


cdef inline Py_ssize_t _qp_cap(Py_ssize_t n) noexcept nogil:
    return 3 * n + n // 8 + 16


cdef Py_ssize_t _qp_encode(const unsigned char* s, Py_ssize_t n,
                           unsigned char* out) noexcept nogil:
    """Quoted-printable of ``s`` into ``out`` (room: _qp_cap(n)); returns the length.

    Lines (between hard breaks) are cut with soft breaks so that no line passes
    76 octets: a break goes in when the next token would pass column 75.
    """
    cdef Py_ssize_t i = 0, o = 0, col = 0, j, lim
    cdef unsigned char c, k
    while i < n:
        c = s[i]
        k = _QP_CLASS[c]
        if k == 3:
            if c == 13 and i + 1 < n and s[i + 1] == 10:
                i += 1
            out[o] = 13
            out[o + 1] = 10
            o += 2
            col = 0
            i += 1
            continue
        if k == 1 or (k == 2 and i + 1 < n and _QP_CLASS[s[i + 1]] != 3):
            # a run of literal octets, up to column 75
            if col >= 75:
                out[o] = 61
                out[o + 1] = 13
                out[o + 2] = 10
                o += 3
                col = 0
            lim = i + (75 - col)
            if lim > n:
                lim = n
            j = i + 1
            while j < lim:
                k = _QP_CLASS[s[j]]
                if k == 1 or (k == 2 and j + 1 < n and _QP_CLASS[s[j + 1]] != 3):
                    j += 1
                else:
                    break
            memcpy(out + o, s + i, j - i)
            o += j - i
            col += j - i
            i = j
            continue
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
        i += 1
    return o


def qp_encode_text(str text):
    """Quoted-printable UTF-8 encoding of ``text`` with CRLF line ends."""
    cdef Py_ssize_t n
    cdef const unsigned char* s = <const unsigned char*> PyUnicode_AsUTF8AndSize(text, &n)
    cdef unsigned char* out = <unsigned char*> malloc(_qp_cap(n))
    if out == NULL:
        raise MemoryError()
    try:
        return PyBytes_FromStringAndSize(<char*> out, _qp_encode(s, n, out))
    finally:
        free(out)


cdef list _values(tuple names, tuple defaults, variables):
    """The value of each placeholder (as splice() chooses it; KeyError if missing)."""
    cdef Py_ssize_t k, m = len(names)
    cdef list vals = [None] * m
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
        vals[k] = v
    return vals


def qp_template(tuple literals, tuple names, tuple defaults, variables):
    """Quoted-printable of the spliced template; b"" when it is empty.

    Twin of ``qp_encode_text(splice(...)) if text else b""``, without the
    intermediate str: the UTF-8 of each piece (cached by Python for the
    literals) is copied into one buffer and encoded in one pass.
    """
    cdef Py_ssize_t k, m = len(names), total = 0, ln, pos = 0
    cdef list vals = _values(names, defaults, variables)
    cdef object piece
    cdef const char* p
    for k in range(m):
        if not PyUnicode_Check(vals[k]):
            raise TypeError(f"sequence item {2 * k + 1}: expected str instance, "
                            f"{type(vals[k]).__name__} found")
    cdef Py_ssize_t npieces = 2 * m + 1
    for k in range(npieces):
        piece = literals[k >> 1] if (k & 1) == 0 else vals[k >> 1]
        PyUnicode_AsUTF8AndSize(piece, &ln)
        total += ln
    if total == 0:
        return b""
    cdef unsigned char* src = NULL
    cdef unsigned char* out = NULL
    try:
        if m == 0:
            p = PyUnicode_AsUTF8AndSize(literals[0], &ln)
            out = <unsigned char*> malloc(_qp_cap(total))
            if out == NULL:
                raise MemoryError()
            return PyBytes_FromStringAndSize(
                <char*> out, _qp_encode(<const unsigned char*> p, ln, out))
        src = <unsigned char*> malloc(total)
        out = <unsigned char*> malloc(_qp_cap(total))
        if src == NULL or out == NULL:
            raise MemoryError()
        for k in range(npieces):
            piece = literals[k >> 1] if (k & 1) == 0 else vals[k >> 1]
            p = PyUnicode_AsUTF8AndSize(piece, &ln)
            memcpy(src + pos, p, ln)
            pos += ln
        return PyBytes_FromStringAndSize(<char*> out, _qp_encode(src, total, out))
    finally:
        free(src)
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


# -- header text (twin: fastsend.message.mime.text_header) ---------------------

cdef char* _B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


cdef Py_ssize_t _b64(const unsigned char* s, Py_ssize_t n, unsigned char* out) noexcept nogil:
    cdef Py_ssize_t i = 0, o = 0
    cdef unsigned int v
    while i + 3 <= n:
        v = (s[i] << 16) | (s[i + 1] << 8) | s[i + 2]
        out[o] = _B64[(v >> 18) & 63]
        out[o + 1] = _B64[(v >> 12) & 63]
        out[o + 2] = _B64[(v >> 6) & 63]
        out[o + 3] = _B64[v & 63]
        o += 4
        i += 3
    if n - i == 1:
        v = s[i] << 16
        out[o] = _B64[(v >> 18) & 63]
        out[o + 1] = _B64[(v >> 12) & 63]
        out[o + 2] = 61
        out[o + 3] = 61
        o += 4
    elif n - i == 2:
        v = (s[i] << 16) | (s[i + 1] << 8)
        out[o] = _B64[(v >> 18) & 63]
        out[o + 1] = _B64[(v >> 12) & 63]
        out[o + 2] = _B64[(v >> 6) & 63]
        out[o + 3] = 61
        o += 4
    return o


cdef int _text_kind(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """0: plain words (no encoding); 1: needs encoded-words; 2: CR/LF/NUL (refused)."""
    cdef Py_ssize_t i, word = 0
    cdef unsigned char c
    cdef int kind = 0
    if s[0] == 32 or s[n - 1] == 32:
        kind = 1
    for i in range(n):
        c = s[i]
        if c == 13 or c == 10 or c == 0:
            return 2
        if c == 32:
            if i + 1 < n and s[i + 1] == 32:
                kind = 1
            word = 0
        elif c < 33 or c > 126:
            kind = 1
        else:
            word += 1
            if word > 900 or (c == 61 and i + 1 < n and s[i + 1] == 63):
                kind = 1
    return kind


cdef class _Folder:
    """Writes ``Name: tok tok ...`` folded before a space at 78 columns."""
    cdef unsigned char* out
    cdef Py_ssize_t o, col, longest
    cdef bint first

    cdef inline void token(self, const unsigned char* t, Py_ssize_t n) noexcept:
        if not self.first and self.col + 1 + n > 78:
            self.out[self.o] = 13
            self.out[self.o + 1] = 10
            self.o += 2
            self.col = 0
        self.first = False
        self.out[self.o] = 32
        memcpy(self.out + self.o + 1, t, n)
        self.o += n + 1
        self.col += n + 1
        if self.col > self.longest:
            self.longest = self.col


def text_header(str name, str value):
    """An unstructured header line (Subject, X-*, ...) as bytes, folded, CRLF-terminated.

    Twin of ``unstructured_header(name, value).encode("utf-8")``; the rare
    cases (an error to report, names that are not short ASCII) are handed to it.
    """
    cdef Py_ssize_t nn, n, i, j, take, budget, cap, start
    cdef const unsigned char* nm
    cdef const unsigned char* s
    cdef int kind
    cdef unsigned char word[80]
    cdef _Folder f
    try:
        nm = <const unsigned char*> PyUnicode_AsUTF8AndSize(name, &nn)
        s = <const unsigned char*> PyUnicode_AsUTF8AndSize(value, &n)
    except UnicodeEncodeError:
        return _text_header_py(name, value)
    if n == 0 or nn > 60 or nn != len(name):
        return _text_header_py(name, value)
    kind = _text_kind(s, n)
    if kind == 2:
        return _text_header_py(name, value)
    cap = nn + 8 * n + 128
    f = _Folder()
    f.out = <unsigned char*> malloc(cap)
    if f.out == NULL:
        raise MemoryError()
    try:
        memcpy(f.out, nm, nn)
        f.out[nn] = 58
        f.o = f.col = f.longest = nn + 1
        f.first = True
        if kind == 0:
            start = 0
            for i in range(n + 1):
                if i == n or s[i] == 32:
                    f.token(s + start, i - start)
                    start = i + 1
        else:
            budget = 78 - nn - 2
            if budget < 24:
                budget = 24
            i = 0
            while i < n:
                take = ((min(budget, 75) - 12) // 4) * 3
                if take < 3:
                    take = 3
                j = min(i + take, n)
                while j < n and j > i and (s[j] & 0xC0) == 0x80:
                    j -= 1
                if j == i:
                    j = i + 1
                    while j < n and (s[j] & 0xC0) == 0x80:
                        j += 1
                if j - i > 45:  # never: take <= 45 and a character is <= 4 octets
                    return _text_header_py(name, value)
                memcpy(word, b"=?utf-8?b?", 10)
                take = 10 + _b64(s + i, j - i, word + 10)
                word[take] = 63
                word[take + 1] = 61
                f.token(word, take + 2)
                i = j
                budget = 75
        if f.longest > 998:
            return _text_header_py(name, value)
        f.out[f.o] = 13
        f.out[f.o + 1] = 10
        return PyBytes_FromStringAndSize(<char*> f.out, f.o + 2)
    finally:
        free(f.out)


def _text_header_py(name, value):
    from fastsend.message.headers import unstructured_header

    return unstructured_header(name, value).encode("utf-8")
