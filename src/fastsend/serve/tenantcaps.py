"""What one tenant may submit, counted across every node on a shared spool.

``TenantCaps`` answers, before anything is spooled, whether a tenant may submit
``n`` more messages (one per recipient: what the spool holds):

- a daily quota: ``[api] tenant_daily_messages`` (``[tenants.NAME]
  daily_messages`` for one tenant) messages per UTC day, counted in the spool's
  counters (``Spool.add_counters``: a SQLite row that survives restarts; on
  Redis one HINCRBY every node shares), ``tq:TENANT:DAY``; beyond it the
  request is refused whole (429 / 451 4.7.1) with the seconds to UTC midnight;
  every way in counts (``POST /v1/messages``, SMTP submission, a campaign's lists);
- a submission rate: ``tenant_message_rate`` messages per second with a burst
  of ``tenant_message_burst`` (``message_rate`` / ``message_burst`` for one
  tenant), for ``POST /v1/messages`` and SMTP submission: a GCRA bucket per tenant, on a shared spool the spool's Lua GCRA
  (``shared_limits``, Redis's clock: one bucket for every node), else this
  process's. A request of more messages than the burst can never pass: it is
  refused as such, not told to wait.

A refusal takes nothing: what the quota counted is given back. What is counted
and then not spooled (the spool failed) is given back too (:meth:`refund`). An
uploaded list spooled in the background carries what it counted in its ingest
job (:meth:`job_tags`): whoever ends the job (this process, another after a
failure, another node that took it over) makes the count what the job spooled
(:meth:`settle_job`); a request whose addresses a list still spooling names counts
them once, as that list's, and :meth:`settle` charges those it spools first.
With Redis out of reach the node counts on its own for a while (a warning),
as the tracking links' counts do: mail is not refused for an outage of the
counters.

``SharedKeyRate`` is the same idea for ``[api] rate_limit``: one bucket per API
key across the nodes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastsend.throttle import Gcra

log = logging.getLogger("fastsend.serve")

DAY = 86400
PREFIX = "tq:"  # the spool counters of the daily quotas: tq:TENANT:YYYYMMDD
# an ingest job's source fields: the quota counter its list was counted against, and
# how many (TenantCaps.job_tags / settle_job)
QUOTA_KEY, QUOTA_N = "quota", "quota_n"
ALONE_FOR = 10.0  # s a node counts on its own after a shared count failed


def job_quota(job: Any) -> tuple[str, int] | None:
    """The quota counter an ingest job's list was counted against and how many
    (:meth:`TenantCaps.job_tags`), or None (a ``fastsend send`` list, no quota)."""
    key, n = job.source.get(QUOTA_KEY), job.source.get(QUOTA_N)
    if not isinstance(key, str) or not key.startswith(PREFIX):
        return None
    try:
        return key, int(n)
    except (TypeError, ValueError):
        return None


def settle_ended_job(spool: Any, job: Any) -> int:
    """An uploaded list's job ended outside serve (``fastsend resume`` spooled its
    rest, or ``--abandon-rest`` closed it): its quota count made what it spooled
    (``job.accepted``), as :meth:`TenantCaps.settle_job` does in serve; returns
    the change (negative: given back). Before, the rows a job never spooled
    stayed counted for the day."""
    q = job_quota(job)
    if q is None:
        return 0
    delta = int(job.accepted) - q[1]
    if delta:
        spool.add_counters({q[0]: delta})
    return delta


class TenantCapExceeded(Exception):
    """A tenant is over a cap; ``wait``: seconds until it may try again (Retry-After),
    0 when waiting does not help (a request over the burst)."""

    def __init__(self, message: str, wait: int, kind: str) -> None:
        super().__init__(message)
        self.wait = wait
        self.kind = kind  # "daily" | "rate" | "burst"


def utc_day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def until_midnight(now: float) -> int:
    return int(DAY - now % DAY) + 1


class Taken:
    """What :meth:`TenantCaps.take` counted against a daily quota (for a refund)."""

    __slots__ = ("key", "n")

    def __init__(self, key: str, n: int) -> None:
        self.key, self.n = key, n


class TenantCaps:
    """The caps of ``ctx.config`` (read at each call: a SIGHUP changes them)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.rates: dict[str, Gcra] = {}  # tenant -> this process's bucket
        self.rate_spec: dict[str, tuple[float, int]] = {}
        # tq:TENANT:DAY -> the count as this process last wrote it (a local spool has
        # no other writer: RCPT's look reads no table)
        self.used: dict[str, int] = {}
        self._alone_since = 0.0  # monotonic: the last shared count that failed

    def caps(self, tenant: str) -> tuple[int, float, int]:
        """(daily messages, messages/s, burst) for ``tenant``; 0: no cap."""
        cfg = self.ctx.config
        api = cfg.api
        daily, rate, burst = api.tenant_daily_messages, api.tenant_message_rate, (
            api.tenant_message_burst
        )
        t = cfg.tenants.get(tenant) if cfg.tenants else None
        if t is not None:
            daily = daily if t.daily_messages is None else t.daily_messages
            rate = rate if t.message_rate is None else t.message_rate
            burst = burst if t.message_burst is None else t.message_burst
        if rate and not burst:
            burst = max(1, int(rate))
        return int(daily), float(rate), int(burst)

    def _shared_ok(self) -> bool:
        return time.monotonic() - self._alone_since > ALONE_FOR

    def _alone(self, e: Exception) -> None:
        self._alone_since = time.monotonic()
        log.warning("tenant caps: the nodes' shared counts are out of reach (%s);"
                    " counting on this node alone for %g s", e, ALONE_FOR)  # fmt: skip

    def exhausted(self, tenant: str, now: float | None = None) -> TenantCapExceeded | None:
        """Whether the tenant's daily quota is used up already (a cheap look, for
        SMTP's RCPT: the body is not sent for nothing); None: it is not."""
        daily, _rate, _burst = self.caps(tenant)
        if not daily:
            return None
        now = time.time() if now is None else now
        key = f"{PREFIX}{tenant}:{utc_day(now)}"
        try:
            used = self._used(key)
        except Exception:
            return None  # (take() says it, if it must)
        if used < daily:
            return None
        return self._over_daily(daily, used, now)

    def _used(self, key: str) -> int:
        """A daily count: on a shared spool the nodes' (one HINCRBY of 0: an exact
        read), else this process's last write (once read from the spool)."""
        spool = self.ctx.spool
        if spool.shared() is not None:
            return int(spool.add_counters({key: 0})[key])
        got = self.used.get(key)
        if got is None:
            got = self.used[key] = int(spool.counters(key).get(key, 0))
        return got

    @staticmethod
    def _over_daily(daily: int, used: int, now: float) -> TenantCapExceeded:
        wait = until_midnight(now)
        return TenantCapExceeded(
            f"daily message quota reached: {used} of {daily} messages accepted today (UTC);"
            f" try again in {wait} s", wait, "daily",
        )  # fmt: skip

    def take(
        self, tenant: str, n: int, now: float | None = None, rate: bool = True
    ) -> Taken | None:
        """Count ``n`` more messages of ``tenant`` against its caps, or raise
        :class:`TenantCapExceeded` (nothing counted). Returns what to
        :meth:`refund` if they are not spooled after all. ``rate=False``: the
        daily quota only (a campaign's list: bulk mail, not a submission)."""
        daily, rate_, burst = self.caps(tenant)
        rate_ = rate_ if rate else 0.0
        rate = rate_ > 0
        if not (daily or rate):
            return None
        now = time.time() if now is None else now
        if n <= 0:  # nothing to count; a quota's Taken all the same, for a settle
            return Taken(f"{PREFIX}{tenant}:{utc_day(now)}", 0) if daily else None
        if rate and n > burst:
            raise TenantCapExceeded(
                f"{n} messages in one request or message exceed the tenant's burst of"
                f" {burst} ([api] tenant_message_burst or [tenants.{tenant}] message_burst):"
                " send them in smaller parts", 0, "burst",
            )  # fmt: skip
        taken = None
        if daily:
            key = f"{PREFIX}{tenant}:{utc_day(now)}"
            spool = self.ctx.spool
            total = int(spool.add_counters({key: n})[key])
            self.used[key] = total
            if total > daily:
                self.used[key] = int(spool.add_counters({key: -n})[key])
                raise self._over_daily(daily, total - n, now)
            taken = Taken(key, n)
        if rate:
            try:
                wait = self._rate_wait(tenant, rate_, burst, n)
            except Exception:
                self.refund(taken)
                raise
            if wait > 0:
                self.refund(taken)
                secs = max(1, round(wait + 0.5))
                raise TenantCapExceeded(
                    f"message rate exceeded: the tenant may submit {rate_:g} messages/s"
                    f" (burst {burst}); try again in {secs} s", secs, "rate",
                )  # fmt: skip
        return taken

    def _rate_wait(self, tenant: str, rate: float, burst: int, n: int) -> float:
        shared = self.ctx.spool.shared_limits()
        if shared is not None and self._shared_ok():
            try:
                return float(shared.acquire(f"tenant-submit:{tenant}", rate, burst, None, n))
            except Exception as e:  # Redis away a moment: this node's own bucket holds
                self._alone(e)
        g = self.rates.get(tenant)
        if g is None or self.rate_spec.get(tenant) != (rate, burst):
            g = self.rates[tenant] = Gcra(rate, burst)
            self.rate_spec[tenant] = (rate, burst)
        return g.acquire(time.monotonic(), n)

    def refund(self, taken: Taken | None, n: int | None = None) -> None:
        """Give back ``n`` (all, by default) of what :meth:`take` counted: they were
        not spooled."""
        if taken is None:
            return
        k = taken.n if n is None else min(n, taken.n)
        if k <= 0:
            return
        taken.n -= k
        try:
            self.used[taken.key] = int(self.ctx.spool.add_counters({taken.key: -k})[taken.key])
        except Exception as e:  # counted and not sent: the tenant's loss, said
            log.warning("tenant caps: %d message(s) not given back to %s: %s", k, taken.key, e)

    def settle(self, taken: Taken | None, spooled: int) -> None:
        """Make what ``taken`` counts ``spooled``, what was spooled: the rest given
        back, or the messages spooled beyond it counted (addresses a list still
        spooling had counted as its own, spooled first by this request: that
        list's job gives them back when it ends)."""
        if taken is None:
            return
        extra = spooled - taken.n
        if extra <= 0:
            self.refund(taken, -extra)
            return
        taken.n += extra
        try:
            self.used[taken.key] = int(self.ctx.spool.add_counters({taken.key: extra})[taken.key])
        except Exception as e:  # spooled and not counted: said
            log.warning("tenant caps: %d message(s) not counted to %s: %s", extra, taken.key, e)

    @staticmethod
    def job_tags(taken: Taken | None) -> dict[str, str]:
        """The fields an ingest job's source carries for :meth:`settle_job`: the
        counter and what was counted for its list."""
        if taken is None:
            return {}
        return {QUOTA_KEY: taken.key, QUOTA_N: str(taken.n)}

    def settle_job(self, job: Any) -> None:
        """An uploaded list's job (an ``IngestJob``) has ended: its quota count
        becomes the rows it spooled, whichever process or node ended it (the one
        that took the list may have failed or died meanwhile)."""
        q = job_quota(job)
        if q is not None:
            self.settle(Taken(*q), int(job.accepted))

    def sweep(self, now: float | None = None) -> int:
        """Drop the counters of days before yesterday (serve's tick, hourly)."""
        now = time.time() if now is None else now
        self.trim(now)
        return self.sweep_store(now)

    def trim(self, now: float) -> None:
        """This node's own counts of days before yesterday dropped (the loop's)."""
        keep = {utc_day(now), utc_day(now - DAY)}
        self.used = {k: v for k, v in self.used.items() if k.rpartition(":")[2] in keep}

    def sweep_store(self, now: float) -> int:
        """The spool's counters of days before yesterday dropped (a thread may)."""
        keep = {utc_day(now), utc_day(now - DAY)}
        spool = self.ctx.spool
        old = [k for k in spool.counters(PREFIX) if k.rpartition(":")[2] not in keep]
        if old:
            spool.drop_counters(old)
        return len(old)


class SharedKeyRate:
    """``[api] rate_limit`` per API key, one bucket for every node on a shared
    spool (the spool's Lua GCRA, Redis's clock), used as :class:`Gcra`; on a
    Redis outage this node's own bucket holds for a while."""

    __slots__ = ("alone_since", "burst", "local", "name", "rate", "shared")

    def __init__(self, shared: Any, kid: str, rate: float, burst: int) -> None:
        self.shared, self.name, self.rate, self.burst = shared, f"api-key:{kid}", rate, burst
        self.local = Gcra(rate, burst)
        self.alone_since = -ALONE_FOR

    def acquire(self, now: float, n: int = 1) -> float:
        if now - self.alone_since > ALONE_FOR:
            try:
                return float(self.shared.acquire(self.name, self.rate, self.burst, None, n))
            except Exception as e:
                self.alone_since = now
                log.warning("API: the nodes' shared request rate is out of reach (%s);"
                            " counting on this node alone for %g s", e, ALONE_FOR)  # fmt: skip
        return self.local.acquire(now, n)
