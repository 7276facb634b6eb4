"""Rollups: counters per minute, hour and day of tenant x campaign x provider x source IP.

NAME
    fastsend.analytics.rollup -- Rollups (an EventLog listener), AnalyticsSettings.

DESCRIPTION
    :meth:`Rollups.listener` is an :class:`~fastsend.events.EventLog`
    listener. Per event it does a few dict operations: the event name picks a
    counter, and (minute, campaign, tenant, MX host, source IP, recipient
    domain) picks an in-memory row; nothing else runs on the event path.
    Bounces, deferrals, complaints, unsubscribes, opens and clicks are also
    queued for the flush, which needs more than a counter:

    - bounces and deferrals are classified (:func:`fastsend.bounce.classify_reply`,
      cached per reply) into a reason and hard/soft, unless the event carries
      them (asynchronous bounces from the intake do);
    - complaints, unsubscribes, opens and clicks carry no MX or source IP:
      they take those of the message's delivery, which the rollup remembers
      for the last ``remember_messages`` deliveries, and looks up the others
      with ``delivery_of`` (serve's event index: mail sent before a restart or
      by another node); unknown: the provider from the recipient's domain, the
      source IP ""; 0: none, where no engagement event can arrive, as in a
      `send` run). A bounce with no MX or source IP of its own (a DSN, a
      provider's event after the delivery) is attributed the same way;
    - opens and clicks are judged human-likely or machine by
      :mod:`fastsend.analytics.machine`; a click waits ``burst_window_s``
      before it is judged, so "every link at once" sees the whole burst;
    - unique opens and clicks (per message, human and machine apart) are
      decided by :meth:`RollupStore.first_seen`, durable across restarts; a
      human-likely click is also the message's unique human open when none
      was counted (``opens_unique``: a click proves the open no pixel told,
      so the click-to-open rate stays at most 1).

    :meth:`flush` (about once a second: :meth:`maybe_flush` from the event
    path and from the server's tick) resolves each row's tenant (the
    ``tenant_of`` callback, cached) and provider (the shaping policy's MX
    suffixes, else the recipient domain's provider, else "other"; cached),
    and adds the rows to the store's minute, hour and day buckets in one
    call. :meth:`gauge` records sampled values (queue depth, oldest age).

    Config (``[analytics]``, every key optional)::

        enabled = true
        minute_days = 8          # retention per granularity, in days
        hour_days = 120
        day_days = 800
        remember_messages = 500000
        machine_rules = "my-rules.toml"   # tried before the shipped machine.toml

DELIBERATELY NOT HERE
    No rates and no query planning (:mod:`fastsend.analytics.query`), no
    alarms (:mod:`fastsend.analytics.alarms`). It never blocks the event
    log: a failing flush is logged and its counts are kept for the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fastsend._accel import pick
from fastsend.analytics.machine import MachineRules, load_machine_rules
from fastsend.analytics.store import ALL, IDX, NC, RollupStore, store_outage
from fastsend.config import Config
from fastsend.config.analytics import AnalyticsSettings
from fastsend.events import (
    AcceptedRows,
    DeliveredRows,
    Rows,
    legacy_mark_key,
    mark_key,
    read_back,
)

log = logging.getLogger("fastsend.analytics")

GRAINS = (60, 3600, 86400)
FLUSH_EVERY = 1.0
MAX_KEYS = 20_000  # distinct providers/domains cached
MAX_REASON = 300
NODE = "*"  # node-wide rows: not a valid tenant name (fastsend.serve.auth)
MARK = "logmark"  # the store's states: how far into each event log the counts go

# Event name -> counter index; the names below FIRST_SPECIAL are counted on the spot.
_PLAIN = {
    "accepted": IDX["accepted"],
    "delivered": IDX["delivered"],
    "suppressed": IDX["suppressed"],
}
_SPECIAL = {
    "deferred": IDX["deferred"],
    "bounced": IDX["bounced"],
    "expired": IDX["expired"],
    "complained": IDX["complaints"],
    "unsubscribed": IDX["unsubscribes"],
    "opened": IDX["opens"],
    "clicked": IDX["clicks"],
}
_OPEN, _CLICK = IDX["opens"], IDX["clicks"]
_DEFERRED, _BOUNCED, _EXPIRED = IDX["deferred"], IDX["bounced"], IDX["expired"]
_HARD, _SOFT = IDX["bounced_hard"], IDX["bounced_soft"]
# first_seen kinds: (counter, machine) -> kind
_FIRST = {(_OPEN, False): 1, (_OPEN, True): 2, (_CLICK, False): 3, (_CLICK, True): 4}
_UNIQUE = {1: IDX["opens_unique"], 2: IDX["opens_machine_unique"],
           3: IDX["clicks_unique"], 4: IDX["clicks_machine_unique"]}  # fmt: skip
_MACHINE = {_OPEN: IDX["opens_machine"], _CLICK: IDX["clicks_machine"]}
_DELIVERED, _ACCEPTED = IDX["delivered"], IDX["accepted"]
_ENGAGED = frozenset((_OPEN, _CLICK, IDX["complaints"], IDX["unsubscribes"]))
MAX_LOOKUP = 10_000  # deliveries looked up per flush




def count_events(
    events: list[dict[str, Any]],
    acc: dict[tuple[Any, ...], list[int]],
    special: list[tuple[tuple[Any, ...], int, dict[str, Any]]],
    remember: list[tuple[Any, Any, tuple[Any, ...]]] | None,
    plain: dict[str, int],
    specials: dict[str, int],
    nc: int,
    wall: float,
) -> None:
    """The listener's work per event (``fastsend._core`` has the compiled twin):
    the event name picks a counter (``plain``: counted here; ``specials``:
    queued on ``special`` for the flush with their key), and (minute,
    campaign, tenant, MX host, source IP, recipient domain) picks ``acc``'s row
    of ``nc`` counters. An event without a time counts at ``wall``. With
    ``remember`` (a list), each delivery's (id, time, key) is appended to it."""
    last_t: Any = None
    minute = 0
    for e in events:
        get = e.get
        name = get("event")
        k = plain.get(name)  # type: ignore[arg-type]
        if k is None:
            k = specials.get(name)  # type: ignore[arg-type]
            if k is None:
                continue
            spec = True
        else:
            spec = False
        t = get("time") or wall
        if t != last_t:  # a batch's events mostly share one time
            last_t, minute = t, int(t) // 60
        rcpt = get("rcpt")
        key = (
            minute,
            get("campaign"),
            get("tenant"),
            get("mx") or "",
            get("source_ip") or "",
            rcpt[rcpt.rfind("@") + 1 :] if rcpt.__class__ is str else "",  # lowered later
        )
        if spec:
            special.append((key, k, e))
            continue
        row = acc.get(key)
        if row is None:
            row = acc[key] = [0] * nc
        row[k] += 1
        if k == _DELIVERED and remember is not None:
            mid = get("id")
            if mid is not None:
                remember.append((mid, t, key))


