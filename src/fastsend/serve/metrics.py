"""GET /metrics: Prometheus text format (0.0.4), aggregated in the supervisor's process.

Sources, none costing more than a counter increment per message:

- outcomes: a :attr:`Supervisor.result_hooks` hook counts each attempt's
  outcome by state, destination domain, source IP and reply code (domains
  beyond ``MAX_DOMAINS`` distinct ones are counted as ``other``, so label
  cardinality stays bounded);
- workers: ``sup.worker_counters(i)`` (connections opened/failed, ... and
  DKIM signing time when the worker reports it), shipped by each worker over
  its result ring about once a second, summed over the slot's workers (a
  restart's earlier ones, a reload's retiring one), plus restarts and liveness;
- the spool: messages per state and the queue's age buckets (cached for
  ``SPOOL_TTL`` seconds: they are queries, not counters; made in a thread through
  :meth:`Spool.reader`, never on the event loop: they read every pending row,
  ~0.45 s for 500,000 on SQLite, ~1.2 s for 200,000 on Redis, and the loop
  carries the supervisor's dispatch and every request), and the latency of
  each spool write: :class:`TimedSpool` wraps the spool (a
  :class:`~fastsend.spool.SpoolProxy`) and times ``record_results`` and
  ``add_messages`` into a histogram;
- the API: recipients accepted.

Written by hand rather than with prometheus-client: every value already
lives in plain dicts here and is rendered on scrape, so a registry of
collector objects would add a global and a per-label lookup per outcome
without saving code (the format is ~20 lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from aiohttp import web

from fastsend.serve.webhooks import safe_url
from fastsend.spool import (
    AGE_BUCKETS_MIN,
    QUEUED,
    STATE_NAMES,
    IdemMark,
    IngestMark,
    Result,
    Spool,
    SpoolProxy,
)

log = logging.getLogger("fastsend.serve.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text format
MAX_DOMAINS = 200
SPOOL_TTL = 5.0
HOOK_WAIT = 3.0  # s a scrape waits for the webhooks' backlogs (Metrics.refresh_webhooks)
# What workers report (wire.Stats) that is a figure of the moment, not a count.
WORKER_GAUGES = frozenset(
    {"connections_open", "ready_queue", "site_queues", "lanes", "dns_cache_entries"}
)
# HELP of what workers report (any other name gets a plain one).
WORKER_HELP = {
    "connections_open": "SMTP connections open now.",
    "ready_queue": "Messages ready to send, waiting for a connection.",
    "site_queues": "Destination sites with a ready queue.",
    "lanes": "Shaping lanes (source IP, site) in use.",
    "dns_cache_entries": "MX/A answers cached.",
    "connections_opened": "SMTP connections opened.",
    "connections_failed": "SMTP connections that could not be opened (refused, timed out, greeting"
                          " refused).",
    "connections_over_site_cap": "Connections not opened: the site's connection cap was reached.",
    "connections_held_elsewhere": "Connections refused for the connections open from their"
                                  " address, none of the worker's own: the mail went back.",
    "failovers": "Messages passed to a route's next transport.",
    "handed_back": "Messages handed back unattempted (site shaped, resting or draining).",
    "answered_early": "Deliveries told before their pipelined group ended (kept in case the"
                      " worker dies: not sent again).",
    "messages_built": "Messages built as their batches were read (rendered; signed when"
                      " signing is done then).",
    "build_cpu_seconds": "CPU seconds those messages took to build (claims are sized by it).",
    "recipients_over_limit": "Recipients moved to another transaction (the server's limit).",
    "requeued_after_session_end": "Messages queued again when their connection ended first.",
    "tls_policy_sessions": "Sessions under an MTA-STS or DANE policy.",
    "tls_policy_failures": "Sessions or policy fetches that failed an MTA-STS or DANE policy.",
    "tls_dane_sessions": "Sessions authenticated by DANE.",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in d.items()) + "}"


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        i = 0
        while i < len(LATENCY_BUCKETS) and v > LATENCY_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out = []
        acc = 0
        for le, c in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            acc += c
            le_text = "+Inf" if le == float("inf") else f"{le:g}"
            out.append(f"{name}_bucket{_labels({**labels, 'le': le_text})} {acc}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum:.6f}")
        out.append(f"{name}_count{_labels(labels)} {self.n}")
        return out


class TimedSpool(SpoolProxy):
    """The spool with its write transactions timed (one histogram per method)."""

    def __init__(self, inner: Spool, histograms: dict[str, Histogram]) -> None:
        super().__init__(inner)
        self._add = histograms.setdefault("add_messages", Histogram())
        self._record = histograms.setdefault("record_results", Histogram())

    def add_messages(
        self,
        campaign_id: int,
        rows: Iterable[tuple[str, str, bytes]],
        now: float,
        *,
        state: int = QUEUED,
        suppressed: Collection[int] = (),
        ingest: IngestMark | None = None,
        idem: IdemMark | None = None,
        fps: Sequence[int] | None = None,
    ) -> list[int]:
        t = time.perf_counter()
        try:
            return self.inner.add_messages(
                campaign_id, rows, now, state=state, suppressed=suppressed, ingest=ingest,
                idem=idem, fps=fps,
            )  # fmt: skip
        finally:
            self._add.observe(time.perf_counter() - t)

    def record_results(self, results: Iterable[Result], now: float) -> None:
        t = time.perf_counter()
        try:
            self.inner.record_results(results, now)
        finally:
            self._record.observe(time.perf_counter() - t)

    def record_outcomes(
        self, results: Iterable[Result], now: float, events: Sequence[bytes] = (),
        event_ids: Sequence[int] = (),
    ) -> int | None:  # fmt: skip
        t = time.perf_counter()
        try:
            return self.inner.record_outcomes(results, now, events, event_ids)
        finally:
            self._record.observe(time.perf_counter() - t)


def spool_figures(spool: Any) -> list[str]:
    """Messages per state, pending ones by age, the queue's depth (Prometheus lines)."""
    lines = ["# HELP fastsend_messages Messages in the spool by state.",
             "# TYPE fastsend_messages gauge"]  # fmt: skip
    for state, n in spool.counts().items():
        lines.append(f"fastsend_messages{_labels({'state': state})} {n}")
    totals = [0] * (len(AGE_BUCKETS_MIN) + 1)
    for _dom, buckets in spool.queue_shape(time.time()):
        for i, c in enumerate(buckets):
            totals[i] += c
    lines += ["# HELP fastsend_queue_age Pending messages by age, each in the first bucket whose"
              " bound (minutes) its age is under, as qshape: not cumulative.",
              "# TYPE fastsend_queue_age gauge"]  # fmt: skip
    for le, c in zip((*AGE_BUCKETS_MIN, "+Inf"), totals, strict=True):
        lines.append(f"fastsend_queue_age{_labels({'le_minutes': str(le)})} {c}")
    return [
        *lines,
        "# HELP fastsend_queue_depth Pending messages.",
        "# TYPE fastsend_queue_depth gauge",
        f"fastsend_queue_depth {sum(totals)}",
    ]


