# _address.pxi: compiled twin of fastsend.address.normalize (the pure version
# there is the reference; the same result or the same AddressError for every
# string).
#
# Every row of a list is normalized once. The common case (what the reference
# matches with one regex: an ASCII dot-atom local part, "@", a domain of
# letters, digits, dots and hyphens) is scanned here character by character;
# its domain is checked by the reference's own cached _domain. Anything else,
# and anything the plain case refuses, is the reference's to answer.

cdef object _addr_domain = None     # fastsend.address._domain (cached per domain)
cdef object _addr_reference = None  # fastsend.address.py_normalize
cdef dict _addr_domains = {}        # domain -> _domain(domain), as its lru_cache


cdef inline bint _addr_atext(Py_UCS4 c):
    if (c >= u'a' and c <= u'z') or (c >= u'A' and c <= u'Z') or (c >= u'0' and c <= u'9'):
        return True
    return c in u"!#$%&'*+/=?^_`{|}~-"


cdef inline bint _addr_dchar(Py_UCS4 c):
    return ((c >= u'a' and c <= u'z') or (c >= u'A' and c <= u'Z')
            or (c >= u'0' and c <= u'9') or c == u'.' or c == u'-')


def normalize(address):
    global _addr_domain, _addr_reference
    if _addr_reference is None:
        from fastsend import address as _mod
        _addr_domain = _mod._domain
        _addr_reference = _mod.py_normalize
    if type(address) is not str:
        return _addr_reference(address)
    cdef str a = <str>address
    cdef Py_ssize_t n = len(a)
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t at = -1
    cdef Py_UCS4 c
    cdef Py_UCS4 prev = u'.'  # a dot may not lead, follow a dot or end the local part
    while i < n:
        c = a[i]
        if c == u'@':
            at = i
            break
        if c == u'.':
            if prev == u'.':
                return _addr_reference(a)
        elif not _addr_atext(c):
            return _addr_reference(a)
        prev = c
        i += 1
    if at <= 0 or prev == u'.' or at == n - 1:
        return _addr_reference(a)
    for i in range(at + 1, n):
        if not _addr_dchar(a[i]):
            return _addr_reference(a)
    cdef str domain = a[at + 1:]
    ascii_domain = _addr_domains.get(domain, _addr_domains)
    if ascii_domain is _addr_domains:
        ascii_domain = _addr_domain(domain)
        if len(_addr_domains) >= 65536:
            _addr_domains.clear()
        _addr_domains[domain] = ascii_domain
    if ascii_domain is not None and at <= 64:
        full = a if ascii_domain == domain else a[:at + 1] + ascii_domain
        if len(full) <= 254:
            return (full, ascii_domain)
    return _addr_reference(a)
