"""The records that cross the shared-memory rings, encoded with msgpack.

Supervisor -> worker: :class:`CampaignSpec` (once per campaign per worker,
before its first batch), :class:`Batch` (messages of one campaign and one
destination domain, with the bodies its rows share: :func:`blob_ref`),
:class:`Drain` (finish what you have, then exit).

Worker -> supervisor: :class:`Results` (a flush of outcomes, several batches'
worth at once; deliveries in :class:`Sent` groups), :class:`Hello` (the worker is up), :class:`Handback` (mail
the worker gives back unattempted, so one slow site cannot hold its window),
:class:`Answered` (deliveries of a long pipelined group, kept in case it dies).

Shaping (fastsend.shaping): :class:`CampaignShaping` (the campaign's IP pool),
:class:`WarmupCounts` (both ways), :class:`ShapingEvents` (worker -> supervisor).

Structs are ``array_like`` and tagged, so a record is a compact msgpack array
and decoding is one C call per record, not per message.
"""

from __future__ import annotations

import math
import signal
from typing import Any

import msgspec

RING_BYTES = 32 << 20
# The supervisor's "stop now" to a worker (a second SIGTERM, SIGINT, a reload's
# drain_limit): the worker gives back what it never sent and exits
# (delivery.worker.Worker.stop_now). Not SIGTERM, which a worker ignores: a
# service manager stopping the whole process group (systemd's default
# KillMode=control-group) sends SIGTERM to the workers too, and the stop must
# stay the supervisor's drain.
STOP_NOW = signal.SIGUSR1
"""Capacity of each supervisor <-> worker ring."""
MAX_RECORD = RING_BYTES - 64
"""The largest record sent over a ring (a campaign spec must fit in one)."""


class CampaignSpec(msgspec.Struct, array_like=True, tag=1):
    id: int
    spec: dict[str, Any]


class Item(msgspec.Struct, array_like=True):
    id: int
    rcpt: str
    vars: bytes
    attempts: int


class Batch(msgspec.Struct, array_like=True, tag=2):
    campaign: int
    domain: str
    items: list[Item]
    # Bodies stored once in the spool (content-addressed): items whose vars is a
    # blob reference (:func:`blob_digest`) find their vars here, once per batch.
    blobs: dict[str, bytes] = {}


# A message body (vars) shared by many rows is stored once in the spool, by its
# SHA-256; each row's vars is then this reference. It is a JSON array, which no
# recipient's variables (always a JSON object) can be, so a tenant cannot forge
# one, and it still decodes as JSON wherever a row is read.
_BLOB_HEAD = b'["fs-blob","'


# A row whose vars begin so asks its result hook for something (RFC 3461 NOTIFY=
# SUCCESS or DELAY of a submitted recipient: fastsend.serve.dsn): it is kept whole,
# never a blob reference, so that the hook tells it by these bytes alone (a blob
# would be read from the spool for every delivery of a message to learn it).
NOTIFY_HEAD = b'{"notify":"'


def blob_ref(digest: str) -> bytes:
    """The vars of a row whose body is the blob ``digest`` (hex SHA-256)."""
    return _BLOB_HEAD + digest.encode("ascii") + b'"]'


def blob_digest(vars_: bytes) -> str | None:
    """The blob a row's vars refers to, or None (the vars are the row's own)."""
    if not vars_.startswith(_BLOB_HEAD) or len(vars_) != len(_BLOB_HEAD) + 66:
        return None
    return vars_[len(_BLOB_HEAD) : -2].decode("ascii")


class Drain(msgspec.Struct, array_like=True, tag=3):
    pass


# Outcome kinds on the wire.
K_DELIVERED, K_DEFERRED, K_FAILED = 0, 1, 2


