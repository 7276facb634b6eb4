# _worker.pxi: compiled twins of a worker's per-message loops over the SMTP
# client's results (the pure versions are the references):
# fastsend.delivery.worker.collect_delivered (each message delivered, into
# wire.Sent groups) and fastsend.outcome.all_delivered (a group's deliveries, for
# Lane.observe). Fields are read from their slots (_events.pxi's _Fields).

cdef tuple _TXN_COLLECT = ("tag", "outcomes", "queue_id", "dsn")
cdef tuple _OUT_COLLECT = ("kind", "code", "enhanced", "text", "mx")
cdef object _w_Res = None  # fastsend.wire.Res, at the first call
cdef object _w_Sent = None  # fastsend.wire.Sent
cdef Py_ssize_t _W_LOOKBACK = 8  # fastsend.delivery.worker.SENT_LOOKBACK
cdef object _w_K_DELIVERED = None  # fastsend.wire.K_DELIVERED
cdef str _w_DELIVERED = "delivered"  # fastsend.outcome.DELIVERED


cdef int _worker_types() except -1:
    global _w_Res, _w_Sent, _w_K_DELIVERED, _w_DELIVERED
    if _w_Res is None:
        from fastsend.outcome import DELIVERED
        from fastsend.wire import K_DELIVERED, Res, Sent
        _w_DELIVERED, _w_K_DELIVERED, _w_Res, _w_Sent = DELIVERED, K_DELIVERED, Res, Sent
    return 0


cdef object _sent_group(list out, object code, object enhanced, object mx, object source_ip):
    """Twin of worker._sent_group: the Sent group of these fields among the
    last _W_LOOKBACK Sent items of ``out`` (none past a Res), else a new one."""
    cdef Py_ssize_t k = len(out)
    cdef Py_ssize_t stop = k - _W_LOOKBACK
    cdef object g
    if stop < 0:
        stop = 0
    while k > stop:
        k -= 1
        g = out[k]
        if type(g) is not _w_Sent:
            break
        if g.code == code and g.source_ip == source_ip and g.mx == mx and g.enhanced == enhanced:
            return g
    g = _w_Sent([], code, enhanced, mx, source_ip)
    out.append(g)
    return g


def collect_delivered(list results, Py_ssize_t i, list out, str source_ip, str mx):
    """Twin of the pure ``collect_delivered``: from ``results[i]`` on, add to
    ``out``'s wire.Sent groups each result that is one message delivered to
    its one recipient (an int tag, a delivered first outcome), up to the first
    that is not; return that one's index (``len(results)``: none)."""
    if _w_Sent is None:
        _worker_types()
    cdef Py_ssize_t n = len(results)
    cdef object tr, tag, outcomes, o, qid, text, kind, code, enh, m
    cdef object g = None, gcode = None, genh = None, gmx = None
    cdef object gtext = None, gqid = None
    cdef list ids = None, texts = None, qids = None
    cdef _Fields ft = None, fo = None
    cdef str delivered = _w_DELIVERED
    while i < n:
        tr = results[i]
        ft = _fields_for(tr, ft, _TXN_COLLECT)
        tag = _get(tr, ft, 0)
        if type(tag) is not int:
            break
        outcomes = _get(tr, ft, 1)
        if not outcomes or _get(tr, ft, 3):  # (none; or its DSN parameters relayed)
            break
        o = (<list> outcomes)[0] if type(outcomes) is list else outcomes[0]
        fo = _fields_for(o, fo, _OUT_COLLECT)
        kind = _get(o, fo, 0)
        if kind is not delivered and kind != delivered:
            break
        qid = _get(tr, ft, 2)
        text = _get(o, fo, 3) or qid
        code = _get(o, fo, 1)
        enh = _get(o, fo, 2)
        m = mx or _get(o, fo, 4)
        if g is None or not (code == gcode and enh == genh and m == gmx):
            g = _sent_group(out, code, enh, m, source_ip)
            gcode, genh, gmx = code, enh, m
            ids = g.ids
            texts = g.texts
            qids = g.queue_ids
            gtext = g.text
            gqid = g.queue_id
        if not ids:
            g.text = gtext = text
            g.queue_id = gqid = qid
        elif texts:
            texts.append(text)
            qids.append(qid)
        elif not (text == gtext and qid == gqid):  # from here on, one text per message
            texts = [gtext] * len(ids)
            texts.append(text)
            qids = [gqid] * len(ids)
            qids.append(qid)
            g.texts = texts
            g.queue_ids = qids
            g.text = g.queue_id = gtext = gqid = ""
        ids.append(tag)
        i += 1
    return i


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
