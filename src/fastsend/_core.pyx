# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""fastsend._core: the compiled hot paths.

One extension module, one ``.pxi`` file per concern (each with a pure-Python
twin elsewhere in the package, chosen by ``fastsend._accel.pick``):

- _openssl.pxi     the libcrypto functions the others call (SHA-256)
- _smtp.pxi        SMTP reply parsing and DATA dot-stuffing (fastsend.smtp.replies), the
                   client's transaction state machine (fastsend.smtp.client.ClientCore)
- _ring.pxi        shared-memory SPSC rings with eventfd wake-ups (fastsend.ring)
- _throttle.pxi    GCRA token buckets and keyed limiters (fastsend.throttle)
- _mime.pxi        template splicing, quoted-printable bodies, message layout (fastsend.message)
- _dkim.pxi        DKIM canonicalization, body hashes, Ed25519 (fastsend.message.dkim)
- _sink.pxi        the sink's fast-path SMTP scanner (fastsend.sink.fast)
- _msgid.pxi       message-id tokens, HMAC-SHA256 on libcrypto (fastsend.msgid)
- _rollup.pxi      the analytics listener's count per event (fastsend.analytics.rollup)
- _address.pxi     recipient address normalization, the plain case (fastsend.address)
- _events.pxi      JSON lines of accepted/delivered events from columns (fastsend.events)
- _recipients.pxi  a CSV list's plain lines to spool rows (fastsend.recipients)
- _dispatch.pxi    claims grouped and written as Batch records (fastsend.queue.dispatch)
- _outcomes.pxi    deliveries applied: Results, counts, events (fastsend.queue.outcomes)
- _spooldb.pxi     spooled rows bound and stepped on the spool's own SQLite handle
                   (fastsend.spool.sqlite.RowWriter)
- _proc.pxi        a child's death with its parent, prctl without ctypes (fastsend.procs)
- _worker.pxi      a worker's loops over the client's results: deliveries to wire.Res
                   (fastsend.delivery.worker), a group's tally (fastsend.outcome)

Each included file owns its names; names match the pure-Python twin exactly.
"""

def core_version():
    """A trivial function so the module is importable before any .pxi lands."""
    return 1

include "_openssl.pxi"
include "_ring.pxi"
include "_throttle.pxi"
include "_mime.pxi"
include "_dkim.pxi"
include "_smtp.pxi"
include "_sink.pxi"
include "_msgid.pxi"
include "_events.pxi"
include "_rollup.pxi"
include "_address.pxi"
include "_recipients.pxi"
include "_dispatch.pxi"
include "_outcomes.pxi"
include "_spooldb.pxi"
include "_proc.pxi"
include "_worker.pxi"
