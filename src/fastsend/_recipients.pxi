# _recipients.pxi: compiled twins of fastsend.recipients.csv_plain_rows and
# vars_json (the pure versions there are the references: the same rows, line
# numbers, bad rows and stopping point for every chunk of lines).
#
# Every row of a list is read once: a line with no '"' (the common list) is
# split at "," here, its address checked by fastsend.address.normalize (the
# compiled plain case), and its vars written as JSON straight from the fields
# (the _out_* writer of _events.pxi: plain strings copied, any other value
# msgspec's to encode), no csv-module record and no struct per row.

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


def csv_plain_rows(list chunk, Py_ssize_t at, Py_ssize_t line, Py_ssize_t after,
                   Py_ssize_t width, Py_ssize_t ei, list keys, Py_ssize_t maxlen,
                   Py_ssize_t limit, list rows, list lines, list bad, Py_ssize_t last):
    global _rc_normalize, _rc_address_error, _rc_bad_row
    cdef Py_ssize_t n = len(chunk), tl
    cdef str text
    cdef list rec
    cdef object email, pair
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
        rec = text[:tl].split(",")
        if len(rec) != width:
            if len(rec) == 1 and not (<str>rec[0]).strip():
                continue
            bad.append(_rc_bad_row(line, f"expected {width} columns, found {len(rec)}"))
            last = line
            continue
        if width == 1 and not (<str>rec[0]).strip():
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
