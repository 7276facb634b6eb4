# Included from _core.pyx. Compiled twins of fastsend.smtp.replies: ReplyParser
# and dot_stuff, with identical names and behaviour (the pure-Python versions
# are the reference; tests run over both). No I/O, no SMTP state here.

from libc.string cimport memchr, memcmp, memcpy
from cpython.list cimport PyList_GET_SIZE
from cpython.object cimport PyObject

cdef extern from "Python.h":
    int PyList_SetSlice(object lst, Py_ssize_t low, Py_ssize_t high, PyObject* itemlist) except -1
    Py_ssize_t Py_REFCNT(object o)
    void _smtp_xincref "Py_XINCREF"(PyObject* o)
    void _smtp_xdecref "Py_XDECREF"(PyObject* o)
    PyObject* _smtp_list_item "PyList_GET_ITEM"(object l, Py_ssize_t i)
    void _smtp_list_set "PyList_SET_ITEM"(object l, Py_ssize_t i, PyObject* v)
from libc.stdlib cimport malloc as _smtp_malloc, free as _smtp_free
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

cdef Py_ssize_t _SMTP_MAX_LINE = 4096
cdef Py_ssize_t _SMTP_MAX_LINES = 512


cdef object _smtp_remote_error(str msg):
    # Imported lazily: fastsend.smtp imports fastsend._core, not the reverse.
    from fastsend.smtp.errors import RemoteProtocolError
    return RemoteProtocolError(msg)


cdef inline bint _smtp_digit(char c):
    return 48 <= c <= 57


cdef inline void _list_reset(list l):
    """Empty ``l`` and keep its storage (``del l[:]`` frees it): a list
    refilled at every server read allocates nothing."""
    cdef Py_ssize_t k, n = PyList_GET_SIZE(l)
    cdef PyObject* o
    Py_SET_SIZE(l, 0)
    for k in range(n):
        o = _smtp_list_item(l, k)
        _smtp_list_set(l, k, NULL)
        _smtp_xdecref(o)


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
        return self._feed(data)

    cdef list _feed(self, bytes data):
        cdef list out = []
        self._feed_into(data, out)
        return out

    cdef int _feed_into(self, bytes data, list out) except -1:
        """_feed, the replies appended to ``out``."""
        cdef bytes buf = self._buf + data if PyBytes_GET_SIZE(self._buf) else data
        cdef const char* p = PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t start = 0, nl, end
        cdef const char* q
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
        return 0

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
    return _dot_stuff(data, tail)


cpdef str queue_id(str text):
    """Compiled twin of fastsend.smtp.replies.queue_id: the receiver's id of a
    message it took, from its 2xx reply's text (the whole text when no known
    format names one)."""
    cdef Py_ssize_t k = text.find("queued as ")
    if k >= 0:
        return _qid_token(text, k + 10)
    k = text.find("id=")
    if k >= 0 and (k == 0 or text[k - 1] in " \n(["):
        return _qid_token(text, k + 3)
    k = text.find(" - gsmtp")
    if k > 0:
        words = text[:k].split()
        return words[len(words) - 1] if words else text
    k = text.find(" Message accepted for delivery")
    if k > 0:
        return _qid_token(text, 0)
    return text


cdef str _qid_token(str text, Py_ssize_t start):
    cdef Py_ssize_t end = start, n = len(text)
    while end < n and text[end] not in " \n\t":
        end += 1
    while end > start and text[end - 1] in ")],;.":
        end -= 1
    return text[start:end] if end > start else text


cdef Py_ssize_t _dots(const char* p, Py_ssize_t n) noexcept nogil:
    """The dots to double in ``p``: at the start, or after CR or LF."""
    cdef Py_ssize_t i = 0, extra = 0
    cdef const char* q
    while i < n:
        q = <const char*>memchr(p + i, 46, n - i)
        if q == NULL:
            break
        i = q - p
        if i == 0 or p[i - 1] == 10 or p[i - 1] == 13:
            extra += 1
        i += 1
    return extra


cdef bytes _dot_stuff(bytes data, bytes tail):
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t nt = PyBytes_GET_SIZE(tail)
    cdef Py_ssize_t i = 0, extra = _dots(p, n), o = 0, last = 0
    cdef const char* q
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


# (_C_TAIL_ROOM, the room a message the client core makes keeps past its end:
# _mime.pxi, where a DeferredMessage made ahead keeps it too)


cdef bytes _dot_end(_CoreTxn txn, bytes tail):
    """``_dot_stuff(txn.data, tail)``: the same octets. When the message was
    made here with room past its end (``txn.spare``), is held by ``txn``
    alone and has no dot to double, they are written in that room and the
    message's own object is returned, grown to them (no copy)."""
    cdef object data = txn.data
    cdef Py_ssize_t n, nt, o
    cdef char* w
    cdef bint crlf
    # (two references: txn's and this function's ``data``; any other holder,
    # and it is copied as before)
    if txn.spare <= 0 or type(data) is not bytes or Py_REFCNT(data) != 2:
        return _dot_stuff(data, tail)
    n = PyBytes_GET_SIZE(data)
    nt = PyBytes_GET_SIZE(tail)
    w = PyBytes_AS_STRING(data)
    crlf = n >= 2 and w[n - 2] == 13 and w[n - 1] == 10
    if 5 + nt > txn.spare or _dots(w, n):
        return _dot_stuff(data, tail)
    o = n
    if not crlf and n:
        w[o] = 13
        w[o + 1] = 10
        o += 2
    w[o] = 46
    w[o + 1] = 13
    w[o + 2] = 10
    o += 3
    if nt:
        memcpy(w + o, PyBytes_AS_STRING(tail), nt)
        o += nt
    w[o] = 0
    txn.spare = 0  # (used: data is now the octets written, not the message)
    Py_SET_SIZE(data, o)
    return data


# ---------------------------------------------------------------------------
# ClientCore: compiled twin of fastsend.smtp.client.ClientCore, the hot half of
# the SMTP client's state machine (transactions, replies, outcomes). The
# session commands (EHLO, STARTTLS, AUTH, ...) stay in Python
# (fastsend.smtp.client._Commands) and reach this state through the public
# attributes; their replies come back through self._command_reply. Same
# states, kinds and outcomes as the reference, method for method.

from collections import deque as _smtp_deque

# States (the same strings as fastsend.smtp.client's).
cdef str _C_GREETING = "greeting"
cdef str _C_READY = "ready"
cdef str _C_TLS = "tls"
cdef str _C_CLOSED = "closed"
# Kinds of commands waiting for a reply (fastsend.smtp.client's values).
DEF _K_MAIL = 0
DEF _K_RCPT = 1
DEF _K_DATA = 2
DEF _K_DOT = 3
DEF _K_RSET = 4
DEF _K_CMD = 5
DEF _K_BDAT = 6
cdef tuple _C_STAGE = ("mail", "rcpt", "data", "data", "rset", None, "data")

