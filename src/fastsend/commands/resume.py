"""``fastsend resume --spool DIR``: finish what a spool still holds.

After a crash or a stop: every in-flight message goes back to the queue, and
everything queued or deferred is delivered with the same engine, progress and
summary as ``send``. A recipient list whose ingest was cut short (a durable
job in the spool, see :mod:`fastsend.accept`) is read on from its last
committed row, after checking the file is the one the job started from. When
the file is gone or changed, the rows never accepted are counted and reported,
the exit status is 1, and ``--abandon-rest`` closes the job without them.
A list another live process is reading (``send``, ``serve``, another
``resume``) is not touched: the error names that process, exit status 75; the
same for a SQLite spool another live process supervises (``send``, ``serve``,
``resume``: ``Spool.hold_supervisor``), before anything is requeued.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastsend.commands.common import (
    EX_TEMPFAIL,
    RUN_FLAGS,
    abandon_empty_sends,
    add_engine_arguments,
    die,
    engine_config,
    foreign_source_ips,
    hold_source_ips,
    hold_supervisor,
    open_suppression,
    print_summary,
    recorded_run,
    redact_url,
    run_engine,
    run_flags,
    sign_links_as_serve,
    still_deferred,
    stopped_by_signal,
    with_run,
)
from fastsend.sendruns import take_back_set_aside

if TYPE_CHECKING:
    from fastsend.config import Config
    from fastsend.spool import IngestJob

# Everything run() opens is closed when it returns, and it leaves no thread:
# the process may exit without the interpreter's teardown (cli.run_process).
EXIT_AT_ONCE = True
# What run() imports beyond the options (the cli imports them first, see cli.main).
RUN_IMPORTS = (
    "fastsend.engine",
    "fastsend.delivery.worker",  # forked workers run it: imported before the fork
    "fastsend.accept",
    "fastsend.events",
    "fastsend.spool",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--abandon-rest",
        action="store_true",
        help="close unfinished list ingests whose file is gone or changed, without their"
        " remaining rows",
    )
    add_engine_arguments(p)


def settle_quota(spool: Any, job: IngestJob | None) -> None:
    """An uploaded list (serve's API) this command ended: the tenant's daily quota
    counts what it spooled, not the rows it never did (``tenantcaps.settle_ended_job``).
    A failure is said, not fatal: the mail is what matters here."""
    if job is None:
        return
    from fastsend.serve.tenantcaps import settle_ended_job

    try:
        settle_ended_job(spool, job)
    except Exception as e:
        print(f"fastsend: warning: the daily quota count of ingest job {job.id} was not"
              f" settled: {e}", file=sys.stderr)  # fmt: skip


def take_recorded_run(
    args: argparse.Namespace, spool: Any, spool_url: str
) -> tuple[argparse.Namespace, Config] | int | None:
    """The options and config of the `send` runs that spooled what ``spool`` still
    holds (``commands.common.recorded_run``), said on stderr; None when there are
    none to take (or none but defaults), or the exit status, said, when they
    differ between campaigns or no longer load."""
    from fastsend.config import ConfigError

    run, ids, why = recorded_run(spool)
    if why:
        return die(why)
    if not run:
        return None
    camps = f"campaign{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"
    taken = with_run(args, run)
    taken.spool = spool_url  # the spool opened, whatever a recorded config names
    try:
        cfg, url = engine_config(taken)
    except ConfigError as e:
        return die(f"{e} (the options `send` was given for {camps}: {run_flags(run)})")
    from fastsend.delivery.ehlo import foreign_ips_error

    if foreign := foreign_ips_error(cfg):  # (another node of a shared spool: its own IPs)
        return die(
            f"{foreign} (the options `send` was given for {camps}: {run_flags(run)}); give"
            " resume this machine's (--source-ip, -c)"
        )
    if url != spool_url:
        return die(
            f"the config `send` was given for {camps} names another spool ({redact_url(url)});"
            " give resume its options (-c, --route, ...)"
        )
    print(
        f"fastsend: resuming {camps} with the options its send was given: {run_flags(run)}"
        " (give -c, --route, --source-ip, --helo, --retry or --nameserver to choose others)",
        file=sys.stderr,
    )
    return taken, cfg


def run(args: argparse.Namespace) -> int:
    # The engine and what it needs, imported once the command runs (not for --help).
    from fastsend import engine
    from fastsend.accept import Acceptor, rows_left, source_problem
    from fastsend.config import ConfigError
    from fastsend.events import EventLog
    from fastsend.spool import IngestBusy, SpoolError, open_spool

    try:
        cfg, spool_url = engine_config(args)
    except ConfigError as e:
        return die(str(e))
    if (foreign := foreign_source_ips(cfg)) is not None:
        return foreign
    try:
        spool = open_spool(spool_url, must_exist=True)
    except SpoolError as e:
        return die(str(e), e.exit_status)
    # One supervisor per spool (SQLite): another one's in-flight mail is not ours to requeue.
    busy = hold_supervisor(spool, "fastsend resume", cfg.spool_dir)
    if busy:
        return busy
    try:
        abandon_empty_sends(spool)
    except spool.outage_errors() as e:
        spool.close()
        return die(f"the spool is out of reach ({e.__class__.__name__}: {e})", EX_TEMPFAIL)
    if not any(getattr(args, name) for name in RUN_FLAGS):
        # None of the options that say where mail goes: those of the `send` that
        # spooled what is left (a kill -9 said no resume command; by MX instead of
        # its --route the mail bounced or left from the wrong place).
        try:
            taken = take_recorded_run(args, spool, spool_url)
        except spool.outage_errors() as e:
            spool.close()
            return die(f"the spool is out of reach ({e.__class__.__name__}: {e})", EX_TEMPFAIL)
        if isinstance(taken, int):
            spool.close()
            return taken
        if taken is not None:
            args, cfg = taken
    try:  # what a serve set aside for this command (a send's mail, its options)
        for cid in take_back_set_aside(spool):
            print(f"fastsend: campaign {cid}, set aside by serve, is active again",
                  file=sys.stderr)  # fmt: skip
    except spool.outage_errors() as e:
        spool.close()
        return die(f"the spool is out of reach ({e.__class__.__name__}: {e})", EX_TEMPFAIL)
    try:
        sign_links_as_serve(cfg, spool)  # serve's secret: its links, VERP and ids verify
    except spool.outage_errors() as e:
        spool.close()
        return die(f"the spool is out of reach ({e.__class__.__name__}: {e})", EX_TEMPFAIL)
    # One reader per list: every unfinished job is held before anything else
    # (a live `send`, `serve` or `resume` reading one makes this one stop here,
    # before it touches the queue).
    jobs: list[IngestJob] = []
    for job in spool.list_ingests(unfinished=True):
        try:
            spool.hold_ingest(job.id)
        except IngestBusy as e:
            spool.close()  # releases what was held
            print(f"fastsend: error: {e}", file=sys.stderr)
            return EX_TEMPFAIL
        now = spool.get_ingest(job.id)  # it may have finished meanwhile
        if now is not None and not now.finished:
            jobs.append(now)
        else:
            spool.release_ingest(job.id)
    ips = hold_source_ips(spool, cfg)  # a shared spool: no other live node's IP
    if isinstance(ips, int):
        spool.close()
        return ips
    events = EventLog(cfg.event_log_path)
    suppression = open_suppression(spool_url, cfg.spool_dir)
    acceptor = Acceptor(spool, events, suppression, max_size=cfg.delivery.max_message_size)
    resumable: list[IngestJob] = []
    lost = 0  # rows of lists that cannot be read any more
    abandoned = 0
    for job in jobs:
        problem = source_problem(job)
        path = job.source.get("path")
        if problem is None:
            resumable.append(job)
            print(
                f"fastsend: resuming the ingest of {path} (campaign {job.campaign}):"
                f" {job.accepted + job.rejected + job.duplicates:,} of {job.total:,} rows"
                " were read",
                file=sys.stderr,
            )
            continue
        left = rows_left(job)
        if args.abandon_rest:
            spool.finish_ingest(job.id, "abandoned")
            settle_quota(spool, spool.get_ingest(job.id))
            abandoned += left
            print(
                f"fastsend: {path} is {problem}: abandoned its {left:,} row(s) never accepted"
                f" (campaign {job.campaign}, --abandon-rest)",
                file=sys.stderr,
            )
        else:
            lost += left
            print(
                f"fastsend: error: {path} is {problem}: {left:,} row(s) of campaign"
                f" {job.campaign} were never accepted; restore the file and resume again,"
                " or resume --abandon-rest to finish without them",
                file=sys.stderr,
            )
    recovered = spool.recover()
    pending = spool.pending()  # not counts(): that reads every row the spool ever held
    total = pending["queued"] + pending["deferred"]

    def feeder() -> Iterator[BaseException | None]:
        for job in resumable:
            for m in acceptor.feed(job):  # an outage of the spool: the engine waits it out
                yield m if isinstance(m, BaseException) else None

    summary = run_engine(
        lambda: engine.run(
            cfg,
            spool,
            max_wait=args.max_wait,
            total=total,
            progress=not args.no_progress,
            feeder=feeder() if resumable else None,
            events=events,
            # A shared spool's list (Redis: every node's) for dispatch and hard bounces.
            suppression=suppression if spool.shared() is not None else None,
            cluster=ips,
        ),
        spool_url,
        events,
        suppression,
    )
    if isinstance(summary, int):  # the spool's storage refused a write (said): 75
        return summary
    summary["recovered_inflight"] = recovered
    summary["spool"] = redact_url(spool_url)  # no Redis password in the output
    summary["rows_never_accepted"] = lost
    summary["rows_abandoned"] = abandoned
    # Rows of the lists it read on that named an address their campaign had: left out.
    dups = 0
    for j in resumable:
        ended = spool.get_ingest(j.id)
        dups += (ended.duplicates - j.duplicates) if ended is not None else 0
        if ended is not None and ended.finished:
            settle_quota(spool, ended)
    summary["duplicates"] = dups
    unfinished = [
        j for j in spool.list_ingests(unfinished=True) if j.id in {r.id for r in resumable}
    ]
    print_summary(summary, args.json)
    spool.close()
    left = sum(rows_left(j) for j in unfinished)
    if summary.get("feed_error"):
        print(f"fastsend: error: the list ingest stopped: {summary['feed_error']}", file=sys.stderr)
        return stopped_by_signal(summary, args, left) or 1
    if stopped := stopped_by_signal(summary, args, left):
        return stopped
    if unfinished:
        print(
            f"fastsend: error: the list ingest stopped: {summary.get('feed_error') or 'stopped'}",
            file=sys.stderr,
        )
        return 1
    if lost:
        print(
            f"fastsend: error: {lost:,} recipient row(s) were never accepted (see above)",
            file=sys.stderr,
        )
        return 1
    return still_deferred(summary, args)
