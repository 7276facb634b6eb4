# Included from _core.pyx. Compiled twin of fastsend.sink.fast.SinkScanner: the
# sink's fast path for plain SMTP sessions, same names, same replies, same
# hand-over points (the pure-Python version is the reference; tests run both).

from libc.string cimport memchr, memcmp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

cdef bytes _SK_MAIL_OK = b"250 2.1.0 Ok\r\n"
cdef bytes _SK_RCPT_OK = b"250 2.1.5 Ok\r\n"
cdef bytes _SK_DATA_OK = b"354 End data with <CR><LF>.<CR><LF>\r\n"
cdef bytes _SK_OK = b"250 2.0.0 Ok\r\n"
cdef bytes _SK_BYE = b"221 2.0.0 Bye\r\n"
cdef bytes _SK_TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
cdef bytes _SK_BARE = b"550 5.5.2 Error: bare <CR> or <LF> in message data\r\n"
cdef Py_ssize_t _SK_MAX_PATH = 256
cdef Py_ssize_t _SK_LONG_LINE = 65536

cdef enum:
    _SK_RUNNING = 0
    _SK_CLOSED = 1
    _SK_HANDOVER = 2
    _SK_CMD = 0
    _SK_DATA = 1


cdef inline char _sk_upper(char c):
    if 97 <= c <= 122:
        return c - 32
    return c


cdef inline bint _sk_word(const char* p, Py_ssize_t n, const char* word, Py_ssize_t k):
    """p[:k].upper() == word (word in upper case)."""
    cdef Py_ssize_t i
    if n < k:
        return False
    for i in range(k):
        if _sk_upper(p[i]) != word[i]:
            return False
    return True


cdef inline bint _sk_addr_char(unsigned char c):
    if c < 0x21 or c >= 0x7F:
        return False
    # "()<>,;\[]
    if c == 34 or c == 40 or c == 41 or c == 60 or c == 62 or c == 44 or c == 59:
        return False
    if c == 92 or c == 91 or c == 93:
        return False
    return True


cdef bint _sk_address_ok(const char* a, Py_ssize_t n):
    cdef Py_ssize_t i, at = -1
    if n <= 0 or n > _SK_MAX_PATH or a[0] == 64:
        return False
    for i in range(n):
        if not _sk_addr_char(<unsigned char>a[i]):
            return False
        if a[i] == 64:
            at = i
    return at > 0 and at != n - 1


cdef inline bint _sk_fault_first(char c):
    c = _sk_upper(c)
    return c == 84 or c == 68 or c == 80 or c == 52 or c == 83 or c == 77  # T D P 4 S M