# A command waiting for its reply: its kind, its transaction (a strong
# reference, or NULL) and the recipient's index. ClientCore keeps them in a
# ring of these structs (the reference's deque of tuples): no object per
# command.
ctypedef struct _CPend:
    int kind
    Py_ssize_t i
    PyObject* txn
DEF _C_PEND_MIN = 16  # the ring's first size (a power of two; doubled when full)
DEF _C_BDAT_WINDOW = 32
DEF _C_BDAT_WINDOW_BYTES = 1 << 20

cdef tuple _C_ENVELOPE = (
    "rcpts", "mail_from", "data", "tag", "eightbit", "smtputf8", "dsn_mail", "dsn_rcpt"
)


cdef inline bint _all_slots(_Fields f, int n) noexcept:
    """Every one of ``f``'s first ``n`` fields is read from a slot (no getattr)."""
    cdef int k
    for k in range(n):
        if f.off[k] < 0:
            return False
    return True
cdef object _c_Outcome = None
cdef object _c_TxnResult = None
cdef object _c_CommandDone = None
cdef object _c_Local = None
cdef object _c_Remote = None
cdef str _c_DELIVERED = "delivered"
cdef str _c_DEFERRED = "deferred"
cdef str _c_FAILED = "failed"


cdef int _client_types() except -1:
    # Imported lazily: fastsend.smtp.client imports fastsend._core, not the reverse.
    global _c_Outcome, _c_TxnResult, _c_CommandDone, _c_Local, _c_Remote
    global _c_DELIVERED, _c_DEFERRED, _c_FAILED
    if _c_Outcome is not None:
        return 0
    from fastsend.outcome import DEFERRED, DELIVERED, FAILED, Outcome, TxnResult
    from fastsend.smtp.client import CommandDone
    from fastsend.smtp.errors import LocalProtocolError, RemoteProtocolError
    _c_DELIVERED, _c_DEFERRED, _c_FAILED = DELIVERED, DEFERRED, FAILED
    _c_TxnResult, _c_CommandDone = TxnResult, CommandDone
    _c_Local, _c_Remote = LocalProtocolError, RemoteProtocolError
    _c_Outcome = Outcome
    return 0


cdef int _address_kind(object s):
    """-1: not an acceptable address (not a str, empty, a C0 control, DEL, "<"
    or ">", a space outside a quoted local part: client.py's _bad_address);
    1: non-ASCII; 0: ASCII."""
    cdef Py_UCS4 c
    cdef int wide = 0
    cdef Py_ssize_t i = 0, space = -1
    if not isinstance(s, str) or not s:
        return -1
    for c in <str>s:
        if c < 0x20 or c == 0x7f or c == 60 or c == 62:
            return -1
        if c == 0x20:
            space = i
        elif c > 0x7f:
            wide = 1
        i += 1
    if space >= 0 and ((<str>s)[0] != '"' or (<str>s).rfind('"@') < space):
        return -1
    return wide


cdef inline bint _ends_crlf(bytes d):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(d)
    cdef const char* p = PyBytes_AS_STRING(d)
    return n >= 2 and p[n - 2] == 13 and p[n - 1] == 10


@cython.no_gc  # (nothing it holds refers back to it: not tracked by the cyclic GC)
cdef class _CoreTxn:
    """One envelope in flight (client.py's _Txn), with the envelope's fields read
    once (msgspec attribute reads are most of what a message costs here)."""

    cdef object tag, mail_from, data
    cdef object rcpts  # any sequence (a list from the worker)
    cdef bint eightbit, smtputf8
    cdef object dsn_mail, dsn_rcpt  # (bytes: the Envelope's DSN parameters)
    cdef list outcomes
    cdef Py_ssize_t accepted
    cdef object mail_fail
    cdef bint dummy, utf8, decided
    cdef object rest  # deque of (kind, i, line) without PIPELINING, else None
    # Octets free past the end of ``data``'s allocation: a message made here
    # (_made) keeps room for the end of DATA and the next commands (_dot_end).
    cdef Py_ssize_t spare


