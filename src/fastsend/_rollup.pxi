# _rollup.pxi: compiled twins of fastsend.analytics.rollup.count_events,
# count_accepted and count_delivered (the pure versions there are the
# references; the same counts, special entries and remembered deliveries for
# every batch of events, as dicts or as fastsend.events Rows columns).
#
# The rollup listener sees every event of the supervisor twice per message
# (accepted, delivered): per event a few dict look-ups, a key tuple and a
# counter. Here the look-ups are PyDict_GetItem on the event (exact dicts; any
# other mapping through its own .get), the domain a slice after the last "@".

from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Tailmatch


cdef inline object _ev_get(object e, str key):
    cdef PyObject* v
    if type(e) is dict:
        v = PyDict_GetItem(e, key)
        return None if v is NULL else <object>v
    return e.get(key)


def count_events(list events, dict acc, list special, remember, dict plain, dict specials,
                 Py_ssize_t nc, wall):
    cdef object e, name, k, t, rcpt, key, row, mid, dom, mx, ip
    cdef object last_t = None
    cdef object minute = 0
    cdef bint spec
    cdef Py_ssize_t at, ki
    cdef list lrow
    for e in events:
        name = _ev_get(e, "event")
        k = plain.get(name)
        if k is None:
            k = specials.get(name)
            if k is None:
                continue
            spec = True
        else:
            spec = False
        t = _ev_get(e, "time") or wall
        if t != last_t:  # a batch's events mostly share one time
            last_t = t
            minute = int(t) // 60
        rcpt = _ev_get(e, "rcpt")
        if type(rcpt) is str:
            at = (<str>rcpt).rfind("@")
            dom = (<str>rcpt)[at + 1:]
        else:
            dom = ""
        mx = _ev_get(e, "mx") or ""
        ip = _ev_get(e, "source_ip") or ""
        key = (minute, _ev_get(e, "campaign"), _ev_get(e, "tenant"), mx, ip, dom)
        if spec:
            special.append((key, k, e))
            continue
        row = acc.get(key)
        if row is None:
            row = [0] * nc
            acc[key] = row
        if type(row) is list and type(k) is int:
            lrow = <list>row
            ki = <Py_ssize_t>k
            lrow[ki] = lrow[ki] + 1
        else:
            row[k] += 1
        if remember is not None and k == 1:
            mid = _ev_get(e, "id")
            if mid is not None:
                remember.append((mid, t, key))


cdef inline object _rcpt_domain(object rcpt):
    cdef Py_ssize_t at
    if type(rcpt) is str:
        at = (<str>rcpt).rfind("@")
        return (<str>rcpt)[at + 1:]
    return ""


cdef inline void _bump(dict acc, object key, Py_ssize_t nc, object k) except *:
    cdef object row = acc.get(key)
    cdef list lrow
    cdef Py_ssize_t ki
    if row is None:
        row = [0] * nc
        acc[key] = row
    if type(row) is list and type(k) is int:
        lrow = <list>row
        ki = <Py_ssize_t>k
        lrow[ki] = lrow[ki] + 1
    else:
        row[k] += 1


def count_accepted(t, campaign, tenant, list rcpts, dict acc, Py_ssize_t nc, k):
    # Every key of the batch differs only by the recipient's domain: its row
    # is found by the domain once per batch (a dict of domains), then bumped
    # in place, without a key tuple per recipient.
    cdef object minute = int(t) // 60
    cdef object rcpt, dom, key, row
    cdef dict by_dom = {}
    cdef Py_ssize_t ki = 0
    cdef bint fast = type(k) is int
    if fast:
        ki = <Py_ssize_t>k
    for rcpt in rcpts:
        dom = _rcpt_domain(rcpt)
        row = by_dom.get(dom)
        if row is not None:
            (<list>row)[ki] = (<list>row)[ki] + 1
            continue
        key = (minute, campaign, tenant, "", "", dom)
        _bump(acc, key, nc, k)
        if fast:
            row = acc.get(key)
            if type(row) is list:
                by_dom[dom] = row


