# _mime.pxi: compiled twins of fastsend.message.mime (qp_encode_text,
# qp_template) and fastsend.message.template.splice (the pure versions there
# are the reference; names and behaviour are identical).
# Quoted-printable (RFC 2045) encoding of text bodies, one pass over UTF-8 bytes.

cimport cython

from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_Check
from cpython.dict cimport PyDict_Copy

from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL
    int _PyBytes_Resize(PyObject** bytes, Py_ssize_t newsize) except -1
    PyObject* _bytes_new "PyBytes_FromStringAndSize" (const char* v, Py_ssize_t n) except NULL
    char* _bytes_buf "PyBytes_AS_STRING" (PyObject* o)
    void Py_XDECREF(PyObject* o)
    bint PyUnicode_IS_ASCII(object o)
    void Py_SET_SIZE(object o, Py_ssize_t size)
    PyObject* PyDict_GetItemWithError(object d, object key)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    const Py_ssize_t PY_SSIZE_T_MAX


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


cdef object _m_html_value = None


cdef list _values(tuple names, tuple defaults, variables, tuple escapes=None):
    """The value of each placeholder (as splice() chooses it; KeyError if
    missing), escaped where ``escapes`` says (template.html_value), in order
    (a missing value after a refused one: the refusal, as the pure splice)."""
    global _m_html_value
    cdef Py_ssize_t k, m = len(names)
    cdef list vals = [None] * m
    cdef object v, d
    cdef bint isdict = type(variables) is dict
    if escapes is not None and _m_html_value is None:
        from fastsend.message.template import html_value as _m_html_value
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
        if escapes is not None and escapes[k] and type(v) is str:
            v = _m_html_value(v, escapes[k], names[k])
        vals[k] = v
    return vals


# Pre-encoded static lines of long literals, keyed by the literal (a str, so
# equal text always maps to the same entry): (h, t, qp) where h is the byte
# offset just past the literal's first LF, t just past its last LF, and qp is
# the quoted-printable of bytes [h, t). Quoted-printable keeps no state across
# a hard line break (the column restarts at 0 and nothing looks back past an
# LF), so whole lines between the first and last LF of a literal encode the
# same whatever values surround them. None: a literal not worth splitting.
cdef dict _QP_LINES = {}
cdef object _QP_UNSEEN = object()
cdef Py_ssize_t _QP_LINES_MIN = 64  # octets of whole lines worth pre-encoding


cdef object _qp_lines(str literal):
    cdef object entry = _QP_LINES.get(literal, _QP_UNSEEN)
    if entry is not _QP_UNSEEN:
        return entry
    cdef Py_ssize_t n, h, t
    cdef const unsigned char* p = <const unsigned char*> PyUnicode_AsUTF8AndSize(literal, &n)
    cdef bytes raw = PyBytes_FromStringAndSize(<const char*> p, n)
    h = raw.find(b"\n") + 1
    t = raw.rfind(b"\n") + 1
    entry = None
    if h > 0 and t - h >= _QP_LINES_MIN:
        entry = (h, t, qp_encode_bytes(raw[h:t]))
    if len(_QP_LINES) >= 4096:  # many campaigns in one process: start over
        _QP_LINES.clear()
    _QP_LINES[literal] = entry
    return entry


cdef bytes qp_encode_bytes(bytes raw):
    cdef Py_ssize_t n = len(raw)
    cdef unsigned char* out = <unsigned char*> malloc(_qp_cap(n))
    if out == NULL:
        raise MemoryError()
    try:
        return PyBytes_FromStringAndSize(
            <char*> out, _qp_encode(<const unsigned char*> raw, n, out))
    finally:
        free(out)


def qp_template(tuple literals, tuple names, tuple defaults, variables, tuple escapes=None):
    """Quoted-printable of the spliced template; b"" when it is empty (twin of
    the pure ``qp_template``)."""
    return _qp_template(literals, names, defaults, variables, escapes)


cdef class _QPPlan:
    """One message's quoted-printable template, measured before it is written:
    the values, the pre-encoded lines of its long literals (``_QP_LINES``), the
    octets to encode and ``cap``, the room its encoding needs at most."""
    cdef tuple literals
    cdef list vals, lines
    cdef Py_ssize_t dyn, cap


cdef _QPPlan _qp_plan(tuple literals, tuple names, tuple defaults, variables,
                      tuple escapes=None):
    cdef Py_ssize_t k, m = len(names), dyn = 0, stat = 0, nseg = 1, ln, h, t
    cdef list vals = _values(names, defaults, variables, escapes)
    cdef object piece, entry
    for k in range(m):
        if not PyUnicode_Check(vals[k]):
            raise TypeError(f"sequence item {2 * k + 1}: expected str instance, "
                            f"{type(vals[k]).__name__} found")
    cdef Py_ssize_t npieces = 2 * m + 1
    cdef list lines = [None] * (m + 1)
    for k in range(npieces):
        if (k & 1) == 0:
            piece = literals[k >> 1]
            PyUnicode_AsUTF8AndSize(piece, &ln)
            if ln >= _QP_LINES_MIN:
                entry = _qp_lines(piece)
                if entry is not None:
                    lines[k >> 1] = entry
                    h = (<tuple> entry)[0]
                    t = (<tuple> entry)[1]
                    ln -= t - h
                    stat += len(<bytes> (<tuple> entry)[2])
                    nseg += 1
        else:
            PyUnicode_AsUTF8AndSize(vals[k >> 1], &ln)
        dyn += ln
    cdef _QPPlan plan = _QPPlan.__new__(_QPPlan)
    plan.literals = literals
    plan.vals = vals
    plan.lines = lines
    plan.dyn = dyn
    plan.cap = 0 if dyn + stat == 0 else _qp_cap(dyn) + 16 * nseg + stat
    return plan


cdef enum:
    _QP_STACK = 1024  # octets of _qp_write's scratch kept on the stack


cdef Py_ssize_t _qp_write(_QPPlan plan, unsigned char* out) except -1:
    """Write the planned encoding to ``out`` (room: ``plan.cap``); its length."""
    if plan.cap == 0:
        return 0
    cdef tuple literals = plan.literals
    cdef list vals = plan.vals, lines = plan.lines
    cdef Py_ssize_t k, npieces = 2 * len(vals) + 1, ln, pos = 0, seg = 0, o = 0, h, t
    cdef object piece, entry
    cdef const char* p
    # The octets to encode are usually a few hundred (the values and the parts
    # of lines around them): on the stack then. A malloc'd scratch buffer freed
    # per message left a small free chunk that made the next message's malloc
    # of its (large) bytes consolidate the heap each time.
    cdef unsigned char stack[_QP_STACK]
    cdef unsigned char* src = stack
    if plan.dyn + 1 > _QP_STACK:
        src = <unsigned char*> malloc(plan.dyn + 1)
        if src == NULL:
            raise MemoryError()
    try:
        for k in range(npieces):
            piece = literals[k >> 1] if (k & 1) == 0 else vals[k >> 1]
            p = PyUnicode_AsUTF8AndSize(piece, &ln)
            entry = lines[k >> 1] if (k & 1) == 0 else None
            if entry is None:
                memcpy(src + pos, p, ln)
                pos += ln
                continue
            h = (<tuple> entry)[0]
            t = (<tuple> entry)[1]
            memcpy(src + pos, p, h)  # up to and including the first LF
            pos += h
            o += _qp_encode(src + seg, pos - seg, out + o)
            seg = pos
            piece = (<tuple> entry)[2]
            memcpy(out + o, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))
            o += PyBytes_GET_SIZE(piece)
            memcpy(src + pos, p + t, ln - t)
            pos += ln - t
        o += _qp_encode(src + seg, pos - seg, out + o)
    finally:
        if src != stack:
            free(src)
    return o


cdef bytes _cut(PyObject* raw, Py_ssize_t n):
    """``raw``, a new bytes object made with room to spare whose only reference
    the caller hands over, cut to its first ``n`` octets in place (no copy)."""
    _PyBytes_Resize(&raw, n)  # on failure: the object freed, raw NULL, raised
    cdef bytes res = <bytes> raw
    Py_DECREF(res)  # the reference handed over (res holds its own)
    return res


cdef bytes _finish(PyObject* raw, Py_ssize_t o, Py_ssize_t extra, Py_ssize_t* spare):
    """``raw`` (see _cut), the message's ``o`` octets written, cut to them; with
    ``extra``, its allocation keeps ``extra`` octets past them and ``spare[0]``
    says so (Assembly._whole)."""
    cdef bytes msg = _cut(raw, o + extra)
    if extra:
        # The allocation keeps the extra octets; the object's size is the
        # message's (with its NUL after it, as every bytes object has).
        Py_SET_SIZE(msg, o)
        (<char*> PyBytes_AS_STRING(msg))[o] = 0
        if spare != NULL:
            spare[0] = extra
    return msg


