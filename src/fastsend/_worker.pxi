# _worker.pxi: compiled twins of a worker's per-message loops over the SMTP
# client's results (the pure versions are the references):
# fastsend.delivery.worker.collect_delivered (the wire.Res of each message
# delivered) and fastsend.outcome.all_delivered (a group's deliveries, for
# Lane.observe). Fields are read from their slots (_events.pxi's _Fields).

cdef tuple _TXN_COLLECT = ("tag", "outcomes", "queue_id")
cdef tuple _OUT_COLLECT = ("kind", "code", "enhanced", "text", "mx")
cdef object _w_Res = None  # fastsend.wire.Res, at the first call
cdef object _w_K_DELIVERED = None  # fastsend.wire.K_DELIVERED
cdef str _w_DELIVERED = "delivered"  # fastsend.outcome.DELIVERED


cdef int _worker_types() except -1:
    global _w_Res, _w_K_DELIVERED, _w_DELIVERED
    if _w_Res is None:
        from fastsend.outcome import DELIVERED
        from fastsend.wire import K_DELIVERED, Res
        _w_DELIVERED, _w_K_DELIVERED, _w_Res = DELIVERED, K_DELIVERED, Res
    return 0


def collect_delivered(list results, Py_ssize_t i, list out, str source_ip, str mx):
    """Twin of the pure ``collect_delivered``: from ``results[i]`` on, append to
    ``out`` the wire.Res of each result that is one message delivered to its
    one recipient (an int tag, a delivered first outcome), up to the first
    that is not; return that one's index (``len(results)``: none)."""
    if _w_Res is None:
        _worker_types()
    cdef Py_ssize_t n = len(results)
    cdef object tr, tag, outcomes, o, qid, text, kind
    cdef _Fields ft = None, fo = None
    cdef object res = _w_Res, k_delivered = _w_K_DELIVERED
    cdef str delivered = _w_DELIVERED
    while i < n:
        tr = results[i]
        ft = _fields_for(tr, ft, _TXN_COLLECT)
        tag = _get(tr, ft, 0)
        if type(tag) is not int:
            return i
        outcomes = _get(tr, ft, 1)
        if not outcomes:
            return i
        o = outcomes[0]
        fo = _fields_for(o, fo, _OUT_COLLECT)
        kind = _get(o, fo, 0)
        if kind is not delivered and kind != delivered:
            return i
        qid = _get(tr, ft, 2)
        text = _get(o, fo, 3)
        out.append(res(tag, k_delivered, _get(o, fo, 1), _get(o, fo, 2), text or qid,
                       mx or _get(o, fo, 4), source_ip, "", "", False, qid))
        i += 1
    return n


def all_delivered(list results):
    """Twin of ``fastsend.outcome.all_delivered``: how many outcomes ``results``
    hold when every one is a delivery, else -1."""
    if _w_Res is None:
        _worker_types()
    cdef Py_ssize_t count = 0
    cdef object tr, o, kind
    cdef str delivered = _w_DELIVERED
    cdef _Fields ft = None, fo = None
    for tr in results:
        ft = _fields_for(tr, ft, _TXN_COLLECT)
        for o in _get(tr, ft, 1):
            fo = _fields_for(o, fo, _OUT_COLLECT)
            kind = _get(o, fo, 0)
            if kind is not delivered and kind != delivered:
                return -1
            count += 1
    return count
