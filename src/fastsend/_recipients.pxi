# _recipients.pxi: compiled twins of fastsend.recipients.csv_plain_rows and
# vars_json (the pure versions there are the references: the same rows, line
# numbers, bad rows and stopping point for every chunk of lines).
#
# Every row of a list is read once: a line with no '"' (the common list) is
# split at "," here, its address checked by fastsend.address.normalize (the
# compiled plain case), and its vars written as JSON straight from the fields
# (the _out_* writer of _events.pxi: plain strings copied, any other value
# msgspec's to encode), no csv-module record and no struct per row. A plain
# line (ASCII, an address normalize's plain case takes, no value to escape)
# is read where it lies (_rc_plain_row): its fields found by their commas,
# no list or field strings, only the address, its domain and the vars made.

cdef object _rc_normalize = None      # fastsend.address.normalize
cdef object _rc_address_error = None  # fastsend.address.AddressError
cdef object _rc_bad_row = None        # fastsend.recipients.BadRow
cdef _Out _rc_out = _Out(NULL, 0, 0)  # one row's vars (copied out per row)


cdef bytes _rc_vars(list keys, list values):
    cdef Py_ssize_t i, n = len(keys)
    cdef _Out* o = &_rc_out
    cdef bytes out
    if len(values) != n:
        raise ValueError("vars_json: keys and values differ in length")
    _ev_encoder()
    o.len = 0
    _out_raw(o, b"{", 1)
    for i in range(n):
        if i:
            _out_raw(o, b",", 1)
        _out_bytes(o, keys[i])
        _out_value(o, values[i])
    _out_raw(o, b"}", 1)
    out = PyBytes_FromStringAndSize(o.buf, o.len)
    o.len = 0
    if o.cap > (1 << 20):
        free(o.buf)
        o.buf = NULL
        o.cap = 0
    return out


def vars_json(list keys, list values):
    return _rc_vars(keys, values)


cdef inline bint _rc_atext(unsigned char c) noexcept:
    if (c >= 97 and c <= 122) or (c >= 65 and c <= 90) or (c >= 48 and c <= 57):
        return True
    return (c == 33 or c == 35 or c == 36 or c == 37 or c == 38 or c == 39 or c == 42
            or c == 43 or c == 47 or c == 61 or c == 63 or c == 94 or c == 95 or c == 96
            or c == 123 or c == 124 or c == 125 or c == 126 or c == 45)  # !#$%&'*+/=?^_`{|}~-


cdef inline bint _rc_dchar(unsigned char c) noexcept:
    return ((c >= 97 and c <= 122) or (c >= 65 and c <= 90) or (c >= 48 and c <= 57)
            or c == 46 or c == 45)  # . -


cdef enum:
    _RC_MAX_FIELDS = 64


cdef object _rc_plain_row(str text, Py_ssize_t tl, Py_ssize_t width, Py_ssize_t ei, list keys):
    """The row of a plain line (ASCII, ``width`` fields, its address what
    normalize's plain case takes, no value needing a JSON escape), read from
    the line's characters where they lie: only the address, its domain (the
    cache's key) and the vars are made. None: any other line, for the path
    below (split, normalize, _rc_vars), which gives the same row for these."""
    cdef Py_ssize_t n, i, j, k, es, ee, at, fs, fe
    cdef Py_ssize_t starts[_RC_MAX_FIELDS + 1]
    cdef const unsigned char* p
    cdef unsigned char c, prev
    cdef _Out* o = &_rc_out
    cdef str domain, email, full
    cdef object ascii_domain
    cdef bytes out
    if width < 2 or width > _RC_MAX_FIELDS or not PyUnicode_IS_ASCII(text) or _addr_domain is None:
        return None
    p = <const unsigned char*>PyUnicode_AsUTF8AndSize(text, &n)
    k = 0
    starts[0] = 0
    for i in range(tl):
        if p[i] == 44:  # ,
            k += 1
            if k >= width:
                return None
            starts[k] = i + 1
    if k != width - 1:
        return None
    starts[width] = tl + 1
    # the values: nothing JSON must escape ('"' and NUL never reach here)
    for j in range(width):
        if j == ei:
            continue
        for i in range(starts[j], starts[j + 1] - 1):
            if p[i] < 0x20 or p[i] == 92:  # control, backslash
                return None
    # the address: normalize's plain case (fastsend.address, _address.pxi)
    es = starts[ei]
    ee = starts[ei + 1] - 1
    at = -1
    prev = 46  # a dot may not lead, follow a dot or end the local part
    for i in range(es, ee):
        c = p[i]
        if c == 64:  # @
            at = i
            break
        if c == 46:
            if prev == 46:
                return None
        elif not _rc_atext(c):
            return None
        prev = c
    if at <= es or prev == 46 or at == ee - 1 or at - es > 64:
        return None
    for i in range(at + 1, ee):
        if not _rc_dchar(p[i]):
            return None
    domain = text[at + 1:ee]
    ascii_domain = _addr_domains.get(domain, _addr_domains)
    if ascii_domain is _addr_domains:
        ascii_domain = _addr_domain(domain)
        if len(_addr_domains) >= 65536:
            _addr_domains.clear()
        _addr_domains[domain] = ascii_domain
    if ascii_domain is None:
        return None
    email = text[es:ee]
    full = email if ascii_domain == domain else text[es:at + 1] + ascii_domain
    if len(full) > 254:
        return None
    # the vars: the JSON object of the keys and the other fields, in order
    o.len = 0
    _out_raw(o, b"{", 1)
    k = 0
    for j in range(width):
        if j == ei:
            continue
        if k:
            _out_raw(o, b",", 1)
        _out_bytes(o, keys[k])
        k += 1
        fs = starts[j]
        fe = starts[j + 1] - 1
        _out_room(o, fe - fs + 2)
        o.buf[o.len] = 34  # "
        memcpy(o.buf + o.len + 1, p + fs, fe - fs)
        o.buf[o.len + 1 + fe - fs] = 34
        o.len += fe - fs + 2
    _out_raw(o, b"}", 1)
    out = PyBytes_FromStringAndSize(o.buf, o.len)
    o.len = 0
    if o.cap > (1 << 20):
        free(o.buf)
        o.buf = NULL
        o.cap = 0
    return (full, ascii_domain, out)