cdef tuple _CLAIM_COUNT = ("campaign", "rcpt", "id")
cdef tuple _RES_COUNT = ("mx", "source_ip")


cdef inline bint _same_domain(object rcpt, object dom) except -1:
    """``_rcpt_domain(rcpt) == dom`` for a str ``dom``, without slicing."""
    cdef Py_ssize_t at, n
    if type(rcpt) is not str:
        return len(<str>dom) == 0
    n = len(<str>rcpt)
    at = (<str>rcpt).rfind("@")
    if n - at - 1 != len(<str>dom):
        return False
    return PyUnicode_Tailmatch(rcpt, dom, at + 1, n, 1) == 1


def count_delivered(t, list claims, list results, dict acc, remember, Py_ssize_t nc, k):
    # Consecutive deliveries often share their key (a worker answers a
    # connection's messages together: one campaign, MX, source IP, and a
    # batch's domain): the last key's row is bumped again without a key tuple,
    # a domain slice and a dict look-up per message. Any other row is found by
    # its domain in a dict per (campaign, MX, source IP) kept for the call
    # (a string's dict look-up, not a key tuple of six made, hashed and
    # compared per message: a connection's messages span many domains).
    cdef object minute = int(t) // 60
    cdef object c, r, key, mid, cid, mx, ip, rcpt, dom, ent, row
    cdef object last_key = None, last_cid = None, last_mx = None, last_ip = None
    cdef object last_dom = None
    cdef list last_row = None
    cdef dict ctxs = {}  # (campaign, mx, ip) -> {domain: (key, row)}
    cdef dict by_dom = None
    cdef object ctx_cid = None, ctx_mx = None, ctx_ip = None
    cdef Py_ssize_t i, ki = 0, n = len(claims)
    cdef bint fast = type(k) is int
    if len(results) != n:
        raise ValueError("count_delivered: claims and results differ in length")
    if fast:
        ki = <Py_ssize_t>k
    cdef _Fields fc = None, fr = None
    for i in range(n):
        c = claims[i]
        r = results[i]
        fc = _fields_for(c, fc, _CLAIM_COUNT)
        fr = _fields_for(r, fr, _RES_COUNT)
        cid = _get(c, fc, 0)
        rcpt = _get(c, fc, 1)
        mx = _get(r, fr, 0) or ""
        ip = _get(r, fr, 1) or ""
        if (last_row is not None and (cid is last_cid or cid == last_cid)
                and mx == last_mx and ip == last_ip and _same_domain(rcpt, last_dom)):
            last_row[ki] = last_row[ki] + 1
            key = last_key
        elif fast:
            if by_dom is None or not ((cid is ctx_cid or cid == ctx_cid)
                                      and mx == ctx_mx and ip == ctx_ip):
                ent = (cid, mx, ip)
                by_dom = ctxs.get(ent)
                if by_dom is None:
                    by_dom = {}
                    ctxs[ent] = by_dom
                ctx_cid, ctx_mx, ctx_ip = cid, mx, ip
            dom = _rcpt_domain(rcpt)
            ent = by_dom.get(dom)
            if ent is not None:
                key = (<tuple>ent)[0]
                last_row = <list>(<tuple>ent)[1]
                last_row[ki] = last_row[ki] + 1
            else:
                key = (minute, cid, None, mx, ip, dom)
                _bump(acc, key, nc, k)
                row = acc.get(key)
                last_row = None
                if type(row) is list:
                    last_row = <list>row
                    by_dom[dom] = (key, row)
            if last_row is not None:
                last_key, last_cid, last_mx, last_ip = key, cid, mx, ip
                last_dom = dom
        else:
            key = (minute, cid, None, mx, ip, _rcpt_domain(rcpt))
            _bump(acc, key, nc, k)
        if remember is not None:
            mid = _get(c, fc, 2)
            if mid is not None:
                remember.append((mid, t, key))
