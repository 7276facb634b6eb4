# Included from _core.pyx. Compiled twins of fastsend.smtp.replies: ReplyParser
# and dot_stuff, with identical names and behaviour (the pure-Python versions
# are the reference; tests run over both). No I/O, no SMTP state here.

from libc.string cimport memchr, memcmp, memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

cdef Py_ssize_t _SMTP_MAX_LINE = 4096
cdef Py_ssize_t _SMTP_MAX_LINES = 512


cdef object _smtp_remote_error(str msg):
    # Imported lazily: fastsend.smtp imports fastsend._core, not the reverse.
    from fastsend.smtp.errors import RemoteProtocolError
    return RemoteProtocolError(msg)


cdef inline bint _smtp_digit(char c):
    return 48 <= c <= 57


cdef class ReplyParser:
    """Incremental SMTP reply parser (compiled twin of fastsend.smtp.replies.ReplyParser)."""

    cdef bytes _buf
    cdef int _code
    cdef str _enhanced
    cdef list _lines
    # The last single-line replies seen (raw line -> reply tuple): a session's
    # replies repeat ("250 2.1.5 Ok" to every RCPT), and a repeated line is
    # answered with the same tuple instead of decoding it again.
    cdef bytes _seen0, _seen1, _seen2, _seen3
    cdef tuple _reply0, _reply1, _reply2, _reply3
    cdef int _next_seen

    def __init__(self):
        self._buf = b""
        self._code = 0
        self._enhanced = ""
        self._lines = []
        self._seen0 = self._seen1 = self._seen2 = self._seen3 = b""
        self._next_seen = 0

    @property
    def pending(self):
        return PyBytes_GET_SIZE(self._buf) > 0 or self._code != 0

    def feed(self, bytes data not None):
        cdef bytes buf = self._buf + data if PyBytes_GET_SIZE(self._buf) else data
        cdef const char* p = PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t start = 0, nl, end
        cdef const char* q
        cdef list out = []
        while start < n:
            q = <const char*>memchr(p + start, 10, n - start)
            if q == NULL:
                break
            nl = q - p
            end = nl - 1 if nl > start and p[nl - 1] == 13 else nl
            if end - start > _SMTP_MAX_LINE:
                raise _smtp_remote_error(f"reply line longer than {_SMTP_MAX_LINE} octets")
            self._line(p + start, end - start, buf, start, out)
            start = nl + 1
        if n - start > _SMTP_MAX_LINE:
            raise _smtp_remote_error(f"reply line longer than {_SMTP_MAX_LINE} octets")
        self._buf = b"" if start >= n else (buf if start == 0 else buf[start:])
        return out

    cdef int _line(self, const char* s, Py_ssize_t n, bytes buf, Py_ssize_t off, list out) except -1:
        cdef int code, sep, cls
        cdef Py_ssize_t i, k, d
        cdef str text
        cdef tuple reply
        if n < 3 or not (50 <= s[0] <= 53 and _smtp_digit(s[1]) and _smtp_digit(s[2])):
            raise _smtp_remote_error(f"not an SMTP reply line: {buf[off:off + min(n, 80)]!r}")
        code = (s[0] - 48) * 100 + (s[1] - 48) * 10 + (s[2] - 48)
        if n == 3:
            sep = 32
        else:
            sep = s[3]
            if sep != 32 and sep != 45:
                raise _smtp_remote_error(
                    f"bad separator in reply line: {buf[off:off + min(n, 80)]!r}"
                )
        if self._code and code != self._code:
            raise _smtp_remote_error(
                f"multi-line reply changed code from {self._code} to {code}"
            )
        cdef tuple seen
        if sep == 32 and not self._code:  # a whole one-line reply: seen lately?
            seen = self._seen(s, n)
            if seen is not None:
                out.append(seen)
                return 0
        # Enhanced status code: class "." 1-3 digits "." 1-3 digits, then spaces or end.
        i = 4
        k = 0
        if n > 4 and s[4] - 48 == code // 100 and (s[4] == 50 or s[4] == 52 or s[4] == 53):
            i = 5
            if i < n and s[i] == 46:
                i += 1
                d = 0
                while i < n and _smtp_digit(s[i]) and d < 4:
                    i += 1
                    d += 1
                if 1 <= d <= 3 and i < n and s[i] == 46:
                    i += 1
                    d = 0
                    while i < n and _smtp_digit(s[i]) and d < 4:
                        i += 1
                        d += 1
                    if 1 <= d <= 3 and (i == n or s[i] == 32):
                        k = i  # end of the enhanced code
        if k:
            if not self._enhanced:
                self._enhanced = s[4:k].decode("ascii")
            while k < n and s[k] == 32:
                k += 1
            text = s[k:n].decode("utf-8", "replace")
        elif n > 4:
            text = s[4:n].decode("utf-8", "replace")
        else:
            text = ""
        if sep == 45:
            if len(self._lines) >= _SMTP_MAX_LINES:
                raise _smtp_remote_error(
                    f"multi-line reply longer than {_SMTP_MAX_LINES} lines"
                )
            self._code = code
            self._lines.append(text)
            return 0
        if self._lines:
            self._lines.append(text)
            text = "\n".join(self._lines)
            self._lines = []
        reply = (code, self._enhanced, text)
        out.append(reply)
        if not self._code:  # a one-line reply: remember it
            self._remember(buf[off:off + n], reply)
        self._code = 0
        self._enhanced = ""
        return 0

    cdef inline bint _same(self, bytes raw, const char* s, Py_ssize_t n):
        return PyBytes_GET_SIZE(raw) == n and memcmp(PyBytes_AS_STRING(raw), s, n) == 0

    cdef tuple _seen(self, const char* s, Py_ssize_t n):
        if self._same(self._seen0, s, n):
            return self._reply0
        if self._same(self._seen1, s, n):
            return self._reply1
        if self._same(self._seen2, s, n):
            return self._reply2
        if self._same(self._seen3, s, n):
            return self._reply3
        return None

    cdef void _remember(self, bytes raw, tuple reply):
        cdef int k = self._next_seen
        self._next_seen = (k + 1) & 3
        if k == 0:
            self._seen0, self._reply0 = raw, reply
        elif k == 1:
            self._seen1, self._reply1 = raw, reply
        elif k == 2:
            self._seen2, self._reply2 = raw, reply
        else:
            self._seen3, self._reply3 = raw, reply