cdef class ClientCore:
    """Compiled twin of fastsend.smtp.client.ClientCore (the reference)."""

    cdef public str mx
    cdef public str state
    cdef public dict capabilities
    cdef public bint tls_active, pipelining, chunking, bdat
    cdef public Py_ssize_t size_limit
    # Results decided so far that are one recipient delivered (SMTPConnection
    # tells a group's from it, Lane.observe then reads none of its outcomes).
    cdef public Py_ssize_t delivered_one
    cdef public ReplyParser _parser
    # Commands waiting for a reply, oldest first: _pn entries of the ring _pq
    # (_pcap of them, a power of two) from _ph on. The session commands
    # (_Commands) add theirs with _push_cmd.
    cdef _CPend* _pq
    cdef Py_ssize_t _pcap, _ph, _pn
    # The entry whose reply is being handled (put back first if the server's
    # reply to it is garbage: the connection's loss then names its stage).
    cdef int _cur_kind
    cdef Py_ssize_t _cur_i
    cdef object _cur_txn
    cdef bint _cur_set
    cdef public object _cmd_names
    # Transactions not started, oldest first: a _CoreTxn, or an Envelope not
    # yet read (made one when it is taken: _qtake). A list read from _qh on
    # (the slots before it hold None; emptied when all are taken): a C-level
    # peek and take, where a deque's ``[0]`` and ``popleft`` are calls.
    cdef list _queue
    cdef Py_ssize_t _qh
    cdef _Fields _efields  # the Envelope's slots (send_envelopes' last type)
    cdef public bint _group_open, _need_rset
    cdef public Py_ssize_t _active, _bdat_bytes
    cdef public list _out, _events, _auth
    cdef public object _cram
    cdef public object on_body  # (client.py: a worker's write log, fastsend.ring.WriteLog)
    cdef object _from
    cdef bint _from_bad, _from_utf8
    cdef bytes _from_line
    cdef object _dot_reply
    cdef object _dot_out
    cdef str _dot_qid
    cdef list _replies  # a read's replies (kept: refilled at each read)

    def __cinit__(self, *args, **kwargs):
        self._pq = <_CPend*>_smtp_malloc(_C_PEND_MIN * sizeof(_CPend))
        if self._pq == NULL:
            raise MemoryError()
        self._pcap = _C_PEND_MIN
        self._ph = 0
        self._pn = 0

    def __dealloc__(self):
        self._pclear()
        _smtp_free(self._pq)
        self._pq = NULL

    def __init__(self, str mx not None = "", chunking=True):
        _client_types()
        self.mx = mx
        self.state = _C_GREETING
        self.capabilities = {}
        self.tls_active = False
        self.pipelining = False
        self.chunking = bool(chunking)
        self.bdat = False
        self.size_limit = 0
        self.delivered_one = 0
        self._parser = ReplyParser()
        self._replies = []
        self._pclear()
        self._push(_K_CMD, None, 0)
        self._cur_set = False
        self._cur_txn = None
        self._cmd_names = _smtp_deque(["greeting"])
        self._queue = []
        self._qh = 0
        self._group_open = False
        self._active = 0
        self._bdat_bytes = 0
        self._need_rset = False
        self._out = []
        self._events = []
        self._auth = []
        self._cram = None
        self._from = None
        self._from_bad = True
        self._from_utf8 = False
        self._from_line = b""
        self._dot_reply = None

    # ------------------------------------------------------------------ queries
    @property
    def expecting(self):
        cdef int kind
        if not self._pn:
            return ""
        kind = self._pq[self._ph].kind
        if kind == _K_CMD:
            return self._cmd_names[0]
        if kind == _K_DOT or kind == _K_BDAT:
            return "dot"
        return _C_STAGE[kind]

    @property
    def busy(self):
        return self._active > 0 or self._qlen() > 0

    def unsent(self):
        """The tags of the envelopes whose message was never written (see the
        reference): none past its end of data (DATA's dot, BDAT LAST)."""
        cdef Py_ssize_t k
        cdef _CPend* e
        cdef set past = set()
        cdef list seen = []
        cdef _CoreTxn txn
        for k in range(self._pn):
            e = &self._pq[(self._ph + k) & (self._pcap - 1)]
            if e.txn == NULL:
                continue
            t = <object>e.txn
            if e.kind == _K_DOT or e.kind == _K_BDAT:
                past.add(id(t))
            elif not seen or seen[len(seen) - 1] is not t:
                seen.append(t)
        out = []
        for t in seen:
            if id(t) not in past:
                txn = <_CoreTxn>t
                out.append(txn.tag)
        for t in self._queue[self._qh:]:  # a _CoreTxn, or an Envelope not read yet
            out.append((<_CoreTxn>t).tag if type(t) is _CoreTxn else t.tag)
        return out

    # ---------------------------------------------------- transactions' queue
    cdef inline Py_ssize_t _qlen(self) noexcept:
        return PyList_GET_SIZE(self._queue) - self._qh

    cdef _CoreTxn _qtake(self):
        """Take the queue's first transaction (there is one), made from its
        envelope if it is one still."""
        cdef list q = self._queue
        cdef Py_ssize_t h = self._qh
        head = <object>_smtp_list_item(q, h)
        _smtp_xincref(<PyObject*>None)
        _smtp_list_set(q, h, <PyObject*>None)
        _smtp_xdecref(<PyObject*>head)  # (``head`` holds its own reference)
        h += 1
        if h == PyList_GET_SIZE(q):
            _list_reset(q)  # all taken: the same list, its storage kept
            h = 0
        elif h >= 256 and h * 2 >= PyList_GET_SIZE(q):
            PyList_SetSlice(q, 0, h, NULL)  # (a queue never drained: the taken dropped)
            h = 0
        self._qh = h
        if type(head) is _CoreTxn:
            return <_CoreTxn>head
        return self._txn(head, self._efields)

    cdef int _qputback(self, _CoreTxn txn) except -1:
        """Put ``txn``, just taken, back first."""
        if self._qh:
            self._qh -= 1
            self._queue[self._qh] = txn
        else:
            self._queue.insert(0, txn)
        return 0

    # ---------------------------------------------------------- pending queue
    def _push_cmd(self, str name not None):
        """A session command (``name``, e.g. "ehlo") now waits for its reply."""
        self._push(_K_CMD, None, 0)
        self._cmd_names.append(name)

    cdef int _pgrow(self) except -1:
        cdef Py_ssize_t cap = self._pcap * 2, k, m = self._pcap - 1
        cdef _CPend* q = <_CPend*>_smtp_malloc(cap * sizeof(_CPend))
        if q == NULL:
            raise MemoryError()
        for k in range(self._pn):
            q[k] = self._pq[(self._ph + k) & m]
        _smtp_free(self._pq)
        self._pq = q
        self._pcap = cap
        self._ph = 0
        return 0

    cdef inline int _push(self, int kind, object txn, Py_ssize_t i) except -1:
        cdef _CPend* e
        cdef PyObject* t = NULL
        if self._pn == self._pcap:
            self._pgrow()
        e = &self._pq[(self._ph + self._pn) & (self._pcap - 1)]
        if txn is not None:
            t = <PyObject*>txn
            _smtp_xincref(t)
        e.kind = kind
        e.i = i
        e.txn = t
        self._pn += 1
        return 0

    cdef inline object _pop(self, int* kind, Py_ssize_t* i):
        """Take the oldest entry (there is one): its kind and index into
        ``kind``, ``i``; returns its transaction (None for a command)."""
        cdef _CPend* e = &self._pq[self._ph]
        cdef PyObject* t = e.txn
        kind[0] = e.kind
        i[0] = e.i
        e.txn = NULL
        self._ph = (self._ph + 1) & (self._pcap - 1)
        self._pn -= 1
        if t == NULL:
            return None
        txn = <object>t  # (a new reference: the ring's is dropped below)
        _smtp_xdecref(t)
        return txn

    cdef int _unpop(self, int kind, object txn, Py_ssize_t i) except -1:
        """Put an entry back first (the one taken by _pop)."""
        cdef _CPend* e
        if self._pn == self._pcap:
            self._pgrow()
        self._ph = (self._ph - 1) & (self._pcap - 1)
        e = &self._pq[self._ph]
        e.kind = kind
        e.i = i
        e.txn = NULL
        if txn is not None:
            e.txn = <PyObject*>txn
            _smtp_xincref(e.txn)
        self._pn += 1
        return 0

    cdef void _pclear(self):
        cdef Py_ssize_t k, m = self._pcap - 1
        cdef PyObject* t
        for k in range(self._pn):
            t = self._pq[(self._ph + k) & m].txn
            self._pq[(self._ph + k) & m].txn = NULL
            _smtp_xdecref(t)
        self._ph = 0
        self._pn = 0

    def _pending_kinds(self):
        """The kinds of the commands waiting for a reply, oldest first (tests)."""
        cdef Py_ssize_t k
        return [self._pq[(self._ph + k) & (self._pcap - 1)].kind for k in range(self._pn)]

    # ------------------------------------------------------------------ output
    def data_to_send(self):
        return self._take_out()

    cdef bytes _take_out(self):
        cdef list out = self._out
        cdef Py_ssize_t n = PyList_GET_SIZE(out)
        if not n:
            return b""
        cdef bytes data = <bytes>out[0] if n == 1 else b"".join(out)
        _list_reset(out)  # (the same list: no allocation at the next reply)
        return data

    def events(self):
        ev = self._events
        self._events = []
        return ev

    # ------------------------------------------------------------ transactions
    def send_envelopes(self, envelopes):
        cdef _Fields fe = self._efields
        if self.state != _C_READY:
            raise _c_Local(f"cannot send mail in state {self.state!r}")
        cdef list queue = self._queue
        for env in envelopes:
            # (an Envelope's fields read from their slots: _events.pxi's _Fields)
            fe = _fields_for(env, fe, _C_ENVELOPE)
            if _all_slots(fe, 8):
                # Read when its transaction comes first (_head_txn), not now: a
                # group's envelopes have waited behind thousands of others,
                # their objects out of the caches, and each is read once, as
                # its message is made, not here and again then.
                queue.append(env)
            else:
                queue.append(self._txn(env, fe))
        self._efields = fe
        if self._group_open or (not self.pipelining and self._active):
            return b""
        self._start_next()
        return self._take_out()

    cdef _CoreTxn _txn(self, object env, _Fields fe):
        """The transaction of ``env``, its recipients checked (a refused one
        has its local outcome; ``decided``: nothing to send)."""
        cdef _CoreTxn txn
        fe = _fields_for(env, fe, _C_ENVELOPE)
        txn = _CoreTxn.__new__(_CoreTxn)
        txn.rcpts = _get(env, fe, 0)
        txn.mail_from = _get(env, fe, 1)
        txn.data = _get(env, fe, 2)
        txn.tag = _get(env, fe, 3)
        txn.eightbit = _get(env, fe, 4)
        txn.smtputf8 = _get(env, fe, 5)
        txn.dsn_mail = _get(env, fe, 6)
        txn.dsn_rcpt = _get(env, fe, 7)
        txn.outcomes = [None] * len(txn.rcpts)
        txn.accepted = 0
        txn.mail_fail = None
        txn.dummy = False
        txn.utf8 = False
        txn.rest = None
        txn.decided = not self._check_envelope(txn)
        return txn

    cdef bint _check_envelope(self, _CoreTxn txn) except -1:
        cdef list outs = txn.outcomes
        cdef Py_ssize_t i
        cdef int k
        cdef bint utf8
        rcpts = txn.rcpts
        if not rcpts:
            return False
        mail_from = txn.mail_from
        if mail_from is not self._from:
            self._check_sender(mail_from)
        utf8 = txn.smtputf8 or self._from_utf8
        i = 0
        for rcpt in rcpts:
            k = _address_kind(rcpt)
            if k < 0:
                outs[i] = _c_Outcome(
                    _c_FAILED, 0, "5.1.3", f"invalid recipient address {rcpt!r}", "local", self.mx
                )
            elif k == 1:
                utf8 = True
            i += 1
        txn.utf8 = utf8
        enhanced = ""
        if self._from_bad:
            enhanced, reason = "5.1.7", f"invalid sender address {mail_from!r}"
        elif utf8 and "SMTPUTF8" not in self.capabilities:
            enhanced = "5.6.7"
            reason = (
                "the message needs SMTPUTF8 (a non-ASCII address or UTF-8 header text)"
                " and the server does not offer it"
            )
        elif txn.eightbit and "8BITMIME" not in self.capabilities:
            # RFC 6152 3: 8-bit data only to a server that offers it. (Raw
            # MIME is re-encoded to 7 bit before signing when it can be:
            # fastsend.message.rawmime; what is left must not be mangled.)
            enhanced = "5.6.3"
            reason = (
                "the message has 8-bit content that cannot be re-encoded"
                " and the server does not offer 8BITMIME"
            )
        elif (
            self.size_limit and type(txn.data) is bytes and len(txn.data) > self.size_limit
        ):  # (a deferred message is checked when it is made: _made)
            enhanced = "5.3.4"
            reason = f"message size {len(txn.data)} exceeds the server's limit {self.size_limit}"
        if enhanced:
            fail = _c_Outcome(_c_FAILED, 0, enhanced, reason, "mail", self.mx)
            for i in range(len(outs)):
                if outs[i] is None:
                    outs[i] = fail
            return False
        for o in outs:
            if o is None:
                return True
        return False

    cdef int _check_sender(self, object mail_from) except -1:
        self._from = mail_from
        # "": the null reverse-path (MAIL FROM:<>, RFC 5321 4.5.5: a notice), as the
        # reference takes it; any other string must be an address
        self._from_bad = type(mail_from) is not str or (
            len(<str>mail_from) > 0 and _address_kind(mail_from) < 0
        )
        self._from_utf8 = not self._from_bad and _address_kind(mail_from) == 1
        self._from_line = (
            b"" if self._from_bad else b"MAIL FROM:<" + (<str>mail_from).encode() + b">"
        )
        return 0

    cdef bytes _mail_line(self, _CoreTxn txn, object rcpt=None):
        """MAIL FROM with its parameters, CRLF; with ``rcpt``, then its RCPT TO
        and DATA (the usual pipelined group), all in one allocation."""
        cdef char num[24]
        cdef Py_ssize_t nnum = 0, nr = 0, size, o
        cdef const char* r = NULL
        cdef size_t v
        cdef bint body8, utf8 = txn.utf8
        mail_from = txn.mail_from
        if mail_from is not self._from:
            self._check_sender(mail_from)
        cdef bytes line = self._from_line
        cdef dict caps = self.capabilities
        if "SIZE" in caps:
            v = <size_t>len(txn.data)
            while True:  # the digits, backwards
                num[23 - nnum] = <char>(48 + v % 10)
                nnum += 1
                v //= 10
                if v == 0:
                    break
        body8 = txn.eightbit and "8BITMIME" in caps
        cdef bytes dm = txn.dsn_mail if txn.dsn_mail and "DSN" in caps else b""  # (RFC 3461 4.1)
        if rcpt is not None:
            r = PyUnicode_AsUTF8AndSize(<str>rcpt, &nr)
        size = PyBytes_GET_SIZE(line) + (6 + nnum if nnum else 0) + (14 if body8 else 0)
        size += (9 if utf8 else 0) + PyBytes_GET_SIZE(dm) + 2 + (nr + 18 if r != NULL else 0)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef char* w = PyBytes_AS_STRING(out)
        o = PyBytes_GET_SIZE(line)
        memcpy(w, PyBytes_AS_STRING(line), o)
        if nnum:
            memcpy(w + o, b" SIZE=", 6)
            memcpy(w + o + 6, num + 24 - nnum, nnum)
            o += 6 + nnum
        if body8:
            memcpy(w + o, b" BODY=8BITMIME", 14)
            o += 14
        if utf8:
            memcpy(w + o, b" SMTPUTF8", 9)
            o += 9
        if PyBytes_GET_SIZE(dm):
            memcpy(w + o, PyBytes_AS_STRING(dm), PyBytes_GET_SIZE(dm))
            o += PyBytes_GET_SIZE(dm)
        w[o] = 13
        w[o + 1] = 10
        o += 2
        if r != NULL:
            memcpy(w + o, b"RCPT TO:<", 9)
            memcpy(w + o + 9, r, nr)
            memcpy(w + o + 9 + nr, b">\r\nDATA\r\n", 9)
        return out

    cdef bytes _rcpt_line(self, _CoreTxn txn, Py_ssize_t i):
        """RCPT TO for recipient ``i``, with the envelope's DSN parameters when
        the server offers DSN (the reference's _rcpt_line)."""
        line = b"RCPT TO:<" + (<str>txn.rcpts[i]).encode() + b">"
        if txn.dsn_rcpt and "DSN" in self.capabilities:
            line += txn.dsn_rcpt
        return line + b"\r\n"

    cdef int _start_next(self) except -1:
        cdef _CoreTxn txn
        cdef list outcomes, parts
        cdef Py_ssize_t i
        while True:
            txn = None
            while self._qlen():
                txn = self._qtake()
                if not txn.decided:
                    break
                self._events.append(self._result(txn, ""))
                txn = None
            if txn is None:
                return 0
            if self.state != _C_READY or self.bdat:
                self._qputback(txn)
                return self._start_bdat() if self.state == _C_READY else 0
            if type(txn.data) is bytes or self._made(txn):
                break
            self._events.append(self._result(txn, ""))
        self._active += 1
        rcpts = txn.rcpts
        outcomes = txn.outcomes
        if self.pipelining:
            if len(rcpts) == 1 and not txn.dsn_rcpt:
                self._push(_K_MAIL, txn, 0)
                self._push(_K_RCPT, txn, 0)
                self._push(_K_DATA, txn, 0)
                self._out.append(self._mail_line(
                    txn, (<list> rcpts)[0] if type(rcpts) is list else rcpts[0]))
                self._group_open = True
                return 0
            parts = [self._mail_line(txn)]
            self._push(_K_MAIL, txn, 0)
            for i in range(len(rcpts)):
                if outcomes[i] is None:
                    parts.append(self._rcpt_line(txn, i))
                    self._push(_K_RCPT, txn, i)
            parts.append(b"DATA\r\n")
            self._push(_K_DATA, txn, 0)
            self._out.append(b"".join(parts))
            self._group_open = True
            return 0
        rest = txn.rest = _smtp_deque()
        for i in range(len(rcpts)):
            if outcomes[i] is None:
                rest.append((_K_RCPT, i, self._rcpt_line(txn, i)))
        rest.append((_K_DATA, 0, b"DATA\r\n"))
        self._group_open = True
        self._push(_K_MAIL, txn, 0)
        self._out.append(self._mail_line(txn))
        return 0

    cdef int _start_bdat(self) except -1:
        cdef _CoreTxn txn
        cdef list out = self._out
        cdef list outcomes
        cdef bytes data
        cdef Py_ssize_t i
        while (
            self._qlen()
            and self._active < _C_BDAT_WINDOW
            and (not self._active or self._bdat_bytes < _C_BDAT_WINDOW_BYTES)
        ):
            txn = self._qtake()
            if txn.decided:
                self._events.append(self._result(txn, ""))
                continue
            if type(txn.data) is not bytes and not self._made(txn):
                self._events.append(self._result(txn, ""))
                continue
            if self._active or self._need_rset:
                out.append(b"RSET\r\n")
                self._push(_K_RSET, None, 0)
            self._need_rset = True
            self._active += 1
            rcpts, outcomes = txn.rcpts, txn.outcomes
            data = txn.data
            if data and not _ends_crlf(data):
                data += b"\r\n"
            out.append(self._mail_line(txn))
            self._push(_K_MAIL, txn, 0)
            for i in range(len(rcpts)):
                if outcomes[i] is None:
                    out.append(self._rcpt_line(txn, i))
                    self._push(_K_RCPT, txn, i)
            self._bdat_bytes += len(data)
            if self.on_body is not None:
                self.on_body(txn.tag)
            out.append(b"BDAT %d LAST\r\n" % len(data))
            out.append(data)
            self._push(_K_BDAT, txn, 0)
        return 0

    cdef bint _made(self, _CoreTxn txn) except -1:
        """Make a deferred message (``data`` a callable: a DeferredMessage) now
        that its transaction starts. False when there is none to send: every
        recipient then has the Outcome it gave (a render failure), 5.3.4 if
        it exceeds the server's SIZE, or 4.3.0 if making it raised."""
        cdef list outs = txn.outcomes
        cdef Py_ssize_t j
        data = txn.data
        txn.spare = 0
        try:
            if type(data) is DeferredMessage:
                data = (<DeferredMessage>data)._make(_C_TAIL_ROOM, &txn.spare)
            else:
                data = data()
        except Exception as e:  # a local bug: defer the message, loudly
            import traceback

            traceback.print_exc()
            data = _c_Outcome(
                _c_DEFERRED, 451, "4.3.0", f"local error: {e.__class__.__name__}", "local"
            )
        if type(data) is not bytes:
            txn.spare = 0
        else:
            txn.data = data
            if not self.size_limit or PyBytes_GET_SIZE(data) <= self.size_limit:
                return True
            data = _c_Outcome(
                _c_FAILED, 0, "5.3.4",
                f"message size {len(data)} exceeds the server's limit {self.size_limit}",
                "mail", self.mx,
            )
        for j in range(len(outs)):
            if outs[j] is None:
                outs[j] = data
        return False

    cdef int _send_rest(self, _CoreTxn txn) except -1:
        cdef tuple entry = <tuple>txn.rest.popleft()
        cdef int kind = entry[0]
        if kind == _K_DATA and (txn.mail_fail is not None or not txn.accepted):
            txn.rest.clear()
            self._group_open = False
            if txn.mail_fail is None:
                self._out.append(b"RSET\r\n")
                self._push(_K_RSET, None, 0)
            return self._finish(txn, "")
        self._push(kind, txn, entry[1])
        self._out.append(entry[2])
        return 0

    cdef object _result(self, _CoreTxn txn, str queue_id):
        cdef list outs = txn.outcomes
        for o in outs:
            if o is None:
                raise _c_Local("transaction finished with an undecided recipient")
        # (the DSN parameters went with RCPT, as _rcpt_line sent them: the reference's)
        return _c_TxnResult(txn.tag, outs, queue_id,
                            bool(txn.dsn_rcpt) and "DSN" in self.capabilities)

    cdef int _finish(self, _CoreTxn txn, str queue_id) except -1:
        self._active -= 1
        cdef list outs = txn.outcomes
        if len(outs) == 1 and outs[0] is not None and not txn.dsn_rcpt:
            self._events.append(_c_TxnResult(txn.tag, outs, queue_id))
        else:
            self._events.append(self._result(txn, queue_id))
        if not self._group_open:
            self._start_next()
        return 0

    # ------------------------------------------------------------------- input
    def receive_data(self, bytes data not None):
        return self._receive(data)

    cdef list _receive(self, bytes data):
        self._receive_in(data)
        ev = self._events
        self._events = []
        return ev

    cdef int _receive_in(self, bytes data) except -1:
        """_receive, its events left in ``_events`` (the compiled Link reads
        them there and empties the list, which is kept)."""
        cdef tuple reply
        cdef int kind, code
        cdef Py_ssize_t i, r
        cdef _CoreTxn txn
        cdef object t
        cdef str state = self.state
        cdef list replies = self._replies
        if state == _C_TLS or state == _C_CLOSED:
            self.state = _C_CLOSED
            raise _c_Remote(f"unexpected data in state {state!r}")
        if PyList_GET_SIZE(replies):  # (left by a read that raised)
            _list_reset(replies)
        try:
            self._parser._feed_into(data, replies)
            for r in range(PyList_GET_SIZE(replies)):
                reply = <tuple>replies[r]
                if not self._pn or self.state == _C_CLOSED:
                    self._reply(reply)
                    continue
                t = self._pop(&kind, &i)
                self._cur_kind, self._cur_txn, self._cur_i = kind, t, i
                self._cur_set = True
                code = reply[0]
                if kind == _K_CMD:
                    self._command_reply(self._cmd_names.popleft(), reply)
                elif t is not None:
                    txn = <_CoreTxn>t
                    if kind <= _K_RCPT and 200 <= code < 300 and txn.rest is None:
                        if kind == _K_RCPT:
                            if txn.mail_fail is None:
                                txn.accepted += 1
                            else:
                                self._reply_rcpt(txn, i, reply)
                    else:
                        self._handle(kind, txn, i, reply)
                self._cur_set = False
                self._cur_txn = None
                if code == 421 and self.state != _C_CLOSED:
                    self._abort(code, reply[1], reply[2])
        except BaseException as exc:
            if isinstance(exc, _c_Remote):
                if self._cur_set and self._cur_txn is not None:
                    self._unpop(self._cur_kind, self._cur_txn, self._cur_i)
                self._cur_set = False
                self._cur_txn = None
                self.state = _C_CLOSED
            raise
        _list_reset(replies)
        return 0

    cdef int _handle(self, int kind, _CoreTxn txn, Py_ssize_t i, tuple reply) except -1:
        if kind == _K_MAIL:
            return self._reply_mail(txn, i, reply)
        if kind == _K_RCPT:
            return self._reply_rcpt(txn, i, reply)
        if kind == _K_DATA:
            return self._reply_data(txn, i, reply)
        if kind == _K_DOT:
            return self._reply_dot(txn, i, reply)
        if kind == _K_BDAT:
            return self._reply_bdat(txn, i, reply)
        return 0  # RSET and commands without a transaction: only a 421 matters

    cdef int _reply(self, tuple reply) except -1:
        cdef int kind, code
        cdef Py_ssize_t i
        if self.state == _C_CLOSED:
            raise _c_Remote(f"reply after the session ended: {reply[0]}")
        if not self._pn:
            if reply[0] == 421:
                self._events.append(_c_CommandDone("unsolicited", *reply))
                self._abort(reply[0], reply[1], reply[2])
                return 0
            raise _c_Remote(f"unsolicited reply {reply[0]} {reply[2][:80]!r}")
        t = self._pop(&kind, &i)
        self._cur_kind, self._cur_txn, self._cur_i = kind, t, i
        self._cur_set = True
        if kind == _K_CMD:
            self._command_reply(self._cmd_names.popleft(), reply)
        elif t is not None:
            self._handle(kind, <_CoreTxn>t, i, reply)
        self._cur_set = False
        self._cur_txn = None
        code = reply[0]
        if code == 421 and self.state != _C_CLOSED:
            self._abort(code, reply[1], reply[2])
        return 0

    def _command_reply(self, name, reply):
        raise NotImplementedError

    cdef int _reply_mail(self, _CoreTxn txn, Py_ssize_t i, tuple reply) except -1:
        cdef int code = reply[0]
        if code >= 400:
            txn.mail_fail = self._outcome(reply, "mail")
        elif not 200 <= code < 300:
            raise _c_Remote(f"unexpected reply {code} to MAIL")
        if txn.rest:
            if txn.mail_fail is not None:
                for entry in txn.rest:
                    if (<tuple>entry)[0] == _K_RCPT:
                        txn.outcomes[(<tuple>entry)[1]] = txn.mail_fail
                txn.rest.clear()
                self._group_open = False
                self._finish(txn, "")
            else:
                self._send_rest(txn)
        return 0

    cdef int _reply_rcpt(self, _CoreTxn txn, Py_ssize_t i, tuple reply) except -1:
        cdef int code = reply[0]
        if txn.mail_fail is not None:
            if self.bdat and 200 <= code < 300 and txn.mail_fail.code == 503:
                txn.accepted += 1
            else:
                txn.outcomes[i] = txn.mail_fail
        elif 200 <= code < 300:
            txn.accepted += 1
        elif code >= 400:
            txn.outcomes[i] = self._outcome(reply, "rcpt")
        else:
            raise _c_Remote(f"unexpected reply {code} to RCPT")
        if txn.rest:
            self._send_rest(txn)
        return 0

    cdef int _reply_data(self, _CoreTxn txn, Py_ssize_t i, tuple reply) except -1:
        cdef int code = reply[0]
        cdef list wire
        cdef Py_ssize_t k, j, n
        cdef bytes tail
        self._group_open = False
        if code == 354:
            self._push(_K_DOT, txn, 0)
            wire = self._out
            k = len(wire)
            tail = b""
            if self.pipelining:
                self._start_next()
                wire = self._out  # (the same list: nothing takes it meanwhile)
                n = PyList_GET_SIZE(wire)
                if n > k:
                    tail = <bytes>wire[k] if n == k + 1 else b"".join(wire[k:])
                    PyList_SetSlice(wire, k, n, NULL)  # (del wire[k:], no slice object)
            if txn.accepted and txn.mail_fail is None:
                if self.on_body is not None:
                    self.on_body(txn.tag)
                wire.append(_dot_end(txn, tail))
            else:
                txn.dummy = True
                wire.append(b".\r\n" + tail)
        elif code >= 400:
            if txn.mail_fail is None:
                # (a 421: the session's end before any octet went, client.py's note)
                out = self._outcome(reply, "data-command" if code == 421 else "data")
                outs = txn.outcomes
                for j in range(len(outs)):
                    if outs[j] is None:
                        outs[j] = out
                self._out.append(b"RSET\r\n")
                self._push(_K_RSET, None, 0)
            self._finish(txn, "")
        else:
            raise _c_Remote(f"unexpected reply {code} to DATA")
        return 0

    cdef int _reply_bdat(self, _CoreTxn txn, Py_ssize_t i, tuple reply) except -1:
        cdef int code = reply[0]
        cdef Py_ssize_t j, k
        if code < 200 or 300 <= code < 400:
            raise _c_Remote(f"unexpected reply {code} to BDAT")
        cdef bytes data = txn.data
        self._bdat_bytes -= len(data) + (2 if data and not _ends_crlf(data) else 0)
        self._need_rset = not (200 <= code < 300)
        outs = txn.outcomes
        out = self._outcome(reply, "data")
        for j in range(len(outs)):
            if outs[j] is None:
                outs[j] = out
        qid = ""
        if code < 300 and txn.accepted:
            qid = queue_id(out.text)
            if len(outs) == 1 and outs[0] is out:
                self.delivered_one += 1
        return self._finish(txn, qid)

    cdef int _reply_dot(self, _CoreTxn txn, Py_ssize_t i, tuple reply) except -1:
        cdef int code = reply[0]
        cdef list outs = txn.outcomes
        cdef Py_ssize_t j, k
        cdef str qid, text
        if txn.dummy:
            for j in range(len(outs)):
                if outs[j] is None:
                    outs[j] = self._outcome(reply, "data")
            return self._finish(txn, "")
        if code < 200 or 300 <= code < 400:
            raise _c_Remote(f"unexpected reply {code} to end of data")
        if reply is self._dot_reply:
            out, qid = self._dot_out, self._dot_qid
        else:
            out = self._outcome(reply, "data")
            qid = ""
            if code < 300:
                qid = queue_id(out.text)
            self._dot_reply = reply
            self._dot_out = out
            self._dot_qid = qid
        if len(outs) == 1:
            outs[0] = out
            if code < 300:
                self.delivered_one += 1
        else:
            for j in range(len(outs)):
                if outs[j] is None:
                    outs[j] = out
        return self._finish(txn, qid)

    cdef object _outcome(self, tuple reply, str stage):
        cdef int code = reply[0]
        kind = _c_DELIVERED if code < 300 else (_c_DEFERRED if code < 500 else _c_FAILED)
        if code == 503:
            kind = _c_DEFERRED
        text = reply[2]
        if "\n" in text:
            text = text.replace("\n", " ")
        return _c_Outcome(kind, code, reply[1], text, stage, self.mx)

    # --------------------------------------------------------------- teardown
    def connection_lost(self, text="connection lost"):
        if self.state != _C_CLOSED or self._pn or self._qlen():
            self._abort(0, "", text)
        ev = self._events
        self._events = []
        return ev

    def _abort(self, int code, enhanced, text):
        cdef Py_ssize_t j
        cdef dict stage_of = {}
        cdef list seen = []
        cdef _CoreTxn txn
        cdef _CPend* e
        cdef Py_ssize_t k
        self.state = _C_CLOSED
        self._out = []
        text = text.replace("\n", " ")
        for k in range(self._pn):
            e = &self._pq[(self._ph + k) & (self._pcap - 1)]
            if e.txn == NULL:
                continue
            t = <object>e.txn
            if t not in stage_of:
                # (no 354 yet: nothing of the message sent, client.py's DATA_COMMAND)
                stage_of[t] = "data-command" if e.kind == _K_DATA else _C_STAGE[e.kind]
                seen.append(t)
            elif e.kind == _K_BDAT and code == 0:
                stage_of[t] = "data"  # the body went out pipelined (the reference's note)
        self._pclear()
        self._cmd_names.clear()
        while self._qlen():  # (an envelope not read yet: its transaction now)
            seen.append(self._qtake())
        for t in seen:
            txn = <_CoreTxn>t
            # A transaction whose MAIL was refused (this 421, at once) is
            # refused there: its recipients' replies were never coming.
            out = txn.mail_fail
            if out is None or out.code != code:  # (not a 5xx: those were kept open)
                stage = stage_of.get(txn, "mail")
                out = _c_Outcome(_c_DEFERRED, code, enhanced, text, stage, self.mx)
            outs = txn.outcomes
            for j in range(len(outs)):
                if outs[j] is None:
                    outs[j] = out
            self._events.append(self._result(txn, ""))
        self._active = 0
        self._bdat_bytes = 0
        self._need_rset = False
        self._group_open = False
        self._auth = []


