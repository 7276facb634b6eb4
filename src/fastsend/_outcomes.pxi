# _outcomes.pxi: compiled twin of fastsend.queue.outcomes.apply_delivered (the
# pure version there is the reference: the same claims taken, Results made,
# counts, hooks called and events kept, for every batch of outcomes).
#
# Nearly every outcome is a delivery: per message the supervisor takes the
# claim out of its window, makes its Result, counts it for its campaign and
# keeps the claim and the answer for its event. Here that loop runs with the
# fields read from their slots (_events.pxi's _Fields).

cdef tuple _RES_APPLY = ("id", "kind", "code", "enhanced", "text")
cdef tuple _CLAIM_APPLY = ("id", "attempts", "campaign")


def apply_delivered(list items, Py_ssize_t i, pop, list hooks, failed, tuple make,
                    list results, claims, list answers, dict delivered, list counts):
    cdef Py_ssize_t end = len(items)
    cdef object r, c, cid, have, hook
    cdef object result = make[0]
    cdef object state = make[1]
    cdef object k_delivered = make[2]
    cdef object sent = make[3]
    cdef bint events = claims is not None
    cdef _Fields fr = None, fc = None
    while i < end:
        r = items[i]
        if type(r) is sent:
            return i, None
        fr = _fields_for(r, fr, _RES_APPLY)
        c = pop(_get(r, fr, 0), None)
        if c is None:
            i += 1
            continue
        counts[0] = counts[0] + 1
        if _get(r, fr, 1) != k_delivered:
            return i, c
        counts[1] = counts[1] + 1
        fc = _fields_for(c, fc, _CLAIM_APPLY)
        results.append(result(_get(c, fc, 0), state, _get(c, fc, 1) + 1, 0.0,
                              _get(r, fr, 2), _get(r, fr, 3), _get(r, fr, 4)))
        cid = _get(c, fc, 2)
        have = delivered.get(cid)
        delivered[cid] = 1 if have is None else have + 1
        for hook in hooks:
            try:
                hook(c, r, state)
            except Exception:
                failed(hook)
        if events:
            claims.append(c)
            answers.append(r)
        i += 1
    return i, None


cdef tuple _SENT_APPLY = ("ids", "code", "enhanced", "mx", "source_ip", "text", "queue_id",
                         "texts", "queue_ids")


def apply_sent(g, pop, list hooks, failed, tuple make, list results, claims, list answers,
               dict delivered, list counts):
    """Twin of fastsend.queue.outcomes.apply_sent: a wire.Sent group's
    deliveries, each as apply_delivered applies a delivered wire.Res."""
    cdef object result = make[0]
    cdef object state = make[1]
    cdef object k_delivered = make[2]
    cdef object res = make[4]
    cdef bint events = claims is not None
    cdef _Fields fg = _fields_of(type(g), _SENT_APPLY)
    cdef _Fields fc = None
    cdef list ids = _get(g, fg, 0)
    cdef object code = _get(g, fg, 1), enhanced = _get(g, fg, 2)
    cdef object mx = _get(g, fg, 3), ip = _get(g, fg, 4)
    cdef object text = _get(g, fg, 5), qid = _get(g, fg, 6)
    cdef object texts = _get(g, fg, 7), qids = _get(g, fg, 8)
    cdef bint per_message = bool(texts)
    cdef bint any_hook = bool(hooks)
    cdef object r = g, h, c, mid, cid, have, hook
    cdef Py_ssize_t k, n = len(ids), applied = 0
    for k in range(n):
        mid = ids[k]
        c = pop(mid, None)
        if c is None:
            continue
        applied += 1
        if per_message:
            text = texts[k]
            qid = qids[k]
            r = res(mid, k_delivered, code, enhanced, text, mx, ip, "", "", False, qid)
        fc = _fields_for(c, fc, _CLAIM_APPLY)
        results.append(result(_get(c, fc, 0), state, _get(c, fc, 1) + 1, 0.0, code, enhanced, text))
        cid = _get(c, fc, 2)
        have = delivered.get(cid)
        delivered[cid] = 1 if have is None else have + 1
        if any_hook:
            h = r if per_message else res(mid, k_delivered, code, enhanced, text, mx, ip, "", "",
                                          False, qid)
            for hook in hooks:
                try:
                    hook(c, h, state)
                except Exception:
                    failed(hook)
        if events:
            claims.append(c)
            answers.append(r)
    if applied:
        counts[0] = counts[0] + applied
        counts[1] = counts[1] + applied


# Compiled twin of fastsend.spool.sqlite.delivered_runs (the pure version there
# is the reference): the spool's write of a flush's deliveries, grouped by
# (attempts, code, enhanced) without a key tuple per outcome (consecutive
# outcomes mostly share it: compared in place), each group's ids sorted and
# cut into runs of consecutive ids, one parameter tuple per run.

cdef tuple _RESULT_RUNS = ("state", "attempts", "code", "enhanced", "id")


cdef inline bint _same(object a, object b) except -1:
    return a is b or a == b


def delivered_runs(results, now, delivered):
    cdef dict done = {}
    cdef list rest = []
    cdef list ids = None
    cdef list runs = []
    cdef object r, a, code, enh, key = None, start, prev, i
    cdef long long p, v
    cdef Py_ssize_t j, n
    cdef _Fields fr = None
    for r in results:
        fr = _fields_for(r, fr, _RESULT_RUNS)
        if not _same(_get(r, fr, 0), delivered):
            rest.append(r)
            continue
        a = _get(r, fr, 1)
        code = _get(r, fr, 2)
        enh = _get(r, fr, 3)
        if key is None or not (_same(a, key[0]) and _same(code, key[1]) and _same(enh, key[2])):
            key = (a, code, enh)
            ids = done.get(key)
            if ids is None:
                ids = []
                done[key] = ids
        ids.append(_get(r, fr, 4))
    for key, ids in done.items():
        ids.sort()
        n = len(ids)
        start = prev = ids[0]
        p = prev
        for j in range(1, n):
            i = ids[j]
            v = i
            if v != p + 1:
                runs.append((key[0], now, key[1], key[2], start, prev))
                start = i
            prev = i
            p = v
        runs.append((key[0], now, key[1], key[2], start, prev))
    return runs, rest


# Compiled twin of fastsend.spool.sqlite.insert_params (the reference there):
# what one multi-row INSERT binds per spooled row, appended to its parameters
# straight from the rows (no column tuples, slices or a tuple per row), the
# vars bound as text when they are UTF-8 bytes.

def insert_params(list params, list rows, Py_ssize_t at, Py_ssize_t end, states):
    cdef Py_ssize_t k
    cdef object row, rcpt, domain, v
    cdef bint mixed = states is not None
    if mixed and type(states) is not list:
        states = list(states)
    for k in range(at, end):
        row = rows[k]
        rcpt, domain, v = row
        if type(v) is bytes:
            try:
                v = (<bytes>v).decode("utf-8")
            except UnicodeDecodeError:
                pass
        params.append(rcpt)
        params.append(domain)
        params.append(v)
        if mixed:
            params.append((<list>states)[k])