def count_accepted(
    t: float,
    campaign: Any,
    tenant: Any,
    rcpts: list[str],
    acc: dict[tuple[Any, ...], list[int]],
    nc: int,
    k: int,
) -> None:
    """What ``count_events`` counts for the accepted events of an
    :class:`~fastsend.events.AcceptedRows` (at time ``t``), without their
    dicts (compiled twin in ``_rollup.pxi``)."""
    minute = int(t) // 60
    for rcpt in rcpts:
        key = (minute, campaign, tenant, "", "",
               rcpt[rcpt.rfind("@") + 1 :] if rcpt.__class__ is str else "")  # fmt: skip
        row = acc.get(key)
        if row is None:
            row = acc[key] = [0] * nc
        row[k] += 1


def count_delivered(
    t: float,
    claims: list[Any],
    results: list[Any],
    acc: dict[tuple[Any, ...], list[int]],
    remember: list[tuple[Any, Any, tuple[Any, ...]]] | None,
    nc: int,
    k: int,
) -> None:
    """What ``count_events`` counts (and remembers) for the delivered events of
    a :class:`~fastsend.events.DeliveredRows` (at time ``t``), without their
    dicts (compiled twin in ``_rollup.pxi``)."""
    minute = int(t) // 60
    for c, r in zip(claims, results, strict=True):
        rcpt = c.rcpt
        key = (minute, c.campaign, None, r.mx or "", r.source_ip or "",
               rcpt[rcpt.rfind("@") + 1 :] if rcpt.__class__ is str else "")  # fmt: skip
        row = acc.get(key)
        if row is None:
            row = acc[key] = [0] * nc
        row[k] += 1
        if remember is not None and c.id is not None:
            remember.append((c.id, t, key))