class Res(msgspec.Struct, array_like=True, tag=15):
    """One message's outcome. For a failure, ``stage`` is where it happened
    (rcpt, data, connect, ...) and ``reason``/``hard`` are the bounce
    classifier's verdict (fastsend.bounce.classify_reply, the rules DSNs get).
    (Tagged: a :class:`Results` record holds these and :class:`Sent` groups.)"""

    id: int
    kind: int
    code: int
    enhanced: str
    text: str
    mx: str
    source_ip: str
    stage: str = ""
    reason: str = ""
    hard: bool = False
    queue_id: str = ""  # the receiving server's or provider's id for the message
    # A delivery whose DSN parameters went on to the receiver (outcome.TxnResult.dsn):
    # never in a Sent group; the receiver tells NOTIFY=SUCCESS itself (serve.dsn).
    dsn: bool = False


class Sent(msgspec.Struct, array_like=True, tag=16):
    """Messages ``ids`` delivered, each to its one recipient, from
    ``source_ip`` to ``mx`` with the same ``code`` and ``enhanced``: nearly
    every outcome, in columns (the fields every message shares once, no struct
    and five strings per message). The reply text and the remote queue id are
    ``text`` and ``queue_id`` when every message's are the same (``texts`` is
    empty), else ``texts[k]`` and ``queue_ids[k]`` are message ``ids[k]``'s
    (``text`` and ``queue_id`` then empty). Message ``ids[k]``'s outcome is
    the :class:`Res` :func:`expand` makes of it. The attribute names are
    Res's, so a group whose messages share their text stands for each
    message's answer where one is read by name (events, rollups)."""

    ids: list[int]
    code: int
    enhanced: str
    mx: str
    source_ip: str
    text: str = ""
    queue_id: str = ""
    texts: list[str] = []
    queue_ids: list[str] = []


class Results(msgspec.Struct, array_like=True, tag=4):
    """A flush of outcomes, in the order they came: a :class:`Res` per message,
    or a :class:`Sent` group of deliveries."""

    items: list[Res | Sent]


class Answered(msgspec.Struct, array_like=True, tag=24):
    """Worker -> supervisor: deliveries of a pipelined group still in flight
    (the receiver's 250 read, the group's other replies not yet), told while
    the group takes long (``delivery.worker.ANSWERED_EVERY``). Not outcomes:
    the group's :class:`Results` tells them as any. Kept in case the worker
    dies first: then these are delivered, not attempts of unknown outcome
    sent again (queue.lifecycle ``retire``)."""

    items: list[Res | Sent]


def expand(items: list[Res | Sent]) -> list[Res]:
    """A :class:`Results` record's items as one :class:`Res` per message, in order."""
    out: list[Res] = []
    for it in items:
        if isinstance(it, Res):
            out.append(it)
            continue
        for k, mid in enumerate(it.ids):
            text, qid = (it.texts[k], it.queue_ids[k]) if it.texts else (it.text, it.queue_id)
            out.append(Res(mid, K_DELIVERED, it.code, it.enhanced, text, it.mx, it.source_ip,
                           "", "", False, qid))  # fmt: skip
    return out


class Hello(msgspec.Struct, array_like=True, tag=5):
    pid: int
    ips: list[str]


class Stats(msgspec.Struct, array_like=True, tag=6):
    """A worker's cumulative counters (sent about once a second): connections
    opened/failed/open now, messages sent, DKIM signing seconds, and any other
    named counter. Cumulative, so a lost record loses nothing."""

    pid: int
    counters: dict[str, float]


class CampaignShaping(msgspec.Struct, array_like=True, tag=7):
    """Supervisor -> worker, after a CampaignSpec: the IP pool the campaign uses."""

    campaign: int
    pool: str


class WarmupCounts(msgspec.Struct, array_like=True, tag=8):
    """Both ways: warm-up messages sent today per "DAY|IP|PROVIDER" (cumulative).

    The worker reports its counters about once a second; the supervisor
    persists them and hands them to a (re)started worker before its batches."""

    counts: dict[str, int]


class ShapingEvents(msgspec.Struct, array_like=True, tag=9):
    """Worker -> supervisor: shaping decisions (rate cuts, rests, throttles) for
    the event log, as event dicts (event "shaping")."""

    events: list[dict[str, Any]]