def dot_stuff(bytes data not None, bytes tail not None = b""):
    """The DATA body for ``data``: dot-stuffed, CRLF-terminated, ending ``.\\r\\n``,
    then ``tail``."""
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t nt = PyBytes_GET_SIZE(tail)
    cdef Py_ssize_t i = 0, extra = 0, o = 0, last = 0
    cdef const char* q
    # Count the dots to double: at the start, or after CR or LF.
    while i < n:
        q = <const char*>memchr(p + i, 46, n - i)
        if q == NULL:
            break
        i = q - p
        if i == 0 or p[i - 1] == 10 or p[i - 1] == 13:
            extra += 1
        i += 1
    cdef bint crlf = n >= 2 and p[n - 2] == 13 and p[n - 1] == 10
    cdef Py_ssize_t size = n + extra + (0 if crlf or n == 0 else 2) + 3 + nt
    cdef bytes result = PyBytes_FromStringAndSize(NULL, size)
    cdef char* w = PyBytes_AS_STRING(result)
    if extra:
        i = 0
        while i < n:
            q = <const char*>memchr(p + i, 46, n - i)
            if q == NULL:
                break
            i = q - p
            if i == 0 or p[i - 1] == 10 or p[i - 1] == 13:
                memcpy(w + o, p + last, i + 1 - last)
                o += i + 1 - last
                last = i  # the dot is copied again with the next span
            i += 1
    memcpy(w + o, p + last, n - last)
    o += n - last
    if not crlf and n:
        w[o] = 13
        w[o + 1] = 10
        o += 2
    w[o] = 46
    w[o + 1] = 13
    w[o + 2] = 10
    if nt:
        memcpy(w + o + 3, PyBytes_AS_STRING(tail), nt)
    return result