# ---------------------------------------------------------------------------
# Link: compiled twin of fastsend.smtp.transport.Link (the reference), the
# asyncio protocol between a connection's socket and its SMTP client. Every
# server read goes through data_received: with the compiled ClientCore as the
# client, the reply parse, the reaction's bytes and the events are C calls
# here, and the events are sorted (results, command replies, waiters) without
# a Python frame per read or per event. Same attributes, methods and waiters
# as the reference, which SMTPConnection and connect() drive alike.

cdef str _C_UNSOLICITED = "unsolicited"

cdef extern from "unistd.h" nogil:
    int usleep(unsigned int usec)


cdef class Napper:
    """Compiled twin of fastsend.smtp.transport.Napper (the reference): after a
    loop iteration in which a connection read a reply, while at least
    ``min_links`` connections have a group in flight, the loop sleeps ``us``
    microseconds before it polls again, so the next poll finds the replies of
    many connections at once (one wake-up for them, not one each)."""

    cdef public Py_ssize_t sending  # links with a group in flight (SMTPConnection._send)
    cdef public Py_ssize_t min_links
    cdef public unsigned int us
    cdef public Py_ssize_t naps  # naps taken (tests, benches)
    cdef object _soon  # the loop's call_soon, or None: off
    cdef object _nap  # the bound method: no new one per nap
    cdef bint _due

    def __init__(self):
        self.sending = 0
        self.min_links = 0
        self.us = 0
        self.naps = 0
        self._soon = None
        self._nap = self.nap
        self._due = False

    def start(self, loop, double seconds, Py_ssize_t min_links):
        """Nap ``seconds`` on ``loop`` while ``min_links`` links send (0 s: off)."""
        self._due = False
        self.min_links = min_links
        if seconds <= 0 or loop is None:
            self._soon = None
            self.us = 0
        else:
            self._soon = loop.call_soon
            self.us = <unsigned int>(seconds * 1e6)

    def stop(self):
        self._soon = None
        self._due = False

    @property
    def active(self):
        return self._soon is not None

    def poke(self):
        """A connection read something: nap after this iteration, if due."""
        self._poke()

    cdef inline int _poke(self) except -1:
        if self._soon is not None and not self._due and self.sending >= self.min_links:
            self._due = True
            self._soon(self._nap)
        return 0

    def nap(self):
        cdef unsigned int us = self.us
        self._due = False
        if self._soon is None or self.sending < self.min_links:
            return
        self.naps += 1
        with nogil:
            usleep(us)