cdef bint _rc_blank(list rec):
    """No field of ``rec`` holds more than white space (recipients._blank_record)."""
    for f in rec:
        if (<str>f).strip():
            return False
    return True


def csv_plain_rows(list chunk, Py_ssize_t at, Py_ssize_t line, Py_ssize_t after,
                   Py_ssize_t width, Py_ssize_t ei, list keys, Py_ssize_t maxlen,
                   Py_ssize_t limit, list rows, list lines, list bad, Py_ssize_t last):
    global _rc_normalize, _rc_address_error, _rc_bad_row
    cdef Py_ssize_t n = len(chunk), tl
    cdef str text
    cdef list rec
    cdef object email, pair, row
    if _rc_normalize is None:
        from fastsend import address as _a, recipients as _r
        _rc_normalize, _rc_address_error, _rc_bad_row = _a.normalize, _a.AddressError, _r.BadRow
    while at < n:
        text = chunk[at]
        if '"' in text or "\0" in text or len(text) > maxlen:
            return at, line, last, True
        at += 1
        line += 1
        if line <= after:
            continue
        tl = len(text)
        if tl and text[tl - 1] == u"\n":
            tl -= 1
            if tl and text[tl - 1] == u"\r":
                tl -= 1
        elif tl and text[tl - 1] == u"\r":
            tl -= 1
        if len(keys) == width - 1:
            row = _rc_plain_row(text, tl, width, ei, keys)
            if row is not None:
                rows.append(row)
                lines.append(line)
                last = line
                if len(rows) >= limit:
                    break
                continue
        rec = text[:tl].split(",")
        if len(rec) != width:
            if _rc_blank(rec):
                continue
            bad.append(_rc_bad_row(line, f"expected {width} columns, found {len(rec)}"))
            last = line
            continue
        if not (<str>rec[ei]).strip() and _rc_blank(rec):
            continue
        email = rec.pop(ei)
        try:
            pair = _rc_normalize(email)
        except _rc_address_error as e:
            bad.append(_rc_bad_row(line, str(e)))
            last = line
            continue
        rows.append((pair[0], pair[1], _rc_vars(keys, rec)))
        lines.append(line)
        last = line
        if len(rows) >= limit:
            break
    return at, line, last, False


# -- duplicate recipients: fingerprints and their table (fastsend.recipients.fingerprint,
# FpSet). A table of 8-byte slots, open addressing with linear probing, grown to twice
# its size at two thirds full: no object per recipient (a set of Python ints costs
# ~60 bytes each). A batch's fingerprints are made first and each one's slot fetched
# into the cache a few rows ahead of its turn: a table of a big list is megabytes,
# and a slot not in the cache cost more than the rest of the row's work.

from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc

cdef extern from *:
    """
    #define fs_prefetch(p) __builtin_prefetch((const void*)(p))
    """
    void fs_prefetch(const void* p) noexcept nogil