class Handback(msgspec.Struct, array_like=True, tag=10):
    """Worker -> supervisor: messages the worker will not send soon (their site
    is shaped, resting or suspended, or the worker is draining), handed back
    unattempted. This is their outcome for this claim: the supervisor queues the
    k-th again at ``at + min(k * step, HANDBACK_SPREAD)`` (unix seconds), attempts
    unchanged. One record per handed-back group, never per message.
    ``elsewhere``: none of this worker's addresses may send to their site
    before ``at``: another worker owning an address of their pool may send
    them now (``Dispatch.route_pools``) -- ELSEWHERE_WORKER: this worker's own
    warm-up caps; ELSEWHERE_IP: its addresses are resting or suspended there,
    so workers sending from the same addresses may not either."""

    ids: list[int]
    at: float
    step: float
    text: str
    elsewhere: int = 0


ELSEWHERE_WORKER = 1  # Handback.elsewhere: over this worker's own warm-up caps
ELSEWHERE_IP = 2  # Handback.elsewhere: its addresses rest (refused by the site)


class IPRest(msgspec.Struct, array_like=True, tag=11):
    """Supervisor -> worker: rest a source IP for providers ("*": all) until ``until``
    (unix seconds), e.g. while it is on a DNS blocklist (fastsend.analytics.dnsbl).
    ``key`` names where it comes from ("dnsbl:ZONE", "snds"): a renewal replaces
    the rest of the same key, :class:`IPLift` ends it early. ``recheck``: seconds
    until that source looks again (a rest it may lift then); mail the rest holds
    is handed back for at most that long, not until ``until``."""

    ip: str
    providers: list[str]
    until: float
    reason: str
    key: str = ""
    recheck: float = 0.0


class IPLift(msgspec.Struct, array_like=True, tag=19):
    """Supervisor -> worker: the rest of ``ip`` under ``key`` (:class:`IPRest`) ends
    now (its blocklist delisted the address)."""

    ip: str
    key: str


class WarmupAdjust(msgspec.Struct, array_like=True, tag=12):
    """Supervisor -> worker: warm-up day offsets per IP (fastsend.analytics.warmup)."""

    offsets: dict[str, int]


class CampaignInfo(msgspec.Struct, array_like=True, tag=13):
    """Supervisor -> worker, after a CampaignSpec: what routes by campaign or
    tenant need (fastsend.delivery.routes)."""

    id: int
    name: str
    tenant: str


class Events(msgspec.Struct, array_like=True, tag=14):
    """Worker -> supervisor: events for the event log (transport failover)."""

    events: list[dict[str, Any]]


class Withdraw(msgspec.Struct, array_like=True, tag=17):
    """Supervisor -> worker: messages of its window whose address was suppressed
    since their claim. The worker hands back (wire.Handback) those still waiting
    on its ready queues, unsent; their next claim ends them ``suppressed``. One
    already in a transaction is answered as usual."""

    ids: list[int]


class TransportShares(msgspec.Struct, array_like=True, tag=18):
    """This node's share of each transport's ``max_connections`` (name -> the
    connections or requests in flight its workers together may hold), when
    several nodes send through the transport (a shared spool:
    :class:`fastsend.shared_limits.ConnectionShares`). Each worker keeps its
    part of it, as of the whole ``max_connections`` on a single node."""

    conns: dict[str, int]
    # name -> live nodes sending through it: a rate read from the provider (SES's
    # MaxSendRate, the account's) is split among them (transports.http).
    nodes: dict[str, int] = {}


class Retire(msgspec.Struct, array_like=True, tag=20):
    """Supervisor -> worker: a reload replaces you. Hand back (wire.Handback,
    unattempted, due now) everything no connection has taken yet, open no new
    connection, finish the transactions on the wire and exit; answer with
    :class:`Conns` (and again as they close), so that the worker started in
    your place at once on the new config keeps within each (source IP, site)
    connection limit together with you."""


class Conns(msgspec.Struct, array_like=True, tag=21):
    """Connections a retiring worker still holds, as (source IP, site's lane
    key, count): worker -> supervisor (wire.Retire's answer and its updates),
    then supervisor -> the worker that took its place (the sum over the
    retiring workers of its slot; empty once they exited), which opens only
    ``max_connections`` less these on each lane."""

    held: list[tuple[str, str, int]]