cdef bytes _qp_template(tuple literals, tuple names, tuple defaults, variables,
                        tuple escapes=None):
    """Quoted-printable of the spliced template; b"" when it is empty.

    Twin of ``qp_encode_text(splice(...)) if text else b""``, without the
    intermediate str: the UTF-8 of each piece (cached by Python for the
    literals) is copied into one buffer and encoded in one pass, except the
    whole lines inside long literals, whose encoding is made once and copied
    (see ``_QP_LINES``).
    """
    cdef _QPPlan plan = _qp_plan(literals, names, defaults, variables, escapes)
    if plan.cap == 0:
        return b""
    # Encoded straight into the bytes returned (made with room to spare), cut
    # to size in place: no scratch buffer copied out at the end.
    cdef PyObject* raw = _bytes_new(NULL, plan.cap)
    try:
        n = _qp_write(plan, <unsigned char*> _bytes_buf(raw))
    except BaseException:
        Py_XDECREF(raw)
        raise
    return _cut(raw, n)


def splice(tuple literals, tuple names, tuple defaults, variables, tuple escapes=None):
    """Template splice (twin of fastsend.message.template.splice)."""
    cdef list vals, parts
    cdef Py_ssize_t k, m
    if escapes is None:
        return _splice(literals, names, defaults, variables)
    vals = _values(names, defaults, variables, escapes)
    m = len(vals)
    parts = [None] * (2 * m + 1)
    parts[0] = literals[0]
    for k in range(m):
        parts[2 * k + 1] = vals[k]
        parts[2 * k + 2] = literals[k + 1]
    return "".join(parts)


cdef str _splice(tuple literals, tuple names, tuple defaults, variables):
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


cdef struct _Fold:
    # Writes ``Name: tok tok ...`` folded before a space at 78 columns (_fold_token).
    unsigned char* out
    Py_ssize_t o, col, longest
    bint first


cdef inline void _fold_token(_Fold* f, const unsigned char* t, Py_ssize_t n) noexcept nogil:
    if not f.first and f.col + 1 + n > 78:
        f.out[f.o] = 13
        f.out[f.o + 1] = 10
        f.o += 2
        f.col = 0
    f.first = False
    f.out[f.o] = 32
    memcpy(f.out + f.o + 1, t, n)
    f.o += n + 1
    f.col += n + 1
    if f.col > f.longest:
        f.longest = f.col


def text_header(str name, str value):
    """An unstructured header line (Subject, X-*, ...) as bytes (twin of the pure
    ``text_header``)."""
    return _text_header(name, value)


cdef enum:
    _HEADER_STACK = 1024  # octets of _text_header's room kept on the stack


cdef bytes _text_header(str name, str value):
    """An unstructured header line (Subject, X-*, ...) as bytes, folded, CRLF-terminated.

    Twin of ``unstructured_header(name, value).encode("utf-8")``; the rare
    cases (an error to report, names that are not short ASCII) are handed to it.
    """
    cdef Py_ssize_t nn, n, cap, o
    cdef const unsigned char* nm
    cdef const unsigned char* s
    cdef unsigned char stack[_HEADER_STACK]
    cdef unsigned char* out = stack
    try:
        nm = <const unsigned char*> PyUnicode_AsUTF8AndSize(name, &nn)
        s = <const unsigned char*> PyUnicode_AsUTF8AndSize(value, &n)
    except UnicodeEncodeError:
        return _text_header_py(name, value)
    if nn > 60 or nn != len(name):
        return _text_header_py(name, value)
    cap = _text_cap(nn, n)
    if cap > _HEADER_STACK:  # a short header's room: on the stack (no malloc)
        out = <unsigned char*> malloc(cap)
        if out == NULL:
            raise MemoryError()
    try:
        o = _text_line(nm, nn, s, n, out)
        if o < 0:
            return _text_header_py(name, value)
        return PyBytes_FromStringAndSize(<char*> out, o)
    finally:
        if out != stack:
            free(out)


cdef inline Py_ssize_t _text_cap(Py_ssize_t nn, Py_ssize_t n) noexcept nogil:
    """Room _text_line needs at most for a name of ``nn`` and a value of ``n`` octets."""
    return nn + 8 * n + 128


cdef Py_ssize_t _text_line(const unsigned char* nm, Py_ssize_t nn, const unsigned char* s,
                           Py_ssize_t n, unsigned char* out) noexcept nogil:
    """The header line ``_text_header`` makes of the ASCII name ``nm`` (at most 60
    octets) and the UTF-8 value ``s``, written to ``out`` (room: _text_cap);
    its length, or -1 when the pure twin must make it (an empty value, CR, LF
    or NUL in it: the error to report; a line past 998 octets)."""
    cdef Py_ssize_t i, j, take, budget, start
    cdef int kind
    cdef unsigned char word[80]
    cdef _Fold f
    if n == 0:
        return -1
    kind = _text_kind(s, n)
    if kind == 2:
        return -1
    f.out = out
    memcpy(f.out, nm, nn)
    f.out[nn] = 58
    f.o = f.col = f.longest = nn + 1
    f.first = True
    if kind == 0:
        start = 0
        for i in range(n + 1):
            if i == n or s[i] == 32:
                _fold_token(&f, s + start, i - start)
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
                return -1
            memcpy(word, b"=?utf-8?b?", 10)
            take = 10 + _b64(s + i, j - i, word + 10)
            word[take] = 63
            word[take + 1] = 61
            _fold_token(&f, word, take + 2)
            i = j
            budget = 75
    if f.longest > 998:
        return -1
    f.out[f.o] = 13
    f.out[f.o + 1] = 10
    return f.o + 2


def _text_header_py(name, value):
    from fastsend.message.headers import unstructured_header

    return unstructured_header(name, value).encode("utf-8")


# -- URI list headers (twin: fastsend.message.mime.uri_header) ------------------

# Octets a value may hold to go into a URI unchanged (what quote() keeps as is).
cdef unsigned char _URL_SAFE[256]


cdef void _url_init() noexcept:
    cdef int b
    for b in range(256):
        _URL_SAFE[b] = (48 <= b <= 57) or (65 <= b <= 90) or (97 <= b <= 122) or (
            b == 95 or b == 46 or b == 45 or b == 126 or b == 64)


_url_init()


cdef bint _url_safe(str value) except -1:
    cdef Py_ssize_t i, n
    cdef const unsigned char* s = <const unsigned char*> PyUnicode_AsUTF8AndSize(value, &n)
    for i in range(n):
        if not _URL_SAFE[s[i]]:
            return False
    return True