# the references (tests compare the twins with them)
py_count_events, py_count_accepted, py_count_delivered = (
    count_events, count_accepted, count_delivered)  # fmt: skip
count_events = pick(count_events)
count_accepted = pick(count_accepted)
count_delivered = pick(count_delivered)


class Rollups:
    """The listener, its in-memory second of counts, and the flush to a store."""

    def __init__(
        self,
        store: RollupStore,
        *,
        tenant_of: Callable[[int], str],
        provider_of: Callable[[str, str], str],
        settings: AnalyticsSettings | None = None,
        rules: MachineRules | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or AnalyticsSettings()
        # A user's rules file is read (and checked) now; the shipped rules only
        # once an open or a click needs them (a `send` never sees one).
        self._rules = rules
        if rules is None and self.settings.machine_rules:
            self._rules = load_machine_rules(self.settings.machine_rules)
        self.tenant_of = tenant_of
        self.provider_of = provider_of
        self.acc: dict[tuple[Any, ...], list[int]] = {}
        self.special: list[tuple[tuple[Any, ...], int, dict[str, Any]]] = []
        self.clicks_waiting: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.click_log: dict[int, list[tuple[float, str]]] = {}  # msg -> [(t, url)]
        self.gauges_pending: dict[tuple[int, int, str, str], float] = {}
        # msg id -> (delivered at, campaign, tenant, mx, source_ip, domain); two generations.
        self.sent: dict[int, tuple[Any, ...]] = {}
        self.sent_old: dict[int, tuple[Any, ...]] = {}
        self._places: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._tenants: dict[int, str] = {}
        self._providers: dict[tuple[str, str], str] = {}
        self._classified: dict[tuple[int, str, str], tuple[str, bool]] = {}
        self.last_flush = time.monotonic()
        self.last_prune = 0.0
        self.failed = 0
        # The event log whose position (EventLog.mark) is written with the counts,
        # under ``mark_key`` (this host and the log's path): see catch_up.
        self.log: Any = None
        self.mark_key = ""
        self._mark_written: str | None = None
        self._outage = False
        # serve prunes the store from its retention pass, in a thread (a DELETE of an
        # hour of minute rows is not for the event loop): fastsend.serve.retention.
        self.prune_elsewhere = False
        # Where deliveries this process does not remember went ({id: (time, delivered
        # event)}; serve's event index): an open, click, complaint or later bounce
        # after a restart, or of mail another node sent, keeps its MX and source IP.
        self.delivery_of: Callable[[list[int]], dict[int, tuple[float, dict[str, Any]]]] | None
        self.delivery_of = None
        self._lookup_failed = False

    @property
    def rules(self) -> MachineRules:
        """The machine-open and -click rules (:mod:`fastsend.analytics.machine`)."""
        if self._rules is None:
            self._rules = load_machine_rules(None)
        return self._rules

    # -- the event path --------------------------------------------------------

    def listener(self, events: list[dict[str, Any]]) -> None:
        half = self.settings.remember_messages // 2
        remember: list[tuple[Any, Any, tuple[Any, ...]]] | None = [] if half else None
        # time.time() for the events without a time, read once per batch
        count_events(events, self.acc, self.special, remember, _PLAIN, _SPECIAL, NC, time.time())
        if remember:
            self._remember(remember, half)
        if time.monotonic() - self.last_flush >= FLUSH_EVERY:
            self.flush()

    def rows(self, batch: Rows) -> None:
        """The listener's handler of a :class:`~fastsend.events.Rows` batch:
        counted (and remembered) as its dicts would be, from its columns."""
        if isinstance(batch, DeliveredRows):
            half = self.settings.remember_messages // 2
            remember: list[tuple[Any, Any, tuple[Any, ...]]] | None = [] if half else None
            t = batch.time or time.time()
            count_delivered(t, batch.claims, batch.results, self.acc, remember, NC, _DELIVERED)
            if remember:
                self._remember(remember, half)
        elif isinstance(batch, AcceptedRows):
            t = batch.time or time.time()
            count_accepted(t, batch.campaign, batch.tenant, batch.rcpts, self.acc, NC, _ACCEPTED)
        else:
            self.listener(batch.dicts())
            return
        if time.monotonic() - self.last_flush >= FLUSH_EVERY:
            self.flush()

    def _remember(self, delivered: list[tuple[Any, Any, tuple[Any, ...]]], half: int) -> None:
        """Where each delivery went (``count_events``' (id, time, key) list), for
        its opens and clicks: the last ``half`` to ``2 * half`` deliveries."""
        sent = self.sent
        places = self._places
        for mid, t, key in delivered:
            # (time, where): ``where`` is one shared tuple per distinct
            # (campaign, tenant, mx, ip, domain), so the strings decoded
            # for each event are not kept alive per message: about 170
            # bytes a remembered delivery instead of 360. ``places`` is
            # keyed by the whole key, so finding it is one lookup.
            w = places.get(key)
            if w is None:
                if len(places) > MAX_KEYS:
                    places.clear()
                w = places[key] = key[1:]
            sent[mid] = (t, w)
            if len(sent) > half:
                self.sent_old = sent
                sent = self.sent = {}

    def gauge(self, tenant: str, name: str, value: float, t: float | None = None) -> None:
        """A sampled value (the last one in a bucket wins)."""
        t = int(time.time() if t is None else t)
        for g in GRAINS:
            self.gauges_pending[(g, t - t % g, tenant, name)] = float(value)

    # -- the flush -------------------------------------------------------------

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_EVERY:
            self.flush()
            self.maybe_prune()

    def flush(self, *, final: bool = False) -> None:
        self.last_flush = time.monotonic()
        try:
            self._flush(final)
        except Exception as e:
            self.failed += 1
            # A full disk, a read-only file system, an I/O error (SQLite's own
            # codes too), a Redis out of reach or refusing writes: an outage of the store, said
            # once when it starts and once when it ends, not a traceback a second.
            what = store_outage(e)
            if what is not None:
                if not self._outage:
                    log.warning("analytics: the rollup store %s; counts are kept and written"
                                " once it can be", what)  # fmt: skip
                self._outage = True
            else:
                log.exception("analytics: rollup flush failed (counts kept for the next one)")
        else:
            if self._outage:
                log.warning("analytics: the rollup store is written again (the counts kept"
                            " meanwhile included)")  # fmt: skip
            self._outage = False

    def maybe_prune(self) -> None:
        """Drop buckets past their retention, at most once an hour (the server's tick and
        close call this; never a request's flush)."""
        now = time.time()
        if self.prune_elsewhere:
            return
        if now - self.last_prune > 3600:
            self.last_prune = now
            try:
                self.store.prune(now, self.settings.retention)
            except Exception:
                log.exception("analytics: prune failed")

    # -- after a crash --------------------------------------------------------

    def catch_up(self, events: Any) -> int:
        """Count what event log ``events`` holds past the point the store's counts go
        to, and keep that point with every flush from now on. A process killed
        (kill -9, a power loss) loses the counts of its last second, which its event
        log has: they are counted here at the next start. Events counted."""
        mine = events.catch_up_mark("analytics") if events.path else None
        if mine is None:
            return 0
        self.mark_key = mark_key(events.path)
        states = self.store.states(MARK)
        kept = states.get(self.mark_key, "")
        legacy = legacy_mark_key(events.path)
        old = states.get(legacy, "") if legacy != self.mark_key else ""
        if not kept and old:
            # Kept by a version before the node's id (events.legacy_mark_key): a kill
            # -9 just before the upgrade left its last second under that key; before,
            # the first start after it found no mark and never counted it.
            kept = old
        n = 0
        half = self.settings.remember_messages // 2
        for batch in read_back(events.path, kept, mine):
            remember: list[Any] | None = [] if half else None
            count_events(batch, self.acc, self.special, remember, _PLAIN, _SPECIAL, NC,
                         time.time())  # fmt: skip
            if remember:
                self._remember(remember, half)
            n += len(batch)
        if n:
            log.warning("analytics: counted %d event(s) of %s that the rollups missed"
                        " (the last run stopped without its last flush)", n, events.path)  # fmt: skip
        self.log = events
        self.flush()  # the counts and the new mark together
        if old:  # read once: the new key holds the mark from now on
            self.store.add({}, {}, {}, {legacy: ""})
        return n

    def _flush(self, final: bool) -> None:
        now = time.time()
        # How far into the event log these counts go (taken with them: the listener
        # runs on this thread, so nothing is counted between the two).
        mark = self.log.mark() if self.log is not None else None
        acc, self.acc = self.acc, {}
        special, self.special = self.special, []
        mins: dict[tuple[int, tuple[str, int, str, str]], list[int]] = {}  # (minute, rk)
        reasons: dict[tuple[int, int, tuple[str, int, str, str], str, str], int] = {}
        firsts: list[
            tuple[tuple[str, int, str, str], int, int, int]
        ] = []  # (rk, minute, kind, msg)
        try:
            for key, row in acc.items():
                mk = (key[0], self._resolve(key))
                have = mins.get(mk)
                if have is None:
                    mins[mk] = list(row)  # acc's own row is restored if the write fails
                else:
                    for i, v in enumerate(row):
                        have[i] += v
            if self.delivery_of is not None and special:
                self._look_up(special)
            for key, k, e in special:
                if _takes_delivery(key, k):
                    key = self._attributed(key, e)
                if k == _CLICK:  # judged in _judge_clicks once its burst window passed
                    self._log_click(e)
                    self.clicks_waiting.append((key, e))
                    continue
                self._special(mins, reasons, firsts, key, k, e, now)
            self._judge_clicks(mins, firsts, now, final)
            if firsts:
                new = self.store.first_seen([(kind, mid) for _rk, _m, kind, mid in firsts],
                                            int(now))  # fmt: skip
                for (rk, minute, kind, _mid), fresh in zip(firsts, new, strict=True):
                    if fresh:
                        _bump(mins, minute, rk, _UNIQUE[kind])
            counts = _grains(mins)
            _node_rows(counts, reasons)
            gauges, self.gauges_pending = self.gauges_pending, {}
            # The mark only when it moved: an idle flush makes no call (a Redis outage
            # with nothing to write is not a failed flush).
            marks = {self.mark_key: mark} if mark and mark != self._mark_written else None
            self.store.add(counts, reasons, gauges, marks)
            if marks:
                self._mark_written = mark
        except BaseException:
            # Keep what was not written: the counts go back for the next flush.
            for key, row in acc.items():
                mine = self.acc.get(key)
                if mine is None:
                    self.acc[key] = row
                else:
                    for i, v in enumerate(row):
                        mine[i] += v
            self.special[:0] = [s for s in special if s[1] != _CLICK]
            raise

    def _resolve(self, key: tuple[Any, ...]) -> tuple[str, int, str, str]:
        """(minute, campaign, tenant, mx, ip, domain) -> (tenant, campaign, provider, ip)."""
        _m, campaign, tenant, mx, ip, domain = key
        domain = domain.lower()
        cid = campaign if isinstance(campaign, int) else 0
        if not isinstance(tenant, str):
            tenant = self._tenants.get(cid)
            if tenant is None:
                try:
                    tenant = self.tenant_of(cid) if cid else "default"
                except KeyError:
                    tenant = "default"
                if len(self._tenants) > MAX_KEYS:
                    self._tenants.clear()
                self._tenants[cid] = tenant
        pk = (mx, domain)
        prov = self._providers.get(pk)
        if prov is None:
            prov = self._providers.get((mx, "")) if mx else None
            if prov is None:
                prov = self.provider_of(mx, domain) or "other"
            if len(self._providers) > MAX_KEYS:
                self._providers.clear()
            self._providers[pk] = prov
        return (tenant, cid, prov, str(ip))

    def _look_up(self, special: list[tuple[tuple[Any, ...], int, dict[str, Any]]]) -> None:
        """Remember, from ``delivery_of``, the deliveries of the flush's engagement,
        complaint and later-bounce events that this process does not remember."""
        half = self.settings.remember_messages // 2
        if not half:
            return
        ids = {e["id"] for key, k, e in special if _takes_delivery(key, k)
               and isinstance(e.get("id"), int) and self._delivery(e["id"]) is None}  # fmt: skip
        if not ids:
            return
        assert self.delivery_of is not None
        try:
            found = self.delivery_of(sorted(ids)[:MAX_LOOKUP])
        except Exception as e:  # attributed by recipient domain meanwhile
            if not self._lookup_failed:
                log.warning("analytics: deliveries cannot be looked up (%s: %s); opens, clicks"
                            " and complaints of mail sent before this start are counted"
                            " without their source IP meanwhile", type(e).__name__, e)  # fmt: skip
            self._lookup_failed = True
            return
        self._lookup_failed = False
        got: list[tuple[Any, Any, tuple[Any, ...]]] = []
        for mid, (t, d) in found.items():
            rcpt = d.get("rcpt")
            dom = rcpt[rcpt.rfind("@") + 1 :] if isinstance(rcpt, str) else ""
            got.append((mid, t, (0, d.get("campaign"), d.get("tenant"), d.get("mx") or "",
                                 d.get("source_ip") or "", dom)))  # fmt: skip
        if got:
            self._remember(got, half)

    def _delivery(self, mid: Any) -> tuple[Any, ...] | None:
        """(delivered at, campaign, tenant, mx, source_ip, domain) of a remembered delivery."""
        d = self.sent.get(mid) or self.sent_old.get(mid)
        return None if d is None else (d[0], *d[1])

    def _attributed(self, key: tuple[Any, ...], e: dict[str, Any]) -> tuple[Any, ...]:
        """An engagement or complaint event takes its delivery's MX and source IP."""
        d = self._delivery(e.get("id"))
        if d is None:
            return key
        _t, campaign, tenant, mx, ip, domain = d
        return (key[0], key[1] if key[1] is not None else campaign,
                key[2] if key[2] is not None else tenant, mx, ip, domain or key[5])  # fmt: skip

    def _classify(self, e: dict[str, Any]) -> tuple[str, bool]:
        reason = e.get("reason")
        if isinstance(reason, str) and reason and e.get("event") != "deferred":
            return reason[:MAX_REASON], bool(e.get("hard"))
        code = e.get("code")
        code = code if isinstance(code, int) and (code == 0 or 200 <= code <= 599) else 0
        enhanced = str(e.get("enhanced") or "")
        text = str(e.get("text") or "")[:500]
        ck = (code, enhanced, text)
        hit = self._classified.get(ck)
        if hit is None:
            from fastsend.bounce import classify_reply

            try:
                c = classify_reply(code, enhanced, text, command="")
                hit = (c.reason or "undefined", bool(c.hard))
            except ValueError:
                hit = ("undefined", False)
            if len(self._classified) > MAX_KEYS:
                self._classified.clear()
            self._classified[ck] = hit
        return hit

    def _special(self, mins: Any, reasons: Any, firsts: Any, key: tuple[Any, ...], k: int,
                 e: dict[str, Any], now: float, machine: str | None = None) -> None:  # fmt: skip
        rk = self._resolve(key)
        minute = key[0]
        if k in (_BOUNCED, _DEFERRED, _EXPIRED):
            if k == _EXPIRED:
                reason, hard = "expired", False
            else:
                reason, hard = self._classify(e)
            if k == _BOUNCED:
                _bump(mins, minute, rk, _HARD if hard else _SOFT)
            kind = "deferred" if k == _DEFERRED else "bounced"
            t = minute * 60
            for g in GRAINS:
                rkey = (g, t - t % g, rk, kind, reason)
                reasons[rkey] = reasons.get(rkey, 0) + 1
        elif k in (_OPEN, _CLICK):
            if machine is None:
                machine = self._machine(k, e)
            mid = e.get("id")
            if isinstance(mid, int):
                firsts.append((rk, minute, _FIRST[(k, bool(machine))], mid))
                if k == _CLICK and not machine:
                    # A person who clicked opened the message, pixel or not (images
                    # off; Apple Mail shows the image its proxy fetched, a machine
                    # open): the message's unique human open, if none was counted.
                    firsts.append((rk, minute, _FIRST[(_OPEN, False)], mid))
            if machine:
                k = _MACHINE[k]
        _bump(mins, minute, rk, k)

    def _since_delivery(self, e: dict[str, Any]) -> float | None:
        d = self._delivery(e.get("id"))
        t = e.get("time")
        if d is None or not isinstance(t, int | float):
            return None
        return float(t) - float(d[0])

    def _machine(self, k: int, e: dict[str, Any], burst: int = 0) -> str:
        ua = e.get("user_agent")
        return self.rules.classify(
            "open" if k == _OPEN else "click",
            ua if isinstance(ua, str) else "",
            str(e.get("http_method") or "GET"),
            self._since_delivery(e),
            burst,
        )

    # -- clicks: judged once their burst window has passed ---------------------

    def _log_click(self, e: dict[str, Any]) -> None:
        mid = e.get("id")
        t = e.get("time")
        if isinstance(mid, int) and isinstance(t, int | float):
            self.click_log.setdefault(mid, []).append((float(t), str(e.get("url") or "")))

    def _burst(self, e: dict[str, Any], window: float) -> int:
        mid = e.get("id")
        t = e.get("time")
        if not isinstance(mid, int) or not isinstance(t, int | float):
            return 0
        return len({u for (ct, u) in self.click_log.get(mid, ()) if abs(ct - t) <= window})

    def _judge_clicks(self, mins: Any, firsts: Any, now: float, final: bool) -> None:
        if not self.clicks_waiting:
            return
        window = self.rules.burst_window
        keep = []
        for key, e in self.clicks_waiting:
            t = e.get("time")
            t = float(t) if isinstance(t, int | float) else now
            if not final and now < t + window:
                keep.append((key, e))
                continue
            burst = self._burst(e, window) if window else 0
            machine = self._machine(_CLICK, e, burst)
            self._special(mins, {}, firsts, key, _CLICK, e, now, machine)
        self.clicks_waiting = keep
        # Forget click logs older than twice the window.
        horizon = now - 2 * window - 1
        for mid in [m for m, cl in self.click_log.items() if cl[-1][0] < horizon]:
            del self.click_log[mid]

    def close(self) -> None:
        self.flush(final=True)
        self.maybe_prune()
        self.store.close()


def _takes_delivery(key: tuple[Any, ...], k: int) -> bool:
    """An event that takes its delivery's MX and source IP: opens, clicks, complaints,
    unsubscribes, and a bounce reported after the delivery (a DSN, a provider's event:
    no MX or source IP of its own)."""
    return k in _ENGAGED or (k == _BOUNCED and not key[3] and not key[4])


def _bump(mins: dict[Any, list[int]], minute: int, rk: Any, i: int) -> None:
    row = mins.get((minute, rk))
    if row is None:
        row = mins[(minute, rk)] = [0] * NC
    row[i] += 1


def _grains(mins: dict[Any, list[int]]) -> dict[Any, list[int]]:
    """Minute rows -> rows of every granularity (minute, hour, day)."""
    counts: dict[Any, list[int]] = {}
    for (minute, rk), row in mins.items():
        t = minute * 60
        counts[(60, t, rk)] = row
        for g in (3600, 86400):
            ck = (g, t - t % g, rk)
            have = counts.get(ck)
            if have is None:
                counts[ck] = list(row)
            else:
                for i, v in enumerate(row):
                    if v:
                        have[i] += v
    return counts


def _node_rows(counts: dict[Any, list[int]], reasons: dict[Any, int]) -> None:
    """Add the all-campaigns rows (campaign ALL) of each tenant and of the node (tenant
    "*") per provider and source IP: questions without a campaign read only these;
    the warm-up progress and admin views read the node's."""
    extra: dict[Any, list[int]] = {}
    for (g, t, (tenant, _cid, prov, ip)), row in counts.items():
        for who in (tenant, NODE):
            nk = (g, t, (who, ALL, prov, ip))
            have = extra.get(nk)
            if have is None:
                extra[nk] = list(row)
            else:
                for i, v in enumerate(row):
                    if v:
                        have[i] += v
    counts.update(extra)
    nr: dict[Any, int] = {}
    for (g, t, (tenant, _cid, prov, ip), kind, reason), n in reasons.items():
        for who in (tenant, NODE):
            rk = (g, t, (who, ALL, prov, ip), kind, reason)
            nr[rk] = nr.get(rk, 0) + n
    reasons.update(nr)


def policy_provider(config: Config | None) -> Callable[[str, str], str]:
    """provider_of(mx, domain) from the shaping policy (MX suffix, else domain)."""
    from fastsend.shaping.policy import load_policy

    policy = load_policy(config)

    def provider_of(mx: str, domain: str) -> str:
        host = mx.rpartition(":")[0] if mx.count(":") == 1 else mx
        return policy.provider_for([host] if host else [], domain)

    return provider_of