class Forget(msgspec.Struct, array_like=True, tag=23):
    """Supervisor -> worker: campaigns with nothing in this worker's window for a
    while (``Dispatch.forget_idle``): drop what was kept for them (spec, compiled
    template, names, pool). A later batch of one comes after its spec again."""

    campaigns: list[int]


class LaneState(msgspec.Struct, array_like=True):
    """What one (source IP, site) lane of a retiring worker has used and
    learned (:meth:`fastsend.shaping.lanes.Lane.state`), for the worker that
    takes its place: monotonic seconds (one clock for every process of the
    host). ``buckets``: (rate, burst, debt in seconds at ``at``) per message
    bucket; ``conn``: the connection bucket's debt; the AIMD controller's
    rate (inf: not cut), its peak, last cut and its bucket's debt; a rule
    throttle's end, connections (this worker's part, and the address's), rate
    and debt; the automation rules' recent matches (rule name -> times)."""

    ip: str
    site: str
    at: float
    buckets: list[tuple[float, int, float]]
    conn: float = 0.0
    aimd_rate: float = math.inf
    aimd_peak: float = 0.0
    aimd_last_cut: float = -math.inf
    aimd_debt: float = 0.0
    throttle_until: float = 0.0
    throttle_conns: int = 0
    throttle_rate: float = 0.0
    throttle_debt: float = 0.0
    triggers: dict[str, list[float]] = {}
    # the throttle's connections over every worker sending from the address
    # (Lane.throttle_whole: its places on the node when below those workers)
    throttle_whole: int = 0


class SiteMarks(msgspec.Struct, array_like=True):
    """What a retiring worker's site queue learned of the site's hosts
    (delivery.pool.SiteQueue), for the worker that takes its place; times are
    monotonic (one clock for the host's processes). ``down``: address -> until
    when it is tried after the others (it did not answer); ``refused``: (source
    IP, address, until) of a host that refused that address at its greeting;
    ``dead_until`` and ``dead`` (enhanced code, text, stage, mx): the site
    unreachable, its mail answered with that without a connection until then."""

    pool: str
    key: str
    down: dict[str, float] = {}
    refused: list[tuple[str, str, float]] = []
    dead_until: float = 0.0
    dead: tuple[str, str, str, str] | None = None


class Lanes(msgspec.Struct, array_like=True, tag=22):
    """A retiring worker's lanes (wire.Retire's answer, before :class:`Conns`),
    then supervisor -> the worker started in its place, before any batch: it
    starts each of those lanes where the old one was (its buckets as spent,
    an AIMD cut, a throttle), so a reload neither gives a site a second burst
    nor sends a site slowed down by its 421s at full speed again. Before, the
    new worker started with full buckets and the configured rates."""

    lanes: list[LaneState]
    # A provider transport's queue (transports.http.ProviderQueue.state): its site
    # key -> (paused until, monotonic; its rate, 0: none; its request cap; backoff).
    providers: dict[str, tuple[float, float, int, float]] = {}
    # A site's connections capped at those that worked when one more was refused
    # (delivery.pool.SiteQueue.cap, CAP_FOR): (pool, site key, cap, until, monotonic)
    sites: list[tuple[str, str, int, float]] = []
    # Its sites' hosts down or refusing, and sites unreachable (SiteQueue.marks):
    # before, a reload's new worker connected to each again at once.
    marks: list[SiteMarks] = []


ToWorker = (
    CampaignSpec
    | Batch
    | Drain
    | CampaignShaping
    | WarmupCounts
    | IPRest
    | IPLift
    | WarmupAdjust
    | CampaignInfo
    | Withdraw
    | TransportShares
    | Retire
    | Conns
    | Lanes
    | Forget
)
FromWorker = (
    Results
    | Hello
    | Stats
    | WarmupCounts
    | ShapingEvents
    | Handback
    | Events
    | Conns
    | Lanes
    | Answered
)

encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)