cdef class SinkScanner:
    """The sink's fast path (compiled twin of fastsend.sink.fast.SinkScanner)."""

    cdef bytes _ehlo_reply
    cdef bytes _helo_reply
    cdef Py_ssize_t _max_size
    cdef Py_ssize_t _max_rcpt
    cdef Py_ssize_t _max_line
    cdef public object on_message
    cdef public object rcpt_hook
    cdef public bint hook_all
    cdef int _mode
    cdef bytes _tail
    cdef bint _prev_crlf
    cdef bint _at_start
    cdef bint _bad
    cdef Py_ssize_t _size
    cdef public int state
    cdef public bytes rest
    cdef public object helo
    cdef public bint esmtp
    cdef public object mail_from
    cdef public list recipients
    cdef public Py_ssize_t rcpt_count
    cdef list _out
    cdef object _one

    def __init__(self, bytes ehlo_reply, bytes helo_reply, Py_ssize_t max_size,
                 Py_ssize_t max_recipients, Py_ssize_t max_line, on_message, rcpt_hook,
                 bint hook_all):
        self._ehlo_reply = ehlo_reply
        self._helo_reply = helo_reply
        self._max_size = max_size
        self._max_rcpt = max_recipients
        self._max_line = max_line
        self.on_message = on_message
        self.rcpt_hook = rcpt_hook
        self.hook_all = hook_all
        self._mode = _SK_CMD
        self._tail = b""
        self._prev_crlf = True
        self._at_start = True
        self._bad = False
        self._size = 0
        self.state = _SK_RUNNING
        self.rest = b""
        self.helo = None
        self.esmtp = False
        self.mail_from = None
        self.recipients = []
        self.rcpt_count = 0
        self._out = None
        self._one = None

    cdef inline void _emit(self, bytes reply):
        if self._one is None:
            self._one = reply
        else:
            if self._out is None:
                self._out = [self._one]
            self._out.append(reply)

    def feed(self, bytes data not None):
        if self.state != _SK_RUNNING:
            return b""
        cdef bytes buf
        if PyBytes_GET_SIZE(self._tail):
            buf = self._tail + data
            self._tail = b""
        else:
            buf = data
        cdef const char* p = PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t pos = 0, nl
        cdef const char* q
        cdef object reply
        self._one = None
        self._out = None
        while pos < n:
            if self._mode == _SK_DATA:
                pos = self._body(buf, p, pos, n)
                if self._mode == _SK_DATA:
                    break
                continue
            q = <const char*>memchr(p + pos, 10, n - pos)
            if q == NULL:
                if n - pos >= self._max_line:
                    self._handover(buf, pos)
                else:
                    self._tail = buf[pos:] if pos else buf
                break
            nl = q - p
            if nl == pos or p[nl - 1] != 13 or nl + 1 - pos > self._max_line:
                self._handover(buf, pos)
                break
            reply = self._command(p + pos, nl - 1 - pos)
            if reply is None:
                self._handover(buf, pos)
                break
            self._emit(<bytes>reply)
            pos = nl + 1
            if self.state == _SK_CLOSED:
                break
        if self._out is not None:
            out = b"".join(self._out)
            self._out = None
            self._one = None
            return out
        if self._one is None:
            return b""
        reply = self._one
        self._one = None
        return reply

    cdef void _handover(self, bytes buf, Py_ssize_t pos):
        self.state = _SK_HANDOVER
        self.rest = buf[pos:] if pos else buf

    cdef inline void _reset(self):
        self.mail_from = None
        self.recipients = []
        self.rcpt_count = 0

    # ------------------------------------------------------------ commands

    cdef object _command(self, const char* line, Py_ssize_t n):
        cdef Py_ssize_t i
        cdef unsigned char c
        for i in range(n):
            c = <unsigned char>line[i]
            if c < 0x20 or c >= 0x7F:
                return None
        if n < 4 or (n > 4 and line[4] != 32):
            return None
        cdef const char* arg = line + 5
        cdef Py_ssize_t alen = n - 5 if n > 5 else 0
        cdef char v0 = _sk_upper(line[0])
        if v0 == 77 and _sk_word(line, n, b"MAIL", 4):
            return self._mail(arg, alen)
        if v0 == 82 and _sk_word(line, n, b"RCPT", 4):
            return self._rcpt(arg, alen)
        if v0 == 68 and _sk_word(line, n, b"DATA", 4):
            if alen or self.mail_from is None or not self.recipients:
                return None
            self._mode = _SK_DATA
            self._prev_crlf = True
            self._at_start = True
            self._bad = False
            self._size = 0
            return _SK_DATA_OK
        if _sk_word(line, n, b"EHLO", 4) or _sk_word(line, n, b"HELO", 4):
            while alen and arg[0] == 32:
                arg += 1
                alen -= 1
            while alen and arg[alen - 1] == 32:
                alen -= 1
            if not alen or memchr(arg, 32, alen) != NULL:
                return None
            self.helo = PyBytes_FromStringAndSize(arg, alen).decode("ascii")
            self.esmtp = v0 == 69
            self._reset()
            return self._ehlo_reply if self.esmtp else self._helo_reply
        if alen:
            return None
        if _sk_word(line, n, b"RSET", 4):
            self._reset()
            return _SK_OK
        if _sk_word(line, n, b"NOOP", 4):
            return _SK_OK
        if _sk_word(line, n, b"QUIT", 4):
            self.state = _SK_CLOSED
            return _SK_BYE
        return None

    cdef Py_ssize_t _path(self, const char* arg, Py_ssize_t n, const char* word, Py_ssize_t k,
                          Py_ssize_t* a_start, Py_ssize_t* a_len):
        """``WORD:<address>`` then optional `` params``: the offset of the params
        (n if none), or -1 to hand over."""
        cdef Py_ssize_t i, end
        if not _sk_word(arg, n, word, k):
            return -1
        i = k + 1 if (n > k and arg[k] == 32) else k
        if i >= n or arg[i] != 60:
            return -1
        end = -1
        for j in range(i + 1, n):
            if arg[j] == 62:
                end = j
                break
            if arg[j] == 60:
                return -1
        if end < 0:
            return -1
        a_start[0] = i + 1
        a_len[0] = end - i - 1
        if end + 1 < n and arg[end + 1] != 32:
            return -1
        return end + 1

    cdef object _mail(self, const char* arg, Py_ssize_t n):
        cdef Py_ssize_t a0 = 0, alen = 0, i, j, k, eq
        if self.helo is None or self.mail_from is not None:
            return None
        cdef Py_ssize_t pp = self._path(arg, n, b"FROM:", 5, &a0, &alen)
        if pp < 0:
            return None
        if alen and not _sk_address_ok(arg + a0, alen):
            return None
        i = pp
        while i < n:
            if arg[i] == 32:
                i += 1
                continue
            j = i
            while j < n and arg[j] != 32:
                j += 1
            # one parameter arg[i:j]
            eq = -1
            for k in range(i, j):
                if arg[k] == 61:
                    eq = k
                    break
            if eq <= i or arg[i] == 45:
                return None
            for k in range(i, eq):
                c = <unsigned char>arg[k]
                if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 45):
                    return None
            if eq - i == 4 and _sk_word(arg + i, 4, b"SIZE", 4):
                if j - eq - 1 <= 0 or j - eq - 1 >= 19:
                    return None
                size = 0
                for k in range(eq + 1, j):
                    if not 48 <= arg[k] <= 57:
                        return None
                    size = size * 10 + (arg[k] - 48)
                if self._max_size and size > self._max_size:
                    return None
            elif eq - i == 4 and _sk_word(arg + i, 4, b"BODY", 4):
                if not ((j - eq - 1 == 4 and _sk_word(arg + eq + 1, 4, b"7BIT", 4)) or
                        (j - eq - 1 == 8 and _sk_word(arg + eq + 1, 8, b"8BITMIME", 8))):
                    return None
            else:
                return None
            i = j
        self.mail_from = PyBytes_FromStringAndSize(arg + a0, alen).decode("ascii")
        self.recipients = []
        self.rcpt_count = 0
        return _SK_MAIL_OK

    cdef object _rcpt(self, const char* arg, Py_ssize_t n):
        cdef Py_ssize_t a0 = 0, alen = 0
        if self.mail_from is None or self.rcpt_count >= self._max_rcpt:
            return None
        cdef Py_ssize_t pp = self._path(arg, n, b"TO:", 3, &a0, &alen)
        if pp < 0 or pp != n or not _sk_address_ok(arg + a0, alen):
            return None
        text = PyBytes_FromStringAndSize(arg + a0, alen).decode("ascii")
        reply = None
        if self.hook_all or _sk_fault_first(arg[a0]):
            reply = self.rcpt_hook(text)
            if reply is False:
                return None
        self.rcpt_count += 1
        if reply is None:
            self.recipients.append(text)
            return _SK_RCPT_OK
        return reply

    # ------------------------------------------------------------ the body

    cdef Py_ssize_t _body(self, bytes buf, const char* p, Py_ssize_t pos, Py_ssize_t n):
        cdef const char* q
        cdef Py_ssize_t nl, size
        cdef bint start, crlf
        while pos < n:
            q = <const char*>memchr(p + pos, 10, n - pos)
            if q == NULL:
                if n - pos > _SK_LONG_LINE:
                    self._piece(p, pos, n - 1)
                    pos = n - 1
                self._tail = buf[pos:] if pos else buf
                return n
            nl = q - p
            start = self._at_start and self._prev_crlf
            if start and nl - pos == 2 and p[pos] == 46 and p[pos + 1] == 13:
                self._emit(self._end_message())
                return nl + 1
            crlf = nl > pos and p[nl - 1] == 13
            if not crlf or (nl - 1 > pos and memchr(p + pos, 13, nl - 1 - pos) != NULL):
                self._bad = True
            size = nl + 1 - pos
            if start and p[pos] == 46:
                size -= 1
            self._size += size
            self._prev_crlf = crlf
            self._at_start = True
            pos = nl + 1
        return pos

    cdef void _piece(self, const char* p, Py_ssize_t pos, Py_ssize_t end):
        cdef Py_ssize_t size = end - pos
        if self._at_start and self._prev_crlf and p[pos] == 46:
            size -= 1
        if memchr(p + pos, 13, end - pos) != NULL:
            self._bad = True
        self._size += size
        self._at_start = False

    cdef bytes _end_message(self):
        self._mode = _SK_CMD
        recipients = self.recipients
        cdef Py_ssize_t size = self._size
        cdef bint bad = self._bad
        self._reset()
        if self._max_size and size > self._max_size:
            return _SK_TOO_BIG
        if bad:
            return _SK_BARE
        return self.on_message(recipients, size)