def _read_figures(spool: Spool) -> list[str]:
    """:func:`spool_figures` of ``spool`` read through its :meth:`Spool.reader`: run
    in a thread (a SQLite spool's read-only connection of its own, WAL: it never
    holds the writer up; a Redis spool's client, a connection per command)."""
    with spool.reader() as view:
        return spool_figures(view)


class Metrics:
    """Wraps ``ctx.spool`` in a :class:`TimedSpool`: build it before anything
    (the supervisor) takes the spool from the context."""

    def __init__(self, ctx: Any, sup: Any = None) -> None:
        self.ctx = ctx
        self.sup = sup
        self.started = time.time()
        self.outcomes: dict[tuple[str, str], int] = {}  # (state, domain)
        self.by_ip: dict[tuple[str, str], int] = {}  # (state, source_ip)
        self.codes: dict[int, int] = {}
        self.accepted_total = 0
        self.spool_write: dict[str, Histogram] = {}
        self._spool_cache: tuple[float, list[str]] = (0.0, [])
        self.spool_up = True  # the last read of the spool's figures worked
        self.redelivered: int | None = None  # fastsend_redelivered_total (a shared spool)
        self._stats_read: asyncio.Task[dict[str, int]] | None = None
        self._spool_refresh: asyncio.Task[None] | None = None
        self._hook_cache: tuple[float, list[str]] = (0.0, [])
        self._hook_refresh: asyncio.Task[None] | None = None
        self.webhooks: Any = None  # serve's WebhookDispatcher, once started
        ctx.spool = TimedSpool(ctx.spool, self.spool_write)

    # -- hooks (hot path: a few dict increments) -------------------------------

    def on_result(self, claimed: Any, res: Any, state: int) -> None:
        name = STATE_NAMES.get(state, "other")
        dom = claimed.domain
        key = (name, dom)
        n = self.outcomes.get(key)
        if n is None:
            if len(self.outcomes) >= MAX_DOMAINS * 4:
                key = (name, "other")
                n = self.outcomes.get(key, 0)
            else:
                n = 0
        self.outcomes[key] = n + 1
        ipkey = (name, res.source_ip or "")
        self.by_ip[ipkey] = self.by_ip.get(ipkey, 0) + 1
        self.codes[res.code] = self.codes.get(res.code, 0) + 1

    def accepted(self, n: int) -> None:
        self.accepted_total += n

    # -- rendering -------------------------------------------------------------

    def spool_lines(self) -> list[str]:
        """The spool's figures, as :meth:`refresh_spool` made them last (the handler
        refreshes them first)."""
        return self._spool_cache[1]

    async def refresh_spool(self) -> None:
        """Make the spool's figures again when older than SPOOL_TTL, in a thread
        (:func:`_read_figures`; on the loop, a Redis spool's held serve ~1.2 s a
        scrape at 200,000 pending). Scrapes at once share one."""
        if time.monotonic() - self._spool_cache[0] < SPOOL_TTL and self._spool_cache[1]:
            return
        if self._spool_refresh is None or self._spool_refresh.done():
            self._spool_refresh = asyncio.create_task(self._refresh_spool())
        await asyncio.shield(self._spool_refresh)

    async def _refresh_spool(self) -> None:
        """A spool that cannot be read (Redis out of reach, a disk error) leaves the
        figures read last, and ``fastsend_spool_up`` 0: the scrape still answers
        (it failed: Prometheus saw the node down, not its spool)."""
        try:
            lines = await asyncio.to_thread(_read_figures, self.ctx.spool)
        except Exception as e:
            if self.spool_up:
                log.warning("metrics: the spool's figures cannot be read (%s: %s): the last"
                            " ones are shown", e.__class__.__name__, e)  # fmt: skip
            self.spool_up = False
            self._spool_cache = (time.monotonic(), self._spool_cache[1])
            return
        self.spool_up = True
        self._spool_cache = (time.monotonic(), lines)
    def worker_lines(self, sup: Any) -> list[str]:
        """The counters workers report (wire.Stats): counters as ``..._total``, the
        figures of the moment (``WORKER_GAUGES``) as gauges; one family each.
        Per slot, over every worker it ran (``worker_counters``: a restart's
        earlier ones, a reload's retiring one), so a series never goes backwards
        while serve runs (what a killed worker counted after its last report is
        lost, never counted twice)."""
        totals = [(s.index, sup.worker_counters(s.index, WORKER_GAUGES)) for s in sup.slots]
        out: list[str] = []
        for name in sorted({n for _i, c in totals for n in c}):
            safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in name)
            gauge = name in WORKER_GAUGES
            metric = f"fastsend_worker_{safe}" if gauge else f"fastsend_worker_{safe}_total"
            what = WORKER_HELP.get(name) or f"What the workers report as {safe}."
            out.append(f"# HELP {metric} {what}")
            out.append(f"# TYPE {metric} {'gauge' if gauge else 'counter'}")
            for index, c in totals:
                if name in c:
                    out.append(f"{metric}{_labels({'worker': str(index)})} {c[name]:g}")
        return out

    def webhook_lines(self) -> list[str]:
        """What the webhook dispatcher posted, and each URL's backlog (a COUNT: cached
        like the spool's figures). Its warnings are rate-limited in the log; these
        are what an alert watches (a receiver down for an hour: pending grows)."""
        hooks = self.webhooks
        if hooks is None or not getattr(hooks, "enabled", False):
            return []
        st = hooks.stats
        out = ["# HELP fastsend_webhook_batches_total Batches POSTed, by the receiver's answer.",
               "# TYPE fastsend_webhook_batches_total counter",
               f'fastsend_webhook_batches_total{{result="accepted"}} {st.get("posted", 0)}',
               f'fastsend_webhook_batches_total{{result="refused"}} {st.get("failed", 0)}',
               "# HELP fastsend_webhook_events_total Events written to the webhook outbox.",
               "# TYPE fastsend_webhook_events_total counter",
               f"fastsend_webhook_events_total {st.get('events', 0)}",
               "# HELP fastsend_webhook_events_expired_total Events dropped from the outbox"
               " unsent, past [webhooks] retention_days.",
               "# TYPE fastsend_webhook_events_expired_total counter",
               "fastsend_webhook_events_expired_total"
               f" {getattr(self.ctx, 'webhook_expired', 0)}",
               "# HELP fastsend_webhook_events_too_large_total Events passed unsent: a"
               " receiver refused each alone as too large (413).",
               "# TYPE fastsend_webhook_events_too_large_total counter",
               f"fastsend_webhook_events_too_large_total {st.get('too_large', 0)}"]  # fmt: skip
        return out + self._hook_cache[1]

    async def refresh_webhooks(self) -> None:
        """Each URL's backlog (``WebhookDispatcher.pending``: what that URL will be
        sent, a tenant's URL its tenant's events only), made again when older than
        SPOOL_TTL; scrapes at once share one. A scrape waits ``HOOK_WAIT`` s for it at
        most (a filtered URL's first count reads every row past its cursor: ~5 us a
        row): then it shows the figures made last (none yet: no sample) and the count
        goes on, for the next scrape."""
        hooks = self.webhooks
        if hooks is None or not getattr(hooks, "enabled", False):
            return
        if time.monotonic() - self._hook_cache[0] < SPOOL_TTL and self._hook_cache[1]:
            return
        if self._hook_refresh is None or self._hook_refresh.done():
            self._hook_refresh = asyncio.create_task(self._refresh_webhooks(hooks))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._hook_refresh), HOOK_WAIT)

    async def _refresh_webhooks(self, hooks: Any) -> None:
        counts = await hooks.pending()
        lines = ["# HELP fastsend_webhook_pending Events not yet accepted by the receiver"
                 " that it will be sent (the URL as scheme://host:port and a digest: paths"
                 " hold secrets).",
                 "# TYPE fastsend_webhook_pending gauge"]  # fmt: skip
        for url, n in counts.items():
            lines.append(f"fastsend_webhook_pending{_labels({'url': safe_url(url)})} {n}")
        self._hook_cache = (time.monotonic(), lines)

    def blocklist_lines(self) -> list[str]:
        """Each source IP on each configured blocklist as its last check found it: what
        an alert on a listing watches (the ``ip_listed`` event reaches only webhooks)."""
        rep = getattr(self.ctx, "reputation", None)
        if rep is None or not rep.results:
            return []
        out = ["# HELP fastsend_blocklist_listed 1 while the source IP is listed on the DNS"
               " blocklist (its last check; a failed lookup keeps the one before).",
               "# TYPE fastsend_blocklist_listed gauge"]  # fmt: skip
        for (ip, zone), res in sorted(rep.results.items()):
            labels = _labels({"source_ip": ip, "zone": zone})
            out.append(f"fastsend_blocklist_listed{labels} {int(res.listed)}")
        return out

    def render(self) -> str:
        out: list[str] = [
            "# HELP fastsend_up 1 while the server runs.",
            "# TYPE fastsend_up gauge",
            "fastsend_up 1",
            "# HELP fastsend_start_time_seconds When the server started (Unix time): counters"
            " start again from 0 then.",
            "# TYPE fastsend_start_time_seconds gauge",
            f"fastsend_start_time_seconds {self.started:.3f}",
            "# HELP fastsend_api_accepted_total Recipients accepted through the HTTP API"
            " (POST /v1/messages, campaigns and their uploads; not SMTP submission).",
            "# TYPE fastsend_api_accepted_total counter",
            f"fastsend_api_accepted_total {self.accepted_total}",
            "# HELP fastsend_outcomes_total Delivery attempt outcomes by new state and domain.",
            "# TYPE fastsend_outcomes_total counter",
        ]
        for (state, dom), n in sorted(self.outcomes.items()):
            out.append(f"fastsend_outcomes_total{_labels({'state': state, 'domain': dom})} {n}")
        out += ["# HELP fastsend_outcomes_by_ip_total Outcomes by new state and source IP.",
                "# TYPE fastsend_outcomes_by_ip_total counter"]  # fmt: skip
        for (state, ip), n in sorted(self.by_ip.items()):
            out.append(
                f"fastsend_outcomes_by_ip_total{_labels({'state': state, 'source_ip': ip})} {n}"
            )
        out += ["# HELP fastsend_reply_codes_total SMTP reply codes of final replies (0: none).",
                "# TYPE fastsend_reply_codes_total counter"]  # fmt: skip
        for code, n in sorted(self.codes.items()):
            out.append(f"fastsend_reply_codes_total{_labels({'code': str(code)})} {n}")
        out += ["# HELP fastsend_spool_write_seconds Latency of spool write transactions.",
                "# TYPE fastsend_spool_write_seconds histogram"]  # fmt: skip
        for op, h in sorted(self.spool_write.items()):
            out += h.lines("fastsend_spool_write_seconds", {"op": op})
        sup = self.sup
        if sup is not None:
            out += ["# HELP fastsend_worker_up 1 if the worker process is alive.",
                    "# TYPE fastsend_worker_up gauge"]  # fmt: skip
            for s in sup.slots:
                out.append(f"fastsend_worker_up{_labels({'worker': str(s.index)})} {int(s.alive)}")
            out += ["# HELP fastsend_worker_restarts_total Times the worker was started again.",
                    "# TYPE fastsend_worker_restarts_total counter"]  # fmt: skip
            for s in sup.slots:
                w = _labels({"worker": str(s.index)})
                out.append(f"fastsend_worker_restarts_total{w} {s.restarts}")
            out += ["# HELP fastsend_worker_inflight Messages the worker holds (and, in a"
                    " reload, the worker it replaces).",
                    "# TYPE fastsend_worker_inflight gauge"]  # fmt: skip
            for s in sup.slots:
                w = _labels({"worker": str(s.index)})
                n = len(s.inflight) + sum(len(o.inflight) for o in sup.retired if o.index == s.index)
                out.append(f"fastsend_worker_inflight{w} {n}")
            out += self.worker_lines(sup)
            st = sup.stats.as_dict()
            out += ["# HELP fastsend_supervisor_events_total What this run's supervisor counted,"
                    " by kind: outcomes (delivered, deferred attempts, bounced, ...), attempts,"
                    " worker restarts, messages possibly sent twice (a dead worker's window),"
                    " handed back.",
                    "# TYPE fastsend_supervisor_events_total counter"]  # fmt: skip
            for k, v in sorted(st.items()):
                out.append(f"fastsend_supervisor_events_total{_labels({'kind': k})} {v}")
            out += ["# HELP fastsend_tls_policy_failures_total TLS-RPT (RFC 8460): sessions and"
                    " policy fetches that failed a recipient domain's MTA-STS (sts) or DANE"
                    " (tlsa) policy, by policy domain and result type.",
                    "# TYPE fastsend_tls_policy_failures_total counter"]  # fmt: skip
            for key, n in sorted(sup.stats.tls_failures.items()):
                ptype, dom, result = key.split("\t")
                lab = _labels({"policy_type": ptype, "policy_domain": dom, "result": result})
                out.append(f"fastsend_tls_policy_failures_total{lab} {n}")
        out += ["# HELP fastsend_spool_up 1 if the spool's figures were read at the last try"
                " (0: the spool is out of reach, the figures shown are older).",
                "# TYPE fastsend_spool_up gauge",
                f"fastsend_spool_up {int(self.spool_up)}"]  # fmt: skip
        out += self.spool_lines()
        out += [
            "# HELP fastsend_tracking_events_unrecorded_total Opens and clicks answered but"
            " not recorded: their link already recorded [tracking] link_events_per_hour.",
            "# TYPE fastsend_tracking_events_unrecorded_total counter",
            f"fastsend_tracking_events_unrecorded_total {getattr(self.ctx, 'tracking_unrecorded', 0)}",
            "# HELP fastsend_tracking_events_dropped_total Opens and clicks answered but"
            " dropped: the event log could not be written and [tracking] held_events or"
            " held_bytes of them already waited in memory.",
            "# TYPE fastsend_tracking_events_dropped_total counter",
            "fastsend_tracking_events_dropped_total"
            f" {getattr(getattr(self.ctx, 'events', None), 'dropped', 0)}",
        ]
        out += self.webhook_lines()
        out += self.blocklist_lines()
        if self.redelivered is not None:
            out += [
                "# HELP fastsend_redelivered_total In-flight messages of a node that died (or"
                " restarted) put back in the shared queue: each may be sent twice.",
                "# TYPE fastsend_redelivered_total counter",
                f"fastsend_redelivered_total {self.redelivered}",
            ]
        return "\n".join(out) + "\n"

    async def refresh_redelivered(self) -> None:
        """On a shared spool, the messages put back from dead nodes' windows (one
        small read, in a thread: the loop never waits for Redis); the count read
        last while Redis is out of reach."""
        shared = getattr(self.ctx, "shared", None)
        if shared is None:
            return
        if self._stats_read is None or self._stats_read.done():  # scrapes at once share one
            self._stats_read = asyncio.create_task(asyncio.to_thread(shared.spool_stats))
        try:
            stats = await asyncio.shield(self._stats_read)
        except Exception:  # (said by refresh_spool; fastsend_spool_up 0)
            self.spool_up = False
            return
        self.redelivered = int(stats.get("taken_over", 0))

    async def handler(self, request: web.Request) -> web.Response:
        await self.refresh_spool()
        await self.refresh_redelivered()
        await self.refresh_webhooks()
        # The version parameter names the format (Prometheus 3 refuses a scrape whose
        # Content-Type does not name a format it knows).
        return web.Response(
            body=self.render().encode(),
            headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"},
        )