cdef bint _uri_clean(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """No CR, LF, NUL, space, < or > (and, for the fast path, ASCII only)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = s[i]
        if c == 13 or c == 10 or c == 0 or c == 32 or c == 60 or c == 62 or c > 126:
            return False
    return True


def uri_header(str name, tuple uris, variables):
    """A ``<URI>, <URI>`` header line (List-Unsubscribe), folded, CRLF-terminated.

    Twin of the pure ``uri_header``. Fast path: values that percent-encoding
    leaves unchanged and ASCII URIs; anything else (an error to report, values
    to quote, non-ASCII) is handed to the pure twin.
    """
    cdef Py_ssize_t nn, n, k, cap, total = 0
    cdef const unsigned char* nm
    cdef const unsigned char* s
    cdef list toks = []
    cdef list vals, parts
    cdef tuple literals, names, defaults
    cdef object v
    cdef str tok
    cdef _Fold f
    if not uris:
        return _uri_header_py(name, uris, variables)
    try:
        nm = <const unsigned char*> PyUnicode_AsUTF8AndSize(name, &nn)
    except UnicodeEncodeError:
        return _uri_header_py(name, uris, variables)
    if nn > 60 or nn != len(name):
        return _uri_header_py(name, uris, variables)
    for k in range(len(uris)):
        literals, names, defaults = <tuple> uris[k]
        try:
            vals = _values(names, defaults, variables)
        except KeyError:
            return _uri_header_py(name, uris, variables)
        for v in vals:
            if not PyUnicode_Check(v) or not _url_safe(<str> v):
                return _uri_header_py(name, uris, variables)
        parts = [None] * (2 * len(vals) + 3)
        parts[0] = "<"
        parts[1] = literals[0]
        for n in range(len(vals)):
            parts[2 * n + 2] = vals[n]
            parts[2 * n + 3] = literals[n + 1]
        parts[len(parts) - 1] = ">," if k + 1 < len(uris) else ">"
        tok = "".join(parts)
        try:
            s = <const unsigned char*> PyUnicode_AsUTF8AndSize(tok, &n)
        except UnicodeEncodeError:
            return _uri_header_py(name, uris, variables)
        # the token less its "<" and ">"/">,": the URI itself
        if not _uri_clean(s + 1, n - (3 if k + 1 < len(uris) else 2)):
            return _uri_header_py(name, uris, variables)
        total += n + 3
        toks.append(tok)
    cap = nn + total + 16
    f.out = <unsigned char*> malloc(cap)
    if f.out == NULL:
        raise MemoryError()
    try:
        memcpy(f.out, nm, nn)
        f.out[nn] = 58
        f.o = f.col = f.longest = nn + 1
        f.first = True
        for tok in toks:
            s = <const unsigned char*> PyUnicode_AsUTF8AndSize(tok, &n)
            _fold_token(&f, s, n)
        if f.longest > 998:
            return _uri_header_py(name, uris, variables)
        f.out[f.o] = 13
        f.out[f.o + 1] = 10
        return PyBytes_FromStringAndSize(<char*> f.out, f.o + 2)
    finally:
        free(f.out)


def _uri_header_py(name, uris, variables):
    from fastsend.message.mime import PURE

    return PURE["uri_header"](name, uris, variables)


# -- addresses (twin: fastsend.message.headers.split_address) --------------------

# atext (RFC 5322 3.2.3): the octets of a dot-atom besides ".".
cdef unsigned char _ATEXT[256]


cdef void _atext_init() noexcept:
    cdef int b
    for b in range(256):
        _ATEXT[b] = (48 <= b <= 57) or (65 <= b <= 90) or (97 <= b <= 122)
    for b in b"!#$%&'*+-/=?^_`{|}~":
        _ATEXT[b] = 1


_atext_init()
cdef object _encode_domain = None


def split_address(str addr):
    """``(local, ascii_domain)`` of a bare address; HeaderError if it is not one.

    Twin of the pure ``split_address``. Fast path: an ASCII dot-atom local
    part of at most 64 octets (the domain goes through the same cached
    ``encode_domain``); anything else is handed to the pure twin.
    """
    global _encode_domain
    cdef Py_ssize_t at = -1
    cdef int kind = _address_plain(addr, &at)
    if kind == 0:
        return _split_address_py(addr)
    if kind == 2:
        return addr[:at], addr[at + 1:]
    if _encode_domain is None:
        from fastsend.message.headers import encode_domain

        _encode_domain = encode_domain
    return addr[:at], _encode_domain(addr[at + 1:])


cdef int _address_plain(str addr, Py_ssize_t* at_out) except -1:
    """What ``split_address`` does with ``addr``: 0, handed to the pure twin;
    1, an ASCII dot-atom local part whose domain goes through
    ``encode_domain``; 2, one whose domain is returned as it is (then
    ``local + "@" + domain`` is ``addr``). ``at_out``: where its "@" is."""
    cdef Py_ssize_t n, i, at = -1
    cdef const unsigned char* s
    cdef unsigned char c, prev = 46
    if not PyUnicode_IS_ASCII(addr):  # (then its UTF-8 is its characters, one octet each)
        return 0
    s = <const unsigned char*> PyUnicode_AsUTF8AndSize(addr, &n)
    for i in range(n - 1, -1, -1):
        if s[i] == 64:
            at = i
            break
    if at < 1 or at > 64 or at == n - 1 or s[at - 1] == 46:
        return 0
    for i in range(at):
        c = s[i]
        if c == 46:
            if prev == 46:  # a leading dot or two in a row
                return 0
        elif not _ATEXT[c]:
            return 0
        prev = c
    at_out[0] = at
    # The domain: LDH labels of 1-63 octets, no "-" at either end, an optional
    # final "." (the pure twin's _ASCII_DOMAIN) are returned as they are, as
    # encode_domain returns them; anything else goes through it (literals,
    # IDNA, the error).
    cdef bint plain = True
    cdef Py_ssize_t label = 0
    prev = 0
    for i in range(at + 1, n):
        c = s[i]
        if c == 13 or c == 10 or c == 0:
            return 0
        if c == 46:
            if label == 0 or prev == 45:
                plain = False
            label = 0
        elif (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or (c == 45 and label):
            label += 1
            if label > 63:
                plain = False
        else:
            plain = False
        prev = c
    return 2 if plain and prev != 45 else 1


def _split_address_py(addr):
    from fastsend.message.headers import PURE

    return PURE["split_address"](addr)


cdef inline const char* _utf8(object p, Py_ssize_t* n) except NULL:
    if type(p) is bytes:
        n[0] = PyBytes_GET_SIZE(p)
        return PyBytes_AS_STRING(p)
    return PyUnicode_AsUTF8AndSize(p, n)


cdef bytes _cat5(object p0, object p1, object p2, object p3, object p4):
    """``b"".join`` of the UTF-8 of five str or bytes pieces, in one allocation
    (``(p0 + p1 + ...).encode("utf-8")`` without the intermediate strs)."""
    cdef const char* ptr[5]
    cdef Py_ssize_t ln[5]
    cdef Py_ssize_t k, o = 0
    ptr[0] = _utf8(p0, &ln[0])
    ptr[1] = _utf8(p1, &ln[1])
    ptr[2] = _utf8(p2, &ln[2])
    ptr[3] = _utf8(p3, &ln[3])
    ptr[4] = _utf8(p4, &ln[4])
    cdef bytes out = PyBytes_FromStringAndSize(NULL, ln[0] + ln[1] + ln[2] + ln[3] + ln[4])
    cdef char* dst = PyBytes_AS_STRING(out)
    for k in range(5):
        memcpy(dst + o, ptr[k], ln[k])
        o += ln[k]
    return out


# -- the made message's fast path (Assembly._fast_make) ---------------------------
#
# What Assembly._personal makes of a message, written with no Python object
# but the message's bytes: the campaign's layout compiled once per Assembly
# (_Fast: each template's literals as UTF-8, the pre-encoded quoted-printable
# lines of its long literals, each placeholder's name as an index), and per
# message the values found where they lie -- in the recipient's JSON as the
# supervisor sent it (_json_flat: a flat object of strings without escapes)
# or in a dict's strs -- the header lines written into a scratch on the stack
# and the body encoded straight into the message's bytes. Anything it does not
# cover (an escape in the JSON, a value that is not a string, a header that
# must be refused or handed to the pure twin, a non-plain address, a layout
# with callables) is declined (None): the message is then made the usual way,
# which makes the same octets or raises what it raises.

cdef enum:
    _FAST_NAMES = 64  # distinct placeholder names a fast layout may have
    _FAST_PH = 128  # placeholders in one template
    _FAST_SEGS = 32  # body segments
    _FAST_HEAD = 8192  # octets of the header lines' scratch (on the stack)
    _FAST_VAL = 2048  # octets of a header value's scratch (on the stack)
    _FAST_NONE = -1  # a value that is missing (absent or null)
    _FAST_LINES = 64  # header lines


cdef class _FastTpl:
    """A template ``(literals, names, defaults)`` as _Fast writes it: the UTF-8
    of each literal and default, each placeholder's name index, and (quoted-
    printable bodies) each literal's pre-encoded whole lines (``_QP_LINES``)."""
    cdef tuple lits, defs, mids
    cdef Py_ssize_t m
    cdef int idx[_FAST_PH]
    cdef int esc[_FAST_PH]  # template.html_escapes' modes (0: none)
    cdef Py_ssize_t h[_FAST_PH + 1]
    cdef Py_ssize_t t[_FAST_PH + 1]


cdef class _FastEntry:
    """A header entry: ``kind`` 0 static bytes, 1 text (_text_line), 2 URIs."""
    cdef int kind
    cdef bytes static, name
    cdef _FastTpl tpl
    cdef tuple uris


