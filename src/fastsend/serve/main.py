"""``fastsend serve -c fastsend.toml``: the long-lived MTA process.

One process on the standard asyncio loop runs, side by side:

- the engine's :class:`~fastsend.queue.supervisor.Supervisor` with
  ``until_idle=False`` as a task (it forks the uvloop workers and feeds them
  from the spool; the API wakes it after each injection);
- the HTTP server (aiohttp): the ``/v1`` API, ``/metrics`` (admin keys only),
  and the tracking and unsubscribe routes of :mod:`fastsend.serve.tracking`;
  with ``[api] public_listen`` those routes are served there only (what
  recipients reach), with ``[api] admin_listen`` ``/metrics`` is also served
  there without a key (bind it to a private address);
- the webhook dispatcher and the SMTP listeners (submission, bounce intake).

Signals:

- SIGTERM (or the first SIGINT): drain. The SMTP listeners stop accepting, the
  supervisor claims nothing new and lets the workers finish their windows while
  the HTTP listeners still serve (tracking, unsubscribe, and the API: what it
  accepts is spooled for the next start), then they close, requests in progress
  finishing (each answers only after its commit), and the process exits 0. Whatever is still queued stays in the spool for
  the next start. A drain stops now after 30 s (a receiver that never
  answers), or after 10 s with a shared spool out of reach. A second SIGTERM/SIGINT stops at once (windows go back to
  queued; HTTP requests still in progress, with or without --no-workers, are
  cut off).
- SIGHUP: re-read the config file; routes, shaping, API limits, tenants,
  ``[submission.users]``, the listeners' TLS certificates (a renewal at the same
  paths) and the suppression list take effect, workers are replaced
  without a gap in delivery: a new worker on the new config starts at once while
  the old one finishes the transactions on its connections (none is cut
  mid-transaction; within ``[delivery] drain_limit``), the two together within
  each (source IP, site) connection limit, the new one starting each (source IP, site)
  where the old one left it (its rate buckets as spent, an AIMD cut, a rule's
  throttle); HTTP connections stay open. The new config's warnings are printed; a config with
  an error is reported and ignored (the running one stays). Its source IPs are
  checked as at start: one that is no address of this machine is said and rested
  (no mail attempted from it) until it is (also checked every 30 s while serving).
  A SIGHUP during a reload is queued: the file is read again once it is done
  (the operator's last edit wins).

It prints one line to stderr when ready (with the startup time) and logs no
API keys, message bodies or secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from fastsend import durable
from fastsend.config import Config, ConfigError, load
from fastsend.faults import FAULT, countdown
from fastsend.periodic import every
from fastsend.procs import leave_hung_up_terminal
from fastsend.serve import lograte
from fastsend.sqlitedb import corrupt_database

log = logging.getLogger("fastsend.serve")
IDEM_SWEEP_EVERY = 300.0  # s between sweeps of expired Idempotency-Keys
TICK_OUTAGE = 2.0  # s between periodic flushes while the spool is out of reach
# A source IP of the config that is no address of this machine (taken off its
# interface, or a SIGHUP's config naming one): rested for every provider under
# this key (wire.IPRest), so no mail is attempted from it (each attempt would be
# deferred: "Cannot assign requested address"); looked at again every
# FOREIGN_CHECK s and at each SIGHUP, and lifted once it is back.
FOREIGN_KEY = "host"
FOREIGN_CHECK = 30.0
FOREIGN_REST = 86400.0  # renewed when half of it is gone
# [tls] reports: due reports looked for this often, from this long after UTC midnight
# (the day's last sessions counted; RFC 8460 4.1 asks for daily reports)
TLS_REPORTS_EVERY, TLS_REPORTS_AFTER = 600.0, 300.0
ADOPT_EVERY = 5.0  # s between looks for upload jobs whose reader died (Uploads.adopt)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="config file (TOML)")
    p.add_argument(
        "--no-workers",
        action="store_true",
        help="accept and spool only: run no supervisor or workers (an ingest-only node)",
    )
    p.add_argument(
        "--allow-volatile",
        action="store_true",
        help="on a shared Redis spool, start even with appendonly no (accepted mail is then"
        " in memory only) or a maxmemory-policy that evicts keys (see docs/DEPLOY.md)",
    )


# SIGHUPs that came before serve's loop handled them (while it started: config,
# spool, listeners, workers). The default action had killed serve (a `systemctl
# reload` or logrotate's postrotate during a start or a restart): its workers died
# with it mid-transaction. Each is now a reload once serve is ready.
_early_hups: list[int] = []


def _early_hup(signum: int, frame: object) -> None:
    _early_hups.append(signum)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    signal.signal(signal.SIGHUP, _early_hup)  # (before the file is read: it may change)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lograte.install(logging.getLogger().handlers)  # repeated lines held back
    try:
        cfg = load(args.config)  # every section, serve's own included, checked here
    except ConfigError as e:
        print(f"fastsend serve: {e}", file=sys.stderr)
        return 2
    for w in cfg.warnings:
        print(f"fastsend serve: warning: {w}", file=sys.stderr)
    if cfg.tenants is None:
        print(
            "fastsend serve: no [tenants] table: single-tenant mode, every API key and"
            " submission user may send as any From domain (see SECURITY.md)",
            file=sys.stderr,
        )
    try:
        secure_spool(cfg.spool_dir)
    except OSError as e:
        file = os.path.exists(cfg.spool_dir) and not os.path.isdir(cfg.spool_dir)
        said = "not a directory: a file is there" if file else e  # (was "[Errno 17] File exists")
        print(f"fastsend serve: spool {cfg.spool_dir}: {said}", file=sys.stderr)
        return 2
    if not args.no_workers:  # an ingest-only node sends from no address
        from fastsend.delivery.ehlo import foreign_ips_error

        if (why := foreign_ips_error(cfg)) is not None:
            print(f"fastsend serve: {why}", file=sys.stderr)
            return 2
    raise_nofile(cfg)
    server = Server(args.config, cfg, workers=not args.no_workers, t0=t0)
    server.allow_volatile = bool(getattr(args, "allow_volatile", False))
    # The standard asyncio loop: the supervisor forks workers from inside it
    # (a child forked from a running uvloop loop cannot run its own uvloop).
    with asyncio.Runner() as runner:
        return runner.run(server.main())


def secure_spool(spool_dir: str) -> None:
    """The spool directory 0700 and every file in it 0600 (databases, WAL/SHM, keys,
    secrets, logs), whatever umask created them: tenants' mail and the installation
    secret are for the server's user only. (Files created from now on get 0600 from
    the umask that ``fastsend.cli`` sets.)"""
    durable.makedirs(spool_dir, mode=0o700)
    os.chmod(spool_dir, 0o700)
    with os.scandir(spool_dir) as it:
        for e in it:
            if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mode & 0o077:
                os.chmod(e.path, 0o600)


def raise_nofile(cfg: Config) -> None:
    """Raise the soft limit on open files towards the hard one: the listeners' caps
    ([api] max_connections per HTTP listener, [submission]/[intake] max_connections)
    only protect the process if it can hold that many sockets (Debian's soft limit
    is 1024). Says so when even the hard limit is short."""
    import resource

    a = cfg.api
    http = 1 + bool(a.public_listen) + bool(a.admin_listen)
    smtp = [t.max_connections for t in (cfg.submission, cfg.intake) if t.listen]
    smtp += [cfg.submission.max_connections] if cfg.submission.listen_tls else []
    want = a.max_connections * http + sum(smtp) + 1024  # + spool files, workers, clients
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < want:
            print(
                f"fastsend serve: warning: open files limited to {new} (ulimit -n), fewer"
                f" than the listeners' connection caps need ({want})",
                file=sys.stderr,
            )


async def warm_rules_aside() -> None:
    """The bounce rules compiled (fastsend.bounce.reply.warm_rules) in a thread of
    its own, ended when this returns: on the loop, the first deferral or bounce
    classified held every listener ~0.3 s. (Not the loop's executor: no thread
    of ours is left running when the workers fork.)"""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def warm() -> None:
        try:
            from fastsend.bounce.reply import warm_rules

            warm_rules()
        except Exception:  # (the rules then compile on first use, as before)
            log.exception("the bounce rules could not be compiled ahead")
        finally:
            with contextlib.suppress(RuntimeError):  # (the loop closed: serve ended)
                loop.call_soon_threadsafe(done.set_result, None)

    t = threading.Thread(target=warm, name="bounce-rules", daemon=True)
    t.start()
    await done
    t.join()


class Server:
    def __init__(self, config_path: str, cfg: Config, *, workers: bool, t0: float) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.with_workers = workers
        self.t0 = t0
        self.stop_event = asyncio.Event()
        self.stop_now = asyncio.Event()  # a second SIGTERM/SIGINT: no more waiting
        self.terms = 0
        self.reloading: asyncio.Task[None] | None = None
        self.hup_again = False  # a SIGHUP came during a reload: the file is read again after it
        self.giving_back: asyncio.Task[None] | None = None  # (held: a task is weakly kept)
        self.foreign: dict[str, float] = {}  # source IP -> end of its rest (check_source_ips)
        self.listeners: Any = None  # fastsend.serve.listeners.Listeners once started
        self.allow_volatile = False
        self.idem_swept = 0.0
        self.staging_after = 0  # campaigns up to this id are past staging (sweep_staging)
        self.tick_outage = False  # the periodic flush found the spool out of reach
        self.notices: Any = None  # fastsend.serve.dsn.Notices, with [submission]
        # TLS-RPT ([tls] reports = "on"): fastsend.analytics.tlsrpt.Sender, its next
        # look (Unix time) and the run under way
        self.tls_reports: Any = None
        self.tls_reports_at = 0.0
        self.tls_reporting: asyncio.Task[None] | None = None
        self.tick_failed = 0.0  # monotonic time it last did
        self.adopted = 0.0  # monotonic time of the last look for orphaned upload jobs
        self.sends_looked = 0.0  # monotonic time of the last look for dead sends (Redis)
        self.caps: list[Any] = []  # fastsend.serve.httpguard.ConnectionCap per HTTP listener
        self.webhooks: Any = None  # fastsend.serve.webhooks.WebhookDispatcher once started
        self.app: Any = None  # the aiohttp application (the API's), once made
        self.sup_failed: BaseException | None = None  # why the supervisor ended unasked
        self.indexing: asyncio.Future[None] | None = None  # a shared index's flush, in a thread

    async def main(self) -> int:
        from aiohttp import web

        from fastsend.config.base import split_listen
        from fastsend.queue.supervisor import Supervisor
        from fastsend.serve.api import API_KEY, admin_only
        from fastsend.serve.app import make_app
        from fastsend.serve.charts import setup_charts
        from fastsend.serve.context import open_context
        from fastsend.serve.dashboard import setup_dashboard
        from fastsend.serve.httpguard import ConnectionCap
        from fastsend.serve.listeners import start_listeners
        from fastsend.serve.metrics import Metrics
        from fastsend.serve.proxyproto import ProxySettings, proxied_site
        from fastsend.serve.tracking import setup_tracking
        from fastsend.serve.webhooks import WebhookDispatcher

        cfg = self.cfg
        settings = cfg.api
        rules_warm = asyncio.ensure_future(warm_rules_aside())
        from fastsend.cluster import ClusterError
        from fastsend.spool import SpoolBusy, SpoolError

        try:
            ctx = self.ctx = open_context(cfg)
        except SpoolError as e:
            print(f"fastsend serve: {e}", file=sys.stderr)
            return e.exit_status  # (a Redis that does not answer: 75)
        try:  # one supervisor per SQLite spool; on Redis one per node name and local dir
            ctx.spool.hold_supervisor("fastsend serve")
            ctx.spool.hold_local_dir(cfg.spool_dir, "fastsend serve")
        except SpoolBusy as e:
            print(f"fastsend serve: {e}", file=sys.stderr)
            ctx.close()
            return 75
        if self.with_workers:
            # A `send`'s campaign left with mail (a kill -9): not ours to deliver
            # with serve's routes and IPs; `resume` continues it with its own.
            from fastsend.sendruns import set_aside_sends

            try:
                for line in set_aside_sends(ctx.spool, self.config_path,
                                            cfg.spool_url or cfg.spool_dir):  # fmt: skip
                    print(f"fastsend serve: {line}", file=sys.stderr, flush=True)
            except ctx.spool.outage_errors() as e:  # (Redis: its claims leave a send's alone)
                print(f"fastsend serve: the sends left in the spool were not looked at: {e}",
                      file=sys.stderr, flush=True)  # fmt: skip
        if ctx.shared is not None:
            # A shared spool: state what accepted mail survives, hold our source IPs.
            try:
                for line in ctx.shared.start(cfg, allow_volatile=self.allow_volatile):
                    print(f"fastsend serve: {line}", file=sys.stderr, flush=True)
            except ClusterError as e:
                print(f"fastsend serve: {e}", file=sys.stderr)
                ctx.close()
                return 2
        metrics = Metrics(ctx)  # wraps ctx.spool: before the supervisor takes it
        sup = (
            Supervisor(
                cfg,
                ctx.spool,
                ctx.events,
                until_idle=False,
                # On Redis the one shared list (a SQLite one is the supervisor's own)
                suppression=ctx.suppression if ctx.shared is not None else None,
            )
            if self.with_workers
            else None
        )
        ctx.supervisor = metrics.sup = sup
        if ctx.shared is not None and sup is not None:
            ctx.shared.rest_ip = sup.rest_ip  # an IP another node took meanwhile
        app = self.app = make_app(ctx, settings)
        self.api = app[API_KEY]
        self.api.metrics = metrics
        if sup is not None:
            sup.result_hooks.append(metrics.on_result)
        on = cfg.submission.listen or cfg.submission.listen_tls
        if sup is not None and on and cfg.submission.dsn:
            from fastsend.serve.dsn import Notices

            # Submitted mail that bounces or expires: a notice to its sender.
            named = cfg.submission.hostname if cfg.submission.hostname != "localhost" else ""
            self.notices = Notices(ctx, cfg.helo or named)  # (else this host's FQDN)
            sup.result_hooks.append(self.notices.on_result)
            sup.before_commit.append(self.notices.sync)  # (power loss: its lines first)
        if sup is not None and cfg.tls.reports == "on" and ctx.tlsrpt is not None:
            from fastsend.analytics.tlsrpt import Sender, reports_campaign
            from fastsend.delivery.mx import MXResolver

            def spool_reports(rows: list[tuple[str, str, bytes]]) -> None:
                ctx.inject(reports_campaign(ctx.acceptor, ctx.spool), rows)

            self.tls_reports = Sender(cfg, ctx.tlsrpt, MXResolver(cfg), spool_reports)
        # /metrics: on the admin listener, or for admin keys ([dashboard] admin_tenants).
        app.router.add_get("/metrics", admin_only(metrics.handler))
        proxy = ProxySettings.of(cfg.proxy)
        # (listen, app, PROXY settings): the public listener is the one published
        # through the balancer (SECURITY.md), so it takes [proxy] as the API does;
        # the admin listener is never published.
        extra: list[tuple[str, web.Application, ProxySettings | None]] = []
        if settings.admin_listen:
            admin_app = web.Application()
            admin_app.router.add_get("/metrics", metrics.handler)
            extra.append((settings.admin_listen, admin_app, None))
        if settings.public_listen:  # recipients reach tracking and unsubscribe there only
            public_app = web.Application()
            setup_tracking(public_app, ctx)
            extra.append((settings.public_listen, public_app, proxy))
        else:
            setup_tracking(app, ctx)
        setup_dashboard(app, ctx)
        self.charts = setup_charts(app, ctx)  # issue 14: charts, campaign and IP pages
        from fastsend.serve import provider_events

        provider_events.setup_provider_events(app, ctx)  # /webhooks/{ses,sendgrid,mailgun}
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = settings.host_port
        # Each HTTP listener: header and body timeouts, connection caps (serve.httpguard).
        self.caps = [ConnectionCap(settings)]
        site = proxied_site(runner, host, port, proxy, reuse_address=True, backlog=1024,
                            cap=self.caps[0])  # fmt: skip
        # SIGTERM/SIGINT handled before the API listens: a stop sent once its port
        # answered (a script, systemd, a test waiting for the port) had killed it
        # with the default action before "ready", no drain, its workers orphaned.
        # One sent before "ready" is a stop as any other once it is up.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_term, sig)
        try:
            await site.start()
            if FAULT:  # tests: serve-stop-after-listen (frozen, its API port open)
                countdown({"serve-stop-after-listen": signal.SIGSTOP})
        except OSError as e:
            print(f"fastsend serve: cannot listen on {settings.listen}: {e}", file=sys.stderr)
            await runner.cleanup()
            ctx.close()
            return 2
        runners = [runner]
        for listen, extra_app, extra_proxy in extra:
            r = web.AppRunner(extra_app, access_log=None, handle_signals=False)
            await r.setup()
            runners.append(r)
            self.caps.append(ConnectionCap(settings))
            try:
                h, p = split_listen(listen)
                await proxied_site(r, h, p, extra_proxy, reuse_address=True,
                                   cap=self.caps[-1]).start()  # fmt: skip
            except OSError as e:
                print(f"fastsend serve: cannot listen on {listen}: {e}", file=sys.stderr)
                for x in runners:
                    await x.cleanup()
                ctx.close()
                return 2
        webhooks = self.webhooks = WebhookDispatcher(ctx)
        await webhooks.start()
        metrics.webhooks = webhooks
        listeners = self.listeners = await start_listeners(ctx)
        sup_task: asyncio.Task[Any] | None = None
        await rules_warm  # before the workers fork: they inherit them compiled
        if sup is not None:
            sup_task = asyncio.create_task(sup.run(), name="supervisor")
            sup_task.add_done_callback(self._supervisor_ended)
            await asyncio.sleep(0)  # run() installs its signal handlers; ours replace them
        for sig in (signal.SIGTERM, signal.SIGINT):  # (again: run() put its own)
            loop.add_signal_handler(sig, self.on_term, sig)
        loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        if _early_hups:  # a reload asked for while serve started (the file read again)
            log.warning("SIGHUP during the start: the config is read again")
            _early_hups.clear()
            self.on_hup()
        ticker = asyncio.create_task(self.tick(), name="tick")
        ips_check = (asyncio.create_task(every(FOREIGN_CHECK, self.check_source_ips,
                     "source IP check", log, wait_first=True), name="source-ips")
                     if sup is not None else None)  # fmt: skip
        ctx.uploads.on_spooled = metrics.accepted
        ctx.uploads.resume()  # lists a killed serve was still spooling
        from fastsend.serve.reputation import start_reputation

        reputation = start_reputation(ctx, self.charts)  # issue 14: blocklists, rate alarms
        from fastsend.serve.retention import start_retention

        reputation.append(start_retention(ctx))  # stores that would only grow, hourly
        print(
            f"fastsend serve: ready in {time.monotonic() - self.t0:.2f}s; API on"
            f" http://{host}:{port}/v1 (pid {os.getpid()},"
            f" {cfg.worker_count if sup else 0} workers)",
            file=sys.stderr,
            flush=True,
        )
        await self.stop_event.wait()
        outage = ctx.spool.outage_errors()
        # Drain. The SMTP listeners stop accepting at once (as Postfix's and KumoMTA's
        # do: an SMTP client tries again later); their sessions in progress go on.
        # The HTTP listeners serve on while the supervisor finishes its windows (up
        # to [delivery] drain_limit): a recipient's click or RFC 8058 one-click
        # unsubscribe is tried once by whoever sends it, and mail the API takes is
        # spooled as ever (sent at the next start, or by another node of a shared
        # spool). Before, every port closed first and refused them for the drain.
        t_drain = time.monotonic()
        for srv in listeners:
            srv.close()
        if sup is not None and sup_task is not None:
            if not sup_task.done():
                sup.on_signal(signal.SIGTERM if self.terms < 2 else signal.SIGINT)
            try:
                await sup_task
            except Exception as e:
                if self.sup_failed is None:
                    log.exception("supervisor failed")
                elif corrupt_database(e) is None:  # (a damaged database: said at its end)
                    log.error("supervisor failed", exc_info=e)
            loop = asyncio.get_running_loop()  # (its run took its signal handlers away)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.on_term, sig)
        # Then the HTTP listeners close; requests in progress finish (up to aiohttp's
        # 60 s, each SMTP listener's 10 s), unless a second signal says stop now: then
        # they are cut off.
        closing = asyncio.create_task(self.close_listeners(runners, listeners))
        now = asyncio.create_task(self.stop_now.wait())
        await asyncio.wait((closing, now), return_when=asyncio.FIRST_COMPLETED)
        now.cancel()
        if not closing.done():
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            with contextlib.suppress(OSError):
                print("fastsend serve: stopping now: requests in progress are cut off",
                      file=sys.stderr, flush=True)  # fmt: skip
        listeners.shutdown()
        ticker.cancel()
        if ips_check is not None:
            ips_check.cancel()
        reachable = not (self.tick_outage or (sup is not None and sup.outage_since > 0))
        if self.notices is not None and self.notices.pending and reachable:
            with contextlib.suppress(Exception):  # the failures' last notices
                self.notices.flush(settle=0.0)
        await ctx.uploads.stop()  # what is not spooled yet stays a job for the next start
        for task in reputation:
            task.cancel()
        await webhooks.stop()
        try:
            cut_off = self.tick_outage or (sup is not None and sup.outage_since > 0)
            ctx.close(release=not cut_off)
        except outage as e:  # the node's hold on its source IPs lapses by itself
            print(f"fastsend serve: the spool is out of reach at exit ({e.__class__.__name__}:"
                  f" {e})", file=sys.stderr, flush=True)  # fmt: skip
        print(
            f"fastsend serve: stopped after draining for {time.monotonic() - t_drain:.2f}s",
            file=sys.stderr,
            flush=True,
        )
        return 1 if self.sup_failed is not None else 0

    def _supervisor_ended(self, task: asyncio.Task[Any]) -> None:
        """The supervisor's task ended. Before a stop it only ends by failing (an
        error no outage handling covers: a corrupt spool database at its start's
        recovery, a bug): serve then went on taking mail over the API and SMTP
        that nothing delivered, said by no line until a stop ("supervisor
        failed"), while the dashboard's sampler logged a traceback every 15 s. It
        now stops serve, the cause said at once, exit status 1."""
        if task.cancelled() or self.stop_event.is_set():
            return
        e = task.exception()
        self.sup_failed = e if e is not None else RuntimeError("its run ended")
        why = corrupt_database(self.sup_failed)
        with contextlib.suppress(OSError):
            print(f"fastsend serve: the supervisor stopped ({why or self.sup_failed}): no"
                  " mail would be delivered; stopping", file=sys.stderr, flush=True)  # fmt: skip
        self.stop_event.set()

    async def close_listeners(self, runners: list[Any], listeners: Any) -> None:
        for r in runners:
            await r.cleanup()  # closes the listening socket, waits for handlers
        for srv in listeners:
            try:
                await asyncio.wait_for(srv.wait_closed(), 10)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        await every(0.2, self._tick, "periodic flush", log, wait_first=True)

    async def _tick(self) -> None:
        # A shared spool out of reach: one line when it starts and one when it
        # ends (no failure for 3 * TICK_OUTAGE s), not a traceback every 0.2 s.
        # After a failure the steps pause TICK_OUTAGE s (a paused Redis holds
        # each call for the client's timeout).
        mono = time.monotonic()
        if self.tick_outage and mono - self.tick_failed < TICK_OUTAGE:
            return
        if self.terms >= 2:  # stop now: what is left is flushed once, at exit
            return
        try:
            self._tick_steps()
            if self.ctx.shared is not None:
                await self._tick_shared()
        except self.ctx.spool.outage_errors() as e:
            if not self.tick_outage:
                log.warning("periodic flush: the spool is out of reach (%s: %s); trying"
                            " again every %.0f s", e.__class__.__name__, e, TICK_OUTAGE)  # fmt: skip
            self.tick_outage = True
            self.tick_failed = time.monotonic()
            return
        if self.tick_outage and mono - self.tick_failed >= 3 * TICK_OUTAGE:  # no flapping
            log.warning("periodic flush: the spool answers again")
            self.tick_outage = False

    def _flush_events(self) -> None:
        """The event log written (what the API, tracking and the intake emitted).
        Its disk full: said once, the events kept for the next tick (the intake
        takes no more mail meanwhile: Acceptor.accept), and the tick's other steps
        run. Before, a traceback every 0.2 s, and every step after this one
        (rollups, the node's hold on its source IPs, ...) was skipped for as long."""
        events = self.ctx.events
        was = events.failing
        try:
            events.flush()
        except OSError as e:
            from fastsend.spool import storage_problem

            problem = storage_problem(e)
            if problem is None:
                raise
            if not was:
                log.error("the event log %s (%s): its events are kept in memory and no"
                          " more mail is taken until it can be written", problem, e)  # fmt: skip
            return
        if was:
            log.warning("the event log is written again (the events kept meanwhile included)")

    def _flush_index(self) -> None:
        try:
            self.api.index.maybe_flush()
        except Exception as e:  # (an outage: said by the tick's other steps)
            if not isinstance(e, self.ctx.spool.outage_errors()):
                log.exception("event index: a flush failed")

    def _tick_steps(self) -> None:
        if self.notices is not None and (self.notices.pending or self.notices.owed):
            self.notices.flush()
        if self.app is not None:  # new campaigns noted whose request could not finish them
            from fastsend.serve.api_campaigns import finish_noted

            finish_noted(self.app)
        if self.ctx.shared is None:
            self.api.index.maybe_flush()
        elif self.indexing is None or self.indexing.done():
            # A shared index's flush in a thread: on the loop, each event emitted
            # cost every listener a Redis write within 0.2 s (a slow Redis: as long).
            self.indexing = asyncio.ensure_future(asyncio.to_thread(self._flush_index))
        self._flush_events()
        self.charts.tick()  # rollups flushed about once a second, queue gauges
        now = time.time()
        if self.ctx.shared is None and now - self.idem_swept > IDEM_SWEEP_EVERY:
            self.idem_swept = now  # (SQLite: on the loop; Redis: _tick_shared)
            self.ctx.caps.trim(now)
            self._sweeps(now)
        if self.tls_reports is not None and now >= self.tls_reports_at:
            self.tls_reports_at = now + TLS_REPORTS_EVERY
            if now % 86400 >= TLS_REPORTS_AFTER and (
                self.tls_reporting is None or self.tls_reporting.done()
            ):
                self.tls_reporting = asyncio.ensure_future(self._tls_reports(now))
        mono = time.monotonic()
        if self.ctx.shared is None and mono - self.adopted > ADOPT_EVERY:
            self.adopted = mono  # upload jobs whose reader died
            self.ctx.uploads.adopt()

    def _sweeps(self, now: float) -> int:
        """Expired Idempotency-Keys; campaigns whose creating request failed or
        died before all their rows were in (fastsend.serve.api_campaigns:
        "staging"): never sent, abandoned; the daily quotas' counters of past
        days. On a shared spool in a thread (:meth:`_tick_shared`): -> the
        ``after`` of the next sweep of staging campaigns."""
        from fastsend.serve.api_campaigns import sweep_staging

        self.ctx.spool.sweep_idem(now)
        _n, self.staging_after = sweep_staging(
            self.ctx.spool, self.api.settings.idempotency_ttl_s, now, self.staging_after
        )
        self.ctx.caps.sweep_store(now)
        return self.staging_after

    async def _tick_shared(self) -> None:
        """The tick's steps that only talk to a shared spool's Redis, their calls
        in a thread: on the loop, a Redis answering slowly (or a paused one, each
        call waiting for the client's timeout) held every listener (API, tracking,
        SMTP) for as long, on every node, even one with no workers."""
        now = time.time()
        if now - self.idem_swept > IDEM_SWEEP_EVERY:
            self.idem_swept = now
            self.ctx.caps.trim(now)
            await asyncio.to_thread(self._sweeps, now)
        assert self.ctx.shared is not None
        await self.ctx.shared.tick_async()  # renew this node's hold on its source IPs
        if self.app is not None:  # campaigns a dead node noted complete (held.jsonl)
            from fastsend.serve.api_campaigns import adopt_dead_notes

            await adopt_dead_notes(self.app)
        if self.notices is not None:  # failures a dead node left untold (dsn.journal)
            cluster = self.ctx.shared.cluster
            recs = await asyncio.to_thread(
                self.notices.dead_failures, lambda: {str(m["node"]) for m in cluster.members()}
            )
            if recs:
                self.notices.adopt(recs)
        mono = time.monotonic()
        if mono - self.adopted > ADOPT_EVERY:  # upload jobs whose reader died (any node)
            self.adopted = mono
            jobs = await asyncio.to_thread(self.ctx.spool.list_ingests, unfinished=True)
            self.ctx.uploads.adopt(jobs=jobs)
        lease = getattr(self.ctx.spool, "lease", None)
        if self.with_workers and lease and mono - self.sends_looked > lease / 2:
            # A `send` killed while this node runs: its campaign set aside (or
            # disowned) as at the start, once its name's lease lapsed.
            from fastsend.sendruns import set_aside_dead_sends

            self.sends_looked = mono
            cfg = self.ctx.config
            for line in await asyncio.to_thread(set_aside_dead_sends, self.ctx.spool,
                                                self.config_path, cfg.spool_url or cfg.spool_dir):  # fmt: skip
                print(f"fastsend serve: {line}", file=sys.stderr, flush=True)

    async def _tls_reports(self, now: float) -> None:
        """Yesterday's (and any earlier day's unsent) TLS-RPT reports, off the tick."""
        from fastsend.analytics.tlsrpt import SendingElsewhere, day_of

        try:
            for o in await self.tls_reports.run(day_of(now)):
                log.info("TLS-RPT report %s %s: posted %s, mailed %s%s", o["day"], o["domain"],
                         o["posted"] or "-", o["mailed"] or "-",
                         f" ({'; '.join(o['failed'])})" if o["failed"] else "")  # fmt: skip
        except SendingElsewhere as e:  # (a shared spool: another node sends them)
            log.info("TLS-RPT reports: %s", e)
        except Exception:
            log.exception("TLS-RPT reports not sent (tried again in %.0f s)", TLS_REPORTS_EVERY)

    def on_term(self, signum: int) -> None:
        self.terms += 1
        if self.terms == 1:
            self.stop_event.set()  # first: a stderr that is gone must not keep us up
            with contextlib.suppress(OSError):
                print("fastsend serve: draining (send SIGTERM again to stop now)", file=sys.stderr)
        else:
            self.stop_now.set()
            if self.ctx.supervisor is not None:
                self.ctx.supervisor.on_signal(signal.SIGINT)

    def on_hup(self) -> None:
        # A terminal hangup (serve in the foreground of an ssh session that
        # dropped) is a SIGHUP too: serve reloads and goes on, but its stderr is
        # the dead terminal, and the stop's last line raised EIO (a traceback,
        # exit 1 after a clean drain). What it says from now on goes nowhere.
        leave_hung_up_terminal()
        if self.stop_event.is_set():  # (a reload would respawn workers a stop is ending)
            log.warning("SIGHUP: the server is stopping; ignored")
            return
        if self.reloading is not None and not self.reloading.done():
            # The operator's last config must win: read again once this one is done
            # (ignored, an edit saved between two quick reloads stayed unread).
            if not self.hup_again:
                log.warning("SIGHUP: a reload is in progress; the config is read again after it")
            self.hup_again = True
            return
        self.reloading = asyncio.create_task(self.reloads(), name="reload")

    async def reloads(self) -> None:
        """:meth:`reload`, then again while SIGHUPs came during it (several: once)."""
        while True:
            self.hup_again = False
            try:
                await self.reload()
            except Exception:  # (a queued reload must still run)
                log.exception("SIGHUP: reload failed")
            if not self.hup_again or self.stop_event.is_set():
                return

    async def reload(self) -> None:
        from fastsend.serve.webhooks import WebhookConfig
        from fastsend.suppression import SuppressionList

        try:
            # (off the loop: the file, its includes and keys read, every listener
            # and API request waited for it)
            cfg = await asyncio.to_thread(load, self.config_path)
            settings = cfg.api
        except ConfigError as e:
            print(f"fastsend serve: SIGHUP: config not reloaded: {e}", file=sys.stderr)
            return
        countdown({"serve-reload-read": signal.SIGSTOP})  # (tests: a SIGHUP during a reload)
        for w in cfg.warnings:  # as at start: a setting that cannot take effect is said
            print(f"fastsend serve: SIGHUP: warning: {w}", file=sys.stderr)
        ctx = self.ctx
        if ctx.shared is not None:  # the new [ips] held before any worker uses them
            from fastsend.cluster import ClusterError

            try:
                ctx.shared.reload(cfg)
            except ClusterError as e:
                print(f"fastsend serve: SIGHUP: config not reloaded: {e}", file=sys.stderr)
                return
        try:
            if self.listeners is not None:
                self.listeners.reload(cfg)
        except ValueError as e:
            print(f"fastsend serve: SIGHUP: config not reloaded: {e}", file=sys.stderr)
            if ctx.shared is not None:
                ctx.shared.reloaded(ctx.config)  # what it took for the new [ips] back
            return
        if settings.listen != self.api.settings.listen:
            log.warning("SIGHUP: [api] listen changed; it takes effect at the next start")
            settings.listen = self.api.settings.listen
        if ctx.shared is None:  # the shared list (Redis) needs no reopening
            old_supp = ctx.suppression
            ctx.suppression = SuppressionList(os.path.join(ctx.config.spool_dir, "suppression.db"))
            old_supp.close()
        ctx.events.reopen()  # the event log moved away (logrotate without copytruncate)
        if (cfg.spool_url, cfg.spool_dir) != (ctx.config.spool_url, ctx.config.spool_dir):
            log.warning("SIGHUP: [spool] changed; it takes effect at the next start")
        if cfg.workers != ctx.config.workers:
            log.warning("SIGHUP: [workers] count changed; it takes effect at the next start")
        if cfg.event_log != ctx.config.event_log:  # (reopened below at its old path)
            log.warning("SIGHUP: [events] log changed; it takes effect at the next start")
        cfg.spool_url = ctx.config.spool_url
        cfg.spool_dir = ctx.config.spool_dir  # the spool cannot move under a running server
        ctx.config = cfg
        from fastsend.serve.tracking import configure as tracking_configure

        tracking_configure(cfg)  # links the respawned workers sign
        self.api.reconfigure(settings)
        for cap in self.caps:
            cap.configure(settings)
        if self.webhooks is not None:
            await self.webhooks.reconfigure(WebhookConfig.of(cfg.webhooks, cfg.tenants))
        if cfg.reputation != self.cfg.reputation:
            log.warning("SIGHUP: [reputation] changed; it takes effect at the next start")
        self.cfg = cfg
        sup = ctx.supervisor
        if sup is not None:
            self.check_source_ips(cfg, "SIGHUP: ")  # (its new workers start with the rests)
            await sup.reload(cfg)
        if ctx.shared is not None:  # the IPs it dropped: given back once no worker uses them
            if sup is not None and sup.retired:
                # In the background: the reload is done (and said) while an old worker
                # finishes its transactions (up to drain_limit); another may follow.
                self.giving_back = asyncio.create_task(self.give_back(sup), name="give-back")
            else:
                ctx.shared.reloaded(cfg)
        print("fastsend serve: configuration reloaded", file=sys.stderr, flush=True)

    def check_source_ips(self, cfg: Config | None = None, said: str = "") -> None:
        """Rest every source IP of the config that is no address of this machine
        (``foreign_ips``: it cannot be bound) for every provider, and say so once:
        its mail goes from the other addresses of its pool, or waits, unattempted;
        lift the rest of one that is back (or no longer configured). At each SIGHUP
        (before its new workers start) and every FOREIGN_CHECK s. Before, only the
        start checked: an address taken off the host, or named by a SIGHUP's
        config, was used, each attempt deferred, without a word."""
        from fastsend.delivery.ehlo import foreign_ips

        sup = self.ctx.supervisor
        if sup is None:
            return
        cfg = cfg or self.ctx.config
        bad = dict(foreign_ips(cfg))
        now = time.time()
        for ip, why in bad.items():
            until = self.foreign.get(ip, 0.0)
            if until - now > FOREIGN_REST / 2:
                continue
            if not until:
                log.warning("%ssource IP %s is not an address of this machine (%s): no mail"
                            " goes from it until it is (looked at again every %.0f s)",
                            said, ip, why, FOREIGN_CHECK)  # fmt: skip
            self.foreign[ip] = now + FOREIGN_REST
            sup.rest_ip(ip, ["*"], now + FOREIGN_REST,
                        f"source IP {ip} is not an address of this machine ({why})",
                        FOREIGN_KEY, FOREIGN_CHECK)  # fmt: skip
        configured = set(cfg.source_ips)
        for ip in [ip for ip in self.foreign if ip not in bad]:
            del self.foreign[ip]
            sup.lift_ip(ip, FOREIGN_KEY)
            if ip in configured:  # (else the config no longer names it: nothing to say)
                log.warning("%ssource IP %s is an address of this machine again: mail goes"
                            " from it", said, ip)  # fmt: skip

    async def give_back(self, sup: Any) -> None:
        """The source IPs a reload dropped go back to the cluster once the workers
        it replaced, which may still send from them, have exited (the config in
        force then: a later reload's IPs are kept)."""
        await sup.retirements()
        if self.ctx.shared is not None and not self.stop_event.is_set():
            try:
                self.ctx.shared.reloaded(self.ctx.config)
            except Exception as e:  # kept until the lease lapses: said, not fatal
                log.warning("SIGHUP: the source IPs the reload dropped were not given back: %s", e)