cdef Py_ssize_t _c_unsent(object transport) except -1:
    # transport.unsent (imported at the first check: it imports this module);
    # once per timer check, not per write.
    from fastsend.smtp.transport import unsent
    return unsent(transport)


cdef class Link:
    """Compiled twin of fastsend.smtp.transport.Link (an asyncio protocol)."""

    cdef public object client, loop, timeouts
    cdef object _transport, _write  # the transport and its bound write
    cdef public list results
    cdef public Py_ssize_t want
    cdef public object batch_waiter, cmd_waiter, early, timer
    cdef public double last, tick, moved
    cdef public Py_ssize_t unsent  # (as the reference's: the data block timeout)
    cdef public bint idle  # every reply answered: the next write starts the clock
    cdef public str lost_reason
    cdef ClientCore _core  # the client when it is the compiled core (else None)
    cdef object _time  # loop.time
    cdef public object napper  # the process's Napper (told of every read), or None
    cdef Napper _cnap  # the same when it is the compiled one

    def __init__(self, client, loop, t, napper=None):
        _client_types()
        self.client = client
        self._core = client if isinstance(client, ClientCore) else None
        self.loop = loop
        self._time = loop.time
        self.timeouts = t
        self._transport = self._write = None
        self.results = []
        self.want = 0
        self.batch_waiter = None
        self.cmd_waiter = None
        self.early = None
        self.last = loop.time()
        self.idle = False
        self.timer = None
        self.tick = min(t.mail, t.rcpt, t.data, t.data_end)
        self.unsent = 0
        self.moved = 0.0
        self.lost_reason = ""
        self.napper = napper
        self._cnap = napper if type(napper) is Napper else None

    @property
    def transport(self):
        return self._transport

    @transport.setter
    def transport(self, transport):
        # (STARTTLS sets the new one: its write is looked up once, here)
        self._transport = transport
        self._write = None if transport is None else transport.write

    # asyncio callbacks --------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        cdef ClientCore core = self._core
        cdef list events
        cdef bytes out
        if self._cnap is not None:
            self._cnap._poke()
        elif self.napper is not None:
            self.napper.poke()
        try:
            if core is not None:
                core._receive_in(data)
                events = core._events
            else:
                events = self.client.receive_data(data)
        except Exception as exc:
            if not isinstance(exc, _c_Remote):
                raise
            self.fail(f"protocol error from server: {exc}")
            return
        out = core._take_out() if core is not None else self.client.data_to_send()
        if PyBytes_GET_SIZE(out):
            self._write(out)
        self.last = self._time()
        if PyList_GET_SIZE(events):
            try:
                self._dispatch(events)
            finally:
                if core is not None:
                    _list_reset(events)  # (the core's own list, kept)
            if (core._pn == 0) if core is not None else not self.client.expecting:
                self.idle = True

    def connection_lost(self, exc):
        if not self.lost_reason:
            self.lost_reason = f"connection lost: {exc}" if exc else "connection closed by server"
        self.finish(self.client.connection_lost(self.lost_reason))

    def eof_received(self):
        return None  # close the transport; connection_lost follows

    def pause_writing(self):
        pass  # (asyncio.BaseProtocol's defaults: a batch's size bounds the buffer)

    def resume_writing(self):
        pass

    # plumbing -----------------------------------------------------------------
    def dispatch(self, events):
        self._dispatch(events)

    cdef int _dispatch(self, list events) except -1:
        cdef list results = self.results
        for ev in events:
            if type(ev) is _c_TxnResult:
                results.append(ev)
            elif (<tuple>ev)[0] != _C_UNSOLICITED:
                w = self.cmd_waiter
                if w is not None and not w.done():
                    self.cmd_waiter = None
                    w.set_result(ev)
                else:
                    self.early = ev
        w2 = self.batch_waiter
        if w2 is not None and len(results) >= self.want and not w2.done():
            self.batch_waiter = None
            w2.set_result(None)
        return 0

    def finish(self, events):
        """After the connection died: deliver outcomes, release every waiter."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._dispatch(events)
        w = self.cmd_waiter
        if w is not None and not w.done():
            self.cmd_waiter = None
            w.set_result(_c_CommandDone("lost", 0, "", self.lost_reason))
        w2 = self.batch_waiter
        if w2 is not None and not w2.done():
            self.batch_waiter = None
            w2.set_result(None)

    def fail(self, reason):
        """Give up on the connection: defer what is pending, abort the socket."""
        if not self.lost_reason:
            self.lost_reason = reason
        self.finish(self.client.connection_lost(self.lost_reason))
        if self._transport is not None:
            self._transport.abort()

    def write(self, wire):
        """Write commands; starts the reply clock when we were idle."""
        cdef double now = self._time()
        cdef double deadline
        if self.timer is None or self.idle:
            self.last = now
            self.idle = False
        deadline = self.last + self.timeouts.for_stage(self.client.expecting or "ehlo")
        if self.timer is None or self.timer.when() > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.arm(min(deadline - now, self.tick))
        if wire:
            self._write(wire)

    def arm(self, delay):
        self.timer = self.loop.call_later(delay, self.check_timeout)

    def check_timeout(self):
        """The reference's (transport.Link.check_timeout), the same steps."""
        self.timer = None
        stage = self.client.expecting
        if not stage or self.client.state == _C_CLOSED:
            return  # idle: nothing is waited for
        cdef double now = self._time()
        cdef Py_ssize_t left = _c_unsent(self._transport)
        if left:
            if left != self.unsent:
                self.unsent = left
                self.moved = now
            block = self.timeouts.data_block
            if now - self.moved >= block:
                self.fail(f"timeout: the server took none of our data for {block:g} s")
            else:
                self.arm(min(block - (now - self.moved), self.tick / 4))
            return
        if self.unsent:
            self.unsent = 0
            self.last = max(self.last, now)
        limit = self.timeouts.for_stage(stage)
        waited = now - self.last
        if waited >= limit:
            self.fail(f"timeout: no reply to {stage} after {limit:g} s")
        else:
            self.arm(min(limit - waited, self.tick))