cdef class _Fast:
    cdef list names  # name index -> str; 0: "email", 1: "message_id"
    cdef tuple name_utf8
    cdef const char* nptr[_FAST_NAMES]
    cdef Py_ssize_t nlen[_FAST_NAMES]
    cdef tuple head, tail, segs, content
    cdef bytes mime, from_domain
    cdef Py_ssize_t nlines  # header lines of a message

    cdef int index(self, str name) except -2:
        cdef int k
        if name in self.names:
            return self.names.index(name)
        if len(self.names) >= _FAST_NAMES:
            return -1
        self.names.append(name)
        return len(self.names) - 1

    cdef _FastTpl tpl(self, tuple literals, tuple names, tuple defaults, bint qp,
                      tuple escapes=None):
        """None when the template cannot be written by the fast path."""
        cdef _FastTpl t = _FastTpl.__new__(_FastTpl)
        cdef Py_ssize_t k, m = len(names)
        cdef object entry
        if m > _FAST_PH or len(literals) != m + 1 or len(defaults) != m:
            return None
        if escapes is not None and len(escapes) != m:
            return None
        t.m = m
        for k in range(m):
            t.esc[k] = 0 if escapes is None else <int> escapes[k]
        for k in range(m):
            if type(names[k]) is not str:
                return None
            t.idx[k] = self.index(names[k])
            if t.idx[k] < 0 or not (defaults[k] is None or type(defaults[k]) is str):
                return None
        for k in range(m + 1):
            if type(literals[k]) is not str:
                return None
        try:
            t.lits = tuple([(<str> x).encode("utf-8") for x in literals])
            t.defs = tuple([None if d is None else (<str> d).encode("utf-8") for d in defaults])
        except UnicodeEncodeError:
            return None
        mids = [None] * (m + 1)
        for k in range(m + 1):
            t.h[k] = t.t[k] = 0
            if qp and len(<bytes> t.lits[k]) >= _QP_LINES_MIN:
                entry = _qp_lines(literals[k])
                if entry is not None:
                    t.h[k] = (<tuple> entry)[0]
                    t.t[k] = (<tuple> entry)[1]
                    mids[k] = (<tuple> entry)[2]
        t.mids = tuple(mids)
        return t

    cdef _FastEntry entry(self, object e):
        cdef _FastEntry f = _FastEntry.__new__(_FastEntry)
        cdef tuple te
        cdef list uris
        if type(e) is bytes:
            f.kind = 0
            f.static = <bytes> e
            return f
        if type(e) is not tuple:
            return None
        te = <tuple> e
        if len(te) not in (2, 4) or type(te[0]) is not str:
            return None
        if not (<str> te[0]).isascii() or len(<str> te[0]) > 60:
            return None
        f.name = (<str> te[0]).encode("ascii")
        if len(te) == 4:
            f.kind = 1
            f.tpl = self.tpl(te[1], te[2], te[3], False)
            return f if f.tpl is not None else None
        if type(te[1]) is not tuple or not te[1]:
            return None
        f.kind = 2
        uris = []
        for u in <tuple> te[1]:
            if type(u) is not tuple or len(<tuple> u) != 3:
                return None
            t = self.tpl((<tuple> u)[0], (<tuple> u)[1], (<tuple> u)[2], False)
            if t is None:
                return None
            uris.append(t)
        f.uris = tuple(uris)
        return f


cdef _Fast _fast_layout(Assembly a):
    """The fast path's layout of ``a``, or None when it has a part the fast
    path does not write (a callable entry or segment, a signer)."""
    cdef _Fast fp = _Fast.__new__(_Fast)
    cdef list out
    cdef object x
    cdef _FastEntry fe
    cdef _FastTpl t
    if (a.signer is not None and a.signer.mode == 0) or len(a.segments) > _FAST_SEGS:
        return None
    fp.names = ["email", "message_id"]
    for which in range(2):
        out = []
        for x in (a.head if which == 0 else a.tail):
            fe = fp.entry(x)
            if fe is None:
                return None
            out.append(fe)
        if which == 0:
            fp.head = tuple(out)
        else:
            fp.tail = tuple(out)
    out = []
    for x in a.segments:
        if type(x) is bytes:
            out.append(x)
        elif type(x) is tuple and len(<tuple> x) in (3, 4):
            t = fp.tpl((<tuple> x)[0], (<tuple> x)[1], (<tuple> x)[2], True,
                       (<tuple> x)[3] if len(<tuple> x) == 4 else None)
            if t is None:
                return None
            out.append(t)
        else:
            return None
    fp.segs = tuple(out)
    for x in a.content:
        if type(x) is not bytes:
            return None
    fp.content = a.content
    fp.nlines = len(fp.head) + len(fp.tail) + len(a.content) + 3 + (not a.to_custom)
    if fp.nlines > _FAST_LINES:
        return None
    if a.signer is not None:
        for x in a.signer.idx:
            if type(x) is not int or not 0 <= x < fp.nlines:
                return None
    fp.mime = b"MIME-Version: 1.0\r\n"
    try:
        fp.from_domain = a.from_domain.encode("utf-8")
        fp.name_utf8 = tuple([(<str> n).encode("utf-8") for n in fp.names])
    except UnicodeEncodeError:
        return None
    for k in range(len(fp.names)):
        fp.nptr[k] = PyBytes_AS_STRING(fp.name_utf8[k])
        fp.nlen[k] = PyBytes_GET_SIZE(fp.name_utf8[k])
    return fp


