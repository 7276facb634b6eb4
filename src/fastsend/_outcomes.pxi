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
    cdef bint events = claims is not None
    cdef _Fields fr = None, fc = None
    while i < end:
        r = items[i]
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