cdef enum:
    _FP_AHEAD = 12  # rows whose slot is fetched ahead of the one inserted


cdef inline uint64_t _fp_bytes(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0x243F6A8885A308D3ULL ^ <uint64_t>n, w
    cdef Py_ssize_t i, j, end
    i = 0
    while i < n:
        end = i + 8 if i + 8 <= n else n
        w = 0
        j = end - 1
        while j >= i:  # little-endian: byte i is the lowest
            w = (w << 8) | p[j]
            j -= 1
        h = (h ^ w) * 0x9E3779B97F4A7C15ULL
        h ^= h >> 32
        i += 8
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h if h else 1


cdef inline uint64_t _fp_of(str rcpt) except? 0:
    cdef Py_ssize_t n
    cdef const unsigned char* p
    cdef bytes raw
    if PyUnicode_IS_ASCII(rcpt):
        p = <const unsigned char*>PyUnicode_AsUTF8AndSize(rcpt, &n)
        return _fp_bytes(p, n)
    raw = rcpt.encode("utf-8", "surrogatepass")  # (lone surrogates as the reference)
    return _fp_bytes(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


def fingerprint(str rcpt):
    return _fp_of(rcpt)


cdef class FpSet:
    cdef uint64_t* slots
    cdef Py_ssize_t cap   # a power of 2
    cdef Py_ssize_t n

    def __cinit__(self):
        self.cap = 1024
        self.n = 0
        self.slots = <uint64_t*>calloc(self.cap, sizeof(uint64_t))
        if self.slots == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.slots)

    def __len__(self):
        return self.n

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = self.cap * 2, i, j
        cdef uint64_t* new = <uint64_t*>calloc(cap, sizeof(uint64_t))
        cdef uint64_t f
        if new == NULL:
            raise MemoryError()
        for i in range(self.cap):
            f = self.slots[i]
            if f:
                j = <Py_ssize_t>(f & <uint64_t>(cap - 1))
                while new[j]:
                    j = (j + 1) & (cap - 1)
                new[j] = f
        free(self.slots)
        self.slots = new
        self.cap = cap
        return 0

    cdef bint _add(self, uint64_t f) except -1:
        """Record ``f``; False when it was recorded already."""
        cdef Py_ssize_t j
        if (self.n + 1) * 3 > self.cap * 2:
            self._grow()
        j = <Py_ssize_t>(f & <uint64_t>(self.cap - 1))
        while self.slots[j]:
            if self.slots[j] == f:
                return False
            j = (j + 1) & (self.cap - 1)
        self.slots[j] = f
        self.n += 1
        return True

    cdef list _add_many(self, uint64_t* fps, Py_ssize_t n, list out):
        """Record ``fps[:n]``; the indexes of those recorded already. ``out``:
        each new one is appended there (None: not)."""
        cdef list dups = []
        cdef Py_ssize_t i
        while (self.n + n) * 3 > self.cap * 2:  # grown once, before: the prefetches hold
            self._grow()
        for i in range(n):
            if i + _FP_AHEAD < n:
                fs_prefetch(&self.slots[fps[i + _FP_AHEAD] & <uint64_t>(self.cap - 1)])
            if self._add(fps[i]):
                if out is not None:
                    out.append(fps[i])
            else:
                dups.append(i)
        return dups

    def reserve(self, Py_ssize_t n):
        while (self.n + n) * 3 > self.cap * 2:
            self._grow()

    def add_all(self, list rcpts):
        cdef Py_ssize_t i, n = len(rcpts)
        cdef uint64_t* fps = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
        if fps == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                fps[i] = _fp_of(<str?>rcpts[i])
            self._add_many(fps, n, None)
        finally:
            free(fps)

    def add_fps(self, list fps):
        for f in fps:
            self._add(<uint64_t>f if f else 1)

    def has_fps(self, list fps):
        cdef list out = []
        cdef uint64_t f
        cdef Py_ssize_t j
        for x in fps:
            f = <uint64_t>x if x else 1
            j = <Py_ssize_t>(f & <uint64_t>(self.cap - 1))
            while self.slots[j] and self.slots[j] != f:
                j = (j + 1) & (self.cap - 1)
            out.append(self.slots[j] == f)
        return out

    def add_rows(self, list rows, list fps=None):
        cdef Py_ssize_t i, n = len(rows)
        cdef uint64_t* got = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
        if got == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                got[i] = _fp_of(<str?>((<tuple?>rows[i])[0]))
            return self._add_many(got, n, fps)
        finally:
            free(got)