cdef inline Py_ssize_t _utf8_char(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The length of the valid UTF-8 character at ``s[i]`` (not ASCII), or 0
    (what Python's strict decoder refuses: overlong forms, surrogates, past
    U+10FFFF, cut short)."""
    cdef unsigned char c = s[i], c1
    if 0xC2 <= c <= 0xDF:
        return 2 if i + 1 < n and (s[i + 1] & 0xC0) == 0x80 else 0
    if i + 1 >= n:
        return 0
    c1 = s[i + 1]
    if 0xE0 <= c <= 0xEF:
        if i + 2 >= n or (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
            return 0
        if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 > 0x9F):
            return 0
        return 3
    if 0xF0 <= c <= 0xF4:
        if i + 3 >= n or (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
            return 0
        if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 > 0x8F):
            return 0
        return 4
    return 0


cdef inline Py_ssize_t _json_str(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The end (the closing quote's index) of the JSON string whose first
    character is at ``s[i]``, when it has no escape, no control character and
    is valid UTF-8; else -1."""
    cdef unsigned char c
    cdef Py_ssize_t k
    while i < n:
        c = s[i]
        if c == 34:
            return i
        if c < 0x20 or c == 92:
            return -1
        if c < 0x80:
            i += 1
        else:
            k = _utf8_char(s, i, n)
            if k == 0:
                return -1
            i += k
    return -1


cdef inline Py_ssize_t _json_ws(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == 32 or s[i] == 10 or s[i] == 13 or s[i] == 9):
        i += 1
    return i


cdef int _json_flat(const unsigned char* s, Py_ssize_t n, _Fast fp, const char** vp,
                    Py_ssize_t* vl) noexcept:
    """The values of ``fp``'s names (from index 2) in the JSON object ``s``,
    when it is an object of strings (or nulls: missing) with no escape in its
    keys or strings (what the supervisor sends for a CSV row): ``vp``/``vl``
    point into ``s``; 0. Anything else (another JSON, what orjson.loads
    refuses, a name given twice): -1."""
    cdef Py_ssize_t i, ks, ke, vs, ve, j, nn = len(fp.names)
    i = _json_ws(s, 0, n)
    if i >= n or s[i] != 123:  # "{"
        return -1
    i = _json_ws(s, i + 1, n)
    if i < n and s[i] == 125:  # "}"
        return 0 if _json_ws(s, i + 1, n) == n else -1
    while True:
        if i >= n or s[i] != 34:
            return -1
        ks = i + 1
        ke = _json_str(s, ks, n)
        if ke < 0:
            return -1
        i = _json_ws(s, ke + 1, n)
        if i >= n or s[i] != 58:  # ":"
            return -1
        i = _json_ws(s, i + 1, n)
        if i >= n:
            return -1
        if s[i] == 34:
            vs = i + 1
            ve = _json_str(s, vs, n)
            if ve < 0:
                return -1
            i = ve + 1
        elif i + 4 <= n and memcmp(s + i, b"null", 4) == 0:
            vs = -1
            ve = 0
            i += 4
        else:
            return -1
        for j in range(2, nn):
            if fp.nlen[j] == ke - ks and memcmp(fp.nptr[j], s + ks, ke - ks) == 0:
                if vl[j] != _FAST_NONE or vp[j] != NULL:  # given twice
                    return -1
                if vs >= 0:
                    vp[j] = <const char*> s + vs
                    vl[j] = ve - vs
                else:
                    vp[j] = <const char*> s  # (seen: null)
                break
        i = _json_ws(s, i, n)
        if i >= n:
            return -1
        if s[i] == 44:  # ","
            i = _json_ws(s, i + 1, n)
            continue
        if s[i] == 125:
            return 0 if _json_ws(s, i + 1, n) == n else -1
        return -1


cdef bint _html_clean(const unsigned char* s, Py_ssize_t n, int mode) noexcept nogil:
    """Whether template.html_value leaves these UTF-8 octets as they are
    (``mode``: its bits 1 HTML, 2 unquoted, 4 URL start, 8 a name, 16 URL
    path segment, 32 URL component, 64 JavaScript, 128 CSS, 256 CSS url()): False
    when it might not (the value is then written the usual way). A value
    with a backslash is not clean either (made the usual way, as the JSON
    reader leaves an escaped string)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    cdef bint alnum
    if mode & 4 and _url_scheme_unsafe(s, n):
        return False
    for i in range(n):
        c = s[i]
        if c == 38 or c == 60 or c == 62 or c == 34 or c == 39 or c == 92 or c >= 128:
            if c < 128 or mode & 0x1F0:
                return False  # (non-ASCII: percent-encoded, escaped or checked by the pure twin)
        alnum = (48 <= c <= 57) or (97 <= (c | 32) <= 122)
        if mode & 64:  # JavaScript: [A-Za-z0-9_.]
            if not (alnum or c == 95 or c == 46):
                return False
        elif mode & 128:  # CSS: [A-Za-z0-9 #%.,+-_/]
            if not (alnum or c == 32 or c == 35 or c == 37 or c == 46 or c == 44 or c == 43
                    or c == 45 or c == 95 or c == 47):
                return False
        elif mode & 32:  # URL component: [A-Za-z0-9-._~]
            if not (alnum or c == 45 or c == 46 or c == 95 or c == 126):
                return False
        elif mode & 16:  # URL path segment: and + @ (not "." nor "..")
            if not (alnum or c == 45 or c == 46 or c == 95 or c == 126 or c == 43 or c == 64):
                return False
            if n <= 2 and s[0] == 46 and s[n - 1] == 46:
                return False
        elif mode & 256:  # a whole URL in CSS url(): RFC 3986's but ' ( ) and %
            if not (alnum or c == 45 or c == 46 or c == 95 or c == 126 or c == 58 or c == 47
                    or c == 63 or c == 35 or c == 91 or c == 93 or c == 64 or c == 33
                    or c == 36 or c == 42 or c == 43 or c == 44 or c == 59 or c == 61):
                return False
        if mode & 2 and not (alnum or c == 45 or c == 95
                             or (not mode & 8 and (c == 46 or c == 58 or c == 47))):
            return False
    return True


cdef bint _url_scheme_unsafe(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Twin of template.url_scheme_unsafe: a URL (as a browser reads it:
    leading C0 controls and spaces dropped, tabs and line ends anywhere
    ignored) whose scheme is not http, https, mailto, tel or cid."""
    cdef unsigned char b[7]
    cdef Py_ssize_t i = 0, k = 0
    cdef unsigned char c
    while i < n and s[i] <= 32:
        i += 1
    if i >= n or not (97 <= (s[i] | 32) <= 122):
        return False  # no scheme: a relative URL
    while i < n:
        c = s[i]
        i += 1
        if c == 9 or c == 10 or c == 13:
            continue
        if c == 58:  # ":"
            break
        if not ((48 <= c <= 57) or (97 <= (c | 32) <= 122) or c == 43 or c == 46 or c == 45):
            return False  # "/", "?", "#" ... before any ":": relative
        if k < 7:
            b[k] = c | 32 if 65 <= c <= 90 else c
        k += 1
    else:
        return False  # no ":"
    if k == 4 and memcmp(b, b"http", 4) == 0:
        return False
    if k == 5 and memcmp(b, b"https", 5) == 0:
        return False
    if k == 6 and memcmp(b, b"mailto", 6) == 0:
        return False
    return not (k == 3 and (memcmp(b, b"tel", 3) == 0 or memcmp(b, b"cid", 3) == 0))


cdef int _dict_values(dict d, _Fast fp, const char** vp, Py_ssize_t* vl) except -2:
    """The values of ``fp``'s names (from index 2) in ``d``: 0; -1 when one is
    not a str (or has no UTF-8)."""
    cdef Py_ssize_t j
    cdef PyObject* v
    for j in range(2, len(fp.names)):
        v = PyDict_GetItemWithError(d, fp.names[j])
        if v == NULL:
            if PyErr_Occurred():
                PyErr_Clear()
                return -1
            continue
        if <object> v is None:
            continue
        if type(<object> v) is not str:
            return -1
        try:
            vp[j] = PyUnicode_AsUTF8AndSize(<object> v, &vl[j])
        except UnicodeEncodeError:
            return -1
    return 0


cdef inline Py_ssize_t _tpl_values(_FastTpl t, const char** vp, Py_ssize_t* vl,
                                   const char** pp, Py_ssize_t* pl) noexcept:
    """Each placeholder's value (as splice() chooses it) into ``pp``/``pl``;
    the spliced text's length, or -1 when one is missing (KeyError) or its
    HTML escaping would change it (``t.esc``: then made the usual way)."""
    cdef Py_ssize_t k, j, total = 0
    cdef object d
    for k in range(t.m):
        j = t.idx[k]
        if vl[j] > 0 or (vl[j] == 0 and t.defs[k] is None):
            pp[k] = vp[j]
            pl[k] = vl[j]
        else:
            d = t.defs[k]
            if d is None:
                return -1
            pp[k] = PyBytes_AS_STRING(d)
            pl[k] = PyBytes_GET_SIZE(d)
        if t.esc[k] and not _html_clean(<const unsigned char*> pp[k], pl[k], t.esc[k]):
            return -1
        total += pl[k]
    for k in range(t.m + 1):
        total += PyBytes_GET_SIZE(t.lits[k])
    return total


cdef inline Py_ssize_t _tpl_splice(_FastTpl t, const char** pp, Py_ssize_t* pl,
                                   unsigned char* out) noexcept:
    cdef Py_ssize_t k, o = 0, ln
    cdef object lit
    for k in range(t.m + 1):
        lit = t.lits[k]
        ln = PyBytes_GET_SIZE(lit)
        memcpy(out + o, PyBytes_AS_STRING(lit), ln)
        o += ln
        if k < t.m:
            memcpy(out + o, pp[k], pl[k])
            o += pl[k]
    return o


cdef Py_ssize_t _qp_fast_cap(_FastTpl t, const char** pp, Py_ssize_t* pl, Py_ssize_t* dyn) noexcept:
    """_qp_plan's measure of ``t`` with these values: the room its encoding
    needs at most (0: empty), the octets to encode in ``dyn``."""
    cdef Py_ssize_t k, d = 0, stat = 0, nseg = 1
    cdef object mid
    for k in range(t.m + 1):
        d += PyBytes_GET_SIZE(t.lits[k])
        mid = t.mids[k]
        if mid is not None:
            d -= t.t[k] - t.h[k]
            stat += PyBytes_GET_SIZE(mid)
            nseg += 1
        if k < t.m:
            d += pl[k]
    dyn[0] = d
    return 0 if d + stat == 0 else _qp_cap(d) + 16 * nseg + stat


cdef Py_ssize_t _qp_fast_write(_FastTpl t, const char** pp, Py_ssize_t* pl, Py_ssize_t dyn,
                               unsigned char* out) except -1:
    """_qp_write of ``t`` with these values (the same octets)."""
    cdef Py_ssize_t k, ln, pos = 0, seg = 0, o = 0, h, e
    cdef object lit, mid
    cdef const char* p
    cdef unsigned char stack[_QP_STACK]
    cdef unsigned char* src = stack
    if dyn + 1 > _QP_STACK:
        src = <unsigned char*> malloc(dyn + 1)
        if src == NULL:
            raise MemoryError()
    try:
        for k in range(t.m + 1):
            lit = t.lits[k]
            p = PyBytes_AS_STRING(lit)
            ln = PyBytes_GET_SIZE(lit)
            mid = t.mids[k]
            if mid is None:
                memcpy(src + pos, p, ln)
                pos += ln
            else:
                h = t.h[k]
                e = t.t[k]
                memcpy(src + pos, p, h)  # up to and including the first LF
                pos += h
                o += _qp_encode(src + seg, pos - seg, out + o)
                seg = pos
                memcpy(out + o, PyBytes_AS_STRING(mid), PyBytes_GET_SIZE(mid))
                o += PyBytes_GET_SIZE(mid)
                memcpy(src + pos, p + e, ln - e)
                pos += ln - e
            if k < t.m:
                memcpy(src + pos, pp[k], pl[k])
                pos += pl[k]
        o += _qp_encode(src + seg, pos - seg, out + o)
    finally:
        if src != stack:
            free(src)
    return o


cdef Py_ssize_t _fast_entry(_FastEntry e, const char** vp, Py_ssize_t* vl, unsigned char* w,
                            Py_ssize_t o) noexcept:
    """Write header entry ``e`` at ``w + o`` (room: _FAST_HEAD - o); the new
    offset, or -1 when the fast path declines it."""
    cdef const char* pp[_FAST_PH]
    cdef Py_ssize_t pl[_FAST_PH]
    cdef unsigned char val[_FAST_VAL]
    cdef Py_ssize_t n, nn, k, u, nu, r, j
    cdef _FastTpl t
    cdef _Fold f
    if e.kind == 0:
        n = PyBytes_GET_SIZE(e.static)
        if o + n > _FAST_HEAD:
            return -1
        memcpy(w + o, PyBytes_AS_STRING(e.static), n)
        return o + n
    nn = PyBytes_GET_SIZE(e.name)
    if o + nn + 1 > _FAST_HEAD:
        return -1
    if e.kind == 1:
        n = _tpl_values(e.tpl, vp, vl, pp, pl)
        if n < 0 or n > _FAST_VAL or o + _text_cap(nn, n) > _FAST_HEAD:
            return -1
        n = _tpl_splice(e.tpl, pp, pl, val)
        r = _text_line(<const unsigned char*> PyBytes_AS_STRING(e.name), nn, val, n, w + o)
        return -1 if r < 0 else o + r
    # URIs: each "<URI>" (values as percent-encoding leaves them, the URI
    # ASCII without CR, LF, NUL, space, < or >), folded as uri_header folds
    f.out = w + o
    memcpy(f.out, PyBytes_AS_STRING(e.name), nn)
    f.out[nn] = 58
    f.o = f.col = f.longest = nn + 1
    f.first = True
    nu = len(e.uris)
    for u in range(nu):
        t = <_FastTpl> e.uris[u]
        n = _tpl_values(t, vp, vl, pp, pl)
        if n < 0 or n + 3 > _FAST_VAL or o + f.o + n + 8 > _FAST_HEAD:
            return -1
        for k in range(t.m):
            for j in range(pl[k]):
                if not _URL_SAFE[<unsigned char> pp[k][j]]:
                    return -1
        val[0] = 60  # "<"
        n = 1 + _tpl_splice(t, pp, pl, val + 1)
        if not _uri_clean(val + 1, n - 1):
            return -1
        val[n] = 62  # ">"
        n += 1
        if u + 1 < nu:
            val[n] = 44  # ","
            n += 1
        _fold_token(&f, val, n)
    if f.longest > 998 or o + f.o + 2 > _FAST_HEAD:
        return -1
    f.out[f.o] = 13
    f.out[f.o + 1] = 10
    return o + f.o + 2


# -- message layout (twin: fastsend.message.mime.Assembly) ----------------------

cdef class Assembly:
    """The fixed layout of a campaign's messages, filled per recipient (twin of
    the pure ``Assembly``: same entries, segments and bytes out; headers and
    quoted-printable parts are made by the compiled functions above, without a
    Python call per piece)."""
    cdef readonly tuple head, tail, content, segments
    cdef readonly bint end_crlf, to_custom
    cdef readonly str from_domain
    cdef readonly MessageSigner signer
    cdef readonly Py_ssize_t guard  # see the pure Assembly
    cdef _Fast fast  # the fast path's layout (None: none), made at the first message
    cdef bint fast_made

    def __init__(self, tuple head, tuple tail, tuple content, tuple body, bint end_crlf,
                 bint to_custom=False, str from_domain="", MessageSigner signer=None,
                 Py_ssize_t guard=PY_SSIZE_T_MAX):
        self.guard = guard
        self.head = head
        self.tail = tail
        self.content = content
        self.segments = body
        self.end_crlf = end_crlf
        self.to_custom = to_custom
        self.from_domain = from_domain
        self.signer = signer

    def personal(self, variables, str rcpt, str message_id, bytes date, bint sign):
        """One recipient's message (or with ``sign``, its header lines and body):
        the variables ``email`` and ``message_id``, To and Message-ID made here."""
        return self._personal(variables, rcpt, message_id, date, _WHOLE + sign, False)

    def signed(self, variables, str rcpt, str message_id, bytes date):
        """The message ``personal`` makes, signed by ``signer`` (its
        DKIM-Signature line first), written in one buffer (``_whole``)."""
        if self.signer is None:
            raise TypeError("this Assembly has no signer")
        return self._personal(variables, rcpt, message_id, date, _SIGNED, False)

    def deferred(self, variables, str rcpt, str message_id, bytes date, fallback):
        """``personal(variables, rcpt, message_id, date, False)`` to be made
        later, when it is about to be sent (a :class:`DeferredMessage`)."""
        cdef DeferredMessage d = DeferredMessage.__new__(DeferredMessage)
        d.assembly = self
        d.variables = variables
        d.rcpt = rcpt
        d.message_id = message_id
        d.date = date
        d.fallback = fallback
        return d

    def envelopes(self, items, blobs, secret, bytes date, fallback, sender,
                  bint sender_utf8, needs_smtputf8, bint now=False):
        """Twin of the pure ``Assembly.envelopes``: per item an Envelope from
        ``sender`` (a str, or ``sender(token)``: VERP) whose data is this
        assembly's DeferredMessage, the Message-ID token and the
        DeferredMessage made here, no Python call per message but the
        Envelope's (and ``needs_smtputf8`` for a non-ASCII recipient, and a
        VERP sender's). With ``now``, each message is made here too, with
        the client's room past its end (``DeferredMessage.made``)."""
        global _m_Envelope, _m_blob_digest
        if _m_Envelope is None:
            from fastsend.outcome import Envelope as _m_Envelope
            from fastsend.wire import blob_digest as _m_blob_digest
        cdef list out = []
        cdef DeferredMessage d
        cdef str rcpt
        cdef bint utf8
        cdef object vs, rid, digest, mail_from = sender
        cdef bint one = type(sender) is str
        cdef _Fields f = None
        for it in items:
            # (a wire.Item's fields read from their slots, _events.pxi's _Fields)
            f = _fields_for(it, f, _ITEM_FIELDS)
            rcpt = _get(it, f, 1)
            rid = _get(it, f, 0)
            vs = _get(it, f, 2)
            if blobs:
                digest = _m_blob_digest(vs)
                if digest:
                    vs = blobs[digest]
            d = DeferredMessage.__new__(DeferredMessage)
            d.assembly = self
            d.variables = vs
            d.rcpt = rcpt
            d.message_id = _token(rid, secret)
            d.date = date
            d.fallback = fallback
            if now:
                d._make_now()
            if not one:
                mail_from = sender(d.message_id)
            utf8 = sender_utf8 or (not PyUnicode_IS_ASCII(rcpt) and needs_smtputf8(rcpt))
            out.append(_m_Envelope(mail_from, [rcpt], d, rid, utf8))
        return out

    cdef object _personal(self, variables, str rcpt, str message_id, bytes date, int make,
                          bint own, Py_ssize_t extra=0, Py_ssize_t* spare=NULL):
        # ``make``: _WHOLE, _PARTS (the header lines and the body, to sign) or
        # _SIGNED (signed by ``signer``). ``own``: a dict of the caller's own
        # (just decoded), filled in place. ``extra``, ``spare``: see _whole.
        cdef dict vs
        cdef object fast
        if make == _WHOLE or (make == _SIGNED and self.signer.mode):
            fast = self._fast_make(variables, rcpt, message_id, date, extra, spare,
                                   make == _SIGNED)
            if fast is not None:
                return fast
        if own and type(variables) is dict:
            vs = <dict>variables
        else:
            vs = PyDict_Copy(variables) if type(variables) is dict else dict(variables)
        cdef bytes to = b""
        cdef str mid = message_id
        vs["email"] = rcpt
        vs["message_id"] = message_id
        cdef Py_ssize_t at = -1
        if _address_plain(rcpt, &at) == 2:  # split_address would return it as it is
            if not self.to_custom:
                to = _cat5(b"To: ", rcpt, b"\r\n", b"", b"")
        else:
            local, domain = split_address(rcpt)  # (or raises HeaderError)
            if not self.to_custom:
                to = _cat5(b"To: ", local, b"@", domain, b"\r\n")
        if not _message_id_safe(message_id):
            from fastsend.message.verp import encode_id

            mid = encode_id(message_id)
        cdef bytes mid_line = _cat5(b"Message-ID: <", mid, b"@", self.from_domain, b">\r\n")
        cdef list lines = self._headers(vs, to, date, mid_line)
        if make == _WHOLE:
            return self._whole(lines, vs, None, extra, spare)
        if make == _SIGNED:
            if self.signer.mode:
                return self._whole(lines, vs, self.signer, extra, spare)
            return self.signer.message(lines, self._body(vs))
        return lines, self._body(vs)

    def _fast_made_by(self, variables, str rcpt, str message_id, bytes date, bint sign=False):
        """What the fast path makes of this message (signed: ``signed``'s), or
        None (tests)."""
        return self._fast_make(variables, rcpt, message_id, date, 0, NULL, sign)

    cdef object _fast_make(self, object variables, str rcpt, str message_id, bytes date,
                           Py_ssize_t extra, Py_ssize_t* spare, bint sign=False):
        """The message ``_personal(..., _WHOLE, ...)`` makes (with ``sign``,
        ``_SIGNED``'s: the signer's line in the room kept for it, the header
        lines hashed where they lie), written by the fast path (see _Fast)
        from ``variables`` (a dict, or the recipient's JSON as bytes): no
        Python object but the message. None when the fast path declines it
        (then made the usual way)."""
        if not self.fast_made:
            self.fast_made = True
            try:
                self.fast = _fast_layout(self)
            except Exception:  # (a layout it does not know: the usual way, always)
                self.fast = None
        cdef _Fast fp = self.fast
        if fp is None:
            return None
        cdef const char* vp[_FAST_NAMES]
        cdef Py_ssize_t vl[_FAST_NAMES]
        cdef Py_ssize_t k, nn = len(fp.names), o = 0, n, at = -1, cap, b
        cdef Py_ssize_t caps[_FAST_SEGS]
        cdef Py_ssize_t dyns[_FAST_SEGS]
        cdef const char* pp[_FAST_PH]
        cdef Py_ssize_t pl[_FAST_PH]
        cdef unsigned char hw[_FAST_HEAD]
        cdef Py_ssize_t spans[2 * _FAST_LINES]
        cdef Py_ssize_t line = 0, room = 0
        cdef object seg
        cdef _FastEntry e
        cdef unsigned char* w
        cdef MessageSigner signer = self.signer if sign else None
        if sign and (signer is None or signer.mode == 0):
            return None
        for k in range(nn):
            vp[k] = NULL
            vl[k] = _FAST_NONE
        if type(variables) is bytes:
            if _json_flat(<const unsigned char*> PyBytes_AS_STRING(variables),
                          PyBytes_GET_SIZE(variables), fp, vp, vl) < 0:
                return None
        elif type(variables) is dict:
            if _dict_values(<dict> variables, fp, vp, vl) < 0:
                return None
        else:
            return None
        # To (and the variable email): an address split_address returns as it
        # is (ASCII); Message-ID: an id written as it is (message_id_safe).
        if _address_plain(rcpt, &at) != 2 or not _message_id_safe(message_id):
            return None
        vp[0] = PyUnicode_AsUTF8AndSize(rcpt, &vl[0])
        vp[1] = PyUnicode_AsUTF8AndSize(message_id, &vl[1])
        for e in fp.head:
            spans[2 * line] = o
            o = _fast_entry(e, vp, vl, hw, o)
            if o < 0:
                return None
            spans[2 * line + 1] = o
            line += 1
        n = PyBytes_GET_SIZE(date) + PyBytes_GET_SIZE(fp.mime) + PyBytes_GET_SIZE(fp.from_domain)
        if o + vl[0] + vl[1] + n + 32 > _FAST_HEAD:
            return None
        if not self.to_custom:
            spans[2 * line] = o
            memcpy(hw + o, b"To: ", 4)
            memcpy(hw + o + 4, vp[0], vl[0])
            o += 4 + vl[0]
            hw[o] = 13
            hw[o + 1] = 10
            o += 2
            spans[2 * line + 1] = o
            line += 1
        spans[2 * line] = o
        memcpy(hw + o, PyBytes_AS_STRING(date), PyBytes_GET_SIZE(date))
        o += PyBytes_GET_SIZE(date)
        spans[2 * line + 1] = spans[2 * line + 2] = o
        line += 1
        memcpy(hw + o, b"Message-ID: <", 13)
        memcpy(hw + o + 13, vp[1], vl[1])
        o += 13 + vl[1]
        hw[o] = 64  # "@"
        memcpy(hw + o + 1, PyBytes_AS_STRING(fp.from_domain), PyBytes_GET_SIZE(fp.from_domain))
        o += 1 + PyBytes_GET_SIZE(fp.from_domain)
        memcpy(hw + o, b">\r\n", 3)
        o += 3
        spans[2 * line + 1] = spans[2 * line + 2] = o
        line += 1
        memcpy(hw + o, PyBytes_AS_STRING(fp.mime), PyBytes_GET_SIZE(fp.mime))
        o += PyBytes_GET_SIZE(fp.mime)
        spans[2 * line + 1] = o
        line += 1
        for e in fp.tail:
            spans[2 * line] = o
            o = _fast_entry(e, vp, vl, hw, o)
            if o < 0:
                return None
            spans[2 * line + 1] = o
            line += 1
        for seg in fp.content:
            n = PyBytes_GET_SIZE(seg)
            if o + n + 2 > _FAST_HEAD:
                return None
            spans[2 * line] = o
            memcpy(hw + o, PyBytes_AS_STRING(seg), n)
            o += n
            spans[2 * line + 1] = o
            line += 1
        if o + 2 > _FAST_HEAD:
            return None
        hw[o] = 13
        hw[o + 1] = 10
        o += 2
        # The body's room: each segment's as _whole measures it.
        cap = o + 2
        for k in range(len(fp.segs)):
            seg = fp.segs[k]
            if type(seg) is bytes:
                caps[k] = PyBytes_GET_SIZE(seg)
            else:
                if _tpl_values(<_FastTpl> seg, vp, vl, pp, pl) < 0:
                    return None
                caps[k] = _qp_fast_cap(<_FastTpl> seg, pp, pl, &dyns[k])
            cap += caps[k]
        if extra < 0:
            extra = 0
        if signer is not None:
            room = signer._reserve()
            for k in range(2 * line):
                spans[k] += room  # (where the lines lie in the message)
        cdef PyObject* raw = _bytes_new(NULL, room + cap + extra)
        try:
            w = <unsigned char*> _bytes_buf(raw) + room
            memcpy(w, hw, o)
            b = o  # the body starts here
            for k in range(len(fp.segs)):
                seg = fp.segs[k]
                if type(seg) is bytes:
                    memcpy(w + o, PyBytes_AS_STRING(seg), caps[k])
                    o += caps[k]
                elif caps[k]:
                    _tpl_values(<_FastTpl> seg, vp, vl, pp, pl)
                    o += _qp_fast_write(<_FastTpl> seg, pp, pl, dyns[k], w + o)
            if self.end_crlf and o > b and not (o - b >= 2 and w[o - 2] == 13 and w[o - 1] == 10):
                w[o] = 13
                w[o + 1] = 10
                o += 2
        except BaseException:
            Py_XDECREF(raw)
            raise
        cdef bytes msg = _finish(raw, room + o, extra, spare)
        if signer is not None:
            signer._sign_into(msg, room, None, room + b, o - b, spans)
        return msg

    cdef bytes _whole(self, list lines, object variables, MessageSigner signer,
                      Py_ssize_t extra=0, Py_ssize_t* spare=NULL):
        """The header lines, the empty line and the body, written into one
        bytes object (the quoted-printable parts encoded in place): the
        message's octets are written once, in one allocation, not once per
        part and again to join them. With ``signer``, room for the
        DKIM-Signature line is kept before the header lines, and it is
        written there once the rest is (the body hashed in place).

        With ``extra``, the bytes object's allocation keeps ``extra`` octets
        past its end (its size is the message's) and ``spare[0]`` says so:
        the SMTP client writes the end of DATA and the next commands there
        (``_smtp.pxi``, ``ClientCore._dot_end``) instead of copying the
        message into another object."""
        cdef Py_ssize_t k, nseg = len(self.segments), cap = 2, o, room = 0, head
        if signer is not None:
            room = signer._reserve()
        cdef list parts = [None] * nseg
        cdef object seg
        cdef tuple t
        cdef _QPPlan plan
        for k in range(len(lines)):
            seg = lines[k]
            if type(seg) is not bytes:  # (any buffer, as b"".join takes it)
                seg = lines[k] = b"".join((seg,))
            cap += PyBytes_GET_SIZE(seg)
        head = room + cap  # where the body starts: the header lines and the empty line
        for k in range(nseg):
            seg = self.segments[k]
            if type(seg) is bytes:
                parts[k] = seg
                cap += PyBytes_GET_SIZE(seg)
            elif type(seg) is tuple:
                t = <tuple> seg
                plan = _qp_plan(t[0], t[1], t[2], variables, t[3] if len(t) == 4 else None)
                parts[k] = plan
                cap += plan.cap
            else:
                seg = seg(variables)
                if type(seg) is not bytes:
                    seg = b"".join((seg,))
                parts[k] = seg
                cap += PyBytes_GET_SIZE(seg)
        cap += 2  # the CRLF a body may need at its end
        cap += room
        if extra < 0:
            extra = 0
        cdef PyObject* raw = _bytes_new(NULL, cap + extra)
        try:
            o = room + self._write_whole(lines, parts, <unsigned char*> _bytes_buf(raw) + room)
        except BaseException:
            Py_XDECREF(raw)
            raise
        cdef bytes msg = _finish(raw, o, extra, spare)
        if signer is not None:
            signer._sign_into(msg, room, lines, head, o - head)
        return msg

    cdef Py_ssize_t _write_whole(self, list lines, list parts, unsigned char* w) except -1:
        cdef Py_ssize_t o = 0, b, n
        cdef object seg
        for seg in lines:
            n = PyBytes_GET_SIZE(seg)
            memcpy(w + o, PyBytes_AS_STRING(seg), n)
            o += n
        w[o] = 13
        w[o + 1] = 10
        o += 2
        b = o  # the body starts here
        for seg in parts:
            if type(seg) is bytes:
                n = PyBytes_GET_SIZE(seg)
                memcpy(w + o, PyBytes_AS_STRING(seg), n)
                o += n
            else:
                o += _qp_write(<_QPPlan> seg, w + o)
        if self.end_crlf and o > b and not (o - b >= 2 and w[o - 2] == 13 and w[o - 1] == 10):
            w[o] = 13
            w[o + 1] = 10
            o += 2
        return o

    cdef bytes _entry(self, object e, object variables):
        cdef tuple t
        if type(e) is bytes:
            return <bytes> e
        if type(e) is tuple:
            t = <tuple> e
            if len(t) == 2:
                return uri_header(t[0], t[1], variables)
            return _text_header(t[0], _splice(t[1], t[2], t[3], variables))
        return e(variables)

    cdef list _headers(self, object variables, bytes to, bytes date, bytes message_id):
        cdef list lines = []
        cdef object e
        for e in self.head:
            lines.append(self._entry(e, variables))
        if to:
            lines.append(to)
        lines.append(date)
        lines.append(message_id)
        lines.append(b"MIME-Version: 1.0\r\n")
        for e in self.tail:
            lines.append(self._entry(e, variables))
        lines.extend(self.content)
        return lines

    cdef bytes _body(self, object variables):
        cdef list chunks = []
        cdef object seg
        cdef tuple t
        cdef bytes body
        for seg in self.segments:
            if type(seg) is bytes:
                chunks.append(seg)
            elif type(seg) is tuple:
                t = <tuple> seg
                chunks.append(_qp_template(t[0], t[1], t[2], variables,
                                           t[3] if len(t) == 4 else None))
            else:
                chunks.append(seg(variables))
        body = b"".join(chunks)
        if self.end_crlf and PyBytes_GET_SIZE(body) and not body.endswith(b"\r\n"):
            body += b"\r\n"
        return body

    def headers(self, variables, bytes to, bytes date, bytes message_id):
        """The header lines, in order (``to`` may be b"")."""
        return self._headers(variables, to, date, message_id)

    def body(self, variables):
        return self._body(variables)

    def message(self, variables, bytes to, bytes date, bytes message_id):
        """The whole message: headers, the empty line, the body."""
        return self._whole(self._headers(variables, to, date, message_id), variables, None)


# A message the client core makes (a DeferredMessage, _smtp.pxi's _made) keeps
# this many octets free past its end: DATA's end and the next transaction's
# commands (MAIL, RCPT, DATA: a few hundred octets) are written there when its
# 354 comes (_dot_end), so the message is not copied into a second object.
DEF _C_TAIL_ROOM = 512


cdef enum:
    _WHOLE = 0  # Assembly._personal: the message
    _PARTS = 1  # its header lines and body (to sign)
    _SIGNED = 2  # the message signed by the assembly's signer


cdef tuple _ITEM_FIELDS = ("id", "rcpt", "vars")  # Assembly.envelopes' reads of a wire.Item
cdef object _json_loads = None  # orjson.loads, imported at the first DeferredMessage
cdef object _m_Envelope = None  # fastsend.outcome.Envelope, at the first Assembly.envelopes
cdef object _m_blob_digest = None  # fastsend.wire.blob_digest, with it


# Not tracked by the cyclic GC (no_gc): nothing it holds refers back to it, and a
# worker holds thousands of them waiting on its ready queues.
@cython.no_gc
cdef class DeferredMessage:
    """A recipient's message made when it is called (twin of the pure one in
    fastsend.message.mime): the SMTP client calls it as the message's
    transaction starts, so its bytes are written just before they are sent,
    still in cache. ``Assembly.personal``'s message (``Assembly.signed``'s
    when the assembly has a signer), or when that raises,
    what ``fallback(rcpt, variables, message_id)`` returns (the message made
    the slow way, or an Outcome saying why there is none). ``variables`` may
    be their JSON (bytes), decoded when it is made."""
    cdef Assembly assembly
    cdef object variables, fallback
    cdef str rcpt, message_id
    cdef bytes date
    cdef bytes premade  # made ahead (_make_now), handed over at the first call
    cdef Py_ssize_t premade_room  # the octets free past its end

    def __call__(self):
        return self.make()

    @property
    def made(self):
        """True when the message was made ahead (``Assembly.envelopes(...,
        now=True)``) and not yet handed over."""
        return self.premade is not None

    cdef object make(self):
        return self._make(0, NULL)

    cdef int _make_now(self) except -1:
        """Make the message now, with the SMTP client's room past its end
        (_C_TAIL_ROOM), to be handed over when it is sent: an rsa-sha256
        signature made as the batch is built, back to back, but still by the
        compiled loop and written in place at the end of DATA (_dot_end). One
        that cannot be made now (an Outcome, an error) is made, and its
        failure told, when it is sent, as any DeferredMessage."""
        cdef Py_ssize_t room = 0
        try:
            made = self._make(_C_TAIL_ROOM, &room)
        except Exception:
            return 0
        if type(made) is bytes:
            self.premade = <bytes> made
            self.premade_room = room
        return 0

    cdef object _make(self, Py_ssize_t extra, Py_ssize_t* spare):
        """``make()``; with ``extra``, a message made by the assembly keeps that
        many octets free past its end and ``spare[0]`` says so (Assembly._whole).
        A message made ahead is handed over (this object keeps no reference:
        the client may write in its room) with the room it has."""
        global _json_loads
        cdef bytes made = self.premade
        if made is not None:
            self.premade = None
            if spare != NULL:
                spare[0] = self.premade_room
            return made
        vs = self.variables
        cdef bint own = False
        if self.assembly.guard != PY_SSIZE_T_MAX and (
                (PyBytes_GET_SIZE(vs) if type(vs) is bytes else _values_size(vs))
                > self.assembly.guard):
            # Maybe over the size limit (or the header cap): made, or refused
            # (MessageTooBig), by the fallback, Renderer.render.
            if spare != NULL:
                spare[0] = 0
            return self.fallback(self.rcpt, self.variables, self.message_id)
        try:
            if type(vs) is bytes:  # the recipient's JSON, decoded now (in cache)
                if PyBytes_GET_SIZE(vs) and (self.assembly.signer is None
                                             or self.assembly.signer.mode):
                    # its values read where they lie, when the fast path can
                    made = self.assembly._fast_make(vs, self.rcpt, self.message_id, self.date,
                                                    extra, spare,
                                                    self.assembly.signer is not None)
                    if made is not None:
                        return made
                if _json_loads is None:
                    from orjson import loads as _json_loads
                vs = _json_loads(vs) if PyBytes_GET_SIZE(vs) else {}
                own = True  # (no copy of a dict no one else holds)
            return self.assembly._personal(vs, self.rcpt, self.message_id, self.date,
                                           _WHOLE if self.assembly.signer is None else _SIGNED,
                                           own, extra, spare)
        except Exception:
            if spare != NULL:
                spare[0] = 0
            return self.fallback(self.rcpt, self.variables, self.message_id)


cdef Py_ssize_t _values_size(object vs):
    """The characters of a recipient's values (twin of mime._values_size); a
    value that is no string, or no dict: no bound (the fallback says why)."""
    cdef Py_ssize_t n = 0
    if type(vs) is not dict:
        return PY_SSIZE_T_MAX
    for v in (<dict> vs).values():
        if type(v) is not str:
            return PY_SSIZE_T_MAX
        n += len(<str> v)
    return n


def message_id_safe(str message_id):
    """True when ``message_id`` is 1-200 of A-Z a-z 0-9 _ - (twin of the pure one)."""
    return _message_id_safe(message_id)


cdef bint _message_id_safe(str message_id) except -1:
    cdef Py_ssize_t n = len(message_id), i
    cdef const unsigned char* s
    cdef unsigned char c
    if n < 1 or n > 200 or not PyUnicode_IS_ASCII(message_id):
        return False
    s = <const unsigned char*> PyUnicode_AsUTF8AndSize(message_id, &n)
    for i in range(n):
        c = s[i]
        if not ((48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 95 or c == 45):
            return False
    return True
